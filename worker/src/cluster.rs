//! This worker's part in the worker cluster: its share of the collections, and the QUIC links to
//! its peers.
//!
//! Requests arrive from three places: the executor (a task called `skyward::dict(..)`), the
//! coordinator (`pool.dict(..)`), and peers. The first two are *clients*: this node routes them
//! to the cell's primary by its current [`ClusterView`] (serving them itself when it is the
//! primary), retries when the view moved the cell, and answers the caller. Peer requests are
//! served only if this node is the primary; otherwise the peer is told `NotOwner` and retries.
//!
//! A primary ships every change to the cell's backup ([`PeerMsg::Replicate`]) and answers the
//! caller only after the backup acknowledged it, so one node's loss loses nothing acknowledged.
//! When the view gives a slot a new backup, the primary first sends it the slot's snapshot on the
//! same ordered stream, then the changes that follow.
//!
//! Peers authenticate with the pool's certificates (mutual TLS; a dialled peer must present the
//! certificate of the node id the view names). Every lock section here is short and never awaits.

use skyward_net::{FramedRecv, LaneWriter, UnixFrameWriter};
use skyward_proto::Time;
use skyward_proto::cluster::{ClusterError, ClusterView, Mutation, Op, PeerMsg, Reply, SLOTS, Step, Store};
use skyward_proto::codec;
use skyward_proto::exec::ToExecutor;
use skyward_proto::message::ToCoordinator;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often a client request may be re-routed (view changes, lost nodes) before it fails.
const MAX_ATTEMPTS: u32 = 20;
/// How long a request waits for the first view, or for a newer one, before it fails.
const VIEW_WAIT: Duration = Duration::from_secs(15);
/// Pause before re-sending to a peer whose view is behind ours.
const BEHIND_RETRY: Duration = Duration::from_millis(5);

/// Answers to requests, by local request id.
type Answers = Vec<(u64, Result<Reply, ClusterError>)>;

/// Where an answer goes.
#[derive(Clone)]
pub(crate) enum Origin {
    /// The coordinator, on the control stream.
    Coordinator(u64, Arc<dyn Fn(ToCoordinator) + Send + Sync>),
    /// The executor that asked.
    Executor(u64, UnixFrameWriter),
    /// A peer that sent a request on a stream (request id, the stream, the stream's local id).
    Peer(u64, LaneWriter, u64),
}

impl Origin {
    fn answer(self, result: Result<Reply, ClusterError>) {
        match self {
            Origin::Coordinator(id, send) => send(ToCoordinator::ClusterReply { id, result }),
            Origin::Executor(id, tx) => {
                let _ = tx.send(&ToExecutor::ClusterReply { id, result });
            }
            Origin::Peer(id, tx, _) => {
                let _ = tx.send(&PeerMsg::Reply { id, result });
            }
        }
    }

    fn is_client(&self) -> bool {
        !matches!(self, Origin::Peer(..))
    }
}

/// A request this node routes for a client of its own.
struct ClientRequest {
    origin: Origin,
    op: Op,
    attempts: u32,
}

/// A client request waiting for a (newer) view.
struct Waiting {
    request: ClientRequest,
    min_epoch: u64,
    not_before: Time,
    deadline: Time,
}

/// A client request sent to a peer, waiting for its answer.
struct InFlight {
    request: ClientRequest,
    node_id: String,
}

/// Runs an actor operation addressed to this node (in the executor); the answer goes to the
/// callback. Provided by the worker, which owns the executors.
pub(crate) type ActorHook = Arc<dyn Fn(Op, Box<dyn FnOnce(Result<Reply, ClusterError>) + Send>) + Send + Sync>;

/// A link this node dialled to a peer: requests and replication batches go out, answers come
/// back. Frames are written directly from the sending task once the stream is open; until then
/// they wait here, in order.
struct Link {
    generation: u64,
    state: LinkState,
}

enum LinkState {
    Connecting(Vec<PeerMsg>),
    Ready(LaneWriter),
}

