//! Distributed collections: typed handles on the worker cluster's dict, set, counter, queue,
//! barrier and lock.
//!
//! Inside a task, [`dict`], [`set`], [`counter`], [`queue`], [`barrier`] and [`lock`] reach the
//! cluster through the node's worker; on the coordinator, `pool.dict(..)` and friends build the
//! same handles over the coordinator's connections. Collections are created lazily by name: the
//! first write creates one, a read of a missing one sees it empty.
//!
//! Consistency: every operation runs on the cell's primary node and is answered after its backup
//! applied the change, so all of them are **strong** (linearizable per cell: a read sees every
//! write that was answered before it). Dict keys are spread over the nodes by hash (each key its
//! own cell); a set, counter, queue, barrier or lock is one cell on one primary. If a primary is
//! lost, its backup takes over with every acknowledged change; a write that was in flight at that
//! moment fails with [`ClusterError::NodeLost`] (it may or may not have been applied), reads are
//! retried for you. Barriers and parked queue/lock waiters live only on the primary.

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use skyward_proto::cluster::{Caller, Kind, Op, Reply};
use skyward_proto::codec;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use skyward_proto::cluster::ClusterError;

/// How operations reach the cluster: through the node's worker (inside a task) or the
/// coordinator's connections.
pub trait Transport: Send + Sync + 'static {
    /// Run `op` on its primary and return the answer.
    fn request(&self, op: Op) -> BoxFuture<'static, Result<Reply, ClusterError>>;
    /// Rank of the node this caller runs on; `None` for the coordinator.
    fn rank(&self) -> Option<u32>;
    /// The pool this transport reaches.
    fn pool_id(&self) -> Option<String>;
}

type PoolTransports = std::collections::HashMap<String, std::sync::Weak<dyn Transport>>;

/// Coordinator transports of the pools alive in this process, by pool id: a handle that arrives
/// without a transport (an `ActorRef` returned by a task) finds its pool's here.
static POOL_TRANSPORTS: Mutex<Option<PoolTransports>> = Mutex::new(None);

/// Make `transport` the way handles of `pool_id` reach their pool from this process (the
/// coordinator registers its pools; dropped pools fall out on their own).
pub fn register_pool_transport(pool_id: &str, transport: &Arc<dyn Transport>) {
    let mut pools = POOL_TRANSPORTS.lock().expect("pool transports");
    let pools = pools.get_or_insert_default();
    pools.retain(|_, t| t.strong_count() > 0);
    pools.insert(pool_id.to_string(), Arc::downgrade(transport));
}

/// The transport for a handle of `pool_id` that came without one: the task's own (inside a task)
/// or the coordinator's pool of that id.
pub(crate) fn transport_for(pool_id: &str) -> Arc<dyn Transport> {
    if let Some(t) = crate::executor::cluster_transport() {
        return t;
    }
    let found = POOL_TRANSPORTS.lock().expect("pool transports").as_ref().and_then(|p| p.get(pool_id)).and_then(std::sync::Weak::upgrade);
    found.unwrap_or_else(|| {
        Arc::new(Unavailable("the pool of this handle is not running in this process (shut down, or another program's)"))
    })
}

struct Unavailable(&'static str);

impl Transport for Unavailable {
    fn request(&self, _op: Op) -> BoxFuture<'static, Result<Reply, ClusterError>> {
        let why = self.0;
        Box::pin(async move { Err(ClusterError::Unavailable(why.to_string())) })
    }
    fn rank(&self) -> Option<u32> {
        None
    }
    fn pool_id(&self) -> Option<String> {
        None
    }
}

/// The transport of the current task (the executor's connection to its worker).
pub(crate) fn task_transport() -> Arc<dyn Transport> {
    match crate::executor::cluster_transport() {
        Some(t) => t,
        None => Arc::new(Unavailable(
            "skyward::dict() and the other collection functions work inside a task; in the coordinator use pool.dict() (and pool.set(), pool.counter(), ...)",
        )),
    }
}

fn caller(transport: &dyn Transport) -> Caller {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    Caller { rank: transport.rank(), id: h.finish() }
}

fn encode<T: Serialize + ?Sized>(kind: Kind, name: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    codec::to_bytes(value).map_err(|e| ClusterError::Encode { kind, name: name.to_string(), reason: e.to_string() })
}

