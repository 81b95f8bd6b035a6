//! [`Pool`]: the user's handle on a running pool, with the dispatch API.

use crate::node::{OutputLine, TaskSinks};
use crate::pool::{PoolMsg, PoolShared};
use crate::task_manager::{Done, GatherReply, GatherSink, Placement, Reply, TaskManagerRef, TaskRequest, TaskStats, TmMsg};
use futures::Stream;
use ractor::ActorRef;
use serde::Serialize;
use serde::de::DeserializeOwned;
use skyward_function::collections;
use skyward_function::{Call, StreamCall};
use skyward_proto::codec;
use skyward_proto::error::{RemoteError, TaskError};
use skyward_proto::message::{CommandExit, CommandSpec, OutputStream, TaskId, TaskKind, WorkerFacts};
use skyward_provider::{PoolContext, Provider};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Errors of dispatch and shutdown.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task did not produce a value.
    #[error("task {task} (`{function}`){} failed: {source}", rank.map(|r| format!(" on node {r}")).unwrap_or_default())]
    Task {
        /// Task id.
        task: TaskId,
        /// Function name, or the command line.
        function: String,
        /// Rank of the node it last ran on.
        rank: Option<u32>,
        /// Why.
        #[source]
        source: Box<TaskError>,
    },
    /// Arguments could not be encoded, or a result decoded.
    #[error(transparent)]
    Codec(Box<RemoteError>),
    /// A command exited unsuccessfully.
    #[error("command `{command}` on node {rank} {status}{}", if stderr_tail.is_empty() { String::new() } else { format!("; last stderr lines:\n{}", stderr_tail.join("\n")) })]
    CommandFailed {
        /// The command line.
        command: String,
        /// Rank of the node.
        rank: u32,
        /// How it ended, in words.
        status: String,
        /// Its last lines of standard error.
        stderr_tail: Vec<String>,
    },
    /// Teardown did not complete.
    #[error("pool shutdown: {0}")]
    Shutdown(String),
}