struct Core {
    view: ClusterView,
    store: Store,
    next_id: u64,
    /// Local request id -> where its answer goes (requests this node serves as primary).
    serving: HashMap<u64, (Origin, Option<ClientRequest>)>,
    /// Answers held until every backup acknowledged the changes: id -> (answers, batches left).
    held: HashMap<u64, (Answers, usize)>,
    /// Replication batch id -> (held answers it belongs to, backup node id).
    batches: HashMap<u64, (Option<u64>, String)>,
    in_flight: HashMap<u64, InFlight>,
    waiting: Vec<Waiting>,
    links: HashMap<String, Link>,
    /// Held-answer ids that stand for a view's snapshots: when they complete, the coordinator is
    /// told the view's epoch is replicated here.
    syncs: HashMap<u64, u64>,
    /// How this node tells the coordinator (the control stream of the current connection).
    report: Option<Arc<dyn Fn(ToCoordinator) + Send + Sync>>,
    /// Round-robin position for actors spawned without a rank.
    next_actor_node: usize,
    next_link: u64,
    /// Per slot, the newest held-answers entry waiting for a backup.
    slot_tail: HashMap<u32, u64>,
}

/// The cluster engine of one worker.
pub(crate) struct Cluster {
    node_id: String,
    actors: std::sync::OnceLock<ActorHook>,
    endpoint: quinn::Endpoint,
    max_frame: usize,
    epoch: Instant,
    core: Mutex<Core>,
    wake: Notify,
}

impl Cluster {
    pub(crate) fn new(node_id: String, endpoint: quinn::Endpoint, max_frame: usize) -> Arc<Self> {
        let cluster = Arc::new(Self {
            node_id,
            actors: std::sync::OnceLock::new(),
            endpoint,
            max_frame,
            epoch: Instant::now(),
            core: Mutex::new(Core {
                view: ClusterView::default(),
                store: Store::new(),
                next_id: 1,
                serving: HashMap::new(),
                held: HashMap::new(),
                batches: HashMap::new(),
                in_flight: HashMap::new(),
                waiting: Vec::new(),
                links: HashMap::new(),
                syncs: HashMap::new(),
                report: None,
                next_actor_node: 0,
                next_link: 0,
                slot_tail: HashMap::new(),
            }),
            wake: Notify::new(),
        });
        tokio::spawn(Arc::clone(&cluster).accept_loop());
        tokio::spawn(Arc::clone(&cluster).timer_loop());
        cluster
    }

    fn now(&self) -> Time {
        self.epoch.elapsed()
    }

    /// Where actor operations for this node go (set once, after the worker exists).
    pub(crate) fn set_actor_hook(&self, hook: ActorHook) {
        let _ = self.actors.set(hook);
    }

    fn serve_actor(&self, op: Op, origin: Origin) {
        match self.actors.get() {
            Some(hook) => hook(op, Box::new(move |result| origin.answer(result))),
            None => origin.answer(Err(ClusterError::Unavailable("this worker hosts no actors yet".into()))),
        }
    }

    /// Route an actor operation: to its node (this one, or a peer over its link).
    fn route_actor(self: &Arc<Self>, core: &mut Core, mut request: ClientRequest) {
        let now = self.now();
        if core.view.members.is_empty() {
            core.waiting.push(Waiting { request, min_epoch: 1, not_before: now, deadline: now + VIEW_WAIT });
            self.wake.notify_one();
            return;
        }
        if let Op::ActorSpawn { rank: rank @ None, .. } = &mut request.op {
            let mut ranks: Vec<u32> = core.view.members.iter().map(|m| m.rank).collect();
            ranks.sort_unstable();
            // Each node starts its round at its own position, so first spawns from several
            // nodes spread out instead of all landing on the lowest rank.
            let me = ranks.iter().position(|r| Some(*r) == self.my_rank(core)).unwrap_or(0);
            *rank = Some(ranks[(me + core.next_actor_node) % ranks.len()]);
            core.next_actor_node += 1;
        }
        let Some((Some(rank), node_id)) = request.op.actor_target() else { return };
        let member = core.view.member(rank).cloned();
        let member = match (member, node_id) {
            (Some(m), Some(id)) if m.node_id != id => None,
            (m, _) => m,
        };
        let Some(member) = member else {
            let reason = format!("its node (rank {rank}) is not in the pool any more (lost or replaced)");
            return request.origin.answer(Err(ClusterError::ActorDead { actor: String::new(), reason }));
        };
        if member.node_id == self.node_id {
            return self.serve_actor(request.op, request.origin);
        }
        self.forward(core, request, &member);
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().expect("cluster core lock")
    }

