//! Idempotent publish, store side: a message id repeated within the topic's `dedup_window` is
//! stored once and answered with its original seq (`duplicate: true`), also within one request
//! and across a kill -9 restart; after the window it is stored again; an id over 128 bytes is
//! refused; a duplicate is answered only once its original is durable.
mod common;
use bytes::Bytes;
use common::*;
use sluice_sdk::protocol::{route, ErrorCode, PublishReply, PublishRequest};
use sluice_sdk::{Admin, NewMessage, SdkError};
use std::time::Duration;

async fn admin(b: &TestBroker) -> Admin {
    Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin")
}

fn with_id(id: Option<&str>, payload: &str) -> NewMessage {
    NewMessage {
        id: id.map(Into::into),
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

async fn publish(a: &Admin, topic: &str, msgs: Vec<NewMessage>) -> Result<PublishReply, SdkError> {
    let req = PublishRequest {
        topic: topic.into(),
        messages: msgs,
    };
    a.client().request(route::PUBLISH, &req).await
}

async fn head(a: &Admin, topic: &str) -> u64 {
    a.topic_info(topic).await.expect("info").head_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_is_stored_once_also_within_a_request_and_across_a_kill() {
    let mut b = TestBroker::start();
    let a = admin(&b).await;
    let first = publish(&a, "t", vec![with_id(Some("order-1"), "a")])
        .await
        .expect("publish");
    assert_eq!(
        (first.first_seq, first.last_seq, first.duplicate),
        (1, 1, false)
    );
    assert!(first.seqs.is_empty());
    let again = publish(&a, "t", vec![with_id(Some("order-1"), "a (resent)")])
        .await
        .expect("publish");
    assert!(again.duplicate);
    assert_eq!(
        (again.first_seq, again.last_seq, again.seqs),
        (1, 1, vec![1])
    );
    assert_eq!(head(&a, "t").await, 1, "stored once");

    // Within one request, mixed with new ids and messages without one.
    let r = publish(
        &a,
        "t",
        vec![
            with_id(Some("order-2"), "b"),
            with_id(None, "no id"),
            with_id(Some("order-2"), "b twice"),
            with_id(Some("order-1"), "a thrice"),
            with_id(None, "no id either"),
        ],
    )
    .await
    .expect("publish");
    assert!(r.duplicate);
    assert_eq!(r.seqs, vec![2, 3, 2, 1, 4]);
    assert_eq!((r.first_seq, r.last_seq), (1, 4));
    assert_eq!(head(&a, "t").await, 4);

    // The ids come back from the log after a kill -9.
    b.restart();
    let a = admin(&b).await;
    let r = publish(
        &a,
        "t",
        vec![with_id(Some("order-2"), "b"), with_id(Some("order-3"), "c")],
    )
    .await
    .expect("publish");
    assert!(r.duplicate);
    assert_eq!(r.seqs, vec![2, 5]);
    assert_eq!(head(&a, "t").await, 5);
    // What was stored reads back whole (ids are not part of what consumers get).
    let mut c = sluice_sdk::Consumer::subscribe(sluice_sdk::ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "t",
        "g",
    ))
    .await
    .expect("subscribe");
    let payloads: Vec<Bytes> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(
                next_message(&mut c, Duration::from_secs(20))
                    .await
                    .payload()
                    .clone(),
            );
        }
        v
    };
    assert_eq!(
        payloads,
        ["a", "b", "no id", "no id either", "c"]
            .iter()
            .map(|p| Bytes::from(p.to_string()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_the_id_is_stored_again() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "dedup_window = \"1s\"\n").expect("config");
    let b = TestBroker::start_with(&["--config", path.to_str().expect("utf-8")]);
    let a = admin(&b).await;
    let r = publish(&a, "w", vec![with_id(Some("x"), "1")])
        .await
        .expect("publish");
    let stored_at = std::time::Instant::now();
    assert_eq!(r.first_seq, 1);
    let r = publish(&a, "w", vec![with_id(Some("x"), "2")])
        .await
        .expect("publish");
    assert!(r.duplicate, "within the window");
    // The window is a time: wait it out.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(stored_at.elapsed())).await;
    let r = publish(&a, "w", vec![with_id(Some("x"), "3")])
        .await
        .expect("publish");
    assert!(!r.duplicate, "after the window: {r:?}");
    assert_eq!((r.first_seq, r.last_seq), (2, 2));
    // A topic whose window is 0 does not deduplicate.
    a.create_topic(
        "nodedup",
        sluice_sdk::protocol::TopicSettings {
            dedup_window_ms: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let r = publish(
        &a,
        "nodedup",
        vec![with_id(Some("x"), "1"), with_id(Some("x"), "2")],
    )
    .await
    .expect("publish");
    assert_eq!((r.first_seq, r.last_seq, r.duplicate), (1, 2, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_over_128_bytes_is_refused_and_nothing_is_stored() {
    let b = TestBroker::start();
    let a = admin(&b).await;
    publish(&a, "ids", vec![with_id(None, "first")])
        .await
        .expect("publish");
    let long = "i".repeat(129);
    let e = publish(
        &a,
        "ids",
        vec![with_id(None, "ok"), with_id(Some(&long), "too long")],
    )
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("128"), "{e}");
    assert_eq!(head(&a, "ids").await, 1, "nothing of the request stored");
    let max = "i".repeat(128);
    let r = publish(&a, "ids", vec![with_id(Some(&max), "longest")])
        .await
        .expect("128 bytes is fine");
    assert_eq!(r.first_seq, 2);
    let r = publish(&a, "ids", vec![with_id(Some(&max), "again")])
        .await
        .expect("publish");
    assert_eq!((r.duplicate, r.seqs), (true, vec![2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_answered_only_once_its_original_is_durable() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let a = admin(&b).await;
    publish(&a, "d", vec![with_id(None, "warm up")])
        .await
        .expect("publish");
    let mut raw = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    let req = |payload: &str| {
        sluice_protocol::encode(&PublishRequest {
            topic: "d".into(),
            messages: vec![with_id(Some("slow"), payload)],
        })
        .expect("encode")
    };
    // The original's sync stalls; its duplicate arrives meanwhile (a later commit).
    a.stall_syncs(Duration::from_millis(800))
        .await
        .expect("stall");
    raw.request(1, "publish", req("original")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.request(3, "publish", req("duplicate")).await;
    let mut order = Vec::new();
    for _ in 0..2 {
        let f = raw_next(&mut raw, RAW_T).await.expect("reply");
        let data = payload_of(&f).unwrap_or_else(|| panic!("failed: {:?}", error_of(&f)));
        let r: PublishReply = sluice_protocol::decode(&data).expect("decode");
        order.push((f.get_stream_id(), r.first_seq, r.duplicate));
    }
    assert_eq!(
        order,
        vec![(1, 2, false), (3, 2, true)],
        "the duplicate is answered after its original"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_id_is_refused_and_nothing_is_stored() {
    let b = TestBroker::start();
    let a = admin(&b).await;
    publish(&a, "ids", vec![with_id(None, "first")])
        .await
        .expect("publish");
    let e = publish(
        &a,
        "ids",
        vec![with_id(Some("ok"), "fine"), with_id(Some(""), "empty id")],
    )
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");
    assert_eq!(head(&a, "ids").await, 1, "nothing of the request stored");
    // One byte is the shortest.
    let r = publish(&a, "ids", vec![with_id(Some("x"), "short")])
        .await
        .expect("publish");
    assert_eq!((r.first_seq, r.duplicate), (2, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ids_of_every_topic_share_the_brokers_bound() {
    use futures::StreamExt;
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "dedup_max_ids = 5\n").expect("config");
    let b = TestBroker::start_with(&["--config", path.to_str().expect("utf-8")]);
    let a = admin(&b).await;
    let kinds = vec![
        sluice_sdk::protocol::event_kind::MEMORY_PRESSURE.to_string(),
        sluice_sdk::protocol::event_kind::TOPIC_CREATED.to_string(),
    ];
    let mut events = a.events(kinds).await.expect("admin.events");
    // The subscription is live once it reports a topic created after it.
    for i in 0.. {
        publish(&a, &format!("warm{i}"), vec![with_id(None, "w")])
            .await
            .expect("publish");
        let got = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        if matches!(got, Ok(Some(Ok(_)))) {
            break;
        }
        assert!(i < 50, "no event from admin.events");
    }
    // One client, ids in two topics (no per-topic bound near): together at most 5.
    for (t, id) in [
        ("a", "a1"),
        ("b", "b1"),
        ("a", "a2"),
        ("b", "b2"),
        ("a", "a3"),
    ] {
        let r = publish(&a, t, vec![with_id(Some(id), id)])
            .await
            .expect("publish");
        assert!(!r.duplicate);
    }
    let mut pressure = None;
    let r = publish(&a, "b", vec![with_id(Some("b3"), "b3")])
        .await
        .expect("publish");
    assert!(!r.duplicate);
    while pressure.is_none() {
        let e = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event")
            .expect("stream open")
            .expect("event");
        if e.kind == sluice_sdk::protocol::event_kind::MEMORY_PRESSURE {
            pressure = Some(e);
        }
    }
    let e = pressure.expect("memory_pressure");
    assert_eq!((e.topic.as_deref(), e.count), (Some("b"), Some(1)));
    assert!(
        e.detail
            .as_deref()
            .is_some_and(|d| d.contains("dedup_max_ids")),
        "{e:?}"
    );
    let syncs = a.stats().await.expect("stats").syncs.expect("sync stats");
    assert_eq!((syncs.dedup_ids, syncs.dedup_ids_forgotten), (5, 1));
    // The oldest of all (a1, in the other topic) was forgotten: stored again. The rest count.
    let r = publish(&a, "a", vec![with_id(Some("a1"), "a1 again")])
        .await
        .expect("publish");
    assert_eq!((r.first_seq, r.duplicate), (4, false));
    let r = publish(&a, "b", vec![with_id(Some("b2"), "b2 again")])
        .await
        .expect("publish");
    assert_eq!((r.seqs, r.duplicate), (vec![2], true));
    let r = publish(&a, "a", vec![with_id(Some("a3"), "a3 again")])
        .await
        .expect("publish");
    assert_eq!((r.seqs, r.duplicate), (vec![3], true));
    let syncs = a.stats().await.expect("stats").syncs.expect("sync stats");
    assert_eq!((syncs.dedup_ids, syncs.dedup_ids_forgotten), (5, 2));
}

/// The SDK producer numbers the messages of one request consecutively (`<prefix>-<n>`), and the
/// broker holds such a run as one entry of its index: 1,000 messages in two requests are 1,000
/// ids in 2 entries. The run still answers each of its ids: a message resent by hand with one
/// of them is a duplicate of its original seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_producers_request_is_one_entry_of_the_index() {
    let b = TestBroker::start();
    let a = admin(&b).await;
    let producer = sluice_sdk::Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    let prefix = producer
        .id_prefix()
        .expect("idempotent by default")
        .to_string();
    for half in 0..2 {
        let msgs = (0..500)
            .map(|i| with_id(None, &format!("m{}", half * 500 + i)))
            .collect();
        let r = producer.publish_batch("runs", msgs).await.expect("publish");
        assert_eq!((r.first_seq, r.duplicate), (half * 500 + 1, false));
    }
    let syncs = a.stats().await.expect("stats").syncs.expect("sync stats");
    assert_eq!((syncs.dedup_ids, syncs.dedup_entries), (1000, 2));
    // Ids are numbered from 1: seq 742 holds `<prefix>-742`.
    let id = format!("{prefix}-742");
    let r = publish(&a, "runs", vec![with_id(Some(&id), "again")])
        .await
        .expect("publish");
    assert_eq!((r.seqs, r.duplicate), (vec![742], true));
    assert_eq!(head(&a, "runs").await, 1000);
}
