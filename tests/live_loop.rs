//! The live loop in memory and in virtual time: the real worker, queue, planner and receiver,
//! no binaries, no sockets, no waiting. Behaviour that takes minutes on a real clock
//! (backoff, retries, the delete guard's window) runs in milliseconds.

mod common;

use common::live::Live;
use common::pair::Pair;
use ferry_protocol::RelPath;
use ferry_sender::coalesce::{Change, Need, Rename};
use std::fs;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn content(path: &str) -> Change {
    Change::Path {
        path: RelPath::from(path),
        need: Need::Content,
        since: Instant::now(),
    }
}

/// A receiver that is down when the worker starts: it tries again on the backoff's schedule
/// (250 ms doubling to 5 s, in virtual time), and once the receiver is back everything that
/// waited arrives and the status says so.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_receiver_down_is_tried_on_the_backoff_schedule_and_caught_up_on() {
    let pair = Pair::new();
    fs::write(pair.src.join("a"), "a").unwrap();
    let group = pair.group();
    let live = Live::start(pair, group, vec![Change::Full]);
    live.down.store(true, Ordering::SeqCst);
    let start = tokio::time::Instant::now();
    // Past the cap: 0, 0.25, 0.75, 1.75, 3.75, 7.75, 12.75, 17.75 s.
    while live.dials.lock().unwrap().len() < 8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at: Vec<u64> = live
        .dials
        .lock()
        .unwrap()
        .iter()
        .take(8)
        .map(|t| t.duration_since(start).as_millis() as u64)
        .collect();
    let gaps: Vec<u64> = at
        .windows(2)
        .map(|w| (w[1] - w[0] + 50) / 250 * 250)
        .collect();
    assert_eq!(
        gaps,
        vec![250, 500, 1000, 2000, 4000, 5000, 5000],
        "attempts at {at:?} ms"
    );
    assert_eq!(live.status().state.name(), "retrying");
    assert!(live.status().pending >= 1);
    fs::write(live.pair.src.join("b"), "b").unwrap();
    live.queue.push([content("b")]);
    live.down.store(false, Ordering::SeqCst);
    live.settled(Duration::from_secs(10)).await;
    let pair = live.stop().await;
    assert_eq!(fs::read(pair.dst.join("a")).unwrap(), b"a");
    assert_eq!(fs::read(pair.dst.join("b")).unwrap(), b"b");
}

