//! `ferry verify`: a top-down comparison of two trees by their digests (see
//! `ferry_protocol::merkle`). Equal trees cost one listing of the root; a difference costs one
//! listing per directory on its path. File bytes are read only where the digest cache has no
//! valid entry, or everywhere with `--checksum`.

use crate::config::{SyncGroup, Target};
use crate::filter::{Filter, FilterError};
use crate::session::{Session, SessionError};
use ferry_protocol::identity::Identity;
use ferry_protocol::local::{DigestCache, DigestTree, Tally};
use ferry_protocol::merkle::compare_dirs;
use ferry_protocol::message::{DigestEntry, Intent};
use ferry_protocol::meta::{Compare, Difference, Entry, Kind};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a comparison could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A tree could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Entries of a tree could not be read: no verdict is possible.
    #[error("{path}: {source} ({count} unreadable entries in all)")]
    Unreadable {
        /// The first one.
        path: PathBuf,
        /// Its error.
        source: std::io::Error,
        /// How many in all.
        count: usize,
    },
    /// An exclude pattern is invalid.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The receiver could not be asked.
    #[error("{context}: {source}")]
    Session {
        /// Which group and target.
        context: String,
        /// The cause.
        source: SessionError,
    },
}

/// Differences in tree order.
pub type Differences = Vec<(RelPath, Difference)>;

/// Where local digest caches live by default: `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("ferry"))
}

/// The digest cache for the tree at `root`, kept in `dir` (in memory without one).
fn cache_for(dir: Option<&Path>, root: &Path) -> DigestCache {
    match dir {
        Some(d) => {
            let key = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
            DigestCache::open(d.join(format!("{}.digests", &key[..16])))
        }
        None => DigestCache::in_memory(),
    }
}

/// Digests the tree at `root` (blocking). Any unreadable entry is an error: a tree read in
/// part proves nothing.
pub fn build_tree(
    root: &Path,
    filter: &Filter,
    cache_dir: Option<&Path>,
    cmp: Compare,
    checksum: bool,
    tally: Option<Arc<Tally>>,
) -> Result<DigestTree, VerifyError> {
    let mut cache = cache_for(cache_dir, root);
    cache.tally = tally;
    let accept = |p: &RelPath, d: bool| filter.accepts(p, d);
    let mut errors = Vec::new();
    let tree = DigestTree::build(root, &accept, &mut cache, cmp, checksum, &mut errors).map_err(
        |source| VerifyError::Read {
            path: root.to_path_buf(),
            source,
        },
    )?;
    let count = errors.len();
    if let Some((p, source)) = errors.into_iter().next() {
        return Err(VerifyError::Unreadable {
            path: root.join(p.as_path()),
            source,
            count,
        });
    }
    if let Err(e) = cache.save() {
        tracing::warn!("cannot save digest cache: {e}");
    }
    tracing::debug!(root = %root.display(), hashed = cache.hashed, cached = cache.hits, "tree digested");
    Ok(tree)
}

