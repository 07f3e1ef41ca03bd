//! The store's side of topics as an operator manages them: `topic.*` routes, the lookup of a
//! seq by time for `group.seek`, group deletion, groups of topics that do not exist yet, the
//! retention sweep with the listeners told about it, and the events of all that. The design
//! (where settings live, how the sweep stays safe with the sync pipeline, the dedup index) is
//! in `src/store/retention.md`.

use super::StoreActor;
use crate::actors::messages::{
    CreateTopic, DeleteGroupRecord, DeleteTopic, FloorMoved, GetTopicInfo, GetTopicSettings,
    SeqAtTime, SetTopicListeners, TopicRemoved,
};
use crate::actors::now_ms;
use crate::config::FsyncPolicy;
use crate::store::commit::{lock, Retired, Written};
use crate::store::dedup::Forgot;
use crate::store::remover::{Removed, SegmentsRemoved};
use crate::store::{settings, GroupRecord, StoreError};
use actix::prelude::*;
use sluice_protocol::{
    event_kind, BrokerEvent, ErrorCode, TopicDeleted, TopicInfo, TopicSettings, WireError,
};
use tokio::sync::oneshot;

/// Most segments one sweep takes out of logs (the rest wait for the next tick): the sweep's
/// work on the store's thread stays small; the unlinks run on the remover thread.
pub const MAX_REMOVE_PER_TICK: usize = 256;

/// Most expired ids one sweep forgets per topic.
const MAX_EXPIRE_PER_TICK: usize = 100_000;

/// Bounds the store hit (shown in `admin.stats` under `syncs`), and when each last raised an
/// event.
#[derive(Debug, Default)]
pub struct StoreLimits {
    /// Subscribes refused: too many groups waiting for topics that do not exist yet.
    pub waiting_groups_refused: u64,
    /// Ids forgotten before their window ended: a topic's dedup index was full, or every
    /// topic's together (`dedup_max_ids`).
    pub dedup_ids_forgotten: u64,
    last_dedup_event: Option<std::time::Instant>,
}

/// Files retention or a deletion removed are gone (from the remover thread).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub(super) struct FilesRemoved(pub Removed);

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn storage_wire(e: StoreError) -> WireError {
    WireError::from(e)
}

impl StoreActor {
    /// Whether `topic` may be written (a publish, a group record): not while it is being
    /// deleted, and only if it exists when `auto_create_topics` is off, unless `dead_letter`:
    /// the orchestrator's dead-letter appends create their topic whatever the setting (a
    /// client's publish to a name ending in `.dlq` does not).
    pub(super) fn may_write(&self, topic: &str, dead_letter: bool) -> Result<(), StoreError> {
        if self.deleting.contains(topic) {
            return Err(StoreError::UnknownTopic(topic.to_string()));
        }
        if !self.config.auto_create_topics && !self.storage.exists(topic) && !dead_letter {
            return Err(StoreError::UnknownTopic(topic.to_string()));
        }
        Ok(())
    }

    /// Keeps the record of a group of a topic that does not exist yet (bounded: past
    /// `MAX_WAITING_GROUPS`, refused, counted and a `memory_pressure` event).
    pub(super) fn keep_waiting_group(
        &mut self,
        topic: &str,
        group: &str,
        rec: &GroupRecord,
    ) -> Result<(), StoreError> {
        self.storage
            .keep_waiting_group(topic, group, rec)
            .inspect_err(|e| {
                self.limits.waiting_groups_refused += 1;
                tracing::warn!(topic, group, error = %e, "subscribe to a missing topic refused");
                self.events.emit(
                    BrokerEvent::now(event_kind::MEMORY_PRESSURE)
                        .topic(topic)
                        .group(group)
                        .detail(format!("groups waiting for missing topics: {e}")),
                );
            })
    }

