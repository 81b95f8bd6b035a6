//! The executor role: the user's program, started by the worker, serving function calls over a
//! node-local Unix socket.
//!
//! A panic in a function becomes a `RemoteError` of kind `Panic` with the message and location;
//! the executor keeps serving. An abort or a segfault ends the process: the worker notices the
//! closed socket, fails the calls in flight with `ExecutorDied`, and starts a new executor.

use crate::context;
use crate::{Invoke, lookup};
use futures::{FutureExt, StreamExt};
use skyward_proto::codec::{self, FrameDecoder};
use skyward_proto::error::{RemoteError, RemoteErrorKind};
use skyward_proto::exec::{FromExecutor, ToExecutor};
use skyward_proto::message::{Args, InstanceInfo};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Once};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

thread_local! {
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Take the location recorded by the last panic on this thread.
pub(crate) fn take_panic_location() -> Option<String> {
    PANIC_LOCATION.with(|p| p.borrow_mut().take())
}

/// Record a panic location on this thread (used when a panic is carried across threads).
pub(crate) fn set_panic_location(location: Option<String>) {
    PANIC_LOCATION.with(|p| *p.borrow_mut() = location);
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            set_panic_location(location);
            default(info);
        }));
    });
}

pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Errors that end the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The socket could not be reached.
    #[error("executor could not connect to the worker at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The worker sent something undecodable.
    #[error("executor protocol error: {0}")]
    Protocol(#[from] skyward_proto::ProtocolError),
    /// Socket I/O failed.
    #[error("executor socket error: {0}")]
    Io(#[from] std::io::Error),
}

type Calls = Arc<Mutex<skyward_proto::IdMap<u64, (tokio::task::AbortHandle, Option<Arc<Semaphore>>)>>>;

type ClusterAnswer = Result<skyward_proto::cluster::Reply, skyward_proto::cluster::ClusterError>;

/// Collection operations of this executor's tasks, sent to the worker on the executor socket.
struct ExecutorTransport {
    tx: skyward_net::UnixFrameWriter,
    next: std::sync::atomic::AtomicU64,
    pending: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<ClusterAnswer>>>,
}

static TRANSPORT: Mutex<Option<Arc<ExecutorTransport>>> = Mutex::new(None);

/// The transport of this executor, if this process is one.
pub(crate) fn cluster_transport() -> Option<Arc<dyn crate::collections::Transport>> {
    TRANSPORT.lock().expect("transport lock").clone().map(|t| t as Arc<dyn crate::collections::Transport>)
}

impl crate::collections::Transport for ExecutorTransport {
    fn request(&self, op: skyward_proto::cluster::Op) -> futures::future::BoxFuture<'static, ClusterAnswer> {
        use skyward_proto::cluster::ClusterError;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = codec::to_bytes(&op).map_err(|e| ClusterError::Transport(e.to_string())).and_then(|op| {
            self.pending.lock().expect("pending lock").insert(id, tx);
            self.tx.send(&FromExecutor::Cluster { id, op }).map_err(|_| ClusterError::Transport("the worker socket is closed".into()))
        });
        if sent.is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
        }
        Box::pin(async move {
            sent?;
            rx.await.unwrap_or_else(|_| Err(ClusterError::Transport("the worker closed the executor socket before answering".into())))
        })
    }

    fn rank(&self) -> Option<u32> {
        context::current().map(|i| i.rank)
    }

    fn pool_id(&self) -> Option<String> {
        context::current().map(|i| i.pool_id.clone())
    }
}

/// A call that runs this long before its first wait sends what its batch has finished so far.
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_micros(200);

