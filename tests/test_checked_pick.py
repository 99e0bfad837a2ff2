"""A decision that is not audited checks its pick against the last filters of the chain
instead of masking the fleet with them (``Policy._checked_pick``); it must pick what the
whole chain picks.

Two routers over two identical fleets see the same requests, heartbeats and completions,
one keeping audit records and one not: every pick is the same, so the estimators stay
equal to the bit. The per-slot checks (``passes``) are compared with the filters' masks
on loaded states.
"""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies import plugins
from goodserve.dispatcher.policies.base import RouteContext
from goodserve.dispatcher.router import Router

from goodserve.testing.snapshots import VaryingLengths, beat_all, random_request

GPUS = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]


def _fleet(n: int) -> FleetEstimator:
    est = FleetEstimator()
    for i in range(n):  # several instances of each GPU: idle ones tie
        est.add_instance(f"i{i}", gpu=GPUS[i % len(GPUS)], max_batch=64, now=0.0, alive=True)
    return est


def _drive(router: Router, n_req: int, rate: float, seed: int) -> list[tuple[int | None, bool]]:
    """Route a loaded stream; returns each decision's (slot, whether its mask was kept)."""
    rng = random.Random(seed)
    est = router.est
    ends: list[tuple[float, str]] = []
    out_list = []
    for k in range(n_req):
        now = k / rate
        while ends and ends[0][0] <= now:
            est.on_finish(heapq.heappop(ends)[1], now=now)
        if k % 20 == 0:
            beat_all(est, now)
        req = random_request(rng, k, now, lambda r: r.uniform(0.5, 15.0))
        out = router.route(req, now)
        out_list.append((out.slot, out.mask is not None))
        if out.slot is not None:
            heapq.heappush(ends, (now + float(out.ctx.finish[out.slot]), req.request_id))
    return out_list


@pytest.mark.parametrize(("n_instances", "rate"), [(16, 10.0), (64, 60.0)])
def test_unaudited_decisions_pick_as_the_whole_chain(
    n_instances: int, rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = {"n": 0}
    passes = plugins.ProtectsResidents.passes

    def counting(self: plugins.ProtectsResidents, ctx: RouteContext, i: int) -> bool:
        ok = passes(self, ctx, i)
        failed["n"] += not ok
        return ok

    monkeypatch.setattr(plugins.ProtectsResidents, "passes", counting)
    routers = [
        Router(estimator=_fleet(n_instances), predictor=VaryingLengths(1.6), policy="goodserve",
               seed=11, record_views=audit)
        for audit in (True, False)
    ]
    audited, checked = (_drive(r, 1500, rate, seed=2) for r in routers)
    assert [s for s, _ in audited] == [s for s, _ in checked]
    assert all(kept for _, kept in audited)
    n_checked = sum(not kept for _, kept in checked)
    # most picks were checked, some were left to the chain (ties on the idle fleet, the
    # rescue), and some checks turned a lowest-cost candidate down
    assert 0.5 * len(checked) < n_checked < len(checked)
    assert failed["n"] > 0
    a, b = routers[0].est, routers[1].est
    for name in ("q_cache", "d_cache", "guard_slack", "n_active", "rem_tokens"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


def test_checks_agree_with_the_masks_on_loaded_states() -> None:
    est = _fleet(48)
    router = Router(estimator=est, predictor=VaryingLengths(1.6), policy="goodserve", seed=4)
    rng = random.Random(9)
    protects = plugins.ProtectsResidents()
    spares = [plugins.SparesDeadlines(limit=x) for x in (0.05, 0.3, 2.0)]
    compared = removed = 0
    for k in range(600):
        now = k / 100.0
        if k % 20 == 0:
            beat_all(est, now)
        router.route(random_request(rng, k, now, lambda r: r.uniform(0.5, 15.0)), now)
        if k % 10:
            continue
        n_in = rng.randint(20, 4000)
        planned = float(rng.randint(10, 800))
        cached: float | np.ndarray = 0.0
        if k % 30 == 0:  # a prefix cached on some instances
            cached = np.where(np.arange(48) % 3 == 0, float(n_in // 2), 0.0)
        ctx = RouteContext(est, now, n_in, planned, rng.uniform(0.5, 20.0), "default", k,
                           planned, planned * 1.5, cached=cached)
        everyone = est.all_slots()
        for f in (protects, *spares):
            mask = f(ctx, everyone)
            got = np.array([f.passes(ctx, i) for i in range(48)])
            assert np.array_equal(got, mask), f.name
            compared += 1
            removed += int((~mask).sum())
    assert compared == 240 and removed > 100  # the checks also said no, many times


def test_an_unaudited_decision_has_no_record() -> None:
    router = Router(estimator=_fleet(8), predictor=VaryingLengths(1.6), policy="goodserve",
                    record_views=False)
    now = 0.0
    beat_all(router.est, now)
    rng = random.Random(1)
    outs = [router.route(random_request(rng, k, now, lambda r: 10.0), now) for k in range(20)]
    unaudited = [o for o in outs if o.mask is None]
    assert unaudited and all(o.slot is not None for o in unaudited)
    with pytest.raises(RuntimeError, match="record_views=True"):
        unaudited[0].record()
    with pytest.raises(RuntimeError, match="without its audit record"):
        _ = unaudited[0].scores
    # the decisions it left to the whole chain have their mask, but no record either
    chained = [o for o in outs if o.mask is not None]
    assert chained
    with pytest.raises(RuntimeError, match="record_views=True"):
        chained[0].record()
