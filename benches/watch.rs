//! Watcher benchmark: fanotify beside inotify (ferry's two backends) and `inotifywait -r`, in
//! one run, on the same disk.
//!
//! - Start-up: for trees of 100,000 and 1,000,000 directories (`FERRY_BENCH_DIRS`, comma
//!   separated), the time from `ferry send` starting to its `READY=1` (every watch in place,
//!   workers started; the target is a closed port, so no reconcile runs) and the kernel memory
//!   it took (`Slab` in /proc/meminfo, before and after), beside `inotifywait -r` until
//!   "Watches established.".
//! - Unrelated writes: CPU time the sender spends while 100,000 files are written elsewhere on
//!   the same filesystem, beside the time the writes themselves take.
//! - Burst: 100,000 new files in 10,000 new directories under the live daemon (real receiver,
//!   TLS): time until the module has them all, and whether the kernel queue overflowed (an
//!   overflow loses events; ferry then compares the whole tree, so nothing is lost in the
//!   end, but it shows).
//!
//! Run as root: `cargo bench --bench watch` (needs `inotifywait` from inotify-tools; it raises
//! `fs.inotify.max_user_watches` for the run and puts it back). The 1M-directory tree takes a
//! few minutes to build and remove; `FERRY_BENCH_DIRS=100000` for a quick look.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn meminfo(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel slab memory in KiB, after letting freed objects settle.
fn slab_kib() -> u64 {
    std::thread::sleep(Duration::from_millis(300));
    meminfo("Slab")
}

/// CPU time (user + system) of `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// `n` directories under `root`, 1,000 per parent.
fn build_dirs(root: &Path, n: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..n {
        if i % 1000 == 0 {
            std::fs::create_dir(root.join(format!("p{}", i / 1000))).unwrap();
        }
        std::fs::create_dir(root.join(format!("p{}/d{}", i / 1000, i % 1000))).unwrap();
    }
}

struct Bench {
    dir: PathBuf,
    notify: PathBuf,
}

impl Bench {
    /// sender.toml for `source` with `watcher`, pushing to `target` (`host:port`, pin).
    fn config(&self, name: &str, watcher: &str, source: &Path, target: (&str, &str)) -> PathBuf {
        let path = self.dir.join(format!("send/{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\nwatcher = {watcher:?}\n\
                 status_socket = \"{name}.sock\"\n\
                 [targets.t]\naddress = {:?}\nfingerprint = {:?}\n\
                 [[sync]]\nname = \"g\"\nsource = {:?}\ntargets = [\"t\"]\nmodule = \"m\"\n",
                target.0,
                target.1,
                source.display().to_string()
            ),
        )
        .unwrap();
        path
    }

