//! The Skyward worker: joins a pool over QUIC, runs command tasks and user functions.
//!
//! One process per machine. It dials the coordinator (mutual TLS with the pool's CA), sends its
//! hello on a control stream it opens, and then serves the streams the coordinator opens: lanes
//! that carry many small tasks, and streams of a single task. Executables arrive on
//! unidirectional streams, content-addressed.
//! All protocol decisions are made by [`skyward_proto::session::WorkerSession`]; this crate routes
//! its output to streams, runs tasks, and keeps the connection alive.
//!
//! Self-destruct: when the coordinator has been silent longer than `instance_timeout` (silence, not
//! time since boot), the worker ends its machine (`on_silence`).
//!
//! Architecture invariant: the worker never links user code; user functions run in a separate
//! executor process, so a crash there cannot take the worker down.

mod cluster;
pub mod command;
pub mod config;
pub mod executor;

use config::{SilenceAction, WorkerConfig};
use executor::{CallEvent, Executors};
use sha2::{Digest, Sha256};
use skyward_net::FramedRecv;
use skyward_proto::Time;
use skyward_proto::codec;
use skyward_proto::error::{RemoteError, RemoteErrorKind};
use skyward_proto::members::Members;
use skyward_proto::message::*;
use skyward_proto::session::{SendItemError, WorkerEvent, WorkerSession, WorkerSessionConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};

/// Where messages for the coordinator go: a writer task's channel (control and task streams) or
/// a lane written directly (a QUIC stream, or a local lane's Unix socket).
#[derive(Clone)]
enum Sink {
    Channel(mpsc::UnboundedSender<ToCoordinator>),
    Lane(skyward_net::LaneWriter),
    Local(skyward_net::UnixFrameWriter),
}

impl Sink {
    fn send(&self, message: ToCoordinator) {
        match self {
            Sink::Channel(tx) => {
                let _ = tx.send(message);
            }
            Sink::Lane(lane) => {
                let _ = lane.send(&message);
            }
            Sink::Local(lane) => {
                let _ = lane.send(&message);
            }
        }
    }
}

/// State shared by the worker's tasks. Guarded by one mutex; sections are short and never await.
struct Core {
    session: WorkerSession,
    /// Output route per task: the stream the task's Submit or Resume arrived on.
    task_sinks: skyward_proto::IdMap<TaskId, Sink>,
    control: Option<Sink>,
    runners: skyward_proto::IdMap<TaskId, Runner>,
}

struct Runner {
    /// The task running it; none for a unary call started in place (see `start_unary_now`).
    abort: Option<tokio::task::AbortHandle>,
    credit: Option<Arc<Notify>>,
    call: Option<Arc<executor::CallControl>>,
}

/// Why the worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The coordinator asked it to.
    Shutdown,
    /// The coordinator refused the handshake.
    Refused(String),
    /// The coordinator was silent too long.
    CoordinatorSilent(Duration),
}

/// Runs a function call inside the worker process instead of in an executor process:
/// `(registered name, encoded arguments)` in, the encoded result out.
///
/// Only for simulations that need many nodes in one process (the peer benchmark's 1,000 simulated
/// nodes), which link their own functions. The `skyward-worker` binary never sets it, so on every
/// real node user code still runs in a separate executor process.
pub type InlineCalls = Arc<
    dyn Fn(String, bytes::Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, RemoteError>> + Send>> + Send + Sync,
>;

struct Worker {
    config: WorkerConfig,
    inline: Option<InlineCalls>,
    /// Accelerators detected at start (part of every task's node facts).
    accelerators: Vec<String>,
    /// The node facts of the latest membership epoch, shared by the tasks of every stream at it.
    node_facts: Mutex<Option<(u64, Arc<InstanceInfo>)>>,
    epoch: Instant,
    core: Mutex<Core>,
    executors: Executors,
    /// Cluster mode: this node's part in the worker cluster.
    cluster: Option<Arc<cluster::Cluster>>,
    /// Actors hosted on this node: the executor (binary) each one lives in.
    actors: Mutex<HashMap<u64, BinaryHash>>,
    next_actor: std::sync::atomic::AtomicU64,
    exit: Mutex<Option<ExitReason>>,
    exit_notify: Notify,
    wake_timer: Notify,
    /// Where the executors' readers hand unary results (`finish_unary`); one for all calls, so
    /// that the results of one read are booked together.
    unary_finish: Arc<dyn executor::UnaryFinish>,
}

/// A message for the session, with the task whose replies go back on its stream.
type Incoming = (ToWorker, Option<TaskId>);

/// The frames of one read from a task stream or lane (`serve_task_stream`).
struct StreamBatch<'a> {
    worker: &'a Arc<Worker>,
    members: &'a mut Option<Members>,
    sink: &'a Sink,
    incoming: Vec<Incoming>,
}

impl skyward_net::Batch<ToWorker> for StreamBatch<'_> {
    fn message(&mut self, message: ToWorker) {
        if let Some(incoming) = self.worker.on_stream_message(message, self.members, self.sink) {
            self.incoming.push(incoming);
        }
    }

    fn flush(&mut self) {
        self.worker.handle_incoming_all(&mut self.incoming, self.sink);
    }
}

/// The worker's [`executor::UnaryFinish`] (weak: the calls in flight do not keep it alive).
struct UnaryFinisher(std::sync::Weak<Worker>);

