//! Remote actors: user types with state, started on a node of the pool, reached by a typed
//! handle from the coordinator or from any task.
//!
//! ```ignore
//! struct Tally { total: u64 }
//!
//! impl skyward::Actor for Tally {
//!     type Args = u64;
//!     type Msg = u64;
//!     type Reply = u64;
//!     async fn start(first: u64) -> anyhow::Result<Self> { Ok(Tally { total: first }) }
//!     async fn handle(&mut self, add: u64) -> anyhow::Result<u64> { self.total += add; Ok(self.total) }
//! }
//! skyward::actor!(Tally);
//!
//! let tally = pool.spawn_actor::<Tally>(&0).await?;   // round robin; spawn_actor_on(rank, ..)
//! assert_eq!(tally.call(&5).await?, 5);
//! ```
//!
//! An actor lives in the executor of its node (the user's program) and handles one message at a
//! time, in arrival order per sender. A handler that returns `Err` fails that call
//! ([`ClusterError::ActorFailed`]) and the actor keeps running; a handler that panics kills the
//! actor, and that call and every later one get [`ClusterError::ActorDead`] with the panic
//! message. When the actor's node is lost, calls in flight and later calls fail with
//! [`ClusterError::NodeLost`] or [`ClusterError::ActorDead`]; none waits forever.

use crate::collections::{ClusterError, Transport, task_transport};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use skyward_proto::cluster::{Op, Reply};
use skyward_proto::codec;
use skyward_proto::error::RemoteError;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A remote actor: its state, how it starts, and how it handles a message.
pub trait Actor: Send + Sized + 'static {
    /// Constructor arguments.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// Messages it handles.
    type Msg: Serialize + DeserializeOwned + Send + 'static;
    /// Answers to messages.
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// Build the actor on its node.
    fn start(args: Self::Args) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// Handle one message.
    fn handle(&mut self, msg: Self::Msg) -> impl Future<Output = anyhow::Result<Self::Reply>> + Send;
}

/// An actor type registered with [`actor!`](crate::actor): its stable name.
pub trait RegisteredActor: Actor {
    /// Registered name (module path and type name).
    const NAME: &'static str;
}

/// A type-erased actor instance.
pub trait ErasedActor: Send {
    /// Decode, handle, encode.
    fn handle_bytes(&mut self, msg: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, RemoteError>>;
}

impl<A: Actor> ErasedActor for A {
    fn handle_bytes(&mut self, msg: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, RemoteError>> {
        Box::pin(async move {
            // Large `Blob`s in the message refer to it instead of a copy.
            let msg: A::Msg =
                codec::from_shared(&bytes::Bytes::from(msg), "actor message").map_err(|e| crate::codec_error("message", "actor", e))?;
            let reply = self.handle(msg).await.map_err(crate::error_to_remote)?;
            codec::to_bytes(&reply).map_err(|e| crate::codec_error("reply", "actor", e))
        })
    }
}

/// Starts an actor from encoded arguments.
pub type SpawnFn = fn(Vec<u8>) -> BoxFuture<'static, Result<Box<dyn ErasedActor>, RemoteError>>;

/// One registered actor type.
#[derive(Debug)]
pub struct ActorEntry {
    /// Registered name.
    pub name: &'static str,
    /// Its constructor.
    pub spawn: SpawnFn,
}

/// Every actor type registered in this binary, collected at link time.
#[linkme::distributed_slice]
pub static ACTORS: [ActorEntry];

/// The constructor [`actor!`](crate::actor) registers for `A`.
pub fn spawn_erased<A: Actor>(args: Vec<u8>) -> BoxFuture<'static, Result<Box<dyn ErasedActor>, RemoteError>> {
    Box::pin(async move {
        let args: A::Args =
            codec::from_shared(&bytes::Bytes::from(args), "actor arguments").map_err(|e| crate::codec_error("arguments", "actor", e))?;
        let actor = A::start(args).await.map_err(crate::error_to_remote)?;
        Ok(Box::new(actor) as Box<dyn ErasedActor>)
    })
}

/// A handle on a running actor of type `A`. Cheap to clone; serializable, so it can be passed
/// to a task on any node (there it reaches the actor through that node's worker).
pub struct ActorRef<A> {
    pool_id: String,
    rank: u32,
    node_id: String,
    actor: u64,
    transport: Option<Arc<dyn Transport>>,
    _type: PhantomData<fn() -> A>,
}

impl<A> Clone for ActorRef<A> {
    fn clone(&self) -> Self {
        Self {
            pool_id: self.pool_id.clone(),
            rank: self.rank,
            node_id: self.node_id.clone(),
            actor: self.actor,
            transport: self.transport.clone(),
            _type: PhantomData,
        }
    }
}

impl<A> std::fmt::Debug for ActorRef<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActorRef({} #{} on rank {})", std::any::type_name::<A>(), self.actor, self.rank)
    }
}

