//! The ferry wire protocol and everything both peers must agree on.
//!
//! # Layout
//!
//! Pure modules (no sockets, no files, no clock):
//! - [`path`]: [`RelPath`], the `/`-separated relative path that travels on the wire,
//!   and its syntactic validation.
//! - [`meta`]: [`Meta`] and [`Entry`], what `rsync -a` preserves about one tree entry.
//! - [`message`]: every [`Message`] of the protocol and the handshake constants.
//! - [`frame`]: length-prefixed framing with a hard size cap and a bounded bincode decode.
//! - [`delta`]: signature parameters, peer signature validation, windowed rsync deltas.
//! - [`merkle`]: the digest of a directory listing, so two trees compare top-down.
//! - [`fingerprint`]: `sha256:<hex>` certificate pins.
//! - [`tls`]: rustls configurations for TLS 1.3 with mutual, pinned authentication.
//!
//! The I/O edge, kept small and named for what it touches:
//! - [`connection`]: the only socket code; reads and writes whole frames.
//! - [`local`]: the only filesystem code; `lstat`s a local tree into [`Entry`]s and keeps the
//!   content-digest cache that `verify` relies on. Both daemons and `verify` share it so the
//!   two sides of a comparison read metadata the same way.
//! - [`identity`]: loads and generates certificate/key PEM files.
#![warn(missing_docs)]

pub mod connection;
pub mod delta;
pub mod fingerprint;
pub mod frame;
pub mod identity;
pub mod local;
pub mod merkle;
pub mod message;
pub mod meta;
pub mod path;
pub mod tls;

pub use fingerprint::Fingerprint;
pub use message::Message;
pub use meta::{Entry, Kind, Meta};
pub use path::RelPath;

/// An I/O error as an operator reads it: the system's words without Rust's `(os error N)`.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}
