//! QUIC transport for Skyward: per-pool mutual TLS and framed streams over quinn.
//!
//! Each pool generates its own certificate authority ([`tls::PoolCa`]). The coordinator's QUIC
//! server presents a certificate signed by it and accepts only clients whose certificate the same
//! CA signed; workers get their certificate and the CA when they start. Nothing without the pool's
//! certificate gets past the TLS handshake.
//!
//! Architecture invariant: this crate moves frames; it knows the protocol's framing but none of its
//! state machines, and nothing of actors or providers. Besides, it says what a process can learn
//! of its machine for locality: shared memory (`shm`) and the CPUs (`cpus`).

pub mod cpus;
pub mod direct;
pub mod framed;
pub mod shm;
pub mod tls;
pub mod tunnel;
pub mod udp;
pub mod unix;

pub use direct::{CORK_BATCH, Cork, DirectWriter, LaneWriter, UnixFrameWriter, WriterClosed};
pub use framed::{Batch, FramedRecv, RecvError, WriteError, write_frame_shared, write_frames};
pub use tls::{CertBundle, PoolCa, TlsError};
pub use tunnel::{Attachment, BoxTunnelIo, TunnelIo, TunnelSocket};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Server name every coordinator certificate carries and every worker checks.
pub const COORDINATOR_SERVER_NAME: &str = "skyward-coordinator";

/// Server name of a worker in the worker cluster: its certificate carries it, and a worker
/// dialling a peer checks it, so a connection reaches exactly the node it meant.
pub fn worker_server_name(node_id: &str) -> String {
    format!("{node_id}.worker.skyward")
}

/// ALPN protocol id of Skyward's wire protocol.
pub const ALPN: &[u8] = b"skyward/1";

/// 16 random bytes from the kernel (`getrandom`): tokens that prove who made something.
pub fn random_token() -> std::io::Result<[u8; 16]> {
    let mut token = [0u8; 16];
    let mut filled = 0;
    while filled < token.len() {
        // SAFETY: writes at most `token.len() - filled` bytes into `token` from `filled` on.
        let n = unsafe { libc::getrandom(token[filled..].as_mut_ptr().cast(), token.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(token)
}

/// Install the process-wide rustls crypto provider (aws-lc-rs). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How many streams the other end of a connection may have open at once. quinn keeps state for
/// every one of them up front (about 150 bytes each), so the limits follow who opens streams:
/// the coordinator opens a worker's lanes, task streams and uploads; a worker opens only its
/// control stream towards the coordinator and one stream per cluster link towards a peer.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    bidi: u32,
    uni: u32,
}

/// What a server accepts: workers' control streams (coordinator) and peers' links (worker).
/// 100,000 cost 15 MB per connection; 1,000 simulated nodes ran out of memory.
const SERVER_ACCEPTS: StreamLimits = StreamLimits { bidi: 64, uni: 16 };

/// What a worker accepts from the coordinator it dials: lanes carry the small tasks, so this
/// bounds concurrent large tasks (big arguments, streams, commands) per node; past it they wait
/// for stream credit.
const WORKER_ACCEPTS: StreamLimits = StreamLimits { bidi: 1_024, uni: 64 };

fn transport_config(idle_timeout: Duration, tunnel: bool, accepts: StreamLimits) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(accepts.bidi.into());
    transport.max_concurrent_uni_streams(accepts.uni.into());
    transport.stream_receive_window((16u32 * 1024 * 1024).into());
    transport.receive_window((256u32 * 1024 * 1024).into());
    transport.send_window(256 * 1024 * 1024);
    transport.keep_alive_interval(Some(idle_timeout / 4));
    transport.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout fits")));
    if tunnel {
        // Nothing to discover on a byte stream. (Larger packets would mean fewer frames, but
        // quinn 0.11 sends nothing at all with an initial MTU above the default over an abstract
        // socket; left at the default.)
        transport.mtu_discovery_config(None);
    }
    transport
}

fn server_config(ca_cert_pem: &str, server: &CertBundle, idle_timeout: Duration, tunnel: bool) -> Result<quinn::ServerConfig, TlsError> {
    install_crypto_provider();
    let tls = tls::server_tls(ca_cert_pem, server)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(idle_timeout, tunnel, SERVER_ACCEPTS)));
    Ok(config)
}

