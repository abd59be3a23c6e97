//! One test per bug fixed, named after the bug it pins.

mod common;

use common::pair::Pair;
use common::*;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::RelPath;
use ferry_sender::coalesce::{Change, Need};
use ferry_sender::queue::Queue;
use std::fs;
use std::time::{Duration, Instant};

fn dirty(path: &str) -> Change {
    Change::Path {
        path: RelPath::from(path),
        need: Need::Content,
        since: Instant::now(),
    }
}

/// A path that kept failing was retried after 1 s for ever, because any batch that went well
/// (for other paths) reset its delay.
#[test]
fn retry_delays_kept_resetting_after_any_good_batch() {
    let q = Queue::new();
    let bad = RelPath::from("bad");
    let mut now = Instant::now();
    q.push([dirty("bad")]);
    let mut waits = Vec::new();
    for round in 0..5 {
        let b = q.take(now);
        assert!(b.paths.contains_key(&bad), "round {round}");
        q.settle(&b, std::slice::from_ref(&bad), now);
        // Meanwhile another path goes through fine.
        q.push([dirty(&format!("good{round}"))]);
        let good = q.take(now);
        assert!(!good.paths.contains_key(&bad));
        q.settle(&good, &[], now);
        // When does `bad` fall due again?
        let mut later = now;
        while q.is_idle(later) {
            later += Duration::from_millis(250);
        }
        waits.push((later - now).as_secs());
        now = later;
    }
    assert_eq!(waits, vec![1, 2, 4, 8, 16]);
}

/// A request registered after the connection had died waited for a reply for ever.
#[tokio::test]
async fn a_request_registered_after_the_connection_died_waited_for_ever() {
    let mut pair = Pair::new();
    let session = pair.session().await;
    pair.served.abort_all();
    while pair.served.join_next().await.is_some() {}
    // Give the reader task a moment to see the close.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, mut rx) = session.register();
    let reply = tokio::time::timeout(Duration::from_secs(5), session.reply(&mut rx))
        .await
        .expect("a reply on a dead session must fail at once, not hang");
    assert!(reply.is_err(), "{reply:?}");
}

/// With `max_connections = 1`, a sender that closed its session and reconnected at once was
/// refused: the slot was freed only after the peer had already seen the close.
#[tokio::test]
async fn a_module_slot_was_freed_only_after_the_peer_saw_the_close() {
    let mut pair = Pair::with_limit(Some(1));
    for round in 0..50 {
        let session = pair
            .open("file", Intent::Write)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        session
            .call(|id| Message::Delete {
                id,
                path: RelPath::from("x"),
            })
            .await
            .unwrap();
        session.close().await;
    }
}

/// Excluded files written at the source root reached the receiver about 1 s later and stayed:
/// their close-write event was never filtered, so a metadata-only change failed on the
/// receiver and its retry sent the whole file.
#[test]
fn excluded_files_closed_after_writing_leaked_to_the_receiver() {
    let site = Site::new();
    let src = site.dir("src");
    let dst = site.path("dst");
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    let exclude = r#"exclude = ["*.log", "/secret.txt", "cache/"]"#;
    let body = format!(
        "{}{}",
        backup.target("backup"),
        sync("file", &src, &["backup"], "file", exclude)
    );
    let daemon = site.run(&body, 1);
    fs::write(src.join("a.log"), "1").unwrap();
    fs::write(src.join("secret.txt"), "4").unwrap();
    fs::create_dir(src.join("cache")).unwrap();
    fs::write(src.join("cache/x"), "5").unwrap();
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/secret.txt"), "anchored at the root only").unwrap();
    fs::write(src.join("kept"), "k").unwrap();
    // Renamed to an excluded name: gone from the receiver, not copied under the new name.
    fs::write(src.join("renamed"), "r").unwrap();
    let arrived = |p: &str| dst.join(p).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(arrived("kept") && arrived("sub/secret.txt") && arrived("renamed")) {
        assert!(Instant::now() < deadline, "included files did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::rename(src.join("renamed"), src.join("renamed.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrived("renamed") {
        assert!(
            Instant::now() < deadline,
            "renamed away, still on the receiver"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past every settle and retry window (settle 100 ms, first retry 1 s, second 2 s), and
    // then once more.
    let excluded = ["a.log", "secret.txt", "cache", "renamed.log"];
    for wait in [3500, 1500] {
        std::thread::sleep(Duration::from_millis(wait));
        for p in excluded {
            assert!(!arrived(p), "{p} is excluded but reached the receiver");
        }
    }
    assert!(
        !daemon.log().contains("request failed") && !backup_log(&backup).contains("request failed"),
        "nothing should have been refused:\n{}\n{}",
        daemon.log(),
        backup_log(&backup)
    );
}

fn backup_log(b: &Backup) -> String {
    b.receiver.as_ref().map(|r| r.log()).unwrap_or_default()
}
