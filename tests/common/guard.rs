//! The live mass-delete scenario both transports are held to.

use super::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits (`secs` at most) until `path` exists.
pub fn wait_exists(path: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never arrived",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A live `rm -rf` of 90% of a 2,020-entry tree (18 of its 20 directories) under a running
/// sender whose configuration is `body` (one group `file`, `delete_guard_min = 500`, pushing
/// `src` to a module without history behind `dst`): the transport deletes up to the guard's
/// 50% and holds the rest, and says so once, naming the release; new files still arrive while
/// it holds; `ferry confirm-deletes file` releases them without a restart.
pub fn live_rm_rf_of_90_percent_is_held(site: &Site, src: &Path, dst: &Path, body: &str) {
    fill_tree(src, 20, 100, |i| format!("{i}\n").into_bytes());
    site.write_config(body);
    let mut daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    daemon.wait_log_n("reconciled", 1, 60);
    let entries = |p: &Path| count_entries(p, true);
    assert_eq!(entries(dst), 2020);
    for d in 0..18 {
        fs::remove_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (_, v) = site.status();
        if !v["targets"][0]["held_why"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "deletions never held: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let target = &status["targets"][0];
    assert_eq!(
        target["state"], "connected",
        "only deletions wait: {status}"
    );
    // Replication goes on while the deletions wait.
    fs::create_dir(src.join("new")).unwrap();
    fs::write(src.join("new/after"), b"written while held").unwrap();
    wait_exists(&dst.join("new/after"), 30);
    site.wait_settled_or_holding(30);
    let left = entries(dst);
    eprintln!(
        "{} of 2020 entries deleted before the guard held",
        2022 - left
    );
    let deleted = 2022 - left;
    assert!(
        deleted < 1010,
        "the guard's share (50%) was crossed: {left} of 2022 entries left"
    );
    // Deleted up to the rule: what was held would have crossed it, and nothing held takes
    // more than one directory (101 entries).
    assert!(
        deleted > 1009 - 101,
        "held far short of the rule: {deleted} of 2020 deleted"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("ferry confirm-deletes file").count(),
        1,
        "said once: {log}"
    );
    // The target is named by its name in every line, never by its address in some.
    assert!(
        !log.contains("target=127.") && !log.contains("target=\"127."),
        "{log}"
    );
    let (code, _) = site.status();
    assert_eq!(code, 1, "held deletions are not in step");
    // The operator releases them, live.
    let o = run(ferry()
        .args(["confirm-deletes", "file", "--config"])
        .arg(site.config()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("deletions confirmed"), "{}", stdout(&o));
    site.wait_settled(60);
    assert_eq!(entries(dst), 204, "the 202 left and the 2 new");
    assert!(
        daemon.log().contains("the operator confirmed"),
        "{}",
        daemon.log()
    );
    assert!(daemon.stop().success());
}
