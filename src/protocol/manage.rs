//! Topics and groups as things an operator manages: `topic.*` and `group.*` routes, and
//! `admin.disconnect_stale`. Every duration on the wire is in milliseconds; the CLI takes
//! humantime (`7d`, `2m`) and byte sizes (`1GiB`).

use crate::admin::GroupStats;
use crate::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};

/// How a topic's old messages go (besides its limits, which always apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Only by the limits (`max_age`, `max_bytes`, `max_messages`).
    #[default]
    Age,
    /// Also once every group of the topic has acked them (a work queue). A topic with no group
    /// keeps its messages (up to its limits).
    Acked,
}

impl std::str::FromStr for Discard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "age" => Ok(Discard::Age),
            "acked" => Ok(Discard::Acked),
            other => Err(format!("unknown discard '{other}' (expected age or acked)")),
        }
    }
}

impl std::fmt::Display for Discard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Discard::Age => "age",
            Discard::Acked => "acked",
        })
    }
}

/// A topic's settings. In a request every field is optional: absent fields keep their current
/// value (`topic.alter`) or the broker's default (`topic.create`). In [`TopicInfo`] they are the
/// values in force (`None`: no such limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TopicSettings {
    /// Messages older than this (ms) are removed, whole segments at a time. `0` in a request:
    /// no age limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// The oldest segments are removed while the topic holds more bytes than this. `0` in a
    /// request: no size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// The oldest segments are removed while the topic holds more messages than this. `0` in
    /// a request: no count limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// See [`Discard`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard: Option<Discard>,
    /// Ids ([`crate::NewMessage::id`]) are remembered this long (ms); `0`: no deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_ms: Option<u64>,
    /// Default redelivery schedule (ms per step) of groups created on the topic without one;
    /// empty in a request: none (the broker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<Vec<u64>>,
}

/// Largest `max_age_ms` / `dedup_window_ms`: 100 years.
pub const MAX_AGE_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Largest `dedup_window_ms`: 7 days (every id within it is kept in memory).
pub const MAX_DEDUP_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;
/// Smallest non-zero `max_bytes`: 1 KiB.
pub const MIN_MAX_BYTES: u64 = 1024;
/// Largest `max_bytes`: 1 PiB.
pub const MAX_MAX_BYTES: u64 = 1 << 50;

impl TopicSettings {
    /// Checks every present field is in range (see the constants of this module).
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |m: String| Err(WireError::new(ErrorCode::InvalidRequest, m));
        if let Some(a) = self.max_age_ms {
            if a != 0 && !(1000..=MAX_AGE_MS).contains(&a) {
                return bad(format!(
                    "max_age must be 0 (none) or 1s..=100 years, not {a} ms"
                ));
            }
        }
        if let Some(b) = self.max_bytes {
            if b != 0 && !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&b) {
                return bad(format!(
                    "max_bytes must be 0 (none) or {MIN_MAX_BYTES}..={MAX_MAX_BYTES} bytes, not {b}"
                ));
            }
        }
        if let Some(w) = self.dedup_window_ms {
            if w > MAX_DEDUP_WINDOW_MS {
                return bad(format!("dedup_window must be at most 7 days, not {w} ms"));
            }
        }
        if let Some(steps) = &self.backoff_ms {
            if steps.len() > crate::subscribe::MAX_BACKOFF_STEPS
                || steps.iter().any(|&s| !(1..=24 * 3600 * 1000).contains(&s))
            {
                return bad(format!(
                    "backoff must have at most {} entries of 1ms..=1day",
                    crate::subscribe::MAX_BACKOFF_STEPS
                ));
            }
        }
        Ok(())
    }
}

/// Data of `topic.create` and `topic.alter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRequest {
    /// The topic.
    pub topic: String,
    /// Settings to set (absent fields: unchanged / defaults).
    #[serde(default)]
    pub settings: TopicSettings,
}

/// Data of `topic.info` and `topic.delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicName {
    /// The topic.
    pub topic: String,
}

/// Data of `topic.list` (empty map) and `group.list` (optionally one topic's groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ListRequest {
    /// Only this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

