//! `admin.events`: a request-stream of the broker's lifecycle events, one [`BrokerEvent`] per
//! PAYLOAD, newest only (no history): a subscriber sees what happens after it subscribed. A
//! subscriber that does not keep up loses the oldest events it has not read and gets one
//! `events_lost` event saying how many.

use serde::{Deserialize, Serialize};

/// Data of an `admin.events` request-stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EventsRequest {
    /// Only these kinds (absent or empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
}

/// Every event kind, in the catalogue order of `docs/protocol.md`.
pub mod kind {
    /// A consumer joined a group (`topic`, `group`, `consumer`, `mode` in `detail`).
    pub const CONSUMER_JOINED: &str = "consumer_joined";
    /// A consumer left a group (`count`: batches returned).
    pub const CONSUMER_LEFT: &str = "consumer_left";
    /// A failover standby became the active consumer.
    pub const CONSUMER_PROMOTED: &str = "consumer_promoted";
    /// A consumer with lag has not acked for `stale_after` (`count`: ms idle, `detail`).
    pub const CONSUMER_STALE: &str = "consumer_stale";
    /// A consumer was disconnected as stale (automatically or by `admin.disconnect_stale`).
    pub const CONSUMER_DISCONNECTED: &str = "consumer_disconnected";
    /// A group was created (`detail`: its mode).
    pub const GROUP_CREATED: &str = "group_created";
    /// A group was deleted.
    pub const GROUP_DELETED: &str = "group_deleted";
    /// A group's cursor was moved up to the topic's retained floor (`seq`: the floor,
    /// `count`: unsettled messages skipped).
    pub const GROUP_MOVED_TO_FLOOR: &str = "group_moved_to_floor";
    /// An operator moved a group (`group.seek`; `seq`: the next seq).
    pub const GROUP_SEEKED: &str = "group_seeked";
    /// A topic was created explicitly or by a first publish.
    pub const TOPIC_CREATED: &str = "topic_created";
    /// A topic was deleted (`count`: messages, `bytes`).
    pub const TOPIC_DELETED: &str = "topic_deleted";
    /// The supervisor restarted an actor (`actor`).
    pub const ACTOR_RESTARTED: &str = "actor_restarted";
    /// Messages moved to a dead-letter topic (`count`, `seq`: the first, `detail`: reason).
    pub const MESSAGE_DEAD_LETTERED: &str = "message_dead_lettered";
    /// Retention removed messages (`count`, `bytes`, `seq`: the new floor, `detail`: why).
    pub const RETENTION_REMOVED: &str = "retention_removed";
    /// The store failed to read or write (`detail`: the error).
    pub const STORAGE_ERROR: &str = "storage_error";
    /// A bound on memory was hit (`detail`: which; e.g. a client disconnected for not reading,
    /// a group's cursor at its range bound).
    pub const MEMORY_PRESSURE: &str = "memory_pressure";
    /// This subscriber fell behind and lost `count` events.
    pub const EVENTS_LOST: &str = "events_lost";

    /// Every kind.
    pub const ALL: &[&str] = &[
        CONSUMER_JOINED,
        CONSUMER_LEFT,
        CONSUMER_PROMOTED,
        CONSUMER_STALE,
        CONSUMER_DISCONNECTED,
        GROUP_CREATED,
        GROUP_DELETED,
        GROUP_MOVED_TO_FLOOR,
        GROUP_SEEKED,
        TOPIC_CREATED,
        TOPIC_DELETED,
        ACTOR_RESTARTED,
        MESSAGE_DEAD_LETTERED,
        RETENTION_REMOVED,
        STORAGE_ERROR,
        MEMORY_PRESSURE,
        EVENTS_LOST,
    ];
}

/// One lifecycle event. Fields that do not apply to a kind are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BrokerEvent {
    /// One of [`kind::ALL`].
    pub kind: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Topic concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Group concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Consumer concerned, `<conn_id>:<stream_id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Actor concerned (e.g. `orchestrator-0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// A sequence number (see the kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// A count (see the kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Bytes (see the kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Free text for a person (a reason, an error, a mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl BrokerEvent {
    /// An event of `kind` now, with no other field.
    pub fn now(kind: &str) -> Self {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        BrokerEvent {
            kind: kind.to_string(),
            at_ms,
            ..Default::default()
        }
    }

    /// With a topic.
    pub fn topic(mut self, t: impl Into<String>) -> Self {
        self.topic = Some(t.into());
        self
    }

    /// With a group.
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = Some(g.into());
        self
    }

    /// With a consumer.
    pub fn consumer(mut self, c: impl ToString) -> Self {
        self.consumer = Some(c.to_string());
        self
    }

    /// With an actor.
    pub fn actor(mut self, a: impl Into<String>) -> Self {
        self.actor = Some(a.into());
        self
    }

    /// With a sequence number.
    pub fn seq(mut self, s: u64) -> Self {
        self.seq = Some(s);
        self
    }

    /// With a count.
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// With bytes.
    pub fn bytes(mut self, n: u64) -> Self {
        self.bytes = Some(n);
        self
    }

    /// With free text.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&EventsRequest::default());
        crate::codec::round_trip(
            &BrokerEvent::now(kind::RETENTION_REMOVED)
                .topic("t")
                .count(10)
                .bytes(2048)
                .seq(11),
        );
        let kinds: std::collections::HashSet<_> = kind::ALL.iter().collect();
        assert_eq!(kinds.len(), kind::ALL.len());
    }
}
