//! rsyncd.conf into receiver.toml.

use crate::{checked, error, quote, ImportError};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Options for [`rsyncd_conf`].
#[derive(Debug, Clone, Default)]
pub struct ReceiverOptions {
    /// `listen`; default `0.0.0.0:8730`.
    pub listen: Option<String>,
    /// Sender fingerprints allowed on every module.
    pub clients: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct RsyncdModule {
    name: String,
    line: usize,
    values: BTreeMap<String, (String, usize)>,
}

/// Converts rsyncd.conf `text` (read from `file`) into receiver.toml text.
pub fn rsyncd_conf(text: &str, file: &Path, opts: &ReceiverOptions) -> Result<String, ImportError> {
    let mut global = RsyncdModule::default();
    let mut modules: Vec<RsyncdModule> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| error(file, n, format!("unterminated section header {line:?}")))?
                .trim();
            if name.is_empty() || name.contains('/') || name.contains('"') {
                return Err(error(file, n, format!("invalid module name {name:?}")));
            }
            if name == "global" {
                continue;
            }
            modules.push(RsyncdModule {
                name: name.to_string(),
                line: n,
                values: BTreeMap::new(),
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(error(
                file,
                n,
                format!("expected `name = value`, found {line:?}"),
            ));
        };
        let key = key
            .trim()
            .to_ascii_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let key = match key.as_str() {
            "allow hosts" => "hosts allow".to_string(),
            "deny hosts" => "hosts deny".to_string(),
            _ => key,
        };
        let target = modules.last_mut().unwrap_or(&mut global);
        target.values.insert(key, (value.trim().to_string(), n));
    }
    if modules.is_empty() {
        return Err(error(file, 0, "no [module] sections"));
    }
    let listen = opts.listen.clone().unwrap_or_else(|| "0.0.0.0:8730".into());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# receiver.toml imported from {} by `ferry import rsyncd`.",
        file.display()
    );
    if let Some((port, _)) = global.values.get("port") {
        let _ = writeln!(
            out,
            "# rsyncd listened on port {port}; ferry has its own port."
        );
    }
    let _ = writeln!(out, "listen = {}", quote(&listen));
    let _ = writeln!(out, "cert = \"cert.pem\"   # ferry keygen /etc/ferry");
    let _ = writeln!(out, "key = \"key.pem\"");
    for m in &modules {
        let get = |k: &str| m.values.get(k).or_else(|| global.values.get(k));
        let _ = writeln!(out, "\n[modules.{}]", m.name);
        let (path, _) = get("path")
            .ok_or_else(|| error(file, m.line, format!("module [{}] has no path", m.name)))?;
        let _ = writeln!(out, "path = {}", quote(path));
        if let Some((c, _)) = get("comment") {
            let _ = writeln!(out, "comment = {}", quote(c));
        }
        let read_only = match get("read only") {
            Some((v, line)) => boolean(v).ok_or_else(|| {
                error(
                    file,
                    *line,
                    format!("read only: expected yes or no, found {v:?}"),
                )
            })?,
            None => true,
        };
        let _ = writeln!(out, "read_only = {read_only}");
        if let Some((hosts, line)) = get("hosts allow") {
            let list =
                hosts_allow(hosts).map_err(|e| error(file, *line, format!("hosts allow: {e}")))?;
            let quoted: Vec<String> = list.iter().map(|h| quote(h)).collect();
            let _ = writeln!(out, "hosts_allow = [{}]", quoted.join(", "));
        }
        if let Some((mc, line)) = get("max connections") {
            let n: usize = mc.parse().map_err(|_| {
                error(
                    file,
                    *line,
                    format!("max connections: expected a number, found {mc:?}"),
                )
            })?;
            if n > 0 {
                let _ = writeln!(out, "max_connections = {n}");
            }
        }
        if let Some((users, _)) = get("auth users") {
            let secrets = get("secrets file").map_or("?", |(s, _)| s.as_str());
            let _ = writeln!(
                out,
                "# auth users = {users} (secrets file {secrets}): ferry identifies senders by \
                 certificate instead.\n# Run `ferry keygen /etc/ferry` on each source host and \
                 list the printed fingerprints here."
            );
        }
        let clients: Vec<String> = opts.clients.iter().map(|c| quote(c)).collect();
        let none = if clients.is_empty() {
            "   # none yet: nobody can use this module until a sender's fingerprint is here \
             (`ferry keygen` prints it; or import with --client FINGERPRINT)"
        } else {
            ""
        };
        let _ = writeln!(out, "clients = [{}]{none}", clients.join(", "));
        if let Some((deny, line)) = get("hosts deny") {
            let _ = writeln!(
                out,
                "# line {line}: hosts deny = {deny} has no equivalent; narrow hosts_allow instead."
            );
        }
        // rsyncd's uid/gid: whose files a module's transfers make. root keeps the senders'
        // owners; another user makes them all that user's.
        match (get("uid"), get("gid")) {
            (None, None) => {}
            (uid, gid) => {
                let uid = uid.map_or("root", |(v, _)| v.as_str());
                let gid = gid.map_or("root", |(v, _)| v.as_str());
                let line = get("uid").or(get("gid")).map_or(0, |(_, l)| *l);
                let owner = owner_of(uid, gid).map_err(|e| error(file, line, e))?;
                let _ = writeln!(
                    out,
                    "owner = {}   # uid = {uid}, gid = {gid}",
                    quote(&owner)
                );
            }
        }
        let _ = writeln!(
            out,
            "# devices = false, setuid = false: no device nodes, no setuid/setgid bits (the \
             safe defaults; say true to keep them)"
        );
        if let Some((v, line)) = get("ignore errors") {
            let _ = writeln!(
                out,
                "# line {line}: ignore errors = {v} is not carried over: ferry never skips a \
                 failed deletion silently; each failed path is reported and retried"
            );
        }
        let dropped: Vec<&str> = ["use chroot", "list", "exclude", "timeout"]
            .into_iter()
            .filter(|k| m.values.contains_key(*k))
            .collect();
        if !dropped.is_empty() {
            let _ = writeln!(
                out,
                "# not carried over: {} (the receiver writes as the user it runs as, keeps \
                 owners when root, never follows symlinks out of the module, and lists nothing \
                 to anyone without a pinned certificate)",
                dropped.join(", ")
            );
        }
    }
    checked(out, file, |text, f| {
        ferry_receiver::Config::parse(text, f).map(drop)
    })
}

