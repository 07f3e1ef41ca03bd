//! The idempotent-publish index: per topic, message id → (seq, store time) for the ids stored
//! within the topic's `dedup_window` (see `store/retention.md`, "The dedup index").
//!
//! Two bounds hold it: at most [`MAX_IDS_PER_TOPIC`] ids per topic, and at most
//! `dedup_max_ids` (broker setting, default [`DEFAULT_MAX_IDS`]) over every topic, so that a
//! client publishing ids to many topics (auto-created) cannot take the broker's memory. Past
//! either, the oldest ids (of the topic, or of every topic) are forgotten before their window
//! ends.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Most ids one topic's index holds: past it the topic's oldest are forgotten before their
/// window ends (counted, and a `memory_pressure` event).
pub const MAX_IDS_PER_TOPIC: usize = 1_000_000;

/// Most ids the indexes of every topic hold together unless configured (`dedup_max_ids`): about
/// 250 MB with ids of 128 bytes.
pub const DEFAULT_MAX_IDS: usize = 1_000_000;

/// One topic's ids, in the order they were stored.
#[derive(Debug, Default)]
pub struct DedupIndex {
    /// Id → (seq, store time in ms).
    map: HashMap<Arc<str>, (u64, u64)>,
    /// (store time, seq, id), in store order (so by seq): what expires next.
    order: VecDeque<(u64, u64, Arc<str>)>,
}

impl DedupIndex {
    /// The seq `id` was stored with, if that was less than `window_ms` before `now_ms`.
    pub fn get(&self, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.map
            .get(id)
            .filter(|(_, at)| at.saturating_add(window_ms) > now_ms)
            .map(|(seq, _)| *seq)
    }

    fn push(&mut self, id: &str, seq: u64, at_ms: u64) {
        let id: Arc<str> = Arc::from(id);
        self.map.insert(id.clone(), (seq, at_ms));
        self.order.push_back((at_ms, seq, id));
    }

    fn pop_front(&mut self) {
        if let Some((_, seq, id)) = self.order.pop_front() {
            // A later store of the same id (after its window) has its own entry.
            if self.map.get(&id).is_some_and(|(s, _)| *s == seq) {
                self.map.remove(&id);
            }
        }
    }

    /// Store time of the oldest id held.
    fn front_ms(&self) -> Option<u64> {
        self.order.front().map(|(at, _, _)| *at)
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
        }
    }

    /// Most ids held, every topic together.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// The seq `id` was stored with in `topic`, if that was less than `window_ms` before
    /// `now_ms`.
    pub fn get(&self, topic: &str, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.topics.get(topic)?.get(id, now_ms, window_ms)
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
        let per_topic = self.per_topic;
        let topic_bound = self.with_topic(topic, |ix| {
            let mut n = 0;
            while ix.len() >= per_topic {
                ix.pop_front();
                n += 1;
            }
            ix.push(id, seq, at_ms);
            n
        });
        let mut broker_bound = 0;
        while self.total > self.max_total {
            let Some((_, oldest)) = self.fronts.first().cloned() else {
                break;
            };
            self.with_topic(&oldest, DedupIndex::pop_front);
            broker_bound += 1;
        }
        let forgot = Forgot {
            topic_bound,
            broker_bound,
        };
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
        let start = ix.order.partition_point(|(_, seq, _)| *seq < from);
        ix.order
            .range(start..)
            .take_while(|(_, seq, _)| *seq < to)
            .filter(|(at, seq, id)| {
                at.saturating_add(window_ms) > now_ms
                    && ix.map.get(id).is_some_and(|(s, _)| s == seq)
            })
            .cloned()
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
}
