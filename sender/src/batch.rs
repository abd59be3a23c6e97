//! One live batch on a ferry target: the renames first, then the dirty paths, planned by
//! [`plan_batch`] (new or moved directories compared as subtrees), then the times of every
//! parent whose entries changed, all through [`execute`].
//!
//! A rename the receiver refuses (it lacks the old name) becomes content: the old name is
//! compared (so deleted) and the new one compared as a subtree. A renamed directory is also
//! compared as a subtree, because its watches are re-placed after the move and something may
//! have been written in between (an equal subtree sends nothing). Without `delete` the old
//! name must stay, so a rename is sent as a copy.
//!
//! Deletions count against the group's delete guard ([`crate::guard`]): before a batch deletes
//! anything, what it would remove on the receiver is counted (subtree compares know it from
//! their listing; a gone path is listed on the receiver), and a batch that trips the guard's
//! tally is replaced by a whole-tree compare, which applies the guard with exact figures.

use crate::coalesce::{Need, Rename};
use crate::config::SyncGroup;
use crate::execute::{execute, rename_all, Observe, Report};
use crate::guard::{source_is_empty, DeleteTally};
use crate::links::Names;
use crate::plan::{order_dir_meta, plan_batch, Dirty};
use crate::queue::Batch;
use crate::reconcile::{link_names, plan_options, plan_under, reconcile_under};
use crate::session::{Session, SessionError};
use ferry_protocol::meta::Kind;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::{local, Entry, RelPath};
use std::collections::BTreeSet;
use std::sync::Arc;

/// How many receiver listings a batch's deletion count has in flight at once.
const COUNT_CONCURRENCY: usize = 32;

/// What a target's worker carries from batch to batch.
#[derive(Default)]
pub struct Learned {
    /// The group's multiply-linked names (shared by every target of the group).
    pub links: Names,
    /// This target's recent deletions (see [`crate::guard`]).
    pub tally: DeleteTally,
}

