//! Sending one file: `FileBegin`, optionally the receiver's signature, the body as whole
//! chunks or windowed deltas read on a blocking thread, then `FileEnd` with the digest.

use crate::config::Preserve;
use crate::extents::{read_full, walk, Piece};
use crate::plan::{body_for, Base};
use crate::session::{Replies, Session, SessionError};
use ferry_protocol::body::BodyDigest;
use ferry_protocol::delta::{self, WINDOW};
use ferry_protocol::local;
use ferry_protocol::message::{Body, Digest, Message, RequestId};
use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::xattr::{At, Namespaces};
use ferry_protocol::RelPath;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Size of a whole-body chunk (one frame): small enough that a link which drops every
/// megabyte still delivers whole frames, from which a cut transfer resumes.
pub const CHUNK: usize = 256 * 1024;

/// A file sent whole and at most this long is read in the same blocking call that opens it,
/// before its `FileBegin` goes out: one hand-off to the blocking pool per small file instead
/// of two (each file in flight holds at most one chunk so).
pub const READ_AHEAD: u64 = CHUNK as u64;

/// How a file transfer ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The source changed while being read; the transfer was aborted and should be retried.
    #[error("{0}: changed while being sent")]
    Changed(RelPath),
    /// The source is gone or no longer a regular file; the caller re-plans the path.
    #[error("{0}: vanished or changed type")]
    Vanished(RelPath),
    /// Reading the source failed.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: RelPath,
        /// The cause.
        source: std::io::Error,
    },
    /// The receiver broke the protocol (a malformed signature): the session is given up.
    #[error("{0}")]
    Peer(String),
    /// The receiver refused or the connection failed.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// A file whose `FileBegin` went out; [`InFlight::finish`] sends the body.
pub struct InFlight {
    /// The file, as [`open`] made it ready.
    f: Opened,
    /// Its replies.
    rx: Replies,
    /// It went whole in one `File`, at this cost: only its answer is left.
    whole: Option<Sent>,
}

/// A whole body read before its `FileBegin` went out: its frames, digest and cost.
struct ReadBody {
    frames: Vec<Message>,
    digest: [u8; 32],
    sent: Sent,
}

impl ReadBody {
    /// The whole body, taken out, if it is at most one slice of data (no holes).
    fn one_slice(&mut self) -> Option<Vec<u8>> {
        match self.frames.as_mut_slice() {
            [] => Some(Vec::new()),
            [Message::FileData { data, .. }] => Some(std::mem::take(data)),
            _ => None,
        }
    }
}

/// What one file cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// Payload bytes (data or delta) sent.
    pub payload: u64,
    /// Sent as a delta.
    pub delta: bool,
}

/// Where the files of a plan are read: each beneath a held directory, never by a path from
/// `/`.
#[derive(Clone)]
pub enum Origin {
    /// A source tree: every file beneath its held root, at its own path.
    Root(Arc<OwnedFd>),
    /// A tree pieced together from several held directories (a restore: the module and its
    /// history's objects): where each path of the plan is read; `None` for a path it does
    /// not hold.
    Mapped(Arc<Locate>),
}

/// How an [`Origin::Mapped`] finds a path of the plan.
pub type Locate = dyn Fn(&RelPath) -> Option<Located> + Send + Sync;

/// Where an [`Origin::Mapped`] holds a path of the plan.
#[derive(Clone)]
pub struct Located {
    /// The held directory.
    pub dir: Arc<OwnedFd>,
    /// The path beneath it.
    pub rel: RelPath,
    /// The metadata the file is sent with (mode, owner, times; its attributes unless this
    /// holds none), when not what it has now: the state it had then, for a restore.
    pub meta: Option<Meta>,
}

impl Origin {
    fn locate(&self, path: &RelPath) -> Option<Located> {
        match self {
            Origin::Root(root) => Some(Located {
                dir: root.clone(),
                rel: path.clone(),
                meta: None,
            }),
            Origin::Mapped(locate) => locate(path),
        }
    }
}

/// `now` (a file's metadata as opened) with the mode, owner, times and, when it holds any,
/// the attributes of `then`.
pub fn as_then(now: Meta, then: &Meta) -> Meta {
    Meta {
        kind: now.kind,
        size: now.size,
        rdev: now.rdev,
        xattrs: if then.xattrs.list.is_empty() {
            now.xattrs
        } else {
            then.xattrs.clone()
        },
        ..then.clone()
    }
}

impl From<Arc<OwnedFd>> for Origin {
    fn from(root: Arc<OwnedFd>) -> Origin {
        Origin::Root(root)
    }
}

