"""``goodserve up``: the whole stack on this machine behind an OpenAI-compatible endpoint.

Embedded broker (or ``--bootstrap-servers``), dispatcher with its risk monitor, one worker
per fleet instance (simulated, or an OpenAI-backend worker where the fleet names an
``endpoint``) and the gateway; prints the base URL and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from goodserve.config import Settings
from goodserve.errors import GoodServeError

from ._common import add_predictor_argument, load_predictor
from .gateway import add_gateway_arguments, gateway_config, no_max_tokens_bound


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="run broker, dispatcher, monitor, workers and the OpenAI gateway here")
    p.add_argument("--fleet", default="demo",
                   help="fleet YAML or built-in name (default: the simulated 'demo' fleet)")
    p.add_argument("--policy", default="goodserve", help="routing policy")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulated instances: wall seconds per simulated second")
    p.add_argument("--no-monitor", action="store_true", help="no risk monitor (no migrations)")
    p.add_argument("--endpoint-api-key-env", metavar="VAR",
                   help="environment variable holding the key for fleet endpoints")
    add_predictor_argument(p)
    Settings.add_arguments(p)
    add_gateway_arguments(p)
    p.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    import os

    from goodserve.broker.embedded import EmbeddedBroker
    from goodserve.commands._run import serve_until_signal
    from goodserve.sim.fleet import load_fleet
    from goodserve.stack import LocalStack

    try:
        fleet = load_fleet(args.fleet)
        models = tuple(dict.fromkeys(fleet.model_of(i) for i in fleet.instances))
        gw = gateway_config(args, models=models)
    except GoodServeError as e:
        print(f"goodserve up: {e}", file=sys.stderr)
        return 2
    loaded, predictor = load_predictor(args.predictor_model, "up")
    if not loaded:
        return 2
    broker: EmbeddedBroker | None = None
    if args.bootstrap_servers:
        settings = Settings.from_args(args)
    else:
        broker = EmbeddedBroker()
    key = os.environ.get(args.endpoint_api_key_env) if args.endpoint_api_key_env else None
    state: dict[str, LocalStack] = {}

    async def start() -> None:
        nonlocal settings
        if broker is not None:
            await broker.astart()
            settings = broker.settings(topic_prefix=args.topic_prefix or "goodserve",
                                       **({"partitions": args.partitions}
                                          if args.partitions else {}))
        stack = LocalStack(settings=settings, fleet=fleet, policy=args.policy,
                           time_scale=args.time_scale, monitor=not args.no_monitor,
                           default_slo_s=gw.default_slo_s, gateway=gw,
                           max_tokens_bound=not no_max_tokens_bound(args),
                           endpoint_api_key=key, predictor=predictor)
        state["stack"] = stack
        await stack.start()
        assert stack.gateway is not None
        n_ep = sum(1 for i in fleet.instances if i.endpoint)
        print(f"goodserve up: broker {settings.bootstrap_servers}"
              f"{' (embedded)' if broker else ''}, {len(fleet.instances)} instances "
              f"({len(fleet.instances) - n_ep} simulated, {n_ep} OpenAI endpoints), "
              f"policy {args.policy}", flush=True)
        if gw.open_access:
            print(f"goodserve up: no API keys configured: open to anyone who can reach "
                  f"{gw.host}", flush=True)
        print(f"OPENAI_BASE_URL={stack.gateway.base_url}", flush=True)

    async def stop() -> None:
        try:
            if "stack" in state:
                await state["stack"].stop()
        finally:
            if broker is not None:
                await broker.astop()
        print("goodserve up: stopped", flush=True)

    settings = Settings()  # replaced in start() when the broker is embedded
    if args.bootstrap_servers:
        settings = Settings.from_args(args)
    try:
        asyncio.run(serve_until_signal(start, stop, timeout_s=60.0))
    except GoodServeError as e:
        print(f"goodserve up: {e}", file=sys.stderr)
        if broker is not None:
            broker.stop(kill=True)
        return 1
    return 0
