//! Storage faults against the real binary (issue 10):
//! - a publish request that fails part-way (full disk, file size limit) stores none of its
//!   messages, its seqs are reused by the next request, and nothing of it is ever delivered
//!   (item 6);
//! - running out of file descriptors or of disk space fails the request that hit it, and the
//!   broker serves every topic again once the resource is back, without a restart (item 9);
//! - a fresh data dir, and one with a small topic, take a few MiB, not a 64 MiB spare segment.
//!
//! Limits are set on the running broker with `prlimit(1)` (util-linux). The full-disk test
//! mounts a small tmpfs, which needs root: without it, it says so and passes vacuously.
mod common;
use bytes::Bytes;
use common::*;
use sluice_protocol::ErrorCode;
use sluice_sdk::{Consumer, ConsumerConfig, NewMessage, Producer, ProducerOptions, SdkError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A small request: 60 messages of 4000 bytes, ~4 chunks of 64 KiB.
const SMALL: (usize, usize) = (60, 4000);
/// A big request: 10 messages of 300 KiB, each a chunk of its own (written without zeros ahead,
/// so a write fails wherever the limit falls, not at the request's first chunk).
const BIG: (usize, usize) = (10, 300 * 1024);

/// A payload naming its request and place: `r00012-m007-` then filler, `len` bytes.
fn payload(req: usize, k: usize, len: usize) -> Bytes {
    let mut p = format!("r{req:05}-m{k:03}-").into_bytes();
    p.resize(len, b'.');
    Bytes::from(p)
}

fn id_of(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(12)]).into_owned()
}

/// Request `req` of `count` messages of `len` bytes.
fn request(req: usize, (count, len): (usize, usize)) -> Vec<NewMessage> {
    (0..count)
        .map(|k| NewMessage {
            payload: payload(req, k, len),
            ..Default::default()
        })
        .collect()
}

fn is_storage_error(e: &SdkError) -> bool {
    e.code() == Some(ErrorCode::StorageError)
}

/// A producer that sends each request on its own.
async fn producer(addr: &str, id: &str) -> Producer {
    let options = ProducerOptions {
        max_batch_messages: 1,
        ..Default::default()
    };
    Producer::connect_with(client_config(addr, id), options)
        .await
        .expect("producer connect")
}

/// Reads `topic` from the start with a new group `group` until `want` messages came and then
/// nothing more for a second; acks them. Returns seq → payload id.
async fn read_all(addr: &str, topic: &str, group: &str, want: usize) -> BTreeMap<u64, String> {
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(addr, group), topic, group).batch_size(64),
    )
    .await
    .expect("subscribe");
    let mut out = BTreeMap::new();
    loop {
        let wait = if out.len() >= want {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(20)
        };
        match tokio::time::timeout(wait, c.next()).await {
            Ok(Some(Ok(m))) => {
                out.insert(m.seq(), id_of(m.payload()));
                c.ack(&m).expect("ack");
            }
            Ok(Some(Err(e))) => panic!("consumer of {topic} failed: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    c.flush_acks().await.expect("flush acks");
    out
}

/// Sets the soft limit of a resource (`nofile`, `fsize`, ...) of a running process.
fn prlimit(pid: u32, what: &str, soft: impl std::fmt::Display) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--{what}={soft}:"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit --{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The requests of one topic: acknowledged ones with their first seq, and refused ones.
#[derive(Default)]
struct Ledger {
    acked: Vec<(usize, (usize, usize), u64)>,
    refused: Vec<usize>,
    next_req: usize,
}

impl Ledger {
    /// Publishes one request of `shape`; true if acknowledged, false if refused with a
    /// storage error (any other error fails the test).
    async fn publish(&mut self, p: &Producer, topic: &str, shape: (usize, usize)) -> bool {
        let req = self.next_req;
        self.next_req += 1;
        match p.publish_batch(topic, request(req, shape)).await {
            Ok(r) => {
                assert_eq!(r.last_seq - r.first_seq + 1, shape.0 as u64, "one request");
                self.acked.push((req, shape, r.first_seq));
                true
            }
            Err(e) if is_storage_error(&e) => {
                eprintln!("request {req} refused: {e}");
                self.refused.push(req);
                false
            }
            Err(e) => panic!("request {req}: unexpected error {e}"),
        }
    }

    /// The seq the next request must get.
    fn next_seq(&self) -> u64 {
        self.acked
            .last()
            .map(|(_, (n, _), f)| f + *n as u64)
            .unwrap_or(1)
    }

    /// What the acknowledged requests stored: seq → payload id.
    fn expected(&self) -> BTreeMap<u64, String> {
        let mut m = BTreeMap::new();
        for &(req, (count, len), first) in &self.acked {
            for k in 0..count {
                m.insert(first + k as u64, id_of(&payload(req, k, len)));
            }
        }
        m
    }

    /// Checks that the log of `topic`, read by a new group, is exactly what was acknowledged:
    /// seqs 1..=N without a gap, nothing of a refused request.
    async fn check_log(&self, addr: &str, topic: &str, group: &str) {
        let want = self.expected();
        let seqs: Vec<u64> = want.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=want.len() as u64).collect::<Vec<_>>(),
            "acknowledged seqs are not gap-free"
        );
        let got = read_all(addr, topic, group, want.len()).await;
        let refused: Vec<String> = self.refused.iter().map(|r| format!("r{r:05}-")).collect();
        let leaked: Vec<(&u64, &String)> = got
            .iter()
            .filter(|(_, id)| refused.iter().any(|r| id.starts_with(r)))
            .collect();
        assert!(
            leaked.is_empty(),
            "{group}: {} messages of refused requests were delivered, e.g. {:?}",
            leaked.len(),
            &leaked[..leaked.len().min(5)]
        );
        assert_eq!(got.len(), want.len(), "{group}: messages read");
        assert!(
            got == want,
            "{group}: the log differs from what was acknowledged"
        );
    }
}

