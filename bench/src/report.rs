//! `sluice-bench report FILE.jsonl... [--targets]`: Markdown tables of the runs in JSON-lines
//! files: medians [min-max], spread = ½(max−min)/median, and "vs Redis" = the median over rounds
//! of (figure / Redis-everysec's figure of the same workload in the same round).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// Runs of one configuration: (workload[/label], peer, durability).
type Key = (String, String, String);

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn field(r: &Value, f: &str) -> Option<f64> {
    r.get(f).and_then(Value::as_f64)
}

fn values(rs: &[Value], f: &str) -> Vec<f64> {
    rs.iter().filter_map(|r| field(r, f)).collect()
}

fn med(rs: &[Value], f: &str) -> Option<f64> {
    median(&values(rs, f))
}

fn max_of(rs: &[Value], f: &str) -> Option<f64> {
    values(rs, f).into_iter().reduce(f64::max)
}

fn spread(rs: &[Value], f: &str) -> String {
    let v = values(rs, f);
    match median(&v) {
        Some(m) if v.len() >= 2 && m != 0.0 => {
            let (lo, hi) = v
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            format!("±{:.0}%", (hi - lo) / 2.0 / m * 100.0)
        }
        _ => "–".into(),
    }
}

/// Thousands separators.
fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if x < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn fmt_med(rs: &[Value], f: &str, scale: f64, prec: usize) -> String {
    match med(rs, f) {
        Some(m) => format!("{:.prec$}", m / scale),
        None => "–".into(),
    }
}

fn fmt_range(rs: &[Value], f: &str) -> String {
    let v = values(rs, f);
    match median(&v) {
        Some(m) => {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if v.len() > 1 {
                format!("{} [{}–{}]", thousands(m), thousands(lo), thousands(hi))
            } else {
                thousands(m)
            }
        }
        None => "–".into(),
    }
}

fn peer_name(peer: &str, fsync: &str) -> String {
    match peer {
        "sluice" => format!("Sluice (fsync {fsync})"),
        "redis" => format!("Redis (appendfsync {fsync})"),
        "nats" => "NATS JetStream (no fsync before ack)".into(),
        p => format!("{p} ({fsync})"),
    }
}

fn peer_order(peer: &str, fsync: &str) -> (u8, String) {
    let rank = match (peer, fsync) {
        ("sluice", "always") => 0,
        ("sluice", _) => 1,
        ("redis", "everysec") => 2,
        ("redis", _) => 3,
        ("nats", _) => 4,
        _ => 9,
    };
    (rank, fsync.to_string())
}

/// The figure a workload is judged by (higher is better, except W4's latency).
fn key_figure(workload: &str) -> &'static str {
    match workload {
        "w3" => "deliveries_s",
        "w4" => "lat_p99_us",
        "w5" => "mb_s",
        _ => "msgs_s",
    }
}

struct Data {
    rows: BTreeMap<Key, Vec<Value>>,
    errors: Vec<Value>,
}

impl Data {
    fn load(paths: &[String]) -> Result<Data> {
        let mut rows: BTreeMap<Key, Vec<Value>> = BTreeMap::new();
        let mut errors = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
            for l in text.lines().map(str::trim).filter(|l| l.starts_with('{')) {
                let v: Value = serde_json::from_str(l).with_context(|| format!("in {path}"))?;
                if v.get("error").is_some() {
                    errors.push(v);
                    continue;
                }
                let mut w = v["workload"].as_str().unwrap_or("").to_string();
                if let Some(l) = v["label"].as_str().filter(|l| !l.is_empty()) {
                    w = format!("{w}/{l}");
                }
                let peer = v["peer"].as_str().unwrap_or("").to_string();
                let fsync = v["fsync"].as_str().unwrap_or("").to_string();
                rows.entry((w, peer, fsync)).or_default().push(v);
            }
        }
        Ok(Data { rows, errors })
    }

    fn workloads(&self) -> Vec<String> {
        let mut w: Vec<String> = self.rows.keys().map(|k| k.0.clone()).collect();
        w.dedup();
        w
    }

    fn configs(&self, wk: &str) -> Vec<(&Key, &Vec<Value>)> {
        let mut v: Vec<(&Key, &Vec<Value>)> = self.rows.iter().filter(|(k, _)| k.0 == wk).collect();
        v.sort_by_key(|(k, _)| peer_order(&k.1, &k.2));
        v
    }

    fn base(&self, wk: &str) -> Option<&Vec<Value>> {
        self.rows
            .get(&(wk.to_string(), "redis".into(), "everysec".into()))
    }

    /// Median over rounds of (x / base) for `f`, pairing runs by round.
    fn paired_ratio(&self, wk: &str, rs: &[Value], f: &str) -> Option<f64> {
        let base = self.base(wk)?;
        let ratios: Vec<f64> = rs
            .iter()
            .filter_map(|r| {
                let b = base.iter().find(|b| b["round"] == r["round"])?;
                Some(field(r, f)? / field(b, f)?)
            })
            .collect();
        median(&ratios)
    }
}

