//! The socket edge of the protocol: whole frames in, whole frames out.
//!
//! A connection is split into a [`FrameReader`] and a [`FrameWriter`] so one task can stream
//! requests while another collects replies. Each write encodes into one buffer and issues one
//! `write_all`, so a frame never goes out in pieces interleaved with another.

use crate::frame::{self, FrameError, Packer, MAX_FRAME};
use crate::message::{Intent, Keeps, Message, MAGIC, PROTOCOL_VERSION};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connection-level failure.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket or TLS error.
    #[error("{}", io_text(.0))]
    Io(#[from] std::io::Error),
    /// The TLS handshake did not end (the peer speaks something else, a certificate was
    /// refused, or it took too long): no session began.
    #[error("TLS handshake failed: {}", io_text(.0))]
    Handshake(std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    /// The peer closed the connection where a message was required.
    #[error("connection closed by peer")]
    Closed,
    /// The peer refused the session, with its reason.
    #[error("refused by peer: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer did not answer in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// An I/O error of a connection in an operator's words.
fn io_text(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "connection closed by peer (no TLS close)".into()
    } else {
        crate::io_reason(e)
    }
}

/// Reads whole frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    last_len: usize,
    limit: usize,
}

/// The largest frame accepted before the peer is authorised: a `Hello` is a few hundred
/// bytes, so an unauthenticated peer can make the receiver hold little more than this.
pub const PRE_AUTH_FRAME: usize = 4096;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
            last_len: 0,
            limit: MAX_FRAME,
        }
    }

    /// A reader that refuses frames larger than `limit` (at most [`MAX_FRAME`]) as soon as
    /// their length arrives, before buffering them.
    pub fn with_limit(inner: R, limit: usize) -> Self {
        FrameReader {
            limit: limit.min(MAX_FRAME),
            ..FrameReader::new(inner)
        }
    }

    /// Changes the largest frame accepted (the peer was authorised).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME);
    }

    /// The next message; `Ok(None)` on a clean close at a frame boundary.
    pub async fn read(&mut self) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some((msg, used, held)) =
                frame::decode_sized(&self.buf[self.start..], self.limit)?
            {
                self.start += used;
                self.last_len = frame::HEADER_LEN + held;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(msg));
            }
            // Compact before growing, so the buffer stays within one frame plus one read.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if let Some(announced) = frame::announced(&self.buf) {
                if announced > self.limit {
                    return Err(FrameError::TooLarge {
                        len: announced,
                        limit: self.limit,
                    }
                    .into());
                }
            }
            let want = frame::check(&self.buf)?
                .unwrap_or(0)
                .max(self.buf.len() + 64 * 1024)
                .min(self.limit + frame::HEADER_LEN);
            debug_assert!(want <= MAX_FRAME + 64 * 1024 + frame::HEADER_LEN);
            let len = self.buf.len();
            self.buf.reserve(want - len);
            // Into the spare capacity, never zeroed first: at most `want` in all.
            let mut room = bytes::BufMut::limit(&mut self.buf, want - len);
            let n = self.inner.read_buf(&mut room).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::TruncatedFrame)
                };
            }
        }
    }

    /// Encoded size of the message last returned by [`FrameReader::read`], unpacked: a packed
    /// frame counts what it holds in memory, not its size on the wire.
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }

    /// The next message; a close is an error.
    pub async fn expect(&mut self) -> Result<Message, ConnError> {
        self.read().await?.ok_or(ConnError::Closed)
    }
}

