//! A whole compare that descends by summaries instead of listing the module: both sides
//! summarise their trees at once (metadata digests kept per directory,
//! [`ferry_protocol::local::Summary`]), the roots are compared, and only directories whose
//! digests differ are read and planned, breadth first, up to 256 directories (and 65,536
//! entries below them) per round trip. A tree with nothing changed costs one round trip and
//! no listing, and neither side holds more than a digest per directory and the entries of
//! the directories in hand (the plan grows with what differs).
//!
//! A directory whose files differ is planned from its entries alone ([`plan`] over the two
//! sides' entries of it). A directory that is new, gone, or another kind on one side is a
//! subtree to compare as a live batch compares one ([`crate::reconcile::plan_under`]), so
//! what a delete takes is counted from the receiver's listing of it. An empty module is
//! copied a piece at a time ([`copy_into_empty`]). Two cases go to the full compare instead
//! ([`Compared::Full`]): a directory to plan that holds a file with several names (which
//! names are one file is known only across the whole tree), and a source with entries that
//! cannot be read (the full compare reports them and keeps them from deletion).

use crate::config::SyncGroup;
use crate::execute::{Execution, Observe, Report, Step, Totals, Watch};
use crate::links::{LinkNames, Names};
use crate::plan::{deleted_entries, order_dir_meta, plan, Plan, PlanOptions};
use crate::reconcile::{plan_subtrees, unkept_namespaces};
use crate::session::{Session, SessionError, Summarized};
use crate::source;
use ferry_protocol::local::{self, Rules, Summary};
use ferry_protocol::message::DigestEntry;
use ferry_protocol::meta::{Entry, Kind};
use ferry_protocol::RelPath;
use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

/// Directories whose summaries are asked for and compared at a time: one round trip for
/// each, and no more of them held at once.
const DIRS_AT_ONCE: usize = 256;

/// Entries below the directories of one round, as the source's summary counts them, at most
/// (a round takes one directory however many): both sides' entries held at once are bounded
/// by this or by the widest directory, not by 256 wide ones.
const ENTRIES_AT_ONCE: u64 = 65_536;

/// How many of `queue`'s directories the next round takes: up to [`DIRS_AT_ONCE`] while the
/// entries `below` them stay within [`ENTRIES_AT_ONCE`], one at least.
fn round(queue: &VecDeque<RelPath>, below: impl Fn(&RelPath) -> u64) -> usize {
    let mut entries = 0u64;
    let mut taken = 0;
    for path in queue.iter().take(DIRS_AT_ONCE) {
        entries += below(path);
        if taken > 0 && entries > ENTRIES_AT_ONCE {
            break;
        }
        taken += 1;
    }
    taken
}

/// What a compare by summaries came to.
#[derive(Debug)]
pub enum Compared {
    /// A plan that makes the module equal to the source.
    Planned(Summed),
    /// The module is empty: everything is to be copied ([`copy_into_empty`]), the module's
    /// root as the receiver has it.
    Empty(Entry),
    /// The full compare must decide (see the module documentation).
    Full,
}

/// What a compare by summaries found.
#[derive(Debug)]
pub struct Summed {
    /// What makes the module equal to the source.
    pub plan: Plan,
    /// Entries below the source's root.
    pub local: u64,
    /// Entries below the module's root.
    pub remote: u64,
    /// Source entries holding attributes the module does not keep: how many, and the first.
    pub unkept: (u64, Option<RelPath>),
    /// Directories whose summaries were compared.
    pub dirs: u64,
}

/// One directory compared: where the compare goes on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DirStep {
    /// Subdirectories both sides hold whose contents differ.
    pub descend: Vec<RelPath>,
    /// Entries new, gone or retyped where a directory is on one side: compared as subtrees.
    pub subtrees: Vec<RelPath>,
    /// Some other entry differs: the directory's entries are planned.
    pub shallow: bool,
    /// Subdirectories both sides hold whose own attributes differ (the source's entries).
    pub dir_meta: Vec<Entry>,
    /// The entries are to be planned and one of them has several names on one side.
    pub linked: bool,
}