impl Error {
    /// The structured remote error, when a task failed on a node.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Task { source, .. } => match source.as_ref() {
                TaskError::Remote(e) => Some(e),
                _ => None,
            },
            Error::Codec(e) => Some(e),
            _ => None,
        }
    }

    /// The task error, when a task did not produce a value.
    pub fn task_error(&self) -> Option<&TaskError> {
        match self {
            Error::Task { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Pools alive in this process, for the Ctrl-C handler.
/// A live pool as the Ctrl-C handler needs it: id, provider, context.
type LivePool = (String, Arc<dyn Provider>, PoolContext);

static LIVE_POOLS: Mutex<Vec<LivePool>> = Mutex::new(Vec::new());
static SIGNAL_HANDLER: OnceLock<()> = OnceLock::new();

fn install_signal_handler() {
    SIGNAL_HANDLER.get_or_init(|| {
        // Its own thread and runtime: the handler must outlive whichever runtime started the
        // first pool (a test may start pools on several runtimes).
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the Ctrl-C handler");
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("skyward-ctrl-c".into()).spawn(move || {
            runtime.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let pools: Vec<_> = LIVE_POOLS.lock().expect("live pools").drain(..).collect();
                    eprintln!("\nskyward: interrupted; tearing down {} pool(s)", pools.len());
                    for (pool_id, provider, ctx) in pools {
                        provider.emergency_teardown(&ctx);
                        eprintln!("skyward: pool {pool_id} torn down");
                    }
                    std::process::exit(130);
                }
            })
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the Ctrl-C handler thread");
        }
    });
}

struct Inner {
    shared: Arc<PoolShared>,
    /// The coordinator's way into the worker cluster (collections, actors).
    transport: Arc<dyn skyward_function::collections::Transport>,
    tm: TaskManagerRef,
    actor: OnceLock<ActorRef<PoolMsg>>,
    endpoint: quinn::Endpoint,
    acceptor: tokio::task::JoinHandle<()>,
    next_task: AtomicU64,
    closed: AtomicBool,
    facts: OnceLock<Vec<WorkerFacts>>,
    /// Offers that failed before this pool started.
    attempts: Vec<skyward_provider::Attempt>,
}

/// A running pool. Every node is torn down by [`Pool::shutdown`], or when the pool is dropped.
pub struct Pool {
    inner: Arc<Inner>,
}

impl Inner {
    fn enqueue(&self, kind: TaskKind, dispatch: Dispatch, sinks: TaskSinks) -> (TaskId, oneshot::Receiver<Done>) {
        let (reply, rx) = oneshot::channel();
        (self.enqueue_to(kind, dispatch, sinks, reply.into()), rx)
    }

    fn enqueue_to(&self, kind: TaskKind, dispatch: Dispatch, sinks: TaskSinks, reply: Reply) -> TaskId {
        let id = TaskId(self.next_task.fetch_add(1, Ordering::Relaxed));
        let prepared = self.prepare_shared(&kind);
        let request = TaskRequest {
            id,
            kind,
            placement: dispatch.placement,
            near_cpu: skyward_net::cpus::current(),
            timeout: dispatch.timeout.or(self.shared.options.default_task_timeout),
            reply,
            sinks,
            initial_credit: self.shared.options.stream_window,
            _prepared: prepared,
        };
        self.tm.submit(Box::new(request));
        id
    }

    /// Large arguments of a pool with nodes on this machine go into shared memory here, on the
    /// caller's thread (like their encoding), so that the TaskManager finds them ready at dispatch
    /// instead of stopping to write them. A failure here is left to the dispatch (which logs it and
    /// sends the arguments inline).
    fn prepare_shared(&self, kind: &TaskKind) -> Option<Arc<crate::node::SharedArgs>> {
        match kind {
            TaskKind::Function { args: skyward_proto::message::Args::Inline(bytes), .. }
                if bytes.len() >= crate::node::SHARED_MEMORY_MIN
                    && self.shared.options.shared_memory_args
                    && self.shared.same_host.load(Ordering::Acquire)
                    && crate::node::live_objects() < crate::node::MAX_PREPARED =>
            {
                crate::node::shared_args(bytes).ok()
            }
            _ => None,
        }
    }

    fn function_kind<R>(&self, call: &Call<R>, streaming: bool) -> Result<TaskKind, Error> {
        let args = call.args_shared().map_err(|e| Error::Codec(Box::new(e.clone())))?;
        Ok(TaskKind::Function { name: call.name().to_string(), binary: self.shared.binary.hash, args: args.into(), streaming })
    }

    fn submit_with<R: DeserializeOwned>(&self, call: Call<R>, dispatch: Dispatch) -> TaskHandle<R> {
        let name = call.name();
        match self.function_kind(&call, false) {
            Ok(kind) => {
                let (id, rx) = self.enqueue(kind, dispatch, TaskSinks::default());
                TaskHandle { id: Some(id), name, rx: Some(rx), early: None, tm: self.tm.clone(), _r: PhantomData }
            }
            Err(e) => TaskHandle { id: None, name, rx: None, early: Some(e), tm: self.tm.clone(), _r: PhantomData },
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("pool_id", &self.inner.shared.pool_id).finish_non_exhaustive()
    }
}

/// Output of a command task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Rank of the node it ran on.
    pub rank: u32,
    /// How it ended.
    pub exit: CommandExit,
    /// Standard output, line by line.
    pub stdout: Vec<String>,
    /// Standard error, line by line.
    pub stderr: Vec<String>,
}

/// Dispatch settings for one call.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch {
    /// Where to run.
    pub placement: Placement,
    /// Give up after this long (the task is cancelled on its node).
    pub timeout: Option<Duration>,
}

impl Pool {
    pub(crate) fn new(
        shared: Arc<PoolShared>,
        tm: TaskManagerRef,
        endpoint: quinn::Endpoint,
        acceptor: tokio::task::JoinHandle<()>,
        attempts: Vec<skyward_provider::Attempt>,
    ) -> Self {
        install_signal_handler();
        LIVE_POOLS.lock().expect("live pools").push((shared.pool_id.clone(), Arc::clone(&shared.provider), shared.ctx.clone()));
        let transport: Arc<dyn skyward_function::collections::Transport> =
            Arc::new(crate::cluster::CoordinatorTransport(Arc::clone(&shared.cluster), shared.pool_id.clone()));
        skyward_function::collections::register_pool_transport(&shared.pool_id, &transport);
        Self {
            inner: Arc::new(Inner {
                transport,
                shared,
                tm,
                actor: OnceLock::new(),
                endpoint,
                acceptor,
                next_task: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                facts: OnceLock::new(),
                attempts,
            }),
        }
    }

    pub(crate) fn set_actor(&self, actor: ActorRef<PoolMsg>) {
        let _ = self.inner.actor.set(actor);
    }

