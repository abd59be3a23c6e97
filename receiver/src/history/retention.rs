//! Retention: the rules that say which versions stay ([`Keep`], [`Rule`]), and the pruning
//! pass that applies them and the free-space floor ([`History::prune`]).

use super::{db_err, History};
use rusqlite::params;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a module's history is pruned (at most).
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows read per page when pruning by the rules.
pub(super) const PRUNE_PAGE: usize = 5_000;
/// Rows pruned per transaction: pruning never holds the journal for long.
const PRUNE_STEP: usize = 500;

/// How long versions are kept: each rule keeps one version per `every` (or all of them) for
/// versions younger than `span`. A version older than every rule's span is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// One version per this much time (the newest of each period); `None` keeps all.
    pub every: Option<Duration>,
    /// For versions younger than this.
    pub span: Duration,
}

impl std::str::FromStr for Rule {
    type Err = String;
    /// `"all for 1d"`, `"hourly for 7d"`, `"daily for 30d"`, `"weekly for 1y"`,
    /// `"every 10m for 1d"`; durations as `humantime` reads them (`90s`, `12h`, `2 weeks`).
    fn from_str(s: &str) -> Result<Rule, String> {
        let bad = || {
            format!(
                "{s:?}: expected \"WHICH for AGE\", WHICH being all, hourly, daily, weekly or \
                 \"every DURATION\" (e.g. \"hourly for 7d\")"
            )
        };
        let (which, span) = s.split_once(" for ").ok_or_else(bad)?;
        let duration = |d: &str| {
            humantime::parse_duration(d.trim()).map_err(|e| format!("{s:?}: {:?}: {e}", d.trim()))
        };
        let every = match which.trim() {
            "all" => None,
            "hourly" => Some(Duration::from_secs(3600)),
            "daily" => Some(Duration::from_secs(86_400)),
            "weekly" => Some(Duration::from_secs(7 * 86_400)),
            w => match w.strip_prefix("every ") {
                Some(d) => Some(duration(d)?),
                None => return Err(bad()),
            },
        };
        if every == Some(Duration::ZERO) {
            return Err(format!("{s:?}: a period of zero"));
        }
        Ok(Rule {
            every,
            span: duration(span)?,
        })
    }
}

/// A module's retention: its rules, the floor below which nothing is pruned to make room,
/// and the free space pruning keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Keep {
    /// The rules, by span.
    pub rules: Vec<Rule>,
    /// Versions younger than this are never pruned to make room; when only they are left and
    /// the filesystem is short of space, the module refuses writes.
    pub floor: Duration,
    /// Pruning for space starts when less than this share of the filesystem is free.
    pub min_free_percent: u8,
}

impl Default for Keep {
    /// Every version for a day, one an hour for a week, one a day for 30 days; nothing of the
    /// last day pruned for space; 10% of the filesystem kept free.
    fn default() -> Keep {
        let rules = ["all for 1d", "hourly for 7d", "daily for 30d"];
        Keep {
            rules: rules
                .iter()
                .map(|r| r.parse().expect("default rule"))
                .collect(),
            floor: Duration::from_secs(86_400),
            min_free_percent: 10,
        }
    }
}

impl Keep {
    /// The versions of one path to prune, given their times (ns since the epoch, any order)
    /// and `now`: each version falls under the first rule (by span) it is young enough for,
    /// and within a rule with a period only the newest of each period stays.
    pub fn prune_of(&self, times: &[(i64, i64)], now: i64) -> Vec<i64> {
        let mut rules = self.rules.clone();
        rules.sort_by_key(|r| r.span);
        let mut seen: BTreeSet<(usize, i64)> = BTreeSet::new();
        let mut sorted: Vec<&(i64, i64)> = times.iter().collect();
        // Newest first, so the first of a period met is the one that stays.
        sorted.sort_by_key(|v| std::cmp::Reverse(v.1));
        let mut out = Vec::new();
        for &&(id, t) in &sorted {
            let age = Duration::from_nanos(now.saturating_sub(t).max(0) as u64);
            match rules.iter().position(|r| age <= r.span) {
                None => out.push(id),
                Some(i) => {
                    if let Some(every) = rules[i].every {
                        let period = t.div_euclid(every.as_nanos().max(1) as i64);
                        if !seen.insert((i, period)) {
                            out.push(id);
                        }
                    }
                }
            }
        }
        out
    }
}

impl History {
    /// One pruning pass at `now` (ns): versions the rules let go, then, while less than
    /// `min_free_percent` of the filesystem is free, the oldest versions older than the floor.
    /// If space is still short with only the floor left, writes are refused until it is not.
    /// Returns how many versions went.
    pub fn prune(&self, now: i64) -> io::Result<u64> {
        self.prune_while(now, &|| true)
    }

