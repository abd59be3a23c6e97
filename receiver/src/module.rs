//! A module as the running server holds it: its configuration, its live session count, its
//! digest cache, and the start-up clean-up of its staging directory.

use crate::config::Module;
use crate::STAGING_DIR;
use ferry_protocol::local::DigestCache;
use ferry_protocol::{io_reason, RelPath};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

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
    /// Prepares a module: checks its root (a directory, writable if the module is), empties
    /// its staging directory. The error is the reason its clients are refused with.
    pub fn open(module: Module, state_dir: Option<&Path>) -> Result<ModuleState, String> {
        let why = |what: String| {
            format!(
                "module {:?}: path {} {what}",
                module.name,
                module.path.display()
            )
        };
        match fs::metadata(&module.path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(why("is not a directory".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(why("does not exist".into()))
            }
            Err(e) => return Err(why(format!("cannot be read: {}", io_reason(&e)))),
        }
        if !module.read_only {
            if let Err(e) = writable(&module.path) {
                return Err(match e.raw_os_error() {
                    Some(libc::EROFS) => why("is on a read-only filesystem".into()),
                    _ => why(format!("is not writable: {}", io_reason(&e))),
                });
            }
            clean_staging(&module.path).map_err(|e| why(format!("staging: {}", io_reason(&e))))?;
        }
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

fn writable(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; access has no other effects.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A configured module as the server holds it: open, or broken with the reason its clients
/// are told. A broken module is tried again whenever a client asks for it (the disk may have
/// been mounted since), and logged once per new reason; the other modules never notice.
pub struct ModuleSlot {
    module: Module,
    state_dir: Option<PathBuf>,
    state: Mutex<Result<Arc<ModuleState>, String>>,
}

impl ModuleSlot {
    /// Opens `module`, logging why if it cannot be served.
    pub fn new(module: Module, state_dir: Option<PathBuf>) -> ModuleSlot {
        let state = ModuleState::open(module.clone(), state_dir.as_deref()).map(Arc::new);
        if let Err(why) = &state {
            tracing::error!("{why}; its clients are refused until it is fixed");
        }
        ModuleSlot {
            module,
            state_dir,
            state: Mutex::new(state),
        }
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.module.name
    }

    /// The open module, or why it cannot be served.
    pub fn get(&self) -> Result<Arc<ModuleState>, String> {
        let mut state = self.state.lock().expect("module lock");
        if let Err(before) = &*state {
            let again = ModuleState::open(self.module.clone(), self.state_dir.as_deref());
            match again {
                Ok(open) => {
                    tracing::info!(module = %self.module.name, "module is usable again");
                    *state = Ok(Arc::new(open));
                }
                Err(why) => {
                    if &why != before {
                        tracing::error!("{why}; its clients are refused until it is fixed");
                    }
                    *state = Err(why);
                }
            }
        }
        state.clone()
    }

    /// The module if it is open (for saving caches at shutdown).
    pub fn opened(&self) -> Option<Arc<ModuleState>> {
        self.state
            .lock()
            .expect("module lock")
            .as_ref()
            .ok()
            .cloned()
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