    pub(crate) fn set_facts(&self, facts: Vec<WorkerFacts>) {
        let _ = self.inner.facts.set(facts);
    }

    /// The offer this pool runs on (provider, instance type, region, price).
    pub fn offer(&self) -> Option<&skyward_provider::Offer> {
        self.inner.shared.ctx.placement.as_ref().map(|p| &p.offer)
    }

    /// Whether the nodes were bought as spot, and the price per node-hour the start saw.
    pub fn price(&self) -> Option<(bool, f64)> {
        self.inner.shared.ctx.placement.as_ref().map(|p| (p.spot, p.node_price))
    }

    /// Offers tried and failed before this one, with their reasons (empty when the first
    /// offer started).
    pub fn start_attempts(&self) -> &[skyward_provider::Attempt] {
        &self.inner.attempts
    }

    /// This pool's id (every resource it creates carries it).
    pub fn pool_id(&self) -> &str {
        &self.inner.shared.pool_id
    }

    /// Number of nodes the pool was started with.
    pub fn node_count(&self) -> usize {
        self.inner.facts.get().map_or(0, Vec::len)
    }

    /// What each node's worker reported when it joined, by rank.
    pub fn node_facts(&self) -> &[WorkerFacts] {
        self.inner.facts.get().map_or(&[], Vec::as_slice)
    }

    /// For tests of the transport's defences: the coordinator's QUIC address, the pool CA
    /// certificate, and a client certificate signed by the pool CA for `node_id` (a "stolen"
    /// certificate that the registry does not know). Not part of the stable API.
    #[doc(hidden)]
    pub fn __transport_probe(&self, node_id: &str) -> (std::net::SocketAddr, String, skyward_net::CertBundle) {
        let shared = &self.inner.shared;
        let cert = shared.ca.issue_worker(node_id).expect("issue certificate");
        (shared.server_addr, shared.ca.cert().cert_pem.clone(), cert)
    }

    /// Tests only: the pool's state directory (each node's worker state lies under it).
    #[doc(hidden)]
    pub fn __state_dir(&self) -> &std::path::Path {
        &self.inner.shared.ctx.state_dir
    }

    fn cluster_transport(&self) -> Arc<dyn skyward_function::collections::Transport> {
        Arc::clone(&self.inner.transport)
    }

    /// The worker cluster's dict `name` (created on first write). The same collection a task
    /// reaches with `skyward::dict(name)`. Cluster mode only: in standalone mode every call fails
    /// with [`ClusterError::Standalone`](skyward_function::collections::ClusterError::Standalone).
    pub fn dict<K: Serialize, V: Serialize + DeserializeOwned>(&self, name: &str) -> collections::Dict<K, V> {
        collections::Dict::with_transport(name, self.cluster_transport())
    }

    /// The worker cluster's set `name`.
    pub fn set<T: Serialize>(&self, name: &str) -> collections::Set<T> {
        collections::Set::with_transport(name, self.cluster_transport())
    }

    /// The worker cluster's counter `name`.
    pub fn counter(&self, name: &str) -> collections::Counter {
        collections::Counter::with_transport(name, self.cluster_transport())
    }

    /// The worker cluster's queue `name`.
    pub fn queue<T: Serialize + DeserializeOwned>(&self, name: &str) -> collections::Queue<T> {
        collections::Queue::with_transport(name, self.cluster_transport())
    }

    /// The worker cluster's barrier `name` for `parties` callers (the coordinator may be one).
    pub fn barrier(&self, name: &str, parties: u32) -> collections::Barrier {
        collections::Barrier::with_transport(name, parties, self.cluster_transport())
    }

    /// The worker cluster's lock `name`.
    pub fn lock(&self, name: &str) -> collections::Lock {
        collections::Lock::with_transport(name, self.cluster_transport())
    }

    /// Start an actor of type `A` on the next node (round robin) and return its handle.
    pub async fn spawn_actor<A: skyward_function::actors::RegisteredActor>(
        &self,
        args: &A::Args,
    ) -> Result<skyward_function::actors::ActorRef<A>, collections::ClusterError> {
        skyward_function::actors::spawn_with::<A>(self.cluster_transport(), self.inner.shared.binary.hash, None, args).await
    }

