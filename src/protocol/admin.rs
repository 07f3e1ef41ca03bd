//! `admin.stats` and `admin.fault`.

use crate::subscribe::GroupMode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// The store's disk syncs since the broker started (absent from older brokers).
    #[serde(default)]
    pub syncs: Option<SyncStats>,
    /// Connection limits hit since the broker started (absent from older brokers).
    #[serde(default)]
    pub limits: Option<LimitStats>,
}

/// How often connections hit their limits (counters since the broker started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LimitStats {
    /// Connections closed because the client did not read (its queue over `max_queued_bytes`).
    pub slow_clients_disconnected: u64,
    /// Batches not sent because their frame would not fit the RSocket frame limit.
    pub oversize_batches_dropped: u64,
    /// Connections closed because nothing arrived for the keepalive lifetime.
    pub lifetimes_expired: u64,
    /// KEEPALIVE frames with RESPOND sent to quiet clients.
    pub keepalive_pings: u64,
    /// Lifecycle events dropped for `admin.events` subscribers that had no credit for them
    /// (each subscriber is told with one `events_lost` event).
    #[serde(default)]
    pub events_lost: u64,
}

/// Upper bounds (µs) of the buckets of [`SyncStats::buckets`]; a last bucket holds the rest.
pub const SYNC_BUCKETS_US: [u64; 9] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
];

/// How long the store's syncs took: each makes a group commit durable (fdatasync of the
/// segment files written since the last one, fsync of new directories), and every publish and
/// ack of that commit waits for it. Under `fsync = "always"`, the disk's slow syncs are what a
/// publish's tail latency is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SyncStats {
    /// Syncs run (one may cover several commits).
    pub count: u64,
    /// Syncs that failed.
    pub failed: u64,
    /// Time spent in them, in µs.
    pub total_us: u64,
    /// The longest, in µs.
    pub max_us: u64,
    /// Histogram: bucket `i` counts the syncs that took at most [`SYNC_BUCKETS_US`]`[i]` µs
    /// (and more than the bound before it); the last bucket counts the longer ones.
    pub buckets: Vec<SyncBucket>,
    /// The store's bounds: ids its dedup indexes remember now.
    #[serde(default)]
    pub dedup_ids: u64,
    /// The entries holding them: an id alone, or a run of a producer's consecutive ids
    /// (what `dedup_max_ids` bounds).
    #[serde(default)]
    pub dedup_entries: u64,
    /// Entries forgotten before their `dedup_window` ended (a topic's index was full, or
    /// every topic's together: broker setting `dedup_max_ids`).
    #[serde(default)]
    pub dedup_ids_forgotten: u64,
    /// Group records kept in memory for topics that do not exist yet.
    #[serde(default)]
    pub waiting_groups: u64,
    /// Subscribes to missing topics refused (too many groups waiting).
    #[serde(default)]
    pub waiting_groups_refused: u64,
    /// Bytes of files retention and topic deletions removed whose blocks are not freed yet
    /// (in the trash, freed at `retention_remove_rate`).
    #[serde(default)]
    pub remove_pending_bytes: u64,
    /// Bytes freed since the start by removing such files.
    #[serde(default)]
    pub removed_bytes: u64,
    /// Files freed and unlinked since the start.
    #[serde(default)]
    pub removed_files: u64,
    /// `ftruncate` steps those files were freed in.
    #[serde(default)]
    pub remove_steps: u64,
}

/// One bucket of [`SyncStats::buckets`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SyncBucket {
    /// Upper bound in µs (`None`: no bound, the last bucket).
    pub le_us: Option<u64>,
    /// Syncs in the bucket.
    pub count: u64,
    /// Their total time, in µs.
    pub total_us: u64,
}

impl SyncStats {
    /// Empty stats with every bucket present.
    pub fn new() -> Self {
        SyncStats {
            buckets: SYNC_BUCKETS_US
                .iter()
                .map(|&b| Some(b))
                .chain(std::iter::once(None))
                .map(|le_us| SyncBucket {
                    le_us,
                    ..SyncBucket::default()
                })
                .collect(),
            ..SyncStats::default()
        }
    }

