//! Worker-cluster benchmarks on the Local provider with 3 workers, and Redis in the same run.
//!
//! Dict get/insert round trips per second from one client (the coordinator, and one task) and
//! from every node at once, counter increments per second from every node, sync actor call p50
//! (coordinator -> actor, task -> actor on another node); then `redis-benchmark` single-client
//! GET/SET against a `redis-server` this benchmark starts on loopback.
//!
//! `cargo bench --bench cluster` for figures; `-- --test` (as `.ci/run` does) for a smoke run.
#![allow(clippy::print_stdout)]

use skyward::{Compute, Local, Worker};
use std::time::{Duration, Instant};

/// An actor that answers at once.
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

/// `n` sequential dict operations from inside a task; returns operations per second.
#[skyward::function]
async fn dict_loop(n: u64, insert: bool) -> anyhow::Result<f64> {
    let dict = skyward::dict::<u64, u64>("bench");
    let started = Instant::now();
    for i in 0..n {
        let key = i % 1000;
        if insert {
            dict.insert(&key, &i).await?;
        } else {
            dict.get(&key).await?;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// `loops` concurrent loops of `each` increments.
#[skyward::function]
async fn increments(loops: u32, each: u32) -> anyhow::Result<()> {
    let counter = skyward::counter("bench-hits");
    let all = (0..loops).map(|_| {
        let counter = counter.clone();
        async move {
            for _ in 0..each {
                counter.increment().await?;
            }
            Ok::<(), skyward::ClusterError>(())
        }
    });
    futures::future::try_join_all(all).await?;
    Ok(())
}

/// `n` sync calls to `echo` from inside a task; returns the sorted latencies in microseconds.
#[skyward::function]
async fn actor_calls(echo: skyward::ActorRef<Echo>, n: u64) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        echo.call(&i).await?;
        out.push(t.elapsed().as_micros() as u64);
    }
    out.sort_unstable();
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    min: f64,
    max: f64,
}

fn row(name: &'static str, unit: &'static str, samples: Vec<f64>) -> Row {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(0.0, f64::max);
    Row { name, value: median(samples), unit, min, max }
}

/// Start `redis-server` on a free loopback port and run `redis-benchmark` single-client GET/SET.
/// `None` (with the reason printed) when Redis is not installed.
fn redis(requests: u64, reps: usize) -> Option<(Vec<f64>, Vec<f64>)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let server = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes"])
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            println!("redis: not run ({e}); hint: apt-get install redis-server");
            return None;
        }
    };
    // Wait (bounded) until it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            println!("redis: server did not listen within 10 s");
            let _ = server.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut gets, mut sets) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let out = std::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "1", "-n", &requests.to_string(), "-t", "set,get", "--csv"])
            .output();
        let Ok(out) = out else { break };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
            if let (Some(test), Some(rps)) = (fields.first(), fields.get(1).and_then(|r| r.parse::<f64>().ok())) {
                match *test {
                    "GET" => gets.push(rps),
                    "SET" => sets.push(rps),
                    _ => {}
                }
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    (!gets.is_empty() && !sets.is_empty()).then_some((gets, sets))
}

