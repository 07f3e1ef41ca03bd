//! Delivery rules as plain data, with no actors: a group's cursor, what waits for delivery,
//! what is in flight to whom, and how acks, nacks, timeouts and departures change it. The
//! orchestrator actor owns one [`GroupState`] per (topic, group) and only moves messages
//! between it, the store and the connections, so every rule here is unit-tested in
//! microseconds (`group/tests.rs`). See `src/actors/orchestrator.md` for the state machine.

pub mod group;
pub mod ranges;

pub use group::{GroupState, Joining, Limits, Pending, Settlement};
pub use ranges::SeqRanges;

/// Identifies one subscription: a connection and the stream it subscribed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId {
    /// Connection id.
    pub conn: u64,
    /// RSocket stream id of the subscribe request.
    pub stream: u32,
}

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.conn, self.stream)
    }
}

/// The hasher of the delivery maps keyed by the broker's own numbers (seqs, batch ids): one
/// multiply by 2⁶⁴/φ (Fibonacci hashing) instead of SipHash, which was ~11% of the delivery
/// path's instructions in W3 (two look-ups per delivery and more per ack). Only for keys no
/// client chooses: a client cannot pick seqs or batch ids to collide.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqHasher(u64);

const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(FIB);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(FIB);
    }
}

/// A map keyed by seqs or batch ids ([`SeqHasher`]).
pub type SeqMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<SeqHasher>>;

/// A set of seqs or batch ids ([`SeqHasher`]).
pub type SeqSet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<SeqHasher>>;

#[cfg(test)]
mod seq_hasher_tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_seqs_spread_over_the_top_bits() {
        // hashbrown takes its 7 control bits from the top of the hash: consecutive seqs must
        // not share them (a pass-through hash would give them all the same).
        let b = std::hash::BuildHasherDefault::<SeqHasher>::default();
        let tops: std::collections::HashSet<u64> =
            (1..=128u64).map(|s| b.hash_one(s) >> 57).collect();
        assert!(tops.len() > 64, "{} distinct top-7-bit values", tops.len());
        let mut m = SeqMap::default();
        for s in 0..10_000u64 {
            m.insert(s, s * 2);
        }
        assert_eq!((m.len(), m.get(&4_321)), (10_000, Some(&8_642)));
    }
}
