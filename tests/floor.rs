//! Moving groups to the topic's floor (docs/protocol.md §6.14, decision 4): retention removes
//! messages a group had not settled; the group moves up to the floor, counts what it skipped,
//! stores its cursor, logs the `group_moved_to_floor` event and tells its consumers in their
//! stream (`reset`, reason `retention`). A group loaded later moves at its first read; a new
//! group starts at the floor without a reset.
mod common;
use bytes::Bytes;
use common::*;
use sluice_protocol::{
    AckOutcome, AckReply, Batch, GroupStats, ResetNotice, StreamEvent, TopicSettings,
};
use sluice_sdk::Admin;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// A broker with 128 KiB segments and a sweep every 200 ms; its config file lives in `cfg`.
fn broker(cfg: &tempfile::TempDir) -> TestBroker {
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "segment_bytes = \"128KiB\"\n").expect("config");
    let path = path.to_str().expect("utf-8 path").to_string();
    TestBroker::start_with(&["--config", &path, "--retention-interval", "200ms"])
}

async fn admin(b: &TestBroker) -> Admin {
    Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin")
}

/// Publishes `n` messages of 100 bytes, 1,000 per request.
async fn publish_many(b: &TestBroker, topic: &str, n: usize) {
    let p = sluice_sdk::Producer::connect(client_config(&b.addr(), "p"))
        .await
        .expect("producer");
    let mut done = 0;
    while done < n {
        let k = (n - done).min(1000);
        let msgs = (0..k)
            .map(|i| sluice_sdk::NewMessage {
                payload: Bytes::from(format!("{:0100}", done + i)),
                ..Default::default()
            })
            .collect();
        p.publish_batch(topic, msgs).await.expect("publish");
        done += k;
    }
}

