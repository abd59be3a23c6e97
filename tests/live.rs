//! The live sender daemon end to end: real `ferry send` and `ferry receive` processes, real
//! TLS on 127.0.0.1, changes made while it runs and checked after they propagate.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One group, one target: the usual set-up.
fn simple(watcher: &str, extra: &str) -> (Site, Backup, PathBuf, PathBuf, Daemon) {
    let live = Site::watching(watcher);
    let src = live.dir("src");
    let dst = live.root().join("dst");
    let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
    let daemon = live.run(&one_group(&backup, &src, extra), 1);
    (live, backup, src, dst, daemon)
}

fn stat(live: &Site, key: &str) -> u64 {
    summary_value(&live.stats(), key)
}

on_each_watcher! {
    fn guide_walkthrough_live(watcher) {
        let (_live, _backup, src, dst, mut daemon) = simple(watcher, "");
        type Step = Box<dyn Fn(&Path)>;
        let steps: Vec<(&str, Step)> = vec![
            (
                "mkdir test",
                Box::new(|s| fs::create_dir(s.join("test")).unwrap()),
            ),
            (
                "echo a > a",
                Box::new(|s| fs::write(s.join("a"), "a\n").unwrap()),
            ),
            (
                "ln -s a a.link",
                Box::new(|s| symlink("a", s.join("a.link")).unwrap()),
            ),
            ("chmod a+w a", Box::new(|s| set_mode(&s.join("a"), 0o666))),
            (
                "rm -f a",
                Box::new(|s| fs::remove_file(s.join("a")).unwrap()),
            ),
            (
                "rm -f a.link",
                Box::new(|s| fs::remove_file(s.join("a.link")).unwrap()),
            ),
            (
                "rm -rf test",
                Box::new(|s| fs::remove_dir_all(s.join("test")).unwrap()),
            ),
        ];
        for (what, step) in steps {
            step(&src);
            wait_equal(&src, &dst, 20, what);
        }
        assert!(daemon.stop().success(), "{}", daemon.log());
    }
}

on_each_watcher! {
    fn mkdir_p_then_write_arrives_complete(watcher) {
        let (_live, _backup, src, dst, _daemon) = simple(watcher, "");
        for i in 0..20 {
            let deep = src.join(format!("a{i}/b/c/d"));
            fs::create_dir_all(&deep).unwrap();
            fs::write(deep.join("f"), format!("x{i}")).unwrap();
            fs::write(src.join(format!("a{i}/b/g")), "y").unwrap();
        }
        wait_equal(&src, &dst, 20, "mkdir -p");
    }
}

on_each_watcher! {
    fn directory_rename_is_one_operation(watcher) {
        let (live, _backup, src, dst, _daemon) = simple(watcher, "");
        let big = src.join("big");
        fs::create_dir(&big).unwrap();
        for i in 0..1000 {
            fs::write(big.join(format!("f{i:04}")), format!("file {i}\n")).unwrap();
        }
        wait_equal(&src, &dst, 30, "1,000 files");
        let before = live.stats();
        fs::rename(&big, src.join("moved")).unwrap();
        wait_equal(&src, &dst, 20, "rename");
        let after = live.stats();
        let delta = |k: &str| summary_value(&after, k) - summary_value(&before, k);
        assert_eq!(delta("renames"), 1, "{before}\n{after}");
        assert_eq!(
            delta("files"),
            0,
            "no file content may travel: {before}\n{after}"
        );
        assert_eq!(delta("deletes"), 0, "{before}\n{after}");
    }
}

on_each_watcher! {
    fn file_rename_is_a_rename_and_moves_in_and_out_are_creates_and_deletes(watcher) {
        let (live, _backup, src, dst, _daemon) = simple(watcher, "");
        let outside = live.dir("outside");
        fs::write(src.join("doc"), pseudo_random(200_000, 1)).unwrap();
        fs::create_dir_all(src.join("leaving/sub")).unwrap();
        fs::write(src.join("leaving/sub/x"), "x").unwrap();
        wait_equal(&src, &dst, 20, "initial files");
        let before = live.stats();
        fs::rename(src.join("doc"), src.join("doc.renamed")).unwrap();
        wait_equal(&src, &dst, 20, "file rename");
        let after = live.stats();
        assert_eq!(
            summary_value(&after, "renames") - summary_value(&before, "renames"),
            1
        );
        assert_eq!(
            summary_value(&after, "files"),
            summary_value(&before, "files")
        );

        // Moved out: deleted on the receiver.
        fs::rename(src.join("leaving"), outside.join("leaving")).unwrap();
        wait_equal(&src, &dst, 20, "move out");
        // Moved in (a directory with contents the watcher never saw): created whole.
        fs::create_dir_all(outside.join("arriving/deep")).unwrap();
        fs::write(outside.join("arriving/deep/y"), "y").unwrap();
        fs::rename(outside.join("arriving"), src.join("arriving")).unwrap();
        fs::write(outside.join("single"), "s").unwrap();
        fs::rename(outside.join("single"), src.join("single")).unwrap();
        wait_equal(&src, &dst, 20, "move in");
        assert!(dst.join("arriving/deep/y").exists());
    }
}

