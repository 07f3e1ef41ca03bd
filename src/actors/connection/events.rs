//! `admin.events`: a request-stream of the broker's lifecycle events (docs/protocol.md §6.15).
//!
//! Design: each `admin.events` stream reads its own receiver of the broker's [`EventBus`]
//! (`BrokerLinks.events`), turned into an actor stream (`ctx.add_stream`) that yields only the
//! kinds asked for, so the connection is woken only for events its client wants. The stream's
//! state ([`EventsSub`]) lives in the connection's stream table beside subscriptions:
//!
//! - an event goes out at once while the client has REQUEST_N credits;
//! - without credits it waits in a buffer of at most [`MAX_PENDING_EVENTS`]; past that the
//!   oldest waiting one is dropped and counted (also the events the bus itself dropped because
//!   this connection fell behind, which cannot happen while the actor keeps up);
//! - when credits come back, one `events_lost` event with the count goes first (it takes a
//!   credit), then the buffered events, oldest first. Every event dropped is also counted in
//!   `LimitStats.events_lost`;
//! - CANCEL (or an ERROR from the client) ends the stream: its bus receiver is dropped with it;
//!   the connection closing ends every one.
//!
//! A connection holds at most [`MAX_EVENT_STREAMS`] of them (`INVALID_REQUEST` past that).
//!
//! [`EventBus`]: crate::events::EventBus

use super::{decode, ConnectionActor, RequestKind, StreamState};
use actix::prelude::*;
use bytes::Bytes;
use rsocket_rust::frame::{self as rf, Frame};
use sluice_protocol::{event_kind, BrokerEvent, ErrorCode, EventsRequest, WireError};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

/// Events kept for an `admin.events` stream whose client has no credit left; past it the
/// oldest are dropped (and counted into one `events_lost` event).
pub const MAX_PENDING_EVENTS: usize = 1024;

/// `admin.events` streams one connection may hold at once.
pub const MAX_EVENT_STREAMS: usize = 16;

/// One `admin.events` stream of a connection.
pub(super) struct EventsSub {
    queue: EventsQueue,
    /// The bus reader (cancelled with the stream).
    reader: SpawnHandle,
}

/// The credits and waiting events of one `admin.events` stream (pure: no actor, unit-tested).
#[derive(Debug, Default)]
pub(super) struct EventsQueue {
    /// Credits left (REQUEST_N total − items sent).
    credits: u64,
    /// Events waiting for a credit, oldest first (at most [`MAX_PENDING_EVENTS`]).
    pending: VecDeque<Arc<BrokerEvent>>,
    /// Events dropped since the last `events_lost` was sent.
    lost: u64,
}

impl EventsQueue {
    fn new(credits: u64) -> Self {
        EventsQueue {
            credits,
            ..Default::default()
        }
    }

    /// Queues an event; returns how many were dropped to make room (0 or 1).
    fn push(&mut self, e: Arc<BrokerEvent>) -> u64 {
        self.pending.push_back(e);
        if self.pending.len() > MAX_PENDING_EVENTS {
            self.pending.pop_front();
            self.lost_some(1);
            1
        } else {
            0
        }
    }

    /// `n` events were dropped before they reached the queue.
    fn lost_some(&mut self, n: u64) {
        self.lost = self.lost.saturating_add(n);
    }

    fn grant(&mut self, n: u64) {
        self.credits = self.credits.saturating_add(n);
    }

    /// What the credits allow now: one `events_lost` with the count first (if any were
    /// dropped), then the waiting events, oldest first.
    fn drain(&mut self) -> Vec<Arc<BrokerEvent>> {
        let mut out = Vec::new();
        if self.lost > 0 && self.credits > 0 {
            out.push(Arc::new(
                BrokerEvent::now(event_kind::EVENTS_LOST)
                    .count(std::mem::take(&mut self.lost))
                    .detail("this subscriber had no credit for them"),
            ));
            self.credits -= 1;
        }
        while self.lost == 0 && self.credits > 0 {
            let Some(e) = self.pending.pop_front() else {
                break;
            };
            out.push(e);
            self.credits -= 1;
        }
        out
    }
}

/// What the bus reader of stream `sid` yields: an event, or how many the bus dropped.
pub(super) struct EventItem {
    sid: u32,
    item: Result<Arc<BrokerEvent>, u64>,
}

/// Checks the kinds asked for: each must be one of [`event_kind::ALL`].
fn check_kinds(kinds: &[String]) -> Result<(), WireError> {
    if kinds.len() > 4 * event_kind::ALL.len() {
        return Err(WireError::new(
            ErrorCode::InvalidRequest,
            format!("at most {} kinds", event_kind::ALL.len()),
        ));
    }
    match kinds
        .iter()
        .find(|k| !event_kind::ALL.contains(&k.as_str()))
    {
        Some(k) => {
            let shown: String = k.chars().take(64).collect();
            Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "unknown event kind '{shown}' (known: {})",
                    event_kind::ALL.join(", ")
                ),
            ))
        }
        None => Ok(()),
    }
}