/// Writes whole frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    written: u64,
    packer: Packer,
    pace: Option<std::sync::Arc<crate::pace::Pace>>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a writer.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            written: 0,
            packer: Packer::new(false),
            pace: None,
        }
    }

    /// Holds what it writes to `pace` (a target's bandwidth cap).
    pub fn paced(mut self, pace: Option<std::sync::Arc<crate::pace::Pace>>) -> Self {
        self.pace = pace;
        self
    }

    /// Packs file bodies too (see [`Packer`]); listings are packed either way.
    pub fn pack_data(mut self, data: bool) -> Self {
        self.packer = Packer::new(data);
        self
    }

    /// Writes one message and flushes.
    pub async fn write(&mut self, msg: &Message) -> Result<(), ConnError> {
        self.write_all(std::slice::from_ref(msg)).await
    }

    /// Writes several messages, [`WRITE_AT`] bytes of frames or more at a time, then
    /// flushes. The frames are made in one buffer, kept from batch to batch: a stream of file
    /// bodies reuses the same memory instead of growing a new buffer for every batch.
    pub async fn write_all(&mut self, msgs: &[Message]) -> Result<(), ConnError> {
        self.buf.clear();
        for m in msgs {
            self.packer.encode(m, &mut self.buf)?;
            if self.buf.len() >= WRITE_AT {
                self.put().await?;
            }
        }
        if !self.buf.is_empty() {
            self.put().await?;
        }
        self.inner.flush().await?;
        if self.buf.capacity() > KEEP {
            // Do not keep a delta-sized buffer around for every idle connection.
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Writes the frames made so far and empties the buffer.
    async fn put(&mut self) -> Result<(), ConnError> {
        match &self.pace {
            None => self.inner.write_all(&self.buf).await?,
            // Paced in small slices, so one big frame cannot run far past the cap.
            Some(pace) => {
                for slice in self.buf.chunks(PACED_SLICE) {
                    self.inner.write_all(slice).await?;
                    pace.spent(slice.len() as u64).await;
                }
            }
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes everything that arrives on `rx` until it closes, batching what is already
    /// queued (up to `max_batch` messages) into one write; then shuts the stream down.
    /// `written` sees the running byte total after each write.
    pub async fn pump(
        mut self,
        mut rx: tokio::sync::mpsc::Receiver<Message>,
        max_batch: usize,
        mut written: impl FnMut(u64),
    ) -> Result<(), ConnError> {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let mut yielded = false;
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    // Once, let whoever is making the next message finish it: one write
                    // then carries a stream's frames, not one each.
                    Err(_) if !yielded => {
                        yielded = true;
                        tokio::task::yield_now().await;
                    }
                    Err(_) => break,
                }
            }
            self.write_all(&batch).await?;
            written(self.written);
            batch.clear();
        }
        let _ = self.shutdown().await;
        Ok(())
    }

    /// Total frame bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Shuts the write side down (TLS close_notify).
    pub async fn shutdown(&mut self) -> Result<(), ConnError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// What a paced writer writes between two looks at its cap.
const PACED_SLICE: usize = 16 * 1024;

/// Frames made before they are written: a batch larger than this goes in several writes.
const WRITE_AT: usize = 1024 * 1024;

/// The frame buffer kept between batches: what [`WRITE_AT`] and one file body's frame need
/// (a larger frame, a listing or a delta, has its buffer freed after it).
const KEEP: usize = 2 * 1024 * 1024;

/// How often a receiver says [`Message::Alive`] on an open session.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// How long a sender with requests outstanding waits without hearing anything from the
/// receiver (a reply or [`Message::Alive`]) before it gives the connection up: a link that
/// still acknowledges at the TCP level but delivers nothing (a stalled proxy, a stopped
/// process) never trips TCP's own timeouts.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(45);

/// How long either side waits for the handshake messages (and the receiver for the TLS
/// handshake): short, because an unauthenticated connection holds a handshake slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the sender's half of the session handshake; returns what the receiver keeps.
pub async fn client_handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    module: &str,
    intent: Intent,
) -> Result<Keeps, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = Message::Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        module: module.to_string(),
        intent,
    };
    writer.write(&hello).await?;
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.expect())
        .await
        .map_err(|_| ConnError::Timeout("waiting for the receiver's welcome"))??;
    match reply {
        Message::Welcome { version, keeps } if version == PROTOCOL_VERSION => Ok(keeps),
        Message::Welcome { version, .. } => Err(ConnError::Protocol(format!(
            "receiver speaks protocol version {version}, we speak {PROTOCOL_VERSION}"
        ))),
        Message::Refused { reason } => Err(ConnError::Refused(reason)),
        other => Err(ConnError::Protocol(format!(
            "expected Welcome, got {}",
            other.name()
        ))),
    }
}

/// Runs the receiver's first half of the session handshake: waits (bounded) for the
/// sender's `Hello`. Returns the module and intent it asks for, or the reason to refuse it.
pub async fn server_hello<R>(
    reader: &mut FrameReader<R>,
) -> Result<Result<(String, Intent), String>, ConnError>
where
    R: AsyncRead + Unpin,
{
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.expect())
        .await
        .map_err(|_| ConnError::Timeout("waiting for Hello"))??;
    Ok(match hello {
        Message::Hello {
            magic,
            version,
            module,
            intent,
        } if magic == MAGIC && version == PROTOCOL_VERSION => Ok((module, intent)),
        Message::Hello { magic, version, .. } if magic == MAGIC => Err(format!(
            "receiver speaks protocol version {PROTOCOL_VERSION}, sender speaks {version}"
        )),
        _ => Err("expected a ferry Hello".into()),
    })
}

