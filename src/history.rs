//! `ferry history`: the kept versions of a module's paths. On the backup host it reads the
//! module's history journal itself (the receiver need not run); from a source host it asks
//! the receiver over a read session, for the modules that host may read.

use anyhow::{bail, Context, Result};
use ferry_protocol::message::{Intent, Version};
use ferry_protocol::RelPath;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// `ferry history --config FILE ARGS`: with a receiver.toml, ARGS are `MODULE [PATH]`; with a
/// sender.toml, `[PATH]` of the group `group` (on `target`, or its first ferry target).
pub async fn history(
    config: &Path,
    args: &[String],
    group: Option<&str>,
    target: Option<&str>,
    json: bool,
) -> Result<u8> {
    let receiver = crate::is_receiver(&crate::config_table(config)?);
    let (versions, place) = if receiver {
        let [module, rest @ ..] = args else {
            bail!("{}: a receiver configuration: name the module (`ferry history --config {} MODULE [PATH]`)", config.display(), config.display());
        };
        if group.is_some() || target.is_some() {
            bail!(
                "--group and --target are for a sender.toml; {} is a receiver's",
                config.display()
            );
        }
        local(config, module, path_arg(rest)?)?
    } else {
        let Some(group) = group else {
            bail!(
                "{}: a sender configuration: name the sync group (`--group NAME`)",
                config.display()
            );
        };
        remote(config, group, target, path_arg(args)?).await?
    };
    if json {
        let out: Vec<serde_json::Value> = versions.iter().map(as_json).collect();
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    if versions.is_empty() {
        outln!("no versions kept ({place})");
        return Ok(0);
    }
    outln!(
        "{:<24} {:<11} {:<7} {:>12}  {:>8}  PATH",
        "SUPERSEDED (UTC)",
        "ACTION",
        "KIND",
        "SIZE",
        "ID"
    );
    for v in &versions {
        outln!("{}", line(v));
    }
    outln!("{} versions; {place}", versions.len());
    Ok(0)
}

/// The one optional PATH argument.
fn path_arg(args: &[String]) -> Result<RelPath> {
    match args {
        [] => Ok(RelPath::root()),
        [p] => module_path("", p),
        more => bail!("one PATH at most, not {}", more.len()),
    }
}

/// `text` (named after `flag`, if any, in the error) as a path in a module.
pub fn module_path(flag: &str, text: &str) -> Result<RelPath> {
    let rel = RelPath::from(text.trim_matches('/'));
    rel.validate()
        .map_err(|why| anyhow::anyhow!("{flag}{text:?}: not a module path: {why}"))?;
    Ok(rel)
}

/// On the backup host: the journal itself.
fn local(config: &Path, module: &str, under: RelPath) -> Result<(Vec<Version>, String)> {
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
    let versions = ferry_receiver::history::read_versions(&h.dir, &under)?;
    let place = format!("a kept entry is {}/objects/ID", h.dir.display());
    Ok((versions.iter().map(|v| v.to_wire()).collect(), place))
}

/// From a source host: the receiver's answer over a read session.
async fn remote(
    config: &Path,
    group: &str,
    target: Option<&str>,
    under: RelPath,
) -> Result<(Vec<Version>, String)> {
    let config = ferry_sender::Config::load(config)?;
    let (g, name) = ferry_target(&config, group, target)?;
    let identity = config.identity()?;
    let session = config.targets[&name]
        .connect(&identity, &g.module, Intent::Read)
        .await
        .with_context(|| format!("target {name}"))?;
    let versions = session.history(&under).await;
    session.close().await;
    let place = format!(
        "kept by target {name}, module {}, on the backup host",
        g.module
    );
    Ok((versions.with_context(|| format!("target {name}"))?, place))
}

/// The sync group `group` of a sender's `config` and the name of its ferry target `target`
/// (its first ferry target when `None`).
pub fn ferry_target<'c>(
    config: &'c ferry_sender::Config,
    group: &str,
    target: Option<&str>,
) -> Result<(&'c ferry_sender::config::SyncGroup, String)> {
    let Some(g) = config.syncs.iter().find(|g| g.name == group) else {
        let known: Vec<&str> = config.syncs.iter().map(|g| g.name.as_str()).collect();
        bail!("no sync group {group:?} (groups: {})", known.join(", "));
    };
    let ferry_targets: Vec<&String> = g
        .targets
        .iter()
        .filter(|t| config.targets[*t].fingerprint().is_some())
        .collect();
    let name = match target {
        Some(t) if ferry_targets.iter().any(|f| *f == t) => t.to_string(),
        Some(t) => {
            bail!("sync {group}: no ferry target {t:?} (its ferry targets: {ferry_targets:?})")
        }
        None => match ferry_targets.first() {
            Some(t) => t.to_string(),
            None => bail!("sync {group}: no ferry target (an rsync target keeps no history)"),
        },
    };
    Ok((g, name))
}

fn when(v: &Version) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(v.time_ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn as_json(v: &Version) -> serde_json::Value {
    serde_json::json!({
        "id": v.id,
        "path": v.path.to_string(),
        "superseded": when(v),
        "time_ns": v.time_ns,
        "action": v.action,
        "kind": v.kind,
        "size": v.size,
        "object": v.object,
        "renamed_to": v.renamed_to.as_ref().map(|p| p.to_string()),
    })
}

fn line(v: &Version) -> String {
    let id = if v.object {
        v.id.to_string()
    } else {
        "-".into()
    };
    let path = match &v.renamed_to {
        Some(to) => format!("{} -> {to}", v.path),
        None => v.path.to_string(),
    };
    format!(
        "{:<24} {:<11} {:<7} {:>12}  {:>8}  {path}",
        when(v),
        v.action,
        v.kind,
        v.size,
        id
    )
}
