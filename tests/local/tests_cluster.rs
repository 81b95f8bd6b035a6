//! The worker cluster: collections from tasks and from the coordinator, concurrency, a lost node
//! (dict intact, lock taken over, barrier broken, membership events), bad input, standalone mode.
//! The operation and lost-node suites run on the Local provider and on the Container provider.

use crate::support::{Mode, block_on, container_provider, pool, pool_in_mode, test_options};
use libtest_mimic::Trial;
use skyward::{ClusterError, ClusterEvent, Compute, Local, Pool, Worker};
use std::time::{Duration, Instant};

pub(crate) fn trials() -> Vec<Trial> {
    vec![
        Trial::test("cluster::every_operation_from_tasks_and_coordinator", || {
            block_on(async {
                let pool = pool(3, 4).await?;
                every_operation(&pool).await?;
                Ok(pool.shutdown().await?)
            })
        }),
        Trial::test("cluster::concurrent_counter_increments_from_every_node", || {
            block_on(async {
                let pool = pool(3, 4).await?;
                concurrent_increments(&pool).await?;
                Ok(pool.shutdown().await?)
            })
        }),
        Trial::test("cluster::lost_node_keeps_dict_frees_lock_breaks_barrier", || {
            block_on(async {
                let pool = Compute::new(Local::default()).nodes(3).worker(Worker { concurrency: 4 }).options(no_retries()).start().await?;
                lost_node(&pool, Victim::WorkerProcess).await?;
                Ok(pool.shutdown().await?)
            })
        }),
        Trial::test("container::cluster_every_operation_and_concurrent_increments", || {
            block_on(async {
                let pool =
                    Compute::new(container_provider()).nodes(3).worker(Worker { concurrency: 4 }).options(test_options()).start().await?;
                every_operation(&pool).await?;
                concurrent_increments(&pool).await?;
                Ok(pool.shutdown().await?)
            })
        }),
        Trial::test("container::cluster_lost_container_keeps_dict_frees_lock_breaks_barrier", || {
            block_on(async {
                let pool =
                    Compute::new(container_provider()).nodes(3).worker(Worker { concurrency: 4 }).options(no_retries()).start().await?;
                lost_node(&pool, Victim::Container).await?;
                Ok(pool.shutdown().await?)
            })
        }),
        Trial::test("cluster::bad_input_gets_typed_errors", || block_on(bad_input())),
        Trial::test("cluster::standalone_mode_refuses_collections", || block_on(standalone())),
    ]
}

/// Run in a task: read what the coordinator wrote, write per-rank entries, use a set and a queue.
#[skyward::function]
async fn task_side(tag: String) -> anyhow::Result<Vec<String>> {
    let rank = skyward::instance_info().rank;
    let dict = skyward::dict::<String, String>("shared");
    let seen = dict.get(&"from-coordinator".to_string()).await?;
    dict.insert(&format!("rank-{rank}"), &format!("{tag}-{rank}")).await?;
    let set = skyward::set::<u32>("ranks");
    set.add(&rank).await?;
    let queue = skyward::queue::<u32>("from-tasks");
    queue.put(&rank).await?;
    Ok(vec![seen.unwrap_or_default(), format!("{}", set.contains(&rank).await?)])
}

/// Wait for an item the coordinator puts later.
#[skyward::function]
async fn consume(timeout_ms: u64) -> anyhow::Result<Option<String>> {
    Ok(skyward::queue::<String>("to-tasks").get(Duration::from_millis(timeout_ms)).await?)
}

/// Every node meets at a barrier; returns the generation it opened with.
#[skyward::function]
async fn meet(name: String, parties: u32) -> String {
    match skyward::barrier(&name, parties).wait().await {
        Ok(generation) => format!("opened {generation}"),
        Err(e) => format!("error: {e}"),
    }
}

/// Read-modify-write a dict entry under the lock, `rounds` times: only exclusion keeps the sum.
#[skyward::function]
async fn locked_increments(rounds: u32) -> anyhow::Result<()> {
    let lock = skyward::lock("rmw");
    let dict = skyward::dict::<String, u64>("rmw");
    for _ in 0..rounds {
        let guard = lock.acquire().await?;
        let v = dict.get(&"n".to_string()).await?.unwrap_or(0);
        tokio::task::yield_now().await;
        dict.insert(&"n".to_string(), &(v + 1)).await?;
        guard.release().await?;
    }
    Ok(())
}

