//! Fan-in: many senders push small files at once, (a) into one receiver whose modules are on
//! a local disk, (b) into two gateways whose modules are on one GlusterFS volume (each gateway
//! its own FUSE mount, each module's write lease on the volume). The same load, one run, side
//! by side:
//! - *paced*: every sender writes a file, waits about `FERRY_FANIN_SPACING_MS` (10,000,
//!   jittered: 100 files/s offered by 1,000 senders, below what either side can take, so the
//!   figure is latency and not a queue), `FERRY_FANIN_PACED` times: close → durable latency (the file's close to the `Ack` of the
//!   batch that carried it: durable under its final name), p50 / p99 / max;
//! - *flat out*: every sender sends `FERRY_FANIN_FLAT` files back to back: throughput (all
//!   files over the time the last of them was acknowledged), and fairness (when the slowest
//!   sender finished against the median one);
//! - the receivers' peak memory (`VmHWM`).
//!
//! The senders are tasks of this process, `FERRY_FANIN_SENDERS` of them (1,000), each its own
//! TLS session and its own source directory, sending through the live pipeline a daemon uses
//! (`send_batch`); there is no watcher (each sender's batch names its file). They are spread
//! over `FERRY_FANIN_MODULES` modules (10), each sender in a directory of its own there; on
//! GlusterFS the even modules go through gateway A, the odd ones through B, so each holds half
//! of the leases. Connections are opened 8 at a time (a receiver admits 16 handshakes per
//! address at once; here every sender is 127.0.0.1).
//!
//! Run as root, with Debian's `glusterfs-server`: `cargo bench --bench fanin`.
//! `FERRY_FANIN_GLUSTER=0` runs the local half only (said in the output). Every step has a
//! deadline; the bench stops by itself.

#[path = "../tests/common/gluster.rs"]
#[allow(dead_code)]
mod gluster;

use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::{Fingerprint, RelPath};
use ferry_sender::batch::{send_batch, Learned};
use ferry_sender::coalesce::{Change, Need};
use ferry_sender::config::SyncGroup;
use ferry_sender::execute::{Report, Step};
use ferry_sender::queue::Batch;
use ferry_sender::session::Session;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Barrier, Semaphore};

