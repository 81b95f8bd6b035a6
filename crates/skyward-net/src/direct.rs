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
//!
//! Corking: a reader that handles a batch of frames at once (all the frames one read brought)
//! holds a [`Cork`] while it does. Frames sent on this thread meanwhile are queued, and each
//! writer they went to writes its queue in one go when the cork is dropped: one write (one
//! syscall on a socket) per batch instead of one per frame, and no wait for a frame sent alone.

use bytes::Bytes;
use serde::Serialize;
use skyward_proto::codec::{self, Frame};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;

/// Frames on a QUIC lane.
pub type LaneWriter = DirectWriter<quinn::SendStream>;

/// Frames on the node-local worker↔executor socket.
pub type UnixFrameWriter = DirectWriter<crate::unix::UnixWrite>;

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
    /// Frames sent under a [`Cork`] wait in the backlog; this writer is on the cork's list.
    corked: bool,
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

/// A reader that keeps finding frames flushes its cork every this many, so a long burst is
/// written in batches of this size instead of all at its end.
pub const CORK_BATCH: usize = 64;

thread_local! {
    /// Corks held on this thread (nested corks flush when the outermost is dropped).
    static CORK_DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Writers with frames queued under this thread's cork.
    static CORKED: RefCell<Vec<Arc<dyn Uncork>>> = const { RefCell::new(Vec::new()) };
}

/// While alive, frames sent on this thread through any [`DirectWriter`] are queued, and each
/// writer writes its queue when the (outermost) cork is dropped. Not `Send`: it cannot be held
/// across an `.await` in a spawned task, so frames never wait on a suspended task.
#[must_use = "frames are queued only while the cork is held"]
#[derive(Debug)]
pub struct Cork {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Cork {
    /// Cork this thread's writers until the returned guard is dropped.
    pub fn new() -> Self {
        CORK_DEPTH.set(CORK_DEPTH.get() + 1);
        Cork { _not_send: std::marker::PhantomData }
    }
}

impl Cork {
    /// Write what is queued now, keeping the cork (a batch whose handling takes long should not
    /// hold back the answers it already has). Only the outermost cork flushes.
    pub fn flush(&self) {
        if CORK_DEPTH.get() == 1 {
            uncork_all();
        }
    }
}

fn uncork_all() {
    for writer in CORKED.with_borrow_mut(std::mem::take) {
        writer.uncork();
    }
}

impl Default for Cork {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        let depth = CORK_DEPTH.get() - 1;
        CORK_DEPTH.set(depth);
        if depth == 0 {
            uncork_all();
        }
    }
}

/// A writer with frames queued under a cork.
trait Uncork {
    /// Write what was queued (directly when the stream takes it, else through the writer task).
    fn uncork(&self);
}

impl<W: AsyncWrite + Unpin> Uncork for Shared<W> {
    fn uncork(&self) {
        let mut state = self.state.lock().expect("writer lock");
        state.corked = false;
        if state.closed || state.flushing || state.backlog.is_empty() {
            // Closed: nothing more goes out. Flushing: the writer task takes the queue with it.
            return;
        }
        if state.backlog.chunks.is_empty() {
            let tail = std::mem::take(&mut state.backlog.tail);
            match state.write_now(&tail) {
                Ok(n) if n == tail.len() => return,
                Ok(n) => {
                    let mut rest = tail;
                    rest.drain(..n);
                    state.backlog.tail = rest;
                }
                Err(WriterClosed) => return,
            }
        }
        drop(state);
        self.wake.notify_one();
    }
}

impl<W> DirectWriter<W> {
    /// Whether `other` writes to the same stream.
    pub fn same_stream(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> DirectWriter<W> {
    /// Take over `stream` and start its writer task on the current runtime.
    pub fn new(stream: W) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { stream, backlog: Backlog::default(), flushing: false, closed: false, corked: false }),
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
        if CORK_DEPTH.get() > 0 {
            match frame {
                Frame::Whole(frame) => state.backlog.tail.extend_from_slice(&frame),
                Frame::Chunks(chunks) => chunks.into_iter().for_each(|chunk| state.backlog.push(chunk)),
            }
            if !state.corked {
                state.corked = true;
                let shared: Arc<dyn Uncork> = Arc::clone(&self.shared) as Arc<dyn Uncork>;
                CORKED.with_borrow_mut(|corked| corked.push(shared));
            }
            return Ok(());
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

    /// A stream that takes everything and records each write it was given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.0.lock().expect("recorder").push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Recorder {
        fn writes(&self) -> usize {
            self.0.lock().expect("recorder").len()
        }

        fn frames(&self) -> Vec<ToExecutor> {
            let mut decoder = FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
            self.0.lock().expect("recorder").iter().for_each(|w| decoder.push(w));
            std::iter::from_fn(|| decoder.next::<ToExecutor>("ToExecutor").expect("valid frame")).collect()
        }
    }

    /// Under a cork nothing is written; dropping it writes each writer's frames in one write,
    /// in order. Nested corks write at the outermost; `flush` writes at once; uncorked frames
    /// are written one write each.
    #[tokio::test]
    async fn a_cork_writes_its_frames_in_one_write_when_dropped() {
        let (a, b) = (Recorder::default(), Recorder::default());
        let (to_a, to_b) = (DirectWriter::new(a.clone()), DirectWriter::new(b.clone()));
        let sent: Vec<ToExecutor> = (0..6).map(|id| call(id, 16)).collect();
        {
            let outer = Cork::new();
            to_a.send(&sent[0]).expect("open");
            to_b.send(&sent[1]).expect("open");
            {
                let _inner = Cork::new();
                to_a.send(&sent[2]).expect("open");
            }
            assert_eq!((a.writes(), b.writes()), (0, 0), "an inner cork wrote");
            to_a.send(&sent[3]).expect("open");
            assert_eq!(a.writes(), 0, "a corked frame was written");
            outer.flush();
            assert_eq!((a.writes(), b.writes()), (1, 1), "flush writes each writer's queue once");
            to_a.send(&sent[4]).expect("open");
            assert_eq!(a.writes(), 1, "the cork was lost by flushing");
        }
        assert_eq!(a.writes(), 2, "dropping the cork did not write");
        assert_eq!(a.frames(), vec![sent[0].clone(), sent[2].clone(), sent[3].clone(), sent[4].clone()]);
        assert_eq!(b.frames(), vec![sent[1].clone()]);
        to_a.send(&sent[5]).expect("open");
        assert_eq!(a.writes(), 3, "an uncorked frame waits");
    }

    /// A frame sent from another thread while this thread holds corked frames for the same
    /// writer goes out after them, never before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_from_another_thread_queue_behind_corked_ones() {
        let out = Recorder::default();
        let writer = DirectWriter::new(out.clone());
        let sent: Vec<ToExecutor> = (0..3).map(|id| call(id, 16)).collect();
        let cork = Cork::new();
        writer.send(&sent[0]).expect("open");
        writer.send(&sent[1]).expect("open");
        let other = writer.clone();
        let late = sent[2].clone();
        std::thread::spawn(move || other.send(&late).expect("open")).join().expect("thread");
        drop(cork);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.frames().len() < 3 {
            assert!(std::time::Instant::now() < deadline, "frames were lost: {:?}", out.frames());
            tokio::task::yield_now().await;
        }
        assert_eq!(out.frames(), sent);
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
