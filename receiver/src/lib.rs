//! The ferry receiver: a TLS server that replaces rsyncd on the backup host.
//!
//! # Layout
//! - [`config`]: `receiver.toml` parsed and validated into one typed [`config::Config`].
//! - [`admission`]: what an unauthenticated peer can cost (handshake slots per address and in
//!   all, session slots).
//! - [`access`]: who may use which module (fingerprints, host patterns, read-only,
//!   connection limits); pure decisions.
//! - [`confine`]: the one function that turns a peer's path into a local path under the
//!   module root, refusing every escape.
//! - [`history`]: a module's history: superseded states linked or moved into `objects/`, the
//!   SQLite journal that says what each was, retention and pruning.
//! - [`hosts`]: `hosts_allow` patterns (addresses and CIDR blocks).
//! - [`module`]: a served module's state: what its filesystem supports, opened once.
//! - [`lease`]: a module's write lease, for several receivers (gateways) serving it on a shared
//!   filesystem: taken, renewed, lost and given up; no clocks compared between hosts.
//! - [`leftovers`]: start-up removal of what an earlier run left in a module, and the name
//!   prefix of this process's own entries in flight.
//! - [`stats`]: the process's counters.
//! - [`session`]: one connection: TLS handshake, `Hello`, access check, then frames in to the
//!   request loop and replies out ([`session::answer`], which a restore client runs for its
//!   destination too).
//! - [`requests`]: the request loop of a session (its own thread): dispatch in arrival order,
//!   one answer per request, group commit, the read requests (List, VerifyDir, Stats), and
//!   deletes counted against the sender's allowance (its delete guard) and held past it.
//! - [`apply`]: changes to the module tree (mkdir, symlink, special, metadata, delete, rename,
//!   installing staged entries), each through [`confine`].
//! - [`commit`]: the group commit: sealed files made durable together, then named, then the
//!   directories whose entries changed flushed, before any of it is acknowledged.
//! - [`kept`]: what a change supersedes, kept in the module's history before the change, and a
//!   directory's times before a change in it moves them.
//! - [`incoming`]: files being received: staging, deltas against the current copy, digest
//!   check, sealing until the group commit makes it durable and installs it atomically.
//! - [`restore`]: a module as it was at a time: written into a new directory on the backup
//!   host, or sent over a restore session ([`restore::serve`]) with the sender's planner and
//!   transfer, to a client that writes it as a receiver does.
//! - [`server`]: the listener, connection limits and shutdown.
#![warn(missing_docs)]

pub mod access;
pub mod admission;
pub mod apply;
pub mod commit;
pub mod config;
pub mod config_reference;
pub mod confine;
pub mod history;
pub mod hosts;
pub mod incoming;
pub mod kept;
pub mod lease;
pub mod leftovers;
pub mod module;
pub mod requests;
pub mod restore;
pub mod server;
pub mod session;
pub mod stats;
pub mod windows;

pub use config::Config;
pub use server::{run, Loopback, Server};

/// Prefix of the names the receiver gives entries just before it renames them into place,
/// and of nothing else. Files are written unnamed (`O_TMPFILE`) in their own directory and
/// linked in at commit; a symlink or special file (which cannot be made unnamed), or a file
/// whose final name exists, gets such a name beside its final one for the moment between
/// creation and rename. Peers may not use these names, listings hide them, and leftovers of
/// a crash are removed when the module is opened. At rest, nothing of ferry's is in a module.
pub const TEMP_PREFIX: &str = ".ferry-tmp.";

/// The staging directory of earlier versions; removed from module roots when they are opened.
pub const LEGACY_STAGING_DIR: &str = ".ferry-partial";
