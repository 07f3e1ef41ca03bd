//! Tests of the segment log (they reach into its private state: `pub(super)` fields).

use super::direct::*;
use super::format::*;
use super::log::*;
use super::recovery::*;
use super::spares::*;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Reads a whole file.
fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

fn collect(log: &SegmentLog, from: u64) -> Vec<Result<u64, (u64, u64)>> {
    let mut out = Vec::new();
    log.scan(from, |r| {
        out.push(r.map(|(f, _)| f));
        true
    })
    .unwrap();
    out
}

#[test]
fn append_scan_reopen_and_truncate_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    {
        let mut log = SegmentLog::open(&p).unwrap();
        assert_eq!(
            log.append_chunk(3, &[Bytes::from_static(b"abc")]).unwrap(),
            1
        );
        assert_eq!(
            log.append_chunk(2, &[Bytes::from_static(b"d"), Bytes::from_static(b"e")])
                .unwrap(),
            4
        );
        log.sync().unwrap();
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(4)]);
        assert_eq!(collect(&log, 4), vec![Ok(4)]);
        assert_eq!(collect(&log, 5), vec![Ok(4)]);
        assert_eq!(collect(&log, 6), vec![]);
    }
    // A torn write at the end: half a chunk.
    let seg = p.join(format!("{:020}.seg", 1));
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&header_of(MAGIC, 6, 1, 4, &[Bytes::from_static(b"zzzz")])[..10])
        .unwrap();
    drop(f);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 5);
    assert_eq!(read_all(&seg).len() as u64, log.size());
    assert_eq!(collect(&log, 1).len(), 2);
}

fn pattern(n: usize, salt: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8 ^ salt).collect::<Vec<u8>>())
}

/// A log with direct writes on holding a small chunk (so the big one starts unaligned), a
/// big chunk in two parts and a small chunk, nothing synced yet.
fn log_with_a_big_chunk(p: &Path) -> (SegmentLog, Vec<Bytes>) {
    let mut log = SegmentLog::open(p).unwrap();
    log.set_direct_writes(true);
    log.append_chunk(1, &[Bytes::from_static(b"small")])
        .unwrap();
    let big = vec![pattern(1000, 1), pattern(DIRECT_MIN + 5000, 2)];
    assert_eq!(log.append_chunk(1, &big).unwrap(), 2);
    log.append_chunk(1, &[Bytes::from_static(b"after")])
        .unwrap();
    (log, big)
}

fn bodies(log: &SegmentLog) -> Vec<Result<(u64, Bytes), (u64, u64)>> {
    let mut out = Vec::new();
    log.scan(1, |r| {
        out.push(r);
        true
    })
    .unwrap();
    out
}

#[test]
fn the_sync_writes_the_middle_of_a_big_chunk_directly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let (mut log, big) = log_with_a_big_chunk(&p);
    // Before its sync the chunk has a hole (nothing reads it then: reads stop at the
    // durable seq).
    assert_eq!(bodies(&log)[1], Err((2, 3)));
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!(job.direct.len(), 1);
    let d = job.direct[0].clone();
    job.run().unwrap();
    assert!(d.is_done());
    assert!(
        d.chunk.lock().unwrap().is_none(),
        "the payload is let go once written"
    );
    let whole: Vec<u8> = big.iter().flat_map(|b| b.iter().copied()).collect();
    let check = |log: &SegmentLog| {
        let got = bodies(log);
        assert!(got.len() >= 3);
        assert_eq!(got[0].as_ref().unwrap().1, Bytes::from_static(b"small"));
        assert_eq!(got[1].as_ref().unwrap().1, Bytes::from(whole.clone()));
        assert_eq!(got[2].as_ref().unwrap().1, Bytes::from_static(b"after"));
    };
    check(&log);
    // The next sync has no direct write left to make.
    let mut next = crate::store::SyncJob::default();
    log.append_chunk(1, &[Bytes::from_static(b"more")]).unwrap();
    log.take_sync(&mut next).unwrap();
    assert!(next.direct.is_empty());
    next.run().unwrap();
    drop(log);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 4);
    check(&log);
}

