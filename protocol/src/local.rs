//! The filesystem edge shared by both daemons and `verify`: reading a local tree into
//! [`Entry`]s, hashing file contents, and the digest cache that lets `verify` skip files whose
//! digest is already known.
//!
//! Nothing here follows symlinks: every stat is an `lstat`, and directories are read through
//! their own path only.

use crate::merkle;
use crate::message::{Digest, DigestEntry};
use crate::meta::{Compare, Entry, Kind, Meta};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else if ft.is_block_device() {
        Kind::BlockDevice
    } else {
        return None;
    };
    Some(Meta {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == Kind::File { md.len() } else { 0 },
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        rdev: if kind.is_special() { md.rdev() } else { 0 },
    })
}

/// The local path of `rel` under `root`.
pub fn local_path(root: &Path, rel: &RelPath) -> PathBuf {
    if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(rel.as_path())
    }
}

/// `lstat`s one entry; `Ok(None)` if it does not exist or is a socket.
pub fn read_entry(root: &Path, rel: &RelPath) -> io::Result<Option<Entry>> {
    let path = local_path(root, rel);
    let md = match std::fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    entry_from(&path, rel.clone(), &md)
}

fn entry_from(path: &Path, rel: RelPath, md: &Metadata) -> io::Result<Option<Entry>> {
    let Some(meta) = meta_of(md) else {
        return Ok(None);
    };
    let link = if meta.kind == Kind::Symlink {
        Some(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec())
    } else {
        None
    };
    Ok(Some(Entry {
        path: rel,
        meta,
        link,
    }))
}

/// The children of directory `rel`, sorted by name, filtered. Unreadable children are reported
/// in `errors` and left out.
pub fn read_dir_sorted(
    root: &Path,
    rel: &RelPath,
    filter: Filter<'_>,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> Vec<Entry> {
    let dir = local_path(root, rel);
    let iter = match std::fs::read_dir(&dir) {
        Ok(it) => it,
        Err(e) => {
            errors.push((rel.clone(), e));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for item in iter {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                errors.push((rel.clone(), e));
                continue;
            }
        };
        let child = rel.join(item.file_name().as_bytes());
        // DirEntry::metadata does not traverse symlinks.
        let md = match item.metadata() {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.push((child, e));
                continue;
            }
        };
        if !filter(&child, md.is_dir()) {
            continue;
        }
        match entry_from(&item.path(), child.clone(), &md) {
            Ok(Some(e)) => out.push(e),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push((child, e)),
        }
    }
    out.sort_by(|a, b| a.path.file_name().cmp(b.path.file_name()));
    out
}

/// Every entry below `root` in tree order (a directory right before its contents), the root
/// itself first with the empty path. Per-entry errors go to `errors`; an unreadable root is an
/// error.
pub fn scan(
    root: &Path,
    filter: Filter<'_>,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    scan_from(root, &RelPath::root(), filter, errors)
}

/// Like [`scan`] for the subtree at `start` (which is listed first).
pub fn scan_from(
    root: &Path,
    start: &RelPath,
    filter: Filter<'_>,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    let Some(top) = read_entry(root, start)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: not found", local_path(root, start).display()),
        ));
    };
    let mut out = vec![top];
    if out[0].meta.kind == Kind::Dir {
        walk(root, start, filter, errors, &mut out);
    }
    Ok(out)
}

fn walk(
    root: &Path,
    rel: &RelPath,
    filter: Filter<'_>,
    errors: &mut Vec<(RelPath, io::Error)>,
    out: &mut Vec<Entry>,
) {
    for child in read_dir_sorted(root, rel, filter, errors) {
        let is_dir = child.meta.kind == Kind::Dir;
        let path = child.path.clone();
        out.push(child);
        if is_dir {
            walk(root, &path, filter, errors, out);
        }
    }
}

