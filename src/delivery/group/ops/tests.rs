//! The group operations' rules, tested without actors (the clock is an argument).

use super::super::*;
use super::{MAX_ATTEMPTS, MAX_WAITING};
use bytes::Bytes;
use std::time::{Duration, Instant};

const LIMITS: Limits = Limits {
    batch_max_bytes: 4 * 1024 * 1024,
    max_retries: 3,
};

fn msg(seq: u64) -> StoredMessage {
    StoredMessage {
        seq,
        timestamp_ms: 1_000 + seq,
        key: None,
        headers: BTreeMap::new(),
        priority: 0,
        payload: Bytes::from_static(b"x"),
    }
}

fn consumer(conn: u64) -> ConsumerId {
    ConsumerId { conn, stream: 1 }
}

fn joining(conn: u64, mode: GroupMode, window: u32, batch_size: u32, credits: u64) -> Joining {
    Joining {
        consumer: consumer(conn),
        mode,
        filters: BTreeMap::new(),
        window,
        batch_size,
        credits,
        max_in_flight_bytes: usize::MAX,
    }
}

/// A shared group with schedule `backoff`, one consumer (conn 1) and messages 1..=n read.
fn group(backoff: &[u64], n: u64, window: u32, batch_size: u32) -> GroupState {
    let mut rec = GroupState::new_record(GroupMode::Shared, BTreeMap::new());
    rec.backoff_ms = backoff.to_vec();
    let mut g = GroupState::from_record(rec);
    g.join(joining(1, GroupMode::Shared, window, batch_size, 1_000_000))
        .unwrap();
    read(&mut g, 1, n);
    g
}

fn read(g: &mut GroupState, from: u64, to: u64) {
    let f = g.start_read();
    assert_eq!(f, from);
    assert!(g.finish_read(f, Some(((from..=to).map(msg).collect(), vec![]))));
}

fn next_id() -> u64 {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn form(g: &mut GroupState) -> Vec<Batch> {
    g.form_batches("t", "g", LIMITS, next_id)
        .batches
        .into_iter()
        .map(|o| o.batch)
        .collect()
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

fn attempts(b: &Batch) -> Vec<u32> {
    b.messages.iter().map(|m| m.attempt).collect()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn an_unacked_batch_waits_the_schedule_entry_of_its_delivery_count_the_last_repeating() {
    let mut g = group(&[1000, 2000, 3000], 1, 1, 1);
    for (attempt, wait) in [(1, 1), (2, 2), (3, 3), (4, 3), (5, 3)] {
        let b = form(&mut g);
        assert_eq!(attempts(&b[0]), vec![attempt]);
        assert_eq!(g.redelivery_timeout(&b[0]), Some(secs(wait)), "{attempt}");
        // The timeout is the wait: redelivered at once.
        assert!(g.fail_batch(b[0].batch_id, true, 10).unwrap().is_empty());
    }
    // Without a schedule: the broker's batch timeout.
    let mut g = group(&[], 1, 1, 1);
    let b = form(&mut g);
    assert_eq!(g.redelivery_timeout(&b[0]), None);
    // A batch's smallest delivery count decides.
    let mut g = group(&[1000, 5000], 2, 1, 2);
    let b = form(&mut g);
    g.nack(1, b[0].batch_id, Some(vec![1]), false, 10);
    g.ack(1, b[0].batch_id, Some(vec![2]));
    read(&mut g, 3, 3);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 3]);
    assert_eq!(attempts(&b[0]), vec![2, 1]);
    assert_eq!(g.redelivery_timeout(&b[0]), Some(secs(1)));
}

#[test]
fn a_nack_waits_by_the_schedule_or_its_delay_and_fresh_messages_do_not_wait_for_it() {
    let t0 = Instant::now();
    let mut g = group(&[1000, 2000], 3, 1, 1);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1]);
    let s = g.nack_delayed(1, b[0].batch_id, None, false, 3, None, t0);
    assert_eq!((s.outcome, s.count), (AckOutcome::Settled, 1));
    assert_eq!(g.waiting_count(), 1);
    assert_eq!(g.next_due(), Some(t0 + secs(1)));
    // Seq 1 waits; seq 2 goes now.
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![2]);
    g.ack(1, b[0].batch_id, None);
    assert_eq!(g.release_due(t0 + Duration::from_millis(999)), 0);
    assert_eq!(g.release_due(t0 + secs(1)), 1);
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1], vec![2]));
    // Second failure: the second entry.
    g.nack_delayed(1, b[0].batch_id, None, false, 3, None, t0);
    assert_eq!(g.next_due(), Some(t0 + secs(2)));
    // Seq 3 is not held back by it either.
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![3]);
    // A delay wins over the schedule.
    g.release_due(t0 + secs(2));
    let c = form(&mut g);
    assert!(c.is_empty(), "window 1 and seq 3 in flight");
    g.ack(1, b[0].batch_id, None);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1]);
    g.nack_delayed(1, b[0].batch_id, None, false, 5, Some(secs(7)), t0);
    assert_eq!(g.next_due(), Some(t0 + secs(7)));

    // No schedule: a nack redelivers at once, a delay waits, a release with a delay too.
    let mut g = group(&[], 2, 1, 1);
    let b = form(&mut g);
    g.nack_delayed(1, b[0].batch_id, None, false, 3, None, t0);
    assert_eq!(g.waiting_count(), 0);
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1], vec![2]));
    g.nack_delayed(1, b[0].batch_id, None, false, 3, Some(secs(3)), t0);
    assert_eq!(g.next_due(), Some(t0 + secs(3)));
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![2]);
    g.nack_delayed(1, b[0].batch_id, None, true, 3, Some(secs(1)), t0);
    assert_eq!(g.waiting_count(), 2);
    assert!(form(&mut g).is_empty(), "both wait");
    g.release_due(t0 + secs(3));
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1], vec![3]));
}

