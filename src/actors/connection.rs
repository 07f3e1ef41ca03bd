//! ConnectionActor: one per client connection; speaks the server half of RSocket itself on
//! rsocket_rust's frame codec (see `src/session/`), owns the connection's streams, REQUEST_N
//! credits and liveness, and forwards requests to the store, orchestrators and registry.
//!
//! Lifecycle: accepted → waiting for SETUP (closed after `setup_timeout`) → ready → closed when
//! the peer closes, the socket fails, a frame is malformed, nothing arrives for the keepalive
//! lifetime (a quiet client is first asked for a sign of life with a KEEPALIVE carrying RESPOND),
//! or the client does not read (more than [`ConnectionLimits::max_queued_bytes`] waiting to be
//! written). On stop, every subscription leaves its group (its in-flight batches are redelivered
//! at once) and the writer drains and drops the socket (or, for a client that does not read,
//! drops what is queued at once).

mod events;
mod manage;

use super::messages::{
    AckBatch, AppendMessages, ConnectionClosed, ConnectionLinks, DeliverBatch, GetConnectionStats,
    GetStats, GrantCredits, InjectFaultByName, JoinGroup, KickConsumer, LeaveGroup, NackBatch,
    OrchestratorLinks, RegisterConnection, RegistryLinks, Rejoin, StreamNotice, SubscriptionOpened,
    TopicAdminLinks,
};
use super::{shard_for, ActorCounters, ConsumerId, InjectFault};
use crate::config::Config;
use crate::session::frame::{try_encode_frame, FrameCodec, FrameError, FrameTooLarge, Inbound};
use crate::session::keepalive::{Keepalive, Liveness};
use crate::session::streams::{
    check_request_stream_id, route_of, Partial, RequestKind, MAX_PARTIALS,
};
use crate::session::writer::{spawn_writer, SendError, WriterEnd, WriterHandle};
use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use rsocket_rust::frame::{self as rf, Body, Frame};
use serde::de::DeserializeOwned;
use sluice_protocol::subscribe::validate_name;
use sluice_protocol::{
    check_version, route, AckRequest, ConnectionStats, ErrorCode, FaultReply, FaultRequest,
    NackRequest, PublishReply, PublishRequest, SetupRequest, StatsRequest, SubscribeRequest,
    WireError, MAX_PRIORITY,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use sluice_protocol::{MAX_BATCH_SIZE, MAX_WINDOW};

const ERR_INVALID_SETUP: u32 = 0x001;
const ERR_UNSUPPORTED_SETUP: u32 = 0x002;
const ERR_REJECTED_SETUP: u32 = 0x003;
const ERR_REJECTED_RESUME: u32 = 0x004;
const ERR_CONNECTION_ERROR: u32 = 0x101;
const ERR_APPLICATION_ERROR: u32 = 0x201;
const FLAG_LEASE: u16 = 0x040;
const FLAG_RESUME_ENABLE: u16 = 0x080;

/// Default of [`ConnectionLimits::max_queued_bytes`]: 64 MiB.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Limits of every connection (from the configuration).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most bytes waiting to be written to one client (encoded frames handed to the writer and
    /// not yet accepted by the socket). A client that lets more pile up does not read: it is
    /// disconnected, and its batches go back to their groups.
    pub max_queued_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

/// Broker-wide counters of what the connections refused or cut short; shared by every
/// connection.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// Connections closed because the client did not read (queue over `max_queued_bytes`).
    pub slow_clients_disconnected: AtomicU64,
    /// Batches not sent because their frame would not fit the RSocket frame limit.
    pub oversize_batches_dropped: AtomicU64,
    /// Connections closed because nothing arrived for the keepalive lifetime.
    pub lifetimes_expired: AtomicU64,
    /// KEEPALIVE frames with RESPOND sent to quiet clients.
    pub keepalive_pings: AtomicU64,
    /// Lifecycle events dropped for `admin.events` subscribers that had no credit for them.
    pub events_lost: AtomicU64,
}

impl ConnectionCounters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters for `admin.stats`.
    pub fn snapshot(&self) -> sluice_protocol::LimitStats {
        sluice_protocol::LimitStats {
            slow_clients_disconnected: self.slow_clients_disconnected.load(Ordering::Relaxed),
            oversize_batches_dropped: self.oversize_batches_dropped.load(Ordering::Relaxed),
            lifetimes_expired: self.lifetimes_expired.load(Ordering::Relaxed),
            keepalive_pings: self.keepalive_pings.load(Ordering::Relaxed),
            events_lost: self.events_lost.load(Ordering::Relaxed),
        }
    }
}

/// Handles every connection needs.
#[derive(Clone)]
pub struct BrokerLinks {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Limits not in the configuration.
    pub limits: ConnectionLimits,
    /// Counters shared by every connection.
    pub counters: Arc<ConnectionCounters>,
    /// The store (publishes).
    pub store: Recipient<AppendMessages>,
    /// Orchestrators by shard.
    pub orchestrators: Arc<Vec<OrchestratorLinks>>,
    /// The registry.
    pub registry: RegistryLinks,
    /// `topic.*` routes go to the store.
    pub topics: TopicAdminLinks,
    /// Lifecycle events (`admin.events`).
    pub events: crate::events::EventBus,
}

impl BrokerLinks {
    fn orchestrator(&self, topic: &str) -> (usize, OrchestratorLinks) {
        let shard = shard_for(topic, self.orchestrators.len());
        (shard, self.orchestrators[shard].clone())
    }
}

