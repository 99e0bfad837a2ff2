"""The GPU performance model: catalogue, monotonicity, calibration error bounds, CLI."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from goodserve.cli import main
from goodserve.errors import ConfigError
from goodserve.perf.calibration import calibrate, default_data_dir
from goodserve.perf.catalogue import GPUS, get_gpu, get_model
from goodserve.perf.latency import PerfModel

REQUIRED_GPUS = [
    "V100", "T4", "A10", "A40", "L4", "L40S", "A100-40GB", "A100-80GB", "A800",
    "H100-SXM", "H100-PCIE", "H800", "H200", "B200", "MI300X",
]  # fmt: skip


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("H100", "H100-SXM"),
        ("h100", "H100-SXM"),
        ("A100", "A100-80GB"),
        ("a100-40gb", "A100-40GB"),
        ("v100", "V100"),
        ("a800", "A800"),
        ("H800", "H800"),
        ("mi300x", "MI300X"),
        ("h100-pcie", "H100-PCIE"),
    ],
)
def test_gpu_aliases(alias: str, canonical: str) -> None:
    assert get_gpu(alias).name == canonical


def test_catalogue_complete_and_sourced() -> None:
    for name in REQUIRED_GPUS:
        g = get_gpu(name)
        assert g.bf16_tflops > 0 and g.hbm_gbps > 0 and g.memory_gb > 0
        assert g.source, name
    assert get_gpu("H100").hbm_gbps == 3350.0 and get_gpu("A40").bf16_tflops == 149.7


def test_unknown_gpu_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="H100-SXM"):
        get_gpu("RTX-9090")
    with pytest.raises(ConfigError, match="llama-2-7b"):
        get_model("gpt-17")


@pytest.mark.parametrize(
    ("model", "params_b", "kv_bytes"),
    [
        ("llama-2-7b", 6.74, 2 * 32 * 4096 * 2),
        ("llama-3-8b", 8.03, 2 * 32 * 1024 * 2),
        ("qwen2.5-7b", 7.6, 2 * 28 * 512 * 2),
        ("llama-3-70b", 70.6, 2 * 80 * 1024 * 2),
    ],
)
def test_model_shapes(model: str, params_b: float, kv_bytes: int) -> None:
    m = get_model(model)
    assert m.params / 1e9 == pytest.approx(params_b, rel=0.03)
    assert PerfModel("H100", m).kv_bytes_per_token == kv_bytes


def test_tiny_llama() -> None:
    m = get_model("tiny-llama")
    assert (m.layers, m.hidden, m.heads, m.vocab, m.intermediate) == (2, 256, 4, 1024, 512)
    assert get_model().name == "llama-2-7b"


def _dominates(a: str, b: str) -> bool:
    ga, gb = get_gpu(a), get_gpu(b)
    return (
        ga.bf16_tflops * ga.compute_eff >= gb.bf16_tflops * gb.compute_eff
        and ga.bf16_tflops * ga.attn_eff >= gb.bf16_tflops * gb.attn_eff
        and ga.hbm_gbps * ga.mem_eff >= gb.hbm_gbps * gb.mem_eff
    )


WORK = [  # (prefill tokens, decode batch, decode context)
    (1, 0, 0), (100, 0, 0), (4096, 0, 0), (0, 1, 512), (0, 32, 32 * 1024),
    (0, 256, 256 * 2048), (512, 16, 16 * 800), (8192, 128, 128 * 4000),
]  # fmt: skip


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2.5-14b"])
def test_faster_gpu_is_never_slower(model: str) -> None:
    pairs = 0
    for a, b in itertools.permutations(GPUS, 2):
        if not _dominates(a, b):
            continue
        pairs += 1
        pa, pb = PerfModel(a, model), PerfModel(b, model)
        for p, d, c in WORK:
            assert pa.step_time(p, d, c) <= pb.step_time(p, d, c) + 1e-12, (a, b, p, d, c)
        assert pa.ttft(3000) <= pb.ttft(3000)
        assert pa.isolated_latency(500, 200) <= pb.isolated_latency(500, 200)
    assert pairs > 40  # the check is not vacuous
    fast = PerfModel("H100", model)
    assert fast.tpot(1) < PerfModel("A100", model).tpot(1) < PerfModel("V100", model).tpot(1)


@pytest.mark.parametrize("gpu", ["V100", "A40", "A100", "H100", "H200", "MI300X"])
def test_more_work_takes_longer(gpu: str) -> None:
    pm = PerfModel(gpu)
    for b1, b2 in itertools.pairwise([1, 2, 8, 32, 64, 128, 256]):
        assert pm.decode_step_time(b2, b2 * 1000) > pm.decode_step_time(b1, b1 * 1000)
        assert pm.tpot(b2, 500) > pm.tpot(b1, 500)
    for n1, n2 in itertools.pairwise([1, 16, 128, 1024, 8192]):
        assert pm.prefill_time(n2) > pm.prefill_time(n1)
    assert pm.prefill_time(512, context_tokens=4000) > pm.prefill_time(512)
    assert pm.decode_step_time(8, 80_000) > pm.decode_step_time(8, 8_000)
    mixed = pm.step_time(512, 32, 32_000)
    assert mixed > max(pm.prefill_time(512), pm.decode_step_time(32, 32_000))
    # a fixed per-step overhead
    assert pm.step_time(1, 0, 0) >= pm.step_overhead_s > 0
    assert pm.isolated_latency(1000, 100) > pm.ttft(1000) + 98 * pm.tpot(1, 1000)


def test_kv_capacity() -> None:
    h100, h200 = PerfModel("H100"), PerfModel("H200")
    assert h200.kv_capacity_tokens() > h100.kv_capacity_tokens() > 50_000
    assert h100.kv_capacity_tokens(0.5) < h100.kv_capacity_tokens(0.9)
    assert PerfModel("T4").kv_capacity_tokens() == 0  # 13.5 GB of weights on 16 GB
    assert PerfModel("H100", "llama-3-70b", tp=4).kv_capacity_tokens() > 0
    assert PerfModel("H100", "llama-3-70b").kv_capacity_tokens() == 0


def test_tensor_parallel_speeds_up_big_model() -> None:
    one, four = PerfModel("H100", "llama-3-70b"), PerfModel("H100", "llama-3-70b", tp=4)
    assert four.tpot(1) < one.tpot(1) / 2
    assert four.prefill_time(2048) < one.prefill_time(2048) / 2


def test_fast_enough_for_hot_loops() -> None:
    pm = PerfModel("A100")
    t = time.perf_counter()
    for i in range(20_000):
        pm.step_time(i % 600, i % 64, (i % 64) * 700)
    assert time.perf_counter() - t < 1.0  # ~1 us each in practice


# Bounds stated in docs/perf-model.md (MAPE %, per data set and GPU).
BOUNDS = {
    "vidur-linear": 12.0,
    "llmservingsim-forward": 30.0,
    "blis-serving-itl": 60.0,
    "blis-serving-ttft": 20.0,
    "facts-vllm-h100": 15.0,
    "facts-itl-batch1": 10.0,
}


@pytest.mark.skipif(not default_data_dir().is_dir(), reason="shared calibration data missing")
def test_calibration_error_within_bounds() -> None:
    rows = calibrate()
    seen = {r.dataset for r in rows}
    assert seen == set(BOUNDS)
    for r in rows:
        assert r.points > 0
        assert r.mape_pct <= BOUNDS[r.dataset], r
    gpus = {r.gpu for r in rows if r.dataset == "vidur-linear"}
    assert gpus == {"A100-80GB", "H100-SXM", "A40"}


def test_cli_table_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "table", "--json", "--model", "llama-3-8b"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["gpu"]: r for r in rows}
    assert set(REQUIRED_GPUS) <= set(by)
    for r in rows:
        assert r["ttft_1000_ms"] > r["ttft_100_ms"] > 0
        assert r["tpot_b128_ms"] > r["tpot_b32_ms"] > r["tpot_b1_ms"] > 0
    assert by["H100-SXM"]["tpot_b1_ms"] < by["A100-80GB"]["tpot_b1_ms"]


@pytest.mark.skipif(not default_data_dir().is_dir(), reason="shared calibration data missing")
def test_cli_calibrate_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "calibrate", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"dataset", "gpu", "mape_pct", "median_err_pct", "points"} <= set(rows[0])
    assert main(["perf", "table", "--model", "nope"]) == 2
