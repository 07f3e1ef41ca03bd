//! Flow control and liveness (docs/protocol.md §2.2, §6.3, §6.6): REQUEST_N credits, the window,
//! KEEPALIVE echo, and the keepalive lifetime with redelivery of a silent consumer's batch.
mod common;

use bytes::Bytes;
use common::*;
use rsocket_rust::frame::{self as rf, Body, Frame};
use sluice_protocol::{AckOutcome, AckReply, AckRequest, Batch, StreamEvent};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);
const LIFETIME: Duration = Duration::from_secs(60);

// `RawClient::next` keeps a 64 KiB buffer in its future; boxing it keeps the test bodies' own
// futures (and their debug-build stack frames) small.
async fn next(c: &mut RawClient, t: Duration) -> Option<Frame> {
    Box::pin(c.next(t)).await
}

async fn closed(c: &mut RawClient, t: Duration) -> Option<Vec<Frame>> {
    Box::pin(c.closed_within(t)).await
}

/// The batch carried by a PAYLOAD frame of a subscribe stream.
fn batch_of(f: &Frame, sid: u32) -> Batch {
    assert_eq!(f.get_stream_id(), sid, "unexpected frame {f:?}");
    assert!(
        f.get_flag() & Frame::FLAG_NEXT != 0 && f.get_flag() & Frame::FLAG_COMPLETE == 0,
        "stream item without NEXT or with COMPLETE: {f:?}"
    );
    let data = payload_of(f).unwrap_or_else(|| panic!("subscribe failed: {:?}", error_of(f)));
    match sluice_protocol::decode::<StreamEvent>(&data).expect("decode StreamEvent") {
        StreamEvent::Batch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

async fn next_batch(c: &mut RawClient, sid: u32, what: &str) -> Batch {
    let f = next(c, T)
        .await
        .unwrap_or_else(|| panic!("{what}: no batch within {T:?}"));
    batch_of(&f, sid)
}

/// Asserts that nothing arrives for `QUIET` (and that the connection is still open then).
async fn assert_quiet(c: &mut RawClient, what: &str) {
    if let Some(f) = next(c, QUIET).await {
        panic!("{what}: unexpected frame {f:?}");
    }
    // Still open: a KEEPALIVE with R is echoed.
    keepalive_roundtrip(c, b"still-open").await;
}

async fn keepalive_roundtrip(c: &mut RawClient, data: &'static [u8]) {
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(data))
            .build(),
    )
    .await;
    let f = next(c, T).await.expect("KEEPALIVE echo");
    assert_eq!(f.get_stream_id(), 0, "{f:?}");
    assert_eq!(
        f.get_flag() & Frame::FLAG_RESPOND,
        0,
        "echo has the R flag: {f:?}"
    );
    match f.get_body_ref() {
        Body::Keepalive(k) => {
            assert_eq!(k.get_data().map(|d| &d[..]), Some(data));
            assert_eq!(k.get_last_received_position(), 0);
        }
        other => panic!("expected KEEPALIVE, got {other:?}"),
    }
}

