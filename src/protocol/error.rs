//! Stable numeric error codes. A code is never reused for another meaning.
//!
//! On the wire an error is an RSocket ERROR frame (APPLICATION_ERROR `0x201` on a request's
//! stream, or a connection-level code on stream 0) whose data is UTF-8 text of the form
//! `"<code> <NAME>: <message>"`, e.g. `"1004 UNKNOWN_ROUTE: no route 'foo'"`.

use std::fmt;

/// A stable error code. See `docs/protocol.md` for the full catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The SETUP names a protocol version outside the broker's supported range.
    UnsupportedVersion,
    /// The SETUP payload is missing, not MessagePack, or has bad fields.
    InvalidSetup,
    /// A frame failed validation; the connection is closed.
    MalformedFrame,
    /// The route tag names no known route.
    UnknownRoute,
    /// A request carried no routing metadata.
    MissingRoute,
    /// The request data is not the MessagePack the route expects.
    BadPayload,
    /// A message payload (or a whole request) is larger than the configured limit.
    PayloadTooLarge,
    /// The request decoded but a field is invalid (empty topic name, bad priority, ...).
    InvalidRequest,
    /// The route exists but not for this interaction model (e.g. `publish` as request-stream).
    WrongInteraction,
    /// A request arrived before SETUP.
    NotSetUp,
    /// LEASE / RESUME are not supported.
    Unsupported,
    /// The group does not exist.
    UnknownGroup,
    /// The group exists with another mode.
    ModeConflict,
    /// The group exists with other header filters.
    FilterConflict,
    /// An exclusive group already has a consumer.
    ExclusiveTaken,
    /// The topic does not exist (also: a publish to an unknown topic when the broker runs with
    /// `auto_create_topics = false`).
    UnknownTopic,
    /// `admin.fault` on a broker started without `--enable-fault-injection`.
    FaultInjectionDisabled,
    /// `admin.fault` named no running actor.
    UnknownActor,
    /// `topic.create` of a topic that exists (use `topic.alter`).
    TopicExists,
    /// `group.delete` of a group that has consumers connected.
    GroupBusy,
    /// The subscription was ended because its consumer was stale (lag and no ack for too long).
    StaleConsumer,
    /// The topic or group the subscription was on was deleted.
    Deleted,
    /// The store failed to read or write.
    StorageError,
    /// The broker cannot serve the request now (an actor restarting, shutting down); retry.
    Unavailable,
    /// The broker did not finish the request in time.
    Timeout,
    /// A bug: the broker hit a state it did not expect.
    Internal,
}

