//! The request loop of one session. It takes requests in arrival order and answers each one
//! exactly once; it runs on a blocking thread only while requests are waiting, and for
//! `LINGER` (2 ms) after its queue runs dry.
//!
//! Durability (group commit): a change is acknowledged only after it and the directories it
//! touched are durable. A commit makes the sealed files' data durable, names them, makes
//! every dirty directory durable and the states superseded journaled in the module's history
//! ([`Apply::take_round`], [`Apply::name_flushed`]), and only then
//! sends the `Ack`s. So an `Ack` always means "durable under its final name", and a burst of
//! small files costs a few flushes, not one per file.
//!
//! In a burst the flushes run behind the loop, on a thread of their own, in rounds, while
//! the loop takes the next requests (`Requests::commit_behind`): the first round begins as
//! soon as `BEHIND_MIN` answers or files wait. A round's one flush makes the last round's
//! names durable together with the data of the files sealed since ([`Apply::take_round`]:
//! one `syncfs` for both); when it ends its names are answered, its files named on the
//! loop's thread, and the next round begins at once for those names and what sealed
//! meanwhile if `BURST_COMMIT` (512) changes wait in all. So a stream of files faster than
//! the disk always has one flush under way, each serving two commits; where the flushes
//! are quicker than the stream (ext4), rounds do not shrink to a few files each: the next
//! begins, as any later commit of a burst, when `BURST_COMMIT` wait or the queue runs dry. The loop waits for a round only when [`may_seal`] refuses another sealed file
//! or [`GROUP_COMMIT`] answers pile up behind it. When no further request is queued and
//! no round is under way, fewer than `BEHIND_MIN` changes waiting are committed and
//! answered at once (`Requests::commit`): a lone change is durable and answered without a
//! hand-off. While rounds run (a burst), the loop does not wait for them: it lingers for
//! the next request, and the end of a round moves the commit on (`Requests::wake`) as a
//! request would — on the lingering thread, or, once the loop has handed its thread back,
//! by waking it. A request on a sealed file's path, or above or below it (waiting or in
//! the round under way), commits first, so requests apply in arrival order.

use crate::apply::Apply;

/// Versions per `Versions` frame.
const HISTORY_BATCH: usize = 500;
use crate::commit::{may_seal, Flushed};
use crate::incoming::{Outcome, Transfers};
use crate::leftovers::module_filter;
use crate::module::ModuleState;
use crate::stats::Stats;
use ferry_protocol::local::{self, DigestTree, Rules, Summary};
use ferry_protocol::message::{DigestEntry, Message, RequestId};
use ferry_protocol::meta::Compare;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Acknowledgements that may wait for one group commit.
pub const GROUP_COMMIT: usize = 2048;
/// Answers and sealed files waiting from which a commit begins behind the loop when none is
/// under way: as soon as a burst has begun, so that the next commit covers what arrives
/// while this one's flushes run (their wait sets the size of the next).
const BEHIND_MIN: usize = crate::commit::SYNCFS_BATCH;
/// Answers and sealed files waiting from which a later commit of the same burst begins
/// behind the loop (or fewer, when the queue runs dry): each flush forces the filesystem's
/// log, and commits of a few hundred files cost the disk a third of the flushes of commits
/// begun back to back (on XFS, 58 `syncfs` and 36 `fsync` for 20,000 files and a 256 MiB
/// file, against 139–226 and 111–314). A lone change is answered as before.
const BURST_COMMIT: usize = 512;
/// Read budget (in the session's KiB permits) released at once: 2 MiB, a tenth of the
/// session's buffer.
const RELEASE: usize = 2048;
/// How long the loop keeps its thread when the queue runs dry, for the next request of a
/// stream (see [`Requests::linger`]); an idle session then holds no thread.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// Approximate size of one `Listing` batch.
const LISTING_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A request on its way to the loop, holding its share of the session's read budget until
/// the loop takes it.
pub struct Request {
    /// The message.
    pub msg: Message,
    /// Released when the request is dropped.
    pub _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The request loop of one session.
pub struct Requests {
    fs: Apply,
    files: Transfers,
    writable: bool,
    replies: mpsc::Sender<Message>,
    /// Changes done, answered at the next group commit: `Ack`, or `Deleted` with the entries
    /// a delete under an allowance removed.
    pending_acks: Vec<(RequestId, Option<u64>)>,
    /// Files named after their data's flush, answered once a round has made their names
    /// durable.
    named: Vec<(RequestId, Result<(), String>)>,
    /// Entries this session's deletes may still remove (see [`Message::Allowance`]).
    allowance: Option<u64>,
    /// The digest tree `VerifyDir` answers from, built on first use (`bool`: `--checksum`).
    tree: Option<(bool, Compare, DigestTree)>,
    /// The summary `Summarize` answers from, walked again at each request for the root.
    summary: Option<Summary>,
    /// `Delete` and `Rename` are served (a restore client without `--delete` refuses them).
    removals: bool,
    /// The module's write lease was lost, and the peer told.
    lease_lost: bool,
    /// The session ends at the first write the filesystem refuses as a whole (full,
    /// read-only, failing): a restore client's, where nothing after it could be written either.
    stop_when_unwritable: bool,
    /// A write failed so.
    refused_by_fs: bool,
    /// A group commit under way on a thread of its own while the loop takes further requests.
    in_flight: Option<InFlight>,
    /// Told when a flush of the commit under way ends, to wake a loop that has no request.
    flushed: Arc<tokio::sync::Notify>,
    /// Read budget of requests taken, not yet released ([`Requests::take`]).
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A commit began behind the loop since it last handed its thread back: the burst is
    /// under way, and the next commit waits for [`BURST_COMMIT`] changes.
    bursting: bool,
}

/// A round of the group commit running on a thread of its own ([`Requests::commit_behind`]).
struct InFlight {
    /// Answered when it ends: the outcomes of the files named before it began and the other
    /// changes' acknowledgements, which its flush makes durable.
    files: Vec<(RequestId, Result<(), String>)>,
    acks: Vec<(RequestId, Option<u64>)>,
    /// The files whose data it flushes, named when it ends: later requests on these paths
    /// wait for them.
    data: Vec<RelPath>,
    flush: Behind<(io::Result<()>, Flushed)>,
}

/// A flush on a thread of its own, which says when it has ended: it hands its outcome over,
/// sets `done`, then wakes the loop if the loop waits (`Requests::serve`). It runs on the
/// runtime's blocking pool when there is a runtime, so a runtime on paused time (tests) does
/// not jump its clock while the disk works.
struct Behind<T> {
    outcome: std::sync::mpsc::Receiver<T>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl<T: Send + 'static> Behind<T> {
    fn start(wake: &Arc<tokio::sync::Notify>, run: impl FnOnce() -> T + Send + 'static) -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ended, wake) = (done.clone(), wake.clone());
        let (tx, outcome) = std::sync::mpsc::sync_channel(1);
        let flush = move || {
            // Said when the flush ends, even by a panic (its outcome then never comes).
            struct Ended(Arc<std::sync::atomic::AtomicBool>, Arc<tokio::sync::Notify>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                    self.1.notify_one();
                }
            }
            let _ended = Ended(ended, wake);
            let _ = tx.send(run());
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(flush)),
            Err(_) => drop(std::thread::spawn(flush)),
        }
        Behind { outcome, done }
    }

    /// The flush has ended.
    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for the flush's outcome; `Err` if it panicked.
    fn join(self) -> Result<T, std::sync::mpsc::RecvError> {
        self.outcome.recv()
    }
}

