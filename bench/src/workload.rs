//! The workload code shared by every peer: payload layout, the publish pump, per-group receive
//! bookkeeping, and W1-W5 (one producer, G groups of C consumers each).
//!
//! Payload layout (all peers): bytes 0..8 = timestamp taken right before the send (ns since this
//! process started, little endian), bytes 8..16 = message index 0..N (counts unique deliveries
//! and duplicates), the rest filler.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, watch};

use crate::opts::Opts;
use crate::sys;

pub type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process (monotonic).
pub fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn make_payload(size: usize, index: u64) -> Vec<u8> {
    let mut p = vec![0xABu8; size];
    p[0..8].copy_from_slice(&now_ns().to_le_bytes());
    p[8..16].copy_from_slice(&index.to_le_bytes());
    p
}

pub fn parse_payload(p: &[u8]) -> Result<(u64, u64)> {
    let ts = p
        .get(0..8)
        .ok_or_else(|| anyhow!("short payload ({} bytes)", p.len()))?;
    let ix = p
        .get(8..16)
        .ok_or_else(|| anyhow!("short payload ({} bytes)", p.len()))?;
    let le = |b: &[u8]| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    };
    Ok((le(ts), le(ix)))
}

/// Unique indexes seen, duplicates and latency samples of one receiver (a group, shared by its
/// consumers; in broadcast mode one consumer).
pub struct Recv {
    n: u64,
    seen: Vec<bool>,
    pub unique: u64,
    pub dups: u64,
    pub lat_ns: Vec<u64>,
    /// When each sample of `lat_ns` was sent ([`now_ns`]), same order.
    pub sent_ns: Vec<u64>,
}

impl Recv {
    fn new(n: u64) -> Self {
        Recv {
            n,
            seen: vec![false; n as usize],
            unique: 0,
            dups: 0,
            lat_ns: Vec::with_capacity(n as usize),
            sent_ns: Vec::with_capacity(n as usize),
        }
    }

    fn on_msg(&mut self, payload: &[u8]) -> Result<()> {
        let now = now_ns();
        let (ts, ix) = parse_payload(payload)?;
        if ix >= self.n {
            bail!("message index {ix} out of range (n = {})", self.n);
        }
        if self.seen[ix as usize] {
            self.dups += 1;
        } else {
            self.seen[ix as usize] = true;
            self.unique += 1;
            self.lat_ns.push(now.saturating_sub(ts));
            self.sent_ns.push(ts);
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.unique >= self.n
    }
}

/// One receiver of every message: its receive bookkeeping and a "every message arrived"
/// signal for its consumers. In shared mode a receiver is a group (its consumers share the
/// messages); in broadcast mode each consumer of a group is a receiver of its own.
pub struct Group {
    /// The receiver's number (0..receivers), for client ids and reports.
    pub index: usize,
    /// The broker's group it consumes from (`g<group>`; several receivers share it in
    /// broadcast mode).
    pub name: String,
    recv: Mutex<Recv>,
    done: watch::Sender<bool>,
}

impl Group {
    pub fn new(index: usize, n: u64) -> Arc<Group> {
        Self::named(index, format!("g{index}"), n)
    }

    pub fn named(index: usize, name: String, n: u64) -> Arc<Group> {
        Arc::new(Group {
            index,
            name,
            recv: Mutex::new(Recv::new(n)),
            done: watch::Sender::new(false),
        })
    }

    /// Records one delivery; true once the group has every message.
    pub fn on_msg(&self, payload: &[u8]) -> Result<bool> {
        let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
        r.on_msg(payload)?;
        let done = r.done();
        drop(r);
        if done {
            self.done.send_replace(true);
        }
        Ok(done)
    }

    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Resolves once the group has every message (for consumers that did not get the last one).
    pub async fn wait_done(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    fn take(&self) -> Recv {
        let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *r, Recv::new(0))
    }
}

/// One broker under test, as the shared workload code sees it.
pub trait Target: Send + Sync + 'static {
    /// Creates what the run needs (stream, groups); called before the clock starts.
    fn setup(self: Arc<Self>, o: Opts) -> BoxFut<()>;
    /// Publishes `o.n` messages through [`pump`].
    fn produce(self: Arc<Self>, o: Opts) -> BoxFut<Pumped>;
    /// Consumer `c` of group `g.index`: connects, sends `ready`, consumes and acks until the
    /// group has every message; returns when its last ack was confirmed (ns).
    fn consume(
        self: Arc<Self>,
        o: Opts,
        g: Arc<Group>,
        c: usize,
        ready: oneshot::Sender<()>,
    ) -> BoxFut<u64>;
    /// Fields added to the JSON line (durability in force, client options, versions).
    fn describe(self: Arc<Self>, o: Opts) -> BoxFut<Map<String, Value>>;
    /// Periods of the run worth a latency figure of their own (after `describe`).
    fn windows(&self) -> Vec<Window> {
        Vec::new()
    }
}

