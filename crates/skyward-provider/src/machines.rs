//! Clouds that rent whole machines (or containers with SSH) through an HTTP API.
//!
//! A cloud implements `Cloud`: the API half of a provider (offers, per-pool resources, create,
//! look up, delete, list by tag). What is the same for every cloud lives here, once: confirming
//! a termination by polling, tearing a pool down and checking nothing tagged is left, waiting
//! for a machine to run, and the naming rule that tags providers without labels.
//!
//! Naming invariant: every machine is named `skyward-<node id>` (the node id starts with the pool
//! id), so a leak sweep finds a pool's machines by name on clouds without tags.

use crate::{PoolContext, ProviderError};
use futures::future::BoxFuture;
use std::fmt;
use std::time::{Duration, Instant};

/// Lifecycle of a machine as its cloud reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Created, not yet reachable.
    Pending,
    /// Running with an SSH endpoint.
    Running,
    /// Stopped by the cloud (a preempted spot machine); never comes back by itself.
    Stopped,
    /// Deleted or exited.
    Gone,
}

/// Where to reach a machine's sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshEndpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
}

/// A machine as its cloud reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Cloud id.
    pub id: String,
    /// Name (`skyward-<node id>`) or label.
    pub name: String,
    /// State.
    pub state: MachineState,
    /// SSH endpoint once known.
    pub ssh: Option<SshEndpoint>,
    /// Private address other machines of the pool reach it at, if the cloud has one.
    pub private_ip: Option<String>,
}

impl Machine {
    /// `(pool id, node id)` from the machine's name, when it is one of ours.
    pub fn tags(&self) -> Option<(String, String)> {
        parse_machine_name(&self.name)
    }
}

/// What a cloud needs to create one machine.
#[derive(Debug, Clone)]
pub struct MachineRequest {
    /// `skyward-<node id>`.
    pub name: String,
    /// Node id.
    pub node_id: String,
    /// The pool's SSH public key (OpenSSH format) to authorise for the login user.
    pub ssh_public_key: String,
    /// Seconds of coordinator silence after which the machine ends itself (armed before the
    /// worker runs, so a machine whose bootstrap never happens still goes away).
    pub instance_timeout_secs: u64,
}

/// Name of the machine for `node_id`.
pub fn machine_name(node_id: &str) -> String {
    format!("skyward-{node_id}")
}

/// `(pool id, node id)` of a machine named by `machine_name`: node ids are
/// `<pool id>-r<rank>-g<generation>`.
pub fn parse_machine_name(name: &str) -> Option<(String, String)> {
    let node = name.strip_prefix("skyward-")?;
    let (rest, g) = node.rsplit_once("-g")?;
    let (pool, r) = rest.rsplit_once("-r")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(g) && digits(r) && !pool.is_empty()).then(|| (pool.to_string(), node.to_string()))
}

/// The API half of a cloud provider.
pub trait Cloud: Send + Sync + fmt::Debug + 'static {
    /// Short lower-case name.
    fn name(&self) -> &'static str;

    /// Whether machines share a private network (cluster mode by default).
    fn cluster_by_default(&self) -> bool;

    /// The whole catalog, normalised.
    fn offers(&self) -> BoxFuture<'_, Result<Vec<crate::Offer>, ProviderError>>;

    /// Offer cache key (name plus configuration that changes the catalog).
    fn offer_cache_key(&self) -> String {
        self.name().to_string()
    }

    /// How long a catalog stays fresh.
    fn offer_ttl(&self) -> Duration {
        Duration::from_secs(24 * 3600)
    }

    /// Create per-pool resources (keys, security groups, networks). Idempotent.
    fn prepare<'a>(&'a self, pool: &'a PoolContext, ssh_public_key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Ask for one machine of `pool.placement`; returns as soon as the cloud accepted it.
    fn provision<'a>(&'a self, pool: &'a PoolContext, request: &'a MachineRequest) -> BoxFuture<'a, Result<Machine, ProviderError>>;

    /// The machine `id`; `None` when the cloud no longer knows it.
    fn get_instance<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Machine>, ProviderError>>;

    /// Ask for `id` to be deleted; already gone counts as done. Confirmation is `terminate`'s.
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Machines of `pool_id` (every skyward machine when `None`).
    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Machine>, ProviderError>>;

    /// Remove per-pool resources created by `prepare` (after every machine is gone).
    fn cleanup<'a>(&'a self, _pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    /// How often state is polled.
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(2)
    }
}