#[test]
fn a_busy_topic_gets_spares_and_a_quiet_one_none() {
    const SIZE: u64 = 4 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let spares = Spares::open(dir.path().join("spare"), SIZE).unwrap();
    let spare_files = || std::fs::read_dir(dir.path().join("spare")).unwrap().count();
    assert_eq!(spare_files(), 0, "none made at open");
    let p = dir.path().join("t");
    let seg = |first: u64| p.join(format!("{first:020}.seg"));
    let wait_ready = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !spares.is_ready() {
            assert!(std::time::Instant::now() < deadline, "no spare made {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let mut log = SegmentLog::open(&p).unwrap();
    log.segment_bytes = SIZE;
    log.set_spares(Some(spares.clone()));
    // Quiet: a few small chunks ask for no spare, and the segment grows by zero steps.
    for _ in 0..3 {
        log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
    }
    assert!(
        file_len(&seg(1)) < 2 * ZERO_STEP,
        "only the zeros written ahead"
    );
    assert!(!log.busy && !spares.lock().preparing && spare_files() == 0);
    // Busy (a MiB within a second): a spare is made, and the next chunk once it is ready
    // starts the next segment from it, early.
    let mut n = 3;
    while !log.busy {
        n += 1;
        assert!(n < 1000, "5 MB written and the topic is not busy");
        log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
    }
    wait_ready("for a busy topic");
    n += 1;
    log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
    assert_eq!(log.segments.len(), 2, "rolled early into the spare");
    assert!(log.segments[1].from_spare);
    assert_eq!(file_len(&seg(n)), SIZE, "the new segment is the spare");
    // The next one is asked for once the spare segment is three quarters full, and the
    // segment, once full, rolls into it.
    assert!(!spares.lock().preparing && !spares.is_ready());
    while log.segments[1].len < SIZE / 4 * 3 {
        n += 1;
        log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
    }
    wait_ready("at three quarters");
    while log.segments.len() == 2 {
        n += 1;
        log.append_chunk(1, &[pattern(5000, n as u8)]).unwrap();
    }
    assert!(log.segments[2].from_spare);
    log.sync().unwrap();
    drop(log);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), n);
    assert!(bodies(&log).iter().all(Result::is_ok));
}

#[test]
fn at_open_the_last_segment_keeps_only_the_checked_zeros_and_no_stale_group_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let seg = p.join(format!("{:020}.seg", 1));
    let end = {
        let mut log = SegmentLog::open(&p).unwrap();
        log.put_group("g", Bytes::from_static(b"now")).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
        log.sync().unwrap();
        log.segments[0].len
    };
    // Left by a crash: 2 MiB of zeros, then an old group record and an old chunk.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(end + 4 * TAIL_CHECK).unwrap();
    let old = group_body("g", b"old");
    let at = end + 2 * TAIL_CHECK;
    f.write_all_at(
        &header_of(GROUP_MAGIC, 2, 0, old.len(), std::slice::from_ref(&old)),
        at,
    )
    .unwrap();
    f.write_all_at(&old, at + HEADER as u64).unwrap();
    drop(f);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 1);
    assert_eq!(
        file_len(&seg),
        end + TAIL_CHECK,
        "cut after what was checked"
    );
    assert_eq!(log.group("g").map(|b| &b[..]), Some(&b"now"[..]));
    drop(log);
    // A stale group record right after the data (a seq that is not the next one) ends the
    // log there: the tail is torn and cut.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    let stale = header_of(GROUP_MAGIC, 7, 0, old.len(), std::slice::from_ref(&old));
    f.write_all_at(&stale, end).unwrap();
    f.write_all_at(&old, end + HEADER as u64).unwrap();
    drop(f);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.group("g").map(|b| &b[..]), Some(&b"now"[..]));
    assert_eq!(file_len(&seg), end, "torn tail truncated");
}

