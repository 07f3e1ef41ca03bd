//! Supervision: admin.fault stops the orchestrator mid-delivery; it is restarted and nothing is lost.
mod common;
use bytes::Bytes;
use common::*;
use sluice_sdk::{Admin, Consumer, ConsumerConfig, NewMessage, Producer};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_fault_restarts_and_redelivers_in_flight() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let p = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    let msgs: Vec<NewMessage> = (0..200)
        .map(|i| NewMessage {
            payload: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
        .collect();
    p.publish_batch("work", msgs).await.expect("publish");
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "work",
        "g",
    ))
    .await
    .expect("subscribe");
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");

    let mut acked = BTreeSet::new();
    let mut unacked_before_fault = BTreeSet::new();
    // Ack the first 40, then hold 20 more unacked (in flight) and stop the orchestrator.
    while acked.len() + unacked_before_fault.len() < 60 {
        let m = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("msg")
            .expect("open")
            .expect("ok");
        if acked.len() < 40 {
            acked.insert(m.seq());
            c.ack(&m).expect("ack");
        } else {
            unacked_before_fault.insert(m.seq());
        }
    }
    c.flush_acks().await.expect("flush");
    let reply = admin.fault("orchestrator-0").await.expect("fault");
    assert_eq!(reply.stopped, "orchestrator-0");

    // Every message not acked, including those in flight at the fault, arrives (again).
    let mut seen = BTreeSet::new();
    let mut redelivered = 0;
    while acked.len() < 200 {
        let m = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("msg")
            .expect("open")
            .expect("ok");
        if unacked_before_fault.contains(&m.seq()) && seen.insert(m.seq()) {
            redelivered += 1;
        }
        acked.insert(m.seq());
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("flush");
    assert_eq!(acked, (1..=200).collect::<BTreeSet<u64>>(), "nothing lost");
    assert_eq!(
        redelivered,
        unacked_before_fault.len(),
        "every in-flight message came back"
    );

    let stats = admin.stats().await.expect("stats");
    let o = stats
        .actors
        .iter()
        .find(|a| a.name == "orchestrator-0")
        .expect("orchestrator in stats");
    assert_eq!(o.restarts, 1);
    let g = stats
        .groups
        .iter()
        .find(|g| g.topic == "work")
        .expect("group");
    assert_eq!(g.acked_floor, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_registry_faults_restart_without_losing_data() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let p = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let first = p
        .publish_batch(
            "s",
            (0..50)
                .map(|i| NewMessage {
                    payload: Bytes::from(format!("a{i}")),
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .expect("publish");
    assert_eq!(
        admin.fault("store").await.expect("fault store").stopped,
        "store"
    );
    assert_eq!(
        admin
            .fault("registry")
            .await
            .expect("fault registry")
            .stopped,
        "registry"
    );
    // Publishing and consuming go on; nothing stored before the faults is lost.
    let second = p
        .publish_batch(
            "s",
            (0..50)
                .map(|i| NewMessage {
                    payload: Bytes::from(format!("b{i}")),
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .expect("publish after faults");
    assert_eq!((first.first_seq, second.last_seq), (1, 100));
    let mut c = Consumer::subscribe(ConsumerConfig::new(client_config(&b.addr(), "c"), "s", "g"))
        .await
        .expect("subscribe");
    let mut seen = BTreeSet::new();
    while seen.len() < 100 {
        let m = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("msg")
            .expect("open")
            .expect("ok");
        seen.insert(m.seq());
        c.ack(&m).expect("ack");
    }
    c.flush_acks()
        .await
        .expect("acks durable after the store restart");
    let stats = admin.stats().await.expect("stats");
    for name in ["store", "registry"] {
        let a = stats
            .actors
            .iter()
            .find(|a| a.name == name)
            .expect("actor listed");
        assert_eq!(a.restarts, 1, "{name} restarts");
    }
}
