"""``FleetEstimator.views`` keeps its last list and rebuilds only the instances whose state
changed: through placements, finishes, heartbeats (some stale, one draining), a dead
instance, a new instance and time passing, every list it returns encodes to the same
bytes as a list built from scratch, and between two placements it rebuilds few views.
"""

from __future__ import annotations

import random

import msgspec
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.router import Router
from goodserve.schemas import Heartbeat

from goodserve.testing.snapshots import VaryingLengths, random_request

GPUS = ["H100", "A100", "A40", "V100"]


def _fresh(est: FleetEstimator, now: float) -> bytes:
    """The views built from scratch, leaving the kept ones as they were."""
    kept = est._views_kept
    est._views_kept = None
    try:
        return msgspec.json.encode(est.views(now))
    finally:
        est._views_kept = kept


def test_kept_views_equal_fresh_ones_through_every_kind_of_change() -> None:
    rng = random.Random(3)
    est = FleetEstimator(stale_after_s=0.1)
    for i in range(12):
        est.add_instance(f"i{i}", gpu=GPUS[i % 4], now=0.0, alive=True)
    router = Router(estimator=est, predictor=VaryingLengths(1.5), policy="goodserve", seed=1,
                    record_views=False)  # only this test takes views
    placed: list[str] = []
    rebuilt: list[int] = []
    for k in range(400):
        now = k * 0.001  # about a dispatcher's pace: the kept budget passes every 5 ms
        step = k % 40
        if step == 0:  # a heartbeat round, all but one instance (it goes stale)
            for i, info in enumerate(est.infos):
                if i != 3:
                    est.on_heartbeat(Heartbeat(
                        instance_id=info.instance_id, gpu=info.gpu, model=info.model,
                        engine="test", at=now, running=int(est.n_active[i]),
                        tpot_s=0.02 + 0.001 * (k % 7), draining=(i == 5 and k >= 200)),
                        now=now)
        elif step == 7 and placed:
            est.on_finish(placed.pop(0), now=now)
        elif step == 13 and k == 253:
            est.mark_dead("i7")
        elif step == 21 and k == 301:
            est.add_instance("i12", gpu="H100", now=now, alive=True)
        out = router.route(random_request(rng, k, now, lambda r: r.uniform(1.0, 12.0)), now)
        if out.instance_id is not None:
            placed.append(out.request.request_id)
        before = est._views_kept
        got = est.views(now)
        assert msgspec.json.encode(got) == _fresh(est, now), k
        if before is not None and before[0].shape == est._views_kept[0].shape:  # type: ignore[index]
            rebuilt.append(sum(a is not b for a, b in zip(got, before[1], strict=True)))
    assert len(rebuilt) > 300
    # most calls rebuild a few views (the instance placed on); some rebuild many (a
    # heartbeat round, the kept budget's pass); none returned stale ones (above)
    rebuilt.sort()
    assert rebuilt[len(rebuilt) // 2] <= 3 and rebuilt[-1] >= 10


def test_a_returned_list_is_not_changed_by_later_calls() -> None:
    est = FleetEstimator()
    for i in range(4):
        est.add_instance(f"i{i}", gpu="A40", now=0.0, alive=True)
    first = est.views(0.0)
    snapshot = msgspec.json.encode(first)
    est.on_assign("i2", request_id="r", input_tokens=500, planned_tokens=100.0,
                  deadline=9.0, now=0.0)
    second = est.views(0.0)
    assert msgspec.json.encode(first) == snapshot  # the decision's record keeps what it saw
    assert second[2] is not first[2] and second[0] is first[0]