    /// Counts one sync that took `us` µs.
    pub fn record(&mut self, us: u64, ok: bool) {
        self.count += 1;
        if !ok {
            self.failed += 1;
        }
        self.total_us = self.total_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
        if let Some(b) = self
            .buckets
            .iter_mut()
            .find(|b| b.le_us.is_none_or(|le| us <= le))
        {
            b.count += 1;
            b.total_us = b.total_us.saturating_add(us);
        }
    }

    /// Syncs longer than `us` µs and the time they took, counted from the buckets: `us` must be
    /// one of [`SYNC_BUCKETS_US`] (otherwise the next bound up is used).
    pub fn over(&self, us: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| b.le_us.is_none_or(|le| le > us))
            .fold((0, 0), |(n, t), b| (n + b.count, t + b.total_us))
    }

    /// What happened since `earlier` (a snapshot of the same broker): counts and buckets
    /// subtracted; the maximum is this one's if it grew since, else the bound of the highest
    /// bucket that gained a sync (an upper bound).
    pub fn since(&self, earlier: &SyncStats) -> SyncStats {
        let buckets: Vec<SyncBucket> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let e = earlier.buckets.get(i);
                SyncBucket {
                    le_us: b.le_us,
                    count: b.count.saturating_sub(e.map_or(0, |e| e.count)),
                    total_us: b.total_us.saturating_sub(e.map_or(0, |e| e.total_us)),
                }
            })
            .collect();
        let max_us = if self.max_us > earlier.max_us {
            self.max_us
        } else {
            buckets
                .iter()
                .rev()
                .find(|b| b.count > 0)
                .map_or(0, |b| b.le_us.unwrap_or(self.max_us).min(self.max_us))
        };
        SyncStats {
            count: self.count.saturating_sub(earlier.count),
            failed: self.failed.saturating_sub(earlier.failed),
            total_us: self.total_us.saturating_sub(earlier.total_us),
            max_us,
            buckets,
            ..self.clone()
        }
    }

    /// Upper bound of the bucket holding the `p`-th percentile (µs; the maximum for the last
    /// bucket), or `None` with no syncs.
    pub fn percentile_bound(&self, p: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for b in &self.buckets {
            seen += b.count;
            if seen >= rank {
                return Some(b.le_us.unwrap_or(self.max_us).min(self.max_us));
            }
        }
        Some(self.max_us)
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    /// Ranges of acked seqs above the floor (the cursor's size; fresh messages wait at 4,096).
    #[serde(default)]
    pub ack_ranges: u32,
    /// Named seqs of acks and nacks not applied: not delivered to that connection in that batch.
    #[serde(default)]
    pub rejected_acks: u64,
    /// Header filters fixed at creation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filters: BTreeMap<String, String>,
    /// Redelivery schedule (ms per step; empty: the single `batch_timeout`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backoff_ms: Vec<u64>,
    /// Unsettled messages skipped because retention removed them (the group was moved up to
    /// the topic's floor).
    #[serde(default)]
    pub skipped_by_retention: u64,
    /// Age of the oldest unsettled message the group holds in memory (in flight or waiting
    /// for redelivery), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unacked_age_ms: Option<u64>,
    /// Milliseconds since any consumer of the group last acked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_ms_ago: Option<u64>,
    /// Consumers flagged stale (lag and no ack for `stale_after`).
    #[serde(default)]
    pub stale_consumers: u32,
    /// Whether the group's state is in memory (a group with no consumer since the broker
    /// started is listed from its stored record, with what that holds).
    #[serde(default)]
    pub loaded: bool,
    /// One entry per connected consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumer_details: Vec<ConsumerStats>,
    /// Times a memory bound held the group's fresh messages back (4,096 ack ranges, 65,536
    /// delayed retries) or cut its record's attempt counts (65,536): each is also a
    /// `memory_pressure` event.
    #[serde(default)]
    pub memory_pressure: u64,
}

