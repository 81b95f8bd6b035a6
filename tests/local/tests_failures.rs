//! Failures: structured remote errors, panics, crashed executors, unknown functions, binaries
//! for another machine, and a node lost mid-task.

use crate::support::{assert_no_workers, block_on, leftover, pool};
use anyhow::Context;
use libtest_mimic::Trial;
use skyward::RemoteErrorKind;
use std::time::{Duration, Instant};

#[skyward::function]
async fn fails_with_chain() -> anyhow::Result<u32> {
    Err(anyhow::anyhow!("disk quota exceeded")).context("writing checkpoint")
}

#[skyward::function]
async fn io_error() -> std::io::Result<u32> {
    Err(std::io::Error::new(std::io::ErrorKind::NotFound, "weights.bin not found"))
}

#[skyward::function]
async fn panics(message: String) -> u32 {
    panic!("{message}");
}

#[skyward::function]
fn panics_blocking() -> u32 {
    let v: Vec<u32> = Vec::new();
    v[3]
}

#[skyward::function]
async fn aborts() -> u32 {
    std::process::abort();
}

#[skyward::function]
async fn segfaults() -> u32 {
    // A real invalid access (raise() would be swallowed by std's stack-overflow handler).
    let address = std::hint::black_box(8usize) as *mut u32;
    // SAFETY: none; this deliberately faults to test crash isolation.
    unsafe { address.write_volatile(1) };
    0
}

#[skyward::function]
async fn pid() -> u32 {
    std::process::id()
}

#[skyward::function]
async fn sleepy(ms: u64, value: u32) -> u32 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    value
}

pub(crate) fn trials() -> Vec<Trial> {
    vec![
        Trial::test("failures::remote_errors_are_structured_and_the_worker_survives_crashes", || block_on(remote_errors())),
        Trial::test("failures::unknown_function_is_named", || block_on(unknown_function())),
        Trial::test("failures::binary_for_another_machine_is_refused_before_upload", || block_on(foreign_binary())),
        Trial::test("failures::lost_node_tasks_requeue_and_node_is_replaced", || block_on(lost_node())),
        Trial::test("failures::tasks_see_the_membership_after_a_loss_and_a_replacement", || block_on(facts_follow_membership())),
        Trial::test("failures::a_worker_that_cannot_start_fails_the_start_quickly_with_its_log", || block_on(broken_worker())),
    ]
}

async fn remote_errors() -> anyhow::Result<()> {
    let pool = pool(1, 2).await?;
    let id = pool.pool_id().to_string();

    let err = pool.run(fails_with_chain()).await.expect_err("returns Err");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::Returned, "{remote:?}");
    anyhow::ensure!(remote.message == "writing checkpoint" && remote.chain == ["disk quota exceeded"], "{remote:?}");

    let err = pool.run(io_error()).await.expect_err("returns Err");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.type_name.contains("io") && remote.message == "weights.bin not found", "{remote:?}");

    let err = pool.run(panics("model diverged".into())).await.expect_err("panics");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::Panic && remote.message == "model diverged", "{remote:?}");
    let location = remote.location.as_deref().unwrap_or_default();
    anyhow::ensure!(location.contains("tests_failures.rs"), "panic location {location:?}");

    let err = pool.run(panics_blocking()).await.expect_err("panics");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::Panic && remote.message.contains("index out of bounds"), "{remote:?}");
    anyhow::ensure!(remote.location.as_deref().unwrap_or_default().contains("tests_failures.rs"), "{remote:?}");

    // The executor survives panics: same process before and after.
    let before = pool.run(pid()).await?;
    let _ = pool.run(panics("again".into())).await;
    anyhow::ensure!(pool.run(pid()).await? == before, "panic must not restart the executor");

    let err = pool.run(aborts()).await.expect_err("abort");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::ExecutorDied && remote.message.contains("SIGABRT"), "{remote:?}");
    let err = pool.run(segfaults()).await.expect_err("segfault");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::ExecutorDied && remote.message.contains("SIGSEGV"), "{remote:?}");

    // The worker restarted the executor: a new process serves the next call.
    let after = pool.run(pid()).await?;
    anyhow::ensure!(after != before, "executor restarted");
    pool.shutdown().await?;
    assert_no_workers(&id)
}

async fn unknown_function() -> anyhow::Result<()> {
    let pool = pool(1, 1).await?;
    let id = pool.pool_id().to_string();
    let call = skyward::Call::<u32>::new("some::module::not_registered", &(1u32,));
    let err = pool.run(call).await.expect_err("unknown");
    let remote = err.remote().context("structured error")?;
    anyhow::ensure!(remote.kind == RemoteErrorKind::UnknownFunction, "{remote:?}");
    anyhow::ensure!(remote.message.contains("some::module::not_registered"), "{}", remote.message);
    pool.shutdown().await?;
    assert_no_workers(&id)
}

/// A minimal 64-bit little-endian ELF header for aarch64 (e_machine 183), no program headers.
fn aarch64_elf() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little endian
    h[6] = 1; // version
    h[16] = 2; // ET_EXEC
    h[18..20].copy_from_slice(&183u16.to_le_bytes());
    h[20] = 1;
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    h
}

