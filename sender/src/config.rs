//! `sender.toml`: raw TOML structs, then validation into one typed [`Config`].

use crate::coalesce::Timing;
use crate::filter::{Filter, FilterError};
pub use crate::guard::DeleteGuard;

mod preserve;
use ferry_protocol::Fingerprint;
pub use preserve::Preserve;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ferry_protocol::config_text::ConfigError;
use ferry_protocol::config_text::OneOrMore;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cert: PathBuf,
    key: PathBuf,
    state_dir: Option<PathBuf>,
    status_socket: Option<PathBuf>,
    metrics_listen: Option<String>,
    #[serde(default)]
    watcher: WatcherChoice,
    #[serde(default)]
    targets: BTreeMap<String, RawTarget>,
    #[serde(default)]
    sync: Vec<RawSync>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    #[serde(default)]
    kind: RawKind,
    /// `"HOST:PORT"`, or a list of gateways to the same module.
    address: OneOrMore,
    fingerprint: Option<String>,
    // kind = "rsync"
    user: Option<String>,
    password_file: Option<PathBuf>,
    rsync_path: Option<PathBuf>,
    #[serde(default)]
    rsync_args: Vec<String>,
    #[serde(default)]
    compress: bool,
    bwlimit_kib: Option<u64>,
    timeout_s: Option<u64>,
    transport: Option<RawTransport>,
    rsh: Option<String>,
}

/// `kind = "ferry" | "rsync"`.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    #[default]
    Ferry,
    Rsync,
}

/// `transport = "daemon" | "ssh"` (rsync targets; daemon when not given).
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawTransport {
    Daemon,
    Ssh,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    name: Option<String>,
    source: PathBuf,
    targets: Vec<String>,
    module: String,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default = "default_true")]
    delete: bool,
    settle_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    delete_guard_percent: Option<u8>,
    delete_guard_min: Option<u64>,
    preserve: Option<Vec<String>>,
}

fn default_true() -> bool {
    true
}

/// rsync refuses a password file others can read; say so before it does, naming the file.
fn check_password_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is mode {mode:04o}; it must be 0600 (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// The first rsync-only key set on a target, if any.
fn rsync_only_key(t: &RawTarget) -> Option<&'static str> {
    [
        ("user", t.user.is_some()),
        ("password_file", t.password_file.is_some()),
        ("rsync_path", t.rsync_path.is_some()),
        ("rsync_args", !t.rsync_args.is_empty()),
        ("timeout_s", t.timeout_s.is_some()),
        ("transport", t.transport.is_some()),
        ("rsh", t.rsh.is_some()),
    ]
    .into_iter()
    .find(|(_, set)| *set)
    .map(|(k, _)| k)
}

/// A validated sender configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (named in errors).
    pub file: PathBuf,
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Private key PEM file.
    pub key: PathBuf,
    /// Where the sender keeps state (digest caches).
    pub state_dir: Option<PathBuf>,
    /// The local socket `ferry status` asks (default [`DEFAULT_STATUS_SOCKET`]).
    pub status_socket: PathBuf,
    /// Where Prometheus metrics are served over plain HTTP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Which kernel interface watches the sources.
    pub watcher: WatcherChoice,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Sync groups, in file order.
    pub syncs: Vec<SyncGroup>,
}

/// A receiver to push to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Name in the configuration.
    pub name: String,
    /// `host:port`: the receiver, or the first of its gateways.
    pub address: String,
    /// The other gateways to the same module (`address = [...]`), tried in order after
    /// `address` when it cannot take a session.
    pub more_addresses: Vec<String>,
    /// What runs there.
    pub kind: TargetKind,
}

/// What kind of receiver a target is.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    /// A ferry receiver, its certificate pinned.
    Ferry {
        /// Pinned receiver certificate.
        fingerprint: Fingerprint,
        /// Pack file bodies with zstd (`compress = true`): pays on slow links and compressible
        /// data; frames that would not shrink go as they are.
        compress: bool,
        /// What every session to this target may send together, in KiB/s (`bwlimit_kib`;
        /// `None`: no cap).
        bwlimit_kib: Option<u64>,
    },
    /// A stock rsyncd, driven through the `rsync` client.
    Rsync(RsyncTarget),
}

