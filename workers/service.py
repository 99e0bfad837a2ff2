"""WorkerService: the Kafka side of one GPU instance.

It consumes ``instance.<id>`` (group ``goodserve-worker-<id>``; or, with the other workers
of its process, through a ``NodeConsumer`` in the node's group), runs each ``Assignment`` on
its ``Engine``, produces exactly one ``Result`` per finished request, answers
``MigrationCommand``s with a ``Checkpoint`` plus a resuming ``Assignment`` to the target,
and publishes a ``Heartbeat`` every period.

Delivery guarantee: at-least-once with de-duplication by request id. An Assignment's offset
is committed only once the request is settled: its Result acknowledged, or its checkpoint
and resuming Assignment (migration, drain) acknowledged. The instance topic has one
partition, so the worker commits up to the first unsettled record. A worker killed with
requests in flight re-reads and re-runs them when it restarts; if it stays down, its
heartbeats stop and the dispatcher reissues them elsewhere (from their last checkpoint), so
a request can be served twice and Results are de-duplicated by request id at the client.
Sends of Results and checkpoints are retried through broker outages. An
Assignment for a request id that is running here, or whose Result this process already
produced (a bounded memory of ``finished_memory`` ids), is dropped, so a re-sent or
re-delivered Assignment never runs twice while the worker lives; across restarts the
committed offsets keep finished work from being re-read.

Abort: ``await service.abort(request_id)`` stops a request and produces its Result with
status "aborted"; an ``AbortCommand`` on the instance topic does the same (the gateway sends
one when its client disconnects). Requests with ``metadata["stream"] == "1"`` also get
``TokenChunk``s on the ``stream`` topic as tokens arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from goodserve.schemas import (
    AbortCommand,
    AgentRequest,
    Assignment,
    Checkpoint,
    ErrorInfo,
    Heartbeat,
    Message,
    MigrationCommand,
    RequestProgress,
    Result,
    TokenChunk,
    type_name,
)
from goodserve.workers.engine import Engine, EngineRequest
from goodserve.workers.node_consumer import NodeAssignments, NodeConsumer

from goodserve.chaos.failpoints import failpoint
from goodserve.config import MAX_INSTANCE_ID, Settings, is_topic_name
from goodserve.errors import (
    ConfigError,
    EngineError,
    GoodServeError,
    MalformedMessage,
    RecordTooLarge,
    UnknownInstance,
)
from goodserve.lifecycle import AsyncService
from goodserve.logging import bound_context, get_logger
from goodserve.metrics import MetricsServer, WorkerMetrics
from goodserve.recent_ids import RecentIds
from goodserve.transport import (
    DeadLetterSink,
    Envelope,
    TypedConsumer,
    TypedProducer,
    ensure_topics,
    instance_topic_spec,
    send_fitting,
)

__all__ = ["WorkerService", "engine_request_for", "input_tokens_of"]

log = get_logger(__name__)

SIM_OUTPUT_KEY = "sim_output_tokens"

ResultStatus = Literal["ok", "error", "aborted", "rejected"]


def input_tokens_of(req: AgentRequest) -> int:
    """Prompt length: ``input_tokens``, else the token ids' count, else ceil(chars / 4)."""
    if req.input_tokens is not None:
        return max(1, int(req.input_tokens))
    if req.prompt_token_ids:
        return len(req.prompt_token_ids)
    if req.prompt:
        return max(1, math.ceil(len(req.prompt) / 4))
    return 1


def engine_request_for(assignment: Assignment, *, simulated: bool) -> EngineRequest:
    """The EngineRequest of an Assignment (simulated engines honour ``sim_output_tokens``)."""
    req = assignment.request
    max_tokens = req.max_tokens
    if simulated and SIM_OUTPUT_KEY in req.metadata:
        try:
            max_tokens = min(max_tokens, max(1, int(req.metadata[SIM_OUTPUT_KEY])))
        except ValueError:
            pass
    resume = assignment.resume
    return EngineRequest(
        request_id=req.request_id,
        input_tokens=input_tokens_of(req),
        prompt_token_ids=list(req.prompt_token_ids) if req.prompt_token_ids else None,
        prompt=req.prompt,
        max_tokens=max_tokens,
        sampling=req.sampling,
        resume_token_ids=list(resume.generated_token_ids) if resume else [],
        kv_ref=resume.kv_ref if resume else None,
        deadline=assignment.deadline,
        arrival=req.arrival,
        # without prompt text or ids, a workflow's steps share a simulated prompt prefix
        prefix_key=None if (req.prompt or req.prompt_token_ids) else req.workflow_id,
    )


