//! Files being received: `FileBegin` opens an unnamed file in the target's directory (and, for
//! a delta, opens the current copy as its base and answers with its signature), body frames
//! append to it while hashing, `FileEnd` checks size and digest, applies metadata and seals it;
//! the group commit makes it durable and installs it under its final name. A transfer that
//! fails at any step is dropped and remembered, so the frames the sender already had in flight
//! for it are dropped without further replies.

use crate::apply::{Apply, Staged};
use crate::commit::Sealed;
use crate::windows::Known;
use ferry_protocol::body::BodyDigest;
use ferry_protocol::delta;
use ferry_protocol::message::{Body, Digest, Message, RequestId};
use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::RelPath;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Incoming {
    path: RelPath,
    meta: Meta,
    tmp: Staged,
    hasher: BodyDigest,
    /// The receiver's current copy (open, never mapped) and its length, for deltas.
    base: Option<(fs::File, u64)>,
    /// The base's signature and window digests.
    base_known: Option<Arc<Known>>,
    /// The new file's signature so far, for a big file: kept with its window digests once
    /// it is committed (see [`crate::windows`]).
    signing: Option<delta::Signer>,
    /// A big file sent whole: signed after its commit instead ([`crate::windows`]).
    sign_later: bool,
    /// The new file began as a clone of the base (a reflink): what a delta copies from the
    /// same offset is already there, and only the rest is written.
    cloned: bool,
    written: u64,
}

/// What became of a file frame.
pub enum Outcome {
    /// Nothing to answer yet.
    Pending,
    /// Answer with this message (a `Signature` or `NoBase`); the transfer goes on.
    Reply(Message),
    /// The transfer failed: answer with this message.
    Failed(String),
    /// The transfer failed because the module's filesystem takes no writes now
    /// ([`unwritable`]).
    Unwritable(String),
    /// The file is whole and sealed: the group commit makes it durable, names it and
    /// answers.
    Sealed,
    /// The frame belongs to a transfer that already failed: say nothing.
    Silent,
    /// The sender broke the protocol (a malformed delta): the session ends.
    Violation(String),
}

impl Outcome {
    /// The failure `why`, of the error `e`.
    fn failed(why: String, e: &io::Error) -> Outcome {
        if unwritable(e) {
            Outcome::Unwritable(why)
        } else {
            Outcome::Failed(why)
        }
    }
}

/// Whether `e` says the filesystem takes no writes now, whatever the file: it is full, the
/// owner's quota is spent, it went read-only (as ext4 does on errors), or it fails its I/O
/// (as XFS does once it has shut down).
pub fn unwritable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::ReadOnlyFilesystem
    ) || e.raw_os_error() == Some(libc::EIO)
}

/// An error of the peer's making, not of this host's: carried through `io::Error` to
/// [`Outcome::Violation`].
#[derive(Debug)]
struct PeerError(delta::DeltaError);

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PeerError {}

/// A delta that failed to apply: the peer's fault (malformed, copies outside the base it was
/// told of, the wrong length), or this host's (the base could not be read, e.g. it shrank).
fn delta_error(e: delta::DeltaError) -> io::Error {
    match e {
        delta::DeltaError::Base(e) => e,
        e => io::Error::other(PeerError(e)),
    }
}

/// A file sent whole in one `File` message and at most this long over an entry that is
/// there is staged under a reserved name rather than unnamed ([`Apply::create_file`]): a
/// file rewritten costs the filesystem one change less. It is sealed before the next request,
/// so it is never kept to resume; a file sent in frames stays unnamed, so a cut transfer left
/// in the module is never visible.
const NAMED_UP_TO: u64 = 256 * 1024;

/// Files one session may have begun and not ended (each holds a descriptor and an unnamed
/// file); the sender streams 16 at once. Sealed files are bounded apart ([`crate::commit::may_seal`]).
pub const MAX_FILES_IN_FLIGHT: usize = 64;

/// The transfers of one session.
#[derive(Default)]
pub struct Transfers {
    incoming: HashMap<RequestId, Incoming>,
    /// File ids whose transfer already failed: their later body frames are dropped silently.
    failed: HashSet<RequestId>,
    scratch: Vec<u8>,
}

