//! The storage engine under [`crate::actors::store::StoreActor`]. Plain synchronous code,
//! unit-tested on its own; only the StoreActor calls it.
//!
//! | what | where |
//! |---|---|
//! | topic logs | [`segment`] files `<data_dir>/topics/<topic>/*.seg`: chunks of [`record`]s, each record with its CRC-32 |
//! | group cursors | "SLG1" chunks in the same segment files: group name → MessagePack [`GroupRecord`] (mode, filters, acked floor, acks above it) |
//! | (older data dirs) | sled tree `groups`: `<topic>\0<group>` → [`GroupRecord`], moved into the topic logs at open |
//! | topic settings | `<data_dir>/topics/<topic>/settings.toml`: the topic's overrides ([`settings`]) |
//! | message ids | inside their records ([`record`]); an in-memory index per topic ([`dedup`]), rebuilt at open; those of messages retention removed inside their window in `<data_dir>/topics/<topic>/dedup.ids` ([`ids_file`]) |
//! | deleted topics | `<data_dir>/trash/`, until their files are removed (emptied at open) |
//!
//! Topics as an operator manages them, retention (whole segments cut off the front, through the
//! sync pipeline, unlinked by the [`remover`] thread) and the dedup index are described in
//! `src/store/retention.md`.
//!
//! Message data is kept out of sled because sled keeps every page it writes resident (see
//! `segment/`). Group cursors moved out of sled too: a commit holding a topic's publishes and
//! its groups' acks is then made durable by one `fdatasync` of one file, where sled cost its
//! flush (~0.25 ms, DEPENDENCY-NOTES.md) plus an fsync of its `db` file on top of the
//! segment's. sled stays open for the state still to come (keyed state, retention).
//!
//! Durability: [`Storage::sync`] fdatasyncs the segments written since the last sync and fsyncs
//! the directories that gained files.
//! [`commit`] is the group-commit pipeline the store actor runs on top: sync jobs, the sync
//! threads, and the ledger that answers requests in commit order.

pub mod commit;
pub mod dedup;
pub mod ids_file;
pub mod record;
pub mod remover;
pub mod retention;
pub mod segment;
pub mod settings;
mod topics;

pub use topics::{RemovedTopic, TopicStats, Trimmed, MAX_WAITING_GROUPS};

use crate::config::FsyncPolicy;
use bytes::Bytes;
use record::StoredMessage;
use segment::SegmentLog;
use serde::{Deserialize, Serialize};
use sluice_protocol::{GroupMode, SharedStr, TopicSettings};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// The topic does not exist (and is not created by this request: `auto_create_topics`
    /// is off, or the request never creates one).
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    /// A failed request could not be undone on disk: the store must refuse writes from then
    /// on (like after a failed sync).
    #[error("storage inconsistent: {0}")]
    Inconsistent(String),
}

impl StoreError {
    /// Whether the error is a shortage that passes (no file descriptor or memory left), not
    /// a failure of the storage: what failed can be tried again later.
    pub fn is_shortage(&self) -> bool {
        matches!(self, StoreError::Io(e) if is_shortage(e))
    }
}

/// No file descriptor or memory left: a shortage that passes (see [`StoreError::is_shortage`]).
pub(crate) fn is_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
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
    /// Settled seqs above the floor, one by one (records of older brokers; written empty).
    #[serde(default)]
    pub acked_above: Vec<u64>,
    /// Settled seqs above the floor as inclusive ranges `[start, end]`, lowest first, at most
    /// `delivery::group::MAX_ACK_RANGES` of them: the record stays small however many
    /// messages are acked around one that is not.
    #[serde(default)]
    pub acked_ranges: Vec<(u64, u64)>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Redelivery schedule fixed at creation (ms per step; empty: `batch_timeout`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backoff_ms: Vec<u64>,
    /// Delivery counts of unsettled messages that have failed at least once:
    /// `(seq, deliveries, failures)`, so that a restart (of the orchestrator or the broker)
    /// does not start them again at attempt 1 and a poison message still reaches its
    /// dead-letter topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<(u64, u32, u32)>,
}

#[cfg(test)]
fn group_key(topic: &str, group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + group.len() + 1);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k
}

/// A read of a log range.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// Messages in seq order.
    pub messages: Vec<StoredMessage>,
    /// Seqs in the range whose record failed its CRC; they are not served.
    pub corrupt: Vec<u64>,
    /// The topic's lowest retained seq when it was read (0: not known). A read from below it
    /// starts at it: what lies between was removed by retention.
    pub floor: u64,
}

