//! Protocol faults (docs/protocol.md §2.3, §2.4, §3.1, §3.2, §4): every bad input gets the
//! documented ERROR (or its connection closed), and the broker keeps serving another client
//! throughout: a "bystander" connection set up before the faults publishes after each one, and at
//! the end a fresh subscriber must receive everything the bystander published.
mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use rsocket_rust::frame::{self as rf, Frame};
use sluice_protocol::{
    FaultRequest, GroupMode, NewMessage, PublishReply, PublishRequest, SetupRequest, StreamEvent,
    SubscribeRequest,
};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

// `RawClient::next` keeps a 64 KiB buffer in its future; boxing it keeps the test bodies' own
// futures (and their debug-build stack frames) small.
async fn next(c: &mut RawClient, t: Duration) -> Option<Frame> {
    Box::pin(c.next(t)).await
}

async fn closed(c: &mut RawClient, t: Duration) -> Option<Vec<Frame>> {
    Box::pin(c.closed_within(t)).await
}
const LIFETIME: Duration = Duration::from_secs(60);
const APPLICATION_ERROR: u32 = 0x201;
const CONNECTION_ERROR: u32 = 0x101;
const INVALID_SETUP: u32 = 0x001;
const REJECTED_SETUP: u32 = 0x003;

/// A raw frame with its 3-byte length prefix.
fn raw_frame(sid: u32, kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_uint((6 + body.len()) as u64, 3);
    b.put_u32(sid);
    b.put_u16((kind << 10) | flags);
    b.extend_from_slice(body);
    b.to_vec()
}

fn publish_data(topic: &str, payloads: &[Bytes]) -> Bytes {
    sluice_protocol::encode(&PublishRequest {
        topic: topic.into(),
        messages: payloads
            .iter()
            .map(|p| NewMessage {
                payload: p.clone(),
                ..Default::default()
            })
            .collect(),
    })
    .expect("encode publish")
}

/// Reads the reply of request `sid` and decodes it as a PublishReply.
async fn expect_publish_reply(c: &mut RawClient, sid: u32, what: &str) -> PublishReply {
    let f = next(c, T)
        .await
        .unwrap_or_else(|| panic!("{what}: no reply to publish on stream {sid}"));
    assert_eq!(
        f.get_stream_id(),
        sid,
        "{what}: reply on the wrong stream: {f:?}"
    );
    let data =
        payload_of(&f).unwrap_or_else(|| panic!("{what}: publish failed: {:?}", error_of(&f)));
    sluice_protocol::decode(&data).expect("decode PublishReply")
}

/// Expects an APPLICATION_ERROR on `sid` whose text starts with `prefix`.
async fn expect_app_error(c: &mut RawClient, sid: u32, prefix: &str) {
    let f = next(c, T)
        .await
        .unwrap_or_else(|| panic!("no reply on stream {sid} (expected {prefix})"));
    assert_eq!(f.get_stream_id(), sid, "error on the wrong stream: {f:?}");
    let (code, text) = error_of(&f).unwrap_or_else(|| panic!("expected ERROR {prefix}, got {f:?}"));
    assert_eq!(code, APPLICATION_ERROR, "{text}");
    assert!(
        text.starts_with(prefix),
        "expected text starting with {prefix:?}, got {text:?}"
    );
}

/// Expects exactly one ERROR on stream 0 with `code` and a text starting with `prefix`, then the
/// connection closed by the broker.
async fn expect_conn_error(c: &mut RawClient, code: u32, prefix: &str) {
    let seen = closed(c, T)
        .await
        .unwrap_or_else(|| panic!("connection not closed (expected {prefix})"));
    let [f] = &seen[..] else {
        panic!("expected exactly one ERROR frame ({prefix}) before the close, got {seen:?}");
    };
    assert_eq!(
        f.get_stream_id(),
        0,
        "connection error not on stream 0: {f:?}"
    );
    let (got, text) = error_of(f).unwrap_or_else(|| panic!("expected ERROR {prefix}, got {f:?}"));
    assert_eq!(got, code, "RSocket error code for {text:?}");
    assert!(
        text.starts_with(prefix),
        "expected text starting with {prefix:?}, got {text:?}"
    );
}

fn broker_alive(b: &TestBroker) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", b.pid()))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')').and_then(|(_, rest)| {
                rest.split_whitespace()
                    .next()
                    .map(|st| st != "Z" && st != "X")
            })
        })
        .unwrap_or(false)
}

/// A well-behaved client connected before the faults.
struct Bystander {
    c: RawClient,
    topic: String,
    sid: u32,
    published: Vec<Bytes>,
}

