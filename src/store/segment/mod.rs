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
//! older one (retention can drop whole segments). A deleted group gets a tombstone (an empty
//! record): its older records no longer count and it is not copied into new segments.
//! Each segment remembers the store time of its first and last chunk of messages (read from
//! the first record of those chunks at open): retention by age and `seq_at_time` go by them.
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
//! Files: `format` (the chunk format and file helpers), `log` (appends, reads, syncs),
//! `recovery` (opening a log: index, torn tails), `rollback` (undoing a failed request),
//! `direct` (direct writes of big chunks), `spares` (segments zeroed ahead of need), `trim`
//! (retention's side: the floor, whole segments cut off the front, rolls by age, seqs by time).

mod direct;
mod format;
mod log;
mod recovery;
mod rollback;
mod spares;
#[cfg(test)]
mod tests;
mod trim;

pub(crate) use direct::DirectWrite;
pub use direct::DIRECT_MIN;
pub use format::HEADER;
pub use log::{SegmentLog, SEGMENT_BYTES};
pub use rollback::Mark;
pub use spares::Spares;
pub use trim::{Detached, SegmentInfo};
