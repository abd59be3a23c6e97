//! `sender.toml`: raw TOML structs, then validation into one typed [`Config`].

use crate::coalesce::Timing;
use crate::filter::{Filter, FilterError};
use ferry_protocol::Fingerprint;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration file could not be used. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// What is wrong, naming the key (and line, for syntax errors).
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cert: PathBuf,
    key: PathBuf,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    targets: BTreeMap<String, RawTarget>,
    #[serde(default)]
    sync: Vec<RawSync>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    address: String,
    fingerprint: String,
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
}

fn default_true() -> bool {
    true
}

/// A validated sender configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Private key PEM file.
    pub key: PathBuf,
    /// Where the sender keeps state (digest caches).
    pub state_dir: Option<PathBuf>,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Sync groups, in file order.
    pub syncs: Vec<SyncGroup>,
}

/// A receiver to push to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in the configuration.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Pinned receiver certificate.
    pub fingerprint: Fingerprint,
}

/// A source directory kept equal to a module on one or more targets.
#[derive(Debug, Clone)]
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
}

impl Config {
    /// Reads and validates `file`; relative paths resolve against its directory.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text` as if read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            file: file.to_path_buf(),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let mut targets = BTreeMap::new();
        for (name, t) in raw.targets {
            let fingerprint = t
                .fingerprint
                .parse()
                .map_err(|e| err(format!("targets.{name}.fingerprint: {e}")))?;
            if !t.address.contains(':') {
                return Err(err(format!(
                    "targets.{name}.address: {:?} needs a port, e.g. {}:8730",
                    t.address, t.address
                )));
            }
            targets.insert(
                name.clone(),
                Target {
                    name,
                    address: t.address,
                    fingerprint,
                },
            );
        }
        let mut syncs: Vec<SyncGroup> = Vec::new();
        for (i, s) in raw.sync.into_iter().enumerate() {
            let name = s.name.clone().unwrap_or_else(|| s.module.clone());
            let key = |k: &str| format!("sync[{i}] ({name}).{k}");
            if syncs.iter().any(|g| g.name == name) {
                return Err(err(format!(
                    "{}: duplicate sync name {name:?}",
                    key("name")
                )));
            }
            if s.targets.is_empty() {
                return Err(err(format!(
                    "{}: at least one target is required",
                    key("targets")
                )));
            }
            for t in &s.targets {
                if !targets.contains_key(t) {
                    return Err(err(format!("{}: unknown target {t:?}", key("targets"))));
                }
            }
            let filter = Filter::new(&s.exclude)
                .map_err(|e: FilterError| err(format!("{}: {e}", key("exclude"))))?;
            let mut timing = Timing::default();
            if let Some(ms) = s.settle_ms {
                timing.settle = Duration::from_millis(ms);
            }
            if let Some(ms) = s.max_delay_ms {
                timing.max_delay = Duration::from_millis(ms);
            }
            if timing.max_delay < timing.settle {
                return Err(err(format!(
                    "{}: must not be shorter than settle_ms ({} ms)",
                    key("max_delay_ms"),
                    timing.settle.as_millis()
                )));
            }
            syncs.push(SyncGroup {
                name,
                source: resolve(s.source),
                targets: s.targets,
                module: s.module,
                filter,
                delete: s.delete,
                timing,
            });
        }
        Ok(Config {
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            state_dir: raw.state_dir.map(resolve),
            targets,
            syncs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let g = &c.syncs[0];
        assert_eq!(g.name, "file");
        assert!(g.delete);
        assert_eq!(g.targets, vec!["backup".to_string()]);
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            (
                GOOD.replace("targets = [\"backup\"]", "targets = [\"nope\"]"),
                "unknown target \"nope\"",
            ),
            (
                GOOD.replace("module = \"file\"", "module = \"file\"\ncolour = 1"),
                "colour",
            ),
            (
                GOOD.replace("192.168.74.20:8730", "192.168.74.20"),
                "targets.backup.address",
            ),
            (
                GOOD.replace("sha256:0000", "sha1:0000"),
                "targets.backup.fingerprint",
            ),
            (
                format!(
                    "{GOOD}[[sync]]\nsource = \"/x\"\ntargets = [\"backup\"]\nmodule = \"file\"\n"
                ),
                "duplicate sync name",
            ),
            (GOOD.replace("\"*.log\"", "\"[\""), "exclude"),
            (
                GOOD.replace(
                    "module = \"file\"",
                    "module = \"file\"\nsettle_ms = 500\nmax_delay_ms = 100",
                ),
                "max_delay_ms: must not be shorter",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::parse(&text, Path::new("/etc/ferry/sender.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/etc/ferry/sender.toml: "), "{e}");
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }
}