/// A remote actor with state: a running total.
struct Tally {
    total: i64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum TallyMsg {
    Add(i64),
    Fail,
    Panic,
}

impl skyward::Actor for Tally {
    type Args = i64;
    type Msg = TallyMsg;
    type Reply = i64;

    async fn start(first: i64) -> anyhow::Result<Self> {
        anyhow::ensure!(first >= 0, "a tally cannot start below zero (got {first})");
        Ok(Tally { total: first })
    }

    async fn handle(&mut self, msg: TallyMsg) -> anyhow::Result<i64> {
        match msg {
            TallyMsg::Add(n) => {
                self.total += n;
                Ok(self.total)
            }
            TallyMsg::Fail => anyhow::bail!("asked to fail at {}", self.total),
            TallyMsg::Panic => panic!("tally exploded at {}", self.total),
        }
    }
}
skyward::actor!(Tally);

/// From a task: add to an actor the coordinator spawned (its handle passed as an argument).
#[skyward::function]
async fn add_from_task(tally: skyward::ActorRef<Tally>, n: i64) -> anyhow::Result<i64> {
    Ok(tally.call(&TallyMsg::Add(n)).await?)
}

/// From a task: spawn an actor (round robin), use it, hand its handle back.
#[skyward::function]
async fn spawn_from_task(first: i64) -> anyhow::Result<skyward::ActorRef<Tally>> {
    let tally = skyward::spawn_actor::<Tally>(&first).await?;
    tally.cast(&TallyMsg::Add(1)).await?;
    Ok(tally)
}

async fn actors(pool: &Pool) -> anyhow::Result<()> {
    let a = pool.spawn_actor_on::<Tally>(1, &10).await?;
    anyhow::ensure!(a.rank() == 1, "spawned on rank 1: {a:?}");
    anyhow::ensure!(a.call(&TallyMsg::Add(5)).await? == 15);
    // A cast is handled before a later call from the same sender.
    a.cast(&TallyMsg::Add(100)).await?;
    anyhow::ensure!(a.call(&TallyMsg::Add(0)).await? == 115, "cast applied in order");
    // Tasks on every node reach it through their own worker.
    let sums = pool.broadcast(add_from_task(a.clone(), 1)).await?;
    anyhow::ensure!(sums.len() == 3 && a.call(&TallyMsg::Add(0)).await? == 118, "{sums:?}");
    // A failing handler fails that call only.
    match a.call(&TallyMsg::Fail).await {
        Err(ClusterError::ActorFailed { error, .. }) => anyhow::ensure!(error.message.contains("asked to fail at 118"), "{error:?}"),
        other => anyhow::bail!("expected ActorFailed, got {other:?}"),
    }
    anyhow::ensure!(a.call(&TallyMsg::Add(1)).await? == 119, "still alive after a failed call");
    // Spawned from tasks, round robin: three tasks, actors on every node.
    let spawned = pool.gather((0..3).map(|i| spawn_from_task(i * 100))).await?;
    let mut ranks: Vec<u32> = spawned.iter().map(|t| t.rank()).collect();
    ranks.sort_unstable();
    anyhow::ensure!(ranks == vec![0, 1, 2], "round robin over the nodes: {ranks:?}");
    for t in &spawned {
        let v = t.call(&TallyMsg::Add(0)).await?;
        anyhow::ensure!(v % 100 == 1, "the task's cast arrived: {v}");
    }
    // A panicking handler kills the actor: that call and every later one say so.
    let doomed = pool.spawn_actor::<Tally>(&0).await?;
    match doomed.call(&TallyMsg::Panic).await {
        Err(ClusterError::ActorDead { reason, .. }) => anyhow::ensure!(reason.contains("tally exploded at 0"), "{reason}"),
        other => anyhow::bail!("expected ActorDead, got {other:?}"),
    }
    let after = doomed.call(&TallyMsg::Add(1)).await;
    anyhow::ensure!(matches!(&after, Err(ClusterError::ActorDead { reason, .. }) if reason.contains("panicked")), "{after:?}");
    // A constructor that refuses, and a stopped actor.
    let refused = pool.spawn_actor::<Tally>(&-1).await;
    anyhow::ensure!(
        matches!(&refused, Err(ClusterError::ActorFailed { error, .. }) if error.message.contains("below zero")),
        "{refused:?}"
    );
    a.stop().await?;
    let stopped = a.call(&TallyMsg::Add(1)).await;
    anyhow::ensure!(matches!(stopped, Err(ClusterError::ActorDead { .. })), "{stopped:?}");
    Ok(())
}

/// Test options without task retries: the lock holder's task must not run again elsewhere.
fn no_retries() -> skyward::Options {
    skyward::Options { max_retries: 0, ..test_options() }
}

async fn every_operation(pool: &Pool) -> anyhow::Result<()> {
    anyhow::ensure!(pool.cluster_members().len() == 3, "three members: {:?}", pool.cluster_members());

    // Dict from the coordinator.
    let dict = pool.dict::<String, String>("shared");
    anyhow::ensure!(dict.get(&"missing".into()).await?.is_none());
    anyhow::ensure!(dict.insert(&"from-coordinator".into(), &"hello".into()).await?.is_none());
    anyhow::ensure!(dict.insert(&"k".into(), &"v1".into()).await?.is_none());
    anyhow::ensure!(dict.insert(&"k".into(), &"v2".into()).await? == Some("v1".into()), "insert returns the old value");
    anyhow::ensure!(dict.contains(&"k".into()).await?);
    anyhow::ensure!(dict.pop(&"k".into()).await? == Some("v2".into()));
    anyhow::ensure!(!dict.contains(&"k".into()).await?);
    anyhow::ensure!(!dict.remove(&"k".into()).await?, "removing a missing key says so");
    let entries: Vec<(String, String)> = (0..50).map(|i| (format!("u{i}"), format!("{i}"))).collect();
    dict.update(entries.iter().map(|(k, v)| (k, v))).await?;
    for (k, v) in &entries {
        anyhow::ensure!(dict.get(k).await?.as_ref() == Some(v), "update stored {k}");
    }

    // Tasks see the coordinator's writes and the coordinator sees theirs.
    let results = pool.broadcast(task_side("t".into())).await?;
    for (rank, r) in results.iter().enumerate() {
        anyhow::ensure!(*r == vec!["hello".to_string(), "true".to_string()], "rank {rank} saw {r:?}");
        anyhow::ensure!(dict.get(&format!("rank-{rank}")).await? == Some(format!("t-{rank}")));
    }

    // Set.
    let ranks = pool.set::<u32>("ranks");
    anyhow::ensure!(ranks.len().await? == 3, "every rank added itself");
    anyhow::ensure!(!ranks.add(&1).await?, "already there");
    anyhow::ensure!(ranks.discard(&1).await? && !ranks.contains(&1).await? && ranks.len().await? == 2);
    anyhow::ensure!(!ranks.discard(&7).await?);

    // Queue: three items from the tasks, then FIFO from the coordinator, then a timed-out get.
    let from_tasks = pool.queue::<u32>("from-tasks");
    anyhow::ensure!(from_tasks.len().await? == 3);
    let mut got = Vec::new();
    while let Some(v) = from_tasks.get(Duration::ZERO).await? {
        got.push(v);
    }
    got.sort_unstable();
    anyhow::ensure!(got == vec![0, 1, 2] && from_tasks.is_empty().await?, "{got:?}");
    let fifo = pool.queue::<String>("fifo");
    for s in ["a", "b", "c"] {
        fifo.put(&s.to_string()).await?;
    }
    anyhow::ensure!(fifo.get(Duration::ZERO).await?.as_deref() == Some("a") && fifo.get(Duration::ZERO).await?.as_deref() == Some("b"));
    let started = Instant::now();
    anyhow::ensure!(pool.queue::<String>("empty").get(Duration::from_millis(300)).await?.is_none());
    anyhow::ensure!(started.elapsed() >= Duration::from_millis(300), "get waited its timeout");
    // A task waits on a queue; the coordinator feeds it.
    let waiting = pool.submit(consume(20_000));
    let to_tasks = pool.queue::<String>("to-tasks");
    to_tasks.put(&"job-1".to_string()).await?;
    let consumed = waiting.await?;
    anyhow::ensure!(consumed.as_deref() == Some("job-1"), "{consumed:?}");

    // Counter.
    let counter = pool.counter("c");
    anyhow::ensure!(counter.increment().await? == 1 && counter.add(10).await? == 11 && counter.decrement().await? == 10);
    anyhow::ensure!(counter.reset().await? == 10 && counter.value().await? == 0);

    // Barrier across every node, twice (generations 0 and 1).
    for round in 0..2u64 {
        let opened = pool.broadcast(meet("all".into(), 3)).await?;
        anyhow::ensure!(opened.iter().all(|o| *o == format!("opened {round}")), "round {round}: {opened:?}");
    }
    // The coordinator can be a party too.
    let one = pool.barrier("solo", 1);
    anyhow::ensure!(one.wait().await? == 0);

    // Lock: exclusion across nodes, then coordinator-side acquire/timeout/release.
    pool.broadcast(locked_increments(15)).await?;
    let total = pool.dict::<String, u64>("rmw").get(&"n".into()).await?;
    anyhow::ensure!(total == Some(45), "3 nodes x 15 locked read-modify-writes = 45, got {total:?}");
    let lock = pool.lock("coord");
    let guard = lock.acquire().await?;
    anyhow::ensure!(guard.taken_over().is_none());
    let second = lock.acquire_timeout(Duration::from_millis(200)).await;
    anyhow::ensure!(matches!(second, Err(ClusterError::Timeout { .. })), "held lock times out: {second:?}");
    guard.release().await?;
    let again = lock.acquire_timeout(Duration::ZERO).await?;
    anyhow::ensure!(again.fencing() == 2, "fencing token increases: {}", again.fencing());
    again.release().await?;

    actors(pool).await
}

/// `per_task` concurrent loops of `each` increments.
#[skyward::function]
async fn hammer(per_task: u32, each: u32) -> anyhow::Result<()> {
    let counter = skyward::counter("hits");
    let loops = (0..per_task).map(|_| {
        let counter = counter.clone();
        async move {
            for _ in 0..each {
                counter.increment().await?;
            }
            Ok::<(), ClusterError>(())
        }
    });
    futures::future::try_join_all(loops).await?;
    Ok(())
}

async fn concurrent_increments(pool: &Pool) -> anyhow::Result<()> {
    // Every node, and the coordinator at the same time.
    let coordinator = {
        let counter = pool.counter("hits");
        async move {
            for _ in 0..200 {
                counter.increment().await?;
            }
            Ok::<(), ClusterError>(())
        }
    };
    let (nodes, coord) = tokio::join!(pool.broadcast(hammer(8, 100)), coordinator);
    nodes?;
    coord?;
    let value = pool.counter("hits").value().await?;
    anyhow::ensure!(value == 3 * 8 * 100 + 200, "3 nodes x 800 + 200 from the coordinator = 2600 increments, counter says {value}");
    Ok(())
}

#[skyward::function]
async fn worker_pid() -> u32 {
    // The executor is the worker's child.
    std::os::unix::process::parent_id()
}

#[skyward::function]
async fn container_name() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// How a test kills a node.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// SIGKILL the Local worker process.
    WorkerProcess,
    /// `docker kill` the container.
    Container,
}

