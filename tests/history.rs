//! A module's history: what the receiver replaces, deletes, renames away or changes the
//! metadata of is kept beside the module, journaled, pruned by the receiver's rules alone.
//! Checked straight from the history directory (`objects/ID`, `journal.sqlite3`), as an
//! operator would, not through ferry's own reading of it.

mod common;

use common::journal::{assert_consistent, objects, rows, tree};
use common::pair::Pair;
use common::site::{backup_log, one_group, Backup, Site};
use common::*;
use ferry_receiver::history::Keep;
use ferry_sender::reconcile::reconcile;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

#[tokio::test]
async fn replaced_deleted_renamed_and_chmodded_states_are_kept_as_they_were() {
    let mut pair = Pair::with_history(keep_on_any_free_space());
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
    // A first copy supersedes nothing: each name it makes is noted as created, no object;
    // beside them, the times of the directories that existed before a commit changed them
    // (the root; d/e once per later commit that added to it; d, when d/e came in a later
    // commit than d, as it does when the loop's queue runs dry between them on a busy machine).
    let first = rows(&history);
    let dir_times = |r: &(i64, String, String, bool, Option<String>)| {
        r.2 == "metadata" && ["", "d", "d/e"].contains(&r.1.as_str())
    };
    assert!(
        first
            .iter()
            .all(|r| (r.2 == "created" || dir_times(r)) && !r.3),
        "{first:?}"
    );
    let created = first.iter().filter(|r| r.2 == "created").count();
    assert_eq!(created, 56, "f, a, b, m, d, d/e and 50 files");
    assert!(first.iter().any(|r| r.1.is_empty()), "the root's times");
    assert!(objects(&history).is_empty());
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
        !rows
            .iter()
            .any(|r| r.1.starts_with("d/") && r.2 != "created" && !dir_times(r)),
        "one row for the tree"
    );
    // The metadata change: no object, the old mode in the row.
    let (action, object, _) = by_path["m"];
    assert_eq!((action, object), ("metadata", false));
    let versions = ferry_receiver::history::read_versions(&history, &"m".into()).unwrap();
    let changed = versions.iter().find(|v| v.action == "metadata").unwrap();
    let meta: serde_json::Value = serde_json::from_str(&changed.meta).unwrap();
    assert_eq!(meta["mode"].as_u64().unwrap() & 0o777, 0o644);
    // The rename: where `a` went, and what it replaced.
    let renamed = rows
        .iter()
        .find(|r| r.1 == "a" && r.2 == "renamed")
        .unwrap();
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
        ..keep_on_any_free_space()
    };
    let mut pair = Pair::with_history(keep);
    let history = pair.history();
    let session = pair.session().await;
    for v in 0..3u8 {
        push_whole(&session, "f", &[v; 1000]).await.unwrap();
    }
    assert_eq!(objects(&history).len(), 2, "two superseded versions");
    // The receiver prunes on its own (every second for retention counted in seconds): the
    // objects go first, then their rows (a crash between leaves rows the start-up check drops).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !objects(&history).is_empty() || rows(&history).iter().any(|r| r.3) {
        assert!(std::time::Instant::now() < deadline, "never pruned");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_consistent(&history);
    assert_eq!(fs::read(pair.dst.join("f")).unwrap(), [2u8; 1000]);
    session.close().await;
}

#[tokio::test]
async fn a_full_filesystem_never_prunes_the_floor_it_refuses_writes_instead() {
    let place = tempfile::tempdir().unwrap();
    let _fs = Mount::tmpfs(place.path(), "16m");
    // Everything kept for a day, nothing of the last hour pruned for space, half kept free.
    let keep = Keep {
        rules: vec!["all for 1d".parse().unwrap()],
        floor: Duration::from_secs(3600),
        min_free_percent: 50,
    };
    let mut pair = Pair::with_history_in(keep, place.path());
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
    // Refused writes are counted, not logged one by one (a busy sender would flood the log).
    for _ in 0..20 {
        assert!(push_whole(&session, "small", b"x").await.is_err());
    }
    let counters = session.stats().await.unwrap();
    let refused = counters
        .iter()
        .find(|(k, _)| k == "refused_for_history")
        .unwrap()
        .1;
    assert!(refused >= 21, "{counters:?}");
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

/// Every regular file under `dir` (recursively): its content digest and (mode, mtime).
fn files_by_digest(dir: &Path) -> BTreeMap<[u8; 32], (u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let digest = *blake3::hash(&fs::read(e.path()).unwrap()).as_bytes();
                out.insert(digest, (md.mode(), md.mtime()));
            }
        }
    }
    out
}

