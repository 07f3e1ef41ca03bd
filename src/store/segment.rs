//! A topic's log as append-only segment files (the segment-based storage of reference document
//! 001). Message data lives here, not in sled: sled keeps every written page resident (measured:
//! RSS grew ~1.3x the data written, whatever `cache_capacity`), while segment files leave caching
//! to the OS page cache, so broker memory stays bounded.
//!
//! ```text
//! <data_dir>/topics/<topic>/<first_seq:020>.seg     rolled at SEGMENT_BYTES
//! chunk = magic u32 | body_len u32 | first_seq u64 | count u32 | crc32(body) u32 | body
//!   "SLC1" messages:  body = version u8 | count u32 | (record_len u32 | record)*  (record.rs)
//!   "SLG1" a group's record (count 0, first_seq = the next message's seq):
//!                     body = name_len u16 | group name | MessagePack GroupRecord
//! ```
//! A group's cursor lives in its topic's log, so that one `fdatasync` makes a commit's
//! publishes and acks of that topic durable together (with the cursors in sled, a commit
//! holding both cost two fsyncs plus sled's flush). The newest record of a group wins; every
//! new segment starts with a copy of each group's current record, so a segment never needs an
//! older one (retention can drop whole segments).
//! An in-memory index (first seq → file offset per chunk) is rebuilt at open from the chunk
//! headers alone; the last segment's message chunks (and every group record) are CRC-checked
//! and a torn tail (a write cut by a crash, never acknowledged) is truncated. Durability: `sync`
//! fdatasyncs every segment written since the last sync, and fsyncs a directory that gained a
//! file; at open, the last two segments are fdatasynced (a crash may have cut a roll).
//!
//! A request of several chunks is all or nothing: [`SegmentLog::mark`] before it,
//! [`SegmentLog::rollback`] if a chunk fails (segments it started removed, the older one cut
//! back, the index as it was). Every file a sync needs is opened by the writes, on the store's
//! thread (a segment's sync handle by the first write after a sync was taken, a directory's
//! before a new segment is created): running out of descriptors fails the request that needed
//! one, never a sync. No chunk body over `MAX_BODY` is written (it could not be read back);
//! one left by an older version is skipped whole at open, not taken for the end of the log.
//!
//! Zero-filled tail: while chunks are small, the file is extended with written zeros
//! (`ZERO_STEP` at a time) ahead of the data, so that most appends overwrite blocks that are
//! already allocated, written and inside the file's length: their `fdatasync` then writes the
//! data and flushes, with no inode or block-map update. Measured on this machine's ext4
//! (42 KB appends): 380-440 µs per fdatasync appending past the end of the file, 250-315 µs into
//! space reserved with `fallocate(KEEP_SIZE)`, 170-225 µs over written zeros. Big chunks
//! (`ZERO_STEP` and up) skip it: for them the extra writes would cost more bandwidth than the
//! metadata update costs latency. At open, a tail of zeros after the last chunk is the unused
//! part of that reservation (no magic: where the scan stops); a tail with anything else in it
//! is a torn write and is truncated.
//!
//! Big chunks (`DIRECT_MIN` and up), where every commit is synced (`fsync = "always"`): the
//! store's thread writes only the chunk's unaligned ends; the 4 KiB-aligned middle is written
//! with `O_DIRECT` by the sync thread that makes the chunk durable, right before its
//! fdatasync (see `DirectWrite`). W5 (2,000 x 1 MiB, 7 interleaved runs each): 320-383 MB/s
//! with 5.2-6.2 s of broker CPU before, 587-815 MB/s with 1.5-2.6 s after. Until its sync ran the
//! chunk has a hole; nothing reads it then (reads stop at the durable seq), a crash leaves a
//! chunk that fails its CRC at open (cut off, with the unacknowledged chunks after it), and a
//! roll first makes the direct writes of the segment it leaves, so only the last segment, the
//! one fully checked at open, can hold such a chunk after a crash.

use super::StoreError;
use bytes::Bytes;
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MAGIC: u32 = 0x534C_4331;
const GROUP_MAGIC: u32 = 0x534C_4731;
/// Chunk header length.
pub const HEADER: usize = 24;
/// A segment file is rolled once it reaches this size.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How much written zero space is added ahead of small appends at a time (see the module docs).
const ZERO_STEP: u64 = 256 * 1024;
/// Zeros, written from here.
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
/// Largest chunk body accepted when reading (guards against a corrupt length).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Chunks with a body this large or larger are written with direct I/O by the sync that makes
/// them durable, when direct writes are on (see `DirectWrite`).
pub const DIRECT_MIN: usize = 256 * 1024;
/// Alignment of direct I/O (offsets, lengths and memory): the file system's block size, and at
/// least a memory page, so that the pages the store's thread writes through the page cache
/// never overlap a direct write.
fn align() -> usize {
    rustix::param::page_size().max(4096)
}

struct Segment {
    path: PathBuf,
    file: File,
    /// End of the chunks (where the next one goes).
    len: u64,
    /// The file's length: `len..file_len` holds zeros written ahead of the data.
    file_len: u64,
    /// (first seq, offset) of every chunk, in order.
    chunks: Vec<(u64, u64)>,
    /// Direct writes into this segment not known to be done, each with whether a sync job
    /// has it already.
    direct: Vec<(Arc<DirectWrite>, bool)>,
    /// The file opened with `O_DIRECT` (on the store's thread, so that running out of file
    /// descriptors fails one request there, not a sync); `None` until the first big chunk.
    direct_file: Option<Arc<File>>,
    /// The file system refused `O_DIRECT`: big chunks go through the page cache.
    no_direct: bool,
    /// A handle of its own for the next sync job, opened on the store's thread before the
    /// first write after the last sync was taken (see [`SegmentLog::take_sync`]).
    sync_file: Option<File>,
    /// Started from a spare ([`Spares`]): its zeros are allocated, written and durable.
    from_spare: bool,
    /// A failed write could not be cut back off the file: a rollback must cut it.
    write_failed: bool,
}

impl Segment {
    fn new(path: PathBuf, file: File, file_len: u64) -> Segment {
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
        }
    }

    /// Opens the handle the next sync job will use, unless open already.
    fn open_sync_file(&mut self) -> std::io::Result<()> {
        if self.sync_file.is_none() {
            self.sync_file = Some(open_for_sync(&self.path)?);
        }
        Ok(())
    }

    /// The `O_DIRECT` handle, opened on first use; `None` where the file system has no direct
    /// I/O (tmpfs, some FUSE).
    fn direct_file(&mut self) -> std::io::Result<Option<Arc<File>>> {
        if self.direct_file.is_none() && !self.no_direct {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.path)
            {
                Ok(f) => self.direct_file = Some(Arc::new(f)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(segment = %self.path.display(), "no direct I/O here: big chunks go through the page cache");
                    self.no_direct = true;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.direct_file.clone())
    }
}

