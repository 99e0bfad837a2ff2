"""``FleetEstimator.budget_load`` (the deadline table behind the stall rules) equals the
plain sum over the tracked requests, through assignments, moves and finishes; between
passes it is kept term by term."""

from __future__ import annotations

import math
import random

import numpy as np
from goodserve.dispatcher.estimator import BUDGET_FLOOR_S, BUDGET_TICK_S, FleetEstimator
from goodserve.schemas import RequestProgress

from goodserve.testing.snapshots import beat, fleet, progress_of


def _plain(est: FleetEstimator, now: float) -> np.ndarray:
    out = np.zeros(len(est))
    for i, info in enumerate(est.infos):
        for tr in info.requests.values():
            left = tr.deadline - now
            if 0.0 < left < math.inf and tr.deadline > tr.assigned_at:
                out[i] += 1.0 / max(left, BUDGET_FLOOR_S)
    return out


def test_budget_load_is_the_sum_over_the_tracked_requests() -> None:
    est = fleet("H100", "A100", "A40", "V100", "L40S")
    ids = est.ids
    rng = random.Random(11)
    live: list[str] = []
    for k in range(2500):
        now = k * 0.01
        roll = rng.random()
        if roll < 0.55 or not live:
            deadline = rng.choice([now + rng.uniform(0.01, 30.0), now - 1.0, math.inf])
            est.on_assign(rng.choice(ids), request_id=f"r{k}", input_tokens=rng.randint(1, 4000),
                          planned_tokens=float(rng.randint(1, 500)), deadline=deadline, now=now)
            live.append(f"r{k}")
        elif roll < 0.7:
            assert est.move(rng.choice(live), rng.choice(ids), now=now)
        else:
            est.on_finish(live.pop(rng.randrange(len(live))), now=now)
        if k % 50 == 0:
            got = est.budget_load(now + rng.uniform(0.0, 5.0) if k % 100 else now)
            assert got.shape == (len(est),)
        if k % 37 == 0:
            t = now + rng.uniform(0.0, 3.0)
            assert np.allclose(est.budget_load(t), _plain(est, t), rtol=1e-12, atol=0.0), k
    # the table holds exactly the requests placed before their deadlines, and no others
    assert len(est._dl_rows) == sum(
        1 for tr in est.requests.values() if tr.assigned_at < tr.deadline < math.inf
    )
    for row, tr in enumerate(est._dl_rows):
        assert tr.row == row and est.requests[tr.request_id] is tr


def test_a_replayed_estimator_returns_the_recorded_budgets() -> None:
    est = fleet("H100", "A100")
    est.on_assign("h100-0", request_id="a", input_tokens=100, planned_tokens=10.0,
                  deadline=2.0, now=0.0)
    views = est.views(1.0)
    assert [v.budget_load for v in views] == [1.0, 0.0]
    again = FleetEstimator.from_views(views)
    assert again.budget_load(123.0).tolist() == [1.0, 0.0]  # as the decision saw it


def test_budget_load_is_kept_between_passes() -> None:
    """Within BUDGET_TICK_S of a pass, placements and finishes add and remove their own
    terms (taken at the pass's time) instead of a new pass; after it, a new pass."""
    est = fleet("H100", "A100", "A40")
    ids = est.ids
    t0 = 10.0
    est.budget_load(t0)  # a pass
    rng = random.Random(4)
    live: list[str] = []
    for k in range(300):
        now = t0 + BUDGET_TICK_S * 0.9 * k / 300
        if rng.random() < 0.6 or not live:
            est.on_assign(rng.choice(ids), request_id=f"r{k}", input_tokens=100,
                          planned_tokens=10.0, deadline=now + rng.uniform(0.01, 5.0), now=now)
            live.append(f"r{k}")
        else:
            est.on_finish(live.pop(rng.randrange(len(live))), now=now)
    kept = est.budget_load(t0 + BUDGET_TICK_S * 0.95).copy()
    assert np.allclose(kept, _plain(est, t0), rtol=1e-9, atol=1e-9)  # terms at the pass
    later = t0 + 2 * BUDGET_TICK_S
    assert est.budget_load(later).tolist() == _plain_pass(est, later)  # a new pass


def _plain_pass(est: FleetEstimator, now: float) -> list[float]:
    """What a pass computes, with the same operations in the same order (bit for bit)."""
    n = len(est._dl_rows)
    left = est._dl_deadline[:n] - now
    inv = 1.0 / np.maximum(left, BUDGET_FLOOR_S)
    inv[left <= 0.0] = 0.0
    return np.bincount(est._dl_slot[:n], weights=inv, minlength=len(est)).tolist()


