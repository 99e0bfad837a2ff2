"""Dispatch overhead through Kafka: request produced -> Assignment in the worker's hands.

A ``LocalStack`` (dispatcher with the ``goodserve`` policy and its risk monitor, one
``WorkerService`` per simulated instance, real-time ``SimulatedEngine``s with a small
``time_scale``) runs against a real broker. A ``GoodServeClient`` produces requests at a
fixed rate; for each one the bench notes ``perf_counter()`` just before the client's
produce call, and the worker's ``on_assignment`` hook notes when the worker's consumer
handed the Assignment over. The difference is the dispatch overhead: the client's
produce (linger, ack not awaited by the clock), the broker, the dispatcher's poll, decision
and produce of the Assignment and its Decision record, the broker again, and the worker's
poll.

The load generator's client lingers ``client_linger_ms`` (2 ms) so that requests sent
within it share a produce request, as a batch pipeline at this rate would (an agent's
client sends at once: ``--client-linger-ms 0``); the wait counts in the measured time.
The simulated workers of the bench's worker process share one producer
(``shared_worker_producer``) and one consumer of their topics (``shared_worker_consumer``,
a ``NodeConsumer``), as one worker process on a multi-GPU node would.

``processes=True`` (the command's default) runs as deployed: the dispatcher
(``goodserve dispatcher``) and the workers (this module's ``worker`` entry point) are
processes of their own, the client sends from this one, and both ends stamp ``time.time()``
(one host clock). ``processes=False`` runs everything in one event loop (``LocalStack``), so
the numbers include the workers' and the client's load on that loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.errors import ConfigError
from goodserve.schemas import AgentRequest, Assignment
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.stack import LocalStack

GPUS = ["H100", "A100", "L40S", "A40", "V100", "H200"]
TASKS = ["chat", "code", "math", "sql", "tool", "agent"]


def bench_fleet(instances: int) -> Fleet:
    return Fleet(
        instances=[
            FleetInstance(id=f"sim-{i}", gpu=GPUS[i % len(GPUS)], max_batch=1024)
            for i in range(instances)
        ]
    )


def _request(prefix: str, k: int, output_tokens: int) -> AgentRequest:
    return AgentRequest(
        request_id=f"{prefix}-{k}",
        task=TASKS[k % len(TASKS)],
        input_tokens=64 + (k * 37) % 512,
        max_tokens=256,
        slo_s=60.0,
        output_tokens_hint=output_tokens,
        metadata={"sim_output_tokens": str(output_tokens)},
    )


def _pct(a: np.ndarray, q: float) -> float:
    return round(float(np.percentile(a, q)), 3) if a.size else float("nan")


async def run_dispatch_bench(
    *,
    settings: Settings,
    rps: float = 1000.0,
    duration_s: float = 10.0,
    instances: int = 4,
    time_scale: float = 0.01,
    output_tokens: int = 8,
    warmup: int = 200,
    policy: str = "goodserve",
    monitor: bool = True,
    predictor: Any = None,
    drain_timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = None,
    client_linger_ms: int = 2,
    shared_worker_producer: bool = True,
    shared_worker_consumer: bool = True,
    decision_views_every: int = 1,
) -> dict[str, Any]:
    """Run the bench on ``settings``' broker (topics under a fresh prefix); a JSON-able dict.

    Keys: ``requests`` (sent), ``measured`` (Assignments seen by a worker), ``missing``,
    ``rate_target``, ``rate_achieved`` (requests / send window), ``p50_ms``, ``p90_ms``,
    ``p99_ms``, ``max_ms``, ``mean_ms``, ``backlog_max`` and ``backlog_at_end`` (requests
    produced whose Assignment no worker had yet, peak over the run and when sending ended),
    ``send_lag_max_ms`` (how late the sender ran against its schedule), the set-up and the
    load average before and after.
    """
    if rps <= 0 or duration_s <= 0 or instances < 1 or time_scale <= 0 or output_tokens < 1:
        raise ConfigError("rps, duration_s, instances, time_scale, output_tokens must be > 0")
    say = progress or (lambda _t: None)
    n = max(1, round(rps * duration_s))
    prefix = f"bench-dispatch-{uuid.uuid4().hex[:8]}"
    s = settings.replace(topic_prefix=prefix)
    fleet = bench_fleet(instances)
    load_before = os.getloadavg()

    sent_at: dict[str, float] = {}
    recv_at: dict[str, float] = {}
    backlog_max = 0
    received = 0  # measured requests whose Assignment a worker has
    split: dict[str, tuple[float, float]] = {}  # (produce -> routed, routed -> worker), wall

    def on_assignment(a: Assignment) -> None:
        nonlocal received
        rid = a.request.request_id
        if rid not in recv_at:  # first delivery only (a migration re-assigns)
            recv_at[rid] = time.perf_counter()
            if rid in sent_at:
                received += 1
                now = time.time()
                split[rid] = (a.dispatched_at - (a.request.arrival or a.dispatched_at),
                              now - a.dispatched_at)

    stack = LocalStack(settings=s, fleet=fleet, policy=policy, predictor=predictor,
                       decision_views_every=decision_views_every,
                       monitor=monitor, time_scale=time_scale, heartbeat_period_s=0.25,
                       default_slo_s=60.0, shared_worker_producer=shared_worker_producer,
                       shared_worker_consumer=shared_worker_consumer)
    for w in stack.workers:
        w.on_assignment = on_assignment
    async with stack, GoodServeClient(settings=s, linger_ms=client_linger_ms) as client:
        # all instances alive (first heartbeats), then a warm-up whose Assignments arrive
        d = stack.dispatchers[0]
        await _until(lambda: bool(d.est.usable(time.time()).all()), 60.0)
        say(f"{instances} simulated instances up; warming up with {warmup} requests")
        warm = [_request(f"{prefix}-w", k, output_tokens) for k in range(warmup)]
        await asyncio.gather(*(client.submit(r) for r in warm))
        await _until(lambda: all(r.request_id in recv_at for r in warm), 30.0)
        await asyncio.sleep(0.5)

        say(f"sending {n} requests at {rps:g}/s")
        reqs = [_request(prefix, k, output_tokens) for k in range(n)]
        tasks: list[asyncio.Task[AgentRequest]] = []
        lag_max = 0.0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for k, r in enumerate(reqs):
            due = t0 + k / rps
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.perf_counter()
            lag_max = max(lag_max, now - due)
            sent_at[r.request_id] = now
            tasks.append(asyncio.create_task(client.submit(r)))
            backlog_max = max(backlog_max, len(sent_at) - received)
        t_last = time.perf_counter()
        backlog_end = len(sent_at) - received
        backlog_max = max(backlog_max, backlog_end)
        await asyncio.gather(*tasks)
        say(f"sent in {t_last - t0:.2f}s; waiting for the last Assignments")
        await _until(lambda: received >= n, drain_timeout_s)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        assigned = sum(x.stats.assigned for x in stack.dispatchers)
        migrations = sum(x.stats.migrations for x in stack.dispatchers)
        rejected = sum(x.stats.rejected for x in stack.dispatchers)
        decision_us = np.array(list(stack.dispatchers[0].stats.decision_us), dtype=float)

    lat = np.array([(recv_at[r] - sent_at[r]) * 1e3 for r in sent_at if r in recv_at])
    window = t_last - t0
    to_disp = np.array([v[0] * 1e3 for v in split.values()])
    to_worker = np.array([v[1] * 1e3 for v in split.values()])
    return {
        "mode": "in-process",
        "broker": s.bootstrap_servers,
        "policy": policy,
        "monitor": monitor,
        "decision_views_every": decision_views_every,
        "instances": instances,
        "time_scale": time_scale,
        "client_linger_ms": client_linger_ms,
        "worker_producer": "shared" if shared_worker_producer else "own",
        "worker_consumer": "node" if shared_worker_consumer else "own",
        "rate_target": rps,
        "duration_s": duration_s,
        "requests": n,
        "measured": int(lat.size),
        "missing": n - int(lat.size),
        "rate_achieved": round(n / window, 1) if window > 0 else float("inf"),
        "send_lag_max_ms": round(lag_max * 1e3, 3),
        "p50_ms": _pct(lat, 50),
        "p90_ms": _pct(lat, 90),
        "p99_ms": _pct(lat, 99),
        "max_ms": round(float(lat.max()), 3) if lat.size else float("nan"),
        "mean_ms": round(float(lat.mean()), 3) if lat.size else float("nan"),
        "produce_to_routed_p50_ms": _pct(to_disp, 50),
        "produce_to_routed_p99_ms": _pct(to_disp, 99),
        "routed_to_worker_p50_ms": _pct(to_worker, 50),
        "routed_to_worker_p99_ms": _pct(to_worker, 99),
        "backlog_max": backlog_max,
        "backlog_at_end": backlog_end,
        "dispatcher_assigned": assigned,
        "dispatcher_rejected": rejected,
        "migrations": migrations,
        "decision_p50_us": _pct(decision_us, 50),
        "decision_p99_us": _pct(decision_us, 99),
        "process_cpu_per_request_ms": round(cpu / n * 1e3, 3),
        "process_cpu_share": round(cpu / wall, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


async def _until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``cond`` every ``step_s`` until true or ``timeout_s`` passed; its last value."""
    for _ in range(max(1, int(timeout_s / step_s))):
        if cond():
            return True
        await asyncio.sleep(step_s)
    return cond()


