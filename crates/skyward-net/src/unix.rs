//! Frames over a node-local Unix socket with direct writes.
//!
//! The worker and its executor exchange many small frames. Handing each to a writer task costs a
//! task wake-up per frame; [`UnixFrameWriter::send`] instead writes the frame at once from the
//! caller's task when the socket takes it whole and nothing is queued before it, and only falls
//! back to the writer task when the socket is full. Frame order is kept: once anything is queued,
//! later frames queue behind it until the writer task has flushed it all.

use serde::Serialize;
use skyward_proto::codec;
use std::sync::{Arc, Mutex};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

struct State {
    /// Bytes waiting for the writer task, in order.
    backlog: Vec<u8>,
    /// The writer task owns the socket while it flushes; direct writes wait their turn.
    flushing: bool,
    closed: bool,
}

struct Shared {
    half: OwnedWriteHalf,
    state: Mutex<State>,
    wake: Notify,
}

/// Sends frames on a Unix socket; clone it freely. Dropping every clone stops the writer task.
#[derive(Clone)]
pub struct UnixFrameWriter {
    shared: Arc<Shared>,
    _task: Arc<WriterTask>,
}

struct WriterTask(tokio::task::AbortHandle);

impl Drop for WriterTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for UnixFrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixFrameWriter").finish_non_exhaustive()
    }
}

/// The socket is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the local socket is closed")]
pub struct Closed;

impl UnixFrameWriter {
    /// Take over `half` (and start its writer task on the current runtime).
    pub fn new(half: OwnedWriteHalf) -> Self {
        let shared = Arc::new(Shared {
            half,
            state: Mutex::new(State { backlog: Vec::new(), flushing: false, closed: false }),
            wake: Notify::new(),
        });
        let task = tokio::spawn(flush_loop(Arc::clone(&shared)));
        Self { shared, _task: Arc::new(WriterTask(task.abort_handle())) }
    }

    /// Send one frame holding `message`.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), Closed> {
        let frame = codec::frame(message).map_err(|_| Closed)?;
        let mut state = self.shared.state.lock().expect("unix writer lock");
        if state.closed {
            return Err(Closed);
        }
        if !state.flushing && state.backlog.is_empty() {
            match self.shared.half.try_write(&frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => state.backlog.extend_from_slice(&frame[n..]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => state.backlog.extend_from_slice(&frame),
                Err(_) => {
                    state.closed = true;
                    return Err(Closed);
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

async fn flush_loop(shared: Arc<Shared>) {
    loop {
        shared.wake.notified().await;
        loop {
            let chunk = {
                let mut state = shared.state.lock().expect("unix writer lock");
                if state.backlog.is_empty() {
                    state.flushing = false;
                    break;
                }
                state.flushing = true;
                std::mem::take(&mut state.backlog)
            };
            // `write_all` needs `&mut`; the half is only ever written by this task while
            // `flushing` is set, so write through a shared reference with the ready/try pattern.
            let mut written = 0;
            while written < chunk.len() {
                if shared.half.writable().await.is_err() {
                    shared.state.lock().expect("unix writer lock").closed = true;
                    return;
                }
                match shared.half.try_write(&chunk[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        shared.state.lock().expect("unix writer lock").closed = true;
                        return;
                    }
                }
            }
        }
    }
}
