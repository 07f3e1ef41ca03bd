//! The idempotent-publish index: per topic, message id → (seq, store time) for the ids stored
//! within the topic's `dedup_window` (see `store/retention.md`, "The dedup index").
//!
//! Ids of the form `<producer>-<n>` (the SDK's: `n` a decimal number without leading zeros)
//! are held as **runs**: the ids `<producer>-<n0>` … `<producer>-<n0 + len - 1>` stored as the
//! seqs `seq0` … `seq0 + len - 1` at one store time are one entry, so a request of a producer's
//! consecutive ids costs one entry, one map insert and no hashing of each id. Any other id is
//! held alone, keyed by a keyed 128-bit hash of it ([`IdKeys::key`]). Both are the same ids to
//! the index: an id is an id, whatever its form; the form only decides how it is held.
//!
//! Two bounds hold it, counted in entries (an id held alone, or a run): at most
//! [`MAX_IDS_PER_TOPIC`] per topic, and at most `dedup_max_ids` (broker setting, default
//! [`DEFAULT_MAX_IDS`]) over every topic, so that a client publishing ids to many topics
//! (auto-created) cannot take the broker's memory. Past either, the oldest entries (of the
//! topic, or of every topic) are forgotten before their window ends.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Most entries (ids held alone, or runs) one topic's index holds: past it the topic's oldest
/// are forgotten before their window ends (counted, and a `memory_pressure` event).
pub const MAX_IDS_PER_TOPIC: usize = 1_000_000;

/// Most entries the indexes of every topic hold together unless configured (`dedup_max_ids`):
/// about 250 MB with ids of 128 bytes held alone, far less for runs.
pub const DEFAULT_MAX_IDS: usize = 1_000_000;

/// An id's key in the index: a keyed 128-bit hash of it ([`IdKeys::key`]). Two ids are the
/// same id for the index when their keys are equal. The hash is keyed with a random key the
/// client never sees, so a client cannot craft two ids with one key (to have a message taken
/// for another's repeat); and with 128 bits an accidental collision is negligible: among a
/// million ids held at once, about 2^-88.
pub type IdKey = u128;

/// Makes [`IdKey`]s: std's keyed SipHash (SipHash-1-3 today) with a random key drawn when the
/// index is made, run twice over the id with a different leading byte, the two 64-bit outputs
/// making the 128-bit key. (Distinct inputs to one keyed PRF give independent outputs; two
/// `RandomState`s made on one thread would have related keys, `k0` and `k0 + 1`.)
#[derive(Debug, Clone)]
pub struct IdKeys(RandomState);

impl Default for IdKeys {
    fn default() -> Self {
        IdKeys(RandomState::new())
    }
}

impl IdKeys {
    /// `id`'s key.
    pub fn key(&self, id: &str) -> IdKey {
        let half = |domain: u8| {
            let mut h = self.0.build_hasher();
            h.write_u8(domain);
            h.write(id.as_bytes());
            h.finish()
        };
        (u128::from(half(0)) << 64) | u128::from(half(1))
    }
}

/// A hasher for maps keyed by [`IdKey`]: the key is already a keyed hash, so its low 64 bits
/// are the map's hash (no second hash per lookup).
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used (for `IdKey`s); anything else is folded in, still correct.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, k: u128) {
        self.0 ^= k as u64;
    }
}

/// A map keyed by [`IdKey`].
pub type IdMap<V> = HashMap<IdKey, V, BuildHasherDefault<PassThrough>>;

/// `id` as `(producer, n)` when it has the form `<producer>-<n>`: a non-empty producer, then
/// `n` in decimal without leading zeros (at most 19 digits, so it fits a `u64` with room for
/// any run after it). Such ids are held as runs; `None` for any other id.
pub fn split_id(id: &str) -> Option<(&str, u64)> {
    let (producer, n) = split_id_bytes(id.as_bytes())?;
    Some((id.get(..producer.len())?, n))
}

/// [`split_id`] of an id's bytes.
pub fn split_id_bytes(b: &[u8]) -> Option<(&[u8], u64)> {
    // The digits at the end, then the dash before them (one pass from the end).
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let dash = b.len().checked_sub(digits + 1)?;
    if dash == 0
        || b.get(dash) != Some(&b'-')
        || digits == 0
        || digits > 19
        || (digits > 1 && b.get(dash + 1) == Some(&b'0'))
    {
        return None;
    }
    let n = b
        .get(dash + 1..)?
        .iter()
        .fold(0u64, |n, c| n * 10 + u64::from(c - b'0'));
    Some((b.get(..dash)?, n))
}

/// How the index holds an id ([`Dedup::form`]): alone, by its key, or in a run, by its
/// producer (`id[..split]`) and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdForm {
    /// Held alone.
    One(IdKey),
    /// `<producer>-<n>` with the producer `id[..split]`.
    Run {
        /// Length of the producer part.
        split: usize,
        /// The number.
        n: u64,
    },
}

