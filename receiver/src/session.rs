//! One receiver session: TLS, `Hello`, the access decision, then frames in to the
//! [`Requests`] loop on its own thread and replies out.

use crate::access::{authorize, Refusal};
use crate::admission::{Handshake, MAX_SESSIONS};
use crate::requests::{Request, Requests};
use crate::server::Server;
use ferry_protocol::connection::{
    server_answer, server_hello, ConnError, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, HEARTBEAT,
    PRE_AUTH_FRAME,
};
use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::tls::peer_fingerprint;
use ferry_protocol::Fingerprint;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Bytes of received frames a session may hold before the writer thread has handled them.
/// Larger than one frame, so a maximal frame always fits.
const SESSION_BUFFER: usize = 20 * 1024 * 1024;

/// Serves one connection to completion. Errors are logged, never propagated: a bad peer
/// never affects other sessions.
pub async fn serve(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
    shutdown: CancellationToken,
) {
    // Until it is authorised, a newer handshake from the same address may take its place.
    let evicted = handshake.evicted();
    let served = tokio::select! {
        r = serve_inner(&server, tcp, peer, handshake, shutdown) => r,
        _ = evicted.cancelled() => Err(ConnError::Refused(
            "a newer handshake from the same address took its place".into(),
        )),
    };
    if let Err(e) = served {
        match e {
            ConnError::Refused(_) => {}
            e @ ConnError::Handshake(_) => tracing::warn!(%peer, "{e}"),
            e => tracing::warn!(%peer, "session ended: {e}"),
        }
    }
}

async fn serve_inner(
    server: &Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.tls());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => {
            let late = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
            return Err(ConnError::Handshake(late));
        }
        // Closed before its handshake ended: a port check (a monitor's, a load balancer's)
        // or a client gone; nothing was asked, so nothing is worth an operator's warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "connection closed before its TLS handshake ended");
            return Ok(());
        }
        Ok(Err(e)) => return Err(ConnError::Handshake(e)),
        Ok(Ok(tls)) => tls,
    };
    let fingerprint = peer_fingerprint(tls.get_ref().1.peer_certificates())
        .ok_or_else(|| ConnError::Protocol("no client certificate".into()))?;
    serve_stream(server, tls, peer, fingerprint, Some(handshake), shutdown).await
}

/// Serves one session over an authenticated stream: `fingerprint` is the peer's proven
/// certificate pin. TLS connections arrive here after their handshake; tests use an in-memory
/// stream.
pub async fn serve_stream<S>(
    server: &Arc<Server>,
    stream: S,
    peer: SocketAddr,
    fingerprint: Fingerprint,
    handshake: Option<Handshake>,
    shutdown: CancellationToken,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    // Until the peer is authorised it may send only small frames.
    let mut reader = FrameReader::with_limit(r, PRE_AUTH_FRAME);
    let mut writer = FrameWriter::new(w);
    let refuse = |module: &str, reason: String| {
        tracing::warn!(%peer, %fingerprint, module, "refused: {reason}");
        Err(reason)
    };

    let (module_name, intent) = match server_hello(&mut reader).await? {
        Ok(hello) => hello,
        Err(reason) => return server_answer(&mut writer, refuse("-", reason)).await,
    };
    let Some(slot) = server.module(&module_name) else {
        let reason = Refusal::UnknownModule(module_name.clone()).to_string();
        return server_answer(&mut writer, refuse(&module_name, reason)).await;
    };
    let state = match slot.get() {
        Ok(state) => state,
        Err(reason) => return server_answer(&mut writer, refuse(&module_name, reason)).await,
    };
    // Count ourselves in before deciding, so two racing sessions cannot both take the last slot.
    let active = state.active.fetch_add(1, Ordering::SeqCst);
    let guard = ActiveGuard(&state.active);
    if let Err(refusal) = authorize(&state.module, fingerprint, peer.ip(), intent, active) {
        return server_answer(&mut writer, refuse(&module_name, refusal.to_string())).await;
    }
    if intent == Intent::Write && state.lease.is_some() {
        let leased = state.clone();
        let held = tokio::task::spawn_blocking(move || leased.lease_for_writing())
            .await
            .unwrap_or_else(|_| Err("the lease check panicked".into()));
        if let Err(reason) = held {
            return server_answer(&mut writer, refuse(&module_name, reason)).await;
        }
    }
    drop(handshake);
    let Some(_session_slot) = server.admission.session() else {
        let reason = format!(
            "receiver busy: it serves at most {MAX_SESSIONS} sessions at once; try again later"
        );
        return server_answer(&mut writer, refuse(&module_name, reason)).await;
    };
    reader.set_limit(MAX_FRAME);
    server_answer(&mut writer, Ok(state.keeps(server.privileged))).await?;
    tracing::info!(%peer, %fingerprint, module = %module_name, ?intent, "session open");

    if intent == Intent::Restore {
        let (module, client) = (&state.module, peer.to_string());
        let served = crate::restore::serve::serve(module, reader, writer, &client, &shutdown).await;
        drop(guard);
        tracing::info!(%peer, module = %module_name, "restore session closed");
        return served;
    }
    let stats = server.stats.clone();
    let privileged = server.privileged;
    let writable = intent == Intent::Write;
    let served = answer(
        reader,
        writer,
        |replies| Requests::new(state.clone(), stats, privileged, writable, replies),
        &shutdown,
        None,
        |_| false,
        // Free the module slot before the peer can see the connection close.
        move || drop(guard),
    )
    .await;
    tracing::info!(%peer, module = %module_name, "session closed");
    ferry_protocol::release_free_memory();
    served.map(|_| ())
}

