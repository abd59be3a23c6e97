//! The filesystem edge shared by both daemons and `verify`: reading a local tree into
//! [`Entry`]s, hashing file contents, and the digest cache that lets `verify` skip files whose
//! digest is already known.
//!
//! Nothing here follows symlinks below the root it is given: directories are held open and
//! read through their descriptors ([`open_beneath`], `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` or a component-by-component `openat(O_NOFOLLOW)` walk), and every
//! entry is `lstat`ed through the directory that holds it. A local user who swaps a directory
//! for a symlink while a tree is read cannot make the walk leave it (rsync's secure relative
//! open); the receiver resolves its writes with the same functions.

use crate::merkle;
use crate::message::{Digest, DigestEntry};
use crate::meta::{Compare, Entry, Inode, Kind, Meta};
use crate::path::RelPath;
use crate::xattr::{At, Namespaces, Xattrs};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Decides whether a path takes part; `is_dir` tells if it is a directory. Returning `false`
/// for a directory skips its whole subtree.
pub type Filter<'a> = &'a (dyn Fn(&RelPath, bool) -> bool + Sync);

/// Accepts everything.
pub fn no_filter(_: &RelPath, _: bool) -> bool {
    true
}

/// Metadata of an `lstat` result; `None` for sockets, which are never transferred.
pub fn meta_of(md: &Metadata) -> Option<Meta> {
    meta_from(Raw {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: md.len(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        rdev: md.rdev(),
    })
}

/// [`meta_of`] for a `stat` filled in by the kernel.
fn meta_of_stat(st: &libc::stat) -> Option<Meta> {
    meta_from(Raw {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
        rdev: st.st_rdev,
    })
}

/// The fields of an `lstat` that [`Meta`] keeps, however they were read.
struct Raw {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    rdev: u64,
}

/// The one rule from an `lstat` to [`Meta`].
fn meta_from(r: Raw) -> Option<Meta> {
    let kind = match r.mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::CharDevice,
        libc::S_IFBLK => Kind::BlockDevice,
        _ => return None,
    };
    Some(Meta {
        kind,
        mode: r.mode & 0o7777,
        uid: r.uid,
        gid: r.gid,
        size: if kind == Kind::File { r.size } else { 0 },
        mtime: r.mtime,
        mtime_nsec: r.mtime_nsec as u32,
        rdev: if kind.is_special() { r.rdev } else { 0 },
        xattrs: Xattrs::default(),
    })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` as the name stats `dir` itself.
fn lstat_at(dir: &OwnedFd, name: Option<&[u8]>) -> io::Result<libc::stat> {
    let c = CString::new(name.unwrap_or(b"")).map_err(io::Error::other)?;
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_none() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `stat` is plain data that fstatat fills in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name, and a `stat` to write to.
    if unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The target of the symlink `name` in `dir`.
fn readlink_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for its length; the name is NUL-terminated.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if (n as usize) < buf.len() {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// The names in the held directory `dir` (without `.` and `..`), in the order the
/// filesystem returns them.
fn read_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: "." relative to a valid descriptor; a new descriptor is returned.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours; on success the stream owns it, on failure we close it.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: `fd` is still ours.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir reports errors only through it.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid, open directory stream.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: `d_name` is a NUL-terminated name inside the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: closes the stream and its descriptor once.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// The entry `name` of the held directory `dir` (`None`: `dir` itself) as `rel`, with its
/// attributes in `xattrs`; `Ok(None)` for a socket. Attributes that cannot be read leave the
/// entry's unmanaged (`Xattrs::default()`) and are reported in `errors`.
fn entry_at(
    dir: &OwnedFd,
    name: Option<&[u8]>,
    rel: RelPath,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Option<Entry>> {
    let st = lstat_at(dir, name)?;
    let Some(mut meta) = meta_of_stat(&st) else {
        return Ok(None);
    };
    let link = match (meta.kind, name) {
        (Kind::Symlink, Some(n)) => Some(readlink_at(dir, n)?),
        (Kind::Symlink, None) => Some(
            std::fs::read_link(fd_path(dir))?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        ),
        _ => None,
    };
    if !xattrs.is_empty() {
        let read = match name {
            Some(n) => {
                let n = CString::new(n).map_err(io::Error::other)?;
                At::Child(dir.as_raw_fd(), &n).read(xattrs)
            }
            None => At::Held(&fd_path(dir)).read(xattrs),
        };
        match read {
            Ok(x) => meta.xattrs = x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(e) => errors.push((rel.clone(), e)),
        }
    }
    let inode = (meta.kind == Kind::File && st.st_nlink > 1).then_some(Inode {
        dev: st.st_dev,
        ino: st.st_ino,
    });
    Ok(Some(Entry {
        path: rel,
        meta,
        link,
        inode,
    }))
}

/// The local path of `rel` under `root`.
pub fn local_path(root: &Path, rel: &RelPath) -> PathBuf {
    if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(rel.as_path())
    }
}

/// Opens a tree's root directory (followed if it is a symlink: the operator configured it),
/// to resolve paths beneath it with [`open_beneath`].
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    open_dir(libc::AT_FDCWD, root.as_os_str().as_bytes(), false)
}

/// Opens the directory `components` (joined) beneath `root` without following any symlink
/// and without leaving `root`: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` on Linux
/// 5.6+, else one `openat(O_NOFOLLOW | O_DIRECTORY)` per component. A symlink or a
/// non-directory on the way fails with `ELOOP`, `ENOTDIR` or `EXDEV`.
pub fn open_beneath(root: &OwnedFd, components: &[&[u8]]) -> io::Result<OwnedFd> {
    if components.is_empty() {
        return root.try_clone();
    }
    let joined = components.join(&b'/');
    match openat2_beneath(root, &joined) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => walk_beneath(root, components),
        r => r,
    }
}

