//! The coordinator's side of the worker cluster: membership, placement, and the coordinator's own
//! collection calls (`pool.dict(..)`).
//!
//! The coordinator is the one authority on who is in the cluster and which node serves which slot
//! ([`ClusterView`], numbered by epoch). The first placement is made when the pool has started
//! (every node ready); after that a lost node's slots move to their backups and get new backups,
//! and a node that joins (a replacement, or growth) takes backup roles. Every change is sent to
//! every member on its control stream and reported as a [`ClusterEvent`].
//!
//! In standalone mode there is no cluster: every call fails with [`ClusterError::Standalone`].

use crate::node::NodeShared;
use futures::future::BoxFuture;
use skyward_proto::cluster::{ClusterError, ClusterView, Kind, Member, Op, Reply};
use skyward_proto::codec;
use skyward_proto::message::ToWorker;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, oneshot, watch};

/// A change in the worker cluster's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A node joined (it is ready and reachable by its peers).
    Joined {
        /// Its rank.
        rank: u32,
        /// Its node id.
        node_id: String,
    },
    /// Every slot of the view `epoch` has two copies again (after a join or a loss, once every
    /// primary's snapshots reached their new backups).
    Replicated {
        /// The view's epoch.
        epoch: u64,
    },
    /// A node left (lost, failed, or the pool shrank).
    Left {
        /// Its rank.
        rank: u32,
        /// Its node id.
        node_id: String,
        /// Why.
        reason: String,
    },
}

/// How often the coordinator re-sends an operation whose owner moved before it fails.
const MAX_ATTEMPTS: u32 = 20;
/// How long an operation waits for a placement (pool starting, or right after a loss).
const VIEW_WAIT: Duration = Duration::from_secs(15);

struct NodeEntry {
    node_id: String,
    addr: String,
    shared: Arc<NodeShared>,
    /// Epoch of the view last queued on the node's current connection: the next publish sends
    /// it only the change from there (`None`: the whole view).
    sent: Option<u64>,
}

type Answer = Result<Reply, ClusterError>;

struct State {
    view: ClusterView,
    /// Round-robin position for actors spawned without a rank.
    next_actor_node: usize,
    placed: bool,
    nodes: BTreeMap<u32, NodeEntry>,
    pending: HashMap<u64, (u32, oneshot::Sender<Answer>)>,
    /// Newest view epoch each node reported replicated.
    synced: HashMap<u32, u64>,
}

/// Membership, placement and the coordinator's collection calls.
pub(crate) struct ClusterShared {
    enabled: bool,
    state: Mutex<State>,
    next_id: AtomicU64,
    events: broadcast::Sender<ClusterEvent>,
    epoch: watch::Sender<u64>,
    /// Newest epoch every member reported replicated.
    replicated: watch::Sender<u64>,
}

