"""``goodserve demo``: GoodServe vs a baseline, live over an embedded Kafka-compatible broker."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import asdict
from typing import Any

from goodserve.config import Settings


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="GoodServe vs a baseline on this machine (embedded broker, no setup)"
    )
    p.add_argument("--requests", type=int, default=150, help="requests per policy (default 150)")
    p.add_argument("--rps", type=float, default=12.0, help="arrival rate (default 12/s)")
    p.add_argument(
        "--fleet",
        default="demo",
        help="fleet file or built-in name (default: demo = H100, A100, 2x A40, V100)",
    )
    p.add_argument("--baseline", default="least-request", help="policy to compare with")
    p.add_argument(
        "--slo-scale",
        type=float,
        default=3.0,
        help="deadline = scale x latency alone on the fastest GPU (default 3)",
    )
    p.add_argument(
        "--hint-error",
        type=float,
        default=0.25,
        help="clients hint output lengths off by this relative error (-1: no hints)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--bootstrap-servers", help="use this Kafka instead of starting the embedded broker"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from goodserve.commands._common import print_json, table
    from goodserve.demo import run_comparison
    from goodserve.sim.fleet import load_fleet

    if args.requests < 1 or args.rps <= 0 or args.slo_scale <= 0:
        raise SystemExit("demo: --requests, --rps and --slo-scale must be positive")
    if not os.environ.get("GOODSERVE_LOG_LEVEL"):
        from goodserve.logging import configure_logging

        configure_logging(level="WARNING")  # the table is the output; set the env for more
    fleet = load_fleet(args.fleet)
    hint = None if args.hint_error < 0 else args.hint_error

    def say(text: str) -> None:
        sys.stderr.write(f"demo: {text}\n")
        sys.stderr.flush()

    async def go() -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            fleet=fleet,
            policies=["goodserve", args.baseline],
            requests=args.requests,
            rps=args.rps,
            slo_scale=args.slo_scale,
            hint_error=hint,
            seed=args.seed,
            progress=say,
        )
        if args.bootstrap_servers:
            base = Settings.from_env(bootstrap_servers=args.bootstrap_servers)
            return await run_comparison(settings_for=lambda p: base.replace(topic_prefix=p), **kw)
        from goodserve.broker.embedded import EmbeddedBroker

        async with EmbeddedBroker() as broker:
            say(f"embedded Kafka-compatible broker (Tansu) at {broker.bootstrap_servers}")
            say(
                f"fleet: {', '.join(f'{i.id} ({i.gpu})' for i in fleet.instances)}; "
                f"{args.requests} requests at {args.rps}/s per policy"
            )
            return await run_comparison(
                settings_for=lambda p: broker.settings(topic_prefix=p, partitions=2), **kw
            )

    out = asyncio.run(go())
    runs = out["runs"]
    if args.json:
        print_json({**out, "runs": [asdict(r) for r in runs]})
        return 0
    rows = [asdict(r) for r in runs]
    print()
    print(
        table(
            rows,
            [
                "policy",
                "requests",
                "completed",
                "met_slo",
                "slo_attainment",
                "goodput_rps",
                "latency_p50_s",
                "latency_p99_s",
                "rejected",
                "migrations",
                "simulated_attainment",
            ],
        )
    )
    print()
    inst = sorted({k for r in runs for k in r.per_instance})
    print(
        table(
            [{"policy": r.policy, **{k: r.per_instance.get(k, 0) for k in inst}} for r in runs],
            ["policy", *inst],
        )
    )
    g, b = runs[0], runs[1]
    if b.slo_attainment > 0:
        print(
            f"\ngoodserve met {g.met_slo} deadlines, {b.policy} {b.met_slo}: "
            f"{g.slo_attainment / b.slo_attainment:.2f}x the attainment."
        )
    return 0
