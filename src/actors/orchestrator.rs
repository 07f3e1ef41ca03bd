//! OrchestratorActor: forms batches, tracks them in flight, redelivers and dead-letters them,
//! and turns acks into durable group cursors. One actor per shard of topics (see
//! `orchestrator.md` beside this file for the batch state machine).

use super::registry::{OrchestratorStarted, RegistryActor};
use super::store::{
    AppendMessages, CommitGroup, LoadGroup, MessagesAppended, ReadRange, StoreActor,
};
use super::{now_ms, ActorCounters, ConsumerId, GetActorStats, InjectFault};
use crate::store::record::StoredMessage;
use crate::store::{GroupRecord, StoreError};
use actix::prelude::*;
use bytes::Bytes;
use sluice_protocol::{
    AckOutcome, AckReply, Batch, DeliveredMessage, ErrorCode, GroupMode, GroupStats, NewMessage,
    StreamEvent, WireError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages kept read ahead per group.
const READ_AHEAD: usize = 1024;

/// Delivery settings (from the config).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Most messages per batch.
    pub batch_size: u32,
    /// Most payload bytes per batch.
    pub batch_max_bytes: usize,
    /// Redelivery timeout.
    pub batch_timeout: Duration,
    /// Redeliveries before dead-lettering.
    pub max_retries: u32,
    /// Default and maximum window.
    pub window: u32,
}

/// A batch handed to a connection: already-encoded `StreamEvent::Batch` data.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeliverBatch {
    /// The subscription it is for.
    pub consumer: ConsumerId,
    /// Batch id.
    pub batch_id: u64,
    /// Messages in it.
    pub count: u32,
    /// MessagePack of `StreamEvent::Batch`.
    pub data: Bytes,
}

/// A subscription joins a group. Sent by the connection; the result says whether it may consume.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct JoinGroup {
    /// Who.
    pub consumer: ConsumerId,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Requested mode.
    pub mode: GroupMode,
    /// Requested filters.
    pub filters: BTreeMap<String, String>,
    /// Unacked batches allowed.
    pub window: u32,
    /// Messages per batch.
    pub batch_size: u32,
    /// RSocket credits (REQUEST_N) available now.
    pub credits: u64,
    /// Where batches go.
    pub recipient: Recipient<DeliverBatch>,
}

/// A subscription ended (cancel, connection closed): its batches go back to pending at once.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct LeaveGroup {
    /// Who.
    pub consumer: ConsumerId,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// More REQUEST_N credits for a subscription.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct GrantCredits {
    /// Who.
    pub consumer: ConsumerId,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// How many.
    pub n: u64,
}

/// Acknowledge a batch (or some of its seqs). Replied once the cursor is durable.
#[derive(Message, Debug)]
#[rtype(result = "Result<AckReply, WireError>")]
pub struct AckBatch {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Batch id.
    pub batch_id: u64,
    /// Seqs (None: the whole batch).
    pub seqs: Option<Vec<u64>>,
}

/// Negatively acknowledge a batch (or some of its seqs): redeliver at once.
#[derive(Message, Debug)]
#[rtype(result = "Result<AckReply, WireError>")]
pub struct NackBatch {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Batch id.
    pub batch_id: u64,
    /// Seqs (None: the whole batch).
    pub seqs: Option<Vec<u64>>,
}

/// A batch's timer fired (tests may send it directly).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct BatchTimedOut {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Batch id.
    pub batch_id: u64,
}

/// Stats of every group this orchestrator has loaded.
#[derive(Message, Debug)]
#[rtype(result = "Vec<GroupStats>")]
pub struct GetGroupStats;

/// A message waiting for (re)delivery, with how many deliveries it has had and how many of them
/// failed by timeout or nack. Only failures count toward `max_retries`: a batch returned because
/// its consumer disconnected is redelivered (its `attempt` rises) without moving the message
/// closer to the dead-letter topic, as in RabbitMQ 4's delivery limit.
#[derive(Debug, Clone)]
struct Pending {
    msg: Arc<StoredMessage>,
    deliveries: u32,
    failures: u32,
}

#[derive(Debug)]
struct InFlight {
    consumer: ConsumerId,
    msgs: BTreeMap<u64, Pending>,
    timer: SpawnHandle,
}

struct ConsumerSlot {
    id: ConsumerId,
    recipient: Recipient<DeliverBatch>,
    credits: u64,
    window: u32,
    batch_size: u32,
    in_flight: u32,
}

impl ConsumerSlot {
    fn ready(&self) -> bool {
        self.credits > 0 && self.in_flight < self.window
    }
}

