//! Bad input at the pool's front door: strangers, unknown node ids, garbage, wrong versions, and
//! strangers at the workers' local-lane sockets. Each connection is closed with a logged reason
//! and the pool keeps serving its workers.

use crate::support::{assert_no_workers, block_on, pool};
use libtest_mimic::Trial;
use skyward_proto::message::{Hello, LaneToken, ToCoordinator, ToWorker, WorkerFacts};
use std::time::Duration;

#[skyward::function]
async fn ping(x: u32) -> u32 {
    x + 1
}

pub(crate) fn trials() -> Vec<Trial> {
    vec![Trial::test("transport::strangers_and_garbage_are_refused_and_the_pool_keeps_serving", || block_on(front_door()))]
}

/// How the coordinator turned a connection away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The TLS handshake failed.
    Handshake,
    /// The coordinator closed the connection with this application error code.
    Closed(u64),
    /// Something else happened (the test then fails with this description).
    Other(String),
}

/// Connect with `cert` trusting `ca_pem`, send `bytes` on a new stream, and report how the
/// coordinator refused it.
async fn knock(addr: std::net::SocketAddr, ca_pem: &str, cert: &skyward_net::CertBundle, bytes: Vec<u8>) -> anyhow::Result<Refusal> {
    let endpoint = skyward_net::client_endpoint(ca_pem, cert, Duration::from_secs(5))?;
    let attempt = async {
        let conn = match endpoint.connect(addr, skyward_net::COORDINATOR_SERVER_NAME)?.await {
            Ok(conn) => conn,
            Err(_) => return Ok(Refusal::Handshake),
        };
        let Ok((mut send, _recv)) = conn.open_bi().await else { return Ok(Refusal::Handshake) };
        // With TLS 1.3 the server may reject the client certificate after the client finished:
        // that surfaces here as a connection error carrying a TLS alert.
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        Ok::<_, anyhow::Error>(match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => Refusal::Closed(close.error_code.into_inner()),
            quinn::ConnectionError::TransportError(e) if e.to_string().to_lowercase().contains("certificate") => Refusal::Handshake,
            quinn::ConnectionError::ConnectionClosed(c) if c.to_string().to_lowercase().contains("certificate") => Refusal::Handshake,
            other => Refusal::Other(other.to_string()),
        })
    };
    let outcome = tokio::time::timeout(Duration::from_secs(12), attempt).await;
    endpoint.close(0u32.into(), b"done");
    match outcome {
        Ok(r) => r,
        Err(_) => Ok(Refusal::Other("not refused within 12 s".into())),
    }
}

/// Connect to a worker's local-lane socket, send `bytes`, and tell whether the worker closed the
/// connection (within 12 s) without sending anything.
async fn lane_knock(socket: &std::path::Path, bytes: &[u8]) -> anyhow::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(bytes).await?;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(12), stream.read_to_end(&mut got)).await {
        Ok(Ok(_)) => Ok(got.is_empty()),
        // Reset by the worker: closed too.
        Ok(Err(_)) => Ok(got.is_empty()),
        Err(_) => Ok(false),
    }
}

fn hello(pool_id: &str, node_id: &str, version: u32) -> Vec<u8> {
    skyward_proto::codec::frame(&ToCoordinator::Hello(Hello {
        version,
        pool_id: pool_id.into(),
        node_id: node_id.into(),
        worker: WorkerFacts::default(),
        held_tasks: vec![],
    }))
    .expect("frame")
}

async fn front_door() -> anyhow::Result<()> {
    let pool = pool(2, 2).await?;
    let id = pool.pool_id().to_string();
    let (addr, ca_pem, stolen) = pool.__transport_probe("intruder");

    // A stranger: a certificate from another CA.
    let other = skyward_net::PoolCa::generate("elsewhere")?;
    let stranger = other.issue_worker("n0")?;
    let r = knock(addr, &ca_pem, &stranger, hello(&id, "x", 1)).await?;
    anyhow::ensure!(r == Refusal::Handshake, "stranger: {r:?}");

    // Codes the coordinator closes with: 2 = bad handshake, 3 = unknown node or wrong certificate.
    // A valid certificate, but the node id is not one the pool issued it for.
    let r = knock(addr, &ca_pem, &stolen, hello(&id, "intruder", 1)).await?;
    anyhow::ensure!(r == Refusal::Closed(3), "unknown node: {r:?}");
    // A real node's id with a certificate that is not that node's.
    let r = knock(addr, &ca_pem, &stolen, hello(&id, &format!("{id}-r0-g1"), 1)).await?;
    anyhow::ensure!(r == Refusal::Closed(3), "impostor: {r:?}");
    // Garbage bytes and an oversize frame instead of a hello.
    let r = knock(addr, &ca_pem, &stolen, vec![0xff; 64]).await?;
    anyhow::ensure!(r == Refusal::Closed(2), "garbage: {r:?}");
    let r = knock(addr, &ca_pem, &stolen, (u32::MAX).to_le_bytes().to_vec()).await?;
    anyhow::ensure!(r == Refusal::Closed(2), "oversize frame: {r:?}");
    // (A wrong protocol version is refused by the session: crates/skyward-proto/tests/sim.rs.)

    // Strangers at the workers' local-lane sockets: a wrong secret, garbage, an oversize frame.
    // Each is closed by the worker, and the coordinator's own lanes keep working.
    let sockets: Vec<std::path::PathBuf> =
        std::fs::read_dir(pool.__state_dir())?.flatten().map(|node| node.path().join("lanes.sock")).filter(|path| path.exists()).collect();
    anyhow::ensure!(sockets.len() == 2, "local-lane sockets: {sockets:?}");
    let wrong = skyward_proto::codec::frame(&ToWorker::OpenLocalLane { token: LaneToken([7; 16]) })?;
    for socket in &sockets {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket)?.permissions().mode() & 0o777;
        anyhow::ensure!(mode == 0o600, "{} has mode {mode:o}", socket.display());
        for bytes in [wrong.clone(), vec![0xff; 64], u32::MAX.to_le_bytes().to_vec()] {
            anyhow::ensure!(lane_knock(socket, &bytes).await?, "{}: a stranger's lane was not closed", socket.display());
        }
    }
    let stats = pool.stats().await?;
    anyhow::ensure!(pool.broadcast(ping(1)).await? == vec![2, 2]);
    let on_lanes = pool.stats().await?.local_lane_dispatches - stats.local_lane_dispatches;
    anyhow::ensure!(on_lanes == 2, "{on_lanes} of 2 calls went on local lanes after the strangers");

    // The pool still serves every node.
    anyhow::ensure!(pool.broadcast(ping(1)).await? == vec![2, 2]);
    anyhow::ensure!(pool.stats().await?.ready_nodes == 2);
    pool.shutdown().await?;
    assert_no_workers(&id)
}