#[test]
fn a_spare_that_cannot_be_put_in_place_stops_the_spares() {
    const SIZE: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let spares = Spares::open(dir.path().join("spare"), SIZE).unwrap();
    spares.make_one_now().expect("make a spare");
    // Gone from under us: the rename fails.
    for e in std::fs::read_dir(dir.path().join("spare")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let p = dir.path().join("t");
    let mut log = SegmentLog::open(&p).unwrap();
    log.segment_bytes = SIZE;
    log.set_spares(Some(spares.clone()));
    log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
    assert_eq!(log.last_seq(), 1, "the segment started empty instead");
    assert!(spares.lock().broken);
    spares.prepare_soon();
    assert!(!spares.lock().preparing, "no more spares are made");
}

#[test]
fn a_big_first_chunk_does_not_take_a_spare_and_leftovers_are_cleaned() {
    const SIZE: u64 = 512 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("spare");
    std::fs::create_dir_all(&sdir).unwrap();
    std::fs::write(sdir.join("00000000000000000007.tmp"), b"half made").unwrap();
    std::fs::write(sdir.join("00000000000000000003.spare"), b"wrong size").unwrap();
    let spares = Spares::open(sdir.clone(), SIZE).unwrap();
    assert_eq!(
        std::fs::read_dir(&sdir).unwrap().count(),
        0,
        "leftovers removed, none made"
    );
    spares.make_one_now().expect("make a spare");
    let p = dir.path().join("t");
    let mut log = SegmentLog::open(&p).unwrap();
    log.segment_bytes = SIZE;
    log.set_spares(Some(spares));
    log.append_chunk(1, &[pattern(DIRECT_MIN, 1)]).unwrap();
    assert!(file_len(&p.join(format!("{:020}.seg", 1))) < SIZE);
    assert_eq!(
        std::fs::read_dir(&sdir).unwrap().count(),
        1,
        "the spare is still there"
    );
}

#[test]
fn a_crash_before_the_direct_write_cuts_the_chunk_and_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    // Written, never synced: what a kill -9 leaves in the page cache.
    drop(log_with_a_big_chunk(&p));
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(
        log.last_seq(),
        1,
        "the unacknowledged chunks after the hole are cut"
    );
    assert_eq!(bodies(&log).len(), 1);
    assert_eq!(
        read_all(&p.join(format!("{:020}.seg", 1))).len() as u64,
        log.size()
    );
}

#[test]
fn a_roll_makes_the_direct_writes_of_the_segment_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    {
        let (mut log, _) = log_with_a_big_chunk(&p);
        log.segment_bytes = 1000;
        // Rolls: the first segment's direct write is made on the way.
        log.append_chunk(1, &[Bytes::from_static(b"next")]).unwrap();
        assert_eq!(log.segments.len(), 2);
    }
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 4);
    assert!(bodies(&log).iter().all(Result::is_ok));
}

#[test]
fn a_failed_roll_leaves_the_direct_writes_to_the_sync_of_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let (mut log, _) = log_with_a_big_chunk(&p);
    // The big chunk's direct write will fail: its handle cannot write.
    let seg = log.segments.last_mut().unwrap();
    let d = seg.direct[0].0.clone();
    let chunk = d.chunk.lock().unwrap().clone();
    seg.direct[0].0 = Arc::new(DirectWrite {
        file: Arc::new(File::open(&seg.path).unwrap()),
        path: d.path.clone(),
        offset: d.offset,
        from: d.from,
        to: d.to,
        chunk: std::sync::Mutex::new(chunk),
        done: AtomicBool::new(false),
    });
    log.segment_bytes = 1000;
    assert!(log.append_chunk(1, &[Bytes::from_static(b"next")]).is_err());
    // The sync of the chunks already written still has to make it, and fails.
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!(job.direct.len(), 1);
    assert!(job.run().is_err());
}

#[test]
fn a_full_resync_makes_the_direct_writes_a_lost_job_held() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let (mut log, _) = log_with_a_big_chunk(&p);
    // A sync thread took the job and never ran it (the store restarted meanwhile).
    let mut lost = crate::store::SyncJob::default();
    log.take_sync(&mut lost).unwrap();
    drop(lost);
    log.mark_dirty();
    log.sync().unwrap();
    assert!(bodies(&log).iter().all(Result::is_ok));
    drop(log);
    assert_eq!(SegmentLog::open(&p).unwrap().last_seq(), 3);
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn group_records_survive_reopen_and_ride_along_into_new_segments() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    {
        let mut log = SegmentLog::open(&p).unwrap();
        // A group before any message: the first segment is created for it.
        log.put_group("g1", Bytes::from_static(b"one")).unwrap();
        log.segment_bytes = 200;
        log.append_chunk(1, &[Bytes::from(vec![7u8; 150])]).unwrap();
        log.put_group("g2", Bytes::from_static(b"two")).unwrap();
        log.put_group("g1", Bytes::from_static(b"one-b")).unwrap();
        // Past 200 bytes: the next chunk rolls, and the new segment starts with both records.
        log.append_chunk(2, &[Bytes::from(vec![8u8; 300])]).unwrap();
        log.sync().unwrap();
        assert_eq!(log.segments.len(), 2);
        assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
    }
    // The first segment alone would no longer be needed for the groups.
    std::fs::remove_file(p.join(format!("{:020}.seg", 1))).unwrap();
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 3);
    assert_eq!(log.group("g1").unwrap().as_ref(), b"one-b");
    assert_eq!(log.group("g2").unwrap().as_ref(), b"two");
    assert_eq!(collect(&log, 2), vec![Ok(2)]);
}

