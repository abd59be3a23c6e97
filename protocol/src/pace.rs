//! A bandwidth cap: what a connection writes, held to a rate (a target's `bwlimit_kib`).
//!
//! Virtual scheduling (GCRA): each write of `n` bytes moves a "next free" instant on by
//! `n / rate`, never from earlier than [`BURST`] before now, and the writer waits until that
//! instant has come. Idle time earns no more than [`BURST`] of credit, so over any stretch
//! the bytes written stay within `rate × (stretch + BURST)` plus one write (a paced
//! `FrameWriter` writes 16 KiB at a time): over a minute, within 0.5% of the cap.
//! One [`Pace`] may be shared by every connection to a target ([`Pace::shared`]), so the cap
//! is the target's, whatever number of groups push to it, and no other target waits on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How far ahead of now the writes may run (the credit idle time can earn).
pub const BURST: Duration = Duration::from_millis(250);

/// A rate that writes are held to.
#[derive(Debug)]
pub struct Pace {
    bytes_per_second: u64,
    next: Mutex<Option<Instant>>,
}

impl Pace {
    /// A cap of `kib_per_second` KiB/s (at least 1).
    pub fn new(kib_per_second: u64) -> Pace {
        Pace {
            bytes_per_second: kib_per_second.max(1).saturating_mul(1024),
            next: Mutex::new(None),
        }
    }

    /// The cap shared by every connection to target `name` at this rate: the same one while
    /// any of them is open, a new one when the rate changed (a reload).
    pub fn shared(name: &str, kib_per_second: u64) -> Arc<Pace> {
        static PACES: Mutex<Option<HashMap<String, Weak<Pace>>>> = Mutex::new(None);
        let mut paces = PACES.lock().expect("paces lock");
        let paces = paces.get_or_insert_with(HashMap::new);
        paces.retain(|_, p| p.strong_count() > 0);
        let rate = kib_per_second.max(1).saturating_mul(1024);
        if let Some(p) = paces.get(name).and_then(Weak::upgrade) {
            if p.bytes_per_second == rate {
                return p;
            }
        }
        let p = Arc::new(Pace::new(kib_per_second));
        paces.insert(name.to_string(), Arc::downgrade(&p));
        p
    }

    /// The cap in bytes per second.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// `bytes` were written: waits until the writes are back within the cap.
    pub async fn spent(&self, bytes: u64) {
        let wait = self.charge(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Moves the next free instant on by `bytes` at the rate, from `now` less the burst at
    /// the earliest; how long to wait before writing again (until that instant).
    fn charge(&self, bytes: u64, now: Instant) -> Duration {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let mut next = self.next.lock().expect("pace lock");
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(earliest, |n| n.max(earliest));
        let free = start + cost;
        *next = Some(free);
        free.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minute of writes far faster than the cap takes a minute, within 0.5%; a pause earns
    /// no more than the burst.
    #[tokio::test(start_paused = true)]
    async fn a_minute_of_writes_keeps_to_the_cap() {
        let pace = Pace::new(1024); // 1 MiB/s
        let start = Instant::now();
        let mut written = 0u64;
        while written < 60 << 20 {
            pace.spent(256 << 10).await;
            written += 256 << 10;
        }
        // Only the burst goes unwaited: 0.25 s in 60. More credit than that (a writer let
        // run a burst ahead of an instant that already starts a burst back) ends sooner.
        let took = start.elapsed().as_secs_f64();
        assert!(
            (59.74..=59.76).contains(&took),
            "{took} s for 60 MiB at 1 MiB/s"
        );
        // An hour idle, then 10 MiB: at most the burst's worth goes at once.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let start = Instant::now();
        for _ in 0..40 {
            pace.spent(256 << 10).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!(
            (9.74..=9.76).contains(&took),
            "{took} s for 10 MiB after a pause"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_to_one_target_share_its_cap_and_a_new_rate_starts_afresh() {
        let (a, b) = (Pace::shared("t", 512), Pace::shared("t", 512));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &Pace::shared("other", 512)));
        let c = Pace::shared("t", 1024);
        assert!(!Arc::ptr_eq(&a, &c), "a reload's new rate");
        // Two writers on one cap: together they keep to it.
        let start = Instant::now();
        let write = |p: Arc<Pace>| async move {
            for _ in 0..20 {
                p.spent(256 << 10).await;
            }
        };
        tokio::join!(write(c.clone()), write(Pace::shared("t", 1024)));
        let took = start.elapsed().as_secs_f64();
        assert!(
            (9.74..=9.76).contains(&took),
            "{took} s for 10 MiB at 1 MiB/s"
        );
    }
}
