//! Group operations of the orchestrator (issue 11): seek and delete, stale consumers (the stale
//! timer, `admin.disconnect_stale`, automatic disconnects), delayed retries (one timer per group
//! for its earliest due retry), reset notices, lifecycle events, and the store's notices
//! (retention moved a topic's floor, a topic was deleted). The rules live in
//! `crate::delivery::group` (`ops.rs`); see `orchestrator.md`.

use super::{OrchestratorActor, TopicState};
use crate::actors::messages::{
    CommitGroup, DeleteGroup, DeleteGroupRecord, DisconnectStale, FloorMoved, GetTopicSettings,
    JoinGroup, KickConsumer, LoadGroup, SeekGroup, SeqAtTime, StreamNotice, TopicRemoved,
};
use crate::actors::ConsumerId;
use crate::store::{GroupRecord, StoreError};
use actix::prelude::*;
use sluice_protocol::event_kind as kind;
use sluice_protocol::{
    BrokerEvent, ErrorCode, GroupDeleted, SeekReply, SeekTo, StaleConsumer, StreamEvent, WireError,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The orchestrator's state for group operations; dropped on restart like the rest.
#[derive(Default)]
pub(super) struct OrchOps {
    /// Where `KickConsumer` goes, per subscription.
    kicks: HashMap<ConsumerId, Recipient<KickConsumer>>,
    /// Where `StreamNotice` goes, per subscription.
    notices: HashMap<ConsumerId, Recipient<StreamNotice>>,
    /// Per group: when its retry timer fires, and the timer.
    retry_timers: HashMap<(String, String), (Instant, SpawnHandle)>,
}

/// What a new group takes from its topic: its redelivery schedule and where it starts.
#[derive(Debug, Clone, Default)]
pub(super) struct NewGroup {
    /// Redelivery schedule (ms per step).
    pub backoff_ms: Vec<u64>,
    /// Every seq at or below this was removed by retention (the topic's floor - 1).
    pub acked_floor: u64,
}

/// Asks the store what a group created now takes (only for a group that is new).
pub(super) struct NewGroupQuery {
    settings: Recipient<GetTopicSettings>,
    seq_at: Recipient<SeqAtTime>,
    topic: String,
    wanted: Option<Vec<u64>>,
    broker: Vec<u64>,
}

impl NewGroupQuery {
    /// The schedule the subscribe asked for, else the topic's default, else the broker's; and
    /// the topic's floor (a new group starts there, not below what retention removed).
    pub(super) async fn fetch(self) -> NewGroup {
        let settings = self.settings.send(GetTopicSettings {
            topic: self.topic.clone(),
        });
        let floor = self.seq_at.send(SeqAtTime {
            topic: self.topic,
            at_ms: 0,
        });
        let topic_backoff = match settings.await {
            Ok(Ok(s)) => s.backoff_ms.filter(|b| !b.is_empty()),
            other => {
                tracing::warn!(?other, "topic settings unavailable: the broker's backoff");
                None
            }
        };
        let acked_floor = match floor.await {
            Ok(Ok(f)) => f.saturating_sub(1),
            _ => 0,
        };
        NewGroup {
            backoff_ms: self.wanted.or(topic_backoff).unwrap_or(self.broker),
            acked_floor,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Unavailable, e.to_string())
}

fn unknown_group(topic: &str, group: &str) -> WireError {
    WireError::new(
        ErrorCode::UnknownGroup,
        format!("group '{group}' of topic '{topic}' does not exist"),
    )
}

impl OrchestratorActor {
    /// What to ask the store, should `msg`'s group turn out to be new.
    pub(super) fn new_group_query(&self, msg: &JoinGroup) -> NewGroupQuery {
        NewGroupQuery {
            settings: self.store.topic_settings.clone(),
            seq_at: self.store.seq_at_time.clone(),
            topic: msg.topic.clone(),
            wanted: msg.backoff_ms.clone(),
            broker: self.cfg.backoff_ms.clone(),
        }
    }

    /// Keeps where a joined subscription's kicks and notices go.
    pub(super) fn register_links(&mut self, msg: &JoinGroup) {
        self.ops.kicks.insert(msg.consumer, msg.kick.clone());
        self.ops.notices.insert(msg.consumer, msg.notice.clone());
    }

    /// Forgets a subscription's recipients.
    pub(super) fn forget_links(&mut self, consumer: ConsumerId) {
        self.recipients.remove(&consumer);
        self.ops.kicks.remove(&consumer);
        self.ops.notices.remove(&consumer);
    }

    /// Drops the ops state (restart).
    pub(super) fn reset_ops(&mut self) {
        self.ops = OrchOps::default();
    }

    pub(super) fn emit(&self, e: BrokerEvent) {
        self.events.emit(e);
    }

    /// Sends the reset notices the group's consumers are owed and have a credit for.
    pub(super) fn send_notices(&mut self, topic: &str, group: &str) {
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        for (consumer, n) in g.take_notices() {
            let Some(r) = self.ops.notices.get(&consumer) else {
                continue;
            };
            match sluice_protocol::encode(&StreamEvent::Reset(n)) {
                Ok(data) => r.do_send(StreamNotice { consumer, data }),
                Err(e) => tracing::error!(error = %e, "cannot encode a reset notice"),
            }
        }
    }

    /// A memory bound of the group was reached.
    pub(super) fn memory_pressure(&self, topic: &str, group: &str, what: &str) {
        tracing::warn!(
            topic,
            group,
            bound = what,
            "group at a memory bound: fresh messages wait"
        );
        self.emit(
            BrokerEvent::now(kind::MEMORY_PRESSURE)
                .topic(topic)
                .group(group)
                .detail(format!("group at its bound of {what}")),
        );
    }

    /// Arms the group's retry timer for its earliest delayed retry (unless one fires sooner).
    pub(super) fn arm_retry(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        let Some(due) = self.group_mut(topic, group).and_then(|(g, _)| g.next_due()) else {
            return;
        };
        let key = (topic.to_string(), group.to_string());
        if let Some((at, _)) = self.ops.retry_timers.get(&key) {
            if *at <= due {
                return;
            }
        }
        if let Some((_, h)) = self.ops.retry_timers.remove(&key) {
            ctx.cancel_future(h);
        }
        let wait = due.saturating_duration_since(Instant::now());
        let (t, gr) = key.clone();
        let h = ctx.run_later(wait, move |act, ctx| {
            act.ops.retry_timers.remove(&(t.clone(), gr.clone()));
            if let Some((g, _)) = act.group_mut(&t, &gr) {
                g.release_due(Instant::now());
            }
            act.pump(&t, &gr, ctx);
            act.arm_retry(&t, &gr, ctx);
        });
        self.ops.retry_timers.insert(key, (due, h));
    }

    fn cancel_retry_timer(&mut self, topic: &str, group: &str, ctx: &mut Context<Self>) {
        if let Some((_, h)) = self
            .ops
            .retry_timers
            .remove(&(topic.to_string(), group.to_string()))
        {
            ctx.cancel_future(h);
        }
    }

    /// Removes a consumer from its group (it left, or was kicked): its batches go back at once
    /// (not counted as failures); events. Whether it was in the group.
    pub(super) fn remove_consumer(
        &mut self,
        topic: &str,
        group: &str,
        consumer: ConsumerId,
        ctx: &mut Context<Self>,
    ) -> bool {
        self.forget_links(consumer);
        let Some((g, _)) = self.group_mut(topic, group) else {
            return false;
        };
        let present = g.has_consumer(consumer);
        let (batches, promoted) = g.leave(consumer);
        if present {
            tracing::info!(topic, group, %consumer, returned = batches.len(), "consumer left");
            self.emit(
                BrokerEvent::now(kind::CONSUMER_LEFT)
                    .topic(topic)
                    .group(group)
                    .consumer(consumer)
                    .count(batches.len() as u64),
            );
        }
        if let Some(p) = promoted {
            tracing::info!(topic, group, consumer = %p, "failover: standby promoted");
            self.emit(
                BrokerEvent::now(kind::CONSUMER_PROMOTED)
                    .topic(topic)
                    .group(group)
                    .consumer(p),
            );
        }
        for b in batches {
            self.fail_batch(topic, group, b, "consumer disconnected", false, ctx);
        }
        // A broadcast member's leaving may settle messages for the group.
        self.persist(topic, group);
        self.pump(topic, group, ctx);
        present
    }

    /// Ends a subscription with `error` and removes it from its group now (its batches go to
    /// the other consumers); the connection's `LeaveGroup` that follows finds nothing to do.
    fn kick(
        &mut self,
        topic: &str,
        group: &str,
        consumer: ConsumerId,
        error: WireError,
        ctx: &mut Context<Self>,
    ) {
        if let Some(k) = self.ops.kicks.get(&consumer) {
            k.do_send(KickConsumer { consumer, error });
        }
        self.remove_consumer(topic, group, consumer, ctx);
    }

    /// The stale timer: every `min(stale_after / 4, 1s)`.
    pub(super) fn start_stale_timer(&mut self, ctx: &mut Context<Self>) {
        let every = (self.cfg.stale_after / 4)
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10));
        ctx.run_interval(every, |act, ctx| act.check_stale(ctx));
    }

    /// Flags consumers stale (`consumer_stale`, once per episode) and disconnects those stale
    /// for `stale_disconnect_after`.
    fn check_stale(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let (after, disconnect) = (self.cfg.stale_after, self.cfg.stale_disconnect_after);
        let mut flagged = Vec::new();
        let mut kicks = Vec::new();
        for (topic, t) in self.topics.iter_mut() {
            for (name, g) in t.groups.iter_mut() {
                if g.consumer_count() == 0 {
                    continue;
                }
                for (c, idle, lag) in g.check_stale(now, after, t.head) {
                    flagged.push((topic.clone(), name.clone(), c, idle, lag));
                }
                if let Some(d) = disconnect {
                    for (c, idle, lag) in g.stale_consumers(now, d, t.head) {
                        kicks.push((topic.clone(), name.clone(), c, idle, lag));
                    }
                }
            }
        }
        for (topic, group, c, idle, lag) in flagged {
            tracing::warn!(%topic, %group, consumer = %c, idle_ms = idle, lag, "consumer stale");
            self.emit(
                BrokerEvent::now(kind::CONSUMER_STALE)
                    .topic(&topic)
                    .group(&group)
                    .consumer(c)
                    .count(idle)
                    .detail(format!("no ack for {idle} ms with lag {lag}")),
            );
        }
        for (topic, group, c, idle, lag) in kicks {
            self.disconnect_stale_consumer(&topic, &group, c, idle, lag, "automatically", ctx);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn disconnect_stale_consumer(
        &mut self,
        topic: &str,
        group: &str,
        c: ConsumerId,
        idle: u64,
        lag: u64,
        how: &str,
        ctx: &mut Context<Self>,
    ) {
        tracing::warn!(topic, group, consumer = %c, idle_ms = idle, lag, how, "stale consumer disconnected");
        let error = WireError::new(
            ErrorCode::StaleConsumer,
            format!("no ack for {idle} ms with lag {lag}: disconnected as stale ({how})"),
        );
        self.kick(topic, group, c, error, ctx);
        self.emit(
            BrokerEvent::now(kind::CONSUMER_DISCONNECTED)
                .topic(topic)
                .group(group)
                .consumer(c)
                .count(idle)
                .detail(format!(
                    "stale ({how}): no ack for {idle} ms with lag {lag}"
                )),
        );
    }

    /// Moves a group up to the topic's floor if it is below (retention removed messages it
    /// had not settled): persisted, an event, reset notices (sent by the next pump).
    pub(super) fn move_group_to_floor(&mut self, topic: &str, group: &str, floor_seq: u64) {
        let Some((g, _)) = self.group_mut(topic, group) else {
            return;
        };
        let Some(skipped) = g.move_to_floor(floor_seq) else {
            return;
        };
        tracing::warn!(
            topic,
            group,
            floor_seq,
            skipped,
            "group moved up to the topic's floor (retention)"
        );
        self.persist(topic, group);
        self.emit(
            BrokerEvent::now(kind::GROUP_MOVED_TO_FLOOR)
                .topic(topic)
                .group(group)
                .seq(floor_seq)
                .count(skipped),
        );
    }
}

impl Handler<SeekGroup> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<SeekReply, WireError>>;
    fn handle(&mut self, msg: SeekGroup, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let load = self.group_mut(&msg.topic, &msg.group).is_none().then(|| {
            self.store.load.send(LoadGroup {
                topic: msg.topic.clone(),
                group: msg.group.clone(),
            })
        });
        let at_ms = match msg.to {
            SeekTo::Seq(_) | SeekTo::Start => Some(0),
            SeekTo::TimeMs(t) => Some(t),
            SeekTo::End => None,
        };
        let seq_at = at_ms.map(|at_ms| {
            self.store.seq_at_time.send(SeqAtTime {
                topic: msg.topic.clone(),
                at_ms,
            })
        });
        Box::pin(
            async move {
                let loaded = match load {
                    None => None,
                    Some(f) => Some(f.await.map_err(unavailable)??),
                };
                let found = match seq_at {
                    None => None,
                    Some(f) => Some(f.await.map_err(unavailable)??),
                };
                Ok::<_, WireError>((loaded, found))
            }
            .into_actor(self)
            .then(move |res, act, ctx| {
                let r = res.and_then(|(loaded, found)| act.seek_now(&msg, loaded, found, ctx));
                async move {
                    let (reply, skipped, commit) = r?;
                    let c: Result<(), StoreError> = commit.await.map_err(unavailable)?;
                    c.map_err(|e| WireError::new(ErrorCode::StorageError, e.to_string()))?;
                    Ok::<_, WireError>((reply, skipped))
                }
                .into_actor(act)
                .map(|res, act, _| {
                    let (reply, skipped) = res?;
                    tracing::info!(topic = %reply.topic, group = %reply.group, next_seq = reply.next_seq, skipped, "group seeked");
                    act.emit(
                        BrokerEvent::now(kind::GROUP_SEEKED)
                            .topic(&reply.topic)
                            .group(&reply.group)
                            .seq(reply.next_seq)
                            .count(skipped),
                    );
                    Ok(reply)
                })
            }),
        )
    }
}

/// A seek's reply, the unsettled messages it skipped, and its durable commit.
type Seeked = (SeekReply, u64, actix::dev::RecipientRequest<CommitGroup>);

impl OrchestratorActor {
    /// Seeks a loaded (or just loaded) group: checks the target, moves the group, cancels the
    /// void batches' timers, sends its notices and whatever the consumers can take now.
    /// `found`: the store's seq for the time asked (for a seq or the start: the topic's floor).
    fn seek_now(
        &mut self,
        msg: &SeekGroup,
        loaded: Option<(Option<GroupRecord>, u64)>,
        found: Option<u64>,
        ctx: &mut Context<Self>,
    ) -> Result<Seeked, WireError> {
        let (topic, group) = (msg.topic.as_str(), msg.group.as_str());
        if let Some((rec, head)) = loaded {
            match rec {
                Some(r) => self.install_group(topic, group, r, head),
                None if self.group_mut(topic, group).is_none() => {
                    return Err(unknown_group(topic, group))
                }
                None => {}
            }
        }
        let Some((g, head)) = self.group_mut(topic, group) else {
            return Err(unknown_group(topic, group));
        };
        let end = head + 1;
        let next = match msg.to {
            SeekTo::Seq(n) => {
                let floor = found.unwrap_or(1).max(1);
                if n < floor || n > end {
                    return Err(WireError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "seq {n} is outside topic '{topic}': seek to {floor}..={end} (its floor to its head + 1)"
                        ),
                    ));
                }
                n
            }
            SeekTo::TimeMs(_) | SeekTo::Start => found.unwrap_or(end).max(1),
            SeekTo::End => end,
        };
        let moved = g.seek(next);
        let record = match g.take_dirty_record() {
            Some(r) => r,
            None => g.record(),
        };
        for b in &moved.voided {
            self.cancel_timer(*b, ctx);
        }
        self.cancel_retry_timer(topic, group, ctx);
        let commit = self.store.commit.send(CommitGroup {
            topic: topic.to_string(),
            group: group.to_string(),
            record,
        });
        self.pump(topic, group, ctx);
        let reply = SeekReply {
            topic: topic.to_string(),
            group: group.to_string(),
            next_seq: next,
            cancelled_batches: moved.voided.len() as u32,
        };
        Ok((reply, moved.skipped, commit))
    }
}

