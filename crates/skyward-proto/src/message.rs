//! The messages of the wire protocol.
//!
//! Two directions, two closed enums: [`ToWorker`] (coordinator to worker) and [`ToCoordinator`]
//! (worker to coordinator). Every task-scoped message carries its [`TaskId`], so the session logic
//! does not depend on which stream a frame arrived on.

use crate::error::RemoteError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// serde for a value shared behind an `Arc` (the `rc` feature of serde would rebuild every crate
/// that uses serde): the value itself on the wire, a fresh `Arc` once decoded.
pub mod shared {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::sync::Arc;

    /// Encode the shared value.
    pub fn serialize<T: Serialize, S: Serializer>(value: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
        (**value).serialize(s)
    }

    /// Decode into a fresh `Arc`.
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Arc<T>, D::Error> {
        T::deserialize(d).map(Arc::new)
    }
}

/// [`shared`] for an optional value.
pub mod shared_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::sync::Arc;

    /// Encode the shared value, or none.
    pub fn serialize<T: Serialize, S: Serializer>(value: &Option<Arc<T>>, s: S) -> Result<S::Ok, S::Error> {
        value.as_deref().serialize(s)
    }

    /// Decode into a fresh `Arc`, or none.
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<T>>, D::Error> {
        Option::<T>::deserialize(d).map(|value| value.map(Arc::new))
    }
}

/// Identifier of one task in one pool, unique for the pool's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// SHA-256 of an executable, the key under which a node caches it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BinaryHash(pub [u8; 32]);

impl BinaryHash {
    /// Lower-case hex form, used as a file name.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for BinaryHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", &self.to_hex()[..12])
    }
}

/// Facts about the node a task runs on, handed to every task (`skyward::instance_info()`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// This node's rank, 0-based, stable for the node's lifetime.
    pub rank: u32,
    /// Number of nodes in the pool when the task was dispatched.
    pub node_count: u32,
    /// Address of the rank-0 node, as other nodes can reach it.
    pub head_addr: String,
    /// Addresses of all nodes, by rank.
    pub peers: Vec<String>,
    /// The pool this node belongs to.
    pub pool_id: String,
    /// Accelerators the worker detected on its machine.
    pub accelerators: Vec<String>,
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskKind {
    /// Call a registered function in the executor.
    Function {
        /// Registered name (module path and function name).
        name: String,
        /// The executable that registers it; the node must hold it.
        binary: BinaryHash,
        /// serde-encoded arguments: in the message, or in the coordinator's shared memory when
        /// the node runs on its machine.
        args: Args,
        /// Whether the function yields a stream of items.
        streaming: bool,
    },
    /// Run a command on the node.
    Command(CommandSpec),
}

/// A function call's encoded arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Args {
    /// In the message. Shared by every copy of the task (a broadcast's nodes, the session's
    /// record for resume) and not copied into large frames (`codec::shared_bytes`).
    Inline(#[serde(with = "crate::codec::shared_bytes")] bytes::Bytes),
    /// In a sealed shared-memory object of another process on the same machine: large arguments
    /// to a node on the coordinator's machine cross no socket (`skyward_net::shm`).
    Shared(SharedMemory),
}

impl Args {
    /// Bytes the arguments add to a message.
    pub fn inline_len(&self) -> usize {
        match self {
            Args::Inline(bytes) => bytes.len(),
            Args::Shared(_) => 0,
        }
    }
}

impl From<bytes::Bytes> for Args {
    fn from(bytes: bytes::Bytes) -> Self {
        Args::Inline(bytes)
    }
}

/// A sealed shared-memory object (a memfd) of a process on this machine, opened through
/// `/proc/<pid>/fd/<fd>`. `inode` and `len` identify it: a descriptor number reused for another
/// object is refused, not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedMemory {
    /// The process holding it open.
    pub pid: u32,
    /// Its descriptor in that process.
    pub fd: i32,
    /// Its inode number.
    pub inode: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// A worker's proof that it runs on the reader's machine and that its memory objects can be
/// opened there: a shared-memory object whose contents are `token`. A coordinator that can open
/// it and reads the token may hand the worker arguments in shared memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryProbe {
    /// The object.
    pub at: SharedMemory,
    /// Its contents (random, per worker process).
    pub token: [u8; 16],
}

/// A command task: argv, environment, working directory and timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// Program and arguments. Must not be empty.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory, if not the worker's own.
    pub cwd: Option<String>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
}

/// One task as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// What to run.
    pub kind: TaskKind,
    /// Membership changes since the last task on the same stream (a full snapshot on a new
    /// stream); `None` when the stream is current. See [`crate::members`].
    pub members: Option<crate::members::MembersUpdate>,
    /// Node facts for `instance_info()`: not on the wire; the worker builds them from the
    /// stream's membership.
    #[serde(skip)]
    pub info: Option<Arc<InstanceInfo>>,
    /// Initial stream credit (items the worker may send before waiting for more).
    pub initial_credit: u32,
}

