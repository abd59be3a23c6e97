//! An in-memory sender ↔ receiver pair: the real receiver (`serve_stream`: access check,
//! request loop, filesystem) and the real sender `Session`, over `tokio::io::duplex` instead
//! of TCP and TLS. No binaries, no sockets; the peer's fingerprint is given, as TLS would
//! have proven it.

use ferry_protocol::connection::{server_answer, server_hello, FrameReader, FrameWriter};
use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::message::Keeps;
use ferry_protocol::Fingerprint;
use ferry_receiver::config::Module;
use ferry_receiver::Server;
use ferry_sender::config::SyncGroup;
use ferry_sender::session::Session;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
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
        Pair::build(max_connections, None, None, None)
    }

    /// A pair whose module keeps its history in `history` (beside `src` and `dst`) with
    /// retention `keep`.
    pub fn with_history(keep: ferry_receiver::history::Keep) -> Pair {
        Pair::build(None, Some(keep), None, None)
    }

    /// [`Pair::with_history`] with the module (`dst`) and its history in `place` (a
    /// filesystem of the test's).
    pub fn with_history_in(keep: ferry_receiver::history::Keep, place: &std::path::Path) -> Pair {
        Pair::build(None, Some(keep), Some(place.to_path_buf()), None)
    }

    /// A pair whose module is served as gateway `pair-gw` under the write lease `lease`
    /// (expiring after `expiry`), as one of several receivers on a shared filesystem.
    pub fn with_lease(lease: &std::path::Path, expiry: std::time::Duration) -> Pair {
        let lease = ferry_receiver::config::LeaseConfig {
            path: lease.to_path_buf(),
            expiry,
            gateway: "pair-gw".into(),
        };
        Pair::build(None, None, None, Some(lease))
    }

    /// The history directory of a pair made [`Pair::with_history`].
    pub fn history(&self) -> PathBuf {
        self.dst.parent().unwrap().join("history")
    }

    fn build(
        max_connections: Option<usize>,
        keep: Option<ferry_receiver::history::Keep>,
        place: Option<PathBuf>,
        lease: Option<ferry_receiver::config::LeaseConfig>,
    ) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let place = place.unwrap_or_else(|| tmp.path().to_path_buf());
        let (src, dst) = (tmp.path().join("src"), place.join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let (identity, _, _) = Identity::generate("pair-receiver").unwrap();
        let client = ferry_protocol::fingerprint::of_der(b"pair-sender");
        let module = Module {
            name: "file".into(),
            path: dst.clone(),
            clients: vec![client],
            restore_clients: vec![client],
            hosts_allow: None,
            read_only: false,
            max_connections,
            comment: None,
            devices: false,
            setuid: false,
            owner: Default::default(),
            history: keep.map(|keep| ferry_receiver::config::HistoryConfig {
                dir: place.join("history"),
                keep,
            }),
            lease,
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
        let (ours, serving) = serve(self.server.clone(), self.client);
        self.served.spawn(serving);
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

/// One end of an in-memory connection, and the future that serves the other with the real
/// receiver as if `client` had proven its certificate over TLS.
pub fn serve(
    server: Arc<Server>,
    client: Fingerprint,
) -> (DuplexStream, impl std::future::Future<Output = ()> + Send) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let serving = async move {
        let peer = "127.0.0.1:40000".parse().unwrap();
        let cancel = CancellationToken::new();
        let _ = ferry_receiver::session::serve_stream(&server, theirs, peer, client, None, cancel)
            .await;
    };
    (ours, serving)
}

/// The reading and writing ends of a scripted receiver.
pub type Scripted = (
    FrameReader<ReadHalf<DuplexStream>>,
    FrameWriter<WriteHalf<DuplexStream>>,
);

/// A scripted receiver on `stream`: it reads the sender's `Hello` and welcomes the session
/// (keeping nothing beyond `rsync -a`); what it says next is the test's. `None` if the sender
/// went away first.
pub async fn welcome(stream: DuplexStream) -> Option<Scripted> {
    let (r, w) = tokio::io::split(stream);
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    server_hello(&mut reader).await.ok()?.ok()?;
    let keeps = Keeps {
        owners: false,
        devices: false,
        setid: false,
        xattrs: Default::default(),
        history: false,
    };
    server_answer(&mut writer, Ok(keeps)).await.ok()?;
    Some((reader, writer))
}
