"""Load generator and result collector for chaos runs.

The collector is a ``GoodServeClient`` that also counts every Result record per request id
*before* the client's own de-duplication, so a run reports both what the system delivered
(raw, at-least-once) and what a client sees (exactly one per request id).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.errors import GoodServeError
from goodserve.logging import get_logger
from goodserve.schemas import AgentRequest, Result
from goodserve.transport import Delivery, TypedProducer

log = get_logger(__name__)


class CountingClient(GoodServeClient):
    """A client that counts raw Result records per request id (before de-duplication)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw_counts: Counter[str] = Counter()
        self.statuses: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}
        self.instances: dict[str, str] = {}

    def _deliver(self, res: Result) -> None:
        rid = res.request_id
        self.raw_counts[rid] += 1
        if rid not in self.statuses:
            self.statuses[rid] = res.status
            self.first_seen[rid] = time.time()
            self.instances[rid] = res.instance_id or "none"
        super()._deliver(res)


def make_request(i: int, rng: random.Random, *, prefix: str, slo_s: float = 120.0) -> AgentRequest:
    """A valid simulated request (its output length comes from ``sim_output_tokens``)."""
    out = rng.randint(16, 96)
    return AgentRequest(
        request_id=f"{prefix}-{i}",
        task=rng.choice(["chat", "code", "math", "sql", "tool", "agent"]),
        input_tokens=rng.randint(32, 512),
        max_tokens=256,
        slo_s=slo_s,
        output_tokens_hint=out,
        metadata={"sim_output_tokens": str(out)},
    )


@dataclass
class LoadStats:
    submitted: int = 0
    acked: int = 0
    send_errors: int = 0
    ids: list[str] = field(default_factory=list)
    acked_ids: set[str] = field(default_factory=set)


class LoadGenerator:
    """Produces requests at a fixed rate with an idempotent producer; records acked ids.

    A request counts as acknowledged once the broker acked it (acks=all): those are the
    requests that must never be lost. Sends that fail (broker down) are retried.
    """

    def __init__(self, *, settings: Settings, prefix: str, seed: int = 0,
                 slo_s: float = 120.0) -> None:
        self.settings = settings
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.slo_s = slo_s
        self.stats = LoadStats()
        self._producer = TypedProducer(settings=settings, client_id=f"{settings.client_id}-load",
                                       linger_ms=5)
        self._next = 0

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    @property
    def producer(self) -> TypedProducer:
        return self._producer

    async def _send(self, req: AgentRequest) -> None:
        for attempt in range(60):
            try:
                d = await self._producer.send_nowait(self.settings.requests_topic, req,
                                                     key=req.request_id)
                await d
                self.stats.acked += 1
                self.stats.acked_ids.add(req.request_id)
                return
            except GoodServeError as e:
                self.stats.send_errors += 1
                log.warning("load.send_retry", attempt=attempt, error=str(e)[:200])
                await asyncio.sleep(0.5)

    async def run(self, *, total: int | None, rps: float, duration_s: float | None = None,
                  extra: list[tuple[float, Any]] | None = None) -> None:
        """Send ``total`` requests (or for ``duration_s``) at ``rps`` per second."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tick = 0.02
        pending: set[asyncio.Task[None]] = set()
        sent = 0
        while True:
            elapsed = loop.time() - t0
            if total is not None and sent >= total:
                break
            if duration_s is not None and elapsed >= duration_s:
                break
            due = int(elapsed * rps) + 1
            if total is not None:
                due = min(due, total)
            while sent < due:
                req = make_request(self._next, self.rng, prefix=self.prefix, slo_s=self.slo_s)
                req = _stamp(req)
                self._next += 1
                sent += 1
                self.stats.submitted += 1
                self.stats.ids.append(req.request_id)
                t = asyncio.create_task(self._send(req))
                pending.add(t)
                t.add_done_callback(pending.discard)
            await asyncio.sleep(tick)
        if pending:
            await asyncio.gather(*pending)

    async def send_now(self, req: AgentRequest) -> Delivery:
        return await self._producer.send_nowait(self.settings.requests_topic, req,
                                                key=req.request_id)


def _stamp(req: AgentRequest) -> AgentRequest:
    import msgspec

    return msgspec.structs.replace(req, arrival=time.time())


async def wait_for_results(client: CountingClient, ids: list[str], *, timeout_s: float,
                           progress: Any = None) -> float:
    """Wait until every id has a Result or the timeout passes; returns seconds waited."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    want = set(ids)
    while loop.time() - t0 < timeout_s:
        missing = sum(1 for r in want if r not in client.statuses)
        if progress is not None:
            progress(len(want) - missing, len(want))
        if missing == 0:
            break
        await asyncio.sleep(0.25)
    return loop.time() - t0


def delivery_figures(client: CountingClient, ids: list[str]) -> dict[str, Any]:
    """Figures of a run: delivered (exactly once after de-dup), duplicates, missing."""
    counts = client.raw_counts
    delivered = sum(1 for r in ids if counts.get(r, 0) >= 1)
    dup_ids = [r for r in ids if counts.get(r, 0) > 1]
    statuses = Counter(client.statuses.get(r, "missing") for r in ids)
    return {
        "requests": len(ids),
        "results_delivered": delivered,
        "results_after_dedup": delivered,
        "missing": len(ids) - delivered,
        "duplicate_results_raw": sum(max(0, counts.get(r, 0) - 1) for r in ids),
        "requests_with_duplicates": len(dup_ids),
        "client_duplicates_dropped": client.duplicates,
        "status": dict(statuses),
        "missing_ids_sample": [r for r in ids if counts.get(r, 0) == 0][:10],
    }
