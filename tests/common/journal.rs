//! A module's history as an operator sees it: the journal's rows and the objects read straight
//! from the history directory (`journal.sqlite3`, `objects/ID`), not through ferry.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The journal's rows: (id, path, action, object, renamed_to), by id. Read as a gateway
/// taking a shared history's lease reads it: its pages cached on this host dropped first, for
/// on a volume mounted twice one mount's page cache does not see what was written through the
/// other (rows written by one gateway were missing here while their objects were listed).
pub fn rows(history: &Path) -> Vec<(i64, String, String, bool, Option<String>)> {
    use std::os::fd::AsRawFd;
    for name in ["journal.sqlite3", "journal.sqlite3-journal"] {
        if let Ok(f) = fs::File::open(history.join(name)) {
            // SAFETY: an open descriptor; advice only, nothing is read or written.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    let db = rusqlite::Connection::open_with_flags(
        history.join("journal.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT id, path, action, object, renamed_to FROM versions ORDER BY id")
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    q.query_map([], |r| {
        Ok((
            r.get(0)?,
            text(r.get(1)?),
            r.get(2)?,
            r.get::<_, i64>(3)? != 0,
            r.get::<_, Option<Vec<u8>>>(4)?.map(text),
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The ids in `objects/`.
pub fn objects(history: &Path) -> BTreeSet<i64> {
    fs::read_dir(history.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// Every row with an object names one that exists, and every object has its row.
pub fn assert_consistent(history: &Path) {
    let journaled: BTreeSet<i64> = rows(history)
        .into_iter()
        .filter(|r| r.3)
        .map(|r| r.0)
        .collect();
    assert_eq!(journaled, objects(history), "journal and objects disagree");
}

/// A tree as (body, mode, mtime) by relative path: a directory's body is "dir", a symlink's
/// its target; directories' times left out.
pub fn tree(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let body = if md.is_dir() {
                stack.push(p.clone());
                b"dir".to_vec()
            } else if md.file_type().is_symlink() {
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                fs::read(&p).unwrap()
            };
            let mtime = if md.is_dir() { 0 } else { md.mtime() };
            out.insert(rel, (body, md.mode() & 0o7777, mtime));
        }
    }
    out
}
