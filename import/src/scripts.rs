//! The old scripts' settings (file_watch.conf, inotify.sh, sersync.sh) into sender.toml.

use crate::{checked, error, quote, ImportError};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Options for [`scripts`].
#[derive(Debug, Clone, Default)]
pub struct SenderOptions {
    /// rsyncd port on the backup hosts (inotify.sh style); default 873.
    pub port: Option<u16>,
    /// Remote shell for ssh targets (file_watch.conf style); default `ssh`.
    pub rsh: Option<String>,
}

/// A shell value: a scalar, an indexed array or an associative array; with its line.
#[derive(Debug, Clone)]
enum Value {
    Scalar(String),
    List(Vec<String>),
    Map(Vec<(String, String)>),
}

/// Converts the old scripts' settings (`files`: (path, text), any mix of file_watch.conf,
/// inotify.sh and sersync.sh) into sender.toml text with rsync targets.
pub fn scripts(files: &[(PathBuf, String)], opts: &SenderOptions) -> Result<String, ImportError> {
    let mut vars: BTreeMap<String, (Value, PathBuf, usize)> = BTreeMap::new();
    for (file, text) in files {
        parse_shell(text, file, &mut vars)?;
    }
    let var = |k: &str| vars.get(k);
    let mut out = String::new();
    let sources: Vec<String> = files.iter().map(|(f, _)| f.display().to_string()).collect();
    let _ = writeln!(
        out,
        "# sender.toml imported from {} by `ferry import scripts`.",
        sources.join(", ")
    );
    let _ = writeln!(out, "# The targets are the old rsync destinations (kind = \"rsync\"); once the backup host runs");
    let _ = writeln!(
        out,
        "# `ferry receive`, replace each with address = \"HOST:8730\" and its fingerprint."
    );
    let _ = writeln!(out, "cert = \"cert.pem\"   # ferry keygen /etc/ferry");
    let _ = writeln!(out, "key = \"key.pem\"");
    let _ = writeln!(out, "state_dir = \"/var/lib/ferry\"");
    let carried = RsyncOptions::of(files).lines();
    if let Some((Value::Scalar(host), file, line)) = var("DEST_HOST") {
        file_watch(&vars, host, file, *line, opts, &carried, &mut out)?;
    } else if let (Some((Value::Scalar(host), file, line)), Some(_), Some(_)) =
        (var("dest_host"), var("src_dir"), var("dest_dir"))
    {
        // The plain file_watch.sh: one directory, its settings as shell variables.
        let mut one = BTreeMap::new();
        for (from, to) in [
            ("src_dir", "SRC_DIR_1"),
            ("dest_dir", "DEST_DIR_1"),
            ("user", "USER_1"),
        ] {
            if let Some(v) = vars.get(from) {
                one.insert(to.to_string(), v.clone());
            }
        }
        file_watch(&one, host, file, *line, opts, &carried, &mut out)?;
    } else if let Some((modules, file, line)) = var("rsync_module_name") {
        let Value::Map(modules) = modules else {
            return Err(error(
                file,
                *line,
                "rsync_module_name: expected an associative array ([module]='/dir' …)",
            ));
        };
        inotify_sh(&vars, modules, opts, &carried, &mut out)?;
    } else if let Some((_, file, line)) = var("des_ip") {
        // sersync.sh names the hosts; inotify.sh the modules and directories.
        return Err(error(
            file,
            *line,
            "sersync.sh names the backup hosts, not what to copy: pass inotify.sh too \
             (ferry import scripts inotify.sh sersync.sh)",
        ));
    } else {
        let file = files.first().map_or(PathBuf::new(), |(f, _)| f.clone());
        return Err(error(
            &file,
            0,
            "found neither DEST_HOST (file_watch.conf), dest_host/src_dir/dest_dir \
             (file_watch.sh) nor rsync_module_name (inotify.sh)",
        ));
    }
    let file = files.first().map_or(PathBuf::new(), |(f, _)| f.clone());
    checked(out, &file, |text, f| {
        ferry_sender::Config::parse(text, f).map(drop)
    })
}

