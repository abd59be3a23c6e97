//! The live sender, wired: one watcher thread per sync group, one [`Worker`] task per (group,
//! target) over that target's transport. Nothing here decides anything: the watcher, the
//! coalescer, the queue, the worker and the planner do.

use crate::coalesce::Change;
use crate::config::{SyncGroup, Target, TargetKind};
use crate::queue::Queue;
use crate::rsync::{self, RsyncLink};
use crate::watch::GroupWatcher;
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
}

impl Daemon {
    /// Watches every group, reconciles every target, then follows changes until `shutdown`.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        observer: Arc<dyn Observer>,
    ) -> Result<(), DaemonError> {
        let mut watchers = Vec::new();
        let mut workers = tokio::task::JoinSet::new();
        for group in &self.syncs {
            let mut queues = Vec::new();
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
                let queue = Queue::new();
                // The first batch of every worker is a full reconcile.
                queue.push([Change::Full]);
                queues.push(queue.clone());
                targets.push((target, queue));
            }
            // Watches first, so nothing changed during the reconcile is missed.
            let g = group.clone();
            let beat = self
                .liveness
                .register(format!("event router of sync {}", group.name));
            let started = tokio::task::spawn_blocking(move || {
                GroupWatcher::start(g.clone(), g.timing, queues, beat)
            })
            .await
            .expect("watcher start task");
            let watcher = started.map_err(|error| DaemonError::Watch {
                group: group.name.clone(),
                source_dir: group.source.display().to_string(),
                error,
            })?;
            watchers.push(watcher);
            for (target, queue) in targets {
                let (t, stop) = (target.name.clone(), shutdown.clone());
                match &target.kind {
                    TargetKind::Rsync(r) => {
                        let link = RsyncLink {
                            group: group.clone(),
                            name: target.name.clone(),
                            address: target.address.clone(),
                            rsync: r.clone(),
                            observer: observer.clone(),
                        };
                        workers.spawn(Worker::new(group, t, queue, link, stop).run());
                    }
                    TargetKind::Ferry { .. } => {
                        let link = FerryLink::new(
                            group.clone(),
                            target.clone(),
                            self.identity.clone(),
                            observer.clone(),
                        );
                        workers.spawn(Worker::new(group, t, queue, link, stop).run());
                    }
                }
            }
        }
        observer.ready();
        while workers.join_next().await.is_some() {}
        for w in watchers {
            tokio::task::spawn_blocking(move || w.stop())
                .await
                .expect("watcher stop task");
        }
        Ok(())
    }
}
