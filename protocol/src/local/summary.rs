//! Metadata digests of a tree, for a whole compare that descends only where two trees differ:
//! rsync's quick check (kind, mode, owner, size, mtime, link target, attributes, first name of
//! a hard-linked file) as a Merkle tree. No file is read, and only directories keep a digest,
//! so a walk holds one directory per level and a summary grows with the directories, never
//! with the files. Both sides build one the same way; equal roots mean a plan would find
//! nothing to do.

use super::scan::side_by_side;
use super::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// What a summary covers: the comparisons of a plan, and whether device nodes take part (a
/// module that cannot make them holds none, and a source's are never sent to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// What is compared.
    pub cmp: Compare,
    /// Device nodes take part.
    pub devices: bool,
}

impl Rules {
    /// [`merkle::entry_digest`] of `e` as these rules compare it: without the setuid and
    /// setgid bits where they are not compared.
    pub fn digest(&self, e: &DigestEntry) -> Digest {
        if self.cmp.setid || e.entry.meta.mode & 0o6000 == 0 {
            return merkle::entry_digest(e, self.cmp);
        }
        let mut plain = e.clone();
        plain.entry.meta.mode &= !0o6000;
        merkle::entry_digest(&plain, self.cmp)
    }

    /// Whether `e` takes part.
    fn takes(&self, e: &Entry) -> bool {
        self.devices || !matches!(e.meta.kind, Kind::CharDevice | Kind::BlockDevice)
    }
}

/// The directories of a tree with their subtree digests (see the module documentation).
pub struct Summary {
    rules: Rules,
    /// The attribute namespaces read.
    read: Namespaces,
    /// Subtree digest and number of entries below, by directory.
    dirs: HashMap<RelPath, (Digest, u64)>,
    /// First name in tree order of each multiply-linked file met (hard links compared).
    first: HashMap<Inode, RelPath>,
    /// The multiply-linked files met, with their names (whatever `rules` compare).
    pub linked: Vec<Entry>,
    /// Entries holding attributes in the namespaces a walk was asked to look out for: how
    /// many, and the first of them.
    pub unkept: (u64, Option<RelPath>),
    /// The sizes of the files met, a file of several names once.
    pub bytes: u64,
}

