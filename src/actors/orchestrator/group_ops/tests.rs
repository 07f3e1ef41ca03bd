//! The orchestrator's group operations against a probe store and a probe connection: what it
//! commits, sends and emits when the store says a topic's floor moved or the topic is gone.

use super::super::*;
use crate::actors::messages::{
    DeleteGroupRecord, FloorMoved, GetSyncStats, GetTopicSettings, KickConsumer, ListGroups,
    SeqAtTime, StreamNotice, TopicRemoved,
};
use crate::store::record::StoredMessage;
use crate::store::ReadResult;
use bytes::Bytes;
use sluice_protocol::{event_kind, ActorStats, BrokerEvent, GroupMode, StreamEvent, SyncStats};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A store holding messages 1..=`head` of topic `t` and no group; it keeps the records
/// committed.
struct Store {
    head: u64,
    commits: Arc<Mutex<Vec<GroupRecord>>>,
}

impl Actor for Store {
    type Context = Context<Self>;
}

impl Handler<ReadRange> for Store {
    type Result = Result<ReadResult, StoreError>;
    fn handle(&mut self, m: ReadRange, _: &mut Context<Self>) -> Self::Result {
        let to = self.head.min(m.from + m.max as u64 - 1);
        let messages = (m.from..=to)
            .map(|seq| StoredMessage {
                seq,
                timestamp_ms: 1,
                key: None,
                headers: BTreeMap::new(),
                priority: 0,
                payload: Bytes::from_static(b"x"),
            })
            .collect();
        Ok(ReadResult {
            messages,
            ..Default::default()
        })
    }
}

impl Handler<CommitGroup> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: CommitGroup, _: &mut Context<Self>) -> Self::Result {
        if let Ok(mut c) = self.commits.lock() {
            c.push(m.record);
        }
        Ok(())
    }
}

macro_rules! answers {
    ($($msg:ty => $value:expr),* $(,)?) => {$(
        impl Handler<$msg> for Store {
            type Result = MessageResult<$msg>;
            fn handle(&mut self, _: $msg, _: &mut Context<Self>) -> Self::Result {
                MessageResult($value)
            }
        }
    )*};
}

answers! {
    LoadGroup => Ok((None, 10)),
    AppendMessages => Ok(crate::store::Appended::stored(1, 0)),
    ListGroups => Ok(vec![]),
    GetSyncStats => SyncStats::default(),
    GetActorStats => ActorStats::default(),
    InjectFault => (),
    SeqAtTime => Ok(1),
    DeleteGroupRecord => Ok(true),
    GetTopicSettings => Ok(Default::default()),
}

/// What a connection got.
#[derive(Default)]
struct Seen {
    batches: Vec<DeliverBatch>,
    notices: Vec<StreamEvent>,
    kicks: Vec<KickConsumer>,
}

struct Conn(Arc<Mutex<Seen>>);
impl Actor for Conn {
    type Context = Context<Self>;
}
impl Handler<DeliverBatch> for Conn {
    type Result = ();
    fn handle(&mut self, m: DeliverBatch, _: &mut Context<Self>) {
        if let Ok(mut s) = self.0.lock() {
            s.batches.push(m);
        }
    }
}
impl Handler<StreamNotice> for Conn {
    type Result = ();
    fn handle(&mut self, m: StreamNotice, _: &mut Context<Self>) {
        if let (Ok(mut s), Ok(e)) = (self.0.lock(), sluice_protocol::decode(&m.data)) {
            s.notices.push(e);
        }
    }
}
impl Handler<KickConsumer> for Conn {
    type Result = ();
    fn handle(&mut self, m: KickConsumer, _: &mut Context<Self>) {
        if let Ok(mut s) = self.0.lock() {
            s.kicks.push(m);
        }
    }
}

/// `consumer` joins group `g` of topic `t` (window 1, batches of 3, 10 credits), its batches,
/// notices and kicks going to `conn`.
async fn join(
    orch: &Addr<OrchestratorActor>,
    conn: &Addr<Conn>,
    consumer: ConsumerId,
    mode: GroupMode,
) {
    let joined = orch
        .send(JoinGroup {
            consumer,
            topic: "t".into(),
            group: "g".into(),
            mode,
            filters: BTreeMap::new(),
            window: 1,
            batch_size: 3,
            credits: 10,
            recipient: conn.clone().recipient(),
            backoff_ms: None,
            kick: conn.clone().recipient(),
            notice: conn.clone().recipient(),
        })
        .await
        .expect("mailbox");
    assert!(joined.is_ok(), "{joined:?}");
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<BrokerEvent>>,
    kind: &str,
) -> BrokerEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("bus open");
        if e.kind == kind {
            return (*e).clone();
        }
    }
}

