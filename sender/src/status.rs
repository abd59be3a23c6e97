//! What each (sync group, target) pair is doing right now: its state and why, what it still
//! owes the target (from its [`Queue`]), how old the oldest of that is, its last error and
//! what it has sent. Workers write it through their [`Tracker`]; `ferry status` and the
//! metrics endpoint read [`Board::snapshot`]. Nothing here decides anything.

use crate::execute::Report;
use crate::queue::Queue;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not connected yet (the daemon just started, or the group was just restarted).
    Starting,
    /// Connected (or, for an rsync target, the last run succeeded); sending or idle.
    Connected,
    /// The connection or the last batch failed; trying again with backoff.
    Retrying,
    /// Nothing is sent for a reason outside ferry (the source is missing).
    Paused,
    /// This target is given up until the daemon is restarted or reloaded (it cannot work as
    /// configured). The mass-delete guard never stops a target: it holds deletions only.
    Stopped,
}

impl State {
    /// Every state, for metrics that show one series per state.
    pub const ALL: [State; 5] = [
        State::Starting,
        State::Connected,
        State::Retrying,
        State::Paused,
        State::Stopped,
    ];

    /// Its name as shown.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Connected => "connected",
            State::Retrying => "retrying",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

/// One (group, target) pair, as shown by `ferry status` and the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Sync group.
    pub sync: String,
    /// Target name.
    pub target: String,
    /// `ferry` or `rsync`.
    pub kind: String,
    /// Where it is (the first gateway, for a target that has several).
    pub address: String,
    /// The receiver the last session went to: for a target with several gateways, which one
    /// it uses.
    #[serde(default)]
    pub gateway: Option<String>,
    /// State.
    pub state: State,
    /// Why, when retrying, paused or stopped.
    pub why: Option<String>,
    /// Seconds in this state.
    pub state_seconds: f64,
    /// True once a whole-tree compare has converged on this target since the start.
    pub reconciled: bool,
    /// Changes not yet acknowledged by the target (waiting, in flight, or to be retried);
    /// a whole-tree compare counts as one.
    pub pending: u64,
    /// A whole-tree compare is waiting or running.
    pub compare_pending: bool,
    /// Age in seconds of the oldest change the target has not acknowledged (0 when none).
    pub lag_seconds: f64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Seconds since the last error.
    pub last_error_seconds: Option<f64>,
    /// Files sent since the start.
    pub files: u64,
    /// Paths deleted on the target since the start.
    pub deleted: u64,
    /// Bytes written to the connection since the start (file payload for rsync targets).
    pub bytes: u64,
    /// Paths the target refused since the start (each try counted).
    pub failures: u64,
    /// Deletions the mass-delete guard holds back (paths), everything else still sent;
    /// `ferry confirm-deletes GROUP` releases them.
    #[serde(default)]
    pub held_deletes: u64,
    /// Why they are held.
    #[serde(default)]
    pub held_why: Option<String>,
    /// Mass deletions applied into the module's history since the start (the guard would have
    /// held them without it); the last one said in `last_mass_change`.
    #[serde(default)]
    pub mass_changes: u64,
    /// The last of them.
    #[serde(default)]
    pub last_mass_change: Option<String>,
}

/// What the running sender says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// ferry's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// When the configuration in force was read (Unix seconds).
    pub config_loaded_unix: u64,
    /// Every (group, target) pair, by group then target.
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug)]
struct Live {
    state: State,
    why: Option<String>,
    since: Instant,
    reconciled: bool,
    last_error: Option<(String, Instant)>,
    files: u64,
    deleted: u64,
    bytes: u64,
    failures: u64,
    held: Option<crate::execute::Held>,
    mass_changes: u64,
    last_mass_change: Option<String>,
    /// Operator confirmations of held deletions so far.
    confirmations: u64,
    gateway: Option<String>,
}

#[derive(Debug)]
struct Entry {
    kind: &'static str,
    address: String,
    queue: Queue,
    live: Live,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    config_loaded: SystemTime,
    entries: BTreeMap<(String, String), Entry>,
}

