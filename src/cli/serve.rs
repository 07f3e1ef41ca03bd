//! `sluice serve`: flags → [`Config`], the data dir's lock, start-up warnings, run the broker.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, FsyncPolicy};

use super::parse_duration;

/// `sluice serve`: every flag overrides the config file and its SLUICE_* variable. The defaults
/// shown by `--help` are [`Config::default`]'s (added by [`with_defaults_in_help`]): a flag has
/// no clap default, so that a value from the config file is not overridden by one.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one; the bound address is printed).
    #[arg(long, env = "SLUICE_LISTEN", value_name = "HOST:PORT", value_parser = parse_socket_addr)]
    pub listen: Option<SocketAddr>,
    /// Data directory (segment files and a sled database); one broker at a time.
    #[arg(long, env = "SLUICE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file (see config/sluice.example.toml).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Durability: always | never | "interval 10ms".
    #[arg(long, env = "SLUICE_FSYNC", value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,
    /// Messages per batch for a consumer that asks for no batch size (a consumer may ask for
    /// up to 4096).
    #[arg(long, env = "SLUICE_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<u32>,
    /// Redelivery timeout of an unacked batch (humantime, e.g. 30s).
    #[arg(long, env = "SLUICE_BATCH_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub batch_timeout: Option<Duration>,
    /// Redeliveries before dead-lettering.
    #[arg(long, env = "SLUICE_MAX_RETRIES", value_name = "N")]
    pub max_retries: Option<u32>,
    /// Unacked batches per consumer that asks for no window (a consumer may ask for 1..=1024).
    #[arg(long, env = "SLUICE_WINDOW", value_name = "N")]
    pub window: Option<u32>,
    /// Largest message payload in bytes.
    #[arg(long, env = "SLUICE_MAX_PAYLOAD", value_name = "BYTES")]
    pub max_payload: Option<usize>,
    /// Keepalive interval (humantime).
    #[arg(long, env = "SLUICE_KEEPALIVE", value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive: Option<Duration>,
    /// Longest client silence tolerated (humantime); at least twice the keepalive.
    #[arg(long, env = "SLUICE_LIFETIME", value_name = "DURATION", value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
    /// Close connections that send no SETUP within this time (humantime).
    #[arg(long, env = "SLUICE_SETUP_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub setup_timeout: Option<Duration>,
    /// Number of orchestrator actors (one thread each).
    #[arg(long, env = "SLUICE_ORCHESTRATORS", value_name = "N")]
    pub orchestrators: Option<u32>,
    /// Preallocate one 64 MiB segment at start (fsync always): true or false.
    #[arg(long, env = "SLUICE_PREALLOCATE_SEGMENT", value_name = "BOOL")]
    pub preallocate_segment: Option<bool>,
    /// Bytes queued to one client before it counts as not reading and is disconnected.
    #[arg(long, env = "SLUICE_MAX_QUEUED_BYTES", value_name = "BYTES")]
    pub max_queued_bytes: Option<usize>,
    /// sled cache size in bytes.
    #[arg(long, env = "SLUICE_CACHE_CAPACITY", value_name = "BYTES")]
    pub cache_capacity: Option<u64>,
    /// How often the retention sweep runs over every topic (humantime, at least 100ms).
    #[arg(long, env = "SLUICE_RETENTION_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub retention_interval: Option<Duration>,
    /// Enable the admin.fault route (tests only).
    #[arg(long, env = "SLUICE_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,
    /// A publish to an unknown topic creates it: true or false (false: `sluice topic create`
    /// first; publishing elsewhere is refused with UNKNOWN_TOPIC).
    #[arg(long, env = "SLUICE_AUTO_CREATE_TOPICS", value_name = "BOOL")]
    pub auto_create_topics: Option<bool>,
    /// Default retention: messages older than this are removed (humantime, e.g. 7d).
    #[arg(long, env = "SLUICE_RETENTION_MAX_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub retention_max_age: Option<Duration>,
    /// Default retention: most bytes per topic (e.g. 1GiB, 500MB, 4096).
    #[arg(long, env = "SLUICE_RETENTION_MAX_BYTES", value_name = "BYTES", allow_hyphen_values = true, value_parser = super::parse_size)]
    pub retention_max_bytes: Option<u64>,
    /// Default retention: most messages per topic.
    #[arg(long, env = "SLUICE_RETENTION_MAX_MESSAGES", value_name = "N", allow_hyphen_values = true, value_parser = super::parse_count)]
    pub retention_max_messages: Option<u64>,
    /// Default retention: age (limits only) or acked (also once every group acked them).
    #[arg(long, env = "SLUICE_RETENTION_DISCARD", value_name = "age|acked")]
    pub retention_discard: Option<sluice_protocol::Discard>,
    /// A segment is closed once its first message is this old (humantime).
    #[arg(long, env = "SLUICE_SEGMENT_MAX_AGE", value_name = "DURATION", value_parser = parse_duration)]
    pub segment_max_age: Option<Duration>,
    /// Message ids are remembered this long per topic (humantime; 0s: no deduplication).
    #[arg(long, env = "SLUICE_DEDUP_WINDOW", value_name = "DURATION", value_parser = parse_duration)]
    pub dedup_window: Option<Duration>,
    /// Default redelivery schedule of new groups: humantime entries separated by commas
    /// (e.g. 1s,5s,30s,2m).
    #[arg(long, env = "SLUICE_BACKOFF", value_name = "DUR,DUR,...", value_parser = super::parse_backoff_list)]
    pub backoff: Option<super::Schedule>,
    /// A consumer with lag and no ack for this long is flagged stale (humantime).
    #[arg(long, env = "SLUICE_STALE_AFTER", value_name = "DURATION", value_parser = parse_duration)]
    pub stale_after: Option<Duration>,
    /// Size at which a topic's segment file is closed (e.g. 64MiB; 64KiB..=1GiB; smaller
    /// segments let retention free disk in smaller steps; for tests and small disks).
    #[arg(long, env = "SLUICE_SEGMENT_BYTES", value_name = "BYTES", allow_hyphen_values = true, value_parser = super::parse_size)]
    pub segment_bytes: Option<u64>,
    /// A consumer stale for this long is disconnected (humantime; default: never).
    #[arg(long, env = "SLUICE_STALE_DISCONNECT_AFTER", value_name = "DURATION", value_parser = parse_duration)]
    pub stale_disconnect_after: Option<Duration>,
}