def smaller_result(res: Result, error: GoodServeError, limit: int) -> Result | None:
    """``res`` made to fit a record after ``error`` (``RecordTooLarge``): first without the
    token ids when the text holds the output, then as an error Result that says why (a
    Result is never dropped); None when nothing is left to take out."""
    if res.output_token_ids and res.text:
        return msgspec.structs.replace(res, output_token_ids=[], output_token_ids_omitted=True)
    if res.status == "error" and res.error is not None and res.error.code == error.code:
        return None
    message = (
        f"the Result of {res.output_tokens} tokens is larger than a record "
        f"(max_record_bytes {limit}): raise it on the workers and the results topics"
    )
    return msgspec.structs.replace(
        res,
        status="error",
        output_token_ids=[],
        text="",
        met_deadline=False,
        error=ErrorInfo(code=error.code, message=message, retriable=False),
    )


@dataclass(slots=True)
class _Tracked:
    """A request running on this worker: what its Result and Checkpoint need."""

    assignment: Assignment
    input_tokens: int
    started_at: float
    token_ids: list[int] = field(default_factory=list)
    """All tokens so far, resume tokens included."""
    text: str = ""
    generated: int = 0
    first_token_at: float | None = None
    cached_tokens: int = 0
    migrating: bool = False
    aborted: bool = False
    task: asyncio.Task[None] | None = None
    chunks: int = 0
    """TokenChunks produced so far (streamed requests only)."""
    env: Envelope[Message] | None = None
    """The Assignment record: its offset is committed only once the request is settled."""


