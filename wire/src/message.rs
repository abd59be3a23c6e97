//! Every message of the ferry protocol.
//!
//! A session is one TLS connection bound to one module. The sender opens with [`Message::Hello`];
//! the receiver answers [`Message::Welcome`] or [`Message::Refused`] (then closes). After that
//! the sender issues requests, each carrying an `id` it chose, and may have many in flight: the
//! receiver handles them in arrival order and answers each exactly once with a final reply
//! ([`Message::Ack`], [`Message::Failed`], [`Message::Listing`] with `done`,
//! [`Message::DirDigests`], or [`Message::Deleted`] for a `Delete` under an allowance).
//! Mutating requests are idempotent and say what the path must become ("make `a/b` a
//! directory with this metadata"), so replaying one after a reconnect is safe.
//!
//! A file travels as `FileBegin`, then either a whole body (`FileData`*) or, when the sender
//! asked first (`Body::Delta`), the receiver's answer: `Signature` (then `FileDelta`*
//! forward), `Resume` (it holds the start of this very file from a cut-off transfer; the rest
//! follows as `FileData`*) or `NoBase`; then `FileEnd` carrying the [`BodyDigest`] of the body
//! as it travelled (the plain blake3 digest of the content when it has no holes). The receiver
//! commits only if the digest of what it wrote matches. A small file read whole before it
//! is sent travels as one `File`, which says all three at once.
//!
//! [`BodyDigest`]: crate::body::BodyDigest

use crate::meta::{Entry, Meta};
use crate::path::RelPath;
use crate::xattr::Namespaces;
use serde::{Deserialize, Serialize};

/// Protocol version; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 14;

/// First bytes of a [`Message::Hello`], to tell a ferry peer from something else.
pub const MAGIC: [u8; 8] = *b"ferry\0\r\n";

/// Request identifier chosen by the sender, unique within a session.
pub type RequestId = u64;

/// A blake3 digest.
pub type Digest = [u8; 32];

/// What the sender wants to do with the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Change the module (refused on `read_only` modules).
    Write,
    /// List and verify only.
    Read,
    /// Restore (protocol 8): after `Welcome` the client sends one [`Message::Restore`] and the
    /// roles turn round: the receiver sends the module as it was, with the requests a sender
    /// uses, and the client answers them as a receiver does, for its destination. Never
    /// changes the module or its history.
    Restore,
}

/// How the file body will travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// `FileData` frames follow at once.
    Whole,
    /// The sender waits for the receiver's answer: `Signature` (then `FileDelta`s against
    /// its copy), `Resume` (then the rest of a transfer that was cut off, as `FileData`), or
    /// `NoBase` (then the whole body as `FileData`).
    Delta,
}

/// What a receiver keeps in a module (its privileges and the module's policy), so the sender
/// neither sends what would be refused nor compares what cannot match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keeps {
    /// Owners and groups as sent (root receiver, `owner = "preserve"`).
    pub owners: bool,
    /// Device nodes (root receiver, `devices = true`).
    pub devices: bool,
    /// setuid and setgid bits (`setuid = true`).
    pub setid: bool,
    /// Extended attribute namespaces the receiver can write there (its privileges and the
    /// module filesystem's support).
    pub xattrs: Namespaces,
    /// The module keeps history: what a change replaces or deletes there can be brought back
    /// (protocol 7), so a mass deletion needs no operator to be safe.
    pub history: bool,
}

/// One kept version of a module path, as [`Message::Versions`] carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Its id in the module's history (`HISTORY/objects/ID` when `object`).
    pub id: i64,
    /// The module path it was at.
    pub path: RelPath,
    /// When it stopped being current (ns since the epoch, UTC).
    pub time_ns: i64,
    /// `replaced`, `deleted`, `renamed`, `metadata` or `unjournaled`.
    pub action: String,
    /// `file`, `dir`, `symlink`, `fifo`, `char` or `block`.
    pub kind: String,
    /// Size in bytes (a file's).
    pub size: u64,
    /// The history holds the entry itself (not only its old metadata or a rename).
    pub object: bool,
    /// For a rename, where it went.
    pub renamed_to: Option<RelPath>,
}