impl ServeArgs {
    /// The validated configuration: defaults < config file < SLUICE_* variables and flags.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            listen,
            data_dir,
            fsync,
            batch_size,
            batch_timeout,
            max_retries,
            window,
            max_payload,
            keepalive,
            lifetime,
            setup_timeout,
            orchestrators,
            max_queued_bytes,
            preallocate_segment,
            cache_capacity,
            auto_create_topics,
            retention_interval,
            segment_max_age,
            dedup_window,
            stale_after,
            segment_bytes
        );
        if let Some(b) = self.backoff {
            c.backoff = b.0;
        }
        if self.stale_disconnect_after.is_some() {
            c.stale_disconnect_after = self.stale_disconnect_after;
        }
        if let Some(v) = self.retention_max_age {
            c.retention.max_age = Some(v);
        }
        if let Some(v) = self.retention_max_bytes {
            c.retention.max_bytes = Some(v);
        }
        if let Some(v) = self.retention_max_messages {
            c.retention.max_messages = Some(v);
        }
        if let Some(v) = self.retention_discard {
            c.retention.discard = v;
        }
        if self.enable_fault_injection {
            c.enable_fault_injection = true;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Parses `HOST:PORT` where HOST is an IP address (`[::1]:7070` for IPv6).
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not an address: expected HOST:PORT with an IP address, e.g. 127.0.0.1:7070 or [::1]:7070")
    })
}

/// Adds `[default: …]`, taken from [`Config::default`], to the help of every `serve` flag
/// that is a config key, so the help cannot drift from the defaults.
pub fn with_defaults_in_help(serve: clap::Command) -> clap::Command {
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => return serve,
    };
    let ids: Vec<String> = serve
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    ids.into_iter().fold(serve, |cmd, id| {
        let shown = match defaults.get(&id) {
            Some(toml::Value::String(s)) => s.clone(),
            Some(toml::Value::Boolean(_)) | None => return cmd,
            Some(toml::Value::Array(a)) if a.is_empty() => return cmd,
            Some(v) => v.to_string(),
        };
        cmd.mut_arg(id, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {shown}]"))
        })
    })
}

/// Warnings about a configuration that is valid but likely to surprise.
pub fn config_warnings(c: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if c.lifetime < c.keepalive.saturating_mul(2) {
        w.push(format!(
            "lifetime {} is less than twice the keepalive {}: one late keepalive disconnects a client",
            humantime::format_duration(c.lifetime),
            humantime::format_duration(c.keepalive)
        ));
    }
    w
}

/// Name of the lock file in the data dir; it holds the pid of the broker using the dir.
pub const LOCK_FILE: &str = "broker.pid";

