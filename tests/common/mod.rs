//! The one test harness: `TestBroker` runs the real `sluice` binary on 127.0.0.1:0 with a
//! temporary data dir, waits for its "listening ADDR" line (never a blind sleep), and can kill -9
//! and restart it on the same data. `RawClient` speaks raw RSocket frames for protocol tests.
#![allow(dead_code)]

use bytes::{Buf, Bytes, BytesMut};
use rsocket_rust::extension::{
    CompositeMetadata, CompositeMetadataEntry, MimeType, RoutingMetadata,
};
use rsocket_rust::frame::{self as rf, Frame};
use rsocket_rust::utils::Writeable;
use sluice_protocol::{
    AckReply, AckRequest, Batch, GroupMode, NewMessage, PublishReply, PublishRequest, StreamEvent,
    SubscribeRequest,
};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A broker child process.
pub struct TestBroker {
    child: Option<Child>,
    addr: String,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// Data directory given by [`TestBroker::start_on`] (default: `data/` in `dir`).
    data: Option<PathBuf>,
}

impl TestBroker {
    /// Starts a broker with default settings.
    pub fn start() -> TestBroker {
        Self::start_with(&[])
    }

    /// Starts a broker with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = TestBroker {
            child: None,
            addr: String::new(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            data: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
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
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("broker did not report readiness; log:\n{}", self.log());
            }
        };
        self.addr = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_string();
        self.child = Some(child);
    }

    /// `HOST:PORT` of the running broker.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// PID of the running broker.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the broker to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills (SIGKILL) and starts again on the same data dir (a new port).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Open file descriptors of the broker process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size in KiB.
    pub fn rss_kb(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS:")
    }

    /// Runs the `sluice` CLI with `args` and returns (status ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .output()
            .expect("run sluice");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.log());
        }
        self.kill();
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The next message of an SDK consumer, failing the test on timeout, end or error.
pub async fn next_message(c: &mut sluice_sdk::Consumer, timeout: Duration) -> sluice_sdk::Received {
    tokio::time::timeout(timeout, c.next())
        .await
        .expect("message in time")
        .expect("stream open")
        .expect("no error")
}

/// SDK client config for a broker.
/// A payload of `len` (>= 8) bytes naming its index `i` in its first 8 bytes, every other byte
/// depending on `i` too: a hole or a mix-up in storage shows.
pub fn big_payload(i: u64, len: usize) -> Bytes {
    let mut p = i.to_be_bytes().to_vec();
    p.extend((8..len).map(|k| (k as u64 * 31 + i * 7) as u8));
    Bytes::from(p)
}

/// The index of a [`big_payload`], after checking that the payload is whole (panics if not).
pub fn check_big_payload(p: &Bytes, seq: u64) -> u64 {
    let mut ix = [0u8; 8];
    ix.copy_from_slice(&p[..8.min(p.len())]);
    let i = u64::from_be_bytes(ix);
    assert!(*p == big_payload(i, p.len()), "seq {seq} came back altered");
    i
}

pub fn client_config(addr: &str, id: &str) -> sluice_sdk::ClientConfig {
    sluice_sdk::ClientConfig {
        addr: addr.to_string(),
        client_id: id.to_string(),
        ..Default::default()
    }
}

/// Composite metadata carrying one route.
pub fn route_metadata(route: &str) -> Bytes {
    let r = RoutingMetadata::builder().push_str(route).build();
    let mut rb = BytesMut::new();
    r.write_to(&mut rb);
    let c = CompositeMetadata::builder()
        .push_entry(CompositeMetadataEntry::new(
            MimeType::from(sluice_protocol::ROUTING_MIME_TYPE),
            rb.freeze(),
        ))
        .build();
    c.into()
}