fn decode<T: DeserializeOwned>(kind: Kind, name: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    codec::from_bytes(bytes, "collection value").map_err(|e| ClusterError::Decode {
        kind,
        name: name.to_string(),
        type_name: std::any::type_name::<T>().to_string(),
        reason: e.to_string(),
    })
}

fn unexpected(kind: Kind, name: &str, reply: Reply) -> ClusterError {
    ClusterError::Transport(format!("{kind} `{name}`: unexpected answer {reply:?}"))
}

macro_rules! expect_reply {
    ($kind:expr, $name:expr, $reply:expr, $pat:pat => $out:expr) => {
        match $reply {
            $pat => Ok($out),
            other => Err(unexpected($kind, $name, other)),
        }
    };
}

/// A distributed map from `K` to `V`. Keys and values travel serde-encoded.
pub struct Dict<K, V> {
    name: String,
    transport: Arc<dyn Transport>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Dict<K, V> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), transport: Arc::clone(&self.transport), _types: PhantomData }
    }
}

impl<K, V> std::fmt::Debug for Dict<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dict").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<K: Serialize, V: Serialize + DeserializeOwned> Dict<K, V> {
    /// The dict `name` reached through `transport`.
    pub fn with_transport(name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), transport, _types: PhantomData }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn key(&self, key: &K) -> Result<Vec<u8>, ClusterError> {
        encode(Kind::Dict, &self.name, key)
    }

    fn value_of(&self, reply: Reply) -> Result<Option<V>, ClusterError> {
        match reply {
            Reply::Value(None) => Ok(None),
            Reply::Value(Some(bytes)) => decode(Kind::Dict, &self.name, &bytes).map(Some),
            other => Err(unexpected(Kind::Dict, &self.name, other)),
        }
    }

    /// The value under `key`.
    pub async fn get(&self, key: &K) -> Result<Option<V>, ClusterError> {
        let reply = self.transport.request(Op::DictGet { name: self.name.clone(), key: self.key(key)? }).await?;
        self.value_of(reply)
    }

    /// Store `value` under `key`; returns the value it replaced.
    pub async fn insert(&self, key: &K, value: &V) -> Result<Option<V>, ClusterError> {
        let op = Op::DictInsert { name: self.name.clone(), key: self.key(key)?, value: encode(Kind::Dict, &self.name, value)? };
        let reply = self.transport.request(op).await?;
        self.value_of(reply)
    }

    /// Remove `key` and return its value.
    pub async fn pop(&self, key: &K) -> Result<Option<V>, ClusterError> {
        let reply = self.transport.request(Op::DictRemove { name: self.name.clone(), key: self.key(key)? }).await?;
        self.value_of(reply)
    }

    /// Remove `key`; returns whether it was present.
    pub async fn remove(&self, key: &K) -> Result<bool, ClusterError> {
        let reply = self.transport.request(Op::DictRemove { name: self.name.clone(), key: self.key(key)? }).await?;
        expect_reply!(Kind::Dict, &self.name, reply, Reply::Value(v) => v.is_some())
    }

    /// Whether `key` is present.
    pub async fn contains(&self, key: &K) -> Result<bool, ClusterError> {
        let reply = self.transport.request(Op::DictContains { name: self.name.clone(), key: self.key(key)? }).await?;
        expect_reply!(Kind::Dict, &self.name, reply, Reply::Bool(b) => b)
    }

    /// Insert every pair (concurrently: keys live on different nodes). Stops at the first error.
    pub async fn update<'a, I>(&self, entries: I) -> Result<(), ClusterError>
    where
        I: IntoIterator<Item = (&'a K, &'a V)>,
        K: 'a,
        V: 'a,
    {
        let mut ops = Vec::new();
        for (k, v) in entries {
            ops.push(Op::DictInsert { name: self.name.clone(), key: self.key(k)?, value: encode(Kind::Dict, &self.name, v)? });
        }
        let replies = futures::future::join_all(ops.into_iter().map(|op| self.transport.request(op))).await;
        replies.into_iter().try_for_each(|r| r.map(|_| ()))
    }
}