/// One group's delivery state. See orchestrator.md beside this file.
struct GroupState {
    mode: GroupMode,
    filters: BTreeMap<String, String>,
    created_ms: u64,
    floor: u64,
    acked_above: BTreeSet<u64>,
    /// Next seq to read from the log.
    next_read: u64,
    /// Fresh messages read ahead (never delivered), seq order.
    ready: VecDeque<Pending>,
    /// Messages to deliver again, by seq.
    retry: BTreeMap<u64, Pending>,
    in_flight: HashMap<u64, InFlight>,
    seq_batch: HashMap<u64, u64>,
    dead_lettering: HashSet<u64>,
    reading: bool,
    consumers: Vec<ConsumerSlot>,
    rr: usize,
    redeliveries: u64,
    dead_letters: u64,
    /// The in-memory cursor moved past the last one persisted.
    cursor_dirty: bool,
}

impl GroupState {
    fn from_record(rec: GroupRecord) -> Self {
        let acked_above: BTreeSet<u64> = rec
            .acked_above
            .into_iter()
            .filter(|s| *s > rec.acked_floor)
            .collect();
        GroupState {
            mode: rec.mode,
            filters: rec.filters,
            created_ms: rec.created_ms,
            floor: rec.acked_floor,
            acked_above,
            next_read: rec.acked_floor + 1,
            ready: VecDeque::new(),
            retry: BTreeMap::new(),
            in_flight: HashMap::new(),
            seq_batch: HashMap::new(),
            dead_lettering: HashSet::new(),
            reading: false,
            consumers: Vec::new(),
            rr: 0,
            redeliveries: 0,
            dead_letters: 0,
            cursor_dirty: false,
        }
    }

    fn record(&self) -> GroupRecord {
        GroupRecord {
            mode: self.mode,
            filters: self.filters.clone(),
            acked_floor: self.floor,
            acked_above: self.acked_above.iter().copied().collect(),
            created_ms: self.created_ms,
        }
    }

    fn is_settled(&self, seq: u64) -> bool {
        seq <= self.floor || self.acked_above.contains(&seq)
    }

    /// Marks a seq settled (acked, filtered or dead-lettered). Returns whether it changed.
    fn settle(&mut self, seq: u64) -> bool {
        if self.is_settled(seq) {
            return false;
        }
        self.acked_above.insert(seq);
        while self.acked_above.first() == Some(&(self.floor + 1)) {
            self.acked_above.pop_first();
            self.floor += 1;
        }
        self.cursor_dirty = true;
        true
    }

    fn matches(&self, m: &StoredMessage) -> bool {
        self.filters
            .iter()
            .all(|(k, v)| m.headers.get(k) == Some(v))
    }

    fn lag(&self, head: u64) -> u64 {
        head.saturating_sub(self.floor)
            .saturating_sub(self.acked_above.len() as u64)
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

    /// Takes up to `max` messages (and `max_bytes`): retries first, then fresh messages by
    /// priority (higher first), seq order within a priority.
    fn take_batch(&mut self, max: usize, max_bytes: usize) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max && bytes < max_bytes {
            let Some((_, p)) = self.retry.pop_first() else {
                break;
            };
            bytes += p.msg.payload.len();
            out.push(p);
        }
        if out.len() < max && bytes < max_bytes && !self.ready.is_empty() {
            let top = self.ready.iter().map(|p| p.msg.priority).max().unwrap_or(0);
            let uniform = self.ready.iter().all(|p| p.msg.priority == top);
            if uniform {
                while out.len() < max && bytes < max_bytes {
                    let Some(p) = self.ready.pop_front() else {
                        break;
                    };
                    bytes += p.msg.payload.len();
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
                for i in idx {
                    if out.len() + chosen.len() >= max || bytes >= max_bytes {
                        break;
                    }
                    bytes += self.ready[i].msg.payload.len();
                    chosen.push(i);
                }
                chosen.sort_unstable();
                for i in chosen.into_iter().rev() {
                    if let Some(p) = self.ready.remove(i) {
                        out.push(p);
                    }
                }
                let n_retry = out.len() - out.iter().filter(|p| p.deliveries == 0).count();
                out[n_retry..].sort_by_key(|p| (std::cmp::Reverse(p.msg.priority), p.msg.seq));
            }
        }
        out
    }

    /// Removes `seq` from wherever it waits (ready, retry, another batch in flight).
    fn withdraw(&mut self, seq: u64) -> Option<(Option<u64>, Option<ConsumerId>)> {
        // In flight is the common case (an ack of a delivered batch): check it first.
        if let Some(bid) = self.seq_batch.remove(&seq) {
            if let Some(b) = self.in_flight.get_mut(&bid) {
                b.msgs.remove(&seq);
                return Some((Some(bid), Some(b.consumer)));
            }
        }
        if self.retry.remove(&seq).is_some() {
            return Some((None, None));
        }
        // `ready` is in seq order: search only when the seq can be there.
        let in_range = matches!((self.ready.front(), self.ready.back()), (Some(f), Some(b)) if f.msg.seq <= seq && seq <= b.msg.seq);
        if in_range {
            if let Ok(pos) = self.ready.binary_search_by_key(&seq, |p| p.msg.seq) {
                self.ready.remove(pos);
                return Some((None, None));
            }
            if let Some(pos) = self.ready.iter().position(|p| p.msg.seq == seq) {
                self.ready.remove(pos);
                return Some((None, None));
            }
        }
        None
    }
}

struct TopicState {
    head: u64,
    groups: HashMap<String, GroupState>,
}

/// The orchestrator actor.
pub struct OrchestratorActor {
    name: String,
    shard: usize,
    cfg: DeliveryConfig,
    store: Addr<StoreActor>,
    registry: Option<Addr<RegistryActor>>,
    topics: HashMap<String, TopicState>,
    batch_ids: Arc<AtomicU64>,
    counters: ActorCounters,
}

impl OrchestratorActor {
    /// A new orchestrator for `shard`. `batch_ids` is shared by all shards and survives
    /// restarts, so a batch id is never reused within a broker run.
    pub fn new(
        shard: usize,
        cfg: DeliveryConfig,
        store: Addr<StoreActor>,
        registry: Option<Addr<RegistryActor>>,
        batch_ids: Arc<AtomicU64>,
    ) -> Self {
        OrchestratorActor {
            name: format!("orchestrator-{shard}"),
            shard,
            cfg,
            store,
            registry,
            topics: HashMap::new(),
            batch_ids,
            counters: ActorCounters::default(),
        }
    }

