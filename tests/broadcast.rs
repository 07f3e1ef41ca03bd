//! `broadcast` groups end to end: every member gets every message and acks it on its own; a
//! member that never acks has only its own copies redelivered and dead-lettered; a member that
//! joins later starts at the group's floor.
mod common;
mod mode_consumer;

use bytes::Bytes;
use common::*;
use mode_consumer::*;
use sluice_sdk::{GroupMode, NewMessage, Producer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "bt";
const GROUP: &str = "g";

async fn publish(addr: &str, n: u64) {
    let p = Producer::connect(client_config(addr, "p"))
        .await
        .expect("producer");
    for chunk in (1..=n).collect::<Vec<_>>().chunks(1000) {
        let msgs = chunk
            .iter()
            .map(|i| NewMessage {
                id: None,
                key: None,
                headers: Default::default(),
                priority: 0,
                payload: Bytes::from(i.to_string()),
            })
            .collect();
        p.publish_batch(TOPIC, msgs).await.expect("publish");
    }
}

fn plan(name: &str) -> Plan {
    let mut p = Plan::new(name, TOPIC, GROUP, GroupMode::Broadcast);
    p.window = 4;
    p.batch = 100;
    p
}

/// Seq → attempts, of what `who` received.
fn received(j: &Journal, who: &str) -> BTreeMap<u64, Vec<u32>> {
    let mut m: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for r in j.receipts.iter().filter(|r| r.who == who) {
        m.entry(r.seq).or_default().push(r.attempt);
    }
    m
}

fn acked_by(j: &Journal, who: &str) -> usize {
    j.acks
        .iter()
        .filter(|a| a.who == who)
        .map(|a| a.seqs.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_gets_every_message_and_only_a_silent_members_copies_are_dead_lettered() {
    const N: u64 = 10_000;
    let b = TestBroker::start_with(&["--batch-timeout", "2s", "--max-retries", "1"]);
    let addr = b.addr();
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    for (i, name) in ["a", "b", "silent"].iter().enumerate() {
        let mut p = plan(name);
        if *name == "silent" {
            // Never acks, and holds every message at once: two timeouts and it is done.
            p.ack_through = 0;
            p.window = 40;
            p.batch = 250;
        }
        tasks.push(tokio::spawn(run(addr.clone(), p, shared.clone())));
        wait_consumers(&addr, TOPIC, GROUP, i as u32 + 1).await;
    }
    let silent_conn = conn_id(&addr, "silent").await;
    publish(&addr, N).await;
    let s = shared.clone();
    wait_for(Duration::from_secs(60), "a and b acked everything", || {
        let j = s.journal();
        acked_by(&j, "a") == N as usize && acked_by(&j, "b") == N as usize
    })
    .await;
    // a and b acked all: that settles nothing for the silent member, whose lag is the group's.
    let stats = group_stats(&addr, TOPIC, GROUP).await;
    let lag_of = |stats: &sluice_protocol::GroupStats, conn: u64| {
        stats
            .consumer_details
            .iter()
            .find(|d| d.conn_id == conn)
            .map(|d| d.lag)
            .expect("consumer")
    };
    assert_eq!(stats.consumer_details.len(), 3);
    assert_eq!(stats.lag, lag_of(&stats, silent_conn), "{stats:?}");
    assert_eq!(
        stats.consumer_details.iter().map(|d| d.lag).sum::<u64>(),
        stats.lag
    );
    if stats.lag > 0 {
        assert!(stats.acked_floor < N);
    }
    // Its copies are dead-lettered, each after its second delivery.
    let dlq = sluice_protocol::dlq_topic(TOPIC, GROUP);
    let mut reader = Plan::new("dlq", &dlq, "reader", GroupMode::Shared);
    reader.batch = 500;
    tasks.push(tokio::spawn(run(addr.clone(), reader, shared.clone())));
    let s = shared.clone();
    wait_for(Duration::from_secs(60), "10,000 dead letters", || {
        s.journal()
            .receipts
            .iter()
            .filter(|r| r.who == "dlq")
            .count()
            >= N as usize
    })
    .await;
    // The reader may see the last dead letters before the orchestrator has handled the replies
    // to their appends (which settle them): wait for that.
    let start = std::time::Instant::now();
    let stats = loop {
        let stats = group_stats(&addr, TOPIC, GROUP).await;
        if stats.dead_letters == N || start.elapsed() > Duration::from_secs(20) {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.expect("consumer");
    }
    let j = shared.journal();
    let all: Vec<u64> = (1..=N).collect();
    for who in ["a", "b"] {
        let got = received(&j, who);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), all, "{who}");
        assert!(
            got.values().all(|a| *a == vec![1]),
            "{who} got redeliveries"
        );
    }
    let got = received(&j, "silent");
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), all);
    assert!(
        got.values().all(|a| *a == vec![1, 2]),
        "silent: delivered twice each"
    );
    let dead: Vec<&Receipt> = j.receipts.iter().filter(|r| r.who == "dlq").collect();
    assert_eq!(dead.len() as u64, N);
    let mut seqs: Vec<u64> = dead
        .iter()
        .map(|r| r.headers["x-dlq-seq"].parse().expect("seq"))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, all);
    let member = format!("{silent_conn}:1");
    assert!(dead
        .iter()
        .all(|r| r.headers.get("x-dlq-consumer") == Some(&member)
            && r.headers["x-dlq-group"] == GROUP));
    // Settled for the group: by a's and b's acks and the silent member's dead letters.
    assert_eq!((stats.acked_floor, stats.lag), (N, 0), "{stats:?}");
    assert_eq!((stats.redeliveries, stats.dead_letters), (N, N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_later_starts_at_the_groups_floor_and_a_leaving_one_settles_its_part() {
    let b = TestBroker::start_with(&["--batch-timeout", "1h"]);
    let addr = b.addr();
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    // a acks everything; h acks 1..=60 and holds 61..=100; the group's floor is 60.
    let mut h = plan("h");
    h.batch = 10;
    h.ack_through = 60;
    // h's connection is dropped once a, h and the late member settled 100 + 60 + 40.
    h.kill_at = Some(200);
    for (i, p) in [plan("a"), h].into_iter().enumerate() {
        tasks.push(tokio::spawn(run(addr.clone(), p, shared.clone())));
        wait_consumers(&addr, TOPIC, GROUP, i as u32 + 1).await;
    }
    publish(&addr, 100).await;
    let s = shared.clone();
    wait_for(Duration::from_secs(20), "a: 100, h: 60 acked", || {
        let j = s.journal();
        acked_by(&j, "a") == 100 && acked_by(&j, "h") == 60
    })
    .await;
    let stats = group_stats(&addr, TOPIC, GROUP).await;
    assert_eq!((stats.acked_floor, stats.lag), (60, 40));
    tasks.push(tokio::spawn(run(
        addr.clone(),
        plan("late"),
        shared.clone(),
    )));
    let s = shared.clone();
    wait_for(Duration::from_secs(20), "h dropped", || {
        !s.journal().kills.is_empty()
    })
    .await;
    {
        let j = shared.journal();
        let got = received(&j, "late");
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            (61..=100).collect::<Vec<_>>(),
            "the late member starts at the group's floor"
        );
        assert!(got.values().all(|a| *a == vec![1]));
    }
    // h left holding 61..=100: every member present acked them, so the group settled them.
    let t = std::time::Instant::now();
    let stats = loop {
        let stats = group_stats(&addr, TOPIC, GROUP).await;
        if stats.consumers == 2 || t.elapsed() > Duration::from_secs(20) {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((stats.consumers, stats.acked_floor, stats.lag), (2, 100, 0));
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.expect("consumer");
    }
}
