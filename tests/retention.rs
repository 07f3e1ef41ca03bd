//! Retention end to end: a topic's limits remove whole segments on the sweep, the disk shrinks
//! (`du`: blocks actually allocated), the floor moves, and a restart comes back with the same
//! floor and head; `discard = "acked"` removes nothing a group still needs.
mod common;
use bytes::Bytes;
use common::*;
use sluice_sdk::protocol::{
    route, Discard, PublishReply, PublishRequest, TopicInfo, TopicSettings,
};
use sluice_sdk::{Admin, Consumer, ConsumerConfig, NewMessage};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A broker with 128 KiB segments (many of them) and a sweep every 200 ms; its config file
/// lives in `cfg`.
fn broker(cfg: &tempfile::TempDir) -> TestBroker {
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "segment_bytes = \"128KiB\"\n").expect("config");
    let path = path.to_str().expect("utf-8 path").to_string();
    TestBroker::start_with(&["--config", &path, "--retention-interval", "200ms"])
}

async fn admin(b: &TestBroker) -> Admin {
    Admin::connect(client_config(&b.addr(), "admin"))
        .await
        .expect("admin")
}

/// Publishes `n` messages of 100 bytes to `topic`, 1,000 per request.
async fn publish_many(a: &Admin, topic: &str, n: usize) {
    let mut done = 0;
    while done < n {
        let k = (n - done).min(1000);
        let req = PublishRequest {
            topic: topic.into(),
            messages: (0..k)
                .map(|i| NewMessage {
                    payload: Bytes::from(format!("{:0100}", done + i)),
                    ..Default::default()
                })
                .collect(),
        };
        let r: PublishReply = a
            .client()
            .request(route::PUBLISH, &req)
            .await
            .expect("publish");
        assert_eq!(r.last_seq + 1 - r.first_seq, k as u64);
        done += k;
    }
}

/// The next lifecycle event (within a minute).
async fn next_event(
    events: &mut sluice_sdk::admin::EventStream,
) -> sluice_sdk::protocol::BrokerEvent {
    use futures::StreamExt;
    tokio::time::timeout(T, events.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("an event")
}

/// Disk blocks actually allocated under `dir`, in bytes (what `du` shows).
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            // A file the remover unlinks meanwhile counts for nothing.
            match std::fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => du(&p),
                Ok(md) => md.blocks() * 512,
                Err(_) => 0,
            }
        })
        .sum()
}

async fn info(a: &Admin, topic: &str) -> TopicInfo {
    a.topic_info(topic).await.expect("topic info")
}