/// One entry of a [`Message::DirDigests`] reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    /// The entry (path relative to the module root).
    pub entry: Entry,
    /// Content digest of a file, subtree digest of a directory, digest of a link target.
    pub digest: Digest,
    /// For a file with two or more names in the tree: the first of them in tree order (its
    /// own path for that first name). Set only when hard links are compared.
    pub hardlink: Option<RelPath>,
}

/// A protocol message. Variants are grouped by direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    // --- handshake -----------------------------------------------------------------------
    /// Sender → receiver: first message of a session.
    Hello {
        /// Must equal [`MAGIC`].
        magic: [u8; 8],
        /// Sender's [`PROTOCOL_VERSION`].
        version: u32,
        /// Module to bind the session to.
        module: String,
        /// Read or write.
        intent: Intent,
    },
    /// Receiver → sender: the session is open.
    Welcome {
        /// Receiver's [`PROTOCOL_VERSION`].
        version: u32,
        /// What the receiver keeps in this module.
        keeps: Keeps,
    },
    /// Either direction: a fatal refusal or error, printed by the other side; the connection
    /// closes after it.
    Refused {
        /// Human-readable reason.
        reason: String,
    },

    // --- sender → receiver ---------------------------------------------------------------
    /// List the subtree at `under` (the root for the whole module), in tree order; answered
    /// by `Listing` batches, empty if `under` does not exist.
    List {
        /// Request id.
        id: RequestId,
        /// Subtree to list.
        under: RelPath,
        /// Extended attribute namespaces to read for each entry.
        xattrs: Namespaces,
    },
    /// Make `path` a directory with `meta` (replacing a non-directory). Directory times are
    /// set by a later `SetMeta`, after their contents.
    Mkdir {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Desired metadata.
        meta: Meta,
    },
    /// Make `path` a symlink to `target` (replacing what is there).
    Symlink {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Link target bytes.
        #[serde(with = "crate::byte_buf")]
        target: Vec<u8>,
        /// Desired metadata.
        meta: Meta,
    },
    /// Make `path` a fifo or device node (privileged receivers only).
    Special {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Desired metadata, including `rdev`.
        meta: Meta,
    },
    /// Set metadata only (mode, owner, mtime) of an existing entry of the same kind.
    SetMeta {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Desired metadata.
        meta: Meta,
    },
    /// Remove `path`, recursively for directories; absent is success.
    Delete {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
    },
    /// Make `path` another name of the regular file `target` (a hard link), replacing what
    /// is at `path`. Refused unless `target` is a regular file of `meta`'s size and mtime:
    /// the sender then sends `target`'s content first.
    Link {
        /// Request id.
        id: RequestId,
        /// The new name.
        path: RelPath,
        /// The existing name.
        target: RelPath,
        /// The file's metadata as the sender has it.
        meta: Meta,
    },
    /// Rename `from` to `to`, replacing `to`.
    Rename {
        /// Request id.
        id: RequestId,
        /// Existing path.
        from: RelPath,
        /// New path.
        to: RelPath,
    },
    /// Start a file transfer.
    FileBegin {
        /// Request id; the later file frames carry it.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Desired metadata (size is the final size).
        meta: Meta,
        /// Whole body or delta against the receiver's copy.
        body: Body,
    },
    /// A whole file in one frame: what `FileBegin` (whole body), one `FileData` and
    /// `FileEnd` say, for a small file read before it is sent. Answered like a `FileEnd`.
    File {
        /// Request id.
        id: RequestId,
        /// Target path.
        path: RelPath,
        /// Desired metadata (size is the body's length).
        meta: Meta,
        /// The whole body.
        #[serde(with = "crate::byte_buf")]
        data: Vec<u8>,
        /// [`BodyDigest`](crate::body::BodyDigest) of the body.
        digest: Digest,
    },
    /// A slice of the whole body, in order.
    FileData {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// Bytes.
        #[serde(with = "crate::byte_buf")]
        data: Vec<u8>,
    },
    /// The rsync delta of the next window of the new file against the receiver's base.
    FileDelta {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// Length of the window this delta rebuilds.
        window: u64,
        /// fast_rsync delta bytes.
        #[serde(with = "crate::byte_buf")]
        delta: Vec<u8>,
    },
    /// The next `len` bytes of a whole body are zeros the source does not store (a hole of a
    /// sparse file): the receiver leaves them unallocated. Counted in the size, and in the
    /// digest by its place and length ([`BodyDigest::hole`](crate::body::BodyDigest::hole)):
    /// constant work, whatever the length.
    FileHole {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// Length of the hole.
        len: u64,
    },
    /// The body is complete; commit if the written bytes hash to `digest`.
    FileEnd {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// [`BodyDigest`](crate::body::BodyDigest) of the complete body.
        digest: Digest,
    },
    /// Drop the transfer (the source changed while being read); answered by `Failed`.
    FileAbort {
        /// Request id of the `FileBegin`.
        id: RequestId,
    },
    /// Digests of one directory's entries, for a top-down comparison.
    VerifyDir {
        /// Request id.
        id: RequestId,
        /// Directory path.
        path: RelPath,
        /// Re-read every file instead of trusting the digest cache.
        checksum: bool,
        /// Extended attribute namespaces to compare.
        xattrs: Namespaces,
        /// Compare hard links.
        hardlinks: bool,
    },
    /// Counters of this receiver process, for monitoring and tests.
    Stats {
        /// Request id.
        id: RequestId,
    },
    /// The versions the module's history keeps at or below `under` (protocol 7); answered by
    /// `Versions` batches, or `Failed` for a module that keeps no history. A read: it never
    /// changes the history.
    History {
        /// Request id.
        id: RequestId,
        /// The path (the root for the whole module).
        under: RelPath,
    },
    /// The sender is done; the receiver closes after answering everything before it.
    Bye,

    // --- receiver → sender ---------------------------------------------------------------
    /// The request succeeded and its effect is durable.
    Ack {
        /// Request id.
        id: RequestId,
    },
    /// The request failed; other requests are unaffected.
    Failed {
        /// Request id.
        id: RequestId,
        /// Why, with the path.
        error: String,
    },
    /// A batch of the module listing; `done` marks the last.
    Listing {
        /// Request id.
        id: RequestId,
        /// Entries in this batch.
        entries: Vec<Entry>,
        /// Last batch, and the totals are whole (a restore sent as the module is read says
        /// `false` while its walk has more to read, its totals growing, and `true` once the
        /// walk is over).
        done: bool,
    },
    /// The receiver's signature of its current copy; delta frames should follow.
    Signature {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// Serialized fast_rsync signature.
        #[serde(with = "crate::byte_buf")]
        signature: Vec<u8>,
        /// The digest of each [`WINDOW`](crate::delta::WINDOW) of the copy (see
        /// [`BodyDigest`](crate::body::BodyDigest)): a window of the sender's file with the
        /// same digest is the same bytes at the same place, sent as one copy without a search.
        windows: Vec<Digest>,
    },
    /// The receiver holds the first `offset` bytes of this very file (same size and mtime)
    /// from a transfer that was cut off, hashing to `digest`; if the sender's file starts
    /// with them, it sends the rest from `offset` as `FileData`, else it aborts.
    Resume {
        /// Request id of the `FileBegin`.
        id: RequestId,
        /// Bytes already held.
        offset: u64,
        /// [`BodyDigest`](crate::body::BodyDigest) of those bytes, as they arrived (holes as holes).
        digest: Digest,
    },
    /// No usable base exists; the sender must send the whole body.
    NoBase {
        /// Request id of the `FileBegin`.
        id: RequestId,
    },
    /// Answer to `VerifyDir`.
    DirDigests {
        /// Request id.
        id: RequestId,
        /// The directory itself (its metadata); `None` if it does not exist.
        dir: Option<Entry>,
        /// Its entries, sorted by name.
        entries: Vec<DigestEntry>,
    },
    /// Answer to `Stats`.
    StatsReply {
        /// Request id.
        id: RequestId,
        /// `(name, value)` counters.
        counters: Vec<(String, u64)>,
    },
    /// A batch of the answer to `History`, oldest first; `done` marks the last.
    Versions {
        /// Request id.
        id: RequestId,
        /// The versions.
        versions: Vec<Version>,
        /// Last batch, and the totals are whole (a restore sent as the module is read says
        /// `false` while its walk has more to read, its totals growing, and `true` once the
        /// walk is over).
        done: bool,
    },
    /// The receiver is there: sent every `ferry_protocol::connection::HEARTBEAT` while a session is
    /// open, whatever its requests are doing, so a sender waiting on replies can tell a slow
    /// receiver from a link or a process that went silent.
    Alive,

    // --- restore (protocol 8) ------------------------------------------------------------
    /// Restore client → receiver, once, after `Welcome` of a [`Intent::Restore`] session: what
    /// to send. The receiver answers `Refused` (a time before the history, a path not there
    /// then) or sends the module as it was at `at` with the sender's requests, then `Bye`.
    Restore {
        /// The moment (ns since the epoch, UTC); `None`: the module as it is now.
        at: Option<i64>,
        /// Only these paths (and their parents); all of it when empty.
        paths: Vec<RelPath>,
        /// Delete what the destination holds beyond what is restored (under `paths`).
        delete: bool,
        /// What the client's destination keeps, as a receiver's `Welcome` says it.
        keeps: Keeps,
        /// Send only the plan (`Planned` with its changes), change nothing.
        dry_run: bool,
    },
    /// Receiver → restore client, before the first change: what the restore will do (for
    /// progress), in batches; `changes` lists each step (path, what) for a dry run only.
    Planned {
        /// Steps in all.
        steps: u64,
        /// Bytes of the files to send.
        bytes: u64,
        /// The steps, for a dry run.
        changes: Vec<(RelPath, String)>,
        /// Last batch, and the totals are whole (a restore sent as the module is read says
        /// `false` while its walk has more to read, its totals growing, and `true` once the
        /// walk is over).
        done: bool,
    },
    /// Receiver → restore client, before `Bye`: a path of the restored tree that could not be
    /// sent (unreadable on the backup host), so the client counts it as not restored.
    Unsent {
        /// The path.
        path: RelPath,
        /// Why.
        reason: String,
    },

    // --- the delete guard on the receiver (protocol 9) -------------------------------------
    /// Sender → receiver: how many entries the session's later `Delete`s may remove in all
    /// (`None`: no limit, and `Delete` is answered `Ack` as before). Under an allowance each
    /// `Delete` is answered `Deleted`: the receiver counts what it would remove (the path and
    /// everything under it) and removes it only if that fits in what is left, so a sender's
    /// mass-delete guard needs no listing of the module and can never be overshot by requests
    /// in flight.
    Allowance {
        /// Entries the session may still delete; `u64::MAX` counts without limit.
        entries: Option<u64>,
    },
    /// Answer to a `Delete` under an [`Message::Allowance`]: the entries it removed, or, when
    /// `held`, that it removed nothing because it would have removed at least `entries`,
    /// more than the allowance left.
    Deleted {
        /// Request id of the `Delete`.
        id: RequestId,
        /// Entries removed (0: there was nothing), or at least that many to remove.
        entries: u64,
        /// Not removed: past the allowance.
        held: bool,
    },

    // --- protocol 11 ---------------------------------------------------------------------
    /// Sender → receiver: the metadata digests of one directory's entries, for a whole
    /// compare that descends only where the trees differ (rsync's quick check, size and
    /// mtime, as a Merkle tree: no file is read). Answered by `Summary`. The receiver walks
    /// its module again whenever `path` is the root, so each compare starts from the tree
    /// as it is.
    Summarize {
        /// Request id.
        id: RequestId,
        /// Directory path.
        path: RelPath,
        /// Extended attribute namespaces to compare.
        xattrs: Namespaces,
        /// Compare hard links.
        hardlinks: bool,
    },
    /// Answer to `Summarize`.
    Summary {
        /// Request id.
        id: RequestId,
        /// The directory itself (its metadata); `None` if it is not a directory there.
        dir: Option<Entry>,
        /// Its entries, sorted by name: a directory's digest covers its subtree, a file's is
        /// zero (its size and mtime are in the entry's own digest), a link's its target.
        entries: Vec<DigestEntry>,
        /// How many entries the subtree holds below `path`.
        below: u64,
    },
    /// A step of the answer to `Summarize` or `VerifyDir` for a directory with more entries
    /// than one frame holds ([`digest_batches`]): the next of them, in order. The final
    /// `Summary` or `DirDigests` carries the last.
    MoreDigests {
        /// Request id.
        id: RequestId,
        /// Entries of this step.
        entries: Vec<DigestEntry>,
    },
}

