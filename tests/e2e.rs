//! End-to-end: real binaries, real TLS on 127.0.0.1, temp dirs.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;

/// The walk-through from the old scripts' guide, pushed with `--once` after each step.
#[test]
fn guide_walkthrough_matches_after_every_step() {
    let s = Setup::new();
    let src = s.src.clone();
    type Step<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        (
            "mkdir test",
            Box::new(|| fs::create_dir(src.join("test")).unwrap()),
        ),
        (
            "echo a > a",
            Box::new(|| fs::write(src.join("a"), "a\n").unwrap()),
        ),
        (
            "ln -s a a.link",
            Box::new(|| symlink("a", src.join("a.link")).unwrap()),
        ),
        ("chmod a+w a", Box::new(|| set_mode(&src.join("a"), 0o666))),
        ("rm a", Box::new(|| fs::remove_file(src.join("a")).unwrap())),
        (
            "rm a.link",
            Box::new(|| fs::remove_file(src.join("a.link")).unwrap()),
        ),
        (
            "rm -rf test",
            Box::new(|| fs::remove_dir_all(src.join("test")).unwrap()),
        ),
    ];
    for (name, step) in steps {
        step();
        s.push();
        assert_trees_equal(&s.src, &s.dst);
        eprintln!("step ok: {name}");
    }
    assert_eq!(
        fs::read_dir(&s.dst).unwrap().count(),
        0,
        "nothing of ferry's is left in the module"
    );
}