/// A held descriptor as a path (`/proc/self/fd/N`): calls through it reach exactly the
/// directory that was opened, whatever is renamed or swapped meanwhile.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// True for the errors of [`open_beneath`] that mean "a symlink or a non-directory is in the
/// way" rather than a failure of the disk.
pub fn is_not_beneath(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV)
    )
}

/// Opens the regular file `rel` beneath the held root `root` for reading, at the moment of
/// use: no component may be a symlink or lead out of `root` (`openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, else one `openat(O_NOFOLLOW)` per component), and a fifo swapped in
/// does not block the open. A directory flipped into a symlink between the scan and this
/// open fails with `ELOOP`, `ENOTDIR` or `EXDEV` ([`is_not_beneath`]) instead of reading what
/// the symlink points at.
pub fn open_file_beneath(root: &OwnedFd, rel: &RelPath) -> io::Result<std::fs::File> {
    if rel.is_root() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    match openat2(root, rel.as_bytes(), flags) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            let (dir, name) = parent_of(root, rel)?;
            open_file_at(&dir, name.expect("not the root"))
        }
        r => r.map(std::fs::File::from),
    }
}

fn openat2_beneath(root: &OwnedFd, path: &[u8]) -> io::Result<OwnedFd> {
    openat2(
        root,
        path,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
    )
}

/// `openat2(root, path, flags)` resolving beneath `root` through no symlink at all.
fn openat2(root: &OwnedFd, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: `open_how` is plain data; all-zero is a valid starting value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, NUL-terminated path, and a correctly sized `open_how`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The fallback of [`open_beneath`]: one `openat(O_NOFOLLOW | O_DIRECTORY)` per component.
pub fn walk_beneath(root: &OwnedFd, components: &[&[u8]]) -> io::Result<OwnedFd> {
    let mut dir = root.try_clone()?;
    for part in components {
        dir = open_child(&dir, part)?;
    }
    Ok(dir)
}

/// Opens the child directory `name` of `dir`, never following a symlink there.
pub fn open_child(dir: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    open_dir(dir.as_raw_fd(), name, true)
}

fn open_dir(at: RawFd, path: &[u8], nofollow: bool) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(io::Error::other)?;
    let mut flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: `at` is a valid descriptor (or AT_FDCWD) and `c` is NUL-terminated.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory holding `rel` (opened beneath `root`) and `rel`'s name in it; `None` as
/// the name for the root itself.
fn parent_of<'a>(root: &OwnedFd, rel: &'a RelPath) -> io::Result<(OwnedFd, Option<&'a [u8]>)> {
    let parts: Vec<&[u8]> = rel.components().collect();
    match parts.split_last() {
        None => Ok((root.try_clone()?, None)),
        Some((name, ancestors)) => Ok((open_beneath(root, ancestors)?, Some(name))),
    }
}

