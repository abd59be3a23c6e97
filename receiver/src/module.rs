//! A module as the running server holds it: its configuration, its live session count, its
//! digest cache, and the start-up clean-up of its staging directory.

use crate::config::Module;
use crate::STAGING_DIR;
use ferry_protocol::local::DigestCache;
use ferry_protocol::RelPath;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

/// A module as the running server sees it: configuration, live session count and the digest
/// cache shared by its sessions.
pub struct ModuleState {
    /// Configuration.
    pub module: Module,
    /// Sessions currently open.
    pub active: AtomicUsize,
    /// Content digests of the module's files.
    pub cache: Mutex<DigestCache>,
}

impl ModuleState {
    /// Prepares a module: checks its root, empties its staging directory.
    pub fn open(module: Module, state_dir: Option<&Path>) -> io::Result<ModuleState> {
        let md = fs::metadata(&module.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "module {:?}: path {}: {e}",
                    module.name,
                    module.path.display()
                ),
            )
        })?;
        if !md.is_dir() {
            return Err(io::Error::other(format!(
                "module {:?}: path {} is not a directory",
                module.name,
                module.path.display()
            )));
        }
        clean_staging(&module.path)?;
        let cache = match state_dir {
            Some(dir) => DigestCache::open(dir.join(format!("{}.digests", module.name))),
            None => DigestCache::in_memory(),
        };
        Ok(ModuleState {
            module,
            active: AtomicUsize::new(0),
            cache: Mutex::new(cache),
        })
    }
}

/// Removes leftovers of interrupted transfers and makes sure the staging directory exists.
/// The directory itself is kept, so the module root's mtime does not change on every start.
pub fn clean_staging(root: &Path) -> io::Result<()> {
    let staging = root.join(STAGING_DIR);
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", staging.display()));
    match fs::symlink_metadata(&staging) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => fs::remove_file(&staging).map_err(ctx)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
    }
    match fs::create_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ctx(e)),
    }
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700)).map_err(ctx)?;
    let mut removed = 0;
    for item in fs::read_dir(&staging).map_err(ctx)? {
        let item = item.map_err(ctx)?;
        let p = item.path();
        let r = if item.file_type().map_err(ctx)?.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(ctx)?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(path = %staging.display(), removed, "removed leftover partial files");
    }
    Ok(())
}

/// Hides the staging directory from listings and verification.
pub fn module_filter(path: &RelPath, _is_dir: bool) -> bool {
    path.as_bytes() != STAGING_DIR.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_empties_staging_but_keeps_the_directory_and_root_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join(STAGING_DIR).join("nested")).unwrap();
        fs::write(root.join(STAGING_DIR).join("123.4.5"), b"half a file").unwrap();
        let t = filetime::FileTime::from_unix_time(1_000_000, 0);
        filetime::set_file_mtime(root, t).unwrap();
        clean_staging(root).unwrap();
        assert_eq!(fs::read_dir(root.join(STAGING_DIR)).unwrap().count(), 0);
        let md = fs::metadata(root).unwrap();
        assert_eq!(filetime::FileTime::from_last_modification_time(&md), t);
        assert_eq!(
            fs::metadata(root.join(STAGING_DIR))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
    }
}