impl Handler<DeleteGroup> for OrchestratorActor {
    type Result = ResponseActFuture<Self, Result<GroupDeleted, WireError>>;
    fn handle(&mut self, msg: DeleteGroup, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let (topic, group) = (msg.topic, msg.group);
        if let Some((g, _)) = self.group_mut(&topic, &group) {
            let n = g.consumer_count();
            if n > 0 {
                let e = WireError::new(
                    ErrorCode::GroupBusy,
                    format!(
                        "group '{group}' of topic '{topic}' has {n} consumer(s): stop them first"
                    ),
                );
                return Box::pin(fut::ready(Err(e)));
            }
        }
        let dropped = self
            .topics
            .get_mut(&topic)
            .and_then(|t| t.groups.remove(&group));
        let was_loaded = dropped.is_some();
        if let Some(g) = dropped {
            for b in g.batch_ids() {
                self.cancel_timer(b, ctx);
            }
        }
        self.cancel_retry_timer(&topic, &group, ctx);
        let f = self.store.delete_group.send(DeleteGroupRecord {
            topic: topic.clone(),
            group: group.clone(),
        });
        Box::pin(
            async move {
                match f.await {
                    Ok(Ok(true)) => Ok(()),
                    Ok(Ok(false)) if was_loaded => Ok(()),
                    Ok(Ok(false)) => Err(unknown_group(&topic, &group)),
                    Ok(Err(e)) => Err(WireError::from(e)),
                    Err(e) => Err(unavailable(e)),
                }
                .map(|()| GroupDeleted { topic, group })
            }
            .into_actor(self)
            .map(|res, act, _| {
                if let Ok(d) = &res {
                    tracing::info!(topic = %d.topic, group = %d.group, "group deleted");
                    act.emit(
                        BrokerEvent::now(kind::GROUP_DELETED)
                            .topic(&d.topic)
                            .group(&d.group),
                    );
                }
                res
            }),
        )
    }
}

