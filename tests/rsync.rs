//! Compatibility mode end to end: the live sender driving the real `rsync` client against a
//! real rsyncd started here on 127.0.0.1.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "Ki13W@yYZvbJ";

/// Trees equal as far as a stock rsync makes them (see `tree_difference_with`).
fn wait_equal(a: &Path, b: &Path, secs: u64, what: &str) {
    wait_equal_with(a, b, secs, what, false)
}

/// A stock rsyncd serving modules (with `auth users = rsync`), as in the old guide.
struct Rsyncd {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Rsyncd {
    fn start(dir: &Path, modules: &[(&str, &Path)]) -> Rsyncd {
        let version = Command::new("rsync").arg("--version").output();
        assert!(
            version.is_ok_and(|o| o.status.success()),
            "rsync is not installed: .ci/run installs it (apt-get install -y rsync)"
        );
        fs::create_dir_all(dir).unwrap();
        let secrets = dir.join("rsync.pass");
        fs::write(&secrets, format!("rsync:{PASSWORD}\n")).unwrap();
        set_mode(&secrets, 0o600);
        let root = unsafe { libc::geteuid() } == 0;
        // Like the guide, but without chroot (so the test needs no root for it) and therefore
        // with symlink munging switched off explicitly.
        let mut conf = String::from("use chroot = no\nmunge symlinks = no\npid file =\n");
        if root {
            conf.push_str("uid = root\ngid = root\n");
        }
        for (name, path) in modules {
            fs::create_dir_all(path).unwrap();
            conf.push_str(&format!(
                "[{name}]\npath = {}\nread only = no\nauth users = rsync\nsecrets file = {}\n\
                 hosts allow = 127.0.0.1\nmax connections = 10\n",
                path.display(),
                secrets.display()
            ));
        }
        fs::write(dir.join("rsyncd.conf"), conf).unwrap();
        let mut d = Rsyncd {
            dir: dir.to_path_buf(),
            port: free_port(),
            child: None,
        };
        d.restart();
        d
    }

