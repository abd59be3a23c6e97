//! Applying requests to a module's tree: make a directory, symlink or special file, set
//! metadata, delete, rename, and install a staged entry under its final name.
//!
//! Every peer path passes through [`confine_in`] (and [`not_root`] where the request replaces,
//! removes or renames what is there, so the module root itself is refused in one place).
//! Directories whose entries changed are remembered as dirty; the group commit makes them
//! durable ([`Apply::take_durable`]) before any of those changes is acknowledged.
//!
//! Received files are [`Sealed`] (checked, metadata applied, still unnamed) and made durable
//! together at the group commit (`commit.rs`): their data first — one `syncfs` of the
//! module's filesystem for a batch, an `fsync` each for a few — then their names, then the
//! directories. So a name never appears before its data is on disk, an `Ack` still means
//! durable, and a burst of files costs a few flushes instead of one per file.

use crate::commit::Sealed;
use crate::config::Owner;
use crate::confine::{
    chmod_nofollow, confine, confine_in, not_root, open_root, ConfineError, Confined,
};
use crate::history::{created_meta, Action, How, Pending};
use crate::leftovers::own_prefix;
use crate::module::ModuleState;
use crate::stats::Stats;
use ferry_protocol::local;
use ferry_protocol::message::Keeps;
use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::xattr::{self, At, Namespaces};
use ferry_protocol::RelPath;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod entry;
pub(crate) use entry::hard_link;
use entry::{declined, link_into, missing, session_tag};
pub use entry::{is_declined, set_mtime, Staged, TempName};

/// The filesystem side of one session on one module.
pub struct Apply {
    pub(crate) state: Arc<ModuleState>,
    pub(crate) stats: Arc<Stats>,
    /// The receiver runs as root: it can set owners and make device nodes.
    pub(crate) privileged: bool,
    /// What the module keeps (owners, devices, setuid bits).
    pub(crate) keeps: Keeps,
    /// The module root, opened once for the session; every path is resolved beneath it.
    pub(crate) root_fd: Option<std::sync::Arc<OwnedFd>>,
    /// Directories (module-relative) whose entries changed since the last commit.
    pub(crate) dirty: HashSet<RelPath>,
    /// Files received whole, waiting for the group commit to be made durable and named.
    pub(crate) sealed: Vec<Sealed>,
    /// Superseded states kept in the module's history since the last commit, their journal
    /// rows waiting for it.
    pub(crate) kept: Vec<Pending>,
    /// The state of each directory a change of this commit is in, noted before the change:
    /// journaled at the commit if its times moved (see [`Apply::note_parent`]).
    pub(crate) dirs_before: std::collections::HashMap<RelPath, Pending>,
    /// The directory the last file begun went into, resolved beneath the module: the
    /// next files in it are created there without resolving it again, until a request
    /// other than a file's own ends the run ([`Apply::end_file_run`]).
    file_dir: Option<(RelPath, Confined)>,
    seq: u64,
    tag: u64,
}

fn refused(e: ConfineError) -> io::Error {
    match e {
        // A missing ancestor: the request fails (or, for a delete, succeeds) as "not found".
        ConfineError::Io { source, .. } => source,
        e => io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()),
    }
}

impl Apply {
    /// The filesystem side of a session on `state`.
    pub fn new(state: Arc<ModuleState>, stats: Arc<Stats>, privileged: bool) -> Apply {
        let keeps = state.keeps(privileged);
        // If the root cannot be opened now, each request resolves it anew and says why.
        let root_fd = open_root(&state.module.path).ok().map(std::sync::Arc::new);
        Apply {
            keeps,
            root_fd,
            state,
            stats,
            privileged,
            dirty: HashSet::new(),
            sealed: Vec::new(),
            kept: Vec::new(),
            dirs_before: Default::default(),
            file_dir: None,
            seq: 0,
            tag: session_tag(),
        }
    }

    /// The module root.
    pub fn root(&self) -> &Path {
        &self.state.module.path
    }

