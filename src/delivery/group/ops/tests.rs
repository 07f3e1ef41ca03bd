//! The group operations' rules, tested without actors (the clock is an argument).

use super::super::*;
use super::{MAX_ATTEMPTS, MAX_WAITING};
use bytes::Bytes;
use sluice_protocol::Batch;
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

/// Serves the reads the group asks for (due retries read back, read-ahead) from a log of
/// `head` messages built by `make`, as the orchestrator does with the store.
fn fetch_log(g: &mut GroupState, head: u64, make: impl Fn(u64) -> StoredMessage) {
    for _ in 0..10_000 {
        if !g.wants_read(head) {
            return;
        }
        let from = g.start_read();
        let n = g.read_span() as u64;
        let to = (from + n - 1).min(head);
        g.finish_read(from, Some(((from..=to).map(&make).collect(), vec![])));
    }
    panic!("reads do not end");
}

/// [`fetch_log`] of plain messages.
fn fetch(g: &mut GroupState, head: u64) {
    fetch_log(g, head, msg);
}

fn next_id() -> u64 {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn form(g: &mut GroupState) -> Vec<Batch> {
    g.form_batches("t", "g", LIMITS, next_id)
        .batches
        .into_iter()
        .map(|o| o.batch().unwrap())
        .collect()
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

fn attempts(b: &Batch) -> Vec<u32> {
    b.messages.iter().map(|m| m.attempt).collect()
}

fn min_attempt(b: &Batch) -> u32 {
    b.messages.iter().map(|m| m.attempt).min().unwrap()
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
        assert_eq!(
            g.redelivery_timeout(min_attempt(&b[0])),
            Some(secs(wait)),
            "{attempt}"
        );
        // The timeout is the wait: redelivered at once.
        assert!(g.fail_batch(b[0].batch_id, true, 10).unwrap().is_empty());
    }
    // Without a schedule: the broker's batch timeout.
    let mut g = group(&[], 1, 1, 1);
    let b = form(&mut g);
    assert_eq!(g.redelivery_timeout(min_attempt(&b[0])), None);
    // A batch's smallest delivery count decides.
    let mut g = group(&[1000, 5000], 2, 1, 2);
    let b = form(&mut g);
    g.nack(1, b[0].batch_id, Some(vec![1]), false, 10);
    g.ack(1, b[0].batch_id, Some(vec![2]));
    read(&mut g, 3, 3);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 3]);
    assert_eq!(attempts(&b[0]), vec![2, 1]);
    assert_eq!(g.redelivery_timeout(min_attempt(&b[0])), Some(secs(1)));
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
    // Read back from the log (one message), then delivered.
    assert!(g.wants_read(3));
    fetch(&mut g, 3);
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
    fetch(&mut g, 3);
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
    fetch(&mut g, 2);
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
fn a_failure_is_committed_a_redelivery_is_not() {
    let mut g = group(&[], 2, 1, 1);
    let b = form(&mut g);
    assert!(
        g.take_dirty_record().is_none(),
        "first deliveries cost no commit"
    );
    g.fail_batch(b[0].batch_id, true, 3);
    let rec = g.take_dirty_record().expect("a failure is committed");
    assert_eq!(rec.attempts, vec![(1, 1, 1)]);
    let b = form(&mut g);
    assert_eq!(attempts(&b[0]), vec![2]);
    assert!(
        g.take_dirty_record().is_none(),
        "the redelivery of a failed message commits nothing"
    );
    // The next record (the next failure's) carries the count of that delivery.
    g.fail_batch(b[0].batch_id, true, 3);
    assert_eq!(g.take_dirty_record().unwrap().attempts, vec![(1, 2, 2)]);
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
    // Due again: read back from the log (bounded like the read-ahead), they go, and fresh
    // messages after them.
    g.release_due(t0 + secs(60));
    assert_eq!(g.waiting_count(), MAX_WAITING, "due, not read back yet");
    let mut delivered = 0;
    while g.waiting_count() > 0 {
        fetch(&mut g, next - 1);
        assert!(g.retry.len() <= READ_AHEAD, "retries read back are bounded");
        for b in form(&mut g) {
            assert!(b.messages.iter().all(|m| m.seq < next));
            delivered += b.messages.len();
            g.ack(1, b.batch_id, None);
        }
    }
    assert_eq!(delivered, MAX_WAITING);
    read(&mut g, next, next);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![next]);
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
        .map(|o| (o.consumer, o.batch().unwrap()))
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
    assert_eq!(g.redelivery_timeout(min_attempt(&mine.1)), Some(secs(1)));
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
    // Member 1's due copies are read back from the log (a shared read).
    fetch(&mut g, 3);
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].0, attempts(&b[0].1)), (consumer(1), vec![2, 2, 2]));
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
    assert!(b.is_empty(), "seq 1 is read back first: key a waits for it");
    let keys = ["a", "b", "a", "b", "a", "b"];
    fetch_log(&mut g, 6, |s| keyed(s, keys[s as usize - 1]));
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