    fn restart(&mut self) {
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!(
                "--config={}",
                self.dir.join("rsyncd.conf").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg("--address=127.0.0.1")
            .arg(format!(
                "--log-file={}",
                self.dir.join("rsyncd.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rsync --daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "rsyncd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// `[targets.NAME]` of kind rsync, with a password file holding `password`.
    fn target(&self, name: &str, password: &str) -> String {
        let pf = self.dir.join(format!("{name}.pas"));
        fs::write(&pf, format!("{password}\n")).unwrap();
        set_mode(&pf, 0o600);
        format!(
            "[targets.{name}]\nkind = \"rsync\"\naddress = \"127.0.0.1:{}\"\nuser = \"rsync\"\n\
             password_file = {:?}\ntimeout_s = 10\n",
            self.port,
            pf.display().to_string()
        )
    }
}

impl Drop for Rsyncd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn initial_sync_then_the_guide_walkthrough_live() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(src.join("existing/deep")).unwrap();
    fs::write(src.join("existing/deep/f"), "before start").unwrap();
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    let body = format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "")
    );
    let mut daemon = site.run(&body, 1);
    wait_equal(&src, &dst, 20, "initial rsync -a");
    type Step = fn(&Path);
    let steps: Vec<(&str, Step)> = vec![
        ("mkdir test", |s| fs::create_dir(s.join("test")).unwrap()),
        ("echo a > a", |s| fs::write(s.join("a"), "a\n").unwrap()),
        ("ln -s a a.link", |s| {
            symlink("a", s.join("a.link")).unwrap()
        }),
        ("chmod a+w a", |s| set_mode(&s.join("a"), 0o666)),
        ("mkdir -p x/y/z && write", |s| {
            fs::create_dir_all(s.join("x/y/z")).unwrap();
            fs::write(s.join("x/y/z/f"), "deep").unwrap();
        }),
        ("mv x moved", |s| {
            fs::rename(s.join("x"), s.join("moved")).unwrap()
        }),
        ("rm -f a", |s| fs::remove_file(s.join("a")).unwrap()),
        ("rm -f a.link", |s| {
            fs::remove_file(s.join("a.link")).unwrap()
        }),
        ("rm -rf test existing", |s| {
            fs::remove_dir_all(s.join("test")).unwrap();
            fs::remove_dir_all(s.join("existing")).unwrap();
        }),
    ];
    for (what, step) in steps {
        step(&src);
        if std::panic::catch_unwind(|| wait_equal(&src, &dst, 20, what)).is_err() {
            panic!("{what}: not converged; sender log:\n{}", daemon.log());
        }
    }
    // The status counts what rsync did (it said `0 B, 0 deleted` after all of the above):
    // files sent, entries deleted, bytes.
    site.wait_settled(30);
    let (_, v) = site.status();
    let t = &v["targets"][0];
    assert!(t["files"].as_u64().unwrap() >= 3, "{v}");
    assert!(t["deleted"].as_u64().unwrap() >= 5, "{v}");
    assert!(t["bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn excludes_and_no_delete() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::write(src.join("tmp/x"), "no").unwrap();
    fs::write(src.join("keep"), "yes").unwrap();
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    fs::write(dst.join("only-on-backup"), "stays").unwrap();
    let body = format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync(
            "file",
            &src,
            &["legacy"],
            "file",
            "exclude = [\"tmp/\", \"*.log\"]\ndelete = false"
        )
    );
    let _d = site.run(&body, 1);
    fs::write(src.join("app.log"), "no").unwrap();
    fs::write(src.join("tmp/y"), "no").unwrap();
    fs::write(src.join("new"), "yes").unwrap();
    fs::remove_file(src.join("keep")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dst.join("new").exists() {
        assert!(Instant::now() < deadline, "new file did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The removal and the excluded files came before "new": once the sender owes nothing,
    // it has dealt with them.
    site.wait_settled(20);
    assert!(
        dst.join("only-on-backup").exists(),
        "delete = false must not delete"
    );
    assert!(
        dst.join("keep").exists(),
        "delete = false keeps removed files"
    );
    assert!(!dst.join("tmp").exists() && !dst.join("app.log").exists());
}

#[test]
fn wrong_password_stops_that_target_and_the_other_continues() {
    let site = Site::new();
    let (src, good, bad) = (site.path("src"), site.path("good"), site.path("bad"));
    fs::create_dir_all(&src).unwrap();
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("good", &good), ("bad", &bad)]);
    let body = format!(
        "{}{}{}{}",
        rsyncd.target("right", PASSWORD),
        rsyncd.target("wrong", "not-the-password"),
        sync("good", &src, &["right"], "good", ""),
        sync("bad", &src, &["wrong"], "bad", "")
    );
    site.write_config(&body);
    let d = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    d.wait_log_n("target stopped", 1, 30);
    let log = d.log();
    assert!(
        log.contains("auth failed") && log.contains("wrong"),
        "{log}"
    );
    fs::write(src.join("after"), "still syncing").unwrap();
    wait_equal(&src, &good, 20, "the good target");
    assert!(!bad.join("after").exists());
}

#[test]
fn rsyncd_stopped_and_restarted_loses_nothing() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(&src).unwrap();
    let mut rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    let body = format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "")
    );
    let daemon = site.run(&body, 1);
    fs::write(src.join("before"), "1").unwrap();
    wait_equal(&src, &dst, 20, "before the stop");
    rsyncd.stop();
    fs::write(src.join("during"), "2").unwrap();
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("d/e/f"), "3").unwrap();
    fs::remove_file(src.join("before")).unwrap();
    daemon.wait_log_n("failed, will retry: rsync exit", 1, 30);
    rsyncd.restart();
    wait_equal(&src, &dst, 40, "after rsyncd came back");
}

#[test]
fn missing_rsync_binary_and_open_password_file_are_clear_errors() {
    let site = Site::new();
    let src = site.path("src");
    fs::create_dir_all(&src).unwrap();
    let pf = site.path("rsync.pas");
    fs::write(&pf, "pw\n").unwrap();
    set_mode(&pf, 0o600);
    let target = |extra: &str| {
        format!(
            "[targets.legacy]\nkind = \"rsync\"\naddress = \"127.0.0.1\"\nuser = \"rsync\"\n\
             password_file = {:?}\n{extra}\n{}",
            pf.display().to_string(),
            sync("file", &src, &["legacy"], "file", "")
        )
    };
    site.write_config(&target("rsync_path = \"/nonexistent/rsync\""));
    let o = run(ferry().arg("send").arg("--config").arg(site.config()));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/rsync") && stderr(&o).contains("apt-get install rsync"),
        "{}",
        stderr(&o)
    );
    set_mode(&pf, 0o644);
    site.write_config(&target(""));
    let o = run(ferry().arg("send").arg("--config").arg(site.config()));
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("targets.legacy.password_file") && e.contains("0644") && e.contains("rsync.pas"),
        "{e}"
    );
}

