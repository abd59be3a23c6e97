//! Extended attributes on disk: reading an entry's attributes and making an entry's
//! attributes equal to a list (the types are [`ferry_wire::xattr`]'s, re-exported here).
//!
//! Every call goes through a descriptor or a `/proc/self/fd/N/name` path of a held directory,
//! never following the last component (`l*xattr`), so reading and writing stay where the
//! caller's confinement put them.

pub use ferry_wire::xattr::*;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Where attributes are read or written.
#[derive(Clone, Copy, Debug)]
pub enum At<'a> {
    /// An open file (a received file before it is named).
    Fd(RawFd),
    /// A path whose last component is not followed (`/proc/self/fd/N/name` of a held
    /// directory).
    Entry(&'a Path),
    /// A path followed to its end (`/proc/self/fd/N` of a held directory itself).
    Held(&'a Path),
    /// The entry `name` of the held directory `dir`, its last component not followed: read
    /// with `listxattrat`/`getxattrat` (Linux 6.13), which cost less than resolving
    /// `/proc/self/fd/N/name` each time; older kernels (and writes) go through that path.
    Child(RawFd, &'a std::ffi::CStr),
}

/// Set once the kernel has said it has no `*xattrat` calls.
static NO_XATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `listxattrat` and `getxattrat`: the same number on every architecture (after 424, the
/// syscall tables were unified).
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_GETXATTRAT: libc::c_long = 464;

/// `struct xattr_args` of `getxattrat`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Runs an `*xattrat` call, or says `None` on a kernel without them.
fn xattrat(call: impl FnOnce() -> libc::c_long) -> Option<io::Result<usize>> {
    use std::sync::atomic::Ordering::Relaxed;
    if NO_XATTRAT.load(Relaxed) {
        return None;
    }
    match check(call() as isize) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            NO_XATTRAT.store(true, Relaxed);
            None
        }
        r => Some(r),
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn cname(n: &[u8]) -> io::Result<CString> {
    CString::new(n).map_err(io::Error::other)
}

fn check(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

impl At<'_> {
    /// `/proc/self/fd/N/name` of a [`At::Child`].
    fn child_path(dir: RawFd, name: &std::ffi::CStr) -> std::path::PathBuf {
        Path::new(&format!("/proc/self/fd/{dir}"))
            .join(std::ffi::OsStr::from_bytes(name.to_bytes()))
    }

    fn list_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        if let At::Child(dir, name) = *self {
            // SAFETY: `buf` is writable for `len` bytes; the name is NUL-terminated.
            let call = || unsafe {
                libc::syscall(
                    SYS_LISTXATTRAT,
                    dir,
                    name.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    ptr,
                    len,
                )
            };
            return match xattrat(call) {
                Some(r) => r,
                None => At::Entry(&Self::child_path(dir, name)).list_raw(buf),
            };
        }
        // SAFETY: `buf` is writable for `len` bytes; paths are NUL-terminated.
        check(unsafe {
            match *self {
                At::Fd(fd) => libc::flistxattr(fd, ptr, len),
                At::Entry(p) => libc::llistxattr(cpath(p)?.as_ptr(), ptr, len),
                At::Held(p) => libc::listxattr(cpath(p)?.as_ptr(), ptr, len),
                At::Child(..) => unreachable!("handled above"),
            }
        })
    }

    fn get_raw(&self, name: &CString, buf: &mut [u8]) -> io::Result<usize> {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        if let At::Child(dir, entry) = *self {
            let mut args = XattrArgs {
                value: ptr as u64,
                size: len.min(u32::MAX as usize) as u32,
                flags: 0,
            };
            // SAFETY: `args` points at `buf`, writable for `size` bytes; names NUL-terminated.
            let call = || unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    dir,
                    entry.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    name.as_ptr(),
                    &mut args as *mut XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            };
            return match xattrat(call) {
                Some(r) => r,
                None => At::Entry(&Self::child_path(dir, entry)).get_raw(name, buf),
            };
        }
        // SAFETY: as in `list_raw`.
        check(unsafe {
            match *self {
                At::Fd(fd) => libc::fgetxattr(fd, name.as_ptr(), ptr, len),
                At::Entry(p) => libc::lgetxattr(cpath(p)?.as_ptr(), name.as_ptr(), ptr, len),
                At::Held(p) => libc::getxattr(cpath(p)?.as_ptr(), name.as_ptr(), ptr, len),
                At::Child(..) => unreachable!("handled above"),
            }
        })
    }

    /// Sets one attribute.
    pub fn set(&self, name: &[u8], value: &[u8]) -> io::Result<()> {
        if let At::Child(dir, entry) = *self {
            return At::Entry(&Self::child_path(dir, entry)).set(name, value);
        }
        let name = cname(name)?;
        let (ptr, len) = (value.as_ptr().cast(), value.len());
        // SAFETY: `value` is readable for `len` bytes; names and paths are NUL-terminated.
        let rc = unsafe {
            match *self {
                At::Fd(fd) => libc::fsetxattr(fd, name.as_ptr(), ptr, len, 0),
                At::Entry(p) => libc::lsetxattr(cpath(p)?.as_ptr(), name.as_ptr(), ptr, len, 0),
                At::Held(p) => libc::setxattr(cpath(p)?.as_ptr(), name.as_ptr(), ptr, len, 0),
                At::Child(..) => unreachable!("handled above"),
            }
        };
        check(rc as isize).map(drop)
    }

    fn remove(&self, name: &[u8]) -> io::Result<()> {
        if let At::Child(dir, entry) = *self {
            return At::Entry(&Self::child_path(dir, entry)).remove(name);
        }
        let name = cname(name)?;
        // SAFETY: NUL-terminated name and path.
        let rc = unsafe {
            match *self {
                At::Fd(fd) => libc::fremovexattr(fd, name.as_ptr()),
                At::Entry(p) => libc::lremovexattr(cpath(p)?.as_ptr(), name.as_ptr()),
                At::Held(p) => libc::removexattr(cpath(p)?.as_ptr(), name.as_ptr()),
                At::Child(..) => unreachable!("handled above"),
            }
        };
        match check(rc as isize) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Calls `f` with a buffer until it is large enough (`ERANGE` grows it).
    fn sized(&self, mut f: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        loop {
            match f(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 => {
                    buf.resize(buf.len() * 4, 0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The attributes in `ns`. A filesystem without xattrs has none; an entry whose
    /// attributes exceed [`MAX_BYTES`] is an error naming the limit.
    pub fn read(&self, ns: Namespaces) -> io::Result<Xattrs> {
        let mut out = Xattrs {
            covers: ns,
            list: Vec::new(),
        };
        if ns.is_empty() {
            return Ok(out);
        }
        let names = match self.sized(|b| self.list_raw(b)) {
            Ok(n) => n,
            Err(e) if unsupported(&e) => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut total = 0;
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !Namespaces::of(name).is_some_and(|n| ns.contains(n)) {
                continue;
            }
            let value = match self.sized(|b| self.get_raw(&cname(name)?, b)) {
                Ok(v) => v,
                // Removed since it was listed, or not ours to read (trusted.* unprivileged).
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EPERM)) => continue,
                Err(e) => return Err(e),
            };
            total += name.len() + value.len();
            if total > MAX_BYTES {
                return Err(io::Error::other(format!(
                    "extended attributes larger than {MAX_BYTES} bytes are not carried"
                )));
            }
            out.list.push((name.to_vec(), value));
        }
        out.list.sort();
        Ok(out)
    }

    /// Makes the attributes in `want.covers ∩ keep` equal to `want`'s: removes the others
    /// there, sets those that differ. Returns `Ok(false)` if nothing had to change.
    pub fn apply(&self, want: &Xattrs, keep: Namespaces) -> io::Result<bool> {
        let ns = want.covers.intersect(keep);
        if ns.is_empty() {
            return Ok(false);
        }
        let have = self.read(ns)?;
        let mut changed = false;
        for (name, _) in have.within(ns) {
            if !want.within(ns).any(|(n, _)| n == name) {
                self.remove(name)?;
                changed = true;
            }
        }
        for (name, value) in want.within(ns) {
            if !have.within(ns).any(|(n, v)| n == name && v == value) {
                self.set(name, value)?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// True for "this filesystem (or this kind of entry) has no such attributes".
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(covers: Namespaces, list: &[(&str, &str)]) -> Xattrs {
        Xattrs {
            covers,
            list: list
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn differences_count_only_the_namespaces_compared() {
        let a = x(
            Namespaces::ALL,
            &[("system.posix_acl_access", "A"), ("user.a", "1")],
        );
        let b = x(Namespaces::ALL, &[("user.a", "1")]);
        assert!(a.differ(&b, Namespaces::ACL));
        assert!(!a.differ(&b, Namespaces::USER));
        assert!(!a.differ(&b, Namespaces::NONE));
    }

    #[test]
    fn a_peer_list_out_of_order_outside_its_namespaces_or_too_large_is_refused() {
        assert!(x(Namespaces::USER, &[("user.a", "1"), ("user.b", "2")])
            .validate()
            .is_ok());
        let unsorted = x(Namespaces::USER, &[("user.b", "1"), ("user.a", "2")]);
        assert!(unsorted.validate().unwrap_err().contains("out of order"));
        let outside = x(Namespaces::USER, &[("trusted.a", "1")]);
        assert!(outside.validate().unwrap_err().contains("outside"));
        let other = x(Namespaces::ALL, &[("system.nfs4_acl", "1")]);
        assert!(other.validate().is_err());
        let big = "v".repeat(MAX_BYTES);
        assert!(x(Namespaces::USER, &[("user.a", &big)])
            .validate()
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn a_child_of_a_held_directory_reads_like_its_proc_path_on_every_kernel() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        At::Entry(&f).set(b"user.a", b"1").unwrap();
        At::Entry(&f).set(b"user.b", &[7; 3000]).unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let held = std::fs::File::open(dir.path()).unwrap();
        let want = At::Entry(&f).read(Namespaces::USER).unwrap();
        assert_eq!(want.list.len(), 2);
        let child = |n: &std::ffi::CStr| At::Child(held.as_raw_fd(), n).read(Namespaces::USER);
        assert_eq!(child(c"f").unwrap(), want);
        assert!(
            child(c"l").unwrap().list.is_empty(),
            "the symlink, not its target"
        );
        // What a kernel without `*xattrat` gets.
        NO_XATTRAT.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(child(c"f").unwrap(), want);
        assert!(child(c"l").unwrap().list.is_empty());
    }

    #[test]
    fn apply_sets_changes_and_removes_only_within_the_kept_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let at = At::Entry(&f);
        at.set(b"user.old", b"1").unwrap();
        at.set(b"user.same", b"2").unwrap();
        let want = x(Namespaces::USER, &[("user.new", "3"), ("user.same", "2")]);
        assert!(at.apply(&want, Namespaces::ALL).unwrap());
        assert_eq!(at.read(Namespaces::USER).unwrap(), want);
        assert!(!at.apply(&want, Namespaces::ALL).unwrap(), "already equal");
        // Not kept: untouched.
        let other = x(Namespaces::USER, &[]);
        assert!(!at.apply(&other, Namespaces::ACL).unwrap());
        assert_eq!(at.read(Namespaces::USER).unwrap(), want);
    }
}
