//! `key_shared` groups: every message with a key goes to the consumer that owns the key's hash
//! range; keys move only when a consumer joins or leaves, and order per key holds across moves.
//!
//! # Design note
//!
//! **Hash and ranges** (taken from Pulsar's `HashRangeAutoSplitStickyKeyConsumerSelector`): the
//! key hash is FNV-1a 64 of the key's bytes `% 65536`. The first consumer owns `[0, 65535]`; a
//! joining consumer splits the largest range (ties: the lowest start) and takes its *upper*
//! half; a leaving consumer's range merges into the range below it (else the one above). So every
//! consumer owns exactly one contiguous range, and a join or leave moves only the keys of the
//! range split or merged. (Pulsar gives the joiner the lower half and merges a leaver's range into
//! the one above; the contract of issue 11 fixed the other way round. Pulsar hashes with Murmur3,
//! we with FNV-1a, as the rest of Sluice.) A 65,537th consumer is refused (no range to split).
//!
//! **Order per key across moves** (Pulsar's `DrainingHashesTracker` and the "already blocked
//! hashes" of `filterAndGroupEntriesForDispatching`): `holders` counts, per hash, the keyed
//! messages in flight and the one consumer holding them. A message of hash `h` goes to `h`'s
//! owner only when `h` is held by nobody or by the owner itself; once a message of `h` is held
//! back in a pass, every later message of `h` is held back in that pass too. So a key's new
//! owner gets its messages only once every earlier message of the key delivered to the old owner
//! is acked or returned, and a key is never in flight to two consumers at once. Retries go first
//! (they are the key's earliest messages), then fresh messages in seq order: in a `key_shared`
//! group priorities do not reorder messages (order per key comes first). Messages without a key
//! go to any consumer, round robin, as in `shared`. We track hashes, not keys (as Pulsar): two
//! keys with one hash wait for each other, which costs nothing in correctness.
//!
//! **Head-of-line blocking** (where we differ from Pulsar). The read-ahead buffer (`ready`)
//! holds at most [`READ_AHEAD`] messages. When a consumer cannot take its messages (window
//! full, no credits, or its keys still draining from another consumer), they pile up in the
//! buffer; once it is half full reading stops, and without more the other consumers would starve
//! behind a buffer full of someone else's messages. Pulsar parks such messages in a replay
//! queue up to a look-ahead limit (then every consumer waits). We *park their hashes* instead:
//! when the buffer is at its read bound and some consumer has room but nothing it may take,
//! every keyed message in the buffer is dropped from memory (they stay in the log) and its hash
//! is parked with the lowest seq dropped (`parked: hash → seq`). Reads from the log then skip
//! parked hashes, so the buffer serves the consumers that can take messages. A parked hash is
//! *replayed* (read again from the log from its parked seq, taking only that hash's messages, up
//! to where the group has read) once its owner can take messages and no other consumer holds
//! it; it is unparked when its replay reaches the group's read position. Replays and ordinary
//! reads alternate, so neither starves the other. Bounds: the buffer stays within `READ_AHEAD`
//! (plus one read), `parked` within the 65,536 hashes; the cost of a consumer that cannot keep
//! up is that its part of the log is read again, not that the others stop. Per hash the
//! invariant is: a parked hash's fresh messages below its parked seq are in the buffer (or in
//! flight, waiting for retry, or settled), none at or above it is; so order per key holds.
//!
//! **The cursor's range bound.** A waiting key leaves holes in the group's cursor below what the
//! other consumers acked (one per message, when keys interleave), and the cursor holds at most
//! [`super::MAX_ACK_RANGES`] ranges. So how far the others run ahead of a consumer that does not
//! ack is bounded by that many of its messages: then fresh messages wait, as in every mode. In a
//! `key_shared` group a message that is *next to* a settled seq (the edge of a hole: settling it
//! cannot add a range) still goes out at the bound, so holes fill from their edges and the
//! floor moves as soon as the messages at the floor can go; reads and replays then bring only
//! seqs up to just past the highest settled one (nothing beyond could go out).

