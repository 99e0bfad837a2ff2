"""Batched prediction in the router: the same decisions, bit for bit, as one by one."""

from __future__ import annotations

import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.predictor.model import OutputLengthPredictor
from goodserve.dispatcher.router import Router
from goodserve.schemas import AgentRequest

from goodserve.bench.router import run_router_bench

PROMPTS = [
    ("code", "Write a Python function that merges two sorted lists."),
    ("sql", "How many orders were placed per customer last month?"),
    ("chat", "Tell me about the history of the bicycle in three paragraphs."),
    ("math", "Solve for x: 3x + 7 = 22, showing each step."),
]


def _fleet() -> FleetEstimator:
    est = FleetEstimator()
    for k, gpu in enumerate(["V100", "A40", "A100", "H100"] * 2):
        est.add_instance(f"{gpu.lower()}-{k}", gpu=gpu, alive=True)
    return est


def _requests(n: int) -> list[AgentRequest]:
    return [
        AgentRequest(
            request_id=f"r{k}",
            task=PROMPTS[k % 4][0],
            prompt=PROMPTS[k % 4][1] + f" (case {k})",
            max_tokens=1024,
            arrival=0.0,
            slo_s=3.0 + (k % 7),
            output_tokens_hint=200 if k % 5 == 0 else None,
        )
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def predictor() -> OutputLengthPredictor:
    return OutputLengthPredictor.default()


def test_batched_predictions_route_exactly_as_single_ones(
    predictor: OutputLengthPredictor,
) -> None:
    reqs = _requests(40)
    one = Router(estimator=_fleet(), predictor=predictor, policy="goodserve", seed=7)
    single = [one.route(r, 0.01 * k) for k, r in enumerate(reqs)]
    many = Router(estimator=_fleet(), predictor=predictor, policy="goodserve", seed=7)
    predicted = many.predict(reqs)
    pairs = zip(reqs, predicted, strict=True)
    batched = [many.route(r, 0.01 * k, predicted=p) for k, (r, p) in enumerate(pairs)]
    for a, b in zip(single, batched, strict=True):
        assert (a.instance_id, a.p50, a.p90) == (b.instance_id, b.p50, b.p90)
        assert a.features == b.features
        assert a.record().candidates == b.record().candidates
    assert len({o.instance_id for o in batched}) > 1  # a real spread, not one answer


def test_router_bench_reports_batched_decisions(predictor: OutputLengthPredictor) -> None:
    out = run_router_bench(instances=64, rps=2000, requests=600, batch=32, predictor=predictor)
    assert out["batch"] == 32 and out["requests"] == 600
    assert out["decisions_per_s"] > 0 and out["decision_p99_us"] >= out["decision_p50_us"] > 0
    with pytest.raises(ValueError, match="batch"):
        run_router_bench(instances=4, requests=1, batch=0, predictor=predictor)


def test_router_bench_builds_audit_records_with_and_without_views(
    predictor: OutputLengthPredictor,
) -> None:
    """``--audit`` builds and encodes every record, as the dispatcher does (a router that
    keeps no record refuses ``record()``: this fails if the bench's router did not)."""
    for every in (1, 0):
        out = run_router_bench(instances=16, rps=500, requests=200, batch=16,
                               predictor=predictor, audit=True, views_every=every)
        assert out["audit_record"] and out["views_every"] == every
    assert run_router_bench(instances=16, rps=500, requests=50, predictor=predictor,
                            views_every=0)["views_every"] == 0