/// What a publish got: its messages' seqs, once durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Seq of the first message (the lowest of `seqs` when `duplicate`).
    pub first_seq: u64,
    /// Seq of the last message (the highest of `seqs` when `duplicate`).
    pub last_seq: u64,
    /// Some message's id was stored already within the topic's `dedup_window` (or earlier in
    /// the same request): it was not stored again.
    pub duplicate: bool,
    /// Only when `duplicate`: each message's seq, in request order (a duplicate's is its
    /// original's).
    pub seqs: Vec<u64>,
}

impl Appended {
    /// Messages stored as `first..=last`, none a duplicate.
    pub fn stored(first_seq: u64, last_seq: u64) -> Self {
        Appended {
            first_seq,
            last_seq,
            duplicate: false,
            seqs: Vec::new(),
        }
    }
}

/// The sled database and its files.
pub struct Storage {
    db: sled::Db,
    dir: PathBuf,
    groups: sled::Tree,
    topics: HashMap<String, SegmentLog>,
    /// Each topic's settings overrides (`settings.toml` in its directory; empty: none).
    overrides: HashMap<String, TopicSettings>,
    /// The broker's defaults under the overrides ([`Storage::set_defaults`]).
    defaults: TopicSettings,
    /// Group records of topics that do not exist yet (a subscribe to a missing topic creates
    /// no file): by topic, then group; written at the head of the topic's first segment.
    waiting: HashMap<String, BTreeMap<String, Bytes>>,
    /// Every topic's idempotent-publish index, under the per-topic and the broker's bounds.
    dedup: dedup::Dedup,
    /// When each topic created since the storage was opened came to exist (ms since the
    /// epoch): a group record made before then belongs to an earlier topic of that name
    /// ([`Storage::stale_group_record`]).
    born: HashMap<String, u64>,
    /// Roll size of segments ([`segment::SEGMENT_BYTES`] unless configured smaller).
    segment_bytes: u64,
    /// Big chunks are written with direct I/O by the syncs ([`Storage::set_direct_writes`]).
    direct_writes: bool,
    /// Zeroed segments for new ones (with direct writes: where every commit is synced).
    spares: Option<Arc<segment::Spares>>,
    /// Make one spare when spares are turned on ([`Storage::set_preallocate`]).
    preallocate: bool,
}

