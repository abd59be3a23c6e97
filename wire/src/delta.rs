//! rsync-style deltas on top of fast_rsync, with bounded memory and hostile-peer checks.
//!
//! The receiver signs its whole current copy ([`sign`]); the sender cuts the new file into
//! windows of at most [`WINDOW`] bytes and diffs each window against that one signature
//! ([`diff_window`]), so the sender never holds more than one window and one delta in memory.
//! The receiver rebuilds each window from its mmapped base with `apply_limited`
//! ([`apply_window`]), which cannot write more than the window length. A match that straddles
//! two windows is lost, which costs at most one block per window.

use crate::body::WindowDigest;
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
/// Most window digests a `Signature` carries: with a signature of [`MAX_SIGNATURE`] they fit
/// one frame. A copy of more windows (over 2 TiB) sends none, and is searched block by block.
pub const MAX_WINDOWS: usize = (crate::frame::MAX_FRAME - MAX_SIGNATURE - 64 * 1024) / 32;
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
    /// The peer's delta is malformed or copies from outside the base.
    #[error("invalid delta from peer: {0}")]
    BadDelta(&'static str),
    /// Reading the base failed (it may have been changed under us); only this file fails.
    #[error("reading the base: {0}")]
    Base(#[from] std::io::Error),
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

/// A base's signature and the digests of its windows (see [`BodyDigest`]), made in one read.
///
/// [`BodyDigest`]: crate::body::BodyDigest
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The serialized signature.
    pub signature: Vec<u8>,
    /// The digest of each [`WINDOW`] of the base, the last possibly short.
    pub windows: Vec<WindowDigest>,
}

/// [`Signed`] of the first `len` bytes of an open base file, read in chunks of whole blocks
/// with `pread` (never mapped: a file truncated meanwhile is an error for this file, not a
/// SIGBUS for the process). Its signature equals [`sign`] of the same bytes: a signature is
/// its header plus one entry per block, so chunk signatures concatenate.
pub fn sign_file(base: &std::fs::File, len: u64) -> std::io::Result<Signed> {
    use std::os::unix::fs::FileExt;
    let block = block_size_for(len);
    let options = SignatureOptions {
        block_size: block,
        crypto_hash_size: CRYPTO_HASH_SIZE,
    };
    // A whole number of blocks and of windows (both powers of two).
    let chunk_len = (block as usize).max(WINDOW);
    let mut buf = vec![0; chunk_len.min(len as usize).max(1)];
    let mut out = Vec::new();
    let mut windows = Vec::new();
    let mut at = 0u64;
    loop {
        let n = buf.len().min((len - at) as usize);
        base.read_exact_at(&mut buf[..n], at)?;
        let sig = Signature::calculate(&buf[..n], options).into_serialized();
        out.extend_from_slice(if at == 0 { &sig[..] } else { &sig[HEADER..] });
        for (i, w) in buf[..n].chunks(WINDOW).enumerate() {
            windows.push(window_digest(at + (i * WINDOW) as u64, w));
        }
        at += n as u64;
        if at >= len {
            return Ok(Signed {
                signature: out,
                windows,
            });
        }
    }
}

/// The digest of the window of `data` that starts at `at` (a multiple of [`WINDOW`]).
pub fn window_digest(at: u64, data: &[u8]) -> WindowDigest {
    use blake3::hazmat::HasherExt;
    let mut h = blake3::Hasher::new();
    h.set_input_offset(at);
    h.update(data);
    h.finalize_non_root()
}

/// Block size of a serialized signature (checked by [`parse_peer_signature`] when it comes
/// from a peer).
pub fn signature_block(signature: &[u8]) -> Option<u32> {
    let b = signature.get(4..8)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The length of the signature of `len` bytes.
pub fn signature_len(len: u64) -> usize {
    let per = (4 + CRYPTO_HASH_SIZE) as u64;
    HEADER + (len.div_ceil(block_size_for(len) as u64) * per) as usize
}

/// The header of a signature with blocks of `block` bytes and no entries yet.
pub fn signature_header(block: u32) -> Vec<u8> {
    let mut h = MD4_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&block.to_be_bytes());
    h.extend_from_slice(&CRYPTO_HASH_SIZE.to_be_bytes());
    h
}

/// The entries of `signature` (blocks of `block` bytes, a power of two up to [`WINDOW`] or a
/// multiple of it) for the `len` bytes from `at`, a multiple of both: `None` if it has fewer.
pub fn signature_entries(signature: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let block = signature_block(signature)? as u64;
    if block == 0 || at % block != 0 {
        return None;
    }
    let per = (4 + CRYPTO_HASH_SIZE) as u64;
    let first = HEADER as u64 + at / block * per;
    let end = first + len.div_ceil(block) * per;
    signature.get(first as usize..end as usize)
}

/// The signature entries of `data` (from a block boundary) with blocks of `block` bytes.
pub fn sign_entries(data: &[u8], block: u32) -> Vec<u8> {
    let options = SignatureOptions {
        block_size: block,
        crypto_hash_size: CRYPTO_HASH_SIZE,
    };
    let mut sig = Signature::calculate(data, options).into_serialized();
    sig.drain(..HEADER);
    sig
}

/// A signature made as a file's bytes go by, in pieces of any size: equal to [`sign`] of them
/// all. Whole blocks are signed straight from the pieces, only a block split between two of
/// them is copied.
pub struct Signer {
    sig: Vec<u8>,
    block: u32,
    carry: Vec<u8>,
    /// Bytes counted so far.
    fed: u64,
    /// The file's length.
    len: u64,
}

impl Signer {
    /// A signer of a file of `len` bytes; `None` where a window is not a whole number of its
    /// blocks (files of terabytes).
    pub fn new(len: u64) -> Option<Signer> {
        let block = block_size_for(len);
        (block as usize <= WINDOW).then(|| Signer {
            sig: signature_header(block),
            block,
            carry: Vec::new(),
            fed: 0,
            len,
        })
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut data: &[u8]) {
        let block = self.block as usize;
        self.fed += data.len() as u64;
        if !self.carry.is_empty() {
            let take = data.len().min(block - self.carry.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < block {
                return;
            }
            self.sig
                .extend_from_slice(&sign_entries(&self.carry, self.block));
            self.carry.clear();
        }
        let whole = data.len() / block * block;
        if whole > 0 {
            self.sig
                .extend_from_slice(&sign_entries(&data[..whole], self.block));
        }
        self.carry.extend_from_slice(&data[whole..]);
    }

    /// The next `len` bytes of the file, by the entries of a signature with the same blocks
    /// that holds them; only at a block's start. Returns whether they were taken.
    pub fn known(&mut self, signature: &[u8], at: u64, len: u64) -> bool {
        if !self.carry.is_empty()
            || at != self.fed
            || signature_block(signature) != Some(self.block)
        {
            return false;
        }
        match signature_entries(signature, at, len) {
            Some(entries) => {
                self.sig.extend_from_slice(entries);
                self.fed += len;
                true
            }
            None => false,
        }
    }

    /// The signature, if every byte of the file was counted.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        if !self.carry.is_empty() {
            let last = std::mem::take(&mut self.carry);
            self.sig.extend_from_slice(&sign_entries(&last, self.block));
        }
        (self.fed == self.len && self.sig.len() == signature_len(self.len)).then_some(self.sig)
    }
}

