//! Group modes, header filters, priority lanes and nack, end to end through the SDK.
mod common;
use bytes::Bytes;
use common::*;
use sluice_sdk::{Consumer, ConsumerConfig, ErrorCode, GroupMode, NewMessage, Producer};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn next(c: &mut Consumer) -> sluice_sdk::Received {
    next_message(c, T).await
}

/// The error a subscription is refused with (at subscribe or as the stream's first item).
async fn refusal(cfg: ConsumerConfig) -> sluice_sdk::SdkError {
    match Consumer::subscribe(cfg).await {
        Err(e) => e,
        Ok(mut c) => match tokio::time::timeout(T, c.next()).await.expect("answer") {
            Some(Err(e)) => e,
            other => panic!(
                "expected a refusal, got {:?}",
                other.map(|r| r.map(|m| m.seq()))
            ),
        },
    }
}

fn msg(payload: &str, headers: &[(&str, &str)], priority: u8) -> NewMessage {
    NewMessage {
        id: None,
        key: None,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        priority,
        payload: Bytes::from(payload.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_filters_deliver_only_matching_messages_and_settle_the_rest() {
    let b = TestBroker::start();
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    let batch = vec![
        msg("eu-1", &[("region", "eu")], 0),
        msg("us-1", &[("region", "us")], 0),
        msg("eu-2", &[("region", "eu"), ("x", "y")], 0),
        msg("none", &[], 0),
    ];
    p.publish_batch("events", batch).await.expect("publish");
    let cfg = ConsumerConfig::new(client_config(&b.addr(), "eu"), "events", "eu-only")
        .filter("region", "eu");
    let mut c = Consumer::subscribe(cfg).await.expect("subscribe");
    let a = next(&mut c).await;
    let bb = next(&mut c).await;
    assert_eq!(
        (a.payload().as_ref(), bb.payload().as_ref()),
        (&b"eu-1"[..], &b"eu-2"[..])
    );
    c.ack(&a).expect("ack");
    c.ack(&bb).expect("ack");
    c.flush_acks().await.expect("flush");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "non-matching delivered"
    );
    let stats = sluice_sdk::Admin::connect(client_config(&b.addr(), "a"))
        .await
        .expect("admin")
        .stats()
        .await
        .expect("stats");
    let g = stats
        .groups
        .iter()
        .find(|g| g.group == "eu-only")
        .expect("group");
    assert_eq!(
        (g.acked_floor, g.lag),
        (4, 0),
        "filtered-out messages are settled"
    );

    // Joining the group with other filters is refused.
    let other = ConsumerConfig::new(client_config(&b.addr(), "us"), "events", "eu-only")
        .filter("region", "us");
    let err = refusal(other).await;
    assert_eq!(err.code(), Some(ErrorCode::FilterConflict), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_is_delivered_first() {
    let b = TestBroker::start();
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    let batch = vec![
        msg("low-1", &[], 0),
        msg("high-1", &[], 5),
        msg("low-2", &[], 0),
        msg("high-2", &[], 5),
    ];
    p.publish_batch("prio", batch).await.expect("publish");
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "prio",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = next(&mut c).await;
        got.push(String::from_utf8_lossy(m.payload()).into_owned());
        c.ack(&m).expect("ack");
    }
    assert_eq!(got, vec!["high-1", "high-2", "low-1", "low-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_at_once_then_dead_letters() {
    let b = TestBroker::start_with(&["--max-retries", "2"]);
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    p.publish("n", msg("poison", &[], 0))
        .await
        .expect("publish");
    let mut c = Consumer::subscribe(ConsumerConfig::new(client_config(&b.addr(), "c"), "n", "g"))
        .await
        .expect("subscribe");
    for attempt in 1..=3 {
        let m = next(&mut c).await;
        assert_eq!(m.attempt(), attempt);
        c.nack(&m).expect("nack");
        c.flush_acks().await.expect("flush");
    }
    let mut d = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "d"),
        "n.g.dlq",
        "x",
    ))
    .await
    .expect("dlq");
    let m = next(&mut d).await;
    assert_eq!(m.payload().as_ref(), b"poison");
    assert_eq!(
        m.message.headers.get("x-dlq-reason").map(String::as_str),
        Some("nack")
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "dead letter redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_refuses_a_second_consumer() {
    let b = TestBroker::start();
    let cfg = |id: &str| {
        ConsumerConfig::new(client_config(&b.addr(), id), "ex", "solo")
            .mode(GroupMode::Exclusive)
            .max_reconnect_attempts(0)
    };
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    p.publish("ex", msg("1", &[], 0)).await.expect("publish");
    let mut first = Consumer::subscribe(cfg("one")).await.expect("first");
    let m = next(&mut first).await;
    assert_eq!(m.seq(), 1);
    let err = refusal(cfg("two")).await;
    assert_eq!(err.code(), Some(ErrorCode::ExclusiveTaken), "{err}");
    // A different mode for the same group is a mode conflict.
    let shared = ConsumerConfig::new(client_config(&b.addr(), "three"), "ex", "solo")
        .max_reconnect_attempts(0);
    let err = refusal(shared).await;
    assert_eq!(err.code(), Some(ErrorCode::ModeConflict), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_promotes_the_standby_on_disconnect() {
    let b = TestBroker::start();
    let cfg = |id: &str| {
        ConsumerConfig::new(client_config(&b.addr(), id), "fo", "pair")
            .mode(GroupMode::Failover)
            .window(1)
            .batch_size(1)
    };
    let p = Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    let mut active = Consumer::subscribe(cfg("active")).await.expect("active");
    for i in 0..3 {
        p.publish("fo", msg(&i.to_string(), &[], 0))
            .await
            .expect("publish");
    }
    // A subscribe is not confirmed by the broker: receiving proves `active` joined first.
    let m = next(&mut active).await;
    assert_eq!(m.seq(), 1);
    let mut standby = Consumer::subscribe(cfg("standby")).await.expect("standby");
    active.ack(&m).expect("ack");
    active.flush_acks().await.expect("flush");
    let m2 = next(&mut active).await;
    assert_eq!(m2.seq(), 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), standby.next())
            .await
            .is_err(),
        "standby received while the active consumer lives"
    );
    drop(active); // disconnect with seq 2 unacked
    let got = next(&mut standby).await;
    assert_eq!(
        (got.seq(), got.attempt()),
        (2, 2),
        "the standby takes over the unacked batch"
    );
    standby.ack(&got).expect("ack");
    let got = next(&mut standby).await;
    assert_eq!(got.seq(), 3);
}
