//! The idempotent-publish index: per topic, message id → (seq, store time) for the ids stored
//! within the topic's `dedup_window` (see `store/retention.md`, "The dedup index").
//!
//! Two bounds hold it: at most [`MAX_IDS_PER_TOPIC`] ids per topic, and at most
//! `dedup_max_ids` (broker setting, default [`DEFAULT_MAX_IDS`]) over every topic, so that a
//! client publishing ids to many topics (auto-created) cannot take the broker's memory. Past
//! either, the oldest ids (of the topic, or of every topic) are forgotten before their window
//! ends.
//!
//! The maps are keyed by an [`IdKey`], a keyed 128-bit hash of the id ([`IdKeys::key`]),
//! computed once per message and used for the lookup, the in-request duplicate check and the
//! insert; the id itself is kept (moved in, not copied) only in the store-order queue, for
//! [`Dedup::ids_between`].

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Most ids one topic's index holds: past it the topic's oldest are forgotten before their
/// window ends (counted, and a `memory_pressure` event).
pub const MAX_IDS_PER_TOPIC: usize = 1_000_000;

/// Most ids the indexes of every topic hold together unless configured (`dedup_max_ids`): about
/// 250 MB with ids of 128 bytes.
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

/// One topic's ids, in the order they were stored.
#[derive(Debug, Default)]
pub struct DedupIndex {
    /// Id's key → (seq, store time in ms).
    map: IdMap<(u64, u64)>,
    /// (store time, seq, id's key, id), in store order (so by seq): what expires next.
    order: VecDeque<(u64, u64, IdKey, String)>,
}

impl DedupIndex {
    /// The seq the id of `key` was stored with, if that was less than `window_ms` before
    /// `now_ms`.
    pub fn get(&self, key: IdKey, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.map
            .get(&key)
            .filter(|(_, at)| at.saturating_add(window_ms) > now_ms)
            .map(|(seq, _)| *seq)
    }

    fn push(&mut self, key: IdKey, id: String, seq: u64, at_ms: u64) {
        self.map.insert(key, (seq, at_ms));
        self.order.push_back((at_ms, seq, key, id));
    }

    fn pop_front(&mut self) {
        if let Some((_, seq, key, _)) = self.order.pop_front() {
            // A later store of the same id (after its window) has its own entry.
            if self.map.get(&key).is_some_and(|(s, _)| *s == seq) {
                self.map.remove(&key);
            }
        }
    }

    /// Store time of the oldest id held.
    fn front_ms(&self) -> Option<u64> {
        self.order.front().map(|(at, _, _, _)| *at)
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether it holds no id.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How many ids an insert made the index forget before their window ended, by bound.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgot {
    /// The topic held [`MAX_IDS_PER_TOPIC`] ids.
    pub topic_bound: u64,
    /// Every topic together held `dedup_max_ids`.
    pub broker_bound: u64,
}

impl Forgot {
    /// Ids forgotten, both bounds.
    pub fn total(&self) -> u64 {
        self.topic_bound + self.broker_bound
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: Forgot) {
        self.topic_bound += other.topic_bound;
        self.broker_bound += other.broker_bound;
    }
}

/// The ids of every topic, under both bounds.
#[derive(Debug)]
pub struct Dedup {
    topics: HashMap<Arc<str>, DedupIndex>,
    /// (store time of its oldest id, topic) of every topic holding ids: where the broker's
    /// oldest id is, without a look at every topic.
    fronts: BTreeSet<(u64, Arc<str>)>,
    /// Ids held, every topic.
    total: usize,
    /// Most ids held, every topic.
    max_total: usize,
    /// Most ids held per topic.
    per_topic: usize,
    /// Ids forgotten before their window ended, since the start.
    forgotten: u64,
    /// How ids are keyed.
    keys: IdKeys,
}

impl Default for Dedup {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_IDS)
    }
}

impl Dedup {
    /// Empty indexes holding at most `max_total` ids together (and [`MAX_IDS_PER_TOPIC`] per
    /// topic).
    pub fn new(max_total: usize) -> Self {
        Self::with_bounds(max_total, MAX_IDS_PER_TOPIC)
    }

    /// Empty indexes holding at most `max_total` ids together and `per_topic` per topic.
    pub fn with_bounds(max_total: usize, per_topic: usize) -> Self {
        let max_total = max_total.max(1);
        Dedup {
            topics: HashMap::new(),
            fronts: BTreeSet::new(),
            total: 0,
            max_total,
            per_topic: per_topic.clamp(1, max_total),
            forgotten: 0,
            keys: IdKeys::default(),
        }
    }

    /// Most ids held, every topic together.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// `id`'s key in these indexes.
    pub fn key(&self, id: &str) -> IdKey {
        self.keys.key(id)
    }

