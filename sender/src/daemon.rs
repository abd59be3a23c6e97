//! The live sender, wired: one watcher thread per sync group, one [`Worker`] task per (group,
//! target) over that target's transport. Nothing here decides anything: the watcher, the
//! coalescer, the queue, the worker and the planner do.

use crate::coalesce::Change;
use crate::config::{SyncGroup, Target, TargetKind};
use crate::queue::Queue;
use crate::reload::{self, Runs};
use crate::rsync::{self, RsyncLink};
use crate::status::Board;
use crate::watch::{Backend, GroupWatcher};
use crate::worker::{FerryLink, Worker};
use ferry_protocol::identity::Identity;
use ferry_protocol::liveness::Liveness;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use crate::worker::{LogObserver, Observer};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A sync group's source cannot be watched.
    #[error("sync {group}: cannot watch {source_dir}: {error}")]
    Watch {
        /// The group.
        group: String,
        /// Its source directory.
        source_dir: String,
        /// The cause.
        error: notify::Error,
    },
    /// An rsync target cannot run (the client binary is missing).
    #[error("target {target}: {message}")]
    Rsync {
        /// The target.
        target: String,
        /// What is wrong, naming the package to install.
        message: String,
    },
    /// A group names a target that does not exist.
    #[error("sync {group}: unknown target {target}")]
    UnknownTarget {
        /// The group.
        group: String,
        /// The missing target.
        target: String,
    },
}

/// Everything the daemon runs.
pub struct Daemon {
    /// Client identity.
    pub identity: Arc<Identity>,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Sync groups.
    pub syncs: Vec<SyncGroup>,
    /// Where each group's event router registers as a main loop (for the service watchdog).
    pub liveness: Liveness,
    /// Where every worker reports its state (for `ferry status` and the metrics).
    pub status: Board,
    /// How sources are watched.
    pub watcher: Backend,
}

/// A configuration to switch to while running (SIGHUP), already parsed and checked.
pub struct Reload {
    /// Client identity.
    pub identity: Arc<Identity>,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Sync groups.
    pub syncs: Vec<SyncGroup>,
    /// Told what the reload changed, or why it was refused.
    pub done: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
}

/// One running sync group: its watcher and a worker per target.
struct Unit {
    group: SyncGroup,
    /// The targets as configured when it started, with the identity's fingerprint if any of
    /// them is a ferry target: what must be equal for a reload to leave it running.
    targets: Vec<Target>,
    identity: Option<ferry_protocol::Fingerprint>,
    watcher: GroupWatcher,
    workers: tokio::task::JoinSet<()>,
    stop: CancellationToken,
}

/// A group whose watches are in place and whose workers are not started yet.
struct Prepared {
    unit: Unit,
    queues: Vec<Queue>,
}

/// What is needed to start units.
struct Parts<'a> {
    identity: &'a Arc<Identity>,
    targets: &'a BTreeMap<String, Target>,
    liveness: &'a Liveness,
    status: &'a Board,
    observer: &'a Arc<dyn Observer>,
    watcher: Backend,
}

impl Parts<'_> {
    /// The identity's fingerprint if any of `targets` is a ferry target (rsync targets do not
    /// use it, so a new certificate leaves their groups alone).
    fn identity_for(&self, targets: &[Target]) -> Option<ferry_protocol::Fingerprint> {
        targets
            .iter()
            .any(|t| t.fingerprint().is_some())
            .then(|| self.identity.fingerprint())
    }

    /// Checks `group`'s targets and watches its source; its queues start with a whole compare,
    /// so nothing changed before or during this is missed.
    async fn prepare(
        &self,
        group: &SyncGroup,
        shutdown: &CancellationToken,
    ) -> Result<Prepared, DaemonError> {
        let mut targets = Vec::new();
        for name in &group.targets {
            let target =
                self.targets
                    .get(name)
                    .cloned()
                    .ok_or_else(|| DaemonError::UnknownTarget {
                        group: group.name.clone(),
                        target: name.clone(),
                    })?;
            if let TargetKind::Rsync(r) = &target.kind {
                rsync::probe(r).map_err(|message| DaemonError::Rsync {
                    target: name.clone(),
                    message,
                })?;
            }
            targets.push(target);
        }
        let queues: Vec<Queue> = targets
            .iter()
            .map(|_| {
                let queue = Queue::with_timing(group.timing);
                queue.push([Change::Full]);
                queue
            })
            .collect();
        let g = group.clone();
        let beat = self
            .liveness
            .register(format!("event router of sync {}", group.name));
        let watch_queues = queues.clone();
        let backend = self.watcher;
        let started = tokio::task::spawn_blocking(move || {
            GroupWatcher::start(g.clone(), g.timing, watch_queues, beat, backend)
        })
        .await
        .expect("watcher start task");
        let watcher = started.map_err(|error| DaemonError::Watch {
            group: group.name.clone(),
            source_dir: group.source.display().to_string(),
            error,
        })?;
        let identity = self.identity_for(&targets);
        Ok(Prepared {
            unit: Unit {
                group: group.clone(),
                targets,
                identity,
                watcher,
                workers: tokio::task::JoinSet::new(),
                stop: shutdown.child_token(),
            },
            queues,
        })
    }

    /// Starts the workers of a prepared group.
    fn launch(&self, prepared: Prepared) -> Unit {
        let Prepared { mut unit, queues } = prepared;
        let group = &unit.group;
        self.status.remove_group(&group.name);
        // Learned about the source, not configured: one for the group, shared by its targets.
        let links = crate::links::Names::default();
        for (target, queue) in unit.targets.iter().zip(queues) {
            let (t, stop) = (target.name.clone(), unit.stop.clone());
            let kind = if target.fingerprint().is_some() {
                "ferry"
            } else {
                "rsync"
            };
            let tracker =
                self.status
                    .register(&group.name, &t, kind, &target.address, queue.clone());
            match &target.kind {
                TargetKind::Rsync(r) => {
                    let link = RsyncLink::new(
                        group.clone(),
                        target.name.clone(),
                        target.address.clone(),
                        r.clone(),
                        self.observer.clone(),
                    );
                    unit.workers
                        .spawn(Worker::new(group, t, queue, link, stop, tracker).run());
                }
                TargetKind::Ferry { .. } => {
                    let link = FerryLink::new(
                        group.clone(),
                        target.clone(),
                        self.identity.clone(),
                        links.clone(),
                        self.observer.clone(),
                    );
                    unit.workers
                        .spawn(Worker::new(group, t, queue, link, stop, tracker).run());
                }
            }
        }
        unit
    }
}

