//! Comparing a whole tree or one subtree of a sync group with one target: scan the source,
//! list the receiver, plan, execute. `send --once`, daemon start-up, overflow rescans and
//! new directories all come through here.

use crate::config::SyncGroup;
use crate::descend::{copy_into_empty, plan_by_summary, Compared};
use crate::execute::{execute, Observe, Report, Step};
use crate::guard::Window;
use crate::links::{LinkNames, Names};
use crate::plan::{deleted_entries, plan, Plan, PlanOptions};
use crate::session::{Session, SessionError};
use crate::source;
use ferry_protocol::local;
use ferry_protocol::meta::Entry;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Instant;

/// Drops excluded entries (and their subtrees) from a tree-order remote listing.
pub fn filter_remote(group: &SyncGroup, remote: Vec<Entry>) -> Vec<Entry> {
    let mut skip: Option<RelPath> = None;
    remote
        .into_iter()
        .filter(|e| {
            if let Some(s) = &skip {
                if e.path.starts_with(s) {
                    return false;
                }
            }
            if group
                .filter
                .excludes(&e.path, e.meta.kind == ferry_protocol::Kind::Dir)
            {
                skip = Some(e.path.clone());
                return false;
            }
            true
        })
        .collect()
}

/// Reconciles `group`'s source with the module behind `session`.
pub async fn reconcile(session: &Arc<Session>, group: &SyncGroup) -> Result<Report, SessionError> {
    let (links, root) = (Names::default(), RelPath::root());
    let window = Window::default();
    reconcile_under(session, group, &links, &root, window, &mut |_: &Step| {}).await
}

/// Reconciles the subtree at `under` (the whole tree for the root): lists both sides, plans
/// and executes. A subtree missing locally is deleted on the receiver (if the group deletes).
/// `window` is what was deleted live just before (see [`plan_under`]); `links` is what the
/// group knows of its multiply-linked files.
pub async fn reconcile_under(
    session: &Arc<Session>,
    group: &SyncGroup,
    links: &Names,
    under: &RelPath,
    window: Window,
    observe: Observe<'_>,
) -> Result<Report, SessionError> {
    let started = Instant::now();
    let sent_before = session.bytes_sent();
    let mut report = Report::default();
    let root = source::open(group).await?;
    let compared = if under.is_root() {
        plan_by_summary(session, group, &root, links, &mut report).await?
    } else {
        Compared::Full
    };
    let finish = |mut report: Report| {
        report.bytes_sent = session.bytes_sent() - sent_before;
        report.elapsed = started.elapsed();
        Ok(report)
    };
    let (mut plan, listed) = match compared {
        Compared::Empty(module_root) => {
            // Done as it is planned, a piece at a time.
            tracing::info!(
                sync = %group.name,
                target = %session.target(),
                "reconcile planned: a copy into an empty module"
            );
            let copy = copy_into_empty(
                session,
                group,
                &root,
                links,
                module_root,
                &mut report,
                observe,
            );
            let done = copy.await?;
            // Nothing to delete: the guard only records the source's filesystem and what the
            // module now holds.
            let listed = Listed {
                local: done.entries,
                remote: 0,
                unkept: done.unkept,
            };
            warn_unkept(session, group, &listed.unkept);
            guard_whole(
                session,
                group,
                window,
                &mut Plan::default(),
                &listed,
                &mut report,
            );
            return finish(report);
        }
        Compared::Planned(s) => {
            tracing::debug!(sync = %group.name, dirs = s.dirs, "compared by summaries");
            let listed = Listed {
                local: s.local,
                remote: s.remote,
                unkept: s.unkept,
            };
            (s.plan, listed)
        }
        Compared::Full => plan_under(session, group, &root, links, under, &mut report).await?,
    };
    if under.is_root() {
        warn_unkept(session, group, &listed.unkept);
        guard_whole(session, group, window, &mut plan, &listed, &mut report);
        tracing::info!(
            sync = %group.name,
            target = %session.target(),
            deletes = plan.deletes.len(),
            updates = plan.creates.len(),
            "reconcile planned"
        );
    }
    let origin = root.into();
    execute(session, group.preserve, &origin, plan, &mut report, observe).await?;
    finish(report)
}

/// What a compare counted on both sides, beyond its plan.
pub struct Listed {
    /// How many entries the source holds (the subtree's root left out).
    pub local: u64,
    /// How many entries the receiver listed (the subtree's root left out).
    pub remote: u64,
    /// Source entries holding attributes the module does not keep: how many, and the first.
    pub unkept: (u64, Option<RelPath>),
}

