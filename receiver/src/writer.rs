//! The filesystem half of a session. It runs on a thread of its own, takes requests in arrival
//! order and answers each one exactly once.
//!
//! Durability: a file is written into the module's staging directory, checked against the
//! sender's blake3 digest, fsynced, given its metadata, and renamed over its final name. The
//! directories touched are fsynced in groups (group commit): whenever no further request is
//! already queued, or 512 acknowledgements are waiting, the writer fsyncs every dirty directory
//! and only then sends the `Ack`s. So an `Ack` always means "durable under its final name", and
//! a burst of small files costs one directory fsync per directory, not one per file.

use crate::config::Module;
use crate::confine::confine;
use crate::STAGING_DIR;
use ferry_protocol::local::{self, DigestCache, DigestTree};
use ferry_protocol::message::{Body, Digest, DigestEntry, Message, RequestId};
use ferry_protocol::meta::{Compare, Kind, Meta};
use ferry_protocol::{delta, Entry, RelPath};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Counters of one receiver process, shared by all sessions.
#[derive(Debug, Default)]
pub struct Stats {
    /// Files committed.
    pub files: AtomicU64,
    /// Of which rebuilt from a delta.
    pub delta_files: AtomicU64,
    /// Bytes written into files.
    pub bytes_written: AtomicU64,
    /// Payload bytes received for file bodies (whole data and deltas).
    pub bytes_received: AtomicU64,
    /// Directories created.
    pub mkdirs: AtomicU64,
    /// Symlinks and special files created.
    pub links: AtomicU64,
    /// Metadata-only updates.
    pub set_meta: AtomicU64,
    /// Deletions.
    pub deletes: AtomicU64,
    /// Renames.
    pub renames: AtomicU64,
    /// Failed requests.
    pub failures: AtomicU64,
}

impl Stats {
    /// `(name, value)` pairs, for `StatsReply` and logs.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let c = |name: &str, v: &AtomicU64| (name.to_string(), v.load(Ordering::Relaxed));
        vec![
            c("files", &self.files),
            c("delta_files", &self.delta_files),
            c("bytes_written", &self.bytes_written),
            c("bytes_received", &self.bytes_received),
            c("mkdirs", &self.mkdirs),
            c("links", &self.links),
            c("set_meta", &self.set_meta),
            c("deletes", &self.deletes),
            c("renames", &self.renames),
            c("failures", &self.failures),
        ]
    }
}

/// A module as the running server sees it: configuration, live session count and the digest
/// cache shared by its sessions.
pub struct ModuleState {
    /// Configuration.
    pub module: Module,
    /// Sessions currently open.
    pub active: AtomicUsize,
    /// Content digests of the module's files.
    pub cache: Mutex<DigestCache>,
}

impl ModuleState {
    /// Prepares a module: checks its root, empties its staging directory.
    pub fn open(module: Module, state_dir: Option<&Path>) -> io::Result<ModuleState> {
        let md = fs::metadata(&module.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "module {:?}: path {}: {e}",
                    module.name,
                    module.path.display()
                ),
            )
        })?;
        if !md.is_dir() {
            return Err(io::Error::other(format!(
                "module {:?}: path {} is not a directory",
                module.name,
                module.path.display()
            )));
        }
        clean_staging(&module.path)?;
        let cache = match state_dir {
            Some(dir) => DigestCache::open(dir.join(format!("{}.digests", module.name))),
            None => DigestCache::in_memory(),
        };
        Ok(ModuleState {
            module,
            active: AtomicUsize::new(0),
            cache: Mutex::new(cache),
        })
    }
}

/// Removes leftovers of interrupted transfers and makes sure the staging directory exists.
/// The directory itself is kept, so the module root's mtime does not change on every start.
pub fn clean_staging(root: &Path) -> io::Result<()> {
    let staging = root.join(STAGING_DIR);
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", staging.display()));
    match fs::symlink_metadata(&staging) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => fs::remove_file(&staging).map_err(ctx)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
    }
    match fs::create_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ctx(e)),
    }
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700)).map_err(ctx)?;
    let mut removed = 0;
    for item in fs::read_dir(&staging).map_err(ctx)? {
        let item = item.map_err(ctx)?;
        let p = item.path();
        let r = if item.file_type().map_err(ctx)?.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(ctx)?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(path = %staging.display(), removed, "removed leftover partial files");
    }
    Ok(())
}

