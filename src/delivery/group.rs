//! One group's delivery state and its rules: the durable cursor, what waits for delivery, what
//! is in flight to whom, and how acks, nacks, timeouts and departures change it. Plain data: the
//! orchestrator actor owns one per (topic, group) and only moves messages around it.

use super::ranges::SeqRanges;
use super::{ConsumerId, SeqMap, SeqSet};
use crate::store::record::StoredMessage;
use crate::store::GroupRecord;
use broadcast::Broadcast;
use key_shared::KeyShared;
use sluice_protocol::mpwrite::{BatchWriter, MessageFields};
use sluice_protocol::{AckOutcome, ConsumerStats, ErrorCode, GroupMode, GroupStats, WireError};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Fresh messages kept read ahead per group, at most.
pub const READ_AHEAD: usize = 1024;
/// Bytes of fresh messages kept read ahead per group, at most (a message is always taken).
pub const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;
/// Most ranges of settled seqs above the floor. Each unsettled message below the highest
/// settled one splits a range; at this many, fresh messages wait (retries and acks go on) until
/// the floor moves, so whatever consumers do, only acks of messages already in flight (one
/// range each at most) can take the cursor past it, and its record stays small.
pub const MAX_ACK_RANGES: usize = 4096;
/// Largest RSocket frame (24-bit length) less room for the frame header and the batch's own
/// fields: every batch is encoded below this.
pub const FRAME_BUDGET: usize = (1 << 24) - 1 - 64 * 1024;

/// How big a message is on the wire, at most: payload, key, headers and MessagePack framing.
pub fn wire_size(m: &StoredMessage) -> usize {
    let headers: usize = m.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    m.payload.len() + m.key.as_ref().map_or(0, |k| k.len()) + headers + 96
}

/// Bytes a batch's own fields take, at most (besides its messages).
pub fn batch_overhead(topic: &str, group: &str) -> usize {
    topic.len() + group.len() + 64
}

/// Delivery limits (from the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes per batch, counting every byte of each message (see [`wire_size`]).
    pub batch_max_bytes: usize,
    /// Failures (timeouts, nacks) before a message is dead-lettered: it goes once it has failed
    /// more often than this.
    pub max_retries: u32,
}

/// A message waiting for (re)delivery, with how many deliveries it has had and how many of them
/// failed by timeout or nack. Only failures count toward `max_retries`: a batch returned because
/// its consumer disconnected is redelivered (its `attempt` rises) without moving the message
/// closer to the dead-letter topic, as in RabbitMQ 4's delivery limit.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The message.
    pub msg: Arc<StoredMessage>,
    /// Deliveries so far.
    pub deliveries: u32,
    /// Deliveries that failed (timeout, nack).
    pub failures: u32,
    /// [`wire_size`] of the message, computed once.
    pub size: usize,
    /// `broadcast`: the member whose copy this is (its dead letters carry `x-dlq-consumer`).
    pub member: Option<ConsumerId>,
}

impl Pending {
    /// A message never delivered.
    pub fn fresh(msg: Arc<StoredMessage>) -> Self {
        Pending {
            size: wire_size(&msg),
            msg,
            deliveries: 0,
            failures: 0,
            member: None,
        }
    }
}

#[derive(Debug)]
struct InFlight {
    consumer: ConsumerId,
    msgs: BTreeMap<u64, Pending>,
    /// Wire bytes of the batch when it was formed.
    bytes: usize,
}

#[derive(Debug)]
struct ConsumerSlot {
    id: ConsumerId,
    credits: u64,
    window: u32,
    batch_size: u32,
    in_flight: u32,
    /// Wire bytes of its batches in flight, and their bound: a consumer never holds more than
    /// its connection may queue unwritten, so a consumer that reads is never taken for one that
    /// does not (a new batch goes out while under the bound).
    in_flight_bytes: usize,
    max_in_flight_bytes: usize,
}

impl ConsumerSlot {
    fn ready(&self) -> bool {
        self.credits > 0
            && self.in_flight < self.window
            && self.in_flight_bytes < self.max_in_flight_bytes
    }

    /// A batch of `bytes` closed.
    fn closed(&mut self, bytes: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
    }
}

/// A batch formed for a consumer: to send, and to time.
#[derive(Debug)]
pub struct Outgoing {
    /// Who gets it.
    pub consumer: ConsumerId,
    /// The batch's id.
    pub batch_id: u64,
    /// Its messages.
    pub count: u32,
    /// The smallest `attempt` of its messages (its redelivery timer follows it).
    pub min_attempt: u32,
    /// The batch encoded (`StreamEvent::Batch`, see [`sluice_protocol::mpwrite`]), ready for
    /// the wire.
    pub data: bytes::Bytes,
}

