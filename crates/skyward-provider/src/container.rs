//! `Container`: nodes as local containers (docker, podman or nerdctl CLI), each with its own SSH
//! daemon, bootstrapped over SSH exactly as a cloud machine would be.
//!
//! Per pool: a network (created and removed by the pool unless the user names one), an ed25519
//! key in the pool's state directory, and containers labelled `dev.skyward.pool=<pool id>`. The
//! coordinator binds to the network's gateway address, so workers reach it through that network
//! and nothing else. Published SSH ports bind to 127.0.0.1; on an isolated (internal) network,
//! which cannot publish ports, the coordinator reaches nodes at their network address.
//!
//! The base image (Debian bookworm with openssh-server and python3) is built from local files by
//! `scripts/build-base-image.sh`, embedded here and run on first use when no image is given.

use crate::{Instance, InstanceState, Offer, PoolContext, Provider, ProviderError, ProvisionRequest, WorkerLayout};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use skyward_ssh::{BootstrapPlan, HostKeyPin, PoolKey, Session, Target};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NAME: &str = "container";

/// Label carrying the pool id on every container and network.
pub const POOL_LABEL: &str = "dev.skyward.pool";
/// Label carrying the node id on every container.
pub const NODE_LABEL: &str = "dev.skyward.node";
/// Label naming the coordinator process (`<pid>:<start time>`), so `skyward cleanup` can tell a
/// running pool from an abandoned one.
pub const OWNER_LABEL: &str = "dev.skyward.owner";

/// The base image recipe (same bytes as `scripts/build-base-image.sh`).
const BASE_IMAGE_SCRIPT: &str = include_str!("../../../scripts/build-base-image.sh");

/// Container runtime CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    /// `docker`.
    #[default]
    Docker,
    /// `podman`.
    Podman,
    /// `nerdctl`.
    Nerdctl,
}

impl Runtime {
    /// The CLI's program name.
    pub fn program(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Nerdctl => "nerdctl",
        }
    }
}

impl std::str::FromStr for Runtime {
    type Err = ProviderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "docker" => Ok(Runtime::Docker),
            "podman" => Ok(Runtime::Podman),
            "nerdctl" => Ok(Runtime::Nerdctl),
            other => Err(ProviderError::Invalid {
                provider: NAME,
                message: format!("binary {other:?} is not a supported container runtime (hint: docker, podman or nerdctl)"),
            }),
        }
    }
}

/// Local containers as nodes.
#[derive(Debug, Clone)]
pub struct Container {
    image: Option<String>,
    ssh_user: String,
    runtime: Runtime,
    container_prefix: Option<String>,
    network: Option<String>,
    isolated: bool,
    cpus: Option<f64>,
    memory_mb: Option<u64>,
    worker_binary: Option<PathBuf>,
    ssh_timeout: Duration,
    prebake: bool,
    pools: Arc<Mutex<HashMap<String, Arc<PoolState>>>>,
    timings: Arc<Mutex<Vec<(String, NodeStartTimings)>>>,
}

impl Default for Container {
    fn default() -> Self {
        Self {
            image: None,
            ssh_user: "root".into(),
            runtime: Runtime::Docker,
            container_prefix: None,
            network: None,
            isolated: false,
            cpus: None,
            memory_mb: None,
            worker_binary: None,
            ssh_timeout: Duration::from_secs(60),
            prebake: false,
            pools: Arc::default(),
            timings: Arc::default(),
        }
    }
}

#[derive(Debug)]
struct PoolState {
    network: String,
    created_network: bool,
    gateway: IpAddr,
    key: PoolKey,
    image: String,
    worker: PathBuf,
    worker_sha256: String,
    image_script: Option<(String, String)>,
    syncs: Vec<crate::sync::PackedSync>,
    nodes: Mutex<HashMap<String, NodeRecord>>,
}

#[derive(Debug, Clone)]
struct NodeRecord {
    node_id: String,
    /// The node's host key, pinned at its first SSH connection.
    pin: HostKeyPin,
    /// The SSH connection kept after the bootstrap (standalone tunnels run through it).
    session: Option<Arc<Session>>,
}

/// Where the time of one node's start went (up to the worker's start; joining is the
/// coordinator's part).
#[derive(Debug, Clone, Default)]
pub struct NodeStartTimings {
    /// From the provision call until the worker was started.
    pub total: Duration,
    /// `docker run` until it returned.
    pub run: Duration,
    /// First SSH connection (waiting for sshd included).
    pub ssh: Duration,
    /// Image script (overlaps the upload).
    pub image: Duration,
    /// Worker upload (overlaps the image script).
    pub upload: Duration,
    /// Configuration and worker start.
    pub start: Duration,
    /// Whether the worker executable had to be uploaded (not on a prebaked image).
    pub uploaded: bool,
    /// The image the node started from.
    pub image_name: String,
}

