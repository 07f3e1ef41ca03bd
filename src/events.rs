//! The broker's lifecycle events (`admin.events`): every actor holds an [`EventBus`] and emits
//! [`BrokerEvent`]s on it; each `admin.events` subscription reads its own receiver. The bus is a
//! bounded ring (tokio's broadcast channel): emitting never blocks nor grows memory, and a
//! subscriber that falls behind loses the oldest events it had not read (and is told how many,
//! `events_lost`). Every event is also logged at debug level.

use sluice_protocol::BrokerEvent;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events kept for subscribers that have not read them yet.
pub const EVENT_BUFFER: usize = 4096;

/// Where events go. Cheap to clone; every clone emits on the same bus.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<BrokerEvent>>,
    emitted: Arc<AtomicU64>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(EVENT_BUFFER)
    }
}

impl EventBus {
    /// A bus keeping up to `capacity` unread events per subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus {
            tx,
            emitted: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Emits `event` to every subscriber (none: it is only counted and logged).
    pub fn emit(&self, event: BrokerEvent) {
        tracing::debug!(kind = %event.kind, topic = ?event.topic, group = ?event.group, consumer = ?event.consumer, "event");
        self.emitted.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Arc::new(event));
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<BrokerEvent>> {
        self.tx.subscribe()
    }

    /// Events emitted since the broker started.
    pub fn emitted(&self) -> u64 {
        self.emitted.load(Ordering::Relaxed)
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::event_kind;

    #[tokio::test]
    async fn a_slow_subscriber_loses_the_oldest_and_is_told() {
        let bus = EventBus::new(2);
        let mut rx = bus.subscribe();
        for i in 0..5 {
            bus.emit(BrokerEvent::now(event_kind::TOPIC_CREATED).seq(i));
        }
        assert_eq!(bus.emitted(), 5);
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 3),
            other => panic!("expected lagged, got {other:?}"),
        }
        let e = rx.recv().await.expect("event");
        assert_eq!(e.seq, Some(3));
    }
}
