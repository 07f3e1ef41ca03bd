//! Never undo what was confirmed (issue 10): acks bound to the consumer and the batch they were
//! delivered in, batch ids unique across broker runs, a repeated ack answered only once the
//! first is durable, a group cursor that stays small while one message is held and millions are
//! acked around it, batches that never exceed a frame, and a panic that ends the broker.
mod common;

use bytes::Bytes;
use common::*;
use sluice_protocol::{AckOutcome, AckReply, NewMessage};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, Producer, ProducerOptions};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

async fn lag(addr: &str, topic: &str) -> u64 {
    let admin = Admin::connect(client_config(addr, "stats"))
        .await
        .expect("admin");
    let stats = admin.stats().await.expect("stats");
    stats
        .groups
        .iter()
        .find(|g| g.topic == topic && g.group == "g")
        .map(|g| g.lag)
        .expect("group in stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_settles_only_what_was_delivered_to_that_connection_in_that_batch() {
    let b = TestBroker::start();
    let mut p = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    raw_publish(&mut p, 1, "acks", 30).await;
    let mut a = raw_subscribe(&b.addr(), "acks", "g", 1, 10).await;
    let batch_a = raw_next_batch(&mut a).await;
    assert_eq!(batch_seqs(&batch_a), (1..=10).collect::<Vec<_>>());
    let mut other = raw_subscribe(&b.addr(), "acks", "g", 1, 10).await;
    let batch_b = raw_next_batch(&mut other).await;
    assert_eq!(batch_seqs(&batch_b), (11..=20).collect::<Vec<_>>());

    // A connection that never subscribed names A's batch and seqs of both consumers and of
    // messages never delivered: nothing is applied.
    let mut intruder = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    let r = raw_ack(
        &mut intruder,
        3,
        "acks",
        batch_a.batch_id,
        Some(vec![2, 3, 10, 11, 20]),
    )
    .await;
    assert_eq!((r.outcome, r.count), (AckOutcome::UnknownBatch, 0));
    assert_eq!(r.rejected, vec![2, 3, 10, 11, 20]);
    let r = raw_ack(&mut intruder, 5, "acks", batch_a.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::UnknownBatch, 0));
    assert_eq!(lag(&b.addr(), "acks").await, 30);

    // A names its own batch, plus a seq of the other consumer's batch and one never delivered.
    let r = raw_ack(&mut a, 3, "acks", batch_a.batch_id, Some(vec![1, 11, 25])).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 1));
    assert_eq!(r.rejected, vec![11, 25]);
    // The other consumer's batch is still its own, whole.
    let r = raw_ack(&mut other, 3, "acks", batch_b.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 10));
    let r = raw_ack(&mut a, 5, "acks", batch_a.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 9));
    // Repeats: the whole batch again is unknown; by seq, already acked.
    let r = raw_ack(&mut a, 7, "acks", batch_a.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::UnknownBatch, 0));
    let r = raw_ack(&mut a, 9, "acks", batch_a.batch_id, Some(vec![1, 2])).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::AlreadyAcked, 0));
    assert_eq!(lag(&b.addr(), "acks").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_ids_are_never_reused_across_broker_runs() {
    let mut b = TestBroker::start();
    let mut p = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    raw_publish(&mut p, 1, "ids", 10).await;
    let mut a = raw_subscribe(&b.addr(), "ids", "g", 1, 5).await;
    let before = raw_next_batch(&mut a).await;
    assert_eq!(batch_seqs(&before), vec![1, 2, 3, 4, 5]);
    drop((a, p));
    b.restart();

    let mut c = raw_subscribe(&b.addr(), "ids", "g", 1, 5).await;
    let after = raw_next_batch(&mut c).await;
    assert_eq!(
        batch_seqs(&after),
        vec![1, 2, 3, 4, 5],
        "unacked: delivered again"
    );
    assert!(
        after.batch_id > before.batch_id,
        "batch id {} of the second run is not above {} of the first",
        after.batch_id,
        before.batch_id
    );
    // A client of the first run acks its batch whole after the restart: nothing is settled.
    let mut late = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    let r = raw_ack(&mut late, 3, "ids", before.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::UnknownBatch, 0));
    let r = raw_ack(&mut c, 3, "ids", after.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_ack_is_answered_only_once_the_first_is_durable() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    const STALL: Duration = Duration::from_millis(1500);
    let sent = Instant::now();
    let mut a = ack_twice_under_a_stalled_disk(&b.addr(), "stall", STALL).await;
    let mut replies = Vec::new();
    for _ in 0..2 {
        let f = raw_next(&mut a, T).await.expect("ack reply");
        let data = payload_of(&f).unwrap_or_else(|| panic!("ack failed: {:?}", error_of(&f)));
        let r: AckReply = sluice_protocol::decode(&data).expect("decode");
        replies.push((f.get_stream_id(), r.outcome, sent.elapsed()));
    }
    replies.sort_by_key(|r| r.0);
    assert_eq!(replies[0].1, AckOutcome::Settled);
    assert_eq!(replies[1].1, AckOutcome::AlreadyAcked);
    // Neither reply may come before a sync that started after the ack: the disk was stalled
    // for STALL (a lower bound, not a performance target).
    for (sid, _, at) in &replies {
        assert!(
            *at >= STALL,
            "reply to stream {sid} after {at:?}, before the stalled sync finished"
        );
    }
}

/// The size of the largest group record ("SLG1" chunk) in the topic's segment files.
fn largest_group_record(data: &std::path::Path, topic: &str) -> usize {
    let mut largest = 0;
    for e in std::fs::read_dir(data.join("topics").join(topic)).expect("topic dir") {
        let bytes = std::fs::read(e.expect("entry").path()).expect("segment");
        let mut i = 0;
        while let Some(pos) = bytes[i..].windows(4).position(|w| w == b"SLG1") {
            let at = i + pos;
            if let Some(l) = bytes.get(at + 4..at + 8) {
                let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
                if len < 1 << 30 {
                    largest = largest.max(len);
                }
            }
            i = at + 4;
        }
    }
    largest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_held_message_while_two_million_are_acked_keeps_the_cursor_small() {
    const N: u64 = 2_000_000;
    const CHUNK: u64 = 200_000;
    let mut b = TestBroker::start_with(&["--fsync", "never", "--batch-timeout", "1h"]);
    let producer = Producer::connect_with(
        client_config(&b.addr(), "producer"),
        ProducerOptions::default(),
    )
    .await
    .expect("producer");
    let publish_range = |from: u64, to: u64| {
        let producer = producer.clone();
        async move {
            let mut pending = Vec::new();
            for i in from..to {
                pending.push(producer.publish(
                    "held",
                    NewMessage {
                        payload: Bytes::from_static(b"x"),
                        ..Default::default()
                    },
                ));
                if pending.len() == 5000 {
                    for f in pending.drain(..) {
                        f.await.expect("publish");
                    }
                }
                let _ = i;
            }
            for f in pending {
                f.await.expect("publish");
            }
        }
    };
    publish_range(0, 1).await;
    // Seq 1 is held for the whole run by a consumer that never acks.
    let mut holder = raw_subscribe(&b.addr(), "held", "g", 1, 1).await;
    let held = raw_next_batch(&mut holder).await;
    assert_eq!(batch_seqs(&held), vec![1]);

    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(&b.addr(), "acker"), "held", "g")
            .batch_size(1000)
            .window(16),
    )
    .await
    .expect("subscribe");
    let mut rates = Vec::new();
    let mut next_seq = 2;
    for round in 0..N / CHUNK {
        publish_range(0, CHUNK).await;
        let start = Instant::now();
        for _ in 0..CHUNK {
            let m = next_message(&mut c, T).await;
            assert_eq!(m.seq(), next_seq, "round {round}");
            assert_eq!(m.attempt(), 1);
            next_seq += 1;
            c.ack(&m).expect("ack");
        }
        c.flush_acks().await.expect("acks confirmed");
        rates.push(CHUNK as f64 / start.elapsed().as_secs_f64());
    }
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    eprintln!("ack rates (msg/s) per {CHUNK}: {rates:.0?}");
    assert!(
        last * 2.0 >= first,
        "acks slowed down: {first:.0}/s at the start, {last:.0}/s at the end"
    );
    let record = largest_group_record(&b.data_dir(), "held");
    eprintln!("largest group record: {record} bytes");
    assert!(record < 256, "group record of {record} bytes");
    assert_eq!(lag(&b.addr(), "held").await, 1);

    // kill -9 and restart: every confirmed publish is there, no acked message comes back, the
    // held one does, and the next publish takes the next seq.
    drop((c, holder));
    b.restart();
    let producer = Producer::connect(client_config(&b.addr(), "producer2"))
        .await
        .expect("producer");
    let seq = producer
        .send("held", "after the restart")
        .await
        .expect("publish");
    assert_eq!(seq, N + 2);
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(&b.addr(), "after"), "held", "g").batch_size(100),
    )
    .await
    .expect("subscribe");
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        let m = next_message(&mut c, T).await;
        assert!(got.insert(m.seq()), "seq {} twice", m.seq());
        c.ack(&m).expect("ack");
    }
    assert_eq!(got, BTreeSet::from([1, N + 2]));
    c.flush_acks().await.expect("acks");
    assert_eq!(lag(&b.addr(), "held").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_count_every_byte_and_never_exceed_a_frame() {
    let b = TestBroker::start();
    let producer = Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    // 48 headers of 64 KB per message: 16 of them (a default batch) would be 48 MiB.
    const N: usize = 20;
    let header = "v".repeat(64 * 1000);
    for i in 0..N {
        let mut m = NewMessage {
            payload: Bytes::from(format!("m{i}")),
            ..Default::default()
        };
        for h in 0..48 {
            m.headers.insert(format!("h{h}"), header.clone());
        }
        producer.publish("wide", m).await.expect("publish");
    }
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "wide",
        "g",
    ))
    .await
    .expect("subscribe");
    for i in 0..N {
        let m = next_message(&mut c, T).await;
        assert_eq!(m.seq(), i as u64 + 1);
        assert_eq!(m.attempt(), 1, "seq {} delivered again", m.seq());
        assert_eq!(m.message.headers.len(), 48);
        assert!(m.message.headers.values().all(|v| *v == header));
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("acks");
    assert_eq!(lag(&b.addr(), "wide").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_an_actor_thread_ends_the_broker_with_a_clear_log_line() {
    for actor in ["store", "orchestrator-0"] {
        let mut b = TestBroker::start_with(&["--enable-fault-injection"]);
        let admin = Admin::connect(client_config(&b.addr(), "admin"))
            .await
            .expect("admin");
        // The reply may not arrive: the broker is gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), admin.fault_panic(actor)).await;
        let status = b.wait_exit(T).expect("the broker exits after a panic");
        assert_eq!(status.code(), Some(70), "{actor}: exit status {status:?}");
        let log = b.log();
        assert!(
            log.contains("fatal: panic (fault injected: panic in"),
            "{actor}: no fatal log line in:\n{log}"
        );
        // A restart serves again.
        b.restart();
        let p = Producer::connect(client_config(&b.addr(), "p"))
            .await
            .expect("producer");
        p.send("after", "x").await.expect("publish after restart");
    }
}
