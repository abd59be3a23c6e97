//! The group commit: received files wait [`Sealed`] (checked, metadata applied, unnamed)
//! until [`Apply::flush`] makes them durable together — their data first (one `syncfs` of the
//! module's filesystem for a batch, an `fsync` each for a few), then their names, then the
//! directories whose entries changed ([`Apply::sync_dirty`]). A name never appears before its
//! data is on disk, and an `Ack` means durable under the final name.

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
}

/// From this many sealed files (or dirty directories) on, a group commit flushes the module's
/// filesystem once (`syncfs`) instead of each file (`fsync`).
pub const SYNCFS_BATCH: usize = 8;

/// Sealed files one session may hold (each an open descriptor) before a group commit is
/// forced.
pub const MAX_SEALED: usize = 256;

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
    /// [`Apply::sync_dirty`] that must follow before any is acknowledged.
    pub fn flush(&mut self) -> Vec<(RequestId, Result<(), String>)> {
        let batch = std::mem::take(&mut self.sealed);
        if batch.is_empty() {
            return Vec::new();
        }
        let root_dev = self.root_dev();
        let on_root = |s: &Sealed| {
            let dev = s.staged.file.metadata().map(|m| m.dev()).ok();
            dev.is_some() && dev == root_dev
        };
        // Data first: one flush of the filesystem for a batch, else one per file.
        let whole_fs = self.state.syncfs
            && batch.len() >= SYNCFS_BATCH
            && batch.iter().all(on_root)
            && self.syncfs().is_ok();
        let mut out = Vec::with_capacity(batch.len());
        for s in batch {
            let r = (|| {
                if !whole_fs {
                    s.staged.file.sync_all()?;
                }
                let at = self.entry(&s.path)?;
                self.install_file(&s.staged, s.bytes, &at.path(), &s.path)
            })();
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

    /// `syncfs` of the module's filesystem.
    pub(crate) fn syncfs(&self) -> io::Result<()> {
        let root = self
            .root_fd
            .as_ref()
            .ok_or_else(|| io::Error::other("no root"))?;
        // The held root is an `O_PATH` descriptor, which syncfs refuses: open it for reading.
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(local::fd_path(root))?;
        // SAFETY: a valid descriptor.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes every directory whose entries changed since the last call durable (each resolved
    /// beneath the module again, never through a symlink): one `syncfs` for many on the
    /// module's filesystem ([`Apply::flushes_whole_fs`]), else an `fsync` each. An error means
    /// the changes in them may not be durable: nothing of this commit may be acknowledged.
    pub fn sync_dirty(&mut self) -> io::Result<()> {
        let whole_fs = self.flushes_whole_fs();
        let dirs = std::mem::take(&mut self.dirty);
        let root_dev = self.root_dev();
        let mut first_error = None;
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
            if whole_fs && same_fs {
                continue;
            }
            if let Err(e) = f.sync_all() {
                tracing::warn!(module = self.module(), path = %dir, "fsync failed: {e}");
                first_error.get_or_insert(io::Error::new(e.kind(), format!("{dir}: {e}")));
            }
        }
        if whole_fs {
            if let Err(e) = self.syncfs() {
                tracing::warn!(module = self.module(), "syncfs failed: {e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// True if the next [`Apply::sync_dirty`] flushes the module's whole filesystem (many
    /// directories changed) rather than each directory.
    fn flushes_whole_fs(&self) -> bool {
        self.state.syncfs && self.dirty.len() >= SYNCFS_BATCH && self.root_fd.is_some()
    }

    /// Makes the states kept in the history since the last commit durable with their journal
    /// rows, and every dirty directory durable ([`Apply::sync_dirty`]). The kept objects'
    /// names go first ([`History::sync_objects`](crate::history::History::sync_objects)), so
    /// nothing a change superseded can be lost. Then the journal's one transaction is written
    /// and flushed beside the directories' flushes (two flushes' wait instead of their sum),
    /// or by the directories' flush itself when that flushes the whole filesystem (the
    /// history is on the module's). The answers wait for all of it. A crash before the end
    /// can leave an object without its row, which the start-up check adopts, or a name made
    /// in this commit without its `created` row — as a flush of the filesystem by anyone else
    /// between the change and the journal always could.
    pub fn commit_durable(&mut self) -> io::Result<()> {
        self.keep_dir_times();
        let kept = std::mem::take(&mut self.kept);
        let state = self.state.clone();
        let history = match &state.history {
            Some(history) if !kept.is_empty() => history,
            _ => return self.sync_dirty(),
        };
        history.sync_objects(&kept)?;
        if history.shared() {
            // A shared journal's commit flushes itself.
            return self.sync_dirty_beside(|| history.journal(kept));
        }
        // A local journal's commit writes its log without flushing it.
        history.journal(kept)?;
        if self.flushes_whole_fs() {
            return self.sync_dirty();
        }
        self.sync_dirty_beside(|| history.flush_log())
    }

    /// [`Apply::sync_dirty`] with `flush` run beside it on a thread of its own; the first
    /// error of either.
    fn sync_dirty_beside(
        &mut self,
        flush: impl FnOnce() -> io::Result<()> + Send,
    ) -> io::Result<()> {
        std::thread::scope(|s| {
            let other = s.spawn(flush);
            let dirs = self.sync_dirty();
            let flushed = other
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("history journal: its thread panicked")));
            flushed.and(dirs)
        })
    }

    pub(crate) fn mark_parent_dirty(&mut self, rel: &RelPath) {
        if let Some(parent) = rel.parent() {
            self.dirty.insert(parent);
        }
    }
}
