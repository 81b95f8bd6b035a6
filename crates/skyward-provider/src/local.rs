//! `Local`: workers as processes on this machine, reached through the real QUIC path.
//!
//! The zero-setup provider for examples and tests. Each node is one worker process started with
//! `--config <file> --pool <pool id>`; the pool id on the command line is the "tag" that
//! `list_tagged` and leak checks look for in the process table.

use crate::{Instance, InstanceState, Offer, PoolContext, Provider, ProviderError, ProvisionRequest};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NAME: &str = "local";

/// Environment variable naming the worker binary the Local provider starts.
pub const ENV_WORKER_BIN: &str = "SKYWARD_WORKER_BIN";

/// How the Local provider starts a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerLaunch {
    /// A `skyward-worker` executable.
    Binary(PathBuf),
    /// This program itself in worker role (`SKYWARD_ROLE=worker`); needs `skyward::init()`.
    Embedded(PathBuf),
}

/// Worker processes on this machine.
///
/// On Linux each node gets its own slice of the CPUs this process may use, as separate machines
/// would have: with `n` nodes on `c` CPUs, node `r` runs on CPUs `r*c/n .. (r+1)*c/n` when
/// `n < c`, on CPU `r mod c` otherwise (see [`cpu_slice`]; the hardware threads of one core are
/// kept in one slice). The node's worker and its executor inherit the slice, so a call to a node
/// wakes processes on the same CPU instead of crossing to another one (on a virtual machine each
/// crossing wakes a virtual CPU through the hypervisor: docs/benchmarks.md), and while there are
/// at least as many CPUs as nodes a busy node cannot starve the others. Slices are per pool (two
/// pools on one machine overlap), and the Local offer still describes the whole machine. A pool
/// of one node, or a machine with one CPU, is not pinned; pinning is best effort (a node whose
/// mask cannot be set runs unpinned). [`Local::share_cpus`] turns slicing off.
#[derive(Debug, Clone, Default)]
pub struct Local {
    worker_binary: Option<PathBuf>,
    upload_binaries: bool,
    share_cpus: bool,
    children: Arc<Mutex<HashMap<String, LocalChild>>>,
}

/// Root of Skyward's files on this machine: `$SKYWARD_HOME`, else `~/.skyward`.
pub fn skyward_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SKYWARD_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".skyward")
}

#[derive(Debug)]
struct LocalChild {
    pid: u32,
    node_id: String,
    pool_id: String,
}

impl Local {
    /// Use this `skyward-worker` executable instead of looking for one.
    pub fn worker_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_binary = Some(path.into());
        self
    }

    /// Give every node its own binary cache, so the executable travels over the worker's
    /// connection as it would to a remote machine (instead of being staged on the shared disk).
    pub fn upload_binaries(mut self, upload: bool) -> Self {
        self.upload_binaries = upload;
        self
    }

    /// Let every node use every CPU this process may use, instead of a slice of its own.
    pub fn share_cpus(mut self, share: bool) -> Self {
        self.share_cpus = share;
        self
    }

    /// Decide how workers start: an explicit binary, `$SKYWARD_WORKER_BIN`, a `skyward-worker`
    /// next to this executable (or one directory up, for examples and tests under `target/`),
    /// else this program in worker role.
    pub fn resolve_launch(&self) -> Result<WorkerLaunch, ProviderError> {
        if let Some(path) = &self.worker_binary {
            return Ok(WorkerLaunch::Binary(path.clone()));
        }
        if let Some(path) = std::env::var_os(ENV_WORKER_BIN) {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(ProviderError::Invalid {
                    provider: NAME,
                    message: format!("{ENV_WORKER_BIN}={} is not a file", path.display()),
                });
            }
            return Ok(WorkerLaunch::Binary(path));
        }
        let exe = std::env::current_exe()
            .map_err(|e| ProviderError::Invalid { provider: NAME, message: format!("cannot locate this executable: {e}") })?;
        let mut dir = exe.parent();
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("skyward-worker");
            if candidate.is_file() {
                return Ok(WorkerLaunch::Binary(candidate));
            }
            dir = d.parent();
        }
        Ok(WorkerLaunch::Embedded(exe))
    }

    fn pids(&self, pool_id: &str) -> Vec<(String, u32)> {
        self.children
            .lock()
            .expect("local children")
            .iter()
            .filter(|(_, c)| c.pool_id == pool_id)
            .map(|(id, c)| (id.clone(), c.pid))
            .collect()
    }
}

