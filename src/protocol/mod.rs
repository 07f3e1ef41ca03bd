//! Sluice wire protocol, version 1: the MessagePack types carried in RSocket payloads, the route
//! names, the numeric error codes and the version check. Pure data and codec: no I/O, no actix,
//! no sled, so the SDK (and any other client) can depend on it alone.
//!
//! | module      | what it holds |
//! |-------------|---------------|
//! | [`version`] | `PROTOCOL_VERSION`, the `[MIN, CURRENT]` check done on SETUP |
//! | [`route`]   | route names carried in `message/x.rsocket.routing.v0` metadata |
//! | [`error`]   | [`ErrorCode`] (stable numbers) and the `"<code> <NAME>: <text>"` error text |
//! | [`codec`]   | `encode` / `decode` (MessagePack, structs as maps) |
//! | [`mpread`], [`mpwrite`] | hand-written MessagePack for the hot paths (same bytes as serde's) |
//! | [`setup`], [`publish`], [`subscribe`], [`ack`], [`admin`] | one file per request family |
//!
//! `docs/protocol.md` is the normative description of all of this for non-Rust clients.

pub mod ack;
pub mod admin;
pub mod codec;
pub mod error;
pub mod events;
pub mod manage;
pub mod mpread;
pub mod mpwrite;
pub mod publish;
pub mod route;
pub mod setup;
pub mod shared_str;
pub mod subscribe;
pub mod version;

pub use ack::{AckOutcome, AckReply, AckRequest, NackRequest, MAX_NACK_DELAY_MS};
pub use admin::{
    ActorStats, BrokerStats, ConnectionStats, ConsumerStats, FaultReply, FaultRequest, GroupStats,
    LimitStats, StatsRequest, SyncBucket, SyncStats, SYNC_BUCKETS_US,
};
pub use codec::{decode, encode, CodecError};
pub use error::{ErrorCode, WireError};
pub use events::{kind as event_kind, BrokerEvent, EventsRequest};
pub use manage::{
    Discard, DisconnectStaleReply, DisconnectStaleRequest, GroupDeleted, GroupList, GroupName,
    ListRequest, SeekReply, SeekRequest, SeekTo, StaleConsumer, TopicDeleted, TopicInfo, TopicList,
    TopicName, TopicRequest, TopicSettings,
};
pub use publish::{
    NewMessage, NewMessageRef, PublishReply, PublishRequest, PublishRequestRef, MAX_ID_LEN,
};
pub use setup::SetupRequest;
pub use shared_str::SharedStr;
pub use subscribe::{
    dlq_topic, parse_backoff, validate_name, Batch, DeliveredMessage, GroupMode, ResetNotice,
    StatusUpdate, StreamEvent, SubscribeRequest, MAX_BACKOFF_STEPS, MAX_BATCH_SIZE, MAX_NAME_LEN,
    MAX_WINDOW,
};
pub use version::{check_version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// MIME type of every payload's data: MessagePack, structs encoded as maps keyed by field name.
pub const DATA_MIME_TYPE: &str = "application/x-msgpack";
/// MIME type of every payload's metadata: RSocket composite metadata.
pub const METADATA_MIME_TYPE: &str = "message/x.rsocket.composite-metadata.v0";
/// MIME type of the routing entry inside the composite metadata.
pub const ROUTING_MIME_TYPE: &str = "message/x.rsocket.routing.v0";
/// Header that marks a message as a deletion of its key in the keyed state.
pub const TOMBSTONE_HEADER: &str = "tombstone";
/// Default maximum payload size of one message (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Number of priority lanes: priorities above `MAX_PRIORITY` are refused.
pub const MAX_PRIORITY: u8 = 9;
