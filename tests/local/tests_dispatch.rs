//! Dispatch: run, run_on, broadcast, join, gather (ordered and as completed), submit, stream,
//! commands, instance_info and shard inside tasks.

use crate::support::{Mode, assert_no_workers, block_on, pool};
use futures::StreamExt;
use libtest_mimic::Trial;
use serde::{Deserialize, Serialize};
use skyward::Command;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub(crate) x: i64,
    pub(crate) y: i64,
}

#[skyward::function]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[skyward::function]
async fn describe(p: Point, label: String) -> String {
    format!("{label}:{},{}", p.x, p.y)
}

#[skyward::function]
async fn rank_and_count() -> (u32, u32, usize) {
    let info = skyward::instance_info();
    (info.rank, info.node_count, info.peers.len())
}

#[skyward::function]
fn blocking_rank() -> u32 {
    skyward::instance_info().rank
}

/// Length and a position-weighted checksum: a byte lost, duplicated or moved changes it.
#[skyward::function]
async fn digest(data: serde_bytes::ByteBuf) -> (usize, u64) {
    (data.len(), checksum(&data))
}

/// A `Blob`'s length, checksum, and what the executor's memory map names the memory it reads
/// (a memfd when the arguments came through shared memory and were not copied out).
#[skyward::function]
async fn blob_home(data: skyward::Blob) -> anyhow::Result<(usize, u64, String)> {
    let at = data.as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let home = maps
        .lines()
        .find_map(|line| {
            let (range, rest) = line.split_once(' ')?;
            let (start, end) = range.split_once('-')?;
            let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
            (start <= at && at < end).then(|| rest.split_whitespace().nth(4).unwrap_or("").to_string())
        })
        .unwrap_or_default();
    Ok((data.len(), checksum(&data), home))
}

/// A large `Blob` result: the bytes reversed.
#[skyward::function]
async fn reversed(data: skyward::Blob) -> skyward::Blob {
    skyward::Blob::from(data.iter().rev().copied().collect::<Vec<u8>>())
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().enumerate().fold(0u64, |acc, (i, b)| acc.wrapping_mul(31).wrapping_add((*b as u64) ^ (i as u64)))
}

#[skyward::function]
async fn my_shard(len: u64) -> Vec<u64> {
    let data: Vec<u64> = (0..len).collect();
    skyward::shard(&data)
}

#[skyward::function]
pub(crate) async fn slow_echo(ms: u64, value: u32) -> u32 {
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    value
}

/// `value` after `ms`, or an error for `value == fail`.
#[skyward::function]
async fn echo_or_fail(ms: u64, value: u32, fail: u32) -> anyhow::Result<u32> {
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    anyhow::ensure!(value != fail, "call {value} fails");
    Ok(value)
}

#[skyward::function]
async fn count_to(n: u32) -> impl futures::Stream<Item = u32> + Send + 'static {
    futures::stream::iter(0..n)
}

/// The CPUs the calling process may run on, from `/proc/self/status` (`Cpus_allowed_list`, as
/// `0-3,6`).
fn cpus_allowed_here() -> anyhow::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow::anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(first.parse::<usize>()?..=last.parse::<usize>()?);
    }
    Ok(cpus)
}

/// The CPUs the executor of the node that runs this may use.
#[skyward::function]
async fn executor_cpus() -> anyhow::Result<Vec<usize>> {
    cpus_allowed_here()
}

pub(crate) fn trials() -> Vec<Trial> {
    vec![
        Trial::test("dispatch::local_nodes_run_on_cpu_slices_of_their_own", || block_on(cpu_slices())),
        Trial::test("dispatch::a_call_goes_to_an_idle_node_on_the_callers_cpu", || block_on(near_nodes())),
        Trial::test("dispatch::a_pool_on_a_current_thread_runtime", || {
            // What `#[skyward::main(flavor = "current_thread")]` gives: the caller, QUIC and the
            // lane readers all on this one thread.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(on_one_thread()).map_err(|e| format!("{e:#}").into())
        }),
        Trial::test("dispatch::every_api_on_three_nodes", || block_on(every_api_on_three_nodes(Mode::Cluster))),
        Trial::test("dispatch::every_api_on_three_nodes_standalone", || block_on(every_api_on_three_nodes(Mode::Standalone))),
        Trial::test("dispatch::commands_stream_output_and_fail_clearly", || block_on(commands())),
        Trial::test("dispatch::gather_keeps_a_window_of_calls_in_flight", || block_on(gather_window())),
        Trial::test("dispatch::binary_travels_over_quic_when_not_staged", || block_on(upload_path())),
    ]
}