async fn ack(c: &mut RawClient, sid: u32, b: &Batch) -> AckReply {
    let req = AckRequest {
        topic: b.topic.clone(),
        group: b.group.clone(),
        batch_id: b.batch_id,
        seqs: Some(b.messages.iter().map(|m| m.seq).collect()),
    };
    c.request(sid, "ack", sluice_protocol::encode(&req).expect("encode"))
        .await;
    let f = next(c, T).await.expect("ack reply");
    assert_eq!(f.get_stream_id(), sid, "{f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("ack failed: {:?}", error_of(&f)));
    sluice_protocol::decode(&data).expect("decode AckReply")
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_n_credits_bound_the_stream() {
    let b = TestBroker::start();
    let mut producer = RawClient::setup(&b.addr(), LIFETIME).await;
    let r = raw_publish(&mut producer, 1, "credits", 10).await;
    assert_eq!((r.first_seq, r.last_seq), (1, 10));

    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    c.send(&subscribe_frame(1, 2, "credits", "g", 16, 1)).await;
    let mut got = Vec::new();
    for i in 0..2 {
        let batch = next_batch(&mut c, 1, &format!("initial credit {i}")).await;
        assert_eq!(batch.messages.len(), 1, "batch_size 1: {batch:?}");
        assert_eq!(
            (batch.topic.as_str(), batch.group.as_str()),
            ("credits", "g")
        );
        assert_eq!(batch.messages[0].attempt, 1);
        got.push(batch);
    }
    assert_quiet(&mut c, "after 2 items with n = 2").await;

    c.send(&rf::RequestN::builder(1, 0).set_n(3).build()).await;
    for i in 0..3 {
        got.push(next_batch(&mut c, 1, &format!("REQUEST_N(3) item {i}")).await);
    }
    assert_quiet(&mut c, "after 5 items with n = 2 + 3").await;

    let all: Vec<u64> = got.iter().flat_map(seqs).collect();
    assert_eq!(all, vec![1, 2, 3, 4, 5], "delivered in sequence order");
    let payloads: Vec<Bytes> = got.iter().map(|b| b.messages[0].payload.clone()).collect();
    assert_eq!(payloads[0], Bytes::from_static(b"m1"));
    assert_eq!(payloads[4], Bytes::from_static(b"m5"));
    let mut ids: Vec<u64> = got.iter().map(|b| b.batch_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5, "distinct batch ids");

    // Ack works as request-response, and settling frees window slots but not credits.
    let reply = ack(&mut c, 3, &got[0]).await;
    assert_eq!((reply.outcome, reply.count), (AckOutcome::Settled, 1));
    let reply = ack(&mut c, 5, &got[0]).await;
    assert_eq!((reply.outcome, reply.count), (AckOutcome::AlreadyAcked, 0));
    assert_quiet(&mut c, "after an ack with no credits left").await;

    // One more credit: the next message, seq 6.
    c.send(&rf::RequestN::builder(1, 0).set_n(1).build()).await;
    let batch = next_batch(&mut c, 1, "REQUEST_N(1)").await;
    assert_eq!(seqs(&batch), vec![6]);
    assert_quiet(&mut c, "after REQUEST_N(1)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_with_respond_is_echoed() {
    let b = TestBroker::start();
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    keepalive_roundtrip(&mut c, b"ping").await;
    // Binary data, and several in a row, each echoed in order.
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(b"\x00\xff\x01"))
            .build(),
    )
    .await;
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(b"second"))
            .build(),
    )
    .await;
    for want in [&b"\x00\xff\x01"[..], b"second"] {
        let f = next(&mut c, T).await.expect("echo");
        assert_eq!(f.get_flag() & Frame::FLAG_RESPOND, 0);
        match f.get_body_ref() {
            Body::Keepalive(k) => assert_eq!(k.get_data().map(|d| &d[..]), Some(want)),
            other => panic!("expected KEEPALIVE, got {other:?}"),
        }
    }
    // A KEEPALIVE without R is just life: no answer.
    c.send(
        &rf::Keepalive::builder(0, 0)
            .set_data(Bytes::from_static(b"no-answer"))
            .build(),
    )
    .await;
    if let Some(f) = next(&mut c, QUIET).await {
        panic!("KEEPALIVE without R was answered: {f:?}");
    }
    keepalive_roundtrip(&mut c, b"pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_its_lifetime_and_its_batch_redelivered() {
    let b = TestBroker::start_with(&["--batch-timeout", "60s"]);
    let mut producer = RawClient::setup(&b.addr(), LIFETIME).await;
    raw_publish(&mut producer, 1, "lifetime", 3).await;

    // A: lifetime 1 s, subscribes, receives the batch, then stays silent.
    let mut a = RawClient::setup(&b.addr(), Duration::from_secs(1)).await;
    a.send(&subscribe_frame(1, 100, "lifetime", "g", 4, 16))
        .await;
    let silent_since = Instant::now();
    let mut first = Vec::new();
    while first.len() < 3 {
        let batch = next_batch(&mut a, 1, "consumer A").await;
        assert!(batch.messages.iter().all(|m| m.attempt == 1));
        first.extend(seqs(&batch));
    }
    assert_eq!(first, vec![1, 2, 3]);

    // B joins the same group; nothing is pending, so it gets nothing yet.
    let mut bc = RawClient::setup(&b.addr(), LIFETIME).await;
    bc.send(&subscribe_frame(1, 100, "lifetime", "g", 4, 16))
        .await;

    // The broker drops A: ERROR 0x101 "3003 TIMEOUT" on stream 0, then EOF.
    let seen = closed(&mut a, Duration::from_secs(6))
        .await
        .expect("silent client not disconnected");
    let dropped_after = silent_since.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(900),
        "dropped after {dropped_after:?}, before its 1 s lifetime"
    );
    let errs: Vec<(u32, String)> = seen.iter().filter_map(error_of).collect();
    assert!(
        errs.iter()
            .any(|(code, text)| *code == 0x101 && text.starts_with("3003 TIMEOUT")),
        "expected ERROR 0x101 3003 TIMEOUT before the close, got {seen:?}"
    );

    // B receives the same seqs, attempt 2, long before the 60 s batch timeout.
    let mut again = Vec::new();
    while again.len() < 3 {
        let batch = next_batch(&mut bc, 1, "consumer B (redelivery)").await;
        for m in &batch.messages {
            assert_eq!(m.attempt, 2, "redelivered message {} attempt", m.seq);
        }
        again.extend(batch.messages.iter().map(|m| (m.seq, m.payload.clone())));
    }
    let redelivered_after = silent_since.elapsed();
    assert!(
        redelivered_after < Duration::from_secs(10),
        "redelivered after {redelivered_after:?}"
    );
    assert_eq!(
        again,
        vec![
            (1, Bytes::from_static(b"m1")),
            (2, Bytes::from_static(b"m2")),
            (3, Bytes::from_static(b"m3")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_bounds_unsettled_batches() {
    let b = TestBroker::start();
    let mut producer = RawClient::setup(&b.addr(), LIFETIME).await;
    raw_publish(&mut producer, 1, "window", 10).await;

    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    c.send(&subscribe_frame(1, 1000, "window", "g", 2, 1)).await;
    let first = next_batch(&mut c, 1, "window slot 1").await;
    let second = next_batch(&mut c, 1, "window slot 2").await;
    assert_eq!((seqs(&first), seqs(&second)), (vec![1], vec![2]));
    assert_quiet(&mut c, "window of 2 full").await;

    // Ack one: exactly one more arrives (the ack reply and the batch may come in any order).
    let req = AckRequest {
        topic: "window".into(),
        group: "g".into(),
        batch_id: first.batch_id,
        seqs: Some(seqs(&first)),
    };
    c.request(3, "ack", sluice_protocol::encode(&req).expect("encode"))
        .await;
    let mut reply = None;
    let mut more = Vec::new();
    while reply.is_none() || more.is_empty() {
        let f = next(&mut c, T).await.expect("ack reply and one more batch");
        match f.get_stream_id() {
            3 => {
                let data =
                    payload_of(&f).unwrap_or_else(|| panic!("ack failed: {:?}", error_of(&f)));
                let r: AckReply = sluice_protocol::decode(&data).expect("decode AckReply");
                reply = Some(r);
            }
            _ => more.push(batch_of(&f, 1)),
        }
    }
    let r = reply.expect("ack reply");
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 1));
    assert_eq!(seqs(&more[0]), vec![3]);
    assert_quiet(&mut c, "window full again after one ack").await;

    // Acking the whole batch (no seqs) frees a slot too.
    let req = AckRequest {
        topic: "window".into(),
        group: "g".into(),
        batch_id: second.batch_id,
        seqs: None,
    };
    c.request(5, "ack", sluice_protocol::encode(&req).expect("encode"))
        .await;
    let mut got_reply = false;
    let mut fourth = None;
    while !got_reply || fourth.is_none() {
        let f = next(&mut c, T).await.expect("ack reply and one more batch");
        if f.get_stream_id() == 5 {
            assert!(payload_of(&f).is_some(), "ack failed: {:?}", error_of(&f));
            got_reply = true;
        } else {
            fourth = Some(batch_of(&f, 1));
        }
    }
    assert_eq!(fourth.map(|b| seqs(&b)), Some(vec![4]));
    assert_quiet(&mut c, "window full again after the second ack").await;
}
