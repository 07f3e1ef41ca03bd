//! The `sluice` command: clap → config → telemetry → run. No logic lives here.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sluice::config::{Config, FsyncPolicy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a persistent message broker (actix, RSocket, sled)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Publish messages (from flags or one per stdin line).
    Publish(sluice::cli::publish::PublishArgs),
    /// Consume a group, printing and acking each message.
    Consume(sluice::cli::consume::ConsumeArgs),
    /// Show actor, group and connection stats.
    Stats(sluice::cli::stats::StatsArgs),
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// `sluice serve`: every flag overrides the config file and its SLUICE_* variable.
#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, env = "SLUICE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (segment files and a sled database).
    #[arg(long, env = "SLUICE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (see config/sluice.example.toml).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Durability: always | never | "interval 10ms".
    #[arg(long, env = "SLUICE_FSYNC")]
    fsync: Option<FsyncPolicy>,
    /// Messages per batch.
    #[arg(long, env = "SLUICE_BATCH_SIZE")]
    batch_size: Option<u32>,
    /// Redelivery timeout of an unacked batch (humantime, e.g. 30s).
    #[arg(long, env = "SLUICE_BATCH_TIMEOUT", value_parser = duration)]
    batch_timeout: Option<Duration>,
    /// Redeliveries before dead-lettering.
    #[arg(long, env = "SLUICE_MAX_RETRIES")]
    max_retries: Option<u32>,
    /// Default unacked batches per consumer.
    #[arg(long, env = "SLUICE_WINDOW")]
    window: Option<u32>,
    /// Largest message payload in bytes.
    #[arg(long, env = "SLUICE_MAX_PAYLOAD")]
    max_payload: Option<usize>,
    /// Keepalive interval (humantime).
    #[arg(long, env = "SLUICE_KEEPALIVE", value_parser = duration)]
    keepalive: Option<Duration>,
    /// Longest client silence tolerated (humantime).
    #[arg(long, env = "SLUICE_LIFETIME", value_parser = duration)]
    lifetime: Option<Duration>,
    /// Close connections that send no SETUP within this time (humantime).
    #[arg(long, env = "SLUICE_SETUP_TIMEOUT", value_parser = duration)]
    setup_timeout: Option<Duration>,
    /// Number of orchestrator actors (one thread each).
    #[arg(long, env = "SLUICE_ORCHESTRATORS")]
    orchestrators: Option<u32>,
    /// sled cache size in bytes.
    #[arg(long, env = "SLUICE_CACHE_CAPACITY")]
    cache_capacity: Option<u64>,
    /// Enable the admin.fault route (tests only).
    #[arg(long, env = "SLUICE_ENABLE_FAULT_INJECTION")]
    enable_fault_injection: bool,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
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
            cache_capacity
        );
        if self.enable_fault_injection {
            c.enable_fault_injection = true;
        }
        c.validate()?;
        Ok(c)
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let system = actix_rt::System::new();
    system.block_on(async move {
        let handle = sluice::server::start(config)
            .await
            .context("starting the broker")?;
        // The one line of CLI output: scripts and tests read the bound address from it.
        println!("listening {}", handle.local_addr);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        anyhow::Ok(())
    })?;
    Ok(())
}

fn client<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() {
    let cli = Cli::parse();
    sluice::telemetry::init();
    let res = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Publish(a) => client(sluice::cli::publish::run(a)),
        Command::Consume(a) => client(sluice::cli::consume::run(a)),
        Command::Stats(a) => client(sluice::cli::stats::run(a)),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
