//! ferry's wire: the types and rules both peers must agree on, with no sockets, no async
//! runtime, no TLS and no system calls beyond reading an open file (`delta` reads a base it
//! is handed with `pread`). The fuzz targets build on this crate alone; `ferry-protocol` adds
//! the I/O edge and re-exports these modules under the same names.
//!
//! # Layout
//!
//! - [`path`]: [`RelPath`], the `/`-separated relative path that travels on the wire,
//!   and its syntactic validation.
//! - [`meta`]: [`Meta`] and [`Entry`], what `rsync -a` preserves about one tree entry.
//! - [`xattr`]: which attribute namespaces travel and the list an entry carries.
//! - [`message`]: every [`Message`] of the protocol and the handshake constants.
//! - [`frame`]: length-prefixed framing with a hard size cap and a bounded bincode decode.
//! - [`body`]: [`body::BodyDigest`], the digest a file's body travels under (a hole counts
//!   by its place and length, never its zeros).
//! - [`delta`]: signature parameters, peer signature validation, windowed rsync deltas.
//! - [`merkle`]: the digest of a directory listing, so two trees compare top-down.
//! - [`fingerprint`]: `sha256:<hex>` certificate pins.
#![warn(missing_docs)]

pub mod body;
mod byte_buf;
pub mod delta;
pub mod fingerprint;
pub mod frame;
pub mod merkle;
pub mod message;
pub mod meta;
pub mod path;
pub mod xattr;

pub use fingerprint::Fingerprint;
pub use message::Message;
pub use meta::{Entry, Kind, Meta};
pub use path::RelPath;
