"""A scorer that speaks alone is picked from its candidates' costs (no score vector): the
same slot as the max-score pick on its normalized scores, the same scores when read."""

from __future__ import annotations

import math

import numpy as np
import pytest
from goodserve.dispatcher.policies.base import (
    CandidateCosts,
    DeferredScores,
    RouteContext,
    argmax_seeded_ties,
    lowest_cost_seeded_ties,
    normalize_candidates,
)
from goodserve.dispatcher.policies.registry import make_policy
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.router import Router
from goodserve.schemas import AgentRequest

from goodserve.testing.snapshots import beat, fleet


def _costs(values: np.ndarray, mask: np.ndarray) -> CandidateCosts:
    slots = mask.nonzero()[0]
    return CandidateCosts(values[slots], slots)


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Costs and masks with unique lowest costs, exact ties, near ties within the 1e-12
    tolerance, one candidate, equal costs everywhere and infinite costs."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(300):
        n = int(rng.integers(1, 40))
        v = rng.random(n) * 10.0
        kind = rng.integers(0, 6)
        if kind == 1:  # exact ties at the lowest cost
            v[rng.integers(0, n, size=3)] = v.min()
        elif kind == 2:  # few distinct values: ties everywhere
            v = rng.integers(0, 3, size=n).astype(float)
        elif kind == 3:  # a near tie inside the tolerance
            j = int(v.argmin())
            v[(j + 1) % n] = v[j] + 1e-14 * (v.max() - v[j])
        elif kind == 4:  # no deadline: every cost infinite
            v = np.full(n, math.inf)
        elif kind == 5:
            v[rng.integers(0, n)] = math.inf
        mask = rng.random(n) < 0.7
        mask[int(rng.integers(0, n))] = True
        out.append((v, mask))
    return out


@pytest.mark.parametrize("seed", [0, 1, 7, 123456789])
def test_lowest_cost_pick_is_the_max_score_pick(seed: int) -> None:
    picked_ties = 0
    for v, mask in _cases():
        costs = _costs(v, mask)
        scores = normalize_candidates(costs.cand, mask)
        want = argmax_seeded_ties(scores, mask, seed)
        assert lowest_cost_seeded_ties(costs, mask, seed) == want
        z = np.zeros(())
        assert lowest_cost_seeded_ties(costs, mask, seed, z) == want  # with the scratch scalar
        picked_ties += int(np.count_nonzero(scores >= scores.max() - 1e-12) > 1)
    assert picked_ties > 50  # the cases do exercise the tie draw


def test_deferred_scores_are_the_normalized_scores() -> None:
    v = np.array([3.0, 1.0, 2.0, 5.0])
    mask = np.array([True, True, False, True])
    costs = _costs(v, mask)
    want = normalize_candidates(costs.cand, mask)
    assert np.array_equal(DeferredScores(costs, mask, 1.0).vector(), want)
    assert np.array_equal(DeferredScores(costs, mask, 0.5).vector(), 0.5 * want)


def _request(rid: str, slo_s: float) -> AgentRequest:
    return AgentRequest(
        request_id=rid, task="chat", prompt="hi", input_tokens=200, max_tokens=400,
        arrival=0.0, slo_s=slo_s,
    )


def test_two_scorers_speaking_still_add_their_scores() -> None:
    """With a prefix hit somewhere, prefix-cache speaks too: the pick is on the weighted
    sum of both normalized scores (the path without deferred scores)."""
    est = fleet("H100", "A100", "A40")
    for slot in range(3):
        beat(est, slot, running=4)
    ctx = RouteContext(
        est=est, now=0.0, input_tokens=200, planned_tokens=100.0, deadline_in=30.0,
        model="default", seed=3, p50=100.0, p90=100.0,
        cached=np.array([200.0, 0.0, 0.0]),
    )
    policy = make_policy("goodserve")
    slot, mask, scores, _ = policy.select(ctx)
    assert isinstance(scores, np.ndarray)
    alone = normalize_candidates(30.0 - ctx.finish[mask], mask)  # just-enough's scores
    cached = np.where(mask, ctx.cached / 200.0, 0.0)  # prefix-cache's
    assert np.allclose(scores, alone + 2.0 * cached)
    assert slot == int(np.argmax(np.where(mask, scores, -np.inf)))
    # the whole prompt cached on the H100 outweighs just-enough's pick of a slower GPU
    assert int(np.argmax(alone)) != 0 and slot == 0
    ctx2 = RouteContext(
        est=est, now=0.0, input_tokens=200, planned_tokens=100.0, deadline_in=30.0,
        model="default", seed=3, p50=100.0, p90=100.0,
    )
    slot2, _, deferred, _ = policy.select(ctx2)
    assert isinstance(deferred, DeferredScores)
    assert slot2 == int(np.argmax(deferred.vector()))


def test_route_outcome_reads_deferred_scores_as_a_vector() -> None:
    est = fleet("H100", "A100", "A40", "V100")
    router = Router(estimator=est, predictor=ConstantPredictor(150), policy="goodserve", seed=1)
    out = router.route(_request("r1", 20.0), 0.0)
    assert isinstance(out.raw_scores, DeferredScores)
    assert out.scores.shape == (4,)
    assert out.slot is not None and out.scores[out.slot] == out.scores.max() == 1.0
    rec = out.record()
    assert [c.score for c in rec.candidates] == out.scores.tolist()