/// Compares one directory's entries on both sides (each sorted by name, the receiver's
/// already filtered by the group's excludes) under `rules`.
pub fn compare_dir(local: &[DigestEntry], remote: &[DigestEntry], rules: Rules) -> DirStep {
    let mut step = DirStep::default();
    let (mut l, mut r) = (local.iter().peekable(), remote.iter().peekable());
    let is_dir = |e: &DigestEntry| e.entry.meta.kind == Kind::Dir;
    loop {
        let order = match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.entry.path.file_name().cmp(b.entry.path.file_name()),
        };
        let (a, b) = match order {
            Ordering::Less => (l.next(), None),
            Ordering::Greater => (None, r.next()),
            Ordering::Equal => (l.next(), r.next()),
        };
        match (a, b) {
            (Some(a), Some(b)) if is_dir(a) && is_dir(b) => {
                if rules.digest(a) == rules.digest(b) {
                    continue;
                }
                let attrs = a.entry.meta.attr_differences(&b.entry.meta, rules.cmp);
                if !attrs.is_empty() {
                    step.dir_meta.push(a.entry.clone());
                }
                if a.digest != b.digest {
                    step.descend.push(a.entry.path.clone());
                }
            }
            (Some(a), Some(b)) if !is_dir(a) && !is_dir(b) => {
                if rules.digest(a) != rules.digest(b) {
                    step.shallow = true;
                }
            }
            (a, b) => {
                let e = a.or(b).expect("one side at least");
                if a.is_some_and(is_dir) || b.is_some_and(is_dir) {
                    step.subtrees.push(e.entry.path.clone());
                } else {
                    step.shallow = true;
                }
            }
        }
    }
    // Planning these entries needs every name of their linked files, on both sides.
    let linked = |e: &DigestEntry| e.entry.inode.is_some();
    step.linked = rules.cmp.hardlinks
        && step.shallow
        && (local.iter().any(linked) || remote.iter().any(linked));
    step
}