/// Ids the index holds for a range of seqs, as [`Dedup::ids_between`] gives them (and
/// `dedup.ids` keeps them): one id, or a run of a producer's consecutive ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Store time, ms.
    pub at_ms: u64,
    /// Seq of the (first) id.
    pub seq: u64,
    /// Which ids.
    pub ids: HeldIds,
}

/// The ids of a [`Held`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldIds {
    /// One id, stored as `seq`.
    One(Arc<str>),
    /// `<producer>-<n>` … `<producer>-<n + len - 1>`, stored as `seq` … `seq + len - 1`.
    Run {
        /// The producer.
        producer: Arc<str>,
        /// The first number.
        n: u64,
        /// How many.
        len: u64,
    },
}

impl Held {
    /// Ids it stands for.
    pub fn count(&self) -> u64 {
        match &self.ids {
            HeldIds::One(_) => 1,
            HeldIds::Run { len, .. } => *len,
        }
    }

    /// Its ids as strings with their seqs (tests, and a look at a small one).
    pub fn expand(&self) -> Vec<(u64, String)> {
        match &self.ids {
            HeldIds::One(id) => vec![(self.seq, id.to_string())],
            HeldIds::Run { producer, n, len } => (0..*len)
                .map(|i| (self.seq + i, format!("{producer}-{}", n + i)))
                .collect(),
        }
    }
}

/// One entry of a topic's store-order queue.
#[derive(Debug)]
struct Slot {
    /// Store time, ms.
    at: u64,
    /// Seq of its (first) id.
    seq: u64,
    what: What,
}

#[derive(Debug)]
enum What {
    One {
        key: IdKey,
        id: Box<str>,
    },
    Run {
        producer: Arc<str>,
        n: u64,
        len: u64,
    },
}

/// A run as its producer's map holds it: (seq of its first id, length, store time).
type RunValue = (u64, u64, u64);

/// One producer's runs in a topic, by first number.
#[derive(Debug, Default)]
pub struct Runs {
    runs: BTreeMap<u64, RunValue>,
    /// Above every number held (never lowered: a number at or above it is not held).
    end: u64,
}

impl Runs {
    /// The seq number `n` was stored with, if that was less than `window_ms` before `now_ms`.
    pub fn get(&self, n: u64, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.probe(n, now_ms, window_ms).ok()
    }

    /// [`Runs::get`], or when `n` is not held, a range of numbers around it none of which is
    /// (so that the next numbers of a request need no look-up while they fall in it).
    pub fn probe(&self, n: u64, now_ms: u64, window_ms: u64) -> Result<u64, (u64, u64)> {
        if n >= self.end {
            return Err((self.end, u64::MAX));
        }
        let below = self.runs.range(..=n).next_back();
        if let Some((n0, (seq0, len, at))) = below {
            if n - n0 < *len {
                return if at.saturating_add(window_ms) > now_ms {
                    Ok(seq0 + (n - n0))
                } else {
                    Err((n, n + 1))
                };
            }
        }
        let lo = below.map_or(0, |(n0, (_, len, _))| n0 + len);
        let hi = self
            .runs
            .range(n + 1..)
            .next()
            .map_or(u64::MAX, |(n0, _)| *n0);
        Err((lo, hi))
    }

    /// Adds a run; runs it overlaps (stored earlier, their window over, or being rebuilt in
    /// store order) are dropped from the map (their queue slots stay until they expire).
    fn put(&mut self, n: u64, seq: u64, len: u64, at: u64) {
        let end = n + len;
        if n < self.end {
            let stale: Vec<u64> = self
                .runs
                .range(..end)
                .rev()
                .take_while(|(n0, (_, l, _))| *n0 + *l > n)
                .map(|(n0, _)| *n0)
                .collect();
            for n0 in stale {
                self.runs.remove(&n0);
            }
        }
        self.runs.insert(n, (seq, len, at));
        self.end = self.end.max(end);
    }
}

/// One topic's ids, in the order they were stored.
#[derive(Debug, Default)]
pub struct DedupIndex {
    /// Ids held alone: key → (seq, store time in ms).
    ones: IdMap<(u64, u64)>,
    /// Runs, by producer.
    producers: HashMap<Arc<str>, Runs>,
    /// Every entry in store order (so by seq): what expires next.
    order: VecDeque<Slot>,
    /// Ids the entries of `order` stand for.
    ids: usize,
}

impl DedupIndex {
    /// The seq `id` (of form `form`, from [`Dedup::form`]) was stored with, if that was less
    /// than `window_ms` before `now_ms`.
    pub fn get(&self, id: &str, form: IdForm, now_ms: u64, window_ms: u64) -> Option<u64> {
        match form {
            IdForm::One(key) => self
                .ones
                .get(&key)
                .filter(|(_, at)| at.saturating_add(window_ms) > now_ms)
                .map(|(seq, _)| *seq),
            IdForm::Run { split, n } => self.runs_of(id.get(..split)?)?.get(n, now_ms, window_ms),
        }
    }

