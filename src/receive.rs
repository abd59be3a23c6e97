//! `ferry receive`: the receiver daemon, with its metrics endpoint and SIGHUP reload.

use crate::{describe, metrics, service, signals};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `ferry receive --config FILE`: serves until SIGTERM; SIGHUP re-reads the file.
pub async fn receive(file: &Path) -> Result<u8> {
    let config = ferry_receiver::Config::load(file)?;
    let (hup_tx, hups) = tokio::sync::mpsc::channel(1);
    let shutdown = signals(Some(hup_tx));
    // Bound before the receiver starts, so a bad address stops the start.
    let running = Arc::new(std::sync::OnceLock::<Arc<ferry_receiver::Server>>::new());
    if let Some(address) = config.metrics_listen {
        let r = running.clone();
        let render = Arc::new(move || {
            r.get().map_or_else(String::new, |s| {
                let (sessions, away) = s.load();
                metrics::receiver(&s.stats(), sessions, away, &s.history_figures())
            })
        });
        metrics::serve(address, render, shutdown.clone()).await?;
    }
    let (modules, listen) = (config.modules.len(), config.listen);
    let file = file.to_path_buf();
    let first = config.clone();
    ferry_receiver::run(&config, shutdown, move |server| {
        service::ready(&format!("listening on {listen}, {modules} modules"));
        service::watchdog(server.liveness.clone());
        let _ = running.set(server.clone());
        tokio::spawn(reload_receiver(file, first, server.clone(), hups));
    })
    .await?;
    Ok(0)
}

/// On each SIGHUP: re-reads the receiver's configuration and switches new sessions to it, or
/// says why not (the previous one keeps serving).
async fn reload_receiver(
    file: PathBuf,
    first: ferry_receiver::Config,
    server: Arc<ferry_receiver::Server>,
    mut hups: tokio::sync::mpsc::Receiver<()>,
) {
    while hups.recv().await.is_some() {
        service::reloading();
        tracing::info!("SIGHUP: reloading {}", file.display());
        let outcome = ferry_receiver::Config::load(&file)
            .map_err(anyhow::Error::from)
            .and_then(|new| {
                if new.metrics_listen != first.metrics_listen {
                    tracing::warn!("metrics_listen takes effect at the next restart");
                }
                Ok(server.reload(&new)?)
            });
        match outcome {
            Ok(summary) => {
                tracing::info!("configuration reloaded: {summary}");
                service::ready(&format!("reloaded: {summary}"));
            }
            Err(e) => {
                tracing::error!(
                    "reload refused: {}; still running the previous configuration",
                    describe(&e)
                );
                service::ready("last reload refused; running the previous configuration");
            }
        }
    }
}
