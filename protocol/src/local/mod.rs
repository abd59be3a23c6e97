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
pub use summary::{Kept, Rules, Summary, KEPT_FOR};

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

    /// The wide scan reads what the plain one reads, in the same order: directories on
    /// other threads, files and links between them at the top, a filtered subtree, an empty
    /// directory, a deep one.
    #[test]
    fn a_wide_scan_equals_the_plain_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["a/b/c", "b", "c/x", "skip/deep", "z/y/x/w"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (i, f) in ["0", "a-b", "a/b/f", "b0", "c/x/g", "m", "z/y/h", "zz"]
            .iter()
            .enumerate()
        {
            std::fs::write(root.join(f), vec![b'x'; i]).unwrap();
        }
        for d in 0..40 {
            std::fs::create_dir_all(root.join(format!("many/{d}"))).unwrap();
            std::fs::create_dir_all(root.join(format!("top{d}/{d}"))).unwrap();
            std::fs::write(root.join(format!("top{d}/{d}/f")), b"y").unwrap();
        }
        std::os::unix::fs::symlink("a-b", root.join("link")).unwrap();
        let filter = |p: &RelPath, _: bool| p.as_bytes() != b"skip";
        let (mut plain_errors, mut wide_errors) = (Vec::new(), Vec::new());
        let plain = scan(root, &filter, Namespaces::ALL, &mut plain_errors).unwrap();
        let wide = scan_wide(root, &filter, Namespaces::ALL, &mut wide_errors).unwrap();
        // The root, 10 directories, 8 files, the link, `many` and its 40, `top*`'s 120.
        assert_eq!(wide.len(), 1 + 10 + 8 + 1 + 41 + 40 * 3);
        assert_eq!(wide, plain);
        assert!(plain_errors.is_empty() && wide_errors.is_empty());
    }

    /// A chain of directories deeper than any path a peer accepts (someone with write access
    /// to a source can make one with `mkdir d; cd d` in a loop): every walk stops where the
    /// paths would pass `PATH_MAX`, says so once, and takes no more stack than a thread's
    /// default (an unbounded recursion aborts the daemon).
    #[test]
    fn a_chain_deeper_than_path_max_is_walked_to_path_max_on_a_default_stack() {
        let dir = tempfile::tempdir().unwrap();
        let levels = crate::path::MAX_PATH_LEN; // "d/" each: twice PATH_MAX in all
        let mut at = open_root(dir.path()).unwrap();
        for _ in 0..levels {
            let name = std::ffi::CString::new("d").unwrap();
            // SAFETY: a valid descriptor and a NUL-terminated name.
            assert_eq!(
                unsafe { libc::mkdirat(at.as_raw_fd(), name.as_ptr(), 0o755) },
                0
            );
            at = open_child(&at, b"d").unwrap();
        }
        drop(at);
        let root = dir.path().to_path_buf();
        let walked = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut errors = Vec::new();
                let entries = scan(&root, &no_filter, Namespaces::NONE, &mut errors).unwrap();
                let held = open_root(&root).unwrap();
                let rules = Rules {
                    cmp: Compare::all(false),
                    devices: false,
                };
                let mut more = Vec::new();
                let summary = Summary::build(
                    &held,
                    rules,
                    &no_filter,
                    Namespaces::NONE,
                    Namespaces::NONE,
                    &mut more,
                );
                let mut cache = DigestCache::in_memory();
                let tree =
                    DigestTree::build(&root, &no_filter, &mut cache, rules.cmp, false, &mut more)
                        .unwrap();
                (
                    entries,
                    errors,
                    summary.below(&RelPath::root()),
                    tree.dirs.len(),
                    more.len(),
                )
            })
            .unwrap()
            .join()
            .expect("the walks fit a default stack");
        let (entries, errors, below, dirs, more) = walked;
        let deepest = entries.last().unwrap().path.as_bytes().len();
        assert!(deepest <= crate::path::MAX_PATH_LEN, "{deepest}");
        // "d", "d/d", …: the longest path within PATH_MAX has 2,048 components.
        assert_eq!(entries.len(), 1 + crate::path::MAX_PATH_LEN / 2);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].1.to_string().contains("longer than 4096 bytes"));
        assert_eq!(below, entries.len() as u64 - 1);
        assert_eq!(dirs, entries.len());
        assert_eq!(more, 2, "the summary and the digest tree say it once each");
    }

    /// In pieces, a scan hands over the same entries in the same order, a piece at a time
    /// (each twice the last, up to the most), and stops when told.
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
        scan_pieces(&held, &no_filter, Namespaces::NONE, 2..=4, &mut |(p, e)| {
            assert!(e.is_empty());
            pieces.push(p);
            true
        })
        .unwrap();
        let sizes: Vec<usize> = pieces.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 4, 4, 3], "13 entries");
        assert_eq!(pieces.concat(), whole);
        let mut taken = 0;
        scan_pieces(&held, &no_filter, Namespaces::NONE, 4..=4, &mut |_| {
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
