//! A module as the running server holds it: its configuration, its live session count, its
//! digest cache, and the start-up clean-up of its staging directory.

use crate::config::{Module, Owner};
use crate::history::History;
use crate::incoming::Partials;
use crate::lease::Lease;
use crate::leftovers::{clean_staging, own_prefix};
use ferry_protocol::local::{DigestCache, Kept, Rules, Summary, KEPT_FOR};
use ferry_protocol::message::Keeps;
use ferry_protocol::xattr::{self, Namespaces};
use ferry_protocol::{io_reason, RelPath};
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
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
    /// Transfers cut off with their session, kept to resume.
    pub partials: Partials,
    /// Attribute namespaces the module's filesystem can hold.
    pub xattr_support: Namespaces,
    /// Paths already warned about (attributes their filesystem cannot hold), said once each.
    warned: Mutex<std::collections::HashSet<RelPath>>,
    /// Writes the filesystem refused as a whole (full, read-only, failing), said once a
    /// minute.
    unwritable: Mutex<ferry_protocol::said::Said>,
    /// Where superseded states are kept; `None` for a mirror (or a read-only module).
    pub history: Option<History>,
    /// Whether the module's filesystem clones files (reflinks), found out on the first delta.
    pub reflinks: Reflinks,
    /// Whether the module's filesystem makes unnamed files, found out on the first file.
    pub unnamed: Unnamed,
    /// Signatures and window digests of the big files this receiver committed.
    pub windows: Arc<crate::windows::Windows>,
    /// Whether one `syncfs` makes everything written to the module's filesystem durable (see
    /// [`syncfs_reaches_storage`]); where not, every file and directory is flushed itself.
    pub syncfs: bool,
    /// The write lease, for a module that several gateways serve on a shared filesystem.
    pub lease: Option<Arc<Lease>>,
    /// The module's summary kept from one whole compare to the next.
    pub summaries: Summaries,
    /// Whether what the lease's previous holder left has been swept (and the history checked)
    /// since this gateway took it; held while the lease is taken and swept, so that no writer
    /// of this gateway starts before that has ended.
    swept: Mutex<bool>,
}

/// A module's summary kept from one whole compare to the next ([`Kept`]): a compare with
/// nothing changed reads only the directories the receiver changed since (marked here after
/// each change, with the directories the group commit flushes) and those whose own `lstat`
/// moved. Off where other writers share the module (gateways on a shared volume) and for a
/// restore's destination. The marks are taken by the next summary; past `MAX_MARKED`
/// directories marked, what was kept is dropped instead, so a module never summarised holds
/// no growing set.
pub struct Summaries {
    on: bool,
    /// Directories changed since the last summary took the marks; `None` until a summary
    /// has been kept (nothing to mark against), or after too many.
    marked: Mutex<Option<HashSet<RelPath>>>,
    kept: Mutex<Kept>,
    /// Directories the last summary took as kept.
    pub taken: std::sync::atomic::AtomicU64,
}

/// Directories marked between two summaries before what was kept is dropped.
const MAX_MARKED: usize = 65_536;

impl Summaries {
    fn new(on: bool) -> Summaries {
        Summaries {
            on,
            marked: Mutex::new(None),
            kept: Mutex::new(Kept::new(KEPT_FOR)),
            taken: Default::default(),
        }
    }

    /// Notes that the entries of the directories `dirs` changed. `dirs` is not iterated
    /// while nothing is kept.
    pub fn mark<P: std::borrow::Borrow<RelPath>>(&self, dirs: impl IntoIterator<Item = P>) {
        if !self.on {
            return;
        }
        let mut marked = self.marked.lock().expect("summary marks");
        let Some(set) = marked.as_mut() else { return };
        set.extend(dirs.into_iter().map(|d| d.borrow().clone()));
        if set.len() > MAX_MARKED {
            *marked = None;
            self.kept.lock().expect("kept summary").clear();
        }
    }

