//! `sluice group list|info|seek|delete`: groups as an operator manages them.

use anyhow::Context as _;
use sluice_sdk::protocol::{GroupList, GroupStats, SeekTo};
use sluice_sdk::Admin;

use super::stats::{consumers_table, groups_table};
use super::{format_time_ms, json_line, output, parse_time, ConnectionArgs};

/// `sluice group`: list, show, move and delete groups.
#[derive(clap::Args, Debug, Clone)]
pub struct GroupArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnectionArgs,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: GroupCommand,
}

/// What `sluice group` does.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum GroupCommand {
    /// List every group (of one topic), loaded or only stored.
    List(ListArgs),
    /// Show one group with its consumers.
    Info(GroupNameArgs),
    /// Move a group's cursor to a sequence number, a time, the start or the end.
    Seek(SeekArgs),
    /// Delete a group that has no consumer.
    Delete(GroupNameArgs),
}

/// `group list`.
#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// Only this topic's groups.
    #[arg(long, value_name = "T")]
    pub topic: Option<String>,
    /// Print one JSON object (`{"groups": [...]}`).
    #[arg(long)]
    pub json: bool,
}

/// A group of a topic.
#[derive(clap::Args, Debug, Clone)]
pub struct GroupNameArgs {
    /// The topic.
    #[arg(long, value_name = "T")]
    pub topic: String,
    /// The group.
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl GroupNameArgs {
    fn check(&self) -> anyhow::Result<()> {
        check_names(&self.topic, &self.group)
    }
}

fn check_names(topic: &str, group: &str) -> anyhow::Result<()> {
    sluice_sdk::protocol::validate_name("topic", topic).map_err(|e| anyhow::anyhow!(e.message))?;
    sluice_sdk::protocol::validate_name("group", group).map_err(|e| anyhow::anyhow!(e.message))
}

/// `group seek`: exactly one target.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)
    .args(["to_seq", "to_time", "to_start", "to_end"])))]
pub struct SeekArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub name: GroupNameArgs,
    /// The next message the group gets is N (floor..=head + 1).
    #[arg(long, value_name = "N")]
    pub to_seq: Option<u64>,
    /// The first message stored at or after TIME: RFC 3339 (2026-12-01T10:00:00Z) or a
    /// duration before now (-10m).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse_time)]
    pub to_time: Option<u64>,
    /// The oldest retained message.
    #[arg(long)]
    pub to_start: bool,
    /// Only messages published from now on.
    #[arg(long)]
    pub to_end: bool,
}

impl SeekArgs {
    /// Where to.
    pub fn target(&self) -> SeekTo {
        match (self.to_seq, self.to_time, self.to_start) {
            (Some(n), _, _) => SeekTo::Seq(n),
            (_, Some(t), _) => SeekTo::TimeMs(t),
            (_, _, true) => SeekTo::Start,
            _ => SeekTo::End,
        }
    }
}

/// Runs `sluice group`. Input is checked before connecting.
pub async fn run(args: GroupArgs) -> anyhow::Result<()> {
    let connect = || Admin::connect(args.conn.client_config("group"));
    let text = match &args.command {
        GroupCommand::List(a) => {
            if let Some(t) = &a.topic {
                sluice_sdk::protocol::validate_name("topic", t)
                    .map_err(|e| anyhow::anyhow!(e.message))?;
            }
            let groups = connect()
                .await?
                .list_groups(a.topic.clone())
                .await
                .context("cannot list groups")?;
            if a.json {
                json_line(&GroupList { groups })?
            } else {
                let mut out = format!("GROUPS ({})\n", groups.len());
                out.push_str(&groups_table(&groups));
                out
            }
        }
        GroupCommand::Info(a) => {
            a.check()?;
            let g = connect()
                .await?
                .group_info(a.topic.clone(), a.group.clone())
                .await
                .with_context(|| format!("cannot show group {} of {}", a.group, a.topic))?;
            render_info(&g, a.json)?
        }
        GroupCommand::Seek(a) => {
            a.name.check()?;
            let to = a.target();
            let r = connect()
                .await?
                .seek_group(a.name.topic.clone(), a.name.group.clone(), to)
                .await
                .with_context(|| {
                    format!("cannot seek group {} of {}", a.name.group, a.name.topic)
                })?;
            if a.name.json {
                json_line(&r)?
            } else {
                let how = match to {
                    SeekTo::Seq(n) => format!("seq {n}"),
                    SeekTo::TimeMs(t) => format!("time {}", format_time_ms(t)),
                    SeekTo::Start => "the start".into(),
                    SeekTo::End => "the end".into(),
                };
                format!(
                    "group {} of {} moved to {how}: next seq {}, {} batches in flight cancelled\n",
                    r.group, r.topic, r.next_seq, r.cancelled_batches
                )
            }
        }
        GroupCommand::Delete(a) => {
            a.check()?;
            let r = connect()
                .await?
                .delete_group(a.topic.clone(), a.group.clone())
                .await
                .with_context(|| format!("cannot delete group {} of {}", a.group, a.topic))?;
            if a.json {
                json_line(&r)?
            } else {
                format!("deleted group {} of {}\n", r.group, r.topic)
            }
        }
    };
    output(&text)
}