/// A raw RSocket connection for protocol tests.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Connects without sending anything.
    pub async fn connect(addr: &str) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and sends a valid SETUP with the given lifetime.
    pub async fn setup(addr: &str, lifetime: Duration) -> RawClient {
        let mut c = Self::connect(addr).await;
        let f = setup_frame("raw-test", lifetime);
        c.send(&f).await;
        c
    }

    /// Sends one frame.
    pub async fn send(&mut self, f: &Frame) {
        let mut b = BytesMut::new();
        sluice::session::frame::encode_frame(f, &mut b);
        self.send_raw(&b).await;
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Sends a request-response with `route` and MessagePack `data`.
    pub async fn request(&mut self, sid: u32, route: &str, data: Bytes) {
        let f = rf::RequestResponse::builder(sid, 0)
            .set_metadata(route_metadata(route))
            .set_data(data)
            .build();
        self.send(&f).await;
    }

    /// Next frame, or None on EOF / timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.buf.len() >= 3 {
                let len = ((self.buf[0] as usize) << 16)
                    | ((self.buf[1] as usize) << 8)
                    | self.buf[2] as usize;
                if self.buf.len() >= 3 + len {
                    self.buf.advance(3);
                    let mut fb = self.buf.split_to(len);
                    return Frame::decode(&mut fb).ok();
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut tmp = vec![0u8; 65536];
            match tokio::time::timeout(left, self.stream.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Waits until the broker closes the connection (EOF or reset); returns the frames seen first.
    pub async fn closed_within(&mut self, timeout: Duration) -> Option<Vec<Frame>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if self.buf.len() >= 3 {
                if let Some(f) = self.next(Duration::from_millis(1)).await {
                    seen.push(f);
                    continue;
                }
            }
            let mut tmp = vec![0u8; 65536];
            match tokio::time::timeout(left, self.stream.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Err(_) => return None,
            }
        }
    }
}

/// A valid SETUP frame.
pub fn setup_frame(client_id: &str, lifetime: Duration) -> Frame {
    rf::Setup::builder(0, 0)
        .set_keepalive(Duration::from_secs(20))
        .set_lifetime(lifetime)
        .set_mime_metadata(sluice_protocol::METADATA_MIME_TYPE)
        .set_mime_data(sluice_protocol::DATA_MIME_TYPE)
        .set_data(
            sluice_protocol::encode(&sluice_protocol::SetupRequest::new(client_id))
                .expect("encode"),
        )
        .build()
}

/// The error text and code of an ERROR frame.
pub fn error_of(f: &Frame) -> Option<(u32, String)> {
    match f.get_body_ref() {
        rf::Body::Error(e) => Some((e.get_code(), e.get_data_utf8().unwrap_or("").to_string())),
        _ => None,
    }
}

/// The data of a PAYLOAD frame.
pub fn payload_of(f: &Frame) -> Option<Bytes> {
    match f.get_body_ref() {
        rf::Body::Payload(p) => p.get_data().cloned(),
        _ => None,
    }
}

impl TestBroker {
    /// Starts a broker on the given data directory (e.g. on a mounted test filesystem) with extra
    /// `serve` flags; its log still goes to a temporary directory of its own.
    pub fn start_on(data_dir: &std::path::Path, extra: &[&str]) -> TestBroker {
        let mut b = TestBroker {
            child: None,
            addr: String::new(),
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            data: Some(data_dir.to_owned()),
        };
        b.spawn();
        b
    }
}

/// The power-cut simulator filesystem (`shared/tools/powerloss`, FUSE) mounted on a temporary
/// directory: every write that was not fsynced is lost at [`PowerlossFs::crash`]. Needs root,
/// /dev/fuse, fuse3 and a Python with mfusepy: `.ci/powerloss-setup.sh` installs them and prints
/// `SLUICE_POWERLOSS_TOOL` / `POWERLOSS_PYTHON`. Unmounted on drop.
pub struct PowerlossFs {
    tool: PathBuf,
    python: Option<PathBuf>,
    dir: tempfile::TempDir,
    mnt: PathBuf,
    mounted: bool,
}

