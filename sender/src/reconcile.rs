//! One full reconcile of a sync group with one target: scan, list, plan, execute.

use crate::config::SyncGroup;
use crate::plan::{plan, Op, Plan, PlanOptions};
use crate::session::{Session, SessionError};
use crate::transfer::{self, TransferError};
use ferry_protocol::local;
use ferry_protocol::message::Message;
use ferry_protocol::meta::{Compare, Entry};
use ferry_protocol::RelPath;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Requests in flight per session.
pub const MAX_IN_FLIGHT: usize = 512;
/// File bodies being read at once per session.
pub const MAX_FILES_IN_FLIGHT: usize = 16;
/// Attempts for a file that keeps changing while it is read.
pub const FILE_ATTEMPTS: usize = 3;

/// What a reconcile did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Files sent.
    pub files: u64,
    /// Of which as deltas.
    pub delta_files: u64,
    /// Directories, links and special files created.
    pub created: u64,
    /// Metadata-only updates (including directory times).
    pub meta: u64,
    /// Paths deleted.
    pub deleted: u64,
    /// File payload bytes (whole data plus deltas).
    pub payload_bytes: u64,
    /// Total bytes written to the connection.
    pub bytes_sent: u64,
    /// Per-path failures.
    pub failures: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// True if every planned step succeeded.
    pub fn converged(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Per-path errors of a tree walk.
pub type ScanErrors = Vec<(RelPath, std::io::Error)>;

/// Lists the local source tree, applying the group's excludes.
pub fn scan_source(group: &SyncGroup) -> std::io::Result<(Vec<Entry>, ScanErrors)> {
    let filter = |p: &RelPath, is_dir: bool| group.filter.accepts(p, is_dir);
    let mut errors = Vec::new();
    let entries = local::scan(&group.source, &filter, &mut errors)?;
    Ok((entries, errors))
}

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
    let started = Instant::now();
    let sent_before = session.bytes_sent();
    let g = group.clone();
    let root = RelPath::root();
    let remote = session.list(&root);
    let local = tokio::task::spawn_blocking(move || scan_source(&g));
    let (remote, local) = tokio::join!(remote, local);
    let remote = filter_remote(group, remote?);
    let (local, scan_errors) = local
        .expect("scan task")
        .map_err(|e| SessionError::Failed(format!("{}: {e}", group.source.display())))?;
    let mut report = Report::default();
    for (p, e) in scan_errors {
        report.failures.push(format!("{p}: {e}"));
    }
    let opts = PlanOptions {
        delete: group.delete,
        compare: Compare {
            owner: session.privileged,
        },
        devices: session.privileged,
    };
    let plan = plan(&local, &remote, opts);
    tracing::info!(
        sync = %group.name,
        target = %session.address(),
        local = local.len(),
        remote = remote.len(),
        deletes = plan.deletes.len(),
        updates = plan.creates.len(),
        "reconcile planned"
    );
    execute(session, &group.source, plan, &mut report).await?;
    report.bytes_sent = session.bytes_sent() - sent_before;
    report.elapsed = started.elapsed();
    Ok(report)
}

enum Done {
    Created,
    Meta,
    Deleted,
    File(transfer::Sent),
}

