"""Prometheus metrics of the services, each on its own registry, served at ``/metrics``.

Every service instance owns a ``CollectorRegistry`` (never the process-global default)
so that several dispatchers, monitors and workers can live in one process (tests, the
demo) without clashing series. Counters that the services already keep in their stats
objects are read at scrape time by a collector (no double bookkeeping on the hot path);
histograms, per-instance gauges and sliding windows are fed by small ``observe_*`` calls.
``MetricsServer`` serves a registry over aiohttp on the service's event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from goodserve.logging import get_logger

log = get_logger("goodserve.metrics")

DEFAULT_WINDOW_S = 60.0
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1)
ERROR_BUCKETS = (-2048, -1024, -512, -256, -128, -64, -32, -16, -8, 0,
                 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)

ScrapeHook = Callable[[], Awaitable[None]]


class SlidingWindow:
    """Outcomes (time, met) of the last ``window_s`` seconds: SLO attainment and goodput.

    Outcomes are counted per tick (``1 / ticks_per_s`` seconds): the deque holds one
    ``[tick, finished, met]`` entry per tick that saw a result, so its length is bounded by
    ``window_s * ticks_per_s`` (600 for a minute) whatever the rate, instead of one tuple a
    result (30,000 of them at 500 results/s). A tick leaves the window once all of
    it is older than ``window_s``.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
        ticks_per_s: int = 10,
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self.ticks_per_s = ticks_per_s
        self._events: deque[list[int]] = deque()  # [tick, finished, met]
        self._n = 0
        self._met = 0

    def add(self, met: bool, at: float | None = None) -> None:
        tick = math.floor((self.clock() if at is None else at) * self.ticks_per_s)
        ev = self._events
        if ev and ev[-1][0] == tick:
            last = ev[-1]
            last[1] += 1
            last[2] += met
        else:
            ev.append([tick, 1, int(met)])
        self._n += 1
        self._met += met
        self._trim()

    def _trim(self) -> None:
        # a tick [k, k+1) / ticks_per_s is gone once its end is at or before the cut
        cut = (self.clock() - self.window_s) * self.ticks_per_s
        ev = self._events
        while ev and ev[0][0] + 1 <= cut:
            _, n, met = ev.popleft()
            self._n -= n
            self._met -= met

    def attainment(self) -> float:
        """Fraction of the window's finished requests that met their deadline (NaN: none)."""
        self._trim()
        return self._met / self._n if self._n else float("nan")

    def goodput(self) -> float:
        """Requests per second that met their deadline, over the window."""
        self._trim()
        return self._met / self.window_s

    def count(self) -> int:
        self._trim()
        return self._n


