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

/// Connect with `cert` trusting `ca_pem`, send `bytes` on a new stream, and report whether the
/// coordinator closed the connection within a few seconds.
async fn knock(addr: std::net::SocketAddr, ca_pem: &str, cert: &skyward_net::CertBundle, bytes: Vec<u8>) -> anyhow::Result<bool> {
    let endpoint = skyward_net::client_endpoint(ca_pem, cert, Duration::from_secs(5))?;
    let attempt = async {
        let conn = endpoint.connect(addr, skyward_net::COORDINATOR_SERVER_NAME).ok()?.await.ok()?;
        let (mut send, _recv) = conn.open_bi().await.ok()?;
        send.write_all(&bytes).await.ok()?;
        let _ = send.finish();
        Some(conn.closed().await)
    };
    let closed = tokio::time::timeout(Duration::from_secs(12), attempt).await;
    endpoint.close(0u32.into(), b"done");
    // Either refused during the handshake (None) or closed by the coordinator (Some).
    Ok(closed.is_ok())
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
    anyhow::ensure!(knock(addr, &ca_pem, &stranger, hello(&id, "x", 1)).await?, "stranger not refused");

    // A valid certificate, but the node id is not one the pool issued it for.
    anyhow::ensure!(knock(addr, &ca_pem, &stolen, hello(&id, "intruder", 1)).await?, "unknown node not refused");
    // A real node's id with a certificate that is not that node's.
    anyhow::ensure!(knock(addr, &ca_pem, &stolen, hello(&id, &format!("{id}-r0-g1"), 1)).await?, "impostor not refused");
    // Garbage bytes, an oversize frame, a wrong protocol version.
    anyhow::ensure!(knock(addr, &ca_pem, &stolen, vec![0xff; 64]).await?, "garbage not refused");
    anyhow::ensure!(knock(addr, &ca_pem, &stolen, (u32::MAX).to_le_bytes().to_vec()).await?, "oversize frame not refused");
    anyhow::ensure!(knock(addr, &ca_pem, &stolen, hello(&id, "intruder", 999)).await?, "wrong version not refused");

    // The pool still serves every node.
    anyhow::ensure!(pool.broadcast(ping(1)).await? == vec![2, 2]);
    anyhow::ensure!(pool.stats().await?.ready_nodes == 2);
    pool.shutdown().await?;
    assert_no_workers(&id)
}