#[test]
fn imported_rsyncd_conf_runs_as_a_receiver() {
    let site = Site::new();
    let (src, data) = (site.path("src"), site.path("data"));
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/f"), "imported").unwrap();
    for m in ["file", "code"] {
        fs::create_dir_all(data.join(m)).unwrap();
    }
    // The guide's rsyncd.conf, with this test's paths and address.
    let conf = site.path("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "uid = root\ngid = root\nmax connections = 200\nport = 873\n\
             secrets file = /etc/rsync.pass\nignore errors = yes\nreverse lookup = no\n\n\
             [file]\npath = {0}/file\ncomment = file\nread only = no\nlist = no\n\
             auth users = rsync\nhosts allow = 127.0.0.1,10.255.50.64\n\n\
             [code]\npath = {0}/code\ncomment = file\nread only = no\nlist = no\n\
             auth users = rsync\nhosts allow = 127.0.0.*\n",
            data.display()
        ),
    )
    .unwrap();
    let sender_fp = stdout(&run(ferry()
        .arg("fingerprint")
        .arg(site.path("send/cert.pem"))))
    .trim()
    .to_string();
    let recv = site.path("recv");
    let receiver_fp = keygen(&recv);
    let port = free_port();
    let o = run(ferry()
        .args(["import", "rsyncd"])
        .arg(&conf)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--client")
        .arg(&sender_fp)
        .arg("-o")
        .arg(recv.join("receiver.toml")));
    assert!(o.status.success(), "{}", stderr(&o));
    let _receiver = Receiver::start(&recv.join("receiver.toml"));
    site.write_config(&format!(
        "[targets.backup]\naddress = \"127.0.0.1:{port}\"\nfingerprint = {receiver_fp:?}\n{}",
        sync("code", &src, &["backup"], "code", "")
    ));
    let o = run(ferry()
        .arg("send")
        .arg("--config")
        .arg(site.config())
        .arg("--once"));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_trees_equal(&src, &data.join("code"));
}

