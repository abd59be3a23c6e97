//! Every attack ferry is tested against, in one place:
//! - a local user of a source host, who can write in a source tree, tries to make the
//!   root-run sender ship what lies outside it, or to stop the backup;
//! - a hostile sender (a peer with a pinned, valid certificate) and a local user of the backup
//!   host try to write or read outside a module, or to take the receiver down;
//! - peers that are not ferry at all (plain TCP, garbage, idle connections, floods).

mod common;

use common::pair::Pair;
use common::*;
use ferry_protocol::message::{Body, Intent, Message};
use ferry_protocol::meta::{Compare, Kind, Meta};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the flipping race runs (the issue asks for at least 10 s).
const RACE: Duration = Duration::from_secs(10);
/// Flips of a directory the symlink race must run before its verdict counts.
const MIN_FLIPS: u64 = 2000;

/// Files in `root` (recursively, symlinks not followed) whose bytes hold `marker`.
fn files_holding(root: &Path, marker: &[u8]) -> Vec<String> {
    // Each directory is opened beneath the one before, never through a symlink, and listed
    // through its descriptor: the module may legitimately hold a symlink (the source had one)
    // where a directory was a moment ago, and reading "dst/pub/f3" by path would then follow
    // it outside and find bytes the backup never held.
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let open_at = |dir: &OwnedFd, name: &std::ffi::OsStr, flags: libc::c_int| {
        let c = std::ffi::CString::new(name.as_bytes()).ok()?;
        // SAFETY: a valid descriptor and NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        // SAFETY: a descriptor just returned to us.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let Ok(top) = fs::File::open(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut stack = vec![(OwnedFd::from(top), root.to_path_buf())];
    while let Some((dir, shown)) = stack.pop() {
        let Ok(items) = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
            continue;
        };
        for item in items.flatten() {
            let name = item.file_name();
            if let Some(sub) = open_at(&dir, &name, libc::O_RDONLY | libc::O_DIRECTORY) {
                stack.push((sub, shown.join(&name)));
            } else if let Some(fd) = open_at(&dir, &name, libc::O_RDONLY | libc::O_NONBLOCK) {
                let mut file = fs::File::from(fd);
                let mut bytes = Vec::new();
                let regular = file.metadata().is_ok_and(|m| m.is_file());
                if regular
                    && file.read_to_end(&mut bytes).is_ok()
                    && bytes.windows(marker.len()).any(|w| w == marker)
                {
                    out.push(shown.join(&name).display().to_string());
                }
            }
        }
    }
    out
}

on_each_watcher! {
    /// A directory of the source flipped between a real directory and a symlink to a
    /// root-only directory elsewhere, thousands of times, while its files are written: no
    /// byte from outside reaches the backup, the flipping never stops the target (one name
    /// coming and going counts once against the delete guard), and the backup is exact after.
    fn a_directory_flipped_into_a_symlink_leaks_nothing_and_stops_nothing(watcher) {
        let live = Site::watching(watcher);
        let src = live.dir("src");
        let dst = live.root().join("dst");
        let secret = live.dir("secret");
        set_mode(&secret, 0o700);
        fs::create_dir(src.join("pub")).unwrap();
        for i in 0..50 {
            fs::write(src.join(format!("pub/f{i}")), format!("public {i}\n")).unwrap();
            let s = secret.join(format!("f{i}"));
            fs::write(&s, format!("SECRET-BYTES {i}\n")).unwrap();
            set_mode(&s, 0o600);
        }
        // The scanner finds what is there (it would see a leak).
        assert_eq!(files_holding(&secret, b"SECRET-BYTES").len(), 50);
        let backup = Backup::start(live.root(), "recv", &[("file", &dst)], &live.fingerprint);
        let daemon = live.run(&one_group(&backup, &src, ""), 1);
        wait_equal(&src, &dst, 30, "initial sync");

        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(AtomicU64::new(0));
        let leaks_seen = Arc::new(AtomicU64::new(0));
        let scans = Arc::new(AtomicU64::new(0));
        let flipper = {
            let (src, secret, stop, flips) = (src.clone(), secret.clone(), stop.clone(), flips.clone());
            std::thread::spawn(move || {
                let (real, aside) = (src.join("pub"), src.join("pub.real"));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = n % 50;
                    fs::write(real.join(format!("f{k}")), format!("public {k} {n}\n")).unwrap();
                    fs::rename(&real, &aside).unwrap();
                    symlink(&secret, &real).unwrap();
                    // Written while the name points outside: the sender hears of pub.real/fK
                    // and of pub, and reads them while the names keep moving.
                    fs::write(aside.join(format!("f{}", (k + 1) % 50)), format!("p {n}\n")).unwrap();
                    fs::remove_file(&real).unwrap();
                    fs::rename(&aside, &real).unwrap();
                    n += 1;
                    flips.store(n, Ordering::Relaxed);
                }
            })
        };
        let scanner = {
            let (dst, stop, leaks, scans) = (dst.clone(), stop.clone(), leaks_seen.clone(), scans.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let found = files_holding(&dst, b"SECRET-BYTES");
                    if !found.is_empty() {
                        eprintln!("outside bytes in the backup: {found:?}");
                        leaks.fetch_add(found.len() as u64, Ordering::Relaxed);
                    }
                    scans.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        // At least RACE and at least MIN_FLIPS flips (a loaded machine flips slower), within
        // a bound.
        let started = Instant::now();
        while (started.elapsed() < RACE || flips.load(Ordering::Relaxed) < MIN_FLIPS)
            && started.elapsed() < 6 * RACE
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        scanner.join().unwrap();
        let flips = flips.load(Ordering::Relaxed);
        assert!(flips >= MIN_FLIPS, "the race ran only {flips} flips");
        assert!(scans.load(Ordering::Relaxed) >= 10, "the backup was scanned too rarely");

        wait_equal(&src, &dst, 60, "after the race");
        let found = files_holding(&dst, b"SECRET-BYTES");
        assert!(found.is_empty(), "outside bytes in the backup after the race: {found:?}");
        assert_eq!(
            leaks_seen.load(Ordering::Relaxed),
            0,
            "outside bytes reached the backup during the race ({flips} flips)"
        );
        let log = daemon.log();
        assert!(
            !log.contains("target stopped") && !log.contains("delete guard"),
            "the flipping stopped the target ({flips} flips): {log}"
        );
        // Still following after the race.
        fs::write(src.join("after"), "after\n").unwrap();
        wait_equal(&src, &dst, 20, "a change after the race");
        eprintln!("{flips} flips in {RACE:?}, none leaked, the target kept going");
    }
}

// ---- A hostile sender, and a local user of the backup host, against the receiver in memory.

/// Flips a directory between itself and a symlink to `outside` in a tight loop until stopped.
struct Flipper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Flipper {
    fn start(d: std::path::PathBuf, outside: std::path::PathBuf) -> Flipper {
        let parked = d.with_extension("parked");
        fs::create_dir_all(&d).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut flips = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if fs::rename(&d, &parked).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &d);
                    std::thread::yield_now();
                    let _ = fs::remove_file(&d);
                    let _ = fs::rename(&parked, &d);
                    flips += 1;
                }
            }
            flips
        });
        Flipper { stop, thread }
    }

    /// Stops flipping (the directory is left real); returns how many flips ran.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A local user on the backup host flips a module directory between a real directory and a
