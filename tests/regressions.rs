//! One test per bug fixed, named after the bug it pins.

mod common;

use common::pair::Pair;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::RelPath;
use ferry_sender::coalesce::{Change, Need};
use ferry_sender::queue::Queue;
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
