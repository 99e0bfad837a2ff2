"""Synthetic traces: open-loop request streams and agentic multi-step workflows.

Why synthetic: public traces (Azure 2023) carry no task labels, no deadlines and no
workflows; the experiments need all three, reproducibly (every draw comes from one
``numpy`` generator seeded by ``seed``).

Per-task length profiles (:data:`TASK_PROFILES`) are clipped lognormals given by their
median and log-space sigma. They are illustrative, chosen to match the *shape* of public
workloads (ShareGPT-like chat; Azure-code-like long contexts; GSM8K-style math with
chain-of-thought outputs; Spider/BIRD-style text-to-SQL with schema-heavy prompts and
short queries; function calling with long tool specs and short JSON calls; coding-agent
steps with large contexts), not fitted to any one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from goodserve.errors import InvalidInput
from goodserve.sim.trace import TraceRow

__all__ = ["TASK_PROFILES", "LengthDist", "TaskProfile", "synthesize", "synthesize_workflows"]

Arrival = Literal["poisson", "gamma", "uniform"]
TokenSpec = int | tuple[int, int] | None


@dataclass(frozen=True)
class LengthDist:
    """Clipped lognormal: exp(N(log(median), sigma)), rounded, clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        x = rng.lognormal(np.log(self.median), self.sigma, size)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True)
class TaskProfile:
    """Input and output length distributions of one task type."""

    input: LengthDist
    output: LengthDist


TASK_PROFILES: dict[str, TaskProfile] = {
    "chat": TaskProfile(LengthDist(400, 1.0, 8, 8192), LengthDist(200, 0.9, 4, 2048)),
    "code": TaskProfile(LengthDist(1500, 0.9, 32, 16384), LengthDist(150, 1.1, 4, 2048)),
    "math": TaskProfile(LengthDist(150, 0.6, 16, 2048), LengthDist(350, 0.6, 32, 2048)),
    "sql": TaskProfile(LengthDist(800, 0.5, 64, 8192), LengthDist(60, 0.5, 8, 512)),
    "tool": TaskProfile(LengthDist(1200, 0.6, 64, 8192), LengthDist(40, 0.7, 4, 512)),
    "agent": TaskProfile(LengthDist(3000, 0.7, 256, 16384), LengthDist(250, 0.9, 8, 2048)),
}


def _profile(task: str) -> TaskProfile:
    try:
        return TASK_PROFILES[task]
    except KeyError:
        raise InvalidInput(
            f"no length profile for task {task!r} (known: {', '.join(TASK_PROFILES)}); "
            "give both input_tokens and output_tokens to synthesize other tasks"
        ) from None


def _interarrivals(
    rng: np.random.Generator, size: int, rps: float, arrival: Arrival, cv: float
) -> np.ndarray:
    if arrival == "poisson":
        return rng.exponential(1.0 / rps, size)
    if arrival == "gamma":
        if cv <= 0:
            raise InvalidInput(f"cv must be > 0 for gamma arrivals, got {cv}")
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, 1.0 / (rps * shape), size)
    if arrival == "uniform":
        return np.full(size, 1.0 / rps)
    raise InvalidInput(f"unknown arrival process {arrival!r} (poisson, gamma, uniform)")


def _arrivals(
    rng: np.random.Generator,
    n: int | None,
    duration_s: float | None,
    rps: float,
    arrival: Arrival,
    cv: float,
) -> np.ndarray:
    """Arrival times starting at 0: the first request arrives at t=0."""
    if rps <= 0:
        raise InvalidInput(f"rps must be > 0, got {rps}")
    if n is None and duration_s is None:
        raise InvalidInput("give n (request count) or duration_s")
    if n is not None and n < 0:
        raise InvalidInput(f"n must be >= 0, got {n}")
    if duration_s is not None and duration_s <= 0:
        raise InvalidInput(f"duration_s must be > 0, got {duration_s}")
    if n is not None:
        gaps = _interarrivals(rng, max(n - 1, 0), rps, arrival, cv)
        t = np.concatenate([[0.0], np.cumsum(gaps)])[:n]
    else:
        assert duration_s is not None
        chunks = [np.zeros(1)]
        total = 0.0
        while total < duration_s:
            gaps = _interarrivals(rng, max(16, int(rps * duration_s * 1.2)), rps, arrival, cv)
            chunks.append(gaps)
            total += float(gaps.sum())
        t = np.cumsum(np.concatenate(chunks))
    if duration_s is not None:
        t = t[t < duration_s]
    return t


