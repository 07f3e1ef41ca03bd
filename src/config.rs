//! Broker configuration: defaults, the TOML file, `SLUICE_*` environment variables and flags, in
//! rising precedence. Durations are humantime strings everywhere (`"30s"`, `"1m 30s"`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Largest batch a consumer may ask for (the broker clamps a subscribe's `batch_size` to it), so
/// also the largest `batch_size` default.
pub use sluice_protocol::MAX_BATCH_SIZE;

/// Largest window a consumer may ask for (the broker clamps a subscribe's `window` to it).
pub use sluice_protocol::MAX_WINDOW;

/// When a write is made durable (fsynced) relative to its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync the topic's segment file before any publish or ack is acknowledged (default).
    Always,
    /// Acknowledge once written; fdatasync every interval.
    Interval(Duration),
    /// Acknowledge once written; leave writing back to the OS (no fsync).
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval {}", humantime::format_duration(*d)),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let rest = s.strip_prefix("interval").ok_or_else(|| {
                    format!(
                        "bad fsync policy '{s}': expected always, never or 'interval <duration>'"
                    )
                })?;
                let d = humantime::parse_duration(rest.trim())
                    .map_err(|e| format!("bad fsync interval '{}': {e}", rest.trim()))?;
                if d.is_zero() {
                    return Err("fsync interval must be greater than zero".into());
                }
                Ok(FsyncPolicy::Interval(d))
            }
        }
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The validated broker configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Data directory: topic segment files and the sled database.
    pub data_dir: PathBuf,
    /// Durability policy for publishes and acks.
    pub fsync: FsyncPolicy,
    /// Most messages per delivered batch, for a consumer whose subscribe names no `batch_size`
    /// (1..=[`MAX_BATCH_SIZE`]; a consumer may ask for any size in that range).
    pub batch_size: u32,
    /// Most payload bytes per delivered batch (a single larger message still goes alone).
    pub batch_max_bytes: usize,
    /// A batch not acked within this time is redelivered.
    #[serde(with = "humantime_serde")]
    pub batch_timeout: Duration,
    /// Redeliveries before a message moves to `<topic>.<group>.dlq`.
    pub max_retries: u32,
    /// Largest message payload accepted.
    pub max_payload: usize,
    /// Largest inbound RSocket frame (checked on the length prefix before buffering) and
    /// largest reassembled fragmented request.
    pub max_frame: usize,
    /// Unacked batches per consumer whose subscribe names no `window` (1..=[`MAX_WINDOW`]; a
    /// consumer may ask for any window in that range).
    pub window: u32,
    /// Keepalive interval the broker advertises and expects.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// Longest silence tolerated from a client (capped by the lifetime in its SETUP).
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// A connection that sends no SETUP within this time is closed.
    #[serde(with = "humantime_serde")]
    pub setup_timeout: Duration,
    /// Most bytes waiting to be written to one client; a client that lets more pile up does not
    /// read: it is disconnected and its batches go back to their groups (at least 32 MiB, so
    /// that the largest frame always fits).
    pub max_queued_bytes: usize,
    /// Under `fsync = "always"`: make one 64 MiB segment, zeroed and synced, at start, so the
    /// first busy topic's syncs are fast from its first message. `false`: spare segments are
    /// made only once a topic is busy, so a fresh data dir takes a few KiB (and the first
    /// 64 MiB a busy topic writes go ~10% slower).
    pub preallocate_segment: bool,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// Number of orchestrator actors (topics are spread over them by hash): the first shares
    /// the store's arbiter thread, every further one has its own.
    pub orchestrators: u32,
    /// Enables the `admin.fault` route (tests only).
    pub enable_fault_injection: bool,
    /// A publish to an unknown topic creates it; `false`: it is refused with `UNKNOWN_TOPIC`
    /// (topics are made with `sluice topic create`).
    pub auto_create_topics: bool,
    /// How often the retention sweep runs over every topic.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Most bytes a second the files retention and topic deletions removed give back to the
    /// disk (an integer or a size with a unit; `0`: each file at once). A removed file leaves
    /// its topic at once (renamed into the trash) and is cut down in 2 MiB steps at this
    /// rate, so that freeing a gigabyte does not stall the publishes' fsyncs. Keep it above
    /// the rate the broker writes at, or removed files pile up in the trash.
    #[serde(with = "byte_size")]
    pub retention_remove_rate: u64,
    /// Retention of topics with no override (`sluice topic create|alter` sets per-topic ones).
    pub retention: RetentionConfig,
    /// A segment is closed (a new one started) once its first message is this old, so that a
    /// quiet topic's old messages can be removed whole by `max_age` (also: at `max_age / 4`
    /// of a topic with a shorter `max_age`).
    #[serde(with = "humantime_serde")]
    pub segment_max_age: Duration,
    /// Message ids (`NewMessage.id`) are remembered this long per topic: a repeat within it is
    /// not stored again (`0s`: no deduplication). Per-topic override: `--dedup-window`.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Most message ids the dedup indexes of every topic remember together (about 250 bytes
    /// each with ids of 128 bytes): past it the oldest are forgotten before their window ends
    /// (counted in `admin.stats`, and a `memory_pressure` event), so that publishing ids to many
    /// topics cannot take the broker's memory. Each topic also holds at most 1,000,000.
    pub dedup_max_ids: u64,
    /// Redelivery schedule of groups that have none of their own nor their topic's (empty: a
    /// batch not acked is redelivered after `batch_timeout`), e.g. `["1s", "5s", "30s", "2m"]`.
    #[serde(with = "humantime_list")]
    pub backoff: Vec<Duration>,
    /// A consumer with lag that has not acked for this long is flagged stale (stats, event).
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// A consumer stale for this long is disconnected and its batches redelivered (absent: off).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub stale_disconnect_after: Option<Duration>,
    /// Size at which a topic's segment file is closed and a new one started (64 MiB): an
    /// integer or a size with a unit. For tests and small disks only: retention removes whole
    /// segments, so smaller ones free disk in smaller steps, at the cost of more files (and
    /// open descriptors) per topic. 64 KiB..=1 GiB.
    #[serde(with = "byte_size")]
    pub segment_bytes: u64,
}

