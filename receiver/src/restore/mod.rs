//! A module as it was at a time (see [`crate::history::view`]), or the parts of it asked
//! for: [`later`] and [`view`] compute it from the module and its history's journal,
//! [`serve`] sends it over a restore session to a client that writes it as a receiver writes
//! a module. The
//! client is `ferry restore` on a source host (over mutual TLS) or on the backup host itself
//! (over an in-process pipe, without a network): one way of writing DEST either way.
//!
//! Every read goes beneath a held descriptor of the module root or of the history's objects
//! (never through a symlink).

pub mod serve;

use crate::history::view::{root_at, view_at, Node, Source, View};
use crate::history::{read_versions_after, Version, OBJECTS};
use ferry_protocol::local;
use ferry_protocol::meta::Entry;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use ferry_sender::transfer::as_then;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

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
    /// Nothing at a path asked for, at that time.
    #[error("{path}: not in the module {at}")]
    Missing {
        /// The path.
        path: RelPath,
        /// When: `now`, or `at TIME`.
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

/// The journal's rows after `at` (ns since the epoch; `None`: now), in the history at
/// `history` of the module at `module`: what the module's present must be turned back by to
/// be as it was then. Refused if `at` is before the oldest kept state, or asked of a module
/// that keeps no history.
pub fn later(
    module: &Path,
    history: Option<&Path>,
    at: Option<i64>,
) -> Result<Vec<Version>, RestoreError> {
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
    Ok(later)
}

fn io_err(what: &Path, e: io::Error) -> RestoreError {
    RestoreError::Io(format!(
        "{}: {}",
        what.display(),
        ferry_protocol::io_reason(&e)
    ))
}

/// False for the names a restore leaves out of the module: the receiver's own for the moment
/// between creating and renaming, which are not content.
pub fn is_content(path: &RelPath, _is_dir: bool) -> bool {
    !path.file_name().starts_with(crate::TEMP_PREFIX.as_bytes())
}

/// The module at `module` (its history in `history`) as it was at `at` (ns since the epoch;
/// `None`: now), given the journal's rows after it ([`later`]), limited to `paths` (all of it
/// when empty). A module without history has only its present. Beside it, the module's
/// entries now that the view was made of, by path (each entry's own path left empty: whoever
/// takes one names it), read with the attributes of `xattrs` while walking it (so an entry
/// the view takes unchanged from the module is not read twice).
pub fn view(
    module: &Path,
    history: Option<&Path>,
    at: Option<i64>,
    later: &[Version],
    paths: &[RelPath],
    xattrs: Namespaces,
) -> Result<(View, HashMap<RelPath, Entry>), RestoreError> {
    let now = now_under(module, paths, later, xattrs).map_err(|e| io_err(module, e))?;
    // Keyed by path, the path taken out of the entry (whoever takes an entry names it).
    let now: HashMap<RelPath, Entry> = now
        .into_iter()
        .map(|mut e| (std::mem::take(&mut e.path), e))
        .collect();
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
    let mut view = view_at(now.keys().cloned(), later, listed);
    if let Some(meta) = root_at(later) {
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
        let shown = at.map_or_else(|| "now".to_string(), |ns| format!("at {}", rfc3339(ns)));
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
    Ok((view, now))
}

/// The module's entries now that the view of `paths` (all of it when empty) can be made of,
/// given the journal's `later` rows: for named paths, their subtrees, their ancestors and the
/// subtrees later renames moved things to — not the whole module, so one file of a huge
/// module is found in the time of a few lookups.
fn now_under(
    module: &Path,
    paths: &[RelPath],
    later: &[Version],
    xattrs: Namespaces,
) -> io::Result<Vec<Entry>> {
    let ours = is_content;
    let mut errors = Vec::new();
    if paths.is_empty() {
        // The client waits for the whole view: read it on as many cores as there are.
        return local::scan_wide(module, &ours, xattrs, &mut errors);
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
        match local::scan_at(&root, &start, &ours, xattrs, &mut errors) {
            Ok(entries) => out.extend(entries),
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
            if let Some(e) = local::read_entry_at(&root, &a, xattrs, &mut errors)? {
                out.push(e);
            }
            up = a.parent();
        }
    }
    out.sort_by(|a, b| a.path.tree_cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
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

/// Where object `id`'s `sub` is beneath the history's objects directory.
pub fn object_path(id: i64, sub: &RelPath) -> RelPath {
    let top = RelPath::from(id.to_string().as_str());
    if sub.is_root() {
        top
    } else {
        top.join(sub.as_bytes())
    }
}
