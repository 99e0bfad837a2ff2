"""``goodserve dispatcher`` and ``goodserve monitor``: the long-running services."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from goodserve.config import Settings

from ._common import add_predictor_argument, load_predictor


def register(sub: Any) -> None:
    d = sub.add_parser("dispatcher", help="run the dispatcher service (requests -> instances)")
    Settings.add_arguments(d)
    d.add_argument("--policy", default="goodserve")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy setting override")
    d.add_argument("--fleet", help="fleet YAML (or built-in name) to pre-register instances")
    d.add_argument("--group-id", default="goodserve-dispatcher")
    d.add_argument("--no-monitor", action="store_true", help="do not run the risk monitor inside")
    d.add_argument("--default-slo-s", type=float, default=30.0)
    d.add_argument("--stale-after-s", type=float, default=3.0,
                   help="an instance without a heartbeat for this long is dead: its requests "
                        "are re-dispatched")
    d.add_argument("--max-prompt-chars", type=int, default=None,
                   help="reject (dead-letter) prompts longer than this")
    d.add_argument("--no-max-tokens-bound", action="store_true",
                   default=os.environ.get("GOODSERVE_NO_MAX_TOKENS_BOUND", "") in ("1", "true"),
                   help="let the predictor alone decide the planned length (max_tokens no cap)")
    d.add_argument("--rebuild-lookback-s", type=float, default=600.0,
                   help="on start and rebalance, rebuild in-flight placements from the last "
                        "this many seconds of the topics (0: off; default 600)")
    d.add_argument("--decision-views-every", type=int, default=1, metavar="N",
                   help="one decision in N records every instance's view, what `goodserve "
                        "audit replay` needs to redo it (default 1: every decision; the "
                        "views are most of a record on a large fleet; 0: none)")
    add_predictor_argument(d)
    d.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    d.set_defaults(func=run_dispatcher)
    m = sub.add_parser("monitor", help="run the standalone risk monitor (migrations)")
    Settings.add_arguments(m)
    m.add_argument("--period-s", type=float, default=0.5)
    m.add_argument("--risk-threshold", type=float, default=0.5)
    m.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    m.set_defaults(func=run_monitor)


def run_dispatcher(args: argparse.Namespace) -> int:
    from goodserve.commands._run import serve_until_signal
    from goodserve.dispatcher.service import DispatcherService
    from goodserve.sim.fleet import load_fleet

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    from goodserve.dispatcher.validation import Limits

    settings = Settings.from_args(args)
    loaded, predictor = load_predictor(args.predictor_model, "dispatcher")
    if not loaded:
        return 2
    limits = Limits.for_records(settings.max_record_bytes)
    if args.max_prompt_chars is not None:
        limits.max_prompt_chars = args.max_prompt_chars
    svc = DispatcherService(
        settings=settings, limits=limits, stale_after_s=args.stale_after_s,
        policy=args.policy, policy_overrides=overrides,
        fleet=load_fleet(args.fleet) if args.fleet else None, group_id=args.group_id,
        monitor=not args.no_monitor, default_slo_s=args.default_slo_s,
        max_tokens_bound=not args.no_max_tokens_bound,
        metrics_port=args.metrics_port, rebuild_lookback_s=args.rebuild_lookback_s,
        decision_views_every=args.decision_views_every, predictor=predictor,
    )
    asyncio.run(serve_until_signal(svc.start, svc.stop))
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    from goodserve.commands._run import serve_until_signal
    from goodserve.monitor.risk import MonitorConfig
    from goodserve.monitor.service import MonitorService

    svc = MonitorService(settings=Settings.from_args(args),
                         config=MonitorConfig(period_s=args.period_s,
                                              risk_threshold=args.risk_threshold),
                         metrics_port=args.metrics_port)
    asyncio.run(serve_until_signal(svc.start, svc.stop))
    return 0
