//! `ferry restore` from a source host: a restore session to the receiver brings a module back
//! as it was at a time, into an empty directory or over a damaged tree (only what differs
//! travels), with every attribute ferry keeps. Checked against a `cp -a` taken at that moment,
//! compared independently of ferry (bytes, modes, owners, times, xattrs, ACLs, capabilities,
//! hard links, holes).

mod common;

use common::site::{one_group, Site};
use common::*;
use ferry_protocol::connection::{server_answer, server_hello, FrameReader, FrameWriter};
use ferry_protocol::message::Keeps;
use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// The receiver's module and history as bytes and names, and the journal's rows: what a
/// restore must never change (SQLite's own `-wal` and `-shm` files move under any reader).
fn module_state(dst: &Path, history: &Path) -> (Listing, Listing, Vec<String>) {
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
    // The roots' own entries and SQLite's files left out, as said above.
    let ours = |root: &Path| -> Listing {
        let mut l = listing(root);
        l.retain(|e| !e.0.is_empty() && !e.0.starts_with("journal.sqlite3"));
        l
    };
    (ours(dst), ours(history), rows)
}

fn restore(site: &Site, extra: &[&str], dest: &Path) -> Output {
    run(ferry()
        .args(["restore", "--config"])
        .arg(site.config())
        .args(["--group", "file"])
        .args(extra)
        .arg(dest))
}