impl Transfers {
    /// `FileBegin`.
    pub fn begin(
        &mut self,
        fs: &mut Apply,
        id: RequestId,
        rel: &RelPath,
        meta: Meta,
        body: Body,
    ) -> Outcome {
        let opened = self.open(fs, id, rel, meta, body, false);
        self.began(id, rel, opened)
    }

    /// What a file's beginning is answered with: its reply if any, else nothing yet; a
    /// failure is remembered, so its later frames are dropped silently.
    fn began(
        &mut self,
        id: RequestId,
        rel: &RelPath,
        opened: io::Result<Option<Message>>,
    ) -> Outcome {
        match opened {
            Ok(reply) => reply.map_or(Outcome::Pending, Outcome::Reply),
            Err(e) => {
                self.failed.insert(id);
                Outcome::failed(format!("{rel}: {e}"), &e)
            }
        }
    }

    /// Begins the file `id` at `rel`; `at_once`: its whole body is in the same message (a
    /// `File`), so a rewrite of a small one may be staged named.
    fn open(
        &mut self,
        fs: &mut Apply,
        id: RequestId,
        rel: &RelPath,
        meta: Meta,
        body: Body,
        at_once: bool,
    ) -> io::Result<Option<Message>> {
        if meta.kind != Kind::File {
            return Err(io::Error::other("not a regular file"));
        }
        meta.xattrs
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if self.incoming.contains_key(&id) {
            return Err(io::Error::other(format!("duplicate transfer id {id}")));
        }
        if self.incoming.len() >= MAX_FILES_IN_FLIGHT {
            return Err(io::Error::other(format!(
                "more than {MAX_FILES_IN_FLIGHT} files in flight in one session"
            )));
        }
        let at = fs.file_entry(rel)?;
        let path = at.path();
        let partials = &fs.state.partials;
        // A transfer of this very file that was cut off continues where it stopped.
        if body == Body::Delta {
            if let Some(p) = partials.take(rel, &meta) {
                let reply = Message::Resume {
                    id,
                    offset: p.written,
                    digest: p.hasher.digest(),
                };
                tracing::info!(module = fs.module(), path = %rel, offset = p.written, "resuming a cut-off transfer");
                self.incoming.insert(
                    id,
                    Incoming {
                        path: rel.clone(),
                        meta,
                        tmp: p.tmp,
                        hasher: p.hasher,
                        base: None,
                        base_known: None,
                        signing: None,
                        sign_later: false,
                        cloned: p.cloned,
                        written: p.written,
                    },
                );
                return Ok(Some(reply));
            }
        }
        partials.forget(rel);
        let mode = fs.mode_for(&meta);
        // A small file sent whole in one message over one that is there (a file rewritten):
        // named at once.
        let replacing = at_once && meta.size <= NAMED_UP_TO && at.exists();
        let tmp = fs.create_file(&at, mode, replacing)?;
        let mut base = None;
        let mut base_known = None;
        let mut reply = None;
        let mut cloned = false;
        if body == Body::Delta {
            base = open_base(&path);
            // What this receiver committed last is known; anything else is read and signed.
            base_known = base.as_ref().and_then(|(f, md)| {
                let windows = &fs.state.windows;
                windows.get(rel, md).or_else(|| {
                    let signed = delta::sign_file(f, md.len()).ok()?;
                    fs.stats.bases_signed.fetch_add(1, Ordering::Relaxed);
                    Some(Arc::new(Known {
                        signature: signed.signature,
                        windows: signed.windows,
                    }))
                })
            });
            reply = Some(match &base_known {
                Some(known) => Message::Signature {
                    id,
                    signature: known.signature.clone(),
                    windows: if known.windows.len() <= delta::MAX_WINDOWS {
                        known.windows.clone()
                    } else {
                        Vec::new()
                    },
                },
                None => {
                    base = None;
                    Message::NoBase { id }
                }
            });
            if let Some((f, md)) = &base {
                cloned = fs.state.reflinks.clone_into(&tmp.file, f, fs.module());
                // Windows are taken by digest from the clone only if it holds what was signed.
                if cloned && !f.metadata().is_ok_and(|now| crate::windows::same(md, &now)) {
                    base_known = None;
                }
            }
        }
        // A big file is signed for its next delta: as it comes when rebuilt from a delta
        // (a window kept as it was takes the base's entries), after its commit when it has
        // no base here and comes whole.
        let big = meta.size > delta::WINDOW as u64 && fs.state.windows.keeps();
        let sign_later = big && base.is_none();
        let signing = (big && base.is_some())
            .then(|| delta::Signer::new(meta.size))
            .flatten();
        let base = base.map(|(f, md)| (f, md.len()));
        self.incoming.insert(
            id,
            Incoming {
                path: rel.clone(),
                meta,
                tmp,
                hasher: BodyDigest::new(),
                base,
                base_known,
                signing,
                sign_later,
                cloned,
                written: 0,
            },
        );
        Ok(reply)
    }

