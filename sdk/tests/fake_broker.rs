//! The SDK against a scripted fake broker (tests/common): the real rsocket_rust client, real
//! TCP, real frames. What the broker itself does is tested in the root crate's tests.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::FakeBroker;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sluice_sdk::protocol::route;
use sluice_sdk::{
    Admin, BrokerEvent, ClientConfig, Consumer, ConsumerConfig, ErrorCode, NewMessage, Producer,
    ProducerOptions, ResetNotice, SdkError, WireError,
};

fn config(broker: &FakeBroker) -> ClientConfig {
    ClientConfig::new(broker.addr())
        .client_id("sdk-test")
        .request_timeout(Duration::from_secs(2))
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_carries_identity_mime_types_and_keepalive() {
    let broker = FakeBroker::start().await;
    let admin =
        Admin::connect(config(&broker).keepalive(Duration::from_secs(3), Duration::from_secs(9)))
            .await
            .expect("connect");
    let stats = within("stats", admin.stats()).await.expect("stats");
    assert_eq!(stats.version, "fake");
    let fault = within("fault", admin.fault("orchestrator"))
        .await
        .expect("fault");
    assert_eq!(fault.stopped, "orchestrator");

    let rec = broker.recorded();
    let (setup, mime_m, mime_d, keepalive, lifetime) = rec.setups[0].clone();
    assert_eq!(setup.client_id, "sdk-test");
    assert_eq!(setup.version, sluice_sdk::protocol::PROTOCOL_VERSION);
    assert_eq!(mime_m, sluice_sdk::protocol::METADATA_MIME_TYPE);
    assert_eq!(mime_d, sluice_sdk::protocol::DATA_MIME_TYPE);
    assert_eq!(keepalive, Duration::from_secs(3));
    assert_eq!(lifetime, Duration::from_secs(9));
    assert_eq!(rec.routes_without_metadata, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_batched_and_get_their_own_seqs() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    let mut pending: FuturesUnordered<_> = (0..1000u32)
        .map(|i| {
            let producer = producer.clone();
            async move {
                let seq = producer
                    .send("orders", format!("m{i}").into_bytes())
                    .await
                    .expect("publish");
                (i, seq)
            }
        })
        .collect();
    let mut seqs = BTreeSet::new();
    let stored = {
        let mut got = Vec::new();
        while let Some((i, seq)) = within("publishes", pending.next()).await {
            assert!(seqs.insert(seq), "seq {seq} given twice");
            got.push((i, seq));
        }
        got
    };
    assert_eq!(seqs, (1..=1000).collect());
    // Each caller got the seq its own message was stored at.
    let log = broker.stored("orders");
    for (i, seq) in stored {
        let payload = &log[(seq - 1) as usize].1;
        assert_eq!(payload.as_ref(), format!("m{i}").as_bytes());
    }
    let requests = broker.recorded().publish_requests;
    assert!(requests < 100, "1000 publishes took {requests} requests");

    let reply = producer
        .publish_batch("orders", vec![NewMessage::default(), NewMessage::default()])
        .await
        .expect("batch");
    assert_eq!((reply.first_seq, reply.last_seq), (1001, 1002));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_stored_in_call_order() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for round in 0..3 {
        let topic = format!("ordered-{round}");
        // Queued at call time, in call order, even though awaited out of order.
        let mut pending: FuturesUnordered<_> = (0..2000u64)
            .map(|i| {
                let publish = producer.send(topic.clone(), i.to_string());
                async move { (i, publish.await) }
            })
            .collect();
        while let Some((i, seq)) = within("publishes", pending.next()).await {
            assert_eq!(seq.expect("publish"), i + 1, "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_fail_alone() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    let bad = producer.publish(
        "orders",
        NewMessage {
            priority: 200,
            ..Default::default()
        },
    );
    let good = producer.send("orders", "ok");
    let (bad, good) = tokio::join!(bad, good);
    assert!(matches!(bad, Err(SdkError::InvalidArgument(_))));
    assert_eq!(good.expect("good"), 1);
    assert!(matches!(
        producer.send("no/slashes", "x").await,
        Err(SdkError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_map_to_codes() {
    let broker = FakeBroker::start().await;
    broker.script().fail_routes.insert(
        route::PUBLISH.into(),
        WireError::new(ErrorCode::StorageError, "disk full"),
    );
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    let err = producer.send("t", "x").await.expect_err("must fail");
    assert_eq!(err.code(), Some(ErrorCode::StorageError), "{err}");
    assert!(err.is_retryable());
    match err {
        SdkError::Broker(w) => assert_eq!(w.message, "disk full"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_broker_times_out_and_producer_reconnects() {
    let broker = FakeBroker::start().await;
    broker.script().silent_routes.insert(route::PUBLISH.into());
    let cfg = config(&broker).request_timeout(Duration::from_millis(300));
    // Not resent: this test is about the timeout itself.
    let options = ProducerOptions {
        resend_for: Duration::ZERO,
        ..Default::default()
    };
    let producer = Producer::connect_with(cfg, options).await.expect("connect");
    let started = Instant::now();
    let err = within("timeout", producer.send("t", "x"))
        .await
        .expect_err("must time out");
    assert!(matches!(err, SdkError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The timed-out connection was closed; the next publish opens a new one.
    broker.script().silent_routes.clear();
    let seq = within("publish after reconnect", producer.send("t", "y"))
        .await
        .expect("publish");
    assert_eq!(seq, 1);
    assert_eq!(broker.recorded().setups.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_setup_surfaces_as_broker_error() {
    let broker = FakeBroker::start().await;
    broker.script().reject_setup = Some(WireError::new(
        ErrorCode::UnsupportedVersion,
        "this broker speaks 2..=2",
    ));
    let admin = Admin::connect(config(&broker)).await.expect("tcp connect");
    let err = within("stats", admin.stats()).await.expect_err("must fail");
    assert_eq!(err.code(), Some(ErrorCode::UnsupportedVersion), "{err:?}");
    assert!(admin.client().is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let err = Admin::connect(ClientConfig::new(addr))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, SdkError::Connect { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_ack_per_batch_and_flush() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..10 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let mut consumer =
        Consumer::subscribe(ConsumerConfig::new(config(&broker), "t", "g").batch_size(4))
            .await
            .expect("subscribe");
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let r = within("next", consumer.next())
            .await
            .expect("open")
            .expect("message");
        assert_eq!(r.payload().as_ref(), format!("m{}", r.seq() - 1).as_bytes());
        assert_eq!(r.attempt(), 1);
        seen.push(r.seq());
        consumer.ack(&r).expect("ack");
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    within("flush", consumer.flush_acks()).await.expect("flush");
    assert_eq!(broker.acked("t", "g"), (1..=10).collect());
    let rec = broker.recorded();
    // batches of 4, 4, 2: one ack request per batch, each with its seqs
    assert_eq!(rec.acks.len(), 3, "{:?}", rec.acks);
    assert!(rec.acks.iter().all(|a| a.seqs.is_some()));
    assert_eq!(rec.subscribes[0].batch_size, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_is_acked_by_flush_and_nacks_are_sent() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..4 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let mut consumer =
        Consumer::subscribe(ConsumerConfig::new(config(&broker), "t", "g").batch_size(4))
            .await
            .expect("subscribe");
    let first = within("next", consumer.next())
        .await
        .expect("open")
        .expect("msg");
    let second = within("next", consumer.next())
        .await
        .expect("open")
        .expect("msg");
    consumer.ack(&first).expect("ack");
    consumer.nack(&second).expect("nack");
    within("flush", consumer.flush_acks()).await.expect("flush");
    assert_eq!(broker.acked("t", "g"), BTreeSet::from([first.seq()]));
    let nacks = broker.recorded().nacks.clone();
    assert_eq!(nacks.len(), 1);
    assert_eq!(nacks[0].seqs, Some(vec![second.seq()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reconnects_and_gets_unacked_messages_again() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..6 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let cfg = ConsumerConfig::new(config(&broker), "t", "g")
        .batch_size(2)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let mut consumer = Consumer::subscribe(cfg).await.expect("subscribe");

    // Ack the first batch completely, then only half of the second.
    for _ in 0..3 {
        let r = within("next", consumer.next())
            .await
            .expect("open")
            .expect("msg");
        consumer.ack(&r).expect("ack");
    }
    within("flush", consumer.flush_acks()).await.expect("flush");
    assert_eq!(broker.acked("t", "g"), BTreeSet::from([1, 2, 3]));

    broker.kill_connections();
    // Wait for the resubscription, so that what is still buffered from the first one is
    // dropped (the broker redelivers it) rather than handed out.
    within("resubscribe", async {
        while broker.recorded().subscribes.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Everything not acked (4, 5, 6) comes back, 4 as a redelivery.
    let mut again = Vec::new();
    while again.len() < 3 {
        let r = within("next after reconnect", consumer.next())
            .await
            .expect("open")
            .expect("msg");
        if again.contains(&r.seq()) {
            continue;
        }
        if r.seq() == 4 {
            assert!(r.attempt() >= 2, "seq 4 should be a redelivery");
        }
        again.push(r.seq());
        consumer.ack(&r).expect("ack");
    }
    again.sort_unstable();
    assert_eq!(again, vec![4, 5, 6]);
    within("flush", consumer.flush_acks()).await.expect("flush");
    assert_eq!(broker.acked("t", "g"), (1..=6).collect());
    assert!(broker.recorded().subscribes.len() >= 2);
    assert!(consumer.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_subscribe_error_stops_the_consumer() {
    let broker = FakeBroker::start().await;
    broker.script().fail_routes.insert(
        route::SUBSCRIBE.into(),
        WireError::new(ErrorCode::ModeConflict, "group g is exclusive"),
    );
    let mut consumer = Consumer::subscribe(ConsumerConfig::new(config(&broker), "t", "g"))
        .await
        .expect("subscribe");
    let err = within("next", consumer.next())
        .await
        .expect("an item")
        .expect_err("must fail");
    assert_eq!(err.code(), Some(ErrorCode::ModeConflict), "{err:?}");
    assert!(within("end", consumer.next()).await.is_none());
    // No retry loop: one subscribe only (the consumer has ended, so no other one follows).
    assert_eq!(broker.recorded().subscribes.len(), 1);
    assert_eq!(broker.recorded().setups.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_reconnect_attempts() {
    let broker = FakeBroker::start().await;
    let cfg = ConsumerConfig::new(config(&broker), "t", "g")
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(20))
        .max_reconnect_attempts(2);
    let mut consumer = Consumer::subscribe(cfg).await.expect("subscribe");
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(broker);
    let err = within("next", consumer.next())
        .await
        .expect("an item")
        .expect_err("must fail");
    assert!(err.is_connection_error(), "{err:?}");
}

async fn wait_open_connections(broker: &FakeBroker, n: usize) {
    within("connections to close", async {
        while broker.recorded().open_connections != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_closing_a_client_closes_its_connection() {
    // rsocket_rust's client never closes its socket by itself; the SDK must.
    let broker = FakeBroker::start().await;
    let admin = Admin::connect(config(&broker)).await.expect("connect");
    within("stats", admin.stats()).await.expect("stats");
    wait_open_connections(&broker, 1).await;
    drop(admin);
    wait_open_connections(&broker, 0).await;

    let admin = Admin::connect(config(&broker)).await.expect("connect");
    within("stats", admin.stats()).await.expect("stats");
    admin.client().close();
    wait_open_connections(&broker, 0).await;
    assert!(admin.client().is_closed());
    assert!(matches!(admin.stats().await, Err(SdkError::Closed(_))));

    let producer = Producer::connect(config(&broker)).await.expect("connect");
    producer.send("t", "x").await.expect("publish");
    let mut consumer = Consumer::subscribe(ConsumerConfig::new(config(&broker), "t", "g"))
        .await
        .expect("subscribe");
    let r = within("next", consumer.next())
        .await
        .expect("open")
        .expect("msg");
    consumer.ack(&r).expect("ack");
    wait_open_connections(&broker, 2).await;
    within("close", consumer.close()).await.expect("close");
    drop(producer);
    wait_open_connections(&broker, 0).await;
    assert_eq!(broker.acked("t", "g"), BTreeSet::from([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batches_asks_for_that_many_items_then_ends() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..10 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let cfg = ConsumerConfig::new(config(&broker), "t", "g")
        .batch_size(3)
        .max_batches(4);
    let mut consumer = Consumer::subscribe(cfg).await.expect("subscribe");
    // The fake follows each batch with an unknown event, which uses a credit too: 4 credits
    // are batch, event, batch, event.
    let mut seen = Vec::new();
    while let Some(r) = within("next", consumer.next()).await {
        let r = r.expect("message");
        seen.push(r.seq());
        consumer.ack(&r).expect("ack");
    }
    assert_eq!(seen, (1..=6).collect::<Vec<_>>());
    // The connection stays open for the acks of what arrived.
    within("flush", consumer.flush_acks()).await.expect("flush");
    assert_eq!(broker.acked("t", "g"), (1..=6).collect());
    let rec = broker.recorded();
    assert_eq!(rec.subscribe_credits, vec![4]);
    assert_eq!(rec.subscribes.len(), 1, "no resubscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_messages_go_back_in_a_release_nack() {
    let broker = FakeBroker::start().await;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..4 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let mut consumer =
        Consumer::subscribe(ConsumerConfig::new(config(&broker), "t", "g").batch_size(4))
            .await
            .expect("subscribe");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            within("next", consumer.next())
                .await
                .expect("open")
                .expect("msg"),
        );
    }
    consumer.ack(&got[0]).expect("ack");
    consumer.nack(&got[1]).expect("nack");
    consumer.release(&got[3]).expect("release");
    consumer.release(&got[2]).expect("release");
    within("flush", consumer.flush_acks()).await.expect("flush");
    // Two requests, sent concurrently: the plain nack and the release.
    let mut nacks: Vec<(bool, Option<Vec<u64>>)> = broker
        .recorded()
        .nacks
        .iter()
        .map(|n| (n.release, n.seqs.clone()))
        .collect();
    nacks.sort();
    assert_eq!(
        nacks,
        vec![(false, Some(vec![2])), (true, Some(vec![4, 3]))]
    );
    assert_eq!(broker.acked("t", "g"), BTreeSet::from([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_publishes_are_resent_with_their_ids_and_stored_once() {
    let broker = FakeBroker::start().await;
    // The first two publish requests are stored, then their connection drops before the reply.
    broker.script().lose_publish_replies = 2;
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    let prefix = producer.id_prefix().expect("ids by default").to_string();
    let mut pending: FuturesUnordered<_> = (0..500u32)
        .map(|i| {
            let publish = producer.send("orders", format!("m{i}"));
            async move { (i, publish.await) }
        })
        .collect();
    let mut answers = Vec::new();
    while let Some((i, seq)) = within("publishes", pending.next()).await {
        answers.push((i, seq.expect("stored despite the lost replies")));
    }
    let log = broker.stored("orders");
    assert_eq!(log.len(), 500, "every message stored exactly once");
    for (i, seq) in answers {
        assert_eq!(
            log[(seq - 1) as usize].1.as_ref(),
            format!("m{i}").as_bytes()
        );
    }
    let rec = broker.recorded();
    assert!(rec.duplicates > 0, "the resent requests repeated ids");
    assert!(rec.setups.len() >= 3, "reconnected after each lost reply");
    drop(rec);
    // The ids were this producer's, given in call order.
    let data_ids = broker.ids("orders");
    assert_eq!(data_ids.len(), 500);
    assert!(
        data_ids.contains(&format!("{prefix}-1")) && data_ids.contains(&format!("{prefix}-500"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ids_an_unconfirmed_publish_fails_instead_of_being_resent() {
    let broker = FakeBroker::start().await;
    broker.script().lose_publish_replies = 1;
    let options = ProducerOptions {
        idempotent: false,
        ..Default::default()
    };
    let producer = Producer::connect_with(config(&broker), options)
        .await
        .expect("connect");
    assert!(producer.id_prefix().is_none());
    let err = within("publish", producer.send("t", "x"))
        .await
        .expect_err("the reply was lost");
    assert!(err.is_connection_error(), "{err:?}");
    // It was stored: a resend would have stored it twice.
    assert_eq!(broker.stored("t").len(), 1);
    assert_eq!(broker.recorded().publish_requests, 1);
    // A message with its own id is resent even so.
    broker.script().lose_publish_replies = 1;
    let reply = within(
        "publish with an id",
        producer.publish_batch(
            "t",
            vec![NewMessage {
                id: Some("order-7".into()),
                payload: "y".into(),
                ..Default::default()
            }],
        ),
    )
    .await
    .expect("resent");
    assert!(reply.duplicate, "{reply:?}");
    assert_eq!((reply.seqs.clone(), reply.first_seq), (vec![2], 2));
    assert_eq!(broker.stored("t").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reports_resets_and_sends_backoff_and_delayed_nacks() {
    let broker = FakeBroker::start().await;
    let notice = ResetNotice {
        reason: "retention".into(),
        floor_seq: 1,
        skipped: 7,
    };
    broker.script().reset_notice = Some(notice.clone());
    let producer = Producer::connect(config(&broker)).await.expect("connect");
    for i in 0..2 {
        producer.send("t", format!("m{i}")).await.expect("publish");
    }
    let cfg = ConsumerConfig::new(config(&broker), "t", "g")
        .batch_size(2)
        .backoff(vec![Duration::from_secs(1), Duration::from_millis(2500)]);
    let mut consumer = Consumer::subscribe(cfg).await.expect("subscribe");
    assert_eq!(consumer.resets(), 0);
    let first = within("next", consumer.next())
        .await
        .expect("open")
        .expect("msg");
    // The reset came before the batch, on the same stream.
    assert_eq!(consumer.resets(), 1);
    assert_eq!(consumer.last_reset(), Some(notice.clone()));
    assert_eq!(consumer.take_resets(), vec![notice.clone()]);
    assert!(consumer.take_resets().is_empty());
    assert_eq!(consumer.last_reset(), Some(notice));
    let second = within("next", consumer.next())
        .await
        .expect("open")
        .expect("msg");
    consumer
        .nack_with_delay(&first, Duration::from_millis(2500))
        .expect("nack");
    assert!(consumer
        .nack_with_delay(&second, Duration::from_secs(2 * 86400))
        .is_err());
    consumer.ack(&second).expect("ack");
    within("flush", consumer.flush_acks()).await.expect("flush");
    let rec = broker.recorded();
    assert_eq!(
        rec.subscribes[0].backoff,
        Some(vec!["1s".to_string(), "2s 500ms".to_string()])
    );
    assert_eq!(rec.nacks.len(), 1);
    assert_eq!(
        (
            rec.nacks[0].seqs.clone(),
            rec.nacks[0].delay_ms,
            rec.nacks[0].release
        ),
        (Some(vec![first.seq()]), Some(2500), false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_events_stream_on_a_connection_of_its_own() {
    let broker = FakeBroker::start().await;
    let events = vec![
        BrokerEvent::now("topic_created").topic("t"),
        BrokerEvent::now("events_lost").count(3),
    ];
    broker.script().events = events.clone();
    let admin = Admin::connect(config(&broker)).await.expect("connect");
    let mut stream = admin
        .events(vec!["topic_created".into()])
        .await
        .expect("subscribe");
    for want in &events {
        let got = within("event", stream.next())
            .await
            .expect("open")
            .expect("event");
        assert_eq!(&got, want);
    }
    assert_eq!(
        broker.recorded().events_requests[0].kinds,
        vec!["topic_created".to_string()]
    );
    wait_open_connections(&broker, 2).await;
    // Dropping the stream closes its connection (the broker ends the subscription); the
    // admin's own connection stays.
    drop(stream);
    wait_open_connections(&broker, 1).await;
    within("stats", admin.stats()).await.expect("stats");
    // A closed connection ends the stream with an error.
    let mut stream = admin.events(Vec::new()).await.expect("subscribe");
    for _ in 0..2 {
        within("event", stream.next())
            .await
            .expect("open")
            .expect("event");
    }
    broker.kill_connections();
    let end = within("end", stream.next()).await.expect("an error first");
    assert!(end.is_err(), "{end:?}");
    assert!(within("end", stream.next()).await.is_none());
}
