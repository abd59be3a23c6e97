//! Reading the journal: the versions a history keeps, for `ferry history` (through the
//! running receiver, or straight from the file on the backup host) and metrics; and where a
//! history may be.

use super::{db_err, JOURNAL};
use ferry_protocol::RelPath;
use rusqlite::{params, Connection, OpenFlags};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// One kept state, as the journal has it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Version {
    /// Its id; its object (if it has one) is `objects/ID`.
    pub id: i64,
    /// The module path it was at.
    pub path: String,
    /// When it stopped being current (ns since the epoch).
    pub time_ns: i64,
    /// What happened to it.
    pub action: String,
    /// Its kind.
    pub kind: String,
    /// Its size in bytes (a file's).
    pub size: u64,
    /// Whether `objects/ID` holds it.
    pub object: bool,
    /// For a rename, where it went.
    pub renamed_to: Option<String>,
    /// Its metadata then (mode, owner, times, attributes), as JSON.
    pub meta: String,
    /// `path` as stored (any bytes).
    #[serde(skip)]
    pub raw_path: Vec<u8>,
    /// `renamed_to` as stored.
    #[serde(skip)]
    pub raw_renamed_to: Option<Vec<u8>>,
}

impl Version {
    /// As the protocol carries it (`ferry history` from a source host).
    pub fn to_wire(&self) -> ferry_protocol::message::Version {
        ferry_protocol::message::Version {
            id: self.id,
            path: RelPath::from_bytes(self.raw_path.clone()),
            time_ns: self.time_ns,
            action: self.action.clone(),
            kind: self.kind.clone(),
            size: self.size,
            object: self.object,
            renamed_to: self.raw_renamed_to.clone().map(RelPath::from_bytes),
        }
    }
}

/// The mount a path is on (`statx`'s mount id): a rename or link across two mounts of one
/// filesystem fails as across two filesystems.
fn mount_of(path: &Path) -> io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: zeroed statx is a valid out-parameter; `c` is NUL-terminated.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    Ok((dev, stx.stx_mnt_id))
}

/// Checks that `history` can hold the history of the module at `module`: on the same
/// filesystem and mount (objects are links and renames, never copies), and neither inside
/// the other. The error names both.
pub fn check_place(module: &Path, history: &Path) -> Result<(), String> {
    let canon = |p: &Path| {
        fs::canonicalize(p)
            .map_err(|e| format!("{}: {}", p.display(), ferry_protocol::io_reason(&e)))
    };
    let (m, h) = (canon(module)?, canon(history)?);
    if h.starts_with(&m) {
        return Err(format!(
            "history {} is inside the module path {}: it must be outside it (a sender could \
             reach it there)",
            h.display(),
            m.display()
        ));
    }
    if m.starts_with(&h) {
        return Err(format!(
            "the module path {} is inside history {}",
            m.display(),
            h.display()
        ));
    }
    let (mount_m, mount_h) = (
        mount_of(&m).map_err(|e| format!("{}: {e}", m.display()))?,
        mount_of(&h).map_err(|e| format!("{}: {e}", h.display()))?,
    );
    if mount_m.0 != mount_h.0 {
        return Err(format!(
            "history {} is on another filesystem than the module path {}: it must be on the \
             same one (versions are kept as links, never copies)",
            h.display(),
            m.display()
        ));
    }
    if mount_m.1 != mount_h.1 {
        return Err(format!(
            "history {} is on another mount of the filesystem of the module path {} (a bind \
             mount?): it must be on the same mount (versions are kept as links, never copies)",
            h.display(),
            m.display()
        ));
    }
    Ok(())
}

/// The versions superseded after `after` (ns since the epoch), oldest first, and the
/// earliest moment the history answers for: when it began, or, once retention has let
/// versions go, the time of the oldest it keeps. What undoing the history back to `after`
/// needs, read through the journal's time index without listing the rest.
pub fn read_versions_after(dir: &Path, after: i64) -> io::Result<(Vec<Version>, Option<i64>)> {
    let db = open_read_only(dir)?;
    let oldest: Option<i64> = db
        .query_row("SELECT min(time_ns) FROM versions", [], |r| r.get(0))
        .map_err(db_err)?;
    let reach: Option<(i64, bool)> = db
        .query_row("SELECT since_ns, pruned FROM reach WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0))
        })
        .ok();
    let oldest = match reach {
        Some((since, false)) => Some(since),
        _ => oldest,
    };
    let mut q = db
        .prepare(
            "SELECT id, path, time_ns, action, kind, size, object, renamed_to, meta FROM versions \
             WHERE time_ns > ?1 ORDER BY time_ns, id",
        )
        .map_err(db_err)?;
    let rows = q.query_map([after], version_of).map_err(db_err)?;
    let later = rows.collect::<Result<_, _>>().map_err(db_err)?;
    Ok((later, oldest))
}

fn version_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Version> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (raw_path, raw_renamed_to): (Vec<u8>, Option<Vec<u8>>) = (r.get(1)?, r.get(7)?);
    Ok(Version {
        id: r.get(0)?,
        path: text(&raw_path),
        time_ns: r.get(2)?,
        action: r.get(3)?,
        kind: r.get(4)?,
        size: r.get::<_, i64>(5)? as u64,
        object: r.get::<_, i64>(6)? != 0,
        renamed_to: raw_renamed_to.as_deref().map(text),
        meta: r.get(8)?,
        raw_path,
        raw_renamed_to,
    })
}

pub(super) fn versions_in(db: &Connection, under: &RelPath) -> io::Result<Vec<Version>> {
    let (sql, prefix) =
        if under.is_root() {
            ("SELECT id, path, time_ns, action, kind, size, object, renamed_to, meta FROM versions \
          ORDER BY time_ns, id", Vec::new())
        } else {
            let mut p = under.as_bytes().to_vec();
            p.push(b'/');
            ("SELECT id, path, time_ns, action, kind, size, object, renamed_to, meta FROM versions \
          WHERE path = ?1 OR substr(path, 1, length(?2)) = ?2 ORDER BY time_ns, id", p)
        };
    let mut q = db.prepare(sql).map_err(db_err)?;
    let map = version_of;
    let rows = if under.is_root() {
        q.query_map([], map)
    } else {
        q.query_map(params![under.as_bytes(), prefix], map)
    }
    .map_err(db_err)?;
    rows.collect::<Result<_, _>>().map_err(db_err)
}

/// The versions at or below `under` in the history at `dir`, read without the daemon (the
/// journal opened read-only): what `ferry history` shows on the backup host.
pub fn read_versions(dir: &Path, under: &RelPath) -> io::Result<Vec<Version>> {
    versions_in(&open_read_only(dir)?, under)
}

/// Drops the kernel's cached pages of the journal (and of its rollback journal). On a shared
/// filesystem another host may have written them since this one read them, and a FUSE
/// client's page cache is not told: SQLite's locks keep its own cache right, not the
/// kernel's.
pub(super) fn forget_cached(dir: &Path) {
    for name in [JOURNAL.to_string(), format!("{JOURNAL}-journal")] {
        if let Ok(f) = fs::File::open(dir.join(name)) {
            // SAFETY: an open descriptor; advice only, nothing is read or written.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// The journal at `dir`, opened read-only.
pub(super) fn open_read_only(dir: &Path) -> io::Result<Connection> {
    let file = dir.join(JOURNAL);
    if !file.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: no history journal here", file.display()),
        ));
    }
    let db = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| io::Error::other(format!("{}: {e}", file.display())))?;
    db.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
    Ok(db)
}
