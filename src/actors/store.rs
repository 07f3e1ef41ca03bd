//! StoreActor: the only writer of the storage (segment files, sled), on its arbiter thread
//! (shared with orchestrator shard 0).
//!
//! The group-commit pipeline it drives (sync jobs, the ledger that settles them, the sync
//! threads) is in [`crate::store::commit`]; this actor moves messages: it queues requests,
//! writes them at each `Commit`, starts sync threads and answers reads. Topics as an operator
//! manages them, the retention sweep and the events they cause are in `store/topics.rs`
//! (design: `src/store/retention.md`).

mod topics;

use super::messages::{
    AppendMessages, CommitGroup, GetSyncStats, ListGroups, LoadGroup, MessagesAppended, ReadRange,
    SetAppendListeners, StoreLinks, TopicAdminLinks,
};
use super::{now_ms, ActorCounters, GetActorStats, InjectFault};
use crate::config::FsyncPolicy;
use crate::store::commit::{
    lock, micros, sync_worker, Announcer, AppendReply, FailureLog, GroupReply, Refused, SyncLedger,
    SyncPlace, SyncRetry, Written, WrittenAppend, MAX_SYNCS,
};
use crate::store::record::StoredMessage;
use crate::store::{Appended, GroupRecord, ReadResult, Storage, StoreError};
use actix::prelude::*;
use sluice_protocol::{event_kind, BrokerEvent, SharedStr, SyncStats};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

#[derive(Message)]
#[rtype(result = "()")]
struct Commit;

#[derive(Message)]
#[rtype(result = "()")]
struct PeriodicSync;

/// A write past the file size limit (`RLIMIT_FSIZE`, e.g. systemd's `LimitFSIZE=`) raises
/// `SIGXFSZ`, which kills the process unless handled: handled, the write fails with `EFBIG`
/// instead, and that request fails (rolled back) like one on a full disk. Installed once per
/// process (tokio never uninstalls a signal handler); each signal is logged.
fn catch_file_size_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(mut sig) => {
            actix_rt::spawn(async move {
                while sig.recv().await.is_some() {
                    tracing::warn!(
                        "a write reached the file size limit (SIGXFSZ): it fails with EFBIG"
                    );
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGXFSZ: a file size limit kills the broker")
        }
    });
}

/// The error for a write refused after a failed sync (`why`).
fn refusal(why: &str) -> StoreError {
    StoreError::Io(std::io::Error::other(format!(
        "storage failed to sync ({why}): writes are refused until the broker restarts"
    )))
}

/// Tells the actor that a sync failed: it refuses writes from then on.
#[derive(Message)]
#[rtype(result = "()")]
struct SyncFailed;

impl StoreLinks {
    /// The recipients of the store actor (or of any actor that answers the same messages: a
    /// test's probe store).
    pub fn of<A>(addr: &Addr<A>) -> StoreLinks
    where
        A: Actor<Context = Context<A>>
            + Handler<AppendMessages>
            + Handler<CommitGroup>
            + Handler<ReadRange>
            + Handler<LoadGroup>
            + Handler<ListGroups>
            + Handler<GetSyncStats>
            + Handler<GetActorStats>
            + Handler<InjectFault>
            + Handler<super::messages::SeqAtTime>
            + Handler<super::messages::DeleteGroupRecord>
            + Handler<super::messages::GetTopicSettings>,
    {
        StoreLinks {
            append: addr.clone().recipient(),
            commit: addr.clone().recipient(),
            read: addr.clone().recipient(),
            load: addr.clone().recipient(),
            list_groups: addr.clone().recipient(),
            sync_stats: addr.clone().recipient(),
            actor_stats: addr.clone().recipient(),
            fault: addr.clone().recipient(),
            seq_at_time: addr.clone().recipient(),
            delete_group: addr.clone().recipient(),
            topic_settings: addr.clone().recipient(),
        }
    }
}

impl TopicAdminLinks {
    /// The store actor's recipients for `topic.*` routes.
    pub fn of(addr: &Addr<StoreActor>) -> TopicAdminLinks {
        TopicAdminLinks {
            create: addr.clone().recipient(),
            info: addr.clone().recipient(),
            delete: addr.clone().recipient(),
        }
    }
}

/// A publish queued for the next commit.
struct PendingAppend {
    topic: String,
    msgs: Vec<StoredMessage>,
    /// Each message's id, when some has one.
    ids: Option<Vec<Option<SharedStr>>>,
    reply: AppendReply,
}

/// The store actor.
pub struct StoreActor {
    /// The broker's configuration (topic defaults, retention, dedup).
    config: Arc<crate::config::Config>,
    /// Lifecycle events.
    events: crate::events::EventBus,
    storage: Storage,
    fsync: FsyncPolicy,
    pending_appends: Vec<PendingAppend>,
    pending_groups: HashMap<(String, String), (GroupRecord, Vec<GroupReply>)>,
    /// Topics being deleted (until the deletion is durable): refused meanwhile.
    deleting: HashSet<String>,
    /// Each orchestrator shard's recipients of `FloorMoved` / `TopicRemoved`.
    topic_listeners: Vec<super::messages::TopicListener>,
    /// The remover thread was started (once: it outlives restarts of the actor).
    remover_started: bool,
    /// What the remover thread freed (shared with it).
    free_stats: Arc<crate::store::remover::FreeStats>,
    /// Limits hit, for `admin.stats` and events.
    limits: topics::StoreLimits,
    commit_scheduled: bool,
    /// Written, waiting for the next sync.
    written: Written,
    /// Sync jobs in flight and their settling, shared with the jobs: replies go out in start
    /// order, so messages are announced in seq order.
    ledger: Arc<Mutex<SyncLedger>>,
    /// A sync failed: writes are refused until the broker restarts (see [`StoreActor::fail`]).
    failed: Option<String>,
    next_sync_id: u64,
    dirty: bool,
    counters: ActorCounters,
    commits: u64,
    /// Retrying a sync that could not be taken for want of file descriptors.
    retry: SyncRetry,
    /// Requests that failed (and were rolled back), logged at most once a second.
    failures: FailureLog,
}

