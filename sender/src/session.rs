//! A sender's connection to one receiver module: requests go out through a writer task,
//! replies are routed back to whoever issued the request by a reader task. Many requests can
//! be in flight at once.

use crate::dial::dial;
pub use crate::error::SessionError;
use ferry_protocol::connection::{
    client_handshake, ConnError, FrameReader, FrameWriter, STALL_TIMEOUT,
};
use ferry_protocol::identity::Identity;
use ferry_protocol::message::{DigestEntry, Intent, Keeps, Message, RequestId, Version};
use ferry_protocol::meta::Compare;
use ferry_protocol::pace::Pace;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::{Entry, Fingerprint, RelPath};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Where the reader hands one request's replies: its one final reply, or (for a listing or a
/// file, which are answered in steps) each reply as it comes. Neither ever makes the reader
/// wait on a slow consumer (one request's replies held up would hold up every other's).
enum Waiter {
    Once(oneshot::Sender<Message>),
    Many(mpsc::UnboundedSender<Message>),
}

type Pending = Arc<Mutex<HashMap<RequestId, Waiter>>>;

/// Where the replies to a request answered in steps arrive (unbounded: what queues there is
/// what that request asked for, a listing or a signature and its answer).
pub type Replies = mpsc::UnboundedReceiver<Message>;

/// What became of a `Delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed: the entries it took, as the receiver counted them (`None`: not counted).
    Done(Option<u64>),
    /// Not removed: it would take at least this many entries, past the session's allowance.
    Held(u64),
}

/// Where the one final reply to a request arrives, with the path it is about.
pub struct Answer {
    rx: oneshot::Receiver<Message>,
    about: RelPath,
}

/// An open session on one module. Shared as `Arc<Session>` by the requests in flight; any
/// holder may [`Session::close`] it, and the connection goes when the last holder does.
pub struct Session {
    address: String,
    /// What logs call it: the configured target's name, else its address.
    target: String,
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    /// What the receiver keeps in this module (owners, devices, setuid bits).
    pub keeps: Keeps,
    bytes_sent: Arc<AtomicU64>,
    writer: tokio::task::JoinHandle<()>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Aborts the reader when the session goes (whoever took the handle to wait on it).
    reader_abort: tokio::task::AbortHandle,
    lost: Arc<Mutex<Option<String>>>,
    /// Cancelled the moment the connection is gone (the reader saw it end, fail or fall
    /// silent), whether or not anything was asked of it.
    ended: CancellationToken,
    /// Paths refused on this session, warned about at most [`PATHS_WARNED_A_MINUTE`] a
    /// minute (a cause that fails every path, the backup host's disk full, must not flood
    /// the log at each retry): the rest are debug lines, counted and said in one line.
    refusals: Mutex<ferry_protocol::said::Said>,
}

/// Refused paths warned about a minute, on one session.
pub const PATHS_WARNED_A_MINUTE: u64 = 10;

impl Session {
    /// Connects to `address`, pins `fingerprint`, and opens `module` with `intent`; file
    /// bodies are packed with zstd if `compress`.
    pub async fn connect(
        address: &str,
        fingerprint: Fingerprint,
        identity: &Identity,
        module: &str,
        intent: Intent,
        compress: bool,
    ) -> Result<Session, SessionError> {
        let stream = dial(address, fingerprint, identity).await?;
        Session::over(stream, address, module, intent, compress)
            .await
            .map_err(|source| SessionError::Conn {
                address: address.to_string(),
                source,
            })
    }