/// Stops a group's watcher (its thread joins, so off the runtime's threads).
async fn stop_watching(w: GroupWatcher) {
    tokio::task::spawn_blocking(move || w.stop())
        .await
        .expect("watcher stop task");
}

impl Unit {
    /// What this unit runs, for [`reload::plan`].
    fn running(&self) -> Runs {
        Runs {
            group: self.group.clone(),
            targets: self.targets.clone(),
            identity: self.identity,
        }
    }

    /// Lets the workers finish their batches in flight (see [`crate::timing::Timing::shutdown_grace`]),
    /// then stops watching.
    async fn stop(mut self) {
        self.stop.cancel();
        while self.workers.join_next().await.is_some() {}
        stop_watching(self.watcher).await;
    }
}

impl Daemon {
    /// A daemon for `syncs` pushing to `targets` as `identity`, watching with `watcher`; its
    /// status board and liveness start empty (clone them out before running it).
    pub fn new(
        identity: Arc<Identity>,
        targets: BTreeMap<String, Target>,
        syncs: Vec<SyncGroup>,
        watcher: Backend,
    ) -> Daemon {
        Daemon {
            identity,
            targets,
            syncs,
            liveness: Liveness::default(),
            status: Board::default(),
            watcher,
        }
    }

    /// Watches every group, reconciles every target, then follows changes until `shutdown`.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        observer: Arc<dyn Observer>,
    ) -> Result<(), DaemonError> {
        let (_keep, reloads) = tokio::sync::mpsc::channel(1);
        self.run_reloading(shutdown, observer, reloads).await
    }

    /// As [`Daemon::run`], switching to each configuration that arrives on `reloads`: groups
    /// that did not change (nor their targets, nor the identity) run on untouched, pending
    /// changes and connections included; removed groups stop; added and changed ones start
    /// with a whole compare, which covers whatever was pending in the group they replace. A
    /// reload whose new groups cannot start (a source that cannot be watched, a missing rsync
    /// client) changes nothing.
    pub async fn run_reloading(
        self,
        shutdown: CancellationToken,
        observer: Arc<dyn Observer>,
        mut reloads: tokio::sync::mpsc::Receiver<Reload>,
    ) -> Result<(), DaemonError> {
        let Daemon {
            identity,
            targets,
            syncs,
            liveness,
            status,
            watcher,
        } = self;
        let mut units: BTreeMap<String, Unit> = BTreeMap::new();
        {
            let parts = Parts {
                identity: &identity,
                targets: &targets,
                liveness: &liveness,
                status: &status,
                observer: &observer,
                watcher,
            };
            for group in &syncs {
                match parts.prepare(group, &shutdown).await {
                    Ok(p) => {
                        units.insert(group.name.clone(), parts.launch(p));
                    }
                    Err(e) => {
                        for (_, u) in std::mem::take(&mut units) {
                            u.stop().await;
                        }
                        return Err(e);
                    }
                }
            }
        }
        observer.ready();
        loop {
            let reload = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = reloads.recv() => match r {
                    Some(r) => r,
                    None => { shutdown.cancelled().await; break; }
                },
            };
            let parts = Parts {
                identity: &reload.identity,
                targets: &reload.targets,
                liveness: &liveness,
                status: &status,
                observer: &observer,
                watcher,
            };
            let running: BTreeMap<String, Runs> = units
                .iter()
                .map(|(n, u)| (n.clone(), u.running()))
                .collect();
            let fingerprint = reload.identity.fingerprint();
            let wanted: Vec<Runs> = reload
                .syncs
                .iter()
                .map(|g| Runs::of(g, &reload.targets, fingerprint))
                .collect();
            let plan = reload::plan(&running, &wanted);
            let mut prepared = Vec::new();
            let mut refused = None;
            for group in reload.syncs.iter().filter(|g| plan.starts(&g.name)) {
                match parts.prepare(group, &shutdown).await {
                    Ok(p) => prepared.push(p),
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            let done = |outcome| {
                if let Some(tx) = reload.done {
                    let _ = tx.send(outcome);
                }
            };
            if let Some(e) = refused {
                tracing::error!("reload refused: {e}; still running the previous configuration");
                done(Err(e.to_string()));
                for p in prepared {
                    stop_watching(p.unit.watcher).await;
                }
                continue;
            }
            for name in plan.changed.iter().chain(&plan.removed) {
                units.remove(name).expect("unit").stop().await;
            }
            for name in &plan.removed {
                status.remove_group(name);
                tracing::info!(sync = %name, "removed by reload");
            }
            for p in prepared {
                units.insert(p.unit.group.name.clone(), parts.launch(p));
            }
            status.config_loaded();
            let summary = plan.summary();
            tracing::info!("configuration reloaded: {summary}");
            done(Ok(summary));
        }
        for (_, u) in units {
            u.stop().await;
        }
        Ok(())
    }
}
