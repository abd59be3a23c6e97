//! `ferry restore` on the backup host, without a network: a module as it was at a time (see
//! [`crate::history::view`]), or the parts of it asked for, written whole into a new or empty
//! directory with mode, owner (as root), times and extended attributes.
//!
//! Every read goes beneath a held descriptor of the module root or of the history's objects
//! (never through a symlink); the destination is the operator's own new directory.
//!
//! [`serve`] sends the same view over a restore session, to a client that writes it as a
//! receiver does.

pub mod serve;

use crate::history::view::{root_at, view_at, Node, Source, View};
use crate::history::{read_versions_after, Version, OBJECTS};
use ferry_protocol::local;
use ferry_protocol::meta::{Entry, Inode, Kind, Meta};
use ferry_protocol::xattr::{At, Namespaces};
use ferry_protocol::RelPath;
use ferry_sender::transfer::as_then;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a restore wrote, and what it could not.
#[derive(Debug, Default)]
pub struct Restored {
    /// Entries written (directories, files, links, fifos).
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
    /// Entries not written, with why (device nodes without root, unreadable sources).
    pub failures: Vec<(RelPath, String)>,
}

/// Why a restore cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The time asked for is before what the history reaches back to.
    #[error("{at}: before {oldest}, the earliest moment the module's history answers for; it does not reach back that far")]
    TooOld {
        /// The time asked for.
        at: String,
        /// The oldest kept state's time.
        oldest: String,
    },
    /// The destination holds something.
    #[error("{0}: not empty; restore writes into a new or empty directory")]
    NotEmpty(PathBuf),
    /// Nothing at a path asked for, at that time.
    #[error("{path}: not in the module at {at}")]
    Missing {
        /// The path.
        path: RelPath,
        /// The time.
        at: String,
    },
    /// A time asked of a module that keeps no history.
    #[error(
        "module {0:?} keeps no history: only its current state can be restored (leave --at out)"
    )]
    NoHistory(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(String),
}

