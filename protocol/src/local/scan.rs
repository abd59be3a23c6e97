//! Reading a tree (or one entry) beneath a held root into [`Entry`]s, in tree order.

use super::*;

/// Decides whether a path takes part; `is_dir` tells if it is a directory. Returning `false`
/// for a directory skips its whole subtree.
pub type Filter<'a> = &'a (dyn Fn(&RelPath, bool) -> bool + Sync);

/// Accepts everything.
pub fn no_filter(_: &RelPath, _: bool) -> bool {
    true
}

/// Metadata of an `lstat` result; `None` for sockets, which are never transferred.
pub fn meta_of(md: &Metadata) -> Option<Meta> {
    meta_from(Raw {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: md.len(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        rdev: md.rdev(),
    })
}

/// [`meta_of`] for a `stat` filled in by the kernel.
pub(crate) fn meta_of_stat(st: &libc::stat) -> Option<Meta> {
    meta_from(Raw {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
        rdev: st.st_rdev,
    })
}

/// The fields of an `lstat` that [`Meta`] keeps, however they were read.
pub(crate) struct Raw {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    rdev: u64,
}

/// The one rule from an `lstat` to [`Meta`].
pub(crate) fn meta_from(r: Raw) -> Option<Meta> {
    let kind = match r.mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::CharDevice,
        libc::S_IFBLK => Kind::BlockDevice,
        _ => return None,
    };
    Some(Meta {
        kind,
        mode: r.mode & 0o7777,
        uid: r.uid,
        gid: r.gid,
        size: if kind == Kind::File { r.size } else { 0 },
        mtime: r.mtime,
        mtime_nsec: r.mtime_nsec as u32,
        rdev: if kind.is_special() { r.rdev } else { 0 },
        xattrs: Xattrs::default(),
    })
}

