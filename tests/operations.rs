//! Operating the daemons: `ferry status`, the metrics endpoint, and reloads on SIGHUP.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// `ferry status --socket SOCKET --json`: the exit code and the parsed answer.
fn status(socket: &Path) -> (i32, Value) {
    let o = run(ferry().args(["status", "--json", "--socket"]).arg(socket));
    let code = o.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "status exit {code}: {}", stderr(&o));
    (
        code,
        serde_json::from_str(&stdout(&o)).expect("status JSON"),
    )
}

/// The one pair of a single-target status answer.
fn pair(v: &Value, sync: &str) -> Value {
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["sync"] == sync)
        .unwrap_or_else(|| panic!("no pair of sync {sync} in {v}"))
        .clone()
}

/// Polls `status` until `ok` holds for `sync`'s pair (30 s at most).
fn wait_status(socket: &Path, sync: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = status(socket);
        let p = pair(&v, sync);
        if ok(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "never {what}: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /metrics` on `port`: the samples, as (name with labels, value).
fn scrape(port: u16) -> Vec<(String, f64)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_string(), value.parse().expect("sample value"))
        })
        .collect()
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {samples:?}"))
        .1
}

#[test]
fn status_and_metrics_show_a_stopped_target_falling_behind_and_catching_up() {
    let site = Site::new();
    let (src, dst, mut backup) = site.one_backup();
    fs::write(src.join("first"), b"1").unwrap();
    let metrics = free_port();
    let socket = site.path("send/status.sock");
    let mut d = site.run(
        &format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n{}",
            one_group(&backup, &src, "")
        ),
        1,
    );
    let p = wait_status(&socket, "file", "in step", |p| {
        p["state"] == "connected" && p["reconciled"] == true && p["pending"] == 0
    });
    assert_eq!(p["target"], "backup");
    assert_eq!(status(&socket).0, 0, "in step exits 0");
    let l = "{sync=\"file\",target=\"backup\"}";
    let m = scrape(metrics);
    assert_eq!(sample(&m, &format!("ferry_sender_lag_seconds{l}")), 0.0);
    assert_eq!(sample(&m, &format!("ferry_sender_pending_changes{l}")), 0.0);
    assert_eq!(sample(&m, &format!("ferry_sender_reconciled{l}")), 1.0);
    assert!(sample(&m, &format!("ferry_sender_files_total{l}")) >= 1.0);

    backup.stop();
    fs::write(src.join("second"), b"2").unwrap();
    fs::write(src.join("third"), b"3").unwrap();
    let behind = wait_status(&socket, "file", "retrying with 2 pending", |p| {
        p["state"] == "retrying" && p["pending"].as_u64() >= Some(2)
    });
    assert!(
        behind["last_error"].as_str().unwrap().contains("connect"),
        "{behind}"
    );
    let (code, _) = status(&socket);
    assert_eq!(code, 1, "a target behind exits 1");
    let lag1 = behind["lag_seconds"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let m = scrape(metrics);
    let lag2 = sample(&m, &format!("ferry_sender_lag_seconds{l}"));
    assert!(lag2 >= lag1 + 1.0, "lag did not grow: {lag1} then {lag2}");
    assert!(sample(&m, &format!("ferry_sender_pending_changes{l}")) >= 2.0);
    let state = |s: &str| {
        format!("ferry_sender_target_state{{sync=\"file\",target=\"backup\",state=\"{s}\"}}")
    };
    assert_eq!(sample(&m, &state("retrying")), 1.0);
    assert_eq!(sample(&m, &state("connected")), 0.0);
    // The human form says the same.
    let o = run(ferry().args(["status", "--socket"]).arg(&socket));
    let text = stdout(&o);
    assert!(
        text.contains("file → backup") && text.contains("retrying"),
        "{text}"
    );

    backup.restart();
    wait_status(&socket, "file", "caught up", |p| {
        p["state"] == "connected" && p["pending"] == 0
    });
    assert_eq!(fs::read(dst.join("third")).unwrap(), b"3");
    let m = scrape(metrics);
    assert_eq!(sample(&m, &format!("ferry_sender_lag_seconds{l}")), 0.0);
    assert_eq!(sample(&m, &state("connected")), 1.0);
    assert!(sample(&m, &format!("ferry_sender_files_total{l}")) >= 3.0);
    assert_eq!(status(&socket).0, 0);
    assert!(d.stop().success());
    assert!(!socket.exists(), "the status socket is removed at exit");
}