def test_stall_bound_stays_above_every_instances_stall_rate() -> None:
    """``stall_bound`` = (U, V) with U >= budget_load * pfc and V >= budget_load * pqc on
    every instance, through placements, finishes, passes, corrections that raise an
    instance's prefill coefficients, heartbeats listing other replicas' requests, and a new
    instance; right after a pass it is exact."""
    est = fleet("H100", "A100", "A40", "V100")
    ids = est.ids
    rng = random.Random(5)
    live: list[str] = []
    raised = foreign = 0
    for k in range(1500):
        now = 3.0 + k * BUDGET_TICK_S * rng.choice([0.1, 0.5, 1.5])
        roll = rng.random()
        if roll < 0.5 or not live:
            est.on_assign(rng.choice(ids), request_id=f"r{k}", input_tokens=rng.randint(1, 4000),
                          planned_tokens=float(rng.randint(1, 500)),
                          deadline=now + rng.uniform(0.01, 20.0), now=now)
            live.append(f"r{k}")
        elif roll < 0.8:
            est.on_finish(live.pop(rng.randrange(len(live))), now=now)
        elif roll < 0.95:  # a correction: the instance's prefill got slower or faster
            i = rng.randrange(len(est))
            before = est._stall_max
            est.prefill_corr[i] *= rng.choice([0.5, 1.5, 3.0])
            est._refresh(i)
            raised += before is not None and est._stall_max != before
        else:  # a heartbeat listing requests another replica placed there
            i = rng.randrange(len(est))
            others = [_other(f"x{k}-{j}", now + rng.uniform(-1.0, 10.0)) for j in range(3)]
            beat(est, i, at=now, running=3, requests=progress_of(est, i) + others)
            foreign += est.hb_budget[i] > 0.0
        if k == 700:
            ids.append("h100-new")
            est.add_instance("h100-new", gpu="H100", now=now, alive=True)
        u, v = est.stall_bound(now)
        b = est.budget_load(now)
        assert u >= float((b * est.pfc).max()) and v >= float((b * est.pqc).max()), k
        if est._budget_at == now and k % 10 == 0:  # after a pass, before any change: exact
            est._stall_max = None
            assert est.stall_bound(now) == (float((b * est.pfc).max()),
                                            float((b * est.pqc).max()))
    assert raised > 20  # corrections did raise the kept bound
    assert foreign > 40  # and heartbeats brought other replicas' requests in


def _other(request_id: str, deadline: float) -> RequestProgress:
    return RequestProgress(request_id=request_id, state="running", generated=5,
                           input_tokens=300, deadline=deadline)


def test_requests_another_replica_placed_count_through_the_heartbeat() -> None:
    """A heartbeat lists every request on the instance with its deadline: those this
    dispatcher does not track (another replica placed them) add their terms at the
    heartbeat's time; its own are not counted twice; a request with no deadline or past
    it adds nothing; the kept budget follows between passes, and a later heartbeat
    without them takes them out again."""
    est = fleet("H100", "A100")
    est.on_assign("h100-0", request_id="mine", input_tokens=100, planned_tokens=10.0,
                  deadline=12.0, now=10.0)
    assert est.budget_load(10.0).tolist() == [0.5, 0.0]
    theirs = [_other("a", 14.0), _other("b", 10.01), _other("c", 0.0), _other("d", 9.0)]
    beat(est, 0, at=10.0, running=5, requests=progress_of(est, 0) + theirs)
    want = 0.5 + 1.0 / 4.0 + 1.0 / BUDGET_FLOOR_S  # a: 4 s left; b: within the floor
    assert math.isclose(est.budget_load(10.0)[0], want)  # kept: the same tick
    assert math.isclose(est.budget_load(10.0 + 2 * BUDGET_TICK_S)[0],
                        1.0 / (2.0 - 2 * BUDGET_TICK_S) + 1.0 / 4.0 + 1.0 / BUDGET_FLOOR_S)
    u, _ = est.stall_bound(10.0 + 2 * BUDGET_TICK_S)
    assert u >= est.budget_load(10.0 + 2 * BUDGET_TICK_S)[0] * est.pfc[0]
    beat(est, 0, at=10.1, running=1, requests=progress_of(est, 0))  # they finished
    assert math.isclose(est.budget_load(10.1)[0], 1.0 / 1.9)
    assert est.hb_budget.tolist() == [0.0, 0.0]
    # our own request's result arrives before a heartbeat sent while it still ran: that
    # heartbeat still lists it, and it is not taken for another replica's
    late_beat = progress_of(est, 0)
    est.on_finish("mine", now=10.2)
    beat(est, 0, at=10.15, running=1, requests=late_beat)
    assert est.hb_budget.tolist() == [0.0, 0.0]
    assert est.budget_load(10.2 + 2 * BUDGET_TICK_S).tolist() == [0.0, 0.0]