impl executor::UnaryFinish for UnaryFinisher {
    fn finish(&self, results: &mut Vec<executor::UnaryResult>) {
        if let Some(worker) = self.0.upgrade() {
            worker.finish_unary(results);
        }
    }
}

impl Worker {
    fn now(&self) -> Time {
        self.epoch.elapsed()
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().expect("worker core lock")
    }

    /// Route every queued outgoing message and act on every queued event.
    /// Acting on an event can queue messages (a cancelled task's outcome): they go out too.
    fn pump(self: &Arc<Self>, core: &mut Core) {
        loop {
            while let Some(message) = core.session.poll_transmit() {
                let sink = message.task().and_then(|t| core.task_sinks.get(&t)).or(core.control.as_ref());
                if let Some(sink) = sink {
                    let done = matches!(message, ToCoordinator::Done { .. });
                    let task = message.task();
                    sink.send(message);
                    if done && let Some(task) = task {
                        core.task_sinks.remove(&task);
                    }
                }
            }
            let Some(event) = core.session.poll_event() else { break };
            self.act(core, event);
        }
    }

    /// Start a unary function call in place when its executor is running: no task spawned, and
    /// the executor's reader finishes it. Hands the spec back when the call needs the slow path
    /// (commands, streams, inline calls, an executor to start).
    fn start_unary_now(self: &Arc<Self>, core: &mut Core, task: TaskId, spec: Box<TaskSpec>) -> Result<(), Box<TaskSpec>> {
        let (binary, info) = match (&spec.kind, &spec.info) {
            (TaskKind::Function { binary, streaming: false, .. }, Some(info)) if self.inline.is_none() => (*binary, Arc::clone(info)),
            _ => return Err(spec),
        };
        let TaskSpec { kind: TaskKind::Function { name, args, .. }, info: spec_info, initial_credit, .. } = *spec else {
            unreachable!("matched a function above")
        };
        let done = executor::UnaryDone { finish: Arc::clone(&self.unary_finish), token: task.0 };
        match self.executors.unary_now(binary, name, args, info, done) {
            Ok(control) => {
                core.runners.insert(task, Runner { abort: None, credit: None, call: Some(control) });
                Ok(())
            }
            Err((name, args, _)) => Err(Box::new(TaskSpec {
                kind: TaskKind::Function { name, binary, args, streaming: false },
                members: None,
                info: spec_info,
                initial_credit,
            })),
        }
    }

    /// Book unary calls' results (`start_unary_now`), under one lock of the core.
    fn finish_unary(self: &Arc<Self>, results: &mut Vec<executor::UnaryResult>) {
        let mut core = self.core();
        for (task, result) in results.drain(..) {
            let task = TaskId(task);
            // Gone when the task was cancelled meanwhile (its outcome is already given).
            if core.runners.remove(&task).is_some() {
                let outcome = match result {
                    Ok(bytes) => Outcome::Value(bytes),
                    Err(e) => Outcome::Error(e),
                };
                core.session.finish(task, outcome);
            }
        }
        self.pump(&mut core);
    }

    fn finish_exit(&self, reason: ExitReason) {
        let mut exit = self.exit.lock().expect("exit lock");
        if exit.is_none() {
            *exit = Some(reason);
            self.exit_notify.notify_waiters();
            self.exit_notify.notify_one();
        }
    }

    fn act(self: &Arc<Self>, core: &mut Core, event: WorkerEvent) {
        match event {
            WorkerEvent::Start { task, spec } => {
                let Err(spec) = self.start_unary_now(core, task, spec) else { return };
                let credit = Arc::new(Notify::new());
                let worker = Arc::clone(self);
                let credit_for_task = Arc::clone(&credit);
                let handle = tokio::spawn(async move { worker.run_task(task, *spec, credit_for_task).await });
                core.runners.insert(task, Runner { abort: Some(handle.abort_handle()), credit: Some(credit), call: None });
            }
            WorkerEvent::Cancel { task } => {
                if let Some(runner) = core.runners.remove(&task) {
                    if let Some(abort) = runner.abort {
                        abort.abort();
                    }
                    if let Some(call) = runner.call {
                        call.cancel();
                    }
                }
                core.session.finish(task, Outcome::Cancelled);
            }
            WorkerEvent::CreditAvailable { task } => {
                if let Some(credit) = core.runners.get(&task).and_then(|r| r.credit.as_ref()) {
                    credit.notify_one();
                }
            }
            WorkerEvent::Welcomed { rank } => tracing::info!(rank, "joined the pool"),
            WorkerEvent::Refused { reason } => {
                tracing::error!(%reason, "coordinator refused this worker");
                self.finish_exit(ExitReason::Refused(reason));
            }
            WorkerEvent::QueryBinary { hash } => {
                let present = executor::binary_path(&self.config.cache_dir, hash).exists();
                core.session.binary_status(hash, present);
            }
            WorkerEvent::Shutdown => self.finish_exit(ExitReason::Shutdown),
            WorkerEvent::ClusterView(view) => match (&self.cluster, core.control.clone()) {
                (Some(cluster), Some(control)) => cluster.on_view(view, Arc::new(move |m: ToCoordinator| control.send(m))),
                (Some(_), None) => tracing::warn!("cluster view without a control stream; ignored"),
                (None, _) => tracing::warn!("cluster view received in standalone mode; ignored"),
            },
            WorkerEvent::ClusterViewChange(change) => match (&self.cluster, core.control.clone()) {
                (Some(cluster), Some(control)) => cluster.on_view_change(&change, Arc::new(move |m: ToCoordinator| control.send(m))),
                (Some(_), None) => tracing::warn!("cluster view change without a control stream; ignored"),
                (None, _) => tracing::warn!("cluster view change received in standalone mode; ignored"),
            },
            WorkerEvent::ClusterRequest { id, op } => {
                if let Some(control) = core.control.clone() {
                    self.cluster_request(id, &op, control);
                }
            }
            WorkerEvent::CoordinatorSilent { silent_for } => {
                tracing::error!(?silent_for, "coordinator silent longer than instance_timeout; ending this machine");
                self.finish_exit(ExitReason::CoordinatorSilent(silent_for));
            }
        }
    }

