//! The live sender: one watcher thread per sync group, one worker task per (group, target).
//!
//! A worker owns its connection and its [`Queue`]. It connects (retrying with capped
//! exponential backoff), runs a full reconcile, then drains its queue batch by batch: renames
//! first, then dirty paths, new directories compared as subtrees. A batch that fails because
//! the connection dropped goes back to the queue whole; requests are idempotent, so replaying
//! it is safe. Targets never wait for each other: each has its own queue and connection.

use crate::coalesce::Need;
use crate::config::{RsyncTarget, SyncGroup, Target, TargetKind};
use crate::plan::{Op, Plan};
use crate::queue::{Batch, Queue};
use crate::reconcile::{self, Report, Step, StepKind};
use crate::rsync::{self, Verdict};
use crate::session::{Session, SessionError};
use crate::watch::GroupWatcher;
use ferry_protocol::delta::DELTA_THRESHOLD;
use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::meta::Kind;
use ferry_protocol::{local, Entry, RelPath};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// First reconnect delay; doubles per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a batch in flight may take to finish after SIGTERM before it is abandoned.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often a worker logs its summary at info level (when it did something).
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Delay before a path that failed on the receiver is tried again; doubles per failure.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Sees what the daemon does; the `ferry` binary prints or logs it.
pub trait Observer: Send + Sync + 'static {
    /// The initial (or post-overflow) full reconcile of `group` on `target` finished.
    fn reconciled(&self, group: &str, target: &str, report: &Report) {
        let _ = (group, target, report);
    }
    /// One live change is durable on the receiver; `latency` runs from the first event on
    /// the path. Steps of a full reconcile are reported through `progress` instead.
    fn step(&self, group: &str, target: &str, step: &Step, latency: Option<Duration>) {
        let _ = (group, target, step, latency);
    }
    /// A full reconcile progressed: `done` steps so far.
    fn progress(&self, group: &str, target: &str, done: u64) {
        let _ = (group, target, done);
    }
}

/// An observer that only logs (the daemon's default).
pub struct LogObserver;

impl Observer for LogObserver {}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A sync group's source cannot be watched.
    #[error("sync {group}: cannot watch {source_dir}: {error}")]
    Watch {
        /// The group.
        group: String,
        /// Its source directory.
        source_dir: String,
        /// The cause.
        error: notify::Error,
    },
    /// An rsync target cannot run (the client binary is missing).
    #[error("target {target}: {message}")]
    Rsync {
        /// The target.
        target: String,
        /// What is wrong, naming the package to install.
        message: String,
    },
    /// A group names a target that does not exist.
    #[error("sync {group}: unknown target {target}")]
    UnknownTarget {
        /// The group.
        group: String,
        /// The missing target.
        target: String,
    },
}

/// Everything the daemon runs.
pub struct Daemon {
    /// Client identity.
    pub identity: Arc<Identity>,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Sync groups.
    pub syncs: Vec<SyncGroup>,
}

