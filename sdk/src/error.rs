//! The SDK's error type and the mapping from rsocket_rust's errors to it.

use std::sync::Arc;
use std::time::Duration;

use rsocket_rust::error::RSocketError;
use sluice_protocol::{CodecError, ErrorCode, WireError};

/// Result of every fallible SDK call.
pub type Result<T, E = SdkError> = std::result::Result<T, E>;

/// Everything that can go wrong between the SDK and the broker.
///
/// The variants split into three families:
/// - the connection is gone or unusable ([`SdkError::Connect`], [`SdkError::Timeout`],
///   [`SdkError::Closed`]): see [`SdkError::is_connection_error`];
/// - the broker refused the request with a stable code ([`SdkError::Broker`]): match on
///   [`WireError::code`];
/// - the SDK or its caller got something wrong ([`SdkError::Codec`], [`SdkError::Protocol`],
///   [`SdkError::InvalidArgument`]).
///
/// The type is cheap to clone so that one failed request can fail every caller it carried.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The TCP connection to the broker could not be opened (or the RSocket client could not be
    /// started on it).
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// Address we tried.
        addr: String,
        /// Why it failed.
        message: String,
    },
    /// A request got no answer in time. The SDK treats this as a dead connection: it closes it,
    /// and whatever owns it (producer, consumer) reconnects.
    #[error("no answer to '{route}' within {}", humantime::format_duration(*.after))]
    Timeout {
        /// Route of the request that timed out.
        route: String,
        /// The request timeout in force.
        after: Duration,
    },
    /// The connection is closed (by the broker, the network, a timeout or [`crate::Client::close`]).
    #[error("connection closed: {0}")]
    Closed(String),
    /// The broker refused the request with a stable error code.
    #[error("broker error {0}")]
    Broker(WireError),
    /// A payload could not be encoded or the broker's answer was not the expected MessagePack.
    #[error("codec error: {0}")]
    Codec(Arc<CodecError>),
    /// The broker's answer broke the protocol (no data, inconsistent sequence numbers, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The caller passed something the broker would refuse (checked before sending, so that one
    /// bad message does not fail a whole batch of other callers' messages).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<WireError> for SdkError {
    fn from(e: WireError) -> Self {
        SdkError::Broker(e)
    }
}

impl From<CodecError> for SdkError {
    fn from(e: CodecError) -> Self {
        SdkError::Codec(Arc::new(e))
    }
}

impl SdkError {
    /// The broker's error code, when the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SdkError::Broker(w) => Some(w.code),
            _ => None,
        }
    }

    /// True when the connection is gone or unusable: the request may or may not have been
    /// processed, and a new connection is needed.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            SdkError::Connect { .. } | SdkError::Timeout { .. } | SdkError::Closed(_)
        )
    }

    /// True when the same request may succeed later (on this or a new connection).
    pub fn is_retryable(&self) -> bool {
        match self {
            SdkError::Broker(w) => w.code.is_retryable(),
            other => other.is_connection_error(),
        }
    }
}

/// RSocket error prefixes rsocket_rust puts in front of an ERROR frame's text
/// (`RSocketError`'s `Display`).
const RSOCKET_PREFIXES: &[&str] = &[
    "APPLICATION_ERROR: ",
    "REJECTED_SETUP: ",
    "INVALID_SETUP: ",
    "UNSUPPORTED_SETUP: ",
    "REJECTED: ",
    "INVALID: ",
    "CANCELLED: ",
    "CONNECTION_ERROR: ",
    "CONNECTION_CLOSE: ",
];

/// Strips rsocket_rust's `APPLICATION_ERROR: ` (or similar) prefix from an error's text.
pub(crate) fn strip_rsocket_prefix(text: &str) -> &str {
    RSOCKET_PREFIXES
        .iter()
        .find_map(|p| text.strip_prefix(p))
        .unwrap_or(text)
}