/// `ferry restore` on the backup host (receiver.toml, module `file`), no network.
fn on_backup_host(site: &Site, extra: &[&str], dest: &Path) -> Output {
    run(ferry()
        .args(["restore", "--config"])
        .arg(site.path("recv/receiver.toml"))
        .args(["--module", "file"])
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
    // The module keeps what rich_tree holds: capabilities need `setuid = true`.
    let (src, dst, history, backup) = site.history_backup("setuid = true");
    rich_tree(&src);
    fs::create_dir(src.join("docs")).unwrap();
    fill_tree(&src.join("docs"), 4, 25, |i| {
        pseudo_random(3000 + i * 7, i as u64)
    });
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
    assert!(
        tree_difference(&copy, &dst).is_some(),
        "the attack reached the backup"
    );
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
    assert!(
        deltas >= 1,
        "the database did not travel as a delta: {said}"
    );

    // A restore reads: the module and its history are as they were.
    let module_after = module_state(&dst, &history);
    assert!(module_before.2.len() > 100, "the journal holds the attack");
    assert!(
        module_after == module_before,
        "the restores changed the module or its history"
    );
}

/// The whole module as it is now, into an empty directory, goes as it is read, a piece at a
/// time (the first small, then larger): a file whose names fall in different pieces comes
/// back as one file, directory times and the root's metadata as they are, every attribute.
/// Over a copy that holds something, the whole view is read first and only what differs
/// travels.
#[test]
fn a_whole_module_as_it_is_now_goes_as_it_is_read() {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let (src, _dst, _history, backup) = site.history_backup("setuid = true");
    rich_tree(&src);
    // First in tree order, far before its other names (store/a, store/b, other/c): several
    // hundred entries of docs/ lie between, more than the first piece holds.
    fs::hard_link(src.join("store/a"), src.join("a0")).unwrap();
    fs::create_dir(src.join("docs")).unwrap();
    fill_tree(&src.join("docs"), 8, 80, |i| {
        pseudo_random(100 + i, i as u64)
    });
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let fresh = site.path("fresh");
    let o = restore(&site, &["--setuid"], &fresh);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_trees_equal(&src, &fresh);
    if let Some(d) = attrs_difference(&src, &fresh, RICH_PATHS, &["vm.img"]) {
        panic!("restored into an empty directory: {d}");
    }
    let ino = |p: &str| fs::metadata(fresh.join(p)).unwrap().ino();
    for name in ["store/a", "store/b", "other/c"] {
        assert_eq!(ino("a0"), ino(name), "a0 and {name} are one file");
    }
    let log = backup_log(&backup);
    assert_eq!(
        log.matches("restore: sending as read").count(),
        1,
        "not sent as read: {log}"
    );

    // Over what the first restore made, one file damaged: compared whole, only it travels.
    fs::write(fresh.join("docs/d3/f7"), b"damaged").unwrap();
    let o = restore(&site, &["--setuid"], &fresh);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_trees_equal(&src, &fresh);
    let said = stdout(&o);
    assert!(said.contains(": 1 files ("), "{said}");
    let log = backup_log(&backup);
    assert_eq!(log.matches("restore: sending as read").count(), 1, "{log}");
}

/// Points in time, paths, what stays without `--delete`, and who may restore: an unlisted
/// certificate is refused naming it, a read-only module serves restores, a time before the
/// history is refused naming the oldest moment.
/// A dry run's listing piped into a reader that stops early (`| head`): the listing stops,
/// the restore does not fail (no panic on the closed pipe), and its exit code is what it
/// would have been had every line been read. The same for a restore whose log goes there
/// too.
#[test]
fn a_listing_into_a_reader_that_stops_early_ends_quietly() {
    use std::io::BufRead;
    let site = Site::new();
    let (_src, dst, _backup) = site.one_backup();
    // Far more than a pipe holds (64 KiB): ~5,000 lines of ~80 bytes.
    let long = "n".repeat(64);
    for d in 0..50 {
        let dir = dst.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..100 {
            fs::write(dir.join(format!("{long}{i}")), b"x").unwrap();
        }
    }
    let mut child = ferry()
        .args(["restore", "--dry-run", "--config"])
        .arg(site.path("recv/receiver.toml"))
        .args(["--module", "file"])
        .arg(site.path("dest"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone: the rest of the listing meets a closed pipe.
    assert!(first.starts_with("directory d"), "{first}");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(
        !site.path("dest").join("d0").exists(),
        "a dry run wrote DEST"
    );

    // Both outputs into one pipe (`2>&1 | head -1`), the log at debug level: the restore
    // itself goes on to the end when the reader goes, and every file arrives.
    let (mut out, into) = std::io::pipe().unwrap();
    let mut child = ferry()
        .env("FERRY_LOG", "debug")
        .args(["restore", "--config"])
        .arg(site.path("recv/receiver.toml"))
        .args(["--module", "file"])
        .arg(site.path("dest"))
        .stdout(into.try_clone().unwrap())
        .stderr(into)
        .spawn()
        .unwrap();
    let mut byte = [0u8; 1];
    std::io::Read::read_exact(&mut out, &mut byte).unwrap();
    drop(out);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(tree_difference(&dst, &site.path("dest")), None);
}

/// DEST named through a symlink to a directory (`/srv/restore -> /data/restore`) is restored
/// into that directory, as rsync's destination would be; a symlink to anything else, or to
/// nothing, is refused with what it is.
#[test]
fn dest_through_a_symlink_is_the_directory_it_names() {
    let site = Site::new();
    let (src, dst, mut backup) = site.one_backup();
    site.write_config(&one_group(&backup, &src, ""));
    fs::create_dir(dst.join("d")).unwrap();
    fs::write(dst.join("d/f"), b"restored").unwrap();
    let real = site.dir("real");
    let named = site.path("named");
    std::os::unix::fs::symlink(&real, &named).unwrap();
    let o = on_backup_host(&site, &[], &named);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(real.join("d/f")).unwrap(), b"restored");
    assert!(fs::symlink_metadata(&named).unwrap().is_symlink());
    let file = site.path("a-file");
    fs::write(&file, b"mine").unwrap();
    let to_file = site.path("to-file");
    std::os::unix::fs::symlink(&file, &to_file).unwrap();
    let o = on_backup_host(&site, &[], &to_file);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a directory (a symlink to "),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(&file).unwrap(), b"mine");
    let nowhere = site.path("nowhere");
    std::os::unix::fs::symlink(site.path("gone"), &nowhere).unwrap();
    let o = on_backup_host(&site, &[], &nowhere);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("No such file or directory"),
        "{}",
        stderr(&o)
    );
    assert!(!site.path("gone").exists());
    // From a source host, DEST is looked at before the backup host is called: with none to
    // answer, the refusal is still DEST's.
    backup.stop();
    let o = restore(&site, &[], &to_file);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a directory (a symlink to "),
        "{}",
        stderr(&o)
    );
}

/// A restore refused (a path not in the module), or a dry run, leaves no DEST behind that it
/// made itself; a DEST that was there stays.
#[test]
fn a_refused_restore_leaves_no_dest_it_made() {
    let site = Site::new();
    let (_src, dst, _backup) = site.one_backup();
    fs::write(dst.join("here"), b"x").unwrap();
    let absent = site.path("absent");
    let o = on_backup_host(&site, &["--path", "not-here"], &absent);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not-here: not in the module now"),
        "{}",
        stderr(&o)
    );
    assert!(!absent.exists(), "a refused restore left the DEST it made");
    // Nor does a dry run.
    let o = on_backup_host(&site, &["--dry-run"], &absent);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("file here\n"), "{}", stdout(&o));
    assert!(!absent.exists(), "a dry run left the DEST it made");
    let there = site.dir("there");
    let o = on_backup_host(&site, &["--path", "not-here"], &there);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        there.is_dir(),
        "a refused restore removed a DEST that was there"
    );
}