#[actix_rt::test]
async fn a_floor_move_persists_tells_the_consumer_and_a_topic_removal_kicks_it() {
    let commits = Arc::new(Mutex::new(Vec::new()));
    let store = Store {
        head: 10,
        commits: commits.clone(),
    }
    .start();
    let links = StoreLinks::of(&store);
    let bus = crate::events::EventBus::default();
    let mut rx = bus.subscribe();
    let orch = OrchestratorActor::new(
        0,
        DeliveryConfig::default(),
        links,
        None,
        Arc::new(AtomicU64::new(1)),
    )
    .with_events(bus)
    .start();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let conn = Conn(seen.clone()).start();
    let consumer = ConsumerId { conn: 7, stream: 1 };
    join(&orch, &conn, consumer, GroupMode::Shared).await;
    assert_eq!(
        next_event(&mut rx, event_kind::GROUP_CREATED)
            .await
            .group
            .as_deref(),
        Some("g")
    );
    next_event(&mut rx, event_kind::CONSUMER_JOINED).await;
    until(|| seen.lock().is_ok_and(|s| s.batches.len() == 1)).await;
    let first = seen.lock().map(|s| s.batches[0].batch_id).unwrap_or(0);

    // Retention removed 1..=5: seqs 1..=3 are in flight, 4 and 5 were read ahead.
    orch.do_send(FloorMoved {
        topic: "t".into(),
        floor_seq: 6,
    });
    let e = next_event(&mut rx, event_kind::GROUP_MOVED_TO_FLOOR).await;
    assert_eq!((e.seq, e.count), (Some(6), Some(5)));
    until(|| seen.lock().is_ok_and(|s| s.notices.len() == 1)).await;
    match seen.lock().map(|s| s.notices[0].clone()) {
        Ok(StreamEvent::Reset(n)) => {
            assert_eq!(
                (n.reason.as_str(), n.floor_seq, n.skipped),
                ("retention", 6, 5)
            )
        }
        other => panic!("expected a reset notice, got {:?}", other.ok()),
    }
    until(|| {
        commits
            .lock()
            .is_ok_and(|c| c.last().is_some_and(|r| r.acked_floor == 5))
    })
    .await;
    // The batch in flight below the floor: acked already.
    let r = orch
        .send(AckBatch {
            conn: 7,
            topic: "t".into(),
            group: "g".into(),
            batch_id: first,
            seqs: None,
        })
        .await
        .expect("mailbox")
        .expect("ack");
    assert_eq!((r.outcome, r.count), (AckOutcome::AlreadyAcked, 0));
    until(|| seen.lock().is_ok_and(|s| s.batches.len() == 2)).await;
    let stats = orch.send(GetGroupStats).await.expect("mailbox");
    assert_eq!(stats[0].skipped_by_retention, 5);
    assert_eq!(stats[0].acked_floor, 5);

    // The topic is deleted: the consumer is told and its stream ended.
    orch.do_send(TopicRemoved { topic: "t".into() });
    let e = next_event(&mut rx, event_kind::GROUP_DELETED).await;
    assert_eq!(e.group.as_deref(), Some("g"));
    until(|| seen.lock().is_ok_and(|s| s.kicks.len() == 1)).await;
    let kick = seen.lock().map(|s| s.kicks[0].clone()).expect("kick");
    assert_eq!(
        (kick.consumer, kick.error.code),
        (consumer, ErrorCode::Deleted)
    );
    assert!(orch.send(GetGroupStats).await.expect("mailbox").is_empty());
}

/// A broadcast member's ack that does not move the group's cursor commits nothing (only the
/// group's cursor is durable); the ack that moves it commits the new cursor once, and is
/// answered only after that commit.
#[actix_rt::test]
async fn a_broadcast_member_ack_commits_only_when_it_moves_the_groups_cursor() {
    let commits = Arc::new(Mutex::new(Vec::new()));
    let store = Store {
        head: 3,
        commits: commits.clone(),
    }
    .start();
    let orch = OrchestratorActor::new(
        0,
        DeliveryConfig::default(),
        StoreLinks::of(&store),
        None,
        Arc::new(AtomicU64::new(1)),
    )
    .start();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let conn = Conn(seen.clone()).start();
    for c in [7, 8] {
        let consumer = ConsumerId { conn: c, stream: 1 };
        join(&orch, &conn, consumer, GroupMode::Broadcast).await;
    }
    // Each member gets 1..=3 in one batch.
    until(|| seen.lock().is_ok_and(|s| s.batches.len() == 2)).await;
    let batch_of = |c: u64| {
        seen.lock()
            .ok()
            .and_then(|s| {
                let b = s.batches.iter().find(|b| b.consumer.conn == c)?;
                Some((b.batch_id, b.count))
            })
            .expect("a batch")
    };
    let (a, b) = (batch_of(7), batch_of(8));
    assert_eq!((a.1, b.1), (3, 3));
    let before = commits.lock().map(|c| c.len()).unwrap_or(0);
    let ack = |conn: u64, batch_id: u64| AckBatch {
        conn,
        topic: "t".into(),
        group: "g".into(),
        batch_id,
        seqs: None,
    };
    // The first member's ack: settled for it, the group's cursor stays (the other has not).
    let r = orch.send(ack(7, a.0)).await.expect("mailbox").expect("ack");
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 3));
    assert_eq!(commits.lock().map(|c| c.len()).unwrap_or(0), before);
    // The second's moves the cursor to 3: one commit, made before the reply.
    let r = orch.send(ack(8, b.0)).await.expect("mailbox").expect("ack");
    assert_eq!((r.outcome, r.count), (AckOutcome::Settled, 3));
    let floors: Vec<u64> = commits
        .lock()
        .map(|c| c[before..].iter().map(|r| r.acked_floor).collect())
        .unwrap_or_default();
    assert_eq!(floors, vec![3]);
}
