//! Bulk benchmark: ferry beside rsync on the work an operator's first hour is made of, all
//! in one run on 127.0.0.1, real processes, TLS on, every ferry file durable before its `Ack`.
//!
//! Builds a deterministic tree (20,000 files of ~4 KiB in 1,000 directories and one 256 MiB
//! file), starts a real `rsync --daemon` and a real `ferry receive`, and prints, per workload,
//! ferry's figure, rsync's, and the ratio:
//! - initial sync (`send --once` vs `rsync -a`, and `rsync -a --fsync` and `rsync -aHAXS`,
//!   which keeps what ferry keeps by default, for reference);
//! - 1 MiB changed in the middle of the 256 MiB file: time and bytes on the wire in both
//!   directions (through a counting proxy, for both);
//! - nothing changed, fresh process (also beside `rsync -aHAXS`);
//! - peak RSS of each process (VmHWM of the receiver, `wait4` of the clients);
//! - one new 1 GiB file, beside the disk's own write + fdatasync of 1 GiB;
//! - a burst of 50,000 new files under the live daemon, until the module has them all,
//!   beside lsyncd (delay 0, same rsyncd) when `lsyncd` is installed.
//!
//! - restore (`ferry restore --group` from the module) into an empty directory beside `rsync
//!   -a` pulling from the rsyncd (two rounds, in both orders), then over those copies after
//!   1 MiB of the big file was damaged: time and bytes on the wire;
//! - every small file rewritten (same sizes, new bytes), `send --once` vs `rsync -a`: with
//!   `FERRY_BENCH_HISTORY=1` the ferry modules keep history, so every file's old version is
//!   kept; run once with and once without to see what history costs.
//!
//! With `FERRY_BENCH_LINK=RTT_MS/MBIT` (e.g. `50/100`) both tools run through the same
//! emulated wide-area link (a relay on 127.0.0.1 that delays and paces each direction), the
//! tree's own time on the link is printed, and a last row holds a target capped with
//! `bwlimit_kib` at a quarter of the link for a minute (what crossed, against the cap).
//!
//! Run: `cargo bench --bench bulk` (needs `rsync`; `lsyncd` optional). About 2–4 minutes and
//! ~4 GB of disk in `FERRY_BENCH_DIR` (default: the system temp dir; 8 GiB with
//! `FERRY_BENCH_FS`). `FERRY_BENCH_SCALE=0.1`
//! shrinks every size tenfold for a quick look. `FERRY_BENCH_FS=xfs|ext4|btrfs` (root, and
//! that filesystem's `mkfs`) runs it all on a fresh filesystem of that kind instead: an 8 GiB
//! image in `FERRY_BENCH_DIR`, written whole first (so every row meets the same disk; see
//! `LoopFs::make`), loop-mounted, frozen and thawed before each timed run (`fsfreeze`, from
//! util-linux; see `QUIESCED`), and unmounted and removed at the end (ext4 with its
//! journal, as a backup host runs it). The loop device does direct I/O to its image, as a
//! disk does (`FERRY_BENCH_LOOP=buffered` for a loop device through the page cache).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn scale() -> f64 {
    std::env::var("FERRY_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// `FERRY_BENCH_HISTORY=1`: the ferry modules keep history.
fn with_history() -> bool {
    std::env::var("FERRY_BENCH_HISTORY").is_ok_and(|v| v == "1")
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(1)
}

/// Deterministic bytes (xorshift), so every run builds the same tree.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn write_big(path: &Path, len: usize, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    let mut i = 0;
    while left > 0 {
        let n = left.min(buf.len());
        fill(&mut buf[..n], seed + i);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
        i += 1;
    }
}

fn build_tree(src: &Path) -> (usize, u64) {
    let (files, bytes) = write_small(src, 0);
    let big = scaled(256 << 20);
    write_big(&src.join("big.img"), big, 1 << 32);
    (files + 1, bytes + big as u64)
}

/// The 20,000 small files (their bytes from `round`); how many and their bytes.
fn write_small(src: &Path, round: u64) -> (usize, u64) {
    let (dirs, per_dir) = (scaled(1000), 20);
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 8192];
    for d in 0..dirs {
        let dir = src.join(format!("d{d:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            let len = 2048 + (d * 31 + f * 97) % 4096;
            fill(&mut buf[..len], (d * per_dir + f) as u64 + (round << 40));
            std::fs::write(dir.join(format!("f{f:02}")), &buf[..len]).unwrap();
            bytes += len as u64;
        }
    }
    (dirs * per_dir, bytes)
}

