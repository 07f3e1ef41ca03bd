//! Limits on the way out, and liveness (issue 10): a batch frame that would not fit the RSocket
//! length prefix is never written (the stream stays valid); a client that does not read is
//! disconnected and its batches go to the group's other consumers, with the broker's memory
//! bounded; the broker keeps quiet clients alive with its own KEEPALIVE pings, yet still drops
//! one that does not answer; the longest names dead-letter into topics that can be consumed.
mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use rsocket_rust::frame::{self as rf, Body, Frame};
use sluice::session::frame::{encode_frame, FrameCodec, Inbound, MAX_FRAME_LEN};
use sluice_protocol::{NewMessage, PublishReply, PublishRequest, StreamEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Decoder;

const T: Duration = Duration::from_secs(20);
const LIFETIME: Duration = Duration::from_secs(60);

/// A raw RSocket connection that checks every frame it reads with the broker's own validator
/// (any length up to the RSocket maximum), so a corrupt stream is an error, not a timeout.
struct Wire {
    stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl Wire {
    async fn connect(addr: &str, recv_buffer: Option<u32>) -> Wire {
        let sa: std::net::SocketAddr = addr.parse().expect("addr");
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let stream = socket.connect(sa).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut w = Wire {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::new(MAX_FRAME_LEN),
        };
        w.send(&setup_frame("limits-test", LIFETIME)).await;
        w
    }

    async fn send(&mut self, f: &Frame) {
        let mut b = BytesMut::new();
        encode_frame(f, &mut b);
        self.stream.write_all(&b).await.expect("write");
    }

    /// The next frame; `Ok(None)` on timeout; `Err` on a frame that does not parse or EOF.
    async fn next(&mut self, timeout: Duration) -> Result<Option<Frame>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(Inbound::Frame(f))) => return Ok(Some(f)),
                Ok(Some(Inbound::Ignored)) => continue,
                Ok(None) => {}
                Err(e) => return Err(format!("corrupt stream: {e}")),
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            self.buf.reserve(1 << 20);
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err("connection closed".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
            }
        }
    }

    /// Publishes `messages` on stream `sid` and returns the reply, skipping broker KEEPALIVEs
    /// and checking every frame seen on the way.
    async fn publish(&mut self, sid: u32, topic: &str, messages: Vec<NewMessage>) -> PublishReply {
        let data = sluice_protocol::encode(&PublishRequest {
            topic: topic.into(),
            messages,
        })
        .expect("encode");
        self.send(
            &rf::RequestResponse::builder(sid, 0)
                .set_metadata(route_metadata("publish"))
                .set_data(data)
                .build(),
        )
        .await;
        loop {
            let f = self
                .next(T)
                .await
                .unwrap_or_else(|e| panic!("publish on {sid}: {e}"))
                .unwrap_or_else(|| panic!("no reply to publish on {sid}"));
            if f.get_stream_id() != sid {
                continue; // e.g. a batch of a subscription on this connection
            }
            let data = payload_of(&f).unwrap_or_else(|| panic!("publish: {:?}", error_of(&f)));
            return sluice_protocol::decode(&data).expect("PublishReply");
        }
    }
}