impl Storage {
    /// Opens (or creates) the database in `dir`. A new directory and its parent are fsynced once
    /// so the database itself survives a power cut.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Storage, StoreError> {
        let existed = dir.join("db").exists();
        std::fs::create_dir_all(dir.join("topics"))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .flush_every_ms(Some(500))
            .open()?;
        let groups = db.open_tree("groups")?;
        topics::empty_trash(&dir.join(TRASH))?;
        let mut topics = HashMap::new();
        let mut overrides = HashMap::new();
        for entry in std::fs::read_dir(dir.join("topics"))?.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if entry.path().is_dir() {
                overrides.insert(name.clone(), settings::load(&entry.path())?);
                topics.insert(name, SegmentLog::open(&entry.path())?);
            }
        }
        let mut storage = Storage {
            db,
            dir: dir.to_owned(),
            groups,
            topics,
            overrides,
            defaults: TopicSettings::default(),
            waiting: HashMap::new(),
            dedup: dedup::Dedup::default(),
            born: HashMap::new(),
            segment_bytes: segment::SEGMENT_BYTES,
            direct_writes: false,
            spares: None,
            preallocate: false,
        };
        storage.migrate_sled_groups()?;
        if !existed {
            storage.sync()?;
            // sled writes `conf` once and never fsyncs it.
            if let Ok(f) = File::open(dir.join("conf")) {
                f.sync_all()?;
            }
            sync_dir(&dir.join("topics"))?;
            sync_dir(dir)?;
            if let Some(parent) = dir.canonicalize()?.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(storage)
    }

    /// Last stored seq of `topic` (0 if empty or unknown).
    pub fn last_seq(&self, topic: &str) -> u64 {
        self.topics.get(topic).map(|t| t.last_seq()).unwrap_or(0)
    }

    /// Every topic with its last seq.
    pub fn topics(&self) -> impl Iterator<Item = (&str, u64)> {
        self.topics.iter().map(|(k, t)| (k.as_str(), t.last_seq()))
    }

    /// Whether `topic` exists (it has a directory: created, or published to).
    pub fn exists(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// The topic's log, created (with its directory) if it does not exist yet; group records
    /// kept while it did not are written at the head of its first segment.
    fn topic_mut(&mut self, topic: &str) -> Result<&mut SegmentLog, StoreError> {
        if !self.topics.contains_key(topic) {
            let mut log = SegmentLog::open(&self.dir.join("topics").join(topic))?;
            log.set_direct_writes(self.direct_writes);
            log.set_spares(self.spares.clone());
            log.set_segment_bytes(self.segment_bytes);
            if let Some(waiting) = self.waiting.remove(topic) {
                log.adopt_groups(waiting);
            }
            self.topics.insert(topic.to_string(), log);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            self.born.insert(topic.to_string(), now);
        }
        self.topics.get_mut(topic).ok_or(StoreError::Unavailable)
    }

    /// Writes `messages` to the topic's log with consecutive seqs (not yet durable: call
    /// [`Storage::sync`]). Returns the first seq. Messages are grouped in chunks of about
    /// [`CHUNK_BYTES`] (a single larger message is a chunk of its own).
    ///
    /// All or nothing: should a chunk fail (a full disk, no descriptor for a new segment, ...)
    /// the log is rolled back to where it was before the request ([`SegmentLog::rollback`]):
    /// none of its messages is ever read and the next request gets the same seqs. The cut is
    /// durable after the next [`Storage::sync`] (or sync job), which the error reply must wait
    /// for. [`StoreError::Inconsistent`] if the rollback itself failed.
    pub fn append(&mut self, topic: &str, messages: &[StoredMessage]) -> Result<u64, StoreError> {
        self.append_ids(topic, messages, None)
    }

    /// [`Storage::append`] with each message's idempotency id (`ids[i]` for `messages[i]`)
    /// kept in its record.
    pub fn append_ids(
        &mut self,
        topic: &str,
        messages: &[StoredMessage],
        ids: Option<&[Option<SharedStr>]>,
    ) -> Result<u64, StoreError> {
        #[cfg(test)]
        let chunks_ok = std::fs::read_to_string(self.dir.join("fail-writes-after"))
            .ok()
            .and_then(|n| n.trim().parse().ok());
        let log = self.topic_mut(topic)?;
        #[cfg(test)]
        {
            log.faults.chunks_ok = chunks_ok;
        }
        let mark = log.mark();
        match Self::append_chunks(log, messages, ids) {
            Ok(first) => Ok(first),
            Err(e) => {
                log.rollback(mark)?;
                Err(e)
            }
        }
    }

    fn append_chunks(
        log: &mut SegmentLog,
        messages: &[StoredMessage],
        ids: Option<&[Option<SharedStr>]>,
    ) -> Result<u64, StoreError> {
        let first = log.last_seq() + 1;
        // Chunks holding an id say so in their version, so that rebuilding the dedup index
        // at open reads only those.
        let mut with_ids = false;
        let mut chunk_ms = 0u64;
        // A chunk is a list of parts: small things are copied into one contiguous buffer, a
        // large payload stays in the received frame's memory and is written with writev.
        let mut parts: Vec<Bytes> = Vec::new();
        let mut cur: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + 1024);
        let mut size = 0usize;
        let mut count = 0u32;
        for (i, m) in messages.iter().enumerate() {
            if count == 0 {
                parts.clear();
                cur.clear();
                size = 5;
                with_ids = false;
                chunk_ms = m.timestamp_ms;
            }
            // As bytes: checked UTF-8 when decoded, not checked again.
            let id = ids
                .and_then(|ids| ids.get(i))
                .and_then(|id| id.as_ref().map(SharedStr::as_bytes));
            with_ids |= id.is_some();
            let at = cur.len();
            cur.extend_from_slice(&[0; 4]);
            let crc = m.encode_head_with_id(id, &mut cur);
            let len = (cur.len() - at - 4 + m.payload.len()) as u32;
            cur[at..at + 4].copy_from_slice(&len.to_be_bytes());
            cur[at + 4..at + 8].copy_from_slice(&crc.finalize().to_be_bytes());
            if m.payload.len() >= ZERO_COPY_PAYLOAD {
                size += cur.len() + m.payload.len();
                parts.push(Bytes::from(std::mem::take(&mut cur)));
                parts.push(m.payload.clone());
            } else {
                cur.extend_from_slice(&m.payload);
            }
            count += 1;
            if size + cur.len() >= CHUNK_BYTES || i + 1 == messages.len() {
                if !cur.is_empty() {
                    parts.push(Bytes::from(std::mem::take(&mut cur)));
                }
                let mut head = Vec::with_capacity(5);
                head.push(if with_ids {
                    CHUNK_VERSION_IDS
                } else {
                    CHUNK_VERSION
                });
                head.extend_from_slice(&count.to_be_bytes());
                parts.insert(0, Bytes::from(head));
                log.append_chunk_at(count, &parts, Some(chunk_ms))?;
                count = 0;
            }
        }
        Ok(first)
    }

    /// Reads up to `max` messages (and at most `max_bytes`, counting every byte of each message
    /// as delivered: payload, key, headers; at least one message) from `from` on.
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
        // A read from below the floor starts at it (what lies between was removed).
        out.floor = log.floor();
        let mut bytes = 0usize;
        log.scan(from, |item| {
            match item.map(|(first, body)| (first, decode_chunk(first, &body))) {
                Ok((_, Ok(records))) => {
                    for (seq, rec) in records {
                        if seq < from {
                            continue;
                        }
                        match rec {
                            Ok(m) => {
                                bytes += crate::delivery::group::wire_size(&m);
                                out.messages.push(m);
                            }
                            Err(reason) => {
                                tracing::error!(topic, seq, %reason, "corrupt message record: not served");
                                out.corrupt.push(seq);
                            }
                        }
                        if out.messages.len() + out.corrupt.len() >= max || bytes >= max_bytes {
                            return false;
                        }
                    }
                }
                Ok((first, Err(reason))) => {
                    tracing::error!(topic, first, %reason, "corrupt chunk: its messages are not served");
                }
                Err((first, next)) => {
                    tracing::error!(topic, first, "chunk failed its CRC: its messages are not served");
                    out.corrupt.extend(first.max(from)..next);
                }
            }
            out.messages.len() + out.corrupt.len() < max && bytes < max_bytes
        })?;
        Ok(out)
    }

    /// Moves group records of an older data dir from sled's `groups` tree into the topic logs
    /// (durably), then empties the tree.
    fn migrate_sled_groups(&mut self) -> Result<(), StoreError> {
        if self.groups.is_empty() {
            return Ok(());
        }
        let mut moved = 0usize;
        for item in self.groups.iter() {
            let (k, v) = item?;
            let Some(pos) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let (Ok(topic), Ok(group)) = (
                std::str::from_utf8(&k[..pos]),
                std::str::from_utf8(&k[pos + 1..]),
            ) else {
                continue;
            };
            let log = self.topic_mut(topic)?;
            if log.group(group).is_none() {
                log.put_group(group, Bytes::copy_from_slice(&v))?;
                moved += 1;
            }
        }
        self.sync()?;
        // Not fsynced (sled's flush never is): should the clear be lost, the next open finds
        // every record already in its log and moves nothing (groups are never deleted).
        self.groups.clear()?;
        self.db.flush()?;
        tracing::info!(moved, "group records moved from sled into the topic logs");
        Ok(())
    }

    /// The record of a group, if it exists.
    pub fn group(&self, topic: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let v = match self.topics.get(topic) {
            Some(t) => t.group(group),
            None => self.waiting.get(topic).and_then(|w| w.get(group)),
        };
        let Some(v) = v else {
            return Ok(None);
        };
        sluice_protocol::decode(v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                tree: "groups".into(),
                key: format!("{topic}/{group}"),
                reason: e.to_string(),
            })
    }

    /// Every group of every topic.
    pub fn all_groups(&self) -> Result<Vec<(String, String, GroupRecord)>, StoreError> {
        let mut out = Vec::new();
        let waiting = self.waiting.iter().map(|(t, w)| {
            (
                t,
                w.iter().map(|(g, v)| (g.as_str(), v)).collect::<Vec<_>>(),
            )
        });
        let logs = self
            .topics
            .iter()
            .map(|(t, log)| (t, log.groups().collect::<Vec<_>>()));
        for (topic, groups) in logs.chain(waiting) {
            for (group, v) in groups {
                match sluice_protocol::decode::<GroupRecord>(v) {
                    Ok(rec) => out.push((topic.clone(), group.to_string(), rec)),
                    Err(e) => tracing::error!(topic, group, error = %e, "undecodable group record"),
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }

    /// Writes a group's record into its topic's log (not yet durable: call [`Storage::sync`]).
    /// All or nothing, like [`Storage::append`].
    pub fn put_group(
        &mut self,
        topic: &str,
        group: &str,
        rec: &GroupRecord,
    ) -> Result<(), StoreError> {
        let bytes = sluice_protocol::encode(rec).map_err(|e| StoreError::Corrupt {
            tree: "groups".into(),
            key: format!("{topic}/{group}"),
            reason: e.to_string(),
        })?;
        let log = self.topic_mut(topic)?;
        let mark = log.mark();
        log.put_group(group, bytes).or_else(|e| {
            log.rollback(mark)?;
            Err(e)
        })
    }

    /// Makes everything written so far durable: fdatasync the segments written since the last
    /// sync (and fsync directories that gained files). Should the job not be taken (no file
    /// descriptor left: [`StoreError::is_shortage`]), nothing changed and it can be tried
    /// again; should it fail, everything is synced again next time.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let job = self.take_sync_job()?;
        job.run().inspect_err(|_| self.mark_dirty())
    }

    /// What a sync of everything written so far must do, as a job that can run on another
    /// thread while writing goes on (pipelined group commit). Marks everything clean; if the
    /// job fails, call [`Storage::mark_dirty`]. All or nothing: an error (a handle that could
    /// not be opened) leaves everything as it was.
    pub fn take_sync_job(&mut self) -> Result<SyncJob, StoreError> {
        let mut job = SyncJob::default();
        #[cfg(test)]
        {
            job.fail_if = Some(self.dir.join("fail-syncs"));
            if self.dir.join("fail-takes").exists() {
                return Err(std::io::Error::from_raw_os_error(libc::EMFILE).into());
            }
        }
        for log in self.topics.values_mut() {
            if log.is_dirty() {
                log.prepare_sync()?;
            }
        }
        for log in self.topics.values_mut() {
            if log.is_dirty() {
                log.take_sync(&mut job)?;
            }
        }
        Ok(job)
    }

    /// After a failed sync: everything is synced again next time.
    pub fn mark_dirty(&mut self) {
        for log in self.topics.values_mut() {
            log.mark_dirty();
        }
    }

    /// Lets the syncs write the aligned middles of big chunks with direct I/O (see
    /// `segment::DirectWrite`). Only for a policy that syncs every commit: elsewhere nothing
    /// would write them until the next periodic sync.
    ///
    /// The same policy has new segments of small messages start from spares zeroed and synced
    /// ahead of time (`segment::Spares`, in `<data_dir>/spare/`): one made here when
    /// [`Storage::set_preallocate`] asked for it (~64 MiB written before requests are taken),
    /// further ones once a topic is busy. Without them (an error opening their directory),
    /// segments start empty as before.
    pub fn set_direct_writes(&mut self, on: bool) {
        self.direct_writes = on;
        self.spares = if on {
            segment::Spares::open(self.dir.join("spare"), self.segment_bytes)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "no spare segments: new segments start empty"),
                )
                .ok()
        } else {
            None
        };
        if let (Some(sp), true) = (&self.spares, self.preallocate) {
            if let Err(e) = sp.preallocate() {
                tracing::warn!(error = %e, "cannot preallocate a segment: the first one starts empty");
            }
        }
        for log in self.topics.values_mut() {
            log.set_direct_writes(on);
            log.set_spares(self.spares.clone());
        }
    }

    /// Whether [`Storage::set_direct_writes`] makes one spare segment at once (config
    /// `preallocate_segment`): the first busy topic then syncs over zeros written ahead of time
    /// from its first message (W1 on a fresh broker ~10% faster), at the cost of 64 MiB of disk
    /// from the start. Without it, spares are made only once a topic is busy.
    pub fn set_preallocate(&mut self, on: bool) {
        self.preallocate = on;
    }

    /// Whether `policy` wants [`Storage::sync`] before each reply.
    pub fn sync_per_commit(policy: FsyncPolicy) -> bool {
        matches!(policy, FsyncPolicy::Always)
    }

    /// Total size on disk: segments plus sled.
    pub fn size_on_disk(&self) -> u64 {
        self.topics.values().map(SegmentLog::size).sum::<u64>()
            + self.db.size_on_disk().unwrap_or(0)
    }

    /// Where this run's batch ids start: above every id an earlier run handed out, so that an
    /// ack naming a batch of an earlier run can never settle a batch of this one. The start is
    /// the larger of the clock in microseconds and the previous run's reservation; this run
    /// reserves [`BATCH_IDS_PER_RUN`] ids past its start (kept in sled). A run that hands out
    /// more ids than that (over a million batches a second for 19 hours) is still covered by
    /// the clock, which has then moved on further. Ids stay below 2^53 (exact in a JSON
    /// number) for a couple of centuries.
    pub fn batch_id_base(&self) -> Result<u64, StoreError> {
        const KEY: &[u8] = b"batch_id_reserved";
        let reserved = self
            .db
            .get(KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let base = reserved.max(now_us).max(1);
        self.db
            .insert(KEY, &base.saturating_add(BATCH_IDS_PER_RUN).to_be_bytes())?;
        self.db.flush()?;
        Ok(base)
    }

    /// Payload of a stored message converted to a Bytes (for tests).
    pub fn payload_of(m: &StoredMessage) -> Bytes {
        m.payload.clone()
    }
}