on_each_watcher! {
    fn chmod_and_touch_send_metadata_not_content(watcher) {
        let (live, _backup, src, dst, _daemon) = simple(watcher, "");
        let f = src.join("data");
        fs::write(&f, pseudo_random(100_000, 2)).unwrap();
        wait_equal(&src, &dst, 20, "initial");
        let before = live.stats();
        // The commands operators type, not library calls: their events are what matter.
        let sh = |cmd: &str| {
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .arg("sh")
                .arg(&f)
                .status()
                .unwrap();
            assert!(st.success(), "{cmd}");
        };
        sh("chmod 600 \"$1\"");
        wait_equal(&src, &dst, 20, "chmod");
        sh("touch \"$1\"");
        wait_equal(&src, &dst, 20, "touch");
        sh("touch -d @1500000000.123456789 \"$1\"");
        wait_equal(&src, &dst, 20, "touch -d");
        sh("chown \"$(id -u):$(id -g)\" \"$1\"");
        wait_equal(&src, &dst, 20, "chown");
        let after = live.stats();
        assert_eq!(
            summary_value(&after, "files"),
            summary_value(&before, "files"),
            "content was sent: {before}\n{after}\n{}",
            _daemon.log()
        );
        assert!(summary_value(&after, "set_meta") > summary_value(&before, "set_meta"));
    }
}

on_each_watcher! {
    fn growing_log_converges_and_coalesces(watcher) {
        let (live, _backup, src, dst, _daemon) = simple(watcher, "settle_ms = 50\nmax_delay_ms = 300\n");
        let before = stat(&live, "files");
        let path = src.join("app.out");
        let mut writes = 0;
        let started = Instant::now();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        while started.elapsed() < Duration::from_secs(1) {
            use std::io::Write;
            writeln!(f, "line {writes} {}", "x".repeat(100)).unwrap();
            writes += 1;
            std::thread::sleep(Duration::from_millis(3));
        }
        drop(f);
        wait_equal(&src, &dst, 20, "log");
        let sent = stat(&live, "files") - before;
        assert!(
            sent >= 2,
            "a file written for 1 s with max_delay 300 ms is sent along the way"
        );
        assert!(
            sent * 4 < writes,
            "{writes} appends became {sent} transfers: not coalesced"
        );
    }
}

on_each_watcher! {
    fn burst_of_20000_files_converges_exactly(watcher) {
        let (_live, _backup, src, dst, _daemon) = simple(watcher, "");
        for d in 0..20 {
            let dir = src.join(format!("d{d:02}"));
            fs::create_dir(&dir).unwrap();
            for i in 0..1000 {
                fs::write(dir.join(format!("f{i:04}")), format!("{d}/{i}\n")).unwrap();
            }
        }
        wait_equal(&src, &dst, 120, "20,000 files");
    }
}

