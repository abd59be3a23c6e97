//! The wire path in memory: the real sender session and the real receiver over
//! `tokio::io::duplex`, no binaries, no TLS.

mod common;

use common::pair::Pair;
use common::*;
use ferry_protocol::message::{Body, Intent, Message};
use ferry_protocol::meta::{Compare, Kind, Meta};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use ferry_sender::batch::send_batch;
use ferry_sender::coalesce::{Change, Need, Rename};
use ferry_sender::execute::{Report, Step, StepKind};
use ferry_sender::guard::DeleteTally;
use ferry_sender::queue::Batch;
use std::fs;
use std::time::Instant;

/// Sends one live batch built from `changes`; returns the report and every step.
async fn send(pair: &mut Pair, changes: Vec<Change>) -> (Report, Vec<Step>) {
    let session = pair.session().await;
    let mut batch = Batch::default();
    for c in changes {
        batch.add(c);
    }
    let mut report = Report::default();
    let mut seen = Vec::new();
    let mut observe = |s: &Step| seen.push(s.clone());
    let mut tally = DeleteTally::default();
    send_batch(
        &session,
        &pair.group(),
        &batch,
        &mut tally,
        &mut report,
        &mut observe,
    )
    .await
    .unwrap();
    (report, seen)
}

fn dirty(path: &str, need: Need) -> Change {
    Change::Path {
        path: RelPath::from(path),
        need,
        since: Instant::now(),
    }
}

#[tokio::test]
async fn a_rename_the_receiver_refuses_travels_as_content() {
    let mut pair = Pair::new();
    fs::write(pair.src.join("new"), "content").unwrap();
    // The receiver never had `old`: the rename is refused and `new` is sent instead.
    let rename = Change::Rename(Rename {
        from: RelPath::from("old"),
        to: RelPath::from("new"),
        dir: false,
        since: Instant::now(),
    });
    let (report, _) = send(&mut pair, vec![rename]).await;
    assert_eq!((report.renamed, report.files), (0, 1), "{report:?}");
    assert_eq!(fs::read(pair.dst.join("new")).unwrap(), b"content");
    assert!(report.failures.is_empty(), "{report:?}");
}

#[tokio::test]
async fn a_delta_needs_a_base_and_falls_back_to_whole_without_one() {
    let mut pair = Pair::new();
    let mut data = pseudo_random(3 << 20, 7);
    fs::write(pair.src.join("big"), &data).unwrap();
    // No base on the receiver: asked as a delta, answered NoBase, sent whole.
    let (r, seen) = send(&mut pair, vec![dirty("big", Need::Content)]).await;
    assert_eq!(seen[0].kind, StepKind::File, "{seen:?}");
    assert_eq!(r.payload_bytes, data.len() as u64);
    assert_eq!(fs::read(pair.dst.join("big")).unwrap(), data);
    // With a base: only the changed window travels.
    data[1 << 20..(1 << 20) + 100].fill(0xee);
    fs::write(pair.src.join("big"), &data).unwrap();
    let (r, seen) = send(&mut pair, vec![dirty("big", Need::Content)]).await;
    assert_eq!(seen[0].kind, StepKind::Delta, "{seen:?}");
    assert!(
        r.payload_bytes < 200_000,
        "delta of 100 changed bytes: {r:?}"
    );
    assert_eq!(fs::read(pair.dst.join("big")).unwrap(), data);
}

