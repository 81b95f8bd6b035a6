//! Frames written directly from the sending task, with a writer task only as a fallback.
//!
//! The hot path sends many small frames: handing each to a writer task costs a task wake-up per
//! frame. [`DirectWriter::send`] instead writes a frame at once from the caller's task when the
//! stream takes it whole and nothing is queued before it, and only falls back to its writer task
//! when the stream is full. Frame order is kept: once anything is queued, later frames queue
//! behind it until the writer task has flushed it all. Used for lanes (QUIC send streams) and for
//! the worker↔executor Unix socket.

use serde::Serialize;
use skyward_proto::codec;
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
    backlog: Vec<u8>,
    /// The writer task is flushing; direct writes wait their turn behind the backlog.
    flushing: bool,
    closed: bool,
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
            state: Mutex::new(State { stream, backlog: Vec::new(), flushing: false, closed: false }),
            wake: Notify::new(),
        });
        let task = tokio::spawn(flush(Arc::clone(&shared)));
        Self { shared, _task: Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// Send one frame holding `message`.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), WriterClosed> {
        let frame = codec::frame(message).map_err(|_| WriterClosed)?;
        let mut state = self.shared.state.lock().expect("writer lock");
        if state.closed {
            return Err(WriterClosed);
        }
        if !state.flushing && state.backlog.is_empty() {
            // A no-op waker: if the stream is full, the writer task polls again with its own.
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(&mut state.stream).poll_write(&mut cx, &frame) {
                Poll::Ready(Ok(n)) if n == frame.len() => return Ok(()),
                Poll::Ready(Ok(n)) => state.backlog.extend_from_slice(&frame[n..]),
                Poll::Pending => state.backlog.extend_from_slice(&frame),
                Poll::Ready(Err(_)) => {
                    state.closed = true;
                    return Err(WriterClosed);
                }
            }
        } else {
            state.backlog.extend_from_slice(&frame);
        }
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
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
                std::mem::take(&mut state.backlog)
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
