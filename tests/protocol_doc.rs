//! docs/protocol.md against the broker: each test checks one statement of the document that a
//! client written from the document alone relies on (§3.2 request data, §5.12 a repeated ack,
//! §5.13 actor names of `admin.fault`, §6.4/§6.5 when a message is dead-lettered).
mod common;

use bytes::Bytes;
use common::*;
use rsocket_rust::frame::{self as rf, Frame};
use sluice_protocol::{
    AckOutcome, AckReply, AckRequest, Batch, GroupMode, NackRequest, NewMessage, PublishRequest,
    StreamEvent, SubscribeRequest,
};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const LIFETIME: Duration = Duration::from_secs(60);
const APPLICATION_ERROR: u32 = 0x201;

async fn next(c: &mut RawClient) -> Frame {
    Box::pin(c.next(T)).await.expect("a frame in time")
}

/// The reply to request `sid`: Ok(data) or Err((code, text)).
async fn reply(c: &mut RawClient, sid: u32) -> Result<Bytes, (u32, String)> {
    loop {
        let f = next(c).await;
        if f.get_stream_id() != sid {
            continue;
        }
        return match payload_of(&f) {
            Some(d) => Ok(d),
            None => Err(error_of(&f).unwrap_or_else(|| panic!("neither reply nor error: {f:?}"))),
        };
    }
}

fn msgpack<T: serde::Serialize>(v: &T) -> Bytes {
    sluice_protocol::encode(v).expect("encode")
}

fn with_trailing_byte(b: Bytes) -> Bytes {
    let mut v = b.to_vec();
    v.push(0xc0);
    Bytes::from(v)
}

fn subscribe(sid: u32, topic: &str, group: &str, data: Option<Bytes>) -> Frame {
    let data = data.unwrap_or_else(|| {
        msgpack(&SubscribeRequest {
            topic: topic.into(),
            group: group.into(),
            mode: GroupMode::Shared,
            filters: Default::default(),
            window: Some(4),
            batch_size: Some(16),
            backoff: None,
        })
    });
    rf::RequestStream::builder(sid, 0)
        .set_initial_request_n(rf::REQUEST_MAX)
        .set_metadata(route_metadata("subscribe"))
        .set_data(data)
        .build()
}

async fn publish(c: &mut RawClient, sid: u32, topic: &str, payload: &'static [u8]) -> u64 {
    let req = PublishRequest {
        topic: topic.into(),
        messages: vec![NewMessage {
            payload: Bytes::from_static(payload),
            ..Default::default()
        }],
    };
    c.request(sid, "publish", msgpack(&req)).await;
    let r: sluice_protocol::PublishReply =
        sluice_protocol::decode(&reply(c, sid).await.expect("publish")).expect("decode");
    r.first_seq
}

async fn next_batch(c: &mut RawClient, sid: u32) -> Batch {
    loop {
        let f = next(c).await;
        if f.get_stream_id() != sid {
            continue;
        }
        let data = payload_of(&f).unwrap_or_else(|| panic!("subscribe: {:?}", error_of(&f)));
        if let StreamEvent::Batch(b) = sluice_protocol::decode(&data).expect("event") {
            return b;
        }
    }
}

