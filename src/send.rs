//! `ferry send` (the daemon, or one reconcile with `--once`) and `ferry stats`.

use anyhow::{Context, Result};
use ferry_protocol::message::Intent;
use ferry_sender::config::TargetKind;
use ferry_sender::daemon::{Daemon, Observer, Reload};
use ferry_sender::execute::Report;
use ferry_sender::reconcile;
use ferry_sender::status::Board;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `ferry send --config FILE [--once [--checksum]]`.
pub async fn send(
    file: &Path,
    once: bool,
    checksum: bool,
    confirm_deletes: &[String],
) -> Result<u8> {
    let config = load(file, confirm_deletes, true)?;
    if config.make_state_dir()? {
        let dir = config.state_dir.as_deref().unwrap_or(Path::new(""));
        tracing::info!("made state_dir {} (0700)", dir.display());
    }
    if once {
        return send_once(&config, checksum).await;
    }
    let identity = config.identity()?;
    let sources: Vec<&Path> = config.syncs.iter().map(|g| g.source.as_path()).collect();
    let (watcher, why) = ferry_sender::watch::Backend::choose(config.watcher, &sources)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    tracing::info!("watching sources with {why}");
    let status = Board::default();
    let (hup_tx, hups) = tokio::sync::mpsc::channel(1);
    let shutdown = crate::signals(Some(hup_tx));
    if let Some(address) = config.metrics_listen {
        let board = status.clone();
        let render = Arc::new(move || crate::metrics::sender(&board.snapshot()));
        crate::metrics::serve(address, render, shutdown.clone()).await?;
    }
    if let Err(e) = crate::status::serve(&config.status_socket, status.clone(), shutdown.clone()) {
        tracing::warn!(
            "{}; `ferry status` cannot ask this sender",
            crate::describe(&e)
        );
    }
    let groups = config.syncs.len();
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(reload_on_hup(
        file.to_path_buf(),
        confirm_deletes.to_vec(),
        config.clone(),
        hups,
        reload_tx,
    ));
    let daemon = Daemon {
        status: status.clone(),
        ..Daemon::new(Arc::new(identity), config.targets, config.syncs, watcher)
    };
    crate::service::watchdog(daemon.liveness.clone());
    let observer = Arc::new(ServiceObserver { groups, status });
    daemon.run_reloading(shutdown, observer, reloads).await?;
    tracing::info!("sender stopped");
    Ok(0)
}

/// Reads `file`, confirming deletions past the guard for `confirm_deletes` (this run only:
/// also on reloads, so a reload alone does not restart those groups without it).
fn load(file: &Path, confirm_deletes: &[String], announce: bool) -> Result<ferry_sender::Config> {
    let mut config = ferry_sender::Config::load(file)?;
    for name in confirm_deletes {
        let Some(group) = config.syncs.iter_mut().find(|g| &g.name == name) else {
            anyhow::bail!("--confirm-deletes {name}: no sync group of that name");
        };
        group.guard.confirmed = true;
        if announce {
            tracing::warn!(sync = %name, "deletions confirmed past the mass-delete guard for this run");
        }
    }
    Ok(config)
}

/// On each SIGHUP: re-reads the configuration and hands it to the daemon, or says why not
/// (the daemon keeps running the previous one); tells systemd the reload began and ended.
async fn reload_on_hup(
    file: PathBuf,
    confirm_deletes: Vec<String>,
    first: ferry_sender::Config,
    mut hups: tokio::sync::mpsc::Receiver<()>,
    daemon: tokio::sync::mpsc::Sender<Reload>,
) {
    while hups.recv().await.is_some() {
        crate::service::reloading();
        tracing::info!("SIGHUP: reloading {}", file.display());
        let parsed = load(&file, &confirm_deletes, false).and_then(|c| {
            let identity = c.identity()?;
            Ok((c, identity))
        });
        let (config, identity) = match parsed {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(
                    "reload refused: {}; still running the previous configuration",
                    crate::describe(&e)
                );
                crate::service::ready("last reload refused; running the previous configuration");
                continue;
            }
        };
        if config.status_socket != first.status_socket
            || config.metrics_listen != first.metrics_listen
        {
            tracing::warn!("status_socket and metrics_listen take effect at the next restart");
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reload = Reload {
            identity: Arc::new(identity),
            targets: config.targets,
            syncs: config.syncs,
            done: Some(tx),
        };
        if daemon.send(reload).await.is_err() {
            return;
        }
        match rx.await {
            Ok(Ok(summary)) => crate::service::ready(&format!("reloaded: {summary}")),
            Ok(Err(_)) => {
                crate::service::ready("last reload refused; running the previous configuration")
            }
            Err(_) => return,
        }
    }
}