/// rsyncd's `uid`/`gid` as a ferry `owner`: root (or 0) keeps the senders' owners; names are
/// resolved on this host (where the receiver runs) to numeric ids.
fn owner_of(uid: &str, gid: &str) -> Result<String, String> {
    if matches!(uid, "root" | "0") && matches!(gid, "root" | "0") {
        return Ok("preserve".into());
    }
    let id = |name: &str, what: &str| -> Result<u32, String> {
        if let Ok(n) = name.parse() {
            return Ok(n);
        }
        let c = std::ffi::CString::new(name).map_err(|_| format!("{what} {name:?}"))?;
        // SAFETY: `c` is NUL-terminated; the returned records are read at once.
        let found = unsafe {
            if what == "uid" {
                let p = libc::getpwnam(c.as_ptr());
                (!p.is_null()).then(|| (*p).pw_uid)
            } else {
                let g = libc::getgrnam(c.as_ptr());
                (!g.is_null()).then(|| (*g).gr_gid)
            }
        };
        found.ok_or_else(|| format!("{what} = {name}: no such {what} on this host"))
    };
    Ok(format!("{}:{}", id(uid, "uid")?, id(gid, "gid")?))
}

fn boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" => Some(true),
        "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// rsyncd's `hosts allow`: addresses, CIDR blocks, `addr/netmask`, and `10.1.2.*` wildcards.
