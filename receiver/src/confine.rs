//! Confinement of peer paths to a module root. Every path a peer sends passes through
//! [`confine`] before any filesystem call.

use crate::TEMP_PREFIX;
use ferry_protocol::local;
use ferry_protocol::path::PathError;
use ferry_protocol::RelPath;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A peer path that may not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Syntactically invalid (absolute, `..`, NUL, empty component, too long).
    #[error("refused path {path:?}: {reason}")]
    Invalid {
        /// The path as sent.
        path: RelPath,
        /// Why.
        reason: PathError,
    },
    /// The path uses a name reserved for the receiver's entries in flight.
    #[error("refused path {0:?}: reserved name")]
    Reserved(RelPath),
    /// An existing ancestor on the receiver is a symlink.
    #[error("refused path {path:?}: {ancestor:?} is a symlink on the receiver")]
    SymlinkInPath {
        /// The path as sent.
        path: RelPath,
        /// The offending ancestor.
        ancestor: RelPath,
    },
    /// An existing ancestor is not a directory.
    #[error("refused path {path:?}: {ancestor:?} is not a directory")]
    NotADirectory {
        /// The path as sent.
        path: RelPath,
        /// The offending ancestor.
        ancestor: RelPath,
    },
    /// The request would replace, remove or rename the module root itself.
    #[error("refused: the module root itself cannot be replaced, removed or renamed")]
    Root,
    /// Checking an ancestor failed.
    #[error("{path:?}: {source}")]
    Io {
        /// The path as sent.
        path: RelPath,
        /// The cause.
        source: io::Error,
    },
}

/// A peer path resolved beneath a module root, held open: the directory that contains it
/// (opened without following any symlink, and never leaving the module), and its last
/// component. [`Confined::path`] names it through `/proc/self/fd`, so every later call
/// reaches exactly that directory, whatever a local user renames or swaps meanwhile; the
/// last component is then used with calls that do not follow it (`lstat`, `unlink`,
/// `rename`, `lchown`, `utimensat(AT_SYMLINK_NOFOLLOW)`, `O_NOFOLLOW`, [`chmod_nofollow`]).
#[derive(Debug, Clone)]
pub struct Confined {
    /// Shared by the entries of one directory resolved once ([`Confined::sibling`]).
    dir: Arc<OwnedFd>,
    name: Option<Vec<u8>>,
}

impl Confined {
    /// The entry, as a path through the held directory (for the root, `…/.`: the fd link
    /// itself is a symlink to `lstat`).
    pub fn path(&self) -> PathBuf {
        let dir = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        match &self.name {
            Some(n) => dir.join(std::ffi::OsStr::from_bytes(n)),
            None => dir.join("."),
        }
    }

    /// The held directory that contains the entry (the root itself for the root).
    pub fn dir(&self) -> &OwnedFd {
        &self.dir
    }

    /// The entry's name in [`Confined::dir`] (none for the root).
    pub fn name(&self) -> Option<&[u8]> {
        self.name.as_deref()
    }

    /// The entry `name` in a directory already held (resolved beneath the module by another
    /// `Confined`), without resolving it again.
    pub fn sibling(&self, name: &[u8]) -> Confined {
        Confined {
            dir: self.dir.clone(),
            name: Some(name.to_vec()),
        }
    }

    /// The entry's name for the `*at` calls on [`Confined::dir`]: `.` for the root.
    fn c_name(&self) -> io::Result<CString> {
        CString::new(self.name.as_deref().unwrap_or(b".")).map_err(io::Error::other)
    }

    /// The entry's file type bits (`S_IFMT` of its mode), `None` if it is not there: an
    /// `fstatat` that does not follow it, through the held directory (no path walk through
    /// `/proc`).
    fn kind(&self) -> Option<libc::mode_t> {
        let st = local::lstat_at(&self.dir, self.name.as_deref()).ok()?;
        Some(st.st_mode & libc::S_IFMT)
    }

    /// Whether something is there.
    pub fn exists(&self) -> bool {
        self.kind().is_some()
    }

