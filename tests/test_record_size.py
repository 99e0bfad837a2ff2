"""``Settings.max_record_bytes``: records larger than Kafka's default 1 MiB, for long prompts.

A request's Assignment carries its prompt, so the record limit bounds the prompt. Raised,
it must reach every place that enforces one: the producers (``max_request_size``), the
topics GoodServe creates (``max.message.bytes``) and the dispatcher's admission check
(``Limits.max_request_bytes``). Consumers need nothing (the test reads 2 MB records with
the default fetch size).
"""

from __future__ import annotations

import time

import pytest
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.service import DispatcherService
from goodserve.dispatcher.validation import ASSIGNMENT_ROOM_BYTES, Limits
from goodserve.schemas import AgentRequest, Assignment, encode
from goodserve.workers.engines.simulated import SimulatedEngine, synthetic_token_id
from goodserve.workers.service import WorkerService
from live_helpers import collect_results, read_all, usable, wait_for

from goodserve.chaos.load import CountingClient
from goodserve.config import Settings
from goodserve.errors import ConfigError, RecordTooLarge
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import TypedProducer, ensure_topics, instance_topic_spec
from goodserve.transport.kafka import kafka_client_kwargs
from goodserve.transport.topics import record_size_configs, standard_topics

MiB = 1_048_576
FLEET = Fleet(instances=[FleetInstance(id="big", gpu="H100")])


def test_the_record_limit_reaches_producers_consumers_topics_and_admission() -> None:
    s = Settings(max_record_bytes=4 * MiB)
    assert kafka_client_kwargs(s, role="producer")["max_request_size"] == 4 * MiB
    assert int(record_size_configs(s)["max.message.bytes"]) > 4 * MiB
    d = DispatcherService(settings=s, fleet=FLEET, monitor=False)
    assert d.limits.max_request_bytes == 4 * MiB - ASSIGNMENT_ROOM_BYTES
    # the default: Kafka's own limits, nothing set on topics
    default = Settings()
    assert kafka_client_kwargs(default, role="producer")["max_request_size"] == MiB
    assert record_size_configs(default) == {}
    assert DispatcherService(settings=default, fleet=FLEET, monitor=False).limits == Limits()


def test_limits_that_leave_no_room_for_the_assignment_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_request_bytes"):
        DispatcherService(settings=Settings(), fleet=FLEET, monitor=False,
                          limits=Limits.for_records(2 * MiB))
    with pytest.raises(ConfigError, match="max_record_bytes"):
        Settings(max_record_bytes=1000)
    assert Settings.from_env({"GOODSERVE_MAX_RECORD_BYTES": "3000000"}).max_record_bytes == 3e6


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_a_request_of_two_megabytes_is_served_with_a_raised_record_limit(
    kafka_settings: Settings,
) -> None:
    """A 2 MB prompt through the real broker: refused by a producer at the default limit,
    admitted, placed, run and answered with ``max_record_bytes`` at 3 MiB."""
    big = AgentRequest(request_id="huge-1", prompt="w" * 2_000_000, input_tokens=300,
                       max_tokens=64, slo_s=60.0, metadata={"sim_output_tokens": "64"})
    now = time.time()
    a = Assignment(request=big, instance_id="big", decision_id="d", dispatched_at=now,
                   deadline=now + 60.0)
    await ensure_topics(kafka_settings, [instance_topic_spec(kafka_settings, "big")])
    async with TypedProducer(settings=kafka_settings) as p:
        with pytest.raises(RecordTooLarge):
            await p.send(kafka_settings.instance_topic("big"), a, key="huge-1")

    s = kafka_settings.replace(max_record_bytes=3 * MiB, topic_prefix=kafka_settings.topic_prefix
                               + "-3m")
    await ensure_topics(s, [*standard_topics(s), instance_topic_spec(s, "big")])
    limits = Limits.for_records(s.max_record_bytes)
    limits.max_prompt_chars = 3_000_000
    assert len(encode(big)) > MiB
    w = WorkerService(settings=s, instance_id="big", gpu="H100", model="llama-2-7b",
                      engine=SimulatedEngine(instance_id="big", gpu="H100"),
                      heartbeat_period_s=0.2)
    d = DispatcherService(settings=s, fleet=FLEET, monitor=False, limits=limits,
                          predictor=ConstantPredictor(64.0, 64.0), default_slo_s=60.0)
    client = CountingClient(settings=s)
    try:
        await w.start()
        await d.start()
        await client.start()
        await wait_for(lambda: usable(d, "big"), "the worker alive", 60)
        await client.submit(big)
        r = (await collect_results(client, ["huge-1"], 60.0))["huge-1"]
        assert r.status == "ok" and r.instance_id == "big"
        assert r.output_token_ids == [synthetic_token_id("huge-1", k) for k in range(64)]
        placed = await read_all(s, s.instance_topic("big"), Assignment)
        assert [x.request.prompt for x in placed] == [big.prompt]
    finally:
        await client.stop()
        await d.stop()
        await w.stop(drain_timeout_s=0.0)
