//! A module on a GlusterFS volume: Debian's `glusterfs-server` on this machine, one brick in
//! the test's directory, mounted through FUSE (installed by `.ci/run`; the test starts
//! `glusterd` and ends it, and stops and deletes its volume). Needs root.
//!
//! GlusterFS answers some calls differently from a local disk: no `O_TMPFILE` (files are
//! staged under reserved names), and a `syncfs` that never reaches the bricks (each file and
//! directory is flushed itself).

mod common;

use common::gluster::Volume;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A process killed when dropped (a failed assertion must not leave it holding the volume).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Entries of ferry's own (temporary names) left anywhere below `root`.
fn leftovers(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with(".ferry") {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    out
}

/// Waits (up to 60 s) until a file is staged in `dir` under one of ferry's temporary names:
/// files are staged beside their destination, so only that directory is watched.
fn wait_staged(dir: &Path, what: &str) {
    let staged = || {
        fs::read_dir(dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".ferry")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !staged() {
        assert!(Instant::now() < deadline, "{what} was never staged");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn verify(src: &Path, module: &Path) -> std::process::Output {
    run(ferry().arg("verify").arg(src).arg(module))
}

/// `mirror --once` of a tree of 60 directories onto the volume converges first time with
/// nothing of ferry's left (it used to fail thousands of files with "Not a directory" and
/// leave their temporary files); a live mirror follows renames, deletions and new files
/// there; a kill -9 in the middle of a file leaves a temporary file that the next run removes.
/// Then the daemons: `send --once` and `verify` into a receiver's module on the volume, and
/// kill -9 of that receiver while a live sender's file is staged: after its restart the module
/// converges with nothing left.
#[test]
fn a_module_on_glusterfs_converges_first_time_and_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let volume = Volume::start(dir.path());
    let (src, module) = (dir.path().join("src"), volume.mount.join("m"));
    fs::create_dir_all(&module).unwrap();
    for d in 0..60 {
        let sub = src.join(format!("d{d}/sub"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..10 {
            fs::write(sub.join(format!("f{f}")), format!("{d}/{f}").repeat(50)).unwrap();
        }
        std::os::unix::fs::symlink("sub/f0", src.join(format!("d{d}/link"))).unwrap();
    }
    let once = || run(ferry().args(["mirror", "--once"]).arg(&src).arg(&module));
    let o = once();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("os error"), "{}", stderr(&o));
    assert_eq!(leftovers(&module), Vec::<PathBuf>::new());
    let v = verify(&src, &module);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    assert!(
        stderr(&o).contains("flushed itself"),
        "the module's filesystem was not found to need a flush per file: {}",
        stderr(&o)
    );

    // Live: a directory renamed, one deleted, files added and appended to.
    let mut live = Running(
        ferry()
            .arg("mirror")
            .arg(&src)
            .arg(&module)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    fs::rename(src.join("d3"), src.join("moved"))
        .and_then(|()| fs::remove_dir_all(src.join("d5")))
        .and_then(|()| fs::write(src.join("d7/new"), b"new"))
        .unwrap();
    wait_equal(&src, &module, 60, "the live mirror on GlusterFS");

    // kill -9 while a 64 MiB file is being written into the module.
    let big: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(dir.path().join("big"), &big).unwrap();
    fs::rename(dir.path().join("big"), src.join("big")).unwrap();
    wait_staged(&module, "the big file");
    live.0.kill().unwrap();
    live.0.wait().unwrap();
    let o = once();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(leftovers(&module), Vec::<PathBuf>::new());
    let v = verify(&src, &module);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    assert_eq!(fs::read(module.join("big")).unwrap(), big);

    // The daemons: a receiver serving a module on the volume, `send --once`, then a live
    // sender and kill -9 of the receiver while a file is staged there.
    let site = Site::new();
    let served = volume.mount.join("served");
    let mut backup = Backup::start(site.root(), "recv", &[("file", &served)], &site.fingerprint);
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    site.assert_verified();
    let daemon = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    daemon.wait_log_n("reconciled", 1, 60);
    fs::rename(src.join("big"), src.join("big2")).unwrap();
    fs::write(dir.path().join("big"), &big[1..]).unwrap();
    fs::rename(dir.path().join("big"), src.join("big")).unwrap();
    wait_staged(&served, "the new file");
    let receiver = backup.receiver.take().unwrap();
    // SAFETY: a signal to a child of this test.
    unsafe { libc::kill(receiver.child.id() as i32, libc::SIGKILL) };
    drop(receiver);
    backup.restart();
    wait_equal(&src, &served, 90, "after the receiver came back");
    assert_eq!(leftovers(&served), Vec::<PathBuf>::new());
    drop(daemon);
    site.assert_verified();
    drop(backup);
    drop(volume);
}

/// A receiver serving module `file` at `module` as a gateway: its write lease at `lease`
/// (3 s), its history at `history`, its identity copied from `identity` (gateways to one
/// module share a certificate, so a sender pins one fingerprint). Returns its configuration
/// and port.
fn gateway(
    root: &Path,
    name: &str,
    identity: &Path,
    client: &str,
    module: &Path,
    lease: &Path,
    history: &Path,
) -> (PathBuf, u16) {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    for f in ["cert.pem", "key.pem"] {
        fs::copy(identity.join(f), dir.join(f)).unwrap();
    }
    let port = free_port();
    let config = dir.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\ngateway = {name:?}\n\
             [modules.file]\npath = {:?}\nclients = [{client:?}]\nread_only = false\n\
             lease = {:?}\nlease_seconds = 3\nhistory = {:?}\n{ANY_FREE_SPACE}",
            module.display().to_string(),
            lease.display().to_string(),
            history.display().to_string()
        ),
    )
    .unwrap();
    (config, port)
}

/// Two receivers on two addresses serve one module on the volume, each through its own mount:
/// the lease lets one write at a time, and the other refuses writers naming the holder. A
/// sender with both addresses writes through the first; kill -9 of it in the middle of a
/// burst, and the sender carries on through the second once the lease has gone unrenewed for
/// its expiry, losing nothing; the module ends exact with nothing of ferry's left. The killed
/// gateway, restarted, does not take the lease back while the other holds it. The module's
/// history, on the volume beside it, is written by whichever gateway holds the lease: its
/// journal keeps no write-ahead log (whose index is memory of one host), stays consistent
/// with its objects across the kill, and restores the moment before the burst.
#[test]
fn two_gateways_share_a_module_and_the_sender_fails_over_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut volume = Volume::start(dir.path());
    let second = dir.path().join("mnt2");
    volume.mount_again(&second);
    let site = Site::new();
    let src = site.dir("src");
    fill_tree(&src, 10, 20, |i| {
        format!("file {i}\n").repeat(40).into_bytes()
    });
    fs::create_dir_all(volume.mount.join("served")).unwrap();
    fs::create_dir_all(volume.mount.join("leases")).unwrap();
    let served = volume.mount.join("served");
    let identity = site.dir("identity");
    let pin = keygen(&identity);
    let (a_config, a_port) = gateway(
        site.root(),
        "gw-a",
        &identity,
        &site.fingerprint,
        &served,
        &volume.mount.join("leases/file"),
        &volume.mount.join("history/file"),
    );
    let (b_config, b_port) = gateway(
        site.root(),
        "gw-b",
        &identity,
        &site.fingerprint,
        &second.join("served"),
        &second.join("leases/file"),
        &second.join("history/file"),
    );
    let mut a = Receiver::start(&a_config);
    // A module with history is pruned by the lease holder, so a gateway takes the lease at
    // start: gw-a first, before gw-b is there to take it.
    a.wait_log_n("holding the write lease", 1, 30);
    let b = Receiver::start(&b_config);
    let (a_addr, b_addr) = (format!("127.0.0.1:{a_port}"), format!("127.0.0.1:{b_port}"));
    let target = |addresses: &str| {
        format!(
            "[targets.backup]\naddress = {addresses}\nfingerprint = {pin:?}\n{}",
            sync("file", &src, &["backup"], "file", "")
        )
    };
    // A one-off write through one gateway only.
    let through = |addr: &str| {
        let config = site.path("send/one.toml");
        fs::write(
            &config,
            format!(
                "cert = \"cert.pem\"\nkey = \"key.pem\"\n{}",
                target(&format!("{addr:?}"))
            ),
        )
        .unwrap();
        run(ferry().args(["send", "--once", "--config"]).arg(&config))
    };

    let _daemon = site.run(&target(&format!("[{a_addr:?}, {b_addr:?}]")), 1);
    wait_equal(&src, &served, 60, "the first sync through gw-a");
    let before = journal::tree(&src);
    let t0 = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(10));
    fs::write(src.join("d0/f0"), b"rewritten through gw-a").unwrap();
    wait_equal(&src, &served, 60, "a rewrite through gw-a");
    let gateway_in_use = || {
        site.status().1["targets"][0]["gateway"]
            .as_str()
            .map(String::from)
    };
    assert_eq!(gateway_in_use().as_deref(), Some(a_addr.as_str()));
    let o = through(&b_addr);
    assert!(
        !o.status.success(),
        "gw-b took a write while gw-a holds the lease"
    );
    assert!(
        stderr(&o).contains("gateway gw-a holds the write lease"),
        "{}",
        stderr(&o)
    );

    // A burst of 400 files; gw-a is killed once a quarter of them are written.
    let burst = src.join("burst");
    fs::create_dir(&burst).unwrap();
    let (writer, killed_at) = {
        let into = burst.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..400 {
                fs::write(
                    into.join(format!("b{i}")),
                    format!("burst {i}\n").repeat(100),
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while fs::read_dir(&burst).unwrap().count() < 100 {
            assert!(Instant::now() < deadline, "the burst did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: a signal to a child of this test.
        unsafe { libc::kill(a.child.id() as i32, libc::SIGKILL) };
        (writer, Instant::now())
    };
    let deadline = killed_at + Duration::from_secs(60);
    while gateway_in_use().as_deref() != Some(b_addr.as_str()) {
        assert!(
            Instant::now() < deadline,
            "no failover to gw-b in 60 s: {}",
            site.status().1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let failover = killed_at.elapsed();
    writer.join().unwrap();
    eprintln!(
        "failover to gw-b {:.1} s after kill -9 of gw-a (lease expiry 3 s)",
        failover.as_secs_f64()
    );
    assert!(
        failover <= Duration::from_secs(3 + 10),
        "failover took {failover:?}"
    );
    wait_equal(&src, &served, 120, "the burst through gw-b");
    site.wait_settled(60);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers(&served).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in the module: {:?}",
            leftovers(&served)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.log().contains("taking the write lease"), "{}", b.log());
    fs::remove_file(src.join("d1/f1")).unwrap();
    wait_equal(&src, &served, 60, "a deletion through gw-b");

    // gw-a comes back: gw-b holds the lease, so gw-a refuses writers, and the sender stays.
    let _ = a.stop();
    let a = Receiver::start(&a_config);
    let o = through(&a_addr);
    assert!(
        !o.status.success(),
        "the restarted gw-a took a write while gw-b holds the lease"
    );
    assert!(
        stderr(&o).contains("gateway gw-b holds the write lease"),
        "{}",
        stderr(&o)
    );
    fs::write(src.join("after"), b"after the restart").unwrap();
    wait_equal(&src, &served, 60, "a change after gw-a's restart");
    assert_eq!(gateway_in_use().as_deref(), Some(b_addr.as_str()));
    let v = verify(&src, &served);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));

    // The history: kept by gw-a before the kill and by gw-b after it, one journal.
    site.wait_settled(60);
    let history = volume.mount.join("history/file");
    for f in ["journal.sqlite3-wal", "journal.sqlite3-shm"] {
        assert!(!history.join(f).exists(), "{f} on a shared volume");
    }
    journal::assert_consistent(&history);
    let rows = journal::rows(&history);
    let row = |path: &str, action: &str| rows.iter().any(|r| r.1 == path && r.2 == action);
    assert!(row("d0/f0", "replaced"), "gw-a's replaced row: {rows:?}");
    assert!(row("d1/f1", "deleted"), "gw-b's deleted row: {rows:?}");
    let then = site.path("then");
    let o = run(ferry()
        .args(["restore", "--config"])
        .arg(&b_config)
        .args(["--module", "file", "--at", &t0])
        .arg(&then));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(journal::tree(&then), before, "the module at {t0}");
    drop((a, b));
    drop(volume);
}
