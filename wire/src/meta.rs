//! What `rsync -a` preserves about a tree entry, and how two entries differ.

use crate::path::RelPath;
use crate::xattr::{Namespaces, Xattrs};
use serde::{Deserialize, Serialize};

/// The type of a tree entry. Sockets are never transferred (rsync skips them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; never followed.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
}

impl Kind {
    /// True for fifos and device nodes, which only root may create.
    pub fn is_special(self) -> bool {
        matches!(self, Kind::Fifo | Kind::CharDevice | Kind::BlockDevice)
    }
}

/// Metadata of one entry. `mode` holds the permission bits including setuid, setgid and
/// sticky (`0o7777`); the type lives in `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Entry type.
    pub kind: Kind,
    /// Permission bits, `mode & 0o7777`.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Modification time, whole seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Device number for device nodes.
    pub rdev: u64,
    /// Extended attributes (ACLs and file capabilities among them) in the namespaces that
    /// were read; the default covers none and leaves a receiver's attributes alone.
    pub xattrs: Xattrs,
}

/// Which file a name belongs to, on the host that read it: only names in one listing with
/// equal `Inode`s are hard links of each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Inode {
    /// Device.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// One entry of a tree: its path, metadata and, for symlinks, the target bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the tree root.
    pub path: RelPath,
    /// Metadata.
    pub meta: Meta,
    /// Symlink target, as stored (never resolved).
    #[serde(with = "serde_bytes")]
    pub link: Option<Vec<u8>>,
    /// For a regular file with more than one name: its inode, to find its other names.
    pub inode: Option<Inode>,
}

/// One way in which two entries at the same path differ. The names are what `ferry verify`
/// prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Difference {
    /// Present on the left only.
    Missing,
    /// Present on the right only.
    Extra,
    /// Different entry types.
    Type,
    /// Different bytes (or sizes).
    Content,
    /// Different permission bits.
    Mode,
    /// Different modification times.
    Mtime,
    /// Different numeric owner or group.
    Owner,
    /// Different symlink targets.
    Symlink,
    /// Different extended attributes (file capabilities and security labels included).
    Xattr,
    /// Different POSIX ACLs (access or default).
    Acl,
    /// Hard-linked to different names (or linked on one side only).
    Hardlink,
}

impl Difference {
    /// The word `verify` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Difference::Missing => "missing",
            Difference::Extra => "extra",
            Difference::Type => "type",
            Difference::Content => "content",
            Difference::Mode => "mode",
            Difference::Mtime => "mtime",
            Difference::Owner => "owner",
            Difference::Symlink => "symlink",
            Difference::Xattr => "xattr",
            Difference::Acl => "acl",
            Difference::Hardlink => "hardlink",
        }
    }
}

/// Which attributes a comparison looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compare {
    /// Compare uid/gid (only meaningful when the destination is written by root).
    pub owner: bool,
    /// Compare the setuid and setgid bits (a module may strip them).
    pub setid: bool,
    /// Extended attributes in these namespaces (what is preserved and kept).
    pub xattrs: Namespaces,
    /// Which names share a file.
    pub hardlinks: bool,
}

impl Compare {
    /// What `rsync -a` keeps, owners as `owner` says.
    pub fn all(owner: bool) -> Compare {
        Compare {
            owner,
            setid: true,
            xattrs: Namespaces::NONE,
            hardlinks: false,
        }
    }

    /// These comparisons and also the attributes in `xattrs` and hard links if `hardlinks`.
    pub fn with(self, xattrs: Namespaces, hardlinks: bool) -> Compare {
        Compare {
            xattrs,
            hardlinks,
            ..self
        }
    }
}

impl Meta {
    /// True when `mtime` and `size` match: rsync's quick check for regular files.
    pub fn quick_equal(&self, other: &Meta) -> bool {
        self.size == other.size && self.mtime == other.mtime && self.mtime_nsec == other.mtime_nsec
    }

    /// Attribute differences other than content, type and symlink target, in the order
    /// `verify` reports them. Symlink permission bits are not compared (Linux ignores them).
    pub fn attr_differences(&self, other: &Meta, cmp: Compare) -> Vec<Difference> {
        let mut out = Vec::new();
        let mask = if cmp.setid { !0 } else { !0o6000 };
        if self.kind != Kind::Symlink && self.mode & mask != other.mode & mask {
            out.push(Difference::Mode);
        }
        if self.mtime != other.mtime || self.mtime_nsec != other.mtime_nsec {
            out.push(Difference::Mtime);
        }
        if cmp.owner && (self.uid != other.uid || self.gid != other.gid) {
            out.push(Difference::Owner);
        }
        // Only what both sides read can be compared.
        let ns = cmp
            .xattrs
            .intersect(self.xattrs.covers)
            .intersect(other.xattrs.covers);
        if self
            .xattrs
            .differ(&other.xattrs, ns.intersect(Namespaces::XATTRS))
        {
            out.push(Difference::Xattr);
        }
        if self
            .xattrs
            .differ(&other.xattrs, ns.intersect(Namespaces::ACL))
        {
            out.push(Difference::Acl);
        }
        out
    }
}

#[cfg(test)]
pub(crate) fn test_meta(kind: Kind, size: u64, mtime: i64) -> Meta {
    Meta {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime,
        mtime_nsec: 0,
        rdev: 0,
        xattrs: Xattrs::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_differences_respect_owner_flag_and_symlink_mode() {
        let a = test_meta(Kind::File, 1, 10);
        let mut b = a.clone();
        b.mode = 0o4755;
        b.uid = 7;
        b.mtime_nsec = 1;
        assert_eq!(
            a.attr_differences(&b, Compare::all(true)),
            vec![Difference::Mode, Difference::Mtime, Difference::Owner]
        );
        assert_eq!(
            a.attr_differences(&b, Compare::all(false)),
            vec![Difference::Mode, Difference::Mtime]
        );
        let mut l = a.clone();
        l.kind = Kind::Symlink;
        let mut l2 = l.clone();
        l2.mode = 0o777;
        assert!(l.attr_differences(&l2, Compare::all(true)).is_empty());
    }
}