fn client_config(ca_cert_pem: &str, client: &CertBundle, idle_timeout: Duration, tunnel: bool) -> Result<quinn::ClientConfig, TlsError> {
    install_crypto_provider();
    let tls = tls::client_tls(ca_cert_pem, client)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(idle_timeout, tunnel, WORKER_ACCEPTS)));
    Ok(config)
}

/// Socket types that own their descriptor (std's): it stays open, and `as_raw_fd` returns the
/// same one, for as long as the value lives.
pub(crate) trait OwnsFd: std::os::fd::AsRawFd {}
impl OwnsFd for std::net::UdpSocket {}
impl OwnsFd for std::os::unix::net::UnixStream {}

/// Register `socket` with the current runtime's reactor for `interest` only.
pub(crate) fn register<T: OwnsFd>(socket: T, interest: tokio::io::Interest) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `OwnsFd` types own their descriptor, which stays open and is the one `as_raw_fd`
    // returns until the `AsyncFd` (which owns the socket) is dropped or gives it back.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(socket, interest) }?)
}

/// An endpoint on a UDP socket bound to `addr` that is registered for readable events only
/// (`udp::ReadOnlyUdp`: a sent packet does not wake a thread of this process).
fn endpoint(server: Option<quinn::ServerConfig>, addr: SocketAddr) -> Result<quinn::Endpoint, TlsError> {
    let socket = udp::bind(addr).map_err(TlsError::Bind)?;
    quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(TlsError::Bind)
}

/// A QUIC server endpoint for the coordinator bound to `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    ca: &CertBundle,
    server: &CertBundle,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, TlsError> {
    endpoint(Some(server_config(&ca.cert_pem, server, idle_timeout, false)?), addr)
}

/// A QUIC server endpoint for the coordinator whose packets travel over tunnels attached to
/// `socket` (standalone mode).
pub fn server_endpoint_tunnel(
    socket: Arc<TunnelSocket>,
    ca: &CertBundle,
    server: &CertBundle,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, TlsError> {
    let config = server_config(&ca.cert_pem, server, idle_timeout, true)?;
    quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), Some(config), socket, Arc::new(quinn::TokioRuntime))
        .map_err(TlsError::Bind)
}

/// A QUIC client endpoint for a worker, presenting `client` and trusting only `ca`.
pub fn client_endpoint(ca_cert_pem: &str, client: &CertBundle, idle_timeout: Duration) -> Result<quinn::Endpoint, TlsError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("static address");
    let mut endpoint = endpoint(None, bind)?;
    endpoint.set_default_client_config(client_config(ca_cert_pem, client, idle_timeout, false)?);
    Ok(endpoint)
}

/// A worker's endpoint in cluster mode: it dials the coordinator and its peers (presenting
/// `cert`, trusting only `ca`), and accepts connections from peers whose certificate the pool's
/// CA signed. One UDP socket, so the address the coordinator sees is the one peers dial.
pub fn worker_endpoint(ca_cert_pem: &str, cert: &CertBundle, idle_timeout: Duration) -> Result<quinn::Endpoint, TlsError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("static address");
    let mut endpoint = endpoint(Some(server_config(ca_cert_pem, cert, idle_timeout, false)?), bind)?;
    endpoint.set_default_client_config(client_config(ca_cert_pem, cert, idle_timeout, false)?);
    Ok(endpoint)
}