async fn foreign_binary() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("skyward-foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("trainer-aarch64");
    std::fs::write(&path, aarch64_elf())?;
    let hash = std::process::Command::new("sha256sum").arg(&path).output()?;
    let hash = String::from_utf8_lossy(&hash.stdout).split_whitespace().next().unwrap_or_default().to_string();
    anyhow::ensure!(hash.len() == 64, "sha256sum output");
    let cached = skyward::providers::local::skyward_home().join("cache").join("bin").join(&hash);
    // A copy left by an older build of this test would hide the check below.
    let _ = std::fs::remove_file(&cached);
    let started = Instant::now();
    let err = skyward::Compute::new(skyward::Local::default())
        .binary(&path)
        .options(crate::support::test_options())
        .start()
        .await
        .expect_err("refused");
    let text = err.to_string();
    anyhow::ensure!(text.contains("aarch64") && text.contains("x86_64"), "error was: {text}");
    anyhow::ensure!(text.contains("sky-"), "the error names the pool: {text}");
    anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "refused promptly");
    // Refused before it was placed anywhere: not in the nodes' shared binary cache.
    anyhow::ensure!(!cached.exists(), "the refused binary was staged at {}", cached.display());
    let _ = std::fs::remove_dir_all(&dir);
    // The failed start left nothing behind.
    let left = skyward::providers::local::scan_process_table(None).into_iter().filter(|(_, pool)| text.contains(pool.as_str())).count();
    anyhow::ensure!(left == 0, "{left} workers left after a refused start");
    Ok(())
}

async fn lost_node() -> anyhow::Result<()> {
    let pool = pool(3, 2).await?;
    let id = pool.pool_id().to_string();
    let workers = leftover(&id);
    anyhow::ensure!(workers.len() == 3, "three worker processes: {workers:?}");
    // Six tasks of 1.5 s fill every slot; then one worker dies mid-task.
    let handles: Vec<_> = (0..6).map(|i| pool.submit(sleepy(1500, i))).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().await?.running < 6 {
        anyhow::ensure!(Instant::now() < deadline, "tasks never all started");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = workers[0];
    // SAFETY: sending SIGKILL to a worker process this test started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let killed_at = Instant::now();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await?);
    }
    results.sort_unstable();
    anyhow::ensure!(results == vec![0, 1, 2, 3, 4, 5], "every task got its own result: {results:?}");
    let stats = pool.stats().await?;
    anyhow::ensure!(stats.requeued >= 1, "the lost node's tasks were re-queued: {stats:?}");
    anyhow::ensure!(stats.finished == 6, "six results delivered: {stats:?}");
    // Lost within lost_after (2 s) plus a heartbeat, then the tasks re-ran (1.5 s).
    anyhow::ensure!(killed_at.elapsed() < Duration::from_secs(8), "recovery took {:?}", killed_at.elapsed());
    // A replacement joins under the same rank.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = pool.stats().await?.ready_nodes;
        if ready == 3 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "replacement never joined ({ready} ready)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ranks: Vec<u32> = pool.broadcast(rank()).await?;
    anyhow::ensure!(ranks == vec![0, 1, 2], "ranks after replacement {ranks:?}");
    anyhow::ensure!(leftover(&id).len() == 3 && !leftover(&id).contains(&victim));
    pool.shutdown().await?;
    assert_no_workers(&id)
}

#[skyward::function]
async fn rank() -> u32 {
    skyward::instance_info().rank
}

async fn broken_worker() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("skyward-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("skyward-worker");
    std::fs::write(&script, "#!/bin/sh\necho 'fatal: cannot open /dev/nvidia0: permission denied' >&2\nexit 1\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let started = Instant::now();
    let err = skyward::Compute::new(skyward::Local::default().worker_binary(&script))
        .nodes(2)
        .options(crate::support::test_options())
        .start()
        .await
        .expect_err("a worker that exits cannot start a pool");
    let text = err.to_string();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(text.contains("exited before connecting") && text.contains("permission denied"), "error was: {text}");
    anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "took {:?} (start_timeout is 60 s)", started.elapsed());
    Ok(())
}

#[skyward::function]
async fn facts() -> (u32, u32, usize) {
    let info = skyward::instance_info();
    (info.rank, info.node_count, info.peers.len())
}

/// Node facts travel on each lane once per membership change: tasks after a loss see the smaller
/// pool, and tasks after the replacement joined see the full pool again, on every node.
async fn facts_follow_membership() -> anyhow::Result<()> {
    let pool = pool(3, 4).await?;
    let id = pool.pool_id().to_string();
    // Every lane of every node has carried the 3-node facts.
    for _ in 0..4 {
        let all = pool.broadcast(facts()).await?;
        anyhow::ensure!(all == vec![(0, 3, 3), (1, 3, 3), (2, 3, 3)], "before the loss: {all:?}");
    }
    let victim = leftover(&id)[0];
    // SAFETY: sending SIGKILL to a worker process this test started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    // While the pool has two nodes (until the replacement joins), a task sees two. The task
    // manager answers in order, so two ready nodes before and after the call mean the call was
    // dispatched with two.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut saw_loss, mut degraded_checks) = (false, 0);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the lost node was not noticed and replaced in time (loss seen: {saw_loss})");
        let before = pool.stats().await?.ready_nodes;
        if before == 3 && saw_loss {
            break;
        }
        if before == 2 {
            saw_loss = true;
            let seen = pool.run(facts()).await?;
            if pool.stats().await?.ready_nodes == 2 {
                anyhow::ensure!(seen.1 == 2 && seen.2 == 2, "a task during the loss saw {seen:?}");
                degraded_checks += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("facts checked {degraded_checks} times while the pool had two nodes");
    for _ in 0..4 {
        let all = pool.broadcast(facts()).await?;
        anyhow::ensure!(all == vec![(0, 3, 3), (1, 3, 3), (2, 3, 3)], "after the replacement: {all:?}");
    }
    pool.shutdown().await?;
    assert_no_workers(&id)
}
