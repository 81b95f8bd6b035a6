//! `Provisioner`: one per provider; prepares, provisions, terminates and tears down through the
//! `Provider` trait.
//!
//! Supervision: a Provisioner supervises nothing; its parent is the `Pool`. Provider errors are
//! values sent back to the pool (which decides to retry, replace or fail the start), never actor
//! failures. Provision calls run concurrently (one task per node); termination is confirmed.

use crate::pool::PoolMsg;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use skyward_provider::{FailureKind, PoolContext, Provider, ProviderError, ProvisionRequest};
use std::sync::Arc;

pub(crate) enum ProvisionerMsg {
    Provision { rank: u32, request: ProvisionRequest },
    Terminate { instance_id: String },
    Teardown(RpcReplyPort<Result<(), String>>),
}

impl std::fmt::Debug for ProvisionerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProvisionerMsg::Provision { rank, .. } => write!(f, "Provision(rank {rank})"),
            ProvisionerMsg::Terminate { instance_id } => write!(f, "Terminate({instance_id})"),
            ProvisionerMsg::Teardown(_) => write!(f, "Teardown"),
        }
    }
}

pub(crate) struct Provisioner;

pub(crate) struct ProvisionerArgs {
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) ctx: PoolContext,
    pub(crate) pool: ActorRef<PoolMsg>,
}

pub(crate) struct ProvisionerState {
    provider: Arc<dyn Provider>,
    ctx: PoolContext,
    pool: ActorRef<PoolMsg>,
    /// Provision calls still running: teardown waits for them, so a machine being created while
    /// the pool shuts down is not missed.
    in_flight: Vec<tokio::task::JoinHandle<()>>,
}

/// How long teardown waits for provision calls in flight before it lists and removes.
const PROVISION_DRAIN: std::time::Duration = std::time::Duration::from_secs(40);

impl Actor for Provisioner {
    type Msg = ProvisionerMsg;
    type State = ProvisionerState;
    type Arguments = ProvisionerArgs;

    async fn pre_start(&self, _myself: ActorRef<ProvisionerMsg>, args: ProvisionerArgs) -> Result<ProvisionerState, ActorProcessingErr> {
        Ok(ProvisionerState { provider: args.provider, ctx: args.ctx, pool: args.pool, in_flight: Vec::new() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProvisionerMsg>,
        message: ProvisionerMsg,
        state: &mut ProvisionerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProvisionerMsg::Provision { rank, request } => {
                let provider = Arc::clone(&state.provider);
                let ctx = state.ctx.clone();
                let pool = state.pool.clone();
                state.in_flight.retain(|h| !h.is_finished());
                state.in_flight.push(tokio::spawn(async move {
                    let node_id = request.node_id.clone();
                    let result = provider.provision(&ctx, request).await.map(|i| i.id).map_err(|e| (FailureKind::of(&e), e.to_string()));
                    let _ = pool.cast(PoolMsg::Provisioned { rank, node_id, result });
                }));
            }
            ProvisionerMsg::Terminate { instance_id } => {
                let provider = Arc::clone(&state.provider);
                let ctx = state.ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = provider.terminate(&ctx, &instance_id).await {
                        tracing::error!(error = %e, "terminate failed");
                    }
                });
            }
            ProvisionerMsg::Teardown(reply) => {
                let in_flight = std::mem::take(&mut state.in_flight);
                if tokio::time::timeout(PROVISION_DRAIN, futures::future::join_all(in_flight)).await.is_err() {
                    tracing::warn!("provision calls still running after {PROVISION_DRAIN:?}; tearing down anyway");
                }
                let result: Result<(), ProviderError> = state.provider.teardown(&state.ctx).await;
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }
}