/// Item 2: 8 messages of 1 byte with 48 headers of 64,000 bytes each make a batch of ~25 MB
/// (the batch byte cap counted payloads only). The broker must never write a frame whose length
/// does not fit the 3-byte prefix: every frame the consumer reads parses, its batches are whole,
/// and a request on the same connection afterwards gets its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_big_for_one_frame_never_corrupts_the_stream() {
    let b = TestBroker::start_with(&["--batch-timeout", "60s", "--fsync", "never"]);
    let mut c = Wire::connect(&b.addr(), None).await;
    let headers: BTreeMap<String, String> = (0..48)
        .map(|i| (format!("h{i:02}"), "v".repeat(64_000)))
        .collect();
    for i in 0..8u32 {
        let msg = NewMessage {
            headers: headers.clone(),
            payload: Bytes::from(vec![b'x']),
            ..Default::default()
        };
        let r = c.publish(1 + 2 * i, "wide", vec![msg]).await;
        assert_eq!(r.first_seq, u64::from(i) + 1);
    }

    // Window 8: every message can be in flight at once (nothing is acked).
    c.send(&subscribe_frame(101, rf::REQUEST_MAX, "wide", "g", 8, 16))
        .await;
    let mut seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(20);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if seen.len() == 8 {
            break;
        }
        let Some(f) = c.next(left).await.unwrap_or_else(|e| panic!("{e}")) else {
            break;
        };
        if f.get_stream_id() != 101 {
            continue;
        }
        let data = payload_of(&f).unwrap_or_else(|| panic!("subscribe: {:?}", error_of(&f)));
        match sluice_protocol::decode::<StreamEvent>(&data) {
            Ok(StreamEvent::Batch(batch)) => {
                for m in batch.messages {
                    assert_eq!(m.headers, headers, "seq {} altered", m.seq);
                    seen.insert(m.seq);
                }
            }
            Ok(StreamEvent::Status(_) | StreamEvent::Reset(_)) => {}
            Err(e) => panic!("a batch frame that is not a whole batch: {e}"),
        }
    }
    // The connection is still in step: a request gets its own reply.
    let r = c.publish(201, "after", vec![NewMessage::default()]).await;
    assert_eq!((r.topic.as_str(), r.first_seq), ("after", 1));
    // The orchestrator sizes batches by every byte, so each fits a frame: all 8 arrive, and the
    // writer's last guard (a frame that does not fit is dropped, never written) never fires.
    assert_eq!(seen, (1..=8).collect::<BTreeSet<u64>>());
    assert!(!b
        .log()
        .contains("batch not sent: its frame does not fit the RSocket frame limit"));
}

/// Item 10: a consumer that subscribes with a big window and never reads. What it holds is
/// bounded in bytes (its batches in flight, half of `max_queued_bytes`; its writer queue,
/// `max_queued_bytes`); once nothing could be written to it for its lifetime it is
/// disconnected, and its batches go to the other consumer of the group, which receives every
/// message; the broker's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_disconnected_and_its_batches_go_to_another_consumer() {
    const N: u64 = 150;
    const SIZE: usize = 1_000_000;
    let b = TestBroker::start_with(&[
        "--batch-timeout",
        "10m",
        "--fsync",
        "never",
        "--lifetime",
        "4s",
        "--keepalive",
        "1s",
    ]);
    let rss_start = b.rss_kb();
    let mut hog = Wire::connect(&b.addr(), Some(64 * 1024)).await;
    hog.send(&subscribe_frame(
        1,
        rf::REQUEST_MAX,
        "firehose",
        "g",
        1024,
        4096,
    ))
    .await;
    // From here on the hog never reads, but it is alive: it sends a KEEPALIVE every 500 ms.
    let (_hog_reads_nothing, mut hog_w) = hog.stream.into_split();
    let hog_alive = tokio::spawn(async move {
        let mut ka = BytesMut::new();
        encode_frame(&rf::Keepalive::builder(0, 0).build(), &mut ka);
        while hog_w.write_all(&ka).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let mut producer = Wire::connect(&b.addr(), None).await;
    let mut sid = 1;
    let mut i = 0;
    let mut rss_max = 0;
    while i < N {
        let msgs: Vec<NewMessage> = (i..(i + 3).min(N))
            .map(|k| NewMessage {
                payload: big_payload(k, SIZE),
                ..Default::default()
            })
            .collect();
        let n = msgs.len() as u64;
        let r = producer.publish(sid, "firehose", msgs).await;
        assert_eq!(r.first_seq, i + 1);
        sid += 2;
        i += n;
        rss_max = rss_max.max(b.rss_kb());
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            b.log().contains("client does not read")
        })
        .await,
        "the client that does not read is still connected; log:\n{}",
        b.log()
    );
    rss_max = rss_max.max(b.rss_kb());
    eprintln!(
        "broker RSS after publishing: {} MiB now, {} MiB max",
        b.rss_kb() / 1024,
        rss_max / 1024
    );

    let mut c = sluice_sdk::Consumer::subscribe(sluice_sdk::ConsumerConfig::new(
        client_config(&b.addr(), "reader"),
        "firehose",
        "g",
    ))
    .await
    .expect("subscribe");
    let mut got = BTreeSet::new();
    let mut redelivered = 0;
    while got.len() < N as usize {
        let m = next_message(&mut c, T).await;
        check_big_payload(m.payload(), m.seq());
        if m.attempt() > 1 {
            redelivered += 1;
        }
        got.insert(m.seq());
        c.ack(&m).expect("ack");
        rss_max = rss_max.max(b.rss_kb());
    }
    c.flush_acks().await.expect("acks");
    assert_eq!(got, (1..=N).collect::<BTreeSet<u64>>());
    assert!(
        redelivered > 0,
        "nothing came back from the client that does not read"
    );
    // Measured: +105 MiB now (the client that does not read holds at most 32 MiB in flight;
    // the rest is the 150 MB published passing through, and the allocator keeping what it
    // freed), +170 MiB with only the queue bound, +300 MiB with neither.
    let grew_mib = rss_max.saturating_sub(rss_start) / 1024;
    eprintln!(
        "broker RSS: {} MiB at start, {} MiB max (+{grew_mib} MiB)",
        rss_start / 1024,
        rss_max / 1024
    );
    assert!(grew_mib < 240, "broker RSS grew by {grew_mib} MiB");
    hog_alive.abort();
}

