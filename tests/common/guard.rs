//! The live mass-delete scenario both transports are held to.

use super::*;
use std::fs;
use std::path::Path;

/// A live `rm -rf` of 90% of a 2,020-entry tree (18 of its 20 directories) under a running
/// sender whose configuration is `body` (one group `file`, `delete_guard_min = 500`, pushing
/// `src` to the module behind `dst`): the target stops with less than the guard's 50%
/// deleted, says so once naming the confirmation, and `send --once --confirm-deletes`
/// finishes the job. `dst_entries` counts the module's entries (below its root).
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
    daemon.wait_log_n("target stopped", 1, 60);
    // The worker has returned: nothing deletes on the target from here on.
    site.wait_state("stopped", 10);
    let log = daemon.log();
    assert!(log.contains("--confirm-deletes file"), "{log}");
    assert_eq!(log.matches("target stopped").count(), 1, "said once: {log}");
    let left = entries(dst);
    eprintln!(
        "{} of 2020 entries deleted before the target stopped",
        2020 - left
    );
    assert!(
        2020 - left < 1010,
        "the guard's share (50%) was crossed: {left} of 2020 entries left"
    );
    assert!(daemon.stop().success());
    let o = site.send_once(&["--confirm-deletes", "file"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(entries(dst), 202);
}
