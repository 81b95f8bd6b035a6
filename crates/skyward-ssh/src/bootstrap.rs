//! Node bootstrap over SSH, shared by every provider that hands back a host: run the image
//! script and upload `skyward-worker` (concurrently), write the worker's configuration, start the
//! worker detached from the SSH session. Output streams to the log prefixed with the node; a
//! failure carries the last lines of output.

use crate::{Session, SshError};
use std::path::Path;
use std::time::{Duration, Instant};

/// Lines of output kept for an error report.
pub const TAIL_LINES: usize = 50;

/// What to set up on one node. Remote files live under `remote_root`:
/// `bin/skyward-worker-<hash>`, `worker.toml` (0600), `worker.log`, `image/` (script state).
#[derive(Clone)]
pub struct BootstrapPlan<'a> {
    /// Node id (log prefix).
    pub node: &'a str,
    /// Pool id (the worker's `--pool` tag).
    pub pool_id: &'a str,
    /// Root of Skyward's files on the node.
    pub remote_root: &'a str,
    /// Local `skyward-worker` executable.
    pub worker_binary: &'a Path,
    /// Its SHA-256, hex.
    pub worker_sha256: &'a str,
    /// The worker's configuration (holds its private key).
    pub worker_config: &'a str,
    /// The image script and its hash, when the pool has an image.
    pub image: Option<(&'a str, &'a str)>,
    /// Tar archives to unpack: (remote directory, relative ones under `remote_root`; archive).
    pub syncs: &'a [(&'a str, &'a [u8])],
}

impl std::fmt::Debug for BootstrapPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the worker's private key: never printed.
        f.debug_struct("BootstrapPlan")
            .field("node", &self.node)
            .field("pool_id", &self.pool_id)
            .field("remote_root", &self.remote_root)
            .field("worker_binary", &self.worker_binary)
            .field("worker_sha256", &self.worker_sha256)
            .field("syncs", &self.syncs.len())
            .finish_non_exhaustive()
    }
}

impl BootstrapPlan<'_> {
    /// Remote path of the worker executable.
    pub fn remote_worker(&self) -> String {
        format!("{}/bin/skyward-worker-{}", self.remote_root, &self.worker_sha256[..16.min(self.worker_sha256.len())])
    }

    /// Remote path of the worker's log.
    pub fn remote_log(&self) -> String {
        format!("{}/worker.log", self.remote_root)
    }
}

/// Where the bootstrap spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootstrapTimings {
    /// Running the image script (zero without an image; overlaps the upload).
    pub image: Duration,
    /// Uploading the worker (overlaps the image script).
    pub upload: Duration,
    /// Writing the configuration and starting the worker.
    pub start: Duration,
    /// Whether the worker binary had to be sent (false when the node already had it).
    pub uploaded: bool,
}

/// A failed bootstrap: the stage, why, and the last lines of output.
#[derive(Debug, thiserror::Error)]
#[error("bootstrap of {node} failed while {stage}: {message}{}", render_tail(tail))]
pub struct BootstrapError {
    /// Node id.
    pub node: String,
    /// What was being done.
    pub stage: &'static str,
    /// Why it failed.
    pub message: String,
    /// Last lines of output (at most [`TAIL_LINES`]).
    pub tail: Vec<String>,
}

fn render_tail(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    format!("\n--- last {} lines of output ---\n{}", tail.len(), tail.join("\n"))
}

fn quote_ok(s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['\'', '\n', '\0']) { Err(format!("unsafe value {s:?}")) } else { Ok(()) }
}

/// Bootstrap one node over `session`: [`install`] and [`sync_files`] concurrently, then
/// [`start_worker`].
pub async fn bootstrap(session: &Session, plan: &BootstrapPlan<'_>) -> Result<BootstrapTimings, BootstrapError> {
    let (installed, synced) = tokio::join!(install(session, plan), sync_files(session, plan));
    let mut timings = installed?;
    synced?;
    timings.start = start_worker(session, plan).await?;
    Ok(timings)
}

/// Unpack the plan's sync archives into their directories.
pub async fn sync_files(session: &Session, plan: &BootstrapPlan<'_>) -> Result<(), BootstrapError> {
    check_plan(plan)?;
    for (remote, archive) in plan.syncs {
        quote_ok(remote).map_err(|m| failure(plan, "checking the plan", m, Vec::new()))?;
        let dir = if remote.starts_with('/') { remote.to_string() } else { format!("{}/{remote}", plan.remote_root) };
        let command = format!("mkdir -p '{dir}' && tar -xf - -C '{dir}' --no-same-owner 2>&1");
        let out = session
            .exec(&command, Some(archive), TAIL_LINES, |_| {})
            .await
            .map_err(|e| failure(plan, "syncing files", e.to_string(), Vec::new()))?;
        if !out.success() {
            return Err(failure(plan, "syncing files", format!("unpacking into {dir}: {}", out.describe()), out.tail));
        }
    }
    Ok(())
}

