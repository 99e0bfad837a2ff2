"""Admission checks (``validate_request``), table-driven: what can never be served gets a
clear error before it is placed; what can is let through unchanged.

Through Kafka, JSON carries no NaN or infinity (msgspec refuses the null it writes for
them): the non-finite cases guard in-process callers (``LocalStack``, the simulator, the
Python API), where a NaN ``arrival`` made a NaN deadline that was accepted, routed and
added to the kept sums of the deadline terms (``budget_load``). The others (ranges,
negative ids, names) arrive through Kafka and the gateway as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.router import Router
from goodserve.dispatcher.validation import Limits, is_topic_name, validate_request
from goodserve.schemas import AgentRequest, SamplingParams

from goodserve.errors import InvalidRequest
from goodserve.testing.snapshots import beat_all

NOW = 1_800_000_000.0


def request(**kw: Any) -> AgentRequest:
    base: dict[str, Any] = dict(request_id="r", input_tokens=100, slo_s=10.0, arrival=NOW)
    return AgentRequest(**{**base, **kw})


REFUSED = [
    ("arrival", dict(arrival=math.nan)),
    ("arrival", dict(arrival=math.inf)),
    ("deadline", dict(deadline=-math.inf)),
    ("workflow_deadline", dict(workflow_deadline=math.nan)),
    ("ttft_slo_s", dict(ttft_slo_s=math.nan)),
    ("ttft_slo_s", dict(ttft_slo_s=0.0)),
    ("tpot_slo_s", dict(tpot_slo_s=-0.01)),
    ("output_tokens_hint", dict(output_tokens_hint=-5)),
    ("output_tokens_hint", dict(output_tokens_hint=10**12)),
    ("step", dict(step=-1)),
    ("workflow_id", dict(workflow_id="")),
    ("workflow_id", dict(workflow_id="w" * 257)),
    ("temperature", dict(sampling=SamplingParams(temperature=math.nan))),
    ("temperature", dict(sampling=SamplingParams(temperature=-0.5))),
    ("top_p", dict(sampling=SamplingParams(top_p=0.0))),
    ("top_p", dict(sampling=SamplingParams(top_p=1.5))),
    ("top_k", dict(sampling=SamplingParams(top_k=-2))),
    ("stop_token_ids", dict(sampling=SamplingParams(stop_token_ids=[2, -1]))),
    ("prompt_token_ids", dict(prompt_token_ids=[5, -3, 7])),
    ("reply_to", dict(reply_to="results for me")),
    ("reply_to", dict(reply_to="..")),
    ("reply_to", dict(reply_to="t" * 250)),
]

ACCEPTED = [
    dict(),
    dict(arrival=None),
    dict(workflow_id="wf-1", step=3, workflow_deadline=NOW + 60.0),
    dict(ttft_slo_s=0.5, tpot_slo_s=0.05),
    dict(output_tokens_hint=0),
    dict(output_tokens_hint=32768),
    dict(sampling=SamplingParams(temperature=0.7, top_p=1.0, top_k=0, stop_token_ids=[0])),
    dict(sampling=SamplingParams(top_k=-1, top_p=0.01)),
    dict(prompt_token_ids=[0, 1, 31999], input_tokens=None),
    dict(reply_to="team-a.results_v2"),
]


@pytest.mark.parametrize(("field", "kw"), REFUSED, ids=[f for f, _ in REFUSED])
def test_a_request_that_cannot_be_served_is_refused_naming_the_field(
    field: str, kw: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest, match=field):
        validate_request(request(**kw), NOW, Limits())


@pytest.mark.parametrize("kw", ACCEPTED)
def test_a_request_that_can_be_served_is_accepted_and_gets_a_finite_deadline(
    kw: dict[str, Any],
) -> None:
    req = request(**kw)
    assert validate_request(req, NOW, Limits()) >= 1
    est = FleetEstimator()
    for i, gpu in enumerate(["H100", "A100"]):
        est.add_instance(f"g{i}", gpu=gpu, now=NOW, alive=True)
    beat_all(est, NOW)
    router = Router(estimator=est, predictor=ConstantPredictor(100.0), policy="goodserve")
    out = router.route(req, NOW)
    assert out.instance_id is not None and math.isfinite(out.deadline)
    assert bool(np.all(np.isfinite(est.budget_load(NOW))))


def test_topic_names() -> None:
    assert is_topic_name("goodserve.results") and is_topic_name("a_b-c.1")
    assert not any(map(is_topic_name, ["", ".", "..", "a b", "a/b", "é", "x" * 250]))
