//! A target's pending work: a set of dirty paths plus the renames not yet applied, and the
//! paths waiting to be retried after the receiver refused them. Memory grows with the number
//! of changed paths, never with the number of events, however long the target is away.
//!
//! Retries are data, not timers: a failed path gets a due time that grows with its failures
//! ([`Timing::retry_delay`]); [`Queue::take`] hands it out once due, and the worker sleeps until the
//! earliest due time. A path that succeeds, or changes again, is forgotten by the retry set.

use crate::coalesce::{self, Change, Need, Rename};
use crate::timing::Timing;
use ferry_protocol::RelPath;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

/// Renames kept as renames while the target is away; past this many they are folded into
/// dirty paths (the new names are compared whole, the old names deleted).
pub const MAX_RENAMES: usize = 4096;

/// Work taken from a [`Queue`] in one go.
#[derive(Debug, Default)]
pub struct Batch {
    /// Compare the whole tree.
    pub full: bool,
    /// When the whole-tree compare was asked for (the oldest, if asked more than once).
    pub full_since: Option<Instant>,
    /// Renames, oldest first; applied before `paths`.
    pub renames: Vec<Rename>,
    /// Dirty paths with their need and the time of their first event.
    pub paths: BTreeMap<RelPath, (Need, Instant)>,
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

    /// When the oldest change in the batch happened.
    pub fn oldest(&self) -> Option<Instant> {
        let paths = self.paths.values().map(|(_, t)| *t);
        let renames = self.renames.iter().map(|r| r.since);
        paths.chain(renames).chain(self.full_since).min()
    }

    /// Adds a dirty path, keeping the highest need and the earliest time.
    pub fn mark(&mut self, path: RelPath, need: Need, since: Instant) {
        merge(&mut self.paths, path, need, since)
    }

    /// Adds one coalesced change.
    pub fn add(&mut self, change: Change) {
        match change {
            Change::Full => {
                self.full = true;
                self.full_since.get_or_insert_with(Instant::now);
            }
            Change::Path { path, need, since } => self.mark(path, need, since),
            Change::Rename(r) => {
                // Dirty paths under the old name are now under the new one.
                coalesce::rekey(&mut self.paths, &r.from, &r.to, |m, k, (need, at)| {
                    merge(m, k, need, at)
                });
                self.renames.push(r);
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
            for (path, need, since) in r.as_paths() {
                self.mark(path, need, since);
            }
        }
    }

    /// Puts `earlier` (work taken before and not finished) back in front of `self`.
    pub fn prepend(&mut self, earlier: Batch) {
        let later = std::mem::replace(self, earlier);
        self.full |= later.full;
        self.full_since = self.full_since.into_iter().chain(later.full_since).min();
        // Later renames happened after the earlier paths were dirtied: they move them. Later
        // paths were already recorded under their current names.
        for r in later.renames {
            self.add(Change::Rename(r));
        }
        for (path, (need, since)) in later.paths {
            self.mark(path, need, since);
        }
    }
}

fn merge(paths: &mut BTreeMap<RelPath, (Need, Instant)>, path: RelPath, need: Need, at: Instant) {
    let e = paths.entry(path).or_insert((need, at));
    e.0 = e.0.max(need);
    e.1 = e.1.min(at);
}

/// A path the receiver refused, waiting for its next try.
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// Failures in a row.
    failures: u32,
    /// When to try again; `None` once handed out (the count stays until the outcome is known).
    due: Option<Instant>,
    /// When the change that first failed happened (its lag runs from there).
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    batch: Batch,
    retries: BTreeMap<RelPath, Retry>,
    /// The batch taken and not yet settled or put back.
    in_flight: Option<Flight>,
}

/// What is known of a batch out with the worker.
#[derive(Debug, Clone, Copy, Default)]
struct Flight {
    changes: usize,
    full: bool,
    oldest: Option<Instant>,
}

/// What a target still owes: everything not yet acknowledged by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// Paths and renames waiting, in flight, or waiting for a retry.
    pub changes: usize,
    /// A whole-tree compare is waiting or in flight.
    pub full: bool,
    /// When the oldest of them happened.
    pub oldest: Option<Instant>,
}

impl State {
    fn next_due(&self) -> Option<Instant> {
        self.retries.values().filter_map(|r| r.due).min()
    }
}

