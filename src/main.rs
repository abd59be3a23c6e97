//! `ferry`: command-line front end. Parses flags, sets up logging and signals, and calls into
//! the library crates; exit codes: 0 success, 1 "not converged" or "trees differ", 2 errors.

#[macro_use]
mod out;

mod history;
mod import;
mod manual;
mod metrics;
mod mirror;
mod progress;
mod receive;
mod restore;
mod send;
mod service;
mod status;
mod verify;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ferry_protocol::identity::Identity;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// Log warnings and errors only. FERRY_LOG overrides.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
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
        /// Delete from DST even past the mass-delete guard (an empty SRC, or more than half
        /// of DST).
        #[arg(long)]
        confirm_deletes: bool,
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
        /// With --once: first compare contents by digest on both sides (as `verify --checksum`)
        /// and re-send every file whose bytes differ although its size and time agree (a
        /// copy damaged or edited in place on the backup host); rsync targets run `rsync -c`.
        #[arg(long, requires = "once")]
        checksum: bool,
        /// Let this group delete past its mass-delete guard, this run only (repeatable).
        #[arg(long = "confirm-deletes", value_name = "GROUP")]
        confirm_deletes: Vec<String>,
    },
    /// Convert the old set-up's files into ferry configuration (printed, or written with -o).
    #[command(subcommand)]
    Import(Import),
    /// Check a sender.toml or a receiver.toml (whichever FILE is) as a start would, without
    /// starting anything: syntax, keys, values, the certificate and key, sync sources. Errors
    /// name the file, line and key; exit 0 valid, 2 not.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Show what the running sender is doing: per sync group and target, its state (and why),
    /// pending changes, lag, last error, files and bytes sent. Exit 0 when every target is
    /// connected, has converged and owes nothing; 1 otherwise; 2 when the sender cannot be
    /// asked.
    Status {
        /// sender.toml, for its `status_socket`.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The sender's status socket (default /run/ferry/sender.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Release the deletions the mass-delete guard holds for sync group GROUP in the running
    /// sender: each of its targets runs a whole compare that deletes past the guard, once,
    /// without a restart. Exit 0 when the sender took it.
    ConfirmDeletes {
        /// The sync group.
        group: String,
        /// sender.toml, for its `status_socket`.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The sender's status socket (default /run/ferry/sender.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Write the manual pages (DIR/man1/ferry*.1 from these definitions, DIR/man5/ferry-*.toml.5
    /// from the configuration references) and shell completions (DIR/completions/); packaging
    /// runs it.
    #[command(hide = true)]
    Manual {
        /// Where to write.
        dir: PathBuf,
    },
    /// List the kept versions of a module's paths (when each stopped being current, action,
    /// kind, size, where it is kept), oldest first. On the backup host: `--config
    /// receiver.toml MODULE [PATH]`, from the module's history journal (the receiver need not
    /// run). From a source host: `--config sender.toml --group NAME [PATH]`, asked of the
    /// group's receiver over a read session.
    History {
        /// receiver.toml or sender.toml.
        #[arg(long)]
        config: PathBuf,
        /// The sync group (with a sender.toml).
        #[arg(long)]
        group: Option<String>,
        /// Its ferry target to ask (default: its first).
        #[arg(long, requires = "group")]
        target: Option<String>,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
        /// MODULE [PATH] with a receiver.toml; [PATH] with a sender.toml.
        args: Vec<String>,
    },
    /// Bring a module (or some of its paths) back as it was at a time, into DEST. With a
    /// sender.toml and --group: from the group's target over the network. With a
    /// receiver.toml and --module: on the backup host, without a network. Either way only
    /// what differs from DEST is written (as deltas) and nothing in DEST is removed without
    /// --delete. Exit 0 when everything was restored, 1 when some paths were not, 2 when
    /// it could not start or stopped early (interrupted, DEST's disk full or read-only):
    /// what DEST holds then is whole, and running the same restore again sends the rest.
    Restore {
        /// sender.toml (with --group) or receiver.toml (with --module).
        #[arg(long)]
        config: PathBuf,
        /// The sync group (sender.toml).
        #[arg(long)]
        group: Option<String>,
        /// Its target (default: its first ferry target).
        #[arg(long, requires = "group")]
        target: Option<String>,
        /// The module (receiver.toml).
        #[arg(long, conflicts_with = "group")]
        module: Option<String>,
        /// When: RFC 3339 (2026-12-03T07:00:00Z) or an age (2h, "3 days ago"); default now.
        #[arg(long)]
        at: Option<String>,
        /// Only this path (and what is below it); repeatable.
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// Remove what DEST holds that was not there at that time (under the paths asked for).
        #[arg(long)]
        delete: bool,
        /// Make device nodes (as root; off by default, like rsync's --devices).
        #[arg(long)]
        devices: bool,
        /// Keep setuid and setgid bits and file capabilities (off by default: dropped).
        #[arg(long)]
        setuid: bool,
        /// List what would change (one line per step), change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where to write.
        dest: PathBuf,
    },
    /// Print each target receiver's counters (files, renames, deletes, ...) since it started.
    Stats {
        /// sender.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare trees: `verify LEFT RIGHT`, or `verify --config sender.toml` for every group.
    Verify {
        /// sender.toml: compare each source with its remote modules.
        #[arg(long, conflicts_with = "right")]
        config: Option<PathBuf>,
        /// Only this sync group.
        #[arg(long, requires = "config")]
        sync: Option<String>,
        /// With --config, --sync and one directory: compare it with the group's module as it
        /// was at this time (RFC 3339 or an age), entry by entry: kind, size, mtime, mode,
        /// owner (as root), attributes, hard links; what `restore --delete` would change.
        #[arg(long, requires_all = ["config", "sync", "left"])]
        at: Option<String>,
        /// Read every file instead of trusting cached digests.
        #[arg(long)]
        checksum: bool,
        /// Where local digest caches live (default: $XDG_CACHE_HOME/ferry or ~/.cache/ferry).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Leave out paths matching this rsync-style pattern, on both sides (repeatable; with
        /// --config each group's own excludes apply).
        #[arg(long = "exclude", value_name = "PATTERN", conflicts_with = "config")]
        excludes: Vec<String>,
        /// Source tree.
        left: Option<PathBuf>,
        /// Copy to check against it.
        right: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum Import {
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
    ferry_protocol::tune_allocator();
    ferry_protocol::raise_descriptor_limit();
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("ferry: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            errln!("ferry: {}", describe(&e));
            ExitCode::from(2)
        }
    };
    // Work still running on blocking threads (it was told to stop) must not hold the exit
    // past the units' stop timeouts (15 s receiver, 30 s sender).
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    code
}

/// An error and its causes, each said once: a cause whose text the message already holds
/// (most of ours carry their cause's words) is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        // A system error's own text ends in `(os error N)`, which the operator's words
        // above it leave out: it adds nothing when they already say the rest.
        let text = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => ferry_protocol::io_reason(io),
            None => cause.to_string(),
        };
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = std::env::var("FERRY_LOG").unwrap_or_else(|_| default.to_string());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(progress::LogWriter)
        .with_target(false)
        // A line that cannot be written (standard error gone: `2>&1 | head`) is dropped; the
        // default says so on standard error, which fails the same way and panics.
        .log_internal_errors(false);
    if service::stderr_is_journal() {
        // journald stamps every line itself and takes the priority from the prefix.
        logs.with_ansi(false)
            .without_time()
            .with_level(false)
            .event_format(service::JournalFormat::default())
            .init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Cancelled on the first SIGINT or SIGTERM; a second one exits at once (status 130). SIGHUP
/// never kills: it is logged and ignored (commands that reload use [`signals`]). The handlers
/// are in place when this returns.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    signals(None)
}

/// As [`shutdown_on_signals`], and each SIGHUP is passed to `reload` (several arriving
/// during one reload make one more).
pub(crate) fn signals(reload: Option<tokio::sync::mpsc::Sender<()>>) -> CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return token;
    };
    let t = token.clone();
    tokio::spawn(async move {
        loop {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    match &reload {
                        Some(tx) => { let _ = tx.try_send(()); }
                        None => tracing::warn!("SIGHUP ignored: this command does not reload"),
                    }
                    continue;
                }
            };
            if t.is_cancelled() {
                errln!("ferry: second {which}: exiting at once");
                std::process::exit(130);
            }
            tracing::info!("{which}: shutting down (again to exit at once)");
            service::stopping();
            t.cancel();
        }
    });
    token
}