/// blake3 of a file's contents.
pub fn file_digest(path: &Path) -> io::Result<Digest> {
    let mut f = std::fs::File::open(path)?;
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
    fn of(md: &Metadata) -> Self {
        CacheKey {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
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

    /// The digest of the regular file `rel` under `root`, from the cache when `md` still
    /// matches, else by reading it. `checksum` forces a read.
    pub fn digest(
        &mut self,
        root: &Path,
        rel: &RelPath,
        md: &Metadata,
        checksum: bool,
    ) -> io::Result<Digest> {
        let key = CacheKey::of(md);
        if !checksum {
            if let Some((k, d)) = self.map.get(rel) {
                if *k == key {
                    self.hits += 1;
                    return Ok(*d);
                }
            }
        }
        let path = local_path(root, rel);
        let digest = file_digest(&path)?;
        self.hashed += 1;
        // Re-stat: if the file changed while we read it, do not remember the result.
        let after = std::fs::symlink_metadata(&path)?;
        if CacheKey::of(&after) == key && !recent(md) {
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

fn recent(md: &Metadata) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    let limit = now - DigestCache::SETTLE_SECS as i128 * 1_000_000_000;
    ns(md.ctime(), md.ctime_nsec()) >= limit || ns(md.mtime(), md.mtime_nsec()) >= limit
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
    /// `errors` and take part with a zero digest, so they show up as differences.
    pub fn build(
        root: &Path,
        filter: Filter<'_>,
        cache: &mut DigestCache,
        cmp: Compare,
        checksum: bool,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> io::Result<DigestTree> {
        let Some(top) = read_entry(root, &RelPath::root())? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found", root.display()),
            ));
        };
        let mut tree = DigestTree {
            dirs: HashMap::new(),
        };
        let mut live = Vec::new();
        tree.visit(root, top, filter, cache, cmp, checksum, errors, &mut live);
        let live: std::collections::HashSet<RelPath> = live.into_iter().collect();
        cache.retain(|p| live.contains(p));
        Ok(tree)
    }

    /// The root listing.
    pub fn root(&self) -> &DirListing {
        &self.dirs[&RelPath::root()]
    }

    #[allow(clippy::too_many_arguments)]
    fn visit(
        &mut self,
        root: &Path,
        entry: Entry,
        filter: Filter<'_>,
        cache: &mut DigestCache,
        cmp: Compare,
        checksum: bool,
        errors: &mut Vec<(RelPath, io::Error)>,
        live: &mut Vec<RelPath>,
    ) -> DigestEntry {
        let digest = match entry.meta.kind {
            Kind::File => {
                live.push(entry.path.clone());
                let path = local_path(root, &entry.path);
                match std::fs::symlink_metadata(&path)
                    .and_then(|md| cache.digest(root, &entry.path, &md, checksum))
                {
                    Ok(d) => d,
                    Err(e) => {
                        errors.push((entry.path.clone(), e));
                        [0; 32]
                    }
                }
            }
            Kind::Symlink => merkle::link_digest(entry.link.as_deref().unwrap_or_default()),
            Kind::Dir => {
                let children = read_dir_sorted(root, &entry.path, filter, errors);
                let entries: Vec<DigestEntry> = children
                    .into_iter()
                    .map(|c| self.visit(root, c, filter, cache, cmp, checksum, errors, live))
                    .collect();
                let child_digests: Vec<Digest> = entries
                    .iter()
                    .map(|e| merkle::entry_digest(&e.entry, &e.digest, cmp))
                    .collect();
                let digest = merkle::dir_content_digest(child_digests.iter());
                let dir = DigestEntry {
                    entry: entry.clone(),
                    digest,
                };
                self.dirs
                    .insert(entry.path.clone(), DirListing { dir, entries });
                digest
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => [0; 32],
        };
        DigestEntry { entry, digest }
    }
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
        let entries = scan(root, &filter, &mut errors).unwrap();
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
        let md = std::fs::symlink_metadata(&f).unwrap();
        let d1 = cache.digest(root, &rel, &md, false).unwrap();
        let d2 = cache.digest(root, &rel, &md, false).unwrap();
        assert_eq!(d1, d2);
        // ctime is recent (we just set mtime), so the entry must not have been cached.
        assert_eq!(cache.hashed, 2);
    }

    fn filetime_set(p: &Path, t: filetime::FileTime) {
        filetime::set_file_mtime(p, t).unwrap();
    }
}
