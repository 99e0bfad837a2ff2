"""Metrics: sliding windows, per-service registries, and /metrics scraped from live services."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from goodserve.dispatcher.service import DispatcherService
from goodserve.monitor.service import MonitorService
from goodserve.schemas import AgentRequest, Result
from goodserve.workers.engines.simulated import SimulatedEngine
from goodserve.workers.service import WorkerService
from prometheus_client.parser import text_string_to_metric_families

from goodserve.config import Settings
from goodserve.metrics import DispatcherMetrics, MetricsServer, SlidingWindow, WorkerMetrics
from goodserve.transport import TypedProducer, ensure_topics

MODEL = "llama-2-7b"


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {k[0] for k in samples}


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def test_sliding_window() -> None:
    now = [100.0]
    w = SlidingWindow(10.0, clock=lambda: now[0])
    assert w.count() == 0 and w.goodput() == 0.0
    for k in range(10):
        w.add(k % 4 != 0, at=95.0 + k * 0.5)  # 10 results, 3 missed
    assert w.attainment() == pytest.approx(0.7)
    assert w.goodput() == pytest.approx(0.7)
    now[0] = 107.0  # results before t=97 leave the window
    assert w.count() == 6
    assert w.attainment() == pytest.approx(4 / 6)


def test_sliding_window_memory_does_not_grow_with_the_rate() -> None:
    now = [0.0]
    w = SlidingWindow(60.0, clock=lambda: now[0])
    for k in range(120_000):  # 2,000 results/s for a minute
        now[0] = k / 2000.0
        w.add(k % 10 != 0)
    assert w.count() == 120_000 and w.attainment() == pytest.approx(0.9)
    assert len(w._events) <= 60 * w.ticks_per_s + 1  # one entry per tick, not per result
    now[0] = 200.0
    assert w.count() == 0 and len(w._events) == 0


async def test_registries_are_per_instance_and_served_over_http() -> None:
    a, b = WorkerMetrics("w1"), WorkerMetrics("w2")
    a.observe_result(Result(request_id="x", status="ok", output_tokens=11, first_token_at=1.0,
                            finished_at=2.0, met_deadline=True))
    srv_a, srv_b = MetricsServer(a, port=0, host="127.0.0.1"), MetricsServer(b, port=0,
                                                                              host="127.0.0.1")
    await srv_a.start()
    await srv_b.start()
    try:
        sa, sb = parse(await scrape(srv_a.url)), parse(await scrape(srv_b.url))
    finally:
        await srv_a.stop()
        await srv_b.stop()
    assert value(sa, "goodserve_worker_output_tokens_total") == 11
    assert value(sb, "goodserve_worker_output_tokens_total") == 0
    assert value(sa, "goodserve_worker_request_tpot_seconds_count") == 1
    assert value(sa, "goodserve_slo_attainment_window") == 1.0


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_dispatcher_and_monitor_metrics_over_http(kafka_settings: Settings) -> None:
    s = kafka_settings
    await ensure_topics(s)
    workers = [
        WorkerService(settings=s, instance_id=iid, gpu=gpu, model=MODEL, heartbeat_period_s=0.1,
                      metrics_port=0, engine=SimulatedEngine(instance_id=iid, gpu=gpu, model=MODEL,
                                             time_scale=0.05))
        for iid, gpu in (("h100-0", "H100"), ("a40-0", "A40"))
    ]
    disp = DispatcherService(settings=s, metrics_port=0, default_slo_s=30.0)
    mon = MonitorService(settings=s, metrics_port=0)
    n = 12
    for w in workers:
        await w.start()
    await disp.start()
    await mon.start()
    try:
        assert isinstance(disp.metrics, DispatcherMetrics) and disp._metrics_server is not None
        end = time.monotonic() + 20
        while not disp.est.usable(time.time()).all() or len(disp.est) < 2:
            assert time.monotonic() < end, "dispatcher never saw both heartbeats"
            await asyncio.sleep(0.1)
        async with TypedProducer(settings=s) as prod:
            for i in range(n):
                req = AgentRequest(request_id=f"m{i}", model=MODEL, input_tokens=64,
                                   max_tokens=512, slo_s=30.0, arrival=time.time(),
                                   metadata={"sim_output_tokens": str(20 + 5 * i)})
                await prod.send(s.requests_topic, req, key=req.request_id)
            bad = AgentRequest(request_id="bad", model=MODEL, input_tokens=64, max_tokens=0)
            await prod.send(s.requests_topic, bad, key="bad")
        end = time.monotonic() + 60
        while disp.stats.results < n or disp.stats.received < n + 1:  # the bad one too
            assert time.monotonic() < end, f"only {disp.stats.results}/{n} results"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        d = parse(await scrape(disp._metrics_server.url))
        assert mon._metrics_server is not None
        # the monitor plans every period_s (0.5 s): the run may be over before its first round
        end = time.monotonic() + 10
        while True:
            m = parse(await scrape(mon._metrics_server.url))
            if value(m, "goodserve_monitor_rounds_total") >= 1:
                break
            assert time.monotonic() < end, "the monitor never planned a round"
            await asyncio.sleep(0.1)
        ws = []
        for w in workers:
            assert w._metrics_server is not None
            ws.append(parse(await scrape(w._metrics_server.url)))
    finally:
        await mon.stop()
        await disp.stop()
        for w in workers:
            await w.stop()

    assert value(d, "goodserve_dispatcher_requests_received_total") == n + 1
    assert value(d, "goodserve_dispatcher_requests_assigned_total") == n
    assert value(d, "goodserve_dispatcher_requests_rejected_total") == 1
    assert value(d, "goodserve_dispatcher_dead_letters_total") == 1
    assert value(d, "goodserve_dispatcher_results_total") == n
    assert value(d, "goodserve_dispatcher_held_now") == 0
    assert value(d, "goodserve_dispatcher_invalid_reports_total") == 0  # real workers' reports
    # every request met its 30 s deadline: the load pressure fell from its start (0.3)
    assert 0.0 <= value(d, "goodserve_dispatcher_miss_rate") < 0.3
    assert value(d, "goodserve_dispatcher_decision_latency_seconds_count") == n
    assert 0 < value(d, "goodserve_dispatcher_decision_latency_seconds_sum") < n * 0.5
    assigned = sum(v for k, v in d.items()
                   if k[0] == "goodserve_dispatcher_assigned_by_instance_total")
    assert assigned == n
    assert value(d, "goodserve_results_total", status="ok") == n
    assert value(d, "goodserve_slo_attainment_window") == 1.0  # 30 s SLO, tiny requests
    assert value(d, "goodserve_goodput_rps_window") == pytest.approx(n / 60.0)
    assert value(d, "goodserve_prediction_error_tokens_count") == n
    assert value(d, "goodserve_prediction_p90_covered_total") <= n
    assert value(d, "goodserve_request_latency_seconds_count") == n
    for iid, gpu in (("h100-0", "H100"), ("a40-0", "A40")):
        est = value(d, "goodserve_instance_estimated_tpot_seconds", instance=iid, gpu=gpu)
        assert 1e-5 < est < 1.0  # the workers run fast (time_scale): corrections go low
        assert value(d, "goodserve_instance_estimated_queue_seconds", instance=iid,
                     gpu=gpu) >= 0.0
        assert value(d, "goodserve_instance_usable", instance=iid) == 1.0
    assert "goodserve_instance_observed_tpot_seconds" in names(d)
    assert "goodserve_instance_observed_queue_seconds_count" in names(d)
    lags = {k: v for k, v in d.items() if k[0] == "goodserve_consumer_lag_records"}
    assert lags and all(v >= 0 for v in lags.values())
    assert any(dict(k[1])["consumer"] == "requests" for k in lags)
    # the standalone monitor saw the same results
    assert value(m, "goodserve_results_total", status="ok") == n
    assert value(m, "goodserve_monitor_instances") == 2
    assert value(m, "goodserve_monitor_rounds_total") >= 1
    assert value(m, "goodserve_monitor_commands_total") == 0
    # and the workers: results, tokens, heartbeats
    assert sum(value(w, "goodserve_worker_finished_total", status="ok") for w in ws
               if ("goodserve_worker_finished_total", (("status", "ok"),)) in w) == n
    assert sum(value(w, "goodserve_worker_output_tokens_total") for w in ws) == sum(
        20 + 5 * i for i in range(n))
    assert all(value(w, "goodserve_worker_heartbeats_total") >= 3 for w in ws)
    assert sum(value(w, "goodserve_worker_request_tpot_seconds_count") for w in ws) == n
