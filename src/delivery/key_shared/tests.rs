//! The key_shared rules, tested without actors.

use super::super::{GroupState, Joining, Limits};
use super::*;
use crate::store::record::StoredMessage;
use bytes::Bytes;
use sluice_protocol::{AckOutcome, Batch, GroupMode};
use std::collections::BTreeMap;

const LIMITS: Limits = Limits {
    batch_max_bytes: 4 * 1024 * 1024,
    max_retries: 3,
};

fn c(conn: u64) -> ConsumerId {
    ConsumerId { conn, stream: 1 }
}

fn keyed(seq: u64, key: Option<&str>) -> StoredMessage {
    StoredMessage {
        seq,
        timestamp_ms: 0,
        key: key.map(str::to_string),
        headers: BTreeMap::new(),
        priority: 0,
        payload: Bytes::from_static(b"x"),
    }
}

fn group() -> GroupState {
    GroupState::from_record(GroupState::new_record(
        GroupMode::KeyShared,
        BTreeMap::new(),
    ))
}

fn join(g: &mut GroupState, conn: u64, window: u32, batch_size: u32, credits: u64) {
    g.join(Joining {
        consumer: c(conn),
        mode: GroupMode::KeyShared,
        filters: BTreeMap::new(),
        window,
        batch_size,
        credits,
        max_in_flight_bytes: usize::MAX,
    })
    .unwrap();
}

/// Reads `msgs` (the next seqs of the log) into the group.
fn read(g: &mut GroupState, msgs: Vec<StoredMessage>) {
    let from = g.start_read();
    assert!(g.finish_read(from, Some((msgs, vec![]))));
}

