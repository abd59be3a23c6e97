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
//!
//! Split by what it does: `fd` (descriptor primitives), `scan` (reading a tree),
//! `digest` (digest cache and Merkle tree); all re-exported here.

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

mod digest;
mod fd;
mod scan;
mod summary;

pub use digest::*;
pub use fd::*;
pub use scan::*;
pub use summary::{Rules, Summary};

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

    /// In pieces, a scan hands over the same entries in the same order, a piece at a time,
    /// and stops when told.
    #[test]
    fn a_scan_in_pieces_is_the_scan_cut_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a", "a/b", "c"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            for f in 0..3 {
                std::fs::write(root.join(d).join(format!("f{f}")), b"x").unwrap();
            }
        }
        let mut errors = Vec::new();
        let whole = scan(root, &no_filter, Namespaces::NONE, &mut errors).unwrap();
        let held = open_root(root).unwrap();
        let mut pieces: Vec<Vec<Entry>> = Vec::new();
        scan_pieces(&held, &no_filter, Namespaces::NONE, 4, &mut |(p, e)| {
            assert!(e.is_empty());
            pieces.push(p);
            true
        })
        .unwrap();
        let sizes: Vec<usize> = pieces.iter().map(Vec::len).collect();
        assert_eq!(sizes, [4, 4, 4, 1], "13 entries");
        assert_eq!(pieces.concat(), whole);
        let mut taken = 0;
        scan_pieces(&held, &no_filter, Namespaces::NONE, 4, &mut |_| {
            taken += 1;
            false
        })
        .unwrap();
        assert_eq!(taken, 1, "stopped after the first piece");
    }

    #[test]
    fn count_entries_counts_a_subtree_without_following_symlinks_and_stops_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/e/f")).unwrap();
        std::fs::write(root.join("d/x"), b"x").unwrap();
        std::fs::write(root.join("d/e/f/y"), b"y").unwrap();
        std::fs::create_dir_all(root.join("outside/a/b")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("d/link")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
        std::fs::write(root.join("file"), b"z").unwrap();
        let held = open_root(root).unwrap();
        // d, d/e, d/e/f, d/e/f/y, d/x, d/link (not what it points to).
        assert_eq!(count_entries(&held, b"d", u64::MAX).unwrap(), 6);
        assert_eq!(count_entries(&held, b"file", u64::MAX).unwrap(), 1);
        assert_eq!(count_entries(&held, b"dangling", u64::MAX).unwrap(), 1);
        assert_eq!(count_entries(&held, b"missing", u64::MAX).unwrap(), 0);
        for limit in 0..6 {
            let n = count_entries(&held, b"d", limit).unwrap();
            assert_eq!(n, limit + 1, "stops right past a limit of {limit}");
        }
        assert_eq!(count_entries(&held, b"d", 6).unwrap(), 6);
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