// ---- Review fixes (HG2): key_shared after a seek, busy spells, waiting without bodies,
// ---- broadcast joins, the attempt bound.

fn keyed_msg(seq: u64, key: &str) -> StoredMessage {
    StoredMessage {
        key: Some(key.into()),
        ..msg(seq)
    }
}

fn ks_join(g: &mut GroupState, conn: u64, window: u32, batch_size: u32, credits: u64) {
    g.join(joining(
        conn,
        GroupMode::KeyShared,
        window,
        batch_size,
        credits,
    ))
    .unwrap();
}

/// The `skip`-th key whose hash `conn` owns in `g`.
fn key_owned_by(g: &GroupState, conn: u64, skip: usize) -> String {
    let ks = g.ks.as_ref().unwrap();
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| ks.ranges.owner(key_shared::key_hash(k.as_bytes())) == Some(consumer(conn)))
        .nth(skip)
        .unwrap()
}

#[test]
fn key_shared_a_seek_frees_the_keys_of_void_batches_so_a_moved_key_flows() {
    let mut g = group_of(GroupMode::KeyShared, &[]);
    ks_join(&mut g, 1, 10, 10, 1_000);
    // A key in the upper half: consumer 2 takes it over when it joins.
    let k = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| key_shared::key_hash(k.as_bytes()) >= 32768)
        .unwrap();
    let h = key_shared::key_hash(k.as_bytes());
    fetch_log(&mut g, 4, |s| keyed_msg(s, &k));
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].0, seqs(&b[0].1)), (consumer(1), vec![1, 2, 3, 4]));
    assert_eq!(g.key_shared_holder(h), Some(consumer(1)));
    // The seek voids the batch: nobody holds the key any more.
    let moved = g.seek(1);
    assert_eq!(moved.voided, vec![b[0].1.batch_id]);
    assert_eq!(g.key_shared_holder(h), None);
    // The key moves to consumer 2 and flows there.
    ks_join(&mut g, 2, 10, 10, 1_000);
    fetch_log(&mut g, 4, |s| keyed_msg(s, &k));
    let b = batches_of(&mut g);
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!((b[0].0, seqs(&b[0].1)), (consumer(2), vec![1, 2, 3, 4]));
    // The void batch's ack changes nothing (its seqs are not settled: unknown batch).
    let s = g.ack(1, moved.voided[0], Some(vec![1]));
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    g.ack(2, b[0].1.batch_id, None);
    assert_eq!(g.floor(), 4);
}