/// Makes a directory immutable for as long as it lives (`chattr +i`, e2fsprogs): it refuses
/// new entries, even to root. Dropped (also when the test fails), it is mutable again.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(path: &std::path::Path) -> Immutable {
        chattr("+i", path);
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &std::path::Path) {
    let o = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("this test needs chattr (e2fsprogs)");
    assert!(
        o.status.success(),
        "chattr {flag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A path the receiver refuses (its directory there is immutable) is retried on its own
/// schedule (1, 2, 4, 8, 10 s, in virtual time) while everything else goes on, and arrives at
/// the first retry after the obstacle is gone.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_refused_path_is_retried_on_its_schedule_while_the_rest_goes_on() {
    let pair = Pair::new();
    fs::create_dir(pair.src.join("d")).unwrap();
    let group = pair.group();
    let live = Live::start(pair, group, vec![Change::Full]);
    live.settled(Duration::from_secs(10)).await;
    let immutable = Immutable::new(&live.pair.dst.join("d"));
    fs::write(live.pair.src.join("d/f"), "f").unwrap();
    live.queue.push([content("d/f")]);
    live.wait(Duration::from_secs(5), "the refusal", |s| s.failures >= 1)
        .await;
    let refused_at = tokio::time::Instant::now();
    // The rest goes on meanwhile.
    fs::write(live.pair.src.join("other"), "o").unwrap();
    live.queue.push([content("other")]);
    live.wait(Duration::from_secs(5), "the other file", |s| s.files >= 1)
        .await;
    assert_eq!(fs::read(live.pair.dst.join("other")).unwrap(), b"o");
    // Retries at +1, +2, +4, +8 s: 1, 3, 7, 15 s after the first refusal (each retry fails
    // the file and its directory's times at once).
    let mut retries = Vec::new();
    let mut seen = live.status().failures;
    while retries.len() < 4 {
        assert!(
            refused_at.elapsed() < Duration::from_secs(30),
            "retries at {retries:?}"
        );
        let now = live.status().failures;
        if now != seen {
            retries.push(refused_at.elapsed().as_millis() as u64 / 100 * 100);
            seen = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(retries, vec![1000, 3000, 7000, 15000], "retries at (ms)");
    let fixed = tokio::time::Instant::now();
    drop(immutable);
    assert!(live.status().pending >= 1, "the refused path is still owed");
    // The obstacle is gone: the next retry (at most 10 s later) delivers it.
    live.settled(Duration::from_secs(11)).await;
    assert!(fixed.elapsed() <= Duration::from_secs(11));
    let pair = live.stop().await;
    assert_eq!(fs::read(pair.dst.join("d/f")).unwrap(), b"f");
}

/// A rename travels as one rename (no content), and a rename the receiver cannot do (it
/// lacks the old name) travels as content.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn renames_travel_as_renames_and_fall_back_to_content() {
    let pair = Pair::new();
    fs::write(pair.src.join("old"), vec![7u8; 100_000]).unwrap();
    let group = pair.group();
    let live = Live::start(pair, group, vec![Change::Full]);
    live.settled(Duration::from_secs(10)).await;
    let files_before = live.status().files;
    fs::rename(live.pair.src.join("old"), live.pair.src.join("new")).unwrap();
    let rename = |from: &str, to: &str| {
        Change::Rename(Rename {
            from: RelPath::from(from),
            to: RelPath::from(to),
            dir: false,
            since: Instant::now(),
        })
    };
    live.queue.push([rename("old", "new")]);
    live.settled(Duration::from_secs(10)).await;
    assert_eq!(live.status().files, files_before, "no content travelled");
    assert!(live.pair.dst.join("new").exists() && !live.pair.dst.join("old").exists());
    // The receiver lost the old name meanwhile: the new name goes as content.
    fs::remove_file(live.pair.dst.join("new")).unwrap();
    fs::rename(live.pair.src.join("new"), live.pair.src.join("newer")).unwrap();
    live.queue.push([rename("new", "newer")]);
    live.settled(Duration::from_secs(10)).await;
    assert_eq!(live.status().files, files_before + 1);
    let pair = live.stop().await;
    assert_eq!(fs::read(pair.dst.join("newer")).unwrap().len(), 100_000);
}

/// The delete guard's window is ten minutes: deletions spread over more than the window never
/// add up, however many there are in all; deletions within one window do: the batch that
/// crosses the rule deletes up to it (the receiver counts each delete against the allowance)
/// and the rest are held, while everything else still goes; an operator's confirmation
/// releases them live.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deletions_add_up_within_the_guard_window_only() {
    let pair = Pair::new();
    for d in 0..10 {
        fs::create_dir(pair.src.join(format!("d{d}"))).unwrap();
        for i in 0..20 {
            fs::write(pair.src.join(format!("d{d}/f{i}")), "x").unwrap();
        }
    }
    let mut group = pair.group();
    group.guard.min = 50;
    let live = Live::start(pair, group, vec![Change::Full]);
    live.settled(Duration::from_secs(30)).await;
    let delete = |live: &Live, d: usize| {
        fs::remove_dir_all(live.pair.src.join(format!("d{d}"))).unwrap();
        live.queue.push([content(&format!("d{d}"))]);
    };
    // 6 of 10 directories, one every 4 minutes: 126 of 210 entries in all (60%, past the
    // rule), but never more than 3 directories (63, 30%) within one 10-minute window.
    for d in 0..6 {
        delete(&live, d);
        live.settled(Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(240)).await;
    }
    assert_eq!(live.status().state.name(), "connected");
    assert!(!live.pair.dst.join("d5").exists());
    // Then 3 more directories and 10 files at once. The module is 126 entries now (what left
    // the window left the module), the rule holds at 63 and 42 are in the window: 20 more may
    // go. Each directory takes 21 and is held; the 10 files (after them in tree order) go.
    for d in 6..9 {
        delete(&live, d);
    }
    for i in 0..10 {
        let f = format!("d9/f{i}");
        fs::remove_file(live.pair.src.join(&f)).unwrap();
        live.queue.push([content(&f)]);
    }
    live.wait(Duration::from_secs(30), "the guard", |s| {
        s.held_why.is_some()
    })
    .await;
    let held = live.status();
    assert_eq!(held.state.name(), "connected", "only the deletions wait");
    assert!(
        held.held_why
            .as_deref()
            .unwrap()
            .contains("ferry confirm-deletes file"),
        "{held:?}"
    );
    let names = |dst: &std::path::Path| {
        let mut left: Vec<String> = fs::read_dir(dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        left
    };
    assert_eq!(
        names(&live.pair.dst),
        ["d6", "d7", "d8", "d9"],
        "what would cross the rule is held"
    );
    let d9 = fs::read_dir(live.pair.dst.join("d9")).unwrap().count();
    assert_eq!(d9, 10, "what fits under it went");
    assert_eq!(held.held_deletes, 3, "{held:?}");
    // While they wait, new work goes, and a deletion too (held with the others).
    fs::write(live.pair.src.join("d9/new"), "n").unwrap();
    live.queue.push([content("d9/new")]);
    fs::remove_dir_all(live.pair.src.join("d9")).unwrap();
    fs::create_dir(live.pair.src.join("e")).unwrap();
    let tree = Change::Path {
        path: RelPath::from("e"),
        need: Need::Tree,
        since: Instant::now(),
    };
    live.queue.push([content("d9"), tree]);
    live.settled_or_holding(Duration::from_secs(30)).await;
    assert!(live.pair.dst.join("e").is_dir());
    assert!(live.pair.dst.join("d9").is_dir(), "held with the rest");
    // Released without a restart.
    live.confirm_deletes("file");
    live.settled(Duration::from_secs(30)).await;
    assert_eq!(names(&live.pair.dst), ["e"]);
    live.stop().await;
}

/// A link that stalls (a middlebox that still acknowledges, so TCP's own timeouts never fire)
/// used to hold the sender's batch for ever. With requests outstanding and nothing heard for
/// 45 s (the receiver says `Alive` every 10 s), the session is given up and the worker
/// reconnects; what waited arrives. In virtual time: no 45 s wait.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_stalled_link_is_given_up_and_the_worker_reconnects() {
    let pair = Pair::new();
    fs::write(pair.src.join("before"), "b").unwrap();
    let group = pair.group();
    let live = Live::start(pair, group, Vec::new());
    live.silent.store(true, Ordering::SeqCst);
    live.queue.push([content("before")]);
    live.wait(Duration::from_secs(5), "a session", |s| {
        s.state.name() == "connected"
    })
    .await;
    let stalled_at = tokio::time::Instant::now();
    // The next session reaches the real receiver.
    live.silent.store(false, Ordering::SeqCst);
    live.settled(Duration::from_secs(120)).await;
    let took = stalled_at.elapsed();
    assert!(
        took >= ferry_protocol::connection::STALL_TIMEOUT,
        "given up after {took:?}, before the stall timeout"
    );
    assert!(
        took < Duration::from_secs(60),
        "given up only after {took:?}"
    );
    assert_eq!(live.dials.lock().unwrap().len(), 2, "one reconnect");
    let pair = live.stop().await;
    assert_eq!(fs::read(pair.dst.join("before")).unwrap(), b"b");
}

/// A link that falls silent while nothing is being sent was seen only when the next change
/// came (`ferry status` said connected meanwhile). Silence past the liveness window now counts
/// as a lost connection, idle or not: the worker says so and reconnects at once, with no work
/// to send. In virtual time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_idle_link_that_falls_silent_is_given_up_and_reconnected() {
    let pair = Pair::new();
    let mut group = pair.group();
    // A change that sends nothing: the session is open and idle after it.
    group.delete = false;
    let live = Live::start(pair, group, Vec::new());
    live.silent.store(true, Ordering::SeqCst);
    live.queue.push([content("not-there")]);
    live.settled(Duration::from_secs(5)).await;
    assert_eq!(live.dials.lock().unwrap().len(), 1);
    let idle_from = tokio::time::Instant::now();
    live.silent.store(false, Ordering::SeqCst);
    live.wait(Duration::from_secs(120), "the silence noticed", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no word from the receiver"))
    })
    .await;
    let took = idle_from.elapsed();
    assert!(
        took >= ferry_protocol::connection::STALL_TIMEOUT && took < Duration::from_secs(60),
        "given up after {took:?}"
    );
    live.settled(Duration::from_secs(30)).await;
    assert_eq!(
        live.dials.lock().unwrap().len(),
        2,
        "reconnected without work"
    );
    live.stop().await;
}