impl StoreActor {
    /// A store actor over an opened storage.
    /// With the broker's configuration (topic defaults, retention, dedup) and event bus.
    ///
    /// The topics' defaults are the configuration's, and each topic's idempotent-publish index
    /// is rebuilt from its log here (the ids stored within its `dedup_window`).
    pub fn with_config(
        mut self,
        config: Arc<crate::config::Config>,
        events: crate::events::EventBus,
    ) -> Self {
        self.storage.set_defaults(config.default_topic_settings());
        self.storage
            .set_dedup_max_ids(usize::try_from(config.dedup_max_ids).unwrap_or(usize::MAX));
        self.config = config;
        self.events = events;
        self.rebuild_dedup();
        self
    }

    /// A store actor over `storage` (default configuration and a bus of its own: see
    /// [`StoreActor::with_config`]).
    pub fn new(mut storage: Storage, fsync: FsyncPolicy) -> Self {
        // Direct writes (and spares) need a sync after every commit.
        storage.set_direct_writes(Storage::sync_per_commit(fsync));
        // What the store found at open is durable (the open syncs the segments' tails).
        let durable = storage
            .topics()
            .map(|(t, last)| (t.to_string(), last))
            .collect();
        StoreActor {
            config: Arc::new(crate::config::Config::default()),
            events: crate::events::EventBus::default(),
            storage,
            fsync,
            pending_appends: Vec::new(),
            pending_groups: HashMap::new(),
            deleting: HashSet::new(),
            topic_listeners: Vec::new(),
            remover_started: false,
            free_stats: Arc::default(),
            limits: topics::StoreLimits::default(),
            commit_scheduled: false,
            written: Written::default(),
            ledger: Arc::new(Mutex::new(SyncLedger {
                durable,
                timing: SyncStats::new(),
                ..SyncLedger::default()
            })),
            failed: None,
            next_sync_id: 0,
            dirty: false,
            counters: ActorCounters::default(),
            commits: 0,
            retry: SyncRetry::default(),
            failures: FailureLog::default(),
        }
    }

    /// The last durable seq of `topic` (0 if none).
    fn durable_head(&self, topic: &str) -> u64 {
        lock(&self.ledger).durable_head(topic)
    }

    /// Makes what was written durable under the policy and answers it then: a sync job under
    /// `always`; at once otherwise (durable at the next periodic sync, or when the OS writes
    /// it back).
    fn commit_written(&mut self, ctx: &mut Context<Self>) {
        match self.fsync {
            FsyncPolicy::Always => self.start_sync(ctx),
            _ => {
                self.dirty = true;
                let batch = std::mem::take(&mut self.written);
                lock(&self.ledger).settle(batch, Ok(()));
            }
        }
    }

    /// Writes one publish: with ids through the dedup index (duplicates left out, the answer
    /// given), without straight to the log. Returns the messages stored, with their seqs.
    fn store_append(
        &mut self,
        topic: &str,
        mut msgs: Vec<StoredMessage>,
        ids: Option<Vec<Option<SharedStr>>>,
    ) -> Result<(Vec<StoredMessage>, Option<Appended>), StoreError> {
        let Some(ids) = ids else {
            let first = self.storage.append(topic, &msgs)?;
            for (i, m) in msgs.iter_mut().enumerate() {
                m.seq = first + i as u64;
            }
            return Ok((msgs, None));
        };
        let now = msgs.first().map_or_else(now_ms, |m| m.timestamp_ms);
        let (kept, appended, forgotten) = self.storage.append_dedup(topic, msgs, ids, now)?;
        if forgotten.total() > 0 {
            self.dedup_full(Some(topic), forgotten);
        }
        Ok((kept, appended.duplicate.then_some(appended)))
    }

    /// Whether a queued, unwritten publish names `topic`.
    fn appends_pending_for(&self, topic: &str) -> bool {
        self.pending_appends.iter().any(|p| p.topic == topic)
    }

    fn schedule_commit(&mut self, ctx: &mut Context<Self>) {
        if !self.commit_scheduled {
            self.commit_scheduled = true;
            ctx.notify(Commit);
        }
    }

    /// Writes every queued append and group record to storage (not yet durable); their
    /// waiters move to `written`, errors are replied at once.
    fn write_pending(&mut self) {
        self.commit_scheduled = false;
        let appends = std::mem::take(&mut self.pending_appends);
        let groups = std::mem::take(&mut self.pending_groups);
        if appends.is_empty() && groups.is_empty() {
            return;
        }
        self.commits += 1;
        let mut inconsistent: Option<String> = None;
        for PendingAppend {
            topic,
            msgs,
            ids,
            reply: tx,
        } in appends
        {
            if let Some(why) = &inconsistent {
                let _ = tx.send(Err(refusal(why)));
                continue;
            }
            let existed = self.storage.exists(&topic);
            match self.store_append(&topic, msgs, ids) {
                Ok((msgs, dup)) => {
                    self.written.appends.push(WrittenAppend {
                        topic: topic.clone(),
                        msgs,
                        reply: tx,
                        dup,
                    });
                }
                Err(e) => {
                    if let StoreError::Inconsistent(why) = &e {
                        inconsistent = Some(why.clone());
                    }
                    if self.failures.note(&format!("publish to {topic}"), &e) {
                        self.storage_error(Some(&topic), &e.to_string());
                    }
                    self.written.refused.push((Refused::Append(tx), e));
                }
            }
            if !existed && self.storage.exists(&topic) {
                self.events
                    .emit(BrokerEvent::now(event_kind::TOPIC_CREATED).topic(topic));
            }
        }
        for ((topic, group), (rec, txs)) in groups {
            if let Some(why) = &inconsistent {
                for tx in txs {
                    let _ = tx.send(Err(refusal(why)));
                }
                continue;
            }
            match self.storage.put_group(&topic, &group, &rec) {
                Ok(()) => self.written.groups.extend(txs),
                Err(e) => {
                    if let StoreError::Inconsistent(why) = &e {
                        inconsistent = Some(why.clone());
                    }
                    if self
                        .failures
                        .note(&format!("group commit of {topic}/{group}"), &e)
                    {
                        self.storage_error(Some(&topic), &e.to_string());
                    }
                    self.written.refused.push((Refused::Groups(txs), e));
                }
            }
        }
        if let Some(why) = inconsistent {
            self.fail(why);
        }
    }

