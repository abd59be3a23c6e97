//! Progress of long one-off work (the initial sync of `mirror`, `verify`'s digesting): a bar
//! with totals, bytes, rate and ETA when stderr is a terminal, a plain line every
//! [`PLAIN_EVERY`] otherwise. Log lines go through [`LogWriter`], which lifts the bar out of
//! the way while a line is written, so they never tear it.

use ferry_sender::execute::{Step, Totals, Watch};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the plain form prints a line.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The bar on screen, if any, for the log writer to step around.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Units of work done: entries and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Entries (files, directories, links, deletions…).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// One piece of work's progress.
pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    state: Mutex<Plain>,
}

struct Plain {
    finished: bool,
    total: Count,
    /// The total may still grow.
    growing: bool,
    /// The last `done` seen.
    done: Count,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Starts showing progress of `what` (e.g. "initial sync").
    pub fn start(what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            // Styled before it can be drawn: the default style would draw a full bar of
            // `0/0` first, which stays in the scrollback.
            let bar = ProgressBar::hidden();
            bar.set_prefix(what.to_string());
            bar.set_style(
                ProgressStyle::with_template("{prefix} {spinner} {bytes} {binary_bytes_per_sec}")
                    .expect("progress template"),
            );
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
            *SHOWN.lock().expect("progress lock") = Some(bar.clone());
            bar
        });
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            bar,
            state: Mutex::new(Plain {
                finished: false,
                total: Count::default(),
                growing: false,
                done: Count::default(),
                started: now,
                last_line: now,
            }),
        }
    }

    /// The work is known to be `total` (so far, while [`Progress::growing`]). Counting is in
    /// bytes when there are any, else in entries.
    pub fn total(&self, total: Count) {
        let mut st = self.state.lock().expect("progress lock");
        if st.finished {
            return;
        }
        st.total = total;
        self.restyle(&st);
    }

    /// Whether the total may still grow (a copy that reads the tree as it sends it): the
    /// total is then shown as a floor, `+`, and no ETA is given, as it would be too soon.
    pub fn growing(&self, growing: bool) {
        let mut st = self.state.lock().expect("progress lock");
        if st.finished || st.growing == growing {
            return;
        }
        st.growing = growing;
        if st.total != Count::default() {
            self.restyle(&st);
        }
    }

    fn restyle(&self, st: &Plain) {
        let Some(bar) = &self.bar else {
            return;
        };
        let (total, more) = (st.total, floor(st.growing));
        let eta = if st.growing { "" } else { " ETA {eta}" };
        let template = if total.bytes > 0 {
            format!("{{prefix}} [{{wide_bar}}] {{bytes}}/{{total_bytes}}{more} {{binary_bytes_per_sec}}{eta} {{msg}}")
        } else {
            format!("{{prefix}} [{{wide_bar}}] {{pos}}/{{len}}{more} entries {{per_sec}}{eta}")
        };
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("progress template")
                .progress_chars("=> "),
        );
        bar.set_length(if total.bytes > 0 {
            total.bytes
        } else {
            total.entries.max(1)
        });
    }

    /// `done` so far.
    pub fn update(&self, done: Count) {
        let mut st = self.state.lock().expect("progress lock");
        if st.finished {
            return;
        }
        let total = st.total;
        st.done = done;
        match &self.bar {
            Some(bar) => {
                // Before the totals are known the spinner shows bytes.
                if total.bytes > 0 || total == Count::default() {
                    bar.set_position(done.bytes);
                    let more = floor(st.growing);
                    bar.set_message(format!("{}/{}{more}", done.entries, total.entries));
                } else {
                    bar.set_position(done.entries);
                }
            }
            None => {
                if st.last_line.elapsed() < PLAIN_EVERY {
                    return;
                }
                st.last_line = Instant::now();
                errln!(
                    "ferry: {}: {}",
                    self.what,
                    plain(done, total, st.growing, st.started.elapsed())
                );
            }
        }
    }

    /// Takes the bar off the screen and leaves its final state as a line of its own (its
    /// total, once every planned step was counted done or missed).
    pub fn finish(&self) {
        let mut st = self.state.lock().expect("progress lock");
        if std::mem::replace(&mut st.finished, true) {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            SHOWN.lock().expect("progress lock").take();
            if st.total != Count::default() {
                let line = plain(st.done, st.total, st.growing, st.started.elapsed());
                errln!("ferry: {}: {line}", self.what);
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `120/5000 entries, 30.0 MiB/1.2 GiB, 12.0 MiB/s, ETA 1 min 40 s`; while the total may
/// still grow, `120/5000+ entries, 30.0 MiB/1.2 GiB+, 12.0 MiB/s, counting`.
fn plain(done: Count, total: Count, growing: bool, elapsed: Duration) -> String {
    let more = floor(growing);
    let mut line = format!("{}/{}{more} entries", done.entries, total.entries);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let (d, t) = if total.bytes > 0 {
        line.push_str(&format!(
            ", {}/{}{more}, {}/s",
            crate::status::bytes(done.bytes),
            crate::status::bytes(total.bytes),
            crate::status::bytes((done.bytes as f64 / secs) as u64)
        ));
        (done.bytes, total.bytes)
    } else {
        (done.entries, total.entries)
    };
    if growing {
        line.push_str(", counting");
    } else if d > 0 && t > d {
        let left = secs * (t - d) as f64 / d as f64;
        line.push_str(&format!(", ETA {}", crate::status::age(left)));
    }
    line
}

/// What follows a total that may still grow: it is a floor.
fn floor(growing: bool) -> &'static str {
    if growing {
        "+"
    } else {
        ""
    }
}

/// Progress of an execution (or several, one after the other), against their plans.
pub struct PlanProgress {
    progress: Progress,
    planned: Totals,
    done: Totals,
}

impl PlanProgress {
    /// Starts showing `what`.
    pub fn new(what: &str) -> PlanProgress {
        PlanProgress {
            progress: Progress::start(what),
            planned: Totals::default(),
            done: Totals::default(),
        }
    }
}

impl Watch for PlanProgress {
    fn planned(&mut self, totals: Totals) {
        self.planned.steps += totals.steps;
        self.planned.bytes += totals.bytes;
        self.progress.total(count(self.planned));
    }

    fn whole(&mut self, whole: bool) {
        self.progress.growing(!whole);
    }

    fn step(&mut self, step: &Step) {
        self.done.add(step);
        self.progress.update(count(self.done));
    }

    fn missed(&mut self, bytes: u64) {
        self.done.steps += 1;
        self.done.bytes += bytes;
        self.progress.update(count(self.done));
    }
}

/// A plan's totals as progress counts.
pub fn count(t: Totals) -> Count {
    Count {
        entries: t.steps,
        bytes: t.bytes,
    }
}

/// Log output that steps around the progress bar: each write lifts the bar, writes, and
/// lets it be drawn again.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let shown = SHOWN.lock().expect("progress lock").clone();
        match shown {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_gives_totals_rate_and_eta() {
        let done = Count {
            entries: 10,
            bytes: 10 << 20,
        };
        let total = Count {
            entries: 40,
            bytes: 40 << 20,
        };
        assert_eq!(
            plain(done, total, false, Duration::from_secs(10)),
            "10/40 entries, 10.0 MiB/40.0 MiB, 1.0 MiB/s, ETA 30 s"
        );
        assert_eq!(
            plain(done, total, true, Duration::from_secs(10)),
            "10/40+ entries, 10.0 MiB/40.0 MiB+, 1.0 MiB/s, counting"
        );
        let entries_only = Count {
            entries: 5,
            bytes: 0,
        };
        let of = Count {
            entries: 20,
            bytes: 0,
        };
        assert_eq!(
            plain(entries_only, of, false, Duration::from_secs(5)),
            "5/20 entries, ETA 15 s"
        );
    }
}
