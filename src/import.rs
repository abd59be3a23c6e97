//! `ferry import`: the old set-up's files into ferry configuration (printed, or written with
//! `-o`).

use crate::Import;
use anyhow::{Context, Result};
use std::path::Path;

/// `ferry import rsyncd|scripts`.
pub fn import(what: Import) -> Result<u8> {
    use ferry_import as import;
    let read = |f: &Path| std::fs::read_to_string(f).with_context(|| format!("{}", f.display()));
    let (text, output) = match what {
        Import::Rsyncd {
            file,
            listen,
            clients,
            output,
        } => {
            let opts = import::ReceiverOptions { listen, clients };
            (import::rsyncd_conf(&read(&file)?, &file, &opts)?, output)
        }
        Import::Scripts {
            files,
            port,
            rsh,
            output,
        } => {
            let inputs = files
                .iter()
                .map(|f| Ok((f.clone(), read(f)?)))
                .collect::<Result<Vec<_>>>()?;
            let opts = import::SenderOptions { port, rsh };
            (import::scripts(&inputs, &opts)?, output)
        }
    };
    match output {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
            errln!("ferry: wrote {}; review it before use", path.display());
        }
        None => out!("{text}"),
    }
    Ok(0)
}
