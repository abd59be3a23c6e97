//! Watching one sync group: a thread that owns the group's inotify instance (through
//! `notify`) and its [`Coalescer`], turns raw events into changes, and pushes ready changes to
//! every target queue of the group.
//!
//! Watches are placed per directory (not with notify's recursive mode) so the thread knows
//! which directories are watched, can report progress on deep trees, can place watches on a
//! new directory *before* scanning it (nothing created inside it is missed), and can keep
//! going when the kernel's watch limit is reached.

use crate::coalesce::{Change, Coalescer, Event as Ev, Timing, What};
use crate::config::{SyncGroup, WatcherChoice};
use crate::fanotify::FanWatch;
use crate::queue::Queue;
use crate::route::{route, Lookup, Routed};
use ferry_protocol::liveness::Beat;
use ferry_protocol::RelPath;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// While some directories cannot be watched (watch limit), the whole group is compared this
/// often instead.
pub const DEGRADED_RESCAN: Duration = Duration::from_secs(60);
/// Longest the thread sleeps without checking for shutdown.
const TICK: Duration = Duration::from_millis(200);
/// Raw events that may wait between notify's thread and the router. Past it, events are
/// dropped and the group is compared whole instead (as after a kernel queue overflow), so
/// memory stays bounded while nothing is lost.
pub const EVENT_BACKLOG: usize = 65_536;

type RawEvent = notify::Result<notify::Event>;

/// Which kernel interface watches a group's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One inotify watch per directory.
    Inotify,
    /// One fanotify mark per filesystem.
    Fanotify,
}

impl Backend {
    /// The backend for `choice` on this machine and these sources, and why (for the one
    /// start-up line); an error when fanotify was demanded and cannot be had.
    pub fn choose(choice: WatcherChoice, sources: &[&Path]) -> Result<(Backend, String), String> {
        let why_not = || crate::fanotify::unavailable(sources);
        match choice {
            WatcherChoice::Inotify => Ok((Backend::Inotify, "inotify, as configured".into())),
            WatcherChoice::Fanotify => match why_not() {
                None => Ok((Backend::Fanotify, "fanotify, as configured".into())),
                Some(why) => Err(format!("watcher = \"fanotify\": fanotify {why}")),
            },
            WatcherChoice::Auto => Ok(match why_not() {
                None => (
                    Backend::Fanotify,
                    "fanotify (one mark per filesystem; no watch limit)".into(),
                ),
                Some(why) => (
                    Backend::Inotify,
                    format!("inotify (fanotify {why}; one watch per directory)"),
                ),
            }),
        }
    }

    fn queue_sysctl(self) -> &'static str {
        match self {
            Backend::Inotify => "fs.inotify.max_queued_events",
            Backend::Fanotify => "fs.fanotify.max_queued_events",
        }
    }
}

/// The kernel side of a group's watching.
enum Source {
    Inotify(RecommendedWatcher),
    /// `None` while the source is gone.
    Fanotify(Option<FanWatch>),
}

/// The event source's side of the bounded hop to the router: a full channel becomes an
/// overflow.
#[derive(Clone)]
struct Bounded {
    tx: mpsc::SyncSender<RawEvent>,
    overflowed: Arc<AtomicBool>,
}

impl notify::EventHandler for Bounded {
    fn handle_event(&mut self, event: RawEvent) {
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(event) {
            self.overflowed.store(true, Ordering::Relaxed);
        }
    }
}

