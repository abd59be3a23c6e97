//! The live loop in memory: the real [`Worker`] on a hand-fed [`Queue`], over a [`FerryLink`]
//! whose sessions the real receiver serves through `tokio::io::duplex`. Run it under
//! `#[tokio::test(start_paused = true)]`: backoff, retries falling due and the delete guard's
//! window then pass in virtual time, so behaviour over minutes is a millisecond test.

use super::pair::Pair;
use ferry_protocol::connection::ConnError;
use ferry_protocol::message::Intent;
use ferry_sender::coalesce::Change;
use ferry_sender::config::SyncGroup;
use ferry_sender::queue::Queue;
use ferry_sender::session::{Session, SessionError};
use ferry_sender::status::{Board, TargetStatus};
use ferry_sender::worker::{Dial, FerryLink, LogObserver, Worker};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A running worker for the pair's group `file` and what steers it.
pub struct Live {
    /// The source and module trees and the receiver.
    pub pair: Pair,
    /// The worker's queue: push changes here as the watcher would.
    pub queue: Queue,
    /// While set, the receiver refuses connections (as one that is down).
    pub down: Arc<AtomicBool>,
    /// While set, new sessions reach a receiver that welcomes them and then says nothing,
    /// ever (a link that stalled behind a middlebox that still acknowledges).
    pub silent: Arc<AtomicBool>,
    /// When (on tokio's clock) each connection was attempted.
    pub dials: Arc<Mutex<Vec<tokio::time::Instant>>>,
    board: Board,
    shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

impl Live {
    /// Starts a worker for `group` (the pair's group, adjusted) whose queue holds `first`.
    pub fn start(pair: Pair, group: SyncGroup, first: Vec<Change>) -> Live {
        let queue = Queue::with_timing(group.timing);
        queue.push(first);
        let down = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let dials = Arc::new(Mutex::new(Vec::new()));
        let dial = dialer(&pair, down.clone(), silent.clone(), dials.clone());
        let links = Default::default();
        let observer = Arc::new(LogObserver);
        let link = FerryLink::with_dial(group.clone(), "pair".into(), dial, links, observer);
        let board = Board::default();
        let tracker = board.register(&group.name, "pair", "ferry", "in memory", queue.clone());
        let shutdown = CancellationToken::new();
        let worker = Worker::new(
            &group,
            "pair".into(),
            queue.clone(),
            link,
            shutdown.clone(),
            tracker,
        );
        let worker = tokio::spawn(worker.run());
        Live {
            pair,
            queue,
            down,
            silent,
            dials,
            board,
            shutdown,
            worker,
        }
    }

    /// `ferry confirm-deletes` of the group, as the status socket passes it on.
    pub fn confirm_deletes(&self, group: &str) {
        self.board.confirm_deletes(group).unwrap();
    }

    /// The pair's status, as `ferry status` shows it.
    pub fn status(&self) -> TargetStatus {
        self.board.snapshot().targets.remove(0)
    }

    /// Waits (on tokio's clock, `within` at most) until `ok` holds for the status.
    pub async fn wait(&self, within: Duration, what: &str, ok: impl Fn(&TargetStatus) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let s = self.status();
            if ok(&s) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the target is connected and owes nothing but held deletions.
    pub async fn settled_or_holding(&self, within: Duration) {
        self.wait(within, "settled or holding", |s| {
            s.state.name() == "connected" && s.pending == 0
        })
        .await
    }

    /// Waits until the worker owes nothing and is connected.
    pub async fn settled(&self, within: Duration) {
        self.wait(within, "settled", |s| {
            s.pending == 0 && !s.compare_pending && s.state.name() == "connected"
        })
        .await
    }

    /// Stops the worker as SIGTERM would and waits for it.
    pub async fn stop(self) -> Pair {
        self.shutdown.cancel();
        self.worker.await.unwrap();
        self.pair
    }
}

/// Opens sessions on the pair's module `file`, served in memory, unless `down` is set (or by
/// a receiver that never answers, while `silent` is); records each attempt's time in `dials`.
fn dialer(
    pair: &Pair,
    down: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    dials: Arc<Mutex<Vec<tokio::time::Instant>>>,
) -> Dial {
    let (server, client) = (pair.server.clone(), pair.client);
    Arc::new(move || {
        let (server, down, dials) = (server.clone(), down.clone(), dials.clone());
        let silent = silent.load(Ordering::SeqCst);
        Box::pin(async move {
            dials.lock().unwrap().push(tokio::time::Instant::now());
            if down.load(Ordering::SeqCst) {
                let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                return Err(SessionError::Conn {
                    address: "in memory".into(),
                    source: ConnError::Io(refused),
                });
            }
            let ours = if silent {
                let (ours, theirs) = tokio::io::duplex(1 << 20);
                tokio::spawn(say_nothing(theirs));
                ours
            } else {
                let (ours, serving) = super::pair::serve(server, client);
                tokio::spawn(serving);
                ours
            };
            Session::over(ours, "in memory", "file", Intent::Write, false)
                .await
                .map_err(|source| SessionError::Conn {
                    address: "in memory".into(),
                    source,
                })
        })
    })
}

/// A receiver that welcomes a session, then reads whatever comes and never answers.
async fn say_nothing(stream: tokio::io::DuplexStream) {
    if let Some((mut reader, _writer)) = super::pair::welcome(stream).await {
        while let Ok(Some(_)) = reader.read().await {}
    }
}
