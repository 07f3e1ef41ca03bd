//! The `sluice` command line end to end: publish (stdin and generated), consume --json, stats.
mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_and_stats_from_the_command_line() {
    let b = TestBroker::start();
    let addr = b.addr();

    // One message per stdin line, with key, header and priority.
    let mut child = sluice()
        .args([
            "publish",
            "--addr",
            &addr,
            "--topic",
            "cli",
            "--key",
            "k1",
            "--header",
            "lang=en",
            "--priority",
            "2",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn publish");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\nworld\n")
        .expect("write");
    let out = child.wait_with_output().expect("publish");
    assert!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("publish --json");
    assert_eq!(
        (
            v["count"].as_u64(),
            v["first_seq"].as_u64(),
            v["last_seq"].as_u64()
        ),
        (Some(2), Some(1), Some(2))
    );

    // Generated messages.
    let (ok, stdout, stderr) = b.cli(&[
        "publish", "--addr", &addr, "--topic", "cli", "--count", "100", "--size", "64",
    ]);
    assert!(ok, "publish --count failed: {stderr}");
    assert!(
        stdout.contains("102"),
        "summary names the last seq: {stdout}"
    );

    // Consume all of them as JSON lines, acking after printing.
    let (ok, stdout, stderr) = b.cli(&[
        "consume", "--addr", &addr, "--topic", "cli", "--group", "g", "--count", "102", "--json",
    ]);
    assert!(ok, "consume failed: {stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 102);
    let first = &lines[0];
    for field in [
        "topic",
        "group",
        "seq",
        "key",
        "headers",
        "priority",
        "attempt",
        "timestamp_ms",
        "payload",
    ] {
        assert!(
            first.get(field).is_some(),
            "field {field} missing in {first}"
        );
    }
    assert_eq!(first["topic"], "cli");
    assert_eq!(first["group"], "g");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["key"], "k1");
    assert_eq!(first["headers"]["lang"], "en");
    assert_eq!(first["priority"], 2);
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["payload"], "hello");
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=102).collect::<Vec<u64>>());

    // A live subscription so stats has a connection to show.
    let mut c = sluice_sdk::Consumer::subscribe(sluice_sdk::ConsumerConfig::new(
        client_config(&addr, "watcher"),
        "cli",
        "other",
    ))
    .await
    .expect("subscribe");
    let m = tokio::time::timeout(std::time::Duration::from_secs(10), c.next())
        .await
        .expect("msg")
        .expect("open")
        .expect("ok");
    assert_eq!(m.seq(), 1);

    let (ok, stdout, stderr) = b.cli(&["stats", "--addr", &addr, "--json"]);
    assert!(ok, "stats failed: {stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).expect("stats json");
    let actors = s["actors"].as_array().expect("actors");
    for kind in ["registry", "orchestrator", "store", "connection"] {
        let a = actors
            .iter()
            .find(|a| a["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} actor in {stdout}"));
        for counter in ["name", "handled", "restarts", "uptime_ms"] {
            assert!(a.get(counter).is_some(), "{kind} lacks {counter}");
        }
        assert!(
            a["handled"].as_u64().expect("handled") > 0 || kind == "registry",
            "{kind} handled nothing"
        );
    }
    let groups = s["groups"].as_array().expect("groups");
    let g = groups.iter().find(|g| g["group"] == "g").expect("group g");
    assert_eq!(
        (
            g["head_seq"].as_u64(),
            g["acked_floor"].as_u64(),
            g["lag"].as_u64()
        ),
        (Some(102), Some(102), Some(0))
    );
    let other = groups
        .iter()
        .find(|g| g["group"] == "other")
        .expect("group other");
    assert_eq!(other["lag"].as_u64(), Some(102));
    assert_eq!(other["consumers"].as_u64(), Some(1));
    // Under `fsync always` every publish and ack above waited for a sync, and stats says how
    // long they took.
    let syncs = &s["syncs"];
    let count = syncs["count"].as_u64().expect("syncs.count");
    assert!(count > 0, "no syncs counted: {stdout}");
    let buckets = syncs["buckets"].as_array().expect("syncs.buckets");
    let in_buckets: u64 = buckets.iter().filter_map(|b| b["count"].as_u64()).sum();
    assert_eq!(in_buckets, count, "{stdout}");
    assert!(syncs["max_us"].as_u64().expect("max_us") > 0);
    assert_eq!(syncs["failed"].as_u64(), Some(0));
    let conns = s["connections"].as_array().expect("connections");
    assert!(
        conns
            .iter()
            .any(|c| c["client_id"] == "watcher" && c["groups"][0] == "cli/other"),
        "{stdout}"
    );

    // Tables for people.
    let (ok, stdout, _) = b.cli(&["stats", "--addr", &addr]);
    assert!(ok);
    for word in [
        "registry",
        "orchestrator-0",
        "store",
        "cli",
        "watcher",
        "syncs ",
        "over 2 ms:",
    ] {
        assert!(stdout.contains(word), "stats table lacks {word}:\n{stdout}");
    }
}

#[test]
fn client_errors_exit_non_zero_with_a_message() {
    let b = TestBroker::start();
    let (ok, _, stderr) = b.cli(&[
        "consume",
        "--addr",
        &b.addr(),
        "--topic",
        "bad topic!",
        "--group",
        "g",
        "--count",
        "1",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("1008") || stderr.to_lowercase().contains("invalid"),
        "{stderr}"
    );
    let (ok, _, stderr) = b.cli(&["stats", "--addr", "127.0.0.1:1"]);
    assert!(!ok, "stats against a closed port must fail");
    assert!(!stderr.is_empty());
}