/// The aligned middle of a big chunk, left out by the store's thread and written with direct
/// I/O (`O_DIRECT`) by the sync that makes the chunk durable; the chunk's unaligned ends go
/// through the page cache with the rest of the log. Its blocks are reserved (`fallocate`) by
/// the store's thread, so a full disk fails the request there, as a buffered write would.
///
/// Why: on this kind of machine a buffered write of 1 MiB plus `fdatasync` moves 400-700 MB/s
/// (page-cache copy, then write-back), a direct one 1.2-1.3 GB/s (`dd`), and writing on the
/// sync threads lets two such writes run at once while the store's thread goes on. Nothing
/// reads a chunk before its sync settled (reads stop at the durable seq), so the hole it has
/// meanwhile is never seen; a crash before the write leaves a chunk that fails its CRC and is
/// cut off at the next open with everything after it (none of which was acknowledged).
/// Whoever runs it first writes it (a sync thread, a full re-sync at shutdown or restart of
/// the store actor, a roll), once: the others wait for it and find it done.
pub(crate) struct DirectWrite {
    /// The file, opened with `O_DIRECT`.
    file: Arc<File>,
    /// Its path: the sync job's handle of this file writes the middle through the page cache
    /// should a direct write be refused.
    path: PathBuf,
    /// Where the aligned middle starts in the file.
    offset: u64,
    /// The aligned middle, as offsets into the chunk.
    from: usize,
    to: usize,
    /// The chunk (header, body parts shared with the request) until written.
    chunk: std::sync::Mutex<Option<([u8; HEADER], Vec<Bytes>)>>,
    done: AtomicBool,
}

thread_local! {
    /// A thread's aligned staging buffer, kept between direct writes.
    static DIRECT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DirectWrite {
    /// The segment file it writes into.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the bytes were written (not necessarily synced).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Writes the aligned middle (unless already done); durable after the next `fdatasync`
    /// of the file. Then lets go of the chunk's memory. `buffered` is a writable handle of the
    /// same file, used should the file system refuse the direct write (no file is opened
    /// here: running out of descriptors must not fail a sync).
    pub(crate) fn run(&self, buffered: &File) -> std::io::Result<()> {
        let mut chunk = self.chunk.lock().unwrap_or_else(|p| p.into_inner());
        let Some((head, parts)) = chunk.as_ref() else {
            return Ok(());
        };
        let (len, align) = (self.to - self.from, align());
        DIRECT_BUF.with(|cell| -> std::io::Result<()> {
            let mut buf = cell.borrow_mut();
            buf.clear();
            if buf.capacity() < len + align {
                *buf = Vec::with_capacity(len + align);
            }
            let skip = (align - buf.as_ptr() as usize % align) % align;
            buf.resize(skip, 0);
            for (_, piece) in chunk_range(head, parts, self.from, self.to) {
                buf.extend_from_slice(piece);
            }
            let data = &buf[skip..];
            match self.file.write_all_at(data, self.offset) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Direct I/O refused after all: the page cache then, which the sync's
                    // fdatasync covers all the same.
                    buffered.write_all_at(data, self.offset)?;
                }
                Err(e) => return Err(e),
            }
            if buf.capacity() > 8 * 1024 * 1024 {
                *buf = Vec::new();
            }
            Ok(())
        })?;
        *chunk = None;
        self.done.store(true, Ordering::Release);
        Ok(())
    }
}

/// How much of a segment's tail after its last chunk `open` checks for zeros (see
/// [`Spares`]).
const TAIL_CHECK: u64 = 1024 * 1024;

/// Segment files written with zeros and synced before any topic needs them: a new segment of
/// a topic with small messages is such a spare, renamed into place, so that the fdatasyncs of
/// its appends overwrite blocks that are allocated, written and durable, with no zeros of
/// their own to write back and no block allocation to commit.
///
/// Measured in the broker under W1 (`fsync always`): a sync ran 430-478 µs with zeros
/// written ahead of the data (every ~2.5th sync also wrote back 256 KiB of zeros and
/// committed their allocation), 252-331 µs in a segment zeroed and synced beforehand. A
/// background filler zeroing ahead in the live segment was slower instead (W1 -27%): every
/// sync then committed the block allocations it had just made, and a filler that synced the
/// live file could take a write-back error meant for a sync of data. A spare is a file of its
/// own: its fsync sees only its own errors, and it is synced before it is renamed.
///
/// Spares are made lazily, on a thread of their own, only for busy topics: none at start
/// (a fresh data dir stays a few hundred KiB, not 64 MiB), one when a topic of small messages
/// becomes busy (`BUSY_BYTES` written within `BUSY_WINDOW`), and then one for each next
/// segment, asked for when the current spare segment is three quarters full (or at once
/// after a roll that found none ready). A busy topic whose segment did not start from a spare
/// rolls early (from `EARLY_ROLL_MIN` of data on) once a spare is ready, so a busy topic's
/// first segment is small and its next ones are spares, and a spare made late costs only a
/// short segment without one. Making a spare writes and syncs 64 MiB, which slows the appends
/// while it runs (W1 -5.5% in 6 pairs with one made during the run, against +7.6% with none):
/// a fresh broker's first busy topic pays for it once, where an eager spare made at start
/// cost every data dir 64 MiB. A new segment without a ready spare (or of big messages, where
/// writing zeros would double the bytes written) starts empty, with zeros written ahead as
/// before. So a quiet topic never takes 64 MiB on disk.
///
/// At open, the tail after a segment's last valid chunk is checked for zeros over its first
/// `TAIL_CHECK` bytes only, not all 64 MiB of a spare, and the last segment is cut after what
/// was checked: further on, a power cut can have left the unacknowledged rest of a commit
/// (the disk may keep later blocks and lose earlier ones), which must not be read back once
/// new chunks reach it. A group record, always written at the next message's seq, must carry
/// that seq in the last segment. Spares left by an earlier run are removed, not reused (a
/// power cut can undo the rename of one already written to); a spare that cannot be renamed
/// into place is removed and no more are made; none is made with less than eight spare sizes
/// of disk free.
pub struct Spares {
    dir: PathBuf,
    size: u64,
    state: std::sync::Mutex<SpareState>,
    /// Whether a spare is ready, readable without the lock (checked by appends of busy
    /// topics whose segment is not a spare: see [`SegmentLog::roll_if_full`]).
    any_ready: AtomicBool,
}

#[derive(Default)]
struct SpareState {
    ready: Vec<PathBuf>,
    preparing: bool,
    next: u64,
    /// No more spares are made ([`Spares::unusable`]).
    broken: bool,
}

