"""Measure a live migration between two engines: correctness and the pause it costs.

Used by tests/test_vllm_migration.py and scripts/bench-vllm-migration.py. Works with any
Engine, though the numbers mean most for two VllmEngines sharing a KV store. The pause is
"checkpoint call on the source -> first new token on the target"; it is compared with the
prefill time of the same context length on the target, which is what a migration without
KV transfer must pay at least.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from goodserve.schemas import SamplingParams
from goodserve.workers.engine import Engine, EngineOutput, EngineRequest

__all__ = ["measure_migration", "measure_prefill", "run_request"]

_GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def _request(
    rid: str, prompt: list[int], max_tokens: int, **extra: Any
) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        input_tokens=len(prompt),
        prompt_token_ids=list(prompt),
        max_tokens=max_tokens,
        sampling=_GREEDY,
        **extra,
    )


async def run_request(
    engine: Engine, request: EngineRequest
) -> tuple[list[int], EngineOutput, float | None]:
    """Run to the end; return (new tokens, last output, perf_counter of the first token)."""
    tokens: list[int] = []
    first: float | None = None
    last: EngineOutput | None = None
    async for out in engine.generate(request):
        if out.new_token_ids and first is None:
            first = time.perf_counter()
        tokens.extend(out.new_token_ids)
        last = out
    assert last is not None and last.finished
    return tokens, last, first


async def measure_prefill(
    engine: Engine, n_tokens: int, *, vocab: int, repeats: int = 3, seed: int = 0
) -> float:
    """Median time to first token of fresh (uncached) prompts of ``n_tokens`` on ``engine``."""
    rng = random.Random(f"prefill-{seed}-{n_tokens}-{time.time_ns()}")
    times: list[float] = []
    for i in range(repeats):
        prompt = [rng.randrange(3, vocab) for _ in range(n_tokens)]
        t0 = time.perf_counter()
        _, _, first = await run_request(engine, _request(f"prefill-{seed}-{i}", prompt, 1))
        assert first is not None
        times.append(first - t0)
    return statistics.median(times)


async def measure_migration(
    source: Engine,
    target: Engine,
    *,
    prompt_ids: list[int],
    max_tokens: int,
    checkpoint_after: int,
    request_id: str,
    with_kv: bool = True,
    reference: list[int] | None = None,
    vocab: int = 1024,
) -> dict[str, Any]:
    """Checkpoint a greedy request on ``source`` after ``checkpoint_after`` tokens, resume it
    on ``target`` (with the exported KV when ``with_kv``), and compare with an uninterrupted
    run. Returns a JSON-able dict (see docs/vllm.md)."""
    if reference is None:
        reference, _, _ = await run_request(
            source, _request(f"{request_id}-ref", prompt_ids, max_tokens)
        )
    seen: list[int] = []
    reached = asyncio.Event()
    ended: list[EngineOutput] = []

    async def consume() -> None:
        async for out in source.generate(_request(request_id, prompt_ids, max_tokens)):
            seen.extend(out.new_token_ids)
            if len(seen) >= checkpoint_after:
                reached.set()
            if out.finished:
                ended.append(out)
        reached.set()

    consumer = asyncio.create_task(consume())
    await reached.wait()
    t0 = time.perf_counter()
    ckpt = await source.checkpoint(request_id)
    t_ckpt = time.perf_counter()
    await consumer
    resumed = _request(
        request_id,
        prompt_ids,
        max_tokens,
        resume_token_ids=list(ckpt.generated_token_ids),
        kv_ref=ckpt.kv_ref if with_kv else None,
    )
    rest, last, first = await run_request(target, resumed)
    pause = (first - t0) if first is not None else None
    context = len(prompt_ids) + len(ckpt.generated_token_ids)
    prefill = await measure_prefill(target, context, vocab=vocab)
    combined = list(ckpt.generated_token_ids) + rest
    return {
        "with_kv": with_kv,
        "prompt_tokens": len(prompt_ids),
        "checkpointed_tokens": len(ckpt.generated_token_ids),
        "context_tokens": context,
        "kv_ref": ckpt.kv_ref if with_kv else None,
        "kv_tokens": ckpt.kv_tokens if with_kv else 0,
        "target_cached_tokens": last.cached_tokens,
        "source_finish_reason": ended[0].finish_reason if ended else None,
        "stream_matches_checkpoint": seen == list(ckpt.generated_token_ids),
        "tokens_equal": combined == reference,
        "reference_tokens": len(reference),
        "checkpoint_s": t_ckpt - t0,
        "pause_s": pause,
        "prefill_s": prefill,
        "pause_minus_prefill_s": (pause - prefill) if pause is not None else None,
    }