class WorkerService(AsyncService):
    """One worker per GPU instance: assignments in; results, checkpoints, heartbeats out."""

    def __init__(
        self,
        *,
        settings: Settings,
        instance_id: str,
        engine: Engine,
        gpu: str,
        model: str,
        heartbeat_period_s: float = 0.5,
        max_inflight: int = 1024,
        log_payloads: bool | None = None,
        finished_memory: int = 100_000,
        commit_interval_s: float = 0.05,
        metrics_port: int | None = None,
        on_assignment: Callable[[Assignment], None] | None = None,
        producer: TypedProducer | None = None,
        node_consumer: NodeConsumer | None = None,
    ) -> None:
        if not isinstance(settings, Settings):
            raise ConfigError("settings must be a goodserve.config.Settings")
        if not (
            is_topic_name(settings.instance_topic(instance_id))
            and 0 < len(instance_id) <= MAX_INSTANCE_ID
        ):
            raise ConfigError(
                f"instance_id must be 1-{MAX_INSTANCE_ID} of A-Z a-z 0-9 . _ - (it names the"
                f" topic {settings.instance_topic(instance_id)[:120]!r}), got {instance_id!r}"
            )
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine does not implement the Engine protocol: {engine!r}")
        if not gpu or not model:
            raise ConfigError("gpu and model must be non-empty")
        if not heartbeat_period_s > 0:
            raise ConfigError(f"heartbeat_period_s must be > 0, got {heartbeat_period_s}")
        if not commit_interval_s >= 0:
            raise ConfigError(f"commit_interval_s must be >= 0, got {commit_interval_s}")
        if max_inflight < 1 or finished_memory < 1:
            raise ConfigError("max_inflight and finished_memory must be >= 1")
        if node_consumer is not None and instance_id not in node_consumer.instance_ids:
            raise ConfigError(f"instance {instance_id!r} is not on node {node_consumer.node!r}")
        self.settings = settings
        self.instance_id = instance_id
        self.engine = engine
        self.gpu = gpu
        self.model = model
        self.heartbeat_period_s = float(heartbeat_period_s)
        self.max_inflight = int(max_inflight)
        self.log_payloads = settings.log_payloads if log_payloads is None else log_payloads
        self.finished_memory = int(finished_memory)
        self.commit_interval_s = float(commit_interval_s)
        """At most one offset commit per this period (settles in between move its target):
        a crash re-delivers at most this much more settled work, for far fewer commits."""
        self.shared_producer = producer
        """A producer owned by the caller, shared by the workers of one process (one node
        serving several GPUs): their Results and heartbeats leave in common batches, one
        Kafka request where each worker would send its own. Started and stopped by its
        owner; ``None``: this worker makes (and closes) its own."""
        self.node_consumer = node_consumer
        """The consumer of this process's node (one for several GPUs' topics), owned by the
        caller; ``None``: this worker consumes its topic with a consumer of its own."""
        self.on_assignment = on_assignment
        """Called (synchronously) with each Assignment as the consumer hands it over, before
        any check: instrumentation (``goodserve bench dispatch``); it must be quick."""
        self.topic = settings.instance_topic(instance_id)
        self.group_id = (
            node_consumer.group_id if node_consumer is not None
            else f"goodserve-worker-{instance_id}"
        )
        self.service_name = f"worker-{instance_id}"
        self._simulated = getattr(engine, "name", "") == "simulated"
        self._producer: TypedProducer | None = None
        self._consumer: TypedConsumer[Message] | NodeAssignments | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._finished = RecentIds(ttl_s=120.0, capacity=self.finished_memory)
        """Finished ids, remembered 120 s (and at most ``finished_memory`` of them)."""
        self._uncommitted: OrderedDict[int, Envelope[Message]] = OrderedDict()
        self._settled: set[int] = set()
        self._commit_next: Envelope[Message] | None = None
        self._committing = False
        self._committer: asyncio.Task[None] | None = None
        self._flush_commits = asyncio.Event()
        self._last_commit = -1e9
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._current: asyncio.Future[None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._accepting = False
        self._draining = False
        self._seq = 0
        self._last_tokens = 0
        self._known_topics: set[str] = set()
        self.results_produced = 0
        self.migrated_out = 0
        self.duplicates_dropped = 0
        self.metrics = WorkerMetrics(instance_id)
        self.metrics.track_lag(
            "assignments", lambda: getattr(self._consumer, "typed_consumer", self._consumer)
        )
        self._metrics_server = (
            MetricsServer(self.metrics, port=metrics_port) if metrics_port is not None else None
        )

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop_task is not None

    async def start(self) -> None:
        """Create the instance topic, start engine, producer and consumer, then serve."""
        if self._loop_task is not None:
            return
        shared = self.shared_producer
        if shared is not None and not shared.started:
            raise ConfigError("a shared producer must be started by its owner first")
        node = self.node_consumer
        if node is not None and not node.started:
            raise ConfigError("the node consumer must be started by its owner first")
        self._stopped = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_inflight)
        await ensure_topics(
            self.settings,
            [
                instance_topic_spec(self.settings, self.instance_id),
                self.settings.results_topic,
                self.settings.heartbeats_topic,
                self.settings.checkpoints_topic,
                self.settings.topic("stream"),
            ],
        )
        self._known_topics.add(self.topic)
        await self.engine.start()
        if shared is not None:
            producer = shared
        else:
            producer = TypedProducer(
                settings=self.settings, client_id=f"{self.settings.client_id}-{self.service_name}"
            )
            await producer.start()
        consumer: TypedConsumer[Message] | NodeAssignments
        try:
            if node is not None:
                consumer = node.assignments(self.instance_id)
            else:
                sink = DeadLetterSink(
                    settings=self.settings, service=self.service_name, producer=producer
                )
                consumer = TypedConsumer(
                    settings=self.settings,
                    topics=self.topic,
                    group_id=self.group_id,
                    service=self.service_name,
                    dead_letters=sink,
                    auto_offset_reset="earliest",
                )
                await consumer.start()
        except BaseException:
            if producer is not shared:
                await producer.stop()
            await self.engine.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._seq = 0
        self._last_tokens = self.engine.status().tokens_generated
        self._flush_commits = asyncio.Event()
        self._committer = None
        self._accepting = True
        self._draining = False
        self._loop_task = asyncio.create_task(self._consume(), name=f"{self.service_name}-consume")
        self._hb_task = asyncio.create_task(self._heartbeats(), name=f"{self.service_name}-hb")
        if self._metrics_server is not None:
            await self._metrics_server.start()
        log.info(
            "worker.started",
            instance_id=self.instance_id,
            gpu=self.gpu,
            model=self.model,
            engine=self.engine.name,
            topic=self.topic,
        )

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Graceful: stop taking work, let running requests finish for ``drain_timeout_s``,
        checkpoint the rest to the checkpoints topic (the dispatcher reissues them), commit,
        send a final draining heartbeat, close. Idempotent."""
        loop_task = self._loop_task
        if loop_task is None:
            return
        self._accepting = False
        self._draining = True
        loop_task.cancel()  # only the wait: a message being handled is finished and committed
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        if self._current is not None:
            with contextlib.suppress(Exception):
                await self._current
        pending = [t.task for t in self._tracked.values() if t.task is not None]
        if pending:
            _done, left = await asyncio.wait(pending, timeout=max(0.0, drain_timeout_s))
            if left:
                await self._checkpoint_for_reissue()
                await asyncio.wait(left, timeout=5.0)
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        with contextlib.suppress(GoodServeError):
            await self._send_heartbeat()
        assert self._consumer is not None and self._producer is not None
        await self._flush_pending_commit()
        with contextlib.suppress(GoodServeError):
            await self._consumer.stop(drain_timeout_s=1.0)
        await self.engine.stop()
        if self._producer is not self.shared_producer:
            with contextlib.suppress(GoodServeError):
                await self._producer.stop()
        self._loop_task = self._hb_task = None
        self._consumer = None
        self._producer = None
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        assert self._stopped is not None
        self._stopped.set()
        log.info("worker.stopped", instance_id=self.instance_id, results=self.results_produced)

    async def run_until_stopped(self) -> None:
        """Start (if needed) and wait until ``stop()`` completes."""
        await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    # --- queries ----------------------------------------------------------------------------
    def inflight(self) -> list[str]:
        return list(self._tracked)

    def has_finished(self, request_id: str) -> bool:
        return request_id in self._finished

    # --- the consume loop --------------------------------------------------------------------
    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while self._accepting:
            try:
                async for env in consumer:
                    if not self._accepting:
                        return  # not committed: re-delivered to the next run of this worker
                    # Shielded: stop() cancels the loop only between messages, never between
                    # handing a request to the engine and committing its offset.
                    self._uncommitted[env.offset] = env
                    self._current = asyncio.ensure_future(self._handle(env))
                    await asyncio.shield(self._current)
                return
            except GoodServeError as e:  # broker trouble: keep serving what runs, retry
                log.error("worker.poll_failed", error_code=e.code, error=str(e))
                await asyncio.sleep(1.0)

    async def _handle(self, env: Envelope[Message]) -> None:
        consumer = self._consumer
        assert consumer is not None
        msg = env.msg
        rid = getattr(msg, "request_id", None) or getattr(
            getattr(msg, "request", None), "request_id", None
        )
        with bound_context(
            request_id=rid,
            instance_id=self.instance_id,
            decision_id=getattr(msg, "decision_id", None),
        ):
            try:
                if isinstance(msg, Assignment):
                    await self._on_assignment(env, msg)
                elif isinstance(msg, MigrationCommand):
                    await self._on_migration(env, msg)
                elif isinstance(msg, AbortCommand):
                    stopped = await self.abort(msg.request_id)
                    log.info("worker.abort_command", stopped=stopped, reason=msg.reason)
                else:
                    await consumer.dead_letter(
                        env,
                        MalformedMessage(
                            f"{self.topic} carries assignments and migrations, "
                            f"got {type_name(msg)!r}",
                            code="wrong_kind",
                        ),
                    )
            except GoodServeError as e:  # never let one message stop the worker
                log.error("worker.message_failed", error_code=e.code, error=str(e))
                with contextlib.suppress(GoodServeError):
                    await consumer.dead_letter(env, e)
            tr = self._tracked.get(rid) if rid else None
            if tr is None or tr.env is not env:
                await self._settle(env)  # nothing runs on behalf of this record

    async def _settle(self, env: Envelope[Message] | None) -> None:
        """Mark a record done; commit up to the first record not yet settled.

        Why: an Assignment's offset is committed only once its Result (or its checkpoint) is
        acknowledged, so a worker killed with requests in flight re-reads and re-runs them
        when it comes back (at-least-once; Results are de-duplicated by request id).
        """
        if env is None or self._consumer is None:
            return
        self._settled.add(env.offset)
        last: Envelope[Message] | None = None
        while self._uncommitted:
            off, head = next(iter(self._uncommitted.items()))
            if off not in self._settled:
                break
            self._uncommitted.popitem(last=False)
            self._settled.discard(off)
            last = head
        if last is None:
            return
        # Coalesced: one commit in flight at a time, at most one per commit_interval_s;
        # settles meanwhile only move the target (one commit per request would queue
        # behind aiokafka's commit lock and load the broker at high request rates). The
        # first settle after a quiet period commits inline, as soon as it can.
        self._commit_next = last
        if self._committing:
            return
        self._committing = True
        if asyncio.get_running_loop().time() - self._last_commit < self.commit_interval_s:
            self._start_delayed_commits()
            return
        try:
            target, self._commit_next = self._commit_next, None
            await self._commit(target)
        except BaseException:
            self._committing = False
            raise
        if self._commit_next is not None:
            self._start_delayed_commits()  # settled while committing: the next one later
        else:
            self._committing = False

    def _start_delayed_commits(self) -> None:
        self._committer = asyncio.create_task(
            self._delayed_commits(), name=f"{self.service_name}-commit"
        )

    async def _delayed_commits(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._commit_next is not None and self._consumer is not None:
                wait = self._last_commit + self.commit_interval_s - loop.time()
                if wait > 0 and not self._flush_commits.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._flush_commits.wait(), wait)
                target, self._commit_next = self._commit_next, None
                if target is not None:
                    await self._commit(target)
        finally:
            self._committing = False

    async def _commit(self, target: Envelope[Message]) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit(target)
        except GoodServeError as e:  # the next commit covers it; a crash re-delivers
            log.warning("worker.commit_failed", error_code=e.code, error=str(e))
        finally:
            self._last_commit = asyncio.get_running_loop().time()

    async def _flush_pending_commit(self) -> None:
        """Commit what is settled now (stop: nothing settled is left uncommitted)."""
        self._flush_commits.set()
        task = self._committer
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await task
        if self._commit_next is not None and not self._committing and self._consumer:
            target, self._commit_next = self._commit_next, None
            await self._commit(target)

    async def _on_assignment(self, env: Envelope[Message], a: Assignment) -> None:
        assert self._consumer is not None and self._slots is not None
        if self.on_assignment is not None:
            self.on_assignment(a)
        rid = a.request.request_id
        if a.instance_id != self.instance_id:
            await self._consumer.dead_letter(
                env,
                UnknownInstance(
                    f"assignment for instance {a.instance_id!r} on {self.topic} "
                    f"(this worker is {self.instance_id!r})"
                ),
            )
            return
        if rid in self._tracked or rid in self._finished:
            self.duplicates_dropped += 1
            log.info("worker.duplicate_assignment", attempt=a.attempt)
            return
        await self._slots.acquire()  # backpressure: at most max_inflight requests tracked
        tr = _Tracked(assignment=a, input_tokens=input_tokens_of(a.request), started_at=time.time())
        if a.resume is not None:
            tr.token_ids = list(a.resume.generated_token_ids)
            tr.text = a.resume.generated_text
            tr.first_token_at = a.resume.first_token_at
        tr.env = env
        self._tracked[rid] = tr
        ctx = {"request_id": rid, "instance_id": self.instance_id, "decision_id": a.decision_id}
        tr.task = asyncio.create_task(self._run(tr, ctx), name=f"req-{rid}")
        extra = {"prompt": a.request.prompt} if self.log_payloads else {}
        log.info(
            "worker.assigned",
            input_tokens=tr.input_tokens,
            max_tokens=a.request.max_tokens,
            attempt=a.attempt,
            resumed_tokens=len(tr.token_ids),
            **extra,
        )

    async def _run(self, tr: _Tracked, ctx: dict[str, str]) -> None:
        """Drive one request on the engine and produce its one Result (unless migrated)."""
        a = tr.assignment
        rid = a.request.request_id
        with bound_context(**ctx):
            reason: str | None = None
            error: GoodServeError | None = None
            try:
                ereq = engine_request_for(a, simulated=self._simulated)
                async for out in self.engine.generate(ereq):
                    if out.new_token_ids:
                        tr.token_ids.extend(out.new_token_ids)
                    tr.text += out.new_text
                    tr.generated = out.num_generated
                    if tr.first_token_at is None and out.first_token_at is not None:
                        tr.first_token_at = out.first_token_at
                    elif tr.first_token_at is None and out.new_token_ids:
                        tr.first_token_at = time.time()
                    tr.cached_tokens = max(tr.cached_tokens, out.cached_tokens)
                    if a.request.metadata.get("stream") == "1":
                        await self._send_chunk(
                            tr, out.new_token_ids, out.new_text, out.finished, out.finish_reason
                        )
                    if out.finished:
                        reason = out.finish_reason
                        break
            except GoodServeError as e:
                error = e
            except Exception as e:  # an engine bug must not take the worker down
                error = EngineError(f"{type(e).__name__}: {e}")
            settled = False
            try:
                if reason == "migrated":
                    return  # checkpointed: the target produces the Result
                # (a request that ended otherwise while a checkpoint was being taken ended
                # here: the engine no longer has it, so the checkpoint fails and this Result
                # is the request's one)
                if error is not None:
                    log.warning("worker.engine_error", error_code=error.code, error=str(error))
                    await self._send_result(tr, "error", finish_reason="error", error=error)
                elif tr.aborted or reason == "abort":
                    await self._send_result(tr, "aborted", finish_reason="abort")
                else:
                    await self._send_result(tr, "ok", finish_reason=reason or "length")
                settled = True
            except GoodServeError as e:  # not committed: the next run of this worker redoes it
                log.error("worker.result_failed", error_code=e.code, error=str(e))
            finally:
                self._untrack(rid)
                if settled:
                    await self._settle(tr.env)

    async def _send_chunk(
        self, tr: _Tracked, ids: list[int], text: str, finished: bool, reason: str | None
    ) -> None:
        """Stream progress to the gateway (``stream`` topic); a failure only costs the chunk."""
        if not (ids or text or finished) or self._producer is None:
            return
        rid = tr.assignment.request.request_id
        chunk = TokenChunk(
            request_id=rid,
            index=tr.chunks,
            instance_id=self.instance_id,
            token_ids=list(ids),
            text=text,
            finished=finished,
            finish_reason=reason,
            resumed=tr.assignment.resume is not None,
            at=time.time(),
        )
        tr.chunks += 1
        try:
            await self._producer.send(self.settings.topic("stream"), chunk, key=rid)
        except GoodServeError as e:
            log.warning("worker.chunk_failed", error_code=e.code, error=str(e))

    def _untrack(self, rid: str) -> None:
        if self._tracked.pop(rid, None) is not None and self._slots is not None:
            self._slots.release()

    async def _send_result(
        self,
        tr: _Tracked,
        status: ResultStatus,
        *,
        finish_reason: str,
        error: GoodServeError | None = None,
    ) -> None:
        a = tr.assignment
        req = a.request
        now = time.time()
        resumed = len(a.resume.generated_token_ids) if a.resume else 0
        out_tokens = max(len(tr.token_ids), resumed + tr.generated)
        res = Result(
            request_id=req.request_id,
            status=status,
            instance_id=self.instance_id,
            decision_id=a.decision_id,
            workflow_id=req.workflow_id,
            output_token_ids=tr.token_ids,
            text=tr.text,
            input_tokens=tr.input_tokens,
            output_tokens=out_tokens,
            cached_tokens=tr.cached_tokens,
            finish_reason=finish_reason,
            arrival=req.arrival,
            dispatched_at=(a.resume.dispatched_at if a.resume and a.resume.dispatched_at else None)
            or a.dispatched_at,
            first_token_at=tr.first_token_at,
            finished_at=now,
            deadline=a.deadline,
            met_deadline=(status == "ok" and now <= a.deadline),
            predicted_output_tokens=a.predicted_output_tokens or None,
            migrations=a.resume.migrations if a.resume else 0,
            error=(
                ErrorInfo(code=error.code, message=str(error)[:2000], retriable=error.retriable)
                if error is not None
                else None
            ),
        )
        assert self._producer is not None
        self._finished.add(req.request_id)
        topic = req.reply_to or self.settings.results_topic

        def smaller(r: Result, e: RecordTooLarge) -> Result | None:
            less = smaller_result(r, e, self.settings.max_record_bytes)
            if less is not None:
                log.warning("worker.result_too_large", output_tokens=out_tokens,
                            omitted_ids=less.output_token_ids_omitted, error=str(e))
            return less

        _, res = await send_fitting(
            lambda r: self._send_retrying(topic, r, key=req.request_id), res, smaller
        )
        self.results_produced += 1
        self.metrics.observe_result(res)
        extra = {"text": tr.text} if self.log_payloads else {}
        log.info(
            "worker.result",
            status=status,
            output_tokens=out_tokens,
            finish_reason=finish_reason,
            met_deadline=res.met_deadline,
            latency_s=round(now - (req.arrival or a.dispatched_at), 4),
            **extra,
        )

    async def _send_retrying(
        self, topic: str, msg: Message, *, key: str, give_up_s: float = 120.0
    ) -> None:
        """Produce and wait for the ack, retrying through broker outages (a broker restart).

        The producer is idempotent, so a retry never duplicates a record it already wrote.
        """
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + give_up_s
        delay = 0.2
        while True:
            try:
                await self._producer.send(topic, msg, key=key)
                return
            except GoodServeError as e:
                if not e.retriable or loop.time() > end:
                    raise
                log.warning("worker.send_retry", topic=topic, error_code=e.code, error=str(e))
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    # --- migration ---------------------------------------------------------------------------
    async def _on_migration(self, env: Envelope[Message], m: MigrationCommand) -> None:
        assert self._consumer is not None
        if m.source != self.instance_id:
            await self._consumer.dead_letter(
                env,
                UnknownInstance(
                    f"migration from {m.source!r} on {self.topic} (this is {self.instance_id!r})"
                ),
            )
            return
        tr = self._tracked.get(m.request_id)
        if tr is None or tr.migrating:
            log.info("worker.migration_ignored", migration_id=m.migration_id, why="not running")
            return
        if not m.target or m.target == self.instance_id:
            log.warning("worker.migration_ignored", migration_id=m.migration_id, why="bad target")
            return
        failpoint("worker.migration.received")
        ckpt = await self._checkpoint(tr, migration_id=m.migration_id, target=m.target)
        if ckpt is None:
            return
        failpoint("worker.migration.checkpointed")
        a = tr.assignment
        target_topic = self.settings.instance_topic(m.target)
        if target_topic not in self._known_topics:
            await ensure_topics(self.settings, [instance_topic_spec(self.settings, m.target)])
            self._known_topics.add(target_topic)
        resume = Assignment(
            request=a.request,
            instance_id=m.target,
            decision_id=a.decision_id,
            dispatched_at=time.time(),
            deadline=a.deadline,
            predicted_output_tokens=a.predicted_output_tokens,
            predicted_output_p90=a.predicted_output_p90,
            attempt=a.attempt + 1,
            resume=ckpt.for_assignment(),
        )
        assert self._producer is not None

        def without_progress(r: Assignment, e: RecordTooLarge) -> Assignment | None:
            if r.resume is None or r.resume.progress_dropped:
                return None  # the target restarts it from the prompt
            log.warning("worker.resume_too_large", migration_id=m.migration_id, error=str(e),
                        generated=len(r.resume.generated_token_ids))
            return msgspec.structs.replace(r, resume=r.resume.without_progress())

        await send_fitting(lambda r: self._send_retrying(target_topic, r, key=m.request_id),
                           resume, without_progress)
        failpoint("worker.migration.resumed")
        self.migrated_out += 1
        await self._settle(tr.env)
        log.info(
            "worker.migrated",
            migration_id=m.migration_id,
            target=m.target,
            generated=len(ckpt.generated_token_ids),
            kv_tokens=ckpt.kv_tokens,
        )

    async def _checkpoint(
        self, tr: _Tracked, *, migration_id: str, target: str | None
    ) -> Checkpoint | None:
        """Stop a running request at a token boundary and produce its Checkpoint."""
        a = tr.assignment
        rid = a.request.request_id
        tr.migrating = True
        try:
            ek = await self.engine.checkpoint(rid)
        except GoodServeError as e:  # finished meanwhile: its Result stands
            tr.migrating = False
            log.info("worker.checkpoint_failed", migration_id=migration_id, error=str(e))
            return None
        prior = a.resume.migrations if a.resume else 0
        ckpt = Checkpoint(
            request_id=rid,
            migration_id=migration_id,
            source=self.instance_id,
            target=target,
            request=a.request,
            generated_token_ids=list(ek.generated_token_ids),
            generated_text=tr.text,
            kv_ref=ek.kv_ref,
            kv_tokens=ek.kv_tokens,
            first_token_at=tr.first_token_at,
            dispatched_at=(a.resume.dispatched_at if a.resume else None) or a.dispatched_at,
            created_at=time.time(),
            migrations=prior + 1,
        )
        assert self._producer is not None

        def without_progress(c: Checkpoint, e: RecordTooLarge) -> Checkpoint | None:
            if c.progress_dropped:
                return None
            # a long prompt and a long output: restart, not a loss
            log.warning("worker.checkpoint_too_large", migration_id=migration_id, error=str(e),
                        generated=len(c.generated_token_ids))
            return c.without_progress()

        _, ckpt = await send_fitting(
            lambda c: self._send_retrying(self.settings.checkpoints_topic, c, key=rid), ckpt,
            without_progress,
        )
        self.metrics.checkpoints.inc()
        return ckpt

    async def _checkpoint_for_reissue(self) -> None:
        """At the end of a drain: checkpoint what is still running (target None: reissue)."""
        for tr in list(self._tracked.values()):
            if tr.migrating:
                continue
            mid = f"drain-{uuid.uuid4().hex[:12]}"
            with bound_context(
                request_id=tr.assignment.request.request_id, instance_id=self.instance_id
            ):
                try:
                    if await self._checkpoint(tr, migration_id=mid, target=None) is not None:
                        log.info("worker.drain_checkpoint", migration_id=mid)
                        await self._settle(tr.env)  # the dispatcher reissues it
                except GoodServeError as e:
                    log.error("worker.drain_checkpoint_failed", error=str(e))

    # --- abort -------------------------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        """Stop a running request; its Result has status 'aborted'. False if not running."""
        tr = self._tracked.get(request_id)
        if tr is None or tr.migrating:
            return False
        tr.aborted = True
        await self.engine.abort(request_id)
        return True

    # --- heartbeats --------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        """The current Heartbeat (seq advances per call)."""
        st = self.engine.status()
        self._seq += 1
        delta = st.tokens_generated - self._last_tokens
        if delta < 0:  # an engine that reports per-period counts
            delta = st.tokens_generated
        self._last_tokens = st.tokens_generated
        progress: list[RequestProgress] = []
        seen: set[str] = set()
        for r in st.requests:
            tr = self._tracked.get(r.request_id)
            seen.add(r.request_id)
            progress.append(
                RequestProgress(
                    request_id=r.request_id,
                    state=r.state,
                    generated=r.generated,
                    input_tokens=r.input_tokens,
                    deadline=tr.assignment.deadline if tr else 0.0,
                    started_at=tr.started_at if tr else None,
                )
            )
        for rid, tr in self._tracked.items():
            if rid not in seen and not tr.migrating:
                progress.append(
                    RequestProgress(
                        request_id=rid,
                        state="waiting",
                        generated=len(tr.token_ids),
                        input_tokens=tr.input_tokens,
                        deadline=tr.assignment.deadline,
                        started_at=tr.started_at,
                    )
                )
        return Heartbeat(
            instance_id=self.instance_id,
            gpu=self.gpu,
            model=self.model,
            engine=self.engine.name,
            at=time.time(),
            seq=self._seq,
            running=st.running,
            waiting=st.waiting,
            max_batch=st.max_batch,
            kv_used_blocks=st.kv_used_blocks,
            kv_total_blocks=st.kv_total_blocks,
            kv_block_size=st.kv_block_size,
            step_time_s=st.step_time_s,
            tpot_s=st.tpot_s,
            prefill_tokens_per_s=st.prefill_tokens_per_s,
            tokens_generated=delta,
            prefix_hit_tokens=st.prefix_hit_tokens,
            prefix_query_tokens=st.prefix_query_tokens,
            requests=progress,
            draining=self._draining,
        )

    async def _send_heartbeat(self) -> None:
        assert self._producer is not None
        hb = self.heartbeat()
        await self._producer.send(self.settings.heartbeats_topic, hb, key=self.instance_id)
        self.metrics.observe_heartbeat(hb)

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self._send_heartbeat()
            except GoodServeError as e:
                log.warning("worker.heartbeat_failed", error_code=e.code, error=str(e))
            next_at += self.heartbeat_period_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