    /// Start an actor of type `A` on the node of `rank`.
    pub async fn spawn_actor_on<A: skyward_function::actors::RegisteredActor>(
        &self,
        rank: u32,
        args: &A::Args,
    ) -> Result<skyward_function::actors::ActorRef<A>, collections::ClusterError> {
        skyward_function::actors::spawn_with::<A>(self.cluster_transport(), self.inner.shared.binary.hash, Some(rank), args).await
    }

    /// Membership changes of the worker cluster from now on (joins and departures).
    pub fn cluster_events(&self) -> tokio::sync::broadcast::Receiver<crate::ClusterEvent> {
        self.inner.shared.cluster.subscribe()
    }

    /// Send raw bytes as a collection operation to node `rank`. For tests of bad input only.
    #[doc(hidden)]
    pub async fn __cluster_raw_request(&self, rank: u32, op: Vec<u8>) -> Result<skyward_proto::cluster::Reply, collections::ClusterError> {
        self.inner.shared.cluster.raw_request(rank, op).await
    }

    /// Wait until every collection cell has its two copies again (after a node joined or was
    /// lost, primaries copy their slots to new backups: milliseconds for small data). A second
    /// node lost before that can lose the cells the first loss left with a single copy.
    pub async fn wait_cluster_replicated(&self, timeout: Duration) -> Result<(), collections::ClusterError> {
        self.inner.shared.cluster.wait_replicated(timeout).await
    }

    /// Current members of the worker cluster: `(rank, node id)`; empty in standalone mode.
    pub fn cluster_members(&self) -> Vec<(u32, String)> {
        self.inner.shared.cluster.members()
    }

    /// Task counters.
    pub async fn stats(&self) -> Result<TaskStats, Error> {
        let mut stats = ractor::call!(self.inner.tm.actor(), TmMsg::Stats).map_err(|e| Error::Shutdown(e.to_string()))?;
        stats.busy_poll_threads = self.inner.shared.busy.threads();
        stats.busy_poll_spun = self.inner.shared.busy.spun();
        Ok(stats)
    }

    fn enqueue(&self, kind: TaskKind, dispatch: Dispatch, sinks: TaskSinks) -> (TaskId, oneshot::Receiver<Done>) {
        self.inner.enqueue(kind, dispatch, sinks)
    }

    fn function_kind<R>(&self, call: &Call<R>, streaming: bool) -> Result<TaskKind, Error> {
        self.inner.function_kind(call, streaming)
    }

    /// Submit `call` without waiting; await the handle for its result or cancel it.
    pub fn submit<R: DeserializeOwned>(&self, call: Call<R>) -> TaskHandle<R> {
        self.inner.submit_with(call, Dispatch { placement: Placement::Any, timeout: None })
    }

    /// Submit `call` with explicit placement and timeout.
    pub fn submit_with<R: DeserializeOwned>(&self, call: Call<R>, dispatch: Dispatch) -> TaskHandle<R> {
        self.inner.submit_with(call, dispatch)
    }

    /// Run `call` on one node (round robin over nodes with a free slot; an idle node pinned to
    /// the caller's CPU on this machine first) and wait for its result.
    pub async fn run<R: DeserializeOwned>(&self, call: Call<R>) -> Result<R, Error> {
        self.submit(call).await
    }

    /// Run `call` on the node with `rank`.
    pub async fn run_on<R: DeserializeOwned>(&self, rank: u32, call: Call<R>) -> Result<R, Error> {
        self.submit_with(call, Dispatch { placement: Placement::Rank(rank), timeout: None }).await
    }

