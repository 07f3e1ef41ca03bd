//! Client subcommands of the `sluice` binary, on the SDK (`sluice-sdk`).
//!
//! | module | subcommand | what it does |
//! |---|---|---|
//! | [`publish`] | `sluice publish` | publishes generated messages (`--count/--size`) or one per stdin line |
//! | [`consume`] | `sluice consume` | prints each message of a group, acks it after printing |
//! | [`stats`] | `sluice stats` | actor, group and connection stats as tables or JSON |
//! | [`topic`] | `sluice topic` | create, alter, show, list and delete topics |
//! | [`group`] | `sluice group` | list, show, seek (move) and delete groups |
//! | [`admin`] | `sluice admin` | tail lifecycle events, disconnect stale consumers |
//! | [`serve`] | `sluice serve` | the broker: flags over the config file, the data dir's lock |
//!
//! Each module exposes a `clap::Args` struct and a `run(args) -> anyhow::Result<()>` (async for
//! the client commands); `src/main.rs` wires them in as subcommands and prints an error with
//! [`error_report`]. Stdout carries only the command's output; logs go
//! through `tracing` (stderr), errors are returned to `main`.

pub mod admin;
pub mod consume;
pub mod group;
pub mod publish;
pub mod serve;
pub mod stats;
pub mod topic;

pub use consume::ConsumeArgs;
pub use publish::PublishArgs;
pub use stats::StatsArgs;

use std::io::Write;
use std::time::Duration;

use sluice_sdk::ClientConfig;

/// Broker address used when `--addr` is not given.
pub const DEFAULT_ADDR: &str = sluice_sdk::DEFAULT_ADDR;

/// Flags shared by every client subcommand.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ConnectionArgs {
    /// Broker address (HOST:PORT).
    #[arg(long, global = true, value_name = "HOST:PORT", default_value = DEFAULT_ADDR, env = "SLUICE_ADDR", value_parser = parse_host_port)]
    pub addr: String,
    /// Client id sent to the broker, shown in its stats (default: sluice-cli-COMMAND-PID).
    #[arg(long, global = true, value_name = "ID")]
    pub client_id: Option<String>,
    /// Longest wait for one answer from the broker (humantime, e.g. 10s).
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl ConnectionArgs {
    /// The SDK configuration for these flags; `command` names the default client id.
    pub fn client_config(&self, command: &str) -> ClientConfig {
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-cli-{command}-{}", std::process::id()));
        ClientConfig::new(self.addr.clone())
            .client_id(client_id)
            .request_timeout(self.request_timeout)
    }
}

/// An error and its causes on one line, `outer: cause: root cause`, each said once: errors that
/// already include their source's text in their own (thiserror's `"...: {0}"` with `#[from]`)
/// would otherwise repeat it, once per level.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if text.is_empty() || parts.iter().any(|p| p.contains(text)) {
            continue;
        }
        parts.push(text.to_string());
    }
    parts.join(": ")
}

/// Parses `key=value` (split at the first `=`; the key must not be empty, the value may be).
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("'{s}': the key before '=' is empty")),
        None => Err(format!("'{s}': expected key=value")),
    }
}

