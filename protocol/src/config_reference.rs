//! The reference of a configuration file: every key, what it takes, its default, an example
//! and what it does. One source for the manual pages (`ferry-sender.toml(5)`,
//! `ferry-receiver.toml(5)`, written by `ferry manual`) and for the tests that hold it to the
//! parser ([`Reference::disagreements`]): every key the parser accepts is described and no
//! other, every example parses, every stated default parses to what leaving the key out gives,
//! and a key said to be required is.

use std::collections::BTreeSet;

/// One configuration file's reference.
pub struct Reference {
    /// The page's name, `ferry-sender.toml`.
    pub name: &'static str,
    /// What the file is, for the NAME line.
    pub summary: &'static str,
    /// Where it usually lives.
    pub file: &'static str,
    /// Paragraphs before the keys.
    pub description: &'static [&'static str],
    /// Its tables, the top level first.
    pub tables: Vec<Table>,
    /// Whole files, each of which the parser accepts.
    pub examples: &'static [Example],
    /// Other pages, `ferry-send(1)`.
    pub see_also: &'static [&'static str],
}

/// A whole example file.
pub struct Example {
    /// What it shows.
    pub title: &'static str,
    /// The file.
    pub text: &'static str,
}

/// Where a table is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum At {
    /// The top level.
    Root,
    /// `[NAME.KEY]`: a table of named tables under a top-level key.
    Map(&'static str),
    /// `[[NAME]]`: an array of tables under a top-level key.
    List(&'static str),
}

impl At {
    /// The heading it has in a file: `[targets.NAME]`, `[[sync]]`.
    pub fn heading(self) -> String {
        match self {
            At::Root => "top level".into(),
            At::Map(name) => format!("[{name}.NAME]"),
            At::List(name) => format!("[[{name}]]"),
        }
    }
}

/// One table's keys.
pub struct Table {
    /// Where it is.
    pub at: At,
    /// What one such table is.
    pub text: &'static str,
    /// Its keys, in the order a reader needs them.
    pub keys: Vec<Key>,
}

/// One key.
pub struct Key {
    /// Its name.
    pub name: &'static str,
    /// What it takes: `path`, `"auto" | "fanotify" | "inotify"`, `list of strings`.
    pub takes: &'static str,
    /// Its default.
    pub default: Default,
    /// A value, as written in TOML.
    pub example: &'static str,
    /// What it does.
    pub text: &'static str,
}

/// What a key left out means.
pub enum Default {
    /// It may not be left out.
    Required,
    /// Leaving it out means this (no value of the key means the same).
    Absent(&'static str),
    /// Leaving it out is the same as this value, as written in TOML.
    Value(&'static str),
}

/// A key: `key(name, takes, default, example, text)`.
pub fn key(
    name: &'static str,
    takes: &'static str,
    default: Default,
    example: &'static str,
    text: &'static str,
) -> Key {
    Key {
        name,
        takes,
        default,
        example,
        text,
    }
}

/// The keys one table's parser accepts, to hold a reference against.
pub struct Accepted {
    /// The table.
    pub at: At,
    /// The field names of its raw struct.
    pub fields: Vec<String>,
}

impl Reference {
    /// Everything the reference says that the parser does not bear out, one line each; empty
    /// when they agree. `accepted` lists each table's fields; `parse` reads a whole file and
    /// returns what it validated to, as `Debug` text, or the error.
    pub fn disagreements(
        &self,
        accepted: &[Accepted],
        parse: &dyn Fn(&str) -> Result<String, String>,
    ) -> Vec<String> {
        let mut wrong = Vec::new();
        self.check_keys(accepted, &mut wrong);
        let mut files = Vec::new();
        for example in self.examples {
            match toml::from_str::<toml::Table>(example.text)
                .map_err(|e| e.to_string())
                .and_then(|t| parse(example.text).map(|debug| (t, debug)))
            {
                Ok(file) => files.push(file),
                Err(e) => wrong.push(format!("example {:?} does not parse: {e}", example.title)),
            }
        }
        for table in &self.tables {
            for key in &table.keys {
                let problem = check_key(table.at, key, &files, parse);
                wrong.extend(problem.map(|p| format!("{} {}: {p}", table.at.heading(), key.name)));
            }
        }
        wrong
    }

    /// Each table describes exactly the fields its parser accepts (a sub-table counts as a
    /// key of the top level).
    fn check_keys(&self, accepted: &[Accepted], wrong: &mut Vec<String>) {
        for a in accepted {
            let Some(table) = self.tables.iter().find(|t| t.at == a.at) else {
                wrong.push(format!("{}: no table in the reference", a.at.heading()));
                continue;
            };
            let mut described: BTreeSet<&str> = table.keys.iter().map(|k| k.name).collect();
            if a.at == At::Root {
                described.extend(self.tables.iter().filter_map(|t| match t.at {
                    At::Root => None,
                    At::Map(name) | At::List(name) => Some(name),
                }));
            }
            let parsed: BTreeSet<&str> = a.fields.iter().map(String::as_str).collect();
            for missing in parsed.difference(&described) {
                wrong.push(format!(
                    "{} {missing}: accepted by the parser, missing from the reference",
                    a.at.heading()
                ));
            }
            for extra in described.difference(&parsed) {
                wrong.push(format!(
                    "{} {extra}: in the reference, not accepted by the parser",
                    a.at.heading()
                ));
            }
        }
        for t in &self.tables {
            if !accepted.iter().any(|a| a.at == t.at) {
                wrong.push(format!(
                    "{}: no parser fields to check it by",
                    t.at.heading()
                ));
            }
        }
    }
}

#[cfg(feature = "check")]
impl Reference {
    /// Panics with every disagreement between the reference and a parser: `T` is the file's
    /// raw struct, traced (after whatever `tracer` traced already, its enums) for the fields of
    /// the raw struct each table is read into (`structs`, by container name).
    pub fn assert_holds<'de, T: serde::Deserialize<'de>>(
        &self,
        mut tracer: serde_reflection::Tracer,
        structs: &[(At, &str)],
        parse: &dyn Fn(&str) -> Result<String, String>,
    ) {
        use serde_reflection::ContainerFormat;
        tracer.trace_simple_type::<T>().expect("traced");
        let registry = tracer.registry().expect("every enum traced");
        let accepted: Vec<Accepted> = structs
            .iter()
            .map(|&(at, name)| match &registry[name] {
                ContainerFormat::Struct(fields) => Accepted {
                    at,
                    fields: fields.iter().map(|f| f.name.clone()).collect(),
                },
                other => panic!("{name}: not a struct: {other:?}"),
            })
            .collect();
        assert!(
            accepted.iter().all(|a| !a.fields.is_empty()),
            "traced the structs"
        );
        let wrong = self.disagreements(&accepted, parse);
        assert!(
            wrong.is_empty(),
            "{}(5) disagrees with the parser:\n{}",
            self.name,
            wrong.join("\n")
        );
    }
}

/// An example file: its table, and what it parses to.
type File = (toml::Table, String);

/// What is wrong with one key's example, default or requiredness, if anything. Each claim
/// needs a table of the examples to bear it out: setting the example there parses; setting
/// the default where the key is out parses to the same as leaving it out (at least once, and
/// never to anything else); removing a required key fails wherever it is set.
fn check_key(
    at: At,
    key: &Key,
    files: &[File],
    parse: &dyn Fn(&str) -> Result<String, String>,
) -> Option<String> {
    let value = |text: &str| {
        toml::from_str::<toml::Table>(&format!("v = {text}"))
            .map(|mut t| t.remove("v").expect("the key just written"))
            .map_err(|e| format!("{text} is not TOML: {e}"))
    };
    let example = match value(key.example) {
        Ok(v) => v,
        Err(e) => return Some(format!("example {e}")),
    };
    // Each table of the examples, edited by `edit` (None: `edit` left it alone), parsed.
    let edited = |file: &toml::Table, i: usize, edit: &dyn Fn(&mut toml::Table) -> bool| {
        let mut copy = file.clone();
        let table = instance(&mut copy, at, i).expect("counted");
        edit(table).then(|| parse(&toml::to_string(&copy).expect("a table prints")))
    };
    let tables = || {
        files
            .iter()
            .flat_map(|(file, debug)| (0..instances(file, at)).map(move |i| (file, i, debug)))
    };
    let mut accepting = Vec::new();
    let mut refusal = None;
    for (file, i, debug) in tables() {
        let set = edited(file, i, &|t| {
            t.insert(key.name.into(), example.clone());
            true
        });
        match set.expect("always edited") {
            Ok(_) => accepting.push((file, i, debug)),
            Err(e) => refusal = refusal.or(Some(e)),
        }
    }
    if accepting.is_empty() {
        return Some(format!(
            "no example table accepts {} = {} ({})",
            key.name,
            key.example,
            refusal
                .as_deref()
                .unwrap_or("no such table in the examples")
        ));
    }
    match key.default {
        Default::Required => {
            let mut set_somewhere = false;
            for (file, i, _) in tables() {
                match edited(file, i, &|t| t.remove(key.name).is_some()) {
                    None => {}
                    Some(Ok(_)) => {
                        return Some("said to be required, but an example parses without it".into())
                    }
                    Some(Err(_)) => set_somewhere = true,
                }
            }
            if !set_somewhere {
                return Some("said to be required, but no example sets it".into());
            }
        }
        Default::Value(text) => {
            let default = match value(text) {
                Ok(v) => v,
                Err(e) => return Some(format!("default {e}")),
            };
            // Where the key is out and its default parses (an rsync-only key's default does
            // not on a ferry target), the default must change nothing.
            let mut checked = false;
            for (file, i, debug) in tables() {
                let set = edited(file, i, &|t| {
                    !t.contains_key(key.name)
                        && t.insert(key.name.into(), default.clone()).is_none()
                });
                match set {
                    Some(Ok(d)) if d == *debug => checked = true,
                    Some(Ok(_)) => {
                        return Some(format!("default {text} is not what leaving it out gives"))
                    }
                    None | Some(Err(_)) => {}
                }
            }
            if !checked {
                return Some(format!(
                    "no example leaves it out to check the default {text}"
                ));
            }
        }
        Default::Absent(_) => {}
    }
    None
}

/// How many tables at `at` a file has.
fn instances(file: &toml::Table, at: At) -> usize {
    match at {
        At::Root => 1,
        At::Map(name) => file
            .get(name)
            .and_then(|v| v.as_table())
            .map_or(0, |t| t.len()),
        At::List(name) => file
            .get(name)
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len()),
    }
}

/// The `i`-th table at `at`.
fn instance(file: &mut toml::Table, at: At, i: usize) -> Option<&mut toml::Table> {
    match at {
        At::Root => Some(file),
        At::Map(name) => file
            .get_mut(name)?
            .as_table_mut()?
            .iter_mut()
            .nth(i)?
            .1
            .as_table_mut(),
        At::List(name) => file
            .get_mut(name)?
            .as_array_mut()?
            .get_mut(i)?
            .as_table_mut(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy parser: `a` required (an integer), `b` defaults to 2, `c` optional; `[[t]]`
    /// with `x`.
    fn parse(text: &str) -> Result<String, String> {
        let t: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let a = t
            .get("a")
            .and_then(|v| v.as_integer())
            .ok_or("a: required")?;
        let b = t
            .get("b")
            .map_or(Some(2), |v| v.as_integer())
            .ok_or("b: a number")?;
        let unknown = t
            .keys()
            .find(|k| !["a", "b", "c", "t"].contains(&k.as_str()));
        if let Some(k) = unknown {
            return Err(format!("{k}: unknown"));
        }
        Ok(format!("a={a} b={b} c={:?} t={:?}", t.get("c"), t.get("t")))
    }

    fn reference(b_default: &'static str, a_default: Default) -> Reference {
        Reference {
            name: "toy.toml",
            summary: "a toy",
            file: "/toy.toml",
            description: &[],
            tables: vec![
                Table {
                    at: At::Root,
                    text: "",
                    keys: vec![
                        key("a", "integer", a_default, "1", ""),
                        key("b", "integer", Default::Value(b_default), "3", ""),
                        key("c", "string", Default::Absent("none"), "\"c\"", ""),
                    ],
                },
                Table {
                    at: At::List("t"),
                    text: "",
                    keys: vec![key("x", "integer", Default::Absent("none"), "1", "")],
                },
            ],
            examples: &[Example {
                title: "one",
                text: "a = 1\n[[t]]\nx = 1\n",
            }],
            see_also: &[],
        }
    }

    fn accepted(root: &[&str]) -> Vec<Accepted> {
        vec![
            Accepted {
                at: At::Root,
                fields: root.iter().map(|s| s.to_string()).collect(),
            },
            Accepted {
                at: At::List("t"),
                fields: vec!["x".into()],
            },
        ]
    }

    #[test]
    fn a_true_reference_has_no_disagreements() {
        let r = reference("2", Default::Required);
        assert_eq!(
            r.disagreements(&accepted(&["a", "b", "c", "t"]), &parse),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_key_missing_or_extra_a_wrong_default_or_requiredness_is_named() {
        let r = reference("2", Default::Required);
        let wrong = r.disagreements(&accepted(&["a", "b", "c", "t", "d"]), &parse);
        assert_eq!(
            wrong,
            ["top level d: accepted by the parser, missing from the reference"]
        );
        let wrong = r.disagreements(&accepted(&["a", "b", "t"]), &parse);
        assert_eq!(
            wrong,
            ["top level c: in the reference, not accepted by the parser"]
        );
        let r = reference("5", Default::Required);
        let wrong = r.disagreements(&accepted(&["a", "b", "c", "t"]), &parse);
        assert_eq!(
            wrong,
            ["top level b: default 5 is not what leaving it out gives"]
        );
        let mut r = reference("2", Default::Required);
        r.tables[0].keys[2].name = "c";
        r.tables[0].keys[2].default = Default::Required;
        let wrong = r.disagreements(&accepted(&["a", "b", "c", "t"]), &parse);
        assert_eq!(
            wrong,
            ["top level c: said to be required, but no example sets it"]
        );
        let mut r = reference("2", Default::Required);
        r.tables[0].keys[0].example = "\"one\"";
        let wrong = r.disagreements(&accepted(&["a", "b", "c", "t"]), &parse);
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        assert!(
            wrong[0].starts_with("top level a: no example table accepts a = \"one\""),
            "{wrong:?}"
        );
    }
}