/// `dirs` × `files` files of distinct content under `src`; their digests and (mode, mtime).
fn originals(src: &Path, dirs: usize, files: usize) -> Vec<(String, [u8; 32], (u32, i64))> {
    let mut out = Vec::new();
    for d in 0..dirs {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for i in 0..files {
            let name = format!("d{d}/f{i}.doc");
            let data = pseudo_random(200 + (i * 37) % 3000, (d * files + i) as u64);
            fs::write(src.join(&name), &data).unwrap();
            let md = fs::metadata(src.join(&name)).unwrap();
            out.push((
                name,
                *blake3::hash(&data).as_bytes(),
                (md.mode(), md.mtime()),
            ));
        }
    }
    out
}

/// Ransomware on a live source: every file encrypted in place (random bytes over it), renamed
/// `NAME.locked`, and one in ten of those deleted. The mirror follows within milliseconds, and
/// the history keeps every original, byte for byte, with its mode and mtime.
#[test]
fn ransomware_drill_live_every_original_stays_in_history() {
    let site = Site::new();
    let (src, dst, history, backup) = site.history_backup("");
    let originals = originals(&src, 20, 100);
    let _daemon = site.run(&one_group(&backup, &src, ""), 1);
    site.wait_settled(60);
    assert!(
        objects(&history).is_empty(),
        "the first copy supersedes nothing"
    );

    for (n, (name, _, _)) in originals.iter().enumerate() {
        let path = src.join(name);
        fs::write(&path, pseudo_random(4096, 1_000_000 + n as u64)).unwrap();
        let locked = src.join(format!("{name}.locked"));
        fs::rename(&path, &locked).unwrap();
        if n % 10 == 0 {
            fs::remove_file(&locked).unwrap();
        }
    }
    fs::write(src.join("marker"), b"after the attack").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fs::read(dst.join("marker")).ok().as_deref() != Some(b"after the attack") {
        assert!(
            std::time::Instant::now() < deadline,
            "the marker never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    site.wait_settled(120);
    // The mirror is the attacked tree...
    let mirrored = files_by_digest(&dst);
    assert!(originals.iter().all(|(_, d, _)| !mirrored.contains_key(d)));
    // ...and the history holds every original.
    let kept = files_by_digest(&history.join("objects"));
    let mut missing = Vec::new();
    for (name, digest, attrs) in &originals {
        match kept.get(digest) {
            Some(k) if k == attrs => {}
            Some(k) => missing.push(format!(
                "{name}: kept with (mode, mtime) {k:?}, was {attrs:?}"
            )),
            None => missing.push(format!("{name}: not kept")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {}: {:?}",
        missing.len(),
        originals.len(),
        &missing[..missing.len().min(5)]
    );
    assert_consistent(&history);
    // `ferry history` on the backup host shows them, from the journal alone.
    let config = site.path("recv/receiver.toml");
    let o = run(ferry()
        .args(["history", "--json", "--config"])
        .arg(&config)
        .args(["file", "d3"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    let in_d3 = originals
        .iter()
        .filter(|(n, _, _)| n.starts_with("d3/"))
        .count();
    let kept_d3 = listed.iter().filter(|v| v["object"] == true).count();
    assert!(
        kept_d3 >= in_d3,
        "{kept_d3} kept in d3, {in_d3} files there"
    );
    let in_dir = |p: &str| p == "d3" || p.starts_with("d3/");
    assert!(listed.iter().all(|v| in_dir(v["path"].as_str().unwrap())));
    // From the source host, over a read session: the same versions.
    let o = run(ferry()
        .args(["history", "--json", "--group", "file", "--config"])
        .arg(site.config())
        .arg("d3"));
    assert!(o.status.success(), "{}", stderr(&o));
    let remote: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    let ids = |vs: &[serde_json::Value]| -> Vec<i64> {
        vs.iter().map(|v| v["id"].as_i64().unwrap()).collect()
    };
    assert_eq!(ids(&remote), ids(&listed));
    let o = run(ferry()
        .args(["history", "--config"])
        .arg(&config)
        .args(["file", "d3/f7.doc"]));
    let text = stdout(&o);
    assert!(text.starts_with("SUPERSEDED (UTC)"), "{text}");
    assert!(text.contains(" d3/f7.doc"), "{text}");
    let o = run(ferry()
        .args(["history", "--config"])
        .arg(&config)
        .args(["nope"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no module \"nope\" (modules: file)"),
        "{}",
        stderr(&o)
    );
}

/// The receiver killed (SIGKILL) while a sender replaces 20,000 files, its history on: after a
/// restart, journal and objects agree, and every first version is in the module or in the
/// history; a second run then keeps the rest.
#[test]
fn kill_9_of_the_receiver_mid_commit_leaves_journal_and_history_consistent() {
    let site = Site::new();
    let (src, dst, history, mut backup) = site.history_backup("");
    let first = originals(&src, 200, 100);
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (n, (name, _, _)) in first.iter().enumerate() {
        fs::write(src.join(name), pseudo_random(8192, 5_000_000 + n as u64)).unwrap();
    }
    let mut sending = common::proc::Proc::spawn(
        ferry()
            .args(["send", "--once", "--config"])
            .arg(site.config()),
    );
    // Killed once some versions are journaled and before the sender is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Versions superseded (each name's `created` row of the first copy aside).
    let superseded = |h: &Path| rows(h).iter().filter(|r| r.2 != "created").count();
    while !history.join("journal.sqlite3").exists() || superseded(&history) < 100 {
        assert!(std::time::Instant::now() < deadline, "nothing journaled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let journaled_before = superseded(&history);
    assert!(
        sending.running(),
        "the sender finished before the kill: the test proves nothing"
    );
    backup.receiver = None; // SIGKILL
    let _ = sending.stop();
    assert!(
        journaled_before < first.len(),
        "killed after the last commit: {journaled_before}"
    );

    backup.restart();
    assert_consistent(&history);
    let module = files_by_digest(&dst);
    let kept = files_by_digest(&history.join("objects"));
    for (name, digest, _) in &first {
        assert!(
            module.contains_key(digest) || kept.contains_key(digest),
            "{name}: its first version is neither in the module nor in the history"
        );
    }
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let kept = files_by_digest(&history.join("objects"));
    let lost: Vec<&String> = first
        .iter()
        .filter(|(_, d, _)| !kept.contains_key(d))
        .map(|(n, _, _)| n)
        .collect();
    assert!(
        lost.is_empty(),
        "first versions not in the history: {lost:?}"
    );
    assert_consistent(&history);
}

/// `history` inside the module, on another filesystem, or on another mount of the module's
/// filesystem (a bind mount, across which links fail) is refused by `check-config`, naming
/// the module key and both paths.
#[test]
fn history_inside_the_module_or_on_another_mount_is_refused_naming_both() {
    let site = Site::new();
    let dir = site.dir("recv");
    keygen(&dir);
    let dst = site.dir("dst");
    let real = site.dir("real");
    let bound = site.path("bound");
    let _bind = Mount::bind(&real, &bound);
    let small = site.path("small");
    let _tmpfs = Mount::tmpfs(&small, "1m");
    let cases = [
        (dst.join("versions"), "inside the module path"),
        (bound.join("h"), "another mount"),
        (small.join("h"), "another filesystem"),
    ];
    for (history, says) in cases {
        let text = format!(
            "listen = \"127.0.0.1:1\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [modules.file]\npath = {:?}\nread_only = false\nhistory = {:?}\n",
            dst.display().to_string(),
            history.display().to_string()
        );
        fs::create_dir_all(&history).unwrap();
        fs::write(dir.join("receiver.toml"), text).unwrap();
        let o = run(ferry().arg("check-config").arg(dir.join("receiver.toml")));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{history:?}: {e}");
        for needle in [says, "modules.file.history", dst.to_str().unwrap()] {
            assert!(
                e.contains(needle),
                "{history:?}: {e:?} should say {needle:?}"
            );
        }
        assert_eq!(e.lines().count(), 1, "said once: {e}");
    }
}

/// With history on, a live `rm -rf` of 90% needs no operator: the deletions are applied into
/// the history (nothing is lost), said once as a warning, and counted in `ferry status`.
#[test]
fn a_mass_deletion_into_history_is_applied_and_said_once() {
    let site = Site::new();
    let (src, dst, history, backup) = site.history_backup("");
    fill_tree(&src, 20, 100, |i| format!("{i}\n").into_bytes());
    let daemon = site.run(&one_group(&backup, &src, "delete_guard_min = 500"), 1);
    for d in 0..18 {
        fs::remove_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    fs::write(src.join("marker"), b"after").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !dst.join("marker").exists() || dst.join("d0").exists() || dst.join("d17").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "never applied: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    site.wait_settled(60);
    let log = daemon.log();
    assert_eq!(log.matches("keeps history").count(), 1, "said once: {log}");
    let (code, v) = site.status();
    assert_eq!(code, 0, "nothing waits for an operator: {v}");
    assert!(
        v["targets"][0]["mass_changes"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // Every deleted directory is in the history, whole.
    let kept: Vec<(String, String)> = rows(&history)
        .into_iter()
        .filter(|r| r.3)
        .map(|r| (r.1, r.2))
        .collect();
    for d in 0..18 {
        let name = format!("d{d}");
        assert!(
            kept.contains(&(name.clone(), "deleted".into())),
            "{name}: {kept:?}"
        );
    }
    assert_consistent(&history);
}

/// A sender asks a module's history over its session: the versions the journal holds, or a
/// refusal naming the module when it keeps none. Asking changes nothing.
#[tokio::test]
async fn history_over_a_session_lists_versions_or_says_there_is_none() {
    let mut mirror = Pair::new();
    let session = mirror.session().await;
    let none = session.history(&"".into()).await.unwrap_err().to_string();
    assert!(none.contains("module file keeps no history"), "{none}");
    session.close().await;

    let mut pair = Pair::with_history(keep_on_any_free_space());
    fs::create_dir(pair.dst.join("a")).unwrap();
    let session = pair.session().await;
    for v in 0..3u8 {
        push_whole(&session, "a/f", &[v; 10]).await.unwrap();
    }
    let versions = session.history(&"a".into()).await.unwrap();
    // (The directory's own rows, its times before each change in it, are left out.)
    let got: Vec<(String, &str, u64)> = versions
        .iter()
        .filter(|v| v.kind != "dir")
        .map(|v| (v.path.to_string(), v.action.as_str(), v.size))
        .collect();
    assert_eq!(
        got,
        [
            ("a/f".to_string(), "created", 10),
            ("a/f".to_string(), "replaced", 10),
            ("a/f".to_string(), "replaced", 10)
        ]
    );
    assert!(session.history(&"b".into()).await.unwrap().is_empty());
    // Three of a/f, and three of `a`'s times before each change in it.
    assert_eq!(rows(&pair.history()).len(), 6);
    assert_eq!(versions.len(), 6);
    session.close().await;
}

/// A full disk in the middle of commits (the module and its history on an 8 MiB tmpfs, no
/// free-space margin): writes fail and are not acknowledged, and once the receiver starts again
/// its check leaves journal and objects consistent, with every acknowledged version still in
/// the module or in the history.
#[tokio::test]
async fn a_full_disk_mid_commit_leaves_journal_and_history_consistent() {
    let place = tempfile::tempdir().unwrap();
    let _fs = Mount::tmpfs(place.path(), "8m");
    let keep = keep_on_any_free_space();
    let mut pair = Pair::with_history_in(keep.clone(), place.path());
    let (dst, history) = (pair.dst.clone(), pair.history());
    let session = pair.session().await;
    let mut acked = Vec::new();
    let mut refused = 0;
    for v in 0..24u64 {
        let data = pseudo_random(512 << 10, v);
        match push_whole(&session, &format!("f{}", v % 3), &data).await {
            Ok(()) => acked.push(data),
            Err(e) => {
                assert!(
                    e.to_string().contains("No space left on device")
                        || e.to_string().contains("full"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "{} versions acknowledged, {refused} refused for space",
        acked.len()
    );
    assert!(
        refused > 0,
        "the disk never filled: the test proves nothing"
    );
    assert!(acked.len() >= 8, "{} acknowledged", acked.len());
    session.close().await;
    drop(pair);
    // The start-up check, as the receiver runs it when the module opens again.
    let reopened = ferry_receiver::history::History::open("file", &dst, &history, keep).unwrap();
    drop(reopened);
    assert_consistent(&history);
    let mut found = files_by_digest(&dst);
    found.extend(files_by_digest(&history.join("objects")));
    for (i, data) in acked.iter().enumerate() {
        let digest = *blake3::hash(data).as_bytes();
        assert!(found.contains_key(&digest), "acknowledged version {i} lost");
    }
}

/// Every entry below `root`: path → (content or symlink target or "dir", permission bits).
/// `ferry restore` on the backup host brings the module back as it was at a time — files
/// rewritten, re-moded and deleted since come back, ones created since stay out — or only
/// the paths asked for; without `--at`, as it is now.
#[test]
fn restore_on_the_backup_host_brings_back_any_moment() {
    let site = Site::new();
    let (src, _dst, _history, backup) = site.history_backup("");
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("a.txt"), b"first").unwrap();
    set_mode(&src.join("a.txt"), 0o640);
    fs::write(src.join("d/x"), b"x").unwrap();
    fs::write(src.join("d/e/y"), b"y").unwrap();
    std::os::unix::fs::symlink("d/x", src.join("link")).unwrap();
    fs::write(src.join("h1"), b"one file, two names").unwrap();
    fs::hard_link(src.join("h1"), src.join("h2")).unwrap();
    write_sparse(&src.join("sparse"), 64 << 20, &[7u8; 4096], &[0, 32 << 20]);
    site.write_config(&one_group(&backup, &src, ""));
    let once = || {
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    once();
    let before = tree(&src);
    let t0 = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(10));
    fs::write(src.join("a.txt"), b"second, longer").unwrap();
    set_mode(&src.join("a.txt"), 0o600);
    fs::remove_dir_all(src.join("d")).unwrap();
    fs::write(src.join("new"), b"created after").unwrap();
    once();
    let config = site.path("recv/receiver.toml");
    let restore = |extra: &[&str], dest: &Path| {
        run(ferry()
            .args(["restore", "--config"])
            .arg(&config)
            .args(["--module", "file"])
            .args(extra)
            .arg(dest))
    };
    // As it was at t0.
    let then = site.path("then");
    let o = restore(&["--at", &t0], &then);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(tree(&then), before);
    let ino = |p: &str| fs::metadata(then.join(p)).unwrap().ino();
    assert_eq!(ino("h1"), ino("h2"), "two names of one file stay one file");
    let held = allocated(&then.join("sparse"));
    assert!(
        held < 1 << 20,
        "the 64 MiB sparse file holds {held} bytes: holes were filled"
    );
    // Only `d`, at t0: it and what was under it.
    let part = site.path("part");
    let o = restore(&["--at", &t0, "--path", "d"], &part);
    assert!(o.status.success(), "{}", stderr(&o));
    let keys: Vec<String> = tree(&part).into_keys().collect();
    assert_eq!(keys, ["d", "d/e", "d/e/y", "d/x"]);
    // Now: the module as it is.
    let now = site.path("now");
    let o = restore(&[], &now);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(tree(&now), tree(&src));
    // Over a tree that holds the earlier moment: only what differs is written, and nothing
    // is removed without --delete. A dry run first changes nothing.
    let o = restore(&["--dry-run", "--delete"], &then);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("delete d\n"), "{}", stdout(&o));
    assert_eq!(tree(&then), before, "a dry run changed DEST");
    let o = restore(&[], &then);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("module file as it is now: 2 files ("),
        "{}",
        stdout(&o)
    );
    assert!(then.join("d/e/y").exists(), "removed without --delete");
    assert_eq!(fs::read(then.join("a.txt")).unwrap(), b"second, longer");
    let o = restore(&["--delete"], &then);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(tree(&then), tree(&src));
    // Refusals: before the history began, a path that was not there.
    let o = restore(&["--at", "1 year ago"], &site.path("old"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("does not reach back"), "{}", stderr(&o));
    let o = restore(&["--at", &t0, "--path", "new"], &site.path("x"));
    assert!(
        stderr(&o).contains("new: not in the module at "),
        "{}",
        stderr(&o)
    );
}

/// A big file changed again and again (a disk image): the receiver never reads its copy to
/// answer a delta. It keeps the signature and window digests of each big file it commits
/// (signed after its commit when sent whole, as the bytes came when rebuilt), so a delta is
/// answered at once, and every window sent as
/// a copy of its own (same digest, same place) is taken by that digest, never read; the file
/// is right each time. A copy changed behind the receiver's back (same size and mtime, new
/// ctime) is read again.
#[test]
fn on_xfs_a_big_file_changed_again_is_sent_by_window_digest_without_reading_the_copy() {
    use ferry_protocol::delta::WINDOW;
    use std::os::unix::fs::FileExt;
    let site = Site::new();
    let _xfs = Mount::xfs(&site.path("xfs.img"), &site.path("xfs"), "512M");
    let (src, dst) = (site.dir("src"), site.path("xfs/dst"));
    let backup = Backup::start_with(
        site.root(),
        "recv",
        &[("file", &dst)],
        &site.fingerprint,
        "",
    );
    site.write_config(&one_group(&backup, &src, ""));
    // Three whole windows and a short one; and a small file of one window.
    let mut big = pseudo_random(3 * WINDOW + 5000, 21);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("small"), pseudo_random(2 << 20, 22)).unwrap();
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The big file, sent whole, is signed after its commit: its next delta finds it known
    // once the receiver says so.
    wait_signed_later(&site, 1);
    let counters = || {
        let s = site.stats();
        (
            summary_value(&s, "bases_signed"),
            summary_value(&s, "windows_known"),
        )
    };
    let (signed0, known0) = counters();
    let mut change = |window: usize, seed: u64| {
        let at = window * WINDOW + 777;
        big[at..at + 1024].copy_from_slice(&pseudo_random(1024, seed));
        fs::write(src.join("big"), &big).unwrap();
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            fs::read(dst.join("big")).unwrap() == big,
            "the copy differs"
        );
    };
    // The first delta reads nothing: the three other windows are known.
    change(1, 23);
    assert_eq!(counters(), (signed0, known0 + 3));
    // Nor do the next ones: the window rebuilt before is known now.
    change(2, 24);
    assert_eq!(counters(), (signed0, known0 + 6));
    change(1, 25);
    assert_eq!(counters(), (signed0, known0 + 9));
    // A local user of the backup host rewrites a window of the copy in place, and puts its
    // size and mtime back: the new ctime says so, the copy is read again, and the window is
    // sent again, so the copy is right once more.
    let copy = fs::OpenOptions::new()
        .write(true)
        .open(dst.join("big"))
        .unwrap();
    let mtime = filetime::FileTime::from_last_modification_time(&copy.metadata().unwrap());
    copy.write_all_at(&[0; 4096], 10).unwrap();
    filetime::set_file_handle_times(&copy, None, Some(mtime)).unwrap();
    drop(copy);
    change(3, 26);
    assert_eq!(counters(), (signed0 + 1, known0 + 11));
    // A file of one window whose mtime alone changed goes as a delta of one copy: its digest
    // is its bytes' (no window is taken by digest), and it is committed.
    let small = src.join("small");
    filetime::set_file_mtime(&small, filetime::FileTime::from_unix_time(1_000_000, 0)).unwrap();
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read(&small).unwrap(),
        fs::read(dst.join("small")).unwrap()
    );
    assert_eq!(fs::metadata(dst.join("small")).unwrap().mtime(), 1_000_000);
    assert_eq!(counters().1, known0 + 11);
}

/// Bytes in use on the filesystem of `path`.
fn used_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_blocks - st.f_bfree) as u64 * st.f_frsize as u64
}

/// On a filesystem that clones files (XFS), a delta builds the new version as a clone of the
/// one it replaces and writes only what changed, so the version history keeps and the new one
/// share every unchanged extent: 1 MiB changed in a 64 MiB file costs the filesystem about
/// 1 MiB, where a whole new file cost 64 MiB.
#[test]
fn a_delta_on_xfs_writes_only_what_changed_and_shares_the_rest_with_history() {
    let site = Site::new();
    let _xfs = Mount::xfs(&site.path("xfs.img"), &site.path("xfs"), "512M");
    let (src, dst, history) = (
        site.dir("src"),
        site.path("xfs/dst"),
        site.path("xfs/history"),
    );
    let keys = format!("history = {:?}\n", history.display().to_string());
    let backup = Backup::start_with(
        site.root(),
        "recv",
        &[("file", &dst)],
        &site.fingerprint,
        &keys,
    );
    site.write_config(&one_group(&backup, &src, ""));
    let old = pseudo_random(64 << 20, 7);
    fs::write(src.join("big"), &old).unwrap();
    // Beside it, made over clones too: a file that shrinks, one that grows, and a sparse one
    // (which goes whole, holes as holes: the clone is dropped).
    let shrinks = pseudo_random(4 << 20, 9);
    let grows = pseudo_random(2 << 20, 10);
    fs::write(src.join("shrinks"), &shrinks).unwrap();
    fs::write(src.join("grows"), &grows).unwrap();
    let sparse = |seed| {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(src.join("sparse")).unwrap();
        f.write_all_at(&pseudo_random(1 << 20, seed), 0).unwrap();
        f.write_all_at(&pseudo_random(1 << 20, seed + 1), 7 << 20)
            .unwrap();
    };
    sparse(11);
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The big file, sent whole, is signed after its commit (and let go of only then).
    wait_signed_later(&site, 1);
    let before = used_bytes(&dst);
    let mut new = old.clone();
    new[30 << 20..31 << 20].copy_from_slice(&pseudo_random(1 << 20, 8));
    fs::write(src.join("big"), &new).unwrap();
    let mut shrunk = shrinks[..3 << 20].to_vec();
    shrunk[1 << 20..(1 << 20) + 1024].copy_from_slice(&pseudo_random(1024, 12));
    fs::write(src.join("shrinks"), &shrunk).unwrap();
    let mut grown = grows.clone();
    grown.extend(pseudo_random(1 << 20, 13));
    fs::write(src.join("grows"), &grown).unwrap();
    sparse(14);
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        summary_value(&stdout(&o), "delta_files"),
        3,
        "{}",
        stderr(&o)
    );
    let grew = used_bytes(&dst) - before;
    assert!(
        grew < 8 << 20,
        "the filesystem grew by {grew} bytes for a 1 MiB change"
    );
    assert!(
        fs::read(dst.join("big")).unwrap() == new,
        "the new version differs"
    );
    for name in ["shrinks", "grows", "sparse"] {
        let (here, there) = (src.join(name), dst.join(name));
        assert!(
            fs::read(&here).unwrap() == fs::read(&there).unwrap(),
            "{name} differs"
        );
    }
    // 2 MiB of data in 8 MiB: the holes stayed holes (no base data left in them).
    let blocks = fs::metadata(dst.join("sparse")).unwrap().blocks() * 512;
    assert!(
        blocks <= 3 << 20,
        "{blocks} bytes allocated for 2 MiB of data"
    );
    let kept: Vec<_> = fs::read_dir(history.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| fs::metadata(p).unwrap().len() == old.len() as u64)
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        fs::read(&kept[0]).unwrap() == old,
        "the kept version differs"
    );
    assert!(
        backup_log(&backup).contains("the filesystem clones files"),
        "{}",
        backup_log(&backup)
    );
    assert_consistent(&history);
}

/// Waits (a minute at most) until the receiver has signed `n` big files after their commit.
fn wait_signed_later(site: &Site, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while summary_value(&site.stats(), "signed_later") < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} files never signed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
