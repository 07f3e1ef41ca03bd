//! `key_shared` groups end to end: 3 consumers, 30,000 messages over 1,000 keys (20 of them
//! hot), one consumer's connection dropped mid-run (RST, with batches unacked) and another
//! joining later.
//!
//! What "in order" means here, with redeliveries: (a) group-wide, the *first* delivery of each
//! message of a key (to any consumer) comes after the first delivery of every earlier message
//! of that key; (b) per consumer, the messages of a key it receives, leaving out those it had
//! received before (a redelivery to the same consumer), come in seq order. "No key on two
//! consumers at once": for each key and consumer, the interval from its first receipt of the
//! key to its last ack of a message of the key (or the moment its connection was dropped) never
//! overlaps another consumer's interval for that key. (Receipts are stamped when read, acks
//! before they are sent, from one clock: see `mode_consumer`.)
mod common;
mod mode_consumer;

use bytes::Bytes;
use common::*;
use mode_consumer::*;
use sluice_sdk::{GroupMode, NewMessage, Producer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const N: u64 = 30_000;
const KEYS: u64 = 1_000;
const TOPIC: &str = "ks";
const GROUP: &str = "g";

/// The broker's key hash (FNV-1a 64 of the key, `% 65536`).
fn hash(key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 65536) as u32
}

/// 20 hot keys: 10 whose hash is in `[40960, 65535]` (b's range, then c's once b is dropped,
/// then d's once d joins) and 10 others.
fn hot_keys() -> Vec<String> {
    let all = (0..KEYS).map(|i| format!("key-{i}"));
    let moving = all.clone().filter(|k| hash(k) >= 40960).take(10);
    let other = all.filter(|k| hash(k) < 40960).take(10);
    moving.chain(other).collect()
}

/// Every even seq has one of the 1,000 keys in turn; every odd one one of the 20 hot keys in
/// turn: a hot key that moves has messages both in flight to its old owner and waiting for the
/// new one.
fn key_of(seq: u64, hot: &[String]) -> String {
    if seq % 2 == 1 {
        hot[((seq / 2) % 20) as usize].clone()
    } else {
        format!("key-{}", (seq / 2) % KEYS)
    }
}

