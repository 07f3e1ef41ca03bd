//! Publishing, with automatic batching of concurrent calls.
//!
//! Every [`Producer::publish`] puts its message on a bounded queue and waits for its own
//! sequence number. One background task drains the queue: it groups queued messages by topic
//! (up to [`ProducerOptions::max_batch_messages`] / [`ProducerOptions::max_batch_bytes`] per
//! request, topics served round-robin, queue order kept within a topic) and keeps up to
//! [`ProducerOptions::max_in_flight_requests`] `publish` requests outstanding (one per topic by
//! default). There is no linger
//! timer: whatever is queued goes out as soon as a request slot is free, so a lone publish costs
//! one round trip and a thousand concurrent ones cost a few.
//!
//! Ordering: a message is queued when `publish` is called, and by default
//! ([`ProducerOptions::preserve_order`]) one topic has at most one request in flight, so the
//! messages of a topic get sequence numbers in call order.
//!
//! The connection is re-opened on the next batch if it closed; a failed request is *not*
//! retried (publish is not idempotent): its callers get the error.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sluice_protocol::{route, ErrorCode, NewMessage, PublishReply, PublishRequest, MAX_PRIORITY};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::client::{Client, ClientConfig};
use crate::error::{Result, SdkError};

/// Tuning of a [`Producer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerOptions {
    /// Most messages in one `publish` request (default 512).
    pub max_batch_messages: usize,
    /// Most (estimated, encoded) bytes in one `publish` request (default 1 MiB). A single message
    /// larger than this is still sent, alone.
    pub max_batch_bytes: usize,
    /// Most `publish` requests awaiting their reply at once (default 8).
    pub max_in_flight_requests: usize,
    /// Most messages waiting to be sent; `publish` waits for room beyond that (default 65536).
    pub queue_capacity: usize,
    /// Largest payload accepted before sending (default 1 MiB, the broker's default limit):
    /// checked here so that one oversize message fails alone instead of failing its batch.
    pub max_payload_bytes: usize,
    /// Keep at most one request per topic in flight, so that the messages of one topic get
    /// sequence numbers in the order their `publish` calls were made, even when the calls are
    /// concurrent (default true). Requests to different topics still run in parallel, up to
    /// `max_in_flight_requests`. With `false`, several requests to one topic may be in flight
    /// and be stored in any order relative to each other (rsocket_rust does not put concurrent
    /// requests on the wire in call order); messages of one request, and of one
    /// `publish_batch`, always keep their order. Measured against the broker with 1,000
    /// publishes in flight, both settings gave the same throughput (the requests are large).
    pub preserve_order: bool,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            max_batch_messages: 512,
            max_batch_bytes: 1024 * 1024,
            max_in_flight_requests: 8,
            queue_capacity: 65_536,
            max_payload_bytes: sluice_protocol::DEFAULT_MAX_PAYLOAD,
            preserve_order: true,
        }
    }
}