impl Bystander {
    async fn new(b: &TestBroker, topic: &str) -> Bystander {
        let mut by = Bystander {
            c: RawClient::setup(&b.addr(), LIFETIME).await,
            topic: topic.to_string(),
            sid: 1,
            published: Vec::new(),
        };
        by.check("before the faults").await;
        by
    }

    /// Publishes one message and expects its PublishReply with the next sequence number.
    async fn check(&mut self, after: &str) {
        let payload = Bytes::from(format!("{}-{}", self.topic, self.published.len() + 1));
        let sid = self.sid;
        self.sid += 2;
        self.c
            .request(
                sid,
                "publish",
                publish_data(&self.topic, std::slice::from_ref(&payload)),
            )
            .await;
        let r = expect_publish_reply(&mut self.c, sid, &format!("bystander after {after}")).await;
        self.published.push(payload);
        let seq = self.published.len() as u64;
        assert_eq!(
            (r.topic.as_str(), r.first_seq, r.last_seq),
            (self.topic.as_str(), seq, seq),
            "bystander after {after}"
        );
    }

    /// The broker is alive, still serves the bystander, and a fresh subscriber receives every
    /// message the bystander published, in order.
    async fn finish(mut self, b: &TestBroker) {
        assert!(broker_alive(b), "broker process died; log:\n{}", b.log());
        self.check("the end").await;
        let got = drain(&b.addr(), &self.topic, self.published.len()).await;
        let payloads: Vec<Bytes> = got.iter().map(|(_, p)| p.clone()).collect();
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=self.published.len() as u64).collect::<Vec<_>>(),
            "sequence numbers of the stored messages"
        );
        assert_eq!(payloads, self.published, "stored payloads");
        assert!(broker_alive(b), "broker process died; log:\n{}", b.log());
    }
}

/// Subscribes with a fresh group and returns (seq, payload) of the first `n` messages.
async fn drain(addr: &str, topic: &str, n: usize) -> Vec<(u64, Bytes)> {
    let mut c = RawClient::setup(addr, LIFETIME).await;
    let req = SubscribeRequest {
        topic: topic.into(),
        group: "verify".into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: Some(1024),
        batch_size: None,
        backoff: None,
    };
    let f = rf::RequestStream::builder(1, 0)
        .set_initial_request_n(rf::REQUEST_MAX)
        .set_metadata(route_metadata("subscribe"))
        .set_data(sluice_protocol::encode(&req).expect("encode"))
        .build();
    c.send(&f).await;
    let mut got = Vec::new();
    while got.len() < n {
        let f = next(&mut c, T)
            .await
            .unwrap_or_else(|| panic!("subscriber got {} of {n} messages", got.len()));
        let data = payload_of(&f).unwrap_or_else(|| panic!("subscribe failed: {:?}", error_of(&f)));
        match sluice_protocol::decode::<StreamEvent>(&data).expect("decode StreamEvent") {
            StreamEvent::Batch(batch) => {
                got.extend(batch.messages.into_iter().map(|m| (m.seq, m.payload)))
            }
            StreamEvent::Status(_) | StreamEvent::Reset(_) => {}
        }
    }
    got
}