impl Daemon {
    /// Watches every group, reconciles every target, then follows changes until `shutdown`.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        observer: Arc<dyn Observer>,
    ) -> Result<(), DaemonError> {
        let mut watchers = Vec::new();
        let mut workers = tokio::task::JoinSet::new();
        for group in &self.syncs {
            let mut queues = Vec::new();
            let mut targets = Vec::new();
            for name in &group.targets {
                let target =
                    self.targets
                        .get(name)
                        .cloned()
                        .ok_or_else(|| DaemonError::UnknownTarget {
                            group: group.name.clone(),
                            target: name.clone(),
                        })?;
                if let TargetKind::Rsync(r) = &target.kind {
                    rsync::probe(r).map_err(|message| DaemonError::Rsync {
                        target: name.clone(),
                        message,
                    })?;
                }
                let queue = Queue::new();
                // The first batch of every worker is a full reconcile.
                queue.push([crate::coalesce::Change::Full]);
                queues.push(queue.clone());
                targets.push((target, queue));
            }
            // Watches first, so nothing changed during the reconcile is missed.
            let g = group.clone();
            let started = tokio::task::spawn_blocking(move || {
                GroupWatcher::start(g.clone(), g.timing, queues)
            })
            .await
            .expect("watcher start task");
            let watcher = started.map_err(|error| DaemonError::Watch {
                group: group.name.clone(),
                source_dir: group.source.display().to_string(),
                error,
            })?;
            watchers.push(watcher);
            for (target, queue) in targets {
                if let TargetKind::Rsync(rsync) = &target.kind {
                    let worker = RsyncWorker {
                        group: group.clone(),
                        rsync: rsync.clone(),
                        target,
                        queue,
                        observer: observer.clone(),
                        shutdown: shutdown.clone(),
                    };
                    workers.spawn(worker.run());
                    continue;
                }
                let worker = Worker {
                    group: group.clone(),
                    target,
                    queue,
                    identity: self.identity.clone(),
                    observer: observer.clone(),
                    shutdown: shutdown.clone(),
                    attempts: HashMap::new(),
                };
                workers.spawn(worker.run());
            }
        }
        while workers.join_next().await.is_some() {}
        for w in watchers {
            tokio::task::spawn_blocking(move || w.stop())
                .await
                .expect("watcher stop task");
        }
        Ok(())
    }
}

struct Worker {
    group: SyncGroup,
    target: Target,
    queue: Queue,
    identity: Arc<Identity>,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
    /// Failures per path, for retry backoff.
    attempts: HashMap<RelPath, u32>,
}

