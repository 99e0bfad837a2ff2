"""A chaos cluster: an Apache Kafka broker (owned or external) plus service processes."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from goodserve.broker.apache import ApacheKafkaBroker
from goodserve.config import Settings
from goodserve.schemas import AgentRequest
from goodserve.transport import ensure_topics, instance_topic_spec, kafka_client_kwargs
from goodserve.transport.topics import standard_topics

from .load import CountingClient, make_request
from .procs import ServiceProc, dispatcher_proc, monitor_proc, worker_proc

FLEET: tuple[tuple[str, str], ...] = (("w-h100", "H100"), ("w-a100", "A100"), ("w-l40s", "L40S"))


@dataclass
class Cluster:
    """Broker + dispatcher + monitor + simulated workers, each its own OS process."""

    settings: Settings
    workdir: Path
    broker: ApacheKafkaBroker | None = None
    fleet: tuple[tuple[str, str], ...] = FLEET
    time_scale: float = 0.01
    heartbeat_s: float = 0.2
    stale_after_s: float = 2.0
    max_prompt_chars: int | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    procs: dict[str, ServiceProc] = field(default_factory=dict)
    client: CountingClient | None = None

    @classmethod
    async def create(cls, *, bootstrap: str | None = None, workdir: str | Path | None = None,
                     settings: Settings | None = None, broker: ApacheKafkaBroker | None = None,
                     **kw: Any) -> Cluster:
        """Start a private broker unless ``broker``, ``bootstrap`` or ``settings`` names one."""
        wd = Path(workdir or tempfile.mkdtemp(prefix="goodserve-chaos-"))
        await asyncio.to_thread(wd.mkdir, parents=True, exist_ok=True)
        if settings is None:
            session_ms = 6000  # the broker's default group.min.session.timeout.ms
            if broker is not None:
                await broker.astart()  # no-op when running
                bootstrap = broker.bootstrap_servers
                props = broker.server_properties()
                if int(props.get("group.min.session.timeout.ms", "6000")) <= 3000:
                    session_ms = 3000
            elif bootstrap is None:
                # our own broker lets a killed group member expire sooner (3 s)
                broker = ApacheKafkaBroker(workdir=wd / "kafka", extra_config={
                    "group.min.session.timeout.ms": "2000"})
                await broker.astart()
                bootstrap = broker.bootstrap_servers
                session_ms = 3000
            settings = Settings(bootstrap_servers=bootstrap,
                                topic_prefix=f"chaos-{uuid.uuid4().hex[:8]}", partitions=4,
                                session_timeout_ms=session_ms,
                                heartbeat_interval_ms=session_ms // 6)
        return cls(settings=settings, workdir=wd, broker=broker, **kw)

    # --- processes -------------------------------------------------------------------------
    def build(self) -> None:
        logs = self.workdir / "logs"
        env = dict(self.extra_env)
        self.procs["dispatcher"] = dispatcher_proc(
            self.settings, logs, stale_after_s=self.stale_after_s,
            max_prompt_chars=self.max_prompt_chars, extra_env=env)
        self.procs["monitor"] = monitor_proc(self.settings, logs, extra_env=env)
        for iid, gpu in self.fleet:
            self.procs[iid] = worker_proc(self.settings, logs, iid, gpu,
                                          time_scale=self.time_scale,
                                          heartbeat_s=self.heartbeat_s, extra_env=env)

    @property
    def workers(self) -> list[ServiceProc]:
        return [self.procs[iid] for iid, _ in self.fleet]

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s, [*standard_topics(s),
                                *(instance_topic_spec(s, iid) for iid, _ in self.fleet)])
        if not self.procs:
            self.build()
        for p in self.procs.values():
            p.start()

    def pids(self) -> dict[str, int | None]:
        return {n: p.pid for n, p in self.procs.items()}

    def rss(self) -> dict[str, int]:
        return {n: p.rss() for n, p in self.procs.items()}

    def alive(self) -> dict[str, bool]:
        return {n: p.alive for n, p in self.procs.items()}

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in self.procs.values()))
        if self.broker is not None:
            await self.broker.astop()

    # --- warm-up and observation -----------------------------------------------------------
    async def warm_up(self, client: CountingClient, *, timeout_s: float = 90.0) -> float:
        """Send one probe request per second until one is served: every service is up."""
        import random

        rng = random.Random(7)
        t0 = time.monotonic()
        n = 0
        probes: list[str] = []
        while time.monotonic() - t0 < timeout_s:
            probe = make_request(n, rng, prefix=f"warmup-{uuid.uuid4().hex[:6]}")
            n += 1
            await client.submit(probe)
            probes.append(probe.request_id)
            for _ in range(10):
                if any(p in client.statuses for p in probes):
                    return time.monotonic() - t0
                await asyncio.sleep(0.1)
        raise TimeoutError(f"the cluster served no request within {timeout_s}s; logs in "
                           f"{self.workdir / 'logs'}")

    def log_events(self, name: str) -> Counter[str]:
        """Counts of structlog events in a service's log (JSON lines)."""
        out: Counter[str] = Counter()
        proc = self.procs.get(name) or next(p for p in self.procs.values() if p.name == name)
        for line in proc.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line).get("event")
            except json.JSONDecodeError:
                continue
            if isinstance(ev, str):
                out[ev] += 1
        return out

    async def wait_started(self, proc: ServiceProc, timeout_s: float = 60.0) -> float:
        """Wait until the latest incarnation of ``proc`` logged its ``*.started`` event."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            text = proc.log_text()
            tail = text[text.rfind("--- start "):]
            if '.started"' in tail:
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        return time.monotonic() - t0

    def count_lines(self, name: str, *needles: str) -> int:
        proc = self.procs.get(name) or next(p for p in self.procs.values() if p.name == name)
        return sum(1 for ln in proc.log_text().splitlines() if all(n in ln for n in needles))

    def all_logs(self) -> str:
        return "\n".join(p.log_text() for p in self.procs.values())


async def committed_total(settings: Settings, group_id: str = "goodserve-dispatcher") -> int:
    """Sum of the group's committed offsets on the requests topic (grows while it routes)."""
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings, role="admin"))
    try:
        await admin.start()
        committed = await admin.list_consumer_group_offsets(group_id)
        return sum(max(0, md.offset) for tp, md in committed.items()
                   if tp.topic == settings.requests_topic)
    finally:
        await admin.close()


async def requests_lag(settings: Settings, group_id: str = "goodserve-dispatcher") -> int:
    """Records of the requests topic not yet committed by the dispatcher group (the backlog)."""
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings, role="admin"))
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings, role="consumer"),
                                group_id=None, enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
        parts = consumer.partitions_for_topic(settings.requests_topic) or set()
        tps = [TopicPartition(settings.requests_topic, p) for p in parts]
        if not tps:
            await consumer.topics()
            parts = consumer.partitions_for_topic(settings.requests_topic) or set()
            tps = [TopicPartition(settings.requests_topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        lag = 0
        for tp in tps:
            md = committed.get(tp)
            off = md.offset if md is not None and md.offset >= 0 else 0
            lag += max(0, ends[tp] - off)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


def valid_request(i: int, prefix: str) -> AgentRequest:
    import random

    return make_request(i, random.Random(i), prefix=prefix)
