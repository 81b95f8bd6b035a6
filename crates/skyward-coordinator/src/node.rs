//! `Node`: one actor per instance, its state machine, its connection and heartbeats.
//!
//! States: requested → booting → bootstrapping (binary check and upload) → ready →
//! lost | terminated. The hot path does not pass through this actor: the task manager dispatches
//! through a [`NodeHandle`], which writes small calls on the connection's lanes and opens a stream
//! for the others, and every frame from the worker is fed to the shared [`CoordinatorSession`]
//! under a short lock.
//!
//! Supervision: a Node supervises nothing. When its worker goes silent past `lost_after`, it tells
//! the task manager (which re-queues the node's tasks) and the pool (which replaces the node), then
//! stops. A Node that fails is treated the same way by the pool: replaced, not escalated.

use crate::binary::ShippedBinary;
use crate::pool::PoolMsg;
use crate::task_manager::{TaskManagerRef, TmMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use skyward_net::{FramedRecv, write_frame_shared, write_frames};
use skyward_proto::Time;
use skyward_proto::members::MembersUpdate;
use skyward_proto::message::*;
use skyward_proto::session::{CoordinatorSession, NodeEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A line of command output with the node it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Rank of the node.
    pub rank: u32,
    /// Which stream.
    pub stream: OutputStream,
    /// The line.
    pub line: String,
}

/// Where a task's intermediate output goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskSinks {
    pub(crate) items: Option<mpsc::UnboundedSender<Vec<u8>>>,
    pub(crate) output: Option<mpsc::UnboundedSender<OutputLine>>,
}

/// Node state as the coordinator tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeState {
    /// Asked the provider for it.
    Requested,
    /// The provider reports it; the worker has not connected yet.
    Booting,
    /// The worker connected; handshake and binary check running.
    Bootstrapping,
    /// Serving tasks.
    Ready,
    /// Silent too long; being replaced.
    Lost,
    /// Gone.
    Terminated,
}

pub(crate) struct NodeShared {
    pub(crate) rank: u32,
    pub(crate) node_id: String,
    epoch: Instant,
    session: Mutex<CoordinatorSession>,
    sinks: Mutex<skyward_proto::IdMap<TaskId, TaskSinks>>,
    control: Mutex<Option<mpsc::UnboundedSender<ToWorker>>>,
    connection: Mutex<Option<quinn::Connection>>,
    binary_waiters: Mutex<Vec<oneshot::Sender<bool>>>,
    tm: TaskManagerRef,
    node_actor: Mutex<Option<ActorRef<NodeMsg>>>,
    max_frame: usize,
    /// Long-lived streams that carry small unary tasks (see [`LANES`]); empty until opened.
    lanes: Mutex<Vec<Lane>>,
    next_lane: std::sync::atomic::AtomicUsize,
    /// Set once the worker has connected (stops the boot watcher).
    connected: std::sync::atomic::AtomicBool,
    /// Where answers to the coordinator's collection calls go.
    cluster: Arc<crate::cluster::ClusterShared>,
    /// `Options::shared_memory_args`.
    shared_memory_args: bool,
    /// `Options::local_lanes`.
    local_lanes: bool,
    /// `PoolShared::same_host`: set when this node proves it is on this machine.
    pool_same_host: Arc<std::sync::atomic::AtomicBool>,
    /// The worker proved it runs on this machine and can open this process's memory objects
    /// (`skyward_net::shm::Probe`): large arguments go to it through shared memory.
    same_host: std::sync::atomic::AtomicBool,
    /// The shared-memory arguments of this node's tasks, held open until each task is forgotten.
    held: Mutex<skyward_proto::IdMap<TaskId, Arc<SharedArgs>>>,
    /// The pool's busy poller: touched on every send to and message from this node.
    busy: Arc<crate::busy_poll::BusyPoll>,
}

/// Arguments from this size on go through shared memory to a node on this machine.
pub(crate) const SHARED_MEMORY_MIN: usize = 1024 * 1024;

/// Arguments in shared memory, with the buffer they were copied from.
#[derive(Debug)]
pub(crate) struct SharedArgs {
    object: skyward_net::shm::Sealed,
    /// Kept alive with the object: while the object can be found by the buffer's address, no
    /// other buffer can be allocated at that address (and be handed this object's bytes).
    _buffer: bytes::Bytes,
}

impl Drop for SharedArgs {
    fn drop(&mut self) {
        LIVE_OBJECTS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Shared-memory argument objects alive in this process.
static LIVE_OBJECTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// At most this many objects at once (each a descriptor and its arguments' size in memory); past
/// it, arguments travel inline until some are closed.
const MAX_OBJECTS: usize = 256;

/// Callers prepare objects at submit only while fewer than this many are alive, so that a gather
/// of many large calls cannot put them all in memory before they run (the rest are made at
/// dispatch, bounded by the pool's slots).
pub(crate) const MAX_PREPARED: usize = 32;

/// Objects alive now (`MAX_PREPARED` check).
pub(crate) fn live_objects() -> usize {
    LIVE_OBJECTS.load(std::sync::atomic::Ordering::Acquire)
}

/// The shared-memory object of `args`, made once however many tasks send the same arguments (a
/// broadcast's calls share one buffer): keyed by the buffer's address and length. The bytes are
/// written without the cache's lock held, so a lookup never waits behind another write.
pub(crate) fn shared_args(args: &bytes::Bytes) -> std::io::Result<Arc<SharedArgs>> {
    type Objects = HashMap<(usize, usize), std::sync::Weak<SharedArgs>>;
    static OBJECTS: std::sync::LazyLock<Mutex<Objects>> = std::sync::LazyLock::new(Default::default);
    let key = (args.as_ptr() as usize, args.len());
    if let Some(object) = OBJECTS.lock().expect("shared args lock").get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(object);
    }
    if LIVE_OBJECTS.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_OBJECTS {
        LIVE_OBJECTS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        return Err(std::io::Error::other(format!("{MAX_OBJECTS} shared-memory argument objects are open already")));
    }
    let sealed = match skyward_net::shm::Sealed::new("skyward-args", args) {
        Ok(sealed) => sealed,
        Err(e) => {
            LIVE_OBJECTS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return Err(e);
        }
    };
    // From here `Drop` gives the count back.
    let object = Arc::new(SharedArgs { object: sealed, _buffer: args.clone() });
    let mut objects = OBJECTS.lock().expect("shared args lock");
    // Another caller may have made one for the same buffer meanwhile: the first stays.
    if let Some(first) = objects.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(first);
    }
    if objects.len() >= 2 * MAX_OBJECTS {
        objects.retain(|_, o| o.strong_count() > 0);
    }
    objects.insert(key, Arc::downgrade(&object));
    Ok(object)
}

