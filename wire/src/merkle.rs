//! Digests that let two trees be compared top-down.
//!
//! Every entry gets a digest over its name, its compared attributes and its content digest
//! (file bytes, link target, or for a directory the digest of its children). Two trees are
//! equal in everything `verify` checks exactly when their root digests are equal, so equal
//! trees compare in one exchange and a difference costs one listing per directory on its path.

use crate::message::{Digest, DigestEntry};
use crate::meta::{Compare, Difference, Kind};

/// Digest of one entry from its metadata, its content digest and (when hard links are
/// compared) the first name of its file.
pub fn entry_digest(de: &DigestEntry, cmp: Compare) -> Digest {
    let (entry, content) = (&de.entry, &de.digest);
    let m = &entry.meta;
    let mut h = blake3::Hasher::new();
    let name = entry.path.file_name();
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name);
    let kind: u8 = match m.kind {
        Kind::File => 1,
        Kind::Dir => 2,
        Kind::Symlink => 3,
        Kind::Fifo => 4,
        Kind::CharDevice => 5,
        Kind::BlockDevice => 6,
    };
    h.update(&[kind]);
    if m.kind != Kind::Symlink {
        h.update(&m.mode.to_le_bytes());
    }
    h.update(&m.mtime.to_le_bytes());
    h.update(&m.mtime_nsec.to_le_bytes());
    if cmp.owner {
        h.update(&m.uid.to_le_bytes());
        h.update(&m.gid.to_le_bytes());
    }
    if m.kind == Kind::File {
        h.update(&m.size.to_le_bytes());
    }
    if m.kind.is_special() {
        h.update(&m.rdev.to_le_bytes());
    }
    for (name, value) in m.xattrs.within(cmp.xattrs) {
        for part in [name, value] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    if cmp.hardlinks {
        if let Some(first) = &de.hardlink {
            h.update(b"link");
            h.update(&(first.as_bytes().len() as u64).to_le_bytes());
            h.update(first.as_bytes());
        }
    }
    h.update(content);
    *h.finalize().as_bytes()
}

/// Digest of a directory's contents from its children's entry digests, in name order.
pub fn dir_content_digest<'a>(child_digests: impl Iterator<Item = &'a Digest>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"dir");
    for d in child_digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Content digest of a symlink.
pub fn link_digest(target: &[u8]) -> Digest {
    *blake3::hash(target).as_bytes()
}

/// The outcome of comparing one directory on both sides.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DirComparison {
    /// Differences found at this level, `(path, kind)`.
    pub differences: Vec<(crate::RelPath, Difference)>,
    /// Subdirectories present on both sides whose contents differ: descend into them.
    pub descend: Vec<crate::RelPath>,
}

/// Differences between two entries at the same path, content included. For directories,
/// content is not judged here (the caller descends).
pub fn entry_differences(left: &DigestEntry, right: &DigestEntry, cmp: Compare) -> Vec<Difference> {
    let (l, r) = (&left.entry.meta, &right.entry.meta);
    if l.kind != r.kind {
        return vec![Difference::Type];
    }
    let mut out = Vec::new();
    match l.kind {
        Kind::File => {
            if l.size != r.size || left.digest != right.digest {
                out.push(Difference::Content);
            }
        }
        Kind::Symlink => {
            if left.entry.link != right.entry.link {
                out.push(Difference::Symlink);
            }
        }
        Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => {
            if l.rdev != r.rdev {
                out.push(Difference::Content);
            }
        }
        Kind::Dir => {}
    }
    out.extend(l.attr_differences(r, cmp));
    if cmp.hardlinks && left.hardlink != right.hardlink {
        out.push(Difference::Hardlink);
    }
    out
}

