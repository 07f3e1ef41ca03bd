//! `subscribe`: a request-stream that yields batches (and, later, status/reset events).

use crate::publish::serde_bytes_compat;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// How a group spreads messages over its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// One consumer; a second is refused.
    Exclusive,
    /// One active consumer, others standby, promoted on disconnect.
    Failover,
    /// Batches spread over all consumers.
    #[default]
    Shared,
    /// Same key → same consumer while it stays connected.
    KeyShared,
    /// Every consumer receives and acks every message on its own.
    Broadcast,
}

impl GroupMode {
    /// The wire / CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupMode::Exclusive => "exclusive",
            GroupMode::Failover => "failover",
            GroupMode::Shared => "shared",
            GroupMode::KeyShared => "key_shared",
            GroupMode::Broadcast => "broadcast",
        }
    }
}

impl fmt::Display for GroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace('-', "_").as_str() {
            "exclusive" => Ok(GroupMode::Exclusive),
            "failover" => Ok(GroupMode::Failover),
            "shared" => Ok(GroupMode::Shared),
            "key_shared" => Ok(GroupMode::KeyShared),
            "broadcast" => Ok(GroupMode::Broadcast),
            other => Err(format!(
                "unknown mode '{other}' (expected exclusive, failover, shared, key_shared or broadcast)"
            )),
        }
    }
}

/// Data of a `subscribe` request-stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// Topic to consume.
    pub topic: String,
    /// Group (durable cursor). Created on first subscribe with this mode and these filters.
    pub group: String,
    /// Group mode; must match the group's mode if it exists.
    #[serde(default)]
    pub mode: GroupMode,
    /// Header filters (exact match, all must hold); must match the group's if it exists.
    #[serde(default)]
    pub filters: BTreeMap<String, String>,
    /// Most unacked batches this consumer may hold (default: broker's, 4).
    #[serde(default)]
    pub window: Option<u32>,
    /// Most messages per batch (default and maximum: broker's batch size, 16).
    #[serde(default)]
    pub batch_size: Option<u32>,
}

/// A message as delivered to a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredMessage {
    /// Per-topic sequence number, from 1.
    pub seq: u64,
    /// When the broker stored it, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Key, if the producer set one.
    #[serde(default)]
    pub key: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Priority lane.
    #[serde(default)]
    pub priority: u8,
    /// 1 on first delivery, 2 on the first redelivery, ...
    pub attempt: u32,
    /// The body.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Bytes,
}

/// A batch: the unit of delivery, in-flight accounting and acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Identifies the batch in `ack` / `nack`; unique within the broker's run.
    pub batch_id: u64,
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Messages in sequence order within a priority lane.
    pub messages: Vec<DeliveredMessage>,
}

/// Broker → consumer status (periodic; reserved in v1, clients must ignore unknown events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// Last sequence number stored on the topic.
    pub head_seq: u64,
    /// Messages of the topic not yet acked by the group.
    pub lag: u64,
}

/// One item of a `subscribe` stream: a MessagePack map with exactly one key naming the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    /// `{"batch": Batch}`
    Batch(Batch),
    /// `{"status": StatusUpdate}`
    Status(StatusUpdate),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&SubscribeRequest {
            topic: "t".into(),
            group: "g".into(),
            mode: GroupMode::KeyShared,
            filters: BTreeMap::new(),
            window: Some(2),
            batch_size: None,
        });
        crate::codec::round_trip(&StreamEvent::Batch(Batch {
            batch_id: 7,
            topic: "t".into(),
            group: "g".into(),
            messages: vec![DeliveredMessage {
                seq: 1,
                timestamp_ms: 5,
                key: None,
                headers: BTreeMap::new(),
                priority: 0,
                attempt: 1,
                payload: Bytes::from_static(b"x"),
            }],
        }));
        crate::codec::round_trip(&StreamEvent::Status(StatusUpdate {
            head_seq: 3,
            lag: 1,
        }));
    }

    #[test]
    fn event_is_single_key_map() {
        let bytes = crate::encode(&StreamEvent::Status(StatusUpdate {
            head_seq: 0,
            lag: 0,
        }))
        .unwrap();
        assert_eq!(bytes[0], 0x81, "fixmap of one entry");
        assert_eq!(&bytes[1..8], b"\xa6status");
    }

    #[test]
    fn modes_parse() {
        for m in [
            "exclusive",
            "failover",
            "shared",
            "key_shared",
            "key-shared",
            "broadcast",
        ] {
            let mode: GroupMode = m.parse().unwrap();
            assert_eq!(mode.as_str().replace('_', "-"), m.replace('_', "-"));
        }
        assert!("nope".parse::<GroupMode>().is_err());
    }
}