/// symlink to somewhere else while the sender writes into it. The race runs for 3 s; nothing
/// may land outside the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_flipped_to_a_symlink_never_lets_a_write_out() {
    let mut pair = Pair::new();
    let outside = pair.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let flipper = Flipper::start(pair.dst.join("d"), outside.clone());
    let session = pair.session().await;
    let dir_meta = Meta {
        kind: Kind::Dir,
        mode: 0o755,
        ..file_meta(0)
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    let mut i = 0u64;
    let mut whole = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let name = |what: &str| RelPath::from(format!("d/{what}{i}").as_str());
        let _ = push_whole(&session, &name("f").to_string(), b"escaped?").await;
        // A run of whole files into one directory, which the receiver resolves once.
        let mut run = Vec::new();
        for k in 0..4 {
            let (id, rx) = session.register();
            let path = name(&format!("w{k}."));
            let data = b"escaped?".to_vec();
            let digest = *blake3::hash(&data).as_bytes();
            let meta = file_meta(data.len() as u64);
            let file = common::whole_file(id, &path, meta, data, digest);
            session.send(file).await.unwrap();
            run.push((rx, path));
        }
        for (mut rx, path) in run {
            whole += u64::from(session.expect_ack(&mut rx, &path).await.is_ok());
        }
        let requests = [
            Message::Mkdir {
                id: 0,
                path: name("m"),
                meta: dir_meta.clone(),
            },
            Message::Symlink {
                id: 0,
                path: name("l"),
                target: b"x".to_vec(),
                meta: Meta {
                    kind: Kind::Symlink,
                    ..file_meta(0)
                },
            },
            Message::SetMeta {
                id: 0,
                path: name("f"),
                meta: Meta {
                    mode: 0o777,
                    ..file_meta(8)
                },
            },
            Message::Rename {
                id: 0,
                from: name("f"),
                to: name("g"),
            },
            Message::Delete {
                id: 0,
                path: name("m"),
            },
        ];
        for r in requests {
            let _ = session
                .call(|id| match r {
                    Message::Mkdir { path, meta, .. } => Message::Mkdir { id, path, meta },
                    Message::Symlink {
                        path, target, meta, ..
                    } => Message::Symlink {
                        id,
                        path,
                        target,
                        meta,
                    },
                    Message::SetMeta { path, meta, .. } => Message::SetMeta { id, path, meta },
                    Message::Rename { from, to, .. } => Message::Rename { id, from, to },
                    Message::Delete { path, .. } => Message::Delete { id, path },
                    other => other,
                })
                .await;
        }
    }
    let flips = flipper.stop();
    let escaped: Vec<_> = fs::read_dir(&outside).unwrap().collect();
    eprintln!(
        "{i} rounds of writes against {flips} flips ({whole} whole files landed); {} entries outside",
        escaped.len()
    );
    assert!(flips > 100, "the race did not run ({flips} flips)");
    assert!(i > 100, "the writes did not run ({i} rounds)");
    assert!(
        escaped.is_empty(),
        "written outside the module: {escaped:?}"
    );
}

/// A local user on the backup host flips a module directory between a real directory and a
/// symlink to somewhere else while a sender lists and verifies the module: no name from
/// outside may ever show (the walk used to read directories by path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_flipped_to_a_symlink_showed_outside_names_in_listings() {
    let mut pair = Pair::new();
    let outside = pair.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("outside-secret"), "not yours").unwrap();
    fs::create_dir(pair.dst.join("d")).unwrap();
    fs::write(pair.dst.join("d/inside"), "yours").unwrap();
    let flipper = Flipper::start(pair.dst.join("d"), outside.clone());
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    let (mut rounds, mut inside_seen) = (0u64, 0u64);
    while Instant::now() < deadline {
        rounds += 1;
        // A fresh session per round: a session builds its verification tree once.
        let session = pair.open("file", Intent::Read).await.unwrap();
        let mut names: Vec<String> = Vec::new();
        for under in [RelPath::root(), RelPath::from("d")] {
            if let Ok(entries) = session.list(&under, Namespaces::ALL).await {
                names.extend(entries.iter().map(|e| e.path.to_string()));
            }
        }
        if let Ok((_, entries)) = session
            .verify_dir(&RelPath::from("d"), rounds % 2 == 0, Compare::all(false))
            .await
        {
            names.extend(entries.iter().map(|e| e.entry.path.to_string()));
        }
        inside_seen += names.iter().filter(|n| *n == "d/inside").count() as u64;
        assert!(
            !names.iter().any(|n| n.contains("outside-secret")),
            "round {rounds}: a name from outside the module was listed: {names:?}"
        );
        session.close().await;
    }
    let flips = flipper.stop();
    eprintln!(
        "{rounds} rounds of listings against {flips} flips; d/inside seen {inside_seen} times"
    );
    assert!(flips > 100, "the race did not run ({flips} flips)");
    assert!(rounds > 50, "the listings did not run ({rounds} rounds)");
    // The same listings, the directory left real, do show the module's own file: they were
    // not refusing everything (during the race, whether one caught `d` real is luck).
    let session = pair.open("file", Intent::Read).await.unwrap();
    let listed = session
        .list(&RelPath::from("d"), Namespaces::ALL)
        .await
        .unwrap();
    let (_, digests) = session
        .verify_dir(&RelPath::from("d"), true, Compare::all(false))
        .await
        .unwrap();
    session.close().await;
    assert!(
        listed.iter().any(|e| e.path == RelPath::from("d/inside"))
            && digests
                .iter()
                .any(|e| e.entry.path == RelPath::from("d/inside")),
        "the listings do not show the module's own file: {listed:?}"
    );
}