/// `lstat`s one entry beneath a root held open ([`open_root`]), with its attributes in
/// `xattrs` (see [`scan`] for `errors`); `Ok(None)` if it does not exist (also when a symlink
/// or a file stands where one of its ancestors should be: the path as such is gone) or is a
/// socket.
pub fn read_entry_at(
    root: &OwnedFd,
    rel: &RelPath,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Option<Entry>> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound || is_not_beneath(e);
    let (dir, name) = match parent_of(root, rel) {
        Ok(d) => d,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    match entry_at(&dir, name, rel.clone(), xattrs, errors) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        r => r,
    }
}

/// The children of the held directory `dir` (which is `rel`), sorted by name, filtered.
/// Unreadable children are reported in `errors` and left out.
fn read_children(
    dir: &OwnedFd,
    rel: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> Vec<Entry> {
    let mut names = match read_names(dir) {
        Ok(n) => n,
        Err(e) => {
            errors.push((rel.clone(), e));
            return Vec::new();
        }
    };
    names.sort_unstable();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let child = rel.join(&name);
        match entry_at(dir, Some(&name), child.clone(), xattrs, errors) {
            Ok(Some(e)) => {
                if filter(&child, e.meta.kind == Kind::Dir) {
                    out.push(e);
                }
            }
            Ok(None) => {}
            // Gone since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push((child, e)),
        }
    }
    out
}

/// Every entry below `root` in tree order (a directory right before its contents), the root
/// itself first with the empty path, with their attributes in `xattrs`. Per-entry errors go
/// to `errors` (an entry whose attributes could not be read is kept, its attributes
/// unmanaged); an unreadable root is an error.
pub fn scan(
    root: &Path,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    scan_from(root, &RelPath::root(), filter, xattrs, errors)
}

/// Like [`scan`] for the subtree at `start` (which is listed first).
pub fn scan_from(
    root: &Path,
    start: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    scan_at(&open_root(root)?, start, filter, xattrs, errors).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found", local_path(root, start).display()),
            )
        } else {
            e
        }
    })
}

/// [`scan_from`] beneath a root held open. A symlink or a file where `start` or one of its
/// ancestors should be makes it `NotADirectory`.
pub fn scan_at(
    root: &OwnedFd,
    start: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    let not_dir = |e: io::Error| {
        if is_not_beneath(&e) {
            io::Error::new(io::ErrorKind::NotADirectory, e)
        } else {
            e
        }
    };
    let Some(top) = read_entry_at(root, start, xattrs, errors)? else {
        return Err(io::ErrorKind::NotFound.into());
    };
    let is_dir = top.meta.kind == Kind::Dir;
    let mut out = vec![top];
    if is_dir {
        let parts: Vec<&[u8]> = start.components().collect();
        let dir = open_beneath(root, &parts).map_err(not_dir)?;
        walk(&dir, start, filter, xattrs, errors, &mut out);
    }
    Ok(out)
}

/// Appends the subtree of the held directory `dir` (which is `rel`) in tree order. Each
/// directory below is opened through its parent's descriptor without following symlinks, so
/// the walk holds one descriptor per level.
fn walk(
    dir: &OwnedFd,
    rel: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
    out: &mut Vec<Entry>,
) {
    for child in read_children(dir, rel, filter, xattrs, errors) {
        let is_dir = child.meta.kind == Kind::Dir;
        let path = child.path.clone();
        out.push(child);
        if is_dir {
            match open_child(dir, path.file_name()) {
                Ok(sub) => walk(&sub, &path, filter, xattrs, errors, out),
                // Gone since it was listed: its entry stays, its contents are unknown.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push((path, e)),
            }
        }
    }
}

