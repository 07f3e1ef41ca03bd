//! One RSocket connection to a broker: SETUP, routed MessagePack requests with timeouts, close
//! detection.
//!
//! Built on rsocket_rust's client, with three things added around it (see
//! `DEPENDENCY-NOTES.md`):
//! - the `TcpStream` is opened here, with `TCP_NODELAY`, and handed to the client through a small
//!   transport wrapper (`SluiceTransport`) that also lets us *close* the connection (the crate's
//!   `Client` has no close) and records the broker's connection-level ERROR (a refused SETUP);
//! - every request-response runs under a timeout, because the crate's client waits forever once
//!   the connection died; a timeout closes the connection;
//! - the crate's `on_close` hook feeds a `watch` channel so requests and streams stop waiting as
//!   soon as the connection is gone.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, Stream, StreamExt};
use rsocket_rust::error::RSocketError;
use rsocket_rust::extension::{CompositeMetadata, MimeType, RoutingMetadata};
use rsocket_rust::frame::{Body, Frame};
use rsocket_rust::prelude::{Payload, RSocket, RSocketFactory};
use rsocket_rust::transport::{Connection, FrameSink, FrameStream, Transport};
use rsocket_rust::utils::Writeable;
use rsocket_rust_transport_tcp::TcpConnection;
use serde::{de::DeserializeOwned, Serialize};
use sluice_protocol::{ErrorCode, SetupRequest, WireError, DATA_MIME_TYPE, METADATA_MIME_TYPE};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::{from_rsocket, parse_broker_error, Result, SdkError};

/// Most credits one REQUEST_STREAM or REQUEST_N may carry (2^31-1, which RSocket also reads as
/// "unbounded").
pub const MAX_REQUEST_N: u32 = 0x7FFF_FFFF;

/// Default broker address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";

/// How to reach a broker and how patient to be with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` of the broker (default `127.0.0.1:7070`).
    pub addr: String,
    /// Identity sent in SETUP, shown in the broker's stats and logs (1..=256 bytes).
    pub client_id: String,
    /// Longest wait for the answer to one request-response (default 10 s). A request that times
    /// out closes the connection: rsocket_rust's client cannot tell a slow broker from a dead one.
    pub request_timeout: Duration,
    /// Longest wait for the TCP connection to open (default 5 s).
    pub connect_timeout: Duration,
    /// Keepalive interval announced in SETUP (default 20 s).
    pub keepalive: Duration,
    /// Keepalive lifetime announced in SETUP (default 90 s): the broker drops the connection if
    /// it hears nothing for this long.
    pub lifetime: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addr: DEFAULT_ADDR.to_string(),
            client_id: format!("sluice-sdk-{}", std::process::id()),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(20),
            lifetime: Duration::from_secs(90),
        }
    }
}

impl ClientConfig {
    /// Defaults, with the broker at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            ..Default::default()
        }
    }

    /// Sets the client id sent in SETUP.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Sets the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the keepalive interval and lifetime announced in SETUP.
    pub fn keepalive(mut self, interval: Duration, lifetime: Duration) -> Self {
        self.keepalive = interval;
        self.lifetime = lifetime;
        self
    }

    /// Checks the values before they are used.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SdkError::InvalidArgument(m));
        if self.addr.trim().is_empty() {
            return bad("broker address is empty".into());
        }
        if self.client_id.is_empty() || self.client_id.len() > 256 {
            return bad(format!(
                "client id must be 1..=256 bytes, got {}",
                self.client_id.len()
            ));
        }
        for (name, d) in [
            ("request timeout", self.request_timeout),
            ("connect timeout", self.connect_timeout),
            ("keepalive", self.keepalive),
            ("lifetime", self.lifetime),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than zero"));
            }
        }
        if self.lifetime < self.keepalive {
            return bad("keepalive lifetime must not be shorter than its interval".into());
        }
        Ok(())
    }
}