#[test]
fn key_shared_a_seek_back_past_a_parked_key_delivers_every_message_of_it() {
    let mut g = group_of(GroupMode::KeyShared, &[]);
    // Consumer 1 can take 10 batches of 10, then has no credits; consumer 2 takes anything.
    ks_join(&mut g, 1, 10, 10, 10);
    ks_join(&mut g, 2, 10, 10, 1_000_000);
    let k1 = key_owned_by(&g, 1, 0);
    let k2 = key_owned_by(&g, 2, 0);
    let head = 2000u64;
    let key = |s: u64| if s <= 1100 || s % 2 == 1 { &k1 } else { &k2 };
    // Serves, acking at once, and reads until nothing moves; what each consumer got.
    let run = |g: &mut GroupState| {
        let mut got: BTreeMap<ConsumerId, Vec<u64>> = BTreeMap::new();
        for _ in 0..2000 {
            let formed = batches_of(g);
            let idle = formed.is_empty();
            for (who, b) in formed {
                got.entry(who).or_default().extend(seqs(&b));
                g.ack(who.conn, b.batch_id, None);
            }
            if g.wants_read(head) {
                let from = g.start_read();
                let to = (from + g.read_span() as u64 - 1).min(head);
                g.finish_read(
                    from,
                    Some(((from..=to).map(|s| keyed_msg(s, key(s))).collect(), vec![])),
                );
            } else if idle {
                break;
            }
        }
        got
    };
    let got = run(&mut g);
    assert_eq!(got[&consumer(1)], (1..=100).collect::<Vec<_>>());
    assert_eq!(g.key_shared_parking().0, 1, "k1 parked past 100");
    // Back to the start: every message again. Consumer 2 runs through the log while consumer
    // 1 still has no credits (its key parks again, from seq 1), then consumer 1 gets k1's
    // messages from seq 1.
    g.seek(1);
    assert_eq!(g.key_shared_parking().0, 0);
    let got = run(&mut g);
    let k1_seqs: Vec<u64> = (1..=head).filter(|&s| key(s) == &k1).collect();
    let k2_seqs: Vec<u64> = (1..=head).filter(|&s| key(s) == &k2).collect();
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![consumer(2)]);
    assert_eq!(got[&consumer(2)], k2_seqs);
    g.grant(consumer(1), 1_000_000);
    let got = run(&mut g);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![consumer(1)]);
    assert_eq!(got[&consumer(1)], k1_seqs, "all of k1, in order");
    assert_eq!(g.floor(), head);
}

#[test]
fn key_shared_a_floor_move_replays_a_parked_key_from_the_floor() {
    let mut g = group_of(GroupMode::KeyShared, &[]);
    ks_join(&mut g, 1, 1, 10, 0);
    let k = key_owned_by(&g, 1, 0);
    g.key_shared_park_at(key_shared::key_hash(k.as_bytes()), 3);
    g.next_read = 50;
    g.move_to_floor(10);
    assert_eq!(g.key_shared_parked_seqs(), vec![10]);
    g.move_to_floor(50);
    assert_eq!(
        g.key_shared_parking().0,
        0,
        "nothing left below the read position"
    );
}

#[test]
fn a_consumer_that_gets_work_after_a_quiet_spell_is_not_stale_at_once() {
    let t0 = Instant::now();
    let after = secs(600);
    let mut g = group(&[], 0, 1, 10);
    // An hour with nothing to do.
    let got = t0 + secs(3600);
    g.note_busy(got, 0);
    assert!(g.check_stale(got, after, 0).is_empty());
    // One message arrives and goes out (the orchestrator's pump notes who has work).
    g.offer_tail(&[Arc::new(msg(1))]);
    let b = form(&mut g);
    assert_eq!(b.len(), 1);
    g.note_busy(got, 1);
    assert!(
        g.check_stale(got + secs(1), after, 1).is_empty(),
        "flagged a second after it got work"
    );
    assert!(
        g.stale_consumers(got + secs(1), secs(300), 1).is_empty(),
        "disconnect-stale --older-than 5m right after a lull"
    );
    // Still no ack after stale_after: stale, counted from when it got the batch.
    let s = g.check_stale(got + after, after, 1);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].1, 600_000);
    // The stats' last ack counts from its join.
    let d = &g.stats("t", "g", 1).consumer_details[0];
    assert!(d.last_ack_ms_ago < 3_600_000, "{d:?}");
}