impl ConnectionLinks {
    /// The recipients of a connection actor.
    pub fn of(addr: &Addr<ConnectionActor>) -> ConnectionLinks {
        ConnectionLinks {
            rejoin: addr.clone().recipient(),
            stats: addr.clone().recipient(),
            fault: addr.clone().recipient(),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

#[derive(Message)]
#[rtype(result = "()")]
struct WriterEnded(WriterEnd);

struct Subscription {
    /// Redelivery schedule asked for (ms per step), already checked.
    backoff_ms: Option<Vec<u64>>,
    topic: String,
    group: String,
    shard: usize,
    req: SubscribeRequest,
    window: u32,
    batch_size: u32,
    /// Credits left from the client's point of view (REQUEST_N total − items sent).
    credits: u64,
    joined: bool,
    /// Credits granted while the join was in progress.
    pending_credits: u64,
}

enum StreamState {
    /// A request-response awaiting its reply.
    Request,
    /// A subscribe stream.
    Subscription(Box<Subscription>),
    /// An `admin.events` stream.
    Events(Box<events::EventsSub>),
}

/// The connection actor.
pub struct ConnectionActor {
    id: u64,
    peer: SocketAddr,
    links: BrokerLinks,
    client_id: Option<String>,
    keepalive: Keepalive,
    connected_at: Instant,
    out: BytesMut,
    flush_scheduled: bool,
    writer: Option<WriterHandle>,
    streams: HashMap<u32, StreamState>,
    partials: HashMap<u32, Partial>,
    partial_bytes: usize,
    in_flight_batches: u32,
    closing: bool,
    counters: ActorCounters,
}

impl ConnectionActor {
    /// Starts the actor for an accepted socket on the current arbiter.
    pub fn start_for(
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        links: BrokerLinks,
    ) -> Addr<ConnectionActor> {
        let _ = stream.set_nodelay(true);
        ConnectionActor::create(move |ctx| {
            let (r, w) = stream.into_split();
            ctx.add_stream(FramedRead::with_capacity(
                r,
                FrameCodec::new(links.config.max_frame),
                // Small to start (an idle connection costs little); FramedRead grows it for
                // large frames and busy connections.
                8 * 1024,
            ));
            let addr = ctx.address();
            let writer = spawn_writer(
                w,
                links.config.lifetime,
                links.limits.max_queued_bytes,
                move |end| addr.do_send(WriterEnded(end)),
            );
            ConnectionActor {
                id,
                peer,
                keepalive: Keepalive::new(
                    links.config.lifetime,
                    links.config.keepalive,
                    Instant::now(),
                ),
                links,
                client_id: None,
                connected_at: Instant::now(),
                out: BytesMut::new(),
                flush_scheduled: false,
                writer: Some(writer),
                streams: HashMap::new(),
                partials: HashMap::new(),
                partial_bytes: 0,
                in_flight_batches: 0,
                closing: false,
                counters: ActorCounters::default(),
            }
        })
    }

    /// Encodes `frame` into the turn's buffer (nothing is written if it does not fit the
    /// 3-byte length prefix) and makes sure the buffer is handed to the writer this turn.
    fn send_frame(&mut self, frame: &Frame, ctx: &mut Context<Self>) -> Result<(), FrameTooLarge> {
        try_encode_frame(frame, &mut self.out)?;
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
        Ok(())
    }

    /// Hands what this turn encoded to the writer.
    fn hand_over(&mut self) -> Result<(), SendError> {
        self.flush_scheduled = false;
        if self.out.is_empty() {
            return Ok(());
        }
        let chunk = self.out.split().freeze();
        match &self.writer {
            Some(w) => w.send(chunk),
            None => Err(SendError::Closed),
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if let Err(SendError::Full {
            queued,
            chunk,
            limit,
        }) = self.hand_over()
        {
            self.not_reading(queued, chunk, limit, ctx);
        }
        // Closed: the writer has ended and `WriterEnded` stops the actor.
    }

    /// The client lets more than the limit pile up: it does not read. Drop what is queued for
    /// it and disconnect; its subscriptions leave their groups, which redeliver its batches.
    fn not_reading(&mut self, queued: usize, chunk: usize, limit: usize, ctx: &mut Context<Self>) {
        ConnectionCounters::bump(&self.links.counters.slow_clients_disconnected);
        tracing::warn!(
            conn_id = self.id,
            peer = %self.peer,
            client_id = self.client_id.as_deref().unwrap_or(""),
            queued,
            chunk,
            limit,
            "client does not read: more than the limit waits to be written to it; disconnecting (its batches are redelivered)"
        );
        self.memory_pressure(format!(
            "more than max_queued_bytes ({limit}) waits to be written to it"
        ));
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        self.closing = true;
        ctx.stop();
    }

    /// A `memory_pressure` event: this client is disconnected for not reading (`why`).
    fn memory_pressure(&self, why: String) {
        self.links.events.emit(
            sluice_protocol::BrokerEvent::now(sluice_protocol::event_kind::MEMORY_PRESSURE)
                .actor(format!("connection-{}", self.id))
                .detail(format!(
                    "client '{}' at {} does not read ({why}): disconnected, its batches redelivered",
                    self.client_id.as_deref().unwrap_or(""),
                    self.peer
                )),
        );
    }

    fn send_error(&mut self, sid: u32, code: u32, text: String, ctx: &mut Context<Self>) {
        let f = rf::Error::builder(sid, 0)
            .set_code(code)
            .set_data(Bytes::from(text))
            .build();
        if let Err(e) = self.send_frame(&f, ctx) {
            tracing::error!(conn_id = self.id, sid, error = %e, "ERROR frame not sent");
        }
    }

    /// Sends a connection-level ERROR and closes.
    fn fail(&mut self, code: u32, err: WireError, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        tracing::info!(conn_id = self.id, peer = %self.peer, error = %err, "closing connection");
        self.send_error(0, code, err.to_text(), ctx);
        self.closing = true;
        ctx.stop();
    }

    fn reply<T: serde::Serialize>(
        &mut self,
        sid: u32,
        res: Result<T, WireError>,
        ctx: &mut Context<Self>,
    ) {
        if !matches!(self.streams.remove(&sid), Some(StreamState::Request)) {
            return; // cancelled, or fire-and-forget
        }
        match res.and_then(|v| {
            sluice_protocol::encode(&v)
                .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
        }) {
            Ok(data) => {
                let f = rf::Payload::builder(sid, Frame::FLAG_NEXT | Frame::FLAG_COMPLETE)
                    .set_data(data)
                    .build();
                if let Err(e) = self.send_frame(&f, ctx) {
                    tracing::error!(conn_id = self.id, sid, error = %e, "reply too large for one frame");
                    let e = WireError::new(
                        ErrorCode::Internal,
                        format!("the reply does not fit one frame: {e}"),
                    );
                    self.send_error(sid, ERR_APPLICATION_ERROR, e.to_text(), ctx);
                }
            }
            Err(e) => self.send_error(sid, ERR_APPLICATION_ERROR, e.to_text(), ctx),
        }
    }

    fn on_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let sid = frame.get_stream_id();
        let flag = frame.get_flag();
        if self.client_id.is_none() {
            return match frame.get_body() {
                Body::Setup(s) => self.on_setup(s, flag, ctx),
                Body::Resume(_) => self.fail(
                    ERR_REJECTED_RESUME,
                    WireError::new(ErrorCode::Unsupported, "resumption is not supported"),
                    ctx,
                ),
                _ => self.fail(
                    ERR_CONNECTION_ERROR,
                    WireError::new(ErrorCode::NotSetUp, "the first frame must be SETUP"),
                    ctx,
                ),
            };
        }
        let follows = flag & Frame::FLAG_FOLLOW != 0;
        match frame.get_body() {
            Body::Setup(_) => self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(ErrorCode::MalformedFrame, "a second SETUP"),
                ctx,
            ),
            Body::Resume(_) | Body::ResumeOK(_) => self.fail(
                ERR_REJECTED_RESUME,
                WireError::new(ErrorCode::Unsupported, "resumption is not supported"),
                ctx,
            ),
            Body::Lease(_) => self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(ErrorCode::Unsupported, "LEASE is not supported"),
                ctx,
            ),
            Body::Keepalive(k) => {
                if flag & Frame::FLAG_RESPOND != 0 {
                    let mut b = rf::Keepalive::builder(0, 0);
                    if let Some(d) = k.get_data() {
                        b = b.set_data(d.clone());
                    }
                    let f = b.build();
                    // The echo is no larger than the frame that arrived (< max_frame).
                    let _ = self.send_frame(&f, ctx);
                }
            }
            Body::MetadataPush(_) => {}
            Body::RequestResponse(r) => {
                let (d, m) = r.split();
                self.on_request(sid, RequestKind::Response, m, d, follows, ctx)
            }
            Body::RequestFNF(r) => {
                let (d, m) = r.split();
                self.on_request(sid, RequestKind::FireAndForget, m, d, follows, ctx)
            }
            Body::RequestStream(r) => {
                let n = r.get_initial_request_n();
                let (d, m) = r.split();
                self.on_request(sid, RequestKind::Stream(n), m, d, follows, ctx)
            }
            Body::RequestChannel(r) => {
                let (d, m) = r.split();
                self.on_request(sid, RequestKind::Channel, m, d, follows, ctx)
            }
            Body::Payload(p) => {
                let (d, m) = p.split();
                self.on_payload(sid, m, d, follows, ctx)
            }
            Body::RequestN(n) => self.on_request_n(sid, n.get_n() as u64, ctx),
            Body::Cancel() => self.end_stream(sid, "cancelled", ctx),
            Body::Error(e) => {
                if sid == 0 {
                    let text = e.get_data_utf8().unwrap_or("").to_string();
                    tracing::info!(conn_id = self.id, code = e.get_code(), %text, "client sent a connection error");
                    self.closing = true;
                    ctx.stop();
                } else {
                    self.end_stream(sid, "client error", ctx);
                }
            }
        }
    }

    fn on_setup(&mut self, s: rf::Setup, flag: u16, ctx: &mut Context<Self>) {
        if flag & FLAG_LEASE != 0 {
            return self.fail(
                ERR_UNSUPPORTED_SETUP,
                WireError::new(ErrorCode::Unsupported, "LEASE is not supported"),
                ctx,
            );
        }
        if flag & FLAG_RESUME_ENABLE != 0 {
            return self.fail(
                ERR_UNSUPPORTED_SETUP,
                WireError::new(ErrorCode::Unsupported, "resumption is not supported"),
                ctx,
            );
        }
        let v = s.get_version();
        if v.get_major() != 1 {
            return self.fail(
                ERR_UNSUPPORTED_SETUP,
                WireError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "RSocket version {}.{} (need 1.x)",
                        v.get_major(),
                        v.get_minor()
                    ),
                ),
                ctx,
            );
        }
        let setup: SetupRequest = match s.get_data().map(|d| decode::<SetupRequest>(d)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return self.fail(
                    ERR_REJECTED_SETUP,
                    WireError::new(
                        ErrorCode::InvalidSetup,
                        format!("SETUP data: {}", e.message),
                    ),
                    ctx,
                )
            }
            None => {
                return self.fail(
                    ERR_REJECTED_SETUP,
                    WireError::new(ErrorCode::InvalidSetup, "SETUP has no data"),
                    ctx,
                )
            }
        };
        if let Err(e) = check_version(setup.version) {
            return self.fail(ERR_REJECTED_SETUP, e, ctx);
        }
        if setup.client_id.is_empty() || setup.client_id.len() > 256 {
            return self.fail(
                ERR_REJECTED_SETUP,
                WireError::new(ErrorCode::InvalidSetup, "client_id must be 1..=256 bytes"),
                ctx,
            );
        }
        let cfg = &self.links.config;
        let declared = s.get_lifetime();
        let lifetime = if declared.is_zero() {
            cfg.lifetime
        } else {
            declared.min(cfg.lifetime)
        };
        self.keepalive.set_lifetime(lifetime, cfg.keepalive);
        tracing::debug!(
            conn_id = self.id,
            client_id = %setup.client_id,
            ?lifetime,
            ping_every = ?self.keepalive.ping_every(),
            client_keepalive = ?s.get_keepalive(),
            "SETUP accepted"
        );
        self.client_id = Some(setup.client_id);
        self.links.registry.register.do_send(RegisterConnection {
            conn_id: self.id,
            links: ConnectionLinks::of(&ctx.address()),
        });
        ctx.run_interval(self.keepalive.check_every(), |act, ctx| {
            act.check_liveness(ctx)
        });
    }

    /// Asks a quiet client for a sign of life (KEEPALIVE with RESPOND: every RSocket client
    /// answers it, whatever keepalive interval it chose itself); drops one silent for the
    /// lifetime.
    fn check_liveness(&mut self, ctx: &mut Context<Self>) {
        match self.keepalive.check(Instant::now()) {
            Liveness::Alive => {}
            Liveness::Ping => {
                ConnectionCounters::bump(&self.links.counters.keepalive_pings);
                let f = rf::Keepalive::builder(0, Frame::FLAG_RESPOND).build();
                let _ = self.send_frame(&f, ctx); // 14 bytes
            }
            Liveness::Expired => {
                ConnectionCounters::bump(&self.links.counters.lifetimes_expired);
                let life = self.keepalive.lifetime();
                self.fail(
                    ERR_CONNECTION_ERROR,
                    WireError::new(
                        ErrorCode::Timeout,
                        format!("nothing received for the keepalive lifetime ({life:?})"),
                    ),
                    ctx,
                );
            }
        }
    }

    fn on_request(
        &mut self,
        sid: u32,
        kind: RequestKind,
        m: Option<Bytes>,
        d: Option<Bytes>,
        follows: bool,
        ctx: &mut Context<Self>,
    ) {
        if let Err(e) = check_request_stream_id(sid) {
            return self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(ErrorCode::MalformedFrame, e),
                ctx,
            );
        }
        if self.streams.contains_key(&sid) || self.partials.contains_key(&sid) {
            return self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(
                    ErrorCode::MalformedFrame,
                    format!("stream {sid} is already in use"),
                ),
                ctx,
            );
        }
        if follows {
            if self.partials.len() >= MAX_PARTIALS {
                return self.fail(
                    ERR_CONNECTION_ERROR,
                    WireError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "more than {MAX_PARTIALS} fragmented requests in reassembly at once"
                        ),
                    ),
                    ctx,
                );
            }
            let p = Partial::new(sid, kind, m.as_ref(), d.as_ref());
            self.partial_bytes += p.len();
            self.partials.insert(sid, p);
            return self.check_partial_cap(ctx);
        }
        self.dispatch(sid, kind, m, d, ctx);
    }

    fn check_partial_cap(&mut self, ctx: &mut Context<Self>) {
        if self.partial_bytes > self.links.config.max_frame {
            let max = self.links.config.max_frame;
            self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("fragmented request exceeds {max} bytes"),
                ),
                ctx,
            );
        }
    }

    fn on_payload(
        &mut self,
        sid: u32,
        m: Option<Bytes>,
        d: Option<Bytes>,
        follows: bool,
        ctx: &mut Context<Self>,
    ) {
        let Some(p) = self.partials.get_mut(&sid) else {
            tracing::debug!(
                conn_id = self.id,
                sid,
                "ignoring PAYLOAD from client on a stream without a fragmented request"
            );
            return;
        };
        let before = p.len();
        p.extend(m.as_ref(), d.as_ref());
        self.partial_bytes += p.len() - before;
        if follows {
            return self.check_partial_cap(ctx);
        }
        if let Some(p) = self.partials.remove(&sid) {
            self.partial_bytes -= p.len();
            let kind = p.kind;
            let (m, d) = p.finish();
            self.dispatch(sid, kind, m, d, ctx);
        }
    }

    fn request_error(
        &mut self,
        sid: u32,
        kind: RequestKind,
        e: WireError,
        ctx: &mut Context<Self>,
    ) {
        tracing::debug!(conn_id = self.id, sid, error = %e, "request refused");
        if kind != RequestKind::FireAndForget {
            self.send_error(sid, ERR_APPLICATION_ERROR, e.to_text(), ctx);
        }
    }

    fn dispatch(
        &mut self,
        sid: u32,
        kind: RequestKind,
        m: Option<Bytes>,
        d: Option<Bytes>,
        ctx: &mut Context<Self>,
    ) {
        self.counters.handled += 1;
        let route = match route_of(m.as_ref()) {
            Ok(r) => r,
            Err(e) => return self.request_error(sid, kind, e, ctx),
        };
        let data = d.unwrap_or_default();
        use RequestKind::*;
        match (route.as_str(), kind) {
            (route::PUBLISH, Response | FireAndForget) => self.publish(sid, kind, data, ctx),
            (route::ACK, Response | FireAndForget) => self.settle(sid, kind, data, true, ctx),
            (route::NACK, Response | FireAndForget) => self.settle(sid, kind, data, false, ctx),
            (route::SUBSCRIBE, Stream(n)) => self.subscribe(sid, n as u64, data, ctx),
            (route::ADMIN_EVENTS, Stream(n)) => self.events_stream(sid, n as u64, &data, ctx),
            (route::ADMIN_STATS, Response) => {
                if let Err(e) = decode::<StatsRequest>(&data) {
                    return self.request_error(sid, kind, e, ctx);
                }
                self.streams.insert(sid, StreamState::Request);
                let f = self.links.registry.stats.send(GetStats);
                ctx.spawn(f.into_actor(self).map(move |r, act, ctx| {
                    let r = r
                        .unwrap_or_else(|e| {
                            Err(WireError::new(ErrorCode::Unavailable, e.to_string()))
                        })
                        .map(|mut stats| {
                            stats.limits = Some(act.links.counters.snapshot());
                            stats
                        });
                    act.reply(sid, r, ctx)
                }));
            }
            (route::ADMIN_FAULT, Response) => {
                if !self.links.config.enable_fault_injection {
                    let e = WireError::new(
                        ErrorCode::FaultInjectionDisabled,
                        "start the broker with --enable-fault-injection to use admin.fault",
                    );
                    return self.request_error(sid, kind, e, ctx);
                }
                let req: FaultRequest = match decode(&data) {
                    Ok(r) => r,
                    Err(e) => return self.request_error(sid, kind, e, ctx),
                };
                let fault =
                    match super::FaultKind::parse(req.kind.as_deref(), req.duration.as_deref()) {
                        Ok(f) => f,
                        Err(e) => {
                            let e = WireError::new(ErrorCode::InvalidRequest, e);
                            return self.request_error(sid, kind, e, ctx);
                        }
                    };
                self.streams.insert(sid, StreamState::Request);
                tracing::warn!(conn_id = self.id, actor = %req.actor, ?fault, "admin.fault");
                let f = self.links.registry.fault_by_name.send(InjectFaultByName {
                    actor: req.actor,
                    kind: fault,
                });
                ctx.spawn(f.into_actor(self).map(move |r, act, ctx| {
                    let r = r
                        .unwrap_or_else(|e| {
                            Err(WireError::new(ErrorCode::Unavailable, e.to_string()))
                        })
                        .map(|stopped| FaultReply { stopped });
                    act.reply(sid, r, ctx)
                }));
            }
            (r, _) if self.manage_route(r, sid, kind, &data, ctx) => {}
            (r, _) if route::ALL.contains(&r) => {
                let e = WireError::new(
                    ErrorCode::WrongInteraction,
                    format!("route '{r}' does not take this interaction model ({kind:?})"),
                );
                self.request_error(sid, kind, e, ctx)
            }
            (r, _) => {
                let e = WireError::new(ErrorCode::UnknownRoute, format!("no route '{r}'"));
                self.request_error(sid, kind, e, ctx)
            }
        }
    }

    fn publish(&mut self, sid: u32, kind: RequestKind, data: Bytes, ctx: &mut Context<Self>) {
        if let Err(e) = check_is_map(&data) {
            return self.request_error(sid, kind, e, ctx);
        }
        // Payloads stay in the received frame's memory (no copy).
        let req = match sluice_protocol::PublishRequestRef::decode_shared(&data) {
            Ok(r) => r,
            Err(e) => {
                let e = WireError::new(ErrorCode::BadPayload, e.to_string());
                return self.request_error(sid, kind, e, ctx);
            }
        };
        if let Err(e) = validate_publish(&req, self.links.config.max_payload) {
            return self.request_error(sid, kind, e, ctx);
        }
        let topic = req.topic.clone();
        let f = self.links.store.send(AppendMessages {
            topic: req.topic,
            messages: req.messages,
            dead_letter: false,
        });
        if kind == RequestKind::FireAndForget {
            ctx.spawn(f.into_actor(self).map(|_, _, _| ()));
            return;
        }
        self.streams.insert(sid, StreamState::Request);
        ctx.spawn(f.into_actor(self).map(move |r, act, ctx| {
            let r = match r {
                Ok(Ok(a)) => Ok(PublishReply {
                    topic,
                    first_seq: a.first_seq,
                    last_seq: a.last_seq,
                    duplicate: a.duplicate,
                    seqs: a.seqs,
                }),
                Ok(Err(e)) => Err(WireError::from(e)),
                Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
            };
            act.reply(sid, r, ctx)
        }));
    }

    fn settle(
        &mut self,
        sid: u32,
        kind: RequestKind,
        data: Bytes,
        ack: bool,
        ctx: &mut Context<Self>,
    ) {
        let parsed = if ack {
            decode::<AckRequest>(&data).map(|r| (r.topic, r.group, r.batch_id, r.seqs, false, None))
        } else {
            decode::<NackRequest>(&data)
                .map(|r| (r.topic, r.group, r.batch_id, r.seqs, r.release, r.delay_ms))
        };
        let (topic, group, batch_id, seqs, release, delay_ms) = match parsed {
            Ok(p) => p,
            Err(e) => return self.request_error(sid, kind, e, ctx),
        };
        if delay_ms.is_some_and(|d| d > sluice_protocol::MAX_NACK_DELAY_MS) {
            let e = WireError::new(
                ErrorCode::InvalidRequest,
                "nack delay_ms must be at most 86400000 (one day)",
            );
            return self.request_error(sid, kind, e, ctx);
        }
        if let Some(s) = &seqs {
            if s.len() > 1_000_000 {
                return self.request_error(
                    sid,
                    kind,
                    WireError::new(ErrorCode::InvalidRequest, "too many seqs"),
                    ctx,
                );
            }
        }
        let (_, orch) = self.links.orchestrator(&topic);
        self.in_flight_batches = self.in_flight_batches.saturating_sub(1);
        type Settled = Result<Result<sluice_protocol::AckReply, WireError>, MailboxError>;
        let fut: std::pin::Pin<Box<dyn std::future::Future<Output = Settled>>> = if ack {
            Box::pin(orch.ack.send(AckBatch {
                conn: self.id,
                topic,
                group,
                batch_id,
                seqs,
            }))
        } else {
            Box::pin(orch.nack.send(NackBatch {
                conn: self.id,
                release,
                topic,
                group,
                batch_id,
                seqs,
                delay: delay_ms.map(std::time::Duration::from_millis),
            }))
        };
        if kind == RequestKind::FireAndForget {
            ctx.spawn(fut.into_actor(self).map(|_, _, _| ()));
            return;
        }
        self.streams.insert(sid, StreamState::Request);
        ctx.spawn(fut.into_actor(self).map(move |r, act, ctx| {
            let r =
                r.unwrap_or_else(|e| Err(WireError::new(ErrorCode::Unavailable, e.to_string())));
            act.reply(sid, r, ctx)
        }));
    }

    fn subscribe(&mut self, sid: u32, n: u64, data: Bytes, ctx: &mut Context<Self>) {
        let kind = RequestKind::Stream(n as u32);
        let req: SubscribeRequest = match decode(&data) {
            Ok(r) => r,
            Err(e) => return self.request_error(sid, kind, e, ctx),
        };
        if let Err(e) =
            validate_name("topic", &req.topic).and_then(|_| validate_name("group", &req.group))
        {
            return self.request_error(sid, kind, e, ctx);
        }
        let cfg = &self.links.config;
        let window = req.window.unwrap_or(cfg.window).clamp(1, MAX_WINDOW);
        // A consumer may ask for larger batches than the default (like Kafka's
        // max.poll.records); batch_max_bytes still bounds each one.
        let batch_size = req
            .batch_size
            .unwrap_or(cfg.batch_size)
            .clamp(1, MAX_BATCH_SIZE);
        let backoff_ms = match req.backoff.as_deref().map(sluice_protocol::parse_backoff) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return self.request_error(sid, kind, e, ctx),
        };
        let (shard, _) = self.links.orchestrator(&req.topic);
        let sub = Subscription {
            backoff_ms,
            topic: req.topic.clone(),
            group: req.group.clone(),
            shard,
            req,
            window,
            batch_size,
            credits: n,
            joined: false,
            pending_credits: 0,
        };
        self.streams
            .insert(sid, StreamState::Subscription(Box::new(sub)));
        self.join(sid, ctx);
    }

    fn join(&mut self, sid: u32, ctx: &mut Context<Self>) {
        let Some(StreamState::Subscription(sub)) = self.streams.get_mut(&sid) else {
            return;
        };
        sub.joined = false;
        sub.pending_credits = 0;
        let msg = JoinGroup {
            consumer: ConsumerId {
                conn: self.id,
                stream: sid,
            },
            topic: sub.topic.clone(),
            group: sub.group.clone(),
            mode: sub.req.mode,
            filters: sub.req.filters.clone(),
            window: sub.window,
            batch_size: sub.batch_size,
            credits: sub.credits,
            recipient: ctx.address().recipient(),
            backoff_ms: sub.backoff_ms.clone(),
            kick: ctx.address().recipient(),
            notice: ctx.address().recipient(),
        };
        let shard = sub.shard;
        let orch = self.links.orchestrators[shard].join.clone();
        ctx.spawn(orch.send(msg).into_actor(self).map(move |r, act, ctx| {
            let r =
                r.unwrap_or_else(|e| Err(WireError::new(ErrorCode::Unavailable, e.to_string())));
            let conn = act.id;
            let Some(StreamState::Subscription(sub)) = act.streams.get_mut(&sid) else {
                // Cancelled while joining: `end_stream` sent the LeaveGroup, and the
                // orchestrator does not add a subscription that left before its join finished.
                return;
            };
            match r {
                Ok(()) => {
                    sub.joined = true;
                    let extra = std::mem::take(&mut sub.pending_credits);
                    if extra > 0 {
                        act.links.orchestrators[shard]
                            .credits
                            .do_send(GrantCredits {
                                consumer: ConsumerId { conn, stream: sid },
                                topic: sub.topic.clone(),
                                group: sub.group.clone(),
                                n: extra,
                            });
                    }
                    act.links
                        .registry
                        .subscription_opened
                        .do_send(SubscriptionOpened {
                            conn_id: conn,
                            shard,
                        });
                }
                Err(e) => {
                    act.streams.remove(&sid);
                    act.send_error(sid, ERR_APPLICATION_ERROR, e.to_text(), ctx);
                }
            }
        }));
    }

    fn on_request_n(&mut self, sid: u32, n: u64, ctx: &mut Context<Self>) {
        let conn = self.id;
        let sub = match self.streams.get_mut(&sid) {
            Some(StreamState::Subscription(sub)) => sub,
            Some(StreamState::Events(_)) => return self.events_credits(sid, n, ctx),
            _ => return,
        };
        sub.credits = sub.credits.saturating_add(n);
        if sub.joined {
            self.links.orchestrators[sub.shard]
                .credits
                .do_send(GrantCredits {
                    consumer: ConsumerId { conn, stream: sid },
                    topic: sub.topic.clone(),
                    group: sub.group.clone(),
                    n,
                });
        } else {
            sub.pending_credits = sub.pending_credits.saturating_add(n);
        }
    }

    fn end_stream(&mut self, sid: u32, why: &str, ctx: &mut Context<Self>) {
        if let Some(p) = self.partials.remove(&sid) {
            self.partial_bytes -= p.len();
        }
        match self.streams.remove(&sid) {
            Some(StreamState::Subscription(sub)) => {
                tracing::debug!(conn_id = self.id, sid, why, "subscription ended");
                self.leave(sid, &sub);
            }
            Some(StreamState::Events(sub)) => {
                tracing::debug!(conn_id = self.id, sid, why, "admin.events ended");
                self.end_events(*sub, ctx);
            }
            Some(StreamState::Request) | None => {}
        }
    }

    fn leave(&self, sid: u32, sub: &Subscription) {
        self.links.orchestrators[sub.shard]
            .leave
            .do_send(LeaveGroup {
                consumer: ConsumerId {
                    conn: self.id,
                    stream: sid,
                },
                topic: sub.topic.clone(),
                group: sub.group.clone(),
            });
    }
}

