//! Reading the source. Every read of a live batch or a compare resolves beneath one
//! descriptor of the group's root ([`open`]), held from the first read to the last file sent:
//! a symlink on the way makes a path gone, never a look outside the source (rsync's
//! CVE-2024-12747 class). Both transports and both kinds of run read through here.

use crate::coalesce::Need;
use crate::config::SyncGroup;
use crate::filter::Filter;
use crate::links::{LinkNames, Names};
use crate::plan::Dirty;
use crate::session::SessionError;
use ferry_protocol::meta::Kind;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::{local, Entry, RelPath};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Per-path errors of a tree walk.
pub type ScanErrors = Vec<(RelPath, std::io::Error)>;

/// Opens the group's source root: the one descriptor a batch or a compare reads the source
/// beneath, from its first read to its last file sent.
pub async fn open(group: &SyncGroup) -> Result<Arc<OwnedFd>, SessionError> {
    let source = group.source.clone();
    tokio::task::spawn_blocking(move || {
        local::open_root(&source)
            .map(Arc::new)
            .map_err(|e| SessionError::Source {
                path: source.clone(),
                error: e.to_string(),
            })
    })
    .await
    .expect("open task")
}

/// Lists the local subtree at `under` beneath the held source `root`, applying the group's
/// excludes, with the attributes the group preserves.
pub fn scan_under(
    group: &SyncGroup,
    root: &OwnedFd,
    under: &RelPath,
) -> std::io::Result<(Vec<Entry>, ScanErrors)> {
    let filter = |p: &RelPath, is_dir: bool| group.filter.accepts(p, is_dir);
    let mut errors = Vec::new();
    let ns = group.preserve.namespaces();
    let entries = local::scan_at(root, under, &filter, ns, &mut errors)?;
    Ok((entries, errors))
}

/// The whole source tree beneath the held `root`, as [`scan_under`] reads it, handed to `sink`
/// in pieces of the sizes `pieces` gives, in tree order (see [`local::scan_pieces`]).
pub fn scan_pieces(
    group: &SyncGroup,
    root: &OwnedFd,
    pieces: std::ops::RangeInclusive<usize>,
    sink: &mut dyn FnMut(local::Piece) -> bool,
) -> std::io::Result<()> {
    let filter = |p: &RelPath, is_dir: bool| group.filter.accepts(p, is_dir);
    local::scan_pieces(root, &filter, group.preserve.namespaces(), pieces, sink)
}

/// Every current name of the multiply-linked files among `entries` (read from the source; a
/// scan of the `whole` tree or not), the names outside them included; what was learned is
/// kept in `links` (the group's). Empty unless the group preserves hard links.
pub fn link_names(
    group: &SyncGroup,
    root: &OwnedFd,
    links: &Names,
    whole: bool,
    entries: &[Entry],
) -> LinkNames {
    if !group.preserve.hardlinks {
        return LinkNames::new();
    }
    links.learn(entries, whole);
    let linked: Vec<&Entry> = entries.iter().filter(|e| e.inode.is_some()).collect();
    if linked.is_empty() {
        return LinkNames::new();
    }
    links.current(root, &linked)
}

/// Whether the source beneath the held `root` has nothing the group sends: the one meaning
/// of "the source is empty" (a disk that did not mount looks like this) for both transports.
/// Entries the group excludes do not count; an unreadable root counts as empty (nothing may
/// be deleted on its word). A whole compare reads the same from its scan (only the root
/// accepted).
pub fn is_empty(root: &OwnedFd, filter: &Filter) -> bool {
    let accepted = local::holds_any(root, |name, is_dir| {
        filter.accepts(&RelPath::from_bytes(name.to_vec()), is_dir)
    });
    !accepted.unwrap_or(false)
}

/// [`is_empty`] of the held `root`, off the async threads.
pub async fn holds_nothing(root: &Arc<OwnedFd>, filter: &Filter) -> bool {
    let (root, filter) = (root.clone(), filter.clone());
    tokio::task::spawn_blocking(move || is_empty(&root, &filter))
        .await
        .expect("read_dir task")
}

/// [`is_empty`] on a fresh descriptor of the group's root, for a run that holds none yet; a
/// root that cannot be opened counts as empty.
pub async fn is_empty_now(group: &SyncGroup) -> bool {
    match open(group).await {
        Ok(root) => holds_nothing(&root, &group.filter).await,
        Err(_) => true,
    }
}

