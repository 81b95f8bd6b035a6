//! Teardown: no worker process remains after shutdown, drop, an error, a panic, or Ctrl-C.

use crate::support::{CHILD_MODE, assert_no_workers, block_on, leftover, pool};
use crate::tests_dispatch::slow_echo;
use libtest_mimic::Trial;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn trials() -> Vec<Trial> {
    vec![
        Trial::test("teardown::shutdown_and_drop_leave_no_worker", || block_on(shutdown_and_drop())),
        Trial::test("teardown::calls_waiting_at_shutdown_get_pool_closed", || block_on(waiting_at_shutdown())),
        Trial::test("teardown::ctrl_c_leaves_no_worker", || child("wait", true)),
        Trial::test("teardown::killed_coordinator_workers_end_themselves", killed_coordinator),
        Trial::test("teardown::error_exit_leaves_no_worker", || child("error", false)),
        Trial::test("teardown::panic_leaves_no_worker", || child("panic", false)),
    ]
}

async fn shutdown_and_drop() -> anyhow::Result<()> {
    let a = pool(2, 1).await?;
    let a_id = a.pool_id().to_string();
    anyhow::ensure!(leftover(&a_id).len() == 2, "two workers while running");
    a.shutdown().await?;
    assert_no_workers(&a_id)?;

    let b = pool(2, 1).await?;
    let b_id = b.pool_id().to_string();
    drop(b);
    assert_no_workers(&b_id)
}

/// A call running on a node, one queued behind it, and a gather that submits more after the
/// pool shut down: each gets `PoolClosed`, none hangs (the task manager's book is closed when
/// its actor stops, whoever holds the book).
async fn waiting_at_shutdown() -> anyhow::Result<()> {
    use futures::StreamExt;
    // A gather window of one: the gather's second call is submitted only once its first is
    // answered, which is after the shutdown.
    let options = skyward::Options { max_in_flight: 1, ..skyward::Options::default() };
    let pool = crate::support::pool_with(1, 1, options).await?;
    let running = pool.submit(slow_echo(60_000, 1));
    let queued = pool.submit(slow_echo(60_000, 1));
    let gather = pool.gather_unordered((0..2).map(|_| slow_echo(60_000, 1)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().await?.running < 1 {
        anyhow::ensure!(Instant::now() < deadline, "the first call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pool.shutdown().await?;
    let closed = |r: Result<u32, skyward::Error>| -> anyhow::Result<()> {
        match r {
            Err(e) if matches!(e.task_error(), Some(skyward::TaskError::PoolClosed)) => Ok(()),
            other => anyhow::bail!("expected PoolClosed, got {other:?}"),
        }
    };
    let answers = tokio::time::timeout(Duration::from_secs(10), async {
        let gathered: Vec<_> = gather.collect().await;
        (running.await, queued.await, gathered)
    })
    .await
    .map_err(|_| anyhow::anyhow!("a call waiting at shutdown was never answered"))?;
    closed(answers.0)?;
    closed(answers.1)?;
    anyhow::ensure!(answers.2.len() == 2, "the gather yielded {} of its 2 calls", answers.2.len());
    for (_, r) in answers.2 {
        closed(r)?;
    }
    Ok(())
}

/// Start this test binary in a child mode, read the pool id it prints, optionally send SIGINT,
/// and check that the child exits and leaves no worker behind.
fn child(mode: &str, interrupt: bool) -> Result<(), libtest_mimic::Failed> {
    let (mut child, pool_id) = spawn_child(mode)?;
    if interrupt {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("child in mode {mode} did not exit").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if interrupt && status.code() != Some(130) {
        return Err(format!("Ctrl-C exit status {status:?}, expected 130").into());
    }
    assert_no_workers(&pool_id).map_err(|e| e.to_string().into())
}

/// SIGKILL the coordinator: no handler runs, so the workers must notice the silence and end
/// themselves within instance_timeout (3 s in child mode).
fn killed_coordinator() -> Result<(), libtest_mimic::Failed> {
    let (mut child, pool_id) = spawn_child("wait")?;
    if leftover(&pool_id).len() != 2 {
        return Err("two workers expected before the kill".into());
    }
    child.kill().map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    let killed = Instant::now();
    while !leftover(&pool_id).is_empty() {
        if killed.elapsed() > Duration::from_secs(15) {
            return Err(format!("workers of {pool_id} still running 15 s after the coordinator died").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("workers ended {:?} after the coordinator was killed", killed.elapsed());
    Ok(())
}

/// Start this test binary in child `mode` and read the pool id it prints once its pool is up.
pub(crate) fn spawn_child(mode: &str) -> Result<(std::process::Child, String), libtest_mimic::Failed> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start child: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
    let pool_id = line.trim().strip_prefix("POOL ").ok_or_else(|| format!("child printed {line:?}"))?.to_string();
    Ok((child, pool_id))
}
