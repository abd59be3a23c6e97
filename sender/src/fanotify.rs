//! The fanotify watcher backend: one `FAN_MARK_FILESYSTEM` mark per filesystem under a sync
//! group's source, so start-up costs the same whatever the tree's size, no directory needs a
//! watch of its own, and a new directory's first files cannot be missed.
//!
//! Events come with the handle of the directory they happened in and the entry's name
//! (`FAN_REPORT_DFID_NAME`; a rename as one event with both ends, `FAN_RENAME`). A directory
//! handle is turned into a path with `open_by_handle_at` and `/proc/self/fd`, remembered per
//! handle (inside the source, or not) so the events of the rest of a busy filesystem cost a
//! hash lookup each. Any directory renamed anywhere on a marked filesystem may move what a
//! remembered handle stands for, so the memory is cleared then.
//!
//! The events are handed to the group's router as `notify` events, the same as inotify's, so
//! one router and one set of rules ([`crate::route`]) serve both backends.
//!
//! Needs Linux 5.17 (`FAN_RENAME`), `CAP_SYS_ADMIN` (filesystem marks) and
//! `CAP_DAC_READ_SEARCH` (`open_by_handle_at`).

use notify::event::{AccessKind, AccessMode, CreateKind, Flag, ModifyKind};
use notify::event::{DataChange, MetadataKind, RemoveKind, RenameMode};
use notify::{Event, EventHandler, EventKind};
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a mark asks for.
const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_RENAME
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// Directory handles remembered at most; past it the memory starts again.
pub const HANDLE_CACHE: usize = 65_536;

/// How long the reader blocks before looking for a stop.
const POLL_MS: i32 = 200;

/// After a read whose events all lay outside the source, the reader waits this long before
/// the next, so churn elsewhere on the filesystem is read in batches (a few system calls per
/// thousand events instead of two per event). A change in the source arriving amid such
/// churn waits at most this much longer; with no churn, nothing waits.
const CHURN_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// The `notify` attribute info that marks an event on a directory (inotify's router learns
/// that from its watch list; fanotify says so with `FAN_ONDIR`).
pub const ON_DIR: &str = "ferry:dir";

/// Why fanotify cannot watch every one of `sources` from this process, if it cannot.
pub fn unavailable(sources: &[&Path]) -> Option<String> {
    let fd = match init() {
        Ok(fd) => fd,
        Err(e) => {
            return Some(match e.raw_os_error() {
                Some(libc::EPERM) => "needs CAP_SYS_ADMIN".into(),
                Some(libc::EINVAL) => "needs Linux 5.9 or later (FAN_REPORT_DFID_NAME)".into(),
                Some(libc::ENOSYS) => "is not in this kernel".into(),
                _ => format!("cannot start: {e}"),
            })
        }
    };
    for source in sources {
        let Ok(c) = CString::new(source.as_os_str().as_bytes()) else {
            continue;
        };
        // A missing source is refused elsewhere; only what fanotify itself says counts here.
        if !source.exists() {
            continue;
        }
        if let Err(e) = mark(&fd, &c) {
            let shown = source.display();
            return Some(match e.raw_os_error() {
                Some(libc::EINVAL) => "needs Linux 5.17 or later (FAN_RENAME)".into(),
                Some(libc::EPERM) => "needs CAP_SYS_ADMIN".into(),
                Some(libc::EXDEV) | Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) => {
                    format!("cannot watch {shown}: its filesystem has no file handles")
                }
                _ => format!("cannot watch {shown}: {e}"),
            });
        }
    }
    None
}