/// The hostile-client suite: one session speaks the protocol badly on purpose — paths out of
/// the module, reserved names, a digest that lies, a delta reaching past its base, a window
/// larger than the file, a body longer than announced, an unknown request id, files in flight
/// past the cap — while a well-behaved session on the same module keeps pushing files. Every
/// attack is refused with a reason, the attacker's session itself goes on, nothing lands
/// outside the module or half-written inside it, and the good sender is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_is_refused_while_a_good_sender_is_served() {
    let mut pair = Pair::new();
    let outside = pair.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, pair.dst.join("evil")).unwrap();
    fs::write(pair.dst.join("plainfile"), "x").unwrap();
    fs::write(pair.dst.join("base"), pseudo_random(64 << 10, 9)).unwrap();
    let good = pair.session().await;
    let attacker = pair.session().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good_files = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let served = {
        let (good, stop, count) = (good.clone(), stop.clone(), good_files.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = pseudo_random(1000 + n as usize, n);
                push_whole(&good, &format!("good{n}"), &data)
                    .await
                    .unwrap_or_else(|e| panic!("the good sender was refused: {e}"));
                n += 1;
                count.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            n
        })
    };
    let mut refusals: Vec<String> = Vec::new();
    let dir = Meta {
        kind: Kind::Dir,
        ..file_meta(0)
    };
    for path in [
        &b"../outside/x"[..],
        b"/tmp/abs",
        b"evil/x",
        b"a\0b",
        b"a//b",
        b".ferry-tmp.1.2.3",
        b"sub/.ferry-tmp.x",
        b"plainfile/x",
    ] {
        let path = RelPath::from_bytes(path.to_vec());
        let (p1, p2, p3) = (path.clone(), path.clone(), path.clone());
        let mkdir = attacker
            .call(|id| Message::Mkdir {
                id,
                path: p1,
                meta: dir.clone(),
            })
            .await;
        let e = mkdir.expect_err("mkdir must be refused").to_string();
        assert!(e.contains("refused path"), "{path:?}: {e}");
        refusals.push(e);
        let e = push_whole(&attacker, &p2.to_string(), b"x").await;
        refusals.push(e.expect_err("a file must be refused").to_string());
        let e = attacker.call(|id| Message::Delete { id, path: p3 }).await;
        refusals.push(e.expect_err("a delete must be refused").to_string());
    }
    let e = attacker
        .call(|id| Message::Rename {
            id,
            from: RelPath::from("plainfile"),
            to: RelPath::from("evil/stolen"),
        })
        .await;
    refusals.push(e.expect_err("a rename out must be refused").to_string());
    // A digest that lies.
    let (id, mut rx) = attacker.register();
    for m in [
        Message::FileBegin {
            id,
            path: RelPath::from("liar"),
            meta: file_meta(1),
            body: Body::Whole,
        },
        Message::FileData {
            id,
            data: b"x".to_vec(),
        },
        Message::FileEnd {
            id,
            digest: [0; 32],
        },
    ] {
        attacker.send(m).await.unwrap();
    }
    let e = attacker
        .expect_ack(&mut rx, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("digest mismatch"), "{e}");
    refusals.push(e);
    // A whole file in one message that lies: about its digest, about its size, or with a
    // path out of the module.
    for (path, meta, data, digest, says) in [
        (
            "liar1",
            file_meta(1),
            b"x".to_vec(),
            [0; 32],
            "digest mismatch",
        ),
        (
            "long1",
            file_meta(4),
            vec![7; 4096],
            [0; 32],
            "more data than the announced 4",
        ),
        (
            "../up",
            file_meta(1),
            b"x".to_vec(),
            *blake3::hash(b"x").as_bytes(),
            "refused path",
        ),
        (
            "evil/in",
            file_meta(1),
            b"x".to_vec(),
            *blake3::hash(b"x").as_bytes(),
            "refused path",
        ),
    ] {
        let (id, mut rx) = attacker.register();
        let path = RelPath::from(path);
        let file = common::whole_file(id, &path, meta, data, digest);
        attacker.send(file).await.unwrap();
        let e = attacker
            .expect_ack(&mut rx, &path)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{path}: {e}");
        refusals.push(e);
    }
    // More body than announced.
    let (id, mut rx) = attacker.register();
    for m in [
        Message::FileBegin {
            id,
            path: RelPath::from("long"),
            meta: file_meta(4),
            body: Body::Whole,
        },
        Message::FileData {
            id,
            data: vec![7; 4096],
        },
        Message::FileEnd {
            id,
            digest: [0; 32],
        },
    ] {
        attacker.send(m).await.unwrap();
    }
    refusals.push(
        attacker
            .expect_ack(&mut rx, &Default::default())
            .await
            .unwrap_err()
            .to_string(),
    );
    // Deltas: a copy reaching past the base, and a window of 1 TiB. A malformed delta breaks
    // the protocol: the receiver says so and ends that session, so each goes on a session of
    // its own.
    for (window, delta) in [
        (
            16u64,
            // librsync magic, COPY (u64 offset, u64 len) past the 64 KiB base, END.
            [
                &[0x72, 0x73, 0x02, 0x36][..],
                &[0x54],
                &(1u64 << 40).to_be_bytes(),
                &16u64.to_be_bytes(),
                &[0],
            ]
            .concat(),
        ),
        (1 << 40, vec![0x72, 0x73, 0x02, 0x36, 0]),
    ] {
        let bad = pair.session().await;
        let (id, mut rx) = bad.register();
        bad.send(Message::FileBegin {
            id,
            path: RelPath::from("base"),
            meta: file_meta(window),
            body: Body::Delta,
        })
        .await
        .unwrap();
        match bad.reply(&mut rx).await {
            Ok(Message::Signature { .. }) => {
                // The session may already be gone when the end goes out.
                let _ = bad.send(Message::FileDelta { id, window, delta }).await;
                let end = Message::FileEnd {
                    id,
                    digest: [0; 32],
                };
                let _ = bad.send(end).await;
                let e = bad
                    .expect_ack(&mut rx, &Default::default())
                    .await
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("protocol violation"), "{e}");
                refusals.push(e);
            }
            Ok(other) => panic!("unexpected answer to a delta: {other:?}"),
            Err(e) => refusals.push(e.to_string()),
        }
    }
    // Data for a transfer that was never begun.
    attacker
        .send(Message::FileData {
            id: 999_999,
            data: b"stray".to_vec(),
        })
        .await
        .unwrap();
    // The attacker's own session still works for honest requests.
    push_whole(&attacker, "honest", b"fine").await.unwrap();
    // Past the cap of files in flight.
    let mut held = Vec::new();
    for i in 0..80 {
        let (id, rx) = attacker.register();
        attacker
            .send(Message::FileBegin {
                id,
                path: RelPath::from(format!("open{i}").as_str()),
                meta: file_meta(10),
                body: Body::Whole,
            })
            .await
            .unwrap();
        held.push(rx);
    }
    // Requests are handled in order: once this is answered, so are the 80.
    attacker.stats().await.unwrap();
    let mut capped = 0;
    for rx in held.iter_mut() {
        if let Ok(Message::Failed { error, .. }) = rx.try_recv() {
            assert!(error.contains("files in flight"), "{error}");
            capped += 1;
        }
    }
    assert_eq!(capped, 16, "80 begun, 64 allowed");
    // The attacker still holds its 64 files open: the good sender goes on being served (a
    // slow machine may need longer than the attacks took; a starved sender never gets there).
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while good_files.load(std::sync::atomic::Ordering::Relaxed) <= 10 {
        assert!(Instant::now() < deadline, "the good sender was starved");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pushed = served.await.unwrap();
    eprintln!(
        "{} attacks refused; the good sender pushed {pushed} files meanwhile",
        refusals.len()
    );
    for r in &refusals {
        eprintln!("  refused: {r}");
        assert!(!r.is_empty());
    }
    assert!(pushed > 10, "the good sender was starved: {pushed} files");
    for n in 0..pushed {
        assert_eq!(
            fs::read(pair.dst.join(format!("good{n}"))).unwrap(),
            pseudo_random(1000 + n as usize, n)
        );
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside"
    );
    assert_eq!(fs::read(pair.dst.join("honest")).unwrap(), b"fine");
    for name in ["liar", "long", "liar1", "long1", "open0", "stolen"] {
        assert!(!pair.dst.join(name).exists(), "{name} was committed");
    }
    assert!(
        !pair.dst.parent().unwrap().join("up").exists(),
        "../up was written"
    );
    assert_eq!(
        fs::read(pair.dst.join("base")).unwrap(),
        pseudo_random(64 << 10, 9),
        "a refused delta changed its base"
    );
}

