//! The mass-delete guard: the one rule deciding when deleting on a target needs an operator's
//! confirmation, and the live tally that makes deletions arriving one event at a time count
//! against it.
//!
//! A whole-tree compare (start-up, overflow, `send --once`) knows both sides exactly and asks
//! [`DeleteGuard::objection`] directly. Live batches do not list the module, so each target
//! keeps a [`DeleteTally`]: the module's size (after the last whole compare, grown by live
//! batches while no deletion is in the window, so it is the size the window's deletions began
//! from) and the entries deleted live, over a sliding [`DELETE_WINDOW`]. From it,
//! [`DeleteTally::allowance`] says how many more entries may go now; the transport deletes at
//! most that many and holds the rest: a ferry receiver counts what each `Delete` would remove
//! and refuses the one that does not fit (`Message::Allowance`), rsync stops at
//! `--max-delete`. Both answer what they deleted, and the tally records it by name. A module
//! with history takes every deletion (nothing is lost) and the rule only decides when to say
//! so; one without holds them — and only them — until an operator confirms (`ferry
//! confirm-deletes`). A live batch that finds the source empty is compared whole instead.

use ferry_protocol::RelPath;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The mass-delete guard of a group: a whole-tree compare that would delete at least
/// `percent` % of the module's entries, and at least `min` of them, or that finds the source
/// empty while the module holds [`EMPTY_SOURCE_FLOOR`] entries or more, holds its deletions
/// (on a module without history) until an operator confirms with `ferry confirm-deletes
/// GROUP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteGuard {
    /// Share of the module's entries (0 switches the guard off).
    pub percent: u8,
    /// Fewest deletions that can trip it.
    pub min: u64,
    /// The operator confirmed: delete anyway (this run only).
    pub confirmed: bool,
    /// Where the source's filesystem (device number) is recorded between runs (in
    /// `state_dir`), so a different disk mounted at the source is noticed.
    pub record: Option<PathBuf>,
    /// How an operator lets held deletions go, when not the daemon's way (`ferry
    /// confirm-deletes GROUP`, or `send --once --confirm-deletes GROUP`): `mirror` says its
    /// own command.
    pub release: Option<String>,
}

impl Default for DeleteGuard {
    fn default() -> Self {
        DeleteGuard {
            percent: 50,
            min: 1000,
            confirmed: false,
            record: None,
            release: None,
        }
    }
}

/// An empty source may empty a module of fewer entries than this without confirmation (the
/// last files of a small tree removed by hand); from this many on, it looks like a disk that
/// did not mount.
pub const EMPTY_SOURCE_FLOOR: u64 = 10;

impl DeleteGuard {
    /// True unless the guard is off (`percent = 0`) or the operator confirmed this run.
    pub fn active(&self) -> bool {
        self.percent > 0 && !self.confirmed
    }

    /// Why deleting needs confirming because the source is on another filesystem than the
    /// last time (`device` now): a different disk mounted there. Records `device` otherwise.
    pub fn device_objection(&self, device: u64, deleting: u64) -> Option<String> {
        let record = self.record.as_ref()?;
        let before = std::fs::read_to_string(record)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        if let Some(before) = before {
            if before != device && deleting > 0 && self.active() {
                return Some(format!(
                    "the source is on another filesystem than last time (device {device:#x}, \
                     was {before:#x}): a different disk mounted there?"
                ));
            }
        }
        if before != Some(device) {
            if let Err(e) = std::fs::write(record, format!("{device}\n")) {
                tracing::warn!(path = %record.display(), "cannot record the source's filesystem: {e}");
            }
        }
        None
    }

    /// Why deleting `deleting` of the module's `total` entries needs confirming, if it does;
    /// `source_empty` is the source root having no entries at all.
    pub fn objection(&self, deleting: u64, total: u64, source_empty: bool) -> Option<String> {
        if !self.active() || deleting == 0 {
            return None;
        }
        if source_empty && total >= EMPTY_SOURCE_FLOOR {
            return Some(format!(
                "the source is empty but the module holds {total} entries (a missing disk?)"
            ));
        }
        let share = deleting.saturating_mul(100) / total.max(1);
        (deleting >= self.min && share >= self.percent as u64).then(|| {
            format!(
                "this would delete {deleting} of the module's {total} entries ({share}%; the \
                 guard holds at {}%)",
                self.percent
            )
        })
    }
}