    /// Run `call` on every ready node; results ordered by rank.
    pub async fn broadcast<R: DeserializeOwned>(&self, call: Call<R>) -> Result<Vec<R>, Error> {
        let ranks = ractor::call!(self.inner.tm.actor(), TmMsg::Ranks).map_err(|e| Error::Shutdown(e.to_string()))?;
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| self.submit_with(call.clone(), Dispatch { placement: Placement::Rank(rank), timeout: None }))
            .collect();
        futures::future::try_join_all(handles).await
    }

    /// Run every call (round robin); results in the order of `calls`. The first failure is returned
    /// and the calls still running are cancelled; calls not yet submitted are never submitted.
    ///
    /// At most [`Options::max_in_flight`](crate::Options::max_in_flight) calls are submitted and
    /// unfinished at once; the next is submitted as one finishes, so a gather of millions of calls
    /// holds the coordinator's memory to that window. `calls` is consumed as the window moves.
    pub async fn gather<R: DeserializeOwned>(&self, calls: impl IntoIterator<Item = Call<R>>) -> Result<Vec<R>, Error> {
        use futures::StreamExt;
        let calls = calls.into_iter();
        let mut results: Vec<Option<R>> = Vec::with_capacity(calls.size_hint().0);
        let mut running = InFlight::new(Arc::clone(&self.inner), calls);
        while let Some((i, result)) = running.next().await {
            if results.len() <= i {
                results.resize_with(i + 1, || None);
            }
            results[i] = Some(result?);
        }
        // The stream yields each submitted index once, and indices are dense from 0.
        Ok(results.into_iter().map(|r| r.expect("every submitted call yields its result")).collect())
    }

    /// Run every call; yield `(index, result)` as each completes. The first window of calls (see
    /// [`Pool::gather`]) is submitted at once; the rest as results are taken from the stream.
    /// Dropping the stream cancels the calls still running.
    pub fn gather_unordered<R, I>(&self, calls: I) -> impl Stream<Item = (usize, Result<R, Error>)> + Send + 'static
    where
        R: DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = Call<R>>,
        I::IntoIter: Send + 'static,
    {
        InFlight::new(Arc::clone(&self.inner), calls.into_iter())
    }

    /// Run different functions at once and get their typed results as a tuple.
    pub async fn join<J: JoinCalls>(&self, calls: J) -> Result<J::Output, Error> {
        calls.join(self).await
    }

    /// Run a streaming function on one node; items arrive as they are produced, with backpressure
    /// (the node runs at most `Options::stream_window` items ahead of the consumer).
    pub fn stream<T: DeserializeOwned>(&self, call: StreamCall<T>) -> TaskStream<T> {
        let call = call.as_call();
        let name = call.name();
        let (items_tx, items) = mpsc::unbounded_channel();
        let window = self.inner.shared.options.stream_window;
        match self.function_kind(call, true) {
            Ok(kind) => {
                let sinks = TaskSinks { items: Some(items_tx), output: None };
                let (id, rx) = self.enqueue(kind, Dispatch { placement: Placement::Any, timeout: None }, sinks);
                TaskStream {
                    id: Some(id),
                    name,
                    items,
                    done: Some(rx),
                    early: None,
                    tm: self.inner.tm.clone(),
                    consumed: 0,
                    window,
                    finished: false,
                    _t: PhantomData,
                }
            }
            Err(e) => TaskStream {
                id: None,
                name,
                items,
                done: None,
                early: Some(e),
                tm: self.inner.tm.clone(),
                consumed: 0,
                window,
                finished: false,
                _t: PhantomData,
            },
        }
    }

    /// Run a command on one node; its output is collected (and logged line by line with the rank).
    /// A non-zero exit is an error carrying the last lines of standard error.
    pub async fn command(&self, command: Command) -> Result<CommandOutput, Error> {
        self.command_with(command, Placement::Any).await
    }

    /// Run a command on every ready node; outputs ordered by rank.
    pub async fn broadcast_command(&self, command: Command) -> Result<Vec<CommandOutput>, Error> {
        let ranks = ractor::call!(self.inner.tm.actor(), TmMsg::Ranks).map_err(|e| Error::Shutdown(e.to_string()))?;
        let runs: Vec<_> = ranks.into_iter().map(|r| self.command_with(command.clone(), Placement::Rank(r))).collect();
        futures::future::try_join_all(runs).await
    }

    async fn command_with(&self, command: Command, placement: Placement) -> Result<CommandOutput, Error> {
        let line = command.spec.argv.join(" ");
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<OutputLine>();
        let timeout = command.spec.timeout.map(|t| t + Duration::from_secs(5));
        let (id, rx) =
            self.enqueue(TaskKind::Command(command.spec), Dispatch { placement, timeout }, TaskSinks { items: None, output: Some(out_tx) });
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut keep = |l: OutputLine| {
            tracing::info!(target: "skyward::output", rank = l.rank, stream = ?l.stream, "{}", l.line);
            match l.stream {
                OutputStream::Stdout => stdout.push(l.line),
                OutputStream::Stderr => stderr.push(l.line),
            }
        };
        let mut rx = rx;
        // Lines travel on the task's stream ahead of its result, so once the result is here every
        // line is already queued: collect until then, then take what is left without waiting.
        let done = loop {
            tokio::select! {
                biased;
                Some(l) = out_rx.recv() => keep(l),
                done = &mut rx => break done.unwrap_or(Done { result: Err(TaskError::PoolClosed), rank: None }),
            }
        };
        while let Ok(l) = out_rx.try_recv() {
            keep(l);
        }
        let rank = done.rank.unwrap_or(0);
        let bytes =
            done.result.map_err(|source| Error::Task { task: id, function: line.clone(), rank: done.rank, source: Box::new(source) })?;
        let exit: CommandExit = codec::from_bytes(&bytes, "CommandExit")
            .map_err(|e| Error::Codec(Box::new(RemoteError::new(skyward_proto::error::RemoteErrorKind::Codec, e.to_string()))))?;
        if exit.code != Some(0) {
            let status = match (exit.code, exit.signal) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                _ => "ended abnormally".to_string(),
            };
            let tail = stderr.iter().rev().take(20).rev().cloned().collect();
            return Err(Error::CommandFailed { command: line, rank, status, stderr_tail: tail });
        }
        Ok(CommandOutput { rank, exit, stdout, stderr })
    }

    pub(crate) async fn shutdown_ref(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = match self.inner.actor.get() {
            Some(actor) => match ractor::call!(actor, PoolMsg::Shutdown) {
                Ok(r) => r.map_err(Error::Shutdown),
                // The pool actor is gone (a component failed): tear down directly.
                Err(_) => self.inner.shared.provider.teardown(&self.inner.shared.ctx).await.map_err(|e| Error::Shutdown(e.to_string())),
            },
            None => self.inner.shared.provider.teardown(&self.inner.shared.ctx).await.map_err(|e| Error::Shutdown(e.to_string())),
        };
        self.finish_close();
        result
    }

    fn finish_close(&self) {
        self.inner.shared.busy.stop();
        self.inner.tm.stop();
        self.inner.acceptor.abort();
        self.inner.endpoint.close(0u32.into(), b"pool shut down");
        let id = &self.inner.shared.pool_id;
        LIVE_POOLS.lock().expect("live pools").retain(|(p, _, _)| p != id);
        let _ = std::fs::remove_dir_all(&self.inner.shared.ctx.state_dir);
    }

    /// Tear every node down and wait until the provider confirms it.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.shutdown_ref().await
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(pool = %self.inner.shared.pool_id, "pool dropped without shutdown(); tearing it down now");
        self.inner.shared.provider.emergency_teardown(&self.inner.shared.ctx);
        if let Some(actor) = self.inner.actor.get() {
            actor.stop(Some("pool dropped".into()));
        }
        self.finish_close();
    }
}

