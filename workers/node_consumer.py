"""NodeConsumer: one Kafka consumer for the instance topics of every worker in a process.

Why: a node serving several GPUs from one process would otherwise run one consumer per
GPU, each polling the broker on its own (at 1,000 requests/s over four simulated workers
that was 0.4 fetch requests per request, the largest share of the bench's Kafka requests).
One consumer fetches every worker's assignments in one request and hands each worker the
records of its own topic; the workers' offset commits leave together too.

Each worker reads a ``NodeAssignments`` (``node.assignments(instance_id)``): the same
surface as its own ``TypedConsumer`` (iterate, ``dead_letter``, ``commit``, ``stop``), so
the worker's at-least-once logic is unchanged. A worker that stops while the node goes
on rewinds its topic to the committed offset: what it was handed but did not settle is
read again by the next worker for that instance.

Trade-off: offsets are kept under the node's group (``goodserve-node-<node>``), not the
instance's (``goodserve-worker-<id>``). A node restarted with the same instances resumes
where it stopped; an instance moved to another node or to a worker of its own starts from
that group's offsets (reset them first, e.g. with ``kafka-consumer-groups``). Opt-in:
``WorkerService(assignments=...)``, ``LocalStack(shared_worker_consumer=True)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Self

from goodserve.schemas import Message

from goodserve.config import Settings
from goodserve.errors import ConfigError, GoodServeError, TransportError
from goodserve.lifecycle import AsyncService
from goodserve.logging import get_logger
from goodserve.transport import (
    DeadLetterSink,
    Envelope,
    TypedConsumer,
    TypedProducer,
    ensure_topics,
    instance_topic_spec,
)
from goodserve.transport.producer import retrieve_outcome

__all__ = ["NodeAssignments", "NodeConsumer"]

log = get_logger(__name__)


class NodeConsumer(AsyncService):
    """Fetches the instance topics of a node's workers in one consumer group.

    ``max_queued``: records waiting for one worker before its topic's fetching pauses (a
    slow worker does not make the node buffer without bound, nor hold the others up).
    ``producer``: a started producer the caller owns, for dead letters (else the node makes
    its own when a record needs one).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        node: str,
        instance_ids: Sequence[str],
        max_queued: int = 1024,
        producer: TypedProducer | None = None,
        poll_timeout_ms: int = 100,
        commit_interval_s: float = 0.05,
    ) -> None:
        if not isinstance(settings, Settings):
            raise ConfigError("settings must be a goodserve.config.Settings")
        if not node or any(c.isspace() for c in node) or "/" in node:
            raise ConfigError(f"node must be a non-empty name, got {node!r}")
        ids = list(instance_ids)
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(i, str) and i for i in ids):
            raise ConfigError(f"instance_ids must be distinct non-empty names, got {ids!r}")
        if max_queued < 1 or poll_timeout_ms < 1:
            raise ConfigError("max_queued and poll_timeout_ms must be >= 1")
        if not commit_interval_s >= 0:
            raise ConfigError(f"commit_interval_s must be >= 0, got {commit_interval_s}")
        self.settings = settings
        self.node = node
        self.instance_ids = tuple(ids)
        self.max_queued = int(max_queued)
        self.poll_timeout_ms = int(poll_timeout_ms)
        self.commit_interval_s = float(commit_interval_s)
        """At most one commit per this period for the whole node (each worker already
        commits at most once per its own period; the node's commits carry them all)."""
        self.group_id = f"goodserve-node-{node}"
        self.service_name = f"node-{node}"
        self._topic_of = {i: settings.instance_topic(i) for i in ids}
        self._queues: dict[str, deque[Envelope[Message]]] = {
            t: deque() for t in self._topic_of.values()
        }
        self._ready: dict[str, asyncio.Event] = {}
        self._next_offset: dict[tuple[str, int], int] = {}
        """Per partition, the offset the next queued record must have: records a rewind
        made stale (fetched before the seek) are dropped instead of queued twice."""
        self._readers: dict[str, NodeAssignments] = {}
        self._producer = producer
        self._consumer: TypedConsumer[Message] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pending: dict[tuple[str, int], Envelope[Message]] = {}
        self._next_commit: asyncio.Future[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._last_commit = -1e9
        self._closing = False
        self.commits = 0

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._consumer is not None

    async def start(self) -> None:
        """Create the instance topics, join the node's group and start fetching."""
        if self._consumer is not None:
            return
        if self._producer is not None and not self._producer.started:
            raise ConfigError("a shared producer must be started by its owner first")
        await ensure_topics(
            self.settings, [instance_topic_spec(self.settings, i) for i in self.instance_ids]
        )
        sink = DeadLetterSink(
            settings=self.settings, service=self.service_name, producer=self._producer
        )
        consumer: TypedConsumer[Message] = TypedConsumer(
            settings=self.settings,
            topics=list(self._queues),
            group_id=self.group_id,
            service=self.service_name,
            dead_letters=sink,
            auto_offset_reset="earliest",
            poll_timeout_ms=self.poll_timeout_ms,
            on_revoke=self._on_revoke,
        )
        await consumer.start()
        self._closing = False
        self._consumer = consumer
        self._ready = {t: asyncio.Event() for t in self._queues}
        self._pump = asyncio.create_task(self._fetch_loop(), name=f"{self.service_name}-fetch")
        log.info("node_consumer.started", node=self.node, instances=len(self.instance_ids))

    async def stop(self) -> None:
        """Stop fetching and close (after the workers stopped); idempotent. Records fetched
        but not handed out are not committed: the group re-delivers them."""
        if self._consumer is None:
            return
        self._closing = True
        await self._flush_commits()  # the workers' last commits, without the wait
        consumer, self._consumer = self._consumer, None
        for reader in list(self._readers.values()):
            reader._close()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        for q in self._queues.values():
            q.clear()
        self._next_offset.clear()
        with contextlib.suppress(GoodServeError):
            await consumer.stop(drain_timeout_s=1.0)
        log.info("node_consumer.stopped", node=self.node, commits=self.commits)

    # --- the workers' side -----------------------------------------------------------------
    def assignments(self, instance_id: str) -> NodeAssignments:
        """What the worker of ``instance_id`` reads (one reader per instance at a time)."""
        topic = self._topic_of.get(instance_id)
        if topic is None:
            raise ConfigError(
                f"instance {instance_id!r} is not on node {self.node!r} "
                f"(it serves {', '.join(self.instance_ids)})"
            )
        if self._consumer is None:
            raise ConfigError("the node consumer must be started by its owner first")
        old = self._readers.get(topic)
        if old is not None and not old.closed:
            raise ConfigError(f"instance {instance_id!r} already has a reader on this node")
        reader = NodeAssignments(self, topic)
        self._readers[topic] = reader
        return reader

    @property
    def typed_consumer(self) -> TypedConsumer[Message] | None:
        """The underlying consumer (metrics read its lag per topic)."""
        return self._consumer

    # --- fetching ---------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            self._flow_control(consumer)
            try:
                envs = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
            except GoodServeError as e:  # broker trouble: the workers keep running, retry
                log.error("node_consumer.poll_failed", error_code=e.code, error=str(e))
                await asyncio.sleep(1.0)
                continue
            woken: set[str] = set()
            for env in envs:
                key = (env.topic, env.partition)
                if env.offset < self._next_offset.get(key, -1):
                    continue  # fetched before a rewind of its topic: it comes again
                self._next_offset[key] = env.offset + 1
                self._queues[env.topic].append(env)
                woken.add(env.topic)
            for t in woken:
                self._ready[t].set()

    def _flow_control(self, consumer: TypedConsumer[Message]) -> None:
        full = {t for t, q in self._queues.items() if len(q) >= self.max_queued}
        paused = consumer.paused()
        if full - paused:
            consumer.pause(full - paused)
            log.warning("node_consumer.paused", topics=sorted(full - paused),
                        reason="a worker has max_queued records waiting")
        if paused - full:
            consumer.resume(paused - full)

    async def _on_revoke(self, revoked: frozenset[tuple[str, int]]) -> None:
        """Partitions leave this node: forget their queued records (not handed out, not
        committed: the next owner reads them)."""
        for topic, partition in revoked:
            q = self._queues.get(topic)
            if q is not None:
                kept = [e for e in q if e.partition != partition]
                q.clear()
                q.extend(kept)
            self._next_offset.pop((topic, partition), None)

    async def _rewind(self, topic: str) -> None:
        """A worker stopped: drop its queue and read its topic again from the committed
        offsets, so what it was handed but did not settle goes to the next reader."""
        consumer = self._consumer
        self._queues[topic].clear()
        if consumer is None:
            return
        await self._flush_commits()
        await consumer.rewind([topic])
        for key in [k for k in self._next_offset if k[0] == topic]:
            del self._next_offset[key]

    # --- committing -------------------------------------------------------------------------
    async def _commit(self, env: Envelope[Message]) -> None:
        """Commit past ``env`` together with the other workers' commits of the moment: one
        commit in flight at a time; those that come meanwhile leave in the next one."""
        key = (env.topic, env.partition)
        cur = self._pending.get(key)
        if cur is None or env.offset > cur.offset:
            self._pending[key] = env
        fut = self._next_commit
        if fut is None:
            fut = self._next_commit = asyncio.get_running_loop().create_future()
            fut.add_done_callback(retrieve_outcome)
            if self._committer is None or self._committer.done():
                self._committer = asyncio.create_task(
                    self._commit_loop(), name=f"{self.service_name}-commit"
                )
        await asyncio.shield(fut)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next_commit is not None:
            wait = self._last_commit + self.commit_interval_s - loop.time()
            if wait > 0 and not self._closing:
                await asyncio.sleep(wait)  # what settles meanwhile joins this commit
            fut, self._next_commit = self._next_commit, None
            batch, self._pending = list(self._pending.values()), {}
            consumer = self._consumer
            try:
                if consumer is None:
                    raise TransportError("node consumer stopped before the commit")
                await consumer.commit(batch)
                self.commits += 1
                self._last_commit = loop.time()
            except Exception as e:
                fut.set_exception(e)
            else:
                fut.set_result(None)

    async def _flush_commits(self) -> None:
        task = self._committer
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await task


class NodeAssignments:
    """One worker's records from its node's consumer: iterate, dead-letter, commit, stop."""

    def __init__(self, node: NodeConsumer, topic: str) -> None:
        self._node = node
        self.topic = topic
        self.closed = False

    @property
    def group_id(self) -> str:
        return self._node.group_id

    @property
    def typed_consumer(self) -> TypedConsumer[Message] | None:
        return self._node.typed_consumer

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope[Message]:
        q = self._node._queues[self.topic]
        ready = self._node._ready[self.topic]
        while not self.closed:
            if q:
                return q.popleft()
            ready.clear()
            await ready.wait()
        raise StopAsyncIteration

    async def dead_letter(self, env: Envelope[Message], error: BaseException) -> None:
        consumer = self._node.typed_consumer
        if consumer is None:
            raise TransportError("node consumer stopped")
        await consumer.dead_letter(env, error)

    async def commit(self, env: Envelope[Message]) -> None:
        await self._node._commit(env)

    def _close(self) -> None:
        self.closed = True
        ready = self._node._ready.get(self.topic)
        if ready is not None:
            ready.set()

    async def stop(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stop reading (the worker's stop, after its final commit): the node rewinds this
        topic so its unsettled records go to the next reader. Idempotent."""
        del drain_timeout_s  # the worker has flushed its commits before it stops reading
        if self.closed:
            return
        self._close()
        if self._node._readers.get(self.topic) is self:
            del self._node._readers[self.topic]
        await self._node._rewind(self.topic)