/// What the scripts' own `rsync` command lines asked for that a target can say: `-z` or
/// `--compress`, `--timeout=N`, `--bwlimit=N`.
#[derive(Debug, Default, PartialEq, Eq)]
struct RsyncOptions {
    compress: bool,
    timeout: Option<u64>,
    bwlimit: Option<String>,
}

impl RsyncOptions {
    fn of(files: &[(PathBuf, String)]) -> RsyncOptions {
        let mut o = RsyncOptions::default();
        for (_, text) in files {
            for line in text.lines().map(str::trim) {
                if line.starts_with('#') || !line.split_whitespace().any(|w| w == "rsync") {
                    continue;
                }
                for w in line.split_whitespace() {
                    let w = w.trim_matches(['"', '\'']);
                    if w == "--compress"
                        || (w.starts_with('-') && !w.starts_with("--") && w.contains('z'))
                    {
                        o.compress = true;
                    } else if let Some(t) = w.strip_prefix("--timeout=") {
                        o.timeout = t.parse().ok().or(o.timeout);
                    } else if let Some(b) = w.strip_prefix("--bwlimit=") {
                        o.bwlimit = Some(b.to_string());
                    }
                }
            }
        }
        o
    }

    /// The options as lines of a `[targets.…]` table (empty if there are none).
    fn lines(&self) -> String {
        let mut lines = String::new();
        if self.compress {
            lines.push_str("compress = true   # rsync -z in the script\n");
        }
        if let Some(t) = self.timeout {
            lines.push_str(&format!(
                "timeout_s = {t}   # rsync --timeout={t} in the script\n"
            ));
        }
        if let Some(b) = &self.bwlimit {
            lines.push_str(&format!(
                "rsync_args = [{}]   # from the script\n",
                quote(&format!("--bwlimit={b}"))
            ));
        }
        lines
    }
}

