//! The ferry sender: keeps receiver modules equal to local source trees.
//!
//! # Layout
//! - [`config`]: `sender.toml` parsed and validated into one typed [`config::Config`].
//! - [`filter`]: rsync-style exclude patterns.
//! - [`plan`]: pure planning — which deletes, creations, content and metadata updates turn
//!   the receiver's listing into the source listing.
//! - [`session`]: one TLS connection to one module; requests out, replies routed back, many
//!   in flight.
//! - [`transfer`]: sending one file (whole or as windowed deltas) with its digest.
//! - [`reconcile`]: scan + list + plan + execute, for `send --once` and daemon start-up.
//! - [`rsync`]: compatibility mode, driving the `rsync` client against a stock rsyncd.
//! - [`verify`]: top-down digest comparison of two trees, local or remote.
#![warn(missing_docs)]

pub mod batch;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod execute;
pub mod filter;
pub mod plan;
pub mod queue;
pub mod reconcile;
pub mod route;
pub mod rsync;
pub mod session;
pub mod transfer;
pub mod verify;
pub mod watch;
pub mod worker;

pub use config::Config;