impl Outgoing {
    /// The batch, decoded (for tests and logs).
    pub fn batch(&self) -> Result<sluice_protocol::Batch, sluice_protocol::CodecError> {
        match sluice_protocol::decode(&self.data)? {
            sluice_protocol::StreamEvent::Batch(b) => Ok(b),
            _ => Err(sluice_protocol::CodecError::Decode(
                rmp_serde::decode::Error::Syntax("not a batch".into()),
            )),
        }
    }
}

/// What forming batches produced.
#[derive(Debug, Default)]
pub struct Formed {
    /// Batches to send.
    pub batches: Vec<Outgoing>,
    /// Messages too big for any frame: to dead-letter, never to loop.
    pub undeliverable: Vec<Pending>,
}

/// What an ack or nack did.
#[derive(Debug)]
pub struct Settlement {
    /// The outcome for the reply.
    pub outcome: AckOutcome,
    /// Messages whose state changed.
    pub count: u32,
    /// Named seqs not applied (not delivered to this connection in this batch, not settled).
    pub rejected: Vec<u64>,
    /// Batches now closed (their timers to cancel).
    pub closed: Vec<u64>,
    /// Messages to dead-letter (a nack past `max_retries`).
    pub dead: Vec<Pending>,
}

/// A consumer asking to join.
#[derive(Debug, Clone)]
pub struct Joining {
    /// Who.
    pub consumer: ConsumerId,
    /// Requested mode.
    pub mode: GroupMode,
    /// Requested filters.
    pub filters: BTreeMap<String, String>,
    /// Unacked batches allowed.
    pub window: u32,
    /// Messages per batch.
    pub batch_size: u32,
    /// Credits (REQUEST_N) available now.
    pub credits: u64,
    /// Wire bytes of batches in flight to it, at most (a new batch goes out while under).
    pub max_in_flight_bytes: usize,
}

/// One group's delivery state. See `orchestrator.md` for the state machine.
#[derive(Debug)]
pub struct GroupState {
    mode: GroupMode,
    filters: BTreeMap<String, String>,
    created_ms: u64,
    /// Every seq `<= floor` is settled.
    floor: u64,
    /// Settled seqs above the floor.
    above: SeqRanges,
    /// Next seq to read from the log.
    next_read: u64,
    /// A read of the log is under way.
    reading: bool,
    /// Fresh messages read ahead (never delivered), seq order.
    ready: VecDeque<Pending>,
    ready_bytes: usize,
    /// Messages to deliver again, by seq.
    retry: BTreeMap<u64, Pending>,
    in_flight: SeqMap<InFlight>,
    seq_batch: SeqMap<u64>,
    /// On their way to the dead-letter topic.
    dead_lettering: SeqSet,
    consumers: Vec<ConsumerSlot>,
    rr: usize,
    redeliveries: u64,
    dead_letters: u64,
    /// Seqs named by acks and nacks and not applied.
    rejected_acks: u64,
    /// The cursor moved past the last record taken.
    dirty: bool,
    /// The cursor passed [`MAX_ACK_RANGES`] (logged once).
    warned_ranges: bool,
    /// Backoff, attempts, activity, notices (`ops.rs`).
    ops: ops::GroupOps,
    /// `key_shared`: hash ranges, keys in flight, parked hashes (`key_shared.rs`).
    ks: Option<Box<KeyShared>>,
    /// `broadcast`: one state per member (`broadcast.rs`); this state then keeps only the
    /// group's cursor (what every member settled).
    bc: Option<Box<Broadcast>>,
}

impl GroupState {
    /// The state of a group from its durable record.
    pub fn from_record(rec: GroupRecord) -> Self {
        let mut g = GroupState {
            mode: rec.mode,
            filters: rec.filters,
            created_ms: rec.created_ms,
            floor: rec.acked_floor,
            above: SeqRanges::new(),
            next_read: 0,
            reading: false,
            ready: VecDeque::new(),
            ready_bytes: 0,
            retry: BTreeMap::new(),
            in_flight: SeqMap::default(),
            seq_batch: SeqMap::default(),
            dead_lettering: SeqSet::default(),
            consumers: Vec::new(),
            rr: 0,
            redeliveries: 0,
            dead_letters: 0,
            rejected_acks: 0,
            dirty: false,
            warned_ranges: false,
            ops: ops::GroupOps::load(rec.backoff_ms, rec.attempts),
            ks: None,
            bc: None,
        };
        match g.mode {
            GroupMode::KeyShared => g.ks = Some(Box::default()),
            GroupMode::Broadcast => g.bc = Some(Box::default()),
            _ => {}
        }
        // Older records list seqs one by one; newer ones ranges.
        for s in rec.acked_above {
            if s > g.floor {
                g.above.insert(s);
            }
        }
        for (s, e) in rec.acked_ranges {
            let s = s.max(g.floor + 1);
            g.above.insert_range(s, e);
        }
        g.advance_floor();
        g.next_read = g.floor + 1;
        g.prune_restored();
        g
    }

