//! `Pool`: the coordinator actor, and [`PoolHandle`], the user's entry point for dispatch.
//!
//! Supervision: the Pool actor supervises the Provisioner, the TaskManager and every Node (all
//! spawned linked to it). A failed or lost Node is replaced with a new node of the same rank (its
//! in-flight tasks were re-queued by the TaskManager). A failed TaskManager or Provisioner stops
//! the pool: the bookkeeping they hold cannot be rebuilt, and teardown still runs.

use crate::Options;
use crate::binary::ShippedBinary;
use crate::node::{self, Node, NodeArgs, NodeMsg, NodeShared};
use crate::provisioner::{Provisioner, ProvisionerArgs, ProvisionerMsg};
use crate::task_manager::{TaskManagerRef, TmMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use skyward_net::{FramedRecv, PoolCa};
use skyward_proto::message::{ToCoordinator, WorkerFacts};
use skyward_proto::session::{CoordinatorSession, CoordinatorSessionConfig};
use skyward_provider::FailureKind;
use skyward_provider::{PoolContext, Provider, ProvisionRequest, Secret};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct RegistryEntry {
    pub(crate) actor: ActorRef<NodeMsg>,
    pub(crate) cert_der: Vec<u8>,
}

/// State shared by the pool's actors, its acceptor, and the user's handle.
pub(crate) struct PoolShared {
    pub(crate) pool_id: String,
    pub(crate) ctx: PoolContext,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) ca: PoolCa,
    pub(crate) server_addr: SocketAddr,
    pub(crate) epoch: Instant,
    pub(crate) registry: Mutex<HashMap<String, RegistryEntry>>,
    pub(crate) options: Options,
    pub(crate) concurrency: u32,
    pub(crate) binary: Arc<ShippedBinary>,
    /// Standalone mode: the socket every worker's tunnel is attached to.
    pub(crate) tunnel: Option<Arc<skyward_net::TunnelSocket>>,
    /// The worker cluster's membership and placement (disabled in standalone mode).
    pub(crate) cluster: Arc<crate::cluster::ClusterShared>,
    /// Set once a node proved it runs on this machine: from then on, large arguments are put in
    /// shared memory when submitted (by the caller, not by the TaskManager at dispatch).
    pub(crate) same_host: Arc<std::sync::atomic::AtomicBool>,
    /// Keeps idle CPUs polling while calls to nodes on this machine are in flight; started by
    /// the first node that proves to be on this machine.
    pub(crate) busy: Arc<crate::busy_poll::BusyPoll>,
}

/// Messages of the Pool actor.
pub(crate) enum PoolMsg {
    Provisioned { rank: u32, node_id: String, result: Result<String, (FailureKind, String)> },
    NodeReady { rank: u32, facts: WorkerFacts },
    NodeFailed { rank: u32, error: String },
    NodeLost { rank: u32, node_id: String },
    WaitReady(RpcReplyPort<Result<Vec<WorkerFacts>, StartFailure>>),
    Shutdown(RpcReplyPort<Result<(), String>>),
}

/// Why a pool did not start: the provider's failure kind when a provision failed (the start may
/// fall back to the next offer), and the message.
#[derive(Debug, Clone)]
pub(crate) struct StartFailure {
    pub(crate) kind: Option<FailureKind>,
    pub(crate) message: String,
}

impl std::fmt::Debug for PoolMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolMsg::Provisioned { rank, .. } => write!(f, "Provisioned({rank})"),
            PoolMsg::NodeReady { rank, .. } => write!(f, "NodeReady({rank})"),
            PoolMsg::NodeFailed { rank, error } => write!(f, "NodeFailed({rank}: {error})"),
            PoolMsg::NodeLost { rank, .. } => write!(f, "NodeLost({rank})"),
            PoolMsg::WaitReady(_) => write!(f, "WaitReady"),
            PoolMsg::Shutdown(_) => write!(f, "Shutdown"),
        }
    }
}

struct NodeRecord {
    node_id: String,
    actor: ActorRef<NodeMsg>,
    instance_id: Option<String>,
    facts: Option<WorkerFacts>,
    replacements: u32,
}