#[test]
fn a_sync_covers_every_segment_written_since_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = SegmentLog::open(&dir.path().join("t")).unwrap();
    log.segment_bytes = 200;
    // Four chunks of 300 bytes: four segments, none synced yet.
    for _ in 0..4 {
        log.append_chunk(1, &[Bytes::from(vec![1u8; 300])]).unwrap();
    }
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!(job.files.len(), 4);
    log.append_chunk(1, &[Bytes::from(vec![1u8; 300])]).unwrap();
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!(job.files.len(), 1, "only the segment written since");
    log.mark_dirty();
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!(job.files.len(), 5, "after a failure, all of them again");
}

#[test]
fn zeros_written_ahead_are_kept_and_a_torn_group_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let seg = p.join(format!("{:020}.seg", 1));
    {
        let mut log = SegmentLog::open(&p).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"m")]).unwrap();
        log.put_group("g", Bytes::from_static(b"r1")).unwrap();
        log.sync().unwrap();
        assert!(file_len(&seg) >= ZERO_STEP, "zeros written ahead");
    }
    let data_end = {
        let log = SegmentLog::open(&p).unwrap();
        assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
        assert!(file_len(&seg) >= ZERO_STEP, "a tail of zeros is kept");
        log.segments[0].len
    };
    // A torn group record in the zeros: only its first bytes made it.
    let h = header_of(GROUP_MAGIC, 2, 0, 5, &[group_body("g", b"r2")]);
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&h, data_end).unwrap();
    drop(f);
    let mut log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    assert_eq!(file_len(&seg), data_end, "torn tail truncated");
    log.put_group("g", Bytes::from_static(b"r3")).unwrap();
    log.append_chunk(1, &[Bytes::from_static(b"n")]).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.group("g").unwrap().as_ref(), b"r3");
    assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
}

#[test]
fn corrupt_chunk_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let mut log = SegmentLog::open(&p).unwrap();
    log.append_chunk(2, &[Bytes::from_static(b"hello")])
        .unwrap();
    log.append_chunk(1, &[Bytes::from_static(b"world")])
        .unwrap();
    let seg = p.join(format!("{:020}.seg", 1));
    let mut bytes = read_all(&seg);
    bytes[HEADER] ^= 0xff; // first chunk's body
    std::fs::write(&seg, &bytes).unwrap();
    assert_eq!(collect(&log, 1), vec![Err((1, 3)), Ok(3)]);
}

#[test]
fn a_request_failing_part_way_is_undone_entirely() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let seg = p.join(format!("{:020}.seg", 1));
    let mut log = SegmentLog::open(&p).unwrap();
    log.append_chunk(2, &[Bytes::from_static(b"ab")]).unwrap();
    log.put_group("g", Bytes::from_static(b"r1")).unwrap();
    log.sync().unwrap();
    let len = log.segments[0].len;
    let mark = log.mark();
    // A request of three chunks: the third fails after writing part of itself.
    log.faults.chunks_ok = Some(2);
    log.append_chunk(1, &[Bytes::from_static(b"x")]).unwrap();
    log.append_chunk(1, &[Bytes::from_static(b"y")]).unwrap();
    let e = log
        .append_chunk(1, &[Bytes::from_static(b"z")])
        .unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    log.rollback(mark).unwrap();
    log.faults.chunks_ok = None;
    assert_eq!(log.last_seq(), 2);
    assert_eq!(collect(&log, 1), vec![Ok(1)]);
    assert_eq!(file_len(&seg), len, "cut back to where the request started");
    // The cut is made durable by the next sync (the error reply waits for it).
    assert!(log.is_dirty());
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!((job.files.len(), job.dirs.len()), (1, 0));
    job.run().unwrap();
    // The seqs go to the next request.
    assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"w")]).unwrap(), 3);
    log.sync().unwrap();
    drop(log);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 3);
    assert_eq!(collect(&log, 1), vec![Ok(1), Ok(3)]);
    assert_eq!(
        bodies(&log)[1].as_ref().unwrap().1,
        Bytes::from_static(b"w")
    );
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
}