/// The watcher thread of one group.
pub struct GroupWatcher {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl GroupWatcher {
    /// Starts watching `group`; ready changes go to each of `queues`. Returns once every
    /// directory is watched (or the limit was hit), so a reconcile started afterwards misses
    /// nothing.
    pub fn start(
        group: SyncGroup,
        timing: Timing,
        queues: Vec<Queue>,
        beat: Beat,
        backend: Backend,
    ) -> Result<GroupWatcher, notify::Error> {
        let (tx, rx) = mpsc::sync_channel(EVENT_BACKLOG);
        let overflowed = Arc::new(AtomicBool::new(false));
        let handler = Bounded {
            tx,
            overflowed: overflowed.clone(),
        };
        let source = match backend {
            Backend::Fanotify => Source::Fanotify(Some(
                FanWatch::start(&group.source, handler.clone()).map_err(notify::Error::io)?,
            )),
            Backend::Inotify => Source::Inotify(Self::inotify(&group, handler.clone())?),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut router = Router {
            coalescer: Coalescer::new(timing),
            watched: HashSet::new(),
            unwatched: 0,
            limit_logged: false,
            root_gone: false,
            overflowed,
            source,
            handler,
            on_dir: false,
            group,
            queues,
            beat,
        };
        let started = Instant::now();
        router.watch_tree(&RelPath::root(), true);
        match &router.source {
            Source::Inotify(_) => tracing::info!(
                sync = %router.group.name,
                dirs = router.watched.len(),
                unwatched = router.unwatched,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "watches in place"
            ),
            Source::Fanotify(_) => tracing::info!(
                sync = %router.group.name,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "watches in place (fanotify filesystem marks)"
            ),
        }
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("watch {}", router.group.name))
            .spawn(move || router.run(rx, &stop2))
            .expect("spawn watcher thread");
        Ok(GroupWatcher {
            thread: Some(thread),
            stop,
        })
    }

    /// A `notify` inotify watcher feeding `handler` (no watches yet).
    fn inotify(group: &SyncGroup, handler: Bounded) -> Result<RecommendedWatcher, notify::Error> {
        RecommendedWatcher::new(
            handler,
            notify::Config::default().with_follow_symlinks(false),
        )
        .inspect_err(|e| {
            if let notify::ErrorKind::Io(io) = &e.kind {
                if io.raw_os_error() == Some(libc::EMFILE) {
                    tracing::error!(
                        sync = %group.name,
                        "cannot create an inotify instance: raise the limit with \
                         `sysctl -w fs.inotify.max_user_instances=1024` (persist it in \
                         /etc/sysctl.d/90-ferry.conf)"
                    );
                }
            }
        })
    }