/// Request data must be one MessagePack map (a struct, §3.2 of docs/protocol.md).
fn check_is_map(data: &[u8]) -> Result<(), WireError> {
    match data.first() {
        Some(0x80..=0x8f | 0xde | 0xdf) => Ok(()),
        Some(m) => Err(WireError::new(
            ErrorCode::BadPayload,
            format!("the request data must be a MessagePack map; it starts with 0x{m:02x}"),
        )),
        None => Err(WireError::new(
            ErrorCode::BadPayload,
            "the request has no data (it must be a MessagePack map, e.g. 0x80 for {})",
        )),
    }
}

/// Decodes request data strictly: exactly one MessagePack map of the expected shape (unknown
/// keys ignored) and nothing after it; anything else is `1006 BAD_PAYLOAD`.
fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, WireError> {
    check_is_map(data)?;
    let bad = |m: String| WireError::new(ErrorCode::BadPayload, m);
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(data));
    let value = T::deserialize(&mut de).map_err(|e| bad(format!("bad MessagePack: {e}")))?;
    let used = usize::try_from(de.position()).unwrap_or(usize::MAX);
    if used != data.len() {
        return Err(bad(format!(
            "{} bytes follow the MessagePack value",
            data.len().saturating_sub(used)
        )));
    }
    Ok(value)
}