    /// `FileData`: a slice of a whole body.
    pub fn data(&mut self, fs: &Apply, id: RequestId, data: &[u8]) -> Outcome {
        self.body(id, |inc, _| {
            received(fs, data.len());
            whole_body(inc)?;
            append(inc, data)?;
            if let Some(sig) = &mut inc.signing {
                sig.feed(data);
            }
            Ok(())
        })
    }

    /// `FileHole`: the next `len` bytes are a hole: skipped over, not written, so the file
    /// stays sparse; counted in the digest by its place and length (constant time, whatever
    /// the length).
    pub fn hole(&mut self, id: RequestId, len: u64) -> Outcome {
        self.body(id, |inc, _| {
            whole_body(inc)?;
            // A body with holes has no window digests to keep.
            inc.signing = None;
            inc.sign_later = false;
            skip(inc, len)
        })
    }

    /// `FileDelta`: the delta of the next `window` bytes against the base.
    pub fn delta(&mut self, fs: &Apply, id: RequestId, window: u64, delta: &[u8]) -> Outcome {
        self.body(id, |inc, scratch| {
            received(fs, delta.len());
            if inc.base.is_none() {
                return Err(io::Error::other("delta without a base"));
            }
            if take_known(inc, delta, window) {
                fs.stats.windows_known.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            scratch.clear();
            let (file, len) = inc.base.as_ref().expect("checked above");
            let unmoved =
                delta::apply_window_unmoved(file, *len, delta, window, inc.written, scratch)
                    .map_err(delta_error)?;
            if let Some(sig) = &mut inc.signing {
                sig.feed(scratch);
            }
            if inc.cloned {
                write_moved(inc, scratch, &unmoved)
            } else {
                append(inc, scratch)
            }
        })
    }

    fn body(
        &mut self,
        id: RequestId,
        f: impl FnOnce(&mut Incoming, &mut Vec<u8>) -> io::Result<()>,
    ) -> Outcome {
        if self.failed.contains(&id) {
            return Outcome::Silent;
        }
        let Some(inc) = self.incoming.get_mut(&id) else {
            return Outcome::Failed(format!("file data for unknown transfer {id}"));
        };
        match f(inc, &mut self.scratch) {
            Ok(()) => Outcome::Pending,
            Err(e) => {
                let inc = self.incoming.remove(&id).expect("looked up above");
                inc.tmp.discard();
                self.failed.insert(id);
                let peer = e.get_ref().is_some_and(|i| i.is::<PeerError>());
                let why = format!("{}: {e}", inc.path);
                if peer {
                    Outcome::Violation(why)
                } else {
                    Outcome::failed(why, &e)
                }
            }
        }
    }

    /// `FileEnd`: commit if size and digest match.
    pub fn end(&mut self, fs: &mut Apply, id: RequestId, digest: Digest) -> Outcome {
        if self.failed.remove(&id) {
            return Outcome::Silent;
        }
        let Some(mut inc) = self.incoming.remove(&id) else {
            return Outcome::Failed(format!("FileEnd for unknown transfer {id}"));
        };
        match seal(fs, &mut inc, digest) {
            Ok(dev) => {
                let delta = inc.base.take().is_some();
                let known = inc
                    .signing
                    .take()
                    .and_then(delta::Signer::finish)
                    .zip(inc.hasher.windows())
                    .map(|(signature, windows)| Known { signature, windows });
                let sign_later = inc.sign_later.then(|| inc.hasher.windows()).flatten();
                fs.seal(Sealed {
                    id,
                    path: inc.path,
                    staged: inc.tmp,
                    bytes: inc.written,
                    delta,
                    dev,
                    known,
                    sign_later,
                    held: crate::commit::Held::share(),
                });
                Outcome::Sealed
            }
            Err(e) => {
                inc.tmp.discard();
                Outcome::failed(format!("{}: {e}", inc.path), &e)
            }
        }
    }

    /// `File`: a whole file in one message, as `FileBegin` (whole), `FileData` and
    /// `FileEnd` would bring it.
    pub fn whole(
        &mut self,
        fs: &mut Apply,
        id: RequestId,
        rel: &RelPath,
        meta: Meta,
        data: &[u8],
        digest: Digest,
    ) -> Outcome {
        // Its whole body is in this message: it is sealed before the next request and never
        // left to resume.
        let opened = self.open(fs, id, rel, meta, Body::Whole, true);
        match self.began(id, rel, opened) {
            Outcome::Pending => {}
            other => {
                self.failed.remove(&id);
                return other;
            }
        }
        match self.data(fs, id, data) {
            Outcome::Pending => self.end(fs, id, digest),
            other => {
                self.failed.remove(&id);
                other
            }
        }
    }

    /// `FileAbort`: the sender gave up on this file.
    pub fn abort(&mut self, id: RequestId) -> Outcome {
        if self.failed.remove(&id) {
            return Outcome::Silent;
        }
        if let Some(inc) = self.incoming.remove(&id) {
            inc.tmp.discard();
        }
        Outcome::Failed("aborted by sender".into())
    }

    /// The session ended: unfinished transfers that got somewhere are kept in the module's
    /// [`Partials`], to resume when the sender comes back; the rest are dropped.
    pub fn suspend_all(&mut self, partials: &Partials, module: &str) {
        for (_, inc) in self.incoming.drain() {
            if inc.written == 0 {
                tracing::info!(module, path = %inc.path, "discarding unfinished transfer");
                inc.tmp.discard();
                continue;
            }
            tracing::info!(module, path = %inc.path, bytes = inc.written, "keeping unfinished transfer to resume");
            partials.keep(
                inc.path,
                Partial {
                    meta: inc.meta,
                    tmp: inc.tmp,
                    hasher: inc.hasher,
                    cloned: inc.cloned,
                    written: inc.written,
                    since: Instant::now(),
                },
            );
        }
    }
}

/// A cut-off transfer, kept to resume: the unnamed file with what arrived, and its digest
/// so far.
pub struct Partial {
    meta: Meta,
    tmp: Staged,
    hasher: BodyDigest,
    cloned: bool,
    written: u64,
    since: Instant,
}

/// A module's cut-off transfers, by path. Bounded: at most [`MAX_PARTIALS`], none older than
/// [`PARTIAL_TTL`] (the oldest go first); each holds an open unnamed file, so nothing of it
/// is ever visible in the module and a restart frees it.
#[derive(Default)]
pub struct Partials(Mutex<HashMap<RelPath, Partial>>);

/// Cut-off transfers kept per module.
pub const MAX_PARTIALS: usize = 16;
/// How long a cut-off transfer is kept for its sender to come back.
pub const PARTIAL_TTL: Duration = Duration::from_secs(3600);

impl Partials {
    /// Keeps `p` for `path`, replacing the one kept before unless that is a longer prefix of
    /// the same version.
    pub fn keep(&self, path: RelPath, p: Partial) {
        let mut map = self.0.lock().expect("partials lock");
        map.retain(|_, p| p.since.elapsed() < PARTIAL_TTL);
        // Two sessions can hold the same transfer (a sender that reconnected before the old
        // connection was found dead): of one version, the longer prefix stays, so a resume
        // never goes backwards.
        if let Some(old) = map.get(&path) {
            if old.meta == p.meta && old.written > p.written {
                p.tmp.discard();
                return;
            }
        }
        if let Some(old) = map.insert(path, p) {
            old.tmp.discard();
        }
        while map.len() > MAX_PARTIALS {
            let oldest = map
                .iter()
                .min_by_key(|(_, p)| p.since)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            if let Some(p) = map.remove(&oldest) {
                p.tmp.discard();
            }
        }
    }

