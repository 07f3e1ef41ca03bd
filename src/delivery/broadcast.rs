//! `broadcast` groups: every consumer present gets every message and acks it on its own.
//!
//! # Design note
//!
//! A broadcast group's [`GroupState`] keeps only the *group's* cursor (its `floor` and `above`,
//! what is persisted) and, in [`Broadcast`], one member state per consumer: an ordinary
//! `GroupState` with that one consumer, so redelivery, retries, `max_retries`, dead letters,
//! acks bound to their delivery, the range bound and the flow control are exactly those of the
//! other modes, per member. What the member states share:
//!
//! * **Reads**: one read of the log serves every member whose read position it covers (it starts
//!   at the lowest position among the members that have room); the live tail is offered to every
//!   member. The messages are `Arc`s and each [`Pending`] is built once per read and cloned per
//!   member (a reference count and a few integers), so N members cost one read and one copy of
//!   each message in memory, not N.
//! * **The group's cursor**: a message is settled for the group when every member settled it
//!   (acked, filtered out, dead-lettered): the group's floor is the lowest member floor and the
//!   settled ranges above it are the intersection of the members'. A member that leaves no
//!   longer counts, so what only it had not acked is settled for the group by its leaving. With
//!   no member left the cursor stays as the last member left it (its unacked messages are not
//!   settled: the next member gets them). The cursor only grows, and it is what the group record
//!   holds: after a restart every member starts there (at least once).
//! * **Joining later**: a new member starts at the group's cursor (its floor and settled ranges)
//!   with attempt counts of its own: only those of the record the group was loaded from (after a
//!   restart) carry over, never the other members' live counts.
//! * **Dead letters**: a member's messages past `max_retries` go to `<topic>.<group>.dlq` with
//!   header `x-dlq-consumer = <conn>:<stream>` (the member); the other members' copies are not
//!   affected. [`Pending::member`] carries the member through the orchestrator.
//! * **Acks** go to the member whose batch it is (batch ids are unique); an ack of a batch no
//!   member holds is answered as in the other modes (already acked if the group settled the
//!   seqs, else unknown batch). Only an ack that moves the group's cursor makes the
//!   orchestrator commit (the members' own cursors are not stored), so N members commit about
//!   as often as one group, not N times.

use super::{
    Formed, GroupState, Joining, Limits, Pending, Settlement, READ_AHEAD, READ_AHEAD_BYTES,
};
use crate::delivery::{ConsumerId, SeqRanges};
use crate::store::record::StoredMessage;
use sluice_protocol::{GroupStats, WireError};
use std::sync::Arc;

/// The members of a broadcast group.
#[derive(Debug, Default)]
pub(super) struct Broadcast {
    /// Each member's state, in join order.
    pub(super) members: Vec<(ConsumerId, GroupState)>,
    /// A read from this seq is under way (shared by the members).
    reading: Option<u64>,
    /// A member left since the group's cursor was last computed.
    left: bool,
}

impl Broadcast {
    fn member(&self, c: ConsumerId) -> Option<usize> {
        self.members.iter().position(|(id, _)| *id == c)
    }

    /// Whether a read is wanted: not reading, and some member wants one.
    pub(super) fn wants_read(&self, head: u64) -> bool {
        self.reading.is_none() && self.members.iter().any(|(_, m)| m.wants_read(head))
    }

    /// The lowest read position of the members.
    pub(super) fn next_read(&self) -> Option<u64> {
        self.members.iter().map(|(_, m)| m.next_read).min()
    }

    /// Starts a read for the members: from the lowest read position among those with room, or
    /// the lowest due retry to read back (`default` without members).
    pub(super) fn start_read(&mut self, default: u64) -> u64 {
        let from = self
            .members
            .iter()
            .flat_map(|(_, m)| {
                let fresh = m.has_room().then_some(m.next_read);
                let due = m
                    .wants_retry_read()
                    .then(|| m.retry_read_span().map(|(s, _)| s))
                    .flatten();
                fresh.into_iter().chain(due)
            })
            .min()
            .or_else(|| self.next_read())
            .unwrap_or(default);
        self.reading = Some(from);
        from
    }