#[derive(Serialize, Deserialize)]
struct WireRef {
    pool_id: String,
    rank: u32,
    node_id: String,
    actor: u64,
}

impl<A> Serialize for ActorRef<A> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireRef { pool_id: self.pool_id.clone(), rank: self.rank, node_id: self.node_id.clone(), actor: self.actor }.serialize(s)
    }
}

impl<'de, A> Deserialize<'de> for ActorRef<A> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = WireRef::deserialize(d)?;
        Ok(Self { pool_id: w.pool_id, rank: w.rank, node_id: w.node_id, actor: w.actor, transport: None, _type: PhantomData })
    }
}

impl<A: Actor> ActorRef<A> {
    /// Rank of the node the actor runs on.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    fn transport(&self) -> Arc<dyn Transport> {
        self.transport.clone().unwrap_or_else(|| crate::collections::transport_for(&self.pool_id))
    }

    fn label(&self) -> String {
        format!("{} #{} on rank {}", std::any::type_name::<A>(), self.actor, self.rank)
    }

    async fn send(&self, msg: &A::Msg, reply: bool) -> Result<Reply, ClusterError> {
        let msg = codec::to_bytes(msg).map_err(|e| ClusterError::Encode {
            kind: skyward_proto::cluster::Kind::Actor,
            name: self.label(),
            reason: e.to_string(),
        })?;
        let op = Op::ActorCall { rank: self.rank, node_id: self.node_id.clone(), actor: self.actor, msg, reply };
        self.transport().request(op).await.map_err(|e| match e {
            ClusterError::ActorDead { reason, .. } => ClusterError::ActorDead { actor: self.label(), reason },
            ClusterError::ActorFailed { error, .. } => ClusterError::ActorFailed { actor: self.label(), error },
            other => other,
        })
    }

    /// Send `msg` and wait for the handler's answer.
    pub async fn call(&self, msg: &A::Msg) -> Result<A::Reply, ClusterError> {
        match self.send(msg, true).await? {
            Reply::Bytes(bytes) => {
                codec::from_shared(&bytes::Bytes::from(bytes.into_vec()), "actor reply").map_err(|e| ClusterError::Decode {
                    kind: skyward_proto::cluster::Kind::Actor,
                    name: self.label(),
                    type_name: std::any::type_name::<A::Reply>().to_string(),
                    reason: e.to_string(),
                })
            }
            other => Err(ClusterError::Transport(format!("actor {}: unexpected answer {other:?}", self.label()))),
        }
    }

    /// Send `msg` without waiting for the handler (returns once the actor's node queued it; an
    /// error when the actor is already known dead).
    pub async fn cast(&self, msg: &A::Msg) -> Result<(), ClusterError> {
        self.send(msg, false).await.map(|_| ())
    }

    /// Stop the actor once the messages already queued are handled.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        let op = Op::ActorStop { rank: self.rank, node_id: self.node_id.clone(), actor: self.actor };
        self.transport().request(op).await.map(|_| ())
    }
}

