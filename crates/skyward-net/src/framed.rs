//! Length-prefixed frames over quinn streams.

use serde::Serialize;
use serde::de::DeserializeOwned;
use skyward_proto::ProtocolError;
use skyward_proto::codec::{self, FrameDecoder};

/// Errors reading frames from a stream.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
}

/// Reads whole frames from a QUIC receive stream.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    finished: bool,
}

impl FramedRecv {
    /// Wrap `recv`, refusing frames over `max_frame` bytes.
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        Self { recv, decoder: FrameDecoder::new(max_frame), finished: false }
    }

    /// Next message, or `None` once the peer finished the stream cleanly.
    pub async fn next<T: DeserializeOwned>(&mut self, what: &'static str) -> Result<Option<T>, RecvError> {
        loop {
            if let Some(message) = self.decoder.next::<T>(what)? {
                return Ok(Some(message));
            }
            if self.finished {
                if self.decoder.buffered() > 0 {
                    return Err(ProtocolError::Malformed { what, reason: "stream ended inside a frame".into() }.into());
                }
                return Ok(None);
            }
            match self.recv.read_chunk(1024 * 1024, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => self.finished = true,
            }
        }
    }

    /// Change the frame size limit.
    pub fn set_max_frame(&mut self, max: usize) {
        self.decoder.set_max(max);
    }

    /// Bytes read from the stream but not yet returned as frames.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.decoder.take_remaining()
    }

    /// The underlying stream.
    pub fn inner_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.recv
    }
}

/// Encode `messages` into one buffer and write it with a single call.
pub async fn write_frames<T: Serialize>(send: &mut quinn::SendStream, messages: &[T]) -> Result<(), WriteError> {
    let mut buf = Vec::with_capacity(64 * messages.len());
    for m in messages {
        codec::encode_frame(m, &mut buf)?;
    }
    send.write_all(&buf).await?;
    Ok(())
}

/// Errors writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A message could not be encoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Frames on a long-lived QUIC send stream (a lane), written directly from the sending task.
///
/// Like [`crate::unix::UnixFrameWriter`]: a frame is handed to quinn at once when nothing is
/// queued before it and the stream has room; otherwise it joins a backlog that a writer task
/// flushes in order. Saves the writer task's wake-up on every frame of the hot path.
#[derive(Clone)]
pub struct LaneWriter {
    shared: std::sync::Arc<LaneShared>,
    _task: std::sync::Arc<AbortOnDrop>,
}

struct LaneShared {
    state: std::sync::Mutex<LaneState>,
    wake: tokio::sync::Notify,
}

struct LaneState {
    send: quinn::SendStream,
    backlog: Vec<u8>,
    flushing: bool,
    closed: bool,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for LaneWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneWriter").finish_non_exhaustive()
    }
}

/// The lane is closed (its connection ended or a write failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lane is closed")]
pub struct LaneClosed;

impl LaneWriter {
    /// Take over `send` and start its writer task on the current runtime.
    pub fn new(send: quinn::SendStream) -> Self {
        let shared = std::sync::Arc::new(LaneShared {
            state: std::sync::Mutex::new(LaneState { send, backlog: Vec::new(), flushing: false, closed: false }),
            wake: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(lane_flush(std::sync::Arc::clone(&shared)));
        Self { shared, _task: std::sync::Arc::new(AbortOnDrop(task.abort_handle())) }
    }

    /// Send one frame holding `message`.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), LaneClosed> {
        let frame = codec::frame(message).map_err(|_| LaneClosed)?;
        let mut state = self.shared.state.lock().expect("lane lock");
        if state.closed {
            return Err(LaneClosed);
        }
        if !state.flushing && state.backlog.is_empty() {
            let waker = futures_noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            match std::pin::Pin::new(&mut state.send).poll_write(&mut cx, &frame) {
                std::task::Poll::Ready(Ok(n)) if n == frame.len() => return Ok(()),
                std::task::Poll::Ready(Ok(n)) => state.backlog.extend_from_slice(&frame[n..]),
                std::task::Poll::Pending => state.backlog.extend_from_slice(&frame),
                std::task::Poll::Ready(Err(_)) => {
                    state.closed = true;
                    return Err(LaneClosed);
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

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

async fn lane_flush(shared: std::sync::Arc<LaneShared>) {
    loop {
        shared.wake.notified().await;
        loop {
            let chunk = {
                let mut state = shared.state.lock().expect("lane lock");
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
                    let mut state = shared.state.lock().expect("lane lock");
                    std::pin::Pin::new(&mut state.send).poll_write(cx, &chunk[written..])
                })
                .await;
                match result {
                    Ok(n) => written += n,
                    Err(_) => {
                        shared.state.lock().expect("lane lock").closed = true;
                        return;
                    }
                }
            }
        }
    }
}