/// The live deletions a whole compare counts with its own: the entries deleted within
/// [`DELETE_WINDOW`], and the module's size when they began (if known).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Entries deleted live within the window.
    pub recent: u64,
    /// The module's entries when the window's first deletion came.
    pub total: Option<u64>,
}

/// What the guard step makes of a live batch's deletions ([`DeleteTally::step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// None planned, or the guard is off: they go as planned, uncounted.
    Go,
    /// Deletions are held until an operator confirms (why): these wait with them, and
    /// everything else in the batch still goes.
    Hold(String),
    /// They go, at most this many entries, and what the transport answers it deleted is
    /// recorded (a module with history takes all of them). A source found empty is weighed
    /// by a whole compare instead, which knows the module's size exactly.
    Weigh(u64),
}

/// How far back live deletions count together: an `rm -rf` or a vanished disk shows within
/// it, while ordinary churn (a log rotated each day) never adds up.
pub const DELETE_WINDOW: Duration = Duration::from_secs(600);

/// How many deleted names a tally tells apart; past it the oldest half are kept as bare
/// counts (which can only count more, never less).
const NAMED: usize = 65_536;

/// One target's live deletions (see the module documentation). Deletions are counted by
/// name: a name deleted again within the window counts once, at the most entries it took; a
/// name below one already counted adds nothing; a name above counted ones takes them in
/// (`rm -rf` deletes the files of a directory, then the directory with what is left). So a directory that a local user flips
/// between a directory and a symlink a thousand times counts as its entries once, not a
/// thousand times over.
#[derive(Debug, Default, Clone)]
pub struct DeleteTally {
    module_entries: Option<u64>,
    /// Topmost names deleted within the window: when last, and the most entries taken.
    named: BTreeMap<RelPath, (Instant, u64)>,
    /// Deletions whose names were let go to bound memory.
    bare: VecDeque<(Instant, u64)>,
}

impl DeleteTally {
    /// A whole-tree compare left `module_entries` entries on the target: the window starts
    /// again from there.
    pub fn compared(&mut self, module_entries: u64) {
        self.module_entries = Some(module_entries);
        self.named.clear();
        self.bare.clear();
    }

    /// Each `(name, entries)` of `deleted` was deleted live at `now`, taking `entries`
    /// entries with it.
    pub fn record(&mut self, deleted: &[(RelPath, u64)], now: Instant) {
        for (path, n) in deleted {
            if let Some(slot) = self.named.get_mut(path) {
                *slot = (now, slot.1.max(*n));
                continue;
            }
            if let Some(above) = path.ancestors().find(|a| self.named.contains_key(a)) {
                if let Some(slot) = self.named.get_mut(&above) {
                    slot.0 = now;
                }
                continue;
            }
            // Names below this one are counted by it now.
            // Byte order keeps every name below `path/` together, right after it.
            let mut inside = path.as_bytes().to_vec();
            inside.push(b'/');
            let below: Vec<RelPath> = self
                .named
                .range(RelPath::from_bytes(inside.clone())..)
                .map(|(p, _)| p)
                .take_while(|p| p.as_bytes().starts_with(&inside))
                .cloned()
                .collect();
            // They went before this name did, so its count (read from the receiver as it
            // was then) lacks them: they add up. (Had some come back in between, they count
            // twice: once more at most, never a thousand times.)
            let mut entries = *n;
            for p in below {
                if let Some((_, m)) = self.named.remove(&p) {
                    entries += m;
                }
            }
            self.named.insert(path.clone(), (now, entries));
        }
        if self.named.len() > NAMED {
            let mut by_age: Vec<(Instant, RelPath)> = self
                .named
                .iter()
                .map(|(p, (t, _))| (*t, p.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, p) in by_age.into_iter().take(NAMED / 2) {
                if let Some(slot) = self.named.remove(&p) {
                    self.bare.push_back(slot);
                }
            }
        }
    }

    /// Entries deleted live within [`DELETE_WINDOW`] before `now`. Deletions that leave the
    /// window leave the module's size too.
    pub fn recent(&mut self, now: Instant) -> u64 {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) <= DELETE_WINDOW;
        let expired: u64 = self
            .named
            .values()
            .chain(self.bare.iter())
            .filter(|(t, _)| !fresh(t))
            .map(|(_, n)| n)
            .sum();
        if let Some(m) = &mut self.module_entries {
            *m = m.saturating_sub(expired);
        }
        self.named.retain(|_, (t, _)| fresh(t));
        self.bare.retain(|(t, _)| fresh(t));
        self.named
            .values()
            .chain(self.bare.iter())
            .map(|(_, n)| n)
            .sum()
    }

