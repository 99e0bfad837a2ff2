"""Live over Kafka with real vLLM: client -> dispatcher (goodserve) -> vLLM workers -> results.

Two ``WorkerService``s run over the session's two ``VllmEngine``s (tests/fixtures_vllm.py;
never extra engines), a ``DispatcherService`` routes with the ``goodserve`` policy and its
default predictor, and ``GoodServeClient`` submits requests with ``prompt_token_ids`` and
greedy sampling. Every request must be routed (one Decision record each), generate tokens,
and return exactly the tokens the engine itself generates for the same ids, run directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest, Decision, SamplingParams
from goodserve.workers.engine import (
    EngineCheckpoint,
    EngineOutput,
    EngineRequest,
    EngineStatus,
)
from goodserve.workers.service import WorkerService

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.transport.consumer import TypedConsumer

pytestmark = [pytest.mark.kafka, pytest.mark.vllm]

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
N_REQUESTS = 8
MAX_TOKENS = 16


class SharedEngine:
    """A session engine lent to a WorkerService: start/stop leave the shared engine running."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.name: str = engine.name

    async def start(self) -> None:
        await self._engine.start()  # already started: a no-op

    async def stop(self) -> None:
        """The session fixture owns the engine: abort only what this worker left running."""
        for r in list(self._engine.status().requests):
            await self._engine.abort(r.request_id)

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._engine.generate(request)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def checkpoint(self, request_id: str) -> EngineCheckpoint:
        return await self._engine.checkpoint(request_id)

    def status(self) -> EngineStatus:
        return self._engine.status()


@pytest_asyncio.fixture
async def vllm_workers(
    vllm_engines: tuple[Any, Any], kafka_settings: Settings
) -> AsyncIterator[list[WorkerService]]:
    """Two WorkerServices over the session's engines (the engines outlive them)."""
    workers = [
        WorkerService(
            settings=kafka_settings,
            instance_id=e.instance_id,
            engine=SharedEngine(e),
            gpu="cpu",
            model=e.model,
            heartbeat_period_s=0.2,
        )
        for e in vllm_engines
    ]
    await asyncio.gather(*(w.start() for w in workers))
    try:
        yield workers
    finally:
        await asyncio.gather(*(w.stop(drain_timeout_s=10.0) for w in workers),
                             return_exceptions=True)


async def direct_greedy(engine: Any, prompt: list[int], max_tokens: int, rid: str) -> list[int]:
    """vLLM's own greedy generation for these ids (AsyncLLM directly, no GoodServe)."""
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    out_ids: list[int] = []
    async for out in engine.llm.generate(
        TokensPrompt(prompt_token_ids=prompt),
        VSP(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        request_id=rid,
    ):
        out_ids = list(out.outputs[0].token_ids)  # cumulative output kind
    return out_ids


async def read_decisions(
    settings: Settings, expect: int, timeout_s: float = 20.0
) -> list[Decision]:
    got: list[Decision] = []
    reader: TypedConsumer[Decision] = TypedConsumer(
        settings=settings, topics=[settings.decisions_topic], group_id=None,
        service="test-reader", message_type=Decision, auto_offset_reset="earliest")
    async with reader as c:
        for _ in range(int(timeout_s / 0.2)):
            got.extend(env.msg for env in await c.getmany(timeout_ms=200))
            if len(got) >= expect:
                break
    return got


async def test_requests_through_kafka_match_vllm_greedy(
    vllm_engines: tuple[Any, Any],
    vllm_workers: list[WorkerService],
    kafka_settings: Settings,
    unique_prompt: Callable[[int], list[int]],
) -> None:
    s = kafka_settings
    prompts = [unique_prompt(24 + 11 * i) for i in range(N_REQUESTS)]
    reqs = [
        AgentRequest(
            request_id=f"live-vllm-{i}",
            prompt_token_ids=p,
            max_tokens=MAX_TOKENS,
            sampling=GREEDY,
            slo_s=120.0,
            task="chat",
        )
        for i, p in enumerate(prompts)
    ]
    async with DispatcherService(settings=s, policy="goodserve", monitor=False) as disp:
        for _ in range(150):  # both workers heard from (first heartbeats)
            if len(disp.est.infos) == 2 and disp.est.usable(time.time()).all():
                break
            await asyncio.sleep(0.1)
        async with GoodServeClient(settings=s) as client:
            for r in reqs:
                await client.submit(r)
            results = await asyncio.gather(
                *(client.result(r.request_id, timeout=120) for r in reqs))
        assigned = disp.stats.assigned

    assert assigned == N_REQUESTS
    assert all(r.status == "ok" for r in results), [(r.status, r.error) for r in results]
    by_instance = {e.instance_id: e for e in vllm_engines}
    decisions = {d.request_id: d for d in await read_decisions(s, N_REQUESTS)}
    assert set(decisions) == {r.request_id for r in reqs}
    for req, res in zip(reqs, results, strict=True):
        assert res.instance_id in by_instance
        assert decisions[req.request_id].chosen == res.instance_id
        assert res.output_tokens == MAX_TOKENS == len(res.output_token_ids)
        assert res.finish_reason == "length" and res.first_token_at is not None
        assert req.prompt_token_ids is not None
        ref = await direct_greedy(by_instance[res.instance_id], req.prompt_token_ids,
                                  MAX_TOKENS, f"ref-{req.request_id}")
        assert res.output_token_ids == ref, req.request_id
    assert sum(w.results_produced for w in vllm_workers) == N_REQUESTS
