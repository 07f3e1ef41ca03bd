//! The operator's command line of issue 11 against the real binary: `sluice topic`, `sluice
//! group`, `sluice admin events|disconnect-stale`, `sluice publish --id`, and bad input (a
//! clear error, a non-zero exit, nothing changed).
mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Runs `sluice args` and returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = sluice().args(args).output().expect("run sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sluice args` (with `--addr`), which must succeed and print one JSON object.
fn json(addr: &str, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend_from_slice(&["--addr", addr, "--json"]);
    let (ok, out, err) = run(&full);
    assert!(ok, "sluice {full:?} failed: {err}");
    assert_eq!(out.lines().count(), 1, "one line from {full:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{full:?} printed {out:?}: {e}"))
}

/// Runs `sluice args` (with `--addr`), which must fail with a message containing `needle`.
fn fails(addr: &str, args: &[&str], needle: &str) -> String {
    let mut full = args.to_vec();
    full.extend_from_slice(&["--addr", addr]);
    let (ok, out, err) = run(&full);
    assert!(!ok, "sluice {full:?} succeeded: {out}");
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert!(
        err.contains(needle),
        "sluice {full:?}: {needle:?} not in {err}"
    );
    err
}

/// Lines of a child's stdout, read on a thread.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(args: &[&str]) -> Lines {
        let mut child = sluice()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { child, rx }
    }

    fn next(&self, wait: Duration) -> Option<String> {
        self.rx.recv_timeout(wait).ok()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every client command and subcommand takes `--addr` and `--json`.
#[test]
fn every_command_takes_addr_and_json() {
    for path in [
        &["publish"][..],
        &["consume"],
        &["stats"],
        &["topic", "create"],
        &["topic", "alter"],
        &["topic", "info"],
        &["topic", "list"],
        &["topic", "delete"],
        &["group", "list"],
        &["group", "info"],
        &["group", "seek"],
        &["group", "delete"],
        &["admin", "events"],
        &["admin", "disconnect-stale"],
    ] {
        let mut args = path.to_vec();
        args.push("--help");
        let (ok, out, err) = run(&args);
        assert!(ok, "{args:?}: {err}");
        for flag in ["--addr", "--json"] {
            assert!(out.contains(flag), "{path:?} has no {flag}:\n{out}");
        }
    }
}

/// Bad input: a clear error naming what is wrong, a non-zero exit, and nothing sent (the
/// broker's groups and topics are unchanged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_error_and_changes_nothing() {
    let b = TestBroker::start();
    let addr = b.addr();
    let groups = || {
        let (ok, out, err) = run(&["stats", "--addr", &addr, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).expect("stats")["groups"].clone()
    };
    let before = groups();
    for (args, needle) in [
        (
            &["topic", "create", "--topic", "t", "--max-bytes", "-5"][..],
            "negative",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-bytes", "lots"],
            "lots",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-bytes", "10"],
            "max_bytes",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-bytes", "2000TiB"],
            "max_bytes",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-age", "soon"],
            "soon",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-age", "-1d"],
            "--max-age",
        ),
        (
            &["topic", "create", "--topic", "t", "--max-messages", "-1"],
            "--max-messages",
        ),
        (
            &["topic", "create", "--topic", "t", "--discard", "never"],
            "never",
        ),
        (
            &["topic", "create", "--topic", "t", "--dedup-window", "30d"],
            "dedup_window",
        ),
        (&["topic", "alter", "t", "--backoff", "1s,later"], "later"),
        (&["topic", "info"], "--topic"),
        (&["topic", "info", "a/b"], "topic name"),
        (&["group", "seek", "--topic", "t", "--group", "g"], "--to-"),
        (
            &[
                "group",
                "seek",
                "--topic",
                "t",
                "--group",
                "g",
                "--to-time",
                "yesterday",
            ],
            "yesterday",
        ),
        (
            &[
                "group",
                "seek",
                "--topic",
                "t",
                "--group",
                "g",
                "--to-start",
                "--to-end",
            ],
            "cannot be used with",
        ),
        (
            &["group", "info", "--topic", "t", "--group", "a b"],
            "group name",
        ),
        (&["admin", "events", "--kind", "nope"], "nope"),
        (
            &["admin", "disconnect-stale", "--older-than", "a while"],
            "a while",
        ),
        (
            &[
                "consume",
                "--topic",
                "t",
                "--group",
                "g",
                "--mode",
                "roundrobin",
            ],
            "roundrobin",
        ),
        (
            &[
                "consume",
                "--topic",
                "t",
                "--group",
                "g",
                "--backoff",
                "1s,x",
            ],
            "'x'",
        ),
        (
            &[
                "publish",
                "--topic",
                "t",
                "--id",
                &"i".repeat(129),
                "--payload",
                "x",
            ],
            "--id",
        ),
        (
            &["publish", "--topic", "t", "--id", "x", "--count", "2"],
            "cannot be used with",
        ),
    ] {
        fails(&addr, args, needle);
    }
    assert_eq!(before, groups(), "nothing changed");
    assert!(b
        .data_dir()
        .join("topics")
        .read_dir()
        .map_or(true, |mut d| d.next().is_none()));
}

/// `group list|info --json`: a group made by consuming is listed with its cursor; after a
/// restart, with no consumer, it is listed from its stored record (`loaded: false`); an
/// unknown group is `2001 UNKNOWN_GROUP`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_list_and_info_show_loaded_and_stored_groups() {
    let mut b = TestBroker::start();
    let addr = b.addr();
    let (ok, _, err) = run(&[
        "publish", "--addr", &addr, "--topic", "orders", "--count", "10", "--size", "8",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&[
        "consume", "--addr", &addr, "--topic", "orders", "--group", "billing", "--count", "4",
    ]);
    assert!(ok, "{err}");
    let list = json(&addr, &["group", "list"]);
    let groups = list["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{list}");
    let g = &groups[0];
    assert_eq!(
        (
            g["topic"].as_str(),
            g["group"].as_str(),
            g["acked_floor"].as_u64()
        ),
        (Some("orders"), Some("billing"), Some(4))
    );
    assert_eq!(
        (g["head_seq"].as_u64(), g["lag"].as_u64()),
        (Some(10), Some(6))
    );
    let info = json(
        &addr,
        &["group", "info", "--topic", "orders", "--group", "billing"],
    );
    assert_eq!(info["group"], "billing");
    assert_eq!(info["acked_floor"], 4);

    b.restart();
    let addr = b.addr();
    let list = json(&addr, &["group", "list", "--topic", "orders"]);
    let g = &list["groups"][0];
    assert_eq!(
        (
            g["group"].as_str(),
            g["acked_floor"].as_u64(),
            g["loaded"].as_bool()
        ),
        (Some("billing"), Some(4), Some(false)),
        "{list}"
    );
    assert_eq!(
        json(&addr, &["group", "list", "--topic", "other"])["groups"],
        Value::Array(vec![])
    );
    let (ok, text, err) = run(&["group", "list", "--addr", &addr]);
    assert!(ok, "{err}");
    assert!(
        text.contains("billing") && text.contains("LOADED"),
        "{text}"
    );
    fails(
        &addr,
        &["group", "info", "--topic", "orders", "--group", "nobody"],
        "2001 UNKNOWN_GROUP",
    );
}

/// `admin events --json` prints one object per line with `kind` and `at_ms`, for events caused
/// for real (a registry restart); the readable form names the kind and the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_events_tails_events_caused_for_real() {
    let b = TestBroker::start_with(&["--enable-fault-injection"]);
    let addr = b.addr();
    let admin = sluice_sdk::Admin::connect(client_config(&addr, "admin"))
        .await
        .expect("admin");
    for json_mode in [true, false] {
        let mut args = vec!["admin", "events", "--addr", &addr, "--count", "3"];
        if json_mode {
            args.push("--json");
        }
        let lines = Lines::spawn(&args);
        // The subscription is live once a fault shows up.
        let deadline = Instant::now() + T;
        let mut got = Vec::new();
        while got.is_empty() {
            assert!(Instant::now() < deadline, "no event printed");
            admin.fault("registry").await.expect("fault");
            if let Some(l) = lines.next(Duration::from_millis(300)) {
                got.push(l);
            }
        }
        while got.len() < 3 {
            admin.fault("registry").await.expect("fault");
            got.push(lines.next(T).expect("an event line"));
        }
        for line in &got {
            if json_mode {
                let v: Value = serde_json::from_str(line).expect("one JSON object per line");
                assert_eq!(v["kind"], "actor_restarted", "{line}");
                assert_eq!(v["actor"], "registry", "{line}");
                assert!(
                    v["at_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000),
                    "{line}"
                );
            } else {
                assert!(
                    line.contains("  actor_restarted  actor=registry  count="),
                    "{line}"
                );
            }
        }
        // --count 3: it exits by itself.
        let mut lines = lines;
        let status = wait_child(&mut lines.child);
        assert!(status.success());
    }
}

fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `admin disconnect-stale --older-than DUR --json`: one object listing the consumers
/// disconnected (none on an idle broker); a consumer holding a batch without acking, with
/// lag, is disconnected and its message goes to another consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_stale_from_the_command_line() {
    let b = TestBroker::start();
    let addr = b.addr();
    let v = json(&addr, &["admin", "disconnect-stale", "--older-than", "5m"]);
    assert_eq!(v["disconnected"], Value::Array(vec![]), "{v}");
    let (ok, out, err) = run(&[
        "admin",
        "--addr",
        &addr,
        "disconnect-stale",
        "--older-than",
        "1s",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "no stale consumer\n");

    let (ok, _, err) = run(&[
        "publish", "--addr", &addr, "--topic", "slow", "--count", "5", "--size", "8",
    ]);
    assert!(ok, "{err}");
    let config = |id: &str| {
        sluice_sdk::ConsumerConfig::new(client_config(&addr, id), "slow", "g")
            .window(1)
            .batch_size(1)
    };
    let mut stuck = sluice_sdk::Consumer::subscribe(config("stuck"))
        .await
        .expect("subscribe");
    let held = next_message(&mut stuck, T).await;
    // Idle for 300 ms at least: ask until the broker finds it so.
    let deadline = Instant::now() + T;
    let gone = loop {
        let v = json(
            &addr,
            &["admin", "disconnect-stale", "--older-than", "300ms"],
        );
        let list = v["disconnected"].as_array().cloned().unwrap_or_default();
        if !list.is_empty() {
            break list;
        }
        assert!(Instant::now() < deadline, "never found stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(gone.len(), 1, "{gone:?}");
    let c = &gone[0];
    assert_eq!(
        (c["topic"].as_str(), c["group"].as_str()),
        (Some("slow"), Some("g"))
    );
    assert!(
        c["consumer"].as_str().is_some_and(|s| s.contains(':')),
        "{c}"
    );
    assert!(c["idle_ms"].as_u64().is_some_and(|ms| ms >= 300), "{c}");
    assert!(c["lag"].as_u64().is_some_and(|lag| lag >= 1), "{c}");
    // Its batch went back: another consumer gets the held message.
    let mut other = sluice_sdk::Consumer::subscribe(config("other"))
        .await
        .expect("subscribe");
    let again = next_message(&mut other, T).await;
    assert_eq!(again.seq(), held.seq());
    drop(stuck);
}

/// `topic create|info|list|alter|delete --json`, the topic positional or by flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_from_the_command_line() {
    let b = TestBroker::start();
    let addr = b.addr();
    let created = json(
        &addr,
        &[
            "topic",
            "create",
            "--topic",
            "orders",
            "--max-age",
            "7d",
            "--max-bytes",
            "1GiB",
            "--discard",
            "acked",
            "--dedup-window",
            "5m",
            "--backoff",
            "1s,5s",
        ],
    );
    assert_eq!(created["topic"], "orders");
    assert_eq!(created["settings"]["max_age_ms"], 7 * 86_400_000u64);
    assert_eq!(created["settings"]["max_bytes"], 1u64 << 30);
    assert_eq!(created["settings"]["discard"], "acked");
    assert_eq!(created["settings"]["dedup_window_ms"], 300_000);
    assert_eq!(
        created["settings"]["backoff_ms"],
        serde_json::json!([1000, 5000])
    );
    fails(&addr, &["topic", "create", "orders"], "2008 TOPIC_EXISTS");

    let (ok, _, err) = run(&[
        "publish", "--addr", &addr, "--topic", "orders", "--count", "5", "--size", "16",
    ]);
    assert!(ok, "{err}");
    let info = json(&addr, &["topic", "info", "--topic", "orders"]);
    for key in [
        "topic",
        "head_seq",
        "floor_seq",
        "messages",
        "bytes",
        "segments",
        "groups",
    ] {
        assert!(info.get(key).is_some(), "{key} missing: {info}");
    }
    assert_eq!(
        (
            info["head_seq"].as_u64(),
            info["floor_seq"].as_u64(),
            info["messages"].as_u64()
        ),
        (Some(5), Some(1), Some(5))
    );
    assert!(info["bytes"].as_u64().is_some_and(|n| n > 0));
    assert!(info["segments"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(
        info,
        json(&addr, &["topic", "info", "orders"]),
        "positional topic"
    );

    let altered = json(&addr, &["topic", "alter", "orders", "--max-age", "none"]);
    assert!(
        altered["settings"]["max_age_ms"]
            .as_u64()
            .is_none_or(|v| v == 0),
        "{altered}"
    );
    assert_eq!(altered["settings"]["max_bytes"], 1u64 << 30, "unchanged");
    fails(
        &addr,
        &["topic", "alter", "nope", "--max-age", "1d"],
        "2005 UNKNOWN_TOPIC",
    );

    let list = json(&addr, &["topic", "list"]);
    let names: Vec<&str> = list["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["topic"].as_str())
        .collect();
    assert_eq!(names, vec!["orders"]);

    let gone = json(&addr, &["topic", "delete", "orders"]);
    assert_eq!(
        (gone["topic"].as_str(), gone["messages"].as_u64()),
        (Some("orders"), Some(5))
    );
    fails(&addr, &["topic", "info", "orders"], "2005 UNKNOWN_TOPIC");
    assert_eq!(
        json(&addr, &["topic", "list"])["topics"],
        Value::Array(vec![])
    );
}

/// `publish --id ID --json` twice: the second is a duplicate with the first's seq, and the
/// topic holds one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_an_id_twice_is_a_duplicate() {
    let b = TestBroker::start();
    let addr = b.addr();
    let first = json(
        &addr,
        &[
            "publish",
            "--topic",
            "ids",
            "--id",
            "order-1",
            "--payload",
            "hello",
        ],
    );
    assert_eq!(
        (first["duplicate"].as_bool(), first["first_seq"].as_u64()),
        (Some(false), Some(1))
    );
    let again = json(
        &addr,
        &[
            "publish",
            "--topic",
            "ids",
            "--id",
            "order-1",
            "--payload",
            "hello again",
        ],
    );
    assert_eq!(
        (again["duplicate"].as_bool(), again["first_seq"].as_u64()),
        (Some(true), Some(1))
    );
    let other = json(
        &addr,
        &[
            "publish",
            "--topic",
            "ids",
            "--id",
            "order-2",
            "--payload",
            "x",
        ],
    );
    assert_eq!(
        (other["duplicate"].as_bool(), other["first_seq"].as_u64()),
        (Some(false), Some(2))
    );
    let info = json(&addr, &["topic", "info", "ids"]);
    assert_eq!(info["head_seq"], 2);
}

/// `group seek` to a sequence number and to a time, then `consume` starts exactly there;
/// `group delete` refuses a group with consumers, then deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_seek_and_delete_from_the_command_line() {
    let b = TestBroker::start();
    let addr = b.addr();
    let (ok, _, err) = run(&[
        "publish", "--addr", &addr, "--topic", "s", "--count", "20", "--size", "8",
    ]);
    assert!(ok, "{err}");
    let consume = |n: &str| {
        let (ok, out, err) = run(&[
            "consume", "--addr", &addr, "--topic", "s", "--group", "g", "--count", n, "--json",
        ]);
        assert!(ok, "{err}");
        out.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("json")["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect::<Vec<u64>>()
    };
    assert_eq!(consume("20"), (1..=20).collect::<Vec<_>>());
    let r = json(
        &addr,
        &[
            "group", "seek", "--topic", "s", "--group", "g", "--to-seq", "15",
        ],
    );
    assert_eq!(r["next_seq"], 15);
    assert_eq!(consume("2"), vec![15, 16]);
    // A time after every message: the end.
    let r = json(
        &addr,
        &[
            "group",
            "seek",
            "--topic",
            "s",
            "--group",
            "g",
            "--to-time",
            "-0s",
        ],
    );
    assert_eq!(r["next_seq"], 21);
    let r = json(
        &addr,
        &[
            "group",
            "seek",
            "--topic",
            "s",
            "--group",
            "g",
            "--to-time",
            "1970-01-01T00:00:00Z",
        ],
    );
    assert_eq!(r["next_seq"], 1);
    assert_eq!(consume("1"), vec![1]);
    let r = json(
        &addr,
        &["group", "seek", "--topic", "s", "--group", "g", "--to-end"],
    );
    assert_eq!(r["next_seq"], 21);
    fails(
        &addr,
        &[
            "group", "seek", "--topic", "s", "--group", "g", "--to-seq", "99",
        ],
        "1008 INVALID_REQUEST",
    );
    let (ok, _, err) = run(&[
        "publish",
        "--addr",
        &addr,
        "--topic",
        "s",
        "--payload",
        "late",
    ]);
    assert!(ok, "{err}");
    let mut busy = sluice_sdk::Consumer::subscribe(sluice_sdk::ConsumerConfig::new(
        client_config(&addr, "busy"),
        "s",
        "g",
    ))
    .await
    .expect("subscribe");
    let m = next_message(&mut busy, T).await;
    assert_eq!(
        m.seq(),
        21,
        "the message published after the seek to the end"
    );
    fails(
        &addr,
        &["group", "delete", "--topic", "s", "--group", "g"],
        "2009 GROUP_BUSY",
    );
    drop(busy);
    let deadline = Instant::now() + T;
    let gone = loop {
        let (ok, out, err) = run(&[
            "group", "delete", "--addr", &addr, "--topic", "s", "--group", "g", "--json",
        ]);
        if ok {
            break serde_json::from_str::<Value>(&out).expect("json");
        }
        assert!(
            err.contains("GROUP_BUSY") && Instant::now() < deadline,
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(gone["group"], "g");
    fails(
        &addr,
        &["group", "info", "--topic", "s", "--group", "g"],
        "2001 UNKNOWN_GROUP",
    );
}
