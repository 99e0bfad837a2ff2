"""Prefix caching on the live path: the dispatcher's prefix index, real vLLM caches, Kafka.

A workflow's step 1 extends step 0's prompt (its output and new tokens appended): the
dispatcher hashes both prompts into KV blocks, remembers where step 0 went, sends step 1
there, and the worker's vLLM engine reports the hit (``Result.cached_tokens``) and answers
faster than a cold prompt of the same length on the other instance. The index's memory
stays bounded by the instances' KV capacity under a long run of distinct prompts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.prefix_index import PrefixIndex
from goodserve.dispatcher.router import Router
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest, Assignment, Heartbeat, Result, SamplingParams
from goodserve.workers.service import WorkerService

from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.sim.kvcache import block_hashes_for_tokens
from goodserve.transport.producer import TypedProducer

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


class _Shared:
    """A session engine lent to a WorkerService: the service must not start or stop it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _ttft(r: Result) -> float:
    assert r.first_token_at is not None and r.dispatched_at is not None
    return r.first_token_at - r.dispatched_at


@pytest.mark.kafka
@pytest.mark.vllm
async def test_workflow_step_goes_where_its_prefix_is_cached(
    kafka_settings: Settings,
    vllm_engine_a: Any,
    vllm_engine_b: Any,
    unique_prompt: Callable[[int], list[int]],
) -> None:
    s = kafka_settings
    engines = {"vllm-a": vllm_engine_a, "vllm-b": vllm_engine_b}
    workers = [
        WorkerService(settings=s, instance_id=iid, engine=_Shared(eng), gpu="cpu",
                      model="tiny-llama", heartbeat_period_s=0.2)
        for iid, eng in engines.items()
    ]
    disp = DispatcherService(settings=s, monitor=False, predictor=ConstantPredictor(16.0),
                             default_slo_s=60.0)
    rows: list[dict[str, Any]] = []
    async with GoodServeClient(settings=s) as client, TypedProducer(settings=s) as producer:
        for w in workers:
            await w.start()
        await disp.start()
        try:
            for _ in range(100):  # both instances heard from
                if disp.est.usable(time.time()).sum() == 2:
                    break
                await asyncio.sleep(0.1)
            assert disp.est.usable(time.time()).sum() == 2
            for trial in range(5):
                wf = f"wf-{trial}"
                p0 = unique_prompt(1200)
                r0 = await client.request(
                    AgentRequest(request_id=f"{wf}-s0", workflow_id=wf, step=0,
                                 prompt_token_ids=p0, max_tokens=16, sampling=GREEDY, slo_s=60.0),
                    timeout=120)
                assert r0.status == "ok", r0.error
                p1 = [*p0, *r0.output_token_ids, *unique_prompt(400)]
                r1 = await client.request(
                    AgentRequest(request_id=f"{wf}-s1", workflow_id=wf, step=1,
                                 prompt_token_ids=p1, max_tokens=16, sampling=GREEDY, slo_s=60.0),
                    timeout=120)
                assert r1.status == "ok", r1.error
                # a cold prompt of step 1's length on the other instance (same Kafka path)
                other = next(i for i in engines if i != r0.instance_id)
                cold_req = AgentRequest(request_id=f"{wf}-cold", prompt_token_ids=unique_prompt(
                    len(p1)), max_tokens=16, sampling=GREEDY, slo_s=60.0, arrival=time.time())
                a = Assignment(request=cold_req, instance_id=other, decision_id="cold",
                               dispatched_at=time.time(), deadline=time.time() + 60.0,
                               predicted_output_tokens=16)
                await producer.send(s.instance_topic(other), a, key=cold_req.request_id)
                rc = await client.result(cold_req.request_id, timeout=120)
                assert rc.status == "ok", rc.error
                rows.append({
                    "step0_instance": r0.instance_id, "step1_instance": r1.instance_id,
                    "prompt1_tokens": len(p1), "step0_cached": r0.cached_tokens,
                    "step1_cached": r1.cached_tokens, "cold_cached": rc.cached_tokens,
                    "step0_ttft_s": round(_ttft(r0), 4), "step1_ttft_s": round(_ttft(r1), 4),
                    "cold_ttft_s": round(_ttft(rc), 4), "cold_instance": rc.instance_id,
                })
            # the dispatcher mirrors the engines' KV capacity (vLLM CPU blocks: 32 tokens)
            caps = disp.router.prefix_index._cap if disp.router else []
            kv_tokens = [int(t) for t in disp.est.kv_total]
        finally:
            await disp.stop()
            for w in workers:
                await w.stop()
    print(json.dumps({"rows": rows, "index_capacity_blocks": caps, "kv_tokens": kv_tokens}))
    for row in rows:
        assert row["step1_instance"] == row["step0_instance"], row
        assert row["cold_instance"] != row["step0_instance"]
        assert row["step1_cached"] >= 1200 - 32, row  # step 0's prompt (whole blocks) was hit
        assert row["cold_cached"] == 0, row
    warm = statistics.median(r["step1_ttft_s"] for r in rows)
    cold = statistics.median(r["cold_ttft_s"] for r in rows)
    assert warm < cold, rows
    assert all(c * 16 <= k for c, k in zip(caps, kv_tokens, strict=False)) and len(caps) == 2


def test_prefix_index_memory_stays_bounded() -> None:
    """6,000 distinct 512-token prompts over 4 instances: entries never exceed the capacity."""
    n, cap_blocks, engine_bs = 4, 300, 32
    est = FleetEstimator()
    for k in range(n):
        est.add_instance(f"i{k}", gpu="H100", model="llama-3-8b")
    router = Router(estimator=est, predictor=ConstantPredictor(32.0), policy="least-request",
                    prefix_index=PrefixIndex(block_size=16, max_blocks_per_instance=100_000),
                    record_views=False)
    now = 1000.0
    for k in range(n):  # heartbeats: 300 blocks of 32 tokens each = 600 index blocks
        router.on_heartbeat(Heartbeat(instance_id=f"i{k}", gpu="H100", model="llama-3-8b",
                                      engine="sim", at=now, kv_total_blocks=cap_blocks,
                                      kv_block_size=engine_bs), now=now)
    bound = n * cap_blocks * engine_bs // 16
    idx = router.prefix_index
    peak = 0
    for j in range(6_000):
        toks = [j, *range(511)]  # distinct from the first block on
        out = router.route(AgentRequest(request_id=f"r{j}", input_tokens=512, max_tokens=32,
                                        slo_s=1e6), now,
                           block_hashes=block_hashes_for_tokens(toks, 16))
        assert out.slot is not None
        est.on_finish(f"r{j}", now=now, output_tokens=32)
        peak = max(peak, idx.entries())
        assert idx.blocks() <= idx.entries() <= bound
    assert peak == bound  # it filled up to the capacity and stayed there
    # a dead instance's entries are forgotten at once
    router.forget_instance("i0")
    assert idx.entries() == bound - bound // n
    # the bound without heartbeats is max_blocks_per_instance per instance
    small = PrefixIndex(block_size=16, max_blocks_per_instance=50)
    for j in range(1000):
        small.add(j % 3, block_hashes_for_tokens([j, *range(63)], 16))
        assert small.entries() <= 150 and small.blocks() <= 150
