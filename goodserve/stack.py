"""The whole GoodServe stack in one process: dispatcher(s), one worker per fleet instance,
and optionally the OpenAI-compatible gateway.

Used by ``goodserve demo``, ``goodserve up`` and the end-to-end tests. Each
instance of the fleet without an ``endpoint`` becomes a ``WorkerService`` over a
real-time ``SimulatedEngine`` of its GPU type; one with an ``endpoint`` becomes a
``WorkerService`` over an ``OpenAIEngine`` forwarding to that server (its ``model`` is the
served model name; its ``gpu`` seeds the dispatcher's estimates, which then learn from
what the instance does). The dispatcher (with its risk monitor) routes with the chosen
policy. Everything talks through the broker in ``settings``: nothing is shortcut in memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

from goodserve.config import Settings
from goodserve.dispatcher.service import DispatcherService
from goodserve.errors import ConfigError
from goodserve.gateway import GatewayConfig, GatewayService
from goodserve.lifecycle import AsyncService
from goodserve.sim.fleet import Fleet
from goodserve.transport.producer import TypedProducer
from goodserve.transport.topics import ensure_topics, instance_topic_spec, standard_topics
from goodserve.workers.engine import Engine
from goodserve.workers.engines.openai import OpenAIEngine
from goodserve.workers.engines.simulated import SimulatedEngine
from goodserve.workers.node_consumer import NodeConsumer
from goodserve.workers.service import WorkerService


class LocalStack(AsyncService):
    """Dispatcher replicas and one worker per fleet instance, started and stopped together."""

    def __init__(
        self,
        *,
        settings: Settings,
        fleet: Fleet,
        policy: str = "goodserve",
        policy_overrides: dict[str, Any] | None = None,
        predictor: Any = None,
        dispatchers: int = 1,
        monitor: bool = True,
        time_scale: float = 1.0,
        heartbeat_period_s: float = 0.25,
        default_slo_s: float = 30.0,
        stale_after_s: float = 3.0,
        metrics_port: int | None = None,
        gateway: GatewayConfig | None = None,
        max_tokens_bound: bool = True,
        endpoint_api_key: str | None = None,
        shared_worker_producer: bool = False,
        shared_worker_consumer: bool = False,
        decision_views_every: int = 1,
    ) -> None:
        if dispatchers < 1:
            raise ConfigError(f"dispatchers must be >= 1, got {dispatchers}")
        if not fleet.instances:
            raise ConfigError("the fleet has no instances")
        self.settings = settings
        self.fleet = fleet
        self.workers: list[WorkerService] = []
        # one producer for all the workers (as one worker process on a multi-GPU node would)
        self.worker_producer = (
            TypedProducer(settings=settings, client_id=f"{settings.client_id}-workers")
            if shared_worker_producer else None
        )
        # one consumer for all the workers' topics (the node's), likewise
        self.worker_consumer = (
            NodeConsumer(settings=settings, node=f"{settings.topic_prefix}-local",
                         instance_ids=[i.id for i in fleet.instances],
                         producer=self.worker_producer)
            if shared_worker_consumer else None
        )
        for inst in fleet.instances:
            engine: Engine
            if inst.endpoint is None:
                engine = SimulatedEngine(
                    instance_id=inst.id,
                    gpu=inst.gpu,
                    model=fleet.model_of(inst),
                    time_scale=time_scale,
                    speed_factor=inst.speed_factor,
                    max_batch=inst.max_batch or 256,
                )
            else:
                engine = OpenAIEngine(
                    endpoint=inst.endpoint,
                    model=fleet.model_of(inst),
                    instance_id=inst.id,
                    api_key=endpoint_api_key,
                    max_batch=inst.max_batch or 256,
                )
            self.workers.append(
                WorkerService(
                    settings=settings,
                    instance_id=inst.id,
                    gpu=inst.gpu,
                    model=fleet.model_of(inst),
                    heartbeat_period_s=heartbeat_period_s,
                    engine=engine,
                    producer=self.worker_producer,
                    node_consumer=self.worker_consumer,
                )
            )
        self.dispatchers = [
            DispatcherService(
                settings=settings,
                policy=policy,
                policy_overrides=policy_overrides,
                predictor=predictor,
                fleet=fleet,
                monitor=monitor,
                default_slo_s=default_slo_s,
                stale_after_s=stale_after_s,
                seed=k,
                metrics_port=(metrics_port + k) if metrics_port else None,
                max_tokens_bound=max_tokens_bound,
                decision_views_every=decision_views_every,
            )
            for k in range(dispatchers)
        ]
        self.gateway = (GatewayService(settings=settings, config=gateway)
                        if gateway is not None else None)
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        s = self.settings
        await ensure_topics(
            s, [*standard_topics(s), *(instance_topic_spec(s, i.id) for i in self.fleet.instances)]
        )
        if self.worker_producer is not None:
            await self.worker_producer.start()
        if self.worker_consumer is not None:
            await self.worker_consumer.start()
        await asyncio.gather(*(w.start() for w in self.workers))
        await asyncio.gather(*(d.start() for d in self.dispatchers))
        if self.gateway is not None:
            await self.gateway.start()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.gateway is not None:
            await self.gateway.stop()
        await asyncio.gather(*(d.stop() for d in self.dispatchers), return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        if self.worker_consumer is not None:
            await self.worker_consumer.stop()
        if self.worker_producer is not None:
            await self.worker_producer.stop()