/// xorshift64: deterministic "random" bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Default `max_frame`: 4 MiB (docs/protocol.md §1.5). Random frames up to it are completed.
const MAX_FRAME: usize = 4 * 1024 * 1024;
const GARBAGE_COMPLETE_UP_TO: usize = 4 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_the_connection() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "garbage").await;

    // An HTTP request: "GET" read as a length prefix is ~4.6 MB, far over max_frame.
    let mut c = RawClient::connect(&b.addr()).await;
    c.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let seen = closed(&mut c, T)
        .await
        .expect("HTTP request: connection not closed");
    for f in &seen {
        let (code, text) = error_of(f).unwrap_or_else(|| panic!("HTTP request got {f:?}"));
        assert_eq!((f.get_stream_id(), code), (0, CONNECTION_ERROR), "{text}");
    }
    by.check("an HTTP request").await;

    // Random bytes, before and after SETUP. When the random length prefix fits max_frame, the
    // frame is completed with more random bytes and followed by a surely-invalid frame (unknown
    // type 0x30): a random frame may by chance be valid and ignorable (e.g. a REQUEST_N for an
    // unknown stream), but the broker must never wait forever or die on such input.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..12 {
        let after_setup = round % 2 == 1;
        let mut c = if after_setup {
            RawClient::setup(&b.addr(), LIFETIME).await
        } else {
            RawClient::connect(&b.addr()).await
        };
        let mut bytes = rng.bytes(512);
        let len = ((bytes[0] as usize) << 16) | ((bytes[1] as usize) << 8) | bytes[2] as usize;
        if len <= GARBAGE_COMPLETE_UP_TO {
            bytes = rng.bytes(3 + len);
            bytes[0] = (len >> 16) as u8;
            bytes[1] = (len >> 8) as u8;
            bytes[2] = len as u8;
            bytes.extend_from_slice(&raw_frame(1, 0x30, 0, b"tail"));
        }
        c.send_raw(&bytes).await;
        let seen = closed(&mut c, T).await;
        assert!(
            seen.is_some(),
            "random bytes round {round} (after SETUP: {after_setup}, prefix {len}): not closed"
        );
        by.check(&format!("random bytes round {round}")).await;
    }
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_type_is_malformed() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "unknown-type").await;
    for sid in [1, 0] {
        let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
        c.send_raw(&raw_frame(sid, 0x30, 0, b"hello")).await;
        expect_conn_error(&mut c, CONNECTION_ERROR, "1003 MALFORMED_FRAME").await;
        by.check(&format!("frame type 0x30 on stream {sid}")).await;
    }
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_length_past_the_end_is_malformed() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "metadata-past-end").await;
    let cases: [(&str, Vec<u8>); 3] = [
        // M set, metadata length 50, 3 bytes follow.
        (
            "metadata length 50 with 3 bytes",
            raw_frame(1, 0x04, 0x100, &[0, 0, 50, 1, 2, 3]),
        ),
        // M set, no room for the 3-byte metadata length.
        (
            "no room for the metadata length",
            raw_frame(1, 0x04, 0x100, &[0]),
        ),
        // Metadata length one past the end of a real routing entry.
        ("metadata length one too long", {
            let m = route_metadata("publish");
            let mut body = BytesMut::new();
            body.put_uint(m.len() as u64 + 1, 3);
            body.extend_from_slice(&m);
            raw_frame(1, 0x04, 0x100, &body)
        }),
    ];
    for (what, frame) in cases {
        let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
        c.send_raw(&frame).await;
        expect_conn_error(&mut c, CONNECTION_ERROR, "1003 MALFORMED_FRAME").await;
        by.check(what).await;
    }
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_length_prefix_is_refused_without_reading_the_frame() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "huge-prefix").await;
    // 0xFFFFFF (16 MiB - 1): the error must come at once, after only the
    // handful of bytes we send (the broker must not wait for, or buffer, the announced frame).
    for (prefix, after_setup) in [([0xFF, 0xFF, 0xFF], true), ([0xFF, 0xFF, 0xFF], false)] {
        let mut c = if after_setup {
            RawClient::setup(&b.addr(), LIFETIME).await
        } else {
            RawClient::connect(&b.addr()).await
        };
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 1, 0x10, 0, 1, 2, 3]);
        let start = Instant::now();
        c.send_raw(&bytes).await;
        expect_conn_error(&mut c, CONNECTION_ERROR, "1007 PAYLOAD_TOO_LARGE").await;
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "refusal took {:?}",
            start.elapsed()
        );
        by.check(&format!("length prefix {prefix:02x?}")).await;
    }
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payload_is_refused_and_the_connection_stays_open() {
    const MAX: usize = 65536;
    let b = TestBroker::start_with(&["--max-payload", "65536"]);
    let mut by = Bystander::new(&b, "oversize").await;
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;

    c.request(
        1,
        "publish",
        publish_data("big", &[Bytes::from(vec![7u8; MAX + 1])]),
    )
    .await;
    expect_app_error(&mut c, 1, "1007 PAYLOAD_TOO_LARGE").await;
    by.check("an oversize payload").await;

    // One oversize message among valid ones: the whole request is refused, nothing stored.
    let mixed = [Bytes::from_static(b"ok"), Bytes::from(vec![1u8; MAX + 1])];
    c.request(3, "publish", publish_data("big", &mixed)).await;
    expect_app_error(&mut c, 3, "1007 PAYLOAD_TOO_LARGE").await;

    // Same connection: exactly max_payload is fine, and it is the topic's first message.
    c.request(
        5,
        "publish",
        publish_data("big", &[Bytes::from(vec![9u8; MAX])]),
    )
    .await;
    let r = expect_publish_reply(&mut c, 5, "max_payload bytes").await;
    assert_eq!(
        (r.first_seq, r.last_seq),
        (1, 1),
        "nothing of the refused requests stored"
    );
    let got = drain(&b.addr(), "big", 1).await;
    assert_eq!(got[0].1.len(), MAX);

    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messagepack_is_bad_payload_and_the_connection_stays_open() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "bad-msgpack").await;
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    let cases: [(&str, Bytes); 4] = [
        ("never-used byte 0xc1", Bytes::from_static(b"\xc1\xc1\xc1")),
        ("truncated map", Bytes::from_static(b"\x82\xa5topic")),
        ("an integer instead of a map", Bytes::from_static(b"\x05")),
        (
            "a message without payload",
            sluice_protocol::encode(
                &serde_json::json!({"topic": "t", "messages": [{"priority": 1}]}),
            )
            .expect("encode"),
        ),
    ];
    let mut sid = 1;
    for (what, data) in cases {
        c.request(sid, "publish", data).await;
        expect_app_error(&mut c, sid, "1006 BAD_PAYLOAD").await;
        by.check(what).await;
        sid += 2;
    }
    // A request with no data at all.
    let f = rf::RequestResponse::builder(sid, 0)
        .set_metadata(route_metadata("publish"))
        .build();
    c.send(&f).await;
    expect_app_error(&mut c, sid, "1006 BAD_PAYLOAD").await;
    sid += 2;
    // Same connection still works.
    c.request(
        sid,
        "publish",
        publish_data("after-bad", &[Bytes::from_static(b"x")]),
    )
    .await;
    expect_publish_reply(&mut c, sid, "valid publish after bad MessagePack").await;
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_errors() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "routing").await;
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    let sub = sluice_protocol::encode(&SubscribeRequest {
        topic: "t".into(),
        group: "g".into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: None,
        batch_size: None,
        backoff: None,
    })
    .expect("encode");

    // Unknown routes (request-response and request-stream).
    c.request(1, "nope", Bytes::from_static(b"\x80")).await;
    expect_app_error(&mut c, 1, "1004 UNKNOWN_ROUTE").await;
    c.request(3, "fetch", Bytes::from_static(b"\x80")).await;
    expect_app_error(&mut c, 3, "1004 UNKNOWN_ROUTE").await;
    let f = rf::RequestStream::builder(5, 0)
        .set_initial_request_n(1)
        .set_metadata(route_metadata("Subscribe"))
        .set_data(sub.clone())
        .build();
    c.send(&f).await;
    expect_app_error(&mut c, 5, "1004 UNKNOWN_ROUTE").await;
    by.check("unknown routes").await;

    // No metadata at all.
    let f = rf::RequestResponse::builder(7, 0)
        .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
        .build();
    c.send(&f).await;
    expect_app_error(&mut c, 7, "1005 MISSING_ROUTE").await;
    // Composite metadata without a routing entry.
    let f = rf::RequestResponse::builder(9, 0)
        .set_metadata(Bytes::from_static(b"\x83\x00\x00\x01x"))
        .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
        .build();
    c.send(&f).await;
    expect_app_error(&mut c, 9, "1005 MISSING_ROUTE").await;
    by.check("missing routes").await;

    // Routes used with the wrong interaction model.
    c.request(11, "subscribe", sub.clone()).await;
    expect_app_error(&mut c, 11, "1009 WRONG_INTERACTION").await;
    let f = rf::RequestStream::builder(13, 0)
        .set_initial_request_n(1)
        .set_metadata(route_metadata("publish"))
        .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
        .build();
    c.send(&f).await;
    expect_app_error(&mut c, 13, "1009 WRONG_INTERACTION").await;
    by.check("wrong interaction").await;

    // The connection stays usable, and the refused publish-as-stream stored nothing.
    c.request(
        15,
        "publish",
        publish_data("t", &[Bytes::from_static(b"x")]),
    )
    .await;
    let r = expect_publish_reply(&mut c, 15, "valid publish after routing errors").await;
    assert_eq!(r.first_seq, 1, "a refused request stored a message");
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_before_setup_is_not_set_up() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "before-setup").await;
    let mut c = RawClient::connect(&b.addr()).await;
    c.request(
        1,
        "publish",
        publish_data("never-stored", &[Bytes::from_static(b"x")]),
    )
    .await;
    expect_conn_error(&mut c, CONNECTION_ERROR, "1010 NOT_SET_UP").await;
    by.check("a request before SETUP").await;

    // A KEEPALIVE before SETUP too (§2.3: "any other frame before SETUP").
    let mut c = RawClient::connect(&b.addr()).await;
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(b"ping"))
            .build(),
    )
    .await;
    expect_conn_error(&mut c, CONNECTION_ERROR, "1010 NOT_SET_UP").await;
    by.check("a KEEPALIVE before SETUP").await;
    by.finish(&b).await;
    // The refused publish stored nothing.
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    c.request(
        1,
        "publish",
        publish_data("never-stored", &[Bytes::from_static(b"x")]),
    )
    .await;
    let r = expect_publish_reply(&mut c, 1, "publish after SETUP").await;
    assert_eq!(r.first_seq, 1, "the publish sent before SETUP was stored");
}

