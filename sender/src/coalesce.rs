//! Coalescing: turns a stream of filesystem events into the changes worth sending, and decides
//! when each one is ready. Pure — time is passed in — so the rules are tested as a table.
//!
//! The rules:
//! - A file closed after writing is ready at once; so are deletions, renames, new directories,
//!   new symlinks and special files, and attribute-only changes (chmod, chown, touch).
//! - A file written but still open (a growing log) is ready once it has been quiet for
//!   `settle`, and at least every `max_delay` while it keeps changing.
//! - A file created and not yet closed waits like a written one (a hard link never closes).
//! - Any number of events on one path before it is ready make one change, at the highest need.
//! - A move out of the tree (a `from` with no matching `to` within [`PAIR_WINDOW`]) is a
//!   deletion; a move in (a `to` with no `from`) is a creation; a matched pair is a rename,
//!   and changes pending under the old name move with it.

pub use crate::timing::Timing;
use ferry_protocol::RelPath;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a move's `from` half waits for its `to` half. inotify queues both halves
/// back to back, so this only has to cover the trip through the watcher thread.
pub const PAIR_WINDOW: Duration = Duration::from_millis(20);

/// How much work a change needs, in increasing order; merging keeps the highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// Metadata only (mode, owner, times).
    Meta,
    /// The path's content and metadata; a path missing locally is deleted.
    Content,
    /// The whole subtree at the path, compared with the receiver's listing.
    Tree,
}

/// What kind of object an event is about, when the event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A regular file (or unknown).
    File,
    /// A directory.
    Dir,
    /// A symlink, fifo or device node: complete as soon as it exists.
    Other,
}

/// One filesystem event, already relative to its sync group's source and filtered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A path was created.
    Created(RelPath, What),
    /// Data was written to a file that may still be open.
    Modified(RelPath),
    /// A file open for writing was closed.
    Closed(RelPath),
    /// Metadata changed.
    Attrib(RelPath),
    /// A path was removed.
    Removed(RelPath),
    /// The first half of a move; `cookie` pairs it with its [`Event::MovedTo`].
    MovedFrom(RelPath, u32),
    /// The second half of a move.
    MovedTo(RelPath, u32, What),
    /// Events were lost (kernel queue overflow, watcher error): everything must be compared.
    Overflow,
}

/// A change that is ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Bring `path` up to date.
    Path {
        /// The path.
        path: RelPath,
        /// How much to send.
        need: Need,
        /// When its first event arrived (for latency figures).
        since: Instant,
    },
    /// A rename inside the tree.
    Rename(Rename),
    /// Compare the whole tree.
    Full,
}

/// `from` was renamed to `to` inside the tree: the one shape a rename has from the watcher to
/// the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// Old name.
    pub from: RelPath,
    /// New name.
    pub to: RelPath,
    /// It is a directory.
    pub dir: bool,
    /// When it happened (for latency figures).
    pub since: Instant,
}

impl Rename {
    /// The rename as dirty paths, for a transport or a receiver that does not apply it as a
    /// rename: the old name compared (so deleted, unless it exists again) and the new one
    /// compared whole. The one rule for a rename that is not sent as one.
    pub fn as_paths(&self) -> [(RelPath, Need, Instant); 2] {
        [
            (self.from.clone(), Need::Content, self.since),
            (self.to.clone(), Need::Tree, self.since),
        ]
    }
}

/// Moves the entries of `map` at and below `from` to the same places below `to`; `merge` puts
/// each moved entry in (an entry may already exist under the new name).
pub fn rekey<V>(
    map: &mut BTreeMap<RelPath, V>,
    from: &RelPath,
    to: &RelPath,
    mut merge: impl FnMut(&mut BTreeMap<RelPath, V>, RelPath, V),
) {
    for old in under(map, from) {
        let v = map.remove(&old).expect("listed by under");
        merge(map, old.rebase(from, to), v);
    }
}

