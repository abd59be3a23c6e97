//! `ferry restore` on the backup host: a module (or some of its paths) as it was at a time,
//! from the module and its history, written whole into a new or empty directory.

use anyhow::{bail, Result};
use ferry_protocol::RelPath;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// `ferry restore --config receiver.toml --module M [--at TIME] [--path P]... DEST`.
pub fn restore(
    config: &Path,
    module: Option<&str>,
    at: Option<&str>,
    paths: &[String],
    dest: &Path,
) -> Result<u8> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| anyhow::anyhow!("{}: {}", config.display(), ferry_protocol::io_reason(&e)))?;
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    if !(table.contains_key("listen") || table.contains_key("modules")) {
        bail!(
            "{}: restore runs on the backup host with its receiver.toml and --module (restoring \
             from a source host over the network is not built yet)",
            config.display()
        );
    }
    let config = ferry_receiver::Config::load(config)?;
    let Some(name) = module else {
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
    let Some(h) = &m.history else {
        bail!(
            "{}: module {name:?} keeps no history: only its current state could be copied, \
             and nothing it replaced or deleted was kept",
            config.file.display()
        );
    };
    let at = at.map(|t| parse_time(t, SystemTime::now())).transpose()?;
    let paths = paths
        .iter()
        .map(|p| {
            let rel = RelPath::from(p.trim_matches('/'));
            rel.validate()
                .map_err(|why| anyhow::anyhow!("--path {p:?}: not a module path: {why}"))?;
            Ok(rel)
        })
        .collect::<Result<Vec<_>>>()?;
    let view = ferry_receiver::restore::view(&m.path, &h.dir, at, &paths)?;
    let done = ferry_receiver::restore::write(&m.path, &h.dir, &view, dest)?;
    for (path, why) in &done.failures {
        eprintln!("ferry: restore {name}: {path}: {why}");
    }
    let when = at.map_or_else(
        || "now".to_string(),
        |ns| {
            let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
            format!("as at {}", humantime::format_rfc3339_seconds(t))
        },
    );
    println!(
        "module {name} {when}: {} entries, {} bytes into {}; {} not restored",
        done.entries,
        done.bytes,
        dest.display(),
        done.failures.len()
    );
    Ok(if done.failures.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

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
