//! NATS JetStream 2.9: stream `BENCH` (file storage, limits retention, R1); `js.publish` + await
//! the PubAck; each group = durable pull consumer `gN` (`AckExplicit`, max_ack_pending 20000),
//! pulled `--nats-batch` at a time; every message acked (`+ACK`), the last one with a
//! double-ack (waits for the server). `--nats-ack all`: `AckAll`, one ack every `--ack-every`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use futures::StreamExt;
use serde_json::{json, Map};
use tokio::sync::oneshot;

use crate::opts::Opts;
use crate::workload::{make_payload, now_ns, pump, BoxFut, Group, Pumped, Target};

const STREAM: &str = "BENCH";
const SUBJ: &str = "bench.msgs";

pub struct Nats {
    url: String,
}

impl Nats {
    pub fn new(o: &Opts) -> Nats {
        Nats {
            url: format!("nats://{}", o.peer_addr()),
        }
    }

    async fn ctx(&self, o: &Opts) -> Result<(async_nats::Client, jetstream::Context)> {
        let client = async_nats::connect(self.url.as_str()).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(60))
            .max_ack_inflight(o.inflight.max(1) + 16)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok((client, js))
    }
}

impl Target for Nats {
    fn setup(self: Arc<Self>, o: Opts) -> BoxFut<()> {
        Box::pin(async move {
            let (_c, js) = self.ctx(&o).await?;
            let _ = js.delete_stream(STREAM).await;
            let s = js
                .create_stream(stream::Config {
                    name: STREAM.into(),
                    subjects: vec![SUBJ.into()],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("create_stream: {e}"))?;
            for g in 0..o.groups {
                s.create_consumer(pull::Config {
                    durable_name: Some(format!("g{g}")),
                    ack_policy: if o.nats_ack_all {
                        AckPolicy::All
                    } else {
                        AckPolicy::Explicit
                    },
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    max_ack_pending: 20_000,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("create_consumer: {e}"))?;
            }
            Ok(())
        })
    }

    fn produce(self: Arc<Self>, o: Opts) -> BoxFut<Pumped> {
        Box::pin(async move {
            let (_c, js) = self.ctx(&o).await?;
            let size = o.size;
            pump(o.n, o.inflight, o.rate, o.progress, move |ix| {
                let js = js.clone();
                async move {
                    let p = make_payload(size, ix);
                    let ackf = js
                        .publish(SUBJ, p.into())
                        .await
                        .map_err(|e| anyhow!("publish: {e}"))?;
                    ackf.await.map_err(|e| anyhow!("publish ack: {e}"))?;
                    Ok(())
                }
            })
            .await
        })
    }

    fn consume(
        self: Arc<Self>,
        o: Opts,
        g: Arc<Group>,
        _c: usize,
        ready: oneshot::Sender<()>,
    ) -> BoxFut<u64> {
        Box::pin(async move {
            let (client, js) = self.ctx(&o).await?;
            let s = js
                .get_stream(STREAM)
                .await
                .map_err(|e| anyhow!("get_stream: {e}"))?;
            let cons: jetstream::consumer::PullConsumer = s
                .get_consumer(&format!("g{}", g.index))
                .await
                .map_err(|e| anyhow!("get_consumer: {e}"))?;
            let mut msgs = cons
                .stream()
                .max_messages_per_batch(o.nats_batch)
                .messages()
                .await
                .map_err(|e| anyhow!("messages: {e}"))?;
            let _ = ready.send(());
            let mut last_ack = 0;
            let mut count = 0u64;
            let done = g.wait_done();
            tokio::pin!(done);
            loop {
                let m = tokio::select! {
                    biased;
                    m = msgs.next() => m,
                    _ = &mut done => break,
                };
                let Some(m) = m else { break };
                let m = m.map_err(|e| anyhow!("pull: {e}"))?;
                count += 1;
                if g.on_msg(&m.payload)? {
                    // last message: double ack = wait until the server processed it
                    m.double_ack()
                        .await
                        .map_err(|e| anyhow!("double_ack: {e}"))?;
                    last_ack = now_ns();
                    break;
                } else if !o.nats_ack_all || count.is_multiple_of(o.ack_every) {
                    // AckExplicit: every message; AckAll: cumulative ack every --ack-every msgs
                    m.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
                }
            }
            client.flush().await?;
            if last_ack == 0 {
                // another consumer of the group got the last message; ours are flushed now
                last_ack = now_ns();
            }
            Ok(last_ack)
        })
    }

    fn describe(self: Arc<Self>, o: Opts) -> BoxFut<Map<String, serde_json::Value>> {
        Box::pin(async move {
            let (client, _js) = self.ctx(&o).await?;
            let mut m = Map::new();
            // 2.9's file store syncs periodically, never before the PubAck.
            m.insert("fsync".into(), json!("none"));
            m.insert("broker_version".into(), json!(client.server_info().version));
            m.insert(
                "nats_ack".into(),
                json!(if o.nats_ack_all { "all" } else { "explicit" }),
            );
            Ok(m)
        })
    }
}