    /// The summary of the module's tree beneath the held `root` (see [`Summary::build`]),
    /// from what the last one kept where that can be; how many directories it took as kept.
    pub fn build(
        &self,
        root: &std::os::fd::OwnedFd,
        rules: Rules,
        filter: ferry_protocol::local::Filter<'_>,
        errors: &mut Vec<(RelPath, io::Error)>,
    ) -> (Summary, u64) {
        let read = rules.cmp.xattrs;
        // Another session's summary under way: this one reads the whole tree.
        let kept = if self.on {
            self.kept.try_lock().ok()
        } else {
            None
        };
        let Some(mut kept) = kept else {
            let s = Summary::build(root, rules, filter, read, Namespaces::NONE, errors);
            return (s, 0);
        };
        // Marks made from now on are for the next summary.
        let marks = self
            .marked
            .lock()
            .expect("summary marks")
            .replace(HashSet::new());
        if marks.is_none() {
            kept.clear();
        }
        let marks = marks.unwrap_or_default();
        let (s, taken) = Summary::build_kept(root, rules, filter, read, &mut kept, &marks, errors);
        self.taken
            .store(taken, std::sync::atomic::Ordering::Relaxed);
        (s, taken)
    }
}

/// Whether a module's filesystem clones files (`FICLONE`: XFS with reflink, btrfs): found out
/// on the first delta and said once either way. A delta into a clone of its base writes only
/// what moved or changed, so a 1 MiB change to a 256 MiB file writes and flushes about 1 MiB
/// (and a kept history version shares every unchanged extent with its successor).
#[derive(Default)]
pub struct Reflinks(std::sync::atomic::AtomicU8);

/// What a module's filesystem was found to do (`Reflinks`, `Unnamed`): not yet known, yes, no.
const UNKNOWN: u8 = 0;
const CAN: u8 = 1;
const CANNOT: u8 = 2;

impl Reflinks {
    /// Makes the empty `dst` a clone of `src` where the filesystem can (true); false, with
    /// `dst` as it was, where it cannot.
    pub fn clone_into(&self, dst: &std::fs::File, src: &std::fs::File, module: &str) -> bool {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering::Relaxed;
        if self.0.load(Relaxed) == CANNOT {
            return false;
        }
        // SAFETY: two valid descriptors; FICLONE shares src's extents into dst, nothing else.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if r == 0 {
            if self.0.swap(CAN, Relaxed) == UNKNOWN {
                tracing::info!(
                    module,
                    "the filesystem clones files: a delta writes only what it changes"
                );
            }
            return true;
        }
        let e = std::io::Error::last_os_error();
        let unsupported = matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
        );
        if unsupported && self.0.load(Relaxed) == UNKNOWN {
            self.0.store(CANNOT, Relaxed);
            tracing::info!(
                module,
                "the filesystem cannot clone files ({}): a delta writes the whole new file",
                ferry_protocol::io_reason(&e)
            );
        } else {
            tracing::debug!(module, "clone failed ({e}): this file is written whole");
        }
        false
    }
}

/// Whether a module's filesystem makes unnamed files (`O_TMPFILE`): found out on the first
/// file and said once. Where it cannot (GlusterFS and other FUSE filesystems), a file is
/// staged under a reserved name beside its destination instead, without trying again.
#[derive(Default)]
pub struct Unnamed(std::sync::atomic::AtomicU8);

