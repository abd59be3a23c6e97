//! `ferry mirror SRC DST`: a receiver on 127.0.0.1 and a live sender in one process, no
//! configuration. Progress on stderr, one line per change on stdout.

use crate::progress::{count, PlanProgress, Progress};
use anyhow::{bail, Context, Result};
use ferry_protocol::message::Intent;
use ferry_sender::config::{SyncGroup, Target, TargetKind};
use ferry_sender::daemon::{Daemon, Observer};
use ferry_sender::execute::{Report, Step, StepKind, Totals};
use ferry_sender::reconcile;
use ferry_sender::watch::Backend;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `ferry mirror SRC DST [--once]`.
pub async fn mirror(src: &Path, dst: &Path, once: bool, confirm_deletes: bool) -> Result<u8> {
    let src = src
        .canonicalize()
        .with_context(|| format!("{}", src.display()))?;
    if !src.is_dir() {
        bail!("{}: not a directory", src.display());
    }
    // Refuse before creating anything.
    let dst = resolve_missing(dst)?;
    if dst.starts_with(&src) || src.starts_with(&dst) {
        bail!(
            "{} and {} overlap; mirror needs two separate trees",
            src.display(),
            dst.display()
        );
    }
    std::fs::create_dir_all(&dst).with_context(|| format!("{}", dst.display()))?;
    let recv = ferry_receiver::Loopback::start("mirror", dst.clone()).await?;
    let address = recv.address.clone();
    let mut group = SyncGroup::new("mirror", src.clone(), vec!["local".into()], "mirror");
    group.guard.confirmed = confirm_deletes;
    group.guard.release = Some(format!(
        "ferry mirror --confirm-deletes {} {}",
        src.display(),
        dst.display()
    ));
    errln!(
        "ferry: mirroring {} → {} via {address}",
        src.display(),
        dst.display()
    );
    let target = Target {
        name: "local".into(),
        address,
        more_addresses: Vec::new(),
        kind: TargetKind::Ferry {
            fingerprint: recv.pin,
            compress: false,
            bwlimit_kib: None,
        },
    };
    let code = if once {
        let session = Arc::new(
            target
                .connect(&recv.client, "mirror", Intent::Write)
                .await?,
        );
        let mut watch = PlanProgress::new("initial sync");
        let (root, links) = (ferry_protocol::RelPath::root(), Default::default());
        let report = reconcile::reconcile_under(
            &session,
            &group,
            &links,
            &root,
            Default::default(),
            &mut watch,
        )
        .await?;
        drop(watch);
        session.close().await;
        crate::send::print_report("mirror", "local", &report);
        if report.converged() {
            0
        } else {
            1
        }
    } else {
        let (watcher, why) =
            Backend::choose(Default::default(), &[src.as_path()]).map_err(anyhow::Error::msg)?;
        tracing::info!("watching {} with {why}", src.display());
        let targets = [("local".to_string(), target)].into();
        let identity = Arc::new(recv.client.clone());
        let daemon = Daemon::new(identity, targets, vec![group], watcher);
        let observer = Arc::new(MirrorObserver {
            src: src.clone(),
            progress: Mutex::new(None),
            synced: AtomicBool::new(false),
        });
        daemon
            .run(crate::shutdown_on_signals(), observer.clone())
            .await?;
        if observer.synced.load(Ordering::Relaxed) {
            errln!("ferry: stopped");
            0
        } else {
            errln!(
                "ferry: stopped before the initial sync finished; {} is incomplete",
                dst.display()
            );
            1
        }
    };
    recv.stop().await;
    Ok(code)
}

/// Shows `mirror`'s initial sync as progress on stderr, then one line per change on stdout.
struct MirrorObserver {
    src: PathBuf,
    /// The initial sync's progress, while it runs.
    progress: Mutex<Option<Progress>>,
    /// The initial sync finished.
    synced: AtomicBool,
}

impl Observer for MirrorObserver {
    fn planned(&self, _group: &str, _target: &str, totals: Totals) {
        let mut progress = self.progress.lock().expect("progress lock");
        progress
            .get_or_insert_with(|| Progress::start("initial sync"))
            .total(count(totals));
    }

    fn whole(&self, _group: &str, _target: &str, whole: bool) {
        if let Some(p) = &*self.progress.lock().expect("progress lock") {
            p.growing(!whole);
        }
    }

    fn progress(&self, _group: &str, _target: &str, done: Totals) {
        if let Some(p) = &*self.progress.lock().expect("progress lock") {
            p.update(count(done));
        }
    }

    fn reconciled(&self, group: &str, target: &str, report: &Report) {
        self.synced.store(true, Ordering::Relaxed);
        self.progress.lock().expect("progress lock").take();
        crate::send::print_report(group, target, report);
        errln!(
            "ferry: initial sync done; watching {} (Ctrl-C to stop)",
            self.src.display()
        );
    }

    fn step(&self, _group: &str, _target: &str, step: &Step, latency: Option<Duration>) {
        use std::io::Write;
        let latency = latency.map_or(String::new(), |l| {
            format!(" ({:.1} ms)", l.as_secs_f64() * 1e3)
        });
        let line = match &step.kind {
            StepKind::File => format!("sent {} {} B{latency}", step.path, step.bytes),
            StepKind::Delta => format!("delta {} {} B{latency}", step.path, step.bytes),
            StepKind::Created => format!("created {}{latency}", step.path),
            StepKind::Meta => format!("meta {}{latency}", step.path),
            StepKind::Deleted => format!("deleted {}{latency}", step.path),
            StepKind::Renamed(to) => format!("renamed {} -> {to}{latency}", step.path),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// `path` made absolute with symlinks resolved, where parts of it may not exist yet: the
/// deepest existing ancestor is canonicalized and the rest appended.
fn resolve_missing(path: &Path) -> Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut out = real;
                out.extend(rest.iter().rev());
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e).with_context(|| format!("{}", path.display()));
                };
                rest.push(name.to_os_string());
                existing = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        }
    }
}
