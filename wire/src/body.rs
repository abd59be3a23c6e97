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

/// A body digest being computed. Cloning is cheap (two hasher states); [`digest`] does not
/// consume it, so a cut-off transfer can offer its prefix's digest and go on.
///
/// [`digest`]: BodyDigest::digest
#[derive(Clone, Default)]
pub struct BodyDigest {
    data: blake3::Hasher,
    holes: Option<blake3::Hasher>,
    /// Bytes so far, data and holes.
    len: u64,
    /// A hole not yet closed by data: its offset and length.
    open_hole: Option<(u64, u64)>,
}

/// Key-derivation context of a body with holes, so it can never equal a plain digest.
const SPARSE: &str = "ferry 2026-12 sparse file body digest";

impl BodyDigest {
    /// A digest of nothing yet.
    pub fn new() -> BodyDigest {
        BodyDigest::default()
    }

    /// The next bytes are `data`.
    pub fn data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.close_hole();
        self.data.update(data);
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
        let mut me = self.clone();
        me.close_hole();
        let data = me.data.finalize();
        match me.holes {
            None => *data.as_bytes(),
            Some(holes) => {
                let mut out = blake3::Hasher::new_derive_key(SPARSE);
                out.update(data.as_bytes());
                out.update(holes.finalize().as_bytes());
                out.update(&me.len.to_le_bytes());
                *out.finalize().as_bytes()
            }
        }
    }

    fn close_hole(&mut self) {
        if let Some((at, len)) = self.open_hole.take() {
            let holes = self.holes.get_or_insert_with(blake3::Hasher::new);
            holes.update(&at.to_le_bytes());
            holes.update(&len.to_le_bytes());
        }
    }
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