    /// The group's stats from its own (`own`: the group's cursor) and its members'.
    pub(super) fn stats(&self, mut own: GroupStats, head: u64) -> GroupStats {
        own.consumers = self.members.len() as u32;
        for (_, m) in &self.members {
            let s = m.own_stats(&own.topic, &own.group, head);
            own.in_flight_batches += s.in_flight_batches;
            own.in_flight_messages += s.in_flight_messages;
            own.redeliveries += s.redeliveries;
            own.dead_letters += s.dead_letters;
            own.rejected_acks += s.rejected_acks;
            own.consumer_details.extend(s.consumer_details);
        }
        own
    }
}

impl GroupState {
    /// A broadcast member's state (None in other modes).
    pub(super) fn member_mut(&mut self, c: ConsumerId) -> Option<&mut GroupState> {
        let bc = self.bc.as_mut()?;
        let i = bc.member(c)?;
        Some(&mut bc.members[i].1)
    }

    /// Room in the read-ahead buffer (a read would be taken).
    pub(super) fn has_room(&self) -> bool {
        self.ready.len() < READ_AHEAD / 2 && self.ready_bytes < READ_AHEAD_BYTES / 2
    }

    /// Adds a member (or updates its slot); a new one starts at the group's cursor.
    pub(super) fn broadcast_join(&mut self, j: Joining) -> Result<(), WireError> {
        if let Some(m) = self.member_mut(j.consumer) {
            return m.join(j);
        }
        // The group's cursor, without attempt counts: a member's counts are its own (§6.8);
        // only those of the record the group was loaded from carry over.
        let mut rec = self.record();
        rec.attempts = Vec::new();
        let mut m = GroupState::from_record(rec);
        m.bc = None;
        m.inherit_restored(self);
        m.join(j.clone())?;
        if let Some(bc) = self.bc.as_mut() {
            bc.members.push((j.consumer, m));
        }
        Ok(())
    }

    /// Removes a member; its batches in flight (their copies are moot: the caller only cancels
    /// their timers).
    pub(super) fn broadcast_leave(&mut self, c: ConsumerId) -> Vec<u64> {
        let Some(bc) = self.bc.as_mut() else {
            return vec![];
        };
        let Some(i) = bc.member(c) else {
            return vec![];
        };
        let (_, m) = bc.members.remove(i);
        bc.left = true;
        let mut batches: Vec<u64> = m.in_flight.keys().copied().collect();
        batches.sort_unstable();
        self.sync_broadcast();
        batches
    }

    /// A shared read finished: every member whose read position it covers takes it.
    pub(super) fn broadcast_finish_read(
        &mut self,
        from: u64,
        result: Option<(Vec<StoredMessage>, Vec<u64>)>,
    ) -> bool {
        let Some(bc) = self.bc.as_mut() else {
            return false;
        };
        bc.reading = None;
        let Some((messages, corrupt)) = result else {
            return true;
        };
        let fresh: Vec<Pending> = messages
            .into_iter()
            .map(|m| Pending::fresh(Arc::new(m)))
            .collect();
        for (_, m) in bc.members.iter_mut() {
            m.take_shared_read(from, &fresh, &corrupt);
        }
        self.sync_broadcast();
        true
    }

