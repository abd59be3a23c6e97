//! Executing a plan over a session: every step of every path (full reconcile, subtree
//! compare, live batch) goes through [`execute`], with many requests in flight.
//!
//! Invariants: deletes go out first, then creations in tree order (parents before children);
//! directory times go out only after every earlier step is acknowledged, deepest first. A
//! per-path failure lands in the [`Report`] and never stops the others; only a lost
//! connection ends execution (with an error, so the caller can put the work back).

use crate::coalesce::Rename;
use crate::config::Preserve;
use crate::plan::{Base, Link, Op, Plan};
use crate::session::{Removal, Session, SessionError};
use crate::transfer::{self, Origin, TransferError};
use ferry_protocol::message::{Message, RequestId};
use ferry_protocol::meta::Entry;
use ferry_protocol::RelPath;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod report;
pub use report::{Held, Observe, Report, Step, StepKind, Totals, Watch};

/// Requests in flight per session.
pub const MAX_IN_FLIGHT: usize = 512;
/// File bodies being read and sent at once per session (each holds a descriptor and up to
/// a window of data); the receiver allows 64 begun and not ended.
pub const MAX_FILES_IN_FLIGHT: usize = 16;
/// Files sent and waiting for their `Ack` per session: the receiver makes them durable
/// together at its group commit, so many must be on their way for a commit to cover many.
pub const MAX_FILES_UNACKED: usize = 2048;
/// Attempts for a file that keeps changing while it is read.
pub const FILE_ATTEMPTS: usize = 3;

/// A step that did not succeed.
#[derive(Debug)]
enum Failure {
    /// The connection is gone: execution ends.
    Fatal(SessionError),
    /// The path vanished or changed type: its own event will say what became of it.
    Vanished(RelPath),
    /// The receiver refused it, or reading it failed (`true`): retried later.
    Path(RelPath, String, bool),
    /// A delete the receiver held back past the allowance; it would take at least this many
    /// entries.
    Held(RelPath, u64),
}

impl Failure {
    /// The one mapping from a transfer's error to what it means for the run.
    fn of_transfer(path: RelPath, e: TransferError) -> Failure {
        match e {
            TransferError::Session(e) if e.is_fatal() => Failure::Fatal(e),
            TransferError::Vanished(_) => Failure::Vanished(path),
            e @ TransferError::Read { .. } => match Failure::path(path, e) {
                Failure::Path(p, why, _) => Failure::Path(p, why, true),
                other => other,
            },
            e => Failure::path(path, e),
        }
    }

    /// A per-path failure; the reason loses the path the receiver put in front of it, so
    /// the path is said once.
    fn path(path: RelPath, e: impl std::fmt::Display) -> Failure {
        let text = e.to_string();
        let prefix = format!("{path}: ");
        let reason = text
            .strip_prefix(&prefix)
            .map_or(text.clone(), str::to_string);
        Failure::Path(path, reason, false)
    }
}

type Outcome = Result<Step, Failure>;

