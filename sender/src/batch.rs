//! One live batch on a ferry target: the renames first, then the dirty paths, planned by
//! [`plan_batch`] (new or moved directories compared as subtrees), then the times of every
//! parent whose entries changed, all through [`execute`].
//!
//! A rename the receiver refuses (it lacks the old name) becomes content: the old name is
//! compared (so deleted) and the new one compared as a subtree. A renamed directory is also
//! compared as a subtree, because its watches are re-placed after the move and something may
//! have been written in between (an equal subtree sends nothing). Without `delete` the old
//! name must stay, so a rename is sent as a copy.

use crate::coalesce::{Need, Rename};
use crate::config::SyncGroup;
use crate::execute::{execute, rename_all, Observe, Report};
use crate::plan::{order_dir_meta, plan_batch, Dirty};
use crate::queue::Batch;
use crate::reconcile::{plan_options, plan_under, reconcile_under};
use crate::session::{Session, SessionError};
use ferry_protocol::meta::Kind;
use ferry_protocol::{local, Entry, RelPath};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// Sends `batch` to the module behind `session`; per-path failures land in `report`.
pub async fn send_batch(
    session: &Arc<Session>,
    group: &SyncGroup,
    batch: &Batch,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let mut extra = Batch::default();
    let mut parents: BTreeSet<RelPath> = BTreeSet::new();
    // A rename with an excluded end is not a rename on the receiver: the old name is
    // compared (so deleted, unless excluded) and the new one sent (unless excluded).
    let (renames, touching_excluded): (Vec<&Rename>, Vec<&Rename>) =
        batch.renames.iter().partition(|r| {
            !group.filter.excludes_dirty(&r.from, Some(r.dir))
                && !group.filter.excludes_dirty(&r.to, Some(r.dir))
        });
    for r in touching_excluded {
        extra.mark(r.from.clone(), Need::Content, r.since);
        extra.mark(r.to.clone(), Need::Tree, r.since);
    }
    if !renames.is_empty() {
        if group.delete {
            let refused = rename_all(session, &renames, report, observe).await?;
            for r in &renames {
                parents.extend(r.from.parent());
                parents.extend(r.to.parent());
                if r.dir {
                    extra.mark(r.to.clone(), Need::Tree, r.since);
                }
            }
            for r in refused {
                extra.mark(r.from.clone(), Need::Content, Instant::now());
                extra.mark(r.to.clone(), Need::Tree, Instant::now());
            }
        } else {
            for r in &renames {
                extra.mark(r.to.clone(), Need::Tree, r.since);
            }
        }
    }
    if batch.full {
        let r = reconcile_under(session, group, &RelPath::root(), observe).await?;
        report.absorb(r);
        return Ok(());
    }

    let mut paths: Vec<(RelPath, Need)> = batch
        .paths
        .iter()
        .chain(extra.paths.iter())
        .map(|(p, (n, _))| (p.clone(), *n))
        .collect();
    paths.sort_by(|a, b| a.0.tree_cmp(&b.0).then(b.1.cmp(&a.1)));
    paths.dedup_by(|later, earlier| later.0 == earlier.0);
    let root = group.source.clone();
    let dirty = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|(path, need)| Dirty {
                entry: local::read_entry(&root, &path).map_err(|e| e.to_string()),
                path,
                need,
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("stat task");
    // Paths read while the source root was vanishing look deleted: never act on them.
    if !group.source.is_dir() {
        return Err(SessionError::Failed(format!(
            "source {} vanished while the batch was read",
            group.source.display()
        )));
    }

    let filter = &group.filter;
    let planned = plan_batch(dirty, plan_options(session, group), |p, d| {
        filter.excludes_dirty(p, d)
    });
    for (path, e) in planned.failures {
        tracing::warn!(sync = %group.name, %path, "cannot read: {e}");
        report.failures.push((path, e));
    }
    let mut plan = planned.plan;
    parents.extend(planned.parents);
    for tree in planned.trees {
        plan.extend(plan_under(session, group, &tree, report).await?);
    }
    // Parents whose entries changed get their times back, after their contents.
    let have: BTreeSet<&RelPath> = plan.dir_meta.iter().map(|e| &e.path).collect();
    let missing: Vec<RelPath> = parents.into_iter().filter(|d| !have.contains(d)).collect();
    let root = group.source.clone();
    let parents: Vec<Entry> = tokio::task::spawn_blocking(move || {
        missing
            .into_iter()
            .filter_map(|d| local::read_entry(&root, &d).ok().flatten())
            .filter(|e| e.meta.kind == Kind::Dir)
            .collect()
    })
    .await
    .expect("stat task");
    plan.dir_meta.extend(parents);
    order_dir_meta(&mut plan.dir_meta);
    execute(session, &group.source, plan, report, observe).await
}
