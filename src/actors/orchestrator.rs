//! OrchestratorActor: forms batches, tracks them in flight, redelivers and dead-letters them,
//! and turns acks into durable group cursors. One actor per shard of topics (see
//! `orchestrator.md` beside this file for the batch state machine).

mod group_ops;

use super::messages::{
    AckBatch, AppendMessages, CommitGroup, DeliverBatch, GetGroupStats, GrantCredits, JoinGroup,
    LeaveGroup, LoadGroup, MessagesAppended, NackBatch, OrchestratorLinks, OrchestratorStarted,
    ReadRange, StoreLinks, TopicListener,
};
use super::{ActorCounters, ConsumerId, GetActorStats, InjectFault};
use crate::delivery::group::{Limits, Outgoing, Pending, READ_AHEAD_BYTES};
use crate::delivery::{GroupState, Joining};
use crate::store::{GroupRecord, StoreError};
use actix::prelude::*;
use sluice_protocol::{
    AckOutcome, AckReply, BrokerEvent, ErrorCode, GroupMode, GroupStats, NewMessage, WireError,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Delivery settings (from the config).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Most messages per batch.
    pub batch_size: u32,
    /// Most bytes per batch, counting every byte of each message.
    pub batch_max_bytes: usize,
    /// Redelivery timeout.
    pub batch_timeout: Duration,
    /// Redeliveries before dead-lettering.
    pub max_retries: u32,
    /// Default window.
    pub window: u32,
    /// Wire bytes of batches in flight to one consumer, at most (half of what its connection
    /// may queue unwritten, `max_queued_bytes`).
    pub max_in_flight_bytes: usize,
    /// Redelivery schedule of groups with none of their own nor their topic's (ms per step;
    /// empty: `batch_timeout`).
    pub backoff_ms: Vec<u64>,
    /// A consumer with lag and no ack for this long is flagged stale.
    pub stale_after: Duration,
    /// A consumer stale for this long is disconnected (None: never automatically).
    pub stale_disconnect_after: Option<Duration>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig::from(&crate::config::Config::default())
    }
}

impl From<&crate::config::Config> for DeliveryConfig {
    fn from(c: &crate::config::Config) -> Self {
        DeliveryConfig {
            batch_size: c.batch_size,
            batch_max_bytes: c.batch_max_bytes,
            batch_timeout: c.batch_timeout,
            max_retries: c.max_retries,
            window: c.window,
            max_in_flight_bytes: c.max_queued_bytes / 2,
            backoff_ms: c
                .backoff
                .iter()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .collect(),
            stale_after: c.stale_after,
            stale_disconnect_after: c.stale_disconnect_after,
        }
    }
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

struct TopicState {
    head: u64,
    groups: HashMap<String, GroupState>,
}

/// Ack or nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nack {
        release: bool,
        delay: Option<Duration>,
    },
}

/// The orchestrator actor: moves messages between the groups' [`GroupState`]s, the store and
/// the connections; the delivery rules themselves live in `crate::delivery`.
pub struct OrchestratorActor {
    name: String,
    shard: usize,
    cfg: DeliveryConfig,
    store: StoreLinks,
    registry: Option<Recipient<OrchestratorStarted>>,
    topics: HashMap<String, TopicState>,
    /// Where each subscription's batches go.
    recipients: HashMap<ConsumerId, Recipient<DeliverBatch>>,
    /// Subscriptions whose `JoinGroup` is waiting for their group to load: a `LeaveGroup`
    /// handled meanwhile removes them here, and the join then does not add them.
    joining: HashSet<ConsumerId>,
    /// Redelivery timer of each batch in flight (batch ids are unique across groups).
    timers: crate::delivery::SeqMap<SpawnHandle>,
    batch_ids: Arc<AtomicU64>,
    counters: ActorCounters,
    /// Lifecycle events.
    events: crate::events::EventBus,
    /// Kicks, notices, retry timers (`group_ops.rs`).
    ops: group_ops::OrchOps,
    /// `TopicRemoved` notices handled: a group record loaded across one is not installed.
    topic_removals: u64,
}

