//! Reading what rsync says: its exit status and messages as a [`Verdict`], its itemized
//! changes (`%i %n`) as differences in ferry's terms or as deletions by name, and `--stats`.

use ferry_protocol::meta::Difference;
use ferry_protocol::RelPath;
use std::collections::BTreeSet;

/// How an rsync run ended, classified the way operators read rsync's exit codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Exit 0, or 24 (some source files vanished: their removal is an event of its own).
    Done,
    /// Exit 23: some files were not transferred. Retry this batch's paths.
    Partial(String),
    /// Network trouble, timeouts, the daemon restarting: retry with backoff, keep the paths.
    Transient(String),
    /// Wrong password, unknown module, access denied, unsupported option, missing binary:
    /// retrying cannot help; the target stops with this message.
    Config(String),
    /// Not run: the mass-delete guard wants an operator's confirmation.
    Guarded(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Done => f.write_str("done"),
            Verdict::Partial(m)
            | Verdict::Transient(m)
            | Verdict::Config(m)
            | Verdict::Guarded(m) => f.write_str(m),
        }
    }
}

/// What rsync says when `--max-delete` held deletions back.
pub(crate) const MAX_DELETE_HELD: &str = "Deletions stopped due to --max-delete limit";

/// Classifies an rsync exit `code` using what it printed on stderr (5 and 10 mean either a
/// refused login or a network problem; only the message tells which).
pub fn classify(code: i32, stderr: &str) -> Verdict {
    let msg = || {
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        format!("rsync exit {code}: {tail}")
    };
    const REFUSALS: [&str; 7] = [
        "@ERROR: auth failed",
        "@ERROR: Unknown module",
        "@ERROR: access denied",
        "@ERROR: chdir failed",
        "@ERROR: chroot failed",
        "password file must not be other-accessible",
        "ERROR: module is read only",
    ];
    // --max-delete stopped deletions: the delete guard's share was reached. A local or ssh
    // run exits 25; a push to an rsyncd exits 0 and relays only the daemon's message.
    if code == 25 || (code == 0 && stderr.contains(MAX_DELETE_HELD)) {
        return Verdict::Guarded(msg());
    }
    match code {
        0 | 24 => Verdict::Done,
        23 => Verdict::Partial(msg()),
        _ if REFUSALS.iter().any(|r| stderr.contains(r)) => Verdict::Config(msg()),
        // Syntax/usage, protocol incompatibility, unsupported action (an rsync too old for
        // --delete-missing-args), a client-side error in the password file.
        1 | 2 | 4 => Verdict::Config(msg()),
        _ => Verdict::Transient(msg()),
    }
}

/// Reads rsync's itemized changes (`%i %n`): `*deleting NAME`, or `YXcstpoguax NAME` where a
/// new entry has `+` in every attribute column (`a`: ACL, `x`: xattrs; `Y` = `h`: a hard link
/// to another name). A path both deleted and created changed type.
pub fn parse_itemized(out: &[u8]) -> Vec<(RelPath, Difference)> {
    let mut diffs: Vec<(RelPath, Difference)> = Vec::new();
    for line in out.split(|b| *b == b'\n') {
        let Some(space) = line.iter().position(|b| *b == b' ') else {
            continue;
        };
        let (flags, name) = (&line[..space], line[space + 1..].trim_ascii_start());
        let name = name.strip_suffix(b"/").unwrap_or(name);
        let path = if name == b"." || name.is_empty() {
            RelPath::root()
        } else {
            RelPath::from_bytes(name.to_vec())
        };
        if flags == b"*deleting" {
            diffs.push((path, Difference::Extra));
            continue;
        }
        if flags.len() < 11 || !b"<>ch.".contains(&flags[0]) {
            continue;
        }
        let attrs = &flags[2..];
        if attrs.iter().all(|b| *b == b'+') {
            diffs.push((path, Difference::Missing));
            continue;
        }
        let kind = flags[1];
        let has = |i: usize, c: u8| attrs.get(i) == Some(&c);
        let mut add = |d| diffs.push((path.clone(), d));
        if has(0, b'c') || has(1, b's') {
            add(if kind == b'L' {
                Difference::Symlink
            } else {
                Difference::Content
            });
        }
        if (has(2, b't') || has(2, b'T')) && !path.is_root() {
            add(Difference::Mtime);
        }
        if has(3, b'p') {
            add(Difference::Mode);
        }
        if has(4, b'o') || has(5, b'g') {
            add(Difference::Owner);
        }
        if has(7, b'a') {
            add(Difference::Acl);
        }
        if has(8, b'x') {
            add(Difference::Xattr);
        }
        // `h`: made a hard link of another name (with `--hard-links`).
        if flags[0] == b'h' {
            add(Difference::Hardlink);
        }
    }
    // Deleted and created again: another type.
    let mut out: Vec<(RelPath, Difference)> = Vec::new();
    for (path, d) in diffs {
        let retyped = |o: &Difference| matches!((o, d), (Difference::Extra, Difference::Missing));
        match out.iter_mut().find(|(p, o)| *p == path && retyped(o)) {
            Some(entry) => entry.1 = Difference::Type,
            None => out.push((path, d)),
        }
    }
    out.sort_by(|a, b| a.0.tree_cmp(&b.0).then(a.1.cmp(&b.1)));
    out.dedup();
    out
}

/// What rsync runs did, from their itemized output (`%i %n`) and `--stats`: what a report
/// and `ferry status` count for an rsync target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Files sent (itemized `<f…`).
    pub files: u64,
    /// Entries deleted (`*deleting`).
    pub deleted: u64,
    /// Bytes rsync sent ("Total bytes sent").
    pub bytes: u64,
}

impl Counts {
    /// Adds what one run printed.
    pub fn add(&mut self, out: &[u8]) {
        self.files += out
            .split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"<f"))
            .count() as u64;
        self.deleted += deletions(out);
        self.bytes += stat(out, "Total bytes sent: ").unwrap_or(0);
    }
}

/// The number after `label` on a `--stats` line (`1,234` read as 1234).
fn stat(out: &[u8], label: &str) -> Option<u64> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().find_map(|l| l.strip_prefix(label))?;
    let digits: String = line
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// How many `*deleting` lines rsync's itemized output (`%i %n`) has.
pub(crate) fn deletions(out: &[u8]) -> u64 {
    out.split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"*deleting "))
        .count() as u64
}

/// The entries of the source as `--stats` counts them ("Number of files: 1,234 (reg: …"),
/// less the root: what the module holds after a whole run.
pub(crate) fn files_in_stats(out: &[u8]) -> Option<u64> {
    stat(out, "Number of files: ").map(|n| n.saturating_sub(1))
}

/// The entries rsync's itemized output `out` says it deleted, counted by the listed name
/// (one of `names`, below `parent`) each lies at or under.
pub(crate) fn deleted_by_name(
    out: &[u8],
    parent: &RelPath,
    names: &BTreeSet<Vec<u8>>,
) -> Vec<(RelPath, u64)> {
    let mut counts: std::collections::BTreeMap<&[u8], u64> = Default::default();
    for line in out.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"*deleting") else {
            continue;
        };
        let name = rest.trim_ascii_start();
        let name = name.strip_suffix(b"/").unwrap_or(name);
        let top = name.split(|b| *b == b'/').next().unwrap_or(name);
        if let Some(listed) = names.get(top) {
            *counts.entry(listed.as_slice()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(name, n)| (parent.join(name), n))
        .collect()
}