/// Executes a plan with many requests in flight, reading files beneath the source `root` the
/// plan was made under. Per-path failures land in the report; a lost connection ends
/// execution with an error. `observe` sees each acknowledged step.
pub async fn execute(
    session: &Arc<Session>,
    preserve: Preserve,
    origin: &Origin,
    plan: Plan,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<(), SessionError> {
    let mut run = Execution::new(session, preserve, origin, report, observe);
    let dir_meta = run.piece(plan).await?;
    run.finish(dir_meta).await
}

/// A plan executed in pieces (a whole copy, [`crate::descend::copy_into_empty`]) with
/// requests in flight across them: each piece's deletes and creations go out as it comes,
/// without waiting for the answers to the last piece's, so the receiver's commits never run
/// dry between two pieces. The pieces' links wait for [`Execution::finish`], which waits
/// for every answer first, as do the directory times given to it.
pub struct Execution<'a, 'o> {
    run: Run<'a, 'o>,
    links: Vec<Link>,
}

impl<'a, 'o> Execution<'a, 'o> {
    /// An execution over `session` of files read from `origin`.
    pub fn new(
        session: &'a Arc<Session>,
        preserve: Preserve,
        origin: &Origin,
        report: &'a mut Report,
        observe: Observe<'o>,
    ) -> Self {
        let run = Run {
            session,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            file_slots: Arc::new(Semaphore::new(MAX_FILES_IN_FLIGHT)),
            unacked: Arc::new(Semaphore::new(MAX_FILES_UNACKED)),
            origin: origin.clone(),
            preserve,
            tasks: JoinSet::new(),
            report,
            observe,
        };
        Execution {
            run,
            links: Vec::new(),
        }
    }

    /// Sends the deletes and creations of the next piece, keeping its links for the end.
    /// Returns the piece's directory times, for the caller to order with the others'.
    pub async fn piece(&mut self, plan: Plan) -> Result<Vec<Entry>, SessionError> {
        self.run.observe.planned(Totals::of(&plan));
        let Plan {
            deletes,
            creates,
            mut links,
            dir_meta,
            allowance,
            ..
        } = plan;
        self.run.send(deletes, allowance, creates).await?;
        self.links.append(&mut links);
        Ok(dir_meta)
    }

    /// The report the pieces' outcomes land in.
    pub fn report(&mut self) -> &mut Report {
        self.run.report
    }

    /// Tells the watch whether the totals of the pieces so far are all there will be
    /// ([`Watch::whole`]).
    pub fn whole(&mut self, whole: bool) {
        self.run.observe.whole(whole);
    }

    /// Waits for every answer, then makes the links and sets `dir_meta` (deepest first).
    pub async fn finish(mut self, dir_meta: Vec<Entry>) -> Result<(), SessionError> {
        let links = std::mem::take(&mut self.links);
        self.run.finish(&links, dir_meta).await
    }
}

/// Applies renames in order, pipelined. Returns the ones the receiver refused (typically
/// because it does not have the old name), for the caller to send as content instead.
pub async fn rename_all<'r>(
    session: &Arc<Session>,
    renames: &[&'r Rename],
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<Vec<&'r Rename>, SessionError> {
    let request = |r: &Rename, id| Message::Rename {
        id,
        from: r.from.clone(),
        to: r.to.clone(),
    };
    let done = |r: &Rename| {
        report.renamed += 1;
        observe.step(&Step {
            kind: StepKind::Renamed(r.to.clone()),
            path: r.from.clone(),
            bytes: 0,
            size: 0,
            removed: None,
        });
    };
    pipelined(session, renames, request, done).await
}

/// The request that makes `link`'s name a hard link.
fn link_request(link: &Link, id: RequestId) -> Message {
    Message::Link {
        id,
        path: link.entry.path.clone(),
        target: link.target.clone(),
        meta: link.entry.meta.clone(),
    }
}

/// Makes every name of `links` a hard link, pipelined. Returns the ones the receiver refused
/// (typically because its copy of the file is not current), for the caller to send the file
/// and try again.
async fn link_all<'l>(
    session: &Arc<Session>,
    links: &'l [Link],
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<Vec<&'l Link>, SessionError> {
    let done = |l: &Link| {
        report.created += 1;
        observe.step(&Step {
            kind: StepKind::Created,
            path: l.entry.path.clone(),
            bytes: 0,
            size: 0,
            removed: None,
        });
    };
    let links: Vec<&Link> = links.iter().collect();
    pipelined(session, &links, link_request, done).await
}

/// Sends one request per item, [`MAX_IN_FLIGHT`] at a time, and reads the answers in order:
/// `done` sees each acknowledged item, the refused ones are returned for the caller to deal
/// with, and a lost connection ends it.
async fn pipelined<'t, T: std::fmt::Debug>(
    session: &Arc<Session>,
    items: &[&'t T],
    request: impl Fn(&T, RequestId) -> Message,
    mut done: impl FnMut(&T),
) -> Result<Vec<&'t T>, SessionError> {
    let mut refused = Vec::new();
    for chunk in items.chunks(MAX_IN_FLIGHT) {
        let mut replies = Vec::with_capacity(chunk.len());
        for &item in chunk {
            replies.push((item, session.start(|id| request(item, id)).await?));
        }
        for (item, answer) in replies {
            match session.ack(answer).await {
                Ok(()) => done(item),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::debug!(?item, "refused: {e}");
                    refused.push(item);
                }
            }
        }
    }
    Ok(refused)
}

