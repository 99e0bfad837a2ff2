"""``goodserve chaos crash|broker-restart|hostile|soak``: reliability runs on real Kafka.

Each starts its own Apache Kafka (or uses ``--bootstrap-servers``), runs the services as
separate processes with simulated workers, and prints the figures (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from goodserve.commands._common import print_json


def register(sub: Any) -> None:
    p = sub.add_parser("chaos", help="reliability runs: crash, broker-restart, hostile, soak")
    p.add_argument("scenario", choices=("crash", "broker-restart", "hostile", "soak"))
    p.add_argument("--requests", type=int, help="requests (crash: 2000, broker-restart: 1000, "
                   "hostile: valid requests, 1000)")
    p.add_argument("--bad", type=int, default=1000, help="hostile: bad records")
    p.add_argument("--duration", type=float, default=600.0, help="soak: seconds")
    p.add_argument("--rps", type=float, help="request rate (soak: 500, others: 100)")
    p.add_argument("--bootstrap-servers", help="use this Kafka instead of starting one "
                   "(not for broker-restart)")
    p.add_argument("--workdir", help="keep broker data and service logs here")
    p.add_argument("--time-scale", type=float,
                   help="wall seconds per simulated second (crash: 0.1, others: 0.01)")
    p.add_argument("--kill-broker", action="store_true", help="broker-restart: kill -9")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from goodserve.chaos import scenarios

    def progress(text: str) -> None:
        print(f"chaos {args.scenario}: {text}", file=sys.stderr, flush=True)

    common: dict[str, Any] = {"workdir": args.workdir, "progress": progress}
    if args.time_scale is not None:
        common["time_scale"] = args.time_scale
    rps = args.rps
    if args.scenario == "crash":
        figs = asyncio.run(scenarios.crash(requests=args.requests or 2000, rps=rps or 100.0,
                                           bootstrap=args.bootstrap_servers, **common))
    elif args.scenario == "broker-restart":
        figs = asyncio.run(scenarios.broker_restart(requests=args.requests or 1000,
                                                    rps=rps or 100.0, kill=args.kill_broker,
                                                    **common))
    elif args.scenario == "hostile":
        figs = asyncio.run(scenarios.hostile(bad=args.bad, valid=args.requests or 1000,
                                             rps=rps or 100.0,
                                             bootstrap=args.bootstrap_servers, **common))
    else:
        figs = asyncio.run(scenarios.soak(duration_s=args.duration, rps=rps or 500.0,
                                          bootstrap=args.bootstrap_servers, **common))
    if args.json:
        print_json(figs)
    else:
        for k, v in figs.items():
            if k != "samples":
                print(f"{k:32s} {v}")
    return 0 if figs.get("ok", True) else 1
