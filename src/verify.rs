//! `ferry verify`: prints one `<kind> <path>` line per difference; 0 equal, 1 different.

use crate::progress::{Count, Progress};
use anyhow::{bail, Result};
use ferry_protocol::local::Tally;
use ferry_protocol::meta::Difference;
use ferry_protocol::RelPath;
use ferry_sender::config::{SyncGroup, TargetKind};
use ferry_sender::filter::Filter;
use ferry_sender::verify::{default_cache_dir, verify_local, verify_target};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn print_differences(diffs: &[(RelPath, Difference)]) {
    for (path, kind) in diffs {
        outln!("{} {}", kind.as_str(), path);
    }
}

/// Runs `work` (which digests trees, counting into the tally it is given) with progress
/// shown; the totals come from a stat walk of `roots` run beside it, so nothing waits for them.
async fn with_progress<T, F>(
    what: &str,
    roots: Vec<(PathBuf, Filter)>,
    work: impl FnOnce(Arc<Tally>) -> F,
) -> T
where
    F: std::future::Future<Output = T>,
{
    let progress = Arc::new(Progress::start(what));
    let tally = Arc::new(Tally::default());
    let p = progress.clone();
    let counting = tokio::task::spawn_blocking(move || {
        let mut total = Count::default();
        for (root, filter) in roots {
            let accept = |p: &RelPath, d: bool| filter.accepts(p, d);
            let none = ferry_protocol::xattr::Namespaces::NONE;
            let entries = ferry_protocol::local::scan(&root, &accept, none, &mut Vec::new());
            for e in entries.into_iter().flatten() {
                total.entries += 1;
                if e.meta.kind == ferry_protocol::Kind::File {
                    total.bytes += e.meta.size;
                }
            }
        }
        p.total(total);
    });
    let (t, p) = (tally.clone(), progress.clone());
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            p.update(Count {
                entries: t.entries.load(Ordering::Relaxed),
                bytes: t.bytes.load(Ordering::Relaxed),
            });
        }
    });
    let out = work(tally).await;
    ticker.abort();
    counting.abort();
    progress.finish();
    out
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
    // The right side is counted as the same size as the left.
    let roots = vec![
        (left.to_path_buf(), filter.clone()),
        (left.to_path_buf(), filter.clone()),
    ];
    let diffs = with_progress("verify", roots, |tally| {
        verify_local(left, right, &filter, checksum, cache_dir, Some(tally))
    })
    .await?;
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
    let mut contents = false;
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
                    let what = format!("verify {} → {target_name}", group.name);
                    let roots = vec![(group.source.clone(), group.filter.clone())];
                    with_progress(&what, roots, |tally| {
                        let dir = cache_dir.clone();
                        verify_target(group, target, &identity, checksum, dir, Some(tally))
                    })
                    .await?
                }
            };
            errln!(
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
            if diffs.iter().any(|(_, d)| *d == Difference::Content) {
                contents = true;
            }
        }
    }
    if !equal {
        // How to mend it: a whole compare sees kinds, sizes, times and attributes; only
        // digests see content that kept its size and time.
        let how = if contents {
            "`ferry send --once --checksum --config FILE` re-sends them (content that kept its \
             size and time is found by digest only)"
        } else {
            "`ferry send --once --config FILE` (or the running daemon's next whole compare) \
             mends them"
        };
        errln!("ferry: {how}");
    }
    Ok(if equal { 0 } else { 1 })
}
