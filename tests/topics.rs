//! Topics as an operator manages them, through `sluice_sdk::Admin`: create, alter, info, list,
//! delete, their errors, settings that survive a restart, `auto_create_topics = false`, and a
//! subscribe to a missing topic that creates no file.
mod common;
use bytes::Bytes;
use common::*;
use sluice_sdk::protocol::{
    route, Discard, ErrorCode, PublishReply, PublishRequest, TopicInfo, TopicSettings,
};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, NewMessage, SdkError};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

async fn admin(b: &TestBroker) -> Admin {
    Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin")
}

/// Publishes `n` small messages to `topic` in one request.
async fn publish(a: &Admin, topic: &str, n: usize) -> Result<PublishReply, SdkError> {
    let req = PublishRequest {
        topic: topic.into(),
        messages: (0..n)
            .map(|i| NewMessage {
                payload: Bytes::from(format!("m{i}")),
                ..Default::default()
            })
            .collect(),
    };
    a.client().request(route::PUBLISH, &req).await
}

fn code<T: std::fmt::Debug>(r: Result<T, SdkError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a broker error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// The error a subscription is refused with (at subscribe or as the stream's first item).
async fn refusal(cfg: ConsumerConfig) -> SdkError {
    match Consumer::subscribe(cfg.max_reconnect_attempts(0)).await {
        Err(e) => e,
        Ok(mut c) => match tokio::time::timeout(T, c.next()).await.expect("answer") {
            Some(Err(e)) => e,
            other => panic!(
                "expected a refusal, got {:?}",
                other.map(|r| r.map(|m| m.seq()))
            ),
        },
    }
}

/// Waits until the orchestrators hold group `group` of `topic` (the subscribe joined).
async fn joined(a: &Admin, topic: &str, group: &str) {
    let start = std::time::Instant::now();
    loop {
        let stats = a.stats().await.expect("stats");
        if stats
            .groups
            .iter()
            .any(|g| g.topic == topic && g.group == group && g.consumers > 0)
        {
            return;
        }
        assert!(start.elapsed() < T, "{topic}/{group} never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_alter_info_list_delete() {
    let b = TestBroker::start();
    let a = admin(&b).await;
    let week = 7 * 24 * 3600 * 1000;
    let created = a
        .create_topic(
            "orders",
            TopicSettings {
                max_age_ms: Some(week),
                dedup_window_ms: Some(60_000),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    assert_eq!(
        (
            created.head_seq,
            created.floor_seq,
            created.messages,
            created.segments
        ),
        (0, 1, 0, 0)
    );
    assert_eq!(created.settings.max_age_ms, Some(week));
    assert_eq!(created.settings.dedup_window_ms, Some(60_000));
    assert_eq!(created.settings.discard, Some(Discard::Age), "the default");
    assert_eq!(created.settings.max_bytes, None);
    assert!(b.data_dir().join("topics/orders/settings.toml").exists());

    // Errors, and nothing changed by them.
    assert_eq!(
        code(a.create_topic("orders", TopicSettings::default()).await),
        ErrorCode::TopicExists
    );
    assert_eq!(
        code(a.alter_topic("nope", TopicSettings::default()).await),
        ErrorCode::UnknownTopic
    );
    assert_eq!(code(a.topic_info("nope").await), ErrorCode::UnknownTopic);
    assert_eq!(code(a.delete_topic("nope").await), ErrorCode::UnknownTopic);
    let absurd = TopicSettings {
        max_age_ms: Some(5),
        ..Default::default()
    };
    assert_eq!(
        code(a.create_topic("bad", absurd.clone()).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(a.alter_topic("orders", absurd).await),
        ErrorCode::InvalidRequest
    );
    let ids_outlive_messages = TopicSettings {
        max_age_ms: Some(2000),
        dedup_window_ms: Some(60_000),
        ..Default::default()
    };
    assert_eq!(
        code(a.create_topic("bad", ids_outlive_messages).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(code(a.topic_info("bad").await), ErrorCode::UnknownTopic);
    assert_eq!(
        a.topic_info("orders")
            .await
            .expect("info")
            .settings
            .max_age_ms,
        Some(week)
    );

    // Alter changes only what it names.
    let altered = a
        .alter_topic(
            "orders",
            TopicSettings {
                max_bytes: Some(1 << 30),
                discard: Some(Discard::Acked),
                ..Default::default()
            },
        )
        .await
        .expect("alter");
    assert_eq!(altered.settings.max_age_ms, Some(week));
    assert_eq!(altered.settings.max_bytes, Some(1 << 30));
    assert_eq!(altered.settings.discard, Some(Discard::Acked));

    let r = publish(&a, "orders", 10).await.expect("publish");
    assert_eq!((r.first_seq, r.last_seq), (1, 10));
    publish(&a, "other", 3).await.expect("publish");
    let i = a.topic_info("orders").await.expect("info");
    assert_eq!(
        (i.head_seq, i.floor_seq, i.messages, i.segments),
        (10, 1, 10, 1)
    );
    assert!(i.bytes > 0 && i.oldest_ms.is_some(), "{i:?}");
    let list: Vec<TopicInfo> = a.list_topics().await.expect("list");
    let names: Vec<_> = list.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(names, vec!["orders", "other"]);
    assert_eq!(list[1].head_seq, 3);

    // Delete: files, settings and groups go.
    let d = a.delete_topic("orders").await.expect("delete");
    assert_eq!((d.topic.as_str(), d.messages), ("orders", 10));
    assert!(d.bytes > 0);
    assert!(!b.data_dir().join("topics/orders").exists());
    assert_eq!(code(a.topic_info("orders").await), ErrorCode::UnknownTopic);
    assert_eq!(
        code(a.delete_topic("orders").await),
        ErrorCode::UnknownTopic
    );
    let names: Vec<_> = a
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.topic)
        .collect();
    assert_eq!(names, vec!["other".to_string()]);
    // Published again (auto-create): a new topic, from seq 1, with the defaults.
    let r = publish(&a, "orders", 2).await.expect("publish");
    assert_eq!((r.first_seq, r.last_seq), (1, 2));
    let i = a.topic_info("orders").await.expect("info");
    assert_eq!(i.settings.max_age_ms, None);
    assert_eq!(i.settings.discard, Some(Discard::Age));
    // The deleted files are gone from disk too (the trash is emptied once the deletion is
    // durable).
    let trash = b.data_dir().join("trash");
    assert!(
        eventually(T, || std::fs::read_dir(&trash).map_or(0, |d| d.count())
            == 0)
        .await,
        "trash emptied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topics_groups_do_not_come_back() {
    let mut b = TestBroker::start();
    let a = admin(&b).await;
    publish(&a, "jobs", 5).await.expect("publish");
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "jobs",
        "workers",
    ))
    .await
    .expect("subscribe");
    let m = next_message(&mut c, T).await;
    c.ack(&m).expect("ack");
    c.flush_acks().await.expect("ack durable");
    assert_eq!(
        a.topic_info("jobs").await.expect("info").groups,
        vec!["workers".to_string()]
    );
    c.close().await.expect("close");
    a.delete_topic("jobs").await.expect("delete");
    publish(&a, "jobs", 1).await.expect("publish");
    assert!(a.topic_info("jobs").await.expect("info").groups.is_empty());
    b.restart();
    let a = admin(&b).await;
    let i = a.topic_info("jobs").await.expect("info");
    assert_eq!((i.head_seq, i.groups.len()), (1, 0), "{i:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_survive_a_restart() {
    let mut b = TestBroker::start();
    let a = admin(&b).await;
    let settings = TopicSettings {
        max_age_ms: Some(3_600_000),
        max_bytes: Some(0),
        max_messages: Some(1_000_000),
        discard: Some(Discard::Acked),
        dedup_window_ms: Some(1_000),
        backoff_ms: Some(vec![1000, 5000]),
    };
    let before = a
        .create_topic("kept", settings)
        .await
        .expect("create")
        .settings;
    assert_eq!(before.max_bytes, None, "0: no limit");
    b.restart();
    let a = admin(&b).await;
    let after = a.topic_info("kept").await.expect("info").settings;
    assert_eq!(after, before);
    assert_eq!(after.backoff_ms, Some(vec![1000, 5000]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_to_a_missing_topic_creates_no_file() {
    let b = TestBroker::start();
    let a = admin(&b).await;
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "ghost",
        "g",
    ))
    .await
    .expect("subscribe");
    joined(&a, "ghost", "g").await;
    assert!(!b.data_dir().join("topics/ghost").exists(), "no directory");
    assert_eq!(code(a.topic_info("ghost").await), ErrorCode::UnknownTopic);
    // Its first message creates it, with the group's record.
    publish(&a, "ghost", 1).await.expect("publish");
    let m = next_message(&mut c, T).await;
    assert_eq!(m.seq(), 1);
    let i = a.topic_info("ghost").await.expect("info");
    assert_eq!(i.groups, vec!["g".to_string()]);
    assert!(b.data_dir().join("topics/ghost").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_unknown_topics_are_refused() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "auto_create_topics = false\nmax_retries = 0\n").expect("config");
    let b = TestBroker::start_with(&["--config", path.to_str().expect("utf-8")]);
    let a = admin(&b).await;
    assert_eq!(
        code(publish(&a, "unknown", 1).await),
        ErrorCode::UnknownTopic
    );
    // A name like a dead-letter topic's is no way around it for a client.
    assert_eq!(
        code(publish(&a, "unknown.g.dlq", 1).await),
        ErrorCode::UnknownTopic
    );
    assert!(!b.data_dir().join("topics/unknown.g.dlq").exists());
    let e = refusal(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "unknown",
        "g",
    ))
    .await;
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic), "{e}");
    assert!(!b.data_dir().join("topics/unknown").exists());
    assert!(a.list_topics().await.expect("list").is_empty());

    // Created by an operator, it takes publishes and subscribes.
    a.create_topic("known", TopicSettings::default())
        .await
        .expect("create");
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c2"),
        "known",
        "g",
    ))
    .await
    .expect("subscribe");
    let r = publish(&a, "known", 2).await.expect("publish");
    assert_eq!((r.first_seq, r.last_seq), (1, 2));
    let m1 = next_message(&mut c, T).await;
    let m2 = next_message(&mut c, T).await;
    assert_eq!((m1.seq(), m2.seq()), (1, 2));
    // The broker's own dead letters still create their topic (no retry: the nacks send both).
    c.nack(&m1).expect("nack");
    c.nack(&m2).expect("nack");
    let start = std::time::Instant::now();
    while a.topic_info("known.g.dlq").await.map_or(0, |i| i.head_seq) < 2 {
        assert!(start.elapsed() < T, "the dead letters never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.topic_info("known.g.dlq").await.expect("info").head_seq, 2);
    // Deleted, it is unknown again.
    c.close().await.expect("close");
    a.delete_topic("known").await.expect("delete");
    assert_eq!(code(publish(&a, "known", 1).await), ErrorCode::UnknownTopic);
}
