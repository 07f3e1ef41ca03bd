//! MessagePack encoding of every wire type: structs are maps keyed by field name (so optional
//! fields can be added within a version), byte strings are MessagePack `bin`.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

/// A payload that is not the MessagePack the receiver expected.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (only possible for types that cannot be represented).
    #[error("cannot encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes are not valid MessagePack of the expected shape.
    #[error("bad MessagePack: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes a wire value as MessagePack (structs as maps).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    let mut buf = Vec::with_capacity(128);
    encode_into(value, &mut buf)?;
    Ok(Bytes::from(buf))
}

/// Encodes a wire value, appending to `buf`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut ser = rmp_serde::Serializer::new(buf).with_struct_map();
    value.serialize(&mut ser)?;
    Ok(())
}

/// Decodes a wire value from MessagePack.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
pub(crate) fn round_trip<T>(value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value).expect("encode");
    let back: T = decode(&bytes).expect("decode");
    assert_eq!(&back, value);
}