impl Spares {
    /// Opens the spare directory `dir` (creating it) and removes what an earlier run left
    /// there. No spare is made yet: the first busy topic asks for one
    /// ([`Spares::prepare_soon`]).
    ///
    /// Nothing left is reused: a spare renamed into a topic whose rename a power cut undid
    /// is back here with that topic's chunks in it (its appends' fdatasyncs had nothing of the
    /// rename to commit).
    pub fn open(dir: PathBuf, size: u64) -> std::io::Result<Arc<Spares>> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            std::fs::remove_file(entry.path())?;
        }
        Ok(Arc::new(Spares {
            dir,
            size,
            state: std::sync::Mutex::new(SpareState::default()),
            any_ready: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpareState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready spare, if any.
    fn take(&self) -> Option<PathBuf> {
        let mut st = self.lock();
        let spare = st.ready.pop();
        self.any_ready
            .store(!st.ready.is_empty(), Ordering::Release);
        spare
    }

    /// Whether a spare is ready (without taking the lock).
    fn is_ready(&self) -> bool {
        self.any_ready.load(Ordering::Acquire)
    }

    /// Tests: makes a spare now, on this thread.
    #[cfg(test)]
    fn make_one_now(&self) {
        let id = {
            let mut st = self.lock();
            st.next += 1;
            st.next - 1
        };
        let made = self.make(id).expect("make a spare");
        self.put_back(made);
    }

    /// Returns a spare taken but not used (it could not be opened).
    fn put_back(&self, spare: PathBuf) {
        let mut st = self.lock();
        st.ready.push(spare);
        self.any_ready.store(true, Ordering::Release);
    }

    /// A spare could not be put in place (say, `topics/` on another file system): it is
    /// removed, and no more are made.
    fn unusable(&self, spare: &Path) {
        let _ = std::fs::remove_file(spare);
        self.lock().broken = true;
    }

    /// Makes one more spare on a thread of its own, unless one is ready or being made.
    fn prepare_soon(self: &Arc<Self>) {
        let id = {
            let mut st = self.lock();
            if !st.ready.is_empty() || st.preparing || st.broken {
                return;
            }
            st.preparing = true;
            st.next += 1;
            st.next - 1
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-spare".into())
            .spawn(move || {
                let made = me.make(id);
                let mut st = me.lock();
                st.preparing = false;
                match made {
                    Ok(path) => {
                        st.ready.push(path);
                        me.any_ready.store(true, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare a spare segment: the next one starts empty")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start preparing a spare segment");
            self.lock().preparing = false;
        }
    }

    /// Writes spare `id`: zeros, synced, then renamed from `.tmp` to `.spare`. Through the page
    /// cache on purpose: appends rarely fill whole pages, and a page that is on disk but not
    /// in the cache must be read before part of it can be written (written with `O_DIRECT`,
    /// spares made W1 26% slower).
    fn make(&self, id: u64) -> std::io::Result<PathBuf> {
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        let done = self.dir.join(format!("{id:020}.spare"));
        // Never the last free space of the disk: appends and acks need it more.
        let st = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        if st.f_bavail.saturating_mul(st.f_frsize) < self.size.saturating_mul(8) {
            return Err(std::io::Error::other(
                "less than 8 spare sizes of free space",
            ));
        }
        let made = File::create(&tmp).and_then(|file| {
            write_zeros(&file, 0, self.size)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &done)
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(done)
    }
}

/// One topic's segment files.
pub struct SegmentLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    last_seq: u64,
    /// Each group's newest record (MessagePack), as last written.
    groups: std::collections::BTreeMap<String, Bytes>,
    /// Roll size ([`SEGMENT_BYTES`]; smaller in tests).
    segment_bytes: u64,
    /// Index of the first segment that may hold writes not yet handed to a sync.
    unsynced_from: Option<usize>,
    /// The directory gained or lost a file since the last sync was taken.
    dir_dirty: bool,
    /// Handles of the directory and its parent for the next sync job, opened with the file
    /// that made the directory dirty (see [`SegmentLog::take_sync`]).
    dir_handles: Vec<(PathBuf, File)>,
    /// A roll failed before every group record was copied into the new segment.
    copies_pending: bool,
    /// Big chunks leave their aligned middle to the sync ([`DirectWrite`]); only where a sync
    /// follows every commit.
    direct_writes: bool,
    /// Zeroed segments to start new ones from ([`Spares`]); only where a sync follows every
    /// commit.
    spares: Option<Arc<Spares>>,
    /// Largest chunk body written or loaded ([`MAX_BODY`]; smaller in tests).
    max_body: usize,
    /// Bytes of small chunks written since the log was opened, and where the current busy
    /// window started (time, bytes then): see [`Spares`].
    small_bytes: u64,
    busy_window: (std::time::Instant, u64),
    /// The topic wrote `BUSY_BYTES` within `BUSY_WINDOW`, or rolled: it gets spares.
    busy: bool,
    /// The spare for the next roll was asked for (reset at each roll).
    next_spare_asked: bool,
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

/// What a log looked like before a request, to undo the request should it fail part-way
/// ([`SegmentLog::mark`], [`SegmentLog::rollback`]). Plain numbers: taking one costs no
/// system call.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    segments: usize,
    /// The last segment's end of chunks, file length, chunk count, direct write count and
    /// whether it had a sync handle open.
    last: Option<(u64, u64, usize, usize, bool)>,
    last_seq: u64,
    unsynced_from: Option<usize>,
    dir_dirty: bool,
    dir_handles: bool,
    copies_pending: bool,
}

/// Written by a busy topic within `BUSY_WINDOW`, in chunks of small messages: the topic gets
/// spares ([`Spares`]).
const BUSY_BYTES: u64 = 1024 * 1024;
const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// A busy topic's segment that is not a spare rolls into a ready spare once it holds this much.
const EARLY_ROLL_MIN: u64 = 1024 * 1024;

/// Opens a segment file for a sync job: a handle of its own (see [`SegmentLog::take_sync`]),
/// writable for a direct write the file system refuses ([`DirectWrite::run`]).
fn open_for_sync(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).open(path)
}

/// Handles of `dir` and its parent, for a sync job to fsync.
fn open_dir_handles(dir: &Path) -> std::io::Result<Vec<(PathBuf, File)>> {
    let mut out = vec![(dir.to_owned(), File::open(dir)?)];
    if let Some(parent) = dir.parent() {
        out.push((parent.to_owned(), File::open(parent)?));
    }
    Ok(out)
}

/// The error for a chunk larger than can be read back.
fn too_big(body_len: usize, max: usize) -> StoreError {
    StoreError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "a stored chunk of {body_len} bytes would exceed the largest that can be read back \
             ({max} bytes): refused"
        ),
    ))
}

fn header_of(magic: u32, first: u64, count: u32, body_len: usize, body: &[Bytes]) -> [u8; HEADER] {
    let mut crc = crc32fast::Hasher::new();
    for part in body {
        crc.update(part);
    }
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&magic.to_be_bytes());
    h[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
    h[8..16].copy_from_slice(&first.to_be_bytes());
    h[16..20].copy_from_slice(&count.to_be_bytes());
    h[20..24].copy_from_slice(&crc.finalize().to_be_bytes());
    h
}

/// Writes the chunk header and its parts with as few `writev` calls as the kernel allows.
fn write_all_parts(file: &mut File, head: &[u8], parts: &[Bytes]) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(head));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = file.write_vectored(&rest[..rest.len().min(512)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// The pieces of bytes `from..to` of the chunk `head ++ parts`, each with its offset from
/// `from`.
fn chunk_range<'a>(
    head: &'a [u8],
    parts: &'a [Bytes],
    from: usize,
    to: usize,
) -> impl Iterator<Item = (usize, &'a [u8])> {
    let mut at = 0usize;
    std::iter::once(head)
        .chain(parts.iter().map(|p| &p[..]))
        .filter_map(move |part| {
            let (lo, hi) = (at.max(from), (at + part.len()).min(to));
            let piece = (lo < hi).then(|| (lo - from, &part[lo - at..hi - at]));
            at += part.len();
            piece
        })
}

/// Writes bytes `from..to` of the chunk `head ++ parts` at `pos` of `file` (through the page
/// cache).
fn write_chunk_range(
    file: &File,
    pos: u64,
    head: &[u8],
    parts: &[Bytes],
    from: usize,
    to: usize,
) -> std::io::Result<()> {
    chunk_range(head, parts, from, to)
        .try_for_each(|(rel, piece)| file.write_all_at(piece, pos + rel as u64))
}

/// Allocates `len` bytes of `file` from `offset` (growing it if needed), so that writing there
/// later cannot run out of space. A file system without `fallocate` allocates at the write.
fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        r => r.map_err(std::io::Error::from),
    }
}

