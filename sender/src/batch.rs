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
//! Deletions count against the group's delete guard ([`crate::guard`]): a batch's deletes go
//! with the guard's allowance; the receiver counts what each would remove, holds back those
//! past it and answers what it removed, which the tally records by name. A batch that finds
//! the source empty is replaced by a whole-tree compare, which weighs it with exact figures.

use crate::coalesce::{Need, Rename};
use crate::config::SyncGroup;
use crate::execute::{execute, rename_all, Observe, Report};
use crate::guard::{source_is_empty, DeleteTally};
use crate::links::Names;
use crate::plan::{order_dir_meta, plan_batch, Dirty};
use crate::queue::Batch;
use crate::reconcile::{link_names, open_source, plan_options, plan_under, reconcile_under};
use crate::session::{Session, SessionError};
use ferry_protocol::meta::Kind;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::{local, Entry, RelPath};
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

/// What a target's worker carries from batch to batch.
#[derive(Default)]
pub struct Learned {
    /// The group's multiply-linked names (shared by every target of the group).
    pub links: Names,
    /// This target's recent deletions (see [`crate::guard`]).
    pub tally: DeleteTally,
    /// Why deletions are being held (the guard objected, the module keeps no history): until
    /// an operator confirms, or a whole compare finds nothing to hold, live batches send
    /// everything but their deletions.
    pub holding: Option<String>,
    /// A mass deletion into the module's history was already said in this window.
    pub mass_said: bool,
}

/// A batch's renames, planned: those a transport applies as renames, and the dirty paths
/// the others become.
#[derive(Debug, Default)]
pub struct RenamePlan<'r> {
    /// Sent as renames, in order.
    pub send: Vec<&'r Rename>,
    /// What the others become (see [`Rename::as_paths`]), and the new name of a renamed
    /// directory (compared whole: its watches were re-placed after the move, and something
    /// may have been written in between).
    pub paths: Vec<(RelPath, Need, Instant)>,
}

/// Plans `renames` for a transport that applies renames (`can_rename`) or not, on a group
/// that deletes or not. A rename with an excluded end (`excluded`, as
/// [`Filter::excludes_dirty`](crate::filter::Filter::excludes_dirty)) is not a rename on the
/// receiver; without `delete` the old name must stay, so a rename is a copy.
pub fn plan_renames<'r>(
    renames: &'r [Rename],
    delete: bool,
    can_rename: bool,
    excluded: impl Fn(&RelPath, Option<bool>) -> bool,
) -> RenamePlan<'r> {
    let mut out = RenamePlan::default();
    for r in renames {
        let hidden = excluded(&r.from, Some(r.dir)) || excluded(&r.to, Some(r.dir));
        if !delete {
            out.paths.push((r.to.clone(), Need::Tree, r.since));
        } else if hidden || !can_rename {
            out.paths.extend(r.as_paths());
        } else {
            out.send.push(r);
            if r.dir {
                out.paths.push((r.to.clone(), Need::Tree, r.since));
            }
        }
    }
    out
}

/// The dirty paths of `batch` and `more`, in tree order, one per path (the greatest need).
pub fn batch_paths(batch: &Batch, more: Vec<(RelPath, Need, Instant)>) -> Vec<(RelPath, Need)> {
    let mut paths: Vec<(RelPath, Need)> = batch
        .paths
        .iter()
        .map(|(p, (n, _))| (p.clone(), *n))
        .chain(more.into_iter().map(|(p, n, _)| (p, n)))
        .collect();
    paths.sort_by(|a, b| a.0.tree_cmp(&b.0).then(b.1.cmp(&a.1)));
    paths.dedup_by(|later, earlier| later.0 == earlier.0);
    paths
}