impl ClusterShared {
    /// `enabled`: cluster mode (workers reach each other).
    pub(crate) fn new(enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            enabled,
            state: Mutex::new(State {
                view: ClusterView::default(),
                next_actor_node: 0,
                placed: false,
                nodes: BTreeMap::new(),
                pending: HashMap::new(),
                synced: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
            events: broadcast::channel(1024).0,
            epoch: watch::channel(0).0,
            replicated: watch::channel(0).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("cluster state lock")
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.events.subscribe()
    }

    /// Current members: `(rank, node_id)`.
    pub(crate) fn members(&self) -> Vec<(u32, String)> {
        self.state().nodes.iter().map(|(r, n)| (*r, n.node_id.clone())).collect()
    }

    /// Publish the current membership and placement to every member: the change since the
    /// previous view to nodes that hold it, the whole view to the others (one shared copy each,
    /// not one per node: 1,000 members are about 50 KB).
    fn publish(&self, state: &mut State) {
        let next = ClusterView {
            epoch: state.view.epoch + 1,
            members: state.nodes.iter().map(|(rank, n)| Member { rank: *rank, node_id: n.node_id.clone(), addr: n.addr.clone() }).collect(),
            slots: state.view.slots.clone(),
        };
        let change = Arc::new(state.view.change_to(&next));
        state.view = next;
        let mut whole: Option<Arc<ClusterView>> = None;
        let epoch = state.view.epoch;
        for node in state.nodes.values_mut() {
            let message = if node.sent == Some(change.base) {
                ToWorker::ClusterViewChange(Arc::clone(&change))
            } else {
                ToWorker::ClusterView(Arc::clone(whole.get_or_insert_with(|| Arc::new(state.view.clone()))))
            };
            node.sent = node.shared.send_control([message]).then_some(epoch);
        }
        self.epoch.send_replace(epoch);
    }

    /// A node is ready; `addr` is where its peers reach it.
    pub(crate) fn node_ready(&self, rank: u32, node_id: String, addr: String, shared: Arc<NodeShared>) {
        if !self.enabled {
            return;
        }
        let mut state = self.state();
        let replaced = state.nodes.insert(rank, NodeEntry { node_id: node_id.clone(), addr, shared, sent: None });
        if let Some(old) = replaced.filter(|old| old.node_id != node_id) {
            // A replacement arrived before the loss was processed: the old node is gone.
            self.drop_node(&mut state, rank, &old.node_id, "replaced");
        }
        if state.placed {
            let ranks: Vec<u32> = state.nodes.keys().copied().collect();
            state.view.slots = ClusterView::with(&state.view.slots, rank, &ranks);
            self.publish(&mut state);
        }
        let _ = self.events.send(ClusterEvent::Joined { rank, node_id });
    }

    /// The pool has started: make the first placement over every ready node.
    pub(crate) fn place(&self) {
        if !self.enabled {
            return;
        }
        let mut state = self.state();
        if state.placed || state.nodes.is_empty() {
            return;
        }
        let ranks: Vec<u32> = state.nodes.keys().copied().collect();
        state.view.slots = ClusterView::place(&ranks);
        state.placed = true;
        self.publish(&mut state);
    }

    /// Node `rank` (re)connected: give it the current view (it may have missed one while its
    /// connection was down; an older or equal epoch is ignored by the worker).
    pub(crate) fn node_connected(&self, rank: u32, node_id: &str) {
        let mut state = self.state();
        let state = &mut *state;
        if self.enabled
            && state.view.epoch > 0
            && let Some(node) = state.nodes.get_mut(&rank).filter(|n| n.node_id == node_id)
        {
            let sent = node.shared.send_control([ToWorker::ClusterView(Arc::new(state.view.clone()))]);
            node.sent = sent.then_some(state.view.epoch);
        }
    }

    /// Node `rank`'s connection dropped: calls waiting on it will get no answer (the worker
    /// answers on the connection it got them on). Their callers send again if that is safe.
    pub(crate) fn connection_lost(&self, rank: u32) {
        let mut state = self.state();
        state.pending.retain(|_, (r, _)| *r != rank);
        if let Some(node) = state.nodes.get_mut(&rank) {
            node.sent = None;
        }
    }

    /// Node `node_id` (rank `rank`) left the cluster.
    pub(crate) fn node_left(&self, rank: u32, node_id: &str, reason: &str) {
        if !self.enabled {
            return;
        }
        let mut state = self.state();
        if state.nodes.get(&rank).is_none_or(|n| n.node_id != node_id) {
            return;
        }
        state.nodes.remove(&rank);
        self.drop_node(&mut state, rank, node_id, reason);
    }

    fn drop_node(&self, state: &mut State, rank: u32, node_id: &str, reason: &str) {
        if state.placed {
            let alive: Vec<u32> = state.nodes.keys().copied().filter(|r| *r != rank).collect();
            state.view.slots = ClusterView::without(&state.view.slots, rank, &alive);
        }
        // Calls waiting on the lost node: their senders are dropped here; `request` decides
        // whether to send them again.
        state.pending.retain(|_, (r, _)| *r != rank);
        self.publish(state);
        let _ = self.events.send(ClusterEvent::Left { rank, node_id: node_id.to_string(), reason: reason.to_string() });
    }

    /// Node `rank` has replicated everything it serves under view `epoch`.
    pub(crate) fn on_synced(&self, rank: u32, epoch: u64) {
        let mut state = self.state();
        state.synced.insert(rank, epoch);
        let current = state.view.epoch;
        let all = state.placed && state.nodes.keys().all(|r| state.synced.get(r).is_some_and(|e| *e >= current));
        if all && *self.replicated.borrow() < current {
            self.replicated.send_replace(current);
            let _ = self.events.send(ClusterEvent::Replicated { epoch: current });
        }
    }

    /// Wait until every slot of the current view has two copies (nothing to wait for in a one-node
    /// pool or before the first placement).
    pub(crate) async fn wait_replicated(&self, timeout: Duration) -> Result<(), ClusterError> {
        if !self.enabled {
            return Err(ClusterError::Standalone);
        }
        let mut rx = self.replicated.subscribe();
        let wait = async {
            loop {
                let target = self.state().view.epoch;
                if *rx.borrow_and_update() >= target {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClusterError::Unavailable(format!("the cluster did not finish re-replicating within {timeout:?}")))
    }

    /// A request id and where its answer from node `rank` will arrive.
    fn expect_answer(&self, state: &mut State, rank: u32) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, (rank, tx));
        (id, rx)
    }

    /// An answer from a worker.
    pub(crate) fn on_reply(&self, id: u64, result: Answer) {
        if let Some((_, tx)) = self.state().pending.remove(&id) {
            let _ = tx.send(result);
        }
    }

    async fn wait_for_epoch_after(&self, epoch: u64, limit: Duration) -> bool {
        let mut rx = self.epoch.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|e| *e > epoch)).await.is_ok_and(|r| r.is_ok())
    }

