//! Sluice through its SDK: W1-W5 via the shared workload code, W6 (idle connections) and W7
//! (recovery time) here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Map, Value};
use sluice_sdk::{
    Admin, ClientConfig, Consumer, ConsumerConfig, NewMessage, Producer, ProducerOptions, SyncStats,
};
use tokio::sync::{oneshot, Semaphore};

use crate::broker::Broker;
use crate::opts::Opts;
use crate::sys;
use crate::workload::{make_payload, now_ns, pump, BoxFut, Group, Pumped, Target};

pub struct Sluice {
    pub addr: String,
    pub topic: String,
    /// The broker's sync stats before the run (see [`sync_fields`]).
    syncs_before: std::sync::Mutex<Option<SyncStats>>,
}

impl Sluice {
    pub fn new(addr: String, o: &Opts) -> Sluice {
        // A topic of its own per run, so that a shared broker (--addr) starts empty for us too.
        let topic = format!("bench.{}.{}.{}", o.workload, std::process::id(), now_ns());
        Sluice {
            addr,
            topic,
            syncs_before: std::sync::Mutex::new(None),
        }
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
    fn setup(self: Arc<Self>, _o: Opts) -> BoxFut<()> {
        // Topics and groups are created on first use. The broker's syncs so far, to count
        // the run's own at the end.
        Box::pin(async move {
            let stats = Admin::connect(self.client("admin")).await?.stats().await?;
            *self.syncs_before.lock().unwrap_or_else(|p| p.into_inner()) = stats.syncs;
            Ok(())
        })
    }

    fn produce(self: Arc<Self>, o: Opts) -> BoxFut<Pumped> {
        Box::pin(async move {
            let producer =
                Producer::connect_with(self.client("producer"), producer_options(&o)).await?;
            let topic = self.topic.clone();
            let size = o.size;
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
            let cfg = ConsumerConfig::new(
                self.client(&format!("g{}c{c}", g.index)),
                self.topic.clone(),
                format!("g{}", g.index),
            )
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
            let stats = Admin::connect(self.client("admin")).await?.stats().await?;
            let mut m = Map::new();
            m.insert("fsync".into(), json!(stats.fsync));
            m.insert("broker_version".into(), json!(stats.version));
            let before = self
                .syncs_before
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let (Some(after), Some(before)) = (&stats.syncs, &before) {
                m.extend(sync_fields(&after.since(before)));
            }
            let p = producer_options(&o);
            m.insert(
                "producer".into(),
                json!({
                    "preserve_order": p.preserve_order,
                    "max_in_flight_requests": p.max_in_flight_requests,
                    "max_batch_messages": p.max_batch_messages,
                    "max_batch_bytes": p.max_batch_bytes,
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
    o: &Opts,
) -> Result<(Broker, Map<String, Value>)> {
    let t0 = Instant::now();
    let bin = bin.to_path_buf();
    let (data, logp, fsync, extra) = (
        data_dir.to_path_buf(),
        log.to_path_buf(),
        o.fsync.clone(),
        o.server_args.clone(),
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