#[test]
fn a_request_failing_after_a_roll_removes_the_segment_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let mut log = SegmentLog::open(&p).unwrap();
    log.segment_bytes = 300;
    log.put_group("g", Bytes::from_static(b"r1")).unwrap();
    log.append_chunk(1, &[Bytes::from(vec![1u8; 200])]).unwrap();
    log.sync().unwrap();
    let len = log.segments[0].len;
    let mark = log.mark();
    // The second chunk rolls (the first filled the segment); the new segment gets its
    // copy of g's record, then the chunk fails.
    log.faults.chunks_ok = Some(2);
    log.append_chunk(1, &[Bytes::from(vec![2u8; 100])]).unwrap();
    assert!(log.append_chunk(1, &[Bytes::from(vec![3u8; 100])]).is_err());
    assert_eq!(log.segments.len(), 2, "the roll happened");
    let started = log.segments[1].path.clone();
    log.rollback(mark).unwrap();
    log.faults.chunks_ok = None;
    assert!(
        !started.exists(),
        "the segment the request started is removed"
    );
    assert_eq!((log.segments.len(), log.segments[0].len), (1, len));
    assert_eq!(log.last_seq(), 1);
    assert!(!log.copies_pending);
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    // Writing goes on where the request started.
    assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"n")]).unwrap(), 2);
    log.sync().unwrap();
    drop(log);
    let log = SegmentLog::open(&p).unwrap();
    assert_eq!(log.last_seq(), 2);
    assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
}

#[test]
fn a_new_segment_without_a_descriptor_fails_the_request_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let mut log = SegmentLog::open(&p).unwrap();
    let mark = log.mark();
    log.faults.new_segment = Some(libc::EMFILE);
    let e = log
        .append_chunk(1, &[Bytes::from_static(b"a")])
        .unwrap_err();
    assert!(e.is_shortage(), "{e}");
    log.rollback(mark).unwrap();
    log.faults.new_segment = None;
    assert_eq!(std::fs::read_dir(&p).unwrap().count(), 0);
    assert_eq!(log.append_chunk(1, &[Bytes::from_static(b"a")]).unwrap(), 1);
    // The sync of the first segment also makes the new directory durable.
    let mut job = crate::store::SyncJob::default();
    log.take_sync(&mut job).unwrap();
    assert_eq!((job.files.len(), job.dirs.len()), (1, 2));
    job.run().unwrap();
}

#[test]
fn a_chunk_larger_than_can_be_read_back_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let mut log = SegmentLog::open_with(&p, 1000).unwrap();
    log.append_chunk(1, &[Bytes::from_static(b"a")]).unwrap();
    log.put_group("g", Bytes::from_static(b"r1")).unwrap();
    let len = log.segments[0].len;
    let e = log
        .put_group("g", Bytes::from(vec![7u8; 2000]))
        .unwrap_err();
    assert!(e.to_string().contains("read back"), "{e}");
    let e = log
        .append_chunk(
            1,
            &[Bytes::from(vec![7u8; 600]), Bytes::from(vec![8u8; 600])],
        )
        .unwrap_err();
    assert!(e.to_string().contains("read back"), "{e}");
    assert_eq!((log.segments[0].len, log.last_seq()), (len, 1));
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
    log.append_chunk(1, &[Bytes::from_static(b"b")]).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = SegmentLog::open_with(&p, 1000).unwrap();
    assert_eq!(collect(&log, 1), vec![Ok(1), Ok(2)]);
    assert_eq!(log.group("g").unwrap().as_ref(), b"r1");
}

#[test]
fn an_oversized_chunk_left_by_an_older_version_does_not_end_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    let seg = p.join(format!("{:020}.seg", 1));
    // Written with a larger limit (what an older version could write).
    let end = {
        let mut log = SegmentLog::open_with(&p, 1 << 20).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"one")]).unwrap();
        log.put_group("g", Bytes::from_static(b"r1")).unwrap();
        log.put_group("g", Bytes::from(vec![7u8; 5000])).unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"two")]).unwrap();
        log.append_chunk(1, &[Bytes::from(vec![9u8; 3000])])
            .unwrap();
        log.append_chunk(1, &[Bytes::from_static(b"four")]).unwrap();
        log.put_group("h", Bytes::from_static(b"x")).unwrap();
        log.sync().unwrap();
        log.segments[0].len
    };
    // Read back with a smaller one: the chunks after the oversized ones are still there.
    let log = SegmentLog::open_with(&p, 1000).unwrap();
    assert_eq!(log.last_seq(), 4);
    assert_eq!(log.segments[0].len, end, "nothing cut off");
    assert!(file_len(&seg) >= end);
    assert_eq!(
        collect(&log, 1),
        vec![Ok(1), Ok(2), Err((3, 4)), Ok(4)],
        "the message chunk too long to load is reported, not served"
    );
    assert_eq!(
        log.group("g").unwrap().as_ref(),
        b"r1",
        "the previous record"
    );
    assert_eq!(log.group("h").unwrap().as_ref(), b"x");
}