    /// Whether the entry is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == Some(libc::S_IFDIR)
    }

    /// Creates the entry as a new regular file, open for writing, readable by its owner only
    /// (`openat` through the held directory; fails if anything is there, and never follows a
    /// symlink).
    pub fn create_new(&self) -> io::Result<std::fs::File> {
        let name = self.c_name()?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid descriptor and a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), name.as_ptr(), flags, 0o600) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened, owned by nothing else.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// Renames the entry to `to` (`renameat` through both held directories), replacing what
    /// `to` names as `rename` does.
    pub fn rename_to(&self, to: &Confined) -> io::Result<()> {
        let (from_name, to_name) = (self.c_name()?, to.c_name()?);
        // SAFETY: valid descriptors and NUL-terminated names.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                from_name.as_ptr(),
                to.dir.as_raw_fd(),
                to_name.as_ptr(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// How many entries removing this entry takes (see [`local::count_entries`]), up to
    /// `limit + 1`; the module root is never removed (0).
    pub fn count(&self, limit: u64) -> io::Result<u64> {
        match &self.name {
            Some(name) => local::count_entries(&self.dir, name, limit),
            None => Ok(0),
        }
    }
}

/// [`confine`] for requests that replace, remove or rename what is at the path: the module
/// root itself is refused.
pub fn confine_entry(root: &Path, rel: &RelPath) -> Result<Confined, ConfineError> {
    not_root(rel)?;
    confine(root, rel)
}

/// The rule for requests that replace, remove or rename what is at a path: never the module
/// root itself.
pub fn not_root(rel: &RelPath) -> Result<(), ConfineError> {
    if rel.is_root() {
        Err(ConfineError::Root)
    } else {
        Ok(())
    }
}

/// Resolves a peer's relative path beneath `root`, at the moment of use.
///
/// Refuses absolute paths, `..`, empty and `.` components, NUL bytes, over-long paths, names
/// reserved for entries in flight ([`TEMP_PREFIX`]), and any path whose ancestors include a
/// symlink or a non-directory. The ancestors are opened with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)` (Linux 5.6+), or one by one with `openat(O_NOFOLLOW | O_DIRECTORY)`
/// where that is missing, so a local user who swaps a directory for a symlink between a check
/// and a use cannot redirect anything outside the module (rsync's secure relative open). The
/// last component may be a symlink: it is replaced or removed, never followed.
pub fn confine(root: &Path, rel: &RelPath) -> Result<Confined, ConfineError> {
    let root_fd = open_root(root).map_err(|source| ConfineError::Io {
        path: rel.clone(),
        source,
    })?;
    confine_in(root, &Arc::new(root_fd), rel)
}

/// Opens a module root (followed if it is a symlink: the administrator configured it) to
/// resolve peer paths beneath it with [`confine_in`].
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    local::open_root(root)
}

/// The checks of a peer path made before any of it is resolved: a valid relative path
/// ([`RelPath::validate`]) with no name reserved for entries in flight.
pub fn acceptable(rel: &RelPath) -> Result<(), ConfineError> {
    rel.validate().map_err(|reason| ConfineError::Invalid {
        path: rel.clone(),
        reason,
    })?;
    if rel
        .components()
        .any(|c| c.starts_with(TEMP_PREFIX.as_bytes()))
    {
        return Err(ConfineError::Reserved(rel.clone()));
    }
    Ok(())
}

/// [`confine`] beneath a root opened once with [`open_root`] (`root` names it in messages).
pub fn confine_in(
    root: &Path,
    root_fd: &Arc<OwnedFd>,
    rel: &RelPath,
) -> Result<Confined, ConfineError> {
    acceptable(rel)?;
    let parts: Vec<&[u8]> = rel.components().collect();
    let Some((name, ancestors)) = parts.split_last() else {
        return Ok(Confined {
            dir: root_fd.clone(),
            name: None,
        });
    };
    let dir = if ancestors.is_empty() {
        root_fd.clone()
    } else {
        Arc::new(
            local::open_beneath(root_fd, ancestors)
                .map_err(|e| explain(root, rel, ancestors, e))?,
        )
    };
    Ok(Confined {
        dir,
        name: Some(name.to_vec()),
    })
}

/// Turns a failed resolution into the refusal that says which ancestor was the problem.
fn explain(root: &Path, rel: &RelPath, ancestors: &[&[u8]], e: io::Error) -> ConfineError {
    if local::is_not_beneath(&e) {
        // Name the culprit for the message (looked up after the fact, for the message only).
        let mut ancestor = RelPath::root();
        for part in ancestors {
            ancestor = ancestor.join(part);
            match std::fs::symlink_metadata(root.join(ancestor.as_path())) {
                Ok(md) if md.file_type().is_symlink() => {
                    return ConfineError::SymlinkInPath {
                        path: rel.clone(),
                        ancestor,
                    }
                }
                Ok(md) if !md.is_dir() => {
                    return ConfineError::NotADirectory {
                        path: rel.clone(),
                        ancestor,
                    }
                }
                _ => {}
            }
        }
        return ConfineError::SymlinkInPath {
            path: rel.clone(),
            ancestor,
        };
    }
    ConfineError::Io {
        path: rel.clone(),
        source: e,
    }
}

