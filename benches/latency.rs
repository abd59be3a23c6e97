//! Latency benchmark: sender and receiver in one process on 127.0.0.1, the real protocol and
//! TLS. Reports, side by side with the old way (`rsync -a --delete SRC/ DST/` run per event,
//! as the inotifywait scripts do):
//! - p50/p99/max from a small file's close to it being durable (fsynced and acknowledged) at
//!   the receiver, over a series of writes;
//! - the time for a burst of 20,000 new files to be exactly mirrored.
//!
//! Run: `cargo bench --bench latency` (needs `rsync` for the reference column).
//! `FERRY_BENCH_WRITES` and `FERRY_BENCH_BURST` change the sizes.

use ferry_receiver::Loopback;
use ferry_sender::config::{SyncGroup, Target, TargetKind};
use ferry_sender::daemon::{Daemon, Observer};
use ferry_sender::execute::{Report, Step, StepKind};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Forwards durable file steps with the moment they were acknowledged.
struct Probe {
    steps: mpsc::UnboundedSender<(String, Instant)>,
    reconciled: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Observer for Probe {
    fn reconciled(&self, _: &str, _: &str, _: &Report) {
        if let Some(tx) = self.reconciled.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    fn step(&self, _: &str, _: &str, step: &Step, _: Option<Duration>) {
        if matches!(step.kind, StepKind::File | StepKind::Delta) {
            let _ = self.steps.send((step.path.to_string(), Instant::now()));
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{label:<34} p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms   (n={})",
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap()),
        v.len()
    )
}

fn rsync(src: &Path, dst: &Path, fsync: bool) -> Duration {
    let started = Instant::now();
    let st = std::process::Command::new("rsync")
        .args(fsync.then_some("--fsync"))
        .arg("-a")
        .arg("--delete")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .status()
        .expect("rsync is needed for the reference column (apt-get install rsync)");
    assert!(st.success(), "rsync failed");
    started.elapsed()
}

fn write_file(path: &Path, i: usize) {
    std::fs::write(path, format!("{i:>4096}")).unwrap();
}

/// The disk's own floor for one durable small file, the steps ferry's receiver cannot skip:
/// create a file beside its final name, write it, fsync it, rename it over the final name,
/// fsync the directory. `i` names the file.
fn durable_write(dir: &std::fs::File, at: &Path, i: usize) -> Duration {
    use std::io::Write;
    let started = Instant::now();
    let temp = at.join(format!(".tmp-{i}"));
    let mut f = std::fs::File::create(&temp).unwrap();
    f.write_all(format!("{i:>4096}").as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&temp, at.join(format!("f{i}"))).unwrap();
    dir.sync_all().unwrap();
    started.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let writes = env_usize("FERRY_BENCH_WRITES", 300);
    let burst = env_usize("FERRY_BENCH_BURST", 20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(writes, burst));
}

async fn bench(writes: usize, burst: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, reference) = (
        tmp.path().join("src"),
        tmp.path().join("dst"),
        tmp.path().join("rsync-dst"),
    );
    for d in [&src, &dst, &reference] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Some existing content, so the per-event rsync has a tree to walk as in real life.
    for d in 0..10 {
        let dir = src.join(format!("existing{d}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..100 {
            write_file(&dir.join(format!("f{i}")), i);
        }
    }
    // FERRY_BENCH_HISTORY=1: the module keeps history (each overwrite keeps the old version).
    let history = std::env::var("FERRY_BENCH_HISTORY").is_ok_and(|v| v == "1");
    let recv = Loopback::start_with_history(
        "bench",
        dst.clone(),
        history.then(|| tmp.path().join("history")),
    )
    .await
    .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let probe = Arc::new(Probe {
        steps: tx,
        reconciled: Mutex::new(Some(ready_tx)),
    });
    let target = Target {
        name: "local".into(),
        address: recv.address.clone(),
        more_addresses: Vec::new(),
        kind: TargetKind::Ferry {
            fingerprint: recv.pin,
            compress: false,
            bwlimit_kib: None,
        },
    };
    let group = SyncGroup::new("bench", src.clone(), vec!["local".into()], "bench");
    let daemon = Daemon::new(
        Arc::new(recv.client.clone()),
        [("local".to_string(), target)].into(),
        vec![group],
        ferry_sender::watch::Backend::Inotify,
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(daemon.run(shutdown.clone(), probe));
    ready_rx.await.unwrap();
    rsync(&src, &reference, false);

    // 1. Small writes, one at a time: close → durable at the receiver. Each is followed by
    // the same durable write done directly on the same filesystem: the floor, measured in
    // step with ferry (these disks drift within a minute).
    let mut ferry_lat = Vec::with_capacity(writes);
    let mut floor_lat = Vec::with_capacity(writes);
    let mut rsync_lat = Vec::new();
    let floor_dir = tmp.path().join("floor");
    std::fs::create_dir(&floor_dir).unwrap();
    let floor = Arc::new((std::fs::File::open(&floor_dir).unwrap(), floor_dir));
    for i in 0..writes {
        let name = format!("small-{i}");
        let path = src.join(&name);
        let closed = tokio::task::spawn_blocking(move || {
            write_file(&path, i);
            Instant::now()
        })
        .await
        .unwrap();
        loop {
            let (p, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("file not acknowledged within 10 s")
                .unwrap();
            if p == name {
                ferry_lat.push(at.saturating_duration_since(closed));
                break;
            }
        }
        let f = floor.clone();
        floor_lat.push(
            tokio::task::spawn_blocking(move || durable_write(&f.0, &f.1, i))
                .await
                .unwrap(),
        );
        // The old script: one rsync of the whole tree per event (every tenth write, to keep
        // the run short; each is independent).
        if i % 10 == 0 {
            let (s, r) = (src.clone(), reference.clone());
            rsync_lat.push(
                tokio::task::spawn_blocking(move || rsync(&s, &r, false))
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 1b. The same files overwritten, one at a time: each replaces a version (which a module
    // with history keeps).
    let mut overwrite_lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let name = format!("small-{i}");
        let path = src.join(&name);
        let closed = tokio::task::spawn_blocking(move || {
            write_file(&path, i + 7_000_000);
            Instant::now()
        })
        .await
        .unwrap();
        loop {
            let (p, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("overwrite not acknowledged within 10 s")
                .unwrap();
            if p == name {
                overwrite_lat.push(at.saturating_duration_since(closed));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 2. A burst of new files in 20 new directories, as fast as the disk takes them.
    let per_dir = burst.div_ceil(20);
    let names: Vec<String> = (0..burst)
        .map(|i| format!("burst{:02}/f{:05}", i / per_dir, i))
        .collect();
    let started = Instant::now();
    let src2 = src.clone();
    let n2 = names.clone();
    let written = tokio::task::spawn_blocking(move || {
        for (i, n) in n2.iter().enumerate() {
            let p = src2.join(n);
            if i % per_dir == 0 {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            }
            write_file(&p, i);
        }
        Instant::now()
    })
    .await
    .unwrap();
    let mut pending: HashMap<String, ()> = names.iter().map(|n| (n.clone(), ())).collect();
    let mut last = written;
    while !pending.is_empty() {
        let (p, at) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("burst did not converge within 120 s")
            .unwrap();
        if pending.remove(&p).is_some() {
            last = last.max(at);
        }
    }
    let ferry_burst = last.duration_since(started);
    let ferry_after_close = last.saturating_duration_since(written);
    // The reference copies the burst twice: as the scripts run it, and with --fsync, which
    // makes it as durable as ferry's acknowledged files.
    let reference_fsync = tmp.path().join("rsync-fsync-dst");
    let (rsync_burst, rsync_burst_fsync) = {
        let (s, r, rf) = (src.clone(), reference.clone(), reference_fsync.clone());
        let (a, b) = tokio::task::spawn_blocking(move || {
            // Seed the --fsync copy with the pre-burst tree so both copy only the burst.
            rsync(&r, &rf, false);
            (rsync(&s, &r, false), rsync(&s, &rf, true))
        })
        .await
        .unwrap();
        (a, b)
    };
    shutdown.cancel();
    running.await.unwrap().unwrap();
    recv.stop().await;

    println!();
    println!(
        "ferry latency benchmark (loopback, TLS, fsync on the receiver; history {})",
        if history { "on" } else { "off" }
    );
    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        percentile(&v, 0.5)
    };
    let (ferry_p50, floor_p50) = (p50(&ferry_lat), p50(&floor_lat));
    println!("{}", summary("ferry: close → durable", ferry_lat));
    println!("{}", summary("the disk's own durable write", floor_lat));
    println!(
        "  (create, write 4 KiB, fsync, rename, fsync the directory; one after each ferry \
         write)\n  ferry's p50 is {:.2}× the disk's (+{:.2} ms: event, read, TLS, ack)",
        ms(ferry_p50) / ms(floor_p50).max(1e-6),
        ms(ferry_p50) - ms(floor_p50)
    );
    println!("{}", summary("ferry: overwrite → durable", overwrite_lat));
    println!("{}", summary("rsync -a --delete per event", rsync_lat));
    println!("burst of {burst} new files (4 KiB each, 20 new directories):");
    println!(
        "  ferry: mirrored and durable {:.0} ms after the first write, {:.0} ms after the last \
         close (writing them took {:.0} ms)",
        ms(ferry_burst),
        ms(ferry_after_close),
        ms(written.duration_since(started))
    );
    println!(
        "  one rsync -a afterwards: {:.0} ms; with --fsync: {:.0} ms",
        ms(rsync_burst),
        ms(rsync_burst_fsync)
    );
}
