//! The ferry receiver: a TLS server that replaces rsyncd on the backup host.
//!
//! # Layout
//! - [`config`]: `receiver.toml` parsed and validated into one typed [`config::Config`].
//! - [`access`]: who may use which module (fingerprints, host patterns, read-only,
//!   connection limits); pure decisions.
//! - [`confine`]: the one function that turns a peer's path into a local path under the
//!   module root, refusing every escape.
//! - [`writer`]: the filesystem half of a session (runs on its own thread): staging files,
//!   applying deltas, checking digests, atomic renames and group-committed directory fsyncs.
//! - [`session`]: one connection: TLS handshake, `Hello`, access check, then frames in to the
//!   writer thread and replies out.
//! - [`server`]: the listener, connection limits and shutdown.
#![warn(missing_docs)]

pub mod access;
pub mod config;
pub mod confine;
pub mod server;
pub mod session;
pub mod writer;

pub use config::Config;
pub use server::{run, Loopback, Server};

/// Name of the per-module staging directory that holds files being received. It lives at the
/// module root, is never listed, verified or writable by peers, and is emptied at start-up.
pub const STAGING_DIR: &str = ".ferry-partial";
