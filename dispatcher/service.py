"""The dispatcher service: requests topic in, assignments and decision records out.

It consumes ``requests`` in a consumer group (replicas share the partitions),
keeps fleet state from ``heartbeats`` and ``results`` (every replica reads all of
them), routes each request with the decision core, produces the ``Assignment`` to
the chosen instance's topic and the ``Decision`` to the audit topic, and commits
the request's offset only after both are acknowledged. Bad requests get a rejected
``Result`` and a ``DeadLetter``; nothing is dropped silently. When no instance can
take work it holds requests (bounded) and pauses consuming instead of overfilling
queues. The risk monitor can run inside it (``monitor=True``).

Placements (which instance runs which request, and what is needed to dispatch it again:
the request, its latest checkpoint) live in memory. A replica reissues only the requests
it *owns*: those whose requests-topic partition the group gave it (the partition a request
arrived on; for one it did not route, the partition of its documented key, workflow id
else request id). When it starts, and whenever the group gives it partitions it did not
own, it rebuilds the in-flight placements of those partitions from the topics
(``rebuild_placements``): the workers' unsettled Assignments on their instance topics,
the checkpoints topic and the results topic, within ``rebuild_lookback_s``. So a request
placed before a restart (or by a replica that left the group) is reissued when its worker
dies, and by exactly one replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord, TopicPartition
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.registry import make_policy
from goodserve.dispatcher.router import Predicted, Router, input_tokens_of, to_predictor_input
from goodserve.dispatcher.validation import (
    Limits,
    SeenRequests,
    is_topic_name,
    report_problem,
    validate_request,
)
from goodserve.monitor.risk import MonitorConfig, RiskMonitor
from goodserve.schemas import (
    AgentRequest,
    Assignment,
    Checkpoint,
    Decision,
    ErrorInfo,
    Heartbeat,
    MigrationCommand,
    Result,
    decode,
)

from goodserve.config import Settings
from goodserve.errors import (
    ConfigError,
    DuplicateRequest,
    GoodServeError,
    InvalidReport,
    RecordTooLarge,
    TransportError,
    Unschedulable,
)
from goodserve.lifecycle import AsyncService
from goodserve.logging import bound_context, get_logger
from goodserve.metrics import DispatcherMetrics, MetricsServer
from goodserve.sim.fleet import Fleet
from goodserve.sim.kvcache import (
    block_hashes_for_key,
    block_hashes_for_text,
    block_hashes_for_tokens,
)
from goodserve.transport.consumer import (
    BULK_FETCH_MAX_WAIT_MS,
    BULK_FETCH_MIN_BYTES,
    Envelope,
    TypedConsumer,
)
from goodserve.transport.deadletter import DeadLetterSink
from goodserve.transport.kafka import kafka_client_kwargs, kafka_errors
from goodserve.transport.producer import Delivery, TypedProducer, send_fitting
from goodserve.transport.topics import ensure_topics, instance_topic_spec, standard_topics

log = get_logger("goodserve.dispatcher")

WORKER_GROUP = "goodserve-worker-{}"
"""The consumer group of instance ``{}``'s worker (``WorkerService.group_id``): its committed
offset on ``instance.<id>`` is where the worker's unsettled Assignments begin."""


def request_partition(req: AgentRequest, partitions: int) -> int:
    """The requests-topic partition of ``req`` under the protocol's key (workflow id, else
    request id) and Kafka's default partitioner (murmur2, as the Java and aiokafka clients)."""
    key = (req.workflow_id or req.request_id).encode()
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class _ResultKey(msgspec.Struct):
    """What a rebuild reads of a Result record (msgspec skips the rest of it)."""

    kind: str = ""
    request_id: str = ""


@dataclass(slots=True)
class DispatcherStats:
    """Counters for logs and metrics."""

    received: int = 0
    assigned: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    held: int = 0
    held_now: int = 0
    results: int = 0
    met: int = 0
    migrations: int = 0
    reissued: int = 0
    rebuilds: int = 0
    restored: int = 0
    """Placements restored from the topics by rebuilds (``rebuild_placements``)."""
    decisions_too_large: int = 0
    """Decision records sent without the instances' views because with them they were
    larger than the producer accepts (``_send_decision``)."""
    invalid_reports: int = 0
    """Heartbeats and Results with impossible numbers, dead-lettered (``report_problem``)."""
    decision_us: deque[float] = field(default_factory=lambda: deque(maxlen=10000))


@dataclass(slots=True)
class _Handover:
    """A migration on its way: ``source`` stops the request and hands it to ``target``.

    It ends when ``target`` lists the request in a heartbeat (or a Result arrives). Until
    then the request is held by ``source`` as far as reissuing goes: a source that dies
    mid-way may never have sent the resuming Assignment."""

    source: str
    target: str
    checkpoint: Checkpoint | None = None
    """The source's checkpoint for this move, once read from the checkpoints topic."""


@dataclass(slots=True)
class _InFlight:
    """A routed batch: its records are enqueued; its offsets are committed once they (and
    those of every batch before it) are acknowledged."""

    envs: list[Envelope[AgentRequest]]
    done: list[Envelope[AgentRequest]]
    """What to commit past (not the held ones)."""
    deliveries: list[Delivery]


@dataclass(slots=True)
class _Orphan:
    """A request to dispatch again: its instance died, drained, or died handing it over."""

    request: AgentRequest
    checkpoint: Checkpoint | None
    assignment: Assignment | None
    prefer: str | None = None
    """The target of a handover its dead source could not finish: the request goes there
    (a worker drops an Assignment for a request it already runs or finished, so this
    cannot run it twice), unless that instance cannot take work."""


