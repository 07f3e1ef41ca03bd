//! Consuming a group: batches in, messages out one by one, acks per batch, auto-reconnect.
//!
//! Three parts run for one [`Consumer`]:
//! - the **session task** owns the connection and the `subscribe` stream. It forwards batches to
//!   the consumer, and when the stream ends, fails or the connection closes it reconnects with
//!   exponential backoff and subscribes again with the same group: the broker resumes the
//!   group's cursor and redelivers whatever was not acked. A broker refusal that retrying cannot
//!   fix (mode conflict, unknown group, invalid request, ...) stops it; [`Consumer::next`] then
//!   returns that error.
//! - the **consumer** itself ([`Consumer::next`]) hands messages out one by one and tracks, per
//!   batch, which ones are still unsettled (`AckTracker`). When every message of a batch has
//!   been acked, nacked or released it queues ONE `ack` request with the acked seqs, one `nack`
//!   request with the nacked seqs and one `nack` with `release` for the released ones;
//!   [`Consumer::ack`] never waits for the network.
//! - the **acker task** sends those requests on the current connection (waiting for a new one
//!   after a disconnect), and records their outcome for [`Consumer::flush_acks`]. The broker
//!   settles only messages delivered to the connection that acks them: an ack sent on a new
//!   connection for a batch of the old one is refused (`unknown_batch`, its seqs in
//!   `rejected`, traced at debug level), and those messages come again — the broker returned
//!   them to the group when the old connection ended.
//!
//! Messages of a subscription that ended but were not handed out yet are dropped, not replayed:
//! the broker redelivers them on the new subscription.
//!
//! Resets: when the broker moves the group's cursor itself — retention removed messages the
//! group had not settled, or an operator ran `group.seek` — it sends the consumer a `reset`
//! stream event (`ResetNotice`: reason, the seq the group continues from, how many unsettled
//! messages were skipped). The consumer counts them ([`Consumer::resets`]), keeps the latest
//! ([`Consumer::last_reset`]) and the recent ones for [`Consumer::take_resets`], and logs each
//! at info level; messages keep coming. An application that keeps state derived from the
//! messages (a replica, a running total) checks `resets()` after each message and
//! resynchronises when it changed.
//!
//! Retry timing: [`ConsumerConfig::backoff`] gives a new group its redelivery schedule;
//! [`Consumer::nack_with_delay`] asks for one message's redelivery after a given delay.
//!
//! Payloads are not copied out of the received frame: [`Received::payload`] is a slice of the
//! batch as it arrived, so a message kept alive keeps that batch's memory alive (copy the
//! payload, e.g. with `Bytes::copy_from_slice`, to keep one message of a big batch for long).
//! Settling a message finds it by its position in its batch, without hashing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rsocket_rust::prelude::Payload;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use sluice_protocol::{
    route, AckReply, AckRequest, Batch, DeliveredMessage, ErrorCode, GroupMode, NackRequest,
    ResetNotice, StatusUpdate, SubscribeRequest, MAX_BACKOFF_STEPS, MAX_NACK_DELAY_MS,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::client::{Client, ClientConfig};
use crate::error::{Result, SdkError};
use crate::producer::{validate_topic, FxBuildHasher};

/// Attempts for one ack/nack request before its failure is reported.
const MAX_ACK_ATTEMPTS: u32 = 5;
/// Failed acks kept for [`Consumer::flush_acks`] to report.
const MAX_KEPT_FAILURES: usize = 1024;
/// Reset notices kept for [`Consumer::take_resets`] (the oldest go first).
pub const MAX_KEPT_RESETS: usize = 64;

/// What to consume and how to behave when the connection drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// The connection.
    pub client: ClientConfig,
    /// Topic to consume.
    pub topic: String,
    /// Group (durable cursor) to consume as.
    pub group: String,
    /// Group mode; must match the group's if it exists (default shared).
    pub mode: GroupMode,
    /// Header filters (exact match, all must hold); must match the group's if it exists.
    pub filters: BTreeMap<String, String>,
    /// Most unacked batches the broker sends this consumer (default: the broker's, 4).
    pub window: Option<u32>,
    /// Most messages per batch (default: the broker's; a broker allows up to 4096).
    pub batch_size: Option<u32>,
    /// Most stream items (batches) this consumer asks the broker for, in all: RSocket credits
    /// (default: unbounded, paced by the window alone). Once that many have arrived the consumer
    /// asks for no more and does not resubscribe: [`Consumer::next`] hands out what arrived, then
    /// returns `None`. With `batch_size` it bounds what the broker sends this consumer to
    /// `max_batches × batch_size` messages, so that nothing is taken (and later redelivered with
    /// a raised attempt) that will not be processed. A status event also uses one.
    pub max_batches: Option<u32>,
    /// First reconnect delay (default 100 ms); doubled after each failed attempt.
    pub reconnect_backoff_min: Duration,
    /// Longest reconnect delay (default 5 s).
    pub reconnect_backoff_max: Duration,
    /// Consecutive failed reconnects after which the consumer gives up (default: never).
    pub max_reconnect_attempts: Option<u32>,
    /// Most `ack`/`nack` requests awaiting the broker's reply at once (default 8). The broker
    /// answers an ack once it is durable but may deliver more as soon as it arrives, so this
    /// also bounds how many acked batches a broker crash can redeliver; more of them helps
    /// only when the broker's commits are slow.
    pub max_acks_in_flight: usize,
    /// Redelivery schedule of the group, if this subscribe creates it: the n-th delivery of a
    /// message not acked is redelivered after the n-th entry (the last repeats) instead of the
    /// broker's `batch_timeout`, and a nack without a delay waits the entry of the message's
    /// failure count. 1..=32 entries of 1 ms..=1 day. `None` (default): the topic's schedule,
    /// else the broker's. An existing group with another schedule refuses the subscribe
    /// (`MODE_CONFLICT`).
    pub backoff: Option<Vec<Duration>>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            client: ClientConfig::default(),
            topic: String::new(),
            group: String::new(),
            mode: GroupMode::default(),
            filters: BTreeMap::new(),
            window: None,
            batch_size: None,
            max_batches: None,
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            max_reconnect_attempts: None,
            max_acks_in_flight: 8,
            backoff: None,
        }
    }
}

impl ConsumerConfig {
    /// Defaults, consuming `topic` as `group` through `client`.
    pub fn new(client: ClientConfig, topic: impl Into<String>, group: impl Into<String>) -> Self {
        ConsumerConfig {
            client,
            topic: topic.into(),
            group: group.into(),
            ..Default::default()
        }
    }

    /// Sets the group mode.
    pub fn mode(mut self, mode: GroupMode) -> Self {
        self.mode = mode;
        self
    }

    /// Adds a header filter.
    pub fn filter(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.filters.insert(key.into(), value.into());
        self
    }

    /// Sets the window of unacked batches.
    pub fn window(mut self, window: u32) -> Self {
        self.window = Some(window);
        self
    }