impl Worker {
    async fn run(mut self) {
        let mut session: Option<Arc<Session>> = None;
        let mut backoff = MIN_BACKOFF;
        let mut summary = Report::default();
        let mut last_summary = Instant::now();
        loop {
            if !has_work(&self.queue, &self.shutdown).await {
                break;
            }
            let s = match &session {
                Some(s) => s.clone(),
                None => match self.connect().await {
                    Some(Ok(s)) => {
                        if backoff > MIN_BACKOFF {
                            tracing::info!(sync = %self.group.name, target = %self.target.name, "reconnected");
                        }
                        backoff = MIN_BACKOFF;
                        let s = Arc::new(s);
                        session = Some(s.clone());
                        s
                    }
                    Some(Err(e)) => {
                        tracing::warn!(
                            sync = %self.group.name,
                            target = %self.target.name,
                            pending = self.queue.len(),
                            retry_in_ms = backoff.as_millis() as u64,
                            "cannot connect: {e}"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.shutdown.cancelled() => break,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    None => break,
                },
            };
            let batch = self.queue.take();
            let outcome = finish_or_abandon(self.process(&s, &batch), &self.shutdown).await;
            match outcome {
                Some(Ok(report)) => {
                    self.retry_failed(&report);
                    summary.absorb(report);
                    if last_summary.elapsed() >= SUMMARY_EVERY {
                        self.log_summary(&summary, last_summary.elapsed());
                        summary = Report::default();
                        last_summary = Instant::now();
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        sync = %self.group.name,
                        target = %self.target.name,
                        "connection lost, keeping {} pending changes: {e}",
                        batch.len()
                    );
                    self.queue.put_back(batch);
                    session = None;
                }
                None => {
                    tracing::warn!(
                        sync = %self.group.name,
                        target = %self.target.name,
                        "shutdown: abandoned a batch of {} changes (nothing half-written is \
                         kept by the receiver)",
                        batch.len()
                    );
                    session = None;
                    break;
                }
            }
        }
        if summary.steps() > 0 {
            self.log_summary(&summary, last_summary.elapsed());
        }
        if let Some(s) = session.and_then(|s| Arc::try_unwrap(s).ok()) {
            s.close().await;
        }
    }

    fn log_summary(&self, r: &Report, over: Duration) {
        tracing::info!(
            sync = %self.group.name,
            target = %self.target.name,
            files = r.files,
            delta_files = r.delta_files,
            created = r.created,
            meta = r.meta,
            deleted = r.deleted,
            renamed = r.renamed,
            payload_bytes = r.payload_bytes,
            failures = r.failures.len(),
            seconds = over.as_secs(),
            "synced"
        );
    }

    /// Connects; `None` if shut down meanwhile.
    async fn connect(&self) -> Option<Result<Session, SessionError>> {
        let fingerprint = self.target.fingerprint().expect("ferry target");
        let connect = Session::connect(
            &self.target.address,
            fingerprint,
            &self.identity,
            &self.group.module,
            Intent::Write,
        );
        tokio::select! {
            r = connect => Some(r),
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Paths the receiver refused are tried again later, with growing delays.
    fn retry_failed(&mut self, report: &Report) {
        for path in &report.failed {
            let n = self.attempts.entry(path.clone()).or_insert(0);
            *n += 1;
            let delay = (RETRY_AFTER * 2u32.saturating_pow((*n - 1).min(6))).min(MAX_BACKOFF);
            let (queue, path) = (self.queue.clone(), path.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.push([crate::coalesce::Change::Path {
                    path,
                    need: Need::Tree,
                    since: Instant::now(),
                }]);
            });
        }
        // Counts persist so a path that keeps failing backs off to the cap; forget them all
        // rather than grow without bound.
        if self.attempts.len() > 10_000 {
            self.attempts.clear();
        }
    }

    async fn process(&self, session: &Arc<Session>, batch: &Batch) -> Result<Report, SessionError> {
        let started = Instant::now();
        let sent_before = session.bytes_sent();
        let mut report = Report::default();
        let (group, target) = (self.group.name.as_str(), self.target.name.as_str());
        let observer = self.observer.clone();
        let since = &batch.paths;
        let renamed_since: HashMap<&RelPath, Instant> =
            batch.renames.iter().map(|r| (&r.from, r.since)).collect();
        let mut done = 0u64;
        let mut last_progress = Instant::now();
        let full = batch.full;
        let mut observe = |step: &Step| {
            let latency = match &step.kind {
                StepKind::Renamed(_) => renamed_since.get(&step.path).map(|t| t.elapsed()),
                _ => first_event(since, &step.path).map(|t| t.elapsed()),
            };
            tracing::debug!(
                sync = group,
                target,
                op = ?step.kind,
                path = %step.path,
                bytes = step.bytes,
                latency_ms = latency.map(|l| l.as_secs_f64() * 1e3),
                "synced"
            );
            done += 1;
            if !full {
                observer.step(group, target, step, latency);
            } else if last_progress.elapsed() >= crate::watch::PROGRESS_EVERY {
                last_progress = Instant::now();
                tracing::info!(sync = group, target, done, "reconcile progress");
                observer.progress(group, target, done);
            }
        };

        // Renames first: later dirty paths are recorded under the new names. Without
        // `delete`, the old name must stay, so a rename is sent as a copy.
        let mut extra = Batch::default();
        let mut dirs_touched: BTreeSet<RelPath> = BTreeSet::new();
        if !batch.renames.is_empty() {
            if self.group.delete {
                let pairs = batch
                    .renames
                    .iter()
                    .map(|r| (r.from.clone(), r.to.clone()))
                    .collect();
                let refused =
                    reconcile::rename_all(session, pairs, &mut report, &mut observe).await?;
                for r in &batch.renames {
                    dirs_touched.extend(r.from.parent());
                    dirs_touched.extend(r.to.parent());
                    if r.dir {
                        // Watches on a moved directory are re-placed after the move; compare
                        // it to catch anything written in between (nothing is sent if equal).
                        extra.mark(r.to.clone(), Need::Tree, r.since);
                    }
                }
                for (from, to) in refused {
                    extra.mark(from, Need::Content, Instant::now());
                    extra.mark(to, Need::Tree, Instant::now());
                }
            } else {
                for r in &batch.renames {
                    extra.mark(r.to.clone(), Need::Tree, r.since);
                }
            }
        }

        if full {
            let r =
                reconcile::reconcile_under(session, &self.group, &RelPath::root(), &mut observe)
                    .await?;
            report.absorb(r);
            report.elapsed = started.elapsed();
            self.observer.reconciled(group, target, &report);
            tracing::info!(
                sync = group,
                target,
                files = report.files,
                deleted = report.deleted,
                failures = report.failures.len(),
                elapsed_ms = report.elapsed.as_millis() as u64,
                "reconciled"
            );
            return Ok(report);
        }

        let mut paths: Vec<(RelPath, Need)> = batch
            .paths
            .iter()
            .chain(extra.paths.iter())
            .map(|(p, (n, _))| (p.clone(), *n))
            .collect();
        paths.sort_by(|a, b| a.0.tree_cmp(&b.0).then(b.1.cmp(&a.1)));
        paths.dedup_by(|later, earlier| later.0 == earlier.0);
        let root = self.group.source.clone();
        let read = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .map(|(p, n)| {
                    let e = local::read_entry(&root, &p);
                    (p, n, e)
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("stat task");

        let mut plan = Plan::default();
        let mut trees: Vec<RelPath> = Vec::new();
        let mut covered: Option<RelPath> = None;
        for (path, need, entry) in read {
            if covered.as_ref().is_some_and(|c| path.starts_with(c)) {
                continue;
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(sync = group, path = %path, "cannot read: {e}");
                    report.failures.push(format!("{path}: {e}"));
                    continue;
                }
            };
            match entry {
                None => {
                    if self.group.delete && !path.is_root() {
                        dirs_touched.extend(path.parent());
                        plan.deletes.push(path.clone());
                        covered = Some(path);
                    }
                }
                Some(e) if e.meta.kind == Kind::Dir => {
                    if need >= Need::Content {
                        dirs_touched.extend(path.parent());
                        trees.push(path.clone());
                        covered = Some(path);
                    } else {
                        plan.dir_meta.push(e);
                    }
                }
                Some(e) => {
                    if need == Need::Meta {
                        plan.creates.push(Op::SetMeta(e));
                        continue;
                    }
                    dirs_touched.extend(path.parent());
                    let op = match e.meta.kind {
                        Kind::File => Op::File {
                            delta: e.meta.size >= DELTA_THRESHOLD,
                            entry: e,
                        },
                        Kind::Symlink => Op::Symlink(e),
                        Kind::Fifo => Op::Special(e),
                        _ if session.privileged => Op::Special(e),
                        _ => continue,
                    };
                    plan.creates.push(op);
                }
            }
        }
        for tree in trees {
            let sub = reconcile::plan_under(session, &self.group, &tree, &mut report).await?;
            plan.deletes.extend(sub.deletes);
            plan.creates.extend(sub.creates);
            plan.dir_meta.extend(sub.dir_meta);
        }
        // Parents whose entries changed get their times back, after their contents.
        let have: BTreeSet<RelPath> = plan.dir_meta.iter().map(|e| e.path.clone()).collect();
        let root = self.group.source.clone();
        let missing: Vec<RelPath> = dirs_touched
            .into_iter()
            .filter(|d| !have.contains(d))
            .collect();
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
        plan.dir_meta.sort_by(|a, b| {
            b.path
                .depth()
                .cmp(&a.path.depth())
                .then(a.path.tree_cmp(&b.path))
        });
        plan.dir_meta.dedup_by(|a, b| a.path == b.path);
        reconcile::execute(session, &self.group.source, plan, &mut report, &mut observe).await?;
        report.bytes_sent = session.bytes_sent() - sent_before;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

/// Drives a stock rsyncd module with the `rsync` client: one rsync at a time, fed from the
/// same kind of queue as a native target.
struct RsyncWorker {
    group: SyncGroup,
    target: Target,
    rsync: RsyncTarget,
    queue: Queue,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
}

impl RsyncWorker {
    async fn run(self) {
        let (group, target) = (self.group.name.as_str(), self.target.name.as_str());
        let mut backoff = MIN_BACKOFF;
        let mut batches = 0u64;
        let mut paths = 0usize;
        let mut last_summary = Instant::now();
        loop {
            if !has_work(&self.queue, &self.shutdown).await {
                break;
            }
            let batch = self.queue.take();
            let started = Instant::now();
            let work = async {
                if batch.full {
                    (
                        rsync::full(&self.group, &self.rsync, &self.target.address).await,
                        0,
                    )
                } else {
                    rsync::batch(&self.group, &self.rsync, &self.target.address, &batch).await
                }
            };
            let outcome = finish_or_abandon(work, &self.shutdown).await;
            let Some((verdict, listed)) = outcome else {
                // rsync is killed with its future; it writes to temp names, so nothing
                // half-written is left under a real name.
                self.queue.put_back(batch);
                tracing::warn!(sync = group, target, "shutdown: interrupted rsync");
                break;
            };
            match verdict {
                Verdict::Done => {
                    backoff = MIN_BACKOFF;
                    if batch.full {
                        let report = Report {
                            elapsed: started.elapsed(),
                            ..Report::default()
                        };
                        self.observer.reconciled(group, target, &report);
                        tracing::info!(
                            sync = group,
                            target,
                            elapsed_ms = report.elapsed.as_millis() as u64,
                            "reconciled (rsync -a)"
                        );
                    } else {
                        batches += 1;
                        paths += listed;
                        tracing::debug!(
                            sync = group,
                            target,
                            paths = listed,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "synced (rsync --files-from)"
                        );
                    }
                }
                Verdict::Partial(msg) | Verdict::Transient(msg) => {
                    tracing::warn!(
                        sync = group,
                        target,
                        pending = batch.len() + self.queue.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "rsync failed, will retry: {msg}"
                    );
                    self.queue.put_back(batch);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Verdict::Config(msg) => {
                    self.queue.put_back(batch);
                    tracing::error!(
                        sync = group,
                        target,
                        module = %self.group.module,
                        "target stopped: {msg}. Fix the target's configuration and restart                          ferry; other targets continue"
                    );
                    return;
                }
            }
            if batches > 0 && last_summary.elapsed() >= SUMMARY_EVERY {
                tracing::info!(sync = group, target, batches, paths, "synced (rsync)");
                (batches, paths, last_summary) = (0, 0, Instant::now());
            }
        }
    }
}

/// Runs `work` to completion; once `shutdown` is cancelled it gets [`SHUTDOWN_GRACE`] more,
/// after which it is dropped (abandoned) and `None` returned.
async fn finish_or_abandon<F: std::future::Future>(
    work: F,
    shutdown: &CancellationToken,
) -> Option<F::Output> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => Some(r),
        _ = shutdown.cancelled() => tokio::time::timeout(SHUTDOWN_GRACE, &mut work).await.ok(),
    }
}

/// Waits until `queue` holds work; false once `shutdown` is cancelled.
async fn has_work(queue: &Queue, shutdown: &CancellationToken) -> bool {
    while queue.is_empty() {
        tokio::select! {
            _ = queue.wait() => {}
            _ = shutdown.cancelled() => return false,
        }
    }
    !shutdown.is_cancelled()
}

/// When the first event on `path` (or the nearest ancestor that was dirty) arrived.
fn first_event(paths: &HashMap<RelPath, (Need, Instant)>, path: &RelPath) -> Option<Instant> {
    let mut p = Some(path.clone());
    while let Some(q) = p {
        if let Some((_, t)) = paths.get(&q) {
            return Some(*t);
        }
        p = q.parent();
    }
    None
}
