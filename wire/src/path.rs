//! Relative paths as they travel between peers.
//!
//! A [`RelPath`] is a byte string of `/`-separated components, relative to a sync root or a
//! module root; the empty path is the root itself. Unix file names are bytes, not UTF-8, so
//! the wire carries bytes. [`RelPath::validate`] is the syntactic half of confinement: the
//! receiver additionally refuses traversal through symlinks (see `ferry_receiver::confine`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest path accepted from a peer, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component accepted from a peer, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// A relative, `/`-separated path; empty means the root.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelPath(#[serde(with = "crate::byte_buf")] Vec<u8>);

/// Why a peer's path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path starts with `/`.
    #[error("absolute path")]
    Absolute,
    /// A component is `..`.
    #[error("`..` component")]
    DotDot,
    /// A component is `.` or empty (`a//b`, trailing `/`).
    #[error("empty or `.` component")]
    EmptyComponent,
    /// The path contains a NUL byte.
    #[error("NUL byte in path")]
    Nul,
    /// The path or one of its components is too long.
    #[error("path too long")]
    TooLong,
}

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Wraps bytes without checking them; call [`RelPath::validate`] on anything from a peer.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        RelPath(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True for the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks that the path is relative, normalised and free of `..`, NUL and empty parts.
    pub fn validate(&self) -> Result<(), PathError> {
        if self.0.is_empty() {
            return Ok(());
        }
        if self.0.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        if self.0.contains(&0) {
            return Err(PathError::Nul);
        }
        if self.0[0] == b'/' {
            return Err(PathError::Absolute);
        }
        for part in self.0.split(|&b| b == b'/') {
            match part {
                b"" | b"." => return Err(PathError::EmptyComponent),
                b".." => return Err(PathError::DotDot),
                p if p.len() > MAX_NAME_LEN => return Err(PathError::TooLong),
                _ => {}
            }
        }
        Ok(())
    }

    /// Appends one component.
    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath(v)
    }

    /// The components, root first.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].to_vec())),
            None => Some(RelPath::root()),
        }
    }

    /// The directories above `self`, nearest first, ending with the root.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> {
        std::iter::successors(self.parent(), RelPath::parent)
    }

    /// The last component; empty for the root.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// `self` with its leading `from` replaced by `to` (`self` must start with `from`).
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> RelPath {
        debug_assert!(self.starts_with(from));
        let rest = &self.0[from.0.len()..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            to.clone()
        } else if to.0.is_empty() {
            RelPath(rest.to_vec())
        } else {
            let mut v = to.0.clone();
            v.push(b'/');
            v.extend_from_slice(rest);
            RelPath(v)
        }
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// The path as an `OsStr`-backed path, for joining onto a local root.
    pub fn as_path(&self) -> &std::path::Path {
        use std::os::unix::ffi::OsStrExt;
        std::path::Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// Builds a `RelPath` from a relative local path.
    pub fn from_path(p: &std::path::Path) -> RelPath {
        use std::os::unix::ffi::OsStrExt;
        let bytes = p.as_os_str().as_bytes();
        let trimmed = bytes.strip_prefix(b"./").unwrap_or(bytes);
        RelPath(trimmed.to_vec())
    }

    /// Lexicographic order by components, so a directory sorts right before its contents
    /// (`a`, `a/b`, `a-b` rather than `a`, `a-b`, `a/b`).
    pub fn tree_cmp(&self, other: &RelPath) -> std::cmp::Ordering {
        self.components().cmp(other.components())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            write!(f, "{}", String::from_utf8_lossy(&self.0))
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl From<&str> for RelPath {
    fn from(s: &str) -> Self {
        RelPath(s.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_each_attack() {
        let cases: &[(&[u8], Option<PathError>)] = &[
            (b"a/b", None),
            (b"", None),
            (b"/etc/passwd", Some(PathError::Absolute)),
            (b"../x", Some(PathError::DotDot)),
            (b"a/../../x", Some(PathError::DotDot)),
            (b"a//b", Some(PathError::EmptyComponent)),
            (b"a/./b", Some(PathError::EmptyComponent)),
            (b"a/", Some(PathError::EmptyComponent)),
            (b"a\0b", Some(PathError::Nul)),
        ];
        for (p, want) in cases {
            let got = RelPath::from_bytes(p.to_vec()).validate().err();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(p));
        }
        let long = vec![b'x'; MAX_NAME_LEN + 1];
        assert_eq!(
            RelPath::from_bytes(long).validate(),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn parent_join_and_prefix() {
        let p = RelPath::from("a/b/c");
        assert_eq!(p.parent(), Some(RelPath::from("a/b")));
        assert_eq!(RelPath::from("a").parent(), Some(RelPath::root()));
        assert_eq!(RelPath::root().parent(), None);
        assert_eq!(RelPath::root().join(b"x"), RelPath::from("x"));
        assert_eq!(p.file_name(), b"c");
        assert_eq!(
            p.ancestors().collect::<Vec<_>>(),
            vec![RelPath::from("a/b"), RelPath::from("a"), RelPath::root()]
        );
        assert!(p.starts_with(&RelPath::from("a/b")));
        assert!(!RelPath::from("a/bc").starts_with(&RelPath::from("a/b")));
        assert!(p.starts_with(&RelPath::root()));
        let (a, x) = (RelPath::from("a"), RelPath::from("x/y"));
        assert_eq!(p.rebase(&a, &x), RelPath::from("x/y/b/c"));
        assert_eq!(a.rebase(&a, &x), x);
        assert_eq!(p.rebase(&RelPath::root(), &x), RelPath::from("x/y/a/b/c"));
        assert_eq!(p.rebase(&a, &RelPath::root()), RelPath::from("b/c"));
    }

    #[test]
    fn tree_order_puts_directory_before_its_contents() {
        let mut v = vec![
            RelPath::from("a-b"),
            RelPath::from("a/b"),
            RelPath::from("a"),
        ];
        v.sort_by(|x, y| x.tree_cmp(y));
        assert_eq!(
            v,
            vec![
                RelPath::from("a"),
                RelPath::from("a/b"),
                RelPath::from("a-b")
            ]
        );
    }
}