fn failed(operation: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::Failed { provider: NAME, operation, message: message.into() }
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::Invalid { provider: NAME, message: message.into() }
}

impl Container {
    /// Container image to run (default: the base image, built locally on first use). It must
    /// run sshd as its main process and install `$SKYWARD_AUTHORIZED_KEY` for `ssh_user`, as the
    /// base image's `skyward-entry` does.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// SSH user inside the container (default `root`). With another user the worker cannot end
    /// the container on coordinator silence; it exits and the container stays until cleanup.
    pub fn ssh_user(mut self, user: impl Into<String>) -> Self {
        self.ssh_user = user.into();
        self
    }

    /// Container runtime CLI: `docker` (default), `podman` or `nerdctl`.
    pub fn binary(mut self, binary: &str) -> Result<Self, ProviderError> {
        self.runtime = binary.parse()?;
        Ok(self)
    }

    /// Prefix for container and network names (default `skyward`).
    pub fn container_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.container_prefix = Some(prefix.into());
        self
    }

    /// Join this existing network instead of creating one per pool (it is not removed).
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Create the pool's network as internal: containers reach each other and the coordinator,
    /// nothing outside (apt and pip in an Image then fail). Used by the tests.
    pub fn isolated(mut self, isolated: bool) -> Self {
        self.isolated = isolated;
        self
    }

    /// CPU limit per container.
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Memory limit per container, MiB.
    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.memory_mb = Some(mb);
        self
    }

    /// The `skyward-worker` executable to install on nodes (default: `$SKYWARD_WORKER_BIN`, or
    /// one next to this executable or a directory up). It must run on the image's libc; the
    /// static build (`scripts/build-static-worker.sh`) runs anywhere.
    pub fn worker_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_binary = Some(path.into());
        self
    }

    /// How long to wait for a node's SSH server (default 60 s).
    pub fn ssh_timeout(mut self, timeout: Duration) -> Self {
        self.ssh_timeout = timeout;
        self
    }

    /// Bake the bootstrapped state (image script done, worker installed) into a local image
    /// (`skyward-prebaked:<hash>`) the first time, and start nodes from it: later pools with the
    /// same base image, Image and worker skip the bootstrap. Costs one extra container once.
    pub fn prebake(mut self, prebake: bool) -> Self {
        self.prebake = prebake;
        self
    }

    /// Start timings of every node this provider (and its clones) bootstrapped, in order.
    pub fn start_timings(&self) -> Vec<(String, NodeStartTimings)> {
        self.timings.lock().expect("timings").clone()
    }

    /// The runtime this provider drives.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    fn prefix(&self) -> &str {
        self.container_prefix.as_deref().unwrap_or("skyward")
    }

    fn pool(&self, pool_id: &str) -> Result<Arc<PoolState>, ProviderError> {
        self.pools
            .lock()
            .expect("container pools")
            .get(pool_id)
            .cloned()
            .ok_or_else(|| failed("lookup", format!("pool {pool_id} was not prepared")))
    }

    fn remote_root(&self) -> String {
        if self.ssh_user == "root" { "/var/lib/skyward".into() } else { format!("/home/{}/.skyward", self.ssh_user) }
    }

    /// Run the runtime CLI with `args`; its stdout, or an error carrying its stderr.
    async fn cli(&self, operation: &'static str, args: &[&str]) -> Result<String, ProviderError> {
        run_cli(self.runtime, operation, args).await
    }

    /// The base image's name, building it (about a minute) when it is missing.
    async fn ensure_base_image(&self, pool: &PoolContext) -> Result<String, ProviderError> {
        let script = pool.state_dir.join("build-base-image.sh");
        std::fs::write(&script, BASE_IMAGE_SCRIPT).map_err(|e| failed("prepare", format!("cannot write {}: {e}", script.display())))?;
        let started = Instant::now();
        let output = tokio::process::Command::new("bash")
            .arg(&script)
            .env("SKYWARD_CONTAINER_BINARY", self.runtime.program())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| failed("building the base image", format!("cannot run bash: {e}")))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(failed("building the base image", format!("{}: {}", output.status, stderr.trim())));
        }
        if !stderr.trim().is_empty() {
            tracing::info!(elapsed = ?started.elapsed(), "{}", stderr.trim());
        }
        let image = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if image.is_empty() {
            return Err(failed("building the base image", "the build script printed no image name"));
        }
        Ok(image)
    }

    async fn prepare_pool(&self, pool: &PoolContext) -> Result<PoolState, ProviderError> {
        std::fs::create_dir_all(&pool.state_dir)
            .map_err(|e| failed("prepare", format!("cannot create {}: {e}", pool.state_dir.display())))?;
        self.cli("checking the container runtime", &["version", "--format", "{{.Server.Version}}"]).await.map_err(|e| {
            invalid(format!("{} is not usable: {e} (hint: is the daemon running and may this user talk to it?)", self.runtime.program()))
        })?;
        let crate::payload::Payload { worker, worker_sha256, image_script, syncs } =
            crate::payload::prepare(NAME, self.worker_binary.as_deref(), pool).await?;
        let base = match &self.image {
            Some(i) => i.clone(),
            None => self.ensure_base_image(pool).await?,
        };
        let key = PoolKey::load_or_create(&pool.state_dir.join("ssh")).map_err(|e| failed("prepare", e.to_string()))?;
        let label = format!("{POOL_LABEL}={}", pool.pool_id);
        let (network, created_network) = match &self.network {
            Some(n) => (n.clone(), false),
            None => {
                let name = format!("{}-{}", self.prefix(), pool.pool_id);
                let owner = format!("{OWNER_LABEL}={}", owner_tag());
                let mut args = vec!["network", "create", "--label", &label, "--label", &owner];
                if self.isolated {
                    args.push("--internal");
                }
                args.push(&name);
                self.cli("creating the pool network", &args).await?;
                (name, true)
            }
        };
        let gateway = self
            .cli("inspecting the pool network", &["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Gateway}} {{end}}", &network])
            .await?;
        let gateway = gateway
            .split_whitespace()
            .find_map(|g| g.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4))
            .ok_or_else(|| failed("inspecting the pool network", format!("network {network} has no IPv4 gateway (got {gateway:?})")))?;
        let mut state = PoolState {
            network,
            created_network,
            gateway,
            key,
            image: base,
            worker,
            worker_sha256,
            image_script,
            syncs,
            nodes: Mutex::default(),
        };
        if self.prebake {
            state.image = self.prebaked_image(pool, &state).await?;
        }
        Ok(state)
    }

    /// `docker run` one node container (detached; removed when it exits unless `keep`).
    async fn run_container(&self, spec: RunSpec<'_>) -> Result<(), ProviderError> {
        let RunSpec { pool_id, name, node_id, network, key, image, keep } = spec;
        let pool_label = format!("{POOL_LABEL}={pool_id}");
        let node_label = format!("{NODE_LABEL}={node_id}");
        let owner_label = format!("{OWNER_LABEL}={}", owner_tag());
        let key_env = format!("SKYWARD_AUTHORIZED_KEY={}", key.public_openssh());
        let user_env = format!("SKYWARD_SSH_USER={}", self.ssh_user);
        let cpus = self.cpus.map(|c| c.to_string());
        let memory = self.memory_mb.map(|m| format!("{m}m"));
        let mut args: Vec<&str> = vec!["run", "-d", "--name", name, "--hostname", name, "--network", network];
        if !keep {
            args.push("--rm");
        }
        args.extend(["--label", &pool_label, "--label", &node_label, "--label", &owner_label, "-e", &key_env, "-e", &user_env]);
        if self.isolated {
            // No resolver outside: fail name lookups at once instead of after timeouts.
            args.extend(["--dns", "127.0.0.1"]);
        } else {
            args.extend(["-p", "127.0.0.1::22"]);
        }
        if let Some(c) = &cpus {
            args.extend(["--cpus", c]);
        }
        if let Some(m) = &memory {
            args.extend(["--memory", m]);
        }
        args.push(image);
        if let Err(e) = self.cli("starting a container", &args).await {
            // A run that failed or timed out may still have created the container.
            let _ = self.remove_container(name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn provision_node(&self, pool: &PoolContext, state: &PoolState, request: &ProvisionRequest) -> Result<Instance, ProviderError> {
        let name = format!("{}-{}", self.prefix(), request.node_id);
        let started = Instant::now();
        self.run_container(RunSpec {
            pool_id: &pool.pool_id,
            name: &name,
            node_id: &request.node_id,
            network: &state.network,
            key: &state.key,
            image: &state.image,
            keep: false,
        })
        .await?;
        let run = started.elapsed();
        let pin = HostKeyPin::new();
        state
            .nodes
            .lock()
            .expect("container nodes")
            .insert(name.clone(), NodeRecord { node_id: request.node_id.clone(), pin: pin.clone(), session: None });
        let result = self.bootstrap_node(state, &name, &pin, pool, request).await;
        match result {
            Ok(mut timings) => {
                timings.run = run;
                timings.total = started.elapsed();
                self.timings.lock().expect("timings").push((request.node_id.clone(), timings.clone()));
                tracing::info!(
                    node = %request.node_id, total = ?started.elapsed(), run = ?timings.run, ssh = ?timings.ssh,
                    image = ?timings.image, upload = ?timings.upload, start = ?timings.start, "container node bootstrapped"
                );
                let address = self.container_ip(&name, &state.network).await.ok();
                Ok(Instance {
                    id: name,
                    node_id: request.node_id.clone(),
                    pool_id: pool.pool_id.clone(),
                    state: InstanceState::Running,
                    address,
                })
            }
            Err(e) => {
                // Nothing of a failed node stays behind.
                if let Err(t) = self.remove_container(&name).await {
                    tracing::error!(container = %name, error = %t, "removing a node whose bootstrap failed");
                }
                Err(e)
            }
        }
    }

    /// The prebaked image for this base image, Image and worker: reused when present, else
    /// baked once from a throwaway container (image script run, worker installed, host keys and
    /// the pool's key removed) and committed.
    async fn prebaked_image(&self, pool: &PoolContext, state: &PoolState) -> Result<String, ProviderError> {
        let (base, network, key) = (&state.image, &state.network, &state.key);
        let (worker, worker_sha256, image_script) = (&state.worker, &state.worker_sha256, state.image_script.as_ref());
        let base_id = self.cli("inspecting the base image", &["image", "inspect", "--format", "{{.Id}}", base]).await?;
        let identity =
            format!("{}|{}|{}|{}", base_id.trim(), image_script.map(|(_, h)| h.as_str()).unwrap_or(""), worker_sha256, self.remote_root());
        let tag = format!("skyward-prebaked:{}", &crate::hex(&Sha256::digest(identity.as_bytes()))[..16]);
        if self.cli("inspecting the prebaked image", &["image", "inspect", "--format", "{{.Id}}", &tag]).await.is_ok() {
            tracing::info!(image = %tag, "using the prebaked image");
            return Ok(tag);
        }
        let name = format!("{}-{}-bake", self.prefix(), pool.pool_id);
        tracing::info!(image = %tag, "baking an image: the next pool with this Image skips the bootstrap");
        self.run_container(RunSpec { pool_id: &pool.pool_id, name: &name, node_id: "bake", network, key, image: base, keep: true }).await?;
        let result = async {
            let (session, _) = self.open_session(&name, network, key, &HostKeyPin::new()).await?;
            let root = self.remote_root();
            let plan = BootstrapPlan {
                node: &name,
                pool_id: &pool.pool_id,
                remote_root: &root,
                worker_binary: worker,
                worker_sha256,
                worker_config: "",
                image: image_script.map(|(s, h)| (s.as_str(), h.as_str())),
                syncs: &[],
            };
            let installed = skyward_ssh::install(&session, &plan).await;
            session.close().await;
            installed.map_err(|e| ProviderError::Bootstrap { provider: NAME, message: e.to_string() })?;
            // Nothing that identifies this container or pool goes into the image.
            let scrub = "rm -f /etc/ssh/ssh_host_* /etc/apt/apt.conf.d/90skyward-isolated; rm -rf /root/.ssh /home/*/.ssh";
            self.cli("cleaning the bake container", &["exec", &name, "sh", "-c", scrub]).await?;
            self.cli(
                "committing the prebaked image",
                &["commit", "--change", "ENV SKYWARD_AUTHORIZED_KEY=", "--change", "LABEL dev.skyward.prebaked=1", &name, &tag],
            )
            .await?;
            Ok(tag)
        }
        .await;
        if let Err(e) = self.remove_container(&name).await {
            tracing::error!(container = %name, error = %e, "removing the bake container");
        }
        result
    }

    /// Wait for the node's SSH server and connect; on an isolated network, tell apt not to retry.
    async fn open_session(&self, name: &str, network: &str, key: &PoolKey, pin: &HostKeyPin) -> Result<(Session, Duration), ProviderError> {
        let target = self.ssh_target(name, network).await?;
        let started = Instant::now();
        let session = Session::connect_with_backoff(&target, key, pin, self.ssh_timeout)
            .await
            .map_err(|e| failed("connecting over SSH", e.to_string()))?;
        let waited = started.elapsed();
        if self.isolated && self.ssh_user == "root" {
            // Nothing outside is reachable: let apt fail at once instead of retrying with backoff.
            let _ = session.run("echo 'Acquire::Retries \"0\";' > /etc/apt/apt.conf.d/90skyward-isolated").await;
        }
        Ok((session, waited))
    }

    async fn container_ip(&self, name: &str, network: &str) -> Result<String, ProviderError> {
        let format = format!("{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}");
        let ip = self.cli("inspecting a container", &["inspect", "--format", &format, name]).await?;
        let ip = ip.trim();
        if ip.is_empty() {
            return Err(failed("inspecting a container", format!("{name} has no address on {network}")));
        }
        Ok(ip.to_string())
    }

    async fn ssh_target(&self, name: &str, network: &str) -> Result<Target, ProviderError> {
        if !self.isolated {
            let port = self.cli("reading the SSH port", &["port", name, "22/tcp"]).await?;
            let port = port
                .lines()
                .filter_map(|l| l.trim().rsplit_once(':'))
                .find(|(host, _)| *host == "127.0.0.1")
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| failed("reading the SSH port", format!("{name} publishes no 127.0.0.1 port for 22/tcp: {port:?}")))?;
            return Ok(Target { host: "127.0.0.1".into(), port, user: self.ssh_user.clone() });
        }
        Ok(Target { host: self.container_ip(name, network).await?, port: 22, user: self.ssh_user.clone() })
    }

    async fn bootstrap_node(
        &self,
        state: &PoolState,
        name: &str,
        pin: &HostKeyPin,
        pool: &PoolContext,
        request: &ProvisionRequest,
    ) -> Result<NodeStartTimings, ProviderError> {
        let (session, ssh) = self.open_session(name, &state.network, &state.key, pin).await?;
        let root = self.remote_root();
        let syncs: Vec<(&str, &[u8])> = state.syncs.iter().map(|s| (s.remote.as_str(), s.archive.as_slice())).collect();
        let plan = BootstrapPlan {
            node: &request.node_id,
            pool_id: &pool.pool_id,
            remote_root: &root,
            worker_binary: &state.worker,
            worker_sha256: &state.worker_sha256,
            worker_config: request.worker_config.expose(),
            image: state.image_script.as_ref().map(|(s, h)| (s.as_str(), h.as_str())),
            syncs: &syncs,
        };
        let result = skyward_ssh::bootstrap(&session, &plan).await;
        let t = match result {
            Ok(t) => t,
            Err(e) => {
                session.close().await;
                return Err(ProviderError::Bootstrap { provider: NAME, message: e.to_string() });
            }
        };
        // Kept for standalone tunnels (closed when the node is terminated).
        if let Some(record) = state.nodes.lock().expect("container nodes").get_mut(name) {
            record.session = Some(Arc::new(session));
        }
        Ok(NodeStartTimings {
            total: Duration::ZERO,
            run: Duration::ZERO,
            ssh,
            image: t.image,
            upload: t.upload,
            start: t.start,
            uploaded: t.uploaded,
            image_name: state.image.clone(),
        })
    }

    async fn remove_container(&self, name: &str) -> Result<(), ProviderError> {
        match self.cli("removing a container", &["rm", "-f", name]).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("No such container") || e.to_string().contains("no such container") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Containers labelled with `pool_id` (any pool when `None`): `(name, pool id, node id, owner)`.
    pub async fn tagged_containers(&self, pool_id: Option<&str>) -> Result<Vec<TaggedContainer>, ProviderError> {
        list_containers(self.runtime, pool_id).await
    }

    /// Networks labelled with `pool_id` (any pool when `None`).
    pub async fn tagged_networks(&self, pool_id: Option<&str>) -> Result<Vec<TaggedNetwork>, ProviderError> {
        list_networks(self.runtime, pool_id).await
    }

    /// Remove a network by name (gone already counts as removed).
    pub async fn remove_network(&self, name: &str) -> Result<(), ProviderError> {
        match self.cli("removing a network", &["network", "rm", name]).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().to_lowercase().contains("not found") || e.to_string().contains("No such network") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// One `docker run`.
struct RunSpec<'a> {
    pool_id: &'a str,
    name: &'a str,
    node_id: &'a str,
    network: &'a str,
    key: &'a PoolKey,
    image: &'a str,
    keep: bool,
}

/// A container carrying Skyward's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedContainer {
    /// Container name.
    pub name: String,
    /// Pool id label.
    pub pool_id: String,
    /// Node id label.
    pub node_id: String,
    /// Owner label (`<pid>:<start time>` of the coordinator process).
    pub owner: String,
    /// Runtime state (`running`, `exited`, ...).
    pub state: String,
}

async fn run_cli(runtime: Runtime, operation: &'static str, args: &[&str]) -> Result<String, ProviderError> {
    let program = runtime.program();
    let child = tokio::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let output = match tokio::time::timeout(Duration::from_secs(120), child).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!("{program} is not installed or not on PATH")));
        }
        Ok(Err(e)) => return Err(failed(operation, format!("cannot run {program}: {e}"))),
        Err(_) => return Err(failed(operation, format!("`{program} {}` did not finish in 120 s", args.first().unwrap_or(&"")))),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(
            operation,
            format!("`{program} {}` failed ({}): {}", args.first().unwrap_or(&""), output.status, stderr.trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn list_containers(runtime: Runtime, pool_id: Option<&str>) -> Result<Vec<TaggedContainer>, ProviderError> {
    let filter = match pool_id {
        Some(p) => format!("label={POOL_LABEL}={p}"),
        None => format!("label={POOL_LABEL}"),
    };
    let format = format!(
        "{{{{.Names}}}}\t{{{{.Label \"{POOL_LABEL}\"}}}}\t{{{{.Label \"{NODE_LABEL}\"}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}\t{{{{.State}}}}"
    );
    let out = run_cli(runtime, "listing containers", &["ps", "-a", "--filter", &filter, "--format", &format]).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(TaggedContainer {
                name: f.next()?.to_string(),
                pool_id: f.next()?.to_string(),
                node_id: f.next()?.to_string(),
                owner: f.next()?.to_string(),
                state: f.next().unwrap_or("").to_string(),
            })
        })
        .collect())
}

