//! The storage engine under [`crate::actors::store::StoreActor`]: sled trees and their encoding.
//! Plain synchronous code, unit-tested on its own; only the StoreActor calls it.
//!
//! Layout in sled:
//!
//! | tree            | key                       | value |
//! |-----------------|---------------------------|-------|
//! | `log/<topic>`   | seq (u64 big-endian)      | [`record`]: CRC-32 + timestamp, priority, key, headers, payload |
//! | `groups`        | `<topic>\0<group>`        | MessagePack [`GroupRecord`]: mode, filters, acked floor, acks above it |
//!
//! Durability: [`Storage::sync`] flushes sled and then fsyncs its files, because sled's own
//! `flush()` never fsyncs (see DEPENDENCY-NOTES.md).

pub mod record;

use crate::config::FsyncPolicy;
use bytes::Bytes;
use record::StoredMessage;
use serde::{Deserialize, Serialize};
use sluice_protocol::GroupMode;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A file operation failed (fsync, directory).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record failed its CRC or could not be decoded.
    #[error("corrupt record in {tree} at {key}: {reason}")]
    Corrupt {
        /// Tree name.
        tree: String,
        /// Key (seq or group).
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The store actor is gone or restarting.
    #[error("store unavailable")]
    Unavailable,
}

/// A group's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Mode fixed at creation.
    pub mode: GroupMode,
    /// Header filters fixed at creation.
    pub filters: BTreeMap<String, String>,
    /// Every seq `<= acked_floor` is settled (acked, filtered out or dead-lettered).
    pub acked_floor: u64,
    /// Settled seqs above the floor.
    pub acked_above: Vec<u64>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

fn log_tree_name(topic: &str) -> String {
    format!("log/{topic}")
}

fn group_key(topic: &str, group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + group.len() + 1);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k
}

/// One topic's open log.
struct TopicLog {
    tree: sled::Tree,
    /// Last stored seq (0 = empty).
    last_seq: u64,
}

/// A read of a log range.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// Messages in seq order.
    pub messages: Vec<StoredMessage>,
    /// Seqs in the range whose record failed its CRC; they are not served.
    pub corrupt: Vec<u64>,
}

/// The sled database and its files.
pub struct Storage {
    db: sled::Db,
    dir: PathBuf,
    groups: sled::Tree,
    topics: HashMap<String, TopicLog>,
    /// Blob files already fsynced (sled stores large values as separate files).
    synced_blobs: HashSet<PathBuf>,
}

impl Storage {
    /// Opens (or creates) the database in `dir`. A new directory and its parent are fsynced once
    /// so the database itself survives a power cut.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Storage, StoreError> {
        let existed = dir.join("db").exists();
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .flush_every_ms(Some(500))
            // Values above segment_size / 4 become separate blob files; 2 MiB keeps a node of
            // 16 chunks (CHUNK_BYTES each) inline.
            .segment_size(2 * 1024 * 1024)
            .open()?;
        let groups = db.open_tree("groups")?;
        let mut topics = HashMap::new();
        for name in db.tree_names() {
            let Ok(name) = std::str::from_utf8(&name) else {
                continue;
            };
            let Some(topic) = name.strip_prefix("log/") else {
                continue;
            };
            let tree = db.open_tree(name)?;
            let last_seq = match tree.last()? {
                Some((k, v)) => {
                    let first = seq_from_key(&k).unwrap_or(0);
                    let count = v
                        .get(1..5)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(1);
                    first + count.max(1) as u64 - 1
                }
                None => 0,
            };
            topics.insert(topic.to_string(), TopicLog { tree, last_seq });
        }
        let mut storage = Storage {
            db,
            dir: dir.to_owned(),
            groups,
            topics,
            synced_blobs: HashSet::new(),
        };
        if !existed {
            storage.db.flush()?;
            storage.fsync_files(true)?;
            sync_dir(dir)?;
            if let Some(parent) = dir.canonicalize()?.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(storage)
    }

    /// Last stored seq of `topic` (0 if empty or unknown).
    pub fn last_seq(&self, topic: &str) -> u64 {
        self.topics.get(topic).map(|t| t.last_seq).unwrap_or(0)
    }

    /// Every topic with its last seq.
    pub fn topics(&self) -> impl Iterator<Item = (&str, u64)> {
        self.topics.iter().map(|(k, t)| (k.as_str(), t.last_seq))
    }

    fn topic_mut(&mut self, topic: &str) -> Result<&mut TopicLog, StoreError> {
        if !self.topics.contains_key(topic) {
            let tree = self.db.open_tree(log_tree_name(topic))?;
            self.topics
                .insert(topic.to_string(), TopicLog { tree, last_seq: 0 });
        }
        self.topics.get_mut(topic).ok_or(StoreError::Unavailable)
    }