/// A distributed set of `T`.
pub struct Set<T> {
    name: String,
    transport: Arc<dyn Transport>,
    _types: PhantomData<fn() -> T>,
}

impl<T> Clone for Set<T> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), transport: Arc::clone(&self.transport), _types: PhantomData }
    }
}

impl<T> std::fmt::Debug for Set<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Set").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<T: Serialize> Set<T> {
    /// The set `name` reached through `transport`.
    pub fn with_transport(name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), transport, _types: PhantomData }
    }

    fn value(&self, value: &T) -> Result<Vec<u8>, ClusterError> {
        encode(Kind::Set, &self.name, value)
    }

    /// Add `value`; returns whether it was new.
    pub async fn add(&self, value: &T) -> Result<bool, ClusterError> {
        let reply = self.transport.request(Op::SetAdd { name: self.name.clone(), value: self.value(value)? }).await?;
        expect_reply!(Kind::Set, &self.name, reply, Reply::Bool(b) => b)
    }

    /// Remove `value`; returns whether it was there.
    pub async fn discard(&self, value: &T) -> Result<bool, ClusterError> {
        let reply = self.transport.request(Op::SetDiscard { name: self.name.clone(), value: self.value(value)? }).await?;
        expect_reply!(Kind::Set, &self.name, reply, Reply::Bool(b) => b)
    }

    /// Whether `value` is in the set.
    pub async fn contains(&self, value: &T) -> Result<bool, ClusterError> {
        let reply = self.transport.request(Op::SetContains { name: self.name.clone(), value: self.value(value)? }).await?;
        expect_reply!(Kind::Set, &self.name, reply, Reply::Bool(b) => b)
    }

    /// Number of values.
    pub async fn len(&self) -> Result<u64, ClusterError> {
        let reply = self.transport.request(Op::SetLen { name: self.name.clone() }).await?;
        expect_reply!(Kind::Set, &self.name, reply, Reply::Len(n) => n)
    }

    /// Whether the set is empty.
    pub async fn is_empty(&self) -> Result<bool, ClusterError> {
        Ok(self.len().await? == 0)
    }
}

/// A distributed atomic counter.
#[derive(Clone)]
pub struct Counter {
    name: String,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Counter {
    /// The counter `name` reached through `transport`.
    pub fn with_transport(name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), transport }
    }

    /// Add `delta` (negative to subtract); returns the new value.
    pub async fn add(&self, delta: i64) -> Result<i64, ClusterError> {
        let reply = self.transport.request(Op::CounterAdd { name: self.name.clone(), delta }).await?;
        expect_reply!(Kind::Counter, &self.name, reply, Reply::Int(v) => v)
    }

    /// Add one; returns the new value.
    pub async fn increment(&self) -> Result<i64, ClusterError> {
        self.add(1).await
    }

    /// Subtract one; returns the new value.
    pub async fn decrement(&self) -> Result<i64, ClusterError> {
        self.add(-1).await
    }

    /// Set to zero; returns the value before.
    pub async fn reset(&self) -> Result<i64, ClusterError> {
        let reply = self.transport.request(Op::CounterReset { name: self.name.clone() }).await?;
        expect_reply!(Kind::Counter, &self.name, reply, Reply::Int(v) => v)
    }

    /// The current value.
    pub async fn value(&self) -> Result<i64, ClusterError> {
        let reply = self.transport.request(Op::CounterGet { name: self.name.clone() }).await?;
        expect_reply!(Kind::Counter, &self.name, reply, Reply::Int(v) => v)
    }
}

/// A distributed FIFO queue of `T`.
pub struct Queue<T> {
    name: String,
    transport: Arc<dyn Transport>,
    _types: PhantomData<fn() -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), transport: Arc::clone(&self.transport), _types: PhantomData }
    }
}