/// Compares two local trees, ignoring what `filter` excludes. Owners count when they can have
/// been preserved (we run as root).
pub async fn verify_local(
    left: &Path,
    right: &Path,
    filter: &Filter,
    checksum: bool,
    cache_dir: Option<PathBuf>,
    tally: Option<Arc<Tally>>,
) -> Result<Differences, VerifyError> {
    // Everything, attributes and hard links included (what a user cannot read, such as
    // `trusted.*` without privilege, is absent on both sides alike).
    // SAFETY: geteuid has no preconditions.
    let cmp = Compare::all(unsafe { libc::geteuid() } == 0).with(Namespaces::ALL, true);
    let canonical = |p: &Path| {
        p.canonicalize().map_err(|source| VerifyError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let (left, right) = (canonical(left)?, canonical(right)?);
    let f = filter.clone();
    let (l, r) = tokio::task::spawn_blocking(move || -> Result<_, VerifyError> {
        let dir = cache_dir.as_deref();
        Ok((
            build_tree(&left, &f, dir, cmp, checksum, tally.clone())?,
            build_tree(&right, &f, dir, cmp, checksum, tally)?,
        ))
    })
    .await
    .expect("digest task")?;
    compare(&Side::Local(l), &Side::Local(r), cmp, filter)
        .await
        .map_err(|source| VerifyError::Session {
            context: "verify".into(),
            source,
        })
}

/// Compares `group`'s source with its module on the ferry `target`; the source's digests are
/// cached in `cache_dir`.
pub async fn verify_target(
    group: &SyncGroup,
    target: &Target,
    identity: &Identity,
    checksum: bool,
    cache_dir: Option<PathBuf>,
    tally: Option<Arc<Tally>>,
) -> Result<Differences, VerifyError> {
    let context = || format!("{} → {}", group.name, target.name);
    let session = target
        .connect(identity, &group.module, Intent::Read)
        .await
        .map_err(|source| VerifyError::Session {
            context: context(),
            source,
        })?;
    // Everything the module keeps and the group preserves; setuid bits and preserved
    // attributes always count (a module that drops them is reported as different,
    // truthfully).
    let cmp = Compare::all(session.keeps.owners)
        .with(group.preserve.namespaces(), group.preserve.hardlinks);
    let (source, filter) = (group.source.clone(), group.filter.clone());
    let tree = tokio::task::spawn_blocking(move || {
        build_tree(&source, &filter, cache_dir.as_deref(), cmp, checksum, tally)
    })
    .await
    .expect("digest task")?;
    let remote = Side::Remote {
        session: &session,
        checksum,
        cmp,
    };
    let diffs = compare(&Side::Local(tree), &remote, cmp, &group.filter)
        .await
        .map_err(|source| VerifyError::Session {
            context: context(),
            source,
        });
    session.close().await;
    diffs
}

/// One side of a comparison.
pub enum Side<'a> {
    /// A local tree, hashed up front.
    Local(DigestTree),
    /// A receiver module, listed directory by directory on demand.
    Remote {
        /// Open read session.
        session: &'a Session,
        /// Ask the receiver to re-read every file.
        checksum: bool,
        /// What the receiver's digests cover.
        cmp: Compare,
    },
}

impl Side<'_> {
    async fn listing(
        &self,
        path: &RelPath,
    ) -> Result<Option<(Entry, Vec<DigestEntry>)>, SessionError> {
        match self {
            Side::Local(tree) => Ok(tree
                .dirs
                .get(path)
                .map(|l| (l.dir.entry.clone(), l.entries.clone()))),
            Side::Remote {
                session,
                checksum,
                cmp,
            } => {
                let (dir, entries) = session.verify_dir(path, *checksum, *cmp).await?;
                Ok(dir.map(|d| (d, entries)))
            }
        }
    }
}

/// Compares `left` (the source) with `right` (the copy). Paths excluded by `filter` are
/// ignored on both sides. Returns differences in tree order.
pub async fn compare(
    left: &Side<'_>,
    right: &Side<'_>,
    cmp: Compare,
    filter: &Filter,
) -> Result<Vec<(RelPath, Difference)>, SessionError> {
    let root = RelPath::root();
    let (Some(l), Some(r)) = (left.listing(&root).await?, right.listing(&root).await?) else {
        return Err(SessionError::Refused {
            path: root,
            reason: "a tree root is missing or not a directory".into(),
        });
    };
    let mut out: Vec<(RelPath, Difference)> =
        l.0.meta
            .attr_differences(&r.0.meta, cmp)
            .into_iter()
            .map(|d| (root.clone(), d))
            .collect();
    let mut queue = VecDeque::from([(l.1, r.1)]);
    while let Some((le, re)) = queue.pop_front() {
        let keep =
            |e: &DigestEntry| !filter.excludes(&e.entry.path, e.entry.meta.kind == Kind::Dir);
        let le: Vec<DigestEntry> = le.into_iter().filter(keep).collect();
        let re: Vec<DigestEntry> = re.into_iter().filter(keep).collect();
        let c = compare_dirs(&le, &re, cmp);
        out.extend(c.differences);
        for dir in c.descend {
            match (left.listing(&dir).await?, right.listing(&dir).await?) {
                (Some(l), Some(r)) => queue.push_back((l.1, r.1)),
                _ => out.push((dir, Difference::Type)),
            }
        }
    }
    out.sort_by(|a, b| a.0.tree_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(out)
}
