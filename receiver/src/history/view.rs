//! The module as it was at an earlier time: the tree now, with every journaled change made
//! after that time undone, newest first. Pure: the tree and the objects' contents come in as
//! lists, the answer is where each path's state at that time is found now.

use super::Version;
use ferry_protocol::meta::Meta;
use ferry_protocol::RelPath;
use std::collections::BTreeMap;

/// Where the state of a path at the chosen time is found now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// In the module, at this path.
    Module(RelPath),
    /// In the history: object `id`, at `sub` below it (the root for the object itself).
    Object {
        /// The object's id (`objects/ID`).
        id: i64,
        /// The path below it.
        sub: RelPath,
    },
}

/// One path of the view: where its state is, and its metadata then when a later change
/// altered it in place (else the source's own is right).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where it is found.
    pub source: Source,
    /// Its metadata at the chosen time, when the source's is not.
    pub meta: Option<Meta>,
}

/// The module at a time: every path below the root (the root itself left out), in tree order.
pub type View = BTreeMap<RelPath, Node>;

fn at_or_below(view: &View, path: &RelPath) -> Vec<RelPath> {
    view.keys()
        .filter(|k| *k == path || k.starts_with(path))
        .cloned()
        .collect()
}

/// The view of a module whose entries now are `now` (paths below its root), undoing `later`
/// (the journal's rows after the chosen time, any order); `object` lists what an object holds
/// below its own root (a deleted directory's tree), as paths relative to it.
pub fn view_at(
    now: impl IntoIterator<Item = RelPath>,
    later: &[Version],
    object: impl Fn(i64) -> Vec<RelPath>,
) -> View {
    let mut view: View = now
        .into_iter()
        .filter(|p| !p.is_root())
        .map(|p| {
            let source = Source::Module(p.clone());
            (p, Node { source, meta: None })
        })
        .collect();
    let mut rows: Vec<&Version> = later.iter().collect();
    // Ids follow the order the changes were made in: undo the newest first.
    rows.sort_by_key(|v| std::cmp::Reverse(v.id));
    for v in rows {
        let path = RelPath::from_bytes(v.raw_path.clone());
        let meta: Option<Meta> = serde_json::from_str(&v.meta).ok();
        match v.action.as_str() {
            "created" => {
                for p in at_or_below(&view, &path) {
                    view.remove(&p);
                }
            }
            "replaced" | "deleted" if v.object => {
                for p in at_or_below(&view, &path) {
                    view.remove(&p);
                }
                let top = Source::Object {
                    id: v.id,
                    sub: RelPath::root(),
                };
                view.insert(path.clone(), Node { source: top, meta });
                for sub in object(v.id) {
                    let source = Source::Object {
                        id: v.id,
                        sub: sub.clone(),
                    };
                    view.insert(path.join(sub.as_bytes()), Node { source, meta: None });
                }
            }
            "renamed" => {
                let Some(to) = v.raw_renamed_to.clone().map(RelPath::from_bytes) else {
                    continue;
                };
                for p in at_or_below(&view, &to) {
                    let node = view.remove(&p).expect("listed");
                    let tail = &p.as_bytes()[to.as_bytes().len()..];
                    let mut back = path.as_bytes().to_vec();
                    back.extend_from_slice(tail);
                    view.insert(RelPath::from_bytes(back), node);
                }
            }
            "metadata" => {
                if let (Some(node), Some(meta)) = (view.get_mut(&path), meta) {
                    node.meta = Some(meta);
                }
            }
            _ => {}
        }
    }
    view
}

/// The module root's metadata at the chosen time, when a later change moved it (the state
/// noted before the first of them); `None`: it is as it is now. `later` as for [`view_at`].
pub fn root_at(later: &[Version]) -> Option<Meta> {
    later
        .iter()
        .filter(|v| v.raw_path.is_empty() && v.action == "metadata")
        .min_by_key(|v| v.id)
        .and_then(|v| serde_json::from_str(&v.meta).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, action: &str, path: &str, object: bool, to: Option<&str>) -> Version {
        Version {
            id,
            path: path.into(),
            time_ns: id,
            action: action.into(),
            kind: "file".into(),
            size: 0,
            object,
            renamed_to: to.map(str::to_string),
            meta: String::new(),
            raw_path: path.as_bytes().to_vec(),
            raw_renamed_to: to.map(|t| t.as_bytes().to_vec()),
        }
    }

    #[test]
    fn the_roots_state_then_is_its_oldest_note_after_that_time() {
        let noted = |id, path: &str, mtime| {
            let meta = Meta {
                kind: ferry_protocol::meta::Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime,
                mtime_nsec: 0,
                rdev: 0,
                xattrs: Default::default(),
            };
            Version {
                meta: serde_json::to_string(&meta).unwrap(),
                ..row(id, "metadata", path, false, None)
            }
        };
        let (first, second, other) = (noted(5, "", 100), noted(9, "", 200), noted(7, "d", 300));
        let at = |rows: &[Version]| root_at(rows).map(|m| m.mtime);
        assert_eq!(at(&[second.clone(), other.clone(), first]), Some(100));
        assert_eq!(at(&[second, other.clone()]), Some(200));
        assert_eq!(at(&[other]), None, "another path's note is not the root's");
        assert_eq!(at(&[]), None);
    }

    fn shown(view: &View) -> Vec<String> {
        view.iter()
            .map(|(p, n)| match &n.source {
                Source::Module(m) if m == p => format!("{p}"),
                Source::Module(m) => format!("{p}=module:{m}"),
                Source::Object { id, sub } if sub.is_root() => format!("{p}=#{id}"),
                Source::Object { id, sub } => format!("{p}=#{id}/{sub}"),
            })
            .collect()
    }

    #[test]
    fn later_changes_are_undone_newest_first() {
        // Now: `a` (rewritten), `b` (new), `c` (renamed from `old`, over an earlier `c`),
        // `keep`; `d/` and what was under it deleted.
        let now = ["a", "b", "c", "keep"].map(RelPath::from);
        let later = [
            row(1, "replaced", "a", true, None),
            row(2, "created", "b", false, None),
            row(3, "deleted", "d", true, None),
            row(4, "replaced", "c", true, None),
            row(5, "renamed", "old", false, Some("c")),
        ];
        let objects = |id: i64| match id {
            3 => vec![RelPath::from("x"), RelPath::from("y")],
            _ => Vec::new(),
        };
        let view = view_at(now, &later, objects);
        assert_eq!(
            shown(&view),
            [
                "a=#1",
                "c=#4",
                "d=#3",
                "d/x=#3/x",
                "d/y=#3/y",
                "keep",
                "old=module:c"
            ]
        );
        // Before only the last two changes: the rename undone, the old `c` back.
        let view = view_at(
            ["a", "b", "c", "keep"].map(RelPath::from),
            &later[3..],
            objects,
        );
        assert_eq!(shown(&view), ["a", "b", "c=#4", "keep", "old=module:c"]);
    }

    #[test]
    fn a_renamed_directory_goes_back_with_everything_under_it() {
        let now = ["new", "new/f", "new/g", "newer"].map(RelPath::from);
        let later = [row(7, "renamed", "dir", false, Some("new"))];
        let view = view_at(now, &later, |_| Vec::new());
        assert_eq!(
            shown(&view),
            [
                "dir=module:new",
                "dir/f=module:new/f",
                "dir/g=module:new/g",
                "newer"
            ]
        );
    }
}