/// Host names cannot be matched by ferry and are an error.
fn hosts_allow(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in list.split([',', ' ', '\t']).filter(|s| !s.is_empty()) {
        if let Some((addr, mask)) = item.split_once('/') {
            if let Ok(m) = mask.parse::<std::net::Ipv4Addr>() {
                let bits = u32::from(m);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(format!("{item:?}: netmask is not contiguous"));
                }
                out.push(format!("{addr}/{}", bits.leading_ones()));
                continue;
            }
            out.push(item.to_string());
        } else if item.contains('*') {
            let parts: Vec<&str> = item.split('.').collect();
            let fixed = parts.iter().take_while(|p| **p != "*").count();
            if parts.len() != 4 || parts[fixed..].iter().any(|p| *p != "*") {
                return Err(format!(
                    "{item:?}: only trailing `*` octets can be converted"
                ));
            }
            let mut octets: Vec<&str> = parts[..fixed].to_vec();
            octets.resize(4, "0");
            out.push(format!("{}/{}", octets.join("."), fixed * 8));
        } else if item.parse::<std::net::IpAddr>().is_ok() {
            out.push(item.to_string());
        } else {
            return Err(format!(
                "{item:?} is a host name; ferry matches addresses (use an IP or CIDR block)"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSYNCD: &str = "uid = root\ngid = root\nmax connections = 200\nport = 873\n\
        secrets file = /etc/rsync.pass\nignore errors = yes\nreverse lookup = no\n\n\
        [file]\npath = /data/file\ncomment = file\nread only = no\nlist = no\nauth users = rsync\n\
        hosts allow = 10.255.50.63,10.255.50.64,10.255.60.2\n\n\
        [code]\npath = /data/code\ncomment = file\nread only = no\nlist = no\nauth users = rsync\n\
        hosts allow = 10.255.50.0/255.255.255.0 10.1.*.*\n";

    #[test]
    fn rsyncd_conf_of_the_guide() {
        let out = rsyncd_conf(
            RSYNCD,
            Path::new("/etc/rsyncd.conf"),
            &ReceiverOptions::default(),
        )
        .unwrap();
        assert!(out.contains("owner = \"preserve\""), "{out}");
        assert!(
            out.contains("[modules.file]\npath = \"/data/file\""),
            "{out}"
        );
        assert!(out.contains("read_only = false"), "{out}");
        assert!(
            out.contains("max_connections = 200"),
            "global default applies: {out}"
        );
        assert!(
            out.contains("hosts_allow = [\"10.255.50.63\", \"10.255.50.64\", \"10.255.60.2\"]"),
            "{out}"
        );
        assert!(
            out.contains("hosts_allow = [\"10.255.50.0/24\", \"10.1.0.0/16\"]"),
            "{out}"
        );
        assert!(
            out.contains("# auth users = rsync (secrets file /etc/rsync.pass)"),
            "{out}"
        );
        // Said, not dropped silently: `ignore errors`, and a module nobody can use yet.
        assert!(
            out.contains("# line 6: ignore errors = yes is not carried over"),
            "{out}"
        );
        assert!(
            out.contains("clients = []   # none yet: nobody can use this module"),
            "{out}"
        );
    }

    #[test]
    fn rsyncd_errors_name_the_line() {
        let cases = [
            (
                "[file]\npath = /x\nhosts allow = backup.example.com\n",
                3,
                "host name",
            ),
            ("[file]\npath = /x\nread only = maybe\n", 3, "read only"),
            ("[file\npath = /x\n", 1, "unterminated"),
            ("[file]\ncomment = no path\n", 1, "no path"),
            (
                "[file]\npath = /x\nthis line is junk\n",
                3,
                "expected `name = value`",
            ),
        ];
        for (text, line, needle) in cases {
            let e = rsyncd_conf(text, Path::new("r.conf"), &ReceiverOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("r.conf:{line}: ")), "{e}");
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn rsyncd_uid_and_gid_become_an_owner() {
        let conf = "uid = 1234\ngid = 99\n[m]\npath = /m\n";
        let out = rsyncd_conf(conf, Path::new("r.conf"), &ReceiverOptions::default()).unwrap();
        assert!(out.contains("owner = \"1234:99\""), "{out}");
        let conf = "[m]\npath = /m\nuid = no-such-user-here\n";
        let e = rsyncd_conf(conf, Path::new("r.conf"), &ReceiverOptions::default()).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.to_string().contains("no such uid"), "{e}");
    }
}
