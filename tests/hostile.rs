//! Attacks from a local user of the source host: someone who can write in a source tree tries
//! to make the root-run sender ship what lies outside it, or to stop the backup.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the flipping race runs (the issue asks for at least 10 s).
const RACE: Duration = Duration::from_secs(10);

/// Files in `root` (recursively, symlinks not followed) whose bytes hold `marker`.
fn files_holding(root: &Path, marker: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(items) = fs::read_dir(&dir) else {
            continue;
        };
        for item in items.flatten() {
            let Ok(t) = item.file_type() else { continue };
            if t.is_dir() {
                stack.push(item.path());
            } else if t.is_file() {
                if let Ok(bytes) = fs::read(item.path()) {
                    if bytes.windows(marker.len()).any(|w| w == marker) {
                        out.push(item.path().display().to_string());
                    }
                }
            }
        }
    }
    out
}

on_each_watcher! {
    /// A directory of the source flipped between a real directory and a symlink to a
    /// root-only directory elsewhere, thousands of times, while its files are written: no
    /// byte from outside reaches the backup, the flipping never stops the target (one name
    /// coming and going counts once against the delete guard), and the backup is exact after.
    fn a_directory_flipped_into_a_symlink_leaks_nothing_and_stops_nothing(watcher) {
        let live = Site::watching(watcher);
        let src = live.dir("src");
        let dst = live.root().join("dst");
        let secret = live.dir("secret");
        set_mode(&secret, 0o700);
        fs::create_dir(src.join("pub")).unwrap();
        for i in 0..50 {
            fs::write(src.join(format!("pub/f{i}")), format!("public {i}\n")).unwrap();
            let s = secret.join(format!("f{i}"));
            fs::write(&s, format!("SECRET-BYTES {i}\n")).unwrap();
            set_mode(&s, 0o600);
        }
        let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
        let daemon = live.run(&one_group(&backup, &src, ""), 1);
        wait_equal(&src, &dst, 30, "initial sync");

        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(AtomicU64::new(0));
        let leaks_seen = Arc::new(AtomicU64::new(0));
        let scans = Arc::new(AtomicU64::new(0));
        let flipper = {
            let (src, secret, stop, flips) = (src.clone(), secret.clone(), stop.clone(), flips.clone());
            std::thread::spawn(move || {
                let (real, aside) = (src.join("pub"), src.join("pub.real"));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = n % 50;
                    fs::write(real.join(format!("f{k}")), format!("public {k} {n}\n")).unwrap();
                    fs::rename(&real, &aside).unwrap();
                    symlink(&secret, &real).unwrap();
                    // Written while the name points outside: the sender hears of pub.real/fK
                    // and of pub, and reads them while the names keep moving.
                    fs::write(aside.join(format!("f{}", (k + 1) % 50)), format!("p {n}\n")).unwrap();
                    fs::remove_file(&real).unwrap();
                    fs::rename(&aside, &real).unwrap();
                    n += 1;
                    flips.store(n, Ordering::Relaxed);
                }
            })
        };
        let scanner = {
            let (dst, stop, leaks, scans) = (dst.clone(), stop.clone(), leaks_seen.clone(), scans.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let found = files_holding(&dst, b"SECRET-BYTES");
                    if !found.is_empty() {
                        eprintln!("outside bytes in the backup: {found:?}");
                        leaks.fetch_add(found.len() as u64, Ordering::Relaxed);
                    }
                    scans.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let started = Instant::now();
        while started.elapsed() < RACE {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        scanner.join().unwrap();
        let flips = flips.load(Ordering::Relaxed);
        assert!(flips >= 2000, "the race ran only {flips} flips");
        assert!(scans.load(Ordering::Relaxed) >= 10, "the backup was scanned too rarely");

        wait_equal(&src, &dst, 60, "after the race");
        let found = files_holding(&dst, b"SECRET-BYTES");
        assert!(found.is_empty(), "outside bytes in the backup after the race: {found:?}");
        assert_eq!(
            leaks_seen.load(Ordering::Relaxed),
            0,
            "outside bytes reached the backup during the race ({flips} flips)"
        );
        let log = daemon.log();
        assert!(
            !log.contains("target stopped") && !log.contains("delete guard"),
            "the flipping stopped the target ({flips} flips): {log}"
        );
        // Still following after the race.
        fs::write(src.join("after"), "after\n").unwrap();
        wait_equal(&src, &dst, 20, "a change after the race");
        eprintln!("{flips} flips in {RACE:?}, none leaked, the target kept going");
    }
}