/// Opens the regular file `name` of the held directory `dir` for reading; a symlink there is
/// refused (`O_NOFOLLOW`), and a fifo does not block the open.
fn open_file_at(dir: &OwnedFd, name: &[u8]) -> io::Result<std::fs::File> {
    let c = CString::new(name).map_err(io::Error::other)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// blake3 of everything `f` reads.
fn digest_of(f: &mut std::fs::File) -> io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct CacheKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl CacheKey {
    fn of(st: &libc::stat) -> Self {
        CacheKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec,
        }
    }

    fn recent(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        let limit = now - DigestCache::SETTLE_SECS as i128 * 1_000_000_000;
        ns(self.ctime, self.ctime_nsec) >= limit || ns(self.mtime, self.mtime_nsec) >= limit
    }
}

/// Entries and file bytes a [`DigestTree`] walk has been through so far, readable from
/// another thread (for progress).
#[derive(Debug, Default)]
pub struct Tally {
    /// Entries visited.
    pub entries: std::sync::atomic::AtomicU64,
    /// Sizes of the files visited.
    pub bytes: std::sync::atomic::AtomicU64,
}

/// Content digests remembered by path, valid while the file's inode, size, mtime *and ctime*
/// are unchanged. ctime cannot be set from user space, so a content change (even one that
/// restores size and mtime) invalidates the entry. Files changed in the last
/// [`DigestCache::SETTLE_SECS`] seconds are hashed but not remembered, because a second write
/// within one clock tick could leave ctime unchanged.
pub struct DigestCache {
    map: HashMap<RelPath, (CacheKey, Digest)>,
    file: Option<PathBuf>,
    dirty: bool,
    /// Files hashed (not served from the cache) since creation.
    pub hashed: u64,
    /// Files served from the cache since creation.
    pub hits: u64,
    /// Counts what walks through this cache visit, if set.
    pub tally: Option<std::sync::Arc<Tally>>,
}

impl DigestCache {
    /// How recent a change must be for its digest not to be cached.
    pub const SETTLE_SECS: i64 = 2;

    /// A cache that lives only in memory.
    pub fn in_memory() -> Self {
        DigestCache {
            map: HashMap::new(),
            file: None,
            dirty: false,
            hashed: 0,
            hits: 0,
            tally: None,
        }
    }

    /// A cache persisted in `file`; a missing or unreadable file starts empty.
    pub fn open(file: PathBuf) -> Self {
        let map = std::fs::read(&file)
            .ok()
            .and_then(|bytes| {
                let config = bincode::config::standard();
                bincode::serde::decode_from_slice::<Vec<(RelPath, CacheKey, Digest)>, _>(
                    &bytes, config,
                )
                .ok()
            })
            .map(|(v, _)| v.into_iter().map(|(p, k, d)| (p, (k, d))).collect())
            .unwrap_or_default();
        DigestCache {
            map,
            file: Some(file),
            dirty: false,
            hashed: 0,
            hits: 0,
            tally: None,
        }
    }

    /// Writes the cache back atomically if it changed.
    pub fn save(&mut self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let v: Vec<(&RelPath, &CacheKey, &Digest)> =
            self.map.iter().map(|(p, (k, d))| (p, k, d)).collect();
        let bytes = bincode::serde::encode_to_vec(&v, bincode::config::standard())
            .map_err(io::Error::other)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, file)?;
        self.dirty = false;
        Ok(())
    }

    /// The digest of the regular file `rel`, which is `name` in the held directory `dir`,
    /// from the cache when the file is unchanged, else by reading it. `checksum` forces a read.
    pub fn digest(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        rel: &RelPath,
        checksum: bool,
    ) -> io::Result<Digest> {
        let key = CacheKey::of(&lstat_at(dir, Some(name))?);
        if !checksum {
            if let Some((k, d)) = self.map.get(rel) {
                if *k == key {
                    self.hits += 1;
                    return Ok(*d);
                }
            }
        }
        let digest = digest_of(&mut open_file_at(dir, name)?)?;
        self.hashed += 1;
        // Re-stat: if the file changed while we read it, do not remember the result.
        if CacheKey::of(&lstat_at(dir, Some(name))?) == key && !key.recent() {
            self.map.insert(rel.clone(), (key, digest));
            self.dirty = true;
        }
        Ok(digest)
    }

    /// Drops entries whose path is not in `keep` (after a full walk).
    pub fn retain(&mut self, keep: impl Fn(&RelPath) -> bool) {
        let before = self.map.len();
        self.map.retain(|p, _| keep(p));
        self.dirty |= self.map.len() != before;
    }
}