fn next_id() -> u64 {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn form(g: &mut GroupState) -> Vec<(ConsumerId, Batch)> {
    g.form_batches("t", "g", LIMITS, next_id)
        .batches
        .into_iter()
        .map(|o| (o.consumer, o.batch().unwrap()))
        .collect()
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

/// A key whose hash `conn` owns in `g`.
fn key_of(g: &GroupState, conn: u64, skip: usize) -> String {
    let ks = g.ks.as_ref().unwrap();
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| ks.ranges.owner(key_hash(k.as_bytes())) == Some(c(conn)))
        .nth(skip)
        .unwrap()
}

#[test]
fn the_key_hash_is_fnv1a_64_mod_65536() {
    assert_eq!(key_hash(b""), 0x2325);
    assert_eq!(key_hash(b"a"), 60556);
    assert_eq!(key_hash(b"key-1"), 32422);
}

#[test]
fn ranges_split_the_largest_upper_half_and_merge_down_on_leave() {
    let mut r = HashRanges::default();
    r.add(c(1)).unwrap();
    assert_eq!(r.of(c(1)), vec![(0, 65535)]);
    r.add(c(2)).unwrap();
    assert_eq!(r.of(c(1)), vec![(0, 32767)]);
    assert_eq!(r.of(c(2)), vec![(32768, 65535)]);
    // Two ranges of 32,768: the lowest start is split.
    r.add(c(3)).unwrap();
    assert_eq!(r.of(c(1)), vec![(0, 16383)]);
    assert_eq!(r.of(c(3)), vec![(16384, 32767)]);
    r.add(c(4)).unwrap();
    assert_eq!(r.of(c(2)), vec![(32768, 49151)]);
    assert_eq!(r.of(c(4)), vec![(49152, 65535)]);
    // Joining twice changes nothing.
    r.add(c(4)).unwrap();
    assert_eq!(r.all().len(), 4);
    // A middle range merges into the one below it.
    r.remove(c(3));
    assert_eq!(r.of(c(1)), vec![(0, 32767)]);
    // The lowest merges into the one above it.
    r.remove(c(1));
    assert_eq!(r.of(c(2)), vec![(0, 49151)]);
    assert_eq!(r.owner(0), Some(c(2)));
    assert_eq!(r.owner(65535), Some(c(4)));
    r.remove(c(2));
    r.remove(c(4));
    assert_eq!(r.owner(7), None);
}

#[test]
fn every_keyed_message_goes_to_its_hash_owner_and_unkeyed_ones_round_robin() {
    let mut g = group();
    for conn in 1..=3 {
        join(&mut g, conn, 100, 5, 1000);
    }
    read(
        &mut g,
        (1..=150)
            .map(|s| keyed(s, Some(&format!("key-{}", s % 40))))
            .collect(),
    );
    let mut n = 0;
    for (consumer, b) in form(&mut g) {
        for m in &b.messages {
            n += 1;
            let k = m.key.as_ref().unwrap();
            let owner = g.ks.as_ref().unwrap().ranges.owner(key_hash(k.as_bytes()));
            assert_eq!(owner, Some(consumer));
        }
        g.ack(consumer.conn, b.batch_id, None);
    }
    assert_eq!(n, 150);
    // Without keys: one batch each in turn, as in shared.
    g.offer_tail(
        &(151..=300)
            .map(|s| Arc::new(keyed(s, None)))
            .collect::<Vec<_>>(),
    );
    let mut unkeyed: BTreeMap<ConsumerId, usize> = BTreeMap::new();
    for (consumer, b) in form(&mut g) {
        *unkeyed.entry(consumer).or_default() += b.messages.len();
    }
    assert_eq!(
        unkeyed.values().copied().collect::<Vec<_>>(),
        vec![50, 50, 50]
    );
    let stats = g.stats("t", "g", 300);
    let ranges: Vec<_> = stats
        .consumer_details
        .iter()
        .map(|d| d.hash_ranges.clone())
        .collect();
    assert_eq!(
        ranges,
        vec![vec![(0, 16383)], vec![(32768, 65535)], vec![(16384, 32767)]]
    );
}

#[test]
fn a_key_moved_by_a_join_waits_until_the_old_owner_acks_its_messages() {
    let mut g = group();
    join(&mut g, 1, 10, 2, 1000);
    // A key that consumer 2 will own once it joins (upper half).
    let k = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| key_hash(k.as_bytes()) >= 32768)
        .unwrap();
    read(&mut g, (1..=2).map(|s| keyed(s, Some(&k))).collect());
    let first = form(&mut g);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, c(1));
    assert_eq!(seqs(&first[0].1), vec![1, 2]);
    join(&mut g, 2, 10, 2, 1000);
    g.offer_tail(
        &(3..=4)
            .map(|s| Arc::new(keyed(s, Some(&k))))
            .collect::<Vec<_>>(),
    );
    assert!(form(&mut g).is_empty(), "k still in flight to consumer 1");
    // Acking one of two is not enough.
    let s = g.ack(1, first[0].1.batch_id, Some(vec![1]));
    assert_eq!(s.outcome, AckOutcome::Settled);
    assert!(form(&mut g).is_empty());
    assert_eq!(g.key_shared_holder(key_hash(k.as_bytes())), Some(c(1)));
    g.ack(1, first[0].1.batch_id, None);
    assert_eq!(g.key_shared_holder(key_hash(k.as_bytes())), None);
    let next = form(&mut g);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, c(2));
    assert_eq!(seqs(&next[0].1), vec![3, 4]);
}