/// Hides the staging directory from listings and verification.
pub fn module_filter(path: &RelPath, _is_dir: bool) -> bool {
    path.as_bytes() != STAGING_DIR.as_bytes()
}

struct Incoming {
    path: RelPath,
    meta: Meta,
    tmp: File,
    tmp_path: PathBuf,
    hasher: blake3::Hasher,
    base: Option<memmap2::Mmap>,
    written: u64,
}

/// A request on its way to the writer, holding its share of the session's read budget until
/// the writer takes it.
pub struct Request {
    /// The message.
    pub msg: Message,
    /// Released when the request is dropped.
    pub _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Everything a writer needs.
pub struct Writer {
    state: Arc<ModuleState>,
    stats: Arc<Stats>,
    privileged: bool,
    writable: bool,
    replies: mpsc::Sender<Message>,
    incoming: HashMap<RequestId, Incoming>,
    /// File ids whose `FileBegin` already failed: their body frames are dropped silently.
    failed: HashSet<RequestId>,
    pending_acks: Vec<RequestId>,
    dirty: HashSet<PathBuf>,
    tree: Option<(bool, DigestTree)>,
    seq: u64,
    scratch: Vec<u8>,
}

const GROUP_COMMIT: usize = 512;
const LISTING_BATCH_BYTES: usize = 4 * 1024 * 1024;

enum Flow {
    Continue,
    Stop,
}

impl Writer {
    /// A writer for one session on `state`.
    pub fn new(
        state: Arc<ModuleState>,
        stats: Arc<Stats>,
        privileged: bool,
        writable: bool,
        replies: mpsc::Sender<Message>,
    ) -> Self {
        Writer {
            state,
            stats,
            privileged,
            writable,
            replies,
            incoming: HashMap::new(),
            failed: HashSet::new(),
            pending_acks: Vec::new(),
            dirty: HashSet::new(),
            tree: None,
            seq: 0,
            scratch: Vec::new(),
        }
    }

