//! The coalescing writer: the connection actor encodes frames into its own buffer and hands the
//! whole buffer over once per turn; this task writes everything queued in one `write_all`. A write
//! that makes no progress for `stall_timeout` aborts the connection (the timer exists only while
//! a write is in progress).
//!
//! The queue is bounded in bytes: [`WriterHandle::send`] refuses a chunk that would take the
//! bytes handed over and not yet written past the limit (a peer that does not read), and the
//! caller then [`WriterHandle::abort`]s the task, which drops everything queued at once.

use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How a [`WriterEnd::Failed`] from a write that made no progress for the stall timeout
/// begins (the peer does not read).
pub const STALLED: &str = "peer did not read";

/// Why the writer ended.
#[derive(Debug)]
pub enum WriterEnd {
    /// The handle was dropped and everything queued was written.
    Drained,
    /// The socket failed or stalled.
    Failed(String),
}

/// Why [`WriterHandle::send`] refused a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The writer task has ended.
    #[error("the writer has ended")]
    Closed,
    /// Queuing the chunk would take the queue past its limit; nothing was queued.
    #[error(
        "{queued} bytes queued and not yet written, {chunk} more would pass the limit of {limit}"
    )]
    Full {
        /// Bytes queued and not yet written.
        queued: usize,
        /// Size of the refused chunk.
        chunk: usize,
        /// The limit.
        limit: usize,
    },
}

/// The actor's side of the writer.
#[derive(Debug)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    task: AbortHandle,
}

impl WriterHandle {
    /// Queues `chunk` (one or more encoded frames), unless the bytes queued and not yet written
    /// would then exceed the limit.
    pub fn send(&self, chunk: Bytes) -> Result<(), SendError> {
        let n = chunk.len();
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.limit {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(SendError::Full {
                queued: before,
                chunk: n,
                limit: self.limit,
            });
        }
        if self.tx.send(chunk).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(SendError::Closed);
        }
        Ok(())
    }

    /// Bytes handed over and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Ends the task now: what is queued is dropped (not written) and the write half of the
    /// socket is released. `on_end` is not called.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Spawns the writer task on the current tokio runtime. `on_end` runs once when it ends (unless
/// it is aborted). At most `limit` bytes may be queued and not yet written.
pub fn spawn_writer<W>(
    mut io: W,
    stall_timeout: Duration,
    limit: usize,
    on_end: impl FnOnce(WriterEnd) + Send + 'static,
) -> WriterHandle
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let q = queued.clone();
    let task = tokio::spawn(async move {
        let mut merged = BytesMut::new();
        let end = loop {
            let Some(first) = rx.recv().await else {
                let _ = io.shutdown().await;
                break WriterEnd::Drained;
            };
            // Gather whatever else is queued: one syscall for all of it.
            let mut total = first.len();
            let chunk = match rx.try_recv() {
                Err(_) => first,
                Ok(second) => {
                    merged.clear();
                    merged.extend_from_slice(&first);
                    merged.extend_from_slice(&second);
                    total += second.len();
                    while total < 4 * 1024 * 1024 {
                        match rx.try_recv() {
                            Ok(more) => {
                                total += more.len();
                                merged.extend_from_slice(&more);
                            }
                            Err(_) => break,
                        }
                    }
                    merged.split().freeze()
                }
            };
            match tokio::time::timeout(stall_timeout, io.write_all(&chunk)).await {
                Ok(Ok(())) => {
                    q.fetch_sub(total, Ordering::Relaxed);
                }
                Ok(Err(e)) => break WriterEnd::Failed(e.to_string()),
                Err(_) => break WriterEnd::Failed(format!("{STALLED} for {stall_timeout:?}")),
            }
        };
        on_end(end);
    });
    WriterHandle {
        tx,
        queued,
        limit,
        task: task.abort_handle(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_everything_then_ends_when_dropped() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let h = spawn_writer(a, Duration::from_secs(5), 1 << 20, move |end| {
            let _ = done_tx.send(matches!(end, WriterEnd::Drained));
        });
        for i in 0..100u8 {
            assert!(h.send(Bytes::from(vec![i; 10])).is_ok());
        }
        drop(h);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1000);
        assert_eq!(got[999], 99);
        assert!(done_rx.await.unwrap());
    }

    #[tokio::test]
    async fn stalled_peer_aborts() {
        let (a, _b) = tokio::io::duplex(16);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let h = spawn_writer(a, Duration::from_millis(50), 1 << 20, move |end| {
            let _ = done_tx.send(matches!(end, WriterEnd::Failed(_)));
        });
        h.send(Bytes::from(vec![0; 1024])).unwrap();
        assert!(done_rx.await.unwrap());
    }

    #[tokio::test]
    async fn queue_is_bounded_in_bytes_and_abort_releases_the_socket() {
        // The peer reads nothing: 16 bytes fit its buffer, the rest stays queued.
        let (a, mut b) = tokio::io::duplex(16);
        let h = spawn_writer(a, Duration::from_secs(60), 1000, |_| {});
        h.send(Bytes::from(vec![1; 600])).unwrap();
        h.send(Bytes::from(vec![2; 400])).unwrap();
        assert_eq!(
            h.send(Bytes::from(vec![3; 1])),
            Err(SendError::Full {
                queued: 1000,
                chunk: 1,
                limit: 1000
            })
        );
        // Nothing of the refused chunk counts.
        assert_eq!(h.queued_bytes(), 1000);
        h.abort();
        // The write half is dropped: the reader sees what fitted, then the end of the stream.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut got))
            .await
            .expect("socket released after abort")
            .unwrap();
        assert!(got.len() <= 1000 && got.iter().all(|&x| x != 3));
    }
}
