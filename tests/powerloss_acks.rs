//! Power cuts against acks (issue 10, items 1 and 5), on the power-cut simulator filesystem (see
//! `PowerlossFs`; run by `.ci/run` with `--ignored`): an ack the broker confirmed, or confirmed
//! as already done, is never undone by a power cut, and a group cursor holding one message while
//! thousands after it are acked comes back exactly.
mod common;

use common::*;
use sluice_protocol::AckOutcome;
use sluice_sdk::{Consumer, ConsumerConfig, Producer};
use std::time::Duration;

/// One FUSE mount at a time (the simulator is a single-threaded process each).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const T: Duration = Duration::from_secs(30);

/// After the power cut: publish one more message and check the group's first delivery is
/// exactly `expect` (what was not acked) followed by that new message.
async fn first_deliveries(addr: &str, topic: &str, expect: Vec<u64>, next_seq: u64) {
    let p = Producer::connect(client_config(addr, "after"))
        .await
        .expect("producer");
    assert_eq!(p.send(topic, "after").await.expect("publish"), next_seq);
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(addr, "after-c"), topic, "g").batch_size(1000),
    )
    .await
    .expect("subscribe");
    let mut got = Vec::new();
    while got.last() != Some(&next_seq) {
        let m = next_message(&mut c, T).await;
        got.push(m.seq());
        c.ack(&m).expect("ack");
    }
    let mut want = expect;
    want.push(next_seq);
    assert_eq!(
        got, want,
        "an acked message came back, or a held one was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs FUSE: run by .ci/run"]
async fn power_cut_after_a_repeated_ack_was_answered_does_not_undo_it() {
    let _serial = SERIAL.lock().await;
    let fs = PowerlossFs::mount("eager");
    let data = fs.mnt().join("data");
    let mut b = TestBroker::start_on(&data, &["--enable-fault-injection"]);
    let mut a = ack_twice_under_a_stalled_disk(&b.addr(), "rep", Duration::from_millis(1500)).await;
    // The repeat's answer: the moment it arrives, the cut.
    let r = loop {
        let f = raw_next(&mut a, T).await.expect("a reply");
        if f.get_stream_id() == 5 {
            let data = payload_of(&f).expect("ack reply");
            break sluice_protocol::decode::<sluice_protocol::AckReply>(&data).expect("decode");
        }
    };
    assert_eq!(r.outcome, AckOutcome::AlreadyAcked);
    b.kill();
    fs.crash();
    b.restart();
    first_deliveries(&b.addr(), "rep", vec![], 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs FUSE: run by .ci/run"]
async fn power_cut_keeps_a_cursor_with_one_held_message_and_thousands_acked() {
    let _serial = SERIAL.lock().await;
    const N: u64 = 20_000;
    let fs = PowerlossFs::mount("eager");
    let data = fs.mnt().join("data");
    let mut b = TestBroker::start_on(&data, &["--batch-timeout", "1h"]);
    let mut p = RawClient::setup(&b.addr(), RAW_LIFETIME).await;
    raw_publish(&mut p, 1, "held", 1).await;
    let mut holder = raw_subscribe(&b.addr(), "held", "g", 1, 1).await;
    assert_eq!(batch_seqs(&raw_next_batch(&mut holder).await), vec![1]);
    let mut sid = 3;
    for _ in 0..N / 1000 {
        raw_publish(&mut p, sid, "held", 1000).await;
        sid += 2;
    }
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(&b.addr(), "acker"), "held", "g").batch_size(1000),
    )
    .await
    .expect("subscribe");
    for seq in 2..=N + 1 {
        let m = next_message(&mut c, T).await;
        assert_eq!(m.seq(), seq);
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("every ack confirmed");
    b.kill();
    fs.crash();
    b.restart();
    first_deliveries(&b.addr(), "held", vec![1], N + 2).await;
}
