//! A module's history: what the receiver replaces, deletes, renames away or changes the
//! metadata of is kept beside the module, journaled, pruned by the receiver's rules alone.
//! Checked straight from the history directory (`objects/ID`, `journal.sqlite3`), as an
//! operator would, not through ferry's own reading of it.

mod common;

use common::pair::Pair;
use common::*;
use ferry_receiver::history::Keep;
use ferry_sender::reconcile::reconcile;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// The journal's rows: (id, path, action, object, renamed_to), by id.
fn rows(history: &Path) -> Vec<(i64, String, String, bool, Option<String>)> {
    let db = rusqlite::Connection::open_with_flags(
        history.join("journal.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT id, path, action, object, renamed_to FROM versions ORDER BY id")
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    q.query_map([], |r| {
        Ok((
            r.get(0)?,
            text(r.get(1)?),
            r.get(2)?,
            r.get::<_, i64>(3)? != 0,
            r.get::<_, Option<Vec<u8>>>(4)?.map(text),
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The ids in `objects/`.
fn objects(history: &Path) -> BTreeSet<i64> {
    fs::read_dir(history.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

/// Every row with an object names one that exists, and every object has its row.
fn assert_consistent(history: &Path) {
    let journaled: BTreeSet<i64> = rows(history)
        .into_iter()
        .filter(|r| r.3)
        .map(|r| r.0)
        .collect();
    assert_eq!(journaled, objects(history), "journal and objects disagree");
}

#[tokio::test]
async fn replaced_deleted_renamed_and_chmodded_states_are_kept_as_they_were() {
    let mut pair = Pair::with_history(Keep::default());
    let (src, dst, history) = (pair.src.clone(), pair.dst.clone(), pair.history());
    fs::write(src.join("f"), b"version one").unwrap();
    fs::create_dir_all(src.join("d/e")).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("d/e/{i}")), format!("file {i}")).unwrap();
    }
    fs::write(src.join("a"), b"moved").unwrap();
    fs::write(src.join("b"), b"overwritten by a rename").unwrap();
    fs::write(src.join("m"), b"mode").unwrap();
    let session = pair.session().await;
    reconcile(&session, &pair.group()).await.unwrap();
    assert!(rows(&history).is_empty(), "a first copy supersedes nothing");
    let f_before = fs::metadata(dst.join("f")).unwrap();

    fs::write(src.join("f"), b"version two, longer").unwrap();
    fs::remove_dir_all(src.join("d")).unwrap();
    fs::set_permissions(src.join("m"), fs::Permissions::from_mode(0o600)).unwrap();
    reconcile(&session, &pair.group()).await.unwrap();
    // A rename over an existing name, as a live batch sends it.
    let rename = ferry_protocol::message::Message::Rename {
        id: 0,
        from: "a".into(),
        to: "b".into(),
    };
    session
        .call(|id| match rename {
            ferry_protocol::message::Message::Rename { from, to, .. } => {
                ferry_protocol::message::Message::Rename { id, from, to }
            }
            _ => unreachable!(),
        })
        .await
        .unwrap();

    let rows = rows(&history);
    let by_path: BTreeMap<&str, (&str, bool, i64)> = rows
        .iter()
        .map(|(id, p, a, o, _)| (p.as_str(), (a.as_str(), *o, *id)))
        .collect();
    // The old content of `f`, the very inode, with its metadata.
    let (action, object, id) = by_path["f"];
    assert_eq!((action, object), ("replaced", true));
    let kept = history.join("objects").join(id.to_string());
    assert_eq!(fs::read(&kept).unwrap(), b"version one");
    let md = fs::metadata(&kept).unwrap();
    assert_eq!(
        (md.ino(), md.mtime(), md.mode()),
        (f_before.ino(), f_before.mtime(), f_before.mode()),
        "a link to the old inode, not a copy"
    );
    // The deleted directory, whole, in one move and one row.
    let (action, object, id) = by_path["d"];
    assert_eq!((action, object), ("deleted", true));
    let dir = history.join("objects").join(id.to_string());
    assert_eq!(fs::read(dir.join("e/7")).unwrap(), b"file 7");
    assert_eq!(fs::read_dir(dir.join("e")).unwrap().count(), 50);
    assert!(
        !rows.iter().any(|r| r.1.starts_with("d/")),
        "one row for the tree"
    );
    // The metadata change: no object, the old mode in the row.
    let (action, object, _) = by_path["m"];
    assert_eq!((action, object), ("metadata", false));
    let versions = ferry_receiver::history::read_versions(&history, &"m".into()).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&versions[0].meta).unwrap();
    assert_eq!(meta["mode"].as_u64().unwrap() & 0o777, 0o644);
    // The rename: where `a` went, and what it replaced.
    let renamed = rows.iter().find(|r| r.1 == "a").unwrap();
    assert_eq!(
        (renamed.2.as_str(), renamed.4.as_deref()),
        ("renamed", Some("b"))
    );
    let (action, _, id) = by_path["b"];
    assert_eq!(action, "replaced");
    assert_eq!(
        fs::read(history.join("objects").join(id.to_string())).unwrap(),
        b"overwritten by a rename"
    );
    assert_eq!(fs::read(dst.join("b")).unwrap(), b"moved");
    assert_consistent(&history);
    // Nothing of it is in the module, or in what a sender can list.
    let root = ferry_protocol::RelPath::root();
    let names: BTreeSet<String> = session
        .list(&root, Default::default())
        .await
        .unwrap()
        .iter()
        .map(|e| e.path.to_string())
        .collect();
    assert_eq!(
        names,
        [".", "b", "f", "m"].iter().map(|s| s.to_string()).collect()
    );
    session.close().await;
}

#[tokio::test]
async fn retention_lets_old_versions_go_on_the_receivers_own_clock() {
    // Every version for 1 s, nothing after; nothing kept from space pruning.
    let keep = Keep {
        rules: vec!["all for 1s".parse().unwrap()],
        floor: Duration::ZERO,
        ..Keep::default()
    };
    let mut pair = Pair::with_history(keep);
    let history = pair.history();
    let session = pair.session().await;
    for v in 0..3u8 {
        push_whole(&session, "f", &[v; 1000]).await.unwrap();
    }
    assert_eq!(objects(&history).len(), 2, "two superseded versions");
    // The receiver prunes on its own (every second for retention counted in seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !objects(&history).is_empty() {
        assert!(std::time::Instant::now() < deadline, "never pruned");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_consistent(&history);
    assert_eq!(fs::read(pair.dst.join("f")).unwrap(), [2u8; 1000]);
    session.close().await;
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let o = run(std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path()));
        assert!(
            o.status.success(),
            "mount tmpfs (needs root): {}",
            stderr(&o)
        );
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_filesystem_never_prunes_the_floor_it_refuses_writes_instead() {
    let fs_ = Tmpfs::mount("16m");
    // Everything kept for a day, nothing of the last hour pruned for space, half kept free.
    let keep = Keep {
        rules: vec!["all for 1d".parse().unwrap()],
        floor: Duration::from_secs(3600),
        min_free_percent: 50,
    };
    let mut pair = Pair::with_history_in(keep, fs_.path());
    let history = pair.history();
    let session = pair.session().await;
    let versions: Vec<Vec<u8>> = (0..3).map(|v| pseudo_random(3 << 20, v)).collect();
    for v in &versions {
        push_whole(&session, "big", v).await.unwrap();
    }
    // 3 MiB in the module, 6 MiB of history: less than half of 16 MiB free. The commit that
    // found it so woke the pruner, which may not prune the last hour: writes are refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        match push_whole(&session, "small", b"x").await {
            Err(e) => break e.to_string(),
            Ok(()) => {
                assert!(std::time::Instant::now() < deadline, "writes never refused");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        refusal.contains("module file") && refusal.contains("floor"),
        "{refusal}"
    );
    // Both superseded versions are still there, byte for byte.
    let kept: Vec<Vec<u8>> = objects(&history)
        .iter()
        .filter_map(|id| fs::read(history.join("objects").join(id.to_string())).ok())
        .filter(|b| b.len() == 3 << 20)
        .collect();
    assert!(kept.contains(&versions[0]) && kept.contains(&versions[1]));
    assert_consistent(&history);
    session.close().await;
}
