//! The coordinator: the actor tree that runs inside the user's process, and the dispatch API.
//!
//! `Compute::new(provider).nodes(n).start()` spawns the `Pool` actor, which supervises one
//! `Provisioner`, one `TaskManager` and one `Node` per instance (see each module's doc for its
//! supervision policy). Workers dial the pool's QUIC endpoint; the acceptor checks their
//! certificate and hello and hands the connection to their `Node`.
//!
//! Architecture invariant: teardown always runs. `shutdown()` tears down in order; dropping the
//! pool, an error or a panic in the caller, and Ctrl-C all end every worker (the last two through
//! the provider's synchronous `emergency_teardown`).

mod binary;
mod busy_poll;
mod cluster;
mod handle;
mod node;
mod pool;
mod provisioner;
mod task_manager;

pub use cluster::ClusterEvent;
pub use handle::{Command, CommandOutput, Dispatch, Error, JoinCalls, Pool, TaskHandle, TaskStream};
pub use node::OutputLine;
pub use task_manager::{Placement, TaskStats};

use pool::{PoolActor, PoolArgs, PoolShared};
use ractor::Actor;
use skyward_provider::select::{self, Attempt, Candidate, FailureKind, NoOffers, Selection, Spec};
use skyward_provider::{Image, Offer, OfferCache, PoolContext, Provider};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use task_manager::{TaskManagerRef, TmArgs};

/// Worker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    /// Tasks a node runs at once.
    pub concurrency: u32,
}

impl Default for Worker {
    fn default() -> Self {
        Self { concurrency: 1 }
    }
}

/// Operational settings of a pool.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cluster mode (workers reach the coordinator over the network: QUIC with mutual TLS) or
    /// standalone mode (`Some(false)`: the coordinator reaches each worker through the provider,
    /// over SSH; the same QUIC session runs inside that channel). `None`: the provider's default.
    pub cluster: Option<bool>,
    /// How often the coordinator probes each worker.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost and its tasks re-queued.
    pub lost_after: Duration,
    /// Silence after which a worker ends its own machine.
    pub instance_timeout: Duration,
    /// How long `start()` waits for every node to be ready.
    pub start_timeout: Duration,
    /// How many times a task is re-queued after node losses before it fails.
    pub max_retries: u32,
    /// How many times one rank is replaced before the pool stops replacing it.
    pub max_replacements: u32,
    /// Timeout applied to every task that does not set its own.
    pub default_task_timeout: Option<Duration>,
    /// Largest frame accepted from a worker.
    pub max_frame: usize,
    /// Limit for putting the executable on a node.
    pub upload_timeout: Duration,
    /// How long a provisioned node may take until its worker connects.
    pub connect_timeout: Duration,
    /// Stream items a streaming task may send ahead of the consumer.
    pub stream_window: u32,
    /// Most calls one `gather` or `gather_unordered` keeps submitted and unfinished at once; the
    /// rest are submitted as results come back. Bounds the coordinator's memory for huge gathers
    /// (about 1.5 KB per call in flight); keep it well above the pool's task slots.
    pub max_in_flight: usize,
    /// Hand arguments of 1 MiB and more to nodes on this machine (Local) through shared memory
    /// (a sealed memfd written once, mapped by each executor) instead of the network. Used only
    /// with workers that prove they can open this process's memory objects.
    pub shared_memory_args: bool,
    /// Carry small tasks to nodes on this machine (Local) over a Unix socket per lane instead of
    /// QUIC: the worker listens on one in its state directory and tells the coordinator where,
    /// with a secret each connection must present, over the authenticated QUIC session. Used
    /// only with workers that prove they share this machine (the shared-memory probe); QUIC
    /// still carries the handshake, heartbeats, large tasks and uploads.
    pub local_lanes: bool,
    /// While calls to nodes on this machine (Local) are in flight, keep up to this many idle
    /// CPUs polling instead of halting: threads at the lowest priority (`SCHED_IDLE`, Linux)
    /// that spin for `busy_poll_window` after each send to or reply from a node. Waking a
    /// process on a halted virtual CPU costs tens of microseconds, several times per round trip;
    /// the spinners run only where the CPU would otherwise be idle and give it up at once. Used
    /// only once a node proved to be on this machine; 0 turns it off. Capped by the CPUs this
    /// process may use.
    pub busy_poll_cpus: usize,
    /// How long the busy-poll threads keep spinning after the last send or reply; then they
    /// sleep until the next one. Zero turns busy polling off.
    pub busy_poll_window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster: None,
            heartbeat_interval: Duration::from_millis(500),
            lost_after: Duration::from_secs(3),
            instance_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(120),
            max_retries: 3,
            max_replacements: 3,
            default_task_timeout: None,
            max_frame: skyward_proto::codec::DEFAULT_MAX_FRAME,
            upload_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(300),
            stream_window: 64,
            max_in_flight: 16_384,
            shared_memory_args: true,
            local_lanes: true,
            busy_poll_cpus: 4,
            busy_poll_window: Duration::from_millis(1),
        }
    }
}

