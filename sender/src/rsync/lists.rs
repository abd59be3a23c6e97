//! What a batch asks of rsync: its dirty paths, as read, mapped to `--files-from` lists
//! (deletions grouped by parent, then what to send with the parents whose times follow).

use crate::coalesce::Need;
use crate::config::SyncGroup;
use crate::plan::Dirty;
use ferry_protocol::RelPath;
use std::collections::BTreeSet;
use std::io::Write;

/// Groups missing paths by parent directory (the topmost missing path of a subtree only),
/// each as names relative to that parent.
pub(super) fn by_parent(missing: &BTreeSet<Vec<u8>>) -> Vec<(RelPath, BTreeSet<Vec<u8>>)> {
    let mut groups: std::collections::BTreeMap<RelPath, BTreeSet<Vec<u8>>> = Default::default();
    let mut paths: Vec<RelPath> = missing
        .iter()
        .map(|p| RelPath::from_bytes(p.clone()))
        .collect();
    paths.sort_by(|a, b| a.tree_cmp(b));
    let mut last: Option<RelPath> = None;
    for p in paths {
        if p.is_root() || last.as_ref().is_some_and(|l| p.starts_with(l)) {
            continue;
        }
        groups
            .entry(p.parent().unwrap_or_default())
            .or_default()
            .insert(p.file_name().to_vec());
        last = Some(p);
    }
    groups.into_iter().collect()
}

/// What one batch lists, relative to the source.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Lists {
    /// Paths gone from the source (deleted on the module with `delete`).
    pub(super) missing: BTreeSet<Vec<u8>>,
    /// Paths to send: each dirty path, and every entry below new or moved directories.
    pub(super) present: BTreeSet<Vec<u8>>,
    /// Directories whose entries changed, for their times.
    pub(super) parents: BTreeSet<Vec<u8>>,
}

/// The rsync runs a batch needs, from its dirty paths as read (see
/// [`read_batch`](crate::batch::read_batch)). A directory new or moved in is listed whole
/// (`scan` lists the subtree beneath the held root; `--files-from` does not recurse).
pub(super) fn lists_of(
    group: &SyncGroup,
    dirty: Vec<Dirty>,
    mut scan: impl FnMut(&RelPath) -> std::io::Result<Vec<RelPath>>,
) -> Lists {
    let mut lists = Lists::default();
    let name = |p: &RelPath| {
        if p.is_root() {
            b".".to_vec()
        } else {
            p.as_bytes().to_vec()
        }
    };
    for Dirty { path, need, entry } in dirty {
        if need >= Need::Content && !path.is_root() {
            lists
                .parents
                .insert(name(&path.parent().unwrap_or_default()));
        }
        let is_dir = match &entry {
            Ok(Some(e)) => Some(e.meta.kind == ferry_protocol::Kind::Dir),
            _ => None,
        };
        if group.filter.excludes_dirty(&path, is_dir) {
            continue;
        }
        // Only a path that is really gone is deleted; one we cannot read is left alone.
        let gone = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            )
        };
        match entry {
            Ok(None) => {
                lists.missing.insert(name(&path));
            }
            Err(e) => tracing::warn!(sync = %group.name, %path, "cannot read: {e}"),
            Ok(Some(_)) if is_dir == Some(true) && need >= Need::Content => match scan(&path) {
                Ok(paths) => lists.present.extend(paths.iter().map(name)),
                Err(e) if gone(&e) => {
                    lists.missing.insert(name(&path));
                }
                Err(e) => tracing::warn!(sync = %group.name, %path, "cannot read: {e}"),
            },
            Ok(Some(_)) => {
                lists.present.insert(name(&path));
            }
        }
    }
    lists
}

pub(super) fn write_list(paths: &BTreeSet<Vec<u8>>) -> std::io::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::Builder::new()
        .prefix("ferry-files-from.")
        .tempfile()?;
    for p in paths {
        f.write_all(p)?;
        f.write_all(b"\0")?;
    }
    f.flush()?;
    Ok(f)
}
