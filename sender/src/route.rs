//! Routing one raw watcher event: what it means for the coalescer, and what the watcher must do
//! first (watch a new directory before it is compared, forget watches of one that left).
//! Pure: what the filesystem looks like now comes through a [`Lookup`], so the rules are
//! tested from a table with a faked one.

use crate::coalesce::{Event, What};
use ferry_protocol::RelPath;
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::EventKind;

/// What the router knows or can find out about a path.
pub trait Lookup {
    /// What is at `rel` now (`lstat`), if anything.
    fn what(&self, rel: &RelPath) -> Option<What>;
    /// `rel` is a watched directory (so it was a directory before this event).
    fn watched(&self, rel: &RelPath) -> bool;
    /// `rel` (or an ancestor) is excluded by the group's filter.
    fn excluded(&self, rel: &RelPath, is_dir: bool) -> bool;
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// Nothing: noise, or an excluded path.
    Ignore,
    /// The source directory itself was removed or moved away.
    RootGone,
    /// Feed `event` to the coalescer, after placing watches on the directory tree at
    /// `watch` or dropping the record of watches at and below `forget`.
    Event {
        /// The coalescer's event.
        event: Event,
        /// Watch this new directory (and what is inside) first.
        watch: Option<RelPath>,
        /// Forget the watches at and below this path.
        forget: Option<RelPath>,
    },
}

fn event(event: Event) -> Routed {
    Routed::Event {
        event,
        watch: None,
        forget: None,
    }
}

