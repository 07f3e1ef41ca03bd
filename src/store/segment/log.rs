//! A topic's log: appends (chunks, group records, rolls), reads, and what a sync must do.

use super::direct::{align, reserve, DirectWrite, DIRECT_MIN};
use super::format::*;
use super::spares::Spares;
use crate::store::StoreError;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A segment file is rolled once it reaches this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// How much written zero space is added ahead of small appends at a time (see the module docs).
pub(super) const ZERO_STEP: u64 = 256 * 1024;

pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// End of the chunks (where the next one goes).
    pub(super) len: u64,
    /// The file's length: `len..file_len` holds zeros written ahead of the data.
    pub(super) file_len: u64,
    /// (first seq, offset) of every chunk, in order.
    pub(super) chunks: Vec<(u64, u64)>,
    /// Direct writes into this segment not known to be done, each with whether a sync job
    /// has it already.
    pub(super) direct: Vec<(Arc<DirectWrite>, bool)>,
    /// The file opened with `O_DIRECT` (on the store's thread, so that running out of file
    /// descriptors fails one request there, not a sync); `None` until the first big chunk.
    pub(super) direct_file: Option<Arc<File>>,
    /// The file system refused `O_DIRECT`: big chunks go through the page cache.
    pub(super) no_direct: bool,
    /// A handle of its own for the next sync job, opened on the store's thread before the
    /// first write after the last sync was taken (see [`SegmentLog::take_sync`]).
    pub(super) sync_file: Option<File>,
    /// Started from a spare ([`Spares`]): its zeros are allocated, written and durable.
    pub(super) from_spare: bool,
    /// A failed write could not be cut back off the file: a rollback must cut it.
    pub(super) write_failed: bool,
    /// Store time (ms since the epoch) of its first and of its last chunk of messages (every
    /// message of a chunk comes from one publish and has its time), if known: what retention
    /// by age and `SeqAtTime` go by.
    pub(super) first_ms: Option<u64>,
    pub(super) last_ms: Option<u64>,
}

impl Segment {
    pub(super) fn new(path: PathBuf, file: File, file_len: u64) -> Segment {
        Segment {
            path,
            file,
            len: 0,
            file_len,
            chunks: Vec::new(),
            direct: Vec::new(),
            direct_file: None,
            no_direct: false,
            sync_file: None,
            from_spare: false,
            write_failed: false,
            first_ms: None,
            last_ms: None,
        }
    }

    /// Opens the handle the next sync job will use, unless open already.
    pub(super) fn open_sync_file(&mut self) -> std::io::Result<()> {
        if self.sync_file.is_none() {
            self.sync_file = Some(open_for_sync(&self.path)?);
        }
        Ok(())
    }
}