/// One lane and the membership epoch it last carried (its next task carries the changes since).
/// Dropping a local lane ends its socket both ways: its reader here stops with the connection it
/// belonged to, as a QUIC lane's does.
struct Lane {
    writer: LaneTx,
    members_epoch: Option<u64>,
    closer: Option<skyward_net::unix::UnixCloser>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(closer) = &self.closer {
            closer.close();
        }
    }
}

/// A lane's writing side: a QUIC stream, or a local lane's Unix socket (a node on this machine).
#[derive(Clone)]
enum LaneTx {
    Quic(skyward_net::LaneWriter),
    Local(skyward_net::UnixFrameWriter),
}

impl LaneTx {
    fn send<T: serde::Serialize>(&self, message: &T) -> Result<(), skyward_net::WriterClosed> {
        match self {
            LaneTx::Quic(w) => w.send(message),
            LaneTx::Local(w) => w.send(message),
        }
    }

    fn same_stream(&self, other: &LaneTx) -> bool {
        match (self, other) {
            (LaneTx::Quic(a), LaneTx::Quic(b)) => a.same_stream(b),
            (LaneTx::Local(a), LaneTx::Local(b)) => a.same_stream(b),
            _ => false,
        }
    }
}

/// How [`NodeHandle::dispatch`] sent a task (counted in `TaskStats`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Route {
    /// Its arguments went through shared memory.
    pub(crate) shared_memory: bool,
    /// It went on a local lane.
    pub(crate) local_lane: bool,
}

/// Lanes per connection. Small unary tasks share these streams instead of opening one stream
/// each: no stream setup, no task spawned per dispatch, and frames of concurrent tasks are
/// batched into one write. Tasks with large arguments, streams and commands keep a stream each.
const LANES: usize = 4;

/// Arguments up to this size travel on a lane.
const LANE_MAX_ARGS: usize = 64 * 1024;

/// Open the lanes of a new connection and install them once all are open.
async fn open_lanes(shared: Arc<NodeShared>, connection: quinn::Connection) {
    let mut senders = Vec::with_capacity(LANES);
    for _ in 0..LANES {
        let Ok((send, recv)) = connection.open_bi().await else { return };
        let tx = skyward_net::LaneWriter::new(send);
        if tx.send(&ToWorker::OpenLane).is_err() {
            return;
        }
        tokio::spawn(read_lane(Arc::clone(&shared), FramedRecv::new(recv, shared.max_frame), connection.clone()));
        senders.push(Lane { writer: LaneTx::Quic(tx), members_epoch: None, closer: None });
    }
    install_lanes(&shared, &connection, senders);
}

/// Open the lanes of a new connection over the worker's local-lane socket (it proved it runs on
/// this machine); on any failure, over QUIC instead.
async fn open_local_lanes(shared: Arc<NodeShared>, connection: quinn::Connection, at: skyward_proto::message::LocalLanes) {
    let mut lanes = Vec::with_capacity(LANES);
    for _ in 0..LANES {
        match open_local_lane(&shared, &connection, &at).await {
            Ok(lane) => lanes.push(lane),
            Err(e) => {
                tracing::debug!(node = %shared.node_id, socket = %at.path, error = %e, "cannot open a local lane; lanes use QUIC");
                drop(lanes);
                return open_lanes(shared, connection).await;
            }
        }
    }
    install_lanes(&shared, &connection, lanes);
}

async fn open_local_lane(
    shared: &Arc<NodeShared>,
    connection: &quinn::Connection,
    at: &skyward_proto::message::LocalLanes,
) -> std::io::Result<Lane> {
    let stream = tokio::net::UnixStream::connect(&at.path).await?;
    let (read, write) = skyward_net::unix::split(stream)?;
    let closer = write.closer();
    let tx = skyward_net::UnixFrameWriter::new(write);
    tx.send(&ToWorker::OpenLocalLane { token: at.token }).map_err(std::io::Error::other)?;
    tokio::spawn(read_lane(Arc::clone(shared), FramedRecv::unix(read, shared.max_frame), connection.clone()));
    Ok(Lane { writer: LaneTx::Local(tx), members_epoch: None, closer: Some(closer) })
}

/// Install `lanes` when `connection` is still the node's connection (else they are dropped).
fn install_lanes(shared: &NodeShared, connection: &quinn::Connection, lanes: Vec<Lane>) {
    let current = shared.connection.lock().expect("connection lock").as_ref().map(quinn::Connection::stable_id);
    if current == Some(connection.stable_id()) {
        *shared.lanes.lock().expect("lanes lock") = lanes;
    }
}

