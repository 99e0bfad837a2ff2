"""Error of the performance model against measured GPU profiles, per GPU and data set.

Data sets (under the shared data folder, ``calibration/``; see its README):

* ``vidur-linear``: vidur's per-operator profiles (A100, H100, A40), summed per layer in
  ``derived_linear_layers_forward_ms.csv``: time of all decoder linear layers + norms for
  ``num_tokens`` tokens, tp=1; compared with ``PerfModel.linear_time``.
* ``llmservingsim-forward``: LLMServingSim per-layer latency tables (H100, A6000,
  Llama-3.1-8B): a full forward pass of ``input`` prompt tokens (no KV cache) summed over
  layers, compared with the model's forward time (LM head over all tokens, as profiled).
* ``blis-serving``: measured vLLM serving runs on H100 recorded in inference-sim's
  ``trained_physics_iter29.json`` (dense models of the catalogue): mean ITL and TTFT,
  compared with a steady-state estimate (concurrency by Little's law, prefill work mixed
  into decode steps at the arrival rate).
* ``facts``: the README facts (vLLM H100 Llama-2-7B TTFT 29.5 ms at an assumed 1024-token
  prompt, ITL 11.2 ms; batch-1 ITL ranges 10-15 ms H100, 15-25 A100, 25-35 L40S for
  Llama-2-7B and Llama-3-8B; error 0 inside a range, else distance to the nearer bound).

``calibrate()`` returns one row per (data set, GPU) with MAPE, median and max error.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from goodserve.perf.latency import PerfModel

__all__ = ["CalibrationRow", "calibrate", "default_data_dir"]

_VIDUR_MODELS = {
    "Llama-2-7b-hf": "llama-2-7b",
    "Llama-2-70b-hf": "llama-2-70b",
    "Meta-Llama-3-8B": "llama-3-8b",
    "Meta-Llama-3-70B": "llama-3-70b",
}
_VIDUR_GPUS = {"a100": "A100-80GB", "h100": "H100-SXM", "a40": "A40"}
_BLIS_MODELS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3-70b",
}


@dataclass(slots=True)
class CalibrationRow:
    dataset: str
    gpu: str
    points: int
    mape_pct: float
    median_err_pct: float
    max_err_pct: float
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def default_data_dir() -> Path:
    """The shared calibration data: $GOODSERVE_DATA_DIR, else ../shared/data from the repo."""
    env = os.environ.get("GOODSERVE_DATA_DIR")
    if env:
        return Path(env) / "calibration"
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "data" / "calibration"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "data" / "calibration"
        if cand.is_dir():
            return cand
    return Path("/work/shared/data/calibration")


def _row(dataset: str, gpu: str, errs: list[float], note: str = "") -> CalibrationRow:
    a = [abs(e) * 100 for e in errs]
    return CalibrationRow(
        dataset=dataset,
        gpu=gpu,
        points=len(a),
        mape_pct=round(statistics.fmean(a), 2),
        median_err_pct=round(statistics.median(a), 2),
        max_err_pct=round(max(a), 2),
        note=note,
    )


def vidur_linear(data: Path) -> list[CalibrationRow]:
    errs: dict[str, list[float]] = defaultdict(list)
    with open(data / "vidur" / "derived_linear_layers_forward_ms.csv") as f:
        for r in csv.DictReader(f):
            if r["tp"] != "1" or r["model"] not in _VIDUR_MODELS:
                continue
            gpu = _VIDUR_GPUS[r["gpu"]]
            pm = PerfModel(gpu, _VIDUR_MODELS[r["model"]])
            meas = float(r["linear_and_norm_ms_all_layers"]) / 1e3
            pred = pm.linear_time(int(r["num_tokens"]))
            errs[gpu].append(pred / meas - 1)
    return [
        _row("vidur-linear", g, e, "Llama-2-7B/70B, Llama-3-8B/70B; 1..8192 tokens; tp1")
        for g, e in sorted(errs.items())
    ]


def llmservingsim_forward(data: Path) -> list[CalibrationRow]:
    rows = []
    for gpu, fname in (
        ("H100-SXM", "layers__H100_meta-llama_Llama-3.1-8B_tp1.csv"),
        ("A6000", "layers__A6000_meta-llama_Llama-3.1-8B_tp1.csv"),
    ):
        per_layer: dict[int, float] = defaultdict(float)
        once: dict[int, float] = defaultdict(float)
        with open(data / "llmservingsim_v0" / fname) as f:
            for r in csv.DictReader(f):
                n = int(r["input"])
                ns = float(r["latency(ns)"]) * 1e-9
                if r["layer_name"] in ("embedding", "final_layernorm", "lm_head"):
                    once[n] += ns
                else:
                    per_layer[n] += ns
        pm = PerfModel(gpu, "llama-3-8b")
        errs = []
        for n in sorted(per_layer):
            if n % 16 and n > 64:  # thin the 2048 points; keep the small sizes dense
                continue
            meas = per_layer[n] * pm.model.layers + once[n]
            pairs = n * n * 0.5
            pred = pm._forward(n, n, pairs, 0)
            errs.append(pred / meas - 1)
        rows.append(_row("llmservingsim-forward", gpu, errs, "Llama-3.1-8B prefill 1..2048 tok"))
    return rows


def _blis_estimate(pm: PerfModel, exp: dict[str, object]) -> tuple[float, float]:
    """Steady-state (ITL, TTFT) of a serving run: Little's law + prefill mixed in."""
    wl = exp["workload"]["inference_perf"]  # type: ignore[index]
    exp_d = exp["expected"]
    n_req = float(exp_d["completed_requests"])  # type: ignore[index]
    in_mean = float(exp_d["total_input_tokens"]) / n_req  # type: ignore[index]
    out_mean = float(exp_d["total_output_tokens"]) / n_req  # type: ignore[index]
    e2e = float(exp_d["e2e_mean_ms"]) / 1e3  # type: ignore[index]
    itl_w = ttft_w = w = 0.0
    for stage in wl["stages"]:
        rate, dur = float(stage["rate"]), float(stage["duration"])
        conc = max(1.0, rate * e2e)
        ctx = in_mean + out_mean / 2
        s = pm.decode_step_time(round(conc), int(conc * ctx))
        for _ in range(20):  # fixed point: prefill tokens per step = rate * in_mean * s
            p = int(rate * in_mean * s)
            s = pm.step_time(p, round(conc), int(conc * ctx), prefill_attn_pairs=p * in_mean / 2)
        mixed = pm.step_time(
            int(in_mean), round(conc), int(conc * ctx), prefill_attn_pairs=in_mean * in_mean / 2
        )
        ttft = 0.5 * s + mixed
        weight = rate * dur
        itl_w += s * weight
        ttft_w += ttft * weight
        w += weight
    return itl_w / w, ttft_w / w