fn ratio_cell(x: Option<f64>) -> String {
    x.map_or("–".into(), |r| format!("{r:.2}×"))
}

fn mib(rs: &[Value], f: &str) -> String {
    fmt_med(rs, f, 1024.0, 0)
}

/// Who gets every message in a W3 run: its groups, or the consumers of a broadcast group.
fn receivers(run: &Value) -> String {
    let (g, c) = (&run["groups"], &run["consumers"]);
    match run["mode"].as_str() {
        Some("broadcast") => format!("{g} broadcast group(s) × {c} consumers, each a receiver"),
        _ => format!("{g} groups (receivers)"),
    }
}

fn main_tables(d: &Data, out: &mut String) -> Result<()> {
    for wk in d.workloads() {
        let w = wk.split('/').next().unwrap_or("");
        let configs = d.configs(&wk);
        let kf = key_figure(w);
        let sample = &configs[0].1[0];
        let n = sample["n"].as_u64().unwrap_or(0);
        let size = sample["size"].as_u64().unwrap_or(0);
        // The heading names the runs' label (bench/issue11.sh's base, new, ...).
        let mut head = String::new();
        match w {
            "w1" => writeln!(head, "\n### W1 publish: {} × {size} B, {} in flight, each confirmed\n\n| system | runs | msgs/s median [min–max] | MB/s | spread | vs Redis everysec | server µs/msg | server CPU s | client CPU s | server VmHWM MiB |\n|---|---|---|---|---|---|---|---|---|---|", thousands(n as f64), sample["inflight"])?,
            "w2" => writeln!(head, "\n### W2 end to end: {} × {size} B, 1 group × 1 consumer, first publish → last ack\n\n| system | runs | msgs/s median [min–max] | spread | vs Redis everysec | lat p50 / p99 / max ms | server µs/msg | server CPU s | client CPU s | server VmHWM MiB | dups |\n|---|---|---|---|---|---|---|---|---|---|---|", thousands(n as f64))?,
            "w3" => writeln!(head, "\n### W3 fan-out: {} × {size} B, {}, deliveries/s = receivers·N / (last ack − first publish)\n\n| system | runs | deliveries/s median [min–max] | spread | vs Redis everysec | publish msgs/s | lat p50 / p99 ms | server µs/delivery | server CPU s | server VmHWM MiB | dups |\n|---|---|---|---|---|---|---|---|---|---|---|", thousands(n as f64), receivers(sample))?,
            "w4" => writeln!(head, "\n### W4 paced latency: {} × {size} B at {} msg/s, publish → receive\n\n| system | runs | p50 ms | p99 ms median [min–max] | max ms | p99 vs Redis everysec (lower is better) | achieved msgs/s | server µs/msg | server VmHWM MiB |\n|---|---|---|---|---|---|---|---|---|", thousands(n as f64), thousands(sample["rate"].as_f64().unwrap_or(0.0)))?,
            "w5" => writeln!(head, "\n### W5 big messages: {} × {} KiB published, {} in flight\n\n| system | runs | MB/s median [min–max] | spread | msgs/s | server CPU s | server VmHWM MiB |\n|---|---|---|---|---|---|---|", thousands(n as f64), size / 1024, sample["inflight"])?,
            "w6" => writeln!(head, "\n### W6 idle connections: {} subscribed consumers, one connection each\n\n| system | runs | RSS per connection KiB median [min–max] | spread | subscribed | RSS idle → loaded MiB | time to open s | server VmHWM MiB |\n|---|---|---|---|---|---|---|---|", thousands(n as f64))?,
            "w7" => writeln!(head, "\n### W7 recovery: start of a broker holding {} × {size} B stored messages\n\n| system | runs | ready s (spawn → first answered request) median [min–max] | listening line s | first delivery s | data dir MB | fill msgs/s | head seq after restart | RSS at ready MiB |\n|---|---|---|---|---|---|---|---|---|", thousands(n as f64))?,
            _ => writeln!(head, "\n### {wk}\n\n| system | runs | {kf} |\n|---|---|---|")?,
        }
        match wk.split_once('/') {
            Some((_, label)) => out.push_str(&head.replacen(':', &format!(" [{label}]:"), 1)),
            None => out.push_str(&head),
        }
        for (k, rs) in configs {
            let name = peer_name(&k.1, &k.2);
            let runs = rs.len();
            let ratio = ratio_cell(d.paired_ratio(&wk, rs, kf));
            let lat3 = format!(
                "{} / {} / {}",
                fmt_med(rs, "lat_p50_us", 1000.0, 2),
                fmt_med(rs, "lat_p99_us", 1000.0, 2),
                fmt_med(rs, "lat_max_us", 1000.0, 1)
            );
            let line = match w {
                "w1" => format!(
                    "| {name} | {runs} | {} | {} | {} | {ratio} | {} | {} | {} | {} |",
                    fmt_range(rs, "msgs_s"),
                    fmt_med(rs, "mb_s", 1.0, 1),
                    spread(rs, "msgs_s"),
                    fmt_med(rs, "server_us_per_msg", 1.0, 1),
                    fmt_med(rs, "server_cpu_s", 1.0, 2),
                    fmt_med(rs, "client_cpu_s", 1.0, 2),
                    mib(rs, "server_vmhwm_kb"),
                ),
                "w2" => format!(
                    "| {name} | {runs} | {} | {} | {ratio} | {lat3} | {} | {} | {} | {} | {} |",
                    fmt_range(rs, "msgs_s"),
                    spread(rs, "msgs_s"),
                    fmt_med(rs, "server_us_per_msg", 1.0, 1),
                    fmt_med(rs, "server_cpu_s", 1.0, 2),
                    fmt_med(rs, "client_cpu_s", 1.0, 2),
                    mib(rs, "server_vmhwm_kb"),
                    fmt_med(rs, "dups", 1.0, 0),
                ),
                "w3" => format!(
                    "| {name} | {runs} | {} | {} | {ratio} | {} | {} / {} | {} | {} | {} | {} |",
                    fmt_range(rs, "deliveries_s"),
                    spread(rs, "deliveries_s"),
                    thousands(med(rs, "publish_msgs_s").unwrap_or(f64::NAN)),
                    fmt_med(rs, "lat_p50_us", 1000.0, 1),
                    fmt_med(rs, "lat_p99_us", 1000.0, 1),
                    fmt_med(rs, "server_us_per_msg", 1.0, 1),
                    fmt_med(rs, "server_cpu_s", 1.0, 2),
                    mib(rs, "server_vmhwm_kb"),
                    fmt_med(rs, "dups", 1.0, 0),
                ),
                "w4" => {
                    let p99: Vec<f64> = values(rs, "lat_p99_us")
                        .iter()
                        .map(|x| x / 1000.0)
                        .collect();
                    let lo = p99.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = p99.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    format!(
                        "| {name} | {runs} | {} | {:.2} [{lo:.2}–{hi:.2}] | {} | {ratio} | {} | {} | {} |",
                        fmt_med(rs, "lat_p50_us", 1000.0, 2),
                        median(&p99).unwrap_or(f64::NAN),
                        fmt_med(rs, "lat_max_us", 1000.0, 1),
                        thousands(med(rs, "msgs_s").unwrap_or(f64::NAN)),
                        fmt_med(rs, "server_us_per_msg", 1.0, 1),
                        mib(rs, "server_vmhwm_kb"),
                    )
                }
                "w5" => format!(
                    "| {name} | {runs} | {} | {} | {} | {} | {} |",
                    fmt_range(rs, "mb_s"),
                    spread(rs, "mb_s"),
                    fmt_med(rs, "msgs_s", 1.0, 0),
                    fmt_med(rs, "server_cpu_s", 1.0, 2),
                    mib(rs, "server_vmhwm_kb"),
                ),
                "w6" => format!(
                    "| {name} | {runs} | {} | {} | {} | {} → {} | {} | {} |",
                    {
                        let v = values(rs, "rss_per_conn_kb");
                        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        format!("{:.1} [{lo:.1}–{hi:.1}]", median(&v).unwrap_or(f64::NAN))
                    },
                    spread(rs, "rss_per_conn_kb"),
                    fmt_med(rs, "connections_subscribed", 1.0, 0),
                    mib(rs, "server_rss_idle_kb"),
                    mib(rs, "server_rss_loaded_kb"),
                    fmt_med(rs, "open_s", 1.0, 1),
                    mib(rs, "server_vmhwm_kb"),
                ),
                "w7" => format!(
                    "| {name} | {runs} | {} | {} | {} | {} | {} | {} | {} |",
                    {
                        let v = values(rs, "ready_s");
                        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        format!("{:.3} [{lo:.3}–{hi:.3}]", median(&v).unwrap_or(f64::NAN))
                    },
                    fmt_med(rs, "listen_s", 1.0, 3),
                    fmt_med(rs, "first_msg_s", 1.0, 3),
                    fmt_med(rs, "data_dir_mb", 1.0, 0),
                    thousands(med(rs, "fill_msgs_s").unwrap_or(f64::NAN)),
                    fmt_med(rs, "head_seq_after_restart", 1.0, 0),
                    mib(rs, "restart_vmhwm_kb"),
                ),
                _ => format!("| {name} | {runs} | {} |", fmt_range(rs, kf)),
            };
            writeln!(out, "{line}")?;
        }
    }
    if !d.errors.is_empty() {
        writeln!(out, "\n**Failed runs ({}):**\n", d.errors.len())?;
        for e in &d.errors {
            writeln!(
                out,
                "- {} {} round {}: {}",
                e["peer"].as_str().unwrap_or("?"),
                e["workload"].as_str().unwrap_or("?"),
                e["round"],
                e["error"].as_str().unwrap_or("?").replace('\n', " ")
            )?;
        }
    }
    Ok(())
}