/// Parses the text of a broker error as surfaced by rsocket_rust (`"APPLICATION_ERROR: 2002
/// MODE_CONFLICT: ..."` or the bare `"2002 MODE_CONFLICT: ..."`) into a [`WireError`]. Text
/// without a known code becomes [`ErrorCode::Internal`] carrying the whole text.
pub fn parse_broker_error(text: &str) -> WireError {
    WireError::parse(strip_rsocket_prefix(text.trim()))
}

/// Maps an error returned by rsocket_rust's client (an `anyhow::Error`, passed here as its
/// `dyn Error`) to an [`SdkError`].
pub(crate) fn from_rsocket(err: &(dyn std::error::Error + 'static)) -> SdkError {
    if let Some(e) = err.downcast_ref::<RSocketError>() {
        return match e {
            RSocketError::ApplicationException(text)
            | RSocketError::RequestRejected(text)
            | RSocketError::RequestInvalid(text)
            | RSocketError::RequestCancelled(text)
            | RSocketError::InvalidSetup(text)
            | RSocketError::UnsupportedSetup(text)
            | RSocketError::RejectedSetup(text)
            | RSocketError::RejectedResume(text) => SdkError::Broker(parse_broker_error(text)),
            RSocketError::ConnectionException(text) | RSocketError::ConnectionClosed(text) => {
                SdkError::Closed(text.clone())
            }
            RSocketError::IO(io) => SdkError::Closed(io.to_string()),
            // "request_response failed": the response channel was dropped.
            RSocketError::WithDescription(text) => SdkError::Closed(text.clone()),
            other => SdkError::Protocol(other.to_string()),
        };
    }
    let text = err.to_string();
    if RSOCKET_PREFIXES.iter().any(|p| text.starts_with(p)) {
        SdkError::Broker(parse_broker_error(&text))
    } else {
        SdkError::Protocol(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixed_application_error() {
        let w = parse_broker_error("APPLICATION_ERROR: 2002 MODE_CONFLICT: group g is shared");
        assert_eq!(w.code, ErrorCode::ModeConflict);
        assert_eq!(w.message, "group g is shared");
    }

    #[test]
    fn parses_bare_error_text() {
        let w = parse_broker_error("1004 UNKNOWN_ROUTE: no route 'foo'");
        assert_eq!(w.code, ErrorCode::UnknownRoute);
        assert_eq!(w.message, "no route 'foo'");
    }

    #[test]
    fn foreign_text_is_internal() {
        let w = parse_broker_error("APPLICATION_ERROR: UNIMPLEMENT");
        assert_eq!(w.code, ErrorCode::Internal);
        assert_eq!(w.message, "UNIMPLEMENT");
    }

    #[test]
    fn maps_rsocket_errors() {
        let app = RSocketError::ApplicationException("2001 UNKNOWN_GROUP: no group".into());
        let e = from_rsocket(&app);
        assert_eq!(e.code(), Some(ErrorCode::UnknownGroup));
        assert!(!e.is_retryable());

        let unavailable = RSocketError::ApplicationException("3002 UNAVAILABLE: restarting".into());
        assert!(from_rsocket(&unavailable).is_retryable());

        let gone = RSocketError::WithDescription("request_response failed".into());
        assert!(from_rsocket(&gone).is_connection_error());

        let closed = RSocketError::ConnectionClosed("bye".into());
        assert!(matches!(from_rsocket(&closed), SdkError::Closed(_)));
    }

    #[test]
    fn maps_through_anyhow_like_the_client_returns() {
        // rsocket_rust returns `anyhow::Error` built from `RSocketError`; the SDK sees it as
        // `&dyn Error` and must still find the code.
        let err: Box<dyn std::error::Error + Send + Sync> = Box::new(
            RSocketError::ApplicationException("1008 INVALID_REQUEST: empty topic".into()),
        );
        let e = from_rsocket(err.as_ref());
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest));
        assert_eq!(
            e.to_string(),
            "broker error 1008 INVALID_REQUEST: empty topic"
        );
    }

    #[test]
    fn timeout_display_is_humantime() {
        let e = SdkError::Timeout {
            route: "publish".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(e.to_string(), "no answer to 'publish' within 10s");
        assert!(e.is_connection_error());
    }
}
