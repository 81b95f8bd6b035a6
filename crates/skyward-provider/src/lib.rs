//! The `Provider` trait every compute source implements, and the `Local` provider.
//!
//! A provider turns "I need a node with this worker configuration" into a running worker and
//! back into nothing. It never sees tasks, sessions or actors.
//!
//! Architecture invariant: providers never depend on the coordinator; the coordinator drives them
//! through this trait only. "Terminated" means the provider confirmed it.

pub mod catalog;
#[cfg(feature = "container")]
pub mod container;
#[cfg(feature = "cloud")]
pub mod http;
pub mod image;
pub mod local;
#[cfg(feature = "cloud")]
pub mod machines;
pub mod offers;
#[cfg(feature = "container")]
mod payload;
#[cfg(feature = "runpod")]
pub mod runpod;
pub mod secret;
pub mod select;
pub mod sync;
#[cfg(feature = "vastai")]
pub mod vastai;

pub use catalog::{Accelerator, accelerators};
#[cfg(feature = "container")]
pub use container::Container;
pub use image::{Image, ImageError};
pub use local::Local;
pub use offers::{Architecture, Billing, InstanceType, Offer, OfferAccelerator, OfferCache};
pub use secret::Secret;
pub use select::{Allocation, Attempt, Candidate, FailureKind, NoOffers, Selection, Spec};
pub use sync::SyncDir;

use futures::future::BoxFuture;
use std::fmt;

/// SHA-256 of the file at `path`, read in 1 MiB pieces, and its length.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<([u8; 32], u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hasher.finalize().into(), len))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// File name of a standalone worker's socket in its `WorkerLayout::state_dir`.
pub const STANDALONE_SOCKET: &str = "standalone.sock";

/// A byte stream to a standalone worker's socket.
pub trait TunnelIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> TunnelIo for T {}

/// What the coordinator tells a provider about the pool.
#[derive(Debug, Clone)]
pub struct PoolContext {
    /// Pool id; every resource a provider creates carries it.
    pub pool_id: String,
    /// The pool's state directory on the coordinator's machine.
    pub state_dir: std::path::PathBuf,
    /// What every node needs before tasks run (providers with machines apply it).
    pub image: Option<Image>,
    /// The offer chosen for this start; `None` for providers that sell nothing (Local, Container
    /// when started without specs).
    pub placement: Option<Placement>,
}

/// The offer a start buys and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The offer.
    pub offer: Offer,
    /// Bought as spot (interruptible).
    pub spot: bool,
    /// The spec's allocation (`SpotIfAvailable`: a provider whose spot request finds no
    /// capacity may buy on-demand instead).
    pub allocation: select::Allocation,
    /// Price per node-hour the selection saw, USD.
    pub node_price: f64,
    /// The spec's cap per node-hour, for providers whose live price can differ from the catalog.
    pub max_hourly_cost: Option<f64>,
    /// Boot disk per node, GB (`None`: the provider's default).
    pub disk_gb: Option<u32>,
}

/// Where a worker keeps its files on its machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLayout {
    /// Content-addressed executables.
    pub cache_dir: std::path::PathBuf,
    /// Sockets, logs, scratch.
    pub state_dir: std::path::PathBuf,
    /// What the worker does when the coordinator falls silent.
    pub on_silence: skyward_proto::SilenceAction,
}

/// A request for one node.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// Node id (unique in the pool).
    pub node_id: String,
    /// Rank the node will get.
    pub rank: u32,
    /// How many nodes the pool wants in all (ranks `0..node_count`) when this one is asked for.
    pub node_count: u32,
    /// The worker's configuration file (TOML); holds the worker's private key.
    pub worker_config: Secret<String>,
}

/// Lifecycle state of an instance as the provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Requested, not yet running.
    Pending,
    /// Running.
    Running,
    /// Gone, confirmed.
    Terminated,
}

/// One machine (or process, or container) a provider runs for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Provider-specific id.
    pub id: String,
    /// Node id it was provisioned for.
    pub node_id: String,
    /// Pool id tag.
    pub pool_id: String,
    /// State.
    pub state: InstanceState,
    /// Address other nodes can reach it at, if known.
    pub address: Option<String>,
}