/// §3.2: request data is exactly one MessagePack map of the route's shape; anything else
/// (no data, an invalid byte, another type, bytes after the value) is `1006 BAD_PAYLOAD`, on
/// every route; unknown keys are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_data_must_be_one_messagepack_map() {
    let b = TestBroker::start();
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    let mut sid = 1;
    let ack = msgpack(&AckRequest {
        topic: "t".into(),
        group: "g".into(),
        batch_id: 1,
        seqs: Some(vec![1]),
    });
    let bad: Vec<(&str, &str, Option<Bytes>)> = vec![
        ("admin.stats", "no data", None),
        (
            "admin.stats",
            "the invalid byte 0xc1",
            Some(Bytes::from_static(b"\xc1")),
        ),
        (
            "admin.stats",
            "an empty array",
            Some(Bytes::from_static(b"\x90")),
        ),
        ("admin.stats", "nil", Some(Bytes::from_static(b"\xc0"))),
        (
            "admin.stats",
            "a map then 0xc1",
            Some(Bytes::from_static(b"\x80\xc1")),
        ),
        (
            "ack",
            "an ack then a byte",
            Some(with_trailing_byte(ack.clone())),
        ),
        ("nack", "no data", None),
        (
            "publish",
            "an array",
            Some(Bytes::from_static(b"\x92\xa1t\x90")),
        ),
        ("publish", "nil", Some(Bytes::from_static(b"\xc0"))),
    ];
    for (route, what, data) in bad {
        let mut f = rf::RequestResponse::builder(sid, 0).set_metadata(route_metadata(route));
        if let Some(d) = data {
            f = f.set_data(d);
        }
        c.send(&f.build()).await;
        let err = reply(&mut c, sid).await.expect_err(what);
        assert_eq!(err.0, APPLICATION_ERROR, "{route}, {what}: {err:?}");
        assert!(
            err.1.starts_with("1006 BAD_PAYLOAD"),
            "{route}, {what}: {err:?}"
        );
        sid += 2;
    }
    // A subscribe whose data is bytes after a valid request: the stream ends with 1006.
    let sub = msgpack(&SubscribeRequest {
        topic: "t".into(),
        group: "g".into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: None,
        batch_size: None,
        backoff: None,
    });
    c.send(&subscribe(sid, "t", "g", Some(with_trailing_byte(sub))))
        .await;
    let err = reply(&mut c, sid)
        .await
        .expect_err("subscribe with a trailing byte");
    assert!(err.1.starts_with("1006 BAD_PAYLOAD"), "{err:?}");
    sid += 2;

    // What the document asks for works: an empty map, and a map with keys the broker does not
    // know (ignored).
    for data in [&b"\x80"[..], b"\x81\xa7comment\xa5hello"] {
        c.request(sid, "admin.stats", Bytes::copy_from_slice(data))
            .await;
        let stats: sluice_protocol::BrokerStats =
            sluice_protocol::decode(&reply(&mut c, sid).await.expect("admin.stats"))
                .expect("decode");
        assert!(!stats.actors.is_empty());
        sid += 2;
    }
    c.request(sid, "ack", ack).await;
    let r = reply(&mut c, sid).await;
    assert!(
        matches!(&r, Err((_, t)) if t.starts_with("2001 UNKNOWN_GROUP")),
        "a valid ack for a group that does not exist: {r:?}"
    );
}

/// §5.12: acking a whole batch (no `seqs`) a second time returns `unknown_batch` (the batch is
/// no longer in flight), `count` 0; with its `seqs` it returns `already_acked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_whole_batch_ack_is_unknown_batch() {
    let b = TestBroker::start();
    let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
    publish(&mut c, 1, "twice", b"x").await;
    c.send(&subscribe(3, "twice", "g", None)).await;
    let batch = next_batch(&mut c, 3).await;
    let whole = AckRequest {
        topic: "twice".into(),
        group: "g".into(),
        batch_id: batch.batch_id,
        seqs: None,
    };
    let mut outcomes = Vec::new();
    for (sid, req) in [
        (5, whole.clone()),
        (7, whole.clone()),
        (
            9,
            AckRequest {
                seqs: Some(vec![batch.messages[0].seq]),
                ..whole
            },
        ),
    ] {
        c.request(sid, "ack", msgpack(&req)).await;
        let r: AckReply =
            sluice_protocol::decode(&reply(&mut c, sid).await.expect("ack")).expect("AckReply");
        outcomes.push((r.outcome, r.count));
    }
    assert_eq!(
        outcomes,
        vec![
            (AckOutcome::Settled, 1),
            (AckOutcome::UnknownBatch, 0),
            (AckOutcome::AlreadyAcked, 0)
        ]
    );
}

/// §5.13: `admin.fault` takes any actor name listed in `ActorStats.name` (`registry`, `store`,
/// `orchestrator-N`, `connection-N`) and `orchestrator` as another name for `orchestrator-0`;
/// anything else is `2007 UNKNOWN_ACTOR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_fault_takes_the_names_listed_in_stats() {
    let b = TestBroker::start_with(&["--enable-fault-injection", "--orchestrators", "2"]);
    let admin = sluice_sdk::Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let victim = RawClient::setup(&b.addr(), LIFETIME).await;
    // The victim's SETUP registers it on its own time: wait until stats list it.
    let mut stats = admin.stats().await.expect("stats");
    for _ in 0..100 {
        if stats.connections.iter().any(|c| c.client_id == "raw-test") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = admin.stats().await.expect("stats");
    }
    let mut names: Vec<String> = stats.actors.iter().map(|a| a.name.clone()).collect();
    names.sort();
    let own = stats
        .connections
        .iter()
        .find(|c| c.client_id == "admin")
        .map(|c| format!("connection-{}", c.conn_id))
        .expect("own connection");
    let raw = stats
        .connections
        .iter()
        .find(|c| c.client_id == "raw-test")
        .map(|c| format!("connection-{}", c.conn_id))
        .expect("raw connection");
    for want in [
        "registry",
        "store",
        "orchestrator-0",
        "orchestrator-1",
        &own,
        &raw,
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    names.retain(|n| n != &own);
    names.push("orchestrator".into());
    for name in &names {
        // An actor being restarted may answer 3002 for a moment: retry until it takes it.
        let mut stopped = None;
        for _ in 0..50 {
            match admin.fault(name.clone()).await {
                Ok(r) => {
                    stopped = Some(r.stopped);
                    break;
                }
                Err(e) if e.to_string().contains("3002") => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("admin.fault {name}: {e}"),
            }
        }
        assert_eq!(stopped.as_deref(), Some(name.as_str()));
    }
    let mut victim = victim;
    assert!(
        Box::pin(victim.closed_within(T)).await.is_some(),
        "{raw} was not stopped"
    );
    for unknown in [
        "orchestrator-2",
        "orchestrator-x",
        "connection-999999",
        "Store",
        "",
    ] {
        let e = admin.fault(unknown).await.expect_err(unknown).to_string();
        assert!(e.contains("2007"), "{unknown}: {e}");
    }
}