/// The CPUs of node `rank` in a pool of `node_count` nodes, taken from `allowed` (the CPUs this
/// process may use, in the order slices should follow): `None` where the node keeps all of them
/// (one node, or at most one CPU). With fewer nodes than CPUs the slices are disjoint,
/// contiguous and cover every CPU; with more, nodes share CPUs round-robin, one CPU each.
pub fn cpu_slice(allowed: &[usize], rank: u32, node_count: u32) -> Option<Vec<usize>> {
    let (c, n, r) = (allowed.len(), node_count.max(1) as usize, rank as usize);
    if n <= 1 || c <= 1 {
        return None;
    }
    if n >= c {
        return Some(vec![allowed[r % c]]);
    }
    let r = r % n;
    Some(allowed[r * c / n..(r + 1) * c / n].to_vec())
}

/// Start the child on `cpus` only (its threads and the executors it starts inherit the mask).
/// Best effort: where the mask cannot be set (the machine's CPU set changed since it was read),
/// the worker starts unpinned.
#[cfg(target_os = "linux")]
fn pin_child(command: &mut std::process::Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt;
    let set = skyward_net::cpus::mask(cpus);
    // SAFETY: the hook runs between fork and exec; it makes one system call on a value built
    // before the fork (no allocation, no lock), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_child(_command: &mut std::process::Command, _cpus: &[usize]) {}

fn failed(operation: &'static str, message: String) -> ProviderError {
    ProviderError::Failed { provider: NAME, operation, message }
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Worker processes of `pool_id` (or of any pool) found in the process table:
/// `(pid, pool id)` for every process started with `--pool <id>` and `--config`.
pub fn scan_process_table(pool_id: Option<&str>) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args.iter().any(|a| *a == b"--config") {
            continue;
        }
        let Some(pos) = args.iter().position(|a| *a == b"--pool") else { continue };
        let Some(id) = args.get(pos + 1).map(|a| String::from_utf8_lossy(a).into_owned()) else { continue };
        if pool_id.is_none_or(|p| p == id) && alive(pid) {
            found.push((pid, id));
        }
    }
    found
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill takes plain integers; a pid that is gone yields ESRCH.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn reap(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: as above; WNOHANG makes it non-blocking.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    r == pid as i32 || r == -1
}

impl Provider for Local {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cluster_by_default(&self) -> bool {
        true
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ProviderError>> {
        Box::pin(async { Ok(vec![crate::offers::this_machine(NAME, "local-process")]) })
    }

    fn offer_ttl(&self) -> std::time::Duration {
        // This machine: computed on the spot, never cached.
        std::time::Duration::ZERO
    }

    fn prepare<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&pool.state_dir)
                .map_err(|e| failed("prepare", format!("cannot create {}: {e}", pool.state_dir.display())))?;
            if pool.image.is_some() {
                return Err(ProviderError::Invalid {
                    provider: NAME,
                    message: "Local runs workers on this machine and cannot apply an Image (hint: install what it needs here, or use the Container provider)".into(),
                });
            }
            self.resolve_launch().map(|_| ())
        })
    }

    fn provision<'a>(&'a self, pool: &'a PoolContext, request: ProvisionRequest) -> BoxFuture<'a, Result<Instance, ProviderError>> {
        Box::pin(async move {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let config_path = pool.state_dir.join(format!("{}.toml", request.node_id));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&config_path)
                .map_err(|e| failed("provision", format!("cannot write {}: {e}", config_path.display())))?;
            file.write_all(request.worker_config.expose().as_bytes()).map_err(|e| failed("provision", e.to_string()))?;
            drop(file);
            let log_path = pool.state_dir.join(format!("{}.log", request.node_id));
            let log =
                std::fs::File::create(&log_path).map_err(|e| failed("provision", format!("cannot create {}: {e}", log_path.display())))?;
            let mut command = match self.resolve_launch()? {
                WorkerLaunch::Binary(path) => std::process::Command::new(path),
                WorkerLaunch::Embedded(exe) => {
                    let mut c = std::process::Command::new(exe);
                    c.env("SKYWARD_ROLE", "worker");
                    c
                }
            };
            command
                .arg("--config")
                .arg(&config_path)
                .arg("--pool")
                .arg(&pool.pool_id)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().map_err(|e| failed("provision", e.to_string()))?)
                .stderr(log);
            // Own process group: a Ctrl-C in the user's terminal reaches the coordinator, which
            // tears workers down in order, instead of killing them all mid-task.
            use std::os::unix::process::CommandExt;
            command.process_group(0);
            if !self.share_cpus
                && let Some(cpus) = cpu_slice(&skyward_net::cpus::allowed(), request.rank, request.node_count)
            {
                pin_child(&mut command, &cpus);
            }
            let child = command.spawn().map_err(|e| failed("provision", format!("cannot start worker: {e}")))?;
            let pid = child.id();
            // The child is reaped by `terminate`; std's Child has no Drop that kills or waits.
            drop(child);
            let id = format!("local-{pid}");
            self.children
                .lock()
                .expect("local children")
                .insert(id.clone(), LocalChild { pid, node_id: request.node_id.clone(), pool_id: pool.pool_id.clone() });
            Ok(Instance {
                id,
                node_id: request.node_id,
                pool_id: pool.pool_id.clone(),
                state: InstanceState::Running,
                address: Some("127.0.0.1".into()),
            })
        })
    }

    fn get_instance<'a>(&'a self, _pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<Option<Instance>, ProviderError>> {
        Box::pin(async move {
            let children = self.children.lock().expect("local children");
            Ok(children.get(id).map(|c| Instance {
                id: id.to_string(),
                node_id: c.node_id.clone(),
                pool_id: c.pool_id.clone(),
                state: if alive(c.pid) { InstanceState::Running } else { InstanceState::Terminated },
                address: Some("127.0.0.1".into()),
            }))
        })
    }

    fn terminate<'a>(&'a self, _pool: &'a PoolContext, id: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let Some(pid) = self.children.lock().expect("local children").get(id).map(|c| c.pid) else { return Ok(()) };
            send_signal(pid, libc::SIGTERM);
            // Bounded: 2 s for a clean exit, then SIGKILL and up to 2 s more for the kernel.
            let mut waited = Duration::ZERO;
            let step = Duration::from_millis(10);
            while !reap(pid) && alive(pid) {
                if waited == Duration::from_secs(2) {
                    send_signal(pid, libc::SIGKILL);
                }
                if waited >= Duration::from_secs(4) {
                    return Err(ProviderError::Leaked {
                        provider: NAME,
                        instance: id.to_string(),
                        message: format!("pid {pid} survived SIGKILL"),
                    });
                }
                tokio::time::sleep(step).await;
                waited += step;
            }
            self.children.lock().expect("local children").remove(id);
            Ok(())
        })
    }

    fn teardown<'a>(&'a self, pool: &'a PoolContext) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let mut first_error = None;
            for (id, _) in self.pids(&pool.pool_id) {
                if let Err(e) = self.terminate(pool, &id).await {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    fn list_tagged<'a>(&'a self, pool_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            Ok(scan_process_table(pool_id)
                .into_iter()
                .map(|(pid, pool)| Instance {
                    id: format!("local-{pid}"),
                    node_id: String::new(),
                    pool_id: pool,
                    state: InstanceState::Running,
                    address: Some("127.0.0.1".into()),
                })
                .collect())
        })
    }

    fn worker_layout(&self, pool: &PoolContext, node_id: &str) -> crate::WorkerLayout {
        let state_dir = pool.state_dir.join(node_id);
        let cache_dir = if self.upload_binaries { state_dir.join("cache") } else { skyward_home().join("cache").join("bin") };
        crate::WorkerLayout { cache_dir, state_dir, on_silence: skyward_proto::SilenceAction::Exit }
    }

    fn coordinator_bind(&self, _pool: &PoolContext) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    }

    fn stage_binary<'a>(
        &'a self,
        _pool: &'a PoolContext,
        path: &'a std::path::Path,
        hash_hex: &'a str,
    ) -> BoxFuture<'a, Result<bool, ProviderError>> {
        Box::pin(async move {
            if self.upload_binaries {
                return Ok(false);
            }
            let dir = skyward_home().join("cache").join("bin");
            std::fs::create_dir_all(&dir).map_err(|e| failed("stage_binary", format!("cannot create {}: {e}", dir.display())))?;
            let target = dir.join(hash_hex);
            if target.exists() {
                return Ok(true);
            }
            // Same bytes under their hash: a hard link when possible, else a copy; then an atomic
            // rename so a worker never sees a partial file.
            static STAGING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = STAGING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = dir.join(format!(".{hash_hex}.{}.{n}.partial", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(path, &tmp).is_err() {
                std::fs::copy(path, &tmp).map_err(|e| failed("stage_binary", format!("cannot copy {}: {e}", path.display())))?;
            }
            // Nodes stage concurrently: the first rename wins, the others replace it with the
            // same bytes.
            std::fs::rename(&tmp, &target).map_err(|e| failed("stage_binary", e.to_string()))?;
            Ok(true)
        })
    }

    fn worker_log_tail<'a>(&'a self, pool: &'a PoolContext, node_id: &'a str, lines: usize) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let text = std::fs::read_to_string(pool.state_dir.join(format!("{node_id}.log"))).ok()?;
            let all: Vec<&str> = text.lines().collect();
            Some(all[all.len().saturating_sub(lines)..].join("\n"))
        })
    }

    fn open_tunnel<'a>(
        &'a self,
        _pool: &'a PoolContext,
        _instance_id: &'a str,
        socket: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Box<dyn crate::TunnelIo>, ProviderError>> {
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| failed("open_tunnel", format!("cannot connect to {}: {e}", socket.display())))?;
            Ok(Box::new(stream) as Box<dyn crate::TunnelIo>)
        })
    }

    fn emergency_teardown(&self, pool: &PoolContext) {
        let pids = self.pids(&pool.pool_id);
        for (_, pid) in &pids {
            send_signal(*pid, libc::SIGKILL);
        }
        for (id, pid) in pids {
            // SIGKILL cannot be caught; a blocking wait returns as soon as the kernel has ended it.
            let mut status = 0;
            // SAFETY: plain integers; the child is ours.
            unsafe {
                libc::waitpid(pid as i32, &mut status, 0);
            }
            self.children.lock().expect("local children").remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_slice;

    #[test]
    fn one_node_or_one_cpu_is_not_pinned() {
        assert_eq!(cpu_slice(&[0, 1, 2, 3], 0, 1), None);
        assert_eq!(cpu_slice(&[5], 3, 4), None);
        assert_eq!(cpu_slice(&[], 0, 2), None);
    }

    #[test]
    fn fewer_nodes_than_cpus_get_disjoint_slices_that_cover_every_cpu() {
        let allowed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let slices: Vec<Vec<usize>> = (0..3).map(|r| cpu_slice(&allowed, r, 3).expect("pinned")).collect();
        assert_eq!(slices, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8, 9]]);
        // The CPUs this process may use, not 0..c: a process confined to 4-7 slices those.
        assert_eq!(cpu_slice(&[4, 5, 6, 7], 1, 2), Some(vec![6, 7]));
    }

    #[test]
    fn more_nodes_than_cpus_share_them_round_robin() {
        let slices: Vec<Vec<usize>> = (0..5).map(|r| cpu_slice(&[2, 3], r, 5).expect("pinned")).collect();
        assert_eq!(slices, vec![vec![2], vec![3], vec![2], vec![3], vec![2]]);
        assert_eq!(cpu_slice(&[0, 1], 1, 2), Some(vec![1]));
    }

    #[test]
    fn a_rank_past_the_count_still_gets_a_slice() {
        // Defensive (a pool's node count does not change today): never an empty or out-of-range slice.
        assert_eq!(cpu_slice(&[0, 1, 2, 3], 5, 2), Some(vec![2, 3]));
    }
}
