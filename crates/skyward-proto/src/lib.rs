//! Skyward's wire protocol as plain state machines: no tokio, no sockets, no clock reads.
//!
//! The transport glue (QUIC in `skyward-net`, later SSH) feeds bytes into [`codec::FrameDecoder`],
//! decoded messages into a [`session::CoordinatorSession`] or [`session::WorkerSession`] together with
//! the current time (a [`Time`], counted from an epoch the caller picks), and writes out whatever the
//! sessions hand back. Everything that can go wrong on the wire is a value, never a panic.

pub mod cache;
pub mod codec;
pub mod error;
pub mod exec;
pub mod message;
pub mod session;

pub use error::{ProtocolError, RemoteError, TaskError};
pub use message::*;

/// Version of the wire protocol. A peer that speaks another version is refused in the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// A point in time as the caller sees it: the duration since an epoch of its choosing.
///
/// The protocol never reads a clock; the glue passes `epoch.elapsed()` and tests pass virtual time.
pub type Time = std::time::Duration;
