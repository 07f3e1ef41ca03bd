//! `sluice topic create|alter|info|list|delete`: topics as an operator manages them.
//!
//! The topic is named by `--topic T` or as the first positional argument (`sluice topic info
//! orders`). Settings flags take humantime durations and byte sizes; each is checked here
//! before anything is sent (the broker checks them again).

use std::time::Duration;

use anyhow::Context as _;
use sluice_sdk::protocol::{Discard, TopicDeleted, TopicInfo, TopicSettings};
use sluice_sdk::Admin;

use super::{
    format_bytes, format_ms, format_time_ms, json_line, output, parse_duration, parse_size,
    ConnectionArgs,
};

/// `sluice topic`: create, alter, show, list and delete topics.
#[derive(clap::Args, Debug, Clone)]
pub struct TopicArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: TopicCommand,
}

/// What `sluice topic` does.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TopicCommand {
    /// Create a topic with its retention, dedup window and default backoff (refused if it
    /// exists).
    Create(TopicSettingsArgs),
    /// Change some settings of an existing topic (flags not given keep their value).
    Alter(TopicSettingsArgs),
    /// Show a topic: head, floor, messages, bytes, segments, groups, settings in force.
    Info(TopicNameArgs),
    /// List every topic.
    List(JsonArg),
    /// Delete a topic: its messages, settings and groups.
    Delete(TopicNameArgs),
}

/// `--json` alone.
#[derive(clap::Args, Debug, Clone)]
pub struct JsonArg {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A topic named by `--topic T` or as a positional argument.
#[derive(clap::Args, Debug, Clone)]
pub struct TopicNameArgs {
    /// The topic.
    #[arg(long = "topic", value_name = "T")]
    pub topic_flag: Option<String>,
    /// The topic (instead of --topic).
    #[arg(value_name = "TOPIC")]
    pub topic_arg: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl TopicNameArgs {
    /// The topic named, by the flag or the argument (not two different ones).
    pub fn topic(&self) -> anyhow::Result<String> {
        match (&self.topic_flag, &self.topic_arg) {
            (Some(a), Some(b)) if a != b => {
                anyhow::bail!("two topics given: --topic {a} and {b}")
            }
            (Some(t), _) | (None, Some(t)) => {
                sluice_sdk::protocol::validate_name("topic", t)
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                Ok(t.clone())
            }
            (None, None) => anyhow::bail!("name the topic: --topic T (or as an argument)"),
        }
    }
}

/// `topic create` and `topic alter`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopicSettingsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub name: TopicNameArgs,
    /// Remove messages older than this (humantime, e.g. 7d; `none` or 0s: no age limit).
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = parse_duration_or_none)]
    pub max_age: Option<Duration>,
    /// Remove the oldest segments while the topic holds more bytes than this (e.g. 1GiB,
    /// 500MB, 4096; `none` or 0: no size limit).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true, value_parser = parse_size_or_none)]
    pub max_bytes: Option<u64>,
    /// Remove the oldest segments while the topic holds more messages than this (0: no
    /// limit).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = super::parse_count)]
    pub max_messages: Option<u64>,
    /// `age`: only the limits remove messages; `acked`: also once every group acked them.
    #[arg(long, value_name = "age|acked")]
    pub discard: Option<Discard>,
    /// Remember message ids this long (humantime; 0s: no deduplication; at most 7d).
    #[arg(long, value_name = "DUR", allow_hyphen_values = true, value_parser = parse_duration)]
    pub dedup_window: Option<Duration>,
    /// Default redelivery schedule of groups created on the topic: humantime entries separated
    /// by commas (e.g. 1s,5s,30s,2m); `none`: the broker's.
    #[arg(long, value_name = "DUR,DUR,...", value_parser = parse_schedule_or_none)]
    pub backoff: Option<super::Schedule>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A duration, or `none` (= 0, no limit).
fn parse_duration_or_none(s: &str) -> Result<Duration, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// A size, or `none` (= 0, no limit).
fn parse_size_or_none(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    parse_size(s)
}

/// A schedule, or `none` (empty: the broker's).
fn parse_schedule_or_none(s: &str) -> Result<super::Schedule, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(super::Schedule(Vec::new()));
    }
    super::parse_backoff_list(s)
}

impl TopicSettingsArgs {
    /// The settings the flags give (absent flags: absent fields), checked as the broker does.
    pub fn settings(&self) -> anyhow::Result<TopicSettings> {
        let settings = TopicSettings {
            max_age_ms: self.max_age.map(ms),
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            discard: self.discard,
            dedup_window_ms: self.dedup_window.map(ms),
            backoff_ms: self
                .backoff
                .as_ref()
                .map(|steps| steps.0.iter().copied().map(ms).collect()),
        };
        settings
            .validate()
            .map_err(|e| anyhow::anyhow!(e.message))?;
        Ok(settings)
    }
}

