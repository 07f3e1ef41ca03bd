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
//! Idempotence: by default ([`ProducerOptions::idempotent`]) every message without an id gets
//! one when its request is written, `<producer id>-<n>` (the producer id is 16 random hex
//! digits, `n` counts this producer's messages from 1, so a request's are consecutive: the
//! broker holds such a run of ids as one entry of its index). The id is written straight into
//! the request, never kept as a `String` of its own. When a request's connection drops, its request
//! times out, or the broker answers `UNAVAILABLE`/`TIMEOUT`, the request is sent again — the
//! same bytes, so the same ids — on a new connection, for up to
//! [`ProducerOptions::resend_for`]: the broker keeps the ids it stored within the topic's
//! `dedup_window` (2 min by default) and answers a repeat with the original sequence number
//! (`PublishReply::duplicate`) instead of storing it again, so a resend never stores a message
//! twice. A request with a message without an id (idempotence turned off and no id given) is
//! not resent: its callers get the error, as the request may have been stored. The topic's
//! order is kept: with `preserve_order`, nothing else of the topic is sent while a request is
//! being resent.
//!
//! Per-message cost (the producer runs beside the broker, often on the same cores):
//! - a publish is one entry on the queue (its message inline, its topic an `Arc<str>` shared
//!   with the previous publishes to that topic through this handle, validated once) and one
//!   oneshot for the answer; the returned future is that oneshot's receiver, a pointer, unless
//!   the queue was full;
//! - the queue is a `VecDeque` behind a lock held for a push, which the task swaps out whole;
//!   its room is counted by a fair semaphore, so callers that found it full get in in the order
//!   they came;
//! - a request's data is written once, straight from the queued entries, into a buffer sized
//!   up front (MessagePack written by hand, byte for byte what `sluice_protocol::encode` would
//!   write for the same `PublishRequest`; a test compares the two).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::poll_fn;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::StreamExt;
use sluice_protocol::{route, ErrorCode, NewMessage, PublishReply, MAX_ID_LEN, MAX_PRIORITY};
use tokio::sync::{oneshot, Mutex, Semaphore, TryAcquireError};

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
    /// Give every message without an id ([`NewMessage::id`]) one, `<producer id>-<n>`, so that
    /// a resent request is not stored twice (default true). See the module documentation.
    pub idempotent: bool,
    /// How long a request is sent again after its connection dropped, it timed out or the
    /// broker answered `UNAVAILABLE` (default 30 s; zero: never). Only requests whose every
    /// message has an id are resent. Keep it below the broker's `dedup_window` (2 min by
    /// default): a resend after the window would store the messages again.
    pub resend_for: Duration,
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
            idempotent: true,
            resend_for: Duration::from_secs(30),
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
    queue: QueueSender,
    max_payload_bytes: usize,
    last_topic: TopicCache,
    /// Where message ids come from (`None`: idempotence off).
    ids: Option<Arc<IdSource>>,
}

/// The ids of one producer (shared by its clones and its pipeline): `<prefix>-<n>`, `n` from 1,
/// taken a request at a time when the request is written.
#[derive(Debug)]
pub(crate) struct IdSource {
    prefix: String,
    next: AtomicU64,
}

impl IdSource {
    /// A source with a fresh random prefix (16 hex digits).
    pub(crate) fn new() -> Self {
        IdSource::with_prefix(format!("{:016x}", random_u64()))
    }

    pub(crate) fn with_prefix(prefix: String) -> Self {
        IdSource {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    /// Takes `count` consecutive numbers; returns the first.
    pub(crate) fn take(&self, count: usize) -> u64 {
        self.next.fetch_add(count as u64, Ordering::Relaxed)
    }

    /// Writes the id `<prefix>-<n>` as a MessagePack `str` into `buf` (no allocation, no
    /// formatting machinery: this is on the per-message path).
    pub(crate) fn write_id(&self, buf: &mut Vec<u8>, mut n: u64) -> Result<()> {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let digits = &digits[at..];
        msgpack::str_header(buf, self.prefix.len() + 1 + digits.len())?;
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.push(b'-');
        buf.extend_from_slice(digits);
        Ok(())
    }

    /// The id `<prefix>-<n>` as a string (tests).
    #[cfg(test)]
    pub(crate) fn id(&self, n: u64) -> String {
        format!("{}-{n}", self.prefix)
    }
}

/// 64 random bits: std's randomly seeded hasher over the time and the process id (no RNG
/// crate needed for an id prefix).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("queue_room", &self.queue.0.room.available_permits())
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
        // The queue holds entries; the bound on queued messages is enforced by the task (it
        // stops taking entries while its own queue is full).
        let (queue, rx) = queue(options.queue_capacity.clamp(1, 8192));
        let max_payload_bytes = options.max_payload_bytes;
        let ids = options.idempotent.then(|| Arc::new(IdSource::new()));
        let slot = Arc::new(ClientSlot::new(client));
        tokio::spawn(run_pipeline(rx, slot, options, ids.clone()));
        Producer {
            queue,
            max_payload_bytes,
            last_topic: TopicCache::default(),
            ids,
        }
    }

    /// The prefix of the ids this producer gives its messages (`None`: idempotence is off).
    pub fn id_prefix(&self) -> Option<&str> {
        self.ids.as_deref().map(|s| s.prefix.as_str())
    }

    /// Publishes one message; the returned future resolves with its sequence number once the
    /// message is durable (for a message whose id the broker had stored already within the
    /// topic's dedup window: the original's sequence number).
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
        let checked = self
            .last_topic
            .intern(topic.into())
            .and_then(|topic| self.validate_message(&message).map(|()| topic));
        match checked {
            Ok(topic) => {
                let (tx, rx) = oneshot::channel();
                self.enqueue(
                    Entry::new(topic, Messages::One(message), Reply::One(tx)),
                    rx,
                )
            }
            Err(e) => Pending::failed(e),
        }
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
    /// called, like [`Producer::publish`]; resolves once they are durable. If some message of
    /// the request they went out in repeated an id stored already, the reply has `duplicate`
    /// set and `seqs` gives each of these messages' sequence number (a duplicate's is the
    /// original's).
    pub fn publish_batch(
        &self,
        topic: impl Into<String>,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<PublishReply>> + Send + 'static {
        let messages: Vec<NewMessage> = messages.into_iter().collect();
        let checked = self.last_topic.intern(topic.into()).and_then(|topic| {
            if messages.is_empty() {
                return Err(SdkError::InvalidArgument(
                    "publish_batch needs at least one message".into(),
                ));
            }
            messages
                .iter()
                .try_for_each(|m| self.validate_message(m))
                .map(|()| topic)
        });
        match checked {
            Ok(topic) => {
                let (tx, rx) = oneshot::channel();
                self.enqueue(
                    Entry::new(topic, Messages::Many(messages), Reply::Many(tx)),
                    rx,
                )
            }
            Err(e) => Pending::failed(e),
        }
    }