    /// The cut-off transfer of `path`, if it is of the same file (size and mtime) as `meta`.
    pub fn take(&self, path: &RelPath, meta: &Meta) -> Option<Partial> {
        let mut map = self.0.lock().expect("partials lock");
        let same = map.get(path).is_some_and(|p| {
            p.meta.size == meta.size
                && p.meta.mtime == meta.mtime
                && p.meta.mtime_nsec == meta.mtime_nsec
                && p.written <= meta.size
                && p.since.elapsed() < PARTIAL_TTL
        });
        if same {
            map.remove(path)
        } else {
            None
        }
    }

    /// Drops the cut-off transfer of `path` (another version of it is on its way).
    pub fn forget(&self, path: &RelPath) {
        if let Some(p) = self.0.lock().expect("partials lock").remove(path) {
            p.tmp.discard();
        }
    }
}

/// Checks size and digest and applies the metadata to the unnamed file; the group commit
/// makes it durable and names it. Returns the device it is on.
fn seal(fs: &mut Apply, inc: &mut Incoming, digest: Digest) -> io::Result<u64> {
    if inc.written != inc.meta.size {
        return Err(io::Error::other(format!(
            "received {} bytes, expected {}",
            inc.written, inc.meta.size
        )));
    }
    if inc.hasher.digest() != digest {
        return Err(io::Error::other(
            "content digest mismatch; file not committed",
        ));
    }
    if inc.cloned {
        // The clone of a longer base keeps its tail until cut to the new size.
        inc.tmp.file.set_len(inc.meta.size)?;
    }
    let file = &inc.tmp.file;
    // What the new file has already (owner, permissions: see `Apply::create_file`) is not
    // set again: each change is a transaction of the filesystem's.
    let have = file.metadata()?;
    let mut mode_now = have.mode() & 0o7777;
    if let Some((uid, gid)) = fs.owner_for(&inc.meta) {
        if (have.uid(), have.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
            // A change of owner may clear the setuid and setgid bits.
            mode_now &= !0o6000;
        }
    }
    let mode = fs.mode_for(&inc.meta) & 0o7777;
    if mode_now != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    fs.apply_xattrs(
        ferry_protocol::xattr::At::Fd(file.as_raw_fd()),
        &inc.path,
        &inc.meta,
    )?;
    let mtime = filetime::FileTime::from_unix_time(inc.meta.mtime, inc.meta.mtime_nsec);
    filetime::set_file_handle_times(file, None, Some(mtime))?;
    Ok(have.dev())
}

fn received(fs: &Apply, bytes: usize) {
    fs.stats
        .bytes_received
        .fetch_add(bytes as u64, Ordering::Relaxed);
}

fn skip(inc: &mut Incoming, len: u64) -> io::Result<()> {
    if inc
        .written
        .checked_add(len)
        .is_none_or(|end| end > inc.meta.size)
    {
        return Err(io::Error::other(format!(
            "a hole past the announced {} bytes",
            inc.meta.size
        )));
    }
    if inc.cloned {
        // What the clone holds there is not this hole's zeros.
        punch_hole(&inc.tmp.file, inc.written, len)?;
    }
    inc.hasher.hole(len);
    inc.written += len;
    // A hole that ends the body leaves nothing after it to make the file that long.
    if inc.written == inc.meta.size {
        inc.tmp.file.set_len(inc.meta.size)?;
    }
    Ok(())
}

fn append(inc: &mut Incoming, data: &[u8]) -> io::Result<()> {
    if inc.written + data.len() as u64 > inc.meta.size {
        return Err(io::Error::other(format!(
            "more data than the announced {} bytes",
            inc.meta.size
        )));
    }
    inc.tmp.file.write_all_at(data, inc.written)?;
    inc.hasher.data(data);
    let before = inc.written;
    inc.written += data.len() as u64;
    // Start writing back each full stretch at once, so the disk works while the rest
    // arrives and the fsync at the commit has little left to wait for.
    if inc.written / WRITEBACK_EVERY > before / WRITEBACK_EVERY {
        let end = inc.written / WRITEBACK_EVERY * WRITEBACK_EVERY;
        // SAFETY: a valid descriptor; the call only schedules writeback of that range.
        unsafe {
            libc::sync_file_range(
                inc.tmp.file.as_raw_fd(),
                (end - WRITEBACK_EVERY) as i64,
                WRITEBACK_EVERY as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    Ok(())
}

/// A whole body (`FileData`, `FileHole`) into a file begun as a clone of its base (the sender
/// chose not to send a delta, as it does for a sparse file): from its start, the clone is
/// dropped and the file starts empty.
fn whole_body(inc: &mut Incoming) -> io::Result<()> {
    if inc.cloned && inc.written == 0 {
        inc.tmp.file.set_len(0)?;
        inc.cloned = false;
    }
    Ok(())
}

/// A window rebuilt from a delta, into a file begun as a clone of the base: hashed whole,
/// written only where it is not `unmoved` (copied from the same offset of the base, which the
/// clone already holds there).
fn write_moved(
    inc: &mut Incoming,
    data: &[u8],
    unmoved: &[std::ops::Range<usize>],
) -> io::Result<()> {
    if inc.written + data.len() as u64 > inc.meta.size {
        return Err(io::Error::other(format!(
            "more data than the announced {} bytes",
            inc.meta.size
        )));
    }
    let mut at = 0;
    for r in unmoved.iter().chain([&(data.len()..data.len())]) {
        if r.start > at {
            inc.tmp
                .file
                .write_all_at(&data[at..r.start], inc.written + at as u64)?;
        }
        at = r.end;
    }
    inc.hasher.data(data);
    inc.written += data.len() as u64;
    Ok(())
}

/// A window of a file begun as a clone of its base, sent as one copy of the base's window at
/// the same place whose digest the receiver knows: already in the file, counted by that
/// digest and never read. Returns whether it was taken that way.
fn take_known(inc: &mut Incoming, delta: &[u8], window: u64) -> bool {
    let (Some((_, base_len)), Some(known), true) = (&inc.base, &inc.base_known, inc.cloned) else {
        return false;
    };
    let w = delta::WINDOW as u64;
    // A body of one window has its digest from its bytes alone (BLAKE3's root is no
    // window's chaining value).
    if inc.meta.size <= w {
        return false;
    }
    let (at, k) = (inc.written, inc.written / w);
    let whole = window == w || at + window == inc.meta.size;
    let same_len = (*base_len).min(at + w).saturating_sub(at) == window;
    let copied = delta::single_copy(delta) == Some((at, window));
    let Some(digest) = known.windows.get(k as usize) else {
        return false;
    };
    if !(at % w == 0 && whole && same_len && copied && at + window <= inc.meta.size) {
        return false;
    }
    if !inc.hasher.known_window(k, window, *digest) {
        return false;
    }
    if let Some(sig) = &mut inc.signing {
        if !sig.known(&known.signature, at, window) {
            inc.signing = None;
        }
    }
    inc.written += window;
    true
}

/// Deallocates `len` bytes at `at` (they read as zeros after), keeping the size.
fn punch_hole(file: &fs::File, at: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a valid descriptor; fallocate only changes the file's allocation.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, at as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Stretch of a big file whose writeback starts as soon as it has been received.
const WRITEBACK_EVERY: u64 = 8 << 20;

fn open_base(path: &Path) -> Option<(fs::File, fs::Metadata)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let md = f.metadata().ok()?;
    (md.is_file() && md.len() > 0).then_some((f, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cut-off transfer of a version (`mtime`) with `written` bytes, cut `age` ago.
    fn partial(mtime: i64, written: u64, age: Duration) -> Partial {
        let mut meta = crate::history::created_meta(Kind::File, 8 << 20);
        meta.mtime = mtime;
        let file = tempfile::tempfile().unwrap();
        Partial {
            meta,
            tmp: Staged { file, name: None },
            hasher: BodyDigest::new(),
            cloned: false,
            written,
            since: Instant::now() - age,
        }
    }

    /// A small file sent whole in one message over one that is there is staged under a
    /// reserved name (one change of the filesystem less than an unnamed file linked beside
    /// it) and renamed over it at the commit; a new name, or a rewrite sent in frames, is
    /// still staged unnamed. Either way the module ends with
    /// the new bodies under their names and nothing reserved left, and the old file's other
    /// name (a hard link) keeps the old body.
    #[test]
    fn a_small_file_over_one_that_is_there_is_named_at_once_and_renamed_over_it() {
        use crate::module::tests::module_at;
        use crate::module::ModuleState;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("old"), b"old body").unwrap();
        std::fs::hard_link(d.join("old"), d.join("other name")).unwrap();
        let state = Arc::new(ModuleState::open(module_at(dir.path(), false), None).unwrap());
        let stats = Arc::new(crate::stats::Stats::default());
        let mut fs = Apply::new(state, stats, false);
        let mut files = Transfers::default();
        for (id, name, named) in [(1, "d/old", true), (2, "d/new", false)] {
            let body = format!("the new body of {name}");
            let mut meta = crate::history::created_meta(Kind::File, body.len() as u64);
            meta.mode = 0o640;
            let digest = *blake3::hash(body.as_bytes()).as_bytes();
            let rel = RelPath::from(name);
            let outcome = files.whole(&mut fs, id, &rel, meta, body.as_bytes(), digest);
            assert!(matches!(outcome, Outcome::Sealed), "{name}: not sealed");
            let staged = &fs.sealed.last().expect("sealed").staged;
            assert_eq!(staged.name.is_some(), named, "{name}: staged under a name");
        }
        // Sent in frames, a rewrite stays unnamed: cut off, it could be kept to resume.
        let meta = crate::history::created_meta(Kind::File, 5);
        let framed = files.begin(
            &mut fs,
            3,
            &RelPath::from("d/other name"),
            meta,
            Body::Whole,
        );
        assert!(matches!(framed, Outcome::Pending));
        assert!(files.incoming[&3].tmp.name.is_none(), "framed: unnamed");
        assert!(matches!(files.abort(3), Outcome::Failed(_)));
        for (id, r) in fs.flush() {
            r.unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        fs.commit_durable().unwrap();
        for name in ["old", "new"] {
            let body = std::fs::read(d.join(name)).unwrap();
            assert_eq!(body, format!("the new body of d/{name}").as_bytes());
            let mode = std::fs::metadata(d.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o640, "{name}");
        }
        assert_eq!(std::fs::read(d.join("other name")).unwrap(), b"old body");
        let mut left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["new", "old", "other name"]);
    }

    /// A file staged under a reserved name is readable by its owner only until it is sealed,
    /// and is never made through what a local user planted at that name (a symlink out of
    /// the module): the creation fails and the symlink's target is untouched.
    #[test]
    fn a_named_staging_file_is_private_and_never_follows_a_planted_name() {
        use crate::module::tests::module_at;
        use crate::module::ModuleState;
        use std::os::unix::fs::PermissionsExt;
        let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(dir.path().join("f"), b"there").unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"not the module's").unwrap();
        let state = Arc::new(ModuleState::open(module_at(dir.path(), false), None).unwrap());
        let stats = Arc::new(crate::stats::Stats::default());
        let mut fs = Apply::new(state, stats, false);
        let at = fs.entry(&RelPath::from("f")).unwrap();
        let staged = fs.create_file(&at, 0o644, true).unwrap();
        let name = staged.name.as_ref().expect("named");
        let mode = std::fs::symlink_metadata(name.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        staged.discard();
        let trap = at.sibling(b".ferry-planted");
        std::os::unix::fs::symlink(&secret, trap.path()).unwrap();
        assert!(crate::apply::TempName::create(trap).is_err());
        assert_eq!(std::fs::read(&secret).unwrap(), b"not the module's");
    }

    #[test]
    fn a_kept_transfer_never_goes_backwards_and_stays_bounded() {
        let (kept, path) = (Partials::default(), RelPath::from("f"));
        let second = Duration::from_secs(1);
        let version = |mtime| partial(mtime, 0, second).meta;
        // Two sessions held one transfer: the longer prefix of the version stays.
        kept.keep(path.clone(), partial(1, 3 << 20, second));
        kept.keep(path.clone(), partial(1, 1 << 20, second));
        let got = kept.take(&path, &version(1)).expect("kept");
        assert_eq!(got.written, 3 << 20);
        assert!(kept.take(&path, &version(1)).is_none(), "taken once");
        // Another version replaces it, however short.
        kept.keep(path.clone(), partial(1, 3 << 20, second));
        kept.keep(path.clone(), partial(2, 1 << 20, second));
        assert!(kept.take(&path, &version(1)).is_none());
        assert_eq!(
            kept.take(&path, &version(2)).expect("kept").written,
            1 << 20
        );
        // At most MAX_PARTIALS: the oldest go first; none past PARTIAL_TTL.
        for i in 0..=MAX_PARTIALS as u64 {
            let age = second * (100 - i as u32);
            kept.keep(RelPath::from(format!("p{i}").as_str()), partial(1, 1, age));
        }
        assert!(
            kept.take(&RelPath::from("p0"), &version(1)).is_none(),
            "oldest"
        );
        assert!(kept.take(&RelPath::from("p1"), &version(1)).is_some());
        kept.keep(path.clone(), partial(1, 1, PARTIAL_TTL + second));
        assert!(kept.take(&path, &version(1)).is_none(), "past its time");
    }
}
