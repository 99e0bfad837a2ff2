"""``goodserve trace``: synthesize, convert and summarize trace files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from goodserve.errors import GoodServeError


def _range_int(text: str) -> int | tuple[int, int]:
    """``100`` -> 100; ``100:500`` -> (100, 500) (inclusive)."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return int(a), int(b)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None


def _pair_int(text: str) -> tuple[int, int]:
    v = _range_int(text)
    return (v, v) if isinstance(v, int) else v


def _pair_float(text: str) -> tuple[float, float]:
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return float(a), float(b)
        return float(text), float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X or LO:HI, got {text!r}") from None


def _mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        for part in text.split(","):
            if part.strip():
                k, v = part.split("=", 1)
                out[k.strip()] = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected task=share,task=share (e.g. chat=0.5,code=0.5), got {text!r}"
        ) from None
    return out


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "trace", help="synthesize, convert (Azure) and summarize trace files"
    )
    tsub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND")

    def _help(_: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_help)

    s = tsub.add_parser("synth", help="write a synthetic trace (open-loop and/or workflows)")
    s.add_argument("--out", type=Path, required=True, help="output .jsonl or .csv")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--n", type=int, help="number of open-loop requests")
    g.add_argument("--duration", type=float, help="seconds of open-loop arrivals")
    s.add_argument(
        "--rps",
        type=float,
        required=True,
        help="requests/s (with --workflows alone: workflow starts/s)",
    )
    s.add_argument("--arrival", choices=["poisson", "gamma", "uniform"], default="poisson")
    s.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    s.add_argument("--mix", type=_mix, help="task shares, e.g. chat=0.5,code=0.3,sql=0.2")
    s.add_argument("--input-tokens", type=_range_int, help="fixed N or uniform LO:HI")
    s.add_argument("--output-tokens", type=_range_int, help="fixed N or uniform LO:HI")
    s.add_argument("--slo-s", type=float, help="per-request SLO in seconds")
    s.add_argument("--workflows", type=int, help="number of agentic workflows")
    s.add_argument(
        "--workflow-rps",
        type=float,
        help="workflow starts/s when mixed with open-loop requests (default --rps)",
    )
    s.add_argument("--steps", type=_pair_int, default=(3, 12), help="steps per workflow LO:HI")
    s.add_argument("--initial-context", type=_pair_int, default=(1000, 6000))
    s.add_argument(
        "--growth", type=_pair_int, default=(100, 600), help="new prompt tokens per step LO:HI"
    )
    s.add_argument("--think-s", type=_pair_float, default=(0.5, 3.0))
    s.add_argument("--task", default="agent", help="task of workflow steps")
    s.add_argument("--workflow-slo-s", type=float, help="end-to-end deadline per workflow")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)

    c = tsub.add_parser("convert-azure", help="convert an Azure LLM 2023 CSV into a trace")
    c.add_argument("src", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--rate-scale", type=float, default=1.0, help="2 = twice the request rate")
    c.add_argument("--start-s", type=float, default=0.0)
    c.add_argument("--limit", type=int)
    c.add_argument("--duration", type=float, help="keep the first S seconds (after scaling)")
    c.add_argument("--task", help="task label (default: inferred from the file name)")
    c.add_argument("--slo-s", type=float, help="set this SLO on every row")
    c.set_defaults(func=_convert)

    st = tsub.add_parser("stats", help="summarize a trace file")
    st.add_argument("file", type=Path)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_stats)


def _fail(e: GoodServeError) -> int:
    print(f"goodserve trace: error: {e}", file=sys.stderr)
    return 2


def _synth(args: argparse.Namespace) -> int:
    from goodserve.sim.synth import synthesize, synthesize_workflows
    from goodserve.sim.trace import write_trace

    try:
        rows = []
        open_loop = args.n is not None or args.duration is not None
        if not open_loop and args.workflows is None:
            raise GoodServeError("give --n or --duration (open-loop) and/or --workflows")
        if open_loop:
            rows += synthesize(
                n=args.n,
                duration_s=args.duration,
                rps=args.rps,
                arrival=args.arrival,
                cv=args.cv,
                seed=args.seed,
                mix=args.mix,
                input_tokens=args.input_tokens,
                output_tokens=args.output_tokens,
                slo_s=args.slo_s,
            )
        if args.workflows:
            out = args.output_tokens
            rows += synthesize_workflows(
                workflows=args.workflows,
                rps=args.workflow_rps or args.rps,
                steps=args.steps,
                initial_context=args.initial_context,
                growth_per_step=args.growth,
                output_tokens=(out, out) if isinstance(out, int) else out,
                think_s=args.think_s,
                task=args.task,
                seed=args.seed + 1 if open_loop else args.seed,
                slo_per_step_s=args.slo_s,
                workflow_slo_s=args.workflow_slo_s,
            )
        rows.sort(key=lambda r: r.arrival_s)
        write_trace(rows, args.out)
    except GoodServeError as e:
        return _fail(e)
    print(f"wrote {len(rows)} requests to {args.out}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import msgspec

    from goodserve.sim.azure import convert_azure
    from goodserve.sim.trace import write_trace

    def progress(n: int) -> None:
        print(f"\rconverting {args.src.name}: {n} rows", end="", file=sys.stderr, flush=True)

    try:
        rows = convert_azure(
            args.src,
            rate_scale=args.rate_scale,
            start_s=args.start_s,
            duration_s=args.duration,
            limit=args.limit,
            task=args.task,
            progress=progress,
        )
        print(file=sys.stderr)
        if args.slo_s is not None:
            rows = [msgspec.structs.replace(r, slo_s=args.slo_s) for r in rows]
        write_trace(rows, args.out)
    except GoodServeError as e:
        print(file=sys.stderr)
        return _fail(e)
    print(f"wrote {len(rows)} requests to {args.out}", file=sys.stderr)
    return 0


def _fmt(d: dict[str, float]) -> str:
    if not d:
        return "-"
    return "  ".join(f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.3g}" for k, v in d.items())


def _stats(args: argparse.Namespace) -> int:
    from goodserve.sim.trace import read_trace, trace_stats

    try:
        st = trace_stats(read_trace(args.file))
    except GoodServeError as e:
        return _fail(e)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    rps = f"{st['rps']:.3f}" if st["rps"] is not None else "-"
    print(f"{args.file}: {st['count']} requests over {st['duration_s']:.1f} s ({rps} req/s)")
    print(f"  input tokens   {_fmt(st['input_tokens'])}")
    print(f"  output tokens  {_fmt(st['output_tokens'])}")
    if st["slo_s"]:
        print(f"  slo_s          {_fmt(st['slo_s'])}  ({st['rows_with_slo']} rows)")
    print("  tasks:")
    for t, v in st["tasks"].items():
        print(
            f"    {t:<8} {v['count']:>7}  {v['share']:6.1%}  "
            f"in p50 {v['input_tokens_p50']:,.0f}  out p50 {v['output_tokens_p50']:,.0f}"
        )
    wf = st["workflows"]
    if wf["count"]:
        print(f"  workflows: {wf['count']} ({wf['requests']} requests), steps {_fmt(wf['steps'])}")
    return 0