impl Victim {
    /// Learn how to kill `rank` (while it is alive), then return a killer.
    async fn prepare(self, pool: &Pool, rank: u32) -> anyhow::Result<impl FnOnce() -> anyhow::Result<()> + use<>> {
        let target = match self {
            Victim::WorkerProcess => pool.run_on(rank, worker_pid()).await?.to_string(),
            Victim::Container => pool.run_on(rank, container_name()).await?,
        };
        Ok(move || match self {
            Victim::WorkerProcess => {
                let pid: i32 = target.parse()?;
                // SAFETY: SIGKILL to a worker process this test's pool started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                Ok(())
            }
            Victim::Container => {
                let out = std::process::Command::new("docker").args(["kill", &target]).output()?;
                anyhow::ensure!(out.status.success(), "docker kill {target}: {}", String::from_utf8_lossy(&out.stderr));
                Ok(())
            }
        })
    }
}

/// Take the lock, say so on a queue, then hold it for a long time.
#[skyward::function]
async fn hold_lock(name: String, lease_ms: u64) -> anyhow::Result<()> {
    let guard = skyward::lock(&name).lease(Duration::from_millis(lease_ms)).acquire_timeout(Duration::ZERO).await?;
    skyward::queue::<u32>("holding").put(&skyward::instance_info().rank).await?;
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(guard);
    Ok(())
}

