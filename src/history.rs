//! `ferry history`: the kept versions of a module's paths, read on the backup host straight
//! from the module's history journal (the receiver need not run).

use anyhow::{bail, Result};
use ferry_protocol::RelPath;
use ferry_receiver::history::{read_versions, Version};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// Lists the versions at or below `path` (the whole module without) of `module` in the
/// receiver configuration `config`, oldest first; `json` prints one JSON array.
pub fn history(config: &Path, module: &str, path: Option<&str>, json: bool) -> Result<u8> {
    let config = ferry_receiver::Config::load(config)?;
    let Some(m) = config.modules.get(module) else {
        let known: Vec<&str> = config.modules.keys().map(String::as_str).collect();
        bail!(
            "{}: no module {module:?} (modules: {})",
            config.file.display(),
            known.join(", ")
        );
    };
    let Some(h) = &m.history else {
        bail!(
            "{}: module {module:?} keeps no history (no `history` key): it is a mirror, and \
             nothing it replaced or deleted was kept",
            config.file.display()
        );
    };
    let under = match path {
        None => RelPath::root(),
        Some(p) => {
            let rel = RelPath::from(p.trim_matches('/'));
            rel.validate()
                .map_err(|why| anyhow::anyhow!("{p:?}: not a module path: {why}"))?;
            rel
        }
    };
    let versions = read_versions(&h.dir, &under)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&versions)?);
        return Ok(0);
    }
    if versions.is_empty() {
        println!("no versions of {under} kept in {}", h.dir.display());
        return Ok(0);
    }
    println!(
        "{:<24} {:<11} {:<7} {:>12}  {:>8}  PATH",
        "SUPERSEDED (UTC)", "ACTION", "KIND", "SIZE", "ID"
    );
    for v in &versions {
        println!("{}", line(v));
    }
    println!(
        "{} versions; a kept entry is {}/objects/ID",
        versions.len(),
        h.dir.display()
    );
    Ok(0)
}

fn line(v: &Version) -> String {
    let when = UNIX_EPOCH + Duration::from_nanos(v.time_ns.max(0) as u64);
    let id = if v.object {
        v.id.to_string()
    } else {
        "-".into()
    };
    let path = match &v.renamed_to {
        Some(to) => format!("{} -> {to}", v.path),
        None => v.path.clone(),
    };
    format!(
        "{:<24} {:<11} {:<7} {:>12}  {:>8}  {path}",
        humantime::format_rfc3339_seconds(when).to_string(),
        v.action,
        v.kind,
        v.size,
        id
    )
}
