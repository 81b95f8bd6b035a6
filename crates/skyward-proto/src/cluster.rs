//! The worker cluster's data plane as plain state: operations on distributed collections, the
//! slot table that places them, and the [`Store`] each node keeps its share in.
//!
//! Placement: every collection cell (a dict key, or a whole set/counter/queue/barrier/lock) hashes
//! to one of [`SLOTS`] slots; the coordinator's [`ClusterView`] names each slot's primary and
//! backup node. Operations run on the primary; every change they make is shipped to the backup
//! as [`Mutation`]s before the caller gets its answer, so losing one node loses nothing that was
//! acknowledged. Like the rest of this crate: no clock reads, no sockets, no tokio.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::Time;

/// Number of placement slots. Fixed for the protocol version.
pub const SLOTS: u32 = 256;

/// Kinds of collection. The kind is part of a cell's identity: a dict and a counter may share a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// Key-value map, spread per key.
    Dict,
    /// Set of values.
    Set,
    /// Atomic integer.
    Counter,
    /// FIFO queue.
    Queue,
    /// Barrier for a fixed number of parties.
    Barrier,
    /// Lease-based mutual exclusion.
    Lock,
    /// A remote actor (not a collection: addressed to its node, not placed by hash).
    Actor,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Kind::Dict => "dict",
            Kind::Set => "set",
            Kind::Counter => "counter",
            Kind::Queue => "queue",
            Kind::Barrier => "barrier",
            Kind::Lock => "lock",
            Kind::Actor => "actor",
        };
        f.write_str(s)
    }
}

/// Who is calling: a task on a node (its rank) or the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    /// Rank of the node the task runs on; `None` for the coordinator.
    pub rank: Option<u32>,
    /// Distinguishes callers on one node (a random id per handle).
    pub id: u64,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "rank {rank}"),
            None => f.write_str("the coordinator"),
        }
    }
}