    /// The dedup index forgot ids early to stay within its bounds (the topic's, or every
    /// topic's together): counted, and an event (at most one every 10 s).
    pub(super) fn dedup_full(&mut self, topic: Option<&str>, forgot: Forgot) {
        self.limits.dedup_ids_forgotten += forgot.total();
        let now = std::time::Instant::now();
        if self
            .limits
            .last_dedup_event
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(10))
        {
            return;
        }
        self.limits.last_dedup_event = Some(now);
        let bound = if forgot.broker_bound > 0 {
            format!(
                "the broker's dedup indexes are full (dedup_max_ids = {} ids, every topic)",
                self.config.dedup_max_ids
            )
        } else {
            format!(
                "the topic's dedup index is full ({} ids)",
                crate::store::dedup::MAX_IDS_PER_TOPIC
            )
        };
        tracing::warn!(
            topic = topic.unwrap_or(""),
            forgotten = self.limits.dedup_ids_forgotten,
            "{bound}: the oldest ids are forgotten before their window ends"
        );
        let mut e = BrokerEvent::now(event_kind::MEMORY_PRESSURE)
            .count(forgot.total())
            .detail(format!(
                "{bound}: the oldest forgotten before their window ends"
            ));
        if let Some(t) = topic {
            e = e.topic(t);
        }
        self.events.emit(e);
    }

    /// A `storage_error` event (write and sync failures; callers rate-limit the former).
    pub(super) fn storage_error(&mut self, topic: Option<&str>, what: &str) {
        let mut e = BrokerEvent::now(event_kind::STORAGE_ERROR).detail(what);
        if let Some(t) = topic {
            e = e.topic(t);
        }
        self.events.emit(e);
    }

    /// Rebuilds the dedup index from the logs (at start).
    pub(super) fn rebuild_dedup(&mut self) {
        let started = std::time::Instant::now();
        match self.storage.rebuild_dedup(now_ms()) {
            Ok((ids, forgot)) => {
                tracing::info!(ids, elapsed = ?started.elapsed(), "dedup index rebuilt from the logs");
                if forgot.total() > 0 {
                    self.dedup_full(None, forgot);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot rebuild the dedup index: ids stored before this start are not recognised");
                self.storage_error(None, &format!("rebuilding the dedup index: {e}"));
            }
        }
    }

    /// Starts the remover thread once (it outlives restarts of the actor): it unlinks what
    /// the ledger hands it and reports back with [`FilesRemoved`].
    pub(super) fn start_remover(&mut self, ctx: &mut Context<Self>) {
        if self.remover_started {
            return;
        }
        let me = ctx.address().recipient::<FilesRemoved>();
        let pace = crate::store::remover::Pace::rate(self.config.retention_remove_rate);
        match crate::store::remover::spawn(
            self.storage.trash_dir(),
            pace,
            self.free_stats.clone(),
            Box::new(move |r| me.do_send(FilesRemoved(r))),
        ) {
            Ok(tx) => {
                self.remover_started = true;
                lock(&self.ledger).retire = Some(Box::new(move |batch, synced| {
                    let _ = tx.send((batch, synced));
                }));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the remover thread: retention removes nothing");
            }
        }
    }

    /// Hands removals to the pipeline: they go once everything written before is durable
    /// (under `always`, after the sync job taken now; under `interval`, after a sync made
    /// here; under `never`, at once).
    fn retire(&mut self, retired: Vec<Retired>, ctx: &mut Context<Self>) -> Result<(), StoreError> {
        match self.fsync {
            FsyncPolicy::Always => {
                self.written.retired.extend(retired);
                self.start_sync(ctx);
            }
            FsyncPolicy::Interval(_) => {
                self.sync_now().inspect_err(|e| {
                    self.fail(format!("sync before removing files: {e}"));
                })?;
                let batch = Written {
                    retired,
                    ..Written::default()
                };
                lock(&self.ledger).settle(batch, Ok(()));
            }
            FsyncPolicy::Never => {
                let batch = Written {
                    retired,
                    ..Written::default()
                };
                lock(&self.ledger).settle(batch, Ok(()));
            }
        }
        Ok(())
    }

    /// The retention sweep (every `retention_interval`): rolls segments by age, takes the
    /// segments each topic's limits remove out of its log (at most [`MAX_REMOVE_PER_TICK`])
    /// and hands them to the pipeline for removal; forgets expired ids.
    pub(super) fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.failed.is_some() {
            return;
        }
        if self.fsync == FsyncPolicy::Never {
            // Nothing syncs under `never`: handles taken for a sync that never comes are let
            // go, so segments count as written out (see `SegmentLog::detachable`).
            drop(self.storage.take_sync_job());
        }
        let now = now_ms();
        let segment_max_age = ms(self.config.segment_max_age);
        let mut budget = MAX_REMOVE_PER_TICK;
        let mut retired = Vec::new();
        // Group records queued and not written yet count for `discard = "acked"` like the
        // written ones: a backward seek's must keep what it goes back to.
        let mut pending_floors: std::collections::HashMap<String, u64> =
            std::collections::HashMap::new();
        for ((topic, _), (rec, _)) in &self.pending_groups {
            let f = pending_floors.entry(topic.clone()).or_insert(u64::MAX);
            *f = (*f).min(rec.acked_floor);
        }
        for topic in self.storage.topic_names() {
            if budget == 0 {
                break;
            }
            if self.deleting.contains(&topic) {
                continue;
            }
            let durable = self.durable_head(&topic);
            let pending = pending_floors.get(&topic).copied();
            match self.storage.retention_step(
                &topic,
                now,
                segment_max_age,
                durable,
                pending,
                budget,
            ) {
                Ok(Some(mut t)) => {
                    if self.fsync != FsyncPolicy::Never {
                        // The pipeline syncs everything written before the removal.
                        t.sync_first.clear();
                    }
                    budget = budget.saturating_sub(t.removed.len());
                    tracing::debug!(
                        topic,
                        segments = t.removed.len(),
                        floor = t.floor,
                        why = t.why,
                        "retention: segments taken out"
                    );
                    retired.push(Retired::Segments(t));
                }
                Ok(None) => {}
                Err(StoreError::Inconsistent(why)) => {
                    self.fail(why);
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic, error = %e, "retention step failed: tried again at the next sweep");
                    if self.failures.note(&format!("retention of {topic}"), &e) {
                        self.storage_error(Some(&topic), &e.to_string());
                    }
                }
            }
        }
        self.storage.expire_ids(now, MAX_EXPIRE_PER_TICK);
        if !retired.is_empty() {
            let _ = self.retire(retired, ctx);
        }
    }

    /// `TopicInfo` of `topic`, if it exists.
    pub(super) fn topic_info(&self, topic: &str) -> Option<TopicInfo> {
        let st = self.storage.topic_stats(topic)?;
        let head = self.durable_head(topic).min(st.last_seq);
        let floor = st.floor.min(head + 1);
        let mut groups = st.groups;
        for (t, g) in self.pending_groups.keys() {
            if t == topic && !groups.contains(g) {
                groups.push(g.clone());
            }
        }
        groups.sort();
        Some(TopicInfo {
            topic: topic.to_string(),
            head_seq: head,
            floor_seq: floor,
            messages: (head + 1).saturating_sub(floor),
            bytes: st.bytes,
            segments: st.segments,
            groups,
            settings: self.storage.settings(topic),
            oldest_ms: st.oldest_ms.filter(|_| head >= floor),
        })
    }

    /// The settings `overrides` would put in force, checked as a whole.
    fn check_in_force(&self, overrides: &TopicSettings) -> Result<(), WireError> {
        let f = settings::in_force(overrides, &self.config.default_topic_settings());
        f.validate()?;
        if let (Some(age), Some(window)) = (f.max_age_ms, f.dedup_window_ms) {
            if window > age && overrides.dedup_window_ms.is_some() && overrides.max_age_ms.is_some()
            {
                return Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "dedup_window ({window} ms) longer than max_age ({age} ms): set a \
                         max_age at least as long as the window"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl StoreActor {
    /// Segments retention removed are gone: an event, and the topic's orchestrator moves its
    /// groups up to the floor.
    fn segments_removed(&mut self, r: SegmentsRemoved) {
        tracing::info!(topic = %r.topic, messages = r.messages, bytes = r.bytes, floor = r.floor, why = r.why, "retention removed segments");
        if let Some(e) = &r.error {
            self.storage_error(Some(&r.topic), e);
        }
        self.events.emit(
            BrokerEvent::now(event_kind::RETENTION_REMOVED)
                .topic(&r.topic)
                .count(r.messages)
                .bytes(r.bytes)
                .seq(r.floor)
                .detail(r.why),
        );
        if !self.topic_listeners.is_empty() {
            let shard = crate::actors::shard_for(&r.topic, self.topic_listeners.len());
            self.topic_listeners[shard].floor_moved.do_send(FloorMoved {
                topic: r.topic,
                floor_seq: r.floor,
            });
        }
    }

    /// A topic's deletion is durable (or failed): an event, and the topic's orchestrator
    /// shard ends its subscriptions and drops its groups (`TopicRemoved`). Only once the shard
    /// has handled that is the name free again and the deletion answered ([`TopicGone`]): every
    /// group record the shard sent before (an ack queued ahead of `TopicRemoved`) has then
    /// reached this actor's mailbox, ahead of anything a client sends after the answer, so it
    /// finds the topic gone (refused) rather than a new topic of that name created by a
    /// publish meanwhile.
    fn topic_removed(
        &mut self,
        topic: String,
        messages: u64,
        bytes: u64,
        result: Result<(), String>,
        reply: oneshot::Sender<Result<(), String>>,
        ctx: &mut Context<Self>,
    ) {
        match &result {
            Ok(()) => {
                tracing::info!(topic, messages, bytes, "topic deleted");
                self.events.emit(
                    BrokerEvent::now(event_kind::TOPIC_DELETED)
                        .topic(&topic)
                        .count(messages)
                        .bytes(bytes),
                );
                if !self.topic_listeners.is_empty() {
                    let shard = crate::actors::shard_for(&topic, self.topic_listeners.len());
                    let told = self.topic_listeners[shard].removed.send(TopicRemoved {
                        topic: topic.clone(),
                    });
                    // Awaited off the actor (a restart of the actor would drop a future of
                    // its own, and the name would stay taken); the answer comes back by
                    // message.
                    let me = ctx.address();
                    actix_rt::spawn(async move {
                        if let Err(e) = told.await {
                            // The shard stopped (it restarts with no state of the topic).
                            tracing::warn!(topic, error = %e, "the orchestrator did not confirm a topic's removal");
                        }
                        me.do_send(TopicGone {
                            topic,
                            result,
                            reply,
                        });
                    });
                    return;
                }
            }
            Err(e) => self.storage_error(Some(&topic), &format!("deleting the topic: {e}")),
        }
        self.topic_gone(topic, result, reply);
    }

    /// The name of a deleted topic is free again: the deletion is answered.
    fn topic_gone(
        &mut self,
        topic: String,
        result: Result<(), String>,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        self.deleting.remove(&topic);
        let _ = reply.send(result);
    }
}

/// The orchestrator handled a deleted topic's `TopicRemoved`: the name is free again.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct TopicGone {
    topic: String,
    result: Result<(), String>,
    reply: oneshot::Sender<Result<(), String>>,
}

impl Handler<TopicGone> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: TopicGone, _: &mut Context<Self>) {
        self.topic_gone(msg.topic, msg.result, msg.reply);
    }
}