/// Runs `sluice topic`. Input is checked before connecting: bad input is an error whether
/// the broker runs or not.
pub async fn run(args: TopicArgs) -> anyhow::Result<()> {
    let connect = || Admin::connect(args.conn.client_config("topic"));
    let text = match &args.command {
        TopicCommand::Create(a) | TopicCommand::Alter(a) => {
            let (topic, settings) = (a.name.topic()?, a.settings()?);
            let admin = connect().await?;
            if matches!(args.command, TopicCommand::Alter(_)) {
                let info = admin
                    .alter_topic(topic.clone(), settings)
                    .await
                    .with_context(|| format!("cannot alter topic {topic}"))?;
                render(&info, a.name.json, "altered ")?
            } else {
                let info = admin
                    .create_topic(topic.clone(), settings)
                    .await
                    .with_context(|| format!("cannot create topic {topic}"))?;
                render(&info, a.name.json, "created ")?
            }
        }
        TopicCommand::Info(a) => {
            let topic = a.topic()?;
            let info = connect()
                .await?
                .topic_info(topic.clone())
                .await
                .with_context(|| format!("cannot show topic {topic}"))?;
            render(&info, a.json, "")?
        }
        TopicCommand::List(a) => {
            let topics = connect()
                .await?
                .list_topics()
                .await
                .context("cannot list topics")?;
            if a.json {
                json_line(&sluice_sdk::protocol::TopicList { topics })?
            } else {
                render_list(&topics)
            }
        }
        TopicCommand::Delete(a) => {
            let topic = a.topic()?;
            let gone = connect()
                .await?
                .delete_topic(topic.clone())
                .await
                .with_context(|| format!("cannot delete topic {topic}"))?;
            render_deleted(&gone, a.json)?
        }
    };
    output(&text)
}

/// One topic: JSON (the `TopicInfo` object) or a few readable lines.
pub fn render(info: &TopicInfo, json: bool, verb: &str) -> anyhow::Result<String> {
    if json {
        return json_line(info);
    }
    let s = &info.settings;
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let mut out = format!(
        "{verb}topic {}\n  head {}  floor {}  messages {}  bytes {} ({})  segments {}\n",
        info.topic,
        info.head_seq,
        info.floor_seq,
        info.messages,
        format_bytes(info.bytes),
        info.bytes,
        info.segments
    );
    if let Some(oldest) = info.oldest_ms {
        out.push_str(&format!("  oldest message {}\n", format_time_ms(oldest)));
    }
    out.push_str(&format!(
        "  groups {}\n",
        if info.groups.is_empty() {
            "-".to_string()
        } else {
            info.groups.join(", ")
        }
    ));
    out.push_str(&format!(
        "  max_age {}  max_bytes {}  max_messages {}  discard {}  dedup_window {}  backoff {}\n",
        or_none(s.max_age_ms.filter(|&v| v > 0).map(format_ms)),
        or_none(s.max_bytes.filter(|&v| v > 0).map(format_bytes)),
        or_none(s.max_messages.filter(|&v| v > 0).map(|v| v.to_string())),
        s.discard.unwrap_or_default(),
        or_none(s.dedup_window_ms.filter(|&v| v > 0).map(format_ms)),
        or_none(s.backoff_ms.as_ref().filter(|b| !b.is_empty()).map(|b| {
            b.iter()
                .map(|&v| format_ms(v))
                .collect::<Vec<_>>()
                .join(",")
        })),
    ));
    Ok(out)
}

fn render_list(topics: &[TopicInfo]) -> String {
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|t| {
            vec![
                t.topic.clone(),
                t.head_seq.to_string(),
                t.floor_seq.to_string(),
                t.messages.to_string(),
                format_bytes(t.bytes),
                t.segments.to_string(),
                t.groups.len().to_string(),
            ]
        })
        .collect();
    use super::stats::{table, Align::Left as L, Align::Right as R};
    let mut out = format!("TOPICS ({})\n", topics.len());
    out.push_str(&table(
        &[
            ("TOPIC", L),
            ("HEAD", R),
            ("FLOOR", R),
            ("MESSAGES", R),
            ("BYTES", R),
            ("SEGMENTS", R),
            ("GROUPS", R),
        ],
        &rows,
    ));
    out
}