    /// A collection or actor operation from the coordinator; the answer goes back on `sink`.
    fn cluster_request(&self, id: u64, op: &[u8], sink: Sink) {
        let reply = move |m: ToCoordinator| sink.send(m);
        match &self.cluster {
            Some(cluster) => cluster.submit(op, cluster::Origin::Coordinator(id, Arc::new(reply))),
            None => reply(ToCoordinator::ClusterReply { id, result: Err(skyward_proto::cluster::ClusterError::Standalone) }),
        }
    }

    /// One message from the control stream (its replies go where the session routes them).
    fn handle_incoming(self: &Arc<Self>, message: ToWorker) {
        let now = self.now();
        let mut core = self.core();
        Self::book_incoming(&mut core, message, None, now);
        self.pump(&mut core);
    }

    /// Feed one message to the session (the caller pumps).
    fn book_incoming(core: &mut Core, message: ToWorker, route: Option<(TaskId, &Sink)>, now: Time) {
        if let Some((task, sink)) = route {
            core.task_sinks.insert(task, sink.clone());
        }
        if let ToWorker::Credit { task, items, .. } = &message
            && let Some(call) = core.runners.get(task).and_then(|r| r.call.clone())
        {
            call.credit(*items);
        }
        if let Err(e) = core.session.handle(message, now) {
            tracing::warn!(error = %e, "protocol error from coordinator");
        }
    }