/// Runs `cmd`, returning its wall time and peak RSS (KiB) from `wait4` (which reaps it).
#[allow(clippy::zombie_processes)]
fn timed(cmd: &mut Command) -> (Duration, u64) {
    // Each run starts with nothing dirty: a `syncfs` of ferry's would otherwise write back
    // what the run before it (rsync's, not durable) left in the page cache, and be charged
    // for it. On the bench's own filesystem, with nothing in its log either.
    Command::new("sync").status().unwrap();
    if let Some(mount) = QUIESCED.get() {
        quiesce(mount);
    }
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut status = 0;
    // SAFETY: plain data for the kernel to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    let err = reader.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed: {err}"
    );
    (took, usage.ru_maxrss as u64)
}

/// Peak RSS of a running process (KiB), then reset for the next workload.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    kb
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An emulated wide-area link (`FERRY_BENCH_LINK=RTT_MS/MBIT`, e.g. `50/100`): half the
/// round trip's delay each way, and each direction's rate shared by every connection.
#[derive(Clone, Copy)]
struct Shape {
    one_way: Duration,
    bytes_per_s: f64,
}

impl Shape {
    fn from_env() -> Option<Shape> {
        let v = std::env::var("FERRY_BENCH_LINK").ok()?;
        let parsed = v
            .split_once('/')
            .and_then(|(rtt, mbit)| Some((rtt.parse::<f64>().ok()?, mbit.parse::<f64>().ok()?)));
        match parsed {
            Some((rtt, mbit)) if rtt >= 0.0 && mbit > 0.0 => Some(Shape {
                one_way: Duration::from_secs_f64(rtt / 2e3),
                bytes_per_s: mbit * 1e6 / 8.0,
            }),
            _ => fail(&format!(
                "FERRY_BENCH_LINK={v}: expected RTT_MS/MBIT, e.g. 50/100"
            )),
        }
    }

    /// Seconds the link needs for `bytes`, one way, at its rate.
    fn floor(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_s)
    }
}

/// One direction of a shaped link: when it is free again (every connection queues on it).
type Lane = Arc<std::sync::Mutex<Instant>>;