#[test]
fn restore_brings_back_paths_at_several_moments_and_only_for_restore_clients() {
    let site = Site::new();
    let (src, _dst, _history, mut backup) = site.history_backup("");
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
        assert!(
            run(std::process::Command::new("cp").arg("-a").arg(&src).arg(&p))
                .status
                .success()
        );
        p
    };
    // Moment 0: the module empty, before any change (after the history began).
    let t0 = now();
    // Moment 1: created.
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/f"), b"one").unwrap();
    fs::write(src.join("top"), b"top").unwrap();
    fs::create_dir(src.join("r")).unwrap();
    fs::write(src.join("r/x"), b"renamed later").unwrap();
    once();
    let (t1, s1) = (now(), snap("s1"));
    // Moment 2: edited, chmodded, renamed.
    fs::write(src.join("a/b/f"), b"two, longer").unwrap();
    set_mode(&src.join("top"), 0o600);
    fs::rename(src.join("a/b"), src.join("a/c")).unwrap();
    fs::rename(src.join("r"), src.join("s")).unwrap();
    once();
    let (t2, s2) = (now(), snap("s2"));
    // Moment 3: deleted.
    fs::remove_dir_all(src.join("a")).unwrap();
    fs::write(src.join("later"), b"later").unwrap();
    once();
    let verify_at = |t: &str, dir: &Path| {
        run(ferry()
            .args(["verify", "--config"])
            .arg(site.config())
            .args(["--sync", "file", "--at", t])
            .arg(dir))
    };
    for (i, (t, s)) in [(&t1, &s1), (&t2, &s2)].into_iter().enumerate() {
        let dest = site.path(&format!("at{i}"));
        let o = restore(&site, &["--at", t], &dest);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(tree_difference(s, &dest), None, "at {t}");
        // `verify --at` finds the copy taken then equal, and the other moment's not.
        let o = verify_at(t, s);
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
        assert!(stdout(&o).contains("equals"), "{}", stdout(&o));
    }
    let o = verify_at(&t1, &s2);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let said = stdout(&o);
    assert!(
        said.contains("delete a/c\n") && said.contains("directory a/b\n"),
        "{said}"
    );
    // One directory at moment 1 into a tree holding other things: they stay (no --delete).
    let part = site.dir("part");
    fs::write(part.join("mine"), b"kept").unwrap();
    // A dry run lists the steps and changes nothing.
    let o = restore(&site, &["--at", &t1, "--path", "a/b", "--dry-run"], &part);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let said = stdout(&o);
    assert!(
        said.contains("directory a/b\n") && said.contains("file a/b/f\n"),
        "{said}"
    );
    assert!(said.contains("dry run"), "{said}");
    let names: Vec<_> = fs::read_dir(&part)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["mine"], "a dry run changed DEST");
    let o = restore(&site, &["--at", &t1, "--path", "a/b"], &part);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(fs::read(part.join("a/b/f")).unwrap(), b"one");
    assert_eq!(fs::read(part.join("mine")).unwrap(), b"kept");
    assert!(!part.join("top").exists());

    // One file by the name it had then, found where a later rename put it (only the paths
    // asked for, the renames' targets and the ancestors are read on the backup host).
    let one = site.path("one");
    let o = restore(&site, &["--at", &t1, "--path", "r/x"], &one);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(fs::read(one.join("r/x")).unwrap(), b"renamed later");
    assert_eq!(tree_difference(&s1.join("r"), &one.join("r")), None);

    // Before the first change, after the history began: the empty module.
    let empty = site.path("empty");
    let o = restore(&site, &["--at", &t0], &empty);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);

    // Before the history began.
    let o = restore(&site, &["--at", "1 year ago"], &site.path("old"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not reach back"), "{}", stderr(&o));

    // A read-only module serves restores (and refuses the sender).
    let config = backup.dir.join("receiver.toml");
    let text = fs::read_to_string(&config).unwrap();
    backup.stop();
    fs::write(
        &config,
        text.replace("read_only = false", "read_only = true"),
    )
    .unwrap();
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

/// The hostile-server suite: a compromised backup host, holding the client's pinned
/// certificate, answers `ferry restore` with paths out of DEST (`..`, absolute, through a
/// symlink planted in DEST, through a symlink it made itself), a body longer than announced,
/// a digest that does not match, a device node, a setuid file, and deletions and a rename the
/// client did not ask for. Each is refused; nothing lands outside DEST, DEST's own files are
/// intact, no half-written file takes a name, and the restore exits 1 naming what failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_backup_host_cannot_write_outside_dest_or_remove_what_it_holds() {
    use ferry_protocol::message::{Body, Message};
    use ferry_protocol::meta::{Kind, Meta};
    use ferry_protocol::RelPath;

    let site = Site::new();
    let (src, dest, outside) = (site.dir("src"), site.dir("dest"), site.dir("outside"));
    fs::write(dest.join("keep.txt"), b"the operator's own").unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("planted")).unwrap();
    let (client, mut reader, mut writer) = impostor(&site, &src, &dest).await;
    let asked = reader.expect().await.unwrap();
    assert!(
        matches!(&asked, Message::Restore { delete: false, keeps, .. } if !keeps.devices && !keeps.setid),
        "the client asks without --delete, devices or setuid: {asked:?}"
    );

    // Each attack: its requests, then the final answer to its id.
    let mut next = 0u64;
    let mut answers: Vec<(String, Message)> = Vec::new();
    let digest = |d: &[u8]| *blake3::hash(d).as_bytes();
    let dev = Meta {
        kind: Kind::CharDevice,
        rdev: libc::makedev(1, 1),
        ..file_meta(0)
    };
    let outside_bytes = outside.as_os_str().as_encoded_bytes().to_vec();
    let attacks: Vec<(&str, Steps)> = vec![
        ("dot-dot", file("../escaped", b"out", digest(b"out"))),
        ("absolute", file("/tmp/escaped-abs", b"out", digest(b"out"))),
        ("planted symlink", file("planted/f", b"out", digest(b"out"))),
        (
            "own symlink",
            vec![Box::new(move |id| Message::Symlink {
                id,
                path: RelPath::from("made"),
                target: outside_bytes.clone(),
                meta: Meta {
                    kind: Kind::Symlink,
                    ..file_meta(0)
                },
            })],
        ),
        (
            "through own symlink",
            file("made/f", b"out", digest(b"out")),
        ),
        ("longer than announced", {
            let mut m = file("long", b"12345", digest(b"1234567890"));
            m.insert(
                2,
                Box::new(|id| Message::FileData {
                    id,
                    data: b"67890".to_vec(),
                }),
            );
            m
        }),
        ("lying digest", file("torn", b"hello", digest(b"HELLO"))),
        (
            "delete",
            vec![Box::new(|id| Message::Delete {
                id,
                path: RelPath::from("keep.txt"),
            })],
        ),
        (
            "rename",
            vec![Box::new(|id| Message::Rename {
                id,
                from: RelPath::from("keep.txt"),
                to: RelPath::from("gone"),
            })],
        ),
        (
            "device",
            vec![Box::new(move |id| Message::Special {
                id,
                path: RelPath::from("mem"),
                meta: dev.clone(),
            })],
        ),
        ("setuid", {
            let mut m = file("suid", b"#!/bin/sh\n", digest(b"#!/bin/sh\n"));
            m[0] = Box::new(|id| Message::FileBegin {
                id,
                path: RelPath::from("suid"),
                meta: Meta {
                    mode: 0o4755,
                    ..file_meta(10)
                },
                body: Body::Whole,
            });
            m
        }),
    ];
    for (name, steps) in &attacks {
        next += 1;
        for step in steps {
            writer.write(&step(next)).await.unwrap();
        }
        let answer = loop {
            let m = tokio::time::timeout(Duration::from_secs(30), reader.expect())
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer"))
                .unwrap_or_else(|e| panic!("{name}: the client went away: {e}"));
            if m.reply_id() == Some(next) && m.is_final_reply() {
                break m;
            }
        };
        answers.push((name.to_string(), answer));
    }
    writer.write(&Message::Bye).await.unwrap();
    while let Ok(Some(_)) = reader.read().await {}
    let out = client.wait_with_output().unwrap();

    let refused: Vec<&str> = answers
        .iter()
        .filter(|(_, m)| matches!(m, Message::Failed { .. }))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        refused,
        [
            "dot-dot",
            "absolute",
            "planted symlink",
            "through own symlink",
            "longer than announced",
            "lying digest",
            "delete",
            "rename",
            "device"
        ],
        "answers: {answers:?}"
    );
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside DEST"
    );
    assert!(!site.root().join("escaped").exists() && !Path::new("/tmp/escaped-abs").exists());
    assert_eq!(
        fs::read(dest.join("keep.txt")).unwrap(),
        b"the operator's own"
    );
    assert!(!dest.join("torn").exists() && !dest.join("long").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dest.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid kept without --setuid");
    let mut left: Vec<String> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["keep.txt", "made", "planted", "suid"],
        "nothing half-written left"
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).contains("9 not restored"), "{}", stdout(&out));
}

