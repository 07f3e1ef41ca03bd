//! The `sluice` command: clap → config → telemetry → run. No logic lives here.

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

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
    Serve(sluice::cli::serve::ServeArgs),
    /// Publish messages (from flags or one per stdin line).
    Publish(sluice::cli::publish::PublishArgs),
    /// Consume a group, printing and acking each message.
    Consume(sluice::cli::consume::ConsumeArgs),
    /// Show actor, group and connection stats.
    Stats(sluice::cli::stats::StatsArgs),
    /// Create, alter, show, list and delete topics.
    Topic(sluice::cli::topic::TopicArgs),
    /// List, show, seek (move) and delete groups.
    Group(sluice::cli::group::GroupArgs),
    /// Tail lifecycle events; disconnect stale consumers.
    Admin(sluice::cli::admin::AdminArgs),
}

fn client<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() {
    let command = Cli::command().mut_subcommand("serve", sluice::cli::serve::with_defaults_in_help);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    sluice::telemetry::init();
    let res = match cli.command {
        Command::Serve(a) => sluice::cli::serve::run(a),
        Command::Publish(a) => client(sluice::cli::publish::run(a)),
        Command::Consume(a) => client(sluice::cli::consume::run(a)),
        Command::Stats(a) => client(sluice::cli::stats::run(a)),
        Command::Topic(a) => client(sluice::cli::topic::run(a)),
        Command::Group(a) => client(sluice::cli::group::run(a)),
        Command::Admin(a) => client(sluice::cli::admin::run(a)),
    };
    if let Err(e) = res {
        eprintln!("error: {}", sluice::cli::error_report(&e));
        std::process::exit(1);
    }
}
