//! Errors of the protocol layer and the structured error a remote task reports.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong while decoding or validating traffic from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame announced a length over the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The bytes of a frame did not decode as the expected message.
    #[error("malformed {what} frame: {reason}")]
    Malformed {
        /// Which message type was expected.
        what: &'static str,
        /// The decoder's reason.
        reason: String,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks v{peer}, this side speaks v{ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u32,
        /// Our version.
        ours: u32,
    },
    /// The peer belongs to another pool.
    #[error("handshake for pool {peer} reached a worker of pool {ours}")]
    WrongPool {
        /// Pool id the peer announced.
        peer: String,
        /// Our pool id.
        ours: String,
    },
    /// A message arrived that is not valid in the session's current state.
    #[error("unexpected {what} in state {state}")]
    Unexpected {
        /// The message.
        what: &'static str,
        /// The session state.
        state: &'static str,
    },
}

/// An error raised by a task on a worker, carried back with its structure intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure this is.
    pub kind: RemoteErrorKind,
    /// Rust type name of the error value, when known (e.g. `std::io::Error`).
    pub type_name: String,
    /// The error's own message (its `Display`).
    pub message: String,
    /// Messages of the error's `source()` chain, outermost first, not including `message`.
    pub chain: Vec<String>,
    /// `file:line:column` of the panic, for panics.
    pub location: Option<String>,
}

/// Broad class of a [`RemoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The function returned `Err`.
    Returned,
    /// The function panicked.
    Panic,
    /// The executor process died (abort, segfault, killed) while running the task.
    ExecutorDied,
    /// The function name is not registered in the binary.
    UnknownFunction,
    /// Arguments or result failed to (de)serialize.
    Codec,
    /// A command task could not be started or failed.
    Command,
    /// The worker itself failed to run the task.
    Worker,
}

impl RemoteError {
    /// Build an error of `kind` with just a message.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self { kind, type_name: String::new(), message: message.into(), chain: Vec::new(), location: None }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RemoteErrorKind::Panic => write!(f, "remote panic")?,
            RemoteErrorKind::ExecutorDied => write!(f, "remote executor died")?,
            RemoteErrorKind::UnknownFunction => write!(f, "unknown remote function")?,
            RemoteErrorKind::Codec => write!(f, "remote codec error")?,
            RemoteErrorKind::Command => write!(f, "remote command failed")?,
            RemoteErrorKind::Worker => write!(f, "worker error")?,
            RemoteErrorKind::Returned => write!(f, "remote error")?,
        }
        if !self.type_name.is_empty() {
            write!(f, " ({})", self.type_name)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(location) = &self.location {
            write!(f, " at {location}")?;
        }
        for cause in &self.chain {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RemoteError {}

/// Why a task did not produce a value, as seen by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TaskError {
    /// The task ran and failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The task exceeded its timeout.
    #[error("task timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The task was cancelled before it finished.
    #[error("task cancelled")]
    Cancelled,
    /// Every attempt ended on a node that was lost.
    #[error("task failed on {attempts} lost node(s); retry limit reached")]
    NodesLost {
        /// Attempts made.
        attempts: u32,
    },
    /// The pool has shut down.
    #[error("pool is shut down")]
    PoolClosed,
}
