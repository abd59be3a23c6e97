//! `ferry verify`: prints one `<kind> <path>` line per difference; 0 equal, 1 different.

use anyhow::{bail, Result};
use ferry_protocol::meta::Difference;
use ferry_protocol::RelPath;
use ferry_sender::config::{SyncGroup, TargetKind};
use ferry_sender::filter::Filter;
use ferry_sender::verify::{default_cache_dir, verify_local, verify_target};
use std::path::{Path, PathBuf};

fn print_differences(diffs: &[(RelPath, Difference)]) {
    for (path, kind) in diffs {
        println!("{} {}", kind.as_str(), path);
    }
}

/// `ferry verify LEFT RIGHT`.
pub async fn local(
    left: &Path,
    right: &Path,
    excludes: &[String],
    checksum: bool,
    cache_dir: Option<PathBuf>,
) -> Result<u8> {
    let filter = Filter::new(excludes)?;
    let cache_dir = cache_dir.or_else(default_cache_dir);
    let diffs = verify_local(left, right, &filter, checksum, cache_dir).await?;
    print_differences(&diffs);
    Ok(if diffs.is_empty() { 0 } else { 1 })
}

/// `ferry verify --config FILE [--sync NAME]`.
pub async fn remote(config: &Path, only: Option<&str>, checksum: bool) -> Result<u8> {
    let config = ferry_sender::Config::load(config)?;
    let identity = config.identity()?;
    let groups: Vec<&SyncGroup> = config
        .syncs
        .iter()
        .filter(|g| only.is_none_or(|n| g.name == n))
        .collect();
    if groups.is_empty() {
        bail!("no sync group named {:?}", only.unwrap_or_default());
    }
    let cache_dir = config.state_dir.as_ref().map(|d| d.join("digests"));
    let mut equal = true;
    for group in groups {
        for target_name in &group.targets {
            let target = &config.targets[target_name];
            let diffs = match &target.kind {
                TargetKind::Rsync(r) => {
                    ferry_sender::rsync::verify(group, r, &target.address, checksum)
                        .await
                        .map_err(|e| anyhow::anyhow!("{} → {target_name}: {e}", group.name))?
                }
                TargetKind::Ferry { .. } => {
                    verify_target(group, target, &identity, checksum, cache_dir.clone()).await?
                }
            };
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
        }
    }
    Ok(if equal { 0 } else { 1 })
}