#[test]
fn a_key_moved_by_a_leave_goes_to_the_new_owner_in_order_retries_first() {
    let mut g = group();
    join(&mut g, 1, 10, 2, 1000);
    join(&mut g, 2, 10, 2, 1000);
    let k = key_of(&g, 2, 0);
    read(&mut g, (1..=4).map(|s| keyed(s, Some(&k))).collect());
    let b = form(&mut g);
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|(who, _)| *who == c(2)));
    g.offer_tail(
        &(5..=6)
            .map(|s| Arc::new(keyed(s, Some(&k))))
            .collect::<Vec<_>>(),
    );
    // Consumer 2 leaves with both batches: they return, and the key is consumer 1's.
    let (batches, _) = g.leave(c(2));
    assert_eq!(batches.len(), 2);
    for bid in batches {
        g.fail_batch(bid, false, 3).unwrap();
    }
    let mut got = Vec::new();
    for (who, b) in form(&mut g) {
        assert_eq!(who, c(1));
        got.extend(seqs(&b));
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_nacked_message_goes_before_later_ones_of_its_key() {
    let mut g = group();
    join(&mut g, 1, 1, 2, 1000);
    let k = key_of(&g, 1, 0);
    read(&mut g, (1..=4).map(|s| keyed(s, Some(&k))).collect());
    let b = form(&mut g);
    assert_eq!(seqs(&b[0].1), vec![1, 2]);
    let s = g.nack(1, b[0].1.batch_id, Some(vec![2]), false, 3);
    assert_eq!(s.count, 1);
    g.ack(1, b[0].1.batch_id, Some(vec![1]));
    let b = form(&mut g);
    assert_eq!(seqs(&b[0].1), vec![2, 3]);
}

#[test]
fn a_blocked_consumer_does_not_stop_the_others_its_keys_are_parked_and_replayed_in_order() {
    let mut g = group();
    // Consumer 1 has no credits: it can take nothing.
    join(&mut g, 1, 4, 10, 0);
    join(&mut g, 2, 4, 10, 1_000_000);
    let k1 = key_of(&g, 1, 0);
    let k2 = key_of(&g, 2, 0);
    // The log: 1..=1000 all k1, then 1001..=2000 alternating k1 / k2.
    let log: Vec<StoredMessage> = (1..=2000)
        .map(|s| {
            if s <= 1000 || s % 2 == 1 {
                keyed(s, Some(&k1))
            } else {
                keyed(s, Some(&k2))
            }
        })
        .collect();
    let read_from = |g: &mut GroupState| {
        let from = g.start_read();
        let msgs: Vec<StoredMessage> = log
            .iter()
            .filter(|m| m.seq >= from)
            .take(READ_AHEAD / 2)
            .cloned()
            .collect();
        assert!(g.finish_read(from, Some((msgs, vec![]))));
        from
    };
    let head = 2000;
    // Serves (acking at once) and reads until nothing moves; what each consumer got.
    let run = |g: &mut GroupState| {
        let mut got: BTreeMap<ConsumerId, Vec<u64>> = BTreeMap::new();
        for _ in 0..1000 {
            let formed = form(g);
            let idle = formed.is_empty();
            for (who, b) in formed {
                got.entry(who).or_default().extend(seqs(&b));
                g.ack(who.conn, b.batch_id, None);
            }
            if g.wants_read(head) {
                read_from(g);
            } else if idle {
                break;
            }
        }
        got
    };
    let got = run(&mut g);
    let expect: Vec<u64> = (1002..=2000).step_by(2).collect();
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![c(2)]);
    assert_eq!(got[&c(2)], expect, "consumer 2 got all of its messages");
    let (parked, parks) = g.key_shared_parking();
    assert_eq!(parked, 1);
    assert!(parks >= 1);
    assert!(g.ready.len() <= READ_AHEAD, "buffer {}", g.ready.len());
    // Consumer 1 gets credits: its key is replayed from the log, in order, and unparked.
    g.grant(c(1), 1_000_000);
    let got = run(&mut g);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![c(1)]);
    let to_1 = &got[&c(1)];
    let expect: Vec<u64> = (1..=1000).chain((1001..=2000).step_by(2)).collect();
    assert_eq!(*to_1, expect);
    assert_eq!(g.key_shared_parking().0, 0, "unparked");
    assert_eq!(g.floor(), 2000);
}

#[test]
fn a_key_is_never_in_flight_to_two_consumers() {
    // Random joins, leaves, acks and returns: each hash's messages in flight are with one
    // consumer, and each consumer receives a key's messages in seq order.
    let mut g = group();
    let mut rng = 7u64;
    let mut rand = move |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let mut present: Vec<u64> = vec![];
    let mut next_conn = 1;
    let mut seq = 0u64;
    let mut in_flight: Vec<(u64, Batch)> = vec![];
    let mut last_seen: BTreeMap<(u64, String), u64> = BTreeMap::new();
    let mut delivered_first: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..3000 {
        match rand(10) {
            0 if present.len() < 5 => {
                join(&mut g, next_conn, 3, 3, 1_000_000);
                present.push(next_conn);
                next_conn += 1;
            }
            1 if present.len() > 1 => {
                let who = present.remove(rand(present.len() as u64) as usize);
                let (batches, _) = g.leave(c(who));
                for b in batches {
                    g.fail_batch(b, false, 100);
                }
                in_flight.retain(|(w, _)| *w != who);
            }
            2..=4 => {
                let n = 1 + rand(10);
                let msgs: Vec<Arc<StoredMessage>> = (0..n)
                    .map(|_| {
                        seq += 1;
                        Arc::new(keyed(seq, Some(&format!("k{}", rand(20)))))
                    })
                    .collect();
                g.offer_tail(&msgs);
            }
            5 | 6 if !in_flight.is_empty() => {
                let (who, b) = in_flight.remove(rand(in_flight.len() as u64) as usize);
                if rand(4) == 0 {
                    g.nack(who, b.batch_id, None, false, 100);
                } else {
                    g.ack(who, b.batch_id, None);
                }
            }
            _ => {}
        }
        for (who, b) in form(&mut g) {
            for m in &b.messages {
                let k = m.key.clone().unwrap();
                // In order per consumer, a seq received again (a redelivery) aside.
                let last = last_seen.entry((who.conn, k.clone())).or_insert(0);
                assert!(
                    m.seq >= *last || m.attempt > 1,
                    "{k}: {} after {last}",
                    m.seq
                );
                *last = (*last).max(m.seq);
                let first = delivered_first.entry(k).or_insert(0);
                if m.attempt == 1 {
                    assert!(m.seq > *first);
                    *first = m.seq;
                }
            }
            in_flight.push((who.conn, b));
        }
        // Each hash in flight is with one consumer.
        let mut holder: BTreeMap<u16, u64> = BTreeMap::new();
        for (who, b) in &in_flight {
            for m in &b.messages {
                let h = key_hash(m.key.as_ref().unwrap().as_bytes());
                assert_eq!(
                    *holder.entry(h).or_insert(*who),
                    *who,
                    "hash {h} on two consumers"
                );
            }
        }
    }
    assert!(seq > 1000);
}