/// A tmpfs of `size` mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    /// None where mounting is not allowed (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "cannot mount a tmpfs ({}): this test needs root and is skipped",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { _dir: dir, mnt })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Item 6 (and 9, for space): on a full disk a request fails part-way through its chunks.
/// None of its messages is stored, the next request gets the seqs it would have had, and once
/// space is back the broker takes publishes again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_on_a_full_disk_stores_nothing_and_space_coming_back_heals() {
    let Some(fs) = Tmpfs::mount("24m") else {
        return;
    };
    // Room to give back once the disk is full: 1 MiB (part of a big request fits), then more.
    let some = fs.mnt.join("ballast-1m");
    let more = fs.mnt.join("ballast-4m");
    std::fs::write(&some, vec![1u8; 1 << 20]).expect("ballast");
    std::fs::write(&more, vec![1u8; 4 << 20]).expect("ballast");
    let data = fs.mnt.join("data");
    let mut b = TestBroker::start_on(&data, &[]);
    let topic = "full";
    let p = producer(&b.addr(), "full-disk").await;
    let mut log = Ledger::default();
    while log.publish(&p, topic, SMALL).await {
        assert!(log.next_req < 1000, "the disk never filled");
    }
    assert!(
        log.acked.len() > 10,
        "only {} requests fit",
        log.acked.len()
    );
    // 1 MiB free: a request of 3 MiB gets part-way.
    std::fs::remove_file(&some).expect("free 1 MiB");
    assert!(
        !log.publish(&p, topic, BIG).await,
        "3 MiB fit in 1 MiB of free space"
    );
    // Space comes back: the next request is stored right after the last acknowledged one.
    std::fs::remove_file(&more).expect("free 4 MiB");
    let next = log.next_seq();
    assert!(
        log.publish(&p, topic, SMALL).await,
        "refused with space back"
    );
    let first = log.acked.last().map(|a| a.2);
    assert_eq!(
        first,
        Some(next),
        "the refused requests left seqs behind: the next request did not start at {next}"
    );
    log.check_log(&b.addr(), topic, "audit").await;
    // And the same after a kill -9 and a restart on what the disk holds.
    b.restart();
    log.check_log(&b.addr(), topic, "audit-after-restart").await;
    b.kill();
    drop(fs);
}

/// Item 6 without root: a file size limit (`RLIMIT_FSIZE`) makes a write fail part-way through
/// a request (`EFBIG`) as a full disk does; the broker must not die of `SIGXFSZ` either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_on_the_file_size_limit_stores_nothing() {
    let mut b = TestBroker::start();
    let topic = "fsize";
    let p = producer(&b.addr(), "fsize").await;
    let mut log = Ledger::default();
    for _ in 0..5 {
        assert!(log.publish(&p, topic, SMALL).await);
    }
    // ~1.2 MB stored: a limit 1.3 MB above lets a third of a 3 MiB request in.
    prlimit(b.pid(), "fsize", 5 * SMALL.0 * SMALL.1 + 1_300_000);
    assert!(
        !log.publish(&p, topic, BIG).await,
        "3 MiB written past the file size limit"
    );
    prlimit(b.pid(), "fsize", "unlimited");
    let next = log.next_seq();
    assert!(
        log.publish(&p, topic, SMALL).await,
        "refused once the limit is lifted"
    );
    assert_eq!(
        log.acked.last().map(|a| a.2),
        Some(next),
        "the refused request left seqs behind"
    );
    log.check_log(&b.addr(), topic, "audit").await;
    b.restart();
    log.check_log(&b.addr(), topic, "audit-after-restart").await;
}

