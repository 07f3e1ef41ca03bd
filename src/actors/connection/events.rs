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
    /// Credits left (REQUEST_N total − items sent).
    credits: u64,
    /// Events waiting for a credit, oldest first.
    pending: VecDeque<Arc<BrokerEvent>>,
    /// Events dropped since the last `events_lost` was sent.
    lost: u64,
    /// The bus reader (cancelled with the stream).
    reader: SpawnHandle,
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
                credits: n,
                pending: VecDeque::new(),
                lost: 0,
                reader,
            })),
        );
    }

    /// More credits for an `admin.events` stream: what waits goes out.
    pub(super) fn events_credits(&mut self, sid: u32, n: u64, ctx: &mut Context<Self>) {
        if let Some(StreamState::Events(sub)) = self.streams.get_mut(&sid) {
            sub.credits = sub.credits.saturating_add(n);
            self.drain_events(sid, ctx);
        }
    }

    /// Ends an `admin.events` stream (cancel, client error): its bus reader stops.
    pub(super) fn end_events(&mut self, sub: EventsSub, ctx: &mut Context<Self>) {
        ctx.cancel_future(sub.reader);
    }

    /// Sends what the credits of stream `sid` allow: the `events_lost` count first, then the
    /// waiting events, oldest first.
    fn drain_events(&mut self, sid: u32, ctx: &mut Context<Self>) {
        let mut out: Vec<Bytes> = Vec::new();
        if let Some(StreamState::Events(sub)) = self.streams.get_mut(&sid) {
            if sub.lost > 0 && sub.credits > 0 {
                let lost = BrokerEvent::now(event_kind::EVENTS_LOST)
                    .count(std::mem::take(&mut sub.lost))
                    .detail("this subscriber had no credit for them");
                if let Ok(data) = sluice_protocol::encode(&lost) {
                    out.push(data);
                }
                sub.credits -= 1;
            }
            while sub.lost == 0 && sub.credits > 0 {
                let Some(e) = sub.pending.pop_front() else {
                    break;
                };
                if let Ok(data) = sluice_protocol::encode(&*e) {
                    out.push(data);
                }
                sub.credits -= 1;
            }
        }
        for data in out {
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
            Ok(e) => {
                sub.pending.push_back(e);
                if sub.pending.len() > MAX_PENDING_EVENTS {
                    sub.pending.pop_front();
                    1
                } else {
                    0
                }
            }
            Err(n) => n,
        };
        if dropped > 0 {
            sub.lost = sub.lost.saturating_add(dropped);
            self.links
                .counters
                .events_lost
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
            if sub.lost == dropped {
                tracing::debug!(
                    conn_id = self.id,
                    sid = msg.sid,
                    "admin.events subscriber without credit: dropping its oldest events"
                );
            }
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
}