/// A name for a collection of `kind` whose primary, in the first placement over three nodes
/// (slot s on rank s % 3), is (`on == true`) or is not rank 2.
fn name_placed(kind: skyward::cluster::Kind, prefix: &str, on_rank_2: bool) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|name| {
            let slot = skyward::cluster::CellKey { kind, name: name.clone(), key: Vec::new() }.slot();
            (slot % 3 == 2) == on_rank_2
        })
        .expect("some name")
}

async fn lost_node(pool: &Pool, victim: Victim) -> anyhow::Result<()> {
    let mut events = pool.cluster_events();
    let dict = pool.dict::<u32, String>("survivor");
    let entries: Vec<(u32, String)> = (0..300).map(|i| (i, format!("value-{i}"))).collect();
    dict.update(entries.iter().map(|(k, v)| (k, v))).await?;
    let kill_rank_2 = victim.prepare(pool, 2).await?;
    let on_victim = pool.spawn_actor_on::<Tally>(2, &0).await?;
    anyhow::ensure!(on_victim.call(&TallyMsg::Add(1)).await? == 1);

    // Rank 2 holds the lock (lease 30 s: far longer than loss detection). The lock lives on rank
    // 2 itself, so its backup takes over with the holder recorded; the barrier lives elsewhere,
    // so its waiters see a participant go missing.
    let lock_name = name_placed(skyward::cluster::Kind::Lock, "held", true);
    let barrier_name = name_placed(skyward::cluster::Kind::Barrier, "three", false);
    let holder =
        pool.submit_with(hold_lock(lock_name.clone(), 30_000), skyward::Dispatch { placement: skyward::Placement::Rank(2), timeout: None });
    let held_by = pool.queue::<u32>("holding").get(Duration::from_secs(20)).await?;
    anyhow::ensure!(held_by == Some(2), "rank 2 took the lock: {held_by:?}");
    // Ranks 0 and 1 wait at a barrier for three; rank 2 will never come.
    let barrier = pool.barrier(&barrier_name, 3);
    let waiters: Vec<_> = [0u32, 1]
        .into_iter()
        .map(|r| {
            pool.submit_with(meet(barrier_name.clone(), 3), skyward::Dispatch { placement: skyward::Placement::Rank(r), timeout: None })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while barrier.waiting().await? < 2 {
        anyhow::ensure!(Instant::now() < deadline, "the two waiters never reached the barrier");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    kill_rank_2()?;
    let killed = Instant::now();

    // The lock passes to the next caller, who is told why.
    let guard = pool.lock(&lock_name).acquire_timeout(Duration::from_secs(20)).await?;
    let why = guard.taken_over().unwrap_or_default().to_string();
    anyhow::ensure!(why.contains("rank 2") && why.contains("lost"), "new holder told why: {why:?}");
    anyhow::ensure!(killed.elapsed() < Duration::from_secs(10), "lock freed {:?} after the kill (lost_after 2 s)", killed.elapsed());
    guard.release().await?;
    // The barrier fails for both waiters, naming the lost rank.
    for w in waiters {
        let outcome = w.await?;
        anyhow::ensure!(outcome.starts_with("error") && outcome.contains("[2]"), "barrier waiter got {outcome:?}");
    }
    // The actor died with its node: calls fail, none hangs.
    let call = tokio::time::timeout(Duration::from_secs(20), on_victim.call(&TallyMsg::Add(1))).await;
    anyhow::ensure!(
        matches!(call, Ok(Err(ClusterError::ActorDead { .. } | ClusterError::NodeLost { .. }))),
        "a call to an actor on a lost node: {call:?}"
    );
    let holder_result = holder.await;
    anyhow::ensure!(holder_result.is_err(), "the holder's task died with its node");
    // Every key survived on its backup.
    for (k, v) in &entries {
        let got = dict.get(k).await?;
        if got.as_ref() != Some(v)
            && let Ok(dir) = std::env::var("SKYWARD_TEST_KEEP_LOGS")
        {
            let src = skyward::providers::local::skyward_home().join("pools").join(pool.pool_id());
            let _ = std::process::Command::new("cp").args(["-r", &src.to_string_lossy(), &dir]).status();
        }
        anyhow::ensure!(got.as_ref() == Some(v), "key {k} after the loss: {got:?}");
    }
    // Events: rank 2 left, then its replacement joined; the dict is still whole and writable.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|e| matches!(e, ClusterEvent::Joined { rank: 2, .. })) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(event)) => seen.push(event),
            other => anyhow::bail!("no replacement joined: {other:?}; events {seen:?}"),
        }
    }
    let membership: Vec<&ClusterEvent> = seen.iter().filter(|e| !matches!(e, ClusterEvent::Replicated { .. })).collect();
    anyhow::ensure!(matches!(membership.first(), Some(ClusterEvent::Left { rank: 2, .. })), "left then joined: {seen:?}");
    for (k, v) in &entries {
        anyhow::ensure!(dict.get(k).await?.as_ref() == Some(v), "key {k} after the replacement joined");
    }
    dict.insert(&1000, &"after".to_string()).await?;
    anyhow::ensure!(pool.cluster_members().len() == 3);
    // Once the replacement holds its backups, losing another node still loses nothing.
    pool.wait_cluster_replicated(Duration::from_secs(20)).await?;
    victim.prepare(pool, 0).await?()?;
    for (k, v) in entries.iter().step_by(7) {
        let got = dict.get(k).await?;
        anyhow::ensure!(got.as_ref() == Some(v), "key {k} after a second loss: {got:?}");
    }
    anyhow::ensure!(dict.get(&1000).await?.as_deref() == Some("after"));
    Ok(())
}

async fn bad_input() -> anyhow::Result<()> {
    let pool = pool(2, 2).await?;
    // Bytes that are no operation (an unknown collection type): a typed error, nothing breaks.
    for rank in 0..2 {
        let answer = pool.__cluster_raw_request(rank, vec![0xf7, 0x03, 0x01, 0x02]).await;
        anyhow::ensure!(matches!(answer, Err(ClusterError::BadRequest(_))), "rank {rank}: {answer:?}");
    }
    // A stored value read as another type: a decode error naming the type.
    pool.dict::<String, String>("typed").insert(&"k".into(), &"not a bool".into()).await?;
    let wrong = pool.dict::<String, bool>("typed").get(&"k".into()).await;
    match wrong {
        Err(e @ ClusterError::Decode { .. }) => {
            let text = e.to_string();
            anyhow::ensure!(text.contains("typed") && text.contains("bool"), "{text}");
        }
        other => anyhow::bail!("expected a decode error, got {other:?}"),
    }
    // Barrier size disagreement.
    let a = pool.barrier("sized", 3);
    let waiting = tokio::spawn(async move { a.wait().await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.barrier("sized", 3).waiting().await? < 1 {
        anyhow::ensure!(Instant::now() < deadline, "first waiter never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mismatch = pool.barrier("sized", 4).wait().await;
    anyhow::ensure!(matches!(mismatch, Err(ClusterError::BarrierMismatch { expected: 3, got: 4, .. })), "{mismatch:?}");
    waiting.abort();
    // Inside a process that is not a task, the free functions explain themselves.
    let outside = skyward::counter("x").value().await;
    anyhow::ensure!(matches!(&outside, Err(ClusterError::Unavailable(m)) if m.contains("pool.dict()")), "{outside:?}");
    // The cluster still works.
    anyhow::ensure!(pool.counter("after").increment().await? == 1);
    pool.shutdown().await?;
    Ok(())
}

#[skyward::function]
async fn task_counter() -> String {
    match skyward::counter("c").increment().await {
        Ok(v) => format!("ok {v}"),
        Err(e) => e.to_string(),
    }
}

async fn standalone() -> anyhow::Result<()> {
    let pool: Pool = pool_in_mode(2, 1, Mode::Standalone).await?;
    let err = pool.dict::<String, u32>("d").insert(&"k".into(), &1).await.expect_err("standalone has no cluster");
    let text = err.to_string();
    anyhow::ensure!(matches!(err, ClusterError::Standalone), "{err:?}");
    anyhow::ensure!(text.contains("standalone") && text.contains("cluster: Some(true)"), "says why and how: {text}");
    let from_task = pool.run(task_counter()).await?;
    anyhow::ensure!(from_task.contains("standalone mode"), "a task is told too: {from_task}");
    anyhow::ensure!(pool.cluster_members().is_empty());
    let actor = pool.spawn_actor::<Tally>(&0).await;
    anyhow::ensure!(matches!(actor, Err(ClusterError::Standalone)), "actors need the cluster too: {actor:?}");
    pool.shutdown().await?;
    Ok(())
}
