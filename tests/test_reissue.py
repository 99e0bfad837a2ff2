"""The dispatcher's reissue path on real Kafka with simulated engines.

A request with a long prompt handed back by a draining worker is resumed elsewhere: the
resuming Assignment used to carry the request twice (its own and its checkpoint's), so a
600 KB prompt, admitted and placed in a 600 KB record, made a 1.2 MB one that the producer
refused, and the request stopped at the draining worker was never resumed. A resuming
Assignment still too large goes without the checkpoint's progress. An orphan whose
reissue fails for good does not hold up the others, nor a migration whose command fails
the rest of the risk monitor's round.
"""

from __future__ import annotations

import pytest
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest, Assignment, encode
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id
from goodserve.workers.service import WorkerService
from live_helpers import collect_results, read_all, usable, wait_for

from goodserve.chaos.load import CountingClient
from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import ensure_topics, instance_topic_spec
from goodserve.transport.topics import standard_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

FLEET = Fleet(instances=[FleetInstance(id="src", gpu="H100"), FleetInstance(id="dst", gpu="A100")])
OUTPUT = 400


async def _ensure_fleet_topics(s: Settings) -> None:
    await ensure_topics(s, [*standard_topics(s), *(instance_topic_spec(s, i.id)
                                                   for i in FLEET.instances)])


def _worker(s: Settings, iid: str, gpu: str) -> WorkerService:
    return WorkerService(settings=s, instance_id=iid, gpu=gpu, model="llama-2-7b",
                         engine=SimulatedEngine(instance_id=iid, gpu=gpu), heartbeat_period_s=0.2)