fn rfc3339(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The module at `module` (its history in `history`) as it was at `at` (ns since the epoch;
/// `None`: now), limited to `paths` (all of it when empty). A module without history has
/// only its present.
pub fn view(
    module: &Path,
    history: Option<&Path>,
    at: Option<i64>,
    paths: &[RelPath],
) -> Result<View, RestoreError> {
    let io_err = |what: &Path, e: io::Error| {
        RestoreError::Io(format!(
            "{}: {}",
            what.display(),
            ferry_protocol::io_reason(&e)
        ))
    };
    let (later, oldest) = match (history, at) {
        (Some(history), _) => {
            read_versions_after(history, at.unwrap_or(i64::MAX)).map_err(|e| io_err(history, e))?
        }
        (None, None) => (Vec::new(), None),
        (None, Some(_)) => {
            let name = module.file_name().unwrap_or_default().to_string_lossy();
            return Err(RestoreError::NoHistory(name.into_owned()));
        }
    };
    if let (Some(at), Some(oldest)) = (at, oldest) {
        if at < oldest {
            return Err(RestoreError::TooOld {
                at: rfc3339(at),
                oldest: rfc3339(oldest),
            });
        }
    }
    let now = now_under(module, paths, &later).map_err(|e| io_err(module, e))?;
    let objects = history.map(|h| h.join(OBJECTS)).unwrap_or_default();
    let listed = |id: i64| -> Vec<RelPath> {
        let top = objects.join(id.to_string());
        if !fs::symlink_metadata(&top).is_ok_and(|m| m.is_dir()) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        let under = local::scan(&top, &|_: &RelPath, _| true, Namespaces::NONE, &mut errors);
        under
            .map(|es| {
                es.into_iter()
                    .map(|e| e.path)
                    .filter(|p| !p.is_root())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut view = view_at(now, &later, listed);
    if let Some(meta) = root_at(&later) {
        let source = Source::Module(RelPath::root());
        view.insert(
            RelPath::root(),
            Node {
                source,
                meta: Some(meta),
            },
        );
    }
    if !paths.is_empty() {
        let shown = at.map_or_else(|| "now".to_string(), rfc3339);
        for p in paths {
            if !view.contains_key(p) {
                return Err(RestoreError::Missing {
                    path: p.clone(),
                    at: shown,
                });
            }
        }
        // The parents of what is asked for come too (their metadata as they were).
        view.retain(|k, _| {
            paths
                .iter()
                .any(|p| k == p || k.starts_with(p) || p.starts_with(k))
        });
    }
    Ok(view)
}

/// The module's paths now that the view of `paths` (all of it when empty) can be made of,
/// given the journal's `later` rows: for named paths, their subtrees, their ancestors and the
/// subtrees later renames moved things to — not the whole module, so one file of a huge
/// module is found in the time of a few lookups.
fn now_under(module: &Path, paths: &[RelPath], later: &[Version]) -> io::Result<Vec<RelPath>> {
    // The receiver's own names for the moment between creating and renaming are not content.
    let ours = |p: &RelPath, _| !p.file_name().starts_with(crate::TEMP_PREFIX.as_bytes());
    let mut errors = Vec::new();
    if paths.is_empty() {
        let tree = local::scan(module, &ours, Namespaces::NONE, &mut errors)?;
        return Ok(tree.into_iter().map(|e| e.path).collect());
    }
    let root = local::open_root(module)?;
    let mut starts: Vec<RelPath> = paths.to_vec();
    starts.extend(
        later
            .iter()
            .filter(|v| v.action == "renamed")
            .filter_map(|v| v.raw_renamed_to.clone().map(RelPath::from_bytes)),
    );
    starts.sort_by(|a, b| a.tree_cmp(b));
    starts.dedup();
    let mut out = Vec::new();
    let mut last: Option<RelPath> = None;
    for start in starts {
        if last.as_ref().is_some_and(|l| start.starts_with(l)) {
            continue;
        }
        match local::scan_at(&root, &start, &ours, Namespaces::NONE, &mut errors) {
            Ok(entries) => out.extend(entries.into_iter().map(|e| e.path)),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory => {}
            Err(e) => return Err(e),
        }
        last = Some(start);
    }
    for p in paths {
        let mut up = p.parent();
        while let Some(a) = up.filter(|a| !a.is_root()) {
            if local::read_entry_at(&root, &a, Namespaces::NONE, &mut errors)?.is_some() {
                out.push(a.clone());
            }
            up = a.parent();
        }
    }
    out.sort_by(|a, b| a.tree_cmp(b));
    out.dedup();
    Ok(out)
}

/// Writes `view` of the module at `module` (history in `history`) into `dest` (created, or
/// empty). Directories' times are set after their contents.
pub fn write(
    module: &Path,
    history: Option<&Path>,
    view: &View,
    dest: &Path,
) -> Result<Restored, RestoreError> {
    let io_err = |what: &Path, e: io::Error| {
        RestoreError::Io(format!(
            "{}: {}",
            what.display(),
            ferry_protocol::io_reason(&e)
        ))
    };
    match fs::read_dir(dest) {
        Ok(d) => {
            if d.into_iter().next().is_some() {
                return Err(RestoreError::NotEmpty(dest.into()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .map_err(|e| io_err(dest, e))?,
        Err(e) => return Err(io_err(dest, e)),
    }
    let module_root = local::open_root(module).map_err(|e| io_err(module, e))?;
    let objects_root = match history {
        Some(h) => {
            let objects = h.join(OBJECTS);
            Some(local::open_root(&objects).map_err(|e| io_err(&objects, e))?)
        }
        None => None,
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut done = Restored::default();
    let mut dirs: Vec<(PathBuf, Meta)> = Vec::new();
    // The first name written of each file with several names: the others become links to it.
    let mut linked: HashMap<Inode, PathBuf> = HashMap::new();
    for (path, node) in view {
        if path.is_root() {
            // The destination's own root is the operator's directory.
            continue;
        }
        let (fd, rel) = match &node.source {
            Source::Module(m) => (&module_root, m.clone()),
            Source::Object { id, sub } => {
                let Some(objects_root) = &objects_root else {
                    continue;
                };
                (objects_root, object_path(*id, sub))
            }
        };
        let out = dest.join(path.as_path());
        match write_one(fd, &rel, node, &out, root, &mut linked) {
            Ok(Some((meta, bytes))) => {
                done.entries += 1;
                done.bytes += bytes;
                if meta.kind == Kind::Dir {
                    dirs.push((out, meta));
                }
            }
            Ok(None) => {}
            Err(e) => done
                .failures
                .push((path.clone(), ferry_protocol::io_reason(&e))),
        }
    }
    // Deepest first: a directory's times after everything in it.
    for (out, meta) in dirs.iter().rev() {
        if let Err(e) = set_times(out, meta) {
            done.failures.push((
                RelPath::from(out.to_string_lossy().as_ref()),
                ferry_protocol::io_reason(&e),
            ));
        }
    }
    Ok(done)
}

/// The entry beneath `fd` at `rel` (`None`: gone) with the metadata it had at the view's
/// time: a metadata row's mode, owner and times, and its attributes when it read them.
pub fn entry_then(
    fd: &OwnedFd,
    rel: &RelPath,
    node: &Node,
    xattrs: Namespaces,
) -> io::Result<Option<Entry>> {
    let mut errors = Vec::new();
    Ok(
        local::read_entry_at(fd, rel, xattrs, &mut errors)?.map(|mut e| {
            if let Some(then) = &node.meta {
                e.meta = as_then(e.meta, then);
            }
            e
        }),
    )
}

/// Writes one entry read beneath `fd` at `rel` to `out`; its metadata and file bytes. A file
/// already written under another name (`linked`) becomes another name of it.
fn write_one(
    fd: &OwnedFd,
    rel: &RelPath,
    node: &Node,
    out: &Path,
    root: bool,
    linked: &mut HashMap<Inode, PathBuf>,
) -> io::Result<Option<(Meta, u64)>> {
    let Some(Entry {
        meta, link, inode, ..
    }) = entry_then(fd, rel, node, Namespaces::ALL)?
    else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "gone since the view was made",
        ));
    };
    if let Some(first) = inode.and_then(|i| linked.get(&i)) {
        fs::hard_link(first, out)?;
        return Ok(Some((meta, 0)));
    }
    if let (Some(i), Kind::File) = (inode, meta.kind) {
        linked.insert(i, out.to_path_buf());
    }
    let mut bytes = 0;
    match meta.kind {
        Kind::Dir => fs::DirBuilder::new().mode(0o700).create(out)?,
        Kind::File => {
            let mut from = local::open_file_beneath(fd, rel)?;
            let mut to = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(out)?;
            bytes = copy_sparse(&mut from, &mut to, meta.size)?;
            to.sync_all()?;
        }
        Kind::Symlink => {
            let target = link.unwrap_or_default();
            std::os::unix::fs::symlink(RelPath::from_bytes(target).as_path(), out)?;
        }
        Kind::Fifo => {
            let c = std::ffi::CString::new(out.as_os_str().as_encoded_bytes())
                .map_err(io::Error::other)?;
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Kind::CharDevice | Kind::BlockDevice => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "device nodes are not restored (make them with mknod)",
            ));
        }
    }
    if root {
        std::os::unix::fs::lchown(out, Some(meta.uid), Some(meta.gid))?;
    }
    if meta.kind != Kind::Symlink {
        fs::set_permissions(
            out,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode & 0o7777),
        )?;
    }
    if !meta.xattrs.list.is_empty() {
        let _ = At::Entry(out).apply(&meta.xattrs, Namespaces::ALL);
    }
    if meta.kind != Kind::Dir {
        set_times(out, &meta)?;
    }
    Ok(Some((meta, bytes)))
}

/// Copies the `size` bytes of `from` into the new file `to`, its data extents only: holes
/// stay holes (`SEEK_DATA`/`SEEK_HOLE`; a filesystem without them reports all data). Returns
/// the bytes of data copied.
fn copy_sparse(from: &mut fs::File, to: &mut fs::File, size: u64) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let fd = from.as_raw_fd();
    let seek = |whence: libc::c_int, at: u64| -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            // No data at or after `at`: the rest is a hole.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut copied = 0;
    let mut at = 0;
    while at < size {
        let Some(data) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, data)?.unwrap_or(size).min(size);
        from.seek(SeekFrom::Start(data))?;
        to.seek(SeekFrom::Start(data))?;
        copied += io::copy(&mut Read::by_ref(from).take(end - data), to)?;
        at = end;
    }
    to.set_len(size)?;
    Ok(copied)
}

/// Where object `id`'s `sub` is beneath the history's objects directory.
pub fn object_path(id: i64, sub: &RelPath) -> RelPath {
    let top = RelPath::from(id.to_string().as_str());
    if sub.is_root() {
        top
    } else {
        top.join(sub.as_bytes())
    }
}

fn set_times(out: &Path, meta: &Meta) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(meta.mtime, meta.mtime_nsec);
    filetime::set_symlink_file_times(out, t, t)
}
