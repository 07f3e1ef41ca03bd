//! `sluice admin events|disconnect-stale`: the broker's lifecycle events and stale consumers.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use sluice_sdk::protocol::{event_kind, DisconnectStaleReply};
use sluice_sdk::{Admin, BrokerEvent};

use super::{format_ms, format_time_ms, json_line, output, parse_duration, ConnectionArgs};

/// `sluice admin`: lifecycle events and stale consumers.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: AdminCommand,
}

/// What `sluice admin` does.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Print the broker's lifecycle events as they happen (until Ctrl-C or --count).
    Events(EventsArgs),
    /// Disconnect every consumer with lag and no ack for --older-than; their batches go to
    /// the group's other consumers.
    DisconnectStale(DisconnectStaleArgs),
}

/// `admin events`.
#[derive(clap::Args, Debug, Clone)]
pub struct EventsArgs {
    /// Only this kind (repeatable; e.g. consumer_stale, retention_removed).
    #[arg(long = "kind", value_name = "KIND", value_parser = parse_kind)]
    pub kinds: Vec<String>,
    /// Exit after N events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// One JSON object per event per line (with at least `kind` and `at_ms`).
    #[arg(long)]
    pub json: bool,
}

/// `admin disconnect-stale`.
#[derive(clap::Args, Debug, Clone)]
pub struct DisconnectStaleArgs {
    /// Consumers with lag and no ack for at least this long (humantime, e.g. 5m).
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = parse_duration)]
    pub older_than: Duration,
    /// Print one JSON object (`{"disconnected": [...]}`).
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(s: &str) -> Result<String, String> {
    if event_kind::ALL.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown event kind '{s}' (known: {})",
            event_kind::ALL.join(", ")
        ))
    }
}

/// Runs `sluice admin`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let admin = Admin::connect(args.conn.client_config("admin")).await?;
    match args.command {
        AdminCommand::Events(a) => tail_events(&admin, a).await,
        AdminCommand::DisconnectStale(a) => {
            let r = admin
                .disconnect_stale(a.older_than)
                .await
                .context("admin.disconnect_stale failed")?;
            output(&render_disconnected(&r, a.json)?)
        }
    }
}

async fn tail_events(admin: &Admin, args: EventsArgs) -> anyhow::Result<()> {
    let mut events = admin
        .events(args.kinds.clone())
        .await
        .context("cannot subscribe to admin.events")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut printed = 0u64;
    while args.count.is_none_or(|n| printed < n) {
        let event = tokio::select! {
            e = events.next() => e,
            _ = &mut ctrl_c => break,
        };
        let Some(event) = event else { break };
        let event = event.context("admin.events failed")?;
        let line = if args.json {
            json_line(&event)?
        } else {
            text_line(&event)
        };
        match super::write_stdout(&line) {
            Ok(()) => {}
            Err(e) if super::is_broken_pipe(&e) => break,
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
        printed += 1;
    }
    Ok(())
}

/// The readable line of an event: time, kind, then the fields it has.
pub fn text_line(e: &BrokerEvent) -> String {
    let mut line = format!("{}  {}", format_time_ms(e.at_ms), e.kind);
    let mut field = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            line.push_str(&format!("  {name}={v}"));
        }
    };
    field("topic", e.topic.clone());
    field("group", e.group.clone());
    field("consumer", e.consumer.clone());
    field("actor", e.actor.clone());
    field("seq", e.seq.map(|v| v.to_string()));
    field("count", e.count.map(|v| v.to_string()));
    field("bytes", e.bytes.map(|v| v.to_string()));
    if let Some(d) = &e.detail {
        let d: String = d
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        line.push_str(&format!("  {d}"));
    }
    line.push('\n');
    line
}

fn render_disconnected(r: &DisconnectStaleReply, json: bool) -> anyhow::Result<String> {
    if json {
        return json_line(r);
    }
    if r.disconnected.is_empty() {
        return Ok("no stale consumer\n".into());
    }
    let mut out = format!("disconnected {} stale consumers\n", r.disconnected.len());
    for c in &r.disconnected {
        out.push_str(&format!(
            "  {} {}/{}  idle {}  lag {}\n",
            c.consumer,
            c.topic,
            c.group,
            format_ms(c.idle_ms),
            c.lag
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        args: AdminArgs,
    }

    fn parse(argv: &[&str]) -> Result<AdminArgs, clap::Error> {
        let mut full = vec!["sluice-admin"];
        full.extend_from_slice(argv);
        Probe::try_parse_from(full).map(|p| p.args)
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--addr",
            "h:1",
            "events",
            "--json",
            "--kind",
            "consumer_stale",
        ])
        .expect("parse");
        assert_eq!(a.conn.addr, "h:1");
        let AdminCommand::Events(e) = a.command else {
            panic!("events")
        };
        assert!(e.json);
        assert_eq!(e.kinds, vec!["consumer_stale".to_string()]);
        assert!(parse(&["events", "--kind", "nope"]).is_err());
        let d = parse(&["disconnect-stale", "--older-than", "5m"]).expect("parse");
        let AdminCommand::DisconnectStale(d) = d.command else {
            panic!("disconnect-stale")
        };
        assert_eq!(d.older_than, Duration::from_secs(300));
        assert!(parse(&["disconnect-stale", "--older-than", "soon"]).is_err());
        assert!(
            parse(&["disconnect-stale"]).is_err(),
            "--older-than required"
        );
    }

    #[test]
    fn event_lines() {
        let e = BrokerEvent {
            kind: "retention_removed".into(),
            at_ms: 1000,
            topic: Some("t".into()),
            count: Some(5),
            seq: Some(6),
            detail: Some("max_age\n".into()),
            ..Default::default()
        };
        assert_eq!(
            text_line(&e),
            "1970-01-01T00:00:01.000Z  retention_removed  topic=t  seq=6  count=5  max_age \n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&e).expect("json")).expect("json");
        assert_eq!(
            (v["kind"].as_str(), v["at_ms"].as_u64()),
            (Some("retention_removed"), Some(1000))
        );
        let r = DisconnectStaleReply {
            disconnected: vec![sluice_sdk::protocol::StaleConsumer {
                topic: "t".into(),
                group: "g".into(),
                consumer: "3:1".into(),
                idle_ms: 61_000,
                lag: 4,
            }],
        };
        assert!(render_disconnected(&r, false)
            .expect("text")
            .contains("3:1 t/g  idle 1m 1s  lag 4"));
        assert_eq!(
            render_disconnected(&DisconnectStaleReply::default(), false).expect("text"),
            "no stale consumer\n"
        );
    }
}