    /// Writes `messages` to the topic's log with consecutive seqs (not yet durable: call
    /// [`Storage::sync`]). Returns the first seq.
    ///
    /// Messages are stored in chunks (segments) of about [`CHUNK_BYTES`], one sled value each,
    /// keyed by the chunk's first seq: sled's cost is per key, so this turns ~100 inserts into one.
    pub fn append(&mut self, topic: &str, messages: &[StoredMessage]) -> Result<u64, StoreError> {
        let log = self.topic_mut(topic)?;
        let first = log.last_seq + 1;
        let mut batch = sled::Batch::default();
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 1024);
        let mut chunk_first = first;
        let mut count = 0u32;
        let mut record = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if count == 0 {
                chunk.clear();
                chunk.push(CHUNK_VERSION);
                chunk.extend_from_slice(&[0; 4]);
                chunk_first = first + i as u64;
            }
            record.clear();
            m.encode_into(&mut record);
            chunk.extend_from_slice(&(record.len() as u32).to_be_bytes());
            chunk.extend_from_slice(&record);
            count += 1;
            if chunk.len() >= CHUNK_BYTES || i + 1 == messages.len() {
                chunk[1..5].copy_from_slice(&count.to_be_bytes());
                batch.insert(&chunk_first.to_be_bytes(), chunk.as_slice());
                count = 0;
            }
        }
        log.tree.apply_batch(batch)?;
        log.last_seq = first + messages.len() as u64 - 1;
        Ok(first)
    }

    /// Reads up to `max` messages (and at most `max_bytes` of payload, at least one message)
    /// from `from` on.
    pub fn read(
        &self,
        topic: &str,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<ReadResult, StoreError> {
        let mut out = ReadResult::default();
        let Some(log) = self.topics.get(topic) else {
            return Ok(out);
        };
        // The chunk holding `from` starts at or before it.
        let start = match log.tree.range(..=from.to_be_bytes()).next_back() {
            Some(item) => item?.0.to_vec(),
            None => from.to_be_bytes().to_vec(),
        };
        let mut bytes = 0usize;
        let mut iter = log.tree.range(start..).peekable();
        while let Some(item) = iter.next() {
            let (k, v) = item?;
            let Some(first) = seq_from_key(&k) else {
                continue;
            };
            let next_first = match iter.peek() {
                Some(Ok((nk, _))) => seq_from_key(nk).unwrap_or(u64::MAX),
                _ => log.last_seq + 1,
            };
            let buf = Bytes::copy_from_slice(&v);
            match decode_chunk(first, &buf) {
                Ok(records) => {
                    for (seq, rec) in records {
                        if seq < from {
                            continue;
                        }
                        match rec {
                            Ok(m) => {
                                bytes += m.payload.len();
                                out.messages.push(m);
                            }
                            Err(reason) => {
                                tracing::error!(topic, seq, %reason, "corrupt message record: not served");
                                out.corrupt.push(seq);
                            }
                        }
                        if out.messages.len() + out.corrupt.len() >= max || bytes >= max_bytes {
                            return Ok(out);
                        }
                    }
                }
                Err(reason) => {
                    tracing::error!(topic, first, %reason, "corrupt log chunk: its messages are not served");
                    out.corrupt.extend(first.max(from)..next_first);
                }
            }
            if out.messages.len() + out.corrupt.len() >= max || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The record of a group, if it exists.
    pub fn group(&self, topic: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        match self.groups.get(group_key(topic, group))? {
            None => Ok(None),
            Some(v) => sluice_protocol::decode(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    tree: "groups".into(),
                    key: format!("{topic}/{group}"),
                    reason: e.to_string(),
                }),
        }
    }

    /// Every group of every topic.
    pub fn all_groups(&self) -> Result<Vec<(String, String, GroupRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.groups.iter() {
            let (k, v) = item?;
            let Some(pos) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let topic = String::from_utf8_lossy(&k[..pos]).into_owned();
            let group = String::from_utf8_lossy(&k[pos + 1..]).into_owned();
            if let Ok(rec) = sluice_protocol::decode::<GroupRecord>(&v) {
                out.push((topic, group, rec));
            }
        }
        Ok(out)
    }

    /// Writes a group's record (not yet durable: call [`Storage::sync`]).
    pub fn put_group(&self, topic: &str, group: &str, rec: &GroupRecord) -> Result<(), StoreError> {
        let bytes = sluice_protocol::encode(rec).map_err(|e| StoreError::Corrupt {
            tree: "groups".into(),
            key: format!("{topic}/{group}"),
            reason: e.to_string(),
        })?;
        self.groups
            .insert(group_key(topic, group), bytes.as_ref())?;
        Ok(())
    }

    /// Makes everything written so far durable according to `policy`'s strongest meaning:
    /// flush sled's buffers, then fsync its files (`fsync_files`).
    pub fn sync(&mut self, large_values: bool) -> Result<(), StoreError> {
        self.db.flush()?;
        self.fsync_files(large_values)
    }

    fn fsync_files(&mut self, check_blobs: bool) -> Result<(), StoreError> {
        File::open(self.dir.join("db"))?.sync_data()?;
        if check_blobs {
            let blobs = self.dir.join("blobs");
            if let Ok(entries) = std::fs::read_dir(&blobs) {
                let mut present = HashSet::new();
                let mut new_files = false;
                for e in entries.flatten() {
                    let p = e.path();
                    if !self.synced_blobs.contains(&p) {
                        File::open(&p)?.sync_all()?;
                        new_files = true;
                    }
                    present.insert(p);
                }
                if new_files {
                    sync_dir(&blobs)?;
                }
                self.synced_blobs = present;
            }
        }
        Ok(())
    }

    /// Whether `policy` wants [`Storage::sync`] before each reply.
    pub fn sync_per_commit(policy: FsyncPolicy) -> bool {
        matches!(policy, FsyncPolicy::Always)
    }

    /// Total size on disk, as sled reports it.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Payload of a stored message converted to a Bytes (for tests).
    pub fn payload_of(m: &StoredMessage) -> Bytes {
        m.payload.clone()
    }
}

/// Target size of one stored chunk of messages (a single larger message is a chunk of its own).
pub const CHUNK_BYTES: usize = 16 * 1024;
const CHUNK_VERSION: u8 = 1;

type ChunkRecords = Vec<(u64, Result<StoredMessage, String>)>;

/// Decodes a chunk: `version u8 | count u32 | (len u32 | record)*`; each record has its own CRC,
/// so one bad record spoils only itself.
fn decode_chunk(first: u64, buf: &Bytes) -> Result<ChunkRecords, String> {
    if buf.len() < 5 || buf[0] != CHUNK_VERSION {
        return Err("bad chunk header".into());
    }
    let count = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let mut out = Vec::with_capacity(count);
    let mut pos = 5;
    for i in 0..count {
        let seq = first + i as u64;
        let Some(l) = buf.get(pos..pos + 4) else {
            return Err(format!("chunk truncated at record {i}"));
        };
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        pos += 4;
        if pos + len > buf.len() {
            return Err(format!("chunk truncated at record {i}"));
        }
        out.push((seq, StoredMessage::decode(seq, &buf.slice(pos..pos + len))));
        pos += len;
    }
    Ok(out)
}

fn seq_from_key(k: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = k.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

fn sync_dir(dir: &Path) -> Result<(), std::io::Error> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(p: &str) -> StoredMessage {
        StoredMessage {
            seq: 0,
            timestamp_ms: 1,
            key: None,
            headers: BTreeMap::new(),
            priority: 0,
            payload: Bytes::from(p.to_string()),
        }
    }

    #[test]
    fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.append("t", &[msg("a"), msg("b")]).unwrap(), 1);
            assert_eq!(s.append("t", &[msg("c")]).unwrap(), 3);
            s.sync(true).unwrap();
            let r = s.read("t", 2, 10, 1 << 20).unwrap();
            assert_eq!(
                r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![2, 3]
            );
            assert_eq!(r.messages[1].payload, Bytes::from("c"));
            let rec = GroupRecord {
                mode: GroupMode::Shared,
                filters: BTreeMap::new(),
                acked_floor: 2,
                acked_above: vec![4],
                created_ms: 0,
            };
            s.put_group("t", "g", &rec).unwrap();
            s.sync(false).unwrap();
        }
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.last_seq("t"), 3);
        assert_eq!(s.group("t", "g").unwrap().unwrap().acked_floor, 2);
        assert_eq!(s.all_groups().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_record_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.append("t", &[msg("a"), msg("b")]).unwrap();
        let tree = s.db.open_tree("log/t").unwrap();
        let mut v = tree.get(1u64.to_be_bytes()).unwrap().unwrap().to_vec();
        // The chunk holds records 1 and 2: corrupt the payload of the first ("a").
        let pos = v.iter().position(|b| *b == b'a').unwrap();
        v[pos] ^= 0xff;
        tree.insert(1u64.to_be_bytes(), v).unwrap();
        let r = s.read("t", 1, 10, 1 << 20).unwrap();
        assert_eq!(r.corrupt, vec![1]);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].seq, 2);
    }
}