impl OrchestratorActor {
    /// A new orchestrator for `shard`. `batch_ids` is shared by all shards and survives
    /// restarts; it starts above every id of earlier runs (see `Storage::batch_id_base`), so a
    /// batch id is never reused.
    pub fn new(
        shard: usize,
        cfg: DeliveryConfig,
        store: StoreLinks,
        registry: Option<Recipient<OrchestratorStarted>>,
        batch_ids: Arc<AtomicU64>,
    ) -> Self {
        OrchestratorActor {
            name: format!("orchestrator-{shard}"),
            shard,
            cfg,
            store,
            registry,
            topics: HashMap::new(),
            recipients: HashMap::new(),
            joining: HashSet::new(),
            timers: Default::default(),
            batch_ids,
            counters: ActorCounters::default(),
            events: crate::events::EventBus::default(),
            ops: Default::default(),
            topic_removals: 0,
        }
    }

    /// With the broker's event bus.
    pub fn with_events(mut self, events: crate::events::EventBus) -> Self {
        self.events = events;
        self
    }

    fn limits(&self) -> Limits {
        Limits {
            batch_max_bytes: self.cfg.batch_max_bytes,
            max_retries: self.cfg.max_retries,
        }
    }

    fn group_mut(&mut self, topic: &str, group: &str) -> Option<(&mut GroupState, u64)> {
        let t = self.topics.get_mut(topic)?;
        let head = t.head;
        t.groups.get_mut(group).map(|g| (g, head))
    }

    fn cancel_timer(&mut self, batch_id: u64, ctx: &mut Context<Self>) {
        if let Some(h) = self.timers.remove(&batch_id) {
            ctx.cancel_future(h);
        }
    }

    /// Delivers as much as consumers can take, and reads ahead when the buffer runs low.
    fn pump(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        self.send_notices(topic, group);
        let limits = self.limits();
        let ids = self.batch_ids.clone();
        let batch_timeout = self.cfg.batch_timeout;
        let Some((g, head)) = self.group_mut(topic, group) else {
            return;
        };
        let formed = g.form_batches(topic, group, limits, || ids.fetch_add(1, Ordering::Relaxed));
        // Who has work now (a consumer's idle time counts from the start of its work).
        g.note_busy(std::time::Instant::now(), head);
        let need_read = g.wants_read(head);
        // By the group's schedule, else the broker's batch timeout.
        let timeouts: Vec<Duration> = formed
            .batches
            .iter()
            .map(|o| g.redelivery_timeout(o.min_attempt).unwrap_or(batch_timeout))
            .collect();
        let pressure = g.take_pressure_event();
        for (out, timeout) in formed.batches.into_iter().zip(timeouts) {
            let Outgoing {
                consumer,
                batch_id,
                count,
                data,
                ..
            } = out;
            let timer = ctx.notify_later(
                BatchTimedOut {
                    topic: topic.to_string(),
                    group: group.to_string(),
                    batch_id,
                },
                timeout,
            );
            self.timers.insert(batch_id, timer);
            let Some(recipient) = self.recipients.get(&consumer) else {
                // Cannot happen (a slot and its recipient come and go together); the timer
                // redelivers the batch.
                tracing::error!(topic, group, batch_id, %consumer, "no recipient for a batch");
                continue;
            };
            // Encoded by the group as it formed the batch.
            tracing::debug!(topic, group, batch_id, count, %consumer, "batch delivered");
            recipient.do_send(DeliverBatch {
                consumer,
                batch_id,
                count,
                data,
            });
        }
        if !formed.undeliverable.is_empty() {
            self.dead_letter(
                topic,
                group,
                formed.undeliverable,
                "too large to deliver in one frame",
                ctx,
            );
        }
        if let Some(what) = pressure {
            self.memory_pressure(topic, group, what);
        }
        if need_read {
            self.read_ahead(topic, group, ctx);
        }
    }