/// Read a lane's answers until it ends.
async fn read_lane(shared: Arc<NodeShared>, mut recv: FramedRecv, connection: quinn::Connection) {
    let mut batch = LaneBatch { node: &shared, done: Vec::new() };
    loop {
        let next = match recv.next::<ToCoordinator>("ToCoordinator").await {
            // Every answer this read brought is handled under one cork: the tasks
            // dispatched into the slots they free go out in one write per lane.
            Ok(Some(message)) => recv.handle_batch("ToCoordinator", message, &mut batch),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        match next {
            Ok(()) => {}
            Err(skyward_net::RecvError::Protocol(e)) => {
                // A lane out of sync loses the replies of every task on it. Drop the whole
                // connection: the worker redials and every task in flight is resumed.
                tracing::warn!(node = %shared.node_id, error = %e, "bad frame on a lane; dropping the connection");
                connection.close(4u32.into(), b"bad frame on a lane");
                break;
            }
            Err(_) => break,
        }
    }
}

impl NodeShared {
    fn now(&self) -> Time {
        self.epoch.elapsed()
    }

    /// Queue messages on the control stream; `false` when the node has no connection right now.
    pub(crate) fn send_control(&self, messages: impl IntoIterator<Item = ToWorker>) -> bool {
        match self.control.lock().expect("control lock").as_ref() {
            Some(tx) => messages.into_iter().all(|m| tx.send(m).is_ok()),
            None => false,
        }
    }

    /// Send a cluster request on a lane (written from the caller's task, no writer task between),
    /// or on the control stream while the lanes are not open. `key` picks the lane, so requests
    /// with the same key (one actor's messages) stay in order. `false` when there is no connection.
    pub(crate) fn send_cluster(&self, message: ToWorker, key: Option<u64>) -> bool {
        self.busy.touch();
        let lane = {
            let lanes = self.lanes.lock().expect("lanes lock");
            (!lanes.is_empty()).then(|| {
                let i = key.map(|k| k as usize).unwrap_or_else(|| self.next_lane.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                lanes[i % lanes.len()].writer.clone()
            })
        };
        match lane {
            Some(lane) => lane.send(&message).is_ok(),
            None => self.send_control([message]),
        }
    }

    /// Feed one message from the worker and route everything the session produces.
    pub(crate) fn process(&self, message: ToCoordinator) {
        let mut done = Vec::new();
        self.process_deferred(message, &mut done);
        self.tm.completed_all(self.rank, &mut done);
    }

    /// [`NodeShared::process`], with the tasks it completes put in `done` for one
    /// [`TaskManagerRef::completed_all`] per batch of a lane's answers instead of one booking each.
    fn process_deferred(&self, message: ToCoordinator, done: &mut Vec<(TaskId, Outcome)>) {
        // Replies keep the CPUs polling (more are likely to follow); heartbeats do not, so an
        // idle pool stays idle.
        if matches!(
            message,
            ToCoordinator::Output { .. } | ToCoordinator::Item { .. } | ToCoordinator::Done { .. } | ToCoordinator::ClusterReply { .. }
        ) {
            self.busy.touch();
        }
        let now = self.now();
        let (transmit, events) = {
            let mut session = self.session.lock().expect("session lock");
            if let Err(e) = session.handle(message, now) {
                tracing::warn!(node = %self.node_id, error = %e, "protocol error from worker");
            }
            drain(&mut session)
        };
        self.send_control(transmit);
        self.route_deferred(events, done);
    }

    /// Route what the session produced.
    fn route(&self, events: Vec<NodeEvent>) {
        let mut done = Vec::new();
        self.route_deferred(events, &mut done);
        self.tm.completed_all(self.rank, &mut done);
    }

    /// [`NodeShared::route`], with completed tasks put in `done` (see `process_deferred`).
    fn route_deferred(&self, events: Vec<NodeEvent>, done: &mut Vec<(TaskId, Outcome)>) {
        for event in events {
            match event {
                NodeEvent::Completed { task, outcome } => {
                    self.sinks.lock().expect("sinks lock").remove(&task);
                    done.push((task, outcome));
                }
                NodeEvent::Item { task, payload, .. } => {
                    if let Some(items) = self.sinks.lock().expect("sinks lock").get(&task).and_then(|s| s.items.as_ref()) {
                        let _ = items.send(payload);
                    }
                }
                NodeEvent::Output { task, stream, line } => {
                    if let Some(out) = self.sinks.lock().expect("sinks lock").get(&task).and_then(|s| s.output.as_ref()) {
                        let _ = out.send(OutputLine { rank: self.rank, stream, line });
                    }
                }
                NodeEvent::Forgotten { task } => {
                    let _ = self.tm.cast(TmMsg::Forgotten { task, rank: self.rank });
                }
                NodeEvent::BinaryStatus { present, .. } => {
                    for waiter in self.binary_waiters.lock().expect("waiters lock").drain(..) {
                        let _ = waiter.send(present);
                    }
                }
                NodeEvent::Lost { in_flight, silent_for } => {
                    if let Some(actor) = self.node_actor.lock().expect("actor lock").as_ref() {
                        let _ = actor.cast(NodeMsg::Lost { in_flight, silent_for });
                    }
                }
                NodeEvent::Joined { .. } => {}
                NodeEvent::ClusterReply { id, result } => self.cluster.on_reply(id, result),
                NodeEvent::ClusterSynced { epoch } => self.cluster.on_synced(self.rank, epoch),
            }
        }
    }
}

/// The answers of one read from a lane: booked together, one lock on the task manager's book per
/// stretch instead of two per answer (the answer, then the next task into the freed slot).
struct LaneBatch<'a> {
    node: &'a NodeShared,
    done: Vec<(TaskId, Outcome)>,
}

impl skyward_net::Batch<ToCoordinator> for LaneBatch<'_> {
    fn message(&mut self, message: ToCoordinator) {
        self.node.process_deferred(message, &mut self.done);
    }

    fn flush(&mut self) {
        self.node.tm.completed_all(self.node.rank, &mut self.done);
    }
}