/// Marks the filesystem `path` is on.
fn mark(fd: &OwnedFd, path: &CStr) -> io::Result<()> {
    // SAFETY: a valid fanotify descriptor and a NUL-terminated path.
    let r = unsafe {
        libc::fanotify_mark(
            fd.as_raw_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            MASK,
            libc::AT_FDCWD,
            path.as_ptr(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn init() -> io::Result<OwnedFd> {
    // SAFETY: plain flags; the result is checked.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_REPORT_DFID_NAME,
            (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fanotify_init returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mount points at or below `source` (the source's own mount included), from
/// `/proc/self/mountinfo`.
fn mounts_under(source: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![source.to_path_buf()];
    };
    let mut out = vec![source.to_path_buf()];
    for line in text.lines() {
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let point = PathBuf::from(OsStr::from_bytes(&unescape(point)));
        if point.starts_with(source) && point != source {
            out.push(point);
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// One marked filesystem: its id in events, and a directory on it to resolve handles with.
struct Marked {
    fsid: [i32; 2],
    mount: OwnedFd,
    dev: u64,
}

/// A running fanotify reader for one source tree.
pub struct FanWatch {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Device numbers of the marked filesystems, to notice the source remounted.
    pub devices: Vec<u64>,
}

impl FanWatch {
    /// Marks every filesystem under `source` and starts reading; events whose path is at or
    /// below `source` go to `handler` with paths under `source` as given.
    pub fn start<H: EventHandler>(source: &Path, handler: H) -> io::Result<FanWatch> {
        let fd = init()?;
        let real = source.canonicalize()?;
        let mut marked = Vec::new();
        for point in mounts_under(&real) {
            let c = CString::new(point.as_os_str().as_bytes()).map_err(io::Error::other)?;
            if let Err(e) = mark(&fd, &c) {
                if point == real {
                    return Err(e);
                }
                // A mount below the source that cannot be marked (a pseudo filesystem):
                // its changes are found by whole compares only.
                tracing::warn!(mount = %point.display(), "cannot watch with fanotify: {e}");
                continue;
            }
            let mount = open_dir(&c)?;
            let (fsid, dev) = ids(&mount)?;
            if !marked.iter().any(|m: &Marked| m.fsid == fsid) {
                marked.push(Marked { fsid, mount, dev });
            }
        }
        let devices = marked.iter().map(|m| m.dev).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = Reader {
            fd,
            marked,
            real,
            given: source.to_path_buf(),
            cache: HashMap::new(),
            key: Vec::with_capacity(160),
            delivered: 0,
            cookie: 0,
            handler,
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || reader.run(&s))?;
        Ok(FanWatch {
            thread: Some(thread),
            stop,
            devices,
        })
    }
}

impl Drop for FanWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A directory held open for `open_by_handle_at` (which refuses `O_PATH` descriptors).
fn open_dir(c: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The filesystem id events carry (`statfs`'s `f_fsid`) and the device number of `fd`.
fn ids(fd: &OwnedFd) -> io::Result<([i32; 2], u64)> {
    let mut sfs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the buffer we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), sfs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded.
    let sfs = unsafe { sfs.assume_init() };
    // SAFETY: fsid_t is two ints, as the kernel writes them.
    let fsid: [i32; 2] = unsafe { std::mem::transmute(sfs.f_fsid) };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded.
    Ok((fsid, unsafe { st.assume_init() }.st_dev))
}

struct Reader<H> {
    fd: OwnedFd,
    marked: Vec<Marked>,
    /// The source as the kernel names it (symlinks resolved).
    real: PathBuf,
    /// The source as configured (events are handed on under this).
    given: PathBuf,
    /// Directory handle → where it is.
    cache: HashMap<Vec<u8>, Place>,
    /// The key being looked up (reused: no allocation per event).
    key: Vec<u8>,
    /// Events handed on from the current read.
    delivered: usize,
    cookie: usize,
    handler: H,
}

/// Where a directory is, as far as a source is concerned.
#[derive(Debug, Clone)]
enum Place {
    /// At or below the source: its path relative to it.
    Inside(PathBuf),
    /// The source's parent: only the entry that is the source itself matters (the source
    /// removed or moved away).
    Parent,
    /// Elsewhere, or gone.
    Outside,
}

/// One directory-entry record of an event: the directory's handle and the entry's name.
struct Record<'a> {
    fsid: [i32; 2],
    /// `handle_bytes`, `handle_type` and the handle, as `struct file_handle` lays them out.
    handle: &'a [u8],
    name: &'a [u8],
}

impl<H: EventHandler> Reader<H> {
    fn run(&mut self, stop: &AtomicBool) {
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                self.handler.handle_event(Err(notify::Error::io(e)));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            self.delivered = 0;
            self.events(&buf[..n as usize]);
            if self.delivered == 0 {
                std::thread::sleep(CHURN_PAUSE);
            }
        }
    }

    /// Walks the events in `buf`.
    fn events(&mut self, mut buf: &[u8]) {
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        while buf.len() >= meta_len {
            // SAFETY: at least one header's bytes; read unaligned.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            let len = meta.event_len as usize;
            if len < meta_len || len > buf.len() {
                break;
            }
            if meta.fd >= 0 {
                // Not asked for, but never leak one.
                // SAFETY: the kernel gave us this descriptor.
                drop(unsafe { OwnedFd::from_raw_fd(meta.fd) });
            }
            let body = &buf[meta.metadata_len as usize..len];
            self.event(meta.mask, body);
            buf = &buf[len..];
        }
    }

    /// One event: its mask and its info records.
    fn event(&mut self, mask: u64, mut info: &[u8]) {
        tracing::trace!(
            mask = format!("{mask:#x}"),
            info = info.len(),
            "fanotify event"
        );
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            let ev = Event::new(EventKind::Other).set_flag(Flag::Rescan);
            self.delivered += 1;
            self.handler.handle_event(Ok(ev));
            return;
        }
        let (mut plain, mut old, mut new) = (None, None, None);
        let hdr_len = std::mem::size_of::<libc::fanotify_event_info_header>();
        while info.len() >= hdr_len {
            let kind = info[0];
            let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
            if len < hdr_len || len > info.len() {
                break;
            }
            let record = parse_record(&info[..len]);
            match kind {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME => plain = record,
                libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => old = record,
                libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => new = record,
                _ => {}
            }
            info = &info[len..];
        }
        let on_dir = mask & libc::FAN_ONDIR != 0;
        if mask & libc::FAN_RENAME != 0 {
            if on_dir {
                // What any remembered directory stands for may have moved.
                self.cache.clear();
            }
            let from = old.and_then(|r| self.path(&r));
            let to = new.and_then(|r| self.path(&r));
            self.cookie = self.cookie.wrapping_add(1);
            let cookie = self.cookie;
            if let Some(from) = from {
                let kind = EventKind::Modify(ModifyKind::Name(RenameMode::From));
                self.send(kind, from, Some(cookie), on_dir);
            }
            if let Some(to) = to {
                let kind = EventKind::Modify(ModifyKind::Name(RenameMode::To));
                self.send(kind, to, Some(cookie), on_dir);
            }
            return;
        }
        let Some(path) = plain.and_then(|r| self.path(&r)) else {
            return;
        };
        // One event may carry several masks (the kernel merges); in the order they happen.
        if mask & libc::FAN_CREATE != 0 {
            let kind = if on_dir {
                CreateKind::Folder
            } else {
                CreateKind::File
            };
            self.send(EventKind::Create(kind), path.clone(), None, on_dir);
        }
        if mask & libc::FAN_MODIFY != 0 {
            let kind = EventKind::Modify(ModifyKind::Data(DataChange::Content));
            self.send(kind, path.clone(), None, on_dir);
        }
        if mask & libc::FAN_ATTRIB != 0 {
            let kind = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any));
            self.send(kind, path.clone(), None, on_dir);
        }
        if mask & libc::FAN_CLOSE_WRITE != 0 {
            let kind = EventKind::Access(AccessKind::Close(AccessMode::Write));
            self.send(kind, path.clone(), None, on_dir);
        }
        if mask & libc::FAN_DELETE != 0 {
            let kind = if on_dir {
                RemoveKind::Folder
            } else {
                RemoveKind::File
            };
            self.send(EventKind::Remove(kind), path, None, on_dir);
        }
    }

    fn send(&mut self, kind: EventKind, path: PathBuf, cookie: Option<usize>, on_dir: bool) {
        let mut ev = Event::new(kind).add_path(path);
        if let Some(c) = cookie {
            ev = ev.set_tracker(c);
        }
        if on_dir {
            ev = ev.set_info(ON_DIR);
        }
        self.delivered += 1;
        self.handler.handle_event(Ok(ev));
    }

    /// The path (under the configured source) of a record's entry, if it is at or below the
    /// source.
    fn path(&mut self, r: &Record<'_>) -> Option<PathBuf> {
        self.key.clear();
        self.key.extend_from_slice(&r.fsid[0].to_ne_bytes());
        self.key.extend_from_slice(&r.fsid[1].to_ne_bytes());
        self.key.extend_from_slice(r.handle);
        let place = match self.cache.get(self.key.as_slice()) {
            Some(Place::Outside) => return None,
            Some(p) => p.clone(),
            None => {
                let p = self.resolve(r);
                if self.cache.len() >= HANDLE_CACHE {
                    self.cache.clear();
                }
                self.cache.insert(self.key.clone(), p.clone());
                p
            }
        };
        let name = OsStr::from_bytes(r.name);
        match place {
            // `.` (or no name): the event is on the directory itself.
            Place::Inside(dir) if matches!(r.name, b"" | b".") => Some(self.given.join(dir)),
            Place::Inside(dir) => Some(self.given.join(dir).join(name)),
            Place::Parent if self.real.file_name() == Some(name) => Some(self.given.clone()),
            Place::Parent | Place::Outside => None,
        }
    }

    /// Where the directory a handle stands for is.
    fn resolve(&self, r: &Record<'_>) -> Place {
        self.locate(r).unwrap_or(Place::Outside)
    }

    fn locate(&self, r: &Record<'_>) -> Option<Place> {
        let m = self.marked.iter().find(|m| m.fsid == r.fsid)?;
        // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
        let mut handle = r.handle.to_vec();
        // SAFETY: `handle` holds a whole file_handle as the kernel gave it; the kernel
        // reads handle_bytes and that many bytes after the header.
        let fd = unsafe {
            libc::open_by_handle_at(
                m.mount.as_raw_fd(),
                handle.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::trace!("open_by_handle_at: {}", io::Error::last_os_error());
            return None;
        }
        // SAFETY: open_by_handle_at returned a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        tracing::trace!(path = %path.display(), "directory handle resolved");
        if path.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        if Some(path.as_path()) == self.real.parent() {
            return Some(Place::Parent);
        }
        path.strip_prefix(&self.real)
            .ok()
            .map(|rel| Place::Inside(rel.to_path_buf()))
    }
}

/// A `struct fanotify_event_info_fid` record followed by its name.
fn parse_record(rec: &[u8]) -> Option<Record<'_>> {
    // header (4) + fsid (8) + file_handle { handle_bytes u32, handle_type i32, bytes } + name
    if rec.len() < 4 + 8 + 8 {
        return None;
    }
    let fsid = [
        i32::from_ne_bytes(rec[4..8].try_into().ok()?),
        i32::from_ne_bytes(rec[8..12].try_into().ok()?),
    ];
    let handle_bytes = u32::from_ne_bytes(rec[12..16].try_into().ok()?) as usize;
    let end = 12 + 8 + handle_bytes;
    if end > rec.len() {
        return None;
    }
    let handle = &rec[12..end];
    let rest = &rec[end..];
    let name = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
    Some(Record { fsid, handle, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/mnt/my\040disk"), b"/mnt/my disk");
        assert_eq!(unescape(r"/a\134b"), b"/a\\b");
        assert_eq!(unescape("/plain"), b"/plain");
    }
}
