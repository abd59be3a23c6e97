//! `ferry verify`: a top-down comparison of two trees by their digests (see
//! `ferry_protocol::merkle`). Equal trees cost one listing of the root; a difference costs one
//! listing per directory on its path. File bytes are read only where the digest cache has no
//! valid entry, or everywhere with `--checksum`.

use crate::filter::Filter;
use crate::session::{Session, SessionError};
use ferry_protocol::local::DigestTree;
use ferry_protocol::merkle::compare_dirs;
use ferry_protocol::message::DigestEntry;
use ferry_protocol::meta::{Compare, Difference, Entry, Kind};
use ferry_protocol::RelPath;
use std::collections::VecDeque;

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
            Side::Remote { session, checksum } => {
                let (dir, entries) = session.verify_dir(path, *checksum).await?;
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
        return Err(SessionError::Failed(
            "a tree root is missing or not a directory".into(),
        ));
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
