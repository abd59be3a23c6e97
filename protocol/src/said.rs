//! Log lines for something that can happen thousands of times a second (every file refused
//! by a full disk): said at most so many times a minute, the rest counted and said in one
//! line when the next minute's first is.

use std::time::{Duration, Instant};

/// How often a thing may be said per [`MINUTE`], and what was left unsaid.
#[derive(Debug)]
pub struct Said {
    limit: u64,
    since: Option<Instant>,
    said: u64,
    unsaid: u64,
}

/// The window [`Said`] counts in.
pub const MINUTE: Duration = Duration::from_secs(60);

impl Said {
    /// Says at most `limit` a minute.
    pub fn per_minute(limit: u64) -> Said {
        Said {
            limit,
            since: None,
            said: 0,
            unsaid: 0,
        }
    }

    /// It happened at `now`: whether to say it, and how many went unsaid since it was last
    /// said (to be said first, when that is not 0).
    pub fn note(&mut self, now: Instant) -> (bool, u64) {
        let mut before = 0;
        if self
            .since
            .is_none_or(|at| now.saturating_duration_since(at) >= MINUTE)
        {
            before = std::mem::take(&mut self.unsaid);
            self.since = Some(now);
            self.said = 0;
        }
        if self.said < self.limit {
            self.said += 1;
            (true, before)
        } else {
            self.unsaid += 1;
            (false, before)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_minute_are_said_and_the_rest_counted_into_the_next() {
        let mut said = Said::per_minute(10);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first: Vec<(bool, u64)> = (0..25).map(|i| said.note(at(i * 1000))).collect();
        assert!(first[..10].iter().all(|&n| n == (true, 0)), "{first:?}");
        assert!(first[10..].iter().all(|&n| n == (false, 0)), "{first:?}");
        // The next minute: its first is said, after the 15 unsaid of the last.
        assert_eq!(said.note(at(60_000)), (true, 15));
        assert_eq!(said.note(at(61_000)), (true, 0));
    }

    #[test]
    fn once_a_minute_with_the_count() {
        let mut said = Said::per_minute(1);
        let t0 = Instant::now();
        assert_eq!(said.note(t0), (true, 0), "the first is said");
        for s in 1..60 {
            assert_eq!(
                said.note(t0 + Duration::from_secs(s)),
                (false, 0),
                "{s} s after"
            );
        }
        assert_eq!(said.note(t0 + MINUTE), (true, 59));
        assert_eq!(said.note(t0 + MINUTE), (false, 0));
        assert_eq!(said.note(t0 + 2 * MINUTE), (true, 1));
    }
}