    fn group_mut(&mut self, topic: &str, group: &str) -> Option<(&mut GroupState, u64)> {
        let t = self.topics.get_mut(topic)?;
        let head = t.head;
        t.groups.get_mut(group).map(|g| (g, head))
    }

    /// Delivers as much as consumers can take, and reads ahead when the buffer runs low.
    fn pump(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        let cfg = self.cfg.clone();
        let ids = self.batch_ids.clone();
        let Some((g, head)) = self.group_mut(topic, group) else {
            return;
        };
        // Filtered-out fresh messages settle without delivery.
        if !g.filters.is_empty() {
            let mut kept = VecDeque::with_capacity(g.ready.len());
            while let Some(p) = g.ready.pop_front() {
                if g.matches(&p.msg) {
                    kept.push_back(p);
                } else {
                    g.settle(p.msg.seq);
                }
            }
            g.ready = kept;
        }
        let mut sends = Vec::new();
        while let Some(ci) = g.pick() {
            let max = g.consumers[ci].batch_size.max(1) as usize;
            let msgs = g.take_batch(max, cfg.batch_max_bytes);
            if msgs.is_empty() {
                break;
            }
            let batch_id = ids.fetch_add(1, Ordering::Relaxed);
            let c = &mut g.consumers[ci];
            c.credits -= 1;
            c.in_flight += 1;
            let consumer = c.id;
            let recipient = c.recipient.clone();
            let mut delivered = Vec::with_capacity(msgs.len());
            let mut map = BTreeMap::new();
            for mut p in msgs {
                p.deliveries += 1;
                if p.deliveries > 1 {
                    g.redeliveries += 1;
                }
                delivered.push(DeliveredMessage {
                    seq: p.msg.seq,
                    timestamp_ms: p.msg.timestamp_ms,
                    key: p.msg.key.clone(),
                    headers: p.msg.headers.clone(),
                    priority: p.msg.priority,
                    attempt: p.deliveries,
                    payload: p.msg.payload.clone(),
                });
                g.seq_batch.insert(p.msg.seq, batch_id);
                map.insert(p.msg.seq, p);
            }
            let count = delivered.len() as u32;
            let event = StreamEvent::Batch(Batch {
                batch_id,
                topic: topic.to_string(),
                group: group.to_string(),
                messages: delivered,
            });
            sends.push((batch_id, consumer, recipient, count, event, map));
        }
        let need_read = !g.reading && g.ready.len() < READ_AHEAD / 2 && g.next_read <= head;
        for (batch_id, consumer, recipient, count, event, map) in sends {
            let timer = ctx.notify_later(
                BatchTimedOut {
                    topic: topic.to_string(),
                    group: group.to_string(),
                    batch_id,
                },
                cfg.batch_timeout,
            );
            if let Some((g, _)) = self.group_mut(topic, group) {
                g.in_flight.insert(
                    batch_id,
                    InFlight {
                        consumer,
                        msgs: map,
                        timer,
                    },
                );
            }
            match sluice_protocol::encode(&event) {
                Ok(data) => {
                    tracing::debug!(topic, group, batch_id, count, %consumer, "batch delivered");
                    recipient.do_send(DeliverBatch {
                        consumer,
                        batch_id,
                        count,
                        data,
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot encode batch"),
            }
        }
        if need_read {
            self.read_ahead(topic, group, ctx);
        }
    }

    fn read_ahead(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        let max_bytes = self.cfg.batch_max_bytes * 2;
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        g.reading = true;
        let from = g.next_read;
        let fut = self.store.send(ReadRange {
            topic: topic.to_string(),
            from,
            max: READ_AHEAD / 2,
            max_bytes,
        });
        let (t, gr) = (topic.to_string(), group.to_string());
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let Some((g, _)) = act.group_mut(&t, &gr) else { return };
            g.reading = false;
            if g.next_read != from {
                // The live tail moved us on while we read: our result is stale.
                act.pump(&t, &gr, ctx);
                return;
            }
            match res {
                Ok(Ok(r)) => {
                    let mut last = from.saturating_sub(1);
                    for seq in r.corrupt {
                        last = last.max(seq);
                        tracing::error!(topic = %t, group = %gr, seq, "corrupt message skipped (settled without delivery)");
                        g.settle(seq);
                    }
                    for m in r.messages {
                        last = last.max(m.seq);
                        if !g.is_settled(m.seq) && !g.seq_batch.contains_key(&m.seq) && !g.retry.contains_key(&m.seq) {
                            g.ready.push_back(Pending { msg: Arc::new(m), deliveries: 0, failures: 0 });
                        }
                    }
                    g.next_read = last + 1;
                    act.pump(&t, &gr, ctx);
                }
                Ok(Err(e)) => {
                    tracing::error!(topic = %t, error = %e, "read failed; retrying in 1s");
                    ctx.run_later(Duration::from_secs(1), move |act, ctx| act.pump(&t, &gr, ctx));
                }
                Err(e) => {
                    tracing::warn!(topic = %t, error = %e, "store unavailable; retrying in 100ms");
                    ctx.run_later(Duration::from_millis(100), move |act, ctx| act.pump(&t, &gr, ctx));
                }
            }
        }));
    }