    /// A new group's record: it starts at the beginning of the log.
    pub fn new_record(mode: GroupMode, filters: BTreeMap<String, String>) -> GroupRecord {
        GroupRecord {
            mode,
            filters,
            acked_floor: 0,
            acked_above: vec![],
            acked_ranges: vec![],
            created_ms: crate::actors::now_ms(),
            backoff_ms: vec![],
            attempts: vec![],
        }
    }

    /// The durable form of the cursor: every range. [`MAX_ACK_RANGES`] bounds them by holding
    /// back fresh messages; acks of messages already in flight can still add ranges past it
    /// (at most one per message in flight), and those are written too: a reply that says
    /// "acked" never rests on a record that left the ack out. (A record the store cannot hold
    /// fails the commit, and the ack is answered with an error.)
    pub fn record(&mut self) -> GroupRecord {
        if self.above.range_count() > MAX_ACK_RANGES && !self.warned_ranges {
            self.warned_ranges = true;
            tracing::warn!(
                ranges = self.above.range_count(),
                max = MAX_ACK_RANGES,
                "group cursor past its range bound (acks of messages in flight): fresh messages wait"
            );
        }
        GroupRecord {
            mode: self.mode,
            filters: self.filters.clone(),
            acked_floor: self.floor,
            acked_above: vec![],
            acked_ranges: self.above.ranges().collect(),
            created_ms: self.created_ms,
            backoff_ms: self.backoff().to_vec(),
            attempts: self.attempts_record(),
        }
    }

