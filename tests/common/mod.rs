//! Shared helpers for end-to-end tests: real `ferry` binaries, real TLS, temp dirs,
//! 127.0.0.1 only.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env(
        "FERRY_LOG",
        std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
    );
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run ferry")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ferry keygen DIR`; returns the printed fingerprint after checking its shape.
pub fn keygen(dir: &Path) -> String {
    let o = run(ferry().arg("keygen").arg(dir));
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
    let fp = stdout(&o).trim().to_string();
    assert!(
        fp.starts_with("sha256:") && fp.len() == 71,
        "bad fingerprint {fp:?}"
    );
    fp
}

/// A receiver process, stopped with SIGTERM on drop. Its stderr is collected.
pub struct Receiver {
    child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Receiver {
    pub fn start(config: &Path) -> Receiver {
        let mut child = ferry()
            .arg("receive")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn receiver");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listen=") {
                    let addr = line[i + 7..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("receiver did not start: {}", log.lock().unwrap()));
        Receiver { child, addr, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
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
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
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
        std::fs::write(
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
        std::fs::write(
            self.sender_config(),
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\n[targets.backup]\naddress = {addr:?}\nfingerprint = {pin:?}\n\
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

/// Reads `key=value` from a summary line.
pub fn summary_value(summary: &str, key: &str) -> u64 {
    let needle = format!("{key}=");
    let at = summary
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in {summary}"));
    summary[at + needle.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Compares two trees independently of `ferry verify`: types, bytes, modes, mtimes (ns),
/// link targets, and owners. The receiver's staging directory is ignored.
pub fn assert_trees_equal(a: &Path, b: &Path) {
    if let Some(d) = tree_difference(a, b) {
        panic!("{} and {} differ: {d}", a.display(), b.display());
    }
}

/// The first difference between two trees (see [`assert_trees_equal`]), if any.
pub fn tree_difference(a: &Path, b: &Path) -> Option<String> {
    tree_difference_with(a, b, true)
}

/// Like [`tree_difference`]; `exact` false is what a stock rsync achieves: the roots' own
/// metadata is ignored (rsyncd never sets its module directory's times), and the mtimes of
/// directories and symlinks compare to the second (rsync leaves one created in the same
/// second as its source with the receiver's nanoseconds).
pub fn tree_difference_with(a: &Path, b: &Path, exact: bool) -> Option<String> {
    let mut la = listing(a);
    let mut lb = listing(b);
    if !exact {
        for l in [&mut la, &mut lb] {
            l.retain(|e| !e.0.is_empty());
            for e in l.iter_mut() {
                if e.1 .0 & 0o170000 != 0o100000 {
                    e.1 .2 = 0;
                }
            }
        }
    }
    let names_a: Vec<&String> = la.iter().map(|x| &x.0).collect();
    let names_b: Vec<&String> = lb.iter().map(|x| &x.0).collect();
    if names_a != names_b {
        let only_a: Vec<_> = names_a
            .iter()
            .filter(|n| !names_b.contains(n))
            .take(5)
            .collect();
        let only_b: Vec<_> = names_b
            .iter()
            .filter(|n| !names_a.contains(n))
            .take(5)
            .collect();
        return Some(format!(
            "different entries ({} vs {}); only left: {only_a:?}; only right: {only_b:?}",
            names_a.len(),
            names_b.len()
        ));
    }
    for ((p, ma, ca), (_, mb, cb)) in la.iter().zip(lb.iter()) {
        if ma != mb {
            return Some(format!("metadata of {p:?}: {ma:?} vs {mb:?}"));
        }
        if ca != cb {
            return Some(format!("content of {p:?}"));
        }
    }
    None
}

/// Waits until the trees are equal; panics with the last difference after `secs`.
pub fn wait_equal(a: &Path, b: &Path, secs: u64, what: &str) {
    wait_equal_with(a, b, secs, what, true)
}

/// [`wait_equal`] with [`tree_difference_with`]'s `exact`.
pub fn wait_equal_with(a: &Path, b: &Path, secs: u64, what: &str, exact: bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // The trees may change under the walk; a vanished entry is just "not yet".
        let d = std::panic::catch_unwind(|| tree_difference_with(a, b, exact))
            .unwrap_or_else(|_| Some("changed during comparison".into()));
        match d {
            None => return,
            Some(d) if Instant::now() > deadline => {
                panic!("{what}: not converged after {secs}s: {d}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A long-running `ferry` process whose stderr is collected; SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn spawn(cmd: &mut Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Daemon { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `needle` occurs at least `n` times in the output.
    pub fn wait_log_n(&self, needle: &str, n: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.log().matches(needle).count() < n {
            if Instant::now() > deadline {
                panic!("no {n}× {needle:?} after {secs}s; output:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (at most 20 s) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferry did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for daemons that must restart on it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

type Listing = Vec<(String, (u32, i64, i64, u32, u32), Vec<u8>)>;

fn listing(root: &Path) -> Listing {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Listing) {
    let md = std::fs::symlink_metadata(dir).unwrap();
    let rel = dir.strip_prefix(root).unwrap().display().to_string();
    out.push((
        rel,
        (md.mode(), md.mtime(), md.mtime_nsec(), md.uid(), md.gid()),
        Vec::new(),
    ));
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if dir == root && e.file_name() == ".ferry-partial" {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if md.is_dir() {
            walk(root, &p, out);
        } else {
            let content = if md.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if md.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            // Linux symlink permission bits are always 0777; mode compares the type too.
            let mode = md.mode();
            out.push((
                rel,
                (mode, md.mtime(), md.mtime_nsec(), md.uid(), md.gid()),
                content,
            ));
        }
    }
}

pub fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