impl PowerlossFs {
    /// The `powerloss` CLI: `$SLUICE_POWERLOSS_TOOL`, else `../shared/tools/powerloss/powerloss`
    /// beside the repository.
    pub fn tool_path() -> PathBuf {
        std::env::var_os("SLUICE_POWERLOSS_TOOL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../shared/tools/powerloss/powerloss")
            })
    }

    /// Mounts a fresh filesystem with `--meta <meta>` (`eager` or `lazy`) and an fsync log.
    /// Panics, with what the tool said, if it cannot be mounted.
    pub fn mount(meta: &str) -> PowerlossFs {
        let tool = Self::tool_path();
        assert!(
            tool.is_file(),
            "powerloss tool not found at {} (set SLUICE_POWERLOSS_TOOL; run .ci/powerloss-setup.sh)",
            tool.display()
        );
        // The venv made by .ci/powerloss-setup.sh, unless POWERLOSS_PYTHON says otherwise.
        let python = match std::env::var_os("POWERLOSS_PYTHON") {
            Some(p) => Some(PathBuf::from(p)),
            None => Some(
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/powerloss-venv/bin/python"),
            )
            .filter(|p| p.exists()),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let mnt = mnt.canonicalize().expect("canonical mount point");
        let mut fs = PowerlossFs {
            tool,
            python,
            dir,
            mnt,
            mounted: false,
        };
        let back = fs.dir.path().join("back");
        let log = fs.fsync_log_path();
        let out = fs
            .command("mount")
            .arg(&back)
            .arg(&fs.mnt)
            .args(["--meta", meta, "--log"])
            .arg(&log)
            .output()
            .expect("run the powerloss tool");
        let is_mounted = Command::new("mountpoint")
            .arg("-q")
            .arg(&fs.mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        fs.mounted = is_mounted;
        if !is_mounted {
            fs.stop_daemon();
        }
        assert!(
            out.status.success() && is_mounted,
            "cannot mount the powerloss filesystem (needs root, /dev/fuse, fuse3 and mfusepy: run \
             .ci/powerloss-setup.sh)\ntool: {}\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            fs.tool.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(fs.dir.path().join("daemon.log")).unwrap_or_default()
        );
        fs
    }

    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.tool)
            .arg(cmd)
            .env("POWERLOSS_DAEMON_LOG", self.dir.path().join("daemon.log"))
            .stdin(Stdio::null());
        if let Some(py) = &self.python {
            c.env("POWERLOSS_PYTHON", py);
        }
        c
    }

    fn run(&self, cmd: &str) -> String {
        let out = self
            .command(cmd)
            .arg(&self.mnt)
            .output()
            .expect("run the powerloss tool");
        assert!(
            out.status.success(),
            "powerloss {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The mount point.
    pub fn mnt(&self) -> &std::path::Path {
        &self.mnt
    }

    /// The backing directory: what is durable (what a power cut would leave) under the mount.
    pub fn backing(&self) -> PathBuf {
        self.dir.path().join("back")
    }

    /// Where every FSYNC / FDATASYNC / FSYNCDIR / FLUSH(close) / CRASH is logged.
    pub fn fsync_log_path(&self) -> PathBuf {
        self.dir.path().join("fsync.log")
    }

    /// The fsync log so far.
    pub fn fsync_log(&self) -> String {
        std::fs::read_to_string(self.fsync_log_path()).unwrap_or_default()
    }

    /// A power cut: every write not fsynced is dropped (and, with `--meta lazy`, every namespace
    /// change whose directory was not fsynced is undone). Kill the writers first.
    pub fn crash(&self) {
        self.run("crash");
    }

    /// The tool's counters (`write`, `fsync`, `fdatasync`, `fsyncdir`, `pending_bytes`, ...).
    pub fn stats(&self) -> std::collections::BTreeMap<String, String> {
        self.run("stats")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().to_string()))
            })
            .collect()
    }

    /// Clean unmount (makes everything durable, like umount(8)).
    pub fn umount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let ok = self
            .command("umount")
            .arg(&self.mnt)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            // Busy or dead: detach it, and stop the daemon this mount started.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            self.stop_daemon();
        }
    }

    /// Kills the FUSE daemon started for this mount (its pid is in the tool's pid file).
    fn stop_daemon(&self) {
        let pidf = format!(
            "/tmp/powerloss.{}.pid",
            self.mnt.to_string_lossy().replace('/', "_")
        );
        if let Some(pid) = std::fs::read_to_string(&pidf)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(pidf);
    }
}

impl Drop for PowerlossFs {
    fn drop(&mut self) {
        self.umount();
    }
}

// Raw-protocol helpers for tests that drive subscriptions and acks frame by frame (stream 1 is
// the subscription; requests use odd ids from 3).

/// How long a raw helper waits for a frame.
pub const RAW_T: Duration = Duration::from_secs(20);
/// Keepalive lifetime of raw helper connections.
pub const RAW_LIFETIME: Duration = Duration::from_secs(120);

/// The next frame (boxed: `RawClient::next` keeps a 64 KiB buffer in its future).
pub async fn raw_next(c: &mut RawClient, t: Duration) -> Option<Frame> {
    Box::pin(c.next(t)).await
}

