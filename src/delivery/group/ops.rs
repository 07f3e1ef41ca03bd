//! Group operations on a group's delivery state (issue 11), apart from the delivery rules of
//! `group.rs`: the redelivery schedule and delayed retries, attempt counts kept in the durable
//! record, per-consumer activity (lag, stale consumers, stats), seek, moving up to the topic's
//! retained floor, and the reset notices its consumers are owed. See
//! `src/actors/orchestrator.md` (backoff, attempts, stale, seek, floor).
//!
//! Time comes in as an `Instant` argument wherever a rule depends on it, so the tests can move
//! the clock.
//!
//! `broadcast`: each member's state (`broadcast.rs`) has its own delayed retries, activity,
//! stale flag and notices; the group's state keeps the schedule, the record's attempt counts
//! (per seq the most failed member's, so a message that crashes every member still reaches
//! the dead-letter topic after a restart) and the retention counter, and asks its members for
//! the rest.

use super::*;
use sluice_protocol::{ConsumerStats, ResetNotice};
use std::time::{Duration, Instant};

/// Messages waiting for a delayed redelivery (a nack's delay, the group's schedule), at most per
/// group (per member in `broadcast`): at this many, fresh messages wait (retries and acks go
/// on), as at [`MAX_ACK_RANGES`]. A waiting message keeps only its seq, counts, due time, key
/// hash and timestamp ([`Parked`], under 100 bytes with its map entries), not its body: that is
/// read back from the log when it is due. So the bound is a few MiB per group whatever the
/// messages weigh.
pub const MAX_WAITING: usize = 65_536;
/// Unsettled messages that have failed (timeout, counted nack), at most per group (per member
/// in `broadcast`), and so entries of the `attempts` list of its durable record: at this many,
/// fresh messages wait (retries and acks go on), as at [`MAX_ACK_RANGES`], so that the record,
/// which every failure rewrites, stays under about 80 KB. Only failures in flight when the bound
/// was reached can take it further; a record then keeps the lowest seqs and a restart forgets
/// the counts of the rest (they start again at attempt 1): a `memory_pressure` event says so.
pub const MAX_ATTEMPTS: usize = 4096;

/// What one consumer of the group has been doing.
#[derive(Debug, Clone)]
pub(super) struct Activity {
    joined: Instant,
    last_ack: Option<Instant>,
    /// When its current spell of work began: it went from having nothing to do to having work
    /// (see [`GroupState::note_busy`]). A consumer is idle since its last ack or this, whichever
    /// is later: one that had nothing to do for hours is not idle the moment it gets work.
    busy_since: Option<Instant>,
    /// It had work at the last look: it receives messages, the group (member) has lag, and it
    /// holds a batch or has no credits.
    busy: bool,
    /// A delivery to it failed (timeout, counted nack) since its last ack while the group had
    /// lag: its next spell of work continues this one (a consumer that never acks stays idle
    /// across the gaps its own timeouts leave).
    failed: bool,
    delivered: u64,
    acked: u64,
    /// Flagged stale (one `consumer_stale` event per episode).
    stale: bool,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Activity {
            joined: now,
            last_ack: None,
            busy_since: None,
            busy: false,
            failed: false,
            delivered: 0,
            acked: 0,
            stale: false,
        }
    }

    /// Since its last ack (or its join).
    fn since_ack(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_ack.unwrap_or(self.joined))
    }

    /// How long it has had work without acking: since its last ack, its join or the start of
    /// its current spell of work, whichever is latest.
    fn idle(&self, now: Instant) -> Duration {
        let since = [Some(self.joined), self.last_ack, self.busy_since]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.joined);
        now.saturating_duration_since(since)
    }
}

/// A message set aside for a delayed redelivery: what its redelivery needs, without its body
/// (read back from the log when it is due).
#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    deliveries: u32,
    failures: u32,
    /// `key_shared`: its key's hash (it holds the key's later messages back).
    hash: Option<u16>,
    /// Its stored timestamp (stats: the oldest unsettled message's age).
    timestamp_ms: u64,
}

impl Parked {
    fn of(p: &Pending) -> Self {
        Parked {
            deliveries: p.deliveries,
            failures: p.failures,
            hash: key_shared::message_hash(&p.msg),
            timestamp_ms: p.msg.timestamp_ms,
        }
    }
}