/// One group: JSON (the `GroupStats` object) or its row and its consumers.
fn render_info(g: &GroupStats, json: bool) -> anyhow::Result<String> {
    if json {
        return json_line(g);
    }
    let one = std::slice::from_ref(g);
    let mut out = groups_table(one);
    if !g.filters.is_empty() {
        let f: Vec<String> = g.filters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("filters {}\n", f.join(" ")));
    }
    if !g.backoff_ms.is_empty() {
        let b: Vec<String> = g
            .backoff_ms
            .iter()
            .map(|&ms| super::format_ms(ms))
            .collect();
        out.push_str(&format!("backoff {}\n", b.join(",")));
    }
    out.push_str(&format!("\nCONSUMERS ({})\n", g.consumer_details.len()));
    out.push_str(&consumers_table(one));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        args: GroupArgs,
    }

    fn parse(argv: &[&str]) -> Result<GroupArgs, clap::Error> {
        let mut full = vec!["sluice-group"];
        full.extend_from_slice(argv);
        Probe::try_parse_from(full).map(|p| p.args)
    }

    fn target(argv: &[&str]) -> Result<SeekTo, clap::Error> {
        match parse(argv)?.command {
            GroupCommand::Seek(s) => Ok(s.target()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seek_targets() {
        let base = ["seek", "--topic", "t", "--group", "g"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            target(&v)
        };
        assert_eq!(with(&["--to-seq", "42"]).expect("seq"), SeekTo::Seq(42));
        assert_eq!(
            with(&["--to-time", "2026-12-01T10:00:00Z"]).expect("time"),
            SeekTo::TimeMs(1_796_119_200_000)
        );
        assert!(matches!(
            with(&["--to-time", "-10m"]),
            Ok(SeekTo::TimeMs(_))
        ));
        assert_eq!(with(&["--to-start"]).expect("start"), SeekTo::Start);
        assert_eq!(with(&["--to-end", "--json"]).expect("end"), SeekTo::End);
        assert!(with(&[]).is_err(), "a target is required");
        assert!(with(&["--to-start", "--to-end"]).is_err(), "one target");
        assert!(with(&["--to-time", "yesterday"]).is_err());
        assert!(with(&["--to-seq", "-3"]).is_err());
    }

    #[test]
    fn names_are_checked() {
        let GroupCommand::Info(a) = parse(&["info", "--topic", "t", "--group", "a/b"])
            .expect("parse")
            .command
        else {
            panic!("info")
        };
        assert!(a.check().is_err());
        assert!(
            parse(&["info", "--topic", "t"]).is_err(),
            "--group required"
        );
        assert!(parse(&["list", "--json", "--addr", "h:1"]).is_ok());
    }

    #[test]
    fn info_shows_consumers() {
        let g = GroupStats {
            topic: "t".into(),
            group: "g".into(),
            backoff_ms: vec![1000, 5000],
            consumer_details: vec![sluice_sdk::protocol::ConsumerStats {
                consumer: "3:1".into(),
                hash_ranges: vec![(0, 65535)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_info(&g, false).expect("text");
        assert!(text.contains("CONSUMERS (1)") && text.contains("3:1") && text.contains("0-65535"));
        assert!(text.contains("backoff 1s,5s"), "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&render_info(&g, true).expect("json")).expect("json");
        assert_eq!(v["group"], "g");
    }
}