/// What one [`DigestEntry`] costs a frame's decoding at most: bincode counts the size in
/// memory of every field it decodes (8 bytes for a `u64` sent in one) against
/// [`MAX_FRAME`](crate::frame::MAX_FRAME), some 110 bytes and the path's for an entry
/// without attributes, so a directory of some 160,000 short names, its frame under the limit,
/// did not decode whole. Counted here as the entry's whole size in memory, which is more.
fn decoded_size(e: &DigestEntry) -> usize {
    std::mem::size_of::<DigestEntry>()
        + e.entry.path.as_bytes().len()
        + e.entry.link.as_ref().map_or(0, Vec::len)
        + e.entry
            .meta
            .xattrs
            .list
            .iter()
            .map(|(n, v)| n.len() + v.len() + std::mem::size_of::<crate::xattr::Xattr>())
            .sum::<usize>()
        + e.hardlink.as_ref().map_or(0, |h| h.as_bytes().len())
}

/// A directory's digest entries in the batches its answer travels in, in order (one, maybe
/// empty, for a directory that fits one frame): each decodes within a quarter of
/// [`MAX_FRAME`](crate::frame::MAX_FRAME), whatever the directory's width.
pub fn digest_batches(entries: Vec<DigestEntry>) -> Vec<Vec<DigestEntry>> {
    const BATCH: usize = crate::frame::MAX_FRAME / 4;
    let (mut out, mut batch, mut size) = (Vec::new(), Vec::new(), 0);
    for e in entries {
        let cost = decoded_size(&e);
        if size + cost > BATCH && !batch.is_empty() {
            out.push(std::mem::take(&mut batch));
            size = 0;
        }
        size += cost;
        batch.push(e);
    }
    out.push(batch);
    out
}