    /// `producer`'s runs (look them up once for many numbers of one producer).
    pub fn runs_of(&self, producer: &str) -> Option<&Runs> {
        self.producers.get(producer)
    }

    fn push_one(&mut self, key: IdKey, id: &str, seq: u64, at: u64) {
        self.ones.insert(key, (seq, at));
        self.order.push_back(Slot {
            at,
            seq,
            what: What::One {
                key,
                id: Box::from(id),
            },
        });
        self.ids += 1;
    }

    fn push_run(&mut self, producer: &str, n: u64, seq: u64, len: u64, at: u64) {
        let name = match self.producers.get_key_value(producer) {
            Some((k, _)) => k.clone(),
            None => Arc::from(producer),
        };
        self.producers
            .entry(name.clone())
            .or_default()
            .put(n, seq, len, at);
        self.order.push_back(Slot {
            at,
            seq,
            what: What::Run {
                producer: name,
                n,
                len,
            },
        });
        self.ids += len as usize;
    }

    fn pop_front(&mut self) {
        let Some(Slot { seq, what, .. }) = self.order.pop_front() else {
            return;
        };
        match what {
            What::One { key, .. } => {
                self.ids = self.ids.saturating_sub(1);
                // A later store of the same id (after its window) has its own entry.
                if self.ones.get(&key).is_some_and(|(s, _)| *s == seq) {
                    self.ones.remove(&key);
                }
            }
            What::Run { producer, n, len } => {
                self.ids = self.ids.saturating_sub(len as usize);
                if let Some(runs) = self.producers.get_mut(&producer) {
                    if runs.runs.get(&n).is_some_and(|(s, _, _)| *s == seq) {
                        runs.runs.remove(&n);
                    }
                    if runs.runs.is_empty() {
                        self.producers.remove(&producer);
                    }
                }
            }
        }
    }

    /// Store time of the oldest entry held.
    fn front_ms(&self) -> Option<u64> {
        self.order.front().map(|s| s.at)
    }

    /// Entries held (ids held alone, and runs).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Ids held.
    pub fn ids(&self) -> usize {
        self.ids
    }

    /// Whether it holds no id.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How many entries an insert made the index forget before their window ended, by bound.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgot {
    /// The topic held [`MAX_IDS_PER_TOPIC`] entries.
    pub topic_bound: u64,
    /// Every topic together held `dedup_max_ids`.
    pub broker_bound: u64,
}

impl Forgot {
    /// Entries forgotten, both bounds.
    pub fn total(&self) -> u64 {
        self.topic_bound + self.broker_bound
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: Forgot) {
        self.topic_bound += other.topic_bound;
        self.broker_bound += other.broker_bound;
    }
}

/// An id to insert ([`Dedup::insert_all`]): the id, its form, its seq and store time.
pub type NewId<'a> = (&'a str, IdForm, u64, u64);

/// The ids of every topic, under both bounds.
#[derive(Debug)]
pub struct Dedup {
    topics: HashMap<Arc<str>, DedupIndex>,
    /// (store time of its oldest entry, topic) of every topic holding ids: where the broker's
    /// oldest entry is, without a look at every topic.
    fronts: BTreeSet<(u64, Arc<str>)>,
    /// Entries held, every topic.
    total: usize,
    /// Ids held, every topic.
    ids: usize,
    /// Most entries held, every topic.
    max_total: usize,
    /// Most entries held per topic.
    per_topic: usize,
    /// Entries forgotten before their window ended, since the start.
    forgotten: u64,
    /// How ids held alone are keyed.
    keys: IdKeys,
}

impl Default for Dedup {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_IDS)
    }
}

/// A run being gathered by [`Dedup::insert_all`]: (producer, n, seq, len, at).
type Gathered<'a> = (&'a str, u64, u64, u64, u64);

impl Dedup {
    /// Empty indexes holding at most `max_total` entries together (and [`MAX_IDS_PER_TOPIC`]
    /// per topic).
    pub fn new(max_total: usize) -> Self {
        Self::with_bounds(max_total, MAX_IDS_PER_TOPIC)
    }

    /// Empty indexes holding at most `max_total` entries together and `per_topic` per topic.
    pub fn with_bounds(max_total: usize, per_topic: usize) -> Self {
        let max_total = max_total.max(1);
        Dedup {
            topics: HashMap::new(),
            fronts: BTreeSet::new(),
            total: 0,
            ids: 0,
            max_total,
            per_topic: per_topic.clamp(1, max_total),
            forgotten: 0,
            keys: IdKeys::default(),
        }
    }

    /// Most entries held, every topic together.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// `id`'s key in these indexes (for an id held alone).
    pub fn key(&self, id: &str) -> IdKey {
        self.keys.key(id)
    }

    /// How these indexes hold `id`: in a run if it has the form `<producer>-<n>`
    /// ([`split_id`]), else alone by its key.
    pub fn form(&self, id: &str) -> IdForm {
        match split_id(id) {
            Some((producer, n)) => IdForm::Run {
                split: producer.len(),
                n,
            },
            None => IdForm::One(self.key(id)),
        }
    }

