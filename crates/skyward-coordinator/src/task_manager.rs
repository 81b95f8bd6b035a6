//! `TaskManager`: slots per node, placement, timeouts, retries and re-queue on node loss.
//!
//! Supervision: the TaskManager supervises nothing; its parent is the `Pool`. If it fails, the
//! pool fails (every waiting caller gets `PoolClosed`), because task bookkeeping cannot be rebuilt.
//! That includes a panic while booking on a caller's or reader's thread (`TaskManagerRef::apply`).
//!
//! Hot path: the manager's book (its state) sits behind a short lock shared by the actor and
//! every [`TaskManagerRef`]. A submit is booked and dispatched on the caller's thread, and a
//! completion is booked (and the next queued task dispatched) on the thread that read it from
//! the node (a lane's or task stream's reader, or the control stream's): no mailbox hop on
//! either side of a round trip. Everything else (nodes joining and lost, cancels, timeouts,
//! credit, stats, close) goes through the actor's mailbox and is applied under the same lock, so
//! the book sees one order of events either way. When the actor ends, for whatever reason, its
//! state's guard closes the book: every waiting caller and every later submit gets `PoolClosed`.
//!
//! Delivery: each task's reply port is used once. A completion from a node that no longer owns the
//! task (it was re-queued after the node was lost) is dropped, so no result is delivered twice.

use crate::node::{NodeHandle, TaskSinks};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use skyward_proto::IdMap;
use skyward_proto::error::TaskError;
use skyward_proto::members::MembersLog;
use skyward_proto::message::{Outcome, TaskId, TaskKind};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// Where a task may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Any node with a free slot: round robin, except that an idle node pinned to the caller's
    /// CPU on this machine goes first (docs/architecture.md, "Near nodes").
    Any,
    /// Only the node with this rank.
    Rank(u32),
}

/// What a caller gets back: the result and the rank that produced it.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) result: Result<Vec<u8>, TaskError>,
    pub(crate) rank: Option<u32>,
}

/// Where a task's answer goes: the caller's own port (a [`TaskHandle`](crate::TaskHandle)), or
/// its slot in the sink of the `gather` it belongs to.
#[derive(Debug)]
pub(crate) enum Reply {
    One(oneshot::Sender<Done>),
    Gather(GatherReply),
}

impl From<oneshot::Sender<Done>> for Reply {
    fn from(port: oneshot::Sender<Done>) -> Self {
        Self::One(port)
    }
}

impl Reply {
    /// Deliver the answer (a caller that is gone is not an error).
    pub(crate) fn send(self, done: Done) {
        match self {
            Self::One(port) => {
                let _ = port.send(done);
            }
            Self::Gather(reply) => reply.answer(done),
        }
    }
}

/// The answers of one `gather`'s calls, in completion order. One sink for all of them, not a
/// port each: a reader that books a batch of answers wakes the gather once, and the gather takes
/// the batch with one lock, where a port per call cost a wake-up and a poll of the gather's set
/// of futures per answer (perf: most of the coordinator's time when the gather ran as a task on
/// a multi-thread runtime).
#[derive(Debug, Default)]
pub(crate) struct GatherSink {
    done: Mutex<Vec<(usize, Done)>>,
    waker: futures::task::AtomicWaker,
}

impl GatherSink {
    fn push(&self, index: usize, done: Done) {
        self.done.lock().expect("gather sink").push((index, done));
        self.waker.wake();
    }

    /// Move the answers that arrived into `into`; when there are none, the gather is woken by
    /// the next one.
    pub(crate) fn take(&self, cx: &mut std::task::Context<'_>, into: &mut VecDeque<(usize, Done)>) {
        self.waker.register(cx.waker());
        into.extend(self.done.lock().expect("gather sink").drain(..));
    }
}

/// Call `index` of a gather. Dropped without an answer (the book was dropped), it answers
/// `PoolClosed`, as a dropped port does for a [`TaskHandle`](crate::TaskHandle): the gather
/// never waits for an answer that cannot come.
#[derive(Debug)]
pub(crate) struct GatherReply {
    index: usize,
    sink: Option<Arc<GatherSink>>,
}

impl GatherReply {
    pub(crate) fn new(index: usize, sink: &Arc<GatherSink>) -> Self {
        Self { index, sink: Some(Arc::clone(sink)) }
    }

    fn answer(mut self, done: Done) {
        if let Some(sink) = self.sink.take() {
            sink.push(self.index, done);
        }
    }
}

