//! A set of sequence numbers kept as disjoint, non-adjacent inclusive ranges: a group's settled
//! seqs above its acked floor. One message held while millions after it are acked is one range,
//! not millions of entries, so the cursor (and its durable record) stays small.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent inclusive ranges of seqs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqRanges {
    /// start → end (inclusive).
    map: BTreeMap<u64, u64>,
    /// Seqs in the set.
    len: u64,
}

impl SeqRanges {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.map
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| end >= seq)
    }

    /// Adds `seq`; whether it was new.
    pub fn insert(&mut self, seq: u64) -> bool {
        self.insert_range(seq, seq) == 1
    }

    /// Adds `start..=end` (ignored when `start > end`); returns how many seqs were new.
    pub fn insert_range(&mut self, start: u64, end: u64) -> u64 {
        if start > end {
            return 0;
        }
        let (mut lo, mut hi) = (start, end);
        let mut covered = 0u64;
        // Every range that overlaps or touches lo..=hi merges into it.
        let from = match self.map.range(..=lo).next_back() {
            Some((&s, &e)) if e.saturating_add(1) >= lo => s,
            _ => lo,
        };
        let touching: Vec<(u64, u64)> = self
            .map
            .range(from..=hi.saturating_add(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.map.remove(&s);
            // Seqs of this range inside start..=end were already in the set.
            let (os, oe) = (s.max(start), e.min(end));
            if os <= oe {
                covered += oe - os + 1;
            }
            self.len -= e - s + 1;
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.map.insert(lo, hi);
        self.len += hi - lo + 1;
        (end - start + 1) - covered
    }

    /// The lowest range.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.map.first_key_value().map(|(&s, &e)| (s, e))
    }

    /// The highest range.
    pub fn last(&self) -> Option<(u64, u64)> {
        self.map.last_key_value().map(|(&s, &e)| (s, e))
    }

    /// Removes and returns the lowest range.
    pub fn pop_first(&mut self) -> Option<(u64, u64)> {
        let (s, e) = self.map.pop_first()?;
        self.len -= e - s + 1;
        Some((s, e))
    }

    /// Removes every seq `<= seq`.
    pub fn remove_through(&mut self, seq: u64) {
        while let Some((s, e)) = self.first() {
            if s > seq {
                break;
            }
            self.pop_first();
            if e > seq {
                self.map.insert(seq + 1, e);
                self.len += e - seq;
                break;
            }
        }
    }

    /// Seqs in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many ranges.
    pub fn range_count(&self) -> usize {
        self.map.len()
    }

    /// The ranges in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_merge_neighbours_and_count_seqs() {
        let mut r = SeqRanges::new();
        assert!(r.insert(5));
        assert!(r.insert(7));
        assert_eq!(r.range_count(), 2);
        assert!(r.insert(6));
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(5, 7)]);
        assert!(!r.insert(6));
        assert_eq!(r.insert_range(1, 10), 7);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(1, 10)]);
        assert_eq!(r.len(), 10);
        assert!(r.contains(1) && r.contains(10) && !r.contains(11) && !r.contains(0));
        assert_eq!(r.insert_range(12, 12), 1);
        assert_eq!(r.insert_range(20, 19), 0);
        assert_eq!(r.len(), 11);
        assert_eq!(r.range_count(), 2);
    }

    #[test]
    fn one_hole_is_two_ranges_whatever_the_number_of_seqs() {
        let mut r = SeqRanges::new();
        for s in 2..=100_000 {
            r.insert(s);
        }
        assert_eq!(r.range_count(), 1);
        assert_eq!(r.len(), 99_999);
        assert_eq!(r.first(), Some((2, 100_000)));
    }

    #[test]
    fn remove_through_cuts_a_range() {
        let mut r = SeqRanges::new();
        r.insert_range(3, 9);
        r.insert_range(12, 14);
        r.remove_through(5);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(6, 9), (12, 14)]);
        assert_eq!(r.len(), 7);
        r.remove_through(13);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(14, 14)]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn matches_a_plain_set_on_random_inserts() {
        let mut r = SeqRanges::new();
        let mut set = std::collections::BTreeSet::new();
        let mut x: u64 = 12345;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = (x >> 33) % 600;
            let n = (x >> 20) % 4;
            let added = r.insert_range(s, s + n);
            let before = set.len();
            for k in s..=s + n {
                set.insert(k);
            }
            assert_eq!(added as usize, set.len() - before);
        }
        assert_eq!(r.len() as usize, set.len());
        for k in 0..700 {
            assert_eq!(r.contains(k), set.contains(&k), "{k}");
        }
        // Ranges are disjoint and never adjacent.
        let v: Vec<_> = r.ranges().collect();
        for w in v.windows(2) {
            assert!(w[0].1 + 1 < w[1].0);
        }
    }
}