/// How to reach an rsyncd module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsyncTarget {
    /// rsyncd user (`auth users`), if the module needs one.
    pub user: Option<String>,
    /// Passed as `--password-file`; must not be readable by group or others.
    pub password_file: Option<PathBuf>,
    /// The client binary (default `rsync`, looked up in `PATH`).
    pub rsync_path: PathBuf,
    /// Extra arguments, appended as given.
    pub args: Vec<String>,
    /// I/O and connect timeout in seconds (`--timeout`, `--contimeout`).
    pub timeout_s: u64,
    /// `Some(remote shell)` to run rsync over ssh (`-e`, `user@host:/path`) instead of
    /// talking to an rsyncd; the group's `module` is then the destination path.
    pub rsh: Option<String>,
}

/// `watcher = "auto" | "fanotify" | "inotify"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatcherChoice {
    /// fanotify when this process may use it, else inotify (the default).
    #[default]
    Auto,
    /// fanotify, or refuse to start.
    Fanotify,
    /// inotify.
    Inotify,
}

/// Where the daemon answers `ferry status` unless `status_socket` says otherwise (the unit's
/// `RuntimeDirectory`).
pub const DEFAULT_STATUS_SOCKET: &str = "/run/ferry/sender.sock";

/// Default rsync I/O timeout.
pub const RSYNC_TIMEOUT_S: u64 = 60;

impl Target {
    /// The pinned certificate of a ferry receiver.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        match &self.kind {
            TargetKind::Ferry { fingerprint, .. } => Some(*fingerprint),
            TargetKind::Rsync(_) => None,
        }
    }
}

/// A source directory kept equal to a module on one or more targets.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncGroup {
    /// Group name (defaults to the module name).
    pub name: String,
    /// Source directory.
    pub source: PathBuf,
    /// Target names.
    pub targets: Vec<String>,
    /// Module on each target.
    pub module: String,
    /// Exclude patterns.
    pub filter: Filter,
    /// Propagate deletions.
    pub delete: bool,
    /// When written files are sent (see [`Timing`]).
    pub timing: Timing,
    /// When a whole-tree compare may not delete without an operator's confirmation.
    pub guard: DeleteGuard,
    /// What is kept beyond `rsync -a`.
    pub preserve: Preserve,
}

