//! The coalescing writer: the connection actor encodes frames into its own buffer and hands the
//! whole buffer over once per turn; this task writes everything queued in one `write_all`. A write
//! that makes no progress for `stall_timeout` aborts the connection (the timer exists only while
//! a write is in progress).

use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Why the writer ended.
#[derive(Debug)]
pub enum WriterEnd {
    /// The handle was dropped and everything queued was written.
    Drained,
    /// The socket failed or stalled.
    Failed(String),
}

/// The actor's side of the writer.
#[derive(Debug)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl WriterHandle {
    /// Queues `chunk` (one or more encoded frames). Returns false when the writer is gone.
    pub fn send(&self, chunk: Bytes) -> bool {
        let n = chunk.len();
        self.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(chunk).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Bytes handed over and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Spawns the writer task on the current tokio runtime. `on_end` runs once when it ends.
pub fn spawn_writer<W>(
    mut io: W,
    stall_timeout: Duration,
    on_end: impl FnOnce(WriterEnd) + Send + 'static,
) -> WriterHandle
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let q = queued.clone();
    tokio::spawn(async move {
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
                Err(_) => {
                    break WriterEnd::Failed(format!("peer did not read for {stall_timeout:?}"))
                }
            }
        };
        on_end(end);
    });
    WriterHandle { tx, queued }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_everything_then_ends_when_dropped() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let h = spawn_writer(a, Duration::from_secs(5), move |end| {
            let _ = done_tx.send(matches!(end, WriterEnd::Drained));
        });
        for i in 0..100u8 {
            assert!(h.send(Bytes::from(vec![i; 10])));
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
        let h = spawn_writer(a, Duration::from_millis(50), move |end| {
            let _ = done_tx.send(matches!(end, WriterEnd::Failed(_)));
        });
        h.send(Bytes::from(vec![0; 1024]));
        assert!(done_rx.await.unwrap());
    }
}