async fn every_api_on_three_nodes(mode: Mode) -> anyhow::Result<()> {
    // Large arguments reach these nodes (on this machine) through shared memory in cluster mode;
    // standalone mode turns that off, so the inline path (chunked frames) is covered too. The
    // same for busy polling of idle CPUs while calls are in flight.
    let shared_memory = mode == Mode::Cluster;
    let busy_poll_cpus = if shared_memory { 2 } else { 0 };
    // Small tasks go on local lanes (Unix sockets) in cluster mode, on QUIC lanes (through the
    // tunnel) in standalone mode.
    let local_lanes = shared_memory;
    let options = skyward::Options { shared_memory_args: shared_memory, busy_poll_cpus, local_lanes, ..mode.options() };
    let pool = crate::support::pool_with(3, 4, options).await?;
    let id = pool.pool_id().to_string();
    anyhow::ensure!(pool.node_count() == 3, "three nodes");

    // run, with struct arguments
    anyhow::ensure!(pool.run(add(40, 2)).await? == 42);
    let s = pool.run(describe(Point { x: 1, y: -2 }, "p".into())).await?;
    anyhow::ensure!(s == "p:1,-2", "got {s}");

    // run_on pins a rank; blocking functions see their context too
    for rank in 0..3 {
        anyhow::ensure!(pool.run_on(rank, blocking_rank()).await? == rank, "run_on({rank})");
    }

    // broadcast: every node, ordered by rank, with instance_info filled in
    let all = pool.broadcast(rank_and_count()).await?;
    anyhow::ensure!(all == vec![(0, 3, 3), (1, 3, 3), (2, 3, 3)], "broadcast gave {all:?}");

    // large arguments: shared by every node's task and either put in shared memory once or
    // written to the stream and the executor socket in chunks (bigger than the socket buffers,
    // so the writers' backlog carries them)
    let through_memory = pool.stats().await?.shared_memory_args;
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let want = (data.len(), checksum(&data));
    let seen = pool.broadcast(digest(serde_bytes::ByteBuf::from(data.clone()))).await?;
    anyhow::ensure!(seen == vec![want; 3], "a node saw different bytes: {seen:?} (want {want:?})");
    // several large calls at once on each node, each with its own bytes: none sees another's
    let inputs: Vec<Vec<u8>> = (0..9u8).map(|k| data.iter().map(|b| b.wrapping_add(k)).collect()).collect();
    let wants: Vec<(usize, u64)> = inputs.iter().map(|d| (d.len(), checksum(d))).collect();
    let seen = pool.gather(inputs.into_iter().map(|d| digest(serde_bytes::ByteBuf::from(d)))).await?;
    anyhow::ensure!(seen == wants, "concurrent large calls mixed up: {seen:?} (want {wants:?})");
    let through_memory = pool.stats().await?.shared_memory_args - through_memory;
    let expected = if shared_memory { 12 } else { 0 };
    anyhow::ensure!(through_memory == expected, "{through_memory} large calls went through shared memory, not {expected}");
    // A Blob argument is read where it arrived: through shared memory, the sealed object itself
    // (no copy in the executor); inline, the same bytes.
    let seen = pool.broadcast(blob_home(skyward::Blob::from(data.clone()))).await?;
    for (len, sum, home) in &seen {
        anyhow::ensure!((*len, *sum) == want, "a node saw different bytes in a Blob: {seen:?} (want {want:?})");
        let in_memfd = home.starts_with("/memfd:skyward-args");
        anyhow::ensure!(in_memfd == shared_memory, "a Blob's bytes live in {home:?} (shared memory: {shared_memory})");
    }
    // A large Blob comes back as a result too (decoded in the caller from the result's buffer).
    let back = pool.run(reversed(skyward::Blob::from(data.clone()))).await?;
    anyhow::ensure!(back.len() == data.len() && back.iter().eq(data.iter().rev()), "a Blob result came back different");
    // Every task has its result: no shared-memory object is left open.
    let open = pool.stats().await?.shared_memory_objects;
    anyhow::ensure!(open == 0, "{open} shared-memory argument objects still open after their tasks");

    // shard inside tasks: the union over ranks is the data set, once
    let mut shards: Vec<u64> = pool.broadcast(my_shard(10)).await?.into_iter().flatten().collect();
    shards.sort_unstable();
    anyhow::ensure!(shards == (0..10).collect::<Vec<_>>(), "shards {shards:?}");

    // join: different functions, typed results
    let (sum, text, info) = pool.join((add(1, 2), describe(Point { x: 3, y: 4 }, "j".into()), rank_and_count())).await?;
    anyhow::ensure!(sum == 3 && text == "j:3,4" && info.1 == 3);

    // gather: ordered results
    let on_lanes = pool.stats().await?.local_lane_dispatches;
    let values = pool.gather((0..200).map(|i| add(i, i))).await?;
    anyhow::ensure!(values == (0..200).map(|i| 2 * i).collect::<Vec<_>>());
    let on_lanes = pool.stats().await?.local_lane_dispatches - on_lanes;
    let expected = if local_lanes { 200 } else { 0 };
    anyhow::ensure!(on_lanes == expected, "{on_lanes} of 200 small calls went on local lanes, not {expected}");

    // gather as completed: the fast task first
    let calls = vec![slow_echo(300, 1), slow_echo(0, 2)];
    let order: Vec<usize> =
        pool.gather_unordered(calls).map(|(i, r)| r.map(|_| i)).collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>()?;
    anyhow::ensure!(order == vec![1, 0], "completion order {order:?}");

    // submit: a handle to await, or to cancel
    let handle = pool.submit(slow_echo(10, 9));
    anyhow::ensure!(handle.await? == 9);
    let long = pool.submit(slow_echo(60_000, 1));
    long.cancel();
    let err = long.await.expect_err("cancelled");
    anyhow::ensure!(matches!(err.task_error(), Some(skyward::TaskError::Cancelled)), "got {err}");

    // per-task timeout
    let err = pool
        .submit_with(
            slow_echo(60_000, 1),
            skyward::Dispatch { placement: skyward::Placement::Any, timeout: Some(std::time::Duration::from_millis(200)) },
        )
        .await
        .expect_err("timed out");
    anyhow::ensure!(matches!(err.task_error(), Some(skyward::TaskError::Timeout(_))), "got {err}");

    // stream: items in order, more than the credit window (backpressure round trips)
    let items: Vec<u32> = pool.stream(count_to(500)).map(|r| r.expect("item")).collect().await;
    anyhow::ensure!(items == (0..500).collect::<Vec<_>>(), "stream gave {} items", items.len());

    // the pool still works after all that
    anyhow::ensure!(pool.run(add(1, 1)).await? == 2);
    let stats = pool.stats().await?;
    anyhow::ensure!(stats.running == 0 && stats.queued == 0, "idle pool: {stats:?}");
    // Busy polling started with the first node on this machine, and spun while calls ran.
    let threads = busy_poll_cpus.min(std::thread::available_parallelism()?.get());
    anyhow::ensure!(stats.busy_poll_threads == threads, "{} busy-poll threads, not {threads}", stats.busy_poll_threads);
    anyhow::ensure!((stats.busy_poll_spun > std::time::Duration::ZERO) == (threads > 0), "busy polling spun {:?}", stats.busy_poll_spun);
    pool.shutdown().await?;
    assert_no_workers(&id)
}