/// A network carrying Skyward's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedNetwork {
    /// Network name.
    pub name: String,
    /// Pool id label.
    pub pool_id: String,
    /// Owner label.
    pub owner: String,
}

async fn list_networks(runtime: Runtime, pool_id: Option<&str>) -> Result<Vec<TaggedNetwork>, ProviderError> {
    let filter = match pool_id {
        Some(p) => format!("label={POOL_LABEL}={p}"),
        None => format!("label={POOL_LABEL}"),
    };
    let format = format!("{{{{.Name}}}}\t{{{{.Label \"{POOL_LABEL}\"}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}");
    let out = run_cli(runtime, "listing networks", &["network", "ls", "--filter", &filter, "--format", &format]).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(TaggedNetwork { name: f.next()?.to_string(), pool_id: f.next()?.to_string(), owner: f.next().unwrap_or("").to_string() })
        })
        .collect())
}

/// What [`cleanup`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Containers of abandoned pools, removed (or that would be, in a dry run).
    pub containers: Vec<TaggedContainer>,
    /// Networks of abandoned pools, removed (or that would be).
    pub networks: Vec<TaggedNetwork>,
    /// Pools left alone because the process that owns them still runs.
    pub running_pools: Vec<String>,
    /// Pools left alone because their owner cannot be checked from here (another machine,
    /// another boot, another PID namespace); `force` removes them.
    pub unknown_pools: Vec<String>,
}