/// Tells systemd when the daemon is ready and when every target has converged once.
struct ServiceObserver {
    groups: usize,
    status: Board,
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
        // This pair's own tracker learns of it just after this call.
        let pairs = self.status.snapshot().targets;
        let done = pairs
            .iter()
            .filter(|t| t.reconciled || (t.sync == group && t.target == target))
            .count();
        crate::service::status(&if done == pairs.len() {
            "every target reconciled; following changes".to_string()
        } else {
            format!("{done} of {} targets reconciled", pairs.len())
        });
    }
}

/// One line of figures per (group, target), failures on stderr.
pub fn print_report(group: &str, target: &str, r: &Report) {
    outln!(
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
        errln!("ferry: {group} → {target}: {path}: {why}");
    }
    if let Some(held) = &r.held {
        errln!("ferry: {group} → {target}: {}", held.why);
    }
}

/// Re-sends every file of `group` whose content on the module behind `session` differs from
/// the source's by digest (`verify --checksum`), whatever its size and time say: each goes as
/// a change whose receiver copy is not trusted (a delta against it, checked by digest).
/// Returns how many were found.
async fn repair(
    group: &ferry_sender::config::SyncGroup,
    target: &ferry_sender::config::Target,
    identity: &ferry_protocol::identity::Identity,
    session: &Arc<ferry_sender::session::Session>,
    links: &ferry_sender::links::Names,
    report: &mut Report,
) -> Result<usize> {
    use ferry_protocol::meta::Difference;
    use ferry_sender::coalesce::{Change, Need};
    let diffs = ferry_sender::verify::verify_target(group, target, identity, true, None, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut batch = ferry_sender::queue::Batch::default();
    let now = std::time::Instant::now();
    let mut found = 0;
    for (path, kind) in diffs {
        if kind == Difference::Content {
            batch.add(Change::Path {
                path,
                need: Need::Content,
                since: now,
            });
            found += 1;
        }
    }
    if found > 0 {
        let mut learned = ferry_sender::batch::Learned {
            links: links.clone(),
            ..Default::default()
        };
        let mut quiet = |_: &ferry_sender::execute::Step| {};
        ferry_sender::batch::send_batch(session, group, &mut learned, &batch, report, &mut quiet)
            .await?;
    }
    Ok(found)
}

async fn send_once(config: &ferry_sender::Config, checksum: bool) -> Result<u8> {
    let identity = config.identity()?;
    let mut converged = true;
    for group in &config.syncs {
        // What a compare learns of the group's multiply-linked files serves its next target.
        let links = ferry_sender::links::Names::default();
        for target_name in &group.targets {
            let target = &config.targets[target_name];
            if let TargetKind::Rsync(r) = &target.kind {
                let started = std::time::Instant::now();
                let mut r = r.clone();
                if checksum {
                    r.args.push("--checksum".into());
                }
                let mut counts = ferry_sender::rsync::Counts::default();
                let (address, mut tally) = (&target.address, Default::default());
                let verdict =
                    ferry_sender::rsync::full(group, &r, address, &mut tally, &mut counts).await;
                let ok = verdict == ferry_sender::rsync::Verdict::Done;
                outln!(
                    "sync={} target={target_name} rsync={} files={} deleted={} bytes_sent={} \
                     elapsed_ms={}",
                    group.name,
                    if ok { "ok" } else { "failed" },
                    counts.files,
                    counts.deleted,
                    counts.bytes,
                    started.elapsed().as_millis()
                );
                if !ok {
                    errln!("ferry: {} → {target_name}: {verdict}", group.name);
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
                let mut repaired = Report::default();
                if checksum {
                    let found =
                        repair(group, target, &identity, &session, &links, &mut repaired).await?;
                    errln!(
                        "ferry: {} → {target_name}: {found} files whose content differed \
                         re-sent ({} failed)",
                        group.name,
                        repaired.failures.len()
                    );
                }
                let mut watch =
                    crate::progress::PlanProgress::new(&format!("{} → {target_name}", group.name));
                let root = ferry_protocol::RelPath::root();
                let mut report = reconcile::reconcile_under(
                    &session,
                    group,
                    &links,
                    &root,
                    Default::default(),
                    &mut watch,
                )
                .await?;
                drop(watch);
                session.close().await;
                report.absorb(repaired);
                Ok::<_, anyhow::Error>(report)
            }
            .await;
            match result {
                Ok(report) => {
                    print_report(&group.name, target_name, &report);
                    converged &= report.converged();
                }
                Err(e) => {
                    let e = crate::describe(&e);
                    errln!("ferry: {} → {target_name}: {e}", group.name);
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
            outln!("target={name} kind=rsync");
            continue;
        }
        let session = target
            .connect(&identity, &group.module, Intent::Read)
            .await
            .with_context(|| format!("target {name}"))?;
        let counters = session.stats().await?;
        let line: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!("target={name} {}", line.join(" "));
        session.close().await;
    }
    Ok(0)
}
