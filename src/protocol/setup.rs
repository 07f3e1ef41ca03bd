//! The SETUP frame's data.

use serde::{Deserialize, Serialize};

/// Data of the RSocket SETUP frame (MessagePack). The SETUP's data MIME type should be
/// [`crate::DATA_MIME_TYPE`] and its metadata MIME type [`crate::METADATA_MIME_TYPE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupRequest {
    /// Protocol version the client speaks (see [`crate::PROTOCOL_VERSION`]).
    pub version: u32,
    /// The client's identity, shown in stats and logs; 1..=256 bytes.
    pub client_id: String,
    /// Credentials; reserved for a later version, ignored by v1 brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl SetupRequest {
    /// A v1 setup for `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        SetupRequest {
            version: crate::PROTOCOL_VERSION,
            client_id: client_id.into(),
            token: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        crate::codec::round_trip(&SetupRequest::new("c1"));
    }
}
