//! `sluice consume`: print each message of a group, ack it after printing.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use futures::FutureExt as _;
use sluice_sdk::{Consumer, ConsumerConfig, DeliveredMessage, ErrorCode, GroupMode, SdkError};

use crate::config::MAX_BATCH_SIZE;
use sluice_sdk::client::MAX_REQUEST_N;

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
    /// Redelivery schedule of the group, if this creates it: humantime entries separated by
    /// commas (e.g. 1s,5s,30s,2m); an existing group with another schedule refuses it.
    #[arg(long, value_name = "DUR,DUR,...", value_parser = super::parse_backoff_list)]
    pub backoff: Option<super::Schedule>,
}

/// Batch size of `--count` rounds when `--batch-size` is not given.
const COUNT_BATCH_SIZE: u32 = 16;

/// What one subscription of `--count N` asks for: at most `credits × batch_size` messages, never
/// more than are still to print, so the broker hands out nothing that is not printed (and would
/// come back later marked as a redelivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Messages per batch.
    pub batch_size: u32,
    /// Batches asked for (RSocket credits).
    pub credits: u32,
}

impl Round {
    /// The round for `remaining` (> 0) messages still to print; `batch_size` is the flag's.
    pub fn plan(remaining: u64, batch_size: Option<u32>) -> Round {
        let batch_size = u64::from(batch_size.unwrap_or(COUNT_BATCH_SIZE).max(1))
            .min(remaining.max(1))
            .min(u64::from(MAX_BATCH_SIZE));
        let credits = (remaining / batch_size).clamp(1, u64::from(MAX_REQUEST_N));
        Round {
            // Both fit: batch_size <= MAX_BATCH_SIZE and credits <= MAX_REQUEST_N.
            batch_size: u32::try_from(batch_size).unwrap_or(MAX_BATCH_SIZE),
            credits: u32::try_from(credits).unwrap_or(MAX_REQUEST_N),
        }
    }
}

