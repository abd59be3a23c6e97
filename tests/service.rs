//! Both daemons under a fake systemd: a `NOTIFY_SOCKET` the test reads, `WATCHDOG_USEC`, and
//! `WATCHDOG_PID` set to the daemon's own pid (through `sh -c 'exec …'`), as systemd does for
//! a `Type=notify` unit with `WatchdogSec=`.

mod common;

use common::*;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct FakeSystemd {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        FakeSystemd {
            _dir: dir,
            path,
            sock,
        }
    }

    /// `ferry ARGS` run as the unit's main process, with a watchdog of `watchdog`.
    fn command(&self, args: &[&str], watchdog: Duration) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"WATCHDOG_PID=$$ exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_LOG", "info")
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", watchdog.as_micros().to_string());
        c
    }

    /// The next message, if one arrives within the socket's 50 ms read timeout.
    fn next(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Every message received for `over`.
    fn collect(&self, over: Duration) -> Vec<String> {
        let deadline = Instant::now() + over;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            out.extend(self.next());
        }
        out
    }

    /// Messages until `n` keep-alives have come; panics after `secs`.
    fn keep_alives(&self, n: usize, secs: u64, daemon: &Proc) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        while keep_alives(&seen) < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} keep-alives after {secs} s: {seen:?}; log:\n{}",
                keep_alives(&seen),
                daemon.log()
            );
            seen.extend(self.next());
        }
        seen
    }

    /// Messages until one contains `needle` (that one included); panics after `secs`.
    fn wait_for(&self, needle: &str, secs: u64, daemon: &Proc) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(msg) = self.next() {
                let found = msg.contains(needle);
                seen.push(msg);
                if found {
                    return seen;
                }
            }
        }
        panic!(
            "no {needle:?} after {secs} s; got {seen:?}; log:\n{}",
            daemon.log()
        );
    }
}

fn keep_alives(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

fn receiver_config(dir: &Path, client: &str, module: &Path) -> (PathBuf, u16, String) {
    let fingerprint = keygen(dir);
    let port = free_port();
    let config = dir.join("receiver.toml");
    std::fs::create_dir_all(module).unwrap();
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [modules.file]\npath = {:?}\nclients = [{client:?}]\nread_only = false\n",
            module.display().to_string()
        ),
    )
    .unwrap();
    (config, port, fingerprint)
}

#[test]
fn the_receiver_is_ready_once_it_listens_and_feeds_the_watchdog_until_it_stops() {
    let site = Site::new();
    let (config, port, _) =
        receiver_config(&site.path("recv"), &site.fingerprint, &site.path("dst"));
    let systemd = FakeSystemd::new();
    let mut daemon = Proc::spawn(&mut systemd.command(
        &["receive", "--config", config.to_str().unwrap()],
        Duration::from_secs(1),
    ));
    let first = systemd.wait_for("READY=1", 20, &daemon);
    assert!(
        first
            .last()
            .unwrap()
            .contains("STATUS=listening on 127.0.0.1"),
        "{first:?}"
    );
    // Ready means listening: a connection made at once is accepted.
    TcpStream::connect(("127.0.0.1", port)).expect("connect right after READY=1");
    // WatchdogSec=1: a keep-alive every quarter second while the loops turn. Waited for
    // (five of them), not counted in a fixed window: a loaded machine skips some.
    let later = systemd.keep_alives(5, 20, &daemon);
    assert!(daemon.stop().success());
    let end = systemd.collect(Duration::from_millis(300));
    assert!(
        end.iter().any(|m| m.contains("STOPPING=1"))
            || later.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1: {end:?}"
    );
}

