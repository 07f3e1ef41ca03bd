//! Protocol versioning: the client names the version it speaks in [`crate::SetupRequest`]; the
//! broker accepts any version in `[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]`.

use crate::error::{ErrorCode, WireError};

/// The version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest version a broker built from this crate accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Checks a client's version against `[MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]`.
pub fn check_version(client: u32) -> Result<(), WireError> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&client) {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {client} is not supported (this broker speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_current_refuses_others() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        let err = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(check_version(0).is_err());
    }
}