impl Handler<DisconnectStale> for OrchestratorActor {
    type Result = MessageResult<DisconnectStale>;
    fn handle(&mut self, msg: DisconnectStale, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let now = Instant::now();
        let mut found = Vec::new();
        for (topic, t) in self.topics.iter_mut() {
            for (name, g) in t.groups.iter_mut() {
                g.note_busy(now, t.head);
                for (c, idle, lag) in g.stale_consumers(now, msg.older_than, t.head) {
                    found.push((topic.clone(), name.clone(), c, idle, lag));
                }
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (topic, group, c, idle, lag) in found {
            self.disconnect_stale_consumer(&topic, &group, c, idle, lag, "by request", ctx);
            out.push(StaleConsumer {
                topic,
                group,
                consumer: c.to_string(),
                idle_ms: idle,
                lag,
            });
        }
        MessageResult(out)
    }
}

impl Handler<FloorMoved> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: FloorMoved, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        let groups: Vec<String> = self
            .topics
            .get(&msg.topic)
            .map(|t| t.groups.keys().cloned().collect())
            .unwrap_or_default();
        for g in groups {
            self.move_group_to_floor(&msg.topic, &g, msg.floor_seq);
            self.pump(&msg.topic, &g, ctx);
        }
    }
}

impl Handler<TopicRemoved> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, msg: TopicRemoved, ctx: &mut Context<Self>) {
        self.counters.handled += 1;
        self.topic_removals += 1;
        let Some(t) = self.topics.remove(&msg.topic) else {
            return;
        };
        let TopicState { head, groups } = t;
        let topic = msg.topic;
        for (name, mut g) in groups {
            for b in g.batch_ids() {
                self.cancel_timer(b, ctx);
            }
            self.cancel_retry_timer(&topic, &name, ctx);
            g.queue_reset("deleted", head + 1, 0);
            let notices = g.take_notices();
            for (consumer, n) in notices {
                if let (Some(r), Ok(data)) = (
                    self.ops.notices.get(&consumer),
                    sluice_protocol::encode(&StreamEvent::Reset(n)),
                ) {
                    r.do_send(StreamNotice { consumer, data });
                }
            }
            for c in g.consumer_ids() {
                if let Some(k) = self.ops.kicks.get(&c) {
                    k.do_send(KickConsumer {
                        consumer: c,
                        error: WireError::new(
                            ErrorCode::Deleted,
                            format!("topic '{topic}' was deleted"),
                        ),
                    });
                }
                self.forget_links(c);
                self.emit(
                    BrokerEvent::now(kind::CONSUMER_LEFT)
                        .topic(&topic)
                        .group(&name)
                        .consumer(c)
                        .detail("topic deleted"),
                );
            }
            tracing::info!(%topic, group = %name, "group dropped: topic deleted");
            self.emit(
                BrokerEvent::now(kind::GROUP_DELETED)
                    .topic(&topic)
                    .group(&name)
                    .detail("topic deleted"),
            );
        }
    }
}

#[cfg(test)]
mod tests;
