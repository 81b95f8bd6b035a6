//! The Container provider end to end on real docker: containers with their own sshd,
//! bootstrapped over SSH, workers joining over QUIC with mutual TLS through the pool's network.

use crate::support::{CONTAINER_SILENCE, Mode, block_on, container_provider, test_options};
use crate::tests_teardown::spawn_child;
use libtest_mimic::Trial;
use skyward::providers::container::{self, Runtime};
use skyward::{Compute, Image, Pool, StartError, Worker};
use std::time::{Duration, Instant};

#[skyward::function]
async fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[skyward::function]
async fn square(x: u64) -> u64 {
    x * x
}

#[skyward::function]
async fn nap(ms: u64, value: u32) -> u32 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    value
}

#[skyward::function]
async fn node_rank() -> u32 {
    skyward::instance_info().rank
}

pub(crate) fn trials() -> Vec<Trial> {
    vec![
        Trial::test("container::dispatch_on_three_containers", || block_on(dispatch_on_three(Mode::Cluster))),
        Trial::test("container::dispatch_on_three_containers_standalone", || block_on(dispatch_on_three(Mode::Standalone))),
        Trial::test("container::killed_container_task_completes_elsewhere", || block_on(killed_container(Mode::Cluster))),
        Trial::test("container::killed_container_task_completes_elsewhere_standalone", || block_on(killed_container(Mode::Standalone))),
        Trial::test("container::killed_coordinator_containers_end_themselves", killed_coordinator),
        Trial::test("container::failed_bootstrap_reports_output_and_leaves_nothing", || block_on(failed_bootstrap())),
        Trial::test("container::prebaked_image_skips_bootstrap", || block_on(prebaked_image_skips_bootstrap())),
        Trial::test("container::synced_files_reach_every_node", || block_on(synced_files_reach_every_node())),
    ]
}

async fn container_pool(nodes: u32, concurrency: u32, mode: Mode) -> anyhow::Result<Pool> {
    Ok(Compute::new(container_provider()).nodes(nodes).worker(Worker { concurrency }).options(mode.options()).start().await?)
}

/// Containers and networks still labelled with `pool_id`.
async fn leftovers(pool_id: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let p = container_provider();
    let containers = p.tagged_containers(Some(pool_id)).await?.into_iter().map(|c| c.name).collect();
    let networks = p.tagged_networks(Some(pool_id)).await?.into_iter().map(|n| n.name).collect();
    Ok((containers, networks))
}

async fn assert_nothing_left(pool_id: &str) -> anyhow::Result<()> {
    let (containers, networks) = leftovers(pool_id).await?;
    anyhow::ensure!(containers.is_empty() && networks.is_empty(), "left behind by {pool_id}: {containers:?} {networks:?}");
    Ok(())
}

async fn dispatch_on_three(mode: Mode) -> anyhow::Result<()> {
    let started = Instant::now();
    let pool = container_pool(3, 4, mode).await?;
    println!("3 containers ready in {:?} ({mode:?})", started.elapsed());
    let id = pool.pool_id().to_string();
    let (containers, networks) = leftovers(&id).await?;
    anyhow::ensure!(containers.len() == 3 && networks.len() == 1, "3 containers and a network: {containers:?} {networks:?}");

    // Each task ran inside a container: its hostname is the container's name.
    let one = pool.run(hostname()).await?;
    anyhow::ensure!(containers.contains(&one), "ran on {one:?}, not one of {containers:?}");
    let mut all: Vec<String> = pool.broadcast(hostname()).await?;
    all.sort();
    let mut expected = containers.clone();
    expected.sort();
    anyhow::ensure!(all == expected, "broadcast reached {all:?}, expected {expected:?}");
    let ranks: Vec<u32> = pool.broadcast(node_rank()).await?;
    anyhow::ensure!(ranks == vec![0, 1, 2], "ranks {ranks:?}");
    let squares: Vec<u64> = pool.gather((0..60u64).map(square)).await?;
    anyhow::ensure!(squares == (0..60u64).map(|x| x * x).collect::<Vec<_>>(), "gather results in order");
    let (h, s) = pool.join((hostname(), square(12))).await?;
    anyhow::ensure!(containers.contains(&h) && s == 144);
    let submitted = pool.submit(square(9));
    anyhow::ensure!(submitted.await? == 81);

    pool.shutdown().await?;
    assert_nothing_left(&id).await
}

