//! Planning: what must be sent so a receiver's tree equals the source tree. Pure: both trees
//! come in as listings, the plan comes out as data.

use ferry_protocol::delta::DELTA_THRESHOLD;
use ferry_protocol::meta::{Compare, Entry, Kind};
use ferry_protocol::RelPath;
use std::collections::{HashMap, HashSet};

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove a path (recursively).
    Delete(RelPath),
    /// Create or retype a directory (times come later, in [`Plan::dir_meta`]).
    Mkdir(Entry),
    /// Create or replace a symlink.
    Symlink(Entry),
    /// Create or replace a fifo or device node.
    Special(Entry),
    /// Send file content; `delta` when the receiver holds an older regular file worth diffing.
    File {
        /// The source entry.
        entry: Entry,
        /// Ask for a signature first.
        delta: bool,
    },
    /// Set mode, owner and mtime of a non-directory whose content is already right.
    SetMeta(Entry),
}

/// A reconcile plan, executed in three phases: `deletes`, then `creates` in tree order (parents
/// first), then — once every earlier step is acknowledged — `dir_meta` deepest first, so
/// directory times are set after their contents stop changing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Extraneous receiver paths, topmost only.
    pub deletes: Vec<RelPath>,
    /// Creations and updates, in tree order.
    pub creates: Vec<Op>,
    /// Directories whose metadata must be (re)applied, deepest first.
    pub dir_meta: Vec<Entry>,
}

impl Plan {
    /// True if nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.creates.is_empty() && self.dir_meta.is_empty()
    }
}

/// Options for [`plan`].
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Delete receiver paths absent from the source.
    pub delete: bool,
    /// Compare owners (the receiver is privileged).
    pub compare: Compare,
    /// Whether the receiver can create device nodes.
    pub devices: bool,
}