/// A peer's holes are bounded by the size it announced, and a hole counts in the digest by
/// its place and length: a hole past the end is refused, a body whose digest counts the
/// hole's zeros as data is refused, an honest sparse body arrives sparse and exact.
#[tokio::test]
async fn a_hole_past_the_announced_size_is_refused_and_an_honest_one_stays_a_hole() {
    use std::os::unix::fs::MetadataExt;
    let mut pair = Pair::new();
    let session = pair.session().await;
    let send_all = |msgs: Vec<Message>| {
        let session = session.clone();
        async move {
            for m in msgs {
                session.send(m).await.unwrap();
            }
        }
    };
    // 1 PiB of hole in a file announced as 4 KiB.
    let (id, mut rx) = session.register();
    send_all(vec![
        Message::FileBegin {
            id,
            path: RelPath::from("huge"),
            meta: file_meta(4096),
            body: Body::Whole,
        },
        Message::FileHole { id, len: 1 << 50 },
        Message::FileEnd {
            id,
            digest: [0; 32],
        },
    ])
    .await;
    let e = session
        .expect_ack(&mut rx, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("hole past the announced 4096 bytes"), "{e}");
    assert!(!pair.dst.join("huge").exists());
    // 80 MiB: 1 MiB of data, a 62 MiB hole, 1 MiB of data, and a 16 MiB hole at the end.
    let data = pseudo_random(1 << 20, 9);
    let size = 80u64 << 20;
    let mut whole = vec![0u8; size as usize];
    whole[..1 << 20].copy_from_slice(&data);
    whole[63 << 20..64 << 20].copy_from_slice(&data);
    let mut body = ferry_protocol::body::BodyDigest::new();
    body.data(&data);
    body.hole(62 << 20);
    body.data(&data);
    body.hole(16 << 20);
    let sparse = |id, digest| {
        vec![
            Message::FileBegin {
                id,
                path: RelPath::from("sparse"),
                meta: file_meta(size),
                body: Body::Whole,
            },
            Message::FileData {
                id,
                data: data.clone(),
            },
            Message::FileHole { id, len: 62 << 20 },
            Message::FileData {
                id,
                data: data.clone(),
            },
            Message::FileHole { id, len: 16 << 20 },
            Message::FileEnd { id, digest },
        ]
    };
    let (id, mut rx) = session.register();
    send_all(sparse(id, *blake3::hash(&whole).as_bytes())).await;
    let e = session.expect_ack(&mut rx, &Default::default()).await;
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("content digest mismatch"));
    let (id, mut rx) = session.register();
    send_all(sparse(id, body.digest())).await;
    session
        .expect_ack(&mut rx, &Default::default())
        .await
        .unwrap();
    let got = pair.dst.join("sparse");
    assert_eq!(fs::read(&got).unwrap(), whole);
    let md = fs::metadata(&got).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 <= 3 << 20,
        "{} bytes allocated for 2 MiB of data",
        md.blocks() * 512
    );
}

