//! One worker per (sync group, target): the one loop that drains a target's [`Queue`] batch by
//! batch over a [`Transport`] — a ferry session ([`FerryLink`]) or the rsync client
//! ([`crate::rsync::RsyncLink`]).
//!
//! The loop: wait for work (or a retry falling due), connect (retrying with one [`Backoff`]),
//! take a batch, send it; a batch that fails as a whole goes back to the queue (requests are
//! idempotent, so replaying it is safe), per-path failures are settled into the queue's retry
//! set. On shutdown the batch in flight gets [`Timing::shutdown_grace`] to finish. Targets never wait
//! for each other: each has its own queue, worker and connection.

use crate::config::SyncGroup;
use crate::execute::{Report, Step, Totals};
use crate::queue::{Batch, Queue};
use crate::status::{State, Tracker};
use crate::timing::{now, Timing};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use crate::ferry_link::{Dial, FerryLink};

/// Sees what the daemon does; the `ferry` binary prints or logs it.
pub trait Observer: Send + Sync + 'static {
    /// Every group is watched and every worker started (its first batch is the initial
    /// reconcile): the daemon is ready.
    fn ready(&self) {}
    /// The initial (or post-overflow) full reconcile of `group` on `target` finished.
    fn reconciled(&self, group: &str, target: &str, report: &Report) {
        let _ = (group, target, report);
    }
    /// One live change is durable on the receiver; `latency` runs from the first event on
    /// the path. Steps of a full reconcile are reported through `progress` instead.
    fn step(&self, group: &str, target: &str, step: &Step, latency: Option<Duration>) {
        let _ = (group, target, step, latency);
    }
    /// A full reconcile of `group` on `target` is about to do what `totals` says (so far: a
    /// copy into an empty module plans in pieces, and the totals grow with each).
    fn planned(&self, group: &str, target: &str, totals: Totals) {
        let _ = (group, target, totals);
    }
    /// Whether the totals of a full reconcile of `group` on `target` said so far are all
    /// there will be ([`crate::execute::Watch::whole`]: a copy into an empty module says
    /// `false` while its walk has more to read).
    fn whole(&self, group: &str, target: &str, whole: bool) {
        let _ = (group, target, whole);
    }
    /// A full reconcile progressed: `done` so far, after each acknowledged step.
    fn progress(&self, group: &str, target: &str, done: Totals) {
        let _ = (group, target, done);
    }
}

/// An observer that only logs (the daemon's default).
pub struct LogObserver;

impl Observer for LogObserver {}

/// Capped exponential backoff ([`Timing::min_backoff`] doubling to [`Timing::max_backoff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(&Timing::default())
    }
}

impl Backoff {
    /// A backoff on `timing`'s delays.
    pub fn new(timing: &Timing) -> Backoff {
        Backoff {
            next: timing.min_backoff,
            min: timing.min_backoff,
            max: timing.max_backoff,
        }
    }

