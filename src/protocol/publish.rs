//! `publish`: store one or many messages on a topic.

use crate::SharedStr;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NewMessage {
    /// Optional idempotency id, at most [`MAX_ID_LEN`] bytes: within the topic's
    /// `dedup_window` a message whose id was stored already is not stored again; the reply
    /// gives the original sequence number and `duplicate: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<SharedStr>,
    /// Optional key: keyed state keeps the latest message per key.
    #[serde(default)]
    pub key: Option<String>,
    /// String headers; groups may filter on them.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// 0 = normal; higher is delivered first. At most [`crate::MAX_PRIORITY`].
    #[serde(default)]
    pub priority: u8,
    /// The body, at most the broker's payload limit (1 MiB by default).
    #[serde(with = "serde_bytes_compat")]
    pub payload: Bytes,
}

/// Data of a `publish` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// Topic name: 1..=120 bytes of `[A-Za-z0-9._-]`, not `.` or `..`. Created on first publish.
    pub topic: String,
    /// One or more messages, stored in this order with consecutive sequence numbers.
    pub messages: Vec<NewMessage>,
}

/// Zero-copy decoding of a [`PublishRequest`]: payloads are cut out of the received frame
/// (`Bytes::slice_ref`) instead of copied. Same wire format.
#[derive(Debug, Deserialize)]
pub struct PublishRequestRef<'a> {
    /// Topic.
    pub topic: String,
    /// Messages, borrowing their payloads from the input.
    #[serde(borrow)]
    pub messages: Vec<NewMessageRef<'a>>,
}

/// A [`NewMessage`] whose payload borrows from the input.
#[derive(Debug, Deserialize)]
pub struct NewMessageRef<'a> {
    /// Idempotency id.
    #[serde(default)]
    pub id: Option<String>,
    /// Key.
    #[serde(default)]
    pub key: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Priority.
    #[serde(default)]
    pub priority: u8,
    /// Payload bytes inside the input.
    #[serde(borrow, with = "serde_bytes")]
    pub payload: &'a [u8],
}

impl PublishRequestRef<'_> {
    /// Decodes `data` and turns it into an owned request whose payloads share `data`'s memory.
    ///
    /// The layout every encoder here writes (maps with the fields by name, payloads as `bin`)
    /// is read by hand, ~5x faster than through serde (whose struct visitor compares field
    /// names as validated strings, message by message); anything else (fields by position,
    /// payloads as `str`, unknown fields, bad input) goes through serde, which decides.
    pub fn decode_shared(data: &Bytes) -> Result<PublishRequest, crate::CodecError> {
        if let Some(r) = fast::publish(data) {
            return Ok(r);
        }
        Self::decode_shared_serde(data)
    }

    /// [`PublishRequestRef::decode_shared`] through serde only.
    pub fn decode_shared_serde(data: &Bytes) -> Result<PublishRequest, crate::CodecError> {
        let r: PublishRequestRef<'_> = rmp_serde::from_slice(data)?;
        Ok(PublishRequest {
            topic: r.topic,
            messages: r
                .messages
                .into_iter()
                .map(|m| NewMessage {
                    id: m.id.map(SharedStr::from),
                    key: m.key,
                    headers: m.headers,
                    priority: m.priority,
                    payload: data.slice_ref(m.payload),
                })
                .collect(),
        })
    }
}

/// The hand-written reader of [`PublishRequestRef::decode_shared`]: `None` for anything it is
/// not sure serde would read the same way.
mod fast {
    use super::{NewMessage, PublishRequest};
    use crate::mpread::{once, Reader};
    use bytes::Bytes;

    pub(super) fn publish(data: &Bytes) -> Option<PublishRequest> {
        let mut r = Reader::new(data);
        let (mut topic, mut messages) = (None, None);
        for _ in 0..r.map_len()? {
            match r.str_bytes()? {
                b"topic" => once(&mut topic, r.string())?,
                b"messages" => {
                    let list = r.array_of(message);
                    once(&mut messages, list)?
                }
                _ => return None,
            }
        }
        r.at_end().then_some(())?;
        Some(PublishRequest {
            topic: topic?,
            messages: messages?,
        })
    }