impl ConsumeArgs {
    /// The consumer of one subscription: unbounded without `--count`, else the [`Round`] for
    /// `remaining` messages.
    fn consumer_config(&self, remaining: Option<u64>) -> ConsumerConfig {
        let round = remaining.map(|n| {
            if self.mode == GroupMode::Broadcast {
                // Every subscription of a broadcast group is a member of its own, starting at
                // the group's cursor: a second round could miss what the others acked
                // meanwhile. One message per batch and one credit per message, so one
                // subscription takes all N (up to the largest REQUEST_N).
                Round {
                    batch_size: 1,
                    credits: u32::try_from(n.clamp(1, u64::from(MAX_REQUEST_N)))
                        .unwrap_or(MAX_REQUEST_N),
                }
            } else {
                Round::plan(n, self.batch_size)
            }
        });
        ConsumerConfig {
            client: self.conn.client_config("consume"),
            topic: self.topic.clone(),
            group: self.group.clone(),
            mode: self.mode,
            filters: self.filters.iter().cloned().collect::<BTreeMap<_, _>>(),
            window: self.window,
            batch_size: round.map(|r| r.batch_size).or(self.batch_size),
            max_batches: round.map(|r| r.credits),
            backoff: self.backoff.clone().map(|s| s.0),
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
    /// The consumer ended: with `--count`, its round's credits are used up.
    ConsumerEnded,
}

/// Runs `sluice consume`.
///
/// With `--count N` it consumes in rounds: each subscription asks the broker for at most what is
/// still to print ([`Round`]); when its batches were fewer or smaller than asked for (fewer
/// messages were waiting), the next subscription asks for the rest. With `--no-ack` there is one
/// round only: what it printed stays in flight until it exits, so a next round would get it again.
pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut printed = 0u64;
    let mut round = 0u32;
    // Until when an exclusive group refusing a next round is waited for.
    let mut exclusive_wait: Option<tokio::time::Instant> = None;
    let stop = loop {
        let remaining = match args.count {
            Some(n) if printed >= n => break Stop::Count,
            Some(n) => Some(n - printed),
            None => None,
        };
        round += 1;
        let config = args.consumer_config(remaining);
        config.validate()?;
        let mut consumer = Consumer::subscribe(config).await?;
        let outcome = consume_loop(&mut consumer, &args, &mut printed).await;
        release_unprinted(&mut consumer);
        // Whatever happened, make the acks we made durable before going on or exiting.
        let flush_limit = args.conn.request_timeout.saturating_mul(3);
        let flushed = match tokio::time::timeout(flush_limit, consumer.flush_acks()).await {
            Ok(r) => r.context("cannot flush acks"),
            Err(_) => Err(anyhow::anyhow!(
                "acks not confirmed by the broker within {}",
                humantime::format_duration(flush_limit)
            )),
        };
        drop(consumer);
        let stop = match outcome {
            // An exclusive group may still hold our previous round's connection for a moment.
            Err(e)
                if round > 1
                    && flushed.is_ok()
                    && exclusive_taken(&e)
                    && tokio::time::Instant::now()
                        < *exclusive_wait.get_or_insert_with(|| {
                            tokio::time::Instant::now() + args.conn.request_timeout
                        }) =>
            {
                tracing::debug!(error = %e, "previous round not gone yet; subscribing again");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            outcome => outcome?,
        };
        flushed?;
        exclusive_wait = None;
        match stop {
            Stop::ConsumerEnded if args.count.is_some() && !args.no_ack => continue,
            stop => break stop,
        }
    };
    tracing::debug!(
        printed,
        rounds = round,
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

/// Gives back every message that arrived but was not printed (stopped by Ctrl-C, a closed
/// stdout, ...) as a release: it comes again with the same `attempt`, not as a redelivery.
fn release_unprinted(consumer: &mut Consumer) {
    let mut released = 0u64;
    while let Some(Some(Ok(r))) = consumer.next().now_or_never() {
        match consumer.release(&r) {
            Ok(()) => released += 1,
            Err(e) => {
                tracing::debug!(error = %e, "cannot release the messages not printed");
                break;
            }
        }
    }
    if released > 0 {
        tracing::debug!(released, "messages not printed given back");
    }
}

/// True if the broker refused the subscription because another consumer holds the group.
fn exclusive_taken(e: &anyhow::Error) -> bool {
    e.downcast_ref::<SdkError>()
        .is_some_and(|e| e.code() == Some(ErrorCode::ExclusiveTaken))
}

async fn consume_loop(
    consumer: &mut Consumer,
    args: &ConsumeArgs,
    printed: &mut u64,
) -> anyhow::Result<Stop> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if args.count.is_some_and(|n| *printed >= n) {
            return Ok(Stop::Count);
        }
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
            // Not printed, so not acked: given back for another consumer.
            Err(e) if is_broken_pipe(&e) => {
                consumer.release(&received)?;
                return Ok(Stop::StdoutClosed);
            }
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
        if !args.no_ack {
            consumer.ack(&received)?;
        }
        *printed += 1;
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
        let c = a.consumer_config(a.count);
        assert_eq!(c.filters.get("region").map(String::as_str), Some("eu"));
        assert_eq!(
            (c.window, c.topic.as_str(), c.group.as_str()),
            (Some(2), "t", "g")
        );
        assert_eq!((c.batch_size, c.max_batches), (Some(5), Some(1)));
        assert!(c.validate().is_ok());
        let unbounded = a.consumer_config(None);
        assert_eq!((unbounded.batch_size, unbounded.max_batches), (None, None));

        let d = parse(&["--topic", "t", "--group", "g"]).expect("parse");
        assert_eq!(d.mode, GroupMode::Shared);
        assert!(parse(&["--topic", "t"]).is_err(), "--group is required");
        assert!(parse(&["--topic", "t", "--group", "g", "--mode", "nope"]).is_err());
        assert!(parse(&["--topic", "t", "--group", "g", "--window", "0"]).is_err());
        assert!(parse(&["--topic", "t", "--group", "g", "--idle-timeout", "x"]).is_err());
        for mode in ["key_shared", "broadcast"] {
            assert!(parse(&["--topic", "t", "--group", "g", "--mode", mode]).is_ok());
        }
        let b = parse(&["--topic", "t", "--group", "g", "--backoff", "1s,5s"]).expect("parse");
        assert_eq!(
            b.consumer_config(None).backoff,
            Some(vec![Duration::from_secs(1), Duration::from_secs(5)])
        );
        assert!(parse(&["--topic", "t", "--group", "g", "--backoff", "1s,x"]).is_err());
    }

    #[test]
    fn rounds_never_ask_for_more_than_remains() {
        let plan = Round::plan;
        let r = |batch_size, credits| Round {
            batch_size,
            credits,
        };
        assert_eq!(plan(3, None), r(3, 1));
        assert_eq!(plan(16, None), r(16, 1));
        assert_eq!(plan(102, None), r(16, 6));
        assert_eq!(plan(6, None), r(6, 1));
        assert_eq!(plan(100, Some(30)), r(30, 3));
        assert_eq!(plan(10_000, Some(10_000)), r(4096, 2));
        assert_eq!(plan(u64::MAX, Some(1)), r(1, MAX_REQUEST_N));
        for remaining in 1..=300u64 {
            for batch in [None, Some(1), Some(7), Some(16), Some(500)] {
                let Round {
                    batch_size,
                    credits,
                } = plan(remaining, batch);
                assert!(batch_size >= 1 && credits >= 1);
                assert!(u64::from(batch_size) * u64::from(credits) <= remaining);
            }
        }
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