#[test]
fn attempt_counts_ride_in_the_record_and_continue_after_a_reload() {
    let mut g = group(&[], 3, 3, 3);
    let b = form(&mut g);
    // Seq 1 nacked, seq 2 acked, seq 3 returned by a disconnect-like release (no failure).
    g.nack(1, b[0].batch_id, Some(vec![1]), false, 3);
    g.ack(1, b[0].batch_id, Some(vec![2]));
    g.nack(1, b[0].batch_id, Some(vec![3]), true, 3);
    let rec = g.record();
    assert_eq!(rec.attempts, vec![(1, 1, 1)], "only failed messages");
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1, 3], vec![2, 1]));
    g.nack(1, b[0].batch_id, Some(vec![1]), false, 3);
    let b2 = form(&mut g);
    assert_eq!(attempts(&b2[0]), vec![3]);
    // In flight on its 3rd delivery: the record counts it.
    let rec = g.record();
    assert_eq!(rec.attempts, vec![(1, 3, 2)]);

    // Reloaded (a restart): seq 1 continues at attempt 4 with 2 failures.
    let mut g = GroupState::from_record(rec);
    g.join(joining(1, GroupMode::Shared, 1, 3, 100)).unwrap();
    read(&mut g, 1, 3);
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1, 3], vec![4, 1]));
    g.ack(1, b[0].batch_id, Some(vec![3]));
    let s = g.nack(1, b[0].batch_id, Some(vec![1]), false, 3);
    assert!(s.dead.is_empty(), "3 failures, max_retries 3");
    let b = form(&mut g);
    assert_eq!(attempts(&b[0]), vec![5]);
    let s = g.nack(1, b[0].batch_id, None, false, 3);
    assert_eq!(s.dead.len(), 1, "its 4th failure, across the restart");
    g.dead_lettered(s.dead, true);
    assert!(g.record().attempts.is_empty(), "settled: forgotten");
    assert_eq!(g.floor(), 3);
}

#[test]
fn a_delivery_of_a_message_that_failed_before_asks_for_a_commit() {
    let mut g = group(&[], 2, 1, 1);
    let b = form(&mut g);
    assert!(!g.take_attempts_dirty(), "first deliveries cost no commit");
    g.fail_batch(b[0].batch_id, true, 3);
    assert!(g.take_dirty_record().is_some(), "a failure is committed");
    let _ = form(&mut g);
    assert!(g.take_attempts_dirty());
    assert!(g.take_dirty_record().is_some());
}

#[test]
fn restored_counts_below_the_floor_or_settled_are_dropped() {
    let mut rec = GroupState::new_record(GroupMode::Shared, BTreeMap::new());
    rec.acked_floor = 5;
    rec.acked_ranges = vec![(7, 7)];
    rec.attempts = vec![(3, 2, 2), (6, 1, 1), (7, 4, 4)];
    let mut g = GroupState::from_record(rec);
    assert_eq!(g.record().attempts, vec![(6, 1, 1)]);
}