/// Why a pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The spec is invalid.
    #[error("invalid pool spec: {0}")]
    Invalid(String),
    /// The executable to ship cannot be used.
    #[error("{0}")]
    Binary(String),
    /// The provider failed to prepare.
    #[error(transparent)]
    Provider(#[from] skyward_provider::ProviderError),
    /// Certificates or the QUIC endpoint could not be set up.
    #[error("transport setup failed: {0}")]
    Transport(String),
    /// A node failed to come up.
    #[error("pool {pool_id} did not start: {reason}")]
    Node {
        /// Pool id.
        pool_id: String,
        /// What failed.
        reason: String,
        /// The provider's failure kind, when provisioning failed.
        kind: Option<FailureKind>,
    },
    /// Not every node was ready in time.
    #[error("pool {pool_id}: only {ready} of {wanted} nodes ready after {after:?}")]
    Timeout {
        /// Pool id.
        pool_id: String,
        /// Ready nodes.
        ready: usize,
        /// Wanted nodes.
        wanted: u32,
        /// How long it waited.
        after: Duration,
    },
    /// The actor system failed.
    #[error("coordinator failed to start: {0}")]
    Actor(String),
    /// No offer of any spec satisfies it (each spec's rejections are listed).
    #[error("{0}")]
    NoOffers(NoOffers),
    /// Every offer tried failed; each attempt, in order, with its reason.
    #[error("{}", describe_attempts(attempts))]
    AllAttemptsFailed {
        /// The attempts, in the order they were made.
        attempts: Vec<Attempt>,
    },
}

fn describe_attempts(attempts: &[Attempt]) -> String {
    let mut s = format!("no offer could be started ({} attempt{}):", attempts.len(), if attempts.len() == 1 { "" } else { "s" });
    for (i, a) in attempts.iter().enumerate() {
        s.push_str(&format!("\n  {}. {a}", i + 1));
    }
    if attempts.iter().any(|a| a.kind == FailureKind::Auth) {
        s.push_str("\nhint: fix the credentials named above, or drop that provider's spec");
    } else if attempts.iter().all(|a| matches!(a.kind, FailureKind::Capacity | FailureKind::PriceCap)) {
        s.push_str("\nhint: add a spec for another provider or accelerator, raise max_hourly_cost, or allow spot and on-demand");
    }
    s
}

impl StartError {
    /// The fallback kind of this failure, when a provider said why.
    fn kind(&self) -> Option<FailureKind> {
        match self {
            Self::Provider(e) => Some(FailureKind::of(e)),
            Self::Node { kind, .. } => *kind,
            _ => None,
        }
    }
}

/// A description of compute to start: one or more specs (provider, accelerator, nodes, ...),
/// how to choose among their offers, worker settings and options.
///
/// With several specs (or a spec whose provider sells several offers) the start tries the
/// ranked offers in order, up to `max_attempts`: an offer that fails for capacity, quota,
/// credentials, price or an API error falls back to the next one, whatever its provider; a
/// bootstrap failure or an invalid request stops the start (it would fail the same way again).
#[derive(Debug)]
pub struct Compute {
    specs: Vec<Spec>,
    nodes: Option<u32>,
    selection: Selection,
    max_attempts: usize,
    offer_cache: OfferCache,
    refresh_offers: bool,
    worker: Worker,
    options: Options,
    binary: Option<PathBuf>,
    image: Option<Image>,
}