fn drain(session: &mut CoordinatorSession) -> (Vec<ToWorker>, Vec<NodeEvent>) {
    let mut transmit = Vec::new();
    while let Some(m) = session.poll_transmit() {
        transmit.push(m);
    }
    let mut events = Vec::new();
    while let Some(e) = session.poll_event() {
        events.push(e);
    }
    (transmit, events)
}

/// The CPUs a worker on this machine reported (`WorkerFacts::cpus`) when they are a strict subset
/// of those this process may use: a node pinned to a slice of the machine (the Local provider's
/// `cpu_slice`). A call from a thread on one of them, sent to that node while it is idle, wakes
/// no thread on another CPU on its way there and back (docs/architecture.md, "Near nodes").
/// Empty for a node that may run wherever the caller may: it is no nearer to one CPU than to
/// another.
fn near_cpus(worker: &[u32]) -> Vec<u32> {
    let ours: Vec<u32> = skyward_net::cpus::allowed().into_iter().filter_map(|cpu| u32::try_from(cpu).ok()).collect();
    let subset = !worker.is_empty() && worker.len() < ours.len() && worker.iter().all(|cpu| ours.contains(cpu));
    if subset { worker.to_vec() } else { Vec::new() }
}

/// The task manager's handle on a ready node: dispatch, cancel, credit.
#[derive(Clone)]
pub(crate) struct NodeHandle {
    pub(crate) rank: u32,
    pub(crate) slots: u32,
    pub(crate) address: String,
    /// The CPUs of this machine the node is pinned to (see [`near_cpus`]); empty for a node
    /// elsewhere or one that may run on any CPU this process may.
    pub(crate) near_cpus: Vec<u32>,
    shared: Arc<NodeShared>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle").field("rank", &self.rank).field("node_id", &self.shared.node_id).finish()
    }
}

impl NodeHandle {
    /// Run `task` on this node: on a lane when it is a small unary call, else on a new
    /// bidirectional stream that carries its submit and its replies. `members(since)` gives the
    /// membership changes a stream at epoch `since` needs to reach `epoch` (see
    /// `skyward_proto::members`): a lane gets what changed since its last task, a new stream all.
    /// Large arguments go through shared memory when the worker runs on this machine. Returns
    /// how the task went.
    pub(crate) fn dispatch(
        &self,
        task: TaskId,
        kind: TaskKind,
        initial_credit: u32,
        sinks: TaskSinks,
        epoch: u64,
        members: &dyn Fn(Option<u64>) -> Option<MembersUpdate>,
    ) -> Route {
        let shared = Arc::clone(&self.shared);
        shared.busy.touch();
        if sinks.items.is_some() || sinks.output.is_some() {
            shared.sinks.lock().expect("sinks lock").insert(task, sinks);
        }
        let kind = match kind {
            TaskKind::Function { name, binary, args: Args::Inline(bytes), streaming }
                if bytes.len() >= SHARED_MEMORY_MIN && shared.same_host.load(std::sync::atomic::Ordering::Acquire) =>
            {
                let args = match shared_args(&bytes) {
                    Ok(object) => {
                        let at = object.object.at();
                        shared.held.lock().expect("held lock").insert(task, object);
                        Args::Shared(at)
                    }
                    Err(e) => {
                        tracing::debug!(%task, error = %e, "cannot put the arguments in shared memory; sending them inline");
                        Args::Inline(bytes)
                    }
                };
                TaskKind::Function { name, binary, args, streaming }
            }
            other => other,
        };
        let mut route = Route { shared_memory: matches!(&kind, TaskKind::Function { args: Args::Shared(_), .. }), local_lane: false };
        let small = matches!(&kind, TaskKind::Function { args, streaming: false, .. } if args.inline_len() <= LANE_MAX_ARGS);
        let mut spec = TaskSpec { kind, members: None, info: None, initial_credit };
        if small {
            // The lane is marked as holding `epoch` before the send: only the task manager
            // dispatches, one task at a time, and a lane whose send fails is dead.
            let lane = {
                let mut lanes = shared.lanes.lock().expect("lanes lock");
                let count = lanes.len();
                (count > 0).then(|| {
                    let lane = &mut lanes[shared.next_lane.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % count];
                    let since = lane.members_epoch.replace(epoch);
                    (lane.writer.clone(), since)
                })
            };
            if let Some((lane, since)) = lane {
                spec.members = members(since);
                // Acks held by the session go ahead of the submit, in the same write.
                let (acks, submit, current) = {
                    let mut session = shared.session.lock().expect("session lock");
                    let acks: Vec<ToWorker> = session.take_acks().collect();
                    let submit = session.submit(task, spec);
                    // Still a lane of the current connection, checked after the task is in the
                    // session: a new connection clears the lanes before its hello resumes the
                    // session's tasks, so a task on a lane that is gone by now would be resumed
                    // by no one (and under a cork, the failed write would not show here).
                    let current = shared.lanes.lock().expect("lanes lock").iter().any(|l| l.writer.same_stream(&lane));
                    (acks, submit, current)
                };
                // A lane whose write fails is dead: the task takes the stream path below. An ack
                // lost with it is harmless: the worker reports the results it still holds when it
                // reconnects, and they are acked then.
                if current && acks.iter().all(|ack| lane.send(ack).is_ok()) && lane.send(&submit).is_ok() {
                    route.local_lane = matches!(lane, LaneTx::Local(_));
                    return route;
                }
                // The lane closed with its connection: the task gets a stream of its own.
                let ToWorker::Submit { spec: sent, .. } = submit else { unreachable!("submit() builds a Submit") };
                spec = *sent;
            }
        }
        spec.members = members(None);
        let submit = shared.session.lock().expect("session lock").submit(task, spec);
        let Some(connection) = shared.connection.lock().expect("connection lock").clone() else {
            // No connection right now: the task stays in flight and is resumed or re-queued
            // when the worker reconnects or is declared lost.
            return route;
        };
        tokio::spawn(async move {
            let (mut send, recv) = match connection.open_bi().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(%task, error = %e, "cannot open task stream; waiting for reconnect or loss");
                    return;
                }
            };
            if write_frame_shared(&mut send, &submit).await.is_err() {
                return;
            }
            let _ = send.finish();
            let mut recv = FramedRecv::new(recv, shared.max_frame);
            loop {
                match recv.next::<ToCoordinator>("ToCoordinator").await {
                    Ok(Some(message)) => {
                        let done = matches!(message, ToCoordinator::Done { .. });
                        shared.process(message);
                        if done {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Undecodable or oversize reply: the stream is out of sync and nothing more
                        // will arrive for this task on it. Fail the task with the reason.
                        tracing::warn!(%task, error = %e, "task stream broke");
                        let error = skyward_proto::error::RemoteError::new(
                            skyward_proto::error::RemoteErrorKind::Worker,
                            format!("the reply stream of this task broke: {e}"),
                        );
                        shared.process(ToCoordinator::Done { task, outcome: Outcome::Error(error) });
                        break;
                    }
                }
            }
        });
        route
    }

    /// Close this node's hold on shared-memory arguments (the node is lost).
    pub(crate) fn release_shared_memory(&self) {
        self.shared.held.lock().expect("held lock").clear();
    }

    /// The shared-memory argument objects this node's tasks hold open (by address).
    pub(crate) fn shared_memory_objects(&self, into: &mut std::collections::HashSet<usize>) {
        into.extend(self.shared.held.lock().expect("held lock").values().map(|o| Arc::as_ptr(o) as usize));
    }

    /// Stop tracking `task` on this node (its caller got an answer another way).
    pub(crate) fn forget(&self, task: TaskId) {
        self.shared.sinks.lock().expect("sinks lock").remove(&task);
        self.shared.held.lock().expect("held lock").remove(&task);
        self.shared.session.lock().expect("session lock").forget(task);
    }

    /// Ask the worker to cancel `task`.
    pub(crate) fn cancel(&self, task: TaskId) {
        let message = self.shared.session.lock().expect("session lock").cancel(task);
        self.shared.send_control([message]);
        self.forget(task);
    }

    /// Grant stream credit.
    pub(crate) fn grant(&self, task: TaskId, items: u32) {
        let message = self.shared.session.lock().expect("session lock").grant(task, items);
        self.shared.send_control([message]);
    }
}

