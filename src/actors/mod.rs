//! The broker's actors and who sends what to whom. Every message lives in [`messages`]; an
//! actor reaches another only through the `Recipient`s bundled there (`StoreLinks`,
//! `OrchestratorLinks`, `RegistryLinks`, `ConnectionLinks`), built by `crate::server` from the
//! concrete addresses, so no actor module imports another. The store and the registry are
//! built first; each orchestrator gets the store's and the registry's recipients when it is
//! built; the store and the registry, which also reach the orchestrators, are handed theirs
//! once those exist (`SetAppendListeners`, `SetPeers`), before any connection is accepted.
//!
//! | message | from → to | result |
//! |---|---|---|
//! | `AppendMessages` | connection (publish), orchestrator (dead letters) → store | `(first_seq, last_seq)` once durable |
//! | `CommitGroup` | orchestrator → store | `()` once the group record is durable |
//! | `ReadRange`, `LoadGroup`, `ListGroups` | orchestrator / registry → store | messages / group record |
//! | `MessagesAppended` | store (from the sync thread that made them durable) → orchestrator (shard of the topic) | new durable messages, for the read-ahead tail |
//! | `JoinGroup`, `LeaveGroup`, `GrantCredits` | connection → orchestrator | join result / – / – |
//! | `AckBatch`, `NackBatch` | connection → orchestrator | [`sluice_protocol::AckReply`] once durable |
//! | `BatchTimedOut` | orchestrator → itself (`notify_later`) | – |
//! | `DeliverBatch` | orchestrator → connection (`Recipient`) | – |
//! | `RegisterConnection`, `ConnectionClosed`, `SubscriptionOpened`, `SubscriptionClosed` | connection → registry | – |
//! | `OrchestratorStarted` | orchestrator → registry | – (registry asks connections to `Rejoin`) |
//! | `Rejoin` | registry → connection | – (connection re-sends `JoinGroup`) |
//! | `GetStats`, `InjectFaultByName` | connection (admin routes) → registry | stats / the actor's name |
//! | `GetActorStats`, `GetGroupStats`, `GetSyncStats`, `ListGroups`, `GetConnectionStats`, `InjectFault` | registry → every actor | stats / – |

pub mod connection;
pub mod messages;
pub mod orchestrator;
pub mod registry;
pub mod store;

use sluice_protocol::ActorStats;
use std::time::Instant;

pub use crate::delivery::ConsumerId;
pub use messages::{FaultKind, GetActorStats, InjectFault};

/// Which orchestrator shard owns `topic`.
pub fn shard_for(topic: &str, shards: usize) -> usize {
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// Counters every actor keeps for `admin.stats`; they live in the actor struct, so they survive
/// supervisor restarts.
#[derive(Debug, Clone)]
pub struct ActorCounters {
    /// Messages handled.
    pub handled: u64,
    /// Restarts by the supervisor.
    pub restarts: u32,
    /// Last (re)start.
    pub started_at: Instant,
}

impl Default for ActorCounters {
    fn default() -> Self {
        ActorCounters {
            handled: 0,
            restarts: 0,
            started_at: Instant::now(),
        }
    }
}

impl ActorCounters {
    /// Stats entry for this actor.
    pub fn stats(&self, kind: &str, name: &str, backlog: Option<u64>) -> ActorStats {
        ActorStats {
            kind: kind.to_string(),
            name: name.to_string(),
            handled: self.handled,
            mailbox_backlog: backlog,
            restarts: self.restarts,
            uptime_ms: self.started_at.elapsed().as_millis() as u64,
        }
    }
}

/// The panic of `admin.fault` kind `panic` (only with `--enable-fault-injection`): shows that
/// a panic on an actor's thread ends the broker with a clear log line (see
/// `crate::server::install_panic_hook`) rather than leaving it up with a dead actor.
pub fn injected_panic(actor: &str) -> ! {
    std::panic::panic_any(format!("fault injected: panic in {actor}"))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        for n in 1..5 {
            for t in ["a", "orders", "x.y.dlq"] {
                let s = shard_for(t, n);
                assert!(s < n);
                assert_eq!(s, shard_for(t, n));
            }
        }
    }
}