/// A connection to a broker. Cheap to clone: clones share the connection, which closes when the
/// last clone is dropped or [`Client::close`] is called.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    socket: rsocket_rust::Client,
    config: ClientConfig,
    state: Arc<ConnState>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // rsocket_rust's client never closes its socket on its own; ending our read side makes
        // its read loop stop, which in turn stops its writer, and the TCP stream is dropped.
        self.state.request_shutdown("client dropped");
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.config.addr)
            .field("client_id", &self.inner.config.client_id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Shared between the client handle, the transport wrapper and the `on_close` hook.
struct ConnState {
    /// Set by rsocket_rust's `on_close` hook once its read loop has ended.
    closed: watch::Sender<bool>,
    /// Set by us to end the read side (close, drop, timeout).
    shutdown: watch::Sender<bool>,
    /// Why the connection closed, when known: a connection-level ERROR from the broker (e.g. a
    /// refused SETUP) or our own reason.
    reason: Mutex<Option<CloseReason>>,
    /// `initial_request_n` for the next REQUEST_STREAM frame sent (rsocket_rust always asks
    /// for 2^31-1 items, i.e. unbounded): set by [`Client::request_stream_n`].
    next_stream_credits: Mutex<Option<u32>>,
}

#[derive(Debug, Clone)]
enum CloseReason {
    Broker(WireError),
    Local(String),
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            closed: watch::Sender::new(false),
            shutdown: watch::Sender::new(false),
            reason: Mutex::new(None),
            next_stream_credits: Mutex::new(None),
        }
    }

    /// An outbound frame, with the credits of [`Client::request_stream_n`] put into the first
    /// frame of the request-stream it opened.
    fn outbound(&self, frame: Frame) -> Frame {
        if !matches!(frame.get_body_ref(), Body::RequestStream(_)) {
            return frame;
        }
        let credits = self
            .next_stream_credits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(n) = credits else {
            return frame;
        };
        let (sid, flag) = (frame.get_stream_id(), frame.get_flag());
        match frame.get_body() {
            Body::RequestStream(r) => rsocket_rust::frame::RequestStream::builder(sid, flag)
                .set_initial_request_n(n)
                .set_all(r.split())
                .build(),
            other => Frame::new(sid, other, flag),
        }
    }

    fn set_reason_if_unset(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
    }

    fn request_shutdown(&self, why: &str) {
        self.set_reason_if_unset(CloseReason::Local(why.to_string()));
        self.shutdown.send_replace(true);
    }

    fn mark_closed(&self) {
        self.set_reason_if_unset(CloseReason::Local(
            "closed by the broker or the network".into(),
        ));
        self.closed.send_replace(true);
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow() || *self.shutdown.borrow()
    }

    /// The error to report for a request on (or interrupted by) a closed connection.
    fn closed_error(&self) -> SdkError {
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match reason {
            Some(CloseReason::Broker(w)) => SdkError::Broker(w),
            Some(CloseReason::Local(why)) => SdkError::Closed(why),
            None => SdkError::Closed("connection closed".into()),
        }
    }

    /// Resolves once the connection is closed or being closed.
    async fn wait_closed(&self) {
        let mut closed = self.closed.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            _ = closed.wait_for(|c| *c) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Inspects an inbound frame: a connection-level ERROR (stream 0) says why the broker is
    /// about to close the connection; rsocket_rust would drop it silently.
    fn inspect(&self, frame: &Frame) {
        if frame.get_stream_id() != 0 {
            return;
        }
        if let Body::Error(e) = frame.get_body_ref() {
            let text = e.get_data_utf8().unwrap_or("");
            let wire = if text.is_empty() {
                WireError::new(
                    ErrorCode::Internal,
                    format!("connection error 0x{:x}", e.get_code()),
                )
            } else {
                parse_broker_error(text)
            };
            tracing::warn!(code = e.get_code(), error = %wire, "broker sent a connection error");
            self.set_reason_if_unset(CloseReason::Broker(wire));
        }
    }
}

/// rsocket_rust transport over a `TcpStream` we opened ourselves (with `TCP_NODELAY`), whose
/// inbound side ends when [`ConnState::request_shutdown`] is called.
struct SluiceTransport {
    stream: TcpStream,
    state: Arc<ConnState>,
}

struct SluiceConnection {
    inner: TcpConnection,
    state: Arc<ConnState>,
}

#[rsocket_rust::async_trait]
impl Transport for SluiceTransport {
    type Conn = SluiceConnection;

    async fn connect(self) -> rsocket_rust::Result<SluiceConnection> {
        Ok(SluiceConnection {
            inner: TcpConnection::from(self.stream),
            state: self.state,
        })
    }
}

impl Connection for SluiceConnection {
    fn split(self) -> (Box<FrameSink>, Box<FrameStream>) {
        let (sink, stream) = self.inner.split();
        let outbound_state = self.state.clone();
        let sink = sink.with(move |frame: Frame| {
            futures::future::ready(Ok::<_, RSocketError>(outbound_state.outbound(frame)))
        });
        let inspect_state = self.state.clone();
        let mut shutdown = self.state.shutdown.subscribe();
        let stop = Box::pin(async move {
            // Also ends if the sender is gone (the state was dropped).
            let _ = shutdown.wait_for(|s| *s).await;
        });
        let stream = stream
            .inspect(move |item: &Result<Frame, RSocketError>| {
                if let Ok(frame) = item {
                    inspect_state.inspect(frame);
                }
            })
            .take_until(stop);
        (Box::new(sink), Box::new(stream))
    }
}

