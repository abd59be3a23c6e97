//! `ferry status` and `ferry confirm-deletes`: the running sender answers on a local socket;
//! this file holds both ends. A client writes one request line (`status`, or
//! `confirm-deletes GROUP`; nothing at all means `status`) and closes its side; the answer is
//! JSON: a [`Snapshot`], or `{"confirmed": [targets]}` / `{"error": why}`.
//!
//! The socket is for the daemon's own user and root: the directory the daemon creates for it
//! is mode 0700, the socket 0600, and a peer whose credentials (`SO_PEERCRED`) are anyone
//! else's is closed without an answer.

use anyhow::{bail, Context, Result};
use ferry_sender::status::{Board, Snapshot, State, TargetStatus};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// How long a `ferry status` client may take to read its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request the daemon reads.
const MAX_REQUEST: u64 = 1024;
/// Largest answer a client accepts.
const MAX_ANSWER: u64 = 16 << 20;

/// Binds `path` (replacing a stale socket, refusing when another daemon answers there) and
/// answers every permitted connection with the board's snapshot until `shutdown`; the socket
/// file is removed then.
pub fn serve(path: &Path, board: Board, shutdown: CancellationToken) -> Result<()> {
    let listener = bind(path)?;
    let path = path.to_path_buf();
    tokio::spawn(async move {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("status socket {}: accept failed: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let allowed = stream
                .peer_cred()
                .is_ok_and(|c| c.uid() == 0 || c.uid() == me);
            if !allowed {
                continue;
            }
            let board = board.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
                    let mut request = Vec::new();
                    (&mut stream)
                        .take(MAX_REQUEST)
                        .read_to_end(&mut request)
                        .await?;
                    let answer = answer(&board, &String::from_utf8_lossy(&request));
                    stream.write_all(&answer).await?;
                    stream.shutdown().await
                })
                .await;
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// The daemon's answer to one request line.
fn answer(board: &Board, request: &str) -> Vec<u8> {
    let request = request.trim();
    let reply = match request.split_once(' ') {
        _ if request.is_empty() || request == "status" => {
            return serde_json::to_vec(&board.snapshot()).expect("snapshot serializes")
        }
        Some(("confirm-deletes", group)) => match board.confirm_deletes(group.trim()) {
            Ok(targets) => {
                tracing::warn!(
                    sync = group.trim(),
                    ?targets,
                    "the operator confirmed the held deletions"
                );
                serde_json::json!({ "confirmed": targets })
            }
            Err(e) => serde_json::json!({ "error": e }),
        },
        _ => serde_json::json!({ "error": format!("unknown request {request:?}") }),
    };
    serde_json::to_vec(&reply).expect("json")
}

fn bind(path: &Path) -> Result<UnixListener> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!("status socket {shown}: cannot create {}", dir.display())
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("status socket {shown}: another ferry sender answers there");
            }
            std::fs::remove_file(path)
                .with_context(|| format!("status socket {shown}: cannot remove the stale one"))?;
        }
        Ok(_) => bail!("status socket {shown}: exists and is not a socket"),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("status socket {shown}: cannot bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("status socket {shown}: cannot restrict"))?;
    Ok(listener)
}

/// Asks the sender answering on `socket` for its snapshot.
pub async fn ask(socket: &Path) -> Result<Snapshot> {
    let shown = socket.display();
    let text = request(socket, "status").await?;
    serde_json::from_slice(&text).with_context(|| format!("status socket {shown}: bad answer"))
}

/// Sends `line` to the sender answering on `socket`; its answer.
async fn request(socket: &Path, line: &str) -> Result<Vec<u8>> {
    let shown = socket.display();
    let mut stream = UnixStream::connect(socket).await.with_context(|| {
        format!("status socket {shown}: is the sender running (and are you its user or root)?")
    })?;
    // A daemon that will not answer this user closes at once: the write may fail, and the
    // empty answer below says why.
    if stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .is_ok()
    {
        let _ = stream.shutdown().await;
    }
    let mut text = Vec::new();
    let read = tokio::time::timeout(
        ANSWER_TIMEOUT,
        (&mut stream).take(MAX_ANSWER).read_to_end(&mut text),
    )
    .await
    .with_context(|| format!("status socket {shown}: no answer within {ANSWER_TIMEOUT:?}"))?;
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => text.clear(),
        r => {
            r.with_context(|| format!("status socket {shown}"))?;
        }
    }
    if text.is_empty() {
        bail!("status socket {shown}: closed without an answer (only the sender's user and root are answered)");
    }
    Ok(text)
}