impl Unnamed {
    /// An unnamed new file of permissions `mode` in the held directory `dir`, or `None`
    /// where the filesystem makes none (known, or found out now). Unnamed, it can be opened
    /// by no one else whatever its permissions (only through this process's descriptor), so
    /// it is made with the ones it will keep, and most files need no `fchmod` later.
    pub fn create(
        &self,
        dir: &std::os::fd::OwnedFd,
        mode: u32,
        module: &str,
    ) -> io::Result<Option<std::fs::File>> {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::sync::atomic::Ordering::Relaxed;
        if self.0.load(Relaxed) == CANNOT {
            return Ok(None);
        }
        let flags = libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC;
        // SAFETY: a valid descriptor and a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags, mode & 0o777) };
        let unnamed = if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a descriptor just opened, owned by nothing else.
            Ok(unsafe { std::fs::File::from_raw_fd(fd) })
        };
        match unnamed {
            Ok(file) => {
                self.0.store(CAN, Relaxed);
                Ok(Some(file))
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                if self.0.swap(CANNOT, Relaxed) != CANNOT {
                    tracing::info!(
                        module,
                        "the filesystem makes no unnamed files (O_TMPFILE: {}): files are staged \
                         under reserved names beside their destination",
                        io_reason(&e)
                    );
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether `syncfs` on the filesystem at `path` makes what was written there durable. Not on
/// FUSE (GlusterFS, …: the kernel hands its dirty pages to the server but never asks the
/// server to flush; only `fsync` does) nor on NFS or SMB, whose flushes are per file; yes
/// elsewhere, and if it cannot be told.
pub fn syncfs_reaches_storage(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return true;
    }
    syncfs_flushes(st.f_type as i64)
}

/// [`syncfs_reaches_storage`] for a filesystem of `statfs` type `f_type`.
fn syncfs_flushes(f_type: i64) -> bool {
    const FUSE: i64 = 0x6573_5546;
    const NFS: i64 = 0x6969;
    const SMB2: i64 = 0xFE53_4D42;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB: i64 = 0x517B;
    !matches!(f_type, FUSE | NFS | SMB2 | CIFS | SMB)
}

/// Paths remembered as warned about, per module.
const MAX_WARNED: usize = 10_000;

impl ModuleState {
    /// Before a session writes: holds the module's lease, if it has one, taking it when it is
    /// free or expired (and then sweeping what an earlier holder left in flight). `Err`: the
    /// refusal to send the peer. Blocking.
    pub fn lease_for_writing(&self) -> Result<(), String> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let mut swept = self.swept.lock().expect("swept lock");
        let refused = |why: String| {
            format!(
                "module {}: this gateway ({}) may not write it: {why}",
                self.module.name,
                lease.gateway()
            )
        };
        if lease.acquire().map_err(|r| refused(r.to_string()))? {
            *swept = false;
        }
        // Until the sweep has once succeeded under this holding, no writer starts.
        if !*swept {
            clean_staging(&self.module.path)
                .map_err(|e| refused(format!("staging: {}", io_reason(&e))))?;
            if let Some(history) = &self.history {
                history.recover(&self.module.name).map_err(refused)?;
            }
            *swept = true;
        }
        Ok(())
    }

    /// What a session is told when this gateway lost the module's lease while it wrote.
    pub fn lease_lost(&self) -> String {
        let gateway = self.lease.as_ref().map_or("", |l| l.gateway());
        let name = &self.module.name;
        format!("module {name}: this gateway ({gateway}) no longer holds the write lease")
    }

    /// Whether this gateway may write the module now (no lease, or the lease held).
    pub fn may_write(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| l.holds())
    }

    /// What this module keeps, on a receiver that is (or is not) `privileged` (root).
    /// Unprivileged, only `user.*` attributes and ACLs can be written; file capabilities are
    /// kept only where setuid bits are.
    pub fn keeps(&self, privileged: bool) -> Keeps {
        let m = &self.module;
        let mut xattrs = if privileged {
            Namespaces::ALL
        } else {
            Namespaces::USER.union(Namespaces::ACL)
        };
        if !m.setuid {
            xattrs = xattrs.without(Namespaces::CAPABILITY);
        }
        Keeps {
            owners: privileged && m.owner == Owner::Preserve,
            devices: privileged && m.devices,
            setid: m.setuid,
            xattrs: xattrs.intersect(self.xattr_support),
            history: self.history.is_some(),
        }
    }

    /// True the first time `path` is named (per module, while it is open).
    pub fn first_warning(&self, path: &RelPath) -> bool {
        let mut warned = self.warned.lock().expect("warned lock");
        warned.len() < MAX_WARNED && warned.insert(path.clone())
    }

    /// A write the filesystem refused as a whole: whether to say so (once a minute), and
    /// how many more failed so, unsaid, since it was last said.
    pub fn note_unwritable(&self) -> (bool, u64) {
        let now = std::time::Instant::now();
        self.unwritable.lock().expect("unwritable lock").note(now)
    }

    /// Prepares a module: checks its root (a directory, writable if the module is), empties
    /// its staging directory. The error is the reason its clients are refused with.
    pub fn open(module: Module, state_dir: Option<&Path>) -> Result<ModuleState, String> {
        ModuleState::open_as(module, state_dir, true)
    }

    /// A restore client's destination, written as a module is (no history, and no warning
    /// that it keeps none: it is not a backup).
    pub fn destination(module: Module) -> Result<ModuleState, String> {
        ModuleState::open_as(module, None, false)
    }

    fn open_as(
        module: Module,
        state_dir: Option<&Path>,
        backup: bool,
    ) -> Result<ModuleState, String> {
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
            // Under a lease another gateway may be writing now: what is left in flight is
            // swept when this one takes the lease (`ModuleState::lease_for_writing`).
            if module.lease.is_none() {
                clean_staging(&module.path)
                    .map_err(|e| why(format!("staging: {}", io_reason(&e))))?;
            }
        }
        let cache = match state_dir {
            Some(dir) => DigestCache::open(dir.join(format!("{}.digests", module.name))),
            None => DigestCache::in_memory(),
        };
        let xattr_support = if module.read_only {
            Namespaces::ALL
        } else {
            probe_xattrs(&module.path)
        };
        let missing = Namespaces::ALL.without(xattr_support);
        if !missing.is_empty() {
            tracing::warn!(
                module = %module.name,
                "the filesystem of {} cannot hold {} attributes: they are not kept there",
                module.path.display(),
                missing.describe()
            );
        }
        let syncfs = syncfs_reaches_storage(&module.path);
        if !syncfs && !module.read_only {
            tracing::info!(
                module = %module.name,
                "{} is on a network or FUSE filesystem, where syncfs may not reach the storage: \
                 every file and directory is flushed itself (fsync) before it is acknowledged",
                module.path.display()
            );
        }
        let history = match (&module.history, module.read_only) {
            (Some(h), false) if module.lease.is_some() => Some(History::open_shared(
                &module.name,
                &module.path,
                &h.dir,
                h.keep.clone(),
            )?),
            (Some(h), false) => Some(History::open(
                &module.name,
                &module.path,
                &h.dir,
                h.keep.clone(),
            )?),
            (None, false) if !backup => None,
            (None, false) => {
                tracing::warn!(
                    module = %module.name,
                    "module {:?} keeps no history: it is a mirror, and a deletion or overwrite on \
                     the source (a mistake, ransomware) is final here within milliseconds (a \
                     module keeps what is replaced and deleted with `history = \"DIR\"` in \
                     receiver.toml)",
                    module.name
                );
                None
            }
            (_, true) => None,
        };
        let lease = module
            .lease
            .as_ref()
            .filter(|_| !module.read_only)
            .map(|l| Arc::new(Lease::new(&l.path, &module.name, &l.gateway, l.expiry)));
        // Other gateways write a shared module too, where this one would not see it; a
        // restore's destination lives as long as the restore.
        let windows = if lease.is_some() || !backup {
            Arc::new(crate::windows::Windows::off())
        } else {
            Arc::new(crate::windows::Windows::default())
        };
        // Only a module this receiver alone writes can keep its summary (see `Summaries`).
        let summaries = Summaries::new(lease.is_none() && backup);
        Ok(ModuleState {
            summaries,
            lease,
            swept: Mutex::new(false),
            module,
            active: AtomicUsize::new(0),
            cache: Mutex::new(cache),
            partials: Partials::default(),
            xattr_support,
            warned: Mutex::default(),
            unwritable: Mutex::new(ferry_protocol::said::Said::per_minute(1)),
            history,
            reflinks: Reflinks::default(),
            unnamed: Unnamed::default(),
            windows,
            syncfs,
        })
    }
}