/// W4 round by round for Sluice: its p99 beside the broker's own syncs in that run (the
/// disk's flush stalls, which every publish waiting on them shares).
fn w4_disk_table(d: &Data, out: &mut String) -> Result<()> {
    let mut rs: Vec<&Value> = d
        .rows
        .iter()
        .filter(|(k, _)| k.0 == "w4" && k.1 == "sluice")
        .flat_map(|(_, rs)| rs)
        .filter(|r| r.get("server_syncs").is_some())
        .collect();
    if rs.is_empty() {
        return Ok(());
    }
    rs.sort_by_key(|r| r["round"].as_u64());
    writeln!(
        out,
        "\n#### W4, Sluice round by round: p99 beside the disk's slow syncs in the same run\n\n\
         Every publish waits for the sync of its group commit (fdatasync, which flushes the \
         disk's write cache), and so does every message published while a sync stalls. Counted \
         by the broker (`admin.stats`, field `syncs`).\n\n\
         | round | p99 ms | p50 ms | syncs | mean sync ms | syncs over 2 ms | time in them ms | share of the run |\n|---|---|---|---|---|---|---|---|"
    )?;
    for r in rs {
        let ms = |f: &str, scale: f64| {
            field(r, f).map_or("–".to_string(), |x| format!("{:.2}", x / scale))
        };
        let share = field(r, "server_sync_over_2ms_ms")
            .zip(field(r, "e2e_s"))
            .map_or("–".to_string(), |(t, s)| {
                format!("{:.2}%", t / (s * 1000.0) * 100.0)
            });
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {share} |",
            r["round"],
            ms("lat_p99_us", 1000.0),
            ms("lat_p50_us", 1000.0),
            field(r, "server_syncs").map_or("–".to_string(), thousands),
            ms("server_sync_mean_us", 1000.0),
            field(r, "server_syncs_over_2ms").map_or("–".to_string(), |x| format!("{x:.0}")),
            field(r, "server_sync_over_2ms_ms").map_or("–".to_string(), |x| format!("{x:.1}")),
        )?;
    }
    Ok(())
}