    /// Sets the most messages per batch.
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = Some(batch_size);
        self
    }

    /// Sets the most batches (stream items) this consumer asks for in all.
    pub fn max_batches(mut self, max_batches: u32) -> Self {
        self.max_batches = Some(max_batches);
        self
    }

    /// Sets the reconnect backoff range.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_backoff_min = min;
        self.reconnect_backoff_max = max;
        self
    }

    /// Sets how many consecutive failed reconnects are tolerated.
    pub fn max_reconnect_attempts(mut self, attempts: u32) -> Self {
        self.max_reconnect_attempts = Some(attempts);
        self
    }

    /// Sets how many ack/nack requests may await the broker's reply at once.
    pub fn max_acks_in_flight(mut self, n: usize) -> Self {
        self.max_acks_in_flight = n;
        self
    }

    /// Sets the redelivery schedule of a group this subscribe creates.
    pub fn backoff(mut self, schedule: Vec<Duration>) -> Self {
        self.backoff = Some(schedule);
        self
    }

    /// Checks the values before they are used.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(SdkError::InvalidArgument(m.to_string()));
        self.client.validate()?;
        validate_topic(&self.topic)?;
        // Group names follow the topic-name rule.
        sluice_protocol::validate_name("group", &self.group)
            .map_err(|e| SdkError::InvalidArgument(e.message))?;
        if self.window == Some(0) {
            return bad("window must be at least 1");
        }
        if self.batch_size == Some(0) {
            return bad("batch size must be at least 1");
        }
        if self
            .max_batches
            .is_some_and(|n| n == 0 || n > crate::client::MAX_REQUEST_N)
        {
            return bad("max_batches must be in 1..=2^31-1");
        }
        if self.max_acks_in_flight == 0 {
            return bad("max_acks_in_flight must be at least 1");
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_max < self.reconnect_backoff_min
        {
            return bad("reconnect backoff must satisfy 0 < min <= max");
        }
        if let Some(schedule) = &self.backoff {
            let day = Duration::from_secs(24 * 3600);
            if schedule.is_empty()
                || schedule.len() > MAX_BACKOFF_STEPS
                || schedule
                    .iter()
                    .any(|d| *d < Duration::from_millis(1) || *d > day)
            {
                return Err(SdkError::InvalidArgument(format!(
                    "backoff must have 1..={MAX_BACKOFF_STEPS} entries of 1ms..=1day"
                )));
            }
        }
        Ok(())
    }

    fn subscribe_request(&self) -> SubscribeRequest {
        SubscribeRequest {
            topic: self.topic.clone(),
            group: self.group.clone(),
            mode: self.mode,
            filters: self.filters.clone(),
            window: self.window,
            batch_size: self.batch_size,
            backoff: self.backoff.as_ref().map(|schedule| {
                schedule
                    .iter()
                    .map(|d| humantime::format_duration(*d).to_string())
                    .collect()
            }),
        }
    }
}

/// A message handed out by [`Consumer::next`]. Settle it with [`Consumer::ack`] or
/// [`Consumer::nack`] on the consumer that returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// The batch it was delivered in.
    pub batch_id: u64,
    /// The message.
    pub message: DeliveredMessage,
    consumer_id: u64,
    subscription: u64,
    /// Position in its batch.
    index: usize,
}

impl Received {
    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.message.seq
    }

    /// The message's payload (a slice of the frame its batch arrived in; see the module
    /// documentation).
    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    /// 1 on first delivery, 2 on the first redelivery, ...
    pub fn attempt(&self) -> u32 {
        self.message.attempt
    }

    fn key(&self) -> BatchKey {
        BatchKey {
            subscription: self.subscription,
            batch_id: self.batch_id,
        }
    }

    fn position(&self) -> Position {
        Position {
            index: self.index,
            seq: self.message.seq,
        }
    }
}

/// Consumes one group of one topic. See the module documentation for how it works.
///
/// Dropping it closes its connection; the broker then redelivers whatever was not acked. Call
/// [`Consumer::flush_acks`] (or [`Consumer::close`]) first to make sure the acks you made are
/// durable.
pub struct Consumer {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<(u64, AckJob)>,
    events: mpsc::UnboundedReceiver<Event>,
    buffer: VecDeque<Received>,
    finished: bool,
    session: JoinHandle<()>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .field("buffered", &self.buffer.len())
            .field("finished", &self.finished)
            .finish()
    }
}

static NEXT_CONSUMER_ID: AtomicU64 = AtomicU64::new(1);

impl Consumer {
    /// Connects and subscribes. Fails at once if the configuration is invalid or the broker
    /// cannot be reached; a refusal of the subscription itself (mode conflict, ...) comes from
    /// the first [`Consumer::next`].
    pub async fn subscribe(config: ConsumerConfig) -> Result<Consumer> {
        config.validate()?;
        let client = Client::connect(config.client.clone()).await?;
        let shared = Arc::new(Shared {
            consumer_id: NEXT_CONSUMER_ID.fetch_add(1, Ordering::Relaxed),
            topic: config.topic.clone(),
            group: config.group.clone(),
            tracker: Mutex::new(AckTracker::default()),
            live_subscription: AtomicU64::new(0),
            ledger: Mutex::new(Ledger::default()),
            ledger_changed: watch::Sender::new(0),
            connection: watch::Sender::new(Connection::Connecting),
            status: Mutex::new(None),
            resets: AtomicU64::new(0),
            reset_log: Mutex::new(ResetLog::default()),
        });
        let (events_tx, events) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        tokio::spawn(run_acker(
            jobs_rx,
            shared.clone(),
            config.max_acks_in_flight,
        ));
        let session = tokio::spawn(run_session(config, client, shared.clone(), events_tx));
        Ok(Consumer {
            shared,
            jobs,
            events,
            buffer: VecDeque::new(),
            finished: false,
            session,
        })
    }

    /// The next message, waiting for one if needed. `None` once the consumer has stopped (after
    /// returning the error that stopped it).
    pub async fn next(&mut self) -> Option<Result<Received>> {
        futures::future::poll_fn(|cx| self.poll_received(cx)).await
    }