/// One operation on a collection. Values and keys are opaque bytes (encoded by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The value under `key`.
    DictGet {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Set `key` to `value`; answers the previous value.
    DictInsert {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove `key`; answers the removed value.
    DictRemove {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Whether `key` is present.
    DictContains {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Add a value; answers whether it was new.
    SetAdd {
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove a value; answers whether it was there.
    SetDiscard {
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Whether a value is in the set.
    SetContains {
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Number of values.
    SetLen { name: String },
    /// Add `delta` (may be negative); answers the new value.
    CounterAdd { name: String, delta: i64 },
    /// Set to zero; answers the old value.
    CounterReset { name: String },
    /// The current value.
    CounterGet { name: String },
    /// Append a value.
    QueuePut {
        name: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Take the oldest value, waiting up to `timeout` for one.
    QueueGet { name: String, timeout: Duration },
    /// Number of values queued.
    QueueLen { name: String },
    /// Wait until `parties` callers have arrived.
    BarrierWait { name: String, parties: u32, caller: Caller },
    /// How many callers wait at the barrier now.
    BarrierWaiting { name: String },
    /// Take the lock for `lease`, waiting up to `timeout`.
    LockAcquire { name: String, caller: Caller, lease: Duration, timeout: Duration },
    /// Extend the lease of the holder with `token`.
    LockRenew { name: String, token: u64, lease: Duration },
    /// Give the lock back.
    LockRelease { name: String, token: u64 },
    /// Start an actor of a registered type on node `rank` (`None`: the router picks, round robin).
    ActorSpawn {
        /// Registered actor type name.
        type_name: String,
        /// The executable that registers it.
        binary: crate::message::BinaryHash,
        /// Encoded constructor arguments.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
        /// Where to start it.
        rank: Option<u32>,
    },
    /// Send a message to an actor; `reply: false` is a cast (answered once it is queued).
    ActorCall {
        /// Node hosting the actor.
        rank: u32,
        /// Its node id (a replacement node with the same rank does not host it).
        node_id: String,
        /// Actor id on that node.
        actor: u64,
        /// Encoded message.
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
        /// Whether the caller waits for the handler's answer.
        reply: bool,
    },
    /// Stop an actor.
    ActorStop {
        /// Node hosting the actor.
        rank: u32,
        /// Its node id.
        node_id: String,
        /// Actor id on that node.
        actor: u64,
    },
}

impl Op {
    /// The collection kind and name this operation addresses.
    pub fn target(&self) -> (Kind, &str) {
        match self {
            Op::DictGet { name, .. } | Op::DictInsert { name, .. } | Op::DictRemove { name, .. } | Op::DictContains { name, .. } => {
                (Kind::Dict, name)
            }
            Op::SetAdd { name, .. } | Op::SetDiscard { name, .. } | Op::SetContains { name, .. } | Op::SetLen { name } => (Kind::Set, name),
            Op::CounterAdd { name, .. } | Op::CounterReset { name } | Op::CounterGet { name } => (Kind::Counter, name),
            Op::QueuePut { name, .. } | Op::QueueGet { name, .. } | Op::QueueLen { name } => (Kind::Queue, name),
            Op::BarrierWait { name, .. } | Op::BarrierWaiting { name } => (Kind::Barrier, name),
            Op::LockAcquire { name, .. } | Op::LockRenew { name, .. } | Op::LockRelease { name, .. } => (Kind::Lock, name),
            Op::ActorSpawn { type_name, .. } => (Kind::Actor, type_name),
            Op::ActorCall { node_id, .. } | Op::ActorStop { node_id, .. } => (Kind::Actor, node_id),
        }
    }

    /// For actor operations: the node they go to (`None` inside: the router picks one).
    pub fn actor_target(&self) -> Option<(Option<u32>, Option<&str>)> {
        match self {
            Op::ActorSpawn { rank, .. } => Some((*rank, None)),
            Op::ActorCall { rank, node_id, .. } | Op::ActorStop { rank, node_id, .. } => Some((Some(*rank), Some(node_id))),
            _ => None,
        }
    }

    /// The cell this operation lives in.
    pub fn cell(&self) -> CellKey {
        let (kind, name) = self.target();
        let key = match self {
            Op::DictGet { key, .. } | Op::DictInsert { key, .. } | Op::DictRemove { key, .. } | Op::DictContains { key, .. } => key.clone(),
            _ => Vec::new(),
        };
        CellKey { kind, name: name.to_string(), key }
    }

    /// Whether the operation may be sent again to the new primary after its node was lost:
    /// reads, and lock acquisition (if the lost node had granted it, the caller waits out its own
    /// lease and is told so).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Op::LockAcquire { .. }
                | Op::DictGet { .. }
                | Op::DictContains { .. }
                | Op::SetContains { .. }
                | Op::SetLen { .. }
                | Op::CounterGet { .. }
                | Op::QueueLen { .. }
                | Op::BarrierWaiting { .. }
        )
    }
}

/// Identity of one cell: kind, collection name, and (dicts only) the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CellKey {
    /// Collection kind.
    pub kind: Kind,
    /// Collection name.
    pub name: String,
    /// Dict key; empty for the other kinds.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

impl CellKey {
    /// The slot this cell is placed in: FNV-1a over kind, name and key (stable across processes
    /// and versions of Rust, unlike `std`'s hasher).
    pub fn slot(&self) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        eat(&[self.kind as u8]);
        eat(self.name.as_bytes());
        eat(&[0xff]);
        eat(&self.key);
        // Fold the high bits in: FNV's low bits alone spread short keys poorly.
        ((h ^ (h >> 32)) % u64::from(SLOTS)) as u32
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A value, or none (dict get/insert/remove, queue get).
    Value(Option<serde_bytes::ByteBuf>),
    /// Yes or no (contains, add, discard, release).
    Bool(bool),
    /// A counter value.
    Int(i64),
    /// A size.
    Len(u64),
    /// Done, nothing to say.
    Unit,
    /// The lock is yours.
    Lock {
        /// Token to renew and release with.
        token: u64,
        /// Increases with every grant of this lock (a fencing token for external resources).
        fencing: u64,
        /// Set when the previous holder did not release: why it lost the lock.
        taken_over: Option<String>,
    },
    /// The barrier opened.
    Barrier {
        /// How many times this barrier has opened before.
        generation: u64,
    },
    /// An actor started.
    Actor {
        /// Its node's rank.
        rank: u32,
        /// Its node's id.
        node_id: String,
        /// Its id on that node.
        actor: u64,
    },
    /// An actor's answer, encoded.
    Bytes(serde_bytes::ByteBuf),
}

/// Why an operation failed. Travels on the wire; every variant says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    /// The pool runs without a worker cluster.
    #[error(
        "collections and remote actors need a worker cluster, but this pool runs in standalone mode (each worker reached on its own over SSH); hint: start the pool in cluster mode (Options {{ cluster: Some(true), .. }}) on a provider whose nodes share a network (Local, Container, AWS, GCP, ...)"
    )]
    Standalone,
    /// No node is ready yet, or the caller is not inside a pool.
    #[error("no worker cluster is reachable: {0}")]
    Unavailable(String),
    /// The node asked is not the primary for this cell in its view (the caller retries).
    #[error("node is not the owner of this {kind} (its view is epoch {epoch})")]
    NotOwner {
        /// Kind of the collection.
        kind: Kind,
        /// The answering node's view epoch.
        epoch: u64,
    },
    /// The node holding the cell was lost before it answered.
    #[error("node {rank} holding this {kind} was lost, or its connection dropped, before it answered{}", if *retried { " (the operation may or may not have taken effect)" } else { "" })]
    NodeLost {
        /// Kind of the collection.
        kind: Kind,
        /// Rank of the lost node.
        rank: u32,
        /// Whether the operation changes state (so it may have been applied).
        retried: bool,
    },
    /// A barrier can never open: a participant's node is gone.
    #[error("barrier `{name}` cannot open: {reason}; arrived: ranks {arrived:?} ({} of {parties})", arrived.len())]
    BarrierBroken {
        /// Barrier name.
        name: String,
        /// Parties it waits for.
        parties: u32,
        /// Ranks that had arrived (`u32::MAX` for the coordinator).
        arrived: Vec<u32>,
        /// What happened, naming the missing ranks.
        reason: String,
    },
    /// Two callers disagree on a barrier's size.
    #[error("barrier `{name}` waits for {expected} parties; this caller said {got}")]
    BarrierMismatch {
        /// Barrier name.
        name: String,
        /// Parties the waiting callers named.
        expected: u32,
        /// Parties this caller named.
        got: u32,
    },
    /// The caller's lease ran out or its token is stale.
    #[error("lock `{name}` is no longer held by this caller: {reason}")]
    LockLost {
        /// Lock name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Waited the whole timeout.
    #[error("{what} `{name}` timed out after {timeout:?}")]
    Timeout {
        /// What was waited on.
        what: Kind,
        /// Its name.
        name: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The request did not decode on the node: unknown operation or collection type, or garbage.
    #[error("the node could not decode the request ({0}); do the coordinator and workers run the same Skyward version?")]
    BadRequest(String),
    /// A value did not decode as the type the caller asked for.
    #[error("{kind} `{name}`: a stored value does not decode as `{type_name}`: {reason}")]
    Decode {
        /// Kind of the collection.
        kind: Kind,
        /// Its name.
        name: String,
        /// The Rust type asked for.
        type_name: String,
        /// The decoder's message.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode a value for {kind} `{name}`: {reason}")]
    Encode {
        /// Kind of the collection.
        kind: Kind,
        /// Its name.
        name: String,
        /// The encoder's message.
        reason: String,
    },
    /// The actor's handler returned an error; the actor keeps running.
    #[error("actor {actor}: the handler failed: {error}")]
    ActorFailed {
        /// Which actor.
        actor: String,
        /// What the handler returned.
        error: Box<crate::error::RemoteError>,
    },
    /// The actor is gone: it panicked, was stopped, or its node or executor ended.
    #[error("actor {actor} is dead: {reason}")]
    ActorDead {
        /// Which actor.
        actor: String,
        /// Why.
        reason: String,
    },
    /// No actor type of that name is registered in the binary.
    #[error(
        "actor type `{0}` is not registered in this binary; was it registered with skyward::actor!(..) and does the pool run the same binary?"
    )]
    UnknownActorType(String),
    /// Anything else (transport failures), in words.
    #[error("cluster transport: {0}")]
    Transport(String),
}

/// A slot's owners, by rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotOwners {
    /// Rank that serves the slot.
    pub primary: u32,
    /// Rank that keeps a copy, if the pool has a second node.
    pub backup: Option<u32>,
}

/// A member of the worker cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Rank.
    pub rank: u32,
    /// Node id (its certificate name is `<node_id>.worker.skyward`).
    pub node_id: String,
    /// Address other workers dial (`ip:port`).
    pub addr: String,
}

/// The coordinator's word on membership and placement, numbered by `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterView {
    /// Increases with every change.
    pub epoch: u64,
    /// Current members.
    pub members: Vec<Member>,
    /// Owners of each slot, `SLOTS` entries (empty before the first placement).
    pub slots: Vec<SlotOwners>,
}

/// What changed from the view of epoch `base` to the view of `epoch`: sent instead of the whole
/// view to a node that holds `base`, so a change costs each node a few members, not all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// Epoch of the view this produces.
    pub epoch: u64,
    /// Epoch of the view it applies to.
    pub base: u64,
    /// Members that joined (a rank taken over by a new node appears here with the new node).
    pub joined: Vec<Member>,
    /// Ranks that left (or whose node was replaced).
    pub left: Vec<u32>,
    /// The whole slot table (`SLOTS` entries: small).
    pub slots: Vec<SlotOwners>,
}

impl ClusterView {
    /// The change from `self` to `next`.
    pub fn change_to(&self, next: &ClusterView) -> ViewChange {
        let before: std::collections::HashMap<u32, &Member> = self.members.iter().map(|m| (m.rank, m)).collect();
        let after: std::collections::HashMap<u32, &Member> = next.members.iter().map(|m| (m.rank, m)).collect();
        let left = self.members.iter().filter(|m| after.get(&m.rank).copied() != Some(m)).map(|m| m.rank).collect();
        let joined = next.members.iter().filter(|m| before.get(&m.rank).copied() != Some(m)).cloned().collect();
        ViewChange { epoch: next.epoch, base: self.epoch, joined, left, slots: next.slots.clone() }
    }

    /// Apply `change`; `false` (nothing applied) when it was made from another epoch.
    pub fn apply(&mut self, change: ViewChange) -> bool {
        if change.base != self.epoch {
            return false;
        }
        self.members.retain(|m| !change.left.contains(&m.rank));
        self.members.extend(change.joined);
        self.members.sort_by_key(|m| m.rank);
        self.slots = change.slots;
        self.epoch = change.epoch;
        true
    }