/// State of one consumer of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConsumerStats {
    /// `<conn_id>:<stream_id>`.
    pub consumer: String,
    /// Connection id.
    pub conn_id: u64,
    /// Batches delivered to it and not settled.
    pub in_flight_batches: u32,
    /// Messages in those batches.
    pub in_flight_messages: u32,
    /// Messages delivered to it (redeliveries included).
    pub delivered: u64,
    /// Messages it acked.
    pub acked: u64,
    /// What it still has to process: for `broadcast` its own lag, otherwise the group's.
    pub lag: u64,
    /// Age of the oldest message in flight to it, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unacked_age_ms: Option<u64>,
    /// Milliseconds since its last ack (since it joined, if none yet).
    pub last_ack_ms_ago: u64,
    /// Lag and no ack for `stale_after`.
    #[serde(default)]
    pub stale: bool,
    /// Receives messages now (`failover`: only the active one; others: every consumer).
    #[serde(default)]
    pub active: bool,
    /// `key_shared`: the ranges of the 16-bit key hash it owns, inclusive `[start, end]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_ranges: Vec<(u32, u32)>,
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
    /// Actor name as listed in stats (e.g. `orchestrator-0`, `store`, `registry`).
    pub actor: String,
    /// What to do to it: `stop` (absent: the default; the supervisor restarts it) or `panic`
    /// (a panic in its handler, as a bug would cause: the broker exits non-zero with a log
    /// line, for the service manager to restart it), or `stall-syncs` (actor `store` only): every disk sync waits this long first, as on a
    /// stalled disk (humantime, e.g. `2s`; up to `60s`).
    #[serde(default)]
    pub kind: Option<String>,
    /// How long, for `stall-syncs` (humantime).
    #[serde(default)]
    pub duration: Option<String>,
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
            kind: Some("panic".into()),
            duration: None,
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
                ack_ranges: 2,
                rejected_acks: 3,
                consumer_details: vec![ConsumerStats {
                    consumer: "1:1".into(),
                    hash_ranges: vec![(0, 32767)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            limits: Some(LimitStats {
                keepalive_pings: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = crate::encode(&stats).unwrap();
        let back: BrokerStats = crate::decode(&bytes).unwrap();
        assert_eq!(back, stats);
        let mut syncs = SyncStats::new();
        syncs.record(300, true);
        let with_syncs = BrokerStats {
            syncs: Some(syncs),
            ..stats
        };
        crate::codec::round_trip(&with_syncs);
    }

    #[test]
    fn sync_histogram() {
        let mut s = SyncStats::new();
        assert_eq!(s.buckets.len(), SYNC_BUCKETS_US.len() + 1);
        assert_eq!(s.percentile_bound(99.0), None);
        for _ in 0..97 {
            s.record(200, true);
        }
        s.record(1_500, true);
        s.record(3_000, true);
        s.record(250_000, false);
        assert_eq!((s.count, s.failed, s.max_us), (100, 1, 250_000));
        assert_eq!(s.total_us, 97 * 200 + 1_500 + 3_000 + 250_000);
        assert_eq!(s.over(2_000), (2, 253_000));
        assert_eq!(s.over(1_000), (3, 254_500));
        assert_eq!(s.percentile_bound(50.0), Some(250));
        assert_eq!(s.percentile_bound(98.0), Some(2_000));
        assert_eq!(s.percentile_bound(99.0), Some(5_000));
        assert_eq!(s.percentile_bound(100.0), Some(250_000));
        assert_eq!(
            s.buckets.last().map(|b| (b.le_us, b.count)),
            Some((None, 1))
        );

        let before = s.clone();
        s.record(400, true);
        s.record(7_000, true);
        let d = s.since(&before);
        assert_eq!((d.count, d.failed, d.total_us), (2, 0, 7_400));
        assert_eq!(d.max_us, 10_000, "bound of the highest bucket that grew");
        assert_eq!(d.over(2_000), (1, 7_000));
        s.record(300_000, true);
        assert_eq!(s.since(&before).max_us, 300_000);
    }
}