/// Find everything labelled by a pool whose coordinator process no longer runs, and remove it
/// (unless `dry_run`). Pools whose owner cannot be checked from here are kept unless `force`.
/// Removal is confirmed by listing again.
pub async fn cleanup(runtime: Runtime, dry_run: bool, force: bool) -> Result<CleanupReport, ProviderError> {
    let containers = list_containers(runtime, None).await?;
    let networks = list_networks(runtime, None).await?;
    let owners = containers.iter().map(|c| (&c.pool_id, &c.owner)).chain(networks.iter().map(|n| (&n.pool_id, &n.owner)));
    let (mut running, mut unknown) = (Vec::new(), Vec::new());
    for (pool, owner) in owners {
        match owner_state(owner) {
            OwnerState::Alive => running.push(pool.clone()),
            OwnerState::Unknown => unknown.push(pool.clone()),
            OwnerState::Dead => {}
        }
    }
    for list in [&mut running, &mut unknown] {
        list.sort();
        list.dedup();
    }
    unknown.retain(|p| !running.contains(p));
    let kept = |pool: &str| running.iter().any(|p| p == pool) || (!force && unknown.iter().any(|p| p == pool));
    let report = CleanupReport {
        containers: containers.into_iter().filter(|c| !kept(&c.pool_id)).collect(),
        networks: networks.into_iter().filter(|n| !kept(&n.pool_id)).collect(),
        running_pools: running.clone(),
        unknown_pools: if force { Vec::new() } else { unknown.clone() },
    };
    if dry_run {
        return Ok(report);
    }
    let provider = Container { runtime, ..Container::default() };
    for c in &report.containers {
        provider.remove_container(&c.name).await?;
    }
    for n in &report.networks {
        provider.remove_network(&n.name).await?;
    }
    let left: Vec<String> = list_containers(runtime, None)
        .await?
        .into_iter()
        .filter(|c| report.containers.iter().any(|r| r.name == c.name))
        .map(|c| c.name)
        .collect();
    if let Some(name) = left.first() {
        return Err(ProviderError::Leaked { provider: NAME, instance: name.clone(), message: "still listed after cleanup".into() });
    }
    Ok(report)
}

