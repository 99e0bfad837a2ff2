"""A worker crashing in the middle of a migration, on real Kafka with simulated engines.

Two instances: ``src`` (H100) and ``dst`` (A100); the dispatcher routes with
``fastest-gpu``, so every request starts on ``src``. Two requests are moved ``src -> dst``
while they run, each by one of the two ways a migration is commanded in GoodServe:

- by the dispatcher itself (``DispatcherService.command_migration``, what its in-process
  risk monitor does), which knows at once that the request is on the move;
- by the standalone monitor (a ``MigrationCommand`` produced to ``instance.src``, as
  ``MonitorService.round`` does), which the dispatcher learns of only from the
  ``Checkpoint`` the source publishes.

Then one worker dies for good (it is never restarted, so nothing can paper over a lost
request):

- the source, with a failpoint (``goodserve.chaos.failpoints``) that makes the process
  ``os._exit(137)`` right after the first migration's Checkpoint is acknowledged and before
  the resuming Assignment is sent to the target; the second request's command is in the
  source's topic and never read: one request dies after its checkpoint, one before;
- the target, with ``kill -9`` while it runs both resumed requests.

Each request must end with exactly one Result record on the results topic (not only one
after the client's de-duplication: with the crashed worker gone for good the design
produces no duplicate), status ok, with the very token ids of an uninterrupted run, and
where a Checkpoint was published the reissue must resume from it: the surviving engine
generates exactly the tokens the checkpoint did not hold.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest, Checkpoint, MigrationCommand, Result
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id
from goodserve.workers.service import WorkerService
from live_helpers import (
    assert_one_result_record_each,
    collect_results,
    log_events,
    read_all,
    usable,
    wait_for,
)

from goodserve.chaos.failpoints import ENV as FAILPOINTS_ENV
from goodserve.chaos.failpoints import EXIT_CODE
from goodserve.chaos.load import CountingClient
from goodserve.chaos.procs import worker_proc
from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import TypedProducer, ensure_topics, instance_topic_spec
from goodserve.transport.topics import standard_topics

pytestmark = pytest.mark.kafka

SRC, DST = "src", "dst"
FLEET = Fleet(instances=[FleetInstance(id=SRC, gpu="H100"), FleetInstance(id=DST, gpu="A100")])
OUTPUT = 400  # tokens per request: ~4 s on the simulated H100, ~6 s on the A100
STALE_S = 2.0
PATHS = ("dispatcher", "monitor")


def expected_ids(rid: str) -> list[int]:
    """The token ids of an uninterrupted run (the simulated engine's are deterministic)."""
    return [synthetic_token_id(rid, p) for p in range(OUTPUT)]


def request(rid: str) -> AgentRequest:
    return AgentRequest(
        request_id=rid,
        input_tokens=200,
        max_tokens=OUTPUT,
        slo_s=120.0,
        metadata={"sim_output_tokens": str(OUTPUT)},
    )


class Rig:
    """Dispatcher in process, one worker as an OS process (the victim), one in process."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        victim: str,
        victim_env: dict[str, str] | None = None,
    ) -> None:
        self.s = settings
        self.victim_id = victim
        self.survivor_id = DST if victim == SRC else SRC
        gpu = {i.id: i.gpu for i in FLEET.instances}
        self.victim = worker_proc(
            settings,
            workdir / "logs",
            victim,
            gpu[victim],
            time_scale=1.0,
            heartbeat_s=0.2,
            extra_env=victim_env or {},
        )
        self.engine = SimulatedEngine(instance_id=self.survivor_id, gpu=gpu[self.survivor_id])
        self.survivor = WorkerService(
            settings=settings,
            instance_id=self.survivor_id,
            engine=self.engine,
            gpu=gpu[self.survivor_id],
            model="llama-2-7b",
            heartbeat_period_s=0.2,
        )
        self.d = DispatcherService(
            settings=settings,
            policy="fastest-gpu",
            fleet=FLEET,
            predictor=ConstantPredictor(float(OUTPUT), float(OUTPUT)),
            monitor=False,
            stale_after_s=STALE_S,
            default_slo_s=120.0,
        )
        self.client = CountingClient(settings=settings)
        self.producer = TypedProducer(settings=settings, client_id="test-monitor")

    async def __aenter__(self) -> Rig:
        s = self.s
        await ensure_topics(
            s, [*standard_topics(s), *(instance_topic_spec(s, i.id) for i in FLEET.instances)]
        )
        self.victim.start()
        await self.survivor.start()
        await self.d.start()
        await self.client.start()
        await self.producer.start()
        await wait_for(
            lambda: usable(self.d, SRC) and usable(self.d, DST), "both workers alive", 60
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.victim.stop)
        await self.producer.stop()
        await self.client.stop()
        await self.d.stop()
        await self.survivor.stop(drain_timeout_s=0.0)

    async def submit(self, rids: list[str]) -> None:
        for rid in rids:
            await self.client.submit(request(rid))
        await wait_for(
            lambda: all(self.d.assignments.get(r) is not None for r in rids),
            "the requests to be placed",
        )
        assert {self.d.assignments[r].instance_id for r in rids} == {SRC}
        # running, with tokens to checkpoint (heartbeats report the progress)
        await wait_for(
            lambda: all(
                (tr := self.d.est.requests.get(r)) is not None and tr.generated >= 40 for r in rids
            ),
            "the requests to run on src",
        )

    async def migrate(self, rid: str, path: str) -> None:
        """Command ``rid``'s move src -> dst the dispatcher's way or the monitor's way."""
        if path == "dispatcher":
            await self.d.command_migration(rid, DST, reason="test")
            return
        cmd = MigrationCommand(
            migration_id=f"test-{rid}",
            request_id=rid,
            source=SRC,
            target=DST,
            at=time.time(),
            reason="test",
        )
        await self.producer.send(self.s.instance_topic(SRC), cmd, key=rid)
        await self.producer.send(self.s.migrations_topic, cmd, key=rid)

    async def results(self, rids: list[str], timeout_s: float = 60.0) -> dict[str, Result]:
        return await collect_results(self.client, rids, timeout_s)

    def assert_exactly_once(self, rids: list[str], results: dict[str, Result]) -> None:
        assert_one_result_record_each(self.client, rids)
        for rid in rids:
            res = results[rid]
            assert res.status == "ok", res
            assert res.instance_id == self.survivor_id
            assert res.output_tokens == OUTPUT
            assert res.output_token_ids == expected_ids(rid)  # as if never interrupted


@pytest.mark.parametrize("first", PATHS)
@pytest.mark.parametrize("crash_at", ["checkpointed", "resumed"])
async def test_source_dies_mid_migration(
    kafka_settings: Settings, tmp_path: Path, crash_at: str, first: str
) -> None:
    """The source checkpoints the first request and dies before handing it to the target
    (``checkpointed``) or after handing it over but before committing (``resumed``); the
    second request's command is in its topic, never read. Both finish once on the target:
    the first from its checkpoint, the second from the start."""
    second = PATHS[1 - PATHS.index(first)]
    rids = [f"a-{first}", f"a-{second}"]
    rig = Rig(
        kafka_settings,
        tmp_path,
        victim=SRC,
        victim_env={FAILPOINTS_ENV: f"worker.migration.{crash_at}"},
    )
    async with rig:
        await rig.submit(rids)
        await rig.migrate(rids[0], first)
        await rig.migrate(rids[1], second)
        await wait_for(lambda: not rig.victim.alive, "the source to crash at the failpoint")
        results = await rig.results(rids)
        reissued = rig.d.stats.reissued
    assert rig.victim.proc is not None and rig.victim.proc.returncode == EXIT_CODE
    assert [e["failpoint"] for e in log_events(rig.victim, "failpoint.crash")] == [
        f"worker.migration.{crash_at}"
    ]
    cks = [
        c
        for c in await read_all(kafka_settings, kafka_settings.checkpoints_topic, Checkpoint)
        if c.request_id in rids
    ]
    assert [(c.request_id, c.source, c.target) for c in cks] == [(rids[0], SRC, DST)]
    k = len(cks[0].generated_token_ids)
    assert k >= 40 and cks[0].generated_token_ids == expected_ids(rids[0])[:k]
    print(
        json.dumps(
            {
                "crash_at": crash_at,
                "first": first,
                "checkpointed_tokens": k,
                "reissued": reissued,
                "dst_generated": rig.engine.instance.tokens_generated,
            }
        )
    )
    rig.assert_exactly_once(rids, results)
    assert results[rids[0]].migrations == 1  # resumed from the checkpoint
    assert results[rids[1]].migrations == 0  # never checkpointed: run from its start
    # the target generated what the checkpoint did not hold, and the second request once
    assert rig.engine.instance.tokens_generated == (OUTPUT - k) + OUTPUT
    # the dispatcher sent both to the target, or only the second when the source had
    # handed the first over (the target reported it before the source was declared dead)
    assert reissued == (2 if crash_at == "checkpointed" else 1)


async def test_target_dies_while_running_resumed_requests(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Both requests are handed to the target (one per way of commanding a migration); the
    target is killed with -9 while it runs them. Each is reissued from its checkpoint to the
    source and finishes once."""
    rids = [f"b-{p}" for p in PATHS]
    rig = Rig(kafka_settings, tmp_path, victim=DST)
    async with rig:
        await rig.submit(rids)
        for rid, path in zip(rids, PATHS, strict=True):
            await rig.migrate(rid, path)

        def resumed_on_dst() -> set[str]:
            return {
                e["request_id"]
                for e in log_events(rig.victim, "worker.assigned")
                if e.get("resumed_tokens", 0) > 0
            }

        await wait_for(lambda: resumed_on_dst() >= set(rids), "the target to resume both")
        await asyncio.sleep(0.5)  # it generates some tokens of its own, then dies
        rig.victim.kill()
        results = await rig.results(rids)
        reissued = rig.d.stats.reissued
    assert not log_events(rig.victim, "worker.result")  # the target finished nothing
    cks = {
        c.request_id: c
        for c in await read_all(kafka_settings, kafka_settings.checkpoints_topic, Checkpoint)
    }
    assert sorted(cks) == sorted(rids)
    assert all((c.source, c.target) == (SRC, DST) for c in cks.values())
    ks = {r: len(cks[r].generated_token_ids) for r in rids}
    print(
        json.dumps(
            {
                "checkpointed_tokens": ks,
                "reissued": reissued,
                "src_generated": rig.engine.instance.tokens_generated,
            }
        )
    )
    rig.assert_exactly_once(rids, results)
    assert all(results[r].migrations == 1 for r in rids)  # resumed from the checkpoint
    # src generated k tokens of each before the migration and, resuming from the
    # checkpoint, the OUTPUT - k it did not hold: nothing twice
    assert rig.engine.instance.tokens_generated == len(rids) * OUTPUT
    assert reissued == 2