#[test]
fn imported_inotify_scripts_run_against_the_rsyncd() {
    let site = Site::new();
    let (file_src, code_src) = (site.path("file"), site.path("code"));
    let (file_dst, code_dst) = (site.path("backup/file"), site.path("backup/code"));
    fs::create_dir_all(file_src.join("tmp")).unwrap();
    fs::create_dir_all(&code_src).unwrap();
    let rsyncd = Rsyncd::start(
        &site.path("rsyncd"),
        &[("file", &file_dst), ("code", &code_dst)],
    );
    let pas = site.path("rsync.pas");
    fs::write(&pas, format!("{PASSWORD}\n")).unwrap();
    set_mode(&pas, 0o600);
    let inotify = site.path("inotify.sh");
    fs::write(
        &inotify,
        format!(
            "#!/bin/bash\n# 定义一个关联数组\ndeclare -A rsync_module_name=([file]='{}' [code]='{}')\n\
             declare -A exclude_file_rule=([file]='tmp|.log')\nsersync_dir=/usr/local/sersync/sersync.sh\n\
             lockfile_dir=/tmp/inotify-lock\n",
            file_src.display(),
            code_src.display()
        ),
    )
    .unwrap();
    let sersync = site.path("sersync.sh");
    fs::write(
        &sersync,
        format!(
            "#!/bin/bash\nrsync_passwd_file={}\ndes_ip=(127.0.0.1)\nuser=rsync\n",
            pas.display()
        ),
    )
    .unwrap();
    let o = run(ferry()
        .args(["import", "scripts"])
        .arg(&inotify)
        .arg(&sersync)
        .arg("--port")
        .arg(rsyncd.port.to_string())
        .arg("-o")
        .arg(site.config()));
    assert!(o.status.success(), "{}", stderr(&o));
    let d = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    d.wait_log_n("reconciled", 2, 60);
    fs::write(file_src.join("report.txt"), "r").unwrap();
    fs::write(file_src.join("app.log"), "excluded").unwrap();
    fs::write(file_src.join("tmp/x"), "excluded").unwrap();
    fs::create_dir_all(code_src.join("src")).unwrap();
    fs::write(code_src.join("src/main.rs"), "fn main() {}").unwrap();
    wait_equal(&code_src, &code_dst, 30, "code module");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file_dst.join("report.txt").exists() {
        assert!(Instant::now() < deadline, "file module: {}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!file_dst.join("app.log").exists() && !file_dst.join("tmp").exists());
}

#[test]
fn imported_file_watch_conf_runs_over_a_remote_shell() {
    let site = Site::new();
    let src = site.path("lib/docker");
    fs::create_dir_all(src.join("containers")).unwrap();
    fs::write(src.join("containers/c1"), "c1").unwrap();
    let dest_dir = site.path("backup-lib");
    fs::create_dir_all(&dest_dir).unwrap();
    // A stand-in for ssh that runs the remote command here: rsync's remote-shell protocol
    // without an sshd.
    let rsh = site.path("fake-ssh");
    fs::write(
        &rsh,
        "#!/bin/sh\nwhile [ \"$1\" = -l ]; do shift 2; done\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    set_mode(&rsh, 0o755);
    let conf = site.path("file_watch.conf");
    fs::write(
        &conf,
        format!(
            "# 目标端(备份服务器)主机IP\nDEST_HOST = 127.0.0.1\n\n# 同步目录组总数\nSYNC_NUM = 1\n\n\
             SRC_DIR_1 = {}\nDEST_DIR_1 = {}\nUSER_1 = root\n",
            src.display(),
            dest_dir.display()
        ),
    )
    .unwrap();
    let o = run(ferry()
        .args(["import", "scripts"])
        .arg(&conf)
        .arg("--rsh")
        .arg(&rsh)
        .arg("-o")
        .arg(site.config()));
    assert!(o.status.success(), "{}", stderr(&o));
    let d = Daemon::spawn(ferry().arg("send").arg("--config").arg(site.config()));
    d.wait_log_n("reconciled", 1, 60);
    let dst = dest_dir.join("docker");
    fs::write(src.join("containers/c2"), "c2").unwrap();
    fs::remove_file(src.join("containers/c1")).unwrap();
    // rsync over a remote shell sets the destination directory's own times (unlike an
    // rsyncd module root), but the shared helper is the rsync one.
    if std::panic::catch_unwind(|| wait_equal(&src, &dst, 30, "remote shell")).is_err() {
        panic!("file_watch group not converged; sender log:\n{}", d.log());
    }
}

/// `verify --config` on an rsync target exited 0 having checked nothing.
#[test]
fn verify_config_on_an_rsync_target_checked_nothing() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/edited"), "same size").unwrap();
    fs::write(src.join("chmodded"), "x").unwrap();
    fs::write(src.join("gone"), "x").unwrap();
    fs::write(src.join("app.log"), "excluded").unwrap();
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    site.write_config(&format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "exclude = [\"*.log\"]")
    ));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let verify = |extra: &[&str]| {
        run(ferry()
            .arg("verify")
            .arg("--config")
            .arg(site.config())
            .args(extra))
    };
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("equal"), "{}", stderr(&o));
    // Damage the backup behind ferry's back.
    let mtime = fs::metadata(dst.join("d/edited"))
        .unwrap()
        .modified()
        .unwrap();
    fs::write(dst.join("d/edited"), "SAME SIZE").unwrap();
    fs::File::options()
        .write(true)
        .open(dst.join("d/edited"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    set_mode(&dst.join("chmodded"), 0o600);
    fs::remove_file(dst.join("gone")).unwrap();
    fs::write(dst.join("stray"), "x").unwrap();
    fs::write(dst.join("other.log"), "excluded on the receiver too").unwrap();
    let o = verify(&[]);
    assert_eq!(o.status.code(), Some(1));
    let lines: Vec<&str> = stdout(&o).leak().lines().collect();
    assert_eq!(lines, vec!["mode chmodded", "missing gone", "extra stray"]);
    // Same size and time: only --checksum reads the bytes.
    let o = verify(&["--checksum"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("content d/edited"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("--checksum"),
        "says how: {}",
        stderr(&o)
    );
    // A whole compare mends the rest; `--checksum` (rsync -c) the content too.
    let o = site.send_once(&["--checksum"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read(dst.join("d/edited")).unwrap(), b"same size");
    let o = verify(&["--checksum"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
}

/// An empty source (a disk that did not mount) made `rsync --delete` empty the module.
#[test]
fn an_empty_source_made_rsync_empty_the_module() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(&src).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("f{i}")), "x").unwrap();
    }
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    site.write_config(&format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "")
    ));
    let once = |extra: &[&str]| site.send_once(extra);
    assert!(once(&[]).status.success());
    for i in 0..20 {
        fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    let o = once(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("the source is empty but the module holds 20 entries"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 20);
    assert!(once(&["--confirm-deletes", "file"]).status.success());
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
}

/// Compatibility mode had no live mass-delete guard: a live `rm -rf` of 90% of a tree went
/// through to the rsyncd module in seconds. Now rsync deletes at most what the guard allows
/// (`--max-delete`), the rest is held and the target stops, as a ferry target's does.
#[test]
fn a_live_rm_rf_of_90_percent_is_held() {
    let site = Site::new();
    let (src, dst) = (site.dir("src"), site.path("dst"));
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    let body = format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "delete_guard_min = 500")
    );
    guard::live_rm_rf_of_90_percent_is_held(&site, &src, &dst, &body);
}