fn setup_with_data(data: Bytes) -> Frame {
    rf::Setup::builder(0, 0)
        .set_keepalive(Duration::from_secs(20))
        .set_lifetime(LIFETIME)
        .set_mime_metadata(sluice_protocol::METADATA_MIME_TYPE)
        .set_mime_data(sluice_protocol::DATA_MIME_TYPE)
        .set_data(data)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_setup_is_rejected() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "bad-setup").await;

    for (what, data) in [
        ("not MessagePack", Bytes::from_static(b"\xc1\xc1\xc1\xc1")),
        ("ASCII text", Bytes::from_static(b"hello, broker")),
        (
            "empty client_id",
            sluice_protocol::encode(&SetupRequest::new("")).expect("encode"),
        ),
    ] {
        let mut c = RawClient::connect(&b.addr()).await;
        c.send(&setup_with_data(data)).await;
        expect_conn_error(&mut c, REJECTED_SETUP, "1002 INVALID_SETUP").await;
        by.check(what).await;
    }

    for version in [99, 0] {
        let mut c = RawClient::connect(&b.addr()).await;
        let req = SetupRequest {
            version,
            client_id: "v99".into(),
            token: None,
        };
        c.send(&setup_with_data(
            sluice_protocol::encode(&req).expect("encode"),
        ))
        .await;
        expect_conn_error(&mut c, REJECTED_SETUP, "1001 UNSUPPORTED_VERSION").await;
        by.check(&format!("SETUP version {version}")).await;
    }
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_setup_within_the_setup_timeout_closes() {
    let b = TestBroker::start_with(&["--setup-timeout", "1s"]);
    let mut by = Bystander::new(&b, "setup-timeout").await;
    let start = Instant::now();
    let mut silent = RawClient::connect(&b.addr()).await;
    // A client that connected and sent half a frame is not set up either.
    let mut partial = RawClient::connect(&b.addr()).await;
    partial.send_raw(&[0, 0, 40, 0, 0]).await;
    // Meanwhile the bystander keeps working.
    by.check("idle connections opened").await;
    for c in [&mut silent, &mut partial] {
        expect_conn_error(c, INVALID_SETUP, "1002 INVALID_SETUP").await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "closed after {took:?} (setup timeout 1 s)"
        );
    }
    by.check("the setup timeout").await;
    // The bystander itself (set up, then quiet for longer than the setup timeout) is unaffected.
    by.finish(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_fault_without_the_flag_is_refused() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "admin-fault").await;
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    for (sid, actor) in [(1, "orchestrator"), (3, "store"), (5, "no-such-actor")] {
        let req = FaultRequest {
            actor: actor.into(),
            kind: None,
            duration: None,
        };
        c.request(
            sid,
            "admin.fault",
            sluice_protocol::encode(&req).expect("encode"),
        )
        .await;
        expect_app_error(&mut c, sid, "2006 FAULT_INJECTION_DISABLED").await;
    }
    by.check("admin.fault").await;
    // Nothing was stopped: stats show no restarts.
    c.request(7, "admin.stats", Bytes::from_static(b"\x80"))
        .await;
    let f = next(&mut c, T).await.expect("stats reply");
    let stats: sluice_protocol::BrokerStats = sluice_protocol::decode(
        &payload_of(&f).unwrap_or_else(|| panic!("admin.stats failed: {:?}", error_of(&f))),
    )
    .expect("decode BrokerStats");
    for a in &stats.actors {
        assert_eq!(a.restarts, 0, "actor {} restarted", a.name);
    }
    by.finish(&b).await;
}

