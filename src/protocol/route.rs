//! Route names. Each request carries exactly one route tag in routing metadata
//! (`message/x.rsocket.routing.v0`) inside composite metadata.

/// request-response: [`crate::PublishRequest`] → [`crate::PublishReply`], sent once durable.
pub const PUBLISH: &str = "publish";
/// request-stream: [`crate::SubscribeRequest`] → stream of [`crate::StreamEvent`].
pub const SUBSCRIBE: &str = "subscribe";
/// request-response or fire-and-forget: [`crate::AckRequest`] → [`crate::AckReply`].
pub const ACK: &str = "ack";
/// request-response or fire-and-forget: [`crate::NackRequest`] → [`crate::AckReply`].
pub const NACK: &str = "nack";
/// request-response: [`crate::StatsRequest`] → [`crate::BrokerStats`].
pub const ADMIN_STATS: &str = "admin.stats";
/// request-response: [`crate::FaultRequest`] → [`crate::FaultReply`]; only with
/// `--enable-fault-injection`.
pub const ADMIN_FAULT: &str = "admin.fault";

/// request-stream: [`crate::EventsRequest`] → stream of [`crate::BrokerEvent`].
pub const ADMIN_EVENTS: &str = "admin.events";
/// request-response: [`crate::DisconnectStaleRequest`] → [`crate::DisconnectStaleReply`].
pub const ADMIN_DISCONNECT_STALE: &str = "admin.disconnect_stale";
/// request-response: [`crate::TopicRequest`] → [`crate::TopicInfo`] (`TOPIC_EXISTS` if it
/// exists).
pub const TOPIC_CREATE: &str = "topic.create";
/// request-response: [`crate::TopicRequest`] → [`crate::TopicInfo`] (`UNKNOWN_TOPIC` if
/// missing).
pub const TOPIC_ALTER: &str = "topic.alter";
/// request-response: [`crate::TopicName`] → [`crate::TopicInfo`].
pub const TOPIC_INFO: &str = "topic.info";
/// request-response: [`crate::ListRequest`] → [`crate::TopicList`].
pub const TOPIC_LIST: &str = "topic.list";
/// request-response: [`crate::TopicName`] → [`crate::TopicDeleted`].
pub const TOPIC_DELETE: &str = "topic.delete";
/// request-response: [`crate::ListRequest`] → [`crate::GroupList`].
pub const GROUP_LIST: &str = "group.list";
/// request-response: [`crate::GroupName`] → [`crate::GroupStats`].
pub const GROUP_INFO: &str = "group.info";
/// request-response: [`crate::SeekRequest`] → [`crate::SeekReply`].
pub const GROUP_SEEK: &str = "group.seek";
/// request-response: [`crate::GroupName`] → [`crate::GroupDeleted`] (`GROUP_BUSY` while it
/// has consumers).
pub const GROUP_DELETE: &str = "group.delete";

/// Every route of protocol v1, for documentation and tests.
pub const ALL: &[&str] = &[
    PUBLISH,
    SUBSCRIBE,
    ACK,
    NACK,
    ADMIN_STATS,
    ADMIN_FAULT,
    ADMIN_EVENTS,
    ADMIN_DISCONNECT_STALE,
    TOPIC_CREATE,
    TOPIC_ALTER,
    TOPIC_INFO,
    TOPIC_LIST,
    TOPIC_DELETE,
    GROUP_LIST,
    GROUP_INFO,
    GROUP_SEEK,
    GROUP_DELETE,
];
