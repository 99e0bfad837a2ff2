"""The demo: GoodServe against a baseline on the same agentic load, live, on this machine.

For each policy a fresh set of topics on the broker, a ``LocalStack`` (dispatcher
with its risk monitor, one worker per instance of a simulated heterogeneous fleet
running in real time) and a load generator that replays a synthesized agentic mix
through ``GoodServeClient``: requests carry a deadline (``slo_scale`` x their
latency alone on the fleet's fastest GPU) and a client hint of their length (off
by ``hint_error``, as agents that know roughly what they ask for send). The
results come back over Kafka and are scored. The simulator's prediction for the
same trace and policy is shown beside the live figures.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.errors import GoodServeError
from goodserve.perf.latency import PerfModel
from goodserve.schemas import AgentRequest, Result
from goodserve.sim.fleet import Fleet
from goodserve.sim.synth import synthesize
from goodserve.sim.trace import TraceRow
from goodserve.stack import LocalStack

Progress = Callable[[str], None]


@dataclass
class PolicyRun:
    policy: str
    requests: int
    completed: int = 0
    met_slo: int = 0
    rejected: int = 0
    slo_attainment: float = 0.0
    goodput_rps: float = 0.0
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    migrations: int = 0
    simulated_attainment: float | None = None
    per_instance: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


def demo_trace(
    fleet: Fleet, *, requests: int, rps: float, seed: int, slo_scale: float
) -> list[TraceRow]:
    """An agentic mix with per-request deadlines relative to each request's own size."""
    rows = synthesize(n=requests, rps=rps, seed=seed)
    fastest = max(
        (PerfModel(i.gpu, fleet.model_of(i)) for i in fleet.instances),
        key=lambda p: 1.0 / p.decode_step_time(1, 512),
    )
    for r in rows:
        r.slo_s = round(slo_scale * fastest.isolated_latency(r.input_tokens, r.output_tokens), 3)
    return rows


def _hint(rid: str, tokens: int, error: float, seed: int) -> int:
    import hashlib
    import random

    h = hashlib.blake2b(f"hint:{seed}:{rid}".encode(), digest_size=8).digest()
    z = random.Random(int.from_bytes(h, "little")).gauss(0.0, 1.0)
    return max(1, round(tokens * math.exp(z * math.log1p(error))))


def to_requests(rows: list[TraceRow], *, hint_error: float | None, seed: int) -> list[AgentRequest]:
    out = []
    for i, r in enumerate(rows):
        rid = r.request_id or f"demo-{i:05d}"
        out.append(
            AgentRequest(
                request_id=rid,
                model=r.model or "default",
                task=r.task,
                workflow_id=r.workflow_id,
                step=r.step,
                prompt=r.prompt,
                input_tokens=r.input_tokens,
                max_tokens=4096,
                slo_s=r.slo_s,
                output_tokens_hint=None
                if hint_error is None
                else _hint(rid, r.output_tokens, hint_error, seed),
                metadata={"sim_output_tokens": str(r.output_tokens)},
            )
        )
    return out


async def run_policy(
    *,
    settings: Settings,
    fleet: Fleet,
    policy: str,
    rows: list[TraceRow],
    hint_error: float | None,
    seed: int,
    progress: Progress | None = None,
    drain_s: float = 60.0,
) -> PolicyRun:
    """Serve the trace live with one policy and score what comes back."""
    reqs = to_requests(rows, hint_error=hint_error, seed=seed)
    run = PolicyRun(policy=policy, requests=len(reqs))
    stack = LocalStack(settings=settings, fleet=fleet, policy=policy, heartbeat_period_s=0.2)
    async with stack, GoodServeClient(settings=settings) as client:
        await asyncio.sleep(0.6)  # first heartbeats: the dispatcher learns the fleet
        t0 = time.time()
        waiters: list[asyncio.Task[Result]] = []
        last = 0.0
        for row, req in zip(rows, reqs, strict=True):
            delay = t0 + row.arrival_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.submit(req)
            waiters.append(asyncio.create_task(client.result(req.request_id, timeout=None)))
            if progress and time.time() - last > 1.0:
                last = time.time()
                done = sum(w.done() for w in waiters)
                progress(f"{policy}: sent {len(waiters)}/{len(reqs)}, finished {done}")
        # wait for the stragglers, but no longer than every deadline has passed (+2 s):
        # a result after its deadline no longer changes the attainment
        last_deadline = t0 + max(r.arrival_s + (r.slo_s or 0.0) for r in rows) + 2.0
        deadline = min(time.time() + drain_s, max(last_deadline, time.time() + 2.0))
        while time.time() < deadline and not all(w.done() for w in waiters):
            await asyncio.sleep(0.5)
            if progress and time.time() - last > 1.0:
                last = time.time()
                progress(f"{policy}: finishing, {sum(w.done() for w in waiters)}/{len(reqs)}")
        for w in waiters:
            if not w.done():
                w.cancel()
        results = [w.result() for w in waiters if w.done() and not w.cancelled()]
        run.migrations = sum(d.stats.migrations for d in stack.dispatchers)
        run.elapsed_s = time.time() - t0
    ok = [r for r in results if r.status == "ok"]
    run.completed = len(ok)
    run.rejected = sum(r.status == "rejected" for r in results)
    run.met_slo = sum(bool(r.met_deadline) for r in ok)
    run.slo_attainment = run.met_slo / max(run.requests, 1)
    lat = sorted((r.finished_at or 0) - (r.arrival or 0) for r in ok)
    if lat:
        run.latency_p50_s = statistics.median(lat)
        run.latency_p99_s = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    span = max((r.finished_at or 0 for r in ok), default=t0) - t0
    run.goodput_rps = run.met_slo / span if span > 0 else 0.0
    run.per_instance = dict(sorted(Counter(r.instance_id or "-" for r in ok).items()))
    return run


def simulate_prediction(
    fleet: Fleet, rows: list[TraceRow], policy: str, hint_error: float | None, seed: int
) -> float | None:
    """What the discrete-event simulator predicts for the same trace (same policy code)."""
    from goodserve.sim.simulator import SimConfig, simulate

    try:
        rep = simulate(
            fleet, rows, SimConfig(policy=policy, predictor="xgb", hint_error=hint_error, seed=seed)
        )
    except GoodServeError:
        return None
    return float(rep["slo_attainment"])


async def run_comparison(
    *,
    settings_for: Callable[[str], Settings],
    fleet: Fleet,
    policies: list[str],
    requests: int,
    rps: float,
    slo_scale: float,
    hint_error: float | None,
    seed: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    rows = demo_trace(fleet, requests=requests, rps=rps, seed=seed, slo_scale=slo_scale)
    runs = []
    for policy in policies:
        s = settings_for(f"demo-{policy}-{uuid.uuid4().hex[:6]}")
        run = await run_policy(
            settings=s,
            fleet=fleet,
            policy=policy,
            rows=rows,
            hint_error=hint_error,
            seed=seed,
            progress=progress,
        )
        run.simulated_attainment = simulate_prediction(fleet, rows, policy, hint_error, seed)
        runs.append(run)
        if progress:
            progress(f"{policy}: {run.met_slo}/{run.requests} met their deadline")
    return {
        "fleet": [f"{i.id}:{i.gpu}" for i in fleet.instances],
        "requests": requests,
        "rps": rps,
        "slo_scale": slo_scale,
        "hint_error": hint_error,
        "runs": runs,
    }