/// docs/protocol.md §1.5 and §11: `max_frame` defaults to 4 MiB, so a length prefix of 4 MiB + 1
/// is refused with `1007` before the frame is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_max_frame_is_4_mib() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "max-frame").await;
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    let len = MAX_FRAME + 1;
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8];
    bytes.extend_from_slice(&[0, 0, 0, 1, 0x10, 0, 1, 2, 3]);
    c.send_raw(&bytes).await;
    expect_conn_error(&mut c, CONNECTION_ERROR, "1007 PAYLOAD_TOO_LARGE").await;
    by.check("a length prefix of max_frame + 1").await;
    by.finish(&b).await;
}

#[derive(Clone, Copy)]
enum Expect {
    /// ERROR on stream 0 with this RSocket code and text prefix, then close.
    Conn(u32, &'static str),
    /// APPLICATION_ERROR on this stream with this text prefix; the connection stays open.
    App(u32, &'static str),
    /// Silently ignored: the connection stays open and nothing is sent.
    Ignored,
    /// The broker closes the connection without sending anything.
    ClosedSilently,
}

fn encoded(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    sluice::session::frame::encode_frame(f, &mut b);
    b.to_vec()
}

/// The rest of docs/protocol.md §2.3 / §2.4 / §3.1, one case per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_frame_level_faults_follow_the_spec() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "other-faults").await;
    let setup_ok = encoded(&setup_frame("again", LIFETIME));
    let base_setup = || {
        rf::Setup::builder(0, 0)
            .set_keepalive(Duration::from_secs(20))
            .set_lifetime(LIFETIME)
            .set_mime_metadata(sluice_protocol::METADATA_MIME_TYPE)
            .set_mime_data(sluice_protocol::DATA_MIME_TYPE)
            .set_data(sluice_protocol::encode(&SetupRequest::new("x")).expect("encode"))
    };
    let sub = sluice_protocol::encode(&SubscribeRequest {
        topic: "t".into(),
        group: "g".into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: None,
        batch_size: None,
        backoff: None,
    })
    .expect("encode");
    let subscribe_on_1 = encoded(
        &rf::RequestStream::builder(1, 0)
            .set_initial_request_n(1)
            .set_metadata(route_metadata("subscribe"))
            .set_data(sub)
            .build(),
    );
    let publish_rr = |sid: u32, metadata: Bytes| {
        encoded(
            &rf::RequestResponse::builder(sid, 0)
                .set_metadata(metadata)
                .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
                .build(),
        )
    };
    let two_tags = {
        // fe 00 00 0f · 07 "publish" · 06 "ignore"
        let mut m = vec![0xFE, 0, 0, 15, 7];
        m.extend_from_slice(b"publish");
        m.push(6);
        m.extend_from_slice(b"ignore");
        Bytes::from(m)
    };
    let resume = {
        let mut body = vec![0, 1, 0, 0, 0, 2, b't', b'k'];
        body.extend_from_slice(&[0; 16]);
        raw_frame(0, 0x0D, 0, &body)
    };
    let channel = encoded(
        &rf::RequestChannel::builder(1, 0)
            .set_initial_request_n(1)
            .set_metadata(route_metadata("publish"))
            .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
            .build(),
    );
    let malformed = Expect::Conn(CONNECTION_ERROR, "1003 MALFORMED_FRAME");
    let cases: Vec<(&str, bool, Vec<u8>, Expect)> = vec![
        ("a second SETUP", true, setup_ok, malformed),
        (
            "REQUEST_N of 0",
            true,
            raw_frame(1, 0x08, 0, &[0; 4]),
            malformed,
        ),
        (
            "a request on stream 0",
            true,
            publish_rr(0, route_metadata("publish")),
            malformed,
        ),
        (
            "KEEPALIVE on stream 1",
            true,
            raw_frame(1, 0x03, 0x80, &[0; 8]),
            malformed,
        ),
        (
            "a frame shorter than its header",
            true,
            vec![0, 0, 2, 0, 0],
            malformed,
        ),
        (
            "the reserved stream-id bit",
            true,
            raw_frame(0x8000_0001, 0x09, 0, &[]),
            malformed,
        ),
        (
            "EXT without the I flag",
            true,
            raw_frame(1, 0x3F, 0, b"ext"),
            malformed,
        ),
        (
            "frame type 0x00",
            true,
            raw_frame(1, 0x00, 0, b"zero"),
            malformed,
        ),
        (
            "a request on a stream id still open",
            true,
            [subscribe_on_1, publish_rr(1, route_metadata("publish"))].concat(),
            malformed,
        ),
        (
            "EXT with the I flag",
            true,
            raw_frame(1, 0x3F, 0x200, b"ext"),
            Expect::Ignored,
        ),
        (
            "METADATA_PUSH",
            true,
            raw_frame(0, 0x0C, 0x100, b"meta"),
            Expect::Ignored,
        ),
        (
            "REQUEST_N for a stream not open",
            true,
            raw_frame(99, 0x08, 0, &[0, 0, 0, 5]),
            Expect::Ignored,
        ),
        (
            "CANCEL for a stream not open",
            true,
            raw_frame(99, 0x09, 0, &[]),
            Expect::Ignored,
        ),
        (
            "a PAYLOAD continuing no fragment",
            true,
            raw_frame(99, 0x0A, 0x20, b"x"),
            Expect::Ignored,
        ),
        (
            "KEEPALIVE without R",
            true,
            raw_frame(0, 0x03, 0, &[0; 8]),
            Expect::Ignored,
        ),
        (
            "SETUP with RSocket major 2",
            false,
            encoded(&base_setup().set_version(2, 0).build()),
            Expect::Conn(0x002, "1001 UNSUPPORTED_VERSION"),
        ),
        (
            "SETUP with the lease flag",
            false,
            encoded(
                &rf::Setup::builder(0, 0x040)
                    .set_mime_metadata(sluice_protocol::METADATA_MIME_TYPE)
                    .set_mime_data(sluice_protocol::DATA_MIME_TYPE)
                    .set_data(sluice_protocol::encode(&SetupRequest::new("x")).expect("encode"))
                    .build(),
            ),
            Expect::Conn(0x002, "1011 UNSUPPORTED"),
        ),
        (
            "SETUP with a resume token",
            false,
            encoded(&base_setup().set_token(Bytes::from_static(b"tok")).build()),
            Expect::Conn(0x002, "1011 UNSUPPORTED"),
        ),
        (
            "SETUP without data",
            false,
            encoded(
                &rf::Setup::builder(0, 0)
                    .set_mime_metadata(sluice_protocol::METADATA_MIME_TYPE)
                    .set_mime_data(sluice_protocol::DATA_MIME_TYPE)
                    .build(),
            ),
            Expect::Conn(REJECTED_SETUP, "1002 INVALID_SETUP"),
        ),
        (
            "RESUME",
            false,
            resume,
            Expect::Conn(0x004, "1011 UNSUPPORTED"),
        ),
        (
            "LEASE after SETUP",
            true,
            raw_frame(0, 0x02, 0, &[0; 8]),
            Expect::Conn(CONNECTION_ERROR, "1011 UNSUPPORTED"),
        ),
        (
            "LEASE before SETUP",
            false,
            raw_frame(0, 0x02, 0, &[0; 8]),
            Expect::Conn(CONNECTION_ERROR, "1010 NOT_SET_UP"),
        ),
        (
            "a client ERROR on stream 0",
            true,
            raw_frame(0, 0x0B, 0, b"\x00\x00\x01\x01bye"),
            Expect::ClosedSilently,
        ),
        (
            "two routing tags",
            true,
            publish_rr(1, two_tags),
            Expect::App(1, "1008 INVALID_REQUEST"),
        ),
        (
            "REQUEST_CHANNEL",
            true,
            channel,
            Expect::App(1, "1009 WRONG_INTERACTION"),
        ),
    ];
    for (what, after_setup, bytes, expect) in cases {
        let mut c = if after_setup {
            RawClient::setup(&b.addr(), LIFETIME).await
        } else {
            RawClient::connect(&b.addr()).await
        };
        c.send_raw(&bytes).await;
        match expect {
            Expect::Conn(code, prefix) => {
                let seen = closed(&mut c, T)
                    .await
                    .unwrap_or_else(|| panic!("{what}: connection not closed"));
                let errs: Vec<_> = seen
                    .iter()
                    .map(|f| (f.get_stream_id(), error_of(f)))
                    .collect();
                assert!(
                    matches!(&errs[..], [(0, Some((c, t)))] if *c == code && t.starts_with(prefix)),
                    "{what}: expected ERROR 0x{code:03x} {prefix:?} on stream 0, got {seen:?}"
                );
            }
            Expect::App(sid, prefix) => {
                expect_app_error(&mut c, sid, prefix).await;
                expect_still_open(&mut c, what).await;
            }
            Expect::Ignored => expect_still_open(&mut c, what).await,
            Expect::ClosedSilently => {
                let seen = closed(&mut c, T)
                    .await
                    .unwrap_or_else(|| panic!("{what}: connection not closed"));
                assert!(seen.is_empty(), "{what}: got {seen:?}");
            }
        }
        by.check(what).await;
    }
    by.finish(&b).await;
}

/// The connection still answers: a KEEPALIVE with RESPOND gets its KEEPALIVE back (and nothing
/// else came first).
async fn expect_still_open(c: &mut RawClient, what: &str) {
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(b"ok"))
            .build(),
    )
    .await;
    let f = next(c, T).await.unwrap_or_else(|| panic!("{what}: closed"));
    assert!(
        matches!(f.get_body_ref(), rf::Body::Keepalive(_)),
        "{what}: answered with {f:?}"
    );
}