/// The delta of a window that is the base's bytes from `offset`, `len` of them: one copy.
pub fn copy_delta(offset: u64, len: u64) -> Vec<u8> {
    let mut d = DELTA_MAGIC.to_be_bytes().to_vec();
    d.push(OP_COPY_N8_N8);
    d.extend_from_slice(&offset.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.push(OP_END);
    d
}

/// If `delta` is one copy and nothing else, its offset and length.
pub fn single_copy(delta: &[u8]) -> Option<(u64, u64)> {
    let rest = delta.strip_prefix(&DELTA_MAGIC.to_be_bytes()[..])?;
    let (&cmd, rest) = rest.split_first()?;
    if !(OP_COPY_N1_N1..=OP_COPY_N8_N8).contains(&cmd) {
        return None;
    }
    let mode = cmd - OP_COPY_N1_N1;
    let (o, l) = (1usize << (mode / 4), 1usize << (mode % 4));
    if rest.len() != o + l + 1 || rest[o + l] != OP_END {
        return None;
    }
    let uint = |b: &[u8]| b.iter().fold(0u64, |v, x| (v << 8) | *x as u64);
    Some((uint(&rest[..o]), uint(&rest[o..o + l])))
}

/// Delta opcodes (librsync's format, as fast_rsync writes it).
const DELTA_MAGIC: u32 = 0x7273_0236;
const OP_END: u8 = 0;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

/// Applies `delta` to an open base file of `base_len` bytes, appending at most `window_len`
/// (≤ [`WINDOW`]) bytes to `out`. The base is never mapped: the ranges the delta copies are
/// read with `pread` into a compact buffer (at most one window), the delta's copies are
/// pointed at it, and fast_rsync's `apply_limited` rebuilds the window from that. A malformed
/// delta, a copy outside the base, or a base that shrank is an error for this file only.
pub fn apply_window_at(
    base: &std::fs::File,
    base_len: u64,
    delta: &[u8],
    window_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    apply_window_unmoved(base, base_len, delta, window_len, 0, out).map(drop)
}

/// [`apply_window_at`] for the window that starts at offset `at` of the new file, also
/// saying which of its bytes are *unmoved*: copied from the same offset of the base. A new
/// file made as a clone of its base (a reflink) already holds those, so only the rest needs
/// writing. Window-relative ranges, in order, adjacent ones merged.
pub fn apply_window_unmoved(
    base: &std::fs::File,
    base_len: u64,
    delta: &[u8],
    window_len: u64,
    at: u64,
    out: &mut Vec<u8>,
) -> Result<Vec<std::ops::Range<usize>>, DeltaError> {
    use std::os::unix::fs::FileExt;
    let mut unmoved: Vec<std::ops::Range<usize>> = Vec::new();
    let limit = window_len.min(WINDOW as u64);
    let mut rest = delta;
    let mut take = |n: usize| -> Result<&[u8], DeltaError> {
        if rest.len() < n {
            return Err(DeltaError::BadDelta("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let uint = |b: &[u8]| b.iter().fold(0u64, |v, x| (v << 8) | *x as u64);
    if uint(take(4)?) != DELTA_MAGIC as u64 {
        return Err(DeltaError::BadDelta("not a delta"));
    }
    let mut compact: Vec<u8> = Vec::new();
    let mut rewritten: Vec<u8> = DELTA_MAGIC.to_be_bytes().to_vec();
    let mut produced = 0u64;
    loop {
        let cmd = take(1)?[0];
        match cmd {
            OP_END => break,
            1..=OP_LITERAL_N8 => {
                let (len_bytes, n) = if cmd <= OP_LITERAL_64 {
                    (&[][..], cmd as u64)
                } else {
                    let w = 1usize << (cmd - OP_LITERAL_N1);
                    let b = take(w)?;
                    (b, uint(b))
                };
                produced = produced.saturating_add(n);
                if produced > limit {
                    return Err(DeltaError::BadDelta("more than the window"));
                }
                let data = take(n as usize)?;
                rewritten.push(cmd);
                rewritten.extend_from_slice(len_bytes);
                rewritten.extend_from_slice(data);
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = uint(take(1 << (mode / 4))?);
                let len = uint(take(1 << (mode % 4))?);
                produced = produced.saturating_add(len);
                if len == 0 || produced > limit {
                    return Err(DeltaError::BadDelta("copy length out of range"));
                }
                if offset.checked_add(len).is_none_or(|end| end > base_len) {
                    return Err(DeltaError::BadDelta("copy outside the base"));
                }
                let start = (produced - len) as usize;
                if offset == at.saturating_add(start as u64) {
                    match unmoved.last_mut() {
                        Some(last) if last.end == start => last.end = produced as usize,
                        _ => unmoved.push(start..produced as usize),
                    }
                }
                let at = compact.len();
                compact.resize(at + len as usize, 0);
                base.read_exact_at(&mut compact[at..], offset)?;
                rewritten.push(OP_COPY_N8_N8);
                rewritten.extend_from_slice(&(at as u64).to_be_bytes());
                rewritten.extend_from_slice(&len.to_be_bytes());
            }
            _ => return Err(DeltaError::BadDelta("unknown command")),
        }
    }
    if !rest.is_empty() {
        return Err(DeltaError::BadDelta("data after the end"));
    }
    rewritten.push(OP_END);
    apply_window(&compact, &rewritten, window_len, out)?;
    Ok(unmoved)
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
pub(crate) mod tests {
    use super::*;

    /// `len` bytes of xorshift noise from `seed`.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    #[test]
    fn signing_a_file_in_chunks_equals_signing_it_whole() {
        for len in [0usize, 1, 1023, 4096, 3 * WINDOW + 12345] {
            let data = pseudo_random(len, len as u64);
            let f = file_of(&data);
            let signed = sign_file(&f, len as u64).unwrap();
            assert_eq!(signed.signature, sign(&data), "len {len}");
            // The window digests are those a body digest of the same bytes keeps.
            let mut d = crate::body::BodyDigest::new();
            d.data(&data);
            assert_eq!(
                Some(signed.windows),
                d.windows().or(Some(vec![])),
                "len {len}"
            );
        }
    }

    #[test]
    fn a_signature_is_cut_and_made_window_by_window() {
        let data = pseudo_random(2 * WINDOW + 5000, 9);
        let whole = sign(&data);
        let block = signature_block(&whole).unwrap();
        let mut pieced = signature_header(block);
        for (i, w) in data.chunks(WINDOW).enumerate() {
            let at = (i * WINDOW) as u64;
            let entries = signature_entries(&whole, at, w.len() as u64).unwrap();
            assert_eq!(entries, sign_entries(w, block), "window {i}");
            pieced.extend_from_slice(entries);
        }
        assert_eq!(pieced, whole);
        assert_eq!(signature_len(data.len() as u64), whole.len());
        assert_eq!(signature_entries(&whole, 3 * WINDOW as u64, 1), None);
    }

    #[test]
    fn a_signature_made_piece_by_piece_equals_signing_it_whole() {
        let data = pseudo_random(2 * WINDOW + 70_001, 11);
        let whole = sign(&data);
        for step in [1000usize, 16 << 10, 100_003, WINDOW] {
            let mut s = Signer::new(data.len() as u64).unwrap();
            for piece in data.chunks(step) {
                s.feed(piece);
            }
            assert_eq!(s.finish().as_ref(), Some(&whole), "step {step}");
        }
        // A window taken from a signature that holds it.
        let mut s = Signer::new(data.len() as u64).unwrap();
        s.feed(&data[..WINDOW]);
        assert!(s.known(&whole, WINDOW as u64, WINDOW as u64));
        s.feed(&data[2 * WINDOW..]);
        assert_eq!(s.finish().as_ref(), Some(&whole));
        // Not mid-block, nor with other blocks; and short of the whole file there is none.
        let mut s = Signer::new(data.len() as u64).unwrap();
        s.feed(&data[..10]);
        assert!(!s.known(&whole, 10, WINDOW as u64));
        assert!(!s.known(&sign(&data[..5000]), 0, 5000));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn a_single_copy_is_made_and_recognised_in_every_width() {
        for (offset, len) in [(0, 1), (8 << 20, 8 << 20), (u64::MAX - 5, 3)] {
            let d = copy_delta(offset, len);
            assert_eq!(single_copy(&d), Some((offset, len)));
        }
        // fast_rsync's own delta of an unchanged window: one copy in narrower fields.
        let base = pseudo_random(3 * 1024 * 1024, 4);
        let sig = parse_peer_signature(sign(&base)).unwrap();
        let mut d = Vec::new();
        diff_window(&sig.index(), &base[1 << 20..2 << 20], &mut d).unwrap();
        assert_eq!(single_copy(&d), Some((1 << 20, 1 << 20)));
        // Anything more is not a single copy.
        let mut two = copy_delta(0, 4);
        two.pop();
        two.extend_from_slice(&copy_delta(4, 4)[4..]);
        assert_eq!(single_copy(&two), None);
        let mut literal = Vec::new();
        diff_window(&sig.index(), b"not in the base at all", &mut literal).unwrap();
        assert_eq!(single_copy(&literal), None);
        assert_eq!(single_copy(b""), None);
    }

    #[test]
    fn applying_from_a_file_equals_applying_from_memory() {
        let base = pseudo_random(3 * 1024 * 1024 + 17, 5);
        let mut new = base.clone();
        new[100..200].fill(7);
        new[2_000_000..2_000_050].fill(9);
        let f = file_of(&base);
        let index = parse_peer_signature(sign(&base)).unwrap();
        let index = index.index();
        for window in new.chunks(1024 * 1024 + 3) {
            let mut delta = Vec::new();
            diff_window(&index, window, &mut delta).unwrap();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            apply_window(&base, &delta, window.len() as u64, &mut a).unwrap();
            apply_window_at(&f, base.len() as u64, &delta, window.len() as u64, &mut b).unwrap();
            assert_eq!(a, b);
            assert_eq!(b, window);
        }
    }

    #[test]
    fn a_base_that_shrank_or_a_copy_outside_it_is_an_error_not_a_crash() {
        let base = pseudo_random(200_000, 6);
        let index = parse_peer_signature(sign(&base)).unwrap();
        let mut delta = Vec::new();
        diff_window(&index.index(), &base, &mut delta).unwrap();
        let f = file_of(&base);
        f.set_len(1000).unwrap();
        let mut out = Vec::new();
        // The announced length is stale: the reads run short.
        assert!(apply_window_at(&f, 200_000, &delta, 200_000, &mut out).is_err());
        assert!(matches!(
            apply_window_at(&f, 1000, &delta, 200_000, &mut out),
            Err(DeltaError::BadDelta(_))
        ));
        let mut garbage = DELTA_MAGIC.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[
            OP_COPY_N8_N8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
        ]);
        assert!(apply_window_at(&f, 1000, &garbage, 1000, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn unmoved_ranges_are_the_copies_from_the_same_offset() {
        // 64 KiB of base; the new file changes 100 bytes at 10,000 and moves nothing else.
        let base = pseudo_random(64 << 10, 3);
        let mut new = base.clone();
        new[10_000..10_100].copy_from_slice(&pseudo_random(100, 4));
        let f = file_of(&base);
        let sig = parse_peer_signature(sign(&base)).unwrap();
        let mut d = Vec::new();
        diff_window(&sig.index(), &new, &mut d).unwrap();
        let mut out = Vec::new();
        let unmoved =
            apply_window_unmoved(&f, base.len() as u64, &d, new.len() as u64, 0, &mut out).unwrap();
        assert_eq!(out, new);
        let block = block_size_for(base.len() as u64) as usize;
        // Everything but the changed block is unmoved, in two ranges.
        assert_eq!(unmoved.len(), 2, "{unmoved:?}");
        let kept: usize = unmoved.iter().map(|r| r.len()).sum();
        assert!(kept >= new.len() - 2 * block, "{kept} of {}", new.len());
        for r in &unmoved {
            assert_eq!(&out[r.clone()], &base[r.clone()]);
            assert!(!r.contains(&10_050), "{r:?}");
        }
        // The same delta seen as a window further on: copies from offset 0 have moved.
        let unmoved =
            apply_window_unmoved(&f, base.len() as u64, &d, new.len() as u64, 4096, &mut out)
                .unwrap();
        assert!(unmoved.is_empty(), "{unmoved:?}");
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

    proptest::proptest! {
        #[test]
        fn any_delta_bytes_fail_cleanly_or_fill_the_window(
            base in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            window in 0u64..8192,
        ) {
            let f = file_of(&base);
            let mut d = DELTA_MAGIC.to_be_bytes().to_vec();
            d.extend_from_slice(&tail);
            let mut out = Vec::new();
            let r = apply_window_at(&f, base.len() as u64, &d, window, &mut out);
            proptest::prop_assert!(out.len() as u64 <= window);
            if r.is_ok() {
                proptest::prop_assert_eq!(out.len() as u64, window);
            }
        }

        #[test]
        fn a_delta_against_a_file_rebuilds_the_new_bytes(
            base in proptest::collection::vec(0u8..4, 0..20_000),
            new in proptest::collection::vec(0u8..4, 1..20_000),
        ) {
            let f = file_of(&base);
            let sig =
                parse_peer_signature(sign_file(&f, base.len() as u64).unwrap().signature).unwrap();
            let mut d = Vec::new();
            diff_window(&sig.index(), &new, &mut d).unwrap();
            let mut out = Vec::new();
            apply_window_at(&f, base.len() as u64, &d, new.len() as u64, &mut out).unwrap();
            proptest::prop_assert_eq!(out, new);
        }
    }
}