/// The state of the group operations, one per [`GroupState`].
#[derive(Debug, Default)]
pub(super) struct GroupOps {
    /// Redelivery schedule, ms per step (empty: the broker's `batch_timeout`).
    backoff: Vec<u64>,
    /// Retries not due yet, by (due, seq).
    waiting: BTreeMap<(Instant, u64), Parked>,
    /// seq → due, of `waiting`.
    waiting_due: SeqMap<Instant>,
    /// Retries due, to read back from the log (then they go to `retry`), by seq.
    due: BTreeMap<u64, Parked>,
    /// A read of due retries from this seq is under way, of this many messages at most.
    retry_read: Option<(u64, usize)>,
    /// Attempt counts from the record loaded, `(deliveries, failures)` by seq, until settled.
    restored: SeqMap<(u32, u32)>,
    /// Unsettled seqs that have failed since the group was loaded (their messages are in
    /// `retry`, waiting, in flight or on their way to the dead letters, never in `ready`):
    /// bounded by [`MAX_ATTEMPTS`]; a seq leaves it when it is settled. Seqs known only from
    /// the record loaded (`restored`) do not count: after a restart their messages are read
    /// back as fresh ones, and holding fresh messages back for them would hold them forever.
    failed: SeqSet,
    activity: HashMap<ConsumerId, Activity>,
    /// Last ack by any consumer.
    last_ack: Option<Instant>,
    /// Reset notices owed, at most one per consumer (later ones merge into it).
    notices: BTreeMap<ConsumerId, ResetNotice>,
    skipped_by_retention: u64,
    /// Which bound holds fresh messages back now.
    pressure: Option<&'static str>,
    /// A bound was reached and not reported yet (`memory_pressure`).
    pressure_event: Option<&'static str>,
    /// Times a bound was reached.
    bound_hits: u64,
    /// The last record left attempt counts out.
    attempts_cut: bool,
}

impl GroupOps {
    /// From a durable record's schedule and attempt counts. (Records of earlier versions may
    /// list up to 65,536: all are kept, until their messages settle.)
    pub(super) fn load(backoff: Vec<u64>, attempts: Vec<(u64, u32, u32)>) -> Self {
        let restored: SeqMap<(u32, u32)> =
            attempts.into_iter().map(|(s, d, f)| (s, (d, f))).collect();
        GroupOps {
            backoff,
            restored,
            ..Default::default()
        }
    }
}

/// What a seek or a move to the floor did to a group.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Batches that were in flight and are void now (their timers to cancel).
    pub voided: Vec<u64>,
    /// Unsettled messages below the new position (not delivered now).
    pub skipped: u64,
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

impl GroupState {
    /// The redelivery schedule (ms per step; empty: none).
    pub fn backoff(&self) -> &[u64] {
        &self.ops.backoff
    }

