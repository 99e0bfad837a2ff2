"""Router benchmark: decisions per second and per-decision latency in one process.

A synthetic fleet of N instances (a mix of GPU types) receives requests at R per
second of virtual time; each decision is the full ``goodserve`` path (predict with
the shipped XGBoost model, estimate every instance, filter, score, pick, count the
request on the chosen instance). Requests complete after their estimated duration
and instances heartbeat every 100 ms of virtual time, so the fleet stays loaded.
Only the router is timed. With ``batch`` > 1 requests come in groups of that size, as
a dispatcher's poll hands them over, and are predicted together (``Router.predict``);
each decision is then charged its share of the batch prediction plus its own routing.
With ``audit`` each decision also builds and encodes its audit record as the dispatcher
does (the instances' views in one record of ``views_every``); without it the router
keeps no record (``Router(record_views=False)``) and checks its pick instead of masking
the fleet with the chain's last filters.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.router import Router
from goodserve.schemas import AgentRequest, encode
from goodserve.testing.snapshots import beat_all

GPU_MIX = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]
PROMPTS = [
    "Write a Python function that parses a CSV file and returns the rows as dicts.",
    "Translate the following question into SQL: how many users signed up last week?",
    "Solve step by step: a train leaves at 3pm travelling 60 km/h ...",
    "Call the weather tool for Paris and summarize the forecast.",
    "Explain the difference between TCP and UDP to a new engineer.",
]
TASKS = ["code", "sql", "math", "tool", "chat"]


def run_router_bench(
    *,
    instances: int = 512,
    rps: float = 10000.0,
    requests: int = 20000,
    policy: str = "goodserve",
    audit: bool = False,
    views_every: int = 1,
    seed: int = 0,
    predictor: Any = None,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    from goodserve.dispatcher.predictor.model import OutputLengthPredictor

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rng = random.Random(seed)
    est = FleetEstimator()
    for i in range(instances):
        est.add_instance(
            f"inst-{i}", gpu=GPU_MIX[i % len(GPU_MIX)], max_batch=256, now=0.0, alive=True
        )
    router = Router(
        estimator=est,
        predictor=predictor or OutputLengthPredictor.default(),
        policy=policy,
        seed=seed,
        record_views=audit,
        views_every=views_every,
    )
    ends: list[tuple[float, str]] = []
    lat = np.zeros(requests)
    pred = np.zeros(requests)
    hb_period = 0.1
    next_hb = hb_period
    wall0 = time.perf_counter()
    pending: list[Any] = []
    share_ns = 0.0
    for k in range(requests):
        now = k / rps
        while ends and ends[0][0] <= now:
            _, rid = heapq.heappop(ends)
            est.on_finish(rid, now=now)
        if now >= next_hb:
            beat_all(est, now, engine="bench", max_batch=256)
            next_hb += hb_period
        if batch > 1:
            if not pending:  # the poll that brings this request brings the next ones too
                group = [_request(rng, k + j, now) for j in range(min(batch, requests - k))]
                t0 = time.perf_counter_ns()
                pending = list(zip(group, router.predict(group), strict=True))
                share_ns = (time.perf_counter_ns() - t0) / len(group)
            req, predicted = pending.pop(0)
        else:
            req, predicted, share_ns = _request(rng, k, now), None, 0.0
        t0 = time.perf_counter_ns()
        out = router.route(req, now, predicted=predicted)
        if audit:
            encode(out.record(top_k=32))  # what the dispatcher sends to the decisions topic
        lat[k] = time.perf_counter_ns() - t0 + share_ns
        pred[k] = share_ns
        if out.slot is not None:
            dur = float(out.ctx.finish[out.slot])
            heapq.heappush(ends, (now + dur, req.request_id))
        if progress and k % 2000 == 0:
            progress(k, requests)
    wall = time.perf_counter() - wall0
    if progress:
        progress(requests, requests)
    total_s = lat.sum() / 1e9
    return {
        "instances": instances,
        "rps": rps,
        "requests": requests,
        "policy": policy,
        "audit_record": audit,
        "views_every": views_every if audit else 0,
        "batch": batch,
        "decisions_per_s": requests / total_s,
        "decision_p50_us": float(np.percentile(lat, 50) / 1e3),
        "decision_p99_us": float(np.percentile(lat, 99) / 1e3),
        "decision_mean_us": float(lat.mean() / 1e3),
        "predict_mean_us": float(pred.mean() / 1e3),
        "route_mean_us": float((lat - pred).mean() / 1e3),
        "wall_s": wall,
        "virtual_s": requests / rps,
        "sustains_rps": bool(requests / total_s >= rps),
    }


def _request(rng: random.Random, k: int, now: float) -> AgentRequest:
    j = rng.randrange(len(PROMPTS))
    return AgentRequest(
        request_id=f"b{k}",
        task=TASKS[j],
        prompt=PROMPTS[j],
        input_tokens=rng.randint(50, 2000),
        max_tokens=1024,
        arrival=now,
        slo_s=rng.uniform(2.0, 30.0),
    )
