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
//! A big file sent whole is signed after its commit, not as it comes: signing was a quarter
//! of the receiver's work on a new big file, and nothing needs the signature before the
//! file's next change. [`Windows::sign_later`] hands the committed file to one background
//! thread of the lowest priority, which reads it back (from the page cache, as a rule),
//! signs it and keeps the result only if the file is still as committed, its windows hash to
//! what arrived, and nothing was committed at its path since. A delta that comes first reads
//! and signs the copy, as for any file not known; so does one when the thread is busy.
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
    /// Each path's file as committed, what is known of it (`None`: being signed), and when
    /// it was kept.
    map: HashMap<RelPath, (CacheKey, Option<Arc<Known>>, u64)>,
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
        (*key == CacheKey::of_metadata(md)).then(|| known.clone())?
    }

    /// Keeps `known` for `path`, whose file was just committed and is `file`; `None`
    /// forgets what was kept of it.
    pub fn put(&self, path: &RelPath, file: &fs::File, known: Option<Known>) {
        let mut inner = self.inner.lock().expect("windows lock");
        inner.forget(path);
        let Some(known) = known else { return };
        let (true, Ok(md)) = (!self.off, file.metadata()) else {
            return;
        };
        let at = inner.stamp();
        inner
            .map
            .insert(path.clone(), (CacheKey::of_metadata(&md), None, at));
        inner.fill(path, at, known);
    }

    /// Forgets what was kept of `path`, whose big file was just committed as `file` with the
    /// window digests `windows` (of the body that arrived), and has the file signed by the
    /// background signer, to be kept as [`Windows::put`] would if it is still as committed
    /// then. Nothing is kept if the signer is busy.
    pub fn sign_later(
        self: &Arc<Self>,
        path: &RelPath,
        file: &fs::File,
        windows: Vec<Digest>,
        stats: &Arc<crate::stats::Stats>,
    ) {
        let mut inner = self.inner.lock().expect("windows lock");
        inner.forget(path);
        let (true, Ok(md), Ok(file)) = (!self.off, file.metadata(), file.try_clone()) else {
            return;
        };
        let key = CacheKey::of_metadata(&md);
        let at = inner.stamp();
        let job = Job {
            windows: self.clone(),
            stats: stats.clone(),
            path: path.clone(),
            file,
            len: md.len(),
            key,
            at,
            digests: windows,
        };
        if signer().is_some_and(|s| s.try_send(job).is_ok()) {
            inner.map.insert(path.clone(), (key, None, at));
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

impl Inner {
    fn forget(&mut self, path: &RelPath) {
        if let Some((_, Some(old), _)) = self.map.remove(path) {
            self.bytes -= old.bytes();
        }
    }

    fn stamp(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Keeps `known` for `path` if the entry waiting for it is the one stamped `at` (nothing
    /// was committed there since), letting the oldest go past [`MAX_BYTES`]. Returns whether
    /// it was kept.
    fn fill(&mut self, path: &RelPath, at: u64, known: Known) -> bool {
        match self.map.get_mut(path) {
            Some((_, slot @ None, stamped)) if *stamped == at => {
                if known.bytes() > MAX_BYTES / 4 {
                    self.map.remove(path);
                    return false;
                }
                self.bytes += known.bytes();
                *slot = Some(Arc::new(known));
            }
            _ => return false,
        }
        while self.bytes > MAX_BYTES {
            let oldest = self
                .map
                .iter()
                .filter(|(_, (_, known, _))| known.is_some())
                .min_by_key(|(_, (_, _, at))| *at)
                .map(|(p, _)| p.clone())
                .expect("bytes kept means entries kept");
            self.forget(&oldest);
        }
        true
    }
}

/// Files signed after their commit and waiting for the signer, at most; more are not kept.
const SIGN_QUEUE: usize = 64;

/// A committed big file to sign ([`Windows::sign_later`]).
struct Job {
    windows: Arc<Windows>,
    stats: Arc<crate::stats::Stats>,
    path: RelPath,
    /// The file as committed (written only: read through its `/proc/self/fd` entry).
    file: fs::File,
    len: u64,
    key: CacheKey,
    at: u64,
    /// The window digests of the body that arrived.
    digests: Vec<Digest>,
}

impl Job {
    fn run(self) {
        use std::os::fd::AsRawFd;
        let Job {
            windows,
            stats,
            path,
            file,
            len,
            key,
            at,
            digests,
        } = self;
        let read = fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let signed = read
            .and_then(|f| ferry_protocol::delta::sign_file(&f, len))
            .ok();
        let still = file
            .metadata()
            .is_ok_and(|md| CacheKey::of_metadata(&md) == key);
        // Let go of the file before the outcome shows, as its commit alone would have (on
        // XFS the last close gives back what was reserved past its end).
        drop(file);
        let mut inner = windows.inner.lock().expect("windows lock");
        match signed.filter(|s| still && s.windows == digests) {
            Some(signed) => {
                let known = Known {
                    signature: signed.signature,
                    windows: signed.windows,
                };
                if inner.fill(&path, at, known) {
                    stats
                        .signed_later
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // Changed or unreadable: its waiting entry goes, if still its own.
            None => {
                if matches!(inner.map.get(&path), Some((_, None, stamped)) if *stamped == at) {
                    inner.map.remove(&path);
                }
            }
        }
    }
}

/// The background signer: one thread of the lowest priority, started at its first job.
fn signer() -> Option<&'static std::sync::mpsc::SyncSender<Job>> {
    static SIGNER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Job>>> =
        std::sync::OnceLock::new();
    SIGNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(SIGN_QUEUE);
            std::thread::Builder::new()
                .name("ferry-sign".into())
                .spawn(move || {
                    // SAFETY: gettid and setpriority on this thread alone (Linux threads
                    // have their own nice value).
                    unsafe {
                        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
                    }
                    for job in rx {
                        job.run();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
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

    /// A file committed to `dir` as `name`, of `len` pseudo-random bytes, and the window
    /// digests its body had.
    fn committed(
        dir: &std::path::Path,
        name: &str,
        len: usize,
        seed: u8,
    ) -> (fs::File, Vec<u8>, Vec<Digest>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        fs::write(dir.join(name), &data).unwrap();
        let mut d = ferry_protocol::body::BodyDigest::new();
        d.data(&data);
        let file = fs::OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .unwrap();
        (file, data, d.windows().unwrap())
    }

    /// Waits (a minute at most) until `path` is known as `md` says.
    fn wait_known(w: &Windows, path: &RelPath, md: &fs::Metadata) -> Arc<Known> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(k) = w.get(path, md) {
                return k;
            }
            assert!(std::time::Instant::now() < deadline, "{path} never known");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A big file sent whole is signed after its commit, off the caller's thread: it becomes
    /// known with the signature a reading of it gives, and is kept only while nothing was
    /// committed at its path since and its bytes hash to what arrived. The signer takes its
    /// files in turn, so a file signed after another tells that the other's turn is over.
    #[test]
    fn a_file_signed_after_its_commit_is_kept_only_as_committed() {
        use ferry_protocol::delta::WINDOW;
        let dir = tempfile::tempdir().unwrap();
        let w = Arc::new(Windows::default());
        let stats = Arc::new(crate::stats::Stats::default());
        let p = |n: &str| RelPath::from_bytes(n.as_bytes().to_vec());
        let (f, data, digests) = committed(dir.path(), "a", 2 * WINDOW + 100, 1);
        w.sign_later(&p("a"), &f, digests, &stats);
        let k = wait_known(&w, &p("a"), &f.metadata().unwrap());
        assert_eq!(k.signature, ferry_protocol::delta::sign(&data));
        assert_eq!(
            stats
                .signed_later
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // Committed again while its signing waits: the later commit's entry stays.
        let (g, _, digests) = committed(dir.path(), "b", WINDOW + 1, 2);
        w.sign_later(&p("b"), &g, digests, &stats);
        w.put(&p("b"), &g, Some(known(10)));
        // A body whose bytes are not what arrived (changed behind the receiver's back) is
        // not kept, nor is anything left waiting for it.
        let (h, _, mut digests) = committed(dir.path(), "c", WINDOW + 1, 3);
        digests[0] = [0; 32];
        w.sign_later(&p("c"), &h, digests, &stats);
        let (last, _, digests) = committed(dir.path(), "d", WINDOW + 1, 4);
        w.sign_later(&p("d"), &last, digests, &stats);
        wait_known(&w, &p("d"), &last.metadata().unwrap());
        assert_eq!(
            w.get(&p("b"), &g.metadata().unwrap()).as_deref(),
            Some(&known(10))
        );
        assert!(!w.inner.lock().unwrap().map.contains_key(&p("c")));
        assert_eq!(
            stats
                .signed_later
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
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
