//! Content digests of a tree: the digest cache `verify` relies on, and the Merkle digest
//! tree both sides of a comparison build.

use super::*;

/// blake3 of everything `f` reads.
pub(crate) fn digest_of(f: &mut std::fs::File) -> io::Result<Digest> {
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

/// What a content cache trusts of a file: the same inode, size, mtime and ctime mean the
/// same content (ctime cannot be set from user space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl CacheKey {
    pub(crate) fn of(st: &libc::stat) -> Self {
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

    /// The key of a file whose metadata is `md`.
    pub fn of_metadata(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        CacheKey {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }

    pub(crate) fn recent(&self) -> bool {
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
                        super::scan::grow(|| self.visit(dir, Some(&child_name), c, at))
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
pub(crate) struct Visit<'a> {
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
