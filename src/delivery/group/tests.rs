//! The delivery rules, tested without actors.

use super::*;
use bytes::Bytes;
use sluice_protocol::Batch;

const LIMITS: Limits = Limits {
    batch_max_bytes: 4 * 1024 * 1024,
    max_retries: 3,
};

fn record(floor: u64) -> GroupRecord {
    GroupState::new_record(GroupMode::Shared, BTreeMap::new()).tap_floor(floor)
}

trait TapFloor {
    fn tap_floor(self, floor: u64) -> Self;
}

impl TapFloor for GroupRecord {
    fn tap_floor(mut self, floor: u64) -> Self {
        self.acked_floor = floor;
        self
    }
}

fn msg(seq: u64, priority: u8) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        seq,
        timestamp_ms: 0,
        key: None,
        headers: BTreeMap::new(),
        priority,
        payload: Bytes::from_static(b"x"),
    })
}

fn consumer(conn: u64) -> ConsumerId {
    ConsumerId { conn, stream: 1 }
}

fn join(g: &mut GroupState, conn: u64, window: u32, batch_size: u32) {
    g.join(Joining {
        consumer: consumer(conn),
        mode: GroupMode::Shared,
        filters: BTreeMap::new(),
        window,
        batch_size,
        credits: 1_000_000,
        max_in_flight_bytes: usize::MAX,
    })
    .unwrap();
}

/// A group with one consumer (conn 1) and messages 1..=n read from the log.
fn group_with(n: u64, window: u32, batch_size: u32) -> GroupState {
    let mut g = GroupState::from_record(record(0));
    join(&mut g, 1, window, batch_size);
    let from = g.start_read();
    let msgs = (1..=n).map(|s| (*msg(s, 0)).clone()).collect();
    assert!(g.finish_read(from, Some((msgs, vec![]))));
    g
}

/// Batch ids are unique, as the orchestrator's shared counter makes them.
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

#[test]
fn acks_advance_the_floor_over_contiguous_settled_seqs() {
    let mut g = group_with(10, 4, 3);
    let batches = form(&mut g);
    assert_eq!(batches.len(), 4);
    let s = g.ack(1, batches[1].batch_id, None);
    assert_eq!((s.outcome, s.count), (AckOutcome::Settled, 3));
    assert_eq!(g.floor(), 0, "seqs 1..=3 are still in flight");
    let s = g.ack(1, batches[0].batch_id, None);
    assert_eq!(s.count, 3);
    assert_eq!(g.floor(), 6);
    assert_eq!(g.lag(10), 4);
    let rec = g.record();
    assert_eq!((rec.acked_floor, rec.acked_ranges.len()), (6, 0));
    assert_eq!(GroupState::from_record(rec).next_read(), 7);
}

#[test]
fn one_held_message_keeps_the_record_one_range_whatever_is_acked_after_it() {
    let mut g = group_with(1, 1, 1);
    let held = form(&mut g);
    assert_eq!(seqs(&held[0]), vec![1]);
    join(&mut g, 2, 1000, 100);
    let mut next = 2u64;
    for _ in 0..200 {
        let n = 100;
        g.offer_tail(&(next..next + n).map(|s| msg(s, 0)).collect::<Vec<_>>());
        next += n;
        for b in form(&mut g) {
            let s = g.ack(2, b.batch_id, None);
            assert_eq!(s.outcome, AckOutcome::Settled);
        }
    }
    let rec = g.record();
    assert_eq!(rec.acked_floor, 0);
    assert_eq!(rec.acked_ranges, vec![(2, next - 1)]);
    let bytes = sluice_protocol::encode(&rec).unwrap();
    assert!(bytes.len() < 128, "record of {} bytes", bytes.len());
    assert_eq!(g.lag(next - 1), 1);
    let s = g.ack(1, held[0].batch_id, None);
    assert_eq!(s.count, 1);
    assert_eq!(g.floor(), next - 1);
    assert!(g.record().acked_ranges.is_empty());
}

#[test]
fn older_records_listing_seqs_one_by_one_still_load() {
    let mut rec = record(2);
    rec.acked_above = vec![1, 4, 5, 7];
    rec.acked_ranges = vec![(9, 10)];
    let g = GroupState::from_record(rec);
    assert_eq!(g.floor(), 2);
    for s in [1, 2, 4, 5, 7, 9, 10] {
        assert!(g.is_settled(s), "{s}");
    }
    for s in [3, 6, 8, 11] {
        assert!(!g.is_settled(s), "{s}");
    }
    let mut g = g;
    let r = g.record();
    assert_eq!(r.acked_ranges, vec![(4, 5), (7, 7), (9, 10)]);
    assert!(r.acked_above.is_empty());
}

