//! Command-line options of `sluice-bench [run]`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub const USAGE: &str = "\
usage: sluice-bench [run] --workload w1|w2|w3|w4|w5|w6|w7 [flags]
       sluice-bench report FILE.jsonl [--targets]
       sluice-bench ab FILE.jsonl [--pair W:NUM/DEN[@BOUND]]... [--sweep LABEL[@P99_US]]
                  (runs told apart by --label, paired by --round: per-round ratios, medians)

workloads (defaults):
  w1 publish      200,000 x 256 B, 1,000 publishes in flight, each confirmed durable
  w2 end to end   w1 + 1 group x 1 consumer acking; latency publish->receive
  w3 fan-out      100,000 x 256 B, 4 groups, each gets every message
  w4 paced        w2 at --rate 10000 msg/s, 100,000 messages: latency p50/p99/max
  w5 big          2,000 x 1 MiB published, 32 in flight: MB/s
  w6 connections  --n 10,000 idle subscribed consumers, one connection each: broker RSS per conn
  w7 recovery     fill --n 10,000,000 messages, stop, time restart -> listening -> first request

flags:
  --peer sluice|redis|nats   broker under test [sluice]; redis/nats need --features peers
  --n N --size B --inflight K --rate MSG_S --groups G --consumers C (per group)
  --mode shared|broadcast    sluice group mode [shared]; broadcast: every consumer of a group
                             gets every message and counts as its own receiver, so
                             `--groups 1 --consumers 4 --mode broadcast` makes the same 4N
                             deliveries as `--groups 4 --consumers 1`
  --ids on|off               sluice: the producer gives every message an id (the SDK's
                             ProducerOptions.idempotent) [on]
  --retention-interval DUR   sluice: the bench writes a config file for the broker it starts with
                             `retention_interval = DUR` (a sweep every DUR, humantime) ...
  --retention-max-age DUR    ... and `[retention] max_age = DUR` (keep it far above the run, e.g. 1h)
  --sweep-gib G              w4, sluice: before the timed phase fill another topic with G GiB of
                             1 MiB messages (then a 2 s pause); --sweep-after S seconds into the
                             timed phase [2] set its max_age to 1s, so the next sweep removes it
                             while w4 runs; the line records when (sweep_*: polls of topic.info
                             and du every 50 ms) and the latency of the messages sent around it
                             (sweep_lat_p99_us); sweeps come every --retention-interval
  --addr HOST:PORT           use a running broker (loopback only); without it (sluice) the bench
                             starts `sluice serve --listen 127.0.0.1:0` on a temp dir itself
  --server-pid PID           PID of a broker started by someone else (CPU, RSS figures)
  --fsync always|never|\"interval 10ms\"   sluice: passed to serve [always]; redis: checked
  --sluice-bin PATH          broker binary [sluice next to this binary]
  --server-arg ARG           extra `sluice serve` argument (repeatable)
  --data-root DIR            where temp data dirs go [$TMPDIR or /tmp]
  --label L --round R        copied to the JSON line
  --timeout S                bound for the whole run [300]
  --window W --batch-size B  sluice consumer window [64] and batch size [1000, as the peers; broker caps it]
  --max-in-flight-requests M --max-batch-messages M --preserve-order true|false
                             sluice producer options [8, 512, false]
  --fill-batch M             w7: messages per publish_batch [1000]
  --nats-batch M --nats-ack explicit|all --ack-every M   nats pull batch [1000], ack policy
  --progress                 progress lines on stderr even when it is not a terminal
";

