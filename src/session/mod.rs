//! The server half of RSocket, as plain pieces the [`crate::actors::connection::ConnectionActor`]
//! composes (rsocket_rust's own server side leaks connections and ignores REQUEST_N; see
//! DEPENDENCY-NOTES.md):
//!
//! | piece         | does |
//! |---------------|------|
//! | [`frame`]     | length-prefix reader with the size check *before* buffering, structural validation before `Frame::decode` (which panics on some malformed input), frame encoding that refuses a frame whose length does not fit the prefix |
//! | [`writer`]    | coalescing writer task: many frames per `write` syscall, a queue bounded in bytes, abort on a stalled peer |
//! | [`streams`]   | fragment reassembly with a cap; routing-metadata parsing; the stream-id rules |
//! | [`keepalive`] | liveness: the broker's own KEEPALIVE pings to a quiet client, the lifetime |

pub mod frame;
pub mod keepalive;
pub mod streams;
pub mod writer;