async fn killed_container(mode: Mode) -> anyhow::Result<()> {
    let pool = container_pool(3, 2, mode).await?;
    let id = pool.pool_id().to_string();
    // Six tasks of 2 s fill every slot; then one container is killed mid-task.
    let handles: Vec<_> = (0..6).map(|i| pool.submit(nap(2000, i))).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().await?.running < 6 {
        anyhow::ensure!(Instant::now() < deadline, "tasks never all started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (before, _) = leftovers(&id).await?;
    let victim = before.first().cloned().ok_or_else(|| anyhow::anyhow!("no container"))?;
    let out = tokio::process::Command::new("docker").args(["kill", &victim]).output().await?;
    anyhow::ensure!(out.status.success(), "docker kill: {}", String::from_utf8_lossy(&out.stderr));
    let killed_at = Instant::now();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await?);
    }
    results.sort_unstable();
    anyhow::ensure!(results == vec![0, 1, 2, 3, 4, 5], "every task completed once: {results:?}");
    let stats = pool.stats().await?;
    anyhow::ensure!(stats.requeued >= 1, "the killed node's tasks were re-queued: {stats:?}");
    println!("all results {:?} after the kill", killed_at.elapsed());
    // A replacement container joins under the same rank.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.stats().await?.ready_nodes < 3 {
        anyhow::ensure!(Instant::now() < deadline, "replacement never joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("replacement ready {:?} after the kill", killed_at.elapsed());
    let ranks: Vec<u32> = pool.broadcast(node_rank()).await?;
    anyhow::ensure!(ranks == vec![0, 1, 2], "ranks after replacement {ranks:?}");
    let (after, _) = leftovers(&id).await?;
    anyhow::ensure!(after.len() == 3 && !after.contains(&victim), "victim gone, three running: {after:?}");
    pool.shutdown().await?;
    assert_nothing_left(&id).await
}

/// SIGKILL the coordinator: every container must end itself once the coordinator has been
/// silent for instance_timeout, and `cleanup` then finds no container, only the orphaned network.
fn killed_coordinator() -> Result<(), libtest_mimic::Failed> {
    let (mut child, pool_id) = spawn_child("container-wait")?;
    block_on(async {
        let (containers, _) = leftovers(&pool_id).await?;
        anyhow::ensure!(containers.len() == 2, "two containers before the kill: {containers:?}");
        child.kill()?;
        child.wait()?;
        let killed = Instant::now();
        let limit = CONTAINER_SILENCE + Duration::from_secs(10);
        while !leftovers(&pool_id).await?.0.is_empty() {
            anyhow::ensure!(
                killed.elapsed() < limit,
                "containers of {pool_id} still there {:?} after the coordinator died",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!("containers ended {:?} after the coordinator was killed (instance_timeout {CONTAINER_SILENCE:?})", killed.elapsed());
        let report = container::cleanup(Runtime::Docker, false, false).await?;
        anyhow::ensure!(
            !report.containers.iter().any(|c| c.pool_id == pool_id),
            "cleanup found containers the workers should have ended: {:?}",
            report.containers
        );
        anyhow::ensure!(report.networks.iter().any(|n| n.pool_id == pool_id), "cleanup removes the orphaned network: {report:?}");
        assert_nothing_left(&pool_id).await
    })
}

async fn failed_bootstrap() -> anyhow::Result<()> {
    let image = Image::new().apt(["skyward-no-such-package"]);
    let result = Compute::new(container_provider()).nodes(2).image(image).options(test_options()).start().await;
    let Err(error) = result else { anyhow::bail!("a pool whose image cannot install started") };
    let text = error.to_string();
    println!("{text}");
    anyhow::ensure!(text.contains("running the image script"), "names the stage: {text}");
    anyhow::ensure!(text.contains("skyward-no-such-package"), "shows apt's output: {text}");
    anyhow::ensure!(text.contains("last") && text.contains("lines of output"), "carries the output tail: {text}");
    let StartError::Node { pool_id, .. } = &error else { anyhow::bail!("expected a node start error, got {error:?}") };
    assert_nothing_left(pool_id).await
}

#[skyward::function]
async fn baked_state() -> (String, bool) {
    (std::env::var("SKYWARD_TEST_GREETING").unwrap_or_default(), std::path::Path::new("/var/lib/skyward-test-baked").exists())
}

/// A prebaked image: the first pool bakes it (image script run, worker installed); the next pool
/// starts from it, uploads nothing and runs no setup again, and tasks see the Image's effects.
async fn prebaked_image_skips_bootstrap() -> anyhow::Result<()> {
    // Unique per run: a setup command that names this process, so the bake happens here.
    let marker = format!("touch /var/lib/skyward-test-baked # {}", std::process::id());
    let image = Image::new().env("SKYWARD_TEST_GREETING", "hello from the image").setup(marker);
    let first_provider = container_provider().prebake(true);
    let first = Compute::new(first_provider.clone()).nodes(1).image(image.clone()).options(test_options()).start().await?;
    let baked = first_provider.start_timings();
    anyhow::ensure!(first.run(baked_state()).await? == ("hello from the image".to_string(), true), "the image applied on the first pool");
    let first_id = first.pool_id().to_string();
    first.shutdown().await?;
    assert_nothing_left(&first_id).await?;

    let second_provider = container_provider().prebake(true);
    let second = Compute::new(second_provider.clone()).nodes(2).image(image).options(test_options()).start().await?;
    let timings = second_provider.start_timings();
    let state: Vec<(String, bool)> = second.broadcast(baked_state()).await?;
    let second_id = second.pool_id().to_string();
    second.shutdown().await?;
    assert_nothing_left(&second_id).await?;
    let image_name = timings.first().map(|(_, t)| t.image_name.clone()).unwrap_or_default();
    let _ = tokio::process::Command::new("docker").args(["rmi", "-f", &image_name]).output().await;
    anyhow::ensure!(image_name.starts_with("skyward-prebaked:"), "nodes started from the prebaked image: {image_name}");
    anyhow::ensure!(baked.iter().all(|(_, t)| t.image_name == image_name), "both pools used the same prebaked image");
    anyhow::ensure!(timings.len() == 2 && timings.iter().all(|(_, t)| !t.uploaded), "no worker upload on a prebaked image: {timings:?}");
    anyhow::ensure!(state.iter().all(|s| s == &("hello from the image".to_string(), true)), "image effects on every node: {state:?}");
    Ok(())
}

#[skyward::function]
async fn read_synced() -> Vec<String> {
    let root = std::path::Path::new("/var/lib/skyward/app");
    let mut found = Vec::new();
    for rel in ["main.py", "pkg/util.py", "notes.txt", "target/out.py"] {
        if let Ok(text) = std::fs::read_to_string(root.join(rel)) {
            found.push(format!("{rel}={}", text.trim()));
        }
    }
    found
}

/// Files to sync reach every node, filtered by the include/exclude globs; CPU and memory limits
/// reach the containers.
async fn synced_files_reach_every_node() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("skyward-sync-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pkg"))?;
    std::fs::create_dir_all(dir.join("target"))?;
    std::fs::write(dir.join("main.py"), "main")?;
    std::fs::write(dir.join("pkg/util.py"), "util")?;
    std::fs::write(dir.join("notes.txt"), "not included")?;
    std::fs::write(dir.join("target/out.py"), "excluded")?;
    let image = Image::new().sync(skyward::SyncDir::new(&dir, "app").include("*.py").exclude("target"));
    let provider = container_provider().cpus(1.5).memory_mb(768);
    let pool = Compute::new(provider).nodes(2).image(image).options(test_options()).start().await?;
    let id = pool.pool_id().to_string();
    let seen: Vec<Vec<String>> = pool.broadcast(read_synced()).await?;
    for name in leftovers(&id).await?.0 {
        let out = tokio::process::Command::new("docker")
            .args(["inspect", "--format", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}", &name])
            .output()
            .await?;
        let limits = String::from_utf8_lossy(&out.stdout).trim().to_string();
        anyhow::ensure!(limits == format!("1500000000 {}", 768u64 << 20), "limits of {name}: {limits}");
    }
    pool.shutdown().await?;
    std::fs::remove_dir_all(&dir)?;
    let expected = vec!["main.py=main".to_string(), "pkg/util.py=util".to_string()];
    anyhow::ensure!(seen.iter().all(|s| s == &expected), "every node has exactly the filtered files: {seen:?}");
    assert_nothing_left(&id).await
}
