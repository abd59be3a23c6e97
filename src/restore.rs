//! `ferry restore`: a module (or some of its paths) as it was at a time.
//!
//! From a source host (a sender.toml) it is a restore session to the receiver: the backup
//! host sends the tree as a sender does (deltas against what DEST holds), and this process
//! writes DEST as a receiver does, with the receiver's own confinement and commit code
//! (nothing outside DEST, never through a symlink, every file durable and checked before it
//! takes its name). On the backup host (a receiver.toml) it reads the module and its history
//! itself and writes a new or empty DEST.

use anyhow::{bail, Context, Result};
use ferry_protocol::connection::{client_handshake, FrameReader, FrameWriter, STALL_TIMEOUT};
use ferry_protocol::message::{Intent, Message};
use ferry_protocol::RelPath;
use ferry_receiver::config::{Module, Owner};
use ferry_receiver::module::ModuleState;
use ferry_receiver::requests::Requests;
use ferry_receiver::stats::Stats;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

use crate::progress::{Count, Progress};

/// What to restore, and how.
#[derive(Debug, Default)]
pub struct Ask {
    /// `--module` (receiver.toml).
    pub module: Option<String>,
    /// `--group` (sender.toml).
    pub group: Option<String>,
    /// `--target` (sender.toml).
    pub target: Option<String>,
    /// `--at`.
    pub at: Option<String>,
    /// `--path`s.
    pub paths: Vec<String>,
    /// `--delete`: remove what DEST holds beyond the restored tree (under the paths).
    pub delete: bool,
    /// `--devices`: make device nodes (as root).
    pub devices: bool,
    /// `--setuid`: keep setuid and setgid bits.
    pub setuid: bool,
    /// `--dry-run`: list what would change, change nothing.
    pub dry_run: bool,
    /// `ferry verify --at`: a dry run with `--delete` into an existing DEST, keeping
    /// everything, whose steps are the differences (exit 1 if any).
    pub verify: bool,
}

impl Ask {
    /// What `ferry verify --at` asks: every difference, nothing changed.
    pub fn verifying() -> Ask {
        Ask {
            delete: true,
            devices: true,
            setuid: true,
            dry_run: true,
            verify: true,
            ..Ask::default()
        }
    }
}

/// Reads `--at`: RFC 3339 (`2026-12-03T07:00:00Z`), or an age (`2h`, `3 days`, `3 days ago`).
pub fn parse_time(text: &str, now: SystemTime) -> Result<i64> {
    let t = text.trim();
    let at = if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        at
    } else {
        let age = t.strip_suffix("ago").unwrap_or(t).trim();
        match humantime::parse_duration(age) {
            Ok(d) => now.checked_sub(d).unwrap_or(UNIX_EPOCH),
            Err(e) => bail!(
                "--at {text:?}: neither a time (2026-12-03T07:00:00Z) nor an age (2h, \
                 3 days ago): {e}"
            ),
        }
    };
    if at > now {
        bail!("--at {text:?}: in the future");
    }
    Ok(at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as i64)
}

/// `ferry restore --config FILE ... DEST`: over the network with a sender.toml, locally with
/// a receiver.toml.
pub async fn restore(config: &Path, ask: &Ask, dest: &Path) -> Result<u8> {
    let receiver = crate::is_receiver(&crate::config_table(config)?);
    let at = ask
        .at
        .as_deref()
        .map(|t| parse_time(t, SystemTime::now()))
        .transpose()?;
    let paths = ask
        .paths
        .iter()
        .map(|p| crate::history::module_path("--path ", p))
        .collect::<Result<Vec<_>>>()?;
    if receiver {
        if ask.group.is_some() || ask.target.is_some() {
            bail!(
                "{}: a receiver configuration: name the module (--module), not a group",
                config.display()
            );
        }
        let config = ferry_receiver::Config::load(config)?;
        local(&config, ask, at, paths, dest).await
    } else {
        if ask.module.is_some() {
            bail!(
                "{}: a sender configuration: name the sync group (--group), not a module",
                config.display()
            );
        }
        let config = ferry_sender::Config::load(config)?;
        remote(&config, ask, at, paths, dest).await
    }
}

