//! Redelivery backoff (docs/protocol.md §6.12): measured gaps follow a group's schedule, nacks
//! wait their delay or the schedule, attempt counts survive an orchestrator fault and a broker
//! restart, the message reaches the dead-letter topic after `max_retries`, and bad schedules are
//! refused. Raw frames: the SDK has no schedule or nack delay.
mod common;
use bytes::Bytes;
use common::*;
use rsocket_rust::frame::{self as rf, Frame};
use sluice_protocol::{
    Batch, ErrorCode, GroupMode, NackRequest, NewMessage, StreamEvent, SubscribeRequest,
};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, Producer};
use std::time::{Duration, Instant};

/// A subscription (stream 1) of a new connection: window 1, batch size 1, 1,000 credits.
async fn subscribe(addr: &str, topic: &str, group: &str, backoff: Option<&[&str]>) -> RawClient {
    subscribe_as(addr, topic, group, GroupMode::Shared, backoff).await
}

async fn subscribe_as(
    addr: &str,
    topic: &str,
    group: &str,
    mode: GroupMode,
    backoff: Option<&[&str]>,
) -> RawClient {
    let mut c = RawClient::setup(addr, RAW_LIFETIME).await;
    c.send(&sub_frame(topic, group, mode, backoff)).await;
    c
}

fn sub_frame(topic: &str, group: &str, mode: GroupMode, backoff: Option<&[&str]>) -> Frame {
    let req = SubscribeRequest {
        topic: topic.into(),
        group: group.into(),
        mode,
        filters: Default::default(),
        window: Some(1),
        batch_size: Some(1),
        backoff: backoff.map(|b| b.iter().map(|s| s.to_string()).collect()),
    };
    rf::RequestStream::builder(1, 0)
        .set_initial_request_n(1000)
        .set_metadata(route_metadata("subscribe"))
        .set_data(sluice_protocol::encode(&req).expect("encode"))
        .build()
}

