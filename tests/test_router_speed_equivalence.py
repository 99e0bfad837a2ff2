"""The fast decision core decides exactly as the plain formulas it replaced.

The filters, scorer and picker of ``goodserve`` skip work where it cannot change the
result (masking when every instance is usable, a finish bound already implied, masking
the scores when the best one is a candidate's, a comparison folded into one guard
vector). Here a plain implementation of the policy, one numpy expression per rule as the
decision core had them, recomputes every decision of a loaded fleet from the estimator
state the decision saw (its audit views): same eligible mask, same scores, same pick,
bit for bit.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.base import RouteContext
from goodserve.dispatcher.router import Router

from goodserve.testing.snapshots import VaryingLengths, beat_all, random_request

GPUS = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]


def _plain_select(ctx: RouteContext) -> tuple[int | None, np.ndarray, np.ndarray]:
    """The goodserve chain as plain numpy expressions (slot, mask, scores); None: no
    instance passes (the rescue policy then decides, not compared here)."""
    est = ctx.est
    cfg = {"keep_slack": 0.5, "trust_region": 1.0, "margin_rel": 0.05, "margin_abs_s": 0.05}
    if ctx.miss_rate > 0.05:  # load pressure: 5-15% missed -> keep 0.2 of the slack, 2.5x
        w = min((ctx.miss_rate - 0.05) / (0.15 - 0.05), 1.0)
        cfg["keep_slack"] += w * (0.2 - cfg["keep_slack"])
        cfg["trust_region"] += w * (1.5 - cfg["trust_region"])
    ctx.set_plan("p90")
    f = est.finish_time(ctx.input_tokens, ctx.planned_tokens, ctx.cached)
    mask = np.ones(len(est), dtype=bool) & est.usable(ctx.now)
    cand = f[mask]
    best = float(cand.min())
    bound = ctx.deadline_in - cfg["keep_slack"] * max(ctx.deadline_in - best, 0.0)
    bound = min(bound, (1.0 + cfg["trust_region"]) * best)
    mask = mask & (f <= max(bound, best))
    need = ctx.input_tokens + ctx.planned_tokens
    mask = mask & (est.hb_kv_used + need <= est.kv_total * 0.98)
    mask = mask & (f <= (ctx.deadline_in - cfg["margin_abs_s"]) / (1.0 + cfg["margin_rel"]))
    n_new = max(ctx.input_tokens - float(ctx.cached), 1.0)
    prefill = est.prefill(n_new, ctx.cached)
    per_token = est.d1_tc + est.k_ctx * (ctx.input_tokens + 0.5 * ctx.planned_tokens)
    delay = per_token * np.minimum(est.rem_at_min, ctx.planned_tokens) + prefill
    mask = mask & ((est.min_slack >= delay) | (est.min_slack < 0.0))
    # spares-deadlines: the prefill's own compute x the requests' summed 1 / time left
    mask = mask & ((prefill - est.pbc) * est.budget_load(ctx.now) <= 0.3)
    if not mask.any():
        return None, mask, np.zeros(len(est))
    slack = ctx.deadline_in - f
    c = slack[mask]
    lo, hi = c.min(), c.max()
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        scores = mask.astype(float)
    else:
        scores = np.where(mask, (hi - slack) / span, 0.0)
    s = np.where(mask, scores, -np.inf)
    ties = np.flatnonzero(s >= s.max() - 1e-12)
    return int(ties[ctx.seed % len(ties)]), mask, scores


@pytest.mark.parametrize("n_instances", [8, 96])
def test_fast_core_decides_as_the_plain_formulas(n_instances: int) -> None:
    rng = random.Random(5)
    est = FleetEstimator()
    for i in range(n_instances):
        est.add_instance(f"i{i}", gpu=GPUS[i % len(GPUS)], now=0.0, alive=True)
    lengths = VaryingLengths(lambda n: 1.2 + (n % 7) / 10.0)
    router = Router(estimator=est, predictor=lengths, policy="goodserve", seed=3)
    compared = 0
    pressures: set[float] = set()
    for k in range(900):
        now = k * 1.0 / n_instances  # about as loaded whatever the size
        if k % 25 == 0:  # heartbeats: one instance draining now and then (not all usable)
            draining = k % n_instances if (k // 25) % 3 == 0 else -1
            beat_all(est, now, own=lambda i, d=draining: {"draining": i == d})
        req = random_request(rng, k, now, lambda r: r.uniform(0.5, 12.0))
        out = router.route(req, now)
        rec = out.record()
        seen = FleetEstimator.from_views(list(rec.instances))
        ctx = RouteContext(
            seen,
            now,
            out.input_tokens,
            out.p50,
            out.deadline - now,
            req.model,
            out.seed,
            out.p50,
            out.p90,
            0.0,
            req.max_tokens,
        )
        ctx.miss_rate = float(rec.config.get("miss_rate", 0.0))
        pressures.add(round(ctx.miss_rate, 1))
        slot, mask, scores = _plain_select(ctx)
        if slot is None:
            assert "left none" in out.how
            continue
        assert out.how == "goodserve: max-score"
        assert out.slot == slot
        assert np.array_equal(out.mask, mask)
        assert out.scores.tobytes() == scores.tobytes()
        compared += 1
    assert compared > 100  # many decisions found an instance that promises the deadline
    assert len(pressures) > 2  # under several load pressures (requests pass their deadlines)