/// Fault injection (`admin.fault` kind `stall-syncs`): syncs wait until then, as on a stalled
/// disk.
static SYNC_STALL_UNTIL: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// Makes every sync starting in the next `d` wait until `d` has passed (tests of what a
/// stalled disk does to replies; only reachable with `--enable-fault-injection`).
pub fn stall_syncs(d: std::time::Duration) {
    let mut until = SYNC_STALL_UNTIL.lock().unwrap_or_else(|p| p.into_inner());
    *until = Some(std::time::Instant::now() + d);
}

fn wait_out_stall() {
    let until = *SYNC_STALL_UNTIL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(until) = until {
        let now = std::time::Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
    }
}

/// Batch ids reserved per broker run (see [`Storage::batch_id_base`]).
pub const BATCH_IDS_PER_RUN: u64 = 1 << 36;

/// Where a deleted topic's directory goes (renamed) until its files are removed.
pub(crate) const TRASH: &str = "trash";

/// The fsyncs that make a set of writes durable, detached from [`Storage`] so they can run on a
/// blocking thread. Holds every handle it needs, opened on the store's thread: running it opens
/// nothing, so it fails only if the storage does.
#[derive(Default)]
pub struct SyncJob {
    /// Segment files by path (a handle of their own each).
    files: Vec<(PathBuf, File)>,
    /// Middles of big chunks to write before the files are synced.
    direct: Vec<Arc<segment::DirectWrite>>,
    /// Directories by path.
    dirs: Vec<(PathBuf, File)>,
    /// Tests: the job fails while this file exists.
    #[cfg(test)]
    fail_if: Option<PathBuf>,
}