fn validate_publish(req: &PublishRequest, max_payload: usize) -> Result<(), WireError> {
    validate_name("topic", &req.topic)?;
    let invalid = |m: String| Err(WireError::new(ErrorCode::InvalidRequest, m));
    if req.messages.is_empty() {
        return invalid("a publish needs at least one message".into());
    }
    if req.messages.len() > 100_000 {
        return invalid("at most 100000 messages per publish".into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        if m.payload.len() > max_payload {
            return Err(WireError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "message {i}: payload of {} bytes exceeds the limit of {max_payload}",
                    m.payload.len()
                ),
            ));
        }
        if m.priority > MAX_PRIORITY {
            return invalid(format!(
                "message {i}: priority {} is above {MAX_PRIORITY}",
                m.priority
            ));
        }
        if let Some(id) = &m.id {
            if id.is_empty() {
                return invalid(format!(
                    "message {i}: an id must be 1..={} bytes, not empty",
                    sluice_protocol::MAX_ID_LEN
                ));
            }
            if id.len() > sluice_protocol::MAX_ID_LEN {
                return invalid(format!(
                    "message {i}: id of {} bytes is longer than {} bytes",
                    id.len(),
                    sluice_protocol::MAX_ID_LEN
                ));
            }
        }
        let field = crate::store::record::MAX_FIELD;
        if m.key.as_ref().is_some_and(|k| k.len() > field)
            || m.headers.len() > 1024
            || m.headers
                .iter()
                .any(|(k, v)| k.len() > field || v.len() > field)
        {
            return invalid(format!("message {i}: key or headers too large"));
        }
    }
    Ok(())
}