/// Delete `id` and poll until the cloud says it is gone; `Leaked` when it still exists after
/// `within`.
pub async fn terminate(cloud: &dyn Cloud, id: &str, within: Duration) -> Result<(), ProviderError> {
    let deadline = Instant::now() + within;
    loop {
        let last = match cloud.delete(id).await {
            Ok(()) => match cloud.get_instance(id).await {
                Ok(None) => return Ok(()),
                Ok(Some(m)) if m.state == MachineState::Gone => return Ok(()),
                Ok(Some(m)) => format!("still {:?}", m.state),
                Err(e) => e.to_string(),
            },
            Err(e) => {
                tracing::warn!(provider = cloud.name(), machine = id, error = %e, "delete failed; retrying");
                e.to_string()
            }
        };
        if Instant::now() >= deadline {
            return Err(leaked(cloud, id, last));
        }
        tokio::time::sleep(cloud.poll_interval()).await;
    }
}

fn leaked(cloud: &dyn Cloud, id: &str, message: String) -> ProviderError {
    ProviderError::Leaked { provider: cloud.name(), instance: id.to_string(), message }
}

/// Terminate every machine tagged with the pool, remove the pool's resources, and check that
/// nothing tagged is left.
pub async fn teardown(cloud: &dyn Cloud, pool: &PoolContext, within: Duration) -> Result<(), ProviderError> {
    let machines = cloud.list_tagged(Some(&pool.pool_id)).await?;
    let results =
        futures::future::join_all(machines.iter().filter(|m| m.state != MachineState::Gone).map(|m| terminate(cloud, &m.id, within))).await;
    let mut first_error = results.into_iter().find_map(Result::err);
    if let Err(e) = cloud.cleanup(pool).await {
        first_error.get_or_insert(e);
    }
    let left: Vec<Machine> = cloud.list_tagged(Some(&pool.pool_id)).await?.into_iter().filter(|m| m.state != MachineState::Gone).collect();
    if let Some(m) = left.first() {
        return Err(leaked(cloud, &m.id, format!("still listed after teardown ({} machine(s))", left.len())));
    }
    first_error.map_or(Ok(()), Err)
}

/// Poll `id` until it runs with an SSH endpoint. A machine that is gone or stopped is a
/// capacity failure (preempted or never placed); silence past `within` is an error.
pub async fn wait_running(cloud: &dyn Cloud, id: &str, within: Duration) -> Result<Machine, ProviderError> {
    let deadline = Instant::now() + within;
    let mut polls = 0u32;
    loop {
        polls += 1;
        match cloud.get_instance(id).await? {
            Some(m) if m.state == MachineState::Running && m.ssh.is_some() => return Ok(m),
            Some(m) if matches!(m.state, MachineState::Gone | MachineState::Stopped) => {
                return Err(ProviderError::NoCapacity {
                    provider: cloud.name(),
                    message: format!("machine {id} went {:?} before it ran (preempted or not placed)", m.state),
                });
            }
            None => {
                return Err(ProviderError::NoCapacity {
                    provider: cloud.name(),
                    message: format!("machine {id} disappeared before it ran"),
                });
            }
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(ProviderError::Failed {
                provider: cloud.name(),
                operation: "waiting for a machine",
                message: format!("{id} not running with an SSH endpoint after {within:?} ({polls} polls)"),
            });
        }
        tokio::time::sleep(cloud.poll_interval()).await;
    }
}

