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

    /// Every message received for `over`.
    fn collect(&self, over: Duration) -> Vec<String> {
        let deadline = Instant::now() + over;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Messages until one contains `needle` (that one included); panics after `secs`.
    fn wait_for(&self, needle: &str, secs: u64, daemon: &Proc) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
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
    // WatchdogSec=1: a keep-alive every quarter second.
    let later = systemd.collect(Duration::from_secs(2));
    let n = keep_alives(&later);
    assert!(n >= 5, "{n} keep-alives in 2 s: {later:?}");
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
    assert!(
        daemon.log().contains("watches in place"),
        "READY=1 before the watches:\n{}",
        daemon.log()
    );
    // Ready means watched: a file made right now is sent, whatever the reconcile is doing.
    std::fs::write(src.join("after"), b"made right after READY=1").unwrap();
    let msgs = systemd.wait_for("STATUS=every target reconciled", 30, &daemon);
    let later = systemd.collect(Duration::from_secs(2));
    let n = keep_alives(&msgs) + keep_alives(&later);
    assert!(n >= 5, "{n} keep-alives: {msgs:?} {later:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(dst.join("after").exists() && dst.join("before").exists()) {
        assert!(Instant::now() < deadline, "not sent:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}
