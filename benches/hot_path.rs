//! Criterion micro-benchmarks of the dispatch hot path, without I/O: frame encode and decode of a
//! no-op task's `Submit` and `Done`, the function registry lookup the executor does per call, and
//! one protocol step (coordinator `submit` -> worker `handle` / `Start` -> `finish` / `Done` ->
//! coordinator `Completed`, acks included) on the real session state machines.
//!
//! `cargo bench --bench hot_path` for figures; `-- --test` (as `.ci/run` does) for a smoke run.

use criterion::Criterion;
use skyward_proto::codec::{self, DEFAULT_MAX_FRAME, FrameDecoder};
use skyward_proto::message::{BinaryHash, Outcome, TaskId, TaskKind, TaskSpec, ToCoordinator, ToWorker, WorkerFacts};
use skyward_proto::session::{CoordinatorSession, CoordinatorSessionConfig, NodeEvent, WorkerEvent, WorkerSession, WorkerSessionConfig};
use std::hint::black_box;
use std::time::Duration;

#[skyward::function]
async fn noop() {}

const POOL: &str = "sky-bench";

/// A no-op task as the coordinator sends it on a lane of a 2-node pool (membership changes travel
/// with the next task on each lane, not with every task).
fn spec(name: &str) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Function { name: name.into(), binary: BinaryHash([7; 32]), args: bytes::Bytes::new().into(), streaming: false },
        members: None,
        info: None,
        initial_credit: 64,
    }
}

/// A coordinator and a worker session that have completed the handshake.
fn joined_pair() -> (CoordinatorSession, WorkerSession) {
    let config = CoordinatorSessionConfig {
        pool_id: POOL.into(),
        node_id: "node-0".into(),
        rank: 0,
        heartbeat_interval: Duration::from_secs(1),
        lost_after: Duration::from_secs(3),
    };
    let mut coord = CoordinatorSession::new(config, Duration::ZERO);
    let mut worker = WorkerSession::new(
        WorkerSessionConfig {
            pool_id: POOL.into(),
            node_id: "node-0".into(),
            instance_timeout: Duration::from_secs(60),
            cache_entries: 100_000,
            cache_bytes: 512 << 20,
        },
        WorkerFacts { concurrency: 256, ..WorkerFacts::default() },
        Duration::ZERO,
    );
    coord.connection_opened(Duration::ZERO);
    coord.handle(worker.hello(), Duration::ZERO).expect("hello");
    while let Some(m) = coord.poll_transmit() {
        worker.handle(m, Duration::ZERO).expect("welcome");
    }
    while coord.poll_event().is_some() {}
    while worker.poll_event().is_some() {}
    assert!(coord.is_ready());
    (coord, worker)
}

/// One task through both state machines; returns whether it completed.
fn step(coord: &mut CoordinatorSession, worker: &mut WorkerSession, task: TaskId, spec: &TaskSpec) -> bool {
    let submit = coord.submit(task, spec.clone());
    worker.handle(submit, Duration::ZERO).expect("submit");
    while let Some(event) = worker.poll_event() {
        if let WorkerEvent::Start { task, .. } = event {
            worker.finish(task, Outcome::Value(Vec::new()));
        }
    }
    while let Some(m) = worker.poll_transmit() {
        coord.handle(m, Duration::ZERO).expect("done");
    }
    let mut completed = false;
    while let Some(event) = coord.poll_event() {
        completed |= matches!(event, NodeEvent::Completed { .. });
    }
    // Acks go back so the worker's result cache stays small, as on a real connection.
    while let Some(m) = coord.poll_transmit() {
        worker.handle(m, Duration::ZERO).expect("ack");
    }
    completed
}

fn main() {
    skyward::init();
    let quick = std::env::args().any(|a| a == "--test");
    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c.sample_size(10).measurement_time(Duration::from_millis(200)).warm_up_time(Duration::from_millis(50));
    }
    let name = skyward_function::registered_names().into_iter().find(|n| n.ends_with("::noop")).expect("noop is registered");
    let submit = ToWorker::Submit { task: TaskId(42), spec: Box::new(spec(name)) };
    let done = ToCoordinator::Done { task: TaskId(42), outcome: Outcome::Value(Vec::new()) };

    let mut buf = Vec::with_capacity(4096);
    c.bench_function("frame_encode_submit", |b| {
        b.iter(|| {
            buf.clear();
            codec::encode_frame(black_box(&submit), &mut buf).expect("encode");
        })
    });
    let submit_frame = codec::frame(&submit).expect("frame");
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    c.bench_function("frame_decode_submit", |b| {
        b.iter(|| {
            decoder.push(black_box(&submit_frame));
            decoder.next::<ToWorker>("ToWorker").expect("decode").expect("a frame")
        })
    });
    let done_frame = codec::frame(&done).expect("frame");
    c.bench_function("frame_encode_decode_done", |b| {
        b.iter(|| {
            buf.clear();
            codec::encode_frame(black_box(&done), &mut buf).expect("encode");
            decoder.push(&done_frame);
            decoder.next::<ToCoordinator>("ToCoordinator").expect("decode").expect("a frame")
        })
    });
    c.bench_function("registry_lookup", |b| b.iter(|| skyward_function::lookup(black_box(name)).expect("found")));

    let (mut coord, mut worker) = joined_pair();
    let task_spec = spec(name);
    let mut next = 0u64;
    c.bench_function("protocol_step_noop_task", |b| {
        b.iter(|| {
            next += 1;
            assert!(step(&mut coord, &mut worker, TaskId(next), &task_spec));
        })
    });
    c.final_summary();
}
