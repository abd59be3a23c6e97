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
use std::sync::{Arc, RwLock};
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

/// Modules by name, as served to new sessions.
type ModuleTable = HashMap<String, Arc<ModuleSlot>>;

/// A running receiver's shared state.
pub struct Server {
    tls: RwLock<Arc<rustls::ServerConfig>>,
    modules: RwLock<Arc<ModuleTable>>,
    state_dir: Option<PathBuf>,
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
            .map(|m| {
                (
                    m.name.clone(),
                    Arc::new(ModuleSlot::new(m, state_dir.clone())),
                )
            })
            .collect();
        // SAFETY: geteuid has no preconditions.
        let privileged = unsafe { libc::geteuid() } == 0;
        Ok(Server {
            tls: RwLock::new(tls),
            modules: RwLock::new(Arc::new(map)),
            state_dir,
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

    /// The TLS configuration new connections get.
    pub(crate) fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.read().expect("tls lock").clone()
    }

    /// The module new sessions asking for `name` get.
    pub(crate) fn module(&self, name: &str) -> Option<Arc<ModuleSlot>> {
        self.modules
            .read()
            .expect("modules lock")
            .get(name)
            .cloned()
    }

    fn table(&self) -> Arc<ModuleTable> {
        self.modules.read().expect("modules lock").clone()
    }

    /// Switches new connections to `config` (SIGHUP): its identity, and its modules, where an
    /// unchanged module keeps its open state (sessions, digest cache) and an added or changed
    /// one is opened as at start-up. Sessions already open finish with what they started
    /// with. `listen` is bound once: a change waits for a restart (logged). Nothing changes
    /// if the new identity cannot be loaded. Returns what changed, for the log.
    pub fn reload(&self, config: &Config) -> Result<String, ServerError> {
        let identity = config.identity()?;
        warn_if_key_readable(&config.key);
        let tls = ferry_protocol::tls::server_config(identity.certs, identity.key)?;
        if config.listen != self.listen {
            tracing::warn!(
                "listen changed to {}: it takes effect at the next restart (still on {})",
                config.listen,
                self.listen
            );
        }
        let old = self.table();
        let same_dir = config.state_dir == self.state_dir;
        let (mut added, mut changed, mut kept) = (0, 0, 0);
        let mut table = ModuleTable::new();
        for m in config.modules.values() {
            let slot = match old.get(&m.name) {
                Some(slot) if same_dir && slot.module() == m => {
                    kept += 1;
                    slot.clone()
                }
                before => {
                    if before.is_some() {
                        changed += 1;
                    } else {
                        added += 1;
                    }
                    Arc::new(ModuleSlot::new(m.clone(), config.state_dir.clone()))
                }
            };
            table.insert(m.name.clone(), slot);
        }
        let removed = old
            .keys()
            .filter(|n| !config.modules.contains_key(*n))
            .count();
        // Replaced and removed modules keep their digests for the next start, and give up
        // their write lease (a replaced one takes it again at its first writer).
        for (name, slot) in old.iter() {
            if !table.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                retire(slot);
            }
        }
        *self.modules.write().expect("modules lock") = Arc::new(table);
        *self.tls.write().expect("tls lock") = tls;
        Ok(format!(
            "{kept} modules unchanged, {added} added, {changed} changed, {removed} removed"
        ))
    }

    /// Modules served.
    pub fn module_count(&self) -> usize {
        self.table().len()
    }

    /// Process-wide counters.
    pub fn stats(&self) -> Vec<(String, u64)> {
        self.stats.snapshot()
    }

    /// Each open module's history figures, by module name (modules without history left out).
    pub fn history_figures(&self) -> Vec<(String, crate::history::Figures)> {
        let mut out: Vec<(String, crate::history::Figures)> = self
            .table()
            .iter()
            .filter_map(|(name, slot)| {
                let open = slot.opened()?;
                let figures = open.history.as_ref()?.figures().ok()?;
                Some((name.clone(), figures))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Sessions being served now, and connections turned away before their handshake so far.
    pub fn load(&self) -> (usize, u64) {
        (
            self.admission.sessions_open(),
            self.admission.turned_away_count(),
        )
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
                    // Over its address's cap, the oldest handshake from there makes room.
                    let handshake = self.admission.handshake(slot, peer.ip());
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
        for slot in self.table().values() {
            retire(slot);
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

/// An open module no longer served: its digest cache written to its state file, its write
/// lease given up.
fn retire(slot: &ModuleSlot) {
    if let Some(state) = slot.opened() {
        if let Err(e) = state.cache.lock().expect("cache lock").save() {
            tracing::warn!(module = %state.module.name, "cannot save digest cache: {e}");
        }
        if let Some(lease) = &state.lease {
            lease.release();
        }
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
    tracing::info!(listen = %listener.local_addr()?, modules = server.module_count(), "receiver listening");
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
        Loopback::start_with_history(module, path, None).await
    }

    /// [`Loopback::start`], the module keeping its history in `history` (default retention).
    pub async fn start_with_history(
        module: &str,
        path: PathBuf,
        history: Option<PathBuf>,
    ) -> Result<Loopback, ServerError> {
        let (server_id, _, _) = Identity::generate("ferry-loopback-receiver")?;
        let (client, _, _) = Identity::generate("ferry-loopback-sender")?;
        let pin = server_id.fingerprint();
        let module = Module {
            name: module.into(),
            path,
            clients: vec![client.fingerprint()],
            restore_clients: vec![client.fingerprint()],
            hosts_allow: None,
            read_only: false,
            max_connections: None,
            comment: None,
            // A local copy by the user who runs it: keep everything that user can.
            devices: true,
            setuid: true,
            owner: Default::default(),
            history: history.map(|dir| crate::config::HistoryConfig {
                dir,
                keep: Default::default(),
            }),
            lease: None,
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