fn plan(name: &str) -> Plan {
    let mut p = Plan::new(name, TOPIC, GROUP, GroupMode::KeyShared);
    p.window = 4;
    p.batch = 50;
    // Each batch is held a moment before its ack: when a key moves, its old owner still holds
    // some of its messages.
    p.ack_delay = Duration::from_millis(3);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_in_order_and_on_one_consumer_across_a_kill_and_a_join() {
    let b = TestBroker::start_with(&["--batch-timeout", "60s"]);
    let addr = b.addr();
    let shared = Arc::new(Shared::default());
    let hot = hot_keys();
    // All published first: a backlog, so that every move happens with messages of the keys
    // moved both in flight to their old owner and waiting for the new one.
    let producer = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    for chunk in 0..N / 1000 {
        let msgs = (chunk * 1000 + 1..=(chunk + 1) * 1000)
            .map(|seq| NewMessage {
                id: None,
                key: Some(key_of(seq, &hot)),
                headers: Default::default(),
                priority: 0,
                payload: Bytes::from(seq.to_string()),
            })
            .collect();
        producer.publish_batch(TOPIC, msgs).await.expect("publish");
    }
    let mut tasks = Vec::new();
    // Joined one by one, so the ranges are known: a [0, 16383], c [16384, 32767],
    // b [32768, 65535]; b is dropped once 10,000 are settled (its range merges into c's), and
    // d joins once 20,000 are (it takes the upper half of c's, [40960, 65535]).
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let mut p = plan(name);
        if *name == "b" {
            p.kill_at = Some(10_000);
        }
        if *name == "c" {
            // c holds its batches longer: when d joins, c surely holds messages of the keys
            // that move to d, and d must wait for c's acks.
            p.ack_delay = Duration::from_millis(20);
        }
        tasks.push(tokio::spawn(run(addr.clone(), p, shared.clone())));
        wait_consumers(&addr, TOPIC, GROUP, i as u32 + 1).await;
    }
    let s = shared.clone();
    wait_for(Duration::from_secs(60), "20,000 settled", || {
        s.settled() >= 20_000
    })
    .await;
    assert_eq!(shared.journal().kills.len(), 1, "b was dropped");
    tasks.push(tokio::spawn(run(addr.clone(), plan("d"), shared.clone())));
    let s = shared.clone();
    wait_for(Duration::from_secs(90), "30,000 settled", || {
        s.settled() >= N
    })
    .await;
    let stats = group_stats(&addr, TOPIC, GROUP).await;
    let conns = [
        ("a", conn_id(&addr, "a").await),
        ("c", conn_id(&addr, "c").await),
        ("d", conn_id(&addr, "d").await),
    ];
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.expect("consumer");
    }

    // Every message acked exactly once, and nothing else.
    assert_eq!(shared.settled(), N);
    assert_eq!((stats.acked_floor, stats.lag), (N, 0), "{stats:?}");
    let j = shared.journal();
    let mut acked: Vec<u64> = j.acks.iter().flat_map(|a| a.seqs.clone()).collect();
    acked.sort_unstable();
    assert_eq!(acked, (1..=N).collect::<Vec<_>>());
    for r in &j.receipts {
        assert_eq!(
            r.key.as_deref(),
            Some(key_of(r.seq, &hot).as_str()),
            "{r:?}"
        );
    }

    // Only what b held unacked when it was dropped was delivered again, once, elsewhere.
    let b_got: BTreeSet<u64> = j
        .receipts
        .iter()
        .filter(|r| r.who == "b")
        .map(|r| r.seq)
        .collect();
    let b_acked: BTreeSet<u64> = j
        .acks
        .iter()
        .filter(|a| a.who == "b")
        .flat_map(|a| a.seqs.clone())
        .collect();
    let b_held: BTreeSet<u64> = b_got.difference(&b_acked).copied().collect();
    assert!(!b_held.is_empty(), "b held batches when dropped");
    let again: Vec<&Receipt> = j.receipts.iter().filter(|r| r.attempt > 1).collect();
    assert_eq!(
        again.iter().map(|r| r.seq).collect::<BTreeSet<_>>(),
        b_held,
        "redelivered = what b held"
    );
    assert_eq!(again.len(), b_held.len());
    assert!(again.iter().all(|r| r.who != "b" && r.attempt == 2));
    assert_eq!(j.receipts.len() as u64, N + b_held.len() as u64);

    // Per key, in receipt order.
    let mut by_key: BTreeMap<String, Vec<&Receipt>> = BTreeMap::new();
    let mut receipts: Vec<&Receipt> = j.receipts.iter().collect();
    receipts.sort_by_key(|r| r.at);
    for r in receipts {
        by_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(r);
    }
    assert_eq!(by_key.len() as u64, KEYS);
    let kill_at: BTreeMap<&str, u64> = j.kills.iter().map(|(w, at)| (w.as_str(), *at)).collect();
    let mut acks_of: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for a in &j.acks {
        for s in &a.seqs {
            let e = acks_of
                .entry((key_of(*s, &hot), a.who.as_str()))
                .or_default();
            *e = (*e).max(a.at);
        }
    }
    // Keys that went from b to c (b dropped), and from c to d (d joined). (With the backlog,
    // keys that a took before b and c joined moved then too.)
    let mut moved_by_kill = BTreeSet::new();
    let mut moved_by_join = BTreeSet::new();
    for (key, rs) in &by_key {
        // (a) First deliveries in seq order.
        let mut seen = BTreeSet::new();
        let mut last_first = 0;
        for r in rs {
            if seen.insert(r.seq) {
                assert!(
                    r.seq > last_first,
                    "{key}: {} first delivered after {last_first}",
                    r.seq
                );
                last_first = r.seq;
            }
        }
        // (b) Per consumer, leaving out what it had received before.
        let mut per: BTreeMap<&str, (BTreeSet<u64>, u64, u64)> = BTreeMap::new();
        for r in rs {
            let (got, last, _) = per
                .entry(r.who.as_str())
                .or_insert((BTreeSet::new(), 0, r.at));
            if got.insert(r.seq) {
                assert!(
                    r.seq > *last,
                    "{key}: {} got {} after {}",
                    r.who,
                    r.seq,
                    last
                );
                *last = r.seq;
            }
        }
        // No key on two consumers at once.
        let mut intervals: Vec<(u64, u64, &str)> = per
            .iter()
            .map(|(who, (_, _, start))| {
                let last_ack = acks_of.get(&(key.clone(), *who)).copied().unwrap_or(0);
                let end = last_ack.max(kill_at.get(who).copied().unwrap_or(0));
                (*start, end, *who)
            })
            .collect();
        intervals.sort_unstable();
        for w in intervals.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "{key} on {} and {} at once: {intervals:?}",
                w[0].2,
                w[1].2
            );
        }
        let owners: Vec<&str> = intervals.iter().map(|i| i.2).collect();
        if owners.windows(2).any(|w| w == ["b", "c"]) {
            moved_by_kill.insert(key.clone());
        }
        if owners.windows(2).any(|w| w == ["c", "d"]) {
            moved_by_join.insert(key.clone());
        }
    }
    // Both moves happened, the hot keys of b's upper half among them.
    for k in &hot[..10] {
        assert!(
            moved_by_kill.contains(k) && moved_by_join.contains(k),
            "{k} went b → c → d"
        );
    }

    // The ranges: b's merged into c's, then d took the upper half of c's.
    let ranges: BTreeMap<u64, Vec<(u32, u32)>> = stats
        .consumer_details
        .iter()
        .map(|d| (d.conn_id, d.hash_ranges.clone()))
        .collect();
    let expect: BTreeMap<u64, Vec<(u32, u32)>> = conns
        .iter()
        .zip([vec![(0, 16383)], vec![(16384, 40959)], vec![(40960, 65535)]])
        .map(|((_, id), r)| (*id, r))
        .collect();
    assert_eq!(ranges, expect, "{:?}", conns);
}