/// One topic's segment files.
pub struct SegmentLog {
    pub(super) dir: PathBuf,
    pub(super) segments: Vec<Segment>,
    pub(super) last_seq: u64,
    /// Each group's newest record (MessagePack), as last written.
    pub(super) groups: std::collections::BTreeMap<String, Bytes>,
    /// Roll size ([`SEGMENT_BYTES`]; smaller in tests).
    pub(super) segment_bytes: u64,
    /// Index of the first segment that may hold writes not yet handed to a sync.
    pub(super) unsynced_from: Option<usize>,
    /// The directory gained or lost a file since the last sync was taken.
    pub(super) dir_dirty: bool,
    /// Handles of the directory and its parent for the next sync job, opened with the file
    /// that made the directory dirty (see [`SegmentLog::take_sync`]).
    pub(super) dir_handles: Vec<(PathBuf, File)>,
    /// A roll failed before every group record was copied into the new segment.
    pub(super) copies_pending: bool,
    /// Big chunks leave their aligned middle to the sync ([`DirectWrite`]); only where a sync
    /// follows every commit.
    pub(super) direct_writes: bool,
    /// Zeroed segments to start new ones from ([`Spares`]); only where a sync follows every
    /// commit.
    pub(super) spares: Option<Arc<Spares>>,
    /// Largest chunk body written or loaded ([`MAX_BODY`]; smaller in tests).
    pub(super) max_body: usize,
    /// Bytes of small chunks written since the log was opened, and where the current busy
    /// window started (time, bytes then): see [`Spares`].
    pub(super) small_bytes: u64,
    pub(super) busy_window: (std::time::Instant, u64),
    /// The topic wrote `BUSY_BYTES` within `BUSY_WINDOW`, or rolled: it gets spares.
    pub(super) busy: bool,
    /// The spare for the next roll was asked for (reset at each roll).
    pub(super) next_spare_asked: bool,
    /// Tests: failures to inject.
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Tests: failures a [`SegmentLog`] injects.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Faults {
    /// Chunks written before the next one fails with `ENOSPC` (part of it written first).
    pub chunks_ok: Option<usize>,
    /// Starting a new segment fails with this errno.
    pub new_segment: Option<i32>,
}

/// Opens a segment file for a sync job: a handle of its own (see [`SegmentLog::take_sync`]),
/// writable for a direct write the file system refuses ([`DirectWrite::run`]).
pub(super) fn open_for_sync(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).open(path)
}

/// Handles of `dir` and its parent, for a sync job to fsync.
pub(super) fn open_dir_handles(dir: &Path) -> std::io::Result<Vec<(PathBuf, File)>> {
    let mut out = vec![(dir.to_owned(), File::open(dir)?)];
    if let Some(parent) = dir.parent() {
        out.push((parent.to_owned(), File::open(parent)?));
    }
    Ok(out)
}

/// The error for a chunk larger than can be read back.
pub(super) fn too_big(body_len: usize, max: usize) -> StoreError {
    StoreError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "a stored chunk of {body_len} bytes would exceed the largest that can be read back \
             ({max} bytes): refused"
        ),
    ))
}

pub(super) fn seq_overflow() -> StoreError {
    StoreError::Io(std::io::Error::other("sequence numbers exhausted"))
}

impl SegmentLog {
    /// Last stored seq (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Appends one chunk `body` holding `count` messages from `last_seq + 1`. Not durable until
    /// [`SegmentLog::sync`]. On error the chunk is not in the log, but a roll it started may
    /// be: a request of several chunks undoes itself with [`SegmentLog::rollback`].
    pub fn append_chunk(&mut self, count: u32, body: &[Bytes]) -> Result<u64, StoreError> {
        self.append_chunk_at(count, body, None)
    }

    /// [`SegmentLog::append_chunk`] of messages stored at `ts_ms` (ms since the epoch), which
    /// the segment remembers for retention by age.
    pub fn append_chunk_at(
        &mut self,
        count: u32,
        body: &[Bytes],
        ts_ms: Option<u64>,
    ) -> Result<u64, StoreError> {
        let first = self.next_seq()?;
        let last = first
            .checked_add(count.saturating_sub(1) as u64)
            .ok_or_else(seq_overflow)?;
        let size: usize = body.iter().map(Bytes::len).sum();
        if size > self.max_body {
            return Err(too_big(size, self.max_body));
        }
        let small = (size as u64) < ZERO_STEP;
        self.roll_if_full(first, small)?;
        let off = self.write_chunk(MAGIC, first, count, body)?;
        let seg = self.segments.last_mut().ok_or(StoreError::Unavailable)?;
        seg.chunks.push((first, off));
        if let Some(ts) = ts_ms {
            if seg.chunks.len() == 1 {
                seg.first_ms = Some(ts);
            }
            seg.last_ms = Some(ts);
        }
        self.last_seq = last;
        if small {
            self.note_small_write(size as u64);
        }
        Ok(first)
    }