/// Opens `rel` (the plan's `path`) beneath the held directory `root` (no symlink anywhere on the way, never
/// leaving the root, never blocking on a fifo swapped in) and reads its metadata from the
/// open file: the one read that counts, since it is the file whose bytes are sent. `Ok(None)`
/// if it is gone, no longer a regular file, or no longer reached without a symlink (a
/// directory on its way was replaced by one since the scan: the next event of that name
/// plans it again).
fn open_source(
    root: &OwnedFd,
    rel: &RelPath,
    path: &RelPath,
    xattrs: Namespaces,
) -> Result<Option<(std::fs::File, Meta, bool)>, TransferError> {
    let read_err = |source| TransferError::Read {
        path: path.clone(),
        source,
    };
    let file = match local::open_file_beneath(root, rel) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if local::is_not_beneath(&e) => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let md = file.metadata().map_err(read_err)?;
    let sparse = is_sparse(&md);
    let Some(mut meta) = local::meta_of(&md).filter(|m| m.kind == Kind::File) else {
        return Ok(None);
    };
    // The attributes of the file being sent, read through its descriptor; ones that cannot be
    // read travel as "not managed" (the receiver leaves its own alone), and the file still goes.
    match At::Fd(file.as_raw_fd()).read(xattrs) {
        Ok(x) => meta.xattrs = x,
        Err(e) => tracing::warn!(%path, "extended attributes not sent: {e}"),
    }
    Ok(Some((file, meta, sparse)))
}

/// True if the file stores fewer blocks than its length needs: it has holes.
fn is_sparse(md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    md.blocks().saturating_mul(512) < md.len()
}

/// The whole body of `file` as the frames of request `id`, read now if it goes whole and is
/// at most [`READ_AHEAD`] long; `None` (nothing read) otherwise.
fn read_ahead(
    id: RequestId,
    path: &RelPath,
    file: &mut std::fs::File,
    meta: &Meta,
    body: Body,
    sparse: bool,
) -> Result<Option<ReadBody>, TransferError> {
    if body != Body::Whole || meta.size > READ_AHEAD {
        return Ok(None);
    }
    let mut to = Stream {
        id,
        meta,
        path,
        out: Sink::Keep(Vec::new()),
    };
    let (digest, sent) = stream_body(&mut to, file, None, None, sparse)?;
    let Sink::Keep(frames) = to.out else {
        unreachable!("kept above")
    };
    Ok(Some(ReadBody {
        frames,
        digest,
        sent,
    }))
}

/// A file opened beneath its held directory (and read, if small) under a reserved request
/// id, before its `FileBegin` goes out: [`open`] makes it on a blocking thread, [`start`]
/// sends it.
pub struct Opened {
    id: RequestId,
    path: RelPath,
    file: std::fs::File,
    meta: Meta,
    body: Body,
    /// The source has holes: its body goes whole, holes as `FileHole`.
    sparse: bool,
    /// The whole body, already read (a small file: see [`READ_AHEAD`]).
    read: Option<ReadBody>,
}

/// Opens `path`, read where `origin` holds it, with the metadata of the opened file, under a
/// request id reserved on `session`; decides whole or delta as [`body_for`] does from its
/// size and what the receiver may hold, with the attributes `preserve` carries. If it
/// preserves holes, a sparse file's body goes whole with its holes as holes. A small file sent
/// whole is read here too ([`READ_AHEAD`]). Blocks: run it where blocking is allowed.
/// `Ok(None)` if the path is no longer a regular file.
pub fn open(
    session: &Session,
    origin: &Origin,
    path: &RelPath,
    base: Base,
    preserve: Preserve,
) -> Result<Option<Opened>, TransferError> {
    let Some(at) = origin.locate(path) else {
        return Ok(None);
    };
    let Some((mut file, meta, sparse)) =
        open_source(&at.dir, &at.rel, path, preserve.namespaces())?
    else {
        return Ok(None);
    };
    let meta = match &at.meta {
        Some(then) => as_then(meta, then),
        None => meta,
    };
    let sparse = sparse && preserve.sparse;
    let body = body_for(meta.size, base);
    // Its frames may be made before the file is known to be there: the id's replies are
    // awaited only once its `FileBegin` goes out.
    let id = session.reserve();
    let read = read_ahead(id, path, &mut file, &meta, body, sparse)?;
    Ok(Some(Opened {
        id,
        path: path.clone(),
        file,
        meta,
        body,
        sparse,
        read,
    }))
}

/// Sends `FileBegin` for `path` ([`open`] on a blocking thread, then [`start`]). Returns
/// `Ok(None)` if the path is no longer a regular file.
pub async fn begin(
    session: &Arc<Session>,
    origin: &Origin,
    path: &RelPath,
    base: Base,
    preserve: Preserve,
) -> Result<Option<InFlight>, TransferError> {
    let (s, o, p) = (session.clone(), origin.clone(), path.clone());
    let opened = tokio::task::spawn_blocking(move || open(&s, &o, &p, base, preserve))
        .await
        .expect("open task")?;
    match opened {
        Some(opened) => start(session, opened).await.map(Some),
        None => Ok(None),
    }
}

