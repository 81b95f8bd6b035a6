//! The UDP socket under every QUIC endpoint, registered for readable events only.
//!
//! quinn's tokio socket registers for readable and writable events at once. The kernel signals
//! "writable" each time a sent datagram's buffer is freed (at once on loopback, on transmit
//! completion on a network card), so every packet a process sent woke its runtime's thread
//! parked in `epoll_wait`, if another thread was parked there, for nothing. [`ReadOnlyUdp`]
//! sends without a registration; only after a send would have blocked (the socket's buffer is
//! full) does a task that waits for room register a duplicate of the descriptor for writable
//! events, and drop it once woken: the same idea as [`crate::unix`] for the executor socket.

use crate::register;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// quinn's UDP socket without the writable registration (see the module doc).
#[derive(Debug)]
pub struct ReadOnlyUdp {
    io: AsyncFd<UdpSocket>,
    state: UdpSocketState,
    /// The runtime the socket registered with: a writable registration goes to its reactor too.
    runtime: tokio::runtime::Handle,
    /// The last send would have blocked: a task asking for room waits for it (quinn asks before
    /// every send; while this is unset, the answer is yes at once, with no system call).
    full: AtomicBool,
}

impl ReadOnlyUdp {
    /// Take over `socket`. Must run inside a runtime (registers with its reactor).
    pub fn new(socket: UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            io: register(socket, Interest::READABLE)?,
            state,
            runtime: tokio::runtime::Handle::current(),
            full: AtomicBool::new(false),
        })
    }
}

impl AsyncUdpSocket for ReadOnlyUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller { socket: self, waiting: None })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> std::io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        let full = matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        if full != self.full.load(Ordering::Relaxed) {
            self.full.store(full, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // `Err`: nothing to read after all; readiness was cleared, wait again.
            if let Ok(received) = ready.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                return Poll::Ready(received);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// One task's wait for room to send: a duplicate descriptor registered for writable events,
/// made when the task starts waiting and dropped once it was woken.
#[derive(Debug)]
struct WritablePoller {
    socket: Arc<ReadOnlyUdp>,
    waiting: Option<AsyncFd<UdpSocket>>,
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.full.load(Ordering::Relaxed) {
            this.waiting = None;
            return Poll::Ready(Ok(()));
        }
        if this.waiting.is_none() {
            // Registered after the send that would block: if room opened in between, the
            // registration reports it at once (epoll checks readiness when adding).
            let duplicate = this.socket.io.get_ref().try_clone()?;
            let _runtime = this.socket.runtime.enter();
            this.waiting = Some(register(duplicate, Interest::WRITABLE)?);
        }
        let waiting = this.waiting.as_ref().expect("registered above");
        drop(ready!(waiting.poll_write_ready(cx))?);
        this.waiting = None;
        Poll::Ready(Ok(()))
    }
}

/// Receive buffer asked for every endpoint's socket. The kernel's default (208 KiB on Linux,
/// about 90 loopback datagrams by their memory accounting) overflowed at the coordinator of
/// 1,000 simulated nodes: tens of thousands of datagrams dropped per run (`UdpRcvbufErrors`),
/// each a loss that QUIC repairs by retransmission and a halved congestion window. The kernel
/// caps the request at `net.core.rmem_max`; an unprivileged process cannot go past it.
pub const RECV_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` for a QUIC endpoint, with a receive buffer of [`RECV_BUFFER`]
/// where the kernel allows it.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Arc<ReadOnlyUdp>> {
    let socket = ReadOnlyUdp::new(UdpSocket::bind(addr)?)?;
    if let Err(e) = socket.state.set_recv_buffer_size(socket.io.get_ref().into(), RECV_BUFFER) {
        tracing::debug!("cannot enlarge the UDP receive buffer: {e}");
    }
    let got = socket.state.recv_buffer_size(socket.io.get_ref().into()).unwrap_or(0);
    if got < RECV_BUFFER {
        tracing::debug!(got, wanted = RECV_BUFFER, "UDP receive buffer capped by net.core.rmem_max");
    }
    Ok(Arc::new(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoints ask for a large receive buffer and get what `net.core.rmem_max` allows (Linux
    /// reports twice the size set: its bookkeeping overhead).
    #[tokio::test]
    async fn endpoint_sockets_get_a_large_receive_buffer() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let got = socket.state.recv_buffer_size(socket.io.get_ref().into()).unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        assert!(got >= 2 * RECV_BUFFER.min(max), "receive buffer {got} bytes; rmem_max {max}");
    }

    /// A datagram sent on one socket is received on the other, with its source; waiting for room
    /// to send ends at once where there is room.
    #[tokio::test]
    async fn datagrams_cross_and_waiting_for_room_ends_when_there_is_room() {
        let a = Arc::new(ReadOnlyUdp::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        let b = ReadOnlyUdp::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        let transmit = |bytes: &'static [u8]| Transmit { destination: to, ecn: None, contents: bytes, segment_size: None, src_ip: None };
        a.try_send(&transmit(b"hello")).unwrap();
        let mut buf = [0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| b.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(&buf[..meta[0].len], b"hello");
        assert_eq!(meta[0].addr, a.local_addr().unwrap());

        // Room is granted at once while no send blocked; after one did, the task waits on a
        // writable registration, which reports the socket's state when made (room here) and is
        // dropped once it woke the task.
        let mut poller = WritablePoller { socket: Arc::clone(&a), waiting: None };
        std::future::poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx)).await.unwrap();
        assert!(poller.waiting.is_none(), "no registration while sends go through");
        a.full.store(true, Ordering::Relaxed);
        // Bounded: a lost wake-up fails the test instead of hanging it.
        tokio::time::timeout(std::time::Duration::from_secs(30), std::future::poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx)))
            .await
            .expect("woken: the socket has room")
            .unwrap();
        assert!(poller.waiting.is_none(), "the registration is dropped once it reported room");
        a.try_send(&transmit(b"again")).unwrap();
        assert!(!a.full.load(Ordering::Relaxed), "a send that went through clears the flag");
    }
}
