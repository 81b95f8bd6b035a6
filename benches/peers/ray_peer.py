#!/usr/bin/env python3
"""Ray side of the peer benchmark (benches/peers): the Skyward scenarios on a local Ray.

    python=$(benches/peers/setup-ray.sh | tail -1)
    "$python" benches/peers/ray_peer.py --out ray.json [--quick] [--reps N]

Writes one JSON object:

    {"peer": "ray", "version": ..., "python": ..., "quick": bool,
     "scenarios": [{"name": ..., "metrics": {metric: [one float per rep]}, "note": ...}]}

Values are per repetition, not aggregated: the Rust side takes medians, min and max.

Sessions and counts (full run / --quick):

  Ray with num_cpus=2 (2 worker processes), 512 MiB object store:
    sync_task_roundtrip         p50_us, p99_us   2,000 / 50 sequential ray.get(noop.remote())
    async_task_throughput       tasks_per_s      20,000 / 1,000 no-op tasks submitted, then ray.get
                                                 (not 100,000 as on the Skyward side: Ray runs ~2,000
                                                 no-op tasks/s on 2 vCPUs, so 100,000 would take ~1 min
                                                 per repetition; a rate does not need them)
    sync_actor_call             p50_us, p99_us   2,000 / 50 sequential calls to one actor
    async_actor_calls           calls_per_s      10,000 / 200 calls to one actor, then ray.get
  Ray with num_cpus=4, 2 GiB object store:
    broadcast_256mib_4_workers  gb_per_s, seconds  256 MiB / 16 MiB array, ray.put + 4 tasks
                                                 after 8 / 2 untimed warm-up broadcasts
  A fresh Ray per repetition (num_cpus=4):
    pool_start_4_workers        ready_ms         3 / 1 repetitions, whatever --reps says

--reps (default 5) applies to every scenario but pool start; --quick means 1 repetition.
On 2 vCPUs shared with a cargo build: --reps 3 took ~95 s, the default --reps 5 ~135 s (40% of
it async_task_throughput); each ray.init takes ~4 s; --quick takes ~20 s.
"""

import argparse
import json
import logging
import os
import platform
import sys
import time

# Before Ray is imported: no usage-stats prompt or upload, no accelerator-env FutureWarning,
# and no stdout warning when async_actor_calls queues more than 5,000 calls on one actor.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_actor_excess_queueing_warn_threshold", "1000000")

import numpy as np  # noqa: E402
import ray  # noqa: E402

MIB = 1 << 20
SMALL_STORE = 512 * MIB
BROADCAST_STORE = 2048 * MIB
POOL_TIMEOUT_S = 60  # bound on waiting for 4 distinct workers


def log(msg):
    print(f"ray: {msg}", file=sys.stderr, flush=True)


def start(num_cpus, store_bytes):
    """A fresh local Ray with exactly `num_cpus` CPU slots."""
    ray.init(
        num_cpus=num_cpus,
        num_gpus=0,
        object_store_memory=store_bytes,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )


def percentile_us(samples_ns, p):
    """Same rule as the Rust side: the sample at round((n - 1) * p) of the sorted list."""
    s = sorted(samples_ns)
    return s[round((len(s) - 1) * p)] / 1e3


@ray.remote
def noop():
    return None


@ray.remote
class Echo:
    def echo(self, x):
        return x


@ray.remote(num_cpus=1)
def consume(a):
    # One byte per page, so every page of the shared object is mapped and read.
    return int(a[::4096].sum()), os.getpid()


@ray.remote(num_cpus=1)
def worker_pid(*_ignored):
    return os.getpid()


def sequential_latency(call, samples, reps):
    """p50 and p99 (us) of `samples` sequential calls, per repetition."""
    p50, p99 = [], []
    for _ in range(reps):
        times = []
        for i in range(samples):
            t = time.perf_counter_ns()
            call(i)
            times.append(time.perf_counter_ns() - t)
        p50.append(percentile_us(times, 0.5))
        p99.append(percentile_us(times, 0.99))
    return p50, p99


