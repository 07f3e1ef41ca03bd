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

/// Every route of protocol v1, for documentation and tests.
pub const ALL: &[&str] = &[PUBLISH, SUBSCRIBE, ACK, NACK, ADMIN_STATS, ADMIN_FAULT];
