//! Delivery rules as plain data, with no actors: a group's cursor, what waits for delivery,
//! what is in flight to whom, and how acks, nacks, timeouts and departures change it. The
//! orchestrator actor owns one [`GroupState`] per (topic, group) and only moves messages
//! between it, the store and the connections, so every rule here is unit-tested in
//! microseconds (`group/tests.rs`). See `src/actors/orchestrator.md` for the state machine.

pub mod group;
pub mod ranges;

pub use group::{GroupState, Joining, Limits, Pending, Settlement};
pub use ranges::SeqRanges;

/// Identifies one subscription: a connection and the stream it subscribed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId {
    /// Connection id.
    pub conn: u64,
    /// RSocket stream id of the subscribe request.
    pub stream: u32,
}

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.conn, self.stream)
    }
}
