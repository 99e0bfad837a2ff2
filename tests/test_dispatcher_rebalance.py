"""Consumer-group rebalances while requests flow lose nothing (real Apache Kafka).

The dispatcher routes a poll while earlier polls' records are still being acknowledged and
commits in the background; a rebalance can take a partition away at any of those moments.
Here a third replica joins and leaves the group 4 times while 2 replicas route a steady
stream (sent until the last one has left): every request must still reach a worker and
come back as one Result.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import DeadLetter, Decision, Result
from live_helpers import read_all
from test_live_e2e import FLEET, make_requests

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.stack import LocalStack

pytestmark = pytest.mark.kafka


async def _churn(s: Settings, rounds: int, predictor: Any) -> int:
    """A replica joins the group, routes for a moment, leaves; ``rounds`` times."""
    for k in range(rounds):
        d = DispatcherService(
            settings=s, fleet=FLEET, monitor=False, default_slo_s=30.0, seed=100 + k,
            predictor=predictor,
        )
        await d.start()
        for _ in range(100):  # until the group gave it partitions (a rebalance happened)
            if d.assigned_partitions() > 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)
        await d.stop()  # leaving: another rebalance
        await asyncio.sleep(0.3)
    return rounds


async def test_rebalances_while_routing_lose_no_request(kafka_settings: Settings) -> None:
    s = kafka_settings.replace(partitions=4)
    pool = make_requests(2000, seed=7)
    async with (
        LocalStack(
            settings=s, fleet=FLEET, dispatchers=2, time_scale=0.02, heartbeat_period_s=0.1,
            monitor=False,
        ) as stack,
        GoodServeClient(settings=s) as client,
    ):
        for _ in range(300):
            if all(d.assigned_partitions() > 0 for d in stack.dispatchers):
                break
            await asyncio.sleep(0.1)
        predictor = stack.dispatchers[0].router.predictor if stack.dispatchers[0].router else None
        churn = asyncio.create_task(_churn(s, rounds=4, predictor=predictor))
        reqs: list[Any] = []
        for r in pool:  # ~100/s for as long as the replicas come and go (at least 200)
            if churn.done() and len(reqs) >= 200:
                break
            await client.submit(r)
            reqs.append(r)
            if len(reqs) % 10 == 0:
                await asyncio.sleep(0.1)
        rounds = await churn
        got = await asyncio.gather(
            *(client.result(r.request_id, timeout=90) for r in reqs), return_exceptions=True
        )
        await asyncio.sleep(2.0)  # a duplicate would be on the topic by now
    lost = [r.request_id for r, g in zip(reqs, got, strict=True) if not isinstance(g, Result)]
    assert rounds == 4 and len(reqs) >= 200, (rounds, len(reqs))
    if lost:  # say where they stopped: never decided, decided, dead-lettered
        decided = {d.request_id: d.chosen for d in await read_all(s, s.decisions_topic, Decision)
                   if d.request_id in lost}
        dls = {d.request_id: d.error_code for d in await read_all(s, s.dead_letters_topic,
                                                                  DeadLetter)}
        raise AssertionError(f"no Result for {lost}: decisions {decided}, dead letters "
                             f"{ {r: dls.get(r) for r in lost} }")
    results = await read_all(s, s.results_topic, Result)
    per_id = collections.Counter(r.request_id for r in results)
    assert set(per_id) == {r.request_id for r in reqs}
    dups = {k: v for k, v in per_id.items() if v > 1}
    assert not dups, f"requests answered more than once: {dups}"