    /// Serves requests until `requests` closes or `Bye` arrives. In-flight file transfers that
    /// did not end are discarded; everything completed is committed and acknowledged.
    pub fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        loop {
            let msg = match requests.try_recv() {
                Ok(r) => r.msg,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !self.commit() {
                        break;
                    }
                    match requests.blocking_recv() {
                        Some(r) => r.msg,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            match self.handle(msg) {
                Flow::Continue => {}
                Flow::Stop => break,
            }
            if self.pending_acks.len() >= GROUP_COMMIT && !self.commit() {
                break;
            }
        }
        self.commit();
        self.discard_incoming();
        if let Err(e) = self.state.cache.lock().expect("cache lock").save() {
            tracing::warn!(module = %self.state.module.name, "cannot save digest cache: {e}");
        }
    }

    fn root(&self) -> &Path {
        &self.state.module.path
    }

    fn reply(&self, msg: Message) -> bool {
        self.replies.blocking_send(msg).is_ok()
    }

    fn fail(&mut self, id: RequestId, error: String) {
        tracing::warn!(module = %self.state.module.name, "request failed: {error}");
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.reply(Message::Failed { id, error });
    }

    fn handle(&mut self, msg: Message) -> Flow {
        if is_mutation(&msg) && !self.writable {
            if let Some(id) = request_id(&msg) {
                self.fail(id, "session is read-only".into());
            }
            return Flow::Continue;
        }
        match msg {
            Message::List { id, under } => self.list(id, &under),
            Message::Mkdir { id, path, meta } => {
                let r = self.mkdir(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::Symlink {
                id,
                path,
                target,
                meta,
            } => {
                let r = self.symlink(&path, &target, &meta);
                self.finish(id, &path, r)
            }
            Message::Special { id, path, meta } => {
                let r = self.special(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::SetMeta { id, path, meta } => {
                let r = self.set_meta(&path, &meta);
                self.finish(id, &path, r)
            }
            Message::Delete { id, path } => {
                let r = self.delete(&path);
                self.finish(id, &path, r)
            }
            Message::Rename { id, from, to } => {
                let r = self.rename(&from, &to);
                self.finish(id, &from, r)
            }
            Message::FileBegin {
                id,
                path,
                meta,
                body,
            } => {
                if let Err(e) = self.file_begin(id, &path, meta, body) {
                    self.failed.insert(id);
                    self.fail(id, format!("{path}: {e}"));
                }
            }
            Message::FileData { id, data } => {
                self.file_body(id, |w, inc| w.write_whole(inc, &data))
            }
            Message::FileDelta { id, window, delta } => {
                self.file_body(id, |w, inc| w.write_delta(inc, window, &delta))
            }
            Message::FileEnd { id, digest } => {
                if self.failed.remove(&id) {
                    return Flow::Continue;
                }
                match self.incoming.remove(&id) {
                    Some(inc) => {
                        let path = inc.path.clone();
                        let r = self.file_commit(inc, digest);
                        self.finish(id, &path, r)
                    }
                    None => self.fail(id, format!("FileEnd for unknown transfer {id}")),
                }
            }
            Message::FileAbort { id } => {
                if !self.failed.remove(&id) {
                    if let Some(inc) = self.incoming.remove(&id) {
                        let _ = fs::remove_file(&inc.tmp_path);
                    }
                    self.reply(Message::Failed {
                        id,
                        error: "aborted by sender".into(),
                    });
                }
            }
            Message::VerifyDir { id, path, checksum } => self.verify_dir(id, &path, checksum),
            Message::Stats { id } => {
                self.reply(Message::StatsReply {
                    id,
                    counters: self.stats.snapshot(),
                });
            }
            Message::Bye => return Flow::Stop,
            other => {
                tracing::warn!(module = %self.state.module.name, "unexpected {} from sender", other.name());
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn finish(&mut self, id: RequestId, path: &RelPath, result: io::Result<()>) {
        match result {
            Ok(()) => self.pending_acks.push(id),
            Err(e) => self.fail(id, format!("{path}: {e}")),
        }
    }

    /// fsyncs dirty directories, then acknowledges. Returns false if the peer is gone.
    fn commit(&mut self) -> bool {
        for dir in self.dirty.drain() {
            if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), "fsync failed: {e}");
                }
            }
        }
        for id in std::mem::take(&mut self.pending_acks) {
            if !self.reply(Message::Ack { id }) {
                return false;
            }
        }
        true
    }

    fn mark_parent_dirty(&mut self, path: &Path) {
        if let Some(parent) = path.parent() {
            self.dirty.insert(parent.to_path_buf());
        }
    }

    fn local(&self, rel: &RelPath) -> io::Result<PathBuf> {
        confine(self.root(), rel)
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))
    }

    fn list(&mut self, id: RequestId, under: &RelPath) {
        let mut errors = Vec::new();
        if let Err(e) = self.local(under) {
            return self.fail(id, format!("{under}: {e}"));
        }
        let entries = match local::scan_from(self.root(), under, &module_filter, &mut errors) {
            Ok(e) => e,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory =>
            {
                Vec::new()
            }
            Err(e) => return self.fail(id, format!("listing {under:?}: {e}")),
        };
        for (p, e) in &errors {
            tracing::warn!(module = %self.state.module.name, path = %p, "cannot list: {e}");
        }
        let mut batch = Vec::new();
        let mut size = 0;
        for entry in entries {
            size += 64 + entry.path.as_bytes().len() + entry.link.as_ref().map_or(0, Vec::len);
            batch.push(entry);
            if size >= LISTING_BATCH_BYTES {
                if !self.reply(Message::Listing {
                    id,
                    entries: std::mem::take(&mut batch),
                    done: false,
                }) {
                    return;
                }
                size = 0;
            }
        }
        self.reply(Message::Listing {
            id,
            entries: batch,
            done: true,
        });
    }

    fn mkdir(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let path = self.local(rel)?;
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&path)?;
                fs::create_dir(&path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
            Err(e) => return Err(e),
        }
        self.apply_owner_mode(&path, meta)?;
        self.dirty.insert(path.clone());
        self.mark_parent_dirty(&path);
        self.stats.mkdirs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn staging_path(&mut self) -> io::Result<PathBuf> {
        let staging = self.root().join(STAGING_DIR);
        self.seq += 1;
        Ok(staging.join(format!(
            "{}.{}.{}",
            std::process::id(),
            thread_tag(),
            self.seq
        )))
    }

    /// Renames a finished temp entry over `path`, replacing a directory there if need be.
    fn install(&mut self, tmp: &Path, path: &Path) -> io::Result<()> {
        if let Ok(md) = fs::symlink_metadata(path) {
            if md.is_dir() {
                fs::remove_dir_all(path)?;
            }
        }
        fs::rename(tmp, path)?;
        self.mark_parent_dirty(path);
        Ok(())
    }

    fn symlink(&mut self, rel: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        let path = self.local(rel)?;
        if rel.is_root() {
            return Err(io::Error::other("cannot replace the module root"));
        }
        let tmp = self.staging_path()?;
        std::os::unix::fs::symlink(RelPath::from_bytes(target.to_vec()).as_path(), &tmp)?;
        self.install_staged(&tmp, &path, meta)
    }

    fn special(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let path = self.local(rel)?;
        if rel.is_root() {
            return Err(io::Error::other("cannot replace the module root"));
        }
        let type_bits = match meta.kind {
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            _ => return Err(io::Error::other("not a special file")),
        };
        if meta.kind != Kind::Fifo && !self.privileged {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device nodes need a receiver running as root",
            ));
        }
        let tmp = self.staging_path()?;
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(tmp.as_os_str()))
            .map_err(io::Error::other)?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod has no other memory effects.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                type_bits | (meta.mode & 0o7777) as libc::mode_t,
                meta.rdev as libc::dev_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.install_staged(&tmp, &path, meta)
    }