/// A period of the run ([`now_ns`] instants): the line gets `<name>_msgs` (messages sent in
/// it), `<name>_lat_p99_us` / `_max_us` (their publish → receive latency) and `<name>_in_run`
/// (whether it began before the run's last ack).
pub struct Window {
    pub name: String,
    pub from_ns: u64,
    pub to_ns: u64,
}

/// What [`pump`] measured.
pub struct Pumped {
    /// When the first publish was made (ns, [`now_ns`]).
    pub first_ns: u64,
    /// When the last confirmation arrived (ns).
    pub last_ns: u64,
    /// Publish to confirmation, per message (ns), in completion order.
    pub confirm_ns: Vec<u64>,
}

/// Keeps up to `inflight` publishes outstanding, each future = send + await the broker's
/// confirmation; optional pacing at `rate` msg/s.
pub async fn pump<F, Fut>(
    n: u64,
    inflight: usize,
    rate: u64,
    progress: bool,
    mut make: F,
) -> Result<Pumped>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut futs = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut confirmed = 0u64;
    let mut confirm_ns = Vec::with_capacity(n.min(10_000_000) as usize);
    let mut make = move |ix: u64| {
        let t = Instant::now();
        let fut = make(ix);
        async move {
            fut.await?;
            Ok::<u64, anyhow::Error>(t.elapsed().as_nanos() as u64)
        }
    };
    let first = now_ns();
    let start = Instant::now();
    let mut next_report = Instant::now() + Duration::from_secs(1);
    while sent < n || !futs.is_empty() {
        while sent < n && futs.len() < inflight {
            if let Some(offset) = (sent * 1_000_000_000).checked_div(rate) {
                let due = start + Duration::from_nanos(offset);
                let now = Instant::now();
                if due > now + Duration::from_micros(500) {
                    if futs.is_empty() {
                        tokio::time::sleep_until(due.into()).await;
                    } else {
                        // wait either for the next due time or for a confirm
                        tokio::select! {
                            _ = tokio::time::sleep_until(due.into()) => {},
                            r = futs.next() => if let Some(r) = r { confirm_ns.push(r?); confirmed += 1; },
                        }
                        continue;
                    }
                }
            }
            futs.push(make(sent));
            sent += 1;
        }
        if let Some(r) = futs.next().await {
            confirm_ns.push(r?);
            confirmed += 1;
        }
        if progress && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!(
                "  published {confirmed}/{n} ({:.0} msg/s)",
                confirmed as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(Pumped {
        first_ns: first,
        last_ns: now_ns(),
        confirm_ns,
    })
}

fn pct(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)] as f64)
}

fn us(ns: Option<f64>) -> Value {
    match ns {
        Some(v) => json!((v / 100.0).round() / 10.0),
        None => Value::Null,
    }
}