impl Drop for GatherReply {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink.push(self.index, Done { result: Err(TaskError::PoolClosed), rank: None });
        }
    }
}

/// One task handed to the manager.
#[derive(Debug)]
pub(crate) struct TaskRequest {
    pub(crate) id: TaskId,
    pub(crate) kind: TaskKind,
    pub(crate) placement: Placement,
    /// The CPU the caller ran on when it submitted (`skyward_net::cpus::current`): an idle node
    /// pinned to it takes a `Placement::Any` task first (`TmState::near`).
    pub(crate) near_cpu: Option<u32>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) reply: Reply,
    pub(crate) sinks: TaskSinks,
    pub(crate) initial_credit: u32,
    /// The arguments already put in shared memory by the caller. Held, not read: while it is
    /// alive, the dispatch to a node on this machine finds it (`node::shared_args`) instead of
    /// the TaskManager writing the arguments.
    pub(crate) _prepared: Option<std::sync::Arc<crate::node::SharedArgs>>,
}

/// Messages of the task manager.
#[derive(Debug)]
pub(crate) enum TmMsg {
    Forgotten {
        task: TaskId,
        rank: u32,
    },
    NodeReady {
        node: NodeHandle,
    },
    NodeLost {
        rank: u32,
        in_flight: Vec<TaskId>,
    },
    /// The pool gave up on `rank` (replacement limit): tasks pinned to it fail.
    RankRetired {
        rank: u32,
    },
    Cancel {
        task: TaskId,
    },
    TimedOut {
        task: TaskId,
        after: Duration,
    },
    Credit {
        task: TaskId,
        items: u32,
    },
    Ranks(RpcReplyPort<Vec<u32>>),
    Stats(RpcReplyPort<TaskStats>),
    Close,
    /// The bookkeeping panicked on a caller's or reader's thread: fail, so the pool fails.
    Failed,
}

/// Counters for progress and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Tasks waiting for a slot.
    pub queued: usize,
    /// Tasks running on nodes.
    pub running: usize,
    /// Tasks finished (any outcome).
    pub finished: u64,
    /// Times a task was re-queued after its node was lost.
    pub requeued: u64,
    /// Ready nodes.
    pub ready_nodes: usize,
    /// Dispatches whose arguments went through shared memory (nodes on this machine).
    pub shared_memory_args: u64,
    /// Dispatches written on a local lane (a Unix socket to a node on this machine,
    /// `Options::local_lanes`) instead of a QUIC stream.
    pub local_lane_dispatches: u64,
    /// Shared-memory argument objects held open now (one per argument buffer in flight; each
    /// is closed when its last task is done).
    pub shared_memory_objects: usize,
    /// Busy-poll threads running (`Options::busy_poll_cpus`; 0 until a node proved to be on
    /// this machine).
    pub busy_poll_threads: usize,
    /// CPU time the busy-poll threads spent spinning so far, all together.
    pub busy_poll_spun: std::time::Duration,
}

struct Slot {
    node: NodeHandle,
    capacity: u32,
    busy: u32,
}

struct Entry {
    request: Box<TaskRequest>,
    attempts: u32,
    running_on: Option<u32>,
    timer: Option<tokio::task::AbortHandle>,
}

pub(crate) struct TaskManager;

pub(crate) struct TmArgs {
    pub(crate) max_retries: u32,
}

/// The ranks with a free slot, taken round robin in rank order. Kept up to date on every slot
/// change (`TmState::update_free`), so a pick is O(log nodes): a scan of every node per dispatch
/// was the coordinator's largest user of CPU with 1,000 nodes of one slot each (11% of its
/// samples), since nearly all of them are full whenever one frees up.
#[derive(Debug, Default)]
struct RoundRobin {
    free: std::collections::BTreeSet<u32>,
    last: Option<u32>,
}

impl RoundRobin {
    /// Say whether `rank` has a free slot.
    fn set(&mut self, rank: u32, has_room: bool) {
        if has_room {
            self.free.insert(rank);
        } else {
            self.free.remove(&rank);
        }
    }

    /// The next rank with a free slot after the last one taken (wrapping around).
    fn next(&mut self) -> Option<u32> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after = self.last.and_then(|last| self.free.range((Excluded(last), Unbounded)).next().copied());
        let rank = after.or_else(|| self.free.first().copied())?;
        self.last = Some(rank);
        Some(rank)
    }

    fn clear(&mut self) {
        self.free.clear();
        self.last = None;
    }
}

