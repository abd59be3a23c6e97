//! The digest a file's body travels under ([`Message::FileEnd`](crate::Message::FileEnd), and
//! [`Message::Resume`](crate::Message::Resume) for a prefix): fed frame by frame on both
//! sides, at a cost that follows the frames and never the length they stand for.
//!
//! Data bytes are hashed (BLAKE3) as they come, wherever the frames split them. A hole counts
//! by its offset and length, not by the zeros it reads as: a 16 TiB hole costs what its
//! 20-byte frame costs, on the receiver a peer can send it to as on the sender. Adjacent holes
//! count as one. A body without holes has the plain BLAKE3 digest of its bytes; one with holes
//! has a digest over (the data's digest, the holes' digest, the length), in its own domain.
//! Body, hole list and length determine the content, so two bodies with one digest are the
//! same file; the same content sent dense and sent sparse has two digests, which is harmless
//! because both sides feed it the frames that actually travelled.

/// A body digest being computed. Cloning costs its hasher state and one chaining value per
/// [`WINDOW`](crate::delta::WINDOW) fed; [`digest`] does not consume it, so a cut-off transfer
/// can offer its prefix's digest and go on.
///
/// The data's BLAKE3 is kept as the chaining values of its aligned windows (BLAKE3 is a tree
/// hash, and an aligned window of a power-of-two size is one of its subtrees), merged into the
/// root at [`digest`]: the same digest as hashing the bytes in one stream, at the same cost,
/// but a window's value can be compared on its own ([`window`]) and a window already known
/// need not be read again ([`known_window`]).
///
/// [`digest`]: BodyDigest::digest
/// [`window`]: BodyDigest::window
/// [`known_window`]: BodyDigest::known_window
#[derive(Clone)]
pub struct BodyDigest {
    data: Windowed,
    holes: Option<blake3::Hasher>,
    /// Bytes so far, data and holes.
    len: u64,
    /// A hole not yet closed by data: its offset and length.
    open_hole: Option<(u64, u64)>,
}

impl Default for BodyDigest {
    fn default() -> Self {
        BodyDigest::with_window(crate::delta::WINDOW as u64)
    }
}

/// The chaining value of one window: BLAKE3's non-root hash of that subtree, which commits to
/// its bytes, its length and its place.
pub type WindowDigest = blake3::hazmat::ChainingValue;

/// Key-derivation context of a body with holes, so it can never equal a plain digest.
const SPARSE: &str = "ferry 2026-12 sparse file body digest";
/// Key-derivation context of a digest that cannot be computed (a known window that is the
/// whole body): it never equals a real one.
const UNKNOWABLE: &str = "ferry 2026-12 body digest of a lone known window";

impl BodyDigest {
    /// A digest of nothing yet.
    pub fn new() -> BodyDigest {
        BodyDigest::default()
    }

    /// A digest of nothing yet, keeping windows of `window` bytes (a power of two, at least
    /// BLAKE3's chunk).
    fn with_window(window: u64) -> BodyDigest {
        debug_assert!(window.is_power_of_two() && window >= blake3::CHUNK_LEN as u64);
        BodyDigest {
            data: Windowed {
                window,
                done: Vec::new(),
                current: Current::Hashing(blake3::Hasher::new()),
                fed: 0,
            },
            holes: None,
            len: 0,
            open_hole: None,
        }
    }