    /// Starts `ferry send` and returns it once it said READY=1, with the time that took.
    fn start(&self, config: &Path) -> (Child, Duration) {
        let _ = std::fs::remove_file(&self.notify);
        let sock = UnixDatagram::bind(&self.notify).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(900)))
            .unwrap();
        let started = Instant::now();
        let mut child = Command::new(FERRY)
            .args(["send", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &self.notify)
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => {
                    return (child, started.elapsed());
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("no READY=1 within 15 min: {e}");
                }
            }
        }
    }
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// `inotifywait -mr DIR` until it says its watches are established.
fn inotifywait(dir: &Path) -> (Child, Duration) {
    let started = Instant::now();
    let mut child = Command::new("inotifywait")
        .args(["-mr", "-e", "create,delete,move,close_write,modify,attrib"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inotifywait (apt-get install inotify-tools)");
    let err = BufReader::new(child.stderr.take().unwrap());
    for line in err.lines() {
        if line.is_ok_and(|l| l.contains("Watches established")) {
            return (child, started.elapsed());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("inotifywait exited before its watches were established");
}

fn row(what: &str, ready: Duration, kib: i64) {
    println!(
        "  {what:<22} ready {:>8.3} s   kernel memory {:>9} KiB",
        ready.as_secs_f64(),
        kib
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root (fanotify)");
    Command::new("inotifywait")
        .arg("--help")
        .output()
        .expect("inotifywait is needed: apt-get install inotify-tools");
    let base = std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let bench = Bench {
        dir: tmp.path().to_path_buf(),
        notify: tmp.path().join("notify"),
    };
    let out = Command::new(FERRY)
        .arg("keygen")
        .arg(bench.dir.join("send"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let sizes: Vec<usize> = std::env::var("FERRY_BENCH_DIRS")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("FERRY_BENCH_DIRS: numbers"))
        .collect();
    let watches = "/proc/sys/fs/inotify/max_user_watches";
    let old_limit = std::fs::read_to_string(watches).unwrap();
    let need = 2 * sizes.iter().max().copied().unwrap_or(0) + 200_000;
    if old_limit.trim().parse::<usize>().unwrap() < need {
        std::fs::write(watches, need.to_string()).unwrap();
    }
    let closed = (
        "127.0.0.1:9",
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    );

    println!("start-up (until READY=1 / \"Watches established.\"), closed target:");
    for &n in &sizes {
        let tree = bench.dir.join(format!("tree{n}"));
        let t = Instant::now();
        build_dirs(&tree, n);
        println!(
            "{n} directories (built in {:.1} s):",
            t.elapsed().as_secs_f64()
        );
        for watcher in ["fanotify", "inotify"] {
            let config = bench.config(watcher, watcher, &tree, closed);
            let before = slab_kib();
            let (child, ready) = bench.start(&config);
            let kib = slab_kib() as i64 - before as i64;
            stop(child);
            row(&format!("ferry ({watcher})"), ready, kib);
        }
        let before = slab_kib();
        let (child, ready) = inotifywait(&tree);
        let kib = slab_kib() as i64 - before as i64;
        stop(child);
        row("inotifywait -r", ready, kib);
        std::fs::remove_dir_all(&tree).unwrap();
    }

    println!("100,000 files written elsewhere on the same filesystem (sender watching 10 dirs):");
    let small = bench.dir.join("small");
    build_dirs(&small, 10);
    let other = bench.dir.join("other");
    for watcher in ["fanotify", "inotify"] {
        let config = bench.config(&format!("cpu-{watcher}"), watcher, &small, closed);
        let (child, _) = bench.start(&config);
        let before = cpu(child.id());
        let t = Instant::now();
        build_dirs(&other, 100);
        for i in 0..100_000 {
            std::fs::write(other.join(format!("p0/d{}/f{i}", i % 100)), b"x").unwrap();
        }
        let writes = t.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let used = cpu(child.id()) - before;
        stop(child);
        std::fs::remove_dir_all(&other).unwrap();
        println!(
            "  ferry ({watcher:<8})  sender CPU {:>7.1} ms   the writes themselves {:>7.1} ms   ratio {:.3}",
            used.as_secs_f64() * 1e3,
            writes.as_secs_f64() * 1e3,
            used.as_secs_f64() / writes.as_secs_f64()
        );
    }

    println!("burst: 100,000 new files in 10,000 new directories, live, to a real receiver:");
    let recv = bench.dir.join("recv");
    let out = Command::new(FERRY)
        .arg("keygen")
        .arg(&recv)
        .output()
        .unwrap();
    let pin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let client = String::from_utf8(
        Command::new(FERRY)
            .arg("fingerprint")
            .arg(bench.dir.join("send/cert.pem"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    for watcher in ["fanotify", "inotify"] {
        let src = bench.dir.join(format!("burst-src-{watcher}"));
        let dst = bench.dir.join(format!("burst-dst-{watcher}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        std::fs::write(
            recv.join("receiver.toml"),
            format!(
                "listen = \"127.0.0.1:{port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                 [modules.m]\npath = {:?}\nclients = [{client:?}]\nread_only = false\n",
                dst.display().to_string()
            ),
        )
        .unwrap();
        let receiver = Command::new(FERRY)
            .args(["receive", "-q", "--config"])
            .arg(recv.join("receiver.toml"))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let address = format!("127.0.0.1:{port}");
        let config = bench.config(&format!("burst-{watcher}"), watcher, &src, (&address, &pin));
        let log = bench.dir.join(format!("burst-{watcher}.log"));
        let _ = std::fs::remove_file(&bench.notify);
        let sock = UnixDatagram::bind(&bench.notify).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let sender = Command::new(FERRY)
            .args(["send", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &bench.notify)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock
                .recv(&mut buf)
                .expect("the sender converges on an empty tree");
            if String::from_utf8_lossy(&buf[..n]).contains("every target reconciled") {
                break;
            }
        }
        let t = Instant::now();
        for d in 0..10_000 {
            let dir = src.join(format!("b{}/c{}", d / 100, d % 100));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..10 {
                std::fs::write(dir.join(format!("f{f}")), b"burst").unwrap();
            }
        }
        let written = t.elapsed();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut have = 0;
        while have < 100_000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            have = count_files(&dst);
        }
        let took = t.elapsed();
        stop(sender);
        stop(receiver);
        let text = std::fs::read_to_string(&log).unwrap();
        let overflowed = text.matches("queue overflowed").count();
        println!(
            "  ferry ({watcher:<8})  {have} of 100000 files on the receiver after {:.2} s (written in {:.2} s); kernel queue overflows: {overflowed}",
            took.as_secs_f64(),
            written.as_secs_f64()
        );
    }
    std::fs::write(watches, old_limit).unwrap();
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}
