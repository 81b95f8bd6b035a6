//! The task context: which node a task runs on (`skyward::instance_info()`).

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

pub use skyward_proto::message::InstanceInfo;

tokio::task_local! {
    static CURRENT: Arc<InstanceInfo>;
}

thread_local! {
    static BLOCKING: RefCell<Option<Arc<InstanceInfo>>> = const { RefCell::new(None) };
}

/// Facts about the node the current task runs on: rank, node count, head address, peers.
///
/// Outside a task (e.g. in the coordinator), describes a single local node: rank 0 of 1.
pub fn instance_info() -> InstanceInfo {
    try_instance_info().unwrap_or_else(|| InstanceInfo { rank: 0, node_count: 1, ..InstanceInfo::default() })
}

/// Facts about the node the current task runs on, or `None` outside a task.
pub fn try_instance_info() -> Option<InstanceInfo> {
    current().map(|info| (*info).clone())
}

pub(crate) fn current() -> Option<Arc<InstanceInfo>> {
    CURRENT.try_with(Arc::clone).ok().or_else(|| BLOCKING.with(|b| b.borrow().clone()))
}

/// Run `future` with `info` as its task context.
pub async fn scope<F: Future>(info: Arc<InstanceInfo>, future: F) -> F::Output {
    CURRENT.scope(info, future).await
}

/// Run blocking `f` with `info` as its task context on this thread.
pub(crate) fn with_blocking<T>(info: Option<Arc<InstanceInfo>>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<InstanceInfo>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            BLOCKING.with(|b| *b.borrow_mut() = previous);
        }
    }
    let _restore = Restore(BLOCKING.with(|b| b.replace(info)));
    f()
}