class DispatcherService(AsyncService):
    """Routes agent requests to instances over Kafka (see module docstring).

    ``rebuild_lookback_s`` (default 600 s; 0 turns rebuilding off): how far back a rebuild
    reads the instance and checkpoints topics. A request placed longer ago than this and
    still running when its worker dies is not reissued by a replica that did not place it
    (a worker that comes back still runs it). The records read are only the workers'
    unsettled Assignments (from their group's committed offset), the checkpoints in the
    window and the Results since the oldest of those, so a rebuild's cost follows the work
    in flight, not the request rate times the window.

    ``decision_views_every`` (default 1): one decision in this many carries every
    instance's view in its record on the decisions topic, what ``goodserve audit replay``
    needs to redo it bit for bit; the others carry the candidates, predictions and
    settings (``Router.views_every``; 0: none). At 512 instances the views are most of a
    record (347 KiB with them) and of a decision's CPU (about 1.6 ms to build and encode).

    ``max_inflight_batches`` (default 8): routed polls whose records may be waiting for
    their acks while the next poll is routed; one more waits for the oldest to settle.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        policy: str = "goodserve",
        policy_overrides: dict[str, Any] | None = None,
        predictor: Any = None,
        fleet: Fleet | None = None,
        group_id: str = "goodserve-dispatcher",
        monitor: bool = True,
        monitor_config: MonitorConfig | None = None,
        limits: Limits | None = None,
        default_slo_s: float = 30.0,
        max_held: int = 10000,
        stale_after_s: float = 3.0,
        max_tokens_bound: bool = True,
        seed: int = 0,
        batch_size: int = 500,
        max_inflight_batches: int = 8,
        metrics_port: int | None = None,
        drain_timeout_s: float = 10.0,
        rebuild_lookback_s: float = 600.0,
        decision_views_every: int = 1,
    ) -> None:
        if decision_views_every < 0:
            raise ConfigError(f"decision_views_every must be >= 0, got {decision_views_every}")
        if not rebuild_lookback_s >= 0:
            raise ConfigError(f"rebuild_lookback_s must be >= 0, got {rebuild_lookback_s}")
        if max_inflight_batches < 1:
            raise ConfigError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        if max_held < 0:
            raise ConfigError(f"max_held must be >= 0, got {max_held}")
        if default_slo_s <= 0:
            raise ConfigError(f"default_slo_s must be > 0, got {default_slo_s}")
        self.settings = settings
        self.group_id = group_id
        self.replica_id = uuid.uuid4().hex[:8]
        fitting = Limits.for_records(settings.max_record_bytes)
        self.limits = limits or fitting
        if self.limits.max_request_bytes > fitting.max_request_bytes:
            raise ConfigError(
                f"limits.max_request_bytes ({self.limits.max_request_bytes}) leaves no room for "
                f"the Assignment in a record of max_record_bytes ({settings.max_record_bytes})"
            )
        self.default_slo_s = default_slo_s
        self.max_held = max_held
        self.drain_timeout_s = drain_timeout_s
        self.rebuild_lookback_s = float(rebuild_lookback_s)
        self.batch_size = batch_size
        self.fleet = fleet
        self.est = FleetEstimator(stale_after_s=stale_after_s, require_heartbeat=True)
        if fleet is not None:
            for inst in fleet.instances:
                self.est.add_instance(
                    inst.id,
                    gpu=inst.gpu,
                    model=fleet.model_of(inst),
                    max_batch=inst.max_batch or 256,
                    alive=False,
                )
        self._policy = make_policy(policy, policy_overrides)
        self._predictor = predictor
        self._seed = seed
        self._max_tokens_bound = max_tokens_bound
        self._views_every = decision_views_every
        self.router: Router | None = None
        self.monitor = RiskMonitor(monitor_config or MonitorConfig()) if monitor else None
        self._models: frozenset[str] | None = None
        self._models_for = -1
        self._instance_topics: set[str] = set()
        self.seen = SeenRequests()
        self.stats = DispatcherStats()
        self.metrics = DispatcherMetrics(self)
        self._metrics_server = (
            MetricsServer(self.metrics, port=metrics_port) if metrics_port is not None else None
        )
        self.held: deque[tuple[Envelope[AgentRequest], float]] = deque()
        self.checkpoints: dict[str, Checkpoint] = {}
        self.inputs: dict[str, Any] = {}
        self.assignments: dict[str, Assignment] = {}
        self.orphans: dict[str, _Orphan] = {}
        """Requests to re-dispatch (their instance died or drained) once an instance is up."""
        self.handovers: dict[str, _Handover] = {}
        """Migrations commanded (by this replica or a monitor) and not yet confirmed."""
        self.partition_of: dict[str, int] = {}
        """Requests-topic partition each placed request came from (ownership, see _owns)."""
        self._dead: set[str] = set()
        """Instances declared dead and not heard from since."""
        self._unheard: set[str] = set()
        """Instances holding rebuilt placements that were not alive when rebuilt: dead unless
        heard from before heartbeats have flowed for one stale period."""
        self._owned: frozenset[int] | None = None
        """Requests-topic partitions whose placements this replica holds (rebuilt)."""
        self._rebuilding = False
        self._rebuild_failures = 0
        self._results_while_rebuilding: set[str] = set()
        self.stale_after_s = stale_after_s
        self._last_heartbeat = 0.0
        self._blackout_until = 0.0
        self._producer: TypedProducer | None = None
        self._inflight: deque[_InFlight] = deque()
        """Routed batches whose records are enqueued, oldest first, not yet committed."""
        self._batch_lock = asyncio.Lock()
        """Held while a poll is routed and while batches settle: a rebalance waits for it."""
        self._revocation_seq = 0
        self._revocations: deque[tuple[int, frozenset[tuple[str, int]]]] = deque(maxlen=64)
        """Partitions taken away by each rebalance (the last 64, numbered): a poll's records
        from partitions revoked after the poll returned are not routed."""
        self.max_inflight_batches = max_inflight_batches
        self._commit_targets: dict[tuple[str, int], Envelope[AgentRequest]] = {}
        self._committer: asyncio.Task[None] | None = None
        self.commit_interval_s = 0.02
        """At most one offset commit of the requests topic per this period."""
        self._last_commit = -1e9
        self._requests: TypedConsumer[AgentRequest] | None = None
        self._fleet_consumer: TypedConsumer[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        predictor = self._predictor
        if predictor is None:
            from goodserve.dispatcher.predictor.model import OutputLengthPredictor

            predictor = await asyncio.to_thread(OutputLengthPredictor.default)
        self.router = Router(
            estimator=self.est,
            predictor=predictor,
            policy=self._policy,
            seed=self._seed,
            default_slo_s=self.default_slo_s,
            max_tokens_bound=self._max_tokens_bound,
            record_views=True,
            views_every=self._views_every,
        )
        s = self.settings
        await ensure_topics(s, standard_topics(s))
        # linger 0: a poll's records are enqueued back to back and leave as one request
        # once the loop yields; lingering only delayed them (and split polls' records)
        self._producer = TypedProducer(
            settings=s, client_id=f"{s.client_id}-dispatcher", linger_ms=0
        )
        await self._producer.start()
        sink = DeadLetterSink(settings=s, service="dispatcher", producer=self._producer)
        self._requests = TypedConsumer(
            settings=s,
            topics=[s.requests_topic],
            group_id=self.group_id,
            on_revoke=self._on_requests_revoked,
            service="dispatcher",
            message_type=AgentRequest,
            dead_letters=sink,
            max_poll_records=self.batch_size,
            poll_timeout_ms=50,
        )
        self._fleet_consumer = TypedConsumer(
            settings=s,
            topics=[s.heartbeats_topic, s.results_topic, s.checkpoints_topic],
            group_id=None,
            service="dispatcher-fleet",
            dead_letters=sink,
            auto_offset_reset="latest",
            poll_timeout_ms=50,
            # fleet state (heartbeats every 250 ms+, results) tolerates 20 ms: fewer fetches
            fetch_max_wait_ms=BULK_FETCH_MAX_WAIT_MS,
            fetch_min_bytes=BULK_FETCH_MIN_BYTES,
        )
        await self._fleet_consumer.start()
        await self._requests.start()
        self._tasks = [
            asyncio.create_task(self._request_loop(), name="dispatcher-requests"),
            asyncio.create_task(self._fleet_loop(), name="dispatcher-fleet"),
            asyncio.create_task(self._housekeeping_loop(), name="dispatcher-housekeeping"),
        ]
        if self._metrics_server is not None:
            await self._metrics_server.start()
        log.info(
            "dispatcher.started",
            replica=self.replica_id,
            policy=self._policy.name,
            monitor=self.monitor is not None,
            settings=s.redacted(),
        )

    async def stop(self) -> None:
        """Stop taking requests, finish the batch in hand, commit, close. Idempotent."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._stopping.set()
        # drain: the request loop sees _stopping and returns after the batch in hand is
        # produced and committed; only a loop stuck longer than drain_timeout_s is cancelled
        loop_task = next((t for t in self._tasks if t.get_name() == "dispatcher-requests"), None)
        if loop_task is not None:
            await asyncio.wait([loop_task], timeout=self.drain_timeout_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._requests is not None:
            await self._requests.stop()
        if self._fleet_consumer is not None:
            await self._fleet_consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        log.info(
            "dispatcher.stopped",
            replica=self.replica_id,
            assigned=self.stats.assigned,
            rejected=self.stats.rejected,
        )

    def assigned_partitions(self) -> int:
        """Partitions of the requests topic this replica owns now (0 until the group settles)."""
        return len(self._requests.assigned()) if self._requests is not None else 0

    @property
    def owned_partitions(self) -> frozenset[int] | None:
        """Requests-topic partitions whose placements this replica holds and reissues (their
        rebuild done); None until the group first gives it partitions."""
        return self._owned

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()

    # ------------------------------------------------------------------ requests
    async def _request_loop(self) -> None:
        assert self._requests is not None
        while not self._stopping.is_set():
            try:
                if len(self.held) >= self.max_held:
                    await asyncio.sleep(0.05)  # backpressure: stop consuming until work drains
                    async with self._batch_lock:
                        await self._retry_held()
                    continue
                # batches in flight: poll briefly, so that their commits follow their acks
                wait_ms = 5 if self._inflight else 50
                envs = await self._requests.getmany(timeout_ms=wait_ms, max_records=self.batch_size)
                polled_at = self._revocation_seq  # no await since the poll returned
                async with self._batch_lock:  # a rebalance waits for what is routed to settle
                    if self._revocation_seq > polled_at:
                        # taken away before we could route them: the next owner (this
                        # replica too, if the group gives them back) reads them again
                        gone = frozenset().union(
                            *(r for n, r in self._revocations if n > polled_at)
                        )
                        envs = [e for e in envs if (e.topic, e.partition) not in gone]
                    if envs:
                        self._inflight.append(await self._route_batch(envs))
                    await self._settle_batches(
                        block=len(self._inflight) > self.max_inflight_batches
                    )
                    await self._retry_held()
            except asyncio.CancelledError:
                raise
            except GoodServeError as e:
                log.warning("dispatcher.request_loop_error", error=str(e), retriable=e.retriable)
                await asyncio.sleep(0.5)
            except Exception:  # keep the service alive; the batch is re-read (not committed)
                log.exception("dispatcher.request_loop_crash")
                await asyncio.sleep(0.5)
        try:  # stopping: what was routed is acknowledged and committed before the loop ends
            async with self._batch_lock:
                await self._settle_batches(drain=True)
        except GoodServeError as e:
            log.warning("dispatcher.final_settle_failed", error=str(e))

    async def _on_requests_revoked(self, revoked: frozenset[tuple[str, int]]) -> None:
        """The group takes partitions away: settle and commit everything routed so far, so
        the next owner starts right after it (nothing routed twice), and leave the held
        requests of those partitions to it (no commit ever passed them)."""
        self._revocation_seq += 1
        self._revocations.append((self._revocation_seq, revoked))
        async with self._batch_lock:
            try:
                await self._settle_batches(drain=True)
            except GoodServeError as e:  # abandoned and rewound: the next owner redoes it
                log.warning("dispatcher.settle_on_revoke_failed", error=str(e))
            kept: deque[tuple[Envelope[AgentRequest], float]] = deque()
            gone = 0
            for h in self.held:
                if (h[0].topic, h[0].partition) in revoked:
                    self.seen.discard(h[0].msg.request_id)
                    gone += 1
                else:
                    kept.append(h)
            self.held = kept
            self.stats.held_now = len(kept)
            for k in revoked:
                self._commit_targets.pop(k, None)
        log.info("dispatcher.partitions_revoked", partitions=sorted(p for _, p in revoked),
                 held_released=gone)

    async def handle_batch(self, envs: list[Envelope[AgentRequest]]) -> None:
        """Route a batch, wait for its records (and those of batches before it) to be
        acknowledged, then commit it."""
        async with self._batch_lock:
            self._inflight.append(await self._route_batch(envs))
            await self._settle_batches(drain=True)

    async def _route_batch(self, envs: list[Envelope[AgentRequest]]) -> _InFlight:
        """Route a batch and enqueue its records; the batch in flight, to settle later.

        Requests are validated first; those to route are predicted together (one forest
        walk for the poll) and then routed one by one in arrival order. Nothing is awaited
        but enqueueing: the request loop routes the next poll while this one's records are
        acknowledged (``_settle_batches`` commits batches in order once they are).
        """
        deliveries: list[Delivery] = []
        done: list[Envelope[AgentRequest]] = []
        now = time.time()
        routable = bool(self.est.usable(now).any())  # admission changes no instance's state
        admitted: list[Envelope[AgentRequest]] = []
        for env in envs:
            self.stats.received += 1
            with bound_context(request_id=env.msg.request_id):
                admission = await self._admit(env, now, deliveries, routable=routable)
            if isinstance(admission, Envelope):
                admitted.append(admission)
            elif admission != "held":
                done.append(env)
        if admitted and await self._prepare_predictions([e.msg for e in admitted]):
            now = time.time()  # the encoder took a while: route at the time it is now
        predicted = self._predict_batch([e.msg for e in admitted])
        for env, p in zip(admitted, predicted, strict=True):
            with bound_context(request_id=env.msg.request_id):
                outcome = await self._route(env, now, deliveries, predicted=p)
            if outcome != "held":
                done.append(env)
        return _InFlight(envs, done, deliveries)

    async def _settle_batches(self, *, block: bool = False, drain: bool = False) -> None:
        """Commit the batches in flight whose records are all acknowledged, oldest first.

        ``block``: wait for the oldest one; ``drain``: wait for all of them and for their
        commit. A batch is committed only after its own records and those of every batch
        before it are acknowledged. If any record was not acknowledged, every batch in
        flight is read again from the committed offsets (the idempotent producer makes
        re-sent records harmless; workers de-duplicate Assignments).
        """
        assert self._requests is not None
        while self._inflight:
            head = self._inflight[0]
            if not (block or drain) and not all(d.done() for d in head.deliveries):
                break
            try:
                for d in head.deliveries:
                    await d
            except GoodServeError:
                await self._abandon_inflight()
                raise
            self._inflight.popleft()
            block = False
            self._commit_later(head.done)
        if drain:
            await self._commit_flush()

    def _commit_later(self, done: list[Envelope[AgentRequest]]) -> None:
        """Commit past ``done`` (acknowledged) in the background: one commit in flight,
        later settles move its target (the request loop does not wait for the broker)."""
        if self.held:
            # never commit past a held request: it must survive a crash of this replica
            floor: dict[tuple[str, int], int] = {}
            for h, _ in self.held:
                k = (h.topic, h.partition)
                floor[k] = min(floor.get(k, h.offset), h.offset)
            done = [e for e in done if e.offset < floor.get((e.topic, e.partition), 1 << 62)]
        for e in done:
            self._aim_commit(e)
        if self._commit_targets and (self._committer is None or self._committer.done()):
            self._committer = asyncio.create_task(self._commit_loop(), name="dispatcher-commit")

    async def _commit_loop(self) -> None:
        assert self._requests is not None
        loop = asyncio.get_running_loop()
        while self._commit_targets:
            wait = self._last_commit + self.commit_interval_s - loop.time()
            if wait > 0:  # at most one commit per interval: later settles join this one
                await asyncio.sleep(wait)
            self._last_commit = loop.time()
            targets = list(self._commit_targets.values())
            self._commit_targets.clear()
            try:
                await self._requests.commit(targets)
            except GoodServeError as e:  # kept for the next commit; a crash re-delivers
                log.warning("dispatcher.commit_failed", error_code=e.code, error=str(e))
                mine = self._requests.assigned()  # a partition gone is its next owner's
                for t in targets:
                    if (t.topic, t.partition) in mine:
                        self._aim_commit(t)
                return

    def _aim_commit(self, e: Envelope[AgentRequest]) -> None:
        """The next commit goes past ``e`` unless it already goes further in its partition."""
        k = (e.topic, e.partition)
        cur = self._commit_targets.get(k)
        if cur is None or e.offset > cur.offset:
            self._commit_targets[k] = e

    async def _commit_flush(self) -> None:
        """Wait for the background commit (and for one more of what it left)."""
        for _ in range(2):
            task = self._committer
            if task is not None and not task.done():
                await asyncio.wait([task])
            if not self._commit_targets:
                return
            self._committer = asyncio.create_task(self._commit_loop(), name="dispatcher-commit")

    async def _abandon_inflight(self) -> None:
        """Some records in flight were not acknowledged: forget every batch in flight (and
        what is held) and read them again from the committed offsets."""
        assert self._requests is not None
        for b in self._inflight:
            for d in b.deliveries:
                d.discard()
            for env in b.envs:
                self.seen.discard(env.msg.request_id)
        self._inflight.clear()
        for h, _ in self.held:
            self.seen.discard(h.msg.request_id)
        self.held.clear()
        self.stats.held_now = 0
        task = self._committer
        if task is not None and not task.done():
            await asyncio.wait([task])  # the rewind reads the offsets it committed
        self._commit_targets.clear()
        await self._requests.rewind()

    async def _prepare_predictions(self, reqs: list[AgentRequest]) -> bool:
        """The predictor's encoder tier embeds the poll's new prompts in a worker thread
        (milliseconds of CPU each; torch releases the GIL), so that routing, on the event
        loop, finds them cached. True if it ran. A failure is logged and left to the
        routing of each request (which embeds its own prompt, or fails alone)."""
        predictor = self.router.predictor if self.router is not None else None
        if getattr(predictor, "encoder", None) is None:
            return False
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(
                predictor.prepare, [to_predictor_input(r, 0) for r in reqs]  # type: ignore[union-attr]
            )
        except Exception as e:
            log.warning("dispatcher.encoder_failed", error=repr(e), size=len(reqs))
        self.metrics.encoder_latency.observe(time.perf_counter() - t0)
        return True

    def _predict_batch(self, reqs: list[AgentRequest]) -> list[Predicted | None]:
        """Predicted lengths of a poll's requests at once; None where a request must be
        predicted on its own (a failure there is then that request's alone)."""
        if len(reqs) < 2 or self.router is None:
            return [None] * len(reqs)
        try:
            return list(self.router.predict(reqs))
        except Exception as e:  # one bad request must not fail the whole batch
            log.warning("dispatcher.batch_predict_failed", error=repr(e), size=len(reqs))
            return [None] * len(reqs)

    async def _admit(
        self,
        env: Envelope[AgentRequest],
        now: float,
        deliveries: list[Delivery],
        *,
        routable: bool,
    ) -> Envelope[AgentRequest] | str:
        """Validate a request: the envelope to route, or what became of it instead
        (``routable``: some instance can take work now; else valid requests are held)."""
        req = env.msg
        if req.arrival is None:
            req = _with(req, arrival=env.timestamp or now)
            env = Envelope(
                req, env.topic, env.partition, env.offset, env.key, env.timestamp, env.raw
            )
        try:
            models = self._served_models()
            validate_request(req, now, self.limits, models, self.default_slo_s,
                             size_bytes=len(env.raw) if env.raw else None)
            self.seen.check_and_add(req.request_id)
        except DuplicateRequest as e:
            # the first copy will produce the one result: only dead-letter this one
            await self._requests_dead_letter(env, e)
            return "dead-lettered"
        except GoodServeError as e:
            await self._reject(env, e, deliveries)
            return "rejected"
        if not routable:
            return self._hold(env, now)
        return env

    async def _route(
        self,
        env: Envelope[AgentRequest],
        now: float,
        deliveries: list[Delivery],
        *,
        predicted: Predicted | None = None,
    ) -> str:
        assert self.router is not None and self._producer is not None
        req = env.msg
        t0 = time.perf_counter()
        x = predicted.x if predicted is not None else to_predictor_input(req, input_tokens_of(req))
        out = self.router.route(
            req,
            now,
            predictor_input=x,
            block_hashes=self.block_hashes(req),
            predicted=predicted,
        )
        self.stats.decision_us.append((time.perf_counter() - t0) * 1e6)
        self.metrics.observe_decision(time.perf_counter() - t0, out.instance_id)
        s = self.settings
        sent = await self._send_decision(out.record(top_k=32))
        if sent is not None:
            deliveries.append(sent)
        if out.instance_id is None:
            self.seen.discard(req.request_id)
            err = Unschedulable(f"no instance can meet the deadline: {out.how}")
            deliveries.append(
                await self._producer.send_nowait(
                    req.reply_to or s.results_topic,
                    _rejection(req, err, out.decision_id),
                    key=req.request_id,
                )
            )
            self.stats.rejected += 1
            log.info("dispatcher.rejected", reason=out.how)
            return "rejected"
        a = Assignment(
            request=req,
            instance_id=out.instance_id,
            decision_id=out.decision_id,
            dispatched_at=time.time(),
            deadline=out.deadline,
            predicted_output_tokens=round(out.p50),
            predicted_output_p90=round(out.p90),
        )
        deliveries.append(
            await self._producer.send_nowait(
                s.instance_topic(out.instance_id), a, key=req.request_id, partition=0
            )  # an instance topic has one partition: no partitioner call per request
        )
        self.assignments[req.request_id] = a
        self.partition_of[req.request_id] = env.partition
        self.inputs[req.request_id] = x
        self.stats.assigned += 1
        log.debug(
            "dispatcher.assigned",
            instance_id=out.instance_id,
            decision_id=out.decision_id,
            planned=out.planned_tokens,
        )
        return "assigned"

    async def _send_decision(self, record: Decision) -> Delivery | None:
        """Enqueue a decision record; one too large for the producer goes without the
        instances' views (``views_omitted``, as ``decision_views_every`` leaves them out),
        and if still too large, without the request's prompt too (``prompt_omitted``;
        replay reads the recorded features, not the prompt). None: not even that fits.

        A view is about 0.7 KiB an instance, so past about 1,500 instances a record is
        more than aiokafka's default 1 MiB a request, and a prompt of nearly 1 MB fills a
        record alone: refused before it is sent, and refused again on every retry, which
        would hold up every request behind it.
        """
        producer = self._producer
        assert producer is not None
        topic, key = self.settings.decisions_topic, record.request_id
        steps = iter((_without_views, _without_prompt))

        def smaller(d: Decision, e: RecordTooLarge) -> Decision | None:
            step = next(steps, None)
            if step is _without_views:
                self.stats.decisions_too_large += 1
                if self.stats.decisions_too_large % 1000 == 1:  # the first, then 1 in 1,000
                    log.warning("dispatcher.decision_too_large", error=str(e),
                                instances=len(d.instances), count=self.stats.decisions_too_large,
                                hint="--decision-views-every N records the views in one of N")
            return step(d) if step is not None else None

        try:
            sent, _ = await send_fitting(
                lambda d: producer.send_nowait(topic, d, key=key), record, smaller
            )
        except RecordTooLarge as e:
            log.error("dispatcher.decision_not_recorded", error=str(e))
            return None
        return sent

    def block_hashes(self, req: AgentRequest) -> list[int] | None:
        """The prompt's chained KV-block hashes for the prefix index (token ids, else text,
        else the workflow's simulated prefix key: what the workers' engines cache)."""
        bs = self.router.prefix_index.block_size if self.router is not None else 16
        if req.prompt_token_ids:
            return block_hashes_for_tokens(req.prompt_token_ids, bs)
        if req.prompt:
            return block_hashes_for_text(req.prompt, bs)
        if req.workflow_id and req.input_tokens:
            return block_hashes_for_key(req.workflow_id, req.input_tokens, bs)
        return None

    def _hold(self, env: Envelope[AgentRequest], now: float) -> str:
        self.held.append((env, now))
        self.stats.held += 1
        self.stats.held_now = len(self.held)
        if self.stats.held % 100 == 1:
            log.warning(
                "dispatcher.holding",
                held=len(self.held),
                reason="no instance is alive: holding requests (backpressure)",
            )
        return "held"

    async def _retry_held(self) -> None:
        if not self.held:
            return
        now = time.time()
        if not self.est.usable(now).any():
            # expire held requests whose deadline passed
            return
        assert self._requests is not None
        await self._settle_batches(drain=True)  # commit(None) below covers all handed out
        batch = []
        while self.held:
            batch.append(self.held.popleft()[0])
        self.stats.held_now = 0
        if await self._prepare_predictions([e.msg for e in batch]):
            now = time.time()
        deliveries: list[Delivery] = []
        done = []
        for env in batch:
            if await self._route(env, now, deliveries) != "held":
                done.append(env)
        for d in deliveries:
            await d
        await self._requests.commit(None)  # nothing is held any more: all handed out is done

    async def _reject(
        self, env: Envelope[AgentRequest], err: GoodServeError, deliveries: list[Delivery]
    ) -> None:
        assert self._producer is not None
        req = env.msg
        self.stats.rejected += 1
        reply_to = req.reply_to if req.reply_to and is_topic_name(req.reply_to) else None
        deliveries.append(
            await self._producer.send_nowait(
                reply_to or self.settings.results_topic,
                _rejection(req, err, None),
                key=req.request_id,
            )
        )
        await self._requests_dead_letter(env, err)
        log.info("dispatcher.invalid_request", error_code=err.code, error=str(err))

    async def _requests_dead_letter(self, env: Envelope[Any], err: BaseException) -> None:
        assert self._requests is not None
        self.stats.dead_lettered += 1
        await self._requests.dead_letter(env, err)

    def _served_models(self) -> frozenset[str] | None:
        """Models the fleet serves; recomputed only when instances join (hot path)."""
        n = len(self.est.infos)
        if self._models_for != n:
            models = {i.model for i in self.est.infos}
            self._models = None if not models or "default" in models else frozenset(models)
            self._models_for = n
        return self._models

    async def _ensure_instance_topic(self, instance_id: str) -> None:
        """Create an instance's topic once per process, not once per message."""
        if instance_id not in self._instance_topics:
            await ensure_topics(self.settings, [instance_topic_spec(self.settings, instance_id)])
            self._instance_topics.add(instance_id)

    # ------------------------------------------------------------------ fleet state
    async def _fleet_loop(self) -> None:
        assert self._fleet_consumer is not None
        while not self._stopping.is_set():
            try:
                envs = await self._fleet_consumer.getmany(timeout_ms=50)
                learned: list[tuple[Any, int]] = []
                try:
                    for k, env in enumerate(envs):
                        invalid = self._observe(env.msg, learned)
                        if invalid is not None:
                            await self._fleet_consumer.dead_letter(env, invalid)
                        if k % 8 == 7:  # a bulk fetch of results must not hold up a poll
                            self._learn(learned)
                            await asyncio.sleep(0)
                finally:
                    self._learn(learned)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatcher.fleet_loop_error")
                await asyncio.sleep(0.2)

    def observe(self, msg: Any) -> None:
        """Learn from a heartbeat, a result or a checkpoint (no I/O)."""
        learned: list[tuple[Any, int]] = []
        self._observe(msg, learned)
        self._learn(learned)

    def _learn(self, learned: list[tuple[Any, int]]) -> None:
        """The predictor learns the lengths of the Results observed since the last call, in
        their order, in one batch (no decision runs in between: the same state as one by
        one, for one forest walk)."""
        if learned and self.router is not None:
            many = getattr(self.router.predictor, "observe_many", None)
            observe = getattr(self.router.predictor, "observe", None)
            if many is not None:
                many(learned)
            elif observe is not None:
                for x, y in learned:
                    observe(x, y)
        learned.clear()

    def _observe(self, msg: Any, learned: list[tuple[Any, int]]) -> InvalidReport | None:
        """Fold one fleet message in; a heartbeat or Result with impossible numbers is
        returned as the error to dead-letter it with: such a heartbeat is not used, such a
        Result settles its request without anything learnt from it."""
        now = time.time()
        problem = report_problem(msg) if isinstance(msg, (Heartbeat, Result)) else None
        if problem is not None:
            self.stats.invalid_reports += 1
            log.warning("dispatcher.invalid_report", error=problem,
                        instance_id=getattr(msg, "instance_id", None))
            if isinstance(msg, Result):
                self._on_result(msg, now, learned, learn=False)
            return InvalidReport(problem)
        if isinstance(msg, Heartbeat):
            if now - self._last_heartbeat > self.stale_after_s:
                # we heard nothing for a while (broker or this replica was cut off): give
                # every instance a fresh period before calling any of them dead
                self._blackout_until = now + self.stale_after_s
            self._last_heartbeat = now
            if self.router is not None:  # estimator and the prefix index's capacity mirror
                self.router.on_heartbeat(msg, now=now)
            else:
                self.est.on_heartbeat(msg, now=now)
            self.metrics.observe_heartbeat(msg)
            self._dead.discard(msg.instance_id)
            self._unheard.discard(msg.instance_id)
            if self.handovers:
                self._confirm_handovers(msg)
        elif isinstance(msg, Result):
            a = self.assignments.get(msg.request_id)
            self.metrics.observe_result(
                msg, a.predicted_output_tokens if a else None, a.predicted_output_p90 if a else None
            )
            self._on_result(msg, now, learned)
        elif isinstance(msg, Checkpoint):
            self._on_checkpoint(msg, now)
        return None

    def _on_checkpoint(self, ck: Checkpoint, now: float) -> None:
        """A source stopped a request: a migration (target set) or a drain (target None)."""
        rid = ck.request_id
        a = self.assignments.get(rid)
        if a is not None and a.resume is not None and a.resume.migrations >= ck.migrations:
            return  # already acted on (the topic is at-least-once; a rebuild re-reads it)
        prev = self.checkpoints.get(rid)
        if prev is not None and prev.migrations > ck.migrations:
            return
        self.checkpoints[rid] = ck
        if ck.target is None:
            if ck.source != "":
                # a draining worker handed the request back: dispatch it again, resuming
                self.handovers.pop(rid, None)
                self.orphans[rid] = _Orphan(ck.request, ck, a)
            return
        if a is not None and a.instance_id == ck.target:
            # the target's heartbeat confirmed the move before this record was read
            self.assignments[rid] = _with(a, resume=ck)
            return
        h = self.handovers.get(rid)
        if h is None or h.target != ck.target:
            # commanded by a monitor outside this process: learn of the move from here
            h = self.handovers[rid] = _Handover(ck.source, ck.target)
            self.est.move(rid, ck.target, now=now)
        h.checkpoint = ck
        if ck.target in self._dead:  # handed to an instance that is gone: resume elsewhere
            del self.handovers[rid]
            self.orphans[rid] = _Orphan(ck.request, ck, a)

    def _confirm_handovers(self, hb: Heartbeat) -> None:
        """A target that lists a request in its heartbeat has it: the move is done."""
        for p in hb.requests:
            h = self.handovers.get(p.request_id)
            if h is None or h.target != hb.instance_id:
                continue
            del self.handovers[p.request_id]
            a = self.assignments.get(p.request_id)
            if a is not None:
                self.assignments[p.request_id] = _with(
                    a,
                    instance_id=h.target,
                    attempt=a.attempt + 1,
                    resume=h.checkpoint if h.checkpoint is not None else a.resume,
                )

    def _on_result(
        self, r: Result, now: float, learned: list[tuple[Any, int]], *, learn: bool = True
    ) -> None:
        if self._rebuilding:
            self._results_while_rebuilding.add(r.request_id)
        if r.status in ("rejected",):
            return
        self.stats.results += 1
        self.stats.met += bool(r.met_deadline)
        if not learn:  # settled, nothing learnt from its numbers
            self.est.on_finish(r.request_id, now=now)
        else:
            if r.first_token_at and r.dispatched_at:
                self.est.on_first_token(r.request_id, now=now)
            decode_s = None
            if r.first_token_at and r.finished_at and r.migrations == 0:
                decode_s = r.finished_at - r.first_token_at
            self.est.on_finish(r.request_id, now=now, output_tokens=r.output_tokens,
                               decode_s=decode_s)
        x = self.inputs.pop(r.request_id, None)
        if learn and x is not None and r.status == "ok":
            learned.append((x, r.output_tokens))  # the predictor learns it in _learn
        self._forget(r.request_id)

    def _forget(self, rid: str) -> None:
        """A request is settled (its Result arrived, or it was rejected): drop its state."""
        self.assignments.pop(rid, None)
        self.checkpoints.pop(rid, None)
        self.orphans.pop(rid, None)
        self.handovers.pop(rid, None)
        self.partition_of.pop(rid, None)

    # ------------------------------------------------------------------ monitor, liveness
    async def _housekeeping_loop(self) -> None:
        period = self.monitor.config.period_s if self.monitor else 0.5
        while not self._stopping.is_set():
            await asyncio.sleep(period)
            try:
                await self._sync_ownership()
                await self._reissue_from_dead()
                if self.monitor is not None and self._policy.migrate:
                    await self.migrate_at_risk()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatcher.housekeeping_error")

    async def migrate_at_risk(self) -> int:
        """One risk-monitor round: command the migrations it plans; returns how many were
        commanded."""
        assert self.monitor is not None
        now = time.time()
        plans = self.monitor.plan(self.est, now)
        done = 0
        for plan in plans:
            try:
                await self.command_migration(
                    plan.request_id,
                    plan.target,
                    source=plan.source,
                    reason=plan.reason,
                    risk=plan.risk,
                    remaining_tokens=plan.remaining_tokens,
                    now=now,
                )
            except GoodServeError as e:  # the next round plans it again; the others go on
                log.error("dispatcher.migration_failed", request_id=plan.request_id,
                          target=plan.target, error_code=e.code, error=str(e))
                continue
            self.monitor.record(plan)
            done += 1
        return done

    async def command_migration(
        self,
        request_id: str,
        target: str,
        *,
        source: str | None = None,
        reason: str = "operator",
        risk: float = 0.0,
        remaining_tokens: float | None = None,
        now: float | None = None,
    ) -> MigrationCommand:
        """Move a running request to ``target``: the ``MigrationCommand`` goes to its
        instance's topic (and to the ``migrations`` audit topic); the source checkpoints it
        and hands it to ``target``. ``source`` defaults to where this replica placed it."""
        assert self._producer is not None
        now = time.time() if now is None else now
        a = self.assignments.get(request_id)
        if source is None:
            if a is None:
                raise ValueError(f"request {request_id!r} is not placed by this dispatcher")
            source = a.instance_id
        cmd = MigrationCommand(
            migration_id=uuid.uuid4().hex,
            request_id=request_id,
            source=source,
            target=target,
            at=now,
            reason=reason,
            risk=risk,
            deadline=a.deadline if a else 0.0,
        )
        await self._ensure_instance_topic(target)
        await self._producer.send(self.settings.instance_topic(source), cmd, key=request_id)
        await self._producer.send(self.settings.migrations_topic, cmd, key=request_id)
        self.est.move(request_id, target, now=now, remaining_tokens=remaining_tokens)
        if a is not None:
            # still on the source for reissuing until the target reports it (_Handover)
            self.handovers[request_id] = _Handover(source, target)
        self.stats.migrations += 1
        log.info(
            "dispatcher.migration",
            request_id=request_id,
            source=source,
            target=target,
            risk=round(risk, 3),
            reason=reason,
        )
        return cmd

    async def _reissue_from_dead(self) -> None:
        """Instances whose heartbeats stopped: re-dispatch what they held (from checkpoints).

        Nothing is declared dead while this replica itself hears no heartbeats at all (a
        broker outage looks like every instance dying): expiry waits one stale period after
        heartbeats resume. Requests that no live instance can take yet stay orphans and are
        retried every round, never rejected for the lack of an instance.
        """
        assert self._producer is not None
        now = time.time()
        if now - self._last_heartbeat <= self.stale_after_s and now >= self._blackout_until:
            for iid in self.est.expire(now):
                self._instance_died(iid, now)
            # rebuilt placements on instances this replica never heard from: gone
            for iid in sorted(self._unheard):
                self._instance_died(iid, now)
            self._unheard.clear()
        if not self.orphans or not self.est.usable(now).any():
            return
        own = self._ownership()
        if own is None:
            return  # the group has not given this replica its partitions yet
        # a restarted dispatcher's encoder tier has none of these prompts cached yet
        if await self._prepare_predictions([o.request for o in self.orphans.values()]):
            now = time.time()
        for rid, o in list(self.orphans.items()):
            if rid not in self.orphans or not self._owns(rid, o.request, own):
                continue  # another replica owns it and reissues it
            ck = self._latest_checkpoint(rid, o.checkpoint)
            try:
                if (
                    o.prefer is not None
                    and o.assignment is not None
                    and self._usable(o.prefer, now)
                ):
                    await self._hand_over(rid, o, ck, now)
                else:
                    await self._reissue(rid, o.request, ck, o.assignment, now)
            except GoodServeError as e:  # it stays an orphan; the ones after it go on
                log.error("dispatcher.reissue_failed", request_id=rid, error_code=e.code,
                          error=str(e))

    # ------------------------------------------------------------------ ownership, rebuild
    def _ownership(self) -> tuple[frozenset[int], int] | None:
        """(the requests-topic partitions this replica owns now, the topic's partitions)."""
        c = self._requests._consumer if self._requests is not None else None
        if c is None:
            return None
        topic = self.settings.requests_topic
        n = len(c.partitions_for_topic(topic) or ())
        if n == 0:
            return None
        return frozenset(tp.partition for tp in c.assignment() if tp.topic == topic), n

    def _owns(self, rid: str, req: AgentRequest, own: tuple[frozenset[int], int]) -> bool:
        """Whether this replica reissues ``rid``: it owns the request's partition."""
        p = self.partition_of.get(rid)
        return (p if p is not None else request_partition(req, own[1])) in own[0]

    async def _sync_ownership(self) -> None:
        """Follow the group: forget placements of partitions taken away, rebuild those of
        partitions given (all of them when this replica starts)."""
        own = self._ownership()
        if own is None or not own[0] or own[0] == self._owned:
            return  # no partitions (yet, or in the middle of a rebalance): nothing changes
        mine, n = own
        before = self._owned or frozenset()
        if before - mine:
            self._drop_partitions(before - mine, n)
        gained = mine - before
        if gained and self.rebuild_lookback_s > 0:
            try:
                await self.rebuild_placements(gained, n)
            except GoodServeError as e:
                self._rebuild_failures += 1
                if self._rebuild_failures < 3:  # retried next round
                    log.warning("dispatcher.rebuild_failed", error_code=e.code, error=str(e))
                    return
                log.error(
                    "dispatcher.rebuild_abandoned",
                    error_code=e.code,
                    error=str(e),
                    partitions=sorted(gained),
                    consequence="placements made before this replica owned these "
                    "partitions are not reissued if their worker dies",
                )
        self._rebuild_failures = 0
        self._owned = mine

    def _drop_partitions(self, lost: frozenset[int], n: int) -> None:
        """The group gave these partitions to another replica, which rebuilds their
        placements: keeping them here would reissue its requests a second time."""
        reqs = {rid: a.request for rid, a in self.assignments.items()}
        reqs.update((rid, o.request) for rid, o in self.orphans.items())
        dropped = 0
        for rid, req in reqs.items():
            p = self.partition_of.get(rid)
            if (p if p is not None else request_partition(req, n)) in lost:
                self._forget(rid)
                dropped += 1
        log.info("dispatcher.partitions_lost", partitions=sorted(lost), dropped=dropped)

    async def rebuild_placements(self, partitions: frozenset[int], n: int) -> int:
        """Restore the in-flight placements of requests in ``partitions`` (of ``n``).

        Reads (within ``rebuild_lookback_s``) every instance topic from its worker group's
        committed offset (the worker's unsettled Assignments: queued, running, or settled
        out of order), the checkpoints topic, and the Results since the oldest of those;
        keeps per request the latest Assignment (highest attempt) with no Result, and a
        checkpoint newer than it (a drain hands the request back; a migration not yet
        confirmed is a handover). A placement this replica made meanwhile wins. Returns the
        number of placements restored.
        """
        s = self.settings
        t0 = time.time()
        since_ms = int((t0 - self.rebuild_lookback_s) * 1000)
        self._rebuilding = True
        self._results_while_rebuilding.clear()
        consumer = AIOKafkaConsumer(
            **kafka_client_kwargs(s, role="consumer", client_id=f"{s.client_id}-rebuild"),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=50,
        )
        admin = AIOKafkaAdminClient(**kafka_client_kwargs(s, role="admin"))
        try:
            with kafka_errors("rebuild placements"):
                await consumer.start()
                await admin.start()
                placed, cks, finished, scanned = await self._read_placements(
                    consumer, admin, partitions, n, since_ms
                )
            return self._install(placed, cks, finished, partitions, n, scanned, t0)
        finally:
            self._rebuilding = False
            self._results_while_rebuilding.clear()
            with kafka_errors("rebuild: close"):
                await consumer.stop()
                await admin.close()

    async def _read_placements(
        self,
        consumer: AIOKafkaConsumer,
        admin: AIOKafkaAdminClient,
        partitions: frozenset[int],
        n: int,
        since_ms: int,
    ) -> tuple[dict[str, tuple[Assignment, int]], dict[str, Checkpoint], set[str], int]:
        s = self.settings
        parts = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in await admin.describe_topics()
            if not t.get("error_code")
        }
        prefix = s.instance_topic("")
        topics = sorted(t for t in parts if t.startswith(prefix))
        inst = [TopicPartition(t, p) for t in topics for p in parts[t]]

        async def committed(topic: str) -> dict[TopicPartition, int]:
            tps = [tp for tp in inst if tp.topic == topic]
            group = WORKER_GROUP.format(topic[len(prefix) :])
            try:
                got = await admin.list_consumer_group_offsets(group, partitions=tps)
            except Exception as e:  # no floor: the whole window is read, which is only slower
                log.info("dispatcher.rebuild_no_offsets", group=group, error=str(e))
                return {}
            return {tp: md.offset for tp, md in got.items() if md is not None and md.offset >= 0}

        floors: dict[TopicPartition, int] = {}
        for part in await asyncio.gather(*(committed(t) for t in topics)):
            floors.update(part)
        ck_tps = [
            TopicPartition(s.checkpoints_topic, p) for p in parts.get(s.checkpoints_topic, ())
        ]
        ranges = await _ranges_since(consumer, [*inst, *ck_tps], since_ms, floors)
        records = await _read_ranges(consumer, ranges)
        placed: dict[str, tuple[Assignment, int]] = {}
        cks: dict[str, tuple[Checkpoint, int]] = {}
        for r in records:
            try:
                msg = decode(r.value or b"")
            except GoodServeError:
                continue  # dead-lettered by its consumer; nothing to restore
            if isinstance(msg, Assignment):
                rid = msg.request.request_id
                if request_partition(msg.request, n) not in partitions:
                    continue
                cur = placed.get(rid)
                if cur is None or (msg.attempt, msg.dispatched_at) >= (
                    cur[0].attempt,
                    cur[0].dispatched_at,
                ):
                    placed[rid] = (msg, r.timestamp)
            elif isinstance(msg, Checkpoint) and r.topic == s.checkpoints_topic:
                if request_partition(msg.request, n) not in partitions:
                    continue
                prev = cks.get(msg.request_id)
                if prev is None or msg.migrations >= prev[0].migrations:
                    cks[msg.request_id] = (msg, r.timestamp)
        # Results can only follow the records they settle: read them from the oldest
        # record that may still be waiting for one (an unsettled Assignment, a drain
        # checkpoint nobody dispatched again), not from the start of the window
        waiting = [ts for _, ts in placed.values()]
        waiting += [ts for rid, (ck, ts) in cks.items() if ck.target is None and rid not in placed]
        oldest = min(waiting, default=None)
        finished: set[str] = set()
        if oldest is not None:
            res_topics = {s.results_topic}
            res_topics.update(a.request.reply_to for a, _ in placed.values() if a.request.reply_to)
            res_tps = [TopicPartition(t, p) for t in sorted(res_topics) for p in parts.get(t, ())]
            res_ranges = await _ranges_since(consumer, res_tps, oldest, {})
            for r in await _read_ranges(consumer, res_ranges):
                try:
                    key = msgspec.json.decode(r.value or b"", type=_ResultKey)
                except msgspec.MsgspecError:
                    continue
                if key.kind == "result":
                    finished.add(key.request_id)
        return placed, {rid: ck for rid, (ck, _) in cks.items()}, finished, len(records)

    def _install(
        self,
        placed: dict[str, tuple[Assignment, int]],
        cks: dict[str, Checkpoint],
        finished: set[str],
        partitions: frozenset[int],
        n: int,
        scanned: int,
        t0: float,
    ) -> int:
        """Put what a rebuild read into the tables (no awaits: the fleet loop cannot
        interleave; Results it saw while the rebuild read are in _results_while_rebuilding)."""
        now = time.time()
        done = finished | self._results_while_rebuilding
        restored = handed_back = 0
        for rid, (a, _ts) in placed.items():
            cur = self.assignments.get(rid)
            if rid in done or (cur is not None and cur.dispatched_at >= a.dispatched_at):
                continue  # finished, or placed by this replica since
            self.assignments[rid] = a
            self.partition_of[rid] = request_partition(a.request, n)
            if a.resume is not None:
                self.checkpoints[rid] = self._latest_checkpoint(rid, a.resume) or a.resume
            restored += 1
            if not self._alive(a.instance_id):
                self._unheard.add(a.instance_id)
            ck = cks.get(rid)
            if ck is not None and ck.migrations > (a.resume.migrations if a.resume else 0):
                self._on_checkpoint(ck, now)  # a drain or a handover not confirmed yet
                if ck.target is not None and not self._alive(ck.target):
                    self._unheard.add(ck.target)
        for rid, ck in cks.items():
            if (
                ck.target is None
                and ck.source != ""
                and rid not in placed
                and rid not in done
                and rid not in self.assignments
                and rid not in self.orphans
            ):
                # handed back by a draining worker and never dispatched again
                self._on_checkpoint(ck, now)
                handed_back += 1
        self.stats.rebuilds += 1
        self.stats.restored += restored
        log.info(
            "dispatcher.rebuilt",
            partitions=sorted(partitions),
            restored=restored,
            handed_back=handed_back,
            unheard_instances=sorted(self._unheard),
            records=scanned,
            seconds=round(time.time() - t0, 3),
        )
        return restored

    def _alive(self, iid: str) -> bool:
        i = self.est.index.get(iid)
        return i is not None and bool(self.est.alive[i])

    def _instance_died(self, iid: str, now: float) -> None:
        """Make orphans of what a dead instance held, and of what was being handed to it.

        A request moving from a dead source to a live target goes to that target (the
        source may have died before sending the resuming Assignment); one that a source
        had already checkpointed for a dead target is resumed elsewhere from the checkpoint.
        A request still running on a live source, its move to the dead target not begun,
        stays where it is (its checkpoint, when it comes, makes it an orphan).
        """
        self._dead.add(iid)
        if iid in self.est.index:
            for tr in self.est.mark_dead(iid):
                self.est.on_finish(tr.request_id, now=now)
            if self.router is not None:  # its KV cache and sticky sessions are gone
                self.router.forget_instance(iid)
        n = 0
        for rid, a in list(self.assignments.items()):
            if a.instance_id != iid:
                continue
            h = self.handovers.pop(rid, None)
            prefer = (
                h.target
                if h is not None and h.source == iid and h.target not in self._dead
                else None
            )
            ck = self._latest_checkpoint(rid, h.checkpoint if h is not None else None)
            self.orphans[rid] = _Orphan(a.request, ck, a, prefer)
            n += 1
        for rid, h in list(self.handovers.items()):
            if h.target == iid and h.checkpoint is not None:
                del self.handovers[rid]
                self.orphans[rid] = _Orphan(
                    h.checkpoint.request,
                    self._latest_checkpoint(rid, h.checkpoint),
                    self.assignments.get(rid),
                )
                n += 1
        log.warning("dispatcher.instance_dead", instance_id=iid, requests=n)

    def _latest_checkpoint(self, rid: str, ck: Checkpoint | None) -> Checkpoint | None:
        known = self.checkpoints.get(rid)
        if ck is None or (known is not None and known.migrations > ck.migrations):
            return known
        return ck

    def _usable(self, iid: str, now: float) -> bool:
        i = self.est.index.get(iid)
        return i is not None and bool(self.est.usable(now)[i])

    async def _hand_over(self, rid: str, o: _Orphan, ck: Checkpoint | None, now: float) -> None:
        """Finish a dead source's handover: the Assignment it would have sent to the target."""
        assert self._producer is not None and o.assignment is not None and o.prefer is not None
        a, target = o.assignment, o.prefer
        new = Assignment(
            request=o.request,
            instance_id=target,
            decision_id=a.decision_id,
            dispatched_at=now,
            deadline=a.deadline,
            predicted_output_tokens=a.predicted_output_tokens,
            predicted_output_p90=a.predicted_output_p90,
            attempt=a.attempt + 1,
            resume=ck.for_assignment() if ck is not None else None,
        )
        await self._ensure_instance_topic(target)
        new = await self._send_resuming(new)
        del self.orphans[rid]
        self.assignments[rid] = new
        generated = len(new.resume.generated_token_ids) if new.resume is not None else 0
        tr = self.est.requests.get(rid)
        if (
            tr is None or self.est.infos[tr.slot].instance_id != target
        ) and target in self.est.index:
            self.est.on_assign(
                target,
                request_id=rid,
                input_tokens=o.request.input_tokens or 0,
                planned_tokens=float(max(a.predicted_output_tokens, generated + 1)),
                deadline=a.deadline,
                now=now,
                generated=generated,
            )
        self.stats.reissued += 1
        log.info(
            "dispatcher.reissued",
            request_id=rid,
            instance_id=target,
            handover=True,
            from_checkpoint=ck is not None,
            resumed_tokens=generated,
        )

    async def _send_resuming(self, a: Assignment) -> Assignment:
        """Produce a reissued Assignment; one whose checkpoint makes it too large for a
        record goes without the checkpoint's progress (the instance restarts the request
        from its prompt). Returns what was sent."""
        producer = self._producer
        assert producer is not None
        topic, rid = self.settings.instance_topic(a.instance_id), a.request.request_id

        def smaller(a: Assignment, e: RecordTooLarge) -> Assignment | None:
            if a.resume is None or a.resume.progress_dropped:
                return None
            log.warning("dispatcher.resume_too_large", request_id=rid, error=str(e),
                        generated=len(a.resume.generated_token_ids))
            return msgspec.structs.replace(a, resume=a.resume.without_progress())

        _, a = await send_fitting(lambda a: producer.send(topic, a, key=rid), a, smaller)
        return a

    async def _reissue(
        self, rid: str, req: AgentRequest, ck: Checkpoint | None, a: Assignment | None, now: float
    ) -> None:
        assert self.router is not None and self._producer is not None
        x = self.inputs.get(rid)
        out = self.router.route(req, now, predictor_input=x, block_hashes=self.block_hashes(req))
        if out.instance_id is None:
            if self.est.usable(now).any():
                self._forget(rid)
                await self._producer.send(
                    req.reply_to or self.settings.results_topic,
                    _rejection(
                        req,
                        Unschedulable(f"its instance died and no other can take it: {out.how}"),
                        None,
                    ),
                    key=rid,
                )
            return
        deadline = a.deadline if a is not None else out.deadline
        new = Assignment(
            request=req,
            instance_id=out.instance_id,
            decision_id=out.decision_id,
            dispatched_at=now,
            deadline=deadline,
            predicted_output_tokens=int(out.p50),
            predicted_output_p90=int(out.p90),
            attempt=(a.attempt if a is not None else 0) + 1,
            resume=ck.for_assignment() if ck is not None else None,
        )
        await self._ensure_instance_topic(out.instance_id)
        new = await self._send_resuming(new)
        sent = await self._send_decision(out.record(top_k=32))
        if sent is not None:
            await sent
        del self.orphans[rid]
        self.assignments[rid] = new
        if x is None:
            self.inputs[rid] = to_predictor_input(req, out.input_tokens)
        self.stats.reissued += 1
        log.info(
            "dispatcher.reissued",
            request_id=rid,
            instance_id=out.instance_id,
            from_checkpoint=ck is not None,
            resumed_tokens=len(new.resume.generated_token_ids) if new.resume is not None else 0,
        )