/// Ranks by the CPU each is pinned to (a rank under each of its CPUs, once).
#[derive(Debug, Default)]
struct NearIndex {
    by_cpu: IdMap<u32, Vec<u32>>,
}

impl NearIndex {
    /// `rank` is pinned to `cpus` from now on (none: it is not indexed any more).
    fn set(&mut self, rank: u32, cpus: &[u32]) {
        self.by_cpu.retain(|_, ranks| {
            ranks.retain(|&r| r != rank);
            !ranks.is_empty()
        });
        for &cpu in cpus {
            let ranks = self.by_cpu.entry(cpu).or_default();
            if !ranks.contains(&rank) {
                ranks.push(rank);
            }
        }
    }

    /// The ranks pinned to `cpu`, in the order they were indexed.
    fn at(&self, cpu: u32) -> impl Iterator<Item = u32> + '_ {
        self.by_cpu.get(&cpu).into_iter().flatten().copied()
    }

    fn clear(&mut self) {
        self.by_cpu.clear();
    }
}

struct TmState {
    nodes: IdMap<u32, Slot>,
    /// Ready ranks with a free slot (round robin for `Placement::Any`).
    free: RoundRobin,
    /// Ready nodes on this machine pinned to a few of its CPUs (`NodeHandle::near_cpus`), by
    /// CPU. A `Placement::Any` task submitted from one of those CPUs goes to such a node when it
    /// is idle, ahead of the round robin: a sync call's hops then stay on one CPU.
    near: NearIndex,
    /// Tasks for any node, in arrival order. Cancelled ids are skipped lazily.
    queue: VecDeque<TaskId>,
    /// Tasks pinned to a rank, per rank.
    pinned: IdMap<u32, VecDeque<TaskId>>,
    tasks: IdMap<TaskId, Entry>,
    max_retries: u32,
    /// Ready nodes' addresses by rank, numbered by epoch, with recent changes: streams get what
    /// changed since the task before (see `skyward_proto::members`).
    members: MembersLog,
    stats: TaskStats,
    closed: bool,
    /// Answers for callers, sent once the lock is released (`BookGuard`): a caller woken while
    /// the book is still locked would find it locked when it submits its next call.
    outbox: Vec<(Reply, Done)>,
}

impl TmState {
    /// The rank a task goes to now, if any has room: its own rank, or for `Placement::Any` an
    /// idle node pinned to `near_cpu` (the caller's CPU) before the round robin.
    fn pick(&mut self, placement: Placement, near_cpu: Option<u32>) -> Option<u32> {
        match placement {
            Placement::Rank(r) => self.nodes.get(&r).filter(|s| s.busy < s.capacity).map(|_| r),
            Placement::Any => near_cpu.and_then(|cpu| self.idle_near(cpu)).or_else(|| self.free.next()),
        }
    }

    /// A ready node pinned to `cpu` with nothing running and no task pinned to it waiting (a
    /// waiting one gets the slot first, by the next drain).
    fn idle_near(&self, cpu: u32) -> Option<u32> {
        self.near.at(cpu).find(|rank| self.nodes.get(rank).is_some_and(|s| s.busy == 0) && !self.pinned.contains_key(rank))
    }

    /// `rank`'s busy count changed (or it came or went): keep `free` in step.
    fn update_free(&mut self, rank: u32) {
        let has_room = self.nodes.get(&rank).is_some_and(|s| s.busy < s.capacity);
        self.free.set(rank, has_room);
    }

    /// Whether `free` holds exactly the ready ranks with room (checked in debug builds, where
    /// every test that runs tasks goes through it).
    fn free_in_step(&self) -> bool {
        let with_room = self.nodes.iter().filter(|(_, s)| s.busy < s.capacity).map(|(rank, _)| *rank);
        with_room.collect::<std::collections::BTreeSet<u32>>() == self.free.free
    }

    fn finish(&mut self, task: TaskId, result: Result<Vec<u8>, TaskError>) {
        if let Some(entry) = self.tasks.remove(&task) {
            if let Some(rank) = entry.running_on
                && let Some(slot) = self.nodes.get_mut(&rank)
            {
                slot.busy = slot.busy.saturating_sub(1);
                slot.node.forget(task);
                self.update_free(rank);
            }
            if let Some(timer) = entry.timer {
                timer.abort();
            }
            self.stats.finished += 1;
            self.outbox.push((entry.request.reply, Done { result, rank: entry.running_on }));
        }
    }