use super::{GroupState, Outgoing, Pending, FRAME_BUDGET, READ_AHEAD, READ_AHEAD_BYTES};
use crate::delivery::ConsumerId;
use crate::store::record::StoredMessage;
use sluice_protocol::{ErrorCode, WireError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Hash slots: a key's hash is in `0..HASH_SLOTS`.
pub const HASH_SLOTS: u32 = 65536;

/// The hash of a key: FNV-1a 64 of its bytes, `% 65536`.
pub fn key_hash(key: &[u8]) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(HASH_SLOTS)) as u16
}

/// The hash of a message's key; None without a key.
pub fn message_hash(m: &StoredMessage) -> Option<u16> {
    m.key.as_ref().map(|k| key_hash(k.as_bytes()))
}

/// One consumer's range of hashes, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRange {
    /// First hash.
    pub start: u16,
    /// Last hash.
    pub end: u16,
    /// Who owns it.
    pub owner: ConsumerId,
}

/// The hash ranges of a group's consumers: sorted, contiguous, covering `0..=65535` whenever
/// there is a consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashRanges {
    ranges: Vec<HashRange>,
}

impl HashRanges {
    /// Gives `c` a range (nothing if it has one): the whole space for the first consumer, else
    /// the upper half of the largest range (ties: lowest start).
    pub fn add(&mut self, c: ConsumerId) -> Result<(), WireError> {
        if self.ranges.iter().any(|r| r.owner == c) {
            return Ok(());
        }
        let mut best: Option<(usize, u32)> = None;
        for (i, r) in self.ranges.iter().enumerate() {
            let size = u32::from(r.end) - u32::from(r.start) + 1;
            if best.is_none_or(|(_, s)| size > s) {
                best = Some((i, size));
            }
        }
        let Some((i, size)) = best else {
            self.ranges.push(HashRange {
                start: 0,
                end: u16::MAX,
                owner: c,
            });
            return Ok(());
        };
        if size < 2 {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                "key_shared group has no hash range left to split (65,536 consumers)",
            ));
        }
        let r = self.ranges[i];
        // size >= 2, so mid is in start+1..=end.
        let mid = (u32::from(r.start) + size / 2) as u16;
        self.ranges[i].end = mid - 1;
        self.ranges.insert(
            i + 1,
            HashRange {
                start: mid,
                end: r.end,
                owner: c,
            },
        );
        Ok(())
    }

    /// Removes `c`'s range: it merges into the range below it, else the one above.
    pub fn remove(&mut self, c: ConsumerId) {
        let Some(i) = self.ranges.iter().position(|r| r.owner == c) else {
            return;
        };
        let r = self.ranges.remove(i);
        if i > 0 {
            self.ranges[i - 1].end = r.end;
        } else if let Some(next) = self.ranges.get_mut(0) {
            next.start = r.start;
        }
    }

    /// The owner of hash `h`.
    pub fn owner(&self, h: u16) -> Option<ConsumerId> {
        let i = self.ranges.partition_point(|r| r.start <= h);
        i.checked_sub(1)
            .and_then(|i| self.ranges.get(i))
            .filter(|r| r.end >= h)
            .map(|r| r.owner)
    }

    /// `c`'s ranges, inclusive (for stats).
    pub fn of(&self, c: ConsumerId) -> Vec<(u32, u32)> {
        self.ranges
            .iter()
            .filter(|r| r.owner == c)
            .map(|r| (u32::from(r.start), u32::from(r.end)))
            .collect()
    }

    /// Every range in order.
    pub fn all(&self) -> &[HashRange] {
        &self.ranges
    }
}

/// What a `key_shared` group keeps besides the common state.
#[derive(Debug, Default)]
pub(super) struct KeyShared {
    /// Who owns which hashes.
    pub(super) ranges: HashRanges,
    /// Per hash: the consumer its keyed messages in flight are with, and how many.
    holders: HashMap<u16, (ConsumerId, u32)>,
    /// Parked hashes: the lowest seq of each not in memory (see the design note).
    parked: HashMap<u16, u64>,
    /// A replay read from this seq is under way.
    replay_read: Option<u64>,
    /// The last read was a replay (the next one, if both are wanted, is an ordinary read).
    last_was_replay: bool,
    /// Times the buffer's keyed messages were parked (for tests and logs).
    pub(super) parks: u64,
}