impl Actor for ConnectionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.counters.started_at = Instant::now();
        tracing::debug!(conn_id = self.id, peer = %self.peer, "connection accepted");
        let t = self.links.config.setup_timeout;
        ctx.run_later(t, move |act, ctx| {
            if act.client_id.is_none() {
                act.fail(
                    ERR_INVALID_SETUP,
                    WireError::new(ErrorCode::InvalidSetup, format!("no SETUP within {t:?}")),
                    ctx,
                );
            }
        });
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        if let Err(SendError::Full { .. }) = self.hand_over() {
            // A client that does not read gets nothing more: drop what is queued now.
            if let Some(w) = self.writer.take() {
                w.abort();
            }
        }
        // Dropping the handle lets the writer drain what is queued, then close the socket.
        self.writer = None;
        for (sid, s) in std::mem::take(&mut self.streams) {
            if let StreamState::Subscription(sub) = s {
                self.leave(sid, &sub);
            }
        }
        if self.client_id.is_some() {
            self.links
                .registry
                .closed
                .do_send(ConnectionClosed { conn_id: self.id });
        }
        tracing::debug!(conn_id = self.id, "connection closed");
        Running::Stop
    }
}

impl StreamHandler<Result<Inbound, FrameError>> for ConnectionActor {
    fn handle(&mut self, item: Result<Inbound, FrameError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.keepalive.saw_inbound(Instant::now());
        match item {
            Ok(Inbound::Frame(f)) => self.on_frame(f, ctx),
            Ok(Inbound::Ignored) => {}
            Err(FrameError::Io(e)) => {
                tracing::debug!(conn_id = self.id, error = %e, "read failed");
                ctx.stop();
            }
            Err(e @ FrameError::TooLarge { .. }) => self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(ErrorCode::PayloadTooLarge, e.to_string()),
                ctx,
            ),
            Err(e) => self.fail(
                ERR_CONNECTION_ERROR,
                WireError::new(ErrorCode::MalformedFrame, e.to_string()),
                ctx,
            ),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Flush> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush(ctx);
    }
}