/// The shell line a machine runs first: arm a shutdown after `secs` unless the worker (which
/// owns the self-destruct timer once it runs) replaces it. Used by clouds that take a start
/// command.
pub fn dead_man_switch(secs: u64) -> String {
    format!("(sleep {secs} && [ ! -e /var/lib/skyward/state/worker.pid ] && (shutdown -h now || kill -TERM 1)) >/dev/null 2>&1 &")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = machine_name("sky-0123abcd45-r3-g1");
        assert_eq!(n, "skyward-sky-0123abcd45-r3-g1");
        assert_eq!(parse_machine_name(&n), Some(("sky-0123abcd45".into(), "sky-0123abcd45-r3-g1".into())));
        for bad in ["skyward-x", "other-sky-1-r1-g1", "skyward-sky-1-r-g1", "skyward--r1-g2", "skyward-sky-1-r1-gx"] {
            assert_eq!(parse_machine_name(bad), None, "{bad}");
        }
    }
}

/// Settings of the machine lifecycle shared by every cloud.
#[derive(Debug, Clone)]
pub struct MachineSettings {
    /// How long a machine may take to run with an SSH endpoint.
    pub provision_timeout: Duration,
    /// How long sshd may take to accept the pool key once the machine runs.
    pub ssh_timeout: Duration,
    /// How long a termination may take to be confirmed.
    pub terminate_timeout: Duration,
    /// Coordinator silence after which a machine ends itself before its worker runs.
    pub instance_timeout: Duration,
    /// The static worker to install (default: next to this program).
    pub worker_binary: Option<std::path::PathBuf>,
}

impl Default for MachineSettings {
    fn default() -> Self {
        Self {
            provision_timeout: Duration::from_secs(300),
            ssh_timeout: Duration::from_secs(180),
            terminate_timeout: Duration::from_secs(120),
            instance_timeout: Duration::from_secs(300),
            worker_binary: None,
        }
    }
}

struct PreparedPool {
    key: skyward_ssh::PoolKey,
    payload: crate::payload::Payload,
    /// SSH sessions kept after bootstraps (standalone tunnels run through them), per machine id.
    sessions: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<skyward_ssh::Session>>>,
}

/// Any `Cloud` as a `Provider`: machines are created through the cloud's API, then reached over
/// SSH with the pool's key and bootstrapped exactly like containers (worker, image, files).
pub struct CloudProvider {
    cloud: std::sync::Arc<dyn Cloud>,
    settings: MachineSettings,
    pools: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<PreparedPool>>>,
}

impl fmt::Debug for CloudProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudProvider").field("cloud", &self.cloud).field("settings", &self.settings).finish()
    }
}

impl CloudProvider {
    /// Wrap `cloud`.
    pub fn new(cloud: impl Cloud, settings: MachineSettings) -> Self {
        Self { cloud: std::sync::Arc::new(cloud), settings, pools: Default::default() }
    }

    /// Install this static worker on the machines instead of the one next to this program.
    pub fn worker_binary(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.settings.worker_binary = Some(path.into());
        self
    }

    /// The cloud's API half.
    pub fn cloud(&self) -> &dyn Cloud {
        &*self.cloud
    }

    fn pool(&self, pool_id: &str) -> Result<std::sync::Arc<PreparedPool>, ProviderError> {
        self.pools.lock().expect("cloud pools").get(pool_id).cloned().ok_or_else(|| ProviderError::Failed {
            provider: self.cloud.name(),
            operation: "lookup",
            message: format!("pool {pool_id} was not prepared"),
        })
    }