    fn enqueue_back(&mut self, task: TaskId, placement: Placement) {
        match placement {
            Placement::Any => self.queue.push_back(task),
            Placement::Rank(r) => self.pinned.entry(r).or_default().push_back(task),
        }
    }

    fn enqueue_front(&mut self, task: TaskId, placement: Placement) {
        match placement {
            Placement::Any => self.queue.push_front(task),
            Placement::Rank(r) => self.pinned.entry(r).or_default().push_front(task),
        }
    }

    fn is_waiting(&self, task: TaskId) -> bool {
        self.tasks.get(&task).is_some_and(|e| e.running_on.is_none())
    }

    /// Dispatch queued tasks while slots are free: pinned tasks on their rank first, then the
    /// shared queue in order. Each pick is O(log nodes); nothing is copied.
    fn drain(&mut self) {
        let ranks: Vec<u32> = self.pinned.keys().copied().collect();
        for rank in ranks {
            while self.nodes.get(&rank).is_some_and(|s| s.busy < s.capacity) {
                let Some(task) = self.pinned.get_mut(&rank).and_then(VecDeque::pop_front) else { break };
                if self.is_waiting(task) {
                    self.dispatch(task, rank);
                }
            }
            if self.pinned.get(&rank).is_some_and(VecDeque::is_empty) {
                self.pinned.remove(&rank);
            }
        }
        while let Some(&task) = self.queue.front() {
            if !self.is_waiting(task) {
                self.queue.pop_front();
                continue;
            }
            let Some(rank) = self.pick(Placement::Any, None) else { break };
            self.queue.pop_front();
            self.dispatch(task, rank);
        }
        debug_assert!(self.free_in_step(), "the ranks with room are out of step with the slots");
    }

    /// Fail every task pinned to `rank` (the rank will not come back).
    fn retire_rank(&mut self, rank: u32) {
        if let Some(tasks) = self.pinned.remove(&rank) {
            for task in tasks {
                if self.is_waiting(task) {
                    let attempts = self.tasks.get(&task).map_or(0, |e| e.attempts);
                    self.finish(task, Err(TaskError::NodesLost { attempts }));
                }
            }
        }
    }

    fn dispatch(&mut self, task: TaskId, rank: u32) {
        let slot = self.nodes.get_mut(&rank).expect("picked rank exists");
        let entry = self.tasks.get_mut(&task).expect("queued task exists");
        slot.busy += 1;
        let has_room = slot.busy < slot.capacity;
        entry.running_on = Some(rank);
        entry.attempts += 1;
        let (kind, credit, sinks) = (entry.request.kind.clone(), entry.request.initial_credit, entry.request.sinks.clone());
        self.free.set(rank, has_room);
        let members = &self.members;
        let route = self.nodes[&rank].node.dispatch(task, kind, credit, sinks, members.epoch(), &|since| members.update_for(rank, since));
        self.stats.shared_memory_args += u64::from(route.shared_memory);
        self.stats.local_lane_dispatches += u64::from(route.local_lane);
    }

    /// The counters, with what is queued, running and held in shared memory now.
    fn stats(&self) -> TaskStats {
        let mut stats = self.stats.clone();
        stats.queued = self.tasks.values().filter(|e| e.running_on.is_none()).count();
        stats.running = self.tasks.values().filter(|e| e.running_on.is_some()).count();
        let mut objects = std::collections::HashSet::new();
        self.nodes.values().for_each(|slot| slot.node.shared_memory_objects(&mut objects));
        stats.shared_memory_objects = objects.len();
        stats
    }

    /// Put a task whose node was lost back in line. The caller has already released its slot.
    fn requeue(&mut self, task: TaskId) {
        let max = self.max_retries;
        let Some(entry) = self.tasks.get_mut(&task) else { return };
        entry.running_on = None;
        // A stream that already delivered items cannot restart from its first item elsewhere
        // without the consumer seeing them twice: it fails instead of being retried.
        let streaming = entry.request.sinks.items.is_some();
        if entry.attempts > max || streaming {
            let attempts = entry.attempts;
            self.finish(task, Err(TaskError::NodesLost { attempts }));
            return;
        }
        let placement = entry.request.placement;
        self.stats.requeued += 1;
        // Re-queued work goes first: it has waited longest.
        self.enqueue_front(task, placement);
    }
}

