//! Every refusal a receiver makes is seen, with its reason, on both sides; hostile paths never
//! escape the module; a bad peer does not stop the receiver from serving others.

mod common;

use common::*;
use ferry_protocol::identity::Identity;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::{Fingerprint, RelPath};
use ferry_sender::session::{Session, SessionError};
use std::fs;

fn refused(s: &Setup, sender_side: &str, receiver_side: &str) {
    fs::write(s.src.join("f"), "x").unwrap();
    let o = s.send_once();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(sender_side),
        "sender stderr lacks {sender_side:?}:\n{}",
        stderr(&o)
    );
    assert!(
        s.receiver.wait_log(receiver_side),
        "receiver log lacks {receiver_side:?}:\n{}",
        s.receiver.log()
    );
    assert!(
        !s.dst.join("f").exists(),
        "nothing may be written after a refusal"
    );
}

#[test]
fn unknown_client_fingerprint_is_refused() {
    let other = ferry_protocol::fingerprint::of_der(b"someone else").to_string();
    let s = Setup::with(ModuleOpts {
        clients: Some(vec![other]),
        ..Default::default()
    });
    refused(
        &s,
        "is not allowed into module \"file\"",
        "refused: certificate sha256:",
    );
}

#[test]
fn unknown_module_is_refused() {
    let s = Setup::new();
    s.write_sender_config("nosuch", &[]);
    refused(&s, "unknown module \"nosuch\"", "unknown module");
}

#[test]
fn read_only_module_is_refused_for_writes_but_verifiable() {
    let s = Setup::with(ModuleOpts {
        read_only: true,
        ..Default::default()
    });
    refused(&s, "module \"file\" is read-only", "is read-only");
    // Writing `f` moved the source root's mtime; align the roots so only `f` differs.
    let t = filetime::FileTime::from_last_modification_time(&fs::metadata(&s.src).unwrap());
    filetime::set_file_mtime(&s.dst, t).unwrap();
    let o = run(ferry().arg("verify").arg("--config").arg(s.sender_config()));
    assert_eq!(
        o.status.code(),
        Some(1),
        "read sessions are allowed; the trees differ: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "missing f\n");
}

#[test]
fn host_not_in_hosts_allow_is_refused() {
    // A pattern that 127.0.0.1 does not match; no traffic goes to it.
    let s = Setup::with(ModuleOpts {
        hosts_allow: Some(vec!["192.0.2.0/24".into()]),
        ..Default::default()
    });
    refused(
        &s,
        "host 127.0.0.1 is not allowed",
        "host 127.0.0.1 is not allowed",
    );
}

#[test]
fn wrong_receiver_pin_is_refused_by_the_sender() {
    let s = Setup::new();
    let wrong = ferry_protocol::fingerprint::of_der(b"not the receiver").to_string();
    s.write_sender_config_full("file", &[], &wrong, &s.receiver.addr.clone());
    fs::write(s.src.join("f"), "x").unwrap();
    let o = s.send_once();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("does not match the pinned"),
        "{}",
        stderr(&o)
    );
    assert!(!s.dst.join("f").exists());
}