/// The calls of one `gather`: at most `window` submitted and unfinished; the next one is
/// submitted as one finishes (and the first window when the stream is made). Yields
/// `(index in calls, result)` in completion order; dropping it cancels what is still running.
/// Every call answers into one [`GatherSink`], so a batch of answers costs one wake-up.
struct InFlight<I> {
    /// Boxed so that the stream is `Unpin` whatever the iterator.
    calls: Box<std::iter::Enumerate<I>>,
    /// The calls submitted and not yet yielded: index -> task and function name.
    running: skyward_proto::IdMap<usize, (TaskId, &'static str)>,
    sink: Arc<GatherSink>,
    /// Answers taken from the sink, not yet yielded.
    answers: VecDeque<(usize, Done)>,
    /// Calls that failed before they could be submitted (their arguments did not encode).
    early: VecDeque<(usize, Error)>,
    inner: Arc<Inner>,
    window: usize,
}

impl<I> InFlight<I> {
    fn new<R>(inner: Arc<Inner>, calls: I) -> Self
    where
        I: Iterator<Item = Call<R>>,
    {
        let window = inner.shared.options.max_in_flight.max(1);
        let mut this = Self {
            calls: Box::new(calls.enumerate()),
            running: skyward_proto::IdMap::default(),
            sink: Arc::default(),
            answers: VecDeque::new(),
            early: VecDeque::new(),
            inner,
            window,
        };
        this.fill();
        this
    }

