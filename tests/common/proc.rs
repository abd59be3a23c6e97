//! The one child-process wrapper of the tests: a `ferry` process whose stdout and stderr lines
//! are collected, stopped with SIGTERM (and checked to stop) or killed on drop.

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `ferry` process with its output collected.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    /// Output streams read to their end (two once the process is gone and its output read).
    ended: Arc<AtomicUsize>,
}

/// A live sender (or any long-running command).
pub type Daemon = Proc;

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let log = Arc::new(Mutex::new(String::new()));
        let ended = Arc::new(AtomicUsize::new(0));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let (sink, ended) = (log.clone(), ended.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        Proc { child, log, ended }
    }

    /// Waits for the process to exit and for its output to be read to the end, so that
    /// [`Proc::log`] holds its last lines (at most 10 s for a descendant that holds the pipes).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        self.drained();
        status
    }

    fn drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ended.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (10 s at most) until the output contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until `needle` occurs at least `n` times in the output.
    pub fn wait_log_n(&self, needle: &str, n: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.log().matches(needle).count() < n {
            if Instant::now() > deadline {
                panic!("no {n}× {needle:?} after {secs}s; output:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then waits (at most 20 s) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.drained();
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferry did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `ferry receive` process and the address it listens on.
pub struct Receiver {
    pub proc: Proc,
    pub addr: String,
}

impl Receiver {
    /// Starts `ferry receive --config CONFIG` and waits for its `listen=` line.
    pub fn start(config: &Path) -> Receiver {
        let proc = Proc::spawn(super::ferry().arg("receive").arg("--config").arg(config));
        proc.wait_log_n("receiver listening", 1, 20);
        let log = proc.log();
        let at = log.find("listen=").expect("listen= in the start-up line") + 7;
        let addr = log[at..].split_whitespace().next().unwrap().to_string();
        Receiver { proc, addr }
    }
}

impl Deref for Receiver {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for Receiver {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}