impl Handler<WriterEnded> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: WriterEnded, ctx: &mut Context<Self>) {
        if let WriterEnd::Failed(e) = msg.0 {
            if e.starts_with(crate::session::writer::STALLED) {
                // Its batches in flight fill the socket and it reads none of them.
                ConnectionCounters::bump(&self.links.counters.slow_clients_disconnected);
                tracing::warn!(
                    conn_id = self.id,
                    peer = %self.peer,
                    client_id = self.client_id.as_deref().unwrap_or(""),
                    error = %e,
                    "client does not read: nothing could be written to it for its lifetime; disconnecting (its batches are redelivered)"
                );
                self.memory_pressure("nothing could be written to it for its lifetime".into());
            } else {
                tracing::debug!(conn_id = self.id, error = %e, "write failed");
            }
            self.closing = true;
            ctx.stop();
        }
    }
}

impl Handler<DeliverBatch> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: DeliverBatch, ctx: &mut Context<Self>) {
        let sid = msg.consumer.stream;
        let Some(StreamState::Subscription(sub)) = self.streams.get_mut(&sid) else {
            return;
        };
        let f = rf::Payload::builder(sid, Frame::FLAG_NEXT)
            .set_data(msg.data)
            .build();
        if let Err(e) = try_encode_frame(&f, &mut self.out) {
            // Never a corrupt frame: the batch is not sent, times out and is redelivered (the
            // orchestrator sizes batches to fit; this is the last guard).
            ConnectionCounters::bump(&self.links.counters.oversize_batches_dropped);
            tracing::error!(
                conn_id = self.id,
                sid,
                batch_id = msg.batch_id,
                error = %e,
                "batch not sent: its frame does not fit the RSocket frame limit"
            );
            return;
        }
        sub.credits = sub.credits.saturating_sub(1);
        self.in_flight_batches += 1;
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }
}

