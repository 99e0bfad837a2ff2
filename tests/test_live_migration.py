"""Runtime migration on the live path: real Kafka, simulated workers, one slowed mid-run.

Two H100 instances serve a stream of deadline-bound requests. While requests run, one
instance's engine drops to a tenth of its speed (``speed_factor=0.1``). The dispatcher's
in-process risk monitor sees the slowdown in that instance's heartbeats, commands
migrations (``migrations`` topic, ``MigrationCommand`` to the source's topic), the
source checkpoints at a token boundary and the target resumes. Every request still
gets exactly one result, and more meet their deadlines than in the same run without
the monitor.

The simulated engines run in real time (``time_scale=1``): the estimator learns from
heartbeat TPOTs (engine time) and result timings (wall time), which agree only then.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.monitor.risk import MonitorConfig, RiskMonitor
from goodserve.schemas import AgentRequest, MigrationCommand, Result
from goodserve.workers.engines.simulated import SimulatedEngine

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.stack import LocalStack
from goodserve.transport.consumer import TypedConsumer

pytestmark = pytest.mark.kafka

FLEET = Fleet(instances=[FleetInstance(id="gpu-a", gpu="H100"),
                         FleetInstance(id="gpu-b", gpu="H100")])
N = 24
OUTPUT = 200
SLO_S = 6.0
MONITOR = MonitorConfig(period_s=0.2)


async def read_topic(settings: Settings, topic: str, kind: type, expect: int,
                     timeout_s: float = 20.0, settle_s: float = 2.0) -> list[Any]:
    """Everything of ``kind`` on a topic: until ``expect`` arrived, then ``settle_s`` more
    (so a duplicate would be seen too)."""
    got: list[Any] = []
    c: TypedConsumer[Any] = TypedConsumer(settings=settings, topics=[topic], group_id=None,
                                          service="test-reader", auto_offset_reset="earliest")
    async with c:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        settle_end: float | None = None
        while loop.time() < (settle_end if settle_end is not None else end):
            for env in await c.getmany(timeout_ms=200):
                if isinstance(env.msg, kind):
                    got.append(env.msg)
            if settle_end is None and len(got) >= expect:
                settle_end = loop.time() + settle_s
    return got


def _requests(tag: str) -> list[AgentRequest]:
    return [
        AgentRequest(request_id=f"{tag}-{i}", task="chat", input_tokens=300 + 10 * i,
                     max_tokens=512, slo_s=SLO_S, metadata={"sim_output_tokens": str(OUTPUT)})
        for i in range(N)
    ]


async def _run(settings: Settings, *, monitor: bool) -> dict[str, Any]:
    s = settings
    tag = "mon" if monitor else "nomon"
    reqs = _requests(tag)
    stack = LocalStack(settings=s, fleet=FLEET, monitor=monitor, time_scale=1.0,
                       heartbeat_period_s=0.1,
                       predictor=ConstantPredictor(float(OUTPUT), float(OUTPUT) * 1.2))
    d = stack.dispatchers[0]
    if monitor:
        d.monitor = RiskMonitor(MONITOR)
    async with stack, GoodServeClient(settings=s) as client:
        for _ in range(50):
            if d.est.usable(time.time()).sum() == 2:
                break
            await asyncio.sleep(0.1)
        t0 = time.time()
        for r in reqs:
            await client.submit(r)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # all are running now
        active = d.est.active()
        slow = FLEET.instances[int(active.argmax())].id
        engine = next(w.engine for w in stack.workers if w.instance_id == slow)
        assert isinstance(engine, SimulatedEngine)
        on_slow = int(active.max())
        engine.speed_factor = 0.1
        results = await asyncio.gather(*(client.result(r.request_id, timeout=120) for r in reqs))
        wall = time.time() - t0
        stats = d.stats
        migrations = stats.migrations
        dup = client.duplicates
    topic_results = await read_topic(s, s.results_topic, Result, N)
    commands = (await read_topic(s, s.migrations_topic, MigrationCommand, migrations,
                                 settle_s=0.5)) if migrations else []
    return {
        "monitor": monitor,
        "slowed": slow,
        "requests_on_slowed": on_slow,
        "met": sum(bool(r.met_deadline) for r in results),
        "ok": sum(r.status == "ok" for r in results),
        "migrations": migrations,
        "migrated_results": [r for r in results if r.migrations >= 1],
        "commands": commands,
        "topic_ids": [r.request_id for r in topic_results],
        "ids": [r.request_id for r in reqs],
        "client_duplicates": dup,
        "results": results,
        "wall_s": round(wall, 2),
    }


async def test_slowed_instance_requests_migrate_and_meet_deadlines(
    kafka_settings: Settings,
) -> None:
    base = await _run(kafka_settings.replace(topic_prefix=kafka_settings.topic_prefix + "-off"),
                      monitor=False)
    mon = await _run(kafka_settings, monitor=True)
    summary = {
        k: {
            "met": r["met"], "of": N, "migrations": r["migrations"], "slowed": r["slowed"],
            "requests_on_slowed": r["requests_on_slowed"], "wall_s": r["wall_s"],
            "migrated_met": sum(bool(x.met_deadline) for x in r["migrated_results"]),
            "migrated": len(r["migrated_results"]),
            "tokens_ok": all(x.output_tokens == OUTPUT for x in r["results"] if x.status == "ok"),
        }
        for k, r in (("monitor_off", base), ("monitor_on", mon))
    }
    print(json.dumps(summary))
    for r in (base, mon):
        # exactly one result per request id on the results topic, none lost or duplicated
        assert sorted(r["topic_ids"]) == sorted(r["ids"]), r["topic_ids"]
        assert r["client_duplicates"] == 0
        assert r["ok"] == N
        assert all(x.output_tokens == OUTPUT for x in r["results"])
    assert base["migrations"] == 0 and not base["migrated_results"]
    assert mon["migrations"] > 0
    assert len(mon["commands"]) == mon["migrations"]
    assert {c.source for c in mon["commands"]} == {mon["slowed"]}
    moved = mon["migrated_results"]
    assert moved and all(x.instance_id != mon["slowed"] for x in moved)
    assert sum(bool(x.met_deadline) for x in moved) >= 0.8 * len(moved)
    assert mon["met"] > base["met"], summary