pub(crate) struct PoolActor;

pub(crate) struct PoolArgs {
    pub(crate) shared: Arc<PoolShared>,
    pub(crate) nodes: u32,
    pub(crate) tm: TaskManagerRef,
}

pub(crate) struct PoolState {
    shared: Arc<PoolShared>,
    desired: u32,
    tm: TaskManagerRef,
    provisioner: Option<ActorRef<ProvisionerMsg>>,
    nodes: HashMap<u32, NodeRecord>,
    waiters: Vec<RpcReplyPort<Result<Vec<WorkerFacts>, StartFailure>>>,
    start_error: Option<StartFailure>,
    started: bool,
    generation: u64,
    shutting_down: bool,
}

impl PoolState {
    fn ready_facts(&self) -> Option<Vec<WorkerFacts>> {
        let mut facts = Vec::new();
        for rank in 0..self.desired {
            facts.push(self.nodes.get(&rank)?.facts.clone()?);
        }
        Some(facts)
    }

    fn answer_waiters(&mut self) {
        let answer = if let Some(e) = &self.start_error {
            Err(e.clone())
        } else if let Some(facts) = self.ready_facts() {
            if !self.started {
                self.started = true;
                self.shared.cluster.place();
            }
            Ok(facts)
        } else {
            return;
        };
        for w in self.waiters.drain(..) {
            let _ = w.send(answer.clone());
        }
    }

    async fn spawn_node(&mut self, myself: &ActorRef<PoolMsg>, rank: u32, replacements: u32) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        self.generation += 1;
        let node_id = format!("{}-r{rank}-g{}", shared.pool_id, self.generation);
        let cert = shared.ca.issue_worker(&node_id)?;
        let cert_der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).map_err(|e| format!("issued certificate: {e}"))?.to_vec();
        let now = shared.epoch.elapsed();
        let session = CoordinatorSession::new(
            CoordinatorSessionConfig {
                pool_id: shared.pool_id.clone(),
                node_id: node_id.clone(),
                rank,
                heartbeat_interval: shared.options.heartbeat_interval,
                lost_after: shared.options.lost_after,
            },
            now,
        );
        let layout = shared.provider.worker_layout(&shared.ctx, &node_id);
        let standalone_socket = shared.tunnel.as_ref().map(|_| layout.state_dir.join(skyward_provider::STANDALONE_SOCKET));
        let node_shared: Arc<NodeShared> = node::new_shared(node_id.clone(), rank, session, self.tm.clone(), shared);
        let (actor, _) = Actor::spawn_linked(
            Some(format!("node-{node_id}")),
            Node,
            NodeArgs {
                shared: node_shared,
                pool: myself.clone(),
                binary: Arc::clone(&shared.binary),
                upload_timeout: shared.options.upload_timeout,
                connect_timeout: shared.options.connect_timeout,
                provider: Arc::clone(&shared.provider),
                ctx: shared.ctx.clone(),
                tunnel: shared.tunnel.clone().zip(standalone_socket.clone()),
            },
            myself.get_cell(),
        )
        .await?;
        shared.registry.lock().expect("registry lock").insert(node_id.clone(), RegistryEntry { actor: actor.clone(), cert_der });
        let config = skyward_worker::config::WorkerConfig {
            pool_id: shared.pool_id.clone(),
            node_id: node_id.clone(),
            coordinator: shared.server_addr,
            ca_cert_pem: shared.ca.cert().cert_pem.clone(),
            cert,
            instance_timeout_secs: shared.options.instance_timeout.as_secs_f64(),
            concurrency: shared.concurrency,
            cache_dir: layout.cache_dir,
            state_dir: layout.state_dir,
            on_silence: layout.on_silence,
            max_frame: shared.options.max_frame,
            standalone_socket,
        };
        let request =
            ProvisionRequest { node_id: node_id.clone(), rank, node_count: self.desired, worker_config: Secret::new(config.to_toml()) };
        self.nodes.insert(rank, NodeRecord { node_id, actor, instance_id: None, facts: None, replacements });
        if let Some(p) = &self.provisioner {
            p.cast(ProvisionerMsg::Provision { rank, request })?;
        }
        Ok(())
    }

    async fn replace(&mut self, myself: &ActorRef<PoolMsg>, rank: u32, why: &str) -> Result<(), ActorProcessingErr> {
        let Some(old) = self.nodes.remove(&rank) else { return Ok(()) };
        self.shared.cluster.node_left(rank, &old.node_id, why);
        // The task manager must stop using the old node whatever the reason (lost, failed, actor
        // crash); its tasks go back in line. A second notice for the same loss is harmless.
        let _ = self.tm.cast(TmMsg::NodeLost { rank, in_flight: Vec::new() });
        self.shared.registry.lock().expect("registry lock").remove(&old.node_id);
        old.actor.stop(Some(why.to_string()));
        if let (Some(id), Some(p)) = (old.instance_id, &self.provisioner) {
            p.cast(ProvisionerMsg::Terminate { instance_id: id })?;
        }
        if self.shutting_down {
            return Ok(());
        }
        let replacements = old.replacements + 1;
        if replacements > self.shared.options.max_replacements {
            tracing::error!(rank, replacements, "not replacing node again: replacement limit reached");
            let _ = self.tm.cast(TmMsg::RankRetired { rank });
            return Ok(());
        }
        tracing::info!(rank, %why, "replacing node");
        self.spawn_node(myself, rank, replacements).await
    }
}

