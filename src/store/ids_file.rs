//! `<topic dir>/dedup.ids`: the idempotency ids of messages retention removed while their
//! `dedup_window` was still running, so that the dedup index rebuilt at the next start still
//! has them (the segments it is otherwise rebuilt from are gone). See `store/retention.md`,
//! "The dedup index".
//!
//! Format: a header `SLID` `u8` version (1), then entries `stored_ms u64 | seq u64 | id_len u8 |
//! id`, oldest first, then a CRC-32 (`u32`, big endian like everything else) of everything
//! before it. The file is only ever replaced whole (tmp + fsync + rename + fsync of the
//! directory), so a power cut leaves the old file or the new; one failing its CRC is ignored.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file's name in a topic's directory.
pub const FILE: &str = "dedup.ids";
const MAGIC: &[u8; 4] = b"SLID";
const VERSION: u8 = 1;

/// One remembered id: (store time in ms, seq, id).
pub type Entry = (u64, u64, Arc<str>);

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
    if buf.len() < MAGIC.len() + 1 + 4 || &buf[..4] != MAGIC || buf[4] != VERSION {
        return Err(bad("bad header"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(bad("CRC mismatch"));
    }
    let mut out = Vec::new();
    let mut pos = MAGIC.len() + 1;
    while pos < body.len() {
        let Some(head) = body.get(pos..pos + 17) else {
            return Err(bad("truncated entry"));
        };
        let at = u64::from_be_bytes(head[..8].try_into().map_err(|_| bad("entry"))?);
        let seq = u64::from_be_bytes(head[8..16].try_into().map_err(|_| bad("entry"))?);
        let len = head[16] as usize;
        pos += 17;
        let Some(id) = body.get(pos..pos + len) else {
            return Err(bad("truncated id"));
        };
        let id = std::str::from_utf8(id).map_err(|_| bad("id not UTF-8"))?;
        out.push((at, seq, Arc::from(id)));
        pos += len;
    }
    Ok(out)
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
    for (at, seq, id) in entries {
        let Ok(len) = u8::try_from(id.len()) else {
            continue;
        };
        buf.extend_from_slice(&at.to_be_bytes());
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.push(len);
        buf.extend_from_slice(id.as_bytes());
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
    let live = |(at, _, _): &&Entry| at.saturating_add(window_ms) > now_ms;
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
        (at, seq, Arc::from(id))
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