#[test]
fn a_subscribe_naming_another_schedule_is_refused() {
    let g = group(&[1000, 2000], 0, 1, 1);
    assert!(g.check_backoff(None).is_ok());
    assert!(g.check_backoff(Some(&[1000, 2000])).is_ok());
    let e = g.check_backoff(Some(&[1000])).unwrap_err();
    assert_eq!(e.code, ErrorCode::ModeConflict);
    let mut g = group(&[], 0, 1, 1);
    assert_eq!(
        g.check_backoff(Some(&[5])).unwrap_err().code,
        ErrorCode::ModeConflict
    );
    assert_eq!(g.record().backoff_ms, Vec::<u64>::new());
}

#[test]
fn delayed_retries_are_bounded_and_the_bound_is_reported_once() {
    let t0 = Instant::now();
    let n = MAX_WAITING as u64 + 10;
    let mut g = group(&[], 0, 1, 4096);
    g.grant(consumer(1), 1_000_000);
    let mut next = 1;
    let mut events = 0;
    while g.waiting_count() < MAX_WAITING {
        if g.wants_read(n) {
            let to = (next + 511).min(n);
            read(&mut g, next, to);
            next = to + 1;
        }
        let b = form(&mut g);
        assert_eq!(b.len(), 1);
        g.nack_delayed(1, b[0].batch_id, None, true, 3, Some(secs(60)), t0);
        events += usize::from(g.take_pressure_event().is_some());
    }
    assert!(form(&mut g).is_empty(), "fresh messages wait at the bound");
    assert_eq!(g.take_pressure_event(), Some("delayed retries"));
    assert_eq!(events, 0);
    assert!(form(&mut g).is_empty());
    assert_eq!(g.take_pressure_event(), None, "once per episode");
    assert_eq!(g.stats("t", "g", n).memory_pressure, 1);
    // Due again: they go, and fresh messages after them.
    g.release_due(t0 + secs(60));
    assert_eq!(g.waiting_count(), 0);
    assert!(!form(&mut g).is_empty());
    const { assert!(MAX_ATTEMPTS >= MAX_WAITING) };
}

#[test]
fn a_consumer_holding_batches_with_lag_and_no_ack_is_stale_once_per_episode() {
    let t0 = Instant::now();
    let stale_after = secs(10);
    let mut g = group(&[], 10, 1, 2);
    let b = form(&mut g);
    assert!(g.check_stale(t0, stale_after, 10).is_empty());
    let later = Instant::now() + stale_after;
    let flagged = g.check_stale(later, stale_after, 10);
    assert_eq!(flagged.len(), 1);
    assert_eq!(flagged[0].0, consumer(1));
    assert!(flagged[0].1 >= 10_000);
    assert!(g.check_stale(later, stale_after, 10).is_empty(), "once");
    let st = g.stats("t", "g", 10);
    assert_eq!(st.stale_consumers, 1);
    assert!(st.consumer_details[0].stale);
    assert_eq!(st.consumer_details[0].in_flight_batches, 1);
    assert_eq!(st.consumer_details[0].delivered, 2);
    // An ack ends the episode.
    g.ack(1, b[0].batch_id, None);
    let st = g.stats("t", "g", 10);
    assert_eq!((st.stale_consumers, st.consumer_details[0].acked), (0, 2));
    assert!(st.last_ack_ms_ago.is_some());
    // Idle with credits and nothing in flight: not stale (it is not holding anything back).
    let mut g = group(&[], 0, 1, 2);
    g.grant(consumer(1), 5);
    assert!(g
        .stale_consumers(Instant::now() + secs(100), stale_after, 10)
        .is_empty());
    // No lag: not stale.
    let mut g = group(&[], 2, 1, 2);
    let _ = form(&mut g);
    assert!(g
        .stale_consumers(Instant::now() + secs(100), stale_after, 0)
        .is_empty());
}