    /// Writes `group`'s record (MessagePack) to the log. Not durable until
    /// [`SegmentLog::sync`]. A record larger than can be read back is refused.
    pub fn put_group(&mut self, group: &str, record: Bytes) -> Result<(), StoreError> {
        if group.len() > u16::MAX as usize {
            return Err(StoreError::Io(std::io::Error::other("group name too long")));
        }
        let body = group_body(group, &record);
        if body.len() > self.max_body {
            return Err(too_big(body.len(), self.max_body));
        }
        let first = self.next_seq()?;
        self.roll_if_full(first, true)?;
        self.write_chunk(GROUP_MAGIC, first, 0, &[body])?;
        self.groups.insert(group.to_string(), record);
        Ok(())
    }

    pub(super) fn next_seq(&self) -> Result<u64, StoreError> {
        self.last_seq.checked_add(1).ok_or_else(seq_overflow)
    }

    /// Writes a tombstone for `group` (an empty record): its records in older segments no
    /// longer count, at open as now, and it is not copied into new segments. `false` if the
    /// log has no record of it. Not durable until [`SegmentLog::sync`].
    pub fn delete_group(&mut self, group: &str) -> Result<bool, StoreError> {
        if !self.groups.contains_key(group) {
            return Ok(false);
        }
        if self.segments.is_empty() {
            // Never written (adopted from memory): nothing on disk to cancel.
            self.groups.remove(group);
            return Ok(true);
        }
        if group.len() > u16::MAX as usize {
            return Err(StoreError::Io(std::io::Error::other("group name too long")));
        }
        let first = self.next_seq()?;
        self.roll_if_full(first, true)?;
        self.write_chunk(GROUP_MAGIC, first, 0, &[group_body(group, &[])])?;
        self.groups.remove(group);
        Ok(true)
    }

    /// Takes group records kept in memory while the topic did not exist (MessagePack by
    /// name): they are written at the head of the first segment, like the copies at a roll.
    pub fn adopt_groups(&mut self, records: impl IntoIterator<Item = (String, Bytes)>) {
        for (name, rec) in records {
            self.groups.entry(name).or_insert(rec);
        }
        if !self.segments.is_empty() && !self.groups.is_empty() {
            self.copies_pending = true;
        }
    }

    /// Starts a new segment (named `first`) when there is none or the last one is full (or a
    /// busy topic can move to a spare), and makes sure it starts with a copy of every group's
    /// record (see the module docs). A segment without messages is never rolled: its
    /// successor would get its name.
    pub(super) fn roll_if_full(&mut self, first: u64, small: bool) -> Result<(), StoreError> {
        let roll = match self.segments.last() {
            None => true,
            Some(s) => {
                !s.chunks.is_empty()
                    && (s.len >= self.segment_bytes || (small && self.early_roll(s)))
            }
        };
        if roll {
            self.start_segment(first, small)?;
        }
        self.write_copies(first)
    }

    /// Closes the last segment and starts segment `first` (see [`SegmentLog::roll_if_full`]);
    /// the group copies are left pending for [`SegmentLog::write_copies`].
    pub(super) fn start_segment(&mut self, first: u64, small: bool) -> Result<(), StoreError> {
        // A segment's direct writes are made before the next segment starts, so that after
        // a crash only the last one can hold a chunk missing its middle (`open` checks it
        // fully). A sync thread is normally done with them already.
        if let Some(seg) = self.segments.last_mut() {
            for (d, _) in &seg.direct {
                // On failure they stay, for the sync of the requests already written.
                d.run(&seg.file)?;
            }
            seg.direct.clear();
            seg.direct_file = None;
        }
        let rolled = !self.segments.is_empty();
        self.new_segment(first, small)?;
        self.copies_pending = !self.groups.is_empty();
        self.next_spare_asked = false;
        if rolled && small {
            // A topic that fills segments is busy and will roll again: a spare for then,
            // now if this segment did not get one (it moves to it early), else once this
            // one is three quarters full.
            self.busy = true;
            let from_spare = self.segments.last().is_some_and(|s| s.from_spare);
            if let Some(sp) = &self.spares {
                if !from_spare || sp.is_eager() {
                    sp.prepare_soon();
                }
            }
        }
        Ok(())
    }

