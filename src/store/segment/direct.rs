//! Big chunks (`DIRECT_MIN` and up), where every commit is synced (`fsync = "always"`): the
//! store's thread writes only the chunk's unaligned ends; the 4 KiB-aligned middle is written
//! with `O_DIRECT` by the sync thread that makes the chunk durable, right before its
//! fdatasync (see `DirectWrite`). W5 (2,000 x 1 MiB, 7 interleaved runs each): 320-383 MB/s
//! with 5.2-6.2 s of broker CPU before, 587-815 MB/s with 1.5-2.6 s after. Until its sync ran the
//! chunk has a hole; nothing reads it then (reads stop at the durable seq), a crash leaves a
//! chunk that fails its CRC at open (cut off, with the unacknowledged chunks after it), and a
//! roll first makes the direct writes of the segment it leaves, so only the last segment, the
//! one fully checked at open, can hold such a chunk after a crash.

use super::format::{chunk_range, HEADER};
use super::log::Segment;
use bytes::Bytes;
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Chunks with a body this large or larger are written with direct I/O by the sync that makes
/// them durable, when direct writes are on (see `DirectWrite`).
pub const DIRECT_MIN: usize = 256 * 1024;

/// Alignment of direct I/O (offsets, lengths and memory): the file system's block size, and at
/// least a memory page, so that the pages the store's thread writes through the page cache
/// never overlap a direct write.
pub(super) fn align() -> usize {
    rustix::param::page_size().max(4096)
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
    pub(super) file: Arc<File>,
    /// Its path: the sync job's handle of this file writes the middle through the page cache
    /// should a direct write be refused.
    pub(super) path: PathBuf,
    /// Where the aligned middle starts in the file.
    pub(super) offset: u64,
    /// The aligned middle, as offsets into the chunk.
    pub(super) from: usize,
    pub(super) to: usize,
    /// The chunk (header, body parts shared with the request) until written.
    pub(super) chunk: std::sync::Mutex<Option<([u8; HEADER], Vec<Bytes>)>>,
    pub(super) done: AtomicBool,
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

/// Allocates `len` bytes of `file` from `offset` (growing it if needed), so that writing there
/// later cannot run out of space. A file system without `fallocate` allocates at the write.
pub(super) fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        r => r.map_err(std::io::Error::from),
    }
}

impl Segment {
    /// The `O_DIRECT` handle, opened on first use; `None` where the file system has no direct
    /// I/O (tmpfs, some FUSE).
    pub(super) fn direct_file(&mut self) -> std::io::Result<Option<Arc<File>>> {
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