/// Sends `batch` to the module behind `session`; per-path failures land in `report`.
/// `learned` is what the target's worker knows from earlier batches.
pub async fn send_batch(
    session: &Arc<Session>,
    group: &SyncGroup,
    learned: &mut Learned,
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
                if !refused.iter().any(|x| std::ptr::eq(*x, *r)) {
                    learned.links.rename(&r.from, &r.to);
                }
                parents.extend(r.from.parent());
                parents.extend(r.to.parent());
                if r.dir {
                    extra.mark(r.to.clone(), Need::Tree, r.since);
                }
            }
            for r in refused {
                extra.mark(r.from.clone(), Need::Content, crate::timing::now());
                extra.mark(r.to.clone(), Need::Tree, crate::timing::now());
            }
        } else {
            for r in &renames {
                extra.mark(r.to.clone(), Need::Tree, r.since);
            }
        }
    }
    if batch.full {
        return compare_whole(session, group, learned, report, observe).await;
    }

    let mut paths: Vec<(RelPath, Need)> = batch
        .paths
        .iter()
        .chain(extra.paths.iter())
        .map(|(p, (n, _))| (p.clone(), *n))
        .collect();
    paths.sort_by(|a, b| a.0.tree_cmp(&b.0).then(b.1.cmp(&a.1)));
    paths.dedup_by(|later, earlier| later.0 == earlier.0);
    let (g, links) = (group.clone(), learned.links.clone());
    let (dirty, xattr_errors, names) = tokio::task::spawn_blocking(move || {
        // One open of the source root for the whole batch; each path resolved beneath it.
        let root = local::open_root(&g.source).map_err(|e| e.to_string());
        let ns = g.preserve.namespaces();
        let mut errors = Vec::new();
        let dirty: Vec<Dirty> = paths
            .into_iter()
            .map(|(path, need)| Dirty {
                entry: root.as_ref().map_err(Clone::clone).and_then(|fd| {
                    local::read_entry_at(fd, &path, ns, &mut errors).map_err(|e| e.to_string())
                }),
                path,
                need,
            })
            .collect();
        let linked: Vec<Entry> = dirty
            .iter()
            .filter_map(|d| d.entry.as_ref().ok().and_then(Option::as_ref))
            .filter(|e| e.inode.is_some() && !g.filter.excludes_dirty(&e.path, Some(false)))
            .cloned()
            .collect();
        let names = link_names(&g, &links, false, &linked);
        (dirty, errors, names)
    })
    .await
    .expect("stat task");
    // The entry still goes, its attributes left as the receiver has them; retrying would not
    // read them any better (the next whole compare reports it as a failure).
    for (path, e) in xattr_errors {
        tracing::warn!(sync = %group.name, %path, "extended attributes not sent: {e}");
    }
    // Paths read while the source root was vanishing look deleted: never act on them.
    if !group.source.is_dir() {
        return Err(SessionError::Failed(format!(
            "source {} vanished while the batch was read",
            group.source.display()
        )));
    }

    let filter = &group.filter;
    let planned = plan_batch(dirty, plan_options(session, group), &names, |p, d| {
        filter.excludes_dirty(p, d)
    });
    for (path, e) in planned.failures {
        tracing::warn!(sync = %group.name, %path, "cannot read: {e}");
        report.failures.push((path, e));
    }
    let mut plan = planned.plan;
    let gone = plan.deletes.clone();
    parents.extend(planned.parents);
    for tree in planned.trees {
        let links = &learned.links;
        plan.extend(plan_under(session, group, links, &tree, 0, report).await?);
    }
    if !plan.deletes.is_empty() && group.guard.active() {
        let mut deleted = entries_on_receiver(session, &gone).await?;
        deleted.extend(plan.removes.iter().cloned());
        let deleting: u64 = deleted.iter().map(|(_, n)| n).sum();
        let g = group.clone();
        let source_empty = tokio::task::spawn_blocking(move || source_is_empty(&g))
            .await
            .expect("read_dir task");
        let now = crate::timing::now();
        if group
            .guard
            .live_tripwire(&learned.tally, &deleted, source_empty, now)
        {
            tracing::warn!(
                sync = %group.name,
                target = %session.address(),
                deleting,
                source_empty,
                "a batch would delete more than the delete guard lets through live; \
                 comparing the whole tree instead"
            );
            return compare_whole(session, group, learned, report, observe).await;
        }
        learned.tally.record(&deleted, now);
    }
    // Parents whose entries changed get their times back, after their contents.
    let have: BTreeSet<&RelPath> = plan.dir_meta.iter().map(|e| &e.path).collect();
    let missing: Vec<RelPath> = parents.into_iter().filter(|d| !have.contains(d)).collect();
    let root = group.source.clone();
    let ns = group.preserve.namespaces();
    let parents: Vec<Entry> = tokio::task::spawn_blocking(move || {
        let Ok(root) = local::open_root(&root) else {
            return Vec::new();
        };
        missing
            .into_iter()
            .filter_map(|d| {
                local::read_entry_at(&root, &d, ns, &mut Vec::new())
                    .ok()
                    .flatten()
            })
            .filter(|e| e.meta.kind == Kind::Dir)
            .collect()
    })
    .await
    .expect("stat task");
    plan.dir_meta.extend(parents);
    order_dir_meta(&mut plan.dir_meta);
    execute(session, group, plan, report, observe).await
}

/// A whole-tree compare under the delete guard; the tally starts again from the module's size.
async fn compare_whole(
    session: &Arc<Session>,
    group: &SyncGroup,
    learned: &mut Learned,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let recent = learned.tally.recent(crate::timing::now());
    let root = RelPath::root();
    let r = reconcile_under(session, group, &learned.links, &root, recent, observe).await?;
    if let Some(n) = r.module_entries {
        learned.tally.compared(n);
    }
    report.absorb(r);
    Ok(())
}

/// How many entries deleting each of `paths` removes on the receiver (with its subtree), from
/// the receiver's own listings. A path it refuses to list counts as one entry.
async fn entries_on_receiver(
    session: &Arc<Session>,
    paths: &[RelPath],
) -> Result<Vec<(RelPath, u64)>, SessionError> {
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(COUNT_CONCURRENCY) {
        let mut lists = tokio::task::JoinSet::new();
        for path in chunk {
            let (session, path) = (session.clone(), path.clone());
            lists.spawn(async move {
                let listed = session.list(&path, Namespaces::NONE).await;
                (path, listed.map(|v| v.len() as u64))
            });
        }
        while let Some(listed) = lists.join_next().await {
            let (path, listed) = listed.expect("list task");
            let n = match listed {
                Ok(n) => n,
                Err(e) if e.is_fatal() => return Err(e),
                Err(_) => 1,
            };
            out.push((path, n));
        }
    }
    Ok(out)
}
