//! The receiver's counters: one set per process, shared by every session.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one receiver process, shared by all sessions.
#[derive(Debug, Default)]
pub struct Stats {
    /// Files committed.
    pub files: AtomicU64,
    /// Of which rebuilt from a delta.
    pub delta_files: AtomicU64,
    /// Bytes written into files.
    pub bytes_written: AtomicU64,
    /// Payload bytes received for file bodies (whole data and deltas).
    pub bytes_received: AtomicU64,
    /// Directories created.
    pub mkdirs: AtomicU64,
    /// Symlinks, special files and hard links created.
    pub links: AtomicU64,
    /// Metadata-only updates.
    pub set_meta: AtomicU64,
    /// Deletions.
    pub deletes: AtomicU64,
    /// Deletions not done: past the sender's allowance (its delete guard holds them).
    pub deletes_held: AtomicU64,
    /// Renames.
    pub renames: AtomicU64,
    /// Failed requests.
    pub failures: AtomicU64,
    /// Of which the module's filesystem refused as a whole: full, over quota, read-only or
    /// failing its I/O.
    pub unwritable: AtomicU64,
    /// Renames and hard links declined because their source is not here (or not current):
    /// the sender expects that and sends the content instead, so they are no failures.
    pub declined: AtomicU64,
    /// Writes refused because a module's history could not keep its floor in the space left.
    pub refused_for_history: AtomicU64,
    /// Entries sent in listings (`List`).
    pub listed: AtomicU64,
    /// Directories summarised (`Summarize`).
    pub summarised: AtomicU64,
    /// Copies read through and signed to answer a delta (the others were known).
    pub bases_signed: AtomicU64,
    /// Windows of deltas taken by their digest, without reading them.
    pub windows_known: AtomicU64,
    /// Big files sent whole, signed after their commit for their next delta.
    pub signed_later: AtomicU64,
}

impl Stats {
    /// `(name, value)` pairs, for `StatsReply` and logs.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let c = |name: &str, v: &AtomicU64| (name.to_string(), v.load(Ordering::Relaxed));
        vec![
            c("files", &self.files),
            c("delta_files", &self.delta_files),
            c("bytes_written", &self.bytes_written),
            c("bytes_received", &self.bytes_received),
            c("mkdirs", &self.mkdirs),
            c("links", &self.links),
            c("set_meta", &self.set_meta),
            c("deletes", &self.deletes),
            c("deletes_held", &self.deletes_held),
            c("renames", &self.renames),
            c("failures", &self.failures),
            c("unwritable", &self.unwritable),
            c("declined", &self.declined),
            c("refused_for_history", &self.refused_for_history),
            c("listed", &self.listed),
            c("summarised", &self.summarised),
            c("bases_signed", &self.bases_signed),
            c("windows_known", &self.windows_known),
            c("signed_later", &self.signed_later),
        ]
    }
}