/// Start an actor of type `A` through `transport` on `rank` (`None`: round robin). `binary` is
/// the executable that registers `A`.
pub async fn spawn_with<A: RegisteredActor>(
    transport: Arc<dyn Transport>,
    binary: skyward_proto::message::BinaryHash,
    rank: Option<u32>,
    args: &A::Args,
) -> Result<ActorRef<A>, ClusterError> {
    let args = codec::to_bytes(args).map_err(|e| ClusterError::Encode {
        kind: skyward_proto::cluster::Kind::Actor,
        name: A::NAME.to_string(),
        reason: e.to_string(),
    })?;
    let op = Op::ActorSpawn { type_name: A::NAME.to_string(), binary, args, rank };
    match transport.request(op).await? {
        Reply::Actor { rank, node_id, actor } => {
            let pool_id = transport.pool_id().unwrap_or_default();
            Ok(ActorRef { pool_id, rank, node_id, actor, transport: Some(transport), _type: PhantomData })
        }
        other => Err(ClusterError::Transport(format!("spawn of {}: unexpected answer {other:?}", A::NAME))),
    }
}

/// Start an actor of type `A` from inside a task, round robin over the pool's nodes.
pub async fn spawn_actor<A: RegisteredActor>(args: &A::Args) -> Result<ActorRef<A>, ClusterError> {
    spawn_from_task::<A>(None, args).await
}

/// Start an actor of type `A` from inside a task, on the node of `rank`.
pub async fn spawn_actor_on<A: RegisteredActor>(rank: u32, args: &A::Args) -> Result<ActorRef<A>, ClusterError> {
    spawn_from_task::<A>(Some(rank), args).await
}

async fn spawn_from_task<A: RegisteredActor>(rank: Option<u32>, args: &A::Args) -> Result<ActorRef<A>, ClusterError> {
    let binary = std::env::var(skyward_proto::exec::ENV_BINARY_HASH).ok().and_then(|hex| parse_hash(&hex)).ok_or_else(|| {
        ClusterError::Unavailable("skyward::spawn_actor() works inside a task; in the coordinator use pool.spawn_actor()".into())
    })?;
    spawn_with::<A>(task_transport(), binary, rank, args).await
}

fn parse_hash(hex: &str) -> Option<skyward_proto::message::BinaryHash> {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect::<Option<_>>()?;
    Some(skyward_proto::message::BinaryHash(bytes.try_into().ok()?))
}

// -- the executor's side ------------------------------------------------------------------------

/// Where a message's answer goes: called once, by the actor's own task (no task in between).
/// Dropped unanswered (the actor's task ended), it answers that the actor stopped.
struct Answer(Option<AnswerFn>);

type AnswerFn = Box<dyn FnOnce(Result<Vec<u8>, ClusterError>) + Send>;

impl Answer {
    fn send(mut self, result: Result<Vec<u8>, ClusterError>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(dead("it stopped before answering")));
        }
    }
}

type Mail = (Vec<u8>, Option<Answer>);

enum Slot {
    Alive(mpsc::UnboundedSender<Mail>),
    Dead(String),
}

/// The actors running in this executor.
#[derive(Default)]
pub(crate) struct Host {
    actors: Arc<Mutex<HashMap<u64, Slot>>>,
}

