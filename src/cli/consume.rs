//! `sluice consume`: print each message of a group, ack it after printing.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use sluice_sdk::{Consumer, ConsumerConfig, DeliveredMessage, GroupMode};

use super::{is_broken_pipe, parse_duration, parse_kv, write_stdout, ConnectionArgs};

/// `sluice consume`: consume a topic as a group.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    /// Topic to consume.
    #[arg(long)]
    pub topic: String,
    /// Group (durable cursor) to consume as; created on first use.
    #[arg(long)]
    pub group: String,
    /// Group mode: exclusive, failover, shared, key_shared or broadcast.
    #[arg(long, default_value = "shared")]
    pub mode: GroupMode,
    /// Header filter of the group (repeatable; exact match, all must hold).
    #[arg(long = "filter", value_name = "K=V", value_parser = parse_kv)]
    pub filters: Vec<(String, String)>,
    /// Most unacked batches the broker sends this consumer.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub window: Option<u32>,
    /// Most messages per batch.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Option<u32>,
    /// Exit after N messages (their acks flushed).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Exit when no message arrived for this long (humantime, e.g. 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// One JSON object per message per line.
    #[arg(long)]
    pub json: bool,
    /// Print messages without acking them: the broker redelivers them after its batch timeout
    /// or once this consumer disconnects (for inspecting a group, or tests).
    #[arg(long)]
    pub no_ack: bool,
}

impl ConsumeArgs {
    fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig {
            client: self.conn.client_config("consume"),
            topic: self.topic.clone(),
            group: self.group.clone(),
            mode: self.mode,
            filters: self.filters.iter().cloned().collect::<BTreeMap<_, _>>(),
            // With --count, ask for no more than is needed, so that messages this command will
            // not print are not held (and redelivered) needlessly.
            window: self
                .window
                .or(self.count.map(|n| n.div_ceil(16).clamp(1, 4) as u32)),
            batch_size: self
                .batch_size
                .or(self.count.map(|n| n.clamp(1, 16) as u32)),
            ..Default::default()
        }
    }
}

/// Why the loop ended without an error.
enum Stop {
    Count,
    Idle,
    Interrupted,
    StdoutClosed,
    ConsumerEnded,
}

/// Runs `sluice consume`.
pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let config = args.consumer_config();
    config.validate()?;
    let mut consumer = Consumer::subscribe(config).await?;
    let outcome = consume_loop(&mut consumer, &args).await;
    // Whatever happened, make the acks we made durable before exiting.
    let flush_limit = args.conn.request_timeout.saturating_mul(3);
    let flushed = match tokio::time::timeout(flush_limit, consumer.flush_acks()).await {
        Ok(r) => r.context("cannot flush acks"),
        Err(_) => Err(anyhow::anyhow!(
            "acks not confirmed by the broker within {}",
            humantime::format_duration(flush_limit)
        )),
    };
    let stop = outcome?;
    flushed?;
    tracing::debug!(
        reason = match stop {
            Stop::Count => "count reached",
            Stop::Idle => "idle timeout",
            Stop::Interrupted => "interrupted",
            Stop::StdoutClosed => "stdout closed",
            Stop::ConsumerEnded => "consumer ended",
        },
        "consume finished"
    );
    Ok(())
}

async fn consume_loop(consumer: &mut Consumer, args: &ConsumeArgs) -> anyhow::Result<Stop> {
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = async {
            match args.idle_timeout {
                Some(idle) => tokio::time::timeout(idle, consumer.next()).await.ok(),
                None => Some(consumer.next().await),
            }
        };
        let item = tokio::select! {
            item = next => item,
            _ = &mut ctrl_c => return Ok(Stop::Interrupted),
        };
        let received = match item {
            None => return Ok(Stop::Idle),
            Some(None) => return Ok(Stop::ConsumerEnded),
            Some(Some(Err(e))) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("consuming {} as {} failed", args.topic, args.group)))
            }
            Some(Some(Ok(r))) => r,
        };
        let line = if args.json {
            json_line(&received.topic, &received.group, &received.message)
        } else {
            text_line(&received.message)
        };
        match write_stdout(&line) {
            Ok(()) => {}
            // Not printed, so not acked: the broker redelivers it.
            Err(e) if is_broken_pipe(&e) => return Ok(Stop::StdoutClosed),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
        if !args.no_ack {
            consumer.ack(&received)?;
        }
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            return Ok(Stop::Count);
        }
    }
}