/// Compares two directory listings sorted by name.
pub fn compare_dirs(left: &[DigestEntry], right: &[DigestEntry], cmp: Compare) -> DirComparison {
    use std::cmp::Ordering;
    let mut out = DirComparison::default();
    let (mut i, mut j) = (0, 0);
    while i < left.len() || j < right.len() {
        let order = match (left.get(i), right.get(j)) {
            (Some(l), Some(r)) => l.entry.path.file_name().cmp(r.entry.path.file_name()),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                out.differences
                    .push((left[i].entry.path.clone(), Difference::Missing));
                i += 1;
            }
            Ordering::Greater => {
                out.differences
                    .push((right[j].entry.path.clone(), Difference::Extra));
                j += 1;
            }
            Ordering::Equal => {
                let (l, r) = (&left[i], &right[j]);
                for d in entry_differences(l, r, cmp) {
                    out.differences.push((l.entry.path.clone(), d));
                }
                if l.entry.meta.kind == Kind::Dir
                    && r.entry.meta.kind == Kind::Dir
                    && l.digest != r.digest
                {
                    out.descend.push(l.entry.path.clone());
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{test_meta, Entry};
    use crate::RelPath;

    fn de(name: &str, kind: Kind, digest: u8) -> DigestEntry {
        DigestEntry {
            entry: Entry {
                path: RelPath::from(name),
                meta: test_meta(kind, 1, 5),
                link: None,
                inode: None,
            },
            digest: [digest; 32],
            hardlink: None,
        }
    }

    #[test]
    fn compare_dirs_table() {
        let cmp = Compare::all(true);
        let left = vec![
            de("a", Kind::File, 1),
            de("b", Kind::Dir, 2),
            de("c", Kind::File, 3),
            de("d", Kind::File, 4),
        ];
        let mut changed_mode = de("d", Kind::File, 4);
        changed_mode.entry.meta.mode = 0o600;
        let right = vec![
            de("a", Kind::File, 9),
            de("b", Kind::Dir, 7),
            de("bb", Kind::File, 1),
            changed_mode,
        ];
        let got = compare_dirs(&left, &right, cmp);
        assert_eq!(
            got.differences,
            vec![
                (RelPath::from("a"), Difference::Content),
                (RelPath::from("bb"), Difference::Extra),
                (RelPath::from("c"), Difference::Missing),
                (RelPath::from("d"), Difference::Mode),
            ]
        );
        assert_eq!(got.descend, vec![RelPath::from("b")]);
    }

    #[test]
    fn entry_digest_covers_owner_only_when_asked() {
        let a = de("x", Kind::File, 1);
        let mut b = a.clone();
        b.entry.meta.uid = 42;
        let with = Compare::all(true);
        let without = Compare::all(false);
        assert_ne!(entry_digest(&a, with), entry_digest(&b, with));
        assert_eq!(entry_digest(&a, without), entry_digest(&b, without));
        let mut c = a.clone();
        c.entry.meta.mtime_nsec = 1;
        assert_ne!(entry_digest(&a, without), entry_digest(&c, without));
    }

    #[test]
    fn digest_and_differences_cover_xattrs_acls_and_links_only_when_compared() {
        use crate::xattr::{Namespaces, Xattrs};
        let a = de("x", Kind::File, 1);
        let mut b = a.clone();
        b.entry.meta.xattrs = Xattrs {
            covers: Namespaces::ALL,
            list: vec![(b"system.posix_acl_access".to_vec(), b"acl".to_vec())],
        };
        let mut a_read = a.clone();
        a_read.entry.meta.xattrs.covers = Namespaces::ALL;
        b.hardlink = Some(RelPath::from("w"));
        let plain = Compare::all(true);
        let all = plain.with(Namespaces::ALL, true);
        assert_eq!(entry_digest(&a_read, plain), entry_digest(&b, plain));
        assert_ne!(entry_digest(&a_read, all), entry_digest(&b, all));
        assert_eq!(entry_differences(&a_read, &b, plain), vec![]);
        assert_eq!(
            entry_differences(&a_read, &b, all),
            vec![Difference::Acl, Difference::Hardlink]
        );
        assert_eq!(
            entry_differences(&a_read, &b, plain.with(Namespaces::XATTRS, false)),
            vec![],
            "an ACL is not an xattr difference"
        );
    }
}