/// Sends one file, starting again (up to [`FILE_ATTEMPTS`] times) if it changes while read.
/// `sending` is held while the body goes out, and let go once `FileEnd` has.
async fn send_file(
    session: &Arc<Session>,
    origin: &Origin,
    path: RelPath,
    base: crate::plan::Base,
    preserve: Preserve,
    sending: tokio::sync::OwnedSemaphorePermit,
    mut opened: Option<Opening>,
) -> Outcome {
    let mut attempt = 1;
    let mut sending = Some(sending);
    loop {
        let sent = async {
            let flight = match opened.take() {
                Some(Ok(Some(opened))) => Some(transfer::start(session, opened).await?),
                Some(Ok(None)) => None,
                Some(Err(e)) => return Err(e),
                None => transfer::begin(session, origin, &path, base, preserve).await?,
            };
            match flight {
                Some(flight) => flight.finish(session, &mut sending).await.map(Some),
                None => Ok(None),
            }
        }
        .await;
        match sent {
            Ok(Some(sent)) => {
                return Ok(Step {
                    kind: if sent.delta {
                        StepKind::Delta
                    } else {
                        StepKind::File
                    },
                    path,
                    bytes: sent.payload,
                    size: 0,
                    removed: None,
                })
            }
            Ok(None) => return Err(Failure::Vanished(path)),
            Err(TransferError::Changed(_)) if attempt < FILE_ATTEMPTS => {
                tracing::debug!(%path, attempt, "file changed while sending; retrying");
                attempt += 1;
            }
            Err(e) => return Err(Failure::of_transfer(path, e)),
        }
    }
}

/// What opening a file of the plan ahead of its turn gave ([`transfer::open`]).
type Opening = Result<Option<transfer::Opened>, TransferError>;

/// Files of the plan opened ahead of their turn (and read, if small), in plan order,
/// [`AHEAD`] at a time in one blocking call: a hand-off to the blocking pool per file costs
/// more than opening and reading a small file. While one lot is taken, the next is opened; at
/// most two lots are open, each file holding a descriptor and at most
/// [`transfer::READ_AHEAD`] bytes. No thread waits on the taker.
struct Ahead {
    to_open: std::collections::VecDeque<(RelPath, Base)>,
    ready: std::collections::VecDeque<Opening>,
    opening: Option<tokio::task::JoinHandle<Vec<Opening>>>,
    session: Arc<Session>,
    origin: Origin,
    preserve: Preserve,
}

/// Files opened in one blocking call.
const AHEAD: usize = 16;

impl Ahead {
    /// The files among `creates`, to be opened as they are taken.
    fn new(session: &Arc<Session>, origin: &Origin, preserve: Preserve, creates: &[Op]) -> Ahead {
        let to_open = creates
            .iter()
            .filter_map(|op| match op {
                Op::File { entry, base } => Some((entry.path.clone(), *base)),
                _ => None,
            })
            .collect();
        Ahead {
            to_open,
            ready: std::collections::VecDeque::new(),
            opening: None,
            session: session.clone(),
            origin: origin.clone(),
            preserve,
        }
    }

    /// Begins opening the next lot, if none is being opened.
    fn open_next(&mut self) {
        if self.opening.is_some() || self.to_open.is_empty() {
            return;
        }
        let n = self.to_open.len().min(AHEAD);
        let lot: Vec<(RelPath, Base)> = self.to_open.drain(..n).collect();
        let (session, origin, preserve) =
            (self.session.clone(), self.origin.clone(), self.preserve);
        self.opening = Some(tokio::task::spawn_blocking(move || {
            lot.iter()
                .map(|(path, base)| transfer::open(&session, &origin, path, *base, preserve))
                .collect()
        }));
    }

    /// The next file of the plan, opened.
    async fn take(&mut self) -> Option<Opening> {
        if self.ready.is_empty() {
            self.open_next();
            if let Some(lot) = self.opening.take() {
                self.ready.extend(lot.await.expect("opening task"));
            }
        }
        let next = self.ready.pop_front();
        self.open_next();
        next
    }
}

