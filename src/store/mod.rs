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
                Some((k, _)) => seq_from_key(&k).unwrap_or(0),
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
    /// [`Storage::sync`]). Returns the first seq and whether a value may have become a sled blob.
    pub fn append(&mut self, topic: &str, messages: &[StoredMessage]) -> Result<u64, StoreError> {
        let log = self.topic_mut(topic)?;
        let first = log.last_seq + 1;
        let mut batch = sled::Batch::default();
        let mut buf = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            buf.clear();
            m.encode_into(&mut buf);
            batch.insert(&(first + i as u64).to_be_bytes(), buf.as_slice());
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
        let mut bytes = 0usize;
        for item in log.tree.range(from.to_be_bytes()..) {
            let (k, v) = item?;
            let Some(seq) = seq_from_key(&k) else {
                continue;
            };
            match StoredMessage::decode(seq, &v) {
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
        let last = v.len() - 1;
        v[last] ^= 0xff;
        tree.insert(1u64.to_be_bytes(), v).unwrap();
        let r = s.read("t", 1, 10, 1 << 20).unwrap();
        assert_eq!(r.corrupt, vec![1]);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].seq, 2);
    }
}