/// The next batch and when it arrived.
async fn batch_at(c: &mut RawClient, within: Duration) -> (Batch, Instant) {
    let f = raw_next(c, within).await.expect("a batch in time");
    let at = Instant::now();
    assert_eq!(f.get_stream_id(), 1, "unexpected frame {f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("subscribe failed: {:?}", error_of(&f)));
    match sluice_protocol::decode::<StreamEvent>(&data).expect("decode") {
        StreamEvent::Batch(b) => (b, at),
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// A fire-and-forget ack of a whole batch on stream `sid`.
async fn ack(c: &mut RawClient, sid: u32, b: &Batch) {
    let f = rf::RequestFNF::builder(sid, 0)
        .set_metadata(route_metadata("ack"))
        .set_data(ack_request(&b.topic, &b.group, b.batch_id, None))
        .build();
    c.send(&f).await;
}

/// A fire-and-forget nack of a whole batch on stream `sid`.
async fn nack(c: &mut RawClient, sid: u32, b: &Batch, delay_ms: Option<u64>) {
    let req = NackRequest {
        topic: b.topic.clone(),
        group: b.group.clone(),
        batch_id: b.batch_id,
        seqs: None,
        release: false,
        delay_ms,
    };
    let f = rf::RequestFNF::builder(sid, 0)
        .set_metadata(route_metadata("nack"))
        .set_data(sluice_protocol::encode(&req).expect("encode"))
        .build();
    c.send(&f).await;
}

async fn publish(addr: &str, topic: &str, n: usize) {
    let p = Producer::connect(client_config(addr, "p"))
        .await
        .expect("producer");
    let msgs = (0..n)
        .map(|i| NewMessage {
            payload: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
        .collect();
    p.publish_batch(topic, msgs).await.expect("publish");
}

/// The first dead letter of `topic`/`group`: its headers.
async fn dead_letter(addr: &str, topic: &str, group: &str) -> sluice_sdk::Received {
    let dlq = sluice_protocol::dlq_topic(topic, group);
    let mut c = Consumer::subscribe(ConsumerConfig::new(client_config(addr, "dlq"), dlq, "d"))
        .await
        .expect("subscribe to the dead-letter topic");
    let m = next_message(&mut c, Duration::from_secs(30)).await;
    c.ack(&m).expect("ack");
    c.flush_acks().await.expect("flush");
    m
}

fn header<'a>(m: &'a sluice_sdk::Received, k: &str) -> &'a str {
    m.message
        .headers
        .get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no header {k}: {:?}", m.message.headers))
}

/// `gap` is `want` ±20%.
fn assert_gap(gap: Duration, want: Duration, what: &str) {
    let (lo, hi) = (want.mul_f64(0.8), want.mul_f64(1.2));
    assert!(
        gap >= lo && gap <= hi,
        "{what}: gap {gap:?}, want {want:?} ±20%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_redeliveries_follow_the_schedule_then_the_message_is_dead_lettered() {
    let b = TestBroker::start_with(&["--max-retries", "4"]);
    publish(&b.addr(), "jobs", 1).await;
    let mut c = subscribe(&b.addr(), "jobs", "g", Some(&["1s", "2s", "3s"])).await;
    // Never acked: delivered 5 times (4 failures allowed), 1s, 2s, 3s, 3s apart.
    let mut times = Vec::new();
    for attempt in 1..=5u32 {
        let (batch, at) = batch_at(&mut c, Duration::from_secs(10)).await;
        assert_eq!(batch_seqs(&batch), vec![1]);
        assert_eq!(batch.messages[0].attempt, attempt);
        times.push(at);
    }
    for (i, want) in [1, 2, 3, 3].into_iter().enumerate() {
        let gap = times[i + 1] - times[i];
        assert_gap(gap, Duration::from_secs(want), &format!("gap {}", i + 1));
    }
    // The 5th delivery times out after 3s too: its 5th failure, past max_retries 4.
    let m = dead_letter(&b.addr(), "jobs", "g").await;
    assert!(times[4].elapsed() >= Duration::from_millis(2400));
    assert_eq!(header(&m, "x-dlq-seq"), "1");
    assert_eq!(header(&m, "x-dlq-attempts"), "5");
    assert_eq!(header(&m, "x-dlq-reason"), "batch timeout");
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let mut last = None;
    for _ in 0..100 {
        let st = admin.stats().await.expect("stats");
        let g = st
            .groups
            .into_iter()
            .find(|g| g.topic == "jobs" && g.group == "g")
            .expect("group");
        let done = g.dead_letters == 1;
        last = Some(g);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = last.expect("stats");
    assert_eq!(g.backoff_ms, vec![1000, 2000, 3000]);
    assert_eq!((g.dead_letters, g.redeliveries, g.acked_floor), (1, 4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_wait_the_schedule_without_holding_fresh_messages_back() {
    let b = TestBroker::start_with(&["--max-retries", "2"]);
    publish(&b.addr(), "jobs", 2).await;
    let mut c = subscribe(&b.addr(), "jobs", "g", Some(&["1s", "2s"])).await;
    let (first, _) = batch_at(&mut c, RAW_T).await;
    assert_eq!(batch_seqs(&first), vec![1]);
    let t1 = Instant::now();
    nack(&mut c, 3, &first, None).await;
    // Seq 1 waits 1s; seq 2 comes at once (window 1: only once seq 1 is out of it).
    let (second, at) = batch_at(&mut c, RAW_T).await;
    assert_eq!(batch_seqs(&second), vec![2]);
    assert!(
        at - t1 < Duration::from_millis(800),
        "a fresh message waited for a retry: {:?}",
        at - t1
    );
    ack(&mut c, 5, &second).await;
    let (again, at) = batch_at(&mut c, RAW_T).await;
    assert_eq!(
        (batch_seqs(&again), again.messages[0].attempt),
        (vec![1], 2)
    );
    assert_gap(at - t1, Duration::from_secs(1), "after the 1st nack");
    let t2 = Instant::now();
    nack(&mut c, 7, &again, None).await;
    let (third, at) = batch_at(&mut c, RAW_T).await;
    assert_eq!(
        (batch_seqs(&third), third.messages[0].attempt),
        (vec![1], 3)
    );
    assert_gap(at - t2, Duration::from_secs(2), "after the 2nd nack");
    // Its 3rd failure, past max_retries 2: dead-lettered at once.
    nack(&mut c, 9, &third, None).await;
    let m = dead_letter(&b.addr(), "jobs", "g").await;
    assert_eq!(header(&m, "x-dlq-reason"), "nack");
    assert_eq!(header(&m, "x-dlq-attempts"), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_with_a_delay_waits_at_least_the_delay() {
    let b = TestBroker::start();
    publish(&b.addr(), "jobs", 1).await;
    // No schedule: a plain nack redelivers at once, a delayed one after its delay.
    let mut c = subscribe(&b.addr(), "jobs", "g", None).await;
    let (first, _) = batch_at(&mut c, RAW_T).await;
    let t = Instant::now();
    nack(&mut c, 3, &first, None).await;
    let (again, at) = batch_at(&mut c, RAW_T).await;
    assert_eq!(again.messages[0].attempt, 2);
    assert!(at - t < Duration::from_millis(800), "{:?}", at - t);
    let t = Instant::now();
    nack(&mut c, 5, &again, Some(1500)).await;
    let (third, at) = batch_at(&mut c, RAW_T).await;
    assert_eq!(third.messages[0].attempt, 3);
    assert!(at - t >= Duration::from_millis(1500), "{:?}", at - t);
    assert_gap(at - t, Duration::from_millis(1500), "nack delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_counts_survive_an_orchestrator_fault_and_a_broker_restart() {
    let mut b = TestBroker::start_with(&["--enable-fault-injection", "--max-retries", "5"]);
    publish(&b.addr(), "jobs", 1).await;
    let schedule: &[&str] = &["1s"];
    let mut c = subscribe(&b.addr(), "jobs", "g", Some(schedule)).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (batch, _) = batch_at(&mut c, RAW_T).await;
        seen.push(batch.messages[0].attempt);
    }
    // Delivery 2 is in flight: the orchestrator restarts, and the subscription rejoins.
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    admin.fault("orchestrator-0").await.expect("fault");
    for _ in 0..2 {
        let (batch, _) = batch_at(&mut c, RAW_T).await;
        seen.push(batch.messages[0].attempt);
    }
    // Every commit before this publish's reply is durable (they are durable in order): the
    // count of delivery 4 included.
    publish(&b.addr(), "flush", 1).await;
    drop(c);
    b.restart();
    let mut c = subscribe(&b.addr(), "jobs", "g", Some(schedule)).await;
    while seen.len() < 8 && seen.last() != Some(&1) {
        let (batch, _) = batch_at(&mut c, RAW_T).await;
        seen.push(batch.messages[0].attempt);
    }
    // Never back to 1: the delivery lost in each restart counts as a delivery, not a failure
    // (like a disconnect), so 6 failures take 8 deliveries.
    assert_eq!(seen, (1..=8).collect::<Vec<u32>>(), "attempts seen");
    let m = dead_letter(&b.addr(), "jobs", "g").await;
    assert_eq!(header(&m, "x-dlq-attempts"), "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_conflicting_schedules_are_refused_and_change_nothing() {
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), "backoff = [\"700ms\", \"1s\"]\n").expect("write config");
    let path = config.path().to_string_lossy().into_owned();
    let b = TestBroker::start_with(&["--config", &path]);
    publish(&b.addr(), "jobs", 3).await;
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let refused = |f: Option<Frame>| {
        let f = f.expect("an answer");
        let (_, text) = error_of(&f).unwrap_or_else(|| panic!("not an error: {f:?}"));
        sluice_protocol::WireError::parse(&text)
    };
    for bad in [&["1s", "soon"][..], &["0s"], &["2days"], &[]] {
        let mut c = subscribe(&b.addr(), "jobs", "g", Some(bad)).await;
        let e = refused(raw_next(&mut c, RAW_T).await);
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad:?}: {e}");
        if let Some(entry) = bad.get(1).or(bad.first()) {
            assert!(e.message.contains(entry), "{e}");
        }
    }
    let groups = admin.stats().await.expect("stats").groups;
    assert!(groups.is_empty(), "nothing created: {groups:?}");

    // No schedule asked for: the broker's. A subscribe naming another schedule is refused.
    let mut c = subscribe(&b.addr(), "jobs", "g", None).await;
    let (first, t1) = batch_at(&mut c, RAW_T).await;
    assert_eq!(batch_seqs(&first), vec![1], "a new group starts at 1");
    let mut other = subscribe(&b.addr(), "jobs", "g", Some(&["5s"])).await;
    let e = refused(raw_next(&mut other, RAW_T).await);
    assert_eq!(e.code, ErrorCode::ModeConflict, "{e}");
    let mut same = subscribe(&b.addr(), "jobs", "g", Some(&["700ms", "1s"])).await;
    let (next, _) = batch_at(&mut same, RAW_T).await;
    assert_eq!(batch_seqs(&next), vec![2]);
    let st = admin.stats().await.expect("stats");
    assert_eq!(st.groups.len(), 1);
    assert_eq!(st.groups[0].backoff_ms, vec![700, 1000]);
    assert_eq!(st.groups[0].consumers, 2);
    // Seq 2 returns at once when its consumer leaves (no failure); seq 1 is redelivered 700 ms
    // after its delivery by the schedule, not after the 30 s batch timeout.
    drop(same);
    let (again, at) = batch_at(&mut c, Duration::from_secs(5)).await;
    assert_eq!(
        (batch_seqs(&again), again.messages[0].attempt),
        (vec![1], 2)
    );
    assert_gap(
        at - t1,
        Duration::from_millis(700),
        "by the broker's schedule",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_broadcast_group_only_the_silent_members_copies_follow_the_schedule() {
    let b = TestBroker::start_with(&["--max-retries", "1"]);
    let admin = Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let schedule: &[&str] = &["800ms"];
    let mut silent =
        subscribe_as(&b.addr(), "news", "g", GroupMode::Broadcast, Some(schedule)).await;
    let mut acker = subscribe_as(&b.addr(), "news", "g", GroupMode::Broadcast, None).await;
    // Both members are in before the message comes.
    for _ in 0..500 {
        let st = admin.stats().await.expect("stats");
        if st.groups.first().map(|g| g.consumers) == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&b.addr(), "news", 1).await;
    let (mine, t1) = batch_at(&mut silent, RAW_T).await;
    let (theirs, _) = batch_at(&mut acker, RAW_T).await;
    assert_eq!((batch_seqs(&mine), batch_seqs(&theirs)), (vec![1], vec![1]));
    ack(&mut acker, 3, &theirs).await;
    // Only the silent member's copy comes back, 800 ms later, then goes to the dead letters.
    let (again, t2) = batch_at(&mut silent, RAW_T).await;
    assert_eq!(again.messages[0].attempt, 2);
    assert_gap(t2 - t1, Duration::from_millis(800), "the member's schedule");
    let m = dead_letter(&b.addr(), "news", "g").await;
    assert_eq!(header(&m, "x-dlq-attempts"), "2");
    assert!(m.message.headers.contains_key("x-dlq-consumer"));
    assert!(
        raw_next(&mut acker, Duration::from_millis(300))
            .await
            .is_none(),
        "the member that acked gets nothing again"
    );
}