    /// Returns a failed batch's messages to pending (or the dead-letter topic).
    fn fail_batch(
        &mut self,
        topic: &str,
        group: &str,
        batch_id: u64,
        why: &str,
        counts_as_failure: bool,
        ctx: &mut Context<Self>,
    ) {
        let max_retries = self.cfg.max_retries;
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        let Some(b) = g.in_flight.remove(&batch_id) else {
            return;
        };
        ctx.cancel_future(b.timer);
        if let Some(c) = g.consumers.iter_mut().find(|c| c.id == b.consumer) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        let mut dead = Vec::new();
        for (seq, mut p) in b.msgs {
            g.seq_batch.remove(&seq);
            if counts_as_failure {
                p.failures += 1;
            }
            if p.failures > max_retries {
                g.dead_lettering.insert(seq);
                dead.push(p);
            } else {
                g.retry.insert(seq, p);
            }
        }
        tracing::debug!(
            topic,
            group,
            batch_id,
            why,
            dead = dead.len(),
            "batch returned to pending"
        );
        if !dead.is_empty() {
            self.dead_letter(topic, group, dead, why, ctx);
        }
    }

    fn dead_letter(
        &mut self,
        topic: &str,
        group: &str,
        dead: Vec<Pending>,
        why: &str,
        ctx: &mut Context<Self>,
    ) {
        let dlq = format!("{topic}.{group}.dlq");
        let messages = dead
            .iter()
            .map(|p| {
                let mut headers = p.msg.headers.clone();
                headers.insert("x-dlq-topic".into(), topic.to_string());
                headers.insert("x-dlq-group".into(), group.to_string());
                headers.insert("x-dlq-seq".into(), p.msg.seq.to_string());
                headers.insert("x-dlq-attempts".into(), p.deliveries.to_string());
                headers.insert("x-dlq-reason".into(), why.to_string());
                NewMessage {
                    key: p.msg.key.clone(),
                    headers,
                    priority: p.msg.priority,
                    payload: p.msg.payload.clone(),
                }
            })
            .collect();
        tracing::warn!(topic, group, count = dead.len(), %dlq, "dead-lettering messages after max retries");
        let (t, gr) = (topic.to_string(), group.to_string());
        ctx.spawn(self.store.send(AppendMessages { topic: dlq, messages }).into_actor(self).map(move |res, act, ctx| {
            let ok = matches!(res, Ok(Ok(_)));
            if let Some((g, _)) = act.group_mut(&t, &gr) {
                for p in dead {
                    g.dead_lettering.remove(&p.msg.seq);
                    if ok {
                        g.settle(p.msg.seq);
                        g.dead_letters += 1;
                    } else {
                        g.retry.insert(p.msg.seq, p);
                    }
                }
            }
            if !ok {
                tracing::error!(topic = %t, "dead-letter append failed; messages stay pending");
            }
            act.persist(&t, &gr, ctx);
            act.pump(&t, &gr, ctx);
        }));
    }

