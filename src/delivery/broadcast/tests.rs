//! The broadcast rules, tested without actors.

use super::super::{GroupState, Joining, Limits};
use super::*;
use bytes::Bytes;
use sluice_protocol::{AckOutcome, Batch, GroupMode};
use std::collections::BTreeMap;

const LIMITS: Limits = Limits {
    batch_max_bytes: 4 * 1024 * 1024,
    max_retries: 1,
};

fn c(conn: u64) -> ConsumerId {
    ConsumerId { conn, stream: 1 }
}

fn msg(seq: u64) -> StoredMessage {
    StoredMessage {
        seq,
        timestamp_ms: 0,
        key: None,
        headers: BTreeMap::new(),
        priority: 0,
        payload: Bytes::from_static(b"x"),
    }
}

fn group() -> GroupState {
    GroupState::from_record(GroupState::new_record(
        GroupMode::Broadcast,
        BTreeMap::new(),
    ))
}

fn join(g: &mut GroupState, conn: u64) {
    g.join(Joining {
        consumer: c(conn),
        mode: GroupMode::Broadcast,
        filters: BTreeMap::new(),
        window: 100,
        batch_size: 10,
        credits: 1_000_000,
        max_in_flight_bytes: usize::MAX,
    })
    .unwrap();
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

/// Reads the log from where the group wants, up to `head`; returns the read's start.
fn read(g: &mut GroupState, head: u64) -> u64 {
    let from = g.start_read();
    let msgs = (from..=head).take(READ_AHEAD / 2).map(msg).collect();
    assert!(g.finish_read(from, Some((msgs, vec![]))));
    from
}

fn seqs_of(batches: &[(ConsumerId, Batch)], who: ConsumerId) -> Vec<u64> {
    batches
        .iter()
        .filter(|(w, _)| *w == who)
        .flat_map(|(_, b)| b.messages.iter().map(|m| m.seq))
        .collect()
}

#[test]
fn every_member_gets_every_message_from_one_read() {
    let mut g = group();
    for conn in 1..=3 {
        join(&mut g, conn);
    }
    assert!(g.wants_read(20));
    assert_eq!(read(&mut g, 20), 1);
    assert!(!g.wants_read(20), "one read served all three");
    let b = form(&mut g);
    for conn in 1..=3 {
        assert_eq!(seqs_of(&b, c(conn)), (1..=20).collect::<Vec<_>>());
    }
    // The members share each message: one allocation each, whatever the member count.
    let m0 = &g.bc.as_ref().unwrap().members;
    let a = &m0[0].1.in_flight.values().next().unwrap().msgs;
    let (seq, p) = a.iter().next().unwrap();
    let b2 = m0[1]
        .1
        .in_flight
        .values()
        .find_map(|b| b.msgs.get(seq))
        .unwrap();
    assert!(Arc::ptr_eq(&p.msg, &b2.msg));
}

#[test]
fn a_message_is_settled_for_the_group_once_every_member_acked_it() {
    let mut g = group();
    join(&mut g, 1);
    join(&mut g, 2);
    g.offer_tail(&(1..=10).map(|s| Arc::new(msg(s))).collect::<Vec<_>>());
    let b = form(&mut g);
    let of = |who: u64| b.iter().find(|(w, _)| *w == c(who)).unwrap().1.batch_id;
    let s = g.ack(1, of(1), None);
    assert_eq!((s.outcome, s.count), (AckOutcome::Settled, 10));
    assert_eq!(g.floor(), 0, "member 2 has not acked");
    assert!(g.take_dirty_record().is_none(), "nothing new for the group");
    // Member 1 cannot ack member 2's batch.
    let s = g.ack(1, of(2), None);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    let s = g.ack(2, of(2), Some(vec![1, 2, 3, 7]));
    assert_eq!(s.count, 4);
    assert_eq!(g.floor(), 3);
    let rec = g.take_dirty_record().unwrap();
    assert_eq!((rec.acked_floor, rec.acked_ranges), (3, vec![(7, 7)]));
    let stats = g.stats("t", "g", 10);
    assert_eq!(stats.consumers, 2);
    assert_eq!(stats.lag, 6);
    let lags: Vec<u64> = stats.consumer_details.iter().map(|d| d.lag).collect();
    assert_eq!(lags, vec![0, 6]);
}

#[test]
fn only_the_failing_members_copies_are_redelivered_and_dead_lettered() {
    let mut g = group();
    join(&mut g, 1);
    join(&mut g, 2);
    g.offer_tail(&(1..=5).map(|s| Arc::new(msg(s))).collect::<Vec<_>>());
    let b = form(&mut g);
    let of = |b: &[(ConsumerId, Batch)], who: u64| {
        b.iter().find(|(w, _)| *w == c(who)).unwrap().1.batch_id
    };
    g.ack(1, of(&b, 1), None);
    // Member 2 times out: only its copies come back.
    let dead = g.fail_batch(of(&b, 2), true, LIMITS.max_retries).unwrap();
    assert!(dead.is_empty());
    let again = form(&mut g);
    assert_eq!(seqs_of(&again, c(1)), Vec::<u64>::new());
    assert_eq!(seqs_of(&again, c(2)), vec![1, 2, 3, 4, 5]);
    assert!(again[0].1.messages.iter().all(|m| m.attempt == 2));
    // Its second failure passes max_retries = 1: dead letters of member 2.
    let dead = g
        .fail_batch(again[0].1.batch_id, true, LIMITS.max_retries)
        .unwrap();
    assert_eq!(dead.len(), 5);
    assert!(dead.iter().all(|p| p.member == Some(c(2))));
    assert_eq!(g.floor(), 0);
    g.dead_lettered(dead, true);
    assert_eq!(
        g.floor(),
        5,
        "dead-lettered for member 2, acked by member 1"
    );
    let stats = g.stats("t", "g", 5);
    assert_eq!((stats.dead_letters, stats.redeliveries), (5, 5));
}

#[test]
fn a_member_leaving_settles_what_only_it_held_and_a_later_member_starts_at_the_floor() {
    let mut g = group();
    join(&mut g, 1);
    join(&mut g, 2);
    g.offer_tail(&(1..=10).map(|s| Arc::new(msg(s))).collect::<Vec<_>>());
    let b = form(&mut g);
    let of = |who: u64| b.iter().find(|(w, _)| *w == c(who)).unwrap().1.batch_id;
    g.ack(1, of(1), Some((1..=8).collect()));
    assert_eq!(g.floor(), 0);
    let (batches, promoted) = g.leave(c(2));
    assert_eq!((batches, promoted), (vec![of(2)], None));
    assert!(
        g.fail_batch(of(2), false, 1).is_none(),
        "its copies are moot"
    );
    assert_eq!(g.floor(), 8);
    assert!(g.take_dirty_record().is_some());
    // A member joining now starts at the group's floor: 9 and 10 only.
    join(&mut g, 3);
    assert_eq!(read(&mut g, 10), 9);
    let b = form(&mut g);
    assert_eq!(seqs_of(&b, c(3)), vec![9, 10]);
    // The last member leaving with 9 and 10 unacked leaves them unsettled for the next one.
    g.ack(3, b[0].1.batch_id, None);
    g.leave(c(1));
    assert_eq!(g.floor(), 10, "member 3 acked 9 and 10, member 1 left");
    g.offer_tail(&[Arc::new(msg(11))]);
    let b = form(&mut g);
    g.leave(c(3));
    assert_eq!(b.len(), 1);
    assert_eq!(g.floor(), 10);
    join(&mut g, 4);
    assert_eq!(read(&mut g, 11), 11);
    assert_eq!(seqs_of(&form(&mut g), c(4)), vec![11]);
}

#[test]
fn members_at_different_positions_read_what_they_need() {
    let mut g = group();
    join(&mut g, 1);
    read(&mut g, 100);
    let b = form(&mut g);
    for (_, b) in &b {
        g.ack(1, b.batch_id, None);
    }
    assert_eq!(g.floor(), 100);
    // Member 1 is at 101; member 2 joins at the group's floor (100) too.
    join(&mut g, 2);
    assert!(g.wants_read(150));
    assert_eq!(read(&mut g, 150), 101);
    let b = form(&mut g);
    assert_eq!(seqs_of(&b, c(1)), (101..=150).collect::<Vec<_>>());
    assert_eq!(seqs_of(&b, c(2)), (101..=150).collect::<Vec<_>>());
}

#[test]
fn every_member_gets_every_field_of_each_message_and_its_own_attempts() {
    // A message with every field set, from the tail and from a read.
    let full = |seq: u64| StoredMessage {
        seq,
        timestamp_ms: 1_700_000_000_000 + seq,
        key: Some(format!("key-{seq}")),
        headers: [
            ("a".to_string(), "1".to_string()),
            ("b".into(), "x".repeat(40)),
        ]
        .into_iter()
        .collect(),
        priority: 3,
        payload: Bytes::from(vec![seq as u8; 300]),
    };
    let want = |seq: u64, attempt: u32| {
        let m = full(seq);
        sluice_protocol::DeliveredMessage {
            seq,
            timestamp_ms: m.timestamp_ms,
            key: m.key,
            headers: m.headers,
            priority: m.priority,
            attempt,
            payload: m.payload,
        }
    };
    let mut g = group();
    join(&mut g, 1);
    join(&mut g, 2);
    g.offer_tail(&[Arc::new(full(1)), Arc::new(full(2))]);
    let from = g.start_read();
    assert!(g.finish_read(from, Some((vec![full(3)], vec![]))));
    let b = form(&mut g);
    for who in [1, 2] {
        let got: Vec<_> = b
            .iter()
            .filter(|(w, _)| *w == c(who))
            .flat_map(|(_, b)| b.messages.clone())
            .collect();
        assert_eq!(
            got,
            vec![want(1, 1), want(2, 1), want(3, 1)],
            "member {who}"
        );
    }
    // Member 1 nacks: its redelivery says attempt 2; member 2's copy is not redelivered.
    let mine = b.iter().find(|(w, _)| *w == c(1)).unwrap().1.batch_id;
    g.nack(1, mine, Some(vec![2]), false, 5);
    let b = form(&mut g);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].0, b[0].1.messages.clone()), (c(1), vec![want(2, 2)]));
}

