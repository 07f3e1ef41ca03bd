//! A small MessagePack writer for the broker's hottest encoding, the delivered batch: it writes
//! exactly the bytes `codec::encode(&StreamEvent::Batch(..))` writes (rmp-serde, structs as
//! maps, every integer and length in its shortest form), straight from the broker's stored
//! messages, without building [`DeliveredMessage`](crate::DeliveredMessage)s (copies of each
//! key and header map) for serde first.
//!
//! A batch is written as:
//!
//! ```text
//! {"batch": {"batch_id": u, "topic": s, "group": s, "messages": [
//!     {"seq": u, "timestamp_ms": u, "key": s|nil, "headers": {s: s}, "priority": u,
//!      "attempt": u, "payload": bin}, ...]}}
//! ```
//!
//! The tests hold it to serde's bytes for every length class of every field.

use bytes::Bytes;
use std::collections::BTreeMap;

fn uint(buf: &mut Vec<u8>, v: u64) {
    if v < 128 {
        buf.push(v as u8);
    } else if v < 256 {
        buf.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 65_536 {
        buf.push(0xcd);
        buf.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v < 1 << 32 {
        buf.push(0xce);
        buf.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

/// A length as the shortest of: `fix` (with `fix_max` values, the length or'ed in), then the
/// 8-bit (if `m8` is some), 16-bit and 32-bit forms. Lengths never exceed `u32::MAX` here
/// (the broker forms batches within one 16 MiB frame); a longer one is clamped, not wrapped
/// (there is no such length to write: the clamp only spares a panic).
fn len(buf: &mut Vec<u8>, n: usize, fix: Option<(u8, usize)>, m8: Option<u8>, m16: u8, m32: u8) {
    match fix {
        Some((marker, max)) if n < max => buf.push(marker | n as u8),
        _ => match m8 {
            Some(m) if n < 256 => buf.extend_from_slice(&[m, n as u8]),
            _ if n < 65_536 => {
                buf.push(m16);
                buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                buf.push(m32);
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                buf.extend_from_slice(&n.to_be_bytes());
            }
        },
    }
}

fn str(buf: &mut Vec<u8>, s: &str) {
    len(buf, s.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb);
    buf.extend_from_slice(s.as_bytes());
}

fn bin(buf: &mut Vec<u8>, b: &[u8]) {
    len(buf, b.len(), None, Some(0xc4), 0xc5, 0xc6);
    buf.extend_from_slice(b);
}

fn map_len(buf: &mut Vec<u8>, n: usize) {
    len(buf, n, Some((0x80, 16)), None, 0xde, 0xdf);
}

fn array_len(buf: &mut Vec<u8>, n: usize) {
    len(buf, n, Some((0x90, 16)), None, 0xdc, 0xdd);
}

/// A delivered message's fields besides `attempt` and `payload`, borrowed.
pub struct MessageFields<'a> {
    /// `seq`.
    pub seq: u64,
    /// `timestamp_ms`.
    pub timestamp_ms: u64,
    /// `key`.
    pub key: Option<&'a str>,
    /// `headers`.
    pub headers: &'a BTreeMap<String, String>,
    /// `priority`.
    pub priority: u8,
}

/// Writes one `StreamEvent::Batch`: [`BatchWriter::new`] with the message count, then each
/// message ([`BatchWriter::message`]), then [`BatchWriter::finish`].
pub struct BatchWriter {
    buf: Vec<u8>,
}

impl BatchWriter {
    /// A batch of `count` messages; `capacity` bytes are reserved (a good estimate of the whole
    /// batch saves copying it as it grows).
    pub fn new(batch_id: u64, topic: &str, group: &str, count: usize, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(64 + topic.len() + group.len()));
        map_len(&mut buf, 1);
        str(&mut buf, "batch");
        map_len(&mut buf, 4);
        str(&mut buf, "batch_id");
        uint(&mut buf, batch_id);
        str(&mut buf, "topic");
        str(&mut buf, topic);
        str(&mut buf, "group");
        str(&mut buf, group);
        str(&mut buf, "messages");
        array_len(&mut buf, count);
        BatchWriter { buf }
    }

    /// Appends a message.
    pub fn message(&mut self, m: MessageFields<'_>, attempt: u32, payload: &[u8]) {
        let buf = &mut self.buf;
        map_len(buf, 7);
        str(buf, "seq");
        uint(buf, m.seq);
        str(buf, "timestamp_ms");
        uint(buf, m.timestamp_ms);
        str(buf, "key");
        match m.key {
            Some(k) => str(buf, k),
            None => buf.push(0xc0),
        }
        str(buf, "headers");
        map_len(buf, m.headers.len());
        for (k, v) in m.headers {
            str(buf, k);
            str(buf, v);
        }
        str(buf, "priority");
        uint(buf, u64::from(m.priority));
        str(buf, "attempt");
        uint(buf, u64::from(attempt));
        str(buf, "payload");
        bin(buf, payload);
    }

    /// The encoded batch.
    pub fn finish(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, Batch, DeliveredMessage, StreamEvent};

    fn msg(
        seq: u64,
        key: Option<String>,
        headers: usize,
        attempt: u32,
        payload: usize,
    ) -> DeliveredMessage {
        DeliveredMessage {
            seq,
            timestamp_ms: seq.wrapping_mul(7919),
            key,
            headers: (0..headers)
                .map(|i| (format!("h{i}"), "v".repeat(i % 300)))
                .collect(),
            priority: (seq % 256) as u8,
            attempt,
            payload: Bytes::from(vec![(seq % 251) as u8; payload]),
        }
    }

    fn write(b: &Batch) -> Bytes {
        let mut w = BatchWriter::new(b.batch_id, &b.topic, &b.group, b.messages.len(), 0);
        for m in &b.messages {
            let fields = MessageFields {
                seq: m.seq,
                timestamp_ms: m.timestamp_ms,
                key: m.key.as_deref(),
                headers: &m.headers,
                priority: m.priority,
            };
            w.message(fields, m.attempt, &m.payload);
        }
        w.finish()
    }

    fn same_as_serde(b: Batch) {
        let want = encode(&StreamEvent::Batch(b.clone())).expect("encode");
        assert_eq!(write(&b), want, "{b:?}");
    }

    #[test]
    fn every_length_class_is_written_as_serde_writes_it() {
        // Integers at every marker boundary, strings and binaries at every length class,
        // maps and arrays past their fix forms.
        let ints = [
            0u64,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            4_294_967_295,
            4_294_967_296,
            u64::MAX,
        ];
        let lens = [0usize, 1, 31, 32, 255, 256, 65_535, 65_536];
        for &i in &ints {
            same_as_serde(Batch {
                batch_id: i,
                topic: "t".into(),
                group: "g".into(),
                messages: vec![msg(i, None, 0, (i % (1 << 32)) as u32, 3)],
            });
        }
        for &n in &lens {
            same_as_serde(Batch {
                batch_id: 1,
                topic: "t".repeat(n.min(120)),
                group: "g".repeat(n.min(120)),
                messages: vec![
                    msg(5, Some("k".repeat(n)), 0, 1, n),
                    msg(6, Some(String::new()), n.min(20), 2, 0),
                ],
            });
        }
        for count in [0usize, 1, 15, 16, 17, 300] {
            same_as_serde(Batch {
                batch_id: 9,
                topic: "topic.a".into(),
                group: "group-b".into(),
                messages: (0..count as u64)
                    .map(|s| msg(s, (s % 2 == 0).then(|| format!("key{s}")), 0, 1, 256))
                    .collect(),
            });
        }
        // A header map past 16 entries, with values up to 299 bytes.
        same_as_serde(Batch {
            batch_id: 2,
            topic: "t".into(),
            group: "g".into(),
            messages: vec![msg(3, None, 300, 4, 10)],
        });
    }
}
