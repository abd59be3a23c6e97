//! `ferry send` (the daemon, or one reconcile with `--once`) and `ferry stats`.

use anyhow::{Context, Result};
use ferry_protocol::message::Intent;
use ferry_sender::config::TargetKind;
use ferry_sender::daemon::{Daemon, Observer};
use ferry_sender::execute::Report;
use ferry_sender::reconcile;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// `ferry send --config FILE [--once]`.
pub async fn send(config: &Path, once: bool, confirm_deletes: &[String]) -> Result<u8> {
    let mut config = ferry_sender::Config::load(config)?;
    for name in confirm_deletes {
        let Some(group) = config.syncs.iter_mut().find(|g| &g.name == name) else {
            anyhow::bail!("--confirm-deletes {name}: no sync group of that name");
        };
        group.guard.confirmed = true;
        tracing::warn!(sync = %name, "deletions confirmed past the mass-delete guard for this run");
    }
    if once {
        return send_once(&config).await;
    }
    let identity = config.identity()?;
    let groups = config.syncs.len();
    let pairs = config.syncs.iter().map(|g| g.targets.len()).sum();
    let daemon = Daemon {
        identity: Arc::new(identity),
        targets: config.targets,
        syncs: config.syncs,
        liveness: Default::default(),
    };
    crate::service::watchdog(daemon.liveness.clone());
    let observer = Arc::new(ServiceObserver {
        groups,
        pairs,
        reconciled: Mutex::new(BTreeSet::new()),
    });
    daemon.run(crate::shutdown_on_signals(), observer).await?;
    Ok(0)
}

/// Logs, and tells systemd when the daemon is ready and when every target first converged.
struct ServiceObserver {
    groups: usize,
    /// (group, target) pairs.
    pairs: usize,
    reconciled: Mutex<BTreeSet<(String, String)>>,
}

impl Observer for ServiceObserver {
    fn ready(&self) {
        crate::service::ready(&format!(
            "watching {} sync groups; initial reconcile running",
            self.groups
        ));
    }

    fn reconciled(&self, group: &str, target: &str, report: &Report) {
        if !report.converged() {
            return;
        }
        let mut done = self.reconciled.lock().expect("lock");
        if done.insert((group.to_string(), target.to_string())) {
            crate::service::status(&if done.len() == self.pairs {
                "every target reconciled; following changes".to_string()
            } else {
                format!("{} of {} targets reconciled", done.len(), self.pairs)
            });
        }
    }
}

/// One line of figures per (group, target), failures on stderr.
pub fn print_report(group: &str, target: &str, r: &Report) {
    println!(
        "sync={group} target={target} files={} delta_files={} created={} meta={} deleted={} renamed={} vanished={} payload_bytes={} bytes_sent={} failures={} elapsed_ms={}",
        r.files,
        r.delta_files,
        r.created,
        r.meta,
        r.deleted,
        r.renamed,
        r.vanished,
        r.payload_bytes,
        r.bytes_sent,
        r.failures.len(),
        r.elapsed.as_millis()
    );
    for (path, why) in &r.failures {
        eprintln!("ferry: {group} → {target}: {path}: {why}");
    }
}

async fn send_once(config: &ferry_sender::Config) -> Result<u8> {
    let identity = config.identity()?;
    let mut converged = true;
    for group in &config.syncs {
        for target_name in &group.targets {
            let target = &config.targets[target_name];
            if let TargetKind::Rsync(r) = &target.kind {
                let started = std::time::Instant::now();
                let verdict = ferry_sender::rsync::full(group, r, &target.address).await;
                let ok = verdict == ferry_sender::rsync::Verdict::Done;
                println!(
                    "sync={} target={target_name} rsync={} elapsed_ms={}",
                    group.name,
                    if ok { "ok" } else { "failed" },
                    started.elapsed().as_millis()
                );
                if !ok {
                    eprintln!("ferry: {} → {target_name}: {verdict}", group.name);
                }
                converged &= ok;
                continue;
            }
            let result = async {
                let session = Arc::new(
                    target
                        .connect(&identity, &group.module, Intent::Write)
                        .await?,
                );
                let report = reconcile::reconcile(&session, group).await?;
                if let Ok(s) = Arc::try_unwrap(session) {
                    s.close().await;
                }
                Ok::<_, ferry_sender::session::SessionError>(report)
            }
            .await;
            match result {
                Ok(report) => {
                    print_report(&group.name, target_name, &report);
                    converged &= report.converged();
                }
                Err(e) => {
                    eprintln!("ferry: {} → {target_name}: {e}", group.name);
                    converged = false;
                }
            }
        }
    }
    Ok(if converged { 0 } else { 1 })
}

/// `ferry stats --config FILE`: each ferry target's receiver counters.
pub async fn stats(config: &Path) -> Result<u8> {
    let config = ferry_sender::Config::load(config)?;
    let identity = config.identity()?;
    for (name, target) in &config.targets {
        let Some(group) = config.syncs.iter().find(|g| g.targets.contains(name)) else {
            continue;
        };
        if target.fingerprint().is_none() {
            println!("target={name} kind=rsync");
            continue;
        }
        let session = target
            .connect(&identity, &group.module, Intent::Read)
            .await
            .with_context(|| format!("target {name}"))?;
        let counters = session.stats().await?;
        let line: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("target={name} {}", line.join(" "));
        session.close().await;
    }
    Ok(0)
}
