//! `admin.stats` and `admin.fault`.

use crate::subscribe::GroupMode;
use serde::{Deserialize, Serialize};

/// Data of an `admin.stats` request (empty map in v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatsRequest {}

/// Reply to `admin.stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BrokerStats {
    /// Broker version (crate version).
    pub version: String,
    /// Milliseconds since the broker started.
    pub uptime_ms: u64,
    /// Fsync policy in force (`always`, `interval 10ms`, `never`).
    pub fsync: String,
    /// One entry per actor.
    pub actors: Vec<ActorStats>,
    /// One entry per (topic, group).
    pub groups: Vec<GroupStats>,
    /// One entry per client connection.
    pub connections: Vec<ConnectionStats>,
}

/// Counters of one actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ActorStats {
    /// `registry`, `orchestrator`, `store` or `connection`.
    pub kind: String,
    /// Unique name, e.g. `orchestrator`, `connection-7`.
    pub name: String,
    /// Messages handled since start (across restarts).
    pub handled: u64,
    /// Messages waiting in its mailbox, where known.
    #[serde(default)]
    pub mailbox_backlog: Option<u64>,
    /// Times the supervisor restarted it.
    pub restarts: u32,
    /// Milliseconds since it (re)started.
    pub uptime_ms: u64,
}

/// State of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Mode.
    pub mode: GroupMode,
    /// Last sequence number stored on the topic.
    pub head_seq: u64,
    /// Every message with `seq <= acked_floor` is acked (or dead-lettered).
    pub acked_floor: u64,
    /// `head_seq` minus the number of acked messages: what the group still has to process.
    pub lag: u64,
    /// Batches delivered and not yet settled.
    pub in_flight_batches: u32,
    /// Messages in those batches.
    pub in_flight_messages: u32,
    /// Messages delivered again after a timeout, nack or disconnect.
    pub redeliveries: u64,
    /// Messages moved to the dead-letter topic.
    pub dead_letters: u64,
    /// Connected consumers.
    pub consumers: u32,
}

/// State of one client connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStats {
    /// Broker-assigned connection id.
    pub conn_id: u64,
    /// Client id from SETUP.
    pub client_id: String,
    /// Peer address.
    pub peer: String,
    /// `topic/group` of each subscription on this connection.
    pub groups: Vec<String>,
    /// Unacked batches held by this connection's consumers.
    pub in_flight_batches: u32,
    /// Milliseconds since the last frame received from the client.
    pub last_heartbeat_ms_ago: u64,
    /// Milliseconds since the connection was accepted.
    pub connected_ms: u64,
}

/// Data of `admin.fault`: stop the named actor so the supervisor restarts it (tests only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRequest {
    /// Actor name as listed in stats (e.g. `orchestrator`, `store`, `registry`).
    pub actor: String,
}

/// Reply to `admin.fault`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultReply {
    /// The actor that was stopped.
    pub stopped: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&StatsRequest {});
        crate::codec::round_trip(&FaultRequest {
            actor: "orchestrator".into(),
        });
        crate::codec::round_trip(&FaultReply {
            stopped: "orchestrator".into(),
        });
        let stats = BrokerStats {
            version: "0.1.0".into(),
            actors: vec![ActorStats {
                kind: "store".into(),
                name: "store".into(),
                ..Default::default()
            }],
            groups: vec![GroupStats {
                topic: "t".into(),
                group: "g".into(),
                mode: GroupMode::Shared,
                head_seq: 10,
                acked_floor: 4,
                lag: 6,
                in_flight_batches: 1,
                in_flight_messages: 2,
                redeliveries: 0,
                dead_letters: 0,
                consumers: 1,
            }],
            ..Default::default()
        };
        let bytes = crate::encode(&stats).unwrap();
        let back: BrokerStats = crate::decode(&bytes).unwrap();
        assert_eq!(back, stats);
    }
}
