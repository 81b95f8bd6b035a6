//! What every SSH-bootstrapped node receives, prepared once per pool: the static worker (and
//! its SHA-256), the rendered `Image` script and the packed directories to sync. Shared by the
//! Container provider and the cloud providers.

use crate::{PoolContext, ProviderError};
use std::path::{Path, PathBuf};

/// A pool's bootstrap payload.
#[derive(Debug)]
pub(crate) struct Payload {
    /// The static worker executable.
    pub(crate) worker: PathBuf,
    /// Its SHA-256, hex.
    pub(crate) worker_sha256: String,
    /// The Image's setup script and its hash.
    pub(crate) image_script: Option<(String, String)>,
    /// Directories to sync.
    pub(crate) syncs: Vec<crate::sync::PackedSync>,
}

/// The worker binary: `explicit`, else the one next to this program (or named by
/// `SKYWARD_WORKER_BIN`).
pub(crate) fn resolve_worker(provider: &'static str, explicit: Option<&Path>) -> Result<PathBuf, ProviderError> {
    let invalid = |message: String| ProviderError::Invalid { provider, message };
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(invalid(format!("worker binary {} is not a file", p.display()))) };
    }
    match crate::Local::default().resolve_launch()? {
        crate::local::WorkerLaunch::Binary(p) => Ok(p),
        crate::local::WorkerLaunch::Embedded(_) => Err(invalid(format!(
            "no skyward-worker executable found next to this program (hint: `cargo build -p skyward-worker`, \
             or set {}=/path/to/skyward-worker)",
            crate::local::ENV_WORKER_BIN
        ))),
    }
}

/// Resolve, hash and pack everything a node of `pool` needs.
pub(crate) async fn prepare(provider: &'static str, worker_override: Option<&Path>, pool: &PoolContext) -> Result<Payload, ProviderError> {
    let failed = |message: String| ProviderError::Failed { provider, operation: "prepare", message };
    let invalid = |message: String| ProviderError::Invalid { provider, message };
    let worker = resolve_worker(provider, worker_override)?;
    let worker_sha256 = {
        let path = worker.clone();
        tokio::task::spawn_blocking(move || crate::sha256_file(&path).map(|(hash, _)| crate::hex(&hash)))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("cannot read {}: {e}", worker.display())))?
    };
    let image_script = match &pool.image {
        Some(image) => {
            let script = image.render().map_err(|e| invalid(format!("image: {e}")))?;
            let hash = image.hash().map_err(|e| invalid(format!("image: {e}")))?;
            Some((script, hash))
        }
        None => None,
    };
    let syncs = match &pool.image {
        Some(image) if !image.syncs().is_empty() => {
            let dirs = image.syncs().to_vec();
            tokio::task::spawn_blocking(move || dirs.iter().map(|d| d.pack()).collect::<Result<Vec<_>, _>>())
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| invalid(e.to_string()))?
        }
        _ => Vec::new(),
    };
    for s in &syncs {
        tracing::info!(remote = %s.remote, files = s.files, bytes = s.archive.len(), skipped_links = s.skipped, "files to sync");
    }
    Ok(Payload { worker, worker_sha256, image_script, syncs })
}
