//! The idempotent-publish index of one topic: message id → (seq, store time) for the ids
//! stored within the topic's `dedup_window` (see `store/retention.md`, "Idempotent publish").

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Most ids one topic's index holds: past it the oldest are forgotten before their window ends
/// (counted, and a `memory_pressure` event).
pub const MAX_IDS_PER_TOPIC: usize = 1_000_000;

/// One topic's ids, in the order they were stored.
#[derive(Debug)]
pub struct DedupIndex {
    /// Id → (seq, store time in ms).
    map: HashMap<Arc<str>, (u64, u64)>,
    /// (store time, seq, id), oldest first: what expires next.
    order: VecDeque<(u64, u64, Arc<str>)>,
    /// Ids forgotten early because the index was full.
    pub forgotten: u64,
    /// Most ids held (tests lower it).
    cap: usize,
}

impl Default for DedupIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl DedupIndex {
    /// An empty index holding at most [`MAX_IDS_PER_TOPIC`] ids.
    pub fn new() -> Self {
        Self::with_cap(MAX_IDS_PER_TOPIC)
    }

    /// An empty index holding at most `cap` ids.
    pub fn with_cap(cap: usize) -> Self {
        DedupIndex {
            map: HashMap::new(),
            order: VecDeque::new(),
            forgotten: 0,
            cap: cap.max(1),
        }
    }

    /// The seq `id` was stored with, if that was less than `window_ms` before `now_ms`.
    pub fn get(&self, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.map
            .get(id)
            .filter(|(_, at)| at.saturating_add(window_ms) > now_ms)
            .map(|(seq, _)| *seq)
    }

    /// Remembers `id` as stored with `seq` at `at_ms`. Returns how many older ids were
    /// forgotten to make room (0 unless the index is full).
    pub fn insert(&mut self, id: &str, seq: u64, at_ms: u64) -> u64 {
        let mut dropped = 0;
        while self.order.len() >= self.cap {
            self.pop_front();
            dropped += 1;
        }
        self.forgotten += dropped;
        let id: Arc<str> = Arc::from(id);
        self.map.insert(id.clone(), (seq, at_ms));
        self.order.push_back((at_ms, seq, id));
        dropped
    }

    /// Forgets the ids stored `window_ms` or more before `now_ms`, at most `max` of them (the
    /// rest next time). Returns how many were looked at.
    pub fn expire(&mut self, now_ms: u64, window_ms: u64, max: usize) -> usize {
        let mut n = 0;
        while n < max
            && self
                .order
                .front()
                .is_some_and(|(at, _, _)| at.saturating_add(window_ms) <= now_ms)
        {
            self.pop_front();
            n += 1;
        }
        n
    }

    fn pop_front(&mut self) {
        if let Some((_, seq, id)) = self.order.pop_front() {
            // A later store of the same id (after its window) has its own entry.
            if self.map.get(&id).is_some_and(|(s, _)| *s == seq) {
                self.map.remove(&id);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_within_their_window_then_expire() {
        let mut ix = DedupIndex::new();
        ix.insert("a", 1, 1000);
        ix.insert("b", 2, 1500);
        assert_eq!(ix.get("a", 1999, 1000), Some(1));
        assert_eq!(ix.get("a", 2000, 1000), None, "the window is over");
        assert_eq!(ix.get("c", 1000, 1000), None);
        assert_eq!(ix.expire(2000, 1000, 10), 1);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.get("b", 2000, 1000), Some(2));
        // Stored again after its window: the new seq counts, and the old entry's expiry does
        // not take the new one with it.
        ix.insert("b", 9, 2600);
        assert_eq!(ix.expire(2600, 1000, 10), 1);
        assert_eq!(ix.get("b", 2600, 1000), Some(9));
    }

    #[test]
    fn the_default_index_holds_the_full_bound() {
        let mut ix = DedupIndex::default();
        assert_eq!(ix.insert("a", 1, 0), 0);
        assert_eq!(ix.insert("b", 2, 0), 0);
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn a_full_index_forgets_the_oldest() {
        let mut ix = DedupIndex::with_cap(3);
        for i in 0..3 {
            assert_eq!(ix.insert(&format!("id{i}"), i, 0), 0);
        }
        assert_eq!(ix.insert("id3", 3, 0), 1);
        assert_eq!(ix.forgotten, 1);
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.get("id0", 0, 1000), None);
        assert_eq!(ix.get("id3", 0, 1000), Some(3));
    }
}