    /// Persists the group's cursor if it moved (no reply awaited).
    fn persist(&mut self, topic: &str, group: &str, _ctx: &mut Context<Self>) {
        if let Some((g, _)) = self.group_mut(topic, group) {
            if g.cursor_dirty {
                g.cursor_dirty = false;
                let record = g.record();
                self.store.do_send(CommitGroup {
                    topic: topic.into(),
                    group: group.into(),
                    record,
                });
            }
        }
    }

    fn settle_seqs(
        &mut self,
        topic: &str,
        group: &str,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        ack: bool,
        ctx: &mut Context<Self>,
    ) -> Result<(AckOutcome, u32), WireError> {
        let Some((g, head)) = self.group_mut(topic, group) else {
            return Err(WireError::new(
                ErrorCode::UnknownGroup,
                format!("group '{group}' of topic '{topic}' has no consumer here"),
            ));
        };
        let seqs: Vec<u64> = match seqs {
            Some(s) => s,
            None => match g.in_flight.get(&batch_id) {
                Some(b) => b.msgs.keys().copied().collect(),
                None => return Ok((AckOutcome::UnknownBatch, 0)),
            },
        };
        let mut changed = 0u32;
        let mut touched_batches = HashSet::new();
        if ack {
            for seq in seqs {
                if seq == 0 || seq > head || g.is_settled(seq) || g.dead_lettering.contains(&seq) {
                    continue;
                }
                if let Some((bid, _)) = g.withdraw(seq) {
                    if let Some(bid) = bid {
                        touched_batches.insert(bid);
                    }
                } else if seq >= g.next_read {
                    // Never read yet: settling is still right; the reader skips settled seqs.
                }
                if g.settle(seq) {
                    changed += 1;
                }
            }
        } else {
            for seq in seqs {
                let Some(bid) = g.seq_batch.get(&seq).copied() else {
                    continue;
                };
                if let Some(b) = g.in_flight.get_mut(&bid) {
                    if let Some(mut p) = b.msgs.remove(&seq) {
                        p.failures += 1;
                        g.seq_batch.remove(&seq);
                        touched_batches.insert(bid);
                        g.retry.insert(seq, p);
                        changed += 1;
                    }
                }
            }
        }
        // Batches left empty are settled; nacked ones with leftovers stay until acked or timed out.
        let mut emptied = Vec::new();
        for bid in touched_batches {
            if g.in_flight.get(&bid).is_some_and(|b| b.msgs.is_empty()) {
                emptied.push(bid);
            }
        }
        for bid in emptied {
            if let Some(b) = g.in_flight.remove(&bid) {
                ctx.cancel_future(b.timer);
                if let Some(c) = g.consumers.iter_mut().find(|c| c.id == b.consumer) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
            }
        }
        // Nacked retries over the limit go to the dead-letter topic.
        if !ack {
            let max = self.cfg.max_retries;
            if let Some((g, _)) = self.group_mut(topic, group) {
                let over: Vec<u64> = g
                    .retry
                    .iter()
                    .filter(|(_, p)| p.failures > max)
                    .map(|(s, _)| *s)
                    .collect();
                let dead: Vec<Pending> = over.iter().filter_map(|s| g.retry.remove(s)).collect();
                for p in &dead {
                    g.dead_lettering.insert(p.msg.seq);
                }
                if !dead.is_empty() {
                    self.dead_letter(topic, group, dead, "nack", ctx);
                }
            }
        }
        let outcome = if changed > 0 {
            AckOutcome::Settled
        } else {
            AckOutcome::AlreadyAcked
        };
        Ok((outcome, changed))
    }

    fn group_stats(&self) -> Vec<GroupStats> {
        let mut out = Vec::new();
        for (topic, t) in &self.topics {
            for (name, g) in &t.groups {
                out.push(GroupStats {
                    topic: topic.clone(),
                    group: name.clone(),
                    mode: g.mode,
                    head_seq: t.head,
                    acked_floor: g.floor,
                    lag: g.lag(t.head),
                    in_flight_batches: g.in_flight.len() as u32,
                    in_flight_messages: g.in_flight.values().map(|b| b.msgs.len() as u32).sum(),
                    redeliveries: g.redeliveries,
                    dead_letters: g.dead_letters,
                    consumers: g.consumers.len() as u32,
                });
            }
        }
        out
    }
}

impl Actor for OrchestratorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.counters.started_at = std::time::Instant::now();
        tracing::info!(name = %self.name, restarts = self.counters.restarts, "orchestrator started");
        // After a restart the registry asks every subscription of this shard to join again.
        if let Some(r) = &self.registry {
            r.do_send(OrchestratorStarted { shard: self.shard });
        }
    }
}

impl Supervised for OrchestratorActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.counters.restarts += 1;
        // Everything in flight is forgotten: the state is rebuilt from the store's cursors, so
        // every unacked message (including what was in flight) is delivered again.
        self.topics.clear();
        tracing::warn!(name = %self.name, restarts = self.counters.restarts, "orchestrator restarting; in-flight batches will be redelivered");
    }
}

