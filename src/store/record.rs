//! Binary encoding of a stored message, with a CRC-32 checked on every read.
//!
//! ```text
//! crc32 u32 | timestamp_ms u64 | priority u8 | [id_len u8 | id]  (only when priority's bit 7 is set)
//!           | key_len u16 (0xFFFF = none) | key
//!           | header_count u16 | (name_len u16 | name | value_len u16 | value)* | payload
//! ```
//! All integers big-endian; the CRC covers everything after itself. The idempotency id of a
//! message (`NewMessage.id`, at most 128 bytes) is kept in the record so that the store's
//! dedup index can be rebuilt from the log at open; a record written before ids existed has
//! bit 7 of its priority clear (priorities are at most 9) and reads as having none.

use bytes::Bytes;
use std::collections::BTreeMap;

/// A message as stored in a topic log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Sequence number (the record's key; not part of the value).
    pub seq: u64,
    /// Store time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Optional key.
    pub key: Option<String>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Priority lane.
    pub priority: u8,
    /// Body.
    pub payload: Bytes,
}

/// The CRC of a record being encoded (see [`StoredMessage::encode_head_into`]).
pub struct RecordCrc(crc32fast::Hasher);

impl RecordCrc {
    /// The CRC value.
    pub fn finalize(self) -> u32 {
        self.0.finalize()
    }
}

/// Longest key, header name or header value the record format holds.
pub const MAX_FIELD: usize = 0xFFFE;

/// Bit of the priority byte saying that an id follows it.
const ID_FLAG: u8 = 0x80;

/// Longest id the record format holds (`sluice_protocol::MAX_ID_LEN` is smaller).
pub const MAX_STORED_ID: usize = 0xFF;

impl StoredMessage {
    /// Appends the record encoding to `buf`. Field lengths must be `<= MAX_FIELD` (publish
    /// validates this).
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        let crc = self.encode_head_into(buf);
        buf.extend_from_slice(&self.payload);
        buf[start..start + 4].copy_from_slice(&crc.finalize().to_be_bytes());
    }

    /// Appends everything of the record but the payload, with a zero CRC placeholder, and
    /// returns the CRC of the whole record (payload included); the caller stores `finalize()`
    /// in the first 4 bytes and writes the payload after the head. Lets a large payload be
    /// written from its own buffer instead of being copied next to its head.
    pub fn encode_head_into(&self, buf: &mut Vec<u8>) -> RecordCrc {
        self.encode_head_with_id(None, buf)
    }

    /// [`StoredMessage::encode_head_into`] with an idempotency id (at most
    /// [`MAX_STORED_ID`] bytes; longer ones are cut, publish refuses them first).
    pub fn encode_head_with_id(&self, id: Option<&[u8]>, buf: &mut Vec<u8>) -> RecordCrc {
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        match id {
            None => buf.push(self.priority & !ID_FLAG),
            Some(id) => {
                let id = &id[..id.len().min(MAX_STORED_ID)];
                buf.push(self.priority | ID_FLAG);
                buf.push(id.len() as u8);
                buf.extend_from_slice(id);
            }
        }
        match &self.key {
            None => buf.extend_from_slice(&0xFFFFu16.to_be_bytes()),
            Some(k) => put_str(buf, k),
        }
        buf.extend_from_slice(&(self.headers.len().min(0xFFFF) as u16).to_be_bytes());
        for (k, v) in self.headers.iter().take(0xFFFF) {
            put_str(buf, k);
            put_str(buf, v);
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&buf[start + 4..]);
        h.update(&self.payload);
        RecordCrc(h)
    }

    /// Decodes a record, checking its CRC. The payload shares `v`'s memory.
    pub fn decode(seq: u64, v: &Bytes) -> Result<StoredMessage, String> {
        let mut r = Reader { b: v, pos: 0 };
        let crc = r.u32()?;
        if crc32fast::hash(&v[4..]) != crc {
            return Err("CRC mismatch".into());
        }
        let timestamp_ms = r.u64()?;
        let mut priority = r.u8()?;
        if priority & ID_FLAG != 0 {
            priority &= !ID_FLAG;
            let n = r.u8()? as usize;
            r.take(n)?;
        }
        let klen = r.u16()?;
        let key = if klen == 0xFFFF {
            None
        } else {
            Some(r.str(klen as usize)?)
        };
        let n = r.u16()?;
        let mut headers = BTreeMap::new();
        for _ in 0..n {
            let kl = r.u16()? as usize;
            let k = r.str(kl)?;
            let vl = r.u16()? as usize;
            let val = r.str(vl)?;
            headers.insert(k, val);
        }
        let payload = v.slice(r.pos..);
        Ok(StoredMessage {
            seq,
            timestamp_ms,
            key,
            headers,
            priority,
            payload,
        })
    }
}

/// The timestamp and idempotency id of an encoded record, without checking its CRC (the
/// chunk's was checked) nor decoding the rest: what the dedup index needs at open.
pub fn decode_id(v: &[u8]) -> Option<(u64, &str)> {
    let mut r = Reader { b: v, pos: 4 };
    let ts = r.u64().ok()?;
    if r.u8().ok()? & ID_FLAG == 0 {
        return None;
    }
    let n = r.u8().ok()? as usize;
    let at = r.pos;
    let id = std::str::from_utf8(v.get(at..at + n)?).ok()?;
    Some((ts, id))
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_FIELD)];
    buf.extend_from_slice(&(b.len() as u16).to_be_bytes());
    buf.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or("truncated record")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, n: usize) -> Result<String, String> {
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "invalid UTF-8 in record".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_crc() {
        let mut headers = BTreeMap::new();
        headers.insert("a".into(), "b".into());
        let m = StoredMessage {
            seq: 9,
            timestamp_ms: 42,
            key: Some("k".into()),
            headers,
            priority: 3,
            payload: Bytes::from_static(b"hello"),
        };
        let mut buf = Vec::new();
        m.encode_into(&mut buf);
        assert_eq!(
            StoredMessage::decode(9, &Bytes::from(buf.clone())).unwrap(),
            m
        );
        let no_key = StoredMessage {
            key: None,
            ..m.clone()
        };
        buf.clear();
        no_key.encode_into(&mut buf);
        assert_eq!(
            StoredMessage::decode(9, &Bytes::from(buf.clone())).unwrap(),
            no_key
        );
        // With an id: read back without it, the id where the index looks.
        let mut with_id = Vec::new();
        let crc = m.encode_head_with_id(Some(b"order-17"), &mut with_id);
        with_id.extend_from_slice(&m.payload);
        with_id[..4].copy_from_slice(&crc.finalize().to_be_bytes());
        assert_eq!(
            StoredMessage::decode(9, &Bytes::from(with_id.clone())).unwrap(),
            m
        );
        assert_eq!(decode_id(&with_id), Some((42, "order-17")));
        assert_eq!(decode_id(&buf), None, "a record without an id");
        buf[10] ^= 1;
        assert!(StoredMessage::decode(9, &Bytes::from(buf.clone())).is_err());
        assert!(StoredMessage::decode(9, &Bytes::copy_from_slice(&buf[..3])).is_err());
    }
}
