//! `receiver.toml`: raw TOML structs, then validation into [`Config`].

use crate::history::Keep;
use crate::hosts::HostPattern;
use ferry_protocol::Fingerprint;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use ferry_protocol::config_text::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    state_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    gateway: Option<String>,
    #[serde(default)]
    modules: BTreeMap<String, RawModule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    path: PathBuf,
    #[serde(default)]
    clients: Vec<String>,
    restore_clients: Option<Vec<String>>,
    #[serde(default)]
    hosts_allow: Option<Vec<String>>,
    #[serde(default = "default_true")]
    read_only: bool,
    max_connections: Option<usize>,
    comment: Option<String>,
    #[serde(default)]
    devices: bool,
    #[serde(default)]
    setuid: bool,
    owner: Option<String>,
    history: Option<PathBuf>,
    keep: Option<Vec<String>>,
    history_floor: Option<String>,
    min_free_percent: Option<u8>,
    lease: Option<PathBuf>,
    lease_seconds: Option<u64>,
}

fn default_true() -> bool {
    true
}

/// A validated receiver configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (named in errors).
    pub file: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Private key PEM file.
    pub key: PathBuf,
    /// Where digest caches are kept, if anywhere.
    pub state_dir: Option<PathBuf>,
    /// Where Prometheus metrics are served over plain HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// This receiver's name as a gateway (`gateway`; default: the host's name and the listen
    /// port), said in write leases and refusals.
    pub gateway: String,
    /// Modules by name.
    pub modules: BTreeMap<String, Module>,
}

/// One module: a directory tree peers may write into.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Module name.
    pub name: String,
    /// Root directory.
    pub path: PathBuf,
    /// Sender fingerprints allowed in.
    pub clients: Vec<Fingerprint>,
    /// Fingerprints allowed to restore from the module (`restore_clients`; default: `clients`).
    pub restore_clients: Vec<Fingerprint>,
    /// Allowed peer addresses; `None` means any.
    pub hosts_allow: Option<Vec<HostPattern>>,
    /// Refuse writes.
    pub read_only: bool,
    /// Concurrent sessions allowed.
    pub max_connections: Option<usize>,
    /// Free text.
    pub comment: Option<String>,
    /// Device nodes may be created (default false: a sender could make `/dev/mem`).
    pub devices: bool,
    /// setuid and setgid bits are kept (default false: they are dropped on the receiver).
    pub setuid: bool,
    /// Whose files they are on the receiver.
    pub owner: Owner,
    /// Where superseded states are kept, and for how long; `None`: the module is a mirror.
    pub history: Option<HistoryConfig>,
    /// The write lease of a module served by several gateways on a shared filesystem.
    pub lease: Option<LeaseConfig>,
}

/// A module's `lease` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// The lease file, on the shared filesystem, outside the module.
    pub path: PathBuf,
    /// How long a lease goes unrenewed before another gateway may take it.
    pub expiry: std::time::Duration,
    /// This receiver's gateway name.
    pub gateway: String,
}

/// Default expiry of a write lease.
pub const LEASE_SECONDS: u64 = 10;

/// A module's `history` and retention keys.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryConfig {
    /// The history directory (same filesystem as the module, outside it).
    pub dir: PathBuf,
    /// Retention.
    pub keep: Keep,
}

/// Owners of what a module receives (rsyncd's `uid`/`gid`); applied by a root receiver only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Owner {
    /// As on the source (`"preserve"`, the default).
    #[default]
    Preserve,
    /// The receiver's own user (`"receiver"`).
    Receiver,
    /// These numeric ids (`"UID:GID"`).
    Fixed(u32, u32),
}

impl std::str::FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Owner, String> {
        match s {
            "preserve" => Ok(Owner::Preserve),
            "receiver" => Ok(Owner::Receiver),
            _ => {
                let (u, g) = s
                    .split_once(':')
                    .ok_or(())
                    .and_then(|(u, g)| Ok((u.parse().map_err(|_| ())?, g.parse().map_err(|_| ())?)))
                    .map_err(|()| {
                        format!(
                            "{s:?}: expected \"preserve\", \"receiver\" or \"UID:GID\" (numbers)"
                        )
                    })?;
                Ok(Owner::Fixed(u, g))
            }
        }
    }
}

impl Config {
    /// Loads the identity that `cert` and `key` name; errors say which file and key.
    pub fn identity(
        &self,
    ) -> Result<ferry_protocol::identity::Identity, ferry_protocol::identity::IdentityError> {
        ferry_protocol::identity::Identity::load_configured(&self.file, &self.cert, &self.key)
    }

