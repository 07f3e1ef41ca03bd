//! `sluice publish`: generated messages (`--count N --size BYTES`, many in flight), one message
//! per stdin line (in order), or one message (`--payload TEXT`, or `--id ID` with one stdin
//! line) whose reply says whether it was a duplicate.

use std::collections::BTreeMap;

use anyhow::Context as _;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sluice_sdk::producer::validate_topic;
use sluice_sdk::{NewMessage, Producer, ProducerOptions};
use tokio::sync::mpsc;

use super::{parse_kv, write_stdout, ConnectionArgs};

/// Most lines published in one request in stdin mode.
const STDIN_BATCH_MESSAGES: usize = 512;
/// Most payload bytes published in one request in stdin mode.
const STDIN_BATCH_BYTES: usize = 1024 * 1024;
/// Stdin batches awaiting their reply at once.
const STDIN_BATCHES_IN_FLIGHT: usize = 8;

/// `sluice publish`: publish messages to a topic.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    /// Topic to publish to (created on first publish).
    #[arg(long)]
    pub topic: String,
    /// Key of every message.
    #[arg(long)]
    pub key: Option<String>,
    /// Header of every message (repeatable).
    #[arg(long = "header", value_name = "K=V", value_parser = parse_kv)]
    pub headers: Vec<(String, String)>,
    /// Priority lane of every message (0 = normal, higher first).
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(sluice_sdk::protocol::MAX_PRIORITY)))]
    pub priority: u8,
    /// Publish N generated messages instead of reading stdin.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Publish one message with this idempotency id (1..=128 bytes): within the topic's dedup
    /// window a repeat is not stored again; the reply says `duplicate` and gives the original
    /// seq. The payload is --payload, or stdin (one line).
    #[arg(long, value_name = "ID", conflicts_with = "count")]
    pub id: Option<String>,
    /// Publish one message with this payload instead of reading stdin.
    #[arg(long, value_name = "TEXT", conflicts_with = "count")]
    pub payload: Option<String>,
    /// Payload size of each generated message, in bytes (with --count).
    #[arg(long, value_name = "BYTES", default_value_t = 100, requires = "count")]
    pub size: usize,
    /// Publishes kept in flight with --count.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub in_flight: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Topic.
    pub topic: String,
    /// Messages published.
    pub count: u64,
    /// Lowest sequence number they got.
    pub first_seq: Option<u64>,
    /// Highest sequence number they got.
    pub last_seq: Option<u64>,
}

impl Summary {
    fn new(topic: &str) -> Self {
        Summary {
            topic: topic.to_string(),
            count: 0,
            first_seq: None,
            last_seq: None,
        }
    }

    fn record(&mut self, first: u64, last: u64) {
        self.count += last.saturating_sub(first) + 1;
        self.first_seq = Some(self.first_seq.map_or(first, |s| s.min(first)));
        self.last_seq = Some(self.last_seq.map_or(last, |s| s.max(last)));
    }

    /// The line printed at the end.
    pub fn render(&self, json: bool) -> String {
        if json {
            let v = serde_json::json!({
                "topic": self.topic,
                "count": self.count,
                "first_seq": self.first_seq,
                "last_seq": self.last_seq,
            });
            format!("{v}\n")
        } else {
            match (self.first_seq, self.last_seq) {
                (Some(a), Some(b)) => format!(
                    "published {} messages to {}: seq {a}..={b}\n",
                    self.count, self.topic
                ),
                _ => format!("published {} messages to {}\n", self.count, self.topic),
            }
        }
    }
}

/// What `--id` / `--payload` published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct One {
    /// Topic.
    pub topic: String,
    /// The id it was sent with, if given.
    pub id: Option<String>,
    /// Its seq (a duplicate's: the original's).
    pub seq: u64,
    /// The id was stored already within the topic's dedup window: not stored again.
    pub duplicate: bool,
}