/// One target: what was measured, the bound, met or missed.
struct Target {
    what: &'static str,
    bound: String,
    measured: Option<f64>,
    shown: String,
    met: Option<bool>,
    margin: String,
}

fn targets(d: &Data) -> Vec<Target> {
    let sl = |w: &str| {
        d.rows
            .get(&(w.to_string(), "sluice".into(), "always".into()))
    };
    let mut t = Vec::new();
    for (w, min, what) in [
        (
            "w1",
            3.0,
            "W1 publish throughput vs Redis (everysec), same round",
        ),
        (
            "w2",
            2.5,
            "W2 end-to-end throughput vs Redis (everysec), same round",
        ),
        (
            "w3",
            2.0,
            "W3 fan-out deliveries/s vs Redis (everysec), same round",
        ),
    ] {
        let r = sl(w).and_then(|rs| d.paired_ratio(w, rs, key_figure(w)));
        t.push(Target {
            what,
            bound: format!("≥ {min}×"),
            measured: r,
            shown: r.map_or("not measured".into(), |r| format!("{r:.2}×")),
            met: r.map(|r| r >= min),
            margin: r.map_or(String::new(), |r| {
                format!("{:.0}% of target", r / min * 100.0)
            }),
        });
    }
    let p99 = sl("w4")
        .and_then(|rs| med(rs, "lat_p99_us"))
        .map(|x| x / 1000.0);
    t.push(Target {
        what: "W4 p99 latency at 10,000 msg/s",
        bound: "≤ 2 ms".into(),
        measured: p99,
        shown: p99.map_or("not measured".into(), |x| format!("{x:.2} ms")),
        met: p99.map(|x| x <= 2.0),
        margin: p99.map_or(String::new(), |x| format!("{:.1}× the bound", x / 2.0)),
    });
    let hwm = ["w1", "w2", "w3", "w4"]
        .iter()
        .filter_map(|w| sl(w).and_then(|rs| max_of(rs, "server_vmhwm_kb")))
        .reduce(f64::max)
        .map(|kb| kb / 1024.0);
    t.push(Target {
        what: "Peak broker RSS (VmHWM, max over all W1–W4 runs)",
        bound: "≤ 64 MiB".into(),
        measured: hwm,
        shown: hwm.map_or("not measured".into(), |x| format!("{x:.0} MiB")),
        met: hwm.map(|x| x <= 64.0),
        margin: hwm.map_or(String::new(), |x| format!("{:.1}× the bound", x / 64.0)),
    });
    let mb = sl("w5").and_then(|rs| med(rs, "mb_s"));
    t.push(Target {
        what: "W5 1 MiB messages, publish MB/s (10⁶ B/s)",
        bound: "≥ 500 MB/s".into(),
        measured: mb,
        shown: mb.map_or("not measured".into(), |x| format!("{x:.0} MB/s")),
        met: mb.map(|x| x >= 500.0),
        margin: mb.map_or(String::new(), |x| {
            format!("{:.0}% of target", x / 500.0 * 100.0)
        }),
    });
    let w6 = sl("w6");
    let kb = w6.and_then(|rs| med(rs, "rss_per_conn_kb"));
    let conns = w6.and_then(|rs| med(rs, "n")).unwrap_or(0.0);
    t.push(Target {
        what: "W6 broker RSS per idle subscribed connection",
        bound: "≤ 32 KiB at 10,000".into(),
        measured: kb,
        shown: kb.map_or("not measured".into(), |x| {
            format!("{x:.1} KiB at {}", thousands(conns))
        }),
        met: kb.filter(|_| conns >= 10_000.0).map(|x| x <= 32.0),
        margin: kb.map_or(String::new(), |x| {
            let scaled = if conns < 10_000.0 {
                " (scaled-down run)"
            } else {
                ""
            };
            format!("{:.1}× the bound{scaled}", x / 32.0)
        }),
    });
    let w7 = sl("w7");
    let ready = w7.and_then(|rs| med(rs, "ready_s"));
    let stored = w7.and_then(|rs| med(rs, "n")).unwrap_or(0.0);
    t.push(Target {
        what: "W7 ready after restart with 10,000,000 stored messages",
        bound: "≤ 2 s".into(),
        measured: ready,
        shown: ready.map_or("not measured".into(), |x| {
            format!("{x:.2} s with {}", thousands(stored))
        }),
        met: ready.filter(|_| stored >= 10_000_000.0).map(|x| x <= 2.0),
        margin: ready.map_or(String::new(), |x| {
            let scaled = if stored < 10_000_000.0 {
                " (scaled-down run)"
            } else {
                ""
            };
            format!("{:.2}× the bound{scaled}", x / 2.0)
        }),
    });
    t
}