/// Says `Alive` on `out` every [`HEARTBEAT`], on its own timer, until the channel closes. It
/// holds the channel weakly: the end of whoever holds it (a session, or its future dropped)
/// ends the heartbeat.
pub(crate) fn heartbeat(out: mpsc::WeakSender<Message>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(tx) = out.upgrade() else { break };
            if tx.send(Message::Alive).await.is_err() {
                break;
            }
        }
    })
}

/// Answers the requests read from `reader` with the request loop `make` builds around its
/// reply channel, replies and heartbeats to `writer`, until `Bye`, the end of the stream or
/// `shutdown`. With `idle`, a peer heard from for that long is given up (a restore client:
/// its backup host says `Alive` while it works). A message `aside` takes (returns true for)
/// is not a request. `read_done` runs once reading has stopped, before the loop's last
/// answers go out. Returns whether the peer said `Bye`. The receiver's sessions run here
/// (a sender may be idle for hours), and so does a restore client for its destination.
pub async fn answer<R, W>(
    mut reader: FrameReader<R>,
    writer: FrameWriter<W>,
    make: impl FnOnce(mpsc::Sender<Message>) -> Requests,
    shutdown: &CancellationToken,
    idle: Option<std::time::Duration>,
    mut aside: impl FnMut(&Message) -> bool,
    read_done: impl FnOnce(),
) -> Result<bool, ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // The byte budget below holds the reader back, a batch at a time; the channel's count
    // never does (each request holds at least one of its permits).
    let (req_tx, req_rx) = mpsc::channel::<Request>(SESSION_BUFFER >> 10);
    let (rep_tx, rep_rx) = mpsc::channel::<Message>(1024);
    // Said on its own timer, so a sender can tell a slow request from a silent link.
    let heartbeat = heartbeat(rep_tx.downgrade());
    let budget = Arc::new(Semaphore::new(SESSION_BUFFER >> 10));
    let worker = make(rep_tx);
    let worker = tokio::spawn(worker.serve(req_rx));
    let write_task = tokio::spawn(writer.pump(rep_rx, 256, |_| {}));

    let mut said_bye = false;
    let read_result = {
        // Registered once, not for every frame read.
        let loop_ended = req_tx.closed();
        tokio::pin!(loop_ended);
        loop {
            let read = async {
                match idle {
                    Some(limit) => tokio::time::timeout(limit, reader.read())
                        .await
                        .unwrap_or(Err(ConnError::Timeout("a word from the peer"))),
                    None => reader.read().await,
                }
            };
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                // The request loop ended the session (a restore's DEST full, a protocol
                // violation): stop reading now, not at the next request, which a peer sending
                // only `Alive` would never send.
                () = &mut loop_ended => break Ok(()),
                m = read => m,
            };
            match msg {
                Ok(Some(m)) if aside(&m) => {}
                Ok(Some(m)) => {
                    let bye = matches!(m, Message::Bye);
                    // Hold back reading while the request loop is behind by more than the budget.
                    let permits = ((reader.last_frame_len() >> 10) + 1) as u32;
                    let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
                        break Ok(());
                    };
                    if req_tx
                        .send(Request {
                            msg: m,
                            _budget: Some(permit),
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                    if bye {
                        said_bye = true;
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    };
    let said_bye = matches!(&read_result, Ok(())) && !shutdown.is_cancelled() && said_bye;
    read_done();
    drop(req_tx);
    let _ = worker.await;
    heartbeat.abort();
    let write_result = write_task.await.unwrap_or(Ok(()));
    read_result.and(write_result).map(|()| said_bye)
}

struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