/// Runs W1-W5 (one producer, `o.groups` groups of `o.consumers` consumers) against `target`.
/// `server_pid` is the broker's process, for CPU and RSS.
pub async fn run(target: Arc<dyn Target>, o: Opts, server_pid: Option<u32>) -> Result<Value> {
    now_ns();
    target
        .clone()
        .setup(o.clone())
        .await
        .context("setting up the broker")?;
    let spid = server_pid.map(|p| p.to_string());
    let srv_cpu0 = spid.as_deref().and_then(sys::cpu_s);
    let cli_cpu0 = sys::cpu_s("self");
    let load0 = sys::loadavg1();

    // Consumers first; wait until each is subscribed. Shared: one receiver per group, its
    // consumers share it. Broadcast: every consumer is a receiver (of its group's messages).
    let (groups, per_receiver): (Vec<Arc<Group>>, usize) = if o.broadcast() {
        let rs = (0..o.groups)
            .flat_map(|g| (0..o.consumers).map(move |c| (g, c)))
            .enumerate()
            .map(|(i, (g, _))| Group::named(i, format!("g{g}"), o.n))
            .collect();
        (rs, 1)
    } else {
        let rs = (0..o.groups).map(|g| Group::new(g, o.n)).collect();
        (rs, o.consumers)
    };
    let mut handles = Vec::new();
    for g in &groups {
        for c in 0..per_receiver {
            let (tx, rx) = oneshot::channel();
            let h = tokio::spawn(target.clone().consume(o.clone(), g.clone(), c, tx));
            if rx.await.is_err() {
                // the consumer failed before it was ready: report its error
                return Err(match h.await {
                    Ok(Err(e)) => e.context(format!("consumer {c} of receiver {}", g.index)),
                    Ok(Ok(_)) => anyhow!("consumer ended before it was ready"),
                    Err(e) => anyhow!("consumer task: {e}"),
                });
            }
            handles.push(h);
        }
    }
    let Pumped {
        first_ns: first_pub,
        last_ns: last_confirm,
        confirm_ns: mut confirms,
    } = target.clone().produce(o.clone()).await?;
    confirms.sort_unstable();
    let mut last_ack = 0u64;
    for h in handles {
        last_ack = last_ack.max(h.await.map_err(|e| anyhow!("consumer task: {e}"))??);
    }
    let srv_cpu1 = spid.as_deref().and_then(sys::cpu_s);
    let cli_cpu1 = sys::cpu_s("self");
    let hwm = spid.as_deref().and_then(|p| sys::status_kb(p, "VmHWM"));
    let rss = spid.as_deref().and_then(|p| sys::status_kb(p, "VmRSS"));

    let recvs: Vec<Recv> = groups.iter().map(|g| g.take()).collect();
    let srv_cpu = srv_cpu0.zip(srv_cpu1).map(|(a, b)| b - a);
    let cli_cpu = cli_cpu0.zip(cli_cpu1).map(|(a, b)| b - a);
    let pub_s = (last_confirm.saturating_sub(first_pub)).max(1) as f64 / 1e9;
    let end = last_ack.max(last_confirm);
    let e2e_s = (end.saturating_sub(first_pub)).max(1) as f64 / 1e9;
    let deliveries: u64 = recvs.iter().map(|r| r.unique).sum();
    let dups: u64 = recvs.iter().map(|r| r.dups).sum();
    let mut lat: Vec<u64> = recvs
        .iter()
        .flat_map(|r| r.lat_ns.iter().copied())
        .collect();
    let mut lat0: Vec<u64> = recvs.first().map(|r| r.lat_ns.clone()).unwrap_or_default();
    lat.sort_unstable();
    lat0.sort_unstable();
    let n = o.n as f64;
    let (msgs_s, mb_s) = if o.groups == 0 {
        (n / pub_s, n * o.size as f64 / pub_s / 1e6)
    } else {
        (n / e2e_s, n * o.size as f64 / e2e_s / 1e6)
    };
    let per_msg_base = if recvs.len() > 1 {
        deliveries as f64
    } else {
        n
    };
    let expected = o.n * o.receivers() as u64;
    let mut v = json!({
        "peer": o.peer, "workload": o.workload, "round": o.round, "label": o.label,
        "n": o.n, "size": o.size, "inflight": o.inflight, "groups": o.groups,
        "consumers": o.consumers, "rate": o.rate, "mode": o.mode,
        "receivers": recvs.len(), "deliveries_expected": expected,
        "publish_s": pub_s,
        "publish_msgs_s": n / pub_s,
        "e2e_s": e2e_s,
        "msgs_s": msgs_s,
        "mb_s": mb_s,
        "deliveries": deliveries,
        "deliveries_s": if o.groups > 0 { deliveries as f64 / e2e_s } else { 0.0 },
        "dups": dups,
        "lat_p50_us": us(pct(&lat, 50.0)),
        "lat_p99_us": us(pct(&lat, 99.0)),
        "lat_max_us": us(lat.last().map(|&x| x as f64)),
        "lat0_p50_us": us(pct(&lat0, 50.0)),
        "lat0_p99_us": us(pct(&lat0, 99.0)),
        "confirm_p50_us": us(pct(&confirms, 50.0)),
        "confirm_p99_us": us(pct(&confirms, 99.0)),
        "confirm_max_us": us(confirms.last().map(|&x| x as f64)),
        "server_pid": server_pid,
        "server_vmhwm_kb": hwm,
        "server_vmrss_kb": rss,
        "server_cpu_s": srv_cpu,
        "server_us_per_msg": srv_cpu.map(|c| c * 1e6 / per_msg_base.max(1.0)),
        "client_cpu_s": cli_cpu,
        "client_us_per_msg": cli_cpu.map(|c| c * 1e6 / per_msg_base.max(1.0)),
        "loadavg1_before": load0,
    });
    if o.groups > 0 && deliveries < expected {
        bail!("only {deliveries} of {expected} deliveries arrived");
    }
    let extra = target.clone().describe(o).await?;
    if let Value::Object(m) = &mut v {
        m.extend(extra);
        for w in target.windows() {
            m.extend(window_fields(&w, &recvs, end));
        }
    }
    Ok(v)
}

