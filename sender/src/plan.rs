//! Planning: what must be sent so a receiver's tree equals the source tree. Pure: trees and
//! dirty paths come in as data, the plan comes out as data.
//!
//! Each rule has its one home here, and every path (full reconcile, subtree compare, live
//! batch) calls it:
//! - [`entry_op`]: the op for one entry by its kind, given what the receiver has there
//!   (devices only for a privileged receiver);
//! - [`body_for`]: whole file or delta;
//! - [`order_dir_meta`]: which directories get their times back, and in what order;
//! - [`plan_batch`]: a live batch of dirty paths into a plan plus the subtrees to compare;
//! - [`link_ops`]: which names of a multiply-linked file become links to its first name.

use crate::coalesce::Need;
use crate::config::SyncGroup;
use crate::links::LinkNames;
use ferry_protocol::delta::{DELTA_THRESHOLD, RESUME_THRESHOLD};
use ferry_protocol::message::{Body, Keeps, Message, RequestId};
use ferry_protocol::meta::{Compare, Entry, Inode, Kind};
use ferry_protocol::RelPath;
use std::collections::{BTreeSet, HashMap, HashSet};

/// What the receiver holds where a file is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Nothing usable: no entry, another kind, or an empty file.
    Absent,
    /// Not known (a live change; the receiver answers `NoBase` if it has nothing).
    Unknown,
    /// A non-empty regular file.
    Present,
}

impl Base {
    /// What a receiver listing entry offers as a delta base.
    pub fn of(remote: Option<&Entry>) -> Base {
        match remote {
            Some(r) if r.meta.kind == Kind::File && r.meta.size > 0 => Base::Present,
            _ => Base::Absent,
        }
    }
}

/// Whole body, or ask the receiver first ([`Body::Delta`]), for a file of `size` bytes (the
/// size of the open file, read with `fstat`, is the one that counts). Asking costs a round
/// trip, so it is done where it can pay: a delta for files of [`DELTA_THRESHOLD`] or more
/// against a base the receiver may hold, and resuming a cut-off transfer for files of
/// [`RESUME_THRESHOLD`] or more whatever the receiver holds.
pub fn body_for(size: u64, base: Base) -> Body {
    if size >= RESUME_THRESHOLD || (size >= DELTA_THRESHOLD && base != Base::Absent) {
        Body::Delta
    } else {
        Body::Whole
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or retype a directory (times come later, in [`Plan::dir_meta`]).
    Mkdir(Entry),
    /// Create or replace a symlink.
    Symlink(Entry),
    /// Create or replace a fifo or device node.
    Special(Entry),
    /// Send file content.
    File {
        /// The source entry.
        entry: Entry,
        /// What the receiver holds to diff against.
        base: Base,
    },
    /// Set mode, owner and mtime of an entry whose content is already right.
    SetMeta(Entry),
}

impl Op {
    /// The entry the op makes.
    pub fn entry(&self) -> &Entry {
        match self {
            Op::Mkdir(e) | Op::Symlink(e) | Op::Special(e) | Op::SetMeta(e) => e,
            Op::File { entry, .. } => entry,
        }
    }

    /// The request that carries the op, for every op but a file (which travels as a
    /// transfer of its own).
    pub fn request(self, id: RequestId) -> Option<Message> {
        Some(match self {
            Op::Mkdir(e) => Message::Mkdir {
                id,
                path: e.path,
                meta: e.meta,
            },
            Op::Symlink(e) => Message::Symlink {
                id,
                path: e.path,
                target: e.link.unwrap_or_default(),
                meta: e.meta,
            },
            Op::Special(e) => Message::Special {
                id,
                path: e.path,
                meta: e.meta,
            },
            Op::SetMeta(e) => Message::SetMeta {
                id,
                path: e.path,
                meta: e.meta,
            },
            Op::File { .. } => return None,
        })
    }
}

/// A name to make another name of a file the receiver holds under `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The name, with the file's metadata.
    pub entry: Entry,
    /// The file's first name (in tree order), which the receiver holds.
    pub target: RelPath,
}