fn targets_table(d: &Data, out: &mut String) -> Result<()> {
    writeln!(
        out,
        "\n| target (Sluice, fsync always) | bound | measured | | margin |\n|---|---|---|---|---|"
    )?;
    for t in targets(d) {
        let verdict = match t.met {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None if t.measured.is_some() => "not at full scale",
            None => "–",
        };
        writeln!(
            out,
            "| {} | {} | {} | {verdict} | {} |",
            t.what, t.bound, t.shown, t.margin
        )?;
    }
    Ok(())
}

pub fn main(args: &[String]) -> Result<()> {
    let mut files = Vec::new();
    let mut with_targets = false;
    for a in args {
        match a.as_str() {
            "--targets" => with_targets = true,
            f if !f.starts_with("--") => files.push(f.to_string()),
            f => bail!("unknown flag {f}"),
        }
    }
    if files.is_empty() {
        bail!("usage: sluice-bench report FILE.jsonl... [--targets]");
    }
    let d = Data::load(&files)?;
    let mut out = String::new();
    if with_targets {
        writeln!(out, "## Targets")?;
        targets_table(&d, &mut out)?;
        writeln!(out, "\n## Results")?;
    }
    writeln!(
        out,
        "\nMedian [min–max] over the runs; spread = ½(max−min)/median; \"vs Redis everysec\" = median over rounds of (figure ÷ Redis-everysec's figure in the same round); server µs/msg = broker CPU (utime+stime) per published message (per delivery in W3)."
    )?;
    main_tables(&d, &mut out)?;
    w4_disk_table(&d, &mut out)?;
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medians_and_thousands() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn paired_ratios_use_the_same_round() {
        let mut rows: BTreeMap<Key, Vec<Value>> = BTreeMap::new();
        let k = |p: &str, f: &str| ("w1".to_string(), p.to_string(), f.to_string());
        rows.insert(
            k("redis", "everysec"),
            vec![
                json!({"round": 1, "msgs_s": 100.0}),
                json!({"round": 2, "msgs_s": 50.0}),
                json!({"round": 3, "msgs_s": 100.0}),
            ],
        );
        rows.insert(
            k("sluice", "always"),
            vec![
                json!({"round": 1, "msgs_s": 300.0, "server_vmhwm_kb": 1000.0}),
                json!({"round": 2, "msgs_s": 200.0, "server_vmhwm_kb": 90000.0}),
                json!({"round": 3, "msgs_s": 250.0, "server_vmhwm_kb": 1000.0}),
            ],
        );
        let d = Data {
            rows,
            errors: vec![],
        };
        let sl = &d.rows[&k("sluice", "always")];
        // ratios 3.0, 4.0, 2.5 -> median 3.0 (the ratio of medians would be 2.5)
        assert_eq!(d.paired_ratio("w1", sl, "msgs_s"), Some(3.0));
        let t = targets(&d);
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].met, None);
        // peak RSS is the max over runs, not the median
        assert_eq!(t[4].met, Some(false));
    }
}
