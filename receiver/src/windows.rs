//! What the receiver knows of the big files it wrote: each one's signature and window digests,
//! so the next delta of that file neither reads nor signs its copy again.
//!
//! A delta of a big file costs the receiver a read of its whole copy twice over: once to sign
//! it, once to rebuild every window, unchanged ones included. The receiver is the only writer
//! of its module, and it has both values in hand when it commits a file: the window digests
//! (its [`BodyDigest`] of what it wrote) and the signature (the base's entries for a window
//! kept as it was, the rebuilt window's otherwise). Kept here, keyed by path and valid while
//! the file's inode, size, mtime and ctime are those seen just after it was committed, they
//! let the next delta of the file answer with a signature at once and take an unchanged
//! window by its digest, reading nothing. A file changed by anyone else has a new ctime (the
//! key is read after the commit, and on Linux 6.13 and later a ctime read is followed by a
//! fine-grained one), so its entry no longer answers. Kept in memory only, within
//! [`MAX_BYTES`]; a module on a shared filesystem that other gateways write keeps none.
//!
//! [`BodyDigest`]: ferry_protocol::body::BodyDigest

use ferry_protocol::local::CacheKey;
use ferry_protocol::message::Digest;
use ferry_protocol::RelPath;
use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};

/// Signatures and digests kept per module, at most.
pub const MAX_BYTES: usize = 64 << 20;

/// A file's signature and window digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Its serialized signature.
    pub signature: Vec<u8>,
    /// The digest of each of its windows.
    pub windows: Vec<Digest>,
}

impl Known {
    fn bytes(&self) -> usize {
        self.signature.len() + self.windows.len() * 32
    }
}

/// Whether two looks at a file (`fstat`) saw the same content: same inode, size, mtime and
/// ctime.
pub fn same(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    CacheKey::of_metadata(a) == CacheKey::of_metadata(b)
}

/// The module's [`Known`] files.
#[derive(Default)]
pub struct Windows {
    inner: Mutex<Inner>,
    /// Keeps nothing (a module that other gateways write too).
    off: bool,
}

#[derive(Default)]
struct Inner {
    map: HashMap<RelPath, (CacheKey, Arc<Known>, u64)>,
    bytes: usize,
    /// Insertion order, to let the oldest go first.
    next: u64,
}

impl Windows {
    /// A store that keeps nothing.
    pub fn off() -> Windows {
        Windows {
            off: true,
            ..Windows::default()
        }
    }

    /// Whether it keeps anything (else there is no use signing files as they come).
    pub fn keeps(&self) -> bool {
        !self.off
    }

    /// What is known of `path`, if `md` (its metadata now) is what it was when kept.
    pub fn get(&self, path: &RelPath, md: &fs::Metadata) -> Option<Arc<Known>> {
        let inner = self.inner.lock().expect("windows lock");
        let (key, known, _) = inner.map.get(path)?;
        (*key == CacheKey::of_metadata(md)).then(|| known.clone())
    }

    /// Keeps `known` for `path`, whose file was just committed and is `file`; `None`
    /// forgets what was kept of it.
    pub fn put(&self, path: &RelPath, file: &fs::File, known: Option<Known>) {
        let mut inner = self.inner.lock().expect("windows lock");
        if let Some((_, old, _)) = inner.map.remove(path) {
            inner.bytes -= old.bytes();
        }
        let Some(known) = known else { return };
        let (true, Ok(md)) = (!self.off, file.metadata()) else {
            return;
        };
        if known.bytes() > MAX_BYTES / 4 {
            return;
        }
        inner.bytes += known.bytes();
        inner.next += 1;
        let at = inner.next;
        inner.map.insert(
            path.clone(),
            (CacheKey::of_metadata(&md), Arc::new(known), at),
        );
        while inner.bytes > MAX_BYTES {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, (_, _, at))| *at)
                .map(|(p, _)| p.clone())
                .expect("bytes kept means entries kept");
            let (_, gone, _) = inner.map.remove(&oldest).expect("just found");
            inner.bytes -= gone.bytes();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("windows lock").map.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn known(bytes: usize) -> Known {
        Known {
            signature: vec![1; bytes],
            windows: vec![[2; 32]],
        }
    }

    #[test]
    fn an_entry_answers_only_for_the_file_as_it_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(b"one").unwrap();
        let w = Windows::default();
        let path = RelPath::from_bytes(b"f".to_vec());
        w.put(&path, &f, Some(known(10)));
        assert_eq!(
            w.get(&path, &f.metadata().unwrap()).as_deref(),
            Some(&known(10))
        );
        // Any change of content changes ctime (and here size).
        f.write_all(b"two").unwrap();
        assert_eq!(w.get(&path, &f.metadata().unwrap()), None);
        // Another file with the same name is not it.
        let other = fs::File::create(dir.path().join("g")).unwrap();
        w.put(&path, &f, Some(known(10)));
        assert_eq!(w.get(&path, &other.metadata().unwrap()), None);
        // Forgotten on a write that brings nothing to keep.
        w.put(&path, &f, None);
        assert!(w.is_empty());
        // A store that keeps nothing.
        let off = Windows::off();
        off.put(&path, &f, Some(known(10)));
        assert!(off.is_empty());
    }

    #[test]
    fn the_oldest_go_first_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::File::create(dir.path().join("f")).unwrap();
        let w = Windows::default();
        let each = MAX_BYTES / 8;
        for i in 0..20 {
            w.put(
                &RelPath::from_bytes(format!("f{i}").into_bytes()),
                &f,
                Some(known(each)),
            );
            assert!(w.inner.lock().unwrap().bytes <= MAX_BYTES);
        }
        let md = f.metadata().unwrap();
        assert!(w.get(&RelPath::from_bytes(b"f19".to_vec()), &md).is_some());
        assert!(w.get(&RelPath::from_bytes(b"f0".to_vec()), &md).is_none());
        assert_eq!(w.len(), MAX_BYTES / (each + 32));
    }
}