    /// Poll version of [`Consumer::next`] (also available through [`Stream`]).
    pub fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Received>>> {
        loop {
            if let Some(r) = self.buffer.pop_front() {
                if r.subscription == self.shared.live_subscription.load(Ordering::Acquire) {
                    return Poll::Ready(Some(Ok(r)));
                }
                // Its subscription ended: the broker will redeliver it.
                let jobs = self.shared.tracker().abandon(r.key(), r.position());
                self.submit_logged(jobs);
                continue;
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match ready!(self.events.poll_recv(cx)) {
                Some(Event::Batch {
                    subscription,
                    batch,
                }) => self.accept_batch(subscription, batch),
                Some(Event::Fatal(e)) => {
                    self.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                // Everything that arrived has been handed out (events come in order).
                Some(Event::Exhausted) => self.finished = true,
                None => {
                    self.finished = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn accept_batch(&mut self, subscription: u64, batch: Batch) {
        if subscription != self.shared.live_subscription.load(Ordering::Acquire) {
            tracing::debug!(
                batch_id = batch.batch_id,
                "dropping a batch of an ended subscription"
            );
            return;
        }
        let key = BatchKey {
            subscription,
            batch_id: batch.batch_id,
        };
        let jobs = self.shared.tracker().register(
            key,
            &batch.topic,
            &batch.group,
            batch.messages.iter().map(|m| m.seq),
        );
        self.submit_logged(jobs);
        let Batch {
            batch_id,
            topic,
            group,
            messages,
        } = batch;
        let consumer_id = self.shared.consumer_id;
        self.buffer.extend(
            messages
                .into_iter()
                .enumerate()
                .map(|(index, message)| Received {
                    topic: topic.clone(),
                    group: group.clone(),
                    batch_id,
                    message,
                    consumer_id,
                    subscription,
                    index,
                }),
        );
    }

    /// Acknowledges a message. Never waits: once every message of its batch is settled, one
    /// `ack` request with the batch's acked seqs is sent in the background. Acking a message
    /// twice is a no-op.
    pub fn ack(&self, message: &Received) -> Result<()> {
        self.settle(message, Settle::Ack)
    }

    /// Negatively acknowledges a message: once its batch is settled, one `nack` request sends
    /// it (with the batch's other nacked messages) back for redelivery.
    pub fn nack(&self, message: &Received) -> Result<()> {
        self.settle(message, Settle::Nack)
    }

    /// Negatively acknowledges a message, asking the broker to redeliver it no sooner than
    /// `delay` from now (at most one day): once its batch is settled, one `nack` request per
    /// distinct delay sends it. The delay holds whatever the group's backoff schedule says.
    pub fn nack_with_delay(&self, message: &Received, delay: Duration) -> Result<()> {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if ms > MAX_NACK_DELAY_MS {
            return Err(SdkError::InvalidArgument(format!(
                "a nack delay is at most one day, not {}",
                humantime::format_duration(delay)
            )));
        }
        self.settle(message, Settle::NackAfter(ms))
    }

    /// Returns a message that was received but will not be processed (e.g. when stopping):
    /// once its batch is settled, one `nack` request with `release` sends it (with the batch's
    /// other released messages) back. Unlike [`Consumer::nack`] this counts no failure: the
    /// message comes again with the same `attempt`.
    pub fn release(&self, message: &Received) -> Result<()> {
        self.settle(message, Settle::Release)
    }

    fn settle(&self, message: &Received, kind: Settle) -> Result<()> {
        if message.consumer_id != self.shared.consumer_id {
            return Err(SdkError::InvalidArgument(
                "message was received by another consumer".into(),
            ));
        }
        let jobs = self
            .shared
            .tracker()
            .settle(message.key(), message.position(), kind);
        self.submit(jobs)
    }

    /// Sends the acks and nacks made so far for `message`'s batch now, without waiting for the
    /// rest of the batch, and waits until the broker has confirmed them (for acks: durable).
    pub async fn ack_batch_now(&self, message: &Received) -> Result<()> {
        let jobs = self.shared.tracker().drain_settled(message.key());
        let target = self.submit_returning_target(jobs)?;
        self.wait_jobs_before(target).await
    }

    /// Sends every ack and nack made so far (also those of batches not fully settled yet) and
    /// waits until the broker has confirmed all of them. Returns the first failure among them.
    pub async fn flush_acks(&self) -> Result<()> {
        let jobs = self.shared.tracker().drain_all_settled();
        let target = self.submit_returning_target(jobs)?;
        self.wait_jobs_before(target).await
    }

    /// Flushes acks, then closes the consumer.
    pub async fn close(self) -> Result<()> {
        self.flush_acks().await
    }

    /// The latest status update the broker sent (head sequence, lag), if any.
    pub fn status(&self) -> Option<StatusUpdate> {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many reset notices the broker sent this consumer: the group's cursor was moved by
    /// the broker, not by acks (retention removed unsettled messages, an operator ran
    /// `group.seek`), so messages between the old cursor and the new floor are not delivered.
    /// After a seek, messages already handed out may come again, and their acks may be
    /// refused (`unknown_batch`).
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    /// The latest reset notice, if any (see [`Consumer::resets`]).
    pub fn last_reset(&self) -> Option<ResetNotice> {
        self.shared.reset_log().last.clone()
    }

    /// The reset notices received since the last call, oldest first (at most the
    /// [`MAX_KEPT_RESETS`] most recent; [`Consumer::resets`] counts them all).
    pub fn take_resets(&self) -> Vec<ResetNotice> {
        self.shared.reset_log().unread.drain(..).collect()
    }

    /// True while a subscription is established.
    pub fn is_connected(&self) -> bool {
        self.shared.live_subscription.load(Ordering::Acquire) != 0
    }

    /// Topic consumed.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// Group consumed as.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    fn submit(&self, jobs: Vec<AckJob>) -> Result<()> {
        if jobs.is_empty() {
            // The common case (a message of a batch not settled yet): no need for the ledger.
            return Ok(());
        }
        self.submit_returning_target(jobs).map(|_| ())
    }

    fn submit_logged(&self, jobs: Vec<AckJob>) {
        if let Err(e) = self.submit(jobs) {
            tracing::warn!(error = %e, "cannot queue an ack");
        }
    }

    /// Queues `jobs` and returns the id below which every job queued so far lies.
    fn submit_returning_target(&self, jobs: Vec<AckJob>) -> Result<u64> {
        let mut ledger = self.shared.ledger();
        for job in jobs {
            let id = ledger.next_id;
            ledger.next_id += 1;
            ledger.outstanding.insert(id);
            if self.jobs.send((id, job)).is_err() {
                ledger.outstanding.remove(&id);
                return Err(SdkError::Closed("the consumer's acker stopped".into()));
            }
        }
        Ok(ledger.next_id)
    }

    async fn wait_jobs_before(&self, target: u64) -> Result<()> {
        let mut changed = self.shared.ledger_changed.subscribe();
        loop {
            if let Some(result) = self.shared.ledger().result_before(target) {
                return result;
            }
            if changed.changed().await.is_err() {
                return Err(SdkError::Closed("the consumer's acker stopped".into()));
            }
        }
    }
}

impl Stream for Consumer {
    type Item = Result<Received>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_received(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.session.abort();
        // Acks already being sent finish on their own connection clone; the rest fail.
        self.shared
            .connection
            .send_replace(Connection::Stopped(SdkError::Closed(
                "the consumer was closed".into(),
            )));
    }
}

/// What the session task sends the consumer.
enum Event {
    /// A batch of subscription number `subscription`.
    Batch { subscription: u64, batch: Batch },
    /// The consumer cannot go on.
    Fatal(SdkError),
    /// Every item of [`ConsumerConfig::max_batches`] has arrived: none will follow.
    Exhausted,
}

/// The session's connection, as the acker sees it.
enum Connection {
    Connecting,
    Connected(Client),
    Stopped(SdkError),
}

struct Shared {
    consumer_id: u64,
    topic: String,
    group: String,
    tracker: Mutex<AckTracker>,
    /// Number of the subscription currently open (0: none). Messages of other subscriptions are
    /// dropped instead of handed out.
    live_subscription: AtomicU64,
    ledger: Mutex<Ledger>,
    ledger_changed: watch::Sender<u64>,
    connection: watch::Sender<Connection>,
    status: Mutex<Option<StatusUpdate>>,
    /// Reset notices received (all of them).
    resets: AtomicU64,
    reset_log: Mutex<ResetLog>,
}

/// Reset notices not yet taken by [`Consumer::take_resets`] (bounded), and the latest.
#[derive(Default)]
struct ResetLog {
    unread: VecDeque<ResetNotice>,
    last: Option<ResetNotice>,
}

impl Shared {
    fn reset_log(&self) -> MutexGuard<'_, ResetLog> {
        self.reset_log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a reset notice from the broker.
    fn record_reset(&self, notice: ResetNotice) {
        tracing::info!(
            topic = %self.topic,
            group = %self.group,
            reason = %notice.reason,
            floor_seq = notice.floor_seq,
            skipped = notice.skipped,
            "the broker moved the group's cursor"
        );
        self.resets.fetch_add(1, Ordering::Relaxed);
        let mut log = self.reset_log();
        if log.unread.len() >= MAX_KEPT_RESETS {
            log.unread.pop_front();
        }
        log.unread.push_back(notice.clone());
        log.last = Some(notice);
    }

    fn tracker(&self) -> MutexGuard<'_, AckTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish_job(&self, id: u64, result: Result<AckReply>) {
        {
            let mut ledger = self.ledger();
            ledger.outstanding.remove(&id);
            if let Err(e) = result {
                tracing::warn!(error = %e, "ack/nack failed");
                if ledger.failures.len() < MAX_KEPT_FAILURES {
                    ledger.failures.push((id, e));
                }
            }
        }
        self.ledger_changed.send_modify(|n| *n += 1);
    }

    /// The current usable connection, waiting for one while the session reconnects.
    async fn connected(&self) -> Result<Client> {
        let mut rx = self.connection.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Connection::Connected(c) if !c.is_closed() => return Ok(c.clone()),
                Connection::Stopped(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(SdkError::Closed("the consumer was closed".into()));
            }
        }
    }
}

/// Ack/nack requests queued and their outcomes.
#[derive(Default)]
struct Ledger {
    next_id: u64,
    outstanding: BTreeSet<u64>,
    failures: Vec<(u64, SdkError)>,
}

impl Ledger {
    /// `None` while a job below `target` is outstanding; else the first failure below `target`
    /// (removing those failures) or `Ok`.
    fn result_before(&mut self, target: u64) -> Option<Result<()>> {
        if self.outstanding.range(..target).next().is_some() {
            return None;
        }
        let mut first = None;
        self.failures.retain(|(id, e)| {
            if *id < target {
                if first.is_none() {
                    first = Some(e.clone());
                }
                false
            } else {
                true
            }
        });
        Some(first.map_or(Ok(()), Err))
    }
}

// ---------------------------------------------------------------------------------------------
// Ack tracking (pure)
// ---------------------------------------------------------------------------------------------

/// Identifies a delivered batch within one consumer. Batch ids are unique only within one
/// broker run, so the subscription number is part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BatchKey {
    subscription: u64,
    batch_id: u64,
}

/// Where a message sits in its batch: its index (to find it without hashing) and its seq (to
/// check it is the message registered there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    index: usize,
    seq: u64,
}

/// How a message was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Nack,
    /// A nack with `release`: no failure counted, `attempt` not raised.
    Release,
    /// A nack asking for redelivery no sooner than this many ms from now.
    NackAfter(u64),
}

/// One `ack` or `nack` request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckJob {
    kind: Settle,
    topic: String,
    group: String,
    batch_id: u64,
    seqs: Vec<u64>,
}