#[derive(Clone, Debug)]
pub struct Opts {
    pub peer: String,
    pub workload: String,
    pub n: u64,
    pub size: usize,
    pub inflight: usize,
    pub groups: usize,
    pub consumers: usize,
    pub rate: u64,
    pub round: u32,
    pub label: String,
    pub addr: Option<String>,
    pub server_pid: Option<u32>,
    pub fsync: String,
    pub sluice_bin: Option<PathBuf>,
    pub server_args: Vec<String>,
    pub data_root: Option<PathBuf>,
    pub timeout_s: u64,
    pub window: u32,
    pub batch_size: u32,
    pub max_in_flight_requests: usize,
    pub max_batch_messages: usize,
    pub preserve_order: bool,
    pub fill_batch: usize,
    pub nats_batch: usize,
    pub nats_ack_all: bool,
    pub ack_every: u64,
    pub progress: bool,
    /// Group mode of the sluice consumers: "shared" or "broadcast".
    pub mode: String,
    /// Sluice producer: an id on every message (`ProducerOptions.idempotent`).
    pub ids: bool,
    /// `retention_interval` of the config file written for the broker (humantime).
    pub retention_interval: Option<String>,
    /// `[retention] max_age` of that config file (humantime).
    pub retention_max_age: Option<String>,
    /// W4: GiB filled into a second topic before the run and removed by a sweep during it.
    pub sweep_gib: f64,
    /// Seconds into the timed phase at which that topic's retention is cut.
    pub sweep_after_s: f64,
}

impl Opts {
    /// True when the consumers join broadcast groups (each consumer gets every message).
    pub fn broadcast(&self) -> bool {
        self.mode == "broadcast"
    }

    /// Receivers that each get every message: the groups, or in broadcast mode every consumer.
    pub fn receivers(&self) -> usize {
        if self.broadcast() {
            self.groups * self.consumers
        } else {
            self.groups
        }
    }

    /// The broker config file the bench writes for the broker it starts (None: no file).
    pub fn broker_config(&self) -> Option<String> {
        if self.retention_interval.is_none() && self.retention_max_age.is_none() {
            return None;
        }
        let mut s = String::from("# written by sluice-bench\n");
        if let Some(i) = &self.retention_interval {
            s.push_str(&format!("retention_interval = \"{i}\"\n"));
        }
        if let Some(a) = &self.retention_max_age {
            s.push_str(&format!("\n[retention]\nmax_age = \"{a}\"\n"));
        }
        Some(s)
    }
}

impl Opts {
    /// The address of the broker for peers (defaults of `bench/peers.sh`).
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    pub fn peer_addr(&self) -> String {
        match (&self.addr, self.peer.as_str()) {
            (Some(a), _) => a.clone(),
            (None, "redis") => "127.0.0.1:16379".into(),
            (None, "nats") => "127.0.0.1:14222".into(),
            (None, _) => String::new(),
        }
    }
}

fn parse_bool(v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => bail!("expected true|false, got {v:?}"),
    }
}

/// A humantime duration as written into the broker's TOML config: digits, letters and spaces
/// only (the broker checks the value itself when it starts).
fn duration(v: &str) -> Result<String> {
    let v = v.trim();
    if v.is_empty()
        || !v.starts_with(|c: char| c.is_ascii_digit())
        || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ')
    {
        bail!("expected a humantime duration such as 1s or 1h, got {v:?}");
    }
    Ok(v.to_string())
}

