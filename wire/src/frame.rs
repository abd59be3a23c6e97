//! Length-prefixed frames: a 4-byte big-endian header, then a bincode-encoded [`Message`].
//! The header's low 31 bits are the payload length; its top bit, [`PACKED`], says the payload
//! is one zstd frame of the bincode bytes. The length is checked against [`MAX_FRAME`] before
//! anything is allocated, a packed payload must declare its unpacked size (at most the same
//! limit) before it is unpacked, and bincode decodes with the limit too, so a peer cannot make
//! us allocate more than one frame.
//!
//! Which frames are packed is the writer's choice, frame by frame ([`Packer`]); a reader
//! unpacks whatever is flagged. Listings and digest batches are always packed (paths and
//! metadata shrink several times); file bodies only when the sender asks (`compress = true`),
//! and a frame that would not shrink goes out as it is.

use crate::message::Message;
use std::borrow::Cow;

/// Largest payload accepted or produced: one 8 MiB delta window that did not compress at all,
/// plus headroom for a listing batch or a signature.
pub const MAX_FRAME: usize = 17 * 1024 * 1024;

/// Length of the prefix.
pub const HEADER_LEN: usize = 4;

/// Header bit: the payload is a zstd frame.
pub const PACKED: u32 = 1 << 31;

/// Payloads smaller than this are never packed: zstd's own header and the work would not pay.
const PACK_MIN: usize = 512;

/// zstd level of packed frames: the fastest, which still shrinks a listing 5–10×.
const PACK_LEVEL: i32 = 1;

