//! Every delay of the live sender in one value, and the one clock its loop reads.
//!
//! The daemon runs on [`Timing::default`] (with `settle_ms` and `max_delay_ms` from each
//! group's configuration). Everything in the worker's loop — backoff, retries falling due,
//! the source re-check, summaries, the delete guard's window — reads time through [`now`],
//! which is tokio's clock: under `tokio::time::pause` (tests) the whole loop runs on virtual
//! time, so recovery, retry and guard behaviour are millisecond tests.

use std::time::{Duration, Instant};

/// The delays of the live loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Quiet time after which a written, still-open file is sent (`settle_ms`).
    pub settle: Duration,
    /// Longest a continuously written file waits (`max_delay_ms`).
    pub max_delay: Duration,
    /// Delay before a path the receiver refused is tried again; doubles per failure in a row.
    pub retry_after: Duration,
    /// Longest delay between two tries of a failing path (a full disk freed, a permission
    /// fixed: the path goes again within this, or at once if it changes).
    pub max_retry: Duration,
    /// First delay after a failed connection or run; doubles per failure.
    pub min_backoff: Duration,
    /// Longest delay between two attempts. Short, because a target that comes back should be
    /// used within seconds, and an attempt against one that is down costs a refused connection.
    pub max_backoff: Duration,
    /// How often a group whose source directory is missing looks for it again.
    pub source_recheck: Duration,
    /// How long a batch in flight may take to finish after SIGTERM before it is abandoned.
    pub shutdown_grace: Duration,
    /// How often a worker logs its summary at info level (when it did something).
    pub summary_every: Duration,
    /// How often, at most, an idle worker hands freed memory back after live batches.
    pub release_every: Duration,
    /// How often a long whole-tree compare or watch placement logs its progress.
    pub progress_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            settle: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            max_retry: Duration::from_secs(10),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            source_recheck: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            summary_every: Duration::from_secs(10),
            release_every: Duration::from_secs(5),
            progress_every: Duration::from_secs(2),
        }
    }
}

impl Timing {
    /// How long a path waits after its `failures`-th failure in a row (by default 1, 2, 4,
    /// 8, 10 s).
    pub fn retry_delay(&self, failures: u32) -> Duration {
        let doubled = self.retry_after * 2u32.saturating_pow(failures.saturating_sub(1).min(6));
        doubled.min(self.max_retry)
    }
}

/// Now, on tokio's clock (virtual under `tokio::time::pause`; the system's monotonic clock
/// otherwise, and outside a runtime).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_to_the_cap() {
        let t = Timing::default();
        let waits: Vec<u64> = (1..=6).map(|n| t.retry_delay(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn now_follows_the_paused_clock() {
        let before = now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(now().duration_since(before) >= Duration::from_secs(3600));
    }
}
