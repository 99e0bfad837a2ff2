"""``goodserve worker``: one GPU instance's worker (simulated or vLLM engine) on Kafka."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from goodserve.config import Settings
from goodserve.errors import ConfigError, GoodServeError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "worker", help="run one instance's worker: instance.<id> -> engine -> results"
    )
    Settings.add_arguments(p)
    p.add_argument("--instance-id", required=True, help="this instance's id (topic instance.<id>)")
    p.add_argument("--engine", choices=("sim", "vllm", "openai"), default="sim")
    p.add_argument("--endpoint", help="openai: base URL of the OpenAI-compatible server")
    p.add_argument("--endpoint-api-key-env", metavar="VAR",
                   help="openai: environment variable holding the server's API key")
    p.add_argument("--gpu", help="GPU type from the catalogue (default: A100 for sim, cpu/vllm)")
    p.add_argument("--model", help="model (default llama-2-7b for sim; required for vllm)")
    p.add_argument("--heartbeat-s", type=float, default=0.5, help="heartbeat period (s)")
    p.add_argument("--speed-factor", type=float, default=1.0, help="sim: speed multiplier")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="sim: wall seconds per simulated second"
    )
    p.add_argument("--max-inflight", type=int, default=1024)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    p.add_argument("--max-model-len", type=int, default=2048, help="vllm: context length")
    p.add_argument("--kv-shared-dir", help="vllm: shared KV store for migrations")
    p.add_argument(
        "--log-payloads", action="store_true", default=None, help="log prompt and output text"
    )
    p.set_defaults(func=run_worker)


def build_worker(args: argparse.Namespace) -> Any:
    """The WorkerService the flags describe (no I/O)."""
    from goodserve.workers.service import WorkerService

    settings = Settings.from_args(args)
    engine: Any
    if args.engine == "sim":
        from goodserve.workers.engines.simulated import SimulatedEngine

        gpu = args.gpu or "A100"
        model = args.model or "llama-2-7b"
        engine = SimulatedEngine(
            instance_id=args.instance_id,
            gpu=gpu,
            model=model,
            speed_factor=args.speed_factor,
            time_scale=args.time_scale,
        )
    elif args.engine == "openai":
        import os

        from goodserve.workers.engines.openai import OpenAIEngine

        if not args.endpoint or not args.gpu:
            raise ConfigError("--engine openai needs --endpoint and --gpu (it seeds estimates)")
        gpu = args.gpu
        model = args.model or "default"
        key_env = getattr(args, "endpoint_api_key_env", None)
        engine = OpenAIEngine(
            endpoint=args.endpoint,
            model=model,
            instance_id=args.instance_id,
            api_key=os.environ.get(key_env) if key_env else None,
        )
    else:
        from goodserve.workers.engines.vllm import VllmEngine  # heavy: only when asked

        if not args.model:
            raise ConfigError("--engine vllm needs --model")
        gpu = args.gpu or "cpu"
        model = args.model
        engine = VllmEngine(
            model=model,
            instance_id=args.instance_id,
            gpu=gpu,
            max_model_len=args.max_model_len,
            kv_shared_dir=args.kv_shared_dir,
        )
    return WorkerService(
        settings=settings,
        instance_id=args.instance_id,
        engine=engine,
        gpu=gpu,
        model=model,
        heartbeat_period_s=args.heartbeat_s,
        max_inflight=args.max_inflight,
        log_payloads=args.log_payloads,
        metrics_port=args.metrics_port,
    )


def run_worker(args: argparse.Namespace) -> int:
    from goodserve.commands._run import serve_until_signal

    try:
        svc = build_worker(args)
    except GoodServeError as e:
        print(f"goodserve worker: {e}", file=sys.stderr)
        return 2
    drain = float(args.drain_timeout_s)

    async def stop() -> None:
        await svc.stop(drain_timeout_s=drain)

    asyncio.run(serve_until_signal(svc.start, stop, timeout_s=drain + 30.0))
    return 0