/// Waits until `topic`'s info satisfies `f` (polling), returning it.
async fn info_until(a: &Admin, topic: &str, f: impl Fn(&TopicInfo) -> bool) -> TopicInfo {
    let start = std::time::Instant::now();
    loop {
        let i = info(a, topic).await;
        if f(&i) {
            return i;
        }
        assert!(start.elapsed() < T, "condition not met in time: {i:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Segment files in `dir`.
fn seg_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until `dir` holds exactly `n` segment files: the remover has unlinked every segment
/// taken out of the log (a kill before that brings them back, and the next sweep removes them
/// again).
async fn files_removed(dir: &Path, n: u32) {
    let start = std::time::Instant::now();
    while seg_files(dir) != n as usize {
        assert!(
            start.elapsed() < T,
            "{} segment files, not {n}",
            seg_files(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `du` of `dir` is below `bytes`.
async fn du_below(dir: &Path, bytes: u64) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let d = du(dir);
        if d < bytes {
            return d;
        }
        assert!(start.elapsed() < T, "du {d} not below {bytes} in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_removes_every_expired_segment_and_a_restart_keeps_floor_and_head() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut b = broker(&cfg);
    let a = admin(&b).await;
    a.create_topic("aged", TopicSettings::default())
        .await
        .expect("create");
    // A group, so that its record must survive every segment going.
    let c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "aged",
        "lagging",
    ))
    .await
    .expect("subscribe");
    info_until(&a, "aged", |i| !i.groups.is_empty()).await;
    drop(c);
    publish_many(&a, "aged", 100_000).await;
    let dir = b.data_dir().join("topics/aged");
    let before = du(&dir);
    let i = info(&a, "aged").await;
    assert_eq!((i.head_seq, i.floor_seq, i.messages), (100_000, 1, 100_000));
    assert_eq!(i.groups, vec!["lagging".to_string()]);
    assert!(i.segments > 50, "many segments: {i:?}");
    assert!(before > 10_000_000, "du before: {before}");
    // Lifecycle events from here on: subscribed once a probe topic's creation is seen.
    let mut events = a.events(vec![]).await.expect("events");
    publish_many(&a, "probe", 1).await;
    loop {
        let e = next_event(&mut events).await;
        if e.kind == "topic_created" && e.topic.as_deref() == Some("probe") {
            break;
        }
    }

    a.alter_topic(
        "aged",
        TopicSettings {
            max_age_ms: Some(2000),
            ..Default::default()
        },
    )
    .await
    .expect("alter");
    // The sweep says what it removed, and the lagging group, moved up to the floor, is told.
    let (mut removed, mut skipped) = (0u64, 0u64);
    while removed < 100_000 || skipped < 100_000 {
        let e = next_event(&mut events).await;
        if e.topic.as_deref() != Some("aged") {
            continue;
        }
        match e.kind.as_str() {
            "retention_removed" => removed += e.count.unwrap_or(0),
            "group_moved_to_floor" => {
                assert_eq!(e.group.as_deref(), Some("lagging"), "{e:?}");
                skipped += e.count.unwrap_or(0);
            }
            _ => {}
        }
    }
    assert_eq!((removed, skipped), (100_000, 100_000));
    let g = a.group_info("aged", "lagging").await.expect("group info");
    assert_eq!(
        (g.acked_floor, g.lag, g.skipped_by_retention),
        (100_000, 0, 100_000),
        "{g:?}"
    );
    let i = info_until(&a, "aged", |i| i.floor_seq == 100_001).await;
    assert_eq!(
        (i.head_seq, i.messages, i.segments),
        (100_000, 0, 1),
        "{i:?}"
    );
    assert_eq!(i.oldest_ms, None);
    let after = du_below(&dir, before / 10).await;
    eprintln!("du of the topic: {before} bytes before, {after} after");
    files_removed(&dir, i.segments).await;

    b.restart();
    let a = admin(&b).await;
    let i = info(&a, "aged").await;
    assert_eq!((i.head_seq, i.floor_seq, i.messages), (100_000, 100_001, 0));
    assert_eq!(
        i.groups,
        vec!["lagging".to_string()],
        "the group's record survived"
    );
    assert_eq!(i.settings.max_age_ms, Some(2000), "settings survived");
    // The next message continues the seqs.
    publish_many(&a, "aged", 1).await;
    let i = info(&a, "aged").await;
    assert_eq!((i.head_seq, i.floor_seq), (100_001, 100_001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_removes_the_oldest_segments_and_a_restart_keeps_floor_and_head() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut b = broker(&cfg);
    let a = admin(&b).await;
    publish_many(&a, "sized", 100_000).await;
    let dir = b.data_dir().join("topics/sized");
    let before = du(&dir);
    assert!(before > 10_000_000, "du before: {before}");
    a.alter_topic(
        "sized",
        TopicSettings {
            max_bytes: Some(512 * 1024),
            ..Default::default()
        },
    )
    .await
    .expect("alter");
    let i = info_until(&a, "sized", |i| i.floor_seq > 1).await;
    assert!(i.bytes <= 512 * 1024, "{i:?}");
    assert!(i.bytes > 256 * 1024, "no more than needed goes: {i:?}");
    assert_eq!(i.head_seq, 100_000);
    assert_eq!(i.messages, 100_001 - i.floor_seq);
    let after = du_below(&dir, before / 10).await;
    eprintln!("du of the topic: {before} bytes before, {after} after");
    files_removed(&dir, i.segments).await;

    b.restart();
    let a = admin(&b).await;
    let j = info(&a, "sized").await;
    assert_eq!((j.head_seq, j.floor_seq), (i.head_seq, i.floor_seq));
    // A new group starts at the floor: what is retained is readable.
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "sized",
        "late",
    ))
    .await
    .expect("subscribe");
    let m = next_message(&mut c, T).await;
    assert_eq!(m.seq(), i.floor_seq);
    assert_eq!(
        m.payload(),
        &Bytes::from(format!("{:0100}", i.floor_seq - 1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_acked_removes_only_what_every_group_acked() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let b = broker(&cfg);
    let a = admin(&b).await;
    let acked = TopicSettings {
        discard: Some(Discard::Acked),
        ..Default::default()
    };
    a.create_topic("work", acked.clone()).await.expect("create");
    a.create_topic("keep", acked).await.expect("create");
    publish_many(&a, "work", 20_000).await;
    publish_many(&a, "keep", 20_000).await;
    assert!(info(&a, "work").await.segments > 10);

    // The group acks the first half.
    let mut c = Consumer::subscribe(
        ConsumerConfig::new(client_config(&b.addr(), "c"), "work", "g").window(2),
    )
    .await
    .expect("subscribe");
    for expected in 1..=10_000u64 {
        let m = next_message(&mut c, T).await;
        assert_eq!(m.seq(), expected);
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("acks durable");
    c.close().await.expect("close");

    let i = info_until(&a, "work", |i| i.floor_seq > 1).await;
    assert!(
        i.floor_seq <= 10_001,
        "only segments wholly below the group's floor go: {i:?}"
    );
    assert_eq!(i.head_seq, 20_000);
    // The sweep that moved it went over `keep` too, after both were published: a topic with
    // no group keeps its data.
    let k = info(&a, "keep").await;
    assert_eq!((k.floor_seq, k.messages), (1, 20_000), "{k:?}");

    // Everything the group still needs is there.
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c2"),
        "work",
        "g",
    ))
    .await
    .expect("subscribe");
    let m = next_message(&mut c, T).await;
    assert_eq!(m.seq(), 10_001);
    assert_eq!(m.payload(), &Bytes::from(format!("{:0100}", 10_000)));
    let again = info(&a, "work").await;
    assert!(again.floor_seq <= 10_001, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_messages_a_size_limit_removed_are_remembered_across_a_restart() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut b = broker(&cfg);
    let a = admin(&b).await;
    // 128 KiB segments, at most 256 KiB kept; the window (2 minutes) outlives the messages.
    a.create_topic(
        "ids",
        TopicSettings {
            max_bytes: Some(256 * 1024),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let mut seq_of = std::collections::BTreeMap::new();
    for k in 0..20 {
        let req = PublishRequest {
            topic: "ids".into(),
            messages: (0..100)
                .map(|i| NewMessage {
                    id: Some(format!("id-{k}-{i}").into()),
                    payload: Bytes::from(vec![b'x'; 400]),
                    ..Default::default()
                })
                .collect(),
        };
        let r: PublishReply = a
            .client()
            .request(route::PUBLISH, &req)
            .await
            .expect("publish");
        assert!(!r.duplicate);
        for i in 0..100u64 {
            seq_of.insert(format!("id-{k}-{i}"), r.first_seq + i);
        }
    }
    let i = info_until(&a, "ids", |i| i.floor_seq > 1000).await;
    let dir = b.data_dir().join("topics/ids");
    files_removed(&dir, i.segments).await;
    // The index rebuilt at the start has the ids of the removed messages too.
    b.restart();
    let a = admin(&b).await;
    let j = info(&a, "ids").await;
    assert!(j.floor_seq > 1000, "{j:?}");
    let resend = ["id-0-0", "id-5-50", "id-19-99"];
    let req = PublishRequest {
        topic: "ids".into(),
        messages: resend
            .iter()
            .map(|id| NewMessage {
                id: Some((*id).into()),
                payload: Bytes::from_static(b"again"),
                ..Default::default()
            })
            .collect(),
    };
    let r: PublishReply = a
        .client()
        .request(route::PUBLISH, &req)
        .await
        .expect("publish");
    assert!(r.duplicate, "{r:?}");
    assert_eq!(
        r.seqs,
        resend.iter().map(|id| seq_of[*id]).collect::<Vec<_>>(),
        "each resend answered with its original's seq, removed or not"
    );
    assert_eq!(info(&a, "ids").await.head_seq, 2000, "nothing stored again");
}

/// One FUSE mount at a time (the simulator is a single-threaded process each).
static POWERLOSS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Under `fsync = "never"` the segments retention leaves hold the only copies of the groups'
/// records once the older segments are gone: they are made durable before those go. A power
/// cut right after the removal keeps the group (needs FUSE: the power-cut simulator, see
/// `PowerlossFs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs FUSE: run by .ci/run"]
async fn under_fsync_never_a_power_cut_after_a_removal_keeps_the_groups() {
    let _serial = POWERLOSS.lock().await;
    let fs = PowerlossFs::mount("lazy");
    let data = fs.mnt().join("data");
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("sluice.toml");
    std::fs::write(&path, "segment_bytes = \"128KiB\"\n").expect("config");
    let path = path.to_str().expect("utf-8 path").to_string();
    let flags = |fsync: &'static str| {
        vec![
            "--config".to_string(),
            path.clone(),
            "--retention-interval".into(),
            "200ms".into(),
            "--fsync".into(),
            fsync.into(),
        ]
    };
    let start = |fsync| {
        let f = flags(fsync);
        TestBroker::start_on(&data, &f.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Durable: messages over a few segments, and a group that acked some.
    let mut b = start("always");
    let a = admin(&b).await;
    publish_many(&a, "keep", 4000).await;
    let mut c = Consumer::subscribe(ConsumerConfig::new(
        client_config(&b.addr(), "c"),
        "keep",
        "g",
    ))
    .await
    .expect("subscribe");
    for seq in 1..=100 {
        let m = next_message(&mut c, T).await;
        assert_eq!(m.seq(), seq);
        c.ack(&m).expect("ack");
    }
    c.flush_acks().await.expect("acks confirmed");
    drop(c);
    b.kill();
    // Under `never`: new segments (the groups' records copied at their start, never synced),
    // then a limit that removes every older segment.
    let mut b = start("never");
    let a = admin(&b).await;
    publish_many(&a, "keep", 3000).await;
    a.alter_topic(
        "keep",
        TopicSettings {
            max_bytes: Some(128 * 1024),
            ..Default::default()
        },
    )
    .await
    .expect("alter");
    let i = info_until(&a, "keep", |i| i.floor_seq > 4000).await;
    files_removed(&fs.mnt().join("data/topics/keep"), i.segments).await;
    b.kill();
    fs.crash();
    let b = start("always");
    let a = admin(&b).await;
    let j = info(&a, "keep").await;
    assert_eq!(j.groups, vec!["g".to_string()], "{j:?}");
}

/// The `.seg` files of `dir` and their lengths, by name.
fn seg_lens(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .expect("topic dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| {
            let len = e.metadata().expect("metadata").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_segments_are_freed_in_paced_steps_and_the_disk_shrinks() {
    const MIB: u64 = 1024 * 1024;
    const STEP: u64 = 2 * MIB;
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("sluice.toml");
    // Segments of 20 MiB (ten 2 MiB steps each), freed at 40 MiB/s.
    std::fs::write(
        &path,
        "segment_bytes = \"20MiB\"\nretention_remove_rate = \"40MiB\"\n",
    )
    .expect("config");
    let path = path.to_str().expect("utf-8 path").to_string();
    let b = TestBroker::start_with(&["--config", &path, "--retention-interval", "200ms"]);
    let a = admin(&b).await;
    a.create_topic("big", TopicSettings::default())
        .await
        .expect("create");
    // 50 MiB in messages of 100 KiB: closed segments and the one taking appends.
    for _ in 0..25 {
        let req = PublishRequest {
            topic: "big".into(),
            messages: (0..20)
                .map(|_| NewMessage {
                    payload: Bytes::from(vec![b'x'; 100 * 1024]),
                    ..Default::default()
                })
                .collect(),
        };
        let _: PublishReply = a
            .client()
            .request(route::PUBLISH, &req)
            .await
            .expect("publish");
    }
    let dir = b.data_dir().join("topics/big");
    let lens = seg_lens(&dir);
    let i = info(&a, "big").await;
    assert_eq!(i.segments as usize, lens.len(), "{i:?} {lens:?}");
    assert!(lens.len() >= 3, "{lens:?}");
    // Every closed one (all but the last by seq) goes under max_bytes = 1 KiB.
    let mut by_seq: Vec<(u64, u64)> = lens
        .iter()
        .map(|(n, l)| (n.trim_end_matches(".seg").parse().expect("seq name"), *l))
        .collect();
    by_seq.sort();
    let closed = &by_seq[..by_seq.len() - 1];
    let files = closed.len() as u64;
    let bytes: u64 = closed.iter().map(|(_, l)| l).sum();
    let steps: u64 = closed.iter().map(|(_, l)| l.div_ceil(STEP)).sum();
    assert!(closed.iter().any(|(_, l)| *l > 2 * STEP), "{closed:?}");
    let before = du(&dir);
    let started = std::time::Instant::now();
    a.alter_topic(
        "big",
        TopicSettings {
            max_bytes: Some(1024),
            ..Default::default()
        },
    )
    .await
    .expect("alter");
    // Out of the topic at once; freed step by step (some poll sees it part way).
    info_until(&a, "big", |i| i.segments == 1).await;
    let mut part_way = false;
    let s = loop {
        let s = a.stats().await.expect("stats").syncs.expect("sync stats");
        if s.removed_bytes > 0 && s.removed_bytes < bytes && s.remove_pending_bytes > 0 {
            part_way = true;
        }
        if s.removed_files == files && s.remove_pending_bytes == 0 {
            break s;
        }
        assert!(started.elapsed() < T, "not freed in time: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    assert_eq!(
        (s.removed_files, s.removed_bytes, s.remove_steps),
        (files, bytes, steps),
        "{s:?}"
    );
    assert!(part_way, "never seen part way");
    // At most 40 MiB a second: every step but the first waits for its budget.
    let floor = Duration::from_secs_f64((bytes - STEP) as f64 / (40 * MIB) as f64);
    assert!(took >= floor, "took {took:?}, paced: at least {floor:?}");
    let trash = b.data_dir().join("trash");
    assert_eq!(std::fs::read_dir(&trash).expect("trash").count(), 0);
    let after = du(&dir);
    assert!(before - after >= bytes / 10 * 9, "du {before} -> {after}");
}