impl TmState {
    fn new(max_retries: u32) -> Self {
        TmState {
            nodes: IdMap::default(),
            free: RoundRobin::default(),
            near: NearIndex::default(),
            queue: VecDeque::new(),
            pinned: IdMap::default(),
            tasks: IdMap::default(),
            max_retries,
            members: MembersLog::default(),
            stats: TaskStats::default(),
            closed: false,
            outbox: Vec::new(),
        }
    }

    /// Book a new task and dispatch it when a slot is free and nothing waits ahead of it.
    fn submit(&mut self, request: Box<TaskRequest>, me: &ActorRef<TmMsg>, runtime: &tokio::runtime::Handle) {
        if self.closed {
            self.outbox.push((request.reply, Done { result: Err(TaskError::PoolClosed), rank: None }));
            return;
        }
        let id = request.id;
        let timer = request.timeout.map(|after| {
            let me = me.clone();
            runtime
                .spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = me.cast(TmMsg::TimedOut { task: id, after });
                })
                .abort_handle()
        });
        let (placement, near_cpu) = (request.placement, request.near_cpu);
        self.tasks.insert(id, Entry { request, attempts: 0, running_on: None, timer });
        let nothing_ahead = match placement {
            Placement::Any => self.queue.is_empty(),
            Placement::Rank(r) => !self.pinned.contains_key(&r),
        };
        if nothing_ahead && let Some(rank) = self.pick(placement, near_cpu) {
            self.dispatch(id, rank);
        } else {
            self.enqueue_back(id, placement);
        }
    }

    /// A node finished `task`: answer its caller (unless another node owns it now). Returns
    /// whether queued tasks wait for the freed slot (`drain`, under the lock taken next).
    fn completed(&mut self, task: TaskId, rank: u32, outcome: Outcome) -> bool {
        let owned = self.tasks.get(&task).is_some_and(|e| e.running_on == Some(rank));
        if owned {
            let result = match outcome {
                Outcome::Value(bytes) => Ok(bytes),
                Outcome::Error(e) => Err(TaskError::Remote(e)),
                Outcome::Cancelled => Err(TaskError::Cancelled),
            };
            self.finish(task, result);
        }
        owned && !(self.queue.is_empty() && self.pinned.is_empty())
    }

    /// No more tasks: every waiting caller gets `PoolClosed`, and so does every later submit.
    /// The nodes are let go too (each node holds a handle on this book: keeping them would keep
    /// the pool's node state alive after its shutdown).
    fn close(&mut self) {
        self.closed = true;
        let tasks: Vec<TaskId> = self.tasks.keys().copied().collect();
        for task in tasks {
            self.finish(task, Err(TaskError::PoolClosed));
        }
        self.queue.clear();
        self.pinned.clear();
        self.nodes.clear();
        self.free.clear();
        self.near.clear();
        self.members = MembersLog::default();
    }
}

/// The task manager's state, shared by its actor and the hot path (see the module doc).
pub(crate) struct Book {
    state: Mutex<TmState>,
    /// The pool's runtime: timers and task streams started from a caller's thread run there.
    runtime: tokio::runtime::Handle,
}

impl Book {
    /// The state. After a panic under the lock the bookkeeping cannot be trusted: the book is
    /// closed (every waiting caller and every later submit gets `PoolClosed`).
    fn lock(&self) -> BookGuard<'_> {
        let state = self.state.lock().unwrap_or_else(|poisoned| {
            let mut state = poisoned.into_inner();
            if !state.closed {
                state.close();
            }
            state
        });
        BookGuard(Some(state))
    }
}

/// The locked book. Dropping it releases the lock first and then answers the callers whose
/// tasks ended meanwhile. Why: a sync caller answered under the lock woke on the other CPU,
/// submitted its next call at once and found the book still locked by the reader that answered
/// it (spin, then sleep on the futex, then another wake-up when the reader unlocked): a
/// contended lock and an extra context switch on every round trip.
struct BookGuard<'a>(Option<MutexGuard<'a, TmState>>);

