//! `publish`: store one or many messages on a topic.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NewMessage {
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
    pub fn decode_shared(data: &Bytes) -> Result<PublishRequest, crate::CodecError> {
        let r: PublishRequestRef<'_> = rmp_serde::from_slice(data)?;
        Ok(PublishRequest {
            topic: r.topic,
            messages: r
                .messages
                .into_iter()
                .map(|m| NewMessage {
                    key: m.key,
                    headers: m.headers,
                    priority: m.priority,
                    payload: data.slice_ref(m.payload),
                })
                .collect(),
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
    /// Sequence number of the last one; the messages got `first_seq..=last_seq` in order.
    pub last_seq: u64,
}

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
        crate::codec::round_trip(&PublishReply {
            topic: "orders".into(),
            first_seq: 1,
            last_seq: 2,
        });
    }

    #[test]
    fn shared_decode_matches_and_does_not_copy() {
        let req = PublishRequest {
            topic: "t".into(),
            messages: vec![NewMessage {
                key: Some("k".into()),
                payload: Bytes::from_static(b"payload"),
                ..Default::default()
            }],
        };
        let data = crate::encode(&req).unwrap();
        let shared = PublishRequestRef::decode_shared(&data).unwrap();
        assert_eq!(shared, req);
        let p = &shared.messages[0].payload;
        let inside = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        assert!(
            inside.contains(&(p.as_ptr() as usize)),
            "payload points into the frame"
        );
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
