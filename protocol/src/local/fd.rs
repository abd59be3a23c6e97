//! Descriptor primitives: opening beneath a held root without following symlinks, and the
//! `*at` calls every read of a tree goes through.

use super::*;

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` as the name stats `dir` itself.
pub fn lstat_at(dir: &OwnedFd, name: Option<&[u8]>) -> io::Result<libc::stat> {
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
pub(crate) fn readlink_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Vec<u8>> {
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
pub(crate) fn read_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    each_name(dir, |name| {
        names.push(name.to_vec());
        true
    })?;
    Ok(names)
}

/// The names of the held directory `dir`'s subdirectories (never a symlink to one), as its
/// entries' types say, with an `lstat` only where the filesystem gives no type.
pub(crate) fn read_subdir_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    each_entry(dir, |name, kind| {
        let is_dir = match kind {
            libc::DT_DIR => true,
            libc::DT_UNKNOWN => {
                lstat_at(dir, Some(name)).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            }
            _ => false,
        };
        if is_dir {
            names.push(name.to_vec());
        }
        true
    })?;
    Ok(names)
}

/// Whether the held directory `dir` has a child for which `accept(name, is_dir)` holds; the
/// directory is read only until the first one (a child gone since it was listed is skipped).
pub fn holds_any(dir: &OwnedFd, mut accept: impl FnMut(&[u8], bool) -> bool) -> io::Result<bool> {
    let mut found = false;
    let mut failed = None;
    each_name(dir, |name| {
        match lstat_at(dir, Some(name)) {
            Ok(st) => found = accept(name, st.st_mode & libc::S_IFMT == libc::S_IFDIR),
            // Gone since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                failed = Some(e);
                return false;
            }
        }
        !found
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// Calls `f` with each name in the held directory `dir` (without `.` and `..`) until it
/// returns false.
fn each_name(dir: &OwnedFd, mut f: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
    each_entry(dir, |name, _| f(name))
}

/// Calls `f` with each name in the held directory `dir` (without `.` and `..`) and its type
/// as the directory gives it (`DT_DIR`, `DT_UNKNOWN`, …) until it returns false.
fn each_entry(dir: &OwnedFd, mut f: impl FnMut(&[u8], u8) -> bool) -> io::Result<()> {
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
        // SAFETY: as above.
        let kind = unsafe { (*ent).d_type };
        if name != b"." && name != b".." && !f(name, kind) {
            break Ok(());
        }
    };
    // SAFETY: closes the stream and its descriptor once.
    unsafe { libc::closedir(stream) };
    result
}

/// How many entries removing `name` of the held directory `dir` takes: the entry and, for a
/// directory, everything under it (never following a symlink), counted up to `limit + 1` at
/// most (past the limit the walk stops: enough to say "more than"). 0 when it does not exist.
pub fn count_entries(dir: &OwnedFd, name: &[u8], limit: u64) -> io::Result<u64> {
    let top = match open_child(dir, name) {
        Ok(top) => top,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Gone, or a dangling name: only an lstat tells them apart.
            return Ok(lstat_at(dir, Some(name)).is_ok() as u64);
        }
        // A symlink (ELOOP) or anything but a directory is one entry.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => return Ok(1),
        Err(e) => return Err(e),
    };
    // One descriptor per level held (never one per pending directory): each level keeps its
    // names and how far it got.
    let mut count = 1u64;
    let names = read_names(&top)?;
    let mut stack = vec![(top, names.into_iter())];
    while count <= limit {
        let Some((dir, names)) = stack.last_mut() else {
            break;
        };
        let Some(child) = names.next() else {
            stack.pop();
            continue;
        };
        count += 1;
        match open_child(dir, &child) {
            Ok(sub) => {
                let names = read_names(&sub)?;
                stack.push((sub, names.into_iter()));
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(count)
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

pub(crate) fn openat2_beneath(root: &OwnedFd, path: &[u8]) -> io::Result<OwnedFd> {
    openat2(
        root,
        path,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
    )
}

/// `openat2(root, path, flags)` resolving beneath `root` through no symlink at all.
pub(crate) fn openat2(root: &OwnedFd, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
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

pub(crate) fn open_dir(at: RawFd, path: &[u8], nofollow: bool) -> io::Result<OwnedFd> {
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
pub(crate) fn parent_of<'a>(
    root: &OwnedFd,
    rel: &'a RelPath,
) -> io::Result<(OwnedFd, Option<&'a [u8]>)> {
    let parts: Vec<&[u8]> = rel.components().collect();
    match parts.split_last() {
        None => Ok((root.try_clone()?, None)),
        Some((name, ancestors)) => Ok((open_beneath(root, ancestors)?, Some(name))),
    }
}

/// Opens the regular file `name` of the held directory `dir` for reading; a symlink there is
/// refused (`O_NOFOLLOW`), and a fifo does not block the open.
pub(crate) fn open_file_at(dir: &OwnedFd, name: &[u8]) -> io::Result<std::fs::File> {
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