/// §6.4 and §6.5: a message is dead-lettered on its (max_retries + 1)-th failed delivery
/// (failures > max_retries), whether the failures are nacks or timeouts: with max_retries 2 it
/// is delivered 3 times (attempts 1, 2, 3), and then it is in `<topic>.<group>.dlq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_dead_lettered_on_its_failed_delivery_number_max_retries_plus_one() {
    const MAX_RETRIES: u32 = 2;
    let b = TestBroker::start_with(&[
        "--max-retries",
        &MAX_RETRIES.to_string(),
        "--batch-timeout",
        "300ms",
    ]);
    for nack in [true, false] {
        let topic = if nack { "fails-nack" } else { "fails-timeout" };
        let mut c = RawClient::setup(&b.addr(), LIFETIME).await;
        let seq = publish(&mut c, 1, topic, b"bad").await;
        c.send(&subscribe(3, topic, "g", None)).await;
        let mut dlq = RawClient::setup(&b.addr(), LIFETIME).await;
        dlq.send(&subscribe(1, &format!("{topic}.g.dlq"), "readers", None))
            .await;
        let mut sid = 5;
        let mut attempts = Vec::new();
        loop {
            let batch = tokio::select! {
                b = next_batch(&mut c, 3) => b,
                d = next_batch(&mut dlq, 1) => {
                    let m = &d.messages[0];
                    assert_eq!(m.payload, Bytes::from_static(b"bad"));
                    assert_eq!(m.headers["x-dlq-seq"], seq.to_string());
                    assert_eq!(m.headers["x-dlq-attempts"], (MAX_RETRIES + 1).to_string());
                    break;
                }
            };
            attempts.push(batch.messages[0].attempt);
            if nack {
                let req = NackRequest {
                    topic: topic.into(),
                    group: "g".into(),
                    batch_id: batch.batch_id,
                    seqs: Some(vec![seq]),
                    release: false,
                    delay_ms: None,
                };
                c.request(sid, "nack", msgpack(&req)).await;
                sid += 2;
            }
        }
        assert_eq!(
            attempts,
            (1..=MAX_RETRIES + 1).collect::<Vec<u32>>(),
            "{topic}: deliveries before the dead-letter topic"
        );
    }
}

/// The document names every route of the crate in §4's table, every error code with its name
/// in §7.2's catalogue, and every lifecycle event kind in §6.15's table: a client written from
/// the document alone knows them all.
#[test]
fn the_document_lists_every_route_error_code_and_event_kind() {
    let doc = include_str!("../docs/protocol.md");
    let section = |start: &str, end: &str| -> &str {
        let from = doc.find(start).unwrap_or_else(|| panic!("no {start}"));
        let to = doc[from..].find(end).map_or(doc.len(), |i| from + i);
        &doc[from..to]
    };
    let routes = section("## 4. Routes", "## 5. Types");
    for r in sluice_protocol::route::ALL {
        assert!(
            routes.contains(&format!("| `{r}` |")),
            "route {r} missing from §4"
        );
    }
    let catalogue = section("### 7.2 Catalogue", "## 8.");
    for c in sluice_protocol::ErrorCode::ALL {
        assert!(
            catalogue.contains(&format!("| {} | {} |", c.as_u32(), c.name())),
            "code {c} missing from §7.2"
        );
    }
    let events = section("### 6.15 Lifecycle events", "## 7. Errors");
    for k in sluice_protocol::event_kind::ALL {
        assert!(
            events.contains(&format!("| `{k}` |")),
            "event kind {k} missing from §6.15"
        );
    }
}
