//! Beyond `rsync -a`: file capabilities, ACLs, extended attributes (user, trusted, security),
//! hard links and holes, live and with `send --once`, each checked on the receiver with the
//! system's tools (`getfattr`, `getfacl`, `getcap`, inode numbers, allocated blocks), and
//! `verify`'s kinds for them. Needs root (trusted.* and security.* attributes, setcap).

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};

const SPARSE: &[&str] = &["vm.img"];

/// A receiver whose module keeps setuid bits and so file capabilities.
fn backup_keeping_capabilities(site: &Site) -> (PathBuf, PathBuf, Backup) {
    let (src, dst) = (site.dir("src"), site.path("dst"));
    let backup = Backup::start_with(
        site.root(),
        "recv",
        &[("file", &dst)],
        &site.fingerprint,
        "setuid = true",
    );
    (src, dst, backup)
}

fn files_received(site: &Site) -> u64 {
    summary_value(&site.stats(), "files")
}

fn verify_lines(out: &str) -> Vec<String> {
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The receiver really holds what the source holds, checked by the system's tools, and not
/// vacuously (the source has each thing to hold).
fn assert_rich_copy(src: &Path, dst: &Path) {
    if let Some(d) = attrs_difference(src, dst, RICH_PATHS, SPARSE) {
        panic!("{d}");
    }
    assert!(caps_of(&dst.join("bin/tool")).contains("cap_net_bind_service"));
    assert!(xattrs_of(&dst.join("labelled")).contains("security.selinux="));
    assert!(xattrs_of(&dst.join("labelled")).contains("trusted.origin="));
    assert!(xattrs_of(&dst.join("notes.txt")).contains("user.comment="));
    assert!(acl_of(&dst.join("shared")).contains("default:user:1234:rwx"));
    assert!(acl_of(&dst.join("shared/doc")).contains("group:3456:rw-"));
    assert!(!acl_of(&dst.join("shared/plain")).contains("user:1234"));
    assert_eq!(
        inode_groups(dst),
        vec![vec![
            "other/c".to_string(),
            "store/a".into(),
            "store/b".into()
        ]]
    );
}

on_each_watcher! {
    /// Everything arrives live; a name of a hard-linked file rewritten in place updates every
    /// name; a new name arrives as a link; attribute changes travel as metadata.
    fn capabilities_acls_xattrs_and_hard_links_arrive_live(watcher) {
        let live = Site::watching(watcher);
        let (src, dst, backup) = backup_keeping_capabilities(&live);
        let mut daemon = live.run(&one_group(&backup, &src, ""), 1);
        rich_tree(&src);
        wait_equal(&src, &dst, 30, "rich tree, live");
        wait_attrs_equal(&src, &dst, RICH_PATHS, SPARSE, 30, "attributes, live");
        assert_rich_copy(&src, &dst);

        // One of three names rewritten in place: all three change, still one file.
        fs::write(src.join("store/b"), pseudo_random(300_000, 9)).unwrap();
        wait_equal(&src, &dst, 30, "a hard-linked file rewritten");
        wait_attrs_equal(&src, &dst, RICH_PATHS, SPARSE, 30, "links after a rewrite");

        // A new name for it: a link on the receiver, no content sent.
        let files = files_received(&live);
        fs::hard_link(src.join("store/a"), src.join("fourth")).unwrap();
        wait_equal(&src, &dst, 30, "a new name");
        wait_attrs_equal(&src, &dst, &["fourth"], &[], 30, "a new name is a link");
        assert_eq!(inode_groups(&dst)[0].len(), 4);
        // A snapshot of a directory as `cp -al` makes it (rsnapshot, package caches): a new
        // directory compared as a subtree, whose files are other names of files outside it.
        let o = std::process::Command::new("cp")
            .arg("-al")
            .arg(src.join("store"))
            .arg(src.join("snap"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        wait_equal(&src, &dst, 30, "a hard-linked snapshot");
        wait_attrs_equal(&src, &dst, &["snap/a", "snap/b"], &[], 30, "the snapshot is links");
        assert_eq!(inode_groups(&dst)[0].len(), 6);

        // Attribute changes only: a user xattr changed, an ACL entry added, the capability
        // taken away; none of them resends content.
        let notes = src.join("notes.txt");
        let notes = notes.to_str().unwrap();
        tool(&["setfattr", "-n", "user.comment", "-v", "changed", notes]);
        tool(&["setfacl", "-m", "u:4321:r", notes]);
        tool(&["setcap", "-r", src.join("bin/tool").to_str().unwrap()]);
        tool(&["setfacl", "-m", "u:4321:rx", src.join("shared").to_str().unwrap()]);
        wait_attrs_equal(&src, &dst, RICH_PATHS, SPARSE, 30, "attribute changes");
        assert!(caps_of(&dst.join("bin/tool")).trim().is_empty());
        assert!(acl_of(&dst.join("notes.txt")).contains("user:4321:r--"));
        assert!(acl_of(&dst.join("shared")).contains("user:4321:r-x"));
        assert_eq!(files_received(&live), files, "links and attributes sent no content");
        assert!(daemon.stop().success());
    }
}

/// `send --once` carries everything, the three names once; `verify` names each kind of
/// difference the receiver's copy can have; the next `send --once` repairs them without
/// sending content.
#[test]
fn send_once_keeps_all_of_it_and_verify_names_each_kind() {
    let site = Site::new();
    let (src, dst, backup) = backup_keeping_capabilities(&site);
    let held = rich_tree(&src);
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let payload = summary_value(&stdout(&o), "payload_bytes");
    assert!(
        payload <= held + 4096,
        "{payload} payload bytes for {held} bytes of content: the linked file went more than once"
    );
    assert_trees_equal(&src, &dst);
    assert_rich_copy(&src, &dst);
    site.assert_verified();

    // Each kind broken on the receiver by hand.
    let d = |n: &str| dst.join(n).to_str().unwrap().to_string();
    tool(&["setfacl", "-k", &d("shared")]);
    tool(&["setfattr", "-x", "user.comment", &d("notes.txt")]);
    tool(&["setcap", "-r", &d("bin/tool")]);
    let (b, store) = (dst.join("store/b"), dst.join("store"));
    let mtime =
        |p: &Path| filetime::FileTime::from_last_modification_time(&fs::metadata(p).unwrap());
    let (b_mtime, store_mtime) = (mtime(&b), mtime(&store));
    let content = fs::read(&b).unwrap();
    fs::remove_file(&b).unwrap();
    fs::write(&b, content).unwrap();
    filetime::set_file_mtime(&b, b_mtime).unwrap();
    filetime::set_file_mtime(&store, store_mtime).unwrap();
    let expected = vec![
        "acl shared".to_string(),
        "hardlink store/b".into(),
        "xattr bin/tool".into(),
        "xattr notes.txt".into(),
    ];
    let o = site.verify();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(verify_lines(&stdout(&o)), expected);
    let o = run(ferry().arg("verify").arg(&src).arg(&dst));
    assert_eq!(verify_lines(&stdout(&o)), expected, "local verify");

    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(summary_value(&stdout(&o), "payload_bytes"), 0);
    assert_rich_copy(&src, &dst);
    site.assert_verified();
}

/// File capabilities are privilege like a setuid bit: a module without `setuid = true`
/// keeps neither, and says so instead of resending them for ever.
#[test]
fn capabilities_follow_the_modules_setuid_policy() {
    let site = Site::new();
    let (src, dst, backup) = site.one_backup();
    rich_tree(&src);
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not keep capability attributes"),
        "{}",
        stderr(&o)
    );
    assert!(caps_of(&dst.join("bin/tool")).trim().is_empty());
    assert!(xattrs_of(&dst.join("labelled")).contains("security.selinux="));
    // Nothing left to do: the capability is not compared where it is not kept.
    site.assert_nothing_to_send();
}

/// A module on a filesystem that holds no attributes (ramfs) is found out when it opens: the
/// receiver says so once, the sender is told and says which entries lose what, the files land,
/// and nothing is sent again for ever.
#[test]
fn a_module_that_cannot_hold_attributes_says_so_and_still_takes_the_files() {
    let site = Site::new();
    let _ram = Mount::ramfs(&site.path("dst"));
    let (src, dst, backup) = backup_keeping_capabilities(&site);
    rich_tree(&src);
    site.write_config(&one_group(&backup, &src, ""));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "the module does not keep user, trusted, security, capability, acl attributes"
        ),
        "{}",
        stderr(&o)
    );
    assert!(backup
        .receiver
        .as_ref()
        .unwrap()
        .log()
        .contains("cannot hold user"));
    assert_trees_equal(&src, &dst);
    assert_eq!(inode_groups(&dst).len(), 1, "hard links need no attributes");
    site.assert_nothing_to_send();
}

/// A directory of the module on another filesystem that cannot hold attributes: its files
/// land, and the receiver says so once per path however often they are sent.
#[test]
fn attributes_a_filesystem_below_the_module_cannot_hold_are_said_once_per_path() {
    let site = Site::new();
    let (src, dst, backup) = backup_keeping_capabilities(&site);
    let _ram = Mount::ramfs(&dst.join("ram"));
    fs::create_dir(src.join("ram")).unwrap();
    fs::write(src.join("ram/f"), b"x").unwrap();
    tool(&[
        "setfattr",
        "-n",
        "user.k",
        "-v",
        "v",
        src.join("ram/f").to_str().unwrap(),
    ]);
    site.write_config(&one_group(&backup, &src, ""));
    for _ in 0..2 {
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(fs::read(dst.join("ram/f")).unwrap(), b"x");
    let log = backup.receiver.as_ref().unwrap().log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("extended attributes not kept"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("ram/f"), "{}", said[0]);
}
