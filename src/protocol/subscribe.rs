//! `subscribe`: a request-stream that yields batches (and, later, status/reset events).

use crate::publish::serde_bytes_compat;
use crate::{ErrorCode, WireError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Largest `window` a subscription may ask for.
pub const MAX_WINDOW: u32 = 1024;
/// Largest `batch_size` a subscription may ask for.
pub const MAX_BATCH_SIZE: u32 = 4096;

/// Longest topic or group name, in bytes.
pub const MAX_NAME_LEN: usize = 120;

/// Checks a topic or group name: 1..=[`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, not `.` or `..`
/// (a topic is a directory of the data dir). `what` names the field in the error (`"topic"`,
/// `"group"`). The broker applies this one rule wherever a name arrives (publish, subscribe).
pub fn validate_name(what: &str, name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::InvalidRequest,
            format!(
                "{what} name '{name}' ({} bytes) must be 1..={MAX_NAME_LEN} bytes of [A-Za-z0-9._-] (not . or ..)",
                name.len()
            ),
        ))
    }
}

/// The dead-letter topic of `group` on `topic`: `<topic>.<group>.dlq` when that is at most
/// [`MAX_NAME_LEN`] bytes; otherwise the first 99 bytes of `<topic>.<group>`, a `.`, the 16
/// lowercase hex digits of the FNV-1a 64-bit hash of the whole `<topic>.<group>`, and `.dlq`
/// (exactly [`MAX_NAME_LEN`] bytes). Either way the result is a valid topic name whenever
/// `topic` and `group` are valid names, so every dead-letter topic can be subscribed to, with
/// any group, and its own dead letters have a topic too.
pub fn dlq_topic(topic: &str, group: &str) -> String {
    const SUFFIX: &str = ".dlq";
    let base = format!("{topic}.{group}");
    if base.len() + SUFFIX.len() <= MAX_NAME_LEN {
        return base + SUFFIX;
    }
    let hash = fnv1a64(base.as_bytes());
    // 99 + 1 + 16 + 4 = 120. Names are ASCII; stay on a char boundary for anything else.
    let mut cut = MAX_NAME_LEN - 1 - 16 - SUFFIX.len();
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{hash:016x}{SUFFIX}", &base[..cut])
}

/// FNV-1a, 64 bits (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

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
    /// Most unacked batches this consumer may hold, 1..=[`MAX_WINDOW`] (larger values are
    /// clamped; default: the broker's `window`, 4).
    #[serde(default)]
    pub window: Option<u32>,
    /// Most messages per batch, 1..=[`MAX_BATCH_SIZE`] (larger values are clamped; default: the
    /// broker's `batch_size`, 16). The broker's `batch_max_bytes` still bounds each batch.
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// Redelivery schedule of a group created by this subscribe: humantime entries (`"1s"`,
    /// `"5s"`, `"30s"`, `"2m"`), at most [`MAX_BACKOFF_STEPS`], each 1 ms..=1 day. The n-th
    /// delivery of a message that is not acked is redelivered after the n-th entry (the last
    /// repeats) instead of the broker's `batch_timeout`; a nack without a delay waits the entry
    /// of the message's failure count. Absent: the topic's default schedule, else the broker's.
    /// Fixed when the group is created: an existing group with another schedule refuses the
    /// subscribe (`MODE_CONFLICT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Vec<String>>,
}

/// Most entries of a redelivery schedule ([`SubscribeRequest::backoff`]).
pub const MAX_BACKOFF_STEPS: usize = 32;

