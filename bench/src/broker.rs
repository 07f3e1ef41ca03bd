//! A `sluice serve` child process on 127.0.0.1:0 with its own data directory: started, waited
//! for (its `listening ADDR` line), stopped by PID (SIGTERM, then SIGKILL after a timeout).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::sys;

/// Where to find the broker binary: `--sluice-bin`, else `sluice` next to this binary
/// (`target/release/sluice-bench` -> `target/release/sluice`).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("locating the bench binary")?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("bench binary has no directory"))?;
    let cand = dir.join("sluice");
    if cand.is_file() {
        return Ok(cand);
    }
    bail!(
        "no sluice binary at {} (build it: cargo build --release -p sluice, or pass --sluice-bin)",
        cand.display()
    )
}

/// A running broker child.
pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    pub pid: u32,
    /// When `spawn` was called and when the listening line arrived.
    pub spawned_at: Instant,
    pub listening_after: Duration,
    log: PathBuf,
}

impl Broker {
    /// Starts `bin serve --listen 127.0.0.1:0 --data-dir DATA --fsync FSYNC EXTRA...` and waits
    /// up to `wait` for its `listening ADDR` line.
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        log: &Path,
        fsync: &str,
        extra: &[String],
        wait: Duration,
    ) -> Result<Broker> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let spawned_at = Instant::now();
        let mut child = Command::new(bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--fsync", fsync])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf))
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {} // keep draining so the broker never blocks on stdout
        });
        let mut broker = Broker {
            child: Some(child),
            addr: String::new(),
            pid,
            spawned_at,
            listening_after: Duration::ZERO,
            log: log.to_path_buf(),
        };
        let line = match rx.recv_timeout(wait) {
            Ok(l) => l,
            Err(_) => {
                broker.stop(Duration::from_secs(5));
                bail!(
                    "broker did not print its listening line within {wait:?}; log tail:\n{}",
                    broker.log_tail()
                );
            }
        };
        broker.listening_after = spawned_at.elapsed();
        let addr = line
            .strip_prefix("listening ")
            .ok_or_else(|| anyhow!("unexpected first line from the broker: {line:?}"))?
            .trim()
            .to_string();
        if !addr.starts_with("127.") {
            broker.stop(Duration::from_secs(5));
            bail!("broker listens on {addr}, not on loopback");
        }
        broker.addr = addr;
        Ok(broker)
    }

    /// The last lines of the broker's log (without terminal colour codes).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        strip_ansi(&lines[lines.len().saturating_sub(10)..].join("\n"))
    }

    pub fn pid_str(&self) -> String {
        self.pid.to_string()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns true if it exited on SIGTERM.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        sys::signal(self.pid, sys::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        sys::signal(self.pid, sys::SIGKILL);
        let _ = child.wait();
        false
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colour_codes() {
        assert_eq!(
            super::strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "time  WARN x"
        );
    }
}