#[test]
fn special_bits_nanosecond_times_types_and_nested_trees_round_trip() {
    let s = Setup::with(ModuleOpts {
        extra: "setuid = true\ndevices = true\n".into(),
        ..Default::default()
    });
    fs::create_dir_all(s.src.join("d/e/f")).unwrap();
    fs::write(s.src.join("d/e/f/setuid"), "x").unwrap();
    set_mode(&s.src.join("d/e/f/setuid"), 0o4755);
    set_mode(&s.src.join("d/e"), 0o3775);
    fs::write(s.src.join("empty"), "").unwrap();
    symlink("/nonexistent/target", s.src.join("dangling")).unwrap();
    let fifo = std::ffi::CString::new(s.src.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    filetime::set_file_mtime(
        s.src.join("empty"),
        filetime::FileTime::from_unix_time(1_234_567_890, 123_456_789),
    )
    .unwrap();
    s.push();
    assert_trees_equal(&s.src, &s.dst);
    // Retype: file -> directory, directory -> symlink.
    fs::remove_file(s.src.join("empty")).unwrap();
    fs::create_dir(s.src.join("empty")).unwrap();
    fs::remove_dir_all(s.src.join("d")).unwrap();
    symlink("empty", s.src.join("d")).unwrap();
    s.push();
    assert_trees_equal(&s.src, &s.dst);
}

#[test]
fn delta_sends_far_less_than_the_file() {
    let s = Setup::new();
    let size = 32 << 20;
    let mut data = pseudo_random(size, 7);
    fs::write(s.src.join("big"), &data).unwrap();
    let first = s.push();
    assert!(summary_value(&first, "bytes_sent") >= size as u64);
    // Change 1 MiB in the middle.
    let mid = size / 2;
    data[mid..mid + (1 << 20)].copy_from_slice(&pseudo_random(1 << 20, 8));
    fs::write(s.src.join("big"), &data).unwrap();
    let second = s.push();
    let sent = summary_value(&second, "bytes_sent");
    eprintln!("delta: file {size} bytes, 1 MiB changed, {sent} bytes sent");
    assert_eq!(summary_value(&second, "delta_files"), 1, "{second}");
    assert!(
        sent < 2 * (1 << 20),
        "sent {sent} bytes for a 1 MiB change: {second}"
    );
    assert_trees_equal(&s.src, &s.dst);
}

/// The receiver's counters `listed` (entries sent in listings) and `summarised` (directories
/// summarised) so far.
fn compared(s: &Setup) -> (u64, u64) {
    let o = run(ferry().arg("stats").arg("--config").arg(s.sender_config()));
    assert!(o.status.success(), "stats: {}", stderr(&o));
    let out = stdout(&o);
    (
        summary_value(&out, "listed"),
        summary_value(&out, "summarised"),
    )
}

/// A second push of an unchanged tree sends nothing and lists nothing: the two roots'
/// summaries are equal.
#[test]
fn second_push_of_an_unchanged_tree_sends_nothing() {
    let s = Setup::new();
    for i in 0..50 {
        fs::write(s.src.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    s.push();
    let (listed, summarised) = compared(&s);
    let again = s.push();
    assert_eq!(summary_value(&again, "files"), 0, "{again}");
    assert_eq!(summary_value(&again, "meta"), 0, "{again}");
    assert_eq!(
        compared(&s),
        (listed, summarised + 1),
        "one summary, no listing"
    );
}

/// A copy into an empty module goes a piece at a time: a directory whose entries span two
/// pieces still gets its own times, and a name in a later piece of a file sent in an earlier
/// one arrives as a link to it, not as a second copy.
#[test]
fn a_copy_into_an_empty_module_in_pieces_keeps_directory_times_and_links() {
    let s = Setup::new();
    // The root, a, a's files, b, then b's files: the first piece ends among b's files, and
    // b/z (a name of a/f0) comes last.
    let per = ferry_sender::descend::PIECE * 6 / 10;
    for d in ["a", "b"] {
        fs::create_dir(s.src.join(d)).unwrap();
        for i in 0..per {
            fs::write(s.src.join(format!("{d}/f{i:05}")), format!("{d}{i}")).unwrap();
        }
    }
    fs::hard_link(s.src.join("a/f00000"), s.src.join("b/z")).unwrap();
    let out = s.push();
    assert_trees_equal(&s.src, &s.dst);
    assert_eq!(summary_value(&out, "files"), 2 * per as u64, "{out}");
    let ino = |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(s.dst.join(p)).unwrap());
    assert_eq!(ino("a/f00000"), ino("b/z"), "b/z is a link to a/f00000");
    let (listed, _) = compared(&s);
    assert_eq!(listed, 0, "nothing listed: the module was empty");
}

/// A whole compare descends only into directories whose summaries differ and lists only the
/// subtrees that are new, gone or retyped; every kind of change arrives, and the next
/// compare finds nothing.
#[test]
fn a_whole_compare_descends_only_where_the_trees_differ() {
    let s = Setup::new();
    let p = |rel: &str| s.src.join(rel);
    for d in 0..10 {
        for sub in 0..5 {
            let dir = p(&format!("d{d}/s{sub}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..10 {
                fs::write(dir.join(format!("f{f}")), format!("{d}{sub}{f}")).unwrap();
            }
        }
    }
    s.push();
    assert_trees_equal(&s.src, &s.dst);
    let before = compared(&s);

    fs::write(p("d3/s2/f5"), "a longer content").unwrap();
    fs::remove_file(p("d7/s1/f0")).unwrap();
    fs::create_dir(p("d5/new")).unwrap();
    for f in 0..3 {
        fs::write(p(&format!("d5/new/g{f}")), "new").unwrap();
    }
    fs::remove_dir_all(p("d8/s4")).unwrap();
    set_mode(&p("d1/s0"), 0o700);
    fs::remove_file(p("d2/s3/f1")).unwrap();
    fs::create_dir(p("d2/s3/f1")).unwrap();
    fs::write(p("d2/s3/f1/inside"), "x").unwrap();
    symlink("d0", p("top")).unwrap();
    let out = s.push();
    assert_trees_equal(&s.src, &s.dst);
    assert_eq!(summary_value(&out, "files"), 5, "{out}");
    let after = compared(&s);
    // The root, the six top directories changed below, and the three second-level ones
    // whose files changed (d1/s0 changed only its own mode: it is not descended into).
    assert_eq!(after.1 - before.1, 1 + 6 + 3, "directories summarised");
    // Listed: d8/s4 (gone, its 11 entries counted for the delete guard) and d2/s3/f1 (the
    // file that became a directory); d5/new is not on the receiver.
    assert_eq!(after.0 - before.0, 11 + 1, "entries listed");

    let again = s.push();
    assert_eq!(summary_value(&again, "files"), 0, "{again}");
    assert_eq!(summary_value(&again, "meta"), 0, "{again}");
    assert_eq!(compared(&s), (after.0, after.1 + 1));
}

#[test]
fn excludes_are_not_sent_and_not_deleted() {
    let s = Setup::new();
    s.write_sender_config("file", &["tmp/", "*.log"]);
    fs::create_dir_all(s.src.join("tmp")).unwrap();
    fs::write(s.src.join("tmp/x"), "x").unwrap();
    fs::write(s.src.join("a.log"), "x").unwrap();
    fs::write(s.src.join("keep"), "x").unwrap();
    fs::write(s.dst.join("remote.log"), "receiver's own").unwrap();
    s.push();
    assert!(s.dst.join("keep").exists());
    assert!(!s.dst.join("tmp").exists());
    assert!(!s.dst.join("a.log").exists());
    assert!(
        s.dst.join("remote.log").exists(),
        "excluded paths on the receiver are left alone"
    );
}

fn verify_local(a: &std::path::Path, b: &std::path::Path) -> (i32, String) {
    let o = run(ferry().arg("verify").arg(a).arg(b));
    (o.status.code().unwrap(), stdout(&o))
}

#[test]
fn verify_reports_each_difference_and_exits_1() {
    let s = Setup::new();
    fs::create_dir(s.src.join("dir")).unwrap();
    fs::write(s.src.join("dir/f"), "hello world").unwrap();
    fs::write(s.src.join("g"), "x").unwrap();
    s.push();
    assert_eq!(verify_local(&s.src, &s.dst), (0, String::new()));
    let remote = run(ferry().arg("verify").arg("--config").arg(s.sender_config()));
    assert_eq!(remote.status.code(), Some(0), "{}", stderr(&remote));

    // A flipped byte with size and mtime restored: only the content digest can tell.
    let f = s.dst.join("dir/f");
    let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(&f).unwrap());
    fs::write(&f, "hello worle").unwrap();
    filetime::set_file_mtime(&f, mtime).unwrap();
    assert_eq!(verify_local(&s.src, &s.dst), (1, "content dir/f\n".into()));
    let remote = run(ferry().arg("verify").arg("--config").arg(s.sender_config()));
    assert_eq!(
        (remote.status.code(), stdout(&remote)),
        (Some(1), "content dir/f\n".into())
    );
    // Size and mtime agree, so a quick-check push leaves it; put the bytes back by hand.
    fs::write(&f, "hello world").unwrap();
    filetime::set_file_mtime(&f, mtime).unwrap();

    set_mode(&s.dst.join("g"), 0o600);
    assert_eq!(verify_local(&s.src, &s.dst), (1, "mode g\n".into()));
    s.push();

    fs::write(s.dst.join("dir/extra"), "").unwrap();
    let (code, out) = verify_local(&s.src, &s.dst);
    assert_eq!(code, 1);
    assert!(out.contains("extra dir/extra"), "{out}");
    let (code, out) = verify_local(&s.dst, &s.src);
    assert_eq!(code, 1);
    assert!(out.contains("missing dir/extra"), "{out}");

    let o = run(ferry().arg("verify").arg(&s.src).arg(s.root().join("nope")));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn verify_uses_cached_digests_unless_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, cache) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("cache"),
    );
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    for root in [&a, &b] {
        fs::write(root.join("f"), "same").unwrap();
        filetime::set_file_mtime(
            root.join("f"),
            filetime::FileTime::from_unix_time(1_000_000, 0),
        )
        .unwrap();
    }
    for root in [&a, &b] {
        filetime::set_file_mtime(root, filetime::FileTime::from_unix_time(1_000_000, 0)).unwrap();
    }
    // Digests of files changed in the last two seconds are not cached; wait that out.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let verify = |extra: &[&str]| {
        // The per-tree figures are a debug line (a verify says nothing else at info).
        let o = run(ferry()
            .env("FERRY_LOG", "debug")
            .arg("verify")
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .arg(&a)
            .arg(&b));
        let hashed: u64 = stderr(&o)
            .lines()
            .filter(|l| l.contains("tree digested"))
            .map(|l| summary_value(l, "hashed"))
            .sum();
        (o.status.code().unwrap(), stdout(&o), hashed)
    };
    assert_eq!(
        verify(&[]),
        (0, String::new(), 2),
        "first run hashes both files"
    );
    assert_eq!(
        fs::read_dir(&cache).unwrap().count(),
        2,
        "one digest cache per tree"
    );
    assert_eq!(
        verify(&[]),
        (0, String::new(), 0),
        "second run reads no file"
    );
    assert_eq!(
        verify(&["--checksum"]),
        (0, String::new(), 2),
        "--checksum reads every file"
    );
    // Same size, same mtime, different bytes: the inode's ctime moved, so the cached digest
    // is not trusted.
    fs::write(b.join("f"), "sane").unwrap();
    filetime::set_file_mtime(
        b.join("f"),
        filetime::FileTime::from_unix_time(1_000_000, 0),
    )
    .unwrap();
    assert_eq!(verify(&[]), (1, "content f\n".to_string(), 1));
}