/// The data dir, held by this process (an exclusive `flock` on `<data_dir>/broker.pid`, which
/// holds our pid) until dropped. The kernel releases the lock when the process dies, even by
/// SIGKILL, so a stale file never blocks a restart.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Creates the data dir if needed and locks it, or says why not, naming the directory (and
    /// the pid of the broker that holds it).
    pub fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| {
                format!(
                    "data dir {} is not writable (cannot open {})",
                    dir.display(),
                    path.display()
                )
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let owner = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => format!("pid not yet written to {}", path.display()),
                };
                anyhow::bail!(
                    "data dir {} is in use by another broker ({owner})",
                    dir.display()
                );
            }
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
        };
        write_pid(&mut file).with_context(|| {
            format!(
                "data dir {} is not writable (cannot write {})",
                dir.display(),
                path.display()
            )
        })?;
        Ok(DataDirLock { _file: file })
    }
}

/// Runs `sluice serve` until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    for w in config_warnings(&config) {
        tracing::warn!(
            keepalive = %humantime::format_duration(config.keepalive),
            lifetime = %humantime::format_duration(config.lifetime),
            "{w}"
        );
    }
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let system = actix_rt::System::new();
    system.block_on(async move {
        let handle = crate::server::start(config)
            .await
            .context("starting the broker")?;
        // The one line of CLI output: scripts and tests read the bound address from it.
        println!("listening {}", handle.local_addr);
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lifetimes_are_warned_about() {
        let mut c = Config::default();
        assert!(
            config_warnings(&c).is_empty(),
            "20s keepalive, 90s lifetime"
        );
        c.keepalive = Duration::from_secs(2);
        c.lifetime = Duration::from_secs(4);
        assert!(config_warnings(&c).is_empty(), "exactly twice is enough");
        c.lifetime = Duration::from_millis(3999);
        let w = config_warnings(&c);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("lifetime 3s 999ms") && w[0].contains("keepalive 2s"));
    }

    #[test]
    fn issue_11_flags_reach_the_config() {
        use clap::Parser;
        #[derive(Parser)]
        struct Probe {
            #[command(flatten)]
            args: ServeArgs,
        }
        let p = Probe::try_parse_from([
            "serve",
            "--retention-interval",
            "1s",
            "--auto-create-topics",
            "false",
            "--retention-max-age",
            "7d",
            "--retention-max-bytes",
            "1GiB",
            "--retention-max-messages",
            "1000",
            "--retention-discard",
            "acked",
            "--segment-max-age",
            "10m",
            "--dedup-window",
            "5m",
            "--backoff",
            "1s,5s",
            "--stale-after",
            "30s",
            "--stale-disconnect-after",
            "2m",
            "--segment-bytes",
            "128KiB",
        ])
        .expect("parse");
        let c = p.args.into_config().expect("valid");
        assert_eq!(c.retention_interval, Duration::from_secs(1));
        assert!(!c.auto_create_topics);
        assert_eq!(c.retention.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.retention.max_bytes, Some(1 << 30));
        assert_eq!(c.retention.max_messages, Some(1000));
        assert_eq!(c.retention.discard, sluice_protocol::Discard::Acked);
        assert_eq!(c.segment_max_age, Duration::from_secs(600));
        assert_eq!(c.dedup_window, Duration::from_secs(300));
        assert_eq!(
            c.backoff,
            vec![Duration::from_secs(1), Duration::from_secs(5)]
        );
        assert_eq!(c.stale_after, Duration::from_secs(30));
        assert_eq!(c.stale_disconnect_after, Some(Duration::from_secs(120)));
        assert_eq!(c.segment_bytes, 128 * 1024);
        for bad in [
            &["serve", "--retention-max-bytes", "-1"][..],
            &["serve", "--backoff", "soon"],
            &["serve", "--retention-discard", "never"],
            &["serve", "--stale-after", "x"],
        ] {
            assert!(Probe::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn socket_addresses_need_a_port() {
        assert_eq!(
            parse_socket_addr("127.0.0.1:0"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        assert!(parse_socket_addr("[::1]:7070").is_ok());
        let e = parse_socket_addr("127.0.0.1").expect_err("no port");
        assert!(e.contains("'127.0.0.1'") && e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn the_data_dir_is_locked_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let first = DataDirLock::acquire(&dir).expect("first lock");
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).expect("pid file");
        assert_eq!(pid, format!("{}\n", std::process::id()));
        // flock locks belong to the open file, so a second open in this process conflicts too.
        let e = DataDirLock::acquire(&dir).expect_err("second lock");
        assert_eq!(
            e.to_string(),
            format!(
                "data dir {} is in use by another broker (pid {})",
                dir.display(),
                std::process::id()
            )
        );
        drop(first);
        DataDirLock::acquire(&dir).expect("free again");
    }
}
