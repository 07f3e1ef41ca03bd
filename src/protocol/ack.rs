//! `ack` / `nack`: settle a delivered batch, wholly or message by message.

use serde::{Deserialize, Serialize};

/// Data of an `ack` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRequest {
    /// Topic of the batch.
    pub topic: String,
    /// Group of the batch.
    pub group: String,
    /// The batch being acknowledged.
    pub batch_id: u64,
    /// Only these sequence numbers of the batch (absent: the whole batch). Only messages
    /// delivered to this connection in this batch are settled; any other is listed in
    /// [`AckReply::rejected`] and left alone.
    #[serde(default)]
    pub seqs: Option<Vec<u64>>,
}

/// Data of a `nack` request: the messages go back to pending at once and are redelivered with a
/// higher attempt number (or dead-lettered past `max_retries`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NackRequest {
    /// Topic of the batch.
    pub topic: String,
    /// Group of the batch.
    pub group: String,
    /// The batch.
    pub batch_id: u64,
    /// Only these sequence numbers (absent: every unacked message of the batch).
    #[serde(default)]
    pub seqs: Option<Vec<u64>>,
    /// Return the messages without counting a failure or raising their `attempt`: for a
    /// consumer that received more than it will process (e.g. `sluice consume --count N`).
    /// Absent: false (an ordinary nack, which counts toward `max_retries`).
    #[serde(default)]
    pub release: bool,
    /// Redeliver no sooner than this many milliseconds from now (absent: at once, or after
    /// the group's `backoff` entry for the message's failure count when it has a schedule).
    /// At most [`MAX_NACK_DELAY_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

/// Longest `delay_ms` of a nack: one day.
pub const MAX_NACK_DELAY_MS: u64 = 24 * 3600 * 1000;

/// What an ack or nack did. Expected outcomes are values, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    /// Settled now (for an ack: durable under the fsync policy).
    Settled,
    /// Every named message was already acked; nothing changed.
    AlreadyAcked,
    /// The batch is not in flight to this connection (timed out and redelivered, acked
    /// already, delivered to another consumer, or the broker restarted): nothing changed.
    /// A repeated whole-batch ack gets this outcome.
    UnknownBatch,
}

/// Reply to `ack` / `nack` request-response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckReply {
    /// What happened.
    pub outcome: AckOutcome,
    /// How many messages changed state.
    pub count: u32,
    /// Named sequence numbers that were not applied: not delivered to this connection in this
    /// batch and not already settled (absent when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&AckRequest {
            topic: "t".into(),
            group: "g".into(),
            batch_id: 1,
            seqs: Some(vec![1, 2]),
        });
        crate::codec::round_trip(&NackRequest {
            topic: "t".into(),
            group: "g".into(),
            batch_id: 1,
            seqs: None,
            release: true,
            delay_ms: Some(1500),
        });
        crate::codec::round_trip(&AckReply {
            outcome: AckOutcome::UnknownBatch,
            count: 0,
            rejected: vec![3, 4],
        });
    }
}