    fn message(r: &mut Reader<'_>) -> Option<NewMessage> {
        let (mut id, mut key, mut headers, mut priority, mut payload) =
            (None, None, None, None, None);
        for _ in 0..r.map_len()? {
            match r.str_bytes()? {
                b"id" => once(&mut id, r.opt_shared_str())?,
                b"key" => once(&mut key, r.opt_string())?,
                b"headers" => once(&mut headers, r.headers())?,
                b"priority" => {
                    let value = r.uint().and_then(|v| u8::try_from(v).ok());
                    once(&mut priority, value)?
                }
                b"payload" => once(&mut payload, r.bin())?,
                _ => return None,
            }
        }
        Some(NewMessage {
            id: id.flatten(),
            key: key.flatten(),
            headers: headers.unwrap_or_default(),
            priority: priority.unwrap_or(0),
            payload: payload?,
        })
    }
}

/// Reply to `publish`, sent only once every message is durable under the fsync policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReply {
    /// The topic.
    pub topic: String,
    /// Sequence number of the first message of the request.
    pub first_seq: u64,
    /// Sequence number of the last one; the messages got `first_seq..=last_seq` in order
    /// (unless `duplicate`: then `seqs` says which each got, and these are their lowest and
    /// highest).
    pub last_seq: u64,
    /// Some message of the request carried an `id` stored already within the topic's
    /// `dedup_window` (or earlier in the same request): it was not stored again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub duplicate: bool,
    /// Only when `duplicate`: the sequence number of each message of the request, in order; a
    /// duplicate gets its original's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<u64>,
}

impl PublishReply {
    /// The reply for messages stored as `first_seq..=last_seq`, none a duplicate.
    pub fn stored(topic: impl Into<String>, first_seq: u64, last_seq: u64) -> Self {
        PublishReply {
            topic: topic.into(),
            first_seq,
            last_seq,
            duplicate: false,
            seqs: Vec::new(),
        }
    }

