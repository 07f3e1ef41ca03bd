//! kill -9 of the broker during a 100,000-message publish+consume run loses no acknowledged publish.
mod common;
use bytes::Bytes;
use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use sluice_sdk::{Consumer, ConsumerConfig, NewMessage, Producer};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const N: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_9_loses_no_acknowledged_publish() {
    let mut b = TestBroker::start();
    let addr = b.addr();
    let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let confirmed = Arc::new(AtomicUsize::new(0));

    // Producer: payload = its index; records every index the broker confirmed.
    let producer = {
        let (acked, confirmed, addr) = (acked.clone(), confirmed.clone(), addr.clone());
        tokio::spawn(async move {
            let Ok(p) = Producer::connect(client_config(&addr, "producer")).await else {
                return;
            };
            let mut futs = FuturesUnordered::new();
            for i in 0..N as u64 {
                let p2 = &p;
                futs.push(async move {
                    (
                        i,
                        p2.publish(
                            "crash",
                            NewMessage {
                                payload: Bytes::from(i.to_string()),
                                ..Default::default()
                            },
                        )
                        .await,
                    )
                });
                if futs.len() >= 1000 {
                    if let Some((i, r)) = futs.next().await {
                        if r.is_ok() {
                            acked.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
                            confirmed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            while let Some((i, r)) = futs.next().await {
                if r.is_ok() {
                    acked.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Consumer: acks everything it sees.
    let received: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let consumer = {
        let (received, addr) = (received.clone(), addr.clone());
        tokio::spawn(async move {
            let Ok(mut c) = Consumer::subscribe(
                ConsumerConfig::new(client_config(&addr, "c1"), "crash", "g")
                    .max_reconnect_attempts(0),
            )
            .await
            else {
                return;
            };
            while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), c.next()).await
            {
                if let Some(i) = std::str::from_utf8(m.payload())
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    received.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
                }
                let _ = c.ack(&m);
            }
        })
    };
    // Kill the broker mid-run.
    assert!(
        eventually(Duration::from_secs(60), || confirmed
            .load(Ordering::Relaxed)
            >= 30_000)
        .await,
        "publishing too slow"
    );
    b.kill();
    let before_kill = confirmed.load(Ordering::Relaxed);
    producer.abort();
    consumer.abort();
    let _ = producer.await;
    let _ = consumer.await;
    let acked: HashSet<u64> = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(acked.len() >= before_kill);

    b.restart();
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c2"),
        "crash",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut seen = HashSet::new();
    let mut deliveries = 0usize;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), c.next()).await {
        deliveries += 1;
        let idx: u64 = std::str::from_utf8(m.payload())
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("index payload");
        seen.insert(idx);
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("flush");
    let before: HashSet<u64> = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let lost: Vec<&u64> = acked
        .iter()
        .filter(|i| !seen.contains(i) && !before.contains(i))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged publishes never delivered, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    // Duplicates: delivered before the kill and again after it (their acks were not yet durable).
    let dups = before.intersection(&seen).count();
    // One consumer window is 4 batches x 16 messages; its acks are pipelined (a batch's window
    // slot frees when its ack arrives, the cursor becomes durable one group commit later), so up
    // to a few windows' worth can be delivered twice.
    let window = 4 * 16;
    eprintln!("acked publishes {}, consumed before kill {}, after {} ({deliveries} deliveries), duplicates {dups}", acked.len(), before.len(), seen.len());
    assert!(
        dups <= 4 * window,
        "{dups} duplicates exceed the in-flight windows ({window} per consumer)"
    );
}

/// Big messages are stored by the sync thread with direct I/O (their chunk's middle is written
/// after the rest): a kill -9 mid-run still loses no acknowledged publish, and every message
/// served after the restart is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_9_loses_no_acknowledged_big_message() {
    const LEN: usize = 600 * 1024;
    let mut b = TestBroker::start();
    let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let producer = {
        let (acked, addr) = (acked.clone(), b.addr());
        tokio::spawn(async move {
            let Ok(p) = Producer::connect(client_config(&addr, "big-producer")).await else {
                return;
            };
            let mut futs = FuturesUnordered::new();
            for i in 0..10_000u64 {
                let p2 = &p;
                futs.push(async move {
                    let message = NewMessage {
                        payload: big_payload(i, LEN),
                        ..Default::default()
                    };
                    (i, p2.publish("crash-big", message).await)
                });
                if futs.len() >= 16 {
                    if let Some((i, Ok(_))) = futs.next().await {
                        acked.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
                    }
                }
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(60), || acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
            >= 150)
        .await,
        "publishing too slow"
    );
    b.kill();
    producer.abort();
    let _ = producer.await;
    let acked: HashSet<u64> = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();

    b.restart();
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "big-consumer"),
        "crash-big",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut seen = HashSet::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), c.next()).await {
        seen.insert(check_big_payload(m.payload(), m.seq()));
        c.ack(&m).expect("ack");
    }
    let lost: Vec<&u64> = acked.iter().filter(|i| !seen.contains(i)).collect();
    eprintln!("acked {}, served after restart {}", acked.len(), seen.len());
    assert!(
        lost.is_empty(),
        "{} acknowledged big publishes lost, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
}
