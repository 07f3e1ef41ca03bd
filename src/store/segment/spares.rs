//! Spare segments: files zeroed and synced ahead of need, for busy topics (see [`Spares`]).

use super::format::write_zeros;
use super::log::{Segment, SegmentLog};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Segment files written with zeros and synced before any topic needs them: a new segment of
/// a topic with small messages is such a spare, renamed into place, so that the fdatasyncs of
/// its appends overwrite blocks that are allocated, written and durable, with no zeros of
/// their own to write back and no block allocation to commit.
///
/// Measured in the broker under W1 (`fsync always`): a sync ran 430-478 µs with zeros
/// written ahead of the data (every ~2.5th sync also wrote back 256 KiB of zeros and
/// committed their allocation), 252-331 µs in a segment zeroed and synced beforehand. A
/// background filler zeroing ahead in the live segment was slower instead (W1 -27%): every
/// sync then committed the block allocations it had just made, and a filler that synced the
/// live file could take a write-back error meant for a sync of data. A spare is a file of its
/// own: its fsync sees only its own errors, and it is synced before it is renamed.
///
/// Two policies (config `preallocate_segment`). **Eager** (the default, [`Spares::preallocate`]):
/// one spare made at start, before requests are taken (the first topic's first segment is that
/// spare), and a busy topic's next one asked for right after each roll, never while a spare
/// segment fills: interleaved with the lazy policy on a fresh broker, W1 +9%, W4 without the
/// mid-run spare's stalls. **Lazy**: spares are made on a thread of their own, only for busy
/// topics: none at start (a fresh data dir stays a few hundred KiB, not 64 MiB), one when a
/// topic of small messages
/// becomes busy (`BUSY_BYTES` written within `BUSY_WINDOW`), and then one for each next
/// segment, asked for when the current spare segment is three quarters full (or at once
/// after a roll that found none ready). A busy topic whose segment did not start from a spare
/// rolls early (from `EARLY_ROLL_MIN` of data on) once a spare is ready, so a busy topic's
/// first segment is small and its next ones are spares, and a spare made late costs only a
/// short segment without one. Making a spare writes and syncs 64 MiB, which slows the appends
/// while it runs (W1 -5.5% in 6 pairs with one made during the run, against +7.6% with none):
/// a fresh broker's first busy topic pays for it once, where an eager spare made at start
/// costs every data dir 64 MiB. A new segment without a ready spare (or of big messages, where
/// writing zeros would double the bytes written) starts empty, with zeros written ahead as
/// before. So a quiet topic never takes 64 MiB on disk.
///
/// At open, the tail after a segment's last valid chunk is checked for zeros over its first
/// `TAIL_CHECK` bytes only, not all 64 MiB of a spare, and the last segment is cut after what
/// was checked: further on, a power cut can have left the unacknowledged rest of a commit
/// (the disk may keep later blocks and lose earlier ones), which must not be read back once
/// new chunks reach it. A group record, always written at the next message's seq, must carry
/// that seq in the last segment. Spares left by an earlier run are removed, not reused (a
/// power cut can undo the rename of one already written to); a spare that cannot be renamed
/// into place is removed and no more are made; none is made with less than eight spare sizes
/// of disk free.
pub struct Spares {
    pub(super) dir: PathBuf,
    pub(super) size: u64,
    pub(super) state: std::sync::Mutex<SpareState>,
    /// Whether a spare is ready, readable without the lock (checked by appends of busy
    /// topics whose segment is not a spare: see [`SegmentLog::roll_if_full`]).
    pub(super) any_ready: AtomicBool,
    /// Preallocating (config `preallocate_segment`): one spare made at start, and a busy
    /// topic's next one asked for right after each roll, not while a spare segment fills
    /// (see [`SegmentLog::note_small_write`]).
    pub(super) eager: AtomicBool,
}

#[derive(Default)]
pub(super) struct SpareState {
    pub(super) ready: Vec<PathBuf>,
    pub(super) preparing: bool,
    pub(super) next: u64,
    /// No more spares are made ([`Spares::unusable`]).
    pub(super) broken: bool,
}

