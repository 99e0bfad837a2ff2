"""A decision record of a large fleet goes through the real broker whole.

Every record carries each instance's view (about 0.7 KiB an instance), so at 512
instances a record is about 350 KiB, more than the producer's batch size (256 KiB), and
at about 1,500 instances it would pass Kafka's default message size limit (1 MB).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.router import Router
from goodserve.schemas import AgentRequest, Decision, encode

from goodserve.audit import read_topic, replay_decisions
from goodserve.config import Settings
from goodserve.testing.snapshots import beat_all
from goodserve.transport import TypedProducer, ensure_topics


def _records(n_instances: int, n: int) -> list[Decision]:
    est = FleetEstimator()
    for i in range(n_instances):
        est.add_instance(f"gpu-{i:04d}", gpu=["H100", "A40"][i % 2], now=0.0, alive=True)
    beat_all(est, 0.0)
    router = Router(estimator=est, predictor=ConstantPredictor(120.0, 200.0, 300.0),
                    policy="goodserve")
    rng = random.Random(2)
    return [router.route(AgentRequest(request_id=f"big-{k}", input_tokens=rng.randint(50, 900),
                                      max_tokens=512, slo_s=10.0, arrival=0.01 * k),
                         0.01 * k).record(top_k=32)
            for k in range(n)]


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_decision_records_of_a_512_instance_fleet_go_through_kafka(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    await ensure_topics(s)
    recs = _records(512, 6)
    assert all(len(encode(r)) > 256 * 1024 for r in recs)  # larger than a producer batch
    async with TypedProducer(settings=s) as prod:
        for r in recs:
            await prod.send(s.decisions_topic, r, key=r.request_id)
    got = [m for m in await read_topic(s, s.decisions_topic) if isinstance(m, Decision)]
    assert sorted(d.decision_id for d in got) == sorted(r.decision_id for r in recs)
    assert all(len(d.instances) == 512 for d in got)
    rep = replay_decisions(got, check_preds=False)
    assert rep.identical == len(recs)


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_record_too_large_for_the_producer_goes_without_the_views(
    kafka_settings: Settings,
) -> None:
    """1,600 instances: a record with every view is about 1.1 MB, over aiokafka's 1 MiB a
    request. The dispatcher sends it without the views (marked ``views_omitted``), counts
    it, and routes on: the requests behind it are not held up by a send that would fail
    on every retry."""
    import asyncio
    import time

    from goodserve.dispatcher.service import DispatcherService
    from goodserve.schemas import Heartbeat

    from goodserve.sim.fleet import Fleet, FleetInstance

    s = kafka_settings
    await ensure_topics(s)
    gpus = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]
    fleet = Fleet(instances=[FleetInstance(id=f"g{i:04d}", gpu=gpus[i % 8])
                             for i in range(1600)])
    disp = DispatcherService(settings=s, fleet=fleet, monitor=False, default_slo_s=30.0)
    await disp.start()
    try:
        now = time.time()
        for inst in fleet.instances:
            disp.observe(Heartbeat(instance_id=inst.id, gpu=inst.gpu, model="llama-2-7b",
                                   engine="sim", at=now))
        assert disp.est.usable(time.time()).all()
        async with TypedProducer(settings=s) as prod:
            for k in range(3):
                req = AgentRequest(request_id=f"huge-{k}", input_tokens=300, max_tokens=256,
                                   slo_s=30.0, arrival=time.time())
                await prod.send(s.requests_topic, req, key=req.request_id)
        end = time.monotonic() + 60
        while disp.stats.assigned < 3:
            assert time.monotonic() < end, f"only {disp.stats.assigned} of 3 assigned"
            await asyncio.sleep(0.1)
    finally:
        await disp.stop()
    assert disp.stats.decisions_too_large == 3
    got = [m for m in await read_topic(s, s.decisions_topic) if isinstance(m, Decision)]
    huge = [d for d in got if d.request_id.startswith("huge-")]
    assert len(huge) == 3
    for d in huge:
        assert d.config["views_omitted"] is True and d.instances == []
        assert d.chosen is not None and d.candidates  # still explains itself
    assert replay_decisions(huge, check_preds=False).without_views == 3


def test_a_record_too_large_is_not_retriable() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    from goodserve.errors import RecordTooLarge, TransportError
    from goodserve.transport.kafka import map_kafka_error

    e = map_kafka_error(MessageSizeTooLargeError("1,100,000 bytes"), "send to decisions")
    assert isinstance(e, RecordTooLarge) and isinstance(e, TransportError)
    assert not e.retriable and e.code == "record_too_large"


async def _dispatcher_with(s: Settings, n: int) -> Any:
    """A started dispatcher that has heard from ``n`` instances of mixed GPUs."""
    import time

    from goodserve.dispatcher.service import DispatcherService
    from goodserve.schemas import Heartbeat

    from goodserve.sim.fleet import Fleet, FleetInstance

    gpus = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]
    fleet = Fleet(instances=[FleetInstance(id=f"g{i:04d}", gpu=gpus[i % 8]) for i in range(n)])
    disp = DispatcherService(settings=s, fleet=fleet, monitor=False, default_slo_s=30.0)
    await disp.start()
    now = time.time()
    for inst in fleet.instances:
        disp.observe(Heartbeat(instance_id=inst.id, gpu=inst.gpu, model="llama-2-7b",
                               engine="sim", at=now))
    return disp


async def _route_first_then_two(s: Settings, n_instances: int, first: AgentRequest,
                                *, assigned: int, rejected: int) -> int:
    """``first`` and two small requests after it through a dispatcher of ``n_instances``:
    waits until that many are assigned and rejected; the dispatcher's request limit."""
    import asyncio
    import time

    await ensure_topics(s)
    disp = await _dispatcher_with(s, n_instances)
    try:
        async with TypedProducer(settings=s) as prod:
            for r in [first, _after(0), _after(1)]:
                await prod.send(s.requests_topic, r, key=r.request_id)
        end = time.monotonic() + 60
        while disp.stats.assigned < assigned or disp.stats.rejected < rejected:
            assert time.monotonic() < end, (disp.stats.assigned, disp.stats.rejected)
            await asyncio.sleep(0.1)
    finally:
        await disp.stop()
    limit: int = disp.limits.max_request_bytes
    return limit


