//! Remote functions: the link-time registry, typed calls, the executor role and the task context.
//!
//! `#[skyward::function]` (in `skyward-macros`) turns an `async fn` or `fn` into a constructor of a
//! typed [`Call`] and registers a [`FunctionEntry`] in [`FUNCTIONS`] under a stable name (module path
//! and function name). The executor (a copy of the user's own program started by the worker in
//! executor role, see [`executor`]) looks the name up and runs the body.
//!
//! It also holds the typed handles on the worker cluster's collections ([`collections`]), which
//! reach the cluster through a [`collections::Transport`]: the executor socket inside a task, the
//! coordinator's connections outside.
//!
//! Architecture invariant: this crate knows nothing of pools, nodes or QUIC; it maps names and
//! bytes to function bodies, and serves them (and the tasks' collection calls) over the executor
//! socket.

pub mod actors;
pub mod blob;
pub mod collections;
pub mod context;
pub mod elf;
pub mod executor;
pub mod shard;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use skyward_proto::codec;
use skyward_proto::error::{RemoteError, RemoteErrorKind};
use std::marker::PhantomData;

pub use blob::Blob;
pub use context::{InstanceInfo, instance_info};
pub use shard::{ShardOptions, shard, shard_with};

/// A unary function body: serialized arguments in, serialized result out.
pub type UnaryFn = fn(bytes::Bytes) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>>;

/// A streaming function body: serialized arguments in, a stream of serialized items out.
pub type StreamFn = fn(bytes::Bytes) -> BoxFuture<'static, Result<BoxStream<'static, Result<Vec<u8>, RemoteError>>, RemoteError>>;

/// How a registered function is invoked.
#[derive(Clone, Copy)]
pub enum Invoke {
    /// Returns one value.
    Unary(UnaryFn),
    /// Returns a stream of values.
    Stream(StreamFn),
}

impl std::fmt::Debug for Invoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invoke::Unary(_) => "Unary",
            Invoke::Stream(_) => "Stream",
        })
    }
}

/// One registered function.
#[derive(Debug)]
pub struct FunctionEntry {
    /// Stable name: `module::path::function`.
    pub name: &'static str,
    /// Its body.
    pub invoke: Invoke,
}

/// Every function registered in this binary, collected at link time.
#[linkme::distributed_slice]
pub static FUNCTIONS: [FunctionEntry];

/// Find a registered function by name.
pub fn lookup(name: &str) -> Option<&'static FunctionEntry> {
    FUNCTIONS.iter().find(|f| f.name == name)
}

/// Names of every registered function, sorted.
pub fn registered_names() -> Vec<&'static str> {
    let mut names: Vec<_> = FUNCTIONS.iter().map(|f| f.name).collect();
    names.sort_unstable();
    names
}

/// A call of a remote function returning `R`, with its arguments already encoded.
///
/// Built by calling a `#[skyward::function]`; handed to the pool (`pool.run(call)`).
pub struct Call<R> {
    name: &'static str,
    /// Shared: cloning a call (a broadcast to every node) does not copy its arguments.
    args: Result<bytes::Bytes, RemoteError>,
    _result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for Call<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("name", &self.name).field("args_len", &self.args.as_ref().map(bytes::Bytes::len)).finish()
    }
}

impl<R> Clone for Call<R> {
    fn clone(&self) -> Self {
        Self { name: self.name, args: self.args.clone(), _result: PhantomData }
    }
}

impl<R: DeserializeOwned> Call<R> {
    /// A call of `name` with `args` (a tuple of the function's arguments).
    pub fn new<A: Serialize + ?Sized>(name: &'static str, args: &A) -> Self {
        let args = codec::to_bytes(args).map(bytes::Bytes::from).map_err(|e| codec_error("arguments", name, e));
        Self { name, args, _result: PhantomData }
    }

    /// Decode a result of this call.
    pub fn decode(&self, bytes: &[u8]) -> Result<R, RemoteError> {
        codec::from_bytes(bytes, "result").map_err(|e| codec_error("result", self.name, e))
    }
}

impl<R> Call<R> {
    /// Registered name of the function.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Encoded arguments, or the error met while encoding them.
    pub fn args(&self) -> Result<&[u8], &RemoteError> {
        self.args.as_deref()
    }

    /// Encoded arguments as a shared buffer (a clone, not a copy).
    pub fn args_shared(&self) -> Result<bytes::Bytes, &RemoteError> {
        match &self.args {
            Ok(args) => Ok(args.clone()),
            Err(e) => Err(e),
        }
    }
}

/// A call of a remote function that yields a stream of `T`.
pub struct StreamCall<T> {
    call: Call<T>,
}

impl<T> std::fmt::Debug for StreamCall<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.call.fmt(f)
    }
}

impl<T: DeserializeOwned> StreamCall<T> {
    /// A streaming call of `name` with `args`.
    pub fn new<A: Serialize + ?Sized>(name: &'static str, args: &A) -> Self {
        Self { call: Call::new(name, args) }
    }
}

impl<T> StreamCall<T> {
    /// The underlying call (its items decode like a unary result).
    pub fn as_call(&self) -> &Call<T> {
        &self.call
    }
}

fn codec_error(what: &str, name: &str, e: skyward_proto::ProtocolError) -> RemoteError {
    let mut err = RemoteError::new(RemoteErrorKind::Codec, format!("could not encode or decode the {what} of `{name}`: {e}"));
    err.type_name = "skyward::CodecError".into();
    err
}

/// Turn any error a function returns into a [`RemoteError`], keeping its source chain.
pub fn error_to_remote<E: Into<anyhow::Error>>(error: E) -> RemoteError {
    let type_name = std::any::type_name::<E>().to_string();
    let error: anyhow::Error = error.into();
    let mut chain = error.chain();
    let message = chain.next().map(|e| e.to_string()).unwrap_or_default();
    RemoteError { kind: RemoteErrorKind::Returned, type_name, message, chain: chain.map(|e| e.to_string()).collect(), location: None }
}

/// Support for the code generated by `skyward-macros`. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use super::actors::{ACTORS, ActorEntry, RegisteredActor, spawn_erased};
    pub use super::{Call, FUNCTIONS, FunctionEntry, Invoke, StreamCall, error_to_remote};
    pub use futures;
    pub use linkme;
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use skyward_proto::error::RemoteError;

    /// Decode the argument tuple of `name`; large [`Blob`](crate::Blob)s in it refer to `bytes`.
    pub fn decode_args<A: DeserializeOwned>(name: &str, bytes: &bytes::Bytes) -> Result<A, RemoteError> {
        skyward_proto::codec::from_shared(bytes, "arguments").map_err(|e| super::codec_error("arguments", name, e))
    }

    /// Encode the result (or one stream item) of `name`.
    pub fn encode_result<T: Serialize>(name: &str, value: &T) -> Result<Vec<u8>, RemoteError> {
        skyward_proto::codec::to_bytes(value).map_err(|e| super::codec_error("result", name, e))
    }

    /// Run a blocking function body on tokio's blocking pool with the task context; a panic in
    /// it propagates to the caller together with its location.
    pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let info = crate::context::current();
        let joined = tokio::task::spawn_blocking(move || {
            crate::context::with_blocking(info, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                    .map_err(|payload| (payload, crate::executor::take_panic_location()))
            })
        })
        .await;
        match joined {
            Ok(Ok(v)) => v,
            Ok(Err((payload, location))) => {
                crate::executor::set_panic_location(location);
                std::panic::resume_unwind(payload)
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("blocking task failed: {e}"),
        }
    }
}
