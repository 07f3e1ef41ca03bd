//! `sluice-bench`: the broker's benchmark workloads W1-W7, one JSON line per run on stdout, and
//! the same W1-W4 against Redis Streams and NATS JetStream (`--features peers`).
//!
//! ```text
//! sluice-bench --workload w2 [--n N] [--size B] [--inflight K] [--rate R] [--groups G] ...
//! sluice-bench report results.jsonl [--targets]
//! sluice-bench ab results.jsonl --pair w1:new/base@0.95 --sweep sweep@2000
//! ```
//! See `BENCHMARKS.md`, `bench/compare.sh` and `bench/issue11.sh`.

mod ab;
mod broker;
mod opts;
#[cfg(feature = "peers")]
mod peers;
mod report;
mod sluice_peer;
mod sys;
mod workload;

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::broker::Broker;
use crate::opts::Opts;

/// A broker this run started, with its data directory (dropped after the broker).
struct Owned {
    broker: Broker,
    dir: tempfile::TempDir,
}

fn temp_dir(o: &Opts, what: &str) -> Result<tempfile::TempDir> {
    let root = o.data_root.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root)?;
    tempfile::Builder::new()
        .prefix(&format!("sluice-bench-{what}-"))
        .tempdir_in(&root)
        .with_context(|| format!("creating a temp dir in {}", root.display()))
}

/// `--server-arg`s, and `--config FILE` when the options ask for a broker config
/// ([`Opts::broker_config`]): the file is written into `dir`.
fn server_args(o: &Opts, dir: &std::path::Path) -> Result<Vec<String>> {
    let mut args = o.server_args.clone();
    if let Some(text) = o.broker_config() {
        let path = dir.join("sluice.toml");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        args.push("--config".into());
        args.push(path.display().to_string());
    }
    Ok(args)
}

fn start_broker(o: &Opts) -> Result<Owned> {
    let bin = broker::find_binary(o.sluice_bin.as_deref())?;
    let dir = temp_dir(o, &o.workload)?;
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let extra = server_args(o, dir.path())?;
    let broker = Broker::start(&bin, &data, &log, &o.fsync, &extra, Duration::from_secs(60))?;
    Ok(Owned { broker, dir })
}

async fn run_sluice(o: Opts) -> Result<Value> {
    if o.workload == "w7" {
        return run_w7(o).await;
    }
    let owned = match &o.addr {
        Some(_) => None,
        None => {
            let oc = o.clone();
            Some(tokio::task::spawn_blocking(move || start_broker(&oc)).await??)
        }
    };
    let (addr, pid, data_dir) = match &owned {
        Some(b) => (
            b.broker.addr.clone(),
            Some(b.broker.pid),
            Some(b.dir.path().join("data")),
        ),
        None => (o.addr.clone().unwrap_or_default(), o.server_pid, None),
    };
    let result = match o.workload.as_str() {
        "w6" => sluice_peer::run_w6(&addr, &o, pid).await,
        _ => {
            let target = Arc::new(sluice_peer::Sluice::new(addr, &o).with_data_dir(data_dir));
            workload::run(target, o.clone(), pid).await
        }
    };
    let Some(mut owned) = owned else {
        return result;
    };
    let clean = tokio::task::spawn_blocking(move || {
        let clean = owned.broker.stop(Duration::from_secs(30));
        (clean, owned)
    })
    .await?;
    let mut v = result
        .map_err(|e| e.context(format!("broker log tail:\n{}", clean.1.broker.log_tail())))?;
    if let Value::Object(m) = &mut v {
        m.insert("broker_stopped_cleanly".into(), json!(clean.0));
    }
    Ok(v)
}