#[test]
fn a_consumer_out_of_credits_is_idle_from_when_lag_appears() {
    let t0 = Instant::now();
    let mut g = group(&[], 0, 1, 10);
    g.consumers[0].credits = 0;
    g.note_busy(t0 + secs(3600), 0);
    // A message arrives: lag, no credits; idle from now.
    g.offer_tail(&[Arc::new(msg(1))]);
    g.note_busy(t0 + secs(3600), 1);
    assert!(g.stale_consumers(t0 + secs(3601), secs(300), 1).is_empty());
    assert_eq!(g.stale_consumers(t0 + secs(3900), secs(300), 1).len(), 1);
}

#[test]
fn a_standby_promoted_after_hours_and_the_consumer_taking_a_kicked_ones_batch_are_not_stale_at_once(
) {
    let t0 = Instant::now();
    let after = secs(600);
    let mut rec = GroupState::new_record(GroupMode::Failover, BTreeMap::new());
    rec.acked_floor = 0;
    let mut g = GroupState::from_record(rec);
    g.join(joining(1, GroupMode::Failover, 1, 3, 100)).unwrap();
    g.join(joining(2, GroupMode::Failover, 1, 3, 100)).unwrap();
    read(&mut g, 1, 3);
    let b = form(&mut g);
    g.note_busy(t0, 3);
    // Two hours later the active one leaves; its batch goes to the promoted standby.
    let later = t0 + secs(7200);
    let (batches, promoted) = g.leave(consumer(1));
    assert_eq!(
        (batches, promoted),
        (vec![b[0].batch_id], Some(consumer(2)))
    );
    g.fail_batch(b[0].batch_id, false, 3);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 2, 3]);
    g.note_busy(later, 3);
    assert!(g.check_stale(later + secs(1), after, 3).is_empty());
    assert_eq!(g.check_stale(later + after, after, 3).len(), 1);

    // Shared: consumer 1 is kicked as stale (auto disconnect); consumer 2, idle since it joined
    // an hour ago, takes its batch and is not kicked too.
    let mut g = group(&[], 2, 1, 2);
    g.join(joining(2, GroupMode::Shared, 1, 2, 100)).unwrap();
    let b = form(&mut g);
    assert_eq!(b.len(), 1);
    g.note_busy(t0, 2);
    let kick_at = t0 + secs(3600);
    let stale = g.stale_consumers(kick_at, after, 2);
    assert_eq!(
        stale.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![consumer(1)]
    );
    let (batches, _) = g.leave(consumer(1));
    g.fail_batch(batches[0], false, 3);
    let b = form(&mut g);
    assert_eq!(b.len(), 1);
    g.note_busy(kick_at, 2);
    assert!(g.stale_consumers(kick_at + secs(1), after, 2).is_empty());
}

#[test]
fn a_consumer_whose_batches_keep_timing_out_stays_idle_across_the_gaps() {
    let t0 = Instant::now();
    let mut g = group(&[], 2, 1, 1);
    let b = form(&mut g);
    g.note_busy(t0, 2);
    // Its batch times out; for a while it holds nothing (credits left: no work).
    g.fail_batch(b[0].batch_id, true, 10);
    g.note_busy(t0 + secs(30), 2);
    // Then it gets the message again: its spell of work goes on from t0.
    let _ = form(&mut g);
    g.note_busy(t0 + secs(31), 2);
    let s = g.check_stale(t0 + secs(61), secs(60), 2);
    assert_eq!(s.len(), 1, "never acked since t0");
    assert!(s[0].1 > 60_000, "idle since it first got work: {}", s[0].1);
}