/// Plans a whole compare of `group` with the module behind `session` by summaries (see the
/// module documentation). Multiply-linked files met are learned into `links`, as a whole scan
/// would; local read errors of subtrees land in `report`.
pub async fn plan_by_summary(
    session: &Arc<Session>,
    group: &SyncGroup,
    root: &Arc<OwnedFd>,
    links: &Names,
    report: &mut Report,
) -> Result<Compared, SessionError> {
    let opts = PlanOptions::new(group, &session.keeps);
    let rules = Rules {
        cmp: opts.compare,
        devices: opts.devices,
    };
    let top = RelPath::root();
    let remote = session.summaries(std::slice::from_ref(&top), rules.cmp);
    let (g, held) = (group.clone(), root.clone());
    let unkept = unkept_namespaces(group, session);
    // The source's summary is walked while the module's root summary is asked for; an empty
    // module stops it (the copy walks the source itself, and a second walk of a large tree
    // was a tenth of the sender's work of an initial sync).
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let local = tokio::task::spawn_blocking(move || {
        let filter = |p: &RelPath, d: bool| g.filter.accepts(p, d);
        let mut errors = Vec::new();
        let read = g.preserve.namespaces();
        let s = Summary::build_wide(&held, rules, &filter, read, unkept, &stopped, &mut errors);
        (s, errors.is_empty())
    });
    let remote = remote.await;
    let empty = remote
        .as_ref()
        .ok()
        .and_then(|r| r.first())
        .and_then(|first| first.dir.clone().filter(|_| first.below == 0));
    if remote.is_err() || empty.is_some() {
        stop.store(true, AtomicOrdering::Relaxed);
    }
    let (summary, clean) = local.await.expect("summary task");
    let mut remote = remote?;
    if let Some(module_root) = empty {
        return Ok(Compared::Empty(module_root));
    }
    let first = remote.pop().expect("one summary asked for");
    // What could not be read is reported, and kept from deletion, by the full compare.
    if first.dir.is_none() || !clean {
        return Ok(Compared::Full);
    }
    if group.preserve.hardlinks {
        links.learn(&summary.linked, true);
    }
    let summary = Arc::new(summary);
    let mut out = Plan::default();
    let mut subtrees = Vec::new();
    let mut dirs = 0;
    let (local_count, remote_count) = (summary.root().1, first.below);
    // Directories to descend into, breadth first, read [`DIRS_AT_ONCE`] at a time.
    let mut queue: VecDeque<RelPath> = VecDeque::new();
    let mut level: Vec<(RelPath, Summarized)> = vec![(top, first)];
    while !level.is_empty() {
        dirs += level.len() as u64;
        let paths: Vec<RelPath> = level.iter().map(|(p, _)| p.clone()).collect();
        let (s, held, g) = (summary.clone(), root.clone(), group.clone());
        let locals = tokio::task::spawn_blocking(move || {
            let filter = |p: &RelPath, d: bool| g.filter.accepts(p, d);
            let read = |p: &RelPath| {
                let mut errors = Vec::new();
                let listing = s.listing(&held, p, &filter, &mut errors);
                listing.ok().flatten().filter(|_| errors.is_empty())
            };
            paths.iter().map(read).collect::<Vec<_>>()
        })
        .await
        .expect("listing task");
        for ((path, remote), listing) in level.into_iter().zip(locals) {
            // Gone or unreadable since the walk, or not a directory on the receiver: the
            // full compare decides.
            let (Some((ldir, lentries)), Some(rdir)) = (listing, remote.dir) else {
                return Ok(Compared::Full);
            };
            let excluded = |e: &DigestEntry| {
                let dir = e.entry.meta.kind == Kind::Dir;
                group.filter.excludes(&e.entry.path, dir)
            };
            let rentries: Vec<DigestEntry> = remote
                .entries
                .into_iter()
                .filter(|e| !excluded(e))
                .collect();
            let step = compare_dir(&lentries, &rentries, rules);
            if step.linked {
                return Ok(Compared::Full);
            }
            let own = ldir.meta.attr_differences(&rdir.meta, rules.cmp);
            if path.is_root() && !own.is_empty() {
                out.dir_meta.push(ldir.clone());
            }
            if step.shallow {
                let skip: HashSet<&RelPath> = step.subtrees.iter().collect();
                let pick = |dir: Entry, entries: Vec<DigestEntry>| -> Vec<Entry> {
                    let below = entries.into_iter().map(|e| e.entry);
                    let below = below.filter(|e| !skip.contains(&e.path));
                    std::iter::once(dir).chain(below).collect()
                };
                let (l, r) = (pick(ldir.clone(), lentries), pick(rdir, rentries));
                let mut planned = plan(&l, &r, opts, &LinkNames::new());
                planned.removes = deleted_entries(&planned.deletes, &r);
                out.extend(planned);
            }
            if !step.subtrees.is_empty() {
                out.dir_meta.push(ldir);
            }
            out.dir_meta.extend(step.dir_meta);
            subtrees.extend(step.subtrees);
            queue.extend(step.descend);
        }
        let next: Vec<RelPath> = queue.drain(..round(&queue, |p| summary.below(p))).collect();
        level = if next.is_empty() {
            Vec::new()
        } else {
            let answers = session.summaries(&next, rules.cmp).await?;
            next.into_iter().zip(answers).collect()
        };
    }
    plan_subtrees(session, group, root, links, subtrees, &mut out, report).await?;
    order_dir_meta(&mut out.dir_meta);
    Ok(Compared::Planned(Summed {
        plan: out,
        local: local_count,
        remote: remote_count,
        unkept: summary.unkept.clone(),
        dirs,
    }))
}

/// Entries of the source read, planned and sent at a time by [`copy_into_empty`], at most;
/// the first piece is of [`FIRST_PIECE`], each next twice the last, so the first file goes
/// out once a few hundred entries are read.
pub const PIECE: usize = 8192;