async fn commands() -> anyhow::Result<()> {
    let pool = pool(2, 2).await?;
    let id = pool.pool_id().to_string();
    let dir = std::env::temp_dir();
    let out = pool
        .command(
            Command::shell("echo one; echo two; echo err >&2; echo \"$GREETING\"; pwd")
                .env("GREETING", "hi there")
                .cwd(dir.to_string_lossy()),
        )
        .await?;
    anyhow::ensure!(out.stdout[..3] == ["one", "two", "hi there"], "stdout {:?}", out.stdout);
    anyhow::ensure!(out.stderr == ["err"], "stderr {:?}", out.stderr);
    anyhow::ensure!(out.stdout[3] == dir.to_string_lossy(), "cwd {:?}", out.stdout[3]);

    let all = pool.broadcast_command(Command::new("true")).await?;
    anyhow::ensure!(all.iter().map(|o| o.rank).collect::<Vec<_>>() == vec![0, 1]);

    let err = pool.command(Command::shell("echo boom >&2; exit 3")).await.expect_err("non-zero exit");
    let text = err.to_string();
    anyhow::ensure!(text.contains("exited with code 3") && text.contains("boom"), "error was: {text}");

    let err = pool.command(Command::new("/no/such/program")).await.expect_err("missing program");
    anyhow::ensure!(err.to_string().contains("cannot start `/no/such/program`"), "error was: {err}");

    // A timeout ends the command and everything it started (its process group).
    let err = pool
        .command(Command::shell("sleep 31.7 & sleep 31.7; wait").timeout(std::time::Duration::from_millis(300)))
        .await
        .expect_err("timeout");
    anyhow::ensure!(err.to_string().contains("timed out"), "error was: {err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sleepers("31.7") > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "processes of a timed-out command survived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    pool.shutdown().await?;
    assert_no_workers(&id)
}

/// A gather of more calls than `max_in_flight` never has more submitted and unfinished than the
/// window (sampled from the task counters while it runs), fills it, and keeps results in order.
async fn gather_window() -> anyhow::Result<()> {
    const WINDOW: usize = 3;
    let options = skyward::Options { max_in_flight: WINDOW, ..Mode::Cluster.options() };
    let pool = crate::support::pool_with(2, 4, options).await?;
    let id = pool.pool_id().to_string();
    let before = pool.stats().await?.finished;
    let (values, most, samples) = {
        let gather = pool.gather((0..30).map(|i| slow_echo(15, i)));
        tokio::pin!(gather);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
        let (mut most, mut samples) = (0, 0);
        loop {
            tokio::select! {
                biased;
                values = &mut gather => break (values?, most, samples),
                _ = tick.tick() => {
                    let s = pool.stats().await?;
                    most = most.max(s.queued + s.running);
                    samples += 1;
                    anyhow::ensure!(samples < 100_000, "gather did not finish");
                }
            }
        }
    };
    anyhow::ensure!(values == (0..30).collect::<Vec<u32>>(), "gather results out of order: {values:?}");
    anyhow::ensure!(most <= WINDOW, "{most} calls in flight with a window of {WINDOW} (8 slots free)");
    anyhow::ensure!(most == WINDOW, "the window was never full (at most {most} in flight over {samples} samples)");
    anyhow::ensure!(pool.stats().await?.finished - before == 30, "a call ran twice or not at all");
    // The first failure ends the gather: calls past the window are never submitted.
    let before = pool.stats().await?.finished;
    // Call 2 fails at once while 0 and 1 still run: the window stays at its first 3 calls.
    let err = pool.gather((0..30).map(|i| echo_or_fail(if i == 2 { 0 } else { 50 }, i, 2))).await.expect_err("call 2 fails");
    anyhow::ensure!(err.to_string().contains("call 2 fails"), "error was: {err:#}");
    // Submitted = finished + still queued or running (cancelled ones move, the sum stays).
    let s = pool.stats().await?;
    let submitted = s.finished - before + (s.queued + s.running) as u64;
    anyhow::ensure!(submitted == WINDOW as u64, "{submitted} calls submitted by a gather whose third call failed first");
    // As completed: every index once, also past the first window.
    let mut seen: Vec<usize> = pool
        .gather_unordered((0..10).map(|i| slow_echo(1, i)))
        .map(|(i, r)| r.map(|_| i))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    seen.sort_unstable();
    anyhow::ensure!(seen == (0..10).collect::<Vec<_>>(), "gather_unordered yielded {seen:?}");
    pool.shutdown().await?;
    assert_no_workers(&id)
}

async fn upload_path() -> anyhow::Result<()> {
    let pool = skyward::Compute::new(skyward::Local::default().upload_binaries(true))
        .nodes(2)
        .options(crate::support::test_options())
        .start()
        .await?;
    let id = pool.pool_id().to_string();
    anyhow::ensure!(pool.broadcast(add(2, 3)).await? == vec![5, 5]);
    pool.shutdown().await?;
    assert_no_workers(&id)
}

/// Live `sleep <arg>` processes on this machine.
fn sleepers(arg: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && cmdline == format!("sleep\0{arg}\0").as_bytes()
        })
        .count()
}