#[test]
fn an_ack_settles_only_what_was_delivered_to_that_connection_in_that_batch() {
    let mut g = group_with(30, 1, 10);
    join(&mut g, 2, 1, 10);
    let b = form(&mut g);
    assert_eq!(b.len(), 2);
    let (mine, theirs) = (&b[0], &b[1]);
    assert_eq!(seqs(mine), (1..=10).collect::<Vec<_>>());
    // Connection 3 never subscribed: nothing it names is applied.
    let s = g.ack(3, mine.batch_id, Some(vec![2, 3, 11, 20, 25]));
    assert_eq!((s.outcome, s.count), (AckOutcome::UnknownBatch, 0));
    assert_eq!(s.rejected, vec![2, 3, 11, 20, 25]);
    let s = g.ack(3, mine.batch_id, None);
    assert_eq!((s.outcome, s.count), (AckOutcome::UnknownBatch, 0));
    // Connection 1 names its own batch but seqs of the other consumer's and unread ones.
    let s = g.ack(1, mine.batch_id, Some(vec![2, 12, 25]));
    assert_eq!((s.outcome, s.count), (AckOutcome::Settled, 1));
    assert_eq!(s.rejected, vec![12, 25]);
    // Another's batch id, whole.
    let s = g.ack(1, theirs.batch_id, None);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    assert_eq!(g.lag(30), 29);
    // Repeats: by seq → already acked; whole batch once settled → unknown batch.
    let s = g.ack(1, mine.batch_id, Some(vec![2]));
    assert_eq!((s.outcome, s.count), (AckOutcome::AlreadyAcked, 0));
    let s = g.ack(1, mine.batch_id, None);
    assert_eq!(
        (s.outcome, s.count, s.closed.len()),
        (AckOutcome::Settled, 9, 1)
    );
    let s = g.ack(1, mine.batch_id, None);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    let s = g.ack(1, mine.batch_id, Some(vec![1, 5]));
    assert_eq!(s.outcome, AckOutcome::AlreadyAcked);
    let s = g.nack(3, theirs.batch_id, None, false, 3);
    assert_eq!(s.outcome, AckOutcome::UnknownBatch);
    assert_eq!(g.stats("t", "g", 30).in_flight_messages, 10);
}

#[test]
fn a_release_returns_messages_without_raising_attempt_or_failures() {
    let mut g = group_with(4, 1, 4);
    let b = form(&mut g);
    let s = g.nack(1, b[0].batch_id, Some(vec![3, 4]), true, 0);
    assert_eq!((s.outcome, s.count), (AckOutcome::Settled, 2));
    assert!(
        s.dead.is_empty(),
        "a release is no failure, even with max_retries 0"
    );
    g.ack(1, b[0].batch_id, Some(vec![1, 2]));
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![3, 4]);
    assert!(b[0].messages.iter().all(|m| m.attempt == 1));
    // An ordinary nack counts: the second failure with max_retries 1 dead-letters.
    let s = g.nack(1, b[0].batch_id, None, false, 1);
    assert!(s.dead.is_empty());
    let b = form(&mut g);
    assert!(b[0].messages.iter().all(|m| m.attempt == 2));
    let s = g.nack(1, b[0].batch_id, None, false, 1);
    assert_eq!(s.dead.len(), 2);
}

#[test]
fn a_message_is_dead_lettered_on_its_fourth_failure_with_max_retries_3() {
    let mut g = group_with(1, 1, 1);
    for attempt in 1..=4u32 {
        let b = form(&mut g);
        assert_eq!(b[0].messages[0].attempt, attempt);
        let dead = g.fail_batch(b[0].batch_id, true, 3).unwrap();
        assert_eq!(dead.len(), usize::from(attempt == 4), "attempt {attempt}");
        if attempt == 4 {
            g.dead_lettered(dead, true);
        }
    }
    assert!(g.is_settled(1));
    assert_eq!(g.stats("t", "g", 1).dead_letters, 1);
    // A return on disconnect is no failure.
    let mut g = group_with(1, 1, 1);
    for _ in 0..10 {
        let b = form(&mut g);
        assert!(g.fail_batch(b[0].batch_id, false, 0).unwrap().is_empty());
    }
}

#[test]
fn batches_take_retries_first_then_priority_then_seq() {
    let mut g = GroupState::from_record(record(0));
    join(&mut g, 1, 1, 3);
    let from = g.start_read();
    let msgs = [(1, 0), (3, 0), (4, 5), (5, 0), (6, 5)]
        .iter()
        .map(|&(s, p)| (*msg(s, p)).clone())
        .collect();
    g.finish_read(from, Some((msgs, vec![])));
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![4, 6, 1]);
    g.fail_batch(b[0].batch_id, false, 3);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![1, 4, 6], "retries first");
    g.ack(1, b[0].batch_id, None);
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![3, 5]);
}

