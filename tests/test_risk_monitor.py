"""The risk monitor on hand-built fleet snapshots (no broker): who moves, who stays."""

from __future__ import annotations

import pytest
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.monitor.risk import (
    MonitorConfig,
    RiskMonitor,
    conditional_remaining,
    miss_risk,
    survival,
)

from goodserve.testing.snapshots import beat, progress_of


def test_length_model() -> None:
    assert survival(0, 200, 300) == 1.0
    assert survival(200, 200, 300) == pytest.approx(0.5)
    assert survival(300, 200, 300) == pytest.approx(0.1)
    # having produced more, less is left to go, but more than if it had stopped at P50
    assert conditional_remaining(200, 300, 100) < conditional_remaining(200, 300, 0)
    assert conditional_remaining(200, 300, 400) > 0
    assert miss_risk(200, 300, 50, 1000) < 0.01 < 0.9 < miss_risk(200, 300, 50, 10)


def _beat(est: FleetEstimator, slot: int, at: float, *, tpot_factor: float) -> None:
    """A heartbeat of the instance's own requests, running at ``tpot_factor`` x the model."""
    reqs = progress_of(est, slot)
    running = max(len(reqs), 1)
    kv = sum(tr.input_tokens + tr.generated for tr in est.infos[slot].requests.values())
    model = float(est.tpot(float(running), float(kv))[slot] / est.tpot_corr[slot])
    beat(est, slot, at=at, running=running, kv_tokens=kv, tpot_s=model * tpot_factor, requests=reqs)


def _situation(*, slow_factor: float, generated: int, cached: int = 0, deadline: float = 8.0):  # type: ignore[no-untyped-def]
    """A request on the V100 with a fast, idle H100 beside it; the V100 runs at 1/slow_factor."""
    est = FleetEstimator()
    est.add_instance("v100", gpu="V100", alive=True)
    est.add_instance("h100", gpu="H100", alive=True)
    est.on_assign(
        "v100",
        request_id="r",
        input_tokens=500,
        planned_tokens=300,
        deadline=deadline,
        now=0.0,
        p50=250,
        p90=300,
        cached_tokens=cached,
    )
    est.requests["r"].started = True
    est.requests["r"].generated = generated
    t = 0.0
    for _ in range(40):  # 4 s of heartbeats: the V100's speed settles
        t += 0.1
        _beat(est, 0, t, tpot_factor=slow_factor)
        _beat(est, 1, t, tpot_factor=1.0)
    return est, t


# (case, V100 speed factor, tokens generated, cached prompt tokens, deadline, migrates?)
CASES = [
    ("slowed 4x, far from done: moves to the H100", 4.0, 40, 0, 8.0, True),
    ("runs as estimated: load is the router's business", 1.0, 40, 0, 8.0, False),
    ("slowed only 1.6x: below the slowdown ratio", 1.6, 40, 0, 8.0, False),
    ("slowed 4x but nearly done: stays", 4.0, 296, 0, 8.0, False),
    ("slowed 4x but its prompt is cached there: stays", 4.0, 40, 400, 8.0, False),
    ("slowed 4x and already late: moving cannot save it", 4.0, 40, 0, 3.0, False),
]


@pytest.mark.parametrize(
    ("case", "slow", "generated", "cached", "deadline", "moves"), CASES, ids=[c[0] for c in CASES]
)
def test_who_migrates(
    case: str, slow: float, generated: int, cached: int, deadline: float, moves: bool
) -> None:
    est, now = _situation(slow_factor=slow, generated=generated, cached=cached, deadline=deadline)
    plans = RiskMonitor(MonitorConfig()).plan(est, now)
    assert [(p.request_id, p.source, p.target) for p in plans] == (
        [("r", "v100", "h100")] if moves else []
    )
    if moves:
        assert plans[0].risk >= 0.5 and plans[0].target_risk <= plans[0].risk - 0.2
        assert plans[0].est_finish_target_s * 1.3 <= deadline - now