/// A frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame larger than the limit in force ([`MAX_FRAME`], or less before a peer is
    /// authorised).
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit that applied.
        limit: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The payload decoded but did not use all its bytes.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// A packed payload is not a zstd frame of the size it declares.
    #[error("malformed packed frame: {0}")]
    Unpack(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Appends the frame of `msg` to `out`, unpacked.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    bincode::serde::encode_into_std_write(msg, out, config())?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// A writer's packing policy and its reusable zstd context.
pub struct Packer {
    data: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Packer {
    /// Packs listings and digest batches, and file bodies (`FileData`, `FileDelta`) when
    /// `data` is set.
    pub fn new(data: bool) -> Packer {
        Packer {
            data,
            zstd: None,
            scratch: Vec::new(),
        }
    }

    fn wants(&self, msg: &Message) -> bool {
        match msg {
            Message::Listing { .. }
            | Message::DirDigests { .. }
            | Message::Summary { .. }
            | Message::MoreDigests { .. } => true,
            Message::FileData { .. } | Message::FileDelta { .. } => self.data,
            _ => false,
        }
    }

    /// Appends the frame of `msg` to `out`, packed if the policy wants it and it shrinks.
    pub fn encode(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        encode(msg, out)?;
        let len = out.len() - start - HEADER_LEN;
        if len < PACK_MIN || !self.wants(msg) {
            return Ok(());
        }
        if self.zstd.is_none() {
            self.zstd = zstd::bulk::Compressor::new(PACK_LEVEL).ok();
        }
        // Packing is optional: without a context (out of memory) the frame goes as it is.
        let Some(zstd) = &mut self.zstd else {
            return Ok(());
        };
        self.scratch.clear();
        self.scratch.reserve(zstd::zstd_safe::compress_bound(len));
        let payload = &out[start + HEADER_LEN..];
        match zstd.compress_to_buffer(payload, &mut self.scratch) {
            Ok(n) if n < len => {
                out.truncate(start);
                out.extend_from_slice(&(n as u32 | PACKED).to_be_bytes());
                out.extend_from_slice(&self.scratch);
            }
            // Did not shrink (random data) or could not be packed: it goes as it is.
            _ => {}
        }
        if self.scratch.capacity() > 1024 * 1024 {
            self.scratch = Vec::new();
        }
        Ok(())
    }
}

/// The payload length and packed flag of a header.
fn header(buf: &[u8]) -> Option<(usize, bool)> {
    let h = buf.get(..HEADER_LEN)?;
    let word = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    Some(((word & !PACKED) as usize, word & PACKED != 0))
}

/// The payload length a frame at the start of `buf` announces, if its header is there.
pub fn announced(buf: &[u8]) -> Option<usize> {
    header(buf).map(|(len, _)| len)
}

/// How many bytes the frame at the start of `buf` occupies, `Ok(None)` if `buf` does not yet
/// hold a whole frame. Checks the announced length first.
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some((len, _)) = header(buf) else {
        return Ok(None);
    };
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if incomplete, else the message and the
/// number of bytes consumed.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    Ok(decode_sized(buf, MAX_FRAME)?.map(|(msg, total, _)| (msg, total)))
}

/// [`decode`] for a reader that accepts at most `limit` payload bytes, packed or not, also
/// returning the payload's unpacked length: what the message holds in memory, which is what a
/// reader's budget must count, not the bytes it took on the wire.
pub fn decode_sized(
    buf: &[u8],
    limit: usize,
) -> Result<Option<(Message, usize, usize)>, FrameError> {
    let Some(total) = check(buf)? else {
        return Ok(None);
    };
    let packed = header(buf).is_some_and(|(_, packed)| packed);
    let payload = &buf[HEADER_LEN..total];
    let payload = if packed {
        Cow::Owned(unpack(payload, limit.min(MAX_FRAME))?)
    } else {
        Cow::Borrowed(payload)
    };
    let (msg, used) = bincode::serde::decode_from_slice(&payload, config())?;
    if used != payload.len() {
        return Err(FrameError::Trailing(payload.len() - used));
    }
    Ok(Some((msg, total, payload.len())))
}

/// Unpacks a zstd payload that declares its size, at most `limit` bytes, allocating only that.
fn unpack(packed: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    let size = match zstd::zstd_safe::get_frame_content_size(packed) {
        Ok(Some(size)) => size,
        Ok(None) => return Err(FrameError::Unpack("no declared size".into())),
        Err(_) => return Err(FrameError::Unpack("not a zstd frame".into())),
    };
    if size > limit as u64 {
        return Err(FrameError::TooLarge {
            len: size as usize,
            limit,
        });
    }
    let out = zstd::bulk::decompress(packed, size as usize)
        .map_err(|e| FrameError::Unpack(e.to_string()))?;
    if out.len() as u64 != size {
        return Err(FrameError::Unpack(format!(
            "{} bytes where {size} were declared",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Body, DigestEntry, Intent, MAGIC};
    use crate::meta::{Entry, Kind, Meta};
    use crate::path::RelPath;
    use proptest::prelude::*;

    fn plain<T: serde::Serialize>(value: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(value, config()).unwrap()
    }

    /// Byte fields are written as one length and the bytes, the same bytes on the wire as a
    /// plain `Vec<u8>`, and read back as they were.
    #[test]
    fn byte_fields_are_a_length_and_the_bytes() {
        let bytes = b"a/b\xff".to_vec();
        let path = RelPath::from_bytes(bytes.clone());
        assert_eq!(plain(&path), plain(&bytes));
        let msg = Message::FileData {
            id: 7,
            data: (0..=255u8).cycle().take(70_000).collect(),
        };
        let mut framed = Vec::new();
        encode(&msg, &mut framed).unwrap();
        let (back, used) = decode(&framed).unwrap().unwrap();
        assert_eq!((back, used), (msg, framed.len()));
    }

    /// The largest signature a receiver sends, with as many window digests as it may send
    /// beside it, is one frame a peer accepts.
    #[test]
    fn the_largest_signature_with_its_windows_fits_a_frame() {
        use crate::delta::{MAX_SIGNATURE, MAX_WINDOWS};
        let noise = |n| crate::delta::tests::pseudo_random(n, 1);
        let signature = noise(MAX_SIGNATURE);
        let windows = noise(MAX_WINDOWS * 32)
            .chunks(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let msg = Message::Signature {
            id: u64::MAX,
            signature,
            windows,
        };
        let mut framed = Vec::new();
        encode(&msg, &mut framed).unwrap();
        let (back, used) = decode(&framed).unwrap().unwrap();
        assert_eq!(used, framed.len());
        assert!(back == msg, "the signature came back different");
    }

    #[test]
    fn byte_fields_encode_as_a_plain_sequence_of_u8_would() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let msg = Message::FileData {
            id: 7,
            data: data.clone(),
        };
        let mut framed = Vec::new();
        encode(&msg, &mut framed).unwrap();
        let body = &framed[HEADER_LEN..];
        // The variant's index (one byte here), then the fields as a tuple.
        assert_eq!(&body[1..], plain(&(7u64, data)).as_slice());
        let back: Message = bincode::serde::decode_from_slice(body, config()).unwrap().0;
        assert_eq!(back, msg);

        let meta = Meta {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 5,
            mtime: 1_790_000_000,
            mtime_nsec: 0,
            rdev: 0,
            xattrs: Default::default(),
        };
        let entry = Entry {
            path: RelPath::from("dir/name"),
            meta: meta.clone(),
            link: Some(b"target".to_vec()),
            inode: None,
        };
        let as_plain = (
            b"dir/name".to_vec(),
            meta,
            Some(b"target".to_vec()),
            None::<(u64, u64)>,
        );
        assert_eq!(plain(&entry), plain(&as_plain));
    }

    fn meta_strategy() -> impl Strategy<Value = Meta> {
        (
            0u32..0o10000,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<i64>(),
            0u32..1_000_000_000,
            any::<u64>(),
        )
            .prop_map(|(mode, uid, gid, size, mtime, mtime_nsec, rdev)| Meta {
                kind: Kind::File,
                mode,
                uid,
                gid,
                size,
                mtime,
                mtime_nsec,
                rdev,
                xattrs: crate::xattr::Xattrs {
                    covers: crate::xattr::Namespaces::USER,
                    list: vec![(b"user.a".to_vec(), rdev.to_le_bytes().to_vec())],
                },
            })
    }

    fn path_strategy() -> impl Strategy<Value = RelPath> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(RelPath::from_bytes)
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<String>(), any::<u32>()).prop_map(|(module, version)| Message::Hello {
                magic: MAGIC,
                version,
                module,
                intent: Intent::Write
            }),
            (any::<u64>(), path_strategy(), meta_strategy()).prop_map(|(id, path, meta)| {
                Message::FileBegin {
                    id,
                    path,
                    meta,
                    body: Body::Delta,
                }
            }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..2048)
            )
                .prop_map(|(id, data)| Message::FileData { id, data }),
            (
                any::<u64>(),
                path_strategy(),
                meta_strategy(),
                proptest::collection::vec(any::<u8>(), 0..2048),
                any::<[u8; 32]>()
            )
                .prop_map(|(id, path, meta, data, digest)| Message::File {
                    id,
                    path,
                    meta,
                    data,
                    digest
                }),
            (any::<u64>(), path_strategy(), path_strategy())
                .prop_map(|(id, from, to)| Message::Rename { id, from, to }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..512),
                proptest::collection::vec(any::<[u8; 32]>(), 0..4)
            )
                .prop_map(|(id, signature, windows)| Message::Signature {
                    id,
                    signature,
                    windows
                }),
            (any::<u64>(), any::<String>()).prop_map(|(id, error)| Message::Failed { id, error }),
            (
                any::<u64>(),
                path_strategy(),
                meta_strategy(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32))
            )
                .prop_map(|(id, path, meta, link)| Message::Listing {
                    id,
                    entries: vec![Entry {
                        path,
                        meta,
                        link,
                        inode: None
                    }],
                    done: true
                }),
            (
                any::<u64>(),
                path_strategy(),
                meta_strategy(),
                any::<[u8; 32]>()
            )
                .prop_map(|(id, path, meta, digest)| {
                    Message::DirDigests {
                        id,
                        dir: None,
                        entries: vec![DigestEntry {
                            entry: Entry {
                                path: path.clone(),
                                meta,
                                link: None,
                                inode: Some(crate::meta::Inode { dev: 1, ino: 2 }),
                            },
                            digest,
                            hardlink: Some(path),
                        }],
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_any_message(
            msgs in proptest::collection::vec(message_strategy(), 1..8),
            packed in any::<bool>(),
        ) {
            let (mut buf, mut packer) = (Vec::new(), Packer::new(true));
            for m in &msgs {
                if packed {
                    packer.encode(m, &mut buf).unwrap();
                } else {
                    encode(m, &mut buf).unwrap();
                }
            }
            let mut at = 0;
            for m in &msgs {
                let (got, used) = decode(&buf[at..]).unwrap().unwrap();
                prop_assert_eq!(&got, m);
                at += used;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn every_strict_prefix_is_incomplete(msg in message_strategy()) {
            let mut buf = Vec::new();
            encode(&msg, &mut buf).unwrap();
            for cut in 0..buf.len() {
                prop_assert!(decode(&buf[..cut]).unwrap().is_none());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }

    fn listing(n: usize) -> Message {
        let entries = (0..n)
            .map(|i| Entry {
                path: RelPath::from(format!("d{:04}/f{:02}", i / 20, i % 20).as_str()),
                meta: Meta {
                    kind: Kind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    size: 2048 + (i as u64 * 97) % 4096,
                    mtime: 1_790_000_000 + i as i64 / 7,
                    mtime_nsec: (i as u32).wrapping_mul(2_654_435_761) % 1_000_000_000,
                    rdev: 0,
                    xattrs: Default::default(),
                },
                link: None,
                inode: None,
            })
            .collect();
        Message::Listing {
            id: 7,
            entries,
            done: true,
        }
    }

    fn is_packed(frame: &[u8]) -> bool {
        header(frame).unwrap().1
    }

    #[test]
    fn listings_travel_packed_and_come_back_equal() {
        let msg = listing(2000);
        let (mut plain, mut packed) = (Vec::new(), Vec::new());
        encode(&msg, &mut plain).unwrap();
        Packer::new(false).encode(&msg, &mut packed).unwrap();
        assert!(is_packed(&packed));
        assert!(
            packed.len() * 3 < plain.len(),
            "{} packed vs {} plain",
            packed.len(),
            plain.len()
        );
        let (back, used) = decode(&packed).unwrap().unwrap();
        assert_eq!((back, used), (msg, packed.len()));
    }

    #[test]
    fn bodies_are_packed_only_when_asked_and_only_when_they_shrink() {
        let text = Message::FileData {
            id: 1,
            data: b"all work and no play ".repeat(3000),
        };
        let mut noise = vec![0u8; 64 * 1024];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let noise = Message::FileData { id: 2, data: noise };
        let frame = |packer: &mut Packer, m: &Message| {
            let mut out = Vec::new();
            packer.encode(m, &mut out).unwrap();
            assert_eq!(decode(&out).unwrap().unwrap().0, *m);
            out
        };
        assert!(!is_packed(&frame(&mut Packer::new(false), &text)));
        assert!(is_packed(&frame(&mut Packer::new(true), &text)));
        assert!(!is_packed(&frame(&mut Packer::new(true), &noise)));
        assert!(!is_packed(&frame(&mut Packer::new(true), &Message::Bye)));
    }

    /// A frame carrying `packed` as a packed payload.
    fn packed_frame(packed: &[u8]) -> Vec<u8> {
        let mut buf = (packed.len() as u32 | PACKED).to_be_bytes().to_vec();
        buf.extend_from_slice(packed);
        buf
    }

    #[test]
    fn a_packed_frame_unpacking_past_the_limit_is_refused_before_unpacking() {
        // 18 MiB of zeros pack into a few hundred bytes: a bomb within a small frame.
        let bomb = zstd::bulk::compress(&vec![0u8; 18 << 20], 1).unwrap();
        assert!(bomb.len() < 4096);
        let buf = packed_frame(&bomb);
        assert!(matches!(decode(&buf), Err(FrameError::TooLarge { len, .. }) if len == 18 << 20));
        // Within the frame limit but past a reader's own (a peer not yet authorised).
        let small = zstd::bulk::compress(&vec![0u8; 64 << 10], 1).unwrap();
        let buf = packed_frame(&small);
        assert!(matches!(
            decode_sized(&buf, 4096),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_packed_frame_that_lies_or_hides_its_size_is_malformed() {
        let mut plain = Vec::new();
        encode(&listing(100), &mut plain).unwrap();
        let payload = &plain[HEADER_LEN..];
        // No declared size (streamed).
        let streamed = zstd::stream::encode_all(payload, 1).unwrap();
        assert!(matches!(
            decode(&packed_frame(&streamed)),
            Err(FrameError::Unpack(_))
        ));
        // Two frames back to back: the first declares only its own size.
        let mut twice = zstd::bulk::compress(payload, 1).unwrap();
        twice.extend(zstd::bulk::compress(payload, 1).unwrap());
        assert!(matches!(
            decode(&packed_frame(&twice)),
            Err(FrameError::Unpack(_))
        ));
        // Not zstd at all.
        assert!(matches!(
            decode(&packed_frame(&[7; 64])),
            Err(FrameError::Unpack(_))
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        assert!(
            matches!(decode(&buf), Err(FrameError::TooLarge { len, .. }) if len == MAX_FRAME + 1)
        );
    }

    #[test]
    fn huge_inner_length_fails_cleanly() {
        // A FileData frame whose inner Vec length claims 2^60 bytes inside a small frame.
        let mut payload = Vec::new();
        let msg = Message::FileData {
            id: 1,
            data: vec![1, 2, 3],
        };
        encode(&msg, &mut payload).unwrap();
        // Overwrite the varint Vec length (after the variant tag and id) with a huge value.
        let mut evil = payload[HEADER_LEN..HEADER_LEN + 2].to_vec();
        evil.push(255); // u64 varint marker
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut buf = (evil.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&evil);
        assert!(decode(&buf).is_err());
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = Vec::new();
        encode(&Message::Bye, &mut buf).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) + 1;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.push(0);
        assert!(matches!(decode(&buf), Err(FrameError::Trailing(1))));
    }
}