impl ProducerOptions {
    /// Checks that every limit is at least 1.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("max_batch_messages", self.max_batch_messages),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_in_flight_requests", self.max_in_flight_requests),
            ("queue_capacity", self.queue_capacity),
            ("max_payload_bytes", self.max_payload_bytes),
        ] {
            if v == 0 {
                return Err(SdkError::InvalidArgument(format!(
                    "producer option {name} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// Publishes messages to a broker. Cheap to clone; clones share the queue, the background task
/// and the connection. Must be created inside a tokio runtime.
#[derive(Clone)]
pub struct Producer {
    queue: mpsc::Sender<Entry<Reply>>,
    max_payload_bytes: usize,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("queue_room", &self.queue.capacity())
            .finish()
    }
}

impl Producer {
    /// A producer with default options over an existing connection.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the producer's background task), like `tokio::spawn`.
    pub fn new(client: Client) -> Producer {
        Self::spawn(client, ProducerOptions::default())
    }

    /// A producer with `options` over an existing connection (inside a tokio runtime, as
    /// [`Producer::new`]).
    pub fn with_options(client: Client, options: ProducerOptions) -> Result<Producer> {
        options.validate()?;
        Ok(Self::spawn(client, options))
    }

    /// Connects to the broker and returns a producer with default options.
    pub async fn connect(config: ClientConfig) -> Result<Producer> {
        Ok(Self::new(Client::connect(config).await?))
    }

    /// Connects to the broker and returns a producer with `options`.
    pub async fn connect_with(config: ClientConfig, options: ProducerOptions) -> Result<Producer> {
        options.validate()?;
        Ok(Self::spawn(Client::connect(config).await?, options))
    }

    fn spawn(client: Client, options: ProducerOptions) -> Producer {
        // The channel carries entries; the bound on queued messages is enforced by the task
        // (it stops reading the channel while its own queue is full).
        let (queue, rx) = mpsc::channel(options.queue_capacity.clamp(1, 8192));
        let max_payload_bytes = options.max_payload_bytes;
        let slot = Arc::new(ClientSlot::new(client));
        tokio::spawn(run_pipeline(rx, slot, options));
        Producer {
            queue,
            max_payload_bytes,
        }
    }

    /// Publishes one message; the returned future resolves with its sequence number once the
    /// message is durable.
    ///
    /// The message is queued when `publish` is *called* (not when the future is first polled),
    /// so calls made one after the other are queued in call order; dropping the future does not
    /// withdraw the message. Concurrent calls (from many tasks, or many futures of one task) are
    /// batched into few requests. See [`ProducerOptions::preserve_order`] for how queue order
    /// maps to sequence numbers.
    pub fn publish(
        &self,
        topic: impl Into<String>,
        message: NewMessage,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        let topic = topic.into();
        let checked = validate_topic(&topic).and_then(|()| self.validate_message(&message));
        let (tx, rx) = oneshot::channel();
        let queued =
            checked.map(|()| self.enqueue(Entry::new(topic, vec![message], Reply::One(tx))));
        Self::wait(queued, rx)
    }

    /// Publishes `payload` as a message without key, headers or priority; see
    /// [`Producer::publish`].
    pub fn send(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        self.publish(
            topic,
            NewMessage {
                payload: payload.into(),
                ..Default::default()
            },
        )
    }

    /// Publishes `messages` together: they get consecutive sequence numbers, in order, and are
    /// stored in one request (possibly together with other callers' messages). Queued when
    /// called, like [`Producer::publish`]; resolves once they are durable.
    pub fn publish_batch(
        &self,
        topic: impl Into<String>,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<PublishReply>> + Send + 'static {
        let topic = topic.into();
        let checked = validate_topic(&topic).and_then(|()| {
            if messages.is_empty() {
                return Err(SdkError::InvalidArgument(
                    "publish_batch needs at least one message".into(),
                ));
            }
            messages.iter().try_for_each(|m| self.validate_message(m))
        });
        let (tx, rx) = oneshot::channel();
        let queued = checked.map(|()| self.enqueue(Entry::new(topic, messages, Reply::Many(tx))));
        Self::wait(queued, rx)
    }

    /// Queues `entry` now if the queue has room; otherwise returns it with a sender to wait on
    /// (the channel's waiters are served in order, so call order is kept).
    fn enqueue(&self, entry: Entry<Reply>) -> Queued {
        match self.queue.try_send(entry) {
            Ok(()) => Queued::Done,
            Err(mpsc::error::TrySendError::Full(entry)) => {
                Queued::Waiting(self.queue.clone(), entry)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::Stopped,
        }
    }

    async fn wait<T>(queued: Result<Queued>, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        match queued? {
            Queued::Done => {}
            Queued::Waiting(queue, entry) => queue.send(entry).await.map_err(|_| stopped())?,
            Queued::Stopped => return Err(stopped()),
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    fn validate_message(&self, m: &NewMessage) -> Result<()> {
        if m.priority > MAX_PRIORITY {
            return Err(SdkError::InvalidArgument(format!(
                "priority {} is above the maximum {MAX_PRIORITY}",
                m.priority
            )));
        }
        if m.payload.len() > self.max_payload_bytes {
            return Err(SdkError::InvalidArgument(format!(
                "payload of {} bytes is over the limit of {} bytes",
                m.payload.len(),
                self.max_payload_bytes
            )));
        }
        Ok(())
    }
}

/// Where a new entry stands after `Producer::enqueue`.
enum Queued {
    Done,
    Waiting(mpsc::Sender<Entry<Reply>>, Entry<Reply>),
    Stopped,
}

fn stopped() -> SdkError {
    SdkError::Closed("the producer's background task stopped".into())
}

/// Checks a topic name the way the broker does: 1..=120 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic.len() <= 120
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SdkError::InvalidArgument(format!(
            "topic name '{topic}' must be 1..=120 characters of [A-Za-z0-9._-] (not . or ..)"
        )))
    }
}

/// Estimated MessagePack size of one message inside a `PublishRequest` (map keys included).
pub(crate) fn estimated_size(m: &NewMessage) -> usize {
    const FIXED: usize = 48; // map header, four keys, markers, priority
    FIXED
        + m.payload.len()
        + m.key.as_ref().map_or(0, |k| k.len() + 5)
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>()
}

/// How a queued entry wants its answer.
enum Reply {
    /// `publish`: the message's sequence number.
    One(oneshot::Sender<Result<u64>>),
    /// `publish_batch`: the range its messages got.
    Many(oneshot::Sender<Result<PublishReply>>),
}

impl Reply {
    fn send(self, topic: &str, first_seq: u64, count: usize) {
        // A caller that stopped waiting (dropped its future) is not an error.
        match self {
            Reply::One(tx) => {
                let _ = tx.send(Ok(first_seq));
            }
            Reply::Many(tx) => {
                let _ = tx.send(Ok(PublishReply {
                    topic: topic.to_string(),
                    first_seq,
                    last_seq: first_seq + count.saturating_sub(1) as u64,
                }));
            }
        }
    }

    fn fail(self, err: SdkError) {
        match self {
            Reply::One(tx) => {
                let _ = tx.send(Err(err));
            }
            Reply::Many(tx) => {
                let _ = tx.send(Err(err));
            }
        }
    }
}

/// One caller's contribution to the queue: one or more messages for one topic, kept together.
pub(crate) struct Entry<R> {
    topic: String,
    messages: Vec<NewMessage>,
    bytes: usize,
    reply: R,
}

impl<R> Entry<R> {
    pub(crate) fn new(topic: String, messages: Vec<NewMessage>, reply: R) -> Self {
        let bytes = messages.iter().map(estimated_size).sum();
        Entry {
            topic,
            messages,
            bytes,
            reply,
        }
    }
}

/// A group of entries for one topic that goes out as one `publish` request.
pub(crate) struct PlannedBatch<R> {
    topic: String,
    entries: Vec<Entry<R>>,
}

/// Groups queued entries into requests: by topic, within the message and byte limits, topics
/// served round-robin, queue order kept within a topic. Pure: no I/O, unit-tested.
pub(crate) struct Batcher<R> {
    by_topic: HashMap<String, VecDeque<Entry<R>>>,
    order: VecDeque<String>,
    queued_messages: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl<R> Batcher<R> {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Batcher {
            by_topic: HashMap::new(),
            order: VecDeque::new(),
            queued_messages: 0,
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    pub(crate) fn push(&mut self, entry: Entry<R>) {
        self.queued_messages += entry.messages.len();
        match self.by_topic.get_mut(&entry.topic) {
            Some(q) => q.push_back(entry),
            None => {
                self.order.push_back(entry.topic.clone());
                let topic = entry.topic.clone();
                self.by_topic.insert(topic, VecDeque::from([entry]));
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub(crate) fn queued_messages(&self) -> usize {
        self.queued_messages
    }

    /// The next request to send, if anything is queued. Always takes at least one entry (even
    /// one over the limits, which then goes alone).
    #[cfg(test)]
    pub(crate) fn next_batch(&mut self) -> Option<PlannedBatch<R>> {
        self.next_batch_except(&HashSet::new())
    }

    /// Like `next_batch`, skipping the topics in `busy` (they keep their turn).
    pub(crate) fn next_batch_except(&mut self, busy: &HashSet<String>) -> Option<PlannedBatch<R>> {
        let position = self.order.iter().position(|t| !busy.contains(t))?;
        let topic = self.order.remove(position)?;
        let Some(queue) = self.by_topic.get_mut(&topic) else {
            return self.next_batch_except(busy);
        };
        let mut entries = Vec::new();
        let (mut messages, mut bytes) = (0usize, 0usize);
        while let Some(front) = queue.front() {
            let fits = entries.is_empty()
                || (messages + front.messages.len() <= self.max_messages
                    && bytes + front.bytes <= self.max_bytes);
            if !fits {
                break;
            }
            let Some(entry) = queue.pop_front() else {
                break;
            };
            messages += entry.messages.len();
            bytes += entry.bytes;
            entries.push(entry);
        }
        self.queued_messages -= messages;
        if queue.is_empty() {
            self.by_topic.remove(&topic);
        } else {
            self.order.push_back(topic.clone());
        }
        Some(PlannedBatch { topic, entries })
    }
}

/// The producer's connection, re-opened on demand once it has closed.
struct ClientSlot {
    current: Mutex<Client>,
}

impl ClientSlot {
    fn new(client: Client) -> Self {
        ClientSlot {
            current: Mutex::new(client),
        }
    }

    async fn get(&self) -> Result<Client> {
        let mut current = self.current.lock().await;
        if current.is_closed() {
            tracing::warn!(
                reason = %current.closed_error(),
                addr = %current.config().addr,
                "producer connection closed; reconnecting"
            );
            let config = current.config().clone();
            *current = Client::connect(config).await?;
        }
        Ok(current.clone())
    }
}

async fn run_pipeline(
    mut rx: mpsc::Receiver<Entry<Reply>>,
    slot: Arc<ClientSlot>,
    options: ProducerOptions,
) {
    let mut batcher = Batcher::new(options.max_batch_messages, options.max_batch_bytes);
    let mut in_flight = FuturesUnordered::new();
    // Topics with a request in flight, when order must be preserved.
    let mut busy: HashSet<String> = HashSet::new();
    let mut open = true;
    loop {
        while in_flight.len() < options.max_in_flight_requests {
            let Some(batch) = batcher.next_batch_except(&busy) else {
                break;
            };
            if options.preserve_order {
                busy.insert(batch.topic.clone());
            }
            in_flight.push(send_batch(slot.clone(), batch));
        }
        if !open && batcher.is_empty() && in_flight.is_empty() {
            break;
        }
        let room = batcher.queued_messages() < options.queue_capacity;
        tokio::select! {
            entry = rx.recv(), if open && room => match entry {
                Some(entry) => {
                    batcher.push(entry);
                    // Take everything already queued, so it can share requests.
                    while batcher.queued_messages() < options.queue_capacity {
                        match rx.try_recv() {
                            Ok(entry) => batcher.push(entry),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            Some(topic) = in_flight.next(), if !in_flight.is_empty() => {
                busy.remove(&topic);
            }
            else => break,
        }
    }
    tracing::debug!("producer pipeline stopped");
}

/// Codes that mean "this request was refused as a whole before anything was stored": the
/// batch's entries are then retried one by one, so one bad message fails alone.
fn refused_before_storing(e: &SdkError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge | ErrorCode::BadPayload)
    )
}

/// Sends one planned batch and answers its callers; returns the topic.
async fn send_batch(slot: Arc<ClientSlot>, batch: PlannedBatch<Reply>) -> String {
    let PlannedBatch { topic, entries } = batch;
    let total: usize = entries.iter().map(|e| e.messages.len()).sum();
    let mut messages = Vec::with_capacity(total);
    let mut replies = Vec::with_capacity(entries.len());
    for entry in entries {
        replies.push((entry.messages.len(), entry.reply));
        messages.extend(entry.messages);
    }
    let request = PublishRequest {
        topic: topic.clone(),
        messages,
    };
    match publish_once(&slot, &request).await {
        Ok(first_seq) => {
            let mut seq = first_seq;
            for (count, reply) in replies {
                reply.send(&topic, seq, count);
                seq += count as u64;
            }
        }
        Err(e) if replies.len() > 1 && refused_before_storing(&e) => {
            tracing::debug!(error = %e, "batch refused; retrying its entries one by one");
            let mut messages = request.messages.into_iter();
            for (count, reply) in replies {
                let single = PublishRequest {
                    topic: topic.clone(),
                    messages: messages.by_ref().take(count).collect(),
                };
                match publish_once(&slot, &single).await {
                    Ok(first_seq) => reply.send(&topic, first_seq, count),
                    Err(e) => reply.fail(e),
                }
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                reply.fail(e.clone());
            }
        }
    }
    topic
}

/// Sends one `publish` request; returns the first sequence number after checking that the
/// reply covers exactly the request's messages.
async fn publish_once(slot: &ClientSlot, request: &PublishRequest) -> Result<u64> {
    let client = slot.get().await?;
    let reply: PublishReply = client.request(route::PUBLISH, request).await?;
    check_reply(request, &reply)?;
    Ok(reply.first_seq)
}

fn check_reply(request: &PublishRequest, reply: &PublishReply) -> Result<()> {
    let expected = request.messages.len() as u64;
    let got = reply
        .last_seq
        .checked_sub(reply.first_seq)
        .map(|d| d + 1)
        .unwrap_or(0);
    if got != expected || reply.first_seq == 0 {
        return Err(SdkError::Protocol(format!(
            "publish of {expected} messages to '{}' answered with seq {}..={}",
            request.topic, reply.first_seq, reply.last_seq
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> NewMessage {
        NewMessage {
            payload: Bytes::from(vec![b'x'; n]),
            ..Default::default()
        }
    }

    fn entry(topic: &str, count: usize, size: usize, id: u32) -> Entry<u32> {
        Entry::new(topic.into(), (0..count).map(|_| msg(size)).collect(), id)
    }

    fn ids(b: &PlannedBatch<u32>) -> Vec<u32> {
        b.entries.iter().map(|e| e.reply).collect()
    }

    #[test]
    fn groups_by_topic_round_robin_keeping_order() {
        let mut b = Batcher::new(512, 1 << 20);
        b.push(entry("a", 1, 10, 1));
        b.push(entry("b", 1, 10, 2));
        b.push(entry("a", 1, 10, 3));
        b.push(entry("b", 1, 10, 4));
        b.push(entry("c", 1, 10, 5));
        assert_eq!(b.queued_messages(), 5);
        let first = b.next_batch().expect("batch");
        assert_eq!((first.topic.as_str(), ids(&first)), ("a", vec![1, 3]));
        let second = b.next_batch().expect("batch");
        assert_eq!((second.topic.as_str(), ids(&second)), ("b", vec![2, 4]));
        let third = b.next_batch().expect("batch");
        assert_eq!((third.topic.as_str(), ids(&third)), ("c", vec![5]));
        assert!(b.next_batch().is_none());
        assert!(b.is_empty());
        assert_eq!(b.queued_messages(), 0);
    }

    #[test]
    fn splits_at_message_limit_and_rotates_topics() {
        let mut b = Batcher::new(3, 1 << 20);
        for i in 0..7 {
            b.push(entry("a", 1, 1, i));
        }
        b.push(entry("b", 1, 1, 100));
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![0, 1, 2]);
        // "a" has more, but "b" gets its turn first.
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![100]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![3, 4, 5]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![6]);
        assert!(b.next_batch().is_none());
    }

    #[test]
    fn busy_topics_wait_their_turn() {
        let mut b = Batcher::new(2, 1 << 20);
        for i in 0..3 {
            b.push(entry("a", 1, 1, i));
        }
        b.push(entry("b", 1, 1, 10));
        let busy = HashSet::from(["a".to_string()]);
        assert_eq!(ids(&b.next_batch_except(&busy).expect("batch")), vec![10]);
        assert!(b.next_batch_except(&busy).is_none());
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![0, 1]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![2]);
        assert!(b.is_empty());
    }

    #[test]
    fn multi_message_entries_stay_whole() {
        let mut b = Batcher::new(4, 1 << 20);
        b.push(entry("a", 3, 1, 1));
        b.push(entry("a", 3, 1, 2));
        b.push(entry("a", 1, 1, 3));
        // 3 + 3 > 4: the second entry is not split, it waits for the next request.
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![1]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![2, 3]);
    }

    #[test]
    fn byte_limit_and_oversize_entries() {
        let size = estimated_size(&msg(100));
        let mut b = Batcher::new(512, size * 2);
        b.push(entry("a", 1, 100, 1));
        b.push(entry("a", 1, 100, 2));
        b.push(entry("a", 1, 100, 3));
        b.push(entry("a", 1, 10_000, 4));
        b.push(entry("a", 1, 100, 5));
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![1, 2]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![3]);
        // over the byte limit on its own: still sent, alone
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![4]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![5]);
    }

    #[test]
    fn size_estimate_covers_encoding() {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("region".to_string(), "eu-west".to_string());
        let m = NewMessage {
            key: Some("customer-42".into()),
            headers,
            priority: 3,
            payload: Bytes::from(vec![7u8; 1000]),
        };
        let encoded = sluice_protocol::encode(&m).expect("encode").len();
        let estimate = estimated_size(&m);
        assert!(estimate >= encoded, "{estimate} < {encoded}");
        assert!(estimate < encoded + 64, "{estimate} far above {encoded}");
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic("orders.eu-west_1").is_ok());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("a/b").is_err());
        assert!(validate_topic("é").is_err());
        assert!(validate_topic(&"a".repeat(120)).is_ok());
        assert!(validate_topic(&"a".repeat(121)).is_err());
        assert!(validate_topic("..").is_err());
        assert!(validate_topic(&"a".repeat(201)).is_err());
    }

    #[test]
    fn reply_must_cover_the_request() {
        let req = PublishRequest {
            topic: "t".into(),
            messages: vec![msg(1), msg(1), msg(1)],
        };
        let reply = |first_seq, last_seq| PublishReply {
            topic: "t".into(),
            first_seq,
            last_seq,
        };
        assert!(check_reply(&req, &reply(5, 7)).is_ok());
        assert!(check_reply(&req, &reply(5, 6)).is_err());
        assert!(check_reply(&req, &reply(7, 5)).is_err());
        assert!(check_reply(&req, &reply(0, 2)).is_err());
    }

    #[test]
    fn replies_carry_their_own_seqs() {
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        Reply::One(tx1).send("t", 10, 1);
        Reply::Many(tx2).send("t", 11, 4);
        assert_eq!(rx1.try_recv().expect("sent").expect("ok"), 10);
        let r = rx2.try_recv().expect("sent").expect("ok");
        assert_eq!((r.first_seq, r.last_seq), (11, 14));
    }

    #[test]
    fn options_validation() {
        assert!(ProducerOptions::default().validate().is_ok());
        let bad = ProducerOptions {
            max_in_flight_requests: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