/// The fields of one [`Window`]: the messages sent in it, over every receiver.
fn window_fields(w: &Window, recvs: &[Recv], run_end_ns: u64) -> Map<String, Value> {
    let mut lat: Vec<u64> = recvs
        .iter()
        .flat_map(|r| r.sent_ns.iter().zip(&r.lat_ns))
        .filter(|(&sent, _)| sent >= w.from_ns && sent <= w.to_ns)
        .map(|(_, &l)| l)
        .collect();
    lat.sort_unstable();
    let mut m = Map::new();
    m.insert(format!("{}_msgs", w.name), json!(lat.len()));
    m.insert(format!("{}_lat_p99_us", w.name), us(pct(&lat, 99.0)));
    m.insert(
        format!("{}_lat_max_us", w.name),
        us(lat.last().map(|&x| x as f64)),
    );
    m.insert(format!("{}_in_run", w.name), json!(w.from_ns < run_end_ns));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = make_payload(32, 7);
        let (ts, ix) = parse_payload(&p).unwrap();
        assert_eq!(ix, 7);
        assert!(ts <= now_ns());
        assert!(parse_payload(&p[..10]).is_err());
    }

    #[test]
    fn group_counts_unique_and_dups() {
        let g = Group::new(0, 3);
        assert!(!g.on_msg(&make_payload(16, 0)).unwrap());
        assert!(!g.on_msg(&make_payload(16, 0)).unwrap());
        assert!(!g.on_msg(&make_payload(16, 2)).unwrap());
        assert!(g.on_msg(&make_payload(16, 1)).unwrap());
        assert!(g.is_done());
        assert!(g.on_msg(&make_payload(16, 9)).is_err());
        let r = g.take();
        assert_eq!((r.unique, r.dups, r.lat_ns.len()), (3, 1, 3));
    }

    #[test]
    fn windows_take_the_messages_sent_in_them() {
        let mut r = Recv::new(4);
        r.lat_ns = vec![1_000, 5_000, 9_000, 2_000];
        r.sent_ns = vec![10, 20, 30, 40];
        let w = Window {
            name: "sweep".into(),
            from_ns: 20,
            to_ns: 30,
        };
        let m = window_fields(&w, &[r], 25);
        assert_eq!(m["sweep_msgs"], json!(2));
        assert_eq!(m["sweep_lat_max_us"], json!(9.0));
        assert_eq!(m["sweep_in_run"], json!(true));
        let late = Window {
            name: "late".into(),
            from_ns: 26,
            to_ns: 100,
        };
        let m = window_fields(&late, &[Recv::new(1)], 25);
        assert_eq!(
            (&m["late_msgs"], &m["late_in_run"]),
            (&json!(0), &json!(false))
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(pct(&v, 50.0), Some(51.0));
        assert_eq!(pct(&v, 99.0), Some(99.0));
        assert_eq!(pct(&[], 50.0), None);
    }

    #[tokio::test]
    async fn pump_publishes_everything_and_paces() {
        let started = Instant::now();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        let p = pump(50, 8, 1000, false, move |_| {
            let c = c.clone();
            async move {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        })
        .await
        .unwrap();
        assert!(p.last_ns >= p.first_ns);
        assert_eq!(p.confirm_ns.len(), 50);
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 50);
        // 50 messages at 1000/s: the last is due after 49 ms
        assert!(started.elapsed() >= Duration::from_millis(45));
    }
}