async def test_a_long_prompt_handed_back_by_a_draining_worker_is_resumed(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    await _ensure_fleet_topics(s)
    req = AgentRequest(request_id="long-1", prompt="q" * 600_000, input_tokens=200,
                       max_tokens=OUTPUT, slo_s=120.0,
                       metadata={"sim_output_tokens": str(OUTPUT)})
    assert 2 * len(encode(req)) > 1_048_576  # twice in one record: over the limit
    src, dst = _worker(s, "src", "H100"), _worker(s, "dst", "A100")
    d = DispatcherService(settings=s, policy="fastest-gpu", fleet=FLEET, monitor=False,
                          predictor=ConstantPredictor(float(OUTPUT), float(OUTPUT)),
                          default_slo_s=120.0)
    client = CountingClient(settings=s)
    try:
        await src.start()
        await dst.start()
        await d.start()
        await client.start()
        await wait_for(lambda: usable(d, "src") and usable(d, "dst"), "both workers alive", 60)
        await client.submit(req)
        await wait_for(lambda: (tr := d.est.requests.get("long-1")) is not None
                       and tr.generated >= 40, "the request to run on src")
        assert d.assignments["long-1"].instance_id == "src"
        await src.stop(drain_timeout_s=0.0)  # checkpointed and handed back to the dispatcher
        got = await collect_results(client, ["long-1"], 60.0)
        r = got["long-1"]
        assert r.status == "ok" and r.instance_id == "dst" and r.migrations == 1
        assert r.output_token_ids == [synthetic_token_id("long-1", p) for p in range(OUTPUT)]
        resumed = [a for a in await read_all(s, s.instance_topic("dst"), Assignment)
                   if a.request.request_id == "long-1"]
        assert len(resumed) == 1 and resumed[0].request.prompt == req.prompt
        ck = resumed[0].resume
        assert ck is not None and ck.request.prompt is None and not ck.progress_dropped
        assert len(ck.generated_token_ids) >= 40  # resumed, not restarted
        assert d.stats.reissued == 1
    finally:
        await client.stop()
        await d.stop()
        await dst.stop(drain_timeout_s=0.0)
        await src.stop(drain_timeout_s=0.0)


async def test_a_resuming_assignment_too_large_for_a_record_goes_without_the_progress(
    kafka_settings: Settings,
) -> None:
    """A 900 KB prompt resumed with 40,000 generated tokens (about 240 KB of ids): the
    dispatcher's resuming Assignment would pass the limit, so it goes without the
    checkpoint's progress and the instance restarts the request from its prompt."""
    import time

    from goodserve.schemas import Checkpoint

    s = kafka_settings
    await _ensure_fleet_topics(s)
    req = AgentRequest(request_id="long-2", prompt="q" * 900_000, input_tokens=200,
                       max_tokens=50_000, slo_s=120.0)
    ck = Checkpoint(request_id="long-2", migration_id="m-2", source="src", request=req,
                    generated_token_ids=[31_999 - k % 7 for k in range(40_000)], migrations=1)
    now = time.time()
    a = Assignment(request=req, instance_id="dst", decision_id="d-2", dispatched_at=now,
                   deadline=now + 120.0, attempt=1, resume=ck.for_assignment())
    assert len(encode(a)) > 1_048_576 > len(encode(req)) + 1_000
    async with DispatcherService(settings=s, policy="fastest-gpu", fleet=FLEET, monitor=False,
                                 predictor=ConstantPredictor(100.0, 100.0)) as d:
        sent = await d._send_resuming(a)
    assert sent.resume is not None and sent.resume.progress_dropped
    got = await read_all(s, s.instance_topic("dst"), Assignment)
    assert len(got) == 1 and got[0].request.prompt == req.prompt
    assert got[0].resume is not None and got[0].resume.generated_token_ids == []
    assert got[0].resume.progress_dropped and got[0].resume.migrations == 1


async def test_an_orphan_that_cannot_be_reissued_does_not_hold_up_the_others(
    kafka_settings: Settings,
) -> None:
    """A reissue refused for good (here a TransportError raised into the first orphan's
    reissue: a topic the dispatcher may not write, say) left the round at that orphan, so
    every orphan after it waited forever; it stays an orphan now and the others go on."""
    import time

    from goodserve.dispatcher.service import _Orphan

    from goodserve.errors import TransportError

    s = kafka_settings
    await _ensure_fleet_topics(s)
    src, dst = _worker(s, "src", "H100"), _worker(s, "dst", "A100")
    d = DispatcherService(settings=s, policy="fastest-gpu", fleet=FLEET, monitor=False,
                          predictor=ConstantPredictor(50.0, 50.0), default_slo_s=60.0)
    try:
        await src.start()
        await dst.start()
        await d.start()
        await wait_for(lambda: usable(d, "src") and usable(d, "dst")
                       and d._ownership() is not None and len(d._ownership()[0]) == s.partitions,
                       "workers alive and the requests partitions owned", 60)
        reqs = [AgentRequest(request_id=f"orphan-{k}", input_tokens=50, max_tokens=50,
                             arrival=time.time(), slo_s=60.0,
                             metadata={"sim_output_tokens": "50"}) for k in range(2)]
        for r in reqs:
            d.orphans[r.request_id] = _Orphan(r, None, None)
        reissue = d._reissue

        async def refused_for_the_first(rid: str, *args: object) -> None:
            if rid == "orphan-0":
                raise TransportError("not authorized to write the topic")
            await reissue(rid, *args)  # type: ignore[arg-type]

        d._reissue = refused_for_the_first  # type: ignore[method-assign]
        await d._reissue_from_dead()
        assert "orphan-0" in d.orphans and "orphan-1" not in d.orphans
        assert d.assignments["orphan-1"].instance_id == "src" and d.stats.reissued == 1
    finally:
        await d.stop()
        await dst.stop(drain_timeout_s=0.0)
        await src.stop(drain_timeout_s=0.0)


async def test_a_migration_that_cannot_be_commanded_does_not_hold_up_the_round(
    kafka_settings: Settings,
) -> None:
    """The risk monitor's round stopped at a command refused for good, so every plan after
    it waited for the next round, and the next: now the others are commanded."""
    from goodserve.dispatcher.service import MonitorConfig
    from goodserve.monitor.risk import MigrationPlan, RiskMonitor
    from goodserve.schemas import MigrationCommand

    from goodserve.errors import TransportError

    s = kafka_settings
    await _ensure_fleet_topics(s)
    d = DispatcherService(settings=s, policy="fastest-gpu", fleet=FLEET,
                          monitor_config=MonitorConfig(period_s=3600.0),
                          predictor=ConstantPredictor(50.0, 50.0))
    plans = [MigrationPlan(request_id=f"risky-{k}", source="src", target="dst", risk=0.9,
                           target_risk=0.1, remaining_tokens=100.0, est_finish_source_s=9.0,
                           est_finish_target_s=3.0, reason="test") for k in range(2)]

    class Planned(RiskMonitor):  # the round's plans, as if these two were at risk
        def plan(self, est: object, now: float) -> list[MigrationPlan]:  # type: ignore[override]
            return plans

    d.monitor = Planned(MonitorConfig(period_s=3600.0))
    async with d:
        command = d.command_migration

        async def refused_for_the_first(rid: str, *args: object, **kw: object) -> object:
            if rid == "risky-0":
                raise TransportError("not authorized to write the topic")
            return await command(rid, *args, **kw)  # type: ignore[arg-type]

        d.command_migration = refused_for_the_first  # type: ignore[method-assign]
        assert await d.migrate_at_risk() == 1
    sent = await read_all(s, s.migrations_topic, MigrationCommand)
    assert [c.request_id for c in sent] == ["risky-1"]