impl One {
    /// The line printed.
    pub fn render(&self, json: bool) -> String {
        if json {
            let mut v = serde_json::json!({
                "topic": self.topic,
                "count": 1,
                "first_seq": self.seq,
                "last_seq": self.seq,
                "duplicate": self.duplicate,
            });
            if let (Some(obj), Some(id)) = (v.as_object_mut(), &self.id) {
                obj.insert("id".into(), serde_json::Value::String(id.clone()));
            }
            format!("{v}\n")
        } else if self.duplicate {
            format!(
                "duplicate: id {} is stored already on {} as seq {} (not stored again)\n",
                self.id.as_deref().unwrap_or("-"),
                self.topic,
                self.seq
            )
        } else {
            format!("published 1 message to {}: seq {}\n", self.topic, self.seq)
        }
    }
}

/// Runs `sluice publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    validate_topic(&args.topic)?;
    if let Some(id) = &args.id {
        if id.is_empty() || id.len() > sluice_sdk::protocol::MAX_ID_LEN {
            anyhow::bail!(
                "--id must be 1..={} bytes, not {}",
                sluice_sdk::protocol::MAX_ID_LEN,
                id.len()
            );
        }
    }
    if args.id.is_some() || args.payload.is_some() {
        let payload = match &args.payload {
            Some(p) => Bytes::from(p.clone().into_bytes()),
            None => read_one_line().await?,
        };
        let producer = Producer::connect(args.conn.client_config("publish")).await?;
        let message = NewMessage {
            id: args.id.as_deref().map(Into::into),
            payload,
            ..template(&args)
        };
        let reply = producer
            .publish_batch(args.topic.clone(), vec![message])
            .await
            .with_context(|| format!("publish to {} failed", args.topic))?;
        let one = One {
            topic: args.topic.clone(),
            id: args.id.clone(),
            seq: reply.seq_of(0).unwrap_or(reply.first_seq),
            duplicate: reply.duplicate,
        };
        return super::output(&one.render(args.json));
    }
    let config = args.conn.client_config("publish");
    // preserve_order (the default) keeps stdin lines and generated messages in seq order.
    let producer = Producer::connect_with(config, ProducerOptions::default()).await?;
    let summary = match args.count {
        Some(n) => publish_generated(&producer, &args, n).await?,
        None => publish_stdin(&producer, &args).await?,
    };
    match write_stdout(&summary.render(args.json)) {
        Err(e) if !super::is_broken_pipe(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

fn template(args: &PublishArgs) -> NewMessage {
    NewMessage {
        id: None,
        key: args.key.clone(),
        headers: args.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
        priority: args.priority,
        payload: Bytes::new(),
    }
}

/// Payload `i` of `size` bytes: `msg-<i> ` then `x` padding (truncated if `size` is small).
pub fn generated_payload(i: u64, size: usize) -> Bytes {
    let mut payload = format!("msg-{i} ").into_bytes();
    payload.resize(size, b'x');
    Bytes::from(payload)
}

async fn publish_generated(
    producer: &Producer,
    args: &PublishArgs,
    count: u64,
) -> anyhow::Result<Summary> {
    let template = template(args);
    let mut summary = Summary::new(&args.topic);
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0u64;
    while next < count || !in_flight.is_empty() {
        while next < count && (in_flight.len() as u64) < args.in_flight {
            let message = NewMessage {
                payload: generated_payload(next, args.size),
                ..template.clone()
            };
            in_flight.push(producer.publish(args.topic.clone(), message));
            next += 1;
        }
        if let Some(result) = in_flight.next().await {
            let seq = result.with_context(|| {
                format!(
                    "publish to {} failed after {} messages",
                    args.topic, summary.count
                )
            })?;
            summary.record(seq, seq);
        }
    }
    Ok(summary)
}

/// One message per stdin line (without its `\n` or `\r\n`), in order: lines that are already
/// there go out together, so piped input is fast and typed input is sent line by line.
async fn publish_stdin(producer: &Producer, args: &PublishArgs) -> anyhow::Result<Summary> {
    // A plain thread reads stdin (tokio's stdin is a blocking thread too, behind a feature we
    // do not need); it is not joined, so a failed publish does not wait for more input.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(4 * STDIN_BATCH_MESSAGES);
    std::thread::Builder::new()
        .name("stdin-reader".into())
        .spawn(move || read_lines(std::io::stdin().lock(), &tx))
        .context("cannot start the stdin reader")?;

    let template = template(args);
    let mut summary = Summary::new(&args.topic);
    // Batches are queued in line order and the producer keeps a topic's order, so a few can be
    // in flight at once.
    let mut in_flight = FuturesUnordered::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![NewMessage {
            payload: first.context("cannot read stdin")?,
            ..template.clone()
        }];
        let mut bytes = batch[0].payload.len();
        while batch.len() < STDIN_BATCH_MESSAGES && bytes < STDIN_BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    let payload = line.context("cannot read stdin")?;
                    bytes += payload.len();
                    batch.push(NewMessage {
                        payload,
                        ..template.clone()
                    });
                }
                Err(_) => break,
            }
        }
        in_flight.push(producer.publish_batch(args.topic.clone(), batch));
        while in_flight.len() >= STDIN_BATCHES_IN_FLIGHT {
            if let Some(result) = in_flight.next().await {
                record_batch(&mut summary, &args.topic, result)?;
            }
        }
    }
    while let Some(result) = in_flight.next().await {
        record_batch(&mut summary, &args.topic, result)?;
    }
    Ok(summary)
}