impl Handler<FilesRemoved> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: FilesRemoved, ctx: &mut Context<Self>) {
        match msg.0 {
            Removed::Segments(r) => self.segments_removed(r),
            Removed::Topic {
                topic,
                messages,
                bytes,
                result,
                reply,
            } => self.topic_removed(topic, messages, bytes, result, reply, ctx),
        }
    }
}

impl Handler<CreateTopic> for StoreActor {
    type Result = Result<TopicInfo, WireError>;
    fn handle(&mut self, msg: CreateTopic, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        if let Some(e) = self.refusal() {
            return Err(storage_wire(e));
        }
        msg.settings.validate()?;
        let topic = msg.topic;
        if self.deleting.contains(&topic) {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!("topic '{topic}' is being deleted: retry"),
            ));
        }
        let exists = self.storage.exists(&topic);
        if msg.alter {
            if !exists {
                return Err(WireError::new(
                    ErrorCode::UnknownTopic,
                    format!("topic '{topic}' does not exist"),
                ));
            }
            let next = settings::apply(&self.storage.overrides(&topic), &msg.settings);
            self.check_in_force(&next)?;
            self.storage
                .alter_topic(&topic, &msg.settings)
                .map_err(storage_wire)?;
            tracing::info!(topic, settings = ?self.storage.settings(&topic), "topic altered");
        } else {
            if exists {
                return Err(WireError::new(
                    ErrorCode::TopicExists,
                    format!("topic '{topic}' exists (use topic.alter to change its settings)"),
                ));
            }
            let overrides = settings::apply(&TopicSettings::default(), &msg.settings);
            self.check_in_force(&overrides)?;
            self.storage
                .create_topic(&topic, overrides)
                .map_err(storage_wire)?;
            tracing::info!(topic, settings = ?self.storage.settings(&topic), "topic created");
            self.events
                .emit(BrokerEvent::now(event_kind::TOPIC_CREATED).topic(&topic));
        }
        self.topic_info(&topic)
            .ok_or_else(|| WireError::new(ErrorCode::Internal, format!("topic '{topic}' vanished")))
    }
}

