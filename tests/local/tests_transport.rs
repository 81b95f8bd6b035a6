//! Bad input at the pool's front door: strangers, unknown node ids, garbage, wrong versions. Each
//! connection is closed with a logged reason and the pool keeps serving its workers.

use crate::support::{assert_no_workers, block_on, pool};
use libtest_mimic::Trial;
use skyward_proto::message::{Hello, ToCoordinator, WorkerFacts};
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

    // The pool still serves every node.
    anyhow::ensure!(pool.broadcast(ping(1)).await? == vec![2, 2]);
    anyhow::ensure!(pool.stats().await?.ready_nodes == 2);
    pool.shutdown().await?;
    assert_no_workers(&id)
}