/// docs/protocol.md §1.4: a client's requests use odd stream ids; a request (of any kind) on an
/// even id is a malformed frame that closes the connection. The broker does not check that ids
/// increase (rsocket_rust's client puts concurrent requests on the wire out of id order): a
/// smaller id, or the id of a finished request, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_even_stream_ids_are_malformed() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "stream-ids").await;
    let publish = |sid: u32| {
        encoded(
            &rf::RequestResponse::builder(sid, 0)
                .set_metadata(route_metadata("publish"))
                .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
                .build(),
        )
    };
    let fnf = encoded(
        &rf::RequestFNF::builder(4, 0)
            .set_metadata(route_metadata("publish"))
            .set_data(publish_data("t", &[Bytes::from_static(b"x")]))
            .build(),
    );
    let stream = encoded(
        &rf::RequestStream::builder(6, 0)
            .set_initial_request_n(1)
            .set_metadata(route_metadata("subscribe"))
            .set_data(Bytes::from_static(b"\x80"))
            .build(),
    );
    let fragment = encoded(
        &rf::RequestResponse::builder(8, Frame::FLAG_FOLLOW)
            .set_metadata(route_metadata("publish"))
            .build(),
    );
    let cases = [
        ("REQUEST_RESPONSE on stream 2", publish(2)),
        ("REQUEST_FNF on stream 4", fnf),
        ("REQUEST_STREAM on stream 6", stream),
        ("a first fragment on stream 8", fragment),
        ("REQUEST_RESPONSE on stream 2^31-2", publish(0x7FFF_FFFE)),
        // Odd ids first, then an even one: still refused.
        ("stream 2 after stream 1", [publish(1), publish(2)].concat()),
    ];
    for (what, bytes) in cases {
        let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
        c.send_raw(&bytes).await;
        let seen = closed(&mut c, T)
            .await
            .unwrap_or_else(|| panic!("{what}: connection not closed"));
        let errs: Vec<_> = seen
            .iter()
            .filter(|f| f.get_stream_id() == 0)
            .filter_map(error_of)
            .collect();
        assert!(
            matches!(&errs[..], [(code, text)] if *code == CONNECTION_ERROR && text.starts_with("1003 MALFORMED_FRAME")),
            "{what}: expected ERROR 0x101 1003 on stream 0, got {seen:?}"
        );
        by.check(what).await;
    }
    // Decreasing ids and the id of a finished request are served.
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    for sid in [9, 7, 1, 9, 0x7FFF_FFFF] {
        c.request(
            sid,
            "publish",
            publish_data("t", &[Bytes::from_static(b"y")]),
        )
        .await;
        expect_publish_reply(&mut c, sid, &format!("publish on stream {sid}")).await;
    }
    by.check("decreasing and reused ids").await;
    by.finish(&b).await;
}