    /// Which slots this node serves as primary under its current view.
    fn served(&self, core: &Core) -> Vec<bool> {
        let me = self.my_rank(core);
        (0..SLOTS as usize).map(|s| core.view.slots.get(s).is_some_and(|o| Some(o.primary) == me)).collect()
    }

    fn my_rank(&self, core: &Core) -> Option<u32> {
        core.view.members.iter().find(|m| m.node_id == self.node_id).map(|m| m.rank)
    }

    /// A client request (from the executor or the coordinator): decode, route, answer.
    pub(crate) fn submit(self: &Arc<Self>, op: &[u8], origin: Origin) {
        let op: Op = match codec::from_bytes(op, "cluster operation") {
            Ok(op) => op,
            Err(e) => return origin.answer(Err(ClusterError::BadRequest(e.to_string()))),
        };
        let mut core = self.core();
        self.route(&mut core, ClientRequest { origin, op, attempts: 0 });
    }

    fn route(self: &Arc<Self>, core: &mut Core, mut request: ClientRequest) {
        let now = self.now();
        request.attempts += 1;
        if request.attempts > MAX_ATTEMPTS {
            let (kind, name) = request.op.target();
            return request.origin.answer(Err(ClusterError::Transport(format!(
                "{kind} `{name}`: gave up after {MAX_ATTEMPTS} attempts to reach its owner"
            ))));
        }
        if request.op.actor_target().is_some() {
            return self.route_actor(core, request);
        }
        let cell = request.op.cell();
        let Some(owners) = core.view.owners(&cell) else {
            // No placement yet (the pool is still starting): wait for the first view.
            core.waiting.push(Waiting { request, min_epoch: 1, not_before: now, deadline: now + VIEW_WAIT });
            self.wake.notify_one();
            return;
        };
        if Some(owners.primary) == self.my_rank(core) {
            let id = core.next_id;
            core.next_id += 1;
            let op = request.op.clone();
            let origin = request.origin.clone();
            core.serving.insert(id, (origin, Some(request)));
            let slot = cell.slot();
            let step = core.store.apply(id, op, now);
            self.finish(core, step, Some(slot));
            return;
        }
        let Some(member) = core.view.member(owners.primary).cloned() else {
            core.waiting.push(Waiting { request, min_epoch: core.view.epoch + 1, not_before: now, deadline: now + VIEW_WAIT });
            self.wake.notify_one();
            return;
        };
        self.forward(core, request, &member);
    }

    /// Send a client's request to the peer `member` and remember it until the answer comes.
    fn forward(self: &Arc<Self>, core: &mut Core, request: ClientRequest, member: &skyward_proto::cluster::Member) {
        let op_bytes = match codec::to_bytes(&request.op) {
            Ok(b) => b,
            Err(e) => return request.origin.answer(Err(ClusterError::Transport(e.to_string()))),
        };
        let id = core.next_id;
        core.next_id += 1;
        core.in_flight.insert(id, InFlight { request, node_id: member.node_id.clone() });
        self.send_peer(core, &member.node_id, &member.addr, PeerMsg::Request { id, op: op_bytes });
    }