    /// Pipelined group commit: the fsyncs of everything written so far run on a sync thread
    /// while this actor goes on writing the next requests. Each commit queues its own job; up to
    /// [`MAX_SYNCS`] threads run them, each taking every job queued when it becomes free
    /// (concurrent fdatasyncs of one file are fine: each covers what was written before it
    /// started). Jobs are settled in the order they were queued.
    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        if self.written.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.written);
        let id = self.next_sync_id;
        self.next_sync_id += 1;
        let job = match self.storage.take_sync_job() {
            Ok(job) => {
                self.retry.succeeded();
                job
            }
            Err(e) if e.is_shortage() => {
                // No descriptor for a handle (normally opened by the writes themselves; here
                // after a restart of the actor). The data is written, just not synced yet:
                // the requests wait, with what comes meanwhile, and the sync is tried again.
                // Failing them would answer "error" for messages a later sync makes readable.
                self.retry.failed(&e);
                let mut batch = batch;
                batch.append(&mut self.written);
                self.written = batch;
                if !self.retry.scheduled {
                    self.retry.scheduled = true;
                    ctx.run_later(self.retry.backoff, |a, ctx| {
                        a.retry.scheduled = false;
                        a.start_sync(ctx);
                    });
                }
                return;
            }
            Err(e) => {
                // Written but not syncable: answering "error" would be wrong should a later
                // sync make them readable, so nothing more is written (like a failed sync).
                tracing::error!(error = %e, "cannot prepare the sync: failing the requests of this commit");
                let mut l = lock(&self.ledger);
                l.poisoned = true;
                l.jobs.push_back((id, batch, Some(Err(e.to_string()))));
                l.settle_finished();
                drop(l);
                self.fail(format!("cannot prepare a sync: {e}"));
                return;
            }
        };
        let mut l = lock(&self.ledger);
        // Queued while a failure is unanswered: fails with it (see `SyncLedger::finish`).
        let res = l
            .poisoned
            .then(|| Err("an overlapping sync failed".to_string()));
        l.jobs.push_back((id, batch, res));
        l.queued.push((id, job));
        if l.workers < MAX_SYNCS {
            l.workers += 1;
            drop(l);
            let on_failure: Recipient<SyncFailed> = ctx.address().recipient();
            let place = SyncPlace {
                ledger: self.ledger.clone(),
                on_failure: Box::new(move || on_failure.do_send(SyncFailed)),
                taken: Vec::new(),
                left: false,
            };
            // Detached: the thread settles through the ledger and reports failures by message.
            drop(actix_rt::task::spawn_blocking(move || sync_worker(place)));
        }
    }

    /// After a failed sync: refuses every write from now on, until the broker restarts.
    ///
    /// Linux marks the pages of a failed write-back clean, so syncing again would report
    /// success over data that never reached the disk; and messages acknowledged after such a
    /// hole would be cut off with it when the log is checked at the next start. So nothing
    /// more is written: what is durable stays readable, publishes and acks get a storage error
    /// saying why, and a restart rebuilds the logs from what the disk holds.
    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(error = %why, "a sync failed: the store refuses writes until the broker restarts");
            self.storage_error(None, &why);
            self.failed = Some(why);
        }
        // Jobs still queued fail with the one that failed.
        lock(&self.ledger).poisoned = true;
        self.refuse_pending();
    }

    /// The error for a write refused after a failed sync.
    fn refusal(&self) -> Option<StoreError> {
        self.failed.as_deref().map(refusal)
    }

    /// Answers the queued, unwritten requests with the refusal.
    fn refuse_pending(&mut self) {
        let Some(why) = self.failed.clone() else {
            return;
        };
        for p in std::mem::take(&mut self.pending_appends) {
            let _ = p.reply.send(Err(refusal(&why)));
        }
        for (_, (_, txs)) in std::mem::take(&mut self.pending_groups) {
            for tx in txs {
                let _ = tx.send(Err(refusal(&why)));
            }
        }
    }

    /// `Storage::sync` on this thread, waiting up to 5 s for file descriptors should the job
    /// not be taken for want of them (shutdown, restart).
    fn sync_now(&mut self) -> Result<(), StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut backoff = SyncRetry::FIRST;
        loop {
            match self.storage.take_sync_job() {
                Ok(job) => {
                    return job.run().inspect_err(|_| self.storage.mark_dirty());
                }
                Err(e) if e.is_shortage() && std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot take a sync (no file descriptor left): retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(SyncRetry::MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes and syncs everything queued, on this thread (shutdown and restarts), and settles
    /// every job in flight with that sync's result (a thread still running finds its jobs
    /// gone). Each sync opens the files anew, so this one sees a write-back error even if a
    /// running thread's sync saw it first.
    fn commit_now(&mut self) {
        if self.failed.is_none() && lock(&self.ledger).poisoned {
            // A sync failed and the actor has not heard yet: it has now.
            self.fail("a sync failed".into());
        }
        if self.failed.is_none() {
            self.write_pending();
        }
        let ledger = self.ledger.clone();
        let mut l = lock(&ledger);
        let res = if self.failed.is_some() {
            Err("an earlier sync failed".to_string())
        } else {
            if !l.jobs.is_empty() {
                self.storage.mark_dirty();
            }
            let started = std::time::Instant::now();
            let res = self.sync_now().map_err(|e| e.to_string());
            l.timing.record(micros(started), res.is_ok());
            res
        };
        l.queued.clear();
        for (_, b, _) in std::mem::take(&mut l.jobs) {
            l.settle(b, res.clone());
        }
        l.settle(std::mem::take(&mut self.written), res.clone());
        drop(l);
        if let Err(e) = res {
            self.fail(e);
        }
    }
}

impl Actor for StoreActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.counters.started_at = std::time::Instant::now();
        if let FsyncPolicy::Interval(d) = self.fsync {
            ctx.run_interval(d, |_, ctx| ctx.notify(PeriodicSync));
        }
        self.start_remover(ctx);
        ctx.run_interval(self.config.retention_interval, |a, ctx| a.sweep(ctx));
        catch_file_size_signal();
        tracing::info!(fsync = %self.fsync, "store started");
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        // Whatever is queued is committed before the actor stops: no reply is lost.
        self.commit_now();
        Running::Stop
    }
}