/// `ferry confirm-deletes GROUP`: the running sender applies the deletions its guard holds
/// for `group` on every target (one whole compare each, past the guard). Exit 0 when told.
pub async fn confirm_deletes(
    config: Option<&Path>,
    socket: Option<PathBuf>,
    group: &str,
) -> Result<u8> {
    let socket = socket_of(config, socket)?;
    let text = request(&socket, &format!("confirm-deletes {group}")).await?;
    let reply: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("status socket {}: bad answer", socket.display()))?;
    if let Some(e) = reply["error"].as_str() {
        bail!("{e}");
    }
    let targets: Vec<&str> = reply["confirmed"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    outln!(
        "sync {group}: deletions confirmed on {}; each runs a whole compare that deletes past the \
         guard (watch `ferry status`)",
        targets.join(", ")
    );
    Ok(0)
}

fn socket_of(config: Option<&Path>, socket: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => ferry_sender::Config::load(c)?.status_socket,
        (None, None) => ferry_sender::config::DEFAULT_STATUS_SOCKET.into(),
    })
}

/// `ferry status`: prints the snapshot (or its JSON); exit 0 when every target is connected,
/// has converged once and owes nothing, 1 otherwise.
pub async fn status(config: Option<&Path>, socket: Option<PathBuf>, json: bool) -> Result<u8> {
    let socket = socket_of(config, socket)?;
    let snap = ask(&socket).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        out!("{}", render(&snap));
    }
    Ok(if snap.targets.iter().all(in_step) {
        0
    } else {
        1
    })
}

/// Connected, converged once, owing nothing, holding no deletions.
fn in_step(t: &TargetStatus) -> bool {
    t.state == State::Connected && t.reconciled && t.pending == 0 && t.held_why.is_none()
}

/// The snapshot as an operator reads it: one block per (group, target).
pub fn render(s: &Snapshot) -> String {
    let mut out = format!(
        "ferry sender {} (pid {}), up {}\n",
        s.version,
        s.pid,
        age(s.uptime_seconds)
    );
    for t in &s.targets {
        let mut state = format!("{} for {}", t.state.name(), age(t.state_seconds));
        if let Some(why) = &t.why {
            state.push_str(&format!(": {why}"));
        }
        let progress = if in_step(t) {
            "in step"
        } else if t.held_why.is_some() && t.pending == 0 {
            "in step but for held deletions"
        } else if t.reconciled {
            "catching up"
        } else if t.compare_pending {
            "initial compare not finished"
        } else {
            "not converged yet"
        };
        let address = match &t.gateway {
            Some(g) if *g != t.address => format!("{}, via gateway {g}", t.address),
            _ => t.address.clone(),
        };
        out.push_str(&format!(
            "{} → {} ({} {}): {state}\n  {}; pending {}, lag {:.1} s; sent {} files, {}, {} deleted, {} failures\n",
            t.sync,
            t.target,
            t.kind,
            address,
            progress,
            t.pending,
            t.lag_seconds,
            t.files,
            bytes(t.bytes),
            t.deleted,
            t.failures,
        ));
        if let Some(why) = &t.held_why {
            out.push_str(&format!(
                "  deletions held ({} paths): {why}\n",
                t.held_deletes
            ));
        }
        if let Some(m) = &t.last_mass_change {
            out.push_str(&format!(
                "  mass changes into history: {}; last: {m}\n",
                t.mass_changes
            ));
        }
        let shown = t.why.is_some() && t.why == t.last_error;
        if let (Some(e), Some(ago), false) = (&t.last_error, t.last_error_seconds, shown) {
            out.push_str(&format!("  last error {} ago: {e}\n", age(ago)));
        }
    }
    if s.targets.is_empty() {
        out.push_str("no sync groups\n");
    }
    out
}

pub(crate) fn age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.0} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