/// The moving parts of one [`execute`].
struct Run<'a, 'o> {
    session: &'a Arc<Session>,
    slots: Arc<Semaphore>,
    /// File bodies being sent.
    file_slots: Arc<Semaphore>,
    /// Files sent and not yet acknowledged.
    unacked: Arc<Semaphore>,
    /// Where the files sent are read (the group's source root, held open: every file sent
    /// is opened beneath it).
    origin: Origin,
    preserve: Preserve,
    /// Each step's outcome, and the bytes of content it was planned to carry.
    tasks: JoinSet<(Outcome, u64)>,
    report: &'a mut Report,
    observe: Observe<'o>,
}

impl Run<'_, '_> {
    /// Sends `deletes` first (under `allowance`), then `creates` in tree order, without
    /// waiting for the answers.
    async fn send(
        &mut self,
        deletes: Vec<RelPath>,
        allowance: Option<u64>,
        creates: Vec<Op>,
    ) -> Result<(), SessionError> {
        if !deletes.is_empty() {
            // Each plan says its own: one an earlier plan left on the session must not apply.
            let entries = allowance;
            self.session.send(Message::Allowance { entries }).await?;
        }
        for path in deletes {
            self.issue(StepKind::Deleted, path, |id, path| Message::Delete {
                id,
                path,
            })
            .await?;
        }
        let mut ahead = Ahead::new(self.session, &self.origin, self.preserve, &creates);
        for op in creates {
            let kind = match &op {
                Op::File { entry, base } => {
                    let opened = ahead.take().await;
                    self.send_file(entry.path.clone(), *base, entry.meta.size, opened)
                        .await?;
                    continue;
                }
                Op::SetMeta(_) => StepKind::Meta,
                Op::Mkdir(_) | Op::Symlink(_) | Op::Special(_) => StepKind::Created,
            };
            let path = op.entry().path.clone();
            self.issue(kind, path, |id, _| op.request(id).expect("not a file"))
                .await?;
        }
        Ok(())
    }

    /// Waits for every answer (links name files sent before, directory times wait for
    /// everything inside), then makes `links` and sets `dir_meta`, and waits for those.
    async fn finish(&mut self, links: &[Link], dir_meta: Vec<Entry>) -> Result<(), SessionError> {
        self.drain().await?;
        let refused = link_all(self.session, links, self.report, self.observe).await?;
        if !refused.is_empty() {
            // The receiver's copy of these files is not current: send it, then link again.
            let mut firsts: Vec<RelPath> = Vec::new();
            for l in &refused {
                if !firsts.contains(&l.target) {
                    firsts.push(l.target.clone());
                    self.send_file(l.target.clone(), Base::Unknown, l.entry.meta.size, None)
                        .await?;
                }
            }
            self.drain().await?;
            for l in refused {
                let path = l.entry.path.clone();
                self.issue(StepKind::Created, path, |id, _| link_request(l, id))
                    .await?;
            }
            self.drain().await?;
        }
        for e in dir_meta {
            let path = e.path.clone();
            let op = Op::SetMeta(e);
            self.issue(StepKind::Meta, path, |id, _| {
                op.request(id).expect("not a file")
            })
            .await?;
        }
        self.drain().await
    }