def _after(k: int) -> AgentRequest:
    import time

    return AgentRequest(request_id=f"after-{k}", input_tokens=100, max_tokens=64, slo_s=30.0,
                        arrival=time.time())


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_prompt_that_fills_a_record_is_served_and_recorded_without_it(
    kafka_settings: Settings,
) -> None:
    """A request of about 1 MB (within the prompt's character and token limits) fits in
    its Assignment, but its decision record, which also carries it, does not, even
    without the views: the record goes without the prompt too (``prompt_omitted``), and
    the request and those after it are served."""
    import time

    s = kafka_settings
    big = AgentRequest(request_id="big-prompt", prompt="\u20ac" * 347_500, max_tokens=64,
                       slo_s=30.0, arrival=time.time())
    limit = await _route_first_then_two(s, 64, big, assigned=3, rejected=0)
    assert 1_040_000 < len(encode(big)) <= limit
    got = [m for m in await read_topic(s, s.decisions_topic) if isinstance(m, Decision)]
    (rec,) = [d for d in got if d.request_id == "big-prompt"]
    assert rec.config["views_omitted"] is True and rec.config["prompt_omitted"] is True
    assert rec.request.prompt is None and rec.chosen is not None and rec.candidates
    assert rec.features  # what replay and the prediction check read


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_request_too_large_for_its_assignment_is_refused_and_routing_goes_on(
    kafka_settings: Settings,
) -> None:
    """A request over ``max_request_bytes`` would not fit in its Assignment: refused
    (prompt_too_large: a rejected Result, and a dead letter whose copy of the payload is
    cut to fit; the record itself stays in the requests topic), and the requests after
    it are routed."""
    import time

    from goodserve.schemas import DeadLetter, Result

    s = kafka_settings
    huge = AgentRequest(request_id="huge-prompt", prompt="\u20ac" * 348_500, max_tokens=64,
                        slo_s=30.0, arrival=time.time())
    limit = await _route_first_then_two(s, 2, huge, assigned=2, rejected=1)
    assert limit < len(encode(huge)) < 1_048_000  # a producer takes it
    results = [m for m in await read_topic(s, s.results_topic) if isinstance(m, Result)]
    (refused,) = [r for r in results if r.request_id == "huge-prompt"]
    assert refused.status != "ok" and refused.error is not None
    assert refused.error.code == "prompt_too_large"
    letters = [m for m in await read_topic(s, s.dead_letters_topic)
               if isinstance(m, DeadLetter) and m.request_id == "huge-prompt"]
    assert len(letters) == 1 and letters[0].error_code == "prompt_too_large"
    assert "truncated" in letters[0].reason and len(letters[0].payload) == 256 * 1024


def test_the_request_size_limit_is_checked_where_the_size_is_known() -> None:
    import time

    from goodserve.dispatcher.validation import Limits, validate_request

    from goodserve.errors import PromptTooLarge

    req = AgentRequest(request_id="r", input_tokens=100, max_tokens=10, slo_s=5.0)
    limits = Limits()
    now = time.time()
    assert validate_request(req, now, limits, size_bytes=limits.max_request_bytes) == 100
    assert validate_request(req, now, limits) == 100  # size unknown: not checked
    with pytest.raises(PromptTooLarge, match="must fit in one Kafka record"):
        validate_request(req, now, limits, size_bytes=limits.max_request_bytes + 1)