/// A target's queue, shared by the watcher that fills it and the worker that drains it.
#[derive(Debug, Default, Clone)]
pub struct Queue {
    inner: Arc<(Mutex<State>, Notify)>,
    /// When failed paths are tried again ([`Timing::retry_delay`]).
    timing: Timing,
}

impl Queue {
    /// An empty queue retrying failed paths on the default [`Timing`].
    pub fn new() -> Queue {
        Queue::default()
    }

    /// An empty queue retrying failed paths as `timing` says.
    pub fn with_timing(timing: Timing) -> Queue {
        Queue {
            timing,
            ..Queue::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.0.lock().expect("queue lock")
    }

    /// Adds changes and wakes the worker.
    pub fn push(&self, changes: impl IntoIterator<Item = Change>) {
        let mut st = self.state();
        for c in changes {
            st.batch.add(c);
        }
        drop(st);
        self.inner.1.notify_one();
    }

    /// Takes everything pending, with the retries due at `now`.
    pub fn take(&self, now: Instant) -> Batch {
        let mut st = self.state();
        let st = &mut *st;
        for (path, r) in st.retries.iter_mut() {
            if r.due.is_some_and(|d| d <= now) {
                r.due = None;
                st.batch.mark(path.clone(), Need::Tree, r.since);
            }
        }
        let batch = std::mem::take(&mut st.batch);
        if !batch.is_empty() {
            st.in_flight = Some(Flight {
                changes: batch.len() + usize::from(batch.full),
                full: batch.full,
                oldest: batch.oldest(),
            });
        }
        batch
    }

    /// Records the outcome of a batch taken earlier: the paths in `failed` are tried again
    /// after a delay that grows with their failures in a row; every other path of `batch`
    /// succeeded and is forgotten by the retry set.
    pub fn settle(&self, batch: &Batch, failed: &[RelPath], now: Instant) {
        let mut st = self.state();
        st.in_flight = None;
        let failed_set: HashSet<&RelPath> = failed.iter().collect();
        for path in batch.paths.keys() {
            if !failed_set.contains(path) {
                st.retries.remove(path);
            }
        }
        for path in failed {
            let since = batch.paths.get(path).map_or(now, |(_, t)| *t);
            let r = st.retries.entry(path.clone()).or_insert(Retry {
                failures: 0,
                due: None,
                since,
            });
            r.since = r.since.min(since);
            r.failures += 1;
            r.due = Some(now + self.timing.retry_delay(r.failures));
        }
        drop(st);
        self.inner.1.notify_one();
    }

    /// Makes every waiting retry due at once (after a reconnect: the receiver or its disk may
    /// be back, so there is no reason to wait).
    pub fn retry_now(&self, now: Instant) {
        let mut st = self.state();
        for r in st.retries.values_mut() {
            if r.due.is_some() {
                r.due = Some(now);
            }
        }
    }

    /// Puts unfinished work back in front of whatever arrived since.
    pub fn put_back(&self, unfinished: Batch) {
        let mut st = self.state();
        st.in_flight = None;
        st.batch.prepend(unfinished);
        drop(st);
        self.inner.1.notify_one();
    }

    /// Number of dirty paths and renames waiting (retries not yet due excluded).
    pub fn len(&self) -> usize {
        self.state().batch.len()
    }

    /// Everything not yet acknowledged: waiting, in flight, or failed and waiting for a retry.
    pub fn pending(&self) -> Pending {
        let st = self.state();
        let flight = st.in_flight.unwrap_or_default();
        let retrying = st.retries.values().filter(|r| r.due.is_some());
        let oldest = [st.batch.oldest(), flight.oldest]
            .into_iter()
            .flatten()
            .chain(retrying.clone().map(|r| r.since))
            .min();
        Pending {
            changes: st.batch.len()
                + usize::from(st.batch.full)
                + flight.changes
                + retrying.count(),
            full: st.batch.full || flight.full,
            oldest,
        }
    }

    /// True if nothing is ready to be taken at `now`.
    pub fn is_idle(&self, now: Instant) -> bool {
        let st = self.state();
        st.batch.is_empty() && st.next_due().is_none_or(|d| d > now)
    }

    /// True if nothing is waiting (retries not yet due excluded).
    pub fn is_empty(&self) -> bool {
        self.state().batch.is_empty()
    }

    /// Waits until something was pushed, or the earliest retry falls due.
    pub async fn wait(&self) {
        let due = self.state().next_due();
        match due {
            Some(d) => {
                tokio::select! {
                    _ = self.inner.1.notified() => {}
                    _ = tokio::time::sleep_until(d.into()) => {}
                }
            }
            None => self.inner.1.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        Change::Rename(Rename {
            from: p(from),
            to: p(to),
            dir: true,
            since: Instant::now(),
        })
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
        let taken = q.take(Instant::now());
        assert!(q.is_empty());
        // While the batch was out, `b` was renamed again, `f` rewritten and a new `b`
        // created.
        q.push([
            rename("b", "c"),
            path("f", Need::Content),
            path("b", Need::Tree),
        ]);
        q.put_back(taken);
        let b = q.take(Instant::now());
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

    fn paths(b: &Batch) -> Vec<String> {
        b.paths.keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn a_failed_path_comes_back_when_due_and_not_before() {
        let q = Queue::new();
        let t0 = Instant::now();
        q.push([path("f", Need::Content)]);
        let b = q.take(t0);
        q.settle(&b, &[p("f")], t0);
        assert!(q.is_idle(t0 + Timing::default().retry_after / 2));
        assert!(q.take(t0 + Timing::default().retry_after / 2).is_empty());
        let again = q.take(t0 + Timing::default().retry_after);
        assert_eq!(needs(&again), vec![("f".into(), Need::Tree)]);
    }

    #[test]
    fn retry_delays_grow_while_a_path_keeps_failing_and_reset_once_it_succeeds() {
        let q = Queue::new();
        let mut now = Instant::now();
        q.push([path("bad", Need::Content)]);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let b = q.take(now);
            assert_eq!(paths(&b), vec!["bad"]);
            q.settle(&b, &[p("bad")], now);
            let due = q.state().next_due().unwrap();
            waits.push((due - now).as_secs());
            now = due;
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10, 10]);
        // It succeeds: the next failure starts again at the first delay.
        let b = q.take(now);
        q.settle(&b, &[], now);
        assert!(q.state().retries.is_empty());
        q.push([path("bad", Need::Content)]);
        let b = q.take(now);
        q.settle(&b, &[p("bad")], now);
        assert_eq!((q.state().next_due().unwrap() - now).as_secs(), 1);
    }

    #[test]
    fn a_change_to_a_failing_path_is_sent_at_once() {
        let q = Queue::new();
        let now = Instant::now();
        q.push([path("f", Need::Content)]);
        let b = q.take(now);
        q.settle(&b, &[p("f")], now);
        q.push([path("f", Need::Content)]);
        assert!(!q.is_idle(now));
        assert_eq!(paths(&q.take(now)), vec!["f"]);
    }

    #[test]
    fn retry_now_makes_every_waiting_retry_due() {
        let q = Queue::new();
        let now = Instant::now();
        q.push([path("a", Need::Content), path("b", Need::Content)]);
        let b = q.take(now);
        q.settle(&b, &[p("a"), p("b")], now);
        assert!(q.take(now).is_empty());
        q.retry_now(now);
        assert_eq!(paths(&q.take(now)), vec!["a", "b"]);
    }

    #[test]
    fn pending_counts_work_in_flight_and_failed_paths_from_their_first_event() {
        let q = Queue::new();
        let first = Instant::now();
        q.push([Change::Path {
            path: p("a"),
            need: Need::Content,
            since: first,
        }]);
        q.push([path("b", Need::Content)]);
        assert_eq!(q.pending().changes, 2);
        assert_eq!(q.pending().oldest, Some(first));
        // Taken by the worker, not yet acknowledged: still owed.
        let later = first + Duration::from_secs(3);
        let b = q.take(later);
        assert_eq!(q.pending().changes, 2);
        assert_eq!(q.pending().oldest, Some(first));
        // "a" failed: owed until it succeeds, its lag still running from its first event,
        // also after its retry is handed out again.
        q.settle(&b, &[p("a")], later);
        assert_eq!(q.pending().changes, 1);
        assert_eq!(q.pending().oldest, Some(first));
        let retried = q.take(later + Timing::default().max_retry);
        assert_eq!(retried.paths[&p("a")].1, first);
        assert_eq!(q.pending().oldest, Some(first));
        q.settle(&retried, &[], later + Timing::default().max_retry);
        assert_eq!(q.pending(), Pending::default());
        // A whole compare counts as one change, also while it is out.
        q.push([Change::Full]);
        let full = q.take(Instant::now());
        assert!(q.pending().full && q.pending().changes == 1);
        q.put_back(full);
        assert!(q.pending().full && q.pending().changes == 1);
    }
}
