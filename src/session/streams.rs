//! Request metadata (composite + routing) parsing, fragment reassembly and the stream-id rule.

use bytes::{Bytes, BytesMut};
use rsocket_rust::extension::{CompositeMetadata, MimeType, RoutingMetadata};
use sluice_protocol::{ErrorCode, WireError};

/// Extracts the single route tag from a request's composite metadata.
pub fn route_of(metadata: Option<&Bytes>) -> Result<String, WireError> {
    let Some(m) = metadata.filter(|m| !m.is_empty()) else {
        return Err(WireError::new(
            ErrorCode::MissingRoute,
            "request has no routing metadata",
        ));
    };
    let mut buf = BytesMut::from(&m[..]);
    let composite = CompositeMetadata::decode(&mut buf).map_err(|e| {
        WireError::new(
            ErrorCode::MissingRoute,
            format!("bad composite metadata: {e}"),
        )
    })?;
    for entry in composite.iter() {
        let is_routing = match entry.get_mime_type() {
            MimeType::WellKnown(n) => *n == 0x7E,
            MimeType::Normal(s) => s == sluice_protocol::ROUTING_MIME_TYPE,
        };
        if !is_routing {
            continue;
        }
        let mut rb = BytesMut::from(&entry.get_metadata()[..]);
        let routing = RoutingMetadata::decode(&mut rb).map_err(|e| {
            WireError::new(
                ErrorCode::MissingRoute,
                format!("bad routing metadata: {e}"),
            )
        })?;
        return match routing.get_tags().as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(WireError::new(
                ErrorCode::MissingRoute,
                "routing metadata has no tag",
            )),
            _ => Err(WireError::new(
                ErrorCode::InvalidRequest,
                "routing metadata must carry exactly one tag",
            )),
        };
    }
    Err(WireError::new(
        ErrorCode::MissingRoute,
        "composite metadata has no routing entry",
    ))
}

/// Most requests one connection may have in reassembly at once (each costs memory even when
/// its fragments are empty).
pub const MAX_PARTIALS: usize = 64;

/// Checks the stream id of a new request from the client. RSocket gives the client the odd
/// stream ids (the server's own streams would be even); a request on an even id is a protocol
/// error. Whether ids increase is not checked: rsocket_rust's client hands each request to a
/// task of its own after picking its id, so concurrent requests reach the wire out of id order.
pub fn check_request_stream_id(sid: u32) -> Result<(), String> {
    if sid & 1 == 0 {
        Err(format!(
            "request on stream {sid}: a client's requests use odd stream ids"
        ))
    } else {
        Ok(())
    }
}

/// The kind of request a fragmented frame started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// REQUEST_RESPONSE
    Response,
    /// REQUEST_FNF
    FireAndForget,
    /// REQUEST_STREAM with its initial request n.
    Stream(u32),
    /// REQUEST_CHANNEL
    Channel,
}

/// A request being reassembled from fragments (FOLLOWS flag).
#[derive(Debug)]
pub struct Partial {
    /// Stream id.
    pub stream_id: u32,
    /// What the first fragment was.
    pub kind: RequestKind,
    metadata: BytesMut,
    data: BytesMut,
}

impl Partial {
    /// Starts a reassembly with the first fragment.
    pub fn new(
        stream_id: u32,
        kind: RequestKind,
        metadata: Option<&Bytes>,
        data: Option<&Bytes>,
    ) -> Self {
        let mut p = Partial {
            stream_id,
            kind,
            metadata: BytesMut::new(),
            data: BytesMut::new(),
        };
        p.extend(metadata, data);
        p
    }

    /// Adds a following fragment.
    pub fn extend(&mut self, metadata: Option<&Bytes>, data: Option<&Bytes>) {
        if let Some(m) = metadata {
            self.metadata.extend_from_slice(m);
        }
        if let Some(d) = data {
            self.data.extend_from_slice(d);
        }
    }

    /// Bytes buffered so far.
    pub fn len(&self) -> usize {
        self.metadata.len() + self.data.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The reassembled (metadata, data).
    pub fn finish(self) -> (Option<Bytes>, Option<Bytes>) {
        let m = (!self.metadata.is_empty()).then(|| self.metadata.freeze());
        let d = (!self.data.is_empty()).then(|| self.data.freeze());
        (m, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsocket_rust::extension::CompositeMetadataEntry;

    fn routing(tags: &[&str]) -> Bytes {
        let mut b = RoutingMetadata::builder();
        for t in tags {
            b = b.push_str(t);
        }
        let r: RoutingMetadata = b.build();
        let mut rb = BytesMut::new();
        rsocket_rust::utils::Writeable::write_to(&r, &mut rb);
        let c = CompositeMetadata::builder()
            .push_entry(CompositeMetadataEntry::new(
                MimeType::from(sluice_protocol::ROUTING_MIME_TYPE),
                rb.freeze(),
            ))
            .build();
        c.into()
    }

    #[test]
    fn finds_route() {
        assert_eq!(route_of(Some(&routing(&["publish"]))).unwrap(), "publish");
        assert_eq!(route_of(None).unwrap_err().code, ErrorCode::MissingRoute);
        assert_eq!(
            route_of(Some(&routing(&["a", "b"]))).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            route_of(Some(&Bytes::from_static(b"\x01")))
                .unwrap_err()
                .code,
            ErrorCode::MissingRoute
        );
    }

    #[test]
    fn client_requests_use_odd_ids() {
        assert!(check_request_stream_id(1).is_ok());
        assert!(check_request_stream_id(0x7FFF_FFFF).is_ok());
        assert!(check_request_stream_id(2).is_err());
        assert!(check_request_stream_id(0).is_err());
    }

    #[test]
    fn reassembles() {
        let mut p = Partial::new(
            1,
            RequestKind::Response,
            Some(&Bytes::from_static(b"m")),
            Some(&Bytes::from_static(b"d1")),
        );
        p.extend(None, Some(&Bytes::from_static(b"d2")));
        assert_eq!(p.len(), 5);
        let (m, d) = p.finish();
        assert_eq!(m.unwrap(), Bytes::from_static(b"m"));
        assert_eq!(d.unwrap(), Bytes::from_static(b"d1d2"));
    }
}