/// Messages of a Node actor.
#[derive(Debug)]
pub(crate) enum NodeMsg {
    /// The provider reports the instance.
    Provisioned { instance_id: String },
    /// A worker connected and sent its hello on the control stream.
    Connected { connection: quinn::Connection, send: quinn::SendStream, recv: FramedRecv, hello: Hello },
    /// The binary is on the node (or could not be put there).
    BinaryReady(Result<(), String>),
    /// The session declared the worker lost.
    Lost { in_flight: Vec<TaskId>, silent_for: Duration },
    /// The control stream of connection `connection_id` ended.
    ControlClosed { connection_id: usize, reason: String },
    /// Stop serving (pool shutdown).
    Drain,
}

pub(crate) struct Node;

pub(crate) struct NodeArgs {
    pub(crate) shared: Arc<NodeShared>,
    pub(crate) pool: ActorRef<PoolMsg>,
    pub(crate) binary: Arc<ShippedBinary>,
    pub(crate) upload_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) provider: Arc<dyn skyward_provider::Provider>,
    pub(crate) ctx: skyward_provider::PoolContext,
    /// Standalone mode: the pool's tunnel socket and the worker's socket path on its machine.
    pub(crate) tunnel: Option<(Arc<skyward_net::TunnelSocket>, std::path::PathBuf)>,
}

