"""The goodserve filter chain's shortcuts keep every mask what the plain rule gives.

near-best records the best candidate's finish (``finish_floor``) and the bound it keeps
(``finish_cap``); meets-deadline skips its comparison when the cap already implies it and
returns no candidate when its limit is below the floor; protects-residents then has
nothing to compare; spares-deadlines passes every instance at once when one bound of the
stall over the fleet (``FleetEstimator.stall_bound``) is within its limit. Here every
filter's output, request after request on a loaded fleet (deadlines from hopeless to
loose), is checked against the plain numpy rule.
"""

from __future__ import annotations

import math
import random

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.base import RouteContext
from goodserve.dispatcher.router import Router

from goodserve.testing.snapshots import VaryingLengths, beat_all, random_request

GPUS = ["H100", "A100", "A40", "L40S", "V100", "L4"]


def _plain(name: str, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
    est = ctx.est
    f = est.finish_time(ctx.input_tokens, ctx.planned_tokens, ctx.cached)
    if name == "usable":
        return mask & est.usable(ctx.now)
    if name == "model-match":
        return mask.copy()
    if name == "near-best":
        best = float(f[mask].min()) if mask.any() else math.inf
        left = ctx.deadline_in
        bound = min(left - 0.5 * max(left - best, 0.0), 2.0 * best)
        return mask & (f <= max(bound, best))
    if name == "kv-headroom":
        need = ctx.input_tokens + ctx.planned_tokens
        return mask & (est.hb_kv_used + need <= est.kv_total * 0.98)
    if name == "meets-deadline":
        return mask & (f <= (ctx.deadline_in - 0.05) / 1.05)
    n_new = max(ctx.input_tokens - float(ctx.cached), 1.0)
    if name == "spares-deadlines":
        stall = est.prefill(n_new, ctx.cached) - est.pbc
        return mask & (stall * est.budget_load(ctx.now) <= 0.3)
    assert name == "protects-residents"
    per_token = est.d1_tc + est.k_ctx * (ctx.input_tokens + 0.5 * ctx.planned_tokens)
    delay = per_token * np.minimum(est.rem_at_min, ctx.planned_tokens) + est.prefill(n_new)
    return mask & ((est.min_slack >= delay) | (est.min_slack < 0.0))


def test_each_filter_of_the_chain_gives_the_plain_mask() -> None:
    rng = random.Random(8)
    est = FleetEstimator()
    for i in range(24):
        est.add_instance(f"i{i}", gpu=GPUS[i % len(GPUS)], now=0.0, alive=True)
    router = Router(estimator=est, predictor=VaryingLengths(1.4), policy="goodserve", seed=2)
    policy = router.policy
    emptied_by_meets = skipped_meets = spared_by_bound = spares_removed = 0
    for k in range(600):
        now = k * 0.05
        if k % 20 == 0:
            beat_all(est, now)
        req = random_request(
            rng, k, now, lambda r: r.choice([0.05, 0.3, 1.0, 3.0, 10.0, 60.0]) * r.uniform(0.5, 1.5)
        )
        p = VaryingLengths(1.4).predict(req)
        ctx = RouteContext(
            est, now, req.input_tokens, 0.0, float(req.slo_s or 0.0), "default", 0, p.p50, p.p90
        )
        ctx.set_plan("p90")
        mask = est.all_slots()
        ctx.finish_cap, ctx.finish_floor = math.inf, -math.inf
        for flt in policy.filters:
            want = _plain(flt.name, ctx, mask)
            out = flt(ctx, mask)
            assert np.array_equal(out, want), (k, flt.name)
            if flt.name == "meets-deadline":
                emptied_by_meets += mask.any() and not out.any()
                skipped_meets += out is mask
            if flt.name == "spares-deadlines":
                spared_by_bound += out is mask and ctx.finish_cap >= ctx.finish_floor
                spares_removed += int(mask.sum() - out.sum()) > 0
            mask = out
        router.route(req, now)  # load the fleet as decisions go
    assert emptied_by_meets > 50 and skipped_meets > 50  # both shortcuts were taken
    # spares-deadlines' bound let most decisions through at once, and the rest were compared
    assert spared_by_bound > 40 and spares_removed > 20, (spared_by_bound, spares_removed)
