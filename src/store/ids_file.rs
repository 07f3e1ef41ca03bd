//! `<topic dir>/dedup.ids`: the idempotency ids of messages retention removed while their
//! `dedup_window` was still running, so that the dedup index rebuilt at the next start still
//! has them (the segments it is otherwise rebuilt from are gone). See `store/retention.md`,
//! "The dedup index".
//!
//! Format: a header `SLID` `u8` version, then entries, oldest first, then a CRC-32 (`u32`, big
//! endian like everything else) of everything before it. Version 2 entries: `kind u8` (0: one
//! id, 1: a run) `| stored_ms u64 | seq u64 |` then for one id `id_len u8 | id`, for a run
//! `n u64 | len u64 | producer_len u8 | producer` (the ids `<producer>-<n>` …
//! `<producer>-<n + len - 1>` stored as `seq` … `seq + len - 1`; see `dedup`). Version 1 (read
//! only): entries `stored_ms u64 | seq u64 | id_len u8 | id`. The file is only ever replaced
//! whole (tmp + fsync + rename + fsync of the directory), so a power cut leaves the old file or
//! the new; one failing its CRC is ignored.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dedup::{Held, HeldIds};

/// The file's name in a topic's directory.
pub const FILE: &str = "dedup.ids";
const MAGIC: &[u8; 4] = b"SLID";
const VERSION: u8 = 2;

/// One entry: an id, or a run of a producer's ids.
pub type Entry = Held;

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The entries of `dir`'s file, oldest first (none if it does not exist). `Err` with
/// `InvalidData` when it is damaged.
pub fn load(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let buf = match std::fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    if buf.len() < MAGIC.len() + 1 + 4 || &buf[..4] != MAGIC || !(1..=VERSION).contains(&buf[4]) {
        return Err(bad("bad header"));
    }
    let version = buf[4];
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(bad("CRC mismatch"));
    }
    let mut r = Cursor {
        body,
        pos: MAGIC.len() + 1,
    };
    let mut out = Vec::new();
    while r.pos < body.len() {
        let kind = if version == 1 { 0 } else { r.u8()? };
        let at_ms = r.u64()?;
        let seq = r.u64()?;
        let ids = match kind {
            0 => HeldIds::One(r.name()?),
            1 => {
                let (n, len) = (r.u64()?, r.u64()?);
                HeldIds::Run {
                    n,
                    len,
                    producer: r.name()?,
                }
            }
            _ => return Err(bad("unknown entry kind")),
        };
        out.push(Held { at_ms, seq, ids });
    }
    Ok(out)
}

/// Reads the entries of a file's body.
struct Cursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> std::io::Result<&[u8]> {
        let s = self.body.get(self.pos..self.pos + n).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated entry")
        })?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> std::io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    /// `len u8 | UTF-8 bytes`.
    fn name(&mut self) -> std::io::Result<Arc<str>> {
        let len = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(len)?)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "id not UTF-8"))?;
        Ok(Arc::from(s))
    }
}

/// Replaces `dir`'s file with `entries` (oldest first; ids over 255 bytes are left out),
/// durably; with none, removes it (durably too).
pub fn store(dir: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let file = path(dir);
    if entries.is_empty() {
        return match std::fs::remove_file(&file) {
            Ok(()) => std::fs::File::open(dir)?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
    }
    let mut buf = Vec::with_capacity(5 + entries.len() * 40 + 4);
    buf.extend_from_slice(MAGIC);
    buf.push(VERSION);
    for Held { at_ms, seq, ids } in entries {
        let name = match ids {
            HeldIds::One(id) => id,
            HeldIds::Run { producer, .. } => producer,
        };
        let Ok(len) = u8::try_from(name.len()) else {
            continue;
        };
        buf.push(u8::from(matches!(ids, HeldIds::Run { .. })));
        buf.extend_from_slice(&at_ms.to_be_bytes());
        buf.extend_from_slice(&seq.to_be_bytes());
        if let HeldIds::Run { n, len, .. } = ids {
            buf.extend_from_slice(&n.to_be_bytes());
            buf.extend_from_slice(&len.to_be_bytes());
        }
        buf.push(len);
        buf.extend_from_slice(name.as_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_be_bytes());
    let tmp = dir.join(format!("{FILE}.tmp"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Adds `new` (the ids of messages just removed, oldest first, all with seqs above those held)
/// to `dir`'s file, durably, dropping the entries whose `window_ms` ended by `now_ms` and
/// keeping at most the newest `max` entries.
pub fn add(
    dir: &Path,
    new: &[Entry],
    window_ms: u64,
    now_ms: u64,
    max: usize,
) -> std::io::Result<()> {
    let old = match load(dir) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::warn!(dir = %dir.display(), error = %e, "damaged dedup ids file: replaced");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let live = |h: &&Entry| h.at_ms.saturating_add(window_ms) > now_ms;
    let mut all: Vec<Entry> = old.iter().chain(new).filter(live).cloned().collect();
    if all.len() > max {
        all.drain(..all.len() - max);
    }
    store(dir, &all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(at: u64, seq: u64, id: &str) -> Entry {
        Held {
            at_ms: at,
            seq,
            ids: HeldIds::One(Arc::from(id)),
        }
    }

    fn run(at: u64, seq: u64, producer: &str, n: u64, len: u64) -> Entry {
        Held {
            at_ms: at,
            seq,
            ids: HeldIds::Run {
                producer: Arc::from(producer),
                n,
                len,
            },
        }
    }

    #[test]
    fn runs_and_ids_are_read_back_and_version_1_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            e(100, 1, "a"),
            run(100, 2, "p", 7, 500),
            e(200, 502, "b-01"),
        ];
        store(dir.path(), &entries).unwrap();
        assert_eq!(load(dir.path()).unwrap(), entries);
        // A version 1 file (one id per entry, no kind byte).
        let mut v1 = b"SLID\x01".to_vec();
        for (at, seq, id) in [(100u64, 1u64, "a"), (200, 2, "bb")] {
            v1.extend_from_slice(&at.to_be_bytes());
            v1.extend_from_slice(&seq.to_be_bytes());
            v1.push(id.len() as u8);
            v1.extend_from_slice(id.as_bytes());
        }
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_be_bytes());
        std::fs::write(dir.path().join(FILE), v1).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            vec![e(100, 1, "a"), e(200, 2, "bb")]
        );
    }

    #[test]
    fn entries_are_added_pruned_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty(), "no file: none");
        add(dir.path(), &[e(100, 1, "a"), e(200, 2, "b")], 1000, 300, 10).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            vec![e(100, 1, "a"), e(200, 2, "b")]
        );
        // a's window ended: gone; at most 2 kept, the newest.
        add(dir.path(), &[e(300, 3, "c"), e(400, 4, "d")], 1000, 1100, 2).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            vec![e(300, 3, "c"), e(400, 4, "d")]
        );
        // Every window ended: the file goes.
        add(dir.path(), &[], 1000, 5000, 2).unwrap();
        assert!(!dir.path().join(FILE).exists());
    }

    #[test]
    fn a_damaged_file_is_refused_on_load_and_replaced_on_add() {
        let dir = tempfile::tempdir().unwrap();
        add(dir.path(), &[e(100, 1, "a")], 1000, 100, 10).unwrap();
        let p = dir.path().join(FILE);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 6] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert_eq!(
            load(dir.path()).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        add(dir.path(), &[e(200, 2, "b")], 1000, 200, 10).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![e(200, 2, "b")]);
    }
}
