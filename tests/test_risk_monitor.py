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
