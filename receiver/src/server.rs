//! The receiver's listener: connection limits, session tasks, shutdown.

use crate::admission::Admission;
use crate::config::{Config, Module};
use crate::module::ModuleSlot;
use crate::stats::Stats;
use ferry_protocol::identity::Identity;
use ferry_protocol::liveness::Liveness;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The accept loop goes round at least this often while idle, to show it is alive.
const LOOP_TICK: Duration = Duration::from_secs(1);

/// How long shutdown waits for sessions to finish their queued requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificate or key could not be loaded.
    #[error(transparent)]
    Identity(#[from] ferry_protocol::identity::IdentityError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] ferry_protocol::tls::TlsError),
    /// The listener could not bind.
    #[error("cannot listen on {address}: {}", ferry_protocol::io_reason(error))]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The cause.
        error: std::io::Error,
    },
    /// Another I/O error at start-up.
    #[error("{}", ferry_protocol::io_reason(.0))]
    Io(#[from] std::io::Error),
}

/// A running receiver's shared state.
pub struct Server {
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) modules: HashMap<String, ModuleSlot>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) privileged: bool,
    pub(crate) admission: Admission,
    listen: SocketAddr,
    /// Where the accept loop registers as a main loop (for the service watchdog).
    pub liveness: Liveness,
}

impl Server {
    /// Loads the identity and opens every module (cleaning staging leftovers).
    pub fn new(config: &Config) -> Result<Server, ServerError> {
        let identity = config.identity()?;
        warn_if_key_readable(&config.key);
        Server::with_identity(
            identity,
            config.listen,
            config.modules.values().cloned().collect(),
            config.state_dir.clone(),
        )
    }

    /// Builds a server from parts (used by `ferry mirror`).
    pub fn with_identity(
        identity: Identity,
        listen: SocketAddr,
        modules: Vec<Module>,
        state_dir: Option<PathBuf>,
    ) -> Result<Server, ServerError> {
        let tls = ferry_protocol::tls::server_config(identity.certs, identity.key)?;
        let map = modules
            .into_iter()
            .map(|m| (m.name.clone(), ModuleSlot::new(m, state_dir.clone())))
            .collect();
        // SAFETY: geteuid has no preconditions.
        let privileged = unsafe { libc::geteuid() } == 0;
        Ok(Server {
            tls,
            modules: map,
            stats: Arc::new(Stats::default()),
            privileged,
            admission: Admission::default(),
            listen,
            liveness: Liveness::default(),
        })
    }

    /// Binds the configured listen address.
    pub async fn bind(&self) -> Result<TcpListener, ServerError> {
        TcpListener::bind(self.listen)
            .await
            .map_err(|error| ServerError::Listen {
                address: self.listen,
                error,
            })
    }

    /// Process-wide counters.
    pub fn stats(&self) -> Vec<(String, u64)> {
        self.stats.snapshot()
    }

    /// Accepts sessions until `shutdown` fires, then lets open sessions finish their queued
    /// requests (unfinished files are discarded) for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(10);
        let beat = self.liveness.register("accept loop");
        let mut tick = tokio::time::interval(LOOP_TICK);
        loop {
            beat.beat();
            // Past the handshake cap, connections wait in the listen backlog.
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => continue,
                s = self.admission.slot() => s,
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => continue,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(10);
                    // Over its address's cap: closed at once, costing nothing more.
                    let Some(handshake) = self.admission.handshake(slot, peer.ip()) else {
                        drop(tcp);
                        continue;
                    };
                    let server = self.clone();
                    let token = shutdown.child_token();
                    tracker.spawn(async move {
                        crate::session::serve(server, tcp, peer, handshake, token).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after {SHUTDOWN_GRACE:?}; abandoning them");
        }
        for state in self.modules.values().filter_map(ModuleSlot::opened) {
            if let Err(e) = state.cache.lock().expect("cache lock").save() {
                tracing::warn!(module = %state.module.name, "cannot save digest cache: {e}");
            }
        }
        let counters: Vec<String> = self
            .stats
            .snapshot()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tracing::info!("receiver stopped; {}", counters.join(" "));
    }
}

/// The private key proves the receiver to every sender: others must not read it.
fn warn_if_key_readable(key: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(key) {
        let mode = md.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "key {} is readable by others (mode {:o}); run `chmod 600 {}`",
                key.display(),
                mode & 0o777,
                key.display()
            );
        }
    }
}

/// Runs a receiver from its configuration until `shutdown` fires; `ready` is called once it
/// listens.
pub async fn run(
    config: &Config,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Arc<Server>),
) -> Result<(), ServerError> {
    let server = Arc::new(Server::new(config)?);
    let listener = server.bind().await?;
    tracing::info!(listen = %listener.local_addr()?, modules = server.modules.len(), "receiver listening");
    ready(&server);
    server.serve(listener, shutdown).await;
    Ok(())
}

/// A receiver on 127.0.0.1 (ephemeral port, throw-away certificate) serving one writable
/// module to one throw-away client identity: what `ferry mirror` and the benchmarks run.
pub struct Loopback {
    /// `127.0.0.1:port`.
    pub address: String,
    /// The receiver's certificate fingerprint, for the client to pin.
    pub pin: ferry_protocol::Fingerprint,
    /// The only client identity the module accepts.
    pub client: Identity,
    /// The running server (for its counters).
    pub server: Arc<Server>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Loopback {
    /// Starts serving `path` as module `module`.
    pub async fn start(module: &str, path: PathBuf) -> Result<Loopback, ServerError> {
        let (server_id, _, _) = Identity::generate("ferry-loopback-receiver")?;
        let (client, _, _) = Identity::generate("ferry-loopback-sender")?;
        let pin = server_id.fingerprint();
        let module = Module {
            name: module.into(),
            path,
            clients: vec![client.fingerprint()],
            hosts_allow: None,
            read_only: false,
            max_connections: None,
            comment: None,
            // A local copy by the user who runs it: keep everything that user can.
            devices: true,
            setuid: true,
            owner: Default::default(),
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = Arc::new(Server::with_identity(
            server_id,
            listen,
            vec![module],
            None,
        )?);
        let listener = server.bind().await?;
        let address = listener.local_addr()?.to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.clone().serve(listener, shutdown.clone()));
        Ok(Loopback {
            address,
            pin,
            client,
            server,
            shutdown,
            task,
        })
    }

    /// Stops the server, letting open sessions finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}
