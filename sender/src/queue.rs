//! A target's pending work: a set of dirty paths plus the renames not yet applied. Memory grows
//! with the number of changed paths, never with the number of events, however long the target
//! is away.

use crate::coalesce::{Change, Need};
use ferry_protocol::RelPath;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

/// Renames kept as renames while the target is away; past this many they are folded into
/// dirty paths (the new names are compared whole, the old names deleted).
pub const MAX_RENAMES: usize = 4096;

/// A rename waiting to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// Old name.
    pub from: RelPath,
    /// New name.
    pub to: RelPath,
    /// It is a directory.
    pub dir: bool,
    /// When it happened.
    pub since: Instant,
}

/// Work taken from a [`Queue`] in one go.
#[derive(Debug, Default)]
pub struct Batch {
    /// Compare the whole tree.
    pub full: bool,
    /// Renames, oldest first; applied before `paths`.
    pub renames: Vec<Rename>,
    /// Dirty paths with their need and the time of their first event.
    pub paths: HashMap<RelPath, (Need, Instant)>,
}

impl Batch {
    /// True if there is nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.full && self.renames.is_empty() && self.paths.is_empty()
    }

    /// Number of paths and renames.
    pub fn len(&self) -> usize {
        self.renames.len() + self.paths.len()
    }

    /// Adds a dirty path, keeping the highest need and the earliest time.
    pub fn mark(&mut self, path: RelPath, need: Need, since: Instant) {
        let e = self.paths.entry(path).or_insert((need, since));
        e.0 = e.0.max(need);
        e.1 = e.1.min(since);
    }

    /// Adds one coalesced change.
    pub fn add(&mut self, change: Change) {
        match change {
            Change::Full => self.full = true,
            Change::Path { path, need, since } => self.mark(path, need, since),
            Change::Rename {
                from,
                to,
                dir,
                since,
            } => {
                // Dirty paths under the old name are now under the new one.
                let moved: Vec<RelPath> = self
                    .paths
                    .keys()
                    .filter(|p| p.starts_with(&from))
                    .cloned()
                    .collect();
                for old in moved {
                    let (need, at) = self.paths.remove(&old).expect("listed above");
                    self.mark(old.rebase(&from, &to), need, at);
                }
                self.renames.push(Rename {
                    from,
                    to,
                    dir,
                    since,
                });
                if self.renames.len() > MAX_RENAMES {
                    self.fold_renames();
                }
            }
        }
    }

    /// Turns every rename into dirty paths: the old name (deleted unless it exists again)
    /// and the new name, compared whole.
    pub fn fold_renames(&mut self) {
        for r in std::mem::take(&mut self.renames) {
            self.mark(r.from, Need::Content, r.since);
            self.mark(r.to, Need::Tree, r.since);
        }
    }

    /// Puts `earlier` (work taken before and not finished) back in front of `self`.
    pub fn prepend(&mut self, earlier: Batch) {
        let later = std::mem::replace(self, earlier);
        self.full |= later.full;
        // Later renames happened after the earlier paths were dirtied: they move them. Later
        // paths were already recorded under their current names.
        for r in later.renames {
            self.add(Change::Rename {
                from: r.from,
                to: r.to,
                dir: r.dir,
                since: r.since,
            });
        }
        for (path, (need, since)) in later.paths {
            self.mark(path, need, since);
        }
    }
}

/// A target's queue, shared by the watcher that fills it and the worker that drains it.
#[derive(Debug, Default, Clone)]
pub struct Queue {
    inner: Arc<(Mutex<Batch>, Notify)>,
}

impl Queue {
    /// An empty queue.
    pub fn new() -> Queue {
        Queue::default()
    }

    /// Adds changes and wakes the worker.
    pub fn push(&self, changes: impl IntoIterator<Item = Change>) {
        let mut b = self.inner.0.lock().expect("queue lock");
        for c in changes {
            b.add(c);
        }
        drop(b);
        self.inner.1.notify_one();
    }

    /// Takes everything pending.
    pub fn take(&self) -> Batch {
        std::mem::take(&mut *self.inner.0.lock().expect("queue lock"))
    }

    /// Puts unfinished work back in front of whatever arrived since.
    pub fn put_back(&self, unfinished: Batch) {
        self.inner.0.lock().expect("queue lock").prepend(unfinished);
        self.inner.1.notify_one();
    }

    /// Number of dirty paths and renames waiting.
    pub fn len(&self) -> usize {
        self.inner.0.lock().expect("queue lock").len()
    }

    /// True if nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.inner.0.lock().expect("queue lock").is_empty()
    }

    /// Waits until something was pushed since the last wait.
    pub async fn wait(&self) {
        self.inner.1.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from(s)
    }

    fn path(s: &str, need: Need) -> Change {
        Change::Path {
            path: p(s),
            need,
            since: Instant::now(),
        }
    }

    fn rename(from: &str, to: &str) -> Change {
        Change::Rename {
            from: p(from),
            to: p(to),
            dir: true,
            since: Instant::now(),
        }
    }

    fn needs(b: &Batch) -> Vec<(String, Need)> {
        let mut v: Vec<_> = b.paths.iter().map(|(k, v)| (k.to_string(), v.0)).collect();
        v.sort();
        v
    }

    #[test]
    fn a_path_changed_many_times_is_one_entry_at_the_highest_need() {
        let mut b = Batch::default();
        for _ in 0..10_000 {
            b.add(path("log", Need::Meta));
            b.add(path("log", Need::Content));
        }
        assert_eq!(needs(&b), vec![("log".into(), Need::Content)]);
    }

    #[test]
    fn dirty_paths_follow_a_rename() {
        let mut b = Batch::default();
        b.add(path("a/x", Need::Content));
        b.add(path("ab", Need::Content));
        b.add(rename("a", "b"));
        assert_eq!(
            needs(&b),
            vec![("ab".into(), Need::Content), ("b/x".into(), Need::Content)]
        );
        assert_eq!(b.renames.len(), 1);
    }

    #[test]
    fn too_many_renames_fold_into_paths() {
        let mut b = Batch::default();
        for i in 0..=MAX_RENAMES {
            b.add(rename(&format!("d{i}"), &format!("e{i}")));
        }
        assert!(b.renames.is_empty());
        assert_eq!(b.paths.len(), 2 * (MAX_RENAMES + 1));
        assert_eq!(b.paths[&p("e0")].0, Need::Tree);
        assert_eq!(b.paths[&p("d0")].0, Need::Content);
    }

    #[test]
    fn put_back_keeps_order_of_renames_and_merges_paths() {
        let q = Queue::new();
        q.push([rename("a", "b"), path("f", Need::Meta)]);
        let taken = q.take();
        assert!(q.is_empty());
        // While the batch was out, `b` was renamed again, `f` rewritten and a new `b`
        // created.
        q.push([
            rename("b", "c"),
            path("f", Need::Content),
            path("b", Need::Tree),
        ]);
        q.put_back(taken);
        let b = q.take();
        let order: Vec<(String, String)> = b
            .renames
            .iter()
            .map(|r| (r.from.to_string(), r.to.to_string()))
            .collect();
        assert_eq!(
            order,
            vec![("a".into(), "b".into()), ("b".into(), "c".into())]
        );
        assert_eq!(
            needs(&b),
            vec![("b".into(), Need::Tree), ("f".into(), Need::Content)]
        );
    }
}
