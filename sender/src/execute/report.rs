//! What an execution did ([`Report`]), and what it tells whoever watches it step by step
//! ([`Watch`]: the log, the status board, a progress bar).

use crate::plan::{Op, Plan};
use ferry_protocol::RelPath;
use std::time::Duration;

/// What a reconcile or batch did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Files sent.
    pub files: u64,
    /// Of which as deltas.
    pub delta_files: u64,
    /// Directories, links and special files created.
    pub created: u64,
    /// Metadata-only updates (including directory times).
    pub meta: u64,
    /// Paths deleted (a name the receiver did not have is not counted).
    pub deleted: u64,
    /// Deletes the receiver counted (under the plan's allowance): each path and the entries
    /// it took with it.
    pub removed: Vec<(RelPath, u64)>,
    /// Deletes the receiver held back (past the plan's allowance): each path and at least how
    /// many entries it would have taken.
    pub held_back: Vec<(RelPath, u64)>,
    /// Paths renamed.
    pub renamed: u64,
    /// Paths handed to the rsync client (compatibility mode).
    pub rsync_paths: u64,
    /// File payload bytes (whole data plus deltas).
    pub payload_bytes: u64,
    /// Total bytes written to the connection.
    pub bytes_sent: u64,
    /// Per-path failures: the path and why.
    pub failures: Vec<(RelPath, String)>,
    /// Of those, the ones where reading the source failed (not a refusal of the receiver).
    pub unread: Vec<(RelPath, String)>,
    /// Files that disappeared or changed type between planning and sending. Not failures
    /// for the daemon (the watcher reports what became of them), but a one-shot reconcile
    /// has not converged.
    pub vanished: u64,
    /// Entries the module holds after a whole-tree compare (the source's, as scanned, and
    /// what held deletions left there).
    pub module_entries: Option<u64>,
    /// Deletions the guard held back in this batch (the rest of it went): how many paths, the
    /// entries they hold, and why.
    pub held: Option<Held>,
    /// A mass deletion applied because the module keeps history (what the guard would have
    /// held without it), said once.
    pub mass_change: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Deletions the mass-delete guard held back while everything else went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Paths not deleted.
    pub paths: u64,
    /// Entries they hold on the receiver.
    pub entries: u64,
    /// Why (the guard's words, with the release command).
    pub why: String,
    /// Counted by a whole compare: the whole of what is held (else: added to it).
    pub whole: bool,
}

impl Report {
    /// True if every planned step succeeded and nothing was held back.
    pub fn converged(&self) -> bool {
        self.failures.is_empty() && self.vanished == 0 && self.held.is_none()
    }

    /// Adds `other`'s counts to these.
    pub fn absorb(&mut self, other: Report) {
        self.files += other.files;
        self.delta_files += other.delta_files;
        self.created += other.created;
        self.meta += other.meta;
        self.deleted += other.deleted;
        self.removed.extend(other.removed);
        self.held_back.extend(other.held_back);
        self.renamed += other.renamed;
        self.rsync_paths += other.rsync_paths;
        self.payload_bytes += other.payload_bytes;
        self.bytes_sent += other.bytes_sent;
        self.failures.extend(other.failures);
        self.vanished += other.vanished;
        self.module_entries = other.module_entries.or(self.module_entries);
        self.held = match (self.held.take(), other.held) {
            (Some(a), Some(b)) => Some(Held {
                paths: a.paths + b.paths,
                entries: a.entries + b.entries,
                why: b.why,
                whole: a.whole || b.whole,
            }),
            (a, b) => b.or(a),
        };
        self.mass_change = other.mass_change.or(self.mass_change.take());
        self.elapsed += other.elapsed;
    }

    /// Steps that changed something on the receiver.
    pub fn steps(&self) -> u64 {
        self.files + self.created + self.meta + self.deleted + self.renamed
    }

    /// The paths that failed.
    pub fn failed_paths(&self) -> Vec<RelPath> {
        self.failures.iter().map(|(p, _)| p.clone()).collect()
    }
}

/// What one durable step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// File content sent whole.
    File,
    /// File content sent as a delta.
    Delta,
    /// Directory, symlink or special file created.
    Created,
    /// Metadata applied.
    Meta,
    /// Path deleted.
    Deleted,
    /// Path renamed to the given name.
    Renamed(RelPath),
}

/// One step the receiver acknowledged (so it is durable there).
#[derive(Debug, Clone)]
pub struct Step {
    /// What was done.
    pub kind: StepKind,
    /// To which path.
    pub path: RelPath,
    /// Payload bytes (files only).
    pub bytes: u64,
    /// The file's size as planned (files only): what progress counts.
    pub size: u64,
    /// Entries a delete took, as the receiver counted them (under an allowance).
    pub removed: Option<u64>,
}

/// What a plan holds, for progress: its steps and the bytes of the files it sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Steps (each delete, creation, file and metadata update).
    pub steps: u64,
    /// Sizes of the files to send.
    pub bytes: u64,
}

impl Totals {
    /// What `plan` will do.
    pub fn of(plan: &Plan) -> Totals {
        let bytes = plan
            .creates
            .iter()
            .filter_map(|op| match op {
                Op::File { entry, .. } => Some(entry.meta.size),
                _ => None,
            })
            .sum();
        Totals {
            steps: (plan.deletes.len()
                + plan.creates.len()
                + plan.links.len()
                + plan.dir_meta.len()) as u64,
            bytes,
        }
    }

    /// Counts one acknowledged step in.
    pub fn add(&mut self, step: &Step) {
        self.steps += 1;
        self.bytes += step.size;
    }
}

/// Sees an execution: what it plans, then each step the receiver acknowledged. Any
/// `FnMut(&Step)` closure is one that ignores the plan.
pub trait Watch: Send {
    /// The plan about to be executed (a whole copy executed in pieces: each piece's).
    fn planned(&mut self, totals: Totals) {
        let _ = totals;
    }
    /// Whether the totals announced so far are all there will be. A plan is whole as it is
    /// planned and no one says so; a copy in pieces says `false` with its first piece while
    /// its walk has more to read, and `true` once the walk is over.
    fn whole(&mut self, whole: bool) {
        let _ = whole;
    }
    /// One acknowledged step.
    fn step(&mut self, step: &Step);
    /// A planned step that ended without being done (refused, failed, vanished, held back):
    /// its share of the totals (one step, `bytes` of file content), so that progress ends at
    /// its total.
    fn missed(&mut self, bytes: u64) {
        let _ = bytes;
    }
}

impl<F: FnMut(&Step) + Send> Watch for F {
    fn step(&mut self, step: &Step) {
        self(step)
    }
}

/// Who sees an execution.
pub type Observe<'a> = &'a mut dyn Watch;