/// A peer's `Link` and attributes are hostile input: a link reaches only a current regular
/// file of the module (never a symlink a local user planted, never a path outside), and
/// attributes outside what was announced, or a capability where setuid bits are not kept,
/// are refused or dropped.
#[tokio::test]
async fn links_and_attributes_from_a_peer_stay_inside_the_module() {
    use ferry_protocol::xattr::Xattrs;
    use std::os::unix::fs::MetadataExt;
    let mut pair = Pair::new();
    let session = pair.session().await;
    let request = |m: Message| {
        let session = session.clone();
        async move {
            let (id, mut rx) = session.register();
            let m = match m {
                Message::Link {
                    path, target, meta, ..
                } => Message::Link {
                    id,
                    path,
                    target,
                    meta,
                },
                Message::SetMeta { path, meta, .. } => Message::SetMeta { id, path, meta },
                other => other,
            };
            session.send(m).await.unwrap();
            session
                .expect_ack(&mut rx, &Default::default())
                .await
                .map_err(|e| e.to_string())
        }
    };
    let link = |path: &str, target: &str, meta: Meta| Message::Link {
        id: 0,
        path: RelPath::from(path),
        target: RelPath::from(target),
        meta,
    };
    let outside = pair.tmp.path().join("outside");
    fs::write(&outside, b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, pair.dst.join("planted")).unwrap();
    let mut meta = file_meta(6);
    let e = request(link("l1", "planted", meta.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("not current"), "{e}");
    let e = request(link("l2", "../outside", meta.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("l2"), "{e}");
    assert!(!pair.dst.join("l1").exists() && !pair.dst.join("l2").exists());
    assert_eq!(fs::metadata(&outside).unwrap().nlink(), 1);

    // A current file links; one that differs from what the sender believes does not.
    let f = pair.dst.join("f");
    fs::write(&f, b"hello!").unwrap();
    let mtime = fs::metadata(&f).unwrap().mtime();
    meta.mtime = mtime;
    meta.mtime_nsec = fs::metadata(&f).unwrap().mtime_nsec() as u32;
    request(link("sub-not-there/l3", "f", meta.clone()))
        .await
        .unwrap_err();
    request(link("l3", "f", meta.clone())).await.unwrap();
    assert_eq!(
        fs::metadata(pair.dst.join("l3")).unwrap().ino(),
        fs::metadata(&f).unwrap().ino()
    );
    let mut stale = meta.clone();
    stale.mtime -= 10;
    let e = request(link("l4", "f", stale)).await.unwrap_err();
    assert!(e.contains("not current"), "{e}");

    // Attributes: an undeclared namespace is refused; a capability is dropped where setuid
    // bits are not kept, the rest applied.
    let mut odd = meta.clone();
    odd.xattrs = Xattrs {
        covers: Namespaces::USER,
        list: vec![(b"trusted.x".to_vec(), b"1".to_vec())],
    };
    let set = |m: Meta| Message::SetMeta {
        id: 0,
        path: RelPath::from("f"),
        meta: m,
    };
    let e = request(set(odd)).await.unwrap_err();
    assert!(e.contains("outside the namespaces"), "{e}");
    let mut capable = meta.clone();
    capable.xattrs = Xattrs {
        covers: Namespaces::ALL,
        list: vec![
            (
                b"security.capability".to_vec(),
                vec![1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (b"user.a".to_vec(), b"1".to_vec()),
        ],
    };
    request(set(capable)).await.unwrap();
    let attrs = xattrs_of(&f);
    assert!(
        attrs.contains("user.a=") && !attrs.contains("security.capability"),
        "{attrs}"
    );
}

// ---- Hostile peers that once hurt the receiver (each named after the bug it pins).

/// A module file used as a delta base, truncated by a local user while the delta was applied,
/// killed the whole receiver with SIGBUS (the base was mapped). Now that file fails alone.
#[tokio::test]
async fn a_base_truncated_during_a_delta_killed_the_receiver_with_sigbus() {
    use ferry_protocol::delta;
    use ferry_protocol::message::Body;
    let mut pair = Pair::new();
    let base = pseudo_random(4 << 20, 1);
    fs::write(pair.dst.join("big"), &base).unwrap();
    let mut new = base.clone();
    new[10..20].fill(0);
    let meta = file_meta(new.len() as u64);
    let session = pair.session().await;
    let (id, mut rx) = session.register();
    let path = RelPath::from("big");
    session
        .send(Message::FileBegin {
            id,
            path,
            meta,
            body: Body::Delta,
        })
        .await
        .unwrap();
    let Message::Signature { signature, .. } = session.reply(&mut rx).await.unwrap() else {
        panic!("expected a signature");
    };
    // The local user truncates the base now.
    fs::OpenOptions::new()
        .write(true)
        .open(pair.dst.join("big"))
        .unwrap()
        .set_len(100)
        .unwrap();
    let index = delta::parse_peer_signature(signature).unwrap();
    let index = index.index();
    for window in new.chunks(delta::WINDOW) {
        let mut d = Vec::new();
        delta::diff_window(&index, window, &mut d).unwrap();
        session
            .send(Message::FileDelta {
                id,
                window: window.len() as u64,
                delta: d,
            })
            .await
            .unwrap();
    }
    let digest = *blake3::hash(&new).as_bytes();
    session.send(Message::FileEnd { id, digest }).await.unwrap();
    let failed = session
        .expect_ack(&mut rx, &Default::default())
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("big"), "{failed}");
    // This process (the receiver) is alive, and the session still works.
    session
        .call(|id| Message::Delete {
            id,
            path: RelPath::from("nothing"),
        })
        .await
        .unwrap();
}

/// 600 authenticated idle sessions: a new session got `Welcome` but was never served, because
/// every session held a blocking thread and the pool stops at 512.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_512_were_welcomed_and_never_served() {
    let mut pair = Pair::new();
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(pair.session().await);
    }
    let fresh = pair.session().await;
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        fresh.call(|id| Message::Delete {
            id,
            path: RelPath::from("x"),
        }),
    )
    .await
    .expect("the 601st session was never served");
    served.unwrap();
    // And the idle ones are still there and work.
    idle[0]
        .call(|id| Message::Delete {
            id,
            path: RelPath::from("y"),
        })
        .await
        .unwrap();
}