on_each_watcher! {
    fn excludes_apply_to_events_and_scans(watcher) {
        let live = Site::watching(watcher);
        let src = live.dir("src");
        let dst = live.root().join("dst");
        fs::create_dir_all(src.join("tmp")).unwrap();
        fs::write(src.join("tmp/scanned"), "no").unwrap();
        fs::write(src.join("old.log"), "no").unwrap();
        fs::write(src.join("keep"), "yes").unwrap();
        let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
        let body = format!(
            "{}{}",
            backup.target("backup"),
            sync(
                "file",
                &src,
                &["backup"],
                "file",
                "exclude = [\"tmp/\", \"*.log\"]"
            )
        );
        let _d = live.run(&body, 1);
        fs::write(src.join("tmp/live"), "no").unwrap();
        fs::write(src.join("new.log"), "no").unwrap();
        fs::create_dir_all(src.join("sub/tmp")).unwrap();
        fs::write(src.join("sub/tmp/x"), "no").unwrap();
        fs::write(src.join("sub/kept"), "yes").unwrap();
        // An editor's save: write an excluded name, rename it to an included one.
        fs::write(src.join("doc.log"), "saved").unwrap();
        fs::rename(src.join("doc.log"), src.join("doc")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(dst.join("sub/kept").exists() && dst.join("doc").exists()) {
            assert!(Instant::now() < deadline, "included files did not arrive");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The excluded changes were made before the ones that arrived: once the sender owes
        // nothing, it has dealt with them all.
        live.wait_settled(20);
        assert_eq!(fs::read_to_string(dst.join("keep")).unwrap(), "yes");
        assert_eq!(fs::read_to_string(dst.join("doc")).unwrap(), "saved");
        for gone in ["tmp", "old.log", "new.log", "sub/tmp", "doc.log"] {
            assert!(!dst.join(gone).exists(), "{gone} is excluded but arrived");
        }
    }
}

on_each_watcher! {
    fn two_groups_stay_separate(watcher) {
        let live = Site::watching(watcher);
        let (a, b) = (live.dir("a"), live.dir("b"));
        let (da, db) = (live.root().join("da"), live.root().join("db"));
        let backup = Backup::start(
            live.root(),
            "recv",
            &[("file", &da), ("code", &db)],
            &live.fingerprint,
        );
        let body = format!(
            "{}{}{}",
            backup.target("backup"),
            sync("file", &a, &["backup"], "file", ""),
            sync("code", &b, &["backup"], "code", "")
        );
        let _d = live.run(&body, 2);
        fs::write(a.join("in-a"), "a").unwrap();
        fs::create_dir(b.join("in-b")).unwrap();
        fs::write(b.join("in-b/f"), "b").unwrap();
        wait_equal(&a, &da, 20, "group file");
        wait_equal(&b, &db, 20, "group code");
        assert!(!db.join("in-a").exists() && !da.join("in-b").exists());
    }
}

on_each_watcher! {
    fn fan_out_survives_a_stopped_target(watcher) {
        let live = Site::watching(watcher);
        let src = live.dir("src");
        let (d1, d2) = (live.root().join("d1"), live.root().join("d2"));
        let one = Backup::start(live.root(), "one", &[("file", &d1)], &live.fingerprint);
        let mut two = Backup::start(live.root(), "two", &[("file", &d2)], &live.fingerprint);
        let body = format!(
            "{}{}{}",
            one.target("one"),
            two.target("two"),
            sync("file", &src, &["one", "two"], "file", "")
        );
        let daemon = live.run(&body, 2);
        two.stop();
        // While `two` is down, `one` keeps up on its own.
        fs::create_dir(src.join("dir")).unwrap();
        for i in 0..50 {
            fs::write(src.join(format!("dir/f{i}")), format!("{i}")).unwrap();
        }
        fs::write(src.join("renamed-later"), "r").unwrap();
        wait_equal(&src, &d1, 20, "target one while two is down");
        fs::rename(src.join("renamed-later"), src.join("renamed")).unwrap();
        fs::remove_file(src.join("dir/f0")).unwrap();
        wait_equal(&src, &d1, 20, "target one, second round");
        // The worker of `two` noticed at once, loudly (while idle: before the changes came),
        // and kept the changes for when it is back.
        daemon.wait_log_n("connection lost while idle", 1, 10);
        two.restart();
        wait_equal(&src, &d2, 30, "target two after restart");
        wait_equal(&src, &d1, 5, "target one still equal");
    }
}

on_each_watcher! {
    fn receiver_restart_while_sender_runs(watcher) {
        let (live, mut backup, src, dst, mut daemon) = simple(watcher, "");
        fs::write(src.join("before"), "1").unwrap();
        wait_equal(&src, &dst, 20, "before restart");
        backup.stop();
        fs::write(src.join("during"), "2").unwrap();
        fs::create_dir_all(src.join("new/dir")).unwrap();
        fs::write(src.join("new/dir/f"), "3").unwrap();
        // The sender has tried and found the receiver gone.
        live.wait_state("retrying", 20);
        backup.restart();
        wait_equal(&src, &dst, 30, "after restart");
        fs::write(src.join("after"), "4").unwrap();
        wait_equal(&src, &dst, 20, "after restart, new change");
        let status = daemon.stop();
        assert!(status.success(), "exit {status}: {}", daemon.log());
    }
}

on_each_watcher! {
    fn changes_during_start_up_are_not_lost(watcher) {
        let live = Site::watching(watcher);
        let src = live.dir("src");
        let dst = live.root().join("dst");
        for d in 0..50 {
            fs::create_dir(src.join(format!("d{d}"))).unwrap();
            for i in 0..40 {
                fs::write(src.join(format!("d{d}/f{i}")), "old").unwrap();
            }
        }
        let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
        live.write_config(&one_group(&backup, &src, ""));
        let daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(live.config()));
        daemon.wait_log_n("watches in place", 1, 30);
        // The reconcile is under way or about to start: change things it may or may not see.
        for d in 0..50 {
            fs::write(src.join(format!("d{d}/f0")), "new").unwrap();
            fs::write(src.join(format!("d{d}/added")), "added").unwrap();
        }
        fs::remove_dir_all(src.join("d7")).unwrap();
        wait_equal(&src, &dst, 30, "changes during start-up");
    }
}

on_each_watcher! {
    fn kernel_queue_overflow_triggers_a_rescan_that_loses_nothing(watcher) {
        let (_live, _backup, src, dst, daemon) = simple(watcher, "");
        let sysctl = format!("/proc/sys/fs/{watcher}/max_queued_events");
        let max: usize = fs::read_to_string(&sysctl)
            .unwrap_or_else(|e| panic!("{sysctl}: {e}"))
            .trim()
            .parse()
            .unwrap();
        assert!(
            max <= 1 << 20,
            "max_queued_events is {max}: too large to overflow in a test"
        );
        // Freeze the sender so the kernel queue fills, then change more than it holds (one
        // event per new file at least: fanotify merges a file's create, modify and close-write).
        fs::create_dir(src.join("flood")).unwrap();
        wait_equal(&src, &dst, 20, "flood directory watched");
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGSTOP) };
        for i in 0..max + 500 {
            fs::write(src.join(format!("flood/f{i}")), format!("{i}")).unwrap();
        }
        fs::create_dir_all(src.join("late/deep")).unwrap();
        fs::write(src.join("late/deep/x"), "x").unwrap();
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGCONT) };
        daemon.wait_log_n("kernel event queue overflowed", 1, 30);
        assert!(daemon.log().contains(&format!("fs.{watcher}.max_queued_events")));
        wait_equal(&src, &dst, 60, "after overflow");
        // Watching still works afterwards, including in directories created during the gap.
        fs::write(src.join("late/deep/y"), "y").unwrap();
        wait_equal(&src, &dst, 20, "after overflow, new change");
    }
}