enum Flow {
    Continue,
    Stop,
}

/// What [`Requests::linger`] waited for.
enum Next {
    Request(Message),
    /// Nothing came: the thread goes back.
    Idle,
    /// The peer is gone or the session must end.
    Stop,
}

/// Wakes the loop's thread where it lingers.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

impl Requests {
    /// The loop for one session on `state`.
    pub fn new(
        state: Arc<ModuleState>,
        stats: Arc<Stats>,
        privileged: bool,
        writable: bool,
        replies: mpsc::Sender<Message>,
    ) -> Self {
        Requests {
            fs: Apply::new(state, stats, privileged),
            files: Transfers::default(),
            writable,
            replies,
            pending_acks: Vec::new(),
            named: Vec::new(),
            allowance: None,
            tree: None,
            summary: None,
            removals: true,
            lease_lost: false,
            stop_when_unwritable: false,
            refused_by_fs: false,
            in_flight: None,
            flushed: Arc::new(tokio::sync::Notify::new()),
            budget: None,
            bursting: false,
        }
    }

    /// Refuses `Delete` and `Rename`: what the destination holds is only added to or
    /// replaced (a restore without `--delete`, whatever the backup host asks).
    pub fn without_removals(mut self) -> Self {
        self.removals = false;
        self
    }

    /// Ends the session at the first write the filesystem refuses as a whole
    /// ([`crate::incoming::unwritable`]; a restore client's destination): what was written
    /// before stays, whole and durable.
    pub fn stopping_when_unwritable(mut self) -> Self {
        self.stop_when_unwritable = true;
        self
    }

