//! End-to-end delivery through the SDK (rsocket_rust's client against our own session).
mod common;
use bytes::Bytes;
use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use sluice_sdk::{Consumer, ConsumerConfig, NewMessage, Producer};
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

async fn next(c: &mut Consumer) -> sluice_sdk::Received {
    next_message(c, T).await
}

/// Publishes payloads "0".."n-1" with n in flight; returns payload by seq.
async fn publish_n(p: &Producer, topic: &str, n: usize) -> std::collections::BTreeMap<u64, String> {
    let mut futs: FuturesUnordered<_> = (0..n)
        .map(|i| async move {
            let r = p
                .publish(
                    topic.to_string(),
                    NewMessage {
                        payload: Bytes::from(i.to_string()),
                        ..Default::default()
                    },
                )
                .await;
            (i, r)
        })
        .collect();
    let mut by_seq = std::collections::BTreeMap::new();
    while let Some((i, r)) = futs.next().await {
        by_seq.insert(r.expect("publish acked"), i.to_string());
    }
    by_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_in_order_then_restart_redelivers_only_unacked() {
    let mut b = TestBroker::start();
    let p = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    let published = publish_n(&p, "orders", 10_000).await;
    assert_eq!(
        published.keys().copied().collect::<Vec<u64>>(),
        (1..=10_000).collect::<Vec<u64>>(),
        "gap-free seqs from 1"
    );

    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c1"),
        "orders",
        "g",
    ))
    .await
    .expect("subscribe");
    for expected in 1..=6_000u64 {
        let m = next(&mut c).await;
        assert_eq!(m.seq(), expected, "in order");
        assert_eq!(m.payload(), &Bytes::from(published[&expected].clone()));
        assert_eq!(m.attempt(), 1);
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("acks durable");
    drop(c);
    drop(p);

    b.restart();
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c2"),
        "orders",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut got = BTreeSet::new();
    while got.len() < 4_000 {
        let m = next(&mut c).await;
        assert!(
            m.seq() > 6_000,
            "acked message {} redelivered after restart",
            m.seq()
        );
        got.insert(m.seq());
        c.ack(&m).expect("ack");
    }
    assert_eq!(got, (6_001..=10_000).collect::<BTreeSet<u64>>());
    c.flush_acks().await.expect("acks durable");
    let admin = sluice_sdk::Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let stats = admin.stats().await.expect("stats");
    let g = stats
        .groups
        .iter()
        .find(|g| g.topic == "orders" && g.group == "g")
        .expect("group in stats");
    assert_eq!((g.head_seq, g.acked_floor, g.lag), (10_000, 10_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_batch_is_redelivered_then_dead_lettered() {
    let b = TestBroker::start_with(&["--batch-timeout", "300ms", "--max-retries", "3"]);
    let p = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    publish_n(&p, "jobs", 3).await;
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "lazy"),
        "jobs",
        "workers",
    ))
    .await
    .expect("subscribe");
    // Never ack: each of the 3 messages comes 4 times (1 delivery + 3 retries) with rising attempts.
    let mut attempts = std::collections::BTreeMap::<u64, Vec<u32>>::new();
    while attempts.values().map(|v| v.len()).sum::<usize>() < 12 {
        let m = next(&mut c).await;
        attempts.entry(m.seq()).or_default().push(m.attempt());
    }
    for seq in 1..=3 {
        assert_eq!(attempts[&seq], vec![1, 2, 3, 4], "attempts of seq {seq}");
    }
    // Then they are in the dead-letter topic, consumable like any topic.
    let mut d = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "dlq"),
        "jobs.workers.dlq",
        "inspect",
    ))
    .await
    .expect("subscribe dlq");
    let mut dead = Vec::new();
    for _ in 0..3 {
        let m = next(&mut d).await;
        assert_eq!(
            m.message.headers.get("x-dlq-attempts").map(String::as_str),
            Some("4")
        );
        dead.push(
            m.message
                .headers
                .get("x-dlq-seq")
                .cloned()
                .unwrap_or_default(),
        );
        d.ack(&m).expect("ack");
    }
    dead.sort();
    assert_eq!(dead, vec!["1", "2", "3"]);
    // They left the group: settled, counted as dead letters, none in flight.
    let admin = sluice_sdk::Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let stats = admin.stats().await.expect("stats");
    let g = stats
        .groups
        .iter()
        .find(|g| g.topic == "jobs" && g.group == "workers")
        .expect("group in stats");
    assert_eq!(
        (g.acked_floor, g.lag, g.dead_letters, g.in_flight_messages),
        (3, 0, 3, 0)
    );
    // And they do not come back to the lazy consumer.
    assert!(
        tokio::time::timeout(Duration::from_millis(800), c.next())
            .await
            .is_err(),
        "dead letters were redelivered"
    );
    d.flush_acks().await.expect("flush");
}

/// The batch of a consumer that dies is redelivered because its connection closed, not after the
/// batch timeout: that is an hour here, far beyond the test's wait for the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_batch_goes_to_another_consumer_at_once() {
    let b = TestBroker::start_with(&["--batch-timeout", "1h"]);
    let p = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    publish_n(&p, "tasks", 16).await;
    // A consumer in another process takes the first batch and never acks it.
    let mut victim = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "consume",
            "--addr",
            &b.addr(),
            "--topic",
            "tasks",
            "--group",
            "g",
            "--window",
            "1",
            "--no-ack",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn consumer");
    let out = victim.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(out).lines();
        let l = lines.next();
        (l, lines)
    });
    let (line, _keep) = tokio::time::timeout(T, first)
        .await
        .expect("victim got a batch")
        .expect("join");
    let line = line.expect("a line").expect("utf8");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["seq"], 1);
    // A second consumer joins; then the victim is killed mid-batch.
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "survivor"),
        "tasks",
        "g",
    ))
    .await
    .expect("subscribe");
    victim.kill().expect("kill -9");
    let _ = victim.wait();
    // The victim held all 16 (one batch of the default size): each comes to the survivor once,
    // in order, as a second delivery.
    let mut got = Vec::new();
    while got.len() < 16 {
        let m = next(&mut c).await;
        got.push((m.seq(), m.attempt()));
        c.ack(&m).expect("ack");
    }
    assert_eq!(got, (1..=16).map(|s| (s, 2)).collect::<Vec<_>>());
    c.flush_acks().await.expect("acks durable");
}