/// Routes an event of `kind` on `rel` (relative to the group's source); `cookie` pairs the
/// halves of a move.
pub fn route(kind: &EventKind, rel: RelPath, cookie: Option<u32>, fs: &impl Lookup) -> Routed {
    if rel.is_root() {
        return match kind {
            // Moved back into place (fanotify sees that; inotify has no watch on the parent):
            // the router's check for the source's return takes it from there.
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Routed::Ignore,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => Routed::RootGone,
            EventKind::Modify(ModifyKind::Metadata(_)) => event(Event::Attrib(rel)),
            _ => Routed::Ignore,
        };
    }
    let was_dir = fs.watched(&rel);
    // A new directory is watched (with anything already inside) before it is compared.
    let arrived = |rel: RelPath, what: What, ev: Event| {
        if fs.excluded(&rel, what == What::Dir) {
            return Routed::Ignore;
        }
        Routed::Event {
            event: ev,
            watch: (what == What::Dir).then_some(rel),
            forget: None,
        }
    };
    let left = |rel: RelPath, is_dir: bool, ev: Event| {
        if fs.excluded(&rel, is_dir) {
            return Routed::Ignore;
        }
        Routed::Event {
            event: ev,
            watch: None,
            forget: Some(rel),
        }
    };
    match *kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            if fs.excluded(&rel, false) {
                return Routed::Ignore;
            }
            event(Event::Closed(rel))
        }
        EventKind::Access(_) => Routed::Ignore,
        EventKind::Create(kind) => {
            let what = fs.what(&rel).unwrap_or(if kind == CreateKind::Folder {
                What::Dir
            } else {
                What::File
            });
            arrived(rel.clone(), what, Event::Created(rel, what))
        }
        EventKind::Modify(ModifyKind::Name(mode)) => match (mode, cookie) {
            (RenameMode::From, Some(cookie)) => {
                left(rel.clone(), was_dir, Event::MovedFrom(rel, cookie))
            }
            (RenameMode::To, Some(cookie)) => {
                let what = fs.what(&rel).unwrap_or(What::File);
                arrived(rel.clone(), what, Event::MovedTo(rel, cookie, what))
            }
            (RenameMode::Both, _) => Routed::Ignore,
            _ => {
                if fs.excluded(&rel, was_dir) {
                    return Routed::Ignore;
                }
                event(Event::Removed(rel))
            }
        },
        EventKind::Modify(ModifyKind::Metadata(_)) => {
            let is_dir = fs.what(&rel) == Some(What::Dir);
            if fs.excluded(&rel, is_dir) {
                return Routed::Ignore;
            }
            event(Event::Attrib(rel))
        }
        EventKind::Modify(_) => {
            if fs.excluded(&rel, false) {
                return Routed::Ignore;
            }
            event(Event::Modified(rel))
        }
        EventKind::Remove(kind) => {
            let is_dir = was_dir || kind == RemoveKind::Folder;
            left(rel.clone(), is_dir, Event::Removed(rel))
        }
        EventKind::Any | EventKind::Other => Routed::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Filter;
    use notify::event::{DataChange, MetadataKind};
    use std::collections::HashMap;

    /// A faked filesystem: what exists, what is watched, and a real filter.
    struct Fake {
        exists: HashMap<RelPath, What>,
        watched: Vec<RelPath>,
        filter: Filter,
    }

    impl Lookup for Fake {
        fn what(&self, rel: &RelPath) -> Option<What> {
            self.exists.get(rel).copied()
        }
        fn watched(&self, rel: &RelPath) -> bool {
            self.watched.contains(rel)
        }
        fn excluded(&self, rel: &RelPath, is_dir: bool) -> bool {
            self.filter.excludes_with_ancestors(rel, is_dir)
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::from(s)
    }

    fn show(r: &Routed) -> String {
        match r {
            Routed::Ignore => "ignore".into(),
            Routed::RootGone => "root gone".into(),
            Routed::Event {
                event,
                watch,
                forget,
            } => {
                let mut s = format!("{event:?}").replace('"', "");
                if let Some(w) = watch {
                    s += &format!(" watch {w}");
                }
                if let Some(f) = forget {
                    s += &format!(" forget {f}");
                }
                s
            }
        }
    }

    #[test]
    fn routing_table() {
        let fs = Fake {
            exists: [
                (p("dir"), What::Dir),
                (p("f"), What::File),
                (p("a.log"), What::File),
                (p("cache"), What::Dir),
                (p("link"), What::Other),
            ]
            .into(),
            watched: vec![p("old")],
            filter: Filter::new(&["*.log".into(), "/secret.txt".into(), "cache/".into()]).unwrap(),
        };
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        let attrib = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any));
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let table: Vec<(EventKind, &str, Option<u32>, &str)> = vec![
            (
                EventKind::Create(CreateKind::File),
                "f",
                None,
                "Created(f, File)",
            ),
            (
                EventKind::Create(CreateKind::Any),
                "dir",
                None,
                "Created(dir, Dir) watch dir",
            ),
            // Gone again before we looked: trust the kernel's word.
            (
                EventKind::Create(CreateKind::Folder),
                "gone",
                None,
                "Created(gone, Dir) watch gone",
            ),
            (
                EventKind::Create(CreateKind::Any),
                "link",
                None,
                "Created(link, Other)",
            ),
            (data, "f", None, "Modified(f)"),
            (close, "f", None, "Closed(f)"),
            (attrib, "f", None, "Attrib(f)"),
            (attrib, "", None, "Attrib()"),
            (
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "f",
                None,
                "ignore",
            ),
            (from, "old", Some(7), "MovedFrom(old, 7) forget old"),
            (to, "dir", Some(7), "MovedTo(dir, 7, Dir) watch dir"),
            (to, "f", Some(8), "MovedTo(f, 8, File)"),
            (from, "f", None, "Removed(f)"),
            (
                EventKind::Remove(RemoveKind::Folder),
                "old",
                None,
                "Removed(old) forget old",
            ),
            (EventKind::Remove(RemoveKind::File), "", None, "root gone"),
            (from, "", Some(1), "root gone"),
            // The source moved back into place: its return is noticed by the router's check.
            (to, "", Some(1), "ignore"),
            // Excluded paths never get through, whatever the event.
            (EventKind::Create(CreateKind::File), "a.log", None, "ignore"),
            (data, "a.log", None, "ignore"),
            (close, "a.log", None, "ignore"),
            (close, "secret.txt", None, "ignore"),
            (attrib, "a.log", None, "ignore"),
            (to, "a.log", Some(9), "ignore"),
            (from, "a.log", Some(9), "ignore"),
            (EventKind::Remove(RemoveKind::File), "a.log", None, "ignore"),
            (
                EventKind::Create(CreateKind::Folder),
                "cache",
                None,
                "ignore",
            ),
            (close, "cache/x", None, "ignore"),
            // Anchored: only at the root.
            (close, "sub/secret.txt", None, "Closed(sub/secret.txt)"),
        ];
        for (kind, path, cookie, want) in table {
            let got = show(&route(&kind, p(path), cookie, &fs));
            assert_eq!(got, want, "{kind:?} on {path:?}");
        }
    }
}
