//! `sluice stats`: the broker's actor, group and connection stats, as tables or JSON.

use anyhow::Context as _;
use sluice_sdk::protocol::GroupStats;
use sluice_sdk::{Admin, BrokerStats, SyncStats};

use super::{format_ms, is_broken_pipe, write_stdout, ConnectionArgs};

/// `sluice stats`: show actor, group and connection stats.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    /// Print the raw stats as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `sluice stats`.
pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let admin = Admin::connect(args.conn.client_config("stats")).await?;
    let stats = admin.stats().await.context("admin.stats failed")?;
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&stats)?;
        s.push('\n');
        s
    } else {
        render(&stats)
    };
    match write_stdout(&out) {
        Err(e) if !is_broken_pipe(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

use Align::{Left as L, Right as R};

/// A plain-text table: a header row and aligned columns separated by two spaces.
pub(crate) fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, ((cell, width), (_, align))) in cells.iter().zip(&widths).zip(headers).enumerate() {
            let last = i + 1 == headers.len();
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            match align {
                Align::Right => {
                    s.extend(std::iter::repeat_n(' ', pad));
                    s.push_str(cell);
                }
                Align::Left => {
                    s.push_str(cell);
                    if !last {
                        s.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(headers.iter().map(|(h, _)| *h).collect());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One line on the store's syncs: how many, how long, how many took over 2 ms.
fn sync_line(s: &SyncStats) -> Option<String> {
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    let p99 = s.percentile_bound(99.0)?;
    let (slow, slow_us) = s.over(2_000);
    Some(format!(
        "syncs {}  mean {}  p99 <= {}  max {}  over 2 ms: {} ({})  failed {}\n",
        s.count,
        ms(s.total_us / s.count.max(1)),
        ms(p99),
        ms(s.max_us),
        slow,
        ms(slow_us),
        s.failed
    ))
}

/// `-` for nothing, else the value.
fn opt_ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), format_ms)
}

/// Hash ranges as `start-end,start-end` (`-` for none).
pub(crate) fn hash_ranges(ranges: &[(u32, u32)]) -> String {
    if ranges.is_empty() {
        return "-".into();
    }
    ranges
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One row per group: cursor, lag, in-flight, failures, consumers and their staleness.
pub(crate) fn groups_table(groups: &[GroupStats]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.topic.clone(),
                g.group.clone(),
                g.mode.to_string(),
                if g.loaded { "yes" } else { "no" }.to_string(),
                g.head_seq.to_string(),
                g.acked_floor.to_string(),
                g.lag.to_string(),
                g.in_flight_batches.to_string(),
                g.in_flight_messages.to_string(),
                g.redeliveries.to_string(),
                g.dead_letters.to_string(),
                g.consumers.to_string(),
                g.stale_consumers.to_string(),
                g.last_ack_ms_ago
                    .map_or_else(|| "-".to_string(), |ms| format!("{} ago", format_ms(ms))),
                opt_ms(g.oldest_unacked_age_ms),
                g.skipped_by_retention.to_string(),
                g.ack_ranges.to_string(),
                g.rejected_acks.to_string(),
                g.memory_pressure.to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("TOPIC", L),
            ("GROUP", L),
            ("MODE", L),
            ("LOADED", L),
            ("HEAD", R),
            ("ACKED", R),
            ("LAG", R),
            ("IN-FLIGHT", R),
            ("IN-FLIGHT MSGS", R),
            ("REDELIVERED", R),
            ("DEAD", R),
            ("CONSUMERS", R),
            ("STALE", R),
            ("LAST ACK", R),
            ("OLDEST UNACKED", R),
            ("SKIPPED", R),
            ("ACK RANGES", R),
            ("REJECTED", R),
            ("AT BOUND", R),
        ],
        &rows,
    )
}

/// One row per consumer of every group.
pub(crate) fn consumers_table(groups: &[GroupStats]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .flat_map(|g| {
            g.consumer_details.iter().map(move |c| {
                vec![
                    g.topic.clone(),
                    g.group.clone(),
                    c.consumer.clone(),
                    if c.active { "yes" } else { "no" }.to_string(),
                    c.in_flight_batches.to_string(),
                    c.in_flight_messages.to_string(),
                    c.delivered.to_string(),
                    c.acked.to_string(),
                    c.lag.to_string(),
                    format!("{} ago", format_ms(c.last_ack_ms_ago)),
                    opt_ms(c.oldest_unacked_age_ms),
                    if c.stale { "STALE" } else { "-" }.to_string(),
                    hash_ranges(&c.hash_ranges),
                ]
            })
        })
        .collect();
    table(
        &[
            ("TOPIC", L),
            ("GROUP", L),
            ("CONSUMER", L),
            ("ACTIVE", L),
            ("IN-FLIGHT", R),
            ("IN-FLIGHT MSGS", R),
            ("DELIVERED", R),
            ("ACKED", R),
            ("LAG", R),
            ("LAST ACK", R),
            ("OLDEST UNACKED", R),
            ("STALE", L),
            ("HASH RANGES", L),
        ],
        &rows,
    )
}

/// The tables of `sluice stats`, under a one-line broker summary.
pub fn render(stats: &BrokerStats) -> String {
    let mut out = format!(
        "broker {}  up {}  fsync {}\n",
        stats.version,
        format_ms(stats.uptime_ms),
        stats.fsync
    );
    if let Some(line) = stats.syncs.as_ref().and_then(sync_line) {
        out.push_str(&line);
    }
    if let Some(s) = &stats.syncs {
        out.push_str(&format!(
            "store  dedup ids {} in {} entries (forgotten early {})  groups waiting for their topic {} (refused {})\n",
            s.dedup_ids, s.dedup_entries, s.dedup_ids_forgotten, s.waiting_groups, s.waiting_groups_refused
        ));
        out.push_str(&format!(
            "removed  {} MiB freed in {} files ({} steps), {} MiB still to free\n",
            mib(s.removed_bytes),
            s.removed_files,
            s.remove_steps,
            mib(s.remove_pending_bytes)
        ));
    }
    if let Some(l) = &stats.limits {
        out.push_str(&format!(
            "limits  slow clients disconnected {}  oversize batches dropped {}  lifetimes expired {}  keepalive pings {}  events lost {}\n",
            l.slow_clients_disconnected, l.oversize_batches_dropped, l.lifetimes_expired, l.keepalive_pings, l.events_lost
        ));
    }

    out.push_str(&format!("\nACTORS ({})\n", stats.actors.len()));
    let rows: Vec<Vec<String>> = stats
        .actors
        .iter()
        .map(|a| {
            vec![
                a.kind.clone(),
                a.name.clone(),
                a.handled.to_string(),
                a.mailbox_backlog
                    .map_or_else(|| "-".to_string(), |b| b.to_string()),
                a.restarts.to_string(),
                format_ms(a.uptime_ms),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            ("KIND", L),
            ("NAME", L),
            ("HANDLED", R),
            ("BACKLOG", R),
            ("RESTARTS", R),
            ("UPTIME", R),
        ],
        &rows,
    ));

    out.push_str(&format!("\nGROUPS ({})\n", stats.groups.len()));
    out.push_str(&groups_table(&stats.groups));
    let consumers: usize = stats.groups.iter().map(|g| g.consumer_details.len()).sum();
    if consumers > 0 {
        out.push_str(&format!("\nCONSUMERS ({consumers})\n"));
        out.push_str(&consumers_table(&stats.groups));
    }

    out.push_str(&format!("\nCONNECTIONS ({})\n", stats.connections.len()));
    let rows: Vec<Vec<String>> = stats
        .connections
        .iter()
        .map(|c| {
            vec![
                c.conn_id.to_string(),
                c.client_id.clone(),
                c.peer.clone(),
                if c.groups.is_empty() {
                    "-".to_string()
                } else {
                    c.groups.join(",")
                },
                c.in_flight_batches.to_string(),
                format!("{} ago", format_ms(c.last_heartbeat_ms_ago)),
                format_ms(c.connected_ms),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            ("ID", R),
            ("CLIENT", L),
            ("PEER", L),
            ("GROUPS", L),
            ("IN-FLIGHT", R),
            ("LAST HEARTBEAT", R),
            ("CONNECTED", R),
        ],
        &rows,
    ));
    out
}

/// Bytes as MiB with one decimal.
fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::protocol::{ActorStats, ConnectionStats, GroupStats, LimitStats};
    use sluice_sdk::GroupMode;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &[("NAME", L), ("N", R), ("NOTE", L)],
            &[
                vec!["a".into(), "1".into(), "x".into()],
                vec!["long-name".into(), "12345".into(), "y".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME           N  NOTE\n\
             a              1  x\n\
             long-name  12345  y\n"
        );
    }

    #[test]
    fn renders_every_section() {
        let stats = BrokerStats {
            version: "0.1.0".into(),
            uptime_ms: 61_000,
            fsync: "always".into(),
            actors: vec![ActorStats {
                kind: "orchestrator".into(),
                name: "orchestrator-0".into(),
                handled: 1234,
                mailbox_backlog: Some(3),
                restarts: 1,
                uptime_ms: 5_000,
            }],
            groups: vec![GroupStats {
                topic: "orders".into(),
                group: "billing".into(),
                mode: GroupMode::KeyShared,
                head_seq: 100,
                acked_floor: 90,
                lag: 10,
                in_flight_batches: 2,
                in_flight_messages: 8,
                redeliveries: 4,
                dead_letters: 1,
                consumers: 3,
                ack_ranges: 1,
                rejected_acks: 5,
                stale_consumers: 1,
                last_ack_ms_ago: Some(90_000),
                skipped_by_retention: 12,
                loaded: true,
                consumer_details: vec![sluice_sdk::protocol::ConsumerStats {
                    consumer: "7:1".into(),
                    conn_id: 7,
                    in_flight_batches: 2,
                    in_flight_messages: 8,
                    delivered: 40,
                    acked: 32,
                    lag: 10,
                    oldest_unacked_age_ms: Some(61_000),
                    last_ack_ms_ago: 90_000,
                    stale: true,
                    active: true,
                    hash_ranges: vec![(0, 32767), (49152, 65535)],
                }],
                ..Default::default()
            }],
            connections: vec![ConnectionStats {
                conn_id: 7,
                client_id: "cli".into(),
                peer: "127.0.0.1:5555".into(),
                groups: vec!["orders/billing".into()],
                in_flight_batches: 2,
                last_heartbeat_ms_ago: 250,
                connected_ms: 3_600_000,
            }],
            syncs: None,
            limits: Some(LimitStats {
                slow_clients_disconnected: 2,
                ..Default::default()
            }),
        };
        let mut syncs = SyncStats::new();
        for us in [200, 300, 2_500] {
            syncs.record(us, true);
        }
        let stats = BrokerStats {
            syncs: Some(syncs),
            ..stats
        };
        let out = render(&stats);
        assert!(
            out.starts_with(
                "broker 0.1.0  up 1m 1s  fsync always\n\
                 syncs 3  mean 1.00 ms  p99 <= 2.50 ms  max 2.50 ms  over 2 ms: 1 (2.50 ms)  failed 0\n"
            ),
            "{out}"
        );
        for needle in [
            "ACTORS (1)",
            "orchestrator-0",
            "GROUPS (1)",
            "key_shared",
            "CONNECTIONS (1)",
            "orders/billing",
            "limits  slow clients disconnected 2  oversize batches dropped 0",
            "ACK RANGES",
            "250ms ago",
            "1h",
            "STALE",
            "1m 30s ago",
            "SKIPPED",
            "CONSUMERS (1)",
            "0-32767,49152-65535",
            "events lost 0",
            "store  dedup ids 0 in 0 entries (forgotten early 0)",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        // header and row of each table have the same width up to the last column
        let lines: Vec<&str> = out.lines().collect();
        let groups = lines
            .iter()
            .position(|l| l.starts_with("GROUPS"))
            .expect("groups");
        let header = lines[groups + 1];
        let row = lines[groups + 2];
        assert_eq!(
            header.find("HEAD").map(|i| i + 4),
            row.find("100").map(|i| i + 3)
        );

        let empty = render(&BrokerStats::default());
        assert!(empty.contains("ACTORS (0)\nKIND"));
    }
}
