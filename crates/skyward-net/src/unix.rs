//! The node-local worker↔executor socket, split so that one side reading never wakes the other.
//!
//! tokio registers a `UnixStream` for readable and writable events at once. On a Unix socket the
//! kernel signals "writable" to the sending side every time the receiving side reads (the bytes
//! it consumed free the sender's buffer), so with that registration every frame one process read
//! woke the other process's runtime for nothing: measured on the development VM, 1.6 such
//! wake-ups per sync round trip between a worker and its executor, each costing a context switch
//! in and out of an otherwise idle thread.
//!
//! [`split`] registers the socket for readable events only. Writes go straight to the socket
//! (non-blocking). Only when the socket is full does the writer register a duplicate of the
//! descriptor for writable events, wait on it, and drop it again once a write went through: a
//! full socket buffer is the rare case (the buffer is 4 MiB on the worker's side; large
//! arguments between processes on one machine go through shared memory).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The reading half: registered for readable events only.
#[derive(Debug)]
pub struct UnixRead {
    socket: Arc<AsyncFd<StdUnixStream>>,
}

/// The writing half: writes without a registration, registers only while the socket is full.
/// Dropping it shuts the socket down for writing (the other side reads the end), like tokio's
/// `OwnedWriteHalf`.
#[derive(Debug)]
pub struct UnixWrite {
    socket: Arc<AsyncFd<StdUnixStream>>,
    /// A duplicate of the descriptor, registered for writable events while the socket is full.
    full: Option<AsyncFd<StdUnixStream>>,
}

/// Split `stream` into halves that do not wake each other (see the module doc). Must run inside
/// a runtime (the reading half registers with its reactor).
pub fn split(stream: tokio::net::UnixStream) -> std::io::Result<(UnixRead, UnixWrite)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(true)?;
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    Ok((UnixRead { socket: Arc::clone(&socket) }, UnixWrite { socket, full: None }))
}

/// Register `socket` with the current runtime's reactor for `interest`.
fn register(socket: StdUnixStream, interest: Interest) -> std::io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns the
    // same one, until the `AsyncFd` (which owns the stream) is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

impl AsyncRead for UnixRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness was cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for UnixWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.socket.get_ref().write(buf) {
                Ok(n) => {
                    // Room again: stop listening for writable events.
                    this.full = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if this.full.is_none() {
                        // Registered after the failed write: if room opened in between, the
                        // registration reports it at once (epoll checks readiness when adding).
                        let duplicate = this.socket.get_ref().try_clone()?;
                        this.full = Some(register(duplicate, Interest::WRITABLE)?);
                    }
                    let full = this.full.as_ref().expect("registered above");
                    let mut ready = ready!(full.poll_write_ready(cx))?;
                    ready.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl Drop for UnixWrite {
    fn drop(&mut self) {
        let _ = self.socket.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_the_writer_ends_the_peer() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a_read, mut a_write) = split(a).unwrap();
        let (mut b_read, mut b_write) = split(b).unwrap();
        a_write.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b_write.write_all(b"pong").await.unwrap();
        a_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(a_write);
        let mut rest = Vec::new();
        assert_eq!(b_read.read_to_end(&mut rest).await.unwrap(), 0, "the peer reads the end");
    }

    /// More than the socket holds: the writer waits for room (its writable registration), and
    /// every byte arrives in order.
    #[tokio::test]
    async fn a_full_socket_makes_the_writer_wait_for_room_not_fail() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_a_read, mut a_write) = split(a).unwrap();
        let (mut b_read, _b_write) = split(b).unwrap();
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            a_write.write_all(&sent).await.unwrap();
            assert!(a_write.full.is_none(), "the writable registration is dropped once there is room");
        });
        let mut got = vec![0u8; expected.len()];
        b_read.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == expected, "bytes arrive whole and in order");
    }
}