#[test]
fn a_batch_counts_every_byte_of_its_messages_and_never_exceeds_a_frame() {
    let mut g = GroupState::from_record(record(0));
    join(&mut g, 1, 100, 1000);
    let big_headers = |seq: u64| {
        let mut m = (*msg(seq, 0)).clone();
        for i in 0..48 {
            m.headers.insert(format!("h{i}"), "v".repeat(64 * 1024));
        }
        m
    };
    let from = g.start_read();
    g.finish_read(from, Some(((1..=20).map(big_headers).collect(), vec![])));
    let limits = Limits {
        batch_max_bytes: usize::MAX,
        max_retries: 3,
    };
    let mut id = 0;
    let formed = g.form_batches("t", "g", limits, || {
        id += 1;
        id
    });
    assert!(formed.undeliverable.is_empty());
    let mut total = 0;
    for o in &formed.batches {
        let bytes = o.data.len();
        assert!(bytes < FRAME_BUDGET, "batch of {bytes} bytes");
        let estimate: usize = o.count as usize * wire_size(&big_headers(1));
        assert!(bytes <= estimate, "the estimate bounds the encoding");
        assert_eq!(o.batch().unwrap().messages.len(), o.count as usize);
        total += o.count as usize;
    }
    assert_eq!(total, 20);
    assert!(formed.batches.len() >= 2);
}

#[test]
fn a_message_too_big_for_any_frame_is_handed_back_to_dead_letter() {
    let mut g = GroupState::from_record(record(0));
    join(&mut g, 1, 10, 10);
    let mut huge = (*msg(2, 0)).clone();
    huge.payload = Bytes::from(vec![0u8; FRAME_BUDGET + 1]);
    let from = g.start_read();
    g.finish_read(
        from,
        Some((
            vec![(*msg(1, 0)).clone(), huge, (*msg(3, 0)).clone()],
            vec![],
        )),
    );
    let mut id = 0;
    let formed = g.form_batches("t", "g", LIMITS, || {
        id += 1;
        id
    });
    assert_eq!(formed.undeliverable.len(), 1);
    assert_eq!(formed.undeliverable[0].msg.seq, 2);
    let delivered: Vec<u64> = formed
        .batches
        .iter()
        .flat_map(|o| seqs(&o.batch().unwrap()))
        .collect();
    assert_eq!(delivered, vec![1, 3]);
    g.dead_lettered(formed.undeliverable, true);
    assert!(g.is_settled(2));
}

#[test]
fn fresh_messages_wait_while_the_cursor_has_too_many_ranges() {
    let mut g = group_with(0, 10, 10);
    // Seqs 1..=3 wait (one returned for a retry); every other seq above them is settled.
    let top = 10 + 2 * MAX_ACK_RANGES as u64;
    for i in 0..MAX_ACK_RANGES as u64 {
        g.above.insert(10 + 2 * i);
    }
    assert_eq!(g.above.range_count(), MAX_ACK_RANGES);
    g.retry.insert(1, Pending::fresh(msg(1, 0)));
    g.next_read = top;
    g.offer_tail(&[msg(top, 0), msg(top + 1, 0)]);
    let b = form(&mut g);
    let delivered: Vec<u64> = b.iter().flat_map(seqs).collect();
    assert_eq!(delivered, vec![1], "only the retry goes out");
    // The floor moves (here: everything below the ranges is acked): fresh messages flow again.
    g.ack(1, b[0].batch_id, None);
    for s in 2..10 {
        g.settle(s);
    }
    assert!(g.above.range_count() < MAX_ACK_RANGES);
    let b = form(&mut g);
    let delivered: Vec<u64> = b.iter().flat_map(seqs).collect();
    assert_eq!(delivered, vec![top, top + 1]);
    assert!(g.record().acked_ranges.len() <= MAX_ACK_RANGES);
}