/// A QUIC client endpoint for a standalone worker: its packets travel over the stream the
/// coordinator attaches to `socket`.
pub fn client_endpoint_tunnel(
    socket: Arc<TunnelSocket>,
    ca_cert_pem: &str,
    client: &CertBundle,
    idle_timeout: Duration,
) -> Result<quinn::Endpoint, TlsError> {
    let mut endpoint =
        quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(TlsError::Bind)?;
    endpoint.set_default_client_config(client_config(ca_cert_pem, client, idle_timeout, true)?);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_proto::message::{TaskId, ToWorker};

    /// A server of pool A, and a client holding `client` trusting `ca_pem`: does a frame get
    /// through, and what does the server see?
    async fn exchange(server_ca: &PoolCa, client_ca_pem: &str, client: &CertBundle) -> (bool, Option<String>) {
        let server_cert = server_ca.issue_server().expect("server cert");
        let server =
            server_endpoint("127.0.0.1:0".parse().unwrap(), server_ca.cert(), &server_cert, Duration::from_secs(5)).expect("server");
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.expect("incoming");
            match incoming.await {
                Ok(conn) => {
                    let (_send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
                    let mut framed = FramedRecv::new(recv, 1024);
                    framed.next::<ToWorker>("ToWorker").await.map_err(|e| e.to_string())?.ok_or("no frame".to_string()).map(|_| ())
                }
                Err(e) => Err(e.to_string()),
            }
        });
        let client = client_endpoint(client_ca_pem, client, Duration::from_secs(5)).expect("client");
        let sent = async {
            let conn = client.connect(addr, COORDINATOR_SERVER_NAME).ok()?.await.ok()?;
            let (mut send, _recv) = conn.open_bi().await.ok()?;
            write_frames(&mut send, &[ToWorker::Ack { task: TaskId(1) }]).await.ok()?;
            send.finish().ok()?;
            conn.closed().await;
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
        let server_side = tokio::time::timeout(Duration::from_secs(5), accept).await;
        match server_side {
            Ok(Ok(Ok(()))) => (true, None),
            Ok(Ok(Err(e))) => (false, Some(e)),
            other => (false, Some(format!("{other:?}"))),
        }
    }

    #[tokio::test]
    async fn a_worker_of_the_pool_gets_through() {
        let ca = PoolCa::generate("pool-a").unwrap();
        let worker = ca.issue_worker("n1").unwrap();
        let (ok, err) = exchange(&ca, &ca.cert().cert_pem, &worker).await;
        assert!(ok, "{err:?}");
    }

    #[tokio::test]
    async fn a_stranger_is_rejected_in_the_tls_handshake() {
        let ca = PoolCa::generate("pool-a").unwrap();
        let other = PoolCa::generate("pool-b").unwrap();
        // Signed by another pool's CA, even while trusting our server.
        let stranger = other.issue_worker("n1").unwrap();
        let (ok, err) = exchange(&ca, &ca.cert().cert_pem, &stranger).await;
        assert!(!ok, "stranger got through");
        assert!(err.unwrap_or_default().to_lowercase().contains("certificate"), "rejected for its certificate");
    }

    #[tokio::test]
    async fn a_worker_does_not_talk_to_another_pools_coordinator() {
        let ca = PoolCa::generate("pool-a").unwrap();
        let other = PoolCa::generate("pool-b").unwrap();
        let worker = other.issue_worker("n1").unwrap();
        let (ok, _) = exchange(&ca, &other.cert().cert_pem, &worker).await;
        assert!(!ok, "a worker of pool b reached pool a");
    }

    #[test]
    fn keys_never_appear_in_debug_output() {
        let ca = PoolCa::generate("pool-a").unwrap();
        let worker = ca.issue_worker("n1").unwrap();
        let shown = format!("{worker:?} {ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quic_runs_over_a_byte_stream_tunnel_with_mutual_tls() {
        let ca = PoolCa::generate("pool-t").expect("ca");
        let server_cert = ca.issue_server().expect("server cert");
        let worker = ca.issue_worker("node-t").expect("worker cert");
        let server_socket = TunnelSocket::new(TunnelSocket::coordinator_addr());
        let client_socket = TunnelSocket::single("127.0.0.3:1".parse().unwrap());
        let server = server_endpoint_tunnel(Arc::clone(&server_socket), ca.cert(), &server_cert, Duration::from_secs(5)).expect("server");
        let client =
            client_endpoint_tunnel(Arc::clone(&client_socket), &ca.cert().cert_pem, &worker, Duration::from_secs(5)).expect("client");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let _server_side = server_socket.attach(a);
        let _client_side = client_socket.attach(b);
        // 8 MiB through one stream and back: larger than any window, so flow control is exercised.
        let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let echo = tokio::spawn(async move {
            let conn = server.accept().await.expect("incoming").await.expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let data = recv.read_to_end(usize::MAX).await.expect("read");
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
            conn.closed().await;
        });
        let conn = client.connect(TunnelSocket::coordinator_addr(), COORDINATOR_SERVER_NAME).expect("connect").await.expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&payload).await.expect("write");
        send.finish().expect("finish");
        let back = recv.read_to_end(usize::MAX).await.expect("read back");
        assert!(back == expected, "payload came back intact");
        conn.close(0u32.into(), b"done");
        echo.await.expect("echo task");
    }
}