/// The `--json` line: exactly `topic`, `group`, `seq`, `key`, `headers`, `priority`, `attempt`,
/// `timestamp_ms` and `payload` (UTF-8) or `payload_b64` (standard base64).
pub fn json_line(topic: &str, group: &str, m: &DeliveredMessage) -> String {
    let mut v = serde_json::json!({
        "topic": topic,
        "group": group,
        "seq": m.seq,
        "key": m.key,
        "headers": m.headers,
        "priority": m.priority,
        "attempt": m.attempt,
        "timestamp_ms": m.timestamp_ms,
    });
    let (field, payload) = match std::str::from_utf8(&m.payload) {
        Ok(text) => ("payload", text.to_string()),
        Err(_) => (
            "payload_b64",
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
        ),
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert(field.to_string(), serde_json::Value::String(payload));
    }
    format!("{v}\n")
}

/// The readable line: seq, key, attempt, then the payload text (control characters escaped) or
/// `<N bytes>` when it is not UTF-8.
pub fn text_line(m: &DeliveredMessage) -> String {
    let payload = match std::str::from_utf8(&m.payload) {
        Ok(text) => printable(text),
        Err(_) => Cow::Owned(format!("<{} bytes>", m.payload.len())),
    };
    format!(
        "seq={} key={} attempt={} {}\n",
        m.seq,
        m.key.as_deref().map_or(Cow::Borrowed("-"), printable),
        m.attempt,
        payload
    )
}

/// Escapes control characters so that one message stays on one line.
fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        args: ConsumeArgs,
    }

    fn parse(argv: &[&str]) -> Result<ConsumeArgs, clap::Error> {
        let mut full = vec!["sluice-consume"];
        full.extend_from_slice(argv);
        Probe::try_parse_from(full).map(|p| p.args)
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--topic",
            "t",
            "--group",
            "g",
            "--mode",
            "key-shared",
            "--filter",
            "region=eu",
            "--window",
            "2",
            "--count",
            "5",
            "--json",
            "--idle-timeout",
            "1m 5s",
            "--no-ack",
        ])
        .expect("parse");
        assert!(a.no_ack);
        assert_eq!(a.mode, GroupMode::KeyShared);
        assert_eq!(a.idle_timeout, Some(Duration::from_secs(65)));
        let c = a.consumer_config();
        assert_eq!(c.filters.get("region").map(String::as_str), Some("eu"));
        assert_eq!(
            (c.window, c.topic.as_str(), c.group.as_str()),
            (Some(2), "t", "g")
        );
        assert!(c.validate().is_ok());

        let d = parse(&["--topic", "t", "--group", "g"]).expect("parse");
        assert_eq!(d.mode, GroupMode::Shared);
        assert!(parse(&["--topic", "t"]).is_err(), "--group is required");
        assert!(parse(&["--topic", "t", "--group", "g", "--mode", "nope"]).is_err());
        assert!(parse(&["--topic", "t", "--group", "g", "--window", "0"]).is_err());
        assert!(parse(&["--topic", "t", "--group", "g", "--idle-timeout", "x"]).is_err());
    }

    fn message(payload: &[u8]) -> DeliveredMessage {
        DeliveredMessage {
            seq: 42,
            timestamp_ms: 1_700_000_000_123,
            key: Some("k1".into()),
            headers: BTreeMap::from([("region".to_string(), "eu".to_string())]),
            priority: 2,
            attempt: 3,
            payload: bytes::Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn json_lines_have_exactly_the_contract_fields() {
        let line = json_line("t", "g", &message(b"hello"));
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        let obj = v.as_object().expect("object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempt",
                "group",
                "headers",
                "key",
                "payload",
                "priority",
                "seq",
                "timestamp_ms",
                "topic"
            ]
        );
        assert_eq!(v["topic"], "t");
        assert_eq!(v["group"], "g");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["key"], "k1");
        assert_eq!(v["headers"]["region"], "eu");
        assert_eq!(v["priority"], 2);
        assert_eq!(v["attempt"], 3);
        assert_eq!(v["timestamp_ms"], 1_700_000_000_123u64);
        assert_eq!(v["payload"], "hello");

        let mut no_key = message(b"\xff\x00\x01");
        no_key.key = None;
        let v: serde_json::Value =
            serde_json::from_str(&json_line("t", "g", &no_key)).expect("json");
        assert!(v.get("payload").is_none());
        assert_eq!(v["payload_b64"], "/wAB");
        assert!(v["key"].is_null());
    }

    #[test]
    fn text_lines_stay_on_one_line() {
        assert_eq!(
            text_line(&message(b"hi there")),
            "seq=42 key=k1 attempt=3 hi there\n"
        );
        assert_eq!(
            text_line(&message(b"a\nb\tc")),
            "seq=42 key=k1 attempt=3 a\\nb\\tc\n"
        );
        let mut m = message(b"\xff\xfe");
        m.key = None;
        assert_eq!(text_line(&m), "seq=42 key=- attempt=3 <2 bytes>\n");
    }
}
