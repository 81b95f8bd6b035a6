//! The scale scenario's simulated provider: every node is a real worker (`skyward_worker::run_with`:
//! the real session, QUIC with mutual TLS, lanes, heartbeats, cluster views) running inside one
//! "sim host" process, with function calls served in that process instead of by an executor
//! process per node. The coordinator under test runs in its own process, so its RSS is its own.
//!
//! Roles, chosen by `SKYWARD_PEERS_ROLE`: the bench's main process starts `scale`, which starts
//! Compute on [`Sim`]; `Sim` starts one `sim-host` and sends it a line per node on its stdin
//! (`start <config path>` / `stop <node id>`).

use futures::future::BoxFuture;
use skyward::providers::{Instance, InstanceState, Offer, PoolContext, Provider, ProviderError, ProvisionRequest, WorkerLayout};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};

pub(crate) const ROLE_ENV: &str = "SKYWARD_PEERS_ROLE";
const NAME: &str = "sim";

/// Nodes as workers inside one sim-host process.
#[derive(Debug, Clone)]
pub(crate) struct Sim {
    host: Arc<Mutex<Option<std::process::Child>>>,
    nodes: Arc<Mutex<HashMap<String, (String, String)>>>,
    /// Local's binary cache on this machine, shared by every sim node.
    cache_dir: std::path::PathBuf,
    local: skyward::Local,
}

impl Sim {
    pub(crate) fn new() -> Self {
        let cache_dir = skyward::providers::local::skyward_home().join("cache").join("bin");
        Self { host: Arc::default(), nodes: Arc::default(), cache_dir, local: skyward::Local::default() }
    }

    fn send(&self, line: &str) -> Result<(), ProviderError> {
        let mut host = self.host.lock().expect("sim host");
        let child = host.as_mut().ok_or_else(|| failed("send", "the sim host is not running".into()))?;
        let stdin = child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).map_err(|e| failed("send", format!("sim host: {e}")))
    }

    /// Pid of the sim host (to read its RSS).
    pub(crate) fn host_pid(&self) -> Option<u32> {
        self.host.lock().expect("sim host").as_ref().map(std::process::Child::id)
    }
}

fn failed(operation: &'static str, message: String) -> ProviderError {
    ProviderError::Failed { provider: NAME, operation, message }
}

impl Provider for Sim {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        true
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async { Ok(vec![skyward::providers::offers::this_machine(NAME, "sim-node")]) })
    }

    fn offer_ttl(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&pool.state_dir).map_err(|e| failed("prepare", e.to_string()))?;
            std::fs::create_dir_all(&self.cache_dir).map_err(|e| failed("prepare", e.to_string()))?;
            let exe = std::env::current_exe().map_err(|e| failed("prepare", e.to_string()))?;
            let log = std::fs::File::create(pool.state_dir.join("sim-host.log")).map_err(|e| failed("prepare", e.to_string()))?;
            let child = std::process::Command::new(exe)
                .env(ROLE_ENV, "sim-host")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| failed("prepare", format!("cannot start the sim host: {e}")))?;
            *self.host.lock().expect("sim host") = Some(child);
            Ok(())
        })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: ProvisionRequest) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            use std::os::unix::fs::OpenOptionsExt;
            let path = pool.state_dir.join(format!("{}.toml", request.node_id));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| failed("provision", e.to_string()))?;
            file.write_all(request.worker_config.expose().as_bytes()).map_err(|e| failed("provision", e.to_string()))?;
            self.send(&format!("start {}", path.display()))?;
            let id = format!("sim-{}", request.node_id);
            self.nodes.lock().expect("sim nodes").insert(id.clone(), (request.node_id.clone(), pool.pool_id.clone()));
            Ok(instance(&id, &request.node_id, &pool.pool_id, InstanceState::Running))
        })
    }

    fn get_instance<'a>(&'a self, _pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            Ok(self.nodes.lock().expect("sim nodes").get(id).map(|(node, pool)| instance(id, node, pool, InstanceState::Running)))
        })
    }

    fn terminate<'a>(&'a self, _pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let node = self.nodes.lock().expect("sim nodes").remove(id);
            if let Some((node_id, _)) = node {
                self.send(&format!("stop {node_id}"))?;
            }
            Ok(())
        })
    }

    fn teardown<'a>(&'a self, _pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.nodes.lock().expect("sim nodes").clear();
            self.emergency_stop();
            Ok(())
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .nodes
                .lock()
                .expect("sim nodes")
                .iter()
                .filter(|(_, (_, pool))| pool_id.is_none_or(|p| p == pool))
                .map(|(id, (node, pool))| instance(id, node, pool, InstanceState::Running))
                .collect())
        })
    }

    fn worker_layout(&self, pool: &PoolContext, node_id: &str) -> WorkerLayout {
        WorkerLayout {
            cache_dir: self.cache_dir.clone(),
            state_dir: pool.state_dir.join(node_id),
            on_silence: skyward_proto::SilenceAction::Exit,
        }
    }

    fn coordinator_bind(&self, _pool: &PoolContext) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    }

    fn stage_binary<'a>(
        &'a self,
        pool: &'a PoolContext,
        path: &'a std::path::Path,
        hash_hex: &'a str,
    ) -> BoxFuture<'a, Result<bool, ProviderError>> {
        // The sim nodes use Local's shared cache (see `new`), so Local stages for them: once,
        // atomically, whatever the number of nodes.
        self.local.stage_binary(pool, path, hash_hex)
    }

    fn emergency_teardown(&self, _pool: &PoolContext) {
        self.emergency_stop();
    }
}

impl Sim {
    fn emergency_stop(&self) {
        if let Some(mut child) = self.host.lock().expect("sim host").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn instance(id: &str, node_id: &str, pool_id: &str, state: InstanceState) -> Instance {
    Instance { id: id.into(), node_id: node_id.into(), pool_id: pool_id.into(), state, address: Some("127.0.0.1".into()) }
}

/// The sim host: a worker per `start` line, until stdin closes.
pub(crate) fn host_main() -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let inline: skyward_worker::InlineCalls = Arc::new(|name: String, args: bytes::Bytes| {
        Box::pin(async move {
            match skyward_function::lookup(&name).map(|f| f.invoke) {
                Some(skyward_function::Invoke::Unary(body)) => body(args).await,
                _ => Err(skyward::RemoteError::new(skyward::RemoteErrorKind::Worker, format!("no unary function {name} here"))),
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    });
    let mut workers: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("start", path)) => match skyward_worker::config::WorkerConfig::load(std::path::Path::new(path)) {
                Ok(config) => {
                    let node = config.node_id.clone();
                    let task = runtime.spawn(skyward_worker::run_with(config, Some(Arc::clone(&inline))));
                    workers.insert(node, task.abort_handle());
                }
                Err(e) => eprintln!("sim host: {e}"),
            },
            Some(("stop", node)) => {
                if let Some(task) = workers.remove(node) {
                    task.abort();
                }
            }
            _ => eprintln!("sim host: unknown line {line:?}"),
        }
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(0)
}