    /// A member takes its part of a shared read from `from`: what lies at or after its read
    /// position, if the read covers that position and it has room.
    fn take_shared_read(&mut self, from: u64, fresh: &[Pending], corrupt: &[u64]) {
        let last = fresh
            .iter()
            .map(|p| p.msg.seq)
            .chain(corrupt.iter().copied())
            .max()
            .unwrap_or(0)
            .max(from.saturating_sub(1));
        // Due retries it brought back, whatever the member's read position.
        for p in fresh {
            if self.is_waiting(p.msg.seq) {
                self.take_due(p.clone());
            }
        }
        let brought = (!fresh.is_empty() || !corrupt.is_empty()).then_some(last);
        self.due_read_end(from, brought, corrupt);
        if self.next_read < from || self.next_read > last || !self.has_room() {
            return;
        }
        for &seq in corrupt {
            if seq >= self.next_read {
                tracing::error!(seq, "corrupt message skipped (settled without delivery)");
                self.settle(seq);
            }
        }
        for p in fresh {
            let seq = p.msg.seq;
            if seq >= self.next_read
                && !self.is_settled(seq)
                && !self.seq_batch.contains_key(&seq)
                && !self.retry.contains_key(&seq)
                && !self.dead_lettering.contains(&seq)
                && !self.is_waiting(seq)
            {
                self.push_ready(p.clone());
            }
        }
        self.next_read = last + 1;
    }

