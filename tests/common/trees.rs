//! Tree comparisons independent of `ferry verify`, and reading summary lines.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Reads `key=value` from a summary line.
pub fn summary_value(summary: &str, key: &str) -> u64 {
    let needle = format!("{key}=");
    let at = summary
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in {summary}"));
    summary[at + needle.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Compares two trees independently of `ferry verify`: types, bytes, modes, mtimes (ns),
/// link targets, and owners. Nothing is ignored: a receiver leaves nothing of its own in a
/// module.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    if let Some(d) = tree_difference(a, b) {
        panic!("{} and {} differ: {d}", a.display(), b.display());
    }
}

/// The first difference between two trees (see [`assert_trees_equal`]), if any.
pub fn tree_difference(a: &Path, b: &Path) -> Option<String> {
    tree_difference_with(a, b, true)
}

/// Like [`tree_difference`]; `exact` false is what a stock rsync achieves: the roots' own
/// metadata is ignored (rsyncd never sets its module directory's times), and the mtimes of
/// directories and symlinks compare to the second (rsync leaves one created in the same
/// second as its source with the receiver's nanoseconds).
pub fn tree_difference_with(a: &Path, b: &Path, exact: bool) -> Option<String> {
    let mut la = listing(a);
    let mut lb = listing(b);
    if !exact {
        for l in [&mut la, &mut lb] {
            l.retain(|e| !e.0.is_empty());
            for e in l.iter_mut() {
                if e.1 .0 & 0o170000 != 0o100000 {
                    e.1 .2 = 0;
                }
            }
        }
    }
    let names_a: Vec<&String> = la.iter().map(|x| &x.0).collect();
    let names_b: Vec<&String> = lb.iter().map(|x| &x.0).collect();
    if names_a != names_b {
        let only_a: Vec<_> = names_a
            .iter()
            .filter(|n| !names_b.contains(n))
            .take(5)
            .collect();
        let only_b: Vec<_> = names_b
            .iter()
            .filter(|n| !names_a.contains(n))
            .take(5)
            .collect();
        return Some(format!(
            "different entries ({} vs {}); only left: {only_a:?}; only right: {only_b:?}",
            names_a.len(),
            names_b.len()
        ));
    }
    for ((p, ma, ca), (_, mb, cb)) in la.iter().zip(lb.iter()) {
        if ma != mb {
            return Some(format!("metadata of {p:?}: {ma:?} vs {mb:?}"));
        }
        if ca != cb {
            return Some(format!("content of {p:?}"));
        }
    }
    None
}

/// Waits until the trees are equal; panics with the last difference after `secs`.
pub fn wait_equal(a: &Path, b: &Path, secs: u64, what: &str) {
    wait_equal_with(a, b, secs, what, true)
}

/// [`wait_equal`] with [`tree_difference_with`]'s `exact`.
pub fn wait_equal_with(a: &Path, b: &Path, secs: u64, what: &str, exact: bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // The trees may change under the walk; a vanished entry is just "not yet".
        let d = std::panic::catch_unwind(|| tree_difference_with(a, b, exact))
            .unwrap_or_else(|_| Some("changed during comparison".into()));
        match d {
            None => return,
            Some(d) if Instant::now() > deadline => {
                panic!("{what}: not converged after {secs}s: {d}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Every entry below `root` and `root` itself (as ""), sorted by path: (path, (mode, mtime,
/// mtime ns, uid, gid), content or link target).
pub type Listing = Vec<(String, (u32, i64, i64, u32, u32), Vec<u8>)>;

/// The [`Listing`] of `root`.
pub fn listing(root: &Path) -> Listing {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Listing) {
    let md = std::fs::symlink_metadata(dir).unwrap();
    let rel = dir.strip_prefix(root).unwrap().display().to_string();
    out.push((
        rel,
        (md.mode(), md.mtime(), md.mtime_nsec(), md.uid(), md.gid()),
        Vec::new(),
    ));
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if md.is_dir() {
            walk(root, &p, out);
        } else {
            let content = if md.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if md.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            // Linux symlink permission bits are always 0777; mode compares the type too.
            let mode = md.mode();
            out.push((
                rel,
                (mode, md.mtime(), md.mtime_nsec(), md.uid(), md.gid()),
                content,
            ));
        }
    }
}

/// Files below `root` (directories too with `dirs`; `root` itself not counted), never
/// following symlinks; 0 if it cannot be read.
pub fn count_entries(root: &Path, dirs: bool) -> usize {
    std::fs::read_dir(root).map_or(0, |items| {
        items
            .flatten()
            .map(|e| {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    usize::from(dirs) + count_entries(&e.path(), dirs)
                } else {
                    1
                }
            })
            .sum()
    })
}

/// Makes `path` a sparse file of `size` bytes with `data` written at each of `at`; returns
/// the bytes it holds (the rest reads as zeros).
pub fn write_sparse(path: &Path, size: u64, data: &[u8], at: &[u64]) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &offset in at {
        f.write_all_at(data, offset).unwrap();
    }
    f.sync_all().unwrap();
    (data.len() * at.len()) as u64
}

/// Bytes the filesystem allocated for `path`.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