#[test]
fn the_status_socket_is_for_the_daemons_user_only() {
    let site = Site::new();
    let (src, _dst, backup) = site.one_backup();
    let mut d = site.run(&one_group(&backup, &src, ""), 1);
    let socket = site.path("send/status.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Even when the file lets anyone connect, another user is closed on without an answer
    // (the tests run as root; `nobody` asks).
    for dir in [site.root(), &site.path("send")] {
        set_mode(dir, 0o755);
    }
    set_mode(&socket, 0o666);
    let o = run(std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .args(["status", "--socket"])
        .arg(&socket));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("closed without an answer"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    // A second sender on the same socket is told, and the first keeps answering.
    let mut second = Proc::spawn(ferry().args(["send", "--config"]).arg(site.config()));
    assert!(
        second.wait_log("another ferry sender answers there"),
        "{}",
        second.log()
    );
    assert!(second.stop().success());
    assert_eq!(status(&socket).0, 0);
    assert!(d.stop().success());
}

#[test]
fn the_receiver_serves_its_counters_as_metrics() {
    let site = Site::new();
    let (src, _dst, mut backup) = site.one_backup();
    let metrics = free_port();
    let config = backup.dir.join("receiver.toml");
    let text = fs::read_to_string(&config).unwrap();
    let history = site.path("history").display().to_string();
    fs::write(
        &config,
        format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n{text}history = {history:?}\n{ANY_FREE_SPACE}"
        ),
    )
    .unwrap();
    backup.stop();
    backup.restart();
    for i in 0..5 {
        fs::write(src.join(format!("f{i}")), b"x").unwrap();
    }
    site.write_config(&one_group(&backup, &src, ""));
    assert!(site.send_once(&[]).status.success());
    // The client is gone once `send --once` returns; the receiver ends its side of the session
    // when it reads that, a moment later (on a loaded machine, visibly later): wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = scrape(metrics);
        if sample(&m, "ferry_receiver_sessions") == 0.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "the session never ended: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(sample(&m, "ferry_receiver_files_total"), 5.0);
    let versions = "ferry_receiver_history_versions{module=\"file\"}";
    // The journal's rows, of one action or all: the root's times are noted once per commit
    // that moves them, and how many commits a send takes is the receiver's business.
    let journal = site.path("history").join("journal.sqlite3");
    let rows = |action: &str| -> f64 {
        let db = rusqlite::Connection::open_with_flags(
            &journal,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        db.query_row(
            "SELECT count(*) FROM versions WHERE ?1 = '' OR action = ?1",
            [action],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as f64
    };
    assert_eq!(rows("created"), 5.0, "each new name noted as created");
    assert_eq!(
        sample(&m, versions),
        rows(""),
        "the metric counts every row"
    );
    for i in 0..3 {
        fs::write(src.join(format!("f{i}")), b"second").unwrap();
    }
    assert!(site.send_once(&[]).status.success());
    assert_eq!(rows("replaced"), 3.0, "and 3 versions replaced");
    assert_eq!(sample(&scrape(metrics), versions), rows(""));
    // Anything else is refused, and a slow or huge request costs nothing lasting.
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    s.write_all(b"GET /secret HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    let mut big = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    let _ = big.write_all(&vec![b'a'; 64 << 10]);
    assert_eq!(sample(&scrape(metrics), "ferry_receiver_files_total"), 8.0);
}

/// Polls until `path` holds `want` (30 s at most).
fn wait_file(path: &Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read(path).ok().as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{} never held {want:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hup(p: &Proc) {
    unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) };
}

#[test]
fn reload_adds_removes_and_changes_groups_without_losing_pending_changes() {
    let site = Site::new();
    let names = ["kept", "gone", "new", "changed"];
    let src: Vec<_> = names
        .iter()
        .map(|n| site.dir(&format!("src-{n}")))
        .collect();
    let dst: Vec<_> = names
        .iter()
        .map(|n| site.path(&format!("dst-{n}")))
        .collect();
    let modules: Vec<(&str, &Path)> = names
        .iter()
        .zip(&dst)
        .map(|(n, d)| (*n, d.as_path()))
        .collect();
    let mut backup = Backup::start(site.root(), "recv", &modules, &site.fingerprint);
    let group = |i: usize, extra: &str| sync(names[i], &src[i], &["backup"], names[i], extra);
    let before = format!(
        "{}{}{}{}",
        backup.target("backup"),
        group(0, ""),
        group(1, ""),
        group(3, "")
    );
    let mut d = site.run(&before, 3);
    let socket = site.path("send/status.sock");
    // Changes made while the target is away are pending in "kept" and "changed".
    backup.stop();
    fs::write(src[0].join("pending"), b"kept while away").unwrap();
    fs::write(src[3].join("pending"), b"changed while away").unwrap();
    fs::write(src[3].join("skip.tmp"), b"excluded after the reload").unwrap();
    fs::write(src[2].join("early"), b"there before the group").unwrap();
    wait_status(&socket, "kept", "pending", |p| {
        p["pending"].as_u64() >= Some(1)
    });

    let after = format!(
        "{}{}{}{}",
        backup.target("backup"),
        group(0, ""),
        group(2, ""),
        group(3, "exclude = [\"*.tmp\"]")
    );
    site.write_config(&after);
    hup(&d);
    d.wait_log_n("configuration reloaded", 1, 30);
    assert!(
        d.log().contains("1 added, 1 changed, 1 removed"),
        "{}",
        d.log()
    );
    let (_, v) = status(&socket);
    let syncs: Vec<&str> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["sync"].as_str().unwrap())
        .collect();
    assert_eq!(syncs, ["changed", "kept", "new"]);
    fs::write(src[1].join("after-removal"), b"must not travel").unwrap();

    backup.restart();
    wait_file(&dst[0].join("pending"), b"kept while away");
    wait_file(&dst[3].join("pending"), b"changed while away");
    wait_file(&dst[2].join("early"), b"there before the group");
    fs::write(src[2].join("live"), b"followed live").unwrap();
    wait_file(&dst[2].join("live"), b"followed live");
    // The removed group is not followed: it has no watcher and no worker (status above lists
    // no pair of it), and every group that runs owes nothing.
    site.wait_settled(30);
    assert!(!dst[1].join("after-removal").exists());
    assert!(
        !dst[3].join("skip.tmp").exists(),
        "the changed excludes apply"
    );
    assert!(d.stop().success());
}

#[test]
fn a_broken_reload_is_refused_and_the_old_configuration_keeps_running() {
    let site = Site::new();
    let (src, dst, backup) = site.one_backup();
    let good = one_group(&backup, &src, "");
    let mut d = site.run(&good, 1);
    // A syntax error, then a group whose source does not exist.
    for (broken, says) in [
        (format!("{good}\n[[sync]\n"), "sender.toml:"),
        (
            format!(
                "{good}{}",
                sync("other", &site.path("missing"), &["backup"], "file", "")
            ),
            "missing",
        ),
    ] {
        site.write_config(&broken);
        let refusals = d.log().matches("reload refused").count();
        hup(&d);
        d.wait_log_n("reload refused", refusals + 1, 30);
        let log = d.log();
        let line = log.lines().rfind(|l| l.contains("reload refused")).unwrap();
        assert!(line.contains(says), "{line}");
    }
    fs::write(src.join("still"), b"followed").unwrap();
    wait_file(&dst.join("still"), b"followed");
    assert!(!d.log().contains("configuration reloaded"));
    assert!(d.stop().success());
}

#[test]
fn a_receiver_reload_serves_a_new_module_and_refuses_a_broken_file() {
    let site = Site::new();
    let (src, _dst, backup) = site.one_backup();
    let config = backup.dir.join("receiver.toml");
    let original = fs::read_to_string(&config).unwrap();
    let extra = site.path("dst-extra");
    fs::create_dir_all(&extra).unwrap();
    site.write_config(&format!(
        "{}{}",
        backup.target("backup"),
        sync("extra", &src, &["backup"], "extra", "")
    ));
    fs::write(src.join("f"), b"x").unwrap();
    let refused = site.send_once(&[]);
    assert!(!refused.status.success(), "an unknown module is refused");

    let recv = backup.receiver.as_ref().unwrap();
    fs::write(&config, format!("{original}[modules.bad\n")).unwrap();
    hup(recv);
    recv.wait_log_n("reload refused", 1, 10);
    assert!(recv.log().contains("receiver.toml:"), "{}", recv.log());
    fs::write(
        &config,
        format!(
            "{original}[modules.extra]\npath = {:?}\nclients = [{:?}]\nread_only = false\n",
            extra.display().to_string(),
            site.fingerprint
        ),
    )
    .unwrap();
    hup(recv);
    recv.wait_log_n("configuration reloaded", 1, 10);
    assert!(
        recv.log().contains("1 modules unchanged, 1 added"),
        "{}",
        recv.log()
    );
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(extra.join("f")).unwrap(), b"x");
}

/// `mirror --once` on a terminal (`script` gives it one): a bar with totals, and log lines
/// that never share a line with it.
#[test]
fn the_initial_sync_shows_a_progress_bar_that_log_lines_do_not_tear() {
    let site = Site::new();
    let src = site.dir("src");
    fill_tree(&src, 20, 10, |i| pseudo_random(100_000 + i, i as u64));
    let command = format!(
        "{} mirror --once {} {}",
        env!("CARGO_BIN_EXE_ferry"),
        src.display(),
        site.path("dst").display()
    );
    let o = run(std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("COLUMNS", "100"));
    assert!(o.status.success(), "{}", stderr(&o));
    let screen = stdout(&o);
    // Every redraw starts a line of its own (`\r` and erase-line); split on them.
    let lines: Vec<&str> = screen.split(['\r', '\n']).collect();
    let bars: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("initial sync [") && l.contains("MiB"))
        .collect();
    assert!(!bars.is_empty(), "no progress bar:\n{screen}");
    // 200 files, 20 directories made, 21 directory times set.
    assert!(
        bars.iter()
            .any(|l| l.contains("19.07 MiB") && l.contains("/241")),
        "no totals: {bars:?}"
    );
    for l in &lines {
        assert!(
            !(l.contains("INFO") && l.contains("initial sync [")),
            "a log line tore the bar: {l:?}"
        );
    }
    // No bar drawn in indicatif's default style before ours (a full bar of `0/0` that stayed
    // in the scrollback), and the progress ends at its total, left as a line of its own.
    assert!(!screen.contains('█'), "a stray default bar:\n{screen}");
    let ends = "ferry: initial sync: 241/241 entries, 19.1 MiB/19.1 MiB";
    assert!(
        lines.iter().any(|l| l.contains(ends)),
        "the progress ended short of its total:\n{screen}"
    );
    assert!(screen.contains("files=200"), "{screen}");
    assert_eq!(fs::read_dir(site.path("dst/d3")).unwrap().count(), 10);
}

/// A target's `bwlimit_kib` caps what it is sent, and only it: with one group pushing 4 MiB
/// to two receivers, the uncapped one has the file while the one capped at 512 KiB/s is
/// still receiving it, and that one's copy takes at least what the cap allows (4 MiB at
/// 512 KiB/s: 8 s, less the cap's 0.25 s burst).
#[test]
fn a_bandwidth_cap_holds_its_target_and_no_other() {
    let site = site::Site::new();
    let src = site.dir("src");
    let (fast_dst, slow_dst) = (site.path("fast"), site.path("slow"));
    let fast = site::Backup::start(
        site.root(),
        "fast",
        &[("file", &fast_dst)],
        &site.fingerprint,
    );
    let slow = site::Backup::start(
        site.root(),
        "slow",
        &[("file", &slow_dst)],
        &site.fingerprint,
    );
    let data = pseudo_random(4 << 20, 21);
    fs::write(src.join("big"), &data).unwrap();
    let config = format!(
        "{}{}bwlimit_kib = 512\n{}",
        fast.target("fast"),
        slow.target("slow"),
        site::sync("file", &src, &["fast", "slow"], "file", "")
    );
    site.write_config(&config);
    let started = Instant::now();
    let daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    let arrived = |dst: &Path| fs::read(dst.join("big")).ok().as_deref() == Some(&data[..]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrived(&fast_dst) {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let fast_took = started.elapsed();
    assert!(
        !arrived(&slow_dst),
        "the capped copy arrived with the uncapped one"
    );
    while !arrived(&slow_dst) {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let slow_took = started.elapsed();
    eprintln!(
        "4 MiB: uncapped in {:.2} s, capped at 512 KiB/s in {:.2} s ({:.0} KiB/s)",
        fast_took.as_secs_f64(),
        slow_took.as_secs_f64(),
        4096.0 / slow_took.as_secs_f64()
    );
    assert!(
        slow_took >= Duration::from_millis(7750),
        "{slow_took:?}: faster than the cap"
    );
}
