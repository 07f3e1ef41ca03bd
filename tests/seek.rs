//! Moving and deleting groups (docs/protocol.md §6.14): `group.seek` to a sequence, a time, the
//! start or the end, then consume: delivery starts exactly there; batches in flight are void
//! and the consumers get a `reset` notice; bad targets change nothing; `group.delete` refuses a
//! group with consumers and forgets one without, also across a restart.
mod common;
use bytes::Bytes;
use common::*;
use sluice_protocol::{AckOutcome, ErrorCode, SeekTo, StreamEvent};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, NewMessage, Producer, SdkError};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn publish(p: &Producer, topic: &str, from: usize, n: usize) -> Vec<u64> {
    let msgs = (from..from + n)
        .map(|i| NewMessage {
            payload: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
        .collect();
    let r = p.publish_batch(topic, msgs).await.expect("publish");
    (r.first_seq..=r.last_seq).collect()
}

fn consumer_config(addr: &str, topic: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig::new(client_config(addr, "c"), topic, group)
}

/// Consumes and acks `n` messages; their seqs and the attempt of each.
async fn consume(c: &mut Consumer, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let m = next_message(c, T).await;
        seqs.push(m.seq());
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("flush");
    seqs
}

/// Nothing more arrives for a while.
async fn quiet(c: &mut Consumer) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        panic!("unexpected {:?}", m.map(|r| r.map(|m| m.seq())));
    }
}

fn code(e: &SdkError) -> Option<ErrorCode> {
    e.code()
}

async fn acked_floor(admin: &Admin, topic: &str, group: &str) -> Option<u64> {
    admin
        .stats()
        .await
        .expect("stats")
        .groups
        .iter()
        .find(|g| g.topic == topic && g.group == group)
        .map(|g| g.acked_floor)
}

