//! Dispatch benchmarks on the Local provider with 2 workers: sync no-op round trip (criterion,
//! plus p50/p99 from raw samples) and async throughput of no-op tasks through `gather`.
//!
//! `cargo bench --bench dispatch` for figures; `-- --test` (as `.ci/run` does) for a quick smoke run.
#![allow(clippy::print_stdout)]

use criterion::Criterion;
use skyward::{Compute, Local, Worker};
use std::time::{Duration, Instant};

#[skyward::function]
async fn noop() {}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    skyward::init();
    let quick = std::env::args().any(|a| a == "--test");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let pool =
        rt.block_on(async { Compute::new(Local::default()).nodes(2).worker(Worker { concurrency: 256 }).start().await.expect("pool") });

    // Warm up: the executors start on first use.
    rt.block_on(async { pool.gather((0..1000).map(|_| noop())).await.expect("warm up") });

    let samples = if quick { 200 } else { 20_000 };
    let mut rtts = Vec::with_capacity(samples);
    rt.block_on(async {
        for _ in 0..samples {
            let t = Instant::now();
            pool.run(noop()).await.expect("noop");
            rtts.push(t.elapsed());
        }
    });
    rtts.sort_unstable();
    println!(
        "run_noop_roundtrip: samples={} p50={:?} p99={:?} min={:?}",
        samples,
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        rtts[0]
    );

    let tasks = if quick { 2_000 } else { 100_000 };
    let reps = if quick { 1 } else { 5 };
    let mut rates = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        rt.block_on(async { pool.gather((0..tasks).map(|_| noop())).await.expect("gather") });
        rates.push(tasks as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "gather_noop_throughput: tasks={} reps={} median={:.0}/s min={:.0}/s max={:.0}/s",
        tasks,
        reps,
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );

    let mut criterion = Criterion::default().configure_from_args();
    if quick {
        criterion = criterion.sample_size(10).measurement_time(Duration::from_millis(200)).warm_up_time(Duration::from_millis(50));
    }
    criterion.bench_function("run_noop_roundtrip", |b| b.to_async(&rt).iter(|| async { pool.run(noop()).await.expect("noop") }));
    criterion.final_summary();
    rt.block_on(async { pool.shutdown().await.expect("shutdown") });
}