    /// Queues `entry` now if the queue has room; otherwise the returned future queues it first
    /// (callers waiting for room are let in in order, so call order is kept), then waits on
    /// `rx`.
    fn enqueue<T: Send + 'static>(
        &self,
        entry: Entry<Reply>,
        rx: oneshot::Receiver<Result<T>>,
    ) -> Pending<T> {
        match self.queue.0.room.try_acquire() {
            Ok(place) => {
                place.forget();
                match self.queue.0.push(entry) {
                    Ok(()) => Pending::Queued(rx),
                    Err(e) => Pending::failed(e),
                }
            }
            Err(TryAcquireError::NoPermits) => {
                let queue = self.queue.clone();
                Pending::Slow(Box::pin(async move {
                    queue
                        .0
                        .room
                        .acquire()
                        .await
                        .map_err(|_| stopped())?
                        .forget();
                    queue.0.push(entry)?;
                    rx.await.unwrap_or_else(|_| Err(stopped()))
                }))
            }
            Err(TryAcquireError::Closed) => Pending::failed(stopped()),
        }
    }

    fn validate_message(&self, m: &NewMessage) -> Result<()> {
        if let Some(id) = &m.id {
            if id.is_empty() || id.len() > MAX_ID_LEN {
                return Err(SdkError::InvalidArgument(format!(
                    "message id must be 1..={MAX_ID_LEN} bytes, not {}",
                    id.len()
                )));
            }
        }
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

/// The future `publish` and `publish_batch` return. In the common case (the entry was queued at
/// once) it is just the receiver of the answer, one pointer: callers that keep thousands of
/// publishes in flight store and move little per publish.
enum Pending<T> {
    /// Queued; waiting for the answer.
    Queued(oneshot::Receiver<Result<T>>),
    /// The queue was full (waits for room, then for the answer), or the call already failed.
    Slow(Pin<Box<dyn Future<Output = Result<T>> + Send>>),
}

impl<T: Send + 'static> Pending<T> {
    fn failed(e: SdkError) -> Self {
        Pending::Slow(Box::pin(std::future::ready(Err(e))))
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        match self.get_mut() {
            Pending::Queued(rx) => Pin::new(rx)
                .poll(cx)
                .map(|answer| answer.unwrap_or_else(|_| Err(stopped()))),
            Pending::Slow(f) => f.as_mut().poll(cx),
        }
    }
}

/// The topic of the last successful call on this handle, so that publishing to the same topic
/// again neither re-validates its name nor allocates it again: entries share one `Arc<str>`.
/// Each clone of a [`Producer`] has its own; never waited on (a busy cache is skipped).
#[derive(Default)]
struct TopicCache(StdMutex<Option<Arc<str>>>);

impl Clone for TopicCache {
    fn clone(&self) -> Self {
        let last = self.0.try_lock().ok().and_then(|t| t.clone());
        TopicCache(StdMutex::new(last))
    }
}

impl TopicCache {
    /// `topic`, validated, as a shared string.
    fn intern(&self, topic: String) -> Result<Arc<str>> {
        let Ok(mut last) = self.0.try_lock() else {
            validate_topic(&topic)?;
            return Ok(Arc::from(topic));
        };
        if let Some(known) = last.as_ref().filter(|t| ***t == *topic) {
            return Ok(known.clone());
        }
        validate_topic(&topic)?;
        let topic: Arc<str> = Arc::from(topic);
        *last = Some(topic.clone());
        Ok(topic)
    }
}

/// The queue between the callers and the pipeline task: `publish` appends under a short lock,
/// the task takes everything queued at once. Room is counted in entries by a fair semaphore,
/// so callers that found the queue full get in in the order they came.
struct Queue {
    state: StdMutex<QueueState>,
    /// Free places, in entries. Closed once the pipeline task is gone.
    room: Semaphore,
    /// The pipeline task, while it waits for entries.
    pipeline: AtomicWaker,
}

struct QueueState {
    entries: VecDeque<Entry<Reply>>,
    /// Live [`QueueSender`]s: once none is left and nothing is queued, the pipeline stops.
    senders: usize,
    /// False once the pipeline task is gone: nothing would take a new entry.
    open: bool,
}

/// A new queue with `places` places: the producers' end and the pipeline's end.
fn queue(places: usize) -> (QueueSender, QueueReceiver) {
    let queue = Arc::new(Queue {
        state: StdMutex::new(QueueState {
            entries: VecDeque::new(),
            senders: 1,
            open: true,
        }),
        room: Semaphore::new(places),
        pipeline: AtomicWaker::new(),
    });
    (
        QueueSender(queue.clone()),
        QueueReceiver {
            queue,
            taken: VecDeque::new(),
        },
    )
}

impl Queue {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `entry`, whose place was already taken; fails if the pipeline is gone.
    fn push(&self, entry: Entry<Reply>) -> Result<()> {
        {
            let mut state = self.state();
            if !state.open {
                return Err(stopped());
            }
            state.entries.push_back(entry);
        }
        self.pipeline.wake();
        Ok(())
    }
}

/// A producer's end of the queue (counted, so that the pipeline stops with the last one).
struct QueueSender(Arc<Queue>);

impl Clone for QueueSender {
    fn clone(&self) -> Self {
        self.0.state().senders += 1;
        QueueSender(self.0.clone())
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.state();
            state.senders = state.senders.saturating_sub(1);
            state.senders == 0
        };
        if last {
            self.0.pipeline.wake();
        }
    }
}

