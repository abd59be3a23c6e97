//! Length-prefixed frames: a 4-byte big-endian payload length, then a bincode-encoded
//! [`Message`]. The length is checked against [`MAX_FRAME`] before anything is allocated, and
//! bincode decodes with the same limit, so a peer cannot make us allocate more than one frame.

use crate::message::Message;

/// Largest payload accepted or produced: one 8 MiB delta window that did not compress at all,
/// plus headroom for a listing batch or a signature.
pub const MAX_FRAME: usize = 17 * 1024 * 1024;

/// Length of the prefix.
pub const HEADER_LEN: usize = 4;

/// A frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The payload decoded but did not use all its bytes.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Appends the frame of `msg` to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    bincode::serde::encode_into_std_write(msg, out, config())?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// How many bytes the frame at the start of `buf` occupies, `Ok(None)` if `buf` does not yet
/// hold a whole frame. Checks the announced length first.
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if incomplete, else the message and the
/// number of bytes consumed.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(total) = check(buf)? else {
        return Ok(None);
    };
    let payload = &buf[HEADER_LEN..total];
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())?;
    if used != payload.len() {
        return Err(FrameError::Trailing(payload.len() - used));
    }
    Ok(Some((msg, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Body, DigestEntry, Intent, MAGIC};
    use crate::meta::{Entry, Kind, Meta};
    use crate::path::RelPath;
    use proptest::prelude::*;

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
            (any::<u64>(), path_strategy(), path_strategy())
                .prop_map(|(id, from, to)| Message::Rename { id, from, to }),
            (any::<u64>(), any::<String>()).prop_map(|(id, error)| Message::Failed { id, error }),
            (
                any::<u64>(),
                path_strategy(),
                meta_strategy(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32))
            )
                .prop_map(|(id, path, meta, link)| Message::Listing {
                    id,
                    entries: vec![Entry { path, meta, link }],
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
                                path,
                                meta,
                                link: None,
                            },
                            digest,
                        }],
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_any_message(msgs in proptest::collection::vec(message_strategy(), 1..8)) {
            let mut buf = Vec::new();
            for m in &msgs {
                encode(m, &mut buf).unwrap();
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

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(decode(&buf), Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1));
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
