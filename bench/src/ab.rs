//! `sluice-bench ab FILE.jsonl... [--pair W:NUM/DEN[@BOUND]]... [--sweep LABEL[@P99_US]]`:
//! A/B tables of runs told apart by `--label`, paired by `--round` (as in BENCHMARKS.md: the
//! same bench binary, the two sides interleaved in every round, the median of the per-round
//! ratios, so that slow drift of a shared machine cancels out).
//!
//! * `--pair w1:new/base@0.95`: per round, workload `w1`'s key figure (msgs/s; W3
//!   deliveries/s; W4 p99, where lower is better) of the runs labelled `new` and `base`, their
//!   ratio new ÷ base, and the median ratio, judged against BOUND in the figure's good
//!   direction (≥ BOUND, or ≤ BOUND for W4's latency).
//! * `--sweep sweep@2000`: the W4 runs labelled `sweep` (`--sweep-gib`): p99 against the bound
//!   (µs), when the sweep ran relative to the run, and the latency of the messages sent around
//!   it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// Runs by (workload, label), then round.
type Runs = BTreeMap<(String, String), BTreeMap<u64, Value>>;

struct Pair {
    workload: String,
    num: String,
    den: String,
    bound: Option<f64>,
}

fn parse_pair(s: &str) -> Result<Pair> {
    let err = || anyhow!("--pair WORKLOAD:NUM/DEN[@BOUND], got {s:?}");
    let (workload, rest) = s.split_once(':').ok_or_else(err)?;
    let (labels, bound) = match rest.split_once('@') {
        Some((l, b)) => (l, Some(b.parse::<f64>().map_err(|_| err())?)),
        None => (rest, None),
    };
    let (num, den) = labels.split_once('/').ok_or_else(err)?;
    if workload.is_empty() || num.is_empty() || den.is_empty() {
        return Err(err());
    }
    Ok(Pair {
        workload: workload.into(),
        num: num.into(),
        den: den.into(),
        bound,
    })
}

/// The figure a workload is judged by, its unit, and whether lower is better.
fn figure(workload: &str) -> (&'static str, &'static str, bool) {
    match workload {
        "w3" => ("deliveries_s", "deliveries/s", false),
        "w4" => ("lat_p99_us", "p99 µs", true),
        "w5" => ("mb_s", "MB/s", false),
        _ => ("msgs_s", "msgs/s", false),
    }
}

fn num(v: &Value, f: &str) -> Option<f64> {
    v.get(f).and_then(Value::as_f64)
}

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

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.prec$}"))
}

fn load(files: &[String]) -> Result<(Runs, Vec<Value>)> {
    let mut runs = Runs::new();
    let mut errors = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        for l in text.lines().map(str::trim).filter(|l| l.starts_with('{')) {
            let v: Value = serde_json::from_str(l).with_context(|| format!("in {path}"))?;
            if v.get("error").is_some() {
                errors.push(v);
                continue;
            }
            let w = v["workload"].as_str().unwrap_or("").to_string();
            let label = v["label"].as_str().unwrap_or("").to_string();
            let round = v["round"].as_u64().unwrap_or(0);
            runs.entry((w, label)).or_default().insert(round, v);
        }
    }
    Ok((runs, errors))
}

/// What the broker of a run was told and did beyond the workload: ids (as many remembered
/// as messages published) and the retention config in force on the topic.
fn setup_of(v: &Value) -> String {
    let mut parts = Vec::new();
    match (v["ids"].as_bool(), num(v, "server_dedup_ids")) {
        (Some(true), Some(d)) => parts.push(format!("ids on ({d:.0} remembered)")),
        (Some(false), _) => parts.push("ids off".into()),
        _ => {}
    }
    if let Some(i) = v["retention_interval"].as_str() {
        let age = num(v, "topic_max_age_ms").map_or("?".into(), |a| format!("{:.0} s", a / 1e3));
        parts.push(format!("sweep every {i}, max_age {age}"));
    }
    if v["mode"].as_str() == Some("broadcast") {
        parts.push(format!(
            "broadcast {}×{}",
            v["groups"].as_u64().unwrap_or(0),
            v["consumers"].as_u64().unwrap_or(0)
        ));
    } else if let (Some(g), Some(c)) = (v["groups"].as_u64(), v["consumers"].as_u64()) {
        if g > 0 {
            parts.push(format!("{g} group(s) × {c}"));
        }
    }
    parts.join(", ")
}