/// A step of the bench that takes longer than this is a failure, not a figure.
const DEADLINE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
struct Load {
    senders: usize,
    modules: usize,
    paced: usize,
    spacing: Duration,
    flat: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One receiver process, killed when dropped.
struct Receiver {
    child: Child,
    address: String,
}

impl Receiver {
    fn start(config: &Path, log: &Path) -> Receiver {
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["receive", "--config"])
            .arg(config)
            .env("FERRY_LOG", "warn,ferry_receiver::server=info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .expect("ferry receive");
        // Killed on a failed assertion below too.
        let mut receiver = Receiver {
            child,
            address: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(at) = text.find("listen=") {
                let address = text[at + 7..].split_whitespace().next().unwrap();
                receiver.address = address.to_string();
                return receiver;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory so far, in MiB.
    fn peak_mib(&self) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM");
        kib / 1024.0
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A receiver's configuration: modules `m0`.. at `served/mK`, their leases (if any) at
/// `leases/mK`.
fn receiver_config(
    dir: &Path,
    gateway: &str,
    served: &Path,
    leases: Option<&Path>,
    client: &Fingerprint,
    modules: usize,
) -> PathBuf {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\ngateway = {gateway:?}\n"
    );
    for k in 0..modules {
        let path = served.join(format!("m{k}"));
        fs::create_dir_all(&path).unwrap();
        text += &format!(
            "[modules.m{k}]\npath = {:?}\nclients = [\"{client}\"]\nread_only = false\n",
            path.display().to_string()
        );
        if let Some(leases) = leases {
            text += &format!(
                "lease = {:?}\n",
                leases.join(format!("m{k}")).display().to_string()
            );
        }
    }
    let config = dir.join("receiver.toml");
    fs::write(&config, text).unwrap();
    config
}

/// What one side of the run measured.
struct Figures {
    connect: Duration,
    paced: Vec<Duration>,
    flat_files: usize,
    /// Each sender's finishing time in the flat-out phase, sorted.
    finish: Vec<Duration>,
    peak_mib: Vec<f64>,
}

/// A jitter in [0.5, 1.5) that is the same in both halves of the run.
fn jitter(i: usize, j: usize) -> f64 {
    0.5 + ((i * 7919 + j * 104_729) % 1000) as f64 / 1000.0
}

/// The 4 KiB of sender `i`'s file `j` of a phase.
fn body(phase: char, i: usize, j: usize) -> String {
    format!("{phase} {i:>6} {j:>6}\n").repeat(256)
}

/// Sends the batch that names `path` (with `need`); every failure is the bench's failure.
async fn send(session: &Arc<Session>, group: &SyncGroup, path: &str, need: Need) {
    let mut batch = Batch::default();
    batch.add(Change::Path {
        path: RelPath::from(path),
        need,
        since: Instant::now(),
    });
    let mut report = Report::default();
    let mut learned = Learned::default();
    let mut quiet = |_: &Step| {};
    tokio::time::timeout(
        DEADLINE,
        send_batch(
            session,
            group,
            &mut learned,
            &batch,
            &mut report,
            &mut quiet,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("{path}: not acknowledged in {DEADLINE:?}"))
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(report.failures.is_empty(), "{path}: {:?}", report.failures);
}

/// One sender: connects, makes its directory, then the paced and the flat-out phase (each
/// started for all senders at once). Returns its paced latencies and flat-out finishing time.
#[allow(clippy::too_many_arguments)]
async fn sender(
    i: usize,
    address: String,
    pin: Fingerprint,
    identity: Arc<Identity>,
    src: PathBuf,
    load: Load,
    connecting: Arc<Semaphore>,
    phases: Arc<Barrier>,
) -> (Vec<Duration>, Duration) {
    let module = format!("m{}", i % load.modules);
    let own = format!("s{i}");
    fs::create_dir_all(src.join(&own)).unwrap();
    let session = {
        let _turn = connecting.acquire().await.unwrap();
        let connect = Session::connect(&address, pin, &identity, &module, Intent::Write, false);
        tokio::time::timeout(DEADLINE, connect)
            .await
            .unwrap_or_else(|_| panic!("sender {i}: no session in {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("sender {i}: {e}"))
    };
    let session = Arc::new(session);
    let mut group = SyncGroup::new(&format!("g{i}"), src.clone(), vec!["t".into()], &module);
    group.delete = false;
    send(&session, &group, &own, Need::Tree).await;
    let write = |name: String, body: String| {
        let path = src.join(&own).join(&name);
        async move {
            tokio::task::spawn_blocking(move || {
                fs::write(path, body).unwrap();
                Instant::now()
            })
            .await
            .unwrap()
        }
    };
    phases.wait().await;
    let mut paced = Vec::with_capacity(load.paced);
    for j in 0..load.paced {
        tokio::time::sleep(load.spacing.mul_f64(jitter(i, j))).await;
        let closed = write(format!("p{j}"), body('p', i, j)).await;
        send(&session, &group, &format!("{own}/p{j}"), Need::Content).await;
        paced.push(closed.elapsed());
    }
    phases.wait().await;
    let started = Instant::now();
    for j in 0..load.flat {
        write(format!("f{j}"), body('f', i, j)).await;
        send(&session, &group, &format!("{own}/f{j}"), Need::Content).await;
    }
    let finished = started.elapsed();
    session.close().await;
    (paced, finished)
}

/// Runs the load against `addresses[k % len]` for module `mK`; `receivers` are measured.
async fn run(
    load: Load,
    src: &Path,
    identity: Arc<Identity>,
    pin: Fingerprint,
    addresses: &[String],
    receivers: &[&Receiver],
) -> Figures {
    let connecting = Arc::new(Semaphore::new(8));
    // Every sender, and this task to time the phases.
    let phases = Arc::new(Barrier::new(load.senders + 1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..load.senders)
        .map(|i| {
            let address = addresses[(i % load.modules) % addresses.len()].clone();
            tokio::spawn(sender(
                i,
                address,
                pin,
                identity.clone(),
                src.join(format!("i{i}")),
                load,
                connecting.clone(),
                phases.clone(),
            ))
        })
        .collect();
    phases.wait().await;
    let connect = started.elapsed();
    phases.wait().await;
    let mut paced = Vec::new();
    let mut finish = Vec::new();
    for t in tasks {
        let (p, f) = t.await.expect("a sender failed");
        paced.extend(p);
        finish.push(f);
    }
    paced.sort();
    finish.sort();
    Figures {
        connect,
        paced,
        flat_files: load.senders * load.flat,
        finish,
        peak_mib: receivers.iter().map(|r| r.peak_mib()).collect(),
    }
}

/// Every sender's files are in its directory of its module, with their bytes.
fn check_arrived(load: Load, served: &Path) {
    for i in 0..load.senders {
        let dir = served.join(format!("m{}/s{i}", i % load.modules));
        for (name, body) in (0..load.paced)
            .map(|j| (format!("p{j}"), body('p', i, j)))
            .chain((0..load.flat).map(|j| (format!("f{j}"), body('f', i, j))))
        {
            let got = fs::read(dir.join(&name))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(&name).display()));
            assert_eq!(got, body.as_bytes(), "{}", dir.join(&name).display());
        }
    }
}

fn at(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn main() {
    let load = Load {
        senders: env_usize("FERRY_FANIN_SENDERS", 1000),
        modules: env_usize("FERRY_FANIN_MODULES", 10).max(1),
        paced: env_usize("FERRY_FANIN_PACED", 3).max(1),
        spacing: Duration::from_millis(env_usize("FERRY_FANIN_SPACING_MS", 10_000) as u64),
        flat: env_usize("FERRY_FANIN_FLAT", 5).max(1),
    };
    let gluster = std::env::var("FERRY_FANIN_GLUSTER").map_or(true, |v| v != "0");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (identity, _, _) = Identity::generate("ferry-fanin-sender").unwrap();
    let identity = Arc::new(identity);
    let client = identity.fingerprint();
    let gateway_identity = tmp.path().join("identity");
    let pin = Identity::generate_into(&gateway_identity, "ferry-fanin-receiver")
        .unwrap()
        .fingerprint();
    let place = |name: &str| {
        let dir = tmp.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        for f in ["cert.pem", "key.pem"] {
            fs::copy(gateway_identity.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    println!(
        "fan-in: {} senders, {} modules; paced: {} files each, one per ~{} ms; flat out: {} \
         files each; 4 KiB files",
        load.senders,
        load.modules,
        load.paced,
        load.spacing.as_millis(),
        load.flat
    );

    // (a) One receiver, modules on the local disk.
    let local = {
        let dir = place("local");
        let served = tmp.path().join("local-served");
        let config = receiver_config(&dir, "local", &served, None, &client, load.modules);
        let r = Receiver::start(&config, &dir.join("log"));
        let src = tmp.path().join("src-local");
        let figures = runtime.block_on(run(
            load,
            &src,
            identity.clone(),
            pin,
            std::slice::from_ref(&r.address),
            &[&r],
        ));
        check_arrived(load, &served);
        figures
    };

    // (b) Two gateways, modules on one GlusterFS volume.
    let shared = gluster.then(|| {
        let mut volume = gluster::Volume::start(&tmp.path().join("gluster"));
        let second = tmp.path().join("gluster/mnt2");
        volume.mount_again(&second);
        let (a_dir, b_dir) = (place("gw-a"), place("gw-b"));
        let a_config = receiver_config(
            &a_dir,
            "gw-a",
            &volume.mount.join("served"),
            Some(&volume.mount.join("leases")),
            &client,
            load.modules,
        );
        fs::create_dir_all(volume.mount.join("leases")).unwrap();
        let b_config = receiver_config(
            &b_dir,
            "gw-b",
            &second.join("served"),
            Some(&second.join("leases")),
            &client,
            load.modules,
        );
        let a = Receiver::start(&a_config, &a_dir.join("log"));
        let b = Receiver::start(&b_config, &b_dir.join("log"));
        let src = tmp.path().join("src-gluster");
        let figures = runtime.block_on(run(
            load,
            &src,
            identity.clone(),
            pin,
            &[a.address.clone(), b.address.clone()],
            &[&a, &b],
        ));
        check_arrived(load, &volume.mount.join("served"));
        drop((a, b));
        drop(volume);
        figures
    });

    let rate = |f: &Figures| f.flat_files as f64 / f.finish.last().unwrap().as_secs_f64();
    let row = |label: &str, f: &Figures| {
        let median = f.finish[f.finish.len() / 2].as_secs_f64();
        let slowest = f.finish.last().unwrap().as_secs_f64();
        println!(
            "{label:<34} connect {:>6.2} s | paced p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms \
             | flat {:>7.0} files/s in {:>6.2} s, sender finish median {:>6.2} s slowest {:>6.2} s \
             ({:.2}x) | receiver peak {}",
            f.connect.as_secs_f64(),
            at(&f.paced, 0.5),
            at(&f.paced, 0.99),
            at(&f.paced, 1.0),
            rate(f),
            slowest,
            median,
            slowest,
            slowest / median.max(1e-9),
            f.peak_mib
                .iter()
                .map(|m| format!("{m:.0} MiB"))
                .collect::<Vec<_>>()
                .join(" + ")
        );
    };
    row("one receiver, local disk", &local);
    match &shared {
        Some(g) => {
            row("two gateways, one GlusterFS volume", g);
            println!(
                "ratios (GlusterFS / local): paced p99 {:.2}x, flat throughput {:.2}x",
                at(&g.paced, 0.99) / at(&local.paced, 0.99),
                rate(g) / rate(&local)
            );
        }
        None => println!("two gateways, one GlusterFS volume: not run (FERRY_FANIN_GLUSTER=0)"),
    }
}
