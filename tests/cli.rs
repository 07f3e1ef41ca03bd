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
    // Refused by the SDK before anything is sent: one line naming the topic and the rule.
    assert!(
        stderr.starts_with(
            "error: invalid argument: topic name 'bad topic!' (10 bytes) must be 1..="
        ) && stderr.contains("of [A-Za-z0-9._-]")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    let (ok, _, stderr) = b.cli(&["stats", "--addr", "127.0.0.1:1"]);
    assert!(!ok, "stats against a closed port must fail");
    assert_eq!(
        stderr,
        "error: cannot connect to 127.0.0.1:1: Connection refused (os error 111)\n"
    );
}

/// Runs `sluice` with `args` and returns (exit ok, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = sluice().args(args).output().expect("run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sluice serve` with `args`, expecting it to exit by itself within 60 s (a broker that
/// starts instead is killed, and counts as a success), and returns (exit ok, stderr).
fn serve_fails(args: &[&str]) -> (bool, String) {
    let mut child = sluice()
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("serve output");
    (
        out.status.success() || out.status.code().is_none(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_errors_say_each_cause_once_and_name_the_path() {
    let b = TestBroker::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let fresh = tmp.path().join("fresh");
    let fresh = fresh.to_str().expect("utf8 path");

    // The listen address is taken.
    let (ok, stderr) = serve_fails(&["--listen", &b.addr(), "--data-dir", fresh]);
    assert!(!ok);
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {}", b.addr())),
        "{stderr}"
    );

    // A config file that is not valid TOML for the config: its error block once.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "batch_size = \"x\"\n").expect("write");
    let (ok, stderr) = serve_fails(&["--config", bad.to_str().expect("utf8")]);
    assert!(!ok);
    assert_eq!(stderr.matches("TOML parse error").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("expected u32").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("bad config file {}", bad.display())),
        "{stderr}"
    );

    // A data dir that cannot be created (its parent is a regular file; root cannot override
    // that): the error names the data dir, and says why once.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").expect("write");
    let under_file = file.join("data");
    let (ok, stderr) = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        under_file.to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("data dir {}", under_file.display())),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");

    // A second broker on the same data dir names the first one.
    let data = b.data_dir();
    let (ok, stderr) = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert_eq!(
        stderr,
        format!(
            "error: data dir {} is in use by another broker (pid {})\n",
            data.display(),
            b.pid()
        )
    );
}

#[test]
fn addresses_without_a_port_are_explained() {
    let (ok, _, stderr) = run(&["stats", "--addr", "127.0.0.1"]);
    assert!(!ok);
    assert!(
        stderr.contains("'127.0.0.1'") && stderr.contains("HOST:PORT"),
        "{stderr}"
    );
    let (ok, stderr) = serve_fails(&["--listen", "127.0.0.1"]);
    assert!(!ok);
    assert!(
        stderr.contains("'127.0.0.1'") && stderr.contains("HOST:PORT"),
        "{stderr}"
    );
}

#[test]
fn serve_help_shows_the_defaults() {
    let out = sluice().args(["serve", "--help"]).output().expect("help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--listen", "127.0.0.1:7070"),
        ("--data-dir", "./sluice-data"),
        ("--fsync", "always"),
        ("--batch-size", "16"),
        ("--batch-timeout", "30s"),
        ("--window", "4"),
        ("--keepalive", "20s"),
        ("--lifetime", "1m 30s"),
    ] {
        // clap puts a flag's help on the lines after it (long help) or beside it.
        let at = help
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        let next_flag = help[at + 2..]
            .find("\n      --")
            .map_or(help.len(), |i| at + 2 + i);
        assert!(
            help[at..next_flag].contains(&format!("[default: {default}]")),
            "{flag} lacks [default: {default}]:\n{}",
            &help[at..next_flag]
        );
    }
}

#[test]
fn batch_size_above_the_protocol_limit_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("d");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--batch-size",
        "4097",
        "--data-dir",
    ];
    let (ok, stderr) = serve_fails(&[&args[..], &[data.to_str().expect("utf8")]].concat());
    assert!(!ok);
    assert_eq!(
        stderr,
        "error: invalid config: batch_size must be in 1..=4096\n"
    );
}

