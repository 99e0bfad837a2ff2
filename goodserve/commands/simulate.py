"""``goodserve simulate`` and ``goodserve slo-scale``: policies on a fleet, in virtual time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from goodserve.commands._common import Progress, print_json, table


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fleet", required=True, help="fleet YAML file or built-in name (figure2, mixed8, demo)"
    )
    p.add_argument("--trace", required=True, type=Path, help="trace file (JSONL or CSV)")
    p.add_argument(
        "--policy", default="goodserve", help="policy name, or several separated by commas"
    )
    p.add_argument(
        "--predictor",
        default="xgb",
        help="xgb (shipped model), xgb-encoder (its encoder tier: needs goodserve[encoder]), "
             "task-median, oracle, noisy:<error> (e.g. noisy:0.3)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-migrate", action="store_true", help="disable the risk monitor")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy setting override, e.g. --set hopeless_factor=1.2",
    )
    p.add_argument(
        "--slowdown",
        action="append",
        default=[],
        metavar="T:INSTANCE:FACTOR",
        help="at virtual time T, instance runs at FACTOR of its speed",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation of a trace on a fleet")
    _add_common(p)
    p.add_argument(
        "--slo-scale", type=float, help="deadline = scale x latency alone on the fastest GPU"
    )
    p.add_argument("--slo-s", type=float, help="default SLO (s) for rows without slo_s")
    p.add_argument("--decisions-out", type=Path, help="write every decision record (JSONL)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--keep-requests", action="store_true",
                   help="add per-request rows and load over time (for goodserve report)")
    p.set_defaults(func=run_simulate)
    q = sub.add_parser("slo-scale", help="smallest SLO scale meeting a target attainment")
    _add_common(q)
    q.add_argument("--target", type=float, default=0.95)
    q.set_defaults(func=run_slo_scale)


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _config(args: argparse.Namespace, policy: str) -> Any:
    from goodserve.sim.simulator import SimConfig

    overrides = dict(kv.split("=", 1) for kv in args.set)
    slowdowns = []
    for s in args.slowdown:
        t, iid, f = s.split(":")
        slowdowns.append((float(t), iid, float(f)))
    cfg = SimConfig(
        policy=policy,
        predictor=args.predictor,
        seed=args.seed,
        migrate=False if args.no_migrate else None,
        policy_overrides={k: _parse_value(v) for k, v in overrides.items()},
        slowdowns=slowdowns,
    )
    if getattr(args, "slo_scale", None) is not None:
        cfg.slo_scale = args.slo_scale
    if getattr(args, "slo_s", None) is not None:
        cfg.default_slo_s = args.slo_s
    if getattr(args, "decisions_out", None) is not None:
        cfg.record_decisions = True
    if getattr(args, "keep_requests", False):
        cfg.keep_requests = True
    return cfg


def run_simulate(args: argparse.Namespace) -> int:
    from goodserve.schemas import encode
    from goodserve.sim.fleet import load_fleet
    from goodserve.sim.simulator import Simulator
    from goodserve.sim.trace import read_trace

    fleet = load_fleet(args.fleet)
    trace = read_trace(args.trace)
    reports = []
    for policy in [p.strip() for p in args.policy.split(",") if p.strip()]:
        sim = Simulator(fleet=fleet, trace=trace, config=_config(args, policy))
        rep = sim.run(Progress(f"simulate {policy}", enabled=not args.quiet))
        reports.append(rep)
        if args.decisions_out:
            with args.decisions_out.open("ab") as f:
                for d in sim.decisions:
                    f.write(encode(d) + b"\n")
    out: Any = reports[0] if len(reports) == 1 else {"runs": reports}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str))
    if args.json:
        print_json(out)
    else:
        cols = [
            "policy",
            "requests",
            "met_slo",
            "slo_attainment",
            "goodput_rps",
            "latency_p50_s",
            "latency_p99_s",
            "migrations",
            "rejected",
            "prefix_hit_rate",
        ]
        print(table(reports, cols))
    return 0


def run_slo_scale(args: argparse.Namespace) -> int:
    from goodserve.sim.fleet import load_fleet
    from goodserve.sim.simulator import slo_scale_for
    from goodserve.sim.trace import read_trace

    fleet = load_fleet(args.fleet)
    trace = read_trace(args.trace)
    results = []
    for policy in [p.strip() for p in args.policy.split(",") if p.strip()]:
        prog = Progress(f"slo-scale {policy}", enabled=not args.quiet)
        res = slo_scale_for(fleet, trace, _config(args, policy), args.target, progress=prog.note)
        res["policy"] = policy
        results.append(res)
    out: Any = results[0] if len(results) == 1 else {"runs": results}
    if args.json:
        print_json(out)
    else:
        print(table(results, ["policy", "target", "slo_scale"]))
    return 0