/// Which attributes the filesystem at `root` holds: one of each namespace is set on a new
/// file there (unnamed, or under a reserved name removed at once where `O_TMPFILE` is
/// missing); `EOPNOTSUPP` means no. Anything else (a permission error, no file at all) assumes
/// support and leaves the answer to each file.
fn probe_xattrs(root: &Path) -> Namespaces {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let unnamed = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(root);
    let file = match unnamed {
        Ok(f) => f,
        Err(_) => {
            // The root's times are the source's: put them back after the name comes and goes.
            let times = fs::metadata(root).ok().map(|m| {
                (
                    filetime::FileTime::from_last_access_time(&m),
                    filetime::FileTime::from_last_modification_time(&m),
                )
            });
            let name = root.join(format!("{}probe", own_prefix()));
            let named = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&name);
            let _ = fs::remove_file(&name);
            if let Some((atime, mtime)) = times {
                let _ = filetime::set_file_times(root, atime, mtime);
            }
            match named {
                Ok(f) => f,
                Err(_) => return Namespaces::ALL,
            }
        }
    };
    // A minimal access ACL (owner rw, group and others nothing), equal to mode 0600.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 0), (0x20, 0)] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(u32::MAX.to_le_bytes());
    }
    let at = xattr::At::Fd(file.as_raw_fd());
    let mut support = Namespaces::ALL;
    for (ns, name, value) in [
        (Namespaces::USER, &b"user.ferry-probe"[..], &b"1"[..]),
        (Namespaces::TRUSTED, b"trusted.ferry-probe", b"1"),
        (
            Namespaces::SECURITY.union(Namespaces::CAPABILITY),
            b"security.ferry-probe",
            b"1",
        ),
        (Namespaces::ACL, b"system.posix_acl_access", &acl),
    ] {
        if at.set(name, value).is_err_and(|e| xattr::unsupported(&e)) {
            support = support.without(ns);
        }
    }
    support
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
        match &state {
            Err(why) => tracing::error!("{why}; its clients are refused until it is fixed"),
            Ok(open) => prune_in_background(open),
        }
        ModuleSlot {
            module,
            state_dir,
            state: Mutex::new(state),
        }
    }

    /// Its configuration.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// The open module, or why it cannot be served.
    pub fn get(&self) -> Result<Arc<ModuleState>, String> {
        let mut state = self.state.lock().expect("module lock");
        if let Err(before) = &*state {
            let again = ModuleState::open(self.module.clone(), self.state_dir.as_deref());
            match again {
                Ok(open) => {
                    tracing::info!(module = %self.module.name, "module is usable again");
                    let open = Arc::new(open);
                    prune_in_background(&open);
                    *state = Ok(open);
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

/// Prunes the history of `module` (if it has one) now and then every minute (more often for
/// retention counted in seconds), on a thread of its own that ends with the module. Under a
/// write lease only the holder prunes.
fn prune_in_background(module: &Arc<ModuleState>) {
    let Some(history) = &module.history else {
        return;
    };
    let every = history
        .keep
        .rules
        .iter()
        .map(|r| r.every.unwrap_or(r.span).min(r.span) / 2)
        .chain([history.keep.floor / 2])
        .min()
        .unwrap_or(crate::history::PRUNE_EVERY)
        .clamp(
            std::time::Duration::from_secs(1),
            crate::history::PRUNE_EVERY,
        );
    let weak = Arc::downgrade(module);
    let (name, thread) = (
        module.module.name.clone(),
        format!("prune-{}", module.module.name),
    );
    let spawned = std::thread::Builder::new()
        .name(thread)
        .spawn(move || loop {
            let Some(module) = weak.upgrade() else { break };
            let Some(history) = &module.history else {
                break;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            // Under a lease, the holder prunes (taking the lease if it is free, as a writer
            // would); the other gateways leave the history alone.
            let pruned = match module.lease_for_writing() {
                Ok(()) => history.prune_while(now, &|| module.may_write()),
                Err(_) => Ok(0),
            };
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::info!(module = %name, pruned = n, "history pruned"),
                Err(e) => tracing::warn!(module = %name, "history: pruning failed: {e}"),
            }
            let history = Arc::downgrade(&module);
            drop(module);
            // Until the next round, or a commit that finds the filesystem short of space.
            match history.upgrade() {
                Some(m) => match &m.history {
                    Some(h) => h.wait_for_pressure(every),
                    None => break,
                },
                None => break,
            }
        });
    if let Err(e) = spawned {
        let module = &module.module.name;
        tracing::error!(%module, "history: cannot start pruning: {e}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn syncfs_is_trusted_on_local_filesystems_only() {
        // (statfs type, trusted): XFS, ext4, btrfs, tmpfs; FUSE, NFS, SMB2, CIFS, SMB.
        let table = [
            (0x5846_5342, true),
            (0xEF53, true),
            (0x9123_683E, true),
            (0x0102_1994, true),
            (0x6573_5546, false),
            (0x6969, false),
            (0xFE53_4D42, false),
            (0xFF53_4D42, false),
            (0x517B, false),
        ];
        for (f_type, trusted) in table {
            assert_eq!(syncfs_flushes(f_type), trusted, "{f_type:#x}");
        }
        let here = tempfile::tempdir().unwrap();
        assert!(syncfs_reaches_storage(here.path()), "the test's own disk");
    }

    /// A writable module "m" at `path`, without history.
    pub(crate) fn module_at(path: &Path, setuid: bool) -> Module {
        Module {
            name: "m".into(),
            path: path.to_path_buf(),
            clients: vec![],
            restore_clients: vec![],
            hosts_allow: None,
            read_only: false,
            max_connections: None,
            comment: None,
            devices: false,
            setuid,
            owner: Default::default(),
            history: None,
            lease: None,
        }
    }

    #[test]
    fn capabilities_are_kept_only_with_setuid_bits_and_privileged_namespaces_only_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let open = |setuid| ModuleState::open(module_at(dir.path(), setuid), None).unwrap();
        let unprivileged = open(true).keeps(false).xattrs;
        assert_eq!(unprivileged, Namespaces::USER.union(Namespaces::ACL));
        assert_eq!(open(true).keeps(true).xattrs, Namespaces::ALL);
        let no_setuid = open(false).keeps(true).xattrs;
        assert_eq!(no_setuid, Namespaces::ALL.without(Namespaces::CAPABILITY));
    }

    /// Where the filesystem makes no unnamed files (GlusterFS), a staged file has a reserved
    /// name until its commit. That name was a `/proc/self/fd/N/…` path whose `N` was closed
    /// once the file was staged: at the commit `N` was whatever had been opened since, and a
    /// `mirror --once` of /usr/share/doc onto a GlusterFS volume failed thousands of files
    /// with "Not a directory" and left their temporary files behind.
    #[test]
    fn a_staged_file_keeps_its_reserved_name_beneath_its_own_directory() {
        use crate::apply::Apply;
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        for d in ["a", "b"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let state = Arc::new(ModuleState::open(module_at(dir.path(), false), None).unwrap());
        state
            .unnamed
            .0
            .store(CANNOT, std::sync::atomic::Ordering::Relaxed);
        let stats = Arc::new(crate::stats::Stats::default());
        let mut apply = Apply::new(state, stats, false);
        let mut staged = Vec::new();
        // Descriptors opened between staging and commit take the numbers staging let go.
        let mut opened = Vec::new();
        for i in 0..40 {
            let rel = RelPath::from(format!("{}/f{i}", ["a", "b"][i % 2]).as_str());
            let at = apply.entry(&rel).unwrap();
            let mut file = apply.create_file(&at, 0o644, false).unwrap();
            assert!(file.name.is_some(), "staged under a reserved name");
            file.file.write_all(format!("file {i}").as_bytes()).unwrap();
            drop(at);
            opened.push(fs::File::open(dir.path().join(["b", "a"][i % 2])).unwrap());
            let other = dir.path().join(format!("other{i}"));
            opened.push(fs::File::create(other).unwrap());
            staged.push((rel, file, i));
        }
        for (rel, file, i) in staged {
            let at = apply.entry(&rel).unwrap();
            let size = format!("file {i}").len() as u64;
            apply.install_file(&file, size, &at, &rel).unwrap();
            let put = fs::read(dir.path().join(rel.as_path())).unwrap();
            assert_eq!(put, format!("file {i}").as_bytes(), "{rel}");
        }
        for d in ["a", "b"] {
            let names: Vec<_> = fs::read_dir(dir.path().join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with('f'))
                .collect();
            assert!(names.is_empty(), "left in {d}: {names:?}");
        }
    }
}
