//! Executor processes: the user's program started in executor role, one per binary hash.
//!
//! Supervision: an executor that exits (abort, segfault, kill) fails the calls it had in flight
//! with `ExecutorDied` and the exit reason; the next call starts a fresh one.

use skyward_net::UnixFrameWriter;
use skyward_proto::codec::{self, FrameDecoder};
use skyward_proto::error::{RemoteError, RemoteErrorKind};
use skyward_proto::exec::{ENV_EXECUTOR_SOCKET, ENV_ROLE, FromExecutor, ROLE_EXECUTOR, ToExecutor};
use skyward_proto::message::{Args, BinaryHash, InstanceInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::{Mutex as AsyncMutex, mpsc};

/// What a call yields, in order: items, then one final result.
#[derive(Debug)]
pub enum CallEvent {
    /// A stream item.
    Item(Vec<u8>),
    /// The call ended.
    Done(Result<Vec<u8>, RemoteError>),
}

/// A unary call's result, with the token its [`UnaryDone`] carried.
pub type UnaryResult = (u64, Result<Vec<u8>, RemoteError>);

/// Takes unary calls' results where the executor's reader reads them: consecutive results of
/// one read for the same `UnaryFinish` at once (the worker has one for all its calls), so that
/// it can book them under one lock.
pub trait UnaryFinish: Send + Sync {
    /// Take every result in `results` (in the order read).
    fn finish(&self, results: &mut Vec<UnaryResult>);
}

/// Where a unary call's result goes: `finish` gets it with `token`.
pub struct UnaryDone {
    /// Shared by the calls whose results may be finished together.
    pub finish: Arc<dyn UnaryFinish>,
    /// Names the call to `finish`.
    pub token: u64,
}

impl std::fmt::Debug for UnaryDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnaryDone").field("token", &self.token).finish_non_exhaustive()
    }
}

/// Who waits for a call: a channel of its events, or (unary calls started with
/// [`Executors::unary_now`]) a [`UnaryFinish`] that takes the result where it is read.
enum Waiter {
    Events(mpsc::UnboundedSender<CallEvent>),
    Done(UnaryDone),
}

impl Waiter {
    fn finish(self, result: Result<Vec<u8>, RemoteError>) {
        match self {
            Waiter::Events(tx) => {
                let _ = tx.send(CallEvent::Done(result));
            }
            Waiter::Done(done) => done.finish.finish(&mut vec![(done.token, result)]),
        }
    }
}

/// The unary results of one read from an executor, handed on per [`UnaryFinish`].
#[derive(Default)]
struct Finishing {
    to: Option<Arc<dyn UnaryFinish>>,
    results: Vec<UnaryResult>,
}

impl Finishing {
    fn push(&mut self, done: UnaryDone, result: Result<Vec<u8>, RemoteError>) {
        if self.to.as_ref().is_some_and(|to| !Arc::ptr_eq(to, &done.finish)) {
            self.flush();
        }
        self.to.get_or_insert(done.finish);
        self.results.push((done.token, result));
    }

    fn flush(&mut self) {
        if let Some(to) = self.to.take() {
            to.finish(&mut self.results);
            self.results.clear();
        }
    }
}

type Waiters = Arc<Mutex<skyward_proto::IdMap<u64, Waiter>>>;

/// An actor operation's answer from the executor.
pub type ActorAnswer = Result<Vec<u8>, skyward_proto::cluster::ClusterError>;
/// Called once with an actor operation's answer, from the executor's reader task.
pub type ActorDone = Box<dyn FnOnce(ActorAnswer) + Send>;

type ActorWaiters = Arc<Mutex<HashMap<u64, ActorDone>>>;