/// Item 9: with a low file descriptor limit, the topic that hit `EMFILE` gets a storage error,
/// and once descriptors are free again every topic takes publishes and acks, without a
/// restart. A sync failing to *open* a file is not a failed write-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_fails_one_request_and_the_broker_recovers() {
    let b = TestBroker::start();
    let addr = b.addr();
    let p = producer(&addr, "fd-producer").await;
    // Idle connections, each holding one of the broker's descriptors until closed.
    let mut hogs = Vec::new();
    for _ in 0..24 {
        hogs.push(RawClient::setup(&addr, Duration::from_secs(60)).await);
    }
    let open = || b.fd_count() as u64;
    assert!(
        eventually(Duration::from_secs(10), || open() >= 24).await,
        "hog connections not accepted"
    );
    let limit = open() + 12;
    prlimit(b.pid(), "nofile", limit);

    // New topics until one cannot get a descriptor.
    let mut ok_topics = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let topic = format!("fd-{i:03}");
        let msg = NewMessage {
            payload: Bytes::from(format!("{topic} first")),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(20), p.publish(&topic, msg)).await {
            Ok(Ok(seq)) => {
                assert_eq!(seq, 1);
                ok_topics.push(topic);
            }
            Ok(Err(e)) if is_storage_error(&e) => {
                eprintln!("{topic}: refused at {} descriptors: {e}", open());
                refused = Some(topic);
                break;
            }
            Ok(Err(e)) => panic!("{topic}: unexpected error {e}"),
            Err(_) => panic!("{topic}: no answer in 20 s"),
        }
    }
    let refused = refused.expect("a publish must run out of descriptors");
    assert!(
        !ok_topics.is_empty(),
        "no topic was created below the limit"
    );

    // Descriptors come back: the idle connections go.
    drop(hogs);
    assert!(
        eventually(Duration::from_secs(10), || open() + 16 <= limit).await,
        "the broker did not close the idle connections ({} open)",
        open()
    );

    // Every topic takes a publish again; the refused one stored nothing before.
    let mut all = ok_topics.clone();
    all.push(refused.clone());
    for topic in &all {
        let msg = NewMessage {
            payload: Bytes::from(format!("{topic} second")),
            ..Default::default()
        };
        let want = if *topic == refused { 1 } else { 2 };
        let seq = tokio::time::timeout(Duration::from_secs(20), p.publish(topic, msg))
            .await
            .unwrap_or_else(|_| panic!("{topic}: no answer in 20 s"))
            .unwrap_or_else(|e| panic!("{topic}: publish after recovery failed: {e}"));
        assert_eq!(seq, want, "{topic}: seq after recovery");
    }
    // ... and acks: each topic read and acked by a group (durable ack commits).
    for topic in &all {
        let mut c = Consumer::subscribe(ConsumerConfig::new(
            client_config(&addr, &format!("{topic}-c")),
            topic,
            "g",
        ))
        .await
        .expect("subscribe");
        let want: Vec<String> = if *topic == refused {
            vec![format!("{topic} second")]
        } else {
            vec![format!("{topic} first"), format!("{topic} second")]
        };
        let mut got = Vec::new();
        while got.len() < want.len() {
            let m = next_message(&mut c, Duration::from_secs(20)).await;
            got.push(String::from_utf8_lossy(m.payload()).into_owned());
            c.ack(&m).expect("ack");
        }
        c.flush_acks()
            .await
            .unwrap_or_else(|e| panic!("{topic}: acks after recovery failed: {e}"));
        assert_eq!(got, want, "{topic}");
        c.close().await.expect("close");
    }
    assert!(
        !b.log().contains("refuses writes until the broker restarts"),
        "the store was poisoned by running out of descriptors"
    );
}

/// Allocated bytes under `dir` (what `du` counts).
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let Ok(md) = e.metadata() else { continue };
        total += md.blocks() * 512;
        if md.is_dir() {
            total += du(&e.path());
        }
    }
    total
}

/// New user: with `--preallocate-segment false`, a fresh broker's data dir, and one holding a
/// small topic, take a few MiB (no 64 MiB spare segment made ahead of need); by default one
/// segment is preallocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_data_dir_and_a_small_topic_take_a_few_mib() {
    const BOUND: u64 = 4 << 20;
    let preallocated = TestBroker::start();
    let default_du = du(&preallocated.data_dir());
    assert!(
        default_du >= 64 << 20,
        "by default one 64 MiB segment is preallocated: {default_du} bytes"
    );
    drop(preallocated);
    let b = TestBroker::start_with(&["--preallocate-segment", "false"]);
    let data = b.data_dir();
    let fresh = du(&data);
    assert!(
        fresh < BOUND,
        "a fresh data dir takes {:.1} MiB",
        fresh as f64 / (1 << 20) as f64
    );
    let p = Producer::connect(client_config(&b.addr(), "small"))
        .await
        .expect("connect");
    for i in 0..100 {
        p.send("small", format!("message {i}"))
            .await
            .expect("publish");
    }
    let small = du(&data);
    eprintln!(
        "data dir: {:.2} MiB fresh, {:.2} MiB with a topic of 100 small messages",
        fresh as f64 / (1 << 20) as f64,
        small as f64 / (1 << 20) as f64
    );
    assert!(
        small < BOUND,
        "a data dir with one small topic takes {:.1} MiB",
        small as f64 / (1 << 20) as f64
    );
}
