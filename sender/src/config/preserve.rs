//! `preserve = [...]`: what a group keeps beyond `rsync -a`.

use ferry_protocol::xattr::Namespaces;

/// `preserve = [...]`: what a group keeps beyond what `rsync -a` keeps. All of it by default:
/// a backup is judged when it is restored, and a restored tree without its file capabilities,
/// ACLs, security labels or hard links does not work like the original (a `setcap`'d binary
/// loses its privilege, a shared directory its access rules, a hard-linked store doubles).
/// The cost is one `llistxattr` per entry read and a map of the files with several names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preserve {
    /// Holes of sparse files stay holes (`"sparse"`: a hole reads as the zeros it stands
    /// for, so keeping it changes no content and saves the receiver's disk and the wire).
    pub sparse: bool,
    /// Names of one file stay names of one file (`"hardlinks"`), within the group.
    pub hardlinks: bool,
    /// POSIX ACLs, access and default (`"acls"`).
    pub acls: bool,
    /// Extended attributes: `user.*`, and as root `trusted.*` and `security.*` (SELinux
    /// labels, file capabilities) (`"xattrs"`).
    pub xattrs: bool,
}

impl Default for Preserve {
    fn default() -> Self {
        Preserve {
            sparse: true,
            hardlinks: true,
            acls: true,
            xattrs: true,
        }
    }
}

impl Preserve {
    /// Parses the list (`[]` keeps nothing beyond `rsync -a`).
    pub fn parse(items: &[String]) -> Result<Preserve, String> {
        let mut p = Preserve {
            sparse: false,
            hardlinks: false,
            acls: false,
            xattrs: false,
        };
        for item in items {
            match item.as_str() {
                "sparse" => p.sparse = true,
                "hardlinks" => p.hardlinks = true,
                "acls" => p.acls = true,
                "xattrs" => p.xattrs = true,
                other => {
                    return Err(format!(
                        "unknown item {other:?} (expected \"sparse\", \"hardlinks\", \"acls\" or \"xattrs\")"
                    ))
                }
            }
        }
        Ok(p)
    }

    /// The attribute namespaces the group carries.
    pub fn namespaces(&self) -> Namespaces {
        let mut ns = Namespaces::NONE;
        if self.acls {
            ns = ns.union(Namespaces::ACL);
        }
        if self.xattrs {
            ns = ns.union(Namespaces::XATTRS);
        }
        ns
    }
}