    /// Send answers now, or after the backups acknowledged the step's changes. `slot`: the slot
    /// of the operation that made the step; an answer that changes nothing (a read) waits behind
    /// a write to the same slot that is still unacknowledged, so no one reads a value a failover
    /// could take back.
    fn finish(self: &Arc<Self>, core: &mut Core, step: Step, slot: Option<u32>) {
        let mut groups: HashMap<u32, Vec<Mutation>> = HashMap::new();
        for m in step.mutations {
            if let Some(backup) = m.cell().and_then(|c| core.view.owners(c)).and_then(|o| o.backup) {
                groups.entry(backup).or_default().push(m);
            }
        }
        let groups: Vec<(skyward_proto::cluster::Member, Vec<Mutation>)> =
            groups.into_iter().filter_map(|(rank, muts)| core.view.member(rank).cloned().map(|m| (m, muts))).collect();
        if groups.is_empty() {
            let behind = slot.and_then(|s| core.slot_tail.get(&s).copied()).filter(|h| core.held.contains_key(h));
            match behind {
                Some(held) => core.held.get_mut(&held).expect("checked").0.extend(step.replies),
                None => self.deliver(core, step.replies),
            }
        } else {
            let held = core.next_id;
            core.next_id += 1;
            core.held.insert(held, (step.replies, groups.len()));
            if let Some(slot) = slot {
                core.slot_tail.insert(slot, held);
            }
            for (member, mutations) in groups {
                self.replicate(core, &member, mutations, Some(held));
            }
        }
        if !core.waiting.is_empty() || core.store.poll_timeout(|_| true).is_some() {
            self.wake.notify_one();
        }
    }

    fn replicate(self: &Arc<Self>, core: &mut Core, member: &skyward_proto::cluster::Member, mutations: Vec<Mutation>, held: Option<u64>) {
        let id = core.next_id;
        core.next_id += 1;
        core.batches.insert(id, (held, member.node_id.clone()));
        self.send_peer(core, &member.node_id, &member.addr, PeerMsg::Replicate { id, mutations });
    }

    fn batch_done(self: &Arc<Self>, core: &mut Core, batch: u64) {
        let Some((Some(held), _)) = core.batches.remove(&batch) else { return };
        let done = match core.held.get_mut(&held) {
            Some((_, left)) => {
                *left -= 1;
                *left == 0
            }
            None => false,
        };
        if done && let Some((replies, _)) = core.held.remove(&held) {
            self.deliver(core, replies);
            if let Some(epoch) = core.syncs.remove(&held) {
                self.report_synced(core, epoch);
            }
        }
    }

    fn deliver(self: &Arc<Self>, core: &mut Core, replies: Answers) {
        for (id, result) in replies {
            let Some((origin, request)) = core.serving.remove(&id) else { continue };
            match (result, request) {
                // The cell moved while the request waited here: route the client's request again.
                (Err(ClusterError::NotOwner { .. }), Some(request)) => self.route(core, request),
                (result, _) => origin.answer(result),
            }
        }
    }

    /// Send `message` on the link to `node_id`, dialling it on first use. A write that fails
    /// leaves the link to its reader, which notices the end and fails what was sent on it.
    fn send_peer(self: &Arc<Self>, core: &mut Core, node_id: &str, addr: &str, message: PeerMsg) {
        match core.links.get_mut(node_id).map(|l| &mut l.state) {
            Some(LinkState::Ready(writer)) => {
                let _ = writer.send(&message);
            }
            Some(LinkState::Connecting(queued)) => queued.push(message),
            None => {
                core.next_link += 1;
                let generation = core.next_link;
                core.links.insert(node_id.to_string(), Link { generation, state: LinkState::Connecting(vec![message]) });
                let cluster = Arc::clone(self);
                let node_id = node_id.to_string();
                let addr = addr.to_string();
                tokio::spawn(async move {
                    let reason = cluster.run_link(&node_id, &addr, generation).await;
                    tracing::debug!(peer = %node_id, %reason, "cluster link ended");
                    cluster.link_failed(&node_id, generation, &reason);
                });
            }
        }
    }