impl Link {
    /// The file under its first name: what is sent when the receiver's copy of it is not
    /// current.
    pub fn target_entry(&self) -> Entry {
        Entry {
            path: self.target.clone(),
            ..self.entry.clone()
        }
    }
}

/// A reconcile plan, executed in four phases: `deletes`, then `creates` in tree order (parents
/// first), then — once every earlier step is acknowledged — `links` (the files they name are
/// in place by then), then `dir_meta` deepest first, so directory times are set after their
/// contents stop changing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Extraneous receiver paths, topmost only.
    pub deletes: Vec<RelPath>,
    /// Creations and updates, in tree order.
    pub creates: Vec<Op>,
    /// Names to make hard links of files already sent.
    pub links: Vec<Link>,
    /// Directories whose metadata must be (re)applied, deepest first.
    pub dir_meta: Vec<Entry>,
    /// Entries each delete removes on the receiver (it takes its subtree), as far as a
    /// listing of the receiver told; deletes planned without one are not counted here.
    pub removes: Vec<(RelPath, u64)>,
    /// The most entries the deletes may remove in all, counted by the receiver, which holds
    /// back the deletes past it (the delete guard's allowance); `None`: no limit, uncounted.
    pub allowance: Option<u64>,
}

impl Plan {
    /// True if nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.deletes.is_empty()
            && self.creates.is_empty()
            && self.links.is_empty()
            && self.dir_meta.is_empty()
    }

    /// Drops deletions at or below any of `unreadable` (paths whose local state is unknown).
    pub fn keep_unreadable(&mut self, unreadable: &[RelPath]) {
        if unreadable.is_empty() {
            return;
        }
        self.deletes.retain(|d| {
            !unreadable
                .iter()
                .any(|u| d.starts_with(u) || u.starts_with(d))
        });
    }

    /// Appends `other`'s steps (a subtree's plan) to these.
    pub fn extend(&mut self, other: Plan) {
        self.deletes.extend(other.deletes);
        self.creates.extend(other.creates);
        self.links.extend(other.links);
        self.dir_meta.extend(other.dir_meta);
        self.removes.extend(other.removes);
    }

    /// Entries the deletes counted in `removes` take from the receiver, in all.
    pub fn removed(&self) -> u64 {
        self.removes.iter().map(|(_, n)| n).sum()
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

impl PlanOptions {
    /// The planning options of `group` on a module that `keeps` these attributes: they are
    /// compared where the group preserves them and the module keeps them.
    pub fn new(group: &SyncGroup, keeps: &Keeps) -> Self {
        PlanOptions {
            delete: group.delete,
            compare: Compare {
                owner: keeps.owners,
                setid: keeps.setid,
                xattrs: group.preserve.namespaces().intersect(keeps.xattrs),
                hardlinks: group.preserve.hardlinks,
            },
            devices: keeps.devices,
        }
    }

    /// The planning options of a live batch for an rsync target: rsync itself decides what
    /// the module can hold (devices, owners), so nothing is left out here.
    pub fn rsync(delete: bool) -> Self {
        PlanOptions {
            delete,
            compare: Compare::all(false),
            devices: true,
        }
    }
}

/// What the receiver has at an entry's path.
#[derive(Debug, Clone, Copy)]
pub enum Remote<'a> {
    /// Nothing (its listing has no such path).
    Absent,
    /// Not known: a live change, sent without listing the receiver first.
    Unknown,
    /// This entry.
    Known(&'a Entry),
}

/// The op that makes the receiver's entry equal to `local`, by kind; `None` if nothing is
/// needed or possible (a device node for an unprivileged receiver). A directory that exists
/// (or may exist) needs nothing here: its times are [`order_dir_meta`]'s business.
pub fn entry_op(local: &Entry, remote: Remote<'_>, opts: PlanOptions) -> Option<Op> {
    let known = match remote {
        Remote::Known(r) => Some(r),
        _ => None,
    };
    let same_kind = known.filter(|r| r.meta.kind == local.meta.kind);
    let meta_only = |r: &Entry| {
        (!local
            .meta
            .attr_differences(&r.meta, opts.compare)
            .is_empty())
        .then(|| Op::SetMeta(local.clone()))
    };
    let kind = local.meta.kind;
    match kind {
        Kind::Dir => match (remote, same_kind) {
            (Remote::Unknown, _) | (_, Some(_)) => None,
            _ => Some(Op::Mkdir(local.clone())),
        },
        Kind::File => match same_kind {
            Some(r) if local.meta.quick_equal(&r.meta) => meta_only(r),
            _ => Some(Op::File {
                entry: local.clone(),
                base: match remote {
                    Remote::Unknown => Base::Unknown,
                    _ => Base::of(known),
                },
            }),
        },
        Kind::Symlink => match same_kind {
            Some(r) if r.link == local.link => meta_only(r),
            _ => Some(Op::Symlink(local.clone())),
        },
        _ if kind != Kind::Fifo && !opts.devices => None,
        _ => match same_kind {
            Some(r) if r.meta.rdev == local.meta.rdev => meta_only(r),
            _ => Some(Op::Special(local.clone())),
        },
    }
}

/// For a changed file with several current names (`names`, when hard links are compared):
/// every name but one becomes a link to that one, the first in tree order that is not
/// `fresh` (new or rewritten in this batch, so perhaps not on the receiver yet). Its content
/// travels only if the receiver's copy under that name is not current, which the receiver
/// says by refusing the links (see `execute`). `None` for a file with one name.
pub fn link_ops(
    local: &Entry,
    opts: PlanOptions,
    names: &LinkNames,
    fresh: &HashSet<&RelPath>,
) -> Option<Vec<Link>> {
    let group = names
        .get(&local.inode.filter(|_| opts.compare.hardlinks)?)
        .filter(|n| n.len() > 1)?;
    let first = group
        .iter()
        .find(|n| !fresh.contains(n))
        .unwrap_or(&group[0]);
    Some(
        group
            .iter()
            .filter(|name| *name != first)
            .map(|name| Link {
                entry: Entry {
                    path: name.clone(),
                    ..local.clone()
                },
                target: first.clone(),
            })
            .collect(),
    )
}

/// Orders directories whose times must be restored: children before parents (deepest
/// first), each once. They are sent after everything inside them is acknowledged.
pub fn order_dir_meta(dirs: &mut Vec<Entry>) {
    dirs.sort_by(|a, b| {
        b.path
            .depth()
            .cmp(&a.path.depth())
            .then(b.path.tree_cmp(&a.path))
    });
    dirs.dedup_by(|a, b| a.path == b.path);
}

/// Computes the plan that turns `remote` into `local`. Both are tree-order listings starting
/// with the root; `remote` must already exclude what the sender's filter excludes. `names`
/// holds every current name of the multiply-linked files of `local` (also those outside it);
/// it is ignored unless hard links are compared.
pub fn plan(local: &[Entry], remote: &[Entry], opts: PlanOptions, names: &LinkNames) -> Plan {
    let remote_by_path: HashMap<&RelPath, &Entry> = remote.iter().map(|e| (&e.path, e)).collect();
    let linking = opts.compare.hardlinks;
    // The receiver's names of each of its files, as far as the listing shows.
    let mut remote_names: HashMap<Inode, Vec<&RelPath>> = HashMap::new();
    if linking {
        for r in remote {
            if let Some(i) = r.inode {
                remote_names.entry(i).or_default().push(&r.path);
            }
        }
    }
    let shared_on_receiver = |r: &Entry| -> &[&RelPath] {
        r.inode
            .and_then(|i| remote_names.get(&i))
            .map_or(&[], |v| v.as_slice())
    };
    let mut followers: Vec<(&Entry, &RelPath)> = Vec::new();
    let mut sent_first: HashSet<Inode> = HashSet::new();
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

    // The module root has no parent to mark: its own times and attributes, compared here
    // (a whole compare whose tree is otherwise equal still sets them).
    if let Some(l) = local.first().filter(|l| l.path.is_root()) {
        let differs = remote_by_path.get(&l.path).is_some_and(|r| {
            r.meta.kind == Kind::Dir && !l.meta.attr_differences(&r.meta, opts.compare).is_empty()
        });
        if differs {
            touched.insert(RelPath::root());
        }
    }
    for l in local {
        if l.path.is_root() {
            continue;
        }
        let remote = remote_by_path
            .get(&l.path)
            .map_or(Remote::Absent, |r| Remote::Known(r));
        if l.meta.kind == Kind::Dir {
            let attrs_differ = match remote {
                Remote::Known(r) if r.meta.kind == Kind::Dir => {
                    !l.meta.attr_differences(&r.meta, opts.compare).is_empty()
                }
                _ => true,
            };
            if attrs_differ {
                touched.insert(l.path.clone());
            }
        }
        let group = l
            .inode
            .filter(|_| linking)
            .and_then(|i| names.get(&i).map(|n| (i, n)))
            .filter(|(_, n)| n.len() > 1);
        if let Some((_, group)) = group {
            if group[0] != l.path {
                followers.push((l, &group[0]));
                continue;
            }
        }
        let mut op = entry_op(l, remote, opts);
        // A receiver file that is also other names there, not names of this file here, must
        // become a file of its own.
        if let (Remote::Known(r), true) = (remote, linking) {
            let mine: &[RelPath] = group.map_or(&[], |(_, g)| g.as_slice());
            let foreign = shared_on_receiver(r)
                .iter()
                .any(|n| **n != l.path && !mine.contains(n));
            if foreign && l.meta.kind == Kind::File && !matches!(op, Some(Op::File { .. })) {
                op = Some(Op::File {
                    entry: l.clone(),
                    base: Base::of(Some(r)),
                });
            }
        }
        if let (Some(Op::File { .. }), Some((inode, _))) = (&op, group) {
            sent_first.insert(inode);
        }
        if let Some(op) = op {
            touched.insert(l.path.parent().unwrap_or_default());
            out.creates.push(op);
        }
    }
    for (l, first) in followers {
        let inode = l.inode.expect("followers have inodes");
        let linked_there = match (remote_by_path.get(&l.path), remote_by_path.get(first)) {
            (Some(r), Some(f)) => {
                r.meta.kind == Kind::File && r.inode.is_some() && r.inode == f.inode
            }
            _ => false,
        };
        if sent_first.contains(&inode) || !linked_there {
            touched.insert(l.path.parent().unwrap_or_default());
            out.links.push(Link {
                entry: l.clone(),
                target: first.clone(),
            });
        }
    }

    out.dir_meta = local
        .iter()
        .filter(|l| l.meta.kind == Kind::Dir && touched.contains(&l.path))
        .cloned()
        .collect();
    order_dir_meta(&mut out.dir_meta);
    out
}

/// How many entries of the receiver's tree-order listing `remote` each of the `deletes`
/// removes (it takes its whole subtree); deletes that name nothing listed are left out.
pub fn deleted_entries(deletes: &[RelPath], remote: &[Entry]) -> Vec<(RelPath, u64)> {
    let gone: HashSet<&RelPath> = deletes.iter().collect();
    let mut out: Vec<(RelPath, u64)> = Vec::new();
    let mut under: Option<&RelPath> = None;
    for e in remote {
        if let Some(last) = out
            .last_mut()
            .filter(|_| under.is_some_and(|u| e.path.starts_with(u)))
        {
            last.1 += 1;
        } else if gone.contains(&e.path) {
            under = Some(&e.path);
            out.push((e.path.clone(), 1));
        } else {
            under = None;
        }
    }
    out
}

/// A dirty path of a live batch, as the source has it now.
#[derive(Debug)]
pub struct Dirty {
    /// The path.
    pub path: RelPath,
    /// What its events asked for.
    pub need: Need,
    /// Its `lstat`: the entry, `None` if it is gone, or why it could not be read.
    pub entry: Result<Option<Entry>, String>,
}

/// What a live batch needs: a plan for the paths that can be decided alone, the subtrees to
/// compare with the receiver's listing, and the directories whose times must be restored.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Steps decided from the dirty paths alone.
    pub plan: Plan,
    /// Directories (new, moved in, or changed as a whole) to compare as subtrees.
    pub trees: Vec<RelPath>,
    /// Parents whose entries change: their times are restored after their contents.
    pub parents: BTreeSet<RelPath>,
    /// Paths that could not be read, with why.
    pub failures: Vec<(RelPath, String)>,
}

