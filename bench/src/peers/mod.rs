//! The same W1-W4 against Redis Streams and NATS JetStream, ported from the reference harness
//! (`../shared/bench/peers`). Built only with `--features peers`.

pub mod nats;
pub mod redis;