/// Messages of one request, each made for its id.
type Steps = Vec<Box<dyn Fn(u64) -> ferry_protocol::message::Message>>;

/// The steps of a whole-file transfer of `data` to `path`, ending with `digest`.
fn file(path: &'static str, data: &'static [u8], digest: [u8; 32]) -> Steps {
    use ferry_protocol::message::{Body, Message};
    vec![
        Box::new(move |id| Message::FileBegin {
            id,
            path: ferry_protocol::RelPath::from(path),
            meta: file_meta(data.len() as u64),
            body: Body::Whole,
        }),
        Box::new(move |id| Message::FileData {
            id,
            data: data.to_vec(),
        }),
        Box::new(move |id| Message::FileEnd { id, digest }),
    ]
}

/// What an impostor reads from the client, and where it writes.
type ImpostorReader =
    FrameReader<tokio::io::ReadHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>;
type ImpostorWriter =
    FrameWriter<tokio::io::WriteHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>;

/// Starts `ferry restore` of the site's group `file` (source `src`) into `dest` against an
/// impostor holding the certificate the client pins; returns the client and the impostor's
/// ends once it has welcomed the session (the client's `Restore` not yet read).
async fn impostor(
    site: &Site,
    src: &Path,
    dest: &Path,
) -> (std::process::Child, ImpostorReader, ImpostorWriter) {
    let evil = site.path("evil");
    let pin = keygen(&evil);
    let identity =
        ferry_protocol::identity::Identity::load(&evil.join("cert.pem"), &evil.join("key.pem"))
            .unwrap();
    let tls = ferry_protocol::tls::server_config(identity.certs.clone(), identity.key.clone_key())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    site.write_config(&format!(
        "[targets.backup]\naddress = \"127.0.0.1:{port}\"\nfingerprint = {pin:?}\n{}",
        sync("file", src, &["backup"], "file", "")
    ));
    let client = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["restore", "--config"])
        .arg(site.config())
        .args(["--group", "file"])
        .arg(dest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the client connects")
        .unwrap();
    let stream = tokio_rustls::TlsAcceptor::from(tls)
        .accept(tcp)
        .await
        .unwrap();
    let (r, w) = tokio::io::split(stream);
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    server_hello(&mut reader).await.unwrap().unwrap();
    let keeps = Keeps {
        owners: true,
        devices: true,
        setid: true,
        xattrs: Default::default(),
        history: true,
    };
    server_answer(&mut writer, Ok(keeps)).await.unwrap();
    (client, reader, writer)
}