    /// The record, if the cursor moved since the last one taken.
    pub fn take_dirty_record(&mut self) -> Option<GroupRecord> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        Some(self.record())
    }

    /// Mode of the group.
    pub fn mode(&self) -> GroupMode {
        self.mode
    }

    /// Every seq at or below this is settled.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Whether `seq` is settled (acked, filtered out, dead-lettered).
    pub fn is_settled(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(seq)
    }

    fn advance_floor(&mut self) {
        if let Some((s, e)) = self.above.first() {
            if s <= self.floor + 1 {
                self.above.pop_first();
                self.floor = self.floor.max(e);
            }
        }
    }

    /// Marks a seq settled. Returns whether it changed.
    fn settle(&mut self, seq: u64) -> bool {
        if self.is_settled(seq) {
            return false;
        }
        self.above.insert(seq);
        self.advance_floor();
        self.forget_failed_seq(seq);
        self.dirty = true;
        true
    }

    /// Unsettled messages up to `head`.
    pub fn lag(&self, head: u64) -> u64 {
        head.saturating_sub(self.floor)
            .saturating_sub(self.above.len())
    }

    fn matches(&self, m: &StoredMessage) -> bool {
        self.filters
            .iter()
            .all(|(k, v)| m.headers.get(k) == Some(v))
    }

    /// Adds a consumer (or replaces its slot), checking mode, filters and exclusivity.
    pub fn join(&mut self, j: Joining) -> Result<(), WireError> {
        if self.mode != j.mode {
            return Err(WireError::new(
                ErrorCode::ModeConflict,
                format!("group exists with mode '{}', not '{}'", self.mode, j.mode),
            ));
        }
        if self.filters != j.filters {
            return Err(WireError::new(
                ErrorCode::FilterConflict,
                format!(
                    "group exists with filters {:?}, not {:?}",
                    self.filters, j.filters
                ),
            ));
        }
        if self.mode == GroupMode::Exclusive && self.consumers.iter().any(|c| c.id != j.consumer) {
            return Err(WireError::new(
                ErrorCode::ExclusiveTaken,
                "exclusive group already has a consumer",
            ));
        }
        if self.bc.is_some() {
            return self.broadcast_join(j);
        }
        if let Some(ks) = &mut self.ks {
            ks.ranges.add(j.consumer)?;
        }
        self.consumers.retain(|c| c.id != j.consumer);
        self.consumers.push(ConsumerSlot {
            id: j.consumer,
            credits: j.credits,
            window: j.window.max(1),
            batch_size: j.batch_size.max(1),
            in_flight: 0,
            in_flight_bytes: 0,
            max_in_flight_bytes: j.max_in_flight_bytes.max(1),
        });
        self.note_join(j.consumer);
        Ok(())
    }

    /// Removes a consumer; returns its batches in flight (to fail, not counting as failures)
    /// and, for failover, the consumer promoted to active.
    pub fn leave(&mut self, consumer: ConsumerId) -> (Vec<u64>, Option<ConsumerId>) {
        if self.bc.is_some() {
            return (self.broadcast_leave(consumer), None);
        }
        if let Some(ks) = &mut self.ks {
            ks.ranges.remove(consumer);
        }
        let was_active = self.consumers.first().is_some_and(|c| c.id == consumer);
        self.consumers.retain(|c| c.id != consumer);
        self.note_leave(consumer);
        let mut batches: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, b)| b.consumer == consumer)
            .map(|(id, _)| *id)
            .collect();
        batches.sort_unstable();
        let promoted = (self.mode == GroupMode::Failover && was_active)
            .then(|| self.consumers.first().map(|c| c.id))
            .flatten();
        (batches, promoted)
    }

    /// More credits for a consumer.
    pub fn grant(&mut self, consumer: ConsumerId, n: u64) {
        if let Some(m) = self.member_mut(consumer) {
            return m.grant(consumer, n);
        }
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == consumer) {
            c.credits = c.credits.saturating_add(n);
        }
    }

    /// Consumers present.
    pub fn consumer_count(&self) -> usize {
        if let Some(bc) = &self.bc {
            return bc.members.len();
        }
        self.consumers.len()
    }

    /// Whether the log should be read from `next_read()` now (not reading, room ahead, more
    /// in the log).
    pub fn wants_read(&self, head: u64) -> bool {
        if let Some(bc) = &self.bc {
            return bc.wants_read(head);
        }
        if self.wants_retry_read() {
            return true;
        }
        if self.key_shared_wants_replay() {
            return true;
        }
        self.key_shared_read_useful()
            && !self.reading
            && self.ready.len() < READ_AHEAD / 2
            && self.ready_bytes < READ_AHEAD_BYTES / 2
            && self.next_read <= head
    }

    /// Next seq to read from the log.
    pub fn next_read(&self) -> u64 {
        if let Some(bc) = &self.bc {
            return bc.next_read().unwrap_or(self.next_read);
        }
        self.next_read
    }

    /// Marks a read from `next_read()` as under way.
    pub fn start_read(&mut self) -> u64 {
        if let Some(bc) = &mut self.bc {
            return bc.start_read(self.floor + 1);
        }
        if let Some(from) = self.start_retry_read() {
            return from;
        }
        if let Some(from) = self.key_shared_start_replay() {
            return from;
        }
        self.reading = true;
        self.next_read
    }

    /// A read from `from` finished (or failed: `None`). Returns false when the result is stale
    /// (the live tail moved on meanwhile) and was dropped.
    pub fn finish_read(
        &mut self,
        from: u64,
        result: Option<(Vec<StoredMessage>, Vec<u64>)>,
    ) -> bool {
        if self.bc.is_some() {
            return self.broadcast_finish_read(from, result);
        }
        if self.retry_reading(from) {
            return self.finish_retry_read(from, result);
        }
        if self.key_shared_replaying(from) {
            return self.key_shared_finish_replay(from, result);
        }
        self.reading = false;
        if self.next_read != from {
            return false;
        }
        let Some((messages, corrupt)) = result else {
            return true;
        };
        let mut last = from.saturating_sub(1);
        for seq in corrupt {
            last = last.max(seq);
            tracing::error!(seq, "corrupt message skipped (settled without delivery)");
            self.settle(seq);
        }
        for m in messages {
            last = last.max(m.seq);
            if !self.is_settled(m.seq)
                && !self.seq_batch.contains_key(&m.seq)
                && !self.retry.contains_key(&m.seq)
                && !self.dead_lettering.contains(&m.seq)
                && !self.is_waiting(m.seq)
            {
                self.push_ready(Pending::fresh(Arc::new(m)));
            }
        }
        self.next_read = self.next_read.max(last + 1);
        true
    }

    fn push_ready(&mut self, mut p: Pending) {
        if self.key_shared_parked(&p) {
            // Its hash waits for a replay from the log (key_shared.rs).
            return;
        }
        self.revive(&mut p);
        self.ready_bytes += p.size;
        self.ready.push_back(p);
    }

    /// New durable messages `msgs` (seq order): a group that has read everything before them
    /// and has room takes them directly (the live tail); otherwise it reads them later.
    pub fn offer_tail(&mut self, msgs: &[Arc<StoredMessage>]) {
        if self.bc.is_some() {
            return self.broadcast_offer_tail(msgs);
        }
        let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
            return;
        };
        // Taken while under both bounds: the buffer exceeds them by one announcement at most
        // (its messages are the store's, shared, not copies), and a group that keeps up never
        // has to read back from the log what was just announced.
        if !self.takes_tail(first.seq) {
            return;
        }
        for m in msgs {
            if !self.is_settled(m.seq) {
                self.push_ready(Pending::fresh(m.clone()));
            }
        }
        self.next_read = last.seq + 1;
    }

    /// Whether the live tail starting at `first` is taken directly (see [`Self::offer_tail`]).
    fn takes_tail(&self, first: u64) -> bool {
        !(self.reading
            || self.next_read != first
            || self.ready.len() >= READ_AHEAD
            || self.ready_bytes >= READ_AHEAD_BYTES)
    }

    /// Picks the consumer to receive the next batch, by mode.
    fn pick(&mut self) -> Option<usize> {
        if self.consumers.is_empty() {
            return None;
        }
        match self.mode {
            // Failover: the longest-connected consumer is active; the others stand by.
            GroupMode::Exclusive | GroupMode::Failover => self.consumers[0].ready().then_some(0),
            _ => {
                let n = self.consumers.len();
                for i in 0..n {
                    let idx = (self.rr + i) % n;
                    if self.consumers[idx].ready() {
                        self.rr = (idx + 1) % n;
                        return Some(idx);
                    }
                }
                None
            }
        }
    }

    /// Whether fresh messages may be handed out (the cursor has room for more ack ranges).
    fn fresh_allowed(&self) -> bool {
        self.above.range_count() < MAX_ACK_RANGES && self.waiting_allows_fresh()
    }

    /// Takes up to `max` messages and `max_bytes` (wire bytes; at least one message when it
    /// fits the frame): retries first, then fresh messages by priority (higher first), seq
    /// order within a priority. Messages too big for any batch go to `too_big`.
    fn take_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
        too_big: &mut Vec<Pending>,
    ) -> Vec<Pending> {
        let fits = |bytes: usize, size: usize, n: usize| n == 0 || bytes + size <= max_bytes;
        let mut out: Vec<Pending> = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max {
            let Some((&seq, p)) = self.retry.first_key_value() else {
                break;
            };
            let size = p.size;
            if size > FRAME_BUDGET {
                if let Some(p) = self.retry.remove(&seq) {
                    too_big.push(p);
                }
                continue;
            }
            if !fits(bytes, size, out.len()) {
                return out;
            }
            if let Some(p) = self.retry.remove(&seq) {
                bytes += size;
                out.push(p);
            }
        }
        if out.len() >= max || self.ready.is_empty() || !self.fresh_allowed() {
            return out;
        }
        let n_retry = out.len();
        let top = self.ready.iter().map(|p| p.msg.priority).max().unwrap_or(0);
        let uniform = self.ready.iter().all(|p| p.msg.priority == top);
        if uniform {
            while out.len() < max {
                let Some(p) = self.ready.front() else { break };
                let size = p.size;
                if size <= FRAME_BUDGET && !fits(bytes, size, out.len()) {
                    break;
                }
                let Some(p) = self.ready.pop_front() else {
                    break;
                };
                self.ready_bytes = self.ready_bytes.saturating_sub(size);
                if size > FRAME_BUDGET {
                    too_big.push(p);
                    continue;
                }
                bytes += size;
                out.push(p);
            }
        } else {
            let mut idx: Vec<usize> = (0..self.ready.len()).collect();
            idx.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(self.ready[i].msg.priority),
                    self.ready[i].msg.seq,
                )
            });
            let mut chosen = Vec::new();
            let mut big = Vec::new();
            for i in idx {
                if out.len() + chosen.len() >= max {
                    break;
                }
                let size = self.ready[i].size;
                if size > FRAME_BUDGET {
                    big.push(i);
                    continue;
                }
                if !fits(bytes, size, out.len() + chosen.len()) {
                    break;
                }
                bytes += size;
                chosen.push(i);
            }
            let mut taken: Vec<(usize, bool)> = chosen
                .into_iter()
                .map(|i| (i, false))
                .chain(big.into_iter().map(|i| (i, true)))
                .collect();
            taken.sort_unstable();
            for (i, is_big) in taken.into_iter().rev() {
                if let Some(p) = self.ready.remove(i) {
                    self.ready_bytes = self.ready_bytes.saturating_sub(p.size);
                    if is_big {
                        too_big.push(p);
                    } else {
                        out.push(p);
                    }
                }
            }
            out[n_retry..].sort_by_key(|p| (std::cmp::Reverse(p.msg.priority), p.msg.seq));
        }
        out
    }

    /// Forms every batch the consumers can take now. Filtered-out fresh messages are settled
    /// first. `next_id` hands out batch ids.
    pub fn form_batches(
        &mut self,
        topic: &str,
        group: &str,
        limits: Limits,
        mut next_id: impl FnMut() -> u64,
    ) -> Formed {
        if self.bc.is_some() {
            return self.broadcast_form(topic, group, limits, &mut next_id);
        }
        if !self.filters.is_empty() {
            let mut kept = VecDeque::with_capacity(self.ready.len());
            while let Some(p) = self.ready.pop_front() {
                if self.matches(&p.msg) {
                    kept.push_back(p);
                } else {
                    self.ready_bytes = self.ready_bytes.saturating_sub(p.size);
                    self.settle(p.msg.seq);
                }
            }
            self.ready = kept;
        }
        let budget = limits
            .batch_max_bytes
            .min(FRAME_BUDGET.saturating_sub(batch_overhead(topic, group)))
            .max(1);
        let mut formed = Formed::default();
        if self.ks.is_some() {
            self.key_shared_form(topic, group, budget, &mut next_id, &mut formed);
        } else {
            while let Some(ci) = self.pick() {
                let max = self.consumers[ci].batch_size.max(1) as usize;
                let msgs = self.take_batch(max, budget, &mut formed.undeliverable);
                if msgs.is_empty() {
                    if self.retry.is_empty() && (self.ready.is_empty() || !self.fresh_allowed()) {
                        break;
                    }
                    continue;
                }
                let batch_id = next_id();
                formed
                    .batches
                    .push(self.send_batch(ci, batch_id, msgs, topic, group));
            }
        }
        for p in &formed.undeliverable {
            self.dead_lettering.insert(p.msg.seq);
        }
        self.note_pressure();
        formed
    }

    /// Puts `msgs` in flight to consumer `ci` as batch `batch_id`; the batch to send.
    fn send_batch(
        &mut self,
        ci: usize,
        batch_id: u64,
        msgs: Vec<Pending>,
        topic: &str,
        group: &str,
    ) -> Outgoing {
        let bytes: usize = msgs.iter().map(|p| p.size).sum();
        let c = &mut self.consumers[ci];
        c.credits -= 1;
        c.in_flight += 1;
        c.in_flight_bytes += bytes;
        let consumer = c.id;
        let count = msgs.len();
        // `size` bounds each message's encoding; the batch's own fields come on top.
        let mut w = BatchWriter::new(
            batch_id,
            topic,
            group,
            count,
            bytes + batch_overhead(topic, group),
        );
        let mut min_attempt = u32::MAX;
        let mut map = BTreeMap::new();
        for mut p in msgs {
            p.deliveries += 1;
            if p.deliveries > 1 {
                self.redeliveries += 1;
            }
            min_attempt = min_attempt.min(p.deliveries);
            let m = &p.msg;
            let fields = MessageFields {
                seq: m.seq,
                timestamp_ms: m.timestamp_ms,
                key: m.key.as_deref(),
                headers: &m.headers,
                priority: m.priority,
            };
            w.message(fields, p.deliveries, &m.payload);
            self.seq_batch.insert(p.msg.seq, batch_id);
            self.key_shared_hold(consumer, &p);
            map.insert(p.msg.seq, p);
        }
        self.note_delivered(consumer, &map);
        self.in_flight.insert(
            batch_id,
            InFlight {
                consumer,
                msgs: map,
                bytes,
            },
        );
        Outgoing {
            consumer,
            batch_id,
            count: count as u32,
            min_attempt: if count == 0 { 1 } else { min_attempt },
            data: w.finish(),
        }
    }

    /// The batch `batch_id`, if it is in flight to a subscription of connection `conn`.
    fn own_batch(&self, conn: u64, batch_id: u64) -> bool {
        self.in_flight
            .get(&batch_id)
            .is_some_and(|b| b.consumer.conn == conn)
    }

    /// Closes the batches of `candidates` left empty; returns them.
    fn close_empty(&mut self, candidates: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut closed = Vec::new();
        for bid in candidates {
            if self.in_flight.get(&bid).is_some_and(|b| b.msgs.is_empty()) {
                if let Some(b) = self.in_flight.remove(&bid) {
                    if let Some(c) = self.consumers.iter_mut().find(|c| c.id == b.consumer) {
                        c.closed(b.bytes);
                    }
                    closed.push(bid);
                }
            }
        }
        closed
    }

    /// An ack from connection `conn`: settles the named messages (all, when `seqs` is None) of
    /// batch `batch_id` if that batch is in flight to this connection. Seqs of other batches,
    /// of other consumers, or never delivered are not applied: already settled ones count as
    /// already acked, the rest are `rejected`.
    pub fn ack(&mut self, conn: u64, batch_id: u64, seqs: Option<Vec<u64>>) -> Settlement {
        if self.bc.is_some() {
            return self.broadcast_settle(batch_id, conn, |m| m.ack(conn, batch_id, seqs));
        }
        let owner = self.batch_owner(conn, batch_id);
        let s = self.ack_inner(conn, batch_id, seqs);
        self.rejected_acks += s.rejected.len() as u64;
        if let Some(c) = owner {
            self.note_ack(c, s.count);
        }
        s
    }

    fn ack_inner(&mut self, conn: u64, batch_id: u64, seqs: Option<Vec<u64>>) -> Settlement {
        let own = self.own_batch(conn, batch_id);
        let seqs = match (seqs, own) {
            (Some(s), false) if s.is_empty() => {
                return settlement(AckOutcome::UnknownBatch, 0, vec![])
            }
            (Some(s), _) => s,
            (None, true) => self
                .in_flight
                .get(&batch_id)
                .map(|b| b.msgs.keys().copied().collect())
                .unwrap_or_default(),
            (None, false) => return settlement(AckOutcome::UnknownBatch, 0, vec![]),
        };
        let mut count = 0u32;
        let mut rejected = Vec::new();
        for seq in seqs {
            let removed = if own {
                self.in_flight
                    .get_mut(&batch_id)
                    .and_then(|b| b.msgs.remove(&seq).map(|p| (b.consumer, p)))
            } else {
                None
            };
            let in_batch = removed.is_some();
            if let Some((c, p)) = removed {
                self.key_shared_release(c, &p);
            }
            if in_batch {
                self.seq_batch.remove(&seq);
                if self.settle(seq) {
                    count += 1;
                }
            } else if !self.is_settled(seq) {
                rejected.push(seq);
            }
        }
        let closed = if own {
            self.close_empty([batch_id])
        } else {
            vec![]
        };
        Settlement::of(count, rejected, closed, vec![])
    }

    /// A nack from connection `conn` of batch `batch_id` (every message still in it when
    /// `seqs` is None): the messages go back for redelivery; each nack counts as a failure
    /// unless `release` (then the delivery does not count either: `attempt` stays). Past
    /// `max_retries` failures a message is returned in `dead`, to dead-letter.
    pub fn nack(
        &mut self,
        conn: u64,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        release: bool,
        max_retries: u32,
    ) -> Settlement {
        if self.bc.is_some() {
            let s = self.broadcast_settle(batch_id, conn, |m| {
                m.nack(conn, batch_id, seqs, release, max_retries)
            });
            if !release && s.count > 0 {
                self.note_failure();
            }
            return s;
        }
        let owner = self.batch_owner(conn, batch_id);
        let s = self.nack_inner(conn, batch_id, seqs, release, max_retries);
        self.rejected_acks += s.rejected.len() as u64;
        if !release && s.count > 0 {
            self.note_failure();
            if let Some(c) = owner {
                self.note_failed_by(c);
            }
        }
        s
    }

    fn nack_inner(
        &mut self,
        conn: u64,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        release: bool,
        max_retries: u32,
    ) -> Settlement {
        if !self.own_batch(conn, batch_id) {
            let rejected = seqs
                .unwrap_or_default()
                .into_iter()
                .filter(|s| !self.is_settled(*s))
                .collect();
            return settlement(AckOutcome::UnknownBatch, 0, rejected);
        }
        let seqs = match seqs {
            Some(s) => s,
            None => self
                .in_flight
                .get(&batch_id)
                .map(|b| b.msgs.keys().copied().collect())
                .unwrap_or_default(),
        };
        let mut count = 0u32;
        let mut rejected = Vec::new();
        let mut dead = Vec::new();
        for seq in seqs {
            let Some((c, mut p)) = self
                .in_flight
                .get_mut(&batch_id)
                .and_then(|b| b.msgs.remove(&seq).map(|p| (b.consumer, p)))
            else {
                if !self.is_settled(seq) {
                    rejected.push(seq);
                }
                continue;
            };
            self.key_shared_release(c, &p);
            self.seq_batch.remove(&seq);
            count += 1;
            if release {
                p.deliveries = p.deliveries.saturating_sub(1);
            } else {
                p.failures += 1;
            }
            self.return_or_dead_letter(p, max_retries, &mut dead);
        }
        let closed = self.close_empty([batch_id]);
        Settlement::of(count, rejected, closed, dead)
    }

    /// Returns a batch's messages for redelivery (timeout when `counts_as_failure`, or its
    /// consumer left); those past `max_retries` failures come back to dead-letter. None when
    /// the batch is not in flight (a stale timer).
    pub fn fail_batch(
        &mut self,
        batch_id: u64,
        counts_as_failure: bool,
        max_retries: u32,
    ) -> Option<Vec<Pending>> {
        if self.bc.is_some() {
            let dead = self.broadcast_fail_batch(batch_id, counts_as_failure, max_retries);
            if counts_as_failure && dead.is_some() {
                self.note_failure();
            }
            return dead;
        }
        let b = self.in_flight.remove(&batch_id)?;
        if let Some(c) = self.consumers.iter_mut().find(|c| c.id == b.consumer) {
            c.closed(b.bytes);
        }
        let mut dead = Vec::new();
        for (seq, mut p) in b.msgs {
            self.seq_batch.remove(&seq);
            self.key_shared_release(b.consumer, &p);
            if counts_as_failure {
                p.failures += 1;
            }
            self.return_or_dead_letter(p, max_retries, &mut dead);
        }
        if counts_as_failure {
            self.note_failure();
            self.note_failed_by(b.consumer);
        }
        Some(dead)
    }

    /// The one dead-letter rule: a message that has failed more than `max_retries` times
    /// (with 3: on its 4th failed delivery) goes to `dead`; any other waits for redelivery.
    fn return_or_dead_letter(&mut self, p: Pending, max_retries: u32, dead: &mut Vec<Pending>) {
        let seq = p.msg.seq;
        if self.is_settled(seq) {
            // Below a floor the group was moved up to meanwhile: nothing to redeliver.
            return;
        }
        if p.failures > 0 {
            self.note_failed_seq(seq);
        }
        if p.failures > max_retries {
            self.dead_lettering.insert(seq);
            dead.push(p);
        } else {
            self.retry.insert(seq, p);
        }
    }

    /// Whether batch `batch_id` is in flight.
    pub fn has_batch(&self, batch_id: u64) -> bool {
        if let Some(bc) = &self.bc {
            return bc.members.iter().any(|(_, m)| m.has_batch(batch_id));
        }
        self.in_flight.contains_key(&batch_id)
    }

    /// The dead-letter append of `dead` finished: settled if it is durable there, else they
    /// wait for redelivery again.
    pub fn dead_lettered(&mut self, dead: Vec<Pending>, ok: bool) {
        if self.bc.is_some() {
            return self.broadcast_each_member(dead, |m, d| m.dead_lettered(d, ok));
        }
        for p in dead {
            if !self.dead_lettering.remove(&p.msg.seq) {
                // The group was moved (seek) meanwhile: its cursor says what happens next.
                continue;
            }
            if ok {
                if self.settle(p.msg.seq) {
                    self.dead_letters += 1;
                }
            } else {
                self.retry.insert(p.msg.seq, p);
            }
        }
    }

    /// Settles messages that cannot be delivered nor dead-lettered (too big, in a dead-letter
    /// topic already): they are logged by the caller.
    pub fn drop_undeliverable(&mut self, dead: Vec<Pending>) {
        if self.bc.is_some() {
            return self.broadcast_each_member(dead, |m, d| m.drop_undeliverable(d));
        }
        for p in dead {
            self.dead_lettering.remove(&p.msg.seq);
            self.settle(p.msg.seq);
        }
    }

    /// Stats for `admin.stats`.
    pub fn stats(&self, topic: &str, group: &str, head: u64) -> GroupStats {
        let mut s = match &self.bc {
            Some(bc) => bc.stats(self.own_stats(topic, group, head), head),
            None => self.own_stats(topic, group, head),
        };
        self.fill_group_stats(&mut s);
        s
    }

    /// Stats of this state alone (a broadcast member's, or a group that has no members).
    fn own_stats(&self, topic: &str, group: &str, head: u64) -> GroupStats {
        let mut s = GroupStats {
            topic: topic.to_string(),
            group: group.to_string(),
            mode: self.mode,
            head_seq: head,
            acked_floor: self.floor,
            lag: self.lag(head),
            in_flight_batches: self.in_flight.len() as u32,
            in_flight_messages: self.in_flight.values().map(|b| b.msgs.len() as u32).sum(),
            redeliveries: self.redeliveries,
            dead_letters: self.dead_letters,
            consumers: self.consumers.len() as u32,
            ack_ranges: self.above.range_count() as u32,
            rejected_acks: self.rejected_acks,
            filters: self.filters.clone(),
            loaded: true,
            consumer_details: self.consumer_details(head),
            ..Default::default()
        };
        self.fill_details(&mut s.consumer_details);
        s
    }

    /// One entry per consumer: what this state knows of it (in flight, lag, whether it
    /// receives messages now, its key hash ranges).
    pub fn consumer_details(&self, head: u64) -> Vec<ConsumerStats> {
        let lag = self.lag(head);
        self.consumers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let batches = self.in_flight.values().filter(|b| b.consumer == c.id);
                let (mut nb, mut nm) = (0u32, 0u32);
                for b in batches {
                    nb += 1;
                    nm += b.msgs.len() as u32;
                }
                ConsumerStats {
                    consumer: c.id.to_string(),
                    conn_id: c.id.conn,
                    in_flight_batches: nb,
                    in_flight_messages: nm,
                    lag,
                    active: i == 0
                        || !matches!(self.mode, GroupMode::Exclusive | GroupMode::Failover),
                    hash_ranges: self
                        .ks
                        .as_ref()
                        .map(|ks| ks.ranges.of(c.id))
                        .unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect()
    }
}

impl Settlement {
    /// The outcome of an ack or nack that changed `count` messages and refused `rejected`:
    /// settled if anything changed, else already acked if nothing was refused, else unknown.
    fn of(count: u32, rejected: Vec<u64>, closed: Vec<u64>, dead: Vec<Pending>) -> Settlement {
        let outcome = if count > 0 {
            AckOutcome::Settled
        } else if rejected.is_empty() {
            AckOutcome::AlreadyAcked
        } else {
            AckOutcome::UnknownBatch
        };
        Settlement {
            outcome,
            count,
            rejected,
            closed,
            dead,
        }
    }
}

fn settlement(outcome: AckOutcome, count: u32, rejected: Vec<u64>) -> Settlement {
    Settlement {
        outcome,
        count,
        rejected,
        closed: vec![],
        dead: vec![],
    }
}

mod ops;
pub use ops::{Moved, MAX_ATTEMPTS, MAX_WAITING};

#[cfg(test)]
mod tests;

// The mode-specific parts, beside this file (children of this module: they use its fields).
#[path = "broadcast.rs"]
mod broadcast;
#[path = "key_shared.rs"]
pub mod key_shared;