/// Default `retention_remove_rate`: 256 MiB a second.
pub const DEFAULT_REMOVE_RATE: u64 = 256 * 1024 * 1024;

/// Default retention of every topic (`[retention]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages older than this are removed (absent: kept whatever their age).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// The oldest segments are removed while a topic holds more than this many bytes: an
    /// integer or a size with a unit (`"1GiB"`, `"500MB"`). Absent: no limit.
    #[serde(with = "byte_size_opt", skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// The oldest segments are removed while a topic holds more than this many messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// `"age"`: only by the limits; `"acked"`: also once every group acked them.
    pub discard: sluice_protocol::Discard,
}

/// Parses a byte size: an integer (bytes) or a number with a unit `B`, `KB`/`MB`/`GB`/`TB`
/// (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), e.g. `1GiB`, `500MB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
            "bad size '{s}': unknown unit '{other}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        ))
        }
    };
    let n: f64 = num.parse().map_err(|_| {
        format!("bad size '{s}': expected a number with an optional unit, e.g. 1GiB")
    })?;
    let v = n * mult as f64;
    if !v.is_finite() || !(0.0..=9.0e18).contains(&v) {
        return Err(format!("bad size '{s}': out of range"));
    }
    Ok(v as u64)
}

/// `Option<u64>` byte sizes in TOML: an integer or a string with a unit ([`parse_bytes`]).
mod byte_size_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Some(n)),
            Raw::S(s) => super::parse_bytes(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `u64` byte sizes in TOML: an integer or a string with a unit ([`parse_bytes`]).
mod byte_size {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_bytes(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A list of humantime durations in TOML (`["1s", "5s"]`).
mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|e| {
                humantime::parse_duration(e.trim())
                    .map_err(|err| serde::de::Error::custom(format!("bad duration '{e}': {err}")))
            })
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("./sluice-data"),
            fsync: FsyncPolicy::Always,
            batch_size: 16,
            batch_max_bytes: 4 * 1024 * 1024,
            batch_timeout: Duration::from_secs(30),
            max_retries: 3,
            max_payload: sluice_protocol::DEFAULT_MAX_PAYLOAD,
            max_frame: 4 * 1024 * 1024,
            window: 4,
            keepalive: Duration::from_secs(20),
            lifetime: Duration::from_secs(90),
            setup_timeout: Duration::from_secs(10),
            max_queued_bytes: 64 * 1024 * 1024,
            preallocate_segment: true,
            cache_capacity: 64 * 1024 * 1024,
            orchestrators: 1,
            enable_fault_injection: false,
            auto_create_topics: true,
            retention_interval: Duration::from_secs(10),
            retention_remove_rate: DEFAULT_REMOVE_RATE,
            retention: RetentionConfig::default(),
            segment_max_age: Duration::from_secs(3600),
            dedup_window: Duration::from_secs(120),
            dedup_max_ids: crate::store::dedup::DEFAULT_MAX_IDS as u64,
            backoff: Vec::new(),
            stale_after: Duration::from_secs(300),
            stale_disconnect_after: None,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("bad config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// The settings of a topic with no override, as the wire carries them (ms, bytes).
    pub fn default_topic_settings(&self) -> sluice_protocol::TopicSettings {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        sluice_protocol::TopicSettings {
            max_age_ms: self.retention.max_age.map(ms),
            max_bytes: self.retention.max_bytes,
            max_messages: self.retention.max_messages,
            discard: Some(self.retention.discard),
            dedup_window_ms: Some(ms(self.dedup_window)),
            backoff_ms: Some(self.backoff.iter().map(|d| ms(*d)).collect()),
        }
    }

    /// Reads a TOML file; missing keys take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses TOML text; missing keys take their defaults.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every value is usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(ConfigError::Invalid(format!(
                "batch_size must be in 1..={MAX_BATCH_SIZE}"
            )));
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(ConfigError::Invalid(format!(
                "window must be in 1..={MAX_WINDOW}"
            )));
        }
        if self.max_payload == 0 || self.max_payload > 8 * 1024 * 1024 {
            return bad("max_payload must be in 1..=8 MiB");
        }
        if self.max_frame < self.max_payload + 64 * 1024 || self.max_frame > 0xFF_FFFF {
            return bad("max_frame must be at least max_payload + 64 KiB and below 16 MiB");
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > 12 * 1024 * 1024 {
            return bad("batch_max_bytes must be in 1..=12 MiB");
        }
        if self.batch_timeout.is_zero() || self.lifetime.is_zero() || self.keepalive.is_zero() {
            return bad("batch_timeout, keepalive and lifetime must be greater than zero");
        }
        if self.setup_timeout.is_zero() {
            return bad("setup_timeout must be greater than zero");
        }
        if self.orchestrators == 0 || self.orchestrators > 64 {
            return bad("orchestrators must be in 1..=64");
        }
        if self.max_queued_bytes < 32 * 1024 * 1024 {
            return bad("max_queued_bytes must be at least 32 MiB (the largest frame must fit)");
        }
        if self.cache_capacity < 1024 * 1024 {
            return bad("cache_capacity must be at least 1 MiB");
        }
        if self.retention_interval < Duration::from_millis(100) {
            return bad("retention_interval must be at least 100ms");
        }
        if self.segment_max_age < Duration::from_secs(1) {
            return bad("segment_max_age must be at least 1s");
        }
        if !(64 * 1024..=1 << 30).contains(&self.segment_bytes) {
            return bad("segment_bytes must be in 64KiB..=1GiB");
        }
        if !(1..=100_000_000).contains(&self.dedup_max_ids) {
            return bad("dedup_max_ids must be in 1..=100000000");
        }
        if self.stale_after.is_zero() || self.stale_disconnect_after.is_some_and(|d| d.is_zero()) {
            return bad("stale_after and stale_disconnect_after must be greater than zero");
        }
        self.default_topic_settings()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.message))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../config/sluice.example.toml");
        let cfg = Config::from_toml(text).expect("example parses");
        cfg.validate().expect("example validates");
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Never));
        assert_eq!(
            "interval 10ms".parse::<FsyncPolicy>(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(10)))
        );
        assert!("interval 0s".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        let text = FsyncPolicy::Interval(Duration::from_millis(5)).to_string();
        assert_eq!(
            text.parse::<FsyncPolicy>(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(5)))
        );
    }

    #[test]
    fn retention_sizes_and_schedules_parse() {
        let cfg = Config::from_toml(
            "backoff = [\"1s\", \"5s\"]\n[retention]\nmax_age = \"7d\"\nmax_bytes = \"1GiB\"\ndiscard = \"acked\"\n",
        )
        .expect("parses");
        assert_eq!(cfg.retention.max_bytes, Some(1 << 30));
        assert_eq!(cfg.retention.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(cfg.retention.discard, sluice_protocol::Discard::Acked);
        assert_eq!(
            cfg.backoff,
            vec![Duration::from_secs(1), Duration::from_secs(5)]
        );
        cfg.validate().expect("valid");
        assert!(Config::from_toml("backoff = [\"soon\"]").is_err());
        assert!(Config::from_toml("[retention]\nmax_bytes = \"lots\"").is_err());
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert!(parse_bytes("-1").is_err() && parse_bytes("1XB").is_err());
        let tiny = Config::from_toml("[retention]\nmax_bytes = 10").expect("parses");
        assert!(tiny.validate().is_err(), "absurd size refused");
        let seg = Config::from_toml("segment_bytes = \"128KiB\"").expect("parses");
        assert_eq!(seg.segment_bytes, 128 * 1024);
        seg.validate().expect("valid");
        let tiny = Config::from_toml("segment_bytes = 4096").expect("parses");
        assert!(tiny.validate().is_err(), "segments too small refused");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::from_toml("batch_sise = 3").is_err());
    }

    #[test]
    fn batch_size_and_window_stop_where_the_broker_clamps() {
        let with = |batch_size, window| Config {
            batch_size,
            window,
            ..Config::default()
        };
        assert!(with(MAX_BATCH_SIZE, MAX_WINDOW).validate().is_ok());
        let e = with(MAX_BATCH_SIZE + 1, 4)
            .validate()
            .expect_err("batch too big");
        assert_eq!(
            e.to_string(),
            "invalid config: batch_size must be in 1..=4096"
        );
        let e = with(16, MAX_WINDOW + 1)
            .validate()
            .expect_err("window too big");
        assert_eq!(e.to_string(), "invalid config: window must be in 1..=1024");
        assert!(with(0, 4).validate().is_err() && with(16, 0).validate().is_err());
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().expect("defaults are valid");
    }
}