/// Every pair's status; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Board {
    inner: Arc<Mutex<Inner>>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            inner: Arc::new(Mutex::new(Inner {
                started: Instant::now(),
                config_loaded: SystemTime::now(),
                entries: BTreeMap::new(),
            })),
        }
    }
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("status lock")
    }

    /// Adds (or replaces) the pair `group`/`target` draining `queue`; its worker reports
    /// through the returned tracker.
    pub fn register(
        &self,
        group: &str,
        target: &str,
        kind: &'static str,
        address: &str,
        queue: Queue,
    ) -> Tracker {
        let key = (group.to_string(), target.to_string());
        let entry = Entry {
            kind,
            address: address.to_string(),
            queue,
            live: Live {
                state: State::Starting,
                why: None,
                since: Instant::now(),
                reconciled: false,
                last_error: None,
                files: 0,
                deleted: 0,
                bytes: 0,
                failures: 0,
                held: None,
                mass_changes: 0,
                last_mass_change: None,
                confirmations: 0,
                gateway: None,
            },
        };
        self.lock().entries.insert(key.clone(), entry);
        Tracker {
            board: self.clone(),
            key,
        }
    }

    /// Forgets every pair of `group` (it was removed or is being restarted).
    pub fn remove_group(&self, group: &str) {
        self.lock().entries.retain(|(g, _), _| g != group);
    }

    /// `ferry confirm-deletes GROUP`: every target of `group` applies the deletions its guard
    /// holds, through a whole compare queued now. Returns the targets told, or why none.
    pub fn confirm_deletes(&self, group: &str) -> Result<Vec<String>, String> {
        let mut inner = self.lock();
        let mut told = Vec::new();
        for ((g, t), e) in inner.entries.iter_mut() {
            if g == group {
                e.live.confirmations += 1;
                e.queue.push([crate::coalesce::Change::Full]);
                told.push(t.clone());
            }
        }
        if told.is_empty() {
            let groups: std::collections::BTreeSet<&str> =
                inner.entries.keys().map(|(g, _)| g.as_str()).collect();
            let known: Vec<&str> = groups.into_iter().collect();
            return Err(format!(
                "no sync group {group:?} in the running sender (groups: {})",
                known.join(", ")
            ));
        }
        Ok(told)
    }

    /// Notes that a configuration was (re)loaded now.
    pub fn config_loaded(&self) {
        self.lock().config_loaded = SystemTime::now();
    }

    /// The state of every pair now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let now = Instant::now();
        let secs = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
        let targets = inner
            .entries
            .iter()
            .map(|((sync, target), e)| {
                let pending = e.queue.pending();
                let l = &e.live;
                TargetStatus {
                    sync: sync.clone(),
                    target: target.clone(),
                    kind: e.kind.to_string(),
                    address: e.address.clone(),
                    gateway: l.gateway.clone(),
                    state: l.state,
                    why: l.why.clone(),
                    state_seconds: secs(l.since),
                    reconciled: l.reconciled,
                    pending: pending.changes as u64,
                    compare_pending: pending.full,
                    lag_seconds: pending.oldest.map_or(0.0, secs),
                    last_error: l.last_error.as_ref().map(|(m, _)| m.clone()),
                    last_error_seconds: l.last_error.as_ref().map(|(_, t)| secs(*t)),
                    files: l.files,
                    deleted: l.deleted,
                    bytes: l.bytes,
                    failures: l.failures,
                    held_deletes: l.held.as_ref().map_or(0, |h| h.paths),
                    held_why: l.held.as_ref().map(|h| h.why.clone()),
                    mass_changes: l.mass_changes,
                    last_mass_change: l.last_mass_change.clone(),
                }
            })
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: secs(inner.started),
            config_loaded_unix: inner
                .config_loaded
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            targets,
        }
    }
}

/// A worker's handle on its pair's status.
#[derive(Debug, Clone)]
pub struct Tracker {
    board: Board,
    key: (String, String),
}

impl Tracker {
    fn with(&self, f: impl FnOnce(&mut Live)) {
        if let Some(e) = self.board.lock().entries.get_mut(&self.key) {
            f(&mut e.live)
        }
    }

    /// Enters `state` (the time in it restarts only on a change of state).
    pub fn set(&self, state: State, why: Option<String>) {
        self.with(|l| {
            if l.state != state {
                l.state = state;
                l.since = Instant::now();
            }
            l.why = why;
        })
    }

    /// A session went to the receiver at `address`.
    pub fn gateway(&self, address: String) {
        self.with(|l| l.gateway = Some(address));
    }

    /// Enters `state` because of `error`, which becomes the last error.
    pub fn fail(&self, state: State, error: &str) {
        self.set(state, Some(error.to_string()));
        self.with(|l| l.last_error = Some((error.to_string(), Instant::now())));
    }

    /// Operator confirmations of held deletions so far (see [`Board::confirm_deletes`]).
    pub fn confirmations(&self) -> u64 {
        let mut n = 0;
        self.with(|l| n = l.confirmations);
        n
    }

    /// A batch was sent; `full` if it was a whole-tree compare.
    pub fn sent(&self, report: &Report, full: bool) {
        self.with(|l| {
            // A whole compare says all that is held; a live batch adds to it.
            match (&report.held, full) {
                (Some(h), _) if h.whole => l.held = Some(h.clone()),
                (Some(h), _) => {
                    let before = l.held.take();
                    l.held = Some(crate::execute::Held {
                        paths: before.as_ref().map_or(0, |b| b.paths) + h.paths,
                        entries: before.as_ref().map_or(0, |b| b.entries) + h.entries,
                        why: h.why.clone(),
                        whole: false,
                    });
                }
                (None, true) => l.held = None,
                (None, false) => {}
            }
            if let Some(m) = &report.mass_change {
                l.mass_changes += 1;
                l.last_mass_change = Some(m.clone());
            }
            l.files += report.files + report.rsync_paths;
            l.deleted += report.deleted;
            l.bytes += report.bytes_sent.max(report.payload_bytes);
            l.failures += report.failures.len() as u64;
            if let Some((path, why)) = report.failures.first() {
                l.last_error = Some((format!("{path}: {why}"), Instant::now()));
            }
            if full && report.converged() {
                l.reconciled = true;
            }
        })
    }
}