/// Plans a live batch. `dirty` is in tree order, one entry per path; a path below a deleted
/// path or a subtree to compare is covered by it and skipped. `excluded` (the group's
/// [`Filter::excludes_dirty`](crate::filter::Filter::excludes_dirty)) drops what must never
/// reach the receiver, however it got into the batch. A changed file with several names
/// (`names`, when hard links are compared) is planned by [`link_ops`].
pub fn plan_batch(
    dirty: Vec<Dirty>,
    opts: PlanOptions,
    names: &LinkNames,
    excluded: impl Fn(&RelPath, Option<bool>) -> bool,
) -> BatchPlan {
    let mut out = BatchPlan::default();
    let mut covered: Option<RelPath> = None;
    let mut linked: HashSet<Inode> = HashSet::new();
    let fresh_paths: Vec<RelPath> = dirty
        .iter()
        .filter(|d| d.need >= Need::Content)
        .map(|d| d.path.clone())
        .collect();
    let fresh: HashSet<&RelPath> = fresh_paths.iter().collect();
    for Dirty { path, need, entry } in dirty {
        if covered.as_ref().is_some_and(|c| path.starts_with(c)) {
            continue;
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.failures.push((path, e));
                continue;
            }
        };
        let is_dir = entry.as_ref().map(|e| e.meta.kind == Kind::Dir);
        if excluded(&path, is_dir) {
            continue;
        }
        match entry {
            None => {
                if opts.delete && !path.is_root() {
                    out.parents.extend(path.parent());
                    out.plan.deletes.push(path.clone());
                    covered = Some(path);
                }
            }
            Some(e) if e.meta.kind == Kind::Dir => {
                if need >= Need::Content {
                    out.parents.extend(path.parent());
                    out.trees.push(path.clone());
                    covered = Some(path);
                } else {
                    out.plan.dir_meta.push(e);
                }
            }
            Some(e) => {
                // A file with several names: every name a link to the first (a new name, as
                // `ln` makes, shows as a change of the old one's attributes).
                if let Some(links) = link_ops(&e, opts, names, &fresh) {
                    if linked.insert(e.inode.expect("linked files have inodes")) {
                        for l in &links {
                            out.parents.extend(l.entry.path.parent());
                            out.parents.extend(l.target.parent());
                        }
                        out.plan.links.extend(links);
                    }
                    if need == Need::Meta {
                        out.plan.creates.push(Op::SetMeta(e));
                    }
                } else if need == Need::Meta {
                    out.plan.creates.push(Op::SetMeta(e));
                } else if let Some(op) = entry_op(&e, Remote::Unknown, opts) {
                    out.parents.extend(path.parent());
                    out.plan.creates.push(op);
                }
            }
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
            xattrs: Default::default(),
        };
        let link = (kind == Kind::Symlink).then(|| b"target".to_vec());
        Entry {
            path: RelPath::from(path),
            meta,
            link,
            inode: None,
        }
    }

    /// A plan without hard links to consider.
    fn plan_of(local: &[Entry], remote: &[Entry], opts: PlanOptions) -> Plan {
        plan(local, remote, opts, &LinkNames::new())
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            delete: true,
            compare: Compare::all(true),
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
        assert!(plan_of(&t, &t, opts()).is_empty());
    }

    #[test]
    fn the_module_roots_own_times_are_set_when_nothing_else_differs() {
        let local = vec![e("", Kind::Dir, 0, 2), e("a", Kind::File, 5, 1)];
        let remote = vec![e("", Kind::Dir, 0, 1), e("a", Kind::File, 5, 1)];
        let p = plan_of(&local, &remote, opts());
        assert!(p.creates.is_empty() && p.deletes.is_empty());
        let dirs: Vec<String> = p.dir_meta.iter().map(|d| d.path.to_string()).collect();
        assert_eq!(dirs, ["."]);
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
        let p = plan_of(&local, &remote, opts());
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
                    base: Base::Absent
                },
                Op::File {
                    entry: local[3].clone(),
                    base: Base::Present
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
        let p = plan_of(&local, &remote, opts());
        assert_eq!(p.creates, vec![Op::SetMeta(local[1].clone())]);
        remote[1].meta.mode = 0o644;
        remote[1].meta.uid = 9;
        let no_owner = PlanOptions {
            compare: Compare::all(false),
            ..opts()
        };
        assert!(plan_of(&local, &remote, no_owner).is_empty());
    }

    #[test]
    fn delete_false_keeps_extras() {
        let local = vec![e("", Kind::Dir, 0, 1)];
        let remote = vec![e("", Kind::Dir, 0, 1), e("old", Kind::File, 1, 1)];
        assert!(plan_of(
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
            plan_of(&local, &remote, opts()).creates,
            vec![Op::File {
                entry: local[1].clone(),
                base: Base::Present
            }]
        );
        assert_eq!(body_for(100, Base::Present), Body::Whole);
    }

    #[test]
    fn delta_only_for_big_files_with_a_possible_base() {
        let big = DELTA_THRESHOLD;
        assert_eq!(body_for(big, Base::Present), Body::Delta);
        assert_eq!(body_for(big, Base::Unknown), Body::Delta);
        assert_eq!(body_for(big, Base::Absent), Body::Whole);
        assert_eq!(body_for(big - 1, Base::Unknown), Body::Whole);
        assert_eq!(
            body_for(RESUME_THRESHOLD, Base::Absent),
            Body::Delta,
            "resumable"
        );
        let empty = e("f", Kind::File, 0, 1);
        assert_eq!(Base::of(Some(&empty)), Base::Absent);
        assert_eq!(Base::of(Some(&e("f", Kind::Dir, 0, 1))), Base::Absent);
        assert_eq!(Base::of(Some(&e("f", Kind::File, 9, 1))), Base::Present);
    }

    #[test]
    fn entry_op_by_kind_table() {
        let no_dev = opts();
        let dev = PlanOptions {
            devices: true,
            ..opts()
        };
        let file = e("f", Kind::File, 5, 2);
        let dir = e("d", Kind::Dir, 0, 1);
        let link = e("l", Kind::Symlink, 0, 1);
        let chr = e("c", Kind::CharDevice, 0, 1);
        let fifo = e("p", Kind::Fifo, 0, 1);
        let older = e("f", Kind::File, 5, 1);
        let show = |op: Option<Op>| match op {
            None => "-".to_string(),
            Some(Op::File { base, .. }) => format!("File {base:?}"),
            Some(op) => format!("{op:?}").split('(').next().unwrap().to_string(),
        };
        let table: Vec<(&Entry, Remote, PlanOptions, &str)> = vec![
            (&file, Remote::Absent, no_dev, "File Absent"),
            (&file, Remote::Unknown, no_dev, "File Unknown"),
            (&file, Remote::Known(&older), no_dev, "File Present"),
            (&file, Remote::Known(&file), no_dev, "-"),
            (&file, Remote::Known(&dir), no_dev, "File Absent"),
            (&dir, Remote::Absent, no_dev, "Mkdir"),
            (&dir, Remote::Unknown, no_dev, "-"),
            (&dir, Remote::Known(&file), no_dev, "Mkdir"),
            (&dir, Remote::Known(&dir), no_dev, "-"),
            (&link, Remote::Unknown, no_dev, "Symlink"),
            (&link, Remote::Known(&link), no_dev, "-"),
            (&chr, Remote::Unknown, no_dev, "-"),
            (&chr, Remote::Absent, dev, "Special"),
            (&fifo, Remote::Unknown, no_dev, "Special"),
        ];
        for (local, remote, o, want) in table {
            assert_eq!(
                show(entry_op(local, remote, o)),
                want,
                "{} {remote:?}",
                local.path
            );
        }
        let mut chmodded = file.clone();
        chmodded.meta.mode = 0o600;
        assert_eq!(
            entry_op(&chmodded, Remote::Known(&file), no_dev),
            Some(Op::SetMeta(chmodded.clone()))
        );
    }

    fn dirty(path: &str, need: Need, entry: Option<Entry>) -> Dirty {
        Dirty {
            path: RelPath::from(path),
            need,
            entry: Ok(entry),
        }
    }

    #[test]
    fn a_batch_sends_files_compares_new_directories_and_deletes_what_is_gone() {
        let batch = vec![
            dirty("a", Need::Tree, Some(e("a", Kind::Dir, 0, 1))),
            dirty(
                "a/inner",
                Need::Content,
                Some(e("a/inner", Kind::File, 1, 1)),
            ),
            dirty("b", Need::Meta, Some(e("b", Kind::Dir, 0, 1))),
            dirty("c/f", Need::Content, Some(e("c/f", Kind::File, 1 << 20, 1))),
            dirty("g", Need::Content, None),
            dirty("g/x", Need::Content, None),
            dirty("m", Need::Meta, Some(e("m", Kind::File, 1, 1))),
            Dirty {
                path: RelPath::from("u"),
                need: Need::Content,
                entry: Err("Permission denied".into()),
            },
        ];
        let out = plan_batch(batch, opts(), &LinkNames::new(), |_, _| false);
        assert_eq!(out.trees, vec![RelPath::from("a")], "a/inner is covered");
        assert_eq!(out.plan.deletes, vec![RelPath::from("g")]);
        assert_eq!(
            out.plan.creates,
            vec![
                Op::File {
                    entry: e("c/f", Kind::File, 1 << 20, 1),
                    base: Base::Unknown
                },
                Op::SetMeta(e("m", Kind::File, 1, 1)),
            ]
        );
        assert_eq!(out.plan.dir_meta, vec![e("b", Kind::Dir, 0, 1)]);
        let parents: Vec<String> = out.parents.iter().map(|p| p.to_string()).collect();
        assert_eq!(parents, vec![".", "c"]);
        assert_eq!(
            out.failures,
            vec![(RelPath::from("u"), "Permission denied".into())]
        );
    }

    #[test]
    fn a_batch_without_delete_keeps_what_is_gone() {
        let o = PlanOptions {
            delete: false,
            ..opts()
        };
        let out = plan_batch(
            vec![dirty("g", Need::Content, None)],
            o,
            &LinkNames::new(),
            |_, _| false,
        );
        assert!(out.plan.is_empty() && out.parents.is_empty());
    }

    #[test]
    fn a_batch_never_sends_or_deletes_an_excluded_path() {
        let filter = crate::filter::Filter::new(&["*.log".into(), "cache/".into()]).unwrap();
        let batch = vec![
            dirty("a.log", Need::Content, Some(e("a.log", Kind::File, 1, 1))),
            dirty("cache", Need::Content, None),
            dirty("cache2", Need::Tree, Some(e("cache2", Kind::Dir, 0, 1))),
            dirty("d/x.log", Need::Meta, Some(e("d/x.log", Kind::File, 1, 1))),
            dirty("keep", Need::Content, Some(e("keep", Kind::File, 1, 1))),
            dirty("old.log", Need::Content, None),
        ];
        let out = plan_batch(batch, opts(), &LinkNames::new(), |p, d| {
            filter.excludes_dirty(p, d)
        });
        assert!(out.plan.deletes.is_empty(), "{:?}", out.plan.deletes);
        let sent = paths_of(&out.plan.creates);
        assert_eq!(sent, vec!["keep"]);
        assert_eq!(out.trees, vec![RelPath::from("cache2")]);
    }

    #[test]
    fn deletions_count_whole_subtrees_and_spare_what_could_not_be_read() {
        let remote = vec![
            e("", Kind::Dir, 0, 1),
            e("a", Kind::Dir, 0, 1),
            e("a/1", Kind::File, 1, 1),
            e("a/2", Kind::File, 1, 1),
            e("b", Kind::File, 1, 1),
            e("c", Kind::Dir, 0, 1),
            e("c/x", Kind::File, 1, 1),
        ];
        let dels = vec![RelPath::from("a"), RelPath::from("c/x")];
        assert_eq!(
            deleted_entries(&dels, &remote),
            vec![(RelPath::from("a"), 3), (RelPath::from("c/x"), 1)]
        );
        let mut p = Plan {
            deletes: vec![RelPath::from("a"), RelPath::from("c/x"), RelPath::from("d")],
            ..Plan::default()
        };
        p.keep_unreadable(&[RelPath::from("c"), RelPath::from("a/1")]);
        assert_eq!(p.deletes, vec![RelPath::from("d")]);
    }

    fn linked(path: &str, ino: u64) -> Entry {
        Entry {
            inode: Some(Inode { dev: 1, ino }),
            ..e(path, Kind::File, 10, 5)
        }
    }

    fn link_names(groups: &[(u64, &[&str])]) -> LinkNames {
        groups
            .iter()
            .map(|(ino, names)| {
                let names = names.iter().map(|n| RelPath::from(*n)).collect();
                (Inode { dev: 1, ino: *ino }, names)
            })
            .collect()
    }

    fn paths_of(ops: &[Op]) -> Vec<String> {
        ops.iter().map(|o| o.entry().path.to_string()).collect()
    }

    fn links_of(p: &Plan) -> Vec<(String, String)> {
        p.links
            .iter()
            .map(|l| (l.entry.path.to_string(), l.target.to_string()))
            .collect()
    }

    fn linking() -> PlanOptions {
        PlanOptions {
            compare: Compare::all(true).with(Default::default(), true),
            ..opts()
        }
    }

    #[test]
    fn names_of_one_file_travel_once_then_as_links_and_only_where_the_receiver_differs() {
        let local = vec![
            e("", Kind::Dir, 0, 1),
            linked("a", 7),
            linked("b", 7),
            linked("c", 7),
            e("d", Kind::File, 10, 5),
        ];
        let names = link_names(&[(7, &["a", "b", "c"])]);
        // An empty receiver: the file once, under its first name, then two links.
        let p = plan(&local, &local[..1], linking(), &names);
        let files = paths_of(&p.creates);
        assert_eq!(files, vec!["a", "d"]);
        assert_eq!(
            links_of(&p),
            vec![("b".into(), "a".into()), ("c".into(), "a".into())]
        );
        // The receiver has a and b as one file (its own inode numbers), c apart, and d linked
        // to a file that is not d here: only c is linked, and d becomes a file of its own.
        let remote = vec![
            e("", Kind::Dir, 0, 1),
            linked("a", 70),
            linked("b", 70),
            linked("c", 71),
            linked("d", 72),
            linked("x", 72),
        ];
        let p = plan(&local, &remote, linking(), &names);
        assert_eq!(links_of(&p), vec![("c".into(), "a".into())]);
        let files = paths_of(&p.creates);
        assert_eq!(files, vec!["d"]);
        // Without hard links compared, names are files like any other.
        let p = plan(&local, &local[..1], opts(), &names);
        assert_eq!((p.creates.len(), p.links.len()), (4, 0));
        // A first name linked there to a stranger is sent anew, and every name relinked.
        let remote = vec![
            e("", Kind::Dir, 0, 1),
            linked("a", 70),
            linked("b", 70),
            linked("c", 70),
            linked("z", 70),
        ];
        let p = plan(&local, &remote, linking(), &names);
        assert!(matches!(&p.creates[0], Op::File { entry, .. } if entry.path.as_bytes() == b"a"));
        assert_eq!(
            links_of(&p),
            vec![("b".into(), "a".into()), ("c".into(), "a".into())]
        );
    }

    #[test]
    fn a_batch_links_new_names_to_one_the_receiver_already_has() {
        let names = link_names(&[(7, &["a", "m", "z"])]);
        // `ln m a`: a is new (created), m only changed attributes (its link count).
        let batch = vec![
            dirty("a", Need::Content, Some(linked("a", 7))),
            dirty("m", Need::Meta, Some(linked("m", 7))),
        ];
        let out = plan_batch(batch, linking(), &names, |_, _| false);
        assert_eq!(
            links_of(&out.plan),
            vec![("a".into(), "m".into()), ("z".into(), "m".into())]
        );
        let meta = paths_of(&out.plan.creates);
        assert_eq!(meta, vec!["m"], "no content, m's attributes");
        assert!(out.parents.contains(&RelPath::root()));
        // One name rewritten: the others are linked to the first name that was not.
        let batch = vec![dirty("a", Need::Content, Some(linked("a", 7)))];
        let out = plan_batch(batch, linking(), &names, |_, _| false);
        assert_eq!(
            links_of(&out.plan),
            vec![("a".into(), "m".into()), ("z".into(), "m".into())]
        );
    }
}