/// Reply to `topic.create`, `topic.alter`, `topic.info`: a topic as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TopicInfo {
    /// The topic.
    pub topic: String,
    /// Last sequence number stored (0: never any).
    pub head_seq: u64,
    /// Lowest retained sequence number (`head_seq + 1` when it holds none).
    pub floor_seq: u64,
    /// Messages retained (`head_seq + 1 - floor_seq`).
    pub messages: u64,
    /// Bytes of its segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Its groups, by name.
    pub groups: Vec<String>,
    /// Settings in force (topic overrides over the broker's defaults).
    pub settings: TopicSettings,
    /// Timestamp (ms since the epoch) of the oldest retained message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_ms: Option<u64>,
}

/// Reply to `topic.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TopicList {
    /// Every topic, by name.
    pub topics: Vec<TopicInfo>,
}

/// Reply to `topic.delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TopicDeleted {
    /// The topic.
    pub topic: String,
    /// Messages it held.
    pub messages: u64,
    /// Bytes its files took.
    pub bytes: u64,
}

/// Data of `group.info` and `group.delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupName {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
}

/// Reply to `group.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GroupList {
    /// Every group (of the topic asked for), loaded or not.
    pub groups: Vec<GroupStats>,
}

/// Where `group.seek` moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeekTo {
    /// `{"seq": N}`: the next message delivered is `N` (1..=head + 1).
    Seq(u64),
    /// `{"time_ms": T}`: the first message stored at or after `T` (ms since the epoch).
    TimeMs(u64),
    /// `{"start": null}`: the oldest retained message.
    Start,
    /// `{"end": null}`: only messages published from now on.
    End,
}

/// Data of `group.seek`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekRequest {
    /// The topic.
    pub topic: String,
    /// The group (must exist).
    pub group: String,
    /// Where to.
    pub to: SeekTo,
}

/// Reply to `group.seek`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekReply {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// The next message the group gets (every seq below is settled, none above).
    pub next_seq: u64,
    /// Batches that were in flight and are now void (their acks get `unknown_batch`).
    pub cancelled_batches: u32,
}

/// Reply to `group.delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDeleted {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
}

/// Data of `admin.disconnect_stale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectStaleRequest {
    /// Consumers with lag and no ack for at least this long (ms) are disconnected.
    pub older_than_ms: u64,
}

/// Reply to `admin.disconnect_stale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DisconnectStaleReply {
    /// The consumers disconnected (their subscriptions ended with `STALE_CONSUMER`; their
    /// batches went back to their groups).
    pub disconnected: Vec<StaleConsumer>,
}

/// A consumer found stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleConsumer {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// `<conn_id>:<stream_id>`.
    pub consumer: String,
    /// Milliseconds since its last ack (or since it joined, if none).
    pub idle_ms: u64,
    /// The group's lag then.
    pub lag: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&TopicRequest {
            topic: "t".into(),
            settings: TopicSettings {
                max_age_ms: Some(2000),
                discard: Some(Discard::Acked),
                backoff_ms: Some(vec![1000, 5000]),
                ..Default::default()
            },
        });
        crate::codec::round_trip(&SeekRequest {
            topic: "t".into(),
            group: "g".into(),
            to: SeekTo::TimeMs(5),
        });
        crate::codec::round_trip(&SeekRequest {
            topic: "t".into(),
            group: "g".into(),
            to: SeekTo::Start,
        });
        crate::codec::round_trip(&TopicInfo::default());
    }

    #[test]
    fn settings_are_checked() {
        let ok = TopicSettings {
            max_age_ms: Some(2000),
            max_bytes: Some(0),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        for bad in [
            TopicSettings {
                max_age_ms: Some(5),
                ..Default::default()
            },
            TopicSettings {
                max_bytes: Some(10),
                ..Default::default()
            },
            TopicSettings {
                dedup_window_ms: Some(MAX_DEDUP_WINDOW_MS + 1),
                ..Default::default()
            },
            TopicSettings {
                backoff_ms: Some(vec![0]),
                ..Default::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code, ErrorCode::InvalidRequest);
        }
    }
}
