//! Confinement of peer paths to a module root. Every path a peer sends passes through
//! [`confine`] before any filesystem call.

use crate::TEMP_PREFIX;
use ferry_protocol::path::PathError;
use ferry_protocol::RelPath;
use std::io;
use std::path::{Path, PathBuf};

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

/// [`confine`] for requests that replace, remove or rename what is at the path: the module
/// root itself is refused.
pub fn confine_entry(root: &Path, rel: &RelPath) -> Result<PathBuf, ConfineError> {
    if rel.is_root() {
        return Err(ConfineError::Root);
    }
    confine(root, rel)
}

/// Maps a peer's relative path to a local path under `root`.
///
/// Refuses absolute paths, `..`, empty and `.` components, NUL bytes, over-long paths, names
/// reserved for entries in flight ([`TEMP_PREFIX`]), and any path whose existing ancestors include a symlink or a
/// non-directory. The last component itself may be a symlink: callers operate on it with
/// `lstat`/`unlink`/`rename`, never through it. Ancestors that do not exist yet are fine; the
/// operation then fails with "not found" on its own.
///
/// The receiver is the only writer of a module, so the check is not raced by the peer; a local
/// user with write access to the module could race it, as with rsyncd.
pub fn confine(root: &Path, rel: &RelPath) -> Result<PathBuf, ConfineError> {
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
    let mut local = root.to_path_buf();
    let mut ancestor = RelPath::root();
    let parts: Vec<&[u8]> = rel.components().collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        ancestor = ancestor.join(part);
        local.push(RelPath::from_bytes(part.to_vec()).as_path());
        match std::fs::symlink_metadata(&local) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(ConfineError::SymlinkInPath {
                    path: rel.clone(),
                    ancestor,
                });
            }
            Ok(md) if !md.is_dir() => {
                return Err(ConfineError::NotADirectory {
                    path: rel.clone(),
                    ancestor,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(source) => {
                return Err(ConfineError::Io {
                    path: rel.clone(),
                    source,
                })
            }
        }
    }
    Ok(if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(rel.as_path())
    })
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

    fn check(rel: &[u8]) -> Result<PathBuf, ConfineError> {
        let dir = setup();
        let root = dir.path().join("module");
        confine(&root, &RelPath::from_bytes(rel.to_vec()))
    }

    #[test]
    fn plain_paths_are_accepted() {
        assert!(check(b"sub/new").is_ok());
        assert!(check(b"new/deeper/file").is_ok());
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
        assert!(check(b".ferry-partial/x").is_ok(), "no longer reserved");
        assert!(check(b"sub/x.ferry-tmp.").is_ok());
    }
}
