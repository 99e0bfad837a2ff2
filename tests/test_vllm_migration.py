"""Migration between two real vLLM engines: checkpoint on A, resume on B, identical output."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from goodserve.testing.vllm_migration import measure_migration

pytestmark = pytest.mark.vllm

"""Allowed pause above the context's prefill time. The target is 0.1 s (docs/vllm.md); the
test allows more because the 2-core CI machine is shared and a stall is not a bug."""


async def _migrate(a: Any, b: Any, prompt: list[int], *, with_kv: bool, rid: str) -> dict:
    res = await measure_migration(
        a, b, prompt_ids=prompt, max_tokens=96, checkpoint_after=40, request_id=rid,
        with_kv=with_kv, vocab=a.vocab_size,
    )
    print(json.dumps(res))
    return res


async def test_migration_with_kv_is_exact(
    vllm_engine_a: Any, vllm_engine_b: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    res = await _migrate(vllm_engine_a, vllm_engine_b, unique_prompt(600), with_kv=True,
                         rid="mig-kv")
    assert res["source_finish_reason"] == "migrated"
    assert res["stream_matches_checkpoint"]
    assert res["checkpointed_tokens"] >= 40
    assert res["tokens_equal"], res
    assert res["kv_ref"] and res["kv_tokens"] >= res["context_tokens"] - 32
    # B loaded the exported KV (it had never seen this prompt).
    assert res["target_cached_tokens"] >= res["kv_tokens"]
    # the pause is measured, not asserted (timings on a shared machine are benchmark
    # material: scripts/bench-vllm-migration.py reports it against the prefill time)
    assert res["pause_s"] > 0.0


async def test_migration_without_kv_recomputes_exactly(
    vllm_engine_a: Any, vllm_engine_b: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    res = await _migrate(vllm_engine_a, vllm_engine_b, unique_prompt(600), with_kv=False,
                         rid="mig-nokv")
    assert res["tokens_equal"], res
    assert res["stream_matches_checkpoint"]
    assert res["target_cached_tokens"] == 0  # no kv_ref: everything was recomputed
    assert res["pause_s"] > 0.0


async def test_migration_back_and_forth(
    vllm_engine_a: Any, vllm_engine_b: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    """B -> A after A -> B: resume tokens accumulate and the output stays exact."""
    from goodserve.schemas import SamplingParams
    from goodserve.workers.engine import EngineRequest

    from goodserve.testing.vllm_migration import run_request

    prompt = unique_prompt(300)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)

    def mk(rid: str, resume: list[int], kv_ref: str | None) -> EngineRequest:
        return EngineRequest(request_id=rid, input_tokens=len(prompt), prompt_token_ids=prompt,
                             max_tokens=80, sampling=greedy, resume_token_ids=resume,
                             kv_ref=kv_ref)

    ref, _, _ = await run_request(vllm_engine_a, mk("bf-ref", [], None))
    resume: list[int] = []
    kv_ref: str | None = None
    engines = [vllm_engine_a, vllm_engine_b, vllm_engine_a]
    for hop, eng in enumerate(engines):
        got = list(resume)
        async for out in eng.generate(mk("bf", resume, kv_ref)):
            got.extend(out.new_token_ids)
            if hop < len(engines) - 1 and len(got) >= len(resume) + 15 and not out.finished:
                ck = await eng.checkpoint("bf")
                assert ck.generated_token_ids[: len(resume)] == resume
                resume, kv_ref = list(ck.generated_token_ids), ck.kv_ref
        if hop == len(engines) - 1:
            assert out.finish_reason == "length"
            assert out.num_generated == 80 - len(resume)
            assert got == ref