    /// `topic`'s index, if it holds ids: look it up once per request, then
    /// [`DedupIndex::get`] each id.
    pub fn topic(&self, topic: &str) -> Option<&DedupIndex> {
        self.topics.get(topic)
    }

    /// The seq `id` was stored with in `topic`, if that was less than `window_ms` before
    /// `now_ms`.
    pub fn get(&self, topic: &str, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.topics
            .get(topic)?
            .get(id, self.form(id), now_ms, window_ms)
    }

    /// Runs `f` on `topic`'s index (made if missing) and keeps `fronts` and the totals in step
    /// with what it did; a topic left without ids is dropped.
    fn with_topic<R>(&mut self, topic: &str, f: impl FnOnce(&mut DedupIndex) -> R) -> R {
        let key = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        let ix = self.topics.entry(key.clone()).or_default();
        let (before_len, before_ids, before_front) = (ix.len(), ix.ids, ix.front_ms());
        let r = f(ix);
        let (after_len, after_ids, after_front) = (ix.len(), ix.ids, ix.front_ms());
        self.total = (self.total + after_len).saturating_sub(before_len);
        self.ids = (self.ids + after_ids).saturating_sub(before_ids);
        if before_front != after_front {
            if let Some(at) = before_front {
                self.fronts.remove(&(at, key.clone()));
            }
            if let Some(at) = after_front {
                self.fronts.insert((at, key.clone()));
            }
        }
        if after_len == 0 {
            self.topics.remove(&key);
        }
        r
    }

    /// Remembers `id` as stored in `topic` with `seq` at `at_ms`. Returns how many older
    /// entries were forgotten to make room (none unless a bound was reached).
    pub fn insert(&mut self, topic: &str, id: &str, seq: u64, at_ms: u64) -> Forgot {
        let form = self.form(id);
        self.insert_all(topic, [(id, form, seq, at_ms)])
    }

    /// Remembers what `dedup.ids` kept (`held`, in seq order) as stored in `topic`.
    pub fn insert_held(&mut self, topic: &str, held: &[Held]) -> Forgot {
        let mut forgot = Forgot::default();
        for h in held {
            match &h.ids {
                HeldIds::One(id) => forgot.add(self.insert(topic, id, h.seq, h.at_ms)),
                HeldIds::Run { producer, n, len } => {
                    forgot.add(self.insert_entries(topic, |ix, trim| {
                        ix.push_run(producer, *n, h.seq, *len, h.at_ms);
                        trim(ix);
                    }));
                }
            }
        }
        forgot
    }