    /// Stops the thread and drops the watches.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GroupWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Router {
    coalescer: Coalescer,
    /// Watched directories, relative to the source.
    watched: HashSet<RelPath>,
    /// Directories left unwatched by the last walk because of the watch limit.
    unwatched: usize,
    limit_logged: bool,
    /// The source root was removed or moved away: its watches are gone.
    root_gone: bool,
    /// Set by the event source's thread when the channel to us was full and events were
    /// dropped.
    overflowed: Arc<AtomicBool>,
    source: Source,
    /// The sending end of our channel, for a fanotify reader started again.
    handler: Bounded,
    /// fanotify said the event being routed is on a directory.
    on_dir: bool,
    group: SyncGroup,
    queues: Vec<Queue>,
    /// Beaten every time round the loop (at least every [`TICK`]).
    beat: Beat,
}

impl Router {
    fn run(mut self, rx: mpsc::Receiver<RawEvent>, stop: &AtomicBool) {
        let mut next_rescan = Instant::now() + DEGRADED_RESCAN;
        let mut next_root_check = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            self.beat.beat();
            let now = Instant::now();
            let wait = self
                .coalescer
                .deadline()
                .map_or(TICK, |d| d.saturating_duration_since(now).min(TICK));
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    self.handle(ev);
                    // Take everything already queued before deciding what is ready, so a
                    // burst read in one go coalesces.
                    for ev in rx.try_iter().take(4096) {
                        self.handle(ev);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if self.overflowed.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    sync = %self.group.name,
                    "more than {EVENT_BACKLOG} events waited for the router; comparing the \
                     whole tree"
                );
                self.rewatch_all();
                self.coalescer.event(Ev::Overflow, now);
            }
            if now >= next_root_check {
                next_root_check = now + self.group.timing.source_recheck;
                if !self.root_gone {
                    if self.remark_if_moved() {
                        tracing::warn!(sync = %self.group.name, "the source's filesystem changed (remounted?); marked it again and comparing the whole tree");
                        self.coalescer.event(Ev::Overflow, now);
                    }
                } else if self.group.source.is_dir() {
                    self.remark_if_moved();
                    tracing::info!(sync = %self.group.name, "source directory is back; comparing the whole tree");
                    self.root_gone = false;
                    self.watched.clear();
                    self.rewatch_all();
                    self.coalescer.event(Ev::Overflow, now);
                }
            }
            if self.unwatched > 0 && now >= next_rescan {
                next_rescan = now + DEGRADED_RESCAN;
                tracing::warn!(
                    sync = %self.group.name,
                    unwatched = self.unwatched,
                    "some directories are not watched (inotify limit); comparing the whole tree"
                );
                self.unwatched = 0;
                self.watch_tree(&RelPath::root(), false);
                self.coalescer.event(Ev::Overflow, now);
            }
            let ready = self.coalescer.poll(now);
            if !ready.is_empty() {
                self.dispatch(ready);
            }
        }
    }

    fn dispatch(&self, changes: Vec<Change>) {
        for q in &self.queues {
            q.push(changes.iter().cloned());
        }
    }

    fn rel(&self, path: &Path) -> Option<RelPath> {
        path.strip_prefix(&self.group.source)
            .ok()
            .map(RelPath::from_path)
    }

    fn handle(&mut self, ev: notify::Result<notify::Event>) {
        let now = Instant::now();
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    self.limit_hit();
                } else {
                    tracing::warn!(sync = %self.group.name, "watcher error, comparing the whole tree: {e}");
                }
                self.rewatch_all();
                self.coalescer.event(Ev::Overflow, now);
                return;
            }
        };
        if ev.need_rescan() {
            tracing::warn!(
                sync = %self.group.name,
                "kernel event queue overflowed; comparing the whole tree (raise {} to make \
                 this rarer)",
                self.backend().queue_sysctl()
            );
            self.rewatch_all();
            self.coalescer.event(Ev::Overflow, now);
            return;
        }
        tracing::trace!(sync = %self.group.name, ?ev, "event");
        let Some(rel) = ev.paths.first().and_then(|p| self.rel(p)) else {
            return;
        };
        let cookie = ev.tracker().map(|c| c as u32);
        self.on_dir = ev.info() == Some(crate::fanotify::ON_DIR);
        match route(&ev.kind, rel, cookie, &*self) {
            Routed::Ignore => {}
            Routed::RootGone => {
                if !self.root_gone {
                    tracing::error!(
                        sync = %self.group.name,
                        source = %self.group.source.display(),
                        "the source directory itself was removed or moved; the group pauses \
                         and is compared whole once it is back"
                    );
                }
                self.root_gone = true;
                // Wake the workers: they find the source missing, pause (saying so once, and
                // showing it in `ferry status`), and keep the whole compare for its return.
                self.coalescer.event(Ev::Overflow, now);
            }
            Routed::Event {
                event,
                watch,
                forget,
            } => {
                if let Some(f) = forget {
                    self.forget_under(&f);
                }
                if let Some(w) = watch {
                    self.watch_tree(&w, false);
                }
                self.coalescer.event(event, now);
            }
        }
    }

    fn backend(&self) -> Backend {
        match self.source {
            Source::Inotify(_) => Backend::Inotify,
            Source::Fanotify(_) => Backend::Fanotify,
        }
    }

    /// fanotify: marks the source's filesystems again if they are not the ones marked (the
    /// source was remounted, or came back after it was gone); true if it did.
    fn remark_if_moved(&mut self) -> bool {
        let Source::Fanotify(watch) = &mut self.source else {
            return false;
        };
        let Ok(md) = std::fs::metadata(&self.group.source) else {
            *watch = None;
            return false;
        };
        let dev = std::os::unix::fs::MetadataExt::dev(&md);
        if watch.as_ref().is_some_and(|w| w.devices.contains(&dev)) {
            return false;
        }
        *watch = None;
        match FanWatch::start(&self.group.source, self.handler.clone()) {
            Ok(w) => {
                *watch = Some(w);
                true
            }
            Err(e) => {
                tracing::warn!(sync = %self.group.name, "cannot mark the source with fanotify: {e}");
                false
            }
        }
    }

    /// Drops our record of watches at and below `rel` (notify drops the watches themselves
    /// when a watched directory is removed or moved away).
    fn forget_under(&mut self, rel: &RelPath) {
        self.watched.retain(|w| !w.starts_with(rel));
    }

    fn rewatch_all(&mut self) {
        self.unwatched = 0;
        self.watch_tree(&RelPath::root(), false);
    }

    /// Places a watch on every directory at and below `start` that the filter accepts
    /// (inotify; fanotify's filesystem marks cover everything already).
    fn watch_tree(&mut self, start: &RelPath, log_progress: bool) {
        if !matches!(self.source, Source::Inotify(_)) {
            return;
        }
        let mut stack = vec![start.clone()];
        let mut last_log = Instant::now();
        let mut limit = self.unwatched > 0;
        while let Some(dir) = stack.pop() {
            let abs = ferry_protocol::local::local_path(&self.group.source, &dir);
            if self.watched.contains(&dir) {
                // Already watched (a rescan walks everything again).
            } else if limit {
                self.unwatched += 1;
            } else {
                let Source::Inotify(watcher) = &mut self.source else {
                    return;
                };
                match watcher.watch(&abs, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.watched.insert(dir.clone());
                    }
                    Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                        self.limit_hit();
                        limit = true;
                        self.unwatched += 1;
                    }
                    Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => continue,
                    Err(e) => {
                        tracing::warn!(sync = %self.group.name, path = %abs.display(), "cannot watch: {e}");
                        continue;
                    }
                }
            }
            let Ok(entries) = std::fs::read_dir(&abs) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let child = dir.join(std::os::unix::ffi::OsStrExt::as_bytes(
                    entry.file_name().as_os_str(),
                ));
                if self.group.filter.accepts(&child, true) {
                    stack.push(child);
                }
            }
            if log_progress && last_log.elapsed() >= self.group.timing.progress_every {
                last_log = Instant::now();
                tracing::info!(
                    sync = %self.group.name,
                    dirs = self.watched.len(),
                    "placing watches"
                );
            }
        }
    }

    fn limit_hit(&mut self) {
        if self.limit_logged {
            return;
        }
        self.limit_logged = true;
        let current = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(8192);
        let suggested = (current * 4).max(524_288);
        tracing::error!(
            sync = %self.group.name,
            watched = self.watched.len(),
            limit = current,
            "inotify watch limit reached: raise it with `sysctl -w \
             fs.inotify.max_user_watches={suggested}` and persist it in \
             /etc/sysctl.d/90-ferry.conf. Until then unwatched directories are compared every \
             {}s.",
            DEGRADED_RESCAN.as_secs()
        );
    }
}

