"""End to end on real Apache Kafka: client -> dispatcher -> simulated workers -> results."""

from __future__ import annotations

import asyncio
import random

import pytest
from goodserve.schemas import AgentRequest, DeadLetter, Decision, Result

from goodserve.audit import replay_decisions
from goodserve.client import GoodServeClient
from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.stack import LocalStack
from goodserve.transport.consumer import TypedConsumer

pytestmark = pytest.mark.kafka

FLEET = Fleet(
    instances=[
        FleetInstance(id="h100", gpu="H100"),
        FleetInstance(id="a100", gpu="A100"),
        FleetInstance(id="v100", gpu="V100"),
    ]
)


def make_requests(n: int, seed: int = 0) -> list[AgentRequest]:
    rng = random.Random(seed)
    tasks = ["chat", "code", "math", "sql", "tool", "agent"]
    out = []
    for i in range(n):
        tokens = rng.randint(20, 200)
        out.append(
            AgentRequest(
                request_id=f"e2e-{seed}-{i}",
                task=rng.choice(tasks),
                input_tokens=rng.randint(50, 800),
                max_tokens=512,
                slo_s=rng.choice([5.0, 20.0, 60.0]),
                output_tokens_hint=tokens,
                metadata={"sim_output_tokens": str(tokens)},
            )
        )
    return out


async def read_all(
    settings: Settings, topic: str, kind: type, expect: int, timeout_s: float = 30.0
) -> list:
    """Read a topic from the beginning until ``expect`` messages of ``kind`` arrived."""
    got: list = []
    async with TypedConsumer(
        settings=settings,
        topics=[topic],
        group_id=None,
        service="test-reader",
        auto_offset_reset="earliest",
    ) as c:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(got) < expect and asyncio.get_running_loop().time() < deadline:
            for env in await c.getmany(timeout_ms=200):
                if isinstance(env.msg, kind):
                    got.append(env.msg)
    return got


@pytest.mark.parametrize("node", [False, True], ids=["worker-consumers", "node-consumer"])
async def test_200_requests_through_three_gpu_types(kafka_settings: Settings, node: bool) -> None:
    """Each worker with its own consumer, or (``node``) the three workers of the process on
    one NodeConsumer and one producer, as on a multi-GPU node: the same guarantees."""
    s = kafka_settings
    reqs = make_requests(200)
    views_every = 4 if node else 1  # the audit's sampled views, on one of the two runs
    async with (
        LocalStack(settings=s, fleet=FLEET, time_scale=0.02, heartbeat_period_s=0.1,
                   shared_worker_producer=node, shared_worker_consumer=node,
                   decision_views_every=views_every) as stack,
        GoodServeClient(settings=s) as client,
    ):
        await asyncio.sleep(0.5)  # first heartbeats
        for r in reqs:
            await client.submit(r)
        results = await asyncio.gather(*(client.result(r.request_id, timeout=90) for r in reqs))
        assigned = sum(d.stats.assigned for d in stack.dispatchers)
        groups = {w.group_id for w in stack.workers}
        node_commits = stack.worker_consumer.commits if stack.worker_consumer else 0
    assert len(groups) == (1 if node else 3)
    assert (node_commits > 0) == node
    assert {r.request_id for r in results} == {r.request_id for r in reqs}
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
    assert client.duplicates == 0
    for req, res in zip(reqs, results, strict=True):
        assert res.output_tokens == int(req.metadata["sim_output_tokens"])
        assert res.instance_id in {"h100", "a100", "v100"}
        assert res.first_token_at is not None and res.finished_at >= res.first_token_at
    assert assigned == 200
    # the audit log has one decision per request, each naming the instance that served it
    decisions = await read_all(s, s.decisions_topic, Decision, 200)
    chosen = {d.request_id: d.chosen for d in decisions}
    assert len(chosen) == 200
    assert all(chosen[r.request_id] == r.instance_id for r in results if r.migrations == 0)
    # At time_scale 0.02 every SLO here (5, 20, 60 s) is loose on every GPU, so which GPU a
    # request gets is down to the queues of the moment (a couple of requests either way:
    # comparing the SLO classes' shares was a coin flip). Which GPU a tight or a loose
    # request should get is tested on hand-built fleets (tests/test_policies.py) and through
    # real endpoints (tests/test_openai_backend.py). Here: each decision's record is
    # coherent, and it promised what it chose: an eligible candidate that meets the deadline.
    for d in decisions:
        cands = {c.instance_id: c for c in d.candidates}
        assert d.outcome == "assigned" and d.chosen in cands, d
        assert cands[d.chosen].eligible and cands[d.chosen].slack_s > 0, d
        assert d.deadline == pytest.approx(d.request.arrival + d.request.slo_s, abs=1e-6)
    # the live records replay bit for bit; with views in one record of four, those do and
    # the others are counted apart
    rep = replay_decisions(decisions, check_preds=False)
    with_views = sum(1 for d in decisions if d.instances)
    assert not rep.mismatches and not rep.errors, (rep.mismatches[:3], rep.errors[:3])
    assert rep.identical == with_views and rep.without_views == len(decisions) - with_views
    if node:
        assert len(decisions) // 4 - 5 <= with_views <= len(decisions) // 4 + 5
    else:
        assert with_views == len(decisions)