    /// Owners of the slot `cell` lives in.
    pub fn owners(&self, cell: &CellKey) -> Option<SlotOwners> {
        self.slots.get(cell.slot() as usize).copied()
    }

    /// The member with `rank`.
    pub fn member(&self, rank: u32) -> Option<&Member> {
        self.members.iter().find(|m| m.rank == rank)
    }

    /// Initial placement over `ranks`: primaries round robin, each slot's backup on the next rank.
    pub fn place(ranks: &[u32]) -> Vec<SlotOwners> {
        let mut ranks = ranks.to_vec();
        ranks.sort_unstable();
        ranks.dedup();
        if ranks.is_empty() {
            return Vec::new();
        }
        let n = ranks.len();
        (0..SLOTS as usize).map(|s| SlotOwners { primary: ranks[s % n], backup: (n > 1).then(|| ranks[(s + 1) % n]) }).collect()
    }

    /// Placement after `lost` left: its primaries go to their backups, and every slot that lost
    /// a copy gets a new backup among `alive` (the one holding the fewest backups).
    pub fn without(slots: &[SlotOwners], lost: u32, alive: &[u32]) -> Vec<SlotOwners> {
        let alive: Vec<u32> = alive.iter().copied().filter(|r| *r != lost).collect();
        let mut out: Vec<SlotOwners> = slots
            .iter()
            .map(|s| {
                if s.primary == lost {
                    match s.backup {
                        Some(b) if b != lost => SlotOwners { primary: b, backup: None },
                        // No copy survives (a one-node pool): the slot starts empty elsewhere.
                        _ => SlotOwners { primary: alive.first().copied().unwrap_or(lost), backup: None },
                    }
                } else if s.backup == Some(lost) {
                    SlotOwners { primary: s.primary, backup: None }
                } else {
                    *s
                }
            })
            .collect();
        fill_backups(&mut out, &alive);
        out
    }

    /// Placement after `joined` arrived: it takes the backup role of slots that have none. No
    /// role moves away from a node that holds the data: moving a backup would leave the slot with
    /// one real copy until the newcomer's snapshot is acknowledged. (Balance is restored by the
    /// next loss, whose slots get new backups among all live nodes.)
    pub fn with(slots: &[SlotOwners], joined: u32, alive: &[u32]) -> Vec<SlotOwners> {
        let mut alive: Vec<u32> = alive.to_vec();
        if !alive.contains(&joined) {
            alive.push(joined);
        }
        let mut out = slots.to_vec();
        fill_backups(&mut out, &alive);
        out
    }
}

fn fill_backups(slots: &mut [SlotOwners], alive: &[u32]) {
    let mut counts: BTreeMap<u32, usize> = alive.iter().map(|r| (*r, 0)).collect();
    for s in slots.iter() {
        if let Some(b) = s.backup {
            *counts.entry(b).or_default() += 1;
        }
    }
    for s in slots.iter_mut().filter(|s| s.backup.is_none()) {
        let pick = counts.iter().filter(|(r, _)| **r != s.primary).min_by_key(|(r, c)| (**c, **r)).map(|(r, _)| *r);
        if let Some(r) = pick {
            s.backup = Some(r);
            *counts.entry(r).or_default() += 1;
        }
    }
}

/// State of one lock.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockState {
    /// Current holder: caller, token, lease expiry (in the primary's time).
    pub holder: Option<(Caller, u64, Duration)>,
    /// Grants so far.
    pub fencing: u64,
    /// Why the last holder lost the lock without releasing it, told to the next holder.
    pub taken_over: Option<String>,
}

/// A cell's state as it is copied to a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellState {
    /// A dict value.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A set's members.
    Set(Vec<serde_bytes::ByteBuf>),
    /// A counter.
    Counter(i64),
    /// A queue, oldest first.
    Queue(Vec<serde_bytes::ByteBuf>),
    /// A lock.
    Lock(LockState),
}

/// One change a primary ships to its backup, applied there in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Replace a cell.
    Put(CellKey, CellState),
    /// Remove a cell.
    Delete(CellKey),
    /// Add to a set.
    SetAdd(CellKey, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Remove from a set.
    SetRemove(CellKey, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Append to a queue.
    QueuePush(CellKey, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Drop a queue's oldest value.
    QueuePop(CellKey),
    /// Forget every cell of a slot (first step of a snapshot to a new backup).
    ResetSlot(u32),
}

/// Messages between two workers of the cluster, on the stream the dialling worker opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Run an operation here (this node should be its primary). The operation is encoded on its
    /// own, so one this node cannot decode gets a typed answer instead of breaking the stream.
    Request {
        /// Request id, unique per stream.
        id: u64,
        /// The postcard-encoded [`Op`].
        #[serde(with = "serde_bytes")]
        op: Vec<u8>,
    },
    /// Answer to a request.
    Reply {
        /// Request id.
        id: u64,
        /// The answer.
        result: Result<Reply, ClusterError>,
    },
    /// Apply these changes as the backup, then acknowledge.
    Replicate {
        /// Batch id.
        id: u64,
        /// The changes, in order.
        mutations: Vec<Mutation>,
    },
    /// The batch is applied.
    Replicated {
        /// Batch id.
        id: u64,
    },
}

impl Mutation {
    /// The cell the change is about (`None` for a whole-slot reset).
    pub fn cell(&self) -> Option<&CellKey> {
        match self {
            Mutation::Put(c, _)
            | Mutation::Delete(c)
            | Mutation::SetAdd(c, _)
            | Mutation::SetRemove(c, _)
            | Mutation::QueuePush(c, _)
            | Mutation::QueuePop(c) => Some(c),
            Mutation::ResetSlot(_) => None,
        }
    }
}

/// In-memory cell.
#[derive(Debug, Clone)]
enum Cell {
    Value(Vec<u8>),
    Set(HashSet<Vec<u8>>),
    Counter(i64),
    Queue(VecDeque<Vec<u8>>),
    Lock(LockState),
    Barrier(BarrierState),
}

#[derive(Debug, Clone, Default)]
struct BarrierState {
    parties: u32,
    generation: u64,
    arrived: Vec<(u64, Caller)>,
}

/// Requests parked until something happens (a queue put, a lock release, a barrier filling).
#[derive(Debug, Clone)]
struct Parked {
    request: u64,
    caller: Option<Caller>,
    lease: Duration,
    deadline: Option<Time>,
    timeout: Duration,
}

/// The outcome of feeding the store: answers to send (possibly to requests parked earlier) and
/// the mutations to ship to the backup before sending them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// `(request, answer)` pairs, in order.
    pub replies: Vec<(u64, Result<Reply, ClusterError>)>,
    /// Changes for the backup.
    pub mutations: Vec<Mutation>,
}

impl Step {
    fn reply(&mut self, request: u64, answer: Result<Reply, ClusterError>) {
        self.replies.push((request, answer));
    }
}

/// One node's share of the cluster's collections: the cells it is primary or backup for.
#[derive(Debug, Default)]
pub struct Store {
    cells: HashMap<CellKey, Cell>,
    parked: HashMap<CellKey, VecDeque<Parked>>,
    /// Keys of lock cells (kept so timeouts need not scan every cell; a key whose cell is gone
    /// is skipped).
    locks: HashSet<CellKey>,
}