    /// Serves requests until `requests` closes or `Bye` arrives. In-flight file transfers that
    /// did not end are kept to resume; everything completed is committed and acknowledged.
    ///
    /// An idle session holds no thread: the loop waits on the channel as a task, and only the
    /// work on requests that have arrived runs on a blocking thread — until the channel has
    /// been empty for `LINGER` (2 ms), when it hands the thread back.
    pub async fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        loop {
            let woken = if self.in_flight.is_some() {
                let flushed = self.flushed.clone();
                tokio::select! {
                    r = requests.recv() => r.map(Some),
                    () = flushed.notified() => Some(None),
                }
            } else {
                requests.recv().await.map(Some)
            };
            let Some(first) = woken else {
                break;
            };
            let worked = tokio::task::spawn_blocking(move || {
                let flow = match first {
                    Some(first) => {
                        let first = self.take(first);
                        self.drain(first, &mut requests)
                    }
                    None => self.wake(),
                };
                (self, requests, flow)
            })
            .await;
            let Ok((me, rx, flow)) = worked else {
                tracing::error!("request loop panicked; session closed");
                return;
            };
            (self, requests) = (me, rx);
            // The thread was handed back: the stream paused, and a burst begins anew.
            self.bursting = false;
            if let Flow::Stop = flow {
                break;
            }
        }
        let _ = tokio::task::spawn_blocking(move || self.close()).await;
    }

    /// Handles `first` and whatever else is already queued; commits when the queue runs dry
    /// or [`GROUP_COMMIT`] acknowledgements wait.
    fn drain(&mut self, first: Message, requests: &mut mpsc::Receiver<Request>) -> Flow {
        let mut msg = first;
        loop {
            if let Flow::Stop = self.handle(msg) {
                return Flow::Stop;
            }
            if self.refused_by_fs && self.stop_when_unwritable {
                return Flow::Stop;
            }
            if !self.step_commit() {
                return Flow::Stop;
            }
            msg = match requests.try_recv() {
                Ok(r) => self.take(r),
                // A burst: the commit under way moves on when its flush ends.
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.budget = None;
                    if self.in_flight.is_none() && !self.commit_waiting() {
                        return Flow::Stop;
                    }
                    match self.linger(requests) {
                        Next::Request(msg) => msg,
                        Next::Idle => return Flow::Continue,
                        Next::Stop => return Flow::Stop,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Flow::Stop,
            };
        }
    }

    /// A request's message; its share of the read budget is released with others, a
    /// [`RELEASE`]'s worth at once (or all when the queue runs dry), so a reader held back
    /// by the budget is woken once per batch of frames, not once per frame.
    fn take(&mut self, r: Request) -> Message {
        let Request { msg, _budget } = r;
        if let Some(permit) = _budget {
            match &mut self.budget {
                Some(held) => held.merge(permit),
                None => self.budget = Some(permit),
            }
            if self
                .budget
                .as_ref()
                .is_some_and(|h| h.num_permits() >= RELEASE)
            {
                self.budget = None;
            }
        }
        msg
    }

    /// The queue is empty: keeps this thread for up to [`LINGER`] (real time) for the next
    /// request, moving the commit under way on as its flushes end, so a stream of requests
    /// that the peer sends a little slower than the loop takes them does not hand the thread
    /// back and take it again for each one. [`Next::Idle`] when none came.
    fn linger(&mut self, requests: &mut mpsc::Receiver<Request>) -> Next {
        let deadline = std::time::Instant::now() + LINGER;
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        loop {
            match requests.poll_recv(&mut cx) {
                std::task::Poll::Ready(Some(r)) => return Next::Request(self.take(r)),
                std::task::Poll::Ready(None) => return Next::Stop,
                std::task::Poll::Pending => {}
            }
            if self.in_flight.as_ref().is_some_and(|f| f.flush.finished()) {
                if let Flow::Stop = self.wake() {
                    return Next::Stop;
                }
                continue;
            }
            let flushed = self.flushed.clone();
            let notified = std::pin::pin!(flushed.notified());
            if std::future::Future::poll(notified, &mut cx).is_ready() {
                continue;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Next::Idle;
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// No request waits and a flush of the commit under way has ended: moves it on, and once
    /// it is answered commits what arrived meanwhile — behind the loop if a burst's worth
    /// waits (it may go on), else at once.
    fn wake(&mut self) -> Flow {
        if !self.advance(false) {
            return Flow::Stop;
        }
        if self.in_flight.is_some() {
            return Flow::Continue;
        }
        if self.commit_waiting() {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    /// No commit is under way: commits what waits, behind the loop if a burst's worth
    /// ([`BEHIND_MIN`]) waits, else at once (a lone change, answered without a hand-off).
    /// Returns false if the peer is gone.
    fn commit_waiting(&mut self) -> bool {
        let waiting = self.waiting();
        if waiting >= BEHIND_MIN {
            self.commit_behind()
        } else {
            self.commit()
        }
    }

    /// The session is over: commit, keep unfinished transfers, save the digest cache.
    fn close(mut self) {
        if !self.commit() {
            self.settle();
        }
        self.files
            .suspend_all(&self.fs.state.partials, self.fs.module());
        let state = &self.fs.state;
        if let Err(e) = state.cache.lock().expect("cache lock").save() {
            tracing::warn!(module = %state.module.name, "cannot save digest cache: {e}");
        }
    }

    /// After a commit stopped short (the peer gone, or the lease lost): what the loop did to
    /// the module meanwhile — names given as a round ended, and the states they replaced,
    /// kept in the history — is made durable and journaled all the same, unanswered; else
    /// those states would have objects without rows until the next start-up check, which
    /// adopts them without their paths. Files sealed and not named are dropped, as they were
    /// never answered. Nothing once the lease is lost: the module is another gateway's then.
    fn settle(&mut self) {
        if !self.fs.state.may_write() {
            return;
        }
        if let Err(e) = self.fs.commit_durable() {
            tracing::warn!(
                module = self.fs.module(),
                "at the session's end: {}",
                ferry_protocol::io_reason(&e)
            );
        }
    }

    fn reply(&self, msg: Message) -> bool {
        self.replies.blocking_send(msg).is_ok()
    }

    fn fail(&mut self, id: RequestId, error: String) {
        tracing::warn!(module = self.fs.module(), "request failed: {error}");
        self.fs.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.reply(Message::Failed { id, error });
    }

    /// A write the module's filesystem refused as a whole (full, read-only, failing):
    /// answered like any failure, but said once a minute for the module, not once a file (a
    /// full disk would fail every file of a whole compare).
    fn unwritable(&mut self, id: RequestId, error: String) {
        let stats = &self.fs.stats;
        stats.failures.fetch_add(1, Ordering::Relaxed);
        stats.unwritable.fetch_add(1, Ordering::Relaxed);
        let module = self.fs.module();
        match self.fs.state.note_unwritable() {
            (true, 0) => tracing::warn!(module, "cannot write: {error}"),
            (true, more) => tracing::warn!(
                module,
                "cannot write: {error} ({more} more writes failed so since this was last said)"
            ),
            (false, _) => tracing::debug!(module, "cannot write: {error}"),
        }
        self.refused_by_fs = true;
        self.reply(Message::Failed { id, error });
    }

    /// A change is acknowledged at the next group commit; a failure is answered at once, and
    /// so is a declined rename or link (answered `Failed`, which the sender expects, but
    /// counted apart: a temporary file renamed before it was ever sent is no failure).
    fn finish(&mut self, id: RequestId, path: &RelPath, result: io::Result<()>) {
        match result {
            Ok(()) => self.pending_acks.push((id, None)),
            Err(e) if crate::apply::is_declined(&e) => {
                tracing::debug!(module = self.fs.module(), "declined: {e}");
                self.fs.stats.declined.fetch_add(1, Ordering::Relaxed);
                self.reply(Message::Failed {
                    id,
                    error: format!("{path}: {e}"),
                });
            }
            Err(e) if crate::incoming::unwritable(&e) => {
                self.unwritable(id, format!("{path}: {e}"))
            }
            Err(e) => self.fail(id, format!("{path}: {e}")),
        }
    }

    /// A `Delete` under an allowance of `left` entries: counted first, removed only if it
    /// fits (`u64::MAX`: always, counted), answered with the count.
    fn delete_allowed(&mut self, id: RequestId, path: &RelPath, left: u64) {
        let entries = match self.fs.count(path, left) {
            Ok(n) => n,
            Err(e) => return self.fail(id, format!("{path}: {e}")),
        };
        if entries > left {
            self.fs.stats.deletes_held.fetch_add(1, Ordering::Relaxed);
            self.reply(Message::Deleted {
                id,
                entries,
                held: true,
            });
            return;
        }
        match self.fs.delete(path) {
            Ok(()) => {
                if left != u64::MAX {
                    self.allowance = Some(left - entries);
                }
                self.pending_acks.push((id, Some(entries)));
            }
            Err(e) => self.fail(id, format!("{path}: {e}")),
        }
    }

    fn file(&mut self, id: RequestId, outcome: Outcome) -> Flow {
        match outcome {
            Outcome::Pending | Outcome::Silent => {}
            Outcome::Sealed => {}
            Outcome::Reply(m) => {
                self.reply(m);
            }
            Outcome::Failed(e) => self.fail(id, e),
            Outcome::Unwritable(e) => self.unwritable(id, e),
            Outcome::Violation(e) => {
                // The sender broke the protocol: it is told why, and the session ends (what
                // was acknowledged stays; unfinished files are discarded).
                tracing::warn!(
                    module = self.fs.module(),
                    "protocol violation from the sender: {e}"
                );
                self.fs.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.reply(Message::Refused {
                    reason: format!("protocol violation: {e}"),
                });
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn handle(&mut self, msg: Message) -> Flow {
        if let Some(id) = msg.mutation_id() {
            if !self.writable {
                self.fail(id, "session is read-only".into());
                return Flow::Continue;
            }
            if !self.fs.state.may_write() {
                return self.lease_lost();
            }
            let refusal = self.fs.state.history.as_ref().and_then(|h| h.refusal());
            if let Some(why) = refusal {
                // Said once, when it began (`History::prune`), and counted: not a line per
                // request, which a busy sender would turn into a flood.
                let stats = &self.fs.stats;
                stats.refused_for_history.fetch_add(1, Ordering::Relaxed);
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let error = format!("module {}: {why}", self.fs.module());
                self.reply(Message::Failed { id, error });
                return Flow::Continue;
            }
        }
        if !self.removals {
            if let Message::Delete { id, path } | Message::Rename { id, from: path, .. } = &msg {
                let error =
                    format!("{path}: not removed (a restore removes nothing without --delete)");
                self.fail(*id, error);
                return Flow::Continue;
            }
        }
        // Requests apply in order: one on a sealed file's path (or above or below it) waits
        // until the sealed files have their names.
        let touches = match &msg {
            Message::Mkdir { path, .. }
            | Message::Symlink { path, .. }
            | Message::Special { path, .. }
            | Message::SetMeta { path, .. }
            | Message::Delete { path, .. }
            | Message::List { under: path, .. }
            | Message::VerifyDir { path, .. }
            | Message::Summarize { path, .. } => self.touches_sealed(path),
            Message::Rename { from, to, .. }
            | Message::Link {
                path: from,
                target: to,
                ..
            } => self.touches_sealed(from) || self.touches_sealed(to),
            _ => false,
        };
        if touches && !self.commit() {
            return Flow::Stop;
        }
        // A summary of another session meanwhile reads these directories again (the group
        // commit marks them again once changed).
        let changed = msg.changed_paths();
        self.fs
            .state
            .summaries
            .mark(changed.into_iter().flatten().filter_map(|p| p.parent()));
        if !matches!(
            msg,
            Message::FileBegin { .. }
                | Message::File { .. }
                | Message::FileData { .. }
                | Message::FileDelta { .. }
                | Message::FileHole { .. }
                | Message::FileEnd { .. }
                | Message::FileAbort { .. }
        ) {
            self.fs.end_file_run();
        }
        let fs = &mut self.fs;
        match msg {
            Message::List { id, under, xattrs } => self.list(id, &under, xattrs),
            Message::Mkdir { id, path, meta } => {
                let r = fs.mkdir(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::Symlink {
                id,
                path,
                target,
                meta,
            } => {
                let r = fs.symlink(&path, &target, &meta);
                self.finish(id, &path, r)
            }
            Message::Special { id, path, meta } => {
                let r = fs.special(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::SetMeta { id, path, meta } => {
                let r = fs.set_meta(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::Allowance { entries } => self.allowance = entries,
            Message::Delete { id, path } => match self.allowance {
                None => {
                    let r = fs.delete(&path);
                    self.finish(id, &path, r)
                }
                Some(left) => self.delete_allowed(id, &path, left),
            },
            Message::Rename { id, from, to } => {
                let r = fs.rename(&from, &to);
                self.finish(id, &from, r)
            }
            Message::Link {
                id,
                path,
                target,
                meta,
            } => {
                let r = fs.link(&path, &target, &meta);
                self.finish(id, &path, r)
            }
            Message::FileBegin {
                id,
                path,
                meta,
                body,
            } => {
                let o = self.files.begin(fs, id, &path, meta, body);
                return self.file(id, o);
            }
            Message::File {
                id,
                path,
                meta,
                data,
                digest,
            } => {
                let o = self.files.whole(fs, id, &path, meta, &data, digest);
                return self.file(id, o);
            }
            Message::FileData { id, data } => {
                let o = self.files.data(fs, id, &data);
                return self.file(id, o);
            }
            Message::FileDelta { id, window, delta } => {
                let o = self.files.delta(fs, id, window, &delta);
                return self.file(id, o);
            }
            Message::FileHole { id, len } => {
                let o = self.files.hole(id, len);
                return self.file(id, o);
            }
            Message::FileEnd { id, digest } => {
                let o = self.files.end(fs, id, digest);
                return self.file(id, o);
            }
            Message::FileAbort { id } => {
                let o = self.files.abort(id);
                // The sender waits for this answer; it is no failure of ours.
                if let Outcome::Failed(error) = o {
                    self.reply(Message::Failed { id, error });
                }
            }
            Message::VerifyDir {
                id,
                path,
                checksum,
                xattrs,
                hardlinks,
            } => self.verify_dir(id, &path, checksum, xattrs, hardlinks),
            Message::Summarize {
                id,
                path,
                xattrs,
                hardlinks,
            } => self.summarize(id, &path, xattrs, hardlinks),
            Message::Stats { id } => {
                self.reply(Message::StatsReply {
                    id,
                    counters: self.fs.stats.snapshot(),
                });
            }
            Message::History { id, under } => self.history(id, &under),
            Message::Bye => return Flow::Stop,
            other => {
                tracing::warn!(
                    module = self.fs.module(),
                    "unexpected {} from sender",
                    other.name()
                );
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Answers `History`: the module's kept versions at or below `under`, in batches.
    fn history(&mut self, id: RequestId, under: &RelPath) {
        let Some(history) = &self.fs.state.history else {
            let module = self.fs.module().to_string();
            self.fail(
                id,
                format!("module {module} keeps no history: it is a mirror"),
            );
            return;
        };
        if let Err(why) = under.validate() {
            self.fail(id, format!("{under}: {why}"));
            return;
        }
        let versions = match history.versions(under) {
            Ok(v) => v,
            Err(e) => {
                self.fail(id, format!("{under}: {e}"));
                return;
            }
        };
        let wire: Vec<_> = versions.iter().map(|v| v.to_wire()).collect();
        let mut chunks = wire.chunks(HISTORY_BATCH).peekable();
        if chunks.peek().is_none() {
            self.reply(Message::Versions {
                id,
                versions: Vec::new(),
                done: true,
            });
        }
        while let Some(chunk) = chunks.next() {
            let done = chunks.peek().is_none();
            let versions = chunk.to_vec();
            if !self.reply(Message::Versions { id, versions, done }) {
                return;
            }
        }
    }

    /// True if a request on `path` must wait for sealed files to be named: one of them, or
    /// above or below one, waiting or in a commit under way.
    fn touches_sealed(&self, path: &RelPath) -> bool {
        let in_flight = self.in_flight.as_ref().is_some_and(|f| {
            f.data
                .iter()
                .any(|p| p.starts_with(path) || path.starts_with(p))
        });
        in_flight || self.fs.touches_sealed(path)
    }

    /// The group commit: sealed files made durable and named, dirty directories made
    /// durable, then everything acknowledged, on this thread, after the commit under way (if
    /// any) ends. Returns false if the peer is gone.
    fn commit(&mut self) -> bool {
        if !self.advance(true) {
            return false;
        }
        if !self.may_write() {
            return false;
        }
        let mut files = std::mem::take(&mut self.named);
        files.extend(self.fs.flush());
        let synced = self.fs.commit_durable();
        let acks = std::mem::take(&mut self.pending_acks);
        self.answer(files, acks, synced)
    }

    /// Changes waiting for a commit: answers, sealed files, names given.
    fn waiting(&self) -> usize {
        self.pending_acks.len() + self.fs.sealed() + self.named.len()
    }

    /// Between two requests: moves the commit under way on, and begins the next one behind
    /// it when enough waits and none is under way ([`BEHIND_MIN`] for a burst's first,
    /// [`BURST_COMMIT`] for the next ones), or waits for the one under way when [`may_seal`]
    /// allows no more sealed files or [`GROUP_COMMIT`] answers wait.
    fn step_commit(&mut self) -> bool {
        if !self.advance(false) {
            return false;
        }
        let sealed = self.fs.sealed();
        let waiting = self.waiting();
        let begin = if self.in_flight.is_some() {
            !may_seal(sealed) || waiting >= GROUP_COMMIT
        } else if self.bursting {
            waiting >= BURST_COMMIT
        } else {
            waiting >= BEHIND_MIN
        };
        if !begin {
            return true;
        }
        self.bursting = true;
        self.commit_behind()
    }

    /// The group commit with its flushes on a thread of its own, so that the loop takes
    /// further requests while the disk works: once the round under way (if any) has ended,
    /// a round takes everything waiting, and is moved on between requests
    /// ([`Requests::advance`]). Each round makes the last one's names durable and the data
    /// of the files sealed since, which it then names for the next round; so a stream of
    /// files has one flush under way at all times, each serving two commits. What a round
    /// holds is answered when it ends, as [`Requests::commit`] would.
    fn commit_behind(&mut self) -> bool {
        if self.in_flight.is_some() && !self.end_round() {
            return false;
        }
        if self.in_flight.is_some() {
            // The round that ended began the next, which took what was waiting.
            return true;
        }
        self.begin_round()
    }

    /// Begins a round behind the loop: the files named since the last round and what else
    /// waits to be made durable, with the data of the files sealed meanwhile.
    fn begin_round(&mut self) -> bool {
        if !self.may_write() {
            return false;
        }
        let files = std::mem::take(&mut self.named);
        let acks = std::mem::take(&mut self.pending_acks);
        match self.fs.take_round() {
            Ok(round) => {
                let data = round.paths();
                let flush = Behind::start(&self.flushed, move || round.run());
                self.in_flight = Some(InFlight {
                    files,
                    acks,
                    data,
                    flush,
                });
                true
            }
            Err(e) => self.answer(files, acks, Err(e)),
        }
    }

    /// Moves the commit under way on when its round has ended (waiting for it with `wait`,
    /// and then to the very end: rounds it begins, and one for names still waiting).
    /// Returns false if the peer is gone or the lease lost.
    fn advance(&mut self, wait: bool) -> bool {
        loop {
            let more = match &self.in_flight {
                Some(f) if !f.flush.finished() && !wait => return true,
                Some(_) => self.end_round(),
                // To the very end: names given and not yet durable get a round of their own.
                None if wait && !self.named.is_empty() => self.begin_round(),
                None => return true,
            };
            if !more {
                return false;
            }
        }
    }

    /// Waits for the round under way to end, answers what it made durable, names the files
    /// whose data it flushed and begins the round that makes those names durable.
    fn end_round(&mut self) -> bool {
        let InFlight {
            files, acks, flush, ..
        } = self.in_flight.take().expect("a round under way");
        let Ok((synced, flushed)) = flush.join() else {
            tracing::error!(module = self.fs.module(), "flush panicked");
            return false;
        };
        // What it made durable is answered whatever became of the lease meanwhile.
        let answered = self.answer(files, acks, synced);
        if !self.fs.state.may_write() {
            flushed.discard();
            self.pending_acks.clear();
            self.named.clear();
            let _ = self.lease_lost();
            return false;
        }
        let named = self.fs.name_flushed(flushed);
        self.named.extend(named);
        if !answered {
            // The peer is gone; the files are named all the same, whole and durable.
            return false;
        }
        // The next round begins at once if a burst's worth waits for it or the names kept
        // states in the history (journaled by it: an object without its row waits no longer
        // than before), else as any commit would (enough waiting, or the queue dry): where
        // flushes are quick (ext4), rounds begun at once for a few files each doubled the
        // flushes and cost 4% of a copy.
        if self.named.is_empty() || (self.waiting() < BURST_COMMIT && !self.fs.keeps_unjournaled())
        {
            return true;
        }
        self.begin_round()
    }

    /// False, with sealed files dropped unnamed and nothing waiting acknowledged, if the
    /// module may not be written any more: the sender sends it again through the gateway
    /// that holds the lease.
    fn may_write(&mut self) -> bool {
        if self.fs.state.may_write() {
            return true;
        }
        self.fs.discard_sealed();
        self.pending_acks.clear();
        self.named.clear();
        let _ = self.lease_lost();
        false
    }

    /// Answers a commit's files and other changes: each outcome, or "not durable" for all if
    /// `synced` failed. Returns false if the peer is gone.
    fn answer(
        &mut self,
        files: Vec<(RequestId, Result<(), String>)>,
        acks: Vec<(RequestId, Option<u64>)>,
        synced: io::Result<()>,
    ) -> bool {
        let mut answers: Vec<(RequestId, Result<Option<u64>, String>)> = files
            .into_iter()
            .map(|(id, r)| (id, r.map(|()| None)))
            .collect();
        answers.extend(acks.into_iter().map(|(id, deleted)| (id, Ok(deleted))));
        for (id, r) in answers {
            let r = match (&synced, r) {
                (Err(e), Ok(_)) => Err(format!("not durable: {e}")),
                (_, r) => r,
            };
            let answer = match r {
                Ok(None) => Message::Ack { id },
                Ok(Some(entries)) => Message::Deleted {
                    id,
                    entries,
                    held: false,
                },
                Err(error) => {
                    self.fail(id, error);
                    continue;
                }
            };
            if !self.reply(answer) {
                return false;
            }
        }
        true
    }

    /// The module's lease went to another gateway (or could not be renewed in time): the
    /// session ends, saying why once, so its sender goes to the gateway that holds it.
    fn lease_lost(&mut self) -> Flow {
        if !std::mem::replace(&mut self.lease_lost, true) {
            let reason = self.fs.state.lease_lost();
            tracing::warn!(module = self.fs.module(), "{reason}; session ends");
            self.reply(Message::Refused { reason });
        }
        Flow::Stop
    }

    fn list(&mut self, id: RequestId, under: &RelPath, xattrs: Namespaces) {
        // Not there (nor a parent of it) lists as empty, below; an escape is refused here.
        match self.fs.local(under) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return self.fail(id, format!("{under}: {e}"))
            }
            _ => {}
        }
        let mut errors = Vec::new();
        let entries = match local::scan_from(
            &self.fs.tree_root(),
            under,
            &module_filter,
            xattrs,
            &mut errors,
        ) {
            Ok(e) => e,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory =>
            {
                Vec::new()
            }
            Err(e) => return self.fail(id, format!("listing {under:?}: {e}")),
        };
        for (p, e) in &errors {
            tracing::warn!(module = self.fs.module(), path = %p, "cannot list: {e}");
        }
        let listed = entries.len() as u64;
        self.fs.stats.listed.fetch_add(listed, Ordering::Relaxed);
        let mut batch = Vec::new();
        let mut size = 0;
        for entry in entries {
            size += 64
                + entry.path.as_bytes().len()
                + entry.link.as_ref().map_or(0, Vec::len)
                + entry
                    .meta
                    .xattrs
                    .list
                    .iter()
                    .map(|(n, v)| n.len() + v.len())
                    .sum::<usize>();
            batch.push(entry);
            if size >= LISTING_BATCH_BYTES {
                let entries = std::mem::take(&mut batch);
                if !self.reply(Message::Listing {
                    id,
                    entries,
                    done: false,
                }) {
                    return;
                }
                size = 0;
            }
        }
        self.reply(Message::Listing {
            id,
            entries: batch,
            done: true,
        });
    }

    /// Answers `Summarize`: one directory of the module's summary, walked anew for the root
    /// (each compare starts there) or when the comparison asked for changes.
    fn summarize(&mut self, id: RequestId, rel: &RelPath, xattrs: Namespaces, hardlinks: bool) {
        if let Err(e) = rel.validate() {
            return self.fail(id, format!("{rel}: {e}"));
        }
        let keeps = &self.fs.keeps;
        let rules = Rules {
            cmp: Compare {
                owner: keeps.owners,
                setid: keeps.setid,
                xattrs: xattrs.intersect(keeps.xattrs),
                hardlinks,
            },
            devices: keeps.devices,
        };
        let root = match local::open_root(&self.fs.tree_root()) {
            Ok(r) => r,
            Err(e) => return self.fail(id, format!("summary: {e}")),
        };
        let mut errors = Vec::new();
        let stale = self.summary.as_ref().is_none_or(|s| s.rules() != rules);
        if rel.is_root() || stale {
            let summaries = &self.fs.state.summaries;
            let (built, kept) = summaries.build(&root, rules, &module_filter, &mut errors);
            tracing::debug!(module = self.fs.module(), kept, "summary built");
            self.summary = Some(built);
        }
        let summary = self.summary.as_ref().expect("built above");
        let answer = summary.listing(&root, rel, &module_filter, &mut errors);
        for (p, e) in &errors {
            tracing::warn!(module = self.fs.module(), path = %p, "summary: {e}");
        }
        match answer {
            Ok(listing) => {
                self.fs.stats.summarised.fetch_add(1, Ordering::Relaxed);
                let below = summary.below(rel);
                let (dir, entries) = listing.map_or((None, Vec::new()), |(d, e)| (Some(d), e));
                self.reply_digests(id, entries, |entries| Message::Summary {
                    id,
                    dir,
                    entries,
                    below,
                });
            }
            Err(e) => self.fail(id, format!("summary of {rel}: {e}")),
        }
    }

    fn verify_dir(
        &mut self,
        id: RequestId,
        rel: &RelPath,
        checksum: bool,
        xattrs: Namespaces,
        hardlinks: bool,
    ) {
        if let Err(e) = rel.validate() {
            return self.fail(id, format!("{rel}: {e}"));
        }
        let cmp = Compare::all(self.fs.keeps.owners).with(xattrs, hardlinks);
        if self.tree.as_ref().map(|(c, cmp, _)| (*c, *cmp)) != Some((checksum, cmp)) {
            let mut errors = Vec::new();
            let built = {
                let mut cache = self.fs.state.cache.lock().expect("cache lock");
                DigestTree::build(
                    &self.fs.tree_root(),
                    &module_filter,
                    &mut cache,
                    cmp,
                    checksum,
                    &mut errors,
                )
            };
            for (p, e) in &errors {
                tracing::warn!(module = self.fs.module(), path = %p, "verify: {e}");
            }
            match built {
                Ok(tree) => self.tree = Some((checksum, cmp, tree)),
                Err(e) => return self.fail(id, format!("verify: {e}")),
            }
        }
        let (_, _, tree) = self.tree.as_ref().expect("built above");
        let (dir, entries) = match tree.dirs.get(rel) {
            Some(listing) => (Some(listing.dir.entry.clone()), listing.entries.clone()),
            None => (None, Vec::<DigestEntry>::new()),
        };
        self.reply_digests(id, entries, |entries| Message::DirDigests {
            id,
            dir,
            entries,
        });
    }

    /// Answers request `id` with a directory's digest `entries`: in `MoreDigests` steps
    /// while they are too many for one frame, the last of them in `last`.
    fn reply_digests(
        &self,
        id: RequestId,
        entries: Vec<DigestEntry>,
        last: impl FnOnce(Vec<DigestEntry>) -> Message,
    ) -> bool {
        let mut batches = ferry_protocol::message::digest_batches(entries);
        let final_batch = batches.pop().unwrap_or_default();
        for entries in batches {
            if !self.reply(Message::MoreDigests { id, entries }) {
                return false;
            }
        }
        self.reply(last(final_batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::tests::module_at;
    use ferry_protocol::body::BodyDigest;
    use ferry_protocol::message::Body;
    use ferry_protocol::meta::{Kind, Meta};

    fn session(dir: &std::path::Path) -> (Requests, mpsc::Receiver<Message>) {
        session_of(module_at(dir, false))
    }

    fn session_of(module: crate::config::Module) -> (Requests, mpsc::Receiver<Message>) {
        let state = Arc::new(ModuleState::open(module, None).unwrap());
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(Stats::default());
        (Requests::new(state, stats, false, true, tx), rx)
    }

    /// One whole file through the loop, each request followed by what the loop does between
    /// requests.
    fn send_file(r: &mut Requests, id: RequestId, path: &str, body: &[u8]) {
        for msg in file_messages(id, path, body) {
            assert!(matches!(r.handle(msg), Flow::Continue));
            assert!(r.step_commit());
        }
    }

    /// One whole file through the loop without moving the commit on between its requests:
    /// sealed while a round flushes (moving it on could end the round between two files).
    fn seal_file(r: &mut Requests, id: RequestId, path: &str, body: &[u8]) {
        for msg in file_messages(id, path, body) {
            assert!(matches!(r.handle(msg), Flow::Continue));
        }
    }

    fn answers(rx: &mut mpsc::Receiver<Message>) -> Vec<Message> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// The requests answered so far, in the order answered; each answer an `Ack`.
    fn acked(rx: &mut mpsc::Receiver<Message>) -> Vec<RequestId> {
        answers(rx)
            .iter()
            .map(|m| match m {
                Message::Ack { id } => *id,
                other => panic!("{}", other.name()),
            })
            .collect()
    }

    /// The messages of one whole file.
    fn file_messages(id: RequestId, path: &str, body: &[u8]) -> [Message; 3] {
        let meta = Meta {
            kind: Kind::File,
            mode: 0o640,
            uid: 0,
            gid: 0,
            size: body.len() as u64,
            mtime: 1_700_000_000,
            mtime_nsec: 0,
            rdev: 0,
            xattrs: Default::default(),
        };
        let mut digest = BodyDigest::new();
        digest.data(body);
        [
            Message::FileBegin {
                id,
                path: RelPath::from(path),
                meta,
                body: Body::Whole,
            },
            Message::FileData {
                id,
                data: body.to_vec(),
            },
            Message::FileEnd {
                id,
                digest: digest.digest(),
            },
        ]
    }

    /// The module's summary is kept from one `Summarize` of the root to the next, and a
    /// change the loop makes in place (a file's mode, which moves no directory's ctime) is
    /// found by the next one: it equals a summary read afresh.
    #[test]
    fn a_change_in_place_is_found_by_the_next_kept_summary() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"f").unwrap();
        let (mut r, mut rx) = session(dir.path());
        let mut id = 0;
        let mut summarize = |r: &mut Requests, rx: &mut mpsc::Receiver<Message>| {
            id += 1;
            let msg = Message::Summarize {
                id,
                path: RelPath::root(),
                xattrs: Namespaces::NONE,
                hardlinks: false,
            };
            assert!(matches!(r.handle(msg), Flow::Continue));
            match answers(rx).pop() {
                Some(Message::Summary { entries, .. }) => entries,
                other => panic!("expected Summary, got {other:?}"),
            }
        };
        let taken = |r: &Requests| r.fs.state.summaries.taken.load(Ordering::Relaxed);
        // Kept once every directory's ctime has settled (root, a, a/b).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let before = loop {
            let entries = summarize(&mut r, &mut rx);
            if taken(&r) == 3 {
                break entries;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing kept after 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let mut meta = local::read_entry_at(
            &local::open_root(dir.path()).unwrap(),
            &RelPath::from("a/b/f"),
            Namespaces::NONE,
            &mut Vec::new(),
        )
        .unwrap()
        .unwrap()
        .meta;
        meta.mode = 0o600;
        let set = Message::SetMeta {
            id: 100,
            path: RelPath::from("a/b/f"),
            meta,
        };
        assert!(matches!(r.handle(set), Flow::Continue));
        assert!(r.commit());
        assert!(matches!(answers(&mut rx)[..], [Message::Ack { id: 100 }]));
        let after = summarize(&mut r, &mut rx);
        assert!(taken(&r) < 3, "a/b and its ancestors read again");
        assert_ne!(before, after);
        let fresh = Summary::build(
            &local::open_root(dir.path()).unwrap(),
            r.summary.as_ref().unwrap().rules(),
            &module_filter,
            Namespaces::NONE,
            Namespaces::NONE,
            &mut Vec::new(),
        );
        let held = local::open_root(dir.path()).unwrap();
        let (_, listed) = fresh
            .listing(&held, &RelPath::root(), &module_filter, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(after, listed);
    }

    /// A burst that ends while its commit runs behind the loop: the loop hands its thread
    /// back without waiting for the flush, and the flush's end wakes it to name and answer
    /// everything, with no further request and the session still open.
    #[tokio::test]
    async fn a_burst_ending_while_its_commit_runs_behind_is_answered_without_another_request() {
        let dir = tempfile::tempdir().unwrap();
        let (r, mut rx) = session(dir.path());
        let (tx, requests) = mpsc::channel(1024);
        let n = 3 * BEHIND_MIN as u64;
        for i in 0..n {
            for msg in file_messages(i, &format!("f{i}"), format!("body {i}").as_bytes()) {
                tx.send(Request { msg, _budget: None }).await.unwrap();
            }
        }
        let serving = tokio::spawn(r.serve(requests));
        let mut acked = Vec::new();
        while acked.len() < n as usize {
            match tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv()).await {
                Ok(Some(Message::Ack { id })) => acked.push(id),
                Ok(other) => panic!("expected Ack, got {other:?}"),
                Err(_) => panic!("{} of {n} acknowledged, then nothing", acked.len()),
            }
        }
        acked.sort();
        assert_eq!(acked, (0..n).collect::<Vec<_>>());
        for i in 0..n {
            let got = std::fs::read(dir.path().join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("body {i}").as_bytes());
        }
        drop(tx);
        serving.await.unwrap();
    }

    /// From [`BEHIND_MIN`] sealed files on, the commit's flushes run behind the loop: the
    /// loop goes on taking requests, and nothing is named or answered until the flush ends.
    #[test]
    fn a_commit_runs_behind_the_loop_and_answers_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut rx) = session(dir.path());
        for i in 0..BEHIND_MIN {
            send_file(
                &mut r,
                i as u64,
                &format!("f{i}"),
                format!("body {i}").as_bytes(),
            );
        }
        assert!(r.in_flight.is_some(), "a commit began behind the loop");
        // It is named and answered only when the loop moves it on, after its flush.
        assert!(!dir.path().join("f0").exists());
        assert!(answers(&mut rx).is_empty());
        // The loop takes the next file meanwhile.
        send_file(&mut r, 100, "later", b"later");
        assert!(r.commit());
        let mut acked = acked(&mut rx);
        acked.sort();
        let mut want: Vec<u64> = (0..BEHIND_MIN as u64).collect();
        want.push(100);
        assert_eq!(acked, want);
        for i in 0..BEHIND_MIN {
            let got = std::fs::read(dir.path().join(format!("f{i}"))).unwrap();
            assert_eq!(got, format!("body {i}").as_bytes());
        }
        assert_eq!(std::fs::read(dir.path().join("later")).unwrap(), b"later");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("f0"))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o7777, 0o640);
    }

    /// A round's flush serves two commits: when it ends, its files are named, and with a
    /// burst's worth waiting the next round begins at once, making those names durable in
    /// the same pass as the data of the files sealed meanwhile, which it names in turn — no
    /// flush waits for one that does only one thing.
    #[test]
    fn a_round_makes_the_last_names_durable_with_the_next_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut rx) = session(dir.path());
        for i in 0..BEHIND_MIN {
            send_file(&mut r, i as u64, &format!("a{i}"), b"first");
        }
        assert!(r.in_flight.is_some(), "the first round began");
        // Sealed while the first round flushes.
        for i in 0..BURST_COMMIT {
            seal_file(&mut r, 1000 + i as u64, &format!("b{i}"), b"second");
        }
        assert!(r.end_round());
        let next = r
            .in_flight
            .as_ref()
            .expect("the first round's end began the next");
        assert_eq!(
            next.files.len(),
            BEHIND_MIN,
            "it holds the names just given"
        );
        assert_eq!(
            next.data.len(),
            BURST_COMMIT,
            "and the data sealed meanwhile"
        );
        assert_eq!(r.fs.sealed(), 0);
        assert!(dir.path().join("a0").exists() && !dir.path().join("b0").exists());
        assert!(
            answers(&mut rx).is_empty(),
            "nothing answered before its names are durable"
        );
        assert!(r.end_round());
        let first: Vec<RequestId> = acked(&mut rx);
        assert_eq!(first, (0..BEHIND_MIN as u64).collect::<Vec<_>>());
        assert!(dir.path().join("b0").exists());
        assert!(
            r.in_flight.is_some(),
            "a burst's worth of names began a round"
        );
        assert!(r.advance(true));
        assert!(r.in_flight.is_none());
        assert_eq!(answers(&mut rx).len(), BURST_COMMIT);
        assert_eq!(std::fs::read(dir.path().join("b7")).unwrap(), b"second");
    }

    /// The peer goes while a round flushes: the round's end names the files whose data it
    /// flushed, and the history keeps the states those names replace; nobody is left to
    /// answer, but the session's end journals those states all the same (an object without
    /// its row waited for the next start-up check, which adopts it without its path).
    #[test]
    fn states_kept_after_the_peer_went_are_journaled_when_the_session_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (module, history) = (dir.path().join("m"), dir.path().join("h"));
        std::fs::create_dir(&module).unwrap();
        let names: Vec<String> = (0..BEHIND_MIN)
            .map(|i| format!("a{i}"))
            .chain((0..BURST_COMMIT).map(|i| format!("b{i}")))
            .collect();
        for n in &names {
            std::fs::write(module.join(n), b"old").unwrap();
        }
        let mut m = module_at(&module, false);
        m.history = Some(crate::config::HistoryConfig {
            dir: history.clone(),
            keep: crate::history::Keep {
                min_free_percent: 0,
                ..Default::default()
            },
        });
        let (mut r, rx) = session_of(m);
        for (i, n) in names[..BEHIND_MIN].iter().enumerate() {
            send_file(&mut r, i as u64, n, b"new");
        }
        assert!(r.in_flight.is_some(), "the first round began");
        for (i, n) in names[BEHIND_MIN..].iter().enumerate() {
            seal_file(&mut r, 1000 + i as u64, n, b"new");
        }
        // The first round names a*, and the next makes those names durable with b*'s data.
        assert!(r.end_round());
        assert!(r.in_flight.is_some());
        drop(rx);
        r.close();
        for n in &names {
            assert_eq!(std::fs::read(module.join(n)).unwrap(), b"new", "{n}");
        }
        let objects: std::collections::BTreeSet<i64> =
            std::fs::read_dir(history.join(crate::history::OBJECTS))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
                .collect();
        assert_eq!(objects.len(), names.len(), "a state kept per name");
        let db = rusqlite::Connection::open(history.join(crate::history::JOURNAL)).unwrap();
        let mut q = db
            .prepare("SELECT id FROM versions WHERE object = 1 AND action = 'replaced'")
            .unwrap();
        let rows: std::collections::BTreeSet<i64> = q
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, objects, "journal rows and objects");
    }

    /// With fewer than a burst's worth waiting when a round ends (flushes quicker than the
    /// stream), its names wait for the next commit instead of a round of their own, and are
    /// answered by it — here the one a dry queue begins.
    #[test]
    fn a_few_names_wait_for_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut rx) = session(dir.path());
        for i in 0..BEHIND_MIN {
            send_file(&mut r, i as u64, &format!("a{i}"), b"first");
        }
        for i in 0..3 {
            seal_file(&mut r, 100 + i, &format!("c{i}"), b"third");
        }
        assert!(r.end_round());
        assert!(r.in_flight.is_none(), "no round for a few names");
        assert!(dir.path().join("a0").exists());
        assert!(
            answers(&mut rx).is_empty(),
            "their names are not durable yet"
        );
        assert!(r.commit_waiting());
        let round = r.in_flight.as_ref().expect("a round behind the loop");
        assert_eq!((round.files.len(), round.data.len()), (BEHIND_MIN, 3));
        assert!(r.advance(true));
        let mut acked: Vec<RequestId> = acked(&mut rx);
        acked.sort();
        let mut want: Vec<RequestId> = (0..BEHIND_MIN as u64).collect();
        want.extend(100..103);
        assert_eq!(acked, want);
        assert_eq!(std::fs::read(dir.path().join("c2")).unwrap(), b"third");
    }

    /// Within a burst, once its first commit has ended, the next begins only when
    /// [`BURST_COMMIT`] changes wait (fewer, larger flushes); what is still waiting is
    /// committed all the same when asked, and every file is answered once.
    #[test]
    fn a_later_commit_of_a_burst_waits_for_a_burst_of_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut rx) = session(dir.path());
        let mut id = 0u64;
        let mut file = |r: &mut Requests| {
            send_file(r, id, &format!("f{id}"), b"x");
            id += 1;
        };
        for _ in 0..BEHIND_MIN {
            file(&mut r);
        }
        assert!(
            r.in_flight.is_some(),
            "the burst's first commit began at once"
        );
        assert!(r.advance(true));
        assert!(r.in_flight.is_none());
        assert_eq!(answers(&mut rx).len(), BEHIND_MIN);
        for _ in 0..BURST_COMMIT - 1 {
            file(&mut r);
            assert!(r.in_flight.is_none(), "began after {id} files");
        }
        file(&mut r);
        assert!(r.in_flight.is_some(), "began once {BURST_COMMIT} waited");
        file(&mut r);
        assert!(r.commit());
        let acked: std::collections::BTreeSet<RequestId> = acked(&mut rx).into_iter().collect();
        assert_eq!(acked, (BEHIND_MIN as u64..id).collect());
        assert!(dir.path().join(format!("f{}", id - 1)).exists());
    }

    /// A request on a file whose commit is under way waits until it has its name: a rename
    /// of it finds it (without the wait it is declined, the file not being there yet).
    #[test]
    fn a_request_on_a_file_in_a_commit_under_way_waits_for_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut rx) = session(dir.path());
        for i in 0..BEHIND_MIN {
            send_file(&mut r, i as u64, &format!("f{i}"), b"x");
        }
        assert!(r.in_flight.is_some(), "a commit began behind the loop");
        let rename = Message::Rename {
            id: 100,
            from: RelPath::from("f0"),
            to: RelPath::from("g0"),
        };
        assert!(matches!(r.handle(rename), Flow::Continue));
        assert!(r.commit());
        let all = answers(&mut rx);
        assert!(
            all.iter().all(|m| matches!(m, Message::Ack { .. })),
            "{:?}",
            all.iter().map(|m| m.name()).collect::<Vec<_>>()
        );
        assert!(matches!(all.last(), Some(Message::Ack { id: 100 })));
        assert!(dir.path().join("g0").exists() && !dir.path().join("f0").exists());
    }
}
