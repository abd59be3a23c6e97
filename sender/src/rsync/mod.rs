//! Compatibility mode: keeping a stock rsyncd module in step by running the real `rsync`
//! client. The watching, coalescing and queues are the daemon's; only the transport differs.
//!
//! - A full compare is one `rsync -a [--delete] [--exclude …] SRC/ rsync://…/module/`.
//! - A batch of dirty paths is one `rsync -a --files-from=LIST --from0
//!   --delete-missing-args` (or `--ignore-missing-args` without `delete`): only those paths
//!   travel, and paths missing locally are deleted on the module. The batch is read, planned
//!   ([`plan_batch`]) and its deletions weighed ([`DeleteTally::step`]) as a ferry target's
//!   ([`crate::batch`]); only the mapping of the plan to rsync runs is rsync's. New directories are expanded locally into their entries; parents of changed
//!   entries are listed too, so their times follow. rsync has no rename, so a rename is a
//!   delete of the old name plus the new one.
//! - At most one rsync runs per target; changes arriving meanwhile coalesce in the queue.
//! - `transport = "ssh"` runs the same commands over a remote shell (`user@host:/path`), as
//!   the old `file_watch.sh` scripts did.

use crate::batch::{batch_paths, plan_renames};
use crate::config::{RsyncTarget, SyncGroup};
use crate::execute::Report;
use crate::guard::{DeleteTally, Step};
use crate::links::LinkNames;
use crate::plan::{plan_batch, PlanOptions};
use crate::queue::Batch;
use crate::source;
use crate::worker::{Observer, Outcome, Transport};
use ferry_protocol::meta::Difference;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

mod lists;
mod output;
use lists::{by_parent, lists_of, write_list};
pub use output::{classify, parse_itemized, Counts, Verdict};
use output::{deleted_by_name, deletions, files_in_stats};

/// The destination: `rsync://[user@]host:port/module/` for an rsyncd, or
/// `[user@]host:/path/` over ssh (the group's `module` being the path).
pub fn url(address: &str, target: &RsyncTarget, module: &str) -> String {
    let user = target
        .user
        .as_deref()
        .map_or(String::new(), |u| format!("{u}@"));
    match target.rsh {
        None => format!("rsync://{user}{address}/{module}/"),
        Some(_) => format!("{user}{address}:{}/", module.trim_end_matches('/')),
    }
}

