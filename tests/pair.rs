//! The wire path in memory: the real sender session and the real receiver over
//! `tokio::io::duplex`, no binaries, no TLS.

mod common;

use common::pair::Pair;
use common::*;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::meta::Kind;
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use ferry_sender::batch::{send_batch, Learned};
use ferry_sender::coalesce::{Change, Need, Rename};
use ferry_sender::execute::{Report, Step, StepKind};
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
    let mut learned = Learned::default();
    send_batch(
        &session,
        &pair.group(),
        &mut learned,
        &batch,
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
    for (i, answer) in waiting {
        session.ack(answer).await.unwrap();
        assert!(
            pair.dst.join(format!("d{i}")).is_dir(),
            "Ack before d{i} existed"
        );
    }
    // A second answer to any of them would have ended the session as a protocol violation
    // before this request's answer (the receiver answers in order).
    session.stats().await.expect("no request answered twice");
}

/// Under an allowance the receiver counts what each `Delete` would remove (the entry and
/// everything under it, symlinks not followed) and removes only what fits in what is left,
/// many deletes in flight at once; `Allowance { None }` goes back to plain acknowledgements.
#[tokio::test]
async fn deletes_under_an_allowance_are_counted_and_held_past_it() {
    let mut pair = Pair::new();
    for d in ["a", "b", "c"] {
        fs::create_dir(pair.dst.join(d)).unwrap();
        for i in 0..20 {
            fs::write(pair.dst.join(format!("{d}/f{i}")), "x").unwrap();
        }
    }
    fs::create_dir(pair.dst.join("b/link-target")).unwrap();
    std::os::unix::fs::symlink("/etc", pair.dst.join("a/etc")).unwrap();
    fs::write(pair.dst.join("one"), "x").unwrap();
    let session = pair.session().await;
    session
        .send(Message::Allowance { entries: Some(45) })
        .await
        .unwrap();
    let mut answers = Vec::new();
    for path in ["a", "b", "missing", "one", "c"] {
        let path = RelPath::from(path);
        let answer = session
            .start(|id| Message::Delete { id, path })
            .await
            .unwrap();
        answers.push(answer);
    }
    let mut got = Vec::new();
    for answer in answers {
        got.push(session.deleted(answer).await.unwrap());
    }
    use ferry_sender::session::Removal::{Done, Held};
    // a: itself, 20 files and a symlink (22 of 45); b: 22 more would be 44 — fits;
    // missing: nothing; one: 45; c is held, "at least 1" (counting stops past what is left).
    assert_eq!(
        got,
        [
            Done(Some(22)),
            Done(Some(22)),
            Done(Some(0)),
            Done(Some(1)),
            Held(1)
        ]
    );
    assert!(!pair.dst.join("a").exists() && !pair.dst.join("b").exists());
    assert_eq!(fs::read_dir(pair.dst.join("c")).unwrap().count(), 20);
    assert!(
        std::path::Path::new("/etc/passwd").exists(),
        "the symlink was not followed"
    );
    session
        .send(Message::Allowance { entries: None })
        .await
        .unwrap();
    let answer = session
        .start(|id| Message::Delete {
            id,
            path: RelPath::from("c"),
        })
        .await
        .unwrap();
    assert_eq!(session.deleted(answer).await.unwrap(), Done(None));
    assert!(!pair.dst.join("c").exists());
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

/// A gateway whose write lease another gateway took (the lease file now names another
/// holder) lets go at its next renewal: the session writing through it ends, told why, what it
/// acknowledged stays, the lease file is left to its new holder, and a new writer is refused
/// naming that holder. Reads still go through.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_that_lost_its_write_lease_ends_the_writing_session() {
    let lease_dir = tempfile::tempdir().unwrap();
    let lease = lease_dir.path().join("file.lease");
    let mut pair = Pair::with_lease(&lease, std::time::Duration::from_millis(600));
    let session = pair.session().await;
    push_whole(&session, "first", b"while the lease is held")
        .await
        .unwrap();
    assert!(fs::read_to_string(&lease)
        .unwrap()
        .contains("holder=pair-gw"));
    let taken = "holder=gw-x\ntoken=1.other\ncounter=1000000\nttl_ms=600\n";
    fs::write(&lease, taken).unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let mut acked = 0;
    let why = loop {
        assert!(
            Instant::now() < deadline,
            "still writing after the lease was taken"
        );
        match push_whole(&session, &format!("f{acked}"), b"x").await {
            Ok(()) => acked += 1,
            Err(e) => break e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(why.contains("no longer holds the write lease"), "{why}");
    for i in 0..acked {
        assert!(
            pair.dst.join(format!("f{i}")).exists(),
            "acknowledged f{i} is gone"
        );
    }
    assert!(pair.dst.join("first").exists());
    assert_eq!(fs::read_to_string(&lease).unwrap(), taken);
    let refused = pair.open("file", Intent::Write).await.err().unwrap();
    assert!(
        refused.contains("gateway gw-x holds the write lease"),
        "{refused}"
    );
    assert!(pair.open("file", Intent::Read).await.is_ok());
}