/// Which output stream of a command a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The final outcome of a task on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The function's serialized return value, or a command's exit status encoded as
    /// [`CommandExit`] with postcard.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The task failed.
    Error(RemoteError),
    /// The task was cancelled on request.
    Cancelled,
}

/// How a command task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandExit {
    /// Exit code, if the process exited normally.
    pub code: Option<i32>,
    /// Signal number, if the process was killed by one.
    pub signal: Option<i32>,
}

/// Handshake sent by the worker when it connects, on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the worker speaks.
    pub version: u32,
    /// Pool the worker was started for.
    pub pool_id: String,
    /// The node id the coordinator gave the worker.
    pub node_id: String,
    /// Worker facts.
    pub worker: WorkerFacts,
    /// Tasks the worker still holds from an earlier connection (running or with a cached result).
    pub held_tasks: Vec<TaskId>,
}

/// Facts a worker reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkerFacts {
    /// `std::env::consts::ARCH` of the worker (e.g. `x86_64`).
    pub arch: String,
    /// C library of the machine: `glibc`, `musl` or `none`.
    pub libc: String,
    /// Host name.
    pub hostname: String,
    /// Concurrent task slots the worker offers.
    pub concurrency: u32,
    /// Accelerators detected.
    pub accelerators: Vec<String>,
    /// Worker version.
    pub worker_version: String,
    /// Where the worker can be handed arguments in shared memory, when it runs on the
    /// coordinator's machine (`None`: it cannot make a probe).
    pub memory_probe: Option<MemoryProbe>,
    /// Where a coordinator on this machine can open lanes over a Unix socket instead of QUIC
    /// (`None`: the worker listens for none).
    pub local_lanes: Option<LocalLanes>,
    /// The CPUs the worker may run on (its affinity mask when it started; empty where unknown).
    /// A coordinator on the same machine sends a call to an idle node pinned to the caller's CPU
    /// first: no wake-up then crosses CPUs.
    pub cpus: Vec<u32>,
}

/// A worker's Unix socket for lanes from a coordinator on the same machine, and the secret the
/// first frame on each must carry (`ToWorker::OpenLocalLane`). Reported only inside the
/// authenticated QUIC session, so only the coordinator learns the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalLanes {
    /// Path of the socket (mode 0600, in a directory only the worker's user can enter).
    pub path: String,
    /// Random, per worker process.
    pub token: LaneToken,
}

/// The secret of a worker's local-lane socket. Its `Debug` does not show it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneToken(pub [u8; 16]);

impl LaneToken {
    /// Whether `other` is this token, in time independent of where they differ.
    pub fn matches(&self, other: &LaneToken) -> bool {
        self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for LaneToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LaneToken(<secret>)")
    }
}