/// Errors from a provider, classified for retry and fallback decisions.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider has no capacity for the request now.
    #[error("{provider}: no capacity: {message}")]
    NoCapacity {
        /// Provider name.
        provider: &'static str,
        /// Details.
        message: String,
    },
    /// The request is invalid (bad configuration).
    #[error("{provider}: invalid request: {message}")]
    Invalid {
        /// Provider name.
        provider: &'static str,
        /// Details.
        message: String,
    },
    /// An account limit or balance stops the request.
    #[error("{provider}: quota or balance exceeded: {message}")]
    Quota {
        /// Provider name.
        provider: &'static str,
        /// Details.
        message: String,
    },
    /// Credentials are missing, malformed or refused.
    #[error("{provider}: authentication failed: {message}")]
    Auth {
        /// Provider name.
        provider: &'static str,
        /// Details, with a hint naming the setting or variable to fix.
        message: String,
    },
    /// The provider kept throttling past the retries.
    #[error("{provider}: {operation} rate limited: {message}")]
    RateLimited {
        /// Provider name.
        provider: &'static str,
        /// What was attempted.
        operation: &'static str,
        /// Details.
        message: String,
    },
    /// The live price is above the spec's cap.
    #[error("{provider}: price above max_hourly_cost: {message}")]
    PriceCap {
        /// Provider name.
        provider: &'static str,
        /// Details.
        message: String,
    },
    /// An operation failed in a way that may succeed on retry.
    #[error("{provider}: {operation} failed: {message}")]
    Failed {
        /// Provider name.
        provider: &'static str,
        /// What was attempted.
        operation: &'static str,
        /// Details.
        message: String,
    },
    /// A node's bootstrap failed (its output is in the message); the node was torn down.
    /// Not retried: the same image fails the same way.
    #[error("{provider}: {message}")]
    Bootstrap {
        /// Provider name.
        provider: &'static str,
        /// What failed, with the last lines of output.
        message: String,
    },
    /// Termination could not be confirmed: the instance may still run (and cost money).
    #[error("{provider}: could not confirm termination of {instance}: {message}; it may still be running")]
    Leaked {
        /// Provider name.
        provider: &'static str,
        /// Instance id.
        instance: String,
        /// Details.
        message: String,
    },
}

/// A source of nodes.
pub trait Provider: Send + Sync + fmt::Debug + 'static {
    /// Short lower-case name (`local`, `aws`, ...).
    fn name(&self) -> &'static str;

    /// Whether nodes share a private network (cluster mode by default).
    fn cluster_by_default(&self) -> bool;

    /// The provider's whole catalog, normalised (filtering happens in selection).
    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>>;

    /// Key of this provider's catalog in the offer cache: the name, plus whatever configuration
    /// changes what `offers` returns (a region, a marketplace filter).
    fn offer_cache_key(&self) -> String {
        self.name().to_string()
    }

    /// How long a fetched catalog stays fresh: marketplaces minutes, clouds a day.
    fn offer_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(24 * 3600)
    }

    /// Create per-pool resources (networks, keys, security groups).
    fn prepare<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Start one node whose worker uses `request.worker_config`.
    fn provision<'a>(&'a self, pool: &'a PoolContext, request: ProvisionRequest) -> BoxFuture<'a, Result<Instance, ProviderError>>;

    /// Current view of one instance; `None` when the provider does not know it.
    fn get_instance<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>>;

    /// End one instance and confirm it.
    fn terminate<'a>(&'a self, pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// End every instance and remove every resource of the pool; confirm.
    fn teardown<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Instances tagged with `pool_id` (or with any pool id when `None`), for leak sweeps.
    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>>;

    /// Directories the worker of `node_id` uses on its machine.
    fn worker_layout(&self, pool: &PoolContext, node_id: &str) -> WorkerLayout;

    /// Address the coordinator's QUIC server binds to so this provider's workers can reach it
    /// (asked after `prepare`).
    fn coordinator_bind(&self, _pool: &PoolContext) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    }

    /// Put the executable with SHA-256 `hash_hex` into the nodes' binary cache by the provider's
    /// own means, if it has any (a shared disk). Returns whether it did; otherwise the coordinator
    /// uploads it over the worker's connection.
    fn stage_binary<'a>(
        &'a self,
        _pool: &'a PoolContext,
        _path: &'a std::path::Path,
        _hash_hex: &'a str,
    ) -> BoxFuture<'a, Result<bool, ProviderError>> {
        Box::pin(async { Ok(false) })
    }

    /// The last `lines` lines of the worker's own log for `node_id`, when the provider can read
    /// it (shown to the user when a worker fails to start).
    fn worker_log_tail<'a>(&'a self, _pool: &'a PoolContext, _node_id: &'a str, _lines: usize) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    /// Standalone mode: open a byte stream to the Unix socket `socket` of the worker on
    /// `instance_id` (an SSH channel on machines). The coordinator runs the pool's QUIC session
    /// through it. Providers that cannot reach their workers this way refuse.
    fn open_tunnel<'a>(
        &'a self,
        _pool: &'a PoolContext,
        _instance_id: &'a str,
        _socket: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Box<dyn TunnelIo>, ProviderError>> {
        let provider = self.name();
        Box::pin(async move {
            Err(ProviderError::Invalid {
                provider,
                message: "this provider does not support standalone mode (hint: Options { cluster: None })".into(),
            })
        })
    }

    /// Last-resort synchronous teardown for drop and signal paths, where no runtime may be
    /// available. Must not block for long.
    fn emergency_teardown(&self, pool: &PoolContext);
}