impl Supervised for StoreActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.counters.restarts += 1;
        self.commit_scheduled = false;
        // `stopping` settled every sync job; should one be left, its requests are answered with
        // an error (they may or may not be durable), and everything written is synced again.
        {
            let mut l = lock(&self.ledger);
            l.queued.clear();
            for (_, batch, _) in std::mem::take(&mut l.jobs) {
                l.settle(batch, Err("the store restarted during the sync".into()));
            }
            // A failed store stays failed across restarts of the actor (the storage and the
            // page cache are the same).
            l.poisoned = self.failed.is_some();
        }
        self.storage.mark_dirty();
        tracing::warn!(
            restarts = self.counters.restarts,
            "store actor restarting (the storage stays open)"
        );
        self.events.emit(
            BrokerEvent::now(event_kind::ACTOR_RESTARTED)
                .actor("store")
                .count(u64::from(self.counters.restarts)),
        );
    }
}

impl Handler<AppendMessages> for StoreActor {
    type Result = ResponseFuture<Result<Appended, StoreError>>;

    fn handle(&mut self, msg: AppendMessages, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let ts = now_ms();
        let n = msg.messages.len();
        // Ids cost nothing to publishes without them: the list exists only once one has one.
        let mut ids: Option<Vec<Option<SharedStr>>> = None;
        let mut stored = Vec::with_capacity(n);
        for (i, m) in msg.messages.into_iter().enumerate() {
            if let Some(id) = m.id {
                if let Some(slot) = ids.get_or_insert_with(|| vec![None; n]).get_mut(i) {
                    *slot = Some(id);
                }
            }
            stored.push(StoredMessage {
                seq: 0,
                timestamp_ms: ts,
                key: m.key,
                headers: m.headers,
                priority: m.priority,
                payload: m.payload,
            });
        }
        if let Some(e) = self.refusal() {
            return Box::pin(async move { Err(e) });
        }
        if let Err(e) = self.may_write(&msg.topic, msg.dead_letter) {
            return Box::pin(async move { Err(e) });
        }
        let (tx, rx) = oneshot::channel();
        if stored.is_empty() {
            let last = self.durable_head(&msg.topic);
            return Box::pin(async move { Ok(Appended::stored(last + 1, last)) });
        }
        self.pending_appends.push(PendingAppend {
            topic: msg.topic,
            msgs: stored,
            ids,
            reply: tx,
        });
        self.schedule_commit(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Unavailable)) })
    }
}

impl Handler<CommitGroup> for StoreActor {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, msg: CommitGroup, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        if let Some(e) = self.refusal() {
            return Box::pin(async move { Err(e) });
        }
        if let Err(e) = self.may_write(&msg.topic, false) {
            return Box::pin(async move { Err(e) });
        }
        if !self.storage.exists(&msg.topic) {
            // A group of a topic that does not exist yet has acked nothing: a record that has
            // is one of a topic deleted meanwhile (an ack racing the deletion), not kept, even
            // if a publish about to create the topic again is queued.
            let rec = &msg.record;
            if rec.acked_floor > 0
                || !rec.acked_ranges.is_empty()
                || !rec.acked_above.is_empty()
                || !rec.attempts.is_empty()
            {
                let e = StoreError::UnknownTopic(msg.topic);
                return Box::pin(async move { Err(e) });
            }
            if !self.appends_pending_for(&msg.topic) {
                // Kept in memory (no file), written with the topic's first segment.
                let kept = self.keep_waiting_group(&msg.topic, &msg.group, &msg.record);
                return Box::pin(async move { kept });
            }
        } else if self
            .storage
            .stale_group_record(&msg.topic, &msg.group, &msg.record)
            && !self
                .pending_groups
                .contains_key(&(msg.topic.clone(), msg.group.clone()))
        {
            // The topic was deleted and created again; this record is of the old one's group.
            tracing::warn!(topic = %msg.topic, group = %msg.group, acked_floor = msg.record.acked_floor, "group record of a deleted topic of that name refused");
            let e = StoreError::UnknownTopic(msg.topic);
            return Box::pin(async move { Err(e) });
        }
        let (tx, rx) = oneshot::channel();
        let entry = self
            .pending_groups
            .entry((msg.topic, msg.group))
            .or_insert_with(|| (msg.record.clone(), Vec::new()));
        entry.0 = msg.record;
        entry.1.push(tx);
        self.schedule_commit(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Unavailable)) })
    }
}

impl Handler<Commit> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: Commit, ctx: &mut Context<Self>) {
        self.write_pending();
        self.commit_written(ctx);
    }
}

impl Handler<SyncFailed> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: SyncFailed, _: &mut Context<Self>) {
        self.fail("a sync failed".into());
    }
}

impl Handler<PeriodicSync> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: PeriodicSync, _: &mut Context<Self>) {
        if self.dirty {
            let job = match self.storage.take_sync_job() {
                Ok(job) => job,
                Err(e) if e.is_shortage() => {
                    // Nothing changed: tried again at the next tick.
                    tracing::warn!(error = %e, "periodic fsync postponed: no file descriptor left");
                    return;
                }
                Err(e) => {
                    self.fail(format!("periodic fsync: {e}"));
                    return;
                }
            };
            self.dirty = false;
            let started = std::time::Instant::now();
            let res = job.run();
            lock(&self.ledger)
                .timing
                .record(micros(started), res.is_ok());
            if let Err(e) = res {
                self.storage.mark_dirty();
                self.fail(format!("periodic fsync: {e}"));
            }
        }
    }
}

