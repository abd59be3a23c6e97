//! Running under systemd (`Type=notify`): readiness, status lines, reload and stop notices,
//! and the watchdog. Every call is a no-op outside a service (no `NOTIFY_SOCKET`).
//!
//! The watchdog's keep-alives are sent from a timer task, but only while every main loop
//! registered in the daemon's [`Liveness`] has gone round within half the watchdog interval:
//! a loop stuck in a deadlock or an endless walk, or a runtime too wedged to run the timer,
//! stops them, and systemd restarts the daemon (`Restart=on-failure`).

use ferry_protocol::liveness::Liveness;
use sd_notify::NotifyState;
use std::time::{Duration, Instant};

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// The daemon is ready; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A reload began (`ready` again when it is done).
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

/// Shutdown began.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Starts the watchdog task if systemd asked for one (`WatchdogSec=`).
pub fn watchdog(liveness: Liveness) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = Duration::from_micros(usec);
    tracing::debug!(?interval, loops = liveness.loops(), "watchdog enabled");
    tokio::spawn(keep_alive(liveness, interval, || {
        notify(&[NotifyState::Watchdog])
    }));
}

/// Calls `alive` every quarter of `interval` while no loop of `liveness` has been silent
/// for more than half of it.
async fn keep_alive(liveness: Liveness, interval: Duration, alive: impl Fn()) {
    let mut withheld = false;
    loop {
        match liveness.stuck(interval / 2, Instant::now()) {
            None => {
                if withheld {
                    tracing::info!("every main loop is turning again; watchdog resumed");
                    withheld = false;
                }
                alive();
            }
            Some((name, silent)) if !withheld => {
                tracing::error!(
                    "the {name} has not gone round for {} s; withholding the watchdog \
                     keep-alive so systemd restarts the daemon",
                    silent.as_secs()
                );
                withheld = true;
            }
            Some(_) => {}
        }
        tokio::time::sleep(interval / 4).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_stuck_main_loop_stops_the_keep_alives_and_a_turning_one_resumes_them() {
        let live = Liveness::default();
        let beat = live.register("accept loop");
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        let interval = Duration::from_millis(400);
        let task = tokio::spawn(keep_alive(live, interval, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        // Beating: a keep-alive every 100 ms.
        for _ in 0..6 {
            beat.beat();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let while_beating = sent.load(Ordering::SeqCst);
        assert!(while_beating >= 4, "{while_beating} keep-alives in 600 ms");
        // Stuck: after at most 200 ms of silence, none.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at_stop = sent.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            sent.load(Ordering::SeqCst),
            at_stop,
            "keep-alives while stuck"
        );
        // Turning again: they resume.
        beat.beat();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            sent.load(Ordering::SeqCst) > at_stop,
            "no keep-alive after recovery"
        );
        task.abort();
    }
}