/// Waits until the group has no consumer: a closed consumer's leave may still be on its way to
/// the orchestrator when the next request (a seek) arrives.
async fn until_no_consumer(admin: &Admin, topic: &str, group: &str) {
    let start = std::time::Instant::now();
    loop {
        let stats = admin.stats().await.expect("stats");
        let n = stats
            .groups
            .iter()
            .find(|g| g.topic == topic && g.group == group)
            .map_or(0, |g| g.consumers);
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{n} consumers still in {topic}/{group}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn range(a: u64, b: u64) -> Vec<u64> {
    (a..=b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_to_a_sequence_the_start_and_the_end_then_consume_from_exactly_there() {
    let b = TestBroker::start();
    let addr = b.addr();
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    publish(&p, "t", 0, 100).await;
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 30).await, range(1, 30));
    c.close().await.expect("close");
    until_no_consumer(&admin, "t", "g").await;

    // Forwards.
    let r = admin
        .seek_group("t", "g", SeekTo::Seq(50))
        .await
        .expect("seek");
    assert_eq!((r.next_seq, r.cancelled_batches), (50, 0));
    assert_eq!(acked_floor(&admin, "t", "g").await, Some(49));
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 51).await, range(50, 100));
    quiet(&mut c).await;
    c.close().await.expect("close");
    until_no_consumer(&admin, "t", "g").await;

    // Backwards, to the start, to the end.
    for (to, first) in [(SeekTo::Seq(10), 10), (SeekTo::Start, 1)] {
        let r = admin.seek_group("t", "g", to).await.expect("seek");
        assert_eq!(r.next_seq, first);
        let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
            .await
            .expect("subscribe");
        assert_eq!(
            consume(&mut c, 101 - first as usize).await,
            range(first, 100)
        );
        quiet(&mut c).await;
        c.close().await.expect("close");
        until_no_consumer(&admin, "t", "g").await;
    }
    let r = admin
        .seek_group("t", "g", SeekTo::Seq(3))
        .await
        .expect("seek");
    assert_eq!(r.next_seq, 3);
    let r = admin.seek_group("t", "g", SeekTo::End).await.expect("seek");
    assert_eq!(r.next_seq, 101);
    assert_eq!(acked_floor(&admin, "t", "g").await, Some(100));
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    quiet(&mut c).await;
    publish(&p, "t", 100, 2).await;
    assert_eq!(consume(&mut c, 2).await, vec![101, 102]);
    assert!(b.log().contains("group seeked"), "the group_seeked event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_to_a_time_starts_at_the_first_message_stored_at_or_after_it() {
    let b = TestBroker::start();
    let addr = b.addr();
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    // Two publishes at different milliseconds: seqs 1..=5, then 6..=10.
    publish(&p, "t", 0, 5).await;
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    let mut last_ts = 0;
    for _ in 0..5 {
        let m = next_message(&mut c, T).await;
        last_ts = m.message.timestamp_ms;
        c.ack(&m).expect("ack");
    }
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    assert!(eventually(T, || now_ms() > last_ts + 1).await);
    publish(&p, "t", 5, 5).await;
    let mut sixth_ts = 0;
    for _ in 0..5 {
        let m = next_message(&mut c, T).await;
        if m.seq() == 6 {
            sixth_ts = m.message.timestamp_ms;
        }
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("flush");
    c.close().await.expect("close");
    assert!(sixth_ts > last_ts);
    for (at, first) in [(sixth_ts, 6), (last_ts, 1), (0, 1)] {
        let r = admin
            .seek_group("t", "g", SeekTo::TimeMs(at))
            .await
            .expect("seek");
        let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
            .await
            .expect("subscribe");
        let got = consume(&mut c, 11 - first as usize).await;
        c.close().await.expect("close");
        if at == last_ts {
            // The first message stored at that millisecond: 1..=5 share it or follow it.
            assert!(r.next_seq <= 5, "{r:?}");
            assert_eq!(got[0], r.next_seq);
            continue;
        }
        assert_eq!(r.next_seq, first, "at {at}");
        assert_eq!(got, range(first, 10));
    }
    // After everything: the end.
    let r = admin
        .seek_group("t", "g", SeekTo::TimeMs(now_ms() + 60_000))
        .await
        .expect("seek");
    assert_eq!(r.next_seq, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_voids_batches_in_flight_and_tells_the_consumer_in_its_stream() {
    let b = TestBroker::start();
    let addr = b.addr();
    let mut pc = RawClient::setup(&addr, RAW_LIFETIME).await;
    raw_publish(&mut pc, 1, "t", 60).await;
    let mut c = raw_subscribe(&addr, "t", "g", 1, 5).await;
    let held = raw_next_batch(&mut c).await;
    assert_eq!(batch_seqs(&held), range(1, 5));
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    let r = admin
        .seek_group("t", "g", SeekTo::Seq(40))
        .await
        .expect("seek");
    assert_eq!((r.next_seq, r.cancelled_batches), (40, 1));
    // The notice first (taking one credit), then batches from 40.
    let f = raw_next(&mut c, RAW_T).await.expect("notice");
    let data = payload_of(&f).expect("payload");
    match sluice_protocol::decode::<StreamEvent>(&data).expect("decode") {
        StreamEvent::Reset(n) => {
            assert_eq!(
                (n.reason.as_str(), n.floor_seq, n.skipped),
                ("seek", 40, 39)
            )
        }
        other => panic!("expected a reset notice, got {other:?}"),
    }
    let next = raw_next_batch(&mut c).await;
    assert_eq!(batch_seqs(&next), range(40, 44));
    assert!(next.messages.iter().all(|m| m.attempt == 1));
    // The void batch cannot be acked: its messages are below the group's floor now.
    let r = raw_ack(&mut c, 3, "t", held.batch_id, None).await;
    assert_eq!(r.outcome, AckOutcome::UnknownBatch);
    let r = raw_ack(&mut c, 5, "t", next.batch_id, None).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 5));
    assert_eq!(acked_floor(&admin, "t", "g").await, Some(44));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_seeks_are_refused_and_change_nothing() {
    let b = TestBroker::start();
    let addr = b.addr();
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    publish(&p, "t", 0, 20).await;
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 5).await, range(1, 5));
    c.close().await.expect("close");
    for bad in [22, 1000, 0] {
        let e = admin
            .seek_group("t", "g", SeekTo::Seq(bad))
            .await
            .expect_err("past the head");
        assert_eq!(code(&e), Some(ErrorCode::InvalidRequest), "{bad}: {e}");
        assert!(e.to_string().contains("1..=21"), "names the range: {e}");
    }
    let e = admin
        .seek_group("t", "nope", SeekTo::Start)
        .await
        .expect_err("unknown group");
    assert_eq!(code(&e), Some(ErrorCode::UnknownGroup), "{e}");
    assert_eq!(acked_floor(&admin, "t", "g").await, Some(5));
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 15).await, range(6, 20));
    // Head + 1 is fine: nothing to deliver until the next publish.
    let r = admin
        .seek_group("t", "g", SeekTo::Seq(21))
        .await
        .expect("seek");
    assert_eq!(r.next_seq, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_consumers_is_busy_and_a_deleted_group_is_gone_across_a_restart() {
    let mut b = TestBroker::start();
    let addr = b.addr();
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    publish(&p, "t", 0, 10).await;
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 10).await, range(1, 10));
    let e = admin.delete_group("t", "g").await.expect_err("busy");
    assert_eq!(code(&e), Some(ErrorCode::GroupBusy), "{e}");
    assert_eq!(acked_floor(&admin, "t", "g").await, Some(10));
    c.close().await.expect("close");
    // Its departure may still be on its way to the orchestrator.
    let mut deleted = None;
    for _ in 0..100 {
        match admin.delete_group("t", "g").await {
            Err(e) if code(&e) == Some(ErrorCode::GroupBusy) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => {
                deleted = Some(other);
                break;
            }
        }
    }
    let d = deleted.expect("not busy for ever").expect("delete");
    assert_eq!((d.topic.as_str(), d.group.as_str()), ("t", "g"));
    assert_eq!(acked_floor(&admin, "t", "g").await, None, "gone from stats");
    assert!(b.log().contains("group deleted"), "the group_deleted event");
    let e = admin.delete_group("t", "g").await.expect_err("twice");
    assert_eq!(code(&e), Some(ErrorCode::UnknownGroup), "{e}");

    // Gone after a restart too: a group of that name starts again at 1.
    b.restart();
    let addr = b.addr();
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    assert_eq!(acked_floor(&admin, "t", "g").await, None);
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 10).await, range(1, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_ends_its_subscriptions_with_deleted() {
    let b = TestBroker::start();
    let addr = b.addr();
    let mut pc = RawClient::setup(&addr, RAW_LIFETIME).await;
    raw_publish(&mut pc, 1, "t", 10).await;
    let mut c = raw_subscribe(&addr, "t", "g", 1, 5).await;
    let held = raw_next_batch(&mut c).await;
    assert_eq!(batch_seqs(&held), range(1, 5));
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    admin.delete_topic("t").await.expect("delete");
    // A notice (it had credits), then the stream ends with DELETED.
    let f = raw_next(&mut c, RAW_T).await.expect("notice");
    let data = payload_of(&f).expect("payload");
    match sluice_protocol::decode::<StreamEvent>(&data).expect("decode") {
        StreamEvent::Reset(n) => assert_eq!(n.reason, "deleted"),
        other => panic!("expected a reset notice, got {other:?}"),
    }
    let f = raw_next(&mut c, RAW_T).await.expect("error");
    assert_eq!(f.get_stream_id(), 1);
    let (_, text) = error_of(&f).unwrap_or_else(|| panic!("not an error: {f:?}"));
    assert_eq!(
        sluice_protocol::WireError::parse(&text).code,
        ErrorCode::Deleted,
        "{text}"
    );
    assert_eq!(acked_floor(&admin, "t", "g").await, None);
    assert!(b.log().contains("group dropped: topic deleted"));
    // Published again, the topic starts afresh, and so does a group of that name.
    raw_publish(&mut pc, 3, "t", 2).await;
    let mut c = Consumer::subscribe(consumer_config(&addr, "t", "g"))
        .await
        .expect("subscribe");
    assert_eq!(consume(&mut c, 2).await, vec![1, 2]);
}