struct Running {
    tx: UnixFrameWriter,
    /// The node facts the last call carried; a call with the same facts sends none.
    info_sent: Arc<Mutex<Option<Arc<InstanceInfo>>>>,
    waiters: Waiters,
    actor_waiters: ActorWaiters,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// Handles a task's collection operation: `(request id, encoded op, the executor's socket)`.
pub type ClusterHook = Arc<dyn Fn(u64, Vec<u8>, UnixFrameWriter) + Send + Sync>;

/// Starts and reuses executors for the binaries in the cache.
pub struct Executors {
    cluster: ClusterHook,
    cache_dir: PathBuf,
    state_dir: PathBuf,
    next_call: AtomicU64,
    running: AsyncMutex<HashMap<BinaryHash, Running>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Executors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executors").field("cache_dir", &self.cache_dir).finish_non_exhaustive()
    }
}

/// A call in progress.
#[derive(Debug)]
pub struct CallHandle {
    /// Events of the call.
    pub events: mpsc::UnboundedReceiver<CallEvent>,
    /// Credit and cancellation.
    pub control: Arc<CallControl>,
}

/// Credit and cancellation of a call in progress.
pub struct CallControl {
    id: u64,
    tx: UnixFrameWriter,
    waiters: Waiters,
}

impl std::fmt::Debug for CallControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallControl").field("id", &self.id).finish_non_exhaustive()
    }
}

impl CallControl {
    /// Forward stream credit.
    pub fn credit(&self, items: u32) {
        let _ = self.tx.send(&ToExecutor::Credit { id: self.id, items });
    }

    /// Abort the call. The executor sends nothing more for it, so its waiter goes now.
    pub fn cancel(&self) {
        let _ = self.tx.send(&ToExecutor::Cancel { id: self.id });
        self.waiters.lock().expect("waiters").remove(&self.id);
    }
}

/// A running executor's connection, taken out of the table to send one call.
struct Caller {
    tx: UnixFrameWriter,
    waiters: Waiters,
    info_sent: Arc<Mutex<Option<Arc<InstanceInfo>>>>,
}

impl Caller {
    fn of(running: &Running) -> Self {
        Caller { tx: running.tx.clone(), waiters: Arc::clone(&running.waiters), info_sent: Arc::clone(&running.info_sent) }
    }

    /// Register `waiter` and send the call; when the executor is gone, the call's parts come back.
    #[allow(clippy::too_many_arguments, clippy::result_large_err)]
    fn send(
        self,
        id: u64,
        name: String,
        args: Args,
        info: Arc<InstanceInfo>,
        streaming: bool,
        credit: u32,
        waiter: Waiter,
    ) -> Result<Arc<CallControl>, (String, Args, Waiter)> {
        self.waiters.lock().expect("waiters").insert(id, waiter);
        let (message, sent) = {
            // Compare and send under one lock: the executor applies `None` to the call before it.
            let mut last = self.info_sent.lock().expect("info lock");
            let same = last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &info) || **l == *info);
            let info = if same {
                None
            } else {
                *last = Some(Arc::clone(&info));
                Some(info)
            };
            let message = ToExecutor::Call { id, name, args, info, streaming, credit };
            let sent = self.tx.send(&message);
            (message, sent)
        };
        if sent.is_err() {
            let waiter = self.waiters.lock().expect("waiters").remove(&id);
            if let (ToExecutor::Call { name, args, .. }, Some(waiter)) = (message, waiter) {
                return Err((name, args, waiter));
            }
            // The executor ended meanwhile and its reader already failed every waiter, this one
            // included (`ExecutorDied`, with the reason): the call has its answer. (This used to
            // be an `unreachable!`, which would have panicked under the worker's core lock.)
        }
        Ok(Arc::new(CallControl { id, tx: self.tx, waiters: self.waiters }))
    }
}

/// Large arguments cross the executor socket: ask for a 4 MiB send buffer (the kernel caps it at
/// `net.core.wmem_max`) so a 256 MiB call takes fewer write/wake-up rounds than with the default
/// ~200 KiB. Best effort: the socket works either way.
fn widen_send_buffer(stream: &tokio::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    // SAFETY: a valid socket descriptor owned by `stream`, and a pointer to a c_int of the given length.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Path of the cached executable for `hash`.
pub fn binary_path(cache_dir: &Path, hash: BinaryHash) -> PathBuf {
    cache_dir.join(hash.to_hex())
}

fn worker_error(message: String) -> RemoteError {
    RemoteError::new(RemoteErrorKind::Worker, message)
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGABRT => "SIGABRT (abort)",
            libc::SIGSEGV => "SIGSEGV (segmentation fault)",
            libc::SIGKILL => "SIGKILL (killed; out of memory?)",
            libc::SIGBUS => "SIGBUS (bus error)",
            libc::SIGILL => "SIGILL (illegal instruction)",
            libc::SIGFPE => "SIGFPE (arithmetic exception)",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        format!("killed by signal {signal}: {name}")
    } else {
        format!("exited with code {}", status.code().unwrap_or(-1))
    }
}

