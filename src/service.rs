//! Running under systemd (`Type=notify`): readiness, status lines, the stop notice, the
//! watchdog, and log lines in journald's format. Every notice is a no-op outside a service
//! (no `NOTIFY_SOCKET`).
//!
//! The watchdog's keep-alives are sent from a timer task, but only while every main loop
//! registered in the daemon's [`Liveness`] has gone round within half the watchdog interval:
//! a loop stuck in a deadlock or an endless walk, or a runtime too wedged to run the timer,
//! stops them, and systemd restarts the daemon (`Restart=on-failure`).

use ferry_protocol::liveness::Liveness;
use sd_notify::NotifyState;
use std::time::{Duration, Instant};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// True when stderr is connected to the journal (systemd sets `JOURNAL_STREAM` to its
/// `device:inode`; a child whose stderr was redirected does not match).
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat into the buffer we own; fd 2 may be closed (then -1).
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    stream.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

/// Log lines for journald: the syslog priority as a `<N>` prefix (sd-daemon(3)), no time
/// stamp and no level word of our own.
pub struct JournalFormat(Format<tracing_subscriber::fmt::format::Full, ()>);

impl Default for JournalFormat {
    fn default() -> Self {
        JournalFormat(
            Format::default()
                .without_time()
                .with_level(false)
                .with_target(false)
                .with_ansi(false),
        )
    }
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a level.
fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

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

/// A reload began; [`ready`] says it ended.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
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