/// Reads each of `paths` beneath the held source `root`, once (a symlink on the way makes a
/// path gone, never a look outside the source), with the attributes `ns`. Attributes that
/// could not be read are returned apart: the entry still goes without them.
pub fn read_batch(
    root: &OwnedFd,
    paths: Vec<(RelPath, Need)>,
    ns: Namespaces,
) -> (Vec<Dirty>, Vec<(RelPath, std::io::Error)>) {
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

/// Sends `batch` to the module behind `session`; per-path failures land in `report`.
/// `learned` is what the target's worker knows from earlier batches. The source is read
/// beneath one descriptor of its root, held from the first read to the last file sent.
pub async fn send_batch(
    session: &Arc<Session>,
    group: &SyncGroup,
    learned: &mut Learned,
    batch: &Batch,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let mut parents: BTreeSet<RelPath> = BTreeSet::new();
    let filter = &group.filter;
    let renames = plan_renames(&batch.renames, group.delete, true, |p, d| {
        filter.excludes_dirty(p, d)
    });
    let mut more = renames.paths;
    if !renames.send.is_empty() {
        let refused = rename_all(session, &renames.send, report, observe).await?;
        for r in &renames.send {
            if !refused.iter().any(|x| std::ptr::eq(*x, *r)) {
                learned.links.rename(&r.from, &r.to);
            }
            parents.extend(r.from.parent());
            parents.extend(r.to.parent());
        }
        for r in refused {
            more.extend(r.as_paths());
        }
    }
    if batch.full {
        return compare_whole(session, group, learned, report, observe).await;
    }

    let paths = batch_paths(batch, more);
    let root = open_source(group).await?;
    let (g, links, held) = (group.clone(), learned.links.clone(), root.clone());
    let (dirty, xattr_errors, names) = tokio::task::spawn_blocking(move || {
        let (dirty, errors) = read_batch(&held, paths, g.preserve.namespaces());
        let linked: Vec<Entry> = dirty
            .iter()
            .filter_map(|d| d.entry.as_ref().ok().and_then(Option::as_ref))
            .filter(|e| e.inode.is_some() && !g.filter.excludes_dirty(&e.path, Some(false)))
            .cloned()
            .collect();
        let names = link_names(&g, &held, &links, false, &linked);
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
        return Err(SessionError::Source {
            path: group.source.clone(),
            error: "vanished while the batch was read".into(),
        });
    }

    let planned = plan_batch(dirty, plan_options(session, group), &names, |p, d| {
        filter.excludes_dirty(p, d)
    });
    for (path, e) in planned.failures {
        tracing::warn!(sync = %group.name, %path, "cannot read: {e}");
        report.failures.push((path, e));
    }
    let mut plan = planned.plan;
    parents.extend(planned.parents);
    for tree in planned.trees {
        let links = &learned.links;
        let window = Default::default();
        plan.extend(plan_under(session, group, &root, links, &tree, window, report).await?);
    }
    if let (Some(why), false) = (&learned.holding, plan.deletes.is_empty()) {
        // Held like the deletions before them, until an operator confirms.
        let held = crate::execute::Held {
            paths: plan.deletes.len() as u64,
            entries: plan.removes.iter().map(|(_, n)| n).sum::<u64>()
                + (plan.deletes.len() - plan.removes.len().min(plan.deletes.len())) as u64,
            why: why.clone(),
            whole: false,
        };
        report.absorb(Report {
            held: Some(held),
            ..Report::default()
        });
        plan.deletes.clear();
        plan.removes.clear();
    }
    let guarded = !plan.deletes.is_empty() && group.guard.active();
    if guarded {
        let g = group.clone();
        let source_empty = tokio::task::spawn_blocking(move || source_is_empty(&g))
            .await
            .expect("read_dir task");
        if source_empty {
            // A disk that did not mount looks like this: weighed with exact figures, as
            // compatibility mode does.
            return compare_whole(session, group, learned, report, observe).await;
        }
        // The receiver counts what each delete takes and holds back what would pass the
        // guard; with history it takes everything (nothing is lost) and only counts.
        plan.allowance = match session.keeps.history {
            true => Some(u64::MAX),
            false => learned.tally.allowance(&group.guard, crate::timing::now()),
        };
    }
    let grew = plan.creates.len() as u64;
    // Parents whose entries changed get their times back, after their contents.
    let have: BTreeSet<&RelPath> = plan.dir_meta.iter().map(|e| &e.path).collect();
    let missing: Vec<RelPath> = parents.into_iter().filter(|d| !have.contains(d)).collect();
    let (ns, held) = (group.preserve.namespaces(), root.clone());
    let parents: Vec<Entry> = tokio::task::spawn_blocking(move || {
        missing
            .into_iter()
            .filter_map(|d| {
                local::read_entry_at(&held, &d, ns, &mut Vec::new())
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
    execute(session, group.preserve, &root.into(), plan, report, observe).await?;
    let now = crate::timing::now();
    if guarded {
        guard_answers(session, group, learned, report, now);
    }
    learned.tally.grew(grew, now);
    if learned.tally.recent(now) == 0 {
        learned.mass_said = false;
    }
    Ok(())
}

/// What the receiver answered to a batch's deletes under the guard's allowance, into the
/// tally (by name) and, for deletes it held back, into the target's holding state; a module
/// with history says once a window that a mass deletion went into it.
fn guard_answers(
    session: &Session,
    group: &SyncGroup,
    learned: &mut Learned,
    report: &mut Report,
    now: Instant,
) {
    let removed = std::mem::take(&mut report.removed);
    learned.tally.record(&removed, now);
    let held = std::mem::take(&mut report.held_back);
    if !held.is_empty() {
        let deleted = removed.iter().map(|(_, n)| n).sum();
        let detail = format!("the receiver held {} deletions", held.len());
        let why = group.guard.held_message(&group.name, deleted, &detail);
        if learned.holding.is_none() {
            tracing::error!(sync = %group.name, target = %session.target(), "{why}");
        }
        learned.holding = Some(why.clone());
        report.absorb(Report {
            held: Some(crate::execute::Held {
                paths: held.len() as u64,
                entries: held.iter().map(|(_, n)| n).sum(),
                why,
                whole: false,
            }),
            ..Report::default()
        });
    }
    if session.keeps.history && !learned.mass_said && learned.tally.meets(&group.guard, now) {
        // Nothing is lost: what went is kept in the module's history. Said once a window.
        let said = format!(
            "sync {}: {} entries deleted within 10 minutes, past the delete guard; applied, \
             because module {} keeps history (`ferry history` on the backup host lists them)",
            group.name,
            learned.tally.recent(now),
            group.module
        );
        tracing::warn!(target = %session.target(), "{said}");
        report.mass_change = Some(said);
        learned.mass_said = true;
    }
}

/// A whole-tree compare under the delete guard, counting the window's live deletions with its
/// own. If it holds deletions, live batches hold theirs too and the window goes on; otherwise
/// the tally starts again from the module's size.
pub(crate) async fn compare_whole(
    session: &Arc<Session>,
    group: &SyncGroup,
    learned: &mut Learned,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let window = learned.tally.window(crate::timing::now());
    let root = RelPath::root();
    let r = reconcile_under(session, group, &learned.links, &root, window, observe).await?;
    match &r.held {
        Some(held) => {
            if learned.holding.is_none() {
                tracing::error!(sync = %group.name, target = %session.target(), "{}", held.why);
            }
            learned.holding = Some(held.why.clone());
        }
        None => {
            if learned.holding.take().is_some() {
                tracing::info!(sync = %group.name, target = %session.target(), "deletions no longer held");
            }
            if let Some(n) = r.module_entries {
                learned.tally.compared(n);
            }
        }
    }
    report.absorb(r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename(from: &str, to: &str, dir: bool) -> Rename {
        Rename {
            from: RelPath::from(from),
            to: RelPath::from(to),
            dir,
            since: Instant::now(),
        }
    }

    /// What `plan_renames` makes of one rename: "R" sent as a rename, then the dirty paths.
    fn planned(r: &Rename, delete: bool, can_rename: bool, excluded: &str) -> Vec<String> {
        let renames = std::slice::from_ref(r);
        let plan = plan_renames(renames, delete, can_rename, |p, _| {
            !excluded.is_empty() && p.as_bytes().starts_with(excluded.as_bytes())
        });
        let sent = plan.send.iter().map(|r| format!("R {} {}", r.from, r.to));
        let paths = plan.paths.iter().map(|(p, n, _)| format!("{n:?} {p}"));
        sent.chain(paths).collect()
    }

    #[test]
    fn the_rename_rules_of_both_transports_in_one_table() {
        let file = rename("a", "b", false);
        let dir = rename("d", "e", true);
        let table: &[(&Rename, bool, bool, &str, &[&str])] = &[
            // A ferry target applies a rename; a renamed directory is compared whole after.
            (&file, true, true, "", &["R a b"]),
            (&dir, true, true, "", &["R d e", "Tree e"]),
            // rsync has no rename: both names, the old one compared (so deleted).
            (&file, true, false, "", &["Content a", "Tree b"]),
            (&dir, true, false, "", &["Content d", "Tree e"]),
            // Without delete the old name stays: a rename is a copy, on either transport.
            (&file, false, true, "", &["Tree b"]),
            (&dir, false, false, "", &["Tree e"]),
            // An excluded end: not a rename on the receiver.
            (&file, true, true, "a", &["Content a", "Tree b"]),
            (&file, true, true, "b", &["Content a", "Tree b"]),
        ];
        for (i, (r, delete, can_rename, excluded, want)) in table.iter().enumerate() {
            let got = planned(r, *delete, *can_rename, excluded);
            assert_eq!(got, *want, "row {i}");
        }
    }

    #[test]
    fn batch_paths_are_in_tree_order_once_each_with_the_greatest_need() {
        let mut batch = Batch::default();
        let t = Instant::now();
        batch.mark(RelPath::from("b"), Need::Meta, t);
        batch.mark(RelPath::from("a/x"), Need::Content, t);
        let more = vec![
            (RelPath::from("b"), Need::Tree, t),
            (RelPath::from("a"), Need::Meta, t),
        ];
        let got: Vec<String> = batch_paths(&batch, more)
            .iter()
            .map(|(p, n)| format!("{n:?} {p}"))
            .collect();
        assert_eq!(got, ["Meta a", "Content a/x", "Tree b"]);
    }
}