/// Reads each of `paths` beneath the held source `root`, once, with the attributes `ns`.
/// Attributes that could not be read are returned apart: the entry still goes without them.
pub fn read_paths(
    root: &OwnedFd,
    paths: Vec<(RelPath, Need)>,
    ns: Namespaces,
) -> (Vec<Dirty>, ScanErrors) {
    let mut errors = Vec::new();
    let dirty = paths
        .into_iter()
        .map(|(path, need)| Dirty {
            entry: local::read_entry_at(root, &path, ns, &mut errors).map_err(|e| e.to_string()),
            path,
            need,
        })
        .collect();
    (dirty, errors)
}

/// What one live batch read of the source, in one pass beneath one root.
#[derive(Debug, Default)]
pub struct BatchRead {
    /// Each dirty path as the source has it now.
    pub dirty: Vec<Dirty>,
    /// Every current name of the multiply-linked files among them.
    pub names: LinkNames,
    /// The directories that hold a dirty path or a link name, by path: those whose entries
    /// change get their times back after their contents.
    pub parents: BTreeMap<RelPath, Entry>,
    /// Attributes that could not be read (the entries still go, without them).
    pub errors: ScanErrors,
}

/// Reads a live batch: its dirty `paths`, the names of its multiply-linked files, and the
/// directories holding them or `more_parents` (those of a batch's renames), all beneath the
/// held `root` in one blocking pass.
pub async fn read_batch(
    group: &SyncGroup,
    root: &Arc<OwnedFd>,
    links: &Names,
    paths: Vec<(RelPath, Need)>,
    more_parents: BTreeSet<RelPath>,
) -> BatchRead {
    let (g, links, root) = (group.clone(), links.clone(), root.clone());
    tokio::task::spawn_blocking(move || {
        let ns = g.preserve.namespaces();
        let (dirty, errors) = read_paths(&root, paths, ns);
        let linked: Vec<Entry> = dirty
            .iter()
            .filter_map(|d| d.entry.as_ref().ok().and_then(Option::as_ref))
            .filter(|e| e.inode.is_some() && !g.filter.excludes_dirty(&e.path, Some(false)))
            .cloned()
            .collect();
        let names = link_names(&g, &root, &links, false, &linked);
        if g.preserve.hardlinks {
            // A name made for one of these later finds it (see `Names::saw_single`).
            let single = dirty
                .iter()
                .filter_map(|d| d.entry.as_ref().ok().and_then(Option::as_ref))
                .filter(|e| e.meta.kind == Kind::File && e.inode.is_none())
                .filter_map(|e| Some((local::inode_at(&root, &e.path).ok()??, e.path.clone())));
            links.saw_single(single.collect::<Vec<_>>());
        }
        let mut wanted = more_parents;
        wanted.extend(dirty.iter().filter_map(|d| d.path.parent()));
        wanted.extend(names.values().flatten().filter_map(|p| p.parent()));
        let parents = wanted
            .into_iter()
            .filter_map(|d| {
                local::read_entry_at(&root, &d, ns, &mut Vec::new())
                    .ok()
                    .flatten()
            })
            .filter(|e| e.meta.kind == Kind::Dir)
            .map(|e| (e.path.clone(), e))
            .collect();
        BatchRead {
            dirty,
            names,
            parents,
            errors,
        }
    })
    .await
    .expect("read task")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_source_is_empty_when_it_holds_only_what_the_group_excludes() {
        let dir = scratch("empty");
        let filter = Filter::new(&["*.tmp".into(), "cache/".into()]).unwrap();
        let root = local::open_root(&dir).unwrap();
        assert!(is_empty(&root, &filter), "nothing at all");
        std::fs::write(dir.join("a.tmp"), b"x").unwrap();
        std::fs::create_dir(dir.join("cache")).unwrap();
        assert!(is_empty(&root, &filter), "only excluded entries");
        // `cache/` excludes a directory only: a file of that name takes part.
        std::fs::remove_dir(dir.join("cache")).unwrap();
        std::fs::write(dir.join("cache"), b"x").unwrap();
        assert!(
            !is_empty(&root, &filter),
            "a file named like an excluded directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn emptiness_is_read_beneath_the_held_root_not_by_its_path() {
        let dir = scratch("held");
        let src = dir.join("src");
        std::fs::create_dir(&src).unwrap();
        let root = local::open_root(&src).unwrap();
        // The path now names a full tree; the held root is the empty one it named before.
        std::fs::rename(&src, dir.join("old")).unwrap();
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        let filter = Filter::new(&[]).unwrap();
        assert!(is_empty(&root, &filter));
        assert!(!is_empty(&local::open_root(&src).unwrap(), &filter));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
