//! Sluice: a persistent message broker on actix actors, RSocket and sled.
//!
//! ```text
//!  client ──TCP/RSocket──▶ ConnectionActor (one per connection, src/session/ pieces)
//!                             │ publish            │ subscribe/ack/nack        │ admin.*
//!                             ▼                    ▼                           ▼
//!                         StoreActor ◀──read── OrchestratorActor (per shard) RegistryActor
//!                         (segments,    ──MessagesAppended──▶ │ batches,       (connections,
//!                          group commit)                      │ timers, DLQ     stats, faults)
//!                                                             └──DeliverBatch──▶ ConnectionActor
//! ```
//!
//! | module | what |
//! |---|---|
//! | [`protocol`] | wire types (crate `sluice-protocol`, no actix/sled) |
//! | [`config`] | validated configuration (TOML, env, flags) |
//! | [`server`] | `start(config)`: store, actors, accept loop |
//! | [`actors`] | connection, registry, orchestrator, store actors (who-sends-what table) |
//! | [`delivery`] | a group's delivery rules as plain data: cursor, batches, acks (no actix) |
//! | [`session`] | the server half of RSocket in plain pieces |
//! | [`store`] | segment files (messages, group cursors), record encoding with CRC, fsync |
//! | [`cli`] | the client subcommands of the `sluice` binary |
//! | [`events`] | the lifecycle event bus behind `admin.events` |
pub use sluice_protocol as protocol;

#[cfg(feature = "server")]
pub mod actors;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod delivery;
#[cfg(feature = "server")]
pub mod events;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod telemetry;