impl Handler<GetTopicInfo> for StoreActor {
    type Result = Result<Vec<TopicInfo>, WireError>;
    fn handle(&mut self, msg: GetTopicInfo, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        Ok(match msg.topic {
            Some(t) => self.topic_info(&t).into_iter().collect(),
            None => self
                .storage
                .topic_names()
                .iter()
                .filter(|t| !self.deleting.contains(*t))
                .filter_map(|t| self.topic_info(t))
                .collect(),
        })
    }
}

impl Handler<DeleteTopic> for StoreActor {
    type Result = ResponseFuture<Result<TopicDeleted, WireError>>;
    fn handle(&mut self, msg: DeleteTopic, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let topic = msg.topic;
        let unknown = |t: &str| {
            WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic '{t}' does not exist"),
            )
        };
        if let Some(e) = self.refusal() {
            return Box::pin(async move { Err(storage_wire(e)) });
        }
        if !self.storage.exists(&topic) || self.deleting.contains(&topic) {
            let e = unknown(&topic);
            return Box::pin(async move { Err(e) });
        }
        // What was queued for it is written first (and goes with it).
        self.write_pending();
        let removed = match self.storage.remove_topic(&topic) {
            Ok(r) => r,
            Err(e) => {
                self.commit_written(ctx);
                return Box::pin(async move { Err(storage_wire(e)) });
            }
        };
        let (messages, bytes) = (removed.messages, removed.bytes);
        self.deleting.insert(topic.clone());
        let (tx, rx) = oneshot::channel();
        self.written.retired.push(Retired::Topic(removed, tx));
        self.commit_written(ctx);
        Box::pin(async move {
            match rx.await {
                Ok(Ok(())) => Ok(TopicDeleted {
                    topic,
                    messages,
                    bytes,
                }),
                Ok(Err(e)) => Err(WireError::new(ErrorCode::StorageError, e)),
                Err(_) => Err(WireError::new(
                    ErrorCode::Unavailable,
                    "the store restarted during the deletion",
                )),
            }
        })
    }
}