impl Compute {
    /// Compute from `provider`, one node by default, any offer.
    pub fn new(provider: impl Provider) -> Self {
        Self::from_specs([Spec::new(provider)])
    }

    /// Compute from several specs, tried in the order `selection` gives.
    pub fn from_specs(specs: impl IntoIterator<Item = Spec>) -> Self {
        Self {
            specs: specs.into_iter().collect(),
            nodes: None,
            selection: Selection::default(),
            max_attempts: 5,
            offer_cache: OfferCache::default_location(),
            refresh_offers: false,
            worker: Worker::default(),
            options: Options::default(),
            binary: None,
            image: None,
        }
    }

    /// Number of nodes (overrides every spec's).
    pub fn nodes(mut self, nodes: u32) -> Self {
        self.nodes = Some(nodes);
        self
    }

    /// Cheapest pool first (default) or specs in order.
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// How many offers a start tries before it gives up (default 5).
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Where provider catalogs are cached (default `~/.skyward/offers`).
    pub fn offer_cache(mut self, cache: OfferCache) -> Self {
        self.offer_cache = cache;
        self
    }

    /// Fetch every provider's catalog even when the cache is fresh.
    pub fn refresh_offers(mut self, refresh: bool) -> Self {
        self.refresh_offers = refresh;
        self
    }

    /// Worker settings.
    pub fn worker(mut self, worker: Worker) -> Self {
        self.worker = worker;
        self
    }

    /// Options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// What every node needs before tasks run (apt and pip packages, environment, setup
    /// commands). Applied by providers with machines; checked before anything starts.
    pub fn image(mut self, image: Image) -> Self {
        self.image = Some(image);
        self
    }

    /// Ship this executable instead of the running one (e.g. a cross-built binary).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The ranked offers a start would try, without starting anything.
    pub async fn plan(&self) -> Result<Vec<Candidate>, StartError> {
        self.candidates().await.map(|(c, _)| c)
    }