/// Sets the registry address (it is created after the orchestrators).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRegistry(pub Addr<RegistryActor>);

impl Handler<SetRegistry> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: SetRegistry, _: &mut Context<Self>) {
        self.registry = Some(msg.0);
    }
}

impl Handler<JoinGroup> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, msg: JoinGroup, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        if !matches!(
            msg.mode,
            GroupMode::Shared | GroupMode::Exclusive | GroupMode::Failover
        ) {
            let m = msg.mode;
            return Box::pin(fut::ready(Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("mode '{m}' is not available yet (use shared, exclusive or failover)"),
            ))));
        }
        let loaded = self
            .topics
            .get(&msg.topic)
            .is_some_and(|t| t.groups.contains_key(&msg.group));
        let load = if loaded {
            None
        } else {
            Some(self.store.send(LoadGroup {
                topic: msg.topic.clone(),
                group: msg.group.clone(),
            }))
        };
        Box::pin(
            async move {
                match load {
                    None => Ok(None),
                    Some(f) => match f.await {
                        Ok(Ok(r)) => Ok(Some(r)),
                        Ok(Err(e)) => Err(WireError::new(ErrorCode::StorageError, e.to_string())),
                        Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
                    },
                }
            }
            .into_actor(self)
            .then(move |loaded, act, _ctx| {
                let mut create = None;
                let res = (|| {
                    let loaded = loaded?;
                    if let Some((rec, head)) = loaded {
                        let exists = act.group_mut(&msg.topic, &msg.group).is_some();
                        let rec = match rec {
                            Some(r) => r,
                            None => {
                                let r = GroupRecord {
                                    mode: msg.mode,
                                    filters: msg.filters.clone(),
                                    acked_floor: 0,
                                    acked_above: Vec::new(),
                                    created_ms: now_ms(),
                                };
                                // A concurrent join may have created it meanwhile: persist a
                                // new record only for a group not in memory yet.
                                if !exists {
                                    create = Some(r.clone());
                                }
                                r
                            }
                        };
                        act.install_group(&msg.topic, &msg.group, rec, head);
                    }
                    let t = act
                        .topics
                        .get_mut(&msg.topic)
                        .ok_or_else(|| WireError::new(ErrorCode::Internal, "topic vanished"))?;
                    let g = t.groups.get_mut(&msg.group).ok_or_else(|| WireError::new(ErrorCode::Internal, "group vanished"))?;
                    if g.mode != msg.mode {
                        return Err(WireError::new(
                            ErrorCode::ModeConflict,
                            format!("group '{}' exists with mode '{}', not '{}'", msg.group, g.mode, msg.mode),
                        ));
                    }
                    if g.filters != msg.filters {
                        return Err(WireError::new(
                            ErrorCode::FilterConflict,
                            format!("group '{}' exists with filters {:?}, not {:?}", msg.group, g.filters, msg.filters),
                        ));
                    }
                    if g.mode == GroupMode::Exclusive && g.consumers.iter().any(|c| c.id != msg.consumer) {
                        return Err(WireError::new(
                            ErrorCode::ExclusiveTaken,
                            format!("exclusive group '{}' already has a consumer", msg.group),
                        ));
                    }
                    g.consumers.retain(|c| c.id != msg.consumer);
                    g.consumers.push(ConsumerSlot {
                        id: msg.consumer,
                        recipient: msg.recipient,
                        credits: msg.credits,
                        window: msg.window.max(1),
                        batch_size: msg.batch_size.max(1),
                        in_flight: 0,
                    });
                    tracing::info!(topic = %msg.topic, group = %msg.group, consumer = %msg.consumer, mode = %g.mode, "consumer joined");
                    Ok(())
                })();
                let (t, gr) = (msg.topic.clone(), msg.group.clone());
                let persist = create.map(|record| act.store.send(CommitGroup { topic: t.clone(), group: gr.clone(), record }));
                async move {
                    res?;
                    if let Some(p) = persist {
                        match p.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(WireError::new(ErrorCode::StorageError, e.to_string())),
                            Err(e) => return Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
                        }
                    }
                    Ok(())
                }
                .into_actor(act)
                .map(move |res, act, ctx| {
                    if res.is_ok() {
                        act.pump(&t, &gr, ctx);
                    }
                    res
                })
            }),
        )
    }
}

impl Handler<LeaveGroup> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: LeaveGroup, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let Some((g, _)) = self.group_mut(&msg.topic, &msg.group) else {
            return;
        };
        g.consumers.retain(|c| c.id != msg.consumer);
        let batches: Vec<u64> = g
            .in_flight
            .iter()
            .filter(|(_, b)| b.consumer == msg.consumer)
            .map(|(id, _)| *id)
            .collect();
        let promoted = matches!(g.mode, GroupMode::Failover)
            .then(|| g.consumers.first().map(|c| c.id))
            .flatten();
        tracing::info!(topic = %msg.topic, group = %msg.group, consumer = %msg.consumer, returned = batches.len(), "consumer left");
        if let Some(p) = promoted {
            tracing::info!(topic = %msg.topic, group = %msg.group, consumer = %p, "failover: standby promoted");
        }
        for b in batches {
            self.fail_batch(
                &msg.topic,
                &msg.group,
                b,
                "consumer disconnected",
                false,
                ctx,
            );
        }
        self.pump(&msg.topic, &msg.group, ctx);
    }
}

