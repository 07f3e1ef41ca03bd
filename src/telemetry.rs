//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`); `log` records from
//! actix and rsocket_rust are bridged in. Colours only when stderr is a terminal, so a log file
//! or a journal gets plain text.

/// Installs the subscriber once. Safe to call twice (the second call does nothing).
pub fn init() {
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