/// Sends the `FileBegin` of a file [`open`] made ready.
pub async fn start(session: &Session, mut opened: Opened) -> Result<InFlight, TransferError> {
    let rx = session.register_as(opened.id);
    // A small file read whole, in at most one slice and with no holes, goes as one `File`.
    let whole = match opened.read.as_mut().and_then(ReadBody::one_slice) {
        Some(data) => {
            let read = opened.read.take().expect("looked at above");
            session
                .send(Message::File {
                    id: opened.id,
                    path: opened.path.clone(),
                    meta: opened.meta.clone(),
                    data,
                    digest: read.digest,
                })
                .await?;
            Some(read.sent)
        }
        None => {
            session
                .send(Message::FileBegin {
                    id: opened.id,
                    path: opened.path.clone(),
                    meta: opened.meta.clone(),
                    body: opened.body,
                })
                .await?;
            None
        }
    };
    Ok(InFlight {
        f: opened,
        rx,
        whole,
    })
}

impl InFlight {
    /// Sends the body and `FileEnd`, lets go of `sending` (the caller's slot for files being
    /// sent), then waits for the receiver's verdict.
    pub async fn finish<T>(
        mut self,
        session: &Session,
        sending: &mut Option<T>,
    ) -> Result<Sent, TransferError> {
        if let Some(sent) = self.whole {
            drop(self.f.file);
            sending.take();
            session.expect_ack(&mut self.rx, &self.f.path).await?;
            return Ok(sent);
        }
        let mut signature = None;
        let mut resume = None;
        if self.f.body == Body::Delta {
            match session.reply(&mut self.rx).await? {
                Message::Signature {
                    signature: s,
                    windows,
                    ..
                } => signature = Some((s, windows)),
                Message::Resume { offset, digest, .. } => resume = Some((offset, digest)),
                Message::NoBase { .. } => {}
                Message::Failed { error, .. } => {
                    let (path, reason) = (self.f.path.clone(), error);
                    return Err(SessionError::Refused { path, reason }.into());
                }
                other => {
                    return Err(SessionError::Protocol {
                        address: session.address().to_string(),
                        what: format!("unexpected {} in answer to a file", other.name()),
                    }
                    .into())
                }
            }
        }
        // A sparse file goes whole, its holes as holes: a delta would rebuild it dense.
        if self.f.sparse {
            signature = None;
        }
        let streamed = match self.f.read.take() {
            Some(read) => {
                drop(self.f.file);
                for frame in read.frames {
                    session.send(frame).await?;
                }
                Ok((read.digest, read.sent))
            }
            None => {
                let out = session.sender();
                let (id, meta, path) = (self.f.id, self.f.meta.clone(), self.f.path.clone());
                let (sparse, mut file) = (self.f.sparse, self.f.file);
                tokio::task::spawn_blocking(move || {
                    let mut to = Stream {
                        id,
                        meta: &meta,
                        path: &path,
                        out: Sink::Send(&out),
                    };
                    stream_body(&mut to, &mut file, signature, resume, sparse)
                })
                .await
                .expect("reader task")
            }
        };
        let (digest, sent) = match streamed {
            Ok(v) => v,
            // A receiver that breaks the protocol is not asked anything more on this session.
            Err(TransferError::Peer(what)) => {
                return Err(SessionError::Protocol {
                    address: session.address().to_string(),
                    what,
                }
                .into())
            }
            Err(e) => {
                session.send(Message::FileAbort { id: self.f.id }).await?;
                // The receiver answers the abort with Failed; wait for it so the id is settled.
                let _ = session.reply(&mut self.rx).await;
                return Err(e);
            }
        };
        session
            .send(Message::FileEnd {
                id: self.f.id,
                digest,
            })
            .await?;
        sending.take();
        session.expect_ack(&mut self.rx, &self.f.path).await?;
        Ok(sent)
    }
}

/// Where a body goes, and what it is of.
struct Stream<'a> {
    id: RequestId,
    meta: &'a Meta,
    path: &'a RelPath,
    out: Sink<'a>,
}

/// Where a body's frames go: to the session as they are read, or kept to send later.
enum Sink<'a> {
    Send(&'a mpsc::Sender<Message>),
    Keep(Vec<Message>),
}

impl Sink<'_> {
    fn put(&mut self, msg: Message) -> Result<(), TransferError> {
        match self {
            Sink::Send(out) => out
                .blocking_send(msg)
                .map_err(|_| SessionError::Lost("sending file body".into()).into()),
            Sink::Keep(frames) => {
                frames.push(msg);
                Ok(())
            }
        }
    }
}

