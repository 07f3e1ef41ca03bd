//! StoreActor: the only writer of the sled database, on its own arbiter thread.
//!
//! Group commit: `AppendMessages` and `CommitGroup` only queue their writes and schedule one
//! `Commit`; every message already in the mailbox is handled before it, so one commit (one sled
//! flush + fsync under `fsync = "always"`) covers all the publishes and acks that arrived while
//! the previous one was in progress. Replies go out after the commit; new messages are announced
//! to the orchestrators only once durable, so nothing is delivered that could still be lost.

use super::{now_ms, ActorCounters, GetActorStats, InjectFault};
use crate::config::FsyncPolicy;
use crate::store::record::StoredMessage;
use crate::store::{GroupRecord, ReadResult, Storage, StoreError};
use actix::prelude::*;
use sluice_protocol::NewMessage;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Announces durable messages to the orchestrator that owns the topic.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MessagesAppended {
    /// Topic.
    pub topic: String,
    /// The messages, with their seqs.
    pub messages: Arc<Vec<Arc<StoredMessage>>>,
}

/// Appends messages to a topic (creating it). Result once durable under the fsync policy.
#[derive(Message, Debug)]
#[rtype(result = "Result<(u64, u64), StoreError>")]
pub struct AppendMessages {
    /// Topic.
    pub topic: String,
    /// Messages, in order.
    pub messages: Vec<NewMessage>,
}

/// Persists a group record. Result once durable under the fsync policy.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), StoreError>")]
pub struct CommitGroup {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// The whole record (later commits of the same group supersede earlier ones).
    pub record: GroupRecord,
}

/// Reads a range of a topic's log.
#[derive(Message, Debug)]
#[rtype(result = "Result<ReadResult, StoreError>")]
pub struct ReadRange {
    /// Topic.
    pub topic: String,
    /// First seq wanted.
    pub from: u64,
    /// Most messages.
    pub max: usize,
    /// Most payload bytes (at least one message is returned).
    pub max_bytes: usize,
}

/// Loads a group record and the topic's head seq.
#[derive(Message, Debug)]
#[rtype(result = "Result<(Option<GroupRecord>, u64), StoreError>")]
pub struct LoadGroup {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// Every stored group with its topic's head seq (for stats).
#[derive(Message, Debug)]
#[rtype(result = "Result<Vec<(String, String, GroupRecord, u64)>, StoreError>")]
pub struct ListGroups;

/// Sets where `MessagesAppended` goes: one recipient per orchestrator shard.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetAppendListeners(pub Vec<Recipient<MessagesAppended>>);

#[derive(Message)]
#[rtype(result = "()")]
struct Commit;

#[derive(Message)]
#[rtype(result = "()")]
struct PeriodicSync;

type AppendReply = oneshot::Sender<Result<(u64, u64), StoreError>>;
type GroupReply = oneshot::Sender<Result<(), StoreError>>;

/// The store actor.
pub struct StoreActor {
    storage: Storage,
    fsync: FsyncPolicy,
    listeners: Vec<Recipient<MessagesAppended>>,
    pending_appends: Vec<(String, Vec<StoredMessage>, AppendReply)>,
    pending_groups: HashMap<(String, String), (GroupRecord, Vec<GroupReply>)>,
    commit_scheduled: bool,
    dirty: bool,
    counters: ActorCounters,
    commits: u64,
}

impl StoreActor {
    /// A store actor over an opened storage.
    pub fn new(storage: Storage, fsync: FsyncPolicy) -> Self {
        StoreActor {
            storage,
            fsync,
            listeners: Vec::new(),
            pending_appends: Vec::new(),
            pending_groups: HashMap::new(),
            commit_scheduled: false,
            dirty: false,
            counters: ActorCounters::default(),
            commits: 0,
        }
    }

    fn schedule_commit(&mut self, ctx: &mut Context<Self>) {
        if !self.commit_scheduled {
            self.commit_scheduled = true;
            ctx.notify(Commit);
        }
    }

    fn commit(&mut self) {
        self.commit_scheduled = false;
        let appends = std::mem::take(&mut self.pending_appends);
        let groups = std::mem::take(&mut self.pending_groups);
        if appends.is_empty() && groups.is_empty() {
            return;
        }
        self.commits += 1;
        let mut results = Vec::with_capacity(appends.len());
        for (topic, mut msgs, tx) in appends {
            match self.storage.append(&topic, &msgs) {
                Ok(first) => {
                    for (i, m) in msgs.iter_mut().enumerate() {
                        m.seq = first + i as u64;
                    }
                    results.push((topic, Ok(msgs), tx));
                }
                Err(e) => results.push((topic, Err(e), tx)),
            }
        }
        let mut group_results = Vec::with_capacity(groups.len());
        for ((topic, group), (rec, txs)) in groups {
            let r = self.storage.put_group(&topic, &group, &rec);
            group_results.push((r, txs));
        }
        let synced = match self.fsync {
            FsyncPolicy::Always => self.storage.sync(),
            _ => {
                self.dirty = true;
                Ok(())
            }
        };
        if let Err(e) = &synced {
            tracing::error!(error = %e, "commit failed to sync: failing every request in it");
        }
        for (topic, res, tx) in results {
            match (res, &synced) {
                (Ok(msgs), Ok(())) => {
                    let first = msgs.first().map(|m| m.seq).unwrap_or(0);
                    let last = msgs.last().map(|m| m.seq).unwrap_or(0);
                    let _ = tx.send(Ok((first, last)));
                    self.announce(topic, msgs);
                }
                (Err(e), _) => {
                    let _ = tx.send(Err(e));
                }
                (Ok(_), Err(e)) => {
                    let _ = tx.send(Err(StoreError::Io(std::io::Error::other(e.to_string()))));
                }
            }
        }
        for (r, txs) in group_results {
            for tx in txs {
                let r2 = match (&r, &synced) {
                    (Ok(()), Ok(())) => Ok(()),
                    (Err(e), _) | (_, Err(e)) => {
                        Err(StoreError::Io(std::io::Error::other(e.to_string())))
                    }
                };
                let _ = tx.send(r2);
            }
        }
    }