/// The command line shared by full and batch runs (everything but the file arguments).
fn base_args(group: &SyncGroup, target: &RsyncTarget) -> Vec<String> {
    let mut args = vec!["-a".to_string(), format!("--timeout={}", target.timeout_s)];
    let p = &group.preserve;
    for (on, flag) in [
        (p.sparse, "--sparse"),
        (p.hardlinks, "--hard-links"),
        (p.acls, "--acls"),
        (p.xattrs, "--xattrs"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    if let Some(pf) = &target.password_file {
        args.push(format!("--password-file={}", pf.display()));
    }
    if let Some(rsh) = &target.rsh {
        args.push(format!("--rsh={rsh}"));
    } else {
        // Only an rsyncd connection has a separate connect timeout. Without TCP_NODELAY each
        // small message the client sends after another waits for the daemon's delayed
        // acknowledgement (Nagle): 40 ms each, two or more per run.
        args.push(format!("--contimeout={}", target.timeout_s));
        args.push("--sockopts=TCP_NODELAY".into());
    }
    for pattern in group.filter.patterns() {
        args.push(format!("--exclude={pattern}"));
    }
    args.extend(target.args.iter().cloned());
    args
}

/// Runs rsync with `args`, then SRC/SUB/ and the module's URL/SUB/; returns its verdict and
/// what it printed on standard output.
async fn run(
    group: &SyncGroup,
    target: &RsyncTarget,
    address: &str,
    sub: &RelPath,
    mut args: Vec<String>,
    counts: Option<&mut Counts>,
) -> (Verdict, Vec<u8>) {
    if counts.is_some() {
        // What it did, for the report: its itemized lines and its figures.
        for arg in ["--stats", "--out-format=%i %n"] {
            if !args.iter().any(|a| a == arg) {
                args.push(arg.into());
            }
        }
    }
    let (mut from, mut to) = (
        format!("{}/", group.source.display()),
        url(address, target, &group.module),
    );
    if !sub.is_root() {
        let sub = String::from_utf8_lossy(sub.as_bytes());
        from.push_str(&format!("{sub}/"));
        to.push_str(&format!("{sub}/"));
    }
    let mut cmd = tokio::process::Command::new(&target.rsync_path);
    cmd.args(base_args(group, target))
        .args(args)
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tracing::debug!(sync = %group.name, ?cmd, "running rsync");
    let out = match cmd.output().await {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (
                Verdict::Config(missing_binary(&target.rsync_path)),
                Vec::new(),
            )
        }
        Err(e) => {
            let why = format!(
                "{}: {}",
                target.rsync_path.display(),
                ferry_protocol::io_reason(&e)
            );
            return (Verdict::Config(why), Vec::new());
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Killed by a signal: treat like a network failure and try again.
    let code = out.status.code().unwrap_or(20);
    if let Some(counts) = counts {
        counts.add(&out.stdout);
    }
    (classify(code, &stderr), out.stdout)
}

/// Compares the source with the module through `rsync -n -a -i --delete` (with `--checksum`,
/// every file's content is read on both ends); returns the differences in ferry's terms, in
/// tree order. The module root's own times are left out: a stock rsyncd never sets them.
pub async fn verify(
    group: &SyncGroup,
    target: &RsyncTarget,
    address: &str,
    checksum: bool,
) -> Result<Vec<(RelPath, Difference)>, String> {
    let mut args: Vec<String> = ["--dry-run", "--delete", "--out-format=%i %n"]
        .map(String::from)
        .to_vec();
    if checksum {
        args.push("--checksum".into());
    }
    match run(group, target, address, &RelPath::root(), args, None).await {
        (Verdict::Done, out) => Ok(parse_itemized(&out)),
        (v, _) => Err(v.to_string()),
    }
}

/// One `rsync -a [--delete]` of the whole source into the module. Under the delete guard
/// rsync deletes at most what the guard still allows (`--max-delete`, counted against the
/// module as listed before the run and the deletions of the window in `tally`) and holds the
/// rest; afterwards the tally starts again from the module's size.
pub async fn full(
    group: &SyncGroup,
    target: &RsyncTarget,
    address: &str,
    tally: &mut DeleteTally,
    counts: &mut Counts,
) -> Verdict {
    let mut args = vec!["--stats".to_string()];
    if group.delete {
        args.push("--delete".to_string());
        if group.guard.active() {
            let held = module_entries(group, target, address).await;
            // rsync --delete from an empty source wipes the module (a disk that did not mount):
            // the run goes without --delete, everything held.
            if source::is_empty_now(group).await {
                if let Some(why) = group.guard.objection(held, held, true) {
                    args.pop();
                    let root = RelPath::root();
                    let (verdict, _) =
                        run(group, target, address, &root, args, Some(&mut *counts)).await;
                    return match verdict {
                        Verdict::Done => Verdict::Guarded(format!(
                            "sync {}: {why}; holding every deletion (`rsync --delete` was not \
                             run), replicating everything else. {}",
                            group.name,
                            group.guard.confirm_hint(&group.name)
                        )),
                        v => v,
                    };
                }
            }
            // The module before the window's live deletions, and all of them, as a ferry
            // target's whole compare counts.
            let recent = tally.recent(crate::timing::now());
            if let Some(allowed) = group.guard.allowance(Some(held + recent), recent) {
                args.push(format!("--max-delete={allowed}"));
                args.push("--out-format=%i %n".to_string());
            }
        }
    }
    let (verdict, out) = run(group, target, address, &RelPath::root(), args, Some(counts)).await;
    let deleted = deletions(&out);
    match verdict {
        Verdict::Guarded(why) => {
            Verdict::Guarded(group.guard.held_message(&group.name, deleted, &why))
        }
        Verdict::Done => {
            if let Some(n) = files_in_stats(&out) {
                tally.compared(n);
            }
            Verdict::Done
        }
        v => v,
    }
}

/// Sends `batch` with `--files-from`: read and planned as a ferry target's batch is
/// ([`plan_batch`]), the plan mapped to rsync runs (`lists_of`). Returns the verdict and
/// how many paths were listed. Deletions go through the same guard step
/// ([`DeleteTally::step`]): each run deletes at most the allowance (`--max-delete`), what
/// rsync deletes is counted from its itemized output, by name, in `tally`, and when the
/// limit holds deletions back the target holds them, as a ferry target does.
pub async fn batch(
    group: &SyncGroup,
    target: &RsyncTarget,
    address: &str,
    batch: &Batch,
    tally: &mut DeleteTally,
    holding: Option<&str>,
    counts: &mut Counts,
) -> (Verdict, usize) {
    // rsync has no rename: each is its two names (the batch pipeline's rule).
    let filter = &group.filter;
    let renames = plan_renames(&batch.renames, group.delete, false, |p, d| {
        filter.excludes_dirty(p, d)
    });
    let paths = batch_paths(batch, renames.paths);
    let root = match source::open(group).await {
        Ok(root) => root,
        Err(e) => return (Verdict::Transient(e.to_string()), 0),
    };
    let (g, held) = (group.clone(), root.clone());
    let (mut lists, grew) = tokio::task::spawn_blocking(move || {
        let (dirty, _) = source::read_paths(&held, paths, Namespaces::NONE);
        let opts = PlanOptions::rsync(g.delete);
        let filter = &g.filter;
        let planned = plan_batch(dirty, opts, &LinkNames::default(), |p, d| {
            filter.excludes_dirty(p, d)
        });
        let grew = planned.plan.creates.len() as u64;
        let lists = lists_of(&g.name, planned, |under| {
            source::scan_under(&g, &held, under)
                .map(|(entries, _)| entries.into_iter().map(|e| e.path).collect())
        });
        (lists, grew)
    })
    .await
    .expect("list task");
    if !group.delete {
        // A subtree gone before it was listed is left on the module too.
        lists.missing.clear();
    }
    let n = lists.missing.len() + lists.present.len();
    let now = crate::timing::now();
    let step = tally.step(&group.guard, holding, lists.missing.len(), false, now);
    // Deletions (only when there are any) go first, one run per parent directory with bare
    // names: rsync 3.2.7 fails ("invalid file mode 00", exit 2) when a missing argument
    // shares its list with any directory, implied ones included. Then one run for the rest.
    let mut guarded = None;
    match step {
        Step::Hold(why) => guarded = Some(why),
        Step::Weigh(_) if source::holds_nothing(&root, &group.filter).await => {
            // The live form of the empty-source rule: the whole run decides, with the
            // module's size in hand.
            return (full(group, target, address, tally, counts).await, n);
        }
        step => {
            // Each run is allowed what the tally allows after the runs before it, not the
            // step's figure for the whole batch.
            let weighed = step != Step::Go;
            for (parent, names) in by_parent(&lists.missing) {
                // --force: a directory deleted here is removed there with its contents
                // (without it rsync only warns, and exits 0).
                let mut args = vec!["--delete-missing-args".into(), "--force".into()];
                if weighed {
                    let now = crate::timing::now();
                    let allowed = tally.allowance(&group.guard, now).unwrap_or(u64::MAX);
                    args.push(format!("--max-delete={allowed}"));
                    args.push("--out-format=%i %n".to_string());
                }
                let (v, out) =
                    with_list(group, target, address, &parent, &names, args, counts).await;
                if weighed {
                    let deleted = deleted_by_name(&out, &parent, &names);
                    tally.record(&deleted, crate::timing::now());
                }
                match v {
                    Verdict::Done => {}
                    // The rest of the deletions wait; what changed still goes.
                    Verdict::Guarded(why) => {
                        let deleted = deletions(&out);
                        guarded = Some(group.guard.held_message(&group.name, deleted, &why));
                        break;
                    }
                    v => return (v, n),
                }
            }
        }
    }
    // One run sends what changed together with the parents whose entries changed: rsync
    // sets a directory's times after the entries it creates in it, so their times come out
    // right in the same run. Something that vanishes meanwhile is an event of its own.
    let mut send = lists.present;
    send.extend(lists.parents);
    if !send.is_empty() {
        let root = RelPath::root();
        let ignore = vec!["--ignore-missing-args".to_string()];
        let (v, _) = with_list(group, target, address, &root, &send, ignore, counts).await;
        if v != Verdict::Done {
            return (v, n);
        }
    }
    tally.grew(grew, crate::timing::now());
    (guarded.map_or(Verdict::Done, Verdict::Guarded), n)
}

/// Runs rsync over `paths` (`--files-from`, names relative to `sub`); the verdict and what
/// rsync printed.
async fn with_list(
    group: &SyncGroup,
    target: &RsyncTarget,
    address: &str,
    sub: &RelPath,
    paths: &BTreeSet<Vec<u8>>,
    mut args: Vec<String>,
    counts: &mut Counts,
) -> (Verdict, Vec<u8>) {
    let list = match write_list(paths) {
        Ok(f) => f,
        Err(e) => {
            let why = format!("cannot write the file list: {e}");
            return (Verdict::Transient(why), Vec::new());
        }
    };
    args.push(format!("--files-from={}", list.path().display()));
    args.push("--from0".to_string());
    run(group, target, address, sub, args, Some(counts)).await
}

fn missing_binary(path: &std::path::Path) -> String {
    format!(
        "{}: not found; install the rsync package (Debian/Ubuntu: apt-get install rsync; \
         RHEL/CentOS: yum install rsync) or set rsync_path",
        path.display()
    )
}

/// How many entries the module holds (`rsync --list-only`); 0 if it cannot be listed (the
/// run that follows reports why).
async fn module_entries(group: &SyncGroup, target: &RsyncTarget, address: &str) -> u64 {
    let mut cmd = tokio::process::Command::new(&target.rsync_path);
    cmd.args(base_args(group, target))
        .arg("--list-only")
        .arg(url(address, target, &group.module))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    match cmd.output().await {
        Ok(out) if out.status.success() => {
            // Every entry but the module root itself (`.`).
            let lines = out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty());
            lines.count().saturating_sub(1) as u64
        }
        _ => 0,
    }
}

/// An rsync target as a worker's last hop: one `rsync` run at a time.
pub struct RsyncLink {
    /// The group it serves.
    pub group: SyncGroup,
    /// The target's name, for logs.
    pub name: String,
    /// `host:port` of the rsyncd (or the ssh host).
    pub address: String,
    /// How to run rsync.
    pub rsync: RsyncTarget,
    /// Who hears about full runs.
    pub observer: Arc<dyn Observer>,
    /// Deletions of the delete guard's window.
    pub tally: DeleteTally,
    /// Why deletions are held (see [`crate::batch::Learned::holding`]).
    pub holding: Option<String>,
    /// The operator confirmed held deletions: the next whole run applies them.
    pub confirm: bool,
}

impl RsyncLink {
    /// A link to `address`'s module for `group`, not yet run.
    pub fn new(
        group: SyncGroup,
        name: String,
        address: String,
        rsync: RsyncTarget,
        observer: Arc<dyn Observer>,
    ) -> RsyncLink {
        RsyncLink {
            group,
            name,
            address,
            rsync,
            observer,
            tally: DeleteTally::default(),
            holding: None,
            confirm: false,
        }
    }
}

impl Transport for RsyncLink {
    async fn connect(&mut self) -> Result<bool, String> {
        // Every run logs in anew.
        Ok(false)
    }

    fn lost(&self) -> impl std::future::Future<Output = String> + Send {
        // No connection is held between runs.
        std::future::pending()
    }

    async fn send(&mut self, b: &Batch) -> Outcome {
        let started = Instant::now();
        // A killed rsync (an abandoned batch) leaves only its own temp names behind.
        let confirmed = (self.confirm && b.full).then(|| {
            let mut g = self.group.clone();
            g.guard.confirmed = true;
            g
        });
        let g = confirmed.as_ref().unwrap_or(&self.group);
        let mut counts = Counts::default();
        let (verdict, listed) = if b.full {
            let tally = &mut self.tally;
            (
                full(g, &self.rsync, &self.address, tally, &mut counts).await,
                0,
            )
        } else {
            let holding = self.holding.as_deref();
            let tally = &mut self.tally;
            batch(
                g,
                &self.rsync,
                &self.address,
                b,
                tally,
                holding,
                &mut counts,
            )
            .await
        };
        let (group, target) = (self.group.name.as_str(), self.name.as_str());
        let held = match &verdict {
            Verdict::Guarded(why) => {
                if self.holding.is_none() {
                    tracing::error!(sync = group, target, "{why}");
                }
                self.holding = Some(why.clone());
                Some(crate::execute::Held {
                    paths: 0,
                    entries: 0,
                    why: why.clone(),
                    whole: b.full,
                })
            }
            Verdict::Done if b.full => {
                if self.holding.take().is_some() {
                    tracing::info!(sync = group, target, "deletions no longer held");
                }
                if confirmed.is_some() {
                    self.confirm = false;
                }
                None
            }
            _ => None,
        };
        match verdict {
            Verdict::Done | Verdict::Guarded(_) => {
                let report = Report {
                    rsync_paths: listed as u64,
                    files: counts.files,
                    deleted: counts.deleted,
                    bytes_sent: counts.bytes,
                    elapsed: started.elapsed(),
                    held,
                    ..Report::default()
                };
                if b.full {
                    self.observer.reconciled(group, target, &report);
                    tracing::info!(
                        sync = group,
                        target,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "reconciled (rsync -a)"
                    );
                } else {
                    tracing::debug!(
                        sync = group,
                        target,
                        paths = listed,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "synced (rsync --files-from)"
                    );
                }
                Outcome::Done(Box::new(report))
            }
            Verdict::Partial(msg) | Verdict::Transient(msg) => Outcome::Retry(msg),
            Verdict::Config(msg) => Outcome::Stop(format!(
                "module {}: {msg}; fix the target's configuration and restart ferry",
                self.group.module
            )),
        }
    }

    fn confirm_deletes(&mut self) {
        self.confirm = true;
    }

    fn disconnect(&mut self) {}

    async fn close(self) {}
}

/// Is the `rsync` binary there? (For a clear message at start-up rather than at first use.)
pub fn probe(target: &RsyncTarget) -> Result<(), String> {
    match std::process::Command::new(&target.rsync_path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(missing_binary(&target.rsync_path))
        }
        Err(e) => Err(format!("{}: {e}", target.rsync_path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_from_the_itemized_lines_and_the_stats() {
        let out = b"*deleting   old/a\n*deleting   old/\n<f+++++++++ new/file\n\
cd+++++++++ new/\n<f.st...... changed\n.d..t...... ./\n\n\
Number of files: 1,234 (reg: 1,000, dir: 234)\nTotal bytes sent: 12,345\n\
Total bytes received: 99\n";
        let mut c = Counts::default();
        c.add(out);
        c.add(b"<f+++++++++ one-more\nTotal bytes sent: 5\n");
        let want = Counts {
            files: 3,
            deleted: 2,
            bytes: 12_350,
        };
        assert_eq!(c, want);
        assert_eq!(files_in_stats(out), Some(1233));
    }
    use crate::coalesce::Need;
    use crate::plan::Dirty;

    /// Against an rsyncd the client's socket sends each message at once (a stock daemon
    /// acknowledges late: with Nagle's rule a one-file run took 140 ms instead of 55); over
    /// ssh there is no socket of rsync's own, and a user's own `--sockopts` comes later and
    /// wins.
    #[test]
    fn an_rsyncd_run_sends_without_delay_and_an_ssh_run_has_no_socket_options() {
        let group = SyncGroup::new("g", "/nonexistent".into(), vec![], "m");
        let mut target = RsyncTarget {
            user: None,
            password_file: None,
            rsync_path: "rsync".into(),
            args: vec!["--sockopts=SO_SNDBUF=65536".into()],
            timeout_s: 60,
            rsh: None,
        };
        let daemon = base_args(&group, &target);
        let ours = daemon.iter().position(|a| a == "--sockopts=TCP_NODELAY");
        let theirs = daemon
            .iter()
            .position(|a| a == "--sockopts=SO_SNDBUF=65536");
        assert!(ours.is_some() && ours < theirs, "{daemon:?}");
        target.rsh = Some("ssh".into());
        let ssh = base_args(&group, &target);
        assert!(
            !ssh.iter().any(|a| a == "--sockopts=TCP_NODELAY"),
            "{ssh:?}"
        );
    }

    #[test]
    fn a_batch_plan_becomes_rsync_lists() {
        use ferry_protocol::meta::{Entry, Kind};
        let mut group = SyncGroup::new("g", "/nonexistent".into(), vec![], "m");
        group.filter = crate::filter::Filter::new(&["*.tmp".to_string()]).unwrap();
        let entry = |p: &str, kind: Kind| {
            let meta = ferry_protocol::Meta {
                kind,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 0,
                mtime_nsec: 0,
                rdev: 0,
                xattrs: Default::default(),
            };
            let (path, link, inode) = (RelPath::from(p), None, None);
            Ok(Some(Entry {
                path,
                meta,
                link,
                inode,
            }))
        };
        let dirty = |p: &str, need, entry| Dirty {
            path: RelPath::from(p),
            need,
            entry,
        };
        let read = vec![
            dirty("gone", Need::Content, Ok(None)),
            dirty("d/new", Need::Tree, entry("d/new", Kind::Dir)),
            dirty("d/touched", Need::Meta, entry("d/touched", Kind::File)),
            dirty("moved", Need::Tree, entry("moved", Kind::Dir)),
            dirty("x.tmp", Need::Content, Ok(None)),
            dirty("unreadable", Need::Content, Err("Permission denied".into())),
        ];
        let opts = PlanOptions::rsync(true);
        let filter = &group.filter;
        let planned = plan_batch(read, opts, &LinkNames::default(), |p, d| {
            filter.excludes_dirty(p, d)
        });
        let mut scanned = Vec::new();
        let lists = lists_of("g", planned, |under| {
            scanned.push(under.to_string());
            if under.as_bytes() == b"moved" {
                // Swapped for a symlink between the read and the scan: gone.
                return Err(std::io::ErrorKind::NotADirectory.into());
            }
            Ok(vec![under.clone(), under.join(b"f")])
        });
        let show = |set: &BTreeSet<Vec<u8>>| -> Vec<String> {
            set.iter()
                .map(|p| String::from_utf8_lossy(p).into())
                .collect()
        };
        assert_eq!(scanned, ["d/new", "moved"]);
        // Excluded (whatever its kind) and unreadable paths are never deleted.
        assert_eq!(show(&lists.missing), ["gone", "moved"]);
        assert_eq!(show(&lists.present), ["d/new", "d/new/f", "d/touched"]);
        // A metadata change does not touch its parent's times.
        assert_eq!(show(&lists.parents), [".", "d"]);
    }

    #[test]
    fn itemized_changes_in_ferry_terms() {
        let out = b"*deleting   extra.txt\n\
            >f+++++++++ new/file\n\
            cd+++++++++ new/\n\
            >f.st...... grown\n\
            >fc.t...... edited\n\
            .f...p..... chmodded\n\
            .f....og... chowned\n\
            .d..t...... ./\n\
            .d..t...... sub/\n\
            cL+++++++++ link\n\
            cLc.t...... moved\n\
            .f.......a. acl\n\
            .f........x attrs\n\
            hf......... linked\n\
            *deleting   retyped\n\
            >f+++++++++ retyped\n";
        let got: Vec<String> = parse_itemized(out)
            .iter()
            .map(|(p, d)| format!("{} {p}", d.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                "acl acl".to_string(),
                "xattr attrs".into(),
                "mode chmodded".into(),
                "owner chowned".into(),
                "content edited".into(),
                "mtime edited".into(),
                "extra extra.txt".into(),
                "content grown".into(),
                "mtime grown".into(),
                "missing link".into(),
                "hardlink linked".into(),
                "mtime moved".into(),
                "symlink moved".into(),
                "missing new".into(),
                "missing new/file".into(),
                "type retyped".into(),
                "mtime sub".into(),
            ]
        );
    }

    #[test]
    fn exit_codes_are_classified_like_operators_read_them() {
        let cases: &[(i32, &str, &str)] = &[
            (0, "", "done"),
            (24, "file has vanished: \"/src/x\"", "done"),
            (23, "rsync error: some files/attrs were not transferred", "partial"),
            (5, "@ERROR: auth failed on module file\nrsync error: error starting client-server protocol (code 5)", "config"),
            (5, "@ERROR: Unknown module 'nope'", "config"),
            (5, "@ERROR: access denied to file from localhost (127.0.0.1)", "config"),
            (10, "rsync: failed to connect to 127.0.0.1 (127.0.0.1): Connection refused (111)\nrsync error: error in socket IO (code 10)", "transient"),
            (5, "rsync: read error: Connection reset by peer (104)", "transient"),
            (12, "rsync error: error in rsync protocol data stream (code 12)", "transient"),
            (30, "rsync error: timeout in data send/receive (code 30)", "transient"),
            (35, "rsync error: timeout waiting for daemon connection (code 35)", "transient"),
            (1, "rsync: --delete-missing-args: unknown option", "config"),
            (25, "rsync error: the --max-delete limit stopped deletions (code 25)", "guarded"),
            (0, "Deletions stopped due to --max-delete limit (17 skipped)", "guarded"),
            (4, "rsync error: requested action not supported (code 4)", "config"),
            (12, "ERROR: password file must not be other-accessible", "config"),
        ];
        for (code, stderr, want) in cases {
            let got = match classify(*code, stderr) {
                Verdict::Done => "done",
                Verdict::Partial(_) => "partial",
                Verdict::Transient(_) => "transient",
                Verdict::Config(_) => "config",
                Verdict::Guarded(_) => "guarded",
            };
            assert_eq!(got, *want, "exit {code}: {stderr}");
        }
        match classify(5, "@ERROR: auth failed on module file\n") {
            Verdict::Config(m) => assert!(m.contains("auth failed"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deletions_group_by_parent_topmost_only() {
        let missing: BTreeSet<Vec<u8>> = ["a", "a/b", "c/d", "c/e", "c/e/f", "g"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let got: Vec<(String, Vec<String>)> = by_parent(&missing)
            .into_iter()
            .map(|(p, names)| {
                (
                    p.to_string(),
                    names
                        .into_iter()
                        .map(|n| String::from_utf8(n).unwrap())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (".".to_string(), vec!["a".to_string(), "g".to_string()]),
                ("c".to_string(), vec!["d".to_string(), "e".to_string()]),
            ]
        );
    }

    #[test]
    fn url_has_user_port_and_module() {
        let t = RsyncTarget {
            user: Some("rsync".into()),
            password_file: None,
            rsync_path: "rsync".into(),
            args: vec![],
            timeout_s: 60,
            rsh: None,
        };
        assert_eq!(
            url("192.168.74.20:873", &t, "file"),
            "rsync://rsync@192.168.74.20:873/file/"
        );
        let ssh = RsyncTarget {
            user: Some("root".into()),
            rsh: Some("ssh".into()),
            ..t
        };
        assert_eq!(
            url("192.168.56.12", &ssh, "/var/lib/docker"),
            "root@192.168.56.12:/var/lib/docker/"
        );
    }
}
