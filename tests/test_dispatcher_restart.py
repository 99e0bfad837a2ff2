"""Placements survive a dispatcher restart and a change of replicas (real Kafka).

A request placed on a worker and then forgotten by the dispatcher (it restarted, or the
replica that routed it left the group) must still be reissued when that worker dies for
good. The dispatcher rebuilds its table of in-flight placements from the topics when the
group gives it partitions (``DispatcherService.rebuild_placements``), and only the replica
that owns a request's partition reissues it, so several replicas never reissue one request
twice.

Two instances: ``w-h100`` (an OS process, the victim; ``fastest-gpu`` routes everything
there) and ``w-a100`` (in process, simulated 5x faster than real time so that the
reissued requests finish quickly). The victim dies for good (``kill -9``, or ``SIGTERM``
with a 0.5 s drain, which checkpoints what runs and hands it back). Every request must end
with exactly one Result record on the results topic, from the survivor, with the token ids
of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.service import DispatcherService, request_partition
from goodserve.schemas import AgentRequest, Checkpoint, Result
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id
from goodserve.workers.service import WorkerService
from live_helpers import assert_one_result_record_each, collect_results, read_all, usable, wait_for

from goodserve.chaos.load import CountingClient
from goodserve.chaos.procs import worker_proc
from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import ensure_topics, instance_topic_spec
from goodserve.transport.topics import standard_topics

pytestmark = pytest.mark.kafka

VICTIM, SURVIVOR = "w-h100", "w-a100"
FLEET = Fleet(
    instances=[FleetInstance(id=VICTIM, gpu="H100"), FleetInstance(id=SURVIVOR, gpu="A100")]
)
OUTPUT = 1000  # ~12 s on the simulated H100 in real time: it outlives a restart
STALE_S = 2.0


def request(rid: str) -> AgentRequest:
    return AgentRequest(
        request_id=rid,
        input_tokens=200,
        max_tokens=OUTPUT,
        slo_s=300.0,
        metadata={"sim_output_tokens": str(OUTPUT)},
    )


def dispatcher(settings: Settings, seed: int = 0) -> DispatcherService:
    return DispatcherService(
        settings=settings,
        policy="fastest-gpu",
        fleet=FLEET,
        predictor=ConstantPredictor(float(OUTPUT), float(OUTPUT)),
        monitor=False,
        stale_after_s=STALE_S,
        default_slo_s=300.0,
        seed=seed,
    )


class Rig:
    """The victim worker as an OS process, the survivor in process, a counting client."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.victim = worker_proc(
            settings,
            workdir / "logs",
            VICTIM,
            "H100",
            time_scale=1.0,
            heartbeat_s=0.2,
            drain_timeout_s=0.5,
        )
        self.engine = SimulatedEngine(instance_id=SURVIVOR, gpu="A100", time_scale=0.2)
        self.survivor = WorkerService(
            settings=settings,
            instance_id=SURVIVOR,
            engine=self.engine,
            gpu="A100",
            model="llama-2-7b",
            heartbeat_period_s=0.2,
        )
        self.client = CountingClient(settings=settings)

    async def __aenter__(self) -> Rig:
        s = self.s
        await ensure_topics(
            s, [*standard_topics(s), *(instance_topic_spec(s, i.id) for i in FLEET.instances)]
        )
        self.victim.start()
        await self.survivor.start()
        await self.client.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.victim.stop)
        await self.client.stop()
        await self.survivor.stop(drain_timeout_s=0.0)

    async def place(self, ds: list[DispatcherService], rids: list[str]) -> None:
        """Submit; wait until every request runs on the victim."""
        for d in ds:
            await wait_for(lambda d=d: usable(d, VICTIM) and usable(d, SURVIVOR), "workers", 60)
        for rid in rids:
            await self.client.submit(request(rid))

        def placed() -> dict[str, Any]:
            return {r: a for d in ds for r, a in d.assignments.items()}

        await wait_for(lambda: set(rids) <= set(placed()), "the requests to be placed")
        assert {placed()[r].instance_id for r in rids} == {VICTIM}
        await wait_for(
            lambda: all(
                (tr := d.est.requests.get(r)) is not None and tr.generated > 0
                for d in ds
                for r in rids
                if r in d.assignments
            ),
            "the requests to run",
        )

    async def results(self, rids: list[str], timeout_s: float = 90.0) -> dict[str, Result]:
        return await collect_results(self.client, rids, timeout_s)

    def assert_exactly_once(self, rids: list[str], results: dict[str, Result]) -> None:
        assert_one_result_record_each(self.client, rids)
        for rid in rids:
            res = results[rid]
            assert res.status == "ok" and res.instance_id == SURVIVOR, res
            assert res.output_token_ids == [synthetic_token_id(rid, p) for p in range(OUTPUT)]