    /// Opens `module` with `intent` over an already authenticated stream (TLS in daemons, an
    /// in-memory pipe in tests). `address` names the peer in errors.
    pub async fn over<S>(
        stream: S,
        address: &str,
        module: &str,
        intent: Intent,
        compress: bool,
    ) -> Result<Session, ConnError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Session::open(stream, address, module, intent, compress, None).await
    }

    /// [`Session::over`], what it sends held to `pace` if any (a target's `bwlimit_kib`).
    pub(crate) async fn open<S>(
        stream: S,
        address: &str,
        module: &str,
        intent: Intent,
        compress: bool,
        pace: Option<Arc<Pace>>,
    ) -> Result<Session, ConnError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w).pack_data(compress).paced(pace);
        let keeps = client_handshake(&mut reader, &mut writer, module, intent).await?;
        Ok(Session::started(reader, writer, address, keeps))
    }

    /// A session whose handshake is done, over its two halves: the sender's, or the backup
    /// host's side of a restore, where the roles turn round after the client's `Restore` and
    /// `keeps` is what the client's destination keeps.
    pub fn started<R, W>(
        mut reader: FrameReader<R>,
        writer: FrameWriter<W>,
        address: &str,
        keeps: Keeps,
    ) -> Session
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::channel::<Message>(16);
        let bytes_sent = Arc::new(AtomicU64::new(writer.bytes_written()));
        let lost = Arc::new(Mutex::new(None));
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));

        let ended = CancellationToken::new();
        let sent = bytes_sent.clone();
        let (lost_w, ended_w) = (lost.clone(), ended.clone());
        let writer_task = tokio::spawn(async move {
            let pumped = writer
                .pump(out_rx, 16, |n| sent.store(n, Ordering::Relaxed))
                .await;
            if let Err(e) = pumped {
                lost_w.lock().expect("lock").get_or_insert(e.to_string());
                ended_w.cancel();
            }
        });

        let pending_r = pending.clone();
        let (lost_r, ended_r) = (lost.clone(), ended.clone());
        let heard = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let stalled = stall_watch(&pending, heard.clone());
        let reader_task = tokio::spawn(async move {
            let why = loop {
                let read = tokio::select! {
                    r = reader.read() => r,
                    _ = stalled.notified() => {
                        break format!(
                            "no word from the receiver for {} s (it says Alive every {} s); \
                             giving the connection up",
                            STALL_TIMEOUT.as_secs(),
                            ferry_protocol::connection::HEARTBEAT.as_secs()
                        );
                    }
                };
                *heard.lock().expect("lock") = tokio::time::Instant::now();
                match read {
                    Ok(Some(Message::Alive)) => {}
                    Ok(Some(Message::Refused { reason })) => break format!("receiver: {reason}"),
                    Ok(Some(msg)) => {
                        let Some(id) = msg.reply_id() else {
                            break format!("unexpected {} from receiver", msg.name());
                        };
                        // A reply to no request in flight (answered already, or never asked)
                        // or a step of an answer to a request answered once is a violation.
                        // `Failed` is not: it also answers a message the receiver could not
                        // place (data for a transfer it already failed).
                        let mut map = pending_r.lock().expect("lock");
                        if msg.is_final_reply() {
                            match map.remove(&id) {
                                Some(Waiter::Once(tx)) => drop(tx.send(msg)),
                                Some(Waiter::Many(tx)) => drop(tx.send(msg)),
                                None if matches!(msg, Message::Failed { .. }) => {}
                                None => {
                                    break format!(
                                        "protocol violation: {} for no request in flight",
                                        msg.name()
                                    )
                                }
                            }
                        } else {
                            match map.get(&id) {
                                Some(Waiter::Many(tx)) => drop(tx.send(msg)),
                                _ => {
                                    break format!("protocol violation: unexpected {}", msg.name())
                                }
                            }
                        };
                    }
                    Ok(None) => break "closed by receiver".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            lost_r.lock().expect("lock").get_or_insert(why);
            // Dropping the senders wakes everyone still waiting.
            pending_r.lock().expect("lock").clear();
            ended_r.cancel();
        });

        Session {
            address: address.to_string(),
            target: address.to_string(),
            out,
            pending,
            next_id: AtomicU64::new(1),
            keeps,
            bytes_sent,
            writer: writer_task,
            reader_abort: reader_task.abort_handle(),
            reader: Mutex::new(Some(reader_task)),
            lost,
            ended,
            refusals: Mutex::new(ferry_protocol::said::Said::per_minute(
                PATHS_WARNED_A_MINUTE,
            )),
        }
    }

    /// Waits until the connection is gone — closed or reset by the receiver, failed, or
    /// silent past [`STALL_TIMEOUT`] — even when nothing was asked of it; returns why.
    pub async fn lost(&self) -> String {
        self.ended.cancelled().await;
        self.lost_error().to_string()
    }

    /// The receiver address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The name logs give it: the configured target's (see [`Session::named`]), else its
    /// address — so a target is named the same way in every line.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Logs that `path` failed (`error`): a warning for the first [`PATHS_WARNED_A_MINUTE`]
    /// of a minute, a debug line after, and, with the next minute's first, one warning
    /// counting those.
    pub fn path_failed(&self, path: &RelPath, error: &str) {
        let (warn, unsaid) = self
            .refusals
            .lock()
            .expect("refusals lock")
            .note(std::time::Instant::now());
        let target = &self.target;
        if unsaid > 0 {
            tracing::warn!(
                %target,
                "{unsaid} more paths failed since the last of these warnings (at debug level); \
                 each is retried"
            );
        }
        if warn {
            tracing::warn!(%path, %target, "{error}");
        } else {
            tracing::debug!(%path, %target, "{error}");
        }
    }

    /// The session of the configured target `name`.
    pub fn named(mut self, name: &str) -> Session {
        self.target = name.to_string();
        self
    }

    /// Frame bytes written to the receiver so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    fn lost_error(&self) -> SessionError {
        let why = self
            .lost
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_else(|| "connection lost".into());
        SessionError::Lost(format!("{}: {why}", self.address))
    }

    /// Registers a new request id and the channel its replies arrive on, for a request
    /// answered in steps (a file, a listing).
    pub fn register(&self) -> (RequestId, Replies) {
        let id = self.reserve();
        (id, self.register_as(id))
    }

    /// A fresh request id, its replies not yet awaited: for frames made before it is known
    /// whether the request goes out at all ([`Session::register_as`] once it does).
    pub fn reserve(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// [`Session::register`] under an id from [`Session::reserve`].
    pub fn register_as(&self, id: RequestId) -> Replies {
        let (tx, rx) = mpsc::unbounded_channel();
        self.enter_as(id, Waiter::Many(tx));
        rx
    }

    fn enter(&self, waiter: Waiter) -> RequestId {
        let id = self.reserve();
        self.enter_as(id, waiter);
        id
    }

    fn enter_as(&self, id: RequestId, waiter: Waiter) {
        self.pending.lock().expect("lock").insert(id, waiter);
        // The reader records the loss before it clears `pending`: if the loss is already
        // recorded, nobody will clear this entry, so drop its sender here and the caller's
        // wait ends at once.
        if self.lost.lock().expect("lock").is_some() {
            self.pending.lock().expect("lock").remove(&id);
        }
    }

    /// Requests whose replies are awaited.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.pending.lock().expect("lock").len()
    }

    /// Queues a message for the writer task; messages go out in call order.
    pub async fn send(&self, msg: Message) -> Result<(), SessionError> {
        self.out.send(msg).await.map_err(|_| self.lost_error())
    }

    /// A handle for sending from blocking code (file readers).
    pub fn sender(&self) -> mpsc::Sender<Message> {
        self.out.clone()
    }

    /// Waits for the next reply on `rx`.
    pub async fn reply(&self, rx: &mut Replies) -> Result<Message, SessionError> {
        rx.recv().await.ok_or_else(|| self.lost_error())
    }

    /// Waits for the final reply of a request answered in steps, about `path`, and turns
    /// `Failed` into a refusal.
    pub async fn expect_ack(&self, rx: &mut Replies, path: &RelPath) -> Result<(), SessionError> {
        let reply = self.reply(rx).await?;
        self.acked(reply, path)
    }

    fn acked(&self, reply: Message, path: &RelPath) -> Result<(), SessionError> {
        match reply {
            Message::Ack { .. } => Ok(()),
            other => Err(self.unanswered(other, path)),
        }
    }

    /// The error for `reply`, which is not the answer a request about `path` wanted.
    fn unanswered(&self, reply: Message, path: &RelPath) -> SessionError {
        match reply {
            Message::Failed { error, .. } => SessionError::Refused {
                path: path.clone(),
                reason: error,
            },
            other => SessionError::Protocol {
                address: self.address.clone(),
                what: format!("unexpected {}", other.name()),
            },
        }
    }

    /// Sends a request built from a fresh id and waits for its acknowledgement.
    pub async fn call(&self, make: impl FnOnce(RequestId) -> Message) -> Result<(), SessionError> {
        let answer = self.start(make).await?;
        self.ack(answer).await
    }

    /// Sends a request answered once (not a listing or a file: see [`Session::register`])
    /// built from a fresh id; returns where its one final reply will arrive.
    pub async fn start(
        &self,
        make: impl FnOnce(RequestId) -> Message,
    ) -> Result<Answer, SessionError> {
        let (tx, rx) = oneshot::channel();
        let msg = make(self.enter(Waiter::Once(tx)));
        debug_assert!(
            !matches!(
                msg,
                Message::List { .. }
                    | Message::FileBegin { .. }
                    | Message::History { .. }
                    | Message::Summarize { .. }
                    | Message::VerifyDir { .. }
            ),
            "{} is answered in steps",
            msg.name()
        );
        let about = msg.subject().cloned().unwrap_or_default();
        self.send(msg).await?;
        Ok(Answer { rx, about })
    }

    /// Waits for a request's one final reply.
    pub async fn answer(&self, answer: Answer) -> Result<(Message, RelPath), SessionError> {
        match answer.rx.await {
            Ok(reply) => Ok((reply, answer.about)),
            Err(_) => Err(self.lost_error()),
        }
    }

    /// Waits for a request's acknowledgement; `Failed` is a refusal naming its path.
    pub async fn ack(&self, answer: Answer) -> Result<(), SessionError> {
        let (reply, about) = self.answer(answer).await?;
        self.acked(reply, &about)
    }

    /// Waits for the answer to a `Delete`: what it removed (the entries as the receiver
    /// counted them under an allowance; `None` when answered `Ack`, uncounted), or that it was
    /// held back past the allowance.
    pub async fn deleted(&self, answer: Answer) -> Result<Removal, SessionError> {
        let (reply, about) = self.answer(answer).await?;
        match reply {
            Message::Deleted {
                entries,
                held: false,
                ..
            } => Ok(Removal::Done(Some(entries))),
            Message::Deleted {
                entries,
                held: true,
                ..
            } => Ok(Removal::Held(entries)),
            other => self.acked(other, &about).map(|()| Removal::Done(None)),
        }
    }

    /// The listing of the subtree at `under` (the root for the whole module), in tree order,
    /// with the attributes in `xattrs`; empty if it does not exist on the receiver.
    pub async fn list(
        &self,
        under: &RelPath,
        xattrs: Namespaces,
    ) -> Result<Vec<Entry>, SessionError> {
        let (id, mut rx) = self.register();
        let under_ = under.clone();
        self.send(Message::List {
            id,
            under: under_,
            xattrs,
        })
        .await?;
        let mut out = Vec::new();
        loop {
            match self.reply(&mut rx).await? {
                Message::Listing { entries, done, .. } => {
                    out.extend(entries);
                    if done {
                        return Ok(out);
                    }
                }
                other => return Err(self.unanswered(other, under)),
            }
        }
    }

    /// The versions the module's history keeps at or below `under`, oldest first (a refusal
    /// for a module without history).
    pub async fn history(&self, under: &RelPath) -> Result<Vec<Version>, SessionError> {
        let (id, mut rx) = self.register();
        let under_ = under.clone();
        self.send(Message::History { id, under: under_ }).await?;
        let mut out = Vec::new();
        loop {
            match self.reply(&mut rx).await? {
                Message::Versions { versions, done, .. } => {
                    out.extend(versions);
                    if done {
                        return Ok(out);
                    }
                }
                other => return Err(self.unanswered(other, under)),
            }
        }
    }

    /// One directory's digests, covering the attributes and links `cmp` compares.
    pub async fn verify_dir(
        &self,
        path: &RelPath,
        checksum: bool,
        cmp: Compare,
    ) -> Result<(Option<Entry>, Vec<DigestEntry>), SessionError> {
        let (id, mut rx) = self.register();
        self.send(Message::VerifyDir {
            id,
            path: path.clone(),
            checksum,
            xattrs: cmp.xattrs,
            hardlinks: cmp.hardlinks,
        })
        .await?;
        let mut all = Vec::new();
        match self.digests(&mut rx, &mut all, path).await? {
            Message::DirDigests { dir, entries, .. } => {
                all.extend(entries);
                Ok((dir, all))
            }
            other => Err(self.unanswered(other, path)),
        }
    }

    /// The summaries of the directories at `paths` (each its metadata, if a directory there,
    /// its entries with their digests, and how many entries it holds below), asked for all at
    /// once and answered in order.
    pub async fn summaries(
        &self,
        paths: &[RelPath],
        cmp: Compare,
    ) -> Result<Vec<Summarized>, SessionError> {
        let mut asked = Vec::with_capacity(paths.len());
        for path in paths {
            let (id, rx) = self.register();
            self.send(Message::Summarize {
                id,
                path: path.clone(),
                xattrs: cmp.xattrs,
                hardlinks: cmp.hardlinks,
            })
            .await?;
            asked.push(rx);
        }
        let mut out = Vec::with_capacity(asked.len());
        for (mut rx, path) in asked.into_iter().zip(paths) {
            let mut all = Vec::new();
            match self.digests(&mut rx, &mut all, path).await? {
                Message::Summary {
                    dir,
                    entries,
                    below,
                    ..
                } => {
                    all.extend(entries);
                    let stray = all
                        .iter()
                        .find(|e| e.entry.path.parent().as_ref() != Some(path));
                    if let Some(e) = stray {
                        return Err(SessionError::Protocol {
                            address: self.address.clone(),
                            what: format!("a summary of {path:?} holds {:?}", e.entry.path),
                        });
                    }
                    out.push(Summarized {
                        dir,
                        entries: all,
                        below,
                    })
                }
                other => return Err(self.unanswered(other, path)),
            }
        }
        Ok(out)
    }

    /// Takes the `MoreDigests` steps of the answer about the directory `path` into `all`;
    /// returns its final reply.
    async fn digests(
        &self,
        rx: &mut Replies,
        all: &mut Vec<DigestEntry>,
        path: &RelPath,
    ) -> Result<Message, SessionError> {
        loop {
            match self.reply(rx).await? {
                Message::MoreDigests { entries, .. } => all.extend(entries),
                reply @ (Message::Summary { .. } | Message::DirDigests { .. }) => return Ok(reply),
                other => return Err(self.unanswered(other, path)),
            }
        }
    }

    /// The receiver's counters.
    pub async fn stats(&self) -> Result<Vec<(String, u64)>, SessionError> {
        let answer = self.start(|id| Message::Stats { id }).await?;
        match self.answer(answer).await?.0 {
            Message::StatsReply { counters, .. } => Ok(counters),
            other => Err(self.unanswered(other, &RelPath::root())),
        }
    }

    /// Says goodbye and waits (30 s at most) for the receiver to answer everything sent
    /// before and close. Whoever holds the session may close it, whatever other holders
    /// remain: they see the session lost from then on. A second close returns at once.
    pub async fn close(&self) {
        let reader = self.reader.lock().expect("lock").take();
        let Some(reader) = reader else {
            return;
        };
        if self.out.send(Message::Bye).await.is_ok() {
            // The receiver closes once it has answered everything before `Bye`.
            let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
        }
    }
}