    fn fill<R>(&mut self)
    where
        I: Iterator<Item = Call<R>>,
    {
        // The calls submitted here go out in one write per lane, in batches (the user's
        // iterator makes each call: the first must not wait for a whole window of them).
        let cork = skyward_net::Cork::new();
        let mut submitted = 0usize;
        while self.running.len() < self.window {
            let Some((i, call)) = self.calls.next() else { break };
            match self.inner.function_kind(&call, false) {
                Ok(kind) => {
                    let reply = Reply::Gather(GatherReply::new(i, &self.sink));
                    let dispatch = Dispatch { placement: Placement::Any, timeout: None };
                    let task = self.inner.enqueue_to(kind, dispatch, TaskSinks::default(), reply);
                    self.running.insert(i, (task, call.name()));
                }
                Err(e) => self.early.push_back((i, e)),
            }
            submitted += 1;
            if submitted.is_multiple_of(skyward_net::CORK_BATCH) {
                cork.flush();
            }
        }
    }
}

impl<I: Iterator<Item = Call<R>>, R: DeserializeOwned> Stream for InFlight<I> {
    type Item = (usize, Result<R, Error>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.fill();
        if let Some((i, e)) = this.early.pop_front() {
            return Poll::Ready(Some((i, Err(e))));
        }
        let (i, task, name, done) = loop {
            if this.answers.is_empty() {
                // Nothing running once `calls` is exhausted (fill ran just before): then done.
                if this.running.is_empty() {
                    return Poll::Ready(None);
                }
                this.sink.take(cx, &mut this.answers);
            }
            let Some((i, done)) = this.answers.pop_front() else { return Poll::Pending };
            // Each call is answered once (the book's delivery rule); skip anything else.
            if let Some((task, name)) = this.running.remove(&i) {
                break (i, task, name, done);
            }
        };
        let result = answer(name, task, done);
        // Keep the window full even while the consumer is busy with this result; not after a
        // failure, which ends a `gather` (nothing more may be submitted for it).
        if result.is_ok() {
            this.fill();
        }
        Poll::Ready(Some((i, result)))
    }
}

impl<I> Drop for InFlight<I> {
    /// Cancel what is still running, as dropping its task handles would.
    fn drop(&mut self) {
        for (task, _) in self.running.values() {
            let _ = self.inner.tm.cast(TmMsg::Cancel { task: *task });
        }
    }
}

/// A submitted task: await it for the result, or cancel it.
pub struct TaskHandle<R> {
    id: Option<TaskId>,
    name: &'static str,
    rx: Option<oneshot::Receiver<Done>>,
    early: Option<Error>,
    tm: TaskManagerRef,
    _r: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for TaskHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).field("function", &self.name).finish()
    }
}

impl<R> Drop for TaskHandle<R> {
    /// Dropping a handle before its result arrived cancels the task (like any Rust future):
    /// `gather` relies on this to stop the rest after the first failure.
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.cancel();
        }
    }
}

impl<R> TaskHandle<R> {
    /// The task's id.
    pub fn id(&self) -> Option<TaskId> {
        self.id
    }

    /// Cancel the task; awaiting the handle then yields a `Cancelled` error.
    pub fn cancel(&self) {
        if let Some(task) = self.id {
            let _ = self.tm.cast(TmMsg::Cancel { task });
        }
    }
}

/// Decode a result or stream item; a large `skyward::Blob` in it keeps `bytes` instead of a copy.
fn decode<R: DeserializeOwned>(name: &str, bytes: Vec<u8>) -> Result<R, Error> {
    codec::from_shared(&bytes::Bytes::from(bytes), "result").map_err(|e| {
        let mut err = RemoteError::new(
            skyward_proto::error::RemoteErrorKind::Codec,
            format!("cannot decode the result of `{name}`: {e}; do the coordinator and the nodes run the same binary?"),
        );
        err.type_name = "skyward::CodecError".into();
        Error::Codec(Box::new(err))
    })
}

/// What a call's caller gets from its answer.
fn answer<R: DeserializeOwned>(name: &str, task: TaskId, done: Done) -> Result<R, Error> {
    match done.result {
        Ok(bytes) => decode(name, bytes),
        Err(source) => Err(Error::Task { task, function: name.to_string(), rank: done.rank, source: Box::new(source) }),
    }
}

impl<R: DeserializeOwned> Future for TaskHandle<R> {
    type Output = Result<R, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(e) = this.early.take() {
            return Poll::Ready(Err(e));
        }
        let Some(rx) = this.rx.as_mut() else { return Poll::Ready(Err(Error::Shutdown("task handle polled after completion".into()))) };
        match Pin::new(rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(done) => {
                this.rx = None;
                let done = done.unwrap_or(Done { result: Err(TaskError::PoolClosed), rank: None });
                Poll::Ready(answer(this.name, this.id.unwrap_or(TaskId(0)), done))
            }
        }
    }
}

