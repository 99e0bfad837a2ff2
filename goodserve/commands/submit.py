"""``goodserve submit``: send a file of requests to Kafka, optionally wait for the Results.

Rows are AgentRequest JSON (``request_id`` ...) or trace rows (``arrival_s``,
``input_tokens``, ``output_tokens`` ...; JSONL or CSV). A trace row becomes an
AgentRequest whose ``metadata["sim_output_tokens"]`` carries the ground-truth length for
simulated workers (the router never reads it); ``max_tokens`` is ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from goodserve.commands._common import Progress, print_json
from goodserve.config import Settings
from goodserve.errors import GoodServeError, InvalidInput
from goodserve.schemas import AgentRequest, Result


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "submit", help="submit requests (AgentRequest or trace rows) and optionally await results"
    )
    Settings.add_arguments(p)
    p.add_argument("file", type=Path, help="JSONL of AgentRequests or trace rows, or trace CSV")
    p.add_argument("--wait", action="store_true", help="wait for every Result")
    p.add_argument("--out", type=Path, help="with --wait: write the Results here (JSONL)")
    p.add_argument(
        "--rate",
        default="replay",
        help="'replay' (honour arrival_s), 'max' (as fast as possible), or requests/s",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="with --wait: seconds per result")
    p.add_argument("--slo-s", type=float, help="SLO for rows without one")
    p.add_argument("--max-tokens", type=int, default=4096, help="max_tokens of trace rows")
    p.add_argument("--id-prefix", help="request id prefix of trace rows (default: random)")
    p.add_argument("--results-topic", help="private results topic (stamped as reply_to)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run_submit)


def _rows_to_requests(
    objs: list[dict[str, Any]], *, prefix: str, max_tokens: int, slo_s: float | None
) -> list[tuple[float | None, AgentRequest]]:
    """(offset seconds or None, request) per row; trace rows are converted."""
    from goodserve.sim.trace import TraceRow, validate_row

    out: list[tuple[float | None, AgentRequest]] = []
    for i, obj in enumerate(objs):
        where = f"row {i + 1}"
        try:
            if "arrival_s" in obj:  # AgentRequest has no arrival_s
                row = msgspec.convert(obj, TraceRow, strict=False)
                validate_row(row, where)
                meta = {"sim_output_tokens": str(row.output_tokens)}
                if row.prefix_tokens:
                    meta["prefix_tokens"] = str(row.prefix_tokens)
                req = AgentRequest(
                    request_id=row.request_id or f"{prefix}-{i}",
                    model=row.model or "default",
                    task=row.task,
                    workflow_id=row.workflow_id,
                    step=row.step,
                    prompt=row.prompt,
                    input_tokens=row.input_tokens,
                    max_tokens=max_tokens,
                    slo_s=row.slo_s if row.slo_s is not None else slo_s,
                    metadata=meta,
                )
                out.append((row.arrival_s, req))
            else:
                obj = {k: v for k, v in obj.items() if k != "kind"}
                req = msgspec.convert(obj, AgentRequest, strict=False)
                if req.slo_s is None and req.deadline is None and slo_s is not None:
                    req = msgspec.structs.replace(req, slo_s=slo_s)
                out.append((None, req))
        except msgspec.ValidationError as e:
            raise InvalidInput(f"{where}: {e}") from e
    return out


def load_requests(
    path: Path, *, prefix: str, max_tokens: int = 4096, slo_s: float | None = None
) -> list[tuple[float | None, AgentRequest]]:
    """Read a submit file (JSONL rows of either kind, or a trace CSV)."""
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        from goodserve.sim.trace import read_trace

        objs: list[dict[str, Any]] = [msgspec.to_builtins(r) for r in read_trace(path)]
    else:
        objs = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise InvalidInput(f"{path}:{n}: expected a JSON object")
            objs.append(obj)
    return _rows_to_requests(objs, prefix=prefix, max_tokens=max_tokens, slo_s=slo_s)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(results: list[Result], sent: int, wall_s: float) -> dict[str, Any]:
    lat = [
        r.finished_at - r.arrival
        for r in results
        if r.finished_at is not None and r.arrival is not None
    ]
    met = sum(1 for r in results if r.met_deadline)
    return {
        "requests": sent,
        "results": len(results),
        "missing": sent - len(results),
        "ok": sum(1 for r in results if r.status == "ok"),
        "errors": sum(1 for r in results if r.status != "ok"),
        "met_slo": met,
        "slo_attainment": met / sent if sent else 0.0,
        "goodput_rps": met / wall_s if wall_s > 0 else 0.0,
        "latency_p50_s": _pct(lat, 0.5),
        "latency_p99_s": _pct(lat, 0.99),
        "migrations": sum(r.migrations for r in results),
        "wall_s": wall_s,
    }


async def submit_all(
    args: argparse.Namespace, rows: list[tuple[float | None, AgentRequest]]
) -> int:
    from goodserve.client import GoodServeClient

    settings = Settings.from_args(args)
    rate: float | None = None
    replay = args.rate == "replay"
    if args.rate not in ("replay", "max"):
        rate = float(args.rate)
        if rate <= 0:
            raise InvalidInput("--rate must be replay, max or a positive number")
    total = len(rows)
    sent_bar = Progress("submit", enabled=not args.quiet)
    done_bar = Progress("results", enabled=not args.quiet and args.wait)
    results: list[Result] = []
    waits: list[asyncio.Future[Result]] = []
    loop = asyncio.get_running_loop()

    def on_done(_: asyncio.Future[Result]) -> None:
        done_bar(sum(1 for w in waits if w.done()), total)

    async with GoodServeClient(settings=settings, results_topic=args.results_topic) as client:
        t0 = loop.time()
        for i, (offset, req) in enumerate(rows):
            at = None
            if replay and offset is not None:
                at = t0 + offset
            elif rate is not None:
                at = t0 + i / rate
            if at is not None and at > loop.time():
                await asyncio.sleep(at - loop.time())
            if args.wait:
                fut = asyncio.ensure_future(client.result(req.request_id, timeout=args.timeout))
                fut.add_done_callback(on_done)
                waits.append(fut)
            await client.submit(req)
            sent_bar(i + 1, total)
        if args.wait and waits:
            await asyncio.wait(waits)
            for w in waits:
                if not w.cancelled() and w.exception() is None:
                    results.append(w.result())
        wall = loop.time() - t0
    if not args.wait:
        if args.json:
            print_json({"requests": total, "wall_s": wall})
        return 0
    if args.out:
        enc = msgspec.json.Encoder()
        with args.out.open("wb") as f:
            for r in results:
                f.write(enc.encode(r) + b"\n")
    report = summarize(results, total, wall)
    if args.json:
        print_json(report)
    else:
        for k, v in report.items():
            print(f"{k:16} {v:.3f}" if isinstance(v, float) else f"{k:16} {v}")
    return 0 if report["missing"] == 0 else 1


def run_submit(args: argparse.Namespace) -> int:
    prefix = args.id_prefix or f"sub-{uuid.uuid4().hex[:8]}"
    t = time.perf_counter()
    try:
        rows = load_requests(args.file, prefix=prefix, max_tokens=args.max_tokens, slo_s=args.slo_s)
        if not rows:
            print(f"goodserve submit: {args.file} has no rows", file=sys.stderr)
            return 2
        return asyncio.run(submit_all(args, rows))
    except (GoodServeError, ValueError) as e:
        print(f"goodserve submit: {e} ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
        return 2