    /// The next bytes are `data`.
    pub fn data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.close_hole();
        self.data.feed(data);
        self.len += data.len() as u64;
    }

    /// The next `len` bytes are a hole. Constant time.
    pub fn hole(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        match &mut self.open_hole {
            Some((_, open)) => *open += len,
            None => self.open_hole = Some((self.len, len)),
        }
        self.len += len;
    }

    /// The next `len` bytes are window `index`, whose digest is `digest` (known from a copy
    /// that holds the same bytes at the same place): counted without being read. Only at a
    /// window's start, in a body without holes, and for a whole window or the body's last;
    /// returns whether it was taken (if not, the bytes must be fed as [`data`]).
    ///
    /// [`data`]: BodyDigest::data
    pub fn known_window(&mut self, index: u64, len: u64, digest: WindowDigest) -> bool {
        if self.sparse() || len == 0 || len > self.data.window || !self.data.at_window(index) {
            return false;
        }
        self.data.know(digest, len);
        self.len += len;
        true
    }

    /// The digest of window `index` as fed so far: a whole window's once it is whole. `None`
    /// past what was fed, or for a body with holes (its data windows have no place).
    pub fn window(&self, index: u64) -> Option<WindowDigest> {
        if self.sparse() {
            return None;
        }
        self.data.window_digest(index)
    }

    /// The digests of every window fed so far, the last possibly partial; `None` for a body
    /// with holes.
    pub fn windows(&self) -> Option<Vec<WindowDigest>> {
        if self.sparse() || self.data.fed == 0 {
            return None;
        }
        let mut all = self.data.done.clone();
        all.push(self.data.current_digest());
        Some(all)
    }

    /// Bytes fed so far, data and holes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of what was fed so far.
    pub fn digest(&self) -> [u8; 32] {
        let data = self.data.root();
        let mut holes = self.holes.clone();
        if let Some((at, len)) = self.open_hole {
            add_hole(holes.get_or_insert_with(blake3::Hasher::new), at, len);
        }
        match holes {
            None => data,
            Some(holes) => {
                let mut out = blake3::Hasher::new_derive_key(SPARSE);
                out.update(&data);
                out.update(holes.finalize().as_bytes());
                out.update(&self.len.to_le_bytes());
                *out.finalize().as_bytes()
            }
        }
    }

    fn sparse(&self) -> bool {
        self.holes.is_some() || self.open_hole.is_some()
    }

    fn close_hole(&mut self) {
        if let Some((at, len)) = self.open_hole.take() {
            add_hole(self.holes.get_or_insert_with(blake3::Hasher::new), at, len);
        }
    }
}

fn add_hole(holes: &mut blake3::Hasher, at: u64, len: u64) {
    holes.update(&at.to_le_bytes());
    holes.update(&len.to_le_bytes());
}

/// BLAKE3 of a byte stream as the chaining values of its aligned windows.
#[derive(Clone)]
struct Windowed {
    /// Window size: a power of two, at least one BLAKE3 chunk.
    window: u64,
    /// The windows before the current one.
    done: Vec<WindowDigest>,
    current: Current,
    /// Bytes fed, the current window's included.
    fed: u64,
}

// Hashing is the usual state, kept inline as a plain hasher was.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Current {
    Hashing(blake3::Hasher),
    /// Counted by its digest; short of a whole window, it ends the stream.
    Known(WindowDigest),
}

impl Windowed {
    /// Bytes in the current window.
    fn in_current(&self) -> u64 {
        self.fed - self.done.len() as u64 * self.window
    }

    /// Closes a whole current window and opens the next.
    fn roll(&mut self) {
        let digest = self.current_digest();
        self.done.push(digest);
        let mut next = blake3::Hasher::new();
        blake3::hazmat::HasherExt::set_input_offset(&mut next, self.fed);
        self.current = Current::Hashing(next);
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.in_current() == self.window {
                self.roll();
            }
            let take = data.len().min((self.window - self.in_current()) as usize);
            match &mut self.current {
                Current::Hashing(h) => {
                    h.update(&data[..take]);
                }
                // Past a short known window, which ended the stream: no digest can match.
                Current::Known(..) => {
                    self.current = Current::Known([0; 32]);
                    self.fed = u64::MAX;
                    return;
                }
            }
            self.fed += take as u64;
            data = &data[take..];
        }
    }

    /// Whether window `index` starts now (the current window is empty or whole).
    fn at_window(&self, index: u64) -> bool {
        let whole = self.fed != u64::MAX && self.in_current() == self.window;
        let empty = self.fed == self.done.len() as u64 * self.window
            && matches!(self.current, Current::Hashing(_));
        (empty && index == self.done.len() as u64) || (whole && index == self.done.len() as u64 + 1)
    }

    fn know(&mut self, digest: WindowDigest, len: u64) {
        if self.in_current() == self.window {
            self.roll();
        }
        self.current = Current::Known(digest);
        self.fed += len;
    }

    fn current_digest(&self) -> WindowDigest {
        match &self.current {
            Current::Hashing(h) => blake3::hazmat::HasherExt::finalize_non_root(h),
            Current::Known(digest) => *digest,
        }
    }

    fn window_digest(&self, index: u64) -> Option<WindowDigest> {
        let done = self.done.len() as u64;
        if index < done {
            Some(self.done[index as usize])
        } else if index == done && self.in_current() > 0 && self.fed != u64::MAX {
            Some(self.current_digest())
        } else {
            None
        }
    }

    /// The root hash: BLAKE3 of every byte fed.
    fn root(&self) -> [u8; 32] {
        if self.fed == u64::MAX {
            return blake3::derive_key(UNKNOWABLE, b"fed past the end");
        }
        if self.done.is_empty() {
            return match &self.current {
                Current::Hashing(h) => *h.finalize().as_bytes(),
                Current::Known(..) => blake3::derive_key(UNKNOWABLE, &self.fed.to_le_bytes()),
            };
        }
        let mut all = self.done.clone();
        all.push(self.current_digest());
        // Every window but the last is whole and of a power-of-two size, so BLAKE3's tree
        // splits them as it splits chunks: the left subtree holds the largest power of two
        // of windows fewer than all.
        let split = left_windows(all.len());
        let (left, right) = (merge(&all[..split]), merge(&all[split..]));
        *blake3::hazmat::merge_subtrees_root(&left, &right, blake3::hazmat::Mode::Hash).as_bytes()
    }
}

