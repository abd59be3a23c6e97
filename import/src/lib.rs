//! `ferry import`: turns the old set-up's files into ferry configuration text.
//!
//! - An rsyncd.conf becomes a receiver.toml: modules with `path`, `read only`, `hosts allow`,
//!   `max connections` and `comment` (global values are module defaults, as in rsyncd).
//!   `auth users` and `secrets file` become a comment: ferry authenticates senders by their
//!   certificate fingerprint (`clients`).
//! - The old scripts' settings become a sender.toml with rsync targets, so the source host can
//!   switch first and the backup host later:
//!   - `file_watch.conf` (`DEST_HOST`, `SRC_DIR_n`, `DEST_DIR_n`, `USER_n`; rsync over ssh),
//!   - inotify.sh / sersync.sh (`rsync_module_name=([file]='/file' …)`, `exclude_file_rule`,
//!     `des_ip=(…)`, `user`, `rsync_passwd_file`; rsync to an rsyncd).
//!
//! Errors name the file and line. The output is TOML text with comments, for review; it is
//! parsed with the real `ferry_receiver`/`ferry_sender` parsers before it is returned.
//!
//! # Layout
//! - [`rsyncd`]: rsyncd.conf into receiver.toml.
//! - [`scripts`]: the old scripts' settings into sender.toml.
#![warn(missing_docs)]

pub mod rsyncd;
pub mod scripts;

pub use rsyncd::{rsyncd_conf, ReceiverOptions};
pub use scripts::{scripts, SenderOptions};

use std::path::{Path, PathBuf};

/// An input file could not be converted.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ImportError {
    /// The input file.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn error(file: &Path, line: usize, message: impl Into<String>) -> ImportError {
    ImportError {
        file: file.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Parses what an importer wrote with the real configuration parser, so an import never hands
/// the operator a file that `ferry` would refuse.
pub(crate) fn checked<E: std::fmt::Display>(
    text: String,
    input: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<(), E>,
) -> Result<String, ImportError> {
    parse(&text, Path::new("(imported configuration)")).map_err(|e| {
        error(
            input,
            0,
            format!("the configuration made from this file does not parse: {e}"),
        )
    })?;
    Ok(text)
}

pub(crate) fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