    /// Remembers each (id, form from [`Dedup::form`], seq, store time) as stored in `topic`,
    /// in order (seqs rising): the same as an [`Dedup::insert`] of each in turn, with one
    /// look-up of the topic; a producer's consecutive ids stored as consecutive seqs at one
    /// time go in as one run. Returns how many older entries were forgotten to make room.
    pub fn insert_all<'a>(
        &mut self,
        topic: &str,
        ids: impl IntoIterator<Item = NewId<'a>>,
    ) -> Forgot {
        self.insert_entries(topic, |ix, trim| {
            let mut run: Option<Gathered<'a>> = None;
            let flush = |ix: &mut DedupIndex, trim: &mut dyn FnMut(&mut DedupIndex), run| {
                if let Some((producer, n, seq, len, at)) = run {
                    ix.push_run(producer, n, seq, len, at);
                    trim(ix);
                }
            };
            for (id, form, seq, at) in ids {
                match form {
                    IdForm::Run { split, n } => {
                        let producer = id.get(..split).unwrap_or(id);
                        if let Some((p, n0, seq0, len, at0)) = &mut run {
                            if *p == producer
                                && n0.checked_add(*len) == Some(n)
                                && *seq0 + *len == seq
                                && *at0 == at
                            {
                                *len += 1;
                                continue;
                            }
                        }
                        flush(ix, trim, run.take());
                        run = Some((producer, n, seq, 1, at));
                    }
                    IdForm::One(key) => {
                        flush(ix, trim, run.take());
                        ix.push_one(key, id, seq, at);
                        trim(ix);
                    }
                }
            }
            flush(ix, trim, run.take());
        })
    }

    /// Runs `fill` on `topic`'s index, taken out of the map; `fill` calls its `trim` argument
    /// after each entry it pushes, which keeps both bounds (forgetting the topic's oldest, or
    /// the oldest of all topics, which may be the one just pushed). Returns what was
    /// forgotten.
    fn insert_entries(
        &mut self,
        topic: &str,
        fill: impl FnOnce(&mut DedupIndex, &mut dyn FnMut(&mut DedupIndex)),
    ) -> Forgot {
        // The topic's index is taken out while the ids go in, so that the broker's bound can
        // take other topics' oldest; its `fronts` entry is out with it and put back after.
        let (name, mut ix) = match self.topics.remove_entry(topic) {
            Some(e) => e,
            None => (Arc::from(topic), DedupIndex::default()),
        };
        if let Some(at) = ix.front_ms() {
            self.fronts.remove(&(at, name.clone()));
        }
        // While `ix` is out, the totals count the other topics only.
        self.total -= ix.len().min(self.total);
        self.ids -= ix.ids.min(self.ids);
        let mut forgot = Forgot::default();
        {
            let (per_topic, max_total) = (self.per_topic, self.max_total);
            let this = &mut *self;
            let mut trim = |ix: &mut DedupIndex| {
                while ix.len() > per_topic {
                    ix.pop_front();
                    forgot.topic_bound += 1;
                }
                while ix.len() + this.total > max_total {
                    // The oldest of all: this topic's, or the first of the others'.
                    let ours = ix.front_ms();
                    let theirs = this.fronts.first().map(|(at, t)| (*at, t.clone()));
                    match (ours, theirs) {
                        (Some(o), Some((at, t))) if (at, &t) < (o, &name) => {
                            this.with_topic(&t, DedupIndex::pop_front);
                        }
                        (Some(_), _) => ix.pop_front(),
                        (None, Some((_, t))) => {
                            this.with_topic(&t, DedupIndex::pop_front);
                        }
                        (None, None) => break,
                    }
                    forgot.broker_bound += 1;
                }
            };
            fill(&mut ix, &mut trim);
        }
        self.total += ix.len();
        self.ids += ix.ids;
        if let Some(at) = ix.front_ms() {
            self.fronts.insert((at, name.clone()));
            self.topics.insert(name, ix);
        }
        self.forgotten += forgot.total();
        forgot
    }

    /// Forgets the entries whose window (`window_of(topic)`) ended by `now_ms`, at most `max`
    /// per topic (the rest next time). Returns how many were.
    pub fn expire(&mut self, window_of: impl Fn(&str) -> u64, now_ms: u64, max: usize) -> usize {
        let topics: Vec<Arc<str>> = self.topics.keys().cloned().collect();
        let mut n = 0;
        for topic in topics {
            let window = window_of(&topic);
            n += self.with_topic(&topic, |ix| {
                let mut n = 0;
                while n < max
                    && ix
                        .front_ms()
                        .is_some_and(|at| at.saturating_add(window) <= now_ms)
                {
                    ix.pop_front();
                    n += 1;
                }
                n
            });
        }
        n
    }

    /// Forgets every id of `topic` (deleted).
    pub fn remove_topic(&mut self, topic: &str) {
        self.with_topic(topic, |ix| {
            while !ix.is_empty() {
                ix.pop_front();
            }
        });
    }

    /// Forgets every id.
    pub fn clear(&mut self) {
        self.topics.clear();
        self.fronts.clear();
        self.total = 0;
        self.ids = 0;
    }

    /// Entries held (ids alone, and runs), every topic.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Ids held, every topic.
    pub fn ids(&self) -> usize {
        self.ids
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// What `topic` holds for seqs in `from..to` whose `window_ms` has not ended by `now_ms`,
    /// in seq order (a run cut to the range).
    pub fn ids_between(
        &self,
        topic: &str,
        from: u64,
        to: u64,
        now_ms: u64,
        window_ms: u64,
    ) -> Vec<Held> {
        let Some(ix) = self.topics.get(topic) else {
            return Vec::new();
        };
        // Seqs rise along the order (ids are inserted as their messages are stored); a run
        // starting below `from` may reach into the range.
        let start = ix.order.partition_point(|s| s.seq < from).saturating_sub(1);
        let mut out = Vec::new();
        for s in ix.order.range(start..) {
            if s.seq >= to {
                break;
            }
            if s.at.saturating_add(window_ms) <= now_ms {
                continue;
            }
            match &s.what {
                What::One { key, id } => {
                    if s.seq >= from && ix.ones.get(key).is_some_and(|(q, _)| *q == s.seq) {
                        out.push(Held {
                            at_ms: s.at,
                            seq: s.seq,
                            ids: HeldIds::One(Arc::from(&**id)),
                        });
                    }
                }
                What::Run { producer, n, len } => {
                    let live = ix
                        .producers
                        .get(producer)
                        .and_then(|r| r.runs.get(n))
                        .is_some_and(|(q, _, _)| *q == s.seq);
                    let (lo, hi) = (s.seq.max(from), (s.seq + len).min(to));
                    if live && lo < hi {
                        out.push(Held {
                            at_ms: s.at,
                            seq: lo,
                            ids: HeldIds::Run {
                                producer: producer.clone(),
                                n: n + (lo - s.seq),
                                len: hi - lo,
                            },
                        });
                    }
                }
            }
        }
        out
    }

    /// Entries held for `topic`.
    pub fn topic_len(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, DedupIndex::len)
    }

    /// Entries forgotten before their window ended since the start (both bounds).
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_within_their_window_then_expire() {
        let mut d = Dedup::default();
        d.insert("t", "a", 1, 1000);
        d.insert("t", "b", 2, 1500);
        assert_eq!(d.get("t", "a", 1999, 1000), Some(1));
        assert_eq!(d.get("t", "a", 2000, 1000), None, "the window is over");
        assert_eq!(d.get("t", "c", 1000, 1000), None);
        assert_eq!(d.get("u", "a", 1000, 1000), None, "ids are per topic");
        assert_eq!(d.expire(|_| 1000, 2000, 10), 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d.get("t", "b", 2000, 1000), Some(2));
        // Stored again after its window: the new seq counts, and the old entry's expiry does
        // not take the new one with it.
        d.insert("t", "b", 9, 2600);
        assert_eq!(d.expire(|_| 1000, 2600, 10), 1);
        assert_eq!(d.get("t", "b", 2600, 1000), Some(9));
        assert_eq!(d.expire(|_| 1000, 10_000, 10), 1);
        assert!(d.is_empty() && d.topics.is_empty() && d.fronts.is_empty());
        assert_eq!(d.forgotten(), 0);
    }

    #[test]
    fn a_full_topic_forgets_its_oldest() {
        let mut d = Dedup::with_bounds(100, 3);
        for i in 0..3 {
            assert_eq!(d.insert("t", &format!("id{i}"), i, 0), Forgot::default());
        }
        d.insert("u", "other", 1, 0);
        let f = d.insert("t", "id3", 3, 0);
        assert_eq!((f.topic_bound, f.broker_bound), (1, 0));
        assert_eq!(d.forgotten(), 1);
        assert_eq!((d.topic_len("t"), d.len()), (3, 4));
        assert_eq!(d.get("t", "id0", 0, 1000), None);
        assert_eq!(d.get("t", "id3", 0, 1000), Some(3));
        assert_eq!(
            d.get("u", "other", 0, 1000),
            Some(1),
            "other topics keep theirs"
        );
    }

    #[test]
    fn every_topic_shares_the_broker_bound_and_the_oldest_go_first() {
        // One client, many topics: together they hold at most the broker's bound.
        let mut d = Dedup::with_bounds(5, 5);
        d.insert("a", "a1", 1, 100);
        d.insert("b", "b1", 1, 200);
        d.insert("a", "a2", 2, 300);
        d.insert("c", "c1", 1, 400);
        d.insert("b", "b2", 2, 500);
        assert_eq!(d.len(), 5);
        let f = d.insert("c", "c2", 2, 600);
        assert_eq!((f.topic_bound, f.broker_bound), (0, 1));
        assert_eq!(
            d.get("a", "a1", 600, 10_000),
            None,
            "the oldest of all went"
        );
        let f = d.insert("d", "d1", 1, 700);
        assert_eq!(f.broker_bound, 1);
        assert_eq!(d.get("b", "b1", 700, 10_000), None, "then the next oldest");
        assert_eq!(d.len(), 5);
        for (t, id) in [
            ("a", "a2"),
            ("c", "c1"),
            ("b", "b2"),
            ("c", "c2"),
            ("d", "d1"),
        ] {
            assert!(d.get(t, id, 700, 10_000).is_some(), "{t}/{id}");
        }
        // Many topics of one id each stay within it too.
        for i in 0..1000u64 {
            d.insert(&format!("t{i}"), "x", 1, 1000 + i);
        }
        assert_eq!(d.len(), 5);
        assert_eq!(d.topics.len(), 5);
        assert_eq!(d.fronts.len(), 5);
        assert_eq!(d.forgotten(), 2 + 1000);
        d.remove_topic("t999");
        assert_eq!((d.len(), d.topics.len(), d.fronts.len()), (4, 4, 4));
    }

    /// The rules, written plainly: each id in turn; past the topic's bound its oldest go,
    /// past the broker's the oldest of all (by store time, then topic name).
    #[derive(Default)]
    struct Model {
        topics: std::collections::BTreeMap<String, VecDeque<(u64, u64, Arc<str>)>>,
        forgot: Forgot,
    }

    impl Model {
        fn insert(&mut self, bounds: (usize, usize), topic: &str, id: &str, seq: u64, at: u64) {
            let q = self.topics.entry(topic.to_string()).or_default();
            while q.len() >= bounds.1 {
                q.pop_front();
                self.forgot.topic_bound += 1;
            }
            q.push_back((at, seq, Arc::from(id)));
            while self.topics.values().map(VecDeque::len).sum::<usize>() > bounds.0 {
                let oldest = self
                    .topics
                    .iter()
                    .filter_map(|(t, q)| q.front().map(|(at, _, _)| (*at, t.clone())))
                    .min();
                let Some((_, t)) = oldest else { break };
                if let Some(q) = self.topics.get_mut(&t) {
                    q.pop_front();
                }
                self.forgot.broker_bound += 1;
            }
            self.topics.retain(|_, q| !q.is_empty());
        }
    }

    #[test]
    fn a_request_inserted_at_once_keeps_the_bounds_as_each_id_in_turn() {
        // Both bounds reached inside one request, store times out of order across topics
        // (a clock stepped back), ties broken by topic name.
        let seed = [
            ("b", "b1", 1, 500),
            ("b", "b2", 2, 500),
            ("a", "a1", 1, 500),
            ("c", "c1", 1, 100),
        ];
        let request: Vec<(&str, u64, u64)> = (0..6u64)
            .map(|i| {
                (
                    ["x", "y", "z", "w", "v", "u"][i as usize],
                    10 + i,
                    300 + 100 * i,
                )
            })
            .collect();
        // One request per run of a topic.
        let runs: [(&str, std::ops::Range<usize>); 5] = [
            ("a", 0..1),
            ("b", 1..2),
            ("a", 2..4),
            ("d", 4..5),
            ("a", 5..6),
        ];
        for bounds in [(6, 6), (6, 2), (3, 3), (1, 1), (100, 4), (5, 1), (4, 2)] {
            let mut d = Dedup::with_bounds(bounds.0, bounds.1);
            let mut m = Model::default();
            for (t, id, seq, at) in seed {
                d.insert(t, id, seq, at);
                m.insert(bounds, t, id, seq, at);
            }
            let mut forgot = d.forgotten();
            for (topic, range) in runs.clone() {
                let ids: Vec<_> = request[range.clone()]
                    .iter()
                    .map(|(id, seq, at)| (*id, d.form(id), *seq, *at))
                    .collect();
                let f = d.insert_all(topic, ids);
                forgot += f.total();
                for (id, seq, at) in &request[range] {
                    m.insert(bounds, topic, id, *seq, *at);
                }
            }
            let held: Vec<_> = m
                .topics
                .iter()
                .map(|(t, q)| (t.clone(), q.iter().cloned().collect::<Vec<_>>()))
                .collect();
            let mut topics: Vec<String> = d.topics.keys().map(|t| t.to_string()).collect();
            topics.sort();
            let got: Vec<_> = topics
                .into_iter()
                .map(|t| {
                    let ids: Vec<_> = d
                        .ids_between(&t, 0, u64::MAX, 0, u64::MAX)
                        .into_iter()
                        .flat_map(|h| {
                            h.expand()
                                .into_iter()
                                .map(move |(seq, id)| (h.at_ms, seq, Arc::from(id.as_str())))
                        })
                        .collect();
                    (t, ids)
                })
                .collect();
            assert_eq!(got, held, "bounds {bounds:?}");
            assert_eq!(d.forgotten(), m.forgot.total(), "bounds {bounds:?}");
            assert_eq!(forgot, d.forgotten());
            assert_eq!(d.len(), held.iter().map(|(_, q)| q.len()).sum::<usize>());
            assert_eq!(d.fronts.len(), held.len());
            for (t, q) in &held {
                for (_, seq, id) in q {
                    assert_eq!(d.get(t, id, 0, 1), Some(*seq), "{t}/{id}");
                }
            }
        }
    }

    #[test]
    fn ids_are_told_apart_by_their_keys() {
        let mut d = Dedup::default();
        let ids: Vec<String> = (0..10_000).map(|i| format!("id-{i}")).collect();
        let keys: std::collections::HashSet<IdKey> = ids.iter().map(|i| d.key(i)).collect();
        assert_eq!(keys.len(), ids.len());
        for (seq, id) in ids.iter().enumerate() {
            d.insert("t", id, seq as u64, 0);
        }
        for (seq, id) in ids.iter().enumerate() {
            assert_eq!(d.get("t", id, 0, 1), Some(seq as u64));
        }
        assert_eq!(d.get("t", "id-10000", 0, 1), None);
        // Another index keys with another random key.
        assert_ne!(Dedup::default().key("id-0"), d.key("id-0"));
    }

    #[test]
    fn split_id_takes_only_the_canonical_producer_form() {
        assert_eq!(split_id("0123abcd-17"), Some(("0123abcd", 17)));
        assert_eq!(split_id("a-b-0"), Some(("a-b", 0)));
        assert_eq!(split_id("p-18446744073709551615"), None, "20 digits");
        assert_eq!(
            split_id("p-9999999999999999999"),
            Some(("p", 9_999_999_999_999_999_999))
        );
        for id in ["p-", "-1", "p-01", "p-1x", "p1", "p-+1", "p- 1", "order"] {
            assert_eq!(split_id(id), None, "{id}");
        }
    }

    fn insert_run(d: &mut Dedup, topic: &str, ids: &[String], seq0: u64, at: u64) -> Forgot {
        let items: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), d.form(id), seq0 + i as u64, at))
            .collect();
        d.insert_all(topic, items)
    }

    #[test]
    fn a_producers_consecutive_ids_are_one_entry_and_each_is_found() {
        let mut d = Dedup::with_bounds(10, 10);
        let ids: Vec<String> = (1..=10_000).map(|n| format!("p-{n}")).collect();
        insert_run(&mut d, "t", &ids, 100, 5);
        assert_eq!((d.len(), d.ids(), d.topic_len("t")), (1, 10_000, 1));
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(d.get("t", id, 5, 10), Some(100 + i as u64), "{id}");
        }
        for id in ["p-0", "p-10001", "p-01", "q-1", "p"] {
            assert_eq!(d.get("t", id, 5, 10), None, "{id}");
        }
        assert_eq!(d.get("t", "p-1", 15, 10), None, "the window is over");
        // A gap in the numbers, in the seqs, a new time or another producer starts a new run;
        // an id of another form sits between them alone.
        let mut d = Dedup::default();
        let req = ["p-1", "p-2", "p-4", "x", "p-5", "q-6", "q-7"];
        let items: Vec<_> = req
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, d.form(id), i as u64, 0))
            .collect();
        d.insert_all("t", items);
        assert_eq!((d.len(), d.ids()), (5, 7));
        insert_run(&mut d, "t", &["p-6".to_string()], 8, 0);
        insert_run(&mut d, "t", &["p-7".to_string()], 9, 1);
        assert_eq!((d.len(), d.ids()), (7, 9));
        for (i, id) in req.iter().enumerate() {
            assert_eq!(d.get("t", id, 0, 10), Some(i as u64), "{id}");
        }
        assert_eq!(d.get("t", "p-6", 0, 10), Some(8));
        assert_eq!(d.get("t", "p-3", 0, 10), None);
    }

    #[test]
    fn a_run_stored_again_after_its_window_replaces_the_old_one() {
        let mut d = Dedup::default();
        let ids: Vec<String> = (1..=10).map(|n| format!("p-{n}")).collect();
        insert_run(&mut d, "t", &ids, 1, 0);
        // p-5 and p-6 again, after the window (1000 ms): new seqs.
        insert_run(&mut d, "t", &ids[4..6], 20, 5000);
        assert_eq!(d.get("t", "p-5", 5000, 1000), Some(20));
        assert_eq!(d.get("t", "p-6", 5000, 1000), Some(21));
        assert_eq!(d.get("t", "p-7", 5000, 1000), None);
        // The old run's expiry leaves the new one.
        assert_eq!(d.expire(|_| 1000, 5000, 10), 1);
        assert_eq!((d.len(), d.ids()), (1, 2));
        assert_eq!(d.get("t", "p-5", 5000, 1000), Some(20));
        assert_eq!(d.expire(|_| 1000, 6000, 10), 1);
        assert!(d.is_empty() && d.topics.is_empty() && d.fronts.is_empty());
        assert_eq!(d.ids(), 0);
    }

    #[test]
    fn ids_between_cuts_runs_and_insert_held_puts_them_back() {
        let mut d = Dedup::default();
        let ids: Vec<String> = (1..=10).map(|n| format!("p-{n}")).collect();
        insert_run(&mut d, "t", &ids, 11, 0);
        d.insert("t", "alone", 21, 0);
        let held = d.ids_between("t", 15, 22, 0, 100);
        assert_eq!(
            held,
            vec![
                Held {
                    at_ms: 0,
                    seq: 15,
                    ids: HeldIds::Run {
                        producer: Arc::from("p"),
                        n: 5,
                        len: 6
                    }
                },
                Held {
                    at_ms: 0,
                    seq: 21,
                    ids: HeldIds::One(Arc::from("alone"))
                },
            ]
        );
        let mut e = Dedup::default();
        e.insert_held("t", &held);
        assert_eq!((e.len(), e.ids()), (2, 7));
        assert_eq!(e.get("t", "p-10", 0, 100), Some(20));
        assert_eq!(e.get("t", "p-4", 0, 100), None);
        assert_eq!(e.get("t", "alone", 0, 100), Some(21));
    }

    #[test]
    fn a_probe_gives_the_seq_or_a_gap_holding_no_number() {
        let mut r = Runs::default();
        // (n, seq, len, at): the one at 40 is out of its window at the probes' time.
        let runs = [
            (10, 100, 5, 50),
            (20, 200, 1, 50),
            (30, 300, 3, 50),
            (40, 400, 4, 0),
        ];
        for (n, seq, len, at) in runs {
            r.put(n, seq, len, at);
        }
        for n in 0..60u64 {
            let held = runs
                .iter()
                .find(|(n0, _, len, _)| (*n0..n0 + len).contains(&n))
                .map(|(n0, seq, _, at)| (seq + (n - n0), *at));
            match (r.probe(n, 100, 60), held) {
                (Ok(seq), Some((want, at))) => assert_eq!((seq, at), (want, 50), "{n}"),
                (Err((lo, hi)), held) => {
                    assert!((lo..hi).contains(&n), "{n}: {lo}..{hi}");
                    assert!(held.is_none_or(|(_, at)| at == 0), "{n}");
                    for (n0, _, len, at) in runs {
                        let overlap = n0 < hi && lo < n0 + len;
                        assert!(!overlap || (at == 0 && (lo, hi) == (n, n + 1)), "{n}");
                    }
                }
                (Ok(_), None) => panic!("{n} is not held"),
            }
        }
    }
}