#[derive(Debug)]
struct TrackedBatch {
    topic: String,
    group: String,
    /// The batch's seqs, in delivery order.
    seqs: Vec<u64>,
    /// Per message (same order): settled (acked, nacked or abandoned) yet?
    settled: Vec<bool>,
    unsettled: usize,
    acked: Vec<u64>,
    nacked: Vec<u64>,
    released: Vec<u64>,
    /// Nacks with a delay: (delay ms, seq).
    delayed: Vec<(u64, u64)>,
}

impl TrackedBatch {
    /// Marks the message at `at` settled; false if it is not this batch's or already settled.
    fn take(&mut self, at: Position) -> bool {
        match (self.seqs.get(at.index), self.settled.get_mut(at.index)) {
            (Some(&seq), Some(done)) if seq == at.seq && !*done => {
                *done = true;
                self.unsettled -= 1;
                true
            }
            _ => false,
        }
    }

    /// The requests for what was settled since the last drain.
    fn drain(&mut self, batch_id: u64) -> Vec<AckJob> {
        let mut jobs = Vec::with_capacity(2);
        let mut delayed: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (delay, seq) in std::mem::take(&mut self.delayed) {
            delayed.entry(delay).or_default().push(seq);
        }
        let plain = [
            (Settle::Ack, std::mem::take(&mut self.acked)),
            (Settle::Nack, std::mem::take(&mut self.nacked)),
            (Settle::Release, std::mem::take(&mut self.released)),
        ];
        let delayed = delayed
            .into_iter()
            .map(|(delay, seqs)| (Settle::NackAfter(delay), seqs));
        for (kind, seqs) in plain.into_iter().chain(delayed) {
            if !seqs.is_empty() {
                jobs.push(AckJob {
                    kind,
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    batch_id,
                    seqs,
                });
            }
        }
        jobs
    }
}

/// Per delivered batch: which messages are unsettled and which were acked or nacked but not
/// sent yet. Every method returns the requests that became due.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    batches: HashMap<BatchKey, TrackedBatch, FxBuildHasher>,
}

impl AckTracker {
    /// Starts tracking a delivered batch. An empty batch is settled at once with an ack of the
    /// whole batch (empty `seqs`), so it does not hold a window slot.
    pub(crate) fn register(
        &mut self,
        key: BatchKey,
        topic: &str,
        group: &str,
        seqs: impl Iterator<Item = u64>,
    ) -> Vec<AckJob> {
        let seqs: Vec<u64> = seqs.collect();
        if seqs.is_empty() {
            return vec![AckJob {
                kind: Settle::Ack,
                topic: topic.to_string(),
                group: group.to_string(),
                batch_id: key.batch_id,
                seqs: Vec::new(),
            }];
        }
        self.batches.insert(
            key,
            TrackedBatch {
                topic: topic.to_string(),
                group: group.to_string(),
                settled: vec![false; seqs.len()],
                unsettled: seqs.len(),
                // Usually every message is acked: room for all of them up front.
                acked: Vec::with_capacity(seqs.len()),
                nacked: Vec::new(),
                released: Vec::new(),
                delayed: Vec::new(),
                seqs,
            },
        );
        Vec::new()
    }

    /// Settles one message; when it was the batch's last unsettled one, returns the batch's
    /// requests and forgets the batch. Unknown or already settled messages are ignored.
    pub(crate) fn settle(&mut self, key: BatchKey, at: Position, kind: Settle) -> Vec<AckJob> {
        let Some(batch) = self.batches.get_mut(&key) else {
            return Vec::new();
        };
        if !batch.take(at) {
            return Vec::new();
        }
        match kind {
            Settle::Ack => batch.acked.push(at.seq),
            Settle::Nack => batch.nacked.push(at.seq),
            Settle::Release => batch.released.push(at.seq),
            Settle::NackAfter(delay) => batch.delayed.push((delay, at.seq)),
        }
        if batch.unsettled == 0 {
            self.complete(key)
        } else {
            Vec::new()
        }
    }

    /// A message that will never be handed out (its subscription ended): stop waiting for it.
    pub(crate) fn abandon(&mut self, key: BatchKey, at: Position) -> Vec<AckJob> {
        let done = self
            .batches
            .get_mut(&key)
            .is_some_and(|batch| batch.take(at) && batch.unsettled == 0);
        if done {
            self.complete(key)
        } else {
            Vec::new()
        }
    }

    /// The requests for what was settled so far in one batch, without waiting for the rest.
    pub(crate) fn drain_settled(&mut self, key: BatchKey) -> Vec<AckJob> {
        match self.batches.get_mut(&key) {
            Some(batch) => batch.drain(key.batch_id),
            None => Vec::new(),
        }
    }

    /// The requests for what was settled so far in every batch.
    pub(crate) fn drain_all_settled(&mut self) -> Vec<AckJob> {
        let mut keys: Vec<BatchKey> = self.batches.keys().copied().collect();
        keys.sort_by_key(|k| (k.subscription, k.batch_id));
        keys.into_iter()
            .flat_map(|k| self.drain_settled(k))
            .collect()
    }

    /// Batches still tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.batches.len()
    }

    /// Forgets a fully settled batch; returns its last requests.
    fn complete(&mut self, key: BatchKey) -> Vec<AckJob> {
        match self.batches.remove(&key) {
            Some(mut batch) => batch.drain(key.batch_id),
            None => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Acker task
// ---------------------------------------------------------------------------------------------

async fn run_acker(
    mut jobs: mpsc::UnboundedReceiver<(u64, AckJob)>,
    shared: Arc<Shared>,
    max_in_flight: usize,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if open && in_flight.len() < max_in_flight => match job {
                Some((id, job)) => {
                    let shared = shared.clone();
                    in_flight.push(async move {
                        let result = execute_ack(&shared, job).await;
                        (id, result)
                    });
                }
                None => open = false,
            },
            Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                shared.finish_job(id, result);
            }
            else => break,
        }
    }
}

