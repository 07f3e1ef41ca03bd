//! `admin.events` end to end (issue 11 item 5, docs/protocol.md §6.15): a subscriber sees
//! each kind of lifecycle event caused for real; a subscriber without credit loses the oldest
//! events and is told how many in one `events_lost`; kinds filter; cancel and bad requests.
mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use rsocket_rust::frame::{self as rf, Frame};
use sluice_protocol::{event_kind, BrokerEvent, EventsRequest, NewMessage, TopicSettings};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, EventStream, GroupMode, Producer, SeekTo};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// Reads `events` until one matches `want` (within [`T`]); every event read is kept in `seen`.
async fn wait_for(
    events: &mut EventStream,
    seen: &mut Vec<BrokerEvent>,
    what: &str,
    want: impl Fn(&BrokerEvent) -> bool,
) -> BrokerEvent {
    if let Some(e) = seen.iter().find(|e| want(e)) {
        return e.clone();
    }
    let deadline = Instant::now() + T;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("no {what} event within {T:?}; saw {seen:#?}"));
        let e = match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(e))) => e,
            Ok(other) => panic!("events stream ended waiting for {what}: {other:?}"),
            Err(_) => panic!("no {what} event within {T:?}; saw {seen:#?}"),
        };
        seen.push(e.clone());
        if want(&e) {
            return e;
        }
    }
}

/// Subscribes to every event and makes sure the subscription is live: faults the registry
/// until its `actor_restarted` arrives (events from before a subscription are not sent).
async fn live_events(admin: &Admin, seen: &mut Vec<BrokerEvent>) -> EventStream {
    let mut events = admin.events(Vec::new()).await.expect("admin.events");
    let deadline = Instant::now() + T;
    loop {
        assert!(
            Instant::now() < deadline,
            "no actor_restarted from the registry; saw {seen:#?}"
        );
        admin.fault("registry").await.expect("fault registry");
        let got = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
        if let Ok(Some(Ok(e))) = got {
            seen.push(e);
            if seen.iter().any(|e| {
                e.kind == event_kind::ACTOR_RESTARTED && e.actor.as_deref() == Some("registry")
            }) {
                return events;
            }
        }
    }
}