impl Executors {
    /// Executors for binaries in `cache_dir`, sockets in `state_dir`; tasks' collection calls go
    /// to `cluster`.
    pub fn new(cache_dir: PathBuf, state_dir: PathBuf, cluster: ClusterHook) -> Self {
        Self {
            cluster,
            cache_dir,
            state_dir,
            next_call: AtomicU64::new(1),
            running: AsyncMutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Start a call of `name` in the executor of `hash`, starting the executor if needed.
    pub async fn call(
        &self,
        hash: BinaryHash,
        name: String,
        args: Args,
        info: Arc<InstanceInfo>,
        streaming: bool,
        credit: u32,
    ) -> Result<CallHandle, RemoteError> {
        let caller = {
            let mut running = self.running.lock().await;
            let alive = running.get(&hash).is_some_and(|r| r.alive.load(Ordering::Acquire));
            if !alive {
                let started = self.start(hash).await?;
                running.insert(hash, started);
            }
            Caller::of(running.get(&hash).expect("just inserted"))
        };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::unbounded_channel();
        match caller.send(id, name, args, info, streaming, credit, Waiter::Events(events_tx)) {
            Ok(control) => Ok(CallHandle { events, control }),
            Err(_) => Err(RemoteError::new(RemoteErrorKind::ExecutorDied, "executor exited before the call could be sent")),
        }
    }

    /// Start a unary call right here, without a task of its own, when the executor of `hash` is
    /// running and its table is free this instant: `done` gets the result on the executor's
    /// reader task. The parts come back when the caller must take the slow path
    /// ([`Executors::call`]: the executor is busy being started, or has just exited).
    #[allow(clippy::result_large_err)]
    pub fn unary_now(
        &self,
        hash: BinaryHash,
        name: String,
        args: Args,
        info: Arc<InstanceInfo>,
        done: UnaryDone,
    ) -> Result<Arc<CallControl>, (String, Args, UnaryDone)> {
        let caller =
            self.running.try_lock().ok().and_then(|running| running.get(&hash).filter(|r| r.alive.load(Ordering::Acquire)).map(Caller::of));
        let Some(caller) = caller else { return Err((name, args, done)) };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        caller.send(id, name, args, info, false, 0, Waiter::Done(done)).map_err(|(name, args, waiter)| match waiter {
            Waiter::Done(done) => (name, args, done),
            Waiter::Events(_) => unreachable!("registered as Done"),
        })
    }

    /// Send an actor operation to the executor of `hash` (started if needed); `done` gets the
    /// answer (called from the executor's reader task, or here on failure). Operations sent one
    /// after another reach the executor in order.
    pub async fn actor(&self, hash: BinaryHash, op: skyward_proto::exec::ActorOp, done: ActorDone) {
        use skyward_proto::cluster::ClusterError;
        let started = {
            let mut running = self.running.lock().await;
            let alive = running.get(&hash).is_some_and(|r| r.alive.load(Ordering::Acquire));
            let started = if alive {
                Ok(())
            } else {
                self.start(hash).await.map(|r| {
                    running.insert(hash, r);
                })
            };
            started.map(|()| {
                let r = running.get(&hash).expect("running");
                (r.tx.clone(), Arc::clone(&r.actor_waiters))
            })
        };
        let (tx, waiters) = match started {
            Ok(parts) => parts,
            Err(e) => return done(Err(ClusterError::ActorDead { actor: String::new(), reason: e.to_string() })),
        };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        waiters.lock().expect("waiters").insert(id, done);
        if tx.send(&ToExecutor::Actor { id, op }).is_err() {
            let waiter = waiters.lock().expect("waiters").remove(&id);
            if let Some(done) = waiter {
                done(Err(ClusterError::ActorDead { actor: String::new(), reason: "its executor exited".into() }));
            }
        }
    }

    /// Send an actor operation now, from the caller's task, if the executor of `hash` is running
    /// and its table is free this instant; otherwise hand `done` back (the caller queues it).
    pub fn try_actor_now(&self, hash: BinaryHash, op: skyward_proto::exec::ActorOp, done: ActorDone) -> Option<ActorDone> {
        let parts = self.running.try_lock().ok().and_then(|running| {
            running.get(&hash).filter(|r| r.alive.load(Ordering::Acquire)).map(|r| (r.tx.clone(), Arc::clone(&r.actor_waiters)))
        });
        let Some((tx, waiters)) = parts else { return Some(done) };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        waiters.lock().expect("waiters").insert(id, done);
        if tx.send(&ToExecutor::Actor { id, op }).is_err() {
            return waiters.lock().expect("waiters").remove(&id);
        }
        None
    }

    async fn start(&self, hash: BinaryHash) -> Result<Running, RemoteError> {
        let path = binary_path(&self.cache_dir, hash);
        if !path.exists() {
            return Err(worker_error(format!("executable {hash:?} is not on this node; it must be uploaded first")));
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let socket = self.state_dir.join(format!("exec-{}-{generation}.sock", &hash.to_hex()[..12]));
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).map_err(|e| worker_error(format!("cannot bind executor socket {}: {e}", socket.display())))?;
        let mut child = tokio::process::Command::new(&path)
            .env(ENV_ROLE, ROLE_EXECUTOR)
            .env(ENV_EXECUTOR_SOCKET, &socket)
            .env(skyward_proto::exec::ENV_BINARY_HASH, hash.to_hex())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| worker_error(format!("cannot start executor {}: {e}", path.display())))?;
        let accepted = tokio::select! {
            a = listener.accept() => a.map_err(|e| worker_error(format!("executor did not connect: {e}"))),
            status = child.wait() => Err(worker_error(format!(
                "executor {} {} before connecting; does the program call skyward::init() (or use #[skyward::main]) first thing?",
                path.display(),
                status.map(describe_exit).unwrap_or_else(|e| e.to_string())
            ))),
            _ = tokio::time::sleep(Duration::from_secs(30)) => Err(worker_error(format!(
                "executor {} did not connect within 30 s; does the program call skyward::init() first thing?", path.display()))),
        };
        let (stream, _) = accepted?;
        let _ = std::fs::remove_file(&socket);
        widen_send_buffer(&stream);
        let (mut reader, writer) =
            skyward_net::unix::split(stream).map_err(|e| worker_error(format!("cannot register the executor socket: {e}")))?;
        let tx = UnixFrameWriter::new(writer);
        let waiters: Waiters = Arc::default();
        let actor_waiters: ActorWaiters = Arc::default();
        let reader_actor_waiters = Arc::clone(&actor_waiters);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader_waiters = Arc::clone(&waiters);
        let reader_alive = Arc::clone(&alive);
        let cluster = Arc::clone(&self.cluster);
        let reply_tx = tx.clone();
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
            let mut chunk = vec![0u8; 64 * 1024];
            let mut failure: Option<String> = None;
            'read: loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        failure = Some(format!("socket error: {e}"));
                        break;
                    }
                };
                decoder.push(&chunk[..n]);
                // The answers this read brought are booked together and go out to the
                // coordinator in one write per lane.
                let cork = skyward_net::Cork::new();
                let mut finishing = Finishing::default();
                let mut malformed = false;
                loop {
                    match decoder.next::<FromExecutor>("FromExecutor") {
                        Ok(Some(FromExecutor::Ready { pid, functions })) => {
                            tracing::debug!(pid, functions, "executor ready");
                        }
                        Ok(Some(FromExecutor::Item { id, payload })) => {
                            if let Some(Waiter::Events(w)) = reader_waiters.lock().expect("waiters").get(&id) {
                                let _ = w.send(CallEvent::Item(payload));
                            }
                        }
                        Ok(Some(FromExecutor::Cluster { id, op })) => cluster(id, op, reply_tx.clone()),
                        Ok(Some(FromExecutor::ActorDone { id, result })) => {
                            let waiter = reader_actor_waiters.lock().expect("waiters").remove(&id);
                            if let Some(done) = waiter {
                                done(result.map(|b| b.into_vec()));
                            }
                        }
                        Ok(Some(FromExecutor::Done { id, result })) => {
                            let waiter = reader_waiters.lock().expect("waiters").remove(&id);
                            match waiter {
                                Some(Waiter::Done(done)) => finishing.push(done, result.map(|b| b.into_vec())),
                                Some(waiter) => waiter.finish(result.map(|b| b.into_vec())),
                                None => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(format!("executor sent a malformed frame: {e}"));
                            malformed = true;
                            break;
                        }
                    }
                }
                // Also before a malformed frame ends the executor: what came before it is kept.
                finishing.flush();
                drop(cork);
                if malformed {
                    break 'read;
                }
            }
            reader_alive.store(false, Ordering::Release);
            let _ = child.start_kill();
            let reason = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(status)) => describe_exit(status),
                Ok(Err(e)) => format!("could not be waited for: {e}"),
                Err(_) => "did not exit".to_string(),
            };
            let reason = failure.map_or(reason.clone(), |f| format!("{f}; {reason}"));
            tracing::warn!(%reason, "executor ended; the next call starts a new one");
            let orphans: Vec<ActorDone> = reader_actor_waiters.lock().expect("waiters").drain().map(|(_, d)| d).collect();
            for done in orphans {
                done(Err(skyward_proto::cluster::ClusterError::ActorDead {
                    actor: String::new(),
                    reason: format!("the executor hosting it {reason}"),
                }));
            }
            let orphans: Vec<Waiter> = reader_waiters.lock().expect("waiters").drain().map(|(_, w)| w).collect();
            let mut finishing = Finishing::default();
            for waiter in orphans {
                let error = RemoteError::new(RemoteErrorKind::ExecutorDied, format!("the executor running this task {reason}"));
                match waiter {
                    Waiter::Done(done) => finishing.push(done, Err(error)),
                    waiter => waiter.finish(Err(error)),
                }
            }
            finishing.flush();
        });
        Ok(Running { tx, info_sent: Arc::default(), waiters, actor_waiters, alive })
    }

    /// Stop every executor.
    pub async fn shutdown(&self) {
        self.running.lock().await.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each hand-off: which results it got, in order.
    #[derive(Default)]
    struct Record(Mutex<Vec<Vec<u64>>>);

    impl UnaryFinish for Record {
        fn finish(&self, results: &mut Vec<UnaryResult>) {
            self.0.lock().expect("record").push(results.drain(..).map(|(token, _)| token).collect());
        }
    }

    fn done(to: &Arc<Record>, token: u64) -> UnaryDone {
        UnaryDone { finish: Arc::clone(to) as Arc<dyn UnaryFinish>, token }
    }

    #[test]
    fn a_reads_results_are_handed_on_together_per_finisher_in_order() {
        let (a, b) = (Arc::new(Record::default()), Arc::new(Record::default()));
        let mut finishing = Finishing::default();
        for token in [1, 2, 3] {
            finishing.push(done(&a, token), Ok(Vec::new()));
        }
        assert!(a.0.lock().expect("record").is_empty(), "nothing is handed on before the flush");
        // Another finisher: what `a` has so far goes first.
        finishing.push(done(&b, 4), Ok(Vec::new()));
        finishing.push(done(&a, 5), Err(RemoteError::new(RemoteErrorKind::Worker, "failed")));
        finishing.flush();
        finishing.flush();
        assert_eq!(*a.0.lock().expect("record"), vec![vec![1, 2, 3], vec![5]]);
        assert_eq!(*b.0.lock().expect("record"), vec![vec![4]]);
    }
}