    fn announce(&self, topic: String, msgs: Vec<StoredMessage>) {
        if self.listeners.is_empty() {
            return;
        }
        let shard = super::shard_for(&topic, self.listeners.len());
        let messages = Arc::new(msgs.into_iter().map(Arc::new).collect());
        self.listeners[shard].do_send(MessagesAppended { topic, messages });
    }
}

impl Actor for StoreActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.counters.started_at = std::time::Instant::now();
        if let FsyncPolicy::Interval(d) = self.fsync {
            ctx.run_interval(d, |_, ctx| ctx.notify(PeriodicSync));
        }
        tracing::info!(fsync = %self.fsync, "store started");
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        // Whatever is queued is committed before the actor stops: no reply is lost.
        self.commit();
        Running::Stop
    }
}

impl Supervised for StoreActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.counters.restarts += 1;
        self.commit_scheduled = false;
        tracing::warn!(
            restarts = self.counters.restarts,
            "store actor restarting (the sled database stays open)"
        );
    }
}

impl Handler<AppendMessages> for StoreActor {
    type Result = ResponseFuture<Result<(u64, u64), StoreError>>;

    fn handle(&mut self, msg: AppendMessages, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let ts = now_ms();
        let stored = msg
            .messages
            .into_iter()
            .map(|m| StoredMessage {
                seq: 0,
                timestamp_ms: ts,
                key: m.key,
                headers: m.headers,
                priority: m.priority,
                payload: m.payload,
            })
            .collect::<Vec<_>>();
        let (tx, rx) = oneshot::channel();
        if stored.is_empty() {
            let last = self.storage.last_seq(&msg.topic);
            return Box::pin(async move { Ok((last + 1, last)) });
        }
        self.pending_appends.push((msg.topic, stored, tx));
        self.schedule_commit(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Unavailable)) })
    }
}

impl Handler<CommitGroup> for StoreActor {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, msg: CommitGroup, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let (tx, rx) = oneshot::channel();
        let entry = self
            .pending_groups
            .entry((msg.topic, msg.group))
            .or_insert_with(|| (msg.record.clone(), Vec::new()));
        entry.0 = msg.record;
        entry.1.push(tx);
        self.schedule_commit(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Unavailable)) })
    }
}

impl Handler<Commit> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: Commit, _: &mut Context<Self>) {
        self.commit();
    }
}

impl Handler<PeriodicSync> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: PeriodicSync, _: &mut Context<Self>) {
        if self.dirty {
            self.dirty = false;
            if let Err(e) = self.storage.sync() {
                tracing::error!(error = %e, "periodic fsync failed");
            }
        }
    }
}

impl Handler<ReadRange> for StoreActor {
    type Result = Result<ReadResult, StoreError>;
    fn handle(&mut self, msg: ReadRange, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        self.storage
            .read(&msg.topic, msg.from, msg.max, msg.max_bytes)
    }
}

impl Handler<LoadGroup> for StoreActor {
    type Result = Result<(Option<GroupRecord>, u64), StoreError>;
    fn handle(&mut self, msg: LoadGroup, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        // A group record still waiting for its commit is the newest truth.
        if let Some((rec, _)) = self
            .pending_groups
            .get(&(msg.topic.clone(), msg.group.clone()))
        {
            return Ok((Some(rec.clone()), self.storage.last_seq(&msg.topic)));
        }
        Ok((
            self.storage.group(&msg.topic, &msg.group)?,
            self.storage.last_seq(&msg.topic),
        ))
    }
}

impl Handler<ListGroups> for StoreActor {
    type Result = Result<Vec<(String, String, GroupRecord, u64)>, StoreError>;
    fn handle(&mut self, _: ListGroups, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        Ok(self
            .storage
            .all_groups()?
            .into_iter()
            .map(|(t, g, r)| {
                let head = self.storage.last_seq(&t);
                (t, g, r, head)
            })
            .collect())
    }
}

impl Handler<SetAppendListeners> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: SetAppendListeners, _: &mut Context<Self>) {
        self.listeners = msg.0;
    }
}

impl Handler<GetActorStats> for StoreActor {
    type Result = MessageResult<GetActorStats>;
    fn handle(&mut self, _: GetActorStats, _: &mut Context<Self>) -> Self::Result {
        let backlog = (self.pending_appends.len() + self.pending_groups.len()) as u64;
        MessageResult(self.counters.stats("store", "store", Some(backlog)))
    }
}

impl Handler<InjectFault> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: InjectFault, ctx: &mut Context<Self>) {
        tracing::warn!("fault injected: stopping the store actor");
        ctx.stop();
    }
}
