//! `cargo run --example hello`: a run, a broadcast over 3 nodes and a gather of 100 tasks on the
//! Local provider (worker processes on this machine, no credentials, no docker).
#![allow(clippy::print_stdout)]

use skyward::{Compute, Local};

/// Runs on one node and says where.
#[skyward::function]
async fn hello(name: String) -> String {
    let info = skyward::instance_info();
    format!("hello {name}, from node {} of {}", info.rank, info.node_count)
}

/// Reports the node's rank and the executor's process id.
#[skyward::function]
async fn whoami() -> (u32, u32) {
    (skyward::instance_info().rank, std::process::id())
}

/// A plain (blocking) function works too.
#[skyward::function]
fn square(x: u64) -> u64 {
    x * x
}

#[skyward::main]
async fn main() -> anyhow::Result<()> {
    skyward::init_logging();
    let started = std::time::Instant::now();
    let pool = Compute::new(Local::default()).nodes(3).start().await?;
    println!("pool {} ready: {} nodes in {:.0?}", pool.pool_id(), pool.node_count(), started.elapsed());

    println!("run:       {}", pool.run(hello("world".to_string())).await?);

    for (rank, pid) in pool.broadcast(whoami()).await? {
        println!("broadcast: node {rank} answered (executor pid {pid})");
    }

    let t = std::time::Instant::now();
    let squares = pool.gather((0..100).map(square)).await?;
    println!("gather:    100 tasks in {:.1?}, sum of squares 0..100 = {}", t.elapsed(), squares.iter().sum::<u64>());

    pool.shutdown().await?;
    println!("shut down: every worker is gone");
    Ok(())
}