class _StatsCollector(Collector):
    """Exposes counters a service already keeps (read at scrape time)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from self._read()


class ServiceMetrics:
    """A registry plus what every service has: consumer lag and scrape hooks."""

    def __init__(self, service: str, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.window = SlidingWindow(window_s)
        self.hooks: list[ScrapeHook] = []
        self.consumer_lag = Gauge(
            "goodserve_consumer_lag_records",
            "Records between a consumer's position and the partition's high watermark",
            ["consumer", "topic", "partition"], registry=self.registry)

    def track_lag(self, name: str, consumer_of: Callable[[], Any]) -> None:
        """Refresh the lag of a TypedConsumer (``consumer_of()``) before each scrape."""

        async def refresh() -> None:
            await update_consumer_lag(self.consumer_lag, name, consumer_of())

        self.hooks.append(refresh)

    async def refresh(self) -> None:
        for hook in self.hooks:
            try:
                await hook()
            except Exception as e:  # a failing hook must not break the scrape
                log.debug("metrics.hook_failed", service=self.service, error=str(e))

    def scrape(self) -> bytes:
        """The registry in the Prometheus text format (without running the hooks)."""
        return generate_latest(self.registry)


async def update_consumer_lag(gauge: Gauge, name: str, typed_consumer: Any) -> None:
    """Lag per assigned partition = high watermark (last fetch) - current position.

    Reads the aiokafka consumer inside a ``TypedConsumer``; the high watermark is the
    one the broker reported with the last fetch, so lag is as fresh as the last poll.
    """
    c = getattr(typed_consumer, "_consumer", None) if typed_consumer is not None else None
    if c is None:
        return
    for tp in c.assignment():
        hw = c.highwater(tp)
        if hw is None:
            continue
        try:
            pos = await asyncio.wait_for(c.position(tp), 0.5)
        except Exception:
            continue
        gauge.labels(name, tp.topic, str(tp.partition)).set(max(hw - pos, 0))


# ---------------------------------------------------------------------------- dispatcher
class DispatcherMetrics(ServiceMetrics):
    """Series of a DispatcherService (see docs/observability.md)."""

    def __init__(self, service: Any, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        super().__init__("dispatcher", window_s=window_s)
        self._svc = service
        r = self.registry
        r.register(_StatsCollector(self._read_stats))
        self.decision_latency = Histogram(
            "goodserve_dispatcher_decision_latency_seconds",
            "Time to route one request (predict + estimate + select)",
            buckets=DECISION_BUCKETS, registry=r)
        self.encoder_latency = Histogram(
            "goodserve_dispatcher_encoder_seconds",
            "The predictor's encoder tier: time to embed a poll's new prompts (off the loop)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        self.assigned_to = Counter(
            "goodserve_dispatcher_assigned_by_instance",
            "Requests assigned, by instance", ["instance"], registry=r)
        self.results = Counter("goodserve_results", "Results seen, by status", ["status"],
                               registry=r)
        self.prediction_error = Histogram(
            "goodserve_prediction_error_tokens",
            "Actual output tokens minus the predicted P50 (positive: ran longer)",
            buckets=ERROR_BUCKETS, registry=r)
        self.p90_covered = Counter(
            "goodserve_prediction_p90_covered",
            "Finished requests whose actual length was <= the predicted P90", registry=r)
        self.latency = Histogram(
            "goodserve_request_latency_seconds", "Arrival to finish of finished requests",
            buckets=LATENCY_BUCKETS, registry=r)
        self.slack = Histogram(
            "goodserve_request_slack_seconds", "Deadline minus finish time (negative: late)",
            buckets=(-30, -10, -5, -2, -1, 0, 1, 2, 5, 10, 30, 60), registry=r)
        self.migration_outcome = Counter(
            "goodserve_migrated_requests", "Finished requests that were migrated, by outcome",
            ["outcome"], registry=r)
        self.observed_queue = Histogram(
            "goodserve_instance_observed_queue_seconds",
            "Dispatch to first token, per instance (from results)", ["instance"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.observed_tpot_hist = Histogram(
            "goodserve_instance_observed_request_tpot_seconds",
            "Per-request time per output token, per instance (from results)", ["instance"],
            buckets=TPOT_BUCKETS, registry=r)
        self.est_tpot = Gauge("goodserve_instance_estimated_tpot_seconds",
                              "Estimator's TPOT at the instance's current batch",
                              ["instance", "gpu"], registry=r)
        self.est_queue = Gauge("goodserve_instance_estimated_queue_seconds",
                               "Estimator's queueing delay for a new request",
                               ["instance", "gpu"], registry=r)
        self.obs_tpot = Gauge("goodserve_instance_observed_tpot_seconds",
                              "TPOT reported by the instance's last heartbeat",
                              ["instance", "gpu"], registry=r)
        self.inst_running = Gauge("goodserve_instance_running",
                                  "Running requests (last heartbeat)", ["instance"], registry=r)
        self.inst_waiting = Gauge("goodserve_instance_waiting",
                                  "Waiting requests (last heartbeat)", ["instance"], registry=r)
        self.inst_alive = Gauge("goodserve_instance_usable",
                                "1 when the instance may take work", ["instance"], registry=r)
        att = Gauge("goodserve_slo_attainment_window",
                    f"Fraction of results in the last {window_s:g}s that met the deadline",
                    registry=r)
        att.set_function(self.window.attainment)
        gp = Gauge("goodserve_goodput_rps_window",
                   f"Results meeting the deadline per second over the last {window_s:g}s",
                   registry=r)
        gp.set_function(self.window.goodput)
        self.hooks.append(self._refresh_instances)
        self.track_lag("requests", lambda: getattr(service, "_requests", None))
        self.track_lag("fleet", lambda: getattr(service, "_fleet_consumer", None))

    def _read_stats(self) -> Iterator[Metric]:
        # also called once at registration (auto_describe), before the service is complete
        s = self._svc.stats
        for name, doc, val in (
            ("goodserve_dispatcher_requests_received", "Requests consumed", s.received),
            ("goodserve_dispatcher_requests_assigned", "Requests assigned", s.assigned),
            ("goodserve_dispatcher_requests_rejected", "Requests rejected", s.rejected),
            ("goodserve_dispatcher_dead_letters", "Records dead-lettered", s.dead_lettered),
            ("goodserve_dispatcher_requests_held", "Requests ever held", s.held),
            ("goodserve_dispatcher_results", "Results of assigned requests", s.results),
            ("goodserve_dispatcher_results_met", "Results that met the deadline", s.met),
            ("goodserve_dispatcher_migrations", "Migrations commanded", s.migrations),
            ("goodserve_dispatcher_reissued", "Requests re-dispatched from dead instances",
             s.reissued),
            ("goodserve_dispatcher_decisions_too_large",
             "Decision records sent without the instances' views (too large with them)",
             s.decisions_too_large),
            ("goodserve_dispatcher_invalid_reports",
             "Heartbeats and Results with impossible numbers, dead-lettered, not learnt from",
             s.invalid_reports),
        ):
            yield CounterMetricFamily(name, doc, value=val)
        yield GaugeMetricFamily("goodserve_dispatcher_held_now", "Requests held right now",
                                value=len(getattr(self._svc, "held", ())))
        yield GaugeMetricFamily("goodserve_dispatcher_tracked_requests",
                                "Assigned requests without a result yet",
                                value=len(getattr(self._svc, "assignments", {})))
        est = getattr(self._svc, "est", None)
        if est is not None:
            yield GaugeMetricFamily(
                "goodserve_dispatcher_miss_rate",
                "Share of recent requests that missed their deadline (the load pressure the "
                "goodserve policy acts on from 5%)", value=float(est.miss_rate))

    async def _refresh_instances(self) -> None:
        est = self._svc.est
        if not len(est):
            return
        import numpy as np

        now = time.time()
        active = est.active()
        tpot = est.tpot(np.minimum(np.maximum(active, 1.0), est.max_batch))
        queue = est.queue_delay(active + 1.0)
        usable = est.usable(now)
        for i, info in enumerate(est.infos):
            self.est_tpot.labels(info.instance_id, info.gpu).set(float(tpot[i]))
            self.est_queue.labels(info.instance_id, info.gpu).set(float(queue[i]))
            self.inst_alive.labels(info.instance_id).set(float(usable[i]))

    # hot-path hooks ----------------------------------------------------------------
    def observe_decision(self, seconds: float, instance_id: str | None) -> None:
        self.decision_latency.observe(seconds)
        if instance_id is not None:
            self.assigned_to.labels(instance_id).inc()

    def observe_heartbeat(self, hb: Any) -> None:
        self.inst_running.labels(hb.instance_id).set(hb.running)
        self.inst_waiting.labels(hb.instance_id).set(hb.waiting)
        if hb.tpot_s > 0:
            self.obs_tpot.labels(hb.instance_id, hb.gpu).set(hb.tpot_s)

    def observe_result(self, r: Any, predicted_p50: float | None = None,
                       predicted_p90: float | None = None) -> None:
        """Fold one Result in (its Assignment's predictions, when known)."""
        observe_result(self, r, predicted_p50, predicted_p90)


def observe_result(m: DispatcherMetrics, r: Any, p50: float | None, p90: float | None) -> None:
    m.results.labels(r.status).inc()
    if r.status == "rejected":
        return
    m.window.add(bool(r.met_deadline))
    if r.status != "ok":
        return
    if p50 is None and r.predicted_output_tokens is not None:
        p50 = float(r.predicted_output_tokens)
    if p50 is not None:
        m.prediction_error.observe(r.output_tokens - p50)
    if p90 is not None and r.output_tokens <= p90:
        m.p90_covered.inc()
    if r.finished_at is not None and r.arrival is not None:
        m.latency.observe(max(r.finished_at - r.arrival, 0.0))
    if r.finished_at is not None and r.deadline is not None:
        m.slack.observe(r.deadline - r.finished_at)
    if r.migrations:
        m.migration_outcome.labels("met" if r.met_deadline else "missed").inc()
    inst = r.instance_id or "unknown"
    if r.first_token_at is not None and r.dispatched_at is not None and not r.migrations:
        m.observed_queue.labels(inst).observe(max(r.first_token_at - r.dispatched_at, 0.0))
    if (r.first_token_at is not None and r.finished_at is not None and r.output_tokens > 1
            and not r.migrations):
        m.observed_tpot_hist.labels(inst).observe(
            (r.finished_at - r.first_token_at) / (r.output_tokens - 1))


# ---------------------------------------------------------------------------- monitor
class MonitorMetrics(ServiceMetrics):
    """Series of a standalone MonitorService."""

    def __init__(self, service: Any, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        super().__init__("monitor", window_s=window_s)
        self._svc = service
        r = self.registry
        r.register(_StatsCollector(self._read))
        self.rounds = Counter("goodserve_monitor_rounds", "Planning rounds", registry=r)
        self.round_latency = Histogram("goodserve_monitor_round_seconds",
                                       "Time of one planning round (plan + send)",
                                       buckets=(*DECISION_BUCKETS, 0.5, 1.0), registry=r)
        self.migrations = Counter("goodserve_monitor_migrations",
                                  "Migrations commanded, by source and target instance",
                                  ["source", "target"], registry=r)
        self.risk = Histogram("goodserve_monitor_migration_risk",
                              "Estimated miss probability of migrated requests",
                              buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                              registry=r)
        self.results = Counter("goodserve_results", "Results seen, by status", ["status"],
                               registry=r)
        att = Gauge("goodserve_slo_attainment_window",
                    f"Fraction of results in the last {window_s:g}s that met the deadline",
                    registry=r)
        att.set_function(self.window.attainment)
        gp = Gauge("goodserve_goodput_rps_window",
                   f"Results meeting the deadline per second over the last {window_s:g}s",
                   registry=r)
        gp.set_function(self.window.goodput)
        self.track_lag("monitor", lambda: getattr(service, "_consumer", None))

    def _read(self) -> Iterator[Metric]:
        yield CounterMetricFamily("goodserve_monitor_commands", "Migration commands sent",
                                  value=getattr(self._svc, "commands", 0))
        est = getattr(self._svc, "est", None)
        yield GaugeMetricFamily("goodserve_monitor_tracked_requests",
                                "Requests the monitor is tracking",
                                value=len(est.requests) if est is not None else 0)
        yield GaugeMetricFamily("goodserve_monitor_instances", "Instances known",
                                value=len(est) if est is not None else 0)

    def observe_result(self, r: Any) -> None:
        self.results.labels(r.status).inc()
        if r.status != "rejected":
            self.window.add(bool(r.met_deadline))

    def observe_round(self, seconds: float, plans: Iterable[Any]) -> None:
        self.rounds.inc()
        self.round_latency.observe(seconds)
        for p in plans:
            self.migrations.labels(p.source, p.target).inc()
            self.risk.observe(p.risk)


# ---------------------------------------------------------------------------- worker
class WorkerMetrics(ServiceMetrics):
    """Series of a WorkerService (one instance)."""

    def __init__(self, instance_id: str, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        super().__init__("worker", window_s=window_s)
        r = self.registry
        self.instance_id = instance_id
        self.running = Gauge("goodserve_worker_running", "Requests running on the engine",
                             registry=r)
        self.waiting = Gauge("goodserve_worker_waiting", "Requests waiting in the engine",
                             registry=r)
        self.finished = Counter("goodserve_worker_finished", "Results produced, by status",
                                ["status"], registry=r)
        self.tokens = Counter("goodserve_worker_output_tokens", "Output tokens generated",
                              registry=r)
        self.tpot = Histogram("goodserve_worker_request_tpot_seconds",
                              "Per-request time per output token", buckets=TPOT_BUCKETS,
                              registry=r)
        self.heartbeats = Counter("goodserve_worker_heartbeats", "Heartbeats sent", registry=r)
        self.checkpoints = Counter("goodserve_worker_checkpoints",
                                   "Requests checkpointed for migration", registry=r)
        att = Gauge("goodserve_slo_attainment_window",
                    f"Fraction of this worker's results in the last {window_s:g}s on time",
                    registry=r)
        att.set_function(self.window.attainment)

    def observe_heartbeat(self, hb: Any) -> None:
        self.heartbeats.inc()
        self.running.set(hb.running)
        self.waiting.set(hb.waiting)

    def observe_result(self, r: Any) -> None:
        self.finished.labels(r.status).inc()
        self.tokens.inc(max(r.output_tokens, 0))
        if r.status == "ok":
            self.window.add(bool(r.met_deadline))
        if r.first_token_at is not None and r.finished_at is not None and r.output_tokens > 1:
            self.tpot.observe((r.finished_at - r.first_token_at) / (r.output_tokens - 1))


# ---------------------------------------------------------------------------- HTTP
class MetricsServer:
    """``GET /metrics`` for one ServiceMetrics on the running event loop (aiohttp)."""

    def __init__(self, metrics: ServiceMetrics, *, port: int, host: str = "0.0.0.0") -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        if self._runner is not None:
            return

        async def handle(_request: web.Request) -> web.Response:
            await self.metrics.refresh()
            body = self.metrics.scrape()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        addrs = runner.addresses
        if self.port == 0 and addrs:
            self.port = int(addrs[0][1])
        log.info("metrics.listening", service=self.metrics.service, host=self.host,
                 port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/metrics"
