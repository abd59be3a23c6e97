//! Load: a thousand senders at once against one receiver, each from its own address.

mod common;

use common::*;
use ferry_protocol::identity::Identity;
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::{Fingerprint, RelPath};
use ferry_sender::session::Session;
use ferry_sender::worker::Backoff;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SENDERS: usize = 1000;
const FILES: usize = 5;
/// The test gives up (and fails) after this long.
const DEADLINE: Duration = Duration::from_secs(240);

fn content(sender: usize, file: usize) -> Vec<u8> {
    pseudo_random(
        2048 + (sender * 7 + file) % 4096,
        (sender * FILES + file) as u64,
    )
}

/// Connects from `local` the way the daemon does (TLS 1.3, pinned), then opens `file`.
async fn open(
    local: Ipv4Addr,
    server: SocketAddr,
    identity: &Identity,
    pin: Fingerprint,
) -> Result<Session, String> {
    let tls =
        ferry_protocol::tls::client_config(identity.certs.clone(), identity.key.clone_key(), pin)
            .map_err(|e| e.to_string())?;
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from((local, 0)))
        .map_err(|e| e.to_string())?;
    let tcp = socket.connect(server).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ferry_protocol::tls::server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Session::over(stream, &server.to_string(), "file", Intent::Write, false)
        .await
        .map_err(|e| e.to_string())
}

/// One sender: connect (retrying with the daemon's backoff, as a worker does), make its
/// directory, push its files with all of them in flight, close. Returns its time and how many
/// connection attempts failed.
async fn one_sender(
    i: usize,
    server: SocketAddr,
    identity: Arc<Identity>,
    pin: Fingerprint,
    start: Instant,
) -> Result<(Duration, u32), String> {
    let local = Ipv4Addr::new(127, 1 + (i / 250) as u8, 0, 1 + (i % 250) as u8);
    let mut backoff = Backoff::default();
    let mut failed = 0;
    let session = loop {
        match open(local, server, &identity, pin).await {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                failed += 1;
                if start.elapsed() > DEADLINE {
                    return Err(format!("sender {i}: never connected: {e}"));
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    let dir = format!("s{i}");
    session
        .call(|id| Message::Mkdir {
            id,
            path: RelPath::from(dir.as_str()),
            meta: Meta {
                kind: Kind::Dir,
                mode: 0o755,
                ..file_meta(0)
            },
        })
        .await
        .map_err(|e| format!("sender {i}: mkdir: {e}"))?;
    let mut pushes = tokio::task::JoinSet::new();
    for f in 0..FILES {
        let (session, path) = (session.clone(), format!("{dir}/f{f}"));
        pushes.spawn(async move { push_whole(&session, &path, &content(i, f)).await });
    }
    while let Some(r) = pushes.join_next().await {
        r.unwrap().map_err(|e| format!("sender {i}: {e}"))?;
    }
    let took = start.elapsed();
    session.close().await;
    Ok((took, failed))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 1,000 senders, each from its own loopback address, connect at the same moment and push
/// small files into one receiver. Every one is served (none hangs, none is starved past the
/// deadline), every file arrives whole; throughput and fairness are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_senders_at_once_are_all_served() {
    let site = Site::new();
    let dst = site.path("dst");
    let backup = Backup::start(site.root(), "recv", &[("file", &dst)], &site.fingerprint);
    let identity =
        Arc::new(Identity::load(&site.path("send/cert.pem"), &site.path("send/key.pem")).unwrap());
    let pin: Fingerprint = backup.fingerprint.parse().unwrap();
    let server = SocketAddr::from(([127, 0, 0, 1], backup.port));
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..SENDERS {
        senders.spawn(one_sender(i, server, identity.clone(), pin, start));
    }
    let mut times = Vec::new();
    let mut refused = 0;
    let mut errors = Vec::new();
    while let Some(r) = senders.join_next().await {
        match r.unwrap() {
            Ok((t, f)) => {
                times.push(t.as_secs_f64());
                refused += f;
            }
            Err(e) => errors.push(e),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        errors.is_empty(),
        "{} senders failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for i in 0..SENDERS {
        for f in 0..FILES {
            let got = fs::read(dst.join(format!("s{i}/f{f}"))).unwrap();
            assert!(got == content(i, f), "s{i}/f{f} differs");
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // Jain's index over per-sender rates: 1.0 is perfectly fair, 1/n is one sender served.
    let rates: Vec<f64> = times.iter().map(|t| FILES as f64 / t).collect();
    let (sum, sum_sq) = rates
        .iter()
        .fold((0.0, 0.0), |(s, q), r| (s + r, q + r * r));
    let jain = sum * sum / (rates.len() as f64 * sum_sq);
    eprintln!(
        "{SENDERS} senders x {FILES} files in {elapsed:.2} s: {:.0} files/s; done after p50 \
         {:.2} s, p90 {:.2} s, p99 {:.2} s, max {:.2} s; {refused} connection attempts \
         turned away and retried; Jain fairness {jain:.3}",
        (SENDERS * FILES) as f64 / elapsed,
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99),
        times[times.len() - 1],
    );
    drop(backup);
}