impl SyncJob {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty() && self.direct.is_empty()
    }

    /// Adds what `other` must do (a file or directory both name is synced once).
    pub fn absorb(&mut self, other: SyncJob) {
        #[cfg(test)]
        if self.fail_if.is_none() {
            self.fail_if = other.fail_if.clone();
        }
        self.direct.extend(other.direct);
        for (path, file) in other.files {
            if !self.files.iter().any(|(p, _)| *p == path) {
                self.files.push((path, file));
            }
        }
        for (path, dir) in other.dirs {
            if !self.dirs.iter().any(|(p, _)| *p == path) {
                self.dirs.push((path, dir));
            }
        }
    }

    /// Makes the direct writes, fdatasyncs the segment files, fsyncs the directories.
    pub fn run(self) -> Result<(), StoreError> {
        wait_out_stall();
        #[cfg(test)]
        if self.fail_if.as_ref().is_some_and(|p| p.exists()) {
            return Err(StoreError::Io(std::io::Error::other(
                "injected sync failure",
            )));
        }
        for d in &self.direct {
            match self.files.iter().find(|(p, _)| p == d.path()) {
                Some((_, file)) => d.run(file)?,
                // Not expected: a direct write is taken with its segment's handle.
                None => d.run(&std::fs::OpenOptions::new().write(true).open(d.path())?)?,
            }
        }
        for (_, f) in &self.files {
            f.sync_data()?;
        }
        for (_, d) in &self.dirs {
            d.sync_all()?;
        }
        Ok(())
    }
}