impl ErrorCode {
    /// Every code, in catalogue order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidSetup,
        ErrorCode::MalformedFrame,
        ErrorCode::UnknownRoute,
        ErrorCode::MissingRoute,
        ErrorCode::BadPayload,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidRequest,
        ErrorCode::WrongInteraction,
        ErrorCode::NotSetUp,
        ErrorCode::Unsupported,
        ErrorCode::UnknownGroup,
        ErrorCode::ModeConflict,
        ErrorCode::FilterConflict,
        ErrorCode::ExclusiveTaken,
        ErrorCode::UnknownTopic,
        ErrorCode::FaultInjectionDisabled,
        ErrorCode::UnknownActor,
        ErrorCode::TopicExists,
        ErrorCode::GroupBusy,
        ErrorCode::StaleConsumer,
        ErrorCode::Deleted,
        ErrorCode::StorageError,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];

    /// The stable number of this code.
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::UnsupportedVersion => 1001,
            ErrorCode::InvalidSetup => 1002,
            ErrorCode::MalformedFrame => 1003,
            ErrorCode::UnknownRoute => 1004,
            ErrorCode::MissingRoute => 1005,
            ErrorCode::BadPayload => 1006,
            ErrorCode::PayloadTooLarge => 1007,
            ErrorCode::InvalidRequest => 1008,
            ErrorCode::WrongInteraction => 1009,
            ErrorCode::NotSetUp => 1010,
            ErrorCode::Unsupported => 1011,
            ErrorCode::UnknownGroup => 2001,
            ErrorCode::ModeConflict => 2002,
            ErrorCode::FilterConflict => 2003,
            ErrorCode::ExclusiveTaken => 2004,
            ErrorCode::UnknownTopic => 2005,
            ErrorCode::FaultInjectionDisabled => 2006,
            ErrorCode::UnknownActor => 2007,
            ErrorCode::TopicExists => 2008,
            ErrorCode::GroupBusy => 2009,
            ErrorCode::StaleConsumer => 2010,
            ErrorCode::Deleted => 2011,
            ErrorCode::StorageError => 3001,
            ErrorCode::Unavailable => 3002,
            ErrorCode::Timeout => 3003,
            ErrorCode::Internal => 3004,
        }
    }

    /// The stable SCREAMING_SNAKE name of this code.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::InvalidSetup => "INVALID_SETUP",
            ErrorCode::MalformedFrame => "MALFORMED_FRAME",
            ErrorCode::UnknownRoute => "UNKNOWN_ROUTE",
            ErrorCode::MissingRoute => "MISSING_ROUTE",
            ErrorCode::BadPayload => "BAD_PAYLOAD",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::WrongInteraction => "WRONG_INTERACTION",
            ErrorCode::NotSetUp => "NOT_SET_UP",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::UnknownGroup => "UNKNOWN_GROUP",
            ErrorCode::ModeConflict => "MODE_CONFLICT",
            ErrorCode::FilterConflict => "FILTER_CONFLICT",
            ErrorCode::ExclusiveTaken => "EXCLUSIVE_TAKEN",
            ErrorCode::UnknownTopic => "UNKNOWN_TOPIC",
            ErrorCode::FaultInjectionDisabled => "FAULT_INJECTION_DISABLED",
            ErrorCode::UnknownActor => "UNKNOWN_ACTOR",
            ErrorCode::TopicExists => "TOPIC_EXISTS",
            ErrorCode::GroupBusy => "GROUP_BUSY",
            ErrorCode::StaleConsumer => "STALE_CONSUMER",
            ErrorCode::Deleted => "DELETED",
            ErrorCode::StorageError => "STORAGE_ERROR",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// The code with this number, if any.
    pub fn from_u32(n: u32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_u32() == n)
    }

    /// Whether a client may retry the same request later and expect it to succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::StorageError
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_u32(), self.name())
    }
}

/// An error as it travels on the wire: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl WireError {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// The ERROR frame's data: `"<code> <NAME>: <message>"`.
    pub fn to_text(&self) -> String {
        self.to_string()
    }

    /// Parses the text written by [`WireError::to_text`]. Text that does not start with a known
    /// code (an error from a non-Sluice peer) becomes [`ErrorCode::Internal`] with the whole text.
    pub fn parse(text: &str) -> WireError {
        let parsed = text.split_once(' ').and_then(|(num, rest)| {
            let code = ErrorCode::from_u32(num.trim().parse().ok()?)?;
            let message = rest
                .strip_prefix(code.name())
                .and_then(|r| r.strip_prefix(':'))
                .map(|m| m.trim_start().to_string())?;
            Some(WireError { code, message })
        });
        parsed.unwrap_or_else(|| WireError::new(ErrorCode::Internal, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_u32()), "duplicate code {c}");
            assert_eq!(ErrorCode::from_u32(c.as_u32()), Some(*c));
        }
    }

    #[test]
    fn text_round_trip() {
        let e = WireError::new(ErrorCode::UnknownRoute, "no route 'foo'");
        assert_eq!(e.to_text(), "1004 UNKNOWN_ROUTE: no route 'foo'");
        assert_eq!(WireError::parse(&e.to_text()), e);
        let foreign = WireError::parse("something else");
        assert_eq!(foreign.code, ErrorCode::Internal);
        assert_eq!(foreign.message, "something else");
    }
}
