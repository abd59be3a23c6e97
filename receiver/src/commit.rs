//! The group commit: received files wait [`Sealed`] (checked, metadata applied, unnamed)
//! until a commit makes them durable together — their data first (one `syncfs` of the
//! module's filesystem for a batch, an `fsync` each for a few), then their names
//! ([`Apply::name_flushed`]), then the directories whose entries changed ([`Durable`]). A
//! name never appears before its data is on disk, and an `Ack` means durable under the final
//! name. Behind the request loop the flushes go in [`Round`]s, each of which makes one
//! batch's names and the next batch's data durable in one pass; the synchronous commit
//! ([`Apply::flush`], [`Apply::commit_durable`]) does the two in turn. The flushes are taken
//! from the session as values that run on any thread, so the request loop can go on while
//! the disk works; everything that resolves a path or changes the session's state stays on
//! the loop's thread.

use crate::apply::{Apply, Staged};
use ferry_protocol::local;
use ferry_protocol::message::RequestId;
use ferry_protocol::RelPath;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::Ordering;

/// A received file, checked (size, digest) and with its metadata applied, still unnamed:
/// [`Apply::flush`] makes it durable and puts it under its name.
pub struct Sealed {
    /// The request to answer.
    pub id: RequestId,
    /// Where it goes.
    pub path: RelPath,
    /// The file.
    pub staged: Staged,
    /// Its size.
    pub bytes: u64,
    /// Rebuilt from a delta.
    pub delta: bool,
    /// The device it is on.
    pub dev: u64,
    /// Its signature and window digests, for a big file rebuilt from a delta.
    pub known: Option<crate::windows::Known>,
    /// Sent whole and big: the window digests of its body, to be signed after its commit
    /// ([`crate::windows::Windows::sign_later`]).
    pub sign_later: Option<Vec<ferry_protocol::message::Digest>>,
    /// Its share of the process's descriptors.
    pub held: Held,
}

/// From this many sealed files (or dirty directories) on, a group commit flushes the module's
/// filesystem once (`syncfs`) instead of each file (`fsync`).
pub const SYNCFS_BATCH: usize = 8;

/// Sealed files one session may hold while a commit is under way, before the loop waits for
/// it: while one commit's files flush, as many more seal.
pub const MAX_SEALED: usize = 1024;

/// Sealed files a session may always hold while a commit is under way, whatever the other
/// sessions hold.
const SEALED_FLOOR: usize = 32;

