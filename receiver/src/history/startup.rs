//! The start-up check of a history, by the one process about to write it: objects without
//! rows adopted, rows without objects dropped, the next object id past both.

use super::{connect, db_err, forget_cached, kind_name, History};
use rusqlite::{params, OptionalExtension};
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

impl History {
    /// The start-up check, by the one process about to write the history: objects without
    /// rows (a crash before their commit) are adopted, rows without objects dropped, and the
    /// next object's id follows the largest of both.
    /// A shared history's journal is opened again first, as it is now on the filesystem.
    pub fn recover(&self, module: &str) -> Result<(), String> {
        let why =
            |what: String| format!("module {module:?}: history {}: {what}", self.dir.display());
        if self.shared {
            forget_cached(&self.dir);
            *self.db.lock().expect("journal lock") =
                connect(&self.dir, true).map_err(|e| why(format!("journal: {e}")))?;
        }
        let (adopted, dropped) = self
            .check()
            .map_err(|e| why(ferry_protocol::io_reason(&e)))?;
        if adopted > 0 || dropped > 0 {
            tracing::warn!(
                module,
                adopted,
                dropped,
                "history: {adopted} kept states had no journal row (a crash before their \
                 commit) and were adopted as .unjournaled/ID; {dropped} rows named objects \
                 that are gone and were dropped"
            );
        }
        Ok(())
    }

    /// The start-up check: objects without rows are adopted, rows without objects dropped;
    /// the next id follows the largest of both. Returns (adopted, dropped).
    fn check(&self) -> io::Result<(u64, u64)> {
        let mut on_disk: BTreeSet<i64> = BTreeSet::new();
        for e in fs::read_dir(format!("/proc/self/fd/{}", self.objects.as_raw_fd()))? {
            let e = e?;
            match e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) {
                Some(id) => {
                    on_disk.insert(id);
                }
                None => tracing::warn!(
                    history = %self.dir.display(),
                    name = ?e.file_name(),
                    "history: a stray entry in objects/ (left alone)"
                ),
            }
        }
        let mut db = self.db.lock().expect("journal lock");
        let journaled: BTreeSet<i64> = {
            let mut q = db
                .prepare("SELECT id FROM versions WHERE object = 1")
                .map_err(db_err)?;
            let ids = q.query_map([], |r| r.get(0)).map_err(db_err)?;
            ids.collect::<Result<_, _>>().map_err(db_err)?
        };
        let max_row: Option<i64> = db
            .query_row("SELECT max(id) FROM versions", [], |r| r.get(0))
            .optional()
            .map_err(db_err)?
            .flatten();
        let tx = db.transaction().map_err(db_err)?;
        let mut adopted = 0;
        for &id in on_disk.difference(&journaled) {
            let md = fs::symlink_metadata(self.object_path(id))?;
            let meta = ferry_protocol::local::meta_of(&md);
            let kind = meta.as_ref().map_or("file", |m| kind_name(m.kind));
            let json = meta.map(|m| serde_json::to_string(&m).unwrap_or_default());
            tx.execute(
                "INSERT OR REPLACE INTO versions (id, path, time_ns, action, kind, size, blocks, \
                 object, meta) VALUES (?1, ?2, ?3, 'unjournaled', ?4, ?5, ?6, 1, ?7)",
                params![
                    id,
                    format!(".unjournaled/{id}").into_bytes(),
                    md.ctime() * 1_000_000_000 + md.ctime_nsec(),
                    kind,
                    md.len() as i64,
                    (md.blocks() * 512) as i64,
                    json.unwrap_or_default(),
                ],
            )
            .map_err(db_err)?;
            adopted += 1;
        }
        let mut dropped = 0;
        for &id in journaled.difference(&on_disk) {
            tx.execute("DELETE FROM versions WHERE id = ?1", [id])
                .map_err(db_err)?;
            dropped += 1;
        }
        if dropped > 0 {
            // A row without its object (a prune cut short, an object removed by hand) is a
            // version gone: the history no longer reaches back to its start.
            tx.execute("UPDATE reach SET pruned = 1 WHERE id = 1", [])
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        drop(db);
        self.flush_log()?;
        let next = max_row
            .into_iter()
            .chain(on_disk.last().copied())
            .max()
            .unwrap_or(0)
            + 1;
        self.next_id.store(next as u64, Ordering::Relaxed);
        Ok((adopted, dropped))
    }
}