    /// Gives a staged symlink or special file its metadata and renames it over `path`; the
    /// staged entry is removed if any step fails.
    fn install_staged(&mut self, tmp: &Path, path: &Path, meta: &Meta) -> io::Result<()> {
        let r = self
            .apply_owner_mode(tmp, meta)
            .and_then(|_| set_mtime(tmp, meta))
            .and_then(|_| self.install(tmp, path));
        if r.is_err() {
            let _ = fs::remove_file(tmp);
        }
        r?;
        self.stats.links.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Owner first (chown clears setuid/setgid), then mode; symlinks have no mode.
    fn apply_owner_mode(&self, path: &Path, meta: &Meta) -> io::Result<()> {
        if self.privileged {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
        }
        if meta.kind != Kind::Symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))?;
        }
        Ok(())
    }

    fn set_meta(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let path = self.local(rel)?;
        let md = fs::symlink_metadata(&path)?;
        let have = local::meta_of(&md).map(|m| m.kind);
        if have != Some(meta.kind) {
            return Err(io::Error::other(format!(
                "is a {:?} on the receiver, not a {:?}",
                have, meta.kind
            )));
        }
        self.apply_owner_mode(&path, meta)?;
        set_mtime(&path, meta)?;
        // Inode metadata reaches the disk with its directory entry's journal commit on the
        // filesystems we target; fsyncing the entry itself covers the rest.
        if meta.kind == Kind::Dir {
            self.dirty.insert(path.clone());
        } else if meta.kind == Kind::File {
            File::open(&path)?.sync_all()?;
        }
        self.mark_parent_dirty(&path);
        self.stats.set_meta.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&mut self, rel: &RelPath) -> io::Result<()> {
        if rel.is_root() {
            return Err(io::Error::other("cannot delete the module root"));
        }
        let path = self.local(rel)?;
        let r = match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                self.mark_parent_dirty(&path);
                self.stats.deletes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        if from.is_root() || to.is_root() || to.starts_with(from) {
            return Err(io::Error::other(format!("cannot rename {from} to {to}")));
        }
        let src = self.local(from)?;
        let dst = self.local(to)?;
        let src_md = fs::symlink_metadata(&src)?;
        if let Ok(dst_md) = fs::symlink_metadata(&dst) {
            // rename(2) replaces files and empty directories only; make it replace anything.
            if dst_md.is_dir() && (!src_md.is_dir() || fs::read_dir(&dst)?.next().is_some()) {
                fs::remove_dir_all(&dst)?;
            } else if !dst_md.is_dir() && src_md.is_dir() {
                fs::remove_file(&dst)?;
            }
        }
        fs::rename(&src, &dst)?;
        self.mark_parent_dirty(&src);
        self.mark_parent_dirty(&dst);
        self.stats.renames.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn file_begin(
        &mut self,
        id: RequestId,
        rel: &RelPath,
        meta: Meta,
        body: Body,
    ) -> io::Result<()> {
        if meta.kind != Kind::File || rel.is_root() {
            return Err(io::Error::other("not a regular file"));
        }
        if self.incoming.contains_key(&id) {
            return Err(io::Error::other(format!("duplicate transfer id {id}")));
        }
        let path = self.local(rel)?;
        let tmp_path = self.staging_path()?;
        let tmp = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)?;
        let mut base = None;
        if body == Body::Delta {
            base = open_base(&path);
            match &base {
                Some(map) => {
                    let signature = delta::sign(map);
                    self.reply(Message::Signature { id, signature });
                }
                None => {
                    self.reply(Message::NoBase { id });
                }
            }
        }
        self.incoming.insert(
            id,
            Incoming {
                path: rel.clone(),
                meta,
                tmp,
                tmp_path,
                hasher: blake3::Hasher::new(),
                base,
                written: 0,
            },
        );
        Ok(())
    }

    fn file_body(
        &mut self,
        id: RequestId,
        f: impl FnOnce(&mut Self, &mut Incoming) -> io::Result<()>,
    ) {
        if self.failed.contains(&id) {
            return;
        }
        let Some(mut inc) = self.incoming.remove(&id) else {
            return self.fail(id, format!("file data for unknown transfer {id}"));
        };
        match f(self, &mut inc) {
            Ok(()) => {
                self.incoming.insert(id, inc);
            }
            Err(e) => {
                let _ = fs::remove_file(&inc.tmp_path);
                self.failed.insert(id);
                self.fail(id, format!("{}: {e}", inc.path));
            }
        }
    }

    fn write_whole(&mut self, inc: &mut Incoming, data: &[u8]) -> io::Result<()> {
        self.stats
            .bytes_received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        append(inc, data)
    }

    fn write_delta(&mut self, inc: &mut Incoming, window: u64, delta: &[u8]) -> io::Result<()> {
        self.stats
            .bytes_received
            .fetch_add(delta.len() as u64, Ordering::Relaxed);
        let base = inc
            .base
            .as_ref()
            .ok_or_else(|| io::Error::other("delta without a base"))?;
        self.scratch.clear();
        delta::apply_window(base, delta, window, &mut self.scratch).map_err(io::Error::other)?;
        let out = std::mem::take(&mut self.scratch);
        let r = append(inc, &out);
        self.scratch = out;
        r
    }

    fn file_commit(&mut self, mut inc: Incoming, digest: Digest) -> io::Result<()> {
        let r = self.file_commit_inner(&mut inc, digest);
        if r.is_err() {
            let _ = fs::remove_file(&inc.tmp_path);
        }
        r
    }

    fn file_commit_inner(&mut self, inc: &mut Incoming, digest: Digest) -> io::Result<()> {
        if inc.written != inc.meta.size {
            return Err(io::Error::other(format!(
                "received {} bytes, expected {}",
                inc.written, inc.meta.size
            )));
        }
        if *inc.hasher.finalize().as_bytes() != digest {
            return Err(io::Error::other(
                "content digest mismatch; file not committed",
            ));
        }
        inc.tmp.sync_all()?;
        if self.privileged {
            std::os::unix::fs::fchown(&inc.tmp, Some(inc.meta.uid), Some(inc.meta.gid))?;
        }
        inc.tmp
            .set_permissions(fs::Permissions::from_mode(inc.meta.mode))?;
        let mtime = filetime::FileTime::from_unix_time(inc.meta.mtime, inc.meta.mtime_nsec);
        filetime::set_file_handle_times(&inc.tmp, None, Some(mtime))?;
        let path = self.local(&inc.path)?;
        let delta = inc.base.take().is_some();
        self.install(&inc.tmp_path.clone(), &path)?;
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(inc.written, Ordering::Relaxed);
        if delta {
            self.stats.delta_files.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(module = %self.state.module.name, path = %inc.path, bytes = inc.written, delta, "committed");
        Ok(())
    }

    fn discard_incoming(&mut self) {
        for (_, inc) in self.incoming.drain() {
            tracing::info!(module = %self.state.module.name, path = %inc.path, "discarding unfinished transfer");
            let _ = fs::remove_file(&inc.tmp_path);
        }
    }

    fn verify_dir(&mut self, id: RequestId, rel: &RelPath, checksum: bool) {
        if let Err(e) = rel.validate() {
            return self.fail(id, format!("{rel}: {e}"));
        }
        if self.tree.as_ref().map(|(c, _)| *c) != Some(checksum) {
            let cmp = Compare {
                owner: self.privileged,
            };
            let mut errors = Vec::new();
            let root = self.root().to_path_buf();
            let built = {
                let mut cache = self.state.cache.lock().expect("cache lock");
                DigestTree::build(
                    &root,
                    &module_filter,
                    &mut cache,
                    cmp,
                    checksum,
                    &mut errors,
                )
            };
            for (p, e) in &errors {
                tracing::warn!(module = %self.state.module.name, path = %p, "verify: {e}");
            }
            match built {
                Ok(tree) => self.tree = Some((checksum, tree)),
                Err(e) => return self.fail(id, format!("verify: {e}")),
            }
        }
        let (_, tree) = self.tree.as_ref().expect("built above");
        let (dir, entries) = match tree.dirs.get(rel) {
            Some(listing) => (Some(listing.dir.entry.clone()), listing.entries.clone()),
            None => (None, Vec::<DigestEntry>::new()),
        };
        self.reply(Message::DirDigests {
            id,
            dir: dir.map(|e: Entry| e),
            entries,
        });
    }
}