async fn execute_ack(shared: &Shared, job: AckJob) -> Result<AckReply> {
    // An empty seq list only comes from an empty batch: ack it whole.
    let seqs = (!job.seqs.is_empty()).then(|| job.seqs.clone());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let client = shared.connected().await?;
        let result = match job.kind {
            Settle::Ack => {
                let req = AckRequest {
                    topic: job.topic.clone(),
                    group: job.group.clone(),
                    batch_id: job.batch_id,
                    seqs: seqs.clone(),
                };
                client.request::<_, AckReply>(route::ACK, &req).await
            }
            Settle::Nack | Settle::Release | Settle::NackAfter(_) => {
                let req = NackRequest {
                    topic: job.topic.clone(),
                    group: job.group.clone(),
                    batch_id: job.batch_id,
                    seqs: seqs.clone(),
                    release: job.kind == Settle::Release,
                    delay_ms: match job.kind {
                        Settle::NackAfter(ms) => Some(ms),
                        _ => None,
                    },
                };
                client.request::<_, AckReply>(route::NACK, &req).await
            }
        };
        match result {
            Ok(reply) => {
                if reply.rejected.is_empty() {
                    tracing::trace!(batch_id = job.batch_id, outcome = ?reply.outcome, "settled");
                } else {
                    tracing::debug!(batch_id = job.batch_id, outcome = ?reply.outcome, rejected = reply.rejected.len(), "not applied by the broker (not delivered to this connection): redelivered");
                }
                return Ok(reply);
            }
            Err(e) if e.is_retryable() && attempt < MAX_ACK_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "ack/nack failed; retrying");
                if e.is_connection_error() {
                    // Wait until this connection is seen closed; the session reconnects.
                    client.closed().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session task
// ---------------------------------------------------------------------------------------------

/// Why one subscription ended.
enum Ended {
    /// The consumer is gone: stop.
    ConsumerGone,
    /// Every credit of [`ConsumerConfig::max_batches`] was used, then the connection closed
    /// (for this reason) or the consumer went away (`None`): stop.
    Exhausted(Option<SdkError>),
    /// The stream ended (`None`: completed by the broker) or failed.
    Stream {
        error: Option<SdkError>,
        delivered: bool,
    },
}

async fn run_session(
    config: ConsumerConfig,
    first: Client,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
) {
    let request = config.subscribe_request();
    // Items still to ask for (`None`: unbounded); a resubscription asks only for the rest.
    let mut credits_left = config.max_batches;
    let mut client = Some(first);
    let mut failures: u32 = 0;
    let mut subscription: u64 = 0;
    loop {
        let conn = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                shared.connection.send_replace(Connection::Connecting);
                match Client::connect(config.client.clone()).await {
                    Ok(c) => c,
                    Err(e) => {
                        if !backoff(
                            &config,
                            &shared,
                            &events,
                            &mut failures,
                            e,
                            subscription > 0,
                        )
                        .await
                        {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        shared
            .connection
            .send_replace(Connection::Connected(conn.clone()));

        subscription += 1;
        shared
            .live_subscription
            .store(subscription, Ordering::Release);
        tracing::debug!(
            topic = %request.topic,
            group = %request.group,
            subscription,
            "subscribing"
        );
        let started = Instant::now();
        let ended = pump(
            &conn,
            &request,
            subscription,
            &shared,
            &events,
            &mut credits_left,
        )
        .await;
        if let Ended::Exhausted(error) = &ended {
            // The batches of this subscription stay valid (and ackable) until the connection
            // closes; then acks can no longer reach the broker.
            if let Some(e) = error {
                shared.live_subscription.store(0, Ordering::Release);
                shared
                    .connection
                    .send_replace(Connection::Stopped(e.clone()));
            }
            return;
        }
        shared.live_subscription.store(0, Ordering::Release);

        let (error, delivered) = match ended {
            Ended::ConsumerGone | Ended::Exhausted(_) => return,
            Ended::Stream { error, delivered } => (error, delivered),
        };
        if delivered
            || started.elapsed() >= config.reconnect_backoff_max.max(Duration::from_secs(10))
        {
            failures = 0;
        }
        let error =
            error.unwrap_or_else(|| SdkError::Closed("the broker ended the subscription".into()));
        if !conn.is_closed() {
            // Resubscribe on the same connection.
            client = Some(conn);
        }
        if !backoff(
            &config,
            &shared,
            &events,
            &mut failures,
            error,
            subscription > 1,
        )
        .await
        {
            return;
        }
    }
}

/// Reads one subscription until it ends, or until it used `credits_left` (counted down per item).
async fn pump(
    conn: &Client,
    request: &SubscribeRequest,
    subscription: u64,
    shared: &Shared,
    events: &mpsc::UnboundedSender<Event>,
    credits_left: &mut Option<u32>,
) -> Ended {
    let opened = match *credits_left {
        Some(n) => conn.request_stream_n(route::SUBSCRIBE, request, n),
        None => conn.request_stream(route::SUBSCRIBE, request),
    };
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            return Ended::Stream {
                error: Some(e),
                delivered: false,
            }
        }
    };
    let mut delivered = false;
    loop {
        tokio::select! {
            biased;
            _ = events.closed() => return Ended::ConsumerGone,
            _ = conn.closed() => {
                return Ended::Stream { error: Some(conn.closed_error()), delivered };
            }
            item = stream.next() => match item {
                Some(Ok(payload)) => {
                    delivered = true;
                    if let Some(n) = credits_left.as_mut() {
                        *n = n.saturating_sub(1);
                    }
                    match decode_event(&payload) {
                        Ok(IncomingEvent::Batch(batch)) => {
                            tracing::debug!(
                                batch_id = batch.batch_id,
                                messages = batch.messages.len(),
                                "batch received"
                            );
                            if events.send(Event::Batch { subscription, batch }).is_err() {
                                return Ended::ConsumerGone;
                            }
                        }
                        Ok(IncomingEvent::Status(status)) => {
                            *shared.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                        }
                        Ok(IncomingEvent::Reset(notice)) => shared.record_reset(notice),
                        Ok(IncomingEvent::Unknown(name)) => {
                            tracing::debug!(event = %name, "ignoring an unknown stream event");
                        }
                        Err(e) => {
                            // Cannot even read its batch id: the broker will time it out and
                            // redeliver (or dead-letter) it.
                            tracing::error!(error = %e, "undecodable stream event skipped");
                        }
                    }
                }
                Some(Err(e)) => return Ended::Stream { error: Some(e), delivered },
                None => return Ended::Stream { error: None, delivered },
            },
        }
        if *credits_left == Some(0) {
            break;
        }
    }
    // Every credit used: the broker sends nothing more on this stream. Keep it (and the
    // connection) open for the acks of what arrived until the consumer goes away.
    let _ = events.send(Event::Exhausted);
    tokio::select! {
        _ = events.closed() => Ended::Exhausted(None),
        _ = conn.closed() => Ended::Exhausted(Some(conn.closed_error())),
    }
}

/// Decides what a failure means. Returns `false` (after telling the consumer) when the session
/// must stop; otherwise sleeps the backoff delay and returns `true`.
async fn backoff(
    config: &ConsumerConfig,
    shared: &Shared,
    events: &mpsc::UnboundedSender<Event>,
    failures: &mut u32,
    error: SdkError,
    resubscribing: bool,
) -> bool {
    let stop = |error: SdkError| {
        // The error reaches the application through `Consumer::next`.
        tracing::debug!(error = %error, "consumer stopped");
        shared
            .connection
            .send_replace(Connection::Stopped(error.clone()));
        let _ = events.send(Event::Fatal(error));
        false
    };
    if is_fatal(&error, resubscribing) {
        return stop(error);
    }
    *failures += 1;
    if let Some(max) = config.max_reconnect_attempts {
        if *failures > max {
            return stop(error);
        }
    }
    let delay = jitter(backoff_delay(
        *failures,
        config.reconnect_backoff_min,
        config.reconnect_backoff_max,
    ));
    tracing::warn!(
        error = %error,
        attempt = *failures,
        retry_in = %humantime::format_duration(delay),
        "subscription lost; reconnecting"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = events.closed() => false,
    }
}

/// Broker refusals that retrying cannot fix. `ExclusiveTaken` is retried after a reconnect:
/// the broker may not have noticed yet that our previous connection is gone.
pub(crate) fn is_fatal(error: &SdkError, resubscribing: bool) -> bool {
    match error.code() {
        None => matches!(
            error,
            SdkError::InvalidArgument(_) | SdkError::Codec(_) | SdkError::Protocol(_)
        ),
        Some(code) => match code {
            ErrorCode::Unavailable
            | ErrorCode::Timeout
            | ErrorCode::StorageError
            | ErrorCode::Internal
            | ErrorCode::NotSetUp => false,
            ErrorCode::ExclusiveTaken => !resubscribing,
            _ => true,
        },
    }
}

/// Exponential backoff: `min * 2^(failures-1)`, capped at `max`.
pub(crate) fn backoff_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << exp).min(max)
}

/// Spreads reconnects of many consumers: 80%..120% of `d`.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let d = d.mul_f64(0.8 + f64::from(nanos % 401) / 1000.0);
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A `subscribe` stream item: `{"batch": ...}`, `{"status": ...}`, or an event this SDK does
/// not know (ignored, as the protocol asks).
#[derive(Debug)]
enum IncomingEvent {
    Batch(Batch),
    Status(StatusUpdate),
    Reset(ResetNotice),
    Unknown(String),
}

impl<'de> Deserialize<'de> for IncomingEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = IncomingEvent;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map with one key naming the event")
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut found = None;
                while let Some(name) = map.next_key::<String>()? {
                    if found.is_some() {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    found = Some(match name.as_str() {
                        "batch" => IncomingEvent::Batch(map.next_value()?),
                        "status" => IncomingEvent::Status(map.next_value()?),
                        "reset" => IncomingEvent::Reset(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            IncomingEvent::Unknown(name)
                        }
                    });
                }
                found.ok_or_else(|| serde::de::Error::custom("empty stream event"))
            }
        }
        d.deserialize_map(EventVisitor)
    }
}