#[tokio::test]
async fn an_aborted_file_leaves_nothing_and_the_session_goes_on() {
    let mut pair = Pair::new();
    let session = pair.session().await;
    let (id, mut rx) = session.register();
    begin_half(&session, id, "half").await;
    session.send(Message::FileAbort { id }).await.unwrap();
    match session.reply(&mut rx).await.unwrap() {
        Message::Failed { error, .. } => assert_eq!(error, "aborted by sender"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(
        fs::read_dir(&pair.dst).unwrap().count(),
        0,
        "nothing in the module"
    );
    let mut meta = file_meta(0);
    meta.kind = Kind::Dir;
    meta.mode = 0o755;
    session
        .call(|id| Message::Mkdir {
            id,
            path: RelPath::from("after"),
            meta,
        })
        .await
        .unwrap();
    assert!(pair.dst.join("after").is_dir());
}

#[tokio::test]
async fn a_read_only_session_lists_but_changes_nothing() {
    let mut pair = Pair::new();
    fs::write(pair.dst.join("kept"), "x").unwrap();
    let session = pair.open("file", Intent::Read).await.unwrap();
    let listing = session
        .list(&RelPath::root(), Namespaces::ALL)
        .await
        .unwrap();
    assert!(listing.iter().any(|e| e.path == RelPath::from("kept")));
    let refused = session
        .call(|id| Message::Delete {
            id,
            path: RelPath::from("kept"),
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("read-only"), "{refused}");
    assert!(pair.dst.join("kept").exists());
}

#[tokio::test]
async fn every_change_is_acknowledged_once_and_only_when_it_is_in_place() {
    let mut pair = Pair::new();
    let session = pair.session().await;
    let mut meta = file_meta(0);
    meta.kind = Kind::Dir;
    meta.mode = 0o755;
    // More than one group commit's worth, all in flight at once.
    let n = ferry_receiver::requests::GROUP_COMMIT * 2 + 7;
    let mut waiting = Vec::new();
    for i in 0..n {
        let path = RelPath::from(format!("d{i}").as_str());
        let rx = session
            .start(|id| Message::Mkdir {
                id,
                path: path.clone(),
                meta: meta.clone(),
            })
            .await
            .unwrap();
        waiting.push((i, rx));
    }
    for (i, mut rx) in waiting {
        session.expect_ack(&mut rx).await.unwrap();
        assert!(
            pair.dst.join(format!("d{i}")).is_dir(),
            "Ack before d{i} existed"
        );
        assert!(rx.recv().await.is_none(), "a second answer for d{i}");
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
    while Instant::now() < deadline {
        i += 1;
        let name = |what: &str| RelPath::from(format!("d/{what}{i}").as_str());
        let _ = push_whole(&session, &name("f").to_string(), b"escaped?").await;
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
        "{i} rounds of writes against {flips} flips; {} entries outside",
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
    assert!(
        inside_seen > 0,
        "the listings never saw the module's own file"
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
    let e = attacker.expect_ack(&mut rx).await.unwrap_err().to_string();
    assert!(e.contains("digest mismatch"), "{e}");
    refusals.push(e);
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
    refusals.push(attacker.expect_ack(&mut rx).await.unwrap_err().to_string());
    // Deltas: a copy reaching past the base, and a window of 1 TiB.
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
        let (id, mut rx) = attacker.register();
        attacker
            .send(Message::FileBegin {
                id,
                path: RelPath::from("base"),
                meta: file_meta(window),
                body: Body::Delta,
            })
            .await
            .unwrap();
        match attacker.reply(&mut rx).await {
            Ok(Message::Signature { .. }) => {
                attacker
                    .send(Message::FileDelta { id, window, delta })
                    .await
                    .unwrap();
                attacker
                    .send(Message::FileEnd {
                        id,
                        digest: [0; 32],
                    })
                    .await
                    .unwrap();
                refusals.push(attacker.expect_ack(&mut rx).await.unwrap_err().to_string());
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
    for name in ["liar", "long", "open0", "stolen"] {
        assert!(!pair.dst.join(name).exists(), "{name} was committed");
    }
    assert_eq!(
        fs::read(pair.dst.join("base")).unwrap(),
        pseudo_random(64 << 10, 9),
        "a refused delta changed its base"
    );
}

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

/// A source file rewritten in place (truncated, then written) over and over while it is being
/// sent: what the receiver shows under the final name is always a state the source really had
/// — a version, or the start of one while it was being written — never a mix of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_during_transfer_is_never_committed_torn() {
    let mut pair = Pair::new();
    let versions: Vec<Vec<u8>> = (0..6)
        .map(|i| pseudo_random((3 << 20) + i * 777_777, i as u64))
        .collect();
    // Between the truncate and the end of the write, the source holds the start of a version
    // (its length grows as the kernel copies the write in): those states are real too.
    let real_state = |got: &[u8]| versions.iter().any(|v| v.starts_with(got));
    fs::write(pair.src.join("big"), &versions[0]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path, versions) = (stop.clone(), pair.src.join("big"), versions.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // In place, as a careless writer does: truncate, then write.
                fs::write(&path, &versions[n % versions.len()]).unwrap();
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(4);
    let mut committed = 0;
    while Instant::now() < deadline {
        let (report, _) = send(&mut pair, vec![dirty("big", Need::Content)]).await;
        committed += report.files;
        if let Ok(got) = fs::read(pair.dst.join("big")) {
            assert!(
                real_state(&got),
                "torn: {} bytes that no version starts with",
                got.len()
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rewrites = writer.join().unwrap();
    eprintln!("{rewrites} rewrites, {committed} commits");
    assert!(rewrites > 20, "the race did not run");
    // Quiet again: it converges.
    let (report, _) = send(&mut pair, vec![dirty("big", Need::Content)]).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(
        fs::read(pair.dst.join("big")).unwrap(),
        fs::read(pair.src.join("big")).unwrap()
    );
}

/// A big file changed across window boundaries — bytes inserted where one 8 MiB window ends,
/// a stretch deleted inside the next, data appended — travels as a delta: the copy is
/// rebuilt exactly, for a fraction of its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_window_inserts_deletes_and_appends_rebuild_exactly() {
    let mut pair = Pair::new();
    let base = pseudo_random(20 << 20, 31);
    fs::write(pair.dst.join("big"), &base).unwrap();
    let window = ferry_protocol::delta::WINDOW;
    let mut new = base.clone();
    new.splice(window - 500..window - 500, pseudo_random(1000, 32));
    new.drain(12 << 20..(12 << 20) + 5000);
    new.extend_from_slice(&pseudo_random(300 << 10, 33));
    fs::write(pair.src.join("big"), &new).unwrap();
    let (report, steps) = send(&mut pair, vec![dirty("big", Need::Content)]).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(fs::read(pair.dst.join("big")).unwrap(), new);
    assert!(
        steps.iter().any(|s| s.kind == StepKind::Delta),
        "not sent as a delta: {steps:?}"
    );
    eprintln!(
        "{} bytes of payload for a {} byte file",
        report.payload_bytes,
        new.len()
    );
    assert!(
        report.payload_bytes < 2 << 20,
        "delta too large: {} bytes",
        report.payload_bytes
    );
}

/// Text-like bytes: words of a small vocabulary in a pseudo-random order (compressible about
/// 3×, as logs and sources are).
fn prose(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "ferry ", "keeps ", "backup ", "hosts ", "in ", "step ", "with ", "source ", "the ",
        "delta ", "of ", "a ", "file ", "travels ", "over ", "TLS\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    for b in pseudo_random(len / 4, seed) {
        out.extend_from_slice(WORDS[(b & 15) as usize].as_bytes());
        if out.len() >= len {
            break;
        }
    }
    out.truncate(len);
    out
}

/// `compress = true` packs whole bodies and delta literals; what does not shrink (random
/// bytes) goes as it is; every file arrives exact either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_shrink_on_the_wire_and_arrive_exact() {
    let mut sent = Vec::new();
    for compress in [false, true] {
        let mut pair = Pair::new();
        pair.compress = compress;
        fs::write(pair.src.join("text"), prose(3 << 20, 1)).unwrap();
        fs::write(pair.src.join("noise"), pseudo_random(1 << 20, 2)).unwrap();
        // A multi-window file with a changed stretch: its delta literals are prose too.
        let base = prose(20 << 20, 3);
        let mut new = base.clone();
        new.splice(9 << 20..(9 << 20) + 1000, prose(1 << 20, 4));
        fs::write(pair.dst.join("big"), &base).unwrap();
        fs::write(pair.src.join("big"), &new).unwrap();
        let session = pair.session().await;
        let report = ferry_sender::reconcile::reconcile(&session, &pair.group())
            .await
            .unwrap();
        assert!(report.failures.is_empty(), "{report:?}");
        for name in ["text", "noise", "big"] {
            assert_eq!(
                fs::read(pair.src.join(name)).unwrap(),
                fs::read(pair.dst.join(name)).unwrap(),
                "{name} (compress = {compress})"
            );
        }
        sent.push(report.bytes_sent);
    }
    let (plain, packed) = (sent[0], sent[1]);
    eprintln!("bytes sent: {plain} plain, {packed} packed");
    // Plain: 3 MiB + 1 MiB + ~1 MiB of literals; packed: the prose shrinks, the noise not.
    assert!(plain > 5 << 20, "{plain}");
    assert!(packed < plain * 6 / 10, "{packed} packed vs {plain} plain");
    assert!(packed > 1 << 20, "the random MiB cannot shrink: {packed}");
}

/// A peer's holes are bounded by the size it announced, and a hole counts in the digest as
/// the zeros it reads as: a hole past the end is refused, an honest sparse body arrives
/// sparse and exact.
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
    let e = session.expect_ack(&mut rx).await.unwrap_err().to_string();
    assert!(e.contains("hole past the announced 4096 bytes"), "{e}");
    assert!(!pair.dst.join("huge").exists());
    // 80 MiB: 1 MiB of data, a 62 MiB hole, 1 MiB of data, and a 16 MiB hole at the end.
    let data = pseudo_random(1 << 20, 9);
    let size = 80u64 << 20;
    let mut whole = vec![0u8; size as usize];
    whole[..1 << 20].copy_from_slice(&data);
    whole[63 << 20..64 << 20].copy_from_slice(&data);
    let (id, mut rx) = session.register();
    send_all(vec![
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
        Message::FileEnd {
            id,
            digest: *blake3::hash(&whole).as_bytes(),
        },
    ])
    .await;
    session.expect_ack(&mut rx).await.unwrap();
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
            session.expect_ack(&mut rx).await.map_err(|e| e.to_string())
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
