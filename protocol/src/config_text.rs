//! Where a key of a TOML configuration file is, so both daemons' configuration errors can name
//! the line as well as the key.

use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// A key that takes one string or a list of them (`address = "H:P"` or `address = ["H:P", …]`),
/// read as the list.
#[derive(Default)]
pub struct OneOrMore(pub Vec<String>);

impl<'de> serde::Deserialize<'de> for OneOrMore {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OneOrMore, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = OneOrMore;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMore, E> {
                Ok(OneOrMore(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMore, A::Error> {
                let mut list = Vec::new();
                while let Some(one) = seq.next_element::<String>()? {
                    list.push(one);
                }
                Ok(OneOrMore(list))
            }
        }
        // TOML hands a string to `visit_str` whatever was asked; asking for a sequence lets
        // the configuration reference's tracer see the key as a list of strings.
        d.deserialize_seq(Either)
    }
}

/// A configuration file could not be used: `FILE:LINE: KEY: what is wrong` (the line when the
/// key, or the place of a syntax error, is in the file).
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// Where in it, when known.
    pub line: Option<usize>,
    /// What is wrong, starting with the key.
    pub message: String,
}

impl ConfigError {
    /// An error about the file as a whole (it cannot be read).
    pub fn new(file: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }

    /// An error whose message starts with the key it is about (`targets.backup.address: …`),
    /// placed on that key's line of `text`.
    pub fn at(file: &Path, text: &str, message: String) -> ConfigError {
        let key = message.split(": ").next().unwrap_or_default();
        ConfigError {
            file: file.to_path_buf(),
            line: line_of(text, key),
            message,
        }
    }

    /// A TOML syntax or type error, on its own line; a message that names nothing (`duplicate
    /// key`) quotes the line.
    pub fn syntax(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let line = e.span().map(|s| line_at(text, s.start));
        let mut message = e.message().trim_end().to_string();
        let quoted = line.and_then(|l| text.lines().nth(l - 1)).map(str::trim);
        // `[sync]` written for `[[sync]]`: toml says "expected a sequence" for the first and
        // "duplicate key" for a second; say what was meant.
        let table = quoted
            .and_then(|q| q.strip_prefix('['))
            .and_then(|q| q.strip_suffix(']'))
            .filter(|name| !name.starts_with('[') && !name.contains(['.', '"', '\'']));
        let list_meant = message.starts_with("invalid type: map, expected a sequence")
            || message.starts_with("duplicate key");
        if let (Some(name), true) = (table, list_meant) {
            return ConfigError {
                file: file.to_path_buf(),
                line,
                message: format!(
                    "`[{name}]` makes one table; each entry of the list is written \
                     `[[{name}]]` (two brackets, one header per entry)"
                ),
            };
        }
        if let Some(quoted) = quoted.filter(|q| !q.is_empty() && !message.contains(*q)) {
            // A message that quotes a value (an unknown variant) still names the key.
            message = if message.contains('`') {
                format!("{message}, in `{quoted}`")
            } else {
                format!("{message}: `{quoted}`")
            };
        }
        ConfigError {
            file: file.to_path_buf(),
            line,
            message,
        }
    }
}

/// The 1-based line of `text` holding the key that `path` names, in the form configuration
/// errors use: dotted segments, an array element as `name[i]` optionally followed by a
/// description (`sync[2] (photos).targets`). A key that is missing gives the line of the
/// deepest table on its path that exists; `None` if nothing on the path exists or the text
/// does not parse.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    for segment in split(path) {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.split(']').next()?.parse::<usize>().ok()),
            None => (segment.split(' ').next()?, None),
        };
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(key.span().start);
        let value = match (value.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => match items.get(i) {
                Some(item) => {
                    found = Some(item.span().start);
                    item.get_ref()
                }
                None => break,
            },
            (v, _) => v,
        };
        match value {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    found.map(|at| line_at(text, at))
}

/// The 1-based line of byte offset `at`.
pub fn line_at(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `a.b[1] (x.y).c` → `a`, `b[1] (x.y)`, `c`: dots inside a description do not split.
fn split(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in path.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '.' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&path[start..]);
    out
}

/// Parses an optional `value` of `key` as an `address:port` to listen on.
pub fn optional_socket_address(
    key: &str,
    value: Option<&str>,
) -> Result<Option<std::net::SocketAddr>, String> {
    value.map(|v| socket_address(key, v)).transpose()
}

/// Parses `value` of `key` as an `address:port` to listen on.
pub fn socket_address(key: &str, value: &str) -> Result<std::net::SocketAddr, String> {
    value.parse().map_err(|e| {
        format!("{key}: invalid address {value:?}: {e} (expected e.g. \"127.0.0.1:9730\")")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"cert = "cert.pem"

[targets.backup]
address = "10.0.0.2:8730"
fingerprint = "sha256:00"

[[sync]]
source = "/a"

[[sync]]
source = "/b"
targets = ["nope"]
"#;

    #[test]
    fn keys_tables_and_array_elements_are_found() {
        assert_eq!(line_of(TEXT, "cert"), Some(1));
        assert_eq!(line_of(TEXT, "targets.backup.address"), Some(4));
        assert_eq!(line_of(TEXT, "targets.backup.fingerprint"), Some(5));
        assert_eq!(line_of(TEXT, "sync[1] (b).targets"), Some(12));
        assert_eq!(line_of(TEXT, "sync[0] (a.b).source"), Some(8));
        // Missing key: its table's line; missing everything: none.
        assert_eq!(line_of(TEXT, "targets.backup.rsh"), Some(3));
        assert_eq!(line_of(TEXT, "state_dir"), None);
        assert_eq!(line_of("not = [toml", "not"), None);
    }
}