#[test]
fn a_failover_standby_is_never_stale() {
    let mut rec = GroupState::new_record(GroupMode::Failover, BTreeMap::new());
    rec.acked_floor = 0;
    let mut g = GroupState::from_record(rec);
    g.join(joining(1, GroupMode::Failover, 1, 1, 1)).unwrap();
    g.join(joining(2, GroupMode::Failover, 1, 1, 0)).unwrap();
    read(&mut g, 1, 5);
    let _ = form(&mut g);
    let stale = g.stale_consumers(Instant::now() + secs(100), secs(1), 5);
    assert_eq!(
        stale.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![consumer(1)]
    );
    let st = g.stats("t", "g", 5);
    assert_eq!(
        st.consumer_details
            .iter()
            .map(|c| c.active)
            .collect::<Vec<_>>(),
        vec![true, false]
    );
}

#[test]
fn a_seek_voids_batches_clears_the_cursor_and_owes_each_consumer_a_reset() {
    let t0 = Instant::now();
    let mut g = group(&[], 20, 2, 3);
    g.join(joining(2, GroupMode::Shared, 1, 3, 1)).unwrap();
    let b = form(&mut g);
    assert_eq!(b.len(), 3);
    g.ack(1, b[0].batch_id, None);
    g.nack_delayed(1, b[2].batch_id, None, false, 3, Some(secs(5)), t0);
    assert_eq!(g.floor(), 3);
    // Consumer 2 used its only credit; consumer 1 has plenty.
    let moved = g.seek(10);
    assert_eq!(moved.voided, {
        let mut v = vec![b[1].batch_id];
        v.sort_unstable();
        v
    });
    assert_eq!(moved.skipped, 6, "4..=9 were unsettled");
    assert_eq!(g.floor(), 9);
    assert_eq!(g.next_read(), 10);
    assert_eq!(g.waiting_count(), 0);
    let rec = g.take_dirty_record().unwrap();
    assert_eq!((rec.acked_floor, rec.acked_ranges.len()), (9, 0));
    // Acks of void batches: unknown.
    let s = g.ack(2, b[1].batch_id, None);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    // The notice goes to the consumer with a credit; the other waits for one.
    let n = g.take_notices();
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].0, consumer(1));
    assert_eq!(
        (n[0].1.reason.as_str(), n[0].1.floor_seq, n[0].1.skipped),
        ("seek", 10, 6)
    );
    assert!(g.take_notices().is_empty());
    g.grant(consumer(2), 1);
    let n = g.take_notices();
    assert_eq!(n.iter().map(|n| n.0).collect::<Vec<_>>(), vec![consumer(2)]);
    // Delivery starts exactly at 10.
    read(&mut g, 10, 20);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0])[0], 10);
    assert!(b.iter().all(|b| b.messages.iter().all(|m| m.attempt == 1)));
    // Backwards: everything from 2 again; acked ranges are forgotten.
    let moved = g.seek(2);
    assert_eq!(moved.skipped, 0);
    assert_eq!(g.floor(), 1);
    assert_eq!(g.lag(20), 19);
}

#[test]
fn a_group_below_the_floor_moves_up_counting_what_it_skipped() {
    let mut g = group(&[], 10, 2, 2);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 2]);
    assert_eq!(seqs(&b[1]), vec![3, 4]);
    g.ack(1, b[1].batch_id, Some(vec![4]));
    // Retention removed 1..=5: 1, 2, 3 and 5 were not settled (4 was).
    assert_eq!(g.move_to_floor(6), Some(4));
    assert_eq!(g.floor(), 5);
    assert_eq!(g.move_to_floor(6), None, "already there");
    assert_eq!(g.move_to_floor(3), None, "below it");
    let st = g.stats("t", "g", 10);
    assert_eq!((st.skipped_by_retention, st.lag), (4, 5));
    let rec = g.take_dirty_record().unwrap();
    assert_eq!(rec.acked_floor, 5);
    // In flight below it: already acked, and never redelivered.
    let s = g.ack(1, b[0].batch_id, Some(vec![1]));
    assert_eq!((s.outcome, s.count), (AckOutcome::AlreadyAcked, 0));
    assert!(g.fail_batch(b[0].batch_id, true, 0).unwrap().is_empty());
    let n = g.take_notices();
    assert_eq!(n.len(), 1);
    assert_eq!(
        (n[0].1.reason.as_str(), n[0].1.floor_seq, n[0].1.skipped),
        ("retention", 6, 4)
    );
    g.ack(1, b[1].batch_id, None);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![6, 7]);
    // Reset notices merge while a consumer has no credit.
    let mut g = group(&[], 10, 1, 1);
    let _ = form(&mut g);
    let mut h = GroupState::from_record(GroupState::new_record(GroupMode::Shared, BTreeMap::new()));
    h.join(joining(1, GroupMode::Shared, 1, 1, 0)).unwrap();
    h.move_to_floor(3);
    h.move_to_floor(5);
    assert!(h.take_notices().is_empty());
    h.grant(consumer(1), 1);
    let n = h.take_notices();
    assert_eq!(
        (n[0].1.floor_seq, n[0].1.skipped),
        (5, 4),
        "one notice: the latest floor, every skip"
    );
    assert_eq!(g.move_to_floor(1), None);
}