    async fn run_task(self: Arc<Self>, task: TaskId, spec: TaskSpec, credit: Arc<Notify>) {
        let outcome = match spec.kind {
            TaskKind::Command(command) => {
                let worker = Arc::clone(&self);
                let result = command::run(command, move |stream, line| {
                    let mut core = worker.core();
                    core.session.output(task, stream, line);
                    worker.pump(&mut core);
                })
                .await;
                match result.and_then(|exit| codec::to_bytes(&exit).map_err(|e| RemoteError::new(RemoteErrorKind::Worker, e.to_string()))) {
                    Ok(bytes) => Outcome::Value(bytes),
                    Err(e) => Outcome::Error(e),
                }
            }
            TaskKind::Function { name, binary, args, streaming } => {
                self.run_function(task, name, binary, args, streaming, spec.info, spec.initial_credit, credit).await
            }
        };
        let mut core = self.core();
        core.runners.remove(&task);
        core.session.finish(task, outcome);
        self.pump(&mut core);
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_function(
        self: &Arc<Self>,
        task: TaskId,
        name: String,
        binary: BinaryHash,
        args: Args,
        streaming: bool,
        info: Option<Arc<InstanceInfo>>,
        initial_credit: u32,
        credit: Arc<Notify>,
    ) -> Outcome {
        if let Some(inline) = &self.inline {
            if streaming {
                return Outcome::Error(RemoteError::new(RemoteErrorKind::Worker, "inline calls are unary only"));
            }
            let args = match args {
                Args::Inline(bytes) => bytes,
                Args::Shared(at) => match skyward_net::shm::map(&at) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        return Outcome::Error(RemoteError::new(RemoteErrorKind::Worker, format!("cannot read the call's arguments: {e}")));
                    }
                },
            };
            return match inline(name, args).await {
                Ok(bytes) => Outcome::Value(bytes),
                Err(e) => Outcome::Error(e),
            };
        }
        let Some(info) = info else {
            return Outcome::Error(RemoteError::new(RemoteErrorKind::Worker, "the task arrived without its node facts (coordinator bug)"));
        };
        let call = match self.executors.call(binary, name, args, info, streaming, initial_credit).await {
            Ok(call) => call,
            Err(e) => return Outcome::Error(e),
        };
        let executor::CallHandle { mut events, control: call_ref } = call;
        if let Some(runner) = self.core().runners.get_mut(&task) {
            runner.call = Some(Arc::clone(&call_ref));
        }
        // Dropping the handle without a result (task aborted) cancels the executor call.
        struct CancelOnDrop(Arc<executor::CallControl>, bool);
        impl Drop for CancelOnDrop {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.cancel();
                }
            }
        }
        let mut guard = CancelOnDrop(call_ref, false);
        while let Some(event) = events.recv().await {
            match event {
                CallEvent::Item(payload) => {
                    // The executor honours the same window, so credit is normally there; after a
                    // reconnect the windows can differ, and then the item waits here.
                    loop {
                        let ready = self.core().session.has_credit(task);
                        match ready {
                            Ok(true) => break,
                            Ok(false) => credit.notified().await,
                            Err(SendItemError::UnknownTask) | Err(SendItemError::NoCredit) => return Outcome::Cancelled,
                        }
                    }
                    let mut core = self.core();
                    let sent = core.session.send_item(task, payload);
                    self.pump(&mut core);
                    if sent.is_err() {
                        return Outcome::Cancelled;
                    }
                }
                CallEvent::Done(result) => {
                    guard.1 = true;
                    return match result {
                        Ok(bytes) => Outcome::Value(bytes),
                        Err(e) => Outcome::Error(e),
                    };
                }
            }
        }
        guard.1 = true;
        Outcome::Error(RemoteError::new(RemoteErrorKind::ExecutorDied, "executor call ended without a result"))
    }

    async fn receive_binary(self: &Arc<Self>, mut recv: FramedRecv) -> Result<(), String> {
        let header: ToWorker = recv.next("PutBinary").await.map_err(|e| e.to_string())?.ok_or("empty binary stream")?;
        let ToWorker::PutBinary { hash, len } = header else {
            return Err(format!("unidirectional stream opened with {} instead of PutBinary", header.name()));
        };
        let final_path = executor::binary_path(&self.config.cache_dir, hash);
        if final_path.exists() {
            let mut core = self.core();
            core.session.binary_status(hash, true);
            self.pump(&mut core);
            return Ok(());
        }
        let tmp = self.config.cache_dir.join(format!(".{}.{}.partial", hash.to_hex(), std::process::id()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            let mut hasher = Sha256::new();
            // Bytes that arrived in the same read as the header frame come first.
            let head = recv.take_buffered();
            hasher.update(&head);
            file.write_all(&head).await.map_err(|e| e.to_string())?;
            let mut received: u64 = head.len() as u64;
            let stream = recv.quic_mut().ok_or("a binary upload comes on a QUIC stream")?;
            while let Some(chunk) = stream.read_chunk(1 << 20, true).await.map_err(|e| e.to_string())? {
                hasher.update(&chunk.bytes);
                file.write_all(&chunk.bytes).await.map_err(|e| e.to_string())?;
                received += chunk.bytes.len() as u64;
                if received > len {
                    return Err(format!("binary stream longer than announced {len} bytes"));
                }
            }
            if received != len {
                return Err(format!("binary stream ended after {received} of {len} bytes"));
            }
            let got = BinaryHash(hasher.finalize().into());
            if got != hash {
                return Err(format!("binary checksum mismatch: expected {hash:?}, got {got:?}"));
            }
            file.flush().await.map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).await.map_err(|e| e.to_string())?;
            tokio::fs::rename(&tmp, &final_path).await.map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        let mut core = self.core();
        core.session.binary_status(hash, result.is_ok());
        self.pump(&mut core);
        result
    }

    /// The node facts tasks see at membership `members`, built once per epoch for all streams.
    fn node_facts(&self, members: &Members) -> Arc<InstanceInfo> {
        let mut cached = self.node_facts.lock().expect("node facts lock");
        if let Some((epoch, facts)) = cached.as_ref()
            && *epoch == members.epoch
            && facts.rank == members.rank
        {
            return Arc::clone(facts);
        }
        let peers = members.peers();
        let facts = Arc::new(InstanceInfo {
            rank: members.rank,
            node_count: peers.len() as u32,
            head_addr: peers.first().cloned().unwrap_or_default(),
            peers,
            pool_id: self.config.pool_id.clone(),
            accelerators: self.accelerators.clone(),
        });
        *cached = Some((members.epoch, Arc::clone(&facts)));
        facts
    }

    /// Serve a stream the coordinator opened: either one task (its `Submit`, then the peer
    /// finishes) or a lane (`OpenLane`, then many `Submit`s). Replies for each task go back on the
    /// stream its `Submit` arrived on; a task stream is finished after `Done`, a lane never is.
    async fn serve_task_stream(self: Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream) {
        let mut recv = FramedRecv::new(recv, self.config.max_frame);
        let first = match recv.next::<ToWorker>("ToWorker").await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "closing a task stream");
                return;
            }
        };
        let (sink, writer) = if matches!(first, ToWorker::OpenLane) {
            (Sink::Lane(skyward_net::LaneWriter::new(send)), None)
        } else {
            let (tx, rx) = mpsc::unbounded_channel::<ToCoordinator>();
            (Sink::Channel(tx), Some(tokio::spawn(write_loop(send, rx, true))))
        };
        self.serve_frames(&mut recv, &sink, Some(first)).await;
        // A task stream's writer finishes after its task's Done; a lane's writer ends with the
        // last clone of its sink.
        drop(writer);
    }

    /// Serve a local lane: a Unix connection to `lanes.sock` from the coordinator on this
    /// machine (see `LocalLanes`). Its first frame must carry the token from this worker's facts;
    /// anything else closes it. Then it is a lane like a QUIC one.
    async fn serve_local_lane(self: Arc<Self>, stream: tokio::net::UnixStream, token: skyward_proto::message::LaneToken) {
        let (read, write) = match skyward_net::unix::split(stream) {
            Ok(halves) => halves,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a local lane");
                return;
            }
        };
        // The first frame is read under a small limit and a deadline: a stranger gets no more.
        let mut recv = FramedRecv::unix(read, 1024);
        match tokio::time::timeout(Duration::from_secs(10), recv.next::<ToWorker>("ToWorker")).await {
            Ok(Ok(Some(ToWorker::OpenLocalLane { token: offered }))) if offered.matches(&token) => {}
            _ => {
                tracing::warn!("refused a local lane: its first frame did not carry this worker's token");
                return;
            }
        }
        recv.set_max_frame(self.config.max_frame);
        let sink = Sink::Local(skyward_net::UnixFrameWriter::new(write));
        self.serve_frames(&mut recv, &sink, None).await;
    }

    /// The frames of a task stream or lane, `first` (already read) first, until its end.
    async fn serve_frames(self: &Arc<Self>, recv: &mut FramedRecv, sink: &Sink, first: Option<ToWorker>) {
        // The membership as this stream's Submits built it (see skyward_proto::members).
        let mut members: Option<Members> = None;
        let mut batch = StreamBatch { worker: self, members: &mut members, sink, incoming: Vec::new() };
        let mut next = first;
        loop {
            let message = match next.take() {
                Some(m) => m,
                None => match recv.next::<ToWorker>("ToWorker").await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "closing a task stream");
                        break;
                    }
                },
            };
            // Every frame this read brought is handled under one cork and booked under one lock
            // of the core per stretch: the calls they start go to the executor in one write.
            if let Err(e) = recv.handle_batch("ToWorker", message, &mut batch) {
                tracing::warn!(error = %e, "closing a task stream");
                break;
            }
        }
    }

    /// One frame from a task stream or lane (see `serve_task_stream`): what is left for the
    /// session (`handle_incoming_all`), with the task to route its replies for.
    fn on_stream_message(self: &Arc<Self>, mut message: ToWorker, members: &mut Option<Members>, sink: &Sink) -> Option<Incoming> {
        if let ToWorker::Submit { task, spec } = &mut message {
            if let Some(update) = spec.members.take()
                && let Err(e) = Members::apply(members, update)
            {
                // Not expected: the coordinator tracks what each stream holds. The task fails
                // for want of facts rather than see the wrong ones.
                tracing::warn!(%task, error = %e, "membership update out of order");
                *members = None;
            }
            spec.info = members.as_ref().map(|m| self.node_facts(m));
        }
        let route = match message {
            ToWorker::Submit { task, .. } | ToWorker::Resume { task, .. } => Some(task),
            ToWorker::OpenLane | ToWorker::OpenLocalLane { .. } => return None,
            // Cluster requests on a lane are answered on it, written directly: ahead of the
            // session messages read before them in the same stretch (booked at its end). No
            // order is promised between the two: the coordinator picks their lanes apart.
            ToWorker::ClusterRequest { id, op } => {
                self.cluster_request(id, &op, sink.clone());
                return None;
            }
            _ => None,
        };
        Some((message, route))
    }

    /// [`Worker::handle_incoming`] for the messages of one stream (taken from `incoming`),
    /// under one lock of the core; replies to their tasks go to `sink`.
    fn handle_incoming_all(self: &Arc<Self>, incoming: &mut Vec<Incoming>, sink: &Sink) {
        if incoming.is_empty() {
            return;
        }
        let now = self.now();
        let mut core = self.core();
        for (message, route) in incoming.drain(..) {
            Self::book_incoming(&mut core, message, route.map(|t| (t, sink)), now);
        }
        self.pump(&mut core);
    }

    async fn serve_connection(self: &Arc<Self>, connection: quinn::Connection) -> Result<(), String> {
        let (send, recv) = connection.open_bi().await.map_err(|e| format!("cannot open control stream: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel::<ToCoordinator>();
        let writer = tokio::spawn(write_loop(send, rx, false));
        {
            let mut core = self.core();
            let hello = core.session.hello();
            let _ = tx.send(hello);
            core.control = Some(Sink::Channel(tx.clone()));
        }
        let mut control_reader = {
            let worker = Arc::clone(self);
            let max = self.config.max_frame;
            tokio::spawn(async move {
                let mut recv = FramedRecv::new(recv, max);
                loop {
                    match recv.next::<ToWorker>("ToWorker").await {
                        Ok(Some(message)) => worker.handle_incoming(message),
                        Ok(None) => return "coordinator closed the control stream".to_string(),
                        Err(e) => return format!("control stream: {e}"),
                    }
                }
            })
        };
        let uni = {
            let worker = Arc::clone(self);
            let connection = connection.clone();
            tokio::spawn(async move {
                while let Ok(recv) = connection.accept_uni().await {
                    let worker = Arc::clone(&worker);
                    let max = worker.config.max_frame;
                    tokio::spawn(async move {
                        if let Err(e) = worker.receive_binary(FramedRecv::new(recv, max)).await {
                            tracing::warn!(error = %e, "binary upload failed");
                        }
                    });
                }
            })
        };
        let reason = loop {
            tokio::select! {
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => { tokio::spawn(Arc::clone(self).serve_task_stream(send, recv)); }
                    Err(e) => break format!("connection closed: {e}"),
                },
                _ = self.exit_notify.notified() => break "worker exiting".to_string(),
                ended = &mut control_reader => {
                    let reason = ended.unwrap_or_else(|e| e.to_string());
                    connection.close(1u32.into(), b"control stream ended");
                    break reason;
                }
            }
        };
        control_reader.abort();
        uni.abort();
        {
            let mut core = self.core();
            core.control = None;
            core.task_sinks.clear();
        }
        drop(tx);
        let _ = writer.await;
        Err(reason)
    }

    async fn timer_loop(self: Arc<Self>) {
        loop {
            let deadline = self.core().session.poll_timeout();
            let now = self.now();
            if deadline > now {
                tokio::select! {
                    _ = tokio::time::sleep(deadline - now) => {}
                    _ = self.wake_timer.notified() => continue,
                }
            }
            let now = self.now();
            let mut core = self.core();
            core.session.handle_timeout(now);
            self.pump(&mut core);
            drop(core);
            if self.exit.lock().expect("exit lock").is_some() {
                // Exiting: the silence deadline stays in the past, so stop instead of spinning.
                return;
            }
        }
    }
}

