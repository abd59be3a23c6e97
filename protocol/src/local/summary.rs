//! Metadata digests of a tree, for a whole compare that descends only where two trees differ:
//! rsync's quick check (kind, mode, owner, size, mtime, link target, attributes, first name of
//! a hard-linked file) as a Merkle tree. No file is read, and only directories keep a digest,
//! so a walk holds one directory per level and a summary grows with the directories, never
//! with the files. Both sides build one the same way; equal roots mean a plan would find
//! nothing to do.

use super::*;

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
        let read = read.union(rules.cmp.xattrs);
        let mut s = Summary {
            rules,
            read,
            dirs: HashMap::new(),
            first: HashMap::new(),
            linked: Vec::new(),
            unkept: (0, None),
            bytes: 0,
        };
        let mut walk = Walk {
            filter,
            read,
            unkept,
            errors,
        };
        s.visit(root, &RelPath::root(), &mut walk);
        s
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

    /// Visits the held directory `dir` (which is `rel`): its subtree digest and entries below.
    fn visit(&mut self, dir: &OwnedFd, rel: &RelPath, w: &mut Walk<'_, '_>) -> (Digest, u64) {
        let children = read_children(dir, rel, w.filter, w.read, w.errors);
        let mut digests = Vec::with_capacity(children.len());
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
            let content = match c.meta.kind {
                Kind::Dir => match open_child(dir, c.path.file_name()) {
                    Ok(sub) => {
                        let (d, n) = super::scan::grow(|| self.visit(&sub, &c.path, w));
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
        (digest, below)
    }
}

/// What a [`Summary`] walk carries along.
struct Walk<'a, 'e> {
    filter: Filter<'a>,
    read: Namespaces,
    unkept: Namespaces,
    errors: &'e mut Vec<(RelPath, io::Error)>,
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
