"""Heartbeats and Results with impossible numbers (``report_problem``): dead-lettered, and
nothing learnt from them.

The estimator takes every heartbeat's batch size, KV gauges and TPOT into the instance's
estimates and every Result's decode time into its correction; the predictor recalibrates
on every Result's length. A negative batch size became the instance's batch limit and
made it look faster than it is (a busy H100 with 350 requests: a new request's finish
estimated at 1.65 s instead of 2.10 s), a negative length was learnt by the predictor as
a very short answer; such reports are refused at the door. (Non-finite numbers cannot
come through Kafka: JSON has none, and msgspec refuses the null it writes for them.)
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import msgspec
import numpy as np
import pytest
from goodserve.dispatcher.service import DispatcherService
from goodserve.dispatcher.validation import report_problem
from goodserve.schemas import DeadLetter, Heartbeat, RequestProgress, Result
from live_helpers import read_all, wait_for

from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import TypedProducer, ensure_topics

FLEET = Fleet(instances=[FleetInstance(id="g0", gpu="H100"), FleetInstance(id="g1", gpu="A100")])
NOW = 1_800_000_000.0

HB = Heartbeat(instance_id="g0", gpu="H100", model="llama-2-7b", engine="sim", at=NOW, seq=3,
               running=2, max_batch=256, kv_used_blocks=10, kv_total_blocks=1000,
               tpot_s=0.02, step_time_s=0.02, prefill_tokens_per_s=9000.0,
               requests=[RequestProgress(request_id="r", state="running", generated=5,
                                         input_tokens=100, deadline=NOW + 10.0)])
RES = Result(request_id="r", status="ok", instance_id="g0", output_tokens=40, input_tokens=100,
             arrival=NOW - 2.0, dispatched_at=NOW - 1.9, first_token_at=NOW - 1.5,
             finished_at=NOW, deadline=NOW + 5.0)

BAD: list[tuple[str, Any]] = [
    ("instance_id", msgspec.structs.replace(HB, instance_id="node1:gpu0")),
    ("running", msgspec.structs.replace(HB, running=-1)),
    ("max_batch", msgspec.structs.replace(HB, max_batch=-256)),
    ("kv_block_size", msgspec.structs.replace(HB, kv_block_size=0)),
    ("tpot_s", msgspec.structs.replace(HB, tpot_s=math.nan)),
    ("tpot_s", msgspec.structs.replace(HB, tpot_s=math.inf)),
    ("at", msgspec.structs.replace(HB, at=-5.0)),
    ("progress", msgspec.structs.replace(HB, requests=[RequestProgress(
        request_id="r", state="running", generated=-3, input_tokens=100, deadline=NOW)])),
    ("output_tokens", msgspec.structs.replace(RES, output_tokens=-40)),
    ("finished_at", msgspec.structs.replace(RES, finished_at=math.nan)),
    ("first token", msgspec.structs.replace(RES, finished_at=NOW - 3.0)),
]


def test_a_workers_own_reports_pass() -> None:
    assert report_problem(HB) is None and report_problem(RES) is None
    # a resumed request's times come from two workers' clocks: not compared
    resumed = msgspec.structs.replace(RES, migrations=1, finished_at=NOW - 3.0)
    assert report_problem(resumed) is None


@pytest.mark.parametrize(("what", "msg"), BAD, ids=[w for w, _ in BAD])
def test_impossible_numbers_are_named(what: str, msg: Any) -> None:
    problem = report_problem(msg)
    assert problem is not None and what in problem


def test_nothing_is_learnt_from_an_impossible_report() -> None:
    d = DispatcherService(settings=Settings(), fleet=FLEET, monitor=False)
    est = d.est
    est.on_assign("g0", request_id="r", input_tokens=100, planned_tokens=40.0,
                  deadline=time.time() + 10.0, now=time.time())
    before = est.tpot_corr.copy()
    nan_hb = msgspec.structs.replace(HB, tpot_s=math.nan, at=time.time())
    err = d._observe(nan_hb, [])
    assert err is not None and err.code == "invalid_report"
    assert np.array_equal(est.tpot_corr, before)
    learned: list[tuple[Any, int]] = []
    bad = msgspec.structs.replace(RES, output_tokens=-40)
    assert d._observe(bad, learned) is not None
    assert learned == [] and "r" not in est.requests  # settled, nothing learnt
    assert d.stats.invalid_reports == 2
    assert bool(np.all(np.isfinite(est.tpot_corr)))


def test_the_standalone_monitor_does_not_use_an_impossible_heartbeat() -> None:
    from goodserve.monitor.service import MonitorService

    mon = MonitorService(settings=Settings())
    err = mon.observe(msgspec.structs.replace(HB, max_batch=-256), now=NOW)
    assert err is not None and err.code == "invalid_report" and "g0" not in mon.est.index
    assert mon.observe(HB, now=NOW) is None and "g0" in mon.est.index


@pytest.mark.kafka
@pytest.mark.timeout(60)
async def test_an_impossible_heartbeat_is_dead_lettered_and_the_dispatcher_goes_on(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    await ensure_topics(s)
    async with (
        DispatcherService(settings=s, fleet=FLEET, monitor=False) as d,
        TypedProducer(settings=s) as p,
    ):
        await asyncio.sleep(1.0)  # the fleet reader starts at the topics' end
        # JSON carries no NaN (msgspec writes null, which a float field refuses:
        # dead-lettered as malformed); a negative batch size it does carry
        bad = msgspec.structs.replace(HB, max_batch=-256, at=time.time())
        await p.send(s.heartbeats_topic, bad, key="g0")
        good = msgspec.structs.replace(HB, instance_id="g1", gpu="A100", at=time.time())
        await p.send(s.heartbeats_topic, good, key="g1")
        await wait_for(lambda: d.stats.invalid_reports == 1
                       and float(d.est.hb_running[d.est.index["g1"]]) == 2.0,
                       "the bad heartbeat refused and the good one used")
        assert bool(np.all(d.est.max_batch > 0)) and bool(np.all(d.est.batch_limit() > 0))
        dls = await read_all(s, s.dead_letters_topic, DeadLetter)
    assert [x.error_code for x in dls] == ["invalid_report"]
    assert "max_batch" in dls[0].reason
