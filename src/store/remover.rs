//! The remover thread: removes what retention and topic deletions took out of the store, off
//! the store's thread, once the sync pipeline says no sync job holds it (see `commit`, the
//! `Retired` batch entries), and makes each removal durable (fsync of the directory).
//!
//! Removing is in two steps (see `store/retention.md`, "Removing without stalling the disk"):
//! a retired segment is first **renamed into the trash** (its topic's directory fsynced: the
//! removal is durable, and reported), then its blocks are **freed in paced steps** by the
//! [`Freer`]: the file is cut down with `ftruncate` by at most [`Pace::step`] bytes at a time,
//! at most [`Pace::rate`] bytes a second, and unlinked once empty. Freeing a 64 MiB segment at
//! once is one long truncate (page cache, extents) and one big journal commit (and discard)
//! that every `fdatasync` of the publish path then waits behind. A file left half cut by a
//! crash is in the trash, which the next start empties: it is never read back as a segment.

use super::commit::Retired;
use super::ids_file;
use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Bytes freed per step by default ([`Pace::step`]).
pub const DEFAULT_STEP: u64 = 2 * 1024 * 1024;

/// How fast removed files give their blocks back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Most bytes freed a second (`0`: no pacing, each file freed at once).
    pub rate: u64,
    /// Most bytes one `ftruncate` frees.
    pub step: u64,
}

impl Pace {
    /// `rate` bytes a second (`0`: unpaced) in steps of [`DEFAULT_STEP`].
    pub fn rate(rate: u64) -> Self {
        Pace {
            rate,
            step: DEFAULT_STEP,
        }
    }

    /// The pause after freeing `bytes`.
    fn pause(&self, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 / self.rate as f64)
    }
}

/// What the remover has done, readable from any thread (`admin.stats` under `syncs`).
#[derive(Debug, Default)]
pub struct FreeStats {
    /// Bytes of files renamed into the trash and not freed yet.
    pub pending_bytes: AtomicU64,
    /// Bytes freed so far (files cut down and unlinked).
    pub freed_bytes: AtomicU64,
    /// Files unlinked after their blocks were freed.
    pub files_freed: AtomicU64,
    /// `ftruncate` steps made.
    pub steps: AtomicU64,
}

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