/// Serve calls on the socket at `path` until the worker closes it.
pub async fn serve(path: &str) -> Result<(), ExecutorError> {
    install_panic_hook();
    let stream = UnixStream::connect(path).await.map_err(|source| ExecutorError::Connect { path: path.into(), source })?;
    let (mut reader, writer) = skyward_net::unix::split(stream)?;
    let tx = skyward_net::UnixFrameWriter::new(writer);
    let functions = u32::try_from(crate::FUNCTIONS.len()).unwrap_or(u32::MAX);
    let _ = tx.send(&FromExecutor::Ready { pid: std::process::id(), functions });
    let transport = Arc::new(ExecutorTransport { tx: tx.clone(), next: std::sync::atomic::AtomicU64::new(1), pending: Mutex::default() });
    *TRANSPORT.lock().expect("transport lock") = Some(Arc::clone(&transport));

    let calls: Calls = Arc::default();
    let host = crate::actors::Host::default();
    let mut decoder = FrameDecoder::new(codec::DEFAULT_MAX_FRAME);
    let mut chunk = vec![0u8; 1024 * 1024];
    // The node facts of the last call that carried them (a call without facts has these).
    let mut info = Arc::new(InstanceInfo::default());
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        decoder.push(&chunk[..n]);
        // The answers of the calls this read brought go back in one write, unless a call keeps
        // the batch long: then what is done goes out at once.
        let cork = skyward_net::Cork::new();
        while let Some(message) = decoder.next::<ToExecutor>("ToExecutor")? {
            let started = std::time::Instant::now();
            match message {
                ToExecutor::ClusterReply { id, result } => {
                    if let Some(waiter) = transport.pending.lock().expect("pending lock").remove(&id) {
                        let _ = waiter.send(result);
                    }
                    continue;
                }
                ToExecutor::Actor { id, op } => {
                    let tx = tx.clone();
                    host.handle(op, move |result| {
                        let _ = tx.send(&FromExecutor::ActorDone { id, result: result.map(serde_bytes::ByteBuf::from) });
                    });
                    continue;
                }
                _ => {}
            }
            handle(message, &tx, &calls, &mut info);
            if started.elapsed() > HOLD_AT_MOST {
                cork.flush();
            }
        }
    }
    TRANSPORT.lock().expect("transport lock").take();
    transport.pending.lock().expect("pending lock").clear();
    drop(tx);
    for (_, (abort, _)) in calls.lock().expect("calls lock").drain() {
        abort.abort();
    }
    Ok(())
}