impl std::ops::Deref for BookGuard<'_> {
    type Target = TmState;

    fn deref(&self) -> &TmState {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for BookGuard<'_> {
    fn deref_mut(&mut self) -> &mut TmState {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for BookGuard<'_> {
    /// Also while unwinding from a panic under the lock: the answers taken are complete ones.
    fn drop(&mut self) {
        let Some(mut state) = self.0.take() else { return };
        let outbox = std::mem::take(&mut state.outbox);
        drop(state);
        for (reply, done) in outbox {
            reply.send(done);
        }
    }
}

/// A handle on the task manager: its actor for the rare events, its book for the hot path.
#[derive(Clone)]
pub(crate) struct TaskManagerRef {
    actor: ActorRef<TmMsg>,
    book: Arc<Book>,
}

impl TaskManagerRef {
    /// Start the task manager on the current runtime.
    pub(crate) async fn spawn(args: TmArgs) -> Result<Self, ractor::SpawnErr> {
        let book = Arc::new(Book { state: Mutex::new(TmState::new(args.max_retries)), runtime: tokio::runtime::Handle::current() });
        let (actor, _) = Actor::spawn(None, TaskManager, Arc::clone(&book)).await?;
        Ok(Self { actor, book })
    }

    /// Book and dispatch a task on this thread (writes its submit on a lane when it is small).
    pub(crate) fn submit(&self, request: Box<TaskRequest>) {
        self.apply(|state| state.submit(request, &self.actor, &self.book.runtime));
    }

    /// Book a node's answers (taken from `done`) on this thread; dispatches queued tasks into the
    /// freed slots. The callers are answered first, between the two: a dispatch may write a large
    /// argument into shared memory, and the answers should not wait for it.
    pub(crate) fn completed_all(&self, rank: u32, done: &mut Vec<(TaskId, Outcome)>) {
        if done.is_empty() {
            return;
        }
        let mut queued = false;
        self.apply(|state| {
            for (task, outcome) in done.drain(..) {
                queued |= state.completed(task, rank, outcome);
            }
        });
        if queued {
            self.apply(TmState::drain);
        }
    }

    /// Apply an event to the book on this thread. A caller outside any runtime (a plain thread)
    /// still dispatches: a large task's stream and a timer start on the pool's runtime. A panic
    /// here is a bug in the bookkeeping: the book is closed and the actor fails, which fails the
    /// pool (as a panic in the actor's own handler would), instead of unwinding into the caller
    /// or a lane reader.
    fn apply(&self, event: impl FnOnce(&mut TmState)) {
        let _runtime = self.book.runtime.enter();
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut state = self.book.lock();
            event(&mut state);
            debug_assert!(state.free_in_step(), "the ranks with room are out of step with the slots");
        }));
        if applied.is_err() {
            tracing::error!("the task manager's bookkeeping panicked; the pool fails");
            // The lock is poisoned: taking it closes the book.
            drop(self.book.lock());
            let _ = self.actor.cast(TmMsg::Failed);
        }
    }

    /// Send one of the actor's messages.
    pub(crate) fn cast(&self, message: TmMsg) -> Result<(), ractor::MessagingErr<TmMsg>> {
        self.actor.cast(message)
    }

    /// The actor (calls, supervision links).
    pub(crate) fn actor(&self) -> &ActorRef<TmMsg> {
        &self.actor
    }

    /// Stop the actor; its guard closes the book.
    pub(crate) fn stop(&self) {
        self.actor.stop(None);
    }
}

/// The actor's state: the shared book, closed when the actor ends however it ends (stopped,
/// failed, or panicked in a handler), since ractor drops its state then.
pub(crate) struct TmActorState {
    book: Arc<Book>,
}

impl Drop for TmActorState {
    fn drop(&mut self) {
        self.book.lock().close();
    }
}

impl Actor for TaskManager {
    type Msg = TmMsg;
    type State = TmActorState;
    type Arguments = Arc<Book>;

    async fn pre_start(&self, _myself: ActorRef<TmMsg>, book: Arc<Book>) -> Result<TmActorState, ActorProcessingErr> {
        Ok(TmActorState { book })
    }