    /// A live batch added up to `entries` entries to the module. Counted only while no
    /// deletion is within the window: the size a window's deletions are weighed against is
    /// the module's when they began, so files created meanwhile (a `NAME.locked` written for
    /// each `NAME` deleted) cannot dilute them.
    pub fn grew(&mut self, entries: u64, now: Instant) {
        if self.recent(now) == 0 {
            if let Some(m) = &mut self.module_entries {
                *m += entries;
            }
        }
    }

    /// The window a whole compare counts with its own deletions.
    pub fn window(&mut self, now: Instant) -> Window {
        Window {
            recent: self.recent(now),
            total: self.module_entries,
        }
    }

    /// How many more entries the guard lets through now ([`DeleteGuard::allowance`] for the
    /// module's size after the last whole compare and the window's deletions).
    pub fn allowance(&mut self, guard: &DeleteGuard, now: Instant) -> Option<u64> {
        let recent = self.recent(now);
        guard.allowance(self.module_entries, recent)
    }

    /// The guard step of a live batch that plans `deletes` deletions, for either transport:
    /// `holding` is why earlier deletions are held, if they are; `history`, that the module
    /// keeps what is deleted. See [`Step`].
    pub fn step(
        &mut self,
        guard: &DeleteGuard,
        holding: Option<&str>,
        deletes: usize,
        history: bool,
        now: Instant,
    ) -> Step {
        match (deletes, holding) {
            (0, _) => Step::Go,
            (_, Some(why)) => Step::Hold(why.to_string()),
            _ if !guard.active() => Step::Go,
            _ if history => Step::Weigh(u64::MAX),
            _ => Step::Weigh(self.allowance(guard, now).unwrap_or(u64::MAX)),
        }
    }

    /// True if the deletions within the window meet the rule (against the module's size when
    /// they began; before any whole compare, `min` deletions alone): what a module with history
    /// says once, having applied them.
    pub fn meets(&mut self, guard: &DeleteGuard, now: Instant) -> bool {
        let recent = self.recent(now);
        match self.module_entries {
            Some(total) => guard.objection(recent, total, false).is_some(),
            None => guard.active() && recent >= guard.min,
        }
    }
}

impl DeleteGuard {
    /// How many more entries may be deleted now without meeting the rule, in a module of
    /// `total` entries (`None`: not known yet, then `min` deletions alone meet it) from which
    /// `recent` were deleted within the window; `None` when the guard is off. The transport
    /// deletes at most this many and holds the rest (a ferry receiver through
    /// `Message::Allowance`, rsync through `--max-delete`).
    pub fn allowance(&self, total: Option<u64>, recent: u64) -> Option<u64> {
        if !self.active() {
            return None;
        }
        // The rule meets `deleting * 100 / total >= percent`, i.e. deleting ≥ ⌈percent·total/100⌉.
        let share = total.map_or(0, |t| (t.max(1) * self.percent as u64).div_ceil(100));
        let limit = self.min.max(share);
        Some(limit.saturating_sub(1).saturating_sub(recent))
    }

    /// What to say when a transport held deletions of group `group` back at the allowance:
    /// how many went in this run, that the rest did not (`detail`: who held them, how).
    pub fn held_message(&self, group: &str, deleted: u64, detail: &str) -> String {
        format!(
            "sync {group}: this would delete more than the delete guard allows ({}% of the \
             module, at least {}): {deleted} entries were deleted in this run and the rest held \
             ({detail}); everything else is still sent. {}",
            self.percent,
            self.min,
            self.confirm_hint(group)
        )
    }

