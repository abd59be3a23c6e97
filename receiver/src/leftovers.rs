//! What an earlier run may have left in a module, found and removed at start-up, and the
//! names of this process's own entries in flight, which a sweep leaves alone.

use crate::{LEGACY_STAGING_DIR, TEMP_PREFIX};
use ferry_protocol::local;
use ferry_protocol::RelPath;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Removes what an earlier run may have left in a module: the staging directory of earlier
/// versions and, below the root, entries named with [`TEMP_PREFIX`] by another process (a
/// crash between creating one and renaming it into place). The root is swept at once; the
/// rest of the tree in the background, so a big module does not delay start-up.
pub fn clean_staging(root: &Path) -> io::Result<()> {
    let legacy = root.join(LEGACY_STAGING_DIR);
    match fs::symlink_metadata(&legacy) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(&legacy)?,
        Ok(_) => fs::remove_file(&legacy)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let removed = sweep_dir(&local::open_root(root)?)?;
    if removed > 0 {
        tracing::info!(path = %root.display(), removed, "removed entries left in flight by an earlier run");
    }
    let root = root.to_path_buf();
    std::thread::Builder::new()
        .name("sweep".into())
        .spawn(move || {
            let removed = sweep_tree(&root);
            if removed > 0 {
                tracing::info!(path = %root.display(), removed, "removed entries left in flight by an earlier run");
            }
        })?;
    Ok(())
}

/// The name prefix of this process's entries in flight; a sweep leaves those alone.
pub fn own_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!(
            "{TEMP_PREFIX}{}.{:08x}.",
            std::process::id(),
            h.finish() as u32
        )
    })
}

fn is_leftover(name: &[u8]) -> bool {
    name.starts_with(TEMP_PREFIX.as_bytes()) && !name.starts_with(own_prefix().as_bytes())
}

/// Removes leftovers directly in the held directory `dir`.
fn sweep_dir(dir: &OwnedFd) -> io::Result<usize> {
    let mut removed = 0;
    for item in fs::read_dir(local::fd_path(dir))? {
        let item = item?;
        if !is_leftover(item.file_name().as_bytes()) {
            continue;
        }
        // The path goes through the held directory; neither call follows a symlink there.
        let p = item.path();
        let r = if item.file_type()?.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        match r {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// [`sweep_dir`] over every directory below `root`, each opened through its parent's
/// descriptor without following symlinks; errors are skipped (a directory that cannot be read
/// has nothing of ours in it).
fn sweep_tree(root: &Path) -> usize {
    let Ok(root) = local::open_root(root) else {
        return 0;
    };
    let mut removed = 0;
    let mut stack = vec![(root, true)];
    while let Some((dir, is_root)) = stack.pop() {
        let Ok(items) = fs::read_dir(local::fd_path(&dir)) else {
            continue;
        };
        for item in items.flatten() {
            let name = item.file_name();
            if item.file_type().is_ok_and(|t| t.is_dir()) && !is_leftover(name.as_bytes()) {
                if let Ok(sub) = local::open_child(&dir, name.as_bytes()) {
                    stack.push((sub, false));
                }
            }
        }
        if !is_root {
            removed += sweep_dir(&dir).unwrap_or(0);
        }
    }
    removed
}

/// Hides entries in flight, and the staging directory of earlier versions, from listings and
/// verification.
pub fn module_filter(path: &RelPath, _is_dir: bool) -> bool {
    !(path.file_name().starts_with(TEMP_PREFIX.as_bytes())
        || path.as_bytes() == LEGACY_STAGING_DIR.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_what_an_earlier_run_left_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join(LEGACY_STAGING_DIR).join("nested")).unwrap();
        fs::write(
            root.join(LEGACY_STAGING_DIR).join("123.4.5"),
            b"half a file",
        )
        .unwrap();
        fs::create_dir_all(root.join("a/b")).unwrap();
        let left = format!("{TEMP_PREFIX}999.00000000.1");
        fs::write(root.join(&left), b"x").unwrap();
        fs::write(root.join("a/b").join(&left), b"x").unwrap();
        let ours = format!("{}7", own_prefix());
        fs::write(root.join("a").join(&ours), b"in flight now").unwrap();
        fs::write(root.join("a/keep"), b"user data").unwrap();
        clean_staging(root).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while root.join("a/b").join(&left).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "deep leftover not swept"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!root.join(LEGACY_STAGING_DIR).exists());
        assert!(!root.join(&left).exists());
        assert!(
            root.join("a").join(&ours).exists(),
            "this process's entry in flight"
        );
        assert!(root.join("a/keep").exists());
    }
}