impl Summary {
    /// Walks the tree beneath the held `root` (filtered; unreadable entries reported in
    /// `errors`, which makes their directories differ from anything). Attributes are read in
    /// `read` (at least `rules.cmp.xattrs`); entries holding any in `unkept` are counted.
    pub fn build(
        root: &OwnedFd,
        rules: Rules,
        filter: Filter<'_>,
        read: Namespaces,
        unkept: Namespaces,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> Summary {
        Summary::build_until(root, rules, filter, read, unkept, None, errors)
    }

    /// [`Summary::build`] that reads no further directory once `stop` is set.
    fn build_until(
        root: &OwnedFd,
        rules: Rules,
        filter: Filter<'_>,
        read: Namespaces,
        unkept: Namespaces,
        stop: Option<&AtomicBool>,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> Summary {
        let read = read.union(rules.cmp.xattrs);
        let mut s = Summary::new(rules, read);
        let mut walk = Walk::new(filter, read, unkept, errors);
        walk.stop = stop;
        s.visit(root, &RelPath::root(), &mut walk);
        s
    }

    /// [`Summary::build`] with the top directories walked side by side on up to four
    /// threads (as many as the machine has cores): the same digests. A tree holding a file
    /// of several names is walked again in one piece (which of its names comes first is
    /// known only across the whole tree). Once `stop` is set, no further directory is read
    /// and the summary is of no use: an error says so.
    pub fn build_wide(
        root: &OwnedFd,
        rules: Rules,
        filter: Filter<'_>,
        read: Namespaces,
        unkept: Namespaces,
        stop: &AtomicBool,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> Summary {
        let read = read.union(rules.cmp.xattrs);
        let top = RelPath::root();
        let s = 'walked: {
            // The top directories, by the types the root's entries have (no `lstat` of a
            // wide root's files before its own visit reads them); that visit says its errors.
            let mut dirs: Vec<RelPath> = super::fd::read_subdir_names(root)
                .unwrap_or_default()
                .iter()
                .map(|name| top.join(name))
                .filter(|path| filter(path, true))
                .collect();
            dirs.sort_unstable();
            let in_one_piece = |errors| {
                Summary::build_until(root, rules, filter, read, unkept, Some(stop), errors)
            };
            if super::scan::wide_threads() < 2 || dirs.len() < 2 {
                break 'walked in_one_piece(errors);
            }
            let found = side_by_side(dirs.len(), |k| {
                let path = &dirs[k];
                let mut sub = Summary::new(rules, read);
                let mut errs = Vec::new();
                // One gone or unopenable is visited (and said) by the root's visit.
                if let Ok(fd) = open_child(root, path.file_name()) {
                    let mut walk = Walk::new(filter, read, unkept, &mut errs).until(stop);
                    super::scan::grow(|| sub.visit(&fd, path, &mut walk));
                }
                (sub, errs)
            });
            let mut s = Summary::new(rules, read);
            let (mut below_errors, mut firsts) = (Vec::new(), Vec::new());
            for (sub, errs) in found {
                if !sub.linked.is_empty() {
                    break 'walked in_one_piece(errors);
                }
                s.dirs.extend(sub.dirs);
                s.bytes += sub.bytes;
                s.unkept.0 += sub.unkept.0;
                firsts.extend(sub.unkept.1);
                below_errors.extend(errs);
            }
            let mut walk = Walk::new(filter, read, unkept, errors).until(stop);
            s.visit(root, &top, &mut walk);
            walk.errors.append(&mut below_errors);
            firsts.extend(s.unkept.1.take());
            s.unkept.1 = firsts.into_iter().min_by(|a, b| a.tree_cmp(b));
            s
        };
        if stop.load(AtomicOrdering::Relaxed) {
            errors.push((RelPath::root(), io::Error::other("summary stopped")));
        }
        s
    }

    /// [`Summary::build`] that takes what `kept` kept from the last one where the tree's
    /// writer marked nothing (`dirty`: directories it changed since), and keeps what it read
    /// for the next (see [`Kept`]). Also returns how many directories were taken as kept.
    /// Its `linked`, `unkept` and `bytes` cover only the directories it read.
    pub fn build_kept(
        root: &OwnedFd,
        rules: Rules,
        filter: Filter<'_>,
        read: Namespaces,
        kept: &mut Kept,
        dirty: &HashSet<RelPath>,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> (Summary, u64) {
        let usable = kept.rules == Some(rules) && !kept.linked;
        let old = std::mem::take(&mut kept.dirs);
        let old = if usable { old } else { HashMap::new() };
        kept.rules = Some(rules);
        let mut s = Summary::new(rules, read.union(rules.cmp.xattrs));
        let mut first_errors = Vec::new();
        let taken = {
            let mut walk = Walk {
                filter,
                read: s.read,
                unkept: Namespaces::NONE,
                errors: &mut first_errors,
                keep: Some(Keep {
                    old,
                    new: &mut kept.dirs,
                    dirty,
                    trust: kept.trust,
                    now: Instant::now(),
                    taken: 0,
                }),
                stop: None,
            };
            s.visit(root, &RelPath::root(), &mut walk);
            walk.keep.map_or(0, |k| k.taken)
        };
        kept.linked = rules.cmp.hardlinks && !s.linked.is_empty();
        if kept.linked && taken > 0 {
            // First names taken from kept directories are unknown: read it all.
            kept.dirs.clear();
            return (
                Summary::build(root, rules, filter, read, Namespaces::NONE, errors),
                0,
            );
        }
        errors.append(&mut first_errors);
        (s, taken)
    }

    fn new(rules: Rules, read: Namespaces) -> Summary {
        Summary {
            rules,
            read,
            dirs: HashMap::new(),
            first: HashMap::new(),
            linked: Vec::new(),
            unkept: (0, None),
            bytes: 0,
        }
    }

    /// What the summary covers.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// The root's subtree digest and the number of entries below it.
    pub fn root(&self) -> (Digest, u64) {
        self.dirs
            .get(&RelPath::root())
            .copied()
            .unwrap_or(([0; 32], 0))
    }

    /// The number of directories, the root included.
    pub fn dirs(&self) -> u64 {
        self.dirs.len() as u64
    }

    /// The number of entries below the directory `rel`, as the walk found them.
    pub fn below(&self, rel: &RelPath) -> u64 {
        self.dirs.get(rel).map_or(0, |d| d.1)
    }

    /// The directory `rel` beneath the held `root` as it is now, with its entries and their
    /// digests (subdirectories from the walk; one made since has a zero digest, so it
    /// differs). `Ok(None)` if it is gone or no directory.
    pub fn listing(
        &self,
        root: &OwnedFd,
        rel: &RelPath,
        filter: Filter<'_>,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> io::Result<Option<(Entry, Vec<DigestEntry>)>> {
        let read = self.read;
        let Some(top) = read_entry_at(root, rel, read, errors)? else {
            return Ok(None);
        };
        if top.meta.kind != Kind::Dir {
            return Ok(None);
        }
        let parts: Vec<&[u8]> = rel.components().collect();
        let dir = match open_beneath(root, &parts) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_not_beneath(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let entries = read_children(&dir, rel, filter, read, errors)
            .into_iter()
            .filter(|e| self.rules.takes(e))
            .map(|e| {
                let content = match e.meta.kind {
                    Kind::Dir => self.dirs.get(&e.path).map_or([0; 32], |d| d.0),
                    _ => content_of(&e),
                };
                let hardlink = e.inode.and_then(|i| self.first.get(&i)).cloned();
                self.entry(e, content, hardlink)
            })
            .collect();
        Ok(Some((top, entries)))
    }

    fn entry(&self, entry: Entry, digest: Digest, hardlink: Option<RelPath>) -> DigestEntry {
        DigestEntry {
            hardlink: hardlink.filter(|_| self.rules.cmp.hardlinks),
            entry,
            digest,
        }
    }

    /// Visits the held directory `dir` (which is `rel`): its subtree digest, entries below,
    /// and whether it was taken as kept (its own `lstat` and everything below unchanged).
    fn visit(&mut self, dir: &OwnedFd, rel: &RelPath, w: &mut Walk<'_, '_>) -> (Digest, u64, bool) {
        let stamp = match w.keep {
            Some(_) => lstat_at(dir, None).ok().map(|st| CacheKey::of(&st)),
            None => None,
        };
        if let Some(stamp) = stamp {
            if let Some(kept) = self.take_kept(dir, rel, stamp, w) {
                return kept;
            }
        }
        if w.stop.is_some_and(|s| s.load(AtomicOrdering::Relaxed)) {
            return ([0; 32], 0, false);
        }
        let errors_before = w.errors.len();
        let children = read_children_until(dir, rel, w.filter, w.read, w.stop, w.errors);
        let mut digests = Vec::with_capacity(children.len());
        let mut subdirs = Vec::new();
        let mut below = 0;
        for c in children {
            if !self.rules.takes(&c) {
                continue;
            }
            below += 1;
            if !w.unkept.is_empty() && c.meta.xattrs.within(w.unkept).next().is_some() {
                self.unkept.0 += 1;
                self.unkept.1.get_or_insert_with(|| c.path.clone());
            }
            let first = c.inode.is_none_or(|i| !self.first.contains_key(&i));
            if c.meta.kind == Kind::File && first {
                self.bytes += c.meta.size;
            }
            let hardlink = c.inode.map(|i| {
                self.linked.push(c.clone());
                self.first
                    .entry(i)
                    .or_insert_with(|| c.path.clone())
                    .clone()
            });
            if c.meta.kind == Kind::Dir && stamp.is_some() {
                subdirs.push(Box::from(c.path.file_name()));
            }
            let content = match c.meta.kind {
                // Visited already on the way to finding this directory changed.
                Kind::Dir if self.dirs.contains_key(&c.path) => {
                    let (d, n) = self.dirs[&c.path];
                    below += n;
                    d
                }
                Kind::Dir => match open_child(dir, c.path.file_name()) {
                    Ok(sub) => {
                        let (d, n, _) = super::scan::grow(|| self.visit(&sub, &c.path, w));
                        below += n;
                        d
                    }
                    // Gone since it was listed: it differs from anything.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => [0; 32],
                    Err(e) => {
                        w.errors.push((c.path.clone(), e));
                        [0; 32]
                    }
                },
                _ => content_of(&c),
            };
            let de = self.entry(c, content, hardlink);
            digests.push(self.rules.digest(&de));
        }
        let digest = merkle::dir_content_digest(digests.iter());
        self.dirs.insert(rel.clone(), (digest, below));
        // What could not be read, and a directory changed this very moment, is read again.
        let clean = w.errors.len() == errors_before;
        if let (Some(k), Some(stamp)) = (w.keep.as_mut(), stamp.filter(|s| clean && !s.recent())) {
            let kept = KeptDir {
                stamp,
                digest,
                below,
                subdirs,
                read: k.now,
            };
            k.new.insert(rel.clone(), kept);
        }
        (digest, below, false)
    }

    /// The kept digest of `rel` (whose `lstat` is `stamp` now) if the last summary kept it,
    /// nothing marked it, it is trusted still, and every subdirectory is kept too (each
    /// visited on the way, so that a changed one is read once).
    fn take_kept(
        &mut self,
        dir: &OwnedFd,
        rel: &RelPath,
        stamp: CacheKey,
        w: &mut Walk<'_, '_>,
    ) -> Option<(Digest, u64, bool)> {
        let k = w.keep.as_mut()?;
        let old = k.old.remove(rel)?;
        let fresh = k.now.saturating_duration_since(old.read) < k.trust;
        if old.stamp != stamp || !fresh || k.dirty.contains(rel) {
            return None;
        }
        for name in &old.subdirs {
            let path = rel.join(name);
            let sub = open_child(dir, name).ok()?;
            let (_, _, kept) = super::scan::grow(|| self.visit(&sub, &path, w));
            if !kept {
                return None;
            }
        }
        let k = w.keep.as_mut()?;
        k.taken += 1;
        self.dirs.insert(rel.clone(), (old.digest, old.below));
        let out = (old.digest, old.below, true);
        k.new.insert(rel.clone(), old);
        Some(out)
    }
}

/// What a [`Summary`] walk carries along.
struct Walk<'a, 'e> {
    filter: Filter<'a>,
    read: Namespaces,
    unkept: Namespaces,
    errors: &'e mut Vec<(RelPath, io::Error)>,
    /// Directories kept from the last summary, when this one may take them.
    keep: Option<Keep<'e>>,
    /// Set when the walk's summary is no longer wanted: no directory is read after.
    stop: Option<&'a AtomicBool>,
}

impl<'a, 'e> Walk<'a, 'e> {
    /// A walk that reads every directory (nothing kept to take).
    fn new(
        filter: Filter<'a>,
        read: Namespaces,
        unkept: Namespaces,
        errors: &'e mut Vec<(RelPath, io::Error)>,
    ) -> Self {
        Walk {
            filter,
            read,
            unkept,
            errors,
            keep: None,
            stop: None,
        }
    }

    /// The walk reads no further directory once `stop` is set.
    fn until(mut self, stop: &'a AtomicBool) -> Self {
        self.stop = Some(stop);
        self
    }
}

/// A walk's side of [`Kept`]: what the last summary kept, what this one keeps.
struct Keep<'e> {
    old: HashMap<RelPath, KeptDir>,
    new: &'e mut HashMap<RelPath, KeptDir>,
    dirty: &'e HashSet<RelPath>,
    trust: Duration,
    now: Instant,
    /// Directories taken as kept, without reading their entries.
    taken: u64,
}

/// How long a directory's kept digest is taken without reading its entries again
/// ([`Kept`]).
pub const KEPT_FOR: Duration = Duration::from_secs(600);

/// What one summary of a tree keeps for the next, for a tree whose one writer says which
/// directories it changed (a receiver's module): per directory, its subtree digest, its
/// subdirectories and its own `lstat` (inode, mtime, ctime). The next summary
/// ([`Summary::build_kept`]) takes a directory as kept, without reading its entries, when
/// its `lstat` is the same, the writer did not mark it, it was read less than the trust
/// time ago, and every subdirectory is kept too; else it reads it as [`Summary::build`]
/// does. An entry added, removed or renamed by anyone moves its directory's ctime; what
/// this misses is a change made by someone else to an existing entry in place (a `chmod`
/// or a write by hand on the backup host), which the first summary after the trust time
/// finds. A directory whose ctime is not yet settled is not kept, so a change in the same
/// clock tick as its read is never taken for no change.
pub struct Kept {
    rules: Option<Rules>,
    dirs: HashMap<RelPath, KeptDir>,
    trust: Duration,
    /// A multiply-linked file was met with hard links compared: which name of it is first
    /// is known only across the whole tree, so the next summary reads it whole.
    linked: bool,
}

struct KeptDir {
    stamp: CacheKey,
    digest: Digest,
    below: u64,
    subdirs: Vec<Box<[u8]>>,
    read: Instant,
}

impl Kept {
    /// Nothing kept yet; a directory is trusted for `trust` after it was read.
    pub fn new(trust: Duration) -> Kept {
        Kept {
            rules: None,
            dirs: HashMap::new(),
            trust,
            linked: false,
        }
    }

    /// Directories kept (for logs and tests).
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Forgets everything: the next summary reads the whole tree.
    pub fn clear(&mut self) {
        self.dirs.clear();
    }
}

/// The content digest of a non-directory in a summary: a link's target, nothing for the rest
/// (a file's size and mtime are in its entry digest).
fn content_of(e: &Entry) -> Digest {
    match e.meta.kind {
        Kind::Symlink => merkle::link_digest(e.link.as_deref().unwrap_or_default()),
        _ => [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn rules(hardlinks: bool) -> Rules {
        Rules {
            cmp: Compare::all(false).with(Namespaces::NONE, hardlinks),
            devices: false,
        }
    }

    fn summary(root: &Path, hardlinks: bool) -> Summary {
        let mut errors = Vec::new();
        let held = open_root(root).unwrap();
        let s = Summary::build(
            &held,
            rules(hardlinks),
            &no_filter,
            Namespaces::NONE,
            Namespaces::NONE,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        s
    }

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"one").unwrap();
        fs::write(root.join("a/g"), b"two").unwrap();
        fs::write(root.join("top"), b"three").unwrap();
        std::os::unix::fs::symlink("top", root.join("link")).unwrap();
        let t = filetime::FileTime::from_unix_time(1_000_000, 0);
        filetime::set_symlink_file_times(root.join("link"), t, t).unwrap();
        for p in ["a/b/f", "a/g", "top", "a/b", "a", ""] {
            filetime::set_file_mtime(root.join(p), t).unwrap();
        }
    }

    /// Two trees made alike summarise alike; each kind of change reaches the root and only
    /// the directories above it, and the entry counts are the trees'.
    #[test]
    fn equal_trees_have_equal_roots_and_a_change_marks_only_its_path() {
        let (x, y) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(x.path());
        tree(y.path());
        let (sx, sy) = (summary(x.path(), false), summary(y.path(), false));
        assert_eq!(sx.root(), sy.root());
        assert_eq!(sx.root().1, 6);
        assert_eq!(sx.below(&RelPath::from("a")), 3);

        let t = filetime::FileTime::from_unix_time(1_000_000, 0);
        type Change<'a> = (&'a str, &'a dyn Fn(&Path));
        let changes: [Change; 4] = [
            ("a/b/f", &|r| fs::write(r.join("a/b/f"), b"uno").unwrap()),
            ("a/b/f", &|r| {
                filetime::set_file_mtime(r.join("a/b/f"), filetime::FileTime::zero()).unwrap()
            }),
            ("a/b/f", &|r| {
                fs::set_permissions(
                    r.join("a/b/f"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap()
            }),
            ("link", &|r| {
                fs::remove_file(r.join("link")).unwrap();
                std::os::unix::fs::symlink("a", r.join("link")).unwrap();
            }),
        ];
        for (changed, change) in changes {
            let z = tempfile::tempdir().unwrap();
            tree(z.path());
            change(z.path());
            // The change's own mtime and its parents' put back: only what was changed differs.
            for p in ["a/b", "a", ""] {
                filetime::set_file_mtime(z.path().join(p), t).unwrap();
            }
            let sz = summary(z.path(), false);
            assert_ne!(sz.root(), sx.root(), "{changed}");
            let held_x = open_root(x.path()).unwrap();
            let held_z = open_root(z.path()).unwrap();
            let mut errors = Vec::new();
            let (_, lx) = sx
                .listing(&held_x, &RelPath::root(), &no_filter, &mut errors)
                .unwrap()
                .unwrap();
            let (_, lz) = sz
                .listing(&held_z, &RelPath::root(), &no_filter, &mut errors)
                .unwrap()
                .unwrap();
            let differ: Vec<String> = lx
                .iter()
                .zip(&lz)
                .filter(|(a, b)| sx.rules().digest(a) != sz.rules().digest(b))
                .map(|(a, _)| a.entry.path.to_string())
                .collect();
            let top = changed.split('/').next().unwrap();
            assert_eq!(differ, vec![top.to_string()], "{changed}");
        }
    }

    /// The top directories walked side by side summarise as one walk does: the same
    /// digests, counts, bytes and attributes noted; with a file of several names too.
    #[test]
    fn a_wide_summary_equals_the_plain_one() {
        let x = tempfile::tempdir().unwrap();
        let r = x.path();
        tree(r);
        for d in 0..12 {
            fs::create_dir_all(r.join(format!("d{d}/e"))).unwrap();
            fs::write(r.join(format!("d{d}/e/f")), vec![b'x'; d]).unwrap();
            fs::write(r.join(format!("f{d}")), b"top").unwrap();
        }
        let with_user = r.join("d7/e/f");
        let c = CString::new(with_user.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path and name, a value of the given length.
        let set =
            unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(set, 0, "{}", io::Error::last_os_error());
        let build = |wide: bool, hardlinks: bool| {
            let held = open_root(r).unwrap();
            let mut errors = Vec::new();
            let rules = rules(hardlinks);
            let args = (&held, rules, &no_filter, Namespaces::USER, Namespaces::USER);
            let s = if wide {
                let go = AtomicBool::new(false);
                Summary::build_wide(args.0, args.1, args.2, args.3, args.4, &go, &mut errors)
            } else {
                Summary::build(args.0, args.1, args.2, args.3, args.4, &mut errors)
            };
            assert!(errors.is_empty(), "{errors:?}");
            (
                s.root(),
                s.dirs(),
                s.bytes,
                s.unkept.clone(),
                s.linked.len(),
            )
        };
        let plain = build(false, true);
        assert_eq!(plain.3 .0, 1, "one file holds a user attribute");
        assert_eq!(build(true, true), plain);
        fs::hard_link(r.join("d3/e/f"), r.join("d9/link")).unwrap();
        let linked = build(false, true);
        assert_eq!(linked.4, 2);
        assert_ne!(linked.0, plain.0);
        assert_eq!(build(true, true), linked);
        assert_eq!(build(true, false), build(false, false));
    }

    /// A summary stopped reads no directory after, and says it is of no use.
    #[test]
    fn a_stopped_summary_reads_no_further_and_says_so() {
        let x = tempfile::tempdir().unwrap();
        for d in 0..4 {
            fs::create_dir_all(x.path().join(format!("d{d}/e"))).unwrap();
        }
        let held = open_root(x.path()).unwrap();
        let wide = |stop: bool| {
            let mut errors = Vec::new();
            let none = Namespaces::NONE;
            let stop = AtomicBool::new(stop);
            let rules = rules(false);
            let s = Summary::build_wide(&held, rules, &no_filter, none, none, &stop, &mut errors);
            (s.dirs(), errors)
        };
        let (dirs, errors) = wide(false);
        assert_eq!((dirs, errors.len()), (9, 0), "{errors:?}");
        let (dirs, errors) = wide(true);
        assert_eq!(dirs, 0);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].1.to_string(), "summary stopped");
    }

    /// A stop set while a wide directory is read ends the read within `STOP_EVERY` more
    /// children (the walk that wanted them no longer does), not at the directory's end.
    #[test]
    fn a_stop_ends_the_read_of_a_wide_directory_part_way() {
        let x = tempfile::tempdir().unwrap();
        for i in 0..5000 {
            fs::File::create(x.path().join(format!("{i:04}"))).unwrap();
        }
        let held = open_root(x.path()).unwrap();
        let stop = AtomicBool::new(false);
        let read = |after: usize| {
            let seen = std::sync::atomic::AtomicUsize::new(0);
            let filter = |_: &RelPath, _: bool| {
                if seen.fetch_add(1, AtomicOrdering::Relaxed) + 1 == after {
                    stop.store(true, AtomicOrdering::Relaxed);
                }
                true
            };
            let mut errors = Vec::new();
            let top = RelPath::root();
            let got = super::super::scan::read_children_until(
                &held,
                &top,
                &filter,
                Namespaces::NONE,
                Some(&stop),
                &mut errors,
            );
            stop.store(false, AtomicOrdering::Relaxed);
            got.len()
        };
        assert_eq!(read(usize::MAX), 5000);
        let stopped = read(1500);
        assert!((1500..1500 + 1024).contains(&stopped), "{stopped} read");
    }

    /// Until every directory's ctime has settled, none is kept; from then on a summary
    /// takes each as kept.
    fn settled(root: &Path, kept: &mut Kept) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (s, taken) = kept_summary(root, kept, &HashSet::new());
            if taken == s.dirs() {
                return taken;
            }
            assert!(Instant::now() < deadline, "nothing kept after 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kept_summary(root: &Path, kept: &mut Kept, marked: &HashSet<RelPath>) -> (Summary, u64) {
        let held = open_root(root).unwrap();
        let mut errors = Vec::new();
        let rules = rules(false);
        let out = Summary::build_kept(
            &held,
            rules,
            &no_filter,
            Namespaces::NONE,
            kept,
            marked,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        out
    }

    /// A kept summary equals a fresh one after each change its writer marks, and after an
    /// entry is added, removed or changed in kind by anyone (its directory's ctime moves), a
    /// directory's own mode changed, or the trust time passed; only what changed is read.
    #[test]
    fn a_kept_summary_reads_only_what_changed_and_equals_a_fresh_one() {
        let x = tempfile::tempdir().unwrap();
        let r = x.path();
        tree(r);
        fs::create_dir_all(r.join("c/d")).unwrap();
        let fresh = || summary(r, false).root();
        let mut kept = Kept::new(Duration::from_secs(3600));
        assert_eq!(settled(r, &mut kept), 5);
        assert_eq!(kept.len(), 5);
        let (s, _) = kept_summary(r, &mut kept, &HashSet::new());
        assert_eq!(s.root(), fresh());

        // In place, marked by the writer: "a/b" is read, and its ancestors, not "c".
        let before = s.root();
        fs::set_permissions(
            r.join("a/b/f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let marked: HashSet<RelPath> = [RelPath::from("a/b")].into();
        let (s, taken) = kept_summary(r, &mut kept, &marked);
        assert_ne!(s.root(), before);
        assert_eq!(s.root(), fresh());
        assert_eq!(taken, 2, "c and c/d taken as kept");

        // By anyone: a new entry, one removed, a directory's own mode.
        type Change<'a> = &'a dyn Fn(&Path);
        let changes: [Change; 3] = [
            &|r| fs::write(r.join("c/d/new"), b"n").unwrap(),
            &|r| fs::remove_file(r.join("a/g")).unwrap(),
            &|r| {
                fs::set_permissions(
                    r.join("c/d"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )
                .unwrap()
            },
        ];
        for change in changes {
            settled(r, &mut kept);
            let before = kept_summary(r, &mut kept, &HashSet::new()).0.root();
            change(r);
            let (s, taken) = kept_summary(r, &mut kept, &HashSet::new());
            assert_ne!(s.root(), before);
            assert_eq!(s.root(), fresh());
            assert!(taken < 5);
        }

        // Unmarked and in place: found once the trust time has passed.
        let mut brief = Kept::new(Duration::ZERO);
        settled(r, &mut kept);
        let before = fresh();
        fs::write(r.join("a/b/f"), b"une").unwrap();
        let (s, taken) = kept_summary(r, &mut brief, &HashSet::new());
        assert_eq!(taken, 0);
        assert_ne!(s.root(), before);
        assert_eq!(s.root(), fresh());
    }

    /// With hard links compared, which names share a file is part of the digest; without,
    /// it is not.
    #[test]
    fn hard_links_count_only_when_compared() {
        let (x, y) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for r in [x.path(), y.path()] {
            fs::write(r.join("a"), b"same").unwrap();
            fs::copy(r.join("a"), r.join("b")).unwrap();
            let t = filetime::FileTime::from_unix_time(1_000_000, 0);
            filetime::set_file_mtime(r.join("a"), t).unwrap();
            filetime::set_file_mtime(r.join("b"), t).unwrap();
        }
        fs::remove_file(y.path().join("b")).unwrap();
        fs::hard_link(y.path().join("a"), y.path().join("b")).unwrap();
        let fix = filetime::FileTime::from_unix_time(1_000_000, 0);
        for r in [x.path(), y.path()] {
            filetime::set_file_mtime(r, fix).unwrap();
        }
        assert_eq!(
            summary(x.path(), false).root(),
            summary(y.path(), false).root()
        );
        let linked = summary(y.path(), true);
        assert_ne!(summary(x.path(), true).root(), linked.root());
        assert_eq!(linked.linked.len(), 2);
    }
}