/// DEST made ready before any host is asked: the directory to write beneath, created
/// (mode 0700) if missing. DEST as the operator named it may be a symlink to a directory (as
/// rsync's may): it is resolved once, here, before anything the backup host says; everything
/// written is confined beneath the directory it names now.
fn destination(dest: &Path, ask: &Ask) -> Result<(PathBuf, bool)> {
    let mut within = dest.to_path_buf();
    let mut made = false;
    match std::fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => {}
        Ok(md) if md.is_symlink() => {
            within = match std::fs::canonicalize(dest) {
                Ok(to) => to,
                Err(e) => bail!("{}: {}", dest.display(), ferry_protocol::io_reason(&e)),
            };
            if !within.is_dir() {
                bail!(
                    "{}: not a directory (a symlink to {})",
                    dest.display(),
                    within.display()
                );
            }
        }
        Err(e) if ask.verify => bail!("{}: {}", dest.display(), ferry_protocol::io_reason(&e)),
        Ok(_) => bail!("{}: not a directory", dest.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .with_context(|| dest.display().to_string())?;
            made = true;
        }
        Err(e) => bail!("{}: {}", dest.display(), ferry_protocol::io_reason(&e)),
    }
    Ok((within, made))
}

/// After a restore that failed (the backup host refused, or could not be reached) or was a
/// dry run: DEST, if the restore made it and it is still empty, is removed again.
fn tidy(within: &Path, made: bool, ask: &Ask, done: &Result<u8>) {
    if made && (done.is_err() || ask.dry_run) {
        // Only ever an empty directory: `rmdir` refuses anything else.
        let _ = std::fs::remove_dir(within);
    }
}

fn when(at: Option<i64>) -> String {
    at.map_or_else(
        || "as it is now".to_string(),
        |ns| {
            let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
            format!("as at {}", humantime::format_rfc3339_seconds(t))
        },
    )
}

/// On the backup host, without a network: this process serves the module and its history
/// to itself over an in-process pipe ([`serve`](ferry_receiver::restore::serve::serve), the
/// backup host's half of a network restore) and writes DEST with the client's half
/// ([`receive`]). So DEST is written the same way either way: deltas against what it holds,
/// `--delete`, `--dry-run`, every file durable and checked before it takes its name. The
/// module and its history are only read: a running receiver is not disturbed.
async fn local(
    config: &ferry_receiver::Config,
    ask: &Ask,
    at: Option<i64>,
    paths: Vec<RelPath>,
    dest: &Path,
) -> Result<u8> {
    let Some(name) = ask.module.as_deref() else {
        bail!("{}: name the module (--module NAME)", config.file.display());
    };
    let Some(m) = config.modules.get(name) else {
        let known: Vec<&str> = config.modules.keys().map(String::as_str).collect();
        bail!(
            "{}: no module {name:?} (modules: {})",
            config.file.display(),
            known.join(", ")
        );
    };
    let (within, made) = destination(dest, ask)?;
    let (here, there) = tokio::io::duplex(1 << 20);
    let module = m.clone();
    let serving = tokio::spawn(async move {
        let (r, w) = tokio::io::split(there);
        let (reader, writer) = (FrameReader::new(r), FrameWriter::new(w));
        let (peer, stop) = ("ferry restore", CancellationToken::new());
        ferry_receiver::restore::serve::serve(&module, reader, writer, peer, &stop).await
    });
    let (r, w) = tokio::io::split(here);
    let from = Source {
        what: format!("module {name}"),
        short: name.to_string(),
        module: format!("module {name}"),
    };
    let (reader, writer) = (FrameReader::new(r), FrameWriter::new(w));
    let done = receive(reader, writer, &from, ask, at, paths, (dest, &within)).await;
    let done = match serving.await.expect("restore serving task") {
        Err(e) if done.is_ok() => Err(anyhow::Error::new(e).context(from.what)),
        _ => done,
    };
    tidy(&within, made, ask, &done);
    done
}

/// From a source host: a restore session to the group's target.
async fn remote(
    config: &ferry_sender::Config,
    ask: &Ask,
    at: Option<i64>,
    paths: Vec<RelPath>,
    dest: &Path,
) -> Result<u8> {
    let Some(group) = ask.group.as_deref() else {
        bail!(
            "{}: a sender configuration: name the sync group (--group NAME)",
            config.file.display()
        );
    };
    let (g, name) = crate::history::ferry_target(config, group, ask.target.as_deref())?;
    let target = &config.targets[&name];
    let fingerprint = target.fingerprint().expect("a ferry target");
    let identity = config.identity()?;
    let (within, made) = destination(dest, ask)?;
    let done = async {
        let stream = ferry_sender::dial::dial(&target.address, fingerprint, &identity)
            .await
            .with_context(|| format!("target {name}"))?;
        let (r, w) = tokio::io::split(stream);
        let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
        client_handshake(&mut reader, &mut writer, &g.module, Intent::Restore)
            .await
            .with_context(|| format!("target {name}, module {}", g.module))?;
        let from = Source {
            what: format!("target {name}"),
            short: group.to_string(),
            module: format!("sync {group} from target {name}, module {}", g.module),
        };
        receive(reader, writer, &from, ask, at, paths, (dest, &within)).await
    }
    .await;
    tidy(&within, made, ask, &done);
    done
}