async def test_two_dispatcher_replicas_share_the_load(kafka_settings: Settings) -> None:
    s = kafka_settings.replace(partitions=4)
    reqs = make_requests(120, seed=1)
    async with (
        LocalStack(
            settings=s, fleet=FLEET, dispatchers=2, time_scale=0.02, heartbeat_period_s=0.1
        ) as stack,
        GoodServeClient(settings=s) as client,
    ):
        for _ in range(300):  # until the group gave both replicas partitions
            if all(d.assigned_partitions() > 0 for d in stack.dispatchers):
                break
            await asyncio.sleep(0.1)
        # keys spread over the 4 partitions, which the two replicas share
        for r in reqs:
            await client.submit(r)
        results = await asyncio.gather(*(client.result(r.request_id, timeout=90) for r in reqs))
        counts = [d.stats.assigned for d in stack.dispatchers]
    assert len({r.request_id for r in results}) == 120
    assert sum(counts) == 120
    assert all(c > 0 for c in counts), counts


async def test_bad_requests_are_rejected_and_dead_lettered(kafka_settings: Settings) -> None:
    s = kafka_settings
    good = make_requests(5, seed=2)
    bad = [
        AgentRequest(request_id="bad-tokens", input_tokens=10, max_tokens=0),
        AgentRequest(request_id="bad-deadline", input_tokens=10, deadline=1.0),
        AgentRequest(request_id="bad-huge", input_tokens=10_000_000),
        AgentRequest(request_id="bad-empty"),
        AgentRequest(request_id="bad-slo", input_tokens=10, slo_s=-3.0),
        # its Result could never be delivered there: rejected on the shared results topic
        AgentRequest(request_id="bad-reply-to", input_tokens=10, reply_to="no such/topic"),
    ]
    async with (
        LocalStack(settings=s, fleet=FLEET, time_scale=0.02, heartbeat_period_s=0.1),
        GoodServeClient(settings=s) as client,
    ):
        await asyncio.sleep(0.5)
        for r in [*bad, *good]:
            await client.submit(r)
        await client.submit(good[0])  # a duplicate id: dead-lettered, the first one answered
        res_bad = await asyncio.gather(*(client.result(r.request_id, timeout=30) for r in bad))
        res_good = await asyncio.gather(*(client.result(r.request_id, timeout=60) for r in good))
        # while the dispatcher runs: the duplicate, sent last, may not be read yet when the
        # results are in (it was not, once, in a CI run on a busy host)
        dls = await read_all(s, s.dead_letters_topic, DeadLetter, len(bad) + 1)
    assert all(r.status == "rejected" and r.error is not None for r in res_bad)
    assert {r.error.code for r in res_bad if r.error} >= {"invalid_request", "prompt_too_large"}
    assert all(r.status == "ok" for r in res_good)
    reasons = {d.request_id: d.error_code for d in dls}
    assert set(reasons) >= {r.request_id for r in bad}
    assert reasons[good[0].request_id] == "duplicate_request"
    assert all(d.payload for d in dls)


async def test_results_only_once_with_results_topic_reader(kafka_settings: Settings) -> None:
    s = kafka_settings
    reqs = make_requests(30, seed=3)
    async with (
        LocalStack(settings=s, fleet=FLEET, time_scale=0.02, heartbeat_period_s=0.1),
        GoodServeClient(settings=s) as client,
    ):
        await asyncio.sleep(0.5)
        for r in reqs:
            await client.submit(r)
        await asyncio.gather(*(client.result(r.request_id, timeout=60) for r in reqs))
    results = await read_all(s, s.results_topic, Result, 30)
    ids = [r.request_id for r in results]
    assert sorted(ids) == sorted(r.request_id for r in reqs)