impl Handler<ReadRange> for StoreActor {
    type Result = Result<ReadResult, StoreError>;
    fn handle(&mut self, msg: ReadRange, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let durable = self.durable_head(&msg.topic);
        if msg.from > durable {
            return Ok(ReadResult::default());
        }
        let max = msg.max.min((durable - msg.from + 1) as usize);
        self.storage.read(&msg.topic, msg.from, max, msg.max_bytes)
    }
}

impl Handler<LoadGroup> for StoreActor {
    type Result = Result<(Option<GroupRecord>, u64), StoreError>;
    fn handle(&mut self, msg: LoadGroup, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        self.may_write(&msg.topic, false)?;
        // A group record still waiting for its commit is the newest truth.
        if let Some((rec, _)) = self
            .pending_groups
            .get(&(msg.topic.clone(), msg.group.clone()))
        {
            return Ok((Some(rec.clone()), self.durable_head(&msg.topic)));
        }
        Ok((
            self.storage.group(&msg.topic, &msg.group)?,
            self.durable_head(&msg.topic),
        ))
    }
}

impl Handler<ListGroups> for StoreActor {
    type Result = Result<Vec<(String, String, GroupRecord, u64)>, StoreError>;
    fn handle(&mut self, _: ListGroups, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        Ok(self
            .storage
            .all_groups()?
            .into_iter()
            .map(|(t, g, r)| {
                let head = self.durable_head(&t);
                (t, g, r, head)
            })
            .collect())
    }
}

impl Handler<SetAppendListeners> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: SetAppendListeners, _: &mut Context<Self>) {
        let listeners = msg.0;
        let announce: Option<Announcer> = (!listeners.is_empty()).then(|| {
            Box::new(move |topic: String, msgs: Vec<StoredMessage>| {
                let shard = super::shard_for(&topic, listeners.len());
                let messages = Arc::new(msgs.into_iter().map(Arc::new).collect());
                listeners[shard].do_send(MessagesAppended { topic, messages });
            }) as Announcer
        });
        lock(&self.ledger).announce = announce;
    }
}

impl Handler<GetActorStats> for StoreActor {
    type Result = MessageResult<GetActorStats>;
    fn handle(&mut self, _: GetActorStats, _: &mut Context<Self>) -> Self::Result {
        let backlog = (self.pending_appends.len() + self.pending_groups.len()) as u64;
        MessageResult(self.counters.stats("store", "store", Some(backlog)))
    }
}

impl Handler<GetSyncStats> for StoreActor {
    type Result = MessageResult<GetSyncStats>;
    fn handle(&mut self, _: GetSyncStats, _: &mut Context<Self>) -> Self::Result {
        let mut stats = lock(&self.ledger).timing.clone();
        let (ids, entries) = self.storage.dedup_counts();
        stats.dedup_ids = ids;
        stats.dedup_entries = entries;
        stats.dedup_ids_forgotten = self.limits.dedup_ids_forgotten;
        stats.waiting_groups = self.storage.waiting_groups() as u64;
        stats.waiting_groups_refused = self.limits.waiting_groups_refused;
        let f = &self.free_stats;
        stats.remove_pending_bytes = f.pending_bytes.load(Ordering::Relaxed);
        stats.removed_bytes = f.freed_bytes.load(Ordering::Relaxed);
        stats.removed_files = f.files_freed.load(Ordering::Relaxed);
        stats.remove_steps = f.steps.load(Ordering::Relaxed);
        MessageResult(stats)
    }
}