/// Executes a plan with many requests in flight. Per-path failures land in the report;
/// a lost connection ends execution with an error.
pub async fn execute(
    session: &Arc<Session>,
    root: &Path,
    plan: Plan,
    report: &mut Report,
) -> Result<(), SessionError> {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let file_slots = Arc::new(Semaphore::new(MAX_FILES_IN_FLIGHT));
    let mut tasks: JoinSet<Result<Done, String>> = JoinSet::new();

    for path in plan.deletes {
        issue(
            session,
            &slots,
            &mut tasks,
            report,
            Done::Deleted,
            move |id| Message::Delete { id, path },
        )
        .await?;
    }
    for op in plan.creates {
        match op {
            Op::Delete(path) => {
                issue(
                    session,
                    &slots,
                    &mut tasks,
                    report,
                    Done::Deleted,
                    move |id| Message::Delete { id, path },
                )
                .await?
            }
            Op::Mkdir(e) => {
                issue(
                    session,
                    &slots,
                    &mut tasks,
                    report,
                    Done::Created,
                    move |id| Message::Mkdir {
                        id,
                        path: e.path,
                        meta: e.meta,
                    },
                )
                .await?
            }
            Op::Symlink(e) => {
                let target = e.link.unwrap_or_default();
                issue(
                    session,
                    &slots,
                    &mut tasks,
                    report,
                    Done::Created,
                    move |id| Message::Symlink {
                        id,
                        path: e.path,
                        target,
                        meta: e.meta,
                    },
                )
                .await?
            }
            Op::Special(e) => {
                issue(
                    session,
                    &slots,
                    &mut tasks,
                    report,
                    Done::Created,
                    move |id| Message::Special {
                        id,
                        path: e.path,
                        meta: e.meta,
                    },
                )
                .await?
            }
            Op::SetMeta(e) => {
                issue(session, &slots, &mut tasks, report, Done::Meta, move |id| {
                    Message::SetMeta {
                        id,
                        path: e.path,
                        meta: e.meta,
                    }
                })
                .await?
            }
            Op::File { entry, delta } => {
                let permit = file_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed");
                reap(&mut tasks, report)?;
                let root: PathBuf = root.to_path_buf();
                match transfer::begin(session, &root, &entry.path, delta).await {
                    Ok(Some(flight)) => {
                        let session = session.clone();
                        tasks.spawn(async move {
                            let _permit = permit;
                            send_with_retries(&session, &root, &entry.path, delta, flight).await
                        });
                    }
                    Ok(None) => report.failures.push(format!(
                        "{}: vanished or changed type during reconcile",
                        entry.path
                    )),
                    Err(TransferError::Session(e)) if e.is_fatal() => return Err(e),
                    Err(e) => report.failures.push(e.to_string()),
                }
            }
        }
    }
    // Barrier: directory times only after everything inside them is durable.
    drain(&mut tasks, report).await?;
    for e in plan.dir_meta {
        issue(session, &slots, &mut tasks, report, Done::Meta, move |id| {
            Message::SetMeta {
                id,
                path: e.path,
                meta: e.meta,
            }
        })
        .await?;
    }
    drain(&mut tasks, report).await
}

async fn send_with_retries(
    session: &Session,
    root: &Path,
    path: &RelPath,
    delta: bool,
    first: transfer::InFlight,
) -> Result<Done, String> {
    let mut flight = first;
    for attempt in 1..=FILE_ATTEMPTS {
        match flight.finish(session).await {
            Ok(sent) => return Ok(Done::File(sent)),
            Err(TransferError::Changed(_)) if attempt < FILE_ATTEMPTS => {
                tracing::debug!(%path, attempt, "file changed while sending; retrying");
                flight = match transfer::begin(session, root, path, delta).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Err(format!("{path}: vanished during reconcile")),
                    Err(e) => return Err(e.to_string()),
                };
            }
            Err(TransferError::Session(e)) if e.is_fatal() => return Err(format!("fatal: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    unreachable!("the last attempt returns")
}

async fn issue(
    session: &Arc<Session>,
    slots: &Arc<Semaphore>,
    tasks: &mut JoinSet<Result<Done, String>>,
    report: &mut Report,
    done: Done,
    make: impl FnOnce(u64) -> Message,
) -> Result<(), SessionError> {
    let permit = slots.clone().acquire_owned().await.expect("never closed");
    reap(tasks, report)?;
    let mut rx = session.start(make).await?;
    let session = session.clone();
    tasks.spawn(async move {
        let _permit = permit;
        match session.expect_ack(&mut rx).await {
            Ok(()) => Ok(done),
            Err(e) if e.is_fatal() => Err(format!("fatal: {e}")),
            Err(e) => Err(e.to_string()),
        }
    });
    Ok(())
}

fn record(report: &mut Report, r: Result<Done, String>) -> Result<(), SessionError> {
    match r {
        Ok(Done::Created) => report.created += 1,
        Ok(Done::Meta) => report.meta += 1,
        Ok(Done::Deleted) => report.deleted += 1,
        Ok(Done::File(sent)) => {
            report.files += 1;
            report.delta_files += sent.delta as u64;
            report.payload_bytes += sent.payload;
        }
        Err(e) => match e.strip_prefix("fatal: ") {
            Some(fatal) => return Err(SessionError::Lost(fatal.to_string())),
            None => {
                tracing::warn!("{e}");
                report.failures.push(e);
            }
        },
    }
    Ok(())
}

/// Collects finished tasks without waiting.
fn reap(
    tasks: &mut JoinSet<Result<Done, String>>,
    report: &mut Report,
) -> Result<(), SessionError> {
    while let Some(r) = tasks.try_join_next() {
        record(report, r.expect("task panicked"))?;
    }
    Ok(())
}

async fn drain(
    tasks: &mut JoinSet<Result<Done, String>>,
    report: &mut Report,
) -> Result<(), SessionError> {
    while let Some(r) = tasks.join_next().await {
        record(report, r.expect("task panicked"))?;
    }
    Ok(())
}