#[test]
fn keygen_and_fingerprint_agree() {
    let dir = tempfile::tempdir().unwrap();
    let fp = keygen(&dir.path().join("id"));
    let o = run(ferry()
        .arg("fingerprint")
        .arg(dir.path().join("id/cert.pem")));
    assert_eq!(stdout(&o).trim(), fp);
    let again = run(ferry().arg("keygen").arg(dir.path().join("id")));
    assert_eq!(
        again.status.code(),
        Some(2),
        "keygen must not overwrite a key"
    );
}

#[test]
fn config_errors_name_the_file_and_key_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sender.toml");
    fs::write(
        &cfg,
        "cert = \"c.pem\"\nkey = \"k.pem\"\n[targets.a]\naddress = \"127.0.0.1:1\"\n\
         fingerprint = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n\
         [[sync]]\nsource = \"/x\"\ntargets = [\"b\"]\nmodule = \"m\"\n",
    )
    .unwrap();
    let o = run(ferry().arg("send").arg("--config").arg(&cfg).arg("--once"));
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("sender.toml")
            && err.contains("targets")
            && err.contains("unknown target \"b\""),
        "{err}"
    );

    let rcfg = dir.path().join("receiver.toml");
    fs::write(
        &rcfg,
        "listen = \"127.0.0.1:0\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nbogus = 1\n",
    )
    .unwrap();
    let o = run(ferry().arg("receive").arg("--config").arg(&rcfg));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("receiver.toml") && stderr(&o).contains("bogus"),
        "{}",
        stderr(&o)
    );

    let o = run(ferry()
        .arg("send")
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("--once"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
}

#[test]
fn mirror_copies_a_tree_without_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/f"), "mirrored").unwrap();
    symlink("b/f", src.join("a/l")).unwrap();
    let o = run(ferry().arg("mirror").arg("--once").arg(&src).arg(&dst));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_trees_equal(&src, &dst);
}