impl Handler<InjectFault> for StoreActor {
    type Result = ();
    fn handle(&mut self, msg: InjectFault, ctx: &mut Context<Self>) {
        match msg.kind {
            super::FaultKind::Panic => super::injected_panic("store"),
            super::FaultKind::StallSyncs(d) => {
                tracing::warn!(stall = ?d, "fault injected: every sync waits first");
                crate::store::stall_syncs(d);
                return;
            }
            super::FaultKind::Stop => {}
        }
        tracing::warn!("fault injected: stopping the store actor");
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sluice_protocol::NewMessage;

    #[test]
    fn a_failed_sync_fails_its_requests_and_refuses_writes_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        let fail = dir.path().join("fail-syncs");
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always).start();
            let publish = |p: &'static str| AppendMessages {
                topic: "t".into(),
                messages: vec![NewMessage {
                    payload: Bytes::from_static(p.as_bytes()),
                    ..Default::default()
                }],
                dead_letter: false,
            };
            assert_eq!(
                store.send(publish("a")).await.unwrap().unwrap(),
                Appended::stored(1, 1)
            );
            std::fs::write(&fail, b"").unwrap();
            assert!(store.send(publish("b")).await.unwrap().is_err());
            std::fs::remove_file(&fail).unwrap();
            // Every write from now on fails, with the reason once the actor has heard of the
            // failure (a publish racing that news fails with the failed sync instead).
            let mut refused = None;
            for _ in 0..50 {
                let e = store.send(publish("c")).await.unwrap().unwrap_err();
                if e.to_string().contains("until the broker restarts") {
                    refused = Some(e);
                    break;
                }
            }
            assert!(refused.is_some(), "writes are refused after a failed sync");
            let record = GroupRecord {
                mode: sluice_protocol::GroupMode::Shared,
                filters: Default::default(),
                acked_floor: 1,
                acked_above: Vec::new(),
                acked_ranges: Vec::new(),
                created_ms: now_ms(),
                backoff_ms: vec![],
                attempts: vec![],
            };
            let ack = CommitGroup {
                topic: "t".into(),
                group: "g".into(),
                record,
            };
            assert!(store.send(ack).await.unwrap().is_err(), "acks too");
            // What was durable stays readable; nothing after it is served.
            let read = ReadRange {
                topic: "t".into(),
                from: 1,
                max: 10,
                max_bytes: 1 << 20,
            };
            let r = store.send(read).await.unwrap().unwrap();
            assert_eq!(r.messages.len(), 1);
            assert_eq!(r.messages[0].payload, Bytes::from_static(b"a"));
        });
    }

    fn publish(topic: &str, payloads: &[&[u8]]) -> AppendMessages {
        AppendMessages {
            topic: topic.into(),
            messages: payloads
                .iter()
                .map(|p| NewMessage {
                    payload: Bytes::copy_from_slice(p),
                    ..Default::default()
                })
                .collect(),
            dead_letter: false,
        }
    }

    #[test]
    fn a_publish_failing_part_way_stores_nothing_and_the_store_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        let fail = dir.path().join("fail-writes-after");
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always).start();
            assert_eq!(
                store.send(publish("t", &[b"a"])).await.unwrap().unwrap(),
                Appended::stored(1, 1)
            );
            // Four chunks of ~64 KiB: the second fails.
            let big = vec![7u8; 1000];
            let many: Vec<&[u8]> = (0..250).map(|_| &big[..]).collect();
            std::fs::write(&fail, "1").unwrap();
            let e = store.send(publish("t", &many)).await.unwrap().unwrap_err();
            assert!(e.to_string().contains("No space left"), "{e}");
            std::fs::remove_file(&fail).unwrap();
            // Not poisoned: publishes and acks go on, with the seqs the failed one had.
            assert_eq!(
                store.send(publish("t", &[b"c"])).await.unwrap().unwrap(),
                Appended::stored(2, 2)
            );
            let record = GroupRecord {
                mode: sluice_protocol::GroupMode::Shared,
                filters: Default::default(),
                acked_floor: 2,
                acked_above: Vec::new(),
                acked_ranges: Vec::new(),
                created_ms: now_ms(),
                backoff_ms: vec![],
                attempts: vec![],
            };
            let ack = CommitGroup {
                topic: "t".into(),
                group: "g".into(),
                record,
            };
            store.send(ack).await.unwrap().unwrap();
            let read = ReadRange {
                topic: "t".into(),
                from: 1,
                max: 1000,
                max_bytes: 1 << 30,
            };
            let r = store.send(read).await.unwrap().unwrap();
            let got: Vec<_> = r
                .messages
                .iter()
                .map(|m| (m.seq, m.payload.clone()))
                .collect();
            assert_eq!(
                got,
                vec![(1, Bytes::from_static(b"a")), (2, Bytes::from_static(b"c"))]
            );
        });
    }

    #[test]
    fn a_sync_without_descriptors_waits_for_them_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        let no_fds = dir.path().join("fail-takes");
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always).start();
            assert_eq!(
                store.send(publish("t", &[b"a"])).await.unwrap().unwrap(),
                Appended::stored(1, 1)
            );
            std::fs::write(&no_fds, b"").unwrap();
            let waiting = store.send(publish("t", &[b"b"]));
            let mut waiting = Box::pin(waiting);
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(100), &mut waiting).await;
            assert!(early.is_err(), "answered before its sync: {early:?}");
            std::fs::remove_file(&no_fds).unwrap();
            assert_eq!(waiting.await.unwrap().unwrap(), Appended::stored(2, 2));
            assert_eq!(
                store.send(publish("t", &[b"c"])).await.unwrap().unwrap(),
                Appended::stored(3, 3)
            );
        });
    }

    /// Records what the store tells an orchestrator shard about topics.
    #[derive(Default)]
    struct Listener {
        floors: Arc<Mutex<Vec<(String, u64)>>>,
        removed: Arc<Mutex<Vec<String>>>,
    }

    impl Actor for Listener {
        type Context = Context<Self>;
    }

    impl Handler<super::super::messages::FloorMoved> for Listener {
        type Result = ();
        fn handle(&mut self, m: super::super::messages::FloorMoved, _: &mut Context<Self>) {
            self.floors.lock().unwrap().push((m.topic, m.floor_seq));
        }
    }

    impl Handler<super::super::messages::TopicRemoved> for Listener {
        type Result = ();
        fn handle(&mut self, m: super::super::messages::TopicRemoved, _: &mut Context<Self>) {
            self.removed.lock().unwrap().push(m.topic);
        }
    }

    /// Waits up to 10 s for `f`.
    async fn until(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        f()
    }

    fn seg_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                    .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn retention_removes_whole_segments_under_every_fsync_policy_and_says_so() {
        use super::super::messages::{CreateTopic, SetTopicListeners, TopicListener};
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Interval(std::time::Duration::from_millis(50)),
            FsyncPolicy::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut storage = Storage::open(dir.path(), 1 << 20).unwrap();
            storage.set_segment_bytes(64 * 1024);
            let config = crate::config::Config {
                retention_interval: std::time::Duration::from_millis(100),
                ..Default::default()
            };
            let bus = crate::events::EventBus::default();
            let mut events = bus.subscribe();
            let topic_dir = dir.path().join("topics/t");
            actix_rt::System::new().block_on(async move {
                let store = StoreActor::new(storage, policy)
                    .with_config(Arc::new(config), bus)
                    .start();
                let listener = Listener::default();
                let floors = listener.floors.clone();
                let l = listener.start();
                store
                    .send(SetTopicListeners(vec![TopicListener {
                        floor_moved: l.clone().recipient(),
                        removed: l.recipient(),
                    }]))
                    .await
                    .unwrap();
                let body = vec![7u8; 1000];
                for _ in 0..15 {
                    let many: Vec<&[u8]> = (0..20).map(|_| &body[..]).collect();
                    store.send(publish("t", &many)).await.unwrap().unwrap();
                }
                assert!(seg_files(&topic_dir) >= 4, "{policy}");
                let alter = CreateTopic {
                    topic: "t".into(),
                    settings: sluice_protocol::TopicSettings {
                        max_bytes: Some(64 * 1024),
                        ..Default::default()
                    },
                    alter: true,
                };
                let info = store.send(alter).await.unwrap().unwrap();
                assert_eq!(info.settings.max_bytes, Some(64 * 1024));
                assert!(
                    until(|| !floors.lock().unwrap().is_empty()).await,
                    "{policy}: FloorMoved"
                );
                let (topic, floor) = floors.lock().unwrap()[0].clone();
                assert_eq!(topic, "t");
                assert!(floor > 1, "{policy}: {floor}");
                assert!(seg_files(&topic_dir) <= 2, "{policy}: files unlinked");
                let read = ReadRange {
                    topic: "t".into(),
                    from: 1,
                    max: 1,
                    max_bytes: 1 << 20,
                };
                let r = store.send(read).await.unwrap().unwrap();
                assert!(r.floor >= floor, "{policy}");
                assert_eq!(
                    r.messages[0].seq, r.floor,
                    "{policy}: reads start at the floor"
                );
                let mut removed = None;
                while let Ok(e) = events.try_recv() {
                    if e.kind == sluice_protocol::event_kind::RETENTION_REMOVED {
                        removed = Some(e);
                        break;
                    }
                }
                let e = removed.expect("retention_removed event");
                assert_eq!(
                    (e.topic.as_deref(), e.seq, e.count, e.detail.as_deref()),
                    (Some("t"), Some(floor), Some(floor - 1), Some("max_bytes"))
                );
            });
        }
    }

    #[test]
    fn deleted_groups_and_topics_are_gone_and_said_so() {
        use super::super::messages::{
            DeleteGroupRecord, DeleteTopic, GetTopicInfo, SetTopicListeners, TopicListener,
        };
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        let bus = crate::events::EventBus::default();
        let mut events = bus.subscribe();
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always)
                .with_config(Arc::new(crate::config::Config::default()), bus)
                .start();
            let listener = Listener::default();
            let removed = listener.removed.clone();
            let l = listener.start();
            store
                .send(SetTopicListeners(vec![TopicListener {
                    floor_moved: l.clone().recipient(),
                    removed: l.recipient(),
                }]))
                .await
                .unwrap();
            store.send(publish("t", &[b"a"])).await.unwrap().unwrap();
            let record = GroupRecord {
                mode: sluice_protocol::GroupMode::Shared,
                filters: Default::default(),
                acked_floor: 1,
                acked_above: Vec::new(),
                acked_ranges: Vec::new(),
                created_ms: now_ms(),
                backoff_ms: vec![],
                attempts: vec![],
            };
            let commit = CommitGroup {
                topic: "t".into(),
                group: "g".into(),
                record,
            };
            store.send(commit).await.unwrap().unwrap();
            let del = || DeleteGroupRecord {
                topic: "t".into(),
                group: "g".into(),
            };
            assert!(store.send(del()).await.unwrap().unwrap());
            assert!(!store.send(del()).await.unwrap().unwrap(), "gone already");
            let load = LoadGroup {
                topic: "t".into(),
                group: "g".into(),
            };
            assert_eq!(store.send(load).await.unwrap().unwrap(), (None, 1));

            let d = store
                .send(DeleteTopic { topic: "t".into() })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.messages, 1);
            assert!(until(|| removed.lock().unwrap().as_slice() == ["t"]).await);
            let info = GetTopicInfo {
                topic: Some("t".into()),
            };
            assert!(store.send(info).await.unwrap().unwrap().is_empty());
            let mut kinds = Vec::new();
            while let Ok(e) = events.try_recv() {
                kinds.push(e.kind.clone());
            }
            assert_eq!(
                kinds,
                vec![
                    sluice_protocol::event_kind::TOPIC_CREATED,
                    sluice_protocol::event_kind::TOPIC_DELETED
                ]
            );
        });
    }

    fn group_record(acked_floor: u64, created_ms: u64) -> GroupRecord {
        GroupRecord {
            mode: sluice_protocol::GroupMode::Shared,
            filters: Default::default(),
            acked_floor,
            acked_above: Vec::new(),
            acked_ranges: Vec::new(),
            created_ms,
            backoff_ms: vec![],
            attempts: vec![],
        }
    }

    /// An orchestrator shard busy with an ack of `t`/`g` queued ahead of `TopicRemoved`: its
    /// group record reaches the store only as the shard gets to the removal.
    struct BusyShard {
        store: Recipient<CommitGroup>,
        sent: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Actor for BusyShard {
        type Context = Context<Self>;
    }

    impl Handler<super::super::messages::FloorMoved> for BusyShard {
        type Result = ();
        fn handle(&mut self, _: super::super::messages::FloorMoved, _: &mut Context<Self>) {}
    }

    impl Handler<super::super::messages::TopicRemoved> for BusyShard {
        type Result = ();
        fn handle(&mut self, m: super::super::messages::TopicRemoved, _: &mut Context<Self>) {
            // Busy: the ack ahead takes a while, then commits the group's cursor.
            std::thread::sleep(std::time::Duration::from_millis(300));
            self.store.do_send(CommitGroup {
                topic: m.topic,
                group: "g".into(),
                record: group_record(2, 1),
            });
            self.sent.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn an_ack_racing_a_topics_deletion_never_lands_in_the_topic_made_again() {
        use super::super::messages::{DeleteTopic, SetTopicListeners, TopicListener};
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always)
                .with_config(
                    Arc::new(crate::config::Config::default()),
                    crate::events::EventBus::default(),
                )
                .start();
            let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let shard = BusyShard {
                store: store.clone().recipient(),
                sent: sent.clone(),
            };
            // A thread of its own, as an orchestrator shard has.
            let arbiter = actix::Arbiter::new();
            let shard = BusyShard::start_in_arbiter(&arbiter.handle(), |_| shard);
            store
                .send(SetTopicListeners(vec![TopicListener {
                    floor_moved: shard.clone().recipient(),
                    removed: shard.recipient(),
                }]))
                .await
                .unwrap();
            store
                .send(publish("t", &[b"a", b"b"]))
                .await
                .unwrap()
                .unwrap();
            let commit = |rec| CommitGroup {
                topic: "t".into(),
                group: "g".into(),
                record: rec,
            };
            store
                .send(commit(group_record(0, 1)))
                .await
                .unwrap()
                .unwrap();
            store
                .send(commit(group_record(1, 1)))
                .await
                .unwrap()
                .unwrap();
            store
                .send(DeleteTopic { topic: "t".into() })
                .await
                .unwrap()
                .unwrap();
            // The client makes the topic again at once.
            assert_eq!(
                store.send(publish("t", &[b"new"])).await.unwrap().unwrap(),
                Appended::stored(1, 1)
            );
            assert!(until(|| sent.load(std::sync::atomic::Ordering::SeqCst)).await);
            // Whatever the store made of the old cursor, it has it now.
            let _ = store.send(GetSyncStats).await.unwrap();
            let load = LoadGroup {
                topic: "t".into(),
                group: "g".into(),
            };
            assert_eq!(
                store.send(load).await.unwrap().unwrap(),
                (None, 1),
                "the deleted topic's group is not in the new one"
            );
            arbiter.stop();
        });
    }

    #[test]
    fn a_group_record_of_a_deleted_topic_is_refused_by_the_topic_made_again() {
        use super::super::messages::DeleteTopic;
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 1 << 20).unwrap();
        actix_rt::System::new().block_on(async move {
            // No orchestrator told: nothing orders the old records before the answer.
            let store = StoreActor::new(storage, FsyncPolicy::Always).start();
            let commit = |group: &str, rec| CommitGroup {
                topic: "t".into(),
                group: group.into(),
                record: rec,
            };
            store
                .send(publish("t", &[b"a", b"b"]))
                .await
                .unwrap()
                .unwrap();
            store
                .send(commit("g", group_record(0, 1)))
                .await
                .unwrap()
                .unwrap();
            store
                .send(commit("g", group_record(1, 1)))
                .await
                .unwrap()
                .unwrap();
            store
                .send(DeleteTopic { topic: "t".into() })
                .await
                .unwrap()
                .unwrap();
            // A record with acks for the topic while it does not exist, even with a publish
            // making it again queued ahead in the same commit.
            let again = store.send(publish("t", &[b"new"]));
            let old = store.send(commit("g", group_record(2, 1)));
            assert_eq!(again.await.unwrap().unwrap(), Appended::stored(1, 1));
            assert!(matches!(
                old.await.unwrap(),
                Err(StoreError::UnknownTopic(_))
            ));
            // Once it exists: the old group's record is refused; records of groups created
            // since, or fresh ones, are not.
            assert!(matches!(
                store.send(commit("g", group_record(2, 1))).await.unwrap(),
                Err(StoreError::UnknownTopic(_))
            ));
            let now = now_ms();
            store
                .send(commit("h", group_record(0, 1)))
                .await
                .unwrap()
                .unwrap();
            store
                .send(commit("k", group_record(1, now + 1000)))
                .await
                .unwrap()
                .unwrap();
            // A group of the new topic keeps its records coming.
            store
                .send(commit("h", group_record(1, 1)))
                .await
                .unwrap()
                .unwrap();
            let load = |group: &str| LoadGroup {
                topic: "t".into(),
                group: group.into(),
            };
            assert_eq!(store.send(load("g")).await.unwrap().unwrap(), (None, 1));
            let (h, _) = store.send(load("h")).await.unwrap().unwrap();
            assert_eq!(h.map(|r| r.acked_floor), Some(1));
            let (k, _) = store.send(load("k")).await.unwrap().unwrap();
            assert_eq!(k.map(|r| r.acked_floor), Some(1));
        });
    }

    #[test]
    fn a_group_record_not_yet_written_keeps_what_it_goes_back_to() {
        use super::super::messages::CreateTopic;
        let dir = tempfile::tempdir().unwrap();
        let mut storage = Storage::open(dir.path(), 1 << 20).unwrap();
        storage.set_segment_bytes(64 * 1024);
        let config = crate::config::Config {
            retention_interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        actix_rt::System::new().block_on(async move {
            let store = StoreActor::new(storage, FsyncPolicy::Always)
                .with_config(Arc::new(config), crate::events::EventBus::default())
                .start();
            let body = vec![7u8; 1000];
            for _ in 0..15 {
                let many: Vec<&[u8]> = (0..20).map(|_| &body[..]).collect();
                store.send(publish("t", &many)).await.unwrap().unwrap();
            }
            let commit = |acked_floor| CommitGroup {
                topic: "t".into(),
                group: "g".into(),
                record: group_record(acked_floor, now_ms()),
            };
            store.send(commit(0)).await.unwrap().unwrap();
            store.send(commit(300)).await.unwrap().unwrap();
            let acked = CreateTopic {
                topic: "t".into(),
                settings: sluice_protocol::TopicSettings {
                    discard: Some(sluice_protocol::Discard::Acked),
                    ..Default::default()
                },
                alter: true,
            };
            store.send(acked).await.unwrap().unwrap();
            // The group goes back to the start (a seek): its record is queued when the sweep
            // runs.
            let back = store.send(commit(0));
            store.send(topics::SweepNow).await.unwrap();
            back.await.unwrap().unwrap();
            let read = ReadRange {
                topic: "t".into(),
                from: 1,
                max: 1,
                max_bytes: 1 << 20,
            };
            let r = store.send(read).await.unwrap().unwrap();
            assert_eq!(
                r.messages.first().map(|m| m.seq),
                Some(1),
                "what the group went back to is kept"
            );
            // Once written, the record is what counts: the group still needs everything.
            store.send(topics::SweepNow).await.unwrap();
            let read = ReadRange {
                topic: "t".into(),
                from: 1,
                max: 1,
                max_bytes: 1 << 20,
            };
            let r = store.send(read).await.unwrap().unwrap();
            assert_eq!(r.messages.first().map(|m| m.seq), Some(1));
        });
    }
}