#[test]
fn the_live_tail_is_bounded_in_bytes() {
    let mut g = group_with(0, 1, 1);
    let mut big = |seq: u64| {
        let mut m = (*msg(seq, 0)).clone();
        m.payload = Bytes::from(vec![0u8; 1024 * 1024]);
        Arc::new(m)
    };
    g.offer_tail(&(1..=4).map(&mut big).collect::<Vec<_>>());
    assert_eq!(g.next_read(), 5);
    g.offer_tail(&(5..=7).map(&mut big).collect::<Vec<_>>());
    assert_eq!(g.next_read(), 8);
    g.offer_tail(&(8..=9).map(&mut big).collect::<Vec<_>>());
    assert_eq!(g.next_read(), 10, "taken while under the bound");
    g.offer_tail(&(10..=11).map(&mut big).collect::<Vec<_>>());
    assert_eq!(
        g.next_read(),
        10,
        "over READ_AHEAD_BYTES: read later from the log"
    );
    assert!(g.ready_bytes <= READ_AHEAD_BYTES + 2 * wire_size(&big(0)));
    assert!(
        !g.wants_read(11),
        "no read while the buffer is over half full"
    );
}

#[test]
fn filtered_out_messages_settle_without_delivery() {
    let mut rec = record(0);
    rec.filters.insert("k".into(), "v".into());
    let mut g = GroupState::from_record(rec.clone());
    g.join(Joining {
        consumer: consumer(1),
        mode: GroupMode::Shared,
        filters: rec.filters.clone(),
        window: 1,
        batch_size: 10,
        credits: 10,
        max_in_flight_bytes: usize::MAX,
    })
    .unwrap();
    let mut yes = (*msg(2, 0)).clone();
    yes.headers.insert("k".into(), "v".into());
    let from = g.start_read();
    g.finish_read(from, Some((vec![(*msg(1, 0)).clone(), yes], vec![])));
    let b = form(&mut g);
    assert_eq!(seqs(&b[0]), vec![2]);
    assert!(g.is_settled(1));
    assert!(g.take_dirty_record().is_some());
    assert!(g.take_dirty_record().is_none());
    let other = g.join(Joining {
        consumer: consumer(2),
        mode: GroupMode::Shared,
        filters: BTreeMap::new(),
        window: 1,
        batch_size: 1,
        credits: 1,
        max_in_flight_bytes: usize::MAX,
    });
    assert_eq!(other.unwrap_err().code, ErrorCode::FilterConflict);
}

#[test]
fn acks_of_messages_in_flight_past_the_range_bound_are_all_recorded() {
    // One consumer holds 2 × MAX_ACK_RANGES + 2 messages in flight and acks every other one:
    // each ack past the bound still adds a range, and the record keeps every one of them.
    let n = 2 * MAX_ACK_RANGES as u64 + 2;
    let mut g = group_with(n, 1, n as u32);
    let b = form(&mut g);
    assert_eq!(b.len(), 1);
    let evens: Vec<u64> = (1..=n).filter(|s| s % 2 == 0).collect();
    let s = g.ack(1, b[0].batch_id, Some(evens.clone()));
    assert_eq!(s.count as usize, evens.len());
    assert!(g.above.range_count() > MAX_ACK_RANGES);
    let rec = g.record();
    assert_eq!(rec.acked_ranges.len(), evens.len());
    let back = GroupState::from_record(rec);
    for seq in 1..=n {
        assert_eq!(back.is_settled(seq), seq % 2 == 0, "seq {seq}");
    }
}

#[test]
fn a_consumer_holds_at_most_its_bytes_in_flight() {
    let mut g = GroupState::from_record(record(0));
    g.join(Joining {
        consumer: consumer(1),
        mode: GroupMode::Shared,
        filters: BTreeMap::new(),
        window: 100,
        batch_size: 1,
        credits: 100,
        max_in_flight_bytes: 2 * wire_size(&msg(1, 0)),
    })
    .unwrap();
    let from = g.start_read();
    g.finish_read(
        from,
        Some(((1..=5).map(|s| (*msg(s, 0)).clone()).collect(), vec![])),
    );
    let b = form(&mut g);
    assert_eq!(
        b.len(),
        2,
        "two messages' worth of bytes, whatever the window"
    );
    assert!(form(&mut g).is_empty());
    g.ack(1, b[0].batch_id, None);
    let more = form(&mut g);
    assert_eq!(more.len(), 1, "room for one more once a batch closed");
    g.fail_batch(b[1].batch_id, false, 3);
    assert_eq!(
        form(&mut g).len(),
        1,
        "a returned batch frees its bytes too"
    );
}

#[test]
fn an_empty_ack_of_a_batch_not_in_flight_to_the_connection_changes_nothing() {
    let mut g = group_with(2, 1, 2);
    let b = form(&mut g);
    let s = g.ack(2, b[0].batch_id, Some(vec![]));
    assert_eq!((s.outcome, s.count), (AckOutcome::UnknownBatch, 0));
    assert!(g.take_dirty_record().is_none());
    let s = g.ack(1, b[0].batch_id, Some(vec![]));
    assert_eq!((s.outcome, s.count), (AckOutcome::AlreadyAcked, 0));
}
