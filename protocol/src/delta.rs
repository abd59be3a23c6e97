//! rsync-style deltas on top of fast_rsync, with bounded memory and hostile-peer checks.
//!
//! The receiver signs its whole current copy ([`sign`]); the sender cuts the new file into
//! windows of at most [`WINDOW`] bytes and diffs each window against that one signature
//! ([`diff_window`]), so the sender never holds more than one window and one delta in memory.
//! The receiver rebuilds each window from its mmapped base with `apply_limited`
//! ([`apply_window`]), which cannot write more than the window length. A match that straddles
//! two windows is lost, which costs at most one block per window.

use fast_rsync::{Signature, SignatureOptions};

/// Largest window of the new file diffed at once.
pub const WINDOW: usize = 8 * 1024 * 1024;
/// Bytes of MD4 kept per block. Eight bytes make an accidental false match negligible; the
/// blake3 check of the whole result catches the rest.
pub const CRYPTO_HASH_SIZE: u32 = 8;
/// Smallest block size accepted from a peer.
pub const MIN_BLOCK: u32 = 256;
/// Largest block size accepted from a peer.
pub const MAX_BLOCK: u32 = 16 * 1024 * 1024;
/// Largest serialized signature produced or accepted.
pub const MAX_SIGNATURE: usize = 8 * 1024 * 1024;
/// Files smaller than this travel whole: a round trip costs more than the bytes.
pub const DELTA_THRESHOLD: u64 = 64 * 1024;
/// Files of this size or more ask the receiver first even when it has no copy, so a
/// transfer that was cut off can resume where it stopped.
pub const RESUME_THRESHOLD: u64 = 1024 * 1024;

const HEADER: usize = 12;
const MD4_MAGIC: u32 = 0x7273_0136;

/// A delta or signature could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The peer's signature is malformed or has parameters outside the accepted range.
    #[error("invalid signature from peer: {0}")]
    BadSignature(&'static str),
    /// fast_rsync could not compute a delta.
    #[error("delta computation failed: {0}")]
    Diff(#[from] fast_rsync::DiffError),
    /// The peer's delta does not apply to our base.
    #[error("delta does not apply: {0}")]
    Apply(#[from] fast_rsync::ApplyError),
    /// The delta rebuilt a window of the wrong length.
    #[error("delta rebuilt {got} bytes, expected {want}")]
    WindowLength {
        /// Bytes produced.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
}

/// Block size for a base of `len` bytes: about `sqrt(len)` like rsync, a power of two between
/// 1 KiB and [`MAX_BLOCK`], large enough that the signature fits [`MAX_SIGNATURE`].
pub fn block_size_for(len: u64) -> u32 {
    let per_block = 4 + CRYPTO_HASH_SIZE as u64;
    let mut block = ((len as f64).sqrt() as u64)
        .next_power_of_two()
        .clamp(1024, MAX_BLOCK as u64);
    while block < MAX_BLOCK as u64
        && len.div_ceil(block) * per_block + HEADER as u64 > MAX_SIGNATURE as u64
    {
        block *= 2;
    }
    block as u32
}

/// Signature of a whole base file.
pub fn sign(base: &[u8]) -> Vec<u8> {
    let options = SignatureOptions {
        block_size: block_size_for(base.len() as u64),
        crypto_hash_size: CRYPTO_HASH_SIZE,
    };
    Signature::calculate(base, options).into_serialized()
}

/// Parses a signature received from a peer, refusing parameters that make fast_rsync panic or
/// loop (`block_size = 0`), oversized hashes, unknown formats and oversized signatures.
pub fn parse_peer_signature(bytes: Vec<u8>) -> Result<Signature, DeltaError> {
    if bytes.len() > MAX_SIGNATURE {
        return Err(DeltaError::BadSignature("too large"));
    }
    let header = bytes
        .get(..HEADER)
        .ok_or(DeltaError::BadSignature("truncated header"))?;
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != MD4_MAGIC {
        return Err(DeltaError::BadSignature("unsupported signature type"));
    }
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&word(4)) {
        return Err(DeltaError::BadSignature("block size out of range"));
    }
    if !(4..=16).contains(&word(8)) {
        return Err(DeltaError::BadSignature("hash size out of range"));
    }
    Signature::deserialize(bytes).map_err(|_| DeltaError::BadSignature("malformed"))
}

/// Appends to `out` the delta that rebuilds `window` from the base behind `signature`.
pub fn diff_window(
    signature: &fast_rsync::IndexedSignature<'_>,
    window: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    fast_rsync::diff(signature, window, out)?;
    Ok(())
}

/// Rebuilds one window of `window_len` bytes (at most [`WINDOW`]) from `base` and a peer's
/// `delta`, appending it to `out`.
pub fn apply_window(
    base: &[u8],
    delta: &[u8],
    window_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    let want = usize::try_from(window_len)
        .unwrap_or(usize::MAX)
        .min(WINDOW);
    let start = out.len();
    fast_rsync::apply_limited(base, delta, out, want)?;
    let got = out.len() - start;
    if got as u64 != window_len {
        out.truncate(start);
        return Err(DeltaError::WindowLength {
            got,
            want: window_len as usize,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn windowed_delta_rebuilds_the_new_file_and_is_small() {
        let base = pseudo_random(3 * 1024 * 1024 + 17, 1);
        let mut new = base.clone();
        new[1_500_000..1_510_000].copy_from_slice(&pseudo_random(10_000, 2));
        new.extend_from_slice(b"tail");
        let sig = parse_peer_signature(sign(&base)).unwrap();
        let index = sig.index();
        let mut rebuilt = Vec::new();
        let mut sent = 0;
        // Small windows to exercise window boundaries.
        for window in new.chunks(1024 * 1024) {
            let mut delta = Vec::new();
            diff_window(&index, window, &mut delta).unwrap();
            sent += delta.len();
            apply_window(&base, &delta, window.len() as u64, &mut rebuilt).unwrap();
        }
        assert_eq!(rebuilt, new);
        assert!(sent < 40_000, "delta too large: {sent}");
    }

    #[test]
    fn hostile_signatures_are_refused() {
        let good = sign(&pseudo_random(10_000, 3));
        let mut zero_block = good.clone();
        zero_block[4..8].copy_from_slice(&0u32.to_be_bytes());
        let mut huge_hash = good.clone();
        huge_hash[8..12].copy_from_slice(&64u32.to_be_bytes());
        let mut blake2 = good.clone();
        blake2[0..4].copy_from_slice(&0x7273_0137u32.to_be_bytes());
        for bad in [
            zero_block,
            huge_hash,
            blake2,
            good[..5].to_vec(),
            vec![0; MAX_SIGNATURE + 1],
        ] {
            assert!(parse_peer_signature(bad).is_err());
        }
        assert!(parse_peer_signature(good).is_ok());
    }

    #[test]
    fn apply_refuses_to_exceed_the_window() {
        let base = pseudo_random(100_000, 4);
        let sig = parse_peer_signature(sign(&base)).unwrap();
        let mut delta = Vec::new();
        diff_window(&sig.index(), &base, &mut delta).unwrap();
        let mut out = Vec::new();
        assert!(apply_window(&base, &delta, 1000, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn block_size_keeps_signature_bounded() {
        for len in [0u64, 1, 4096, 1 << 25, 1 << 35, 1 << 42] {
            let b = block_size_for(len) as u64;
            assert!((1024..=MAX_BLOCK as u64).contains(&b));
            if len < 1 << 42 {
                assert!(
                    len.div_ceil(b) * 12 + 12 <= MAX_SIGNATURE as u64,
                    "len {len} block {b}"
                );
            }
        }
    }
}
