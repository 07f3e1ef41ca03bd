//! The remover thread: unlinks what retention and topic deletions took out of the store, off
//! the store's thread, once the sync pipeline says no sync job holds it (see `commit`, the
//! `Retired` batch entries), and makes each removal durable (fsync of the directory).

use super::commit::Retired;
use super::ids_file;
use std::path::Path;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// What the remover reports back to the store actor (on its own thread).
#[derive(Debug)]
pub enum Removed {
    /// Segments retention took out of a log are gone.
    Segments(SegmentsRemoved),
    /// A topic's deletion is durable (or failed): the actor answers it with `reply`.
    Topic {
        /// The topic.
        topic: String,
        /// Messages it held.
        messages: u64,
        /// Bytes of its chunks.
        bytes: u64,
        /// Whether the deletion is durable.
        result: Result<(), String>,
        /// The deletion's answer.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What the remover reports for segments it removed.
#[derive(Debug, Clone)]
pub struct SegmentsRemoved {
    /// The topic.
    pub topic: String,
    /// Its floor now.
    pub floor: u64,
    /// Messages removed.
    pub messages: u64,
    /// Bytes removed.
    pub bytes: u64,
    /// Why (`max_age`, `max_bytes`, `max_messages`, `acked`).
    pub why: &'static str,
    /// A file could not be removed or the directory not fsynced (it stays on disk; the log no
    /// longer has it).
    pub error: Option<String>,
}

/// A batch of removals and the result of the sync it waited for.
pub(crate) type Batch = (Vec<Retired>, Result<(), String>);

/// Starts the remover thread; `report` is called (on that thread) after each removal. The
/// thread ends when the returned sender is dropped.
pub(crate) fn spawn(report: Box<dyn Fn(Removed) + Send>) -> std::io::Result<mpsc::Sender<Batch>> {
    let (tx, rx) = mpsc::channel::<Batch>();
    std::thread::Builder::new()
        .name("sluice-remover".into())
        .spawn(move || {
            for (batch, synced) in rx {
                for r in batch {
                    remove(r, &synced, &report);
                }
            }
        })?;
    Ok(tx)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir) {
        Ok(f) => f.sync_all(),
        // Gone meanwhile (the topic was deleted): nothing left to make durable there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fdatasyncs `files` (a file gone meanwhile is skipped: its topic was deleted) and fsyncs
/// `dir`; nothing to do without files.
fn sync_kept(files: &[std::path::PathBuf], dir: &Path) -> std::io::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    for f in files {
        match std::fs::File::open(f) {
            Ok(f) => f.sync_data()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fsync_dir(dir)
}

fn remove(r: Retired, synced: &Result<(), String>, report: &dyn Fn(Removed)) {
    match r {
        Retired::Segments(t) => {
            if let Err(e) = synced {
                tracing::error!(topic = %t.topic, error = %e, "segments removed by retention stay on disk until restart: the sync before their removal failed");
                return;
            }
            // What the removal counts on is durable first, whatever the fsync policy: the
            // segments left (the groups' records), then the ids of removed messages still in
            // their dedup window.
            if let Err(e) = sync_kept(&t.sync_first, &t.dir) {
                // Out of the log all the same (not read any more); back at the next start.
                tracing::error!(topic = %t.topic, error = %e, "segments removed by retention stay on disk until restart: the segments left could not be synced");
                report(Removed::Segments(SegmentsRemoved {
                    messages: t.messages(),
                    bytes: t.bytes(),
                    topic: t.topic,
                    floor: t.floor,
                    why: t.why,
                    error: Some(format!(
                        "sync before removing segments (they stay until restart): {e}"
                    )),
                }));
                return;
            }
            let mut error = None;
            if !t.ids.is_empty() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                if let Err(e) = ids_file::add(&t.dir, &t.ids, t.dedup_window_ms, now, t.max_ids) {
                    // Not fatal: the ids stay in memory; only a restart within their window
                    // would forget them.
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::error!(topic = %t.topic, error = %e, "cannot keep the ids of removed messages: a restart within their dedup window forgets them");
                        error = Some(format!("keeping the ids of removed messages: {e}"));
                    }
                }
            }
            for d in &t.removed {
                match std::fs::remove_file(&d.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(segment = %d.path.display(), error = %e, "cannot remove a segment retention removed: it stays on disk");
                        error = Some(format!("removing {}: {e}", d.path.display()));
                    }
                }
            }
            if let Err(e) = fsync_dir(&t.dir) {
                tracing::error!(dir = %t.dir.display(), error = %e, "cannot fsync a topic's directory after removing segments");
                error = Some(format!("fsync of {}: {e}", t.dir.display()));
            }
            report(Removed::Segments(SegmentsRemoved {
                messages: t.messages(),
                bytes: t.bytes(),
                topic: t.topic,
                floor: t.floor,
                why: t.why,
                error,
            }));
        }
        Retired::Topic(t, reply) => {
            // The rename into the trash made durable: the deletion is done.
            let result = synced.clone().and_then(|()| {
                t.dirs
                    .iter()
                    .try_for_each(|d| fsync_dir(d))
                    .map_err(|e| format!("fsync after renaming the topic's directory: {e}"))
            });
            let ok = result.is_ok();
            report(Removed::Topic {
                topic: t.topic.clone(),
                messages: t.messages,
                bytes: t.bytes,
                result,
                reply,
            });
            if !ok {
                tracing::error!(topic = %t.topic, "a deleted topic's files stay in the trash until restart");
                return;
            }
            // Then its files go; a crash before the end leaves them in the trash, emptied at
            // the next start.
            if let Err(e) = std::fs::remove_dir_all(&t.trash) {
                tracing::warn!(dir = %t.trash.display(), error = %e, "cannot remove a deleted topic's files: they go at the next start");
                return;
            }
            if let Some(trash) = t.trash.parent() {
                if let Err(e) = fsync_dir(trash) {
                    tracing::warn!(dir = %trash.display(), error = %e, "cannot fsync the trash directory");
                }
            }
        }
    }
}