@pytest.mark.parametrize(
    ("slow", "config"),
    [(1.0, MonitorConfig(require_cause=False)), (1.6, MonitorConfig(slowdown_ratio=1.3))],
)
def test_the_cause_gate_is_what_keeps_them(slow: float, config: MonitorConfig) -> None:
    """The stays above are the gate's doing: without it the same requests would move."""
    est, now = _situation(slow_factor=slow, generated=40)
    assert [p.target for p in RiskMonitor(config).plan(est, now)] == ["h100"]


def test_migrations_are_bounded_per_request() -> None:
    est, now = _situation(slow_factor=4.0, generated=40)
    mon = RiskMonitor(MonitorConfig(max_migrations_per_request=1))
    (plan,) = mon.plan(est, now)
    mon.record(plan)
    assert mon.plan(est, now + 1.0) == []


def _at_risk_one_by_one(mon: RiskMonitor, est: FleetEstimator, now: float) -> list[str]:
    """The at-risk requests as the round's first pass must find them: each judged alone
    through ``request_risk`` (which takes the fleet's vectors itself), every rule applied,
    most at risk first."""
    cfg = mon.config
    found = []
    for tr in est.requests.values():
        risk, _ = mon.request_risk(est, tr, now)
        outran = tr.generated > (tr.p50 or tr.planned_tokens)
        slowed = float(est.slowdown()[tr.slot]) >= cfg.slowdown_ratio
        if (mon.migrations.get(tr.request_id, 0) < cfg.max_migrations_per_request
                and tr.deadline - now > 0 and risk >= cfg.risk_threshold
                and tr.cached_tokens <= cfg.max_cached_share * tr.input_tokens
                and (not cfg.require_cause or outran or slowed)):
            found.append((risk, tr.request_id))
    found.sort(key=lambda x: -x[0])
    return [rid for _, rid in found]


@pytest.mark.parametrize("require_cause", [True, False])
def test_a_round_finds_what_judging_each_request_alone_finds(require_cause: bool) -> None:
    """A round (``at_risk``) takes the fleet's TPOT and slowdown once and tests the cheap
    rules first (a round over 20,480 requests on 512 instances took 350 ms, 4-80 ms
    since): the same requests at risk, in the same order, with the same figures, as the
    rules applied to each request alone, on a fleet with two instances slowed, requests
    past their P50, queued ones, cached ones and some already late; the plans follow."""
    import random

    rng = random.Random(8)
    est = FleetEstimator()
    gpus = ["H100", "A100", "A40", "V100"]
    for i in range(24):
        est.add_instance(f"i{i}", gpu=gpus[i % 4], alive=True)
    for k in range(600):
        iid = f"i{rng.randrange(24)}"
        est.on_assign(iid, request_id=f"r{k}", input_tokens=rng.randint(50, 3000),
                      planned_tokens=300.0, deadline=rng.uniform(0.5, 30.0), now=0.0,
                      p50=rng.uniform(50, 300), p90=rng.uniform(300, 600),
                      cached_tokens=rng.choice([0, 0, 0, 40, 2000]))
        tr = est.requests[f"r{k}"]
        tr.started = rng.random() < 0.7
        tr.generated = rng.randint(0, 500) if tr.started else 0
    t = 0.0
    for _ in range(40):  # heartbeats: i1 and i6 run 4x slower than the model
        t += 0.1
        for slot in range(24):
            _beat(est, slot, t, tpot_factor=4.0 if slot in (1, 6) else 1.0)
    mon = RiskMonitor(MonitorConfig(require_cause=require_cause, max_migrations_per_s=1e9))
    expected = _at_risk_one_by_one(mon, est, t)
    assert len(expected) > 20
    found = mon.at_risk(est, t)
    assert [tr.request_id for _, tr, _ in found] == expected
    for risk, tr, t_here in found:  # the same figures as the request judged alone
        assert (risk, t_here) == mon.request_risk(est, tr, t)
    plans = mon.plan(est, t)
    assert plans and {p.source for p in plans} >= {"i1", "i6"}
    # plans follow the at-risk order (those without a target in time are skipped)
    order = {rid: n for n, rid in enumerate(expected)}
    assert all(p.request_id in order for p in plans)
    ranks = [order[p.request_id] for p in plans]
    assert ranks == sorted(ranks)
