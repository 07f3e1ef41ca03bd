//! Topics as an operator manages them, on [`Storage`]: creation with settings, deletion,
//! group records of topics that do not exist yet, group tombstones, what `topic.info` shows,
//! seqs by time, retention's cuts and the idempotent-publish index. The design is in
//! `store/retention.md`.

use super::dedup::{split_id_bytes, Dedup, Forgot, IdForm, IdMap, Runs};
use super::ids_file;
use super::record::{decode_id, StoredMessage};
use super::retention::{plan, Limits};
use super::segment::Detached;
use super::{
    chunk_records, settings, sync_dir, Appended, GroupRecord, Storage, StoreError,
    CHUNK_VERSION_IDS, TRASH,
};
use sluice_protocol::{SharedStr, TopicSettings};
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};

/// Most group records kept in memory for topics that do not exist yet (subscribes to missing
/// topics); past it such a subscribe fails.
pub const MAX_WAITING_GROUPS: usize = 10_000;

/// What `topic.info` shows of a topic's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStats {
    /// Last seq written (not necessarily durable yet).
    pub last_seq: u64,
    /// Lowest retained seq.
    pub floor: u64,
    /// Bytes of its chunks.
    pub bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Its groups, by name.
    pub groups: Vec<String>,
    /// Store time of the oldest retained message.
    pub oldest_ms: Option<u64>,
}

/// A deleted topic: its directory, renamed into the trash, still to be removed.
#[derive(Debug)]
pub struct RemovedTopic {
    /// The topic.
    pub topic: String,
    /// Its directory in the trash.
    pub trash: PathBuf,
    /// The directories whose entries changed (the topics' and the trash): fsynced to make the
    /// deletion durable.
    pub dirs: Vec<PathBuf>,
    /// Messages it held.
    pub messages: u64,
    /// Bytes of its chunks.
    pub bytes: u64,
}

/// Segments retention took out of a topic's log, to unlink once no sync job holds them.
#[derive(Debug)]
pub struct Trimmed {
    /// The topic.
    pub topic: String,
    /// Its directory (fsynced once the files are gone).
    pub dir: PathBuf,
    /// The segments.
    pub removed: Vec<Detached>,
    /// The topic's floor once they are gone.
    pub floor: u64,
    /// Why the first went (`max_age`, `max_bytes`, `max_messages`, `acked`).
    pub why: &'static str,
    /// The segments left, fdatasynced before any file goes: the first holds the copies of the
    /// groups' records that the removed ones held, the others newer records (empty where the
    /// sync pipeline made them durable already: every policy but `never`).
    pub sync_first: Vec<PathBuf>,
    /// The ids of the removed messages whose `dedup_window` is still running, kept in the
    /// topic's ids file before any file goes (see `ids_file`).
    pub ids: Vec<super::ids_file::Entry>,
    /// The topic's `dedup_window` (ms) when they were taken.
    pub dedup_window_ms: u64,
    /// Most ids the file keeps (what the index can hold of one topic).
    pub max_ids: usize,
}

impl Trimmed {
    /// Messages removed.
    pub fn messages(&self) -> u64 {
        self.removed.iter().map(|d| d.messages).sum()
    }

    /// Bytes removed.
    pub fn bytes(&self) -> u64 {
        self.removed.iter().map(|d| d.bytes).sum()
    }
}