    async fn bring_up(
        &self,
        pool: &PoolContext,
        prepared: &PreparedPool,
        request: &crate::ProvisionRequest,
        machine: &Machine,
    ) -> Result<Machine, ProviderError> {
        let name = self.cloud.name();
        let running = wait_running(&*self.cloud, &machine.id, self.settings.provision_timeout).await?;
        let ssh = running.ssh.clone().expect("wait_running returns an endpoint");
        let target = skyward_ssh::Target { host: ssh.host.clone(), port: ssh.port, user: ssh.user.clone() };
        // The host key is pinned at the first connection (a fresh machine has no known key).
        let pin = skyward_ssh::HostKeyPin::new();
        let session = skyward_ssh::Session::connect_with_backoff(&target, &prepared.key, &pin, self.settings.ssh_timeout)
            .await
            .map_err(|e| ProviderError::Failed { provider: name, operation: "connecting over SSH", message: e.to_string() })?;
        let root = remote_root(&ssh.user);
        let syncs: Vec<(&str, &[u8])> = prepared.payload.syncs.iter().map(|s| (s.remote.as_str(), s.archive.as_slice())).collect();
        let plan = skyward_ssh::BootstrapPlan {
            node: &request.node_id,
            pool_id: &pool.pool_id,
            remote_root: &root,
            worker_binary: &prepared.payload.worker,
            worker_sha256: &prepared.payload.worker_sha256,
            worker_config: request.worker_config.expose(),
            image: prepared.payload.image_script.as_ref().map(|(s, h)| (s.as_str(), h.as_str())),
            syncs: &syncs,
        };
        if let Err(e) = skyward_ssh::bootstrap(&session, &plan).await {
            session.close().await;
            return Err(ProviderError::Bootstrap { provider: name, message: e.to_string() });
        }
        prepared.sessions.lock().expect("cloud sessions").insert(running.id.clone(), std::sync::Arc::new(session));
        Ok(running)
    }
}

fn remote_root(user: &str) -> String {
    if user == "root" { "/var/lib/skyward".into() } else { format!("/home/{user}/.skyward") }
}

fn instance_of(pool_id: &str, m: &Machine) -> crate::Instance {
    let (pool, node) = m.tags().unwrap_or_else(|| (pool_id.to_string(), String::new()));
    crate::Instance {
        id: m.id.clone(),
        node_id: node,
        pool_id: pool,
        state: match m.state {
            MachineState::Running => crate::InstanceState::Running,
            MachineState::Pending | MachineState::Stopped => crate::InstanceState::Pending,
            MachineState::Gone => crate::InstanceState::Terminated,
        },
        address: m.private_ip.clone().or_else(|| m.ssh.as_ref().map(|s| s.host.clone())),
    }
}

