//! Every message the actors send each other, in one place, and the bundles of `Recipient`s
//! through which they reach each other (`StoreLinks`, `OrchestratorLinks`, `ConnectionLinks`,
//! `RegistryLinks`). No actor module imports another: each holds recipients of what it sends,
//! built by `crate::server` from the concrete addresses (as actix's chat example does), so a
//! test can plug in a probe for any of them. Who sends what to whom: `super` (mod.rs).

use super::ConsumerId;
use crate::store::record::StoredMessage;
use crate::store::{Appended, GroupRecord, ReadResult, StoreError};
use actix::prelude::*;
use bytes::Bytes;
use sluice_protocol::{
    AckReply, ActorStats, BrokerStats, ConnectionStats, GroupDeleted, GroupMode, GroupStats,
    NewMessage, SeekReply, SeekTo, StaleConsumer, SyncStats, TopicDeleted, TopicInfo,
    TopicSettings, WireError,
};
use std::collections::BTreeMap;
use std::sync::Arc;

// ---- every actor ----

/// Stops the receiving actor so its supervisor restarts it, or makes it panic in this handler
/// as a bug would (`admin.fault`, tests only).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct InjectFault {
    /// What to do.
    pub kind: FaultKind,
}

/// Asks an actor for its counters.
#[derive(Message, Debug)]
#[rtype(result = "ActorStats")]
pub struct GetActorStats;

/// What `admin.fault` does to an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Stop it (its supervisor restarts it).
    Stop,
    /// Panic in its handler, as a bug would.
    Panic,
    /// (store) Every sync waits this long first, as on a stalled disk.
    StallSyncs(std::time::Duration),
}

impl FaultKind {
    /// From `admin.fault`'s `kind` and `duration`.
    pub fn parse(kind: Option<&str>, duration: Option<&str>) -> Result<FaultKind, String> {
        match kind.unwrap_or("stop") {
            "stop" => Ok(FaultKind::Stop),
            "panic" => Ok(FaultKind::Panic),
            "stall-syncs" => {
                let d = duration.ok_or("stall-syncs needs a duration")?;
                let d = humantime::parse_duration(d).map_err(|e| format!("duration '{d}': {e}"))?;
                if d > std::time::Duration::from_secs(60) {
                    return Err("stall-syncs lasts at most 60s".into());
                }
                Ok(FaultKind::StallSyncs(d))
            }
            other => Err(format!(
                "unknown fault kind '{other}' (stop, panic or stall-syncs)"
            )),
        }
    }
}

// ---- to the store ----

/// Announces durable messages to the orchestrator that owns the topic.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MessagesAppended {
    /// Topic.
    pub topic: String,
    /// The messages, with their seqs.
    pub messages: Arc<Vec<Arc<StoredMessage>>>,
}

