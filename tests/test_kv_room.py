"""kv-headroom's kept room: the filter removes exactly what the plain comparison removes.

``FleetEstimator.kv_fits_all`` answers "does this request fit in every instance's KV
cache?" from a kept lower bound of the room, lowered as KV is counted and recounted only
after KV was freed; kv-headroom skips its vector comparison when it says so. Here KV is
tight (small caches, heartbeats that report more and less KV in use, capacities that
change), and after every decision the filter and the bound are checked against the
plain formula ``hb_kv_used + need <= kv_total * share``.
"""

from __future__ import annotations

import random

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.base import RouteContext
from goodserve.dispatcher.policies.plugins import KvHeadroom
from goodserve.dispatcher.router import Router

from goodserve.testing.snapshots import VaryingLengths, beat_all, random_request

GPUS = ["H100", "A100", "L4", "V100"]


def _plain_fits(est: FleetEstimator, need: float, share: float) -> np.ndarray:
    return np.asarray(est.hb_kv_used + need <= est.kv_total * share)


def test_kv_headroom_removes_what_the_plain_comparison_removes() -> None:
    rng = random.Random(11)
    n = 12
    est = FleetEstimator()
    for i in range(n):
        est.add_instance(f"i{i}", gpu=GPUS[i % len(GPUS)], now=0.0, alive=True)
    router = Router(estimator=est, predictor=VaryingLengths(1.5), policy="goodserve", seed=1)
    kv = KvHeadroom(limit=0.98)
    total_blocks = [rng.randint(200, 600) for _ in range(n)]
    fast = slow = fits_all = 0
    for k in range(1500):
        now = k * 0.01
        if k % 20 == 0:  # heartbeats: KV in use goes up and down, capacities now and then

            def kv_gauges(i: int) -> dict[str, int]:
                if rng.random() < 0.05:
                    total_blocks[i] = rng.randint(200, 600)
                return {"kv_total_blocks": total_blocks[i],
                        "kv_used_blocks": rng.randint(0, total_blocks[i])}

            beat_all(est, now, own=kv_gauges)
        for need in (1.0, 50.5, 400.0, 2000.0, 6000.25):
            plain = _plain_fits(est, need, 0.98)
            said = est.kv_fits_all(0.98, need)
            assert not said or plain.all()  # a sufficient test: never a false "fits"
            fits_all += bool(plain.all())
            ctx = RouteContext(est, now, int(need), 0.0, 10.0, "default", 0)
            ctx.planned_tokens = need - int(need)
            mask = np.ones(n, dtype=bool)
            mask[rng.randrange(n)] = False
            out = kv(ctx, mask)
            assert np.array_equal(out, mask & plain)
            fast += said
            slow += not said
        req = random_request(rng, k, now, lambda r: r.uniform(0.5, 30.0))
        router.route(req, now)  # counts the prompt's KV on the chosen instance
        if k % 7 == 0 and est.requests:
            est.on_finish(rng.choice(sorted(est.requests)), now=now)
    # both ways were taken, and the bound found most of the requests that fit everywhere
    assert fast > 1000 and slow > 1000
    assert fast >= 0.5 * fits_all


def test_kv_room_of_an_empty_fleet_and_of_unknown_usage() -> None:
    est = FleetEstimator()
    assert est.kv_fits_all(0.98, 100.0)  # no instance: nothing to remove
    est.add_instance("a", gpu="H100", now=0.0, alive=True)
    assert est.kv_fits_all(0.98, 100.0)
    est.hb_kv_used[0] = np.nan  # a broken gauge: never "fits everywhere"
    est._kv_room.clear()
    assert not est.kv_fits_all(0.98, 100.0)