def _tokens(
    rng: np.random.Generator, spec: TokenSpec, dist: LengthDist | None, size: int, name: str
) -> np.ndarray:
    if spec is None:
        assert dist is not None
        return dist.sample(rng, size)
    if isinstance(spec, int):
        if spec < 1:
            raise InvalidInput(f"{name} must be >= 1, got {spec}")
        return np.full(size, spec, dtype=np.int64)
    lo, hi = spec
    if lo < 1 or hi < lo:
        raise InvalidInput(f"{name} range must satisfy 1 <= lo <= hi, got {spec}")
    return rng.integers(lo, hi, size, endpoint=True)


def _normalize_mix(mix: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    if not mix:
        return ["chat"], np.ones(1)
    tasks = list(mix)
    w = np.asarray([mix[t] for t in tasks], dtype=float)
    if (w < 0).any() or w.sum() <= 0:
        raise InvalidInput(f"mix shares must be >= 0 and not all zero, got {mix}")
    return tasks, w / w.sum()


def synthesize(
    *,
    n: int | None = None,
    duration_s: float | None = None,
    rps: float,
    arrival: Arrival = "poisson",
    cv: float = 1.0,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    input_tokens: TokenSpec = None,
    output_tokens: TokenSpec = None,
    slo_s: float | None = None,
) -> list[TraceRow]:
    """An open-loop trace at ``rps`` requests/s.

    ``n`` requests, or all arrivals before ``duration_s`` (both: whichever ends first).
    ``arrival``: ``poisson`` (exponential gaps), ``gamma`` (gaps with coefficient of
    variation ``cv``; cv>1 is burstier), ``uniform`` (evenly spaced, 1/rps apart).
    ``mix`` maps task -> share (default all ``chat``); each task draws lengths from
    :data:`TASK_PROFILES` unless ``input_tokens``/``output_tokens`` override them with a
    fixed value or an inclusive uniform range (Figure 2: input 100, output (100, 500)).
    """
    rng = np.random.default_rng(seed)
    t = _arrivals(rng, n, duration_s, rps, arrival, cv)
    size = len(t)
    tasks, shares = _normalize_mix(mix)
    task_idx = rng.choice(len(tasks), size=size, p=shares)
    inp = np.zeros(size, dtype=np.int64)
    out = np.zeros(size, dtype=np.int64)
    for k, task in enumerate(tasks):
        sel = np.flatnonzero(task_idx == k)
        prof = None if (input_tokens is not None and output_tokens is not None) else _profile(task)
        inp[sel] = _tokens(
            rng, input_tokens, prof.input if prof else None, len(sel), "input_tokens"
        )
        out[sel] = _tokens(
            rng, output_tokens, prof.output if prof else None, len(sel), "output_tokens"
        )
    if slo_s is not None and slo_s <= 0:
        raise InvalidInput(f"slo_s must be > 0, got {slo_s}")
    return [
        TraceRow(
            arrival_s=round(float(t[i]), 6),
            input_tokens=int(inp[i]),
            output_tokens=int(out[i]),
            slo_s=slo_s,
            task=tasks[task_idx[i]],
            request_id=f"req-{i:06d}",
        )
        for i in range(size)
    ]


def _range(name: str, r: tuple[float, float], *, lo_min: float) -> tuple[float, float]:
    a, b = r
    if a < lo_min or b < a:
        raise InvalidInput(f"{name} must be a range lo:hi with {lo_min} <= lo <= hi, got {r}")
    return a, b


def synthesize_workflows(
    *,
    workflows: int,
    rps: float,
    steps: tuple[int, int] = (3, 12),
    initial_context: tuple[int, int] = (1000, 6000),
    growth_per_step: tuple[int, int] = (100, 600),
    output_tokens: tuple[int, int] | None = None,
    think_s: tuple[float, float] = (0.5, 3.0),
    task: str = "agent",
    seed: int = 0,
    slo_per_step_s: float | None = None,
    workflow_slo_s: float | None = None,
    arrival: Arrival = "poisson",
    open_loop_tpot_s: float = 0.025,
) -> list[TraceRow]:
    """Agentic workflows: ``workflows`` sessions starting at ``rps`` per second.

    Each workflow has a step count uniform in ``steps`` (inclusive). Step 0's prompt has
    ``initial_context`` tokens; step k's prompt is step k-1's prompt + its output + new
    ``growth_per_step`` tokens, so ``prefix_tokens(k) = input(k-1) + output(k-1)``.
    Outputs are uniform in ``output_tokens`` or, when None, drawn from ``task``'s profile.
    ``think_s`` (uniform) is the delay after step k-1 finishes before step k is released
    (closed-loop replay). ``arrival_s`` of step 0 is the workflow start; later steps carry an
    open-loop estimate ``arrival(k-1) + output(k-1) * open_loop_tpot_s + think_s(k)``, used
    only by open-loop replay. ``slo_per_step_s`` sets every row's ``slo_s``;
    ``workflow_slo_s`` sets ``workflow_deadline_s`` (seconds from the workflow's start).
    Rows are sorted by ``arrival_s``; within a workflow, steps stay in order.
    """
    if workflows < 0:
        raise InvalidInput(f"workflows must be >= 0, got {workflows}")
    s_lo, s_hi = (int(x) for x in _range("steps", steps, lo_min=1))
    c_lo, c_hi = (int(x) for x in _range("initial_context", initial_context, lo_min=1))
    g_lo, g_hi = (int(x) for x in _range("growth_per_step", growth_per_step, lo_min=0))
    th_lo, th_hi = _range("think_s", think_s, lo_min=0.0)
    if output_tokens is not None:
        _range("output_tokens", output_tokens, lo_min=1)
    prof = None if output_tokens is not None else _profile(task).output
    for name, v in (("slo_per_step_s", slo_per_step_s), ("workflow_slo_s", workflow_slo_s)):
        if v is not None and v <= 0:
            raise InvalidInput(f"{name} must be > 0, got {v}")
    rng = np.random.default_rng(seed)
    starts = _arrivals(rng, workflows, None, rps, arrival, 1.0) if workflows else np.zeros(0)
    width = max(4, len(str(max(workflows - 1, 0))))
    rows: list[TraceRow] = []
    for w in range(workflows):
        k_steps = int(rng.integers(s_lo, s_hi, endpoint=True))
        outs = _tokens(rng, output_tokens, prof, k_steps, "output_tokens")
        growth = rng.integers(g_lo, g_hi, k_steps, endpoint=True)
        thinks = rng.uniform(th_lo, th_hi, k_steps)
        wf_id = f"wf-{w:0{width}d}"
        inp = int(rng.integers(c_lo, c_hi, endpoint=True))
        t = float(starts[w])
        prefix = 0
        think = 0.0
        for k in range(k_steps):
            if k > 0:
                prev_in, prev_out = rows[-1].input_tokens, rows[-1].output_tokens
                prefix = prev_in + prev_out
                inp = prefix + int(growth[k])
                think = round(float(thinks[k]), 3)
                t = t + prev_out * open_loop_tpot_s + think
            rows.append(
                TraceRow(
                    arrival_s=round(t, 6),
                    input_tokens=inp,
                    output_tokens=int(outs[k]),
                    slo_s=slo_per_step_s,
                    task=task,
                    workflow_id=wf_id,
                    step=k,
                    request_id=f"{wf_id}-s{k:02d}",
                    think_s=think,
                    prefix_tokens=prefix,
                    workflow_deadline_s=workflow_slo_s,
                )
            )
    rows.sort(key=lambda r: r.arrival_s)  # stable: a workflow's steps keep their order
    return rows
