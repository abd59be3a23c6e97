//! The small filesystem pieces [`Apply`](super::Apply) is built from: declined requests, a
//! staged file, `linkat`, mtimes, the session tag of temporary names.

use crate::confine::Confined;
use ferry_protocol::meta::Meta;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A request the receiver declines as the protocol expects (a rename or hard link whose source
/// it does not have): the sender sends the content instead.
#[derive(Debug)]
struct Declined(String);

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Declined {}

pub(super) fn declined(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, Declined(what))
}

/// `e`, or `declined()` when it says the entry is missing.
pub(super) fn missing(e: io::Error, declined: impl Fn() -> io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        declined()
    } else {
        e
    }
}

/// Whether `e` is a [`declined`] request, not a failure.
pub fn is_declined(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Declined>())
}

/// A file being received, before it is put in place.
pub struct Staged {
    /// Open for writing.
    pub file: File,
    /// Its temporary name, if it has one (no `O_TMPFILE` here).
    pub name: Option<TempName>,
}

impl Staged {
    /// Drops a file that will not be put in place.
    pub fn discard(self) {
        if let Some(name) = self.name {
            let _ = fs::remove_file(name.path());
        }
    }
}

/// A staged file's temporary name, beneath a descriptor of its directory held as long as the
/// file waits: the name means the same entry at the commit, however many descriptors were
/// closed and reused in between (a `/proc/self/fd/N/…` path kept without its `N` would not).
pub struct TempName(Confined);

impl TempName {
    /// Creates a new file as the entry `at`, a reserved name in a held directory.
    pub fn create(at: Confined) -> io::Result<(File, TempName)> {
        let file = at.create_new()?;
        Ok((file, TempName(at)))
    }

    /// The entry, as a path through the held directory.
    pub fn path(&self) -> PathBuf {
        self.0.path()
    }

    /// The entry, beneath the held directory.
    pub fn at(&self) -> &Confined {
        &self.0
    }
}

/// `linkat` of an open file (through its `/proc/self/fd` entry) to the entry `at`, its
/// directory reached through the held descriptor, not a path; fails with `AlreadyExists` if
/// the name is taken.
pub(super) fn link_into(file: &std::fs::File, at: &crate::confine::Confined) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// `linkat(fd, "", AT_EMPTY_PATH)` was refused once (it needs `CAP_DAC_READ_SEARCH` on
    /// older kernels): name files through `/proc/self/fd` from then on.
    static BY_PROC: AtomicBool = AtomicBool::new(false);
    let name = at
        .name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EEXIST))?;
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    if !BY_PROC.load(Ordering::Relaxed) {
        // The descriptor itself, without a path walk through procfs.
        // SAFETY: a valid descriptor, an empty and a NUL-terminated name.
        let rc = unsafe {
            libc::linkat(
                file.as_raw_fd(),
                c"".as_ptr(),
                at.dir().as_raw_fd(),
                name.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT | libc::EPERM | libc::EINVAL) => {
                BY_PROC.store(true, Ordering::Relaxed)
            }
            _ => return Err(e),
        }
    }
    linkat_in(
        Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())),
        at.dir().as_raw_fd(),
        Path::new(std::ffi::OsStr::from_bytes(name.as_bytes())),
        libc::AT_SYMLINK_FOLLOW,
    )
}

/// `linkat` of the entry `from` (never following a symlink there) to the new name `to`.
pub(crate) fn hard_link(from: &Path, to: &Path) -> io::Result<()> {
    linkat(from, to, 0)
}

fn linkat(from: &Path, to: &Path, flags: libc::c_int) -> io::Result<()> {
    linkat_in(from, libc::AT_FDCWD, to, flags)
}

/// `linkat` of `from` to `to` in the directory `to_dir` (a descriptor, or `AT_FDCWD`).
fn linkat_in(
    from: &Path,
    to_dir: std::os::fd::RawFd,
    to: &Path,
    flags: libc::c_int,
) -> io::Result<()> {
    let cstr =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both are valid NUL-terminated paths and `to_dir` a descriptor or `AT_FDCWD`;
    // linkat has no other memory effects.
    let rc = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), to_dir, to.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an entry's mtime (and atime to the same), not following a symlink.
pub fn set_mtime(path: &Path, meta: &Meta) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(meta.mtime, meta.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t)
}

/// A random tag that keeps temporary names of concurrent sessions apart.
pub(super) fn session_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() & 0xffff_ffff
}