fn record_batch(
    summary: &mut Summary,
    topic: &str,
    result: sluice_sdk::Result<sluice_sdk::PublishReply>,
) -> anyhow::Result<()> {
    let reply = result
        .with_context(|| format!("publish to {topic} failed after {} messages", summary.count))?;
    summary.record(reply.first_seq, reply.last_seq);
    Ok(())
}

/// The one message of `--id` without `--payload`: stdin, which must hold one line (its
/// newline, if any, removed).
async fn read_one_line() -> anyhow::Result<Bytes> {
    let all = tokio::task::spawn_blocking(|| {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf).map(|_| buf)
    })
    .await
    .context("cannot read stdin")?
    .context("cannot read stdin")?;
    one_line(all)
}

fn one_line(all: Vec<u8>) -> anyhow::Result<Bytes> {
    if all.is_empty() {
        anyhow::bail!("no message: stdin is empty (give one line, or --payload TEXT)");
    }
    let line = strip_newline(all);
    if line.contains(&b'\n') {
        anyhow::bail!(
            "--id publishes one message: stdin has several lines (give one, or --payload TEXT)"
        );
    }
    Ok(Bytes::from(line))
}

/// Sends every line of `input` (without its newline) until EOF, a read error (sent too) or the
/// receiver is gone.
fn read_lines(mut input: impl std::io::BufRead, tx: &mpsc::Sender<std::io::Result<Bytes>>) {
    loop {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if tx
                    .blocking_send(Ok(Bytes::from(strip_newline(line))))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// Removes one trailing `\n` (and a `\r` before it).
fn strip_newline(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        args: PublishArgs,
    }

    fn parse(argv: &[&str]) -> Result<PublishArgs, clap::Error> {
        let mut full = vec!["sluice-publish"];
        full.extend_from_slice(argv);
        Probe::try_parse_from(full).map(|p| p.args)
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--topic",
            "t",
            "--key",
            "k",
            "--header",
            "a=1",
            "--header",
            "b=2",
            "--priority",
            "3",
            "--count",
            "10",
            "--size",
            "64",
            "--json",
        ])
        .expect("parse");
        assert_eq!(a.topic, "t");
        assert_eq!(a.key.as_deref(), Some("k"));
        assert_eq!(
            a.headers,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(
            (a.priority, a.count, a.size, a.json),
            (3, Some(10), 64, true)
        );
        let msg = template(&a);
        assert_eq!(msg.headers.len(), 2);

        let stdin = parse(&["--topic", "t"]).expect("parse");
        assert_eq!(stdin.count, None);
        assert!(
            parse(&["--topic", "t", "--size", "5"]).is_err(),
            "--size needs --count"
        );
        assert!(parse(&["--topic", "t", "--priority", "10"]).is_err());
        assert!(parse(&["--topic", "t", "--header", "nokv"]).is_err());
        assert!(parse(&[]).is_err(), "--topic is required");
    }

    #[test]
    fn one_message_with_an_id() {
        let a = parse(&[
            "--topic",
            "t",
            "--id",
            "order-1",
            "--payload",
            "hi",
            "--json",
        ])
        .expect("parse");
        assert_eq!(
            (a.id.as_deref(), a.payload.as_deref()),
            (Some("order-1"), Some("hi"))
        );
        assert!(parse(&["--topic", "t", "--id", "x", "--count", "3"]).is_err());
        let one = One {
            topic: "t".into(),
            id: Some("order-1".into()),
            seq: 5,
            duplicate: true,
        };
        let v: serde_json::Value = serde_json::from_str(&one.render(true)).expect("json");
        assert_eq!(
            (
                v["duplicate"].as_bool(),
                v["first_seq"].as_u64(),
                v["id"].as_str()
            ),
            (Some(true), Some(5), Some("order-1"))
        );
        assert!(one.render(false).contains("duplicate") && one.render(false).contains("seq 5"));
        let fresh = One {
            duplicate: false,
            ..one
        };
        assert_eq!(fresh.render(false), "published 1 message to t: seq 5\n");
        assert_eq!(
            one_line(b"hello\n".to_vec()).expect("one"),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            one_line(b"\n".to_vec()).expect("empty message"),
            Bytes::new()
        );
        assert!(one_line(Vec::new()).is_err());
        assert!(one_line(b"a\nb\n".to_vec()).is_err());
    }

    #[test]
    fn payloads_have_the_requested_size() {
        assert_eq!(generated_payload(7, 12).as_ref(), b"msg-7 xxxxxx");
        assert_eq!(generated_payload(12345, 3).as_ref(), b"msg");
        assert_eq!(generated_payload(1, 0).len(), 0);
        assert_eq!(generated_payload(1, 4096).len(), 4096);
    }

    #[test]
    fn lines_lose_their_newline_only() {
        assert_eq!(strip_newline(b"a\n".to_vec()), b"a");
        assert_eq!(strip_newline(b"a\r\n".to_vec()), b"a");
        assert_eq!(strip_newline(b"a".to_vec()), b"a");
        assert_eq!(strip_newline(b"a\r".to_vec()), b"a\r");
        assert_eq!(strip_newline(b"\n".to_vec()), b"");
    }

    #[test]
    fn reads_lines_including_empty_and_binary_ones() {
        let (tx, mut rx) = mpsc::channel(16);
        let input: &[u8] = b"one\r\n\ntwo\xff\nlast";
        read_lines(input, &tx);
        drop(tx);
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line.expect("line"));
        }
        assert_eq!(
            lines,
            vec![
                Bytes::from_static(b"one"),
                Bytes::new(),
                Bytes::from_static(b"two\xff"),
                Bytes::from_static(b"last"),
            ]
        );
    }

    #[test]
    fn summary_output() {
        let mut s = Summary::new("t");
        assert_eq!(s.render(false), "published 0 messages to t\n");
        assert_eq!(
            s.render(true),
            "{\"count\":0,\"first_seq\":null,\"last_seq\":null,\"topic\":\"t\"}\n"
        );
        s.record(5, 7);
        s.record(3, 3);
        assert_eq!(s.render(false), "published 4 messages to t: seq 3..=7\n");
        let v: serde_json::Value = serde_json::from_str(&s.render(true)).expect("json");
        assert_eq!(v["count"], 4);
        assert_eq!(v["first_seq"], 3);
        assert_eq!(v["last_seq"], 7);
        assert_eq!(v["topic"], "t");
    }
}