# --- processes: the dispatcher and the workers as processes of their own ------------------
def _settings_args(s: Settings) -> list[str]:
    args = ["--bootstrap-servers", s.bootstrap_servers, "--topic-prefix", s.topic_prefix,
            "--partitions", str(s.partitions)]
    return args if s.idempotent_producer else [*args, "--no-idempotence"]


def _child_env() -> dict[str, str]:
    return {**os.environ, "GOODSERVE_LOG_LEVEL": os.environ.get("GOODSERVE_LOG_LEVEL",
                                                                  "WARNING")}


async def _read_counts(proc: asyncio.subprocess.Process, counts: dict[str, int]) -> None:
    """The worker process prints ``recv <warm-up> <measured>`` lines; keep the latest."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        parts = line.decode().split()
        if len(parts) == 3 and parts[0] == "recv":
            counts["warm"], counts["measured"] = int(parts[1]), int(parts[2])
        elif parts[:1] == ["ready"]:
            counts["ready"] = 1


async def run_dispatch_bench_processes(
    *,
    settings: Settings,
    rps: float = 1000.0,
    duration_s: float = 10.0,
    instances: int = 4,
    time_scale: float = 0.01,
    output_tokens: int = 8,
    warmup: int = 200,
    warmup_s: float = 3.0,
    policy: str = "goodserve",
    monitor: bool = True,
    drain_timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = None,
    broker_pid: int | None = None,
    client_linger_ms: int = 2,
    shared_worker_producer: bool = True,
    shared_worker_consumer: bool = True,
    decision_views_every: int = 1,
) -> dict[str, Any]:
    """As ``run_dispatch_bench`` with the dispatcher and the workers as separate processes.

    ``broker_pid``: the broker's process when it runs on this host; its CPU over the
    measured window is reported too (``broker_cpu_share``), so that ``total_cpu_share``
    (broker, dispatcher, workers and this process: everything the bench runs) says how
    busy the host's cores were, a figure that varies much less from run to run than the
    latencies do.

    ``warmup_s``: after the ``warmup`` requests, this many seconds of requests at ``rps``
    run unmeasured right before the measured ones (same schedule, no pause): the JIT of a
    broker the bench just started, the clients' batching and the dispatcher reach the
    steady state the measured window reports.
    """
    if rps <= 0 or duration_s <= 0 or instances < 1 or time_scale <= 0 or output_tokens < 1:
        raise ConfigError("rps, duration_s, instances, time_scale, output_tokens must be > 0")
    say = progress or (lambda _t: None)
    n = max(1, round(rps * duration_s))
    prefix = f"bench-dispatch-{uuid.uuid4().hex[:8]}"
    s = settings.replace(topic_prefix=prefix)
    load_before = os.getloadavg()
    out_file = tempfile.NamedTemporaryFile(prefix="bench-dispatch-", suffix=".json",
                                           delete=False)
    out_file.close()
    counts = {"warm": 0, "measured": 0, "ready": 0}
    workers = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "goodserve.bench.dispatch", "worker", *_settings_args(s),
        "--instances", str(instances), "--time-scale", str(time_scale),
        "--out", out_file.name, "--measured-prefix", f"{prefix}-m-",
        *(["--shared-producer"] if shared_worker_producer else []),
        *(["--node-consumer"] if shared_worker_consumer else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env())
    reader = asyncio.create_task(_read_counts(workers, counts))
    disp_cmd = [sys.executable, "-m", "goodserve.cli", "dispatcher", *_settings_args(s),
                "--policy", policy, "--default-slo-s", "60",
                "--decision-views-every", str(decision_views_every)]
    dispatcher: asyncio.subprocess.Process | None = None
    sent_at: dict[str, float] = {}
    try:
        await _until(lambda: bool(counts["ready"]) or reader.done(), 120.0)
        if not counts["ready"]:
            raise ConfigError("the bench's worker process did not start")
        dispatcher = await asyncio.create_subprocess_exec(
            *disp_cmd, *([] if monitor else ["--no-monitor"]), env=_child_env())
        async with GoodServeClient(settings=s, linger_ms=client_linger_ms) as client:
            say(f"dispatcher and {instances} simulated workers started as processes; "
                f"warming up with {warmup} requests")
            warm = [_request(f"{prefix}-w", k, output_tokens) for k in range(warmup)]
            await asyncio.gather(*(client.submit(r) for r in warm))
            if not await _until(lambda: counts["warm"] >= warmup, 120.0):
                raise ConfigError(f"warm-up: {counts['warm']}/{warmup} assignments arrived")
            await asyncio.sleep(0.5)
            n_w = max(0, round(rps * warmup_s))
            say(f"sending {n_w} unmeasured then {n} measured requests at {rps:g}/s")
            reqs = [_request(f"{prefix}-r", k, output_tokens) for k in range(n_w)]
            reqs += [_request(f"{prefix}-m", k, output_tokens) for k in range(n)]
            tasks: list[asyncio.Task[AgentRequest]] = []
            lag_max = 0.0
            cpu_disp0 = cpu_work0 = cpu_broker0 = cpu_client0 = 0.0
            t_start = time.perf_counter()
            t0 = t_start + n_w / rps
            for k, r in enumerate(reqs):
                due = t_start + k / rps
                if k == n_w:  # the measured window begins
                    cpu_disp0, cpu_work0 = _cpu_s(dispatcher.pid), _cpu_s(workers.pid)
                    cpu_broker0 = _cpu_s(broker_pid) if broker_pid else 0.0
                    cpu_client0 = time.process_time()
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                    now = time.perf_counter()
                if k >= n_w:
                    lag_max = max(lag_max, now - due)
                    sent_at[r.request_id] = time.time()
                tasks.append(asyncio.create_task(client.submit(r)))
            t_last = time.perf_counter()
            await asyncio.gather(*tasks)
            say(f"sent in {t_last - t0:.2f}s; waiting for the last Assignments")
            # CPU over the measured window only (the drain that follows is not load)
            cpu_disp = _cpu_s(dispatcher.pid) - cpu_disp0
            cpu_work = _cpu_s(workers.pid) - cpu_work0
            cpu_broker = (_cpu_s(broker_pid) - cpu_broker0) if broker_pid else float("nan")
            cpu_client = time.process_time() - cpu_client0
            cpu_wall = time.perf_counter() - t0
            await _until(lambda: counts["measured"] >= n, drain_timeout_s)
    finally:
        if dispatcher is not None and dispatcher.returncode is None:
            dispatcher.terminate()
            await dispatcher.wait()
        if workers.stdin is not None and workers.returncode is None:
            workers.stdin.close()  # EOF: the worker process stops and writes its file
        try:
            await asyncio.wait_for(workers.wait(), 60.0)
        except TimeoutError:
            workers.kill()
            await workers.wait()
        reader.cancel()
    got: dict[str, list[float]] = json.loads(await asyncio.to_thread(_read_and_remove,
                                                                      out_file.name))
    recv_at = {r: v[0] for r, v in got.items()}
    to_disp = np.array([(got[r][1] - sent_at[r]) * 1e3 for r in sent_at if r in got])
    to_worker = np.array([(got[r][0] - got[r][1]) * 1e3 for r in sent_at if r in got])
    lat_pairs = sorted((sent_at[r], recv_at[r]) for r in sent_at if r in recv_at)
    lat = np.array([(b - a) * 1e3 for a, b in lat_pairs])
    # backlog: produced but not yet at a worker, at each send (from the two clocks' stamps)
    sends = np.sort(np.array(list(sent_at.values())))
    recvs = np.sort(np.array([recv_at[r] for r in sent_at if r in recv_at]))
    backlog = np.arange(1, sends.size + 1) - np.searchsorted(recvs, sends, side="right")
    window = t_last - t0
    return {
        "mode": "processes",
        "broker": s.bootstrap_servers,
        "policy": policy,
        "monitor": monitor,
        "decision_views_every": decision_views_every,
        "instances": instances,
        "time_scale": time_scale,
        "client_linger_ms": client_linger_ms,
        "worker_producer": "shared" if shared_worker_producer else "own",
        "worker_consumer": "node" if shared_worker_consumer else "own",
        "rate_target": rps,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "requests": n,
        "measured": int(lat.size),
        "missing": n - int(lat.size),
        "rate_achieved": round(n / window, 1) if window > 0 else float("inf"),
        "send_lag_max_ms": round(lag_max * 1e3, 3),
        "p50_ms": _pct(lat, 50),
        "p90_ms": _pct(lat, 90),
        "p99_ms": _pct(lat, 99),
        "max_ms": round(float(lat.max()), 3) if lat.size else float("nan"),
        "mean_ms": round(float(lat.mean()), 3) if lat.size else float("nan"),
        "produce_to_routed_p50_ms": _pct(to_disp, 50),
        "produce_to_routed_p99_ms": _pct(to_disp, 99),
        "routed_to_worker_p50_ms": _pct(to_worker, 50),
        "routed_to_worker_p99_ms": _pct(to_worker, 99),
        "dispatcher_cpu_ms_per_request": round(cpu_disp / n * 1e3, 3),
        "dispatcher_cpu_share": round(cpu_disp / cpu_wall, 3),
        "workers_cpu_share": round(cpu_work / cpu_wall, 3),
        "client_cpu_share": round(cpu_client / cpu_wall, 3),
        "broker_cpu_share": round(cpu_broker / cpu_wall, 3),
        "total_cpu_share": round((cpu_disp + cpu_work + cpu_client + cpu_broker) / cpu_wall, 3),
        "backlog_max": int(backlog.max()) if backlog.size else 0,
        "backlog_at_end": int(backlog[-1]) if backlog.size else 0,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_and_remove(path: str) -> str:
    p = Path(path)
    text = p.read_text() or "{}"
    p.unlink()
    return text


async def _worker_main(args: Any) -> int:
    """The bench's worker process: simulated workers whose hook stamps each Assignment."""
    s = Settings.from_args(args)
    recv_at: dict[str, list[float]] = {}  # rid -> [received, routed (dispatched_at)]
    measured = [0]

    def on_assignment(a: Assignment) -> None:
        rid = a.request.request_id
        if rid not in recv_at:
            recv_at[rid] = [time.time(), a.dispatched_at]
            measured[0] += rid.startswith(args.measured_prefix)

    fleet = bench_fleet(args.instances)
    stack = LocalStack(settings=s, fleet=fleet, time_scale=args.time_scale,
                       heartbeat_period_s=0.25, default_slo_s=60.0,
                       shared_worker_producer=args.shared_producer,
                       shared_worker_consumer=args.node_consumer)
    stack.dispatchers = []  # the dispatcher is a process of its own
    for w in stack.workers:
        w.on_assignment = on_assignment
    loop = asyncio.get_running_loop()
    eof = loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin: stop
    async with stack:
        print("ready", flush=True)
        while not eof.done():
            print(f"recv {len(recv_at) - measured[0]} {measured[0]}", flush=True)
            await asyncio.wait([eof], timeout=0.25)
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(recv_at))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m goodserve.bench.dispatch")
    sub = ap.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker", help="(internal) the bench's simulated workers")
    Settings.add_arguments(w)
    w.add_argument("--instances", type=int, default=4)
    w.add_argument("--time-scale", type=float, default=0.01)
    w.add_argument("--out", required=True)
    w.add_argument("--measured-prefix", required=True)
    w.add_argument("--shared-producer", action="store_true")
    w.add_argument("--node-consumer", action="store_true")
    args = ap.parse_args(argv)
    from goodserve.logging import configure_logging

    configure_logging()
    return asyncio.run(_worker_main(args))


if __name__ == "__main__":
    sys.exit(main())