/// Sealed files held in all the process's sessions (each an open descriptor), counted by
/// [`Held`].
static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One sealed file's share of the process's descriptors: counted in `HELD` from its
/// making to its drop, so the count cannot drift whichever way the file leaves (named,
/// discarded, its session gone).
pub struct Held(&'static std::sync::atomic::AtomicUsize);

impl Held {
    /// A share of the process-wide count.
    pub fn share() -> Held {
        Held::on(&HELD)
    }

    fn on(count: &'static std::sync::atomic::AtomicUsize) -> Held {
        count.fetch_add(1, Ordering::Relaxed);
        Held(count)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a session holding `sealed` files (sealed since its commit under way began) may
/// seal another before waiting for that commit: up to [`MAX_SEALED`] while the sealed files
/// of all sessions stay within a quarter of the process's descriptor limit, and
/// `SEALED_FLOOR` (32) in any case. One session streaming many small files thus keeps
/// sealing while its commit flushes (on a limit of 20,000 as on the units' 204,800), and
/// many sessions at once share what the limit allows.
pub fn may_seal(sealed: usize) -> bool {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let budget = *BUDGET.get_or_init(|| sealed_budget(ferry_protocol::descriptor_limit()));
    may_seal_within(sealed, HELD.load(Ordering::Relaxed), budget)
}

fn may_seal_within(sealed: usize, held: usize, budget: usize) -> bool {
    sealed < SEALED_FLOOR || (sealed < MAX_SEALED && held < budget)
}

/// The sealed files all sessions may hold under a descriptor limit of `nofile` (`None`:
/// unknown): a quarter of it, at least [`SEALED_FLOOR`].
fn sealed_budget(nofile: Option<u64>) -> usize {
    let quarter = nofile.map_or(1024, |n| usize::try_from(n / 4).unwrap_or(usize::MAX));
    quarter.max(SEALED_FLOOR)
}

/// Sealed files after their data's flush, each with whether its data is durable.
pub struct Flushed(Vec<(Sealed, io::Result<()>)>);

impl Flushed {
    /// `files` after a flush of the whole filesystem (`synced`), or an `fsync` each where
    /// there was none or it failed.
    fn of(files: Vec<Sealed>, synced: bool) -> Flushed {
        Flushed(
            files
                .into_iter()
                .map(|s| {
                    let r = if synced {
                        Ok(())
                    } else {
                        s.staged.file.sync_all()
                    };
                    (s, r)
                })
                .collect(),
        )
    }
}

impl Flushed {
    /// Drops the files unnamed (the module may not be written any more).
    pub fn discard(self) {
        for (s, _) in self.0 {
            s.staged.discard();
        }
    }
}

/// Work run beside the directories' flushes (a journal's commit or its log's flush).
type Beside = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// What makes a commit's changes durable ([`Apply::take_durable`]): run on any thread.
pub struct Durable {
    module: String,
    /// A local journal's transaction, written before the flush of the whole filesystem
    /// that makes it durable.
    journal: Option<Beside>,
    /// Directories to flush one by one.
    fsync: Vec<(RelPath, fs::File)>,
    /// The module root, to flush its filesystem once (or why it could not be opened).
    syncfs: Option<io::Result<fs::File>>,
    beside: Option<Beside>,
}

impl Durable {
    /// Flushes the directories (and, beside them on a thread of their own, the journal's
    /// work). An error means the changes may not be durable: nothing of this commit may be
    /// acknowledged.
    pub fn run(self) -> io::Result<()> {
        self.run_whole().0
    }

    /// [`Durable::run`], saying also whether the whole filesystem was flushed.
    fn run_whole(self) -> (io::Result<()>, bool) {
        let Durable {
            module,
            journal,
            fsync,
            syncfs: whole,
            beside,
        } = self;
        if let Some(journal) = journal {
            if let Err(e) = journal() {
                return (Err(e), false);
            }
        }
        let dirs = move || {
            let mut first_error = None;
            for (dir, f) in fsync {
                if let Err(e) = f.sync_all() {
                    tracing::warn!(module, path = %dir, "fsync failed: {e}");
                    first_error.get_or_insert(io::Error::new(e.kind(), format!("{dir}: {e}")));
                }
            }
            let mut whole_fs_synced = false;
            if let Some(root) = whole {
                match root.and_then(|r| syncfs(&r)) {
                    Ok(()) => whole_fs_synced = true,
                    Err(e) => {
                        tracing::warn!(module, "syncfs failed: {e}");
                        first_error.get_or_insert(e);
                    }
                }
            }
            (first_error.map_or(Ok(()), Err), whole_fs_synced)
        };
        let Some(beside) = beside else {
            return dirs();
        };
        std::thread::scope(|s| {
            let other = s.spawn(beside);
            let (dirs, whole_fs_synced) = dirs();
            let flushed = other
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("history journal: its thread panicked")));
            (flushed.and(dirs), whole_fs_synced)
        })
    }
}

/// One flush behind the request loop ([`Apply::take_round`]): what makes the last round's
/// names and the other changes since durable ([`Durable`]), and the data of the files sealed
/// since, which it flushes in the same pass — one `syncfs` of the module's filesystem for
/// both when either side is big enough to want one. The files it flushes are named after it
/// ends, and those names made durable by the next round: each flush serves two commits, and
/// a stream of files never waits for a flush that does one thing.
pub struct Round {
    names: Durable,
    data: Vec<Sealed>,
    /// The data is on the filesystem the names' `syncfs` flushes.
    covered: bool,
}

impl Round {
    /// The requests of the files whose data it flushes.
    pub fn paths(&self) -> Vec<RelPath> {
        self.data.iter().map(|s| s.path.clone()).collect()
    }

    /// Runs the flush: the outcome for the names (an error: none of them may be acknowledged)
    /// and each file whose data it made durable, to be named.
    pub fn run(self) -> (io::Result<()>, Flushed) {
        let Round {
            names,
            data,
            covered,
        } = self;
        let (named, whole_fs_synced) = names.run_whole();
        (named, Flushed::of(data, covered && whole_fs_synced))
    }
}

/// `syncfs` of the filesystem `dir` is on.
fn syncfs(dir: &fs::File) -> io::Result<()> {
    // SAFETY: a valid descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Apply {
    /// Holds `file` for the next [`Apply::flush`].
    pub fn seal(&mut self, file: Sealed) {
        self.sealed.push(file);
    }

    /// Drops the sealed files unnamed (the module may not be written any more).
    pub fn discard_sealed(&mut self) {
        for s in std::mem::take(&mut self.sealed) {
            s.staged.discard();
        }
    }

    /// States kept in the history since the last commit, not yet journaled.
    pub fn keeps_unjournaled(&self) -> bool {
        !self.kept.is_empty()
    }

    /// Sealed files waiting.
    pub fn sealed(&self) -> usize {
        self.sealed.len()
    }

    /// True if a request on `path` must wait for the sealed files to be named: it is one of
    /// them, or above or below one.
    pub fn touches_sealed(&self, path: &RelPath) -> bool {
        self.sealed
            .iter()
            .any(|s| s.path.starts_with(path) || path.starts_with(&s.path))
    }

    /// Makes the sealed files durable, then names them (see the module documentation).
    /// Returns each one's request and outcome; their directories are made durable by the
    /// [`Apply::commit_durable`] that must follow before any is acknowledged.
    pub fn flush(&mut self) -> Vec<(RequestId, Result<(), String>)> {
        let files = std::mem::take(&mut self.sealed);
        if files.is_empty() {
            return Vec::new();
        }
        let root_dev = self.root_dev();
        let on_root = |s: &Sealed| Some(s.dev) == root_dev;
        // One flush of the filesystem for a batch, else one per file.
        let synced = self.state.syncfs
            && files.len() >= SYNCFS_BATCH
            && files.iter().all(on_root)
            && self.root_dir().is_ok_and(|d| syncfs(&d).is_ok());
        let flushed = Flushed::of(files, synced);
        self.name_flushed(flushed)
    }

    /// Names the files a flush made durable, and returns each one's request and
    /// outcome. Each directory is resolved beneath the module once, now, for the files named
    /// in it one after another; a name that replaced something (a directory may have gone)
    /// makes the next file resolve its directory again.
    pub fn name_flushed(&mut self, flushed: Flushed) -> Vec<(RequestId, Result<(), String>)> {
        let mut out = Vec::with_capacity(flushed.0.len());
        let mut held: Option<(RelPath, crate::confine::Confined)> = None;
        for (s, synced) in flushed.0 {
            let r = synced.and_then(|()| {
                let parent = s.path.parent();
                let name = s.path.components().last().map(<[u8]>::to_vec);
                let at = match (&held, &parent, name) {
                    (Some((dir, at)), Some(parent), Some(name)) if dir == parent => {
                        crate::confine::not_root(&s.path).map_err(io::Error::other)?;
                        self.note_parent(&s.path);
                        at.sibling(&name)
                    }
                    _ => self.entry(&s.path)?,
                };
                let fresh = self.install_file(&s.staged, s.bytes, &at, &s.path);
                if fresh.is_ok() {
                    // Keyed by the file as it is now, under its name.
                    let windows = &self.state.windows;
                    match s.sign_later {
                        Some(digests) => {
                            windows.sign_later(&s.path, &s.staged.file, digests, &self.stats)
                        }
                        None => windows.put(&s.path, &s.staged.file, s.known),
                    }
                }
                held = match (&fresh, parent) {
                    (Ok(true), Some(parent)) => Some((parent, at)),
                    _ => None,
                };
                fresh.map(|_| ())
            });
            match r {
                Ok(()) => {
                    self.stats.files.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_written
                        .fetch_add(s.bytes, Ordering::Relaxed);
                    if s.delta {
                        self.stats.delta_files.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(module = self.module(), path = %s.path, bytes = s.bytes, delta = s.delta, "committed");
                    out.push((s.id, Ok(())));
                }
                Err(e) => {
                    s.staged.discard();
                    out.push((s.id, Err(format!("{}: {e}", s.path))));
                }
            }
        }
        out
    }

    pub(crate) fn root_dev(&self) -> Option<u64> {
        let fd = self.root_fd.as_ref()?;
        fs::metadata(local::fd_path(fd)).ok().map(|m| m.dev())
    }

    /// The module root opened for reading: the held root is an `O_PATH` descriptor, which
    /// `syncfs` refuses.
    fn root_dir(&self) -> io::Result<fs::File> {
        let root = self
            .root_fd
            .as_ref()
            .ok_or_else(|| io::Error::other("no root"))?;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(local::fd_path(root))
    }

    /// True if the next [`Apply::take_durable`] flushes the module's whole filesystem (many
    /// directories changed) rather than each directory.
    fn flushes_whole_fs(&self) -> bool {
        self.state.syncfs && self.dirty.len() >= SYNCFS_BATCH && self.root_fd.is_some()
    }

    /// Makes the states kept in the history since the last commit durable with their journal
    /// rows, and every dirty directory durable: [`Apply::take_durable`], then
    /// [`Durable::run`] on this thread.
    pub fn commit_durable(&mut self) -> io::Result<()> {
        self.take_durable()?.run()
    }

    /// The second half of a group commit, taken from the session: what makes every change
    /// since the last one durable, to be run by [`Durable::run`] on any thread before any of
    /// them is acknowledged.
    ///
    /// Every directory whose entries changed is resolved beneath the module now, never
    /// through a symlink, to be flushed: one `syncfs` of the module's filesystem for many
    /// (`Apply::flushes_whole_fs`), else an `fsync` each. The kept objects' names are made
    /// durable here, first ([`History::sync_objects`](crate::history::History::sync_objects)),
    /// so nothing a change superseded can be lost. The journal's transaction is left to the
    /// run, off the request loop: written and its log flushed beside the directories'
    /// flushes (two flushes' wait instead of their sum; a shared journal's transaction
    /// flushes itself), or written first when the directories' flush is one of the whole
    /// filesystem, which then makes it durable (the history is on the module's). A crash before the end can leave an object
    /// without its row, which the start-up check adopts, or a name made in this commit
    /// without its `created` row — as a flush of the filesystem by anyone else between the
    /// change and the journal always could.
    pub fn take_durable(&mut self) -> io::Result<Durable> {
        let whole_fs = self.flushes_whole_fs();
        self.take_durable_as(whole_fs)
    }

    /// A round of the group commit behind the request loop ([`Round`]): what
    /// [`Apply::take_durable`] takes, and the files sealed since the last round. One flush of
    /// the whole filesystem serves both when there are enough dirty directories or sealed
    /// files for one. On an error (a kept object's name could not be made durable) nothing
    /// is taken: the sealed files, the kept states and the dirty directories stay for the
    /// next round.
    pub fn take_round(&mut self) -> io::Result<Round> {
        let root_dev = self.root_dev();
        let covered = self.sealed.iter().all(|s| Some(s.dev) == root_dev);
        let whole_fs = self.flushes_whole_fs()
            || (self.state.syncfs
                && self.root_fd.is_some()
                && covered
                && self.sealed.len() >= SYNCFS_BATCH);
        let names = self.take_durable_as(whole_fs)?;
        Ok(Round {
            names,
            data: std::mem::take(&mut self.sealed),
            covered: whole_fs && covered,
        })
    }

    fn take_durable_as(&mut self, whole_fs: bool) -> io::Result<Durable> {
        self.keep_dir_times();
        // First, before anything is taken: on an error, the kept states and the dirty
        // directories stay for the next commit, which journals and flushes them.
        if let Some(history) = self.state.history.as_ref() {
            if !self.kept.is_empty() {
                history.sync_objects(&self.kept)?;
            }
        }
        let dirs = std::mem::take(&mut self.dirty);
        self.state.summaries.mark(&dirs);
        let root_dev = self.root_dev();
        let mut fsync = Vec::new();
        for dir in dirs {
            // A directory that is no longer there as one (deleted, replaced, moved under a
            // symlink) holds nothing of this commit; its parent, also dirty, holds the change.
            let Ok(f) = self.local(&dir).and_then(|c| {
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(c.path())
            }) else {
                continue;
            };
            let same_fs = f.metadata().is_ok_and(|m| Some(m.dev()) == root_dev);
            if !(whole_fs && same_fs) {
                fsync.push((dir, f));
            }
        }
        let syncfs = if whole_fs {
            Some(self.root_dir())
        } else {
            None
        };
        let kept = std::mem::take(&mut self.kept);
        let mut journal: Option<Beside> = None;
        let mut beside: Option<Beside> = None;
        if let Some(history) = self.state.history.as_ref().filter(|_| !kept.is_empty()) {
            let state = self.state.clone();
            let write = move || match &state.history {
                Some(h) => h.journal(kept),
                None => Ok(()),
            };
            if history.shared() || !whole_fs {
                // A shared journal's commit flushes itself; a local one's log is flushed
                // after it, beside the directories.
                let state = self.state.clone();
                beside = Some(Box::new(move || {
                    write()?;
                    match &state.history {
                        Some(h) => h.flush_log(),
                        None => Ok(()),
                    }
                }));
            } else {
                // A local journal's commit writes its log without flushing it: the flush of
                // the whole filesystem that follows does.
                journal = Some(Box::new(write));
            }
        }
        Ok(Durable {
            module: self.module().to_string(),
            journal,
            fsync,
            syncfs,
            beside,
        })
    }

    pub(crate) fn mark_parent_dirty(&mut self, rel: &RelPath) {
        if let Some(parent) = rel.parent() {
            self.dirty.insert(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{may_seal_within, sealed_budget, Held, MAX_SEALED};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// All sessions' sealed files are bounded by a quarter of the descriptor limit.
    #[test]
    fn sealed_files_are_bounded_by_the_descriptor_limit() {
        assert_eq!(sealed_budget(Some(204_800)), 51_200, "the units' limit");
        assert_eq!(sealed_budget(Some(20_000)), 5_000);
        assert_eq!(sealed_budget(Some(64)), 32, "never fewer than 32");
        assert_eq!(sealed_budget(None), 1024);
    }

    /// One session seals up to 1,024 files while the process is within its budget, and 32
    /// whatever the others hold.
    #[test]
    fn a_session_seals_up_to_its_share_of_what_the_process_may_hold() {
        assert!(may_seal_within(0, 0, 5_000));
        assert!(may_seal_within(MAX_SEALED - 1, 4_999, 5_000));
        assert!(
            !may_seal_within(MAX_SEALED, 0, 5_000),
            "one session's bound"
        );
        assert!(
            !may_seal_within(100, 5_000, 5_000),
            "the process's budget spent"
        );
        assert!(may_seal_within(31, 1 << 20, 5_000), "the floor");
        assert!(!may_seal_within(32, 1 << 20, 5_000));
    }

    /// The count of held files follows each share from its making to its drop.
    #[test]
    fn a_held_share_is_counted_until_dropped() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let shares: Vec<Held> = (0..3).map(|_| Held::on(&COUNT)).collect();
        assert_eq!(COUNT.load(Ordering::Relaxed), 3);
        let mut shares = shares.into_iter();
        drop(shares.next());
        assert_eq!(COUNT.load(Ordering::Relaxed), 2);
        drop(shares);
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
    }
}