/// The receiver's second half: `Welcome` (the session is open) or `Refused` and a close.
pub async fn server_answer<W>(
    writer: &mut FrameWriter<W>,
    answer: Result<Keeps, String>,
) -> Result<(), ConnError>
where
    W: AsyncWrite + Unpin,
{
    match answer {
        Ok(keeps) => {
            writer
                .write(&Message::Welcome {
                    version: PROTOCOL_VERSION,
                    keeps,
                })
                .await
        }
        Err(reason) => {
            writer
                .write(&Message::Refused {
                    reason: reason.clone(),
                })
                .await?;
            let _ = writer.shutdown().await;
            Err(ConnError::Refused(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPS: Keeps = Keeps {
        owners: true,
        devices: false,
        setid: true,
        xattrs: crate::xattr::Namespaces::ALL,
        history: false,
    };

    #[tokio::test]
    async fn frames_survive_a_byte_at_a_time_stream() {
        let (a, b) = tokio::io::duplex(1);
        let mut w = FrameWriter::new(a);
        let msgs = vec![
            Message::FileData {
                id: 1,
                data: vec![7; 100_000],
            },
            Message::Ack { id: 2 },
            Message::Bye,
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                w.write(m).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b);
        for m in &msgs {
            assert_eq!(&r.read().await.unwrap().unwrap(), m);
        }
        assert!(r.read().await.unwrap().is_none());
        writer.await.unwrap();
    }

    /// A batch of more than [`WRITE_AT`] bytes goes in several writes, in order, every byte
    /// counted; the buffer is kept for the next batch unless a frame made it larger than
    /// [`KEEP`].
    #[tokio::test]
    async fn a_large_batch_is_written_in_pieces_and_its_buffer_kept() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut w = FrameWriter::new(a);
        let body = |id: u64, n: usize| Message::FileData {
            id,
            data: (0..n).map(|i| (i % 251) as u8).collect(),
        };
        let first: Vec<Message> = (0..12).map(|id| body(id, 200 * 1024)).collect();
        let second = vec![body(12, 5 * 1024 * 1024), Message::Bye];
        let framed = |msgs: &[Message]| {
            let mut out = Vec::new();
            for m in msgs {
                ferry_wire::frame::encode(m, &mut out).unwrap();
            }
            out.len() as u64
        };
        let (n1, n2) = (framed(&first), framed(&second));
        assert!(
            n1 > 2 * WRITE_AT as u64,
            "the first batch spans several writes"
        );
        let (f, s) = (first.clone(), second.clone());
        let writer = tokio::spawn(async move {
            w.write_all(&f).await.unwrap();
            let kept = (w.bytes_written(), w.buf.capacity());
            w.write_all(&s).await.unwrap();
            let after = (w.bytes_written(), w.buf.capacity());
            w.shutdown().await.unwrap();
            (kept, after)
        });
        let mut r = FrameReader::new(b);
        for m in first.iter().chain(&second) {
            assert_eq!(&r.read().await.unwrap().unwrap(), m);
        }
        assert!(r.read().await.unwrap().is_none());
        let ((written1, kept), (written2, after)) = writer.await.unwrap();
        assert_eq!((written1, written2), (n1, n1 + n2));
        assert!((WRITE_AT..=KEEP).contains(&kept), "kept {kept} bytes");
        assert_eq!(after, 0, "a buffer grown past KEEP is freed");
    }

    #[tokio::test]
    async fn both_halves_of_the_handshake_agree() {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let server = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
            let (module, intent) = server_hello(&mut r).await.unwrap().unwrap();
            assert_eq!((module.as_str(), intent), ("m", Intent::Read));
            server_answer(&mut w, Ok(KEEPS)).await.unwrap();
        });
        let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
        assert_eq!(
            client_handshake(&mut r, &mut w, "m", Intent::Read)
                .await
                .unwrap(),
            KEEPS
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_client_with_its_reason() {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
            let _ = server_hello(&mut r).await;
            let _ = server_answer(&mut w, Err("unknown module \"m\"".into())).await;
        });
        let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
        match client_handshake(&mut r, &mut w, "m", Intent::Write).await {
            Err(ConnError::Refused(reason)) => assert_eq!(reason, "unknown module \"m\""),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_from_its_length_alone() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        // Announce 16 MiB and send a little: nothing near that may be buffered.
        a.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
        a.write_all(&[0; 1000]).await.unwrap();
        let mut r = FrameReader::with_limit(b, PRE_AUTH_FRAME);
        assert!(matches!(
            r.read().await,
            Err(ConnError::Frame(FrameError::TooLarge { len, .. })) if len == 16 << 20
        ));
        assert!(r.buf.capacity() <= 64 * 1024 + PRE_AUTH_FRAME);
    }

    #[tokio::test]
    async fn a_packed_frame_counts_what_it_holds_not_what_it_took() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a).pack_data(true);
        let msg = Message::FileData {
            id: 1,
            data: vec![0; 1 << 20],
        };
        w.write(&msg).await.unwrap();
        assert!(w.bytes_written() < 64 << 10, "{}", w.bytes_written());
        let mut r = FrameReader::new(b);
        assert_eq!(r.read().await.unwrap(), Some(msg));
        assert!(r.last_frame_len() > 1 << 20, "{}", r.last_frame_len());
    }

    #[tokio::test]
    async fn close_mid_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut buf = Vec::new();
        frame::encode(
            &Message::FileData {
                id: 1,
                data: vec![1; 100],
            },
            &mut buf,
        )
        .unwrap();
        a.write_all(&buf[..50]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert!(matches!(r.read().await, Err(ConnError::TruncatedFrame)));
    }
}