/// 600 sessions each served a request, then idle: a session's request loop keeps its
/// blocking thread only a moment after its queue runs dry, so all of them and a 601st are
/// served although the pool stops at 512 threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_served_then_idle_give_their_threads_back() {
    let mut pair = Pair::new();
    let mut idle = Vec::new();
    let within = Duration::from_secs(30);
    for i in 0..601 {
        let session = pair.session().await;
        let path = RelPath::from(format!("gone{i}").as_str());
        tokio::time::timeout(within, session.call(|id| Message::Delete { id, path }))
            .await
            .unwrap_or_else(|_| panic!("session {i} was never served"))
            .unwrap();
        idle.push(session);
    }
    // The first is still there and works.
    let path = RelPath::from("again");
    tokio::time::timeout(within, idle[0].call(|id| Message::Delete { id, path }))
        .await
        .expect("the first session was never served again")
        .unwrap();
}

/// 3,000 `FileBegin`s without `FileEnd` opened 3,000 descriptors and staging files.
#[tokio::test]
async fn file_begins_without_end_held_unbounded_descriptors() {
    use ferry_protocol::message::Body;
    let mut pair = Pair::new();
    let session = pair.session().await;
    let meta = file_meta(10);
    let mut replies = Vec::new();
    for i in 0..300 {
        let (id, rx) = session.register();
        let path = RelPath::from(format!("f{i}").as_str());
        let body = Body::Whole;
        session
            .send(Message::FileBegin {
                id,
                path,
                meta: meta.clone(),
                body,
            })
            .await
            .unwrap();
        replies.push(rx);
    }
    let fds_before_end = fs::read_dir("/proc/self/fd").unwrap().count();
    // Past the cap, each is refused at once.
    let refused = replies.split_off(ferry_receiver::incoming::MAX_FILES_IN_FLIGHT);
    for mut rx in refused {
        let e = session
            .expect_ack(&mut rx, &Default::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("files in flight"), "{e}");
    }
    assert!(
        fds_before_end < 64 + ferry_receiver::incoming::MAX_FILES_IN_FLIGHT + 100,
        "{fds_before_end} descriptors open"
    );
}