impl Spares {
    /// Opens the spare directory `dir` (creating it) and removes what an earlier run left
    /// there. No spare is made yet ([`Spares::preallocate`] makes one): the first busy topic
    /// asks for one
    /// (`Spares::prepare_soon`).
    ///
    /// Nothing left is reused: a spare renamed into a topic whose rename a power cut undid
    /// is back here with that topic's chunks in it (its appends' fdatasyncs had nothing of the
    /// rename to commit).
    pub fn open(dir: PathBuf, size: u64) -> std::io::Result<Arc<Spares>> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            std::fs::remove_file(entry.path())?;
        }
        Ok(Arc::new(Spares {
            dir,
            size,
            state: std::sync::Mutex::new(SpareState::default()),
            any_ready: AtomicBool::new(false),
            eager: AtomicBool::new(false),
        }))
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, SpareState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready spare, if any.
    pub(super) fn take(&self) -> Option<PathBuf> {
        let mut st = self.lock();
        let spare = st.ready.pop();
        self.any_ready
            .store(!st.ready.is_empty(), Ordering::Release);
        spare
    }

    /// Whether a spare is ready (without taking the lock).
    pub(super) fn is_ready(&self) -> bool {
        self.any_ready.load(Ordering::Acquire)
    }

    /// Preallocating: makes one spare now, on this thread, and asks for the next ones right
    /// after each roll (config `preallocate_segment`, before requests are taken).
    pub fn preallocate(&self) -> std::io::Result<()> {
        self.eager.store(true, Ordering::Release);
        self.make_one_now()
    }

    pub(super) fn is_eager(&self) -> bool {
        self.eager.load(Ordering::Acquire)
    }

    /// Makes a spare now, on this thread (at start with `preallocate_segment`; tests).
    pub fn make_one_now(&self) -> std::io::Result<()> {
        let id = {
            let mut st = self.lock();
            st.next += 1;
            st.next - 1
        };
        let made = self.make(id)?;
        self.put_back(made);
        Ok(())
    }

    /// Returns a spare taken but not used (it could not be opened).
    pub(super) fn put_back(&self, spare: PathBuf) {
        let mut st = self.lock();
        st.ready.push(spare);
        self.any_ready.store(true, Ordering::Release);
    }

    /// A spare could not be put in place (say, `topics/` on another file system): it is
    /// removed, and no more are made.
    pub(super) fn unusable(&self, spare: &Path) {
        let _ = std::fs::remove_file(spare);
        self.lock().broken = true;
    }

    /// Makes one more spare on a thread of its own, unless one is ready or being made.
    pub(super) fn prepare_soon(self: &Arc<Self>) {
        let id = {
            let mut st = self.lock();
            if !st.ready.is_empty() || st.preparing || st.broken {
                return;
            }
            st.preparing = true;
            st.next += 1;
            st.next - 1
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-spare".into())
            .spawn(move || {
                let made = me.make(id);
                let mut st = me.lock();
                st.preparing = false;
                match made {
                    Ok(path) => {
                        st.ready.push(path);
                        me.any_ready.store(true, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare a spare segment: the next one starts empty")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start preparing a spare segment");
            self.lock().preparing = false;
        }
    }

    /// Writes spare `id`: zeros, synced, then renamed from `.tmp` to `.spare`. Through the page
    /// cache on purpose: appends rarely fill whole pages, and a page that is on disk but not
    /// in the cache must be read before part of it can be written (written with `O_DIRECT`,
    /// spares made W1 26% slower).
    pub(super) fn make(&self, id: u64) -> std::io::Result<PathBuf> {
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        let done = self.dir.join(format!("{id:020}.spare"));
        // Never the last free space of the disk: appends and acks need it more.
        let st = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        if st.f_bavail.saturating_mul(st.f_frsize) < self.size.saturating_mul(8) {
            return Err(std::io::Error::other(
                "less than 8 spare sizes of free space",
            ));
        }
        let made = File::create(&tmp).and_then(|file| {
            write_zeros(&file, 0, self.size)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &done)
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(done)
    }
}

/// Written by a busy topic within `BUSY_WINDOW`, in chunks of small messages: the topic gets
/// spares ([`Spares`]).
pub(super) const BUSY_BYTES: u64 = 1024 * 1024;
pub(super) const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// A busy topic's segment that is not a spare rolls into a ready spare once it holds this much.
pub(super) const EARLY_ROLL_MIN: u64 = 1024 * 1024;

impl SegmentLog {
    /// Counts a chunk of small messages towards the busy test; a topic found busy asks for a
    /// spare (see [`Spares`]). No system call but a clock read once per `BUSY_BYTES`.
    pub(super) fn note_small_write(&mut self, n: u64) {
        self.small_bytes += n;
        if self.busy {
            // Lazy: the next spare once the current one is three quarters full: made earlier,
            // its writes slow the appends for longer; made later, the next segment may start
            // without it (and then moves to it early, see `early_roll`). Eager: right after
            // the roll instead (a spare made while a segment fills slows every append to it,
            // and a fresh broker's first segment is a spare already).
            if !self.next_spare_asked
                && self.spares.as_ref().is_some_and(|sp| !sp.is_eager())
                && self
                    .segments
                    .last()
                    .is_some_and(|s| s.from_spare && s.len >= self.segment_bytes / 4 * 3)
            {
                self.next_spare_asked = true;
                if let Some(sp) = &self.spares {
                    sp.prepare_soon();
                }
            }
            return;
        }
        if self.small_bytes - self.busy_window.1 < BUSY_BYTES {
            return;
        }
        let Some(sp) = &self.spares else { return };
        let now = std::time::Instant::now();
        if now.duration_since(self.busy_window.0) <= BUSY_WINDOW {
            self.busy = true;
            // A segment that is a spare already needs none until it fills.
            if !self.segments.last().is_some_and(|s| s.from_spare) {
                sp.prepare_soon();
            }
        } else {
            self.busy_window = (now, self.small_bytes);
        }
    }

    /// Whether the last segment `s`, of a busy topic and not from a spare, rolls into a spare
    /// that is ready (see [`Spares`]).
    pub(super) fn early_roll(&self, s: &Segment) -> bool {
        self.busy
            && !s.from_spare
            && s.len >= EARLY_ROLL_MIN.min(self.segment_bytes)
            && self
                .spares
                .as_ref()
                .is_some_and(|sp| sp.size == self.segment_bytes && sp.is_ready())
    }
}
