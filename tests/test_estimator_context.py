"""The estimator's context terms: TPOT grows with the KV a batch attends to, prefill with
the square of the prompt (table-driven on plain fleet snapshots, no broker)."""

from __future__ import annotations

import numpy as np
import pytest
from goodserve.dispatcher.estimator import FleetEstimator, fit_prefill, fit_tpot

from goodserve.perf.latency import PerfModel
from goodserve.testing.snapshots import beat, fleet

GPUS = ["V100", "A40", "L40S", "A100", "A800", "H100"]


@pytest.mark.parametrize("gpu", GPUS)
def test_tpot_plane_matches_the_performance_model(gpu: str) -> None:
    perf = PerfModel(gpu, "llama-2-7b")
    d0, d1, dc = fit_tpot(perf)
    assert dc > 0  # attention over the KV costs something
    for batch in (1, 8, 32, 128):
        for ctx in (256, 1024, 4096, 8192):
            model = perf.decode_step_time(batch, batch * ctx)
            assert d0 + d1 * batch + dc * batch * ctx == pytest.approx(model, rel=0.10)


@pytest.mark.parametrize("gpu", GPUS)
def test_prefill_curve_matches_the_performance_model(gpu: str) -> None:
    perf = PerfModel(gpu, "llama-2-7b")
    pb, pf, pq = fit_prefill(perf)
    assert pq >= 0 and pf > 0 and pb >= 0
    for n in (32, 256, 1024, 4096, 8192, 16000):
        assert pb + pf * n + pq * n * n == pytest.approx(perf.prefill_time(n), rel=0.12)


def _beat(est: FleetEstimator, slot: int, *, running: int, kv_tokens: int | None) -> None:
    beat(est, slot, running=running, kv_tokens=kv_tokens)


@pytest.mark.parametrize(
    ("short_kv", "long_kv"),
    [(1_000, 20_000), (4_000, 60_000), (0, 90_000)],
)
def test_an_instance_holding_more_kv_decodes_slower(short_kv: int, long_kv: int) -> None:
    est = fleet("A100", "A100")
    _beat(est, 0, running=16, kv_tokens=short_kv)
    _beat(est, 1, running=16, kv_tokens=long_kv)
    _, _, d, finish = est.estimate(100, 200)
    assert d[1] > d[0] and finish[1] > finish[0]
    perf = PerfModel("A100", "llama-2-7b")
    want = perf.decode_step_time(17, long_kv + 200) / perf.decode_step_time(17, short_kv + 200)
    assert d[1] / d[0] == pytest.approx(want, rel=0.15)


@pytest.mark.parametrize("gpu", ["V100", "H100"])
def test_a_long_prompt_is_charged_for_its_own_context(gpu: str) -> None:
    est = fleet(gpu)
    _beat(est, 0, running=32, kv_tokens=32 * 512)
    q_s, _, d_s, _ = est.estimate(100, 200)
    q_l, p_l, d_l, _ = est.estimate(8000, 200)
    assert q_l[0] == q_s[0]  # queueing does not depend on the request
    assert d_l[0] > d_s[0]
    pre = [float(est.prefill(n)[0]) for n in (1.0, 4000.0, 8000.0)]
    assert pre[2] - pre[1] > pre[1] - pre[0]  # convex: attention grows with the square
    perf = PerfModel(gpu, "llama-2-7b")
    assert p_l[0] == pytest.approx(perf.prefill_time(8000), rel=0.12)


def test_cached_prefix_prefill_costs_between_the_new_tokens_and_the_whole_prompt() -> None:
    est = fleet("A40")
    fresh_new = float(est.prefill(1000.0)[0])
    after_cache = float(est.prefill(1000.0, 7000.0)[0])
    whole = float(est.prefill(8000.0)[0])
    assert fresh_new < after_cache < whole


def test_heartbeat_without_kv_gauges_assumes_a_typical_context() -> None:
    est = fleet("H100", "H100")
    _beat(est, 0, running=200, kv_tokens=None)
    _beat(est, 1, running=0, kv_tokens=None)
    assert est.hb_kv_used[0] == 200 * 512
    assert est.hb_kv_used[1] == 0
    _, _, d, _ = est.estimate(100, 100)
    assert d[0] > 2 * d[1]


def test_context_terms_survive_the_audit_record() -> None:
    est = fleet("V100", "A100", "H100")
    _beat(est, 0, running=40, kv_tokens=30_000)
    _beat(est, 2, running=5, kv_tokens=9_000)
    est.on_assign(
        "a100-1", request_id="r", input_tokens=3000, planned_tokens=300, deadline=20.0, now=0.0
    )
    replayed = FleetEstimator.from_views(est.views(0.0))
    got_all = replayed.estimate(5000, 400, 1000.0)
    for got, want in zip(got_all, est.estimate(5000, 400, 1000.0), strict=True):
        np.testing.assert_array_equal(got, want)


def test_prompts_sent_to_an_instance_stretch_its_tpot_until_they_age() -> None:
    est = fleet("A100", "A100")
    for k in range(5):  # 5 x 2k-token prompts within a quarter second to instance 0
        est.on_assign(
            "a100-0",
            request_id=f"r{k}",
            input_tokens=2000,
            planned_tokens=100,
            deadline=60.0,
            now=0.05 * k,
        )
    assert 0.05 < est.prefill_busy[0] < 0.8 and est.prefill_busy[1] == 0.0
    assert est.stretch[0] == pytest.approx(1.0 / (1.0 - est.prefill_busy[0]))
    stretched = float(est.tpot(8.0, 0.0)[0])
    assert stretched > 1.1 * float(est.tpot(8.0, 0.0)[1])
    beat(est, 0, at=30.0, running=20)  # 30 s later (6 time constants): the burst has aged away
    assert est.prefill_busy[0] < 0.01 * 0.8
    assert float(est.tpot(8.0, 0.0)[0]) == pytest.approx(
        float(est.tpot(8.0, 0.0)[1]) * float(est.tpot_corr[0] / est.tpot_corr[1]), rel=0.01
    )


def _tpot_beat(est: FleetEstimator, at: float, tpot_s: float) -> None:
    beat(est, 0, at=at, running=8, kv_tokens=8 * 512, tpot_s=tpot_s)


def test_one_long_step_is_not_a_slowdown_but_a_lasting_one_is() -> None:
    est = fleet("H100")
    normal = float(est.tpot(8.0, 8 * 512)[0])
    t = 0.0
    for _ in range(50):
        t += 0.1
        _tpot_beat(est, t, normal)
    _tpot_beat(est, t + 0.1, 4 * normal)  # one heartbeat over a long prefill step
    assert est.slowdown()[0] < 1.5
    t += 0.1
    beats = 0
    while est.slowdown()[0] < 1.5 and beats < 20:  # now it runs at a third of its speed
        t += 0.1
        _tpot_beat(est, t, 3 * normal)
        beats += 1
    assert est.slowdown()[0] >= 1.5 and beats <= 8
