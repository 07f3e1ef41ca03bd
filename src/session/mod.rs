//! The server half of RSocket, as plain pieces the [`crate::actors::connection::ConnectionActor`]
//! composes (rsocket_rust's own server side leaks connections and ignores REQUEST_N; see
//! DEPENDENCY-NOTES.md):
//!
//! | piece        | does |
//! |--------------|------|
//! | [`frame`]    | length-prefix reader with the size check *before* buffering, structural validation before `Frame::decode` (which panics on some malformed input), frame encoding |
//! | [`writer`]   | coalescing writer task: many frames per `write` syscall, abort on a stalled peer |
//! | [`streams`]  | fragment reassembly with a cap; routing-metadata parsing |

pub mod frame;
pub mod streams;
pub mod writer;