/// Each Local node (worker and executor) runs on its own slice of this process's CPUs; with
/// `share_cpus(true)` every node may use all of them.
async fn cpu_slices() -> anyhow::Result<()> {
    let here = cpus_allowed_here()?;
    let sliced = crate::support::pool(2, 1).await?;
    let per_node = sliced.broadcast(executor_cpus()).await?;
    sliced.shutdown().await?;
    let shared =
        skyward::Compute::new(skyward::Local::default().share_cpus(true)).nodes(2).options(crate::support::test_options()).start().await?;
    let per_node_shared = shared.broadcast(executor_cpus()).await?;
    shared.shutdown().await?;
    for cpus in &per_node_shared {
        anyhow::ensure!(*cpus == here, "share_cpus(true): a node runs on {cpus:?}, this process on {here:?}");
    }
    if here.len() < 2 {
        // One CPU: nothing to slice, and Local pins nothing.
        anyhow::ensure!(per_node.iter().all(|c| *c == here), "one CPU, yet nodes run on {per_node:?}");
        return Ok(());
    }
    let [a, b] = per_node.as_slice() else { anyhow::bail!("2 nodes, {} answers: {per_node:?}", per_node.len()) };
    anyhow::ensure!(!a.is_empty() && !b.is_empty(), "a node without CPUs: {per_node:?}");
    anyhow::ensure!(a.iter().all(|c| !b.contains(c)), "nodes share CPUs: {per_node:?}");
    let mut union: Vec<usize> = a.iter().chain(b).copied().collect();
    union.sort_unstable();
    anyhow::ensure!(union == here, "slices {per_node:?} do not cover this process's CPUs {here:?}");
    Ok(())
}