impl Host {
    /// Run one actor operation; the answer goes to `done`.
    pub(crate) fn handle(&self, op: skyward_proto::exec::ActorOp, done: impl FnOnce(Result<Vec<u8>, ClusterError>) + Send + 'static) {
        use skyward_proto::exec::ActorOp;
        match op {
            ActorOp::Spawn { actor, type_name, args } => {
                let Some(entry) = ACTORS.iter().find(|a| a.name == type_name) else {
                    return done(Err(ClusterError::UnknownActorType(type_name)));
                };
                let actors = Arc::clone(&self.actors);
                let spawn = entry.spawn;
                tokio::spawn(async move {
                    let started = std::panic::AssertUnwindSafe(spawn(args)).catch_unwind().await;
                    let instance = match started {
                        Ok(Ok(instance)) => instance,
                        Ok(Err(e)) => return done(Err(ClusterError::ActorFailed { actor: type_name, error: Box::new(e) })),
                        Err(payload) => {
                            let reason = format!("its constructor panicked: {}", crate::executor::panic_text(payload.as_ref()));
                            return done(Err(ClusterError::ActorDead { actor: type_name, reason }));
                        }
                    };
                    let (tx, rx) = mpsc::unbounded_channel();
                    actors.lock().expect("actors").insert(actor, Slot::Alive(tx));
                    tokio::spawn(run_actor(actor, instance, rx, Arc::clone(&actors)));
                    done(Ok(Vec::new()));
                });
            }
            ActorOp::Call { actor, msg, reply } => {
                let actors = self.actors.lock().expect("actors");
                match actors.get(&actor) {
                    Some(Slot::Alive(tx)) => {
                        if reply {
                            // A failed send drops the mail, whose answer then says the actor stopped.
                            let _ = tx.send((msg, Some(Answer(Some(Box::new(done))))));
                        } else {
                            let sent = tx.send((msg, None));
                            drop(actors);
                            done(sent.map(|_| Vec::new()).map_err(|_| dead("it stopped")));
                        }
                    }
                    Some(Slot::Dead(reason)) => {
                        let reason = reason.clone();
                        drop(actors);
                        done(Err(dead(&reason)))
                    }
                    None => {
                        drop(actors);
                        done(Err(dead("this node has no such actor (its executor restarted?)")))
                    }
                }
            }
            ActorOp::Stop { actor } => {
                let mut actors = self.actors.lock().expect("actors");
                // Dropping the sender ends the actor after its queued messages.
                if let Some(Slot::Alive(_)) = actors.get(&actor) {
                    actors.insert(actor, Slot::Dead("it was stopped".into()));
                }
                drop(actors);
                done(Ok(Vec::new()));
            }
        }
    }
}

fn dead(reason: &str) -> ClusterError {
    ClusterError::ActorDead { actor: String::new(), reason: reason.to_string() }
}

async fn run_actor(
    id: u64,
    mut instance: Box<dyn ErasedActor>,
    mut rx: mpsc::UnboundedReceiver<Mail>,
    actors: Arc<Mutex<HashMap<u64, Slot>>>,
) {
    while let Some((msg, answer)) = rx.recv().await {
        let outcome = std::panic::AssertUnwindSafe(instance.handle_bytes(msg)).catch_unwind().await;
        match outcome {
            Ok(result) => {
                if let Some(answer) = answer {
                    answer.send(result.map_err(|e| ClusterError::ActorFailed { actor: String::new(), error: Box::new(e) }));
                }
            }
            Err(payload) => {
                let location = crate::executor::take_panic_location().map(|l| format!(" at {l}")).unwrap_or_default();
                let reason = format!("its handler panicked: {}{location}", crate::executor::panic_text(payload.as_ref()));
                actors.lock().expect("actors").insert(id, Slot::Dead(reason.clone()));
                if let Some(answer) = answer {
                    answer.send(Err(dead(&reason)));
                }
                // Messages still queued die with it.
                rx.close();
                while let Some((_, answer)) = rx.recv().await {
                    if let Some(answer) = answer {
                        answer.send(Err(dead(&reason)));
                    }
                }
                return;
            }
        }
    }
}

/// Register an actor type so nodes can start it by name: `skyward::actor!(MyActor);`.
#[macro_export]
macro_rules! actor {
    ($ty:ty) => {
        impl $crate::__private::RegisteredActor for $ty {
            const NAME: &'static str = concat!(module_path!(), "::", stringify!($ty));
        }
        const _: () = {
            #[$crate::__private::linkme::distributed_slice($crate::__private::ACTORS)]
            #[linkme(crate = $crate::__private::linkme)]
            static ENTRY: $crate::__private::ActorEntry = $crate::__private::ActorEntry {
                name: <$ty as $crate::__private::RegisteredActor>::NAME,
                spawn: $crate::__private::spawn_erased::<$ty>,
            };
        };
    };
}