    /// A subscribe that asks for schedule `wanted` may join only a group with that schedule
    /// (`MODE_CONFLICT` otherwise); one that asks for none joins any.
    pub fn check_backoff(&self, wanted: Option<&[u64]>) -> Result<(), WireError> {
        match wanted {
            Some(w) if w != self.ops.backoff.as_slice() => Err(WireError::new(
                ErrorCode::ModeConflict,
                format!(
                    "group exists with backoff {:?} ms, not {:?} ms",
                    self.ops.backoff, w
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Step `n` (1-based) of the schedule; the last one repeats.
    fn step(&self, n: u32) -> Option<u64> {
        let s = &self.ops.backoff;
        let last = s.len().checked_sub(1)?;
        s.get((n.max(1) as usize - 1).min(last)).copied()
    }

    /// How long a batch may stay unacked before it is redelivered, by the schedule: the entry
    /// of the smallest delivery count in it (`min_attempt`, [`super::Outgoing::min_attempt`]).
    /// `None`: the broker's `batch_timeout`.
    pub fn redelivery_timeout(&self, min_attempt: u32) -> Option<Duration> {
        if self.ops.backoff.is_empty() {
            return None;
        }
        self.step(min_attempt).map(ms)
    }

    /// Drops restored counts (and failed seqs) that are settled (after loading).
    pub(super) fn prune_restored(&mut self) {
        let (floor, above) = (self.floor, &self.above);
        self.ops
            .restored
            .retain(|s, _| *s > floor && !above.contains(*s));
        self.ops
            .failed
            .retain(|s| *s > floor && !above.contains(*s));
    }

    /// `broadcast`: a member joining takes the attempt counts of the record the group was
    /// loaded from (after a restart), for the messages the group has not settled; never the
    /// live counts of the other members (§6.8: counts are per member). A group that was never
    /// reloaded has none to give.
    pub(super) fn inherit_restored(&mut self, from: &GroupState) {
        self.ops.restored = from.ops.restored.clone();
        self.prune_restored();
    }

    /// A message read from the log again takes the counts its record kept.
    pub(super) fn revive(&self, p: &mut Pending) {
        if let Some(&(d, f)) = self.ops.restored.get(&p.msg.seq) {
            p.deliveries = d;
            p.failures = f;
        }
    }

    /// Whether `seq` waits for a delayed redelivery (not due yet, or due and not read back).
    pub(super) fn is_waiting(&self, seq: u64) -> bool {
        self.ops.waiting_due.contains_key(&seq) || self.ops.due.contains_key(&seq)
    }

    /// Fresh messages may be handed out as far as the delayed retries and the failed messages
    /// go ([`MAX_WAITING`], [`MAX_ATTEMPTS`]).
    pub(super) fn waiting_allows_fresh(&self) -> bool {
        self.ops.waiting.len() + self.ops.due.len() < MAX_WAITING
            && self.ops.failed.len() < MAX_ATTEMPTS
    }

    /// A delivery failed (timeout, nack): the record, which now carries attempt counts, is to
    /// be written.
    pub(super) fn note_failure(&mut self) {
        self.dirty = true;
    }

    /// Message `seq` has failed at least once (it is unsettled).
    pub(super) fn note_failed_seq(&mut self, seq: u64) {
        self.ops.failed.insert(seq);
    }

    /// `seq` is settled: it no longer counts as failed.
    pub(super) fn forget_failed_seq(&mut self, seq: u64) {
        if !self.ops.failed.is_empty() {
            self.ops.failed.remove(&seq);
        }
    }

    /// A delivery to `consumer` failed (timeout, counted nack): its spell of work goes on.
    pub(super) fn note_failed_by(&mut self, consumer: ConsumerId) {
        if let Some(a) = self.ops.activity.get_mut(&consumer) {
            a.failed = true;
        }
    }

    /// A batch of `msgs` went to `consumer`. (A redelivery commits nothing: the record's counts
    /// are those of each message's last failure, see §6.12.)
    pub(super) fn note_delivered(&mut self, consumer: ConsumerId, msgs: &BTreeMap<u64, Pending>) {
        if let Some(a) = self.ops.activity.get_mut(&consumer) {
            a.delivered += msgs.len() as u64;
        }
    }

    /// A consumer joined (its idle time counts from now).
    pub(super) fn note_join(&mut self, consumer: ConsumerId) {
        self.ops
            .activity
            .entry(consumer)
            .or_insert_with(|| Activity::new(Instant::now()));
    }

    /// A consumer left.
    pub(super) fn note_leave(&mut self, consumer: ConsumerId) {
        self.ops.activity.remove(&consumer);
        self.ops.notices.remove(&consumer);
    }

    /// The consumer a batch is in flight to, if it is in flight to connection `conn`.
    pub(super) fn batch_owner(&self, conn: u64, batch_id: u64) -> Option<ConsumerId> {
        self.in_flight
            .get(&batch_id)
            .filter(|b| b.consumer.conn == conn)
            .map(|b| b.consumer)
    }

    /// `consumer` acked (`count` messages settled by it).
    pub(super) fn note_ack(&mut self, consumer: ConsumerId, count: u32) {
        let now = Instant::now();
        self.ops.last_ack = Some(now);
        if let Some(a) = self.ops.activity.get_mut(&consumer) {
            a.last_ack = Some(now);
            a.acked += u64::from(count);
            a.stale = false;
            a.failed = false;
        }
    }

    /// `broadcast`: the members' states (none in other modes).
    fn members(&self) -> impl Iterator<Item = &GroupState> {
        self.bc
            .iter()
            .flat_map(|bc| bc.members.iter().map(|(_, m)| m))
    }

    fn members_mut(&mut self) -> impl Iterator<Item = &mut GroupState> {
        self.bc
            .iter_mut()
            .flat_map(|bc| bc.members.iter_mut().map(|(_, m)| m))
    }

    /// The attempt counts for the durable record: every unsettled message in memory (or known
    /// from the record loaded) that has failed, lowest seq first, at most [`MAX_ATTEMPTS`].
    pub(super) fn attempts_record(&mut self) -> Vec<(u64, u32, u32)> {
        let none = |g: &GroupState| g.ops.failed.is_empty() && g.ops.restored.is_empty();
        if none(self) && self.members().all(none) {
            // No unsettled message has failed: nothing to scan, nothing to write.
            self.ops.attempts_cut = false;
            return Vec::new();
        }
        let mut m = BTreeMap::new();
        self.collect_failed(&mut m);
        if let Some(bc) = self.bc.as_mut() {
            for (_, member) in bc.members.iter_mut() {
                member.collect_failed(&mut m);
            }
        }
        let mut v: Vec<(u64, u32, u32)> = m.into_iter().map(|(s, (d, f))| (s, d, f)).collect();
        let cut = v.len() > MAX_ATTEMPTS;
        if cut {
            v.truncate(MAX_ATTEMPTS);
            if !self.ops.attempts_cut {
                self.hit_bound("attempt counts");
            }
        }
        self.ops.attempts_cut = cut;
        v
    }

    /// Adds this state's counts of failed messages to `into` (per seq the most failures).
    fn collect_failed(&mut self, into: &mut BTreeMap<u64, (u32, u32)>) {
        self.prune_restored();
        let mut add = |seq: u64, d: u32, f: u32| {
            let e = into.entry(seq).or_insert((d, f));
            if (f, d) > (e.1, e.0) {
                *e = (d, f);
            }
        };
        for (&s, &(d, f)) in &self.ops.restored {
            add(s, d, f);
        }
        let live = self
            .retry
            .values()
            .chain(self.ready.iter())
            .chain(self.in_flight.values().flat_map(|b| b.msgs.values()));
        for p in live {
            if p.failures > 0 {
                add(p.msg.seq, p.deliveries, p.failures);
            }
        }
        let parked = self
            .ops
            .waiting
            .iter()
            .map(|(&(_, s), w)| (s, w))
            .chain(self.ops.due.iter().map(|(&s, w)| (s, w)));
        for (s, w) in parked {
            if w.failures > 0 {
                add(s, w.deliveries, w.failures);
            }
        }
    }

    /// A nack with the group's schedule and an optional delay: like [`GroupState::nack`], then
    /// each message returned waits `delay`, else (a counted nack on a group with a schedule)
    /// the schedule's entry of its failure count, else nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn nack_delayed(
        &mut self,
        conn: u64,
        batch_id: u64,
        seqs: Option<Vec<u64>>,
        release: bool,
        max_retries: u32,
        delay: Option<Duration>,
        now: Instant,
    ) -> Settlement {
        if self.bc.is_some() {
            // The member holding the batch parks its own copies.
            let s = self.broadcast_settle(batch_id, conn, |m| {
                m.nack_delayed(conn, batch_id, seqs, release, max_retries, delay, now)
            });
            if !release && s.count > 0 {
                self.note_failure();
            }
            return s;
        }
        let applied: Vec<u64> = match self.in_flight.get(&batch_id) {
            Some(b) if b.consumer.conn == conn => match &seqs {
                Some(s) => s
                    .iter()
                    .copied()
                    .filter(|s| b.msgs.contains_key(s))
                    .collect(),
                None => b.msgs.keys().copied().collect(),
            },
            _ => Vec::new(),
        };
        let s = self.nack(conn, batch_id, seqs, release, max_retries);
        for seq in applied {
            let Some(p) = self.retry.get(&seq) else {
                continue;
            };
            let wait = match delay {
                Some(d) => Some(d),
                None if !release => self.step(p.failures).map(ms),
                None => None,
            };
            if let Some(w) = wait.filter(|w| !w.is_zero()) {
                if let Some(p) = self.retry.remove(&seq) {
                    self.park(p, now + w);
                }
            }
        }
        s
    }

    /// Sets `p` aside until `due`: only its counts stay in memory (see [`Parked`]).
    fn park(&mut self, p: Pending, due: Instant) {
        let seq = p.msg.seq;
        if let Some(old) = self.ops.waiting_due.insert(seq, due) {
            self.ops.waiting.remove(&(old, seq));
        }
        self.ops.due.remove(&seq);
        self.ops.waiting.insert((due, seq), Parked::of(&p));
    }

    /// When the earliest delayed retry is due.
    pub fn next_due(&self) -> Option<Instant> {
        let own = self.ops.waiting.first_key_value().map(|((t, _), _)| *t);
        self.members().filter_map(|m| m.next_due()).chain(own).min()
    }

    /// Delayed retries due by `now` are due: they are read back from the log (the next read
    /// of the group, [`GroupState::wants_read`]) and then delivered as ordinary retries;
    /// returns how many.
    pub fn release_due(&mut self, now: Instant) -> usize {
        let mut n: usize = self.members_mut().map(|m| m.release_due(now)).sum();
        while let Some((&(due, seq), _)) = self.ops.waiting.first_key_value() {
            if due > now {
                break;
            }
            let Some(w) = self.ops.waiting.remove(&(due, seq)) else {
                break;
            };
            self.ops.waiting_due.remove(&seq);
            if !self.is_settled(seq) {
                self.ops.due.insert(seq, w);
                n += 1;
            }
        }
        n
    }

    /// Messages waiting for a delayed redelivery (not due yet, or due and not read back yet).
    pub fn waiting_count(&self) -> usize {
        let own = self.ops.waiting.len() + self.ops.due.len();
        own + self.members().map(|m| m.waiting_count()).sum::<usize>()
    }

    /// `key_shared`: the key hashes of the messages waiting for a delayed redelivery (their
    /// keys' later messages wait behind them: order per key).
    pub(super) fn waiting_hashes(&self) -> HashSet<u16> {
        self.ops
            .waiting
            .values()
            .chain(self.ops.due.values())
            .filter_map(|w| w.hash)
            .collect()
    }

    /// Whether `retry` has room for due retries read back from the log (as `ready` for fresh
    /// messages: half the read-ahead bounds).
    fn retry_has_room(&self) -> bool {
        self.retry.len() < READ_AHEAD / 2
            && self.retry.values().map(|p| p.size).sum::<usize>() < READ_AHEAD_BYTES / 2
    }

    /// Whether due retries are to be read back from the log now.
    pub(super) fn wants_retry_read(&self) -> bool {
        !self.ops.due.is_empty() && !self.reading && self.retry_has_room()
    }

    /// The seq and the number of messages of a read bringing the lowest due retries back:
    /// from the lowest one up to the highest due one within [`READ_AHEAD`]` / 2` seqs of it.
    pub(super) fn retry_read_span(&self) -> Option<(u64, usize)> {
        let (&first, _) = self.ops.due.first_key_value()?;
        let reach = first.saturating_add(READ_AHEAD as u64 / 2 - 1);
        let last = self
            .ops
            .due
            .range(first..=reach)
            .next_back()
            .map_or(first, |(&s, _)| s);
        Some((first, (last - first + 1) as usize))
    }

    /// Starts a read of due retries if one is wanted; its first seq. (They go before fresh
    /// messages and replays: retries first.)
    pub(super) fn start_retry_read(&mut self) -> Option<u64> {
        if !self.wants_retry_read() {
            return None;
        }
        let (from, n) = self.retry_read_span()?;
        self.ops.retry_read = Some((from, n));
        self.reading = true;
        Some(from)
    }

    /// How many messages the read just started should bring at most.
    pub fn read_span(&self) -> usize {
        match self.ops.retry_read {
            Some((_, n)) if self.reading => n,
            _ => READ_AHEAD / 2,
        }
    }

    /// Whether the read from `from` that finished is a read of due retries.
    pub(super) fn retry_reading(&self, from: u64) -> bool {
        self.ops.retry_read.is_some_and(|(f, _)| f == from)
    }

    /// A read of due retries from `from` finished (or failed: `None`): the due messages it
    /// brought go to `retry` with their counts.
    pub(super) fn finish_retry_read(
        &mut self,
        from: u64,
        result: Option<(Vec<StoredMessage>, Vec<u64>)>,
    ) -> bool {
        self.reading = false;
        self.ops.retry_read = None;
        let Some((messages, corrupt)) = result else {
            return true;
        };
        let last = messages
            .iter()
            .map(|m| m.seq)
            .chain(corrupt.iter().copied())
            .max();
        for m in messages {
            if self.ops.due.contains_key(&m.seq) {
                self.take_due(Pending::fresh(Arc::new(m)));
            }
        }
        self.due_read_end(from, last, &corrupt);
        true
    }

    /// A message read back from the log: if it is a due retry, it goes to `retry` with its
    /// counts.
    pub(super) fn take_due(&mut self, mut p: Pending) {
        let seq = p.msg.seq;
        let Some(w) = self.ops.due.remove(&seq) else {
            return;
        };
        if self.is_settled(seq) {
            return;
        }
        p.deliveries = w.deliveries;
        p.failures = w.failures;
        self.retry.insert(seq, p);
    }

    /// After a read from `from` whose last seq was `last` (None: it brought nothing): due
    /// retries in `from..=last` it did not bring (corrupt, or gone from the log) cannot be
    /// delivered again: settled, with an error log, as corrupt messages are. A read that
    /// brought nothing settles nothing (what retention removed goes by the floor move that
    /// follows every read, `ReadResult.floor`).
    pub(super) fn due_read_end(&mut self, from: u64, last: Option<u64>, corrupt: &[u64]) {
        let Some(last) = last.filter(|l| *l >= from) else {
            return;
        };
        if self.ops.due.is_empty() {
            return;
        }
        let gone: Vec<u64> = self.ops.due.range(from..=last).map(|(&s, _)| s).collect();
        for seq in gone {
            self.ops.due.remove(&seq);
            if corrupt.contains(&seq) {
                tracing::error!(seq, "corrupt message skipped (settled without delivery)");
            } else {
                tracing::error!(
                    seq,
                    "a delayed retry is no longer in the log: settled without delivery"
                );
            }
            self.settle(seq);
        }
    }

    fn hit_bound(&mut self, what: &'static str) {
        self.ops.bound_hits += 1;
        self.ops.pressure_event = Some(what);
    }

    /// Checks the bounds that hold fresh messages back (after forming batches): the start of
    /// each episode is reported once through [`GroupState::take_pressure_event`].
    pub(super) fn note_pressure(&mut self) {
        let now = if self.above.range_count() >= MAX_ACK_RANGES {
            Some("ack ranges")
        } else if self.ops.waiting.len() + self.ops.due.len() >= MAX_WAITING {
            Some("delayed retries")
        } else if self.ops.failed.len() >= MAX_ATTEMPTS {
            Some("attempt counts")
        } else {
            None
        };
        if now.is_some() && self.ops.pressure.is_none() {
            self.hit_bound(now.unwrap_or_default());
        }
        self.ops.pressure = now;
    }

    /// A bound reached since the last call (for a `memory_pressure` event).
    pub fn take_pressure_event(&mut self) -> Option<&'static str> {
        let mut e = self.ops.pressure_event.take();
        for m in self.members_mut() {
            e = e.or(m.ops.pressure_event.take());
        }
        e
    }

    /// Whether slot `idx` receives messages now (a failover standby does not).
    fn receives(&self, idx: usize) -> bool {
        match self.mode {
            GroupMode::Exclusive | GroupMode::Failover => idx == 0,
            _ => true,
        }
    }

    /// Whether consumer `idx` has work now: it receives messages, the group has lag, and it
    /// holds batches in flight or has no credits.
    fn has_work(&self, idx: usize, lag: u64) -> bool {
        let Some(c) = self.consumers.get(idx) else {
            return false;
        };
        self.receives(idx) && lag > 0 && (c.in_flight > 0 || c.credits == 0)
    }

    /// Notes which consumers have work now (`head`: the topic's head): one that had none
    /// starts a spell of work now, so its idle time counts from now, not from an ack long ago
    /// (it got a batch while holding none, ran out of credits while there is lag, the group's
    /// lag went from 0 to more, it was promoted). Called after every change (the orchestrator's
    /// pump) and before every stale check.
    pub fn note_busy(&mut self, now: Instant, head: u64) {
        let lag = self.lag(head);
        for i in 0..self.consumers.len() {
            let work = self.has_work(i, lag);
            let Some(a) = self.ops.activity.get_mut(&self.consumers[i].id) else {
                continue;
            };
            if lag == 0 {
                // Nothing left to do for anyone: a failure before does not carry over.
                a.failed = false;
            }
            if work && !a.busy && !a.failed {
                a.busy_since = Some(now);
            }
            a.busy = work;
        }
        for m in self.members_mut() {
            m.note_busy(now, head);
        }
    }

    /// How long consumer `idx` has been idle, if it is stale by `older_than`: it has work (see
    /// [`Self::has_work`]) and has not acked for `older_than` since its spell of work began
    /// (since its last ack, if later; since it joined, if never).
    fn idle_if_stale(
        &self,
        idx: usize,
        now: Instant,
        older_than: Duration,
        lag: u64,
    ) -> Option<Duration> {
        if !self.has_work(idx, lag) {
            return None;
        }
        let c = self.consumers.get(idx)?;
        let idle = self.ops.activity.get(&c.id)?.idle(now);
        (idle >= older_than).then_some(idle)
    }

    /// Consumers stale by `older_than` now: (consumer, ms idle, its lag).
    pub fn stale_consumers(
        &self,
        now: Instant,
        older_than: Duration,
        head: u64,
    ) -> Vec<(ConsumerId, u64, u64)> {
        let lag = self.lag(head);
        let mut out: Vec<(ConsumerId, u64, u64)> = (0..self.consumers.len())
            .filter_map(|i| {
                let idle = self.idle_if_stale(i, now, older_than, lag)?;
                Some((self.consumers[i].id, idle.as_millis() as u64, lag))
            })
            .collect();
        for m in self.members() {
            out.extend(m.stale_consumers(now, older_than, head));
        }
        out
    }

    /// Flags consumers stale by `stale_after` (and unflags those no longer stale); returns the
    /// ones flagged now (consumer, ms idle, its lag): one `consumer_stale` per episode.
    pub fn check_stale(
        &mut self,
        now: Instant,
        stale_after: Duration,
        head: u64,
    ) -> Vec<(ConsumerId, u64, u64)> {
        self.note_busy(now, head);
        let lag = self.lag(head);
        let stale: Vec<(ConsumerId, u64)> = (0..self.consumers.len())
            .filter_map(|i| {
                let idle = self.idle_if_stale(i, now, stale_after, lag)?;
                Some((self.consumers[i].id, idle.as_millis() as u64))
            })
            .collect();
        let mut newly = Vec::new();
        for (id, a) in self.ops.activity.iter_mut() {
            let s = stale.iter().find(|(c, _)| c == id);
            if let Some(&(c, idle)) = s {
                if !a.stale {
                    newly.push((c, idle, lag));
                }
            }
            a.stale = s.is_some();
        }
        if let Some(bc) = self.bc.as_mut() {
            for (_, m) in bc.members.iter_mut() {
                newly.extend(m.check_stale(now, stale_after, head));
            }
        }
        newly.sort_unstable();
        newly
    }

    /// Consumers present.
    pub fn consumer_ids(&self) -> Vec<ConsumerId> {
        let own = self.consumers.iter().map(|c| c.id);
        own.chain(self.members().flat_map(|m| m.consumer_ids()))
            .collect()
    }

    /// Whether `consumer` is in the group.
    pub fn has_consumer(&self, consumer: ConsumerId) -> bool {
        self.consumers.iter().any(|c| c.id == consumer)
            || self.members().any(|m| m.has_consumer(consumer))
    }

    /// Batches in flight.
    pub fn batch_ids(&self) -> Vec<u64> {
        let own = self.in_flight.keys().copied();
        own.chain(self.members().flat_map(|m| m.batch_ids()))
            .collect()
    }

    /// Every consumer is owed a `reset` notice (merged into one it is still owed).
    pub fn queue_reset(&mut self, reason: &str, floor_seq: u64, skipped: u64) {
        let own: Vec<ConsumerId> = self.consumers.iter().map(|c| c.id).collect();
        self.queue_reset_to(&own, reason, floor_seq, skipped);
        for m in self.members_mut() {
            m.queue_reset(reason, floor_seq, skipped);
        }
    }

    /// `consumers` (of this state) are owed a `reset` notice.
    fn queue_reset_to(
        &mut self,
        consumers: &[ConsumerId],
        reason: &str,
        floor_seq: u64,
        skipped: u64,
    ) {
        for &c in consumers {
            let n = self.ops.notices.entry(c).or_insert(ResetNotice {
                reason: String::new(),
                floor_seq,
                skipped: 0,
            });
            n.reason = reason.to_string();
            n.floor_seq = floor_seq;
            n.skipped += skipped;
        }
    }

    /// The notices owed to consumers that have a credit, each taking one (the others wait for
    /// a credit). Sent before any batch formed after them.
    pub fn take_notices(&mut self) -> Vec<(ConsumerId, ResetNotice)> {
        let mut out: Vec<(ConsumerId, ResetNotice)> =
            self.members_mut().flat_map(|m| m.take_notices()).collect();
        if self.ops.notices.is_empty() {
            return out;
        }
        for c in self.consumers.iter_mut() {
            if c.credits == 0 {
                continue;
            }
            if let Some(n) = self.ops.notices.remove(&c.id) {
                c.credits -= 1;
                out.push((c.id, n));
            }
        }
        out
    }

    /// Unsettled seqs in `floor+1..=to`.
    fn unsettled_through(&self, to: u64) -> u64 {
        if to <= self.floor {
            return 0;
        }
        let settled: u64 = self
            .above
            .ranges()
            .take_while(|&(s, _)| s <= to)
            .map(|(s, e)| e.min(to) - s + 1)
            .sum();
        (to - self.floor).saturating_sub(settled)
    }

    /// Moves the group so that `next` is the next message delivered (`group.seek`): every seq
    /// below is settled, none above; what waits is dropped, batches in flight are void (an ack
    /// of one is `already_acked` for the seqs below `next` it names, `unknown_batch` otherwise),
    /// attempt counts are forgotten, `key_shared` holds and parked hashes are dropped, and each
    /// consumer is owed a `reset` notice (reason `seek`).
    pub fn seek(&mut self, next: u64) -> Moved {
        let next = next.max(1);
        let skipped = self.unsettled_through(next - 1);
        self.floor = next - 1;
        self.above = SeqRanges::new();
        self.next_read = next;
        self.ready.clear();
        self.ready_bytes = 0;
        self.retry.clear();
        self.ops.waiting.clear();
        self.ops.waiting_due.clear();
        self.ops.due.clear();
        self.ops.retry_read = None;
        self.ops.restored.clear();
        self.ops.failed.clear();
        self.dead_lettering.clear();
        self.seq_batch.clear();
        // The void batches hold no key any more; parked hashes are read again from `next`.
        self.key_shared_reset();
        let mut voided: Vec<u64> = Vec::with_capacity(self.in_flight.len());
        for (id, b) in self.in_flight.drain() {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == b.consumer) {
                c.closed(b.bytes);
            }
            voided.push(id);
        }
        for m in self.members_mut() {
            // Each member's own notice; the group's count of what was skipped.
            voided.extend(m.seek(next).voided);
        }
        voided.sort_unstable();
        self.dirty = true;
        let own: Vec<ConsumerId> = self.consumers.iter().map(|c| c.id).collect();
        self.queue_reset_to(&own, "seek", next, skipped);
        Moved { voided, skipped }
    }

    /// The topic's retained floor is `floor_seq` (retention removed what lies below): a group
    /// below it moves up to it. Every seq below is settled; the unsettled ones skipped are
    /// counted (`skipped_by_retention`), each consumer is owed a `reset` notice (reason
    /// `retention`). Messages in flight below it stay in their batches: their acks say
    /// `already_acked`. `None` when the group is at or above it already.
    pub fn move_to_floor(&mut self, floor_seq: u64) -> Option<u64> {
        let to = floor_seq.checked_sub(1)?;
        for m in self.members_mut() {
            m.move_to_floor(floor_seq);
        }
        if to <= self.floor {
            return None;
        }
        let skipped = self.unsettled_through(to);
        self.above.remove_through(to);
        self.floor = to;
        self.advance_floor();
        self.next_read = self.next_read.max(floor_seq);
        let mut ready_bytes = 0;
        self.ready.retain(|p| {
            let keep = p.msg.seq > to;
            if keep {
                ready_bytes += p.size;
            }
            keep
        });
        self.ready_bytes = ready_bytes;
        self.retry.retain(|&s, _| s > to);
        let gone: Vec<(Instant, u64)> = self
            .ops
            .waiting
            .keys()
            .filter(|(_, s)| *s <= to)
            .copied()
            .collect();
        for k in gone {
            self.ops.waiting.remove(&k);
            self.ops.waiting_due.remove(&k.1);
        }
        self.ops.due.retain(|&s, _| s > to);
        self.ops.restored.retain(|&s, _| s > to);
        self.ops.failed.retain(|&s| s > to);
        self.key_shared_floor_moved(floor_seq);
        self.ops.skipped_by_retention += skipped;
        self.dirty = true;
        let own: Vec<ConsumerId> = self.consumers.iter().map(|c| c.id).collect();
        self.queue_reset_to(&own, "retention", floor_seq, skipped);
        Some(skipped)
    }

    /// The activity of this state's consumers into their stats (built by
    /// `consumer_details`, in the order of the slots).
    pub(super) fn fill_details(&self, details: &mut [ConsumerStats]) {
        let now = Instant::now();
        let now_ms = crate::actors::now_ms();
        for (d, c) in details.iter_mut().zip(&self.consumers) {
            let a = self.ops.activity.get(&c.id);
            d.delivered = a.map_or(0, |a| a.delivered);
            d.acked = a.map_or(0, |a| a.acked);
            d.last_ack_ms_ago = a.map_or(0, |a| a.since_ack(now).as_millis() as u64);
            d.stale = a.is_some_and(|a| a.stale);
            d.oldest_unacked_age_ms = self
                .in_flight
                .values()
                .filter(|b| b.consumer == c.id)
                .flat_map(|b| b.msgs.values())
                .map(|p| p.msg.timestamp_ms)
                .min()
                .map(|ts| now_ms.saturating_sub(ts));
        }
    }

    /// Timestamp of the oldest unsettled message this state holds (in flight, waiting).
    fn oldest_held(&self) -> Option<u64> {
        let parked = self
            .ops
            .waiting
            .values()
            .chain(self.ops.due.values())
            .map(|w| w.timestamp_ms);
        let own = self
            .retry
            .values()
            .chain(self.in_flight.values().flat_map(|b| b.msgs.values()))
            .map(|p| p.msg.timestamp_ms)
            .chain(parked)
            .min();
        self.members()
            .filter_map(|m| m.oldest_held())
            .chain(own)
            .min()
    }

    /// The group-wide issue-11 fields of its stats (schedule, retention, age, last ack, stale
    /// consumers, bounds hit), over its members in `broadcast`.
    pub(super) fn fill_group_stats(&self, s: &mut GroupStats) {
        let now = Instant::now();
        s.backoff_ms = self.ops.backoff.clone();
        s.skipped_by_retention = self.ops.skipped_by_retention;
        s.memory_pressure =
            self.ops.bound_hits + self.members().map(|m| m.ops.bound_hits).sum::<u64>();
        s.oldest_unacked_age_ms = self
            .oldest_held()
            .map(|ts| crate::actors::now_ms().saturating_sub(ts));
        s.last_ack_ms_ago = self
            .members()
            .filter_map(|m| m.ops.last_ack)
            .chain(self.ops.last_ack)
            .max()
            .map(|t| now.saturating_duration_since(t).as_millis() as u64);
        s.stale_consumers = s.consumer_details.iter().filter(|c| c.stale).count() as u32;
    }
}

#[cfg(test)]
mod tests;