/// The log lines written while the returned guard lives (this thread only: the test's
/// current-thread runtime runs the worker here).
fn captured_log() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let buffer = Buffer(lines.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || buffer.clone())
        .finish();
    (lines, tracing::subscriber::set_default(subscriber))
}

/// A source directory that goes away (an unmounted disk, a removed directory) pauses the
/// group: said once, then a quiet re-check every 10 s for as long as it is away (a minute
/// here, six re-checks), no connection, nothing sent, the backup untouched; when it is back
/// the group resumes and sends what changed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_missing_source_pauses_quietly_and_resumes_when_it_is_back() {
    let (log, _guard) = captured_log();
    let pair = Pair::new();
    fs::write(pair.src.join("f"), "1").unwrap();
    let group = pair.group();
    let live = Live::start(pair, group, vec![Change::Full]);
    live.settled(Duration::from_secs(10)).await;
    let away = live.pair.tmp.path().join("away");
    fs::rename(&live.pair.src, &away).unwrap();
    fs::write(away.join("f"), "changed while away").unwrap();
    live.queue.push([content("f")]);
    live.wait(Duration::from_secs(5), "paused", |s| {
        s.state.name() == "paused"
    })
    .await;
    let dials = live.dials.lock().unwrap().len();
    let paused_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(live.status().state.name(), "paused");
    assert_eq!(
        live.dials.lock().unwrap().len(),
        dials,
        "dialled while paused"
    );
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("nothing is sent until it is back").count(),
        1,
        "{text}"
    );
    let errors = text.lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(errors, 1, "{text}");
    assert_eq!(
        fs::read(live.pair.dst.join("f")).unwrap(),
        b"1",
        "backup untouched"
    );
    fs::rename(&away, &live.pair.src).unwrap();
    live.settled(Duration::from_secs(11)).await;
    assert!(paused_at.elapsed() <= Duration::from_secs(71));
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("source is back; resuming").count(),
        1,
        "{text}"
    );
    let pair = live.stop().await;
    assert_eq!(fs::read(pair.dst.join("f")).unwrap(), b"changed while away");
}