/// The pipeline's end of the queue. Dropping it (the task ended, or its runtime shut down)
/// closes the queue: entries still queued are dropped, so their callers get an error.
struct QueueReceiver {
    queue: Arc<Queue>,
    /// Entries taken off the queue, not yet handed to the batcher (they keep their places).
    taken: VecDeque<Entry<Reply>>,
}

impl QueueReceiver {
    /// Ready with `true` once entries are taken, with `false` once every sender is gone and
    /// nothing is left.
    fn poll_taken(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.taken.is_empty() {
            return Poll::Ready(true);
        }
        // Registered before looking, so that a push right after the look wakes us.
        self.queue.pipeline.register(cx.waker());
        let mut state = self.queue.state();
        if !state.entries.is_empty() {
            std::mem::swap(&mut state.entries, &mut self.taken);
            Poll::Ready(true)
        } else if state.senders == 0 {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    }

    /// Hands taken entries to `batcher`, in order, while it holds fewer than `capacity`
    /// messages; frees their places.
    fn drain_into(&mut self, batcher: &mut Batcher<Reply>, capacity: usize) {
        let mut moved = 0;
        while batcher.queued_messages() < capacity {
            let Some(entry) = self.taken.pop_front() else {
                break;
            };
            batcher.push(entry);
            moved += 1;
        }
        if moved > 0 {
            self.queue.room.add_permits(moved);
        }
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        self.queue.room.close();
        let left = {
            let mut state = self.queue.state();
            state.open = false;
            std::mem::take(&mut state.entries)
        };
        drop(left);
    }
}

fn stopped() -> SdkError {
    SdkError::Closed("the producer's background task stopped".into())
}

/// Checks a topic name the way the broker does: 1..=120 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<()> {
    sluice_protocol::validate_name("topic", topic).map_err(|e| SdkError::InvalidArgument(e.message))
}