fn pair_table(runs: &Runs, p: &Pair, out: &mut String) -> Result<Option<bool>> {
    let (f, unit, lower_better) = figure(&p.workload);
    let empty = BTreeMap::new();
    let a = runs
        .get(&(p.workload.clone(), p.num.clone()))
        .unwrap_or(&empty);
    let b = runs
        .get(&(p.workload.clone(), p.den.clone()))
        .unwrap_or(&empty);
    let better = if lower_better { "lower" } else { "higher" };
    let bound = p.bound.map_or(String::new(), |x| {
        format!("; bound {} {x}", if lower_better { "≤" } else { "≥" })
    });
    writeln!(
        out,
        "\n### {}: {} ÷ {} ({unit}, {better} is better{bound})\n",
        p.workload, p.num, p.den
    )?;
    writeln!(
        out,
        "| round | {} | {} | ratio | p50 µs {} / {} | {} | {} |\n|---|---|---|---|---|---|---|",
        p.num, p.den, p.num, p.den, p.num, p.den
    )?;
    let mut ratios = Vec::new();
    let rounds: std::collections::BTreeSet<u64> = a.keys().chain(b.keys()).copied().collect();
    for r in rounds {
        let (x, y) = (a.get(&r), b.get(&r));
        let fx = x.and_then(|v| num(v, f));
        let fy = y.and_then(|v| num(v, f));
        let ratio = fx.zip(fy).filter(|(_, y)| *y != 0.0).map(|(x, y)| x / y);
        ratios.extend(ratio);
        let p50 = |v: Option<&Value>| cell(v.and_then(|v| num(v, "lat_p50_us")), 0);
        writeln!(
            out,
            "| {r} | {} | {} | {} | {} / {} | {} | {} |",
            cell(fx, 0),
            cell(fy, 0),
            cell(ratio, 3),
            p50(x),
            p50(y),
            x.map_or("–".into(), setup_of),
            y.map_or("–".into(), setup_of),
        )?;
    }
    let m = median(&ratios);
    let met = m
        .zip(p.bound)
        .map(|(m, b)| if lower_better { m <= b } else { m >= b });
    let verdict = match met {
        Some(true) => " → **met**",
        Some(false) => " → **missed**",
        None => "",
    };
    writeln!(
        out,
        "\nmedian of {} per-round ratios: **{}**{verdict}",
        ratios.len(),
        cell(m, 3)
    )?;
    Ok(met)
}