impl crate::Provider for CloudProvider {
    fn name(&self) -> &'static str {
        self.cloud.name()
    }

    fn cluster_by_default(&self) -> bool {
        self.cloud.cluster_by_default()
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<crate::Offer>, ProviderError>> {
        self.cloud.offers()
    }

    fn offer_cache_key(&self) -> String {
        self.cloud.offer_cache_key()
    }

    fn offer_ttl(&self) -> Duration {
        self.cloud.offer_ttl()
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let name = self.cloud.name();
            std::fs::create_dir_all(&pool.state_dir).map_err(|e| ProviderError::Failed {
                provider: name,
                operation: "prepare",
                message: format!("cannot create {}: {e}", pool.state_dir.display()),
            })?;
            let payload = crate::payload::prepare(name, self.settings.worker_binary.as_deref(), pool).await?;
            let key = skyward_ssh::PoolKey::load_or_create(&pool.state_dir.join("ssh")).map_err(|e| ProviderError::Failed {
                provider: name,
                operation: "prepare",
                message: e.to_string(),
            })?;
            self.cloud.prepare(pool, key.public_openssh()).await?;
            let prepared = PreparedPool { key, payload, sessions: Default::default() };
            self.pools.lock().expect("cloud pools").insert(pool.pool_id.clone(), std::sync::Arc::new(prepared));
            Ok(())
        })
    }

    fn provision<'a>(
        &'a self,
        pool: &'a PoolContext,
        request: crate::ProvisionRequest,
    ) -> BoxFuture<'a, Result<crate::Instance, ProviderError>> {
        Box::pin(async move {
            let prepared = self.pool(&pool.pool_id)?;
            let machine_request = MachineRequest {
                name: machine_name(&request.node_id),
                node_id: request.node_id.clone(),
                ssh_public_key: prepared.key.public_openssh().to_string(),
                instance_timeout_secs: self.settings.instance_timeout.as_secs().max(60),
            };
            let machine = self.cloud.provision(pool, &machine_request).await?;
            match self.bring_up(pool, &prepared, &request, &machine).await {
                Ok(running) => Ok(instance_of(&pool.pool_id, &running)),
                Err(e) => {
                    // Nothing half-made stays behind: the machine goes with its failed start.
                    if let Err(t) = terminate(&*self.cloud, &machine.id, self.settings.terminate_timeout).await {
                        tracing::error!(machine = %machine.id, error = %t, "could not remove a machine whose start failed");
                    }
                    Err(e)
                }
            }
        })
    }

    fn get_instance<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<Option<crate::Instance>, ProviderError>> {
        Box::pin(async move { Ok(self.cloud.get_instance(id).await?.map(|m| instance_of(&pool.pool_id, &m))) })
    }

    fn terminate<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let session = self.pool(&pool.pool_id).ok().and_then(|p| p.sessions.lock().expect("cloud sessions").remove(id));
            if let Some(s) = session {
                s.close().await;
            }
            terminate(&*self.cloud, id, self.settings.terminate_timeout).await
        })
    }

    fn teardown<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let prepared = self.pools.lock().expect("cloud pools").remove(&pool.pool_id);
            if let Some(p) = prepared {
                let sessions: Vec<_> = p.sessions.lock().expect("cloud sessions").drain().map(|(_, s)| s).collect();
                for s in sessions {
                    s.close().await;
                }
            }
            teardown(&*self.cloud, pool, self.settings.terminate_timeout).await
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<crate::Instance>, ProviderError>> {
        Box::pin(async move {
            let machines = self.cloud.list_tagged(pool_id).await?;
            Ok(machines.iter().map(|m| instance_of(pool_id.unwrap_or_default(), m)).collect())
        })
    }

    fn worker_layout(&self, _pool: &PoolContext, _node_id: &str) -> crate::WorkerLayout {
        let root = std::path::PathBuf::from(remote_root("root"));
        crate::WorkerLayout {
            cache_dir: root.join("cache"),
            state_dir: root.join("state"),
            on_silence: skyward_proto::SilenceAction::Poweroff,
        }
    }

    fn open_tunnel<'a>(
        &'a self,
        pool: &'a PoolContext,
        instance_id: &'a str,
        socket: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Box<dyn crate::TunnelIo>, ProviderError>> {
        Box::pin(async move {
            let name = self.cloud.name();
            let prepared = self.pool(&pool.pool_id)?;
            let session = prepared.sessions.lock().expect("cloud sessions").get(instance_id).cloned().ok_or_else(|| {
                ProviderError::Failed { provider: name, operation: "opening a tunnel", message: format!("no SSH session to {instance_id}") }
            })?;
            let socket =
                socket.to_str().ok_or_else(|| ProviderError::Invalid { provider: name, message: "socket path is not UTF-8".into() })?;
            let stream = session.open_unix_stream(socket).await.map_err(|e| ProviderError::Failed {
                provider: name,
                operation: "opening a tunnel",
                message: e.to_string(),
            })?;
            Ok(Box::new(stream) as Box<dyn crate::TunnelIo>)
        })
    }

    fn emergency_teardown(&self, pool: &PoolContext) {
        // Drop and signal paths may have no runtime: run the teardown on a thread of its own,
        // bounded, so machines are not left to their self-destruct timers when it can be helped.
        let cloud = std::sync::Arc::clone(&self.cloud);
        let pool = pool.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(20), teardown(&*cloud, &pool, Duration::from_secs(15))).await
                });
            }
        });
        let _ = done.join();
    }
}
