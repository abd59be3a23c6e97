//! `ferry restore` from a source host: a restore session to the receiver brings a module back
//! as it was at a time, into an empty directory or over a damaged tree (only what differs
//! travels), with every attribute ferry keeps. Checked against a `cp -a` taken at that moment,
//! compared independently of ferry (bytes, modes, owners, times, xattrs, ACLs, capabilities,
//! hard links, holes).

mod common;

use common::site::{one_group, Backup, Site};
use common::*;
use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// The receiver's module and history as bytes and names, and the journal's rows: what a
/// restore must never change (SQLite's own `-wal` and `-shm` files move under any reader).
fn module_state(dst: &Path, history: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let db = rusqlite::Connection::open_with_flags(
        history.join("journal.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT id, hex(path), action, object, time_ns, meta FROM versions ORDER BY id")
        .unwrap();
    let rows: Vec<String> = q
        .query_map([], |r| {
            Ok(format!(
                "{} {} {} {} {} {}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let listing = |root: &Path| -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    stack.push(p.clone());
                }
                let body = if md.is_file() {
                    blake3::hash(&fs::read(&p).unwrap()).to_hex().to_string()
                } else {
                    String::new()
                };
                use std::os::unix::fs::MetadataExt;
                out.push(format!(
                    "{} {:o} {} {}",
                    p.strip_prefix(root).unwrap().display(),
                    md.mode(),
                    md.mtime_nsec(),
                    body
                ));
            }
        }
        out.retain(|l| !l.starts_with("journal.sqlite3"));
        out.sort();
        out
    };
    (listing(dst), listing(history), rows)
}

fn restore(site: &Site, extra: &[&str], dest: &Path) -> Output {
    run(ferry()
        .args(["restore", "--config"])
        .arg(site.config())
        .args(["--group", "file"])
        .args(extra)
        .arg(dest))
}

/// The history issue's ransomware drill, finished: every file of a rich tree encrypted in
/// place, some renamed, some deleted, and the damage replicated; then the tree restored as it
/// was the moment before, into an empty directory and over the encrypted source itself.
/// Both equal a `cp -a` taken at that moment; the module and its history do not change.
#[test]
fn ransomware_drill_restored_into_empty_and_over_the_encrypted_source() {
    let site = Site::new();
    let (src, dst, history) = (site.dir("src"), site.path("dst"), site.path("history"));
    // The module keeps what rich_tree holds: capabilities need `setuid = true`.
    let keys = format!(
        "history = {:?}\nsetuid = true",
        history.display().to_string()
    );
    let backup = Backup::start_with(
        site.root(),
        "recv",
        &[("file", &dst)],
        &site.fingerprint,
        &keys,
    );
    rich_tree(&src);
    fs::create_dir(src.join("docs")).unwrap();
    fill_tree(&src.join("docs"), 4, 25, |i| pseudo_random(3000 + i * 7, i as u64));
    fs::write(src.join("big.db"), pseudo_random(3 << 20, 77)).unwrap();
    site.write_config(&one_group(&backup, &src, ""));
    let once = || {
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    once();
    let copy = site.path("copy");
    let o = run(std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&copy));
    assert!(o.status.success(), "cp -a: {}", stderr(&o));
    let before = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    std::thread::sleep(Duration::from_millis(20));

    // The attack: every document encrypted in place (same size), some renamed to .locked,
    // a directory deleted, the database's first MiB scrambled, a ransom note left.
    let mut encrypted = 0;
    for d in 0..4 {
        for f in 0..25 {
            let p = src.join(format!("docs/d{d}/f{f}"));
            let len = fs::metadata(&p).unwrap().len() as usize;
            fs::write(&p, pseudo_random(len, 1000 + (d * 25 + f) as u64)).unwrap();
            if f % 5 == 0 {
                fs::rename(&p, p.with_extension("locked")).unwrap();
            }
            encrypted += 1;
        }
    }
    fs::remove_dir_all(src.join("docs/d3")).unwrap();
    fs::write(src.join("notes.txt"), b"pay up\n").unwrap();
    fs::write(src.join("store/a"), pseudo_random(300_000, 99)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(src.join("big.db"))
            .unwrap();
        f.write_all_at(&pseudo_random(1 << 20, 5), 0).unwrap();
    }
    fs::write(src.join("README-RANSOM.txt"), b"send bitcoin\n").unwrap();
    once();
    assert!(tree_difference(&copy, &dst).is_some(), "the attack reached the backup");
    eprintln!("{encrypted} documents encrypted");
    let module_before = module_state(&dst, &history);

    // Into an empty directory.
    let fresh = site.path("fresh");
    // As root, capabilities come back with --setuid (like setuid bits, not by default).
    let o = restore(&site, &["--at", &before, "--setuid"], &fresh);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_trees_equal(&copy, &fresh);
    if let Some(d) = attrs_difference(&copy, &fresh, RICH_PATHS, &["vm.img"]) {
        panic!("restored into an empty directory: {d}");
    }

    // Over the encrypted source, removing what the attack added: only what differs travels,
    // the database as a delta (one of its three MiB differs).
    let o = restore(&site, &["--at", &before, "--delete", "--setuid"], &src);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let said = stdout(&o);
    eprintln!("{said}");
    assert_trees_equal(&copy, &src);
    if let Some(d) = attrs_difference(&copy, &src, RICH_PATHS, &["vm.img"]) {
        panic!("restored over the encrypted source: {d}");
    }
    let received = said
        .split("as deltas, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no byte count in {said:?}"));
    // The documents (about 300 KB), store/a (300 KB), notes and the database's changed MiB,
    // not its three: well under the 3.6 MB a whole copy would take.
    assert!(
        received < 2_200_000,
        "{received} bytes received for the restore over the source: {said}"
    );
    let deltas = said
        .split(" as deltas")
        .next()
        .and_then(|h| h.rsplit('(').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no delta count in {said:?}"));
    assert!(deltas >= 1, "the database did not travel as a delta: {said}");

    // A restore reads: the module and its history are as they were.
    let module_after = module_state(&dst, &history);
    assert!(module_before.2.len() > 100, "the journal holds the attack");
    assert!(
        module_after == module_before,
        "the restores changed the module or its history"
    );
}

/// Points in time, paths, what stays without `--delete`, and who may restore: an unlisted
/// certificate is refused naming it, a read-only module serves restores, a time before the
/// history is refused naming the oldest moment.
#[test]
fn restore_brings_back_paths_at_several_moments_and_only_for_restore_clients() {
    let site = Site::new();
    let (src, dst, history) = (site.dir("src"), site.path("dst"), site.path("history"));
    let keys = format!("history = {:?}", history.display().to_string());
    let mut backup = Backup::start_with(
        site.root(),
        "recv",
        &[("file", &dst)],
        &site.fingerprint,
        &keys,
    );
    site.write_config(&one_group(&backup, &src, ""));
    let once = || {
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let now = || {
        std::thread::sleep(Duration::from_millis(20));
        let t = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        std::thread::sleep(Duration::from_millis(20));
        t
    };
    let snap = |name: &str| {
        let p = site.path(name);
        assert!(run(std::process::Command::new("cp").arg("-a").arg(&src).arg(&p))
            .status
            .success());
        p
    };
    // Moment 1: created.
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/f"), b"one").unwrap();
    fs::write(src.join("top"), b"top").unwrap();
    once();
    let (t1, s1) = (now(), snap("s1"));
    // Moment 2: edited, chmodded, renamed.
    fs::write(src.join("a/b/f"), b"two, longer").unwrap();
    set_mode(&src.join("top"), 0o600);
    fs::rename(src.join("a/b"), src.join("a/c")).unwrap();
    once();
    let (t2, s2) = (now(), snap("s2"));
    // Moment 3: deleted.
    fs::remove_dir_all(src.join("a")).unwrap();
    fs::write(src.join("later"), b"later").unwrap();
    once();
    for (i, (t, s)) in [(&t1, &s1), (&t2, &s2)].into_iter().enumerate() {
        let dest = site.path(&format!("at{i}"));
        let o = restore(&site, &["--at", t], &dest);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(tree_difference(s, &dest), None, "at {t}");
    }
    // One directory at moment 1 into a tree holding other things: they stay (no --delete).
    let part = site.dir("part");
    fs::write(part.join("mine"), b"kept").unwrap();
    let o = restore(&site, &["--at", &t1, "--path", "a/b"], &part);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(fs::read(part.join("a/b/f")).unwrap(), b"one");
    assert_eq!(fs::read(part.join("mine")).unwrap(), b"kept");
    assert!(!part.join("top").exists());

    // Before the history began.
    let o = restore(&site, &["--at", "1 year ago"], &site.path("old"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not reach back"), "{}", stderr(&o));

    // A read-only module serves restores (and refuses the sender).
    let config = backup.dir.join("receiver.toml");
    let text = fs::read_to_string(&config).unwrap();
    backup.stop();
    fs::write(&config, text.replace("read_only = false", "read_only = true")).unwrap();
    backup.restart();
    let ro = site.path("ro");
    let o = restore(&site, &[], &ro);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(tree_difference(&src, &ro), None);

    // An unlisted certificate is refused, named.
    backup.stop();
    let other = "sha256:".to_string() + &"ab".repeat(32);
    fs::write(
        &config,
        text.replace(
            "read_only = false",
            &format!("read_only = false\nrestore_clients = [{other:?}]"),
        ),
    )
    .unwrap();
    backup.restart();
    let o = restore(&site, &[], &site.path("refused"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&site.fingerprint) && stderr(&o).contains("not allowed"),
        "{}",
        stderr(&o)
    );
    // The sender itself still writes (clients is unchanged).
    fs::write(src.join("after"), b"x").unwrap();
    once();
}