/// A consumer that never reads: subscribed with every credit and a big window, it only sends
/// KEEPALIVEs, so its socket fills and the broker disconnects it as not reading.
async fn start_hog(addr: &str, topic: &str) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncWriteExt;
    let sa: std::net::SocketAddr = addr.parse().expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut stream = socket.connect(sa).await.expect("connect");
    let mut out = bytes::BytesMut::new();
    for f in [
        setup_frame("hog", Duration::from_secs(60)),
        subscribe_frame(1, rf::REQUEST_MAX, topic, "hog", 1024, 4096),
    ] {
        sluice::session::frame::encode_frame(&f, &mut out);
    }
    stream.write_all(&out).await.expect("write");
    tokio::spawn(async move {
        let (_reads_nothing, mut w) = stream.into_split();
        let mut ka = bytes::BytesMut::new();
        sluice::session::frame::encode_frame(&rf::Keepalive::builder(0, 0).build(), &mut ka);
        while w.write_all(&ka).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// `LimitStats.events_lost` of the broker, once it equals `want` (within [`T`]).
async fn wait_events_lost(admin: &Admin, want: u64) {
    let deadline = Instant::now() + T;
    loop {
        let got = admin
            .stats()
            .await
            .expect("stats")
            .limits
            .map(|l| l.events_lost);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events_lost {got:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The connection's and the registry's events: `actor_restarted` (registry) and
/// `memory_pressure` (a client disconnected for not reading), with their fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_and_a_slow_client_cause_their_events() {
    let b = TestBroker::start_with(&[
        "--enable-fault-injection",
        "--fsync",
        "never",
        "--lifetime",
        "3s",
        "--keepalive",
        "1s",
    ]);
    let admin = Admin::connect(client_config(&b.addr(), "events"))
        .await
        .expect("admin");
    let mut seen = Vec::new();
    let mut events = live_events(&admin, &mut seen).await;
    let restarted = seen
        .iter()
        .find(|e| e.kind == event_kind::ACTOR_RESTARTED)
        .cloned()
        .expect("registry restarted");
    assert!(restarted.count.is_some_and(|n| n >= 1), "{restarted:?}");
    assert!(restarted.at_ms > 0);

    let hog = start_hog(&b.addr(), "firehose").await;
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    for i in 0..16u64 {
        p.publish(
            "firehose",
            NewMessage {
                payload: big_payload(i, 1_000_000),
                ..Default::default()
            },
        )
        .await
        .expect("publish");
    }
    let pressure = wait_for(&mut events, &mut seen, "memory_pressure", |e| {
        e.kind == event_kind::MEMORY_PRESSURE
    })
    .await;
    assert!(
        pressure
            .actor
            .as_deref()
            .is_some_and(|a| a.starts_with("connection-")),
        "{pressure:?}"
    );
    let detail = pressure.detail.clone().unwrap_or_default();
    assert!(
        detail.contains("'hog'") && detail.contains("does not read"),
        "{detail}"
    );
    hog.abort();
}

/// A subscriber that asked for one event and no more: the next ones wait (at most 1,024), the
/// oldest beyond that are dropped, and when it asks for more it first gets ONE `events_lost`
/// with their exact count, then the ones kept, oldest first; `LimitStats.events_lost` counts
/// them. Only the kinds asked for are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_without_credit_is_told_how_many_events_it_lost() {
    const KEPT: u64 = 1024;
    const LOST: u64 = 75;
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let mut raw = RawClient::setup(&b.addr(), Duration::from_secs(120)).await;
    let req = EventsRequest {
        kinds: vec![event_kind::ACTOR_RESTARTED.into()],
    };
    raw.send(&events_frame(1, 1, &req)).await;
    // Until the subscription is live, faults go unseen: fault until the one credit is used.
    let deadline = Instant::now() + T;
    let first = loop {
        assert!(Instant::now() < deadline, "no event on the subscription");
        admin.fault("registry").await.expect("fault");
        if let Some(f) = raw_next(&mut raw, Duration::from_millis(300)).await {
            break event_of(&f);
        }
    };
    let base = first.count.expect("restart number");
    for _ in 0..(KEPT + LOST) {
        admin.fault("registry").await.expect("fault");
    }
    wait_events_lost(&admin, LOST).await;
    assert!(
        raw_next(&mut raw, Duration::from_millis(300))
            .await
            .is_none(),
        "sent without a credit"
    );
    raw.send(&rf::RequestN::builder(1, 0).set_n(5000).build())
        .await;
    let lost = event_of(&raw_next(&mut raw, T).await.expect("events_lost"));
    assert_eq!(
        (lost.kind.as_str(), lost.count),
        (event_kind::EVENTS_LOST, Some(LOST))
    );
    let mut restarts = Vec::new();
    for _ in 0..KEPT {
        let e = event_of(&raw_next(&mut raw, T).await.expect("a kept event"));
        assert_eq!(e.kind, event_kind::ACTOR_RESTARTED);
        restarts.push(e.count.expect("count"));
    }
    // The newest 1,024 were kept: restart numbers base+LOST+1 ..= base+LOST+KEPT, in order.
    assert_eq!(
        restarts,
        ((base + LOST + 1)..=(base + LOST + KEPT)).collect::<Vec<u64>>()
    );
    assert!(
        raw_next(&mut raw, Duration::from_millis(300))
            .await
            .is_none(),
        "exactly {KEPT} kept"
    );
}

/// CANCEL ends the stream (nothing more is sent on it); an unknown kind is `1008`; at most 16
/// streams per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_bad_requests() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let mut raw = RawClient::setup(&b.addr(), Duration::from_secs(120)).await;
    raw.send(&events_frame(1, rf::REQUEST_MAX, &EventsRequest::default()))
        .await;
    loop {
        admin.fault("registry").await.expect("fault");
        if raw_next(&mut raw, Duration::from_millis(300))
            .await
            .is_some()
        {
            break;
        }
    }
    raw.send(&rf::Cancel::builder(1, 0).build()).await;
    // Once the cancel is in, a request on the same connection is answered after it.
    raw.request(3, "admin.stats", Bytes::from_static(b"\x80"))
        .await;
    let f = raw_next(&mut raw, T).await.expect("stats reply");
    let f = if f.get_stream_id() == 1 {
        // An event sent before the cancel arrived.
        raw_next(&mut raw, T).await.expect("stats reply")
    } else {
        f
    };
    assert_eq!(f.get_stream_id(), 3);
    for _ in 0..3 {
        admin.fault("registry").await.expect("fault");
    }
    assert!(
        raw_next(&mut raw, Duration::from_millis(500))
            .await
            .is_none(),
        "an event after the cancel"
    );

    raw.send(&events_frame(
        5,
        10,
        &EventsRequest {
            kinds: vec!["topic_made".into()],
        },
    ))
    .await;
    let (code, text) = error_of(&raw_next(&mut raw, T).await.expect("error")).expect("an ERROR");
    assert_eq!(code, 0x201);
    assert!(
        text.starts_with("1008 INVALID_REQUEST") && text.contains("topic_made"),
        "{text}"
    );

    let mut sid = 7;
    for _ in 0..16 {
        raw.send(&events_frame(sid, 10, &EventsRequest::default()))
            .await;
        sid += 2;
    }
    raw.send(&events_frame(sid, 10, &EventsRequest::default()))
        .await;
    let f = raw_next(&mut raw, T).await.expect("error");
    assert_eq!(f.get_stream_id(), sid);
    let (_, text) = error_of(&f).expect("an ERROR");
    assert!(text.contains("at most 16"), "{text}");
}

fn events_frame(sid: u32, n: u32, req: &EventsRequest) -> Frame {
    rf::RequestStream::builder(sid, 0)
        .set_initial_request_n(n)
        .set_metadata(route_metadata("admin.events"))
        .set_data(sluice_protocol::encode(req).expect("encode"))
        .build()
}

fn event_of(f: &Frame) -> BrokerEvent {
    let data = payload_of(f).unwrap_or_else(|| panic!("not an event: {:?}", error_of(f)));
    sluice_protocol::decode(&data).expect("BrokerEvent")
}

/// Sets the soft limit of a resource of a running process (`prlimit(1)`).
fn prlimit(pid: u32, what: &str, soft: impl std::fmt::Display) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--{what}={soft}:"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit --{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every kind of the catalogue, each caused for real and seen by one subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_kind_is_seen_caused_for_real() {
    let b = TestBroker::start_with(&[
        "--enable-fault-injection",
        "--max-retries",
        "0",
        "--stale-after",
        "1s",
        "--retention-interval",
        "200ms",
        "--segment-max-age",
        "1s",
        "--lifetime",
        "3s",
        "--keepalive",
        "1s",
        "--fsync",
        "never",
    ]);
    let addr = b.addr();
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    let mut seen = Vec::new();
    let mut ev = live_events(&admin, &mut seen).await;
    let kind = |k: &'static str| move |e: &BrokerEvent| e.kind == k;

    // Topics.
    admin
        .create_topic("ev-made", TopicSettings::default())
        .await
        .expect("create");
    wait_for(&mut ev, &mut seen, "topic_created", |e| {
        e.kind == event_kind::TOPIC_CREATED && e.topic.as_deref() == Some("ev-made")
    })
    .await;
    admin.delete_topic("ev-made").await.expect("delete");
    wait_for(
        &mut ev,
        &mut seen,
        "topic_deleted",
        kind(event_kind::TOPIC_DELETED),
    )
    .await;

    // Consumers and groups: joined, group created, promoted, left.
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    for i in 0..20 {
        p.send("ev", format!("m{i}")).await.expect("publish");
    }
    let fo = |id: &str| {
        ConsumerConfig::new(client_config(&addr, id), "ev", "fo")
            .mode(GroupMode::Failover)
            .window(1)
            .batch_size(1)
    };
    let first = Consumer::subscribe(fo("first")).await.expect("first");
    wait_for(&mut ev, &mut seen, "group_created", |e| {
        e.kind == event_kind::GROUP_CREATED && e.group.as_deref() == Some("fo")
    })
    .await;
    wait_for(
        &mut ev,
        &mut seen,
        "consumer_joined",
        kind(event_kind::CONSUMER_JOINED),
    )
    .await;
    let mut second = Consumer::subscribe(fo("second")).await.expect("second");
    // The standby must have joined before the active one leaves.
    let deadline = Instant::now() + T;
    while seen
        .iter()
        .filter(|e| e.kind == event_kind::CONSUMER_JOINED && e.group.as_deref() == Some("fo"))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the standby never joined: {seen:#?}"
        );
        if let Ok(Some(Ok(e))) = tokio::time::timeout(T, ev.next()).await {
            seen.push(e);
        }
    }
    drop(first);
    wait_for(
        &mut ev,
        &mut seen,
        "consumer_left",
        kind(event_kind::CONSUMER_LEFT),
    )
    .await;
    wait_for(
        &mut ev,
        &mut seen,
        "consumer_promoted",
        kind(event_kind::CONSUMER_PROMOTED),
    )
    .await;

    // Stale (lag, a batch held, no ack for 1s), then disconnected by the operator.
    let held = next_message(&mut second, T).await;
    wait_for(
        &mut ev,
        &mut seen,
        "consumer_stale",
        kind(event_kind::CONSUMER_STALE),
    )
    .await;
    let gone = admin
        .disconnect_stale(Duration::from_millis(500))
        .await
        .expect("disconnect_stale");
    assert_eq!(gone.disconnected.len(), 1, "{gone:?}");
    wait_for(
        &mut ev,
        &mut seen,
        "consumer_disconnected",
        kind(event_kind::CONSUMER_DISCONNECTED),
    )
    .await;
    drop((held, second));

    // Seek and delete a group with no consumer.
    admin
        .seek_group("ev", "fo", SeekTo::Start)
        .await
        .expect("seek");
    wait_for(
        &mut ev,
        &mut seen,
        "group_seeked",
        kind(event_kind::GROUP_SEEKED),
    )
    .await;
    admin.delete_group("ev", "fo").await.expect("delete group");
    wait_for(
        &mut ev,
        &mut seen,
        "group_deleted",
        kind(event_kind::GROUP_DELETED),
    )
    .await;

    // Dead letter: max_retries 0, one nack.
    let mut c = Consumer::subscribe(ConsumerConfig::new(client_config(&addr, "dl"), "ev", "dl"))
        .await
        .expect("dl");
    let m = next_message(&mut c, T).await;
    c.nack(&m).expect("nack");
    c.ack_batch_now(&m).await.expect("nack sent");
    wait_for(
        &mut ev,
        &mut seen,
        "message_dead_lettered",
        kind(event_kind::MESSAGE_DEAD_LETTERED),
    )
    .await;
    drop(c);

    // Retention: max_age 1s removes a lagging group's messages; the group is moved up.
    admin
        .create_topic(
            "ev-ret",
            TopicSettings {
                max_age_ms: Some(1000),
                ..Default::default()
            },
        )
        .await
        .expect("create ev-ret");
    let mut lagging = Consumer::subscribe(
        ConsumerConfig::new(client_config(&addr, "lag"), "ev-ret", "lag")
            .window(1)
            .batch_size(1),
    )
    .await
    .expect("lagging");
    for i in 0..10 {
        p.send("ev-ret", format!("r{i}")).await.expect("publish");
    }
    let _held = next_message(&mut lagging, T).await;
    wait_for(
        &mut ev,
        &mut seen,
        "retention_removed",
        kind(event_kind::RETENTION_REMOVED),
    )
    .await;
    wait_for(
        &mut ev,
        &mut seen,
        "group_moved_to_floor",
        kind(event_kind::GROUP_MOVED_TO_FLOOR),
    )
    .await;

    // Actors restarted: the orchestrator and the store.
    admin.fault("orchestrator-0").await.expect("fault");
    wait_for(&mut ev, &mut seen, "actor_restarted orchestrator", |e| {
        e.kind == event_kind::ACTOR_RESTARTED && e.actor.as_deref() == Some("orchestrator-0")
    })
    .await;
    admin.fault("store").await.expect("fault");
    wait_for(&mut ev, &mut seen, "actor_restarted store", |e| {
        e.kind == event_kind::ACTOR_RESTARTED && e.actor.as_deref() == Some("store")
    })
    .await;

    // A failed write: a file size limit below what a big publish needs.
    for i in 0..5 {
        p.publish_batch(
            "ev-fsize",
            (0..60)
                .map(|k| NewMessage {
                    payload: big_payload(i * 100 + k, 4000),
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .expect("small publish");
    }
    prlimit(b.pid(), "fsize", 5 * 60 * 4000 + 1_300_000);
    let big: Vec<NewMessage> = (0..10)
        .map(|k| NewMessage {
            payload: big_payload(k, 300 * 1024),
            ..Default::default()
        })
        .collect();
    assert!(p.publish_batch("ev-fsize", big).await.is_err());
    prlimit(b.pid(), "fsize", "unlimited");
    wait_for(
        &mut ev,
        &mut seen,
        "storage_error",
        kind(event_kind::STORAGE_ERROR),
    )
    .await;

    // A client that does not read.
    let hog = start_hog(&addr, "ev-firehose").await;
    for i in 0..16u64 {
        p.publish(
            "ev-firehose",
            NewMessage {
                payload: big_payload(i, 1_000_000),
                ..Default::default()
            },
        )
        .await
        .expect("publish");
    }
    wait_for(
        &mut ev,
        &mut seen,
        "memory_pressure",
        kind(event_kind::MEMORY_PRESSURE),
    )
    .await;
    hog.abort();

    let kinds: BTreeSet<&str> = seen.iter().map(|e| e.kind.as_str()).collect();
    let missing: Vec<&&str> = event_kind::ALL
        .iter()
        .filter(|k| **k != event_kind::EVENTS_LOST && !kinds.contains(**k))
        .collect();
    assert!(missing.is_empty(), "never seen: {missing:?}");
    for e in &seen {
        assert!(
            e.at_ms > 0 && event_kind::ALL.contains(&e.kind.as_str()),
            "{e:?}"
        );
    }
}