/// Removes what an earlier run left in the trash (deletions cut short by a crash), and makes
/// sure the trash directory exists.
pub(super) fn empty_trash(trash: &Path) -> Result<(), StoreError> {
    let existed = trash.exists();
    std::fs::create_dir_all(trash)?;
    let mut removed = false;
    for entry in std::fs::read_dir(trash)?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
        removed = true;
    }
    if removed || !existed {
        sync_dir(trash)?;
        if let Some(parent) = trash.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

impl Storage {
    /// The broker's defaults under every topic's overrides.
    pub fn set_defaults(&mut self, defaults: TopicSettings) {
        self.defaults = defaults;
    }

    /// Most ids the dedup indexes of every topic hold together (`dedup_max_ids`); ids held now
    /// are forgotten (set it before [`Storage::rebuild_dedup`]).
    pub fn set_dedup_max_ids(&mut self, max: usize) {
        self.dedup = Dedup::new(max);
    }

    /// The size at which segments roll (tests and small disks; spares take it too, so set it
    /// before [`Storage::set_direct_writes`]).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
        for log in self.topics.values_mut() {
            log.set_segment_bytes(bytes);
        }
    }

    /// The settings in force for `topic` (its overrides over the defaults; the defaults for a
    /// topic that does not exist).
    pub fn settings(&self, topic: &str) -> TopicSettings {
        match self.overrides.get(topic) {
            Some(o) => settings::in_force(o, &self.defaults),
            None => settings::in_force(&TopicSettings::default(), &self.defaults),
        }
    }

    /// The topic's overrides (none for a topic that does not exist).
    pub fn overrides(&self, topic: &str) -> TopicSettings {
        self.overrides.get(topic).cloned().unwrap_or_default()
    }

    /// Every topic, by name.
    pub fn topic_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.topics.keys().cloned().collect();
        v.sort();
        v
    }

    /// Creates `topic` with `overrides`, durably (its directory and settings file, fsynced with
    /// their directories). Group records kept while it did not exist go into its log.
    pub fn create_topic(
        &mut self,
        topic: &str,
        overrides: TopicSettings,
    ) -> Result<(), StoreError> {
        let dir = self.dir.join("topics").join(topic);
        self.topic_mut(topic)?;
        let stored = settings::store(&dir, &overrides).and_then(|()| {
            sync_dir(&self.dir.join("topics"))?;
            Ok(())
        });
        if let Err(e) = stored {
            // Not created: the directory goes again (empty unless a publish raced it, which
            // cannot happen on this thread).
            self.topics.remove(topic);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.overrides.insert(topic.to_string(), overrides);
        Ok(())
    }

    /// Sets the fields of `change` in `topic`'s overrides, durably.
    pub fn alter_topic(&mut self, topic: &str, change: &TopicSettings) -> Result<(), StoreError> {
        if !self.exists(topic) {
            return Err(StoreError::UnknownTopic(topic.to_string()));
        }
        let next = settings::apply(&self.overrides(topic), change);
        settings::store(&self.dir.join("topics").join(topic), &next)?;
        self.overrides.insert(topic.to_string(), next);
        Ok(())
    }

    /// What `topic.info` shows of `topic`'s log (`None`: no such topic).
    pub fn topic_stats(&self, topic: &str) -> Option<TopicStats> {
        let log = self.topics.get(topic)?;
        Some(TopicStats {
            last_seq: log.last_seq(),
            floor: log.floor(),
            bytes: log.size(),
            segments: u32::try_from(log.segment_count()).unwrap_or(u32::MAX),
            groups: log.groups().map(|(g, _)| g.to_string()).collect(),
            oldest_ms: log.oldest_ms(),
        })
    }

    /// Where removed files wait to be freed (emptied at open).
    pub fn trash_dir(&self) -> PathBuf {
        self.dir.join(TRASH)
    }

    /// Takes `topic` out of the store: its directory is renamed into the trash (the caller
    /// fsyncs [`RemovedTopic::dirs`] and removes the files once no sync job holds them), its
    /// settings, groups and ids are forgotten. Nothing changes on an error.
    pub fn remove_topic(&mut self, topic: &str) -> Result<RemovedTopic, StoreError> {
        let Some(log) = self.topics.get(topic) else {
            return Err(StoreError::UnknownTopic(topic.to_string()));
        };
        let messages = (log.last_seq() + 1).saturating_sub(log.floor());
        let bytes = log.size();
        let topics_dir = self.dir.join("topics");
        let trash_dir = self.dir.join(TRASH);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let trash = trash_dir.join(format!("{topic}.{nanos}"));
        std::fs::rename(topics_dir.join(topic), &trash)?;
        self.topics.remove(topic);
        self.overrides.remove(topic);
        self.dedup.remove_topic(topic);
        self.waiting.remove(topic);
        self.born.remove(topic);
        Ok(RemovedTopic {
            topic: topic.to_string(),
            trash,
            dirs: vec![topics_dir, trash_dir],
            messages,
            bytes,
        })
    }

    /// Keeps the record of a group of a topic that does not exist yet in memory (a subscribe
    /// creates no file); it is written at the head of the topic's first segment. At most
    /// [`MAX_WAITING_GROUPS`] of them.
    pub fn keep_waiting_group(
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
        let known = self
            .waiting
            .get(topic)
            .is_some_and(|w| w.contains_key(group));
        if !known && self.waiting_groups() >= MAX_WAITING_GROUPS {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "{MAX_WAITING_GROUPS} groups already wait for topics that do not exist yet"
            ))));
        }
        self.waiting
            .entry(topic.to_string())
            .or_default()
            .insert(group.to_string(), bytes);
        Ok(())
    }

    /// Whether `rec`, a record of `group` of the existing `topic`, belongs to an earlier topic
    /// of that name (deleted, and created again since the storage was opened): the store
    /// holds no record of the group in this topic, the group was created before this topic
    /// came to exist, and the record settles messages (a fresh record settles nothing and
    /// can do no harm). Such a record (an ack racing the deletion) must not be written into
    /// the new topic: its seqs start at 1 again, and the group would skip them.
    pub fn stale_group_record(&self, topic: &str, group: &str, rec: &GroupRecord) -> bool {
        let settled = rec.acked_floor > 0
            || !rec.acked_ranges.is_empty()
            || !rec.acked_above.is_empty()
            || !rec.attempts.is_empty();
        settled
            && self.born.get(topic).is_some_and(|&b| rec.created_ms < b)
            && self
                .topics
                .get(topic)
                .is_none_or(|log| log.group(group).is_none())
    }

    /// Group records kept for topics that do not exist yet.
    pub fn waiting_groups(&self) -> usize {
        self.waiting.values().map(|w| w.len()).sum()
    }

    /// Whether `topic` has groups waiting for it to exist.
    pub fn has_waiting_groups(&self, topic: &str) -> bool {
        self.waiting.get(topic).is_some_and(|w| !w.is_empty())
    }

    /// Removes a group's record: a tombstone in its topic's log (not yet durable: sync), or
    /// the record kept in memory for a topic that does not exist. `false`: there was none.
    /// All or nothing, like [`Storage::append`].
    pub fn delete_group(&mut self, topic: &str, group: &str) -> Result<bool, StoreError> {
        let Some(log) = self.topics.get_mut(topic) else {
            let w = self.waiting.get_mut(topic);
            let had = w.is_some_and(|w| w.remove(group).is_some());
            if self.waiting.get(topic).is_some_and(|w| w.is_empty()) {
                self.waiting.remove(topic);
            }
            return Ok(had);
        };
        let mark = log.mark();
        log.delete_group(group).or_else(|e| {
            log.rollback(mark)?;
            Err(e)
        })
    }

    /// The first seq of `topic` stored at or after `at_ms` (`last_seq + 1` if none; the
    /// floor for `0`).
    pub fn seq_at_time(&self, topic: &str, at_ms: u64) -> Result<u64, StoreError> {
        let log = self
            .topics
            .get(topic)
            .ok_or_else(|| StoreError::UnknownTopic(topic.to_string()))?;
        if at_ms == 0 {
            return Ok(log.floor());
        }
        log.seq_at_time(at_ms)
    }

    /// The lowest acked floor of `topic`'s groups (`None`: no group), from their newest
    /// written records.
    fn lowest_acked_floor(&self, topic: &str) -> Option<u64> {
        let log = self.topics.get(topic)?;
        let mut floor: Option<u64> = None;
        for (group, v) in log.groups() {
            match sluice_protocol::decode::<GroupRecord>(v) {
                Ok(rec) => floor = Some(floor.map_or(rec.acked_floor, |f| f.min(rec.acked_floor))),
                Err(e) => {
                    // Undecodable: it keeps everything (it may need anything).
                    tracing::error!(topic, group, error = %e, "undecodable group record: retention keeps its messages");
                    return Some(0);
                }
            }
        }
        floor
    }

    /// One retention step for `topic` at `now_ms`: rolls the segment appends go to when due
    /// (`segment_max_age_ms`, or a quarter of the topic's `max_age`; or every message expired)
    /// and takes out of the log the oldest whole segments its limits remove (at most
    /// `max_remove`, and only messages up to `durable`, the last durable seq). `pending_floor`:
    /// the lowest acked floor of the topic's group records queued and not yet written (a
    /// backward seek's, say), which `discard = "acked"` counts with the written ones. `None`:
    /// nothing to remove now (a roll may still have been written: not durable until the next
    /// sync).
    pub fn retention_step(
        &mut self,
        topic: &str,
        now_ms: u64,
        segment_max_age_ms: u64,
        durable: u64,
        pending_floor: Option<u64>,
        max_remove: usize,
    ) -> Result<Option<Trimmed>, StoreError> {
        let settings = self.settings(topic);
        let acked = match (self.lowest_acked_floor(topic), pending_floor) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        };
        let limits = Limits::of(&settings, acked, segment_max_age_ms);
        let Some(log) = self.topics.get_mut(topic) else {
            return Ok(None);
        };
        let segs = log.summaries();
        let p = plan(&segs, &limits, now_ms, max_remove);
        if p.roll {
            let mark = log.mark();
            if let Err(e) = log.roll_now() {
                log.rollback(mark)?;
                return Err(e);
            }
        }
        // Only segments whose messages are all durable (a burst can fill segments faster than
        // their syncs settle).
        let segs = log.summaries();
        let k = segs
            .iter()
            .take(p.remove)
            .take_while(|s| s.last_seq() <= durable)
            .count();
        if k == 0 {
            return Ok(None);
        }
        let old_floor = log.floor();
        let removed = log.detach_front(k);
        if removed.is_empty() {
            return Ok(None);
        }
        let floor = log.floor();
        let sync_first = log.segment_paths();
        let window = settings.dedup_window_ms.unwrap_or(0);
        let ids = if window > 0 {
            self.dedup
                .ids_between(topic, old_floor, floor, now_ms, window)
        } else {
            Vec::new()
        };
        Ok(Some(Trimmed {
            topic: topic.to_string(),
            dir: self.dir.join("topics").join(topic),
            removed,
            floor,
            why: p.why,
            sync_first,
            ids,
            dedup_window_ms: window,
            max_ids: self.dedup.max_total().min(super::dedup::MAX_IDS_PER_TOPIC),
        }))
    }

    /// Stores `messages` (all stored at `now_ms`) with their ids, leaving out each message
    /// whose id was stored within the topic's `dedup_window` or earlier in this call: those
    /// get their original's seq. Returns the messages stored (with their seqs), what the
    /// publish gets, and how many ids the index forgot early for want of room. Ids are
    /// remembered only once their messages are written (a failed write remembers none).
    pub fn append_dedup(
        &mut self,
        topic: &str,
        messages: Vec<StoredMessage>,
        ids: Vec<Option<SharedStr>>,
        now_ms: u64,
    ) -> Result<(Vec<StoredMessage>, Appended, Forgot), StoreError> {
        let window = self.settings(topic).dedup_window_ms.unwrap_or(0);
        let n = messages.len();
        // What each repeat is a repeat of: a seq the index knows, or an earlier message of
        // this call (by index in the call).
        enum Repeat {
            Known(u64),
            Of(usize),
        }
        // The repeats, by index (usually none: then the messages are stored as they came).
        let mut repeats: Vec<(usize, Repeat)> = Vec::new();
        // Each id to remember (call order, kept ids only) with its form, found once, and its
        // message's place among the kept ones. (The id as a `&str` is taken once here: each
        // `SharedStr` deref checks its UTF-8 again.)
        let mut forms: Vec<(&str, IdForm, usize)> =
            Vec::with_capacity(if window > 0 { n } else { 0 });
        if window > 0 {
            let dedup = &self.dedup;
            // The topic's index, looked up once for the call, and the runs of the producer
            // looked up last (a request's ids are usually one producer's).
            let index = dedup.topic(topic);
            // With them, numbers known not to be held: (lo, hi), from the last look-up.
            let mut runs: Option<(&str, Option<&Runs>, (u64, u64))> = None;
            // Repeats inside the call: while every id is a run id of one producer, each above
            // the one before, none can repeat (nothing to look up); past that, every id kept
            // goes in `seen` by its full key.
            let mut rising: Option<(&str, u64)> = None;
            let mut seen: Option<IdMap<usize>> = None;
            // The producer of the last run id, as bytes and as text: its UTF-8 is checked once
            // per request, not once per id (ids were checked when decoded; a `SharedStr`
            // deref checks again).
            let mut text_of: Option<(&[u8], &str)> = None;
            for (i, full) in ids.iter().enumerate() {
                let Some(full) = full.as_ref() else { continue };
                // `id`: the producer for a run id (all the index needs of it), else the id.
                let (id, form) = match split_id_bytes(full.as_bytes()) {
                    Some((producer, n)) => {
                        let text = match text_of {
                            Some((b, t)) if b == producer => t,
                            _ => {
                                let t = std::str::from_utf8(producer).unwrap_or_default();
                                text_of = Some((producer, t));
                                t
                            }
                        };
                        let split = producer.len();
                        (text, IdForm::Run { split, n })
                    }
                    None => (full.as_str(), IdForm::One(dedup.key(full))),
                };
                let known = match form {
                    IdForm::Run { split, n } => {
                        let producer = id.get(..split).unwrap_or_default();
                        if runs.is_none_or(|(p, _, _)| p != producer) {
                            let found = index.and_then(|ix| ix.runs_of(producer));
                            runs = Some((producer, found, (0, 0)));
                        }
                        match &mut runs {
                            Some((_, Some(r), gap)) if !(gap.0..gap.1).contains(&n) => {
                                match r.probe(n, now_ms, window) {
                                    Ok(seq) => Some(seq),
                                    Err(g) => {
                                        *gap = g;
                                        None
                                    }
                                }
                            }
                            _ => None,
                        }
                    }
                    IdForm::One(_) => index.and_then(|ix| ix.get(id, form, now_ms, window)),
                };
                if let Some(seq) = known {
                    repeats.push((i, Repeat::Known(seq)));
                    continue;
                }
                let still_rising = seen.is_none()
                    && match (form, &mut rising) {
                        (IdForm::Run { split, n }, None) => {
                            rising = Some((id.get(..split).unwrap_or_default(), n));
                            true
                        }
                        (IdForm::Run { split, n }, Some((producer, last))) => {
                            let up = id.get(..split) == Some(*producer) && n > *last;
                            *last = n;
                            up
                        }
                        (IdForm::One(_), _) => false,
                    };
                if !still_rising {
                    let seen = seen.get_or_insert_with(|| {
                        // Every id kept so far (all ids before this one but the repeats).
                        let mut s = IdMap::with_capacity_and_hasher(n, Default::default());
                        let mut r = repeats.iter().map(|(j, _)| *j).peekable();
                        for (j, k) in ids.iter().enumerate().take(i) {
                            if r.next_if_eq(&j).is_some() {
                                continue;
                            }
                            if let Some(k) = k {
                                s.insert(dedup.key(k), j);
                            }
                        }
                        s
                    });
                    match seen.entry(dedup.key(full)) {
                        Entry::Occupied(k) => {
                            repeats.push((i, Repeat::Of(*k.get())));
                            continue;
                        }
                        Entry::Vacant(v) => {
                            v.insert(i);
                        }
                    }
                }
                forms.push((id, form, i - repeats.len()));
            }
        }
        // Without repeats the call's messages are stored as they are; with some, the others.
        let (mut kept, kept_ids, place) = if repeats.is_empty() {
            (messages, None, None)
        } else {
            // Each message's place among the kept ones (repeats: none).
            let mut place: Vec<Option<usize>> = Vec::with_capacity(n);
            let mut kept = Vec::with_capacity(n - repeats.len());
            let mut kept_ids = Vec::with_capacity(n - repeats.len());
            let mut r = repeats.iter().map(|(j, _)| *j).peekable();
            for (i, (m, id)) in messages.into_iter().zip(&ids).enumerate() {
                if r.next_if_eq(&i).is_some() {
                    place.push(None);
                } else {
                    place.push(Some(kept.len()));
                    kept.push(m);
                    kept_ids.push(id.clone());
                }
            }
            (kept, Some(kept_ids), Some(place))
        };
        let mut forgotten = Forgot::default();
        if !kept.is_empty() {
            let first = self.append_ids(topic, &kept, Some(kept_ids.as_deref().unwrap_or(&ids)))?;
            for (i, m) in kept.iter_mut().enumerate() {
                m.seq = first + i as u64;
            }
            if window > 0 && !forms.is_empty() {
                // With the forms found above: a producer's consecutive ids go in as one run.
                let at = |k: usize| kept.get(k).map_or(now_ms, |m| m.timestamp_ms);
                let stored = forms
                    .into_iter()
                    .map(|(id, form, k)| (id, form, first + k as u64, at(k)));
                forgotten = self.dedup.insert_all(topic, stored);
            }
        }
        let Some(place) = place else {
            let first = kept.first().map_or(0, |m| m.seq);
            let last = kept.last().map_or(0, |m| m.seq);
            return Ok((kept, Appended::stored(first, last), forgotten));
        };
        let seq_of_kept = |i: usize| place.get(i).copied().flatten().and_then(|k| kept.get(k));
        let mut repeats = repeats.into_iter().peekable();
        let seqs: Vec<u64> = (0..n)
            .map(|i| match repeats.next_if(|(j, _)| *j == i) {
                Some((_, Repeat::Known(seq))) => seq,
                Some((_, Repeat::Of(j))) => seq_of_kept(j).map_or(0, |m| m.seq),
                None => seq_of_kept(i).map_or(0, |m| m.seq),
            })
            .collect();
        let appended = Appended {
            first_seq: seqs.iter().copied().min().unwrap_or(0),
            last_seq: seqs.iter().copied().max().unwrap_or(0),
            duplicate: true,
            seqs,
        };
        Ok((kept, appended, forgotten))
    }

    /// Forgets ids whose window ended, at most `max` per topic; returns how many were.
    pub fn expire_ids(&mut self, now_ms: u64, max: usize) -> usize {
        let (overrides, defaults) = (&self.overrides, &self.defaults);
        let window = |topic: &str| {
            let o = overrides.get(topic).cloned().unwrap_or_default();
            settings::in_force(&o, defaults)
                .dedup_window_ms
                .unwrap_or(0)
        };
        self.dedup.expire(window, now_ms, max)
    }

    /// Ids remembered (every topic) and the entries holding them.
    pub fn dedup_counts(&self) -> (u64, u64) {
        (self.dedup.ids() as u64, self.dedup.len() as u64)
    }

    /// Rebuilds every topic's dedup index from its log at `now_ms`: the ids of the messages
    /// stored within the topic's window, read from the chunks that hold ids in the segments
    /// that can hold such messages (the durable ones: open made the tails durable). Returns
    /// how many ids were found, and how many of them the bounds left out.
    pub fn rebuild_dedup(&mut self, now_ms: u64) -> Result<(usize, Forgot), StoreError> {
        self.dedup.clear();
        let mut found = 0;
        let mut forgot = Forgot::default();
        for topic in self.topic_names() {
            let window = self.settings(&topic).dedup_window_ms.unwrap_or(0);
            let Some(log) = self.topics.get(&topic) else {
                continue;
            };
            if window == 0 {
                continue;
            }
            // First the ids of messages retention removed (below the floor), then those of
            // the segments: in seq order.
            let dir = self.dir.join("topics").join(&topic);
            let floor = log.floor();
            let kept = ids_file::load(&dir).unwrap_or_else(|e| {
                tracing::error!(topic, error = %e, "cannot read the ids of removed messages: a repeat of one is stored again");
                Vec::new()
            });
            let live: Vec<ids_file::Entry> = kept
                .iter()
                .filter(|h| h.at_ms.saturating_add(window) > now_ms && h.seq < floor)
                .cloned()
                .collect();
            found += live.iter().map(|h| h.count() as usize).sum::<usize>();
            forgot.add(self.dedup.insert_held(&topic, &live));
            if live.len() != kept.len() || (kept.is_empty() && dir.join(ids_file::FILE).exists()) {
                // Pruned (or damaged): written again with what is left.
                if let Err(e) = ids_file::store(&dir, &live) {
                    tracing::warn!(topic, error = %e, "cannot prune the ids of removed messages");
                }
            }
            let since = now_ms.saturating_sub(window);
            let dedup = &mut self.dedup;
            log.scan_tagged(since, CHUNK_VERSION_IDS, |first, body| {
                let Ok(records) = chunk_records(&body) else {
                    return;
                };
                // One insert per chunk, so that a producer's consecutive ids go back in as
                // the run they were.
                let ids: Vec<_> = records
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        let (ts, id) = decode_id(body.get(r)?)?;
                        (ts.saturating_add(window) > now_ms)
                            .then(|| (id, dedup.form(id), first + i as u64, ts))
                    })
                    .collect();
                found += ids.len();
                forgot.add(dedup.insert_all(&topic, ids));
            })?;
        }
        Ok((found, forgot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::BTreeMap;

    fn msg(ts: u64, p: &str) -> StoredMessage {
        StoredMessage {
            seq: 0,
            timestamp_ms: ts,
            key: None,
            headers: BTreeMap::new(),
            priority: 0,
            payload: Bytes::from(p.to_string()),
        }
    }

    fn record(acked_floor: u64) -> GroupRecord {
        GroupRecord {
            mode: sluice_protocol::GroupMode::Shared,
            filters: BTreeMap::new(),
            acked_floor,
            acked_above: vec![],
            acked_ranges: vec![],
            created_ms: 0,
            backoff_ms: vec![],
            attempts: vec![],
        }
    }

    /// A storage with 64 KiB segments and `segments` of them filled with 1 KiB messages stored
    /// at `ts` (the last one taking appends), synced.
    fn filled(dir: &Path, ts: u64) -> Storage {
        let mut s = Storage::open(dir, 1 << 20).unwrap();
        s.set_segment_bytes(64 * 1024);
        let body = "x".repeat(1000);
        for _ in 0..10 {
            let batch: Vec<_> = (0..20).map(|_| msg(ts, &body)).collect();
            s.append("t", &batch).unwrap();
        }
        s.put_group("t", "g", &record(7)).unwrap();
        s.sync().unwrap();
        s
    }

    fn unlink(t: &Trimmed) {
        for d in &t.removed {
            std::fs::remove_file(&d.path).unwrap();
        }
    }

    fn age(ms: u64) -> TopicSettings {
        TopicSettings {
            max_age_ms: Some(ms),
            ..Default::default()
        }
    }

    #[test]
    fn expired_segments_go_whole_and_the_floor_and_head_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = filled(dir.path(), 1_000);
        // Newer messages in the segment taking appends.
        s.append("t", &[msg(50_000, "new")]).unwrap();
        s.sync().unwrap();
        s.create_topic_settings_for_test("t", age(10_000));
        let segs = s.topics["t"].segment_count();
        assert!(segs >= 3, "{segs} segments");
        let t = s
            .retention_step("t", 55_000, 3_600_000, 201, None, 1000)
            .unwrap()
            .expect("removes");
        assert_eq!(t.why, "max_age");
        assert_eq!(t.removed.len(), segs - 1, "all but the one taking appends");
        let floor = t.floor;
        assert!(floor > 1 && floor <= 201, "floor {floor}");
        assert_eq!(t.messages(), floor - 1);
        // Reads below the floor start at it and say so.
        let r = s.read("t", 1, 5, usize::MAX).unwrap();
        assert_eq!(r.floor, floor);
        assert_eq!(r.messages[0].seq, floor);
        unlink(&t);
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.topic_stats("t").unwrap().floor, floor);
        assert_eq!(s.last_seq("t"), 201);
        assert_eq!(s.group("t", "g").unwrap().unwrap().acked_floor, 7);
    }

    #[test]
    fn a_crash_while_a_removed_segment_is_cut_down_leaves_it_in_the_trash_never_in_the_log() {
        use crate::store::remover::{FreeStats, Freer, Pace};
        let dir = tempfile::tempdir().unwrap();
        let mut s = filled(dir.path(), 1_000);
        s.append("t", &[msg(50_000, "new")]).unwrap();
        s.sync().unwrap();
        s.create_topic_settings_for_test("t", age(10_000));
        let t = s
            .retention_step("t", 55_000, 3_600_000, 201, None, 1000)
            .unwrap()
            .expect("removes");
        let floor = t.floor;
        let stats = std::sync::Arc::new(FreeStats::default());
        let mut freer = Freer::new(
            s.trash_dir(),
            Pace {
                rate: 1,
                step: 1024,
            },
            stats.clone(),
        );
        let total: u64 = t
            .removed
            .iter()
            .map(|d| std::fs::metadata(&d.path).unwrap().len())
            .sum();
        for d in &t.removed {
            freer.take(&d.path).unwrap();
            assert!(!d.path.exists(), "out of the topic's directory at once");
        }
        // One step: the first file is cut down by 1 KiB, then the broker dies.
        freer.step();
        assert_eq!(stats.steps.load(std::sync::atomic::Ordering::Relaxed), 1);
        let cut: Vec<u64> = std::fs::read_dir(s.trash_dir())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(cut.len(), t.removed.len());
        assert_eq!(
            cut.iter().sum::<u64>(),
            total - 1024,
            "one cut down: {cut:?}"
        );
        drop(freer);
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            std::fs::read_dir(s.trash_dir()).unwrap().count(),
            0,
            "the trash is emptied at open"
        );
        let st = s.topic_stats("t").unwrap();
        assert_eq!((st.floor, st.last_seq), (floor, 201));
        let r = s.read("t", 1, 5, usize::MAX).unwrap();
        assert_eq!((r.floor, r.messages[0].seq), (floor, floor));
        assert_eq!(s.group("t", "g").unwrap().unwrap().acked_floor, 7);
    }

    #[test]
    fn when_every_message_expired_an_empty_segment_keeps_the_head_and_the_groups() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = filled(dir.path(), 1_000);
        s.create_topic_settings_for_test("t", age(10_000));
        let t = s
            .retention_step("t", 60_000, 3_600_000, 200, None, 1000)
            .unwrap()
            .expect("removes");
        assert_eq!(t.floor, 201);
        assert_eq!(t.messages(), 200);
        // The roll is synced before the files go (the store does it through its pipeline).
        s.sync().unwrap();
        unlink(&t);
        assert_eq!(s.topics["t"].segment_count(), 1);
        drop(s);
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        let st = s.topic_stats("t").unwrap();
        assert_eq!((st.last_seq, st.floor, st.segments), (200, 201, 1));
        assert_eq!(s.group("t", "g").unwrap().unwrap().acked_floor, 7);
        assert_eq!(s.append("t", &[msg(70_000, "next")]).unwrap(), 201);
    }

    #[test]
    fn by_size_the_oldest_go_and_acked_only_below_every_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = filled(dir.path(), 1_000);
        s.create_topic_settings_for_test(
            "t",
            TopicSettings {
                max_bytes: Some(100 * 1024),
                ..Default::default()
            },
        );
        let t = s
            .retention_step("t", 2_000, 3_600_000, 200, None, 1000)
            .unwrap()
            .expect("removes");
        assert_eq!(t.why, "max_bytes");
        assert!(s.topic_stats("t").unwrap().bytes <= 100 * 1024 + 64 * 1024);
        // Only what is durable goes.
        let dir2 = tempfile::tempdir().unwrap();
        let mut s = filled(dir2.path(), 1_000);
        s.create_topic_settings_for_test(
            "t",
            TopicSettings {
                discard: Some(sluice_protocol::Discard::Acked),
                ..Default::default()
            },
        );
        // The group acked up to 7: nothing wholly below it.
        assert!(s
            .retention_step("t", 2_000, 3_600_000, 200, None, 1000)
            .unwrap()
            .is_none());
        s.put_group("t", "g", &record(130)).unwrap();
        s.put_group("t", "h", &record(200)).unwrap();
        s.sync().unwrap();
        let t = s
            .retention_step("t", 2_000, 3_600_000, 200, None, 1000)
            .unwrap()
            .expect("removes");
        assert_eq!(t.why, "acked");
        assert!(
            t.floor <= 131,
            "nothing above the lowest group's floor: {}",
            t.floor
        );
        assert!(t.floor > 1);
        let none = s
            .retention_step("t", 2_000, 3_600_000, 0, None, 1000)
            .unwrap();
        assert!(none.is_none(), "nothing not durable goes");
    }

    #[test]
    fn a_deleted_group_stays_deleted_and_is_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = filled(dir.path(), 1_000);
        s.put_group("t", "h", &record(3)).unwrap();
        assert!(s.delete_group("t", "g").unwrap());
        assert!(!s.delete_group("t", "nope").unwrap());
        // Roll: the new segment's copies hold h only.
        s.topics.get_mut("t").unwrap().roll_now().unwrap();
        s.sync().unwrap();
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.group("t", "g").unwrap(), None);
        assert_eq!(s.group("t", "h").unwrap().unwrap().acked_floor, 3);
    }

    #[test]
    fn groups_of_a_missing_topic_stay_in_memory_until_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.keep_waiting_group("later", "g", &record(0)).unwrap();
        assert!(!dir.path().join("topics/later").exists(), "no file");
        assert_eq!(s.group("later", "g").unwrap(), Some(record(0)));
        assert_eq!(s.all_groups().unwrap().len(), 1);
        s.append("later", &[msg(1, "a")]).unwrap();
        s.sync().unwrap();
        assert_eq!(s.waiting_groups(), 0);
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.group("later", "g").unwrap(), Some(record(0)));
    }

    #[test]
    fn seqs_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.set_segment_bytes(64 * 1024);
        let body = "y".repeat(1000);
        for k in 0..10u64 {
            let batch: Vec<_> = (0..20).map(|_| msg(1000 * (k + 1), &body)).collect();
            s.append("t", &batch).unwrap();
        }
        s.sync().unwrap();
        assert_eq!(s.seq_at_time("t", 0).unwrap(), 1);
        assert_eq!(s.seq_at_time("t", 1000).unwrap(), 1);
        assert_eq!(s.seq_at_time("t", 1001).unwrap(), 21);
        assert_eq!(s.seq_at_time("t", 5000).unwrap(), 81);
        assert_eq!(
            s.seq_at_time("t", 10_001).unwrap(),
            201,
            "after the last: head + 1"
        );
        drop(s);
        let s = Storage::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            s.seq_at_time("t", 9500).unwrap(),
            181,
            "times read back at open"
        );
        assert!(matches!(
            s.seq_at_time("nope", 1),
            Err(StoreError::UnknownTopic(_))
        ));
    }

    #[test]
    fn ids_are_stored_once_within_their_window_and_remembered_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.set_defaults(TopicSettings {
            dedup_window_ms: Some(10_000),
            ..Default::default()
        });
        let ids = |v: &[Option<&str>]| v.iter().map(|i| i.map(SharedStr::from)).collect();
        let (kept, a, _) = s
            .append_dedup(
                "t",
                vec![
                    msg(1000, "a"),
                    msg(1000, "b"),
                    msg(1000, "a again"),
                    msg(1000, "c"),
                ],
                ids(&[Some("a"), Some("b"), Some("a"), None]),
                1000,
            )
            .unwrap();
        assert_eq!(kept.len(), 3);
        assert!(a.duplicate);
        assert_eq!(a.seqs, vec![1, 2, 1, 3]);
        let (kept, a, _) = s
            .append_dedup("t", vec![msg(2000, "b")], ids(&[Some("b")]), 2000)
            .unwrap();
        assert!(kept.is_empty());
        assert_eq!((a.first_seq, a.last_seq, a.seqs), (2, 2, vec![2]));
        s.sync().unwrap();
        drop(s);
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.set_defaults(TopicSettings {
            dedup_window_ms: Some(10_000),
            ..Default::default()
        });
        assert_eq!(s.rebuild_dedup(5000).unwrap().0, 2);
        let (kept, a, _) = s
            .append_dedup("t", vec![msg(5000, "a")], ids(&[Some("a")]), 5000)
            .unwrap();
        assert!(kept.is_empty() && a.duplicate && a.seqs == vec![1]);
        // Past the window: stored again.
        let (kept, a, _) = s
            .append_dedup("t", vec![msg(11_000, "a")], ids(&[Some("a")]), 11_000)
            .unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(a, Appended::stored(4, 4));
        // Old records (no id) read as before; the id is not served.
        let r = s.read("t", 1, 10, usize::MAX).unwrap();
        assert_eq!(r.messages.len(), 4);
        assert_eq!(r.messages[0].payload, Bytes::from("a"));
    }

    #[test]
    fn producer_ids_repeat_inside_a_request_and_across_a_reopen_as_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.set_defaults(TopicSettings {
            dedup_window_ms: Some(10_000),
            ..Default::default()
        });
        let ids = |v: &[&str]| v.iter().map(|i| Some(SharedStr::from(*i))).collect();
        let msgs = |n: usize| {
            (0..n)
                .map(|i| msg(1000, &format!("m{i}")))
                .collect::<Vec<_>>()
        };
        // Rising ids of one producer: stored, one entry.
        let (kept, a, _) = s
            .append_dedup("t", msgs(3), ids(&["p-1", "p-2", "p-3"]), 1000)
            .unwrap();
        assert_eq!((kept.len(), a), (3, Appended::stored(1, 3)));
        assert_eq!(s.dedup.len(), 1);
        // Repeats inside a request after rising ones (p-5 again, p-4 below the last), of
        // another producer, of an id held alone, and of the first request.
        let (kept, a, _) = s
            .append_dedup(
                "t",
                msgs(8),
                ids(&["p-4", "p-5", "p-5", "q-9", "p-4", "x", "x", "p-2"]),
                1000,
            )
            .unwrap();
        assert_eq!(kept.len(), 4);
        assert!(a.duplicate);
        assert_eq!(a.seqs, vec![4, 5, 5, 6, 4, 7, 7, 2]);
        s.sync().unwrap();
        drop(s);
        let mut s = Storage::open(dir.path(), 1 << 20).unwrap();
        s.set_defaults(TopicSettings {
            dedup_window_ms: Some(10_000),
            ..Default::default()
        });
        assert_eq!(s.rebuild_dedup(5000).unwrap().0, 7);
        assert_eq!(s.dedup.len(), 4, "p-1..3, p-4..5, q-9, x");
        let (kept, a, _) = s
            .append_dedup("t", msgs(3), ids(&["p-3", "p-5", "p-6"]), 5000)
            .unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(a.seqs, vec![3, 5, 8]);
    }

    impl Storage {
        /// Sets `topic`'s overrides without writing them (tests).
        fn create_topic_settings_for_test(&mut self, topic: &str, o: TopicSettings) {
            self.overrides.insert(topic.to_string(), o);
        }
    }
}
