//! What lies beyond `rsync -a`, read with the system's own tools (`getfattr`, `getfacl`,
//! `getcap`, `stat`), never with ferry's code: a tree that uses all of it, and comparisons.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a tool of the system; a missing tool is a loud failure naming its package.
pub fn tool(args: &[&str]) -> String {
    let package = match args[0] {
        "getfattr" | "setfattr" => "attr",
        "getfacl" | "setfacl" => "acl",
        "getcap" | "setcap" => "libcap2-bin",
        _ => "?",
    };
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (install the {package} package)", args[0]));
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every extended attribute of `path` (all namespaces, ACLs and capabilities included), as
/// `getfattr` dumps them, not following a symlink.
pub fn xattrs_of(path: &Path) -> String {
    let out = tool(&[
        "getfattr",
        "-h",
        "-d",
        "-m",
        "-",
        "-e",
        "hex",
        "--absolute-names",
        s(path),
    ]);
    out.lines()
        .filter(|l| !l.starts_with("# file:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The access and default ACL of `path`, numeric, as `getfacl` shows them.
pub fn acl_of(path: &Path) -> String {
    tool(&["getfacl", "-p", "-n", "--omit-header", s(path)])
}

/// The file capabilities of `path` as `getcap` shows them (empty: none).
pub fn caps_of(path: &Path) -> String {
    tool(&["getcap", s(path)]).replace(s(path), "")
}

/// Groups of two or more names below `root` that are one file (one inode), sorted.
pub fn inode_groups(root: &Path) -> Vec<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<u64, Vec<String>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                walk(root, &e.path(), out);
            } else if md.is_file() && md.nlink() > 1 {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.entry(md.ino()).or_default().push(rel);
            }
        }
    }
    let mut by_inode = Default::default();
    walk(root, root, &mut by_inode);
    let mut groups: Vec<Vec<String>> = by_inode
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

/// The paths of [`rich_tree`] whose attributes are compared.
pub const RICH_PATHS: &[&str] = &[
    "",
    "bin/tool",
    "notes.txt",
    "labelled",
    "shared",
    "shared/doc",
    "shared/plain",
    "store/a",
    "store/b",
    "other/c",
    "link",
];

/// Builds what the guides' trees hold beyond `rsync -a` below `root` (as root): a binary with
/// `cap_net_bind_service+ep`, a `user.` xattr, an SELinux-style `security.` label and a
/// `trusted.` attribute, a directory with a default and an access ACL, a file with an ACL
/// inside it and one whose inherited ACL was removed, three names for one file, a symlink with a label, and a sparse file with a
/// hole in the middle and one at the end (`vm.img`, 64 MiB holding 2 MiB). Returns the bytes
/// of content the tree holds once (each file counted once, holes not at all).
pub fn rich_tree(root: &Path) -> u64 {
    let p = |n: &str| root.join(n);
    for d in ["bin", "shared", "store", "other"] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    std::fs::write(p("bin/tool"), super::pseudo_random(40_000, 1)).unwrap();
    super::set_mode(&p("bin/tool"), 0o755);
    tool(&["setcap", "cap_net_bind_service+ep", s(&p("bin/tool"))]);
    std::fs::write(p("notes.txt"), b"notes\n").unwrap();
    tool(&[
        "setfattr",
        "-n",
        "user.comment",
        "-v",
        "hello",
        s(&p("notes.txt")),
    ]);
    std::fs::write(p("labelled"), b"served\n").unwrap();
    let label = "system_u:object_r:httpd_sys_content_t:s0";
    tool(&[
        "setfattr",
        "-n",
        "security.selinux",
        "-v",
        label,
        s(&p("labelled")),
    ]);
    tool(&[
        "setfattr",
        "-n",
        "trusted.origin",
        "-v",
        "guide",
        s(&p("labelled")),
    ]);
    tool(&["setfacl", "-m", "u:1234:rwx,g:2345:rx", s(&p("shared"))]);
    tool(&["setfacl", "-d", "-m", "u:1234:rwx", s(&p("shared"))]);
    std::fs::write(p("shared/doc"), b"shared document\n").unwrap();
    tool(&["setfacl", "-m", "g:3456:rw", s(&p("shared/doc"))]);
    // Created under the default ACL, then stripped of it: the receiver's copy, which inherits
    // the default too, must lose it as well.
    std::fs::write(p("shared/plain"), b"plain\n").unwrap();
    tool(&["setfacl", "-b", s(&p("shared/plain"))]);
    let linked = super::pseudo_random(300_000, 2);
    std::fs::write(p("store/a"), &linked).unwrap();
    std::fs::hard_link(p("store/a"), p("store/b")).unwrap();
    std::fs::hard_link(p("store/a"), p("other/c")).unwrap();
    std::os::unix::fs::symlink("notes.txt", p("link")).unwrap();
    tool(&[
        "setfattr",
        "-h",
        "-n",
        "security.selinux",
        "-v",
        label,
        s(&p("link")),
    ]);
    let data = super::pseudo_random(1 << 20, 3);
    let held = super::write_sparse(&p("vm.img"), 64 << 20, &data, &[0, 30 << 20]);
    40_000 + 6 + 7 + 16 + 6 + 300_000 + held
}

/// The first way in which `b` differs from `a` beyond `rsync -a` (attributes, ACLs and
/// capabilities of `paths`, which names are one file, holes of `sparse`), if any.
pub fn attrs_difference(a: &Path, b: &Path, paths: &[&str], sparse: &[&str]) -> Option<String> {
    for rel in paths {
        let (pa, pb) = (a.join(rel), b.join(rel));
        if !pb.exists() && std::fs::symlink_metadata(&pb).is_err() {
            return Some(format!("{rel:?} missing"));
        }
        let (xa, xb) = (xattrs_of(&pa), xattrs_of(&pb));
        if xa != xb {
            return Some(format!("getfattr {rel:?}: {xa:?} vs {xb:?}"));
        }
        if !std::fs::symlink_metadata(&pa).unwrap().is_symlink() {
            let (aa, ab) = (acl_of(&pa), acl_of(&pb));
            if aa != ab {
                return Some(format!("getfacl {rel:?}: {aa:?} vs {ab:?}"));
            }
            let (ca, cb) = (caps_of(&pa), caps_of(&pb));
            if ca != cb {
                return Some(format!("getcap {rel:?}: {ca:?} vs {cb:?}"));
            }
        }
    }
    let (ga, gb) = (inode_groups(a), inode_groups(b));
    if ga != gb {
        return Some(format!("inode groups {ga:?} vs {gb:?}"));
    }
    for rel in sparse {
        let (sa, sb) = (
            super::allocated(&a.join(rel)),
            super::allocated(&b.join(rel)),
        );
        if sb > sa + (1 << 20) {
            return Some(format!("{rel:?}: {sb} bytes allocated, {sa} on the source"));
        }
    }
    None
}

/// Waits until [`attrs_difference`] finds nothing; panics with the last difference.
pub fn wait_attrs_equal(
    a: &Path,
    b: &Path,
    paths: &[&str],
    sparse: &[&str],
    secs: u64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let d = std::panic::catch_unwind(|| attrs_difference(a, b, paths, sparse))
            .unwrap_or_else(|_| Some("changed during comparison".into()));
        match d {
            None => return,
            Some(d) if Instant::now() > deadline => {
                panic!("{what}: not converged after {secs}s: {d}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