/// The receiver's summary of one directory (see [`Session::summaries`]).
#[derive(Debug)]
pub struct Summarized {
    /// The directory itself; `None` if it is not one there.
    pub dir: Option<Entry>,
    /// Its entries, sorted by name, with their digests.
    pub entries: Vec<DigestEntry>,
    /// How many entries it holds below.
    pub below: u64,
}

impl Drop for Session {
    /// A session given up (lost, stalled, abandoned) lets go of its connection at once.
    fn drop(&mut self) {
        self.writer.abort();
        self.reader_abort.abort();
    }
}

/// Watches a session for silence (on tokio's clock, so virtual time in tests): with nothing
/// heard from the receiver for [`STALL_TIMEOUT`] — it says `Alive` every `HEARTBEAT` on every
/// session, so this holds for an idle session too — wakes the reader (through the returned
/// `Notify`) to give the connection up. Ends with the session.
fn stall_watch(pending: &Pending, heard: Arc<Mutex<tokio::time::Instant>>) -> Arc<Notify> {
    let stalled = Arc::new(Notify::new());
    let (wake, pending) = (stalled.clone(), Arc::downgrade(pending));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(STALL_TIMEOUT / 9).await;
            let Some(pending) = pending.upgrade() else {
                break;
            };
            drop(pending);
            if heard.lock().expect("lock").elapsed() > STALL_TIMEOUT {
                wake.notify_one();
                break;
            }
        }
    });
    stalled
}

/// The far end of an in-memory session ([`in_memory`]): what the session sends, and the
/// writing half that answers it.
#[cfg(test)]
pub(crate) type FarEnd = (
    FrameReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
    FrameWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
);

/// A session over an in-memory pipe, keeping nothing of owners, devices or xattrs, and its
/// far end (hold its writing half for as long as the session must not see it close).
#[cfg(test)]
pub(crate) fn in_memory() -> (Session, FarEnd) {
    let (near, far) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(near);
    let keeps = Keeps {
        owners: false,
        devices: false,
        setid: false,
        xattrs: Namespaces::NONE,
        history: false,
    };
    let session = Session::started(FrameReader::new(r), FrameWriter::new(w), "test", keeps);
    let (far_r, far_w) = tokio::io::split(far);
    (session, (FrameReader::new(far_r), FrameWriter::new(far_w)))
}