#[test]
fn a_log_file_has_no_colour_codes_and_a_short_lifetime_is_warned_about() {
    let b = TestBroker::start_with(&["--keepalive", "2s", "--lifetime", "3s"]);
    let log = b.log();
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("lifetime"))
        .unwrap_or_else(|| panic!("no lifetime warning:\n{log}"));
    assert!(
        warning.contains("keepalive=2s") && warning.contains("lifetime=3s"),
        "{warning}"
    );
    drop(b);
    let b = TestBroker::start_with(&["--keepalive", "2s", "--lifetime", "4s"]);
    assert!(!b.log().contains("WARN"), "{}", b.log());
}

/// The group `g` of topic `t` in `sluice stats --json`.
fn group_stats(b: &TestBroker, topic: &str, group: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = b.cli(&["stats", "--addr", &b.addr(), "--json"]);
    assert!(ok, "stats failed: {stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).expect("stats json");
    s["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["topic"] == topic && g["group"] == group)
        .cloned()
        .unwrap_or_else(|| panic!("no group {topic}/{group} in {stdout}"))
}

/// `(seq, attempt)` of each `--json` line.
fn seqs_and_attempts(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["seq"].as_u64().expect("seq"),
                v["attempt"].as_u64().expect("attempt"),
            )
        })
        .collect()
}

#[test]
fn consume_count_takes_only_what_it_prints() {
    let b = TestBroker::start();
    let addr = b.addr();
    let (ok, _, stderr) = b.cli(&[
        "publish", "--addr", &addr, "--topic", "t", "--count", "10", "--size", "8",
    ]);
    assert!(ok, "{stderr}");
    let consume = |count: &str| {
        let (ok, stdout, stderr) = b.cli(&[
            "consume", "--addr", &addr, "--topic", "t", "--group", "g", "--count", count, "--json",
        ]);
        assert!(ok, "consume failed: {stderr}");
        seqs_and_attempts(&stdout)
    };

    assert_eq!(consume("3"), vec![(1, 1), (2, 1), (3, 1)]);
    // Nothing else was taken: the other 7 wait, none in flight, none redelivered.
    let g = group_stats(&b, "t", "g");
    assert_eq!(
        (
            g["acked_floor"].as_u64(),
            g["lag"].as_u64(),
            g["in_flight_messages"].as_u64(),
            g["redeliveries"].as_u64()
        ),
        (Some(3), Some(7), Some(0), Some(0)),
        "{g}"
    );

    // The rest comes to the next invocation, each message for the first time; more than one
    // round of batches when the count is not a multiple of the batch size.
    let (ok, _, stderr) = b.cli(&[
        "publish", "--addr", &addr, "--topic", "t", "--count", "30", "--size", "8",
    ]);
    assert!(ok, "{stderr}");
    let rest = consume("37");
    assert_eq!(rest, (4..=40).map(|s| (s, 1)).collect::<Vec<_>>());
    let g = group_stats(&b, "t", "g");
    assert_eq!(
        (
            g["acked_floor"].as_u64(),
            g["lag"].as_u64(),
            g["in_flight_messages"].as_u64(),
            g["redeliveries"].as_u64()
        ),
        (Some(40), Some(0), Some(0), Some(0)),
        "{g}"
    );
}

