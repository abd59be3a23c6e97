//! The module history's side of applying changes: what a change supersedes is kept (see
//! [`crate::history`]) by these, called from `Apply`'s `install`, `mkdir`, `delete`, `rename`
//! and `set_meta` only, and journaled at the group commit (`Apply::commit_durable`).

use crate::apply::Apply;
use crate::history::{Action, How};
use ferry_protocol::meta::{Kind, Meta};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::RelPath;
use std::io;
use std::path::Path;

impl Apply {
    /// Notes in the history (if the module keeps one) that `path` (module path `rel`) just came
    /// into being, as `meta` if the caller has it at hand (else read from `path`).
    pub(crate) fn note_created(
        &mut self,
        path: &Path,
        rel: &RelPath,
        meta: Option<Meta>,
    ) -> io::Result<()> {
        let Some(history) = &self.state.history else {
            return Ok(());
        };
        let note = match meta {
            Some(meta) => Ok(Some(history.created(rel, meta))),
            None => history.note(path, rel, Action::Created, Namespaces::NONE, None),
        };
        if let Some(row) = note.map_err(|e| io::Error::new(e.kind(), format!("history: {e}")))? {
            self.kept.push(row);
        }
        Ok(())
    }

    /// Keeps what is at `path` (module path `rel`) in the module's history before `action`
    /// changes it; true if something was kept. Without history, nothing.
    pub(crate) fn keep(
        &mut self,
        path: &Path,
        rel: &RelPath,
        action: Action,
        how: How,
    ) -> io::Result<bool> {
        let Some(history) = &self.state.history else {
            return Ok(false);
        };
        let kept = history
            .keep_entry(path, rel, action, how)
            .map_err(|e| io::Error::new(e.kind(), format!("history: {e}")))?;
        Ok(match kept {
            Some(p) => {
                self.kept.push(p);
                true
            }
            None => false,
        })
    }

    /// Undoes the last [`Apply::keep`] (the change it was for failed): a moved entry goes back
    /// to `path`, a link is dropped.
    pub(crate) fn unkeep(&mut self, path: &Path) {
        if let (Some(history), Some(p)) = (&self.state.history, self.kept.pop()) {
            history.undo(p, path);
        }
    }

    /// Notes (with history, once per commit) the state of the directory `rel` is in, before a
    /// change of `rel` moves its times: [`Apply::keep_dir_times`] journals it at the commit if
    /// they did move. So a directory's times at any moment can be brought back: the sender's
    /// later `SetMeta` of them is not journaled, and what it replaces is the receiver's own
    /// time of the change, not the state before.
    pub(crate) fn note_parent(&mut self, rel: &RelPath) {
        let (Some(history), Some(parent)) = (&self.state.history, rel.parent()) else {
            return;
        };
        if self.dirs_before.contains_key(&parent) {
            return;
        }
        let Ok(at) = self.local(&parent) else {
            return;
        };
        let noted = history.note(
            &at.path(),
            &parent,
            Action::Metadata,
            self.keeps.xattrs,
            None,
        );
        if let Ok(Some(p)) = noted {
            if p.meta().kind == Kind::Dir {
                self.dirs_before.insert(parent, p);
            }
        }
    }

    /// Journals, at the commit, the noted states of directories whose times moved.
    pub(crate) fn keep_dir_times(&mut self) {
        use std::os::unix::fs::MetadataExt;
        for (dir, before) in std::mem::take(&mut self.dirs_before) {
            // One made in this commit had no earlier state: its `created` row undoes it.
            if self.kept.iter().any(|p| p.creates(&dir)) {
                continue;
            }
            let Ok(at) = self.local(&dir) else { continue };
            let Ok(md) = std::fs::symlink_metadata(at.path()) else {
                continue;
            };
            let was = before.meta();
            if md.is_dir()
                && (md.mtime(), md.mtime_nsec()) != (was.mtime, i64::from(was.mtime_nsec))
            {
                self.kept.push(before);
            }
        }
    }

    /// Notes the metadata of `path` in the history before `meta` replaces it, if it differs
    /// in what the module keeps (a directory's times alone are kept by
    /// [`Apply::note_parent`], before its entries' changes move them).
    pub(crate) fn keep_meta(&mut self, path: &Path, rel: &RelPath, meta: &Meta) -> io::Result<()> {
        let Some(history) = &self.state.history else {
            return Ok(());
        };
        let Some(old) = history.note(path, rel, Action::Metadata, self.keeps.xattrs, None)? else {
            return Ok(());
        };
        let mut want = meta.clone();
        want.mode = self.mode_for(meta);
        let cmp = ferry_protocol::meta::Compare {
            owner: self.owner_for(meta).is_some(),
            setid: self.keeps.setid,
            xattrs: self.keeps.xattrs,
            hardlinks: false,
        };
        let differs = old
            .meta()
            .attr_differences(&want, cmp)
            .into_iter()
            .any(|d| !(meta.kind == Kind::Dir && d == ferry_protocol::meta::Difference::Mtime));
        if differs {
            self.kept.push(old);
        }
        Ok(())
    }
}
