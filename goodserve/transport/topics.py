"""Topic layout and idempotent creation through the Kafka admin API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from goodserve.config import DEFAULT_MAX_RECORD_BYTES, RECORD_OVERHEAD_BYTES, Settings
from goodserve.errors import ConfigError, TransportError
from goodserve.logging import get_logger

from .kafka import kafka_client_kwargs, kafka_errors

log = get_logger(__name__)

_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)


def record_size_configs(settings: Settings) -> dict[str, str]:
    """Topic configs for ``settings.max_record_bytes`` above Kafka's default: the broker
    would refuse the records otherwise (``MessageSizeTooLarge``)."""
    if settings.max_record_bytes <= DEFAULT_MAX_RECORD_BYTES:
        return {}
    return {"max.message.bytes": str(settings.max_record_bytes + RECORD_OVERHEAD_BYTES)}


def standard_topics(settings: Settings) -> list[TopicSpec]:
    """The shared topics every deployment needs (instance topics are created per instance).

    Requests and results are keyed by request id, decisions by request id, heartbeats by
    instance id, migrations and checkpoints by request id: one key, one partition, in order.
    """
    p = settings.partitions
    return [
        TopicSpec(settings.requests_topic, p),
        TopicSpec(settings.results_topic, p),
        TopicSpec(settings.decisions_topic, p),
        TopicSpec(settings.heartbeats_topic, p),
        TopicSpec(settings.migrations_topic, p),
        TopicSpec(settings.checkpoints_topic, p),
        TopicSpec(settings.dead_letters_topic, 1),
    ]


def instance_topic_spec(settings: Settings, instance_id: str) -> TopicSpec:
    """One partition: a worker reads its assignments in dispatch order."""
    return TopicSpec(settings.instance_topic(instance_id), 1)


async def ensure_topics(
    settings: Settings,
    names: Iterable[str | TopicSpec] | None = None,
    *,
    partitions: int | None = None,
    timeout_ms: int = 30000,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    ``names=None`` means ``standard_topics(settings)``. Plain names get ``partitions``
    (default ``settings.partitions``). Existing topics are left as they are. New ones get
    ``record_size_configs(settings)`` under their own configs.
    """
    specs = [
        s if isinstance(s, TopicSpec) else TopicSpec(s, partitions or settings.partitions)
        for s in (standard_topics(settings) if names is None else names)
    ]
    if any(s.partitions < 1 for s in specs):
        raise ConfigError("partitions must be >= 1")
    if not specs:
        return []
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings, role="admin"))
    try:
        with kafka_errors(f"admin connect ({settings.bootstrap_servers})"):
            await admin.start()
        with kafka_errors("list topics"):
            existing = set(await admin.list_topics())
        todo = [s for s in specs if s.name not in existing]
        if not todo:
            return []
        new = [
            NewTopic(
                name=s.name,
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                topic_configs={**record_size_configs(settings), **s.configs},
            )
            for s in todo
        ]
        with kafka_errors("create topics"):
            resp = await admin.create_topics(new, timeout_ms=timeout_ms)
        created, failed = [], []
        for err in getattr(resp, "topic_errors", []):
            name, code = err[0], err[1]
            msg = err[2] if len(err) > 2 else ""
            if code == 0:
                created.append(name)
            elif code != _TOPIC_ALREADY_EXISTS:
                failed.append(f"{name}: error {code} {msg}")
        if failed:
            raise TransportError("cannot create topics: " + "; ".join(failed))
        log.info("topics.created", topics=created)
        await _wait_visible(admin, [s.name for s in todo], timeout_ms / 1000)
        return created
    finally:
        with kafka_errors("admin close"):
            await admin.close()


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Wait until every partition of the new topics has a leader, so the first send succeeds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    missing: list[str] = names
    while True:
        with kafka_errors("describe topics"):
            described = await admin.describe_topics(names)
        ready = {
            t["topic"]
            for t in described
            if t.get("error_code", 0) == 0
            and t.get("partitions")
            and all(p.get("leader", -1) >= 0 for p in t["partitions"])
        }
        missing = sorted(set(names) - ready)
        if not missing:
            return
        if loop.time() > deadline:
            raise TransportError(f"topics have no leader after creation: {missing}")
        await asyncio.sleep(0.1)


async def delete_topics(settings: Settings, names: Iterable[str]) -> None:
    """Delete topics (tests and tools); missing ones are ignored."""
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings, role="admin"))
    try:
        with kafka_errors("admin connect"):
            await admin.start()
            existing = set(await admin.list_topics())
            todo = [n for n in names if n in existing]
            if todo:
                await admin.delete_topics(todo)
    finally:
        with kafka_errors("admin close"):
            await admin.close()
