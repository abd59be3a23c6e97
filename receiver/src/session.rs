//! One receiver session: TLS, `Hello`, the access decision, then frames in to a
//! [`Writer`] thread and replies out.

use crate::access::{authorize, Refusal};
use crate::server::Server;
use crate::writer::{Request, Writer};
use ferry_protocol::connection::{ConnError, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT};
use ferry_protocol::message::{Intent, Message, MAGIC, PROTOCOL_VERSION};
use ferry_protocol::tls::peer_fingerprint;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Bytes of received frames a session may hold before the writer thread has handled them.
/// Larger than one frame, so a maximal frame always fits.
const SESSION_BUFFER: usize = 40 * 1024 * 1024;

/// Serves one connection to completion. Errors are logged, never propagated: a bad peer
/// never affects other sessions.
pub async fn serve(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    if let Err(e) = serve_inner(&server, tcp, peer, shutdown).await {
        match e {
            ConnError::Refused(_) => {}
            e => tracing::warn!(%peer, "session ended: {e}"),
        }
    }
}

async fn serve_inner(
    server: &Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.tls.clone());
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| ConnError::Timeout("TLS handshake"))??;
    let fingerprint = peer_fingerprint(tls.get_ref().1.peer_certificates())
        .ok_or_else(|| ConnError::Protocol("no client certificate".into()))?;
    let (r, w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);

    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.expect())
        .await
        .map_err(|_| ConnError::Timeout("waiting for Hello"))??;
    let (module_name, intent) = match hello {
        Message::Hello {
            magic,
            version,
            module,
            intent,
        } if magic == MAGIC && version == PROTOCOL_VERSION => (module, intent),
        Message::Hello { magic, version, .. } if magic == MAGIC => {
            let reason = format!(
                "receiver speaks protocol version {PROTOCOL_VERSION}, sender speaks {version}"
            );
            return refuse(&mut writer, peer, fingerprint, "-", reason).await;
        }
        _ => {
            return refuse(
                &mut writer,
                peer,
                fingerprint,
                "-",
                "expected a ferry Hello".into(),
            )
            .await
        }
    };
    let Some(state) = server.modules.get(&module_name).cloned() else {
        return refuse(
            &mut writer,
            peer,
            fingerprint,
            &module_name,
            Refusal::UnknownModule(module_name.clone()).to_string(),
        )
        .await;
    };
    // Count ourselves in before deciding, so two racing sessions cannot both take the last slot.
    let active = state.active.fetch_add(1, Ordering::SeqCst);
    let guard = ActiveGuard(&state.active);
    if let Err(refusal) = authorize(&state.module, fingerprint, peer.ip(), intent, active) {
        return refuse(
            &mut writer,
            peer,
            fingerprint,
            &module_name,
            refusal.to_string(),
        )
        .await;
    }
    writer
        .write(&Message::Welcome {
            version: PROTOCOL_VERSION,
            privileged: server.privileged,
        })
        .await?;
    tracing::info!(%peer, %fingerprint, module = %module_name, ?intent, "session open");

    let (req_tx, req_rx) = mpsc::channel::<Request>(1024);
    let (rep_tx, mut rep_rx) = mpsc::channel::<Message>(1024);
    let budget = Arc::new(Semaphore::new(SESSION_BUFFER >> 10));
    let worker = Writer::new(
        state.clone(),
        server.stats.clone(),
        server.privileged,
        intent == Intent::Write,
        rep_tx,
    );
    let worker = tokio::task::spawn_blocking(move || worker.run(req_rx));

    let write_task = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = rep_rx.recv().await {
            batch.push(first);
            while batch.len() < 256 {
                match rep_rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            writer.write_all(&batch).await?;
            batch.clear();
        }
        let _ = writer.shutdown().await;
        Ok(())
    });

    let read_result = loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            m = reader.read() => m,
        };
        match msg {
            Ok(Some(m)) => {
                let bye = matches!(m, Message::Bye);
                // Hold back reading while the writer thread is behind by more than the budget.
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
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Free the module slot before the peer can see the connection close.
    drop(guard);
    drop(req_tx);
    let _ = worker.await;
    let write_result = write_task.await.unwrap_or(Ok(()));
    tracing::info!(%peer, module = %module_name, "session closed");
    read_result.and(write_result)
}

async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    peer: SocketAddr,
    fingerprint: ferry_protocol::Fingerprint,
    module: &str,
    reason: String,
) -> Result<(), ConnError> {
    tracing::warn!(%peer, %fingerprint, module, "refused: {reason}");
    writer
        .write(&Message::Refused {
            reason: reason.clone(),
        })
        .await?;
    let _ = writer.shutdown().await;
    Err(ConnError::Refused(reason))
}

struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