/// Starts the remover thread; `report` is called (on that thread) after each removal. Retired
/// files go into `trash` (the data dir's) and are freed at `pace`. The thread ends when the
/// returned sender is dropped (what is not freed yet stays in the trash, emptied at the next
/// start).
pub(crate) fn spawn(
    trash: PathBuf,
    pace: Pace,
    stats: Arc<FreeStats>,
    report: Box<dyn Fn(Removed) + Send>,
) -> std::io::Result<mpsc::Sender<Batch>> {
    let (tx, rx) = mpsc::channel::<Batch>();
    std::thread::Builder::new()
        .name("sluice-remover".into())
        .spawn(move || {
            let mut freer = Freer::new(trash, pace, stats);
            loop {
                // Removals first (they are what the store waits for); freeing between them.
                let got = match freer.due() {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                };
                match got {
                    Ok((batch, synced)) => {
                        for r in batch {
                            remove(r, &synced, &mut freer, &report);
                        }
                        // A step that fell due meanwhile (a stream of batches never times out).
                        freer.step();
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => freer.step(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        })?;
    Ok(tx)
}

/// Frees the blocks of files renamed into the trash, oldest first, in paced steps.
pub(crate) struct Freer {
    trash: PathBuf,
    pace: Pace,
    stats: Arc<FreeStats>,
    queue: VecDeque<Item>,
    /// The file being cut down, and its length now.
    open: Option<(PathBuf, File, u64)>,
    /// When the next step may run.
    next: Instant,
    /// Names files renamed into the trash.
    seq: u64,
}

enum Item {
    /// A file: cut down, then unlinked.
    File(PathBuf),
    /// A deleted topic's directory: its files are freed first, then it goes.
    Dir(PathBuf),
    /// A directory whose files were freed.
    DirEnd(PathBuf),
}

impl Freer {
    pub(crate) fn new(trash: PathBuf, pace: Pace, stats: Arc<FreeStats>) -> Self {
        Freer {
            trash,
            pace,
            stats,
            queue: VecDeque::new(),
            open: None,
            next: Instant::now(),
            seq: 0,
        }
    }

    /// Renames `path` into the trash (not durable until its directory is fsynced) and queues
    /// it to be freed; `Err`: it is where it was.
    pub(crate) fn take(&mut self, path: &Path) -> std::io::Result<()> {
        let bytes = std::fs::metadata(path)?.len();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.seq += 1;
        // `<nanos>.<n>.seg`: never a deleted topic's `<topic>.<nanos>` (its tail is a number).
        let to = self.trash.join(format!("{nanos}.{}.seg", self.seq));
        std::fs::rename(path, &to)?;
        self.stats.pending_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.queue.push_back(Item::File(to));
        Ok(())
    }

    /// Queues a deleted topic's directory (in the trash already).
    fn take_dir(&mut self, dir: PathBuf) {
        self.queue.push_back(Item::Dir(dir));
    }

    /// When the next step is due (`None`: nothing to free).
    pub(crate) fn due(&self) -> Option<Instant> {
        (self.open.is_some() || !self.queue.is_empty()).then_some(self.next)
    }

    /// One step: cuts the current file down by at most `pace.step` bytes (unlinks it once
    /// empty), or expands a directory into its files; then waits for the budget.
    pub(crate) fn step(&mut self) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        let freed = match self.open.take() {
            Some((p, f, len)) => self.cut(p, f, len),
            None => match self.queue.pop_front() {
                None => 0,
                Some(Item::File(p)) => match File::options().write(true).open(&p) {
                    Ok(f) => {
                        let len = f.metadata().map_or(0, |m| m.len());
                        self.cut(p, f, len)
                    }
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(file = %p.display(), error = %e, "cannot open a removed file to free it: it is unlinked whole");
                            self.unlink(&p, 0);
                        }
                        0
                    }
                },
                Some(Item::Dir(d)) => {
                    self.expand(d);
                    0
                }
                Some(Item::DirEnd(d)) => {
                    if let Err(e) = std::fs::remove_dir_all(&d) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot remove a deleted topic's files: they go at the next start");
                    }
                    0
                }
            },
        };
        self.next = now + self.pace.pause(freed);
    }

    /// Cuts `f` (at `p`, `len` bytes long) down by one step, or unlinks it once empty;
    /// returns the bytes freed.
    fn cut(&mut self, p: PathBuf, f: File, len: u64) -> u64 {
        if len == 0 {
            drop(f);
            self.unlink(&p, 0);
            return 0;
        }
        let step = if self.pace.rate == 0 {
            len
        } else {
            self.pace.step.max(1).min(len)
        };
        let to = len - step;
        if let Err(e) = f.set_len(to) {
            tracing::warn!(file = %p.display(), error = %e, "cannot cut down a removed file: it is unlinked whole");
            drop(f);
            self.unlink(&p, len);
            return len;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.freed_bytes.fetch_add(step, Ordering::Relaxed);
        sub(&self.stats.pending_bytes, step);
        if to == 0 {
            drop(f);
            self.unlink(&p, 0);
        } else {
            self.open = Some((p, f, to));
        }
        step
    }

    /// Unlinks `p`, whose last `left` bytes were not freed by steps.
    fn unlink(&mut self, p: &Path, left: u64) {
        match std::fs::remove_file(p) {
            Ok(()) => {
                self.stats.files_freed.fetch_add(1, Ordering::Relaxed);
                self.stats.freed_bytes.fetch_add(left, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "cannot remove a file in the trash: it goes at the next start");
            }
        }
        sub(&self.stats.pending_bytes, left);
    }

    /// Queues the files of a deleted topic's directory ahead of everything, then the directory.
    fn expand(&mut self, d: PathBuf) {
        let mut files = Vec::new();
        match std::fs::read_dir(&d) {
            Ok(rd) => {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        if let Ok(md) = e.metadata() {
                            self.stats
                                .pending_bytes
                                .fetch_add(md.len(), Ordering::Relaxed);
                        }
                        files.push(e.path());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "cannot list a deleted topic's files: removed whole");
            }
        }
        self.queue.push_front(Item::DirEnd(d));
        for f in files.into_iter().rev() {
            self.queue.push_front(Item::File(f));
        }
    }
}
fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir) {
        Ok(f) => f.sync_all(),
        // Gone meanwhile (the topic was deleted): nothing left to make durable there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sub(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
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

fn remove(r: Retired, synced: &Result<(), String>, freer: &mut Freer, report: &dyn Fn(Removed)) {
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
            // Out of the topic's directory into the trash (made durable by the fsync below);
            // their blocks are freed later, in paced steps.
            for d in &t.removed {
                let moved = match freer.take(&d.path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(_) => std::fs::remove_file(&d.path),
                    Ok(()) => Ok(()),
                };
                match moved {
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
            // Then its files go, in paced steps; a crash before the end leaves them in the
            // trash, emptied at the next start.
            freer.take_dir(t.trash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segment::Detached;
    use crate::store::Trimmed;

    #[test]
    fn a_removed_segment_leaves_its_topic_at_once_and_is_freed_in_paced_steps() {
        let root = tempfile::tempdir().unwrap();
        let (topic, trash) = (root.path().join("topics/t"), root.path().join("trash"));
        std::fs::create_dir_all(&topic).unwrap();
        std::fs::create_dir_all(&trash).unwrap();
        const MIB: u64 = 1024 * 1024;
        let seg = topic.join("1.seg");
        std::fs::write(&seg, vec![7u8; 4 * MIB as usize]).unwrap();
        // 1 MiB steps at 8 MiB/s: 4 steps, 125 ms apart.
        let stats = Arc::new(FreeStats::default());
        let (rtx, rrx) = mpsc::channel();
        let tx = spawn(
            trash.clone(),
            Pace {
                rate: 8 * MIB,
                step: MIB,
            },
            stats.clone(),
            Box::new(move |r| {
                let _ = rtx.send(r);
            }),
        )
        .unwrap();
        let started = Instant::now();
        let trimmed = Trimmed {
            topic: "t".into(),
            dir: topic.clone(),
            removed: vec![Detached {
                path: seg.clone(),
                messages: 3,
                bytes: 4 * MIB,
            }],
            floor: 4,
            why: "max_age",
            sync_first: vec![],
            ids: vec![],
            dedup_window_ms: 0,
            max_ids: 0,
        };
        tx.send((vec![Retired::Segments(trimmed)], Ok(()))).unwrap();
        // Reported as soon as it left the topic's directory, before its blocks are freed.
        match rrx.recv_timeout(Duration::from_secs(10)).unwrap() {
            Removed::Segments(r) => {
                assert_eq!(
                    (r.messages, r.bytes, r.floor, r.error),
                    (3, 4 * MIB, 4, None)
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(!seg.exists());
        // Cut down a step at a time: a size strictly between is seen on the way.
        let mut sizes = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while stats.files_freed.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline, "not freed in time");
            for e in std::fs::read_dir(&trash).unwrap().flatten() {
                if let Ok(md) = e.metadata() {
                    sizes.insert(md.len());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = started.elapsed();
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0, "unlinked");
        assert_eq!(stats.steps.load(Ordering::Relaxed), 4);
        assert_eq!(stats.freed_bytes.load(Ordering::Relaxed), 4 * MIB);
        assert_eq!(stats.pending_bytes.load(Ordering::Relaxed), 0);
        assert!(
            sizes.iter().any(|&s| s > 0 && s < 4 * MIB),
            "cut down in steps: {sizes:?}"
        );
        // Three pauses of 125 ms between the four steps.
        assert!(took >= Duration::from_millis(375), "paced: took {took:?}");
    }
}
