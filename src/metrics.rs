//! The Prometheus endpoint (`metrics_listen`): the sender's per-target figures (the same as
//! `ferry status`) and the receiver's counters, in the OpenMetrics text format, over plain
//! HTTP on an address the operator chooses (a loopback or management address: there is no
//! authentication, as usual for exporters).
//!
//! The HTTP side is a few lines of our own rather than a web framework: one `GET` per
//! connection, a request head of at most [`MAX_REQUEST`] bytes read within
//! [`REQUEST_TIMEOUT`], at most [`MAX_SCRAPES`] connections at once, then close.

use anyhow::{Context, Result};
use ferry_sender::status::{Snapshot, State};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request head read.
pub const MAX_REQUEST: usize = 8 << 10;
/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the listen backlog.
pub const MAX_SCRAPES: usize = 8;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// The sender's figures.
pub fn sender(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("ferry_sender");
    let state = Family::<Labels, Gauge>::default();
    let pending = Family::<Labels, Gauge>::default();
    let lag = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let reconciled = Family::<Labels, Gauge>::default();
    let files = Family::<Labels, Counter>::default();
    let deleted = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let failures = Family::<Labels, Counter>::default();
    let holding = Family::<Labels, Gauge>::default();
    let mass = Family::<Labels, Counter>::default();
    let gateway = Family::<Labels, Gauge>::default();
    for t in &s.targets {
        let labels = vec![
            ("sync".to_string(), t.sync.clone()),
            ("target".to_string(), t.target.clone()),
        ];
        for st in State::ALL {
            let mut l = labels.clone();
            l.push(("state".into(), st.name().into()));
            state.get_or_create(&l).set(i64::from(t.state == st));
        }
        pending.get_or_create(&labels).set(t.pending as i64);
        lag.get_or_create(&labels).set(t.lag_seconds);
        reconciled
            .get_or_create(&labels)
            .set(i64::from(t.reconciled));
        files.get_or_create(&labels).inc_by(t.files);
        deleted.get_or_create(&labels).inc_by(t.deleted);
        bytes.get_or_create(&labels).inc_by(t.bytes);
        failures.get_or_create(&labels).inc_by(t.failures);
        holding
            .get_or_create(&labels)
            .set(i64::from(t.held_why.is_some()));
        mass.get_or_create(&labels).inc_by(t.mass_changes);
        if let Some(g) = &t.gateway {
            let mut l = labels.clone();
            l.push(("address".into(), g.clone()));
            gateway.get_or_create(&l).set(1);
        }
    }
    reg.register(
        "gateway",
        "1 for the receiver address each (sync, target) pair's last session went to",
        gateway,
    );
    reg.register(
        "target_state",
        "1 for the state each (sync, target) pair is in",
        state,
    );
    reg.register(
        "pending_changes",
        "Changes the target has not acknowledged (a whole-tree compare counts as one)",
        pending,
    );
    reg.register(
        "lag_seconds",
        "Age of the oldest change the target has not acknowledged (0 when none)",
        lag,
    );
    reg.register(
        "reconciled",
        "1 once a whole-tree compare converged on the target since the start",
        reconciled,
    );
    reg.register("files", "Files sent", files);
    reg.register("deleted", "Paths deleted on the target", deleted);
    reg.register("bytes", "Bytes sent", bytes);
    reg.register("failures", "Paths the target refused, each try", failures);
    reg.register(
        "holding_deletes",
        "1 while the mass-delete guard holds deletions back (`ferry confirm-deletes` releases them)",
        holding,
    );
    reg.register(
        "mass_changes",
        "Mass deletions applied into the module's history (the guard would have held them)",
        mass,
    );
    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(s.uptime_seconds);
    reg.register("uptime_seconds", "Seconds since the sender started", uptime);
    text(&reg)
}

/// The receiver's figures: its counters, sessions open, connections turned away.
pub fn receiver(
    counters: &[(String, u64)],
    sessions: usize,
    turned_away: u64,
    history: &[(String, ferry_receiver::history::Figures)],
) -> String {
    let mut reg = Registry::with_prefix("ferry_receiver");
    for (name, value) in counters {
        let c = Counter::<u64>::default();
        c.inc_by(*value);
        reg.register(
            name.clone(),
            format!("{} since the start", name.replace('_', " ")),
            c,
        );
    }
    let open = Gauge::<i64>::default();
    open.set(sessions as i64);
    reg.register("sessions", "Sessions being served", open);
    let away = Counter::<u64>::default();
    away.inc_by(turned_away);
    reg.register(
        "turned_away",
        "Connections closed before their handshake (admission caps)",
        away,
    );
    let family = |reg: &mut Registry,
                  name: &str,
                  help: &str,
                  value: &dyn Fn(&ferry_receiver::history::Figures) -> i64| {
        let f = Family::<Vec<(String, String)>, Gauge<i64>>::default();
        for (module, figures) in history {
            f.get_or_create(&vec![("module".to_string(), module.clone())])
                .set(value(figures));
        }
        reg.register(name, help, f);
    };
    family(
        &mut reg,
        "history_versions",
        "Versions kept in the module's history",
        &|f| f.versions as i64,
    );
    family(
        &mut reg,
        "history_bytes",
        "Bytes the kept versions held when kept",
        &|f| f.bytes as i64,
    );
    family(
        &mut reg,
        "history_oldest_age_seconds",
        "Age of the oldest kept version (0 when none)",
        &|f| f.oldest_age.map_or(0, |a| a.as_secs() as i64),
    );
    family(
        &mut reg,
        "history_pruned",
        "Versions pruned since the start",
        &|f| f.pruned as i64,
    );
    family(
        &mut reg,
        "history_refusing_writes",
        "1 while writes are refused because the history's floor does not fit in the space left",
        &|f| f.refusing as i64,
    );
    text(&reg)
}

