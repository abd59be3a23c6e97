//! A GlusterFS volume for tests and benches: Debian's `glusterfs-server` on this machine, one
//! brick in a temporary directory, mounted through FUSE (installed by `.ci/run`). Needs root.
//! Self-contained, so a bench can include it by path.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A started one-brick volume, mounted; stopped, deleted and unmounted when dropped.
pub struct Volume {
    glusterd: Option<Child>,
    name: String,
    source: String,
    pub mount: PathBuf,
    /// More mounts of the volume (as a second gateway host would have its own).
    more: Vec<PathBuf>,
    /// One volume at a time: the tests of this file share one glusterd, which the first
    /// starts and ends.
    _one: std::sync::MutexGuard<'static, ()>,
}

static ONE_VOLUME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gluster(args: &[&str]) -> std::process::Output {
    Command::new("gluster")
        .arg("--mode=script")
        .args(args)
        .output()
        .expect("gluster: this test needs Debian's glusterfs-server (installed by .ci/run)")
}

impl Volume {
    /// Starts glusterd (unless one answers), creates and starts a one-brick volume in `dir`,
    /// mounts it at `dir/mnt`.
    pub fn start(dir: &Path) -> Volume {
        // A test that failed holding it poisoned it; its volume was still cleaned up.
        let one = ONE_VOLUME.lock().unwrap_or_else(|e| e.into_inner());
        let answers = || gluster(&["volume", "list"]).status.success();
        // A glusterd already running (a service) serves the test as well as its own would.
        let glusterd = (!answers()).then(|| {
            Command::new("glusterd")
                .arg("--no-daemon")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("glusterd: this test needs Debian's glusterfs-server")
        });
        let mut volume = Volume {
            glusterd,
            name: format!("ferrytest{}", std::process::id()),
            source: String::new(),
            mount: dir.join("mnt"),
            more: Vec::new(),
            _one: one,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers() {
            assert!(Instant::now() < deadline, "glusterd did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Bricks are named by host; the loopback address is refused, the host's name is not.
        let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
        let brick = dir.join("brick");
        fs::create_dir_all(&brick).unwrap();
        let brick = format!("{}:{}", host.trim(), brick.display());
        for args in [
            vec!["volume", "create", &volume.name, &brick, "force"],
            vec!["volume", "start", &volume.name],
        ] {
            let o = gluster(&args);
            assert!(
                o.status.success(),
                "gluster {args:?}: {}{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
        volume.source = format!("{}:/{}", host.trim(), volume.name);
        let mount = volume.mount.clone();
        volume.mount_at(&mount);
        volume
    }

    /// Mounts the volume at `at`.
    pub fn mount_at(&self, at: &Path) {
        fs::create_dir_all(at).unwrap();
        let o = Command::new("mount")
            .args(["-t", "glusterfs", &self.source])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            o.status.success(),
            "mount {}: {}",
            self.source,
            text(&o.stderr)
        );
        let fuse = fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.contains(at.to_str().unwrap()) && l.contains("fuse"));
        assert!(fuse, "{} is not a FUSE mount", at.display());
    }

    /// Mounts the volume a second time at `at` (its own FUSE client), unmounted on drop.
    pub fn mount_again(&mut self, at: &Path) {
        self.mount_at(at);
        self.more.push(at.to_path_buf());
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        for mount in self.more.iter().chain([&self.mount]) {
            let unmounted = Command::new("umount").arg(mount).status();
            if !unmounted.is_ok_and(|s| s.success()) {
                // Something still holds it (a failed assertion left a process): detach it.
                let _ = Command::new("umount").arg("-l").arg(mount).status();
            }
        }
        let _ = gluster(&["volume", "stop", &self.name, "force"]);
        let _ = gluster(&["volume", "delete", &self.name]);
        if let Some(mut glusterd) = self.glusterd.take() {
            let _ = glusterd.kill();
            let _ = glusterd.wait();
        }
    }
}