impl KeyShared {
    /// The consumer holding hash `h` (keyed messages in flight to it).
    pub(super) fn holder(&self, h: u16) -> Option<ConsumerId> {
        self.holders.get(&h).map(|(c, _)| *c)
    }

    /// Parked hashes.
    #[cfg(test)]
    pub(super) fn parked_count(&self) -> usize {
        self.parked.len()
    }
}

/// Whether a message may go to the consumer being served.
enum Fit {
    /// To this consumer.
    Take,
    /// Another consumer's (it takes it in its own turn).
    Other,
    /// Its owner is this consumer, but an earlier message of its hash is in flight to another.
    Held(u16),
}

impl GroupState {
    /// `key_shared`: whether message `p` may go to consumer `me` now.
    fn key_shared_fit(&self, me: ConsumerId, p: &Pending, held_back: &HashSet<u16>) -> Fit {
        let (Some(ks), Some(h)) = (self.ks.as_ref(), message_hash(&p.msg)) else {
            return Fit::Take;
        };
        if ks.ranges.owner(h) != Some(me) {
            return Fit::Other;
        }
        if held_back.contains(&h) || ks.holder(h).is_some_and(|c| c != me) {
            return Fit::Held(h);
        }
        Fit::Take
    }

    /// `key_shared`: forms every batch the consumers can take now, one batch per consumer per
    /// round (round robin for messages without a key).
    pub(super) fn key_shared_form(
        &mut self,
        topic: &str,
        group: &str,
        budget: usize,
        next_id: &mut impl FnMut() -> u64,
        formed: &mut super::Formed,
    ) {
        let n = self.consumers.len();
        let mut done = vec![false; n];
        // A message waiting for its delayed redelivery holds its key's later ones back.
        let mut held_back: HashSet<u16> = self.waiting_hashes();
        loop {
            let mut progressed = false;
            let start = self.rr;
            for k in 0..n {
                let ci = (start + k) % n;
                if done[ci] || !self.consumers[ci].ready() {
                    continue;
                }
                let max = self.consumers[ci].batch_size.max(1) as usize;
                let msgs = self.key_shared_take(
                    ci,
                    max,
                    budget,
                    &mut held_back,
                    &mut formed.undeliverable,
                );
                if msgs.is_empty() {
                    done[ci] = true;
                    continue;
                }
                self.rr = (ci + 1) % n;
                let batch_id = next_id();
                let out: Outgoing = self.send_batch(ci, batch_id, msgs, topic, group);
                formed.batches.push(out);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.key_shared_park();
    }

    /// `key_shared`: up to `max` messages and `max_bytes` for consumer `ci`: its retries, then
    /// its fresh messages, both in seq order; stops at the first message of its own that does
    /// not fit (a later one of the same key must not pass it).
    fn key_shared_take(
        &mut self,
        ci: usize,
        max: usize,
        max_bytes: usize,
        held_back: &mut HashSet<u16>,
        too_big: &mut Vec<Pending>,
    ) -> Vec<Pending> {
        let me = self.consumers[ci].id;
        let fits = |bytes: usize, size: usize, n: usize| n == 0 || bytes + size <= max_bytes;
        let mut bytes = 0usize;
        let mut n = 0usize;
        let mut full = false;
        let mut from_retry = Vec::new();
        let mut big_retry = Vec::new();
        for (&seq, p) in &self.retry {
            if n >= max {
                full = true;
                break;
            }
            match self.key_shared_fit(me, p, held_back) {
                Fit::Other => continue,
                Fit::Held(h) => {
                    held_back.insert(h);
                    continue;
                }
                Fit::Take => {}
            }
            if p.size > FRAME_BUDGET {
                big_retry.push(seq);
                continue;
            }
            if !fits(bytes, p.size, n) {
                full = true;
                break;
            }
            bytes += p.size;
            n += 1;
            from_retry.push(seq);
        }
        let mut from_ready = Vec::new();
        let mut big_ready = Vec::new();
        let bounded = !self.fresh_allowed();
        if !full {
            for (i, p) in self.ready.iter().enumerate() {
                if n >= max {
                    break;
                }
                match self.key_shared_fit(me, p, held_back) {
                    Fit::Other => continue,
                    Fit::Held(h) => {
                        held_back.insert(h);
                        continue;
                    }
                    Fit::Take => {}
                }
                if bounded && !self.fills_a_hole_edge(p.msg.seq) {
                    // It would split a hole of the cursor: it waits, and so do the later
                    // messages of its key.
                    if let Some(h) = message_hash(&p.msg) {
                        held_back.insert(h);
                    }
                    continue;
                }
                if p.size > FRAME_BUDGET {
                    big_ready.push(i);
                    continue;
                }
                if !fits(bytes, p.size, n) {
                    break;
                }
                bytes += p.size;
                n += 1;
                from_ready.push(i);
            }
        }
        for seq in big_retry {
            if let Some(p) = self.retry.remove(&seq) {
                too_big.push(p);
            }
        }
        let mut out: Vec<Pending> = from_retry
            .into_iter()
            .filter_map(|seq| self.retry.remove(&seq))
            .collect();
        if !from_ready.is_empty() || !big_ready.is_empty() {
            let mut take: Vec<(usize, bool)> = from_ready
                .into_iter()
                .map(|i| (i, false))
                .chain(big_ready.into_iter().map(|i| (i, true)))
                .collect();
            take.sort_unstable();
            let mut kept = VecDeque::with_capacity(self.ready.len());
            let mut next = take.iter().peekable();
            for (i, p) in std::mem::take(&mut self.ready).into_iter().enumerate() {
                match next.peek() {
                    Some(&&(j, big)) if j == i => {
                        next.next();
                        self.ready_bytes = self.ready_bytes.saturating_sub(p.size);
                        if big {
                            too_big.push(p);
                        } else {
                            out.push(p);
                        }
                    }
                    _ => kept.push_back(p),
                }
            }
            self.ready = kept;
        }
        out
    }

    /// `key_shared`: keyed message `p` goes in flight to `consumer`.
    pub(super) fn key_shared_hold(&mut self, consumer: ConsumerId, p: &Pending) {
        let Some(ks) = self.ks.as_mut() else { return };
        let Some(h) = message_hash(&p.msg) else {
            return;
        };
        let e = ks.holders.entry(h).or_insert((consumer, 0));
        if e.0 != consumer {
            // Cannot happen: a hash held by another consumer is never handed out.
            tracing::error!(hash = h, holder = %e.0, %consumer, "key hash in flight to two consumers");
            e.0 = consumer;
        }
        e.1 += 1;
    }

    /// `key_shared`: keyed message `p` is no longer in flight to `consumer` (acked, returned).
    pub(super) fn key_shared_release(&mut self, consumer: ConsumerId, p: &Pending) {
        let Some(ks) = self.ks.as_mut() else { return };
        let Some(h) = message_hash(&p.msg) else {
            return;
        };
        if let Some(e) = ks.holders.get_mut(&h) {
            if e.0 == consumer {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    ks.holders.remove(&h);
                }
            }
        }
    }

    /// `key_shared`: whether `p`, arriving from the log or the live tail, belongs to a parked
    /// hash (it is then not kept: the hash's replay brings it back in order).
    pub(super) fn key_shared_parked(&self, p: &Pending) -> bool {
        match (&self.ks, message_hash(&p.msg)) {
            (Some(ks), Some(h)) => ks.parked.contains_key(&h),
            _ => false,
        }
    }

    fn buffer_full(&self) -> bool {
        self.ready.len() >= READ_AHEAD / 2 || self.ready_bytes >= READ_AHEAD_BYTES / 2
    }

    /// After a pass: if the buffer is at its read bound while a consumer has room but got
    /// nothing, its keyed messages (all held back) are parked (see the design note).
    fn key_shared_park(&mut self) {
        let Some(ks) = self.ks.as_mut() else { return };
        if !(self.ready.len() >= READ_AHEAD / 2 || self.ready_bytes >= READ_AHEAD_BYTES / 2)
            || !self.consumers.iter().any(|c| c.ready())
        {
            return;
        }
        let mut kept = VecDeque::new();
        let mut parked = 0usize;
        for p in std::mem::take(&mut self.ready) {
            match message_hash(&p.msg) {
                Some(h) => {
                    let e = ks.parked.entry(h).or_insert(p.msg.seq);
                    *e = (*e).min(p.msg.seq);
                    parked += 1;
                }
                None => kept.push_back(p),
            }
        }
        self.ready_bytes = kept.iter().map(|p| p.size).sum();
        self.ready = kept;
        ks.parks += 1;
        tracing::debug!(
            messages = parked,
            hashes = ks.parked.len(),
            "key_shared: read-ahead full of messages no consumer may take now; their keys parked"
        );
    }

    /// The seq a replay would start at: the lowest parked seq of a hash whose owner can take
    /// messages now and that no other consumer holds.
    fn key_shared_replay_from(&self) -> Option<u64> {
        let ks = self.ks.as_ref()?;
        let limit = self.key_shared_limit();
        if ks.parked.is_empty() {
            return None;
        }
        let ready: HashSet<ConsumerId> = self
            .consumers
            .iter()
            .filter(|c| c.ready())
            .map(|c| c.id)
            .collect();
        ks.parked
            .iter()
            .filter(|(h, s)| **s < limit && self.key_shared_replayable(ks, **h, &ready))
            .map(|(_, s)| *s)
            .min()
    }

    fn key_shared_replayable(&self, ks: &KeyShared, h: u16, ready: &HashSet<ConsumerId>) -> bool {
        match ks.ranges.owner(h) {
            Some(o) => ready.contains(&o) && ks.holder(h).is_none_or(|c| c == o),
            None => false,
        }
    }

    /// Whether settling `seq` cannot add a range to the cursor: a seq next to a settled one.
    /// While the cursor is at its range bound ([`super::MAX_ACK_RANGES`]) only such fresh
    /// messages go out in a `key_shared` group. (There, messages of a key that waits lie below
    /// messages of other keys already acked, so the holes of the cursor bound how far the
    /// others run ahead; at the bound the holes are still filled from their edges, so the
    /// floor moves and the cursor never grows past the bound by more than what is in flight.)
    fn fills_a_hole_edge(&self, seq: u64) -> bool {
        self.is_settled(seq.saturating_sub(1)) || self.is_settled(seq.saturating_add(1))
    }

    /// Reads and replays bring messages below this seq only: the group's read position, or,
    /// while the cursor is at its range bound, the seq after the highest settled one (nothing
    /// beyond could go out: it would not be next to a settled seq).
    fn key_shared_limit(&self) -> u64 {
        if self.fresh_allowed() {
            return self.next_read;
        }
        self.above.last().map_or(self.next_read, |(_, e)| {
            self.next_read.min(e.saturating_add(2))
        })
    }

    /// Whether an ordinary read would bring anything that may go out (see
    /// [`Self::key_shared_limit`]).
    pub(super) fn key_shared_read_useful(&self) -> bool {
        self.ks.is_none() || self.fresh_allowed() || self.next_read < self.key_shared_limit()
    }

    /// Whether a replay read is wanted now.
    pub(super) fn key_shared_wants_replay(&self) -> bool {
        let Some(ks) = self.ks.as_ref() else {
            return false;
        };
        !self.reading
            && !ks.parked.is_empty()
            && !self.buffer_full()
            && self.key_shared_replay_from().is_some()
    }

    /// Starts a replay read if one is wanted (and the last read was not one, when an ordinary
    /// read is wanted too); its first seq.
    pub(super) fn key_shared_start_replay(&mut self) -> Option<u64> {
        if !self.key_shared_wants_replay() {
            return None;
        }
        let ordinary = self.key_shared_read_useful()
            && self.ready.len() < READ_AHEAD / 2
            && self.ready_bytes < READ_AHEAD_BYTES / 2
            && self.ks.as_ref().is_some_and(|ks| ks.last_was_replay);
        let from = self.key_shared_replay_from()?;
        let ks = self.ks.as_mut()?;
        if ordinary {
            ks.last_was_replay = false;
            return None;
        }
        ks.last_was_replay = true;
        ks.replay_read = Some(from);
        self.reading = true;
        Some(from)
    }

    /// Whether the read from `from` that finished is a replay.
    pub(super) fn key_shared_replaying(&self, from: u64) -> bool {
        self.ks
            .as_ref()
            .is_some_and(|ks| ks.replay_read == Some(from))
    }

    /// A replay read from `from` finished: the messages of replayable parked hashes at or
    /// above their parked seq (and below the group's read position) go into the buffer in seq
    /// order, and those hashes' parked seqs move past the read (unparked at the read position).
    pub(super) fn key_shared_finish_replay(
        &mut self,
        from: u64,
        result: Option<(Vec<StoredMessage>, Vec<u64>)>,
    ) -> bool {
        self.reading = false;
        if let Some(ks) = self.ks.as_mut() {
            ks.replay_read = None;
        }
        let Some((messages, corrupt)) = result else {
            return true;
        };
        let limit = self.key_shared_limit();
        let ready: HashSet<ConsumerId> = self
            .consumers
            .iter()
            .filter(|c| c.ready())
            .map(|c| c.id)
            .collect();
        let Some(ks) = self.ks.as_ref() else {
            return true;
        };
        // Hashes replayed by this read: parked at or above its start, owner able to take them.
        let taken: HashMap<u16, u64> = ks
            .parked
            .iter()
            .filter(|(h, s)| **s >= from && self.key_shared_replayable(ks, **h, &ready))
            .map(|(h, s)| (*h, *s))
            .collect();
        let mut last = from.saturating_sub(1);
        let mut fresh = Vec::new();
        for m in messages {
            if m.seq >= limit {
                break;
            }
            last = last.max(m.seq);
            let Some(h) = message_hash(&m) else { continue };
            let Some(&since) = taken.get(&h) else {
                continue;
            };
            if m.seq >= since
                && !self.is_settled(m.seq)
                && !self.seq_batch.contains_key(&m.seq)
                && !self.retry.contains_key(&m.seq)
                && !self.is_waiting(m.seq)
                && !self.dead_lettering.contains(&m.seq)
            {
                fresh.push(Pending::fresh(Arc::new(m)));
            }
        }
        for seq in corrupt {
            if seq < limit {
                last = last.max(seq);
                self.settle(seq);
            }
        }
        if last < from {
            // Nothing at or after `from`: the log holds nothing more below the read position.
            last = limit.saturating_sub(1);
        }
        if let Some(ks) = self.ks.as_mut() {
            for h in taken.keys() {
                if let Some(s) = ks.parked.get_mut(h) {
                    *s = (*s).max(last + 1);
                    if *s >= self.next_read {
                        ks.parked.remove(h);
                    }
                }
            }
        }
        self.merge_ready(fresh);
        true
    }

    /// Merges `fresh` (seq order) into the buffer, keeping it in seq order.
    fn merge_ready(&mut self, mut fresh: Vec<Pending>) {
        if fresh.is_empty() {
            return;
        }
        for p in fresh.iter_mut() {
            self.revive(p);
        }
        self.ready_bytes += fresh.iter().map(|p| p.size).sum::<usize>();
        let mut out = VecDeque::with_capacity(self.ready.len() + fresh.len());
        let mut a = std::mem::take(&mut self.ready).into_iter().peekable();
        let mut b = fresh.into_iter().peekable();
        loop {
            let take_a = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => x.msg.seq <= y.msg.seq,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_a { a.next() } else { b.next() };
            if let Some(p) = next {
                out.push_back(p);
            }
        }
        self.ready = out;
    }

    /// `key_shared` facts for tests: parked hashes, times parked.
    #[cfg(test)]
    pub(super) fn key_shared_parking(&self) -> (usize, u64) {
        self.ks
            .as_ref()
            .map_or((0, 0), |ks| (ks.parked_count(), ks.parks))
    }

    /// `key_shared`: the consumer holding hash `h` (for tests).
    #[cfg(test)]
    pub(super) fn key_shared_holder(&self, h: u16) -> Option<ConsumerId> {
        self.ks.as_ref().and_then(|ks| ks.holder(h))
    }
}

#[cfg(test)]
#[path = "key_shared/tests.rs"]
mod tests;