/// Parses a redelivery schedule: humantime entries, 1..=[`MAX_BACKOFF_STEPS`] of them, each
/// 1 ms..=1 day. Returns the entries in milliseconds.
pub fn parse_backoff(entries: &[String]) -> Result<Vec<u64>, WireError> {
    let bad = |m: String| WireError::new(ErrorCode::InvalidRequest, m);
    if entries.is_empty() || entries.len() > MAX_BACKOFF_STEPS {
        return Err(bad(format!(
            "backoff must have 1..={MAX_BACKOFF_STEPS} entries, not {}",
            entries.len()
        )));
    }
    entries
        .iter()
        .map(|e| {
            let short: String = e.chars().take(40).collect();
            let d = humantime::parse_duration(e.trim())
                .map_err(|err| bad(format!("backoff entry '{short}' is not a duration ({err})")))?;
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if !(1..=24 * 3600 * 1000).contains(&ms) {
                return Err(bad(format!(
                    "backoff entry '{short}' must be between 1ms and 1day"
                )));
            }
            Ok(ms)
        })
        .collect()
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

/// Broker → consumer: the group's cursor was moved by the broker, not by acks. Messages
/// between the old cursor and `floor_seq` will not be delivered (a replica must resynchronise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetNotice {
    /// Why: `retention` (the messages were removed by the topic's retention), `seek` (an
    /// operator moved the group), `deleted` (the topic or group was deleted; the stream ends).
    pub reason: String,
    /// The group now continues from this sequence number (every seq below it is settled).
    pub floor_seq: u64,
    /// Unsettled messages skipped by the move (0 for a seek backwards).
    #[serde(default)]
    pub skipped: u64,
}

/// One item of a `subscribe` stream: a MessagePack map with exactly one key naming the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    /// `{"batch": Batch}`
    Batch(Batch),
    /// `{"status": StatusUpdate}`
    Status(StatusUpdate),
    /// `{"reset": ResetNotice}`
    Reset(ResetNotice),
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
            backoff: Some(vec!["1s".into(), "5s".into()]),
        });
        crate::codec::round_trip(&StreamEvent::Reset(ResetNotice {
            reason: "retention".into(),
            floor_seq: 10,
            skipped: 3,
        }));
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
    fn backoff_schedules_parse() {
        let ok = ["1s", "5s", "30s", "2m"].map(String::from);
        assert_eq!(
            parse_backoff(&ok).unwrap(),
            vec![1000, 5000, 30_000, 120_000]
        );
        for bad in [
            vec![],
            vec!["soon".to_string()],
            vec!["0s".into()],
            vec!["2days".into()],
        ] {
            let e = parse_backoff(&bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad:?}");
        }
        assert!(parse_backoff(&vec!["1s".to_string(); MAX_BACKOFF_STEPS + 1]).is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("topic", "orders.eu-west_1").is_ok());
        assert!(validate_name("topic", &"a".repeat(MAX_NAME_LEN)).is_ok());
        for bad in ["", ".", "..", "a/b", "é", "a b"] {
            assert_eq!(
                validate_name("topic", bad).unwrap_err().code,
                ErrorCode::InvalidRequest,
                "{bad:?}"
            );
        }
        let e = validate_name("group", &"g".repeat(MAX_NAME_LEN + 1)).unwrap_err();
        assert!(e.message.contains("121 bytes"), "{e}");
    }

    #[test]
    fn every_dead_letter_topic_is_a_valid_name() {
        assert_eq!(dlq_topic("jobs", "workers"), "jobs.workers.dlq");
        // The longest plain one: 58 + 1 + 57 + 4 = 120.
        let (t, g) = ("t".repeat(58), "g".repeat(57));
        assert_eq!(dlq_topic(&t, &g), format!("{t}.{g}.dlq"));
        // One byte more: shortened with the hash.
        let g2 = "g".repeat(58);
        let d = dlq_topic(&t, &g2);
        assert_eq!(d.len(), MAX_NAME_LEN);
        assert!(d.starts_with(&format!("{t}.{}", "g".repeat(40))), "{d}");
        assert!(d.ends_with(".dlq"));
        assert_ne!(
            d,
            dlq_topic(&t, &"h".repeat(58)),
            "the hash tells groups apart"
        );
        // Test vector for other implementations: FNV-1a 64 of "a" is af63dc4c8601ec8c.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // The longest names, and dead letters of dead letters, stay valid names.
        let mut topic = "t".repeat(MAX_NAME_LEN);
        for group in [
            "g".repeat(MAX_NAME_LEN),
            "g".to_string(),
            "dlq-readers".into(),
        ] {
            validate_name("group", &group).unwrap();
            topic = dlq_topic(&topic, &group);
            validate_name("topic", &topic).unwrap();
        }
        // Non-ASCII input (never a valid name) does not panic.
        let odd = dlq_topic(&"é".repeat(60), "g");
        assert!(odd.len() <= MAX_NAME_LEN);
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