#[test]
fn the_sender_is_ready_once_its_watches_are_in_place_and_says_when_it_converged() {
    let site = Site::new();
    let (src, dst, backup) = site.one_backup();
    std::fs::write(src.join("before"), b"made before the start").unwrap();
    site.write_config(&one_group(&backup, &src, ""));
    let systemd = FakeSystemd::new();
    let daemon = Proc::spawn(&mut systemd.command(
        &["send", "--config", site.config().to_str().unwrap()],
        Duration::from_secs(1),
    ));
    systemd.wait_for("READY=1", 20, &daemon);
    // The log reaches the test through a pipe and a thread, so it is waited for; that READY=1
    // comes after the watches is shown by the file written right after it.
    assert!(
        daemon.wait_log("watches in place"),
        "no watches:\n{}",
        daemon.log()
    );
    // Ready means watched: a file made right now is sent, whatever the reconcile is doing.
    std::fs::write(src.join("after"), b"made right after READY=1").unwrap();
    let msgs = systemd.wait_for("STATUS=every target reconciled", 30, &daemon);
    let more = 5usize.saturating_sub(keep_alives(&msgs));
    systemd.keep_alives(more, 20, &daemon);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(dst.join("after").exists() && dst.join("before").exists()) {
        assert!(Instant::now() < deadline, "not sent:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A reload is announced (RELOADING=1 with the monotonic time), then ready again.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let msgs = systemd.wait_for("RELOADING=1", 10, &daemon);
    assert!(msgs.last().unwrap().contains("MONOTONIC_USEC="), "{msgs:?}");
    let msgs = systemd.wait_for("READY=1", 10, &daemon);
    assert!(
        msgs.last()
            .unwrap()
            .contains("STATUS=reloaded: 1 groups running"),
        "{msgs:?}"
    );
}

/// Under journald (`JOURNAL_STREAM` naming stderr), lines carry the syslog priority and no
/// time stamp of ours; elsewhere they keep the human format.
#[test]
fn under_journald_logs_carry_priorities_and_no_time_stamps() {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let (config, _, _) = receiver_config(&site.path("recv"), &site.fingerprint, &site.path("dst"));
    // A key readable by others: the receiver warns at start-up.
    set_mode(&site.path("recv/key.pem"), 0o644);
    let run = |journal: bool| {
        let log = site.path(if journal { "journal.log" } else { "plain.log" });
        let file = std::fs::File::create(&log).unwrap();
        let md = file.metadata().unwrap();
        let mut cmd = ferry();
        cmd.args(["receive", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(file);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()));
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("receiver listening")
        {
            assert!(Instant::now() < deadline, "no start-up line");
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
        std::fs::read_to_string(&log).unwrap()
    };
    let journal = run(true);
    let warn = journal
        .lines()
        .find(|l| l.contains("readable by others"))
        .unwrap();
    assert!(warn.starts_with("<4>"), "{journal}");
    let listening = journal
        .lines()
        .find(|l| l.contains("receiver listening"))
        .unwrap();
    assert!(listening.starts_with("<6>receiver listening"), "{journal}");
    assert!(journal.lines().all(|l| l.starts_with('<')), "{journal}");
    assert!(!journal.contains("INFO"), "{journal}");
    let plain = run(false);
    let listening = plain
        .lines()
        .find(|l| l.contains("receiver listening"))
        .unwrap();
    assert!(
        listening.starts_with("20") && listening.contains("INFO"),
        "{plain}"
    );
}

#[test]
fn quiet_leaves_only_warnings_and_errors() {
    let site = Site::new();
    let (src, dst, backup) = site.one_backup();
    std::fs::write(src.join("a"), b"a").unwrap();
    site.write_config(&one_group(&backup, &src, ""));
    let out = run(ferry()
        .env_remove("FERRY_LOG")
        .args(["-q", "send", "--once", "--config"])
        .arg(site.config()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"a");
    assert!(!stderr(&out).contains("INFO"), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("files=1"),
        "the summary is output, not a log line"
    );
}

#[test]
fn check_config_names_file_line_and_key_for_either_kind() {
    let site = Site::new();
    let (config, _, _) = receiver_config(
        &site.path("other"),
        &site.fingerprint,
        &site.path("other-dst"),
    );
    let check = |file: &Path| run(ferry().arg("check-config").arg(file));
    let ok = check(&config);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("receiver configuration, 1 module: OK"));
    assert!(!stdout(&ok).contains("warning"), "{}", stdout(&ok));
    // A module nobody can use (an `import rsyncd` without --client): valid, and said.
    let text = std::fs::read_to_string(&config).unwrap();
    let nobody = config.with_file_name("nobody.toml");
    let emptied: String = text
        .lines()
        .map(|l| {
            if l.starts_with("clients") {
                "clients = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&nobody, emptied).unwrap();
    let o = check(&nobody);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("warning: modules.") && stdout(&o).contains("clients is empty"),
        "{}",
        stdout(&o)
    );

    let (src, _, backup) = site.one_backup();
    site.write_config(&one_group(&backup, &src, ""));
    let ok = check(&site.config());
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("sender configuration, 1 sync group, 1 target: OK"));

    // A semantic error: the line of the key.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("127.0.0.1:", "localhost-")).unwrap();
    let bad = check(&config);
    assert_eq!(bad.status.code(), Some(2));
    let at = format!("{}:1: listen: invalid address", config.display());
    assert!(stderr(&bad).contains(&at), "{}", stderr(&bad));
    // An unknown target in the sender's third line of its group.
    let text = std::fs::read_to_string(site.config()).unwrap();
    std::fs::write(
        site.config(),
        text.replace("targets = [\"backup\"]", "targets = [\"typo\"]"),
    )
    .unwrap();
    let bad = check(&site.config());
    assert_eq!(bad.status.code(), Some(2));
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("targets = "))
        .unwrap();
    let at = format!(
        "{}:{line}: sync[0] (file).targets: unknown target \"typo\"",
        site.config().display()
    );
    assert!(stderr(&bad).contains(&at), "{}", stderr(&bad));
    assert_eq!(
        stderr(&bad).matches("unknown target").count(),
        1,
        "said once"
    );
    // Neither kind.
    std::fs::write(site.path("other.toml"), "colour = 1\n").unwrap();
    let bad = check(&site.path("other.toml"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("neither a sender.toml"),
        "{}",
        stderr(&bad)
    );
}

/// The units in `deploy/` are valid for systemd and score in `systemd-analyze security`
/// exactly what README.md says they score (it once said 2.0 for a sender that scored 2.4).
/// systemd finds an unqualified `ferry` in /usr/local/bin or /usr/bin; the copies verified
/// here name the binary under test instead.
#[test]
fn the_units_verify_and_score_what_the_readme_says() {
    let bin = env!("CARGO_BIN_EXE_ferry");
    let tmp = tempfile::tempdir().unwrap();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let words: Vec<&str> = readme.split_whitespace().collect();
    let documented = |who: &str| -> String {
        let at = words
            .windows(4)
            .position(|w| w[0] == "`systemd-analyze" && w[1] == "security`" && w[2] == "scores")
            .expect("README.md gives the units' scores");
        let after = &words[at..at + 12];
        let i = after
            .iter()
            .position(|w| *w == who)
            .unwrap_or_else(|| panic!("no {who} score in {after:?}"));
        after[i + 1].trim_end_matches([',', '.', ')']).to_string()
    };
    for (name, who) in [
        ("ferry-receiver.service", "receiver"),
        ("ferry-sender.service", "sender"),
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy")
                .join(name),
        )
        .unwrap();
        let ours = format!("={bin} ");
        let text: String = text
            .lines()
            .map(
                |l| match l.starts_with("ExecStart") || l.starts_with("ExecReload") {
                    true => l.replacen("=ferry ", &ours, 1) + "\n",
                    false => l.to_string() + "\n",
                },
            )
            .collect();
        assert_eq!(
            text.matches(&ours).count(),
            3,
            "ExecStartPre, ExecStart and the first ExecReload run ferry"
        );
        assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"));
        let unit = tmp.path().join(name);
        std::fs::write(&unit, text).unwrap();
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("systemd-analyze (Debian package systemd) must be installed");
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=50"])
            .arg(&unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&security.stdout);
        let score = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .unwrap_or_default()
            .to_string();
        eprintln!("{score}");
        assert!(security.status.success(), "{name}: {score}");
        let measured = score
            .split(": ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_default();
        assert_eq!(
            measured,
            documented(who),
            "{name} scores {measured}; README.md says otherwise"
        );
    }
}
