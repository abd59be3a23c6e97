//! The ferry sender: keeps receiver modules equal to local source trees.
//!
//! # Layout
//!
//! A live change, in the order it travels:
//! - [`watch`]: one thread per sync group owning its inotify watches or its fanotify reader
//!   ([`fanotify`]); raw events in.
//! - [`route`]: what one raw event means (pure, table-tested): a coalescer event, and which
//!   directories to watch or forget first.
//! - [`coalesce`]: settle and max-delay rules, move pairing, one [`coalesce::Rename`] type
//!   (pure; time passed in).
//! - [`queue`]: a target's dirty paths, renames and retry due times (data).
//! - [`worker`]: the one loop per (group, target): wait, connect with backoff, take a batch,
//!   send it over a transport, put back or settle.
//! - [`ferry_link`]: the ferry transport, [`ferry_link::FerryLink`] (its sessions opened by a
//!   [`ferry_link::Dial`]: TLS to a target, or in memory in tests), and the batch's steps
//!   reported to the log and the observer.
//! - [`batch`]: the live batch pipeline both transports share (renames planned by one rule,
//!   dirty paths read once beneath one held source root), and its run on a ferry target
//!   ([`batch::send_batch`]: renames → read → plan → guard → execute → record, each once).
//! - [`source`]: every read of the source, beneath one held descriptor of its root: a batch's
//!   paths, parents and link names in one pass, subtree scans, and "the source is empty".
//! - [`plan`]: every planning rule (op by kind, whole or delta, directory times, live batches;
//!   pure).
//! - [`execute`]: a plan over a session, many requests in flight; the [`execute::Report`]
//!   and what a [`execute::Watch`] is told step by step.
//! - [`transfer`]: one file: open beneath the held source root (never through a symlink) or,
//!   for a restore the backup host sends, where [`transfer::Origin::Mapped`] says it is,
//!   `fstat`, `FileBegin`, whole chunks or windowed deltas, `FileEnd` with the digest.
//! - [`extents`]: a file's data and holes, read in the order a whole body travels.
//! - [`error`]: [`error::SessionError`], how a session or one of its requests fails.
//! - [`session`]: one connection to one module over any stream (or, turned round, the backup
//!   host's side of a restore: [`session::Session::started`]); requests out, replies routed
//!   back to each request (a oneshot, or a queue for answers in steps; the reader never
//!   waits); any holder closes it.
//! - [`dial`]: TLS to a target with a connect timeout ([`config::Target`]`::connect`), and
//!   keepalives that find a dead peer.
//!
//! Around it:
//! - [`config`]: `sender.toml` parsed and validated into one typed [`config::Config`], one
//!   constructor per section (`Target`, `RsyncTarget`, `SyncGroup::from_raw`; `SyncGroup::new`
//!   for a group with every default; [`config::Preserve`] for `preserve = [...]`).
//! - [`filter`]: rsync-style exclude patterns.
//! - [`guard`]: the mass-delete rule, the live tally of deletions it is applied to, and the
//!   allowance both transports delete up to (a ferry receiver counts each delete against it).
//! - [`links`]: the names of the source's multiply-linked files, learned as the group runs.
//! - [`reconcile`]: scan + list + plan (+ the guard over a whole tree) + execute of a whole
//!   tree or a subtree (`send --once`, start-up, overflow, new directories).
//! - [`rsync`]: compatibility mode: the rsync transport and its command lines (deletions under
//!   the guard through `--max-delete`); `rsync::output` reads its exit codes, messages and
//!   itemized changes.
//! - [`timing`]: every delay of the live loop in one value, and the clock it reads.
//! - [`daemon`]: wiring: watchers, queues and workers for every group and target; reloads.
//! - [`reload`]: which groups a reload keeps, starts, restarts and stops (pure).
//! - [`status`]: what each (group, target) pair is doing, for `ferry status` and metrics.
//! - [`verify`]: top-down digest comparison of two trees, local or remote.
#![warn(missing_docs)]

pub mod batch;
pub mod coalesce;
pub mod config;
pub mod config_reference;
pub mod daemon;
pub mod descend;
pub mod dial;
pub mod error;
pub mod execute;
pub mod extents;
pub mod fanotify;
pub mod ferry_link;
pub mod filter;
pub mod guard;
pub mod links;
pub mod plan;
pub mod queue;
pub mod reconcile;
pub mod reload;
pub mod route;
pub mod rsync;
pub mod session;
pub mod source;
pub mod status;
pub mod timing;
pub mod transfer;
pub mod verify;
pub mod watch;
pub mod worker;

pub use config::Config;