#[test]
fn consume_count_waits_for_messages_in_rounds_without_taking_extra() {
    let b = TestBroker::start();
    let addr = b.addr();
    let publish = |n: &str| {
        let (ok, _, stderr) = b.cli(&[
            "publish", "--addr", &addr, "--topic", "live", "--count", n, "--size", "8",
        ]);
        assert!(ok, "{stderr}");
    };
    publish("3");
    // Exclusive: each round's subscription must wait for the previous one to be gone.
    let mut child = sluice()
        .args([
            "consume",
            "--addr",
            &addr,
            "--topic",
            "live",
            "--group",
            "g",
            "--mode",
            "exclusive",
            "--count",
            "5",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.expect("utf8")).is_err() {
                break;
            }
        }
    });
    let line = || {
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("a line in time")
    };
    let mut lines: Vec<String> = (0..3).map(|_| line()).collect();
    publish("4");
    lines.extend((0..2).map(|_| line()));
    let out = child.wait_with_output().expect("consume exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rx.recv().is_err(), "more than 5 lines");
    assert_eq!(
        seqs_and_attempts(&lines.join("\n")),
        (1..=5).map(|s| (s, 1)).collect::<Vec<_>>()
    );
    // 6 and 7 were never handed out.
    let g = group_stats(&b, "live", "g");
    assert_eq!(
        (
            g["acked_floor"].as_u64(),
            g["lag"].as_u64(),
            g["in_flight_messages"].as_u64(),
            g["redeliveries"].as_u64()
        ),
        (Some(5), Some(2), Some(0), Some(0)),
        "{g}"
    );
    let (ok, stdout, stderr) = b.cli(&[
        "consume",
        "--addr",
        &addr,
        "--topic",
        "live",
        "--group",
        "g",
        "--mode",
        "exclusive",
        "--count",
        "2",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(seqs_and_attempts(&stdout), vec![(6, 1), (7, 1)]);
}

#[test]
fn consume_gives_back_what_it_could_not_print() {
    let b = TestBroker::start();
    let addr = b.addr();
    // Lines of ~20 KB: a few fill the pipe, the next write blocks until the reader is gone.
    let (ok, _, stderr) = b.cli(&[
        "publish", "--addr", &addr, "--topic", "big", "--count", "10", "--size", "20000",
    ]);
    assert!(ok, "{stderr}");
    let mut child = sluice()
        .args([
            "consume", "--addr", &addr, "--topic", "big", "--group", "g", "--count", "10", "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        reader.read_line(&mut first).expect("first line");
        assert!(first.contains("\"seq\":1"), "{first}");
        // Dropping the reader closes the pipe: the blocked write fails with EPIPE.
    }
    let out = child.wait_with_output().expect("consume exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What it printed (into the pipe) it acked; the rest it gave back without a failure.
    let g = group_stats(&b, "big", "g");
    let printed = g["acked_floor"].as_u64().expect("acked_floor");
    assert!((1..10).contains(&printed), "{g}");
    assert_eq!(
        (g["in_flight_messages"].as_u64(), g["redeliveries"].as_u64()),
        (Some(0), Some(0)),
        "{g}"
    );
    let rest = (10 - printed).to_string();
    let (ok, stdout, stderr) = b.cli(&[
        "consume", "--addr", &addr, "--topic", "big", "--group", "g", "--count", &rest, "--json",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        seqs_and_attempts(&stdout),
        (printed + 1..=10).map(|s| (s, 1)).collect::<Vec<_>>()
    );
}

/// `consume --count` in a broadcast group: every subscription is a member of its own that
/// starts at the group's cursor, so the count is taken by one subscription (rounds of new
/// subscriptions would miss what the other members acked in between and wait forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_count_in_a_broadcast_group_takes_every_message_in_one_subscription() {
    use sluice_sdk::{Consumer, ConsumerConfig, GroupMode, Producer};
    let b = TestBroker::start();
    let addr = b.addr();
    // Another member that acks everything at once.
    let mut cfg = ConsumerConfig::new(client_config(&addr, "other"), "fan", "g");
    cfg.mode = GroupMode::Broadcast;
    let mut other = Consumer::subscribe(cfg).await.expect("subscribe");
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = other.next().await {
            other.ack(&m).expect("ack");
            other.flush_acks().await.expect("flush");
            let _ = acked_tx.send(m.seq());
        }
    });
    let mut child = sluice()
        .args([
            "consume",
            "--addr",
            &addr,
            "--topic",
            "fan",
            "--group",
            "g",
            "--mode",
            "broadcast",
            "--count",
            "40",
            "--batch-size",
            "16",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.expect("utf8")).is_err() {
                break;
            }
        }
    });
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    };
    // The command line's member has joined when the group has two consumers.
    let start = std::time::Instant::now();
    while group_stats(&b, "fan", "g")["consumers"].as_u64() != Some(2) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "did not join"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let p = Producer::connect(client_config(&addr, "p"))
        .await
        .expect("producer");
    let mut lines = Vec::new();
    // Two messages, one batch each: a round of 40 / 16 = 2 batches would end here.
    for i in 0..2u32 {
        p.send("fan", format!("m{i}")).await.expect("publish");
        lines.push(
            rx.recv_timeout(std::time::Duration::from_secs(20))
                .expect("a line"),
        );
    }
    // Frozen there while the other member takes and acks the rest.
    signal("-STOP");
    for i in 2..40u32 {
        p.send("fan", format!("m{i}")).await.expect("publish");
    }
    let mut acked = 0;
    while acked < 40 {
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), acked_rx.recv()).await;
        assert!(matches!(got, Ok(Some(_))), "the other member did not ack");
        acked += 1;
    }
    signal("-CONT");
    while lines.len() < 40 {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("only {} lines, the last {:?}", lines.len(), lines.last());
            }
        }
    }
    let out = child.wait_with_output().expect("consume exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seqs: Vec<u64> = seqs_and_attempts(&lines.join("\n"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
}