/// Messages from the coordinator to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Handshake accepted.
    Welcome {
        /// Protocol version of the coordinator.
        version: u32,
        /// Rank assigned to the node.
        rank: u32,
    },
    /// Handshake refused; the worker should exit.
    Refused {
        /// Why.
        reason: String,
    },
    /// Liveness probe; answered with [`ToCoordinator::HeartbeatAck`].
    Heartbeat {
        /// Sequence number echoed back.
        seq: u64,
    },
    /// Run a task. A duplicate of a task the worker already ran is answered from its result cache.
    Submit {
        /// Task id.
        task: TaskId,
        /// What to run.
        spec: Box<TaskSpec>,
    },
    /// Stop a running task.
    Cancel {
        /// Task id.
        task: TaskId,
    },
    /// Allow `items` more stream items for a streaming task.
    Credit {
        /// Task id.
        task: TaskId,
        /// Additional items.
        items: u32,
        /// Items received so far; the worker may forget buffered items below this.
        received: u64,
    },
    /// After a reconnect: send the outcome of `task` if it is cached, or keep it running.
    Resume {
        /// Task id.
        task: TaskId,
        /// Stream items the coordinator already holds; later ones are sent again.
        items_received: u64,
    },
    /// The coordinator holds the outcome of `task`; the worker may drop its cached copy.
    Ack {
        /// Task id.
        task: TaskId,
    },
    /// Does the node hold this executable? Answered with [`ToCoordinator::BinaryStatus`].
    QueryBinary {
        /// Content hash.
        hash: BinaryHash,
    },
    /// First frame of a unidirectional stream that carries an executable: `len` raw bytes follow.
    /// The worker checks the hash and answers with [`ToCoordinator::BinaryStatus`].
    PutBinary {
        /// Content hash the bytes must have.
        hash: BinaryHash,
        /// Number of bytes that follow the frame.
        len: u64,
    },
    /// First frame of a long-lived bidirectional stream ("lane") that carries many small tasks:
    /// the worker answers each task on the lane its `Submit` arrived on and keeps the lane open.
    OpenLane,
    /// The worker should stop serving and exit.
    Shutdown,
    /// Cluster mode: the current membership and placement of the worker cluster. Shared: the
    /// coordinator queues one copy per change for all nodes, not one per node.
    ClusterView(#[serde(with = "shared")] Arc<crate::cluster::ClusterView>),
    /// Cluster mode: what changed since the view the node holds (it ignores a change made from
    /// another epoch; the coordinator sends a whole view on every new connection).
    ClusterViewChange(#[serde(with = "shared")] Arc<crate::cluster::ViewChange>),
    /// Run a collection operation on this node (the coordinator's own calls, e.g. `pool.dict()`).
    ClusterRequest {
        /// Request id, unique per connection.
        id: u64,
        /// The postcard-encoded [`crate::cluster::Op`].
        #[serde(with = "serde_bytes")]
        op: Vec<u8>,
    },
    /// First frame of a lane over the worker's local-lane Unix socket ([`LocalLanes`]): the
    /// secret from its facts. Anything else, or another secret, and the worker closes the socket.
    OpenLocalLane {
        /// [`LocalLanes::token`].
        token: LaneToken,
    },
}

/// Messages from a worker to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Handshake.
    Hello(Hello),
    /// Answer to a heartbeat.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// A line of a command's output.
    Output {
        /// Task id.
        task: TaskId,
        /// Which stream.
        stream: OutputStream,
        /// The line without its newline.
        line: String,
    },
    /// One item of a streaming task.
    Item {
        /// Task id.
        task: TaskId,
        /// Position of the item in the stream, from 0.
        seq: u64,
        /// serde-encoded item.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The task's final outcome.
    Done {
        /// Task id.
        task: TaskId,
        /// The outcome.
        outcome: Outcome,
    },
    /// Answer to `Resume` for a task the worker has no record of.
    UnknownTask {
        /// Task id.
        task: TaskId,
    },
    /// Answer to `QueryBinary`.
    BinaryStatus {
        /// Content hash.
        hash: BinaryHash,
        /// Whether the node holds it.
        present: bool,
    },
    /// Every slot this node serves under view `epoch` has reached its backup (snapshots to new
    /// backups acknowledged): from now on each of them has two copies.
    ClusterSynced {
        /// The view's epoch.
        epoch: u64,
    },
    /// Answer to [`ToWorker::ClusterRequest`].
    ClusterReply {
        /// Request id.
        id: u64,
        /// The answer.
        result: Result<crate::cluster::Reply, crate::cluster::ClusterError>,
    },
}

impl ToWorker {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToWorker::Welcome { .. } => "Welcome",
            ToWorker::Refused { .. } => "Refused",
            ToWorker::Heartbeat { .. } => "Heartbeat",
            ToWorker::Submit { .. } => "Submit",
            ToWorker::Cancel { .. } => "Cancel",
            ToWorker::Credit { .. } => "Credit",
            ToWorker::Resume { .. } => "Resume",
            ToWorker::Ack { .. } => "Ack",
            ToWorker::QueryBinary { .. } => "QueryBinary",
            ToWorker::PutBinary { .. } => "PutBinary",
            ToWorker::OpenLane => "OpenLane",
            ToWorker::Shutdown => "Shutdown",
            ToWorker::ClusterView(_) => "ClusterView",
            ToWorker::ClusterViewChange(_) => "ClusterViewChange",
            ToWorker::ClusterRequest { .. } => "ClusterRequest",
            ToWorker::OpenLocalLane { .. } => "OpenLocalLane",
        }
    }
}

impl ToCoordinator {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToCoordinator::Hello(_) => "Hello",
            ToCoordinator::HeartbeatAck { .. } => "HeartbeatAck",
            ToCoordinator::Output { .. } => "Output",
            ToCoordinator::Item { .. } => "Item",
            ToCoordinator::Done { .. } => "Done",
            ToCoordinator::UnknownTask { .. } => "UnknownTask",
            ToCoordinator::BinaryStatus { .. } => "BinaryStatus",
            ToCoordinator::ClusterReply { .. } => "ClusterReply",
            ToCoordinator::ClusterSynced { .. } => "ClusterSynced",
        }
    }

    /// The task a message belongs to, if any.
    pub fn task(&self) -> Option<TaskId> {
        match self {
            ToCoordinator::Output { task, .. }
            | ToCoordinator::Item { task, .. }
            | ToCoordinator::Done { task, .. }
            | ToCoordinator::UnknownTask { task } => Some(*task),
            _ => None,
        }
    }
}
