//! `ferry manual DIR`: the manual pages and shell completions the package installs. Section 1
//! comes from the command-line definitions (clap), section 5 from the configuration references
//! the parsers' tests hold true (`ferry_protocol::config_reference`).

use anyhow::Result;
use ferry_protocol::config_reference::{At, Default, Reference};
use roff::{bold, italic, roman, Inline, Roff};
use std::path::{Path, PathBuf};

/// Writes `DIR/man1/ferry*.1`, `DIR/man5/ferry-{sender,receiver}.toml.5` and
/// `DIR/completions/` for `cli`.
pub fn write(dir: &Path, cli: clap::Command) -> Result<u8> {
    use clap_complete::Shell;
    let write = |path: PathBuf, bytes: &[u8]| -> Result<()> {
        std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
        std::fs::write(&path, bytes)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), ferry_protocol::io_reason(&e)))
    };
    let mut pages = vec![(String::from("ferry"), cli.clone())];
    for sub in cli.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("ferry-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        write(dir.join(format!("man1/{name}.1")), &page)?;
    }
    for reference in [
        ferry_sender::config_reference::reference(),
        ferry_receiver::config_reference::reference(),
    ] {
        let path = dir.join(format!("man5/{}.5", reference.name));
        write(path, page(&reference).as_bytes())?;
    }
    for (shell, file) in [
        (Shell::Bash, "ferry.bash"),
        (Shell::Zsh, "_ferry"),
        (Shell::Fish, "ferry.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cli.clone(), "ferry", &mut out);
        write(dir.join("completions").join(file), &out)?;
    }
    Ok(0)
}

/// A configuration file's manual page (section 5): every key with what it takes, its default,
/// an example and what it does; then whole example files.
pub fn page(r: &Reference) -> String {
    let mut page = Roff::new();
    let title = r.name.to_uppercase();
    let source = format!("ferry {}", env!("CARGO_PKG_VERSION"));
    page.control(
        "TH",
        [title.as_str(), "5", "\"\"", source.as_str(), "File Formats"],
    );
    page.control("SH", ["NAME"]);
    page.text([roman(format!("{} - {}", r.name, r.summary))]);
    page.control("SH", ["SYNOPSIS"]);
    page.text([bold(r.file)]);
    page.control("SH", ["DESCRIPTION"]);
    for (i, paragraph) in r.description.iter().enumerate() {
        if i > 0 {
            page.control("PP", []);
        }
        page.text(code(paragraph));
    }
    for table in &r.tables {
        let heading = match table.at {
            At::Root => "TOP-LEVEL KEYS".to_string(),
            at => at.heading(),
        };
        page.control("SH", [heading.as_str()]);
        page.text(code(table.text));
        for key in &table.keys {
            page.control("TP", []);
            page.text([bold(key.name), roman(" = "), italic(key.takes)]);
            page.text(code(key.text));
            let default = match key.default {
                Default::Required => roman("required"),
                Default::Absent(what) => roman(what),
                Default::Value(value) => bold(value),
            };
            page.text([roff::line_break(), italic("Default: "), default]);
            let example = format!("{} = {}", key.name, key.example);
            page.text([roff::line_break(), italic("Example: "), bold(example)]);
        }
    }
    page.control("SH", ["EXAMPLES"]);
    for example in r.examples {
        page.control("PP", []);
        page.text([roman(format!(
            "{}{}:",
            &example.title[..1].to_uppercase(),
            &example.title[1..]
        ))]);
        page.control("PP", []);
        page.control("RS", ["4"]);
        page.control("nf", []);
        page.text([roman(example.text.trim_end())]);
        page.control("fi", []);
        page.control("RE", []);
    }
    page.control("SH", ["SEE ALSO"]);
    page.text([roman(r.see_also.join(", "))]);
    page.render()
}

/// Text with `code` spans set in bold.
fn code(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(i, part)| if i % 2 == 1 { bold(part) } else { roman(part) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_page_has_every_key_its_defaults_and_examples() {
        let reference = ferry_sender::config_reference::reference();
        let text = page(&reference);
        assert!(
            text.contains("\n.TH FERRY-SENDER.TOML 5 \"\" \"ferry "),
            "{text}"
        );
        for table in &reference.tables {
            for key in &table.keys {
                assert!(
                    text.contains(&format!("\\fB{}\\fR = ", key.name)),
                    "{}",
                    key.name
                );
            }
        }
        assert!(text.contains(".SH [[sync]]\n"), "{text}");
        assert!(text.contains(".SH \"TOP-LEVEL KEYS\"\n"), "{text}");
        assert!(
            text.contains("\\fIDefault: \\fR\\fB100\\fR"),
            "settle_ms's default: {text}"
        );
        // An example file keeps its lines; none can start a control line.
        assert!(
            text.contains(".nf\ncert = \"cert.pem\"\nkey = \"key.pem\"\n"),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with(".[") || l.starts_with("'")),
            "{text}"
        );
        assert_eq!(code("a `b` c"), [roman("a "), bold("b"), roman(" c")]);
    }
}
