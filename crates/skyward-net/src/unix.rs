//! The node-local worker↔executor socket, split so that one side reading does not wake the other
//! (unless the other waits for room to write).
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
//! descriptor (made up front) for writable events, wait on it, and take the registration back
//! once a write went through. A full socket is the less common case: frames are small except
//! large arguments, which a coordinator on the same machine passes through shared memory (a
//! remote coordinator's 256 MiB argument fills the socket many times, each costing a register
//! and a deregister, little next to the copy).

use crate::register;
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
    /// The runtime the reading half registered with: a writable registration goes to its
    /// reactor too, whichever thread writes (one outside any runtime, or inside a user's own).
    runtime: tokio::runtime::Handle,
    /// A duplicate of the descriptor, made up front so that waiting for room cannot fail for want
    /// of a descriptor: idle, or registered for writable events while the socket is full.
    room: Room,
}

#[derive(Debug)]
enum Room {
    Idle(StdUnixStream),
    Waiting(AsyncFd<StdUnixStream>),
    /// Its registration failed (the error went to that write); later writes fail too.
    Lost,
}

/// Split `stream` into halves that do not wake each other (see the module doc). Must run inside
/// a runtime (the reading half registers with its reactor).
pub fn split(stream: tokio::net::UnixStream) -> std::io::Result<(UnixRead, UnixWrite)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(true)?;
    let duplicate = stream.try_clone()?;
    let socket = Arc::new(register(stream, Interest::READABLE)?);
    let writer = UnixWrite { socket: Arc::clone(&socket), runtime: tokio::runtime::Handle::current(), room: Room::Idle(duplicate) };
    Ok((UnixRead { socket }, writer))
}

/// Ends a socket for both sides at once (see [`UnixWrite::closer`]).
#[derive(Debug, Clone)]
pub struct UnixCloser {
    socket: Arc<AsyncFd<StdUnixStream>>,
}

impl UnixCloser {
    /// Shut the socket down both ways: this process's reader reads its end, and so does the
    /// other side's.
    pub fn close(&self) {
        let _ = self.socket.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

impl UnixWrite {
    /// A handle that ends the socket both ways, for whoever owns the connection but not its
    /// reader (a local lane's reader ends when its node's connection is replaced).
    pub fn closer(&self) -> UnixCloser {
        UnixCloser { socket: Arc::clone(&self.socket) }
    }

    /// Stop listening for writable events (there is room again).
    fn room_again(&mut self) {
        if let Room::Waiting(_) = self.room
            && let Room::Waiting(registered) = std::mem::replace(&mut self.room, Room::Lost)
        {
            self.room = Room::Idle(registered.into_inner());
        }
    }

    /// The writable registration, made if the socket was not being watched yet. Made after the
    /// write that would block: if room opened in between, it reports that at once (epoll checks
    /// readiness when adding).
    fn watch(&mut self) -> std::io::Result<&AsyncFd<StdUnixStream>> {
        if let Room::Idle(_) = self.room
            && let Room::Idle(duplicate) = std::mem::replace(&mut self.room, Room::Lost)
        {
            let _runtime = self.runtime.enter();
            self.room = Room::Waiting(register(duplicate, Interest::WRITABLE)?);
        }
        match &self.room {
            Room::Waiting(registered) => Ok(registered),
            _ => Err(std::io::Error::other("cannot wait for room on the executor socket: its registration failed earlier")),
        }
    }
}

impl AsyncRead for UnixRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match ready.try_io(|socket| socket.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    // A short read took everything the socket held: the next read would only
                    // fail with "would block", so forget the readiness now (as tokio's own
                    // sockets do) and wait for the next event instead of making that call.
                    // Bytes that arrived since raise a newer event, which this cannot clear.
                    if n > 0 && n < room {
                        ready.clear_ready();
                    }
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
                    this.room_again();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut ready = ready!(this.watch()?.poll_write_ready(cx))?;
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

    /// Both ends of a connected pair, each split.
    fn split_pair() -> ((UnixRead, UnixWrite), (UnixRead, UnixWrite)) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (split(a).unwrap(), split(b).unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_the_writer_ends_the_peer() {
        let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = split_pair();
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

    /// A short read forgets the socket's readiness (no read that would only say "would block"):
    /// bytes written after it still wake the reader, every time.
    #[tokio::test]
    async fn after_a_short_read_later_bytes_still_wake_the_reader() {
        let ((mut a_read, _a_write), (_b_read, mut b_write)) = split_pair();
        let mut buf = [0u8; 64];
        for round in 0..100u8 {
            b_write.write_all(&[round; 3]).await.unwrap();
            // Bounded: a lost wake-up fails the test instead of hanging it.
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), a_read.read(&mut buf))
                .await
                .expect("the reader was woken for bytes sent after its short read")
                .unwrap();
            assert_eq!(&buf[..n], &[round; 3]);
        }
    }

    /// More than the socket holds: the writer waits for room (its writable registration), and
    /// every byte arrives in order.
    #[tokio::test]
    async fn a_full_socket_makes_the_writer_wait_for_room_not_fail() {
        let ((_a_read, mut a_write), (mut b_read, _b_write)) = split_pair();
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            a_write.write_all(&sent).await.unwrap();
            assert!(matches!(a_write.room, Room::Idle(_)), "the writable registration is dropped once there is room");
        });
        let mut got = vec![0u8; expected.len()];
        // Bounded: a lost wake-up fails the test instead of hanging it.
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            b_read.read_exact(&mut got).await.unwrap();
            writer.await.unwrap();
        })
        .await
        .expect("the writer was woken when room opened");
        assert!(got == expected, "bytes arrive whole and in order");
    }

    /// Polls `future` on this thread, parking it between polls (no runtime here).
    fn block_on_plain_thread<F: std::future::Future>(future: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    /// A writer on a thread outside any runtime (user code in an executor may send from one)
    /// waits for room on the runtime the socket was split on, instead of panicking for want of
    /// a reactor.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_writer_outside_the_runtime_waits_for_room_on_the_sockets_runtime() {
        let ((_a_read, mut a_write), (mut b_read, _b_write)) = split_pair();
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 241) as u8).collect();
        let expected = sent.clone();
        let writer = std::thread::spawn(move || block_on_plain_thread(a_write.write_all(&sent)));
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(std::time::Duration::from_secs(30), b_read.read_exact(&mut got))
            .await
            .expect("the writer was woken when room opened")
            .unwrap();
        writer.join().expect("the writer thread did not panic").unwrap();
        assert!(got == expected, "bytes arrive whole and in order");
    }
}