/// One directory of a [`DigestTree`].
#[derive(Debug, Clone)]
pub struct DirListing {
    /// The directory itself, with its content digest.
    pub dir: DigestEntry,
    /// Its children sorted by name, each with its content digest.
    pub entries: Vec<DigestEntry>,
}

/// A whole tree with a digest on every entry (see [`crate::merkle`]).
pub struct DigestTree {
    /// Listings by directory path.
    pub dirs: HashMap<RelPath, DirListing>,
}

impl DigestTree {
    /// Walks `root`, hashing files through `cache`. Unreadable entries are reported in
    /// `errors` and take part with a zero digest, so they show up as differences. Attributes
    /// in `cmp.xattrs` are read; with `cmp.hardlinks` every file with two or more names in
    /// the tree carries the first of them.
    pub fn build(
        root: &Path,
        filter: Filter<'_>,
        cache: &mut DigestCache,
        cmp: Compare,
        checksum: bool,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> io::Result<DigestTree> {
        let root_fd = open_root(root)?;
        let Some(top) = read_entry_at(&root_fd, &RelPath::root(), cmp.xattrs, errors)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found", root.display()),
            ));
        };
        let mut tree = DigestTree {
            dirs: HashMap::new(),
        };
        let mut live = Vec::new();
        let mut names = HashMap::new();
        let mut at = Visit {
            filter,
            cache,
            cmp,
            checksum,
            errors,
            live: &mut live,
            names: &mut names,
        };
        tree.visit(&root_fd, None, top, &mut at);
        let live: std::collections::HashSet<RelPath> = live.into_iter().collect();
        cache.retain(|p| live.contains(p));
        tree.seal(cmp, &names);
        Ok(tree)
    }

    /// The root listing.
    pub fn root(&self) -> &DirListing {
        &self.dirs[&RelPath::root()]
    }

    /// Reads `entry`, which is `name` in the held directory `parent` (`None`: `parent` itself,
    /// the root), with its content digest; a directory's listing is recorded and its digest
    /// left for [`DigestTree::seal`].
    fn visit(
        &mut self,
        parent: &OwnedFd,
        name: Option<&[u8]>,
        entry: Entry,
        at: &mut Visit<'_>,
    ) -> DigestEntry {
        if let Some(t) = &at.cache.tally {
            use std::sync::atomic::Ordering::Relaxed;
            t.entries.fetch_add(1, Relaxed);
            if entry.meta.kind == Kind::File {
                t.bytes.fetch_add(entry.meta.size, Relaxed);
            }
        }
        if let Some(inode) = entry.inode.filter(|_| at.cmp.hardlinks) {
            let first = at.names.entry(inode).or_insert((entry.path.clone(), 0));
            first.1 += 1;
        }
        let digest = match entry.meta.kind {
            Kind::File => {
                at.live.push(entry.path.clone());
                let name = name.unwrap_or(b".");
                match at.cache.digest(parent, name, &entry.path, at.checksum) {
                    Ok(d) => d,
                    Err(e) => {
                        at.errors.push((entry.path.clone(), e));
                        [0; 32]
                    }
                }
            }
            Kind::Symlink => merkle::link_digest(entry.link.as_deref().unwrap_or_default()),
            Kind::Dir => {
                let opened = match name {
                    Some(n) => open_child(parent, n),
                    None => parent.try_clone(),
                };
                let (dir, children) = match opened {
                    Ok(dir) => {
                        let children =
                            read_children(&dir, &entry.path, at.filter, at.cmp.xattrs, at.errors);
                        (Some(dir), children)
                    }
                    Err(e) => {
                        at.errors.push((entry.path.clone(), e));
                        (None, Vec::new())
                    }
                };
                let entries: Vec<DigestEntry> = children
                    .into_iter()
                    .map(|c| {
                        let dir = dir.as_ref().expect("children come from an open directory");
                        let child_name = c.path.file_name().to_vec();
                        self.visit(dir, Some(&child_name), c, at)
                    })
                    .collect();
                let dir = DigestEntry {
                    entry: entry.clone(),
                    digest: [0; 32],
                    hardlink: None,
                };
                self.dirs
                    .insert(entry.path.clone(), DirListing { dir, entries });
                [0; 32]
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => [0; 32],
        };
        DigestEntry {
            entry,
            digest,
            hardlink: None,
        }
    }

    /// Gives files their first names (`names`: inode → first name and count) and every
    /// directory its digest, deepest first.
    fn seal(&mut self, cmp: Compare, names: &HashMap<Inode, (RelPath, u32)>) {
        let mut order: Vec<RelPath> = self.dirs.keys().cloned().collect();
        order.sort_by_key(|p| std::cmp::Reverse(p.depth()));
        for path in order {
            let mut listing = self.dirs.remove(&path).expect("listed above");
            for e in &mut listing.entries {
                if cmp.hardlinks {
                    e.hardlink = e
                        .entry
                        .inode
                        .and_then(|i| names.get(&i))
                        .filter(|(_, count)| *count > 1)
                        .map(|(first, _)| first.clone());
                }
                if e.entry.meta.kind == Kind::Dir {
                    if let Some(sub) = self.dirs.get(&e.entry.path) {
                        e.digest = sub.dir.digest;
                    }
                }
            }
            let child_digests: Vec<Digest> = listing
                .entries
                .iter()
                .map(|e| merkle::entry_digest(e, cmp))
                .collect();
            listing.dir.digest = merkle::dir_content_digest(child_digests.iter());
            self.dirs.insert(path, listing);
        }
    }
}

