//! Connection churn (docs/protocol.md §2, §6.6): thousands of connect/disconnect cycles, clean
//! and reset, must leave the broker's file descriptors and memory where they were; a subscriber
//! dropped mid-stream must not leak its socket either.
mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use rsocket_rust::frame::{self as rf, Body, Frame};
use sluice_protocol::{
    BrokerStats, GroupMode, NewMessage, PublishRequest, StreamEvent, SubscribeRequest,
};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(5);
const LIFETIME: Duration = Duration::from_secs(60);

// `RawClient::next` keeps a 64 KiB buffer in its future; boxing it keeps the callers' futures
// (and their debug-build stack frames) small.
async fn next(c: &mut RawClient, t: Duration) -> Option<Frame> {
    Box::pin(c.next(t)).await
}

async fn closed(c: &mut RawClient, t: Duration) -> Option<Vec<Frame>> {
    Box::pin(c.closed_within(t)).await
}

/// Open sockets of the broker process (the listener and one per connection).
fn socket_fds(b: &TestBroker) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the broker's fd count stops changing (same value over 5 samples 100 ms apart).
async fn settled_fd_count(b: &TestBroker) -> usize {
    let mut last = b.fd_count();
    let mut same = 0;
    let start = Instant::now();
    while same < 5 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = b.fd_count();
        if now == last {
            same += 1;
        } else {
            same = 0;
            last = now;
        }
    }
    last
}

/// Proves the SETUP was accepted: a KEEPALIVE with R is echoed (before SETUP it would be refused
/// with 1010 NOT_SET_UP).
async fn ensure_set_up(c: &mut RawClient) {
    c.send(
        &rf::Keepalive::builder(0, Frame::FLAG_RESPOND)
            .set_data(Bytes::from_static(b"up?"))
            .build(),
    )
    .await;
    let f = next(c, T).await.expect("KEEPALIVE echo");
    match f.get_body_ref() {
        Body::Keepalive(k) => assert_eq!(k.get_data().map(|d| &d[..]), Some(&b"up?"[..])),
        other => panic!("expected a KEEPALIVE echo, got {other:?}"),
    }
}

/// One cycle: connect, SETUP, then either a graceful close (FIN, and the broker closes its side)
/// or an abortive one (SO_LINGER 0, so dropping the socket sends RST).
async fn cycle(addr: String, reset: bool) {
    let mut c = RawClient::setup(&addr, LIFETIME).await;
    ensure_set_up(&mut c).await;
    if reset {
        c.stream.set_zero_linger().expect("SO_LINGER 0");
        drop(c);
    } else {
        c.stream.shutdown().await.expect("shutdown");
        let seen = closed(&mut c, T)
            .await
            .expect("broker did not close its side after the client's FIN");
        assert!(seen.is_empty(), "frames after a clean close: {seen:?}");
    }
}