impl Actor for PoolActor {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = PoolArgs;

    async fn pre_start(&self, myself: ActorRef<PoolMsg>, args: PoolArgs) -> Result<PoolState, ActorProcessingErr> {
        let (provisioner, _) = Actor::spawn_linked(
            None,
            Provisioner,
            ProvisionerArgs { provider: Arc::clone(&args.shared.provider), ctx: args.shared.ctx.clone(), pool: myself.clone() },
            myself.get_cell(),
        )
        .await?;
        args.tm.actor().get_cell().link(myself.get_cell());
        let mut state = PoolState {
            shared: args.shared,
            desired: args.nodes,
            tm: args.tm,
            provisioner: Some(provisioner),
            nodes: HashMap::new(),
            waiters: Vec::new(),
            start_error: None,
            started: false,
            generation: 0,
            shutting_down: false,
        };
        for rank in 0..state.desired {
            state.spawn_node(&myself, rank, 0).await?;
        }
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<PoolMsg>, message: PoolMsg, state: &mut PoolState) -> Result<(), ActorProcessingErr> {
        match message {
            PoolMsg::Provisioned { rank, node_id, result } => {
                let Some(record) = state.nodes.get_mut(&rank).filter(|r| r.node_id == node_id) else {
                    // A replaced node's instance arrived late: end it.
                    if let (Ok(id), Some(p)) = (result, &state.provisioner) {
                        p.cast(ProvisionerMsg::Terminate { instance_id: id })?;
                    }
                    return Ok(());
                };
                match result {
                    Ok(instance_id) => {
                        record.instance_id = Some(instance_id.clone());
                        record.actor.cast(NodeMsg::Provisioned { instance_id })?;
                    }
                    Err((kind, error)) if !state.started => {
                        // Typed, so that the start can fall back to the next offer.
                        let node = record.node_id.clone();
                        state.start_error.get_or_insert(StartFailure {
                            kind: Some(kind),
                            message: format!("node {rank} ({node}): provisioning failed: {error}"),
                        });
                        state.answer_waiters();
                    }
                    Err((_, error)) => {
                        myself.cast(PoolMsg::NodeFailed { rank, error: format!("provisioning failed: {error}") })?;
                    }
                }
            }
            PoolMsg::NodeReady { rank, facts } => {
                if let Some(record) = state.nodes.get_mut(&rank) {
                    tracing::debug!(rank, node = %record.node_id, "node ready");
                    record.facts = Some(facts);
                }
                state.answer_waiters();
            }
            PoolMsg::NodeFailed { rank, error } => {
                if !state.started {
                    let node = state.nodes.get(&rank).map(|r| r.node_id.clone()).unwrap_or_default();
                    state.start_error.get_or_insert(StartFailure { kind: None, message: format!("node {rank} ({node}): {error}") });
                    state.answer_waiters();
                } else {
                    tracing::error!(rank, %error, "node failed");
                    state.replace(&myself, rank, &error).await?;
                }
            }
            PoolMsg::NodeLost { rank, node_id } => {
                if state.nodes.get(&rank).is_some_and(|r| r.node_id == node_id) {
                    state.replace(&myself, rank, "node lost").await?;
                }
            }
            PoolMsg::WaitReady(reply) => {
                state.waiters.push(reply);
                state.answer_waiters();
            }
            PoolMsg::Shutdown(reply) => {
                state.shutting_down = true;
                let _ = state.tm.cast(TmMsg::Close);
                for record in state.nodes.values() {
                    let _ = record.actor.cast(NodeMsg::Drain);
                }
                let result = match &state.provisioner {
                    Some(p) => match ractor::call_t!(p, ProvisionerMsg::Teardown, 60_000) {
                        Ok(r) => r,
                        Err(e) => Err(format!("teardown did not complete: {e}")),
                    },
                    None => Ok(()),
                };
                for record in state.nodes.values() {
                    record.actor.stop(Some("pool shutdown".into()));
                }
                state.nodes.clear();
                let _ = reply.send(result);
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PoolMsg>,
        event: SupervisionEvent,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let failed_node = state.nodes.iter().find(|(_, r)| r.actor.get_id() == cell.get_id()).map(|(rank, _)| *rank);
                if let Some(rank) = failed_node {
                    tracing::error!(rank, %error, "node actor failed; replacing the node");
                    state.replace(&myself, rank, "node actor failed").await?;
                } else {
                    tracing::error!(%error, "pool component failed; stopping the pool");
                    state.start_error.get_or_insert(StartFailure { kind: None, message: format!("internal failure: {error}") });
                    state.answer_waiters();
                    myself.stop(Some("component failed".into()));
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) if state.provisioner.as_ref().is_some_and(|p| p.get_id() == cell.get_id()) => {
                state.provisioner = None;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Accept worker connections: TLS (mutual, pool CA) first, then the hello on the control stream,
/// checked against the certificate issued for that node id. Failures are logged and the
/// connection closed; other workers are not affected.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<PoolShared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(reason) = accept_one(incoming, &shared).await {
                tracing::warn!(%remote, %reason, "rejected a worker connection");
            }
        });
    }
}

