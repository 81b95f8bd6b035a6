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

/// What a reader does with the messages of one [`FramedRecv::handle_batch`].
pub trait Batch<T> {
    /// Handle one message.
    fn message(&mut self, message: T);
    /// End of a stretch of messages (every [`crate::CORK_BATCH`], and the batch's end), just
    /// before the frames sent meanwhile are written: do what was put off for the stretch.
    fn flush(&mut self) {}
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

    /// Handle `first`, then every message to be had without waiting, under one [`crate::Cork`]
    /// (flushed every [`crate::CORK_BATCH`] messages): what the handler sends meanwhile goes out
    /// in one write per stream for the whole batch. Before each of those writes, and at the end,
    /// the handler's [`Batch::flush`] does what it put off over the stretch. A reader calls this
    /// after each `next().await`.
    pub fn handle_batch<T: DeserializeOwned>(
        &mut self,
        what: &'static str,
        first: T,
        handler: &mut impl Batch<T>,
    ) -> Result<(), RecvError> {
        let cork = crate::Cork::new();
        handler.message(first);
        let mut handled = 1usize;
        let read = loop {
            let message = match self.try_next(what) {
                Ok(Some(message)) => message,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            handler.message(message);
            handled += 1;
            if handled.is_multiple_of(crate::CORK_BATCH) {
                handler.flush();
                cork.flush();
            }
        };
        // Also after a bad frame: what was read before it is handled in full.
        handler.flush();
        read
    }

    /// The next message when it can be had without waiting: already buffered, or in data the
    /// stream holds now. `None` means "not yet" (or the end, which [`FramedRecv::next`] reports).
    fn try_next<T: DeserializeOwned>(&mut self, what: &'static str) -> Result<Option<T>, RecvError> {
        use std::future::Future;
        loop {
            if let Some(message) = self.decoder.next::<T>(what)? {
                return Ok(Some(message));
            }
            if self.finished {
                return Ok(None);
            }
            // A no-op waker is safe here: the caller's next `next().await` polls the stream
            // again and registers its own before it waits.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let read = std::pin::pin!(self.recv.read_chunk(1024 * 1024, true));
            match read.poll(&mut cx) {
                std::task::Poll::Ready(Ok(Some(chunk))) => self.decoder.push(&chunk.bytes),
                std::task::Poll::Ready(Ok(None)) => self.finished = true,
                std::task::Poll::Ready(Err(e)) => return Err(e.into()),
                std::task::Poll::Pending => return Ok(None),
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

/// Write one frame holding `message`; its large shared fields (a task's arguments) go to quinn
/// by reference (`codec::frame_chunks`), not copied.
pub async fn write_frame_shared<T: Serialize>(send: &mut quinn::SendStream, message: &T) -> Result<(), WriteError> {
    let mut chunks = codec::frame_chunks(message)?.into_chunks();
    send.write_all_chunks(&mut chunks).await?;
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