impl Handler<StreamNotice> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: StreamNotice, ctx: &mut Context<Self>) {
        let sid = msg.consumer.stream;
        let Some(StreamState::Subscription(sub)) = self.streams.get_mut(&sid) else {
            return;
        };
        let f = rf::Payload::builder(sid, Frame::FLAG_NEXT)
            .set_data(msg.data)
            .build();
        if let Err(e) = try_encode_frame(&f, &mut self.out) {
            tracing::error!(conn_id = self.id, sid, error = %e, "stream notice not sent");
            return;
        }
        // The orchestrator took a credit for it.
        sub.credits = sub.credits.saturating_sub(1);
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }
}

impl Handler<KickConsumer> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: KickConsumer, ctx: &mut Context<Self>) {
        let sid = msg.consumer.stream;
        if !matches!(self.streams.get(&sid), Some(StreamState::Subscription(_))) {
            return;
        }
        tracing::info!(conn_id = self.id, sid, error = %msg.error, "subscription ended by the broker");
        // Its batches go back to the group at once, as on a disconnect.
        self.end_stream(sid, "ended by the broker", ctx);
        self.send_error(sid, ERR_APPLICATION_ERROR, msg.error.to_text(), ctx);
    }
}

impl Handler<Rejoin> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: Rejoin, ctx: &mut Context<Self>) {
        let sids: Vec<u32> = self
            .streams
            .iter()
            .filter_map(|(sid, s)| match s {
                StreamState::Subscription(sub) if sub.shard == msg.shard => Some(*sid),
                _ => None,
            })
            .collect();
        for sid in sids {
            self.join(sid, ctx);
        }
    }
}