fn seq_overflow() -> StoreError {
    StoreError::Io(std::io::Error::other("sequence numbers exhausted"))
}

/// A group chunk's body: `name_len u16 | name | record`.
fn group_body(name: &str, record: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(2 + name.len() + record.len());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(record);
    Bytes::from(b)
}

fn parse_group_body(body: &[u8]) -> Option<(String, Bytes)> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let name = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((name.to_string(), Bytes::copy_from_slice(&body[2 + n..])))
}

/// Writes zeros over `from..to` of `file` (not durable until the next sync).
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Whether `from..to` of `file` holds only zeros.
fn is_zero(file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; ZEROS.len()];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

struct Header {
    /// A group record rather than messages.
    group: bool,
    body_len: usize,
    first: u64,
    count: u32,
    crc: u32,
}

/// Reads the body of the chunk at `pos` into `body`; whether it passes its CRC.
fn read_body(file: &File, pos: u64, hd: &Header, body: &mut Vec<u8>) -> std::io::Result<bool> {
    body.resize(hd.body_len, 0);
    file.read_exact_at(body, pos + HEADER as u64)?;
    Ok(crc32fast::hash(body) == hd.crc)
}

fn parse_header(h: &[u8; HEADER]) -> Option<Header> {
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let group = match u32_at(0) {
        MAGIC => false,
        GROUP_MAGIC => true,
        _ => return None,
    };
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[8..16]);
    // Any length: a body longer than can be loaded is skipped whole, not taken for the end of
    // the log (older versions could write group records past `MAX_BODY`).
    Some(Header {
        group,
        body_len: u32_at(4) as usize,
        first: u64::from_be_bytes(first),
        count: u32_at(16),
        crc: u32_at(20),
    })
}