async fn run_cycles(addr: &str, from: usize, n: usize) {
    futures::stream::iter(from..from + n)
        .map(|i| cycle(addr.to_string(), i % 2 == 1))
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

async fn stats(c: &mut RawClient, sid: u32) -> BrokerStats {
    c.request(sid, "admin.stats", Bytes::from_static(b"\x80"))
        .await;
    let f = next(c, T).await.expect("stats reply");
    let data = payload_of(&f).unwrap_or_else(|| panic!("admin.stats failed: {:?}", error_of(&f)));
    sluice_protocol::decode(&data).expect("decode BrokerStats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaks_neither_fds_nor_memory() {
    const WARM_UP: usize = 50;
    const CYCLES: usize = 2000;
    let b = TestBroker::start();
    let addr = b.addr();
    let listening_sockets = socket_fds(&b);

    run_cycles(&addr, 0, WARM_UP).await;
    let fd_baseline = settled_fd_count(&b).await;
    assert_eq!(
        socket_fds(&b),
        listening_sockets,
        "sockets still open after the warm-up settled"
    );
    let rss_baseline = b.rss_kb();
    assert!(rss_baseline > 0, "cannot read VmRSS");

    let start = Instant::now();
    run_cycles(&addr, WARM_UP, CYCLES).await;
    let took = start.elapsed();

    let fds_back = eventually(Duration::from_secs(10), || b.fd_count() <= fd_baseline).await;
    assert!(
        fds_back,
        "fd count {} did not return to its baseline {fd_baseline} (sockets: {}, listener: \
         {listening_sockets}) after {CYCLES} cycles",
        b.fd_count(),
        socket_fds(&b)
    );
    assert_eq!(socket_fds(&b), listening_sockets);
    let rss = b.rss_kb();
    assert!(
        rss < rss_baseline + 5120,
        "VmRSS grew from {rss_baseline} KiB to {rss} KiB over {CYCLES} cycles"
    );

    // The broker still serves, and knows of no connection but this one.
    let mut c = RawClient::setup(&addr, LIFETIME).await;
    let s = stats(&mut c, 1).await;
    assert_eq!(
        s.connections.len(),
        1,
        "connections still registered: {:?}",
        s.connections
    );
    eprintln!(
        "{CYCLES} cycles in {took:?}; fds {fd_baseline} -> {}; VmRSS {rss_baseline} -> {rss} KiB",
        b.fd_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_dropped_mid_stream_frees_its_fds() {
    const MESSAGES: usize = 160;
    const PER_PUBLISH: usize = 16;
    let b = TestBroker::start();
    let addr = b.addr();

    // 160 messages of 32 KiB: each subscriber below has up to 4 batches (2 MiB) coming at it.
    let mut producer = RawClient::setup(&addr, LIFETIME).await;
    let mut sid = 1;
    for _ in 0..MESSAGES / PER_PUBLISH {
        let req = PublishRequest {
            topic: "churn".into(),
            messages: (0..PER_PUBLISH)
                .map(|_| NewMessage {
                    payload: Bytes::from(vec![0xAB; 32 * 1024]),
                    ..Default::default()
                })
                .collect(),
        };
        producer
            .request(
                sid,
                "publish",
                sluice_protocol::encode(&req).expect("encode"),
            )
            .await;
        let f = next(&mut producer, T).await.expect("publish reply");
        assert!(
            payload_of(&f).is_some(),
            "publish failed: {:?}",
            error_of(&f)
        );
        sid += 2;
    }
    let fd_baseline = settled_fd_count(&b).await;
    let sockets_baseline = socket_fds(&b);

    let sub = SubscribeRequest {
        topic: "churn".into(),
        group: "g".into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: Some(4),
        batch_size: Some(16),
        backoff: None,
    };
    let data = sluice_protocol::encode(&sub).expect("encode");
    // Ten subscribers, one after the other: each reads one batch and then goes away without a
    // CANCEL, half with a plain close (unread data left: the kernel answers with RST anyway), half
    // with SO_LINGER 0.
    for i in 0..10 {
        let mut c = RawClient::setup(&addr, LIFETIME).await;
        c.send(
            &rf::RequestStream::builder(1, 0)
                .set_initial_request_n(rf::REQUEST_MAX)
                .set_metadata(route_metadata("subscribe"))
                .set_data(data.clone())
                .build(),
        )
        .await;
        let f = next(&mut c, T)
            .await
            .unwrap_or_else(|| panic!("subscriber {i}: no batch"));
        let ev: StreamEvent = sluice_protocol::decode(
            &payload_of(&f)
                .unwrap_or_else(|| panic!("subscriber {i}: subscribe failed: {:?}", error_of(&f))),
        )
        .expect("decode StreamEvent");
        assert!(matches!(ev, StreamEvent::Batch(_)), "{ev:?}");
        if i % 2 == 1 {
            c.stream.set_zero_linger().expect("SO_LINGER 0");
        }
        drop(c);
    }

    let back = eventually(Duration::from_secs(10), || b.fd_count() <= fd_baseline).await;
    assert!(
        back,
        "fd count {} did not return to {fd_baseline} (sockets {} vs {sockets_baseline})",
        b.fd_count(),
        socket_fds(&b)
    );
    assert_eq!(socket_fds(&b), sockets_baseline);

    // The broker knows only the producer, the group has no consumer and nothing in flight.
    let mut s = stats(&mut producer, sid).await;
    sid += 2;
    let settled = Instant::now();
    while s
        .groups
        .iter()
        .any(|g| g.consumers > 0 || g.in_flight_batches > 0)
        && settled.elapsed() < T
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = stats(&mut producer, sid).await;
        sid += 2;
    }
    assert_eq!(s.connections.len(), 1, "{:?}", s.connections);
    let g = s
        .groups
        .iter()
        .find(|g| g.topic == "churn" && g.group == "g")
        .expect("group stats");
    assert_eq!((g.consumers, g.in_flight_batches), (0, 0), "{g:?}");
    // Nothing was acked: every drop was a failed attempt, so whatever lies below the acked floor
    // got there by being dead-lettered after max_retries (§6.5).
    assert!(g.dead_letters >= g.acked_floor, "{g:?}");
}
