//! The two ends of a coordinator-worker connection as state machines.
//!
//! Input: `handle(message, now)`, `handle_timeout(now)` and calls for local actions (submit,
//! finish, ...). Output: `poll_transmit()` (messages to send) and `poll_event()` (things the glue
//! must act on). Neither end reads a clock or touches a socket.
//!
//! Delivery rules the two ends keep together:
//! - a task's outcome is produced once per task id: a duplicate `Submit` is answered from the
//!   worker's cache or ignored while the task runs, and a duplicate `Done` is dropped by the
//!   coordinator;
//! - whenever it accepts a hello (a reconnect, or a first handshake that tasks were submitted ahead
//!   of) the coordinator sends `Resume` for each task in flight and the worker answers from its
//!   cache, keeps running it, or says it does not know it (then the task is re-queued); until a
//!   running task's `Resume` arrives, the worker holds back its items and outcome;
//! - stream items carry a sequence number; the worker keeps unacknowledged items (bounded by the
//!   credit window) and sends them again after a resume, and the coordinator drops duplicates. A task
//!   that finished while disconnected keeps its unacknowledged items with its cached outcome, and a
//!   resume sends them before the outcome;
//! - credit lost with a connection is restored after a resume: `Resume` sets the worker's window back
//!   to `items_received`, and the coordinator follows it with a `Credit` for whatever it granted
//!   beyond that.

use crate::cache::ResultCache;
use crate::error::ProtocolError;
use crate::message::*;
use crate::{PROTOCOL_VERSION, Time};
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Worker side
// ---------------------------------------------------------------------------------------------

/// Settings of a [`WorkerSession`].
#[derive(Debug, Clone)]
pub struct WorkerSessionConfig {
    /// Pool the worker belongs to.
    pub pool_id: String,
    /// Node id given by the coordinator.
    pub node_id: String,
    /// Coordinator silence after which the worker ends its machine.
    pub instance_timeout: Duration,
    /// Result cache bound, entries.
    pub cache_entries: usize,
    /// Result cache bound, bytes.
    pub cache_bytes: usize,
}

/// What the worker glue must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// Start running a task.
    Start {
        /// Task id.
        task: TaskId,
        /// What to run.
        spec: Box<TaskSpec>,
    },
    /// Stop a running task (then call [`WorkerSession::finish`] with `Outcome::Cancelled`).
    Cancel {
        /// Task id.
        task: TaskId,
    },
    /// A streaming task got more credit; items blocked on it may go now.
    CreditAvailable {
        /// Task id.
        task: TaskId,
    },
    /// The coordinator accepted the handshake.
    Welcomed {
        /// Rank of this node.
        rank: u32,
    },
    /// The coordinator refused the handshake; exit.
    Refused {
        /// Why.
        reason: String,
    },
    /// The coordinator asked whether a binary is present; answer with [`WorkerSession::binary_status`].
    QueryBinary {
        /// Content hash.
        hash: BinaryHash,
    },
    /// The coordinator asked the worker to exit.
    Shutdown,
    /// The coordinator has been silent longer than the instance timeout: end the machine.
    CoordinatorSilent {
        /// How long it has been silent.
        silent_for: Duration,
    },
    /// New membership and placement of the worker cluster.
    ClusterView(std::sync::Arc<crate::cluster::ClusterView>),
    /// What changed since the view the worker holds.
    ClusterViewChange(std::sync::Arc<crate::cluster::ViewChange>),
    /// The coordinator asks for a collection operation.
    ClusterRequest {
        /// Request id.
        id: u64,
        /// The encoded operation.
        op: Vec<u8>,
    },
}

#[derive(Debug)]
struct RunningTask {
    /// Items may be sent while `next_seq < window_end`.
    window_end: u64,
    next_seq: u64,
    /// Items sent but not yet known to be received, oldest first.
    unacked: VecDeque<(u64, Vec<u8>)>,
    /// Set by [`WorkerSession::hello`] on a new connection: the task's items and outcome wait for
    /// its `Resume`, which says where the stream goes on. Sent earlier, a `Done` could reach the
    /// coordinator before the items lost with the old connection, and end the stream with a gap.
    awaiting_resume: bool,
}