/// Payloads at least this large are written from their own buffer (writev), not copied.
const ZERO_COPY_PAYLOAD: usize = 16 * 1024;

/// Target size of one stored chunk of messages (a single larger message is a chunk of its own).
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Version of a chunk of messages none of which has an id.
const CHUNK_VERSION: u8 = 1;
/// Version of a chunk of messages some of which have an id (same layout; records say which).
const CHUNK_VERSION_IDS: u8 = 2;

type ChunkRecords = Vec<(u64, Result<StoredMessage, String>)>;

/// Where each record of a chunk lies in `buf` (`version u8 | count u32 | (len u32 |
/// record)*`), in seq order.
fn chunk_records(buf: &[u8]) -> Result<Vec<std::ops::Range<usize>>, String> {
    if buf.len() < 5 || !matches!(buf[0], CHUNK_VERSION | CHUNK_VERSION_IDS) {
        return Err("bad chunk header".into());
    }
    let count = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let mut out = Vec::with_capacity(count.min(buf.len() / 4));
    let mut pos = 5;
    for i in 0..count {
        let Some(l) = buf.get(pos..pos + 4) else {
            return Err(format!("chunk truncated at record {i}"));
        };
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        pos += 4;
        if pos + len > buf.len() {
            return Err(format!("chunk truncated at record {i}"));
        }
        out.push(pos..pos + len);
        pos += len;
    }
    Ok(out)
}