    /// The delay to wait now; the one after it is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// True if the last attempts failed.
    pub fn failing(&self) -> bool {
        self.next > self.min
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// How a batch ended.
#[derive(Debug)]
pub enum Outcome {
    /// Sent; the report's failures are retried later, path by path.
    Done(Box<Report>),
    /// The connection was lost: put the batch back and reconnect.
    Lost(String),
    /// The whole batch failed for a passing reason: put it back and back off.
    Retry(String),
    /// The target cannot work as configured: put the batch back and stop this worker.
    Stop(String),
}

/// The last hop of a worker: how a batch reaches the target.
pub trait Transport: Send {
    /// Makes sure a connection is open; `Ok(true)` if one was just opened.
    fn connect(&mut self) -> impl Future<Output = Result<bool, String>> + Send;
    /// Sends one batch.
    fn send(&mut self, batch: &Batch) -> impl Future<Output = Outcome> + Send;
    /// The operator confirmed the deletions the guard holds: the next whole compare (which
    /// the confirmation queued) may delete past the guard, once.
    fn confirm_deletes(&mut self);
    /// Drops the connection (it failed, or a batch was abandoned).
    fn disconnect(&mut self);
    /// The address of the receiver (the gateway) the open connection goes to.
    fn gateway(&self) -> Option<String> {
        None
    }
    /// Resolves, with why, when the open connection is gone while nothing is being sent
    /// (closed by the peer, failed, or silent past its liveness window); never for a
    /// transport that holds no connection between batches.
    fn lost(&self) -> impl Future<Output = String> + Send;
    /// Closes the connection cleanly at shutdown.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// One (group, target) worker.
pub struct Worker<T> {
    /// The group's name, for logs.
    pub group: String,
    /// The target's name, for logs.
    pub target: String,
    /// The group's source directory: while it is missing, nothing is sent.
    pub source: PathBuf,
    /// Where its work comes from.
    pub queue: Queue,
    /// The last hop.
    pub transport: T,
    /// Stops the loop.
    pub shutdown: CancellationToken,
    /// Where its state is shown.
    pub status: Tracker,
    /// Its delays (the group's).
    pub timing: Timing,
}

impl<T: Transport> Worker<T> {
    /// A worker for `group` on `target`.
    pub fn new(
        group: &SyncGroup,
        target: String,
        queue: Queue,
        transport: T,
        shutdown: CancellationToken,
        status: Tracker,
    ) -> Self {
        Worker {
            group: group.name.clone(),
            target,
            source: group.source.clone(),
            queue,
            transport,
            shutdown,
            status,
            timing: group.timing,
        }
    }

    /// Drains the queue until shutdown (or until the target turns out unusable).
    pub async fn run(mut self) {
        let (group, target) = (self.group.clone(), self.target.clone());
        let (group, target) = (group.as_str(), target.as_str());
        let timing = self.timing;
        let mut backoff = Backoff::new(&timing);
        let mut paused = false;
        let mut summary = Report::default();
        let mut last_summary = now();
        let mut last_release = now();
        let mut confirmations = self.status.confirmations();
        // The connection went while idle and is not open again: reconnect (on the backoff)
        // without waiting for work, so the status says what is true.
        let mut reconnect = false;
        loop {
            if !reconnect {
                let lost = tokio::select! {
                    more = wait_for_work(&self.queue, &self.shutdown) => {
                        if !more {
                            break;
                        }
                        None
                    }
                    why = self.transport.lost() => Some(why),
                };
                if let Some(why) = lost {
                    self.status
                        .fail(State::Retrying, &format!("connection lost: {why}"));
                    tracing::warn!(sync = group, target, "connection lost while idle: {why}");
                    self.transport.disconnect();
                    reconnect = true;
                }
            }
            // `ferry confirm-deletes`: it queued a whole compare; the transport applies it
            // past the guard.
            let confirmed = self.status.confirmations();
            if confirmed != confirmations {
                confirmations = confirmed;
                self.transport.confirm_deletes();
            }
            // A missing source (unmounted disk, removed directory) pauses the group: sending
            // from it would delete the backup. One error, then a quiet re-check.
            match source_missing(&self.source).await {
                Some(why) => {
                    self.status.fail(
                        State::Paused,
                        &format!("source {}: {why}", self.source.display()),
                    );
                    if !paused {
                        tracing::error!(
                            sync = group,
                            target,
                            "source {}: {why}; nothing is sent until it is back (checking \
                             every {} s)",
                            self.source.display(),
                            timing.source_recheck.as_secs()
                        );
                        paused = true;
                    }
                    if !sleep_unless_shutdown(timing.source_recheck, &self.shutdown).await {
                        break;
                    }
                    continue;
                }
                None if paused => {
                    tracing::info!(sync = group, target, "source is back; resuming");
                    paused = false;
                }
                None => {}
            }
            let connected = tokio::select! {
                c = self.transport.connect() => c,
                _ = self.shutdown.cancelled() => break,
            };
            match connected {
                Ok(fresh) => {
                    reconnect = false;
                    self.status.set(State::Connected, None);
                    if fresh {
                        if let Some(gateway) = self.transport.gateway() {
                            tracing::info!(sync = group, target, %gateway, "connected");
                            self.status.gateway(gateway);
                        }
                    }
                    if fresh && backoff.failing() {
                        tracing::info!(sync = group, target, "reconnected");
                        // The receiver (or its disk) is back: what failed goes again now.
                        self.queue.retry_now(now());
                        backoff.reset();
                    }
                }
                Err(e) => {
                    self.status
                        .fail(State::Retrying, &format!("cannot connect: {e}"));
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        sync = group,
                        target,
                        pending = self.queue.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect: {e}"
                    );
                    if !sleep_unless_shutdown(delay, &self.shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            let batch = self.queue.take(now());
            if batch.is_empty() {
                continue;
            }
            let Some(outcome) = finish_or_abandon(
                self.transport.send(&batch),
                &self.shutdown,
                timing.shutdown_grace,
            )
            .await
            else {
                let what = if batch.full {
                    "the whole-tree compare in flight".to_string()
                } else {
                    format!("a batch of {} changes", batch.len())
                };
                tracing::warn!(
                    sync = group,
                    target,
                    "shutdown: abandoned {what}; it is sent again at the next start (nothing \
                     half-written is kept by the receiver)"
                );
                self.queue.put_back(batch);
                self.transport.disconnect();
                break;
            };
            match outcome {
                Outcome::Done(report) => {
                    backoff.reset();
                    self.status.sent(&report, batch.full);
                    self.queue.settle(&batch, &report.failed_paths(), now());
                    summary.absorb(*report);
                    if batch.full
                        || (self.queue.is_empty()
                            && now().duration_since(last_release) >= timing.release_every)
                    {
                        ferry_protocol::release_free_memory();
                        last_release = now();
                    }
                    let since = now().duration_since(last_summary);
                    if since >= timing.summary_every {
                        log_summary(group, target, &summary, since);
                        summary = Report::default();
                        last_summary = now();
                    }
                }
                Outcome::Lost(e) => {
                    self.status
                        .fail(State::Retrying, &format!("connection lost: {e}"));
                    tracing::warn!(
                        sync = group,
                        target,
                        "connection lost, keeping {} pending changes: {e}",
                        batch.len()
                    );
                    self.queue.put_back(batch);
                    self.transport.disconnect();
                }
                Outcome::Retry(e) => {
                    self.status.fail(State::Retrying, &e);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        sync = group,
                        target,
                        pending = batch.len() + self.queue.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "failed, will retry: {e}"
                    );
                    self.queue.put_back(batch);
                    if !sleep_unless_shutdown(delay, &self.shutdown).await {
                        break;
                    }
                }
                Outcome::Stop(e) => {
                    self.status.fail(State::Stopped, &e);
                    self.queue.put_back(batch);
                    tracing::error!(
                        sync = group,
                        target,
                        "target stopped: {e}; other targets continue"
                    );
                    return;
                }
            }
        }
        self.transport.close().await;
    }
}

fn log_summary(group: &str, target: &str, r: &Report, over: Duration) {
    if r.steps() == 0 && r.rsync_paths == 0 && r.failures.is_empty() {
        return;
    }
    tracing::info!(
        sync = group,
        target,
        files = r.files,
        delta_files = r.delta_files,
        created = r.created,
        meta = r.meta,
        deleted = r.deleted,
        renamed = r.renamed,
        rsync_paths = r.rsync_paths,
        payload_bytes = r.payload_bytes,
        failures = r.failures.len(),
        seconds = over.as_secs(),
        "synced"
    );
}

/// Runs `work` to completion; once `shutdown` is cancelled it gets `grace` more, after which
/// it is dropped (abandoned) and `None` returned.
pub async fn finish_or_abandon<F: Future>(
    work: F,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Option<F::Output> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => Some(r),
        _ = shutdown.cancelled() => tokio::time::timeout(grace, &mut work).await.ok(),
    }
}

/// Sleeps for `delay`; false if `shutdown` came first.
async fn sleep_unless_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Why `source` cannot be synced from, if it cannot.
async fn source_missing(source: &Path) -> Option<String> {
    let source = source.to_path_buf();
    let md = tokio::task::spawn_blocking(move || std::fs::metadata(source))
        .await
        .expect("stat task");
    match md {
        Ok(md) if md.is_dir() => None,
        Ok(_) => Some("not a directory".into()),
        Err(e) => Some(ferry_protocol::io_reason(&e)),
    }
}

/// Waits until `queue` has work ready; false once `shutdown` is cancelled.
async fn wait_for_work(queue: &Queue, shutdown: &CancellationToken) -> bool {
    while queue.is_idle(now()) {
        tokio::select! {
            _ = queue.wait() => {}
            _ = shutdown.cancelled() => return false,
        }
    }
    !shutdown.is_cancelled()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        assert!(!b.failing());
        let waits: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            waits,
            vec![250, 500, 1000, 2000, 4000, 5000, 5000, 5000, 5000, 5000]
        );
        assert!(b.failing());
        b.reset();
        assert_eq!(b.next_delay(), Timing::default().min_backoff);
    }
}