def blis_serving(data: Path) -> list[CalibrationRow]:
    with open(data / "blis" / "trained_physics_iter29.json") as f:
        doc = json.load(f)
    itl_errs: list[float] = []
    ttft_errs: list[float] = []
    for exp in doc["experiments"]:
        model = _BLIS_MODELS.get(exp["model"])
        if model is None or exp["hardware"] != "H100":
            continue
        pm = PerfModel("H100-SXM", model, tp=int(exp["tp"]))
        itl, ttft = _blis_estimate(pm, exp)
        itl_errs.append(itl / (exp["expected"]["itl_mean_ms"] / 1e3) - 1)
        ttft_errs.append(ttft / (exp["expected"]["ttft_mean_ms"] / 1e3) - 1)
    return [
        _row(
            "blis-serving-itl",
            "H100-SXM",
            itl_errs,
            "vLLM runs: Llama-2-7B, Qwen2.5-7B, Llama-3.1-70B tp4",
        ),
        _row("blis-serving-ttft", "H100-SXM", ttft_errs, "same runs, mean TTFT"),
    ]


_ITL_RANGES = {"H100-SXM": (0.010, 0.015), "A100-80GB": (0.015, 0.025), "L40S": (0.025, 0.035)}


def facts() -> list[CalibrationRow]:
    rows = []
    h100 = PerfModel("H100-SXM", "llama-2-7b")
    pt = [h100.ttft(1024) / 0.0295 - 1, h100.tpot(1, 1024) / 0.0112 - 1]
    note = "TTFT 29.5 ms (1024-tok prompt), ITL 11.2 ms"
    rows.append(_row("facts-vllm-h100", "H100-SXM", pt, note))
    for gpu, (lo, hi) in _ITL_RANGES.items():
        errs = []
        for model in ("llama-2-7b", "llama-3-8b"):
            itl = PerfModel(gpu, model).tpot(1, 512)
            errs.append(0.0 if lo <= itl <= hi else (itl / lo - 1 if itl < lo else itl / hi - 1))
        note = f"range {lo * 1e3:.0f}-{hi * 1e3:.0f} ms"
        rows.append(_row("facts-itl-batch1", gpu, errs, note))
    return rows


def calibrate(data_dir: Path | None = None) -> list[CalibrationRow]:
    """All calibration rows; data sets whose files are missing are skipped."""
    data = data_dir or default_data_dir()
    rows: list[CalibrationRow] = []
    for fn in (vidur_linear, llmservingsim_forward, blis_serving):
        try:
            rows.extend(fn(data))
        except FileNotFoundError:
            continue
    rows.extend(facts())
    return rows