fn sender_identity(s: &Setup) -> Identity {
    Identity::load(
        &s.root().join("send/cert.pem"),
        &s.root().join("send/key.pem"),
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn open(s: &Setup) -> Result<Session, SessionError> {
    let pin: Fingerprint = s.receiver_fp.parse().unwrap();
    Session::connect(
        &s.receiver.addr,
        pin,
        &sender_identity(s),
        "file",
        Intent::Write,
        false,
    )
    .await
}

#[test]
fn max_connections_is_enforced() {
    let s = Setup::with(ModuleOpts {
        max_connections: Some(1),
        ..Default::default()
    });
    runtime().block_on(async {
        let first = open(&s).await.expect("first session");
        let second = open(&s).await;
        let err = second
            .err()
            .expect("second session must be refused")
            .to_string();
        assert!(err.contains("maximum of 1 connections"), "{err}");
        first.close().await;
        // The slot is free again.
        open(&s)
            .await
            .expect("session after the first closed")
            .close()
            .await;
    });
}

#[test]
fn interrupted_transfer_leaves_nothing_and_is_cleaned() {
    let s = Setup::new();
    runtime().block_on(async {
        let session = open(&s).await.unwrap();
        let (id, _rx) = session.register();
        begin_half(&session, id, "half").await;
        session.stats().await.unwrap(); // make sure the receiver has handled both
        drop(session); // connection drops mid-file
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The unnamed file of the cut transfer was never in the tree (it is kept, unnamed, to
    // resume); make sure the receiver is done with the session and nothing appeared.
    while !s
        .receiver
        .log()
        .contains("keeping unfinished transfer to resume")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "partial file not discarded"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!s.dst.join("half").exists());
}

#[test]
fn rename_is_one_operation_on_the_receiver() {
    let s = Setup::new();
    fs::create_dir_all(s.src.join("dir/sub")).unwrap();
    for i in 0..20 {
        fs::write(s.src.join(format!("dir/sub/f{i}")), format!("{i}")).unwrap();
    }
    s.push();
    runtime().block_on(async {
        let session = open(&s).await.unwrap();
        let before = session.stats().await.unwrap();
        session
            .call(|id| Message::Rename {
                id,
                from: RelPath::from("dir"),
                to: RelPath::from("moved"),
            })
            .await
            .unwrap();
        let after = session.stats().await.unwrap();
        let get = |v: &Vec<(String, u64)>, k: &str| v.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get(&after, "renames") - get(&before, "renames"), 1);
        assert_eq!(
            get(&after, "files"),
            get(&before, "files"),
            "no file was re-sent"
        );
        session.close().await;
    });
    assert!(!s.dst.join("dir").exists());
    assert_eq!(fs::read(s.dst.join("moved/sub/f7")).unwrap(), b"7");
}

#[test]
fn a_key_readable_by_others_is_warned_about() {
    let s = Setup::new();
    let key = s.root().join("recv/key.pem");
    set_mode(&key, 0o644);
    let r = Receiver::start(&s.root().join("recv/receiver.toml"));
    assert!(r.wait_log("is readable by others"), "{}", r.log());
    assert!(r.log().contains("chmod 600"), "{}", r.log());
}

/// A port check (connect, close) is not a session: the receiver notes it only in its debug
/// log, where a monitor probing every few seconds would otherwise fill the journal with
/// warnings. A peer that speaks something else than TLS is still warned about, as a failed
/// handshake.
#[test]
fn a_port_check_is_no_warning_and_a_bad_handshake_is_one() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("recv");
    keygen(&dir);
    let port = free_port();
    fs::write(
        dir.join("receiver.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [modules.m]\npath = {:?}\nclients = []\n",
            root.path().join("m").display().to_string()
        ),
    )
    .unwrap();
    fs::create_dir(root.path().join("m")).unwrap();
    let recv = Proc::spawn(
        ferry()
            .env("FERRY_LOG", "debug")
            .args(["receive", "--config"])
            .arg(dir.join("receiver.toml")),
    );
    recv.wait_log_n("receiver listening", 1, 20);
    let probe = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let probed = format!("peer=127.0.0.1:{}", probe.local_addr().unwrap().port());
    drop(probe);
    let mut talker = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let talked = format!("peer=127.0.0.1:{}", talker.local_addr().unwrap().port());
    talker.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(talker);
    assert!(
        recv.wait_log(&format!(
            "connection closed before its TLS handshake ended {probed}"
        )),
        "{}",
        recv.log()
    );
    let log = recv.log();
    assert_eq!(lines_of(&log, &probed), Vec::<&str>::new(), "{log}");
    assert!(recv.wait_log(&talked), "{}", recv.log());
    let log = recv.log();
    let said = lines_of(&log, &talked);
    assert!(
        said.len() == 1 && said[0].contains("WARN") && said[0].contains("TLS handshake failed: "),
        "{log}"
    );
}

/// The lines of `log` above debug level that name `peer`.
fn lines_of<'l>(log: &'l str, peer: &str) -> Vec<&'l str> {
    log.lines()
        .filter(|l| l.contains(peer) && !l.contains("DEBUG"))
        .collect()
}