    /// Writes the copies of every group's record a new segment still lacks.
    pub(super) fn write_copies(&mut self, first: u64) -> Result<(), StoreError> {
        if self.copies_pending {
            let records: Vec<Bytes> = self
                .groups
                .iter()
                .map(|(name, rec)| group_body(name, rec))
                .collect();
            for b in records {
                self.write_chunk(GROUP_MAGIC, first, 0, &[b])?;
            }
            self.copies_pending = false;
        }
        Ok(())
    }

    /// The newest record of `group` (MessagePack), if any.
    pub fn group(&self, group: &str) -> Option<&Bytes> {
        self.groups.get(group)
    }

    /// Every group's newest record.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.groups.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Starts segment `first`: from a spare when its first chunk is small and one is ready
    /// (see [`Spares`]), else an empty file.
    pub(super) fn new_segment(&mut self, first: u64, small: bool) -> Result<(), StoreError> {
        // The directory's handles for the next sync first: once the file exists, a rollback
        // must be able to make its removal durable without a new descriptor.
        if self.dir_handles.is_empty() {
            self.dir_handles = open_dir_handles(&self.dir)?;
        }
        #[cfg(test)]
        if let Some(errno) = self.faults.new_segment {
            return Err(std::io::Error::from_raw_os_error(errno).into());
        }
        let path = self.dir.join(format!("{first:020}.seg"));
        let spare = self
            .spares
            .clone()
            .filter(|sp| small && sp.size == self.segment_bytes)
            .and_then(|sp| sp.take().map(|p| (p, sp)));
        if let Some((spare, sp)) = spare {
            // Opened before the rename: a spare that cannot be opened (no descriptor left)
            // stays a spare.
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&spare)
                .and_then(|file| std::fs::rename(&spare, &path).map(|()| file));
            match opened {
                Ok(file) => {
                    let mut seg = Segment::new(path, file, sp.size);
                    seg.from_spare = true;
                    self.segments.push(seg);
                    self.dir_dirty = true;
                    return Ok(());
                }
                Err(e) if crate::store::is_shortage(&e) => {
                    sp.put_back(spare);
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, spare = %spare.display(), "cannot use a spare segment: starting an empty one, and no more spares");
                    sp.unusable(&spare);
                }
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        self.segments.push(Segment::new(path, file, 0));
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes one chunk at the end of the last segment; returns its offset. On error nothing
    /// of it is left in the file (unless even cutting the file back failed: `write_failed`).
    pub(super) fn write_chunk(
        &mut self,
        magic: u32,
        first: u64,
        count: u32,
        body: &[Bytes],
    ) -> Result<u64, StoreError> {
        let body_len: usize = body.iter().map(Bytes::len).sum();
        if body_len > self.max_body {
            return Err(too_big(body_len, self.max_body));
        }
        let roll_at = self.segment_bytes;
        let inject = self.injected_write_failure();
        let seg = self.segments.last_mut().ok_or(StoreError::Unavailable)?;
        // The next sync's handle before anything is written: running out of descriptors then
        // fails this request, never the sync of what was written.
        seg.open_sync_file()?;
        let need = seg.len + (HEADER + body_len) as u64;
        if (body_len as u64) < ZERO_STEP && need + ZERO_STEP / 2 > seg.file_len {
            // Written zeros ahead of the data (see the module docs); never past the roll size.
            let end = (need + ZERO_STEP).min(roll_at.max(need));
            if end > need && end > seg.file_len {
                if let Err(e) = write_zeros(&seg.file, seg.file_len, end) {
                    seg.write_failed |= seg.file.set_len(seg.len).is_err();
                    seg.file_len = seg.len;
                    return Err(e.into());
                }
                seg.file_len = end;
            }
        }
        let h = header_of(magic, first, count, body_len, body);
        let off = seg.len;
        let end = off + (HEADER + body_len) as u64;
        // The aligned middle of a big chunk is left to the sync (see `DirectWrite`).
        let middle = if self.direct_writes && body_len >= DIRECT_MIN {
            let align = align() as u64;
            let (a, b) = (off.next_multiple_of(align), end / align * align);
            match seg.direct_file() {
                Ok(Some(file)) if a < b => Some((a, b, file)),
                Ok(_) => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let written = match middle {
            Some((a, b, file)) => {
                let (from, to) = ((a - off) as usize, (b - off) as usize);
                reserve(&file, a, b - a)
                    .and_then(|()| write_chunk_range(&seg.file, off, &h, body, 0, from))
                    .and_then(|()| write_chunk_range(&seg.file, b, &h, body, to, HEADER + body_len))
                    .and_then(|()| seg.file.seek(SeekFrom::Start(end)).map(drop))
                    .map(|()| {
                        let path = seg.path.clone();
                        let chunk = std::sync::Mutex::new(Some((h, body.to_vec())));
                        let d = DirectWrite {
                            file,
                            path,
                            offset: a,
                            from,
                            to,
                            chunk,
                            done: AtomicBool::new(false),
                        };
                        seg.direct.push((Arc::new(d), false))
                    })
            }
            None if inject => seg
                .file
                .write_all(&h[..HEADER / 2])
                .and_then(|()| Err(std::io::Error::from_raw_os_error(libc::ENOSPC))),
            None => write_all_parts(&mut seg.file, &h, body),
        };
        if let Err(e) = written {
            // Leave the file as it was: a partial chunk would poison later appends.
            seg.write_failed |= seg
                .file
                .set_len(seg.len)
                .and_then(|()| seg.file.seek(SeekFrom::Start(seg.len)).map(drop))
                .is_err();
            seg.file_len = seg.len;
            return Err(e.into());
        }
        seg.len = end;
        seg.file_len = seg.file_len.max(seg.len);
        let last = self.segments.len() - 1;
        self.unsynced_from = Some(self.unsynced_from.map_or(last, |k| k.min(last)));
        Ok(off)
    }

    /// Tests: whether this chunk write is to fail ([`Faults::chunks_ok`]).
    #[cfg(test)]
    pub(super) fn injected_write_failure(&mut self) -> bool {
        match &mut self.faults.chunks_ok {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(super) fn injected_write_failure(&mut self) -> bool {
        false
    }

    /// Reads chunk bodies from the one holding `from`, calling `f(first_seq, body)` until it
    /// returns false. A chunk failing its CRC (or too long to load) is reported as
    /// `Err((first, next_first))`.
    pub fn scan(
        &self,
        from: u64,
        mut f: impl FnMut(Result<(u64, Bytes), (u64, u64)>) -> bool,
    ) -> Result<(), StoreError> {
        let si = self
            .segments
            .partition_point(|s| s.chunks.first().is_some_and(|c| c.0 <= from))
            .saturating_sub(1);
        let mut h = [0u8; HEADER];
        for (n, seg) in self.segments.iter().enumerate().skip(si) {
            let ci = if n == si {
                seg.chunks
                    .partition_point(|c| c.0 <= from)
                    .saturating_sub(1)
            } else {
                0
            };
            for (k, &(first, off)) in seg.chunks.iter().enumerate().skip(ci) {
                let next_first = seg
                    .chunks
                    .get(k + 1)
                    .map(|c| c.0)
                    .or_else(|| {
                        self.segments
                            .get(n + 1)
                            .and_then(|s| s.chunks.first().map(|c| c.0))
                    })
                    .unwrap_or(self.last_seq + 1);
                if next_first <= from {
                    continue;
                }
                seg.file.read_exact_at(&mut h, off)?;
                let item = match parse_header(&h).filter(|hd| hd.body_len <= self.max_body) {
                    Some(hd) => {
                        let mut body = vec![0u8; hd.body_len];
                        seg.file.read_exact_at(&mut body, off + HEADER as u64)?;
                        if crc32fast::hash(&body) == hd.crc {
                            Ok((first, Bytes::from(body)))
                        } else {
                            Err((first, next_first))
                        }
                    }
                    None => Err((first, next_first)),
                };
                if !f(item) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Makes every append so far durable: fdatasync the segments written, fsync the directory
    /// if it gained a file.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let mut job = crate::store::SyncJob::default();
        self.take_sync(&mut job)?;
        job.run()
    }

    /// Opens what the next sync job needs and the log does not hold yet (normally nothing:
    /// writes open their segment's sync handle, a new segment the directory's; after
    /// [`SegmentLog::mark_dirty`], the handles of every segment). Changes nothing else, so a
    /// failure (no descriptor left) leaves the log as it was.
    pub fn prepare_sync(&mut self) -> Result<(), StoreError> {
        if let Some(from) = self.unsynced_from {
            for seg in self.segments.iter_mut().skip(from) {
                seg.open_sync_file()?;
            }
        }
        if self.dir_dirty && self.dir_handles.is_empty() {
            self.dir_handles = open_dir_handles(&self.dir)?;
        }
        Ok(())
    }

    /// Moves what a sync of this log must do into `job` (file handles to fdatasync, directories
    /// to fsync, direct writes to make) and marks the log clean, so the job can run on another
    /// thread while appends go on. If the job fails, call [`SegmentLog::mark_dirty`]. Fails
    /// only in [`SegmentLog::prepare_sync`], and then changes nothing.
    ///
    /// Each segment's handle is its own, opened on the store's thread before the first write
    /// after the previous take (so after that take, in job order), never a copy of the
    /// writer's: the kernel reports a write-back error once per open file, so with copies, a
    /// sync running at the same time could take the error and this one report success over
    /// lost pages. A handle opened before an error sees it; one opened after an error that
    /// another job's handle saw belongs to a younger job, which cannot settle before the one
    /// that failed (and fails with it). The job opens nothing: running out of descriptors can
    /// fail a request, never a sync.
    pub fn take_sync(&mut self, job: &mut crate::store::SyncJob) -> Result<(), StoreError> {
        self.prepare_sync()?;
        if let Some(from) = self.unsynced_from {
            // Every segment written since the last take (several, if big commits rolled more
            // than once meanwhile).
            for seg in self.segments.iter_mut().skip(from) {
                if let Some(file) = seg.sync_file.take() {
                    job.files.push((seg.path.clone(), file));
                }
                seg.direct.retain(|(d, _)| !d.is_done());
                for (d, taken) in seg.direct.iter_mut().filter(|(_, t)| !*t) {
                    job.direct.push(d.clone());
                    *taken = true;
                }
            }
            self.unsynced_from = None;
        }
        if self.dir_dirty {
            job.dirs.append(&mut self.dir_handles);
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// After a failed sync: everything must be synced again.
    pub fn mark_dirty(&mut self) {
        // Which jobs' writes were lost is unknown: every segment is synced again, and every
        // direct write not known done is made again.
        self.unsynced_from = (!self.segments.is_empty()).then_some(0);
        for seg in &mut self.segments {
            for (_, taken) in &mut seg.direct {
                *taken = false;
            }
        }
        self.dir_dirty = true;
    }

    /// The size at which segments roll ([`SEGMENT_BYTES`] unless configured smaller).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    /// Turns direct writes of big chunks on or off (on only where every commit is synced).
    pub fn set_direct_writes(&mut self, on: bool) {
        self.direct_writes = on;
    }

    /// Where new segments of small messages come from (see [`Spares`]).
    pub fn set_spares(&mut self, spares: Option<Arc<Spares>>) {
        self.spares = spares;
    }

    /// Whether appends since the last sync are pending.
    pub fn is_dirty(&self) -> bool {
        self.unsynced_from.is_some() || self.dir_dirty
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}