    /// The operator's way out of held deletions of group `group`.
    pub fn confirm_hint(&self, group: &str) -> String {
        match &self.release {
            Some(command) => format!("If they are meant, run `{command}`"),
            None => format!(
                "If they are meant, run `ferry confirm-deletes {group}` (or, without the \
                 daemon, `ferry send --once --confirm-deletes {group} --config …`)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objection_needs_both_the_share_and_the_minimum_or_an_empty_source() {
        let g = DeleteGuard::default();
        assert!(g.objection(999, 1000, false).is_none(), "under the minimum");
        assert!(g.objection(1000, 3000, false).is_none(), "under the share");
        assert!(g.objection(1500, 3000, false).is_some());
        assert!(
            g.objection(9, 9, true).is_none(),
            "a small module may be emptied"
        );
        assert!(g.objection(10, 10, true).is_some());
        let off = DeleteGuard {
            percent: 0,
            ..DeleteGuard::default()
        };
        assert!(off.objection(5000, 5000, true).is_none());
        let confirmed = DeleteGuard {
            confirmed: true,
            ..DeleteGuard::default()
        };
        assert!(confirmed.objection(5000, 5000, true).is_none());
    }

    /// `n` deletions of one entry each, named `prefix0…`.
    fn singles(prefix: &str, n: usize) -> Vec<(RelPath, u64)> {
        (0..n)
            .map(|i| (RelPath::from(format!("{prefix}{i}").as_str()), 1))
            .collect()
    }

    #[test]
    fn live_deletions_add_up_within_the_window_only() {
        let g = DeleteGuard::default();
        let mut tally = DeleteTally::default();
        let t0 = Instant::now();
        assert_eq!(
            tally.allowance(&g, t0),
            Some(999),
            "unknown size: the minimum"
        );
        tally.record(&singles("z", 999), t0);
        assert!(!tally.meets(&g, t0));
        tally.record(&singles("y", 1), t0);
        assert!(tally.meets(&g, t0), "unknown size: the minimum alone");
        tally.compared(3000);
        assert_eq!(tally.allowance(&g, t0), Some(1499));
        tally.record(&singles("a", 900), t0);
        assert_eq!(tally.allowance(&g, t0), Some(599));
        tally.record(&singles("b", 500), t0 + Duration::from_secs(1));
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(tally.allowance(&g, t2), Some(99), "1,400 of 3,000");
        assert!(!tally.meets(&g, t2));
        tally.record(&singles("c", 100), t2);
        assert!(tally.meets(&g, t2), "1,500 of 3,000 within the window");
        let later = t0 + DELETE_WINDOW + Duration::from_secs(1);
        // The first 900 left the window and the module (now 2,100: the rule holds at 1,050),
        // the 600 after them are still in it.
        assert_eq!(tally.allowance(&g, later), Some(1049 - 600));
        assert!(!tally.meets(&g, later));
        tally.compared(3000);
        assert_eq!(
            tally.recent(later),
            0,
            "a whole compare starts the window again"
        );
        let off = DeleteGuard {
            percent: 0,
            ..DeleteGuard::default()
        };
        assert_eq!(tally.allowance(&off, later), None);
    }

    #[test]
    fn the_live_step_is_one_rule_for_both_transports() {
        let now = Instant::now();
        let on = DeleteGuard::default();
        let off = DeleteGuard {
            percent: 0,
            ..DeleteGuard::default()
        };
        let held = Some("held since 10:00");
        let hold = || Step::Hold("held since 10:00".into());
        // (guard, holding, deletes, history, module size, deleted in the window, step)
        let table = [
            (&on, None, 0, false, Some(3000), 0, Step::Go),
            (&on, held, 0, false, Some(3000), 0, Step::Go),
            (&on, held, 5, false, Some(3000), 0, hold()),
            (&on, held, 5, true, Some(3000), 0, hold()),
            (&off, None, 5, false, Some(3000), 0, Step::Go),
            (&on, None, 5, true, Some(3000), 1400, Step::Weigh(u64::MAX)),
            (&on, None, 5, false, Some(3000), 0, Step::Weigh(1499)),
            (&on, None, 5, false, Some(3000), 1400, Step::Weigh(99)),
            (&on, None, 5, false, Some(3000), 1600, Step::Weigh(0)),
            (&on, None, 5, false, None, 0, Step::Weigh(999)),
        ];
        for (i, (guard, holding, deletes, history, size, recent, want)) in
            table.into_iter().enumerate()
        {
            let mut tally = DeleteTally::default();
            if let Some(size) = size {
                tally.compared(size);
            }
            tally.record(&[(RelPath::from("gone"), recent)], now);
            let got = tally.step(guard, holding, deletes, history, now);
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn the_allowance_is_the_most_the_rule_lets_through() {
        let g = DeleteGuard::default();
        for total in [1u64, 9, 10, 999, 1000, 1999, 2000, 2001, 3000, 123_457] {
            for recent in [0u64, 1, 400, 999, 1500] {
                let Some(a) = g.allowance(Some(total), recent) else {
                    panic!("the guard is on")
                };
                if a > 0 {
                    assert!(
                        g.objection(recent + a, total, false).is_none(),
                        "{total} {recent}: {a} more pass"
                    );
                }
                assert!(
                    g.objection(recent.max(recent + a + 1), total, false)
                        .is_some(),
                    "{total} {recent}: one more than {a} is held"
                );
            }
        }
        assert_eq!(
            g.allowance(None, 0),
            Some(999),
            "unknown size: under the minimum"
        );
        assert_eq!(g.allowance(None, 2000), Some(0));
        let off = DeleteGuard {
            percent: 0,
            ..DeleteGuard::default()
        };
        assert_eq!(off.allowance(Some(10), 0), None);
    }

    #[test]
    fn a_name_that_comes_and_goes_counts_once() {
        let mut tally = DeleteTally::default();
        let t0 = Instant::now();
        let pub_dir = RelPath::from("pub");
        for i in 0..1000u64 {
            tally.record(
                &[(pub_dir.clone(), 50 + i % 2)],
                t0 + Duration::from_millis(i),
            );
        }
        assert_eq!(
            tally.recent(t0 + Duration::from_secs(1)),
            51,
            "the most it took, once"
        );
        // Inside a counted name: nothing more.
        tally.record(&[(RelPath::from("pub/f3"), 1)], t0 + Duration::from_secs(2));
        assert_eq!(tally.recent(t0 + Duration::from_secs(2)), 51);
        // A sibling whose name sorts between `pub` and `pub/…` is a name of its own.
        tally.record(
            &[(RelPath::from("pub.real"), 50)],
            t0 + Duration::from_secs(2),
        );
        assert_eq!(tally.recent(t0 + Duration::from_secs(2)), 101);
        // A name above counted ones takes them in: `rm -rf x` deletes x/a and x/b first, then
        // x with what is left.
        tally.record(
            &[(RelPath::from("x/a"), 3), (RelPath::from("x/b"), 4)],
            t0 + Duration::from_secs(3),
        );
        assert_eq!(tally.recent(t0 + Duration::from_secs(3)), 108);
        tally.record(&[(RelPath::from("x"), 2)], t0 + Duration::from_secs(3));
        assert_eq!(tally.recent(t0 + Duration::from_secs(3)), 110);
        // Counting again refreshes the name's time: a flip that keeps going stays counted once.
        tally.record(&[(pub_dir, 50)], t0 + DELETE_WINDOW);
        assert_eq!(
            tally.recent(t0 + DELETE_WINDOW + Duration::from_secs(4)),
            51
        );
        let g = DeleteGuard::default();
        tally.compared(52);
        for i in 0..5000u64 {
            let now = t0 + Duration::from_millis(i);
            let allowed = tally.allowance(&g, now).expect("the guard is on");
            assert!(allowed >= 50, "flip {i}: {allowed} allowed");
            tally.record(&[(RelPath::from("pub"), 50)], now);
            assert!(!tally.meets(&g, now), "flip {i}");
        }
    }

    #[test]
    fn names_past_the_bound_still_count() {
        let mut tally = DeleteTally::default();
        let t0 = Instant::now();
        for chunk in 0..3 {
            let names: Vec<(RelPath, u64)> = (0..NAMED / 2 + 1)
                .map(|i| (RelPath::from(format!("d{chunk}/f{i}").as_str()), 1))
                .collect();
            tally.record(&names, t0 + Duration::from_secs(chunk as u64));
        }
        assert!(tally.named.len() <= NAMED);
        assert_eq!(
            tally.recent(t0 + Duration::from_secs(3)),
            3 * (NAMED as u64 / 2 + 1)
        );
    }
}