/// Serves (acking at once, as `acks(conn)` says) and reads from `log` until nothing moves;
/// what each consumer got.
fn serve(
    g: &mut GroupState,
    log: &[StoredMessage],
    acks: impl Fn(u64) -> bool,
) -> BTreeMap<ConsumerId, Vec<u64>> {
    let head = log.last().map_or(0, |m| m.seq);
    let mut got: BTreeMap<ConsumerId, Vec<u64>> = BTreeMap::new();
    for _ in 0..100_000 {
        let formed = form(g);
        let idle = formed.is_empty();
        for (who, b) in formed {
            got.entry(who).or_default().extend(seqs(&b));
            if acks(who.conn) {
                g.ack(who.conn, b.batch_id, None);
            }
        }
        if g.wants_read(head) {
            let from = g.start_read();
            let msgs: Vec<StoredMessage> = log
                .iter()
                .filter(|m| m.seq >= from)
                .take(READ_AHEAD / 2)
                .cloned()
                .collect();
            assert!(g.finish_read(from, Some((msgs, vec![]))));
        } else if idle {
            break;
        }
    }
    got
}

#[test]
fn at_the_cursors_range_bound_the_first_hole_still_goes_out_so_nothing_deadlocks() {
    let mut g = group();
    join(&mut g, 1, 4, 10, 1_000_000);
    join(&mut g, 2, 4, 10, 1_000_000);
    let k1 = key_of(&g, 1, 0);
    let k2 = key_of(&g, 2, 0);
    // Alternating keys: consumer 1 does not ack, consumer 2 does, so every message of k1 is a
    // hole in the cursor once consumer 2 acked past it.
    let n = 3 * super::super::MAX_ACK_RANGES as u64;
    let log: Vec<StoredMessage> = (1..=n)
        .map(|s| keyed(s, Some(if s % 2 == 1 { &k1 } else { &k2 })))
        .collect();
    let got = serve(&mut g, &log, |conn| conn == 2);
    // Consumer 2 ran ahead until the cursor held MAX_ACK_RANGES holes (plus what was in
    // flight), no further.
    let to_2 = got[&c(2)].len();
    assert!(to_2 >= super::super::MAX_ACK_RANGES, "{to_2}");
    assert!(to_2 < super::super::MAX_ACK_RANGES + 200, "{to_2}");
    assert_eq!(
        got[&c(1)],
        vec![
            1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45,
            47, 49, 51, 53, 55, 57, 59, 61, 63, 65, 67, 69, 71, 73, 75, 77, 79
        ]
    );
    // Consumer 1 leaves with its batches: its key goes to consumer 2, whose messages of k1 are
    // first-hole messages (replayed from the log if parked): everything gets done.
    let (batches, _) = g.leave(c(1));
    for b in batches {
        g.fail_batch(b, false, 3);
    }
    let got = serve(&mut g, &log, |_| true);
    let mut all: Vec<u64> = got[&c(2)].clone();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len() as u64 + to_2 as u64,
        n,
        "every message delivered once more"
    );
    assert_eq!(g.floor(), n);
}