impl<T> std::fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// The queue `name` reached through `transport`.
    pub fn with_transport(name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), transport, _types: PhantomData }
    }

    /// Append `value`.
    pub async fn put(&self, value: &T) -> Result<(), ClusterError> {
        let op = Op::QueuePut { name: self.name.clone(), value: encode(Kind::Queue, &self.name, value)? };
        let reply = self.transport.request(op).await?;
        expect_reply!(Kind::Queue, &self.name, reply, Reply::Unit => ())
    }

    /// Take the oldest value, waiting up to `timeout` for one (`None` when none came).
    pub async fn get(&self, timeout: Duration) -> Result<Option<T>, ClusterError> {
        let reply = self.transport.request(Op::QueueGet { name: self.name.clone(), timeout }).await?;
        match reply {
            Reply::Value(None) => Ok(None),
            Reply::Value(Some(bytes)) => decode(Kind::Queue, &self.name, &bytes).map(Some),
            other => Err(unexpected(Kind::Queue, &self.name, other)),
        }
    }

    /// Number of values waiting.
    pub async fn len(&self) -> Result<u64, ClusterError> {
        let reply = self.transport.request(Op::QueueLen { name: self.name.clone() }).await?;
        expect_reply!(Kind::Queue, &self.name, reply, Reply::Len(n) => n)
    }

    /// Whether nothing is waiting.
    pub async fn is_empty(&self) -> Result<bool, ClusterError> {
        Ok(self.len().await? == 0)
    }
}

/// A barrier for `parties` callers.
#[derive(Clone)]
pub struct Barrier {
    name: String,
    parties: u32,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier").field("name", &self.name).field("parties", &self.parties).finish_non_exhaustive()
    }
}

impl Barrier {
    /// The barrier `name` for `parties` callers, reached through `transport`.
    pub fn with_transport(name: impl Into<String>, parties: u32, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), parties, transport }
    }

    /// Wait until `parties` callers have arrived; all are released together. Returns how many
    /// times the barrier opened before. Fails with [`ClusterError::BarrierBroken`] (naming the
    /// ranks) when a participant's node is lost.
    pub async fn wait(&self) -> Result<u64, ClusterError> {
        let op = Op::BarrierWait { name: self.name.clone(), parties: self.parties, caller: caller(self.transport.as_ref()) };
        let reply = self.transport.request(op).await?;
        expect_reply!(Kind::Barrier, &self.name, reply, Reply::Barrier { generation } => generation)
    }

    /// How many callers wait at the barrier right now.
    pub async fn waiting(&self) -> Result<u64, ClusterError> {
        let reply = self.transport.request(Op::BarrierWaiting { name: self.name.clone() }).await?;
        expect_reply!(Kind::Barrier, &self.name, reply, Reply::Len(n) => n)
    }
}

/// A lease-based distributed lock.
#[derive(Clone)]
pub struct Lock {
    name: String,
    lease: Duration,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock").field("name", &self.name).field("lease", &self.lease).finish_non_exhaustive()
    }
}

/// Default lock lease: a holder that stops renewing (its process hung or its node died) loses
/// the lock this long after its last renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

impl Lock {
    /// The lock `name` reached through `transport`, with the default lease.
    pub fn with_transport(name: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Self { name: name.into(), lease: DEFAULT_LEASE, transport }
    }

    /// Use another lease (at least 100 ms). The guard renews it every third of the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// Wait as long as it takes for the lock.
    pub async fn acquire(&self) -> Result<LockGuard, ClusterError> {
        self.acquire_timeout(Duration::from_secs(365 * 24 * 3600)).await
    }

    /// Wait up to `timeout` for the lock ([`ClusterError::Timeout`] after that; zero: try once).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard, ClusterError> {
        let op = Op::LockAcquire { name: self.name.clone(), caller: caller(self.transport.as_ref()), lease: self.lease, timeout };
        let reply = self.transport.request(op).await?;
        let Reply::Lock { token, fencing, taken_over } = reply else { return Err(unexpected(Kind::Lock, &self.name, reply)) };
        let lost: Arc<Mutex<Renewal>> = Arc::new(Mutex::new(Renewal { last_ok: std::time::Instant::now(), lost: None, last_error: None }));
        let renew = {
            let transport = Arc::clone(&self.transport);
            let name = self.name.clone();
            let lease = self.lease;
            let lost = Arc::clone(&lost);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let asked = std::time::Instant::now();
                    match transport.request(Op::LockRenew { name: name.clone(), token, lease }).await {
                        Ok(_) => lost.lock().expect("lock state").last_ok = asked,
                        Err(e @ ClusterError::LockLost { .. }) => {
                            lost.lock().expect("lock state").lost = Some(e);
                            return;
                        }
                        // A transport hiccup: try again at the next tick; `check` reports the
                        // lease as lost once it ran out without a successful renewal.
                        Err(e) => {
                            tracing::warn!(lock = %name, error = %e, "lock renewal failed");
                            lost.lock().expect("lock state").last_error = Some(e.to_string());
                        }
                    }
                }
            })
        };
        Ok(LockGuard {
            name: self.name.clone(),
            token,
            fencing,
            taken_over,
            transport: Arc::clone(&self.transport),
            renew: renew.abort_handle(),
            lost,
            lease: self.lease,
            released: false,
        })
    }
}