/// Computes the plan that turns `remote` into `local`. Both are tree-order listings starting
/// with the root; `remote` must already exclude what the sender's filter excludes.
pub fn plan(local: &[Entry], remote: &[Entry], opts: PlanOptions) -> Plan {
    let remote_by_path: HashMap<&RelPath, &Entry> = remote.iter().map(|e| (&e.path, e)).collect();
    let local_paths: HashSet<&RelPath> = local.iter().map(|e| &e.path).collect();
    let mut out = Plan::default();
    // Directories whose contents change, so their mtime must be restored afterwards.
    let mut touched: HashSet<RelPath> = HashSet::new();

    if opts.delete {
        let mut deleted: Vec<&RelPath> = Vec::new();
        for r in remote {
            if r.path.is_root() || local_paths.contains(&r.path) {
                continue;
            }
            if deleted.last().is_some_and(|d| r.path.starts_with(d)) {
                continue;
            }
            deleted.push(&r.path);
            out.deletes.push(r.path.clone());
            touched.insert(r.path.parent().unwrap_or_default());
        }
    }

    for l in local {
        let remote = remote_by_path.get(&l.path).copied();
        let parent = l.path.parent().unwrap_or_default();
        if l.path.is_root() {
            continue;
        }
        let op = match (l.meta.kind, remote) {
            (Kind::Dir, Some(r)) if r.meta.kind == Kind::Dir => {
                if !l.meta.attr_differences(&r.meta, opts.compare).is_empty() {
                    touched.insert(l.path.clone());
                }
                None
            }
            (Kind::Dir, _) => {
                touched.insert(l.path.clone());
                Some(Op::Mkdir(l.clone()))
            }
            (Kind::File, Some(r)) if r.meta.kind == Kind::File => {
                if !l.meta.quick_equal(&r.meta) {
                    let delta = r.meta.size > 0 && l.meta.size >= DELTA_THRESHOLD;
                    Some(Op::File {
                        entry: l.clone(),
                        delta,
                    })
                } else if !l.meta.attr_differences(&r.meta, opts.compare).is_empty() {
                    Some(Op::SetMeta(l.clone()))
                } else {
                    None
                }
            }
            (Kind::File, _) => Some(Op::File {
                entry: l.clone(),
                delta: false,
            }),
            (Kind::Symlink, Some(r)) if r.meta.kind == Kind::Symlink && r.link == l.link => {
                (!l.meta.attr_differences(&r.meta, opts.compare).is_empty())
                    .then(|| Op::SetMeta(l.clone()))
            }
            (Kind::Symlink, _) => Some(Op::Symlink(l.clone())),
            (k, _) if k.is_special() && k != Kind::Fifo && !opts.devices => None,
            (_, Some(r)) if r.meta.kind == l.meta.kind && r.meta.rdev == l.meta.rdev => {
                (!l.meta.attr_differences(&r.meta, opts.compare).is_empty())
                    .then(|| Op::SetMeta(l.clone()))
            }
            _ => Some(Op::Special(l.clone())),
        };
        if let Some(op) = op {
            touched.insert(parent);
            out.creates.push(op);
        }
    }

    // Local order is tree order; reversed it is deepest-first.
    for l in local.iter().rev() {
        if l.meta.kind == Kind::Dir && touched.contains(&l.path) {
            out.dir_meta.push(l.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::meta::Meta;

    fn e(path: &str, kind: Kind, size: u64, mtime: i64) -> Entry {
        let meta = Meta {
            kind,
            mode: 0o644,
            uid: 1,
            gid: 1,
            size,
            mtime,
            mtime_nsec: 0,
            rdev: 0,
        };
        let link = (kind == Kind::Symlink).then(|| b"target".to_vec());
        Entry {
            path: RelPath::from(path),
            meta,
            link,
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            delete: true,
            compare: Compare { owner: true },
            devices: false,
        }
    }

    #[test]
    fn equal_trees_need_nothing() {
        let t = vec![
            e("", Kind::Dir, 0, 1),
            e("a", Kind::Dir, 0, 1),
            e("a/f", Kind::File, 5, 1),
        ];
        assert!(plan(&t, &t, opts()).is_empty());
    }

    #[test]
    fn new_changed_deleted_and_retyped() {
        let local = vec![
            e("", Kind::Dir, 0, 1),
            e("a", Kind::Dir, 0, 1),
            e("a/new", Kind::File, 5, 1),
            e("big", Kind::File, 1 << 20, 2),
            e("link", Kind::Symlink, 0, 1),
            e("x", Kind::Dir, 0, 1),
        ];
        let remote = vec![
            e("", Kind::Dir, 0, 1),
            e("a", Kind::Dir, 0, 1),
            e("big", Kind::File, 1 << 20, 1),
            e("gone", Kind::Dir, 0, 1),
            e("gone/inner", Kind::File, 1, 1),
            e("x", Kind::File, 3, 1),
        ];
        let p = plan(&local, &remote, opts());
        assert_eq!(
            p.deletes,
            vec![RelPath::from("gone")],
            "only the topmost extra"
        );
        assert_eq!(
            p.creates,
            vec![
                Op::File {
                    entry: local[2].clone(),
                    delta: false
                },
                Op::File {
                    entry: local[3].clone(),
                    delta: true
                },
                Op::Symlink(local[4].clone()),
                Op::Mkdir(local[5].clone()),
            ]
        );
        let dirs: Vec<String> = p.dir_meta.iter().map(|d| d.path.to_string()).collect();
        assert_eq!(
            dirs,
            vec!["x", "a", "."],
            "deepest first, only touched directories"
        );
    }

    #[test]
    fn attribute_only_changes_send_metadata() {
        let local = vec![e("", Kind::Dir, 0, 1), e("f", Kind::File, 5, 1)];
        let mut remote = local.clone();
        remote[1].meta.mode = 0o600;
        let p = plan(&local, &remote, opts());
        assert_eq!(p.creates, vec![Op::SetMeta(local[1].clone())]);
        remote[1].meta.mode = 0o644;
        remote[1].meta.uid = 9;
        let no_owner = PlanOptions {
            compare: Compare { owner: false },
            ..opts()
        };
        assert!(plan(&local, &remote, no_owner).is_empty());
    }

    #[test]
    fn delete_false_keeps_extras() {
        let local = vec![e("", Kind::Dir, 0, 1)];
        let remote = vec![e("", Kind::Dir, 0, 1), e("old", Kind::File, 1, 1)];
        assert!(plan(
            &local,
            &remote,
            PlanOptions {
                delete: false,
                ..opts()
            }
        )
        .is_empty());
    }

    #[test]
    fn small_changed_files_travel_whole() {
        let local = vec![e("", Kind::Dir, 0, 1), e("f", Kind::File, 100, 2)];
        let remote = vec![e("", Kind::Dir, 0, 1), e("f", Kind::File, 100, 1)];
        assert_eq!(
            plan(&local, &remote, opts()).creates,
            vec![Op::File {
                entry: local[1].clone(),
                delta: false
            }]
        );
    }
}