    /// The module root for whole-tree reads (listings, verification): the root held open
    /// for this session when there is one, so a walk starts exactly where writes resolve.
    pub fn tree_root(&self) -> PathBuf {
        match &self.root_fd {
            Some(fd) => ferry_protocol::local::fd_path(fd),
            None => self.root().to_path_buf(),
        }
    }

    /// The module's name, for logs.
    pub fn module(&self) -> &str {
        &self.state.module.name
    }

    /// A peer path resolved beneath the module (the root allowed).
    pub fn local(&self, rel: &RelPath) -> io::Result<Confined> {
        match &self.root_fd {
            Some(fd) => confine_in(self.root(), fd, rel),
            None => confine(self.root(), rel),
        }
        .map_err(refused)
    }

    /// A peer path resolved beneath the module, naming an entry below the root, about to be
    /// changed: with history, its directory's state is noted first (its times are about to
    /// move), once per commit.
    pub fn entry(&mut self, rel: &RelPath) -> io::Result<Confined> {
        not_root(rel).map_err(refused)?;
        self.note_parent(rel);
        self.local(rel)
    }

    /// [`Apply::entry`] for a file about to be begun: a run of files in one directory
    /// resolves it once. Each file's own path is checked as a whole all the same; the
    /// directory held is used only to create the unnamed file, which is named by resolving
    /// its path again at the commit.
    pub fn file_entry(&mut self, rel: &RelPath) -> io::Result<Confined> {
        let parent = rel.parent();
        if let (Some((dir, at)), Some(parent), Some(name)) =
            (&self.file_dir, &parent, rel.components().last())
        {
            if dir == parent {
                crate::confine::acceptable(rel).map_err(refused)?;
                not_root(rel).map_err(refused)?;
                let at = at.sibling(name);
                self.note_parent(rel);
                return Ok(at);
            }
        }
        let at = self.entry(rel)?;
        self.file_dir = parent.map(|p| (p, at.clone()));
        Ok(at)
    }

    /// A request other than a file's own: the directory [`Apply::file_entry`] holds may
    /// be changed by it, and is resolved again for the next file.
    pub fn end_file_run(&mut self) {
        self.file_dir = None;
    }

    /// A fresh name beside the entry `at` (in its held directory) for an entry about to be
    /// renamed to it.
    pub fn temp_beside(&mut self, at: &Confined) -> Confined {
        at.sibling(self.temp_name().as_bytes())
    }

    /// A reserved name of this session's for a temporary entry.
    pub fn temp_name(&mut self) -> std::ffi::OsString {
        self.seq += 1;
        format!("{}{}.{}", own_prefix(), self.tag, self.seq).into()
    }

    /// A new file for the content of the entry `at`, in its directory: unnamed
    /// (`O_TMPFILE`, with the permissions `mode` asks, less the setuid, setgid and sticky
    /// bits) where the filesystem allows and it is to be a new name, else under a
    /// [`Apply::temp_name`] beside it ([`TempName`], readable by its owner only until it is
    /// complete). A file `replacing` what is there is named at once, as rsync does: renamed
    /// over the old one at the commit, it costs the filesystem two changes (create, rename)
    /// where an unnamed one costs three (create, link beside, rename).
    pub fn create_file(&mut self, at: &Confined, mode: u32, replacing: bool) -> io::Result<Staged> {
        if !replacing {
            if let Some(file) = self.state.unnamed.create(at.dir(), mode, self.module())? {
                return Ok(Staged { file, name: None });
            }
        }
        let (file, name) = TempName::create(self.temp_beside(at))?;
        Ok(Staged {
            file,
            name: Some(name),
        })
    }