impl Lookup for Router {
    fn what(&self, rel: &RelPath) -> Option<What> {
        let md =
            std::fs::symlink_metadata(ferry_protocol::local::local_path(&self.group.source, rel))
                .ok()?;
        let ft = md.file_type();
        Some(if ft.is_dir() {
            What::Dir
        } else if ft.is_file() {
            What::File
        } else {
            What::Other
        })
    }

    fn watched(&self, rel: &RelPath) -> bool {
        match self.source {
            Source::Inotify(_) => self.watched.contains(rel),
            // Asked of the event's own path only: fanotify said whether it is a directory.
            Source::Fanotify(_) => self.on_dir,
        }
    }

    fn excluded(&self, rel: &RelPath, is_dir: bool) -> bool {
        self.group.filter.excludes_with_ancestors(rel, is_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::EventHandler;

    #[test]
    fn a_full_hop_to_the_router_becomes_an_overflow_not_a_lost_change() {
        let (tx, rx) = mpsc::sync_channel(2);
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut handler = Bounded {
            tx,
            overflowed: overflowed.clone(),
        };
        let event = || Ok(notify::Event::new(notify::EventKind::Any));
        handler.handle_event(event());
        handler.handle_event(event());
        assert!(!overflowed.load(Ordering::Relaxed), "room for two");
        handler.handle_event(event());
        assert!(
            overflowed.load(Ordering::Relaxed),
            "the third was dropped: rescan"
        );
        assert_eq!(rx.try_iter().count(), 2, "memory bounded by the channel");
    }
}