#[test]
fn a_waiting_message_keeps_no_body_and_is_read_back_when_due() {
    let t0 = Instant::now();
    let mut g = group(&[], 0, 5, 5);
    let big = Arc::new(StoredMessage {
        payload: Bytes::from(vec![7u8; 1 << 20]),
        ..msg(1)
    });
    g.offer_tail(&[big.clone(), Arc::new(msg(2)), Arc::new(msg(3))]);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 2, 3]);
    // 1 and 3 wait a day; 2 is acked.
    g.ack(1, b[0].batch_id, Some(vec![2]));
    g.nack_delayed(1, b[0].batch_id, None, false, 3, Some(secs(86_400)), t0);
    assert_eq!(g.waiting_count(), 2);
    assert_eq!(
        Arc::strong_count(&big),
        1,
        "the waiting message's body is not kept"
    );
    assert!(!g.wants_read(3));
    // Due: read back from the log, one read of 1..=3 (2 is settled: skipped).
    g.release_due(t0 + secs(86_400));
    assert!(g.wants_read(3));
    assert_eq!(g.start_read(), 1);
    assert_eq!(g.read_span(), 3);
    let log = vec![(*big).clone(), msg(2), msg(3)];
    assert!(g.finish_read(1, Some((log, vec![]))));
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), attempts(&b[0])), (vec![1, 3], vec![2, 2]));
    assert_eq!(b[0].messages[0].payload.len(), 1 << 20);
    // A read that brings nothing settles nothing (it is read again); a due message missing
    // from what a read brought around it is not in the log any more: settled, not looped over.
    g.nack_delayed(1, b[0].batch_id, Some(vec![3]), false, 3, Some(secs(1)), t0);
    g.ack(1, b[0].batch_id, None);
    g.release_due(t0 + secs(1));
    assert_eq!(g.start_read(), 3);
    assert!(g.finish_read(3, Some((vec![], vec![]))));
    assert_eq!((g.waiting_count(), g.floor()), (1, 2));
    assert_eq!(g.start_read(), 3);
    assert!(g.finish_read(3, Some((vec![msg(4)], vec![]))));
    assert_eq!((g.waiting_count(), g.floor()), (0, 3));
}