    /// Fetch (or read from the cache) every spec's offers and rank them. Specs whose provider
    /// cannot list offers become failed attempts, so one bad credential does not hide the
    /// other providers.
    async fn candidates(&self) -> Result<(Vec<Candidate>, Vec<Attempt>), StartError> {
        if self.specs.is_empty() {
            return Err(StartError::Invalid("no spec: give Compute a provider or at least one Spec".into()));
        }
        let specs: Vec<Spec> = self
            .specs
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if let Some(n) = self.nodes {
                    s.requirements.nodes = n;
                }
                s
            })
            .collect();
        for s in &specs {
            s.validate().map_err(StartError::Invalid)?;
        }
        let fetched = futures::future::join_all(specs.iter().map(|s| self.offer_cache.offers(&*s.provider, self.refresh_offers))).await;
        let mut failures = Vec::new();
        let mut lists: Vec<Vec<Offer>> = Vec::with_capacity(specs.len());
        for (spec, result) in specs.iter().zip(fetched) {
            match result {
                Ok((offers, freshness)) => {
                    tracing::debug!(provider = spec.provider.name(), offers = offers.len(), ?freshness, "offers");
                    lists.push(offers);
                }
                Err(e) => {
                    failures.push(Attempt {
                        offer: format!("{} (listing offers)", spec.provider.name()),
                        kind: FailureKind::of(&e),
                        message: e.to_string(),
                    });
                    lists.push(Vec::new());
                }
            }
        }
        let view: Vec<(&select::Requirements, &str, &[Offer])> =
            specs.iter().zip(&lists).map(|(s, o)| (&s.requirements, s.provider.name(), o.as_slice())).collect();
        match select::select(&view, self.selection, self.max_attempts) {
            Ok(c) => Ok((c, failures)),
            Err(_) if !failures.is_empty() && lists.iter().all(Vec::is_empty) => Err(StartError::AllAttemptsFailed { attempts: failures }),
            Err(no) => Err(StartError::NoOffers(no)),
        }
    }

    /// Start the pool and wait until every node is ready, falling back across offers.
    pub async fn start(self) -> Result<Pool, StartError> {
        if self.nodes == Some(0) {
            return Err(StartError::Invalid("nodes must be at least 1".into()));
        }
        if self.options.stream_window == 0 {
            return Err(StartError::Invalid("Options { stream_window } must be at least 1".into()));
        }
        if self.worker.concurrency == 0 {
            return Err(StartError::Invalid("Worker { concurrency } must be at least 1".into()));
        }
        if let Some(image) = &self.image {
            image.validate().map_err(|e| StartError::Invalid(format!("image: {e}")))?;
        }
        let (candidates, mut attempts) = self.candidates().await?;
        let total = candidates.len();
        for (i, candidate) in candidates.into_iter().enumerate() {
            let spec = &self.specs[candidate.spec];
            let nodes = self.nodes.unwrap_or(spec.requirements.nodes);
            tracing::info!(offer = %select::describe_candidate(&candidate), nodes, attempt = i + 1, of = total, "starting");
            match self.start_on(spec, &candidate, nodes, attempts.clone()).await {
                Ok(pool) => return Ok(pool),
                Err(e) => {
                    let kind = e.kind();
                    tracing::warn!(offer = %select::describe_candidate(&candidate), error = %e, "start attempt failed");
                    match kind {
                        Some(k) if k.falls_back() => attempts.push(Attempt::failed(&candidate, k, e.to_string())),
                        // Not worth another offer: show what was tried before, if anything.
                        _ if attempts.is_empty() => return Err(e),
                        Some(k) => {
                            attempts.push(Attempt::failed(&candidate, k, e.to_string()));
                            return Err(StartError::AllAttemptsFailed { attempts });
                        }
                        None => return Err(e),
                    }
                }
            }
        }
        Err(StartError::AllAttemptsFailed { attempts })
    }

    /// One attempt: prepare the spec's provider with the candidate as placement, start.
    async fn start_on(&self, spec: &Spec, candidate: &Candidate, nodes: u32, attempts: Vec<Attempt>) -> Result<Pool, StartError> {
        let started_at = Instant::now();
        let provider = Arc::clone(&spec.provider);
        let pool_id = format!("sky-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let state_dir = skyward_provider::local::skyward_home().join("pools").join(&pool_id);
        let placement = skyward_provider::Placement {
            offer: candidate.offer.clone(),
            spot: candidate.spot,
            allocation: spec.requirements.allocation,
            node_price: candidate.node_price,
            max_hourly_cost: spec.requirements.max_hourly_cost,
            disk_gb: spec.disk_gb,
        };
        let ctx = PoolContext {
            pool_id: pool_id.clone(),
            state_dir,
            image: self.image.clone().filter(|i| !i.is_empty()),
            placement: Some(placement),
        };
        let binary_path = match self.binary.clone() {
            Some(p) => p,
            None => std::env::current_exe().map_err(|e| StartError::Binary(format!("cannot locate this executable: {e}")))?,
        };
        let inspect = tokio::task::spawn_blocking(move || binary::inspect(&binary_path));
        if let Err(e) = provider.prepare(&ctx).await {
            // What `prepare` created before it failed (a network, a bake container) goes too.
            if let Err(teardown) = provider.teardown(&ctx).await {
                tracing::error!(error = %teardown, "teardown after a failed prepare");
            }
            let _ = std::fs::remove_dir_all(&ctx.state_dir);
            return Err(e.into());
        }
        match self.start_prepared(provider.clone(), ctx.clone(), nodes, pool_id, inspect, started_at, attempts).await {
            Ok(pool) => Ok(pool),
            Err(e) => {
                // Whatever `prepare` created goes away with the failed start.
                if let Err(teardown) = provider.teardown(&ctx).await {
                    tracing::error!(error = %teardown, "teardown after a failed start");
                }
                let _ = std::fs::remove_dir_all(&ctx.state_dir);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_prepared(
        &self,
        provider: Arc<dyn Provider>,
        ctx: PoolContext,
        nodes: u32,
        pool_id: String,
        inspect: tokio::task::JoinHandle<Result<binary::ShippedBinary, String>>,
        started_at: Instant,
        attempts: Vec<Attempt>,
    ) -> Result<Pool, StartError> {
        let binary = Arc::new(inspect.await.map_err(|e| StartError::Binary(e.to_string()))?.map_err(StartError::Binary)?);

        let ca = skyward_net::PoolCa::generate(&pool_id).map_err(|e| StartError::Transport(e.to_string()))?;
        let server_cert = ca.issue_server().map_err(|e| StartError::Transport(e.to_string()))?;
        let idle = self.options.lost_after.max(Duration::from_secs(10));
        let cluster = self.options.cluster.unwrap_or_else(|| provider.cluster_by_default());
        let (endpoint, tunnel) = if cluster {
            let bind = SocketAddr::new(provider.coordinator_bind(&ctx), 0);
            (skyward_net::server_endpoint(bind, ca.cert(), &server_cert, idle).map_err(|e| StartError::Transport(e.to_string()))?, None)
        } else {
            let socket = skyward_net::TunnelSocket::new(skyward_net::TunnelSocket::coordinator_addr());
            let endpoint = skyward_net::server_endpoint_tunnel(Arc::clone(&socket), ca.cert(), &server_cert, idle)
                .map_err(|e| StartError::Transport(e.to_string()))?;
            (endpoint, Some(socket))
        };
        let server_addr = endpoint.local_addr().map_err(|e| StartError::Transport(e.to_string()))?;
        tracing::debug!(pool = %pool_id, cluster, %server_addr, "coordinator endpoint");
        let shared = Arc::new(PoolShared {
            pool_id: pool_id.clone(),
            ctx,
            provider: Arc::clone(&provider),
            ca,
            server_addr,
            epoch: Instant::now(),
            registry: Default::default(),
            options: self.options.clone(),
            concurrency: self.worker.concurrency,
            binary,
            cluster: cluster::ClusterShared::new(tunnel.is_none()),
            tunnel,
            same_host: Default::default(),
            busy: Arc::new(busy_poll::BusyPoll::new(self.options.busy_poll_cpus, self.options.busy_poll_window)),
        });
        let acceptor = tokio::spawn(pool::accept_loop(endpoint.clone(), Arc::clone(&shared)));
        let tm =
            TaskManagerRef::spawn(TmArgs { max_retries: self.options.max_retries }).await.map_err(|e| StartError::Actor(e.to_string()))?;
        let pool = Pool::new(Arc::clone(&shared), tm.clone(), endpoint, acceptor, attempts);
        let (actor, _) = Actor::spawn(None, PoolActor, PoolArgs { shared: Arc::clone(&shared), nodes, tm })
            .await
            .map_err(|e| StartError::Actor(e.to_string()))?;
        pool.set_actor(actor.clone());
        let wait = async { ractor::call!(actor, pool::PoolMsg::WaitReady) };
        match tokio::time::timeout(self.options.start_timeout, wait).await {
            Ok(Ok(Ok(facts))) => {
                tracing::info!(pool = %pool_id, nodes = facts.len(), elapsed = ?started_at.elapsed(), "pool ready");
                pool.set_facts(facts);
                Ok(pool)
            }
            Ok(Ok(Err(failure))) => {
                let _ = pool.shutdown_ref().await;
                Err(StartError::Node { pool_id, reason: failure.message, kind: failure.kind })
            }
            Ok(Err(e)) => {
                let _ = pool.shutdown_ref().await;
                Err(StartError::Actor(e.to_string()))
            }
            Err(_) => {
                let ready = pool.stats().await.map(|s| s.ready_nodes).unwrap_or(0);
                let _ = pool.shutdown_ref().await;
                Err(StartError::Timeout { pool_id, ready, wanted: nodes, after: self.options.start_timeout })
            }
        }
    }
}