impl ConnectionActor {
    /// `admin.events` on stream `sid` with `n` initial credits.
    pub(super) fn events_stream(&mut self, sid: u32, n: u64, data: &[u8], ctx: &mut Context<Self>) {
        let kind = RequestKind::Stream(u32::try_from(n).unwrap_or(u32::MAX));
        let req: EventsRequest = match decode(data) {
            Ok(r) => r,
            Err(e) => return self.request_error(sid, kind, e, ctx),
        };
        if let Err(e) = check_kinds(&req.kinds) {
            return self.request_error(sid, kind, e, ctx);
        }
        let open = self
            .streams
            .values()
            .filter(|s| matches!(s, StreamState::Events(_)))
            .count();
        if open >= MAX_EVENT_STREAMS {
            let e = WireError::new(
                ErrorCode::InvalidRequest,
                format!("at most {MAX_EVENT_STREAMS} admin.events streams per connection"),
            );
            return self.request_error(sid, kind, e, ctx);
        }
        let kinds = req.kinds;
        let rx = self.links.events.subscribe();
        let reader = futures::stream::unfold(rx, move |mut rx| {
            let kinds = kinds.clone();
            async move {
                loop {
                    let item = match rx.recv().await {
                        Ok(e) if kinds.is_empty() || kinds.contains(&e.kind) => Ok(e),
                        Ok(_) => continue,
                        Err(RecvError::Lagged(n)) => Err(n),
                        Err(RecvError::Closed) => return None,
                    };
                    return Some((EventItem { sid, item }, rx));
                }
            }
        });
        let reader = ctx.add_stream(reader);
        tracing::debug!(conn_id = self.id, sid, "admin.events opened");
        self.streams.insert(
            sid,
            StreamState::Events(Box::new(EventsSub {
                queue: EventsQueue::new(n),
                reader,
            })),
        );
    }

    /// More credits for an `admin.events` stream: what waits goes out.
    pub(super) fn events_credits(&mut self, sid: u32, n: u64, ctx: &mut Context<Self>) {
        if let Some(StreamState::Events(sub)) = self.streams.get_mut(&sid) {
            sub.queue.grant(n);
            self.drain_events(sid, ctx);
        }
    }

    /// Ends an `admin.events` stream (cancel, client error): its bus reader stops.
    pub(super) fn end_events(&mut self, sub: EventsSub, ctx: &mut Context<Self>) {
        ctx.cancel_future(sub.reader);
    }

    /// Sends what the credits of stream `sid` allow (see [`EventsQueue::drain`]).
    fn drain_events(&mut self, sid: u32, ctx: &mut Context<Self>) {
        let out = match self.streams.get_mut(&sid) {
            Some(StreamState::Events(sub)) => sub.queue.drain(),
            _ => return,
        };
        for e in out {
            let data: Bytes = match sluice_protocol::encode(&*e) {
                Ok(d) => d,
                Err(err) => {
                    tracing::error!(conn_id = self.id, sid, error = %err, "event not encoded");
                    continue;
                }
            };
            let f = rf::Payload::builder(sid, Frame::FLAG_NEXT)
                .set_data(data)
                .build();
            if let Err(e) = self.send_frame(&f, ctx) {
                tracing::error!(conn_id = self.id, sid, error = %e, "event not sent");
            }
        }
    }
}

impl StreamHandler<EventItem> for ConnectionActor {
    fn handle(&mut self, msg: EventItem, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let Some(StreamState::Events(sub)) = self.streams.get_mut(&msg.sid) else {
            return;
        };
        let dropped = match msg.item {
            Ok(e) => sub.queue.push(e),
            Err(n) => {
                sub.queue.lost_some(n);
                n
            }
        };
        if dropped > 0 {
            self.links
                .counters
                .events_lost
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
            tracing::trace!(
                conn_id = self.id,
                sid = msg.sid,
                dropped,
                "admin.events subscriber without credit: its oldest event dropped"
            );
        }
        self.drain_events(msg.sid, ctx);
    }

    /// The bus is never closed while the broker runs; a reader that ends stops nothing.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_checked() {
        assert!(check_kinds(&[]).is_ok());
        assert!(check_kinds(&["topic_created".into(), "events_lost".into()]).is_ok());
        let e = check_kinds(&["topic_made".into()]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("topic_made") && e.message.contains("consumer_joined"));
        assert!(check_kinds(&vec!["topic_created".to_string(); 1000]).is_err());
    }

    fn ev(seq: u64) -> Arc<BrokerEvent> {
        Arc::new(BrokerEvent::now(event_kind::TOPIC_CREATED).seq(seq))
    }

    fn seqs(out: &[Arc<BrokerEvent>]) -> Vec<Option<u64>> {
        out.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn events_wait_for_credits_and_the_oldest_are_dropped_and_counted() {
        let mut q = EventsQueue::new(1);
        assert_eq!(q.push(ev(0)), 0);
        assert_eq!(seqs(&q.drain()), vec![Some(0)]);
        // No credit: the next ones wait, up to the bound; past it the oldest go.
        let extra = 5;
        let mut dropped = 0;
        for i in 1..=(MAX_PENDING_EVENTS as u64 + extra) {
            dropped += q.push(ev(i));
        }
        assert_eq!(dropped, extra);
        assert!(q.drain().is_empty(), "no credit, nothing sent");
        // Credits: the count first, then the oldest kept.
        q.grant(3);
        let out = q.drain();
        assert_eq!(out[0].kind, event_kind::EVENTS_LOST);
        assert_eq!(out[0].count, Some(extra));
        assert_eq!(seqs(&out[1..]), vec![Some(extra + 1), Some(extra + 2)]);
        // Lost on the bus, while events wait: the count goes before them.
        q.lost_some(7);
        q.grant(2);
        let out = q.drain();
        assert_eq!(
            (out[0].kind.as_str(), out[0].count),
            (event_kind::EVENTS_LOST, Some(7))
        );
        assert_eq!(seqs(&out[1..]), vec![Some(extra + 3)]);
        q.grant(u64::MAX);
        assert_eq!(q.drain().len(), MAX_PENDING_EVENTS - 3);
        assert_eq!(
            seqs(&{
                q.push(ev(99));
                q.drain()
            }),
            vec![Some(99)]
        );
    }
}