/// Why an item could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendItemError {
    /// No credit left: wait for [`WorkerEvent::CreditAvailable`].
    NoCredit,
    /// The task is not running.
    UnknownTask,
}

/// The worker end of the protocol.
#[derive(Debug)]
pub struct WorkerSession {
    config: WorkerSessionConfig,
    facts: WorkerFacts,
    rank: Option<u32>,
    refused: bool,
    last_heard: Time,
    running: crate::IdMap<TaskId, RunningTask>,
    cache: ResultCache,
    /// Unacknowledged stream items of finished tasks, kept while their outcome is cached: a resume
    /// must deliver them before the outcome or the stream would have a gap.
    finished_items: crate::IdMap<TaskId, VecDeque<(u64, Vec<u8>)>>,
    transmit: VecDeque<ToCoordinator>,
    events: VecDeque<WorkerEvent>,
    silent_reported: bool,
}

impl WorkerSession {
    /// A session that has not yet connected; `now` starts the silence timer.
    pub fn new(config: WorkerSessionConfig, facts: WorkerFacts, now: Time) -> Self {
        let cache = ResultCache::new(config.cache_entries, config.cache_bytes);
        Self {
            config,
            facts,
            rank: None,
            refused: false,
            last_heard: now,
            running: Default::default(),
            cache,
            finished_items: Default::default(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            silent_reported: false,
        }
    }

    /// The handshake to send first on a (new) connection's control stream.
    ///
    /// Marks the start of a new connection: traffic of tasks already running waits for their
    /// `Resume`, which the coordinator sends once it accepted this hello.
    pub fn hello(&mut self) -> ToCoordinator {
        for running in self.running.values_mut() {
            running.awaiting_resume = true;
        }
        let mut held: Vec<TaskId> = self.running.keys().copied().chain(self.cache.tasks()).collect();
        held.sort();
        ToCoordinator::Hello(Hello {
            version: PROTOCOL_VERSION,
            pool_id: self.config.pool_id.clone(),
            node_id: self.config.node_id.clone(),
            worker: self.facts.clone(),
            held_tasks: held,
        })
    }

    /// Rank assigned by the coordinator, once welcomed.
    pub fn rank(&self) -> Option<u32> {
        self.rank
    }

    /// Feed one message from the coordinator.
    pub fn handle(&mut self, message: ToWorker, now: Time) -> Result<(), ProtocolError> {
        if self.refused {
            return Err(ProtocolError::Unexpected { what: message.name(), state: "refused" });
        }
        self.last_heard = self.last_heard.max(now);
        self.silent_reported = false;
        match message {
            ToWorker::Welcome { version, rank } => {
                if version != PROTOCOL_VERSION {
                    self.refused = true;
                    return Err(ProtocolError::VersionMismatch { peer: version, ours: PROTOCOL_VERSION });
                }
                self.rank = Some(rank);
                self.events.push_back(WorkerEvent::Welcomed { rank });
            }
            ToWorker::Refused { reason } => {
                self.refused = true;
                self.events.push_back(WorkerEvent::Refused { reason });
            }
            ToWorker::Heartbeat { seq } => self.transmit.push_back(ToCoordinator::HeartbeatAck { seq }),
            ToWorker::Submit { task, spec } => {
                if let Some(outcome) = self.cache.get(task) {
                    self.transmit.push_back(ToCoordinator::Done { task, outcome: outcome.clone() });
                } else if let Entry::Vacant(slot) = self.running.entry(task) {
                    let window = u64::from(spec.initial_credit);
                    slot.insert(RunningTask { window_end: window, next_seq: 0, unacked: VecDeque::new(), awaiting_resume: false });
                    self.events.push_back(WorkerEvent::Start { task, spec });
                }
            }
            ToWorker::Cancel { task } => {
                if self.running.contains_key(&task) {
                    self.events.push_back(WorkerEvent::Cancel { task });
                }
            }
            ToWorker::Credit { task, items, received } => {
                if let Some(running) = self.running.get_mut(&task) {
                    let was_blocked = running.next_seq >= running.window_end;
                    running.window_end = running.window_end.saturating_add(u64::from(items));
                    while running.unacked.front().is_some_and(|(seq, _)| *seq < received) {
                        running.unacked.pop_front();
                    }
                    if was_blocked && running.next_seq < running.window_end {
                        self.events.push_back(WorkerEvent::CreditAvailable { task });
                    }
                } else if let Some(items) = self.finished_items.get_mut(&task) {
                    while items.front().is_some_and(|(seq, _)| *seq < received) {
                        items.pop_front();
                    }
                }
            }
            ToWorker::Resume { task, items_received } => {
                if let Some(outcome) = self.cache.get(task) {
                    if let Some(items) = self.finished_items.get_mut(&task) {
                        while items.front().is_some_and(|(seq, _)| *seq < items_received) {
                            items.pop_front();
                        }
                        for (seq, payload) in items.iter() {
                            self.transmit.push_back(ToCoordinator::Item { task, seq: *seq, payload: payload.clone() });
                        }
                    }
                    self.transmit.push_back(ToCoordinator::Done { task, outcome: outcome.clone() });
                } else if let Some(running) = self.running.get_mut(&task) {
                    running.awaiting_resume = false;
                    while running.unacked.front().is_some_and(|(seq, _)| *seq < items_received) {
                        running.unacked.pop_front();
                    }
                    for (seq, payload) in &running.unacked {
                        self.transmit.push_back(ToCoordinator::Item { task, seq: *seq, payload: payload.clone() });
                    }
                    // Credit granted on the old connection may have been lost with it: fall back to
                    // what the coordinator has received; the `Credit` it sends after the `Resume`
                    // brings the window to exactly what it granted.
                    running.window_end = items_received;
                } else {
                    self.transmit.push_back(ToCoordinator::UnknownTask { task });
                }
            }
            ToWorker::Ack { task } => {
                self.cache.remove(task);
                self.finished_items.remove(&task);
            }
            ToWorker::QueryBinary { hash } => self.events.push_back(WorkerEvent::QueryBinary { hash }),
            // The glue handles binary uploads itself; the frame only opens the byte stream.
            ToWorker::PutBinary { .. } | ToWorker::OpenLane | ToWorker::OpenLocalLane { .. } => {}
            ToWorker::Shutdown => self.events.push_back(WorkerEvent::Shutdown),
            ToWorker::ClusterView(view) => self.events.push_back(WorkerEvent::ClusterView(view)),
            ToWorker::ClusterViewChange(change) => self.events.push_back(WorkerEvent::ClusterViewChange(change)),
            ToWorker::ClusterRequest { id, op } => self.events.push_back(WorkerEvent::ClusterRequest { id, op }),
        }
        Ok(())
    }

    /// Answer a [`WorkerEvent::QueryBinary`].
    pub fn binary_status(&mut self, hash: BinaryHash, present: bool) {
        self.transmit.push_back(ToCoordinator::BinaryStatus { hash, present });
    }

    /// Whether `task` may send another stream item now.
    pub fn has_credit(&self, task: TaskId) -> Result<bool, SendItemError> {
        let running = self.running.get(&task).ok_or(SendItemError::UnknownTask)?;
        Ok(running.next_seq < running.window_end)
    }

    /// Queue one stream item of a running task, if its credit allows.
    pub fn send_item(&mut self, task: TaskId, payload: Vec<u8>) -> Result<(), SendItemError> {
        let running = self.running.get_mut(&task).ok_or(SendItemError::UnknownTask)?;
        if running.next_seq >= running.window_end {
            return Err(SendItemError::NoCredit);
        }
        let seq = running.next_seq;
        running.next_seq += 1;
        running.unacked.push_back((seq, payload.clone()));
        if !running.awaiting_resume {
            self.transmit.push_back(ToCoordinator::Item { task, seq, payload });
        }
        Ok(())
    }

    /// Queue a line of command output.
    pub fn output(&mut self, task: TaskId, stream: OutputStream, line: String) {
        if self.running.contains_key(&task) {
            self.transmit.push_back(ToCoordinator::Output { task, stream, line });
        }
    }

    /// A task ended: cache its outcome and report it.
    pub fn finish(&mut self, task: TaskId, outcome: Outcome) {
        let Some(running) = self.running.remove(&task) else {
            return;
        };
        self.cache.insert(task, outcome.clone());
        if !running.unacked.is_empty() {
            self.finished_items.insert(task, running.unacked);
        }
        // Items of outcomes the cache has evicted can never be resumed: drop them with it.
        let cache = &self.cache;
        self.finished_items.retain(|t, _| cache.get(*t).is_some());
        if !running.awaiting_resume {
            self.transmit.push_back(ToCoordinator::Done { task, outcome });
        }
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<ToCoordinator> {
        self.transmit.pop_front()
    }

    /// Next thing for the glue to do.
    pub fn poll_event(&mut self) -> Option<WorkerEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Time {
        self.last_heard + self.config.instance_timeout
    }

    /// Advance time: reports [`WorkerEvent::CoordinatorSilent`] once the silence is too long.
    pub fn handle_timeout(&mut self, now: Time) {
        let silent_for = now.saturating_sub(self.last_heard);
        if silent_for >= self.config.instance_timeout && !self.silent_reported {
            self.silent_reported = true;
            self.events.push_back(WorkerEvent::CoordinatorSilent { silent_for });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator side
// ---------------------------------------------------------------------------------------------

/// Settings of a [`CoordinatorSession`].
#[derive(Debug, Clone)]
pub struct CoordinatorSessionConfig {
    /// The pool's id; a worker of another pool is refused.
    pub pool_id: String,
    /// Expected node id of the worker.
    pub node_id: String,
    /// Rank given to the node.
    pub rank: u32,
    /// How often to probe the worker.
    pub heartbeat_interval: Duration,
    /// Silence after which the node counts as lost.
    pub lost_after: Duration,
}

/// What happened on a node, for the coordinator glue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The handshake succeeded.
    Joined {
        /// Worker facts.
        facts: WorkerFacts,
        /// Whether this is a reconnect of a node that had joined before.
        reconnect: bool,
    },
    /// A line of command output.
    Output {
        /// Task id.
        task: TaskId,
        /// Which stream.
        stream: OutputStream,
        /// The line.
        line: String,
    },
    /// A stream item, delivered once and in order.
    Item {
        /// Task id.
        task: TaskId,
        /// Position.
        seq: u64,
        /// serde-encoded item.
        payload: Vec<u8>,
    },
    /// A task finished. Delivered once per task.
    Completed {
        /// Task id.
        task: TaskId,
        /// Outcome.
        outcome: Outcome,
    },
    /// The worker does not know the task (lost before it started); re-queue it.
    Forgotten {
        /// Task id.
        task: TaskId,
    },
    /// Answer to a binary query.
    BinaryStatus {
        /// Hash.
        hash: BinaryHash,
        /// Present on the node.
        present: bool,
    },
    /// The node's slots reached their backups under view `epoch`.
    ClusterSynced {
        /// The view's epoch.
        epoch: u64,
    },
    /// Answer to a collection operation the coordinator sent.
    ClusterReply {
        /// Request id.
        id: u64,
        /// The answer.
        result: Result<crate::cluster::Reply, crate::cluster::ClusterError>,
    },
    /// The worker has been silent too long. Every task in flight is listed, and the session no
    /// longer tracks them.
    Lost {
        /// Tasks that were in flight.
        in_flight: Vec<TaskId>,
        /// How long the worker was silent.
        silent_for: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoordState {
    AwaitingHello,
    Ready,
    Lost,
}

#[derive(Debug, Default)]
struct InFlight {
    items_received: u64,
    /// Stream credit given so far: the initial credit plus every grant.
    granted: u64,
}

/// The coordinator end of one node's connection.
#[derive(Debug)]
pub struct CoordinatorSession {
    config: CoordinatorSessionConfig,
    state: CoordState,
    joined_before: bool,
    last_heard: Time,
    next_heartbeat: Time,
    heartbeat_seq: u64,
    in_flight: crate::IdMap<TaskId, InFlight>,
    /// Acks held back (see [`CoordinatorSession::take_acks`]).
    acks: Vec<TaskId>,
    transmit: VecDeque<ToWorker>,
    events: VecDeque<NodeEvent>,
}

/// Held acks go out on their own once this many wait: the worker keeps each result until acked.
pub const HELD_ACKS_MAX: usize = 64;

/// A result this large is acked at once, so the worker's result cache does not hold it longer.
pub const ACK_AT_ONCE_BYTES: usize = 64 * 1024;

impl CoordinatorSession {
    /// A session waiting for the worker's hello; `now` starts the silence timer.
    pub fn new(config: CoordinatorSessionConfig, now: Time) -> Self {
        let next_heartbeat = now + config.heartbeat_interval;
        Self {
            config,
            state: CoordState::AwaitingHello,
            joined_before: false,
            last_heard: now,
            next_heartbeat,
            heartbeat_seq: 0,
            in_flight: Default::default(),
            acks: Vec::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Acks held back from `poll_transmit`, for the glue to write ahead of its next `Submit` on
    /// the same stream: a small result's ack then costs no message, packet or wake-up of its own.
    /// Acks not taken go out with the next heartbeat, a new connection, a large result, or once
    /// [`HELD_ACKS_MAX`] wait.
    pub fn take_acks(&mut self) -> impl Iterator<Item = ToWorker> + '_ {
        self.acks.drain(..).map(|task| ToWorker::Ack { task })
    }

    fn flush_acks(&mut self) {
        let acks: Vec<TaskId> = std::mem::take(&mut self.acks);
        self.transmit.extend(acks.into_iter().map(|task| ToWorker::Ack { task }));
    }

    /// Whether the handshake is done and the node not lost.
    pub fn is_ready(&self) -> bool {
        self.state == CoordState::Ready
    }

    /// Whether the node was declared lost.
    pub fn is_lost(&self) -> bool {
        self.state == CoordState::Lost
    }

    /// A new connection from the worker (first or after a reconnect): expect a hello again.
    pub fn connection_opened(&mut self, now: Time) {
        if self.state != CoordState::Lost {
            self.state = CoordState::AwaitingHello;
            self.last_heard = self.last_heard.max(now);
        }
    }

    /// Validate the worker's handshake. On success `Welcome` is queued, followed by a `Resume` for
    /// every task in flight (the glue sends them on the control stream).
    pub fn handle_hello(&mut self, hello: Hello, now: Time) -> Result<(), ProtocolError> {
        let refuse = |s: &mut Self, e: ProtocolError| {
            s.transmit.push_back(ToWorker::Refused { reason: e.to_string() });
            Err(e)
        };
        if hello.version != PROTOCOL_VERSION {
            return refuse(self, ProtocolError::VersionMismatch { peer: hello.version, ours: PROTOCOL_VERSION });
        }
        if hello.pool_id != self.config.pool_id {
            return refuse(self, ProtocolError::WrongPool { peer: hello.pool_id, ours: self.config.pool_id.clone() });
        }
        if hello.node_id != self.config.node_id {
            return refuse(
                self,
                ProtocolError::Malformed { what: "Hello", reason: format!("node id {} is not {}", hello.node_id, self.config.node_id) },
            );
        }
        if self.state == CoordState::Lost {
            return refuse(self, ProtocolError::Unexpected { what: "Hello", state: "lost" });
        }
        self.last_heard = self.last_heard.max(now);
        self.state = CoordState::Ready;
        self.transmit.push_back(ToWorker::Welcome { version: PROTOCOL_VERSION, rank: self.config.rank });
        self.flush_acks();
        let reconnect = self.joined_before;
        self.joined_before = true;
        // Every task in flight, not only after a reconnect: a task submitted before the first
        // handshake completed may have gone out on a connection that broke before it arrived.
        let mut tasks: Vec<(TaskId, u64, u64)> = self.in_flight.iter().map(|(t, f)| (*t, f.items_received, f.granted)).collect();
        tasks.sort();
        for (task, items_received, granted) in tasks {
            self.transmit.push_back(ToWorker::Resume { task, items_received });
            // `Resume` sets the worker's window back to `items_received` (a `Credit` may have been
            // lost with the old connection); restore what was granted beyond it.
            if granted > items_received {
                let items = u32::try_from(granted - items_received).unwrap_or(u32::MAX);
                self.transmit.push_back(ToWorker::Credit { task, items, received: items_received });
            }
        }
        // Tasks the worker still holds that are no longer in flight here (answered, cancelled,
        // or re-queued elsewhere while it was away): it may drop their results and stop them.
        for task in &hello.held_tasks {
            if !self.in_flight.contains_key(task) {
                self.transmit.push_back(ToWorker::Ack { task: *task });
                self.transmit.push_back(ToWorker::Cancel { task: *task });
            }
        }
        self.events.push_back(NodeEvent::Joined { facts: hello.worker, reconnect });
        Ok(())
    }

    /// Record a task as in flight and return the message that submits it.
    pub fn submit(&mut self, task: TaskId, spec: TaskSpec) -> ToWorker {
        self.in_flight.entry(task).or_insert_with(|| InFlight { items_received: 0, granted: u64::from(spec.initial_credit) });
        ToWorker::Submit { task, spec: Box::new(spec) }
    }

    /// Message that cancels a task.
    pub fn cancel(&mut self, task: TaskId) -> ToWorker {
        ToWorker::Cancel { task }
    }

    /// Stop tracking a task without an outcome (timed out or abandoned by the coordinator).
    pub fn forget(&mut self, task: TaskId) {
        self.in_flight.remove(&task);
    }

    /// Message granting `items` more stream credit to a task.
    pub fn grant(&mut self, task: TaskId, items: u32) -> ToWorker {
        let received = match self.in_flight.get_mut(&task) {
            Some(flight) => {
                flight.granted += u64::from(items);
                flight.items_received
            }
            None => 0,
        };
        ToWorker::Credit { task, items, received }
    }

    /// Feed one message from the worker.
    pub fn handle(&mut self, message: ToCoordinator, now: Time) -> Result<(), ProtocolError> {
        if self.state == CoordState::Lost {
            if let ToCoordinator::Hello(hello) = message {
                // The worker of a lost node dialled in again: refuse it so it exits instead of
                // running orphaned tasks until its instance timeout.
                return self.handle_hello(hello, now);
            }
            // Late traffic from a node already declared lost: its tasks were re-queued elsewhere.
            return Ok(());
        }
        self.last_heard = self.last_heard.max(now);
        match message {
            ToCoordinator::Hello(hello) => return self.handle_hello(hello, now),
            // Any message refreshes `last_heard`; the ack carries nothing else we use.
            ToCoordinator::HeartbeatAck { .. } => {}
            ToCoordinator::Output { task, stream, line } => {
                if self.in_flight.contains_key(&task) {
                    self.events.push_back(NodeEvent::Output { task, stream, line });
                }
            }
            ToCoordinator::Item { task, seq, payload } => {
                if let Some(flight) = self.in_flight.get_mut(&task)
                    && seq == flight.items_received
                {
                    flight.items_received += 1;
                    self.events.push_back(NodeEvent::Item { task, seq, payload });
                }
            }
            ToCoordinator::Done { task, outcome } => {
                // Ack even duplicates so the worker can drop its cached copy.
                self.acks.push(task);
                let large = matches!(&outcome, Outcome::Value(bytes) if bytes.len() >= ACK_AT_ONCE_BYTES);
                if large || self.acks.len() >= HELD_ACKS_MAX {
                    self.flush_acks();
                }
                if self.in_flight.remove(&task).is_some() {
                    self.events.push_back(NodeEvent::Completed { task, outcome });
                }
            }
            ToCoordinator::UnknownTask { task } => {
                if self.in_flight.remove(&task).is_some() {
                    self.events.push_back(NodeEvent::Forgotten { task });
                }
            }
            ToCoordinator::BinaryStatus { hash, present } => self.events.push_back(NodeEvent::BinaryStatus { hash, present }),
            ToCoordinator::ClusterReply { id, result } => self.events.push_back(NodeEvent::ClusterReply { id, result }),
            ToCoordinator::ClusterSynced { epoch } => self.events.push_back(NodeEvent::ClusterSynced { epoch }),
        }
        Ok(())
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<ToWorker> {
        self.transmit.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Time> {
        match self.state {
            CoordState::Lost => None,
            _ => Some(self.next_heartbeat.min(self.last_heard + self.config.lost_after)),
        }
    }

    /// Advance time: send heartbeats, declare the node lost after too long a silence.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.state == CoordState::Lost {
            return;
        }
        let silent_for = now.saturating_sub(self.last_heard);
        if silent_for >= self.config.lost_after {
            self.state = CoordState::Lost;
            let mut in_flight: Vec<TaskId> = self.in_flight.drain().map(|(t, _)| t).collect();
            in_flight.sort();
            self.transmit.clear();
            self.acks.clear();
            self.events.push_back(NodeEvent::Lost { in_flight, silent_for });
            return;
        }
        if now >= self.next_heartbeat {
            if self.state == CoordState::Ready {
                self.heartbeat_seq += 1;
                self.transmit.push_back(ToWorker::Heartbeat { seq: self.heartbeat_seq });
                self.flush_acks();
            }
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node "n" of pool "p", rank 0, waiting for its hello at time zero.
    fn session_for_node_n() -> CoordinatorSession {
        let config = CoordinatorSessionConfig {
            pool_id: "p".into(),
            node_id: "n".into(),
            rank: 0,
            heartbeat_interval: Duration::from_millis(500),
            lost_after: Duration::from_secs(3),
        };
        CoordinatorSession::new(config, Duration::ZERO)
    }

    fn hello_from_node_n(held_tasks: Vec<TaskId>) -> Hello {
        Hello { version: crate::PROTOCOL_VERSION, pool_id: "p".into(), node_id: "n".into(), worker: WorkerFacts::default(), held_tasks }
    }

    /// A small result's ack waits for the glue to take it (ahead of its next submit) or for the
    /// next heartbeat; a large result, or the 64th waiting ack, sends every waiting ack at once.
    #[test]
    fn acks_wait_for_the_next_submit_or_heartbeat_unless_large_or_many() {
        let mut session = session_for_node_n();
        session.handle_hello(hello_from_node_n(Vec::new()), Duration::ZERO).unwrap();
        let sent = |session: &mut CoordinatorSession| -> Vec<ToWorker> { std::iter::from_fn(|| session.poll_transmit()).collect() };
        let acks = |tasks: &[u64]| -> Vec<ToWorker> { tasks.iter().map(|t| ToWorker::Ack { task: TaskId(*t) }).collect() };
        let _ = sent(&mut session);
        let done = |session: &mut CoordinatorSession, task: u64, len: usize| {
            session.handle(ToCoordinator::Done { task: TaskId(task), outcome: Outcome::Value(vec![1; len]) }, Duration::ZERO).unwrap();
        };
        done(&mut session, 1, 10);
        assert_eq!(sent(&mut session), vec![], "a small result's ack went out on its own");
        assert_eq!(session.take_acks().collect::<Vec<_>>(), acks(&[1]));
        assert_eq!(session.take_acks().count(), 0, "an ack was taken twice");
        done(&mut session, 2, 10);
        done(&mut session, 3, ACK_AT_ONCE_BYTES);
        assert_eq!(sent(&mut session), acks(&[2, 3]), "a large result is acked at once, with the ones waiting");
        done(&mut session, 4, 10);
        session.handle_timeout(Duration::from_millis(500));
        assert_eq!(sent(&mut session), vec![ToWorker::Heartbeat { seq: 1 }, ToWorker::Ack { task: TaskId(4) }]);
        for task in 10..10 + HELD_ACKS_MAX as u64 - 1 {
            done(&mut session, task, 10);
        }
        assert_eq!(sent(&mut session), vec![]);
        done(&mut session, 99, 10);
        let mut all: Vec<u64> = (10..10 + HELD_ACKS_MAX as u64 - 1).collect();
        all.push(99);
        assert_eq!(sent(&mut session), acks(&all), "the 64th waiting ack did not send them all");
    }

    #[test]
    fn held_tasks_no_longer_in_flight_are_acked_and_cancelled_on_hello() {
        let mut session = session_for_node_n();
        let spec = TaskSpec {
            kind: TaskKind::Command(CommandSpec { argv: vec!["true".into()], env: Default::default(), cwd: None, timeout: None }),
            members: None,
            info: None,
            initial_credit: 0,
        };
        let _ = session.submit(TaskId(1), spec);
        session.handle_hello(hello_from_node_n(vec![TaskId(1), TaskId(9)]), Duration::ZERO).unwrap();
        let sent: Vec<ToWorker> = std::iter::from_fn(|| session.poll_transmit()).collect();
        assert!(sent.contains(&ToWorker::Resume { task: TaskId(1), items_received: 0 }), "{sent:?}");
        assert!(sent.contains(&ToWorker::Ack { task: TaskId(9) }) && sent.contains(&ToWorker::Cancel { task: TaskId(9) }), "{sent:?}");
        assert!(!sent.contains(&ToWorker::Cancel { task: TaskId(1) }), "a task in flight is resumed, not cancelled");
    }
}