async fn accept_one(incoming: quinn::Incoming, shared: &PoolShared) -> Result<(), String> {
    let connection = incoming.await.map_err(|e| format!("TLS handshake failed: {e}"))?;
    let handshake = async {
        let (send, recv) = connection.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
        let mut recv = FramedRecv::new(recv, 64 * 1024);
        let hello = match recv.next::<ToCoordinator>("Hello").await {
            Ok(Some(ToCoordinator::Hello(hello))) => hello,
            Ok(Some(other)) => return Err(format!("expected Hello, got {}", other.name())),
            Ok(None) => return Err("control stream closed before Hello".to_string()),
            Err(e) => return Err(e.to_string()),
        };
        Ok::<_, String>((send, recv, hello))
    };
    let (send, recv, hello) = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            connection.close(2u32.into(), b"bad handshake");
            return Err(e);
        }
        Err(_) => {
            connection.close(2u32.into(), b"handshake timeout");
            return Err("no hello within 10 s".into());
        }
    };
    let peer_cert = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| c.to_vec()));
    let actor = {
        let registry = shared.registry.lock().expect("registry lock");
        match registry.get(&hello.node_id) {
            Some(entry) if peer_cert.as_deref() == Some(entry.cert_der.as_slice()) => Ok(entry.actor.clone()),
            Some(_) => Err(format!("worker claims node id {} with another node's certificate", hello.node_id)),
            None => Err(format!("unknown node id {}", hello.node_id)),
        }
    };
    let actor = match actor {
        Ok(a) => a,
        Err(e) => {
            connection.close(3u32.into(), b"unknown node");
            return Err(e);
        }
    };
    actor.cast(NodeMsg::Connected { connection, send, recv, hello }).map_err(|e| format!("node actor gone: {e}"))
}
