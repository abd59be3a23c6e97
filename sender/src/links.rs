//! The names of the source's files that have more than one, learned from every scan and live
//! read of a group, so a subtree compare or a live change can make a new name another name of
//! a file the receiver already holds (`Link`) instead of sending its content again.
//!
//! What is remembered is a hint: every name is checked (`lstat`, same inode) before it is
//! used, and names that no longer are are forgotten then.

use ferry_protocol::local;
use ferry_protocol::meta::{Entry, Inode};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// Every current name of each multiply-linked source file in a plan's view, in tree order:
/// the first is the one the others are linked to on the receiver.
pub type LinkNames = HashMap<Inode, Vec<RelPath>>;

/// What a group has learned about its source's multiply-linked files. Shared by every target
/// of the group; it is knowledge about the source, not configuration, so two are always equal
/// (a reload compares groups by their settings).
#[derive(Clone, Default)]
pub struct Names(Arc<Mutex<Known>>);

/// The names by file and, to follow a rename without visiting every file, the files by name
/// (in byte order, so a directory's names are one range).
#[derive(Default)]
struct Known {
    by_inode: HashMap<Inode, BTreeSet<RelPath>>,
    by_path: BTreeMap<Vec<u8>, Inode>,
    /// The last [`RECENT`] files read live with one name, oldest first: a name made for one of
    /// them soon after (`ln` right after the file was written, before any read saw it with
    /// two) is found through it.
    recent: HashMap<Inode, RelPath>,
    recent_order: VecDeque<Inode>,
}

/// How many single-name files read live [`Names`] remembers.
pub const RECENT: usize = 65_536;

impl Known {
    fn insert(&mut self, path: RelPath, inode: Inode) {
        if let Some(before) = self.by_path.insert(path.as_bytes().to_vec(), inode) {
            if before != inode {
                self.drop_name(before, &path);
            }
        }
        self.by_inode.entry(inode).or_default().insert(path);
    }

    fn remove(&mut self, path: &RelPath) {
        if let Some(inode) = self.by_path.remove(path.as_bytes()) {
            self.drop_name(inode, path);
        }
    }

    fn drop_name(&mut self, inode: Inode, path: &RelPath) {
        if let Some(set) = self.by_inode.get_mut(&inode) {
            set.remove(path);
            if set.is_empty() {
                self.by_inode.remove(&inode);
            }
        }
    }
}

impl PartialEq for Names {
    fn eq(&self, _: &Names) -> bool {
        true
    }
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.0.lock().map(|m| m.by_inode.len()).unwrap_or(0);
        write!(f, "Names({known} files)")
    }
}

impl Names {
    /// Remembers the names of `entries` that have an inode (files with several names). A
    /// scan of the whole tree (`whole`) replaces everything known.
    pub fn learn(&self, entries: &[Entry], whole: bool) {
        let mut known = self.0.lock().expect("names lock");
        if whole {
            *known = Known::default();
        }
        for e in entries {
            if let Some(i) = e.inode {
                known.insert(e.path.clone(), i);
            }
        }
    }

    /// Remembers files read live with one name (see [`RECENT`]).
    pub fn saw_single(&self, files: impl IntoIterator<Item = (Inode, RelPath)>) {
        let mut known = self.0.lock().expect("names lock");
        for (inode, path) in files {
            if known.recent.insert(inode, path).is_none() {
                known.recent_order.push_back(inode);
            }
            while known.recent_order.len() > RECENT {
                let old = known.recent_order.pop_front().expect("longer than RECENT");
                known.recent.remove(&old);
            }
        }
    }

    /// Follows a rename: every name at or below `from` moves below `to`. Costs the names
    /// moved, not the names known.
    pub fn rename(&self, from: &RelPath, to: &RelPath) {
        let mut known = self.0.lock().expect("names lock");
        let mut below = from.as_bytes().to_vec();
        below.push(b'/');
        let mut past = from.as_bytes().to_vec();
        past.push(b'/' + 1);
        let moved: Vec<(Vec<u8>, Inode)> = known
            .by_path
            .range(from.as_bytes().to_vec()..=from.as_bytes().to_vec())
            .chain(known.by_path.range(below..past))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (path, inode) in moved {
            let old = RelPath::from_bytes(path);
            known.remove(&old);
            let mut renamed = to.as_bytes().to_vec();
            renamed.extend_from_slice(&old.as_bytes()[from.as_bytes().len()..]);
            known.insert(RelPath::from_bytes(renamed), inode);
        }
    }

