//! Shared helpers: a runtime per test, pool construction, process-table checks, child modes.

use skyward::{Compute, Local, Options, Pool, Worker};
use std::time::Duration;

/// Run an async test body on its own runtime, turning errors into test failures.
pub(crate) fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> Result<(), libtest_mimic::Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(f).map_err(|e| format!("{e:#}").into())
}

/// Options with short failure detection for tests.
pub(crate) fn test_options() -> Options {
    Options {
        heartbeat_interval: Duration::from_millis(200),
        lost_after: Duration::from_secs(2),
        instance_timeout: Duration::from_secs(20),
        start_timeout: Duration::from_secs(60),
        ..Options::default()
    }
}

/// A Local pool of `nodes` workers with `concurrency` slots each.
pub(crate) async fn pool(nodes: u32, concurrency: u32) -> anyhow::Result<Pool> {
    pool_in_mode(nodes, concurrency, Mode::Cluster).await
}

/// Cluster mode (workers dial the coordinator) or standalone mode (the coordinator reaches each
/// worker through the provider; QUIC runs inside that stream). The dispatch suites run in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Cluster,
    Standalone,
}

impl Mode {
    pub(crate) fn options(self) -> Options {
        Options { cluster: Some(self == Mode::Cluster), ..test_options() }
    }
}

/// A Local pool in `mode`.
pub(crate) async fn pool_in_mode(nodes: u32, concurrency: u32, mode: Mode) -> anyhow::Result<Pool> {
    pool_with(nodes, concurrency, mode.options()).await
}

/// A Local pool of `nodes` workers with `concurrency` slots each, started with `options`.
pub(crate) async fn pool_with(nodes: u32, concurrency: u32, options: Options) -> anyhow::Result<Pool> {
    Ok(Compute::new(Local::default()).nodes(nodes).worker(Worker { concurrency }).options(options).start().await?)
}

/// Worker processes of `pool_id` still in the process table.
pub(crate) fn leftover(pool_id: &str) -> Vec<u32> {
    skyward::providers::local::scan_process_table(Some(pool_id)).into_iter().map(|(pid, _)| pid).collect()
}

/// Fail unless no worker of `pool_id` is left.
pub(crate) fn assert_no_workers(pool_id: &str) -> anyhow::Result<()> {
    let left = leftover(pool_id);
    anyhow::ensure!(left.is_empty(), "worker processes of {pool_id} still running: {left:?}");
    Ok(())
}

/// The Container provider as the tests use it: an internal network (nothing outside reachable).
pub(crate) fn container_provider() -> skyward::Container {
    skyward::Container::default().isolated(true)
}

/// Instance timeout of the container pool whose coordinator the teardown test kills.
pub(crate) const CONTAINER_SILENCE: Duration = Duration::from_secs(10);

/// Environment variable that turns this test binary into a helper program for teardown tests.
pub(crate) const CHILD_MODE: &str = "SKYWARD_TEST_CHILD";

/// Child modes: start a pool, print its id, then wait (for Ctrl-C) or fail (error path).
pub(crate) fn run_child_mode() -> bool {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return false };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        // A short instance timeout: the SIGKILL test waits for the workers to notice the silence.
        let pool = if mode == "container-wait" {
            let options = Options { instance_timeout: CONTAINER_SILENCE, ..test_options() };
            Compute::new(container_provider()).nodes(2).options(options).start().await.expect("child container pool starts")
        } else {
            let options = Options { instance_timeout: Duration::from_secs(3), ..test_options() };
            Compute::new(Local::default()).nodes(2).options(options).start().await.expect("child pool starts")
        };
        println!("POOL {}", pool.pool_id());
        use std::io::Write;
        std::io::stdout().flush().ok();
        match mode.as_str() {
            "wait" | "container-wait" => {
                // Park until the parent interrupts us; the Ctrl-C handler tears down and exits.
                std::future::pending::<()>().await;
            }
            "error" => {
                // User code that bails out with `?` while it owns the pool.
                async fn user_code(pool: Pool) -> anyhow::Result<()> {
                    let _pool = pool;
                    Err(anyhow::anyhow!("simulated failure in user code"))?;
                    Ok(())
                }
                let result = user_code(pool).await;
                std::process::exit(if result.is_err() { 7 } else { 0 });
            }
            "panic" => {
                let _keep = pool;
                panic!("simulated panic in user code");
            }
            other => panic!("unknown child mode {other}"),
        }
    });
    true
}