/// Decodes one `subscribe` stream payload. A batch in the usual encoding is read by
/// [`fast_batch`] (payloads not copied: slices of the received frame, so a message kept alive
/// keeps its frame's memory alive); anything else goes through serde and the protocol's types.
fn decode_event(p: &Payload) -> Result<IncomingEvent> {
    let Some(frame) = p.data() else {
        return Err(SdkError::Protocol(format!(
            "'{}' sent an empty payload",
            route::SUBSCRIBE
        )));
    };
    if let Some(batch) = fast_batch::decode(frame) {
        return Ok(IncomingEvent::Batch(batch));
    }
    Ok(sluice_protocol::decode(frame)?)
}

/// A hand-written reader for the one event that comes per batch of messages:
/// `{"batch": Batch}` as `sluice_protocol::encode` writes it (structs as maps keyed by field
/// name, integers unsigned, payloads `bin`), about ten times cheaper than serde's generic
/// path. It gives up (`None`) on anything it does not expect (another event, an unknown or
/// repeated field, a missing one, another integer or byte-string form, bytes left over):
/// [`decode_event`] then decodes with serde, which stays the reference for what is valid.
mod fast_batch {
    use bytes::Bytes;
    use sluice_protocol::mpread::{once, Reader};
    use sluice_protocol::{Batch, DeliveredMessage};

    /// `frame` as a `{"batch": ...}` event, if it is one in the usual encoding.
    pub(super) fn decode(frame: &Bytes) -> Option<Batch> {
        let mut r = Reader::new(frame);
        if r.map_len()? != 1 || r.str_bytes()? != b"batch" {
            return None;
        }
        let batch = batch(&mut r)?;
        r.at_end().then_some(batch)
    }

    fn batch(r: &mut Reader<'_>) -> Option<Batch> {
        let (mut batch_id, mut topic, mut group, mut messages) = (None, None, None, None);
        for _ in 0..r.map_len()? {
            match r.str_bytes()? {
                b"batch_id" => once(&mut batch_id, r.uint())?,
                b"topic" => once(&mut topic, r.string())?,
                b"group" => once(&mut group, r.string())?,
                b"messages" => {
                    let list = r.array_of(message);
                    once(&mut messages, list)?
                }
                _ => return None,
            }
        }
        Some(Batch {
            batch_id: batch_id?,
            topic: topic?,
            group: group?,
            messages: messages?,
        })
    }