/// Entries in the first piece of a copy ([`PIECE`]).
pub const FIRST_PIECE: usize = 256;

/// Entries a walk in pieces ([`Pieces`]) plans ahead of the piece being sent, at most. The
/// totals announced before each piece are what the walk has planned by then: those of a
/// tree of up to about 32,000 entries (pieces from the first of [`FIRST_PIECE`] up to
/// [`PIECE`]) are whole once the walk has run that far ahead; a larger tree's grow as the
/// walk goes, at most this many entries ahead of the sending, as rsync's incremental
/// recursion does. Counted in entries, not pieces, because a piece planned ahead is held
/// whole: four pieces of the largest size, about 6 MB of a sender's memory at any size of
/// tree.
pub const AHEAD: usize = 4 * PIECE;

/// A tree read a piece at a time in tree order on a blocking thread, each piece planned
/// there as it is read, up to [`AHEAD`] entries ahead of the piece taken: what a copy into an
/// empty module ([`copy_into_empty`]) and a restore of a whole module as it is now send, so
/// that neither the tree nor its plan is ever held whole.
pub struct Pieces<T> {
    planned: tokio::sync::mpsc::UnboundedReceiver<Planned>,
    walked: Walked,
    walk: tokio::task::JoinHandle<std::io::Result<T>>,
}

/// A piece planned ahead, holding its entries' share of [`AHEAD`] until it is taken.
type Planned = (Plan, local::Errors, tokio::sync::OwnedSemaphorePermit);

/// What the pieces of a [`Pieces`] planned so far do, as the walk goes, and whether the
/// walk is over (then they are all there is).
#[derive(Clone, Default)]
pub struct Walked(Arc<std::sync::Mutex<(Totals, bool)>>);

impl Walked {
    /// The totals of every piece planned so far.
    pub fn now(&self) -> Totals {
        self.so_far().0
    }

    fn so_far(&self) -> (Totals, bool) {
        *self.0.lock().expect("totals lock")
    }

    fn add(&self, t: Totals) {
        let mut seen = self.0.lock().expect("totals lock");
        seen.0.steps += t.steps;
        seen.0.bytes += t.bytes;
    }

    fn over(&self) {
        self.0.lock().expect("totals lock").1 = true;
    }
}

/// The next piece of a [`Pieces`].
pub struct Piece {
    /// What makes the receiver hold the piece.
    pub plan: Plan,
    /// What could not be read in it.
    pub errors: local::Errors,
    /// What every piece planned so far does, this one and those planned ahead included.
    pub walked: Totals,
    /// The walk was over when this piece was taken: `walked` is all there is. (The last
    /// piece may still say `false`; the walk is surely over once [`Pieces::next`] says so.)
    pub whole: bool,
}

impl<T: Send + 'static> Pieces<T> {
    /// Starts `walk` (a walk in pieces handing each to its sink, which returns `false` to
    /// stop it) on a blocking thread, planning each piece with `plan_piece`.
    pub fn start(
        walk: impl FnOnce(&mut dyn FnMut(local::Piece) -> bool) -> std::io::Result<T> + Send + 'static,
        mut plan_piece: impl FnMut(&[Entry]) -> Plan + Send + 'static,
    ) -> Pieces<T> {
        let (tx, planned) = tokio::sync::mpsc::unbounded_channel();
        let shares = Arc::new(tokio::sync::Semaphore::new(AHEAD));
        let walked = Walked::default();
        let seen = walked.clone();
        let runtime = tokio::runtime::Handle::current();
        let walk = tokio::task::spawn_blocking(move || {
            let walked = walk(&mut |(entries, errors)| {
                let plan = plan_piece(&entries);
                let share = entries.len().clamp(1, AHEAD) as u32;
                drop(entries);
                seen.add(Totals::of(&plan));
                // Room is made as pieces are taken, or all at once as the pieces waiting
                // go with a `Pieces` no longer wanted (the send then fails).
                let Ok(held) = runtime.block_on(shares.clone().acquire_many_owned(share)) else {
                    return false;
                };
                tx.send((plan, errors, held)).is_ok()
            });
            seen.over();
            walked
        });
        Pieces {
            planned,
            walked,
            walk,
        }
    }

    /// The next piece, once planned; `None` once the walk is over.
    pub async fn next(&mut self) -> Option<Piece> {
        let (plan, errors, _held) = self.planned.recv().await?;
        let (walked, whole) = self.walked.so_far();
        Some(Piece {
            plan,
            errors,
            walked,
            whole,
        })
    }

    /// What the pieces planned so far do, as the walk goes on.
    pub fn walked(&self) -> Walked {
        self.walked.clone()
    }

    /// How the walk ended, once [`Pieces::next`] has said it is over (or at once, if the
    /// rest is not wanted: the walk then stops at its next piece).
    pub async fn end(self) -> std::io::Result<T> {
        drop(self.planned);
        self.walk.await.expect("walk task")
    }
}

