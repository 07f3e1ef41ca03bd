//! Client SDK for the Sluice broker.
//!
//! | module | what it holds |
//! |---|---|
//! | [`client`] | [`Client`]: one RSocket connection (SETUP, routed MessagePack requests, timeouts, close detection) |
//! | [`producer`] | [`Producer`]: `publish` with automatic batching of concurrent calls, message ids and resends after a dropped connection |
//! | [`consumer`] | [`Consumer`]: subscribe, messages one by one, per-batch acks, auto-reconnect |
//! | [`admin`] | [`Admin`]: stats, topics, groups, stale consumers, lifecycle events, `admin.fault` |
//! | [`error`] | [`SdkError`] and the mapping of broker errors to [`ErrorCode`]s |
//!
//! Built on rsocket_rust's client and TCP transport; needs a tokio runtime.
//!
//! ```no_run
//! use sluice_sdk::{ClientConfig, Consumer, ConsumerConfig, Producer};
//!
//! # async fn demo() -> Result<(), sluice_sdk::SdkError> {
//! let config = ClientConfig::new("127.0.0.1:7070");
//! let producer = Producer::connect(config.clone()).await?;
//! let seq = producer.send("orders", "hello").await?;
//!
//! let mut consumer = Consumer::subscribe(ConsumerConfig::new(config, "orders", "billing")).await?;
//! while let Some(received) = consumer.next().await {
//!     let received = received?;
//!     println!("{} {:?}", received.seq(), received.payload());
//!     consumer.ack(&received)?;
//! #   if received.seq() >= seq { break; }
//! }
//! consumer.flush_acks().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod admin;
pub mod client;
pub mod consumer;
pub mod error;
pub mod producer;

pub use admin::{Admin, EventStream};
pub use client::{Client, ClientConfig, DEFAULT_ADDR};
pub use consumer::{Consumer, ConsumerConfig, Received};
pub use error::{parse_broker_error, Result, SdkError};
pub use producer::{Producer, ProducerOptions};

/// The wire types, re-exported.
pub use sluice_protocol as protocol;
pub use sluice_protocol::{
    BrokerEvent, BrokerStats, DeliveredMessage, ErrorCode, FaultReply, GroupMode, NewMessage,
    PublishReply, ResetNotice, SeekTo, SharedStr, StatusUpdate, SyncStats, TopicInfo,
    TopicSettings, WireError,
};

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn handles_and_futures_can_cross_tasks() {
        assert_send_sync::<crate::Client>();
        assert_send_sync::<crate::Producer>();
        assert_send_sync::<crate::Admin>();
        assert_send_sync::<crate::Consumer>();
        assert_send_sync::<crate::Received>();
        assert_send_sync::<crate::SdkError>();

        async fn consume(mut c: crate::Consumer) {
            let _ = c.next().await;
            let _ = c.flush_acks().await;
        }
        async fn produce(p: crate::Producer, a: crate::Admin) {
            let _ = p.send("t", "x").await;
            let _ = a.stats().await;
        }
        fn check(c: crate::Consumer, p: crate::Producer, a: crate::Admin) {
            assert_send(&consume(c));
            assert_send(&produce(p, a));
        }
        let _ = check;
    }
}
