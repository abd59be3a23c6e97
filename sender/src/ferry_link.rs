//! The ferry transport of a worker: a session on the receiver's module, opened through a
//! [`Dial`] (TLS to a configured target, or in memory in tests), each batch sent by
//! [`crate::batch::send_batch`] with what the worker learned from earlier ones, and the
//! batch's steps reported to the log and the [`Observer`].

use crate::batch::{send_batch, Learned};
use crate::config::{SyncGroup, Target};
use crate::execute::{Report, Step, StepKind, Totals, Watch};
use crate::guard::DeleteTally;
use crate::links::Names;
use crate::queue::Batch;
use crate::session::{Session, SessionError};
use crate::timing::now;
use crate::worker::{Observer, Outcome, Transport};
use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::RelPath;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens a session on the target's module: over TLS for a configured target
/// ([`FerryLink::new`]), or however a test likes (an in-memory receiver, one that is down).
pub type Dial = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Session, SessionError>> + Send>>
        + Send
        + Sync,
>;

/// A ferry target: a session on the receiver's module.
pub struct FerryLink {
    /// The group it serves.
    pub group: SyncGroup,
    /// The target's name, for logs.
    pub name: String,
    /// How a session is opened.
    pub dial: Dial,
    /// Who sees each step.
    pub observer: Arc<dyn Observer>,
    session: Option<Arc<Session>>,
    learned: Learned,
    /// The operator confirmed held deletions: the next whole compare applies them.
    confirm: bool,
}

impl FerryLink {
    /// A link to the configured `target`, not yet connected.
    pub fn new(
        group: SyncGroup,
        target: Target,
        identity: Arc<Identity>,
        links: Names,
        observer: Arc<dyn Observer>,
    ) -> FerryLink {
        let module = group.module.clone();
        let name = target.name.clone();
        // The gateway that took the last session is tried first next time.
        let last = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dial: Dial = Arc::new(move || {
            let (target, identity, module) = (target.clone(), identity.clone(), module.clone());
            let last = last.clone();
            Box::pin(async move {
                let first = last.load(std::sync::atomic::Ordering::Relaxed);
                let (session, i) = target
                    .connect_from(&identity, &module, Intent::Write, first)
                    .await?;
                last.store(i, std::sync::atomic::Ordering::Relaxed);
                Ok(session)
            })
        });
        FerryLink::with_dial(group, name, dial, links, observer)
    }

    /// A link that opens its sessions with `dial`; `links` is the group's knowledge of its
    /// multiply-linked files (shared by its targets).
    pub fn with_dial(
        group: SyncGroup,
        name: String,
        dial: Dial,
        links: Names,
        observer: Arc<dyn Observer>,
    ) -> FerryLink {
        FerryLink {
            group,
            name,
            dial,
            observer,
            session: None,
            learned: Learned {
                links,
                tally: DeleteTally::default(),
                holding: None,
                mass_said: false,
            },
            confirm: false,
        }
    }
}

impl Transport for FerryLink {
    async fn connect(&mut self) -> Result<bool, String> {
        if self.session.is_some() {
            return Ok(false);
        }
        let s = (self.dial)().await.map_err(|e| e.to_string())?;
        self.session = Some(Arc::new(s));
        Ok(true)
    }

    fn gateway(&self) -> Option<String> {
        self.session.as_ref().map(|s| s.address().to_string())
    }

    fn lost(&self) -> impl Future<Output = String> + Send {
        let session = self.session.clone();
        async move {
            match session {
                Some(s) => s.lost().await,
                None => std::future::pending().await,
            }
        }
    }