/// `<hostname>:<boot id>:<pid>:<start time in clock ticks>` of this process: stable for its
/// life, never reused by another process on the same machine and boot.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{}:{}:{pid}:{}", machine_hostname(), boot_id(), process_start_time(pid).unwrap_or(0))
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().replace(':', "_")).unwrap_or_default()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// What can be said about the process an owner label names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerState {
    /// It runs.
    Alive,
    /// It has ended.
    Dead,
    /// It is on another machine, another boot, or out of sight (another PID namespace): unknown.
    Unknown,
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the `(comm)` field, which may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process an owner label names still runs. Anything this machine cannot check is
/// `Unknown`, never `Dead`: cleanup must not remove a live pool.
pub fn owner_state(owner: &str) -> OwnerState {
    let parts: Vec<&str> = owner.split(':').collect();
    let [host, boot, pid, start] = parts[..] else { return OwnerState::Unknown };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return OwnerState::Unknown };
    if host != machine_hostname() || boot != boot_id() || host.is_empty() || boot.is_empty() {
        return OwnerState::Unknown;
    }
    match process_start_time(pid) {
        Some(s) if start != 0 => {
            if s == start {
                OwnerState::Alive
            } else {
                OwnerState::Dead
            }
        }
        _ => {
            // Not readable (hidepid, another PID namespace) or no start time recorded: ask the
            // kernel whether the pid exists at all.
            // SAFETY: signal 0 only checks for existence and permission.
            let r = unsafe { libc::kill(pid as i32, 0) };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) { OwnerState::Alive } else { OwnerState::Dead }
        }
    }
}

