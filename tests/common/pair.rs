//! An in-memory sender ↔ receiver pair: the real receiver (`serve_stream`: access check,
//! request loop, filesystem) and the real sender `Session`, over `tokio::io::duplex` instead
//! of TCP and TLS. No binaries, no sockets; the peer's fingerprint is given, as TLS would
//! have proven it.

use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::Fingerprint;
use ferry_receiver::config::Module;
use ferry_receiver::Server;
use ferry_sender::config::SyncGroup;
use ferry_sender::session::Session;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A source tree, a module tree, and a receiver serving the module to one client.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub server: Arc<Server>,
    pub client: Fingerprint,
    /// Served sessions, to wait for after a close.
    pub served: tokio::task::JoinSet<()>,
    /// Sessions opened from now on pack file bodies (`compress = true`).
    pub compress: bool,
}

impl Pair {
    /// A pair whose module `file` allows `max_connections` sessions at once.
    pub fn with_limit(max_connections: Option<usize>) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let (identity, _, _) = Identity::generate("pair-receiver").unwrap();
        let client = ferry_protocol::fingerprint::of_der(b"pair-sender");
        let module = Module {
            name: "file".into(),
            path: dst.clone(),
            clients: vec![client],
            hosts_allow: None,
            read_only: false,
            max_connections,
            comment: None,
            devices: false,
            setuid: false,
            owner: Default::default(),
        };
        let listen = "127.0.0.1:0".parse().unwrap();
        let server = Server::with_identity(identity, listen, vec![module], None).unwrap();
        Pair {
            tmp,
            src,
            dst,
            server: Arc::new(server),
            client,
            served: tokio::task::JoinSet::new(),
            compress: false,
        }
    }

    pub fn new() -> Pair {
        Pair::with_limit(None)
    }

    /// Opens a session on `module` with `intent`, served in memory.
    pub async fn open(&mut self, module: &str, intent: Intent) -> Result<Session, String> {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (server, client) = (self.server.clone(), self.client);
        self.served.spawn(async move {
            let peer = "127.0.0.1:40000".parse().unwrap();
            let _ = ferry_receiver::session::serve_stream(
                &server,
                theirs,
                peer,
                client,
                None,
                CancellationToken::new(),
            )
            .await;
        });
        Session::over(ours, "pair", module, intent, self.compress)
            .await
            .map_err(|e| e.to_string())
    }

    /// A writable session on module `file`.
    pub async fn session(&mut self) -> Arc<Session> {
        Arc::new(self.open("file", Intent::Write).await.unwrap())
    }

    /// The sync group `file`: `src` to module `file`.
    pub fn group(&self) -> SyncGroup {
        SyncGroup::new("file", self.src.clone(), vec!["pair".into()], "file")
    }
}