/// Compatibility mode keeps holes too (`--sparse`), and `preserve = []` writes them out.
#[test]
fn sparse_files_stay_sparse_through_rsync_unless_preserve_says_otherwise() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(&src).unwrap();
    let data = pseudo_random(1 << 20, 5);
    let held = write_sparse(&src.join("disk.img"), 64 << 20, &data, &[0, 40 << 20]);
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    for (preserve, sparse) in [("", true), ("preserve = []", false)] {
        let _ = fs::remove_file(dst.join("disk.img"));
        site.write_config(&format!(
            "{}{}",
            rsyncd.target("legacy", PASSWORD),
            sync("file", &src, &["legacy"], "file", preserve)
        ));
        let o = site.send_once(&[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            fs::read(src.join("disk.img")).unwrap(),
            fs::read(dst.join("disk.img")).unwrap()
        );
        let got = allocated(&dst.join("disk.img"));
        assert_eq!(
            got <= held + (1 << 20),
            sparse,
            "{preserve:?}: {got} bytes allocated"
        );
    }
}

/// Compatibility mode passes `-H -A -X` as the group preserves them: capabilities, ACLs,
/// every namespace of xattrs and the three names of one file arrive through a stock rsyncd.
#[test]
fn hard_links_acls_and_xattrs_travel_through_rsync() {
    let site = Site::new();
    let (src, dst) = (site.path("src"), site.path("dst"));
    fs::create_dir_all(&src).unwrap();
    rich_tree(&src);
    let rsyncd = Rsyncd::start(&site.path("rsyncd"), &[("file", &dst)]);
    site.write_config(&format!(
        "{}{}",
        rsyncd.target("legacy", PASSWORD),
        sync("file", &src, &["legacy"], "file", "")
    ));
    let o = site.send_once(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    if let Some(d) = attrs_difference(&src, &dst, RICH_PATHS, &["vm.img"]) {
        panic!("{d}");
    }
    assert_eq!(inode_groups(&dst).len(), 1);
    assert!(caps_of(&dst.join("bin/tool")).contains("cap_net_bind_service"));
    site.assert_verified();
    tool(&["setfacl", "-k", dst.join("shared").to_str().unwrap()]);
    tool(&[
        "setfattr",
        "-x",
        "user.comment",
        dst.join("notes.txt").to_str().unwrap(),
    ]);
    let o = site.verify();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "xattr notes.txt\nacl shared\n");
}
