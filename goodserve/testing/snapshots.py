"""Hand-built fleet snapshots for table-driven tests of the decision core (no broker).

Policy, estimator and risk-monitor tests describe a situation ("two A100s, one holding
20k tokens of KV", "every instance runs a batch of 200") and need the heartbeat that puts
an estimator in it. ``fleet`` registers instances; ``beat`` folds one heartbeat into an
estimator with only the fields a test names, so each test states what matters and nothing
else.
"""

from __future__ import annotations

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.schemas import Heartbeat, RequestProgress

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
