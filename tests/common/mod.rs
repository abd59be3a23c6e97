//! Shared helpers for end-to-end tests: real `ferry` binaries, real TLS, temp dirs,
//! 127.0.0.1 only.
#![allow(dead_code, unused_imports)]

pub mod attrs;
pub mod gluster;
pub mod guard;
pub mod journal;
pub mod live;
pub mod pair;
pub mod proc;
pub mod proxy;
pub mod site;
pub mod trees;

pub use attrs::*;
pub use proc::{Daemon, Proc, Receiver};
pub use site::{backup_log, fill_tree, one_group, sync, Backup, ModuleOpts, Setup, Site};
pub use trees::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The module key that keeps no share of the filesystem free for history. Test directories
/// sit on the host's filesystem, whose free space is not the test's to know (a CI machine's
/// may be 90% full); the space guard is tested on a tmpfs of known size.
pub const ANY_FREE_SPACE: &str = "min_free_percent = 0\n";

/// The default retention, on any free space ([`ANY_FREE_SPACE`]).
pub fn keep_on_any_free_space() -> ferry_receiver::history::Keep {
    ferry_receiver::history::Keep {
        min_free_percent: 0,
        ..Default::default()
    }
}

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env(
        "FERRY_LOG",
        std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
    );
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run ferry")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ferry keygen DIR`; returns the printed fingerprint after checking its shape.
pub fn keygen(dir: &Path) -> String {
    let o = run(ferry().arg("keygen").arg(dir));
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
    let fp = stdout(&o).trim().to_string();
    assert!(
        fp.starts_with("sha256:") && fp.len() == 71,
        "bad fingerprint {fp:?}"
    );
    fp
}

/// A port on 127.0.0.1 that was free a moment ago (for daemons that must restart on it).
/// A port nothing listens on now, for a daemon to listen on next. It is chosen outside the
/// kernel's ephemeral range (`ip_local_port_range`), so no outgoing connection of a test
/// running beside is handed it between now and the daemon's `bind` (with a port the kernel
/// picked, that happened: "Address already in use" on a loaded machine).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut n = t.split_whitespace().map(|w| w.parse::<u32>().ok());
            Some((n.next()??, n.next()??))
        })
        .unwrap_or((32768, 60999));
    // Above glusterd's 24007 and 24008, which the GlusterFS tests start.
    let (from, to) = if low >= 26_000 {
        (25_000, low)
    } else {
        (high + 1, 65_536)
    };
    let span = to - from;
    // Test binaries run one after another, tests of one binary side by side: start where
    // this process's id puts it, and go on from there.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let i = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (from + i) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

pub fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The metadata of a plain 0644 file of `size` bytes, for hand-built protocol messages.
pub fn file_meta(size: u64) -> ferry_protocol::meta::Meta {
    ferry_protocol::meta::Meta {
        kind: ferry_protocol::meta::Kind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        rdev: 0,
        xattrs: Default::default(),
    }
}

/// A whole file in one message, as a sender sends a small one (`meta` may lie).
pub fn whole_file(
    id: u64,
    path: &ferry_protocol::RelPath,
    meta: ferry_protocol::meta::Meta,
    data: Vec<u8>,
    digest: [u8; 32],
) -> ferry_protocol::message::Message {
    ferry_protocol::message::Message::File {
        id,
        path: path.clone(),
        meta,
        data,
        digest,
    }
}

/// Sends `data` as the whole file `path` over `session` and waits for its `Ack`.
pub async fn push_whole(
    session: &ferry_sender::session::Session,
    path: &str,
    data: &[u8],
) -> Result<(), ferry_sender::session::SessionError> {
    use ferry_protocol::message::{Body, Message};
    let (id, mut rx) = session.register();
    let msgs = [
        Message::FileBegin {
            id,
            path: ferry_protocol::RelPath::from(path),
            meta: file_meta(data.len() as u64),
            body: Body::Whole,
        },
        Message::FileData {
            id,
            data: data.to_vec(),
        },
        Message::FileEnd {
            id,
            digest: *blake3::hash(data).as_bytes(),
        },
    ];
    for m in msgs {
        session.send(m).await?;
    }
    session
        .expect_ack(&mut rx, &ferry_protocol::RelPath::from(path))
        .await
}

/// Begins the file `path` (announced as 10 bytes) as request `id` and sends only its first
/// 5: a transfer left half-way.
pub async fn begin_half(
    session: &ferry_sender::session::Session,
    id: ferry_protocol::message::RequestId,
    path: &str,
) {
    use ferry_protocol::message::{Body, Message};
    for m in [
        Message::FileBegin {
            id,
            path: ferry_protocol::RelPath::from(path),
            meta: file_meta(10),
            body: Body::Whole,
        },
        Message::FileData {
            id,
            data: b"12345".to_vec(),
        },
    ] {
        session.send(m).await.unwrap();
    }
}

/// A live scenario run once per watcher backend: `fn NAME(watcher) { … }` becomes the tests
/// `NAME::inotify` and `NAME::fanotify`, each with `watcher` naming its backend.
#[macro_export]
macro_rules! on_each_watcher {
    ($(#[$meta:meta])* fn $name:ident($w:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn inotify() {
                let $w: &str = "inotify";
                $body
            }
            #[test]
            fn fanotify() {
                let $w: &str = "fanotify";
                $body
            }
        }
    };
}

/// A filesystem mounted for the length of a test (root only; a failure says so, loudly).
pub struct Mount(pub PathBuf);

impl Mount {
    fn run(at: &Path, args: &[&str], what: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let o = run(Command::new("mount").args(args).arg(at));
        assert!(
            o.status.success(),
            "this test mounts {what} and needs root (CAP_SYS_ADMIN): {}",
            stderr(&o)
        );
        Mount(at.to_path_buf())
    }

    /// A tmpfs of `size` at `at`.
    pub fn tmpfs(at: &Path, size: &str) -> Mount {
        Mount::run(
            at,
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            "a tmpfs",
        )
    }

    /// A ramfs at `at`: a filesystem that holds no extended attributes at all.
    pub fn ramfs(at: &Path) -> Mount {
        Mount::run(at, &["-t", "ramfs", "ramfs"], "a ramfs")
    }

    /// A fresh XFS of `size` (reflinks on, as mkfs.xfs makes it), on a loop device over the
    /// sparse file `image`, mounted at `at`. Needs mkfs.xfs (Debian's xfsprogs).
    pub fn xfs(image: &Path, at: &Path, size: &str) -> Mount {
        let o = run(Command::new("truncate").args(["-s", size]).arg(image));
        assert!(o.status.success(), "truncate: {}", stderr(&o));
        let mkfs = Command::new("mkfs.xfs")
            .args(["-q", "-f"])
            .arg(image)
            .output();
        match mkfs {
            Ok(o) => assert!(o.status.success(), "mkfs.xfs: {}", stderr(&o)),
            Err(e) => panic!("this test makes an XFS filesystem: mkfs.xfs ({e}); install xfsprogs"),
        }
        Mount::run(at, &["-o", "loop", image.to_str().unwrap()], "an XFS image")
    }

    /// `from` bind-mounted at `at`.
    pub fn bind(from: &Path, at: &Path) -> Mount {
        Mount::run(at, &["--bind", from.to_str().unwrap()], "a bind mount")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