/// The keys of `map` at and below `path`.
pub fn under<V>(map: &BTreeMap<RelPath, V>, path: &RelPath) -> Vec<RelPath> {
    // Keys below `path` sort after it and share its bytes as a prefix (so do siblings such
    // as `a-b` for `a`, which the filter drops).
    map.range(path.clone()..)
        .take_while(|(p, _)| p.as_bytes().starts_with(path.as_bytes()))
        .filter(|(p, _)| p.starts_with(path))
        .map(|(p, _)| p.clone())
        .collect()
}

#[derive(Debug)]
struct Pending {
    first: Instant,
    last: Instant,
    /// Data was written or the file was created: content must travel.
    data: bool,
}

/// The coalescer for one sync group.
#[derive(Debug)]
pub struct Coalescer {
    timing: Timing,
    pending: BTreeMap<RelPath, Pending>,
    moves: VecDeque<(u32, RelPath, Instant)>,
    ready: Vec<Change>,
}

impl Coalescer {
    /// A coalescer with the given timing.
    pub fn new(timing: Timing) -> Coalescer {
        Coalescer {
            timing,
            pending: BTreeMap::new(),
            moves: VecDeque::new(),
            ready: Vec::new(),
        }
    }

    /// Paths waiting to settle.
    pub fn waiting(&self) -> usize {
        self.pending.len() + self.moves.len()
    }

