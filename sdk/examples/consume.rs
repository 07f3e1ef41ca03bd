//! Consumes a topic as a group, printing and acking every message.
//!
//! ```text
//! cargo run -p sluice-sdk --example consume -- [ADDR] [TOPIC] [GROUP] [COUNT]
//! ```
//! `ADDR` defaults to `$SLUICE_ADDR`, then `127.0.0.1:7070`; `TOPIC` to `demo`; `GROUP` to
//! `example`; without `COUNT` it runs until interrupted.

use sluice_sdk::{ClientConfig, Consumer, ConsumerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .or_else(|| std::env::var("SLUICE_ADDR").ok())
        .unwrap_or_else(|| sluice_sdk::DEFAULT_ADDR.to_string());
    let topic = args.next().unwrap_or_else(|| "demo".to_string());
    let group = args.next().unwrap_or_else(|| "example".to_string());
    let limit: Option<u64> = args.next().map(|n| n.parse()).transpose()?;

    let client = ClientConfig::new(addr).client_id("example-consume");
    let mut consumer = Consumer::subscribe(ConsumerConfig::new(client, topic, group)).await?;
    let mut seen = 0u64;
    loop {
        let received = tokio::select! {
            r = consumer.next() => r,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(received) = received else { break };
        let received = received?;
        println!(
            "seq={} attempt={} key={} {}",
            received.seq(),
            received.attempt(),
            received.message.key.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(received.payload())
        );
        consumer.ack(&received)?;
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    // Make sure the acks are durable before exiting.
    consumer.close().await?;
    Ok(())
}