/// Appends messages to a topic (creating it, unless `auto_create_topics` is off and this is not
/// a dead-letter append: `StoreError::UnknownTopic`). A message whose id was stored within the topic's
/// `dedup_window` (or earlier in the same request) is not stored again: the result is
/// `duplicate` and gives each message's seq. Result once durable under the fsync policy (a
/// duplicate's once its original is).
#[derive(Message, Debug)]
#[rtype(result = "Result<Appended, StoreError>")]
pub struct AppendMessages {
    /// Topic.
    pub topic: String,
    /// Messages, in order.
    pub messages: Vec<NewMessage>,
    /// The orchestrator's dead-letter append: creates the dead-letter topic whatever
    /// `auto_create_topics` says (a client's publish never sets it, whatever the topic's name).
    pub dead_letter: bool,
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

/// Asks the store how long its syncs took.
#[derive(Message, Debug)]
#[rtype(result = "SyncStats")]
pub struct GetSyncStats;

/// What the orchestrators and the registry reach of the store.
#[derive(Clone)]
pub struct StoreLinks {
    /// `AppendMessages` (dead letters; publishes come from connections).
    pub append: Recipient<AppendMessages>,
    /// `CommitGroup`.
    pub commit: Recipient<CommitGroup>,
    /// `ReadRange`.
    pub read: Recipient<ReadRange>,
    /// `LoadGroup`.
    pub load: Recipient<LoadGroup>,
    /// `ListGroups`.
    pub list_groups: Recipient<ListGroups>,
    /// `GetSyncStats`.
    pub sync_stats: Recipient<GetSyncStats>,
    /// `GetActorStats`.
    pub actor_stats: Recipient<GetActorStats>,
    /// `InjectFault`.
    pub fault: Recipient<InjectFault>,
    /// `SeqAtTime`.
    pub seq_at_time: Recipient<SeqAtTime>,
    /// `DeleteGroupRecord`.
    pub delete_group: Recipient<DeleteGroupRecord>,
    /// `GetTopicSettings`.
    pub topic_settings: Recipient<GetTopicSettings>,
}

/// The settings in force for `topic` (its overrides over the broker's defaults; the defaults
/// for a topic that does not exist yet): the orchestrator takes a new group's default
/// redelivery schedule from it.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<TopicSettings, StoreError>")]
pub struct GetTopicSettings {
    /// Topic.
    pub topic: String,
}

// ---- to the store: topics as an operator manages them (issue 11) ----

/// `topic.create` (`alter: false`: `TOPIC_EXISTS` if it exists) or `topic.alter` (`alter: true`:
/// `UNKNOWN_TOPIC` if it does not). Settings are validated by the store.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<TopicInfo, WireError>")]
pub struct CreateTopic {
    /// Topic (a valid name).
    pub topic: String,
    /// Settings to set; absent fields keep their value (alter) or the default (create).
    pub settings: TopicSettings,
    /// Alter an existing topic instead of creating one.
    pub alter: bool,
}

/// `topic.info` (one topic: `UNKNOWN_TOPIC` if missing) or `topic.list` (`None`: every topic).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Vec<TopicInfo>, WireError>")]
pub struct GetTopicInfo {
    /// One topic, or all.
    pub topic: Option<String>,
}

/// `topic.delete`: the topic's files, settings and groups go; the orchestrators are told
/// (`TopicRemoved`) and end the topic's subscriptions with `DELETED`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<TopicDeleted, WireError>")]
pub struct DeleteTopic {
    /// Topic.
    pub topic: String,
}

/// The first seq of `topic` stored at or after `at_ms` (head + 1 if none); for `group.seek`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<u64, StoreError>")]
pub struct SeqAtTime {
    /// Topic.
    pub topic: String,
    /// Ms since the epoch.
    pub at_ms: u64,
}

/// Removes a group's durable record (durable before the reply). `false`: there was none.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct DeleteGroupRecord {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// What the store tells the orchestrators besides appends: set once at start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetTopicListeners(pub Vec<TopicListener>);

/// One orchestrator shard's recipients of the store's topic notices.
#[derive(Clone)]
pub struct TopicListener {
    /// `FloorMoved`.
    pub floor_moved: Recipient<FloorMoved>,
    /// `TopicRemoved`.
    pub removed: Recipient<TopicRemoved>,
}

// ---- to an orchestrator ----

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
    /// Redelivery schedule asked for by the subscribe (ms per step; for a new group).
    pub backoff_ms: Option<Vec<u64>>,
    /// Where `KickConsumer` for this subscription goes.
    pub kick: Recipient<KickConsumer>,
    /// Where `StreamNotice` for this subscription goes.
    pub notice: Recipient<StreamNotice>,
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

/// Acknowledge a batch (or some of its seqs). Only messages of a batch in flight to connection
/// `conn` are settled. Replied once the cursor is durable (also when every message was acked
/// already: that reply waits for the same durability as the ack it repeats).
#[derive(Message, Debug)]
#[rtype(result = "Result<AckReply, WireError>")]
pub struct AckBatch {
    /// The connection acking.
    pub conn: u64,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Batch id.
    pub batch_id: u64,
    /// Seqs (None: the whole batch).
    pub seqs: Option<Vec<u64>>,
}

/// Negatively acknowledge a batch (or some of its seqs) in flight to connection `conn`:
/// redeliver at once.
#[derive(Message, Debug)]
#[rtype(result = "Result<AckReply, WireError>")]
pub struct NackBatch {
    /// The connection nacking.
    pub conn: u64,
    /// Release: no failure counted, `attempt` not raised.
    pub release: bool,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Batch id.
    pub batch_id: u64,
    /// Seqs (None: the whole batch).
    pub seqs: Option<Vec<u64>>,
    /// Redeliver no sooner than this (None: at once, or by the group's schedule).
    pub delay: Option<std::time::Duration>,
}

/// Stats of every group this orchestrator has loaded.
#[derive(Message, Debug)]
#[rtype(result = "Vec<GroupStats>")]
pub struct GetGroupStats;

/// What connections and the registry reach of one orchestrator shard.
#[derive(Clone)]
pub struct OrchestratorLinks {
    /// `JoinGroup`.
    pub join: Recipient<JoinGroup>,
    /// `LeaveGroup`.
    pub leave: Recipient<LeaveGroup>,
    /// `GrantCredits`.
    pub credits: Recipient<GrantCredits>,
    /// `AckBatch`.
    pub ack: Recipient<AckBatch>,
    /// `NackBatch`.
    pub nack: Recipient<NackBatch>,
    /// `GetGroupStats`.
    pub group_stats: Recipient<GetGroupStats>,
    /// `GetActorStats`.
    pub actor_stats: Recipient<GetActorStats>,
    /// `InjectFault`.
    pub fault: Recipient<InjectFault>,
    /// `SeekGroup`.
    pub seek: Recipient<SeekGroup>,
    /// `DeleteGroup`.
    pub delete_group: Recipient<DeleteGroup>,
    /// `DisconnectStale`.
    pub disconnect_stale: Recipient<DisconnectStale>,
}

// ---- to an orchestrator: group operations (issue 11) ----

/// Retention removed messages of `topic` below `floor_seq` (durably): every group below it is
/// moved up to it, counts what it skipped and tells its consumers (`StreamEvent::Reset`).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct FloorMoved {
    /// Topic.
    pub topic: String,
    /// Lowest retained seq now.
    pub floor_seq: u64,
}