    /// Run `op` on its primary and return the answer.
    pub(crate) async fn request(&self, op: Op) -> Answer {
        if !self.enabled {
            return Err(ClusterError::Standalone);
        }
        if op.actor_target().is_some() {
            return self.request_actor(op).await;
        }
        let (kind, name) = op.target();
        let name = name.to_string();
        let bytes = codec::to_bytes(&op).map_err(|e| ClusterError::Transport(e.to_string()))?;
        let cell = op.cell();
        for _ in 0..MAX_ATTEMPTS {
            let attempt = {
                let mut state = self.state();
                let epoch = state.view.epoch;
                match state.view.owners(&cell).and_then(|o| state.nodes.get(&o.primary).map(|n| (o.primary, Arc::clone(&n.shared)))) {
                    None => Err(epoch),
                    Some((rank, shared)) => {
                        let (id, rx) = self.expect_answer(&mut state, rank);
                        Ok((epoch, rank, shared, id, rx))
                    }
                }
            };
            let (epoch, rank, shared, id, rx) = match attempt {
                Ok(a) => a,
                Err(epoch) => {
                    if !self.wait_for_epoch_after(epoch, VIEW_WAIT).await {
                        return Err(ClusterError::Unavailable(format!(
                            "{kind} `{name}`: no node serves it (the pool has no ready node, or has not finished starting)"
                        )));
                    }
                    continue;
                }
            };
            if !shared.send_cluster(ToWorker::ClusterRequest { id, op: bytes.clone() }, None) {
                // Not sent (the node is reconnecting): wait for it, or for a view without it.
                self.state().pending.remove(&id);
                let _ = self.wait_for_epoch_after(epoch, Duration::from_millis(50)).await;
                continue;
            }
            match rx.await {
                Ok(Err(ClusterError::NotOwner { epoch: theirs, .. })) => {
                    // The worker's view differs from ours for a moment; it forwards by its own
                    // view, so this is rare. Wait for news, briefly.
                    let _ = self.wait_for_epoch_after(epoch.min(theirs), Duration::from_millis(5)).await;
                }
                Ok(answer) => return answer,
                Err(_) if op.is_retryable() => {
                    let _ = self.wait_for_epoch_after(epoch, VIEW_WAIT).await;
                }
                Err(_) => return Err(ClusterError::NodeLost { kind, rank, retried: true }),
            }
        }
        Err(ClusterError::Transport(format!("{kind} `{name}`: gave up after {MAX_ATTEMPTS} attempts to reach its owner")))
    }
}

