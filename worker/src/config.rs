//! The worker's configuration: a TOML file written by the provider, with environment overrides.

use serde::{Deserialize, Serialize};
use skyward_net::CertBundle;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use skyward_proto::SilenceAction;

/// Everything a worker needs to join its pool.
#[derive(Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Pool id.
    pub pool_id: String,
    /// Node id the coordinator gave this worker.
    pub node_id: String,
    /// Coordinator's QUIC address.
    pub coordinator: SocketAddr,
    /// The pool CA's certificate, PEM.
    pub ca_cert_pem: String,
    /// This worker's client certificate and key.
    pub cert: CertBundle,
    /// Coordinator silence (seconds) after which the worker ends its machine.
    pub instance_timeout_secs: f64,
    /// Task slots this worker offers.
    pub concurrency: u32,
    /// Where executables are cached by hash.
    pub cache_dir: PathBuf,
    /// Where sockets and scratch files go.
    pub state_dir: PathBuf,
    /// What to do on coordinator silence.
    #[serde(default)]
    pub on_silence: SilenceAction,
    /// Largest frame accepted.
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// Standalone mode: instead of dialing `coordinator` over the network, listen on this Unix
    /// socket (0600) for the stream the coordinator opens through SSH, and run QUIC over it.
    #[serde(default)]
    pub standalone_socket: Option<PathBuf>,
}

fn default_max_frame() -> usize {
    skyward_proto::codec::DEFAULT_MAX_FRAME
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("pool_id", &self.pool_id)
            .field("node_id", &self.node_id)
            .field("coordinator", &self.coordinator)
            .field("cert", &self.cert)
            .field("instance_timeout_secs", &self.instance_timeout_secs)
            .field("concurrency", &self.concurrency)
            .field("cache_dir", &self.cache_dir)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read worker config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("invalid worker config {path}: {reason}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// The parser's message (names the field).
        reason: String,
    },
    /// An environment override is malformed.
    #[error("invalid value {value:?} for {var}: {reason}")]
    Env {
        /// Variable.
        var: &'static str,
        /// Value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid worker config: {0}")]
    Invalid(String),
}

/// Environment variable overriding the coordinator address.
pub const ENV_COORDINATOR: &str = "SKYWARD_COORDINATOR";
/// Environment variable overriding the instance timeout (seconds).
pub const ENV_INSTANCE_TIMEOUT: &str = "SKYWARD_INSTANCE_TIMEOUT";
/// Environment variable overriding the concurrency.
pub const ENV_CONCURRENCY: &str = "SKYWARD_CONCURRENCY";

impl WorkerConfig {
    /// Read the file at `path`, then apply environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: WorkerConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), reason: e.to_string() })?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Apply overrides from `get` (the environment in production).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get(ENV_COORDINATOR) {
            self.coordinator = v.parse().map_err(|e: std::net::AddrParseError| ConfigError::Env {
                var: ENV_COORDINATOR,
                value: v,
                reason: e.to_string(),
            })?;
        }
        if let Some(v) = get(ENV_INSTANCE_TIMEOUT) {
            self.instance_timeout_secs = v.parse().map_err(|e: std::num::ParseFloatError| ConfigError::Env {
                var: ENV_INSTANCE_TIMEOUT,
                value: v,
                reason: e.to_string(),
            })?;
        }
        if let Some(v) = get(ENV_CONCURRENCY) {
            self.concurrency = v.parse().map_err(|e: std::num::ParseIntError| ConfigError::Env {
                var: ENV_CONCURRENCY,
                value: v,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Check ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.instance_timeout_secs.is_finite() && self.instance_timeout_secs > 0.0) {
            return Err(ConfigError::Invalid(format!("instance_timeout_secs must be positive, got {}", self.instance_timeout_secs)));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid("concurrency must be at least 1".into()));
        }
        Ok(())
    }

    /// The instance timeout as a duration.
    pub fn instance_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.instance_timeout_secs)
    }

    /// Serialize to TOML (used by providers that write the file).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("worker config serializes")
    }
}