fn append(inc: &mut Incoming, data: &[u8]) -> io::Result<()> {
    if inc.written + data.len() as u64 > inc.meta.size {
        return Err(io::Error::other(format!(
            "more data than the announced {} bytes",
            inc.meta.size
        )));
    }
    inc.tmp.write_all(data)?;
    inc.hasher.update(data);
    inc.written += data.len() as u64;
    Ok(())
}

fn open_base(path: &Path) -> Option<memmap2::Mmap> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let md = f.metadata().ok()?;
    if !md.is_file() || md.len() == 0 {
        return None;
    }
    // SAFETY: the module is written only by this receiver, which replaces files by rename and
    // never truncates in place, so the mapping stays valid while the transfer runs.
    unsafe { memmap2::Mmap::map(&f) }.ok()
}

fn set_mtime(path: &Path, meta: &Meta) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(meta.mtime, meta.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t)
}

fn thread_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() & 0xffff_ffff
}

fn is_mutation(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Mkdir { .. }
            | Message::Symlink { .. }
            | Message::Special { .. }
            | Message::SetMeta { .. }
            | Message::Delete { .. }
            | Message::Rename { .. }
            | Message::FileBegin { .. }
    )
}

fn request_id(msg: &Message) -> Option<RequestId> {
    match msg {
        Message::Mkdir { id, .. }
        | Message::Symlink { id, .. }
        | Message::Special { id, .. }
        | Message::SetMeta { id, .. }
        | Message::Delete { id, .. }
        | Message::Rename { id, .. }
        | Message::FileBegin { id, .. } => Some(*id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_empties_staging_but_keeps_the_directory_and_root_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join(STAGING_DIR).join("nested")).unwrap();
        fs::write(root.join(STAGING_DIR).join("123.4.5"), b"half a file").unwrap();
        let t = filetime::FileTime::from_unix_time(1_000_000, 0);
        filetime::set_file_mtime(root, t).unwrap();
        clean_staging(root).unwrap();
        assert_eq!(fs::read_dir(root.join(STAGING_DIR)).unwrap().count(), 0);
        let md = fs::metadata(root).unwrap();
        assert_eq!(filetime::FileTime::from_last_modification_time(&md), t);
        assert_eq!(
            fs::metadata(root.join(STAGING_DIR))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
    }
}