    /// Starts sending the file `path` (of `size` bytes as planned) once a body slot and an
    /// unacknowledged slot are free; its outcome is collected like a request's.
    async fn send_file(
        &mut self,
        path: RelPath,
        base: Base,
        size: u64,
        opened: Option<Opening>,
    ) -> Result<(), SessionError> {
        let waiting = self
            .unacked
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let sending = self
            .file_slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        self.reap()?;
        let (session, origin, preserve) =
            (self.session.clone(), self.origin.clone(), self.preserve);
        self.tasks.spawn(async move {
            let _waiting = waiting;
            let mut done =
                send_file(&session, &origin, path, base, preserve, sending, opened).await;
            if let Ok(step) = &mut done {
                step.size = size;
            }
            (done, size)
        });
        Ok(())
    }

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
        let answer = self.session.start(|id| make(id, path.clone())).await?;
        let session = self.session.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            let outcome = async {
                let done = match kind {
                    StepKind::Deleted => session.deleted(answer).await,
                    _ => session.ack(answer).await.map(|()| Removal::Done(None)),
                };
                match done {
                    Ok(Removal::Done(removed)) => Ok(Step {
                        kind,
                        path,
                        bytes: 0,
                        size: 0,
                        removed,
                    }),
                    Ok(Removal::Held(entries)) => Err(Failure::Held(path, entries)),
                    Err(e) if e.is_fatal() => Err(Failure::Fatal(e)),
                    Err(e) => Err(Failure::path(path, e)),
                }
            };
            (outcome.await, 0)
        });
        Ok(())
    }

    fn record(&mut self, (outcome, planned): (Outcome, u64)) -> Result<(), SessionError> {
        let report = &mut *self.report;
        if outcome.is_err() {
            self.observe.missed(planned);
        }
        match outcome {
            Ok(step) => {
                match step.kind {
                    StepKind::Created => report.created += 1,
                    StepKind::Meta => report.meta += 1,
                    StepKind::Deleted => {
                        // A name the receiver did not have (a temporary file deleted before
                        // it was ever sent) was not deleted there.
                        report.deleted += u64::from(step.removed != Some(0));
                        if let Some(n) = step.removed {
                            report.removed.push((step.path.clone(), n));
                        }
                    }
                    StepKind::Renamed(_) => report.renamed += 1,
                    StepKind::File | StepKind::Delta => {
                        report.files += 1;
                        report.delta_files += (step.kind == StepKind::Delta) as u64;
                        report.payload_bytes += step.bytes;
                    }
                }
                self.observe.step(&step);
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Vanished(path)) => {
                tracing::debug!(%path, "vanished or changed type while sending");
                report.vanished += 1;
            }
            Err(Failure::Held(path, entries)) => {
                tracing::debug!(%path, entries, "deletion held back past the guard's allowance");
                report.held_back.push((path, entries));
            }
            Err(Failure::Path(path, error, unread)) => {
                self.session.path_failed(&path, &error);
                if unread {
                    report.unread.push((path.clone(), error.clone()));
                }
                report.failures.push((path, error));
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::meta::{Kind, Meta};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    fn dir(path: &str) -> Entry {
        Entry {
            path: RelPath::from(path),
            meta: Meta {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 1,
                mtime_nsec: 0,
                rdev: 0,
                xattrs: Default::default(),
            },
            link: None,
            inode: None,
        }
    }

    fn piece(names: &[&str]) -> Plan {
        Plan {
            creates: names.iter().map(|n| Op::Mkdir(dir(n))).collect(),
            ..Plan::default()
        }
    }

    /// The pieces of a copy go out back to back: the next piece's requests reach the
    /// receiver before any of the last one's is answered. The far end here answers nothing
    /// until it has seen the second piece, which a copy that waited between pieces never
    /// sends: it would stall until the timeout.
    #[tokio::test]
    async fn a_piece_goes_out_before_the_last_one_is_answered() {
        let (session, (mut far_r, mut far_w)) = crate::session::in_memory();
        let session = Arc::new(session);
        let far = tokio::spawn(async move {
            let mut held = Vec::new();
            let mut seen_second = false;
            loop {
                let msg = match far_r.read().await {
                    Ok(Some(m)) => m,
                    _ => return held.len(),
                };
                let Message::Mkdir { id, path, .. } = msg else {
                    continue;
                };
                held.push(id);
                seen_second |= path.to_string().starts_with('b');
                if seen_second {
                    for id in held.drain(..) {
                        far_w.write(&Message::Ack { id }).await.unwrap();
                    }
                }
            }
        });
        let root = tempfile::tempdir().unwrap();
        let origin = Origin::Root(Arc::new(OwnedFd::from(
            std::fs::File::open(root.path()).unwrap(),
        )));
        let mut report = Report::default();
        let mut steps = 0;
        let mut observe = |_: &Step| steps += 1;
        let mut run = Execution::new(
            &session,
            Preserve::default(),
            &origin,
            &mut report,
            &mut observe,
        );
        let copy = async {
            run.piece(piece(&["a1", "a2", "a3"])).await?;
            run.piece(piece(&["b1", "b2"])).await?;
            run.finish(Vec::new()).await
        };
        tokio::time::timeout(Duration::from_secs(30), copy)
            .await
            .expect("the second piece went out before the first was answered")
            .unwrap();
        assert_eq!(report.created, 5);
        assert_eq!(steps, 5);
        drop(session);
        far.abort();
    }
}