#[test]
fn mirror_follows_changes_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(src.join("a/first"), "1").unwrap();
    let mut m = Daemon::spawn(ferry().arg("mirror").arg(&src).arg(&dst));
    m.wait_log_n("initial sync done", 1, 30);
    assert_trees_equal(&src, &dst);
    fs::create_dir_all(src.join("b/c")).unwrap();
    fs::write(src.join("b/c/second"), "2").unwrap();
    fs::remove_file(src.join("a/first")).unwrap();
    wait_equal(&src, &dst, 20, "live mirror");
    // One note per change on stdout.
    m.wait_log_n("sent b/c/second", 1, 5);
    m.wait_log_n("deleted a/first", 1, 5);
    unsafe { libc::kill(m.child.id() as i32, libc::SIGINT) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(st) = m.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mirror ignored SIGINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", m.log());
}

#[test]
fn local_verify_leaves_out_excluded_paths_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right) = (dir.path().join("l"), dir.path().join("r"));
    fs::create_dir_all(left.join("cache")).unwrap();
    fs::write(left.join("f"), "same").unwrap();
    fs::write(left.join("cache/x"), "only left").unwrap();
    let o = run(ferry().arg("mirror").arg("--once").arg(&left).arg(&right));
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(right.join("app.log"), "only right").unwrap();
    fs::remove_file(right.join("cache/x")).unwrap();
    for d in ["", "cache"] {
        let t =
            filetime::FileTime::from_last_modification_time(&fs::metadata(left.join(d)).unwrap());
        filetime::set_file_mtime(right.join(d), t).unwrap();
    }
    let verify = |excludes: &[&str]| {
        let mut c = ferry();
        c.arg("verify").arg(&left).arg(&right);
        for e in excludes {
            c.arg("--exclude").arg(e);
        }
        run(&mut c)
    };
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "extra app.log\nmissing cache/x\n");
    let o = verify(&["*.log", "cache/"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

/// A sender could create setuid files, device nodes (`1:1` mode 0666 is `/dev/mem`) and
/// foreign owners in a module of a root receiver. By default a module now drops setuid and
/// setgid bits and refuses device nodes; `owner` decides whose files they are.
#[test]
fn a_module_keeps_no_setuid_bits_or_devices_unless_it_says_so() {
    let root = unsafe { libc::geteuid() } == 0;
    let s = Setup::with(ModuleOpts {
        extra: "owner = \"4242:4343\"\n".into(),
        ..Default::default()
    });
    fs::write(s.src.join("suid"), "x").unwrap();
    set_mode(&s.src.join("suid"), 0o4755);
    if root {
        let dev = std::ffi::CString::new(s.src.join("mem").as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 1)) },
            0
        );
    }
    s.push();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(s.dst.join("suid")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o7777, 0o755, "setuid dropped");
    assert!(!s.dst.join("mem").exists(), "no device node");
    if root {
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(s.dst.join("suid")).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (4242, 4343),
            "owner as the module says"
        );
    }
    // Pushed again: nothing left to do (the stripped bits are not re-sent for ever).
    let again = s.push();
    assert_eq!(summary_value(&again, "meta"), 0, "{again}");
    assert_eq!(summary_value(&again, "files"), 0, "{again}");
}

/// `preserve = []` sends a sparse file's holes as the zeros they read as.
#[test]
fn preserve_without_sparse_writes_holes_out() {
    let site = Site::new();
    let (src, dst, backup) = site.one_backup();
    let data = pseudo_random(1 << 20, 8);
    write_sparse(&src.join("img"), 32 << 20, &data, &[8 << 20]);
    site.write_config(&one_group(&backup, &src, "preserve = []"));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read(src.join("img")).unwrap(),
        fs::read(dst.join("img")).unwrap()
    );
    assert!(
        allocated(&dst.join("img")) >= 32 << 20,
        "holes kept without \"sparse\""
    );
    assert_eq!(summary_value(&stdout(&o), "payload_bytes"), 32 << 20);
}