impl Config {
    /// Reads and validates `file`; relative paths resolve against its directory.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, ferry_protocol::io_reason(&e)))?;
        let config = Config::parse(&text, file)?;
        config
            .check_files()
            .map_err(|message| ConfigError::at(file, &text, message))?;
        Ok(config)
    }

    /// Loads the identity that `cert` and `key` name; errors say which file and key.
    pub fn identity(
        &self,
    ) -> Result<ferry_protocol::identity::Identity, ferry_protocol::identity::IdentityError> {
        ferry_protocol::identity::Identity::load_configured(&self.file, &self.cert, &self.key)
    }

    /// Checks what the configuration names on disk (sources, rsync password files), as a
    /// start-up would: [`Config::parse`] alone reads nothing but the text.
    pub fn check_files(&self) -> Result<(), String> {
        for (i, g) in self.syncs.iter().enumerate() {
            match std::fs::metadata(&g.source) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "sync[{i}] ({}).source: {} is not a directory",
                        g.name,
                        g.source.display()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "sync[{i}] ({}).source: {}: {}",
                        g.name,
                        g.source.display(),
                        ferry_protocol::io_reason(&e)
                    ))
                }
            }
        }
        if let Some(dir) = &self.state_dir {
            match std::fs::metadata(dir) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(format!("state_dir: {} is not a directory", dir.display())),
                // Made at start (`Config::make_state_dir`) where its parent is a directory.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let parent = dir.parent().unwrap_or(Path::new("/"));
                    if !parent.is_dir() {
                        return Err(format!(
                            "state_dir: {} does not exist, nor does {}",
                            dir.display(),
                            parent.display()
                        ));
                    }
                }
                Err(e) => {
                    let why = ferry_protocol::io_reason(&e);
                    return Err(format!("state_dir: {}: {why}", dir.display()));
                }
            }
        }
        for (name, t) in &self.targets {
            if let TargetKind::Rsync(RsyncTarget {
                password_file: Some(pf),
                ..
            }) = &t.kind
            {
                check_password_file(pf)
                    .map_err(|e| format!("targets.{name}.password_file: {e}"))?;
            }
        }
        Ok(())
    }

    /// Makes `state_dir` (0700: it records the sources' filesystems and digests) if it is
    /// missing; true if it was made. Its parent must exist ([`Config::check_files`]).
    pub fn make_state_dir(&self) -> Result<bool, ConfigError> {
        let Some(dir) = &self.state_dir else {
            return Ok(false);
        };
        if dir.is_dir() {
            return Ok(false);
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map(|()| true)
            .map_err(|e| {
                let why = ferry_protocol::io_reason(&e);
                ConfigError::new(&self.file, format!("state_dir: {}: {why}", dir.display()))
            })
    }

    /// Parses and validates `text` as if read from `file`; reads nothing else. Each section
    /// is built by its own constructor (`Target::from_raw`, `SyncGroup::from_raw`), which
    /// names the key; the error gets the file and line here.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError::at(file, text, message);
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::syntax(file, text, &e))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let mut targets = BTreeMap::new();
        for (name, t) in raw.targets {
            let target = Target::from_raw(name.clone(), t, &resolve).map_err(err)?;
            targets.insert(name, target);
        }
        let state_dir = raw.state_dir.map(resolve);
        let metrics_listen = ferry_protocol::config_text::optional_socket_address(
            "metrics_listen",
            raw.metrics_listen.as_deref(),
        )
        .map_err(err)?;
        let status_socket = raw
            .status_socket
            .map_or_else(|| DEFAULT_STATUS_SOCKET.into(), resolve);
        let mut syncs: Vec<SyncGroup> = Vec::new();
        for (i, s) in raw.sync.into_iter().enumerate() {
            let group =
                SyncGroup::from_raw(i, s, &targets, state_dir.as_deref(), &resolve).map_err(err)?;
            if syncs.iter().any(|g| g.name == group.name) {
                let name = &group.name;
                return Err(err(format!(
                    "sync[{i}] ({name}).name: duplicate sync name {name:?}"
                )));
            }
            syncs.push(group);
        }
        Ok(Config {
            file: file.to_path_buf(),
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            state_dir,
            status_socket,
            metrics_listen,
            watcher: raw.watcher,
            targets,
            syncs,
        })
    }
}