def rate(submit, n, reps):
    """Per repetition: n submissions without waiting, then ray.get of all; items per second."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        refs = [submit(i) for i in range(n)]
        ray.get(refs)
        out.append(n / (time.perf_counter() - t))
        del refs
    return out


def sync_task_roundtrip(sz):
    p50, p99 = sequential_latency(lambda _: ray.get(noop.remote()), sz.sync_samples, sz.reps)
    return scenario("sync_task_roundtrip", {"p50_us": p50, "p99_us": p99},
                    f"{sz.sync_samples} sequential ray.get(noop.remote()) per repetition")


def async_task_throughput(sz):
    rates = rate(lambda _: noop.remote(), sz.async_tasks, sz.reps)
    note = f"{sz.async_tasks} tasks per repetition, 1 driver -> 2 worker processes"
    if not sz.quick:
        note += " (not 100,000 as for Skyward: at Ray's rate here that takes about a minute)"
    return scenario("async_task_throughput", {"tasks_per_s": rates}, note)


def sync_actor_call(sz, actor):
    p50, p99 = sequential_latency(lambda i: ray.get(actor.echo.remote(i)), sz.sync_samples, sz.reps)
    return scenario("sync_actor_call", {"p50_us": p50, "p99_us": p99},
                    f"{sz.sync_samples} sequential ray.get(actor.echo.remote(i)) per repetition")


def async_actor_calls(sz, actor):
    rates = rate(lambda i: actor.echo.remote(i), sz.actor_calls, sz.reps)
    return scenario("async_actor_calls", {"calls_per_s": rates},
                    f"{sz.actor_calls} concurrent calls to one actor per repetition")


def broadcast(sz):
    # A nonzero pattern whose every 4096th byte is 1, so each task's checksum is known.
    pattern = (np.arange(4096) % 255 + 1).astype(np.uint8)
    arr = np.tile(pattern, sz.broadcast_bytes // 4096)
    expected = sz.broadcast_bytes // 4096
    # Warm-up: all 4 workers up, each having deserialized an array (numpy imported).
    until_distinct_pids(4, POOL_TIMEOUT_S, arr[:4096])

    def once():
        """ray.put, then 4 tasks on the ref: (seconds, distinct worker pids)."""
        t = time.perf_counter()
        ref = ray.put(arr)
        results = ray.get([consume.remote(ref) for _ in range(4)])
        dt = time.perf_counter() - t
        assert all(s == expected for s, _ in results), f"bad checksum: {results}"
        return dt, len({pid for _, pid in results})  # ref dropped: freed before the next put

    # Untimed warm-up broadcasts: a fresh store's pages fault in on first use, in the driver
    # and in each worker, and the allocator moves through the store; this many payloads
    # cover the store, so the timed ones measure the steady state.
    cold, _ = once()
    for _ in range(BROADCAST_STORE // sz.broadcast_bytes if not sz.quick else 2):
        once()

    gbps, secs, distinct = [], [], []
    for _ in range(sz.reps):
        dt, pids = once()
        gbps.append(4 * sz.broadcast_bytes / dt / 1e9)
        secs.append(dt)
        distinct.append(pids)
    note = (f"{sz.broadcast_bytes // MIB} MiB; Ray on one machine passes the object through shared "
            "memory (plasma): no network, no copy per worker; steady state after untimed warm-up "
            f"broadcasts (the first, on a fresh store, took {cold:.3f} s)")
    if min(distinct) < 4:
        note += (f"; distinct worker processes per repetition: {distinct} (Ray may reuse a leased "
                 "worker for a second task)")
    return scenario("broadcast_256mib_4_workers", {"gb_per_s": gbps, "seconds": secs}, note)


def until_distinct_pids(n, timeout_s, *args):
    """Batches of n instant tasks (`args` passed to each) until n distinct worker processes
    have answered, or timeout.

    One batch need not reach n workers: the driver reuses a leased worker for the next queued
    task, and on few cores the last workers are still starting, so batches repeat.
    Returns the number of distinct pids seen.
    """
    pids, deadline = set(), time.perf_counter() + timeout_s
    while len(pids) < n and time.perf_counter() < deadline:
        pids.update(ray.get([worker_pid.remote(*args) for _ in range(n)]))
    return len(pids)


def pool_start(sz):
    """Per repetition: ray.init until 4 distinct worker processes have answered."""
    ms, short = [], []
    for _ in range(sz.start_reps):
        if ray.is_initialized():
            ray.shutdown()
        t = time.perf_counter()
        start(4, SMALL_STORE)
        seen = until_distinct_pids(4, POOL_TIMEOUT_S)
        ms.append((time.perf_counter() - t) * 1e3)
        if seen < 4:
            short.append(seen)
        ray.shutdown()
    note = "ray.init (GCS, raylet, 4 worker processes) until 4 distinct worker processes have answered"
    if short:
        note += f"; {len(short)} repetition(s) saw fewer than 4 distinct pids within {POOL_TIMEOUT_S} s: {short}"
    return scenario("pool_start_4_workers", {"ready_ms": ms}, note)


def scenario(name, metrics, note=None):
    summary = ", ".join(f"{k} {' '.join(f'{v:.4g}' for v in vs)}" for k, vs in metrics.items())
    log(f"{name}: {summary}")
    s = {"name": name, "metrics": {k: [float(v) for v in vs] for k, vs in metrics.items()}}
    if note:
        s["note"] = note
    return s


class Sizes:
    def __init__(self, quick, reps):
        self.quick = quick
        self.reps = 1 if quick else reps
        self.sync_samples = 50 if quick else 2_000
        self.async_tasks = 1_000 if quick else 20_000
        self.actor_calls = 200 if quick else 10_000
        self.broadcast_bytes = (16 if quick else 256) * MIB
        self.start_reps = 1 if quick else 3


def timed(label, f, *args):
    t = time.perf_counter()
    result = f(*args)
    log(f"  ({label} took {time.perf_counter() - t:.1f} s)")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where the JSON goes")
    ap.add_argument("--quick", action="store_true", help="tiny counts, 1 repetition (smoke run)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per scenario (default 5)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    sz = Sizes(args.quick, args.reps)

    scenarios = []
    t0 = time.perf_counter()
    try:
        log(f"{ray.__version__}: 2 CPUs (sync/async tasks, actor calls)")
        timed("ray.init", start, 2, SMALL_STORE)
        ray.get([noop.remote() for _ in range(200)])  # warm up: workers started
        scenarios.append(timed("sync tasks", sync_task_roundtrip, sz))
        scenarios.append(timed("async tasks", async_task_throughput, sz))
        actor = Echo.remote()
        ray.get([actor.echo.remote(i) for i in range(200)])  # warm up: actor process up
        scenarios.append(timed("sync actor", sync_actor_call, sz, actor))
        scenarios.append(timed("async actor", async_actor_calls, sz, actor))
        del actor
        ray.shutdown()

        log(f"4 CPUs, {BROADCAST_STORE // MIB} MiB object store (broadcast)")
        timed("ray.init", start, 4, BROADCAST_STORE)
        scenarios.append(timed("broadcast", broadcast, sz))
        ray.shutdown()

        log(f"pool start, {sz.start_reps} fresh Ray instance(s) with 4 CPUs")
        scenarios.append(timed("pool start", pool_start, sz))
    finally:
        ray.shutdown()

    report = {
        "peer": "ray",
        "version": ray.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
        "scenarios": scenarios,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    log(f"done in {time.perf_counter() - t0:.1f} s, wrote {args.out}")


if __name__ == "__main__":
    main()