impl Handler<GetConnectionStats> for ConnectionActor {
    type Result = MessageResult<GetConnectionStats>;
    fn handle(&mut self, _: GetConnectionStats, _: &mut Context<Self>) -> Self::Result {
        let name = format!("connection-{}", self.id);
        let actor = self.counters.stats("connection", &name, None);
        let groups = self
            .streams
            .values()
            .filter_map(|s| match s {
                StreamState::Subscription(sub) => Some(format!("{}/{}", sub.topic, sub.group)),
                _ => None,
            })
            .collect();
        let stats = ConnectionStats {
            conn_id: self.id,
            client_id: self.client_id.clone().unwrap_or_default(),
            peer: self.peer.to_string(),
            groups,
            in_flight_batches: self.in_flight_batches,
            last_heartbeat_ms_ago: self.keepalive.last_inbound().elapsed().as_millis() as u64,
            connected_ms: self.connected_at.elapsed().as_millis() as u64,
        };
        MessageResult((actor, stats))
    }
}

impl Handler<InjectFault> for ConnectionActor {
    type Result = ();
    fn handle(&mut self, msg: InjectFault, ctx: &mut Context<Self>) {
        if msg.kind == super::FaultKind::Panic {
            super::injected_panic(&format!("connection-{}", self.id));
        }
        self.closing = true;
        ctx.stop();
    }
}