/// A configuration file's top-level table: empty if it does not parse (its loader then says
/// where and why).
pub(crate) fn config_table(file: &std::path::Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), ferry_protocol::io_reason(&e)))?;
    Ok(toml::from_str(&text).unwrap_or_default())
}

/// A receiver.toml (`listen`, `[modules]`), not a sender.toml.
pub(crate) fn is_receiver(table: &toml::Table) -> bool {
    table.contains_key("listen") || table.contains_key("modules")
}

/// `n` and `what`, plural unless one (`1 target`, `2 targets`).
fn counted(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// `ferry check-config FILE`.
fn check_config(file: &std::path::Path) -> Result<u8> {
    let table = config_table(file)?;
    let has = |k: &str| table.contains_key(k);
    if is_receiver(&table) {
        let config = ferry_receiver::Config::load(file)?;
        config.identity()?;
        for m in config.modules.values() {
            // As the start would: history on the module's filesystem and mount, outside it.
            if let (Some(h), false) = (&m.history, m.read_only) {
                let dir = if h.dir.exists() {
                    h.dir.clone()
                } else {
                    h.dir.parent().unwrap_or(&h.dir).to_path_buf()
                };
                if let Err(why) = ferry_receiver::history::check_place(&m.path, &dir) {
                    bail!("{}: modules.{}.history: {why}", file.display(), m.name);
                }
            }
        }
        outln!(
            "{}: receiver configuration, {}: OK",
            file.display(),
            counted(config.modules.len(), "module")
        );
        for m in config.modules.values().filter(|m| m.clients.is_empty()) {
            outln!(
                "warning: modules.{}.clients is empty: no sender can use this module (list each \
                 sender's fingerprint, which `ferry keygen` prints)",
                m.name
            );
        }
    } else if has("sync") || has("targets") || table.is_empty() {
        // An empty table may be a syntax error: the sender's parser reports it with its line.
        let config = ferry_sender::Config::load(file)?;
        config.identity()?;
        outln!(
            "{}: sender configuration, {}, {}: OK",
            file.display(),
            counted(config.syncs.len(), "sync group"),
            counted(config.targets.len(), "target")
        );
        if let Some(dir) = config.state_dir.as_ref().filter(|d| !d.exists()) {
            outln!(
                "state_dir {} does not exist yet: `ferry send` makes it (0700)",
                dir.display()
            );
        }
    } else {
        bail!(
            "{}: neither a sender.toml ([targets.NAME], [[sync]]) nor a receiver.toml (listen, \
             [modules.NAME])",
            file.display()
        );
    }
    Ok(0)
}

async fn run(command: Command) -> Result<u8> {
    match command {
        Command::Keygen { dir, name } => {
            let id = Identity::generate_into(&dir, &name)?;
            outln!("{}", id.fingerprint());
            Ok(0)
        }
        Command::Fingerprint { cert } => {
            let certs = ferry_protocol::identity::load_certs(&cert)?;
            outln!("{}", ferry_protocol::fingerprint::of_der(&certs[0]));
            Ok(0)
        }
        Command::Receive { config } => receive::receive(&config).await,
        Command::Status {
            config,
            socket,
            json,
        } => status::status(config.as_deref(), socket, json).await,
        Command::ConfirmDeletes {
            group,
            config,
            socket,
        } => status::confirm_deletes(config.as_deref(), socket, &group).await,
        Command::Send {
            config,
            once,
            checksum,
            confirm_deletes,
        } => send::send(&config, once, checksum, &confirm_deletes).await,
        Command::Mirror {
            src,
            dst,
            once,
            confirm_deletes,
        } => mirror::mirror(&src, &dst, once, confirm_deletes).await,
        Command::Stats { config } => send::stats(&config).await,
        Command::Restore {
            config,
            group,
            target,
            module,
            at,
            paths,
            delete,
            devices,
            setuid,
            dry_run,
            dest,
        } => {
            let ask = restore::Ask {
                module,
                group,
                target,
                at,
                paths,
                delete,
                devices,
                setuid,
                dry_run,
                verify: false,
            };
            restore::restore(&config, &ask, &dest).await
        }
        Command::History {
            config,
            group,
            target,
            json,
            args,
        } => history::history(&config, &args, group.as_deref(), target.as_deref(), json).await,
        Command::CheckConfig { file } => check_config(&file),
        Command::Manual { dir } => manual::write(&dir, <Cli as clap::CommandFactory>::command()),
        Command::Import(what) => import::import(what),
        Command::Verify {
            config: Some(config),
            sync: Some(sync),
            at: Some(at),
            left: Some(left),
            ..
        } => {
            let ask = restore::Ask {
                group: Some(sync),
                at: Some(at),
                ..restore::Ask::verifying()
            };
            restore::restore(&config, &ask, &left).await
        }
        Command::Verify {
            config: Some(_),
            left: Some(left),
            ..
        } => bail!(
            "verify --config compares each group's source with its targets; to compare {} \
             with a module as it was, add --sync GROUP --at TIME",
            left.display()
        ),
        Command::Verify {
            config: Some(config),
            sync,
            checksum,
            ..
        } => verify::remote(&config, sync.as_deref(), checksum).await,
        Command::Verify {
            left: Some(left),
            right: Some(right),
            checksum,
            cache_dir,
            excludes,
            ..
        } => verify::local(&left, &right, &excludes, checksum, cache_dir).await,
        Command::Verify { .. } => {
            bail!("verify needs LEFT and RIGHT directories, or --config FILE")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_and_its_causes_are_each_said_once() {
        use ferry_protocol::connection::ConnError;
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let e = anyhow::Error::new(ferry_sender::session::SessionError::Conn {
            address: "127.0.0.1:18730".into(),
            source: ConnError::Io(refused),
        })
        .context("target b");
        assert_eq!(
            super::describe(&e),
            "target b: 127.0.0.1:18730: Connection refused"
        );
        // A cause the message does not already hold is said.
        let e = anyhow::anyhow!("disk gone").context("module m");
        assert_eq!(super::describe(&e), "module m: disk gone");
    }
}