#[test]
fn watch_limit_is_reported_with_the_sysctl_and_the_rest_keeps_working() {
    let live = Site::watching("inotify");
    let src = live.dir("src");
    let dst = live.root().join("dst");
    for d in 0..20 {
        fs::create_dir_all(src.join(format!("d{d:02}/sub"))).unwrap();
        fs::write(src.join(format!("d{d:02}/sub/f")), "f").unwrap();
    }
    let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
    live.write_config(&one_group(&backup, &src, ""));
    // A user namespace of our own has its own inotify watch limit, which we may lower.
    let unshare = std::process::Command::new("unshare")
        .arg("--version")
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert!(unshare.status.success());
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 5 > /proc/sys/user/max_inotify_watches && exec \"$0\" send --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg(live.config())
        .env("FERRY_LOG", "info");
    let daemon = Daemon::spawn(&mut cmd);
    daemon.wait_log_n("reconciled", 1, 60);
    let log = daemon.log();
    assert!(
        log.contains("inotify watch limit reached")
            && log.contains("sysctl -w fs.inotify.max_user_watches="),
        "{log}"
    );
    assert!(log.contains("unwatched="), "{log}");
    // The initial sync is complete, and the watched top directory is still live.
    wait_equal(&src, &dst, 20, "initial sync under the watch limit");
    fs::write(src.join("top-level"), "live").unwrap();
    wait_equal(&src, &dst, 20, "live change in a watched directory");
}