    async fn run_link(self: &Arc<Self>, node_id: &str, addr: &str, generation: u64) -> String {
        let addr: std::net::SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(e) => return format!("bad peer address {addr}: {e}"),
        };
        let server_name = skyward_net::worker_server_name(node_id);
        let connecting = match self.endpoint.connect(addr, &server_name) {
            Ok(c) => c,
            Err(e) => return format!("cannot dial {addr}: {e}"),
        };
        let connection = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return format!("cannot connect to {addr}: {e}"),
            Err(_) => return format!("no answer from {addr} within 10 s"),
        };
        let (send, recv) = match connection.open_bi().await {
            Ok(s) => s,
            Err(e) => return format!("cannot open a stream to {addr}: {e}"),
        };
        let writer = LaneWriter::new(send);
        {
            // Flush what waited, then let senders write directly, under one lock so order holds.
            let mut core = self.core();
            let Some(link) = core.links.get_mut(node_id).filter(|l| l.generation == generation) else {
                return "link replaced while connecting".to_string();
            };
            if let LinkState::Connecting(queued) = std::mem::replace(&mut link.state, LinkState::Ready(writer.clone())) {
                for m in queued {
                    let _ = writer.send(&m);
                }
            }
        }
        let mut recv = FramedRecv::new(recv, self.max_frame);
        let reason = loop {
            match recv.next::<PeerMsg>("PeerMsg").await {
                Ok(Some(PeerMsg::Reply { id, result })) => self.on_reply(id, result),
                Ok(Some(PeerMsg::Replicated { id })) => self.on_replicated(id),
                Ok(Some(other)) => break format!("peer sent {other:?} on a link it accepted"),
                Ok(None) => break "peer closed the stream".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        connection.close(0u32.into(), b"link ended");
        reason
    }

    /// A link ended: requests on it go out again (reads) or fail (writes: they may have taken
    /// effect); replication batches to it are released (the backup is gone; the next view gives
    /// the slot a new one, which gets a snapshot).
    fn link_failed(self: &Arc<Self>, node_id: &str, generation: u64, reason: &str) {
        let mut core = self.core();
        if core.links.get(node_id).is_some_and(|l| l.generation == generation) {
            core.links.remove(node_id);
        }
        let batches: Vec<u64> = core.batches.iter().filter(|(_, (_, n))| n.as_str() == node_id).map(|(id, _)| *id).collect();
        if !batches.is_empty() {
            tracing::warn!(peer = %node_id, %reason, "backup unreachable; answering without its acknowledgement");
        }
        for id in &batches {
            // A snapshot that did not arrive: this view is not replicated here (the next view,
            // without that backup, gives its slots another one).
            if let Some((Some(held), _)) = core.batches.get(id) {
                let held = *held;
                core.syncs.remove(&held);
            }
        }
        let lost_batches = !batches.is_empty();
        for id in batches {
            self.batch_done(&mut core, id);
        }
        // The backup may have missed changes: if it is still a member, send it every slot this
        // node serves for it again (snapshot first, on a new link, so later changes follow it).
        if lost_batches
            && let Some(member) = core.view.members.iter().find(|m| m.node_id == node_id).cloned()
            && let Some(me) = self.my_rank(&core)
        {
            let now = self.now();
            for slot in 0..SLOTS {
                let owners = core.view.slots.get(slot as usize).copied();
                if owners.is_some_and(|o| o.primary == me && o.backup == Some(member.rank)) {
                    let mutations = core.store.snapshot(slot, now);
                    self.replicate(&mut core, &member, mutations, None);
                }
            }
        }
        let requests: Vec<u64> = core.in_flight.iter().filter(|(_, f)| f.node_id == node_id).map(|(id, _)| *id).collect();
        for id in requests {
            let Some(flight) = core.in_flight.remove(&id) else { continue };
            self.retry_or_fail(&mut core, flight.request, node_id);
        }
    }

    fn retry_or_fail(self: &Arc<Self>, core: &mut Core, request: ClientRequest, node_id: &str) {
        let now = self.now();
        if request.op.is_retryable() {
            // Wait for the coordinator's next view (the lost node's slots move to their backups).
            let min_epoch = core.view.epoch + 1;
            core.waiting.push(Waiting { request, min_epoch, not_before: now, deadline: now + VIEW_WAIT });
            self.wake.notify_one();
        } else {
            let (kind, _) = request.op.target();
            let rank = core.view.members.iter().find(|m| m.node_id == node_id).map(|m| m.rank).unwrap_or(u32::MAX);
            request.origin.answer(Err(ClusterError::NodeLost { kind, rank, retried: true }));
        }
    }

    fn on_reply(self: &Arc<Self>, id: u64, result: Result<Reply, ClusterError>) {
        let mut core = self.core();
        let Some(flight) = core.in_flight.remove(&id) else { return };
        match result {
            Err(ClusterError::NotOwner { epoch, .. }) => {
                let now = self.now();
                let (min_epoch, not_before) = if epoch > core.view.epoch { (epoch, now) } else { (core.view.epoch, now + BEHIND_RETRY) };
                core.waiting.push(Waiting { request: flight.request, min_epoch, not_before, deadline: now + VIEW_WAIT });
                self.wake.notify_one();
            }
            result => flight.request.origin.answer(result),
        }
    }

    fn on_replicated(self: &Arc<Self>, id: u64) {
        let mut core = self.core();
        self.batch_done(&mut core, id);
    }

    fn report_synced(&self, core: &Core, epoch: u64) {
        // Only the newest view counts: an older one's snapshots say nothing about the current one.
        if epoch == core.view.epoch
            && let Some(report) = &core.report
        {
            report(ToCoordinator::ClusterSynced { epoch });
        }
    }

    /// A new view from the coordinator; `report` reaches the coordinator.
    /// A change from the view this node holds; one made from another epoch is dropped (the
    /// coordinator sends the whole view on the next connection).
    pub(crate) fn on_view_change(
        self: &Arc<Self>,
        change: &skyward_proto::cluster::ViewChange,
        report: Arc<dyn Fn(ToCoordinator) + Send + Sync>,
    ) {
        let mut view = self.core().view.clone();
        if !view.apply(change.clone()) {
            tracing::warn!(base = change.base, held = view.epoch, "cluster view change from another epoch; dropped");
            return;
        }
        self.on_view(Arc::new(view), report);
    }

    pub(crate) fn on_view(self: &Arc<Self>, view: Arc<ClusterView>, report: Arc<dyn Fn(ToCoordinator) + Send + Sync>) {
        let mut core = self.core();
        core.report = Some(report);
        if view.epoch <= core.view.epoch {
            return;
        }
        let old = std::mem::replace(&mut core.view, Arc::unwrap_or_clone(view));
        let now = self.now();
        let me = self.my_rank(&core);
        tracing::debug!(epoch = core.view.epoch, members = core.view.members.len(), rank = ?me, "cluster view");
        // Nodes that left: free their locks, break barriers waiting for them.
        // Sets, not scans: views of 1,000 members reach 1,000 nodes.
        let current: std::collections::HashSet<&str> = core.view.members.iter().map(|m| m.node_id.as_str()).collect();
        let lost: Vec<u32> = old.members.iter().filter(|m| !current.contains(m.node_id.as_str())).map(|m| m.rank).collect();
        for node in old.members.iter().filter(|m| lost.contains(&m.rank)) {
            core.links.remove(&node.node_id);
        }
        if !lost.is_empty() {
            let served = self.served(&core);
            let live: Vec<u32> = core.view.members.iter().map(|m| m.rank).collect();
            let step = core.store.nodes_lost(&lost, &live, now, |slot| served[slot as usize]);
            self.finish(&mut core, step, None);
        }
        // Slots this node now serves with a backup that did not hold them: send a snapshot first.
        // (Not for the first placement: nothing is stored yet.)
        let mut snapshots: Vec<(skyward_proto::cluster::Member, Vec<Mutation>)> = Vec::new();
        if let Some(me) = me {
            for slot in 0..SLOTS {
                if old.slots.is_empty() {
                    break;
                }
                let Some(new) = core.view.slots.get(slot as usize).copied() else { break };
                if new.primary != me {
                    continue;
                }
                let before = old.slots.get(slot as usize).copied();
                let backup_had_it = match (before, new.backup) {
                    (Some(b), Some(backup)) => {
                        let same_node =
                            |rank: u32| old.member(rank).map(|m| m.node_id.as_str()) == core.view.member(rank).map(|m| m.node_id.as_str());
                        (b.primary == backup || b.backup == Some(backup)) && same_node(backup)
                    }
                    _ => false,
                };
                if let Some(backup) = new.backup
                    && !backup_had_it
                    && let Some(member) = core.view.member(backup).cloned()
                {
                    let mutations = core.store.snapshot(slot, now);
                    tracing::debug!(slot, to = %member.node_id, cells = mutations.len() - 1, "snapshot to a new backup");
                    snapshots.push((member, mutations));
                }
            }
            let epoch = core.view.epoch;
            if snapshots.is_empty() {
                self.report_synced(&core, epoch);
            } else {
                let held = core.next_id;
                core.next_id += 1;
                core.held.insert(held, (Vec::new(), snapshots.len()));
                core.syncs.insert(held, epoch);
                for (member, mutations) in snapshots {
                    self.replicate(&mut core, &member, mutations, Some(held));
                }
            }
            let view = core.view.clone();
            let serves = |slot: u32| view.slots.get(slot as usize).is_some_and(|o| o.primary == me);
            let keeps = |slot: u32| view.slots.get(slot as usize).is_some_and(|o| o.primary == me || o.backup == Some(me));
            let step = core.store.unpark_moved(serves, view.epoch);
            self.deliver(&mut core, step.replies);
            let before = core.store.len();
            core.store.retain_slots(keeps);
            tracing::debug!(epoch = view.epoch, kept = core.store.len(), dropped = before - core.store.len(), "cells after the view");
        }
        // Requests sent to nodes that left are re-routed or failed; waiting ones go out again.
        let gone: Vec<u64> =
            core.in_flight.iter().filter(|(_, f)| !core.view.members.iter().any(|m| m.node_id == f.node_id)).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some(flight) = core.in_flight.remove(&id) {
                let node_id = flight.node_id.clone();
                let rank = old.members.iter().find(|m| m.node_id == node_id).map(|m| m.rank);
                if flight.request.op.is_retryable() {
                    self.route(&mut core, flight.request);
                } else {
                    let (kind, _) = flight.request.op.target();
                    flight.request.origin.answer(Err(ClusterError::NodeLost { kind, rank: rank.unwrap_or(u32::MAX), retried: true }));
                }
            }
        }
        self.release_waiting(&mut core, now);
    }

    fn release_waiting(self: &Arc<Self>, core: &mut Core, now: Time) {
        let epoch = core.view.epoch;
        let (ready, rest): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut core.waiting).into_iter().partition(|w| (w.min_epoch <= epoch && w.not_before <= now) || w.deadline <= now);
        core.waiting = rest;
        for w in ready {
            if w.min_epoch > epoch || (core.view.slots.is_empty() && w.deadline <= now) {
                let (kind, name) = w.request.op.target();
                w.request.origin.answer(Err(ClusterError::Unavailable(format!(
                    "{kind} `{name}`: no usable cluster view within {VIEW_WAIT:?} (epoch {epoch})"
                ))));
            } else {
                self.route(core, w.request);
            }
        }
    }

    /// Serve one request from a peer: only as this cell's primary.
    fn serve_peer(self: &Arc<Self>, id: u64, op: &[u8], tx: &LaneWriter, stream: u64) {
        let op: Op = match codec::from_bytes(op, "cluster operation") {
            Ok(op) => op,
            Err(e) => {
                let _ = tx.send(&PeerMsg::Reply { id, result: Err(ClusterError::BadRequest(e.to_string())) });
                return;
            }
        };
        let mut core = self.core();
        if let Some((rank, node_id)) = op.actor_target() {
            let mine = rank.is_some() && rank == self.my_rank(&core) && node_id.is_none_or(|id| id == self.node_id);
            drop(core);
            if mine {
                self.serve_actor(op, Origin::Peer(id, tx.clone(), stream));
            } else {
                let reason = "the node it was sent to does not host it (lost or replaced)".to_string();
                let _ = tx.send(&PeerMsg::Reply { id, result: Err(ClusterError::ActorDead { actor: String::new(), reason }) });
            }
            return;
        }
        let owners = core.view.owners(&op.cell());
        let me = self.my_rank(&core);
        match owners {
            Some(o) if Some(o.primary) == me => {
                let local = core.next_id;
                core.next_id += 1;
                core.serving.insert(local, (Origin::Peer(id, tx.clone(), stream), None));
                let slot = op.cell().slot();
                let step = core.store.apply(local, op, self.now());
                self.finish(&mut core, step, Some(slot));
            }
            _ => {
                let (kind, _) = op.target();
                let _ = tx.send(&PeerMsg::Reply { id, result: Err(ClusterError::NotOwner { kind, epoch: core.view.epoch }) });
            }
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let cluster = Arc::clone(&self);
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let connection = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "rejected a cluster connection");
                        return;
                    }
                };
                while let Ok((send, recv)) = connection.accept_bi().await {
                    tokio::spawn(Arc::clone(&cluster).serve_stream(send, recv));
                }
            });
        }
    }

    async fn serve_stream(self: Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream) {
        let stream = {
            let mut core = self.core();
            core.next_id += 1;
            core.next_id
        };
        self.serve_stream_until_end(send, recv, stream).await;
        // Requests of that peer still parked here (a queue get, a lock wait, a barrier) are
        // forgotten: their answers could not be delivered, and a queue item handed to them
        // would be lost.
        let mut core = self.core();
        let gone: Vec<u64> =
            core.serving.iter().filter(|(_, (o, _))| matches!(o, Origin::Peer(_, _, s) if *s == stream)).map(|(id, _)| *id).collect();
        for id in gone {
            core.serving.remove(&id);
            core.store.cancel(id);
        }
    }

    async fn serve_stream_until_end(self: &Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream, stream: u64) {
        let tx = LaneWriter::new(send);
        let mut recv = FramedRecv::new(recv, self.max_frame);
        loop {
            match recv.next::<PeerMsg>("PeerMsg").await {
                Ok(Some(PeerMsg::Request { id, op })) => self.serve_peer(id, &op, &tx, stream),
                Ok(Some(PeerMsg::Replicate { id, mutations })) => {
                    if let Some(Mutation::ResetSlot(slot)) = mutations.first() {
                        tracing::debug!(slot, cells = mutations.len() - 1, "snapshot received");
                    }
                    let now = self.now();
                    self.core().store.replicate(mutations, now);
                    let _ = tx.send(&PeerMsg::Replicated { id });
                }
                Ok(Some(other)) => {
                    tracing::warn!(message = ?other, "unexpected message on a cluster stream; closing it");
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster stream failed");
                    return;
                }
            }
        }
    }

    async fn timer_loop(self: Arc<Self>) {
        loop {
            let deadline = {
                let core = self.core();
                let waiting = core.waiting.iter().map(|w| if w.min_epoch <= core.view.epoch { w.not_before } else { w.deadline }).min();
                let served = self.served(&core);
                core.store.poll_timeout(|slot| served[slot as usize]).into_iter().chain(waiting).min()
            };
            match deadline {
                Some(deadline) => {
                    let now = self.now();
                    if deadline > now {
                        tokio::select! {
                            _ = tokio::time::sleep(deadline - now) => {}
                            _ = self.wake.notified() => continue,
                        }
                    }
                }
                None => {
                    self.wake.notified().await;
                    continue;
                }
            }
            let now = self.now();
            let mut core = self.core();
            let served = self.served(&core);
            let step = core.store.handle_timeout(now, |slot| served[slot as usize]);
            if !step.replies.is_empty() || !step.mutations.is_empty() {
                self.finish(&mut core, step, None);
            }
            self.release_waiting(&mut core, now);
        }
    }

    /// Stop: answer everything pending so no caller hangs.
    pub(crate) fn close(&self) {
        let mut core = self.core();
        let err = || ClusterError::Unavailable("the worker is shutting down".into());
        for (_, (origin, _)) in core.serving.drain() {
            if origin.is_client() {
                origin.answer(Err(err()));
            }
        }
        for (_, flight) in core.in_flight.drain() {
            flight.request.origin.answer(Err(err()));
        }
        for w in core.waiting.drain(..) {
            w.request.origin.answer(Err(err()));
        }
    }
}
