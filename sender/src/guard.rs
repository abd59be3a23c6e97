//! The mass-delete guard: the one rule deciding when deleting on a target needs an operator's
//! confirmation, and the live tally that makes deletions arriving one event at a time count
//! against it.
//!
//! A whole-tree compare (start-up, overflow, `send --once`) knows both sides exactly and asks
//! [`DeleteGuard::objection`] directly. Live batches do not list the module, so each target
//! keeps a [`DeleteTally`]: the module's size after the last whole compare and the entries deleted
//! live since, over a sliding [`DELETE_WINDOW`]. When the deletions of a batch, added to the
//! window, would meet the same rule, or would leave the source empty, the batch is not acted on
//! piecemeal: the target runs a whole-tree compare instead, which deletes what the rule allows
//! and pauses the target otherwise.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The mass-delete guard of a group: a whole-tree compare that would delete more than
/// `percent` % of the module's entries, and at least `min` of them, or that finds the source
/// empty while the module holds [`EMPTY_SOURCE_FLOOR`] entries or more, pauses the target until an operator confirms with
/// `ferry send --once --confirm-deletes GROUP`.
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
}

impl Default for DeleteGuard {
    fn default() -> Self {
        DeleteGuard {
            percent: 50,
            min: 1000,
            confirmed: false,
            record: None,
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
                "this would delete {deleting} of the module's {total} entries ({share}%, more \
                 than {}%)",
                self.percent
            )
        })
    }
}

/// How far back live deletions count together: an `rm -rf` or a vanished disk shows within
/// it, while ordinary churn (a log rotated each day) never adds up.
pub const DELETE_WINDOW: Duration = Duration::from_secs(600);

/// One target's live deletions (see the module documentation).
#[derive(Debug, Default)]
pub struct DeleteTally {
    module_entries: Option<u64>,
    recent: VecDeque<(Instant, u64)>,
}

impl DeleteTally {
    /// A whole-tree compare left `module_entries` entries on the target: the window starts
    /// again from there.
    pub fn compared(&mut self, module_entries: u64) {
        self.module_entries = Some(module_entries);
        self.recent.clear();
    }

    /// `n` entries were deleted live at `now`.
    pub fn record(&mut self, n: u64, now: Instant) {
        if n > 0 {
            self.recent.push_back((now, n));
        }
    }

    /// Entries deleted live within [`DELETE_WINDOW`] before `now`.
    pub fn recent(&mut self, now: Instant) -> u64 {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > DELETE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.iter().map(|(_, n)| n).sum()
    }
}

impl DeleteGuard {
    /// True if a live batch deleting `deleting` entries now must go through a whole-tree
    /// compare (and so through [`DeleteGuard::objection`] with exact figures) instead of being
    /// applied: the deletions of the window would meet the rule, or the source would be empty.
    /// Before any whole compare the module's size is unknown: `min` deletions alone, or an
    /// empty source, are enough.
    pub fn live_tripwire(
        &self,
        tally: &mut DeleteTally,
        deleting: u64,
        source_empty: bool,
        now: Instant,
    ) -> bool {
        if !self.active() || deleting == 0 {
            return false;
        }
        let deleting = tally.recent(now) + deleting;
        match tally.module_entries {
            Some(total) => self.objection(deleting, total, source_empty).is_some(),
            None => source_empty || deleting >= self.min,
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

    #[test]
    fn live_deletions_add_up_within_the_window_only() {
        let g = DeleteGuard::default();
        let mut tally = DeleteTally::default();
        let t0 = Instant::now();
        assert!(
            g.live_tripwire(&mut tally, 1000, false, t0),
            "unknown size: the minimum"
        );
        assert!(
            g.live_tripwire(&mut tally, 1, true, t0),
            "unknown size: an empty source"
        );
        tally.compared(3000);
        assert!(!g.live_tripwire(&mut tally, 1000, false, t0));
        tally.record(900, t0);
        assert!(
            !g.live_tripwire(&mut tally, 500, false, t0),
            "1,400 of 3,000"
        );
        tally.record(500, t0 + Duration::from_secs(1));
        assert!(
            g.live_tripwire(&mut tally, 100, false, t0 + Duration::from_secs(2)),
            "1,500 of 3,000 within the window"
        );
        let later = t0 + DELETE_WINDOW + Duration::from_secs(1);
        assert!(
            !g.live_tripwire(&mut tally, 100, false, later),
            "the first 900 left the window"
        );
        assert!(
            g.live_tripwire(&mut tally, 1, true, later),
            "an empty source"
        );
        tally.compared(3000);
        assert_eq!(
            tally.recent(later),
            0,
            "a whole compare starts the window again"
        );
    }
}