/// A group of `mode` with schedule `backoff`, no consumer yet.
fn group_of(mode: GroupMode, backoff: &[u64]) -> GroupState {
    let mut rec = GroupState::new_record(mode, BTreeMap::new());
    rec.backoff_ms = backoff.to_vec();
    GroupState::from_record(rec)
}

/// Reads the log from where the group wants up to `head`.
fn read_to(g: &mut GroupState, head: u64) {
    let from = g.start_read();
    assert!(g.finish_read(from, Some(((from..=head).map(msg).collect(), vec![]))));
}

fn batches_of(g: &mut GroupState) -> Vec<(ConsumerId, Batch)> {
    g.form_batches("t", "g", LIMITS, next_id)
        .batches
        .into_iter()
        .map(|o| (o.consumer, o.batch))
        .collect()
}

#[test]
fn broadcast_members_have_their_own_delayed_retries_attempts_and_stale_flags() {
    let t0 = Instant::now();
    let mut g = group_of(GroupMode::Broadcast, &[1000]);
    g.join(joining(1, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    g.join(joining(2, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    assert!(g.has_consumer(consumer(2)));
    assert_eq!(g.consumer_ids().len(), 2);
    read_to(&mut g, 3);
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 2, "each member gets every message");
    let mine = b.iter().find(|(c, _)| *c == consumer(1)).unwrap();
    let theirs = b.iter().find(|(c, _)| *c == consumer(2)).unwrap();
    assert_eq!(g.redelivery_timeout(&mine.1), Some(secs(1)));
    // Member 1 nacks: only its copies wait (the schedule's 1s); member 2 acks.
    let s = g.nack_delayed(1, mine.1.batch_id, None, false, 3, None, t0);
    assert_eq!(s.count, 3);
    g.ack(2, theirs.1.batch_id, None);
    assert_eq!(g.waiting_count(), 3);
    assert_eq!(g.next_due(), Some(t0 + secs(1)));
    assert_eq!(g.floor(), 0, "member 1 has not settled them");
    // The group's record carries member 1's attempt counts.
    let rec = g.take_dirty_record().expect("a failure is committed");
    assert_eq!(rec.attempts, vec![(1, 1, 1), (2, 1, 1), (3, 1, 1)]);
    assert!(batches_of(&mut g).is_empty());
    assert_eq!(g.release_due(t0 + secs(1)), 3);
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].0, attempts(&b[0].1)), (consumer(1), vec![2, 2, 2]));
    assert!(g.take_attempts_dirty(), "a failed message delivered again");
    // Member 1 holds them and does not ack: stale by its own lag; member 2 has none.
    let later = Instant::now() + secs(10);
    let stale = g.check_stale(later, secs(5), 3);
    assert_eq!(stale.len(), 1);
    assert_eq!((stale[0].0, stale[0].2), (consumer(1), 3));
    let st = g.stats("t", "g", 3);
    assert_eq!(st.stale_consumers, 1);
    assert_eq!(st.backoff_ms, vec![1000]);
    let one = st.consumer_details.iter().find(|c| c.conn_id == 1).unwrap();
    assert_eq!((one.delivered, one.acked, one.stale), (6, 0, true));
    let two = st.consumer_details.iter().find(|c| c.conn_id == 2).unwrap();
    assert_eq!((two.delivered, two.acked, two.stale), (3, 3, false));
    // A seek voids member 1's batch and tells both members.
    let moved = g.seek(2);
    assert_eq!(moved.voided, vec![b[0].1.batch_id]);
    assert_eq!(g.floor(), 1);
    let mut n: Vec<ConsumerId> = g.take_notices().into_iter().map(|n| n.0).collect();
    n.sort_unstable();
    assert_eq!(n, vec![consumer(1), consumer(2)]);
    read_to(&mut g, 3);
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 2);
    assert!(b
        .iter()
        .all(|(_, b)| seqs(b) == vec![2, 3] && attempts(b) == vec![1, 1]));
    // Retention: both members move up, the group counts what it skipped once.
    assert_eq!(g.move_to_floor(4), Some(2));
    assert_eq!(g.take_notices().len(), 2);
    assert_eq!(g.stats("t", "g", 5).skipped_by_retention, 2);
}