/// `chmod` of the entry itself, never of what a symlink there points to: the entry is opened
/// with `O_PATH | O_NOFOLLOW` and changed through its `/proc/self/fd` link (what glibc's
/// `fchmodat(AT_SYMLINK_NOFOLLOW)` does). A symlink there is refused (`EOPNOTSUPP`).
pub fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is NUL-terminated.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let link =
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io::Error::other)?;
    // SAFETY: `link` is NUL-terminated; chmod through the fd's link reaches exactly its inode.
    if unsafe { libc::chmod(link.as_ptr(), (mode & 0o7777) as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("module/sub")).unwrap();
        std::fs::write(dir.path().join("module/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("module/evil")).unwrap();
        std::os::unix::fs::symlink("sub", dir.path().join("module/inner")).unwrap();
        dir
    }

    fn check(rel: &[u8]) -> Result<Confined, ConfineError> {
        let dir = setup();
        let root = dir.path().join("module");
        confine(&root, &RelPath::from_bytes(rel.to_vec()))
    }

    #[test]
    fn plain_paths_are_accepted() {
        assert!(check(b"sub/new").is_ok());
        assert!(
            matches!(check(b"new/deeper/file"), Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound),
            "missing ancestors: the operation fails with not found"
        );
        assert!(
            check(b"evil").is_ok(),
            "the last component may be a symlink (it is replaced, not followed)"
        );
    }

    #[test]
    fn absolute_path_is_refused() {
        assert!(matches!(
            check(b"/etc/passwd"),
            Err(ConfineError::Invalid {
                reason: PathError::Absolute,
                ..
            })
        ));
    }

    #[test]
    fn dot_dot_is_refused() {
        assert!(matches!(
            check(b"../outside"),
            Err(ConfineError::Invalid {
                reason: PathError::DotDot,
                ..
            })
        ));
        assert!(matches!(
            check(b"sub/../../outside"),
            Err(ConfineError::Invalid {
                reason: PathError::DotDot,
                ..
            })
        ));
    }

    #[test]
    fn nul_and_empty_components_are_refused() {
        assert!(matches!(
            check(b"sub/a\0b"),
            Err(ConfineError::Invalid {
                reason: PathError::Nul,
                ..
            })
        ));
        assert!(matches!(
            check(b"sub//x"),
            Err(ConfineError::Invalid {
                reason: PathError::EmptyComponent,
                ..
            })
        ));
        assert!(matches!(
            check(b"./x"),
            Err(ConfineError::Invalid {
                reason: PathError::EmptyComponent,
                ..
            })
        ));
    }

    #[test]
    fn traversal_through_symlink_is_refused() {
        assert!(matches!(
            check(b"evil/passwd"),
            Err(ConfineError::SymlinkInPath { .. })
        ));
        assert!(
            matches!(check(b"inner/x"), Err(ConfineError::SymlinkInPath { .. })),
            "even one pointing inside"
        );
    }

    #[test]
    fn traversal_through_file_is_refused() {
        assert!(matches!(
            check(b"file/x"),
            Err(ConfineError::NotADirectory { .. })
        ));
    }

    #[test]
    fn the_root_is_no_entry_to_replace() {
        let dir = setup();
        assert!(matches!(
            confine_entry(dir.path(), &RelPath::root()),
            Err(ConfineError::Root)
        ));
        assert!(confine(dir.path(), &RelPath::root()).is_ok());
        assert!(confine_entry(dir.path(), &RelPath::from("d")).is_ok());
    }

    #[test]
    fn names_of_entries_in_flight_are_reserved_at_any_depth() {
        for path in [
            &b".ferry-tmp.1.2.3"[..],
            b"sub/.ferry-tmp.x",
            b".ferry-tmp.d/f",
        ] {
            assert!(
                matches!(check(path), Err(ConfineError::Reserved(_))),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
        assert!(
            !matches!(check(b".ferry-partial/x"), Err(ConfineError::Reserved(_))),
            "no longer reserved"
        );
        assert!(check(b"sub/x.ferry-tmp.").is_ok());
    }

    #[test]
    fn the_path_reaches_the_directory_that_was_resolved_even_after_a_swap() {
        let dir = setup();
        let root = dir.path().join("module");
        let c = confine(&root, &RelPath::from("sub/f")).unwrap();
        // A local user moves `sub` away and puts a symlink to /etc in its place.
        std::fs::rename(root.join("sub"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("sub")).unwrap();
        std::fs::write(c.path(), b"written").unwrap();
        assert_eq!(std::fs::read(root.join("moved/f")).unwrap(), b"written");
        assert!(!std::path::Path::new("/etc/f").exists());
        assert!(matches!(
            confine(&root, &RelPath::from("sub/g")),
            Err(ConfineError::SymlinkInPath { .. })
        ));
    }

    #[test]
    fn the_fallback_walk_refuses_symlinks_too() {
        let dir = setup();
        let root = open_root(&dir.path().join("module")).unwrap();
        assert!(local::walk_beneath(&root, &[b"sub"]).is_ok());
        // O_PATH | O_NOFOLLOW opens the link itself, which O_DIRECTORY then refuses.
        let e = local::walk_beneath(&root, &[b"evil"]).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{e}"
        );
        let e = local::walk_beneath(&root, &[b"file"]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn chmod_never_follows_a_symlink() {
        let dir = setup();
        let target = dir.path().join("outside");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let link = dir.path().join("module/link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(chmod_nofollow(&link, 0o777).is_err());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&target).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        chmod_nofollow(&dir.path().join("module/file"), 0o640).unwrap();
    }
}