/// A stream of raw payloads from a request-stream, as rsocket_rust returns it.
pub(crate) type PayloadStream = Pin<Box<dyn Stream<Item = Result<Payload>> + Send>>;

impl Client {
    /// Opens a TCP connection to `config.addr`, sets `TCP_NODELAY`, and sends SETUP
    /// (MessagePack [`SetupRequest`], composite metadata, keepalive from `config`).
    ///
    /// rsocket_rust does not wait for the broker to accept the SETUP: a refused SETUP (wrong
    /// protocol version, bad client id) surfaces on the first request as
    /// [`SdkError::Broker`] with the broker's code.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let connect_err = |message: String| SdkError::Connect {
            addr: config.addr.clone(),
            message,
        };
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(&config.addr))
            .await
            .map_err(|_| {
                connect_err(format!(
                    "timed out after {}",
                    humantime::format_duration(config.connect_timeout)
                ))
            })?
            .map_err(|e| connect_err(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(format!("cannot set TCP_NODELAY: {e}")))?;

        let setup = sluice_protocol::encode(&SetupRequest::new(config.client_id.clone()))?;
        let state = Arc::new(ConnState::new());
        let on_close_state = state.clone();
        let socket = RSocketFactory::connect()
            .transport(SluiceTransport {
                stream,
                state: state.clone(),
            })
            .setup(Payload::new(Some(setup), None))
            .mime_type(METADATA_MIME_TYPE, DATA_MIME_TYPE)
            .keepalive(config.keepalive, config.lifetime, 1)
            .on_close(Box::new(move || on_close_state.mark_closed()))
            .start()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        tracing::debug!(addr = %config.addr, client_id = %config.client_id, "connected");
        Ok(Client {
            inner: Arc::new(Inner {
                socket,
                config,
                state,
            }),
        })
    }

    /// The configuration this client was connected with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// True once the connection is closed or closing; every request then fails at once.
    pub fn is_closed(&self) -> bool {
        self.inner.state.is_closed()
    }

    /// Resolves when the connection is closed (by the broker, the network, a timeout or
    /// [`Client::close`]).
    pub async fn closed(&self) {
        self.inner.state.wait_closed().await
    }

    /// Closes the connection for every clone of this client. Requests in flight fail with
    /// [`SdkError::Closed`].
    pub fn close(&self) {
        self.inner.state.request_shutdown("closed by the client");
    }

    /// The error a request on this (closed) connection reports.
    pub(crate) fn closed_error(&self) -> SdkError {
        self.inner.state.closed_error()
    }

    /// Sends one request-response on `route`: `req` as MessagePack, the route in composite
    /// routing metadata; decodes the answer as `Resp`.
    ///
    /// Fails with [`SdkError::Timeout`] (and closes the connection) if no answer comes within
    /// [`ClientConfig::request_timeout`], with [`SdkError::Closed`] if the connection closes
    /// first, and with [`SdkError::Broker`] if the broker refused the request.
    pub async fn request<Req, Resp>(&self, route: &str, req: &Req) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let data = sluice_protocol::encode(req)?;
        self.request_data(route, data).await
    }

    /// Like [`Client::request`], with the request already encoded as MessagePack: `data`
    /// becomes the payload's data as is.
    pub(crate) async fn request_data<Resp>(&self, route: &str, data: Bytes) -> Result<Resp>
    where
        Resp: DeserializeOwned,
    {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let payload = Payload::new(Some(data), Some(route_metadata(route)?));
        let timeout = self.inner.config.request_timeout;
        let answer = tokio::select! {
            r = tokio::time::timeout(timeout, self.inner.socket.request_response(payload)) => r,
            _ = self.inner.state.wait_closed() => return Err(self.closed_error()),
        };
        match answer {
            Err(_) => {
                tracing::warn!(
                    route,
                    timeout = %humantime::format_duration(timeout),
                    "request timed out; closing the connection"
                );
                self.inner.state.request_shutdown("a request timed out");
                Err(SdkError::Timeout {
                    route: route.to_string(),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                let err = from_rsocket(e.as_ref());
                if err.is_connection_error() && self.is_closed() {
                    Err(self.closed_error())
                } else {
                    Err(err)
                }
            }
            Ok(Ok(None)) => Err(SdkError::Protocol(format!(
                "'{route}' answered without a payload"
            ))),
            Ok(Ok(Some(p))) => decode_data(route, &p),
        }
    }

    /// Opens a request-stream on `route`. Items are raw payloads; errors are already mapped.
    /// The stream never ends by itself when the connection dies (rsocket_rust keeps it open):
    /// watch [`Client::closed`] alongside it.
    pub(crate) fn request_stream<Req>(&self, route: &str, req: &Req) -> Result<PayloadStream>
    where
        Req: Serialize + ?Sized,
    {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let payload = request_payload(route, req)?;
        let flux = self.inner.socket.request_stream(payload);
        Ok(Box::pin(
            flux.map(|item| item.map_err(|e| from_rsocket(e.as_ref()))),
        ))
    }

    /// Like [`Client::request_stream`], asking the broker for at most `initial_n` items (the
    /// REQUEST_STREAM's `initial_request_n`; no REQUEST_N follows) instead of unbounded ones.
    /// The credits go to the next request-stream sent on this connection: open no other one
    /// concurrently.
    pub(crate) fn request_stream_n<Req>(
        &self,
        route: &str,
        req: &Req,
        initial_n: u32,
    ) -> Result<PayloadStream>
    where
        Req: Serialize + ?Sized,
    {
        if initial_n == 0 || initial_n > MAX_REQUEST_N {
            return Err(SdkError::InvalidArgument(format!(
                "stream credits must be in 1..={MAX_REQUEST_N}, got {initial_n}"
            )));
        }
        *self
            .inner
            .state
            .next_stream_credits
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(initial_n);
        self.request_stream(route, req)
    }
}

/// Composite metadata holding one routing entry naming `route`.
pub(crate) fn route_metadata(route: &str) -> Result<Bytes> {
    if route.is_empty() || route.len() > 255 {
        return Err(SdkError::InvalidArgument(format!(
            "route name must be 1..=255 bytes: '{route}'"
        )));
    }
    let mut tag = BytesMut::new();
    RoutingMetadata::builder()
        .push_str(route)
        .build()
        .write_to(&mut tag);
    let composite = CompositeMetadata::builder()
        .push(MimeType::MESSAGE_X_RSOCKET_ROUTING_V0, tag)
        .build();
    let mut out = BytesMut::new();
    composite.write_to(&mut out);
    Ok(out.freeze())
}

fn request_payload<Req: Serialize + ?Sized>(route: &str, req: &Req) -> Result<Payload> {
    let metadata = route_metadata(route)?;
    let data = sluice_protocol::encode(req)?;
    Ok(Payload::new(Some(data), Some(metadata)))
}

/// Decodes a payload's data as `T`.
pub(crate) fn decode_data<T: DeserializeOwned>(route: &str, p: &Payload) -> Result<T> {
    match p.data() {
        Some(data) => Ok(sluice_protocol::decode(data)?),
        None => Err(SdkError::Protocol(format!(
            "'{route}' answered with an empty payload"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_metadata_layout() {
        let m = route_metadata("publish").expect("metadata");
        // well-known mime 0x7E with the high bit set, u24 length, then the routing tag
        // (u8 length + bytes).
        assert_eq!(m[0], 0x80 | 0x7E);
        assert_eq!(&m[1..4], &[0, 0, 8]);
        assert_eq!(m[4], 7);
        assert_eq!(&m[5..], b"publish");

        let mut back = BytesMut::from(&m[..]);
        let decoded = CompositeMetadata::decode(&mut back).expect("decode");
        let entry = decoded.iter().next().expect("one entry");
        assert_eq!(
            entry.get_mime_type().as_str(),
            Some(sluice_protocol::ROUTING_MIME_TYPE)
        );
        let mut tags = BytesMut::from(&entry.get_metadata()[..]);
        let routing = RoutingMetadata::decode(&mut tags).expect("routing");
        assert_eq!(routing.get_tags(), &vec!["publish".to_string()]);
    }

    #[test]
    fn rejects_bad_route_names() {
        assert!(route_metadata("").is_err());
        assert!(route_metadata(&"x".repeat(256)).is_err());
    }

    #[test]
    fn config_validation() {
        assert!(ClientConfig::default().validate().is_ok());
        assert!(ClientConfig::new("").validate().is_err());
        assert!(ClientConfig::default().client_id("").validate().is_err());
        assert!(ClientConfig::default()
            .request_timeout(Duration::ZERO)
            .validate()
            .is_err());
        assert!(ClientConfig::default()
            .keepalive(Duration::from_secs(30), Duration::from_secs(10))
            .validate()
            .is_err());
    }

    #[test]
    fn connection_error_frame_sets_reason() {
        let state = ConnState::new();
        let frame = rsocket_rust::frame::Error::builder(0, 0)
            .set_code(0x3)
            .set_data(Bytes::from_static(b"1001 UNSUPPORTED_VERSION: speak 1..=1"))
            .build();
        state.inspect(&frame);
        state.mark_closed();
        assert!(state.is_closed());
        match state.closed_error() {
            SdkError::Broker(w) => assert_eq!(w.code, ErrorCode::UnsupportedVersion),
            other => panic!("unexpected {other:?}"),
        }
    }
}
