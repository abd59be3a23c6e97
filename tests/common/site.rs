//! The site harness of the tests: a temp directory with a sender identity and its config,
//! receivers with their own identities, and the one-module [`Setup`] most tests start from.

use super::proc::{Daemon, Receiver};
use super::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// A temp directory holding a sender identity (`send/`) and its `sender.toml`.
pub struct Site {
    pub tmp: tempfile::TempDir,
    /// The sender's fingerprint.
    pub fingerprint: String,
    /// `watcher = …` in sender.toml, if set.
    pub watcher: Option<String>,
}

impl Site {
    pub fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let fingerprint = keygen(&tmp.path().join("send"));
        Site {
            tmp,
            fingerprint,
            watcher: None,
        }
    }

    /// A site whose sender watches with `watcher` ("inotify" or "fanotify").
    pub fn watching(watcher: &str) -> Site {
        Site {
            watcher: Some(watcher.to_string()),
            ..Site::new()
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A path in the site (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// A directory in the site, created.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn config(&self) -> PathBuf {
        self.path("send/sender.toml")
    }

    /// The usual set-up: a source `src`, and a receiver `recv` serving `dst` as module `file`
    /// to this site's sender.
    pub fn one_backup(&self) -> (PathBuf, PathBuf, Backup) {
        let (src, dst) = (self.dir("src"), self.path("dst"));
        let backup = Backup::start(self.root(), "recv", &[("file", &dst)], &self.fingerprint);
        (src, dst, backup)
    }

    /// [`Site::one_backup`] with history: the module keeps it in `history` (returned third),
    /// with the module keys `extra` too.
    pub fn history_backup(&self, extra: &str) -> (PathBuf, PathBuf, PathBuf, Backup) {
        let (src, dst, history) = (self.dir("src"), self.path("dst"), self.path("history"));
        let keys = format!(
            "history = {:?}\n{}{extra}",
            history.display().to_string(),
            super::ANY_FREE_SPACE
        );
        let backup = Backup::start_with(
            self.root(),
            "recv",
            &[("file", &dst)],
            &self.fingerprint,
            &keys,
        );
        (src, dst, history, backup)
    }

    /// Writes sender.toml (`cert`/`key` prepended).
    pub fn write_config(&self, body: &str) {
        fs::write(
            self.config(),
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\nstatus_socket = \"status.sock\"\n{}{body}",
                self.watcher
                    .as_ref()
                    .map_or(String::new(), |w| format!("watcher = {w:?}\n"))
            ),
        )
        .unwrap();
    }

    /// Writes sender.toml and starts `ferry send`; returns once `reconciled` was logged
    /// `ready` times.
    pub fn run(&self, body: &str, ready: usize) -> Daemon {
        self.write_config(body);
        let d = Daemon::spawn(ferry().arg("send").arg("--config").arg(self.config()));
        d.wait_log_n("reconciled", ready, 60);
        d
    }

    /// `ferry send --once` of the current config, with `extra` flags.
    pub fn send_once(&self, extra: &[&str]) -> Output {
        run(ferry()
            .args(["send", "--once", "--config"])
            .arg(self.config())
            .args(extra))
    }

    /// `ferry verify --config` of the current config.
    pub fn verify(&self) -> Output {
        run(ferry().arg("verify").arg("--config").arg(self.config()))
    }

    /// `verify` finds the targets equal to their sources.
    pub fn assert_verified(&self) {
        let o = self.verify();
        assert_eq!(
            (o.status.code(), stdout(&o)),
            (Some(0), String::new()),
            "{}",
            stderr(&o)
        );
    }

    /// A `send --once` that finds nothing to send, not even metadata.
    pub fn assert_nothing_to_send(&self) {
        let o = self.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(
            (summary_value(&out, "files"), summary_value(&out, "meta")),
            (0, 0),
            "{out}"
        );
    }

    /// The running sender's `ferry status --json`: its exit code and answer.
    pub fn status(&self) -> (i32, serde_json::Value) {
        let o = run(ferry()
            .args(["status", "--json", "--socket"])
            .arg(self.path("send/status.sock")));
        let code = o.status.code().unwrap_or(-1);
        let v = serde_json::from_str(&stdout(&o)).unwrap_or(serde_json::Value::Null);
        (code, v)
    }

    /// Waits (`secs` at most) until the running sender says every target is connected, has
    /// converged and owes nothing (`ferry status` exit 0): every change it has heard of is
    /// acknowledged. Write a marker after the changes a negative assertion is about and wait
    /// for it first, so they were heard.
    pub fn wait_settled(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (code, v) = self.status();
            if code == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "not settled after {secs}s: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (`secs` at most) until every target of the running sender is connected and owes
    /// nothing but the deletions its guard holds.
    pub fn wait_settled_or_holding(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, v) = self.status();
            let done = v["targets"].as_array().is_some_and(|ts| {
                ts.iter()
                    .all(|t| t["state"] == "connected" && t["pending"] == 0)
            });
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "not settled after {secs}s: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (`secs` at most) until the running sender's only target is in `state`.
    pub fn wait_state(&self, state: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, v) = self.status();
            if v["targets"][0]["state"] == state {
                return v;
            }
            assert!(Instant::now() < deadline, "not {state} after {secs}s: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ferry stats` of the current config.
    pub fn stats(&self) -> String {
        let o = run(ferry().arg("stats").arg("--config").arg(self.config()));
        assert!(o.status.success(), "stats: {}", stderr(&o));
        stdout(&o)
    }
}

/// What the backup's receiver has logged so far (nothing while it is stopped).
pub fn backup_log(b: &Backup) -> String {
    b.receiver.as_ref().map(|r| r.log()).unwrap_or_default()
}

/// The configuration of one group `file` at `src` pushed to `backup`'s module `file`.
pub fn one_group(backup: &Backup, src: &Path, extra: &str) -> String {
    format!(
        "{}{}",
        backup.target("backup"),
        sync("file", src, &["backup"], "file", extra)
    )
}

/// Fills `root` with `dirs` directories `d0…` of `files` files `f0…` each, whose content
/// `content(i)` gives.
pub fn fill_tree(root: &Path, dirs: usize, files: usize, content: impl Fn(usize) -> Vec<u8>) {
    for d in 0..dirs {
        fs::create_dir(root.join(format!("d{d}"))).unwrap();
        for i in 0..files {
            fs::write(root.join(format!("d{d}/f{i}")), content(i)).unwrap();
        }
    }
}

/// A `[[sync]]` group.
pub fn sync(name: &str, source: &Path, targets: &[&str], module: &str, extra: &str) -> String {
    format!(
        "[[sync]]\nname = {name:?}\nsource = {:?}\ntargets = {targets:?}\nmodule = {module:?}\n{extra}\n",
        source.display().to_string()
    )
}

/// A receiver with its own identity on a fixed port, so it can be stopped and restarted.
pub struct Backup {
    pub dir: PathBuf,
    pub port: u16,
    pub fingerprint: String,
    pub receiver: Option<Receiver>,
}

impl Backup {
    /// `modules`: (name, path) pairs, all writable by `client`.
    pub fn start(root: &Path, name: &str, modules: &[(&str, &Path)], client: &str) -> Backup {
        Backup::start_with(root, name, modules, client, "")
    }

    /// [`Backup::start`] with more keys (`key = value` lines) for every module.
    pub fn start_with(
        root: &Path,
        name: &str,
        modules: &[(&str, &Path)],
        client: &str,
        module_keys: &str,
    ) -> Backup {
        let dir = root.join(name);
        let fingerprint = keygen(&dir);
        let port = free_port();
        let mut text =
            format!("listen = \"127.0.0.1:{port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
        for (m, path) in modules {
            fs::create_dir_all(path).unwrap();
            text.push_str(&format!(
                "[modules.{m}]\npath = {:?}\nclients = [{client:?}]\nread_only = false\n{module_keys}\n",
                path.display().to_string()
            ));
        }
        fs::write(dir.join("receiver.toml"), text).unwrap();
        let mut b = Backup {
            dir,
            port,
            fingerprint,
            receiver: None,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        self.receiver = Some(Receiver::start(&self.dir.join("receiver.toml")));
    }

    pub fn stop(&mut self) {
        if let Some(mut r) = self.receiver.take() {
            assert!(r.stop().success());
        }
    }

    /// `[targets.NAME]` pointing at this receiver.
    pub fn target(&self, name: &str) -> String {
        format!(
            "[targets.{name}]\naddress = \"127.0.0.1:{}\"\nfingerprint = {:?}\n",
            self.port, self.fingerprint
        )
    }
}

/// A sender/receiver pair with one module, configured through real files.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub sender_fp: String,
    pub receiver_fp: String,
    pub receiver: Receiver,
}

#[derive(Default)]
pub struct ModuleOpts {
    pub clients: Option<Vec<String>>,
    pub hosts_allow: Option<Vec<String>>,
    pub read_only: bool,
    pub max_connections: Option<usize>,
    /// More module keys, one `key = value` per line.
    pub extra: String,
}

impl Setup {
    pub fn new() -> Setup {
        Setup::with(ModuleOpts::default())
    }

    pub fn with(opts: ModuleOpts) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let src = root.join("src");
        let dst = root.join("dst");
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        let receiver_fp = keygen(&root.join("recv"));
        let sender_fp = keygen(&root.join("send"));
        let clients = opts.clients.unwrap_or_else(|| vec![sender_fp.clone()]);
        let mut module = format!(
            "[modules.file]\npath = {:?}\nclients = {:?}\nread_only = {}\n",
            dst.display().to_string(),
            clients,
            opts.read_only
        );
        if let Some(h) = opts.hosts_allow {
            module.push_str(&format!("hosts_allow = {h:?}\n"));
        }
        if let Some(m) = opts.max_connections {
            module.push_str(&format!("max_connections = {m}\n"));
        }
        module.push_str(&opts.extra);
        fs::write(
            root.join("recv/receiver.toml"),
            format!("listen = \"127.0.0.1:0\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n{module}"),
        )
        .unwrap();
        let receiver = Receiver::start(&root.join("recv/receiver.toml"));
        let s = Setup {
            dir,
            src,
            dst,
            sender_fp,
            receiver_fp,
            receiver,
        };
        s.write_sender_config("file", &[]);
        s
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn sender_config(&self) -> PathBuf {
        self.root().join("send/sender.toml")
    }

    pub fn write_sender_config(&self, module: &str, exclude: &[&str]) {
        self.write_sender_config_full(module, exclude, &self.receiver_fp, &self.receiver.addr);
    }

    pub fn write_sender_config_full(&self, module: &str, exclude: &[&str], pin: &str, addr: &str) {
        fs::write(
            self.sender_config(),
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\nstatus_socket = \"status.sock\"\n[targets.backup]\naddress = {addr:?}\nfingerprint = {pin:?}\n\
                 [[sync]]\nname = \"file\"\nsource = {:?}\ntargets = [\"backup\"]\nmodule = {module:?}\nexclude = {exclude:?}\n",
                self.src.display().to_string()
            ),
        )
        .unwrap();
    }

    pub fn send_once(&self) -> Output {
        run(ferry()
            .arg("send")
            .arg("--config")
            .arg(self.sender_config())
            .arg("--once"))
    }

    /// `send --once` that must succeed; returns its stdout summary.
    pub fn push(&self) -> String {
        let o = self.send_once();
        assert!(
            o.status.success(),
            "send --once failed:\n{}\n{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }
}