/// An unauthenticated peer that sent one 17 MiB frame before `Hello` cost the receiver 17 MB
/// of memory per connection. Now its frame is refused from its length alone.
#[tokio::test]
async fn a_huge_frame_before_hello_was_buffered_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pair = Pair::new();
    let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
    let (server, client) = (pair.server.clone(), pair.client);
    let served = tokio::spawn(async move {
        ferry_receiver::session::serve_stream(
            &server,
            theirs,
            "127.0.0.1:1".parse().unwrap(),
            client,
            None,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
    });
    ours.write_all(&(17u32 << 20).to_be_bytes()).await.unwrap();
    // The receiver gives up at once; what we write after that goes nowhere.
    let mut sent = 0usize;
    let chunk = vec![0u8; 64 * 1024];
    while sent < 17 << 20 {
        match tokio::time::timeout(Duration::from_secs(2), ours.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    let result = served.await.unwrap();
    let e = result.expect_err("the frame was accepted").to_string();
    // The limit named is the one in force before `Hello` (it said 17,825,792 bytes).
    assert!(
        e.contains(&format!(
            "exceeds the {}-byte limit",
            ferry_protocol::connection::PRE_AUTH_FRAME
        )),
        "{e}"
    );
    assert!(sent < 1 << 20, "the receiver read {sent} bytes of it");
    let mut rest = Vec::new();
    let _ = ours.read_to_end(&mut rest).await;
}

/// 1,100 idle TCP connections made a legitimate sender wait 28 s: handshakes counted against
/// the session cap and timed out only after 30 s.
#[test]
fn idle_connections_before_the_handshake_locked_senders_out() {
    let site = Site::new();
    let src = site.dir("src");
    fs::write(src.join("f"), "x").unwrap();
    let dst = site.path("dst");
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    raise_fd_limit(4096);
    // The attacker, from another loopback address, opens connections and says nothing.
    let idle: Vec<std::os::fd::OwnedFd> = (0..1100)
        .filter_map(|_| connect_from([127, 0, 0, 2], backup.port))
        .collect();
    assert!(idle.len() > 1000, "only {} idle connections", idle.len());
    site.write_config(&format!(
        "{}{}",
        backup.target("backup"),
        sync("file", &src, &["backup"], "file", "")
    ));
    let started = Instant::now();
    let o = site.send_once(&[]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!(
        "send --once beside {} idle connections: {took:?}",
        idle.len()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(backup_log(&backup).contains("too many unauthenticated connections"));
}

/// A slowloris from the sender's own address (20 idle connections a second, kept open) locked
/// that sender out: with 16 handshakes pending from one address the receiver closed the
/// *newest* connection, which was the honest one. Now the oldest makes room: for 15 s of the
/// attack, a new honest session from the same address opens every time, well within the
/// handshake timeout a locked-out one waits for (a loaded machine can take over a second to
/// start the process and shake hands, so the bound is half that timeout, not a second).
#[test]
fn a_slowloris_from_the_senders_own_address_no_longer_locks_it_out() {
    let site = Site::new();
    let src = site.dir("src");
    let dst = site.path("dst");
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    site.write_config(&one_group(&backup, &src, ""));
    raise_fd_limit(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let port = backup.port;
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut idle = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                idle.extend(connect_from([127, 0, 0, 1], port));
                std::thread::sleep(Duration::from_millis(50));
            }
            idle.len()
        })
    };
    let started = Instant::now();
    let mut sessions = 0;
    while started.elapsed() < Duration::from_secs(15) {
        let t = Instant::now();
        let o = run(ferry().arg("stats").arg("--config").arg(site.config()));
        let took = t.elapsed();
        assert!(o.status.success(), "session {sessions}: {}", stderr(&o));
        assert!(
            took < ferry_protocol::connection::HANDSHAKE_TIMEOUT / 2,
            "session {sessions} took {took:?}"
        );
        sessions += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    eprintln!("{sessions} honest sessions beside {opened} idle connections from the same address");
    assert!(opened > 200, "the attack ran: {opened} idle connections");
    assert!(sessions >= 10, "{sessions} sessions");
    assert!(backup_log(&backup).contains("closing the oldest from that address"));
}

fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max.min(n);
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from` (any of 127/8).
fn connect_from(from: [u8; 4], port: u16) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return None;
        }
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let local = addr(from, 0);
        let remote = addr([127, 0, 0, 1], port);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0
        {
            return None;
        }
        Some(owned)
    }
}

// ---- Peers that are not ferry at all.

#[test]
fn garbage_and_plain_tcp_peers_do_not_stop_the_receiver() {
    let s = Setup::new();
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0u8; 5][..],
        &[0x16, 3, 1, 0xff, 0xff][..],
    ] {
        let mut tcp = std::net::TcpStream::connect(&s.receiver.addr).unwrap();
        let _ = tcp.write_all(junk);
        drop(tcp);
    }
    fs::write(s.src.join("f"), "still serving").unwrap();
    s.push();
    assert_eq!(fs::read(s.dst.join("f")).unwrap(), b"still serving");
}

// ---- A hostile receiver.

/// A receiver that answered a file's `FileBegin` with a malformed signature made that file
/// fail and be retried, on the same session, for ever. It broke the protocol: now the sender
/// gives the session up (a fatal protocol error; its worker reconnects with backoff).
#[tokio::test]
async fn a_malformed_signature_from_the_receiver_ends_the_session() {
    use ferry_sender::session::{Session, SessionError};
    use ferry_sender::transfer::{self, TransferError};
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("big"), pseudo_random(2 << 20, 3)).unwrap();
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let receiver = tokio::spawn(async move {
        let (mut reader, mut writer) = common::pair::welcome(theirs).await.unwrap();
        let Message::FileBegin { id, body, .. } = reader.expect().await.unwrap() else {
            panic!("expected FileBegin")
        };
        assert_eq!(body, Body::Delta, "a 2 MiB file asks for a signature first");
        let garbage = Message::Signature {
            id,
            signature: b"not a signature at all".to_vec(),
            windows: vec![[7; 32]; 3],
        };
        writer.write(&garbage).await.unwrap();
        while let Ok(Some(_)) = reader.read().await {}
    });
    let session = Session::over(ours, "hostile", "file", Intent::Write, false)
        .await
        .unwrap();
    let session = Arc::new(session);
    let root = Arc::new(ferry_protocol::local::open_root(src.path()).unwrap());
    let path = RelPath::from("big");
    let base = ferry_sender::plan::Base::Unknown;
    let preserve = ferry_sender::config::Preserve::default();
    let flight = transfer::begin(&session, &root.into(), &path, base, preserve)
        .await
        .unwrap()
        .expect("the file is there");
    let mut slot = Some(());
    let sent = flight.finish(&session, &mut slot).await;
    assert!(
        matches!(
            sent,
            Err(TransferError::Session(SessionError::Protocol { .. }))
        ),
        "{sent:?}"
    );
    assert!(sent.unwrap_err().to_string().contains("invalid signature"));
    drop(session);
    receiver.await.unwrap();
}

/// A receiver that answered one request twice, or answered a request never asked, had the
/// extra answer dropped without a word (or, before requests answered once had a one-shot
/// channel, queued for a caller that never read it). Either is a protocol violation: the
/// sender gives the session up and says why.
#[tokio::test]
async fn an_answer_to_no_request_in_flight_ends_the_session() {
    use ferry_sender::session::{Session, SessionError};
    for twice in [true, false] {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let receiver = tokio::spawn(async move {
            let (mut reader, mut writer) = common::pair::welcome(theirs).await.unwrap();
            let Message::Stats { id } = reader.expect().await.unwrap() else {
                panic!("expected Stats")
            };
            let counters = Vec::new();
            writer
                .write(&Message::StatsReply { id, counters })
                .await
                .unwrap();
            // The same answer again, or an answer to an id the sender never used.
            let id = if twice { id } else { id + 1000 };
            writer.write(&Message::Ack { id }).await.unwrap();
            while let Ok(Some(_)) = reader.read().await {}
        });
        let session = Session::over(ours, "hostile", "file", Intent::Write, false)
            .await
            .unwrap();
        session.stats().await.expect("the first answer is good");
        let second = session.stats().await;
        assert!(
            matches!(&second, Err(SessionError::Lost(why)) if why.contains("protocol violation: Ack for no request in flight")),
            "twice = {twice}: {second:?}"
        );
        drop(session);
        receiver.await.unwrap();
    }
}

/// A sender whose delta was malformed had that file fail and went on with the session as if
/// nothing had happened. It broke the protocol: the receiver now tells it why and ends the
/// session; the file under the name is untouched.
#[tokio::test]
async fn a_malformed_delta_from_a_sender_ends_its_session() {
    let mut pair = Pair::new();
    let base = pseudo_random(200_000, 5);
    fs::write(pair.dst.join("f"), &base).unwrap();
    let session = pair.session().await;
    let (id, mut rx) = session.register();
    let begin = Message::FileBegin {
        id,
        path: RelPath::from("f"),
        meta: file_meta(200_000),
        body: Body::Delta,
    };
    session.send(begin).await.unwrap();
    let reply = session.reply(&mut rx).await.unwrap();
    assert!(matches!(reply, Message::Signature { .. }), "{reply:?}");
    // The delta magic, then a command that does not exist.
    let mut garbage = 0x7273_0236u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 1, 2, 3]);
    let delta = Message::FileDelta {
        id,
        window: 200_000,
        delta: garbage,
    };
    session.send(delta).await.unwrap();
    let after = session
        .call(|id| Message::Delete {
            id,
            path: RelPath::from("other"),
        })
        .await;
    let err = after.expect_err("the session is over").to_string();
    assert!(err.contains("protocol violation"), "{err}");
    assert_eq!(
        fs::read(pair.dst.join("f")).unwrap(),
        base,
        "the file is untouched"
    );
}

/// CPU seconds the process `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// One 20-byte `FileHole` frame announcing an 8 TiB hole kept the receiver hashing zeros for
/// hours, after its client had gone and past SIGTERM ("receiver stopped", still running 25 s
/// later). A hole now counts in the digest by its place and length: a file of the largest
/// size the filesystem allows, all hole but its first 4 KiB, is received and acknowledged for
/// well under a second of the receiver's CPU, a cut-off one costs as little, and SIGTERM
/// during a transfer in flight ends the receiver within its unit's 15 s stop timeout, every
/// acknowledged file intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_tib_hole_costs_its_frame_and_sigterm_ends_the_receiver() {
    use ferry_sender::session::Session;
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let dst = site.path("dst");
    let mut backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    let identity = ferry_protocol::identity::Identity::load(
        &site.path("send/cert.pem"),
        &site.path("send/key.pem"),
    )
    .unwrap();
    let pin: ferry_protocol::Fingerprint = backup.fingerprint.parse().unwrap();
    let address = format!("127.0.0.1:{}", backup.port);
    let pid = backup.receiver.as_ref().unwrap().proc.child.id();
    let open = || Session::connect(&address, pin, &identity, "file", Intent::Write, false);
    // The largest file the module's filesystem takes (16 TiB less a block on ext4).
    let huge = largest_file_size(&dst);
    assert!(huge >= (16 << 40) - 4096, "{huge}");
    let head = pseudo_random(4096, 3);
    let frames = |id| {
        vec![
            Message::FileBegin {
                id,
                path: RelPath::from("huge"),
                meta: file_meta(huge),
                body: Body::Whole,
            },
            Message::FileData {
                id,
                data: head.clone(),
            },
            Message::FileHole {
                id,
                len: huge - 4096,
            },
        ]
    };
    let session = open().await.unwrap();
    push_whole(&session, "kept", b"acknowledged before")
        .await
        .unwrap();
    // 1. The whole file: acknowledged, sparse, for a fraction of a second of CPU.
    let before = cpu_seconds(pid);
    let (id, mut rx) = session.register();
    let mut digest = ferry_protocol::body::BodyDigest::new();
    digest.data(&head);
    digest.hole(huge - 4096);
    let end = Message::FileEnd {
        id,
        digest: digest.digest(),
    };
    for m in frames(id).into_iter().chain([end]) {
        session.send(m).await.unwrap();
    }
    // Bounded: a receiver that hashed the hole's zeros would take hours to answer.
    let path = RelPath::from("huge");
    let ack = session.expect_ack(&mut rx, &path);
    tokio::time::timeout(Duration::from_secs(60), ack)
        .await
        .expect("acknowledged within a minute")
        .unwrap();
    let cost = cpu_seconds(pid) - before;
    assert!(cost < 1.0, "{cost} s of CPU for one hole");
    let md = fs::metadata(dst.join("huge")).unwrap();
    assert_eq!(md.len(), huge);
    assert!(
        md.blocks() * 512 <= 1 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );
    fs::remove_file(dst.join("huge")).unwrap();
    // 2. Cut off after the hole: the session ends and the hole cost nothing after it.
    let before = cpu_seconds(pid);
    let (id, _rx) = session.register();
    for m in frames(id) {
        session.send(m).await.unwrap();
    }
    drop(session);
    let receiver = backup.receiver.as_ref().unwrap();
    assert!(receiver.wait_log("session closed"), "{}", receiver.log());
    let cost = cpu_seconds(pid) - before;
    assert!(cost < 1.0, "{cost} s of CPU for a cut-off hole");
    // 3. SIGTERM with a transfer in flight: the receiver ends within the stop timeout.
    let session = open().await.unwrap();
    let (id, _rx) = session.register();
    for m in frames(id) {
        session.send(m).await.unwrap();
    }
    let t = Instant::now();
    let status = backup.receiver.as_mut().unwrap().stop();
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(15), "stopped after {took:?}");
    assert_eq!(fs::read(dst.join("kept")).unwrap(), b"acknowledged before");
    assert!(!dst.join("huge").exists());
    drop(session);
}

/// The largest size a file beneath `dir` may have: found by `ftruncate`, halving down from
/// 8 EiB to the limit to the byte's 4 KiB block.
fn largest_file_size(dir: &std::path::Path) -> u64 {
    let probe = dir.join(".size-probe");
    let f = fs::File::create(&probe).unwrap();
    let (mut ok, mut too_big) = (0u64, 1u64 << 63);
    while too_big - ok > 4096 {
        let mid = ok + (too_big - ok) / 2 / 4096 * 4096;
        match f.set_len(mid) {
            Ok(()) => ok = mid,
            Err(_) => too_big = mid,
        }
    }
    fs::remove_file(&probe).unwrap();
    ok
}