impl Message {
    /// The path a request is about (its new name, for a rename); `None` for messages that
    /// are not about one path.
    pub fn subject(&self) -> Option<&RelPath> {
        match self {
            Message::List { under: path, .. }
            | Message::History { under: path, .. }
            | Message::Mkdir { path, .. }
            | Message::Symlink { path, .. }
            | Message::Special { path, .. }
            | Message::SetMeta { path, .. }
            | Message::Delete { path, .. }
            | Message::Link { path, .. }
            | Message::Rename { to: path, .. }
            | Message::FileBegin { path, .. }
            | Message::File { path, .. }
            | Message::VerifyDir { path, .. }
            | Message::Summarize { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The request id a reply answers, if it is a reply.
    pub fn reply_id(&self) -> Option<RequestId> {
        match self {
            Message::Ack { id }
            | Message::Failed { id, .. }
            | Message::Listing { id, .. }
            | Message::Signature { id, .. }
            | Message::NoBase { id }
            | Message::Resume { id, .. }
            | Message::DirDigests { id, .. }
            | Message::Summary { id, .. }
            | Message::MoreDigests { id, .. }
            | Message::StatsReply { id, .. }
            | Message::Versions { id, .. }
            | Message::Deleted { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The id of a request that changes the module (refused on read-only sessions).
    pub fn mutation_id(&self) -> Option<RequestId> {
        self.mutation().map(|(id, _)| id)
    }

    /// The paths whose entries a mutating request changes (a `Rename` or `Link` changes
    /// two); none for any other message.
    pub fn changed_paths(&self) -> [Option<&RelPath>; 2] {
        self.mutation().map_or([None, None], |(_, paths)| paths)
    }

    /// A request that changes the module: its id and the paths it changes. One list, so
    /// that what is refused on a read-only session and what is marked changed agree.
    fn mutation(&self) -> Option<(RequestId, [Option<&RelPath>; 2])> {
        match self {
            Message::Mkdir { id, path, .. }
            | Message::Symlink { id, path, .. }
            | Message::Special { id, path, .. }
            | Message::SetMeta { id, path, .. }
            | Message::Delete { id, path, .. }
            | Message::FileBegin { id, path, .. }
            | Message::File { id, path, .. } => Some((*id, [Some(path), None])),
            Message::Rename { id, from, to } => Some((*id, [Some(from), Some(to)])),
            Message::Link {
                id, path, target, ..
            } => Some((*id, [Some(path), Some(target)])),
            _ => None,
        }
    }

    /// True for a reply that ends its request (after it, no more replies carry its id).
    /// `Signature`/`NoBase`/`Resume` answer a `FileBegin` halfway; a `Listing` ends with `done`.
    pub fn is_final_reply(&self) -> bool {
        match self {
            Message::Listing { done, .. } | Message::Versions { done, .. } => *done,
            Message::Signature { .. }
            | Message::NoBase { .. }
            | Message::Resume { .. }
            | Message::MoreDigests { .. } => false,
            other => other.reply_id().is_some(),
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Refused { .. } => "Refused",
            Message::List { .. } => "List",
            Message::Mkdir { .. } => "Mkdir",
            Message::Symlink { .. } => "Symlink",
            Message::Special { .. } => "Special",
            Message::SetMeta { .. } => "SetMeta",
            Message::Delete { .. } => "Delete",
            Message::Rename { .. } => "Rename",
            Message::Link { .. } => "Link",
            Message::FileBegin { .. } => "FileBegin",
            Message::File { .. } => "File",
            Message::FileData { .. } => "FileData",
            Message::FileDelta { .. } => "FileDelta",
            Message::FileHole { .. } => "FileHole",
            Message::FileEnd { .. } => "FileEnd",
            Message::FileAbort { .. } => "FileAbort",
            Message::VerifyDir { .. } => "VerifyDir",
            Message::Stats { .. } => "Stats",
            Message::Bye => "Bye",
            Message::Ack { .. } => "Ack",
            Message::Failed { .. } => "Failed",
            Message::Listing { .. } => "Listing",
            Message::Signature { .. } => "Signature",
            Message::NoBase { .. } => "NoBase",
            Message::Resume { .. } => "Resume",
            Message::DirDigests { .. } => "DirDigests",
            Message::StatsReply { .. } => "StatsReply",
            Message::History { .. } => "History",
            Message::Versions { .. } => "Versions",
            Message::Alive => "Alive",
            Message::Restore { .. } => "Restore",
            Message::Unsent { .. } => "Unsent",
            Message::Planned { .. } => "Planned",
            Message::Allowance { .. } => "Allowance",
            Message::Deleted { .. } => "Deleted",
            Message::Summarize { .. } => "Summarize",
            Message::Summary { .. } => "Summary",
            Message::MoreDigests { .. } => "MoreDigests",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of 200,000 entries: one `Summary` of it, its frame under the limit, does
    /// not decode (bincode counts each field's size in memory against the limit), which
    /// ended every compare of such a directory; in the batches of `digest_batches`, as
    /// `MoreDigests` steps and a final `Summary`, every frame decodes, in its limit, and the
    /// entries arrive whole and in order. An entry with attributes costs its batch more.
    #[test]
    fn a_directory_of_any_width_travels_in_frames_that_decode() {
        use crate::frame;
        let entry = |i: usize, xattr: bool| {
            let mut meta = Meta {
                kind: crate::meta::Kind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: i as u64,
                mtime: 0,
                mtime_nsec: 0,
                rdev: 0,
                xattrs: Default::default(),
            };
            if xattr {
                meta.xattrs.list.push((b"user.k".to_vec(), vec![7; 2000]));
            }
            DigestEntry {
                entry: Entry {
                    path: RelPath::from(format!("d/f{i:06}").as_str()),
                    meta,
                    link: None,
                    inode: None,
                },
                digest: [1; 32],
                hardlink: None,
            }
        };
        let entries: Vec<DigestEntry> = (0..200_000).map(|i| entry(i, false)).collect();
        let whole = Message::Summary {
            id: 1,
            dir: None,
            entries: entries.clone(),
            below: 200_000,
        };
        let mut buf = Vec::new();
        frame::encode(&whole, &mut buf).unwrap();
        assert!(buf.len() < frame::MAX_FRAME, "{} bytes", buf.len());
        assert!(frame::decode(&buf).is_err(), "one frame of it decoded");

        let batches = digest_batches(entries.clone());
        assert!(batches.len() > 1);
        let last = batches.len() - 1;
        let mut arrived = Vec::new();
        for (k, entries) in batches.into_iter().enumerate() {
            let msg = if k < last {
                Message::MoreDigests { id: 1, entries }
            } else {
                Message::Summary {
                    id: 1,
                    dir: None,
                    entries,
                    below: 200_000,
                }
            };
            assert_eq!(msg.is_final_reply(), k == last);
            let mut buf = Vec::new();
            frame::encode(&msg, &mut buf).unwrap();
            let (back, used) = frame::decode(&buf).unwrap().unwrap();
            assert_eq!(used, buf.len());
            match back {
                Message::MoreDigests { entries, .. } | Message::Summary { entries, .. } => {
                    arrived.extend(entries)
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(arrived, entries);

        // Nothing to split: one batch, empty or not.
        assert_eq!(digest_batches(Vec::new()), vec![Vec::new()]);
        assert_eq!(digest_batches(entries[..3].to_vec()).len(), 1);
        // Entries carrying attributes fill a batch sooner.
        let heavy: Vec<DigestEntry> = (0..10_000).map(|i| entry(i, true)).collect();
        let light = digest_batches(entries[..10_000].to_vec()).len();
        assert!(digest_batches(heavy).len() > light);
    }

    #[test]
    fn only_changes_are_mutations_and_only_ends_are_final() {
        let list = Message::List {
            id: 1,
            under: RelPath::root(),
            xattrs: Namespaces::ALL,
        };
        let delete = Message::Delete {
            id: 2,
            path: RelPath::from("a"),
        };
        assert_eq!(list.mutation_id(), None);
        assert_eq!(delete.mutation_id(), Some(2));
        assert_eq!(
            Message::FileData {
                id: 3,
                data: vec![]
            }
            .mutation_id(),
            None
        );
        let a = RelPath::from("a");
        let b = RelPath::from("d/b");
        let rename = Message::Rename {
            id: 4,
            from: a.clone(),
            to: b.clone(),
        };
        assert_eq!(delete.changed_paths(), [Some(&a), None]);
        assert_eq!(rename.changed_paths(), [Some(&a), Some(&b)]);
        assert_eq!(rename.mutation_id(), Some(4));
        assert_eq!(
            list.changed_paths(),
            [None, None],
            "a listing changes nothing"
        );
        assert!(Message::Ack { id: 1 }.is_final_reply());
        assert!(!Message::NoBase { id: 1 }.is_final_reply());
        let listing = |done| Message::Listing {
            id: 1,
            entries: vec![],
            done,
        };
        assert!(!listing(false).is_final_reply());
        assert!(listing(true).is_final_reply());
        assert!(!Message::Bye.is_final_reply(), "not a reply at all");
    }
}
