//! Fault injection on the backup host's disk: a module on a small tmpfs fills up.
//!
//! Needs root (it mounts a tmpfs); run as another user it fails, loudly.

mod common;

use common::trees::wait_equal;
use common::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Every file of `dst` is byte for byte its namesake in `src` (read independently of
/// `ferry verify`); returns how many there are.
fn whole_files(src: &Path, dst: &Path) -> usize {
    let mut n = 0;
    for item in fs::read_dir(dst).unwrap().flatten() {
        let name = item.file_name();
        let got = fs::read(item.path()).unwrap();
        let want = fs::read(src.join(&name)).unwrap_or_default();
        assert!(
            got == want,
            "{name:?} is torn or stale on the full disk: {} bytes, the source has {}",
            got.len(),
            want.len()
        );
        n += 1;
    }
    n
}

/// A module whose disk fills up: the files that fit arrive whole, the rest fail with the
/// disk's error and never show under their name half-written, the receiver keeps serving,
/// and once space is freed (the source deletes one big file) everything converges.
#[test]
fn a_module_disk_filling_up_never_shows_a_torn_file() {
    let site = Site::new();
    let src = site.dir("src");
    let dst = site.path("dst");
    let _disk = Mount::tmpfs(&dst, "8m");
    for i in 0..3 {
        fs::write(src.join(format!("big{i}")), pseudo_random(3 << 20, i)).unwrap();
    }
    for i in 0..20 {
        fs::write(src.join(format!("small{i}")), pseudo_random(4096, 100 + i)).unwrap();
    }
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    site.write_config(&one_group(&backup, &src, ""));
    let mut daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    daemon.wait_log_n("reconciled", 1, 60);
    assert!(
        daemon.log().contains("No space left on device"),
        "the full disk was not reported: {}",
        daemon.log()
    );
    // Full for 4 s, past two retries: whatever is there is whole, and not everything fits.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut present = 0;
    while Instant::now() < deadline {
        present = whole_files(&src, &dst);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(present < 23, "9 MiB cannot fit on an 8 MiB disk");
    assert!(
        present >= 20,
        "the small files fit: {present} files arrived"
    );
    // Space is freed the way an operator would: the source lets go of a big file.
    fs::remove_file(src.join("big0")).unwrap();
    wait_equal(&src, &dst, 30, "after space was freed");
    whole_files(&src, &dst);
    assert!(daemon.stop().success());
}

/// Batched durability: the receiver is killed (-9) in the middle of a burst of small files.
/// Every file under its name is whole, and every file the sender saw acknowledged is there
/// (an `Ack` is sent only after the batch's data, names and directories were flushed).
#[test]
fn kill_9_mid_batch_loses_no_acknowledged_file() {
    let site = Site::new();
    let (src, dst, mut backup) = site.one_backup();
    fill_tree(&src, 30, 100, |i| pseudo_random(3000 + i % 2000, i as u64));
    site.write_config(&one_group(&backup, &src, ""));
    let mut sender = Proc::spawn(
        ferry()
            .env("FERRY_LOG", "debug")
            .args(["send", "--config"])
            .arg(site.config()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_entries(&dst, false) < 500 {
        assert!(Instant::now() < deadline, "nothing arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let receiver = backup.receiver.take().unwrap();
    unsafe { libc::kill(receiver.child.id() as i32, libc::SIGKILL) };
    drop(receiver);
    sender.wait_log("connection lost");
    sender.stop();
    let log = sender.log();
    let acked: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("synced") && l.contains("op=File"))
        .filter_map(|l| l.split(" path=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        !acked.is_empty(),
        "no file was acknowledged before the kill: {log}"
    );
    for path in &acked {
        let got = fs::read(dst.join(path))
            .unwrap_or_else(|e| panic!("{path} was acknowledged but is not there: {e}"));
        assert!(got == fs::read(src.join(path)).unwrap(), "{path} differs");
    }
    let named = count_whole(&src, &dst);
    eprintln!(
        "killed after {} acknowledged files; {named} files under their names, all whole",
        acked.len()
    );
    assert!(named < 3000, "the kill came too late to test anything");
}

/// Checks every file under `dst` against its namesake in `src`; returns how many.
fn count_whole(src: &Path, dst: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dst).unwrap().flatten() {
        let (s, d) = (src.join(e.file_name()), e.path());
        if e.file_type().unwrap().is_dir() {
            n += count_whole(&s, &d);
        } else {
            assert!(
                fs::read(&d).unwrap() == fs::read(&s).unwrap(),
                "{d:?} is torn"
            );
            n += 1;
        }
    }
    n
}

/// A full disk fails every write: the receiver says so once for the module (each failure
/// counted, `unwritable`), not once a file; and `ferry restore` into a full DEST stops at the
/// first write that does not fit, says so once, and leaves only whole files.
#[test]
fn a_full_disk_is_said_once_and_a_restore_into_one_stops() {
    let site = Site::new();
    let src = site.dir("src");
    let dst = site.path("dst");
    let _disk = Mount::tmpfs(&dst, "1m");
    for i in 0..64 {
        fs::write(src.join(format!("f{i:02}")), pseudo_random(64 << 10, i)).unwrap();
    }
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    site.write_config(&one_group(&backup, &src, ""));
    // The sender waits for every answer before it exits: the receiver has logged all it will.
    let o = site.send_once(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let log = backup_log(&backup);
    let said = log.lines().filter(|l| l.contains("cannot write: ")).count();
    assert_eq!(said, 1, "{log}");
    assert!(!log.contains("request failed"), "{log}");
    let failed = summary_value(&site.stats(), "unwritable");
    assert!(
        failed >= 32,
        "{failed} writes failed for want of space; 4 MiB cannot fit in 1 MiB"
    );
    let present = whole_files(&src, &dst);
    assert!(
        present > 0 && present < 64,
        "{present} files on the full disk"
    );
    // The sender daemon retries each failed path: at most ten are warned about a minute,
    // however many fail how often.
    let started = Instant::now();
    let mut daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    daemon.wait_log_n("reconciled", 1, 60);
    daemon.wait_log_n(" synced ", 1, 60);
    let log = daemon.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("No space left on device"))
        .count() as u64;
    let minutes = started.elapsed().as_secs() / 60 + 1;
    assert!(
        (1..=10 * minutes).contains(&warned),
        "{warned} warnings in {minutes} minutes:\n{log}"
    );
    assert!(daemon.stop().success());

    // A restore of the whole source (4 MiB) into a 1 MiB DEST, from the backup host's copy
    // on a roomy disk.
    let roomy = site.dir("roomy");
    for i in 0..64 {
        fs::write(roomy.join(format!("f{i:02}")), pseudo_random(64 << 10, i)).unwrap();
    }
    let other = Backup::start(site.root(), "recv2", &[("file", &roomy)], &site.fingerprint);
    let dest = site.path("dest");
    let _small = Mount::tmpfs(&dest, "1m");
    let o = run(ferry()
        .args(["restore", "--config"])
        .arg(other.dir.join("receiver.toml"))
        .args(["--module", "file"])
        .arg(&dest));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(
        err.matches("cannot write: ").count(),
        1,
        "said once:\n{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("the restore stopped"), "{err}");
    let present = whole_files(&roomy, &dest);
    assert!(present < 64, "{present} files in a 1 MiB DEST");
}

/// A module's filesystem gone read-only under a running receiver (as ext4 does on errors):
/// every write is refused, and the receiver says so once, as for a full disk.
#[test]
fn a_module_gone_read_only_is_said_once() {
    let site = Site::new();
    let src = site.dir("src");
    let dst = site.path("dst");
    let _disk = Mount::tmpfs(&dst, "8m");
    for i in 0..40 {
        fs::write(src.join(format!("f{i:02}")), pseudo_random(4096, i)).unwrap();
    }
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    site.write_config(&one_group(&backup, &src, ""));
    let o = run(std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&dst));
    assert!(o.status.success(), "remount read-only: {}", stderr(&o));
    let o = site.send_once(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    let log = backup_log(&backup);
    let said = log.lines().filter(|l| l.contains("cannot write: ")).count();
    assert_eq!(said, 1, "{log}");
    assert!(!log.contains("request failed"), "{log}");
    assert!(summary_value(&site.stats(), "unwritable") >= 40);
}