/// Checks `HOST:PORT` (HOST a name or an IP address, `[…]` around IPv6) and returns it as is.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    let bad = || format!("'{s}' is not an address: expected HOST:PORT, e.g. 127.0.0.1:7070");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let bare_v6 = host.contains(':') && !(host.starts_with('[') && host.ends_with(']'));
    if host.is_empty() || bare_v6 || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Parses a humantime duration (`30s`, `1m 30s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("'{s}': a duration cannot be negative"));
    }
    humantime::parse_duration(s).map_err(|e| format!("'{s}': {e}"))
}

/// Parses a count for a flag (`--max-messages`): a non-negative integer.
pub fn parse_count(s: &str) -> Result<u64, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("'{s}': a count cannot be negative"));
    }
    s.trim()
        .parse()
        .map_err(|e| format!("'{s}': not a whole number ({e})"))
}

/// Parses a byte size for a flag: an integer or a number with a unit (`1GiB`, `500MB`, `4096`;
/// see [`crate::config::parse_bytes`]). A negative number is refused with a clear message.
pub fn parse_size(s: &str) -> Result<u64, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("'{s}': a size cannot be negative"));
    }
    crate::config::parse_bytes(s)
}

/// A redelivery schedule given as one flag value (clap would read a `Vec` as many values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

/// Parses a redelivery schedule for a flag: humantime entries separated by commas
/// (`1s,5s,30s,2m`); each must be a duration of 1ms..=1day, at most
/// [`sluice_protocol::MAX_BACKOFF_STEPS`] of them.
pub fn parse_backoff_list(s: &str) -> Result<Schedule, String> {
    parse_durations(s).map(Schedule)
}

fn parse_durations(s: &str) -> Result<Vec<Duration>, String> {
    let entries: Vec<String> = s
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let ms = sluice_protocol::parse_backoff(&entries).map_err(|e| e.message)?;
    Ok(ms.into_iter().map(Duration::from_millis).collect())
}

/// Parses a point in time for `group seek --to-time`: RFC 3339 (`2026-12-01T10:00:00Z`,
/// `2026-12-01T10:00:00.5+02:00`, `2026-12-01 10:00:00` read as UTC), or a humantime duration
/// before now with a leading `-` (`-10m`, `-1h 30m`). Returns ms since the Unix epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let at = if let Some(ago) = t.strip_prefix('-') {
        let d = humantime::parse_duration(ago.trim())
            .map_err(|e| format!("'{s}': not a duration before now ({e}); e.g. -10m"))?;
        std::time::SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("'{s}': before the Unix epoch"))?
    } else {
        parse_rfc3339_with_offset(t).map_err(|e| {
            format!("'{s}': not an RFC 3339 time ({e}); e.g. 2026-12-01T10:00:00Z or -10m")
        })?
    };
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("'{s}': before the Unix epoch"))?
        .as_millis();
    u64::try_from(ms).map_err(|_| format!("'{s}': too far in the future"))
}

/// RFC 3339 with `Z`, no zone (UTC) or a `±HH:MM` offset.
fn parse_rfc3339_with_offset(t: &str) -> Result<std::time::SystemTime, String> {
    let offset_at = t
        .char_indices()
        .rev()
        .find(|&(i, c)| (c == '+' || c == '-') && i > 10)
        .map(|(i, _)| i);
    let Some(i) = offset_at else {
        return humantime::parse_rfc3339_weak(t).map_err(|e| e.to_string());
    };
    let (base, offset) = t.split_at(i);
    let sign = if offset.starts_with('-') { -1i64 } else { 1 };
    let (h, m) = offset[1..]
        .split_once(':')
        .ok_or_else(|| format!("bad offset '{offset}'"))?;
    let (h, m): (i64, i64) = (
        h.parse().map_err(|_| format!("bad offset '{offset}'"))?,
        m.parse().map_err(|_| format!("bad offset '{offset}'"))?,
    );
    if h > 23 || m > 59 {
        return Err(format!("bad offset '{offset}'"));
    }
    let local = humantime::parse_rfc3339_weak(base).map_err(|e| e.to_string())?;
    let shift = Duration::from_secs(((h * 60 + m) * 60) as u64);
    // local time = UTC + offset, so UTC = local - offset.
    if sign > 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
    .ok_or_else(|| "out of range".to_string())
}

/// A time in ms since the epoch as RFC 3339 UTC with milliseconds.
pub(crate) fn format_time_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub(crate) fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Prints `text` (a broken pipe is not an error: the reader went away).
pub(crate) fn output(text: &str) -> anyhow::Result<()> {
    match write_stdout(text) {
        Err(e) if !is_broken_pipe(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// `value` as one line of JSON.
pub(crate) fn json_line<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string(value)?;
    s.push('\n');
    Ok(s)
}

/// Writes `text` to stdout and flushes it.
pub(crate) fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// True when stdout's reader went away (`sluice ... | head`): stop quietly.
pub(crate) fn is_broken_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

/// Milliseconds for people: `350ms`, `12s`, `1h 2m 3s`.
pub(crate) fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn kv() {
        assert_eq!(parse_kv("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_kv("a="), Ok(("a".into(), String::new())));
        assert!(parse_kv("=b").is_err());
        assert!(parse_kv("ab").is_err());
    }

    #[test]
    fn host_port() {
        for ok in ["127.0.0.1:7070", "broker.local:1", "[::1]:7070", "h:0"] {
            assert_eq!(parse_host_port(ok), Ok(ok.to_string()));
        }
        for bad in ["127.0.0.1", "h:", ":7070", "h:70000", "::1:7070", "h:x"] {
            let e = parse_host_port(bad).expect_err(bad);
            assert!(
                e.contains(&format!("'{bad}'")) && e.contains("HOST:PORT"),
                "{e}"
            );
        }
    }

    #[test]
    fn error_causes_are_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open the store: {0}")]
        struct Outer(#[from] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("io: {0}")]
        struct Inner(#[from] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(Outer(Inner(io))).context("starting the broker");
        assert_eq!(
            format!("{e:#}").matches("Address already in use").count(),
            3,
            "what anyhow prints"
        );
        assert_eq!(
            error_report(&e),
            "starting the broker: cannot open the store: io: Address already in use"
        );
        // Causes that do not repeat their source are all kept.
        let e = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_report(&e), "top: middle: root");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_ms(350), "350ms");
        assert_eq!(format_ms(12_400), "12s");
        assert_eq!(format_ms(3_723_000), "1h 2m 3s");
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("2026-12-01T10:00:00Z"), Ok(1_796_119_200_000));
        assert_eq!(
            parse_time("2026-12-01T12:00:00+02:00"),
            Ok(1_796_119_200_000)
        );
        assert_eq!(
            parse_time("2026-12-01T08:30:00-01:30"),
            Ok(1_796_119_200_000)
        );
        assert_eq!(parse_time("2026-12-01 10:00:00"), Ok(1_796_119_200_000));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let ago = parse_time("-10m").expect("relative");
        assert!(
            (now - 600_000..=now - 599_000).contains(&ago),
            "{ago} vs {now}"
        );
        for bad in [
            "yesterday",
            "-soon",
            "2026-13-01T00:00:00Z",
            "2026-12-01T10:00:00+25:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(format_time_ms(1000), "1970-01-01T00:00:01.000Z");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn sizes_and_schedules() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("-5").unwrap_err().contains("negative"));
        assert!(parse_size("lots").is_err());
        assert_eq!(
            parse_backoff_list("1s, 5s,2m").map(|s| s.0),
            Ok(vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(120)
            ])
        );
        assert!(parse_backoff_list("1s,soon").unwrap_err().contains("soon"));
        assert!(parse_backoff_list("").is_err());
        assert!(parse_backoff_list("2days").is_err());
    }

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        conn: ConnectionArgs,
    }

    #[test]
    fn connection_defaults() {
        let p = Probe::try_parse_from(["x"]).expect("parse");
        if std::env::var_os("SLUICE_ADDR").is_none() {
            assert_eq!(p.conn.addr, "127.0.0.1:7070");
        }
        assert_eq!(p.conn.request_timeout, Duration::from_secs(10));
        let config = p.conn.client_config("stats");
        assert!(config.client_id.starts_with("sluice-cli-stats-"));
        let p = Probe::try_parse_from(["x", "--addr", "h:1", "--client-id", "me"]).expect("parse");
        assert_eq!(p.conn.client_config("x").client_id, "me");
        assert_eq!(p.conn.addr, "h:1");
    }
}