pub fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        peer: "sluice".into(),
        workload: String::new(),
        n: 0,
        size: 0,
        inflight: 0,
        groups: 0,
        consumers: 1,
        rate: 0,
        round: 0,
        label: String::new(),
        addr: None,
        server_pid: None,
        fsync: String::new(),
        sluice_bin: None,
        server_args: Vec::new(),
        data_root: None,
        timeout_s: 300,
        window: 64,
        batch_size: 1000,
        max_in_flight_requests: 8,
        max_batch_messages: 512,
        preserve_order: false,
        fill_batch: 1000,
        nats_batch: 1000,
        nats_ack_all: false,
        ack_every: 100,
        progress: false,
        mode: "shared".into(),
        ids: true,
        retention_interval: None,
        retention_max_age: None,
        sweep_gib: 0.0,
        sweep_after_s: 2.0,
    };
    let (mut n_set, mut size_set, mut inflight_set, mut groups_set, mut rate_set) =
        (false, false, false, false, false);
    let mut i = 0;
    while i < args.len() {
        let raw = args[i].as_str();
        if raw == "--progress" {
            o.progress = true;
            i += 1;
            continue;
        }
        if raw == "-h" || raw == "--help" {
            bail!("{USAGE}");
        }
        let (k, v) = match raw.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, v.to_string()),
            _ => {
                let v = args
                    .get(i + 1)
                    .cloned()
                    .ok_or_else(|| anyhow!("missing value for {raw}"))?;
                i += 1;
                (raw, v)
            }
        };
        i += 1;
        match k {
            "--peer" => o.peer = v,
            "--workload" => o.workload = v.to_ascii_lowercase(),
            "--n" => {
                o.n = v.replace('_', "").parse()?;
                n_set = true
            }
            "--size" => {
                o.size = v.parse()?;
                size_set = true
            }
            "--inflight" => {
                o.inflight = v.parse()?;
                inflight_set = true
            }
            "--groups" => {
                o.groups = v.parse()?;
                groups_set = true
            }
            "--consumers" => o.consumers = v.parse()?,
            "--rate" => {
                o.rate = v.parse()?;
                rate_set = true
            }
            "--round" => o.round = v.parse()?,
            "--label" => o.label = v,
            "--addr" => o.addr = Some(v),
            "--server-pid" => o.server_pid = Some(v.parse()?),
            "--fsync" => o.fsync = v,
            "--sluice-bin" => o.sluice_bin = Some(v.into()),
            "--server-arg" => o.server_args.push(v),
            "--data-root" => o.data_root = Some(v.into()),
            "--timeout" => o.timeout_s = v.parse()?,
            "--window" => o.window = v.parse()?,
            "--batch-size" => o.batch_size = v.parse()?,
            "--max-in-flight-requests" => o.max_in_flight_requests = v.parse()?,
            "--max-batch-messages" => o.max_batch_messages = v.parse()?,
            "--preserve-order" => o.preserve_order = parse_bool(&v)?,
            "--fill-batch" => o.fill_batch = v.parse()?,
            "--nats-batch" => o.nats_batch = v.parse()?,
            "--nats-ack" => {
                o.nats_ack_all = match v.as_str() {
                    "explicit" => false,
                    "all" => true,
                    _ => bail!("--nats-ack explicit|all"),
                }
            }
            "--ack-every" => o.ack_every = v.parse()?,
            "--mode" => o.mode = v.to_ascii_lowercase(),
            "--ids" => o.ids = parse_bool(&v)?,
            "--retention-interval" => o.retention_interval = Some(duration(&v)?),
            "--retention-max-age" => o.retention_max_age = Some(duration(&v)?),
            "--sweep-gib" => o.sweep_gib = v.parse()?,
            "--sweep-after" => o.sweep_after_s = v.parse()?,
            _ => bail!("unknown flag {k}\n\n{USAGE}"),
        }
    }
    // Defaults per workload: (n, size, inflight, groups, rate).
    let (dn, ds, di, dg, dr) = match o.workload.as_str() {
        "w1" => (200_000, 256, 1000, 0, 0),
        "w2" => (200_000, 256, 1000, 1, 0),
        "w3" => (100_000, 256, 1000, 4, 0),
        "w4" => (100_000, 256, 1000, 1, 10_000),
        "w5" => (2_000, 1024 * 1024, 32, 0, 0),
        "w6" => (10_000, 256, 1, 1, 0),
        "w7" => (10_000_000, 256, 16, 0, 0),
        "" => bail!("--workload is required\n\n{USAGE}"),
        w => bail!("unknown workload {w:?} (w1..w7)"),
    };
    if !n_set {
        o.n = dn;
    }
    if !size_set {
        o.size = ds;
    }
    if !inflight_set {
        o.inflight = di;
    }
    if !groups_set {
        o.groups = dg;
    }
    if !rate_set {
        o.rate = dr;
    }
    if matches!(o.workload.as_str(), "w1" | "w5" | "w7") {
        o.groups = 0;
    }
    if o.fsync.is_empty() {
        o.fsync = match o.peer.as_str() {
            "sluice" => "always".into(),
            _ => String::new(), // filled in from the server's own configuration
        };
    }
    if o.size < 16 {
        bail!("--size must be at least 16 (timestamp + index)");
    }
    if o.n == 0 || o.inflight == 0 || o.consumers == 0 {
        bail!("--n, --inflight and --consumers must be at least 1");
    }
    if matches!(o.workload.as_str(), "w2" | "w3" | "w4" | "w6") && o.groups == 0 {
        bail!("{} needs at least one group", o.workload);
    }
    if o.peer != "sluice" && !matches!(o.workload.as_str(), "w1" | "w2" | "w3" | "w4") {
        bail!("workload {} runs against sluice only", o.workload);
    }
    if !matches!(o.mode.as_str(), "shared" | "broadcast") {
        bail!("--mode shared|broadcast, got {:?}", o.mode);
    }
    if o.broadcast() && (o.peer != "sluice" || o.groups == 0) {
        bail!("--mode broadcast needs sluice and a workload with groups (w2, w3, w4)");
    }
    if o.broker_config().is_some() && (o.peer != "sluice" || o.addr.is_some()) {
        bail!("--retention-* configure the broker the bench starts (sluice without --addr)");
    }
    if !(o.sweep_gib.is_finite() && (0.0..=64.0).contains(&o.sweep_gib)) {
        bail!("--sweep-gib must be in 0..=64");
    }
    if !(o.sweep_after_s.is_finite() && o.sweep_after_s >= 0.0) {
        bail!("--sweep-after must be a number of seconds >= 0");
    }
    if o.sweep_gib > 0.0 && (o.workload != "w4" || o.peer != "sluice") {
        bail!("--sweep-gib is for w4 against sluice");
    }
    if !matches!(o.peer.as_str(), "sluice" | "redis" | "nats") {
        bail!("unknown peer {:?} (sluice|redis|nats)", o.peer);
    }
    if let Some(a) = &o.addr {
        let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
        if !loopback {
            bail!("--addr must be a loopback address (127.0.0.0/8, ::1, localhost), got {a}");
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Opts> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse(&v)
    }

    #[test]
    fn defaults_per_workload() {
        let o = p("--workload w3").unwrap();
        assert_eq!((o.n, o.size, o.inflight, o.groups), (100_000, 256, 1000, 4));
        assert_eq!(o.fsync, "always");
        let o = p("--workload w4").unwrap();
        assert_eq!(o.rate, 10_000);
        let o = p("--workload w1 --groups 3").unwrap();
        assert_eq!(o.groups, 0);
        let o = p("--workload=w2 --n=1_000 --fsync=never").unwrap();
        assert_eq!((o.n, o.fsync.as_str()), (1000, "never"));
    }

    #[test]
    fn refuses_non_loopback_and_bad_values() {
        assert!(p("--workload w1 --addr 10.0.0.1:7070").is_err());
        assert!(p("--workload w1 --addr 127.0.0.1:7070").is_ok());
        assert!(p("--workload w1 --addr localhost:7070").is_ok());
        assert!(p("--workload w1 --size 8").is_err());
        assert!(p("--workload w9").is_err());
        assert!(p("--workload w5 --peer redis").is_err());
        assert!(p("--workload w1 --bogus 1").is_err());
        assert!(p("--workload w3 --mode fanout").is_err());
        assert!(p("--workload w1 --mode broadcast").is_err());
        assert!(p("--workload w3 --peer redis --mode broadcast").is_err());
        assert!(p("--workload w3 --retention-interval 1s --addr 127.0.0.1:7070").is_err());
        assert!(p("--workload w3 --retention-max-age 1h\"x").is_err());
        assert!(p("--workload w3 --sweep-gib 1").is_err());
        assert!(p("--workload w4 --sweep-gib -1").is_err());
    }

    #[test]
    fn broadcast_receivers_and_broker_config() {
        let o = p("--workload w3 --groups 1 --consumers 4 --mode broadcast").unwrap();
        assert_eq!((o.receivers(), o.broadcast()), (4, true));
        let o = p("--workload w3 --groups 4").unwrap();
        assert_eq!((o.receivers(), o.broadcast()), (4, false));
        assert!(o.ids);
        assert_eq!(o.broker_config(), None);
        let o = p("--workload w4 --retention-interval 1s --retention-max-age 1h --ids off --sweep-gib 0.5")
            .unwrap();
        assert!(!o.ids);
        assert_eq!(
            o.broker_config().unwrap(),
            "# written by sluice-bench\nretention_interval = \"1s\"\n\n[retention]\nmax_age = \"1h\"\n"
        );
        assert_eq!((o.sweep_gib, o.sweep_after_s), (0.5, 2.0));
    }
}