    fn read_ahead(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        let from = g.start_read();
        let max = g.read_span();
        let fut = self.store.read.send(ReadRange {
            topic: topic.to_string(),
            from,
            max,
            max_bytes: READ_AHEAD_BYTES / 2,
        });
        let (t, gr) = (topic.to_string(), group.to_string());
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let Some((g, _)) = act.group_mut(&t, &gr) else {
                return;
            };
            match res {
                Ok(Ok(r)) => {
                    let floor = r.floor;
                    g.finish_read(from, Some((r.messages, r.corrupt)));
                    if floor > 0 {
                        // Retention removed what lay below: the group moves up to it.
                        act.move_group_to_floor(&t, &gr, floor);
                    }
                    act.pump(&t, &gr, ctx);
                }
                Ok(Err(e)) => {
                    g.finish_read(from, None);
                    tracing::error!(topic = %t, error = %e, "read failed; retrying in 1s");
                    ctx.run_later(Duration::from_secs(1), move |act, ctx| {
                        act.pump(&t, &gr, ctx)
                    });
                }
                Err(e) => {
                    g.finish_read(from, None);
                    tracing::warn!(topic = %t, error = %e, "store unavailable; retrying in 100ms");
                    ctx.run_later(Duration::from_millis(100), move |act, ctx| {
                        act.pump(&t, &gr, ctx)
                    });
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
        self.cancel_timer(batch_id, ctx);
        let max_retries = self.cfg.max_retries;
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        let Some(dead) = g.fail_batch(batch_id, counts_as_failure, max_retries) else {
            return;
        };
        if counts_as_failure {
            // The attempt counts survive a restart.
            self.persist(topic, group);
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

    /// Appends `dead` to the group's dead-letter topic; once durable there they are settled.
    /// A message too big to deliver that is itself a dead letter is settled with an error
    /// log instead (a dead-letter topic of a dead-letter topic would loop).
    fn dead_letter(
        &mut self,
        topic: &str,
        group: &str,
        dead: Vec<Pending>,
        why: &str,
        ctx: &mut Context<Self>,
    ) {
        let (dead, dropped): (Vec<Pending>, Vec<Pending>) = dead.into_iter().partition(|p| {
            !(why.starts_with("too large") && p.msg.headers.contains_key("x-dlq-reason"))
        });
        if !dropped.is_empty() {
            let seqs: Vec<u64> = dropped.iter().map(|p| p.msg.seq).collect();
            tracing::error!(
                topic,
                group,
                ?seqs,
                "dead letters too large to deliver: settled without delivery"
            );
            if let Some((g, _)) = self.group_mut(topic, group) {
                g.drop_undeliverable(dropped);
            }
            self.persist(topic, group);
        }
        if dead.is_empty() {
            return;
        }
        let dlq = sluice_protocol::dlq_topic(topic, group);
        let messages = dead
            .iter()
            .map(|p| {
                let mut headers = p.msg.headers.clone();
                headers.insert("x-dlq-topic".into(), topic.to_string());
                headers.insert("x-dlq-group".into(), group.to_string());
                headers.insert("x-dlq-seq".into(), p.msg.seq.to_string());
                headers.insert("x-dlq-attempts".into(), p.deliveries.to_string());
                headers.insert("x-dlq-reason".into(), why.to_string());
                if let Some(member) = p.member {
                    // A broadcast member's copy: whose it was.
                    headers.insert("x-dlq-consumer".into(), member.to_string());
                }
                NewMessage {
                    id: None,
                    key: p.msg.key.clone(),
                    headers,
                    priority: p.msg.priority,
                    payload: p.msg.payload.clone(),
                }
            })
            .collect();
        tracing::warn!(topic, group, count = dead.len(), %dlq, why, "dead-lettering messages");
        let (t, gr) = (topic.to_string(), group.to_string());
        let why = why.to_string();
        ctx.spawn(
            self.store
                .append
                .send(AppendMessages {
                    topic: dlq,
                    messages,
                    dead_letter: true,
                })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let ok = matches!(res, Ok(Ok(_)));
                    if !ok {
                        tracing::error!(topic = %t, "dead-letter append failed; messages stay pending");
                    }
                    if ok {
                        let first = dead.iter().map(|p| p.msg.seq).min().unwrap_or(0);
                        act.emit(
                            BrokerEvent::now(sluice_protocol::event_kind::MESSAGE_DEAD_LETTERED)
                                .topic(&t)
                                .group(&gr)
                                .count(dead.len() as u64)
                                .seq(first)
                                .detail(why),
                        );
                    }
                    if let Some((g, _)) = act.group_mut(&t, &gr) {
                        g.dead_lettered(dead, ok);
                    }
                    act.persist(&t, &gr);
                    act.pump(&t, &gr, ctx);
                }),
        );
    }

    /// Persists the group's cursor if it moved (no reply awaited).
    fn persist(&mut self, topic: &str, group: &str) {
        if let Some(record) = self
            .group_mut(topic, group)
            .and_then(|(g, _)| g.take_dirty_record())
        {
            self.store.commit.do_send(CommitGroup {
                topic: topic.into(),
                group: group.into(),
                record,
            });
        }
    }

    fn group_stats(&self) -> Vec<GroupStats> {
        let mut out = Vec::new();
        for (topic, t) in &self.topics {
            for (name, g) in &t.groups {
                out.push(g.stats(topic, name, t.head));
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
        self.start_stale_timer(ctx);
    }
}

impl Supervised for OrchestratorActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.counters.restarts += 1;
        // Everything in flight is forgotten: the state is rebuilt from the store's cursors, so
        // every unacked message (including what was in flight) is delivered again.
        self.topics.clear();
        self.recipients.clear();
        self.joining.clear();
        self.timers.clear();
        self.reset_ops();
        self.emit(
            BrokerEvent::now(sluice_protocol::event_kind::ACTOR_RESTARTED)
                .actor(&self.name)
                .count(u64::from(self.counters.restarts)),
        );
        tracing::warn!(name = %self.name, restarts = self.counters.restarts, "orchestrator restarting; in-flight batches will be redelivered");
    }
}

impl OrchestratorLinks {
    /// The recipients of an orchestrator actor.
    pub fn of(addr: &Addr<OrchestratorActor>) -> OrchestratorLinks {
        OrchestratorLinks {
            join: addr.clone().recipient(),
            leave: addr.clone().recipient(),
            credits: addr.clone().recipient(),
            ack: addr.clone().recipient(),
            nack: addr.clone().recipient(),
            group_stats: addr.clone().recipient(),
            actor_stats: addr.clone().recipient(),
            fault: addr.clone().recipient(),
            seek: addr.clone().recipient(),
            delete_group: addr.clone().recipient(),
            disconnect_stale: addr.clone().recipient(),
        }
    }
}

impl TopicListener {
    /// An orchestrator's recipients of the store's topic notices.
    pub fn of(addr: &Addr<OrchestratorActor>) -> TopicListener {
        TopicListener {
            floor_moved: addr.clone().recipient(),
            removed: addr.clone().recipient(),
        }
    }
}

/// The store's answer to `LoadGroup` as the join needs it.
type Loaded = Result<Option<(Option<GroupRecord>, u64)>, WireError>;

impl OrchestratorActor {
    /// Installs a loaded group (or a new one, returning its record to persist) and adds the
    /// consumer to it.
    fn join_loaded(
        &mut self,
        msg: &JoinGroup,
        loaded: Loaded,
        fresh: Option<group_ops::NewGroup>,
    ) -> Result<Option<GroupRecord>, WireError> {
        if !self.joining.remove(&msg.consumer) {
            // Left (cancelled, disconnected) while the group loaded: not added.
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                "the subscription ended while joining",
            ));
        }
        let mut create = None;
        if let Some((rec, head)) = loaded? {
            let exists = self.group_mut(&msg.topic, &msg.group).is_some();
            let rec = match rec {
                Some(r) => r,
                None => {
                    let mut r = GroupState::new_record(msg.mode, msg.filters.clone());
                    if let Some(f) = fresh {
                        r.backoff_ms = f.backoff_ms;
                        r.acked_floor = f.acked_floor;
                    }
                    // A concurrent join may have created it meanwhile: persist a new record
                    // only for a group not in memory yet.
                    if !exists {
                        create = Some(r.clone());
                    }
                    r
                }
            };
            self.install_group(&msg.topic, &msg.group, rec, head);
        }
        let max_in_flight_bytes = self.cfg.max_in_flight_bytes;
        let (g, _) = self
            .group_mut(&msg.topic, &msg.group)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, "group vanished"))?;
        g.check_backoff(msg.backoff_ms.as_deref())
            .map_err(|e| WireError::new(e.code, format!("group '{}': {}", msg.group, e.message)))?;
        g.join(Joining {
            consumer: msg.consumer,
            mode: msg.mode,
            filters: msg.filters.clone(),
            window: msg.window,
            batch_size: msg.batch_size,
            credits: msg.credits,
            max_in_flight_bytes,
        })
        .map_err(|e| WireError::new(e.code, format!("group '{}': {}", msg.group, e.message)))?;
        let mode = g.mode();
        self.recipients.insert(msg.consumer, msg.recipient.clone());
        self.register_links(msg);
        tracing::info!(topic = %msg.topic, group = %msg.group, consumer = %msg.consumer, %mode, "consumer joined");
        Ok(create)
    }
}

