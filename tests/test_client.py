"""GoodServeClient against a real Apache Kafka: round trip through a worker, dedup, timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import msgspec
import pytest
from goodserve.schemas import AgentRequest, Assignment, Result
from goodserve.workers.engines.simulated import SimulatedEngine
from goodserve.workers.service import WorkerService

from goodserve.client import GoodServeClient, ResultTimeout
from goodserve.config import Settings
from goodserve.errors import ConfigError, TransportError
from goodserve.transport import TypedConsumer, TypedProducer, ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


async def relay(settings: Settings, instance_id: str) -> None:
    """A stand-in dispatcher: every request goes to one instance."""
    consumer: TypedConsumer[AgentRequest] = TypedConsumer(
        settings=settings,
        topics=settings.requests_topic,
        group_id="test-relay",
        service="test-relay",
        message_type=AgentRequest,
    )
    async with consumer, TypedProducer(settings=settings) as prod:
        async for env in consumer:
            req = env.msg
            now = time.time()
            a = Assignment(
                request=req,
                instance_id=instance_id,
                decision_id=f"d-{req.request_id}",
                dispatched_at=now,
                deadline=(req.arrival or now) + (req.slo_s or 60.0),
            )
            await prod.send(settings.instance_topic(instance_id), a, key=req.request_id)
            await consumer.commit(env)


def test_constructor_validates() -> None:
    s = Settings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(ConfigError):
        GoodServeClient(settings=s, results_topic=" ")
    with pytest.raises(ConfigError):
        GoodServeClient(settings=s, max_buffered=0)
    with pytest.raises(ConfigError):
        GoodServeClient(settings=s, linger_ms=-1)
    assert GoodServeClient(settings=s).linger_ms == 0  # an agent's default: no added wait
    GoodServeClient(settings=s, linger_ms=5)  # no I/O


async def test_round_trip_through_worker(kafka_settings: Settings) -> None:
    s = kafka_settings
    await ensure_topics(s)
    eng = SimulatedEngine(instance_id="w", gpu="A100", time_scale=0.02)
    mine = s.topic("results.mine")
    task = asyncio.create_task(relay(s, "w"))
    try:
        async with (
            WorkerService(settings=s, instance_id="w", engine=eng, gpu="A100", model="m") as w,
            GoodServeClient(settings=s, results_topic=mine) as client,
        ):
            reqs = [
                AgentRequest(
                    request_id=f"c-{i}",
                    prompt="x" * 400,
                    max_tokens=64,
                    slo_s=20.0,
                    metadata={"sim_output_tokens": str(10 + i)},
                )
                for i in range(3)
            ]
            stream = client.results()
            first = asyncio.ensure_future(anext(stream))
            r0 = await client.request(reqs[0], timeout=30)
            assert r0.status == "ok" and r0.request_id == "c-0" and r0.instance_id == "w"
            assert r0.output_tokens == 10 and r0.input_tokens == 100  # ceil(400 chars / 4)
            assert r0.arrival is not None and r0.finished_at is not None
            assert r0.arrival <= r0.finished_at and r0.met_deadline
            assert (await asyncio.wait_for(first, 5)).request_id == "c-0"
            for r in reqs[1:]:
                await client.submit(r)
            got = await asyncio.gather(*(client.result(r.request_id, timeout=30) for r in reqs))
            assert [g.output_tokens for g in got] == [10, 11, 12]
            assert await client.result("c-1", timeout=0.1) is got[1]  # buffered
            assert w.results_produced == 3 and client.submitted == 3
            await stream.aclose()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_dedup_timeout_and_stream(kafka_settings: Settings) -> None:
    s = kafka_settings
    async with GoodServeClient(settings=s) as client, TypedProducer(settings=s) as prod:
        seen: list[str] = []

        async def collect() -> None:
            async for r in client.results():
                seen.append(r.request_id)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(client.result("d-1", timeout=20))
        res = Result(request_id="d-1", status="ok", output_tokens=3, instance_id="a")
        dup = Result(request_id="d-1", status="ok", output_tokens=3, instance_id="b")
        await prod.send(s.results_topic, res, key="d-1")
        await prod.send(s.results_topic, dup, key="d-1")
        await prod.send(s.results_topic, Result(request_id="d-2", status="error"), key="d-2")
        got = await waiting
        assert got.instance_id == "a"
        assert (await client.result("d-2", timeout=10)).status == "error"
        for _ in range(100):  # the duplicate may sit on another partition than d-2
            if client.duplicates:
                break
            await asyncio.sleep(0.05)
        assert client.duplicates == 1
        assert (await client.result("d-1", timeout=1)).instance_id == "a"
        t0 = time.monotonic()
        with pytest.raises(ResultTimeout) as ei:
            await client.result("never", timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 3.0
        assert isinstance(ei.value, TimeoutError) and ei.value.retriable
        assert seen == ["d-1", "d-2"]
    await asyncio.wait_for(collector, 5)  # the stream ends when the client stops
    with pytest.raises(TransportError):
        await client.result("d-1x", timeout=0.1)


async def test_submit_command_waits_for_results(kafka_settings: Settings, tmp_path: Path) -> None:
    """``goodserve submit FILE --wait --out``: trace rows and AgentRequest rows, replayed."""
    from goodserve.cli import main

    s = kafka_settings
    await ensure_topics(s)
    rows = [
        {"arrival_s": 0.0, "input_tokens": 50, "output_tokens": 7, "slo_s": 20, "task": "code"},
        {"arrival_s": 0.1, "input_tokens": 80, "output_tokens": 9, "request_id": "t-1"},
        {"kind": "agent_request", "request_id": "a-1", "prompt": "hello", "max_tokens": 4},
    ]
    src = tmp_path / "reqs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results.jsonl"
    eng = SimulatedEngine(instance_id="cli", gpu="H100", time_scale=0.02)
    task = asyncio.create_task(relay(s, "cli"))
    argv = [
        "submit", str(src), "--wait", "--out", str(out), "--json", "--quiet",
        "--bootstrap-servers", s.bootstrap_servers, "--topic-prefix", s.topic_prefix,
        "--id-prefix", "tr", "--slo-s", "30", "--timeout", "30",
    ]  # fmt: skip
    try:
        async with WorkerService(settings=s, instance_id="cli", engine=eng, gpu="H100", model="m"):
            rc = await asyncio.to_thread(main, argv)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert rc == 0
    got = {
        r.request_id: r
        for r in map(msgspec.json.Decoder(Result).decode, out.read_bytes().splitlines())
    }
    assert sorted(got) == ["a-1", "t-1", "tr-0"]
    assert got["tr-0"].output_tokens == 7 and got["t-1"].output_tokens == 9
    assert got["a-1"].output_tokens == 4 and got["tr-0"].input_tokens == 50
    assert all(r.status == "ok" for r in got.values())