/// How many of `n` (at least two) windows BLAKE3's tree puts in the left subtree.
fn left_windows(n: usize) -> usize {
    debug_assert!(n >= 2);
    (n / 2 + n % 2).next_power_of_two()
}

/// The non-root chaining value of a subtree made of `windows`.
fn merge(windows: &[WindowDigest]) -> WindowDigest {
    if windows.len() == 1 {
        return windows[0];
    }
    let split = left_windows(windows.len());
    blake3::hazmat::merge_subtrees_non_root(
        &merge(&windows[..split]),
        &merge(&windows[split..]),
        blake3::hazmat::Mode::Hash,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(parts: &[Result<&[u8], u64>]) -> [u8; 32] {
        let mut d = BodyDigest::new();
        for p in parts {
            match p {
                Ok(data) => d.data(data),
                Err(len) => d.hole(*len),
            }
        }
        d.digest()
    }

    #[test]
    fn a_dense_body_has_the_plain_blake3_digest_wherever_frames_split_it() {
        let body = b"hello, sparse world";
        assert_eq!(of(&[Ok(body)]), *blake3::hash(body).as_bytes());
        assert_eq!(
            of(&[Ok(&body[..3]), Ok(&body[3..])]),
            *blake3::hash(body).as_bytes()
        );
        assert_eq!(of(&[]), *blake3::hash(b"").as_bytes());
        assert_eq!(of(&[Ok(b""), Err(0)]), *blake3::hash(b"").as_bytes());
    }

    #[test]
    fn holes_count_by_place_and_length_and_adjacent_ones_as_one() {
        let a = of(&[Ok(b"ab"), Err(10), Ok(b"cd")]);
        assert_eq!(a, of(&[Ok(b"ab"), Err(4), Err(6), Ok(b"c"), Ok(b"d")]));
        assert_ne!(a, of(&[Ok(b"ab"), Err(11), Ok(b"cd")]), "length");
        assert_ne!(a, of(&[Ok(b"a"), Err(10), Ok(b"bcd")]), "place");
        assert_ne!(a, of(&[Ok(b"abcd"), Err(10)]), "place");
        assert_ne!(a, of(&[Ok(b"ab"), Err(10), Ok(b"ce")]), "data");
        // Not the zeros a hole reads as: that is a dense body.
        let mut dense = b"ab".to_vec();
        dense.extend([0; 10]);
        dense.extend(b"cd");
        assert_ne!(a, *blake3::hash(&dense).as_bytes());
        // A trailing hole counts, to the byte at any length.
        assert_ne!(of(&[Ok(b"ab")]), of(&[Ok(b"ab"), Err(1)]));
        assert_ne!(of(&[Err(16 << 40)]), of(&[Err((16 << 40) - 1)]));
    }

    use crate::delta::tests::pseudo_random as bytes;

    /// Windows of 2 KiB (two BLAKE3 chunks), so that many windows stay small.
    const W: u64 = 2048;

    #[test]
    fn windowed_data_has_the_plain_blake3_digest_at_every_length_and_split() {
        for len in [
            0, 1, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 5000, 6144, 8192, 8193,
        ]
        .into_iter()
        .chain((1..40).map(|n| n * 997))
        {
            let data = bytes(len, len as u64 + 7);
            let want = *blake3::hash(&data).as_bytes();
            for step in [1usize, 100, 1024, 2048, 3000, usize::MAX] {
                let mut d = BodyDigest::with_window(W);
                for piece in data.chunks(step.min(len.max(1))) {
                    d.data(piece);
                }
                assert_eq!(d.digest(), want, "len {len} step {step}");
                assert_eq!(d.len(), len as u64);
            }
        }
        // And with the real window, across a few of them.
        let data = bytes(2 * crate::delta::WINDOW + 12_345, 3);
        let mut d = BodyDigest::new();
        for piece in data.chunks(1 << 20) {
            d.data(piece);
        }
        assert_eq!(d.digest(), *blake3::hash(&data).as_bytes());
        assert_eq!(d.windows().unwrap().len(), 3);
    }

    #[test]
    fn a_known_window_counts_as_its_bytes_and_only_at_its_place() {
        let old = bytes(5 * W as usize + 300, 1);
        let mut new = old.clone();
        new[2 * W as usize + 5] ^= 1;
        let of_old = {
            let mut d = BodyDigest::with_window(W);
            d.data(&old);
            d.windows().unwrap()
        };
        assert_eq!(of_old.len(), 6);
        // The new body: its unchanged windows taken by the old one's digests, the changed
        // one fed.
        let mut d = BodyDigest::with_window(W);
        let mut sent = BodyDigest::with_window(W);
        for (i, w) in new.chunks(W as usize).enumerate() {
            sent.data(w);
            let same = sent.window(i as u64) == Some(of_old[i]);
            assert_eq!(same, i != 2, "window {i}");
            if same {
                assert!(
                    d.known_window(i as u64, w.len() as u64, of_old[i]),
                    "window {i}"
                );
            } else {
                d.data(w);
            }
        }
        assert_eq!(d.digest(), *blake3::hash(&new).as_bytes());
        assert_eq!(d.digest(), sent.digest());
        assert_eq!(d.windows(), sent.windows());

        // Refused: not at a window's start, the wrong index, in a body with holes.
        let mut d = BodyDigest::with_window(W);
        d.data(&old[..10]);
        assert!(!d.known_window(0, W, of_old[0]));
        assert!(!d.known_window(1, W, of_old[1]));
        let mut d = BodyDigest::with_window(W);
        assert!(!d.known_window(1, W, of_old[1]));
        d.hole(W);
        assert!(!d.known_window(1, W, of_old[1]));
        assert_eq!(d.window(0), None);

        // A digest known for the wrong place or length does not give the body's digest.
        let mut d = BodyDigest::with_window(W);
        d.data(&old[..W as usize]);
        assert!(d.known_window(1, W, of_old[2]));
        d.data(&old[2 * W as usize..]);
        assert_ne!(d.digest(), *blake3::hash(&old).as_bytes());
        // A short known window ends the body: data after it matches nothing.
        let mut d = BodyDigest::with_window(W);
        d.data(&old[..W as usize]);
        assert!(d.known_window(1, 10, of_old[1]));
        let short = d.digest();
        d.data(b"more");
        assert_ne!(d.digest(), short);
        assert_ne!(
            d.digest(),
            *blake3::hash(&old[..W as usize + 14]).as_bytes()
        );
        // A lone known window has no digest to give.
        let mut d = BodyDigest::with_window(W);
        assert!(d.known_window(0, 300, of_old[0]));
        assert_ne!(d.digest(), *blake3::hash(&old[..300]).as_bytes());
    }

    #[test]
    fn a_prefix_digest_goes_on_to_the_whole() {
        let mut d = BodyDigest::new();
        d.data(b"ab");
        d.hole(5);
        let prefix = d.digest();
        assert_eq!(prefix, of(&[Ok(b"ab"), Err(5)]));
        d.hole(5);
        d.data(b"cd");
        assert_eq!(d.digest(), of(&[Ok(b"ab"), Err(10), Ok(b"cd")]));
        assert_eq!(d.len(), 14);
    }
}