/// Estimated MessagePack size of one message inside a `PublishRequest` (map keys included);
/// never below the real size.
pub(crate) fn estimated_size(m: &NewMessage) -> usize {
    const FIXED: usize = 48; // map header, four keys, markers, priority
    FIXED
        + m.payload.len()
        + m.id.as_ref().map_or(0, |i| i.len() + 8)
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
                let _ = tx.send(Ok(PublishReply::stored(
                    topic,
                    first_seq,
                    first_seq + count.saturating_sub(1) as u64,
                )));
            }
        }
    }

    /// Answers from `reply`, whose messages `offset..offset + count` are this entry's.
    fn send_from(self, reply: &PublishReply, offset: usize, count: usize) {
        if !reply.duplicate {
            let first = reply.first_seq + offset as u64;
            return self.send(&reply.topic, first, count);
        }
        let seqs: Vec<u64> = (offset..offset + count)
            .map_while(|i| reply.seq_of(i))
            .collect();
        if seqs.len() != count {
            // `check_reply` made sure there is one seq per message.
            return self.fail(SdkError::Protocol(
                "publish reply without a seq per message".into(),
            ));
        }
        match self {
            Reply::One(tx) => {
                let _ = tx.send(Ok(seqs[0]));
            }
            Reply::Many(tx) => {
                let (lo, hi) = seqs
                    .iter()
                    .fold((u64::MAX, 0), |(lo, hi), &s| (lo.min(s), hi.max(s)));
                let _ = tx.send(Ok(PublishReply {
                    topic: reply.topic.clone(),
                    first_seq: lo,
                    last_seq: hi,
                    duplicate: true,
                    seqs,
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

/// The messages of one entry: `publish` brings one (kept inline, no `Vec`), `publish_batch`
/// several.
pub(crate) enum Messages {
    One(NewMessage),
    Many(Vec<NewMessage>),
}

impl Messages {
    fn as_slice(&self) -> &[NewMessage] {
        match self {
            Messages::One(m) => std::slice::from_ref(m),
            Messages::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

/// One caller's contribution to the queue: one or more messages for one topic, kept together.
pub(crate) struct Entry<R> {
    topic: Arc<str>,
    messages: Messages,
    bytes: usize,
    reply: R,
}

impl<R> Entry<R> {
    pub(crate) fn new(topic: Arc<str>, messages: Messages, reply: R) -> Self {
        let bytes = messages.as_slice().iter().map(estimated_size).sum();
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
    topic: Arc<str>,
    entries: Vec<Entry<R>>,
}

/// FxHash (rustc's hasher): a multiply and a rotate per word. The producer's maps are keyed by
/// topic names it chose itself, so SipHash's protection against crafted keys buys nothing
/// there, and hashing is on the per-message path.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.add(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// Topics with a request in flight.
pub(crate) type TopicSet = HashSet<Arc<str>, FxBuildHasher>;

/// Groups queued entries into requests: by topic, within the message and byte limits, topics
/// served round-robin, queue order kept within a topic. Pure: no I/O, unit-tested.
pub(crate) struct Batcher<R> {
    /// Queued entries per topic; a topic keeps its slot while it has entries queued.
    slots: Vec<TopicQueue<R>>,
    /// The slot of each topic with entries queued.
    by_topic: HashMap<Arc<str>, usize, FxBuildHasher>,
    /// Slots not in use.
    free: Vec<usize>,
    /// Slots with entries queued, in round-robin order.
    order: VecDeque<usize>,
    /// The slot the last entry went to. An entry with the very same topic `Arc` (the usual
    /// case: a producer hands out one `Arc` per topic) goes there without a map lookup.
    last: usize,
    /// The buffer of the last emptied topic queue, reused for the next new one (one topic
    /// that empties and refills all the time does not reallocate its queue).
    spare: VecDeque<Entry<R>>,
    queued_messages: usize,
    max_messages: usize,
    max_bytes: usize,
}

/// The queued entries of one topic (`topic` is `None` while the slot is free).
struct TopicQueue<R> {
    topic: Option<Arc<str>>,
    entries: VecDeque<Entry<R>>,
}

impl<R> TopicQueue<R> {
    fn holds(&self, topic: &Arc<str>) -> bool {
        self.topic.as_ref().is_some_and(|t| Arc::ptr_eq(t, topic))
    }
}

impl<R> Batcher<R> {
    pub(crate) fn new(max_messages: usize, max_bytes: usize) -> Self {
        Batcher {
            slots: Vec::new(),
            by_topic: HashMap::default(),
            free: Vec::new(),
            order: VecDeque::new(),
            last: 0,
            spare: VecDeque::new(),
            queued_messages: 0,
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    pub(crate) fn push(&mut self, entry: Entry<R>) {
        self.queued_messages += entry.messages.len();
        if let Some(queue) = self.slots.get_mut(self.last) {
            if queue.holds(&entry.topic) {
                queue.entries.push_back(entry);
                return;
            }
        }
        let slot = match self.by_topic.get(&entry.topic) {
            Some(&slot) => slot,
            None => self.open_slot(entry.topic.clone()),
        };
        self.last = slot;
        match self.slots.get_mut(slot) {
            Some(queue) => queue.entries.push_back(entry),
            // Unreachable: `by_topic` only names slots that exist.
            None => self.queued_messages -= entry.messages.len(),
        }
    }

    /// A slot for a topic that has nothing queued, last in the round-robin order.
    fn open_slot(&mut self, topic: Arc<str>) -> usize {
        let queue = TopicQueue {
            topic: Some(topic.clone()),
            entries: std::mem::take(&mut self.spare),
        };
        let slot = match self.free.pop() {
            Some(slot) if slot < self.slots.len() => {
                self.slots[slot] = queue;
                slot
            }
            _ => {
                self.slots.push(queue);
                self.slots.len() - 1
            }
        };
        self.by_topic.insert(topic, slot);
        self.order.push_back(slot);
        slot
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
        self.next_batch_except(&TopicSet::default())
    }

    /// Like `next_batch`, skipping the topics in `busy` (they keep their turn).
    pub(crate) fn next_batch_except(&mut self, busy: &TopicSet) -> Option<PlannedBatch<R>> {
        let slots = &self.slots;
        let position = self.order.iter().position(|&slot| {
            slots
                .get(slot)
                .and_then(|q| q.topic.as_ref())
                .is_some_and(|t| !busy.contains(t))
        })?;
        let slot = self.order.remove(position)?;
        let queue = self.slots.get_mut(slot)?;
        let topic = queue.topic.clone()?;
        let (mut take, mut messages, mut bytes) = (0usize, 0usize, 0usize);
        for entry in queue.entries.iter() {
            let fits = take == 0
                || (messages + entry.messages.len() <= self.max_messages
                    && bytes + entry.bytes <= self.max_bytes);
            if !fits {
                break;
            }
            take += 1;
            messages += entry.messages.len();
            bytes += entry.bytes;
        }
        let entries: Vec<Entry<R>> = queue.entries.drain(..take).collect();
        self.queued_messages -= messages;
        if queue.entries.is_empty() {
            queue.topic = None;
            let emptied = std::mem::take(&mut queue.entries);
            if emptied.capacity() > self.spare.capacity() {
                self.spare = emptied;
            }
            self.by_topic.remove(&topic);
            self.free.push(slot);
        } else {
            self.order.push_back(slot);
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
    mut rx: QueueReceiver,
    slot: Arc<ClientSlot>,
    options: ProducerOptions,
    ids: Option<Arc<IdSource>>,
) {
    let mut batcher = Batcher::new(options.max_batch_messages, options.max_batch_bytes);
    let mut in_flight = FuturesUnordered::new();
    // Topics with a request in flight, when order must be preserved.
    let mut busy = TopicSet::default();
    let mut open = true;
    loop {
        while in_flight.len() < options.max_in_flight_requests {
            let Some(batch) = batcher.next_batch_except(&busy) else {
                break;
            };
            if options.preserve_order {
                busy.insert(batch.topic.clone());
            }
            in_flight.push(send_batch(
                slot.clone(),
                batch,
                options.resend_for,
                ids.clone(),
            ));
        }
        if !open && batcher.is_empty() && in_flight.is_empty() {
            break;
        }
        let room = batcher.queued_messages() < options.queue_capacity;
        tokio::select! {
            // Takes everything already queued, so it can share requests.
            taken = poll_fn(|cx| rx.poll_taken(cx)), if open && room => {
                if taken {
                    rx.drain_into(&mut batcher, options.queue_capacity);
                } else {
                    open = false;
                }
            }
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
async fn send_batch(
    slot: Arc<ClientSlot>,
    batch: PlannedBatch<Reply>,
    resend_for: Duration,
    ids: Option<Arc<IdSource>>,
) -> Arc<str> {
    let PlannedBatch { topic, entries } = batch;
    let ids = ids.as_deref();
    match publish_entries(&slot, &topic, &entries, resend_for, ids).await {
        Ok(reply) => {
            let mut offset = 0;
            for Entry {
                messages, reply: r, ..
            } in entries
            {
                let count = messages.len();
                r.send_from(&reply, offset, count);
                offset += count;
            }
        }
        Err(e) if entries.len() > 1 && refused_before_storing(&e) => {
            tracing::debug!(error = %e, "batch refused; retrying its entries one by one");
            for entry in entries {
                let sent =
                    publish_entries(&slot, &topic, std::slice::from_ref(&entry), resend_for, ids)
                        .await;
                let Entry {
                    messages, reply, ..
                } = entry;
                match sent {
                    Ok(answer) => reply.send_from(&answer, 0, messages.len()),
                    Err(e) => reply.fail(e),
                }
            }
        }
        Err(e) => {
            for entry in entries {
                entry.reply.fail(e.clone());
            }
        }
    }
    topic
}

/// Errors after which a request whose every message has an id is sent again: the connection
/// dropped or the request timed out (it may or may not have been stored), or the broker could
/// not serve it now.
fn worth_resending(e: &SdkError) -> bool {
    e.is_connection_error() || matches!(e.code(), Some(ErrorCode::Unavailable | ErrorCode::Timeout))
}

/// Delay before resend number `attempt` (1, 2, ...): 50 ms doubling up to 2 s.
fn resend_delay(attempt: u32) -> Duration {
    Duration::from_millis(50)
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(2))
}

/// Sends the messages of `entries` as one `publish` request and checks that the reply covers
/// exactly those messages. A request whose every message has an id is sent again (the same
/// bytes, on a new connection if needed) after a dropped connection, a timeout or
/// `UNAVAILABLE`, for up to `resend_for`.
async fn publish_entries<R>(
    slot: &ClientSlot,
    topic: &str,
    entries: &[Entry<R>],
    resend_for: Duration,
    ids: Option<&IdSource>,
) -> Result<PublishReply> {
    let count = entries.iter().map(|e| e.messages.len()).sum();
    let data = Bytes::from(encode_publish(topic, entries, count, ids)?);
    // Every message has an id when the producer gives them.
    let resendable = !resend_for.is_zero()
        && (ids.is_some()
            || entries
                .iter()
                .all(|e| e.messages.as_slice().iter().all(|m| m.id.is_some())));
    let deadline = tokio::time::Instant::now() + resend_for;
    let mut attempt = 0u32;
    loop {
        let sent = async {
            let client = slot.get().await?;
            client
                .request_data::<PublishReply>(route::PUBLISH, data.clone())
                .await
        }
        .await;
        match sent {
            Ok(reply) => {
                check_reply(topic, count, &reply)?;
                if attempt > 0 {
                    tracing::info!(
                        topic,
                        messages = count,
                        resends = attempt,
                        duplicate = reply.duplicate,
                        "publish stored after a resend"
                    );
                }
                return Ok(reply);
            }
            Err(e) if resendable && worth_resending(&e) => {
                attempt += 1;
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    tracing::warn!(topic, error = %e, resends = attempt - 1, "publish failed; giving up resending");
                    return Err(e);
                }
                let delay = resend_delay(attempt).min(deadline - now);
                tracing::warn!(topic, messages = count, error = %e, attempt, retry_in = ?delay, "publish unconfirmed; resending with the same ids");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Room for a `PublishRequest`'s own fields around its messages: map header, the two keys,
/// the topic's string header and the array header.
const PUBLISH_OVERHEAD: usize = 32;

/// The data of a `publish` request carrying the `count` messages of `entries` in order: the
/// bytes `sluice_protocol::encode` gives for the equivalent [`sluice_protocol::PublishRequest`]
/// (a test compares them), written straight from the entries into one buffer sized up front
/// from the entries' estimates: no `Vec<NewMessage>` is collected, the buffer never grows. With
/// `ids`, each message without an id gets the next of the producer's (taken for the whole
/// request at once, so they are consecutive).
fn encode_publish<R>(
    topic: &str,
    entries: &[Entry<R>],
    count: usize,
    ids: Option<&IdSource>,
) -> Result<Vec<u8>> {
    let estimate: usize = entries.iter().map(|e| e.bytes).sum();
    // `fixstr`/`str8` header, the prefix, the dash and up to 20 digits, and the key "id".
    let id_room = ids.map_or(0, |s| count * (s.prefix.len() + 26));
    let mut buf = Vec::with_capacity(PUBLISH_OVERHEAD + topic.len() + estimate + id_room);
    msgpack::map_len(&mut buf, 2)?;
    msgpack::str(&mut buf, "topic")?;
    msgpack::str(&mut buf, topic)?;
    msgpack::str(&mut buf, "messages")?;
    msgpack::array_len(&mut buf, count)?;
    let messages = entries.iter().flat_map(|e| e.messages.as_slice());
    match ids {
        None => {
            for m in messages {
                encode_message(&mut buf, m, None)?;
            }
        }
        Some(source) => {
            let own = entries
                .iter()
                .flat_map(|e| e.messages.as_slice())
                .filter(|m| m.id.is_none())
                .count();
            let mut n = source.take(own);
            for m in messages {
                if m.id.is_none() {
                    encode_message(&mut buf, m, Some((source, n)))?;
                    n += 1;
                } else {
                    encode_message(&mut buf, m, None)?;
                }
            }
        }
    }
    Ok(buf)
}

/// A [`NewMessage`] as `sluice_protocol::encode` writes it: a map of its fields, in
/// declaration order, by name (`id` only when present: its own, or `auto`'s number `n` of the
/// producer's ids when it has none).
fn encode_message(buf: &mut Vec<u8>, m: &NewMessage, auto: Option<(&IdSource, u64)>) -> Result<()> {
    match (&m.id, auto) {
        // fixmap(5), "id": str
        (Some(id), _) => {
            buf.extend_from_slice(b"\x85\xa2id");
            msgpack::str(buf, id)?;
        }
        (None, Some((source, n))) => {
            buf.extend_from_slice(b"\x85\xa2id");
            source.write_id(buf, n)?;
        }
        // fixmap(4)
        (None, None) => buf.push(0x84),
    }
    if m.key.is_none() && m.headers.is_empty() && m.priority < 0x80 {
        // The usual message: everything up to the payload in one go.
        // "key": nil, "headers": fixmap(0), "priority": fixint, "payload": ...
        const PLAIN: &[u8] = b"\xa3key\xc0\xa7headers\x80\xa8priority";
        buf.extend_from_slice(PLAIN);
        buf.push(m.priority);
        buf.extend_from_slice(b"\xa7payload");
        return msgpack::bin(buf, &m.payload);
    }
    buf.extend_from_slice(b"\xa3key");
    match &m.key {
        None => buf.push(msgpack::NIL),
        Some(key) => msgpack::str(buf, key)?,
    }
    buf.extend_from_slice(b"\xa7headers");
    msgpack::map_len(buf, m.headers.len())?;
    for (name, value) in &m.headers {
        msgpack::str(buf, name)?;
        msgpack::str(buf, value)?;
    }
    buf.extend_from_slice(b"\xa8priority");
    msgpack::uint(buf, u64::from(m.priority));
    buf.extend_from_slice(b"\xa7payload");
    msgpack::bin(buf, &m.payload)
}

/// The few MessagePack writers the `publish` request needs, each choosing the shortest form
/// (as the `rmp` encoder behind `sluice_protocol::encode` does).
mod msgpack {
    use crate::error::{Result, SdkError};

    pub(super) const NIL: u8 = 0xc0;

    fn too_long(what: &str, len: usize) -> SdkError {
        SdkError::InvalidArgument(format!("{what} of {len} bytes is too long to encode"))
    }

    /// A length header: `fix` (OR-ed with the length) below `fix_max`, else the 8-bit form
    /// (if any), the 16-bit or the 32-bit one.
    #[inline]
    fn header(
        buf: &mut Vec<u8>,
        len: usize,
        (fix, fix_max): (u8, usize),
        [m8, m16, m32]: [Option<u8>; 3],
        what: &str,
    ) -> Result<()> {
        if len < fix_max {
            // len < fix_max <= 32: fits the low bits of the marker.
            buf.push(fix | len as u8);
        } else if let (Some(m8), Ok(n)) = (m8, u8::try_from(len)) {
            buf.extend_from_slice(&[m8, n]);
        } else if let (Some(m16), Ok(n)) = (m16, u16::try_from(len)) {
            buf.push(m16);
            buf.extend_from_slice(&n.to_be_bytes());
        } else if let (Some(m32), Ok(n)) = (m32, u32::try_from(len)) {
            buf.push(m32);
            buf.extend_from_slice(&n.to_be_bytes());
        } else {
            return Err(too_long(what, len));
        }
        Ok(())
    }

    pub(super) fn str(buf: &mut Vec<u8>, s: &str) -> Result<()> {
        str_header(buf, s.len())?;
        buf.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// The header of a string of `len` bytes.
    pub(super) fn str_header(buf: &mut Vec<u8>, len: usize) -> Result<()> {
        header(
            buf,
            len,
            (0xa0, 32),
            [Some(0xd9), Some(0xda), Some(0xdb)],
            "string",
        )
    }

    pub(super) fn bin(buf: &mut Vec<u8>, b: &[u8]) -> Result<()> {
        header(
            buf,
            b.len(),
            (0, 0),
            [Some(0xc4), Some(0xc5), Some(0xc6)],
            "payload",
        )?;
        buf.extend_from_slice(b);
        Ok(())
    }

    pub(super) fn map_len(buf: &mut Vec<u8>, len: usize) -> Result<()> {
        header(buf, len, (0x80, 16), [None, Some(0xde), Some(0xdf)], "map")
    }

    pub(super) fn array_len(buf: &mut Vec<u8>, len: usize) -> Result<()> {
        header(
            buf,
            len,
            (0x90, 16),
            [None, Some(0xdc), Some(0xdd)],
            "array",
        )
    }

    pub(super) fn uint(buf: &mut Vec<u8>, v: u64) {
        if let Ok(small) = u8::try_from(v) {
            if small < 0x80 {
                buf.push(small);
            } else {
                buf.extend_from_slice(&[0xcc, small]);
            }
        } else if let Ok(n) = u16::try_from(v) {
            buf.push(0xcd);
            buf.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(v) {
            buf.push(0xce);
            buf.extend_from_slice(&n.to_be_bytes());
        } else {
            buf.push(0xcf);
            buf.extend_from_slice(&v.to_be_bytes());
        }
    }
}

fn check_reply(topic: &str, expected: usize, reply: &PublishReply) -> Result<()> {
    if reply.duplicate {
        if reply.seqs.len() != expected || reply.seqs.contains(&0) {
            return Err(SdkError::Protocol(format!(
                "publish of {expected} messages to '{topic}' answered with {} seqs",
                reply.seqs.len()
            )));
        }
        return Ok(());
    }
    let expected = expected as u64;
    let got = reply
        .last_seq
        .checked_sub(reply.first_seq)
        .map(|d| d + 1)
        .unwrap_or(0);
    if got != expected || reply.first_seq == 0 {
        return Err(SdkError::Protocol(format!(
            "publish of {expected} messages to '{topic}' answered with seq {}..={}",
            reply.first_seq, reply.last_seq
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
        let messages = if count == 1 {
            Messages::One(msg(size))
        } else {
            Messages::Many((0..count).map(|_| msg(size)).collect())
        };
        Entry::new(topic.into(), messages, id)
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
        assert_eq!((&*first.topic, ids(&first)), ("a", vec![1, 3]));
        let second = b.next_batch().expect("batch");
        assert_eq!((&*second.topic, ids(&second)), ("b", vec![2, 4]));
        let third = b.next_batch().expect("batch");
        assert_eq!((&*third.topic, ids(&third)), ("c", vec![5]));
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
        let mut busy = TopicSet::default();
        busy.insert("a".into());
        assert_eq!(ids(&b.next_batch_except(&busy).expect("batch")), vec![10]);
        assert!(b.next_batch_except(&busy).is_none());
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![0, 1]);
        assert_eq!(ids(&b.next_batch().expect("batch")), vec![2]);
        assert!(b.is_empty());
    }

    #[test]
    fn shared_topic_names_and_reused_slots() {
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let one = |topic: &Arc<str>, id| Entry::new(topic.clone(), Messages::One(msg(1)), id);
        let mut q = Batcher::new(512, 1 << 20);
        q.push(one(&a, 1));
        q.push(one(&a, 2));
        q.push(one(&b, 3));
        q.push(one(&a, 4));
        // Another `Arc` with the same name is the same topic.
        q.push(Entry::new("b".into(), Messages::One(msg(1)), 5));
        let first = q.next_batch().expect("batch");
        assert_eq!((&*first.topic, ids(&first)), ("a", vec![1, 2, 4]));
        let second = q.next_batch().expect("batch");
        assert_eq!((&*second.topic, ids(&second)), ("b", vec![3, 5]));
        assert!(q.next_batch().is_none());
        // Both slots are free now; new topics reuse them, old names start afresh.
        q.push(one(&b, 6));
        q.push(Entry::new("c".into(), Messages::One(msg(1)), 7));
        q.push(one(&a, 8));
        q.push(one(&b, 9));
        assert_eq!(q.slots.len(), 3);
        let order: Vec<_> = std::iter::from_fn(|| q.next_batch())
            .map(|b| (b.topic.to_string(), ids(&b)))
            .collect();
        assert_eq!(
            order,
            vec![
                ("b".to_string(), vec![6, 9]),
                ("c".to_string(), vec![7]),
                ("a".to_string(), vec![8]),
            ]
        );
        assert!(q.is_empty());
        assert_eq!(q.queued_messages(), 0);
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
            id: None,
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
        let reply = |first_seq, last_seq| PublishReply::stored("t", first_seq, last_seq);
        assert!(check_reply("t", 3, &reply(5, 7)).is_ok());
        assert!(check_reply("t", 3, &reply(5, 6)).is_err());
        assert!(check_reply("t", 3, &reply(7, 5)).is_err());
        assert!(check_reply("t", 3, &reply(0, 2)).is_err());
    }

    #[test]
    fn request_is_encoded_like_a_publish_request_in_one_buffer() {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("region".to_string(), "eu-west".to_string());
        let keyed = NewMessage {
            id: None,
            key: Some("customer-42".into()),
            headers,
            priority: 3,
            payload: Bytes::from(vec![7u8; 70_000]),
        };
        let entries = vec![
            Entry::new("orders".into(), Messages::One(msg(300)), 1u32),
            Entry::new(
                "orders".into(),
                Messages::Many(vec![keyed.clone(), msg(0), msg(20)]),
                2,
            ),
            Entry::new("orders".into(), Messages::One(msg(1)), 3),
        ];
        let data = encode_publish("orders", &entries, 5, None).expect("encode");
        let expected = sluice_protocol::encode(&sluice_protocol::PublishRequest {
            topic: "orders".into(),
            messages: vec![msg(300), keyed, msg(0), msg(20), msg(1)],
        })
        .expect("encode");
        assert_eq!(data, &expected[..]);
        let estimate: usize = entries.iter().map(|e| e.bytes).sum();
        assert!(data.len() <= PUBLISH_OVERHEAD + "orders".len() + estimate);
        // Written in place: the buffer never had to grow.
        assert_eq!(
            data.capacity(),
            PUBLISH_OVERHEAD + "orders".len() + estimate
        );
        // A topic of the longest allowed name fits the overhead too.
        let long = "t".repeat(120);
        let one = [Entry::new(
            long.as_str().into(),
            Messages::One(msg(0)),
            0u32,
        )];
        let data = encode_publish(&long, &one, 1, None).expect("encode");
        assert!(data.len() <= PUBLISH_OVERHEAD + long.len() + one[0].bytes);
    }

    #[test]
    fn hand_written_encoding_matches_the_protocol_at_every_length_boundary() {
        let message =
            |key_len: Option<usize>, headers: usize, priority: u8, payload: usize| NewMessage {
                id: None,
                key: key_len.map(|n| "k".repeat(n)),
                headers: (0..headers)
                    .map(|i| (format!("h{i}"), "v".repeat(i * 7)))
                    .collect(),
                priority,
                payload: Bytes::from(vec![0x5a; payload]),
            };
        let mut cases = Vec::new();
        for payload in [0, 1, 255, 256, 65_535, 65_536] {
            cases.push(message(None, 0, 0, payload));
        }
        for key in [0, 31, 32, 255, 256, 65_535, 65_536] {
            cases.push(message(Some(key), 1, 1, 3));
        }
        for headers in [15, 16, 40] {
            cases.push(message(None, headers, 2, 10));
        }
        for priority in 0..=MAX_PRIORITY {
            cases.push(message(None, 0, priority, 1));
        }
        for id_len in [1, 31, 32, 128] {
            cases.push(NewMessage {
                id: Some("i".repeat(id_len).into()),
                ..message(None, 0, 0, 5)
            });
            cases.push(NewMessage {
                id: Some("j".repeat(id_len).into()),
                ..message(Some(3), 2, 4, 5)
            });
        }
        for topic in ["t".repeat(31), "t".repeat(32), "t".repeat(120)] {
            for n in [1, 15, 16, cases.len()] {
                let messages = cases[..n].to_vec();
                let entries = [Entry::new(
                    topic.as_str().into(),
                    Messages::Many(messages.clone()),
                    0u32,
                )];
                let data = encode_publish(&topic, &entries, n, None).expect("encode");
                let expected = sluice_protocol::encode(&sluice_protocol::PublishRequest {
                    topic: topic.clone(),
                    messages,
                })
                .expect("encode");
                assert_eq!(
                    data,
                    &expected[..],
                    "topic {} bytes, {n} messages",
                    topic.len()
                );
                assert!(data.len() <= PUBLISH_OVERHEAD + topic.len() + entries[0].bytes);
            }
        }
        for v in [
            0,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            msgpack::uint(&mut buf, v);
            assert_eq!(
                buf,
                &sluice_protocol::encode(&v).expect("encode")[..],
                "{v}"
            );
        }
    }

    type Call = Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

    fn unspawned_producer(places: usize) -> (Producer, QueueReceiver) {
        let (queue, rx) = queue(places);
        let producer = Producer {
            queue,
            max_payload_bytes: 1024,
            last_topic: TopicCache::default(),
            ids: None,
        };
        (producer, rx)
    }

    #[tokio::test]
    async fn full_queue_lets_waiting_callers_in_in_call_order() {
        let (producer, mut rx) = unspawned_producer(2);
        let mut calls: Vec<Call> = (0..6u8)
            .map(|i| Box::pin(producer.send("t", vec![i])) as Call)
            .collect();
        let mut answers = vec![None; calls.len()];
        let mut batcher = Batcher::new(512, 1 << 20);
        let mut stored = Vec::new();
        for _ in 0..20 {
            for (call, answer) in calls.iter_mut().zip(&mut answers) {
                if answer.is_none() {
                    if let Poll::Ready(r) = futures::poll!(call.as_mut()) {
                        *answer = Some(r.expect("stored"));
                    }
                }
            }
            if let Poll::Ready(true) = futures::poll!(poll_fn(|cx| rx.poll_taken(cx))) {
                // Room for one message at a time: the queue stays full.
                rx.drain_into(&mut batcher, 1);
            }
            while let Some(batch) = batcher.next_batch() {
                for entry in batch.entries {
                    stored.push(entry.messages.as_slice()[0].payload[0]);
                    entry.reply.send("t", stored.len() as u64, 1);
                }
            }
        }
        assert_eq!(stored, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(answers, (1..=6).map(Some).collect::<Vec<_>>());
        drop(calls);
        drop(producer);
        assert!(!poll_fn(|cx| rx.poll_taken(cx)).await);
    }

    #[tokio::test]
    async fn callers_fail_once_the_pipeline_is_gone() {
        let (producer, rx) = unspawned_producer(1);
        let queued: Call = Box::pin(producer.send("t", "a"));
        let mut waiting: Call = Box::pin(producer.send("t", "b"));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(rx);
        assert!(matches!(queued.await, Err(SdkError::Closed(_))));
        assert!(matches!(waiting.await, Err(SdkError::Closed(_))));
        assert!(matches!(
            producer.send("t", "c").await,
            Err(SdkError::Closed(_))
        ));
    }

    #[test]
    fn topic_cache_validates_and_shares_names() {
        let cache = TopicCache::default();
        let a = cache.intern("orders".to_string()).expect("valid");
        let b = cache.intern("orders".to_string()).expect("valid");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(cache.intern("bad/name".to_string()).is_err());
        // A refused name does not replace the cached one.
        let c = cache.intern("orders".to_string()).expect("valid");
        assert!(Arc::ptr_eq(&a, &c));
        let d = cache.intern("other".to_string()).expect("valid");
        assert_eq!(&*d, "other");
        assert!(cache.clone().intern(String::new()).is_err());
    }

    #[test]
    fn fx_hasher_spreads_topic_names() {
        use std::hash::BuildHasher;
        let build = FxBuildHasher::default();
        let hashes: HashSet<u64> = (0..1000)
            .map(|i| build.hash_one(format!("bench.w1.{i}")))
            .collect();
        assert_eq!(hashes.len(), 1000);
        assert_ne!(build.hash_one("ab"), build.hash_one("ba"));
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
    fn ids_are_written_per_request_consecutive_and_kept_when_set() {
        let source = IdSource::with_prefix("p".into());
        let mine = NewMessage {
            id: Some("mine".into()),
            ..msg(1)
        };
        let entries = vec![
            Entry::new("t".into(), Messages::One(msg(3)), 1u32),
            Entry::new("t".into(), Messages::Many(vec![mine.clone(), msg(0)]), 2),
        ];
        let with = |id: &str, m: NewMessage| NewMessage {
            id: Some(id.into()),
            ..m
        };
        let check = |data: Vec<u8>, expected: Vec<NewMessage>| {
            let want = sluice_protocol::encode(&sluice_protocol::PublishRequest {
                topic: "t".into(),
                messages: expected,
            })
            .expect("encode");
            assert_eq!(data, &want[..]);
            // Written in place: the room for the ids was reserved up front.
            let estimate: usize = entries.iter().map(|e| e.bytes).sum();
            assert!(data.len() <= PUBLISH_OVERHEAD + 1 + estimate + 3 * (1 + 26));
        };
        let data = encode_publish("t", &entries, 3, Some(&source)).expect("encode");
        check(
            data,
            vec![with("p-1", msg(3)), mine.clone(), with("p-2", msg(0))],
        );
        // The next request takes the next numbers; a producer's clones share them.
        let data = encode_publish("t", &entries, 3, Some(&source)).expect("encode");
        check(data, vec![with("p-3", msg(3)), mine, with("p-4", msg(0))]);
        for (n, id) in [
            (u64::MAX, format!("q-{}", u64::MAX)),
            (0, "q-0".into()),
            (1_000_000_007, "q-1000000007".into()),
        ] {
            let big = IdSource::with_prefix("q".into());
            big.next.store(n, Ordering::Relaxed);
            let mut buf = Vec::new();
            big.write_id(&mut buf, big.take(1)).expect("id");
            let mut want = Vec::new();
            msgpack::str(&mut want, &id).expect("str");
            assert_eq!((buf, big.id(n)), (want, id));
        }
        let random = IdSource::new();
        assert_eq!(random.prefix.len(), 16);
        assert_ne!(random.prefix, IdSource::new().prefix);
        assert!(random.id(u64::MAX).len() <= MAX_ID_LEN);
        // Ids are checked before sending: a bad one fails alone.
        let (producer, _rx) = unspawned_producer(16);
        let too_long = NewMessage {
            id: Some("x".repeat(MAX_ID_LEN + 1).into()),
            ..msg(1)
        };
        assert!(producer.validate_message(&too_long).is_err());
        assert!(producer
            .validate_message(&NewMessage {
                id: Some(String::new().into()),
                ..msg(1)
            })
            .is_err());
    }

    #[test]
    fn duplicate_replies_give_each_entry_its_seqs() {
        let dup = PublishReply {
            duplicate: true,
            seqs: vec![7, 3, 8],
            ..PublishReply::stored("t", 3, 8)
        };
        assert!(check_reply("t", 3, &dup).is_ok());
        assert!(check_reply("t", 2, &dup).is_err());
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        Reply::One(tx1).send_from(&dup, 0, 1);
        Reply::Many(tx2).send_from(&dup, 1, 2);
        assert_eq!(rx1.try_recv().expect("sent").expect("ok"), 7);
        let r = rx2.try_recv().expect("sent").expect("ok");
        assert_eq!(
            (r.first_seq, r.last_seq, r.duplicate, r.seqs),
            (3, 8, true, vec![3, 8])
        );
        let plain = PublishReply::stored("t", 10, 12);
        let (tx, mut rx) = oneshot::channel();
        Reply::Many(tx).send_from(&plain, 1, 2);
        let r = rx.try_recv().expect("sent").expect("ok");
        assert_eq!((r.first_seq, r.last_seq, r.duplicate), (11, 12, false));
    }

    #[test]
    fn resends_only_what_may_not_have_been_stored() {
        assert!(worth_resending(&SdkError::Closed("x".into())));
        assert!(worth_resending(&SdkError::Timeout {
            route: "publish".into(),
            after: Duration::from_secs(1)
        }));
        assert!(worth_resending(&SdkError::Broker(
            sluice_protocol::WireError::new(ErrorCode::Unavailable, "restarting")
        )));
        for refused in [
            ErrorCode::InvalidRequest,
            ErrorCode::StorageError,
            ErrorCode::UnknownTopic,
        ] {
            assert!(!worth_resending(&SdkError::Broker(
                sluice_protocol::WireError::new(refused, "no")
            )));
        }
        assert_eq!(resend_delay(1), Duration::from_millis(50));
        assert_eq!(resend_delay(3), Duration::from_millis(200));
        assert_eq!(resend_delay(30), Duration::from_secs(2));
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
