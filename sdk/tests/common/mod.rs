//! A scripted fake broker for the SDK's tests: speaks just enough server-side RSocket (on
//! rsocket_rust's frame codec) to exercise the real rsocket_rust client underneath the SDK.
//!
//! It is not the broker: no actors, no storage, no windows. Topics are in-memory vectors;
//! `subscribe` delivers every stored, not yet acked message of the topic in batches, polling for
//! new ones; on a new subscription whatever was delivered and not acked is delivered again with
//! a higher attempt number.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rsocket_rust::extension::{CompositeMetadata, RoutingMetadata};
use rsocket_rust::frame::{self, Body, Frame};
use rsocket_rust::utils::{u24, Writeable};
use sluice_protocol::{
    encode, AckOutcome, AckReply, AckRequest, Batch, BrokerStats, DeliveredMessage, ErrorCode,
    FaultReply, FaultRequest, NackRequest, NewMessage, PublishReply, PublishRequest, SetupRequest,
    StreamEvent, SubscribeRequest, WireError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const ERR_REJECTED_SETUP: u32 = 0x0000_0003;
const ERR_APPLICATION: u32 = 0x0000_0201;

/// What the fake saw and what it should do.
#[derive(Default)]
pub struct Script {
    /// Refuse every SETUP with this error (connection-level ERROR, then close).
    pub reject_setup: Option<WireError>,
    /// Answer requests on these routes with this error.
    pub fail_routes: HashMap<String, WireError>,
    /// Never answer requests on these routes.
    pub silent_routes: BTreeSet<String>,
    /// Store the next this-many publish requests, then close the connection instead of
    /// replying (a broker that crashed after storing): the producer must resend them.
    pub lose_publish_replies: usize,
    /// Sent first on every subscription (it takes a credit, as on the real broker).
    pub reset_notice: Option<sluice_protocol::ResetNotice>,
    /// Sent to every `admin.events` stream, in order.
    pub events: Vec<sluice_protocol::BrokerEvent>,
}

#[derive(Default)]
pub struct Recorded {
    pub setups: Vec<(SetupRequest, String, String, Duration, Duration)>,
    pub publish_requests: usize,
    pub acks: Vec<AckRequest>,
    pub nacks: Vec<NackRequest>,
    /// Every decodable `subscribe` request, also those refused by [`Script::fail_routes`].
    pub subscribes: Vec<SubscribeRequest>,
    /// `initial_request_n` of each `subscribe` (the fake sends no more items than that).
    pub subscribe_credits: Vec<u32>,
    pub routes_without_metadata: usize,
    pub open_connections: usize,
    /// Messages that repeated an id already stored (not stored again).
    pub duplicates: usize,
    /// Every decodable `admin.events` request.
    pub events_requests: Vec<sluice_protocol::EventsRequest>,
}

struct Stored {
    seq: u64,
    message: NewMessage,
    deliveries: u32,
}

#[derive(Default)]
struct Data {
    topics: HashMap<String, Vec<Stored>>,
    /// (topic, id) → seq: the fake's dedup index (no window).
    ids: HashMap<(String, String), u64>,
    /// (topic, group) → acked seqs
    acked: HashMap<(String, String), BTreeSet<u64>>,
}

pub struct FakeBroker {
    pub addr: SocketAddr,
    pub script: Arc<Mutex<Script>>,
    pub recorded: Arc<Mutex<Recorded>>,
    data: Arc<Mutex<Data>>,
    kill: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

impl FakeBroker {
    pub async fn start() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let script = Arc::new(Mutex::new(Script::default()));
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let data = Arc::new(Mutex::new(Data::default()));
        let kill = watch::Sender::new(0u64);
        let ctx = Ctx {
            script: script.clone(),
            recorded: recorded.clone(),
            data: data.clone(),
        };
        let kill_rx = kill.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, ctx.clone(), kill_rx.clone()));
            }
        });
        FakeBroker {
            addr,
            script,
            recorded,
            data,
            kill,
            accept,
        }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.script)
    }

    pub fn recorded(&self) -> MutexGuard<'_, Recorded> {
        lock(&self.recorded)
    }

    /// Drops every open connection (like a broker crash, minus the listener).
    pub fn kill_connections(&self) {
        self.kill.send_modify(|n| *n += 1);
    }

    /// Seqs acked for (topic, group).
    pub fn acked(&self, topic: &str, group: &str) -> BTreeSet<u64> {
        lock(&self.data)
            .acked
            .get(&(topic.to_string(), group.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Ids of the messages stored on `topic`.
    pub fn ids(&self, topic: &str) -> BTreeSet<String> {
        lock(&self.data)
            .topics
            .get(topic)
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.message.id.as_deref().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stored(&self, topic: &str) -> Vec<(u64, Bytes)> {
        lock(&self.data)
            .topics
            .get(topic)
            .map(|v| {
                v.iter()
                    .map(|s| (s.seq, s.message.payload.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill_connections();
    }
}

#[derive(Clone)]
struct Ctx {
    script: Arc<Mutex<Script>>,
    recorded: Arc<Mutex<Recorded>>,
    data: Arc<Mutex<Data>>,
}

async fn serve(stream: TcpStream, ctx: Ctx, mut kill: watch::Receiver<u64>) {
    kill.borrow_and_update();
    lock(&ctx.recorded).open_connections += 1;
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Frame>>();
    let writer = tokio::spawn(async move {
        while let Some(Some(frame)) = rx.recv().await {
            let mut buf = BytesMut::new();
            u24::from(frame.len()).write_to(&mut buf);
            frame.write_to(&mut buf);
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut streams: Vec<JoinHandle<()>> = Vec::new();
    tokio::select! {
        _ = read_loop(rd, &ctx, &tx, &mut streams) => {}
        _ = kill.changed() => {}
    }
    for s in streams {
        s.abort();
    }
    let _ = tx.send(None);
    drop(tx);
    let _ = writer.await;
    lock(&ctx.recorded).open_connections -= 1;
}

async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    ctx: &Ctx,
    tx: &Tx,
    streams: &mut Vec<JoinHandle<()>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'read: loop {
        while buf.len() >= 3 {
            let len = u24::parse(&buf[..3]).into();
            if buf.len() < 3 + len {
                break;
            }
            buf.advance(3);
            let mut body = buf.split_to(len);
            let Ok(frame) = Frame::decode(&mut body) else {
                break 'read;
            };
            if !handle_frame(frame, ctx, tx, streams) {
                break 'read;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn route_of(metadata: Option<&Bytes>) -> Option<String> {
    let mut m = BytesMut::from(&metadata?[..]);
    let composite = CompositeMetadata::decode(&mut m).ok()?;
    let entry = composite
        .iter()
        .find(|e| e.get_mime_type().as_str() == Some(sluice_protocol::ROUTING_MIME_TYPE))?;
    let mut tags = BytesMut::from(&entry.get_metadata()[..]);
    RoutingMetadata::decode(&mut tags)
        .ok()?
        .get_tags()
        .first()
        .cloned()
}

fn error_frame(sid: u32, code: u32, e: &WireError) -> Frame {
    frame::Error::builder(sid, 0)
        .set_code(code)
        .set_data(Bytes::from(e.to_text()))
        .build()
}

fn reply_frame(sid: u32, data: Bytes) -> Frame {
    frame::Payload::builder(sid, Frame::FLAG_NEXT | Frame::FLAG_COMPLETE)
        .set_data(data)
        .build()
}

type Tx = mpsc::UnboundedSender<Option<Frame>>;

/// Returns false to close the connection.
fn handle_frame(frame: Frame, ctx: &Ctx, tx: &Tx, streams: &mut Vec<JoinHandle<()>>) -> bool {
    let sid = frame.get_stream_id();
    let flag = frame.get_flag();
    match frame.get_body() {
        Body::Setup(s) => {
            let setup: SetupRequest = match s.get_data().map(|d| sluice_protocol::decode(d)) {
                Some(Ok(v)) => v,
                _ => {
                    let e = WireError::new(ErrorCode::InvalidSetup, "bad setup");
                    let _ = tx.send(Some(error_frame(0, ERR_REJECTED_SETUP, &e)));
                    return false;
                }
            };
            lock(&ctx.recorded).setups.push((
                setup,
                s.get_mime_metadata().unwrap_or_default().to_string(),
                s.get_mime_data().unwrap_or_default().to_string(),
                s.get_keepalive(),
                s.get_lifetime(),
            ));
            if let Some(e) = lock(&ctx.script).reject_setup.clone() {
                let _ = tx.send(Some(error_frame(0, ERR_REJECTED_SETUP, &e)));
                return false;
            }
            true
        }
        Body::Keepalive(_) => {
            if flag & Frame::FLAG_RESPOND != 0 {
                let _ = tx.send(Some(frame::Keepalive::builder(0, 0).build()));
            }
            true
        }
        Body::RequestResponse(r) => {
            let Some(route) = route_of(r.get_metadata()) else {
                lock(&ctx.recorded).routes_without_metadata += 1;
                let e = WireError::new(ErrorCode::MissingRoute, "no route");
                let _ = tx.send(Some(error_frame(sid, ERR_APPLICATION, &e)));
                return true;
            };
            if lock(&ctx.script).silent_routes.contains(&route) {
                return true;
            }
            if let Some(e) = lock(&ctx.script).fail_routes.get(&route).cloned() {
                let _ = tx.send(Some(error_frame(sid, ERR_APPLICATION, &e)));
                return true;
            }
            let data = r.get_data().cloned().unwrap_or_default();
            let answer = request_response(ctx, &route, &data);
            if route == sluice_protocol::route::PUBLISH && answer.is_ok() {
                let mut script = lock(&ctx.script);
                if script.lose_publish_replies > 0 {
                    script.lose_publish_replies -= 1;
                    return false;
                }
            }
            let _ = tx.send(Some(match answer {
                Ok(bytes) => reply_frame(sid, bytes),
                Err(e) => error_frame(sid, ERR_APPLICATION, &e),
            }));
            true
        }
        Body::RequestStream(r) if route_of(r.get_metadata()).as_deref() == Some("admin.events") => {
            let req: sluice_protocol::EventsRequest =
                match sluice_protocol::decode(r.get_data().map(|b| &b[..]).unwrap_or(&[])) {
                    Ok(v) => v,
                    Err(e) => {
                        let e = WireError::new(ErrorCode::BadPayload, e.to_string());
                        let _ = tx.send(Some(error_frame(sid, ERR_APPLICATION, &e)));
                        return true;
                    }
                };
            lock(&ctx.recorded).events_requests.push(req);
            for event in lock(&ctx.script).events.clone() {
                if let Ok(bytes) = encode(&event) {
                    let frame = frame::Payload::builder(sid, Frame::FLAG_NEXT)
                        .set_data(bytes)
                        .build();
                    let _ = tx.send(Some(frame));
                }
            }
            true
        }
        Body::RequestStream(r) => {
            let route = route_of(r.get_metadata()).unwrap_or_default();
            let req: SubscribeRequest =
                match sluice_protocol::decode(r.get_data().map(|b| &b[..]).unwrap_or(&[])) {
                    Ok(v) => v,
                    Err(e) => {
                        let e = WireError::new(ErrorCode::BadPayload, e.to_string());
                        let _ = tx.send(Some(error_frame(sid, ERR_APPLICATION, &e)));
                        return true;
                    }
                };
            // Recorded also when refused below: tests count the attempts.
            let credits = r.get_initial_request_n();
            {
                let mut rec = lock(&ctx.recorded);
                rec.subscribes.push(req.clone());
                rec.subscribe_credits.push(credits);
            }
            let fail = lock(&ctx.script).fail_routes.get(&route).cloned();
            if let Some(e) = fail {
                let _ = tx.send(Some(error_frame(sid, ERR_APPLICATION, &e)));
                return true;
            }
            streams.push(tokio::spawn(deliver(
                ctx.clone(),
                tx.clone(),
                sid,
                req,
                credits,
            )));
            true
        }
        _ => true,
    }
}

fn request_response(ctx: &Ctx, route: &str, data: &[u8]) -> Result<Bytes, WireError> {
    let bad = |e: sluice_protocol::CodecError| WireError::new(ErrorCode::BadPayload, e.to_string());
    let enc = |r: Result<Bytes, sluice_protocol::CodecError>| {
        r.map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
    };
    match route {
        sluice_protocol::route::PUBLISH => {
            let req: PublishRequest = sluice_protocol::decode(data).map_err(bad)?;
            if req.messages.is_empty() {
                return Err(WireError::new(ErrorCode::InvalidRequest, "no messages"));
            }
            lock(&ctx.recorded).publish_requests += 1;
            let mut d = lock(&ctx.data);
            let Data { topics, ids, .. } = &mut *d;
            let log = topics.entry(req.topic.clone()).or_default();
            let mut seqs = Vec::new();
            let mut duplicates = 0;
            for m in req.messages {
                if let Some(id) = &m.id {
                    if let Some(&seq) = ids.get(&(req.topic.clone(), id.to_string())) {
                        seqs.push(seq);
                        duplicates += 1;
                        continue;
                    }
                }
                let seq = log.len() as u64 + 1;
                if let Some(id) = &m.id {
                    ids.insert((req.topic.clone(), id.to_string()), seq);
                }
                seqs.push(seq);
                log.push(Stored {
                    seq,
                    message: m,
                    deliveries: 0,
                });
            }
            drop(d);
            lock(&ctx.recorded).duplicates += duplicates;
            let (lo, hi) = seqs
                .iter()
                .fold((u64::MAX, 0), |(lo, hi), &s| (lo.min(s), hi.max(s)));
            let mut reply = PublishReply::stored(req.topic, lo, hi);
            if duplicates > 0 {
                reply.duplicate = true;
                reply.seqs = seqs;
            }
            enc(encode(&reply))
        }
        sluice_protocol::route::ACK => {
            let req: AckRequest = sluice_protocol::decode(data).map_err(bad)?;
            let mut d = lock(&ctx.data);
            let set = d
                .acked
                .entry((req.topic.clone(), req.group.clone()))
                .or_default();
            let mut count = 0;
            for s in req.seqs.clone().unwrap_or_default() {
                if set.insert(s) {
                    count += 1;
                }
            }
            drop(d);
            lock(&ctx.recorded).acks.push(req);
            enc(encode(&AckReply {
                outcome: if count > 0 {
                    AckOutcome::Settled
                } else {
                    AckOutcome::AlreadyAcked
                },
                count,
                rejected: Vec::new(),
            }))
        }
        sluice_protocol::route::NACK => {
            let req: NackRequest = sluice_protocol::decode(data).map_err(bad)?;
            let count = req.seqs.as_ref().map_or(0, |s| s.len() as u32);
            lock(&ctx.recorded).nacks.push(req);
            enc(encode(&AckReply {
                outcome: AckOutcome::Settled,
                count,
                rejected: Vec::new(),
            }))
        }
        sluice_protocol::route::ADMIN_STATS => enc(encode(&BrokerStats {
            version: "fake".into(),
            uptime_ms: 1,
            fsync: "never".into(),
            ..Default::default()
        })),
        sluice_protocol::route::ADMIN_FAULT => {
            let req: FaultRequest = sluice_protocol::decode(data).map_err(bad)?;
            enc(encode(&FaultReply { stopped: req.actor }))
        }
        other => Err(WireError::new(
            ErrorCode::UnknownRoute,
            format!("no route '{other}'"),
        )),
    }
}

/// Delivers unacked messages of the topic in batches; polls for new ones. Sends at most
/// `credits` items (batches and unknown events), unless that is 2^31-1 (unbounded); REQUEST_N
/// is not honoured.
async fn deliver(ctx: Ctx, tx: Tx, sid: u32, req: SubscribeRequest, credits: u32) {
    let batch_size = req.batch_size.unwrap_or(4).max(1) as usize;
    let mut sent: BTreeSet<u64> = BTreeSet::new();
    // `None`: unbounded.
    let mut credits = (credits < frame::REQUEST_MAX).then_some(credits);
    let reset = lock(&ctx.script).reset_notice.clone();
    if let Some(notice) = reset {
        if let Ok(bytes) = encode(&StreamEvent::Reset(notice)) {
            let frame = frame::Payload::builder(sid, Frame::FLAG_NEXT)
                .set_data(bytes)
                .build();
            let _ = tx.send(Some(frame));
            if let Some(n) = credits.as_mut() {
                *n = n.saturating_sub(1);
            }
        }
    }
    loop {
        if credits == Some(0) {
            return;
        }
        let batch = {
            let mut d = lock(&ctx.data);
            let acked = d
                .acked
                .get(&(req.topic.clone(), req.group.clone()))
                .cloned()
                .unwrap_or_default();
            let mut messages = Vec::new();
            if let Some(log) = d.topics.get_mut(&req.topic) {
                for s in log.iter_mut() {
                    if messages.len() >= batch_size {
                        break;
                    }
                    if acked.contains(&s.seq) || sent.contains(&s.seq) {
                        continue;
                    }
                    if !req
                        .filters
                        .iter()
                        .all(|(k, v)| s.message.headers.get(k) == Some(v))
                    {
                        continue;
                    }
                    s.deliveries += 1;
                    sent.insert(s.seq);
                    messages.push(DeliveredMessage {
                        seq: s.seq,
                        timestamp_ms: 1_700_000_000_000 + s.seq,
                        key: s.message.key.clone(),
                        headers: s.message.headers.clone(),
                        priority: s.message.priority,
                        attempt: s.deliveries,
                        payload: s.message.payload.clone(),
                    });
                }
            }
            messages
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let event = StreamEvent::Batch(Batch {
            batch_id: NEXT_BATCH.fetch_add(1, Ordering::Relaxed),
            topic: req.topic.clone(),
            group: req.group.clone(),
            messages: batch,
        });
        let Ok(bytes) = encode(&event) else { return };
        let frame = frame::Payload::builder(sid, Frame::FLAG_NEXT)
            .set_data(bytes)
            .build();
        if tx.send(Some(frame)).is_err() {
            return;
        }
        if let Some(n) = credits.as_mut() {
            *n -= 1;
            if *n == 0 {
                return;
            }
        }
        // An unknown event kind between batches: the SDK must skip it.
        if let Some(n) = credits.as_mut() {
            *n -= 1;
        }
        let mut unknown = BTreeMap::new();
        unknown.insert("future_event", 1u8);
        if let Ok(bytes) = encode(&unknown) {
            let frame = frame::Payload::builder(sid, Frame::FLAG_NEXT)
                .set_data(bytes)
                .build();
            let _ = tx.send(Some(frame));
        }
    }
}