    async fn handle(&self, _myself: ActorRef<TmMsg>, message: TmMsg, actor: &mut TmActorState) -> Result<(), ActorProcessingErr> {
        let mut guard = actor.book.lock();
        let state = &mut *guard;
        match message {
            TmMsg::Forgotten { task, rank } => {
                if state.tasks.get(&task).is_some_and(|e| e.running_on == Some(rank)) {
                    if let Some(slot) = state.nodes.get_mut(&rank) {
                        slot.busy = slot.busy.saturating_sub(1);
                        slot.node.forget(task);
                    }
                    state.update_free(rank);
                    state.requeue(task);
                    state.drain();
                }
            }
            TmMsg::RankRetired { rank } => {
                state.retire_rank(rank);
            }
            // A closed book keeps no node (see `close`).
            TmMsg::NodeReady { .. } if state.closed => {}
            TmMsg::NodeReady { node } => {
                let rank = node.rank;
                let capacity = node.slots.max(1);
                state.near.set(rank, &node.near_cpus);
                state.nodes.insert(rank, Slot { node, capacity, busy: 0 });
                state.update_free(rank);
                // A rank that comes back may have a new address.
                let address = state.nodes[&rank].node.address.clone();
                state.members.set(rank, address);
                state.stats.ready_nodes = state.nodes.len();
                state.drain();
            }
            TmMsg::NodeLost { rank, in_flight } => {
                state.near.set(rank, &[]);
                if let Some(slot) = state.nodes.remove(&rank) {
                    // Its tasks run elsewhere from now on, with their own objects.
                    slot.node.release_shared_memory();
                }
                state.update_free(rank);
                state.members.remove(rank);
                state.stats.ready_nodes = state.nodes.len();
                let mut owned: Vec<TaskId> = state.tasks.iter().filter(|(_, e)| e.running_on == Some(rank)).map(|(t, _)| *t).collect();
                owned.extend(in_flight);
                owned.sort_unstable();
                owned.dedup();
                for task in owned.into_iter().rev() {
                    state.requeue(task);
                }
                state.drain();
            }
            TmMsg::Cancel { task } => {
                if let Some(rank) = state.tasks.get(&task).and_then(|e| e.running_on)
                    && let Some(slot) = state.nodes.get(&rank)
                {
                    slot.node.cancel(task);
                }
                state.finish(task, Err(TaskError::Cancelled));
                state.drain();
            }
            TmMsg::TimedOut { task, after } => {
                if let Some(rank) = state.tasks.get(&task).and_then(|e| e.running_on)
                    && let Some(slot) = state.nodes.get(&rank)
                {
                    slot.node.cancel(task);
                }
                state.finish(task, Err(TaskError::Timeout(after)));
                state.drain();
            }
            TmMsg::Credit { task, items } => {
                if let Some(rank) = state.tasks.get(&task).and_then(|e| e.running_on)
                    && let Some(slot) = state.nodes.get(&rank)
                {
                    slot.node.grant(task, items);
                }
            }
            // Questions are answered after the lock is released (see `BookGuard`): a
            // broadcast's caller submits as soon as it has the ranks.
            TmMsg::Ranks(reply) => {
                let mut order: Vec<u32> = state.nodes.keys().copied().collect();
                order.sort_unstable();
                drop(guard);
                let _ = reply.send(order);
            }
            TmMsg::Stats(reply) => {
                let stats = state.stats();
                drop(guard);
                let _ = reply.send(stats);
            }
            TmMsg::Close => state.close(),
            TmMsg::Failed => return Err("the task manager's bookkeeping panicked on the hot path".into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyward_proto::message::{Args, BinaryHash};

    fn request(id: u64) -> (Box<TaskRequest>, oneshot::Receiver<Done>) {
        let (reply, rx) = oneshot::channel();
        let kind =
            TaskKind::Function { name: "f".into(), binary: BinaryHash([0; 32]), args: Args::Inline(bytes::Bytes::new()), streaming: false };
        let request = TaskRequest {
            id: TaskId(id),
            kind,
            placement: Placement::Any,
            near_cpu: None,
            timeout: None,
            reply: reply.into(),
            sinks: TaskSinks::default(),
            initial_credit: 0,
            _prepared: None,
        };
        (Box::new(request), rx)
    }

    #[test]
    fn free_slots_are_taken_round_robin_in_rank_order() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.next(), None, "no node yet");
        for rank in [3, 0, 7] {
            rr.set(rank, true);
        }
        let picks: Vec<_> = (0..4).map(|_| rr.next()).collect();
        assert_eq!(picks, [Some(0), Some(3), Some(7), Some(0)]);
        // Full ranks are skipped; the turn goes on from the last one taken.
        rr.set(3, false);
        assert_eq!(rr.next(), Some(7), "after 0 comes 7 while 3 is full");
        rr.set(3, true);
        rr.set(5, true);
        assert_eq!(rr.next(), Some(0), "wraps around");
        assert_eq!(rr.next(), Some(3));
        assert_eq!(rr.next(), Some(5), "a rank that joined takes its turn");
        for rank in [0, 3, 5, 7] {
            rr.set(rank, false);
        }
        assert_eq!(rr.next(), None, "every node full");
        rr.set(u32::MAX, true);
        assert_eq!(rr.next(), Some(u32::MAX));
        assert_eq!(rr.next(), Some(u32::MAX), "the highest rank wraps to itself");
        rr.clear();
        assert_eq!(rr.next(), None);
    }

    #[test]
    fn the_near_index_holds_each_rank_once_under_its_own_cpus() {
        let mut near = NearIndex::default();
        near.set(0, &[0, 1]);
        near.set(1, &[2]);
        near.set(2, &[0]);
        let at = |near: &NearIndex, cpu| near.at(cpu).collect::<Vec<_>>();
        assert_eq!((at(&near, 0), at(&near, 1), at(&near, 2), at(&near, 3)), (vec![0, 2], vec![0], vec![1], vec![]));
        // Ready again on other CPUs (a replacement): only there, once.
        near.set(0, &[2, 2]);
        assert_eq!((at(&near, 0), at(&near, 1), at(&near, 2)), (vec![2], vec![], vec![1, 0]));
        // Lost: nowhere.
        near.set(1, &[]);
        assert_eq!((at(&near, 2), near.by_cpu.len()), (vec![0], 2));
        near.clear();
        assert!(near.by_cpu.is_empty());
    }

    #[test]
    fn callers_are_answered_only_once_the_book_is_unlocked() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let book = Book { state: Mutex::new(TmState::new(0)), runtime: runtime.handle().clone() };
        let mut waiting = Vec::new();
        {
            let mut state = book.lock();
            for id in 1..=3 {
                let (request, rx) = request(id);
                state.tasks.insert(TaskId(id), Entry { request, attempts: 0, running_on: None, timer: None });
                state.queue.push_back(TaskId(id));
                waiting.push(rx);
            }
        }
        {
            // One task ends (cancelled), then the pool closes: the others get `PoolClosed`.
            let mut state = book.lock();
            state.finish(TaskId(2), Err(TaskError::Cancelled));
            state.close();
            assert!(book.state.try_lock().is_err(), "the book is locked here");
            for rx in &mut waiting {
                assert!(rx.try_recv().is_err(), "a caller was answered while the book was locked");
            }
        }
        let answers: Vec<Done> = waiting.iter_mut().map(|rx| rx.try_recv().expect("answered once the lock was released")).collect();
        assert!(matches!(answers[1].result, Err(TaskError::Cancelled)), "{answers:?}");
        assert!(answers.iter().enumerate().all(|(i, d)| i == 1 || matches!(d.result, Err(TaskError::PoolClosed))), "{answers:?}");
    }

