//! Length-prefixed frames over quinn streams and local-lane Unix sockets.

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
    /// The socket failed.
    #[error("socket read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What a reader does with the messages of one [`FramedRecv::handle_batch`].
pub trait Batch<T> {
    /// Handle one message.
    fn message(&mut self, message: T);
    /// End of a stretch of messages (every [`crate::CORK_BATCH`], and the batch's end), just
    /// before the frames sent meanwhile are written: do what was put off for the stretch.
    fn flush(&mut self) {}
}

/// Reads whole frames from a QUIC receive stream or a local lane's Unix socket.
#[derive(Debug)]
pub struct FramedRecv {
    source: Source,
    decoder: FrameDecoder,
    finished: bool,
}

/// What a [`FramedRecv`] reads from.
#[derive(Debug)]
enum Source {
    Quic(quinn::RecvStream),
    /// `buf` starts small and doubles, up to [`UNIX_READ_MAX`], each time a read fills it: an
    /// idle or one-call-at-a-time lane holds 2 KiB, not 64 (a coordinator of 1,000 local nodes
    /// has 4,000 lanes).
    Unix {
        read: crate::unix::UnixRead,
        buf: Vec<u8>,
    },
}

/// First read buffer of a Unix-socket [`FramedRecv`].
const UNIX_READ_MIN: usize = 2 * 1024;
/// Largest read buffer of a Unix-socket [`FramedRecv`].
const UNIX_READ_MAX: usize = 64 * 1024;

impl Source {
    /// Read what the stream has into `decoder`, waiting for at least one byte; `false` at its end.
    async fn read_into(&mut self, decoder: &mut FrameDecoder) -> Result<bool, RecvError> {
        match self {
            Source::Quic(recv) => match recv.read_chunk(1024 * 1024, true).await? {
                Some(chunk) => {
                    decoder.push(&chunk.bytes);
                    Ok(true)
                }
                None => Ok(false),
            },
            Source::Unix { read, buf } => {
                use tokio::io::AsyncReadExt;
                let n = read.read(buf).await?;
                decoder.push(&buf[..n]);
                if n == buf.len() && buf.len() < UNIX_READ_MAX {
                    buf.resize(buf.len() * 2, 0);
                }
                Ok(n > 0)
            }
        }
    }
}

impl FramedRecv {
    /// Wrap `recv`, refusing frames over `max_frame` bytes.
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        Self { source: Source::Quic(recv), decoder: FrameDecoder::new(max_frame), finished: false }
    }

    /// Wrap the reading half of a Unix socket (a local lane), refusing frames over `max_frame`.
    pub fn unix(read: crate::unix::UnixRead, max_frame: usize) -> Self {
        let buf = vec![0u8; UNIX_READ_MIN];
        Self { source: Source::Unix { read, buf }, decoder: FrameDecoder::new(max_frame), finished: false }
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
            if !self.source.read_into(&mut self.decoder).await? {
                self.finished = true;
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
            let read = std::pin::pin!(self.source.read_into(&mut self.decoder));
            match read.poll(&mut cx) {
                std::task::Poll::Ready(Ok(true)) => {}
                std::task::Poll::Ready(Ok(false)) => self.finished = true,
                std::task::Poll::Ready(Err(e)) => return Err(e),
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

    /// The underlying QUIC stream (`None` for a Unix socket).
    pub fn quic_mut(&mut self) -> Option<&mut quinn::RecvStream> {
        match &mut self.source {
            Source::Quic(recv) => Some(recv),
            Source::Unix { .. } => None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    struct Collect(Vec<u32>);

    impl Batch<u32> for Collect {
        fn message(&mut self, message: u32) {
            self.0.push(message);
        }
    }

    fn unix_pair(max_frame: usize) -> (FramedRecv, crate::unix::UnixWrite) {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let (read, _) = crate::unix::split(a).expect("split");
        let (_, write) = crate::unix::split(b).expect("split");
        (FramedRecv::unix(read, max_frame), write)
    }

    /// A local lane's reader: frames split across writes, batches of what each read brought,
    /// then the clean end.
    #[tokio::test]
    async fn frames_over_a_unix_socket_arrive_whole_in_order_and_end_cleanly() {
        let (mut recv, mut write) = unix_pair(1024);
        let mut bytes = Vec::new();
        // More than the first read buffer holds: it grows as reads fill it.
        for n in 0..20_000u32 {
            codec::encode_frame(&n, &mut bytes).expect("encode");
        }
        // Half a frame first: nothing to return until the rest comes.
        write.write_all(&bytes[..3]).await.expect("write");
        let rest = bytes[3..].to_vec();
        let writer = tokio::spawn(async move {
            write.write_all(&rest).await.expect("write");
            // Dropping the writer ends the stream.
        });
        let mut got = Collect(Vec::new());
        while let Some(first) = recv.next::<u32>("u32").await.expect("frame") {
            recv.handle_batch("u32", first, &mut got).expect("batch");
        }
        writer.await.expect("writer");
        assert_eq!(got.0, (0..20_000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_unix_stream_that_ends_inside_a_frame_or_sends_an_oversize_one_is_an_error() {
        let (mut recv, mut write) = unix_pair(1024);
        let mut bytes = Vec::new();
        codec::encode_frame(&7u32, &mut bytes).expect("encode");
        write.write_all(&bytes[..bytes.len() - 1]).await.expect("write");
        drop(write);
        assert!(matches!(recv.next::<u32>("u32").await, Err(RecvError::Protocol(_))));

        let (mut recv, mut write) = unix_pair(1024);
        write.write_all(&4096u32.to_le_bytes()).await.expect("write");
        assert!(matches!(recv.next::<u32>("u32").await, Err(RecvError::Protocol(_))), "over the limit");
    }
}
