//! Which of a daemon's main loops are still turning: each loop that must stay responsive
//! (the receiver's accept loop, each sender group's event router) registers a [`Beat`] and
//! beats it every time round, idle or not; the service watchdog keeps systemd's keep-alives
//! coming only while every registered loop beat recently. A loop stuck in a deadlock or an
//! endless walk stops the keep-alives, and systemd restarts the daemon.
//!
//! Loops that may legitimately wait long (a worker streaming a 20 GiB file, a session
//! waiting on its peer) do not register: their stalls have their own timeouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each registered loop's name and last beat (milliseconds since the registry's epoch).
type Loops = Arc<Mutex<Vec<(String, Arc<AtomicU64>)>>>;

/// The registry of a process's main loops.
#[derive(Clone)]
pub struct Liveness {
    epoch: Instant,
    loops: Loops,
}

/// One loop's heartbeat; dropping it unregisters the loop.
pub struct Beat {
    epoch: Instant,
    last: Arc<AtomicU64>,
    loops: Loops,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            epoch: Instant::now(),
            loops: Arc::default(),
        }
    }
}

impl Liveness {
    /// Registers the loop `name` as beating now.
    pub fn register(&self, name: impl Into<String>) -> Beat {
        let last = Arc::new(AtomicU64::new(millis(self.epoch, Instant::now())));
        self.loops
            .lock()
            .expect("liveness lock")
            .push((name.into(), last.clone()));
        Beat {
            epoch: self.epoch,
            last,
            loops: self.loops.clone(),
        }
    }

    /// The loop that has gone longest without a beat, if that is more than `within` before
    /// `now`, with how long.
    pub fn stuck(&self, within: Duration, now: Instant) -> Option<(String, Duration)> {
        let now = millis(self.epoch, now);
        let loops = self.loops.lock().expect("liveness lock");
        loops
            .iter()
            .map(|(name, last)| {
                let silent = now.saturating_sub(last.load(Ordering::Relaxed));
                (name, Duration::from_millis(silent))
            })
            .filter(|(_, silent)| *silent > within)
            .max_by_key(|(_, silent)| *silent)
            .map(|(name, silent)| (name.clone(), silent))
    }

    /// How many loops are registered.
    pub fn loops(&self) -> usize {
        self.loops.lock().expect("liveness lock").len()
    }
}

impl Beat {
    /// The loop went round.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// The loop went round at `at`.
    pub fn beat_at(&self, at: Instant) {
        self.last.store(millis(self.epoch, at), Ordering::Relaxed);
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        self.loops
            .lock()
            .expect("liveness lock")
            .retain(|(_, last)| !Arc::ptr_eq(last, &self.last));
    }
}

fn millis(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_named_and_a_dropped_one_forgotten() {
        let live = Liveness::default();
        let accept = live.register("accept loop");
        let router = live.register("router photos");
        let start = Instant::now();
        let later = start + Duration::from_secs(40);
        // Both beat at registration: 40 s later both are silent.
        let (name, silent) = live.stuck(Duration::from_secs(30), later).unwrap();
        assert!(["accept loop", "router photos"].contains(&name.as_str()));
        assert!(silent >= Duration::from_secs(39), "{silent:?}");
        // One keeps beating: only the other is stuck.
        accept.beat_at(start + Duration::from_secs(35));
        let (name, silent) = live.stuck(Duration::from_secs(30), later).unwrap();
        assert_eq!(name, "router photos");
        assert!(silent >= Duration::from_secs(39), "{silent:?}");
        router.beat_at(later);
        assert!(live.stuck(Duration::from_secs(30), later).is_none());
        drop(router);
        assert_eq!(live.loops(), 1);
        drop(accept);
        assert!(live
            .stuck(Duration::ZERO, later + Duration::from_secs(3600))
            .is_none());
    }
}
