//! `ferry`: command-line front end. Parses flags, sets up logging and signals, and calls into
//! the library crates; exit codes: 0 success, 1 "not converged" or "trees differ", 2 errors.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_protocol::identity::Identity;
use ferry_protocol::local::{DigestCache, DigestTree};
use ferry_protocol::message::Intent;
use ferry_protocol::meta::Compare;
use ferry_sender::config::{SyncGroup, Target, TargetKind};
use ferry_sender::daemon::{Daemon, LogObserver, Observer};
use ferry_sender::filter::Filter;
use ferry_sender::reconcile::{self, Report, Step, StepKind};
use ferry_sender::session::Session;
use ferry_sender::verify::{self, Side};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Keep backup hosts in step with source hosts, over mutual TLS"
)]
struct Cli {
    /// More logging (-v debug, -vv trace). FERRY_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror SRC into DST live through the real protocol on 127.0.0.1, no configuration
    /// needed. Runs until Ctrl-C.
    Mirror {
        /// Source directory.
        src: PathBuf,
        /// Destination directory (created if missing).
        dst: PathBuf,
        /// Copy once and exit instead of following changes.
        #[arg(long)]
        once: bool,
    },
    /// Write DIR/cert.pem and DIR/key.pem (a self-signed identity) and print its fingerprint.
    Keygen {
        /// Directory to write into.
        dir: PathBuf,
        /// Name put in the certificate.
        #[arg(long, default_value = "ferry")]
        name: String,
    },
    /// Print the fingerprint of a PEM certificate.
    Fingerprint {
        /// Certificate file.
        cert: PathBuf,
    },
    /// Run the receiver until SIGTERM/SIGINT.
    Receive {
        /// receiver.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Keep every sync group's targets equal to its source until SIGTERM/SIGINT.
    Send {
        /// sender.toml
        #[arg(long)]
        config: PathBuf,
        /// Reconcile once and exit (0 only if every group converged on every target).
        #[arg(long)]
        once: bool,
    },
    /// Convert the old set-up's files into ferry configuration (printed, or written with -o).
    #[command(subcommand)]
    Import(Import),
    /// Print each target receiver's counters (files, renames, deletes, ...) since it started.
    Stats {
        /// sender.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare trees: `verify LEFT RIGHT`, or `verify --config sender.toml` for every group.
    Verify {
        /// sender.toml: compare each source with its remote modules.
        #[arg(long, conflicts_with_all = ["left", "right"])]
        config: Option<PathBuf>,
        /// Only this sync group.
        #[arg(long, requires = "config")]
        sync: Option<String>,
        /// Read every file instead of trusting cached digests.
        #[arg(long)]
        checksum: bool,
        /// Where local digest caches live (default: $XDG_CACHE_HOME/ferry or ~/.cache/ferry).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Source tree.
        left: Option<PathBuf>,
        /// Copy to check against it.
        right: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Import {
    /// An rsyncd.conf into a receiver.toml.
    Rsyncd {
        /// rsyncd.conf
        file: PathBuf,
        /// `listen` of the receiver (default 0.0.0.0:8730).
        #[arg(long)]
        listen: Option<String>,
        /// A sender fingerprint allowed on every module (repeatable).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// The old scripts' settings (file_watch.conf, or inotify.sh plus sersync.sh) into a
    /// sender.toml with rsync targets.
    Scripts {
        /// The files holding the settings.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// rsyncd port on the backup hosts (inotify.sh style; default 873).
        #[arg(long)]
        port: Option<u16>,
        /// Remote shell for rsync over ssh (file_watch.conf style; default ssh).
        #[arg(long)]
        rsh: Option<String>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("FERRY_LOG").unwrap_or_else(|_| default.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Cancelled on the first SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    token
}

async fn run(command: Command) -> Result<u8> {
    match command {
        Command::Keygen { dir, name } => {
            let id = Identity::generate_into(&dir, &name)?;
            println!("{}", id.fingerprint());
            Ok(0)
        }
        Command::Fingerprint { cert } => {
            let certs = ferry_protocol::identity::load_certs(&cert)?;
            println!("{}", ferry_protocol::Fingerprint::of_der(&certs[0]));
            Ok(0)
        }
        Command::Receive { config } => {
            let config = ferry_receiver::Config::load(&config)?;
            ferry_receiver::run(&config, shutdown_on_signals()).await?;
            Ok(0)
        }
        Command::Send { config, once } => {
            let config = ferry_sender::Config::load(&config)?;
            if once {
                return send_once(&config).await;
            }
            let identity = Identity::load(&config.cert, &config.key)?;
            let daemon = Daemon {
                identity: Arc::new(identity),
                targets: config.targets,
                syncs: config.syncs,
            };
            daemon
                .run(shutdown_on_signals(), Arc::new(LogObserver))
                .await?;
            Ok(0)
        }
        Command::Mirror { src, dst, once } => mirror(&src, &dst, once).await,
        Command::Stats { config } => stats(&config).await,
        Command::Import(what) => import(what),
        Command::Verify {
            config: Some(config),
            sync,
            checksum,
            ..
        } => verify_remote(&config, sync.as_deref(), checksum).await,
        Command::Verify {
            left: Some(left),
            right: Some(right),
            checksum,
            cache_dir,
            ..
        } => verify_local(&left, &right, checksum, cache_dir).await,
        Command::Verify { .. } => {
            bail!("verify needs LEFT and RIGHT directories, or --config FILE")
        }
    }
}

fn print_report(group: &str, target: &str, r: &Report) {
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
    for f in &r.failures {
        eprintln!("ferry: {group} → {target}: {f}");
    }
}

async fn send_once(config: &ferry_sender::Config) -> Result<u8> {
    let identity = Identity::load(&config.cert, &config.key)?;
    let mut converged = true;
    for group in &config.syncs {
        for target_name in &group.targets {
            let target = &config.targets[target_name];
            let fingerprint = match &target.kind {
                TargetKind::Ferry { fingerprint } => *fingerprint,
                TargetKind::Rsync(r) => {
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
                        eprintln!("ferry: {} → {target_name}: {verdict:?}", group.name);
                    }
                    converged &= ok;
                    continue;
                }
            };
            let result = async {
                let session = Arc::new(
                    Session::connect(
                        &target.address,
                        fingerprint,
                        &identity,
                        &group.module,
                        Intent::Write,
                    )
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

async fn mirror(src: &Path, dst: &Path, once: bool) -> Result<u8> {
    let src = src
        .canonicalize()
        .with_context(|| format!("{}", src.display()))?;
    if !src.is_dir() {
        bail!("{}: not a directory", src.display());
    }
    std::fs::create_dir_all(dst).with_context(|| format!("{}", dst.display()))?;
    let dst = dst.canonicalize()?;
    if dst.starts_with(&src) || src.starts_with(&dst) {
        bail!(
            "{} and {} overlap; mirror needs two separate trees",
            src.display(),
            dst.display()
        );
    }
    let recv = ferry_receiver::Loopback::start("mirror", dst.clone()).await?;
    let address = recv.address.clone();
    let group = SyncGroup {
        name: "mirror".into(),
        source: src.clone(),
        targets: vec!["local".into()],
        module: "mirror".into(),
        filter: Filter::empty(),
        delete: true,
        timing: Default::default(),
    };
    eprintln!(
        "ferry: mirroring {} → {} via {address}",
        src.display(),
        dst.display()
    );
    let code = if once {
        let session = Arc::new(
            Session::connect(&address, recv.pin, &recv.client, "mirror", Intent::Write).await?,
        );
        let report = reconcile::reconcile(&session, &group).await?;
        if let Ok(s) = Arc::try_unwrap(session) {
            s.close().await;
        }
        print_report("mirror", "local", &report);
        if report.converged() {
            0
        } else {
            1
        }
    } else {
        let target = Target {
            name: "local".into(),
            address,
            kind: TargetKind::Ferry {
                fingerprint: recv.pin,
            },
        };
        let daemon = Daemon {
            identity: Arc::new(recv.client.clone()),
            targets: [("local".to_string(), target)].into(),
            syncs: vec![group],
        };
        let observer = Arc::new(MirrorObserver {
            src: src.clone(),
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        });
        daemon.run(shutdown_on_signals(), observer).await?;
        eprintln!("ferry: stopped");
        0
    };
    recv.stop().await;
    Ok(code)
}

/// Prints `mirror`'s progress on stderr and one line per change on stdout.
struct MirrorObserver {
    src: PathBuf,
    tty: bool,
}

impl Observer for MirrorObserver {
    fn reconciled(&self, group: &str, target: &str, report: &Report) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        print_report(group, target, report);
        eprintln!(
            "ferry: initial sync done; watching {} (Ctrl-C to stop)",
            self.src.display()
        );
    }

    fn progress(&self, _group: &str, _target: &str, done: u64) {
        if self.tty {
            eprint!("\r\x1b[Kferry: initial sync: {done} entries sent");
        } else {
            eprintln!("ferry: initial sync: {done} entries sent");
        }
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

fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("ferry"))
}

fn cache_for(dir: Option<&Path>, root: &Path) -> DigestCache {
    match dir {
        Some(d) => {
            let key = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
            DigestCache::open(d.join(format!("{}.digests", &key[..16])))
        }
        None => DigestCache::in_memory(),
    }
}

fn build_tree(
    root: &Path,
    filter: &Filter,
    cache: &mut DigestCache,
    cmp: Compare,
    checksum: bool,
) -> Result<DigestTree> {
    let accept = |p: &ferry_protocol::RelPath, d: bool| filter.accepts(p, d);
    let mut errors = Vec::new();
    let tree = DigestTree::build(root, &accept, cache, cmp, checksum, &mut errors)
        .with_context(|| format!("{}", root.display()))?;
    if let Some((p, e)) = errors.first() {
        bail!(
            "{}: {e} ({} unreadable entries in all)",
            root.join(p.as_path()).display(),
            errors.len()
        );
    }
    if let Err(e) = cache.save() {
        tracing::warn!("cannot save digest cache: {e}");
    }
    tracing::info!(root = %root.display(), hashed = cache.hashed, cached = cache.hits, "tree digested");
    Ok(tree)
}

fn print_differences(diffs: &[(ferry_protocol::RelPath, ferry_protocol::meta::Difference)]) {
    for (path, kind) in diffs {
        println!("{} {}", kind.as_str(), path);
    }
}

async fn verify_local(
    left: &Path,
    right: &Path,
    checksum: bool,
    cache_dir: Option<PathBuf>,
) -> Result<u8> {
    let cache_dir = cache_dir.or_else(default_cache_dir);
    // Owners can only have been preserved by root; compare them when we are root.
    // SAFETY: geteuid has no preconditions.
    let cmp = Compare {
        owner: unsafe { libc::geteuid() } == 0,
    };
    let (left, right) = (
        left.canonicalize()
            .with_context(|| format!("{}", left.display()))?,
        right
            .canonicalize()
            .with_context(|| format!("{}", right.display()))?,
    );
    // A receiver's staging directory is never part of a tree.
    let filter = Filter::new(&[format!("/{}/", ferry_receiver::STAGING_DIR)])?;
    let walk_filter = filter.clone();
    let (l, r) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut lc = cache_for(cache_dir.as_deref(), &left);
        let mut rc = cache_for(cache_dir.as_deref(), &right);
        let filter = walk_filter;
        Ok((
            build_tree(&left, &filter, &mut lc, cmp, checksum)?,
            build_tree(&right, &filter, &mut rc, cmp, checksum)?,
        ))
    })
    .await??;
    let diffs = verify::compare(&Side::Local(l), &Side::Local(r), cmp, &filter).await?;
    print_differences(&diffs);
    Ok(if diffs.is_empty() { 0 } else { 1 })
}

async fn verify_remote(config: &Path, only: Option<&str>, checksum: bool) -> Result<u8> {
    let config = ferry_sender::Config::load(config)?;
    let identity = Identity::load(&config.cert, &config.key)?;
    let groups: Vec<&SyncGroup> = config
        .syncs
        .iter()
        .filter(|g| only.is_none_or(|n| g.name == n))
        .collect();
    if groups.is_empty() {
        bail!("no sync group named {:?}", only.unwrap_or_default());
    }
    let mut equal = true;
    for group in groups {
        for target_name in &group.targets {
            let target = &config.targets[target_name];
            let Some(fingerprint) = target.fingerprint() else {
                eprintln!(
                    "ferry: verify {} → {target_name}: an rsyncd target; check it with \
                     `ferry verify SRC DEST` where both trees are visible",
                    group.name
                );
                continue;
            };
            let session = Session::connect(
                &target.address,
                fingerprint,
                &identity,
                &group.module,
                Intent::Read,
            )
            .await
            .with_context(|| format!("{} → {target_name}", group.name))?;
            let cmp = Compare {
                owner: session.privileged,
            };
            let (source, filter) = (group.source.clone(), group.filter.clone());
            let cache_file = config.state_dir.as_ref().map(|d| d.join("digests"));
            let tree = tokio::task::spawn_blocking(move || {
                let mut cache = cache_for(cache_file.as_deref(), &source);
                build_tree(&source, &filter, &mut cache, cmp, checksum)
            })
            .await??;
            let diffs = verify::compare(
                &Side::Local(tree),
                &Side::Remote {
                    session: &session,
                    checksum,
                },
                cmp,
                &group.filter,
            )
            .await
            .with_context(|| format!("{} → {target_name}", group.name))?;
            eprintln!(
                "ferry: verify {} → {target_name}: {}",
                group.name,
                if diffs.is_empty() {
                    "equal".to_string()
                } else {
                    format!("{} differences", diffs.len())
                }
            );
            print_differences(&diffs);
            equal &= diffs.is_empty();
            session.close().await;
        }
    }
    Ok(if equal { 0 } else { 1 })
}

async fn stats(config: &Path) -> Result<u8> {
    let config = ferry_sender::Config::load(config)?;
    let identity = Identity::load(&config.cert, &config.key)?;
    for (name, target) in &config.targets {
        let Some(group) = config.syncs.iter().find(|g| g.targets.contains(name)) else {
            continue;
        };
        let Some(fingerprint) = target.fingerprint() else {
            println!("target={name} kind=rsync");
            continue;
        };
        let session = Session::connect(
            &target.address,
            fingerprint,
            &identity,
            &group.module,
            Intent::Read,
        )
        .await
        .with_context(|| format!("target {name}"))?;
        let counters = session.stats().await?;
        let line: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("target={name} {}", line.join(" "));
        session.close().await;
    }
    Ok(0)
}

fn import(what: Import) -> Result<u8> {
    use ferry_sender::import;
    let read = |f: &Path| std::fs::read_to_string(f).with_context(|| format!("{}", f.display()));
    let (text, output) = match what {
        Import::Rsyncd {
            file,
            listen,
            clients,
            output,
        } => {
            let opts = import::ReceiverOptions { listen, clients };
            (import::rsyncd_conf(&read(&file)?, &file, &opts)?, output)
        }
        Import::Scripts {
            files,
            port,
            rsh,
            output,
        } => {
            let inputs = files
                .iter()
                .map(|f| Ok((f.clone(), read(f)?)))
                .collect::<Result<Vec<_>>>()?;
            let opts = import::SenderOptions { port, rsh };
            (import::scripts(&inputs, &opts)?, output)
        }
    };
    match output {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
            eprintln!("ferry: wrote {}; review it before use", path.display());
        }
        None => print!("{text}"),
    }
    Ok(0)
}