/// The stand-in backup host sends `data` as the whole file `path`, request `id`, in one
/// `File` message with its true digest.
async fn send_whole(writer: &mut ImpostorWriter, id: u64, path: &str, data: Vec<u8>) {
    writer
        .write(&ferry_protocol::message::Message::File {
            id,
            path: ferry_protocol::RelPath::from(path),
            meta: file_meta(data.len() as u64),
            digest: *blake3::hash(&data).as_bytes(),
            data,
        })
        .await
        .unwrap();
}

/// Ctrl-C (SIGINT) in the middle of a restore: the client stops taking what the backup host
/// sends, names what it had, says it was interrupted (exit 2), and leaves DEST holding only
/// whole files. The backup host here is a stand-in that sends one file and then waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_stops_cleanly_and_says_so() {
    use ferry_protocol::message::Message;
    let site = Site::new();
    let (src, dest) = (site.dir("src"), site.path("dest"));
    let (client, mut reader, mut writer) = impostor(&site, &src, &dest).await;
    assert_eq!(reader.expect().await.unwrap().name(), "Restore");
    send_whole(
        &mut writer,
        1,
        "first",
        b"whole before the interrupt".to_vec(),
    )
    .await;
    // Its acknowledgement: the file is durable under its name, and the client is mid-restore.
    loop {
        match reader.expect().await.unwrap() {
            Message::Ack { id: 1 } => break,
            Message::Alive => {}
            other => panic!("expected the file's Ack, got {other:?}"),
        }
    }
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(client.id() as i32, libc::SIGINT) }, 0);
    let o = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert!(stdout(&o).contains(": 1 files ("), "{}", stdout(&o));
    assert_eq!(
        fs::read(dest.join("first")).unwrap(),
        b"whole before the interrupt"
    );
    drop((reader, writer));
}