    async fn send(&mut self, batch: &Batch) -> Outcome {
        let Some(session) = self.session.clone() else {
            return Outcome::Lost("not connected".into());
        };
        let started = Instant::now();
        let sent_before = session.bytes_sent();
        let (group, target) = (self.group.name.as_str(), self.name.as_str());
        let full = batch.full;
        let mut observe = BatchWatch {
            group,
            target,
            observer: &self.observer,
            batch,
            renamed_since: batch.renames.iter().map(|r| (&r.from, r.since)).collect(),
            done: Totals::default(),
            planned: Totals::default(),
            counting: false,
            last_log: now(),
            progress_every: self.group.timing.progress_every,
        };
        let mut report = Report::default();
        // An operator confirmed the held deletions: the next whole compare deletes past the
        // guard, once.
        let confirmed = (self.confirm && full).then(|| {
            let mut g = self.group.clone();
            g.guard.confirmed = true;
            g
        });
        let sent = send_batch(
            &session,
            confirmed.as_ref().unwrap_or(&self.group),
            &mut self.learned,
            batch,
            &mut report,
            &mut observe,
        )
        .await;
        match sent {
            Ok(()) => {
                if confirmed.is_some() {
                    self.confirm = false;
                    tracing::warn!(
                        sync = group,
                        target,
                        deleted = report.deleted,
                        "held deletions confirmed by the operator: applied"
                    );
                }
            }
            Err(e) if e.is_fatal() => return Outcome::Lost(e.to_string()),
            // The batch as a whole failed, but the connection is fine (the source root went
            // away mid-batch, the receiver refused a listing): back off, keep the work.
            Err(e) => return Outcome::Retry(e.to_string()),
        }
        report.bytes_sent = session.bytes_sent() - sent_before;
        report.elapsed = started.elapsed();
        if full {
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
        }
        Outcome::Done(Box::new(report))
    }

    fn confirm_deletes(&mut self) {
        self.confirm = true;
    }

    fn disconnect(&mut self) {
        self.session = None;
    }

    async fn close(self) {
        if let Some(s) = self.session {
            s.close().await;
        }
    }
}

/// Where the steps of one batch go: the debug log and the observer (live steps one by one, a
/// whole compare as progress against its plan, logged every [`Timing::progress_every`]).
struct BatchWatch<'a> {
    group: &'a str,
    target: &'a str,
    observer: &'a Arc<dyn Observer>,
    batch: &'a Batch,
    renamed_since: HashMap<&'a RelPath, Instant>,
    done: Totals,
    planned: Totals,
    /// The planned totals may still grow ([`Watch::whole`]).
    counting: bool,
    last_log: Instant,
    progress_every: Duration,
}

impl Watch for BatchWatch<'_> {
    fn planned(&mut self, totals: Totals) {
        if self.batch.full {
            self.planned.steps += totals.steps;
            self.planned.bytes += totals.bytes;
            self.observer.planned(self.group, self.target, self.planned);
        }
    }

    fn whole(&mut self, whole: bool) {
        self.counting = !whole;
        if self.batch.full {
            self.observer.whole(self.group, self.target, whole);
        }
    }

    fn missed(&mut self, bytes: u64) {
        if self.batch.full {
            self.done.steps += 1;
            self.done.bytes += bytes;
            self.observer.progress(self.group, self.target, self.done);
        }
    }

    fn step(&mut self, step: &Step) {
        let (group, target) = (self.group, self.target);
        let latency = match &step.kind {
            StepKind::Renamed(_) => self.renamed_since.get(&step.path).map(|t| t.elapsed()),
            _ => first_event(&self.batch.paths, &step.path).map(|t| t.elapsed()),
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
        if !self.batch.full {
            self.observer.step(group, target, step, latency);
            return;
        }
        self.done.add(step);
        self.observer.progress(group, target, self.done);
        if now().duration_since(self.last_log) >= self.progress_every {
            self.last_log = now();
            tracing::info!(
                sync = group,
                target,
                done = self.done.steps,
                of = self.planned.steps,
                bytes = self.done.bytes,
                of_bytes = self.planned.bytes,
                counting = self.counting,
                "reconcile progress"
            );
        }
    }
}

/// When the first event on `path` (or the nearest ancestor that was dirty) arrived.
fn first_event(
    paths: &BTreeMap<RelPath, (crate::coalesce::Need, Instant)>,
    path: &RelPath,
) -> Option<Instant> {
    let mut p = Some(path.clone());
    while let Some(q) = p {
        if let Some((_, t)) = paths.get(&q) {
            return Some(*t);
        }
        p = q.parent();
    }
    None
}