/// Standalone mode: keep a tunnel to the worker open through the provider (an SSH channel to
/// the worker's socket), re-opening it whenever it ends. Runs until the node actor stops (which
/// aborts it); a worker that never answers is failed by the boot watcher or declared lost.
async fn keep_tunnel(
    shared: Arc<NodeShared>,
    provider: Arc<dyn skyward_provider::Provider>,
    ctx: skyward_provider::PoolContext,
    instance_id: String,
    socket_path: std::path::PathBuf,
    tunnel: Arc<skyward_net::TunnelSocket>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        match provider.open_tunnel(&ctx, &instance_id, &socket_path).await {
            Ok(stream) => {
                let opened = std::time::Instant::now();
                let attachment = tunnel.attach(stream);
                tracing::debug!(node = %shared.node_id, peer = %attachment.peer, "tunnel to the worker open");
                attachment.closed().await;
                tracing::debug!(node = %shared.node_id, "tunnel to the worker ended; re-opening");
                if opened.elapsed() > Duration::from_secs(1) {
                    backoff = Duration::from_millis(20);
                } else {
                    // Opened and ended at once: do not spin.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            Err(e) => {
                tracing::debug!(node = %shared.node_id, error = %e, ?backoff, "tunnel to the worker not open yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Until the worker connects, check on the instance: a worker that exits or never connects fails
/// the node with its log's last lines, instead of leaving `start()` waiting for its timeout.
async fn watch_boot(
    shared: Arc<NodeShared>,
    pool: ActorRef<PoolMsg>,
    provider: Arc<dyn skyward_provider::Provider>,
    ctx: skyward_provider::PoolContext,
    instance_id: String,
    connect_timeout: Duration,
) {
    let started = Instant::now();
    // Bounded: one provider query per 250 ms until connected, gone, or the deadline.
    let problem = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if shared.connected.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        match provider.get_instance(&ctx, &instance_id).await {
            Ok(Some(i)) if i.state == skyward_provider::InstanceState::Terminated => {
                break format!("the worker on {instance_id} exited before connecting");
            }
            Ok(None) => break format!("the provider no longer knows instance {instance_id}"),
            _ => {}
        }
        if started.elapsed() >= connect_timeout {
            break format!("the worker on {instance_id} did not connect within {connect_timeout:?}");
        }
    };
    let tail = provider.worker_log_tail(&ctx, &shared.node_id, 20).await.filter(|t| !t.trim().is_empty());
    let error = match tail {
        Some(tail) => format!("{problem}; last lines of its log:\n{tail}"),
        None => format!("{problem} (its log is empty)"),
    };
    let _ = pool.cast(PoolMsg::NodeFailed { rank: shared.rank, error });
}

pub(crate) struct NodeStateData {
    connect_timeout: Duration,
    provider: Arc<dyn skyward_provider::Provider>,
    ctx: skyward_provider::PoolContext,
    shared: Arc<NodeShared>,
    pool: ActorRef<PoolMsg>,
    binary: Arc<ShippedBinary>,
    state: NodeState,
    facts: Option<WorkerFacts>,
    /// [`near_cpus`] of the node, from its first hello.
    near_cpus: Vec<u32>,
    address: String,
    /// `ip:port` of the worker's endpoint as seen from here: where its peers dial it.
    cluster_addr: String,
    timer: Option<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    upload_timeout: Duration,
    tunnel: Option<(Arc<skyward_net::TunnelSocket>, std::path::PathBuf)>,
}

/// Build the shared part of a node before its actor exists (the acceptor needs it by node id).
pub(crate) fn new_shared(
    node_id: String,
    rank: u32,
    session: CoordinatorSession,
    tm: TaskManagerRef,
    pool: &crate::pool::PoolShared,
) -> Arc<NodeShared> {
    let (epoch, max_frame, cluster) = (pool.epoch, pool.options.max_frame, Arc::clone(&pool.cluster));
    Arc::new(NodeShared {
        rank,
        node_id,
        epoch,
        session: Mutex::new(session),
        sinks: Mutex::default(),
        control: Mutex::new(None),
        connection: Mutex::new(None),
        binary_waiters: Mutex::new(Vec::new()),
        tm,
        node_actor: Mutex::new(None),
        max_frame,
        lanes: Mutex::new(Vec::new()),
        next_lane: std::sync::atomic::AtomicUsize::new(0),
        connected: std::sync::atomic::AtomicBool::new(false),
        cluster,
        shared_memory_args: pool.options.shared_memory_args,
        local_lanes: pool.options.local_lanes,
        pool_same_host: Arc::clone(&pool.same_host),
        busy: Arc::clone(&pool.busy),
        same_host: std::sync::atomic::AtomicBool::new(false),
        held: Mutex::default(),
    })
}

async fn control_writer(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<ToWorker>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if write_frames(&mut send, &batch).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn ensure_binary(shared: Arc<NodeShared>, connection: quinn::Connection, binary: Arc<ShippedBinary>) -> Result<(), String> {
    let ask = |shared: &NodeShared| {
        let (tx, rx) = oneshot::channel();
        shared.binary_waiters.lock().expect("waiters lock").push(tx);
        rx
    };
    let answer = ask(&shared);
    shared.send_control([ToWorker::QueryBinary { hash: binary.hash }]);
    if answer.await.unwrap_or(false) {
        return Ok(());
    }
    tracing::info!(node = %shared.node_id, bytes = binary.len, "uploading executable");
    let answer = ask(&shared);
    let mut send = connection.open_uni().await.map_err(|e| format!("cannot open upload stream: {e}"))?;
    write_frames(&mut send, &[ToWorker::PutBinary { hash: binary.hash, len: binary.len }]).await.map_err(|e| e.to_string())?;
    let mut file = tokio::fs::File::open(&binary.path).await.map_err(|e| format!("cannot read {}: {e}", binary.path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use tokio::io::AsyncReadExt;
        let n = file.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        send.write_all(&buf[..n]).await.map_err(|e| format!("upload failed: {e}"))?;
    }
    send.finish().map_err(|e| e.to_string())?;
    if answer.await.unwrap_or(false) {
        Ok(())
    } else {
        Err(format!("the node rejected the uploaded executable {:?} (checksum or disk error; see the worker log)", binary.hash))
    }
}

impl Actor for Node {
    type Msg = NodeMsg;
    type State = NodeStateData;
    type Arguments = NodeArgs;

    async fn pre_start(&self, myself: ActorRef<NodeMsg>, args: NodeArgs) -> Result<NodeStateData, ActorProcessingErr> {
        *args.shared.node_actor.lock().expect("actor lock") = Some(myself);
        // The heartbeat and loss timer runs from the moment the node is requested: a worker that
        // never connects is lost after `lost_after` as well... but boot takes longer than that, so
        // the timer starts only once the worker connects (see Connected).
        Ok(NodeStateData {
            connect_timeout: args.connect_timeout,
            provider: args.provider,
            ctx: args.ctx,
            shared: args.shared,
            pool: args.pool,
            binary: args.binary,
            state: NodeState::Requested,
            facts: None,
            near_cpus: Vec::new(),
            address: "127.0.0.1".into(),
            cluster_addr: String::new(),
            timer: None,
            tasks: Vec::new(),
            upload_timeout: args.upload_timeout,
            tunnel: args.tunnel,
        })
    }

    async fn post_stop(&self, _myself: ActorRef<NodeMsg>, state: &mut NodeStateData) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        for t in state.tasks.drain(..) {
            t.abort();
        }
        *state.shared.control.lock().expect("control lock") = None;
        state.shared.lanes.lock().expect("lanes lock").clear();
        if let Some(c) = state.shared.connection.lock().expect("connection lock").take() {
            c.close(0u32.into(), b"node stopped");
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<NodeMsg>, message: NodeMsg, state: &mut NodeStateData) -> Result<(), ActorProcessingErr> {
        let shared = Arc::clone(&state.shared);
        match message {
            NodeMsg::Provisioned { instance_id } => {
                tracing::debug!(node = %shared.node_id, %instance_id, "instance provisioned");
                if state.state == NodeState::Requested {
                    state.state = NodeState::Booting;
                    if let Some((socket, path)) = &state.tunnel {
                        state.tasks.push(tokio::spawn(keep_tunnel(
                            Arc::clone(&shared),
                            Arc::clone(&state.provider),
                            state.ctx.clone(),
                            instance_id.clone(),
                            path.clone(),
                            Arc::clone(socket),
                        )));
                    }
                    state.tasks.push(tokio::spawn(watch_boot(
                        Arc::clone(&shared),
                        state.pool.clone(),
                        Arc::clone(&state.provider),
                        state.ctx.clone(),
                        instance_id,
                        state.connect_timeout,
                    )));
                }
            }
            NodeMsg::Connected { connection, send, recv, hello } => {
                if matches!(state.state, NodeState::Lost | NodeState::Terminated) {
                    connection.close(1u32.into(), b"node already replaced");
                    return Ok(());
                }
                shared.connected.store(true, std::sync::atomic::Ordering::Release);
                let now = shared.now();
                let (tx, rx) = mpsc::unbounded_channel();
                state.tasks.push(tokio::spawn(control_writer(send, rx)));
                *shared.control.lock().expect("control lock") = Some(tx);
                *shared.connection.lock().expect("connection lock") = Some(connection.clone());
                shared.lanes.lock().expect("lanes lock").clear();
                let facts = hello.worker.clone();
                let local = facts.memory_probe.as_ref().is_some_and(skyward_net::shm::Probe::matches);
                if local {
                    shared.busy.start();
                }
                let same_host = shared.shared_memory_args && local;
                shared.same_host.store(same_host, std::sync::atomic::Ordering::Release);
                if same_host {
                    shared.pool_same_host.store(true, std::sync::atomic::Ordering::Release);
                }
                let (transmit, events, accepted) = {
                    let mut session = shared.session.lock().expect("session lock");
                    session.connection_opened(now);
                    let accepted = session.handle_hello(hello, now);
                    let (t, e) = drain(&mut session);
                    (t, e, accepted)
                };
                shared.send_control(transmit);
                let reconnect = events.iter().any(|e| matches!(e, NodeEvent::Joined { reconnect: true, .. }));
                shared.route(events);
                if let Err(e) = accepted {
                    let _ = state.pool.cast(PoolMsg::NodeFailed { rank: shared.rank, error: format!("handshake refused: {e}") });
                    return Ok(());
                }
                state.address = connection.remote_address().ip().to_string();
                state.cluster_addr = connection.remote_address().to_string();
                // A node on this machine gets its lanes over its Unix socket: no QUIC packet, no
                // UDP, and one task wake-up per read instead of three.
                match facts.local_lanes.clone().filter(|_| local && shared.local_lanes) {
                    Some(at) => state.tasks.push(tokio::spawn(open_local_lanes(Arc::clone(&shared), connection.clone(), at))),
                    None => state.tasks.push(tokio::spawn(open_lanes(Arc::clone(&shared), connection.clone()))),
                }
                // Control stream reader: everything not on a task stream.
                let reader_shared = Arc::clone(&shared);
                let me = myself.clone();
                let connection_id = connection.stable_id();
                state.tasks.push(tokio::spawn(async move {
                    let mut recv = recv;
                    // The hello was read under a small limit; an authenticated worker gets the full one.
                    recv.set_max_frame(reader_shared.max_frame);
                    let reason = loop {
                        match recv.next::<ToCoordinator>("ToCoordinator").await {
                            Ok(Some(m)) => reader_shared.process(m),
                            Ok(None) => break "worker closed the control stream".to_string(),
                            Err(e) => break e.to_string(),
                        }
                    };
                    let _ = me.cast(NodeMsg::ControlClosed { connection_id, reason });
                }));
                if state.timer.is_none() {
                    let timer_shared = Arc::clone(&shared);
                    state.timer = Some(tokio::spawn(async move {
                        loop {
                            let deadline = timer_shared.session.lock().expect("session lock").poll_timeout();
                            let Some(deadline) = deadline else { return };
                            let now = timer_shared.now();
                            if deadline > now {
                                tokio::time::sleep(deadline - now).await;
                            }
                            let now = timer_shared.now();
                            let (transmit, events) = {
                                let mut session = timer_shared.session.lock().expect("session lock");
                                session.handle_timeout(now);
                                drain(&mut session)
                            };
                            timer_shared.send_control(transmit);
                            timer_shared.route(events);
                        }
                    }));
                }
                if reconnect {
                    tracing::info!(node = %shared.node_id, "worker reconnected; in-flight tasks resumed");
                    shared.cluster.node_connected(shared.rank, &shared.node_id);
                    return Ok(());
                }
                // First contact: refuse a binary this node cannot run, before uploading it.
                if let Err(e) = skyward_function::elf::check_compatible(&state.binary.facts, &facts.arch, &facts.libc) {
                    let _ = state.pool.cast(PoolMsg::NodeFailed { rank: shared.rank, error: e.to_string() });
                    return Ok(());
                }
                state.near_cpus = if local { near_cpus(&facts.cpus) } else { Vec::new() };
                state.facts = Some(facts);
                state.state = NodeState::Bootstrapping;
                let me = myself.clone();
                let binary = Arc::clone(&state.binary);
                let timeout = state.upload_timeout;
                let provider = Arc::clone(&state.provider);
                let ctx = state.ctx.clone();
                state.tasks.push(tokio::spawn(async move {
                    // Only now, after the compatibility check: let the provider place the binary by
                    // its own means (Local: the shared disk); otherwise it is uploaded below.
                    if let Err(e) = provider.stage_binary(&ctx, &binary.path, &binary.hash.to_hex()).await {
                        tracing::warn!(error = %e, "staging the executable failed; uploading it instead");
                    }
                    let result = match tokio::time::timeout(timeout, ensure_binary(shared, connection, binary)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("executable upload did not finish within {timeout:?}")),
                    };
                    let _ = me.cast(NodeMsg::BinaryReady(result));
                }));
            }
            NodeMsg::BinaryReady(result) => match result {
                Ok(()) if state.state == NodeState::Bootstrapping => {
                    state.state = NodeState::Ready;
                    let facts = state.facts.clone().unwrap_or_default();
                    let handle = NodeHandle {
                        rank: shared.rank,
                        slots: facts.concurrency,
                        address: state.address.clone(),
                        near_cpus: state.near_cpus.clone(),
                        shared: Arc::clone(&shared),
                    };
                    shared.cluster.node_ready(shared.rank, shared.node_id.clone(), state.cluster_addr.clone(), Arc::clone(&shared));
                    let _ = shared.tm.cast(TmMsg::NodeReady { node: handle });
                    let _ = state.pool.cast(PoolMsg::NodeReady { rank: shared.rank, facts });
                }
                Ok(()) => {}
                Err(error) => {
                    let _ = state.pool.cast(PoolMsg::NodeFailed { rank: shared.rank, error });
                }
            },
            NodeMsg::Lost { in_flight, silent_for } => {
                if state.state != NodeState::Lost {
                    tracing::warn!(node = %shared.node_id, rank = shared.rank, ?silent_for, tasks = in_flight.len(), "node lost; re-queueing its tasks");
                    state.state = NodeState::Lost;
                    let _ = shared.tm.cast(TmMsg::NodeLost { rank: shared.rank, in_flight });
                    let _ = state.pool.cast(PoolMsg::NodeLost { rank: shared.rank, node_id: shared.node_id.clone() });
                }
            }
            NodeMsg::ControlClosed { connection_id, reason } => {
                // Not yet lost: the worker may redial. The silence timer decides. A late notice
                // about an older connection must not clear the current one.
                tracing::debug!(node = %shared.node_id, %reason, "control stream closed");
                let mut current = shared.connection.lock().expect("connection lock");
                if current.as_ref().is_some_and(|c| c.stable_id() == connection_id) {
                    if let Some(c) = current.take() {
                        c.close(1u32.into(), b"control stream closed");
                    }
                    *shared.control.lock().expect("control lock") = None;
                    shared.lanes.lock().expect("lanes lock").clear();
                    shared.cluster.connection_lost(shared.rank);
                }
            }
            NodeMsg::Drain => {
                shared.send_control([ToWorker::Shutdown]);
                state.state = NodeState::Terminated;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One object per buffer however many tasks send it, a new one for another buffer with the
    /// same bytes, and at most `MAX_OBJECTS` alive (the rest travel inline).
    #[test]
    fn shared_arguments_are_made_once_per_buffer_and_bounded() {
        let args = bytes::Bytes::from(vec![7u8; 4096]);
        let a = shared_args(&args).expect("object");
        let b = shared_args(&args.clone()).expect("object");
        assert!(Arc::ptr_eq(&a, &b), "the same buffer got two objects");
        let copy = bytes::Bytes::from(args.to_vec());
        let c = shared_args(&copy).expect("object");
        assert!(!Arc::ptr_eq(&a, &c), "another buffer was handed this buffer's object");
        assert_eq!(&skyward_net::shm::map(&c.object.at()).expect("map")[..], &args[..]);
        drop((b, c));
        // Fill up to the bound; the next one is refused until one is closed.
        let buffers: Vec<bytes::Bytes> = (0..MAX_OBJECTS).map(|i| bytes::Bytes::from(vec![i as u8; 8])).collect();
        let mut held: Vec<Arc<SharedArgs>> = vec![a];
        for buffer in &buffers[1..] {
            held.push(shared_args(buffer).expect("object under the bound"));
        }
        assert_eq!(live_objects(), MAX_OBJECTS);
        let extra = bytes::Bytes::from_static(b"one too many");
        let err = shared_args(&extra).expect_err("over the bound");
        assert!(err.to_string().contains("open already"), "{err}");
        held.pop();
        assert!(shared_args(&extra).is_ok(), "a closed object did not make room");
        drop(held);
        assert_eq!(live_objects(), 0, "objects outlived their holders");
    }
}