/// A restore that stops because DEST's filesystem is full says so, even when the backup host
/// has meanwhile answered the client's going with a refusal of its own (which arrives right
/// behind the file here): the client's reason is the news, not the backup host's. And it
/// stops at once, not when a backup host that has nothing more to send falls silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dest_is_the_reason_given_whatever_the_backup_host_says_after() {
    use ferry_protocol::message::Message;
    let site = Site::new();
    let (src, dest) = (site.dir("src"), site.path("dest"));
    let _small = Mount::tmpfs(&dest, "64k");
    let (client, mut reader, mut writer) = impostor(&site, &src, &dest).await;
    assert_eq!(reader.expect().await.unwrap().name(), "Restore");
    send_whole(&mut writer, 1, "too-big", pseudo_random(1 << 20, 7)).await;
    writer
        .write(&Message::Refused {
            reason: "the client went away".into(),
        })
        .await
        .unwrap();
    // The stand-in sends nothing more and keeps the connection: the client ends on its own,
    // not when the backup host falls silent for the stall limit.
    let limit = ferry_protocol::connection::STALL_TIMEOUT / 3;
    let o = tokio::time::timeout(
        limit,
        tokio::task::spawn_blocking(move || client.wait_with_output()),
    )
    .await
    .expect("the client waited for the backup host after it had stopped")
    .unwrap()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("the restore stopped"), "{err}");
    assert!(!err.contains("the client went away"), "{err}");
    assert!(!dest.join("too-big").exists());
    drop((reader, writer));
}