fn handle(message: ToExecutor, tx: &skyward_net::UnixFrameWriter, calls: &Calls, last_info: &mut Arc<InstanceInfo>) {
    match message {
        ToExecutor::Call { id, name, args, info, streaming, credit } => {
            if let Some(info) = info {
                *last_info = info;
            }
            let info = Arc::clone(last_info);
            let tx = tx.clone();
            let Some(entry) = lookup(&name) else {
                let mut names = crate::registered_names();
                names.truncate(20);
                let err = RemoteError::new(
                    RemoteErrorKind::UnknownFunction,
                    format!(
                        "function `{name}` is not registered in this binary (registered: {}); was it marked #[skyward::function] and does the pool run the same binary?",
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ),
                );
                let _ = tx.send(&FromExecutor::Done { id, result: Err::<serde_bytes::ByteBuf, _>(err) });
                return;
            };
            let args = match args {
                Args::Inline(bytes) => bytes,
                // The coordinator runs on this machine and put large arguments in shared memory.
                Args::Shared(at) => match skyward_net::shm::map(&at) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        let err =
                            RemoteError::new(RemoteErrorKind::Worker, format!("cannot read the call's arguments from shared memory: {e}"));
                        let _ = tx.send(&FromExecutor::Done { id, result: Err::<serde_bytes::ByteBuf, _>(err) });
                        return;
                    }
                },
            };
            let semaphore = streaming.then(|| Arc::new(Semaphore::new(credit as usize)));
            let calls_for_task = Arc::clone(calls);
            let invoke = entry.invoke;
            let sem = semaphore.clone();
            let mut call = Box::pin(async move {
                let body = async {
                    match (invoke, sem) {
                        (Invoke::Unary(f), _) => f(args).await.map(serde_bytes::ByteBuf::from),
                        (Invoke::Stream(f), Some(sem)) => {
                            let mut stream = f(args).await?;
                            while let Some(item) = stream.next().await {
                                let payload = item?;
                                let Ok(permit) = sem.acquire().await else { break };
                                permit.forget();
                                if tx.send(&FromExecutor::Item { id, payload }).is_err() {
                                    break;
                                }
                            }
                            Ok(serde_bytes::ByteBuf::new())
                        }
                        (Invoke::Stream(_), None) => {
                            Err(RemoteError::new(RemoteErrorKind::Worker, "streaming function called as a unary one; use pool.stream(..)"))
                        }
                    }
                };
                let result = match std::panic::AssertUnwindSafe(context::scope(info, body)).catch_unwind().await {
                    Ok(result) => result,
                    Err(payload) => Err(RemoteError {
                        kind: RemoteErrorKind::Panic,
                        type_name: "panic".into(),
                        message: panic_text(payload.as_ref()),
                        chain: Vec::new(),
                        location: take_panic_location(),
                    }),
                };
                calls_for_task.lock().expect("calls lock").remove(&id);
                let _ = tx.send(&FromExecutor::Done { id, result });
            });
            // Poll once right here: a call that finishes without waiting (small functions) then
            // costs no spawned task and no wake-up. One that waits is spawned; tokio polls it
            // again at once, registering its real waker.
            let waker = futures::task::noop_waker();
            if call.as_mut().poll(&mut std::task::Context::from_waker(&waker)).is_ready() {
                return;
            }
            // Hold the lock across spawn + insert so a fast task's removal cannot precede its insert.
            let mut guard = calls.lock().expect("calls lock");
            let handle = tokio::spawn(call);
            guard.insert(id, (handle.abort_handle(), semaphore));
        }
        ToExecutor::Credit { id, items } => {
            if let Some((_, Some(sem))) = calls.lock().expect("calls lock").get(&id) {
                sem.add_permits(items as usize);
            }
        }
        ToExecutor::ClusterReply { .. } | ToExecutor::Actor { .. } => {}
        ToExecutor::Cancel { id } => {
            if let Some((abort, _)) = calls.lock().expect("calls lock").remove(&id) {
                abort.abort();
                // Answer anyway, so the worker forgets its waiter for this call.
                let err = RemoteError::new(RemoteErrorKind::Worker, "call cancelled");
                let _ = tx.send(&FromExecutor::Done { id, result: Err::<serde_bytes::ByteBuf, _>(err) });
            }
        }
    }
}

/// If this process was started in executor role, serve calls and exit; otherwise return.
///
/// Called by `skyward::init()`; must run before the program does anything else.
pub fn run_if_executor() {
    if std::env::var(skyward_proto::exec::ENV_ROLE).as_deref() != Ok(skyward_proto::exec::ROLE_EXECUTOR) {
        return;
    }
    let Ok(path) = std::env::var(skyward_proto::exec::ENV_EXECUTOR_SOCKET) else {
        eprintln!("skyward executor: {} is not set", skyward_proto::exec::ENV_EXECUTOR_SOCKET);
        std::process::exit(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skyward executor: cannot start a runtime: {e}");
            std::process::exit(2);
        }
    };
    // The serve loop runs as a task on the runtime's worker threads, not on this thread under
    // `block_on`: the worker thread that sees the socket readable then runs the loop itself,
    // where `block_on` had to be woken from it, a cross-thread wake-up per read (20-30 µs on a
    // small VM when it crosses CPUs: a sequence of sync calls paid it once per call).
    let code = match runtime.block_on(async move { tokio::spawn(async move { serve(&path).await }).await }) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("skyward executor: {e}");
            1
        }
        Err(e) => {
            eprintln!("skyward executor: the serve loop failed: {e}");
            1
        }
    };
    runtime.shutdown_background();
    std::process::exit(code);
}