/// Whether the body of the chunk at `pos` passes its CRC, read a piece at a time (for bodies
/// too long to load whole).
fn body_crc_ok(file: &File, pos: u64, hd: &Header) -> std::io::Result<bool> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let (mut at, end) = (pos + HEADER as u64, pos + (HEADER + hd.body_len) as u64);
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        crc.update(&buf[..n]);
        at += n as u64;
    }
    Ok(crc.finalize() == hd.crc)
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, rebuilding the index.
    pub fn open(dir: &Path) -> Result<SegmentLog, StoreError> {
        Self::open_with(dir, MAX_BODY)
    }

    /// [`SegmentLog::open`] with a smaller largest chunk (tests).
    fn open_with(dir: &Path, max_body: usize) -> Result<SegmentLog, StoreError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let first = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()
                    .filter(|f: &u64| *f > 0)?;
                Some((first, p))
            })
            .collect();
        names.sort();
        let n = names.len();
        let mut log = SegmentLog {
            dir: dir.to_owned(),
            segments: Vec::new(),
            last_seq: 0,
            groups: std::collections::BTreeMap::new(),
            segment_bytes: SEGMENT_BYTES,
            unsynced_from: None,
            // A directory without segments may be new (its creation not yet durable: a
            // request that created it failed); fsynced with the first segment.
            dir_dirty: created || n == 0,
            dir_handles: Vec::new(),
            copies_pending: false,
            direct_writes: false,
            spares: None,
            max_body,
            small_bytes: 0,
            busy_window: (std::time::Instant::now(), 0),
            busy: false,
            next_spare_asked: false,
            #[cfg(test)]
            faults: Faults::default(),
        };
        for (i, (first, path)) in names.into_iter().enumerate() {
            let last_segment = i + 1 == n;
            let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
            let file_len = file.metadata()?.len();
            let mut seg = Segment::new(path, file.try_clone()?, file_len);
            let mut pos = 0u64;
            let mut expect = first;
            let mut h = [0u8; HEADER];
            let mut body = Vec::new();
            while pos + HEADER as u64 <= file_len {
                file.read_exact_at(&mut h, pos)?;
                let Some(hd) = parse_header(&h) else { break };
                let end = pos + (HEADER + hd.body_len) as u64;
                if end > file_len {
                    break;
                }
                if hd.group && last_segment && hd.first != expect {
                    // A group record is always written at the next message's seq: this one
                    // is left from before a crash (see `Spares`), not part of the log.
                    break;
                }
                if hd.group && hd.body_len > max_body {
                    // Too long to load (written by an older version): skipped whole, so the
                    // chunks after it are still read; the group keeps its previous record.
                    if body_crc_ok(&file, pos, &hd)? {
                        tracing::error!(segment = %seg.path.display(), offset = pos, len = hd.body_len, "group record too large to load: skipped (the group keeps its previous record)");
                    } else if last_segment {
                        break;
                    } else {
                        tracing::error!(segment = %seg.path.display(), offset = pos, "corrupt group record skipped");
                    }
                    pos = end;
                    continue;
                }
                if hd.group {
                    match read_body(&file, pos, &hd, &mut body)?
                        .then(|| parse_group_body(&body))
                        .flatten()
                    {
                        Some((name, rec)) => {
                            log.groups.insert(name, rec);
                        }
                        // A torn write at the tail; further back, an older copy of a record a
                        // later segment repeats.
                        None if last_segment => break,
                        None => {
                            tracing::error!(segment = %seg.path.display(), offset = pos, "corrupt group record skipped");
                        }
                    }
                    pos = end;
                    continue;
                }
                if hd.first != expect || hd.count == 0 {
                    break;
                }
                if last_segment {
                    // Only the tail can hold a write cut by a crash (a roll first makes the
                    // direct writes of the segment it leaves): check it fully.
                    let ok = if hd.body_len > max_body {
                        body_crc_ok(&file, pos, &hd)?
                    } else {
                        read_body(&file, pos, &hd, &mut body)?
                    };
                    if !ok {
                        break;
                    }
                }
                let Some(next) = hd.first.checked_add(hd.count as u64) else {
                    break;
                };
                seg.chunks.push((hd.first, pos));
                expect = next;
                pos = end;
            }
            if pos < file_len && is_zero(&file, pos, file_len.min(pos + TAIL_CHECK))? {
                // The unused part of the zeros written ahead: kept for the next appends, up to
                // what was checked (a crash can leave unacknowledged chunks further on, after
                // a stretch of zeros, which a later open must not read as part of the log).
                if last_segment && file_len > pos + TAIL_CHECK {
                    file.set_len(pos + TAIL_CHECK)?;
                    file.sync_all()?;
                    seg.file_len = pos + TAIL_CHECK;
                }
            } else if pos < file_len {
                if last_segment {
                    tracing::warn!(segment = %seg.path.display(), valid = pos, len = file_len, "truncating a torn tail (an unacknowledged write cut by a crash)");
                    file.set_len(pos)?;
                    file.sync_all()?;
                    seg.file_len = pos;
                } else {
                    tracing::error!(segment = %seg.path.display(), valid = pos, len = file_len, "corrupt segment: messages after this offset are not served");
                }
            }
            if i + 2 >= n {
                // What a crash left in the page cache was never acknowledged, but once served
                // (and acked by a consumer) it must not vanish in a later power cut, taking its
                // seqs with it: make the tail durable before anything is read from it (the
                // segment before the last too: a crash during a roll leaves both unsynced).
                file.sync_data()?;
            }
            file.seek(SeekFrom::Start(pos))?;
            seg.len = pos;
            if !seg.chunks.is_empty() || last_segment {
                log.last_seq = log.last_seq.max(expect.saturating_sub(1));
                log.segments.push(seg);
            }
        }
        if n > 0 {
            File::open(dir)?.sync_all()?;
        }
        Ok(log)
    }

    /// Last stored seq (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Appends one chunk `body` holding `count` messages from `last_seq + 1`. Not durable until
    /// [`SegmentLog::sync`]. On error the chunk is not in the log, but a roll it started may
    /// be: a request of several chunks undoes itself with [`SegmentLog::rollback`].
    pub fn append_chunk(&mut self, count: u32, body: &[Bytes]) -> Result<u64, StoreError> {
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

    fn next_seq(&self) -> Result<u64, StoreError> {
        self.last_seq.checked_add(1).ok_or_else(seq_overflow)
    }

    /// Counts a chunk of small messages towards the busy test; a topic found busy asks for a
    /// spare (see [`Spares`]). No system call but a clock read once per `BUSY_BYTES`.
    fn note_small_write(&mut self, n: u64) {
        self.small_bytes += n;
        if self.busy {
            // The next spare once the current one is three quarters full: made earlier, its
            // writes slow the appends for longer; made later, the next segment may start
            // without it (and then moves to it early, see `early_roll`).
            if !self.next_spare_asked
                && self
                    .segments
                    .last()
                    .is_some_and(|s| s.from_spare && s.len >= self.segment_bytes / 4 * 3)
            {
                self.next_spare_asked = true;
                if let Some(sp) = &self.spares {
                    sp.prepare_soon();
                }
            }
            return;
        }
        if self.small_bytes - self.busy_window.1 < BUSY_BYTES {
            return;
        }
        let Some(sp) = &self.spares else { return };
        let now = std::time::Instant::now();
        if now.duration_since(self.busy_window.0) <= BUSY_WINDOW {
            self.busy = true;
            sp.prepare_soon();
        } else {
            self.busy_window = (now, self.small_bytes);
        }
    }

    /// Whether the last segment `s`, of a busy topic and not from a spare, rolls into a spare
    /// that is ready (see [`Spares`]).
    fn early_roll(&self, s: &Segment) -> bool {
        self.busy
            && !s.from_spare
            && s.len >= EARLY_ROLL_MIN.min(self.segment_bytes)
            && self
                .spares
                .as_ref()
                .is_some_and(|sp| sp.size == self.segment_bytes && sp.is_ready())
    }

    /// Starts a new segment (named `first`) when there is none or the last one is full (or a
    /// busy topic can move to a spare), and makes sure it starts with a copy of every group's
    /// record (see the module docs). A segment without messages is never rolled: its
    /// successor would get its name.
    fn roll_if_full(&mut self, first: u64, small: bool) -> Result<(), StoreError> {
        let roll = match self.segments.last() {
            None => true,
            Some(s) => {
                !s.chunks.is_empty()
                    && (s.len >= self.segment_bytes || (small && self.early_roll(s)))
            }
        };
        if roll {
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
                if let (Some(sp), false) = (&self.spares, from_spare) {
                    sp.prepare_soon();
                }
            }
        }
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
    fn new_segment(&mut self, first: u64, small: bool) -> Result<(), StoreError> {
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
                Err(e) if super::is_shortage(&e) => {
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
    fn write_chunk(
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
    fn injected_write_failure(&mut self) -> bool {
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
    fn injected_write_failure(&mut self) -> bool {
        false
    }

    /// The log's state before a request, for [`SegmentLog::rollback`]. No system call.
    pub fn mark(&self) -> Mark {
        Mark {
            segments: self.segments.len(),
            last: self.segments.last().map(|s| {
                (
                    s.len,
                    s.file_len,
                    s.chunks.len(),
                    s.direct.len(),
                    s.sync_file.is_some(),
                )
            }),
            last_seq: self.last_seq,
            unsynced_from: self.unsynced_from,
            dir_dirty: self.dir_dirty,
            dir_handles: !self.dir_handles.is_empty(),
            copies_pending: self.copies_pending,
        }
    }

    /// Undoes everything written since `mark` (a request that failed part-way), so that none
    /// of it is ever read and its seqs go to the next request: the segments it started are
    /// removed (with the directory fsynced at once, before anything more is written to the
    /// older segment, so that no power cut can bring one back beside it), the older segment
    /// is cut back to where it ended, and the index, the last seq, the group-record copies
    /// and the direct writes are as they were. Cutting the file back is made durable by the
    /// next sync of the log, which the request's error reply must wait for (see the store
    /// actor). An error means the log could not be brought back: the store must refuse
    /// writes from then on.
    pub fn rollback(&mut self, mark: Mark) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let undo = |what: &str, e: std::io::Error| {
            StoreError::Inconsistent(format!(
                "undoing a failed request in {}: {what}: {e}",
                dir.display()
            ))
        };
        let mut removed = false;
        while self.segments.len() > mark.segments {
            let Some(seg) = self.segments.pop() else {
                break;
            };
            // Emptied through the handle first: should the unlink fail, nothing of the
            // request can be read back from it.
            let emptied = seg.file.set_len(0);
            let path = seg.path.clone();
            drop(seg);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(undo(
                        &format!("removing {} (emptied: {})", path.display(), emptied.is_ok()),
                        e,
                    ))
                }
            }
            removed = true;
        }
        if removed {
            let synced = match self.dir_handles.iter().find(|(p, _)| *p == self.dir) {
                Some((_, f)) => f.sync_all(),
                None => File::open(&self.dir).and_then(|f| f.sync_all()),
            };
            synced.map_err(|e| undo("fsync of the directory", e))?;
        }
        let mut unsynced_from = mark.unsynced_from;
        if let (Some((len, file_len, chunks, direct, had_sync)), Some(i)) =
            (mark.last, self.segments.len().checked_sub(1))
        {
            let seg = &mut self.segments[i];
            let touched = seg.len != len || seg.file_len != file_len || seg.write_failed;
            seg.chunks.truncate(chunks);
            seg.direct.truncate(direct);
            if touched {
                let cut = seg
                    .file
                    .set_len(len)
                    .and_then(|()| seg.file.seek(SeekFrom::Start(len)).map(drop));
                if let Err(e) = cut {
                    return Err(undo(
                        &format!("cutting {} back to {len} bytes", seg.path.display()),
                        e,
                    ));
                }
                seg.len = len;
                seg.file_len = len;
                seg.write_failed = false;
                // The cut must reach the disk before the request's error is answered.
                unsynced_from = Some(unsynced_from.map_or(i, |k| k.min(i)));
            } else if !had_sync {
                seg.sync_file = None;
            }
        }
        self.last_seq = mark.last_seq;
        self.copies_pending = mark.copies_pending;
        self.unsynced_from = unsynced_from;
        self.dir_dirty = mark.dir_dirty;
        if !mark.dir_handles && !self.dir_dirty {
            self.dir_handles.clear();
        }
        Ok(())
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
        let mut job = super::SyncJob::default();
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
    pub fn take_sync(&mut self, job: &mut super::SyncJob) -> Result<(), StoreError> {
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

/// Used by tests: reads a whole file.
#[cfg(test)]
pub(crate) fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(log: &SegmentLog, from: u64) -> Vec<Result<u64, (u64, u64)>> {
        let mut out = Vec::new();
        log.scan(from, |r| {
            out.push(r.map(|(f, _)| f));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn append_scan_reopen_and_truncate_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        {
            let mut log = SegmentLog::open(&p).unwrap();
            assert_eq!(
                log.append_chunk(3, &[Bytes::from_static(b"abc")]).unwrap(),
                1
            );
            assert_eq!(
                log.append_chunk(2, &[Bytes::from_static(b"d"), Bytes::from_static(b"e")])
                    .unwrap(),
                4
            );
            log.sync().unwrap();
            assert_eq!(collect(&log, 1), vec![Ok(1), Ok(4)]);
            assert_eq!(collect(&log, 4), vec![Ok(4)]);
            assert_eq!(collect(&log, 5), vec![Ok(4)]);
            assert_eq!(collect(&log, 6), vec![]);
        }
        // A torn write at the end: half a chunk.
        let seg = p.join(format!("{:020}.seg", 1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&header_of(MAGIC, 6, 1, 4, &[Bytes::from_static(b"zzzz")])[..10])
            .unwrap();
        drop(f);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 5);
        assert_eq!(read_all(&seg).len() as u64, log.size());
        assert_eq!(collect(&log, 1).len(), 2);
    }

    fn pattern(n: usize, salt: u8) -> Bytes {
        Bytes::from((0..n).map(|i| (i % 251) as u8 ^ salt).collect::<Vec<u8>>())
    }

    /// A log with direct writes on holding a small chunk (so the big one starts unaligned), a
    /// big chunk in two parts and a small chunk, nothing synced yet.
    fn log_with_a_big_chunk(p: &Path) -> (SegmentLog, Vec<Bytes>) {
        let mut log = SegmentLog::open(p).unwrap();
        log.set_direct_writes(true);
        log.append_chunk(1, &[Bytes::from_static(b"small")])
            .unwrap();
        let big = vec![pattern(1000, 1), pattern(DIRECT_MIN + 5000, 2)];
        assert_eq!(log.append_chunk(1, &big).unwrap(), 2);
        log.append_chunk(1, &[Bytes::from_static(b"after")])
            .unwrap();
        (log, big)
    }

    fn bodies(log: &SegmentLog) -> Vec<Result<(u64, Bytes), (u64, u64)>> {
        let mut out = Vec::new();
        log.scan(1, |r| {
            out.push(r);
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn the_sync_writes_the_middle_of_a_big_chunk_directly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let (mut log, big) = log_with_a_big_chunk(&p);
        // Before its sync the chunk has a hole (nothing reads it then: reads stop at the
        // durable seq).
        assert_eq!(bodies(&log)[1], Err((2, 3)));
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!(job.direct.len(), 1);
        let d = job.direct[0].clone();
        job.run().unwrap();
        assert!(d.is_done());
        assert!(
            d.chunk.lock().unwrap().is_none(),
            "the payload is let go once written"
        );
        let whole: Vec<u8> = big.iter().flat_map(|b| b.iter().copied()).collect();
        let check = |log: &SegmentLog| {
            let got = bodies(log);
            assert!(got.len() >= 3);
            assert_eq!(got[0].as_ref().unwrap().1, Bytes::from_static(b"small"));
            assert_eq!(got[1].as_ref().unwrap().1, Bytes::from(whole.clone()));
            assert_eq!(got[2].as_ref().unwrap().1, Bytes::from_static(b"after"));
        };
        check(&log);
        // The next sync has no direct write left to make.
        let mut next = crate::store::SyncJob::default();
        log.append_chunk(1, &[Bytes::from_static(b"more")]).unwrap();
        log.take_sync(&mut next).unwrap();
        assert!(next.direct.is_empty());
        next.run().unwrap();
        drop(log);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 4);
        check(&log);
    }

    #[test]
    fn a_busy_topic_gets_spares_and_a_quiet_one_none() {
        const SIZE: u64 = 4 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::open(dir.path().join("spare"), SIZE).unwrap();
        let spare_files = || std::fs::read_dir(dir.path().join("spare")).unwrap().count();
        assert_eq!(spare_files(), 0, "none made at open");
        let p = dir.path().join("t");
        let seg = |first: u64| p.join(format!("{first:020}.seg"));
        let wait_ready = |what: &str| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !spares.is_ready() {
                assert!(std::time::Instant::now() < deadline, "no spare made {what}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let mut log = SegmentLog::open(&p).unwrap();
        log.segment_bytes = SIZE;
        log.set_spares(Some(spares.clone()));
        // Quiet: a few small chunks ask for no spare, and the segment grows by zero steps.
        for _ in 0..3 {
            log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
        }
        assert!(
            file_len(&seg(1)) < 2 * ZERO_STEP,
            "only the zeros written ahead"
        );
        assert!(!log.busy && !spares.lock().preparing && spare_files() == 0);
        // Busy (a MiB within a second): a spare is made, and the next chunk once it is ready
        // starts the next segment from it, early.
        let mut n = 3;
        while !log.busy {
            n += 1;
            assert!(n < 1000, "5 MB written and the topic is not busy");
            log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
        }
        wait_ready("for a busy topic");
        n += 1;
        log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
        assert_eq!(log.segments.len(), 2, "rolled early into the spare");
        assert!(log.segments[1].from_spare);
        assert_eq!(file_len(&seg(n)), SIZE, "the new segment is the spare");
        // The next one is asked for once the spare segment is three quarters full, and the
        // segment, once full, rolls into it.
        assert!(!spares.lock().preparing && !spares.is_ready());
        while log.segments[1].len < SIZE / 4 * 3 {
            n += 1;
            log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
        }
        wait_ready("at three quarters");
        while log.segments.len() == 2 {
            n += 1;
            log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
        }
        assert!(log.segments[2].from_spare);
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), n);
        assert!(bodies(&log).iter().all(Result::is_ok));
    }

    #[test]
    fn at_open_the_last_segment_keeps_only_the_checked_zeros_and_no_stale_group_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let seg = p.join(format!("{:020}.seg", 1));
        let end = {
            let mut log = SegmentLog::open(&p).unwrap();
            log.put_group("g", Bytes::from_static(b"now")).unwrap();
            log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
            log.sync().unwrap();
            log.segments[0].len
        };
        // Left by a crash: 2 MiB of zeros, then an old group record and an old chunk.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(end + 4 * TAIL_CHECK).unwrap();
        let old = group_body("g", b"old");
        let at = end + 2 * TAIL_CHECK;
        f.write_all_at(
            &header_of(GROUP_MAGIC, 2, 0, old.len(), std::slice::from_ref(&old)),
            at,
        )
        .unwrap();
        f.write_all_at(&old, at + HEADER as u64).unwrap();
        drop(f);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 1);
        assert_eq!(
            file_len(&seg),
            end + TAIL_CHECK,
            "cut after what was checked"
        );
        assert_eq!(log.group("g").map(|b| &b[..]), Some(&b"now"[..]));
        drop(log);
        // A stale group record right after the data (a seq that is not the next one) ends the
        // log there: the tail is torn and cut.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        let stale = header_of(GROUP_MAGIC, 7, 0, old.len(), std::slice::from_ref(&old));
        f.write_all_at(&stale, end).unwrap();
        f.write_all_at(&old, end + HEADER as u64).unwrap();
        drop(f);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.group("g").map(|b| &b[..]), Some(&b"now"[..]));
        assert_eq!(file_len(&seg), end, "torn tail truncated");
    }

    #[test]
    fn a_spare_that_cannot_be_put_in_place_stops_the_spares() {
        const SIZE: u64 = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::open(dir.path().join("spare"), SIZE).unwrap();
        spares.make_one_now();
        // Gone from under us: the rename fails.
        for e in std::fs::read_dir(dir.path().join("spare")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let p = dir.path().join("t");
        let mut log = SegmentLog::open(&p).unwrap();
        log.segment_bytes = SIZE;
        log.set_spares(Some(spares.clone()));
        log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
        assert_eq!(log.last_seq(), 1, "the segment started empty instead");
        assert!(spares.lock().broken);
        spares.prepare_soon();
        assert!(!spares.lock().preparing, "no more spares are made");
    }

    #[test]
    fn a_big_first_chunk_does_not_take_a_spare_and_leftovers_are_cleaned() {
        const SIZE: u64 = 512 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("spare");
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::write(sdir.join("00000000000000000007.tmp"), b"half made").unwrap();
        std::fs::write(sdir.join("00000000000000000003.spare"), b"wrong size").unwrap();
        let spares = Spares::open(sdir.clone(), SIZE).unwrap();
        assert_eq!(
            std::fs::read_dir(&sdir).unwrap().count(),
            0,
            "leftovers removed, none made"
        );
        spares.make_one_now();
        let p = dir.path().join("t");
        let mut log = SegmentLog::open(&p).unwrap();
        log.segment_bytes = SIZE;
        log.set_spares(Some(spares));
        log.append_chunk(1, &[pattern(DIRECT_MIN, 1)]).unwrap();
        assert!(file_len(&p.join(format!("{:020}.seg", 1))) < SIZE);
        assert_eq!(
            std::fs::read_dir(&sdir).unwrap().count(),
            1,
            "the spare is still there"
        );
    }

    #[test]
    fn a_crash_before_the_direct_write_cuts_the_chunk_and_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        // Written, never synced: what a kill -9 leaves in the page cache.
        drop(log_with_a_big_chunk(&p));
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(
            log.last_seq(),
            1,
            "the unacknowledged chunks after the hole are cut"
        );
        assert_eq!(bodies(&log).len(), 1);
        assert_eq!(
            read_all(&p.join(format!("{:020}.seg", 1))).len() as u64,
            log.size()
        );
    }

    #[test]
    fn a_roll_makes_the_direct_writes_of_the_segment_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        {
            let (mut log, _) = log_with_a_big_chunk(&p);
            log.segment_bytes = 1000;
            // Rolls: the first segment's direct write is made on the way.
            log.append_chunk(1, &[Bytes::from_static(b"next")]).unwrap();
            assert_eq!(log.segments.len(), 2);
        }
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 4);
        assert!(bodies(&log).iter().all(Result::is_ok));
    }

    #[test]
    fn a_failed_roll_leaves_the_direct_writes_to_the_sync_of_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let (mut log, _) = log_with_a_big_chunk(&p);
        // The big chunk's direct write will fail: its handle cannot write.
        let seg = log.segments.last_mut().unwrap();
        let d = seg.direct[0].0.clone();
        let chunk = d.chunk.lock().unwrap().clone();
        seg.direct[0].0 = Arc::new(DirectWrite {
            file: Arc::new(File::open(&seg.path).unwrap()),
            path: d.path.clone(),
            offset: d.offset,
            from: d.from,
            to: d.to,
            chunk: std::sync::Mutex::new(chunk),
            done: AtomicBool::new(false),
        });
        log.segment_bytes = 1000;
        assert!(log.append_chunk(1, &[Bytes::from_static(b"next")]).is_err());
        // The sync of the chunks already written still has to make it, and fails.
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!(job.direct.len(), 1);
        assert!(job.run().is_err());
    }

    #[test]
    fn a_full_resync_makes_the_direct_writes_a_lost_job_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let (mut log, _) = log_with_a_big_chunk(&p);
        // A sync thread took the job and never ran it (the store restarted meanwhile).
        let mut lost = crate::store::SyncJob::default();
        log.take_sync(&mut lost).unwrap();
        drop(lost);
        log.mark_dirty();
        log.sync().unwrap();
        assert!(bodies(&log).iter().all(Result::is_ok));
        drop(log);
        assert_eq!(SegmentLog::open(&p).unwrap().last_seq(), 3);
    }

    fn file_len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    #[test]
    fn group_records_survive_reopen_and_ride_along_into_new_segments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        {
            let mut log = SegmentLog::open(&p).unwrap();
            // A group before any message: the first segment is created for it.
            log.put_group("g1", Bytes::from_static(b"one")).unwrap();
            log.segment_bytes = 200;
            log.append_chunk(1, &[Bytes::from(vec![7u8; 150])]).unwrap();
            log.put_group("g2", Bytes::from_static(b"two")).unwrap();
            log.put_group("g1", Bytes::from_static(b"one-b")).unwrap();
            // Past 200 bytes: the next chunk rolls, and the new segment starts with both records.
            log.append_chunk(2, &[Bytes::from(vec![8u8; 300])]).unwrap();
            log.sync().unwrap();
            assert_eq!(log.segments.len(), 2);
            assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
        }
        // The first segment alone would no longer be needed for the groups.
        std::fs::remove_file(p.join(format!("{:020}.seg", 1))).unwrap();
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 3);
        assert_eq!(log.group("g1").unwrap().as_ref(), b"one-b");
        assert_eq!(log.group("g2").unwrap().as_ref(), b"two");
        assert_eq!(collect(&log, 2), vec![Ok(2)]);
    }

    #[test]
    fn a_sync_covers_every_segment_written_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(&dir.path().join("t")).unwrap();
        log.segment_bytes = 200;
        // Four chunks of 300 bytes: four segments, none synced yet.
        for _ in 0..4 {
            log.append_chunk(1, &[Bytes::from(vec![1u8; 300])]).unwrap();
        }
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!(job.files.len(), 4);
        log.append_chunk(1, &[Bytes::from(vec![1u8; 300])]).unwrap();
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!(job.files.len(), 1, "only the segment written since");
        log.mark_dirty();
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!(job.files.len(), 5, "after a failure, all of them again");
    }

    #[test]
    fn zeros_written_ahead_are_kept_and_a_torn_group_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let seg = p.join(format!("{:020}.seg", 1));
        {
            let mut log = SegmentLog::open(&p).unwrap();
            log.append_chunk(1, &[Bytes::from_static(b"m")]).unwrap();
            log.put_group("g", Bytes::from_static(b"r1")).unwrap();
            log.sync().unwrap();
            assert!(file_len(&seg) >= ZERO_STEP, "zeros written ahead");
        }
        let data_end = {
            let log = SegmentLog::open(&p).unwrap();
            assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
            assert!(file_len(&seg) >= ZERO_STEP, "a tail of zeros is kept");
            log.segments[0].len
        };
        // A torn group record in the zeros: only its first bytes made it.
        let h = header_of(GROUP_MAGIC, 2, 0, 5, &[group_body("g", b"r2")]);
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&h, data_end).unwrap();
        drop(f);
        let mut log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
        assert_eq!(file_len(&seg), data_end, "torn tail truncated");
        log.put_group("g", Bytes::from_static(b"r3")).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"n")]).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.group("g").unwrap().as_ref(), b"r3");
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
    }

    #[test]
    fn corrupt_chunk_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut log = SegmentLog::open(&p).unwrap();
        log.append_chunk(2, &[Bytes::from_static(b"hello")])
            .unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"world")])
            .unwrap();
        let seg = p.join(format!("{:020}.seg", 1));
        let mut bytes = read_all(&seg);
        bytes[HEADER] ^= 0xff; // first chunk's body
        std::fs::write(&seg, &bytes).unwrap();
        assert_eq!(collect(&log, 1), vec![Err((1, 3)), Ok(3)]);
    }

    #[test]
    fn a_request_failing_part_way_is_undone_entirely() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let seg = p.join(format!("{:020}.seg", 1));
        let mut log = SegmentLog::open(&p).unwrap();
        log.append_chunk(2, &[Bytes::from_static(b"ab")]).unwrap();
        log.put_group("g", Bytes::from_static(b"r1")).unwrap();
        log.sync().unwrap();
        let len = log.segments[0].len;
        let mark = log.mark();
        // A request of three chunks: the third fails after writing part of itself.
        log.faults.chunks_ok = Some(2);
        log.append_chunk(1, &[Bytes::from_static(b"x")]).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"y")]).unwrap();
        let e = log
            .append_chunk(1, &[Bytes::from_static(b"z")])
            .unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        log.rollback(mark).unwrap();
        log.faults.chunks_ok = None;
        assert_eq!(log.last_seq(), 2);
        assert_eq!(collect(&log, 1), vec![Ok(1)]);
        assert_eq!(file_len(&seg), len, "cut back to where the request started");
        // The cut is made durable by the next sync (the error reply waits for it).
        assert!(log.is_dirty());
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!((job.files.len(), job.dirs.len()), (1, 0));
        job.run().unwrap();
        // The seqs go to the next request.
        assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"w")]).unwrap(), 3);
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 3);
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(3)]);
        assert_eq!(
            bodies(&log)[1].as_ref().unwrap().1,
            Bytes::from_static(b"w")
        );
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    }

    #[test]
    fn a_request_failing_after_a_roll_removes_the_segment_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut log = SegmentLog::open(&p).unwrap();
        log.segment_bytes = 300;
        log.put_group("g", Bytes::from_static(b"r1")).unwrap();
        log.append_chunk(1, &[Bytes::from(vec![1u8; 200])]).unwrap();
        log.sync().unwrap();
        let len = log.segments[0].len;
        let mark = log.mark();
        // The second chunk rolls (the first filled the segment); the new segment gets its
        // copy of g's record, then the chunk fails.
        log.faults.chunks_ok = Some(2);
        log.append_chunk(1, &[Bytes::from(vec![2u8; 100])]).unwrap();
        assert!(log.append_chunk(1, &[Bytes::from(vec![3u8; 100])]).is_err());
        assert_eq!(log.segments.len(), 2, "the roll happened");
        let started = log.segments[1].path.clone();
        log.rollback(mark).unwrap();
        log.faults.chunks_ok = None;
        assert!(
            !started.exists(),
            "the segment the request started is removed"
        );
        assert_eq!((log.segments.len(), log.segments[0].len), (1, len));
        assert_eq!(log.last_seq(), 1);
        assert!(!log.copies_pending);
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
        // Writing goes on where the request started.
        assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"n")]).unwrap(), 2);
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    }

    #[test]
    fn a_new_segment_without_a_descriptor_fails_the_request_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut log = SegmentLog::open(&p).unwrap();
        let mark = log.mark();
        log.faults.new_segment = Some(libc::EMFILE);
        let e = log
            .append_chunk(1, &[Bytes::from_static(b"a")])
            .unwrap_err();
        assert!(e.is_shortage(), "{e}");
        log.rollback(mark).unwrap();
        log.faults.new_segment = None;
        assert_eq!(std::fs::read_dir(&p).unwrap().count(), 0);
        assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"a")]).unwrap(), 1);
        // The sync of the first segment also makes the new directory durable.
        let mut job = crate::store::SyncJob::default();
        log.take_sync(&mut job).unwrap();
        assert_eq!((job.files.len(), job.dirs.len()), (1, 2));
        job.run().unwrap();
    }

    #[test]
    fn a_chunk_larger_than_can_be_read_back_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut log = SegmentLog::open_with(&p, 1000).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"a")]).unwrap();
        log.put_group("g", Bytes::from_static(b"r1")).unwrap();
        let len = log.segments[0].len;
        let e = log
            .put_group("g", Bytes::from(vec![7u8; 2000]))
            .unwrap_err();
        assert!(e.to_string().contains("read back"), "{e}");
        let e = log
            .append_chunk(
                1,
                &[Bytes::from(vec![7u8; 600]), Bytes::from(vec![8u8; 600])],
            )
            .unwrap_err();
        assert!(e.to_string().contains("read back"), "{e}");
        assert_eq!((log.segments[0].len, log.last_seq()), (len, 1));
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
        log.append_chunk(1, &[Bytes::from_static(b"b")]).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open_with(&p, 1000).unwrap();
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    }

    #[test]
    fn an_oversized_chunk_left_by_an_older_version_does_not_end_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let seg = p.join(format!("{:020}.seg", 1));
        // Written with a larger limit (what an older version could write).
        let end = {
            let mut log = SegmentLog::open_with(&p, 1 << 20).unwrap();
            log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
            log.put_group("g", Bytes::from_static(b"r1")).unwrap();
            log.put_group("g", Bytes::from(vec![7u8; 5000])).unwrap();
            log.append_chunk(1, &[Bytes::from_static(b"two")]).unwrap();
            log.append_chunk(1, &[Bytes::from(vec![9u8; 3000])])
                .unwrap();
            log.append_chunk(1, &[Bytes::from_static(b"four")]).unwrap();
            log.put_group("h", Bytes::from_static(b"x")).unwrap();
            log.sync().unwrap();
            log.segments[0].len
        };
        // Read back with a smaller one: the chunks after the oversized ones are still there.
        let log = SegmentLog::open_with(&p, 1000).unwrap();
        assert_eq!(log.last_seq(), 4);
        assert_eq!(log.segments[0].len, end, "nothing cut off");
        assert!(file_len(&seg) >= end);
        assert_eq!(
            collect(&log, 1),
            vec![Ok(1), Ok(2), Err((3, 4)), Ok(4)],
            "the message chunk too long to load is reported, not served"
        );
        assert_eq!(
            log.group("g").unwrap().as_ref(),
            b"r1",
            "the previous record"
        );
        assert_eq!(log.group("h").unwrap().as_ref(), b"x");
    }
}