/// The entry `name` of the held directory `dir` (`None`: `dir` itself) as `rel`, with its
/// attributes in `xattrs`; `Ok(None)` for a socket. Attributes that cannot be read leave the
/// entry's unmanaged (`Xattrs::default()`) and are reported in `errors`.
pub(crate) fn entry_at(
    dir: &OwnedFd,
    name: Option<&[u8]>,
    rel: RelPath,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Option<Entry>> {
    let st = lstat_at(dir, name)?;
    let Some(mut meta) = meta_of_stat(&st) else {
        return Ok(None);
    };
    let link = match (meta.kind, name) {
        (Kind::Symlink, Some(n)) => Some(readlink_at(dir, n)?),
        (Kind::Symlink, None) => Some(
            std::fs::read_link(fd_path(dir))?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        ),
        _ => None,
    };
    if !xattrs.is_empty() {
        let read = match name {
            Some(n) => {
                let n = CString::new(n).map_err(io::Error::other)?;
                At::Child(dir.as_raw_fd(), &n).read(xattrs)
            }
            None => At::Held(&fd_path(dir)).read(xattrs),
        };
        match read {
            Ok(x) => meta.xattrs = x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(e) => errors.push((rel.clone(), e)),
        }
    }
    let inode = (meta.kind == Kind::File && st.st_nlink > 1).then_some(Inode {
        dev: st.st_dev,
        ino: st.st_ino,
    });
    Ok(Some(Entry {
        path: rel,
        meta,
        link,
        inode,
    }))
}

/// `lstat`s one entry beneath a root held open ([`open_root`]), with its attributes in
/// `xattrs` (see [`scan`] for `errors`); `Ok(None)` if it does not exist (also when a symlink
/// or a file stands where one of its ancestors should be: the path as such is gone) or is a
/// socket.
pub fn read_entry_at(
    root: &OwnedFd,
    rel: &RelPath,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Option<Entry>> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound || is_not_beneath(e);
    let (dir, name) = match parent_of(root, rel) {
        Ok(d) => d,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    match entry_at(&dir, name, rel.clone(), xattrs, errors) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        r => r,
    }
}

/// The file at `rel` beneath the held `root`, whatever its number of names; `Ok(None)` if it
/// is gone (or a symlink or file stands where an ancestor should be).
pub fn inode_at(root: &OwnedFd, rel: &RelPath) -> io::Result<Option<Inode>> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound || is_not_beneath(e);
    let (dir, name) = match parent_of(root, rel) {
        Ok(d) => d,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    match lstat_at(&dir, name) {
        Ok(st) => Ok(Some(Inode {
            dev: st.st_dev,
            ino: st.st_ino,
        })),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The children of the held directory `dir` (which is `rel`), sorted by name, filtered.
/// Unreadable children are reported in `errors` and left out.
pub(crate) fn read_children(
    dir: &OwnedFd,
    rel: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> Vec<Entry> {
    read_children_until(dir, rel, filter, xattrs, None, errors)
}

/// Children read between two looks at a walk's stop flag.
const STOP_EVERY: usize = 1024;

/// [`read_children`] that stops early, with some of them, once `stop` is set (looked at
/// every [`STOP_EVERY`] children, so a wide directory is not read whole for a walk no
/// longer wanted).
pub(crate) fn read_children_until(
    dir: &OwnedFd,
    rel: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    stop: Option<&std::sync::atomic::AtomicBool>,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> Vec<Entry> {
    let mut names = match read_names(dir) {
        Ok(n) => n,
        Err(e) => {
            errors.push((rel.clone(), e));
            return Vec::new();
        }
    };
    names.sort_unstable();
    // A path no peer accepts (longer than `PATH_MAX`) is left out with its subtree, said once
    // per directory: so every walk's depth, and the stack its recursion takes, is bounded
    // however deep a chain of directories someone with write access makes.
    let room = crate::path::MAX_PATH_LEN.saturating_sub(rel.as_bytes().len() + 1);
    let long = names.iter().filter(|n| n.len() > room).count();
    if long > 0 {
        names.retain(|n| n.len() <= room);
        errors.push((
            rel.clone(),
            io::Error::other(format!(
                "{long} entries left out: their paths would be longer than {} bytes",
                crate::path::MAX_PATH_LEN
            )),
        ));
    }
    let mut out = Vec::with_capacity(names.len());
    for (k, name) in names.into_iter().enumerate() {
        if k % STOP_EVERY == STOP_EVERY - 1
            && stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        {
            break;
        }
        let child = rel.join(&name);
        match entry_at(dir, Some(&name), child.clone(), xattrs, errors) {
            Ok(Some(e)) => {
                if filter(&child, e.meta.kind == Kind::Dir) {
                    out.push(e);
                }
            }
            Ok(None) => {}
            // Gone since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push((child, e)),
        }
    }
    out
}

/// Every entry below `root` in tree order (a directory right before its contents), the root
/// itself first with the empty path, with their attributes in `xattrs`. Per-entry errors go
/// to `errors` (an entry whose attributes could not be read is kept, its attributes
/// unmanaged); an unreadable root is an error.
pub fn scan(
    root: &Path,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    scan_from(root, &RelPath::root(), filter, xattrs, errors)
}

/// Like [`scan`] for the subtree at `start` (which is listed first).
pub fn scan_from(
    root: &Path,
    start: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    scan_at(&open_root(root)?, start, filter, xattrs, errors).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found", local_path(root, start).display()),
            )
        } else {
            e
        }
    })
}

/// [`scan_from`] beneath a root held open. A symlink or a file where `start` or one of its
/// ancestors should be makes it `NotADirectory`.
pub fn scan_at(
    root: &OwnedFd,
    start: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    let not_dir = |e: io::Error| {
        if is_not_beneath(&e) {
            io::Error::new(io::ErrorKind::NotADirectory, e)
        } else {
            e
        }
    };
    let Some(top) = read_entry_at(root, start, xattrs, errors)? else {
        return Err(io::ErrorKind::NotFound.into());
    };
    let is_dir = top.meta.kind == Kind::Dir;
    let mut out = vec![top];
    if is_dir {
        let parts: Vec<&[u8]> = start.components().collect();
        let dir = open_beneath(root, &parts).map_err(not_dir)?;
        walk(
            &dir,
            start,
            filter,
            xattrs,
            errors,
            &mut out,
            &mut |_, _| true,
        );
    }
    Ok(out)
}

/// [`scan`] of the whole tree at `root`, its top directories walked side by side on up to
/// four threads (as many as the machine has cores): the same entries in the same tree order,
/// the same errors in the same order, in a fraction of the time where the tree is wide. For
/// a whole tree read before anything else can start (a restore's view of its module).
pub fn scan_wide(
    root: &Path,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
) -> io::Result<Vec<Entry>> {
    let held = open_root(root)?;
    let top = RelPath::root();
    let Some(first) = read_entry_at(&held, &top, xattrs, errors)? else {
        return Err(io::ErrorKind::NotFound.into());
    };
    let children = read_children(&held, &top, filter, xattrs, errors);
    let dirs: Vec<usize> = (0..children.len())
        .filter(|&i| children[i].meta.kind == Kind::Dir)
        .collect();
    // What each top directory's walk found, by its place in `dirs`.
    let found = side_by_side(dirs.len(), |k| -> Piece {
        let path = &children[dirs[k]].path;
        let (mut out, mut errs) = (Vec::new(), Vec::new());
        let mut all = |_: &mut Vec<Entry>, _: &mut Errors| true;
        descend(&held, path, filter, xattrs, &mut errs, &mut out, &mut all);
        (out, errs)
    });
    let mut out = Vec::with_capacity(1 + children.len());
    out.push(first);
    let mut found = found.into_iter();
    for child in children {
        let is_dir = child.meta.kind == Kind::Dir;
        out.push(child);
        if is_dir {
            let (entries, errs) = found.next().expect("a walk per directory");
            out.extend(entries);
            errors.extend(errs);
        }
    }
    Ok(out)
}

/// Threads a walk of a whole tree takes side by side: up to four, as many as the machine has
/// cores.
pub(crate) fn wide_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// `each(0..n)` on up to [`wide_threads`] threads, each taking the next index when it is
/// free: the results in index order.
pub(crate) fn side_by_side<T: Send>(n: usize, each: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let found: Vec<std::sync::Mutex<Option<T>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || loop {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if k >= n {
            break;
        }
        let done = each(k);
        *found[k].lock().expect("walk slot") = Some(done);
    };
    std::thread::scope(|s| {
        for _ in 1..wide_threads().min(n) {
            s.spawn(work);
        }
        work();
    });
    found
        .into_iter()
        .map(|f| f.into_inner().expect("walk slot").expect("walked"))
        .collect()
}

/// Errors met on the way, each with its path.
pub type Errors = Vec<(RelPath, io::Error)>;

/// What a walk has read so far and the errors it met meanwhile.
pub type Piece = (Vec<Entry>, Errors);

/// [`scan_at`] of the whole tree beneath the held `root`, handed to `sink` in pieces in tree
/// order, the root first, each with the errors met while it was read: the first of
/// `pieces.start()` entries, each next twice the last up to `pieces.end()` (the last one
/// smaller), so the first reaches `sink` soon and the rest go in large lots. `sink` returns
/// `false` to stop the walk. Holds one piece, however large the tree.
pub fn scan_pieces(
    root: &OwnedFd,
    filter: Filter<'_>,
    xattrs: Namespaces,
    pieces: std::ops::RangeInclusive<usize>,
    sink: &mut dyn FnMut(Piece) -> bool,
) -> io::Result<()> {
    let mut errors = Vec::new();
    let Some(top) = read_entry_at(root, &RelPath::root(), xattrs, &mut errors)? else {
        return Err(io::ErrorKind::NotFound.into());
    };
    let mut out = vec![top];
    let (mut piece, most) = ((*pieces.start()).max(1), *pieces.end());
    let mut hand = |out: &mut Vec<Entry>, errors: &mut Errors| {
        if out.len() < piece {
            return true;
        }
        piece = (piece * 2).min(most).max(piece);
        sink((std::mem::take(out), std::mem::take(errors)))
    };
    if walk(
        root,
        &RelPath::root(),
        filter,
        xattrs,
        &mut errors,
        &mut out,
        &mut hand,
    ) {
        sink((out, errors));
    }
    Ok(())
}

/// Runs one level of a walk's recursion, on a stack grown on the heap when the thread's runs
/// short: the depth is bounded (paths stop at `PATH_MAX`, 2,048 levels at most), the stack a
/// level takes is not (an unoptimised build takes several times more).
pub(crate) fn grow<R>(level: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(128 * 1024, 2 << 20, level)
}

/// Appends the subtree of the held directory `dir` (which is `rel`) in tree order, calling
/// `more` after each entry (it may take what was read; `false` stops the walk, and the walk
/// returns `false`). Each directory below is opened through its parent's descriptor without
/// following symlinks, so the walk holds one descriptor per level.
pub(crate) fn walk(
    dir: &OwnedFd,
    rel: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
    out: &mut Vec<Entry>,
    more: &mut dyn FnMut(&mut Vec<Entry>, &mut Errors) -> bool,
) -> bool {
    for child in read_children(dir, rel, filter, xattrs, errors) {
        let is_dir = child.meta.kind == Kind::Dir;
        let path = child.path.clone();
        out.push(child);
        if !more(out, errors) {
            return false;
        }
        if is_dir && !descend(dir, &path, filter, xattrs, errors, out, more) {
            return false;
        }
    }
    true
}

/// [`walk`] of the directory `path`, listed in the held `dir`: opened through it without
/// following a symlink. One gone since it was listed keeps its entry, its contents unknown.
fn descend(
    dir: &OwnedFd,
    path: &RelPath,
    filter: Filter<'_>,
    xattrs: Namespaces,
    errors: &mut Vec<(RelPath, io::Error)>,
    out: &mut Vec<Entry>,
    more: &mut dyn FnMut(&mut Vec<Entry>, &mut Errors) -> bool,
) -> bool {
    match open_child(dir, path.file_name()) {
        Ok(sub) => grow(|| walk(&sub, path, filter, xattrs, errors, out, more)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            errors.push((path.clone(), e));
            true
        }
    }
}