@pytest.mark.parametrize("worker_dies", ["after_restart", "before_restart"])
async def test_restarted_dispatcher_reissues_earlier_placements(
    kafka_settings: Settings, tmp_path: Path, worker_dies: str
) -> None:
    """Requests placed by one dispatcher; it stops (committing them: a new one never reads
    them again); a new one starts; the worker holding them dies for good, after the new
    dispatcher heard from it or before it started. Each request is reissued once."""
    s = kafka_settings
    rids = [f"p-{i}" for i in range(6)]
    async with Rig(s, tmp_path) as rig:
        d1 = dispatcher(s)
        async with d1:
            await rig.place([d1], rids)
        if worker_dies == "before_restart":
            rig.victim.kill()
        d2 = dispatcher(s)
        async with d2:
            await wait_for(lambda: d2.owned_partitions is not None, "the rebuild", 60)
            assert d2.stats.restored == len(rids)
            assert {r: a.instance_id for r, a in d2.assignments.items()} == dict.fromkeys(
                rids, VICTIM
            )
            if worker_dies == "after_restart":
                await wait_for(lambda: usable(d2, VICTIM), "the new dispatcher to hear the victim")
                rig.victim.kill()
            results = await rig.results(rids)
            stats = {"restored": d2.stats.restored, "reissued": d2.stats.reissued}
    print(json.dumps({"worker_dies": worker_dies, **stats}))
    rig.assert_exactly_once(rids, results)
    assert stats["reissued"] == len(rids)


def _ids_over_partitions(n_parts: int, per_part: int) -> list[str]:
    """Request ids with ``per_part`` of them in each requests-topic partition."""
    by: dict[int, list[str]] = {p: [] for p in range(n_parts)}
    i = 0
    while any(len(v) < per_part for v in by.values()):
        rid = f"q-{i}"
        p = request_partition(request(rid), n_parts)
        if len(by[p]) < per_part:
            by[p].append(rid)
        i += 1
    return [r for v in by.values() for r in v]


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_replicas_reissue_each_request_once(
    kafka_settings: Settings, tmp_path: Path, how: str
) -> None:
    """Two dispatcher replicas share the requests partitions and each places its share on
    the victim. ``kill``: one replica restarts (its placements now live only in the
    topics), then the victim is killed. ``drain``: the victim is stopped with SIGTERM and
    hands its requests back with checkpoints, which both replicas read. Either way the
    replica that owns a request's partition reissues it, the other does not."""
    s = kafka_settings
    rids = _ids_over_partitions(s.partitions, 3)
    async with Rig(s, tmp_path) as rig:
        ds = [dispatcher(s, seed=0), dispatcher(s, seed=1)]
        for d in ds:
            await d.start()
        try:
            await wait_for(lambda: all(d.assigned_partitions() == 1 for d in ds), "a split", 60)
            await rig.place(ds, rids)
            routed = [sorted(d.assignments) for d in ds]
            assert all(routed), routed  # each replica placed a share
            if how == "kill":
                await ds[1].stop()
                ds[1] = dispatcher(s, seed=1)
                await ds[1].start()

                def settled() -> bool:
                    own = [d.owned_partitions for d in ds]
                    return (
                        all(o is not None and len(o) == 1 for o in own)
                        and all(d.assigned_partitions() == 1 for d in ds)
                        and own[0] != own[1]
                    )

                await wait_for(settled, "the group to settle and both replicas to rebuild", 60)
                tables = [set(d.assignments) for d in ds]
                assert not tables[0] & tables[1] and tables[0] | tables[1] == set(rids)
                await wait_for(lambda: usable(ds[1], VICTIM), "the new replica to hear the victim")
                rig.victim.kill()
            else:
                took = await asyncio.to_thread(rig.victim.terminate, 30.0)
                assert took < 15.0
            results = await rig.results(rids)
            reissued = [d.stats.reissued for d in ds]
            restored = [d.stats.restored for d in ds]
        finally:
            for d in ds:
                await d.stop()
    print(json.dumps({"how": how, "reissued": reissued, "restored": restored, "routed": routed}))
    rig.assert_exactly_once(rids, results)
    assert sum(reissued) == len(rids)
    if how == "drain":
        cks = {
            c.request_id: c
            for c in await read_all(s, s.checkpoints_topic, Checkpoint)
            if c.target is None
        }
        assert sorted(cks) == sorted(rids)  # every request was handed back with its tokens
        assert all(results[r].migrations == 1 for r in rids)  # and resumed from them
        resumed = sum(len(c.generated_token_ids) for c in cks.values())
        assert rig.engine.instance.tokens_generated == len(rids) * OUTPUT - resumed