fn failure(plan: &BootstrapPlan<'_>, stage: &'static str, message: String, tail: Vec<String>) -> BootstrapError {
    BootstrapError { node: plan.node.to_string(), stage, message, tail }
}

fn check_plan(plan: &BootstrapPlan<'_>) -> Result<(), BootstrapError> {
    for v in [plan.remote_root, plan.pool_id, plan.node, plan.worker_sha256] {
        quote_ok(v).map_err(|m| failure(plan, "checking the plan", m, Vec::new()))?;
    }
    Ok(())
}

/// What is the same on every node of an image: the image script's effects and the worker
/// executable (the two run concurrently). This part can be baked into a machine image; on such
/// an image both steps find their work done and return at once.
pub async fn install(session: &Session, plan: &BootstrapPlan<'_>) -> Result<BootstrapTimings, BootstrapError> {
    let fail = |stage: &'static str, message: String, tail: Vec<String>| failure(plan, stage, message, tail);
    check_plan(plan)?;
    let root = plan.remote_root;
    let node = plan.node;

    let image = async {
        let Some((script, hash)) = plan.image else { return Ok(Duration::ZERO) };
        quote_ok(hash).map_err(|m| fail("checking the plan", m, Vec::new()))?;
        let started = Instant::now();
        // The script runs from a file with stdin closed: a setup command that reads stdin must
        // not swallow the rest of the script.
        let script_path = format!("{root}/image/script-{hash}.sh");
        session
            .write_file(&script_path, script.as_bytes(), 0o700)
            .await
            .map_err(|e| fail("writing the image script", e.to_string(), Vec::new()))?;
        let command = format!(
            "M='{root}/image/ready-{hash}'; if [ -e \"$M\" ]; then echo 'image already set up'; exit 0; fi; \
             SKYWARD_IMAGE_DIR='{root}/image' sh '{script_path}' < /dev/null 2>&1 && : > \"$M\""
        );
        let out = session
            .exec(&command, None, TAIL_LINES, |line| tracing::info!(target: "skyward::bootstrap", %node, "{line}"))
            .await
            .map_err(|e| fail("running the image script", e.to_string(), Vec::new()))?;
        if !out.success() {
            return Err(fail("running the image script", out.describe(), out.tail));
        }
        Ok(started.elapsed())
    };
    let upload = async {
        let started = Instant::now();
        let sent = session
            .upload_file(plan.worker_binary, plan.worker_sha256, &plan.remote_worker(), 0o755)
            .await
            .map_err(|e| fail("uploading skyward-worker", e.to_string(), Vec::new()))?;
        Ok::<_, BootstrapError>((started.elapsed(), sent))
    };
    let (image, upload) = tokio::join!(image, upload);
    let image = image?;
    let (upload, uploaded) = upload?;
    Ok(BootstrapTimings { image, upload, start: Duration::ZERO, uploaded })
}

/// Write the worker's configuration (0600) and start the worker detached from the session;
/// returns the time it took.
pub async fn start_worker(session: &Session, plan: &BootstrapPlan<'_>) -> Result<Duration, BootstrapError> {
    let fail = |stage: &'static str, message: String, tail: Vec<String>| failure(plan, stage, message, tail);
    check_plan(plan)?;
    let root = plan.remote_root;
    let node = plan.node;
    let started = Instant::now();
    let config_path = format!("{root}/worker.toml");
    session
        .write_file(&config_path, plan.worker_config.as_bytes(), 0o600)
        .await
        .map_err(|e: SshError| fail("writing the worker configuration", e.to_string(), Vec::new()))?;
    let worker = plan.remote_worker();
    let log = plan.remote_log();
    let pool = plan.pool_id;
    // The image's environment and Python venv apply to the worker and everything it runs.
    let command = format!(
        "cd '{root}' && {{ if [ -f '{root}/image/env.sh' ]; then . '{root}/image/env.sh'; fi; \
         if [ -d '{root}/image/venv/bin' ]; then PATH='{root}/image/venv/bin':\"$PATH\"; export PATH; fi; \
         setsid nohup '{worker}' --config '{config_path}' --pool '{pool}' > '{log}' 2>&1 < /dev/null & echo \"started worker pid $!\"; }}"
    );
    let out = session
        .exec(&command, None, TAIL_LINES, |line| tracing::debug!(target: "skyward::bootstrap", %node, "{line}"))
        .await
        .map_err(|e| fail("starting the worker", e.to_string(), Vec::new()))?;
    if !out.success() {
        return Err(fail("starting the worker", out.describe(), out.tail));
    }
    Ok(started.elapsed())
}