/// Lists the subtree at `under` on both sides (the source's beneath the held `root`) and plans
/// what makes the receiver's equal; local read errors land in `report`. What could not be
/// read is not known to be gone: nothing at or below it is deleted (rsync's rule after I/O
/// errors).
pub async fn plan_under(
    session: &Arc<Session>,
    group: &SyncGroup,
    root: &Arc<OwnedFd>,
    links: &Names,
    under: &RelPath,
    report: &mut Report,
) -> Result<(Plan, Listed), SessionError> {
    let (g, links, held) = (group.clone(), links.clone(), root.clone());
    let start = under.clone();
    let opts = PlanOptions::new(group, &session.keeps);
    let remote = session.list(under, opts.compare.xattrs);
    let local = tokio::task::spawn_blocking(move || {
        source::scan_under(&g, &held, &start).map(|(entries, errors)| {
            let names = source::link_names(&g, &held, &links, start.is_root(), &entries);
            (entries, errors, names)
        })
    });
    let (remote, local) = tokio::join!(remote, local);
    let remote = filter_remote(group, remote?);
    let (local, scan_errors, names) = match local.expect("scan task") {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !under.is_root() => {
            (Vec::new(), Vec::new(), LinkNames::new())
        }
        Err(e) => {
            return Err(SessionError::Source {
                path: local::local_path(&group.source, under),
                error: e.to_string(),
            })
        }
    };
    let mut planned = plan(&local, &remote, opts, &names);
    let unreadable: Vec<RelPath> = scan_errors.iter().map(|(p, _)| p.clone()).collect();
    planned.keep_unreadable(&unreadable);
    for (p, e) in scan_errors {
        report.failures.push((p, e.to_string()));
    }
    planned.removes = deleted_entries(&planned.deletes, &remote);
    let remote = remote.iter().filter(|e| !e.path.is_root()).count() as u64;
    let ns = unkept_namespaces(group, session);
    let unkept = if ns.is_empty() {
        (0, None)
    } else {
        let mut holding = local
            .iter()
            .filter(|e| e.meta.xattrs.within(ns).next().is_some());
        let first = holding.next().map(|e| e.path.clone());
        (first.iter().count() as u64 + holding.count() as u64, first)
    };
    let local = local.iter().filter(|e| !e.path.is_root()).count() as u64;
    Ok((
        planned,
        Listed {
            local,
            remote,
            unkept,
        },
    ))
}

/// Subtree compares under way at once (each a listing request and a scan of its own).
const SUBTREES_AT_ONCE: usize = 16;

/// Compares the subtrees at `trees` side by side (each a listing's round trip) and appends
/// their plans to `plan` in order; local read errors land in `report`.
pub(crate) async fn plan_subtrees(
    session: &Arc<Session>,
    group: &SyncGroup,
    root: &Arc<OwnedFd>,
    links: &Names,
    trees: Vec<RelPath>,
    plan: &mut Plan,
    report: &mut Report,
) -> Result<(), SessionError> {
    let planned: Vec<(Plan, Report)> = stream::iter(trees)
        .map(|tree: RelPath| async move {
            let mut failures = Report::default();
            let (plan, _) = plan_under(session, group, root, links, &tree, &mut failures).await?;
            Ok::<_, SessionError>((plan, failures))
        })
        .buffered(SUBTREES_AT_ONCE)
        .try_collect()
        .await?;
    for (under, failures) in planned {
        plan.extend(under);
        report.failures.extend(failures.failures);
    }
    Ok(())
}

/// The delete guard over a whole compare's `planned` deletions, counting `window.recent`
/// (entries deleted live within the guard's window) as part of them, so a mass deletion
/// cannot slip through half live and half here, against the module as it was when they
/// began (`window.total`, if known). When the guard objects, a module with history takes the
/// deletions (said once, in [`Report::mass_change`]); one without holds them back
/// ([`Report::held`]) and everything else goes. [`Report::module_entries`] is what the
/// module holds once the compare is done.
fn guard_whole(
    session: &Session,
    group: &SyncGroup,
    window: Window,
    planned: &mut Plan,
    listed: &Listed,
    report: &mut Report,
) {
    let (recent_deletes, window_total) = (window.recent, window.total);
    let source_empty = listed.local == 0;
    // The module before the recent live deletions, and all of them; never more than it held
    // when they began (`window_total`): entries created since (a `NAME.locked` beside each
    // `NAME` deleted) must not dilute the share.
    let deleting = planned.removed() + recent_deletes;
    let total = listed.remote + recent_deletes;
    let total = window_total.map_or(total, |w| w.min(total));
    let device = std::fs::metadata(&group.source).map(|m| m.dev()).ok();
    let moved = device.and_then(|d| group.guard.device_objection(d, deleting));
    let objection = moved.or_else(|| group.guard.objection(deleting, total, source_empty));
    let mut kept = 0;
    if let Some(why) = objection {
        if session.keeps.history {
            // Nothing is lost: what goes is kept in the module's history.
            let said = format!(
                "sync {}: {why}; applied, because module {} keeps history (`ferry history` \
                 on the backup host lists it)",
                group.name, group.module
            );
            tracing::warn!(target = %session.target(), "{said}");
            report.mass_change = Some(said);
        } else {
            let paths = planned.deletes.len() as u64;
            kept = planned.removed();
            let live = if recent_deletes > 0 {
                format!(", after {recent_deletes} entries deleted live within 10 minutes")
            } else {
                String::new()
            };
            report.held = Some(crate::execute::Held {
                paths,
                entries: kept,
                why: format!(
                    "sync {}: {why}; holding {paths} deletions ({kept} entries){live}, \
                     replicating everything else (the module keeps no history: what it \
                     deletes is gone). {}",
                    group.name,
                    group.guard.confirm_hint(&group.name)
                ),
                whole: true,
            });
            planned.deletes.clear();
            planned.removes.clear();
        }
    }
    report.module_entries = Some(listed.local + kept);
}

/// Says once per whole compare which attributes of the source the module cannot keep, if the
/// source has any (`unkept`: how many entries hold them, and the first).
fn warn_unkept(session: &Session, group: &SyncGroup, unkept: &(u64, Option<RelPath>)) {
    let (entries, Some(first)) = unkept else {
        return;
    };
    tracing::warn!(
        sync = %group.name,
        target = %session.target(),
        entries,
        example = %first,
        "the module does not keep {} attributes (receiver not root, setuid = false for \
         capabilities, or a filesystem that cannot hold them): they are not sent",
        unkept_namespaces(group, session).describe()
    );
}

/// The attribute namespaces `group` preserves that the module behind `session` does not keep.
pub(crate) fn unkept_namespaces(group: &SyncGroup, session: &Session) -> Namespaces {
    group.preserve.namespaces().without(session.keeps.xattrs)
}