/// Where a restore comes from, as its messages name it.
struct Source {
    /// Who answers, for errors: `target NAME`, `module NAME`.
    what: String,
    /// The group or module, for per-path lines.
    short: String,
    /// The whole source, for the summary.
    module: String,
}

/// The client's half of a restore, after the handshake: asks for the tree (`Restore`), then
/// answers as a receiver answers for a module whose root is DEST (created if missing), with
/// the receiver's own request loop, confinement and commit; progress while it runs and a
/// summary after.
async fn receive<R, W>(
    reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    from: &Source,
    ask: &Ask,
    at: Option<i64>,
    paths: Vec<RelPath>,
    (dest, within): (&Path, &Path),
) -> Result<u8>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let what = &from.what;
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0;
    let module = Module {
        name: format!("restore of {}", from.short),
        path: within.to_path_buf(),
        clients: Vec::new(),
        restore_clients: Vec::new(),
        hosts_allow: None,
        read_only: false,
        max_connections: None,
        comment: None,
        devices: ask.devices,
        setuid: ask.setuid,
        owner: Owner::Preserve,
        history: None,
        lease: None,
    };
    let state = Arc::new(ModuleState::destination(module).map_err(anyhow::Error::msg)?);
    let keeps = state.keeps(privileged);
    writer
        .write(&Message::Restore {
            at,
            paths,
            delete: ask.delete,
            keeps,
            dry_run: ask.dry_run,
        })
        .await
        .with_context(|| what.clone())?;
    let stats = Arc::new(Stats::default());
    let mut refused = None;
    let mut unsent: Vec<(RelPath, String)> = Vec::new();
    let mut planned = Count::default();
    let started = std::time::Instant::now();
    let progress = Arc::new(Progress::start("restore"));
    let ticker = {
        let (progress, stats) = (progress.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                progress.update(done(&stats));
            }
        })
    };
    let delete = ask.delete;
    // SIGINT or SIGTERM: stop taking requests, commit what arrived, and say where it stopped.
    let interrupted = crate::shutdown_on_signals();
    let served = ferry_receiver::session::answer(
        reader,
        writer,
        |replies| {
            let r = Requests::new(state.clone(), stats.clone(), privileged, true, replies)
                .stopping_when_unwritable();
            if delete {
                r
            } else {
                r.without_removals()
            }
        },
        &interrupted,
        Some(STALL_TIMEOUT),
        |m| match m {
            Message::Alive => true,
            Message::Refused { reason } => {
                refused = Some(reason.clone());
                true
            }
            Message::Unsent { path, reason } => {
                unsent.push((path.clone(), reason.clone()));
                true
            }
            Message::Planned {
                steps,
                bytes,
                changes,
                done,
            } => {
                planned = Count {
                    entries: *steps,
                    bytes: *bytes,
                };
                progress.total(planned);
                // A dry run's list comes in batches, each with the whole totals.
                progress.growing(!done && changes.is_empty());
                for (path, what) in changes {
                    outln!("{what} {path}");
                }
                true
            }
            _ => false,
        },
        || {},
    )
    .await;
    ticker.abort();
    progress.finish();
    // Stopped here (a signal, DEST's filesystem refusing writes): the backup host may still
    // have said, or the connection shown, that the client went; that is no news. Why it
    // stopped is said below, after how far it got.
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (interrupted, unwritable) = (interrupted.is_cancelled(), n(&stats.unwritable) > 0);
    let stopped_here = interrupted || unwritable;
    if let Some(reason) = refused.filter(|_| !stopped_here) {
        bail!("{what}: {reason}");
    }
    let complete = match served {
        Ok(complete) => complete,
        Err(_) if stopped_here => false,
        Err(e) => return Err(anyhow::Error::new(e).context(what.clone())),
    };
    if ask.verify && complete {
        outln!(
            "{} {} {} {}",
            dest.display(),
            if planned.entries == 0 {
                "equals"
            } else {
                "differs from"
            },
            from.module,
            when(at),
        );
        return Ok(if planned.entries == 0 { 0 } else { 1 });
    }
    if ask.dry_run && complete {
        outln!(
            "{} {}: dry run: {} changes, {} of files to restore into {}; nothing changed",
            from.module,
            when(at),
            planned.entries,
            crate::status::bytes(planned.bytes),
            dest.display()
        );
        return Ok(0);
    }
    for (path, why) in &unsent {
        errln!(
            "ferry: restore {}: {path}: not sent by the backup host: {why}",
            from.short
        );
    }
    let failed = n(&stats.failures) + unsent.len() as u64;
    outln!(
        "{} {}: {} files ({} as deltas, {} bytes received), {} directories, {} links and \
         special files, {} metadata updates, {} deleted into {} in {:.1} s; {} not restored",
        from.module,
        when(at),
        n(&stats.files),
        n(&stats.delta_files),
        n(&stats.bytes_received),
        n(&stats.mkdirs),
        n(&stats.links),
        n(&stats.set_meta),
        n(&stats.deletes),
        dest.display(),
        started.elapsed().as_secs_f64(),
        failed,
    );
    if interrupted {
        bail!(
            "{}: interrupted: what DEST holds is whole; the same restore run again sends only \
             what is missing",
            dest.display()
        );
    }
    if unwritable {
        bail!(
            "{}: its filesystem took no more writes (said above): the restore stopped there; \
             what DEST holds is whole. Free space (or restore fewer --path) and run it again: \
             only what is missing travels",
            dest.display()
        );
    }
    if !complete {
        bail!("{what}: the connection ended before the restore was complete");
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// What the request loop has done so far, as progress counts.
fn done(stats: &Stats) -> Count {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    Count {
        entries: n(&stats.files)
            + n(&stats.mkdirs)
            + n(&stats.links)
            + n(&stats.set_meta)
            + n(&stats.deletes),
        bytes: n(&stats.bytes_written),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup host that welcomes the restore and then says nothing, connection open: the
    /// client gives up after the stall limit (45 s without a word; a working backup host says
    /// `Alive` every 10 s), naming why, instead of waiting for ever. On virtual time.
    #[tokio::test(start_paused = true)]
    async fn a_silent_backup_host_is_given_up_after_the_stall_limit() {
        let dest = tempfile::tempdir().unwrap();
        let (here, there) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(here);
        let (pr, _pw) = tokio::io::split(there);
        let mut peer = FrameReader::new(pr);
        let from = Source {
            what: "target t".into(),
            short: "g".into(),
            module: "sync g from target t, module m".into(),
        };
        let ask = Ask::default();
        let started = tokio::time::Instant::now();
        let client = receive(
            FrameReader::new(r),
            FrameWriter::new(w),
            &from,
            &ask,
            None,
            Vec::new(),
            (dest.path(), dest.path()),
        );
        let (done, asked) = tokio::join!(client, peer.expect());
        assert_eq!(asked.unwrap().name(), "Restore");
        let waited = started.elapsed();
        let e = format!("{:#}", done.unwrap_err());
        assert!(
            e.contains("target t") && e.contains("a word from the peer"),
            "{e}"
        );
        assert!(
            waited >= STALL_TIMEOUT && waited < STALL_TIMEOUT + Duration::from_secs(5),
            "gave up after {waited:?}"
        );
    }

    #[test]
    fn times_read_as_operators_write_them() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ns = |s: u64| (s as i64) * 1_000_000_000;
        assert_eq!(parse_time("2h", now).unwrap(), ns(1_800_000_000 - 7200));
        assert_eq!(
            parse_time("3 days ago", now).unwrap(),
            ns(1_800_000_000 - 3 * 86_400)
        );
        // 1,800,000,000 s after the epoch, written as a time.
        assert_eq!(
            parse_time("2027-01-15T08:00:00Z", now).unwrap(),
            ns(1_800_000_000)
        );
        assert_eq!(
            parse_time("2027-01-15 07:00:00Z", now).unwrap(),
            ns(1_800_000_000 - 3600)
        );
        for bad in ["yesterday-ish", "2099-01-01T00:00:00Z"] {
            let e = parse_time(bad, now).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
