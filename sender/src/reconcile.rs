//! One full reconcile of a sync group with one target: scan, list, plan, execute.

use crate::config::SyncGroup;
use crate::plan::{plan, Op, Plan, PlanOptions};
use crate::session::{Session, SessionError};
use crate::transfer::{self, TransferError};
use ferry_protocol::local;
use ferry_protocol::message::{Message, RequestId};
use ferry_protocol::meta::{Compare, Entry};
use ferry_protocol::RelPath;
use std::path::Path;
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
    /// Paths renamed.
    pub renamed: u64,
    /// File payload bytes (whole data plus deltas).
    pub payload_bytes: u64,
    /// Total bytes written to the connection.
    pub bytes_sent: u64,
    /// Per-path failures, as messages.
    pub failures: Vec<String>,
    /// The paths that failed (those a scan could not read are not listed).
    pub failed: Vec<RelPath>,
    /// Files that disappeared or changed type between planning and sending. Not failures
    /// for the daemon (the watcher reports what became of them), but a one-shot reconcile
    /// has not converged.
    pub vanished: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// True if every planned step succeeded.
    pub fn converged(&self) -> bool {
        self.failures.is_empty() && self.vanished == 0
    }

    /// Adds `other`'s counts to these.
    pub fn absorb(&mut self, other: Report) {
        self.files += other.files;
        self.delta_files += other.delta_files;
        self.created += other.created;
        self.meta += other.meta;
        self.deleted += other.deleted;
        self.renamed += other.renamed;
        self.payload_bytes += other.payload_bytes;
        self.bytes_sent += other.bytes_sent;
        self.failures.extend(other.failures);
        self.failed.extend(other.failed);
        self.vanished += other.vanished;
        self.elapsed += other.elapsed;
    }

    /// Steps that changed something on the receiver.
    pub fn steps(&self) -> u64 {
        self.files + self.created + self.meta + self.deleted + self.renamed
    }
}

/// What one durable step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// File content sent whole.
    File,
    /// File content sent as a delta.
    Delta,
    /// Directory, symlink or special file created.
    Created,
    /// Metadata applied.
    Meta,
    /// Path deleted.
    Deleted,
    /// Path renamed to the given name.
    Renamed(RelPath),
}

/// One step the receiver acknowledged (so it is durable there).
#[derive(Debug, Clone)]
pub struct Step {
    /// What was done.
    pub kind: StepKind,
    /// To which path.
    pub path: RelPath,
    /// Payload bytes (files only).
    pub bytes: u64,
}

/// Called once per acknowledged step.
pub type Observe<'a> = &'a mut (dyn FnMut(&Step) + Send);

/// A step that failed.
#[derive(Debug)]
struct Failure {
    path: RelPath,
    error: String,
    fatal: bool,
    vanished: bool,
}

impl Failure {
    fn new(path: RelPath, error: String, fatal: bool) -> Failure {
        Failure {
            path,
            error,
            fatal,
            vanished: false,
        }
    }

    fn vanished(path: RelPath) -> Failure {
        Failure {
            error: format!("{path}: vanished or changed type while sending"),
            path,
            fatal: false,
            vanished: true,
        }
    }
}

/// Per-path errors of a tree walk.
pub type ScanErrors = Vec<(RelPath, std::io::Error)>;

/// Lists the local subtree at `under`, applying the group's excludes.
pub fn scan_source_under(
    group: &SyncGroup,
    under: &RelPath,
) -> std::io::Result<(Vec<Entry>, ScanErrors)> {
    let filter = |p: &RelPath, is_dir: bool| group.filter.accepts(p, is_dir);
    let mut errors = Vec::new();
    let entries = local::scan_from(&group.source, under, &filter, &mut errors)?;
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
    reconcile_under(session, group, &RelPath::root(), &mut |_| {}).await
}

