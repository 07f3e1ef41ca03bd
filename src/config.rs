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
