//! Publishes messages with many in flight and reports the rate.
//!
//! ```text
//! cargo run -p sluice-sdk --example produce -- [ADDR] [TOPIC] [COUNT]
//! ```
//! `ADDR` defaults to `$SLUICE_ADDR`, then `127.0.0.1:7070`; `TOPIC` to `demo`; `COUNT` to 10000.

use std::time::Instant;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sluice_sdk::{ClientConfig, NewMessage, Producer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .or_else(|| std::env::var("SLUICE_ADDR").ok())
        .unwrap_or_else(|| sluice_sdk::DEFAULT_ADDR.to_string());
    let topic = args.next().unwrap_or_else(|| "demo".to_string());
    let count: u64 = match args.next() {
        Some(n) => n.parse()?,
        None => 10_000,
    };

    let producer = Producer::connect(ClientConfig::new(addr).client_id("example-produce")).await?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let (mut sent, mut first, mut last) = (0u64, u64::MAX, 0u64);
    while sent < count || !in_flight.is_empty() {
        while sent < count && in_flight.len() < 1000 {
            let message = NewMessage {
                key: Some(format!("key-{}", sent % 100)),
                payload: format!("message {sent}").into(),
                ..Default::default()
            };
            in_flight.push(producer.publish(topic.clone(), message));
            sent += 1;
        }
        if let Some(result) = in_flight.next().await {
            let seq = result?;
            first = first.min(seq);
            last = last.max(seq);
        }
    }
    let elapsed = started.elapsed();
    println!(
        "published {count} messages to {topic} (seq {first}..={last}) in {:.2?}: {:.0} msg/s",
        elapsed,
        count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
    );
    Ok(())
}