/// A TCP proxy counting the bytes of every connection, both directions; through an
/// emulated link ([`Shape`]) if given one.
struct Counter {
    port: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Counter {
    fn start(upstream: u16) -> Counter {
        Counter::shaped(upstream, None)
    }

    fn shaped(upstream: u16, shape: Option<Shape>) -> Counter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        let lane = || Arc::new(std::sync::Mutex::new(Instant::now()));
        let lanes: (Lane, Lane) = (lane(), lane());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (u, d) = (u.clone(), d.clone());
                let (lu, ld) = (lanes.0.clone(), lanes.1.clone());
                std::thread::spawn(move || pump(client, server, u, shape.map(|s| (s, lu))));
                std::thread::spawn(move || pump(s2, c2, d, shape.map(|s| (s, ld))));
            }
        });
        Counter { port, up, down }
    }

    fn take(&self) -> (u64, u64) {
        (
            self.up.swap(0, Ordering::SeqCst),
            self.down.swap(0, Ordering::SeqCst),
        )
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    count: Arc<AtomicU64>,
    link: Option<(Shape, Lane)>,
) {
    let Some((shape, lane)) = link else {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        return;
    };
    // The link's buffer: what is read waits here for its time on the wire, and a full
    // buffer stops the reading (the sender's TCP sees a link of that rate and delay).
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(64);
    let writer = std::thread::spawn(move || {
        for (at, chunk) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
            count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // On the wire from when the lane is free, for as long as its rate needs;
                // delivered the link's delay after that.
                let delivered = {
                    let mut free = lane.lock().unwrap();
                    *free = (*free).max(Instant::now()) + shape.floor(n as u64);
                    *free + shape.one_way
                };
                if tx.send((delivered, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

struct Site {
    dir: PathBuf,
    src: PathBuf,
    ferry_dst: PathBuf,
    rsync_dst: PathBuf,
    receiver: Child,
    rsyncd: Child,
    ferry_port: u16,
    rsync_port: u16,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.receiver.kill();
        let _ = self.rsyncd.kill();
        let _ = self.receiver.wait();
        let _ = self.rsyncd.wait();
    }
}

fn ferry(args: &[&str]) -> Command {
    let mut c = Command::new(FERRY);
    c.args(args).env("FERRY_LOG", "warn");
    c
}

fn fingerprint(dir: &Path) -> String {
    let o = ferry(&["keygen"]).arg(dir).output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

impl Site {
    fn start(dir: &Path) -> Site {
        let (src, ferry_dst, rsync_dst) = (dir.join("src"), dir.join("ferry"), dir.join("rsync"));
        let (ferry_spare, rsync_spare) = (dir.join("ferry-spare"), dir.join("rsync-spare"));
        for d in [
            &src,
            &ferry_dst,
            &rsync_dst,
            &ferry_spare,
            &rsync_spare,
            &dir.join("rsync-fsync"),
            &dir.join("rsync-hax"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let send_fp = fingerprint(&dir.join("send"));
        let recv_fp = fingerprint(&dir.join("recv"));
        let ferry_port = free_port();
        let history = |name: &str| {
            if with_history() {
                format!("history = {:?}\n", dir.join(name).display().to_string())
            } else {
                String::new()
            }
        };
        std::fs::write(
            dir.join("recv/receiver.toml"),
            format!(
                "listen = \"127.0.0.1:{ferry_port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                 [modules.bench]\npath = {:?}\nclients = [{send_fp:?}]\nread_only = false\n{}\
                 [modules.spare]\npath = {:?}\nclients = [{send_fp:?}]\nread_only = false\n{}",
                ferry_dst.display().to_string(),
                history("history-bench"),
                ferry_spare.display().to_string(),
                history("history-spare"),
            ),
        )
        .unwrap();
        let receiver = ferry(&["receive", "--config"])
            .arg(dir.join("recv/receiver.toml"))
            .spawn()
            .unwrap();
        let rsync_port = free_port();
        std::fs::write(
            dir.join("rsyncd.conf"),
            format!(
                "use chroot = no\nuid = root\ngid = root\n[bench]\npath = {}\nread only = false\n\
                 [spare]\npath = {}\nread only = false\n\
                 [fsync]\npath = {}\nread only = false\n\
                 [hax]\npath = {}\nread only = false\n",
                rsync_dst.display(),
                rsync_spare.display(),
                dir.join("rsync-fsync").display(),
                dir.join("rsync-hax").display()
            ),
        )
        .unwrap();
        let rsyncd = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={rsync_port}"))
            .arg(format!("--config={}", dir.join("rsyncd.conf").display()))
            .spawn()
            .expect("rsync is needed (apt-get install rsync)");
        wait_port(ferry_port);
        wait_port(rsync_port);
        let site = Site {
            dir: dir.to_path_buf(),
            src,
            ferry_dst,
            rsync_dst,
            receiver,
            rsyncd,
            ferry_port,
            rsync_port,
        };
        site.sender_config(ferry_port, &recv_fp, "bench");
        site
    }

    fn sender_config(&self, port: u16, recv_fp: &str, module: &str) {
        std::fs::write(
            self.dir.join("send/sender.toml"),
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\nstatus_socket = \"status.sock\"\n\
                 [targets.backup]\naddress = \"127.0.0.1:{port}\"\nfingerprint = {recv_fp:?}\n\
                 [[sync]]\nname = \"bench\"\nsource = {:?}\ntargets = [\"backup\"]\n\
                 module = {module:?}\ndelete = true\n",
                self.src.display().to_string()
            ),
        )
        .unwrap();
    }

    fn ferry_once(&self) -> (Duration, u64) {
        timed(ferry(&["send", "--once", "--config"]).arg(self.dir.join("send/sender.toml")))
    }

    fn rsync_once(&self, port: u16, extra: &[&str]) -> (Duration, u64) {
        self.rsync_into(port, "bench", extra)
    }

    fn rsync_into(&self, port: u16, module: &str, extra: &[&str]) -> (Duration, u64) {
        timed(
            Command::new("rsync")
                .arg("-a")
                .args(extra)
                .arg(format!("{}/", self.src.display()))
                .arg(format!("rsync://127.0.0.1:{port}/{module}/")),
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn row(what: &str, ferry: String, rsync: String, ratio: f64) {
    println!("{what:<44} {ferry:>14} {rsync:>14} {ratio:>8.2}×");
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn count_files(dir: &Path) -> usize {
    let Ok(items) = std::fs::read_dir(dir) else {
        return 0;
    };
    items
        .flatten()
        .map(|e| {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Reads every regular file below `dir` (not following symlinks), so its pages are in memory.
fn warm(dir: &Path) {
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for e in items.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => warm(&e.path()),
            Ok(t) if t.is_file() => {
                if let Ok(mut f) = std::fs::File::open(e.path()) {
                    let _ = std::io::copy(&mut f, &mut std::io::sink());
                }
            }
            _ => {}
        }
    }
}

/// Writes `n` new files of 1 KiB under `root/burst`; returns when the last is closed.
fn burst(root: &Path, n: usize) -> Instant {
    let buf = vec![b'x'; 1024];
    for i in 0..n {
        let dir = root.join(format!("burst/b{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), &buf).unwrap();
    }
    Instant::now()
}

/// Waits until `dir/burst` holds `n` files; the time since `written`.
fn converged(dir: &Path, n: usize, written: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if count_files(&dir.join("burst")) >= n {
            return written.elapsed();
        }
        assert!(Instant::now() < deadline, "never converged");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn disk_write(dir: &Path, len: usize) -> Duration {
    let path = dir.join("disk-reference");
    let started = Instant::now();
    write_big(&path, len, 99);
    std::fs::File::open(&path).unwrap().sync_data().unwrap();
    let took = started.elapsed();
    std::fs::remove_file(&path).unwrap();
    took
}

/// A fresh filesystem on a loop device for the run (`FERRY_BENCH_FS`): unmounted and its
/// image removed when dropped.
struct LoopFs {
    mount: tempfile::TempDir,
    image: PathBuf,
}

impl LoopFs {
    /// Makes a filesystem of `kind` in an 8 GiB image under `base` and mounts it; exits with
    /// the reason if it cannot.
    ///
    /// The image is written whole first (a non-zero pattern, flushed) and `mkfs` told not to
    /// discard it. On a sparse image, or on a virtual disk that allocates a block the first
    /// time it is written, a durable write is three times slower where the filesystem
    /// first reaches ground never written (measured: `dd` with `fdatasync` 330 MB/s on an
    /// empty XFS, 112 MB/s once 3 GB were in it, 340 MB/s again when they were deleted;
    /// on the written image 172 MB/s throughout), so the rows run later (the second
    /// round, the restore) would meet a slower disk than the first, and only the tool that
    /// waits for the disk would pay for it.
    fn make(kind: &str, base: &Path) -> LoopFs {
        let (force, no_discard) = match kind {
            "xfs" => ("-f", &["-K"][..]),
            "btrfs" => ("-f", &["-K"][..]),
            "ext4" => ("-F", &["-E", "nodiscard"][..]),
            _ => fail(&format!(
                "FERRY_BENCH_FS={kind}: expected xfs, ext4 or btrfs"
            )),
        };
        let image = base.join(format!("ferry-bench-{}.{kind}", std::process::id()));
        let mut file = std::fs::File::create(&image).unwrap_or_else(|e| {
            fail(&format!("{}: {e}", image.display()));
        });
        let started = Instant::now();
        let mut pattern = vec![0u8; 1 << 20];
        fill(&mut pattern, 0x1_0000);
        let written = (0..8 << 10)
            .try_for_each(|_| file.write_all(&pattern))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&image);
            fail(&format!("{}: {e}", image.display()));
        }
        drop(file);
        let prepared = started.elapsed();
        let run = |what: &str, cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| {
                let _ = std::fs::remove_file(&image);
                fail(&format!("{what}: {e} (FERRY_BENCH_FS={kind})"))
            });
            if !out.status.success() {
                let _ = std::fs::remove_file(&image);
                fail(&format!(
                    "{what} failed (FERRY_BENCH_FS={kind}; root needed): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        };
        run("fsfreeze", Command::new("fsfreeze").arg("--version"));
        let mkfs = format!("mkfs.{kind}");
        run(
            &mkfs,
            Command::new(&mkfs)
                .args(["-q", force])
                .args(no_discard)
                .arg(&image),
        );
        let mount = tempfile::tempdir().unwrap();
        run(
            "mount -o loop",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(mount.path()),
        );
        // The loop device reads and writes its image directly, as a disk would: a buffered
        // loop device copies every block it is given into the page cache of the image's
        // filesystem and, on each flush, has that filesystem write the image back too, a
        // cost in CPU a disk does not have, paid inside its timed run only by the tool that
        // flushes (measured on the restore of the bench tree: the whole machine 2.5 CPU-s
        // with it, 2.2 without). `FERRY_BENCH_LOOP=buffered` keeps it.
        let buffered = std::env::var("FERRY_BENCH_LOOP").is_ok_and(|v| v == "buffered");
        if !buffered {
            let device = Command::new("findmnt")
                .args(["-n", "-o", "SOURCE"])
                .arg(mount.path())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let direct = Command::new("losetup")
                .arg("--direct-io=on")
                .arg(&device)
                .output();
            if !direct.as_ref().is_ok_and(|o| o.status.success()) {
                let _ = Command::new("umount").arg(mount.path()).status();
                let _ = std::fs::remove_file(&image);
                fail(&format!(
                    "losetup --direct-io=on {device:?} failed (FERRY_BENCH_FS={kind}; \
                     FERRY_BENCH_LOOP=buffered runs without it): {}",
                    direct.map_or_else(
                        |e| e.to_string(),
                        |o| String::from_utf8_lossy(&o.stderr).trim().to_string()
                    )
                ));
            }
        }
        println!(
            "filesystem: a fresh {kind} on a loop device ({} on {}, {}; the image written \
             whole first, in {:.1} s)",
            image.display(),
            mount.path().display(),
            if buffered {
                "buffered"
            } else {
                "direct I/O to its image"
            },
            prepared.as_secs_f64()
        );
        let _ = QUIESCED.set(mount.path().to_path_buf());
        LoopFs { mount, image }
    }
}

/// The bench's own filesystem, when it made one ([`LoopFs`]): [`timed`] freezes and thaws it
/// after its `sync`, which writes in place what the run before logged (a copy of 20,000
/// files leaves the log full of their metadata after a `sync`; the next run's flushes then
/// wait for it to be written back, so whoever ran second paid for the first).
static QUIESCED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Freezes and thaws the filesystem mounted at `mount`: everything it holds is written in
/// place and its log emptied.
fn quiesce(mount: &Path) {
    let frozen = Command::new("fsfreeze")
        .arg("-f")
        .arg(mount)
        .status()
        .is_ok_and(|s| s.success());
    let thawed = Command::new("fsfreeze")
        .arg("-u")
        .arg(mount)
        .status()
        .is_ok_and(|s| s.success());
    if !(frozen && thawed) {
        eprintln!(
            "bulk bench: fsfreeze of {} failed (frozen {frozen}, thawed {thawed})",
            mount.display()
        );
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.mount.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            eprintln!("umount {} failed: lazily", self.mount.path().display());
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.mount.path())
                .status();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

fn fail(why: &str) -> ! {
    eprintln!("bulk bench: {why}");
    std::process::exit(2)
}

fn main() {
    let base = std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // Read before the filesystem is made: a bad value exits, which skips its unmounting.
    let link = Shape::from_env();
    let fs = std::env::var("FERRY_BENCH_FS")
        .ok()
        .map(|kind| LoopFs::make(&kind, &base));
    let tmp = match &fs {
        Some(fs) => tempfile::tempdir_in(fs.mount.path()),
        None => tempfile::tempdir_in(&base),
    }
    .unwrap();
    let mut site = Site::start(tmp.path());
    let started = Instant::now();
    let (files, bytes) = build_tree(&site.src);
    println!(
        "tree: {files} files, {:.0} MB, built in {:.1} s (scale {})",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        scale()
    );
    println!(
        "ferry modules keep history: {}",
        if with_history() {
            "yes (FERRY_BENCH_HISTORY=1)"
        } else {
            "no"
        }
    );
    // Everything written so far reaches the disk before anything is timed.
    Command::new("sync").status().unwrap();
    let recv_pid = site.receiver.id();
    let pin = std::fs::read_to_string(site.dir.join("send/sender.toml"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("fingerprint"))
        .and_then(|l| l.split('"').nth(1))
        .unwrap()
        .to_string();
    // Over an emulated link, everything of both goes through it from here on.
    let _links = link.map(|shape| {
        let links = (
            Counter::shaped(site.ferry_port, Some(shape)),
            Counter::shaped(site.rsync_port, Some(shape)),
        );
        (site.ferry_port, site.rsync_port) = (links.0.port, links.1.port);
        site.sender_config(site.ferry_port, &pin, "bench");
        println!(
            "link: {:.0} ms round trip, {:.0} Mbit/s each way; the tree alone needs {:.2} s on it",
            2e3 * shape.one_way.as_secs_f64(),
            shape.bytes_per_s * 8.0 / 1e6,
            shape.floor(bytes).as_secs_f64()
        );
        links
    });
    println!(
        "{:<44} {:>14} {:>14} {:>9}",
        "workload", "ferry", "rsync", "ratio"
    );
    // Two rounds into fresh modules, in both orders: on these disks the second writer of a
    // run can be slowed by the first (writeback, inode allocation after mass deletes).
    peak_rss(recv_pid);
    let (f1, f_rss) = site.ferry_once();
    let r_rss_recv = peak_rss(recv_pid);
    let (r1, r_rss) = site.rsync_once(site.rsync_port, &[]);
    row(
        "initial sync (ferry first)",
        secs(f1),
        secs(r1),
        ratio(f1, r1),
    );
    site.sender_config(site.ferry_port, &pin, "spare");
    let (r2, _) = site.rsync_into(site.rsync_port, "spare", &[]);
    let (f2, _) = site.ferry_once();
    row(
        "initial sync (rsync first)",
        secs(f2),
        secs(r2),
        ratio(f2, r2),
    );
    site.sender_config(site.ferry_port, &pin, "bench");
    let (f, r) = (f1 + f2, r1 + r2);
    row("initial sync, both rounds", secs(f), secs(r), ratio(f, r));
    // The disk's own rate, measured now, beside what both moved per second.
    let disk = disk_write(&site.dir, scaled(256 << 20));
    let rate = |n: u64, d: Duration| n as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "  MiB/s of the tree: ferry {:.0}, rsync {:.0}; the disk's own write + fdatasync {:.0}",
        rate(2 * bytes, f),
        rate(2 * bytes, r),
        rate(scaled(256 << 20) as u64, disk)
    );
    let (rf, _) = site.rsync_into(site.rsync_port, "fsync", &["--fsync"]);
    row("  (rsync --fsync)", secs(f1), secs(rf), ratio(f1, rf));
    // What ferry keeps by default (hard links, ACLs, xattrs, holes) is rsync's -aHAXS.
    let (rh, _) = site.rsync_into(site.rsync_port, "hax", &["-HAXS"]);
    row("  (rsync -aHAXS)", secs(f1), secs(rh), ratio(f1, rh));
    row(
        "peak RSS, initial sync: sender / client",
        format!("{} MB", f_rss / 1024),
        format!("{} MB", r_rss / 1024),
        f_rss as f64 / r_rss as f64,
    );
    println!(
        "{:<44} {:>14}",
        "peak RSS, initial sync: receiver",
        format!("{} MB", r_rss_recv / 1024)
    );

    // 1 MiB changed in the middle of the big file, through counting proxies.
    let big = site.src.join("big.img");
    let len = std::fs::metadata(&big).unwrap().len();
    let mut patch = vec![0u8; (1 << 20).min(len as usize / 4)];
    fill(&mut patch, 7);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .write_all_at(&patch, len / 2)
        .unwrap();
    let ferry_proxy = Counter::start(site.ferry_port);
    let rsync_proxy = Counter::start(site.rsync_port);
    site.sender_config(ferry_proxy.port, &pin, "bench");
    let (f, _) = site.ferry_once();
    let (fu, fd) = ferry_proxy.take();
    let (r, _) = site.rsync_once(rsync_proxy.port, &[]);
    let (ru, rd) = rsync_proxy.take();
    row(
        "1 MiB changed in the big file: time",
        secs(f),
        secs(r),
        ratio(f, r),
    );
    row(
        "  bytes on the wire, both directions",
        format!("{:.2} MB", (fu + fd) as f64 / 1e6),
        format!("{:.2} MB", (ru + rd) as f64 / 1e6),
        (fu + fd) as f64 / (ru + rd) as f64,
    );
    site.sender_config(site.ferry_port, &pin, "bench");

    // Short runs, each at the mercy of the machine's moment: the median of five of each,
    // taken in turn.
    let (mut fs, mut rs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        fs.push(site.ferry_once().0);
        rs.push(site.rsync_once(site.rsync_port, &[]).0);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (f, r) = (median(&mut fs), median(&mut rs));
    row(
        "nothing changed, fresh process (median of 5)",
        secs(f),
        secs(r),
        ratio(f, r),
    );
    // What ferry compares by default (hard links, ACLs, xattrs) is rsync's -aHAX: the module
    // of the -aHAXS copy brought up to date, then compared again with nothing changed.
    site.rsync_into(site.rsync_port, "hax", &["-HAXS"]);
    let (rh, _) = site.rsync_into(site.rsync_port, "hax", &["-HAXS"]);
    row("  (rsync -aHAXS)", secs(f), secs(rh), ratio(f, rh));

    restore_rows(&site, &pin);

    // Every small file rewritten: with history on, each old version is kept.
    let (n, _) = write_small(&site.src, 1);
    Command::new("sync").status().unwrap();
    let (f, _) = site.ferry_once();
    let (r, _) = site.rsync_once(site.rsync_port, &[]);
    row(
        &format!(
            "{n} files rewritten (history {})",
            if with_history() { "on" } else { "off" }
        ),
        secs(f),
        secs(r),
        ratio(f, r),
    );

    // One new 1 GiB file, beside the disk.
    let gib = scaled(1 << 30);
    write_big(&site.src.join("new-1g.img"), gib, 1 << 40);
    Command::new("sync").status().unwrap();
    peak_rss(recv_pid);
    let (f, f_rss) = site.ferry_once();
    let recv_rss = peak_rss(recv_pid);
    let (r, _) = site.rsync_once(site.rsync_port, &[]);
    let disk = disk_write(&site.dir, gib);
    row("one new 1 GiB file", secs(f), secs(r), ratio(f, r));
    let mib_s = |d: Duration| gib as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "  ferry {:.0} MiB/s; the disk's own write + fdatasync: {:.0} MiB/s ({:.0}%)",
        mib_s(f),
        mib_s(disk),
        100.0 * mib_s(f) / mib_s(disk)
    );
    println!(
        "  peak RSS with the 1 GiB file: sender {} MB, receiver {} MB",
        f_rss / 1024,
        recv_rss / 1024
    );

    // A burst under the live daemon.
    let n = scaled(50_000);
    let mut daemon = ferry(&["send", "--config"])
        .arg(site.dir.join("send/sender.toml"))
        .env("FERRY_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = daemon.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("reconciled") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(120)).unwrap();
    let written = burst(&site.src, n);
    let f = converged(&site.ferry_dst, n, written);
    let _ = daemon.kill();
    let _ = daemon.wait();
    match lsyncd_burst(&site, n) {
        Some(l) => row(
            &format!("burst of {n} files, live, after the last write"),
            secs(f),
            secs(l) + " (lsyncd)",
            ratio(f, l),
        ),
        None => println!(
            "{:<44} {:>14} {:>14}",
            format!("burst of {n} files, live, after the last write"),
            secs(f),
            "lsyncd not installed"
        ),
    }
    if let Some(shape) = link {
        cap_row(&site, &pin, shape);
    }
}

/// A target capped at a quarter of the link (`bwlimit_kib`), sending one new file that needs
/// 75 s at the cap: what crossed the link in the minute after the first 10 s, against the cap.
fn cap_row(site: &Site, pin: &str, shape: Shape) {
    let kib = (shape.bytes_per_s / 4.0 / 1024.0) as u64;
    let file = site.src.join("capped.img");
    write_big(&file, (kib * 1024 * 75) as usize, 1 << 44);
    let counter = Counter::start(site.ferry_port);
    site.sender_config(counter.port, pin, "bench");
    let config = site.dir.join("send/sender.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[[sync]]", &format!("bwlimit_kib = {kib}\n[[sync]]"), 1);
    std::fs::write(&config, text).unwrap();
    let mut sender = ferry(&["send", "--once", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let (before, _) = counter.take();
    std::thread::sleep(Duration::from_secs(60));
    let (sent, _) = counter.take();
    let _ = sender.kill();
    let _ = sender.wait();
    let rate = sent as f64 / 1024.0 / 60.0;
    println!(
        "{:<44} {:>14} {:>14} {:>8.3}×",
        format!("bwlimit_kib = {kib}, over a minute"),
        format!("{rate:.0} KiB/s"),
        format!("{kib} KiB/s (cap)"),
        rate / kib as f64
    );
    assert!(before > 0, "nothing crossed in the first 10 s");
    site.sender_config(site.ferry_port, pin, "bench");
    std::fs::remove_file(&file).unwrap();
}

/// A source host pulling the module back, beside `rsync -a` pulling the same tree from the
/// rsyncd: into an empty directory (ferry fsyncs every file, rsync none: `--fsync` shown too),
/// then over those copies after 1 MiB of their big file was damaged, through counting proxies.
fn restore_rows(site: &Site, pin: &str) {
    let config = site.dir.join("send/sender.toml");
    let restore = |dest: &Path| {
        timed(
            ferry(&["restore", "--config"])
                .arg(&config)
                .args(["--group", "bench"])
                .arg(dest),
        )
    };
    let pull = |port: u16, dest: &Path, extra: &[&str]| {
        timed(
            Command::new("rsync")
                .arg("-a")
                .args(extra)
                .arg(format!("rsync://127.0.0.1:{port}/bench/"))
                .arg(format!("{}/", dest.display())),
        )
    };
    let (fd, rd, rfd) = (
        site.dir.join("restore-ferry"),
        site.dir.join("restore-rsync"),
        site.dir.join("restore-rsync-fsync"),
    );
    let (fd2, rd2) = (
        site.dir.join("restore-ferry-2"),
        site.dir.join("restore-rsync-2"),
    );
    // Both sides read their module from memory, as they did before the 1 MiB change: that
    // change left ferry's big file a clone of its old version, whose pages the receiver
    // never read (it wrote the changed MiB), while rsync's receiver wrote its copy whole
    // through the page cache; ferry's first restore would read 255 MiB from disk that
    // rsync's pull finds in memory.
    warm(&site.ferry_dst);
    warm(&site.rsync_dst);
    // Two rounds in both orders, as for the initial sync: one pull alone is at the mercy
    // of the disk's moment.
    Command::new("sync").status().unwrap();
    let (f1, _) = restore(&fd);
    let (r1, _) = pull(site.rsync_port, &rd, &[]);
    row(
        "restore into an empty dir (ferry first)",
        secs(f1),
        secs(r1),
        ratio(f1, r1),
    );
    let (r2, _) = pull(site.rsync_port, &rd2, &[]);
    let (f2, _) = restore(&fd2);
    row(
        "restore into an empty dir (rsync first)",
        secs(f2),
        secs(r2),
        ratio(f2, r2),
    );
    let (f, r) = (f1 + f2, r1 + r2);
    row(
        "restore into an empty dir, both rounds",
        secs(f),
        secs(r),
        ratio(f, r),
    );
    for d in [&fd2, &rd2] {
        let _ = std::fs::remove_dir_all(d);
    }
    let (rf, _) = pull(site.rsync_port, &rfd, &["--fsync"]);
    row("  (rsync --fsync)", secs(f1), secs(rf), ratio(f1, rf));
    let _ = std::fs::remove_dir_all(&rfd);

    let mut patch = vec![0u8; 1 << 20];
    fill(&mut patch, 11);
    for dest in [&fd, &rd] {
        let big = dest.join("big.img");
        let len = std::fs::metadata(&big).unwrap().len();
        let patch = &patch[..patch.len().min(len as usize / 4)];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&big)
            .unwrap()
            .write_all_at(patch, len / 3)
            .unwrap();
    }
    let ferry_proxy = Counter::start(site.ferry_port);
    let rsync_proxy = Counter::start(site.rsync_port);
    site.sender_config(ferry_proxy.port, pin, "bench");
    let (f, _) = restore(&fd);
    let (fu, fdn) = ferry_proxy.take();
    let (r, _) = pull(rsync_proxy.port, &rd, &[]);
    let (ru, rdn) = rsync_proxy.take();
    site.sender_config(site.ferry_port, pin, "bench");
    row(
        "restore over 1 MiB damaged: time",
        secs(f),
        secs(r),
        ratio(f, r),
    );
    row(
        "  bytes on the wire, both directions",
        format!("{:.2} MB", (fu + fdn) as f64 / 1e6),
        format!("{:.2} MB", (ru + rdn) as f64 / 1e6),
        (fu + fdn) as f64 / (ru + rdn) as f64,
    );
    let _ = std::fs::remove_dir_all(&fd);
    let _ = std::fs::remove_dir_all(&rd);
}

/// The same burst (written again under a fresh name) through lsyncd with delay 0 into the
/// rsyncd; `None` without lsyncd.
fn lsyncd_burst(site: &Site, n: usize) -> Option<Duration> {
    if Command::new("lsyncd").arg("-version").output().is_err() {
        // Not installed.
        return None;
    }
    std::fs::remove_dir_all(site.src.join("burst")).unwrap();
    // lsyncd starts with a full rsync; let it settle on the tree first.
    let _ = site.rsync_once(site.rsync_port, &["--delete"]);
    let conf = site.dir.join("lsyncd.lua");
    std::fs::write(
        &conf,
        format!(
            "settings {{ nodaemon = true, insist = true }}\n\
             sync {{ default.rsync, source = {:?}, target = \"rsync://127.0.0.1:{}/bench/\", \
             delay = 0, rsync = {{ archive = true }} }}\n",
            site.src.display().to_string(),
            site.rsync_port
        ),
    )
    .unwrap();
    let mut lsyncd = Command::new("lsyncd")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let log = lsyncd.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("Startup of") && line.contains("finished") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(300)).ok()?;
    let written = burst(&site.src, n);
    let took = converged(&site.rsync_dst, n, written);
    let _ = lsyncd.kill();
    let _ = lsyncd.wait();
    Some(took)
}
