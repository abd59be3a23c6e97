//! The backup host's side of a restore session: the module as it was at the time the client
//! asked for, sent with the sender's own planning and transfer code to a client that answers
//! as a receiver does for its destination. The roles turn round after the client's
//! [`Message::Restore`]; nothing here writes to the module or its history.
//!
//! The client lists its destination in answer to our `List`; the plan is the sender's
//! [`plan`] of the view against that listing (deletions only if the client asked, and the
//! client refuses them otherwise); every file is read beneath the held module root or the
//! held history objects directory ([`Origin::Mapped`]), and goes whole or as a delta against
//! what the destination holds.

use super::RestoreError;
use crate::config::Module;
use crate::history::view::{Source, View};
use crate::history::OBJECTS;
use ferry_protocol::connection::{
    ConnError, FrameReader, FrameWriter, HANDSHAKE_TIMEOUT, HEARTBEAT,
};
use ferry_protocol::local;
use ferry_protocol::message::{Keeps, Message};
use ferry_protocol::meta::{Compare, Entry};
use ferry_protocol::xattr::Namespaces;
use ferry_protocol::{io_reason, RelPath};
use ferry_sender::config::Preserve;
use ferry_sender::descend::{Pieces, FIRST_PIECE, PIECE};
use ferry_sender::execute::{execute, Execution, Report, Step, Totals};
use ferry_sender::links::LinkNames;
use ferry_sender::plan::{order_dir_meta, plan, Base, Op, Plan, PlanOptions};
use ferry_sender::session::Session;
use ferry_sender::transfer::{as_then, Located, Origin};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// What the client asked for.
struct Asked {
    at: Option<i64>,
    paths: Vec<RelPath>,
    delete: bool,
    keeps: Keeps,
    dry_run: bool,
}

/// Steps per `Planned` frame.
const PLANNED_BATCH: usize = 2_000;

/// Serves one restore session of `module` after its `Welcome`: reads the client's `Restore`,
/// refuses it with the reason (a time before the history, a path not there then) or sends
/// the tree. `peer` names the client in logs (its address, or `ferry restore` on the backup
/// host, which serves itself over an in-process pipe).
pub async fn serve<R, W>(
    module: &Module,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    peer: &str,
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.expect())
        .await
        .map_err(|_| ConnError::Timeout("waiting for Restore"))??;
    let asked = match first {
        Message::Restore {
            at,
            paths,
            delete,
            keeps,
            dry_run,
        } => Asked {
            at,
            paths,
            delete,
            keeps,
            dry_run,
        },
        other => {
            let reason = format!("expected Restore, got {}", other.name());
            return refuse(&mut writer, reason).await;
        }
    };
    if let Some(bad) = asked.paths.iter().find(|p| p.validate().is_err()) {
        return refuse(&mut writer, format!("{bad:?}: not a module path")).await;
    }
    let history = module.history.as_ref().map(|h| h.dir.clone());
    if asked.at.is_some() && history.is_none() {
        return refuse(
            &mut writer,
            RestoreError::NoHistory(module.name.clone()).to_string(),
        )
        .await;
    }
    let mut preparing = {
        let (path, history, at, paths) = (
            module.path.clone(),
            history.clone(),
            asked.at,
            asked.paths.clone(),
        );
        let (ns, dry_run) = (namespaces(asked.keeps), asked.dry_run);
        tokio::task::spawn_blocking(move || -> Result<Prepared, RestoreError> {
            let later = super::later(&path, history.as_deref(), at)?;
            // The whole module as it is now: read as it is sent, if the client's destination
            // turns out to be empty.
            if paths.is_empty() && later.is_empty() && !dry_run {
                return Ok(Prepared::Now);
            }
            let (view, now) = super::view(&path, history.as_deref(), at, &later, &paths, ns)?;
            Tree::read(&path, history.as_deref(), view, now, ns, paths.is_empty())
                .map(Prepared::Tree)
        })
    };
    // The client gives up on a backup host it does not hear from: say `Alive` while the
    // view is made (a whole module is scanned), as the session's heartbeat does after.
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.tick().await;
    let prepared = loop {
        tokio::select! {
            done = &mut preparing => break done.expect("view task"),
            _ = tick.tick() => writer.write(&Message::Alive).await?,
        }
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return refuse(&mut writer, e.to_string()).await,
    };
    let session = Arc::new(Session::started(reader, writer, peer, asked.keeps));
    let heartbeat = crate::session::heartbeat(session.sender().downgrade());
    let sent = tokio::select! {
        r = send(&session, module, prepared, &asked, peer) => r,
        _ = shutdown.cancelled() => Err("the receiver is stopping".to_string()),
    };
    heartbeat.abort();
    match sent {
        Ok((report, unreadable)) => {
            // What the client refused it knows; what could not be read here it is told.
            for (path, reason) in unreadable.iter().chain(&report.unread) {
                let msg = Message::Unsent {
                    path: path.clone(),
                    reason: reason.clone(),
                };
                if session.send(msg).await.is_err() {
                    break;
                }
            }
            session.close().await;
            tracing::info!(
                %peer,
                module = %module.name,
                files = report.files,
                deltas = report.delta_files,
                bytes = report.payload_bytes,
                failures = report.failures.len() + unreadable.len(),
                "restore: sent"
            );
            Ok(())
        }
        Err(why) => {
            // Said to the client, which fails naming it, before the session ends.
            let reason = format!("restore of module {} stopped: {why}", module.name);
            tracing::warn!(%peer, "{reason}");
            let _ = session.send(Message::Refused { reason }).await;
            session.close().await;
            Ok(())
        }
    }
}