/// fanotify marks each filesystem a source spans: a tmpfs mounted inside the source is
/// followed like the rest.
#[test]
fn fanotify_follows_a_filesystem_mounted_inside_the_source() {
    let live = Site::watching("fanotify");
    let (src, dst) = (live.dir("src"), live.path("dst"));
    let _tmpfs = Mount::tmpfs(&src.join("scratch"), "8m");
    fs::write(src.join("scratch/before"), "before").unwrap();
    let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
    let mut d = live.run(&one_group(&backup, &src, ""), 1);
    wait_equal(&src, &dst, 20, "initial");
    fs::write(src.join("scratch/after"), "on the tmpfs").unwrap();
    fs::create_dir_all(src.join("scratch/a/b")).unwrap();
    fs::write(src.join("scratch/a/b/c"), "deep on the tmpfs").unwrap();
    fs::write(src.join("beside"), "on the source's own filesystem").unwrap();
    wait_equal(&src, &dst, 20, "changes on both filesystems");
    assert!(!d.log().contains("cannot watch"), "{}", d.log());
    assert!(d.stop().success());
}

/// A source reached through a bind mount: events are resolved through the path configured,
/// and changes made through the other name arrive too.
#[test]
fn fanotify_follows_a_source_reached_through_a_bind_mount() {
    let live = Site::watching("fanotify");
    let real = live.dir("real/data");
    let src = live.path("bound");
    let _bind = Mount::bind(&real, &src);
    let dst = live.path("dst");
    let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
    let mut d = live.run(&one_group(&backup, &src, ""), 1);
    fs::write(src.join("through-bind"), "1").unwrap();
    fs::create_dir_all(real.join("x/y")).unwrap();
    fs::write(real.join("x/y/through-real"), "2").unwrap();
    fs::write(live.path("real/outside"), "not in the source").unwrap();
    wait_equal(&src, &dst, 20, "through both names");
    assert!(!dst.join("outside").exists());
    assert!(d.stop().success());
}

/// Without CAP_SYS_ADMIN, `auto` says once why it falls back to inotify and works;
/// `fanotify` refuses to start, saying why.
#[test]
fn without_cap_sys_admin_auto_falls_back_to_inotify_and_fanotify_refuses() {
    let live = Site::new();
    let (src, dst, backup) = live.one_backup();
    let without = |watcher: &str| {
        live.write_config(&format!(
            "watcher = {watcher:?}\n{}",
            one_group(&backup, &src, "")
        ));
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"])
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(["send", "--config"])
            .arg(live.config());
        cmd
    };
    let d = Daemon::spawn(&mut without("auto"));
    d.wait_log_n("reconciled", 1, 30);
    let log = d.log();
    assert_eq!(log.matches("watching sources with").count(), 1, "{log}");
    assert!(
        log.contains("watching sources with inotify (fanotify needs CAP_SYS_ADMIN"),
        "{log}"
    );
    fs::write(src.join("f"), "followed by inotify").unwrap();
    wait_equal(&src, &dst, 20, "inotify fallback");
    drop(d);
    let o = run(&mut without("fanotify"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("watcher = \"fanotify\": fanotify needs CAP_SYS_ADMIN"),
        "{}",
        stderr(&o)
    );
}

on_each_watcher! {
    /// A sparse file (a hole in the middle and one at the end) arrives with its holes, live
    /// and with `send --once`, costing its data on the wire and on the receiver's disk.
    fn sparse_files_arrive_sparse_live_and_once(watcher) {
        let (live, _backup, src, dst, mut daemon) = simple(watcher, "");
        let data = pseudo_random(1 << 20, 3);
        let held = write_sparse(&src.join("vm.img"), 256 << 20, &data, &[0, 100 << 20]);
        wait_equal(&src, &dst, 30, "sparse file, live");
        assert!(
            allocated(&dst.join("vm.img")) <= held + (1 << 20),
            "{} bytes allocated on the receiver for {held} bytes of data",
            allocated(&dst.join("vm.img"))
        );
        assert!(daemon.stop().success());
        // Rewritten while the daemon is down: send --once sends the data, not the size.
        let held = write_sparse(&src.join("vm.img"), 512 << 20, &data, &[50 << 20, 300 << 20]);
        let o = live.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let payload = summary_value(&stdout(&o), "payload_bytes");
        assert!(payload <= held + 4096, "{payload} payload bytes for {held} of data");
        assert_eq!(fs::read(src.join("vm.img")).unwrap(), fs::read(dst.join("vm.img")).unwrap());
        assert!(allocated(&dst.join("vm.img")) <= held + (1 << 20));
    }
}