#[test]
fn broadcast_attempt_counts_continue_for_members_that_join_after_a_reload() {
    let mut g = group_of(GroupMode::Broadcast, &[]);
    g.join(joining(1, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    g.join(joining(2, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    read_to(&mut g, 1);
    let b = batches_of(&mut g);
    for (c, batch) in &b {
        assert!(g.fail_batch(batch.batch_id, true, 5).unwrap().is_empty());
        if *c == consumer(1) {
            // Member 1 fails twice.
            let again = batches_of(&mut g);
            let mine = again.iter().find(|(c, _)| *c == consumer(1)).unwrap();
            g.fail_batch(mine.1.batch_id, true, 5);
        }
    }
    let rec = g.record();
    assert_eq!(rec.attempts, vec![(1, 2, 2)], "the most failed member's");
    let mut g = GroupState::from_record(rec);
    g.join(joining(9, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    read_to(&mut g, 1);
    let b = batches_of(&mut g);
    assert_eq!(attempts(&b[0].1), vec![3]);
}

#[test]
fn key_shared_a_waiting_message_holds_its_key_back_but_not_other_keys() {
    let t0 = Instant::now();
    let mut g = group_of(GroupMode::KeyShared, &[]);
    g.join(joining(1, GroupMode::KeyShared, 4, 1, 100)).unwrap();
    let keyed = |seq: u64, key: &str| StoredMessage {
        key: Some(key.into()),
        ..msg(seq)
    };
    let from = g.start_read();
    let msgs = vec![keyed(1, "a"), keyed(2, "b"), keyed(3, "a"), keyed(4, "b")];
    assert!(g.finish_read(from, Some((msgs, vec![]))));
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 4);
    let first = b
        .iter()
        .find(|(_, b)| seqs(b) == vec![1])
        .unwrap()
        .1
        .batch_id;
    let third = b
        .iter()
        .find(|(_, b)| seqs(b) == vec![3])
        .unwrap()
        .1
        .batch_id;
    g.ack(1, third, None);
    for (_, batch) in &b {
        if seqs(batch)[0].is_multiple_of(2) {
            g.ack(1, batch.batch_id, None);
        }
    }
    // Seq 1 (key a) waits 5s; a later message of key a waits behind it, one of key b goes.
    g.nack_delayed(1, first, None, false, 3, Some(secs(5)), t0);
    g.offer_tail(&[Arc::new(keyed(5, "a")), Arc::new(keyed(6, "b"))]);
    let b = batches_of(&mut g);
    assert_eq!(
        b.iter().flat_map(|(_, b)| seqs(b)).collect::<Vec<_>>(),
        vec![6]
    );
    g.release_due(t0 + secs(5));
    let b = batches_of(&mut g);
    assert_eq!(
        b.iter().flat_map(|(_, b)| seqs(b)).collect::<Vec<_>>(),
        vec![1, 5],
        "key a in order"
    );
}

#[test]
fn the_ack_range_bound_is_reported_once_per_episode() {
    let mut g = group(&[], 0, 10, 10);
    for i in 0..MAX_ACK_RANGES as u64 {
        g.above.insert(10 + 2 * i);
    }
    let top = 10 + 2 * MAX_ACK_RANGES as u64;
    g.next_read = top;
    g.offer_tail(&[Arc::new(msg(top))]);
    assert!(form(&mut g).is_empty());
    assert_eq!(g.take_pressure_event(), Some("ack ranges"));
    assert!(form(&mut g).is_empty());
    assert_eq!(g.take_pressure_event(), None);
    // The floor moves: the episode ends; the next one is reported again.
    for s in 1..10 {
        g.settle(s);
    }
    assert_eq!(form(&mut g).len(), 1);
    assert_eq!(g.take_pressure_event(), None);
    assert_eq!(g.stats("t", "g", top).memory_pressure, 1);
}
