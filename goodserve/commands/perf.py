"""``goodserve perf table|calibrate|vllm-cpu``: the performance model's numbers and its error."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("perf", help="GPU performance model")
    psub = p.add_subparsers(dest="perf_command", metavar="SUBCOMMAND")
    t = psub.add_parser("table", help="TTFT and TPOT per GPU from the performance model")
    t.add_argument("--model", default="llama-2-7b", help="model shape (default llama-2-7b)")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    t.add_argument("--context", type=int, default=1024, help="tokens of context per sequence")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=run_table)
    c = psub.add_parser("calibrate", help="error of the model against measured GPU profiles")
    c.add_argument("--data", type=Path, default=None, help="calibration data folder")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=run_calibrate)
    v = psub.add_parser(
        "vllm-cpu", help="fit the vllm-cpu tiny-llama profile; sim-vs-real error on its mix"
    )
    v.add_argument("--data", type=Path, default=None, help="measurement JSON (default: bundled)")
    v.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="fit the profile to this file's curves instead, and judge it on --data's mixes"
        " (another run of the engine: the error across runs)",
    )
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=run_vllm_cpu)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_help)


def table_rows(model: str, tp: int = 1, context: int = 1024) -> list[dict[str, Any]]:
    from goodserve.perf.catalogue import gpu_names
    from goodserve.perf.latency import PerfModel

    rows = []
    for g in gpu_names():
        pm = PerfModel(g, model, tp=tp)
        rows.append(
            {
                "gpu": g,
                "model": pm.model.name,
                "ttft_100_ms": round(pm.ttft(100) * 1e3, 2),
                "ttft_1000_ms": round(pm.ttft(1000) * 1e3, 2),
                "tpot_b1_ms": round(pm.tpot(1, context) * 1e3, 2),
                "tpot_b32_ms": round(pm.tpot(32, context) * 1e3, 2),
                "tpot_b128_ms": round(pm.tpot(128, context) * 1e3, 2),
                "kv_capacity_tokens": pm.kv_capacity_tokens(),
            }
        )
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def run_table(args: argparse.Namespace) -> int:
    from goodserve.errors import ConfigError

    try:
        rows = table_rows(args.model, args.tp, args.context)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from goodserve.perf.calibration import calibrate

    rows = [r.to_dict() for r in calibrate(args.data)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def run_vllm_cpu(args: argparse.Namespace) -> int:
    from goodserve.errors import ConfigError
    from goodserve.perf.cpu_profile import CpuPerfModel, fit_cpu_profile, simulate_mix

    try:
        perf = CpuPerfModel(fit_cpu_profile(args.profile)) if args.profile else None
        report = simulate_mix(args.data, perf=perf).to_dict()
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    fit, mix = report["fit"], report["mix"]
    print(f"vllm-cpu + tiny-llama profile ({report['source']})")
    print(
        f"  step {fit['step_overhead_s'] * 1e3:.3f} ms + {fit['per_decode_seq_s'] * 1e6:.1f} us"
        f"/decode seq + {fit['per_prefill_seq_s'] * 1e3:.3f} ms/prefill seq"
        f" + {fit['per_token_s'] * 1e6:.2f} us/prefill token"
        f" + {fit['per_attn_pair_s'] * 1e9:.2f} ns/prefill attention pair"
        f" + {fit['per_decode_ctx_s'] * 1e9:.2f} ns/decode context token"
    )
    _print_table(fit["points"])
    print(
        f"fit MAPE: decode {fit['decode_mape_pct']}% (max {fit['decode_max_error_pct']}%),"
        f" prefill {fit['prefill_mape_pct']}% (max {fit['prefill_max_error_pct']}%)"
    )
    print(f"mix replay ({mix['requests']} requests), sim vs real per-request latency:")
    _print_table(mix["per_request"])
    print(
        f"latency APE: median {mix['latency_median_ape_pct']}%, p90"
        f" {mix['latency_p90_ape_pct']}%, mean {mix['latency_mape_pct']}%,"
        f" max {mix['latency_max_ape_pct']}%; TTFT median {mix['ttft_median_ape_pct']}%;"
        f" real/sim median {mix['measured_over_simulated_median']}"
    )
    return 0