/// Items of a streaming task as they arrive. Dropping it cancels the task.
pub struct TaskStream<T> {
    id: Option<TaskId>,
    name: &'static str,
    items: mpsc::UnboundedReceiver<Vec<u8>>,
    done: Option<oneshot::Receiver<Done>>,
    early: Option<Error>,
    tm: TaskManagerRef,
    consumed: u32,
    window: u32,
    finished: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TaskStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskStream").field("id", &self.id).field("function", &self.name).finish()
    }
}

impl<T: DeserializeOwned> Stream for TaskStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(e) = this.early.take() {
            this.finished = true;
            return Poll::Ready(Some(Err(e)));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Some(bytes)) = this.items.poll_recv(cx) {
            this.consumed += 1;
            // Return credit in batches of half a window: fewer messages, no stall.
            if this.consumed >= this.window.div_ceil(2)
                && let Some(task) = this.id
            {
                let _ = this.tm.cast(TmMsg::Credit { task, items: this.consumed });
                this.consumed = 0;
            }
            return Poll::Ready(Some(decode(this.name, bytes)));
        }
        let Some(done_rx) = this.done.as_mut() else {
            this.finished = true;
            return Poll::Ready(None);
        };
        match Pin::new(done_rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(done) => {
                // Items sent before Done are already in the channel (same ordered path).
                if let Ok(bytes) = this.items.try_recv() {
                    this.done = None;
                    let result = done.map(|d| d.result).unwrap_or(Err(TaskError::PoolClosed));
                    if let Err(source) = result {
                        this.early = Some(Error::Task {
                            task: this.id.unwrap_or(TaskId(0)),
                            function: this.name.to_string(),
                            rank: None,
                            source: Box::new(source),
                        });
                    }
                    return Poll::Ready(Some(decode(this.name, bytes)));
                }
                this.done = None;
                this.finished = true;
                let done = done.unwrap_or(Done { result: Err(TaskError::PoolClosed), rank: None });
                match done.result {
                    Ok(_) => Poll::Ready(None),
                    Err(source) => Poll::Ready(Some(Err(Error::Task {
                        task: this.id.unwrap_or(TaskId(0)),
                        function: this.name.to_string(),
                        rank: done.rank,
                        source: Box::new(source),
                    }))),
                }
            }
        }
    }
}

impl<T> Drop for TaskStream<T> {
    fn drop(&mut self) {
        if !self.finished
            && let Some(task) = self.id
        {
            let _ = self.tm.cast(TmMsg::Cancel { task });
        }
    }
}

/// A command to run on nodes: argv, environment, working directory, timeout.
#[derive(Debug, Clone)]
pub struct Command {
    spec: CommandSpec,
}

impl Command {
    /// Run `program`.
    pub fn new(program: impl Into<String>) -> Self {
        Self { spec: CommandSpec { argv: vec![program.into()], env: BTreeMap::new(), cwd: None, timeout: None } }
    }

    /// Run `sh -c script`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new("sh").arg("-c").arg(script)
    }

    /// Add an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.spec.argv.push(arg.into());
        self
    }

    /// Add arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.spec.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }

    /// Set the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.spec.cwd = Some(dir.into());
        self
    }

    /// Kill the command after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout = Some(timeout);
        self
    }
}

/// Tuples of calls to different functions, run together by [`Pool::join`].
pub trait JoinCalls {
    /// The tuple of results.
    type Output;
    /// Run them.
    fn join(self, pool: &Pool) -> impl Future<Output = Result<Self::Output, Error>> + Send;
}

macro_rules! join_tuple {
    ($($name:ident $handle:ident),+) => {
        impl<$($name: DeserializeOwned + Send + 'static),+> JoinCalls for ($(Call<$name>,)+) {
            type Output = ($($name,)+);
            #[allow(non_snake_case)]
            fn join(self, pool: &Pool) -> impl Future<Output = Result<Self::Output, Error>> + Send {
                let ($($name,)+) = self;
                $(let $handle = pool.submit($name);)+
                async move { futures::try_join!($($handle),+) }
            }
        }
    };
}

join_tuple!(A ha, B hb);
join_tuple!(A ha, B hb, C hc);
join_tuple!(A ha, B hb, C hc, D hd);
join_tuple!(A ha, B hb, C hc, D hd, E he);
join_tuple!(A ha, B hb, C hc, D hd, E he, F hf);