    /// A gather's answers: each call's lands once under its index, a batch wakes the gather and
    /// is taken whole, and a reply dropped unanswered (its book dropped) answers `PoolClosed`.
    #[test]
    fn a_gather_sink_takes_a_batch_of_answers_and_a_dropped_reply_answers_pool_closed() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = std::task::Context::from_waker(&waker);
        let sink = Arc::new(GatherSink::default());
        let mut taken = VecDeque::new();
        sink.take(&mut cx, &mut taken);
        assert!(taken.is_empty(), "answers before any call was answered");
        let replies: Vec<Reply> = (0..3).map(|i| Reply::Gather(GatherReply::new(i, &sink))).collect();
        let mut replies = replies.into_iter();
        replies.next().expect("0").send(Done { result: Ok(vec![7]), rank: Some(1) });
        replies.next().expect("1").send(Done { result: Err(TaskError::Cancelled), rank: None });
        let woken = count.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(woken, 1, "a batch of answers woke the gather {woken} times");
        sink.take(&mut cx, &mut taken);
        let got: Vec<usize> = taken.iter().map(|(i, _)| *i).collect();
        assert_eq!(got, vec![0, 1]);
        assert!(matches!(taken[0].1.result, Ok(ref bytes) if bytes == &[7]) && taken[0].1.rank == Some(1), "{taken:?}");
        assert!(matches!(taken[1].1.result, Err(TaskError::Cancelled)), "{taken:?}");
        taken.clear();
        drop(replies);
        sink.take(&mut cx, &mut taken);
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert!(taken[0].0 == 2 && matches!(taken[0].1.result, Err(TaskError::PoolClosed)), "{taken:?}");
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 2, "the dropped reply did not wake the gather");
    }
}