/// What a copy into an empty module read.
#[derive(Debug, Default)]
pub struct Copied {
    /// Entries below the source's root.
    pub entries: u64,
    /// Entries holding attributes the module does not keep: how many, and the first.
    pub unkept: (u64, Option<RelPath>),
}

/// Copies the whole source into an empty module whose root is `module_root`, a piece of
/// at most [`PIECE`] entries at a time in tree order ([`Pieces`]): each piece is planned
/// against nothing on the walk's thread and sent while the walk reads the next, without
/// waiting for the answers to the last one ([`Execution`]), and hard links and directory
/// times are made once at the end, so neither side ever holds the tree. Names of
/// multiply-linked files are learned into `links` as the pieces are read: a name whose file
/// went in an earlier piece becomes a link to it. `observe` is told before each piece what
/// the pieces planned so far will do, so progress has its end early on and grows it for a
/// tree larger than the walk plans ahead.
pub async fn copy_into_empty(
    session: &Arc<Session>,
    group: &SyncGroup,
    root: &Arc<OwnedFd>,
    links: &Names,
    module_root: Entry,
    report: &mut Report,
    observe: Observe<'_>,
) -> Result<Copied, SessionError> {
    let opts = PlanOptions::new(group, &session.keeps);
    let unkept = unkept_namespaces(group, session);
    let (g, held, l) = (group.clone(), root.clone(), links.clone());
    let (walk_group, walk_root) = (group.clone(), root.clone());
    let remote = [module_root];
    let mut pieces = Pieces::start(
        move |sink| {
            let mut copied = Copied::default();
            source::scan_pieces(&walk_group, &walk_root, FIRST_PIECE..=PIECE, &mut |piece| {
                for e in piece.0.iter().filter(|e| !e.path.is_root()) {
                    copied.entries += 1;
                    if !unkept.is_empty() && e.meta.xattrs.within(unkept).next().is_some() {
                        copied.unkept.0 += 1;
                        copied.unkept.1.get_or_insert_with(|| e.path.clone());
                    }
                }
                sink(piece)
            })
            .map(|()| copied)
        },
        move |local| {
            let names = source::link_names(&g, &held, &l, false, local);
            plan(local, &remote, opts, &names)
        },
    );
    let origin = root.clone().into();
    let mut dir_meta = Vec::new();
    let mut counted = Counted {
        observe,
        walked: pieces.walked(),
        announced: Totals::default(),
    };
    let mut run = Execution::new(session, group.preserve, &origin, report, &mut counted);
    let mut whole = true;
    while let Some(piece) = pieces.next().await {
        for (p, e) in piece.errors {
            run.report().failures.push((p, e.to_string()));
        }
        if whole != piece.whole {
            whole = piece.whole;
            run.whole(whole);
        }
        dir_meta.append(&mut run.piece(piece.plan).await?);
    }
    if !whole {
        run.whole(true);
    }
    let walked = pieces.end().await;
    order_dir_meta(&mut dir_meta);
    // Directory times only after a whole walk: what was sent is answered either way.
    run.finish(if walked.is_ok() { dir_meta } else { Vec::new() })
        .await?;
    walked.map_err(|e| SessionError::Source {
        path: group.source.clone(),
        error: e.to_string(),
    })
}