/// Write queued messages to `send`, batching whatever is ready. A task stream (`task_stream`)
/// carries nothing after `Done`, so it is finished then; the control stream never is.
async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<ToCoordinator>, task_stream: bool) {
    let mut buf = Vec::with_capacity(if task_stream { 256 } else { 4096 });
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut finish = task_stream && matches!(first, ToCoordinator::Done { .. });
        if codec::encode_frame(&first, &mut buf).is_err() {
            continue;
        }
        while !finish && buf.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => {
                    finish = task_stream && matches!(more, ToCoordinator::Done { .. });
                    let _ = codec::encode_frame(&more, &mut buf);
                }
                Err(_) => break,
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
        if finish && rx.is_empty() {
            // A task stream carries nothing after Done: finish it so the peer sees the end.
            break;
        }
    }
    let _ = send.finish();
}

fn detect_libc() -> &'static str {
    const GLIBC: &[&str] =
        &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib/ld-linux-x86-64.so.2", "/lib/ld-linux.so.2"];
    if GLIBC.iter().any(|p| std::path::Path::new(p).exists()) {
        return "glibc";
    }
    let musl =
        std::fs::read_dir("/lib").map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("ld-musl-"))).unwrap_or(false);
    if musl { "musl" } else { "none" }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// Accelerators on this machine, as reported by `nvidia-smi` (empty when there is none).
