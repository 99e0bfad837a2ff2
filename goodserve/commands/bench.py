"""``goodserve bench``: benchmarks that print JSON."""

from __future__ import annotations

import argparse
from typing import Any

from goodserve.commands._common import Progress, print_json


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks (router throughput, dispatch overhead)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    r = bsub.add_parser("router", help="routing decisions per second in one process")
    r.add_argument("--instances", type=int, default=512)
    r.add_argument("--rps", type=float, default=10000.0)
    r.add_argument("--requests", type=int, default=20000)
    r.add_argument("--policy", default="goodserve")
    r.add_argument("--audit", action="store_true",
                   help="also build and encode each decision's audit record, as the "
                        "dispatcher does")
    r.add_argument("--views-every", type=int, default=1, metavar="N",
                   help="with --audit: the instances' views in one record of N (the "
                        "dispatcher's --decision-views-every; default 1, 0: none)")
    r.add_argument("--batch", type=int, default=1,
                   help="requests per poll, predicted together (default 1: one by one)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=run_router)
    d = bsub.add_parser(
        "dispatch",
        help="dispatch overhead through Kafka: request produced -> Assignment at the worker",
    )
    d.add_argument("--rps", type=float, default=1000.0, help="request rate (default 1000/s)")
    d.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    d.add_argument("--instances", type=int, default=4, help="simulated instances (default 4)")
    d.add_argument("--time-scale", type=float, default=0.01,
                   help="simulated engines' time scale (default 0.01)")
    d.add_argument("--output-tokens", type=int, default=8, help="tokens per request (default 8)")
    d.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    d.add_argument("--warmup-s", type=float, default=3.0,
                   help="then seconds of unmeasured requests at --rps, right before the "
                        "measured ones (default 3; processes mode)")
    d.add_argument("--policy", default="goodserve")
    d.add_argument("--decision-views-every", type=int, default=1, metavar="N",
                   help="the dispatcher's setting: the instances' views in one decision "
                        "record of N (default 1)")
    d.add_argument("--no-monitor", action="store_true", help="run without the risk monitor")
    d.add_argument("--client-linger-ms", type=int, default=2,
                   help="the load generator's produce linger (default 2 ms; 0: an agent's "
                        "setting, one Kafka request per request at low rates)")
    d.add_argument("--worker-producer", choices=["shared", "own"], default="shared",
                   help="the simulated workers' process: one producer for all of them "
                        "(default, as one worker process per multi-GPU node) or one each")
    d.add_argument("--worker-consumer", choices=["node", "own"], default="node",
                   help="the simulated workers' process: one consumer for all their topics "
                        "(default, a NodeConsumer, as on a multi-GPU node) or one each")
    d.add_argument("--partitions", type=int, default=2, help="partitions of the topics (2)")
    d.add_argument("--in-process", action="store_true",
                   help="dispatcher, workers and client in one event loop (default: the "
                        "dispatcher and the workers run as processes of their own)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--bootstrap-servers", help="an existing Kafka (default: start Apache Kafka)")
    g.add_argument("--embedded", action="store_true",
                   help="start the embedded (Tansu) broker instead of Apache Kafka")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=run_dispatch)


def run_router(args: argparse.Namespace) -> int:
    from goodserve.bench.router import run_router_bench

    out = run_router_bench(
        instances=args.instances,
        rps=args.rps,
        requests=args.requests,
        policy=args.policy,
        audit=args.audit,
        views_every=args.views_every,
        batch=args.batch,
        progress=Progress("bench router", enabled=not args.quiet),
    )
    if args.json:
        print_json(out)
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v}")
    return 0


def run_dispatch(args: argparse.Namespace) -> int:
    """Always prints JSON (the measurement); progress lines go to stderr."""
    import asyncio
    import os
    import sys
    import tempfile

    from goodserve.bench.dispatch import run_dispatch_bench, run_dispatch_bench_processes
    from goodserve.config import Settings

    if not os.environ.get("GOODSERVE_LOG_LEVEL"):
        from goodserve.logging import configure_logging

        configure_logging(level="WARNING")  # per-request INFO lines would be measured too

    def say(text: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"bench dispatch: {text}\n")
            sys.stderr.flush()

    kw: dict[str, Any] = dict(
        rps=args.rps, duration_s=args.duration, instances=args.instances,
        time_scale=args.time_scale, output_tokens=args.output_tokens, warmup=args.warmup,
        policy=args.policy, monitor=not args.no_monitor, progress=say,
        client_linger_ms=args.client_linger_ms,
        shared_worker_producer=args.worker_producer == "shared",
        shared_worker_consumer=args.worker_consumer == "node",
        decision_views_every=args.decision_views_every,
    )
    bench = run_dispatch_bench if args.in_process else run_dispatch_bench_processes
    if not args.in_process:
        kw["warmup_s"] = args.warmup_s

    async def go() -> dict[str, Any]:
        if args.bootstrap_servers:
            s = Settings.from_env(bootstrap_servers=args.bootstrap_servers,
                                  partitions=args.partitions)
            return await bench(settings=s, **kw)
        if args.embedded:
            from goodserve.broker.embedded import EmbeddedBroker

            async with EmbeddedBroker() as eb:
                say(f"embedded broker (Tansu) at {eb.bootstrap_servers}")
                out = await bench(settings=eb.settings(partitions=args.partitions), **kw)
                return {**out, "broker_kind": "embedded"}
        from goodserve.broker.apache import ApacheKafkaBroker

        with tempfile.TemporaryDirectory(prefix="goodserve-bench-kafka-") as wd:
            async with ApacheKafkaBroker(workdir=wd) as kb:
                say(f"Apache Kafka at {kb.bootstrap_servers}")
                s = Settings.from_env(bootstrap_servers=kb.bootstrap_servers,
                                      partitions=args.partitions)
                if not args.in_process:
                    kw["broker_pid"] = kb.pid
                out = await bench(settings=s, **kw)
                return {**out, "broker_kind": "apache"}

    print_json(asyncio.run(go()))
    return 0