impl Handler<GrantCredits> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: GrantCredits, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let Some((g, _)) = self.group_mut(&msg.topic, &msg.group) else {
            return;
        };
        if let Some(c) = g.consumers.iter_mut().find(|c| c.id == msg.consumer) {
            c.credits = c.credits.saturating_add(msg.n);
        }
        self.pump(&msg.topic, &msg.group, ctx);
    }
}

impl OrchestratorActor {
    fn settle_and_persist(
        &mut self,
        topic: String,
        group: String,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        ack: bool,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<AckReply, WireError>> {
        self.counters.handled += 1;
        if self.group_mut(&topic, &group).is_some() {
            return self.settle_loaded(topic, group, batch_id, seqs, ack, ctx);
        }
        // Not loaded (e.g. an ack racing the rejoin after a restart): load the group first, so
        // acks by seq are honoured whenever the group exists.
        let load = self.store.send(LoadGroup {
            topic: topic.clone(),
            group: group.clone(),
        });
        Box::pin(load.into_actor(self).then(move |res, act, ctx| {
            match res {
                Ok(Ok((Some(rec), head))) => act.install_group(&topic, &group, rec, head),
                Ok(Ok((None, _))) => {
                    let e = WireError::new(
                        ErrorCode::UnknownGroup,
                        format!("group '{group}' of topic '{topic}' does not exist"),
                    );
                    return Box::pin(fut::ready(Err(e))) as ResponseActFuture<Self, _>;
                }
                Ok(Err(e)) => return Box::pin(fut::ready(Err(WireError::from(e)))),
                Err(e) => {
                    let e = WireError::new(ErrorCode::Unavailable, e.to_string());
                    return Box::pin(fut::ready(Err(e)));
                }
            }
            act.settle_loaded(topic, group, batch_id, seqs, ack, ctx)
        }))
    }

    /// Creates the in-memory state of a group from its record (if not there yet).
    fn install_group(&mut self, topic: &str, group: &str, rec: GroupRecord, head: u64) {
        let t = self.topics.entry(topic.to_string()).or_insert(TopicState {
            head: 0,
            groups: HashMap::new(),
        });
        t.head = t.head.max(head);
        t.groups
            .entry(group.to_string())
            .or_insert_with(|| GroupState::from_record(rec));
    }

    fn settle_loaded(
        &mut self,
        topic: String,
        group: String,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        ack: bool,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<AckReply, WireError>> {
        let res = self.settle_seqs(&topic, &group, batch_id, seqs, ack, ctx);
        let store = self.store.clone();
        let commit = match (&res, self.group_mut(&topic, &group)) {
            (Ok(_), Some((g, _))) if g.cursor_dirty => {
                g.cursor_dirty = false;
                Some(store.send(CommitGroup {
                    topic: topic.clone(),
                    group: group.clone(),
                    record: g.record(),
                }))
            }
            _ => None,
        };
        self.pump(&topic, &group, ctx);
        Box::pin(
            async move {
                let (outcome, count) = res?;
                if let Some(c) = commit {
                    let r: Result<(), StoreError> = c.await.map_err(|_| StoreError::Unavailable)?;
                    r.map_err(|e| WireError::new(ErrorCode::StorageError, e.to_string()))?;
                }
                Ok(AckReply { outcome, count })
            }
            .into_actor(self),
        )
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable => WireError::new(ErrorCode::Unavailable, "store unavailable"),
            other => WireError::new(ErrorCode::StorageError, other.to_string()),
        }
    }
}

impl Handler<AckBatch> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<AckReply, WireError>>;
    fn handle(&mut self, msg: AckBatch, ctx: &mut Context<Self>) -> Self::Result {
        self.settle_and_persist(msg.topic, msg.group, msg.batch_id, msg.seqs, true, ctx)
    }
}

impl Handler<NackBatch> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<AckReply, WireError>>;
    fn handle(&mut self, msg: NackBatch, ctx: &mut Context<Self>) -> Self::Result {
        self.settle_and_persist(msg.topic, msg.group, msg.batch_id, msg.seqs, false, ctx)
    }
}

