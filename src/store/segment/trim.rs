//! Retention's side of a log: the floor (lowest retained seq), what each segment holds, whole
//! segments cut off the front, a roll by age, and finding a seq by time.
//!
//! Cutting is in two steps, so that no file a sync job still holds is unlinked:
//! [`SegmentLog::detach_front`] takes the oldest segments out of the log (reads no longer see
//! them; the floor moves at once) and hands back their paths; the store unlinks them once every
//! sync job taken before has finished (see `StoreActor`'s retention sweep and
//! `store::commit`).

use super::format::*;
use super::log::SegmentLog;
use crate::store::StoreError;
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// What one segment holds, for retention's decisions (`store::retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First message seq (the next seq for a segment without messages).
    pub first_seq: u64,
    /// Messages in it.
    pub messages: u64,
    /// Bytes of its chunks.
    pub bytes: u64,
    /// Store time of its first and last messages, if known.
    pub first_ms: Option<u64>,
    /// See `first_ms`.
    pub last_ms: Option<u64>,
}

impl SegmentInfo {
    /// Last message seq (`first_seq - 1` without messages).
    pub fn last_seq(&self) -> u64 {
        (self.first_seq + self.messages).saturating_sub(1)
    }
}

/// A segment taken out of its log by [`SegmentLog::detach_front`], to be unlinked.
#[derive(Debug, Clone)]
pub struct Detached {
    /// Its file.
    pub path: PathBuf,
    /// Messages it held.
    pub messages: u64,
    /// Bytes of its chunks.
    pub bytes: u64,
}

impl SegmentLog {
    /// Lowest retained seq: the first message of the first segment, `last_seq + 1` when the
    /// log holds none (every message removed, or never any).
    pub fn floor(&self) -> u64 {
        self.segments
            .first()
            .and_then(|s| s.chunks.first())
            .map_or(self.last_seq.saturating_add(1), |c| c.0)
    }

    /// The files of the segments in the log, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Segment files in the log.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Store time of the oldest retained message, if known.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| !s.chunks.is_empty())
            .and_then(|s| s.first_ms)
    }

    /// What each segment holds, oldest first (the last one is the segment appends go to).
    pub fn summaries(&self) -> Vec<SegmentInfo> {
        let n = self.segments.len();
        (0..n)
            .map(|i| {
                let s = &self.segments[i];
                let next = self
                    .segments
                    .get(i + 1)
                    .and_then(|s| s.chunks.first())
                    .map_or(self.last_seq.saturating_add(1), |c| c.0);
                let first = s.chunks.first().map_or(next, |c| c.0);
                SegmentInfo {
                    first_seq: first,
                    messages: next.saturating_sub(first),
                    bytes: s.len,
                    first_ms: s.first_ms,
                    last_ms: s.last_ms,
                }
            })
            .collect()
    }

    /// How many of the `k` oldest segments can be taken out now: never the last one (appends
    /// go there), none written since the last sync was taken (its sync handle, its direct
    /// writes), none while a new segment still lacks its group-record copies.
    pub fn detachable(&self, k: usize) -> usize {
        if self.copies_pending {
            return 0;
        }
        let limit = k
            .min(self.segments.len().saturating_sub(1))
            .min(self.unsynced_from.unwrap_or(usize::MAX));
        self.segments[..limit]
            .iter()
            .take_while(|s| s.direct.is_empty() && s.sync_file.is_none() && !s.write_failed)
            .count()
    }

    /// Takes the `k` oldest segments out of the log (at most [`SegmentLog::detachable`]):
    /// reads no longer see them and the floor moves up. Their files stay until the caller
    /// unlinks them (once no sync job holds them) and fsyncs the directory.
    pub fn detach_front(&mut self, k: usize) -> Vec<Detached> {
        let k = self.detachable(k);
        if k == 0 {
            return Vec::new();
        }
        let infos = self.summaries();
        let out = self
            .segments
            .drain(..k)
            .zip(infos)
            .map(|(s, info)| Detached {
                path: s.path.clone(),
                messages: info.messages,
                bytes: s.len,
            })
            .collect();
        self.unsynced_from = self.unsynced_from.map(|u| u - k);
        out
    }

    /// Closes the last segment if it holds messages and starts an empty one (named after the
    /// next seq, holding a copy of every group's record), so that all of the closed one can be
    /// removed later: segments roll by age too, and a topic whose every message expired keeps
    /// its head in the new segment's name. Not durable until the next sync; on error, undo
    /// with [`SegmentLog::rollback`] from a mark taken before. `false`: nothing to roll.
    pub fn roll_now(&mut self) -> Result<bool, StoreError> {
        if self.segments.last().is_none_or(|s| s.chunks.is_empty()) {
            return Ok(false);
        }
        let first = self.next_seq()?;
        self.start_segment(first, false)?;
        self.write_copies(first)?;
        Ok(true)
    }

    /// The first seq stored at or after `at_ms` (ms since the epoch): `last_seq + 1` if none,
    /// the floor for a time before it. By the store times of whole chunks (all of a chunk's
    /// messages share one), found by binary search over the segments and their chunks.
    pub fn seq_at_time(&self, at_ms: u64) -> Result<u64, StoreError> {
        let end = self.last_seq.saturating_add(1);
        let si = self
            .segments
            .partition_point(|s| s.chunks.is_empty() || s.last_ms.is_some_and(|t| t < at_ms));
        let Some(seg) = self.segments.get(si) else {
            return Ok(end);
        };
        if seg.chunks.is_empty() {
            return Ok(end);
        }
        // First chunk of the segment with a time at or after `at_ms`.
        let (mut lo, mut hi) = (0usize, seg.chunks.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let ts = chunk_time(&seg.file, seg.chunks[mid].1)?;
            if ts.is_some_and(|t| t < at_ms) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(seg.chunks.get(lo).map_or(end, |c| c.0))
    }

    /// Calls `f(first_seq, body)` for every chunk of messages in the segments whose newest
    /// message is not older than `min_ms` (and those of unknown time) whose body starts with
    /// `tag` (the chunk version); other chunks are not read. Chunks failing their CRC are
    /// skipped.
    pub fn scan_tagged(
        &self,
        min_ms: u64,
        tag: u8,
        mut f: impl FnMut(u64, Bytes),
    ) -> Result<(), StoreError> {
        let mut h = [0u8; HEADER + 1];
        for seg in self
            .segments
            .iter()
            .filter(|s| s.last_ms.is_none_or(|t| t >= min_ms))
        {
            for &(first, off) in &seg.chunks {
                seg.file.read_exact_at(&mut h, off)?;
                let mut head = [0u8; HEADER];
                head.copy_from_slice(&h[..HEADER]);
                let Some(hd) = parse_header(&head).filter(|hd| hd.body_len <= self.max_body) else {
                    continue;
                };
                if hd.group || h[HEADER] != tag {
                    continue;
                }
                let mut body = vec![0u8; hd.body_len];
                seg.file.read_exact_at(&mut body, off + HEADER as u64)?;
                if crc32fast::hash(&body) == hd.crc {
                    f(first, Bytes::from(body));
                }
            }
        }
        Ok(())
    }
}