/// What a [`DigestTree`] walk carries along.
struct Visit<'a> {
    filter: Filter<'a>,
    cache: &'a mut DigestCache,
    cmp: Compare,
    checksum: bool,
    errors: &'a mut Vec<(RelPath, io::Error)>,
    live: &'a mut Vec<RelPath>,
    /// Inode of each file with several names → its first name in tree order and how many
    /// names the tree holds.
    names: &'a mut HashMap<Inode, (RelPath, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_is_in_tree_order_and_filters_subtrees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("skip/deep")).unwrap();
        std::fs::write(root.join("a-b"), b"x").unwrap();
        std::fs::write(root.join("a/b/f"), b"y").unwrap();
        std::os::unix::fs::symlink("a-b", root.join("link")).unwrap();
        let filter = |p: &RelPath, _: bool| p.as_bytes() != b"skip";
        let mut errors = Vec::new();
        let entries = scan(root, &filter, Namespaces::NONE, &mut errors).unwrap();
        let paths: Vec<String> = entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, vec![".", "a", "a/b", "a/b/f", "a-b", "link"]);
        assert_eq!(entries[5].link.as_deref(), Some(&b"a-b"[..]));
        assert!(errors.is_empty());
    }

    #[test]
    fn cache_serves_unchanged_files_and_notices_same_size_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let f = root.join("f");
        std::fs::write(&f, b"hello").unwrap();
        // Make the file look old so its digest may be cached.
        let old = filetime::FileTime::from_unix_time(1_000_000, 0);
        filetime_set(&f, old);
        let mut cache = DigestCache::in_memory();
        let rel = RelPath::from("f");
        let held = open_root(root).unwrap();
        let d1 = cache.digest(&held, b"f", &rel, false).unwrap();
        let d2 = cache.digest(&held, b"f", &rel, false).unwrap();
        assert_eq!(d1, d2);
        // ctime is recent (we just set mtime), so the entry must not have been cached.
        assert_eq!(cache.hashed, 2);
    }

    fn filetime_set(p: &Path, t: filetime::FileTime) {
        filetime::set_file_mtime(p, t).unwrap();
    }
}
