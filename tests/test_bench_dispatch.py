"""``goodserve bench dispatch`` on the session's Apache Kafka: shape of the JSON, every request
measured (no timing asserts: the CI machine is shared)."""

from __future__ import annotations

import json
import math
import os

import pytest

from goodserve.bench.dispatch import run_dispatch_bench, run_dispatch_bench_processes
from goodserve.cli import build_parser
from goodserve.config import Settings

KEYS = {
    "requests", "measured", "missing", "rate_target", "rate_achieved", "p50_ms", "p90_ms",
    "p99_ms", "max_ms", "mean_ms", "backlog_max", "backlog_at_end", "produce_to_routed_p50_ms",
    "routed_to_worker_p50_ms", "loadavg_before", "loadavg_after", "mode",
}


def test_cli_parses_dispatch_bench() -> None:
    args = build_parser().parse_args(
        ["bench", "dispatch", "--rps", "50", "--duration", "1", "--embedded", "--no-monitor"])
    assert args.rps == 50 and args.duration == 1 and args.embedded and args.no_monitor
    assert args.func.__name__ == "run_dispatch"


@pytest.mark.kafka
@pytest.mark.parametrize("processes", [True, False], ids=["processes", "in-process"])
async def test_dispatch_bench_measures_every_request(
    kafka_settings: Settings, processes: bool
) -> None:
    if processes:
        # any process of this host stands in for the broker's (the session broker may be
        # an external one): the bench only reads its CPU time from /proc
        out = await run_dispatch_bench_processes(
            settings=kafka_settings, rps=200, duration_s=2.0, warmup=20, broker_pid=os.getpid()
        )
    else:  # the other settings: no client linger, one producer per worker
        out = await run_dispatch_bench(settings=kafka_settings, rps=200, duration_s=2.0,
                                       warmup=20, client_linger_ms=0,
                                       shared_worker_producer=False,
                                       shared_worker_consumer=False)
    json.dumps(out)  # JSON-able
    assert KEYS <= set(out)
    assert out["requests"] == 400
    assert out["measured"] == 400 and out["missing"] == 0
    assert out["mode"] == ("processes" if processes else "in-process")
    assert (out["client_linger_ms"], out["worker_producer"], out["worker_consumer"]) == (
        (2, "shared", "node") if processes else (0, "own", "own"))
    assert out["rate_achieved"] > 0
    assert 0 <= out["p50_ms"] <= out["p90_ms"] <= out["p99_ms"] <= out["max_ms"]
    if processes:  # CPU of everything the bench runs, over the measured window
        parts = [out[f"{k}_cpu_share"] for k in ("dispatcher", "workers", "client", "broker")]
        assert all(p > 0 for p in parts), parts
        assert math.isclose(out["total_cpu_share"], sum(parts), abs_tol=0.005)