impl Handler<SeqAtTime> for StoreActor {
    type Result = Result<u64, StoreError>;
    fn handle(&mut self, msg: SeqAtTime, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let seq = self.storage.seq_at_time(&msg.topic, msg.at_ms)?;
        Ok(seq.min(self.durable_head(&msg.topic) + 1))
    }
}

impl Handler<DeleteGroupRecord> for StoreActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: DeleteGroupRecord, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        if let Some(e) = self.refusal() {
            return Box::pin(async move { Err(e) });
        }
        // A record still queued is written first; the tombstone goes after it.
        self.write_pending();
        let res = self.storage.delete_group(&msg.topic, &msg.group);
        let had = match res {
            Ok(had) => had,
            Err(e) => {
                if let StoreError::Inconsistent(why) = &e {
                    self.fail(why.clone());
                }
                self.commit_written(ctx);
                return Box::pin(async move { Err(e) });
            }
        };
        tracing::info!(topic = %msg.topic, group = %msg.group, had, "group record deleted");
        let (tx, rx) = oneshot::channel();
        self.written.groups.push(tx);
        self.commit_written(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or(Err(StoreError::Unavailable))
                .map(|()| had)
        })
    }
}

impl Handler<SetTopicListeners> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: SetTopicListeners, _: &mut Context<Self>) {
        self.topic_listeners = msg.0;
    }
}

impl Handler<GetTopicSettings> for StoreActor {
    type Result = Result<TopicSettings, StoreError>;
    fn handle(&mut self, msg: GetTopicSettings, _: &mut Context<Self>) -> Self::Result {
        Ok(self.storage.settings(&msg.topic))
    }
}

/// Tests: runs the retention sweep now.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct SweepNow;

#[cfg(test)]
impl Handler<SweepNow> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: SweepNow, ctx: &mut Context<Self>) {
        self.sweep(ctx);
    }
}