    /// Reads and validates `file`; relative paths resolve against its directory.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(file, ferry_protocol::io_reason(&e)))?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text` as if read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError::at(file, text, message);
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::syntax(file, text, &e))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let listen =
            ferry_protocol::config_text::socket_address("listen", &raw.listen).map_err(err)?;
        let metrics_listen = ferry_protocol::config_text::optional_socket_address(
            "metrics_listen",
            raw.metrics_listen.as_deref(),
        )
        .map_err(err)?;
        let gateway = match raw.gateway {
            Some(g) if g.is_empty() || g.contains(char::is_whitespace) => {
                return Err(err(format!("gateway: {g:?}: a name without spaces")))
            }
            Some(g) => g,
            None => format!("{}:{}", host_name(), listen.port()),
        };
        let mut modules = BTreeMap::new();
        for (name, m) in raw.modules {
            let key = |k: &str| format!("modules.{name}.{k}");
            if name.is_empty() || name.contains('/') {
                return Err(err(format!("modules.{name}: invalid module name")));
            }
            let pins = |k: &str, list: &[String]| {
                list.iter()
                    .map(|c| {
                        c.parse::<Fingerprint>()
                            .map_err(|e| err(format!("{}: {e}", key(k))))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let clients = pins("clients", &m.clients)?;
            let restore_clients = match &m.restore_clients {
                Some(list) => pins("restore_clients", list)?,
                None => clients.clone(),
            };
            let hosts_allow = m
                .hosts_allow
                .map(|list| {
                    list.iter()
                        .map(|h| {
                            h.parse::<HostPattern>()
                                .map_err(|e| err(format!("{}: {e}", key("hosts_allow"))))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let owner = match &m.owner {
                None => Owner::Preserve,
                Some(o) => o
                    .parse()
                    .map_err(|e: String| err(format!("{}: {e}", key("owner"))))?,
            };
            if m.max_connections == Some(0) {
                return Err(err(format!(
                    "{}: must be at least 1",
                    key("max_connections")
                )));
            }
            let history = match m.history {
                None => {
                    let stray = [
                        ("keep", m.keep.is_some()),
                        ("history_floor", m.history_floor.is_some()),
                        ("min_free_percent", m.min_free_percent.is_some()),
                    ];
                    if let Some((k, _)) = stray.iter().find(|(_, set)| *set) {
                        return Err(err(format!(
                            "{}: retention without history (set {} too)",
                            key(k),
                            key("history")
                        )));
                    }
                    None
                }
                Some(dir) => {
                    let mut keep = Keep::default();
                    if let Some(rules) = &m.keep {
                        keep.rules = rules
                            .iter()
                            .map(|r| {
                                r.parse()
                                    .map_err(|e: String| err(format!("{}: {e}", key("keep"))))
                            })
                            .collect::<Result<_, _>>()?;
                        if keep.rules.is_empty() {
                            return Err(err(format!(
                                "{}: keeps nothing (leave history out for a mirror)",
                                key("keep")
                            )));
                        }
                    }
                    if let Some(f) = &m.history_floor {
                        keep.floor = humantime::parse_duration(f)
                            .map_err(|e| err(format!("{}: {f:?}: {e}", key("history_floor"))))?;
                    }
                    if let Some(p) = m.min_free_percent {
                        if p > 90 {
                            return Err(err(format!(
                                "{}: {p}: at most 90",
                                key("min_free_percent")
                            )));
                        }
                        keep.min_free_percent = p;
                    }
                    Some(HistoryConfig {
                        dir: resolve(dir),
                        keep,
                    })
                }
            };
            let lease = match (m.lease, m.lease_seconds) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(err(format!(
                        "{}: without a lease (set {} too)",
                        key("lease_seconds"),
                        key("lease")
                    )))
                }
                (Some(path), seconds) => {
                    let seconds = seconds.unwrap_or(LEASE_SECONDS);
                    if !(3..=600).contains(&seconds) {
                        return Err(err(format!(
                            "{}: {seconds}: between 3 and 600",
                            key("lease_seconds")
                        )));
                    }
                    let path = resolve(path);
                    let module_path = resolve(m.path.clone());
                    if path.starts_with(&module_path) {
                        return Err(err(format!(
                            "{}: {} is inside the module; put it beside it",
                            key("lease"),
                            path.display()
                        )));
                    }
                    Some(LeaseConfig {
                        path,
                        expiry: std::time::Duration::from_secs(seconds),
                        gateway: gateway.clone(),
                    })
                }
            };
            modules.insert(
                name.clone(),
                Module {
                    name: name.clone(),
                    path: resolve(m.path),
                    clients,
                    restore_clients,
                    hosts_allow,
                    read_only: m.read_only,
                    max_connections: m.max_connections,
                    comment: m.comment,
                    devices: m.devices,
                    setuid: m.setuid,
                    owner,
                    history,
                    lease,
                },
            );
        }
        Ok(Config {
            file: file.to_path_buf(),
            listen,
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            state_dir: raw.state_dir.map(resolve),
            metrics_listen,
            gateway,
            modules,
        })
    }
}

/// This host's name, as the kernel has it.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "receiver".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8730"
cert = "cert.pem"
key = "/etc/ferry/key.pem"
[modules.file]
path = "data/file"
clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
hosts_allow = ["10.255.50.63", "10.255.60.0/24"]
read_only = false
max_connections = 200
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/ferry/receiver.toml")).unwrap();
        assert_eq!(c.cert, PathBuf::from("/etc/ferry/cert.pem"));
        assert_eq!(c.key, PathBuf::from("/etc/ferry/key.pem"));
        let m = &c.modules["file"];
        assert_eq!(m.path, PathBuf::from("/etc/ferry/data/file"));
        assert!(!m.read_only);
        assert_eq!(m.max_connections, Some(200));
        assert_eq!(m.hosts_allow.as_ref().unwrap().len(), 2);
        assert_eq!(m.lease, None);
        assert!(c.gateway.ends_with(":8730"), "{}", c.gateway);
        let leased = format!("{GOOD}lease = \"../leases/file\"\n");
        let c = Config::parse(&leased, Path::new("/etc/ferry/receiver.toml")).unwrap();
        let lease = c.modules["file"].lease.clone().unwrap();
        assert_eq!(lease.path, PathBuf::from("/etc/ferry/../leases/file"));
        assert_eq!(lease.expiry, std::time::Duration::from_secs(LEASE_SECONDS));
        assert_eq!(lease.gateway, c.gateway);
        let both = format!("{GOOD}lease = \"../leases/file\"\nhistory = \"../history/file\"\n");
        let c = Config::parse(&both, Path::new("/etc/ferry/receiver.toml")).unwrap();
        assert!(c.modules["file"].lease.is_some() && c.modules["file"].history.is_some());
    }

    #[test]
    fn read_only_defaults_to_true() {
        let text =
            "listen = \"127.0.0.1:1\"\ncert = \"c\"\nkey = \"k\"\n[modules.m]\npath = \"/x\"\n";
        assert!(Config::parse(text, Path::new("r.toml")).unwrap().modules["m"].read_only);
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            (GOOD.replace("read_only", "readonly"), 9, "readonly"),
            (
                GOOD.replace("sha256:0000", "sha256:zz00"),
                7,
                "modules.file.clients",
            ),
            (
                GOOD.replace("10.255.60.0/24", "10.255.60.0/99"),
                8,
                "modules.file.hosts_allow",
            ),
            (GOOD.replace("127.0.0.1:8730", "nowhere"), 2, "listen"),
            (
                format!("{GOOD}\n[modules.file]\npath = \"/y\"\n"),
                12,
                "duplicate key: `[modules.file]`",
            ),
            (
                format!("{GOOD}lease_seconds = 5\n"),
                11,
                "modules.file.lease_seconds: without a lease",
            ),
            (
                format!("{GOOD}lease = \"data/file/.lease\"\n"),
                11,
                "modules.file.lease: /etc/ferry/data/file/.lease is inside the module",
            ),
            (
                format!("{GOOD}lease = \"l\"\nlease_seconds = 1\n"),
                12,
                "modules.file.lease_seconds: 1: between 3 and 600",
            ),
            (
                GOOD.replace("cert =", "gateway = \"gw a\"\ncert ="),
                3,
                "gateway: \"gw a\": a name without spaces",
            ),
        ];
        for (text, line, needle) in cases {
            let e = Config::parse(&text, Path::new("/etc/ferry/receiver.toml"))
                .unwrap_err()
                .to_string();
            let at = format!("/etc/ferry/receiver.toml:{line}: ");
            assert!(e.starts_with(&at), "{e} should start with {at}");
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }

    /// `ferry-receiver.toml(5)` describes every key the parser accepts and no other; its
    /// examples parse, its defaults are what leaving a key out gives, its required keys are.
    #[test]
    fn the_configuration_reference_lists_every_key() {
        use ferry_protocol::config_reference::At;
        let tracer = serde_reflection::Tracer::new(Default::default());
        let tables = [(At::Root, "RawConfig"), (At::Map("modules"), "RawModule")];
        let parse = |text: &str| {
            let config = Config::parse(text, Path::new("/etc/ferry/receiver.toml"));
            config.map(|c| format!("{c:?}")).map_err(|e| e.to_string())
        };
        crate::config_reference::reference().assert_holds::<RawConfig>(tracer, &tables, &parse);
    }
}
