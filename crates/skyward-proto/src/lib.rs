//! Skyward's wire protocol as plain state machines: no tokio, no sockets, no clock reads.
//!
//! The transport glue (QUIC in `skyward-net`, later SSH) feeds bytes into [`codec::FrameDecoder`],
//! decoded messages into a [`session::CoordinatorSession`] or [`session::WorkerSession`] together with
//! the current time (a [`Time`], counted from an epoch the caller picks), and writes out whatever the
//! sessions hand back. Everything that can go wrong on the wire is a value, never a panic.

pub mod cache;
pub mod cluster;
pub mod codec;
pub mod error;
pub mod exec;
pub mod members;
pub mod message;
pub mod session;

pub use error::{ProtocolError, RemoteError, TaskError};
pub use message::*;

/// What a worker does when the coordinator has been silent longer than its `instance_timeout`.
/// The provider picks it (it knows what "ending the machine" means there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SilenceAction {
    /// Exit the worker process (local workers).
    #[default]
    Exit,
    /// Power the machine off (`poweroff`), then exit (cloud machines).
    Poweroff,
    /// Send SIGTERM to PID 1, then exit (containers whose init is `sshd`: the container ends).
    StopInit,
}

/// Version of the wire protocol. A peer that speaks another version is refused in the handshake.
pub const PROTOCOL_VERSION: u32 = 4;

/// A map keyed by ids (task, call and request ids, ranks): FxHash instead of SipHash, several
/// times cheaper per lookup on integer keys, and the hot path does a dozen lookups per task. The
/// ids come from this process or from an authenticated peer, never from an outsider who could
/// pick colliding keys.
pub type IdMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;

/// A point in time as the caller sees it: the duration since an epoch of its choosing.
///
/// The protocol never reads a clock; the glue passes `epoch.elapsed()` and tests pass virtual time.
pub type Time = std::time::Duration;