    /// The live tail, offered to every member (each message's [`Pending`] built once).
    pub(super) fn broadcast_offer_tail(&mut self, msgs: &[Arc<StoredMessage>]) {
        let Some(bc) = self.bc.as_mut() else { return };
        let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
            return;
        };
        let (first, last) = (first.seq, last.seq);
        let mut fresh: Option<Vec<Pending>> = None;
        for (_, m) in bc.members.iter_mut() {
            if !m.takes_tail(first) {
                continue;
            }
            let fresh = fresh
                .get_or_insert_with(|| msgs.iter().map(|m| Pending::fresh(m.clone())).collect());
            for p in fresh.iter() {
                if !m.is_settled(p.msg.seq) {
                    m.push_ready(p.clone());
                }
            }
            m.next_read = last + 1;
        }
    }

    /// Every member's batches.
    pub(super) fn broadcast_form(
        &mut self,
        topic: &str,
        group: &str,
        limits: Limits,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Formed {
        let mut formed = Formed::default();
        if let Some(bc) = self.bc.as_mut() {
            for (id, m) in bc.members.iter_mut() {
                let f = m.form_batches(topic, group, limits, &mut *next_id);
                formed.batches.extend(f.batches);
                formed
                    .undeliverable
                    .extend(f.undeliverable.into_iter().map(|mut p| {
                        p.member = Some(*id);
                        p
                    }));
            }
        }
        self.sync_broadcast();
        formed
    }

    /// An ack or nack (`op`) of batch `batch_id` from connection `conn`, applied by the member
    /// holding the batch (else by the member of that connection, which refuses it; else by the
    /// group's cursor alone: already acked or unknown).
    pub(super) fn broadcast_settle(
        &mut self,
        batch_id: u64,
        conn: u64,
        op: impl FnOnce(&mut GroupState) -> Settlement,
    ) -> Settlement {
        let found = self.bc.as_ref().and_then(|bc| {
            bc.members
                .iter()
                .position(|(_, m)| m.in_flight.contains_key(&batch_id))
                .or_else(|| bc.members.iter().position(|(id, _)| id.conn == conn))
        });
        let s = match (found, self.bc.as_mut()) {
            (Some(i), Some(bc)) => {
                let (id, m) = &mut bc.members[i];
                let mut s = op(m);
                for p in s.dead.iter_mut() {
                    p.member = Some(*id);
                }
                s
            }
            _ => {
                // No member of this connection: the group's cursor answers (it holds no batch).
                let bc = self.bc.take();
                let s = op(self);
                self.bc = bc;
                s
            }
        };
        self.sync_broadcast();
        s
    }

    /// A member's batch failed (timed out, or returned); its dead letters carry the member.
    pub(super) fn broadcast_fail_batch(
        &mut self,
        batch_id: u64,
        counts_as_failure: bool,
        max_retries: u32,
    ) -> Option<Vec<Pending>> {
        let bc = self.bc.as_mut()?;
        let (id, m) = bc
            .members
            .iter_mut()
            .find(|(_, m)| m.in_flight.contains_key(&batch_id))?;
        let mut dead = m.fail_batch(batch_id, counts_as_failure, max_retries)?;
        for p in dead.iter_mut() {
            p.member = Some(*id);
        }
        self.sync_broadcast();
        Some(dead)
    }

    /// Hands each member its part of `msgs` (by [`Pending::member`]); a member gone has nothing
    /// more to settle.
    pub(super) fn broadcast_each_member(
        &mut self,
        msgs: Vec<Pending>,
        mut f: impl FnMut(&mut GroupState, Vec<Pending>),
    ) {
        if let Some(bc) = self.bc.as_mut() {
            let mut by: Vec<(ConsumerId, Vec<Pending>)> = Vec::new();
            for p in msgs {
                let Some(id) = p.member else {
                    tracing::error!(seq = p.msg.seq, "broadcast message without its member");
                    continue;
                };
                match by.iter_mut().find(|(c, _)| *c == id) {
                    Some((_, v)) => v.push(p),
                    None => by.push((id, vec![p])),
                }
            }
            for (id, v) in by {
                if let Some(i) = bc.member(id) {
                    f(&mut bc.members[i].1, v);
                }
            }
        }
        self.sync_broadcast();
    }

    /// Recomputes the group's cursor from the members': the lowest floor, and above it what
    /// every member settled. It only grows; marks the state dirty when it moved.
    pub(super) fn sync_broadcast(&mut self) {
        let Some(bc) = self.bc.as_mut() else { return };
        // Only when a member's cursor moved (`dirty`, which only this clears for members) or a
        // member left: this runs after every ack and every pass.
        if !std::mem::take(&mut bc.left) && !bc.members.iter().any(|(_, m)| m.dirty) {
            return;
        }
        for (_, m) in bc.members.iter_mut() {
            m.dirty = false;
        }
        let Some(floor) = bc.members.iter().map(|(_, m)| m.floor).min() else {
            return;
        };
        if floor <= self.floor && self.above.is_empty() {
            // The lowest member has nothing settled past the group: the cursor cannot move,
            // unless every member settled something above it (then compute).
            if bc
                .members
                .iter()
                .any(|(_, m)| m.floor <= self.floor && m.above.is_empty())
            {
                return;
            }
        }
        let floor = floor.max(self.floor);
        // Each member's settled seqs above `floor`, as sorted ranges; intersected in turn.
        let settled = |m: &GroupState| -> Vec<(u64, u64)> {
            let mut v = Vec::with_capacity(m.above.range_count() + 1);
            if m.floor > floor {
                v.push((floor + 1, m.floor));
            }
            v.extend(
                m.above
                    .ranges()
                    .filter(|&(_, e)| e > floor)
                    .map(|(s, e)| (s.max(floor + 1), e)),
            );
            v
        };
        let mut acc: Option<Vec<(u64, u64)>> = None;
        for (_, m) in &bc.members {
            let mine = settled(m);
            acc = Some(match acc {
                None => mine,
                Some(a) => intersect(&a, &mine),
            });
        }
        // What the group had settled stays settled (a member that joined starts there).
        let mut above = SeqRanges::new();
        for (s, e) in acc.unwrap_or_default() {
            above.insert_range(s, e);
        }
        for (s, e) in self.above.ranges() {
            if e > floor {
                above.insert_range(s.max(floor + 1), e);
            }
        }
        let mut floor = floor;
        while let Some((s, e)) = above.first() {
            if s > floor + 1 {
                break;
            }
            above.pop_first();
            floor = floor.max(e);
        }
        if floor != self.floor || above != self.above {
            self.floor = floor;
            self.above = above;
            self.dirty = true;
        }
    }
}

/// The intersection of two sorted lists of disjoint inclusive ranges.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s <= e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
#[path = "broadcast/tests.rs"]
mod tests;