/// docs/protocol.md §1.6: a fragmented request is reassembled; the bytes of all requests in
/// reassembly on a connection are bounded by the max request size (4 MiB), and at most 64
/// requests may be in reassembly at once; past either, `0x101 1007` and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_requests_are_reassembled_within_their_limits() {
    let b = TestBroker::start();
    let mut by = Bystander::new(&b, "fragments").await;
    let first = |sid: u32, data: Bytes| {
        encoded(
            &rf::RequestResponse::builder(sid, Frame::FLAG_FOLLOW)
                .set_metadata(route_metadata("publish"))
                .set_data(data)
                .build(),
        )
    };
    let more = |sid: u32, data: Bytes, follows: bool| {
        let flags = if follows { Frame::FLAG_FOLLOW } else { 0 } | Frame::FLAG_NEXT;
        encoded(&rf::Payload::builder(sid, flags).set_data(data).build())
    };

    // A publish in three fragments.
    let whole = publish_data("reassembled", &[Bytes::from(vec![b'f'; 3000])]);
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    c.send_raw(
        &[
            first(1, whole.slice(..1000)),
            more(1, whole.slice(1000..2000), true),
            more(1, whole.slice(2000..), false),
        ]
        .concat(),
    )
    .await;
    let r = expect_publish_reply(&mut c, 1, "a publish in three fragments").await;
    assert_eq!((r.topic.as_str(), r.first_seq), ("reassembled", 1));

    // Two requests in reassembly, 3 MiB each: together over 4 MiB.
    let chunk = Bytes::from(vec![0u8; 3 * 1024 * 1024]);
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    c.send_raw(&first(1, chunk.clone())).await;
    c.send_raw(&first(3, chunk)).await;
    expect_conn_error(&mut c, CONNECTION_ERROR, "1007 PAYLOAD_TOO_LARGE").await;
    by.check("6 MiB in reassembly").await;

    // 64 requests in reassembly are fine (one more fragment each completes nothing); the 65th
    // is refused.
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    let starts: Vec<u8> = (0..64)
        .flat_map(|i| first(1 + 2 * i, Bytes::from_static(b"\x82")))
        .collect();
    c.send_raw(&starts).await;
    expect_still_open(&mut c, "64 requests in reassembly").await;
    c.send_raw(&first(129, Bytes::from_static(b"\x82"))).await;
    expect_conn_error(&mut c, CONNECTION_ERROR, "1007 PAYLOAD_TOO_LARGE").await;
    by.check("65 requests in reassembly").await;
    by.finish(&b).await;
}
