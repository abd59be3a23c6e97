//! A module's history: every state the receiver replaces, deletes, renames away or changes the
//! metadata of is kept, on the backup host, where no sender can reach it.
//!
//! The receiver never changes a file's content in place (a new file is linked over the old
//! name), so the superseded inode *is* the old version: it is linked (a replaced entry) or
//! moved (a deleted one, a directory with everything under it in one `rename`) into
//! `HISTORY/objects/ID`, costing no copy. A journal, `HISTORY/journal.sqlite3` (SQLite, WAL),
//! says what each object was: the path, when it stopped being current, the action, its kind,
//! size and metadata. A metadata change keeps no object, only the old metadata in its row; a
//! rename keeps no object, only where the entry went; a name that comes into being gets a
//! `created` row (no object), so a view of the module at an earlier time leaves it out.
//!
//! Order, so that every row points at an object that exists: the object is made at the
//! moment of the change; at the group commit the objects directory is made durable, then the
//! rows are written in one transaction, then the module's directories are made durable, and
//! only then is anything acknowledged. A crash before the transaction leaves objects without
//! rows; [`History::open`] adopts them (action `unjournaled`, path `.unjournaled/ID`) so
//! nothing kept is lost, and drops rows whose object is gone, saying how many of each.
//!
//! Retention ([`Keep`]) is the receiver's alone: no protocol message, sender option or
//! `--confirm-deletes` prunes or rewrites it. [`History::prune`] runs at start and every
//! minute, in bounded steps.

use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::xattr::{At, Namespaces};
use ferry_protocol::RelPath;
use rusqlite::{params, Connection};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

mod journal;
mod retention;
mod startup;
pub mod view;

pub use journal::{check_place, read_versions, read_versions_after, Version};
use journal::{forget_cached, open_read_only, versions_in};
#[cfg(test)]
use retention::PRUNE_PAGE;
pub use retention::{Keep, Rule, PRUNE_EVERY};

/// The journal's file name in the history directory.
pub const JOURNAL: &str = "journal.sqlite3";
/// The objects' directory in the history directory.
pub const OBJECTS: &str = "objects";

/// What happened to the state a version holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Another entry took its name.
    Replaced,
    /// Deleted (a directory with everything under it).
    Deleted,
    /// Renamed away (the row says where to; no object).
    Renamed,
    /// Its metadata changed (the row holds the old metadata; no object).
    Metadata,
    /// Found in the objects directory without a row after a crash.
    Unjournaled,
    /// The name came into being (nothing was there): no object, the new entry's metadata.
    /// What a point-in-time view needs to leave out what did not exist yet.
    Created,
}

impl Action {
    /// The journal's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replaced => "replaced",
            Action::Deleted => "deleted",
            Action::Renamed => "renamed",
            Action::Metadata => "metadata",
            Action::Unjournaled => "unjournaled",
            Action::Created => "created",
        }
    }
}

/// What a module's history holds, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// Versions kept.
    pub versions: u64,
    /// Bytes they held when kept (a deleted directory's tree counted as its own entry only).
    pub bytes: u64,
    /// Age of the oldest version.
    pub oldest_age: Option<Duration>,
    /// Versions pruned since start.
    pub pruned: u64,
    /// Writes are refused (the floor does not fit).
    pub refusing: bool,
}

/// A row waiting for the group commit.
#[derive(Debug)]
pub struct Pending {
    id: i64,
    path: RelPath,
    time_ns: i64,
    action: Action,
    meta: Meta,
    object: bool,
    renamed_to: Option<RelPath>,
}

impl Pending {
    /// The state it keeps.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// True for the note that `path` came into being.
    pub fn creates(&self, path: &RelPath) -> bool {
        self.action == Action::Created && self.path == *path
    }
}

/// How a changed entry's old state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A hard link to it (it is about to be replaced by a rename over its name).
    Link,
    /// It is moved into the history (it is being deleted, or is a directory being replaced).
    Move,
}

/// An open history: the journal, the objects directory held open, the next id.
pub struct History {
    /// The history directory.
    pub dir: PathBuf,
    /// Retention.
    pub keep: Keep,
    objects: OwnedFd,
    db: Mutex<Connection>,
    /// Several gateways write it in turn (`History::open_shared`).
    shared: bool,
    next_id: AtomicU64,
    /// Why writes are refused (the floor cannot be kept and space is short), if they are.
    refusing: Mutex<Option<String>>,
    /// Versions pruned since start.
    pub pruned: AtomicU64,
    /// Set (and the pruner woken) when a commit finds the filesystem short of space.
    wake: (Mutex<bool>, std::sync::Condvar),
}