/// `now + d`, saturating: "wait forever" (`Duration::MAX`) must not overflow.
fn after(now: Time, d: Duration) -> Time {
    now.checked_add(d).unwrap_or(Duration::MAX)
}

/// A lock state as it travels to a backup: the holder's lease as *time left* at `now` (each node
/// counts time from its own epoch, so absolute expiries mean nothing elsewhere).
fn lock_for_wire(state: &LockState, now: Time) -> LockState {
    let mut out = state.clone();
    if let Some((_, _, expiry)) = &mut out.holder {
        *expiry = expiry.saturating_sub(now);
    }
    out
}

fn buf(v: &[u8]) -> Option<serde_bytes::ByteBuf> {
    Some(serde_bytes::ByteBuf::from(v.to_vec()))
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cells held (primary and backup).
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Run `op` (request id `request`) as the cell's primary at `now`.
    pub fn apply(&mut self, request: u64, op: Op, now: Time) -> Step {
        let mut step = Step::default();
        let cell = op.cell();
        match op {
            Op::ActorSpawn { .. } | Op::ActorCall { .. } | Op::ActorStop { .. } => {
                step.reply(request, Err(ClusterError::BadRequest("an actor operation reached the collection store".into())));
            }
            Op::DictGet { .. } => {
                let value = match self.cells.get(&cell) {
                    Some(Cell::Value(v)) => buf(v),
                    _ => None,
                };
                step.reply(request, Ok(Reply::Value(value)));
            }
            Op::DictContains { .. } => {
                let present = matches!(self.cells.get(&cell), Some(Cell::Value(_)));
                step.reply(request, Ok(Reply::Bool(present)));
            }
            Op::DictInsert { value, .. } => {
                step.mutations.push(Mutation::Put(cell.clone(), CellState::Value(value.clone())));
                let old = self.cells.insert(cell, Cell::Value(value));
                let old = match old {
                    Some(Cell::Value(v)) => Some(serde_bytes::ByteBuf::from(v)),
                    _ => None,
                };
                step.reply(request, Ok(Reply::Value(old)));
            }
            Op::DictRemove { .. } => {
                let old = match self.cells.remove(&cell) {
                    Some(Cell::Value(v)) => {
                        step.mutations.push(Mutation::Delete(cell));
                        Some(serde_bytes::ByteBuf::from(v))
                    }
                    _ => None,
                };
                step.reply(request, Ok(Reply::Value(old)));
            }
            Op::SetAdd { value, .. } => {
                let set = self.set_mut(&cell);
                let added = set.insert(value.clone());
                if added {
                    step.mutations.push(Mutation::SetAdd(cell, value));
                }
                step.reply(request, Ok(Reply::Bool(added)));
            }
            Op::SetDiscard { value, .. } => {
                let removed = self.set_mut(&cell).remove(&value);
                if removed {
                    step.mutations.push(Mutation::SetRemove(cell, value));
                }
                step.reply(request, Ok(Reply::Bool(removed)));
            }
            Op::SetContains { value, .. } => {
                let present = matches!(self.cells.get(&cell), Some(Cell::Set(s)) if s.contains(&value));
                step.reply(request, Ok(Reply::Bool(present)));
            }
            Op::SetLen { .. } => {
                let len = match self.cells.get(&cell) {
                    Some(Cell::Set(s)) => s.len() as u64,
                    _ => 0,
                };
                step.reply(request, Ok(Reply::Len(len)));
            }
            Op::CounterAdd { delta, .. } => {
                let value = match self.cells.get(&cell) {
                    Some(Cell::Counter(v)) => *v,
                    _ => 0,
                }
                .wrapping_add(delta);
                self.cells.insert(cell.clone(), Cell::Counter(value));
                step.mutations.push(Mutation::Put(cell, CellState::Counter(value)));
                step.reply(request, Ok(Reply::Int(value)));
            }
            Op::CounterReset { .. } => {
                let old = match self.cells.insert(cell.clone(), Cell::Counter(0)) {
                    Some(Cell::Counter(v)) => v,
                    _ => 0,
                };
                step.mutations.push(Mutation::Put(cell, CellState::Counter(0)));
                step.reply(request, Ok(Reply::Int(old)));
            }
            Op::CounterGet { .. } => {
                let value = match self.cells.get(&cell) {
                    Some(Cell::Counter(v)) => *v,
                    _ => 0,
                };
                step.reply(request, Ok(Reply::Int(value)));
            }
            Op::QueuePut { value, .. } => {
                // A waiting getter takes it directly: the queue's stored state does not change.
                if let Some(waiter) = self.parked.get_mut(&cell).and_then(VecDeque::pop_front) {
                    step.reply(waiter.request, Ok(Reply::Value(buf(&value))));
                } else {
                    self.queue_mut(&cell).push_back(value.clone());
                    step.mutations.push(Mutation::QueuePush(cell, value));
                }
                step.reply(request, Ok(Reply::Unit));
            }
            Op::QueueGet { timeout, .. } => {
                let front = match self.cells.get_mut(&cell) {
                    Some(Cell::Queue(q)) => q.pop_front(),
                    _ => None,
                };
                match front {
                    Some(v) => {
                        step.mutations.push(Mutation::QueuePop(cell));
                        step.reply(request, Ok(Reply::Value(Some(serde_bytes::ByteBuf::from(v)))));
                    }
                    None if timeout.is_zero() => step.reply(request, Ok(Reply::Value(None))),
                    None => self
                        .park(cell, Parked { request, caller: None, lease: Duration::ZERO, deadline: Some(after(now, timeout)), timeout }),
                }
            }
            Op::QueueLen { .. } => {
                let len = match self.cells.get(&cell) {
                    Some(Cell::Queue(q)) => q.len() as u64,
                    _ => 0,
                };
                step.reply(request, Ok(Reply::Len(len)));
            }
            Op::BarrierWait { name, parties, caller } => {
                let barrier = match self.cells.entry(cell.clone()).or_insert_with(|| Cell::Barrier(BarrierState::default())) {
                    Cell::Barrier(b) => b,
                    other => {
                        *other = Cell::Barrier(BarrierState::default());
                        let Cell::Barrier(b) = other else { unreachable!("just set") };
                        b
                    }
                };
                if barrier.arrived.is_empty() {
                    barrier.parties = parties;
                } else if barrier.parties != parties {
                    step.reply(request, Err(ClusterError::BarrierMismatch { name, expected: barrier.parties, got: parties }));
                    return step;
                }
                barrier.arrived.push((request, caller));
                if barrier.arrived.len() as u32 >= barrier.parties.max(1) {
                    let generation = barrier.generation;
                    barrier.generation += 1;
                    for (waiter, _) in barrier.arrived.drain(..) {
                        step.reply(waiter, Ok(Reply::Barrier { generation }));
                    }
                }
            }
            Op::BarrierWaiting { .. } => {
                let waiting = match self.cells.get(&cell) {
                    Some(Cell::Barrier(b)) => b.arrived.len() as u64,
                    _ => 0,
                };
                step.reply(request, Ok(Reply::Len(waiting)));
            }
            Op::LockAcquire { caller, lease, timeout, .. } => {
                self.expire_lock(&cell, now, &mut step);
                let free = matches!(self.cells.get(&cell), None | Some(Cell::Lock(LockState { holder: None, .. })));
                if free {
                    self.grant(&cell, request, caller, lease, now, &mut step);
                } else if timeout.is_zero() {
                    step.reply(request, Err(ClusterError::Timeout { what: Kind::Lock, name: cell.name.clone(), timeout }));
                } else {
                    self.park(cell, Parked { request, caller: Some(caller), lease, deadline: Some(after(now, timeout)), timeout });
                }
            }
            Op::LockRenew { name, token, lease } => {
                self.expire_lock(&cell, now, &mut step);
                let renewed = match self.cells.get_mut(&cell) {
                    Some(Cell::Lock(LockState { holder: Some((_, t, expiry)), .. })) if *t == token => {
                        *expiry = after(now, lease);
                        true
                    }
                    _ => false,
                };
                if renewed {
                    step.reply(request, Ok(Reply::Unit));
                } else {
                    let reason = self.lock_loss_reason(&cell);
                    step.reply(request, Err(ClusterError::LockLost { name, reason }));
                }
            }
            Op::LockRelease { token, .. } => {
                self.expire_lock(&cell, now, &mut step);
                let held = matches!(self.cells.get(&cell), Some(Cell::Lock(LockState { holder: Some((_, t, _)), .. })) if *t == token);
                if held {
                    if let Some(Cell::Lock(state)) = self.cells.get_mut(&cell) {
                        state.holder = None;
                        state.taken_over = None;
                    }
                    self.lock_changed(&cell, now, &mut step);
                }
                step.reply(request, Ok(Reply::Bool(held)));
            }
        }
        step
    }

    fn lock_loss_reason(&self, cell: &CellKey) -> String {
        match self.cells.get(cell) {
            Some(Cell::Lock(LockState { holder: Some((c, _, _)), .. })) => format!("it is now held by {c}"),
            Some(Cell::Lock(LockState { taken_over: Some(why), .. })) => why.clone(),
            _ => "its lease ran out or it was released".to_string(),
        }
    }

    fn set_mut(&mut self, cell: &CellKey) -> &mut HashSet<Vec<u8>> {
        let entry = self.cells.entry(cell.clone()).or_insert_with(|| Cell::Set(HashSet::new()));
        if !matches!(entry, Cell::Set(_)) {
            *entry = Cell::Set(HashSet::new());
        }
        match entry {
            Cell::Set(s) => s,
            _ => unreachable!("just set"),
        }
    }

    fn queue_mut(&mut self, cell: &CellKey) -> &mut VecDeque<Vec<u8>> {
        let entry = self.cells.entry(cell.clone()).or_insert_with(|| Cell::Queue(VecDeque::new()));
        if !matches!(entry, Cell::Queue(_)) {
            *entry = Cell::Queue(VecDeque::new());
        }
        match entry {
            Cell::Queue(q) => q,
            _ => unreachable!("just set"),
        }
    }

    fn park(&mut self, cell: CellKey, parked: Parked) {
        self.parked.entry(cell).or_default().push_back(parked);
    }

    fn grant(&mut self, cell: &CellKey, request: u64, caller: Caller, lease: Duration, now: Time, step: &mut Step) {
        self.locks.insert(cell.clone());
        let entry = self.cells.entry(cell.clone()).or_insert_with(|| Cell::Lock(LockState::default()));
        if !matches!(entry, Cell::Lock(_)) {
            *entry = Cell::Lock(LockState::default());
        }
        let Cell::Lock(state) = entry else { unreachable!("just set") };
        state.fencing += 1;
        // The token is the fencing number: it is replicated with the lock, so a new primary
        // never hands out a token an older holder still has.
        let token = state.fencing;
        state.holder = Some((caller, token, after(now, lease)));
        let taken_over = state.taken_over.take();
        let fencing = state.fencing;
        step.mutations.push(Mutation::Put(cell.clone(), CellState::Lock(lock_for_wire(state, now))));
        step.reply(request, Ok(Reply::Lock { token, fencing, taken_over }));
    }

    /// Free the lock if its holder's lease ran out, remembering why.
    fn expire_lock(&mut self, cell: &CellKey, now: Time, step: &mut Step) {
        let expired = match self.cells.get_mut(cell) {
            Some(Cell::Lock(state)) => match &state.holder {
                Some((caller, _, expiry)) if *expiry <= now => {
                    state.taken_over = Some(format!("the previous holder ({caller}) let its lease run out without releasing"));
                    state.holder = None;
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if expired {
            self.lock_changed(cell, now, step);
        }
    }

    /// The lock became free: hand it to the first waiter, or record the free state.
    fn lock_changed(&mut self, cell: &CellKey, now: Time, step: &mut Step) {
        match self.parked.get_mut(cell).and_then(VecDeque::pop_front) {
            Some(Parked { request, caller: Some(caller), lease, .. }) => self.grant(cell, request, caller, lease, now, step),
            _ => {
                if let Some(Cell::Lock(state)) = self.cells.get(cell) {
                    step.mutations.push(Mutation::Put(cell.clone(), CellState::Lock(lock_for_wire(state, now))));
                }
            }
        }
    }

    /// Apply a primary's mutations (this node is the backup) at `now`.
    pub fn replicate(&mut self, mutations: Vec<Mutation>, now: Time) {
        for m in mutations {
            match m {
                Mutation::Put(cell, state) => {
                    let cell_state = match state {
                        CellState::Value(v) => Cell::Value(v),
                        CellState::Set(s) => Cell::Set(s.into_iter().map(|b| b.into_vec()).collect()),
                        CellState::Counter(v) => Cell::Counter(v),
                        CellState::Queue(q) => Cell::Queue(q.into_iter().map(|b| b.into_vec()).collect()),
                        CellState::Lock(mut l) => {
                            if let Some((_, _, left)) = &mut l.holder {
                                *left = after(now, *left);
                            }
                            self.locks.insert(cell.clone());
                            Cell::Lock(l)
                        }
                    };
                    self.cells.insert(cell, cell_state);
                }
                Mutation::Delete(cell) => {
                    self.cells.remove(&cell);
                }
                Mutation::SetAdd(cell, v) => {
                    self.set_mut(&cell).insert(v);
                }
                Mutation::SetRemove(cell, v) => {
                    self.set_mut(&cell).remove(&v);
                }
                Mutation::QueuePush(cell, v) => self.queue_mut(&cell).push_back(v),
                Mutation::QueuePop(cell) => {
                    self.queue_mut(&cell).pop_front();
                }
                Mutation::ResetSlot(slot) => self.cells.retain(|k, _| k.slot() != slot),
            }
        }
    }

    /// Every cell of `slot` as mutations that rebuild it on a new backup (barriers stay: they are
    /// not copied).
    pub fn snapshot(&self, slot: u32, now: Time) -> Vec<Mutation> {
        let mut out = vec![Mutation::ResetSlot(slot)];
        for (key, cell) in self.cells.iter().filter(|(k, _)| k.slot() == slot) {
            let state = match cell {
                Cell::Value(v) => CellState::Value(v.clone()),
                Cell::Set(s) => CellState::Set(s.iter().map(|v| serde_bytes::ByteBuf::from(v.clone())).collect()),
                Cell::Counter(v) => CellState::Counter(*v),
                Cell::Queue(q) => CellState::Queue(q.iter().map(|v| serde_bytes::ByteBuf::from(v.clone())).collect()),
                Cell::Lock(l) => CellState::Lock(lock_for_wire(l, now)),
                Cell::Barrier(_) => continue,
            };
            out.push(Mutation::Put(key.clone(), state));
        }
        out
    }

    /// Forget cells of slots this node neither serves nor backs up any more.
    pub fn retain_slots(&mut self, keep: impl Fn(u32) -> bool) {
        self.cells.retain(|k, _| keep(k.slot()));
        self.locks.retain(|k| self.cells.contains_key(k));
        // Requests parked on cells this node no longer serves are answered by the caller's view
        // change (it re-sends them to the new owner).
        self.parked.retain(|k, _| keep(k.slot()));
    }

    /// Requests parked on slots this node stopped serving: answer them with `NotOwner` so their
    /// callers retry at the new primary.
    pub fn unpark_moved(&mut self, serves: impl Fn(u32) -> bool, epoch: u64) -> Step {
        let mut step = Step::default();
        let moved: Vec<CellKey> = self.parked.keys().filter(|k| !serves(k.slot())).cloned().collect();
        for cell in moved {
            for p in self.parked.remove(&cell).unwrap_or_default() {
                step.reply(p.request, Err(ClusterError::NotOwner { kind: cell.kind, epoch }));
            }
        }
        let barriers: Vec<CellKey> =
            self.cells.iter().filter(|(k, c)| matches!(c, Cell::Barrier(_)) && !serves(k.slot())).map(|(k, _)| k.clone()).collect();
        for cell in barriers {
            if let Some(Cell::Barrier(b)) = self.cells.remove(&cell) {
                for (request, _) in b.arrived {
                    step.reply(request, Err(ClusterError::NotOwner { kind: Kind::Barrier, epoch }));
                }
            }
        }
        step
    }

    /// Nodes with the ranks `lost` left the pool (`live`: the ranks still in it). In the slots this
    /// node serves (`serves`; copies held as a backup are the primary's business): locks the lost
    /// nodes held are freed (the next waiter is told why), and a barrier fails when it can no
    /// longer fill: a lost node had arrived at it (its task is gone), or the callers waiting plus
    /// one per live node not yet there are fewer than its parties.
    pub fn nodes_lost(&mut self, lost: &[u32], live: &[u32], now: Time, serves: impl Fn(u32) -> bool) -> Step {
        let mut step = Step::default();
        let locks: Vec<CellKey> = self
            .cells
            .iter()
            .filter(|(k, _)| serves(k.slot()))
            .filter_map(|(k, c)| match c {
                Cell::Lock(LockState { holder: Some((caller, _, _)), .. }) if caller.rank.is_some_and(|r| lost.contains(&r)) => {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect();
        for cell in locks {
            if let Some(Cell::Lock(state)) = self.cells.get_mut(&cell)
                && let Some((caller, _, _)) = state.holder.take()
            {
                state.taken_over = Some(format!("the previous holder ({caller}) was lost with its node"));
            }
            self.lock_changed(&cell, now, &mut step);
        }
        let barriers: Vec<CellKey> = self
            .cells
            .iter()
            .filter(|(k, c)| serves(k.slot()) && matches!(c, Cell::Barrier(b) if !b.arrived.is_empty()))
            .map(|(k, _)| k.clone())
            .collect();
        for cell in barriers {
            let Some(Cell::Barrier(b)) = self.cells.get_mut(&cell) else { continue };
            let arrived: Vec<u32> = b.arrived.iter().map(|(_, c)| c.rank.unwrap_or(u32::MAX)).collect();
            let parties = b.parties;
            let lost_arrived: Vec<u32> = arrived.iter().copied().filter(|r| lost.contains(r)).collect();
            let could_come = live.iter().filter(|r| !arrived.contains(r)).count();
            let reason = if !lost_arrived.is_empty() {
                format!("node(s) {lost_arrived:?} were lost while waiting at it")
            } else if arrived.len() + could_come < parties as usize {
                let missing: Vec<u32> = lost.to_vec();
                format!("node(s) {missing:?} were lost before reaching it, and the live nodes cannot fill its {parties} parties")
            } else {
                continue;
            };
            for (request, _) in std::mem::take(&mut b.arrived) {
                step.reply(
                    request,
                    Err(ClusterError::BarrierBroken { name: cell.name.clone(), parties, arrived: arrived.clone(), reason: reason.clone() }),
                );
            }
        }
        step
    }

    /// Forget a parked request (its caller went away).
    pub fn cancel(&mut self, request: u64) {
        for queue in self.parked.values_mut() {
            queue.retain(|p| p.request != request);
        }
        for cell in self.cells.values_mut() {
            if let Cell::Barrier(b) = cell {
                b.arrived.retain(|(r, _)| *r != request);
            }
        }
    }

    /// The next time something expires in the slots this node serves (a parked request's
    /// timeout or a lock's lease).
    pub fn poll_timeout(&self, serves: impl Fn(u32) -> bool) -> Option<Time> {
        let parked = self.parked.values().flatten().filter_map(|p| p.deadline).min();
        let leases = self
            .locks
            .iter()
            .filter(|k| serves(k.slot()))
            .filter_map(|k| self.cells.get(k))
            .filter_map(|c| match c {
                Cell::Lock(LockState { holder: Some((_, _, expiry)), .. }) => Some(*expiry),
                _ => None,
            })
            .min();
        parked.into_iter().chain(leases).min()
    }

    /// Expire what is due at `now` in the slots this node serves.
    pub fn handle_timeout(&mut self, now: Time, serves: impl Fn(u32) -> bool) -> Step {
        let mut step = Step::default();
        for (cell, queue) in self.parked.iter_mut() {
            queue.retain(|p| {
                if p.deadline.is_some_and(|d| d <= now) {
                    let answer = match cell.kind {
                        Kind::Queue => Ok(Reply::Value(None)),
                        kind => Err(ClusterError::Timeout { what: kind, name: cell.name.clone(), timeout: p.timeout }),
                    };
                    step.reply(p.request, answer);
                    false
                } else {
                    true
                }
            });
        }
        let expired: Vec<CellKey> = self
            .locks
            .iter()
            .filter(|k| serves(k.slot()))
            .filter(|k| matches!(self.cells.get(*k), Some(Cell::Lock(LockState { holder: Some((_, _, e)), .. })) if *e <= now))
            .cloned()
            .collect();
        for cell in expired {
            self.expire_lock(&cell, now, &mut step);
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Time = Duration::ZERO;

    fn view(epoch: u64, members: &[(u32, &str)]) -> ClusterView {
        let members: Vec<Member> =
            members.iter().map(|(r, id)| Member { rank: *r, node_id: (*id).to_string(), addr: format!("10.0.0.{r}:1") }).collect();
        let ranks: Vec<u32> = members.iter().map(|m| m.rank).collect();
        ClusterView { epoch, members, slots: ClusterView::place(&ranks) }
    }

    #[test]
    fn a_view_change_carries_only_what_changed_and_rebuilds_the_view() {
        let old = view(3, &[(0, "a"), (1, "b"), (2, "c"), (3, "d")]);
        // Rank 1 replaced by a new node, rank 3 gone, rank 4 new.
        let new = view(4, &[(0, "a"), (1, "b2"), (2, "c"), (4, "e")]);
        let change = old.change_to(&new);
        assert_eq!(change.left, vec![1, 3]);
        assert_eq!(change.joined.iter().map(|m| m.node_id.as_str()).collect::<Vec<_>>(), vec!["b2", "e"]);
        let mut held = old.clone();
        assert!(held.apply(change.clone()));
        assert_eq!(held, new);
        // Made from another epoch: refused, nothing applied.
        let mut other = view(2, &[(0, "a")]);
        assert!(!other.apply(change));
        assert_eq!(other, view(2, &[(0, "a")]));
    }

    fn dict_insert(name: &str, key: &str, value: &str) -> Op {
        Op::DictInsert { name: name.into(), key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() }
    }

    fn one(step: Step) -> Result<Reply, ClusterError> {
        assert_eq!(step.replies.len(), 1, "{step:?}");
        step.replies.into_iter().next().unwrap().1
    }

    fn caller(rank: u32) -> Caller {
        Caller { rank: Some(rank), id: u64::from(rank) }
    }

    #[test]
    fn slots_are_stable_and_spread() {
        let a = CellKey { kind: Kind::Dict, name: "d".into(), key: b"k1".to_vec() };
        assert_eq!(a.slot(), a.clone().slot());
        let used: HashSet<u32> =
            (0..2000).map(|i| CellKey { kind: Kind::Dict, name: "d".into(), key: format!("{i}").into_bytes() }.slot()).collect();
        assert!(used.len() > 200, "2000 keys used only {} of {SLOTS} slots", used.len());
        // The kind is part of the identity.
        let c = CellKey { kind: Kind::Counter, name: "d".into(), key: Vec::new() };
        let s = CellKey { kind: Kind::Set, name: "d".into(), key: Vec::new() };
        assert_ne!((c.kind, c.slot()), (s.kind, s.slot()));
    }

    #[test]
    fn dict_operations_and_their_replication() {
        let mut primary = Store::new();
        let mut backup = Store::new();
        let step = primary.apply(1, dict_insert("d", "a", "1"), T0);
        assert_eq!(step.replies, vec![(1, Ok(Reply::Value(None)))]);
        backup.replicate(step.mutations, T0);
        let step = primary.apply(2, dict_insert("d", "a", "2"), T0);
        assert_eq!(one(step.clone()), Ok(Reply::Value(buf(b"1"))));
        backup.replicate(step.mutations, T0);
        let get = Op::DictGet { name: "d".into(), key: b"a".to_vec() };
        assert_eq!(one(backup.apply(3, get.clone(), T0)), Ok(Reply::Value(buf(b"2"))), "the backup holds the latest value");
        let step = primary.apply(4, Op::DictRemove { name: "d".into(), key: b"a".to_vec() }, T0);
        backup.replicate(step.mutations.clone(), T0);
        assert_eq!(one(step), Ok(Reply::Value(buf(b"2"))));
        assert_eq!(one(backup.apply(5, get, T0)), Ok(Reply::Value(None)));
        assert_eq!(one(primary.apply(6, Op::DictContains { name: "d".into(), key: b"a".to_vec() }, T0)), Ok(Reply::Bool(false)));
        // Reads change nothing, so nothing is shipped.
        assert!(primary.apply(7, Op::DictGet { name: "d".into(), key: b"zz".to_vec() }, T0).mutations.is_empty());
    }

    #[test]
    fn set_counter_and_queue() {
        let mut s = Store::new();
        let add = |v: &str| Op::SetAdd { name: "s".into(), value: v.as_bytes().to_vec() };
        assert_eq!(one(s.apply(1, add("x"), T0)), Ok(Reply::Bool(true)));
        assert_eq!(one(s.apply(2, add("x"), T0)), Ok(Reply::Bool(false)));
        assert_eq!(one(s.apply(3, add("y"), T0)), Ok(Reply::Bool(true)));
        assert_eq!(one(s.apply(4, Op::SetLen { name: "s".into() }, T0)), Ok(Reply::Len(2)));
        assert_eq!(one(s.apply(5, Op::SetDiscard { name: "s".into(), value: b"x".to_vec() }, T0)), Ok(Reply::Bool(true)));
        assert_eq!(one(s.apply(6, Op::SetContains { name: "s".into(), value: b"x".to_vec() }, T0)), Ok(Reply::Bool(false)));

        assert_eq!(one(s.apply(7, Op::CounterAdd { name: "c".into(), delta: 5 }, T0)), Ok(Reply::Int(5)));
        assert_eq!(one(s.apply(8, Op::CounterAdd { name: "c".into(), delta: -2 }, T0)), Ok(Reply::Int(3)));
        assert_eq!(one(s.apply(9, Op::CounterReset { name: "c".into() }, T0)), Ok(Reply::Int(3)));
        assert_eq!(one(s.apply(10, Op::CounterGet { name: "c".into() }, T0)), Ok(Reply::Int(0)));

        let put = |v: &str| Op::QueuePut { name: "q".into(), value: v.as_bytes().to_vec() };
        let get = |t: u64| Op::QueueGet { name: "q".into(), timeout: Duration::from_millis(t) };
        s.apply(11, put("1"), T0);
        s.apply(12, put("2"), T0);
        assert_eq!(one(s.apply(13, Op::QueueLen { name: "q".into() }, T0)), Ok(Reply::Len(2)));
        assert_eq!(one(s.apply(14, get(0), T0)), Ok(Reply::Value(buf(b"1"))), "FIFO");
        assert_eq!(one(s.apply(15, get(0), T0)), Ok(Reply::Value(buf(b"2"))));
        assert_eq!(one(s.apply(16, get(0), T0)), Ok(Reply::Value(None)), "empty, no wait");
        // A getter parks; a put hands it the value; a second getter times out.
        assert!(s.apply(17, get(100), T0).replies.is_empty());
        assert!(s.apply(18, get(100), T0).replies.is_empty());
        let step = s.apply(19, put("3"), Duration::from_millis(10));
        assert_eq!(step.replies, vec![(17, Ok(Reply::Value(buf(b"3")))), (19, Ok(Reply::Unit))]);
        assert!(step.mutations.is_empty(), "handed over directly, nothing stored");
        assert_eq!(s.poll_timeout(|_| true), Some(Duration::from_millis(100)));
        assert_eq!(s.handle_timeout(Duration::from_millis(100), |_| true).replies, vec![(18, Ok(Reply::Value(None)))]);
        assert_eq!(s.poll_timeout(|_| true), None);
    }

    #[test]
    fn barrier_opens_for_all_parties_together_and_breaks_on_a_lost_node() {
        let mut s = Store::new();
        let wait = |rank: u32| Op::BarrierWait { name: "b".into(), parties: 3, caller: caller(rank) };
        assert!(s.apply(1, wait(0), T0).replies.is_empty());
        assert!(s.apply(2, wait(1), T0).replies.is_empty());
        let step = s.apply(3, wait(2), T0);
        let released: Vec<u64> = step.replies.iter().map(|(r, _)| *r).collect();
        assert_eq!(released, vec![1, 2, 3]);
        assert!(step.replies.iter().all(|(_, a)| *a == Ok(Reply::Barrier { generation: 0 })));
        // Next round: rank 2 dies before arriving.
        s.apply(4, wait(0), T0);
        s.apply(5, wait(1), T0);
        // A node that was no participant's is lost while three live nodes could still fill it:
        // the barrier waits on.
        assert!(s.nodes_lost(&[7], &[0, 1, 2], T0, |_| true).replies.is_empty());
        let step = s.nodes_lost(&[2], &[0, 1], T0, |_| true);
        assert_eq!(step.replies.len(), 2);
        for (_, answer) in step.replies {
            let Err(ClusterError::BarrierBroken { arrived, reason, .. }) = answer else { panic!("{answer:?}") };
            assert_eq!(arrived, vec![0, 1]);
            assert!(reason.contains("[2]"), "{reason}");
        }
        let mismatch = {
            s.apply(6, wait(0), T0);
            s.apply(7, Op::BarrierWait { name: "b".into(), parties: 4, caller: caller(1) }, T0)
        };
        assert!(matches!(one(mismatch), Err(ClusterError::BarrierMismatch { expected: 3, got: 4, .. })));
    }

    #[test]
    fn lock_is_exclusive_leased_and_handed_over_with_the_reason() {
        let mut s = Store::new();
        let lease = Duration::from_secs(10);
        let acquire = |rank: u32, timeout: u64| Op::LockAcquire {
            name: "l".into(),
            caller: caller(rank),
            lease,
            timeout: Duration::from_secs(timeout),
        };
        let Ok(Reply::Lock { token: t1, fencing: 1, taken_over: None }) = one(s.apply(1, acquire(0, 5), T0)) else { panic!() };
        assert!(s.apply(2, acquire(1, 60), T0).replies.is_empty(), "second caller waits");
        // Release hands it to the waiter.
        let step = s.apply(3, Op::LockRelease { name: "l".into(), token: t1 }, Duration::from_secs(1));
        assert_eq!(step.replies.len(), 2);
        let Ok(Reply::Lock { token: t2, fencing: 2, taken_over: None }) = step.replies[0].1.clone() else { panic!("{step:?}") };
        assert_eq!(step.replies[1], (3, Ok(Reply::Bool(true))));
        // A stale token cannot release or renew.
        assert_eq!(one(s.apply(4, Op::LockRelease { name: "l".into(), token: t1 }, Duration::from_secs(1))), Ok(Reply::Bool(false)));
        assert!(matches!(
            one(s.apply(5, Op::LockRenew { name: "l".into(), token: t1, lease }, Duration::from_secs(1))),
            Err(ClusterError::LockLost { .. })
        ));
        // Rank 2 waits; rank 1 (holder) stops renewing: at lease end rank 2 gets it and is told.
        assert!(s.apply(6, acquire(2, 60), Duration::from_secs(2)).replies.is_empty());
        assert_eq!(s.poll_timeout(|_| true), Some(Duration::from_secs(11)));
        let step = s.handle_timeout(Duration::from_secs(11), |_| true);
        let Ok(Reply::Lock { token: t3, fencing: 3, taken_over: Some(why) }) = one(step) else { panic!() };
        assert!(why.contains("rank 1") && why.contains("lease"), "{why}");
        assert_ne!(t2, t3);
        // Rank 3 waits; rank 2's node is lost: rank 3 gets it at once.
        assert!(s.apply(7, acquire(3, 60), Duration::from_secs(12)).replies.is_empty());
        let step = s.nodes_lost(&[2], &[0, 1, 3], Duration::from_secs(12), |_| true);
        let Ok(Reply::Lock { fencing: 4, taken_over: Some(why), .. }) = one(step) else { panic!() };
        assert!(why.contains("rank 2") && why.contains("lost"), "{why}");
        // A caller with no patience gets a timeout error.
        assert!(matches!(one(s.apply(8, acquire(4, 0), Duration::from_secs(12))), Err(ClusterError::Timeout { what: Kind::Lock, .. })));
    }

    #[test]
    fn leases_travel_as_time_left_and_forever_does_not_overflow() {
        let (mut primary, mut backup) = (Store::new(), Store::new());
        let at = |secs: u64| Duration::from_secs(secs);
        // The primary's clock reads 100 s, the backup's 5 s: the lease must still end 10 s later.
        let acquire = Op::LockAcquire { name: "l".into(), caller: caller(0), lease: at(10), timeout: Duration::MAX };
        let step = primary.apply(1, acquire.clone(), at(100));
        let Ok(Reply::Lock { token, .. }) = step.replies[0].1.clone() else { panic!("{step:?}") };
        backup.replicate(step.mutations, at(5));
        assert_eq!(backup.poll_timeout(|_| true), Some(at(15)));
        // Waiting "forever" parks without overflowing.
        assert!(primary.apply(2, acquire, at(100)).replies.is_empty());
        assert!(primary.apply(3, Op::QueueGet { name: "q".into(), timeout: Duration::MAX }, at(100)).replies.is_empty());
        assert_eq!(primary.poll_timeout(|_| true), Some(at(110)));
        // A backup's copies expire nothing: only the slots a node serves count.
        assert_eq!(backup.poll_timeout(|_| false), None);
        assert!(backup.handle_timeout(at(1000), |_| false).replies.is_empty());
        // The token is the fencing number, which travels with the lock.
        let step = backup.apply(4, Op::LockRelease { name: "l".into(), token }, at(6));
        assert_eq!(one(step), Ok(Reply::Bool(true)));
    }

    #[test]
    fn snapshot_rebuilds_a_slot_on_a_new_backup() {
        let mut primary = Store::new();
        for i in 0..50 {
            primary.apply(i, dict_insert("d", &format!("k{i}"), "v"), T0);
        }
        primary.apply(100, Op::QueuePut { name: "q".into(), value: b"x".to_vec() }, T0);
        let mut backup = Store::new();
        // Stale data in the backup is wiped by the snapshot.
        backup.apply(0, dict_insert("d", "k0", "stale"), T0);
        for slot in 0..SLOTS {
            backup.replicate(primary.snapshot(slot, T0), T0);
        }
        assert_eq!(backup.len(), primary.len());
        assert_eq!(one(backup.apply(1, Op::DictGet { name: "d".into(), key: b"k0".to_vec() }, T0)), Ok(Reply::Value(buf(b"v"))));
        assert_eq!(one(backup.apply(2, Op::QueueLen { name: "q".into() }, T0)), Ok(Reply::Len(1)));
    }

    #[test]
    fn placement_spreads_survives_a_loss_and_takes_in_a_replacement() {
        let slots = ClusterView::place(&[0, 1, 2]);
        assert_eq!(slots.len(), SLOTS as usize);
        for s in &slots {
            assert_ne!(Some(s.primary), s.backup);
        }
        let primaries = |slots: &[SlotOwners], r: u32| slots.iter().filter(|s| s.primary == r).count();
        assert!((85..=86).contains(&primaries(&slots, 1)));
        // Rank 1 lost: its primaries move to their backups (which hold the data); every slot has
        // two live copies again.
        let after = ClusterView::without(&slots, 1, &[0, 2]);
        for (before, now) in slots.iter().zip(&after) {
            if before.primary == 1 {
                assert_eq!(Some(now.primary), before.backup, "promoted the backup");
            } else {
                assert_eq!(now.primary, before.primary, "other primaries stay");
            }
            assert!(now.primary != 1 && now.backup != Some(1) && now.backup.is_some() && now.backup != Some(now.primary));
        }
        // A replacement with rank 1 joins: no role moves away from a node holding the data.
        let joined = ClusterView::with(&after, 1, &[0, 2, 1]);
        assert_eq!(joined, after);
        // In a one-node pool, a newcomer becomes every slot's backup.
        let grown = ClusterView::with(&ClusterView::place(&[0]), 1, &[0, 1]);
        assert!(grown.iter().all(|s| s.primary == 0 && s.backup == Some(1)));
        // A one-node pool: no backups, and losing the node moves slots to the next one.
        let single = ClusterView::place(&[5]);
        assert!(single.iter().all(|s| s.primary == 5 && s.backup.is_none()));
    }
}