impl Provider for Container {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        true
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async { Ok(vec![crate::offers::this_machine(NAME, "container")]) })
    }

    fn offer_ttl(&self) -> std::time::Duration {
        // This machine: computed on the spot, never cached.
        std::time::Duration::ZERO
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let state = self.prepare_pool(pool).await?;
            self.pools.lock().expect("container pools").insert(pool.pool_id.clone(), Arc::new(state));
            Ok(())
        })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: ProvisionRequest) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            let state = self.pool(&pool.pool_id)?;
            self.provision_node(pool, &state, &request).await
        })
    }

    fn get_instance<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let found = list_containers(self.runtime, Some(&pool.pool_id)).await?;
            Ok(found.into_iter().find(|c| c.name == id).map(|c| Instance {
                id: c.name,
                node_id: c.node_id,
                pool_id: c.pool_id,
                state: if c.state == "running" { InstanceState::Running } else { InstanceState::Pending },
                address: None,
            }))
        })
    }

    fn terminate<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.remove_container(id).await?;
            let left = list_containers(self.runtime, Some(&pool.pool_id)).await?;
            if left.iter().any(|c| c.name == id) {
                return Err(ProviderError::Leaked { provider: NAME, instance: id.to_string(), message: "still listed after rm -f".into() });
            }
            if let Ok(state) = self.pool(&pool.pool_id) {
                let record = state.nodes.lock().expect("container nodes").remove(id);
                if let Some(session) = record.and_then(|r| r.session) {
                    session.close().await;
                }
            }
            Ok(())
        })
    }

    fn teardown<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let containers = list_containers(self.runtime, Some(&pool.pool_id)).await?;
            let removals = containers.iter().map(|c| self.remove_container(&c.name));
            let mut first_error = futures::future::join_all(removals).await.into_iter().find_map(Result::err);
            let state = self.pools.lock().expect("container pools").remove(&pool.pool_id);
            match &state {
                Some(s) if s.created_network => {
                    if let Err(e) = self.remove_network(&s.network).await {
                        first_error.get_or_insert(e);
                    }
                }
                Some(_) => {}
                // Not prepared by this value (a cleanup): remove whatever network carries the label.
                None => {
                    for n in list_networks(self.runtime, Some(&pool.pool_id)).await? {
                        if let Err(e) = self.remove_network(&n.name).await {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            let left = list_containers(self.runtime, Some(&pool.pool_id)).await?;
            if let Some(c) = left.first() {
                return Err(ProviderError::Leaked {
                    provider: NAME,
                    instance: c.name.clone(),
                    message: "still listed after teardown".into(),
                });
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            Ok(list_containers(self.runtime, pool_id)
                .await?
                .into_iter()
                .map(|c| Instance {
                    id: c.name,
                    node_id: c.node_id,
                    pool_id: c.pool_id,
                    state: if c.state == "running" { InstanceState::Running } else { InstanceState::Pending },
                    address: None,
                })
                .collect())
        })
    }

    fn worker_layout(&self, _pool: &PoolContext, _node_id: &str) -> WorkerLayout {
        let root = PathBuf::from(self.remote_root());
        let on_silence = if self.ssh_user == "root" { skyward_proto::SilenceAction::StopInit } else { skyward_proto::SilenceAction::Exit };
        WorkerLayout { cache_dir: root.join("cache"), state_dir: root.join("state"), on_silence }
    }

    fn coordinator_bind(&self, pool: &PoolContext) -> IpAddr {
        match self.pool(&pool.pool_id) {
            Ok(state) => state.gateway,
            Err(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        }
    }

    fn worker_log_tail<'a>(&'a self, pool: &'a PoolContext, node_id: &'a str, lines: usize) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let state = self.pool(&pool.pool_id).ok()?;
            let name = state.nodes.lock().expect("container nodes").iter().find(|(_, r)| r.node_id == node_id).map(|(n, _)| n.clone())?;
            let log = format!("{}/worker.log", self.remote_root());
            let n = lines.to_string();
            self.cli("reading the worker log", &["exec", &name, "tail", "-n", &n, &log]).await.ok()
        })
    }

    fn open_tunnel<'a>(
        &'a self,
        pool: &'a PoolContext,
        instance_id: &'a str,
        socket: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn crate::TunnelIo>, ProviderError>> {
        Box::pin(async move {
            let state = self.pool(&pool.pool_id)?;
            let socket = socket.to_str().ok_or_else(|| invalid(format!("socket path {} is not UTF-8", socket.display())))?;
            let (session, pin) = {
                let nodes = state.nodes.lock().expect("container nodes");
                let record = nodes.get(instance_id).ok_or_else(|| failed("open_tunnel", format!("unknown instance {instance_id}")))?;
                (record.session.clone().filter(|s| !s.is_closed()), record.pin.clone())
            };
            let session = match session {
                Some(s) => s,
                None => {
                    // The bootstrap's connection ended: a new one, to the same pinned host key.
                    let (s, _) = self.open_session(instance_id, &state.network, &state.key, &pin).await?;
                    let s = Arc::new(s);
                    if let Some(record) = state.nodes.lock().expect("container nodes").get_mut(instance_id) {
                        record.session = Some(Arc::clone(&s));
                    }
                    s
                }
            };
            let stream = session.open_unix_stream(socket).await.map_err(|e| failed("open_tunnel", e.to_string()))?;
            Ok(Box::new(stream) as Box<dyn crate::TunnelIo>)
        })
    }

    fn emergency_teardown(&self, pool: &PoolContext) {
        // Synchronous, bounded by the CLI: remove every container of the pool, then its network.
        let program = self.runtime.program();
        let filter = format!("label={POOL_LABEL}={}", pool.pool_id);
        let ids = std::process::Command::new(program).args(["ps", "-aq", "--filter", &filter]).output();
        if let Ok(out) = ids {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new(program).args(["rm", "-f"]).args(&ids).output();
            }
        }
        let state = self.pools.lock().expect("container pools").remove(&pool.pool_id);
        if let Some(s) = state.filter(|s| s.created_network) {
            let _ = std::process::Command::new(program).args(["network", "rm", &s.network]).output();
        }
    }
}
