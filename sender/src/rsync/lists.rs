//! What a batch's plan asks of rsync: `--files-from` lists
//! (deletions grouped by parent, then what to send with the parents whose times follow).

use crate::plan::BatchPlan;
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

/// The rsync runs a batch's plan maps to ([`plan_batch`](crate::plan::plan_batch), the
/// planner of every live batch): its deletes are missing, what it creates or changes is
/// present, a subtree it compares (a directory new or moved in) is listed whole beneath the
/// held root by `scan` (`--files-from` does not recurse), and the directories whose times
/// it restores are the parents.
pub(super) fn lists_of(
    sync: &str,
    planned: BatchPlan,
    mut scan: impl FnMut(&RelPath) -> std::io::Result<Vec<RelPath>>,
) -> Lists {
    let name = |p: &RelPath| {
        if p.is_root() {
            b".".to_vec()
        } else {
            p.as_bytes().to_vec()
        }
    };
    let BatchPlan {
        plan,
        trees,
        parents,
        failures,
    } = planned;
    let mut lists = Lists {
        parents: parents.iter().map(name).collect(),
        ..Lists::default()
    };
    for (path, e) in failures {
        tracing::warn!(sync, %path, "cannot read: {e}");
    }
    lists.missing.extend(plan.deletes.iter().map(name));
    let created = plan.creates.iter().map(|op| &op.entry().path);
    let linked = plan.links.iter().flat_map(|l| [&l.entry.path, &l.target]);
    let dirs = plan.dir_meta.iter().map(|e| &e.path);
    lists
        .present
        .extend(created.chain(linked).chain(dirs).map(name));
    // Swapped for a symlink or removed since it was read: gone.
    let gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        )
    };
    for tree in trees {
        match scan(&tree) {
            Ok(paths) => lists.present.extend(paths.iter().map(name)),
            Err(e) if gone(&e) => {
                lists.missing.insert(name(&tree));
            }
            Err(e) => tracing::warn!(sync, path = %tree, "cannot read: {e}"),
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