    /// Puts a finished file of `size` bytes in place as the entry `at` (`rel`),
    /// atomically: linked in directly when the name is free (`Ok(true)`), else linked beside
    /// it and renamed over it (`Ok(false)`: what was there is gone, kept or removed).
    pub fn install_file(
        &mut self,
        staged: &Staged,
        size: u64,
        at: &Confined,
        rel: &RelPath,
    ) -> io::Result<bool> {
        if let Some(name) = &staged.name {
            return self.install(name.at(), at, rel).map(|()| false);
        }
        match link_into(&staged.file, at) {
            Ok(()) => {
                self.mark_parent_dirty(rel);
                // A new name: its kind and size are all its row keeps (no lookup).
                self.note_created(&at.path(), rel, Some(created_meta(Kind::File, size)))
                    .map(|()| true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let tmp = self.temp_beside(at);
                link_into(&staged.file, &tmp)?;
                let r = self.install(&tmp, at, rel);
                if r.is_err() {
                    let _ = fs::remove_file(tmp.path());
                }
                r.map(|()| false)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `rel` a directory (replacing a non-directory); its times come later.
    pub fn mkdir(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        self.note_parent(rel);
        let at = self.local(rel)?;
        let path = at.path();
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                if !self.keep(&path, rel, Action::Replaced, How::Move)? {
                    fs::remove_file(&path)?;
                }
                fs::create_dir(&path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path)?;
                self.note_created(&path, rel, Some(meta.clone()))?;
            }
            Err(e) => return Err(e),
        }
        self.apply_owner_mode(&path, meta)?;
        self.apply_xattrs(At::Entry(&path), rel, meta)?;
        self.dirty.insert(rel.clone());
        self.mark_parent_dirty(rel);
        self.stats.mkdirs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Renames a finished staged entry `tmp` over the entry `at` (of `rel`), replacing a
    /// directory there if need be. Both are reached through their held directories, not by a
    /// path walk through `/proc`.
    pub fn install(&mut self, tmp: &Confined, at: &Confined, rel: &RelPath) -> io::Result<()> {
        let path = at.path();
        let kept = if self.state.history.is_some() {
            // The entry there is kept (a file linked, a directory moved) before it is replaced.
            self.keep(&path, rel, Action::Replaced, How::Link)?
        } else {
            if at.is_dir() {
                fs::remove_dir_all(&path)?;
            }
            false
        };
        if let Err(e) = tmp.rename_to(at) {
            if kept {
                self.unkeep(&path);
            }
            return Err(e);
        }
        self.mark_parent_dirty(rel);
        if kept {
            Ok(())
        } else {
            self.note_created(&path, rel, None)
        }
    }

    /// Makes `rel` a symlink to `target`.
    pub fn symlink(&mut self, rel: &RelPath, target: &[u8], meta: &Meta) -> io::Result<()> {
        let at = self.entry(rel)?;
        let tmp = self.temp_beside(&at);
        std::os::unix::fs::symlink(RelPath::from_bytes(target.to_vec()).as_path(), tmp.path())?;
        self.install_staged(&tmp, &at, rel, meta)
    }

    /// Makes `rel` a fifo or (privileged receivers only) a device node.
    pub fn special(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let at = self.entry(rel)?;
        let type_bits = match meta.kind {
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            _ => return Err(io::Error::other("not a special file")),
        };
        if meta.kind != Kind::Fifo && !self.keeps.devices {
            let why = if self.privileged {
                "device nodes are not kept in this module (devices = false)"
            } else {
                "device nodes need a receiver running as root"
            };
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
        }
        let tmp = self.temp_beside(&at);
        let c = std::ffi::CString::new(tmp.path().into_os_string().into_vec())
            .map_err(io::Error::other)?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod has no other memory effects.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                type_bits | (meta.mode & 0o7777) as libc::mode_t,
                meta.rdev as libc::dev_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.install_staged(&tmp, &at, rel, meta)
    }

    /// Gives a staged symlink or special file its metadata and renames it over the entry
    /// `at`; the staged entry is removed if any step fails.
    fn install_staged(
        &mut self,
        tmp: &Confined,
        at: &Confined,
        rel: &RelPath,
        meta: &Meta,
    ) -> io::Result<()> {
        let path = tmp.path();
        let r = self
            .apply_owner_mode(&path, meta)
            .and_then(|_| self.apply_xattrs(At::Entry(&path), rel, meta))
            .and_then(|_| set_mtime(&path, meta))
            .and_then(|_| self.install(tmp, at, rel));
        if r.is_err() {
            let _ = fs::remove_file(&path);
        }
        r?;
        self.stats.links.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Owner first (chown clears setuid/setgid), then mode; symlinks have no mode.
    pub fn apply_owner_mode(&self, path: &Path, meta: &Meta) -> io::Result<()> {
        if let Some((uid, gid)) = self.owner_for(meta) {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        if meta.kind != Kind::Symlink {
            chmod_nofollow(path, self.mode_for(meta))?;
        }
        Ok(())
    }

    /// Makes an entry's extended attributes (ACLs, capabilities) what `meta` says in the
    /// namespaces this module keeps; after the owner and mode, since `chown` clears file
    /// capabilities and `chmod` rewrites an ACL's mask. A filesystem (or, for `user.*`, an
    /// entry type) that cannot hold them is said once per path and does not fail the request.
    pub fn apply_xattrs(&self, at: At<'_>, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        meta.xattrs
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match at.apply(&meta.xattrs, self.keeps.xattrs) {
            Ok(_) => Ok(()),
            Err(e)
                if xattr::unsupported(&e)
                    || (meta.kind != Kind::File
                        && meta.kind != Kind::Dir
                        && e.raw_os_error() == Some(libc::EPERM)) =>
            {
                if self.state.first_warning(rel) {
                    tracing::warn!(
                        module = self.module(),
                        path = %rel,
                        "extended attributes not kept: {}",
                        ferry_protocol::io_reason(&e)
                    );
                }
                Ok(())
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("extended attributes: {}", ferry_protocol::io_reason(&e)),
            )),
        }
    }

    /// The owner to give an entry, if any (a root receiver, as the module's `owner` says).
    pub fn owner_for(&self, meta: &Meta) -> Option<(u32, u32)> {
        if !self.privileged {
            return None;
        }
        match self.state.module.owner {
            Owner::Preserve => Some((meta.uid, meta.gid)),
            Owner::Fixed(u, g) => Some((u, g)),
            Owner::Receiver => None,
        }
    }

    /// The mode to give an entry: without `setuid = true`, never setuid or setgid.
    pub fn mode_for(&self, meta: &Meta) -> u32 {
        if self.keeps.setid {
            meta.mode
        } else {
            meta.mode & !0o6000
        }
    }

    /// Sets mode, owner and mtime of an existing entry of the same kind.
    pub fn set_meta(&mut self, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let at = self.local(rel)?;
        let path = at.path();
        let md = fs::symlink_metadata(&path)?;
        let have = local::meta_of(&md).map(|m| m.kind);
        if have != Some(meta.kind) {
            return Err(io::Error::other(format!(
                "is a {:?} on the receiver, not a {:?}",
                have, meta.kind
            )));
        }
        self.keep_meta(&path, rel, meta)?;
        self.apply_owner_mode(&path, meta)?;
        self.apply_xattrs(At::Entry(&path), rel, meta)?;
        set_mtime(&path, meta)?;
        // Inode metadata reaches the disk with its directory entry's journal commit on the
        // filesystems we target; fsyncing the entry itself covers the rest.
        if meta.kind == Kind::Dir {
            self.dirty.insert(rel.clone());
        } else if meta.kind == Kind::File {
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)?
                .sync_all()?;
        }
        self.mark_parent_dirty(rel);
        self.stats.set_meta.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Removes `rel` (recursively); absent is success.
    pub fn delete(&mut self, rel: &RelPath) -> io::Result<()> {
        let at = match self.entry(rel) {
            Ok(at) => at,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let path = at.path();
        let r = match fs::symlink_metadata(&path) {
            // With history, the entry (a directory with everything under it) moves there.
            Ok(_) if self.state.history.is_some() => self
                .keep(&path, rel, Action::Deleted, How::Move)
                .map(|_| ()),
            Ok(md) if md.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                self.mark_parent_dirty(rel);
                self.stats.deletes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// How many entries [`Apply::delete`] of `rel` would remove (it and everything under it),
    /// counted up to `limit + 1`; 0 if it is not there.
    pub fn count(&self, rel: &RelPath, limit: u64) -> io::Result<u64> {
        not_root(rel).map_err(refused)?;
        match self.local(rel) {
            Ok(at) => at.count(limit),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Makes `rel` another name of the regular file `target` (a hard link), replacing what is
    /// at `rel`. `target` must be current: a regular file of `meta`'s size and mtime (else the
    /// sender sends its content first); a name that already is that file is left alone.
    pub fn link(&mut self, rel: &RelPath, target: &RelPath, meta: &Meta) -> io::Result<()> {
        let not_current = || declined(format!("link target {target} is not current"));
        let from_at = self.entry(target).map_err(|e| missing(e, not_current))?;
        let to_at = self.entry(rel)?;
        let (to, from) = (to_at.path(), from_at.path());
        let have = fs::symlink_metadata(&from).map_err(|e| missing(e, not_current))?;
        let current =
            local::meta_of(&have).is_some_and(|m| m.kind == Kind::File && m.quick_equal(meta));
        if !current {
            return Err(not_current());
        }
        if let Ok(md) = fs::symlink_metadata(&to) {
            if md.dev() == have.dev() && md.ino() == have.ino() {
                return Ok(());
            }
        }
        // Linked beside the name, then renamed over it: the name is never missing.
        let tmp = self.temp_beside(&to_at);
        hard_link(&from, &tmp.path()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot make a hard link of {target} here ({}); a module on a filesystem \
                     without hard links needs a sync group without \"hardlinks\" in preserve",
                    ferry_protocol::io_reason(&e)
                ),
            )
        })?;
        let r = self.install(&tmp, &to_at, rel);
        if r.is_err() {
            let _ = fs::remove_file(tmp.path());
        }
        r?;
        self.stats.links.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Renames `from` to `to`, replacing whatever `to` is.
    pub fn rename(&mut self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        if to.starts_with(from) {
            return Err(io::Error::other(format!(
                "cannot rename {from} into itself"
            )));
        }
        let not_here = || declined(format!("{from} is not here to rename"));
        let src_at = self.entry(from).map_err(|e| missing(e, not_here))?;
        let dst_at = self.entry(to)?;
        let (src, dst) = (src_at.path(), dst_at.path());
        let src_md = fs::symlink_metadata(&src).map_err(|e| missing(e, not_here))?;
        let mut kept = 0;
        if self.state.history.is_some() {
            // What the rename replaces is kept (a file linked, so the name is never missing; a
            // directory moved), then where the entry was: in the journal's order, so undoing
            // newest first moves the entry back before the replaced one returns.
            kept += self.keep(&dst, to, Action::Replaced, How::Link)? as usize;
            let history = self.state.history.as_ref().expect("checked above");
            let note = history.note(&src, from, Action::Renamed, Namespaces::NONE, Some(to));
            if let Some(row) =
                note.map_err(|e| io::Error::new(e.kind(), format!("history: {e}")))?
            {
                self.kept.push(row);
                kept += 1;
            }
        } else if let Ok(dst_md) = fs::symlink_metadata(&dst) {
            // rename(2) replaces files and empty directories only; make it replace anything.
            if dst_md.is_dir() && (!src_md.is_dir() || fs::read_dir(&dst)?.next().is_some()) {
                fs::remove_dir_all(&dst)?;
            } else if !dst_md.is_dir() && src_md.is_dir() {
                fs::remove_file(&dst)?;
            }
        }
        if let Ok(dst_md) = fs::symlink_metadata(&dst) {
            // A file kept by a link is still there: rename(2) cannot put a directory over it.
            if !dst_md.is_dir() && src_md.is_dir() {
                fs::remove_file(&dst)?;
            }
        }
        if let Err(e) = fs::rename(&src, &dst) {
            for _ in 0..kept {
                self.unkeep(&dst);
            }
            return Err(e);
        }
        self.mark_parent_dirty(from);
        self.mark_parent_dirty(to);
        self.stats.renames.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
