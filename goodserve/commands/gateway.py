"""``goodserve gateway``: the OpenAI-compatible HTTP gateway in front of GoodServe's topics."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from goodserve.config import Settings
from goodserve.errors import GoodServeError


def add_gateway_arguments(p: argparse.ArgumentParser, *, default_port: int = 8000) -> None:
    """The flags ``gateway`` and ``up`` share."""
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (non-loopback needs API keys or --no-auth)")
    g.add_argument("--port", type=int, default=default_port, help="HTTP port (0: any free one)")
    g.add_argument("--api-keys", help="comma-separated bearer keys (else $GOODSERVE_API_KEYS)")
    g.add_argument("--api-key-file", help="file of bearer keys, one a line "
                   "(else $GOODSERVE_API_KEY_FILE)")
    g.add_argument("--no-auth", action="store_true",
                   help="run without keys on a non-loopback address (something else authenticates)")
    g.add_argument("--default-slo-s", type=float, default=30.0,
                   help="deadline of requests that name none (seconds from arrival)")
    g.add_argument("--deadline-grace-s", type=float, default=10.0,
                   help="how long past its deadline a request is awaited before a 504")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body (default: --max-record-bytes, 1 MiB)")
    g.add_argument("--max-inflight-per-key", type=int, default=256)
    g.add_argument("--no-max-tokens-bound", action="store_true", default=None,
                   help="max_tokens no longer caps the predicted length "
                   "(also $GOODSERVE_NO_MAX_TOKENS_BOUND=1)")
    g.add_argument("--tokenizer", help="Hugging Face tokenizer for input lengths and chat "
                   "templates (default: estimate ceil(chars/4))")
    g.add_argument("--served-model", action="append", default=None, metavar="NAME",
                   help="model name listed by /v1/models and accepted (repeatable)")


def no_max_tokens_bound(args: argparse.Namespace) -> bool:
    if args.no_max_tokens_bound:
        return True
    return os.environ.get("GOODSERVE_NO_MAX_TOKENS_BOUND", "").lower() in ("1", "true", "yes")


def gateway_config(args: argparse.Namespace, *, models: tuple[str, ...] = ()) -> Any:
    """The GatewayConfig the flags (and environment) describe."""
    from goodserve.gateway import GatewayConfig, load_api_keys

    return GatewayConfig(
        host=args.host, port=args.port,
        api_keys=load_api_keys(keys=args.api_keys, key_file=args.api_key_file),
        no_auth=args.no_auth, default_slo_s=args.default_slo_s,
        deadline_grace_s=args.deadline_grace_s, max_body_bytes=args.max_body_bytes,
        max_inflight_per_key=args.max_inflight_per_key,
        max_tokens_bound=not no_max_tokens_bound(args), tokenizer=args.tokenizer,
        models=tuple(args.served_model or ()) or models,
    )


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "gateway", help="OpenAI-compatible HTTP gateway (requests/results/stream topics)")
    Settings.add_arguments(p)
    add_gateway_arguments(p)
    p.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    from goodserve.commands._run import serve_until_signal
    from goodserve.gateway import GatewayService

    try:
        svc = GatewayService(settings=Settings.from_args(args), config=gateway_config(args))
    except GoodServeError as e:
        print(f"goodserve gateway: {e}", file=sys.stderr)
        return 2

    async def start() -> None:
        await svc.start()
        if svc.config.open_access:
            print("goodserve gateway: no API keys configured: open to anyone who can reach "
                  f"{svc.config.host}", file=sys.stderr)
        print(f"OPENAI_BASE_URL={svc.base_url}", flush=True)

    asyncio.run(serve_until_signal(start, svc.stop))
    return 0