/// Holds a [`Lock`] until [`LockGuard::release`] or drop (drop releases in the background).
pub struct LockGuard {
    name: String,
    token: u64,
    fencing: u64,
    taken_over: Option<String>,
    transport: Arc<dyn Transport>,
    renew: tokio::task::AbortHandle,
    lost: Arc<Mutex<Renewal>>,
    lease: Duration,
    released: bool,
}

/// What the renewal task learned.
struct Renewal {
    last_ok: std::time::Instant,
    lost: Option<ClusterError>,
    last_error: Option<String>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("name", &self.name).field("fencing", &self.fencing).finish_non_exhaustive()
    }
}

impl LockGuard {
    /// Increases with every grant of this lock: pass it to external resources to fence off a
    /// holder whose lease ran out.
    pub fn fencing(&self) -> u64 {
        self.fencing
    }

    /// Set when the previous holder did not release: why it lost the lock (lease ran out, node lost).
    pub fn taken_over(&self) -> Option<&str> {
        self.taken_over.as_deref()
    }

    /// `Err` if the lease was lost (renewal refused, or no renewal got through for a whole
    /// lease): the lock may be held by someone else now.
    pub fn check(&self) -> Result<(), ClusterError> {
        let state = self.lost.lock().expect("lock state");
        if let Some(e) = &state.lost {
            return Err(e.clone());
        }
        if state.last_ok.elapsed() >= self.lease {
            let why = state.last_error.clone().unwrap_or_else(|| "no answer".into());
            return Err(ClusterError::LockLost {
                name: self.name.clone(),
                reason: format!("no renewal got through for a whole lease ({:?}); last error: {why}", self.lease),
            });
        }
        Ok(())
    }

    /// Give the lock back. Fails if it had already been lost.
    pub async fn release(mut self) -> Result<(), ClusterError> {
        self.released = true;
        self.renew.abort();
        self.check()?;
        let reply = self.transport.request(Op::LockRelease { name: self.name.clone(), token: self.token }).await?;
        match reply {
            Reply::Bool(true) => Ok(()),
            Reply::Bool(false) => {
                Err(ClusterError::LockLost { name: self.name.clone(), reason: "its lease had run out before the release".into() })
            }
            other => Err(unexpected(Kind::Lock, &self.name, other)),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renew.abort();
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let request = self.transport.request(Op::LockRelease { name: self.name.clone(), token: self.token });
            handle.spawn(async move {
                let _ = request.await;
            });
        }
    }
}

/// The dict `name` of the pool this task runs in.
pub fn dict<K: Serialize, V: Serialize + DeserializeOwned>(name: &str) -> Dict<K, V> {
    Dict::with_transport(name, task_transport())
}

/// The set `name` of the pool this task runs in.
pub fn set<T: Serialize>(name: &str) -> Set<T> {
    Set::with_transport(name, task_transport())
}

/// The counter `name` of the pool this task runs in.
pub fn counter(name: &str) -> Counter {
    Counter::with_transport(name, task_transport())
}

/// The queue `name` of the pool this task runs in.
pub fn queue<T: Serialize + DeserializeOwned>(name: &str) -> Queue<T> {
    Queue::with_transport(name, task_transport())
}

/// The barrier `name` for `parties` callers, in the pool this task runs in.
pub fn barrier(name: &str, parties: u32) -> Barrier {
    Barrier::with_transport(name, parties, task_transport())
}

/// The lock `name` of the pool this task runs in.
pub fn lock(name: &str) -> Lock {
    Lock::with_transport(name, task_transport())
}