impl Target {
    /// `[targets.NAME]`, validated; the error names the key (`targets.NAME.KEY: …`).
    fn from_raw(
        name: String,
        mut t: RawTarget,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Result<Target, String> {
        let key = |k: &str| format!("targets.{name}.{k}");
        let addresses = std::mem::take(&mut t.address.0);
        match (addresses.len(), t.kind) {
            (0, _) => return Err(format!("{}: an empty list", key("address"))),
            (1, _) | (_, RawKind::Ferry) => {}
            (_, RawKind::Rsync) => {
                return Err(format!(
                    "{}: several addresses (gateways) are for ferry targets only",
                    key("address")
                ))
            }
        }
        for (i, a) in addresses.iter().enumerate() {
            if addresses[..i].contains(a) {
                return Err(format!("{}: {a:?} twice", key("address")));
            }
        }
        let kind = match t.kind {
            RawKind::Ferry => {
                if let Some(k) = rsync_only_key(&t) {
                    return Err(format!("{}: only for kind = \"rsync\"", key(k)));
                }
                let fp = t
                    .fingerprint
                    .as_deref()
                    .ok_or_else(|| format!("{}: required", key("fingerprint")))?;
                let fingerprint = fp
                    .parse()
                    .map_err(|e| format!("{}: {e}", key("fingerprint")))?;
                if let Some(a) = addresses.iter().find(|a| !a.contains(':')) {
                    return Err(format!(
                        "{}: {a:?} needs a port, e.g. {a}:8730",
                        key("address")
                    ));
                }
                TargetKind::Ferry {
                    fingerprint,
                    compress: t.compress,
                    // As rsync's `--bwlimit=0`: no cap.
                    bwlimit_kib: t.bwlimit_kib.filter(|&kib| kib > 0),
                }
            }
            RawKind::Rsync => TargetKind::Rsync(RsyncTarget::from_raw(&t, &key, resolve)?),
        };
        let mut addresses = addresses.into_iter();
        let first = addresses.next().unwrap_or_default();
        let more_addresses: Vec<String> = addresses.collect();
        let address = match &kind {
            // rsyncd's port is optional, as in rsync://host/module.
            TargetKind::Rsync(r) if r.rsh.is_none() && !first.contains(':') => {
                format!("{first}:873")
            }
            _ => first,
        };
        Ok(Target {
            name,
            address,
            more_addresses,
            kind,
        })
    }
}

impl RsyncTarget {
    /// The rsync side of a `[targets.NAME]` with `kind = "rsync"`.
    fn from_raw(
        t: &RawTarget,
        key: &dyn Fn(&str) -> String,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Result<RsyncTarget, String> {
        if t.fingerprint.is_some() {
            return Err(format!(
                "{}: an rsyncd has no certificate; remove it",
                key("fingerprint")
            ));
        }
        let mut args = t.rsync_args.clone();
        if t.compress {
            args.push("--compress".into());
        }
        if let Some(kib) = t.bwlimit_kib {
            args.push(format!("--bwlimit={kib}"));
        }
        let rsh = match (t.transport.unwrap_or(RawTransport::Daemon), &t.rsh) {
            (RawTransport::Daemon, None) => None,
            (RawTransport::Daemon, Some(_)) => {
                return Err(format!("{}: only with transport = \"ssh\"", key("rsh")))
            }
            (RawTransport::Ssh, rsh) => Some(rsh.clone().unwrap_or_else(|| "ssh".into())),
        };
        if rsh.is_some() && t.password_file.is_some() {
            return Err(format!(
                "{}: rsync over ssh authenticates with ssh keys, not a password file",
                key("password_file")
            ));
        }
        Ok(RsyncTarget {
            user: t.user.clone(),
            password_file: t.password_file.clone().map(resolve),
            rsync_path: t.rsync_path.clone().unwrap_or_else(|| "rsync".into()),
            args,
            timeout_s: t.timeout_s.unwrap_or(RSYNC_TIMEOUT_S),
            rsh,
        })
    }
}

impl SyncGroup {
    /// A group `name` pushing `source` to `module` on `targets`, with every default: no
    /// excludes, deletions propagated, the default [`Timing`], guard and [`Preserve`].
    pub fn new(name: &str, source: PathBuf, targets: Vec<String>, module: &str) -> SyncGroup {
        SyncGroup {
            name: name.to_string(),
            source,
            targets,
            module: module.to_string(),
            filter: Filter::empty(),
            delete: true,
            timing: Timing::default(),
            guard: DeleteGuard::default(),
            preserve: Preserve::default(),
        }
    }

