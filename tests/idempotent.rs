//! Idempotent publish end to end (issue 11 item 7): the SDK producer resends what a broker
//! killed with SIGKILL left unconfirmed, with the same ids, and the topic holds each id exactly
//! once; an id repeated after its topic's dedup window is stored again.
//!
//! The producer reconnects to the address it was given, so the broker here is restarted on the
//! same port (this file's own process helper; `TestBroker::restart` picks a new port).
mod common;

use common::*;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sluice_sdk::{
    Admin, ClientConfig, Consumer, ConsumerConfig, NewMessage, Producer, TopicSettings,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A broker process on a fixed address, restartable on the same address and data dir.
struct FixedBroker {
    child: Option<Child>,
    addr: String,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl FixedBroker {
    fn start(extra: &[&str]) -> FixedBroker {
        // A free port: bound then released (the broker binds it with SO_REUSEADDR).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut b = FixedBroker {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--listen", &self.addr, "--data-dir"])
            .arg(self.data_dir())
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => assert_eq!(line, format!("listening {}", self.addr)),
            Err(_) => {
                let _ = child.kill();
                panic!("broker did not start; log:\n{}", log_of(&self.log_path()));
            }
        }
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

impl Drop for FixedBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- broker log ----\n{}", log_of(&self.log_path()));
        }
        self.kill();
    }
}

fn config(addr: &str, id: &str) -> ClientConfig {
    ClientConfig::new(addr)
        .client_id(id)
        .request_timeout(Duration::from_secs(5))
}

/// Every message of `topic` (payload text by seq), read by a new group.
async fn read_all(addr: &str, topic: &str, want: usize) -> BTreeMap<u64, String> {
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(config(addr, "reader"), topic, "audit").batch_size(1000),
    )
    .await
    .expect("subscribe");
    let mut got = BTreeMap::new();
    while got.len() < want {
        let m = next_message(&mut c, Duration::from_secs(30)).await;
        let text = String::from_utf8(m.payload().to_vec()).expect("utf-8");
        assert!(got.insert(m.seq(), text).is_none(), "seq {} twice", m.seq());
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("acks");
    got
}

/// 10,000 messages with ids, 1,000 in flight; after 3,000 are confirmed the broker's disk
/// syncs are stalled (so what it writes next is stored but never confirmed: a kill -9 leaves
/// it in the files) and it is killed with SIGKILL and restarted on the same address; the
/// producer resends what was not confirmed. Every publish succeeds, some resends are answered
/// as duplicates, and the topic holds each id exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_run_stores_each_id_exactly_once() {
    const N: u64 = 10_000;
    const KILL_AT: u64 = 3_000;
    const IN_FLIGHT: u64 = 1_000;
    let mut b = FixedBroker::start(&["--enable-fault-injection"]);
    let addr = b.addr.clone();
    let producer = Producer::connect(config(&addr, "producer"))
        .await
        .expect("producer");
    let admin = Admin::connect(config(&addr, "admin")).await.expect("admin");
    let mut pending = FuturesUnordered::new();
    let (mut next, mut confirmed, mut duplicates) = (0u64, 0u64, 0u64);
    let mut killed = false;
    while confirmed < N {
        while next < N && (pending.len() as u64) < IN_FLIGHT {
            let id = format!("order-{next}");
            let message = NewMessage {
                id: Some(id.as_str().into()),
                payload: id.into(),
                ..Default::default()
            };
            pending.push(producer.publish_batch("orders", vec![message]));
            next += 1;
        }
        let reply = pending
            .next()
            .await
            .expect("a publish in flight")
            .expect("every publish is confirmed in the end");
        confirmed += 1;
        if reply.duplicate {
            duplicates += 1;
        }
        if confirmed == KILL_AT && !killed {
            killed = true;
            admin
                .stall_syncs(Duration::from_secs(10))
                .await
                .expect("stall syncs");
            // Let the next requests be written (they wait for their sync).
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::block_in_place(|| {
                b.kill();
                b.spawn();
            });
        }
    }
    eprintln!("{duplicates} resent publishes were duplicates of stored ones");
    assert!(
        duplicates > 0,
        "nothing stored and unconfirmed was resent: the kill did not test deduplication"
    );
    let got = read_all(&addr, "orders", N as usize).await;
    assert_eq!(got.len() as u64, N);
    assert_eq!(
        got.keys().copied().max(),
        Some(N),
        "no seq beyond {N}: nothing stored twice"
    );
    let mut ids: Vec<&String> = got.values().collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, N, "each id exactly once");
    // The admin connection went with the killed broker.
    let admin = Admin::connect(config(&addr, "admin-after"))
        .await
        .expect("admin");
    let info = admin.topic_info("orders").await.expect("topic info");
    assert_eq!((info.head_seq, info.messages), (N, N));
}

/// Within the topic's dedup window a repeated id is not stored again (the reply names the
/// original seq), also across a restart; after the window it is stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_repeated_after_the_window_is_stored_again() {
    let mut b = FixedBroker::start(&[]);
    let addr = b.addr.clone();
    let admin = Admin::connect(config(&addr, "admin")).await.expect("admin");
    admin
        .create_topic(
            "short",
            TopicSettings {
                dedup_window_ms: Some(1500),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    let producer = Producer::connect(config(&addr, "producer"))
        .await
        .expect("producer");
    let once = |payload: &'static str| NewMessage {
        id: Some("repeat-me".into()),
        payload: payload.into(),
        ..Default::default()
    };
    let first = producer
        .publish_batch("short", vec![once("a")])
        .await
        .expect("first");
    assert!(!first.duplicate);
    tokio::task::block_in_place(|| {
        b.kill();
        b.spawn();
    });
    let again = producer
        .publish_batch("short", vec![once("b")])
        .await
        .expect("again");
    assert!(
        again.duplicate,
        "within the window, across a restart: {again:?}"
    );
    assert_eq!(again.seqs, vec![first.first_seq]);
    // The window is time: wait it out.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let later = producer
        .publish_batch("short", vec![once("c")])
        .await
        .expect("later");
    assert!(!later.duplicate, "{later:?}");
    assert_eq!(later.first_seq, first.first_seq + 1);
    let got = read_all(&addr, "short", 2).await;
    assert_eq!(
        got.values().map(String::as_str).collect::<Vec<_>>(),
        vec!["a", "c"]
    );
}