impl ClusterShared {
    /// An actor operation goes to its node (chosen round robin for a spawn without a rank).
    async fn request_actor(&self, mut op: Op) -> Answer {
        let deadline = tokio::time::Instant::now() + VIEW_WAIT;
        loop {
            let attempt = {
                let mut state = self.state();
                let epoch = state.view.epoch;
                if state.nodes.is_empty() {
                    Err(epoch)
                } else {
                    if let Op::ActorSpawn { rank: rank @ None, .. } = &mut op {
                        let ranks: Vec<u32> = state.nodes.keys().copied().collect();
                        *rank = Some(ranks[state.next_actor_node % ranks.len()]);
                        state.next_actor_node += 1;
                    }
                    let Some((Some(rank), node_id)) = op.actor_target() else { unreachable!("an actor operation") };
                    let node = state.nodes.get(&rank).filter(|n| node_id.is_none_or(|id| id == n.node_id));
                    let Some(node) = node else {
                        let reason = format!("its node (rank {rank}) is not in the pool any more (lost or replaced)");
                        return Err(ClusterError::ActorDead { actor: String::new(), reason });
                    };
                    let shared = Arc::clone(&node.shared);
                    let (id, rx) = self.expect_answer(&mut state, rank);
                    Ok((epoch, rank, shared, id, rx))
                }
            };
            let (epoch, rank, shared, id, rx) = match attempt {
                Ok(a) => a,
                Err(epoch) => {
                    if tokio::time::Instant::now() >= deadline || !self.wait_for_epoch_after(epoch, VIEW_WAIT).await {
                        return Err(ClusterError::Unavailable("no node is ready to host an actor".into()));
                    }
                    continue;
                }
            };
            let bytes = codec::to_bytes(&op).map_err(|e| ClusterError::Transport(e.to_string()))?;
            // One actor's messages share a lane, so they arrive in the order they were sent.
            let key = match &op {
                Op::ActorCall { actor, .. } | Op::ActorStop { actor, .. } => Some(*actor),
                _ => Some(0),
            };
            if !shared.send_cluster(ToWorker::ClusterRequest { id, op: bytes }, key) {
                self.state().pending.remove(&id);
                if tokio::time::Instant::now() >= deadline {
                    return Err(ClusterError::NodeLost { kind: Kind::Actor, rank, retried: false });
                }
                let _ = self.wait_for_epoch_after(epoch, Duration::from_millis(50)).await;
                continue;
            }
            return match rx.await {
                Ok(answer) => answer,
                Err(_) => Err(ClusterError::NodeLost { kind: Kind::Actor, rank, retried: true }),
            };
        }
    }

    /// Send raw bytes as a collection operation to the node of `rank` (tests of bad input).
    pub(crate) async fn raw_request(&self, rank: u32, op: Vec<u8>) -> Answer {
        let (shared, id, rx) = {
            let mut state = self.state();
            let shared = state
                .nodes
                .get(&rank)
                .map(|n| Arc::clone(&n.shared))
                .ok_or_else(|| ClusterError::Unavailable(format!("no node {rank}")))?;
            let (id, rx) = self.expect_answer(&mut state, rank);
            (shared, id, rx)
        };
        shared.send_control([ToWorker::ClusterRequest { id, op }]);
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(answer)) => answer,
            _ => Err(ClusterError::Transport("no answer".into())),
        }
    }
}

/// The coordinator's transport for collection handles: the pool's cluster and its id.
pub(crate) struct CoordinatorTransport(pub(crate) Arc<ClusterShared>, pub(crate) String);

impl skyward_function::collections::Transport for CoordinatorTransport {
    fn request(&self, op: Op) -> BoxFuture<'static, Answer> {
        let cluster = Arc::clone(&self.0);
        Box::pin(async move { cluster.request(op).await })
    }

    fn rank(&self) -> Option<u32> {
        None
    }

    fn pool_id(&self) -> Option<String> {
        Some(self.1.clone())
    }
}