    /// Feeds one event observed at `now`.
    pub fn event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Created(path, What::Dir) => self.now(path, Need::Tree, now),
            Event::Created(path, What::Other) => self.now(path, Need::Content, now),
            Event::Created(path, What::File) => self.write(path, now),
            Event::Modified(path) => self.write(path, now),
            Event::Closed(path) => {
                // A close without a write changed nothing but times (touch does this).
                let (need, since) = match self.pending.remove(&path) {
                    Some(p) if p.data => (Need::Content, p.first),
                    _ => (Need::Meta, now),
                };
                self.ready.push(Change::Path { path, need, since });
            }
            Event::Attrib(path) => {
                // Metadata of a file still being written travels with its content.
                if !self.pending.contains_key(&path) {
                    self.ready.push(Change::Path {
                        path,
                        need: Need::Meta,
                        since: now,
                    });
                }
            }
            Event::Removed(path) => self.now(path, Need::Content, now),
            Event::MovedFrom(path, cookie) => self.moves.push_back((cookie, path, now)),
            Event::MovedTo(to, cookie, what) => {
                match self.moves.iter().position(|(c, _, _)| *c == cookie) {
                    Some(i) => {
                        let (_, from, at) = self.moves.remove(i).expect("index is valid");
                        rekey(&mut self.pending, &from, &to, |m, k, v| {
                            m.insert(k, v);
                        });
                        self.ready.push(Change::Rename(Rename {
                            from,
                            to,
                            dir: what == What::Dir,
                            since: at,
                        }));
                    }
                    // Moved in from outside the tree: complete, so send it now.
                    None => {
                        let need = if what == What::Dir {
                            Need::Tree
                        } else {
                            Need::Content
                        };
                        self.now(to, need, now);
                    }
                }
            }
            Event::Overflow => {
                self.pending.clear();
                self.moves.clear();
                self.ready.push(Change::Full);
            }
        }
    }

    /// Changes that are ready at `now`, in the order they became ready.
    pub fn poll(&mut self, now: Instant) -> Vec<Change> {
        while let Some((_, _, at)) = self.moves.front() {
            if now.duration_since(*at) < PAIR_WINDOW {
                break;
            }
            // Moved out of the tree.
            let (_, path, at) = self.moves.pop_front().expect("front exists");
            self.drop_under(&path);
            self.ready.push(Change::Path {
                path,
                need: Need::Content,
                since: at,
            });
        }
        let timing = self.timing;
        let due: Vec<RelPath> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                now.duration_since(p.last) >= timing.settle
                    || now.duration_since(p.first) >= timing.max_delay
            })
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            let p = self.pending.remove(&path).expect("listed above");
            let need = if p.data { Need::Content } else { Need::Meta };
            self.ready.push(Change::Path {
                path,
                need,
                since: p.first,
            });
        }
        std::mem::take(&mut self.ready)
    }

    /// When [`Coalescer::poll`] next has something to return, if anything is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return Some(Instant::now());
        }
        let moves = self.moves.front().map(|(_, _, at)| *at + PAIR_WINDOW);
        let writes = self
            .pending
            .values()
            .map(|p| (p.last + self.timing.settle).min(p.first + self.timing.max_delay))
            .min();
        match (moves, writes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn write(&mut self, path: RelPath, now: Instant) {
        let p = self.pending.entry(path).or_insert(Pending {
            first: now,
            last: now,
            data: true,
        });
        p.last = now;
        p.data = true;
    }

    fn now(&mut self, path: RelPath, need: Need, now: Instant) {
        let since = match self.pending.remove(&path) {
            Some(p) => p.first,
            None => now,
        };
        if need >= Need::Content {
            self.drop_under(&path);
        }
        self.ready.push(Change::Path { path, need, since });
    }

    /// Forgets pending writes at and below `path` (it was removed or is sent whole).
    fn drop_under(&mut self, path: &RelPath) {
        for p in under(&self.pending, path) {
            self.pending.remove(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timing() -> Timing {
        Timing {
            settle: ms(100),
            max_delay: ms(1000),
            ..Timing::default()
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::from(s)
    }

    /// A compact view of a change: (kind, path(s), need).
    fn show(c: &Change) -> String {
        match c {
            Change::Path { path, need, .. } => format!("{need:?} {path}"),
            Change::Rename(Rename { from, to, dir, .. }) => {
                format!("Rename {from} -> {to}{}", if *dir { " (dir)" } else { "" })
            }
            Change::Full => "Full".into(),
        }
    }

    /// Each case: events at millisecond offsets, then polls at offsets with what each
    /// poll must return.
    #[test]
    fn rules_as_a_table() {
        use Event::*;
        type Case = (
            &'static str,
            Vec<(u64, Event)>,
            Vec<(u64, Vec<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "close-write is sent at once",
                vec![
                    (0, Created(p("f"), What::File)),
                    (1, Modified(p("f"))),
                    (2, Closed(p("f"))),
                ],
                vec![(2, vec!["Content f"]), (500, vec![])],
            ),
            (
                "an open file waits for the settle time",
                vec![(0, Modified(p("log")))],
                vec![
                    (50, vec![]),
                    (99, vec![]),
                    (100, vec!["Content log"]),
                    (300, vec![]),
                ],
            ),
            (
                "a file written every 50 ms is sent at max-delay, not never",
                (0..=60).map(|i| (i * 50, Modified(p("log")))).collect(),
                vec![
                    (999, vec![]),
                    (1000, vec!["Content log"]),
                    (1999, vec![]),
                    (2050, vec!["Content log"]),
                ],
            ),
            (
                "a burst on one path is one change",
                vec![
                    (0, Created(p("f"), What::File)),
                    (1, Modified(p("f"))),
                    (2, Modified(p("f"))),
                    (3, Attrib(p("f"))),
                    (4, Modified(p("f"))),
                ],
                vec![(50, vec![]), (104, vec!["Content f"])],
            ),
            (
                "touch is metadata only",
                vec![(0, Attrib(p("f"))), (0, Closed(p("f")))],
                vec![(0, vec!["Meta f", "Meta f"])],
            ),
            (
                "chmod is metadata only",
                vec![(0, Attrib(p("f")))],
                vec![(0, vec!["Meta f"])],
            ),
            (
                "a new directory is scanned whole",
                vec![(0, Created(p("a"), What::Dir))],
                vec![(0, vec!["Tree a"])],
            ),
            (
                "a new symlink needs no settling",
                vec![(0, Created(p("l"), What::Other))],
                vec![(0, vec!["Content l"])],
            ),
            (
                "a hard link (create, never closed) settles",
                vec![(0, Created(p("h"), What::File))],
                vec![(99, vec![]), (100, vec!["Content h"])],
            ),
            (
                "removal cancels pending writes below it",
                vec![
                    (0, Modified(p("d/f"))),
                    (1, Modified(p("d/g"))),
                    (2, Removed(p("d"))),
                ],
                vec![(2, vec!["Content d"]), (500, vec![])],
            ),
            (
                "removal of a sibling with a common prefix keeps the other",
                vec![(0, Modified(p("d2/f"))), (1, Removed(p("d")))],
                vec![(1, vec!["Content d"]), (100, vec!["Content d2/f"])],
            ),
            (
                "a matched move is a rename",
                vec![
                    (0, MovedFrom(p("a"), 7)),
                    (0, MovedTo(p("b"), 7, What::Dir)),
                ],
                vec![(0, vec!["Rename a -> b (dir)"]), (100, vec![])],
            ),
            (
                "pending writes follow a rename",
                vec![
                    (0, Modified(p("a/log"))),
                    (10, MovedFrom(p("a"), 1)),
                    (10, MovedTo(p("b"), 1, What::Dir)),
                ],
                vec![
                    (10, vec!["Rename a -> b (dir)"]),
                    (100, vec!["Content b/log"]),
                ],
            ),
            (
                "moved out of the tree is a deletion after the pairing window",
                vec![(0, MovedFrom(p("a"), 3))],
                vec![(19, vec![]), (20, vec!["Content a"])],
            ),
            (
                "moved in from outside is a creation",
                vec![
                    (0, MovedTo(p("d"), 4, What::Dir)),
                    (0, MovedTo(p("f"), 5, What::File)),
                ],
                vec![(0, vec!["Tree d", "Content f"])],
            ),
            (
                "interleaved moves pair by cookie",
                vec![
                    (0, MovedFrom(p("a"), 1)),
                    (0, MovedFrom(p("b"), 2)),
                    (1, MovedTo(p("y"), 2, What::File)),
                ],
                vec![(1, vec!["Rename b -> y"]), (20, vec!["Content a"])],
            ),
            (
                "overflow drops everything pending and asks for a full compare",
                vec![
                    (0, Modified(p("f"))),
                    (1, MovedFrom(p("a"), 1)),
                    (2, Overflow),
                ],
                vec![(2, vec!["Full"]), (500, vec![])],
            ),
        ];
        for (name, events, polls) in cases {
            let t0 = Instant::now();
            let mut c = Coalescer::new(timing());
            let mut events = events.into_iter().peekable();
            for (at, want) in polls {
                while let Some((e_at, _)) = events.peek() {
                    if *e_at > at {
                        break;
                    }
                    let (e_at, e) = events.next().expect("peeked");
                    c.event(e, t0 + ms(e_at));
                }
                let got: Vec<String> = c.poll(t0 + ms(at)).iter().map(show).collect();
                assert_eq!(got, want, "{name}: poll at {at} ms");
            }
        }
    }

    #[test]
    fn deadline_is_the_earliest_settle_or_max_delay() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(timing());
        assert_eq!(c.deadline(), None);
        c.event(Event::Modified(p("a")), t0);
        c.event(Event::Modified(p("b")), t0 + ms(50));
        assert_eq!(c.deadline(), Some(t0 + ms(100)));
        c.event(Event::MovedFrom(p("m"), 9), t0 + ms(10));
        assert_eq!(c.deadline(), Some(t0 + ms(30)));
        // A path written continuously is due at first + max_delay.
        let mut c = Coalescer::new(timing());
        c.event(Event::Modified(p("log")), t0);
        c.event(Event::Modified(p("log")), t0 + ms(950));
        assert_eq!(c.deadline(), Some(t0 + ms(1000)));
    }

    #[test]
    fn latency_is_measured_from_the_first_event() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(timing());
        c.event(Event::Created(p("f"), What::File), t0);
        c.event(Event::Closed(p("f")), t0 + ms(5));
        match &c.poll(t0 + ms(5))[..] {
            [Change::Path { since, .. }] => assert_eq!(*since, t0),
            other => panic!("{other:?}"),
        }
    }
}