/// Restores the calling thread's CPU mask when dropped. Not `Send`: it must be dropped on the
/// thread it pinned (held across an `.await`, only under a `block_on` that polls on this thread).
struct PinnedThread(libc::cpu_set_t, std::marker::PhantomData<*const ()>);

impl PinnedThread {
    /// Keep the calling thread on `cpu` until the guard is dropped.
    fn to(cpu: usize) -> anyhow::Result<Self> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: masks the kernel fills or CPU_SET writes inside (cpu comes from this
        // process's own mask); pid 0 is the calling thread.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            anyhow::ensure!(libc::sched_getaffinity(0, size, &mut before) == 0, "sched_getaffinity");
            let mut only: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut only);
            anyhow::ensure!(libc::sched_setaffinity(0, size, &only) == 0, "sched_setaffinity({cpu})");
            Ok(Self(before, std::marker::PhantomData))
        }
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in `to`, on the same thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// With Local nodes on CPU slices of their own, a call from a thread on one node's CPUs goes to
/// that node while it is idle (no wake-up crosses CPUs), whatever the round robin would pick;
/// while that node is busy, calls are spread round robin as before.
async fn near_nodes() -> anyhow::Result<()> {
    let here = cpus_allowed_here()?;
    if here.len() < 2 {
        // One CPU: Local pins nothing and no node is nearer than another.
        return Ok(());
    }
    let pool = crate::support::pool(2, 2).await?;
    let slices = pool.broadcast(executor_cpus()).await?;
    if slices.contains(&here) {
        // Local could not pin the nodes (best effort): neither is nearer than the other.
        pool.shutdown().await?;
        return Ok(());
    }
    for (rank, slice) in slices.iter().enumerate() {
        let _pinned = PinnedThread::to(slice[0])?;
        let mut ranks = Vec::new();
        for _ in 0..20 {
            ranks.push(pool.run(blocking_rank()).await?);
        }
        anyhow::ensure!(ranks.iter().all(|&r| r as usize == rank), "from CPU {}, calls went to ranks {ranks:?}", slice[0]);
        // The near node busy (the submit books the task on it before it returns): calls take
        // the round robin again, over both nodes.
        let busy =
            pool.submit_with(slow_echo(60_000, 1), skyward::Dispatch { placement: skyward::Placement::Rank(rank as u32), timeout: None });
        let mut spread = Vec::new();
        for _ in 0..4 {
            spread.push(pool.run(blocking_rank()).await?);
        }
        busy.cancel();
        anyhow::ensure!(busy.await.is_err(), "the cancelled call answered");
        anyhow::ensure!(spread.contains(&0) && spread.contains(&1), "with rank {rank} busy, calls from its CPU went to ranks {spread:?}");
    }
    let id = pool.pool_id().to_string();
    pool.shutdown().await?;
    assert_no_workers(&id)
}

/// Start, one call at a time, a gather, a broadcast and a shutdown with every task of the pool on
/// one thread.
async fn on_one_thread() -> anyhow::Result<()> {
    let pool = crate::support::pool(2, 4).await?;
    let pool_id = pool.pool_id().to_string();
    for i in 0..50 {
        anyhow::ensure!(pool.run(add(i, 1)).await? == i + 1, "run {i}");
    }
    let sums = pool.gather((0..200).map(|i| add(i, i))).await?;
    anyhow::ensure!(sums == (0..200).map(|i| 2 * i).collect::<Vec<_>>(), "gather out of order: {sums:?}");
    let ranks = pool.broadcast(rank_and_count()).await?;
    anyhow::ensure!(ranks.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>() == [(0, 2), (1, 2)], "broadcast: {ranks:?}");
    pool.shutdown().await?;
    assert_no_workers(&pool_id)
}