impl Handler<JoinGroup> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, msg: JoinGroup, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        self.joining.insert(msg.consumer);
        let loaded = self
            .topics
            .get(&msg.topic)
            .is_some_and(|t| t.groups.contains_key(&msg.group));
        let load = if loaded {
            None
        } else {
            Some(self.store.load.send(LoadGroup {
                topic: msg.topic.clone(),
                group: msg.group.clone(),
            }))
        };
        let query = self.new_group_query(&msg);
        let loading = load.is_some();
        let removals = self.topic_removals;
        Box::pin(
            async move {
                let loaded: Loaded = match load {
                    None => Ok(None),
                    Some(f) => match f.await {
                        Ok(Ok(r)) => Ok(Some(r)),
                        Ok(Err(e)) => Err(WireError::from(e)),
                        Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
                    },
                };
                // A new group: its schedule and floor.
                let fresh = match &loaded {
                    Ok(Some((None, _))) => Some(query.fetch().await),
                    _ => None,
                };
                (loaded, fresh)
            }
            .into_actor(self)
            .then(move |(loaded, fresh), act, _ctx| {
                // A topic of this shard deleted while the record loaded: the record may be
                // the deleted topic's, so it is not installed (the client subscribes again).
                let loaded = if loading && act.topic_removals != removals {
                    Err(WireError::new(
                        ErrorCode::Unavailable,
                        "a topic was deleted while the group loaded; subscribe again",
                    ))
                } else {
                    loaded
                };
                let res = act.join_loaded(&msg, loaded, fresh);
                let joined = res.is_ok();
                let mode = msg.mode;
                let consumer = msg.consumer;
                let (t, gr) = (msg.topic.clone(), msg.group.clone());
                let created = matches!(&res, Ok(Some(_)));
                let persist = match &res {
                    Ok(Some(record)) => Some(act.store.commit.send(CommitGroup {
                        topic: t.clone(),
                        group: gr.clone(),
                        record: record.clone(),
                    })),
                    _ => None,
                };
                async move {
                    res?;
                    if let Some(p) = persist {
                        match p.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(WireError::from(e)),
                            Err(e) => {
                                return Err(WireError::new(ErrorCode::Unavailable, e.to_string()))
                            }
                        }
                    }
                    Ok(())
                }
                .into_actor(act)
                .map(move |res, act, ctx| {
                    if res.is_ok() {
                        if created {
                            act.emit(
                                BrokerEvent::now(sluice_protocol::event_kind::GROUP_CREATED)
                                    .topic(&t)
                                    .group(&gr)
                                    .detail(mode.as_str()),
                            );
                        }
                        act.emit(
                            BrokerEvent::now(sluice_protocol::event_kind::CONSUMER_JOINED)
                                .topic(&t)
                                .group(&gr)
                                .consumer(consumer)
                                .detail(mode.as_str()),
                        );
                        act.pump(&t, &gr, ctx);
                    } else if joined {
                        // Joined, but the new group's record could not be stored: the client
                        // gets the error, so the consumer must not stay in the group.
                        act.forget_links(consumer);
                        if let Some((g, _)) = act.group_mut(&t, &gr) {
                            g.leave(consumer);
                        }
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
        self.joining.remove(&msg.consumer);
        self.remove_consumer(&msg.topic, &msg.group, msg.consumer, ctx);
    }
}

impl Handler<GrantCredits> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: GrantCredits, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let Some((g, _)) = self.group_mut(&msg.topic, &msg.group) else {
            return;
        };
        g.grant(msg.consumer, msg.n);
        self.pump(&msg.topic, &msg.group, ctx);
    }
}

/// What an ack or nack asks for.
struct SettleRequest {
    topic: String,
    group: String,
    conn: u64,
    batch_id: u64,
    seqs: Option<Vec<u64>>,
    kind: Settle,
}

impl OrchestratorActor {
    fn settle_and_persist(
        &mut self,
        req: SettleRequest,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<AckReply, WireError>> {
        self.counters.handled += 1;
        if self.group_mut(&req.topic, &req.group).is_some() {
            return self.settle_loaded(req, ctx);
        }
        // Not loaded (e.g. an ack racing the rejoin after a restart): load the group first, so
        // the reply says what happened to the named messages.
        let load = self.store.load.send(LoadGroup {
            topic: req.topic.clone(),
            group: req.group.clone(),
        });
        Box::pin(load.into_actor(self).then(move |res, act, ctx| {
            match res {
                Ok(Ok((Some(rec), head))) => act.install_group(&req.topic, &req.group, rec, head),
                Ok(Ok((None, _))) => {
                    let e = WireError::new(
                        ErrorCode::UnknownGroup,
                        format!(
                            "group '{}' of topic '{}' does not exist",
                            req.group, req.topic
                        ),
                    );
                    return Box::pin(fut::ready(Err(e))) as ResponseActFuture<Self, _>;
                }
                Ok(Err(e)) => return Box::pin(fut::ready(Err(WireError::from(e)))),
                Err(e) => {
                    let e = WireError::new(ErrorCode::Unavailable, e.to_string());
                    return Box::pin(fut::ready(Err(e)));
                }
            }
            act.settle_loaded(req, ctx)
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
        req: SettleRequest,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<AckReply, WireError>> {
        let max_retries = self.cfg.max_retries;
        let SettleRequest {
            topic,
            group,
            conn,
            batch_id,
            seqs,
            kind,
        } = req;
        let Some((g, _)) = self.group_mut(&topic, &group) else {
            let e = WireError::new(
                ErrorCode::UnknownGroup,
                format!("group '{group}' of topic '{topic}' has no consumer here"),
            );
            return Box::pin(fut::ready(Err(e)));
        };
        let s = match kind {
            Settle::Ack => g.ack(conn, batch_id, seqs),
            Settle::Nack { release, delay } => g.nack_delayed(
                conn,
                batch_id,
                seqs,
                release,
                max_retries,
                delay,
                std::time::Instant::now(),
            ),
        };
        // An ack that says "acked" (now or already) waits for a durable cursor: the one it
        // changed, or, for a repeat, a commit after the one that settled it (it may still be
        // on its way to disk, and commits are durable in order).
        // A broadcast member's ack that did not move the group's cursor stores nothing: only
        // the group's cursor is durable (after a restart every member starts there, §6.8), so
        // there is no commit to wait for (N members would otherwise commit N times what one
        // group commits once).
        let member_only = g.mode() == GroupMode::Broadcast && s.outcome == AckOutcome::Settled;
        let claims_acked = kind == Settle::Ack
            && matches!(s.outcome, AckOutcome::Settled | AckOutcome::AlreadyAcked);
        let record = match g.take_dirty_record() {
            Some(r) => Some(r),
            None if claims_acked && !member_only => Some(g.record()),
            None => None,
        };
        if !s.rejected.is_empty() {
            // A count and the first few: a request may name up to 1,000,000 seqs.
            let first: Vec<u64> = s.rejected.iter().take(8).copied().collect();
            tracing::warn!(
                topic,
                group,
                conn,
                batch_id,
                rejected = s.rejected.len(),
                ?first,
                "ack/nack of messages not delivered to this connection in this batch: not applied"
            );
        }
        for bid in &s.closed {
            self.cancel_timer(*bid, ctx);
        }
        if !s.dead.is_empty() {
            self.dead_letter(&topic, &group, s.dead, "nack", ctx);
        }
        let commit = record.map(|record| {
            self.store.commit.send(CommitGroup {
                topic: topic.clone(),
                group: group.clone(),
                record,
            })
        });
        if matches!(kind, Settle::Nack { .. }) {
            self.arm_retry(&topic, &group, ctx);
        }
        self.pump(&topic, &group, ctx);
        let reply = AckReply {
            outcome: s.outcome,
            count: s.count,
            rejected: s.rejected,
        };
        Box::pin(
            async move {
                if let Some(c) = commit {
                    let r: Result<(), StoreError> = c.await.map_err(|_| StoreError::Unavailable)?;
                    r.map_err(|e| WireError::new(ErrorCode::StorageError, e.to_string()))?;
                }
                Ok(reply)
            }
            .into_actor(self),
        )
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable => WireError::new(ErrorCode::Unavailable, "store unavailable"),
            StoreError::UnknownTopic(t) => WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic '{t}' does not exist"),
            ),
            other => WireError::new(ErrorCode::StorageError, other.to_string()),
        }
    }
}

impl Handler<AckBatch> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<AckReply, WireError>>;
    fn handle(&mut self, msg: AckBatch, ctx: &mut Context<Self>) -> Self::Result {
        let req = SettleRequest {
            topic: msg.topic,
            group: msg.group,
            conn: msg.conn,
            batch_id: msg.batch_id,
            seqs: msg.seqs,
            kind: Settle::Ack,
        };
        self.settle_and_persist(req, ctx)
    }
}

impl Handler<NackBatch> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<AckReply, WireError>>;
    fn handle(&mut self, msg: NackBatch, ctx: &mut Context<Self>) -> Self::Result {
        let req = SettleRequest {
            topic: msg.topic,
            group: msg.group,
            conn: msg.conn,
            batch_id: msg.batch_id,
            seqs: msg.seqs,
            kind: Settle::Nack {
                release: msg.release,
                delay: msg.delay,
            },
        };
        self.settle_and_persist(req, ctx)
    }
}

impl Handler<BatchTimedOut> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: BatchTimedOut, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let known = self
            .group_mut(&msg.topic, &msg.group)
            .is_some_and(|(g, _)| g.has_batch(msg.batch_id));
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
        // Track the head even before any group is loaded: a group loading right now takes the
        // larger of this and the head the store reported.
        let t = self.topics.entry(msg.topic.clone()).or_insert(TopicState {
            head: 0,
            groups: HashMap::new(),
        });
        t.head = t.head.max(last);
        let mut to_pump = Vec::with_capacity(t.groups.len());
        for (name, g) in t.groups.iter_mut() {
            g.offer_tail(&msg.messages);
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
    fn handle(&mut self, msg: InjectFault, ctx: &mut Context<Self>) {
        if msg.kind == super::FaultKind::Panic {
            tracing::warn!(name = %self.name, "fault injected: panicking");
            super::injected_panic(&self.name);
        }
        tracing::warn!(name = %self.name, "fault injected: stopping");
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    //! The orchestrator against a probe store (its `StoreLinks` are plain recipients), so the
    //! order in which the actor sees messages can be set by the test.
    use super::*;
    use crate::store::ReadResult;
    use sluice_protocol::{ActorStats, GroupMode, SyncStats};
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// A store that knows no group and answers `LoadGroup` only when the test says so.
    struct ProbeStore {
        gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    }

    impl Actor for ProbeStore {
        type Context = Context<Self>;
    }

    impl Handler<LoadGroup> for ProbeStore {
        type Result = ResponseFuture<Result<(Option<GroupRecord>, u64), StoreError>>;
        fn handle(&mut self, _: LoadGroup, _: &mut Context<Self>) -> Self::Result {
            let gate = self.gate.lock().ok().and_then(|mut g| g.take());
            Box::pin(async move {
                if let Some(g) = gate {
                    let _ = g.await;
                }
                Ok((None, 0))
            })
        }
    }

    macro_rules! answers {
        ($($msg:ty => $value:expr),* $(,)?) => {$(
            impl Handler<$msg> for ProbeStore {
                type Result = MessageResult<$msg>;
                fn handle(&mut self, _: $msg, _: &mut Context<Self>) -> Self::Result {
                    MessageResult($value)
                }
            }
        )*};
    }

    answers! {
        AppendMessages => Ok(crate::store::Appended::stored(1, 0)),
        CommitGroup => Ok(()),
        ReadRange => Ok(ReadResult::default()),
        super::super::messages::ListGroups => Ok(vec![]),
        super::super::messages::GetSyncStats => SyncStats::default(),
        GetActorStats => ActorStats::default(),
        InjectFault => (),
        super::super::messages::SeqAtTime => Ok(1),
        super::super::messages::DeleteGroupRecord => Ok(true),
        super::super::messages::GetTopicSettings => Ok(Default::default()),
    }

    struct Sink;
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<DeliverBatch> for Sink {
        type Result = ();
        fn handle(&mut self, _: DeliverBatch, _: &mut Context<Self>) {}
    }
    impl Handler<super::super::messages::KickConsumer> for Sink {
        type Result = ();
        fn handle(&mut self, _: super::super::messages::KickConsumer, _: &mut Context<Self>) {}
    }
    impl Handler<super::super::messages::StreamNotice> for Sink {
        type Result = ();
        fn handle(&mut self, _: super::super::messages::StreamNotice, _: &mut Context<Self>) {}
    }

    fn join(consumer: ConsumerId, sink: &Addr<Sink>) -> JoinGroup {
        JoinGroup {
            consumer,
            topic: "t".into(),
            group: "g".into(),
            mode: GroupMode::Exclusive,
            filters: BTreeMap::new(),
            window: 1,
            batch_size: 1,
            credits: 1,
            recipient: sink.clone().recipient(),
            backoff_ms: None,
            kick: sink.clone().recipient(),
            notice: sink.clone().recipient(),
        }
    }

    #[actix_rt::test]
    async fn a_subscription_that_leaves_while_its_group_loads_is_not_added() {
        let (open, gate) = oneshot::channel();
        let store = ProbeStore {
            gate: Arc::new(Mutex::new(Some(gate))),
        }
        .start();
        let links = StoreLinks::of(&store);
        let cfg = DeliveryConfig {
            batch_size: 1,
            batch_max_bytes: 1 << 20,
            batch_timeout: Duration::from_secs(30),
            max_retries: 3,
            window: 1,
            max_in_flight_bytes: 1 << 20,
            ..DeliveryConfig::default()
        };
        let orch = OrchestratorActor::new(0, cfg, links, None, Arc::new(AtomicU64::new(1))).start();
        let sink = Sink.start();
        let first = ConsumerId { conn: 1, stream: 1 };
        // Joins, and leaves (cancel, disconnect) while its group is still loading.
        let joining = orch.send(join(first, &sink));
        orch.do_send(LeaveGroup {
            consumer: first,
            topic: "t".into(),
            group: "g".into(),
        });
        // Both are in the mailbox before the load answers.
        tokio::task::yield_now().await;
        let _ = open.send(());
        let res = joining.await.expect("mailbox");
        assert!(res.is_err(), "a subscription that left was added: {res:?}");
        // The exclusive group is free for the next consumer.
        let second = ConsumerId { conn: 2, stream: 1 };
        let res = orch.send(join(second, &sink)).await.expect("mailbox");
        assert!(res.is_ok(), "{res:?}");
        let stats = orch.send(GetGroupStats).await.expect("mailbox");
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].consumers, 1);
    }

    #[actix_rt::test]
    async fn a_group_record_loaded_across_a_topic_deletion_is_not_installed() {
        let (open, gate) = oneshot::channel();
        let store = ProbeStore {
            gate: Arc::new(Mutex::new(Some(gate))),
        }
        .start();
        let links = StoreLinks::of(&store);
        let orch = OrchestratorActor::new(
            0,
            DeliveryConfig::default(),
            links,
            None,
            Arc::new(AtomicU64::new(1)),
        )
        .start();
        let sink = Sink.start();
        let first = ConsumerId { conn: 1, stream: 1 };
        // The record is loading when the topic is deleted: it may be the deleted topic's.
        let joining = orch.send(join(first, &sink));
        orch.do_send(super::super::messages::TopicRemoved { topic: "t".into() });
        tokio::task::yield_now().await;
        let _ = open.send(());
        let res = joining.await.expect("mailbox");
        let e = res.expect_err("a record loaded across a deletion was installed");
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        let stats = orch.send(GetGroupStats).await.expect("mailbox");
        assert!(stats.is_empty(), "{stats:?}");
        // Subscribing again works.
        let res = orch.send(join(first, &sink)).await.expect("mailbox");
        assert!(res.is_ok(), "{res:?}");
    }
}
