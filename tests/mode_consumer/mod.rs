//! A raw-frame consumer for the `key_shared` and `broadcast` tests: every receipt and every ack
//! is stamped from one logical clock shared by all consumers of a test, so what happened before
//! what (across connections) can be checked. A stamp is taken when a batch is read (after the
//! broker sent it) and just before an ack is sent (before the broker can act on it): if the
//! broker hands a key to consumer B only after consumer A's ack, B's receipt stamp is larger
//! than A's ack stamp.
#![allow(dead_code)]

use crate::common::*;
use rsocket_rust::frame as rf;
use sluice_protocol::{AckOutcome, AckReply, GroupMode, StreamEvent, SubscribeRequest};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One message received.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub at: u64,
    pub who: String,
    pub seq: u64,
    pub key: Option<String>,
    pub attempt: u32,
    pub headers: BTreeMap<String, String>,
}

/// One ack that the broker answered `settled`.
#[derive(Debug, Clone)]
pub struct Acked {
    /// Stamp taken before the ack was sent.
    pub at: u64,
    pub who: String,
    pub seqs: Vec<u64>,
}

/// What the consumers of a test saw.
#[derive(Debug, Default)]
pub struct Journal {
    pub receipts: Vec<Receipt>,
    pub acks: Vec<Acked>,
    /// Consumers whose connection was dropped, with the stamp taken before.
    pub kills: Vec<(String, u64)>,
}

/// Shared by the consumers of a test.
#[derive(Debug, Default)]
pub struct Shared {
    clock: AtomicU64,
    pub journal: Mutex<Journal>,
    /// Messages settled, by the broker's ack replies (`count`).
    pub settled: AtomicU64,
    /// Tells every consumer to stop.
    pub stop: AtomicBool,
}

impl Shared {
    pub fn stamp(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::SeqCst)
    }

    pub fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("journal")
    }
}

/// How a consumer behaves.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub topic: String,
    pub group: String,
    pub mode: GroupMode,
    pub window: u32,
    pub batch: u32,
    /// Acks every batch it gets whose seqs are all at most this (`u64::MAX`: every batch,
    /// `0`: none); holds the others unacked.
    pub ack_through: u64,
    /// Once this many messages are settled (all consumers together), stops acking, waits for
    /// the replies to its acks in flight, and drops its connection abruptly (RST) with the
    /// batches it holds unacked.
    pub kill_at: Option<u64>,
    /// How long it holds each batch before acking it (a consumer that works on its messages).
    pub ack_delay: Duration,
}

impl Plan {
    pub fn new(name: &str, topic: &str, group: &str, mode: GroupMode) -> Plan {
        Plan {
            name: name.into(),
            topic: topic.into(),
            group: group.into(),
            mode,
            window: 4,
            batch: 50,
            ack_through: u64::MAX,
            kill_at: None,
            ack_delay: Duration::ZERO,
        }
    }
}

fn subscribe(plan: &Plan) -> rf::Frame {
    let req = SubscribeRequest {
        topic: plan.topic.clone(),
        group: plan.group.clone(),
        mode: plan.mode,
        filters: Default::default(),
        window: Some(plan.window),
        batch_size: Some(plan.batch),
        backoff: None,
    };
    rf::RequestStream::builder(1, 0)
        .set_initial_request_n(1_000_000)
        .set_metadata(route_metadata("subscribe"))
        .set_data(sluice_protocol::encode(&req).expect("encode"))
        .build()
}