/// Not a test: the delivery work of one broadcast group of 4 against 4 groups of 1 (tail
/// offered, batches formed and encoded, every batch acked), timed. `cargo test --release --lib
/// delivery_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn delivery_cost_broadcast_against_groups() {
    let payload = Bytes::from(vec![7u8; 256]);
    let chunk = |from: u64, n: u64| -> Vec<Arc<StoredMessage>> {
        (from..from + n)
            .map(|seq| {
                Arc::new(StoredMessage {
                    seq,
                    timestamp_ms: 1_700_000_000_000,
                    key: None,
                    headers: BTreeMap::new(),
                    priority: 0,
                    payload: payload.clone(),
                })
            })
            .collect()
    };
    let run = |groups: &mut Vec<GroupState>, conns: &[Vec<u64>]| {
        let t = std::time::Instant::now();
        let (n, per) = (200_000u64, 400u64);
        let mut seq = 1;
        while seq <= n {
            let msgs = chunk(seq, per);
            seq += per;
            for (g, conns) in groups.iter_mut().zip(conns) {
                g.offer_tail(&msgs);
                let b = g.form_batches("topic", "group", LIMITS, next_id);
                for o in b.batches {
                    let conn = o.consumer.conn;
                    assert!(conns.contains(&conn));
                    let s = g.ack(conn, o.batch_id, None);
                    assert_eq!(s.count, o.count);
                }
            }
        }
        t.elapsed().as_nanos() as f64 / (n * 4) as f64
    };
    for round in 0..3 {
        let joining = |conn: u64, mode: GroupMode| Joining {
            consumer: c(conn),
            mode,
            filters: BTreeMap::new(),
            window: 100,
            batch_size: 1000,
            credits: 1_000_000,
            max_in_flight_bytes: usize::MAX,
        };
        let mut one = vec![group()];
        for conn in 1..=4 {
            one[0].join(joining(conn, GroupMode::Broadcast)).unwrap();
        }
        let bc = run(&mut one, &[vec![1, 2, 3, 4]]);
        let mut four: Vec<GroupState> = (1..=4)
            .map(|conn| {
                let mut g = GroupState::from_record(GroupState::new_record(
                    GroupMode::Shared,
                    BTreeMap::new(),
                ));
                g.join(joining(conn, GroupMode::Shared)).unwrap();
                g
            })
            .collect();
        let g4 = run(&mut four, &[vec![1], vec![2], vec![3], vec![4]]);
        println!(
            "round {round}: ns per delivery: broadcast {bc:.1}, 4 groups {g4:.1}, ratio {:.3}",
            bc / g4
        );
    }
}