    fn message(r: &mut Reader<'_>) -> Option<DeliveredMessage> {
        let (mut seq, mut timestamp_ms, mut attempt, mut payload) = (None, None, None, None);
        let (mut key, mut headers, mut priority) = (None, None, None);
        for _ in 0..r.map_len()? {
            match r.str_bytes()? {
                b"seq" => once(&mut seq, r.uint())?,
                b"timestamp_ms" => once(&mut timestamp_ms, r.uint())?,
                b"attempt" => {
                    let value = r.uint().and_then(|v| u32::try_from(v).ok());
                    once(&mut attempt, value)?
                }
                b"priority" => {
                    let value = r.uint().and_then(|v| u8::try_from(v).ok());
                    once(&mut priority, value)?
                }
                b"payload" => once(&mut payload, r.bin())?,
                b"key" => once(&mut key, r.opt_string())?,
                b"headers" => once(&mut headers, r.headers())?,
                _ => return None,
            }
        }
        Some(DeliveredMessage {
            seq: seq?,
            timestamp_ms: timestamp_ms?,
            key: key.unwrap_or_default(),
            headers: headers.unwrap_or_default(),
            priority: priority.unwrap_or_default(),
            attempt: attempt?,
            payload: payload?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::StreamEvent;

    fn key(subscription: u64, batch_id: u64) -> BatchKey {
        BatchKey {
            subscription,
            batch_id,
        }
    }

    fn at(index: usize, seq: u64) -> Position {
        Position { index, seq }
    }

    fn register(t: &mut AckTracker, k: BatchKey, seqs: &[u64]) {
        let jobs = t.register(k, "t", "g", seqs.iter().copied());
        assert!(jobs.is_empty());
    }

    #[test]
    fn one_ack_per_fully_acked_batch() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 7), &[10, 11, 12]);
        assert!(t.settle(key(1, 7), at(1, 11), Settle::Ack).is_empty());
        assert!(t.settle(key(1, 7), at(0, 10), Settle::Ack).is_empty());
        let jobs = t.settle(key(1, 7), at(2, 12), Settle::Ack);
        assert_eq!(
            jobs,
            vec![AckJob {
                kind: Settle::Ack,
                topic: "t".into(),
                group: "g".into(),
                batch_id: 7,
                seqs: vec![11, 10, 12],
            }]
        );
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn mixed_batch_gives_one_ack_one_nack_and_one_release() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 1), &[1, 2, 3, 4, 5, 6]);
        t.settle(key(1, 1), at(0, 1), Settle::Ack);
        t.settle(key(1, 1), at(1, 2), Settle::Nack);
        t.settle(key(1, 1), at(5, 6), Settle::Release);
        t.settle(key(1, 1), at(2, 3), Settle::Ack);
        t.settle(key(1, 1), at(4, 5), Settle::Release);
        let jobs = t.settle(key(1, 1), at(3, 4), Settle::Nack);
        let jobs: Vec<(Settle, Vec<u64>)> = jobs.into_iter().map(|j| (j.kind, j.seqs)).collect();
        assert_eq!(
            jobs,
            vec![
                (Settle::Ack, vec![1, 3]),
                (Settle::Nack, vec![2, 4]),
                (Settle::Release, vec![6, 5])
            ]
        );
    }

    #[test]
    fn delayed_nacks_go_out_one_request_per_delay() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 1), &[1, 2, 3, 4]);
        t.settle(key(1, 1), at(0, 1), Settle::NackAfter(5000));
        t.settle(key(1, 1), at(1, 2), Settle::Ack);
        t.settle(key(1, 1), at(2, 3), Settle::NackAfter(100));
        let jobs = t.settle(key(1, 1), at(3, 4), Settle::NackAfter(5000));
        let jobs: Vec<(Settle, Vec<u64>)> = jobs.into_iter().map(|j| (j.kind, j.seqs)).collect();
        assert_eq!(
            jobs,
            vec![
                (Settle::Ack, vec![2]),
                (Settle::NackAfter(100), vec![3]),
                (Settle::NackAfter(5000), vec![1, 4]),
            ]
        );
    }

    #[test]
    fn double_and_unknown_settles_are_ignored() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 1), &[1, 2]);
        assert!(t.settle(key(1, 1), at(0, 1), Settle::Ack).is_empty());
        assert!(t.settle(key(1, 1), at(0, 1), Settle::Ack).is_empty());
        assert!(t.settle(key(1, 1), at(0, 99), Settle::Ack).is_empty());
        assert!(t.settle(key(1, 1), at(7, 2), Settle::Ack).is_empty());
        assert!(t.settle(key(2, 1), at(1, 2), Settle::Ack).is_empty());
        assert_eq!(
            t.settle(key(1, 1), at(1, 2), Settle::Ack)[0].seqs,
            vec![1, 2]
        );
        // The batch is gone: a late ack of it does nothing.
        assert!(t.settle(key(1, 1), at(1, 2), Settle::Ack).is_empty());
    }

    #[test]
    fn same_batch_id_on_two_subscriptions_is_two_batches() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 5), &[1]);
        register(&mut t, key(2, 5), &[1]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.settle(key(2, 5), at(0, 1), Settle::Ack).len(), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn abandoned_messages_complete_the_batch_without_being_acked() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 1), &[1, 2, 3]);
        t.settle(key(1, 1), at(0, 1), Settle::Ack);
        assert!(t.abandon(key(1, 1), at(1, 2)).is_empty());
        let jobs = t.abandon(key(1, 1), at(2, 3));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].seqs, vec![1]);

        // Nothing settled at all: nothing to send.
        register(&mut t, key(1, 2), &[4]);
        assert!(t.abandon(key(1, 2), at(0, 4)).is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn partial_drain_then_completion_sends_only_the_rest() {
        let mut t = AckTracker::default();
        register(&mut t, key(1, 1), &[1, 2, 3]);
        register(&mut t, key(1, 2), &[4, 5]);
        t.settle(key(1, 1), at(0, 1), Settle::Ack);
        t.settle(key(1, 2), at(0, 4), Settle::Nack);
        let drained = t.drain_all_settled();
        assert_eq!(drained.len(), 2);
        assert_eq!((drained[0].batch_id, drained[0].seqs.clone()), (1, vec![1]));
        assert_eq!(
            (
                drained[1].batch_id,
                drained[1].kind,
                drained[1].seqs.clone()
            ),
            (2, Settle::Nack, vec![4])
        );
        assert!(t.drain_all_settled().is_empty());
        assert!(t.drain_settled(key(1, 1)).is_empty());
        t.settle(key(1, 1), at(1, 2), Settle::Ack);
        let rest = t.settle(key(1, 1), at(2, 3), Settle::Ack);
        assert_eq!(rest[0].seqs, vec![2, 3]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn empty_batch_is_acked_whole_at_once() {
        let mut t = AckTracker::default();
        let jobs = t.register(key(1, 9), "t", "g", std::iter::empty());
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].seqs.is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn ledger_waits_for_earlier_jobs_and_reports_failures() {
        let mut l = Ledger::default();
        l.outstanding.extend([0, 1, 2]);
        l.next_id = 3;
        assert!(l.result_before(2).is_none());
        l.outstanding.remove(&0);
        l.outstanding.remove(&1);
        l.failures.push((1, SdkError::Closed("x".into())));
        l.failures.push((2, SdkError::Closed("y".into())));
        assert!(matches!(l.result_before(2), Some(Err(SdkError::Closed(m))) if m == "x"));
        assert!(matches!(l.result_before(2), Some(Ok(()))));
        assert!(l.result_before(3).is_none());
        l.outstanding.remove(&2);
        assert!(matches!(l.result_before(3), Some(Err(_))));
    }

    #[test]
    fn fatal_errors() {
        let broker = |code| SdkError::Broker(sluice_protocol::WireError::new(code, "x"));
        assert!(is_fatal(&broker(ErrorCode::ModeConflict), false));
        assert!(is_fatal(&broker(ErrorCode::UnknownGroup), true));
        assert!(is_fatal(&broker(ErrorCode::InvalidRequest), true));
        assert!(is_fatal(&broker(ErrorCode::UnsupportedVersion), true));
        assert!(!is_fatal(&broker(ErrorCode::Unavailable), false));
        assert!(!is_fatal(&broker(ErrorCode::Internal), false));
        assert!(is_fatal(&broker(ErrorCode::ExclusiveTaken), false));
        assert!(!is_fatal(&broker(ErrorCode::ExclusiveTaken), true));
        assert!(!is_fatal(&SdkError::Closed("x".into()), false));
        assert!(!is_fatal(
            &SdkError::Timeout {
                route: "ack".into(),
                after: Duration::from_secs(1)
            },
            false
        ));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(1, min, max), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, min, max), Duration::from_millis(200));
        assert_eq!(backoff_delay(4, min, max), Duration::from_millis(800));
        assert_eq!(backoff_delay(7, min, max), Duration::from_secs(5));
        assert_eq!(backoff_delay(1000, min, max), Duration::from_secs(5));
        let j = jitter(Duration::from_secs(1));
        assert!(j >= Duration::from_millis(800) && j <= Duration::from_millis(1200));
    }

    #[test]
    fn stream_events_decode_and_unknown_ones_are_ignored() {
        let batch = Batch {
            batch_id: 3,
            topic: "t".into(),
            group: "g".into(),
            messages: vec![],
        };
        let bytes = sluice_protocol::encode(&StreamEvent::Batch(batch.clone())).expect("encode");
        match sluice_protocol::decode::<IncomingEvent>(&bytes).expect("decode") {
            IncomingEvent::Batch(b) => assert_eq!(b, batch),
            other => panic!("unexpected {other:?}"),
        }
        let status = StatusUpdate {
            head_seq: 9,
            lag: 2,
        };
        let bytes = sluice_protocol::encode(&StreamEvent::Status(status.clone())).expect("encode");
        assert!(matches!(
            sluice_protocol::decode::<IncomingEvent>(&bytes).expect("decode"),
            IncomingEvent::Status(s) if s == status
        ));

        let notice = ResetNotice {
            reason: "seek".into(),
            floor_seq: 40,
            skipped: 0,
        };
        let bytes = sluice_protocol::encode(&StreamEvent::Reset(notice.clone())).expect("encode");
        assert!(matches!(
            sluice_protocol::decode::<IncomingEvent>(&bytes).expect("decode"),
            IncomingEvent::Reset(r) if r == notice
        ));

        let mut future = BTreeMap::new();
        future.insert("replica_epoch", BTreeMap::from([("epoch", 4u32)]));
        let bytes = sluice_protocol::encode(&future).expect("encode");
        assert!(matches!(
            sluice_protocol::decode::<IncomingEvent>(&bytes).expect("decode"),
            IncomingEvent::Unknown(n) if n == "replica_epoch"
        ));
        let empty: BTreeMap<String, u8> = BTreeMap::new();
        let bytes = sluice_protocol::encode(&empty).expect("encode");
        assert!(sluice_protocol::decode::<IncomingEvent>(&bytes).is_err());
    }

    #[test]
    fn batch_payloads_are_slices_of_the_frame() {
        let mut keyed = delivered(3, 70_000);
        keyed.key = Some("k".into());
        keyed.headers.insert("region".into(), "eu".into());
        keyed.priority = 2;
        keyed.attempt = 4;
        let batch = Batch {
            batch_id: 8,
            topic: "t".into(),
            group: "g".into(),
            messages: vec![delivered(1, 5), delivered(2, 0), keyed],
        };
        let frame = frame_of(&batch);
        let event = decode_event(&Payload::new(Some(frame.clone()), None)).expect("decode");
        let IncomingEvent::Batch(decoded) = event else {
            panic!("not a batch: {event:?}");
        };
        assert_eq!(decoded, batch);
        let range = frame.as_ptr_range();
        for m in decoded.messages.iter().filter(|m| !m.payload.is_empty()) {
            assert!(range.contains(&m.payload.as_ptr()), "payload was copied");
        }
        assert!(decode_event(&Payload::new(None, None)).is_err());
    }

    fn delivered(seq: u64, payload: usize) -> DeliveredMessage {
        DeliveredMessage {
            seq,
            timestamp_ms: 1_700_000_000_000u64.wrapping_add(seq),
            key: None,
            headers: BTreeMap::new(),
            priority: 0,
            attempt: 1,
            payload: Bytes::from(vec![(seq % 251) as u8; payload]),
        }
    }

    fn frame_of(batch: &Batch) -> Bytes {
        sluice_protocol::encode(&StreamEvent::Batch(batch.clone())).expect("encode")
    }

    #[test]
    fn fast_batch_reader_agrees_with_serde() {
        let mut messages = Vec::new();
        for (i, size) in [0, 1, 255, 256, 65_535, 65_536].into_iter().enumerate() {
            messages.push(delivered(i as u64 + 1, size));
        }
        for (i, seq) in [
            127,
            128,
            255,
            256,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ]
        .into_iter()
        .enumerate()
        {
            let mut m = delivered(seq, 3);
            m.timestamp_ms = seq;
            m.attempt = [1, 127, 128, 300, 70_000, u32::MAX, 2][i];
            m.priority = [0, 1, 9, 127, 128, 255, 3][i];
            m.key = Some("k".repeat([0, 1, 31, 32, 255, 256, 70_000][i]));
            m.headers = (0..[0, 1, 15, 16, 17, 2, 40][i])
                .map(|h| (format!("h{h}"), "v".repeat(h * 9)))
                .collect();
            messages.push(m);
        }
        messages.extend((100..110).map(|seq| delivered(seq, 10)));
        for n in [0, 1, 15, 16, messages.len()] {
            let batch = Batch {
                batch_id: 9_000_000_000 + n as u64,
                topic: "t".repeat(n * 3),
                group: "g".repeat(40),
                messages: messages[..n].to_vec(),
            };
            let frame = frame_of(&batch);
            let fast = fast_batch::decode(&frame).expect("the usual encoding");
            assert_eq!(fast, batch, "{n} messages");
            match sluice_protocol::decode::<IncomingEvent>(&frame).expect("serde") {
                IncomingEvent::Batch(slow) => assert_eq!(slow, fast),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn fast_batch_reader_leaves_the_unexpected_to_serde() {
        let batch = Batch {
            batch_id: 1,
            topic: "t".into(),
            group: "g".into(),
            messages: vec![delivered(1, 4), delivered(2, 0)],
        };
        // Truncated or with bytes left over: not read (serde rejects the first).
        let frame = frame_of(&batch);
        for cut in 0..frame.len() {
            assert!(
                fast_batch::decode(&frame.slice(..cut)).is_none(),
                "cut at {cut}"
            );
        }
        let mut longer = frame.to_vec();
        longer.push(0xc0);
        assert!(fast_batch::decode(&Bytes::from(longer)).is_none());

        // A message with a field this SDK does not know yet: serde ignores the field.
        #[derive(serde::Serialize)]
        struct Newer {
            seq: u64,
            timestamp_ms: u64,
            attempt: u32,
            #[serde(with = "serde_bytes_like")]
            payload: Vec<u8>,
            shard: u8,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(b)
            }
        }
        #[derive(serde::Serialize)]
        struct NewerBatch {
            batch_id: u64,
            topic: String,
            group: String,
            messages: Vec<Newer>,
        }
        let newer = BTreeMap::from([(
            "batch",
            NewerBatch {
                batch_id: 4,
                topic: "t".into(),
                group: "g".into(),
                messages: vec![Newer {
                    seq: 7,
                    timestamp_ms: 8,
                    attempt: 1,
                    payload: b"hi".to_vec(),
                    shard: 3,
                }],
            },
        )]);
        let frame = sluice_protocol::encode(&newer).expect("encode");
        assert!(fast_batch::decode(&frame).is_none());
        match decode_event(&Payload::new(Some(frame), None)).expect("decode") {
            IncomingEvent::Batch(b) => {
                assert_eq!((b.batch_id, b.messages.len()), (4, 1));
                assert_eq!(
                    (b.messages[0].seq, &b.messages[0].payload[..]),
                    (7, &b"hi"[..])
                );
            }
            other => panic!("unexpected {other:?}"),
        }

        // Other events go to serde as well.
        let status = StatusUpdate {
            head_seq: 3,
            lag: 1,
        };
        let frame = sluice_protocol::encode(&StreamEvent::Status(status.clone())).expect("encode");
        assert!(fast_batch::decode(&frame).is_none());
        assert!(matches!(
            decode_event(&Payload::new(Some(frame), None)).expect("decode"),
            IncomingEvent::Status(s) if s == status
        ));
        assert!(decode_event(&Payload::new(Some(Bytes::from_static(b"\xc1")), None)).is_err());
    }

    #[test]
    fn config_validation() {
        let ok = ConsumerConfig::new(ClientConfig::default(), "orders", "billing");
        assert!(ok.validate().is_ok());
        assert!(ConsumerConfig::default().validate().is_err());
        assert!(ok.clone().window(0).validate().is_err());
        assert!(ok
            .clone()
            .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
            .validate()
            .is_err());
        let req = ok
            .filter("region", "eu")
            .mode(GroupMode::KeyShared)
            .subscribe_request();
        assert_eq!(req.mode, GroupMode::KeyShared);
        assert_eq!(req.filters.get("region").map(String::as_str), Some("eu"));
        assert_eq!(req.backoff, None);

        let with = ConsumerConfig::new(ClientConfig::default(), "orders", "billing")
            .backoff(vec![Duration::from_millis(1500), Duration::from_secs(120)]);
        assert!(with.validate().is_ok());
        let sent = with.subscribe_request().backoff.expect("schedule sent");
        assert_eq!(
            sluice_protocol::parse_backoff(&sent).expect("the broker reads it"),
            vec![1500, 120_000]
        );
        for bad in [
            vec![],
            vec![Duration::ZERO],
            vec![Duration::from_secs(2 * 86400)],
            vec![Duration::from_secs(1); MAX_BACKOFF_STEPS + 1],
        ] {
            assert!(with.clone().backoff(bad).validate().is_err());
        }
    }
}