pub fn detect_accelerators() -> Vec<String> {
    let output = std::process::Command::new("nvidia-smi").args(["--query-gpu=name,memory.total", "--format=csv,noheader"]).output();
    match output {
        Ok(out) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
        }
        _ => Vec::new(),
    }
}

/// Facts this worker reports in its hello.
pub fn facts(config: &WorkerConfig) -> WorkerFacts {
    WorkerFacts {
        arch: std::env::consts::ARCH.to_string(),
        libc: detect_libc().to_string(),
        hostname: hostname(),
        concurrency: config.concurrency,
        accelerators: detect_accelerators(),
        worker_version: env!("CARGO_PKG_VERSION").to_string(),
        memory_probe: memory_probe(),
        local_lanes: None,
        cpus: skyward_net::cpus::allowed().into_iter().filter_map(|cpu| u32::try_from(cpu).ok()).collect(),
    }
}

/// The local-lane socket (`<state dir>/lanes.sock`, see [`LocalLanes`]) and what the hello
/// reports about it; `None` where this worker has no locality probe (no coordinator could prove
/// it shares this machine) or the socket cannot be made.
fn bind_local_lanes(config: &WorkerConfig) -> Option<(tokio::net::UnixListener, LocalLanes)> {
    memory_probe()?;
    let path = config.state_dir.join("lanes.sock");
    let made = skyward_net::random_token().map_err(anyhow::Error::from).and_then(|token| {
        let listener = bind_standalone_socket(&path)?;
        let at = path.to_str().ok_or_else(|| anyhow::anyhow!("not UTF-8"))?.to_string();
        Ok((listener, LocalLanes { path: at, token: LaneToken(token) }))
    });
    made.map_err(|e| tracing::debug!(socket = %path.display(), error = %e, "no local lanes; lanes use QUIC")).ok()
}

/// This process's locality probe (made once; kept open for the process's life), or `None` when
/// no memfd can be made here (the coordinator then sends arguments inline).
fn memory_probe() -> Option<MemoryProbe> {
    static PROBE: std::sync::OnceLock<Option<skyward_net::shm::Probe>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            skyward_net::shm::Probe::new().map_err(|e| tracing::debug!(error = %e, "no shared-memory probe; arguments travel inline")).ok()
        })
        .as_ref()
        .map(|p| p.probe().clone())
}

const TUNNEL_ARRIVED: &str = "coordinator tunnel arrived";

