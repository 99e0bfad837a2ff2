"""Hand-built fleet snapshots for table-driven tests of the decision core (no broker).

Policy, estimator and risk-monitor tests describe a situation ("two A100s, one holding
20k tokens of KV", "every instance runs a batch of 200") and need the heartbeat that puts
an estimator in it. ``fleet`` registers instances; ``beat`` folds one heartbeat into an
estimator with only the fields a test names, so each test states what matters and nothing
else.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.schemas import AgentRequest, Heartbeat, RequestProgress

KV_BLOCK_SIZE = 16
KV_TOTAL_BLOCKS = 6000
"""The KV gauges a snapshot reports when a test gives KV in tokens (96k tokens in all)."""


def fleet(*gpus: str, model: str = "llama-2-7b", now: float = 0.0) -> FleetEstimator:
    """An estimator with one live instance per GPU name, ids ``<gpu>-<k>`` (lower case)."""
    est = FleetEstimator()
    for k, g in enumerate(gpus):
        est.add_instance(f"{g.lower()}-{k}", gpu=g, model=model, now=now, alive=True)
    return est


def progress_of(est: FleetEstimator, slot: int) -> list[RequestProgress]:
    """The instance's tracked requests as a heartbeat reports them (all running)."""
    return [
        RequestProgress(
            request_id=tr.request_id,
            state="running",
            generated=tr.generated,
            input_tokens=tr.input_tokens,
            deadline=tr.deadline,
        )
        for tr in est.infos[slot].requests.values()
    ]


def beat(
    est: FleetEstimator,
    slot: int,
    *,
    at: float = 0.0,
    running: int = 0,
    waiting: int = 0,
    kv_tokens: int | None = None,
    kv_total_blocks: int = KV_TOTAL_BLOCKS,
    tpot_s: float = 0.0,
    requests: list[RequestProgress] | None = None,
    max_batch: int = 256,
) -> Heartbeat:
    """Fold a heartbeat of instance ``slot`` into ``est`` and return it.

    ``kv_tokens``: KV in use, reported as gauges of ``kv_total_blocks`` blocks of
    ``KV_BLOCK_SIZE`` tokens (None: no gauges, as an HTTP backend sends).
    """
    info = est.infos[slot]
    kv = {}
    if kv_tokens is not None:
        kv = dict(
            kv_used_blocks=kv_tokens // KV_BLOCK_SIZE,
            kv_total_blocks=kv_total_blocks,
            kv_block_size=KV_BLOCK_SIZE,
        )
    hb = Heartbeat(
        instance_id=info.instance_id,
        gpu=info.gpu,
        model=info.model,
        engine="sim",
        at=at,
        running=running,
        waiting=waiting,
        max_batch=max_batch,
        tpot_s=tpot_s,
        requests=requests or [],
        **kv,
    )
    est.on_heartbeat(hb)
    return hb


def beat_all(
    est: FleetEstimator,
    now: float,
    *,
    engine: str = "test",
    own: Callable[[int], dict[str, Any]] | None = None,
    **fields: Any,
) -> None:
    """Fold one heartbeat per instance into ``est`` at ``now``, each reporting its
    outstanding requests as running: the heartbeat round of a loaded-fleet loop.

    ``fields`` go into every heartbeat; ``own(slot)`` adds that instance's own (called
    once per instance, in slot order).
    """
    for i, info in enumerate(est.infos):
        est.on_heartbeat(
            Heartbeat(
                instance_id=info.instance_id,
                gpu=info.gpu,
                model=info.model,
                engine=engine,
                at=now,
                running=int(est.n_active[i]),
                **fields,
                **(own(i) if own is not None else {}),
            ),
            now=now,
        )


def random_request(
    rng: random.Random, k: int, now: float, slo_s: Callable[[random.Random], float]
) -> AgentRequest:
    """Request ``r<k>`` arriving at ``now`` with a prompt of 20-3,000 tokens (drawn first)
    and an SLO of ``slo_s(rng)``: the stream of a loaded-fleet loop."""
    return AgentRequest(
        request_id=f"r{k}",
        input_tokens=rng.randint(20, 3000),
        max_tokens=1024,
        arrival=now,
        slo_s=slo_s(rng),
    )


class VaryingLengths:
    """A predictor stand-in whose lengths vary by request, with no model file:
    P50 = 40 + (37 n mod 460) tokens for an ``n``-token prompt, P90 = P50 x ``spread(n)``
    (or a fixed ``spread``), no P99."""

    version = "test"

    def __init__(self, spread: float | Callable[[int], float] = 1.5) -> None:
        self.spread = spread

    def features(self, x: object) -> list[float]:
        return [float(getattr(x, "input_tokens", 0))]

    def predict(self, x: object) -> SimpleNamespace:
        n = int(getattr(x, "input_tokens", 100))
        p50 = 40.0 + (n * 37) % 460
        spread = self.spread(n) if callable(self.spread) else self.spread
        return SimpleNamespace(p50=p50, p90=p50 * spread, p99=0.0)
