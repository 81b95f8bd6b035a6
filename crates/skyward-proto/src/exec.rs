//! Messages between a worker and its executor (the user's program in executor role) over the
//! node-local socket. Same framing and codec as the wire protocol.

use crate::error::RemoteError;
use crate::message::InstanceInfo;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Worker to executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToExecutor {
    /// Run a registered function.
    Call {
        /// Call id, unique per executor connection.
        id: u64,
        /// Registered name.
        name: String,
        /// Encoded arguments: in the message, or in the coordinator's shared memory.
        args: crate::message::Args,
        /// Node facts for the task context; `None`: the same as the last call on this connection
        /// that carried them (the worker sends them again only when they change).
        #[serde(with = "crate::message::shared_opt")]
        info: Option<Arc<InstanceInfo>>,
        /// Whether the function yields a stream.
        streaming: bool,
        /// Stream items the executor may send before waiting for credit.
        credit: u32,
    },
    /// More stream credit for a call.
    Credit {
        /// Call id.
        id: u64,
        /// Additional items.
        items: u32,
    },
    /// Abort a call; no reply is expected.
    Cancel {
        /// Call id.
        id: u64,
    },
    /// An actor operation (the worker checked the target is this node).
    Actor {
        /// Request id.
        id: u64,
        /// What to do.
        op: ActorOp,
    },
    /// Answer to [`FromExecutor::Cluster`].
    ClusterReply {
        /// Request id.
        id: u64,
        /// The answer.
        result: Result<crate::cluster::Reply, crate::cluster::ClusterError>,
    },
}

/// Executor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromExecutor {
    /// Sent once after connecting.
    Ready {
        /// Process id of the executor.
        pid: u32,
        /// Number of functions registered in the binary.
        functions: u32,
    },
    /// One stream item.
    Item {
        /// Call id.
        id: u64,
        /// Encoded item.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A call finished.
    Done {
        /// Call id.
        id: u64,
        /// Encoded result or the error.
        result: Result<serde_bytes::ByteBuf, RemoteError>,
    },
    /// Answer to [`ToExecutor::Actor`]: the handler's encoded answer (empty for spawn, stop, cast).
    ActorDone {
        /// Request id.
        id: u64,
        /// The answer.
        result: Result<serde_bytes::ByteBuf, crate::cluster::ClusterError>,
    },
    /// A task asks for a collection operation (`skyward::dict(..)` and friends).
    Cluster {
        /// Request id, unique per executor.
        id: u64,
        /// The postcard-encoded [`crate::cluster::Op`].
        #[serde(with = "serde_bytes")]
        op: Vec<u8>,
    },
}

/// An actor operation inside an executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorOp {
    /// Start actor `actor` (an id the worker chose) of a registered type.
    Spawn {
        /// Actor id.
        actor: u64,
        /// Registered type name.
        type_name: String,
        /// Encoded constructor arguments.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
    },
    /// Deliver a message; `reply: false` answers once it is queued.
    Call {
        /// Actor id.
        actor: u64,
        /// Encoded message.
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
        /// Wait for the handler.
        reply: bool,
    },
    /// Stop the actor after the messages already queued.
    Stop {
        /// Actor id.
        actor: u64,
    },
}

/// Environment variable holding the SHA-256 (hex) of the executor's own executable, so tasks can
/// spawn actors of their own binary.
pub const ENV_BINARY_HASH: &str = "SKYWARD_BINARY_HASH";

/// Environment variable naming the role a Skyward-enabled program starts in.
pub const ENV_ROLE: &str = "SKYWARD_ROLE";
/// Value of [`ENV_ROLE`] for the executor role.
pub const ROLE_EXECUTOR: &str = "executor";
/// Value of [`ENV_ROLE`] for the embedded worker role.
pub const ROLE_WORKER: &str = "worker";
/// Environment variable holding the executor socket path.
pub const ENV_EXECUTOR_SOCKET: &str = "SKYWARD_EXECUTOR_SOCKET";
