//! QUIC over byte streams: a [`quinn::AsyncUdpSocket`] whose datagrams travel as length-prefixed
//! frames over ordered byte streams (SSH channels in standalone mode) instead of UDP.
//!
//! Standalone mode keeps the whole QUIC path (mutual TLS, control stream, lanes, resume) and only
//! changes what carries its packets: the coordinator opens one stream per worker through the
//! provider (an SSH channel to the worker's Unix socket), and both ends attach it to a
//! `TunnelSocket`. Each attached stream is a peer with a made-up address (`127.0.0.1:<n>`, never
//! used on any network). Like UDP, a datagram for a peer that is not attached, or whose queue is
//! full, is dropped; QUIC retransmits. A re-attached stream (the SSH connection was re-made) is a
//! new address to the coordinator and QUIC migrates the connection to it.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Notify, mpsc};

/// Datagrams queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Datagrams received from all peers that QUIC has not read yet.
const RECV_QUEUE: usize = 8192;

/// A byte stream a tunnel can run over.
pub trait TunnelIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> TunnelIo for T {}

/// A boxed [`TunnelIo`].
pub type BoxTunnelIo = Box<dyn TunnelIo>;

/// An attached stream: (attachment id, address QUIC sees, queue to its writer).
type Peer = (u64, SocketAddr, mpsc::Sender<Vec<u8>>);

struct Datagram {
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// The datagram socket QUIC sees; streams are attached to it as peers.
pub struct TunnelSocket {
    local: SocketAddr,
    peers: Mutex<Vec<Peer>>,
    recv_tx: mpsc::Sender<Datagram>,
    recv_rx: Mutex<mpsc::Receiver<Datagram>>,
    next_id: AtomicU64,
    attached: Notify,
    single: bool,
}

impl fmt::Debug for TunnelSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSocket").field("local", &self.local).finish_non_exhaustive()
    }
}

/// An attached stream; [`Attachment::closed`] resolves when it ended.
#[derive(Debug)]
pub struct Attachment {
    /// The peer address QUIC sees for this stream.
    pub peer: SocketAddr,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Attachment {
    /// Wait until the stream ended (EOF or an error in either direction).
    pub async fn closed(self) {
        let _ = self.done.await;
    }
}

impl TunnelSocket {
    /// A socket for many peers (the coordinator's), whose own (made-up) address is `local`.
    pub fn new(local: SocketAddr) -> Arc<TunnelSocket> {
        Self::build(local, false)
    }

    /// A socket for one peer at a time (a worker's): a newly attached stream replaces the
    /// previous one, and every datagram goes to the current stream whatever its destination.
    pub fn single(local: SocketAddr) -> Arc<TunnelSocket> {
        Self::build(local, true)
    }

    fn build(local: SocketAddr, single: bool) -> Arc<TunnelSocket> {
        let (recv_tx, recv_rx) = mpsc::channel(RECV_QUEUE);
        Arc::new(TunnelSocket {
            local,
            peers: Mutex::default(),
            recv_tx,
            recv_rx: Mutex::new(recv_rx),
            next_id: AtomicU64::new(1),
            attached: Notify::new(),
            single,
        })
    }

    /// The made-up address a worker dials in standalone mode (the coordinator's tunnel socket).
    pub fn coordinator_addr() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 1)
    }

    /// Attach `stream` as a new peer. Its reader and writer run as tasks until the stream ends,
    /// then the peer is removed.
    pub fn attach(self: &Arc<Self>, stream: impl TunnelIo) -> Attachment {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Made-up addresses; an id that no longer fits a port moves to the next loopback address.
        let port = (id % 65_535 + 1) as u16;
        let host = Ipv4Addr::from(u32::from(Ipv4Addr::LOCALHOST) + (id / 65_535) as u32 % 0x00ff_ffff);
        // A worker sees its one peer at the address it dialed: QUIC clients drop packets from
        // any other address.
        let peer = if self.single { Self::coordinator_addr() } else { SocketAddr::new(IpAddr::V4(host), port) };
        let (send_tx, mut send_rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
        {
            let mut peers = self.peers.lock().expect("tunnel peers");
            if self.single {
                // Dropping the old sender ends the old stream's writer, and with it the stream.
                peers.clear();
            }
            peers.push((id, peer, send_tx));
        }
        let (read_half, write_half) = tokio::io::split(stream);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let socket = Arc::clone(self);
        tokio::spawn(async move {
            let reader = async {
                let mut read_half = read_half;
                let mut len = [0u8; 2];
                loop {
                    if read_half.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut bytes = vec![0u8; u16::from_le_bytes(len) as usize];
                    if read_half.read_exact(&mut bytes).await.is_err() {
                        return;
                    }
                    if socket.recv_tx.send(Datagram { from: peer, bytes }).await.is_err() {
                        return;
                    }
                }
            };
            let writer = async {
                let mut out = BufWriter::with_capacity(256 * 1024, write_half);
                while let Some(datagram) = send_rx.recv().await {
                    let mut next = Some(datagram);
                    // Batch what is queued into one flush.
                    while let Some(d) = next {
                        if out.write_all(&(d.len() as u16).to_le_bytes()).await.is_err() || out.write_all(&d).await.is_err() {
                            return;
                        }
                        next = send_rx.try_recv().ok();
                    }
                    if out.flush().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = reader => {}
                _ = writer => {}
            }
            socket.peers.lock().expect("tunnel peers").retain(|(i, _, _)| *i != id);
            let _ = done_tx.send(());
        });
        self.attached.notify_one();
        Attachment { peer, done }
    }

    /// Resolves after the next [`TunnelSocket::attach`] (or at once if one happened since the
    /// last call). A worker uses it to redial as soon as the coordinator's stream arrives.
    pub async fn attached(&self) {
        self.attached.notified().await;
    }

    /// Number of attached streams.
    pub fn peers(&self) -> usize {
        self.peers.lock().expect("tunnel peers").len()
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        let peers = self.peers.lock().expect("tunnel peers");
        let peer = if self.single { peers.last() } else { peers.iter().find(|(_, p, _)| *p == transmit.destination) };
        let Some((_, _, tx)) = peer else { return Ok(()) };
        let segment = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for chunk in transmit.contents.chunks(segment) {
            // Full queue: dropped, as UDP would; QUIC's loss recovery resends.
            let _ = tx.try_send(chunk.to_vec());
        }
        Ok(())
    }

    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [quinn::udp::RecvMeta]) -> Poll<io::Result<usize>> {
        let mut rx = self.recv_rx.lock().expect("tunnel receiver");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let datagram = match rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => d,
                Poll::Ready(None) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed"))),
                Poll::Pending => break,
            };
            let len = datagram.bytes.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&datagram.bytes[..len]);
            meta[n] = quinn::udp::RecvMeta { addr: datagram.from, len, stride: len, dst_ip: Some(self.local.ip()), ..Default::default() };
            n += 1;
        }
        if n == 0 { Poll::Pending } else { Poll::Ready(Ok(n)) }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