/// Decodes a chunk (see [`chunk_records`]); each record has its own CRC, so one bad record
/// spoils only itself.
fn decode_chunk(first: u64, buf: &Bytes) -> Result<ChunkRecords, String> {
    if buf.len() < 5 || !matches!(buf[0], CHUNK_VERSION | CHUNK_VERSION_IDS) {
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
    fn queued_sync_jobs_merge_into_one_sync_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.append("t", &[msg("a")]).unwrap();
        let mut job = s.take_sync_job().unwrap();
        assert_eq!(
            (job.files.len(), job.dirs.len()),
            (1, 2),
            "new topic: its dir and the parent"
        );
        s.append("t", &[msg("b")]).unwrap();
        s.append("u", &[msg("c")]).unwrap();
        job.absorb(s.take_sync_job().unwrap());
        assert_eq!(job.files.len(), 2, "t's segment once, u's once");
        assert_eq!(job.dirs.len(), 3, "the topics' parent once");
        job.run().unwrap();
    }

    #[test]
    fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.append("t", &[msg("a"), msg("b")]).unwrap(), 1);
            assert_eq!(s.append("t", &[msg("c")]).unwrap(), 3);
            s.sync().unwrap();
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
                acked_ranges: vec![],
                created_ms: 0,
                backoff_ms: vec![],
                attempts: vec![],
            };
            s.put_group("t", "g", &rec).unwrap();
            s.sync().unwrap();
        }
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.last_seq("t"), 3);
        assert_eq!(s.group("t", "g").unwrap().unwrap().acked_floor, 2);
        assert_eq!(s.all_groups().unwrap().len(), 1);
    }

    #[test]
    fn group_records_of_an_older_data_dir_move_from_sled_into_the_topic_logs() {
        let dir = tempfile::tempdir().unwrap();
        let rec = GroupRecord {
            mode: GroupMode::Shared,
            filters: BTreeMap::new(),
            acked_floor: 7,
            acked_above: vec![9],
            acked_ranges: vec![(11, 12)],
            created_ms: 1,
            backoff_ms: vec![],
            attempts: vec![],
        };
        {
            // What an older broker left: the record in sled's `groups` tree only.
            let s = Storage::open(dir.path(), 1 << 20).unwrap();
            let bytes = sluice_protocol::encode(&rec).unwrap();
            s.groups
                .insert(group_key("old.topic", "g"), bytes.as_ref())
                .unwrap();
            s.db.flush().unwrap();
        }
        // sled's flusher thread lets go of its file lock a moment after the drop.
        let reopen = || {
            for _ in 0..100 {
                match Storage::open(dir.path(), 1 << 20) {
                    Ok(s) => return s,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            Storage::open(dir.path(), 1 << 20).unwrap()
        };
        let s = reopen();
        assert_eq!(s.group("old.topic", "g").unwrap(), Some(rec.clone()));
        assert!(s.groups.is_empty());
        drop(s);
        let s = reopen();
        assert_eq!(s.group("old.topic", "g").unwrap(), Some(rec));
        assert_eq!(s.all_groups().unwrap().len(), 1);
    }

    #[test]
    fn large_and_small_payloads_round_trip_through_writev() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        let big = |c: u8, n: usize| StoredMessage {
            payload: Bytes::from(vec![c; n]),
            ..msg("")
        };
        let batch = vec![
            big(1, 20_000),
            msg("small"),
            big(2, 100_000),
            msg("x"),
            big(3, 16 * 1024),
        ];
        s.append("t", &batch).unwrap();
        s.append(
            "t",
            &(0..300).map(|i| msg(&format!("m{i}"))).collect::<Vec<_>>(),
        )
        .unwrap();
        s.sync().unwrap();
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        let r = s.read("t", 1, 1000, usize::MAX).unwrap();
        assert!(r.corrupt.is_empty());
        assert_eq!(r.messages.len(), 305);
        for (i, m) in batch.iter().enumerate() {
            assert_eq!(r.messages[i].payload, m.payload, "message {i}");
            assert_eq!(r.messages[i].seq, i as u64 + 1);
        }
        assert_eq!(r.messages[304].payload, Bytes::from("m299"));
    }

    #[test]
    fn corrupt_chunk_is_not_served_but_the_next_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.append("t", &[msg("a"), msg("b")]).unwrap();
        s.append("t", &[msg("c")]).unwrap();
        s.sync().unwrap();
        let seg = dir.path().join("topics/t").join(format!("{:020}.seg", 1));
        let mut v = std::fs::read(&seg).unwrap();
        // Corrupt the payload "a" of the first chunk.
        let pos = v.iter().position(|b| *b == b'a').unwrap();
        v[pos] ^= 0xff;
        std::fs::write(&seg, v).unwrap();
        let r = s.read("t", 1, 10, 1 << 20).unwrap();
        assert_eq!(r.corrupt, vec![1, 2]);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].seq, 3);
    }

    #[test]
    fn an_append_failing_part_way_stores_none_of_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let big = |i: usize| StoredMessage {
            payload: Bytes::from(vec![i as u8; 1000]),
            ..msg("")
        };
        let batch: Vec<StoredMessage> = (0..200).map(big).collect();
        {
            let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
            s.append("t", &[msg("a"), msg("b"), msg("c")]).unwrap();
            // 200 KB: four chunks; the third fails.
            std::fs::write(dir.path().join("fail-writes-after"), "2").unwrap();
            assert!(s.append("t", &batch).is_err());
            std::fs::remove_file(dir.path().join("fail-writes-after")).unwrap();
            assert_eq!(s.last_seq("t"), 3);
            let r = s.read("t", 1, 1000, usize::MAX).unwrap();
            assert_eq!(r.messages.len(), 3);
            assert!(r.corrupt.is_empty());
            assert_eq!(s.append("t", &batch).unwrap(), 4, "the seqs are reused");
            s.sync().unwrap();
        }
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.last_seq("t"), 203);
        let r = s.read("t", 1, 1000, usize::MAX).unwrap();
        assert_eq!(r.messages.len(), 203);
        assert_eq!(r.messages[3].payload, batch[0].payload);
        assert_eq!(r.messages[202].payload, batch[199].payload);
    }

    #[test]
    fn a_sync_job_not_taken_for_want_of_descriptors_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.append("t", &[msg("a")]).unwrap();
        s.append("u", &[msg("b")]).unwrap();
        s.sync().unwrap();
        s.append("t", &[msg("c")]).unwrap();
        // After a failed sync `u` needs handles it does not hold, and one cannot be opened:
        // nothing is taken, `t` included.
        s.topics.get_mut("u").unwrap().mark_dirty();
        let seg = dir.path().join("topics/u").join(format!("{:020}.seg", 1));
        let hidden = dir.path().join("hidden.seg");
        std::fs::rename(&seg, &hidden).unwrap();
        assert!(s.take_sync_job().is_err());
        assert!(s.topics.values().all(SegmentLog::is_dirty));
        std::fs::rename(&hidden, &seg).unwrap();
        let job = s.take_sync_job().unwrap();
        assert_eq!((job.files.len(), job.dirs.len()), (2, 2));
        job.run().unwrap();
        assert!(s.topics.values().all(|l| !l.is_dirty()));
    }
}
