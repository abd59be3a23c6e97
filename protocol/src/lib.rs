//! The ferry wire protocol and everything both peers must agree on.
//!
//! # Layout
//!
//! Pure modules, from the `ferry-wire` crate (no sockets, no async runtime, no TLS) and
//! re-exported here under the same names: [`path`], [`meta`], [`message`], [`frame`],
//! [`body`], [`delta`], [`merkle`], [`fingerprint`], and the attribute types of [`xattr`].
//! - [`tls`]: rustls configurations for TLS 1.3 with mutual, pinned authentication.
//!
//! The I/O edge, kept small and named for what it touches:
//! - [`connection`]: the only socket code; reads and writes whole frames.
//! - [`local`]: the only filesystem code; `lstat`s a local tree into [`Entry`]s and keeps the
//!   content-digest cache that `verify` relies on. Both daemons and `verify` share it so the
//!   two sides of a comparison read metadata the same way.
//! - [`identity`]: loads and generates certificate/key PEM files.
//! - [`xattr`]: extended attributes (ACLs and file capabilities among them): reading and
//!   applying them through held descriptors.
//!
//! Shared by both daemons: [`config_text`], where a configuration key is (for errors that
//! name the line); [`liveness`], which main loops are still turning (for the
//! service watchdog).
#![warn(missing_docs)]

pub mod config_reference;
pub mod config_text;
pub mod connection;
pub mod identity;
pub mod liveness;
pub mod local;
pub mod pace;
pub mod said;
pub mod tls;
pub mod xattr;

pub use ferry_wire::{body, delta, frame, merkle, message, meta, path};

/// Certificate pins ([`ferry_wire::fingerprint`]), and computing one from a certificate.
pub mod fingerprint {
    pub use ferry_wire::fingerprint::*;

    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint::from_sha256(out)
    }
}

pub use fingerprint::Fingerprint;
pub use message::Message;
pub use meta::{Entry, Kind, Meta};
pub use path::RelPath;

/// Sets the allocator up for a daemon that moves 8 MiB windows through several threads; call
/// once, first thing in `main`. glibc's defaults raise the `mmap` threshold to the largest
/// block ever freed and the trim threshold to twice that, so after one 8 MiB window every
/// thread arena keeps up to 16 MiB it no longer uses, which `malloc_trim` cannot return (it
/// never trims the top of a thread arena). Measured on the receiver after a 256 MiB delta:
/// 36 MB resident at rest with the defaults, 12 MB with these. Fixed values: blocks under
/// 16 MiB (every frame and window) are reused from the arenas, not mapped and faulted in
/// each time (a 256 KiB threshold cost twice the system time), and an arena keeps at most
/// 4 MiB of free space at its top.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Raises the soft limit of open descriptors to the hard one. A receiver's session holds a
/// descriptor per file waiting for its group commit (up to two commits' worth while one is
/// flushed behind the loop) and a sender one per file in flight, so several sessions pass the
/// usual soft limit of 1,024 long before the hard limit the administrator set (the units set
/// both). Left as it is if it cannot be read or set.
pub fn raise_descriptor_limit() {
    if let Some(mut lim) = descriptor_limits().filter(|l| l.rlim_cur < l.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct passed.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The soft limit of open descriptors, if it can be read.
pub fn descriptor_limit() -> Option<u64> {
    descriptor_limits().map(|l| l.rlim_cur)
}

fn descriptor_limits() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Hands memory freed by a finished piece of work (a session, a whole-tree compare) back to
/// the system: free blocks inside the arenas, which the trim threshold does not cover.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// An I/O error as an operator reads it: the system's words without Rust's `(os error N)`.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    fn nofile() -> libc::rlimit {
        super::descriptor_limits().expect("the descriptor limit is readable")
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_one() {
        let mut lim = nofile();
        // Just below the hard limit: lowered, and still no bound on tests running beside.
        lim.rlim_cur = lim.rlim_max - 1;
        // SAFETY: setrlimit only reads the struct passed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        super::raise_descriptor_limit();
        let now = nofile();
        assert_eq!(now.rlim_cur, now.rlim_max);
    }
}