fn render_deleted(gone: &TopicDeleted, json: bool) -> anyhow::Result<String> {
    if json {
        return json_line(gone);
    }
    Ok(format!(
        "deleted topic {}: {} messages, {}\n",
        gone.topic,
        gone.messages,
        format_bytes(gone.bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        args: TopicArgs,
    }

    fn parse(argv: &[&str]) -> Result<TopicArgs, clap::Error> {
        let mut full = vec!["sluice-topic"];
        full.extend_from_slice(argv);
        Probe::try_parse_from(full).map(|p| p.args)
    }

    fn settings_of(argv: &[&str]) -> anyhow::Result<TopicSettings> {
        match parse(argv)
            .map_err(|e| anyhow::anyhow!(e.to_string()))?
            .command
        {
            TopicCommand::Create(a) | TopicCommand::Alter(a) => a.settings(),
            other => anyhow::bail!("not a settings command: {other:?}"),
        }
    }

    #[test]
    fn settings_flags() {
        let s = settings_of(&[
            "create",
            "--topic",
            "t",
            "--max-age",
            "7d",
            "--max-bytes",
            "1GiB",
            "--max-messages",
            "1000",
            "--discard",
            "acked",
            "--dedup-window",
            "5m",
            "--backoff",
            "1s,5s,30s",
        ])
        .expect("valid");
        assert_eq!(
            s,
            TopicSettings {
                max_age_ms: Some(7 * 86_400_000),
                max_bytes: Some(1 << 30),
                max_messages: Some(1000),
                discard: Some(Discard::Acked),
                dedup_window_ms: Some(300_000),
                backoff_ms: Some(vec![1000, 5000, 30_000]),
            }
        );
        let none =
            settings_of(&["alter", "t", "--max-age", "none", "--backoff", "none"]).expect("valid");
        assert_eq!(none.max_age_ms, Some(0));
        assert_eq!(none.backoff_ms, Some(vec![]));
        assert_eq!(none.max_bytes, None);
        // Bad input: a clear error.
        for bad in [
            &["create", "t", "--max-bytes", "-5"][..],
            &["create", "t", "--max-bytes", "lots"],
            &["create", "t", "--max-age", "soon"],
            &["create", "t", "--max-messages", "-1"],
            &["create", "t", "--discard", "never"],
            &["create", "t", "--backoff", "1s,later"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        for absurd in [
            &["create", "t", "--max-bytes", "10"][..],
            &["create", "t", "--max-bytes", "2000TiB"],
            &["create", "t", "--max-age", "500ms"],
            &["create", "t", "--dedup-window", "30d"],
        ] {
            assert!(settings_of(absurd).is_err(), "{absurd:?}");
        }
    }

    #[test]
    fn topic_by_flag_or_argument_and_addr_anywhere() {
        let a = parse(&["--addr", "h:1", "info", "orders", "--json"]).expect("parse");
        assert_eq!(a.conn.addr, "h:1");
        match a.command {
            TopicCommand::Info(n) => {
                assert_eq!(n.topic().expect("named"), "orders");
                assert!(n.json);
            }
            other => panic!("{other:?}"),
        }
        let b = parse(&["delete", "--topic", "orders", "--addr", "h:2"]).expect("parse");
        assert_eq!(b.conn.addr, "h:2");
        let TopicCommand::Delete(n) = b.command else {
            panic!("delete")
        };
        assert_eq!(n.topic().expect("named"), "orders");
        let TopicCommand::Info(n) = parse(&["info"]).expect("parse").command else {
            panic!("info")
        };
        assert!(n.topic().is_err(), "no topic named");
        let TopicCommand::Info(n) = parse(&["info", "a", "--topic", "b"])
            .expect("parse")
            .command
        else {
            panic!("info")
        };
        assert!(n.topic().is_err(), "two topics");
        let TopicCommand::Info(n) = parse(&["info", "a/b"]).expect("parse").command else {
            panic!("info")
        };
        assert!(n.topic().is_err(), "bad name");
    }

    #[test]
    fn renders() {
        let info = TopicInfo {
            topic: "orders".into(),
            head_seq: 10,
            floor_seq: 4,
            messages: 7,
            bytes: 2048,
            segments: 1,
            groups: vec!["billing".into()],
            settings: TopicSettings {
                max_age_ms: Some(3_600_000),
                discard: Some(Discard::Age),
                dedup_window_ms: Some(120_000),
                backoff_ms: Some(vec![1000, 5000]),
                ..Default::default()
            },
            oldest_ms: Some(1000),
        };
        let text = render(&info, false, "").expect("text");
        for needle in [
            "topic orders",
            "head 10  floor 4  messages 7",
            "2.0 KiB",
            "groups billing",
            "max_age 1h",
            "max_bytes none",
            "backoff 1s,5s",
            "1970-01-01T00:00:01.000Z",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        let v: serde_json::Value =
            serde_json::from_str(&render(&info, true, "").expect("json")).expect("one object");
        for key in [
            "topic",
            "head_seq",
            "floor_seq",
            "messages",
            "bytes",
            "segments",
            "groups",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert!(render_list(&[info]).contains("orders"));
    }
}