/// Actor operations addressed to this node run in the executor of the actor's binary. One task
/// sends them to the executors in arrival order (so messages from one sender stay in order);
/// answers are awaited concurrently.
fn actor_hook(worker: std::sync::Weak<Worker>) -> cluster::ActorHook {
    use skyward_proto::cluster::{ClusterError, Op, Reply};
    type Job = (Op, Box<dyn FnOnce(Result<Reply, ClusterError>) + Send>);
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    // Operations queued and not yet sent: while there are any, every operation queues behind
    // them (order); when there are none, a message to a running actor is sent at once from the
    // caller's task.
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let queued_in_loop = Arc::clone(&queued);
    let loop_worker = worker.clone();
    tokio::spawn(async move {
        while let Some((op, done)) = rx.recv().await {
            match loop_worker.upgrade() {
                Some(worker) => worker.send_actor_op(op, done).await,
                None => done(Err(ClusterError::Unavailable("the worker is shutting down".into()))),
            }
            queued_in_loop.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    });
    Arc::new(move |op, done: Box<dyn FnOnce(Result<Reply, ClusterError>) + Send>| {
        let mut done = done;
        if let (Op::ActorCall { actor, msg, reply, .. }, Some(worker)) = (&op, worker.upgrade())
            && queued.load(std::sync::atomic::Ordering::Acquire) == 0
            && let Some(hash) = worker.actors.lock().expect("actors").get(actor).copied()
        {
            let call = skyward_proto::exec::ActorOp::Call { actor: *actor, msg: msg.clone(), reply: *reply };
            let answer: executor::ActorDone = Box::new(move |result| done(result.map(|b| Reply::Bytes(b.into()))));
            match worker.executors.try_actor_now(hash, call, answer) {
                None => return,
                // The executor is busy starting or gone: the queue path decides.
                Some(answer) => {
                    done = Box::new(move |result: Result<Reply, ClusterError>| {
                        answer(result.map(|reply| match reply {
                            Reply::Bytes(b) => b.into_vec(),
                            _ => Vec::new(),
                        }))
                    })
                }
            }
        }
        queued.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Err(mpsc::error::SendError((_, done))) = tx.send((op, done)) {
            queued.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            done(Err(ClusterError::Unavailable("the worker is shutting down".into())));
        }
    })
}

impl Worker {
    async fn send_actor_op(
        self: &Arc<Self>,
        op: skyward_proto::cluster::Op,
        done: Box<dyn FnOnce(Result<skyward_proto::cluster::Reply, skyward_proto::cluster::ClusterError>) + Send>,
    ) {
        use skyward_proto::cluster::{ClusterError, Op, Reply};
        use skyward_proto::exec::ActorOp;
        let no_such = || ClusterError::ActorDead { actor: String::new(), reason: "this node hosts no such actor".into() };
        let hosted = |actor: u64| self.actors.lock().expect("actors").get(&actor).copied();
        match op {
            Op::ActorSpawn { type_name, binary, args, rank } => {
                let actor = self.next_actor.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.actors.lock().expect("actors").insert(actor, binary);
                let node_id = self.config.node_id.clone();
                let worker = Arc::clone(self);
                let answer = Box::new(move |result: executor::ActorAnswer| {
                    if result.is_err() {
                        // A spawn that failed leaves no entry behind.
                        worker.actors.lock().expect("actors").remove(&actor);
                    }
                    done(result.map(|_| Reply::Actor { rank: rank.unwrap_or(u32::MAX), node_id, actor }));
                });
                self.executors.actor(binary, ActorOp::Spawn { actor, type_name, args }, answer).await;
            }
            Op::ActorCall { actor, msg, reply, .. } => match hosted(actor) {
                Some(hash) => {
                    let answer = Box::new(move |result: executor::ActorAnswer| done(result.map(|b| Reply::Bytes(b.into()))));
                    self.executors.actor(hash, ActorOp::Call { actor, msg, reply }, answer).await;
                }
                None => done(Err(no_such())),
            },
            Op::ActorStop { actor, .. } => match hosted(actor) {
                Some(hash) => {
                    self.actors.lock().expect("actors").remove(&actor);
                    let answer = Box::new(move |result: executor::ActorAnswer| done(result.map(|_| Reply::Unit)));
                    self.executors.actor(hash, ActorOp::Stop { actor }, answer).await;
                }
                None => done(Err(no_such())),
            },
            other => done(Err(ClusterError::BadRequest(format!("not an actor operation: {other:?}")))),
        }
    }
}

/// Bind the standalone socket: a fresh file, mode 0600, in a directory only we can enter.
fn bind_standalone_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Run the worker until it is told to stop, is refused, or the coordinator goes silent.
pub async fn run(config: WorkerConfig) -> anyhow::Result<ExitReason> {
    run_with(config, None).await
}

/// [`run`], with function calls served by `inline` in this process when it is given (see
/// [`InlineCalls`]: simulations only).
pub async fn run_with(config: WorkerConfig, inline: Option<InlineCalls>) -> anyhow::Result<ExitReason> {
    std::fs::create_dir_all(&config.cache_dir)?;
    std::fs::create_dir_all(&config.state_dir)?;
    let epoch = Instant::now();
    let local_lanes = bind_local_lanes(&config);
    let mut facts = facts(&config);
    facts.local_lanes = local_lanes.as_ref().map(|(_, lanes)| lanes.clone());
    let accelerators = facts.accelerators.clone();
    let session = WorkerSession::new(
        WorkerSessionConfig {
            pool_id: config.pool_id.clone(),
            node_id: config.node_id.clone(),
            instance_timeout: config.instance_timeout(),
            cache_entries: 100_000,
            cache_bytes: 512 * 1024 * 1024,
        },
        facts,
        Duration::ZERO,
    );
    let (endpoint, tunnel) = match &config.standalone_socket {
        None => (skyward_net::worker_endpoint(&config.ca_cert_pem, &config.cert, Duration::from_secs(10))?, None),
        Some(path) => {
            let socket = skyward_net::TunnelSocket::single("127.0.0.3:1".parse().expect("static address"));
            let endpoint =
                skyward_net::client_endpoint_tunnel(Arc::clone(&socket), &config.ca_cert_pem, &config.cert, Duration::from_secs(10))?;
            let listener = bind_standalone_socket(path)?;
            tracing::info!(socket = %path.display(), "standalone mode: waiting for the coordinator's tunnel");
            let attach_to = Arc::clone(&socket);
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tracing::debug!("coordinator tunnel attached");
                            attach_to.attach(stream);
                        }
                        Err(e) => {
                            // Persistent errors (EMFILE) must not spin.
                            tracing::warn!(error = %e, "standalone socket accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            (endpoint, Some(socket))
        }
    };
    // Cluster mode: the same endpoint accepts peers, so the address the coordinator sees is the
    // one peers dial.
    let cluster = tunnel.is_none().then(|| cluster::Cluster::new(config.node_id.clone(), endpoint.clone(), config.max_frame));
    let hook: executor::ClusterHook = match &cluster {
        Some(cluster) => {
            let cluster = Arc::clone(cluster);
            Arc::new(move |id, op, tx| cluster.submit(&op, cluster::Origin::Executor(id, tx)))
        }
        None => Arc::new(|id, _op, tx: skyward_net::UnixFrameWriter| {
            let _ = tx
                .send(&skyward_proto::exec::ToExecutor::ClusterReply { id, result: Err(skyward_proto::cluster::ClusterError::Standalone) });
        }),
    };
    let worker = Arc::new_cyclic(|me| Worker {
        unary_finish: Arc::new(UnaryFinisher(me.clone())),
        executors: Executors::new(config.cache_dir.clone(), config.state_dir.clone(), hook),
        cluster,
        inline,
        accelerators,
        node_facts: Mutex::new(None),
        actors: Mutex::new(HashMap::new()),
        next_actor: std::sync::atomic::AtomicU64::new(1),
        config,
        epoch,
        core: Mutex::new(Core { session, task_sinks: Default::default(), control: None, runners: Default::default() }),
        exit: Mutex::new(None),
        exit_notify: Notify::new(),
        wake_timer: Notify::new(),
    });
    if let Some(cluster) = &worker.cluster {
        cluster.set_actor_hook(actor_hook(Arc::downgrade(&worker)));
    }
    let timer = tokio::spawn(Arc::clone(&worker).timer_loop());
    let lane_listener = local_lanes.map(|(listener, lanes)| {
        let worker = Arc::downgrade(&worker);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => match worker.upgrade() {
                        Some(worker) => {
                            tokio::spawn(worker.serve_local_lane(stream, lanes.token));
                        }
                        None => return,
                    },
                    Err(e) => {
                        // Persistent errors (EMFILE) must not spin.
                        tracing::warn!(error = %e, "local lane socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    });
    let connector = {
        let worker = Arc::clone(&worker);
        let endpoint = endpoint.clone();
        let tunnel = tunnel.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let attempt = async {
                    let connecting =
                        endpoint.connect(worker.config.coordinator, skyward_net::COORDINATOR_SERVER_NAME).map_err(|e| e.to_string())?;
                    let connection = match &tunnel {
                        // A handshake started before the tunnel existed waits for retransmits:
                        // start over as soon as a tunnel arrives.
                        Some(t) => tokio::select! {
                            c = connecting => c.map_err(|e| e.to_string())?,
                            _ = t.attached() => return Err(TUNNEL_ARRIVED.to_string()),
                        },
                        None => connecting.await.map_err(|e| e.to_string())?,
                    };
                    worker.serve_connection(connection).await
                };
                match attempt.await {
                    // A connection that was up: the next dial starts from the shortest pause.
                    Ok(()) => backoff = Duration::from_millis(50),
                    // The tunnel the handshake was waiting for is there: dial through it now.
                    Err(reason) if reason == TUNNEL_ARRIVED => continue,
                    Err(reason) => tracing::warn!(%reason, ?backoff, "connection to coordinator ended; redialling"),
                }
                if worker.exit.lock().expect("exit lock").is_some() {
                    return;
                }
                // Bounded backoff: the silence timer, not this loop, decides when to give up.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        })
    };
    loop {
        let notified = worker.exit_notify.notified();
        let exit = worker.exit.lock().expect("exit lock").clone();
        if let Some(reason) = exit {
            timer.abort();
            connector.abort();
            if let Some(listener) = &lane_listener {
                listener.abort();
            }
            if let Some(cluster) = &worker.cluster {
                cluster.close();
            }
            worker.executors.shutdown().await;
            endpoint.close(0u32.into(), b"worker exiting");
            if matches!(reason, ExitReason::CoordinatorSilent(_)) {
                match worker.config.on_silence {
                    SilenceAction::Exit => {}
                    SilenceAction::Poweroff => {
                        tracing::warn!("coordinator silent: powering the machine off");
                        let _ = std::process::Command::new("poweroff").status();
                    }
                    SilenceAction::StopInit => {
                        tracing::warn!("coordinator silent: stopping init (the container ends)");
                        // SAFETY: plain integers; signalling PID 1 of our own PID namespace.
                        unsafe {
                            libc::kill(1, libc::SIGTERM);
                        }
                    }
                }
            }
            return Ok(reason);
        }
        notified.await;
    }
}

/// Entry point shared by the `skyward-worker` binary and the embedded worker role:
/// `skyward-worker --config PATH`.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SKYWARD_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let path = match args.iter().position(|a| a == "--config").and_then(|i| args.get(i + 1)) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            eprintln!("usage: skyward-worker --config PATH\n(the provider writes PATH; see docs/architecture.md)");
            return 2;
        }
    };
    let config = match WorkerConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skyward-worker: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skyward-worker: cannot start a runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(run(config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(ExitReason::Shutdown) => 0,
        Ok(ExitReason::Refused(_)) => 3,
        Ok(ExitReason::CoordinatorSilent(_)) => 4,
        Err(e) => {
            eprintln!("skyward-worker: {e:#}");
            1
        }
    }
}
