//! Exclude patterns, with rsync's meaning:
//! - `*.log`: a pattern without `/` matches the name at any depth;
//! - `tmp/`: a trailing `/` matches directories only;
//! - `/cache` or `a/b/*.tmp`: a pattern with `/` inside is anchored at the source root;
//! - `*` and `?` never cross `/`; `**` does.
//!
//! An excluded directory excludes its whole subtree. Excluded paths on the receiver are left
//! alone (not deleted), as with rsync without `--delete-excluded`.

use ferry_protocol::RelPath;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled set of exclude patterns.
#[derive(Debug, Clone)]
pub struct Filter {
    patterns: Vec<String>,
    name_any: GlobSet,
    name_dir: GlobSet,
    path_any: GlobSet,
    path_dir: GlobSet,
}

/// An exclude pattern is malformed.
#[derive(Debug, thiserror::Error)]
#[error("invalid exclude pattern {pattern:?}: {message}")]
pub struct FilterError {
    /// The pattern.
    pub pattern: String,
    /// Why.
    pub message: String,
}

/// Two filters are equal when they were compiled from the same patterns.
impl PartialEq for Filter {
    fn eq(&self, other: &Filter) -> bool {
        self.patterns == other.patterns
    }
}

impl Filter {
    /// Compiles `patterns`.
    pub fn new(patterns: &[String]) -> Result<Filter, FilterError> {
        let mut sets = [
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
        ];
        for p in patterns {
            let err = |message: String| FilterError {
                pattern: p.clone(),
                message,
            };
            let (body, dir_only) = match p.strip_suffix('/') {
                Some(b) => (b, true),
                None => (p.as_str(), false),
            };
            if body.is_empty() {
                return Err(err("empty pattern".into()));
            }
            let anchored = body.contains('/');
            let body = body.strip_prefix('/').unwrap_or(body);
            let glob = GlobBuilder::new(body)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| err(e.kind().to_string()))?;
            let idx = match (anchored, dir_only) {
                (false, false) => 0,
                (false, true) => 1,
                (true, false) => 2,
                (true, true) => 3,
            };
            sets[idx].add(glob);
        }
        let [a, b, c, d] = sets.map(|s| s.build().expect("globs already validated"));
        Ok(Filter {
            patterns: patterns.to_vec(),
            name_any: a,
            name_dir: b,
            path_any: c,
            path_dir: d,
        })
    }

    /// No exclusions.
    pub fn empty() -> Filter {
        Filter::new(&[]).expect("empty filter")
    }

    /// The patterns as configured.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True if `path` (relative to the source root) is excluded. Only the path itself is
    /// tested; callers walking a tree skip excluded directories' subtrees.
    pub fn excludes(&self, path: &RelPath, is_dir: bool) -> bool {
        if path.is_root() {
            return false;
        }
        let full = path.as_path();
        let name = RelPath::from_bytes(path.file_name().to_vec());
        let name = name.as_path();
        self.name_any.is_match(name)
            || self.path_any.is_match(full)
            || (is_dir && (self.name_dir.is_match(name) || self.path_dir.is_match(full)))
    }

    /// True if `path` or any of its ancestors is excluded (for paths from events, whose
    /// ancestors were not walked).
    pub fn excludes_with_ancestors(&self, path: &RelPath, is_dir: bool) -> bool {
        let mut p = RelPath::root();
        let parts: Vec<&[u8]> = path.components().collect();
        for (i, part) in parts.iter().enumerate() {
            p = p.join(part);
            let last = i + 1 == parts.len();
            if self.excludes(&p, if last { is_dir } else { true }) {
                return true;
            }
        }
        false
    }

    /// The rule for a dirty path on its way to a receiver (from an event, a retry, a rename):
    /// excluded if it or an ancestor is. `is_dir` is `None` when the path is gone and its
    /// kind unknown; then it counts as excluded if it would be as a file *or* as a directory,
    /// so a deletion never reaches what the receiver keeps as excluded.
    pub fn excludes_dirty(&self, path: &RelPath, is_dir: Option<bool>) -> bool {
        match is_dir {
            Some(d) => self.excludes_with_ancestors(path, d),
            None => {
                self.excludes_with_ancestors(path, false)
                    || self.excludes_with_ancestors(path, true)
            }
        }
    }

    /// The filter as a tree-walk predicate: true means "take part".
    pub fn accepts(&self, path: &RelPath, is_dir: bool) -> bool {
        !self.excludes(path, is_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_like_semantics_table() {
        let f = Filter::new(&[
            "tmp/".into(),
            "*.log".into(),
            "/cache".into(),
            "a/b/*.tmp".into(),
        ])
        .unwrap();
        let cases: &[(&str, bool, bool)] = &[
            ("tmp", true, true),
            ("tmp", false, false),
            ("x/tmp", true, true),
            ("app.log", false, true),
            ("deep/dir/app.log", false, true),
            ("app.log.1", false, false),
            ("cache", true, true),
            ("x/cache", true, false),
            ("a/b/c.tmp", false, true),
            ("a/b/c/d.tmp", false, false),
            ("z/a/b/c.tmp", false, false),
            ("keep.txt", false, false),
        ];
        for (p, is_dir, want) in cases {
            assert_eq!(
                f.excludes(&RelPath::from(*p), *is_dir),
                *want,
                "{p} dir={is_dir}"
            );
        }
        assert!(f.excludes_with_ancestors(&RelPath::from("x/tmp/inner/file"), false));
        assert!(!f.excludes_with_ancestors(&RelPath::from("x/tmpdir/file"), false));
    }

    #[test]
    fn old_script_style_pattern_list() {
        // The old scripts' `tmp|.log` became these two patterns in migration.
        let f = Filter::new(&["tmp".into(), "*.log".into()]).unwrap();
        assert!(f.excludes(&RelPath::from("tmp"), true));
        assert!(f.excludes(&RelPath::from("tmp"), false));
        assert!(f.excludes(&RelPath::from("d/x.log"), false));
    }

    #[test]
    fn a_dirty_path_of_unknown_kind_is_excluded_if_either_kind_would_be() {
        let f = Filter::new(&["cache/".into(), "*.log".into()]).unwrap();
        let p = RelPath::from;
        assert!(f.excludes_dirty(&p("cache"), Some(true)));
        assert!(!f.excludes_dirty(&p("cache"), Some(false)));
        assert!(
            f.excludes_dirty(&p("cache"), None),
            "gone: maybe the excluded directory"
        );
        assert!(f.excludes_dirty(&p("x/cache/y"), Some(false)));
        assert!(f.excludes_dirty(&p("a.log"), None));
        assert!(!f.excludes_dirty(&p("a.txt"), None));
    }
}