/// The topic was deleted: its groups are dropped and their subscriptions end with `DELETED`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TopicRemoved {
    /// Topic.
    pub topic: String,
}

/// `group.seek`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<SeekReply, WireError>")]
pub struct SeekGroup {
    /// Topic.
    pub topic: String,
    /// Group (must exist).
    pub group: String,
    /// Where to.
    pub to: SeekTo,
}

/// `group.delete` (`GROUP_BUSY` while it has consumers).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<GroupDeleted, WireError>")]
pub struct DeleteGroup {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
}

/// Disconnects every consumer of this shard with lag and no ack for `older_than`; their
/// batches go back to their groups. Returns them.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<StaleConsumer>")]
pub struct DisconnectStale {
    /// Idle at least this long.
    pub older_than: std::time::Duration,
}

// ---- to a connection: from the orchestrators (issue 11) ----

/// Ends one subscription with `error` (its stream gets an ERROR frame; its batches go back to
/// the group, as on a disconnect).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct KickConsumer {
    /// Which subscription.
    pub consumer: ConsumerId,
    /// Sent on its stream.
    pub error: WireError,
}

/// An encoded `StreamEvent` other than a batch (e.g. `reset`) for one subscription's stream.
/// The orchestrator sends it only with a credit of the consumer's (it took one for it).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StreamNotice {
    /// Which subscription.
    pub consumer: ConsumerId,
    /// Encoded `StreamEvent`.
    pub data: Bytes,
}

// ---- to the registry ----

/// A connection finished its SETUP.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterConnection {
    /// Connection id.
    pub conn_id: u64,
    /// Its actor.
    pub links: ConnectionLinks,
}

/// A connection ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ConnectionClosed {
    /// Connection id.
    pub conn_id: u64,
}

/// A subscription joined a group.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SubscriptionOpened {
    /// Connection id.
    pub conn_id: u64,
    /// Orchestrator shard serving it.
    pub shard: usize,
}

/// An orchestrator (re)started: every subscription of its shard must join again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct OrchestratorStarted {
    /// Shard.
    pub shard: usize,
}

/// Gathers `admin.stats`.
#[derive(Message, Debug)]
#[rtype(result = "Result<BrokerStats, WireError>")]
pub struct GetStats;

/// Stops the named actor (`admin.fault`).
#[derive(Message, Debug)]
#[rtype(result = "Result<String, WireError>")]
pub struct InjectFaultByName {
    /// Actor name as shown in stats.
    pub actor: String,
    /// What to do to it.
    pub kind: FaultKind,
}

/// The addresses the registry reaches.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPeers {
    /// Store.
    pub store: StoreLinks,
    /// Orchestrators by shard.
    pub orchestrators: Vec<OrchestratorLinks>,
}

/// What connections and orchestrators reach of the registry.
#[derive(Clone)]
pub struct RegistryLinks {
    /// `RegisterConnection`.
    pub register: Recipient<RegisterConnection>,
    /// `ConnectionClosed`.
    pub closed: Recipient<ConnectionClosed>,
    /// `SubscriptionOpened`.
    pub subscription_opened: Recipient<SubscriptionOpened>,
    /// `GetStats`.
    pub stats: Recipient<GetStats>,
    /// `InjectFaultByName`.
    pub fault_by_name: Recipient<InjectFaultByName>,
    /// `ListGroupStats`.
    pub list_groups: Recipient<ListGroupStats>,
    /// `DisconnectStaleAll`.
    pub disconnect_stale: Recipient<DisconnectStaleAll>,
}

/// `group.list` / `group.info`: groups loaded in an orchestrator (with their consumers) and
/// groups only stored (from their records), optionally of one topic / one group.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<Vec<GroupStats>, WireError>")]
pub struct ListGroupStats {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this group (with `topic`).
    pub group: Option<String>,
}

/// `admin.disconnect_stale`: `DisconnectStale` on every orchestrator, answers merged.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Vec<StaleConsumer>")]
pub struct DisconnectStaleAll {
    /// Idle at least this long.
    pub older_than: std::time::Duration,
}

/// What connections reach of the store for `topic.*` routes.
#[derive(Clone)]
pub struct TopicAdminLinks {
    /// `CreateTopic`.
    pub create: Recipient<CreateTopic>,
    /// `GetTopicInfo`.
    pub info: Recipient<GetTopicInfo>,
    /// `DeleteTopic`.
    pub delete: Recipient<DeleteTopic>,
}

// ---- to a connection ----

/// The registry asks the connection to rejoin every subscription served by `shard`.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Rejoin {
    /// Shard that restarted.
    pub shard: usize,
}

/// Stats of this connection.
#[derive(Message, Debug)]
#[rtype(result = "(ActorStats, ConnectionStats)")]
pub struct GetConnectionStats;

/// What the registry reaches of one connection.
#[derive(Clone)]
pub struct ConnectionLinks {
    /// `Rejoin`.
    pub rejoin: Recipient<Rejoin>,
    /// `GetConnectionStats`.
    pub stats: Recipient<GetConnectionStats>,
    /// `InjectFault`.
    pub fault: Recipient<InjectFault>,
}