/// Reconciles the subtree at `under` (the whole tree for the root): lists both sides, plans
/// and executes. A subtree missing locally is deleted on the receiver (if the group deletes).
pub async fn reconcile_under(
    session: &Arc<Session>,
    group: &SyncGroup,
    under: &RelPath,
    observe: Observe<'_>,
) -> Result<Report, SessionError> {
    let started = Instant::now();
    let sent_before = session.bytes_sent();
    let mut report = Report::default();
    let plan = plan_under(session, group, under, &mut report).await?;
    if under.is_root() {
        tracing::info!(
            sync = %group.name,
            target = %session.address(),
            deletes = plan.deletes.len(),
            updates = plan.creates.len(),
            "reconcile planned"
        );
    }
    execute(session, &group.source, plan, &mut report, observe).await?;
    report.bytes_sent = session.bytes_sent() - sent_before;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Lists the subtree at `under` on both sides and plans what makes the receiver's equal.
/// Local read errors land in `report`.
pub async fn plan_under(
    session: &Arc<Session>,
    group: &SyncGroup,
    under: &RelPath,
    report: &mut Report,
) -> Result<Plan, SessionError> {
    let g = group.clone();
    let start = under.clone();
    let remote = session.list(under);
    let local = tokio::task::spawn_blocking(move || scan_source_under(&g, &start));
    let (remote, local) = tokio::join!(remote, local);
    let remote = filter_remote(group, remote?);
    let (local, scan_errors) = match local.expect("scan task") {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !under.is_root() => {
            (Vec::new(), Vec::new())
        }
        Err(e) => {
            return Err(SessionError::Failed(format!(
                "{}: {e}",
                local::local_path(&group.source, under).display()
            )))
        }
    };
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
    Ok(plan(&local, &remote, opts))
}

type Outcome = Result<Step, Failure>;

/// Executes a plan with many requests in flight. Per-path failures land in the report;
/// a lost connection ends execution with an error. `observe` sees each acknowledged step.
pub async fn execute(
    session: &Arc<Session>,
    root: &Path,
    plan: Plan,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let mut run = Run {
        session,
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        tasks: JoinSet::new(),
        report,
        observe,
    };
    for path in plan.deletes {
        run.issue(StepKind::Deleted, path, |id, path| Message::Delete {
            id,
            path,
        })
        .await?;
    }
    let file_slots = Arc::new(Semaphore::new(MAX_FILES_IN_FLIGHT));
    for op in plan.creates {
        match op {
            Op::Delete(path) => {
                run.issue(StepKind::Deleted, path, |id, path| Message::Delete {
                    id,
                    path,
                })
                .await?
            }
            Op::Mkdir(e) => {
                run.issue(StepKind::Created, e.path, |id, path| Message::Mkdir {
                    id,
                    path,
                    meta: e.meta,
                })
                .await?
            }
            Op::Symlink(e) => {
                let target = e.link.unwrap_or_default();
                run.issue(StepKind::Created, e.path, |id, path| Message::Symlink {
                    id,
                    path,
                    target,
                    meta: e.meta,
                })
                .await?
            }
            Op::Special(e) => {
                run.issue(StepKind::Created, e.path, |id, path| Message::Special {
                    id,
                    path,
                    meta: e.meta,
                })
                .await?
            }
            Op::SetMeta(e) => {
                run.issue(StepKind::Meta, e.path, |id, path| Message::SetMeta {
                    id,
                    path,
                    meta: e.meta,
                })
                .await?
            }
            Op::File { entry, delta } => {
                let permit = file_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed");
                run.reap()?;
                let path = entry.path;
                match transfer::begin(session, root, &path, delta).await {
                    Ok(Some(flight)) => {
                        let session = session.clone();
                        let root = root.to_path_buf();
                        run.tasks.spawn(async move {
                            let _permit = permit;
                            send_with_retries(&session, &root, path, delta, flight).await
                        });
                    }
                    Ok(None) => run.record(Err(Failure::vanished(path)))?,
                    Err(TransferError::Session(e)) if e.is_fatal() => return Err(e),
                    Err(TransferError::Vanished(_)) => run.record(Err(Failure::vanished(path)))?,
                    Err(e) => run.record(Err(Failure::new(path, e.to_string(), false)))?,
                }
            }
        }
    }
    // Barrier: directory times only after everything inside them is durable.
    run.drain().await?;
    for e in plan.dir_meta {
        run.issue(StepKind::Meta, e.path, |id, path| Message::SetMeta {
            id,
            path,
            meta: e.meta,
        })
        .await?;
    }
    run.drain().await
}

/// Applies renames in order, pipelined. Returns the ones the receiver refused (typically
/// because it does not have the old name), for the caller to send as content instead.
pub async fn rename_all(
    session: &Arc<Session>,
    renames: Vec<(RelPath, RelPath)>,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<Vec<(RelPath, RelPath)>, SessionError> {
    let mut replies = Vec::with_capacity(renames.len());
    for (from, to) in renames {
        let rx = session
            .start(|id| Message::Rename {
                id,
                from: from.clone(),
                to: to.clone(),
            })
            .await?;
        replies.push((from, to, rx));
    }
    let mut refused = Vec::new();
    for (from, to, mut rx) in replies {
        match session.expect_ack(&mut rx).await {
            Ok(()) => {
                report.renamed += 1;
                observe(&Step {
                    kind: StepKind::Renamed(to),
                    path: from,
                    bytes: 0,
                });
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                tracing::debug!(%from, %to, "rename refused, sending content instead: {e}");
                refused.push((from, to));
            }
        }
    }
    Ok(refused)
}

async fn send_with_retries(
    session: &Session,
    root: &Path,
    path: RelPath,
    delta: bool,
    first: transfer::InFlight,
) -> Outcome {
    let mut flight = first;
    for attempt in 1..=FILE_ATTEMPTS {
        match flight.finish(session).await {
            Ok(sent) => {
                return Ok(Step {
                    kind: if sent.delta {
                        StepKind::Delta
                    } else {
                        StepKind::File
                    },
                    path,
                    bytes: sent.payload,
                })
            }
            Err(TransferError::Changed(_)) if attempt < FILE_ATTEMPTS => {
                tracing::debug!(%path, attempt, "file changed while sending; retrying");
                flight = match transfer::begin(session, root, &path, delta).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Err(Failure::vanished(path)),
                    Err(TransferError::Session(e)) if e.is_fatal() => {
                        return Err(Failure::new(path, e.to_string(), true))
                    }
                    Err(TransferError::Vanished(_)) => return Err(Failure::vanished(path)),
                    Err(e) => return Err(Failure::new(path, e.to_string(), false)),
                };
            }
            Err(TransferError::Session(e)) if e.is_fatal() => {
                return Err(Failure::new(path, e.to_string(), true))
            }
            Err(TransferError::Vanished(_)) => return Err(Failure::vanished(path)),
            Err(e) => return Err(Failure::new(path, e.to_string(), false)),
        }
    }
    unreachable!("the last attempt returns")
}

/// The moving parts of one [`execute`].
struct Run<'a, 'o> {
    session: &'a Arc<Session>,
    slots: Arc<Semaphore>,
    tasks: JoinSet<Outcome>,
    report: &'a mut Report,
    observe: Observe<'o>,
}

impl Run<'_, '_> {
    /// Sends one request and spawns the wait for its acknowledgement.
    async fn issue(
        &mut self,
        kind: StepKind,
        path: RelPath,
        make: impl FnOnce(RequestId, RelPath) -> Message,
    ) -> Result<(), SessionError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        self.reap()?;
        let mut rx = self.session.start(|id| make(id, path.clone())).await?;
        let session = self.session.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            match session.expect_ack(&mut rx).await {
                Ok(()) => Ok(Step {
                    kind,
                    path,
                    bytes: 0,
                }),
                Err(e) => Err(Failure::new(path, e.to_string(), e.is_fatal())),
            }
        });
        Ok(())
    }

    fn record(&mut self, outcome: Outcome) -> Result<(), SessionError> {
        let report = &mut *self.report;
        match outcome {
            Ok(step) => {
                match step.kind {
                    StepKind::Created => report.created += 1,
                    StepKind::Meta => report.meta += 1,
                    StepKind::Deleted => report.deleted += 1,
                    StepKind::Renamed(_) => report.renamed += 1,
                    StepKind::File | StepKind::Delta => {
                        report.files += 1;
                        report.delta_files += (step.kind == StepKind::Delta) as u64;
                        report.payload_bytes += step.bytes;
                    }
                }
                (self.observe)(&step);
            }
            Err(f) if f.fatal => return Err(SessionError::Lost(f.error)),
            Err(f) if f.vanished => {
                tracing::debug!(path = %f.path, "{}", f.error);
                report.vanished += 1;
            }
            Err(f) => {
                tracing::warn!(path = %f.path, target = %self.session.address(), "{}", f.error);
                report.failures.push(f.error);
                report.failed.push(f.path);
            }
        }
        Ok(())
    }

    /// Collects finished tasks without waiting.
    fn reap(&mut self) -> Result<(), SessionError> {
        while let Some(r) = self.tasks.try_join_next() {
            self.record(r.expect("task panicked"))?;
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), SessionError> {
        while let Some(r) = self.tasks.join_next().await {
            self.record(r.expect("task panicked"))?;
        }
        Ok(())
    }
}
