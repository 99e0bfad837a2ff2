"""The standalone risk monitor: heartbeats, decisions and results in; migration commands out.

Runs the same ``RiskMonitor`` the dispatcher can run in process. It rebuilds the
fleet's state from the topics alone: instances from heartbeats, placements from
the decision log, completions from results; every ``period_s`` it plans
migrations and sends each command to the source instance's topic (and to the
``migrations`` audit topic).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.validation import report_problem
from goodserve.monitor.risk import MonitorConfig, RiskMonitor
from goodserve.schemas import Decision, Heartbeat, MigrationCommand, Result

from goodserve.config import Settings
from goodserve.errors import ConfigError, InvalidReport
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.metrics import MetricsServer, MonitorMetrics
from goodserve.transport.consumer import TypedConsumer
from goodserve.transport.deadletter import DeadLetterSink
from goodserve.transport.producer import TypedProducer
from goodserve.transport.topics import ensure_topics, instance_topic_spec, standard_topics

log = get_logger("goodserve.monitor")


class MonitorService(AsyncService):
    """Plans and commands migrations for requests at risk of missing their deadlines."""

    def __init__(self, *, settings: Settings, config: MonitorConfig | None = None,
                 stale_after_s: float = 3.0, metrics_port: int | None = None) -> None:
        cfg = config or MonitorConfig()
        if cfg.period_s <= 0:
            raise ConfigError(f"period_s must be > 0, got {cfg.period_s}")
        if not 0.0 < cfg.risk_threshold <= 1.0:
            raise ConfigError(f"risk_threshold must be in (0, 1], got {cfg.risk_threshold}")
        self.settings = settings
        self.monitor = RiskMonitor(cfg)
        self.est = FleetEstimator(stale_after_s=stale_after_s, require_heartbeat=True)
        self.deadlines: dict[str, float] = {}
        self.commands = 0
        self.metrics = MonitorMetrics(self)
        self._metrics_server = (MetricsServer(self.metrics, port=metrics_port)
                                if metrics_port is not None else None)
        self._producer: TypedProducer | None = None
        self._consumer: TypedConsumer[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        s = self.settings
        await ensure_topics(s, standard_topics(s))
        self._producer = TypedProducer(settings=s, client_id=f"{s.client_id}-monitor")
        await self._producer.start()
        self._consumer = TypedConsumer(
            settings=s, topics=[s.heartbeats_topic, s.decisions_topic, s.results_topic],
            group_id=None, service="monitor", auto_offset_reset="latest", poll_timeout_ms=50,
            dead_letters=DeadLetterSink(settings=s, service="monitor", producer=self._producer),
        )
        await self._consumer.start()
        self._tasks = [asyncio.create_task(self._consume(), name="monitor-consume"),
                       asyncio.create_task(self._plan_loop(), name="monitor-plan")]
        if self._metrics_server is not None:
            await self._metrics_server.start()
        log.info("monitor.started", period_s=self.monitor.config.period_s,
                 risk_threshold=self.monitor.config.risk_threshold)

    async def stop(self) -> None:
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        log.info("monitor.stopped", commands=self.commands)

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()

    def observe(self, msg: Any, now: float | None = None) -> InvalidReport | None:
        """Fold one message into the fleet state (no I/O); a heartbeat with impossible
        numbers is not used but returned as the error to dead-letter it with."""
        now = time.time() if now is None else now
        if isinstance(msg, Heartbeat):
            problem = report_problem(msg)
            if problem is not None:
                log.warning("monitor.invalid_report", error=problem, instance_id=msg.instance_id)
                return InvalidReport(problem)
            self.est.on_heartbeat(msg, now=now)
        elif isinstance(msg, Decision) and msg.chosen is not None:
            inst = next((v for v in msg.instances if v.instance_id == msg.chosen), None)
            if msg.chosen not in self.est.index:
                self.est.add_instance(msg.chosen, gpu=inst.gpu if inst else "A100",
                                      model=inst.model if inst else "llama-2-7b",
                                      alive=False)
            self.est.on_assign(msg.chosen, request_id=msg.request_id,
                               input_tokens=msg.input_tokens,
                               planned_tokens=msg.planned_output_tokens, deadline=msg.deadline,
                               now=msg.at, p50=msg.predicted_output_p50,
                               p90=msg.predicted_output_p90)
        elif isinstance(msg, Result):
            self.est.on_finish(msg.request_id, now=now)
            self.metrics.observe_result(msg)
        return None

    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            try:
                for env in await self._consumer.getmany(timeout_ms=50):
                    invalid = self.observe(env.msg)
                    if invalid is not None:
                        await self._consumer.dead_letter(env, invalid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("monitor.consume_error")
                await asyncio.sleep(0.2)

    async def _plan_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.monitor.config.period_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("monitor.round_error")

    async def round(self) -> int:
        """Plan once and send the commands; returns how many were sent."""
        assert self._producer is not None
        now = time.time()
        t0 = time.perf_counter()
        plans = self.monitor.plan(self.est, now)
        for plan in plans:
            tr = self.est.requests.get(plan.request_id)
            cmd = MigrationCommand(migration_id=uuid.uuid4().hex, request_id=plan.request_id,
                                   source=plan.source, target=plan.target, at=now,
                                   reason=plan.reason, risk=plan.risk,
                                   deadline=tr.deadline if tr else 0.0)
            await ensure_topics(self.settings, [instance_topic_spec(self.settings, plan.target)])
            await self._producer.send(self.settings.instance_topic(plan.source), cmd,
                                      key=plan.request_id)
            await self._producer.send(self.settings.migrations_topic, cmd, key=plan.request_id)
            self.monitor.record(plan)
            self.est.move(plan.request_id, plan.target, now=now,
                          remaining_tokens=plan.remaining_tokens)
            self.commands += 1
            log.info("monitor.migration", request_id=plan.request_id, source=plan.source,
                     target=plan.target, risk=round(plan.risk, 3), reason=plan.reason)
        self.metrics.observe_round(time.perf_counter() - t0, plans)
        return len(plans)