fn sweep_table(runs: &Runs, label: &str, bound_us: f64, out: &mut String) -> Result<Option<bool>> {
    let empty = BTreeMap::new();
    let rs = runs
        .get(&("w4".to_string(), label.to_string()))
        .unwrap_or(&empty);
    writeln!(
        out,
        "\n### w4 with a sweep ({label}): p99 against {bound_us:.0} µs\n\n\
         Seconds from the first publish: the topic's max_age cut to 1 s, the last poll before \
         the floor moved, the first that saw it, the first that saw the files gone; the run's \
         end (last ack); the messages sent from the last quiet poll to 0.5 s after the files \
         went.\n"
    )?;
    writeln!(
        out,
        "| round | p99 µs | p50 µs | removed MB | cut | quiet | detached | unlinked | end | during run | sent around it | their p99 / max µs | |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut all_ok: Option<bool> = None;
    for (r, v) in rs {
        let s = |f: &str| cell(num(v, f), 2);
        let p99 = num(v, "lat_p99_us");
        let overlapped = v["sweep_in_run"].as_bool() == Some(true)
            && num(v, "sweep_unlinked_s")
                .or(num(v, "sweep_detached_s"))
                .zip(num(v, "e2e_s"))
                .is_some_and(|(u, e)| u <= e);
        let ok = p99.map(|p| p <= bound_us);
        let note = match (v["sweep_error"].as_str(), overlapped, ok) {
            (Some(e), _, _) => format!("sweep error: {e}"),
            (None, false, _) => "sweep not within the run".into(),
            (None, true, Some(true)) => "met".into(),
            (None, true, Some(false)) => "**missed**".into(),
            (None, true, None) => "–".into(),
        };
        if overlapped && v["sweep_error"].is_null() {
            all_ok = Some(all_ok.unwrap_or(true) && ok.unwrap_or(false));
        }
        writeln!(
            out,
            "| {r} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {note} |",
            cell(p99, 0),
            cell(num(v, "lat_p50_us"), 0),
            cell(num(v, "sweep_removed_bytes").map(|b| b / 1e6), 0),
            s("sweep_cut_s"),
            s("sweep_quiet_s"),
            s("sweep_detached_s"),
            s("sweep_unlinked_s"),
            s("e2e_s"),
            if overlapped { "yes" } else { "no" },
            cell(num(v, "sweep_msgs"), 0),
            cell(num(v, "sweep_lat_p99_us"), 0),
            cell(num(v, "sweep_lat_max_us"), 0),
        )?;
    }
    let verdict = match all_ok {
        Some(true) => "**met** in every round where the removal overlapped the run",
        Some(false) => "**missed** in a round where the removal overlapped the run",
        None => "no round where the removal overlapped the run",
    };
    writeln!(out, "\n{verdict}")?;
    Ok(all_ok)
}

pub fn main(args: &[String]) -> Result<()> {
    let (mut files, mut pairs, mut sweeps) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = || -> Result<String> {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| anyhow!("missing value for {a}"))
        };
        match a {
            "--pair" => pairs.push(parse_pair(&value()?)?),
            "--sweep" => {
                let v = value()?;
                let (label, bound) = match v.split_once('@') {
                    Some((l, b)) => (l.to_string(), b.parse::<f64>()?),
                    None => (v, 2000.0),
                };
                sweeps.push((label, bound));
            }
            f if !f.starts_with("--") => files.push(f.to_string()),
            f => bail!("unknown flag {f}"),
        }
        i += 1;
    }
    if files.is_empty() || (pairs.is_empty() && sweeps.is_empty()) {
        bail!("usage: sluice-bench ab FILE.jsonl... [--pair W:NUM/DEN[@BOUND]]... [--sweep LABEL[@P99_US]]");
    }
    let (runs, errors) = load(&files)?;
    let mut out = String::new();
    let mut summary = Vec::new();
    for p in &pairs {
        let met = pair_table(&runs, p, &mut out)?;
        summary.push((format!("{} {} ÷ {}", p.workload, p.num, p.den), met));
    }
    for (label, bound) in &sweeps {
        let met = sweep_table(&runs, label, *bound, &mut out)?;
        summary.push((format!("w4 {label} p99 ≤ {bound:.0} µs"), met));
    }
    if !errors.is_empty() {
        writeln!(out, "\n### Failed runs\n")?;
        for e in &errors {
            writeln!(
                out,
                "* round {} {} {}: {}",
                e["round"],
                e["workload"].as_str().unwrap_or("?"),
                e["label"].as_str().unwrap_or(""),
                e["error"]
                    .as_str()
                    .unwrap_or("?")
                    .lines()
                    .next()
                    .unwrap_or("")
            )?;
        }
    }
    writeln!(out, "\n### Summary\n")?;
    for (what, met) in summary {
        let v = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "no verdict",
        };
        writeln!(out, "* {what}: {v}")?;
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn runs(lines: &[Value]) -> Runs {
        let mut r = Runs::new();
        for v in lines {
            r.entry((
                v["workload"].as_str().unwrap().to_string(),
                v["label"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .insert(v["round"].as_u64().unwrap(), v.clone());
        }
        r
    }

    #[test]
    fn pairs_parse() {
        let p = parse_pair("w3:bcast/groups4@1").unwrap();
        assert_eq!(
            (p.workload.as_str(), p.num.as_str(), p.den.as_str(), p.bound),
            ("w3", "bcast", "groups4", Some(1.0))
        );
        assert!(parse_pair("w1:new/base").unwrap().bound.is_none());
        assert!(parse_pair("w1:new").is_err());
        assert!(parse_pair("w1:new/base@x").is_err());
    }

    #[test]
    fn ratios_pair_by_round_and_lower_is_better_for_w4() {
        let r = runs(&[
            json!({"workload": "w1", "label": "new", "round": 1, "msgs_s": 90.0}),
            json!({"workload": "w1", "label": "base", "round": 1, "msgs_s": 100.0}),
            json!({"workload": "w1", "label": "new", "round": 2, "msgs_s": 200.0}),
            json!({"workload": "w1", "label": "base", "round": 2, "msgs_s": 200.0}),
            json!({"workload": "w1", "label": "new", "round": 3, "msgs_s": 60.0}),
            json!({"workload": "w1", "label": "base", "round": 3, "msgs_s": 50.0}),
            json!({"workload": "w4", "label": "new", "round": 1, "lat_p99_us": 1100.0}),
            json!({"workload": "w4", "label": "base", "round": 1, "lat_p99_us": 1000.0}),
        ]);
        let mut out = String::new();
        // ratios 0.9, 1.0, 1.2: median 1.0
        let p = parse_pair("w1:new/base@0.95").unwrap();
        assert_eq!(pair_table(&r, &p, &mut out).unwrap(), Some(true));
        assert!(out.contains("**1.000**"), "{out}");
        let p = parse_pair("w1:new/base@1.05").unwrap();
        assert_eq!(pair_table(&r, &p, &mut out).unwrap(), Some(false));
        // w4: p99 ratio 1.1, lower is better
        let p = parse_pair("w4:new/base@1.05").unwrap();
        assert_eq!(pair_table(&r, &p, &mut out).unwrap(), Some(false));
        let p = parse_pair("w4:new/base@1.15").unwrap();
        assert_eq!(pair_table(&r, &p, &mut out).unwrap(), Some(true));
    }

    #[test]
    fn sweeps_are_judged_only_when_they_overlap_the_run() {
        let run = |round: u64, p99: f64, unlinked: f64| {
            json!({"workload": "w4", "label": "sweep", "round": round, "lat_p99_us": p99,
                   "e2e_s": 10.0, "sweep_in_run": true, "sweep_unlinked_s": unlinked})
        };
        let mut out = String::new();
        let r = runs(&[run(1, 1500.0, 3.0), run(2, 2500.0, 12.0)]);
        assert_eq!(
            sweep_table(&r, "sweep", 2000.0, &mut out).unwrap(),
            Some(true)
        );
        let r = runs(&[run(1, 1500.0, 3.0), run(2, 2500.0, 4.0)]);
        assert_eq!(
            sweep_table(&r, "sweep", 2000.0, &mut out).unwrap(),
            Some(false)
        );
        let r = runs(&[run(1, 1500.0, 13.0)]);
        assert_eq!(sweep_table(&r, "sweep", 2000.0, &mut out).unwrap(), None);
    }
}