/// What a restore sends, made ready before the client is asked for its destination.
enum Prepared {
    /// The module's view, read whole.
    Tree(Tree),
    /// The whole module as it is now (no time asked for, or nothing changed since it), not
    /// read yet.
    Now,
}

/// The attributes a restore reads and compares: what the client keeps of those ferry keeps.
fn namespaces(keeps: Keeps) -> Namespaces {
    Preserve::default().namespaces().intersect(keeps.xattrs)
}

async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    reason: String,
) -> Result<(), ConnError> {
    writer.write(&Message::Refused { reason }).await
}

/// Lists the destination, plans, sends. Returns what was sent and what could not be read.
async fn send(
    session: &Arc<Session>,
    module: &Module,
    prepared: Prepared,
    asked: &Asked,
    peer: &str,
) -> Result<(Report, Vec<(RelPath, String)>), String> {
    let keeps = asked.keeps;
    let preserve = Preserve::default();
    let compare = Compare {
        owner: keeps.owners,
        setid: keeps.setid,
        xattrs: namespaces(keeps),
        hardlinks: preserve.hardlinks,
    };
    let mut remote = Vec::new();
    if asked.paths.is_empty() {
        remote = session
            .list(&RelPath::root(), compare.xattrs)
            .await
            .map_err(|e| e.to_string())?;
    } else {
        for p in &asked.paths {
            // A path whose parents the destination lacks lists as nothing.
            match session.list(p, compare.xattrs).await {
                Ok(entries) => remote.extend(entries),
                Err(e) if e.is_fatal() => return Err(e.to_string()),
                Err(_) => {}
            }
        }
        remote.sort_by(|a, b| a.path.tree_cmp(&b.path));
        remote.dedup_by(|a, b| a.path == b.path);
    }
    let opts = PlanOptions {
        delete: asked.delete,
        compare,
        devices: keeps.devices,
    };
    let tree = match prepared {
        Prepared::Tree(tree) => tree,
        Prepared::Now if remote.iter().all(|e| e.path.is_root()) => {
            tracing::info!(%peer, module = %module.name, "restore: sending as read");
            return stream(session, module, &remote, opts).await;
        }
        Prepared::Now => {
            // The destination holds something to compare with: the whole view first.
            let (path, ns) = (module.path.clone(), compare.xattrs);
            tokio::task::spawn_blocking(move || {
                let (view, now) = super::view(&path, None, None, &[], &[], ns)?;
                Tree::read(&path, None, view, now, ns, true)
            })
            .await
            .expect("view task")
            .map_err(|e| e.to_string())?
        }
    };
    tracing::info!(
        %peer,
        module = %module.name,
        at = ?asked.at,
        entries = tree.entries.len(),
        "restore: sending"
    );
    let mut names: LinkNames = HashMap::new();
    for e in &tree.entries {
        if let Some(i) = e.inode {
            names.entry(i).or_default().push(e.path.clone());
        }
    }
    let planned = plan(&tree.entries, &remote, opts, &names);
    let totals = Totals::of(&planned);
    let changes = if asked.dry_run {
        described(&planned)
    } else {
        Vec::new()
    };
    let mut batches = changes.chunks(PLANNED_BATCH).peekable();
    loop {
        let batch = batches.next().unwrap_or_default();
        let done = batches.peek().is_none();
        let msg = Message::Planned {
            steps: totals.steps,
            bytes: totals.bytes,
            changes: batch.to_vec(),
            done,
        };
        session.send(msg).await.map_err(|e| e.to_string())?;
        if done {
            break;
        }
    }
    if asked.dry_run {
        return Ok((Report::default(), tree.unreadable));
    }
    let Tree {
        entries,
        located,
        module_root,
        unreadable,
    } = tree;
    // Planned: the entries are not needed any more, only where their files are read.
    drop(entries);
    let origin = Origin::Mapped(Arc::new(move |p: &RelPath| {
        let at_its_own_path = || Located {
            dir: module_root.clone(),
            rel: p.clone(),
            meta: None,
        };
        Some(located.get(p).cloned().unwrap_or_else(at_its_own_path))
    }));
    let mut report = Report::default();
    execute(
        session,
        preserve,
        &origin,
        planned,
        &mut report,
        &mut |_: &Step| {},
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((report, unreadable))
}

/// The whole module as it is now into an empty destination (`remote`, its root at most),
/// sent as it is read: at most [`PIECE`] entries at a time in tree order, each planned
/// against nothing on the walk's thread and sent while the walk reads the next ones, as a
/// copy into an empty module is ([`ferry_sender::descend::copy_into_empty`]); hard links and
/// directory times at the end. Neither the view nor the plan of the whole module is held,
/// and the first file goes out once the first piece is read. The totals announced before
/// each piece are what the walk has planned by then ([`ferry_sender::descend::AHEAD`]).
async fn stream(
    session: &Arc<Session>,
    module: &Module,
    remote: &[Entry],
    opts: PlanOptions,
) -> Result<(Report, Vec<(RelPath, String)>), String> {
    let reason = |e: std::io::Error| format!("{}: {}", module.path.display(), io_reason(&e));
    let root = Arc::new(local::open_root(&module.path).map_err(reason)?);
    let held = root.clone();
    let ns = opts.compare.xattrs;
    // Every name seen so far of each multiply-linked file, in tree order: a name whose file
    // went in an earlier piece becomes a link to its first.
    let mut names: LinkNames = HashMap::new();
    let remote = remote.to_vec();
    let mut pieces = Pieces::start(
        move |sink| local::scan_pieces(&held, &super::is_content, ns, FIRST_PIECE..=PIECE, sink),
        move |local| {
            for e in local {
                if let Some(i) = e.inode {
                    names.entry(i).or_default().push(e.path.clone());
                }
            }
            plan(local, &remote, opts, &names)
        },
    );
    let origin = Origin::Root(root);
    let mut report = Report::default();
    let mut unreadable = Vec::new();
    let mut dir_meta = Vec::new();
    let mut unwatched = |_: &Step| {};
    let mut run = Execution::new(
        session,
        Preserve::default(),
        &origin,
        &mut report,
        &mut unwatched,
    );
    let planned = |walked: Totals, whole: bool| Message::Planned {
        steps: walked.steps,
        bytes: walked.bytes,
        changes: Vec::new(),
        done: whole,
    };
    let mut whole = false;
    while let Some(piece) = pieces.next().await {
        unreadable.extend(piece.errors.into_iter().map(|(p, e)| (p, io_reason(&e))));
        whole = piece.whole;
        let msg = planned(piece.walked, whole);
        session.send(msg).await.map_err(|e| e.to_string())?;
        dir_meta.append(&mut run.piece(piece.plan).await.map_err(|e| e.to_string())?);
    }
    if !whole {
        let msg = planned(pieces.walked().now(), true);
        session.send(msg).await.map_err(|e| e.to_string())?;
    }
    let walked = pieces.end().await;
    order_dir_meta(&mut dir_meta);
    // Directory times only after a whole walk: what was sent is answered either way.
    run.finish(if walked.is_ok() { dir_meta } else { Vec::new() })
        .await
        .map_err(|e| e.to_string())?;
    walked.map_err(reason)?;
    Ok((report, unreadable))
}

/// Each step of `plan`, as a dry run lists it.
fn described(plan: &Plan) -> Vec<(RelPath, String)> {
    let mut out: Vec<(RelPath, String)> = Vec::new();
    for d in &plan.deletes {
        out.push((d.clone(), "delete".into()));
    }
    for op in &plan.creates {
        let what = match op {
            Op::Mkdir(_) => "directory",
            Op::Symlink(_) => "symlink",
            Op::Special(_) => "special file",
            Op::File {
                base: Base::Present,
                ..
            } => "file (delta)",
            Op::File { .. } => "file",
            Op::SetMeta(_) => "metadata",
        };
        out.push((op.entry().path.clone(), what.into()));
    }
    for l in &plan.links {
        out.push((l.entry.path.clone(), format!("hard link to {}", l.target)));
    }
    for d in &plan.dir_meta {
        out.push((d.path.clone(), "directory metadata".into()));
    }
    out
}

/// The view read: its entries as they were (tree order, the root first) and where each is
/// read now: in `located`, or (most of a view, kept out of it) in the module at its own path
/// with the metadata it has now.
struct Tree {
    entries: Vec<Entry>,
    located: HashMap<RelPath, Located>,
    module_root: Arc<OwnedFd>,
    unreadable: Vec<(RelPath, String)>,
}

impl Tree {
    /// Reads every entry of `view` beneath the held module root or history objects, with the
    /// metadata the journal says it had then; an entry the view takes from the module at its
    /// own path is the one `now` read while the view was made. `whole`: the root is part of
    /// the restore (its metadata too); else the client's own root is left as it is.
    fn read(
        module: &std::path::Path,
        history: Option<&std::path::Path>,
        view: View,
        mut now: HashMap<RelPath, Entry>,
        xattrs: Namespaces,
        whole: bool,
    ) -> Result<Tree, RestoreError> {
        let io_err = |what: &std::path::Path, e: std::io::Error| {
            RestoreError::Io(format!("{}: {}", what.display(), io_reason(&e)))
        };
        let module_root = Arc::new(local::open_root(module).map_err(|e| io_err(module, e))?);
        let objects = match history {
            Some(h) => {
                let dir = h.join(OBJECTS);
                Some(Arc::new(
                    local::open_root(&dir).map_err(|e| io_err(&dir, e))?,
                ))
            }
            None => None,
        };
        let mut entries = Vec::with_capacity(view.len() + 1);
        let mut located = HashMap::new();
        let mut unreadable = Vec::new();
        let mut view = view;
        let root_then = view.remove(&RelPath::root()).and_then(|n| n.meta);
        let root_meta = {
            let f = std::fs::File::from(module_root.try_clone().map_err(|e| io_err(module, e))?);
            let md = f.metadata().map_err(|e| io_err(module, e))?;
            local::meta_of(&md)
                .ok_or_else(|| RestoreError::Io("module root: not a directory".into()))?
        };
        let root_meta = match &root_then {
            Some(then) => as_then(root_meta, then),
            None => root_meta,
        };
        entries.push(Entry {
            path: RelPath::root(),
            meta: root_meta,
            link: None,
            inode: None,
        });
        for (path, node) in view {
            let (fd, rel) = match (&node.source, &objects) {
                (Source::Module(m), _) => (module_root.clone(), m.clone()),
                (Source::Object { id, sub }, Some(objects)) => {
                    (objects.clone(), super::object_path(*id, sub))
                }
                (Source::Object { .. }, None) => continue,
            };
            let scanned = match &node.source {
                Source::Module(m) => now.remove(m),
                Source::Object { .. } => None,
            };
            let read = match scanned {
                Some(mut e) => {
                    if let Some(then) = &node.meta {
                        e.meta = as_then(e.meta, then);
                    }
                    Ok(Some(e))
                }
                None => super::entry_then(&fd, &rel, &node, xattrs),
            };
            match read {
                Ok(Some(then)) => {
                    let as_now = node.meta.is_none()
                        && matches!(&node.source, Source::Module(m) if *m == path);
                    let path = if as_now {
                        path
                    } else {
                        let at = Located {
                            dir: fd,
                            rel,
                            meta: node.meta,
                        };
                        located.insert(path.clone(), at);
                        path
                    };
                    entries.push(Entry { path, ..then });
                }
                Ok(None) => unreadable.push((path, "gone from the backup host".to_string())),
                Err(e) => unreadable.push((path, io_reason(&e))),
            }
        }
        if !whole {
            entries.remove(0);
        }
        entries.sort_by(|a, b| a.path.tree_cmp(&b.path));
        Ok(Tree {
            entries,
            located,
            module_root,
            unreadable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::tests::module_at;

    /// A whole module as it is now into an empty destination goes as it is read, in several
    /// pieces: the totals announced before each piece never fall, and by the last piece are
    /// every step the client was asked to take.
    #[tokio::test]
    async fn a_module_sent_as_read_announces_totals_that_end_whole() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..3 {
            let sub = dir.path().join(format!("d{d}"));
            std::fs::create_dir(&sub).unwrap();
            for f in 0..200 {
                std::fs::write(sub.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
            }
        }
        let module = module_at(dir.path(), false);
        let (here, there) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(async move {
            let (r, w) = tokio::io::split(there);
            let (reader, writer) = (FrameReader::new(r), FrameWriter::new(w));
            serve(&module, reader, writer, "test", &CancellationToken::new()).await
        });
        let (r, w) = tokio::io::split(here);
        let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
        let keeps = Keeps {
            owners: true,
            devices: false,
            setid: false,
            xattrs: Namespaces::NONE,
            history: false,
        };
        let restore = Message::Restore {
            at: None,
            paths: Vec::new(),
            delete: false,
            keeps,
            dry_run: false,
        };
        writer.write(&restore).await.unwrap();
        let (mut planned, mut whole, mut asked, mut files) = (Vec::new(), Vec::new(), 0u64, 0);
        while let Some(msg) = reader.read().await.unwrap() {
            let id = match msg {
                Message::List { id, under, .. } => {
                    assert!(under.is_root());
                    let md = std::fs::metadata(dir.path()).unwrap();
                    let root = Entry {
                        path: RelPath::root(),
                        meta: local::meta_of(&md).unwrap(),
                        link: None,
                        inode: None,
                    };
                    let entries = vec![root];
                    let listing = Message::Listing {
                        id,
                        entries,
                        done: true,
                    };
                    writer.write(&listing).await.unwrap();
                    continue;
                }
                Message::Planned { steps, done, .. } => {
                    planned.push(steps);
                    whole.push(done);
                    continue;
                }
                Message::File { id, .. } => {
                    files += 1;
                    id
                }
                Message::Mkdir { id, .. } | Message::SetMeta { id, .. } => id,
                Message::Alive => continue,
                Message::Bye => break,
                other => panic!("unexpected {}", other.name()),
            };
            asked += 1;
            writer.write(&Message::Ack { id }).await.unwrap();
        }
        drop((reader, writer));
        serving.await.unwrap().unwrap();
        assert_eq!(files, 600);
        assert!(planned.len() >= 2, "one piece: {planned:?}");
        assert!(planned.windows(2).all(|w| w[0] <= w[1]), "{planned:?}");
        assert_eq!(planned.last().copied(), Some(asked), "{planned:?}");
        // Growing totals say so until the walk is over, and the last say they are whole.
        assert_eq!(whole.last(), Some(&true), "{whole:?}");
        assert!(whole.windows(2).all(|w| w[0] <= w[1]), "{whole:?}");
    }
}
