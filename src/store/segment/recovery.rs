//! Opening a log: the index rebuilt from the chunk headers, the last segment checked fully,
//! a torn tail cut off, an oversized chunk of an older version skipped.

use super::format::*;
use super::log::{Segment, SegmentLog, SEGMENT_BYTES};
use crate::store::StoreError;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How much of a segment's tail after its last chunk `open` checks for zeros (see
/// [`Spares`]).
pub(super) const TAIL_CHECK: u64 = 1024 * 1024;

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, rebuilding the index.
    pub fn open(dir: &Path) -> Result<SegmentLog, StoreError> {
        Self::open_with(dir, MAX_BODY)
    }

    /// [`SegmentLog::open`] with a smaller largest chunk (tests).
    pub(super) fn open_with(dir: &Path, max_body: usize) -> Result<SegmentLog, StoreError> {
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
            faults: super::log::Faults::default(),
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
                        // An empty record is a tombstone: the group was deleted.
                        Some((name, rec)) if rec.is_empty() => {
                            log.groups.remove(&name);
                        }
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
            if let (Some(&(_, a)), Some(&(_, b))) = (seg.chunks.first(), seg.chunks.last()) {
                seg.first_ms = chunk_time(&file, a)?;
                seg.last_ms = chunk_time(&file, b)?;
            }
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
}