fn main() {
    skyward::init();
    let quick = std::env::args().any(|a| a == "--test");
    let (n, reps) = if quick { (300u64, 1usize) } else { (20_000, 5) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let pool =
        rt.block_on(async { Compute::new(Local::default()).nodes(3).worker(Worker { concurrency: 16 }).start().await.expect("pool") });
    let mut rows = Vec::new();
    rt.block_on(async {
        let dict = pool.dict::<u64, u64>("bench");
        for k in 0..1000u64 {
            dict.insert(&k, &k).await.expect("fill");
        }
        // Executors start on first use.
        pool.broadcast(dict_loop(10, false)).await.expect("warm up");

        // One client: the coordinator.
        let (mut gets, mut inserts, mut lat) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            for i in 0..n {
                let s = Instant::now();
                dict.get(&(i % 1000)).await.expect("get");
                lat.push(s.elapsed());
            }
            gets.push(n as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for i in 0..n {
                dict.insert(&(i % 1000), &i).await.expect("insert");
            }
            inserts.push(n as f64 / t.elapsed().as_secs_f64());
        }
        lat.sort_unstable();
        rows.push(row("dict get, 1 client (coordinator)", "ops/s", gets));
        rows.push(row("dict insert, 1 client (coordinator)", "ops/s", inserts));
        rows.push(row("dict get p50 (coordinator)", "us", vec![p(&lat, 0.5).as_secs_f64() * 1e6]));

        // One client: a task on rank 0.
        let (mut gets, mut inserts) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            gets.push(pool.run_on(0, dict_loop(n, false)).await.expect("task gets"));
            inserts.push(pool.run_on(0, dict_loop(n, true)).await.expect("task inserts"));
        }
        rows.push(row("dict get, 1 client (task)", "ops/s", gets));
        rows.push(row("dict insert, 1 client (task)", "ops/s", inserts));

        // Every node at once, one sequential client each.
        let (mut gets, mut inserts) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            pool.broadcast(dict_loop(n, false)).await.expect("all gets");
            gets.push(3.0 * n as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            pool.broadcast(dict_loop(n, true)).await.expect("all inserts");
            inserts.push(3.0 * n as f64 / t.elapsed().as_secs_f64());
        }
        rows.push(row("dict get, 3 nodes x 1 client", "ops/s", gets));
        rows.push(row("dict insert, 3 nodes x 1 client", "ops/s", inserts));

        // Counter increments from every node, 8 concurrent loops each.
        let each = (n / 8).max(1) as u32;
        let mut rates = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            pool.broadcast(increments(8, each)).await.expect("increments");
            rates.push(3.0 * 8.0 * f64::from(each) / t.elapsed().as_secs_f64());
        }
        rows.push(row("counter increments, 3 nodes x 8 loops", "ops/s", rates));

        // Actor calls.
        let echo = pool.spawn_actor_on::<Echo>(1, &()).await.expect("spawn");
        let mut coord = Vec::new();
        let mut from_task = Vec::new();
        for _ in 0..reps {
            let mut lat = Vec::with_capacity(n as usize);
            for i in 0..n {
                let s = Instant::now();
                echo.call(&i).await.expect("call");
                lat.push(s.elapsed());
            }
            lat.sort_unstable();
            coord.push(p(&lat, 0.5).as_secs_f64() * 1e6);
            let task_lat = pool.run_on(0, actor_calls(echo.clone(), n)).await.expect("task calls");
            from_task.push(task_lat[task_lat.len() / 2] as f64);
        }
        rows.push(row("actor call p50 (coordinator -> rank 1)", "us", coord));
        rows.push(row("actor call p50 (task on rank 0 -> rank 1)", "us", from_task));
    });
    rt.block_on(async { pool.shutdown().await.expect("shutdown") });

    let redis = redis(if quick { 1000 } else { 100_000 }, reps);
    if let Some((gets, sets)) = &redis {
        rows.push(row("redis GET, 1 client (redis-benchmark -c 1)", "ops/s", gets.clone()));
        rows.push(row("redis SET, 1 client (redis-benchmark -c 1)", "ops/s", sets.clone()));
    }
    println!("{:<46} {:>12} {:>6} {:>12} {:>12}", "scenario", "median", "unit", "min", "max");
    for r in &rows {
        println!("{:<46} {:>12.1} {:>6} {:>12.1} {:>12.1}", r.name, r.value, r.unit, r.min, r.max);
    }
    let find = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.value);
    if let (Some(get), Some(insert), Some(rget), Some(rset)) = (
        find("dict get, 1 client (coordinator)"),
        find("dict insert, 1 client (coordinator)"),
        find("redis GET, 1 client (redis-benchmark -c 1)"),
        find("redis SET, 1 client (redis-benchmark -c 1)"),
    ) {
        println!("ratio dict get / redis GET = {:.2}; dict insert / redis SET = {:.2} (target >= 0.5)", get / rget, insert / rset);
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(r#"{{"scenario":"{}","median":{:.1},"unit":"{}","min":{:.1},"max":{:.1}}}"#, r.name, r.value, r.unit, r.min, r.max)
        })
        .collect();
    println!("json: [{}]", json.join(","));
}