/// Publishes `n` messages ("m1", "m2", ...) on `topic` in one request on stream `sid` and
/// waits for the reply, which must cover all `n`.
pub async fn raw_publish(c: &mut RawClient, sid: u32, topic: &str, n: usize) -> PublishReply {
    let req = PublishRequest {
        topic: topic.into(),
        messages: (1..=n)
            .map(|i| NewMessage {
                payload: Bytes::from(format!("m{i}")),
                ..Default::default()
            })
            .collect(),
    };
    c.request(
        sid,
        "publish",
        sluice_protocol::encode(&req).expect("encode"),
    )
    .await;
    let f = raw_next(c, RAW_T).await.expect("publish reply");
    assert_eq!(f.get_stream_id(), sid, "{f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("publish failed: {:?}", error_of(&f)));
    let r: PublishReply = sluice_protocol::decode(&data).expect("decode PublishReply");
    assert_eq!(r.last_seq - r.first_seq + 1, n as u64, "{r:?}");
    r
}

/// A `subscribe` request-stream on stream `sid` asking for `n` batches (shared mode).
pub fn subscribe_frame(
    sid: u32,
    n: u32,
    topic: &str,
    group: &str,
    window: u32,
    batch: u32,
) -> Frame {
    let req = SubscribeRequest {
        topic: topic.into(),
        group: group.into(),
        mode: GroupMode::Shared,
        filters: Default::default(),
        window: Some(window),
        batch_size: Some(batch),
        backoff: None,
    };
    rf::RequestStream::builder(sid, 0)
        .set_initial_request_n(n)
        .set_metadata(route_metadata("subscribe"))
        .set_data(sluice_protocol::encode(&req).expect("encode"))
        .build()
}

/// A new connection subscribed to `topic` / `group` on stream 1 (1,000 credits).
pub async fn raw_subscribe(
    addr: &str,
    topic: &str,
    group: &str,
    window: u32,
    batch: u32,
) -> RawClient {
    let mut c = RawClient::setup(addr, RAW_LIFETIME).await;
    c.send(&subscribe_frame(1, 1000, topic, group, window, batch))
        .await;
    c
}

/// The next batch on the subscription (stream 1), skipping nothing.
pub async fn raw_next_batch(c: &mut RawClient) -> Batch {
    let f = raw_next(c, RAW_T).await.expect("a batch in time");
    assert_eq!(f.get_stream_id(), 1, "unexpected frame {f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("subscribe failed: {:?}", error_of(&f)));
    match sluice_protocol::decode::<StreamEvent>(&data).expect("decode StreamEvent") {
        StreamEvent::Batch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// The data of an `ack` of `batch_id` (`seqs` None: the whole batch).
pub fn ack_request(topic: &str, group: &str, batch_id: u64, seqs: Option<Vec<u64>>) -> Bytes {
    let req = AckRequest {
        topic: topic.into(),
        group: group.into(),
        batch_id,
        seqs,
    };
    sluice_protocol::encode(&req).expect("encode")
}

/// Acks on stream `sid` (group `g`) and waits for the reply.
pub async fn raw_ack(
    c: &mut RawClient,
    sid: u32,
    topic: &str,
    batch_id: u64,
    seqs: Option<Vec<u64>>,
) -> AckReply {
    c.request(sid, "ack", ack_request(topic, "g", batch_id, seqs))
        .await;
    raw_reply(c, sid).await
}

/// The reply on stream `sid`, skipping batches that arrive meanwhile on the subscription.
pub async fn raw_reply(c: &mut RawClient, sid: u32) -> AckReply {
    let f = loop {
        let f = raw_next(c, RAW_T).await.expect("ack reply");
        if f.get_stream_id() != 1 {
            break f;
        }
    };
    assert_eq!(f.get_stream_id(), sid, "{f:?}");
    let data = payload_of(&f).unwrap_or_else(|| panic!("ack failed: {:?}", error_of(&f)));
    sluice_protocol::decode(&data).expect("decode AckReply")
}

/// The seqs of a batch, in order.
pub fn batch_seqs(b: &Batch) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

/// Publishes 4 messages on `topic`, delivers them in one batch to a subscription of group `g`,
/// stalls the broker's disk syncs for `stall` (`admin.fault` kind `stall-syncs`: the broker
/// needs `--enable-fault-injection`), then sends the ack of the whole batch twice, on streams 3
/// and 5, without waiting. Returns the subscription's connection, where both replies come.
pub async fn ack_twice_under_a_stalled_disk(addr: &str, topic: &str, stall: Duration) -> RawClient {
    let mut p = RawClient::setup(addr, RAW_LIFETIME).await;
    raw_publish(&mut p, 1, topic, 4).await;
    let mut a = raw_subscribe(addr, topic, "g", 1, 4).await;
    let batch = raw_next_batch(&mut a).await;
    assert_eq!(batch_seqs(&batch), vec![1, 2, 3, 4]);
    let admin = sluice_sdk::Admin::connect(client_config(addr, "admin"))
        .await
        .expect("admin");
    admin.stall_syncs(stall).await.expect("stall the syncs");
    let all = Some(batch_seqs(&batch));
    for sid in [3, 5] {
        a.request(
            sid,
            "ack",
            ack_request(topic, "g", batch.batch_id, all.clone()),
        )
        .await;
    }
    a
}
