//! Lag and stale consumers (docs/protocol.md §6.13): a `sluice consume` child stopped with
//! SIGSTOP while it holds a batch is flagged stale within `stale_after` + 1 s (stats and the
//! broker's log of the `consumer_stale` event); `admin.disconnect_stale` and
//! `stale_disconnect_after` free its batch to another consumer.
mod common;
use bytes::Bytes;
use common::*;
use sluice_protocol::GroupStats;
use sluice_sdk::{Admin, Consumer, ConsumerConfig, NewMessage, Producer};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `sluice consume` child process; resumed and killed on drop.
struct ConsumeChild(Child);

impl ConsumeChild {
    fn start(addr: &str, topic: &str, group: &str) -> ConsumeChild {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "consume", "--addr", addr, "--topic", topic, "--group", group,
            ])
            .args(["--window", "1", "--batch-size", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluice consume");
        ConsumeChild(child)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for ConsumeChild {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker with these config-file lines.
fn broker(config: &str) -> (TestBroker, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), config).expect("write config");
    let path = file.path().to_string_lossy().into_owned();
    (TestBroker::start_with(&["--config", &path]), file)
}

async fn publish(p: &Producer, topic: &str, n: usize) {
    let msgs = (0..n)
        .map(|i| NewMessage {
            payload: Bytes::from(format!("m{i}")),
            ..Default::default()
        })
        .collect();
    p.publish_batch(topic, msgs).await.expect("publish");
}

async fn group(admin: &Admin, topic: &str) -> Option<GroupStats> {
    admin
        .stats()
        .await
        .expect("stats")
        .groups
        .into_iter()
        .find(|g| g.topic == topic)
}

/// Polls the group's stats until `f` holds (20 s at most).
async fn wait_group(admin: &Admin, topic: &str, f: impl Fn(&GroupStats) -> bool) -> GroupStats {
    let start = Instant::now();
    loop {
        let g = group(admin, topic).await;
        if let Some(g) = g.as_ref().filter(|g| f(g)) {
            return g.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "condition not reached: {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a child consuming `topic`, lets it ack `first` messages, stops it, publishes 10 more:
/// one batch of 10 is then in flight to the stopped child. Returns it and when it was stopped.
async fn stopped_consumer_holding_a_batch(
    addr: &str,
    admin: &Admin,
    p: &Producer,
    topic: &str,
    first: usize,
) -> (ConsumeChild, Instant) {
    publish(p, topic, first).await;
    let child = ConsumeChild::start(addr, topic, "g");
    let first = first as u64;
    wait_group(admin, topic, |g| g.acked_floor == first && g.consumers == 1).await;
    child.signal("-STOP");
    let stopped = Instant::now();
    publish(p, topic, 10).await;
    let g = wait_group(admin, topic, |g| g.in_flight_messages == 10).await;
    let c = &g.consumer_details[0];
    assert_eq!(
        (c.in_flight_batches, c.in_flight_messages),
        (1, 10),
        "{c:?}"
    );
    assert_eq!(g.lag, 10);
    (child, stopped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_with_lag_is_flagged_stale_and_disconnect_stale_frees_its_batch() {
    let (b, _cfg) = broker("stale_after = \"2s\"\n");
    let addr = b.addr();
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let (child, stopped) = stopped_consumer_holding_a_batch(&addr, &admin, &p, "work", 20).await;
    let g = group(&admin, "work").await.expect("group");
    assert_eq!(g.stale_consumers, 0, "not yet: {g:?}");
    assert!(!g.consumer_details[0].stale);

    let g = wait_group(&admin, "work", |g| g.stale_consumers == 1).await;
    let flagged = stopped.elapsed();
    assert!(
        flagged <= Duration::from_secs(3),
        "flagged after {flagged:?}, stale_after 2s"
    );
    let c = &g.consumer_details[0];
    assert!(c.stale && c.active, "{c:?}");
    assert_eq!((c.delivered, c.acked, c.lag), (30, 20, 10));
    assert!(c.last_ack_ms_ago >= 2000, "{c:?}");
    assert!(c.oldest_unacked_age_ms.is_some(), "{c:?}");
    assert!(g.oldest_unacked_age_ms.is_some() && g.last_ack_ms_ago.is_some());
    let stale_id = c.consumer.clone();
    assert!(
        b.log().contains("consumer stale"),
        "the consumer_stale event is logged"
    );

    // Another consumer gets nothing while the stopped one holds the batch...
    let mut other = Consumer::subscribe(
        ConsumerConfig::new(client_config(&addr, "other"), "work", "g").window(4),
    )
    .await
    .expect("subscribe");
    wait_group(&admin, "work", |g| g.consumers == 2).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.next())
            .await
            .is_err(),
        "nothing to deliver while the batch is held"
    );
    // ...until the stale one is disconnected: exactly its 10 messages come, once each.
    let reply = admin
        .disconnect_stale(Duration::from_secs(1))
        .await
        .expect("disconnect_stale");
    assert_eq!(reply.disconnected.len(), 1, "{reply:?}");
    let d = &reply.disconnected[0];
    assert_eq!((d.topic.as_str(), d.group.as_str()), ("work", "g"));
    assert_eq!((d.consumer.as_str(), d.lag), (stale_id.as_str(), 10));
    assert!(d.idle_ms >= 2000);
    let mut seqs = Vec::new();
    while seqs.len() < 10 {
        let m = next_message(&mut other, Duration::from_secs(10)).await;
        assert_eq!(m.attempt(), 2);
        seqs.push(m.seq());
        other.ack(&m).expect("ack");
    }
    other.flush_acks().await.expect("flush");
    assert_eq!(seqs, (21..=30).collect::<Vec<u64>>());
    let g = wait_group(&admin, "work", |g| g.acked_floor == 30).await;
    assert_eq!((g.consumers, g.stale_consumers, g.lag), (1, 0, 0));
    assert!(b.log().contains("stale consumer disconnected"));
    // Nothing left to disconnect.
    let reply = admin
        .disconnect_stale(Duration::from_millis(1))
        .await
        .expect("disconnect_stale");
    assert!(reply.disconnected.is_empty(), "{reply:?}");
    child.signal("-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stale_for_stale_disconnect_after_is_disconnected_automatically() {
    let (b, _cfg) = broker("stale_after = \"1s\"\nstale_disconnect_after = \"2s\"\n");
    let addr = b.addr();
    let admin = Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let (child, stopped) = stopped_consumer_holding_a_batch(&addr, &admin, &p, "work", 5).await;
    let mut other = Consumer::subscribe(ConsumerConfig::new(
        client_config(&addr, "other"),
        "work",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut seqs = Vec::new();
    while seqs.len() < 10 {
        let m = next_message(&mut other, Duration::from_secs(10)).await;
        seqs.push(m.seq());
        other.ack(&m).expect("ack");
    }
    let freed = stopped.elapsed();
    assert!(
        freed >= Duration::from_secs(2) && freed <= Duration::from_secs(4),
        "freed after {freed:?}, stale_disconnect_after 2s"
    );
    other.flush_acks().await.expect("flush");
    assert_eq!(seqs, (6..=15).collect::<Vec<u64>>());
    let g = wait_group(&admin, "work", |g| g.acked_floor == 15).await;
    assert_eq!(g.consumers, 1);
    let log = b.log();
    assert!(log.contains("consumer stale"), "flagged first");
    assert!(log.contains("stale consumer disconnected"));
    assert!(log.contains("automatically"));
    child.signal("-CONT");
}