/// W7: fill a data dir with `o.n` messages, stop the broker, time a restart on it.
async fn run_w7(o: Opts) -> Result<Value> {
    if o.addr.is_some() {
        bail!("w7 restarts the broker, so it starts its own (drop --addr)");
    }
    let bin = broker::find_binary(o.sluice_bin.as_deref())?;
    let dir = temp_dir(&o, "w7")?;
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let topic = format!("bench.w7.{}", std::process::id());
    let extra = server_args(&o, dir.path())?;
    let (b, d, l, f, x) = (
        bin.clone(),
        data.clone(),
        log.clone(),
        o.fsync.clone(),
        extra.clone(),
    );
    let mut filler = tokio::task::spawn_blocking(move || {
        Broker::start(&b, &d, &l, &f, &x, Duration::from_secs(60))
    })
    .await??;
    let (fill_s, fill_rate) = sluice_peer::fill(&filler.addr, &topic, &o)
        .await
        .map_err(|e| e.context(format!("broker log tail:\n{}", filler.log_tail())))?;
    let fill_hwm = sys::status_kb(&filler.pid_str(), "VmHWM");
    let (stop_clean, filler) = tokio::task::spawn_blocking(move || {
        let c = filler.stop(Duration::from_secs(300));
        (c, filler)
    })
    .await?;
    drop(filler);
    let data_bytes = sys::dir_bytes(&data);
    if o.progress {
        eprintln!(
            "  filled {} messages in {fill_s:.1} s ({fill_rate:.0} msg/s), data dir {} MB; restarting",
            o.n,
            data_bytes / 1_000_000
        );
    }
    let (mut broker, fields) =
        sluice_peer::time_restart(&bin, &data, &log, &topic, &extra, &o).await?;
    let stopped = tokio::task::spawn_blocking(move || broker.stop(Duration::from_secs(60))).await?;
    let restart_cpu = fields.get("restart_server_cpu_s").and_then(Value::as_f64);
    let restart_hwm = fields.get("restart_vmhwm_kb").and_then(Value::as_u64);
    let mut v = json!({
        "peer": "sluice", "workload": "w7", "round": o.round, "label": o.label,
        "n": o.n, "size": o.size, "inflight": o.inflight, "fill_batch": o.fill_batch,
        "fill_s": fill_s, "fill_msgs_s": fill_rate, "fill_vmhwm_kb": fill_hwm,
        "fill_broker_stopped_cleanly": stop_clean,
        // the restarted broker, from spawn to ready
        "server_cpu_s": restart_cpu,
        "server_vmhwm_kb": restart_hwm,
        "data_dir_mb": data_bytes as f64 / 1e6,
        "broker_stopped_cleanly": stopped,
        "loadavg1_before": sys::loadavg1(),
    });
    if let Value::Object(m) = &mut v {
        m.extend(fields);
    }
    drop(dir);
    Ok(v)
}

#[cfg(feature = "peers")]
async fn run_peer(o: Opts) -> Result<Value> {
    let target: Arc<dyn workload::Target> = match o.peer.as_str() {
        "redis" => Arc::new(peers::redis::Redis::new(&o)),
        "nats" => Arc::new(peers::nats::Nats::new(&o)),
        p => bail!("unknown peer {p}"),
    };
    let pid = o.server_pid;
    workload::run(target, o, pid).await
}

#[cfg(not(feature = "peers"))]
async fn run_peer(o: Opts) -> Result<Value> {
    bail!(
        "--peer {} needs a build with the peer clients: cargo build --release -p sluice-bench --features peers",
        o.peer
    )
}

fn run(args: &[String]) -> i32 {
    let mut o = match opts::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}");
            return 2;
        }
    };
    o.progress = o.progress || std::io::stderr().is_terminal();
    // W6 holds n client sockets here and n in the broker (which inherits the limit).
    let limit = sys::raise_nofile_limit(65_536.max(o.n.saturating_mul(2) + 1024));
    if o.workload == "w6" && limit < o.n + 256 {
        eprintln!(
            "warning: RLIMIT_NOFILE is {limit}, below the {} connections of w6",
            o.n
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let to = Duration::from_secs(o.timeout_s);
    let oc = o.clone();
    let res = rt.block_on(async move {
        let fut = async move {
            match oc.peer.as_str() {
                "sluice" => run_sluice(oc).await,
                _ => run_peer(oc).await,
            }
        };
        tokio::time::timeout(to, fut).await
    });
    let line = match res {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => error_line(&o, format!("{e:#}")),
        Err(_) => error_line(&o, format!("timeout after {} s", o.timeout_s)),
    };
    println!("{line}");
    rt.shutdown_timeout(Duration::from_secs(2));
    if line.get("error").is_some() {
        1
    } else {
        0
    }
}

fn error_line(o: &Opts, error: String) -> Value {
    json!({
        "peer": o.peer, "workload": o.workload, "round": o.round, "label": o.label,
        "n": o.n, "fsync": o.fsync, "error": error,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("report") => match report::main(&args[1..]) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        },
        Some("ab") => match ab::main(&args[1..]) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        },
        Some("run") => run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            eprint!("{}", opts::USAGE);
            if args.is_empty() {
                2
            } else {
                0
            }
        }
        Some(_) => run(&args),
    };
    std::process::exit(code);
}