fn stream_body(
    to: &mut Stream<'_>,
    file: &mut std::fs::File,
    signature: Option<(Vec<u8>, Vec<Digest>)>,
    resume: Option<(u64, [u8; 32])>,
    sparse: bool,
) -> Result<([u8; 32], Sent), TransferError> {
    let (id, meta, path, out) = (to.id, to.meta, to.path, &mut to.out);
    let read_err = |source| TransferError::Read {
        path: path.clone(),
        source,
    };
    let same = |m: &std::fs::Metadata| {
        local::meta_of(m).is_some_and(|now| now.kind == Kind::File && now.quick_equal(meta))
    };
    let mut digest = BodyDigest::new();
    let mut sent = Sent {
        payload: 0,
        delta: signature.is_some(),
    };
    let mut total = 0u64;
    if let Some((offset, theirs)) = resume {
        // The receiver holds the first `offset` bytes: go on from there if ours are the same,
        // read as they were sent (holes as holes).
        let mut note = |piece: Piece| {
            match piece {
                Piece::Data(data) => digest.data(&data),
                Piece::Hole(len) => digest.hole(len),
            }
            Ok(())
        };
        total = walk(file, 0, offset, meta.size, sparse, path, &mut note)?;
        if total != offset || digest.digest() != theirs {
            return Err(TransferError::Changed(path.clone()));
        }
    }
    match signature {
        Some((sig, theirs)) => {
            let sig = delta::parse_peer_signature(sig)
                .map_err(|e| TransferError::Peer(format!("{path}: {e}")))?;
            let index = sig.index();
            let mut window = vec![0; WINDOW.min(meta.size as usize).max(1)];
            for k in 0u64.. {
                let n = read_full(file, &mut window).map_err(read_err)?;
                if n == 0 {
                    break;
                }
                digest.data(&window[..n]);
                let at = total;
                total += n as u64;
                // A window whose digest the receiver's copy has at the same place is those
                // bytes: one copy, without searching it block by block.
                let mut d = Vec::new();
                let aligned = at == k * WINDOW as u64;
                if aligned
                    && theirs
                        .get(k as usize)
                        .is_some_and(|t| digest.window(k) == Some(*t))
                {
                    d = delta::copy_delta(at, n as u64);
                } else {
                    delta::diff_window(&index, &window[..n], &mut d)
                        .map_err(|e| TransferError::Peer(format!("{path}: {e}")))?;
                }
                sent.payload += d.len() as u64;
                out.put(Message::FileDelta {
                    id,
                    window: n as u64,
                    delta: d,
                })?;
                if total > meta.size {
                    return Err(TransferError::Changed(path.clone()));
                }
            }
        }
        None => {
            let mut send = |piece: Piece| {
                let msg = match piece {
                    Piece::Hole(len) => {
                        digest.hole(len);
                        Message::FileHole { id, len }
                    }
                    Piece::Data(data) => {
                        digest.data(&data);
                        sent.payload += data.len() as u64;
                        Message::FileData { id, data }
                    }
                };
                out.put(msg)
            };
            total = walk(file, total, u64::MAX, meta.size, sparse, path, &mut send)?;
        }
    }
    if total != meta.size || !same(&file.metadata().map_err(read_err)?) {
        return Err(TransferError::Changed(path.clone()));
    }
    Ok((digest.digest(), sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small file is read with its opening, before it is sent, under an id whose replies
    /// are awaited only once it is out: a file gone by then leaves no request waiting (a
    /// daemon that keeps running would pile them up). It goes whole in one `File`.
    #[tokio::test]
    async fn a_small_file_is_read_at_once_and_a_vanished_one_leaves_nothing_waiting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small"), b"small body").unwrap();
        let origin = Origin::from(Arc::new(local::open_root(dir.path()).unwrap()));
        let (session, (mut far, _far_w)) = crate::session::in_memory();
        let session = Arc::new(session);
        let preserve = Preserve::default();

        let (gone, small) = (RelPath::from("gone"), RelPath::from("small"));
        let opened = begin(&session, &origin, &gone, Base::Absent, preserve).await;
        assert!(opened.unwrap().is_none());
        assert_eq!(session.waiting(), 0);

        let small = begin(&session, &origin, &small, Base::Absent, preserve).await;
        let small = small.unwrap().expect("there");
        assert_eq!(session.waiting(), 1);
        assert_eq!(
            small.whole.map(|s| s.payload),
            Some(10),
            "sent whole at once"
        );
        match far.read().await.unwrap() {
            Some(Message::File {
                id,
                path,
                data,
                digest,
                ..
            }) => {
                assert_eq!((id, path), (small.f.id, RelPath::from("small")));
                assert_eq!(data, b"small body");
                assert_eq!(digest, *blake3::hash(b"small body").as_bytes());
            }
            other => panic!("expected File, got {other:?}"),
        }
    }
}