impl Handler<BatchTimedOut> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: BatchTimedOut, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let known = self
            .group_mut(&msg.topic, &msg.group)
            .is_some_and(|(g, _)| g.in_flight.contains_key(&msg.batch_id));
        if known {
            tracing::info!(topic = %msg.topic, group = %msg.group, batch_id = msg.batch_id, "batch timed out; redelivering");
            self.fail_batch(
                &msg.topic,
                &msg.group,
                msg.batch_id,
                "batch timeout",
                true,
                ctx,
            );
            self.pump(&msg.topic, &msg.group, ctx);
        }
    }
}

impl Handler<MessagesAppended> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: MessagesAppended, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let Some(last) = msg.messages.last().map(|m| m.seq) else {
            return;
        };
        let Some(first) = msg.messages.first().map(|m| m.seq) else {
            return;
        };
        // Track the head even before any group is loaded: a group loading right now takes the
        // larger of this and the head the store reported.
        let t = self.topics.entry(msg.topic.clone()).or_insert(TopicState {
            head: 0,
            groups: HashMap::new(),
        });
        t.head = t.head.max(last);
        let mut to_pump = Vec::new();
        for (name, g) in t.groups.iter_mut() {
            // The live tail: a group that has read everything before these takes them directly.
            if !g.reading && g.next_read == first && g.ready.len() < READ_AHEAD {
                for m in msg.messages.iter() {
                    if !g.is_settled(m.seq) {
                        g.ready.push_back(Pending {
                            msg: m.clone(),
                            deliveries: 0,
                            failures: 0,
                        });
                    }
                }
                g.next_read = last + 1;
            }
            to_pump.push(name.clone());
        }
        for g in to_pump {
            self.pump(&msg.topic, &g, ctx);
        }
    }
}

impl Handler<GetGroupStats> for OrchestratorActor {
    type Result = MessageResult<GetGroupStats>;
    fn handle(&mut self, _: GetGroupStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.group_stats())
    }
}

impl Handler<GetActorStats> for OrchestratorActor {
    type Result = MessageResult<GetActorStats>;
    fn handle(&mut self, _: GetActorStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.counters.stats("orchestrator", &self.name, None))
    }
}

impl Handler<InjectFault> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, _: InjectFault, ctx: &mut Context<Self>) {
        tracing::warn!(name = %self.name, "fault injected: stopping");
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> GroupState {
        GroupState::from_record(GroupRecord {
            mode: GroupMode::Shared,
            filters: BTreeMap::new(),
            acked_floor: 0,
            acked_above: vec![],
            created_ms: 0,
        })
    }

    fn pending(seq: u64, priority: u8) -> Pending {
        Pending {
            msg: Arc::new(StoredMessage {
                seq,
                timestamp_ms: 0,
                key: None,
                headers: BTreeMap::new(),
                priority,
                payload: Bytes::from_static(b"x"),
            }),
            deliveries: 0,
            failures: 0,
        }
    }

    #[test]
    fn settle_advances_the_floor_over_contiguous_acks() {
        let mut g = state();
        assert!(g.settle(2));
        assert!(g.settle(3));
        assert_eq!((g.floor, g.acked_above.len()), (0, 2));
        assert!(g.settle(1));
        assert_eq!((g.floor, g.acked_above.len()), (3, 0));
        assert!(!g.settle(2), "already settled");
        assert_eq!(g.lag(10), 7);
        let rec = g.record();
        assert_eq!(GroupState::from_record(rec).next_read, 4);
    }

    #[test]
    fn batches_take_retries_first_then_priority_then_seq() {
        let mut g = state();
        for (seq, prio) in [(3, 0), (4, 5), (5, 0), (6, 5)] {
            g.ready.push_back(pending(seq, prio));
        }
        let mut r = pending(1, 0);
        r.deliveries = 1;
        g.retry.insert(1, r);
        let seqs: Vec<u64> = g
            .take_batch(3, usize::MAX)
            .iter()
            .map(|p| p.msg.seq)
            .collect();
        assert_eq!(seqs, vec![1, 4, 6]);
        let seqs: Vec<u64> = g
            .take_batch(10, usize::MAX)
            .iter()
            .map(|p| p.msg.seq)
            .collect();
        assert_eq!(seqs, vec![3, 5]);
    }

    #[test]
    fn batch_bytes_are_bounded_but_never_empty() {
        let mut g = state();
        for seq in 1..=4 {
            g.ready.push_back(pending(seq, 0));
        }
        assert_eq!(g.take_batch(16, 1).len(), 1);
        assert_eq!(g.take_batch(16, 2).len(), 2);
    }

    #[test]
    fn withdraw_finds_seqs_wherever_they_wait() {
        let mut g = state();
        g.ready.push_back(pending(5, 0));
        g.retry.insert(3, pending(3, 0));
        g.seq_batch.insert(7, 99);
        assert_eq!(g.withdraw(5), Some((None, None)));
        assert_eq!(g.withdraw(3), Some((None, None)));
        assert_eq!(g.withdraw(8), None);
        assert!(g.ready.is_empty() && g.retry.is_empty());
    }
}
