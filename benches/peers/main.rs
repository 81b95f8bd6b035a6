//! Peer benchmark: the same scenarios on Skyward (Local provider, real QUIC with mutual TLS, real
//! worker and executor processes) and on Ray, in one run on one machine; prints a table (median,
//! min-max over repetitions, ratio, target) and writes it as JSON.
//!
//! ```text
//! cargo bench --bench peers                      # full run; installs Ray into a venv if needed
//! cargo bench --bench peers -- --json out.json   # where the JSON goes (default: $TMPDIR/skyward-peers.json)
//! cargo bench --bench peers -- --no-ray          # Skyward only
//! cargo bench --bench peers -- --only broadcast  # one group: tasks, broadcast, start or scale
//! cargo test --bench peers -- --test             # smoke run (what .ci/run does): tiny counts
//! ```
//!
//! Ray comes from `benches/peers/setup-ray.sh` (pinned version, its own virtualenv) unless
//! `SKYWARD_RAY_PYTHON` names a Python that has it; its scenarios are in `benches/peers/ray_peer.py`.
//! The scale scenario (1,000 simulated nodes) is Skyward only: see `sim.rs`.
#![allow(clippy::print_stdout)]

mod sim;

use serde_json::{Value, json};
use skyward::{Compute, Local, Worker};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[skyward::function]
async fn noop() {}

/// Touches the argument (one byte per page) so it cannot be skipped. A `Blob` is read where it
/// arrived: the shared memory the caller wrote, or the buffer the executor received.
#[skyward::function]
async fn consume(data: skyward::Blob) -> u64 {
    checksum(&data)
}

/// The same with an owned buffer: each node's executor copies the argument out first.
#[skyward::function]
async fn consume_owned(data: serde_bytes::ByteBuf) -> u64 {
    checksum(&data)
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().step_by(4096).map(|b| *b as u64).sum::<u64>() + data.len() as u64
}

struct Echo;

impl skyward::Actor for Echo {
    type Args = ();
    type Msg = u64;
    type Reply = u64;

    async fn start(_: ()) -> anyhow::Result<Self> {
        Ok(Echo)
    }

    async fn handle(&mut self, msg: u64) -> anyhow::Result<u64> {
        Ok(msg)
    }
}
skyward::actor!(Echo);

/// Run sizes; `--test` shrinks everything to prove the paths work.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    reps: usize,
    sync_samples: usize,
    async_tasks: usize,
    actor_calls: usize,
    broadcast_bytes: usize,
    start_reps: usize,
    scale_nodes: u32,
    scale_tasks: usize,
}

impl Sizes {
    fn new(quick: bool, reps: Option<usize>) -> Self {
        if quick {
            Sizes {
                reps: 1,
                sync_samples: 100,
                async_tasks: 1_000,
                actor_calls: 200,
                broadcast_bytes: 16 << 20,
                start_reps: 1,
                scale_nodes: 20,
                scale_tasks: 1_000,
            }
        } else {
            Sizes {
                reps: reps.unwrap_or(5),
                sync_samples: 5_000,
                async_tasks: 100_000,
                actor_calls: 10_000,
                broadcast_bytes: 256 << 20,
                start_reps: 5,
                scale_nodes: 1_000,
                scale_tasks: 100_000,
            }
        }
    }
}

fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort_unstable();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

/// One scenario's per-repetition values, by metric, in the JSON shape `ray_peer.py` writes.
fn scenario(name: &str, metrics: &[(&str, Vec<f64>)], note: Option<String>) -> Value {
    let metrics: serde_json::Map<String, Value> = metrics.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let mut s = json!({ "name": name, "metrics": metrics });
    if let Some(note) = note {
        s["note"] = json!(note);
    }
    s
}