/// The keepalive finding: with `--lifetime 3s --keepalive 1s` an SDK consumer (which sends its
/// own KEEPALIVE only every 20 s) stays connected while idle, because the broker pings it and
/// rsocket_rust's client answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sdk_consumer_stays_connected_past_a_short_lifetime() {
    let b = TestBroker::start_with(&["--lifetime", "3s", "--keepalive", "1s"]);
    let mut c = sluice_sdk::Consumer::subscribe(sluice_sdk::ConsumerConfig::new(
        client_config(&b.addr(), "idle-consumer"),
        "quiet",
        "g",
    ))
    .await
    .expect("subscribe");
    let admin = sluice_sdk::Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin");
    let started = Instant::now();
    let mut conn_ids = BTreeSet::new();
    let mut longest = 0;
    while started.elapsed() < Duration::from_secs(11) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            c.is_connected(),
            "consumer disconnected after {:?}",
            started.elapsed()
        );
        let stats = admin.stats().await.expect("stats");
        for conn in stats
            .connections
            .iter()
            .filter(|x| x.client_id == "idle-consumer")
        {
            conn_ids.insert(conn.conn_id);
            longest = longest.max(conn.connected_ms);
        }
    }
    assert_eq!(conn_ids.len(), 1, "the consumer reconnected: {conn_ids:?}");
    assert!(longest >= 10_000, "connected for {longest} ms");
    // The consumer's connection never timed out (another, short-lived connection of the test
    // harness may: only the consumer's counts here).
    let log = b.log();
    let consumer_conn = conn_ids.iter().next().copied().unwrap_or_default();
    let timed_out = log
        .lines()
        .any(|l| l.contains("3003") && l.contains(&format!("conn_id={consumer_conn} ")));
    assert!(
        !timed_out,
        "the consumer's connection timed out; log:\n{log}"
    );
    // Still served.
    let p = sluice_sdk::Producer::connect(client_config(&b.addr(), "producer"))
        .await
        .expect("producer");
    let seq = p
        .publish("quiet".to_string(), sluice_sdk::NewMessage::default())
        .await
        .expect("publish");
    assert_eq!(next_message(&mut c, T).await.seq(), seq);
}

