//! Sluice through its SDK: W1-W5 via the shared workload code, W6 (idle connections) and W7
//! (recovery time) here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Map, Value};
use sluice_sdk::protocol::TopicSettings;
use sluice_sdk::{
    Admin, ClientConfig, Consumer, ConsumerConfig, GroupMode, NewMessage, Producer,
    ProducerOptions, SyncStats,
};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::opts::Opts;
use crate::sys;
use crate::workload::{make_payload, now_ns, pump, BoxFut, Group, Pumped, Target, Window};

pub struct Sluice {
    pub addr: String,
    pub topic: String,
    /// The broker's data directory, when this process started the broker (for `du`).
    data_dir: Option<PathBuf>,
    /// The broker's sync stats before the run (see [`sync_fields`]).
    syncs_before: Mutex<Option<SyncStats>>,
    /// `--sweep-gib`: the filled topic's size before the run, and the task watching it go.
    sweep: Mutex<SweepState>,
}

#[derive(Default)]
struct SweepState {
    fill: Map<String, Value>,
    watcher: Option<JoinHandle<Result<Swept>>>,
    windows: Vec<Window>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sluice {
    pub fn new(addr: String, o: &Opts) -> Sluice {
        // A topic of its own per run, so that a shared broker (--addr) starts empty for us too.
        let topic = format!("bench.{}.{}.{}", o.workload, std::process::id(), now_ns());
        Sluice {
            addr,
            topic,
            data_dir: None,
            syncs_before: Mutex::new(None),
            sweep: Mutex::new(SweepState::default()),
        }
    }

    /// The data directory of the broker under test (lets the sweep watcher measure `du`).
    pub fn with_data_dir(mut self, dir: Option<PathBuf>) -> Sluice {
        self.data_dir = dir;
        self
    }

    fn sweep_topic(&self) -> String {
        format!("{}.sweep", self.topic)
    }

    fn client(&self, who: &str) -> ClientConfig {
        ClientConfig::new(self.addr.clone())
            .client_id(format!("sluice-bench-{who}"))
            .request_timeout(Duration::from_secs(60))
    }
}

pub fn producer_options(o: &Opts) -> ProducerOptions {
    ProducerOptions {
        preserve_order: o.preserve_order,
        max_in_flight_requests: o.max_in_flight_requests,
        max_batch_messages: o.max_batch_messages,
        // room for the whole window of the pump (and more), so publish never waits to queue
        queue_capacity: (o.inflight * 2).max(ProducerOptions::default().queue_capacity),
        // `--ids`: an id on every message (the SDK's default) or none (a broker before ids)
        idempotent: o.ids,
        ..ProducerOptions::default()
    }
}

async fn wait_connected(c: &Consumer, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !c.is_connected() {
        if Instant::now() > deadline {
            bail!("consumer not subscribed after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

impl Target for Sluice {
    fn setup(self: Arc<Self>, o: Opts) -> BoxFut<()> {
        // Topics and groups are created on first use (with --sweep-gib, the run's topic is
        // created first, so that it gets the broker's preallocated segment as without).
        // The broker's syncs so far, to count the run's own at the end.
        Box::pin(async move {
            let admin = Admin::connect(self.client("admin")).await?;
            if o.sweep_gib > 0.0 {
                admin
                    .create_topic(self.topic.clone(), TopicSettings::default())
                    .await
                    .context("creating the run's topic")?;
                let fill = fill_sweep_topic(&self, &admin, &o).await?;
                lock(&self.sweep).fill = fill;
            }
            let stats = admin.stats().await?;
            *lock(&self.syncs_before) = stats.syncs;
            Ok(())
        })
    }

    fn produce(self: Arc<Self>, o: Opts) -> BoxFut<Pumped> {
        Box::pin(async move {
            let producer =
                Producer::connect_with(self.client("producer"), producer_options(&o)).await?;
            let topic = self.topic.clone();
            let size = o.size;
            if o.sweep_gib > 0.0 {
                let watcher = tokio::spawn(watch_sweep(self.clone(), o.clone(), now_ns()));
                lock(&self.sweep).watcher = Some(watcher);
            }
            pump(o.n, o.inflight, o.rate, o.progress, move |ix| {
                let message = NewMessage {
                    payload: Bytes::from(make_payload(size, ix)),
                    ..Default::default()
                };
                let f = producer.publish(topic.clone(), message);
                async move {
                    f.await?;
                    Ok(())
                }
            })
            .await
        })
    }

    fn consume(
        self: Arc<Self>,
        o: Opts,
        g: Arc<Group>,
        c: usize,
        ready: oneshot::Sender<()>,
    ) -> BoxFut<u64> {
        Box::pin(async move {
            let mode = if o.broadcast() {
                GroupMode::Broadcast
            } else {
                GroupMode::Shared
            };
            let cfg = ConsumerConfig::new(
                self.client(&format!("r{}c{c}", g.index)),
                self.topic.clone(),
                g.name.clone(),
            )
            .mode(mode)
            .window(o.window)
            .batch_size(o.batch_size);
            let mut consumer = Consumer::subscribe(cfg).await?;
            wait_connected(&consumer, Duration::from_secs(30)).await?;
            let _ = ready.send(());
            // Until the group has every message: ours, or another consumer's of the group.
            let done = g.wait_done();
            tokio::pin!(done);
            loop {
                tokio::select! {
                    biased;
                    m = consumer.next() => match m {
                        Some(Ok(m)) => {
                            let last = g.on_msg(m.payload())?;
                            consumer.ack(&m)?;
                            if last {
                                break;
                            }
                        }
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("consumer stopped"),
                    },
                    _ = &mut done => break,
                }
            }
            consumer.flush_acks().await?;
            let last_ack = now_ns();
            Ok(last_ack)
        })
    }

    fn describe(self: Arc<Self>, o: Opts) -> BoxFut<Map<String, Value>> {
        Box::pin(async move {
            let admin = Admin::connect(self.client("admin")).await?;
            let stats = admin.stats().await?;
            let mut m = Map::new();
            m.insert("fsync".into(), json!(stats.fsync));
            m.insert("broker_version".into(), json!(stats.version));
            let before = lock(&self.syncs_before).take();
            if let (Some(after), Some(before)) = (&stats.syncs, &before) {
                m.extend(sync_fields(&after.since(before)));
            }
            // Ids: what the producer was told, and how many ids the broker remembers now
            // (every message's when they were on; 0 from a broker without dedup).
            m.insert("ids".into(), json!(o.ids));
            m.insert(
                "server_dedup_ids".into(),
                json!(stats.syncs.as_ref().map(|s| s.dedup_ids)),
            );
            if o.broker_config().is_some() {
                // The retention the broker was started with, and what the topic got from it.
                let info = admin.topic_info(self.topic.clone()).await?;
                m.insert("retention_interval".into(), json!(o.retention_interval));
                m.insert("retention_max_age".into(), json!(o.retention_max_age));
                m.insert("topic_max_age_ms".into(), json!(info.settings.max_age_ms));
                m.insert("topic_floor_seq".into(), json!(info.floor_seq));
            }
            if o.sweep_gib > 0.0 {
                m.extend(self.sweep_fields().await);
            }
            let p = producer_options(&o);
            m.insert(
                "producer".into(),
                json!({
                    "preserve_order": p.preserve_order,
                    "max_in_flight_requests": p.max_in_flight_requests,
                    "max_batch_messages": p.max_batch_messages,
                    "max_batch_bytes": p.max_batch_bytes,
                    "idempotent": p.idempotent,
                }),
            );
            if o.groups > 0 {
                m.insert(
                    "consumer".into(),
                    json!({"window": o.window, "batch_size_asked": o.batch_size}),
                );
                let redeliveries: u64 = stats
                    .groups
                    .iter()
                    .filter(|g| g.topic == self.topic)
                    .map(|g| g.redeliveries)
                    .sum();
                m.insert("redeliveries".into(), json!(redeliveries));
            }
            Ok(m)
        })
    }

    fn windows(&self) -> Vec<Window> {
        std::mem::take(&mut lock(&self.sweep).windows)
    }
}

/// The broker's syncs during the run: how many, how long, and how many took over 2 ms and
/// how long those took in all (the disk's stalls, which every publish waiting on them shares).
fn sync_fields(s: &SyncStats) -> Map<String, Value> {
    let (slow, slow_us) = s.over(2_000);
    let mut m = Map::new();
    m.insert("server_syncs".into(), json!(s.count));
    m.insert(
        "server_sync_mean_us".into(),
        json!((s.total_us as f64 / s.count.max(1) as f64).round()),
    );
    m.insert(
        "server_sync_p99_le_us".into(),
        json!(s.percentile_bound(99.0)),
    );
    m.insert("server_sync_max_us".into(), json!(s.max_us));
    m.insert("server_syncs_over_2ms".into(), json!(slow));
    m.insert(
        "server_sync_over_2ms_ms".into(),
        json!(slow_us as f64 / 1000.0),
    );
    m
}

/// W6: `o.n` consumers, each on its own connection, subscribed to one topic in `o.groups`
/// groups and left idle; broker RSS per connection = (RSS with all of them - RSS before) / n.
pub async fn run_w6(addr: &str, o: &Opts, server_pid: Option<u32>) -> Result<Value> {
    let spid = server_pid
        .map(|p| p.to_string())
        .ok_or_else(|| anyhow!("w6 needs the broker's PID (start it here or pass --server-pid)"))?;
    let target = Sluice::new(addr.to_string(), o);
    let admin = Admin::connect(target.client("admin")).await?;
    admin.stats().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = sys::status_kb(&spid, "VmRSS").ok_or_else(|| anyhow!("no VmRSS"))?;
    let cpu0 = sys::cpu_s(&spid);
    let cli_cpu0 = sys::cpu_s("self");
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(128)); // connects in flight at once
    let mut opening = FuturesUnordered::new();
    for i in 0..o.n {
        let gate = gate.clone();
        let cfg = ConsumerConfig::new(
            target.client(&format!("idle{i}")),
            target.topic.clone(),
            format!("g{}", i as usize % o.groups),
        )
        .window(o.window)
        .batch_size(o.batch_size);
        opening.push(async move {
            let _permit = gate.acquire().await.map_err(|e| anyhow!("{e}"))?;
            let c = Consumer::subscribe(cfg).await?;
            wait_connected(&c, Duration::from_secs(60)).await?;
            anyhow::Ok(c)
        });
    }
    let mut consumers = Vec::with_capacity(o.n as usize);
    let mut next_report = Instant::now() + Duration::from_secs(1);
    while let Some(c) = opening.next().await {
        consumers.push(c.with_context(|| format!("opening consumer {}", consumers.len()))?);
        if o.progress && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!("  {} / {} consumers subscribed", consumers.len(), o.n);
        }
    }
    let open_s = started.elapsed().as_secs_f64();
    // Let the broker finish the subscriptions' bookkeeping, then check every one is there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = admin.stats().await?;
    let connected = stats
        .connections
        .iter()
        .filter(|c| c.groups.iter().any(|g| g.starts_with(&target.topic)))
        .count();
    let rss1 = sys::status_kb(&spid, "VmRSS").ok_or_else(|| anyhow!("no VmRSS"))?;
    let hwm = sys::status_kb(&spid, "VmHWM");
    let cpu = sys::cpu_s(&spid).zip(cpu0).map(|(b, a)| b - a);
    let cli_cpu = sys::cpu_s("self").zip(cli_cpu0).map(|(b, a)| b - a);
    let fsync = stats.fsync.clone();
    drop(consumers);
    let per_conn = (rss1 as f64 - rss0 as f64) / o.n as f64;
    Ok(json!({
        "peer": "sluice", "workload": "w6", "round": o.round, "label": o.label,
        "n": o.n, "groups": o.groups, "window": o.window, "fsync": fsync,
        "connections_subscribed": connected,
        "open_s": open_s,
        "server_rss_idle_kb": rss0,
        "server_rss_loaded_kb": rss1,
        "rss_per_conn_kb": per_conn,
        "server_vmhwm_kb": hwm,
        "server_cpu_s": cpu,
        "client_cpu_s": cli_cpu,
        "server_pid": server_pid,
        "loadavg1_before": sys::loadavg1(),
    }))
}

/// W7 fill: `o.n` messages of `o.size` bytes in batches of `o.fill_batch`, `o.inflight`
/// batches in flight. Returns (seconds, messages/s).
pub async fn fill(addr: &str, topic: &str, o: &Opts) -> Result<(f64, f64)> {
    let options = ProducerOptions {
        preserve_order: false,
        max_in_flight_requests: o.inflight,
        max_batch_messages: o.fill_batch.max(1),
        max_batch_bytes: (o.fill_batch * (o.size + 64)).max(1 << 20),
        idempotent: o.ids,
        ..ProducerOptions::default()
    };
    let cfg = ClientConfig::new(addr.to_string())
        .client_id("sluice-bench-fill")
        .request_timeout(Duration::from_secs(120));
    let producer = Producer::connect_with(cfg, options).await?;
    let mut body = vec![0xABu8; o.size];
    body[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let body = Bytes::from(body);
    let batches = o.n.div_ceil(o.fill_batch as u64);
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let (mut sent, mut done) = (0u64, 0u64);
    let mut next_report = Instant::now() + Duration::from_secs(2);
    while done < batches {
        while sent < batches && in_flight.len() < o.inflight {
            let count = (o.n - sent * o.fill_batch as u64).min(o.fill_batch as u64);
            let messages = (0..count)
                .map(|_| NewMessage {
                    payload: body.clone(),
                    ..Default::default()
                })
                .collect();
            in_flight.push(producer.publish_batch(topic.to_string(), messages));
            sent += 1;
        }
        if let Some(r) = in_flight.next().await {
            r.context("publishing a fill batch")?;
            done += 1;
        }
        if o.progress && Instant::now() >= next_report {
            next_report += Duration::from_secs(2);
            let msgs = (done * o.fill_batch as u64).min(o.n);
            eprintln!(
                "  filled {msgs}/{} ({:.0} msg/s)",
                o.n,
                msgs as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((secs, o.n as f64 / secs))
}

/// W7 restart: starts the broker on `data_dir` and times listening line and first successful
/// request (admin stats), then the first delivery to a new group.
pub async fn time_restart(
    bin: &std::path::Path,
    data_dir: &std::path::Path,
    log: &std::path::Path,
    topic: &str,
    extra: &[String],
    o: &Opts,
) -> Result<(Broker, Map<String, Value>)> {
    let t0 = Instant::now();
    let bin = bin.to_path_buf();
    let (data, logp, fsync, extra) = (
        data_dir.to_path_buf(),
        log.to_path_buf(),
        o.fsync.clone(),
        extra.to_vec(),
    );
    let broker = tokio::task::spawn_blocking(move || {
        Broker::start(&bin, &data, &logp, &fsync, &extra, Duration::from_secs(600))
    })
    .await??;
    let listen_s = broker.listening_after.as_secs_f64();
    let cfg = ClientConfig::new(broker.addr.clone()).client_id("sluice-bench-ready");
    let (stats, attempts) = {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let r = async { Admin::connect(cfg.clone()).await?.stats().await }.await;
            match r {
                Ok(s) => break (s, attempts),
                Err(e) if t0.elapsed() < Duration::from_secs(600) => {
                    tracing_like(o, &format!("  not ready yet: {e}"));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    // time from spawn, as seen from spawn (broker.spawned_at is just before t0's spawn call)
    let ready_s = broker.spawned_at.elapsed().as_secs_f64();
    let ready_cpu = sys::cpu_s(&broker.pid_str());
    let ready_hwm = sys::status_kb(&broker.pid_str(), "VmHWM");
    // First delivery from a new group: the stored messages are really there.
    let consumer = ConsumerConfig::new(cfg.clone(), topic.to_string(), "verify")
        .window(1)
        .batch_size(1);
    let mut consumer = Consumer::subscribe(consumer).await?;
    let first = consumer
        .next()
        .await
        .ok_or_else(|| anyhow!("no message after restart"))??;
    let first_msg_s = broker.spawned_at.elapsed().as_secs_f64();
    drop(consumer);
    let head = Admin::connect(cfg)
        .await?
        .stats()
        .await?
        .groups
        .iter()
        .filter(|g| g.topic == topic)
        .map(|g| g.head_seq)
        .max()
        .unwrap_or(0);
    let mut m = Map::new();
    m.insert("listen_s".into(), json!(listen_s));
    m.insert("ready_s".into(), json!(ready_s));
    m.insert("ready_attempts".into(), json!(attempts));
    m.insert("first_msg_s".into(), json!(first_msg_s));
    m.insert("first_seq".into(), json!(first.seq()));
    m.insert("head_seq_after_restart".into(), json!(head));
    m.insert("restart_server_cpu_s".into(), json!(ready_cpu));
    m.insert("restart_vmhwm_kb".into(), json!(ready_hwm));
    m.insert("fsync".into(), json!(stats.fsync));
    Ok((broker, m))
}

fn tracing_like(o: &Opts, line: &str) {
    if o.progress {
        eprintln!("{line}");
    }
}

/// `--sweep-gib`: fills the run's second topic with `o.sweep_gib` GiB of 1 MiB messages (as W5
/// does, 32 in flight) before the clock starts. Returns the fill's figures for the line.
async fn fill_sweep_topic(s: &Sluice, admin: &Admin, o: &Opts) -> Result<Map<String, Value>> {
    let mut f = o.clone();
    f.n = (o.sweep_gib * 1024.0).ceil().max(1.0) as u64;
    f.size = 1 << 20;
    f.inflight = 32;
    f.fill_batch = 1;
    let topic = s.sweep_topic();
    let (secs, _) = fill(&s.addr, &topic, &f)
        .await
        .context("filling the sweep topic")?;
    // Let the broker finish what the fill started (the next spare segment after its last
    // roll is made in the background) before the clock starts.
    tokio::time::sleep(SWEEP_SETTLE).await;
    let info = admin.topic_info(topic.clone()).await?;
    let du = s.topic_dir(&topic).map(|d| sys::dir_bytes(&d));
    if o.progress {
        eprintln!(
            "  sweep topic: {} MB in {} segments, filled in {secs:.1} s",
            info.bytes / 1_000_000,
            info.segments
        );
    }
    let mut m = Map::new();
    m.insert("sweep_gib".into(), json!(o.sweep_gib));
    m.insert("sweep_after_s".into(), json!(o.sweep_after_s));
    m.insert("sweep_fill_s".into(), json!(secs));
    m.insert(
        "sweep_fill_mb_s".into(),
        json!(f.n as f64 * f.size as f64 / secs / 1e6),
    );
    m.insert("sweep_bytes_before".into(), json!(info.bytes));
    m.insert("sweep_segments_before".into(), json!(info.segments));
    m.insert("sweep_du_before".into(), json!(du));
    Ok(m)
}

/// What the sweep watcher saw ([`now_ns`] instants).
struct Swept {
    /// The timed phase's start (just before the first publish).
    t0: u64,
    /// When the sweep topic's `max_age` was cut to 1 s.
    cut: u64,
    /// The last poll that still saw the old floor: the sweep took the segments out after it.
    quiet: u64,
    /// The first poll that saw the floor moved (the segments out of the topic's log).
    detached: Option<u64>,
    /// The first poll at which `du` of the topic's directory and the trash had dropped by 90%
    /// of the bytes taken out (the blocks freed); None without the data dir (broker not
    /// started here).
    unlinked: Option<u64>,
    before: sluice_sdk::protocol::TopicInfo,
    after: sluice_sdk::protocol::TopicInfo,
    du_before: Option<u64>,
    du_after: Option<u64>,
}

/// The pause between the sweep topic's fill and the timed phase.
const SWEEP_SETTLE: Duration = Duration::from_secs(2);
/// Poll period of the sweep watcher (`topic.info` is one small request to the store actor).
const SWEEP_POLL: Duration = Duration::from_millis(50);
/// How long the watcher waits for the sweep after the cut.
const SWEEP_WAIT: Duration = Duration::from_secs(60);

/// `--sweep-after` seconds after `t0` (the timed phase's start), sets the sweep topic's
/// `max_age` to 1 s, so that the broker's next retention sweep removes all of it, and polls
/// the topic (floor) and its directory (`du`) until both show the removal.
async fn watch_sweep(s: Arc<Sluice>, o: Opts, t0: u64) -> Result<Swept> {
    let topic = s.sweep_topic();
    let admin = Admin::connect(s.client("sweep")).await?;
    let due = t0 + (o.sweep_after_s * 1e9) as u64;
    tokio::time::sleep(Duration::from_nanos(due.saturating_sub(now_ns()))).await;
    let before = admin.topic_info(topic.clone()).await?;
    let dir = s.topic_dir(&topic);
    // The topic's files and the trash: a broker that moves removed segments into the trash
    // and frees them later (in steps) has freed them only once both shrank.
    let trash = s.data_dir.as_ref().map(|d| d.join("trash"));
    let du_of =
        |d: &std::path::Path| sys::dir_bytes(d) + trash.as_deref().map_or(0, sys::dir_bytes);
    let du_before = dir.as_deref().map(du_of);
    let cut = now_ns();
    let one_second = TopicSettings {
        max_age_ms: Some(1000),
        ..TopicSettings::default()
    };
    admin
        .alter_topic(topic.clone(), one_second)
        .await
        .context("cutting the sweep topic's max_age")?;
    let (mut quiet, mut detached, mut unlinked) = (cut, None, None);
    let mut after = before.clone();
    let mut du_after = du_before;
    let deadline = Instant::now() + SWEEP_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(SWEEP_POLL).await;
        let t = now_ns();
        let info = admin.topic_info(topic.clone()).await?;
        if detached.is_none() {
            if info.floor_seq > before.floor_seq {
                detached = Some(t);
            } else {
                quiet = t;
            }
        }
        let taken = before.bytes.saturating_sub(info.bytes);
        after = info;
        if let (Some(d), Some(b0)) = (dir.as_deref(), du_before) {
            let du = du_of(d);
            du_after = Some(du);
            if unlinked.is_none() && detached.is_some() && b0.saturating_sub(du) >= taken / 10 * 9 {
                unlinked = Some(t);
            }
        }
        if detached.is_some() && (unlinked.is_some() || dir.is_none()) {
            break;
        }
    }
    Ok(Swept {
        t0,
        cut,
        quiet,
        detached,
        unlinked,
        before,
        after,
        du_before,
        du_after,
    })
}

impl Sluice {
    /// A topic's directory in the broker's data dir, when this process started the broker.
    fn topic_dir(&self, topic: &str) -> Option<PathBuf> {
        self.data_dir.as_ref().map(|d| d.join("topics").join(topic))
    }

    /// The sweep's fields for the line (times in seconds from the timed phase's start), and
    /// its latency window: from the last poll before the removal to 0.5 s after it was seen
    /// complete.
    async fn sweep_fields(&self) -> Map<String, Value> {
        let (mut m, watcher) = {
            let mut st = lock(&self.sweep);
            (std::mem::take(&mut st.fill), st.watcher.take())
        };
        let swept = match watcher {
            None => Err(anyhow!("the sweep watcher never started")),
            Some(h) => match tokio::time::timeout(SWEEP_WAIT * 2, h).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(anyhow!("sweep watcher: {e}")),
                Err(_) => Err(anyhow!("sweep watcher did not finish")),
            },
        };
        let w = match swept {
            Ok(w) => w,
            Err(e) => {
                m.insert("sweep_error".into(), json!(format!("{e:#}")));
                return m;
            }
        };
        let rel = |t: u64| json!(t.saturating_sub(w.t0) as f64 / 1e9);
        m.insert("sweep_cut_s".into(), rel(w.cut));
        m.insert("sweep_quiet_s".into(), rel(w.quiet));
        m.insert(
            "sweep_detached_s".into(),
            w.detached.map_or(Value::Null, rel),
        );
        m.insert(
            "sweep_unlinked_s".into(),
            w.unlinked.map_or(Value::Null, rel),
        );
        m.insert(
            "sweep_removed_bytes".into(),
            json!(w.before.bytes.saturating_sub(w.after.bytes)),
        );
        m.insert(
            "sweep_removed_messages".into(),
            json!(w.after.floor_seq.saturating_sub(w.before.floor_seq)),
        );
        m.insert("sweep_bytes_after".into(), json!(w.after.bytes));
        m.insert("sweep_segments_after".into(), json!(w.after.segments));
        m.insert("sweep_du_after".into(), json!(w.du_after));
        if w.du_before.is_some() {
            m.insert("sweep_du_before".into(), json!(w.du_before));
        }
        match w.unlinked.or(w.detached) {
            Some(end) => lock(&self.sweep).windows.push(Window {
                name: "sweep".into(),
                from_ns: w.quiet,
                to_ns: end + 500_000_000,
            }),
            None => {
                m.insert(
                    "sweep_error".into(),
                    json!(format!("no removal seen within {SWEEP_WAIT:?} of the cut")),
                );
            }
        }
        m
    }
}