/// Runs a consumer until `shared.stop` (or its kill). Panics on anything unexpected.
pub async fn run(addr: String, plan: Plan, shared: Arc<Shared>) {
    let mut c = RawClient::connect(&addr).await;
    c.send(&setup_frame(&plan.name, RAW_LIFETIME)).await;
    c.send(&subscribe(&plan)).await;
    let mut next_sid = 3u32;
    // Acks awaiting their reply: stream id → (stamp, seqs).
    let mut pending: HashMap<u32, (u64, Vec<u64>)> = HashMap::new();
    let mut killing = false;
    // Batches it will not ack.
    let mut held = 0usize;
    // Batches to ack, when.
    let mut due: std::collections::VecDeque<(tokio::time::Instant, u64, Vec<u64>)> =
        Default::default();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if let Some(at) = plan.kill_at {
            if !killing && shared.settled() >= at {
                killing = true;
            }
        }
        // Dropped once its acks are answered, holding at least one batch unacked.
        if killing && pending.is_empty() && (held > 0 || !due.is_empty()) {
            let at = shared.stamp();
            shared.journal().kills.push((plan.name.clone(), at));
            // RST, not FIN: the connection just dies. (A zero linger does not block the drop,
            // the reason `set_linger` is deprecated.)
            #[allow(deprecated)]
            let _ = c.stream.set_linger(Some(Duration::ZERO));
            drop(c);
            return;
        }
        while let Some((when, batch_id, _)) = due.front() {
            if *when > tokio::time::Instant::now() || killing {
                break;
            }
            let batch_id = *batch_id;
            let seqs = due.pop_front().map(|d| d.2).unwrap_or_default();
            let at = shared.stamp();
            let sid = next_sid;
            next_sid += 2;
            c.request(
                sid,
                "ack",
                ack_request(&plan.topic, &plan.group, batch_id, None),
            )
            .await;
            pending.insert(sid, (at, seqs));
        }
        let wait = due.front().map_or(Duration::from_millis(100), |d| {
            d.0.saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1))
        });
        let Some(f) = raw_next(&mut c, wait).await else {
            continue;
        };
        let sid = f.get_stream_id();
        if sid == 0 {
            continue;
        }
        let Some(data) = payload_of(&f) else {
            panic!("{}: error on stream {sid}: {:?}", plan.name, error_of(&f));
        };
        if sid == 1 {
            let ev: StreamEvent = sluice_protocol::decode(&data).expect("decode StreamEvent");
            let StreamEvent::Batch(b) = ev else {
                continue;
            };
            let seqs: Vec<u64> = b.messages.iter().map(|m| m.seq).collect();
            {
                let mut j = shared.journal();
                for m in b.messages {
                    j.receipts.push(Receipt {
                        at: shared.stamp(),
                        who: plan.name.clone(),
                        seq: m.seq,
                        key: m.key,
                        attempt: m.attempt,
                        headers: m.headers,
                    });
                }
            }
            if seqs.iter().all(|s| *s <= plan.ack_through) {
                due.push_back((
                    tokio::time::Instant::now() + plan.ack_delay,
                    b.batch_id,
                    seqs,
                ));
            } else {
                held += 1;
            }
        } else {
            let reply: AckReply = sluice_protocol::decode(&data).expect("decode AckReply");
            let (at, seqs) = pending
                .remove(&sid)
                .unwrap_or_else(|| panic!("{}: reply on unknown stream {sid}", plan.name));
            assert_eq!(
                (reply.outcome, reply.count as usize),
                (AckOutcome::Settled, seqs.len()),
                "{}: ack of {seqs:?}",
                plan.name
            );
            shared.journal().acks.push(Acked {
                at,
                who: plan.name.clone(),
                seqs,
            });
            shared
                .settled
                .fetch_add(u64::from(reply.count), Ordering::SeqCst);
        }
    }
}

/// The broker's stats of one group.
/// Waits (20 s at most) until `topic`/`group` has `n` consumers.
pub async fn wait_consumers(addr: &str, topic: &str, group: &str, n: u32) {
    let t = std::time::Instant::now();
    loop {
        let admin = sluice_sdk::Admin::connect(client_config(addr, "admin"))
            .await
            .expect("admin");
        let stats = admin.stats().await.expect("stats");
        let have = stats
            .groups
            .iter()
            .find(|g| g.topic == topic && g.group == group)
            .map_or(0, |g| g.consumers);
        if have == n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{have} consumers, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn group_stats(addr: &str, topic: &str, group: &str) -> sluice_protocol::GroupStats {
    let admin = sluice_sdk::Admin::connect(client_config(addr, "admin"))
        .await
        .expect("admin");
    let stats = admin.stats().await.expect("stats");
    stats
        .groups
        .into_iter()
        .find(|g| g.topic == topic && g.group == group)
        .expect("group in stats")
}

/// The connection id of the client that set up with `client_id`.
pub async fn conn_id(addr: &str, client_id: &str) -> u64 {
    let admin = sluice_sdk::Admin::connect(client_config(addr, "admin"))
        .await
        .expect("admin");
    let stats = admin.stats().await.expect("stats");
    stats
        .connections
        .iter()
        .find(|c| c.client_id == client_id)
        .map(|c| c.conn_id)
        .expect("connection in stats")
}

/// Waits (up to `t`) for `f` to hold, polling every 20 ms.
pub async fn wait_for(t: Duration, what: &str, mut f: impl FnMut() -> bool) {
    assert!(eventually(t, &mut f).await, "timed out waiting for {what}");
}
