//! Undoing a request that failed part-way: a publish or group commit is all or nothing.

use super::log::SegmentLog;
use crate::store::StoreError;
use std::fs::File;
use std::io::{Seek, SeekFrom};

/// What a log looked like before a request, to undo the request should it fail part-way
/// ([`SegmentLog::mark`], [`SegmentLog::rollback`]). Plain numbers: taking one costs no
/// system call.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub(super) segments: usize,
    /// The last segment's end of chunks, file length, chunk count, direct write count and
    /// whether it had a sync handle open.
    pub(super) last: Option<(u64, u64, usize, usize, bool)>,
    /// The last segment's first and last store times.
    pub(super) last_times: (Option<u64>, Option<u64>),
    pub(super) last_seq: u64,
    pub(super) unsynced_from: Option<usize>,
    pub(super) dir_dirty: bool,
    pub(super) dir_handles: bool,
    pub(super) copies_pending: bool,
}

impl SegmentLog {
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
            last_times: self
                .segments
                .last()
                .map_or((None, None), |s| (s.first_ms, s.last_ms)),
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
            (seg.first_ms, seg.last_ms) = mark.last_times;
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
}