/// The broker's pings do not keep alive a client that does not answer them: it is still
/// dropped within its lifetime, with `3003 TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_answer_pings_is_dropped_within_its_lifetime() {
    let b = TestBroker::start_with(&["--lifetime", "3s", "--keepalive", "1s"]);
    let mut c = Wire::connect(&b.addr(), None).await;
    let since = Instant::now();
    let mut pings = 0;
    let err = loop {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "not dropped within 10 s"
        );
        match c.next(Duration::from_secs(10)).await {
            Ok(Some(f)) => match f.get_body_ref() {
                Body::Keepalive(_) => {
                    assert_eq!(f.get_stream_id(), 0);
                    assert_ne!(
                        f.get_flag() & Frame::FLAG_RESPOND,
                        0,
                        "a ping asks for an answer"
                    );
                    pings += 1;
                }
                _ => break error_of(&f).unwrap_or_else(|| panic!("unexpected {f:?}")),
            },
            Ok(None) => panic!("not dropped within 10 s"),
            Err(e) => panic!("closed without an error frame: {e}"),
        }
    };
    let after = since.elapsed();
    assert_eq!(err.0, 0x101, "{err:?}");
    assert!(err.1.starts_with("3003 TIMEOUT"), "{err:?}");
    assert!(
        after >= Duration::from_millis(2900) && after < Duration::from_secs(5),
        "dropped after {after:?} (lifetime 3 s)"
    );
    // Pinged after 1 s of silence, then every second: at 1, 2 and 3 s.
    assert!((2..=4).contains(&pings), "{pings} pings");
    assert!(c.next(Duration::from_secs(2)).await.is_err(), "still open");
}

/// Item 7: the longest names (120-byte topic, 120-byte group) dead-letter into a topic that can
/// be subscribed, with a 120-byte group too, and so on down the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_names_dead_letter_into_a_topic_that_can_be_consumed() {
    use sluice_protocol::subscribe::{dlq_topic, MAX_NAME_LEN};
    let b = TestBroker::start_with(&["--max-retries", "0"]);
    let topic = "t".repeat(MAX_NAME_LEN);
    let group = "g".repeat(MAX_NAME_LEN);
    let mut c = Wire::connect(&b.addr(), None).await;
    c.publish(
        1,
        &topic,
        vec![NewMessage {
            payload: Bytes::from_static(b"poison"),
            ..Default::default()
        }],
    )
    .await;
    // Consume and nack (max_retries 0: the first failure dead-letters) down a chain of three.
    let mut sid = 3;
    let mut current = topic.clone();
    for depth in 0..3 {
        c.send(&subscribe_frame(
            sid,
            rf::REQUEST_MAX,
            &current,
            &group,
            4,
            16,
        ))
        .await;
        let batch = loop {
            let f = c
                .next(T)
                .await
                .unwrap_or_else(|e| panic!("depth {depth}: {e}"))
                .unwrap_or_else(|| panic!("depth {depth}: nothing delivered from {current}"));
            if f.get_stream_id() != sid {
                continue;
            }
            let data = payload_of(&f)
                .unwrap_or_else(|| panic!("depth {depth}: subscribe refused: {:?}", error_of(&f)));
            if let StreamEvent::Batch(batch) = sluice_protocol::decode(&data).expect("event") {
                break batch;
            }
        };
        assert_eq!(batch.messages.len(), 1);
        assert_eq!(batch.messages[0].payload, Bytes::from_static(b"poison"));
        if depth > 0 {
            assert_eq!(batch.messages[0].headers["x-dlq-group"], group);
        }
        let nack = sluice_protocol::NackRequest {
            topic: current.clone(),
            group: group.clone(),
            batch_id: batch.batch_id,
            seqs: None,
            release: false,
            delay_ms: None,
        };
        c.send(
            &rf::RequestResponse::builder(sid + 2, 0)
                .set_metadata(route_metadata("nack"))
                .set_data(sluice_protocol::encode(&nack).expect("encode"))
                .build(),
        )
        .await;
        current = dlq_topic(&current, &group);
        assert!(current.len() <= MAX_NAME_LEN);
        sid += 4;
    }
}
