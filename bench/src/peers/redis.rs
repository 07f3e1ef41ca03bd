//! Redis 7 Streams: `XADD bench * d <payload>` per message on one multiplexed connection;
//! group = `XGROUP CREATE bench gN $ MKSTREAM`; each consumer loops
//! `XREADGROUP GROUP gN cC COUNT 1000 BLOCK 200 STREAMS bench >` and sends one `XACK` with every
//! id of that read (awaited). Durability is the server's `appendfsync` (set by `bench/peers.sh`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde_json::{json, Map};
use tokio::sync::oneshot;

use crate::opts::Opts;
use crate::workload::{make_payload, now_ns, pump, BoxFut, Group, Pumped, Target};

const KEY: &str = "bench";

pub struct Redis {
    url: String,
}

impl Redis {
    pub fn new(o: &Opts) -> Redis {
        Redis {
            url: format!("redis://{}/", o.peer_addr()),
        }
    }

    async fn conn(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        let cfg = AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(60)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Ok(client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?)
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn arr(v: &Value) -> Option<&Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

fn bad(what: &str) -> anyhow::Error {
    anyhow!("unexpected XREADGROUP reply: {what}")
}

impl Target for Redis {
    fn setup(self: Arc<Self>, o: Opts) -> BoxFut<()> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let _: i64 = redis::cmd("DEL").arg(KEY).query_async(&mut c).await?;
            for g in 0..o.groups {
                let _: String = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(KEY)
                    .arg(format!("g{g}"))
                    .arg("$")
                    .arg("MKSTREAM")
                    .query_async(&mut c)
                    .await?;
            }
            Ok(())
        })
    }

    fn produce(self: Arc<Self>, o: Opts) -> BoxFut<Pumped> {
        Box::pin(async move {
            let c = self.conn().await?;
            let size = o.size;
            pump(o.n, o.inflight, o.rate, o.progress, move |ix| {
                let mut c = c.clone();
                async move {
                    let p = make_payload(size, ix);
                    let _id: Value = redis::cmd("XADD")
                        .arg(KEY)
                        .arg("*")
                        .arg("d")
                        .arg(p)
                        .query_async(&mut c)
                        .await?;
                    Ok(())
                }
            })
            .await
        })
    }

    fn consume(
        self: Arc<Self>,
        _o: Opts,
        g: Arc<Group>,
        c: usize,
        ready: oneshot::Sender<()>,
    ) -> BoxFut<u64> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let _ = ready.send(());
            let group = format!("g{}", g.index);
            let consumer = format!("c{c}");
            let mut last_ack = 0;
            while !g.is_done() {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&group)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(KEY)
                    .arg(">")
                    .query_async(&mut conn)
                    .await?;
                // [[key, [[id, [field, value]], ...]]] or Nil on timeout
                let Some(streams) = arr(&reply) else { continue };
                let mut ack = redis::cmd("XACK");
                ack.arg(KEY).arg(&group);
                let mut k = 0;
                for s in streams {
                    let s = arr(s).ok_or_else(|| bad("stream"))?;
                    let entries = arr(s.get(1).ok_or_else(|| bad("entries"))?)
                        .ok_or_else(|| bad("entries"))?;
                    for e in entries {
                        let e = arr(e).ok_or_else(|| bad("entry"))?;
                        let id = e.first().and_then(bytes).ok_or_else(|| bad("id"))?;
                        let fields = e.get(1).and_then(arr).ok_or_else(|| bad("fields"))?;
                        let payload = fields
                            .get(1)
                            .and_then(bytes)
                            .ok_or_else(|| bad("payload"))?;
                        g.on_msg(payload)?;
                        ack.arg(id);
                        k += 1;
                    }
                }
                if k > 0 {
                    let _n: i64 = ack.query_async(&mut conn).await?; // batch ack, awaited
                    last_ack = now_ns();
                }
            }
            Ok(last_ack)
        })
    }

    fn describe(self: Arc<Self>, _o: Opts) -> BoxFut<Map<String, serde_json::Value>> {
        Box::pin(async move {
            let mut c = self.conn().await?;
            let fsync: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("appendfsync")
                .query_async(&mut c)
                .await?;
            let aof: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("appendonly")
                .query_async(&mut c)
                .await?;
            let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
            let version = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .unwrap_or("")
                .trim()
                .to_string();
            let mut m = Map::new();
            let fsync = match (aof.get(1).map(String::as_str), fsync.get(1)) {
                (Some("yes"), Some(f)) => f.clone(),
                _ => "no-aof".into(),
            };
            m.insert("fsync".into(), json!(fsync));
            m.insert("broker_version".into(), json!(version));
            Ok(m)
        })
    }
}
