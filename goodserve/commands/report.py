"""``goodserve report``: an HTML page with plots (and report.json) from runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from goodserve.commands._common import Progress, print_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="HTML report with plots from simulate outputs or results")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sim", nargs="+", metavar="[LOAD=]FILE",
                     help="goodserve simulate --keep-requests --out JSON files (several loads); "
                          "LOAD= labels a file's offered load (default: from its arrivals)")
    src.add_argument("--results", type=Path, help="JSON Lines of Result records of a live run")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--title", default="GoodServe report")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from goodserve.report.build import build_report, load_results_file, load_sim_file

    prog = Progress("report", enabled=not args.quiet)
    runs: list[dict[str, Any]] = []
    if args.sim:
        for k, spec in enumerate(args.sim):
            runs += load_sim_file(spec)
            prog(k + 1, len(args.sim))
    else:
        runs.append(load_results_file(args.results))
    prog.note(f"plotting {len(runs)} runs")
    numbers = build_report(runs, args.out, title=args.title)
    if args.json:
        print_json(numbers)
    else:
        print(table([r["summary"] for r in numbers["runs"]],
                    ["policy", "load_rps", "requests", "slo_attainment", "goodput_rps",
                     "latency_p99_s", "migrations"]))
        print(f"wrote {numbers['html']}")
    return 0