/// The progress of a copy in [`Pieces`]: as each piece begins, what the walk has planned by
/// then (that piece and those planned ahead) is announced, less what was announced before.
/// Everything else passed on.
struct Counted<'a> {
    observe: Observe<'a>,
    walked: Walked,
    announced: Totals,
}

impl Watch for Counted<'_> {
    fn planned(&mut self, _piece: Totals) {
        let walked = self.walked.now();
        let more = Totals {
            steps: walked.steps - self.announced.steps,
            bytes: walked.bytes - self.announced.bytes,
        };
        if more != Totals::default() {
            self.observe.planned(more);
            self.announced = walked;
        }
    }

    fn whole(&mut self, whole: bool) {
        self.observe.whole(whole);
    }

    fn step(&mut self, step: &Step) {
        self.observe.step(step);
    }

    fn missed(&mut self, bytes: u64) {
        self.observe.missed(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::meta::{Compare, Inode, Meta};
    use ferry_protocol::xattr::{Namespaces, Xattrs};

    fn entry(path: &str, kind: Kind, mtime: i64, digest: u8) -> DigestEntry {
        DigestEntry {
            entry: Entry {
                path: RelPath::from(path),
                meta: Meta {
                    kind,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    size: 1,
                    mtime,
                    mtime_nsec: 0,
                    rdev: 0,
                    xattrs: Xattrs::default(),
                },
                link: None,
                inode: None,
            },
            digest: [digest; 32],
            hardlink: None,
        }
    }

    fn rules(hardlinks: bool) -> Rules {
        Rules {
            cmp: Compare::all(false).with(Namespaces::NONE, hardlinks),
            devices: false,
        }
    }

    fn paths(v: &[RelPath]) -> Vec<String> {
        v.iter().map(|p| p.to_string()).collect()
    }

    /// A walk in pieces plans at most [`AHEAD`] entries ahead of the piece taken, however
    /// fast it reads, and stops once the pieces are no longer wanted, even while it waits
    /// for room: an endless walk ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_in_pieces_stays_within_its_lookahead_and_stops_when_left() {
        use std::sync::atomic::AtomicUsize;
        let planned = Arc::new(AtomicUsize::new(0));
        let counted = planned.clone();
        let mut pieces = Pieces::start(
            |sink| {
                let one = entry("f", Kind::File, 1, 0).entry;
                while sink((vec![one.clone(); PIECE], Vec::new())) {}
                Ok(())
            },
            move |_| {
                counted.fetch_add(1, AtomicOrdering::SeqCst);
                Plan::default()
            },
        );
        let most = AHEAD / PIECE;
        for taken in 0..3 * most {
            // Taken so far, those waiting in full, and the one planned waiting for room:
            // reached before each is taken, so the walk always runs ahead, and never passed.
            let full = taken + most + 1;
            let reached = async {
                while planned.load(AtomicOrdering::SeqCst) < full {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            };
            let waited = tokio::time::timeout(std::time::Duration::from_secs(60), reached);
            waited.await.expect("the walk planned ahead");
            let ahead = planned.load(AtomicOrdering::SeqCst);
            assert!(ahead == full, "{ahead} planned, {taken} taken");
            assert!(pieces.next().await.is_some());
        }
        let ended = tokio::time::timeout(std::time::Duration::from_secs(60), pieces.end());
        assert!(ended.await.expect("the walk stopped").is_ok());
        assert!(planned.load(AtomicOrdering::SeqCst) > 3 * most);
    }

    /// A piece says the walk is over only when every piece has been planned, and says so
    /// from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_piece_says_the_walk_is_over_only_once_it_is() {
        use std::sync::atomic::AtomicUsize;
        const PIECES: usize = 40;
        for _ in 0..20 {
            let planned = Arc::new(AtomicUsize::new(0));
            let counted = planned.clone();
            let mut pieces = Pieces::start(
                |sink| {
                    let one = entry("f", Kind::File, 1, 0).entry;
                    for _ in 0..PIECES {
                        sink((vec![one.clone(); 64], Vec::new()));
                    }
                    Ok(())
                },
                move |_| {
                    counted.fetch_add(1, AtomicOrdering::SeqCst);
                    Plan::default()
                },
            );
            let (mut taken, mut over) = (0, false);
            while let Some(piece) = pieces.next().await {
                taken += 1;
                assert!(
                    !over || piece.whole,
                    "piece {taken} took back the walk's end"
                );
                over = piece.whole;
                if over {
                    assert_eq!(planned.load(AtomicOrdering::SeqCst), PIECES);
                }
            }
            assert_eq!(taken, PIECES);
            pieces.end().await.unwrap();
        }
    }

    /// The summary of `d` asked for over a session whose far end the test plays: the asking
    /// task, the request's id, and the far end's writer.
    async fn summary_of_d_asked() -> (
        tokio::task::JoinHandle<Result<Vec<Summarized>, SessionError>>,
        ferry_protocol::message::RequestId,
        ferry_protocol::connection::FrameWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
    ) {
        use ferry_protocol::message::Message;
        let (session, (mut far_r, far_w)) = crate::session::in_memory();
        let asking = tokio::spawn(async move {
            let d = [RelPath::from("d")];
            session.summaries(&d, rules(false).cmp).await
        });
        let id = match far_r.read().await {
            Ok(Some(Message::Summarize { id, .. })) => id,
            other => panic!("{other:?}"),
        };
        (asking, id, far_w)
    }

    /// A receiver's summary of a directory holds that directory's entries and nothing else:
    /// one elsewhere ends the session.
    #[tokio::test]
    async fn a_summary_holding_an_entry_outside_its_directory_is_refused() {
        use ferry_protocol::message::Message;
        for (held, fine) in [("d/x", true), ("e/x", false), ("d/x/y", false)] {
            let (asking, id, mut far_w) = summary_of_d_asked().await;
            let reply = Message::Summary {
                id,
                dir: Some(entry("d", Kind::Dir, 1, 0).entry),
                entries: vec![entry(held, Kind::File, 1, 0)],
                below: 1,
            };
            far_w.write(&reply).await.unwrap();
            match asking.await.unwrap() {
                Ok(s) => assert!(fine && s[0].entries.len() == 1, "{held} taken"),
                Err(e) => assert!(!fine && e.to_string().contains(held), "{held}: {e}"),
            }
        }
    }

    /// A round of the descent takes up to 256 directories while the entries below them stay
    /// within 65,536, and one however wide.
    #[test]
    fn a_round_takes_directories_up_to_its_entries() {
        let queue: VecDeque<RelPath> = (0..300)
            .map(|i| RelPath::from(format!("d{i}").as_str()))
            .collect();
        assert_eq!(round(&queue, |_| 10), DIRS_AT_ONCE);
        assert_eq!(round(&queue, |_| 4_000), 16);
        assert_eq!(round(&queue, |_| 1_000_000), 1);
        let first_wide = |p: &RelPath| if p.as_bytes() == b"d0" { 70_000 } else { 1 };
        assert_eq!(round(&queue, first_wide), 1);
        assert_eq!(round(&VecDeque::new(), |_| 1), 0);
    }

    /// A summary in steps (`MoreDigests`, then `Summary`) is taken whole, in order; an entry
    /// outside the directory in any step ends the session as in the final one.
    #[tokio::test]
    async fn a_summary_in_steps_is_taken_whole_and_checked_in_every_step() {
        use ferry_protocol::message::Message;
        for stray_in in [None, Some(0), Some(1), Some(2)] {
            let (asking, id, mut far_w) = summary_of_d_asked().await;
            let step = |k: usize| {
                let name = if stray_in == Some(k) { "e/x" } else { "d/x" };
                vec![entry(&format!("{name}{k}"), Kind::File, 1, 0)]
            };
            for k in 0..2 {
                let more = Message::MoreDigests {
                    id,
                    entries: step(k),
                };
                far_w.write(&more).await.unwrap();
            }
            let last = Message::Summary {
                id,
                dir: Some(entry("d", Kind::Dir, 1, 0).entry),
                entries: step(2),
                below: 3,
            };
            far_w.write(&last).await.unwrap();
            match (asking.await.unwrap(), stray_in) {
                (Ok(s), None) => {
                    let names: Vec<String> = s[0]
                        .entries
                        .iter()
                        .map(|e| e.entry.path.to_string())
                        .collect();
                    assert_eq!(names, ["d/x0", "d/x1", "d/x2"]);
                }
                (Err(e), Some(k)) => assert!(e.to_string().contains(&format!("e/x{k}")), "{e}"),
                (got, stray) => panic!("stray entry in step {stray:?}: {got:?}"),
            }
        }
    }

    /// Each way two directories' entries can differ, and where the compare goes for it.
    #[test]
    fn a_directory_compared_says_where_to_go_on() {
        let local = vec![
            entry("d/changed", Kind::Dir, 1, 2),
            entry("d/equal", Kind::File, 1, 0),
            entry("d/new", Kind::Dir, 1, 0),
            entry("d/retyped", Kind::Dir, 1, 0),
            entry("d/same", Kind::Dir, 1, 7),
            entry("d/touched", Kind::Dir, 2, 7),
        ];
        let remote = vec![
            entry("d/changed", Kind::Dir, 1, 3),
            entry("d/equal", Kind::File, 1, 0),
            entry("d/gone", Kind::Dir, 1, 0),
            entry("d/retyped", Kind::File, 1, 0),
            entry("d/same", Kind::Dir, 1, 7),
            entry("d/touched", Kind::Dir, 1, 7),
        ];
        let step = compare_dir(&local, &remote, rules(false));
        assert_eq!(paths(&step.descend), ["d/changed"]);
        assert_eq!(paths(&step.subtrees), ["d/gone", "d/new", "d/retyped"]);
        assert!(!step.shallow);
        let meta: Vec<String> = step.dir_meta.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(meta, ["d/touched"]);

        // A file changed, one gone, one new: the directory's entries are planned.
        for (l, r) in [
            (
                vec![entry("d/f", Kind::File, 2, 0)],
                vec![entry("d/f", Kind::File, 1, 0)],
            ),
            (vec![], vec![entry("d/f", Kind::File, 1, 0)]),
            (vec![entry("d/f", Kind::File, 1, 0)], vec![]),
        ] {
            let step = compare_dir(&l, &r, rules(false));
            assert!(step.shallow && step.subtrees.is_empty() && step.descend.is_empty());
        }
    }

    /// A directory to plan that holds a file with several names, on either side and changed
    /// or not, sends the compare to the full listing, only when hard links are compared.
    #[test]
    fn planning_beside_a_linked_file_needs_the_whole_tree_only_when_links_are_compared() {
        let mut linked = entry("d/a", Kind::File, 1, 0);
        linked.entry.inode = Some(Inode { dev: 1, ino: 2 });
        let (changed, was) = (
            entry("d/b", Kind::File, 2, 0),
            entry("d/b", Kind::File, 1, 0),
        );
        let local = vec![linked.clone(), changed];
        let plain = vec![entry("d/a", Kind::File, 1, 0), was];
        for (l, r) in [(&local, &plain), (&plain, &local)] {
            assert!(compare_dir(l, r, rules(true)).linked);
            assert!(!compare_dir(l, r, rules(false)).linked);
        }
        // Nothing to plan: the link alone sends nowhere.
        let same = vec![linked.clone()];
        assert_eq!(compare_dir(&same, &same, rules(true)), DirStep::default());
    }
}