/// What a `created` row keeps of a new name: its kind and size (see [`History::created`]).
pub fn created_meta(kind: Kind, size: u64) -> Meta {
    Meta {
        kind,
        mode: 0,
        uid: 0,
        gid: 0,
        size,
        mtime: 0,
        mtime_nsec: 0,
        rdev: 0,
        xattrs: Default::default(),
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn db_err(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("history journal: {e}"))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS versions (
    id         INTEGER PRIMARY KEY,  -- objects/ID holds the entry when `object` is 1
    path       BLOB NOT NULL,        -- the module path it was at
    time_ns    INTEGER NOT NULL,     -- when it stopped being current (ns since 1970, UTC)
    action     TEXT NOT NULL,        -- created, replaced, deleted, renamed, metadata, unjournaled
    kind       TEXT NOT NULL,        -- file, dir, symlink, fifo, char, block
    size       INTEGER NOT NULL,     -- bytes (files)
    blocks     INTEGER NOT NULL,     -- bytes allocated (st_blocks * 512) when kept
    object     INTEGER NOT NULL,
    renamed_to BLOB,                 -- for a rename, where it went
    meta       TEXT NOT NULL         -- mode, owner, times, attributes then (JSON)
);
CREATE INDEX IF NOT EXISTS versions_by_path ON versions (path, time_ns);
CREATE INDEX IF NOT EXISTS versions_by_time ON versions (time_ns);
CREATE TABLE IF NOT EXISTS reach (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    since_ns INTEGER NOT NULL,       -- when the history began
    pruned   INTEGER NOT NULL        -- 1 once retention let a version go
);
";

/// The journal's connection: a write-ahead log on a filesystem of one host; on a shared one a
/// rollback journal (the log's index is memory that only the processes of one host share).
/// The log is not flushed at each commit (`synchronous = NORMAL`, which in WAL mode keeps the
/// database consistent whatever is lost): its writer flushes it ([`History::flush_log`]), a
/// group commit with the module's own flush. A rollback journal flushes at each commit.
fn connect(dir: &Path, shared: bool) -> rusqlite::Result<Connection> {
    let db = Connection::open(dir.join(JOURNAL))?;
    let (mode, sync) = if shared {
        ("DELETE", "FULL")
    } else {
        ("WAL", "NORMAL")
    };
    db.execute_batch(&format!(
        "PRAGMA journal_mode = {mode}; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 10000;"
    ))?;
    Ok(db)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::CharDevice => "char",
        Kind::BlockDevice => "block",
    }
}

impl History {
    /// Opens (creating if need be, mode 0700) the history of `module` (named in errors) at
    /// `dir`, after [`check_place`]; runs the start-up check ([`History::recover`]).
    pub fn open(
        module: &str,
        module_path: &Path,
        dir: &Path,
        keep: Keep,
    ) -> Result<History, String> {
        let history = History::open_with(module, module_path, dir, keep, false)?;
        history.recover(module)?;
        Ok(history)
    }

    /// Opens the history of a module that several gateways serve on a shared filesystem
    /// (`lease`): its journal keeps a rollback journal beside it instead of a write-ahead log,
    /// whose index lives in memory shared by the processes of one host only, and it is locked
    /// with the filesystem's POSIX locks, which reach every host. The start-up check is left
    /// to whichever gateway takes the write lease ([`History::recover`]): until then another
    /// one may be writing.
    pub fn open_shared(
        module: &str,
        module_path: &Path,
        dir: &Path,
        keep: Keep,
    ) -> Result<History, String> {
        History::open_with(module, module_path, dir, keep, true)
    }

    fn open_with(
        module: &str,
        module_path: &Path,
        dir: &Path,
        keep: Keep,
        shared: bool,
    ) -> Result<History, String> {
        let why = |what: String| format!("module {module:?}: history {}: {what}", dir.display());
        let io_why = |e: io::Error| why(ferry_protocol::io_reason(&e));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(OBJECTS))
            .map_err(io_why)?;
        check_place(module_path, dir).map_err(|e| format!("module {module:?}: {e}"))?;
        let objects = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir.join(OBJECTS))
            .map_err(io_why)?;
        let db = connect(dir, shared).map_err(|e| why(e.to_string()))?;
        db.execute_batch(SCHEMA)
            .and_then(|_| {
                // A journal from before this table: its history began with its oldest row.
                db.execute(
                    "INSERT OR IGNORE INTO reach (id, since_ns, pruned) \
                 VALUES (1, coalesce((SELECT min(time_ns) FROM versions), ?1), 0)",
                    [now_ns()],
                )
            })
            .map_err(|e| why(format!("journal: {e}")))?;
        let _ = fs::set_permissions(
            dir.join(JOURNAL),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        );
        Ok(History {
            dir: dir.to_path_buf(),
            keep,
            objects: OwnedFd::from(objects),
            db: Mutex::new(db),
            shared,
            next_id: AtomicU64::new(1),
            refusing: Mutex::new(None),
            pruned: AtomicU64::new(0),
            wake: Default::default(),
        })
    }

    /// `/proc/self/fd/N/name` of an object.
    fn object_path(&self, id: i64) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{id}", self.objects.as_raw_fd()))
    }

    /// Keeps the state of the entry at `path` (a `/proc/self/fd/N/name` path beneath the
    /// module, for module path `rel`) before `action` changes it: linked or moved (`how`) into
    /// the objects, and its row returned for the group commit. `None` if there is nothing
    /// there.
    pub fn keep_entry(
        &self,
        path: &Path,
        rel: &RelPath,
        action: Action,
        how: How,
    ) -> io::Result<Option<Pending>> {
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(meta) = ferry_protocol::local::meta_of(&md) else {
            return Ok(None);
        };
        // A directory cannot be linked: it is moved even when it is replaced.
        let how = if meta.kind == Kind::Dir {
            How::Move
        } else {
            how
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as i64;
        let object = self.object_path(id);
        match how {
            How::Link => crate::apply::hard_link(path, &object)?,
            How::Move => fs::rename(path, &object)?,
        }
        Ok(Some(Pending {
            id,
            path: rel.clone(),
            time_ns: now_ns(),
            action,
            meta,
            object: true,
            renamed_to: None,
        }))
    }

    /// A row for a change that keeps no object: the metadata of the entry at `path` before it
    /// changes (with its attributes in `ns`), or a rename of `rel` to `renamed_to`.
    pub fn note(
        &self,
        path: &Path,
        rel: &RelPath,
        action: Action,
        ns: Namespaces,
        renamed_to: Option<&RelPath>,
    ) -> io::Result<Option<Pending>> {
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(mut meta) = ferry_protocol::local::meta_of(&md) else {
            return Ok(None);
        };
        if action == Action::Metadata {
            meta.xattrs = At::Entry(path).read(ns).unwrap_or_default();
        }
        Ok(Some(Pending {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) as i64,
            path: rel.clone(),
            time_ns: now_ns(),
            action,
            meta,
            object: false,
            renamed_to: renamed_to.cloned(),
        }))
    }

    /// The row saying `rel` came into being as `meta` (no object: an earlier view leaves it
    /// out). Only its kind and size are journaled: nothing reads the rest of a name's state
    /// from the moment it was made.
    pub fn created(&self, rel: &RelPath, meta: Meta) -> Pending {
        Pending {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) as i64,
            path: rel.clone(),
            time_ns: now_ns(),
            action: Action::Created,
            meta,
            object: false,
            renamed_to: None,
        }
    }

    /// Puts an object back where it came from (the change it was kept for failed).
    pub fn undo(&self, pending: Pending, path: &Path) {
        if pending.object {
            let object = self.object_path(pending.id);
            let back = if pending.meta.kind == Kind::Dir {
                fs::rename(&object, path)
            } else {
                fs::remove_file(&object)
            };
            if let Err(e) = back {
                tracing::warn!(path = %pending.path, "history: cannot undo keeping: {e}");
            }
        }
    }

    /// Makes the names of the objects `rows` keep durable (the objects directory), if any:
    /// before their rows ([`History::journal`]) and before the module's changes that replaced
    /// or removed what they keep, so a row never names a missing object and nothing
    /// superseded is lost.
    pub fn sync_objects(&self, rows: &[Pending]) -> io::Result<()> {
        if rows.iter().any(|r| r.object) {
            let dir = fs::File::open(format!("/proc/self/fd/{}", self.objects.as_raw_fd()))?;
            dir.sync_all()?;
        }
        Ok(())
    }

    /// True if several gateways write this history in turn ([`History::open_shared`]).
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Makes what the journal's committed transactions wrote durable: the write-ahead log's
    /// data (a flush of the filesystem does it too: the history is on the module's one). A
    /// shared journal's commits are durable already.
    pub fn flush_log(&self) -> io::Result<()> {
        if self.shared {
            return Ok(());
        }
        match fs::File::open(self.dir.join(format!("{JOURNAL}-wal"))) {
            Ok(log) => log.sync_data(),
            // No log: nothing was written since the last connection closed and checkpointed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes `rows` in one transaction, after [`History::sync_objects`]. A shared journal's
    /// rows are durable when this returns; otherwise once the log is flushed
    /// ([`History::flush_log`], or a flush of the filesystem).
    pub fn journal(&self, rows: Vec<Pending>) -> io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut db = self.db.lock().expect("journal lock");
        let tx = db.transaction().map_err(db_err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO versions (id, path, time_ns, action, kind, size, blocks, object, \
                     renamed_to, meta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(db_err)?;
            for r in &rows {
                let blocks = if r.object {
                    fs::symlink_metadata(self.object_path(r.id))
                        .map(|m| m.blocks() * 512)
                        .unwrap_or(0)
                } else {
                    0
                };
                insert
                    .execute(params![
                        r.id,
                        r.path.as_bytes(),
                        r.time_ns,
                        r.action.as_str(),
                        kind_name(r.meta.kind),
                        if r.meta.kind == Kind::File {
                            r.meta.size as i64
                        } else {
                            0
                        },
                        blocks as i64,
                        r.object as i64,
                        r.renamed_to.as_ref().map(|p| p.as_bytes().to_vec()),
                        match r.action {
                            Action::Created => String::new(),
                            _ => serde_json::to_string(&r.meta).unwrap_or_default(),
                        },
                    ])
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        drop(db);
        if self.short_of_space().unwrap_or(false) {
            *self.wake.0.lock().expect("wake lock") = true;
            self.wake.1.notify_all();
        }
        Ok(())
    }

    /// Waits up to `timeout` for a commit to find the filesystem short of space.
    pub fn wait_for_pressure(&self, timeout: Duration) {
        let woken = self.wake.0.lock().expect("wake lock");
        let (mut woken, _) = self
            .wake
            .1
            .wait_timeout_while(woken, timeout, |w| !*w)
            .expect("wake lock");
        *woken = false;
    }

    /// Why writes to the module are refused, if they are.
    pub fn refusal(&self) -> Option<String> {
        self.refusing.lock().expect("refusing lock").clone()
    }

    /// The versions at or below `under` (all of them for the root), oldest first.
    pub fn versions(&self, under: &RelPath) -> io::Result<Vec<Version>> {
        if self.shared {
            return versions_in(&self.reader()?, under);
        }
        let db = self.db.lock().expect("journal lock");
        versions_in(&db, under)
    }

    /// A connection for one reading of a shared journal, which another gateway may have
    /// written since this one last looked.
    fn reader(&self) -> io::Result<Connection> {
        forget_cached(&self.dir);
        open_read_only(&self.dir)
    }

    /// What the history holds now, for metrics.
    pub fn figures(&self) -> io::Result<Figures> {
        let count = |db: &Connection| {
            db.query_row(
                "SELECT count(*), coalesce(sum(blocks), 0), min(time_ns) FROM versions",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
        };
        let (versions, bytes, oldest) = if self.shared {
            count(&self.reader()?)
        } else {
            count(&self.db.lock().expect("journal lock"))
        }
        .map_err(db_err)?;
        Ok(Figures {
            versions: versions as u64,
            bytes: bytes as u64,
            oldest_age: oldest
                .map(|t| Duration::from_nanos(now_ns().saturating_sub(t).max(0) as u64)),
            pruned: self.pruned.load(Ordering::Relaxed),
            refusing: self.refusal().is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const H: i64 = 3_600_000_000_000;

    #[test]
    fn keep_rules_read_like_their_words() {
        let r: Rule = "hourly for 7d".parse().unwrap();
        assert_eq!(r.every, Some(Duration::from_secs(3600)));
        assert_eq!(r.span, Duration::from_secs(7 * 86_400));
        let r: Rule = "all for 90s".parse().unwrap();
        assert_eq!((r.every, r.span), (None, Duration::from_secs(90)));
        let r: Rule = "every 10m for 2 days".parse().unwrap();
        assert_eq!(r.every, Some(Duration::from_secs(600)));
        for bad in [
            "hourly",
            "sometimes for 1d",
            "daily for ever",
            "every 0s for 1d",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.contains(bad), "{e} names {bad}");
        }
    }

    #[test]
    fn pruning_keeps_all_then_one_per_period_then_nothing() {
        let keep = Keep {
            rules: vec![
                "all for 2h".parse().unwrap(),
                "hourly for 10h".parse().unwrap(),
            ],
            ..Keep::default()
        };
        let now = 100 * H;
        // Every 20 minutes for 12 hours back.
        let times: Vec<(i64, i64)> = (0..36).map(|i| (i, now - i * H / 3)).collect();
        let pruned: BTreeSet<i64> = keep.prune_of(&times, now).into_iter().collect();
        for (id, t) in &times {
            let age = now - t;
            let kept = !pruned.contains(id);
            if age <= 2 * H {
                assert!(kept, "{id}: younger than 2h, all kept");
            } else if age > 10 * H {
                assert!(!kept, "{id}: older than every rule");
            }
        }
        // Between 2h and 10h: one per clock hour, the newest of it.
        let middle: Vec<i64> = times
            .iter()
            .filter(|(id, t)| now - t > 2 * H && now - t <= 10 * H && !pruned.contains(id))
            .map(|(_, t)| t.div_euclid(H))
            .collect();
        let hours: BTreeSet<i64> = middle.iter().copied().collect();
        assert_eq!(middle.len(), hours.len(), "one per hour: {middle:?}");
        assert!(hours.len() >= 7, "{hours:?}");
    }

    #[test]
    fn start_up_adopts_unjournaled_objects_and_drops_rows_without_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (module, dir) = (tmp.path().join("module"), tmp.path().join("history"));
        fs::create_dir(&module).unwrap();
        fs::write(module.join("a"), b"old a").unwrap();
        fs::write(module.join("b"), b"old b").unwrap();
        {
            let h = History::open("m", &module, &dir, Keep::default()).unwrap();
            let keep = |name: &str| {
                let rel = RelPath::from(name);
                h.keep_entry(&module.join(name), &rel, Action::Deleted, How::Move)
                    .unwrap()
                    .unwrap()
            };
            let (a, b) = (keep("a"), keep("b"));
            // `a` is journaled; `b` is not (a crash before its group commit).
            h.sync_objects(std::slice::from_ref(&a)).unwrap();
            h.journal(vec![a]).unwrap();
            drop(b);
        }
        // Someone removed `a`'s object by hand.
        let journaled = read_versions(&dir, &RelPath::root()).unwrap();
        assert_eq!(journaled.len(), 1);
        fs::remove_file(dir.join(OBJECTS).join(journaled[0].id.to_string())).unwrap();

        let h = History::open("m", &module, &dir, Keep::default()).unwrap();
        let after = h.versions(&RelPath::root()).unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        let adopted = &after[0];
        assert_eq!(adopted.action, "unjournaled");
        assert_eq!(adopted.path, format!(".unjournaled/{}", adopted.id));
        // A dropped row is a version gone: the history answers from its oldest kept one on,
        // not from its start any more.
        let pruned: i64 = Connection::open(dir.join(JOURNAL))
            .unwrap()
            .query_row("SELECT pruned FROM reach", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pruned, 1);
        let (_, oldest) = read_versions_after(&dir, 0).unwrap();
        assert_eq!(oldest, Some(adopted.time_ns));
        let object = dir.join(OBJECTS).join(adopted.id.to_string());
        assert_eq!(fs::read(object).unwrap(), b"old b");
        // New ids never reuse an adopted one.
        fs::write(module.join("c"), b"c").unwrap();
        let c = h
            .keep_entry(&module.join("c"), &"c".into(), Action::Deleted, How::Move)
            .unwrap()
            .unwrap();
        assert!(c.id > adopted.id);
    }

    /// A history several gateways share keeps a rollback journal, not a write-ahead log, and
    /// leaves the start-up check to the one that takes the write lease: before that, another
    /// gateway's commit may be half done.
    #[test]
    fn a_shared_history_logs_no_wal_and_checks_only_when_recovered() {
        let tmp = tempfile::tempdir().unwrap();
        let (module, dir) = (tmp.path().join("module"), tmp.path().join("history"));
        fs::create_dir(&module).unwrap();
        fs::write(module.join("a"), b"old a").unwrap();
        let first = History::open_shared("m", &module, &dir, Keep::default()).unwrap();
        first.recover("m").unwrap();
        let a = first
            .keep_entry(&module.join("a"), &"a".into(), Action::Deleted, How::Move)
            .unwrap()
            .unwrap();
        // The writer dies between keeping `a` and journaling it.
        drop(first);
        let wal = dir.join(format!("{JOURNAL}-wal"));
        assert!(!wal.exists(), "a write-ahead log on a shared history");
        let second = History::open_shared("m", &module, &dir, Keep::default()).unwrap();
        assert!(
            second.versions(&RelPath::root()).unwrap().is_empty(),
            "checked before taking the lease"
        );
        second.recover("m").unwrap();
        let after = second.versions(&RelPath::root()).unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(
            (after[0].id, after[0].action.as_str()),
            (a.id, "unjournaled")
        );
        fs::write(module.join("b"), b"b").unwrap();
        let b = second
            .keep_entry(&module.join("b"), &"b".into(), Action::Deleted, How::Move)
            .unwrap()
            .unwrap();
        assert!(b.id > a.id, "an id reused after the takeover");
        second.sync_objects(std::slice::from_ref(&b)).unwrap();
        second.journal(vec![b]).unwrap();
        assert_eq!(second.versions(&RelPath::root()).unwrap().len(), 2);
        assert!(!wal.exists(), "a write-ahead log on a shared history");
        let mode: String = Connection::open(dir.join(JOURNAL))
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }

    #[test]
    fn history_must_be_outside_the_module_and_on_its_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let module = tmp.path().join("module");
        fs::create_dir_all(module.join("inner")).unwrap();
        let e = check_place(&module, &module.join("inner")).unwrap_err();
        assert!(
            e.contains("inside the module path") && e.contains("inner"),
            "{e}"
        );
        let e = check_place(&module.join("inner"), &module).unwrap_err();
        assert!(e.contains("is inside history"), "{e}");
        fs::create_dir(tmp.path().join("beside")).unwrap();
        check_place(&module, &tmp.path().join("beside")).unwrap();
        // /proc is another filesystem than any module.
        let e = check_place(&module, Path::new("/proc")).unwrap_err();
        assert!(
            e.contains("another filesystem") && e.contains("/proc"),
            "{e}"
        );
    }

    #[test]
    fn pruning_reads_the_journal_in_pages_and_keeps_one_per_period_per_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (module, dir) = (tmp.path().join("module"), tmp.path().join("history"));
        fs::create_dir(&module).unwrap();
        fs::write(module.join("f"), b"f").unwrap();
        let keep = Keep {
            rules: vec![
                "all for 1h".parse().unwrap(),
                "hourly for 1d".parse().unwrap(),
            ],
            ..Keep::default()
        };
        let h = History::open("m", &module, &dir, keep).unwrap();
        // Three paths' worth of rows, more than two pages, all within one clock hour.
        let per_path = PRUNE_PAGE + 7; // so a path's versions straddle pages
        let mut rows = Vec::new();
        for name in ["a", "b", "c"] {
            for _ in 0..per_path {
                let rel = RelPath::from(name);
                let row = h.note(
                    &module.join("f"),
                    &rel,
                    Action::Metadata,
                    Namespaces::NONE,
                    None,
                );
                rows.push(row.unwrap().unwrap());
            }
        }
        let t = rows[0].time_ns;
        let hour = 3_600_000_000_000;
        let hours: BTreeSet<(String, i64)> = rows
            .iter()
            .map(|r| (r.path.to_string(), r.time_ns.div_euclid(hour)))
            .collect();
        h.journal(rows).unwrap();
        assert_eq!(
            h.prune(t).unwrap(),
            0,
            "an hour's versions kept within the day"
        );
        // Two hours on, still within a day: one per clock hour and path, the newest.
        let pruned = h.prune(t + 2 * hour).unwrap();
        assert_eq!(pruned, 3 * per_path as u64 - hours.len() as u64);
        assert_eq!(h.figures().unwrap().versions, hours.len() as u64);
        // Two days on: nothing left.
        h.prune(t + 48 * hour).unwrap();
        assert_eq!(h.figures().unwrap().versions, 0);
    }
}