fn file_watch(
    vars: &BTreeMap<String, (Value, PathBuf, usize)>,
    host: &str,
    file: &Path,
    line: usize,
    opts: &SenderOptions,
    carried: &str,
    out: &mut String,
) -> Result<(), ImportError> {
    if host.is_empty() {
        return Err(error(file, line, "DEST_HOST is empty"));
    }
    let mut groups: Vec<(usize, String, String, String)> = Vec::new();
    for (k, (v, f, l)) in vars {
        let Some(n) = k.strip_prefix("SRC_DIR_") else {
            continue;
        };
        let n: usize = n
            .parse()
            .map_err(|_| error(f, *l, format!("{k}: expected SRC_DIR_<number>")))?;
        let scalar = |key: &str| match vars.get(key) {
            Some((Value::Scalar(s), _, _)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        let Value::Scalar(src) = v else {
            return Err(error(f, *l, format!("{k}: expected a directory")));
        };
        let dest = scalar(&format!("DEST_DIR_{n}"))
            .ok_or_else(|| error(f, *l, format!("{k} has no matching DEST_DIR_{n}")))?;
        let user = scalar(&format!("USER_{n}")).unwrap_or_else(|| "root".into());
        groups.push((n, src.clone(), dest, user));
    }
    if let Some((Value::Scalar(num), f, l)) = vars.get("SYNC_NUM") {
        let num: usize = num
            .parse()
            .map_err(|_| error(f, *l, format!("SYNC_NUM: expected a number, found {num:?}")))?;
        // The script ignores groups past SYNC_NUM; so does the import, saying so.
        if groups.iter().any(|g| g.0 > num) {
            let _ = writeln!(
                out,
                "# groups numbered above SYNC_NUM = {num} were ignored, as the script did"
            );
            groups.retain(|g| g.0 <= num);
        }
    }
    if groups.is_empty() {
        return Err(error(file, line, "no SRC_DIR_n / DEST_DIR_n groups"));
    }
    groups.sort();
    let mut users: Vec<&String> = groups.iter().map(|g| &g.3).collect();
    users.sort();
    users.dedup();
    let rsh = opts.rsh.clone().unwrap_or_else(|| "ssh".into());
    for user in &users {
        let _ = writeln!(
            out,
            "\n[targets.{}]\nkind = \"rsync\"\ntransport = \"ssh\"   # as file_watch.sh: rsync over ssh with keys\nrsh = {}\naddress = {}\nuser = {}",
            target_name(host, Some(user)),
            quote(&rsh),
            quote(host),
            quote(user)
        );
        out.push_str(carried);
    }
    for (n, src, dest, user) in &groups {
        let base = Path::new(src.trim_end_matches('/'))
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        // `rsync -a SRC_DIR user@host:DEST_DIR` puts the source's last component under
        // DEST_DIR; a ferry group copies the source's contents, so it names that directory.
        let module = format!("{}/{base}", dest.trim_end_matches('/'));
        let _ = writeln!(
            out,
            "\n[[sync]]   # group {n}\nname = {}\nsource = {}\ntargets = [{}]\nmodule = {}   # the destination path on {host}",
            quote(&format!("{n}-{base}")),
            quote(src),
            quote(&target_name(host, Some(user))),
            quote(&module)
        );
    }
    Ok(())
}

fn inotify_sh(
    vars: &BTreeMap<String, (Value, PathBuf, usize)>,
    modules: &[(String, String)],
    opts: &SenderOptions,
    carried: &str,
    out: &mut String,
) -> Result<(), ImportError> {
    let ips = match vars.get("des_ip") {
        Some((Value::List(l), _, _)) => l.clone(),
        Some((Value::Scalar(s), _, _)) => vec![s.clone()],
        Some((_, f, l)) => return Err(error(f, *l, "des_ip: expected (ip …)")),
        None => {
            let (f, l) = vars
                .get("rsync_module_name")
                .map(|(_, f, l)| (f.clone(), *l))
                .unwrap_or_default();
            return Err(error(&f, l, "no des_ip=(…) found; pass sersync.sh too"));
        }
    };
    if ips.is_empty() {
        let (_, f, l) = &vars["des_ip"];
        return Err(error(f, *l, "des_ip is empty"));
    }
    let scalar = |k: &str| match vars.get(k) {
        Some((Value::Scalar(s), _, _)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let user = scalar("user");
    let password = scalar("rsync_passwd_file");
    let port = opts.port.unwrap_or(873);
    for ip in &ips {
        let _ = writeln!(
            out,
            "\n[targets.{}]\nkind = \"rsync\"\naddress = {}",
            target_name(ip, None),
            quote(&format!("{ip}:{port}"))
        );
        if let Some(u) = &user {
            let _ = writeln!(out, "user = {}", quote(u));
        }
        if let Some(p) = &password {
            let _ = writeln!(out, "password_file = {}   # must be mode 0600", quote(p));
        }
        out.push_str(carried);
    }
    let excludes = match vars.get("exclude_file_rule") {
        Some((Value::Map(m), _, _)) => m.clone(),
        Some((_, f, l)) => {
            return Err(error(
                f,
                *l,
                "exclude_file_rule: expected an associative array",
            ))
        }
        None => Vec::new(),
    };
    let targets: Vec<String> = ips.iter().map(|ip| quote(&target_name(ip, None))).collect();
    for (module, dir) in modules {
        let _ = writeln!(
            out,
            "\n[[sync]]\nname = {}\nsource = {}\ntargets = [{}]\nmodule = {}",
            quote(module),
            quote(dir),
            targets.join(", "),
            quote(module)
        );
        if let Some((_, rule)) = excludes.iter().find(|(m, _)| m == module) {
            let patterns: Vec<String> = rule
                .split('|')
                .filter(|p| !p.is_empty())
                .map(exclude_pattern)
                .collect();
            let quoted: Vec<String> = patterns.iter().map(|p| quote(p)).collect();
            let _ = writeln!(
                out,
                "exclude = [{}]   # was the grep -E rule {}",
                quoted.join(", "),
                quote(rule)
            );
        }
    }
    Ok(())
}

/// The old scripts filtered event paths with `grep -E 'tmp|.log'`; the parts mean a name
/// (`tmp`) or a suffix (`.log`). As rsync patterns: `tmp`, `*.log`.
fn exclude_pattern(part: &str) -> String {
    if part.starts_with('.') && !part.contains(['*', '/', '[']) {
        format!("*{part}")
    } else {
        part.to_string()
    }
}

fn target_name(host: &str, user: Option<&str>) -> String {
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    match user {
        Some(u) => format!("{u}_at_{host}"),
        None => format!("backup_{host}"),
    }
}

/// Collects `NAME=value`, `NAME = value` (file_watch.conf), `NAME=(a b)` and
/// `declare -A NAME=([k]='v' …)` assignments. Other lines are ignored: these are scripts.
fn parse_shell(
    text: &str,
    file: &Path,
    vars: &mut BTreeMap<String, (Value, PathBuf, usize)>,
) -> Result<(), ImportError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let n = i + 1;
        let mut line = lines[i].trim().to_string();
        i += 1;
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        for prefix in [
            "declare -A ",
            "declare -a ",
            "declare ",
            "export ",
            "local ",
            "readonly ",
        ] {
            if let Some(rest) = line.strip_prefix(prefix) {
                line = rest.trim().to_string();
            }
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let mut value = value.trim().to_string();
        if value.starts_with('(') {
            // Arrays may span lines until the closing parenthesis.
            while !balanced(&value) {
                let Some(next) = lines.get(i) else {
                    return Err(error(file, n, format!("{name}: unterminated array")));
                };
                value.push(' ');
                value.push_str(next.trim());
                i += 1;
            }
            let inner = value[1..value.rfind(')').expect("balanced")].trim();
            let words = words(inner).map_err(|e| error(file, n, format!("{name}: {e}")))?;
            let parsed = if words.iter().any(|w| w.starts_with('[')) {
                let mut map = Vec::new();
                for w in words {
                    let (k, v) = w
                        .strip_prefix('[')
                        .and_then(|w| w.split_once("]="))
                        .ok_or_else(|| {
                            error(
                                file,
                                n,
                                format!("{name}: expected [key]=value, found {w:?}"),
                            )
                        })?;
                    map.push((k.to_string(), v.to_string()));
                }
                Value::Map(map)
            } else {
                Value::List(words)
            };
            vars.insert(name.to_string(), (parsed, file.to_path_buf(), n));
        } else {
            let v = words(&value).map_err(|e| error(file, n, format!("{name}: {e}")))?;
            vars.insert(
                name.to_string(),
                (Value::Scalar(v.join(" ")), file.to_path_buf(), n),
            );
        }
    }
    Ok(())
}

fn balanced(s: &str) -> bool {
    let (mut quote, mut depth) = (None, 0i32);
    for c in s.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            _ => {}
        }
    }
    quote.is_none() && depth <= 0
}

/// Splits shell words, removing quotes; stops at an unquoted `#` comment.
fn words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_sh_arrays() {
        let inotify = "declare -A rsync_module_name=([file]='/file' [code]='/code')\n\
                       declare -A exclude_file_rule=([file]='tmp|.log')\n";
        let sersync =
            "rsync_passwd_file=/etc/rsync.pas\ndes_ip=(192.168.74.20 192.168.74.21)\nuser=rsync\n";
        let out = scripts(
            &[
                (PathBuf::from("inotify.sh"), inotify.into()),
                (PathBuf::from("sersync.sh"), sersync.into()),
            ],
            &SenderOptions::default(),
        )
        .unwrap();
        assert!(
            out.contains(
                "[targets.backup_192_168_74_20]\nkind = \"rsync\"\naddress = \"192.168.74.20:873\""
            ),
            "{out}"
        );
        assert!(out.contains("password_file = \"/etc/rsync.pas\""), "{out}");
        assert!(out.contains("exclude = [\"tmp\", \"*.log\"]"), "{out}");
        assert!(
            out.contains("targets = [\"backup_192_168_74_20\", \"backup_192_168_74_21\"]"),
            "{out}"
        );
        assert!(out.contains("name = \"code\"\nsource = \"/code\""), "{out}");
    }

    /// The guide's plain file_watch.sh (one directory, shell variables, rsync over ssh):
    /// it gave ":0: found neither …", and its `rsync -avzP --timeout=100` was not carried.
    #[test]
    fn the_plain_file_watch_sh_and_its_rsync_options() {
        let script = r#"#!/bin/bash
dest_host="192.168.56.12"
src_dir="/var/lib/docker"
dest_dir="/var/lib"
user="root"
inotifywait="/usr/bin/inotifywait"
${inotifywait} -mrq --timefmt '%Y%m%d %H:%M:%S' \
    --format '%T %w%f %e' \
    --event modify,delete,create,attrib $src_dir |
    while read -r files; do
        rsync -avzP --delete --timeout=100 "${src_dir}" "${user}"@"${dest_host}":"${dest_dir}"
        echo "${files} was rsynced" >>/tmp/rsync.log 2>&1
    done
"#;
        let out = scripts(
            &[(PathBuf::from("file_watch.sh"), script.into())],
            &SenderOptions::default(),
        )
        .unwrap();
        assert!(
            out.contains("source = \"/var/lib/docker\"\ntargets = [\"root_at_192_168_56_12\"]\nmodule = \"/var/lib/docker\""),
            "{out}"
        );
        let target = out
            .split("[targets.")
            .nth(1)
            .unwrap()
            .split("[[sync]]")
            .next()
            .unwrap();
        assert!(target.contains("compress = true"), "{out}");
        assert!(target.contains("timeout_s = 100"), "{out}");
        // sersync.sh alone says what is missing.
        let e = scripts(
            &[(
                PathBuf::from("sersync.sh"),
                "des_ip=(10.0.0.2)\nuser=rsync\n".into(),
            )],
            &SenderOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("sersync.sh:1: ") && e.contains("pass inotify.sh too"),
            "{e}"
        );
    }

    #[test]
    fn file_watch_conf_groups() {
        let conf = "# comment\nDEST_HOST = 192.168.56.12\nSYNC_NUM = 2\n\
                    SRC_DIR_1 = /var/lib/docker\nDEST_DIR_1 = /var/lib\nUSER_1 = root\n\
                    SRC_DIR_2 = /etc/supervisord.d\nDEST_DIR_2 = /etc\nUSER_2 = root\n\
                    SRC_DIR_3 = /ignored\nDEST_DIR_3 = /x\n";
        let out = scripts(
            &[(PathBuf::from("file_watch.conf"), conf.into())],
            &SenderOptions::default(),
        )
        .unwrap();
        assert!(out.contains("transport = \"ssh\""), "{out}");
        assert!(out.contains("source = \"/var/lib/docker\"\ntargets = [\"root_at_192_168_56_12\"]\nmodule = \"/var/lib/docker\""), "{out}");
        assert!(out.contains("module = \"/etc/supervisord.d\""), "{out}");
        assert!(!out.contains("/ignored"), "{out}");
        let e = scripts(
            &[(
                PathBuf::from("fw.conf"),
                "DEST_HOST = h\nSRC_DIR_1 = /a\n".into(),
            )],
            &SenderOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("fw.conf:2: ") && e.contains("DEST_DIR_1"),
            "{e}"
        );
    }
}