def _without_views(record: Decision) -> Decision:
    """A decision record without the instances' views (``views_omitted``)."""
    config = {**record.config, "views_omitted": True}
    return msgspec.structs.replace(record, instances=[], config=config)


def _without_prompt(record: Decision) -> Decision:
    """A decision record without the request's prompt (``prompt_omitted``; replay reads the
    recorded features, not the prompt)."""
    req = msgspec.structs.replace(record.request, prompt=None, prompt_token_ids=None)
    config = {**record.config, "prompt_omitted": True}
    return msgspec.structs.replace(record, request=req, config=config)


async def _ranges_since(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    since_ms: int,
    floors: dict[TopicPartition, int],
) -> dict[TopicPartition, tuple[int, int]]:
    """[first offset at or after ``since_ms`` (or the floor, if later), end) per partition."""
    if not tps:
        return {}
    ends = await consumer.end_offsets(tps)
    at = await consumer.offsets_for_times({tp: since_ms for tp in tps})
    out = {}
    for tp in tps:
        found = at.get(tp)
        start = found.offset if found is not None else ends[tp]
        out[tp] = (max(start, floors.get(tp, 0)), ends[tp])
    return out


async def _read_ranges(
    consumer: AIOKafkaConsumer,
    ranges: dict[TopicPartition, tuple[int, int]],
    timeout_s: float = 60.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record in [start, end) of each partition."""
    todo = {tp: r for tp, r in ranges.items() if r[0] < r[1]}
    out: list[ConsumerRecord[bytes, bytes]] = []
    if not todo:
        return out
    consumer.assign(list(todo))
    for tp, (start, _) in todo.items():
        consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while todo:
        if loop.time() > give_up:
            raise TransportError(f"rebuild: reading {len(todo)} partitions took > {timeout_s}s")
        batch = await consumer.getmany(*todo, timeout_ms=200)
        for tp, recs in batch.items():
            end = ranges[tp][1]
            out.extend(r for r in recs if r.offset < end)
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp][1]:
                del todo[tp]
    return out


def _with(msg: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(msg, **changes)


def _rejection(req: AgentRequest, err: GoodServeError, decision_id: str | None) -> Result:
    return Result(
        request_id=req.request_id,
        status="rejected",
        decision_id=decision_id,
        workflow_id=req.workflow_id,
        arrival=req.arrival,
        finished_at=time.time(),
        deadline=req.deadline,
        met_deadline=False,
        error=ErrorInfo(code=err.code, message=str(err), retriable=err.retriable),
    )