#[test]
fn a_broadcast_member_joining_a_live_group_starts_its_own_attempt_counts() {
    let mut g = group_of(GroupMode::Broadcast, &[]);
    g.join(joining(1, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    read_to(&mut g, 1);
    // Member 1 fails seq 1 three times (max_retries 3: not dead yet).
    for attempt in 1..=3 {
        let b = batches_of(&mut g);
        assert_eq!(attempts(&b[0].1), vec![attempt]);
        assert!(g.fail_batch(b[0].1.batch_id, true, 3).unwrap().is_empty());
    }
    assert_eq!(g.record().attempts, vec![(1, 3, 3)]);
    // Member 2 joins now: its copy is on its first delivery, and its first failure is one.
    g.join(joining(2, GroupMode::Broadcast, 1, 5, 100)).unwrap();
    fetch(&mut g, 1);
    let b = batches_of(&mut g);
    let theirs = b.iter().find(|(c, _)| *c == consumer(2)).unwrap();
    assert_eq!(attempts(&theirs.1), vec![1]);
    let dead = g.fail_batch(theirs.1.batch_id, true, 3).unwrap();
    assert!(dead.is_empty(), "dead-lettered on its first failure");
}

#[test]
fn failed_messages_are_bounded_so_the_record_stays_small() {
    let t0 = Instant::now();
    let mut g = group(&[], 0, 1_000, 64);
    g.grant(consumer(1), 1_000_000);
    let head = MAX_ATTEMPTS as u64 + 1_000;
    let mut next = 1;
    let mut events = Vec::new();
    while g.ops.failed.len() < MAX_ATTEMPTS {
        if g.wants_read(head) {
            let to = (next + 511).min(head);
            read(&mut g, next, to);
            next = to + 1;
        }
        let b = form(&mut g);
        assert!(!b.is_empty());
        for b in b {
            g.nack_delayed(1, b.batch_id, None, false, 3, Some(secs(60)), t0);
        }
        events.extend(g.take_pressure_event());
    }
    assert!(events.is_empty());
    let fresh_from = next;
    if g.wants_read(head) {
        let to = (next + 511).min(head);
        read(&mut g, next, to);
        next = to + 1;
    }
    assert!(!g.ready.is_empty());
    assert!(form(&mut g).is_empty(), "fresh messages wait at the bound");
    assert_eq!(g.take_pressure_event(), Some("attempt counts"));
    let rec = g.record();
    assert_eq!(rec.attempts.len(), MAX_ATTEMPTS);
    let bytes = sluice_protocol::encode(&rec).unwrap().len();
    assert!(
        bytes < 100_000,
        "the record rewritten by every failure: {bytes} bytes"
    );
    // They come back and are acked: fresh messages flow again.
    g.release_due(t0 + secs(60));
    while g.waiting_count() > 0 || !g.ready.is_empty() {
        fetch(&mut g, next - 1);
        for b in form(&mut g) {
            for m in &b.messages {
                assert_eq!(m.attempt, if m.seq < fresh_from { 2 } else { 1 });
            }
            g.ack(1, b.batch_id, None);
        }
    }
    assert!(g.ops.failed.is_empty());
    assert!(g.record().attempts.is_empty());
    read(&mut g, next, next);
    assert_eq!(seqs(&form(&mut g)[0]), vec![next]);
}

#[test]
fn key_shared_at_the_bound_of_failed_messages_sends_no_fresh_message_not_even_at_a_hole_edge() {
    let mut g = group_of(GroupMode::KeyShared, &[]);
    ks_join(&mut g, 1, 10, 10, 1_000);
    // As many failed messages as the bound allows (seqs far above: only their number counts).
    g.ops
        .failed
        .extend(1_000_000..1_000_000 + MAX_ATTEMPTS as u64);
    // Seq 1 is next to the floor (settling it would add no range), yet it waits.
    g.offer_tail(&[Arc::new(keyed_msg(1, "a"))]);
    assert!(batches_of(&mut g).is_empty());
    assert_eq!(g.take_pressure_event(), Some("attempt counts"));
    g.ops.failed.clear();
    assert_eq!(batches_of(&mut g).len(), 1);
}

#[test]
fn acks_of_batches_voided_by_a_seek_apply_nothing_already_acked_below_the_target() {
    let mut g = group(&[], 6, 2, 3);
    let b = form(&mut g);
    assert_eq!((seqs(&b[0]), seqs(&b[1])), (vec![1, 2, 3], vec![4, 5, 6]));
    // Forward past the first batch, into the second.
    g.seek(5);
    let s = g.ack(1, b[0].batch_id, Some(vec![1, 3]));
    assert_eq!((s.outcome, s.count), (AckOutcome::AlreadyAcked, 0));
    let s = g.ack(1, b[0].batch_id, None);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch, "no seqs: unknown");
    let s = g.ack(1, b[1].batch_id, Some(vec![4, 5]));
    assert_eq!((s.outcome, s.rejected), (AckOutcome::UnknownBatch, vec![5]));
    let s = g.nack(1, b[0].batch_id, Some(vec![1]), false, 3);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    assert_eq!(g.floor(), 4);
}

#[test]
fn a_group_reloaded_with_a_full_attempt_list_still_delivers_those_messages() {
    // A record written at the bound (the lowest 4,096 failed seqs) after a restart.
    let mut rec = GroupState::new_record(GroupMode::Shared, BTreeMap::new());
    rec.attempts = (1..=MAX_ATTEMPTS as u64).map(|s| (s, 1, 1)).collect();
    let mut g = GroupState::from_record(rec);
    g.join(joining(1, GroupMode::Shared, 1_000, 64, 1_000_000))
        .unwrap();
    let head = MAX_ATTEMPTS as u64 + 10;
    let mut got = 0;
    for _ in 0..1_000 {
        fetch(&mut g, head);
        let b = form(&mut g);
        if b.is_empty() {
            break;
        }
        for b in b {
            for m in &b.messages {
                let want = if m.seq <= MAX_ATTEMPTS as u64 { 2 } else { 1 };
                assert_eq!(m.attempt, want, "seq {}", m.seq);
            }
            got += b.messages.len() as u64;
            g.ack(1, b.batch_id, None);
        }
    }
    assert_eq!((got, g.floor()), (head, head));
    assert!(g.record().attempts.is_empty());
}