    /// The current names of the files of `entries` (each checked beneath `root`; names that
    /// are gone or another file now are forgotten), with the entries' own names.
    pub fn current(&self, root: &OwnedFd, entries: &[&Entry]) -> LinkNames {
        let mut out: LinkNames = HashMap::new();
        for e in entries {
            if let Some(inode) = e.inode {
                out.entry(inode).or_default().push(e.path.clone());
            }
        }
        for (inode, names) in &mut out {
            let known: Vec<RelPath> = {
                let known = self.0.lock().expect("names lock");
                let mut names: Vec<RelPath> = known
                    .by_inode
                    .get(inode)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                names.extend(
                    known
                        .recent
                        .get(inode)
                        .filter(|n| !names.contains(n))
                        .cloned(),
                );
                names
            };
            let seen: BTreeSet<RelPath> = names.iter().cloned().collect();
            let mut stale = Vec::new();
            for n in known.into_iter().filter(|n| !seen.contains(n)) {
                let read = local::read_entry_at(root, &n, Namespaces::NONE, &mut Vec::new());
                match read {
                    Ok(Some(x)) if x.inode == Some(*inode) => names.push(n),
                    _ => stale.push(n),
                }
            }
            {
                // Names found through the recent files are names of a linked file now.
                let mut known = self.0.lock().expect("names lock");
                for n in names.iter() {
                    if known.by_path.get(n.as_bytes()) != Some(inode) {
                        known.insert(n.clone(), *inode);
                    }
                }
            }
            if !stale.is_empty() {
                let mut known = self.0.lock().expect("names lock");
                for n in &stale {
                    if known.by_path.get(n.as_bytes()) == Some(inode) {
                        known.remove(n);
                    }
                }
            }
            names.sort_by(|a, b| a.tree_cmp(b));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn read_at(fd: &OwnedFd, p: &str) -> Entry {
        local::read_entry_at(fd, &RelPath::from(p), Namespaces::NONE, &mut Vec::new())
            .unwrap()
            .unwrap()
    }

    /// A file read with one name, linked right after: a read of the new name alone finds the
    /// old one (it was never seen with two names, so only the recent files know it).
    #[test]
    fn a_name_made_for_a_file_read_with_one_name_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a"), b"x").unwrap();
        let fd = local::open_root(root).unwrap();
        let read = |p: &str| read_at(&fd, p);
        let names = Names::default();
        assert_eq!(read("a").inode, None, "one name: no inode in its entry");
        let a = local::inode_at(&fd, &RelPath::from("a")).unwrap().unwrap();
        names.saw_single([(a, RelPath::from("a"))]);
        std::fs::hard_link(root.join("a"), root.join("b")).unwrap();
        let b = read("b");
        let got = names.current(&fd, &[&b]);
        assert_eq!(got[&a], vec![RelPath::from("a"), RelPath::from("b")]);
        // Forgotten past the bound.
        let other = Names::default();
        other.saw_single([(a, RelPath::from("a"))]);
        let filler = (0..RECENT as u64).map(|i| (Inode { dev: 0, ino: i }, RelPath::from("x")));
        other.saw_single(filler.collect::<Vec<_>>());
        assert_eq!(other.current(&fd, &[&b])[&a], vec![RelPath::from("b")]);
    }

    #[test]
    fn names_are_checked_before_use_and_follow_renames() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"x").unwrap();
        std::fs::hard_link(root.join("d/a"), root.join("b")).unwrap();
        std::fs::hard_link(root.join("d/a"), root.join("d-a")).unwrap();
        std::fs::hard_link(root.join("d/a"), root.join("c")).unwrap();
        let fd = local::open_root(root).unwrap();
        let read = |p: &str| read_at(&fd, p);
        let names = Names::default();
        names.learn(&[read("d/a"), read("b"), read("c"), read("d-a")], true);
        // `c` now another file; `d` renamed to `e`.
        std::fs::remove_file(root.join("c")).unwrap();
        std::fs::write(root.join("c"), b"y").unwrap();
        std::fs::rename(root.join("d"), root.join("e")).unwrap();
        names.rename(&RelPath::from("d"), &RelPath::from("e"));
        let b = read("b");
        let got = names.current(&fd, &[&b]);
        let ino = std::fs::metadata(root.join("b")).unwrap().ino();
        assert_eq!(b.inode.unwrap().ino, ino);
        assert_eq!(
            got[&b.inode.unwrap()],
            vec![
                RelPath::from("b"),
                RelPath::from("d-a"),
                RelPath::from("e/a")
            ]
        );
        assert_eq!(format!("{names:?}"), "Names(1 files)");
        let again = names.current(&fd, &[&b]);
        assert_eq!(again, got, "the stale name was forgotten, nothing else");
    }
}