fn text(reg: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, reg).expect("writing to a String");
    out
}

/// Binds `address` and serves `render()` at `/metrics` until `shutdown`.
pub async fn serve(
    address: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("metrics_listen {address}: cannot listen"))?;
    tracing::info!(%address, "serving metrics at /metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(%address, "metrics: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*render)).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: tokio::net::TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let path = target.map(|t| t.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", CONTENT_TYPE, render()),
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "ferry: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "ferry: GET only\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_sender::status::TargetStatus;

    fn pair(state: State, lag: f64) -> TargetStatus {
        TargetStatus {
            sync: "www".into(),
            target: "backup".into(),
            kind: "ferry".into(),
            address: "127.0.0.1:1".into(),
            state,
            why: None,
            state_seconds: 1.0,
            reconciled: true,
            pending: 3,
            compare_pending: false,
            lag_seconds: lag,
            last_error: None,
            last_error_seconds: None,
            files: 7,
            deleted: 1,
            bytes: 4096,
            failures: 0,
            held_deletes: 0,
            held_why: None,
            mass_changes: 0,
            last_mass_change: None,
            gateway: Some("10.0.0.3:8730".into()),
        }
    }

    /// The sample of `name` with `labels` in `text`, parsed.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let key = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn sender_figures_carry_each_pairs_labels_and_values() {
        let snap = Snapshot {
            version: "0".into(),
            pid: 1,
            uptime_seconds: 5.0,
            config_loaded_unix: 0,
            targets: vec![pair(State::Retrying, 12.5)],
        };
        let text = sender(&snap);
        let l = "sync=\"www\",target=\"backup\"";
        assert_eq!(sample(&text, "ferry_sender_lag_seconds", l), Some(12.5));
        assert_eq!(sample(&text, "ferry_sender_pending_changes", l), Some(3.0));
        assert_eq!(sample(&text, "ferry_sender_files_total", l), Some(7.0));
        assert_eq!(sample(&text, "ferry_sender_bytes_total", l), Some(4096.0));
        let st = |s: &str| {
            sample(
                &text,
                "ferry_sender_target_state",
                &format!("{l},state=\"{s}\""),
            )
        };
        assert_eq!(st("retrying"), Some(1.0));
        assert_eq!(st("connected"), Some(0.0));
        let via = format!("{l},address=\"10.0.0.3:8730\"");
        assert_eq!(sample(&text, "ferry_sender_gateway", &via), Some(1.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn receiver_counters_become_totals() {
        let figures = ferry_receiver::history::Figures {
            versions: 12,
            bytes: 49152,
            oldest_age: Some(Duration::from_secs(90)),
            pruned: 3,
            refusing: true,
        };
        let history = [("www".to_string(), figures)];
        let text = receiver(
            &[("files".into(), 9), ("deletes".into(), 2)],
            1,
            4,
            &history,
        );
        let m = "module=\"www\"";
        assert_eq!(
            sample(&text, "ferry_receiver_history_versions", m),
            Some(12.0)
        );
        assert_eq!(
            sample(&text, "ferry_receiver_history_bytes", m),
            Some(49152.0)
        );
        assert_eq!(
            sample(&text, "ferry_receiver_history_oldest_age_seconds", m),
            Some(90.0)
        );
        assert_eq!(sample(&text, "ferry_receiver_history_pruned", m), Some(3.0));
        assert_eq!(
            sample(&text, "ferry_receiver_history_refusing_writes", m),
            Some(1.0)
        );
        assert_eq!(sample_plain(&text, "ferry_receiver_files_total"), Some(9.0));
        assert_eq!(
            sample_plain(&text, "ferry_receiver_deletes_total"),
            Some(2.0)
        );
        assert_eq!(sample_plain(&text, "ferry_receiver_sessions"), Some(1.0));
        assert_eq!(
            sample_plain(&text, "ferry_receiver_turned_away_total"),
            Some(4.0)
        );
    }

    fn sample_plain(text: &str, name: &str) -> Option<f64> {
        let key = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
    }
}