    /// The `i`-th `[[sync]]`, validated against the configured `targets`; the error names
    /// the key (`sync[i] (NAME).KEY: …`).
    fn from_raw(
        i: usize,
        s: RawSync,
        targets: &BTreeMap<String, Target>,
        state_dir: Option<&Path>,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Result<SyncGroup, String> {
        let name = s.name.clone().unwrap_or_else(|| s.module.clone());
        let key = |k: &str| format!("sync[{i}] ({name}).{k}");
        if s.targets.is_empty() {
            return Err(format!(
                "{}: at least one target is required",
                key("targets")
            ));
        }
        if let Some(t) = s.targets.iter().find(|t| !targets.contains_key(*t)) {
            return Err(format!("{}: unknown target {t:?}", key("targets")));
        }
        let filter =
            Filter::new(&s.exclude).map_err(|e: FilterError| format!("{}: {e}", key("exclude")))?;
        let mut timing = Timing::default();
        if let Some(ms) = s.settle_ms {
            timing.settle = Duration::from_millis(ms);
        }
        if let Some(ms) = s.max_delay_ms {
            timing.max_delay = Duration::from_millis(ms);
        }
        if timing.max_delay < timing.settle {
            return Err(format!(
                "{}: must not be shorter than settle_ms ({} ms)",
                key("max_delay_ms"),
                timing.settle.as_millis()
            ));
        }
        let defaults = DeleteGuard::default();
        let guard = DeleteGuard {
            percent: s.delete_guard_percent.unwrap_or(defaults.percent),
            min: s.delete_guard_min.unwrap_or(defaults.min),
            confirmed: false,
            record: state_dir.map(|d| d.join(format!("{name}.source-device"))),
            release: None,
        };
        if guard.percent > 100 {
            return Err(format!(
                "{}: a percentage, 0 (off) to 100",
                key("delete_guard_percent")
            ));
        }
        let preserve = match &s.preserve {
            None => Preserve::default(),
            Some(items) => {
                Preserve::parse(items).map_err(|e| format!("{}: {e}", key("preserve")))?
            }
        };
        Ok(SyncGroup {
            filter,
            delete: s.delete,
            timing,
            guard,
            preserve,
            ..SyncGroup::new(&name, resolve(s.source), s.targets, &s.module)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::xattr::Namespaces;

    const GOOD: &str = r#"
cert = "cert.pem"
key = "key.pem"
state_dir = "/var/lib/ferry"
[targets.backup]
address = "192.168.74.20:8730"
fingerprint = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
[[sync]]
source = "/file"
targets = ["backup"]
module = "file"
exclude = ["tmp/", "*.log"]
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(GOOD, Path::new("/etc/ferry/sender.toml")).unwrap();
        assert_eq!(c.cert, PathBuf::from("/etc/ferry/cert.pem"));
        assert_eq!(c.watcher, WatcherChoice::Auto);
        assert_eq!(c.status_socket, PathBuf::from(DEFAULT_STATUS_SOCKET));
        assert_eq!(c.metrics_listen, None);
        let g = &c.syncs[0];
        assert_eq!(g.name, "file");
        assert!(g.delete);
        assert_eq!(g.targets, vec!["backup".to_string()]);
        assert_eq!(g.preserve.namespaces(), Namespaces::ALL);
        assert!(g.preserve.hardlinks && g.preserve.sparse);
        let acls_only = GOOD.replace(
            "module = \"file\"",
            "module = \"file\"\npreserve = [\"acls\"]",
        );
        let c2 = Config::parse(&acls_only, Path::new("/etc/ferry/sender.toml")).unwrap();
        let p = c2.syncs[0].preserve;
        assert_eq!(p.namespaces(), Namespaces::ACL);
        assert!(!p.hardlinks && !p.sparse && !p.xattrs);
        assert!(matches!(
            c.targets["backup"].kind,
            TargetKind::Ferry {
                compress: false,
                ..
            }
        ));
        let two = GOOD.replace(
            "\"192.168.74.20:8730\"",
            r#"["10.0.0.2:8730", "10.0.0.3:8730"]"#,
        );
        let c = Config::parse(&two, Path::new("/etc/ferry/sender.toml")).unwrap();
        let t = &c.targets["backup"];
        assert_eq!(t.address, "10.0.0.2:8730");
        assert_eq!(t.more_addresses, ["10.0.0.3:8730"]);
        assert_eq!(
            t.addresses().collect::<Vec<_>>(),
            ["10.0.0.2:8730", "10.0.0.3:8730"]
        );
        let packed = GOOD.replace("fingerprint =", "compress = true\nfingerprint =");
        let c = Config::parse(&packed, Path::new("/etc/ferry/sender.toml")).unwrap();
        assert!(matches!(
            c.targets["backup"].kind,
            TargetKind::Ferry { compress: true, .. }
        ));
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            (
                GOOD.replace("targets = [\"backup\"]", "targets = [\"nope\"]"),
                10,
                "unknown target \"nope\"",
            ),
            (
                GOOD.replace("module = \"file\"", "module = \"file\"\ncolour = 1"),
                12,
                "colour",
            ),
            (
                GOOD.replace("192.168.74.20:8730", "192.168.74.20"),
                6,
                "targets.backup.address",
            ),
            (
                GOOD.replace("sha256:0000", "sha1:0000"),
                7,
                "targets.backup.fingerprint",
            ),
            (
                format!(
                    "{GOOD}[[sync]]\nsource = \"/x\"\ntargets = [\"backup\"]\nmodule = \"file\"\n"
                ),
                13,
                "duplicate sync name",
            ),
            (GOOD.replace("\"*.log\"", "\"[\""), 12, "exclude"),
            (
                GOOD.replace(
                    "module = \"file\"",
                    "module = \"file\"\nsettle_ms = 500\nmax_delay_ms = 100",
                ),
                13,
                "max_delay_ms: must not be shorter",
            ),
            (
                GOOD.replace(
                    "module = \"file\"",
                    "module = \"file\"\npreserve = [\"xattrs\", \"acl\"]",
                ),
                12,
                "preserve: unknown item \"acl\"",
            ),
            (
                GOOD.replace("state_dir", "watcher = \"dnotify\"\nstate_dir"),
                4,
                "unknown variant `dnotify`, expected one of `auto`, `fanotify`, `inotify`",
            ),
            (
                GOOD.replace("fingerprint =", "kind = \"rsyn\"\nfingerprint ="),
                7,
                "unknown variant `rsyn`, expected `ferry` or `rsync`, in `kind = \"rsyn\"`",
            ),
            (
                GOOD.replace("state_dir", "metrics_listen = \"localhost\"\nstate_dir"),
                4,
                "metrics_listen: invalid address",
            ),
            (
                GOOD.replace("\"192.168.74.20:8730\"", r#"["a:8730", "a:8730"]"#),
                6,
                "targets.backup.address: \"a:8730\" twice",
            ),
            (
                GOOD.replace("\"192.168.74.20:8730\"", r#"["a:8730", "b"]"#),
                6,
                "targets.backup.address: \"b\" needs a port",
            ),
            (
                GOOD.replace("\"192.168.74.20:8730\"", "[]"),
                6,
                "targets.backup.address: an empty list",
            ),
            (
                GOOD.replace("\"192.168.74.20:8730\"", r#"["a:873", "b:873"]"#)
                    .replace("fingerprint =", "kind = \"rsync\"\nfingerprint ="),
                6,
                "several addresses (gateways) are for ferry targets only",
            ),
            (
                GOOD.replace("\"192.168.74.20:8730\"", "8730"),
                6,
                "expected a string or a list of strings",
            ),
        ];
        for (text, line, needle) in cases {
            let e = Config::parse(&text, Path::new("/etc/ferry/sender.toml"))
                .unwrap_err()
                .to_string();
            let at = format!("/etc/ferry/sender.toml:{line}: ");
            assert!(e.starts_with(&at), "{e} should start with {at}");
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn the_delete_guard_objects_to_wiping_not_to_pruning() {
        let g = DeleteGuard::default();
        assert!(g.objection(0, 10_000, true).is_none(), "nothing to delete");
        assert!(g
            .objection(10_000, 10_000, true)
            .unwrap()
            .contains("source is empty"));
        assert!(
            g.objection(5, 10, true).is_some(),
            "empty source: whatever the size"
        );
        assert!(g.objection(999, 1000, false).is_none(), "under the minimum");
        assert!(g.objection(6000, 10_000, false).is_some());
        assert!(
            g.objection(4000, 10_000, false).is_none(),
            "under the share"
        );
        let off = DeleteGuard {
            percent: 0,
            ..g.clone()
        };
        assert!(off.objection(10_000, 10_000, true).is_none());
        let ok = DeleteGuard {
            confirmed: true,
            ..g
        };
        assert!(ok.objection(10_000, 10_000, true).is_none());
    }

    /// `ferry-sender.toml(5)` describes every key the parser accepts and no other; its
    /// examples parse, its defaults are what leaving a key out gives, its required keys are.
    #[test]
    fn the_configuration_reference_lists_every_key() {
        use ferry_protocol::config_reference::At;
        let mut tracer = serde_reflection::Tracer::new(Default::default());
        tracer.trace_simple_type::<RawKind>().unwrap();
        tracer.trace_simple_type::<RawTransport>().unwrap();
        tracer.trace_simple_type::<WatcherChoice>().unwrap();
        let tables = [
            (At::Root, "RawConfig"),
            (At::Map("targets"), "RawTarget"),
            (At::List("sync"), "RawSync"),
        ];
        let parse = |text: &str| {
            let config = Config::parse(text, Path::new("/etc/ferry/sender.toml"));
            config.map(|c| format!("{c:?}")).map_err(|e| e.to_string())
        };
        crate::config_reference::reference().assert_holds::<RawConfig>(tracer, &tables, &parse);
    }
}