    /// [`History::prune`], for as long as `writer()` says this process may still write the
    /// history (a gateway that lost the module's write lease stops between two steps).
    pub fn prune_while(&self, now: i64, writer: &dyn Fn() -> bool) -> io::Result<u64> {
        // Read in pages, the journal's lock let go between them, so a commit never waits
        // for more than one page however long the history is.
        let mut by_rule = Vec::new();
        let mut group: Vec<(i64, i64)> = Vec::new();
        let mut last: Option<(Vec<u8>, i64, i64)> = None;
        loop {
            let page: Vec<(Vec<u8>, i64, i64)> = {
                let db = self.db.lock().expect("journal lock");
                let mut q = db
                    .prepare_cached(
                        "SELECT path, time_ns, id FROM versions \
                         WHERE (path, time_ns, id) > (?1, ?2, ?3) \
                         ORDER BY path, time_ns, id LIMIT ?4",
                    )
                    .map_err(db_err)?;
                let (p, t, i) = last.clone().unwrap_or((Vec::new(), i64::MIN, i64::MIN));
                let rows = q
                    .query_map(params![p, t, i, PRUNE_PAGE as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)?
            };
            let Some(end) = page.last().cloned() else {
                break;
            };
            for (path, t, id) in page {
                if last.as_ref().is_some_and(|l| l.0 != path) {
                    by_rule.extend(self.keep.prune_of(&group, now));
                    group.clear();
                }
                group.push((id, t));
                last = Some((path, t, id));
            }
            last = Some(end);
        }
        by_rule.extend(self.keep.prune_of(&group, now));
        let mut gone = self.remove(&by_rule, writer)?;
        let floor = now - self.keep.floor.as_nanos() as i64;
        while self.short_of_space()? {
            let oldest: Vec<i64> = {
                let db = self.db.lock().expect("journal lock");
                let mut q = db
                    .prepare("SELECT id FROM versions WHERE time_ns < ?1 ORDER BY time_ns LIMIT ?2")
                    .map_err(db_err)?;
                let ids = q
                    .query_map(params![floor, PRUNE_STEP as i64], |r| r.get(0))
                    .map_err(db_err)?;
                ids.collect::<Result<_, _>>().map_err(db_err)?
            };
            if oldest.is_empty() || !writer() {
                break;
            }
            gone += self.remove(&oldest, writer)?;
        }
        let short = self.short_of_space()?;
        let mut refusing = self.refusing.lock().expect("refusing lock");
        match (short, refusing.is_some()) {
            (true, false) => {
                let why = format!(
                    "history: less than {}% of the filesystem is free and every version left \
                     is younger than the floor ({}); writes are refused rather than lose the \
                     recent past (free space, or lower history_floor)",
                    self.keep.min_free_percent,
                    humantime::format_duration(self.keep.floor)
                );
                tracing::error!(history = %self.dir.display(), "{why}");
                *refusing = Some(why);
            }
            (false, true) => {
                tracing::info!(history = %self.dir.display(), "history: space again; writes accepted");
                *refusing = None;
            }
            _ => {}
        }
        self.pruned.fetch_add(gone, Ordering::Relaxed);
        Ok(gone)
    }

    pub(super) fn short_of_space(&self) -> io::Result<bool> {
        let st = rustix_statvfs(&format!("/proc/self/fd/{}", self.objects.as_raw_fd()))?;
        Ok(st.0 * 100 < st.1 * self.keep.min_free_percent as u64)
    }

    /// Removes versions `ids` (objects first, then rows), [`PRUNE_STEP`] per transaction.
    fn remove(&self, ids: &[i64], writer: &dyn Fn() -> bool) -> io::Result<u64> {
        let mut n = 0;
        for chunk in ids.chunks(PRUNE_STEP) {
            if !writer() {
                break;
            }
            for &id in chunk {
                let object = self.object_path(id);
                let r = match fs::symlink_metadata(&object) {
                    Ok(md) if md.is_dir() => fs::remove_dir_all(&object),
                    Ok(_) => fs::remove_file(&object),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                };
                r?;
            }
            let mut db = self.db.lock().expect("journal lock");
            let tx = db.transaction().map_err(db_err)?;
            for &id in chunk {
                tx.execute("DELETE FROM versions WHERE id = ?1", [id])
                    .map_err(db_err)?;
            }
            // From now on the history reaches back to its oldest version, not to its start.
            tx.execute("UPDATE reach SET pruned = 1 WHERE id = 1", [])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            drop(db);
            self.flush_log()?;
            n += chunk.len() as u64;
        }
        Ok(n)
    }
}

/// (available blocks, total blocks) of the filesystem at `path`.
fn rustix_statvfs(path: &str) -> io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path).map_err(io::Error::other)?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64, st.f_blocks as u64))
}