    /// The sequence number of the `i`-th message of the request.
    pub fn seq_of(&self, i: usize) -> Option<u64> {
        if self.duplicate {
            self.seqs.get(i).copied()
        } else {
            let s = self.first_seq.checked_add(i as u64)?;
            (s <= self.last_seq).then_some(s)
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Longest idempotency id ([`NewMessage::id`]), in bytes.
pub const MAX_ID_LEN: usize = 128;

/// `Bytes` as MessagePack `bin` (serde_bytes for `Bytes`).
pub(crate) mod serde_bytes_compat {
    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let buf: serde_bytes::ByteBuf = serde::Deserialize::deserialize(d)?;
        Ok(Bytes::from(buf.into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut headers = BTreeMap::new();
        headers.insert("region".to_string(), "eu".to_string());
        crate::codec::round_trip(&PublishRequest {
            topic: "orders".into(),
            messages: vec![
                NewMessage {
                    id: Some("order-1".into()),
                    key: Some("k".into()),
                    headers,
                    priority: 2,
                    payload: Bytes::from_static(b"\x00\xffhi"),
                },
                NewMessage {
                    payload: Bytes::new(),
                    ..Default::default()
                },
            ],
        });
        crate::codec::round_trip(&PublishReply::stored("orders", 1, 2));
        let dup = PublishReply {
            duplicate: true,
            seqs: vec![7, 3],
            ..PublishReply::stored("orders", 3, 7)
        };
        crate::codec::round_trip(&dup);
        assert_eq!(
            (dup.seq_of(0), dup.seq_of(1), dup.seq_of(2)),
            (Some(7), Some(3), None)
        );
        let plain = PublishReply::stored("orders", 5, 6);
        assert_eq!((plain.seq_of(1), plain.seq_of(2)), (Some(6), None));
    }

    #[test]
    fn shared_decode_matches_and_does_not_copy() {
        let req = PublishRequest {
            topic: "t".into(),
            messages: vec![NewMessage {
                id: Some("producer-1".into()),
                key: Some("k".into()),
                payload: Bytes::from_static(b"payload"),
                ..Default::default()
            }],
        };
        let data = crate::encode(&req).unwrap();
        let shared = PublishRequestRef::decode_shared(&data).unwrap();
        assert_eq!(shared, req);
        let m = &shared.messages[0];
        let inside = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        assert!(
            inside.contains(&(m.payload.as_ptr() as usize)),
            "payload points into the frame"
        );
        let id = m.id.as_ref().map(|i| i.as_ptr() as usize);
        assert!(id.is_some_and(|i| inside.contains(&i)), "so does the id");
    }

    fn sample_requests() -> Vec<PublishRequest> {
        let mut headers = BTreeMap::new();
        headers.insert("region".to_string(), "eu".to_string());
        headers.insert("h".repeat(40), "v".repeat(300));
        let mut many = Vec::new();
        for i in 0..70u32 {
            many.push(NewMessage {
                id: (i % 4 == 0).then(|| format!("id-{i}").into()),
                key: (i % 3 == 0).then(|| format!("key-{i}")),
                headers: if i % 5 == 0 {
                    headers.clone()
                } else {
                    BTreeMap::new()
                },
                priority: (i % 10) as u8 * 25,
                payload: Bytes::from(vec![i as u8; [0, 1, 31, 200, 300, 70_000][i as usize % 6]]),
            });
        }
        vec![
            PublishRequest {
                topic: "t".into(),
                messages: vec![NewMessage::default()],
            },
            PublishRequest {
                topic: "orders.eu-1".repeat(10),
                messages: many,
            },
            PublishRequest {
                topic: "empty".into(),
                messages: vec![],
            },
        ]
    }

    #[test]
    fn hand_reader_agrees_with_serde() {
        for req in sample_requests() {
            let data = crate::encode(&req).unwrap();
            let fast = super::fast::publish(&data).expect("read by hand");
            assert_eq!(fast, req);
            assert_eq!(PublishRequestRef::decode_shared_serde(&data).unwrap(), fast);
        }
    }

    #[test]
    fn hand_reader_leaves_other_layouts_and_bad_input_to_serde() {
        #[derive(Serialize)]
        struct Reordered<'a> {
            messages: Vec<Extra<'a>>,
            topic: &'a str,
        }
        #[derive(Serialize)]
        struct Extra<'a> {
            #[serde(with = "serde_bytes")]
            payload: &'a [u8],
            extra: u32,
        }
        // Fields in another order are read by hand; an unknown field is left to serde.
        let data = crate::encode(&Reordered {
            messages: vec![Extra {
                payload: b"x",
                extra: 1,
            }],
            topic: "t",
        })
        .unwrap();
        assert!(super::fast::publish(&data).is_none());
        let r = PublishRequestRef::decode_shared(&data).unwrap();
        assert_eq!(r.messages[0].payload, Bytes::from_static(b"x"));
        // Fields by position (an array) are left to serde.
        let positional = rmp_serde::to_vec(&sample_requests()[0]).unwrap();
        assert!(super::fast::publish(&Bytes::from(positional.clone())).is_none());
        // Every cut and every flipped byte of a valid request reads the same both ways.
        let data = crate::encode(&sample_requests()[1]).unwrap();
        let same = |d: &Bytes| {
            let a = PublishRequestRef::decode_shared(d).map_err(|e| e.to_string());
            let b = PublishRequestRef::decode_shared_serde(d).map_err(|e| e.to_string());
            match (&a, &b) {
                (Ok(x), Ok(y)) => assert_eq!(x, y),
                (Err(_), Err(_)) => {}
                _ => panic!("hand reader and serde disagree: {a:?} vs {b:?}"),
            }
        };
        for cut in (0..data.len()).step_by(97) {
            same(&data.slice(..cut));
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut v = data.to_vec();
            let at = (seed % v.len() as u64) as usize;
            v[at] = (seed >> 32) as u8;
            same(&Bytes::from(v));
        }
    }

    #[test]
    fn payload_is_msgpack_bin() {
        let m = NewMessage {
            payload: Bytes::from_static(b"ab"),
            ..Default::default()
        };
        let bytes = crate::encode(&m).unwrap();
        // bin8 marker 0xc4, length 2, then the bytes, at the end of the map.
        assert!(bytes.ends_with(&[0xc4, 2, b'a', b'b']));
    }

    #[test]
    fn optional_fields_default() {
        #[derive(Serialize)]
        struct Minimal<'a> {
            #[serde(with = "serde_bytes")]
            payload: &'a [u8],
        }
        let bytes = crate::encode(&Minimal { payload: b"x" }).unwrap();
        let m: NewMessage = crate::decode(&bytes).unwrap();
        assert_eq!(m.priority, 0);
        assert!(m.key.is_none());
    }
}
