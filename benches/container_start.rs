//! Pool start on the Container provider: time from `start()` to every node ready, for 4
//! containers with the base image present, and where each node's time went (docker run, SSH up,
//! image script, worker upload, worker start; the rest until ready is the worker joining over
//! QUIC and receiving the executable).
//!
//! `cargo bench --bench container_start` (5 runs) or `-- --test` (1 run, as `.ci/run` does).
//! `SKYWARD_BENCH_NODES=n` changes the node count; `SKYWARD_BENCH_PREBAKE=1` starts from a
//! prebaked image (baked in the first run, which is then not counted).
#![allow(clippy::print_stdout)]

use skyward::Compute;
use skyward::providers::container::NodeStartTimings;
use std::time::{Duration, Instant};

#[skyward::function]
async fn noop() {}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    skyward::init();
    let quick = std::env::args().any(|a| a == "--test");
    let runs = if quick { 1 } else { 5 };
    let nodes = std::env::var("SKYWARD_BENCH_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(4);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut ready = Vec::new();
    let mut per_node: Vec<NodeStartTimings> = Vec::new();
    let prebake = std::env::var_os("SKYWARD_BENCH_PREBAKE").is_some();
    let mut baked_image = None;
    for run in 0..runs + usize::from(prebake) {
        let provider = skyward::Container::default().isolated(true).prebake(prebake);
        let t = Instant::now();
        let pool = rt.block_on(Compute::new(provider.clone()).nodes(nodes).start()).expect("container pool starts");
        let elapsed = t.elapsed();
        rt.block_on(async { pool.broadcast(noop()).await.expect("noop on every node") });
        rt.block_on(pool.shutdown()).expect("shutdown");
        let timings: Vec<NodeStartTimings> = provider.start_timings().into_iter().map(|(_, t)| t).collect();
        let slowest = timings.iter().map(|t| t.total).max().unwrap_or_default();
        if prebake && run == 0 {
            println!("bake run: {nodes} containers ready in {elapsed:?} (image baked; not counted)");
            baked_image = timings.first().map(|t| t.image_name.clone());
            continue;
        }
        println!("run {run}: {nodes} containers ready in {elapsed:?} (slowest node bootstrapped in {slowest:?})");
        ready.push(elapsed);
        per_node.extend(timings);
    }
    if let Some(image) = baked_image {
        let _ = std::process::Command::new("docker").args(["rmi", "-f", &image]).output();
    }
    let pick = |f: fn(&NodeStartTimings) -> Duration| median(per_node.iter().map(f).collect());
    let total = median(ready.clone());
    let node_total = pick(|t| t.total);
    println!(
        "container_start: nodes={nodes} runs={runs} median={:?} min={:?} max={:?}",
        total,
        ready.iter().min().expect("runs"),
        ready.iter().max().expect("runs")
    );
    println!(
        "per node (median): docker run {:?}, ssh up {:?}, image {:?} | upload {:?} (concurrent), worker start {:?}; bootstrapped at {:?}; join + executable until ready ~{:?}",
        pick(|t| t.run),
        pick(|t| t.ssh),
        pick(|t| t.image),
        pick(|t| t.upload),
        pick(|t| t.start),
        node_total,
        total.saturating_sub(node_total)
    );
}
