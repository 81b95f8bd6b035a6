//! Frames written directly from the sending task, with a writer task only as a fallback.
//!
//! The hot path sends many small frames: handing each to a writer task costs a task wake-up per
//! frame. [`DirectWriter::send`] instead writes a frame at once from the caller's task when the
//! stream takes it whole and nothing is queued before it, and only falls back to its writer task
//! when the stream is full. Frame order is kept: once anything is queued, later frames queue
//! behind it until the writer task has flushed it all. Used for lanes (QUIC send streams) and for
//! the worker↔executor Unix socket.
//!
//! A frame with a large shared field (`skyward_proto::codec::shared_bytes`, a task's arguments)
//! is written as chunks and queued by reference: a 256 MiB argument is never copied into the
//! backlog.

use bytes::Bytes;
use serde::Serialize;
use skyward_proto::codec::{self, Frame};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;

/// Frames on a QUIC lane.
pub type LaneWriter = DirectWriter<quinn::SendStream>;

/// Frames on the node-local worker↔executor socket.
pub type UnixFrameWriter = DirectWriter<tokio::net::unix::OwnedWriteHalf>;

/// The stream is closed (its connection ended or a write failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream is closed")]
pub struct WriterClosed;

struct State<W> {
    stream: W,
    /// Bytes waiting for the writer task, in order.
    backlog: Backlog,
    /// The writer task is flushing; direct writes wait their turn behind the backlog.
    flushing: bool,
    closed: bool,
}

/// Queued bytes: small frames gathered into one buffer (one write for many frames), large shared
/// chunks kept as they are.
#[derive(Default)]
struct Backlog {
    chunks: VecDeque<Bytes>,
    /// Small bytes after the last chunk.
    tail: Vec<u8>,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    fn push(&mut self, chunk: Bytes) {
        if chunk.len() < codec::SHARED_MIN {
            self.tail.extend_from_slice(&chunk);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(Bytes::from(std::mem::take(&mut self.tail)));
            }
            self.chunks.push_back(chunk);
        }
    }

    /// The next bytes to write, in order.
    fn pop(&mut self) -> Option<Bytes> {
        self.chunks.pop_front().or_else(|| (!self.tail.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.tail))))
    }
}

struct Shared<W> {
    state: Mutex<State<W>>,
    wake: Notify,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends frames on a stream; clone it freely. Dropping every clone stops its writer task and
/// drops the stream.
pub struct DirectWriter<W> {
    shared: Arc<Shared<W>>,
    _task: Arc<AbortOnDrop>,
}

impl<W> Clone for DirectWriter<W> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared), _task: Arc::clone(&self._task) }
    }
}

impl<W> std::fmt::Debug for DirectWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> DirectWriter<W> {
    /// Take over `stream` and start its writer task on the current runtime.
    pub fn new(stream: W) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { stream, backlog: Backlog::default(), flushing: false, closed: false }),
            wake: Notify::new(),
        });
        let task = tokio::spawn(flush(Arc::clone(&shared)));
        Self { shared, _task: Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// Send one frame holding `message`.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), WriterClosed> {
        let frame = codec::frame_chunks(message).map_err(|_| WriterClosed)?;
        let mut state = self.shared.state.lock().expect("writer lock");
        if state.closed {
            return Err(WriterClosed);
        }
        let direct = !state.flushing && state.backlog.is_empty();
        match frame {
            Frame::Whole(frame) => {
                let written = if direct { state.write_now(&frame)? } else { 0 };
                if written == frame.len() {
                    return Ok(());
                }
                state.backlog.tail.extend_from_slice(&frame[written..]);
            }
            Frame::Chunks(chunks) => {
                let mut chunks = chunks.into_iter();
                if direct {
                    for chunk in chunks.by_ref() {
                        let written = state.write_now(&chunk)?;
                        if written < chunk.len() {
                            state.backlog.push(chunk.slice(written..));
                            break;
                        }
                    }
                }
                for chunk in chunks {
                    state.backlog.push(chunk);
                }
                if state.backlog.is_empty() {
                    return Ok(());
                }
            }
        }
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> State<W> {
    /// Write what the stream takes now, without waiting; how many bytes it took.
    fn write_now(&mut self, bytes: &[u8]) -> Result<usize, WriterClosed> {
        // A no-op waker: if the stream is full, the writer task polls again with its own.
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_write(&mut cx, bytes) {
            Poll::Ready(Ok(n)) => Ok(n),
            Poll::Pending => Ok(0),
            Poll::Ready(Err(_)) => {
                self.closed = true;
                Err(WriterClosed)
            }
        }
    }
}

async fn flush<W: AsyncWrite + Unpin>(shared: Arc<Shared<W>>) {
    loop {
        shared.wake.notified().await;
        loop {
            let chunk = {
                let mut state = shared.state.lock().expect("writer lock");
                if state.backlog.is_empty() {
                    state.flushing = false;
                    break;
                }
                state.flushing = true;
                state.backlog.pop().expect("not empty")
            };
            let mut written = 0;
            while written < chunk.len() {
                let result = std::future::poll_fn(|cx| {
                    let mut state = shared.state.lock().expect("writer lock");
                    Pin::new(&mut state.stream).poll_write(cx, &chunk[written..])
                })
                .await;
                match result {
                    Ok(n) if n > 0 => written += n,
                    _ => {
                        shared.state.lock().expect("writer lock").closed = true;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_proto::codec::FrameDecoder;
    use skyward_proto::exec::ToExecutor;
    use tokio::io::AsyncReadExt;

    fn call(id: u64, len: usize) -> ToExecutor {
        let args: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + id) as u8).collect();
        ToExecutor::Call { id, name: format!("f{id}"), args: Bytes::from(args).into(), info: None, streaming: false, credit: 0 }
    }

    /// A stream that takes a few KiB at a time: large frames (sent as shared chunks) and small
    /// ones interleaved pile up in the backlog, and must come out whole and in order.
    #[tokio::test]
    async fn frames_keep_their_order_and_bytes_through_the_backlog() {
        let (near, mut far) = tokio::io::duplex(4096);
        let writer = DirectWriter::new(near);
        let sent: Vec<ToExecutor> = (0..12).map(|id| call(id, if id % 3 == 0 { 10 } else { 200_000 + id as usize })).collect();
        for message in &sent {
            writer.send(message).expect("open");
        }
        let mut decoder = FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 3000];
        while got.len() < sent.len() {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), far.read(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0, "stream ended after {} frames", got.len());
            decoder.push(&buf[..n]);
            while let Some(m) = decoder.next::<ToExecutor>("ToExecutor").expect("valid frame") {
                got.push(m);
            }
        }
        assert_eq!(got, sent);
    }
}