fn main() {
    skyward::init();
    if std::env::var(sim::ROLE_ENV).as_deref() == Ok("sim-host") {
        sim::host_main();
    }
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--test");
    let sizes = Sizes::new(quick, flag("--reps").and_then(|r| r.parse().ok()));
    if std::env::var(sim::ROLE_ENV).as_deref() == Ok("scale") {
        scale_main(sizes);
    }
    let json_path = flag("--json").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("skyward-peers.json"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");

    // `--only tasks|broadcast|start|scale`: one group of scenarios, Skyward only (for profiling).
    let only = flag("--only");
    let run = |group: &str| only.as_deref().is_none_or(|o| o == group);
    let mut ours = Vec::new();
    if run("tasks") {
        eprintln!("skyward: 2 Local workers: sync round trips, async throughput, actor calls");
        let mut with = rt.block_on(two_workers(sizes, true));
        eprintln!("skyward: the same with busy polling off");
        let without = rt.block_on(two_workers(sizes, false));
        // One scenario each, the busy-polling-off figures as `<metric>_no_busy_poll`.
        for (scenario, off) in with.iter_mut().zip(without) {
            for (metric, values) in off["metrics"].as_object().into_iter().flatten() {
                scenario["metrics"][format!("{metric}_no_busy_poll")] = values.clone();
            }
        }
        eprintln!("skyward: the sync scenarios from a client on a current-thread runtime");
        let current = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        for off in current.block_on(current_thread_client(sizes)) {
            let scenario = with.iter_mut().find(|s| s["name"] == off["name"]).expect("scenario measured above");
            for (metric, values) in off["metrics"].as_object().into_iter().flatten() {
                scenario["metrics"][format!("{metric}_current_thread")] = values.clone();
            }
        }
        ours.extend(with);
    }
    if run("broadcast") {
        eprintln!("skyward: broadcast to 4 Local workers");
        ours.push(rt.block_on(broadcast(sizes)));
    }
    if run("start") {
        eprintln!("skyward: pool start, 4 Local workers");
        ours.push(rt.block_on(pool_start(sizes)));
    }
    if run("scale") {
        eprintln!("skyward: scale, {} simulated nodes (own process)", sizes.scale_nodes);
        ours.push(scale(sizes));
    }

    let ray = if only.is_some() || args.iter().any(|a| a == "--no-ray") {
        Err("skipped (--no-ray or --only)".to_string())
    } else {
        run_ray(quick, sizes.reps)
    };
    let report = report(&ours, &ray, quick);
    print_table(&report);
    let text = serde_json::to_string_pretty(&report).expect("json");
    match std::fs::write(&json_path, text) {
        Ok(()) => println!("\nJSON: {}", json_path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", json_path.display()),
    }
}

/// `sizes.reps` repetitions of `sizes.sync_samples` no-op calls, one at a time: p50 and p99 of
/// each repetition, in microseconds.
async fn sync_roundtrips(pool: &skyward::Pool, sizes: Sizes) -> (Vec<f64>, Vec<f64>) {
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..sizes.reps {
        let mut samples = Vec::with_capacity(sizes.sync_samples);
        for _ in 0..sizes.sync_samples {
            let t = Instant::now();
            pool.run(noop()).await.expect("noop");
            samples.push(t.elapsed());
        }
        p50.push(percentile_us(&mut samples, 0.5));
        p99.push(percentile_us(&mut samples, 0.99));
    }
    (p50, p99)
}

/// The same for calls to an actor (after 100 to warm up).
async fn sync_actor_calls(echo: &skyward::ActorRef<Echo>, sizes: Sizes) -> (Vec<f64>, Vec<f64>) {
    for i in 0..100 {
        echo.call(&i).await.expect("warm up");
    }
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..sizes.reps {
        let mut samples = Vec::with_capacity(sizes.sync_samples);
        for i in 0..sizes.sync_samples as u64 {
            let t = Instant::now();
            echo.call(&i).await.expect("actor call");
            samples.push(t.elapsed());
        }
        p50.push(percentile_us(&mut samples, 0.5));
        p99.push(percentile_us(&mut samples, 0.99));
    }
    (p50, p99)
}

/// The sync scenarios again from a client on a current-thread runtime (what
/// `#[skyward::main(flavor = "current_thread")]` gives: the caller, QUIC and the lane readers on
/// one thread, no hand-off between threads per call), default options.
async fn current_thread_client(sizes: Sizes) -> Vec<Value> {
    let pool = Compute::new(Local::default()).nodes(2).worker(Worker { concurrency: 256 }).start().await.expect("pool");
    pool.gather((0..1000).map(|_| noop())).await.expect("warm up");
    let (p50, p99) = sync_roundtrips(&pool, sizes).await;
    let mut out = vec![scenario("sync_task_roundtrip", &[("p50_us", p50), ("p99_us", p99)], None)];
    let echo = pool.spawn_actor_on::<Echo>(1, &()).await.expect("spawn actor");
    let (p50, p99) = sync_actor_calls(&echo, sizes).await;
    out.push(scenario("sync_actor_call", &[("p50_us", p50), ("p99_us", p99)], None));
    pool.shutdown().await.expect("shutdown");
    out
}

/// Sync and async tasks and actor calls on one pool of 2 Local workers, with busy polling on
/// (the default: idle CPUs poll while calls are in flight) or off.
async fn two_workers(sizes: Sizes, busy_poll: bool) -> Vec<Value> {
    let options =
        if busy_poll { skyward::Options::default() } else { skyward::Options { busy_poll_cpus: 0, ..skyward::Options::default() } };
    let pool = Compute::new(Local::default()).nodes(2).worker(Worker { concurrency: 256 }).options(options).start().await.expect("pool");
    // Executors start on first use.
    pool.gather((0..1000).map(|_| noop())).await.expect("warm up");
    let mut out = Vec::new();

    let (p50, p99) = sync_roundtrips(&pool, sizes).await;
    out.push(scenario("sync_task_roundtrip", &[("p50_us", p50), ("p99_us", p99)], None));

    let mut rates = Vec::new();
    for _ in 0..sizes.reps {
        let t = Instant::now();
        pool.gather((0..sizes.async_tasks).map(|_| noop())).await.expect("gather");
        rates.push(sizes.async_tasks as f64 / t.elapsed().as_secs_f64());
    }
    // The same from a task spawned on the runtime (a server's handler, say): the gather's
    // consumer and the lane readers then run on different runtime threads at once.
    let mut spawned = Vec::new();
    for _ in 0..sizes.reps {
        let t = Instant::now();
        let results = pool.gather_unordered((0..sizes.async_tasks).map(|_| noop()));
        let ok = tokio::spawn(futures::StreamExt::count(futures::StreamExt::filter(results, |(_, r)| std::future::ready(r.is_ok()))))
            .await
            .expect("spawned gather");
        assert_eq!(ok, sizes.async_tasks, "calls of the spawned gather failed");
        spawned.push(sizes.async_tasks as f64 / t.elapsed().as_secs_f64());
    }
    out.push(scenario(
        "async_task_throughput",
        &[("tasks_per_s", rates), ("tasks_per_s_spawned", spawned)],
        Some(format!("{} tasks per repetition", sizes.async_tasks)),
    ));

    let echo = pool.spawn_actor_on::<Echo>(1, &()).await.expect("spawn actor");
    let (p50, p99) = sync_actor_calls(&echo, sizes).await;
    out.push(scenario("sync_actor_call", &[("p50_us", p50), ("p99_us", p99)], Some("coordinator -> actor on rank 1".into())));

    let mut rates = Vec::new();
    for _ in 0..sizes.reps {
        let t = Instant::now();
        let calls = (0..sizes.actor_calls as u64).map(|i| {
            let echo = echo.clone();
            async move { echo.call(&i).await }
        });
        futures::future::try_join_all(calls).await.expect("actor calls");
        rates.push(sizes.actor_calls as f64 / t.elapsed().as_secs_f64());
    }
    out.push(scenario(
        "async_actor_calls",
        &[("calls_per_s", rates)],
        Some(format!("{} concurrent calls per repetition", sizes.actor_calls)),
    ));
    let stats = pool.stats().await.expect("stats");
    assert_eq!(stats.busy_poll_threads > 0, busy_poll, "busy-poll threads: {}", stats.busy_poll_threads);
    eprintln!("  busy-poll threads {}, spun {:.1} s", stats.busy_poll_threads, stats.busy_poll_spun.as_secs_f64());
    pool.shutdown().await.expect("shutdown");
    out
}

/// One argument of `broadcast_bytes` to each of 4 workers: aggregate GB/s from the call to the
/// last answer. The argument is a `Blob` made from the caller's buffer without a copy (as Ray's
/// `ray.put` of a numpy array); `owned`: the same as an owned buffer, copied from the caller's
/// buffer for each call and copied out by each executor.
async fn broadcast(sizes: Sizes) -> Value {
    let data = bytes::Bytes::from((0..sizes.broadcast_bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let want = checksum(&data);
    let (mut rates, mut seconds, mut owned_rates, mut quic_rates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Local nodes take it through shared memory; then the same with that off: over QUIC, as
    // nodes on other machines get it.
    for shared_memory in [true, false] {
        let options = skyward::Options { shared_memory_args: shared_memory, ..skyward::Options::default() };
        let pool = Compute::new(Local::default()).nodes(4).options(options).start().await.expect("pool");
        pool.broadcast(noop()).await.expect("warm up");
        let kinds: &[bool] = if shared_memory { &[false, true] } else { &[false] };
        for &owned in kinds {
            for _ in 0..sizes.reps {
                let t = Instant::now();
                let got = if owned {
                    pool.broadcast(consume_owned(serde_bytes::ByteBuf::from(data.to_vec()))).await
                } else {
                    pool.broadcast(consume(skyward::Blob::from(data.clone()))).await
                };
                let s = t.elapsed().as_secs_f64();
                assert!(got.expect("broadcast").iter().all(|g| *g == want), "a node saw different bytes");
                let rate = 4.0 * sizes.broadcast_bytes as f64 / s / 1e9;
                match (shared_memory, owned) {
                    (true, false) => {
                        seconds.push(s);
                        rates.push(rate);
                    }
                    (true, true) => owned_rates.push(rate),
                    (false, _) => quic_rates.push(rate),
                }
            }
        }
        let through_memory = pool.stats().await.expect("stats").shared_memory_args;
        assert_eq!(through_memory > 0, shared_memory, "shared memory used: {through_memory} dispatches");
        pool.shutdown().await.expect("shutdown");
    }
    scenario(
        "broadcast_256mib_4_workers",
        &[("gb_per_s", rates), ("seconds", seconds), ("gb_per_s_owned", owned_rates), ("gb_per_s_over_quic", quic_rates)],
        Some(format!(
            "{} MiB to each of 4 Local nodes as a skyward::Blob: encoded once, written once into shared memory, read in place by each node's executor; owned: the same as serde_bytes::ByteBuf (a copy per call and one per executor); over_quic: Blob with shared memory off (once per node, as to other machines)",
            sizes.broadcast_bytes >> 20
        )),
    )
}

/// `Compute::start()` until 4 Local workers are ready (executable staged, hello, lanes).
async fn pool_start(sizes: Sizes) -> Value {
    let mut ms = Vec::new();
    for _ in 0..sizes.start_reps {
        let t = Instant::now();
        let pool = Compute::new(Local::default()).nodes(4).start().await.expect("pool");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        pool.shutdown().await.expect("shutdown");
    }
    scenario("pool_start_4_workers", &[("ready_ms", ms)], Some("Compute::start() until every worker has joined".into()))
}

/// The scale scenario in a child process (so the RSS measured is the coordinator's alone).
fn scale(sizes: Sizes) -> Value {
    let exe = std::env::current_exe().expect("exe");
    let mut command = std::process::Command::new(exe);
    command.env(sim::ROLE_ENV, "scale").stderr(std::process::Stdio::inherit());
    if sizes.scale_nodes < 1000 {
        command.arg("--test");
    }
    let out = command.output().expect("scale process");
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    match serde_json::from_str::<Value>(&line) {
        Ok(v) if out.status.success() => v,
        // A failed scale run is a result too (the other scenarios still report).
        _ => scenario("scale_1000_sim_nodes", &[], Some(format!("FAILED ({}); see the output above", out.status))),
    }
}

/// A `field:  N kB` line of a /proc file (`status` of a process, `meminfo`), in KiB.
fn proc_kib(file: &str, field: &str) -> f64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Role `scale`: a pool of `scale_nodes` sim nodes; prints one JSON line.
fn scale_main(sizes: Sizes) -> ! {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let sim = sim::Sim::new();
    let value = rt.block_on(async {
        let t = Instant::now();
        // 1,000 workers and the coordinator saturate both vCPUs here; answered late, heartbeats
        // would count as losses (and the replacements add load). Loss detection is not what
        // this scenario measures: it waits 30 s, not 3.
        let options = skyward::Options { lost_after: std::time::Duration::from_secs(30), ..skyward::Options::default() };
        let pool = Compute::new(sim.clone()).nodes(sizes.scale_nodes).options(options).start().await.expect("pool of sim nodes");
        let ready = t.elapsed().as_secs_f64();
        let rss_ready = proc_kib("/proc/self/status", "VmRSS:") / 1024.0;
        let t = Instant::now();
        // Progress once a second: a run that goes wrong (nodes lost under load) shows how.
        let gathered = {
            let gather = pool.gather((0..sizes.scale_tasks).map(|_| noop()));
            tokio::pin!(gather);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    result = &mut gather => break result,
                    _ = tick.tick() => if let Ok(s) = pool.stats().await {
                        eprintln!(
                            "scale: {:>5.1} s: {} ready, {} running, {} queued, {} finished, {} re-queued; coordinator RSS {:.0} MB",
                            t.elapsed().as_secs_f64(),
                            s.ready_nodes,
                            s.running,
                            s.queued,
                            s.finished,
                            s.requeued,
                            proc_kib("/proc/self/status", "VmRSS:") / 1024.0
                        );
                    },
                }
            }
        };
        gathered.expect("gather");
        let rate = sizes.scale_tasks as f64 / t.elapsed().as_secs_f64();
        let rss_peak = proc_kib("/proc/self/status", "VmHWM:") / 1024.0;
        let host_rss = sim.host_pid().map_or(f64::NAN, |pid| proc_kib(&format!("/proc/{pid}/status"), "VmRSS:") / 1024.0);
        pool.shutdown().await.expect("shutdown");
        scenario(
            "scale_1000_sim_nodes",
            &[
                ("ready_s", vec![ready]),
                ("coordinator_rss_mb", vec![rss_ready]),
                ("coordinator_peak_rss_mb", vec![rss_peak]),
                ("tasks_per_s", vec![rate]),
                ("sim_host_rss_mb", vec![host_rss]),
            ],
            Some(format!(
                "{} nodes: real workers (session, QUIC + mutual TLS, lanes) in one sim-host process, calls served there; {} tasks",
                sizes.scale_nodes, sizes.scale_tasks
            )),
        )
    });
    println!("{value}");
    std::process::exit(0)
}

/// A thousand connections and state files need more descriptors than the common soft limit.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Ray's figures from `ray_peer.py`, or why there are none.
fn run_ray(quick: bool, reps: usize) -> Result<Value, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peers");
    let python = match std::env::var("SKYWARD_RAY_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            eprintln!("ray: setting up the virtualenv (benches/peers/setup-ray.sh)");
            let out = std::process::Command::new("bash")
                .arg(root.join("setup-ray.sh"))
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| format!("cannot run setup-ray.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!("setup-ray.sh failed ({})", out.status));
            }
            String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string()
        }
    };
    let out_file = std::env::temp_dir().join(format!("skyward-ray-{}.json", std::process::id()));
    eprintln!("ray: running benches/peers/ray_peer.py with {python}");
    let mut command = std::process::Command::new(&python);
    command.arg(root.join("ray_peer.py")).arg("--out").arg(&out_file).arg("--reps").arg(reps.to_string());
    if quick {
        command.arg("--quick");
    }
    let status = command.status().map_err(|e| format!("cannot run {python}: {e}"))?;
    if !status.success() {
        return Err(format!("ray_peer.py failed ({status})"));
    }
    let text = std::fs::read_to_string(&out_file).map_err(|e| format!("no Ray output: {e}"))?;
    let _ = std::fs::remove_file(&out_file);
    serde_json::from_str(&text).map_err(|e| format!("malformed Ray output: {e}"))
}

/// How a metric compares: which way is better, and the issue's targets.
struct MetricSpec {
    scenario: &'static str,
    metric: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    /// Absolute target on the median (`<=` when lower is better, `>=` otherwise).
    target: Option<f64>,
    /// Target on the ratio to Ray (how many times better).
    ratio_target: Option<f64>,
    /// Ray's metric the ratio compares with, where it is not `metric` (Ray measures one client).
    peer_metric: Option<&'static str>,
}

impl MetricSpec {
    /// A row without targets (an A/B figure beside the one the targets apply to).
    const fn untargeted(
        scenario: &'static str,
        metric: &'static str,
        title: &'static str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> Self {
        MetricSpec { scenario, metric, title, unit, higher_is_better, target: None, ratio_target: None, peer_metric: None }
    }

    /// Compare with Ray's `peer_metric` instead of the metric of the same name.
    const fn compared_with(self, peer_metric: &'static str) -> Self {
        MetricSpec { peer_metric: Some(peer_metric), ..self }
    }
}

const METRICS: &[MetricSpec] = &[
    MetricSpec {
        scenario: "sync_task_roundtrip",
        metric: "p50_us",
        title: "sync no-op task round trip, p50, multi-thread client",
        unit: "us",
        higher_is_better: false,
        target: Some(60.0),
        ratio_target: Some(15.0),
        peer_metric: None,
    },
    MetricSpec::untargeted("sync_task_roundtrip", "p99_us", "sync no-op task round trip, p99, multi-thread client", "us", false),
    MetricSpec {
        scenario: "sync_task_roundtrip",
        metric: "p50_us_current_thread",
        title: "sync no-op task round trip, p50, current-thread client",
        unit: "us",
        higher_is_better: false,
        target: Some(60.0),
        ratio_target: Some(15.0),
        peer_metric: Some("p50_us"),
    },
    MetricSpec::untargeted(
        "sync_task_roundtrip",
        "p99_us_current_thread",
        "sync no-op task round trip, p99, current-thread client",
        "us",
        false,
    )
    .compared_with("p99_us"),
    MetricSpec {
        scenario: "async_task_throughput",
        metric: "tasks_per_s",
        title: "async no-op tasks, 1 client -> 2 workers",
        unit: "tasks/s",
        higher_is_better: true,
        target: Some(200_000.0),
        ratio_target: Some(20.0),
        peer_metric: None,
    },
    MetricSpec::untargeted(
        "async_task_throughput",
        "tasks_per_s_spawned",
        "async no-op tasks, gathered in a spawned task",
        "tasks/s",
        true,
    )
    .compared_with("tasks_per_s"),
    MetricSpec::untargeted("sync_actor_call", "p50_us", "sync actor call, p50, multi-thread client", "us", false),
    MetricSpec::untargeted("sync_actor_call", "p99_us", "sync actor call, p99, multi-thread client", "us", false),
    MetricSpec::untargeted("sync_actor_call", "p50_us_current_thread", "sync actor call, p50, current-thread client", "us", false)
        .compared_with("p50_us"),
    MetricSpec::untargeted("sync_actor_call", "p99_us_current_thread", "sync actor call, p99, current-thread client", "us", false)
        .compared_with("p99_us"),
    MetricSpec::untargeted("async_actor_calls", "calls_per_s", "async actor calls, 1 actor", "calls/s", true),
    MetricSpec::untargeted("sync_task_roundtrip", "p50_us_no_busy_poll", "sync no-op task round trip, p50, busy polling off", "us", false),
    MetricSpec::untargeted("sync_task_roundtrip", "p99_us_no_busy_poll", "sync no-op task round trip, p99, busy polling off", "us", false),
    MetricSpec::untargeted("async_task_throughput", "tasks_per_s_no_busy_poll", "async no-op tasks, busy polling off", "tasks/s", true),
    MetricSpec::untargeted("sync_actor_call", "p50_us_no_busy_poll", "sync actor call, p50, busy polling off", "us", false),
    MetricSpec::untargeted("async_actor_calls", "calls_per_s_no_busy_poll", "async actor calls, busy polling off", "calls/s", true),
    MetricSpec {
        scenario: "broadcast_256mib_4_workers",
        metric: "gb_per_s",
        title: "broadcast 256 MiB to 4 workers, aggregate",
        unit: "GB/s",
        higher_is_better: true,
        target: Some(1.0),
        ratio_target: None,
        peer_metric: None,
    },
    MetricSpec::untargeted(
        "broadcast_256mib_4_workers",
        "gb_per_s_owned",
        "broadcast 256 MiB to 4 workers, owned buffer (copied)",
        "GB/s",
        true,
    ),
    MetricSpec::untargeted(
        "broadcast_256mib_4_workers",
        "gb_per_s_over_quic",
        "broadcast 256 MiB to 4 workers, shared memory off (QUIC)",
        "GB/s",
        true,
    ),
    MetricSpec {
        scenario: "pool_start_4_workers",
        metric: "ready_ms",
        title: "pool start, 4 Local workers ready",
        unit: "ms",
        higher_is_better: false,
        target: Some(300.0),
        ratio_target: None,
        peer_metric: None,
    },
    MetricSpec {
        scenario: "scale_1000_sim_nodes",
        metric: "ready_s",
        title: "1,000 sim nodes: all ready",
        unit: "s",
        higher_is_better: false,
        target: Some(10.0),
        ratio_target: None,
        peer_metric: None,
    },
    MetricSpec {
        scenario: "scale_1000_sim_nodes",
        metric: "coordinator_rss_mb",
        title: "1,000 sim nodes: coordinator RSS when ready",
        unit: "MB",
        higher_is_better: false,
        target: Some(200.0),
        ratio_target: None,
        peer_metric: None,
    },
    MetricSpec {
        scenario: "scale_1000_sim_nodes",
        metric: "coordinator_peak_rss_mb",
        title: "1,000 sim nodes: coordinator peak RSS",
        unit: "MB",
        higher_is_better: false,
        target: Some(200.0),
        ratio_target: None,
        peer_metric: None,
    },
    MetricSpec::untargeted("scale_1000_sim_nodes", "tasks_per_s", "1,000 sim nodes: 100k tasks dispatched", "tasks/s", true),
];

/// Median, min and max of a metric's repetitions.
fn summary(scenarios: &[Value], scenario: &str, metric: &str) -> Option<(f64, f64, f64, usize)> {
    let s = scenarios.iter().find(|s| s["name"] == scenario)?;
    let mut values: Vec<f64> = s["metrics"][metric].as_array()?.iter().filter_map(Value::as_f64).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some((values[values.len() / 2], values[0], values[values.len() - 1], values.len()))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": (proc_kib("/proc/meminfo", "MemTotal:") / 1048576.0).round(),
        "loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn report(ours: &[Value], ray: &Result<Value, String>, quick: bool) -> Value {
    let empty = Vec::new();
    let theirs = ray.as_ref().ok().and_then(|r| r["scenarios"].as_array()).unwrap_or(&empty);
    let rows: Vec<Value> = METRICS
        .iter()
        .map(|m| {
            let sky = summary(ours, m.scenario, m.metric);
            let peer = summary(theirs, m.scenario, m.peer_metric.unwrap_or(m.metric));
            let ratio = match (sky, peer) {
                (Some((s, ..)), Some((r, ..))) if s > 0.0 && r > 0.0 => Some(if m.higher_is_better { s / r } else { r / s }),
                _ => None,
            };
            let met = |value: f64, bound: f64| if m.higher_is_better { value >= bound } else { value <= bound };
            let ray_note = match ray {
                Err(why) => why.clone(),
                Ok(_) if peer.is_none() => "not measured on Ray".to_string(),
                Ok(_) => String::new(),
            };
            json!({
                "scenario": m.scenario,
                "metric": m.metric,
                "title": m.title,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "skyward": sky.map(|(med, min, max, n)| json!({"median": med, "min": min, "max": max, "reps": n})),
                "ray": peer.map(|(med, min, max, n)| json!({"median": med, "min": min, "max": max, "reps": n})),
                "ray_note": ray_note,
                "times_better": ratio,
                "target": m.target,
                "target_met": sky.zip(m.target).map(|((v, ..), t)| met(v, t)),
                "ratio_target": m.ratio_target,
                "ratio_target_met": ratio.zip(m.ratio_target).map(|(r, t)| r >= t),
            })
        })
        .collect();
    json!({
        "quick": quick,
        "machine": machine(),
        "ray_version": ray.as_ref().ok().and_then(|r| r["version"].as_str()),
        "rows": rows,
        "skyward": ours,
        "ray": ray.as_ref().ok(),
        "notes": ours.iter().chain(theirs.iter()).filter_map(|s| Some(format!("{}: {}", s["name"].as_str()?, s["note"].as_str()?))).collect::<Vec<_>>(),
    })
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_cell(cell: &Value) -> String {
    match (cell["median"].as_f64(), cell["min"].as_f64(), cell["max"].as_f64()) {
        (Some(med), Some(min), Some(max)) if cell["reps"].as_u64() > Some(1) => {
            format!("{} ({}-{})", fmt_num(med), fmt_num(min), fmt_num(max))
        }
        (Some(med), ..) => fmt_num(med),
        _ => "-".into(),
    }
}

fn print_table(report: &Value) {
    println!();
    println!("| scenario | unit | Skyward median (min-max) | Ray median (min-max) | Skyward vs Ray | target |");
    println!("|---|---|---|---|---|---|");
    for row in report["rows"].as_array().into_iter().flatten() {
        let ray = if row["ray"].is_null() { row["ray_note"].as_str().unwrap_or("-").to_string() } else { fmt_cell(&row["ray"]) };
        let ratio = row["times_better"]
            .as_f64()
            .map_or("-".into(), |r| if r >= 1.0 { format!("{r:.1}x better") } else { format!("{:.1}x worse", 1.0 / r) });
        let higher = row["higher_is_better"].as_bool().unwrap_or(false);
        let mut target = Vec::new();
        if let Some(t) = row["target"].as_f64() {
            let met = match row["target_met"].as_bool() {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not run",
            };
            target.push(format!("{} {} ({met})", if higher { ">=" } else { "<=" }, fmt_num(t)));
        }
        if let Some(t) = row["ratio_target"].as_f64() {
            let met = match row["ratio_target_met"].as_bool() {
                Some(true) => "met",
                Some(false) => "missed",
                None => "no peer figure",
            };
            target.push(format!(">= {t:.0}x Ray ({met})"));
        }
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row["title"].as_str().unwrap_or_default(),
            row["unit"].as_str().unwrap_or_default(),
            fmt_cell(&row["skyward"]),
            ray,
            ratio,
            target.join(", ")
        );
    }
    println!("\nmachine: {}", report["machine"]);
    if let Some(v) = report["ray_version"].as_str() {
        println!("ray {v}");
    }
    for note in report["notes"].as_array().into_iter().flatten() {
        println!("note: {}", note.as_str().unwrap_or_default());
    }
}