/// Sets `max_messages` on `topic` and waits for the sweep to move its floor; the new floor.
async fn retain_only(a: &Admin, topic: &str, max_messages: u64) -> u64 {
    a.alter_topic(
        topic,
        TopicSettings {
            max_messages: Some(max_messages),
            ..Default::default()
        },
    )
    .await
    .expect("alter");
    let start = Instant::now();
    loop {
        let i = a.topic_info(topic).await.expect("info");
        if i.floor_seq > 1 {
            return i.floor_seq;
        }
        assert!(start.elapsed() < T, "floor did not move: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next event of the subscription on stream 1.
async fn next_event(c: &mut RawClient) -> StreamEvent {
    let f = raw_next(c, RAW_T).await.expect("an event in time");
    assert_eq!(f.get_stream_id(), 1, "unexpected frame {f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("stream failed: {:?}", error_of(&f)));
    sluice_protocol::decode(&data).expect("decode StreamEvent")
}

fn reset(e: StreamEvent) -> ResetNotice {
    match e {
        StreamEvent::Reset(n) => n,
        other => panic!("expected a reset notice, got {other:?}"),
    }
}

fn batch(e: StreamEvent) -> Batch {
    match e {
        StreamEvent::Batch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// Acks a whole batch on stream `sid`; the reply and the batch that comes with it (in either
/// order: the broker sends the next batch as soon as the window allows, the reply once the ack
/// is durable).
async fn ack_then_batch(
    c: &mut RawClient,
    sid: u32,
    topic: &str,
    group: &str,
    batch_id: u64,
) -> (AckReply, Batch) {
    c.request(sid, "ack", ack_request(topic, group, batch_id, None))
        .await;
    let (mut reply, mut next) = (None, None);
    while reply.is_none() || next.is_none() {
        let f = raw_next(c, RAW_T).await.expect("a frame in time");
        let data = payload_of(&f).unwrap_or_else(|| panic!("failed: {:?}", error_of(&f)));
        if f.get_stream_id() == 1 {
            next = Some(batch(sluice_protocol::decode(&data).expect("decode")));
        } else {
            assert_eq!(f.get_stream_id(), sid);
            reply = Some(sluice_protocol::decode(&data).expect("decode AckReply"));
        }
    }
    (reply.expect("reply"), next.expect("batch"))
}

async fn group(a: &Admin, topic: &str, group: &str) -> Option<GroupStats> {
    a.stats()
        .await
        .expect("stats")
        .groups
        .into_iter()
        .find(|g| g.topic == topic && g.group == group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_group_is_moved_to_the_floor_and_its_consumer_told() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut b = broker(&cfg);
    let a = admin(&b).await;
    // The consumer takes one batch and holds it: the group lags behind everything.
    let mut c = raw_subscribe(&b.addr(), "logs", "g", 1, 5).await;
    publish_many(&b, "logs", 10_000).await;
    let held = batch(next_event(&mut c).await);
    assert_eq!(batch_seqs(&held), vec![1, 2, 3, 4, 5]);

    let floor = retain_only(&a, "logs", 1000).await;
    assert!(floor > 5 && floor <= 9001, "floor {floor}");
    // Every seq below the floor was unsettled, the five in flight included.
    let n = reset(next_event(&mut c).await);
    assert_eq!(
        (n.reason.as_str(), n.floor_seq, n.skipped),
        ("retention", floor, floor - 1)
    );
    let g = group(&a, "logs", "g").await.expect("group");
    assert_eq!(
        (g.acked_floor, g.skipped_by_retention, g.lag),
        (floor - 1, floor - 1, 10_001 - floor)
    );
    assert!(b.log().contains("group moved up to the topic's floor"));
    // The batch in flight below the floor: already acked, never redelivered.
    let (r, next) = ack_then_batch(&mut c, 3, "logs", "g", held.batch_id).await;
    assert_eq!((r.outcome, r.count), (AckOutcome::AlreadyAcked, 0));
    assert_eq!(batch_seqs(&next), (floor..floor + 5).collect::<Vec<u64>>());
    assert!(next.messages.iter().all(|m| m.attempt == 1));

    // The move was stored.
    drop(c);
    b.restart();
    let a = admin(&b).await;
    let g = group(&a, "logs", "g").await.expect("group after a restart");
    assert_eq!(g.acked_floor, floor - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_loaded_after_the_sweep_moves_at_its_first_read_and_a_new_one_starts_at_the_floor()
{
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut b = broker(&cfg);
    // A group that consumed 3 messages and left.
    let mut c = raw_subscribe(&b.addr(), "logs", "old", 1, 3).await;
    publish_many(&b, "logs", 10_000).await;
    let first = batch(next_event(&mut c).await);
    let (r, _) = ack_then_batch(&mut c, 3, "logs", "old", first.batch_id).await;
    assert_eq!(r.outcome, AckOutcome::Settled);
    drop(c);
    // After a restart it is only a stored record when retention moves the floor.
    b.restart();
    let a = admin(&b).await;
    let floor = retain_only(&a, "logs", 1000).await;
    let g = group(&a, "logs", "old").await.expect("stored group");
    assert_eq!(g.acked_floor, 3, "not moved while not loaded");

    let mut c = raw_subscribe(&b.addr(), "logs", "old", 1, 3).await;
    let n = reset(next_event(&mut c).await);
    assert_eq!(
        (n.reason.as_str(), n.floor_seq, n.skipped),
        ("retention", floor, floor - 4)
    );
    let next = batch(next_event(&mut c).await);
    assert_eq!(batch_seqs(&next)[0], floor);
    let g = group(&a, "logs", "old").await.expect("group");
    assert_eq!(
        (g.acked_floor, g.skipped_by_retention),
        (floor - 1, floor - 4)
    );

    // A group created now starts at the floor: nothing to skip, no notice.
    let mut fresh = raw_subscribe(&b.addr(), "logs", "fresh", 1, 3).await;
    let b1 = batch(next_event(&mut fresh).await);
    assert_eq!(batch_seqs(&b1), vec![floor, floor + 1, floor + 2]);
    let g = group(&a, "logs", "fresh").await.expect("group");
    assert_eq!((g.acked_floor, g.skipped_by_retention), (floor - 1, 0));
}
