//! [`SharedStr`]: a string that may share the memory of a received frame.
//!
//! A message id decoded from a `publish` frame is a few bytes inside a frame that is kept
//! alive anyway (the payloads are slices of it), so the broker takes the id as a slice too
//! instead of allocating a `String` per message (BENCHMARKS.md note 15: with an id on every
//! message that allocation, and its free on the store's thread, was the largest part left of
//! what ids cost the broker). Whoever keeps an id beyond the request (the dedup index) copies
//! it out, so a held id never pins a frame.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// Valid UTF-8 in [`Bytes`]: a cheaply cloned string, possibly a slice of a larger buffer.
/// Build one from a `&str` or `String` (`"order-1".into()`), or from bytes with
/// [`SharedStr::from_utf8`]. Reads as a `&str` ([`Deref`]); compares, orders and hashes as
/// one.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedStr(Bytes);

impl SharedStr {
    /// The bytes as a string, if they are valid UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<SharedStr, std::str::Utf8Error> {
        // ASCII (every id the SDK makes) is UTF-8; `is_ascii` reads a word at a time, several
        // times cheaper than `from_utf8` on a short string.
        if !bytes.is_ascii() {
            std::str::from_utf8(&bytes)?;
        }
        Ok(SharedStr(bytes))
    }

    /// A string of static text (no copy).
    pub const fn from_static(s: &'static str) -> SharedStr {
        SharedStr(Bytes::from_static(s.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Checked when made (every constructor takes a `str` or checks), so this never falls
        // back; checking again costs a few ns for an id and keeps the crate free of `unsafe`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Its UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Deref for SharedStr {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for SharedStr {
    // As a `str` hashes (so that `Borrow<str>` holds for maps).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> SharedStr {
        SharedStr(Bytes::from(s.into_bytes()))
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> SharedStr {
        SharedStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> SharedStr {
        SharedStr::from(s.as_str())
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> String {
        s.as_str().to_owned()
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl Serialize for SharedStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SharedStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SharedStr, D::Error> {
        String::deserialize(d).map(SharedStr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn reads_compares_and_hashes_as_a_str() {
        let frame = Bytes::from_static(b"xxorder-17yy");
        let id = SharedStr::from_utf8(frame.slice(2..10)).expect("utf-8");
        assert_eq!(id, "order-17");
        assert_eq!(&*id, "order-17");
        assert_eq!(id.len(), 8);
        assert_eq!(id, SharedStr::from("order-17".to_string()));
        assert_eq!(format!("{id} {id:?}"), "order-17 \"order-17\"");
        let set: HashSet<SharedStr> = [id.clone()].into_iter().collect();
        assert!(set.contains("order-17"), "Borrow<str> and Hash agree");
        assert!(SharedStr::from_utf8(Bytes::from_static(b"\xff")).is_err());
        assert!(
            SharedStr::from_utf8(Bytes::from_static(b"ab\xc3")).is_err(),
            "cut UTF-8"
        );
        let accented = SharedStr::from_utf8(Bytes::from("é-1".as_bytes())).expect("utf-8");
        assert_eq!(accented, "é-1");
        let (a, b) = (SharedStr::from_static("a"), SharedStr::from_static("b"));
        assert!(a < b);
    }

    #[test]
    fn round_trips_as_a_msgpack_str() {
        let id = SharedStr::from_static("p-1");
        let bytes = rmp_serde::to_vec(&id).expect("encode");
        assert_eq!(bytes, b"\xa3p-1");
        let back: SharedStr = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(back, id);
    }
}