    /// `topic`'s index, if it holds ids: look it up once per request, then [`DedupIndex::get`]
    /// each id's key.
    pub fn topic(&self, topic: &str) -> Option<&DedupIndex> {
        self.topics.get(topic)
    }

    /// The seq `id` was stored with in `topic`, if that was less than `window_ms` before
    /// `now_ms`.
    pub fn get(&self, topic: &str, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.topics.get(topic)?.get(self.key(id), now_ms, window_ms)
    }

    /// Runs `f` on `topic`'s index (made if missing) and keeps `fronts` and `total` in step
    /// with what it did; a topic left without ids is dropped.
    fn with_topic<R>(&mut self, topic: &str, f: impl FnOnce(&mut DedupIndex) -> R) -> R {
        let key = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        let ix = self.topics.entry(key.clone()).or_default();
        let (before_len, before_front) = (ix.len(), ix.front_ms());
        let r = f(ix);
        let (after_len, after_front) = (ix.len(), ix.front_ms());
        self.total = (self.total + after_len).saturating_sub(before_len);
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

    /// Remembers `id` as stored in `topic` with `seq` at `at_ms`. Returns how many older ids
    /// were forgotten to make room (none unless a bound was reached).
    pub fn insert(&mut self, topic: &str, id: &str, seq: u64, at_ms: u64) -> Forgot {
        let key = self.key(id);
        self.insert_all(topic, [(key, id.to_string(), seq, at_ms)])
    }

    /// Remembers each (id's key from [`Dedup::key`], id, seq, store time) as stored in
    /// `topic`, in order (seqs rising): the same as an [`Dedup::insert`] of each in turn, with
    /// one look-up of the topic. Returns how many older ids were forgotten to make room.
    pub fn insert_all(
        &mut self,
        topic: &str,
        ids: impl IntoIterator<Item = (IdKey, String, u64, u64)>,
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
        let mut forgot = Forgot::default();
        for (key, id, seq, at_ms) in ids {
            while ix.len() >= self.per_topic {
                ix.pop_front();
                self.total = self.total.saturating_sub(1);
                forgot.topic_bound += 1;
            }
            ix.push(key, id, seq, at_ms);
            self.total += 1;
            while self.total > self.max_total {
                // The oldest of all: this topic's, or the first of the others'.
                let ours = ix.front_ms().map(|at| (at, &name));
                let theirs = self.fronts.first().map(|(at, t)| (*at, t));
                match (ours, theirs) {
                    (Some(o), Some(t)) if t < o => {
                        let other = t.1.clone();
                        self.with_topic(&other, DedupIndex::pop_front);
                    }
                    (Some(_), _) => {
                        ix.pop_front();
                        self.total = self.total.saturating_sub(1);
                    }
                    (None, Some((_, t))) => {
                        let other = t.clone();
                        self.with_topic(&other, DedupIndex::pop_front);
                    }
                    (None, None) => break,
                }
                forgot.broker_bound += 1;
            }
        }
        if let Some(at) = ix.front_ms() {
            self.fronts.insert((at, name.clone()));
            self.topics.insert(name, ix);
        }
        self.forgotten += forgot.total();
        forgot
    }

    /// Forgets the ids whose window (`window_of(topic)`) ended by `now_ms`, at most `max` per
    /// topic (the rest next time). Returns how many were.
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
    }

    /// Ids held, every topic.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The ids of `topic` held for seqs in `from..to` whose `window_ms` has not ended by
    /// `now_ms`: (store time, seq, id), in seq order.
    pub fn ids_between(
        &self,
        topic: &str,
        from: u64,
        to: u64,
        now_ms: u64,
        window_ms: u64,
    ) -> Vec<(u64, u64, Arc<str>)> {
        let Some(ix) = self.topics.get(topic) else {
            return Vec::new();
        };
        // Seqs rise along the order (ids are inserted as their messages are stored).
        let start = ix.order.partition_point(|(_, seq, _, _)| *seq < from);
        ix.order
            .range(start..)
            .take_while(|(_, seq, _, _)| *seq < to)
            .filter(|(at, seq, key, _)| {
                at.saturating_add(window_ms) > now_ms
                    && ix.map.get(key).is_some_and(|(s, _)| s == seq)
            })
            .map(|(at, seq, _, id)| (*at, *seq, Arc::from(id.as_str())))
            .collect()
    }

    /// Ids held for `topic`.
    pub fn topic_len(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, DedupIndex::len)
    }

    /// Ids forgotten before their window ended since the start (both bounds).
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
                    .map(|(id, seq, at)| (d.key(id), id.to_string(), *seq, *at))
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
                    let ids = d.ids_between(&t, 0, u64::MAX, 0, u64::MAX);
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
}
