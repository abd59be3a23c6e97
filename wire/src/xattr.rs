//! Extended attribute *types*: which namespaces travel and the list an entry carries, with
//! the checks a peer's list must pass. POSIX ACLs travel as their xattrs
//! (`system.posix_acl_access`, `system.posix_acl_default`), file capabilities as
//! `security.capability`; values are copied byte for byte (numeric ids in ACLs included).
//! Reading and applying them is `ferry_protocol::xattr`'s.

use serde::{Deserialize, Serialize};
/// A set of xattr namespaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Namespaces(u8);

impl Namespaces {
    /// None at all.
    pub const NONE: Namespaces = Namespaces(0);
    /// `user.*`.
    pub const USER: Namespaces = Namespaces(1);
    /// `trusted.*` (readable and writable with `CAP_SYS_ADMIN` only).
    pub const TRUSTED: Namespaces = Namespaces(2);
    /// `security.*` other than capabilities: SELinux/SMACK labels (written as root only).
    pub const SECURITY: Namespaces = Namespaces(4);
    /// The POSIX ACLs, `system.posix_acl_access` and `system.posix_acl_default`.
    pub const ACL: Namespaces = Namespaces(8);
    /// `security.capability`, file capabilities: privilege like a setuid bit, so a module
    /// keeps them only where it keeps setuid bits.
    pub const CAPABILITY: Namespaces = Namespaces(16);
    /// Every namespace of `preserve = ["xattrs"]`.
    pub const XATTRS: Namespaces = Namespaces(1 | 2 | 4 | 16);
    /// Everything ferry carries.
    pub const ALL: Namespaces = Namespaces(1 | 2 | 4 | 8 | 16);

    /// Both sets together.
    pub const fn union(self, other: Namespaces) -> Namespaces {
        Namespaces(self.0 | other.0)
    }

    /// What both sets hold.
    pub const fn intersect(self, other: Namespaces) -> Namespaces {
        Namespaces(self.0 & other.0)
    }

    /// This set without `other`'s namespaces.
    pub const fn without(self, other: Namespaces) -> Namespaces {
        Namespaces(self.0 & !other.0)
    }

    /// True if every namespace of `other` is in this set.
    pub const fn contains(self, other: Namespaces) -> bool {
        self.0 & other.0 == other.0
    }

    /// True for the empty set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The namespace of an attribute name; `None` for names ferry does not carry (other
    /// `system.*` attributes, which are views of something else, and unknown prefixes).
    pub fn of(name: &[u8]) -> Option<Namespaces> {
        if name.starts_with(b"user.") {
            Some(Self::USER)
        } else if name.starts_with(b"trusted.") {
            Some(Self::TRUSTED)
        } else if name == b"security.capability" {
            Some(Self::CAPABILITY)
        } else if name.starts_with(b"security.") {
            Some(Self::SECURITY)
        } else if name == b"system.posix_acl_access" || name == b"system.posix_acl_default" {
            Some(Self::ACL)
        } else {
            None
        }
    }

    /// The words of the configuration and of logs.
    pub fn describe(self) -> String {
        let words: Vec<&str> = [
            (Self::USER, "user"),
            (Self::TRUSTED, "trusted"),
            (Self::SECURITY, "security"),
            (Self::CAPABILITY, "capability"),
            (Self::ACL, "acl"),
        ]
        .iter()
        .filter(|(n, _)| self.contains(*n))
        .map(|(_, w)| *w)
        .collect();
        if words.is_empty() {
            "none".into()
        } else {
            words.join(", ")
        }
    }
}

/// Largest total of names and values carried for one entry (ext4 holds at most one block
/// of them without `ea_inode`; the kernel caps a value at 64 KiB).
pub const MAX_BYTES: usize = 64 << 10;

/// One attribute: name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// The extended attributes of an entry in the namespaces `covers`, sorted by name. The default
/// (covering nothing) means "not read, not managed": a receiver leaves the entry's attributes
/// as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Xattrs {
    /// The namespaces this list is complete for.
    pub covers: Namespaces,
    /// Attributes in `covers`, sorted by name, names unique.
    pub list: Vec<Xattr>,
}

impl Xattrs {
    /// The attributes in `ns`.
    pub fn within(&self, ns: Namespaces) -> impl Iterator<Item = &Xattr> {
        self.list
            .iter()
            .filter(move |(n, _)| Namespaces::of(n).is_some_and(|x| ns.contains(x)))
    }

    /// True if the two lists differ in `ns`.
    pub fn differ(&self, other: &Xattrs, ns: Namespaces) -> bool {
        !self.within(ns).eq(other.within(ns))
    }

    /// Checks a list from a peer: names unique, sorted, in a carried namespace that `covers`
    /// includes, without NUL, at most 255 bytes; names and values at most [`MAX_BYTES`].
    pub fn validate(&self) -> Result<(), String> {
        let mut total = 0;
        for (i, (name, value)) in self.list.iter().enumerate() {
            let shown = String::from_utf8_lossy(name);
            if name.is_empty() || name.len() > 255 || name.contains(&0) {
                return Err(format!("invalid xattr name {shown:?}"));
            }
            match Namespaces::of(name) {
                Some(ns) if self.covers.contains(ns) => {}
                _ => return Err(format!("xattr {shown:?} is outside the namespaces sent")),
            }
            if i > 0 && self.list[i - 1].0 >= *name {
                return Err(format!("xattr {shown:?} out of order or repeated"));
            }
            total += name.len() + value.len();
        }
        if total > MAX_BYTES {
            return Err(format!("xattrs total {total} bytes, more than {MAX_BYTES}"));
        }
        Ok(())
    }
}
