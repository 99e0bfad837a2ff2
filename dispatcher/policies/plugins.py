"""The built-in filters, scorers and pickers, each registered by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import (
    CandidateCosts,
    PolicyConfig,
    RouteContext,
    Scorer,
    argmax_seeded_ties,
    lowest_cost_seeded_ties,
    register_filter,
    register_picker,
    register_scorer,
)

PRESSURE_LO, PRESSURE_HI = 0.05, 0.15
"""The default load-pressure band: the share of recent requests late (``ctx.miss_rate``)
at which pressure starts and at which it is full (``near-best`` and the rescue)."""


def pressure_band(config: PolicyConfig) -> tuple[float, float]:
    """``pressure_lo`` and ``pressure_hi`` from a policy's configuration."""
    return (float(config.get("pressure_lo", PRESSURE_LO)),
            float(config.get("pressure_hi", PRESSURE_HI)))


def pressure_share(miss_rate: float, lo: float, hi: float) -> float:
    """How far the fleet is into the load-pressure band: 0 with ``lo`` or fewer of recent
    requests late, 1 with ``hi`` or more, linear between (``near-best`` and the rescue)."""
    if miss_rate <= lo:
        return 0.0
    span = hi - lo
    w = (miss_rate - lo) / span if span > 0.0 else 1.0
    return 1.0 if w > 1.0 else w


# ------------------------------------------------------------------------- filters


@dataclass(slots=True)
class Usable:
    """Alive, heartbeat fresh, not draining."""

    name: str = "usable"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        usable = ctx.est.usable(ctx.now)
        return usable if mask is ctx.est.all_slots() else mask & usable


@dataclass(slots=True)
class ModelMatch:
    """Serves the requested model ('default' matches any)."""

    name: str = "model-match"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if ctx.model in ("default", ""):
            return mask
        models = np.array([i.model for i in ctx.est.infos])
        return mask & ((models == ctx.model) | (models == "default"))


@dataclass(slots=True)
class KvHeadroom:
    """Room in the KV cache for the prompt plus the planned output."""

    limit: float
    name: str = "kv-headroom"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        need = ctx.input_tokens + ctx.planned_tokens
        est = ctx.est
        if est.kv_fits_all(self.limit, need):
            return mask  # room on every instance (a kept bound says so): nothing to remove
        fits = est.hb_kv_used + need <= est.kv_cap(self.limit)
        return np.logical_and(mask, fits, out=fits)


@dataclass(slots=True)
class MeetsDeadline:
    """Estimated finish, with a safety margin, before the deadline.

    Margin: finish * (1 + rel) + abs <= time left. The relative part covers the
    estimator's error; the absolute part covers dispatch and network delays.
    """

    rel: float
    abs_s: float
    err_z: float = 0.0
    name: str = "meets-deadline"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        limit = (ctx.deadline_in - self.abs_s) / (1.0 + self.rel)
        if self.err_z > 0.0:  # margins learned per instance: no shared finish bound
            finish = ctx.finish * np.exp(self.err_z * ctx.est.finish_err())
            ok = finish <= limit
            return np.logical_and(mask, ok, out=ok)
        if limit >= ctx.finish_cap:
            return mask  # every candidate left already finishes by then (near-best)
        ctx.finish_cap = min(ctx.finish_cap, limit)
        if limit < ctx.finish_floor:  # every candidate left finishes later: none meets it
            return np.zeros(mask.shape, dtype=bool)
        meets = ctx.finish <= limit
        return np.logical_and(mask, meets, out=meets)


@dataclass(slots=True)
class CoversTail:
    """Prefer instances that would still make the deadline if the request ran to its P99.

    Planning on the P90 leaves one request in ten running longer than planned; on a
    fast instance the slack absorbs it, on the just-enough one it misses. So among
    the candidates (all of which make it on the plan), keep those that also make it on
    the tail length, with the same margins, where there are any; otherwise leave the
    candidates as they are (the tail is insurance, bought only where it is on offer).
    A confident prediction (P99 no longer than the plan) costs nothing here: the rule
    keeps slack in proportion to the length's uncertainty, not a fixed share of it.
    """

    rel: float
    abs_s: float
    err_z: float = 0.0
    on: bool = True
    name: str = "covers-tail"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if not self.on:
            return mask
        tail = ctx.p99 if ctx.p99 > 0.0 else ctx.p90
        if ctx.max_tokens:
            tail = min(tail, float(ctx.max_tokens))
        if tail <= ctx.planned_tokens or not mask.any():
            return mask
        finish = ctx.est.finish_time(ctx.input_tokens, tail, ctx.cached)
        if self.err_z > 0.0:
            finish = finish * np.exp(self.err_z * ctx.est.finish_err())
        ok = mask & (finish <= (ctx.deadline_in - self.abs_s) / (1.0 + self.rel))
        return ok if ok.any() else mask


@register_filter("covers-tail")
def _tail(config: PolicyConfig) -> CoversTail:
    return CoversTail(
        on=bool(config.get("cover_tail", False)),
        rel=float(config.get("margin_rel", 0.05)),
        abs_s=float(config.get("margin_abs_s", 0.05)),
        err_z=float(config.get("error_z", 0.0)),
    )


@dataclass(slots=True)
class ProtectsResidents:
    """Adding the request does not push the tightest request already there past its deadline.

    The new request makes every decode step slower by the TPOT slope plus the attention
    over its own KV, and stalls the batch for its prefill. Instances whose tightest
    request is already late are not protected (nothing to save there).
    """

    name: str = "protects-residents"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if ctx.finish_cap < ctx.finish_floor:
            return mask  # a finish bound below every candidate's finish left none
        est = ctx.est
        planned = ctx.planned_tokens
        # delay = (d1_tc + own context TPOT) * min(rem_at_min, planned) + prefill, in place
        # (the own context TPOT as est.own_context_tpot has it, without the call)
        z = est.scalar
        z[()] = ctx.input_tokens + 0.5 * planned
        delay = est.k_ctx * z
        delay += est.d1_tc
        z[()] = planned
        delay *= np.minimum(est.rem_at_min, z)
        delay += ctx.prefill
        ok = est.guard_slack >= delay  # (min_slack >= delay) | late, in one operation
        return np.logical_and(mask, ok, out=ok)

    def passes(self, ctx: RouteContext, i: int) -> bool:
        """``__call__`` for candidate i alone: the same operations on its elements."""
        if ctx.finish_cap < ctx.finish_floor:
            return True
        est = ctx.est
        planned = ctx.planned_tokens
        delay = est.k_ctx.item(i) * (ctx.input_tokens + 0.5 * planned)
        delay += est.d1_tc.item(i)
        r = est.rem_at_min.item(i)
        delay *= r if not r >= planned else planned  # np.minimum: the smaller, or nan
        delay += ctx.prefill.item(i)
        return bool(est.guard_slack.item(i) >= delay)


_BOUND_MARGIN = 1e-9
"""A bound decides alone only this far (relative) inside its limit: the vector it stands
for rounds differently (the bound must never pass an instance the vector would not)."""


@dataclass(slots=True)
class SparesDeadlines:
    """The newcomer's prefill must not take more than ``limit`` of the time the requests
    running there have left to their deadlines, summed over them.

    Its prefill stalls every decode step there. ``protects-residents`` guards the tightest
    request against being pushed past its deadline by the estimates; this guards the
    many that are close to theirs, counted in shares of their time left
    (``FleetEstimator.budget_load``), whatever the estimates of their finish say. On the
    Azure code trace the misses were small requests held up by later arrivals' long
    prefills (docs/routing.md). With no instance left the request goes to the rescue,
    which weighs the same stall against the finish. When one bound of the stall over the
    fleet (``FleetEstimator.stall_bound``) is within the limit, every instance passes
    without a vector of the request's own (the same mask).
    """

    limit: float
    name: str = "spares-deadlines"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if self._all_pass(ctx):
            return mask
        ok = ctx.stall * ctx.est.budget_load(ctx.now) <= self.limit
        return np.logical_and(mask, ok, out=ok)

    def passes(self, ctx: RouteContext, i: int) -> bool:
        """``__call__`` for candidate i alone: the same bound first, then its elements."""
        if self._all_pass(ctx):
            return True
        stall = ctx.prefill.item(i) - ctx.est.pbc.item(i)
        return bool(stall * ctx.est.budget_load(ctx.now).item(i) <= self.limit)

    def _all_pass(self, ctx: RouteContext) -> bool:
        """Off, a finish bound already left no candidate, or the one bound of the stall
        over the fleet (``FleetEstimator.stall_bound``) within the limit: most decisions
        stall no instance near it and need no vector of their own."""
        limit = self.limit
        if not math.isfinite(limit) or ctx.finish_cap < ctx.finish_floor:
            return True
        c = ctx.cached
        if isinstance(c, np.ndarray):
            return False
        m = ctx.est._new_tokens(ctx.input_tokens, c)  # as the prefill counts them
        u, v = ctx.est.stall_bound(ctx.now)
        return bool(m * u + m * (2.0 * float(c) + m) * v <= limit - _BOUND_MARGIN * abs(limit))


@dataclass(slots=True)
class WithinReach:
    """Not hopeless: estimated finish within ``factor`` x the time left.

    Requests beyond reach everywhere are rejected early instead of taking capacity
    that requests which can still make it need (``on_infeasible="best-effort"``
    disables this). Judged on an optimistic length, the P10 mirror of the P90 around
    the P50 on a log scale (P50**2 / P90), and only for confident predictions (P90 at
    most ``max_spread`` x P50): an uncertain length must not reject a request that may
    well be short; it is served where it finishes first.
    """

    factor: float
    min_queue_s: float = 0.05
    busy_tpot_ratio: float = 1.1
    """Reject only under load: when every candidate would first queue at least
    ``min_queue_s`` or runs its batch at ``busy_tpot_ratio`` x its idle TPOT or slower.
    The idle TPOT leaves out the request's own KV, so a long prompt's attention counts as
    load: hopeless long-context calls are shed even where the batch is small. Counting
    their KV in the idle TPOT too served them instead and cost agent workflows 13 points
    of attainment (0.756 -> 0.627 at 0.5 workflows/s; 0.936 -> 0.865 with workflow
    deadlines; session 3)."""
    max_spread: float = 1.6
    name: str = "within-reach"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if not math.isfinite(self.factor):
            return mask
        if ctx.p50 > 0.0 and ctx.p90 > self.max_spread * ctx.p50:
            return mask  # too unsure of the length to call it hopeless
        est = ctx.est
        # the queueing and TPOT of ctx.estimates(), without the prefill and finish it makes
        q, d = est.q_cache, est.tpot_with(ctx.input_tokens, ctx.planned_tokens)
        idle_tpot = (est.d0 + est.d1) * est.tpot_corr
        busy = (q > self.min_queue_s) | (d > self.busy_tpot_ratio * idle_tpot)
        # busy >= mask: busy, or not a candidate; one False is a candidate with capacity
        ok = busy >= mask
        if ok.size and not ok[ok.argmin()]:
            return mask  # some instance has spare capacity: no load to shed, serve it
        finish = ctx.finish
        if 0.0 < ctx.p50 < ctx.p90:
            short = max(ctx.p50 * ctx.p50 / ctx.p90, 1.0)
            if short < ctx.planned_tokens:
                finish = est.finish_time(ctx.input_tokens, short, ctx.cached)
        reach = finish <= self.factor * ctx.deadline_in
        return np.logical_and(mask, reach, out=reach)


@register_filter("within-reach")
def _reach(config: PolicyConfig) -> WithinReach:
    best_effort = config.get("on_infeasible") == "best-effort"
    return WithinReach(
        factor=float("inf") if best_effort else float(config.get("hopeless_factor", 1.1)),
        busy_tpot_ratio=float(config.get("busy_tpot_ratio", 1.1)),
        max_spread=float(config.get("reject_max_spread", 1.6)),
    )


@dataclass(slots=True)
class PrefixMatch:
    """Instances with at least ``threshold`` of the prompt cached (vLLM router cache-aware)."""

    threshold: float
    name: str = "prefix-match"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        cached = np.asarray(ctx.cached, dtype=float)
        if cached.ndim == 0:
            return mask & False
        return mask & (cached >= self.threshold * max(ctx.input_tokens, 1))


@dataclass(slots=True)
class SessionSticky:
    """The instance the workflow's previous call went to, while it is usable."""

    name: str = "session-sticky"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        if ctx.sticky is None or ctx.sticky >= len(mask) or not mask[ctx.sticky]:
            return mask & False
        only = np.zeros_like(mask)
        only[ctx.sticky] = True
        return only


@register_filter("prefix-match")
def _prefix(config: PolicyConfig) -> PrefixMatch:
    return PrefixMatch(threshold=float(config.get("prefix_threshold", 0.5)))


@register_filter("session-sticky")
def _sticky(config: PolicyConfig) -> SessionSticky:
    return SessionSticky()


@dataclass(slots=True)
class NearBest:
    """Instances that keep ``keep_slack`` of the slack the best instance would leave.

    Just-enough packs requests onto the slowest instance that still makes the deadline,
    but estimates are most often wrong for slow, busy instances, and wrong in the
    optimistic direction for the one picked. So the pick must keep a share of the spare
    time the earliest-finishing instance would have left (``deadline - finish >=
    keep_slack * (deadline - best finish)``): a loose request may go far down the fleet,
    a tight one stays near the best. ``trust_region`` adds a bound relative to the best
    finish (``finish <= (1 + trust_region) * best``); ``inf`` and ``keep_slack = 0`` pack
    without bound. (Records decided before ``keep_slack`` existed replay with
    ``keep_slack = None``: the trust region alone.)
    """

    trust_region: float
    keep_slack: float | None = None
    max_region: float = math.inf
    by_spread: bool = False
    """Scale both by the length's uncertainty u = 1 - P50 / P99 (0 for an exact
    prediction): keep ``u * keep_slack`` of the slack, trust ``trust_region / u``."""
    pressure_keep: float | None = None
    """Under load pressure (``ctx.miss_rate``, the share of recent requests that missed
    their deadline): the slack kept at full pressure, reached linearly from ``keep_slack``
    as the miss rate goes from ``pressure_lo`` to ``pressure_hi`` (None: off). A fleet that
    misses deadlines lacks capacity, not insurance: every GPU's share is needed."""
    pressure_region: float = math.inf
    """The trust region at full pressure (reached likewise from ``trust_region``). Pressure
    only ever keeps less slack and widens the region, never the other way."""
    pressure_lo: float = PRESSURE_LO
    pressure_hi: float = PRESSURE_HI
    name: str = "near-best"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray:
        f = ctx.finish
        whole = mask is ctx.est.all_slots()  # every instance usable: no masking to do
        cand = f if whole else f.compress(mask)
        if not cand.size:
            return mask
        best = cand.item(cand.argmin())
        if best > ctx.finish_floor:
            ctx.finish_floor = best  # no candidate finishes earlier
        keep, region = self.keep_slack, self.trust_region
        if self.pressure_keep is not None and ctx.miss_rate > self.pressure_lo:
            # a fleet that misses deadlines lacks capacity: keep less slack, pack further
            w = pressure_share(ctx.miss_rate, self.pressure_lo, self.pressure_hi)
            if keep is not None and self.pressure_keep < keep:
                keep += w * (self.pressure_keep - keep)
            if region < self.pressure_region < math.inf:
                region += w * (self.pressure_region - region)
        if self.by_spread:
            tail = ctx.p99 if ctx.p99 > 0.0 else ctx.p90
            u = 1.0 - ctx.p50 / tail if 0.0 < ctx.p50 < tail else 0.0
            keep = None if keep is None else keep * u
            region = min(region / u if u > 0.0 else math.inf, self.max_region)
        # (min and max of two numbers as conditional expressions: what the builtins return)
        bound = math.inf
        left = ctx.deadline_in
        if keep is not None and math.isfinite(left):
            spare = left - best
            bound = left - keep * (0.0 if 0.0 > spare else spare)  # max(spare, 0.0)
        if math.isfinite(region):
            cap = (1.0 + region) * best
            bound = cap if cap < bound else bound  # min(bound, cap)
        if not math.isfinite(bound):
            return mask
        limit = best if best > bound else bound  # max(bound, best)
        if limit < ctx.finish_cap:  # min(finish_cap, limit)
            ctx.finish_cap = limit
        z = ctx.est.scalar
        z[()] = limit
        near = f <= z
        return near if whole else np.logical_and(mask, near, out=near)


@register_filter("near-best")
def _near_best(config: PolicyConfig) -> NearBest:
    keep = config.get("keep_slack")
    # no trust_region: unbounded, unless the config predates keep_slack (then it was 0.5)
    region = config.get("trust_region", math.inf if keep is not None else 0.5)
    pk = config.get("pressure_keep_slack")
    lo, hi = pressure_band(config)
    return NearBest(
        trust_region=math.inf if region is None else float(region),
        keep_slack=None if keep is None else float(keep),
        by_spread=bool(config.get("slack_by_spread", False)),
        max_region=float(config.get("max_trust_region") or math.inf),
        pressure_keep=None if pk is None else float(pk),
        pressure_region=float(config.get("pressure_trust_region") or math.inf),
        pressure_lo=lo,
        pressure_hi=hi,
    )


@register_filter("usable")
def _usable(config: PolicyConfig) -> Usable:
    return Usable()


@register_filter("model-match")
def _model(config: PolicyConfig) -> ModelMatch:
    return ModelMatch()


@register_filter("kv-headroom")
def _kv(config: PolicyConfig) -> KvHeadroom:
    return KvHeadroom(limit=float(config.get("kv_limit", 0.98)))


@register_filter("meets-deadline")
def _meets(config: PolicyConfig) -> MeetsDeadline:
    return MeetsDeadline(
        rel=float(config.get("margin_rel", 0.05)),
        abs_s=float(config.get("margin_abs_s", 0.05)),
        err_z=float(config.get("error_z", 0.0)),
    )


@register_filter("protects-residents")
def _protects(config: PolicyConfig) -> ProtectsResidents:
    return ProtectsResidents()


@register_filter("spares-deadlines")
def _spares(config: PolicyConfig) -> SparesDeadlines:
    limit = config.get("stall_limit")
    return SparesDeadlines(limit=math.inf if limit is None else float(limit))


# ------------------------------------------------------------------------- scorers


@dataclass(slots=True)
class JustEnough:
    """1 for the eligible instance with the least spare slack: keeps fast GPUs for tight work."""

    name: str = "just-enough"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        # the slack (deadline - finish) of the candidates only: the same values, fewer ops
        z = ctx.est.scalar
        z[()] = ctx.deadline_in
        slots = ctx.slots(mask)
        return CandidateCosts(z - ctx.finish[slots], slots)


@dataclass(slots=True)
class EarliestFinish:
    """1 for the instance estimated to finish the request first (load- and speed-aware)."""

    name: str = "earliest-finish"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        return ctx.costs(ctx.finish, mask)


@dataclass(slots=True)
class FinishWithResidents:
    """Earliest finish; under load pressure, plus the delay the request adds to the residents.

    The rescue sends a request no instance can promise where it finishes first. When the
    fleet misses deadlines, that greedy pick piles requests onto the fastest GPU: each
    newcomer there finishes first and slows every request already in the batch, and the
    slower GPUs stay idle (Figure 2 at 30 RPS with no length information: 452 of 600
    requests on the H800, none on the V100 or A40). Under load pressure (``ctx.miss_rate``
    from ``pressure_lo`` to ``pressure_hi``, as in ``near-best``), an instance's cost is
    the request's own finish plus ``weight`` x the delay it adds to the requests there:
    one more sequence in each decode step (the TPOT slope and the attention over its own
    KV) for its planned length, and its prefill's stall, for each of them. At weight 1 the
    pick is the one that adds least to the summed finish times of all requests.

    At any load, the request's prefill stalls the decode steps of every request running
    there, and that stall weighs by how close they are to their deadlines: ``stall_weight``
    x the stall (the prefill's per-token compute; a decode step pays the fixed part
    anyway) x ``budget_load`` (the sum of 1 / time left over those requests): shares of
    their remaining time, scaled by the request's own time left into seconds of its own
    budget. The same stall is nothing to requests with minutes to go and fatal to ones
    with a second, so long prompts keep off instances whose requests are about to finish
    in time. On the Azure code trace (prompts of 1-8k tokens, answers of ~10 tokens)
    that is where the misses were: a small request's decode held up by the prefills of
    later arrivals (docs/routing.md, session 11).

    With no pressure and ``stall_weight`` 0 (as records made before them replay) it is
    earliest-finish.
    """

    weight: float
    stall_weight: float = 0.0
    pressure_lo: float = PRESSURE_LO
    pressure_hi: float = PRESSURE_HI
    name: str = "finish-with-residents"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        f, est = ctx.finish, ctx.est
        w = self.weight * pressure_share(ctx.miss_rate, self.pressure_lo, self.pressure_hi)
        left = ctx.deadline_in
        weigh_stall = self.stall_weight > 0.0 and 0.0 < left < math.inf
        if w <= 0.0 and not weigh_stall:
            return ctx.costs(f, mask)
        cost = f
        if weigh_stall:
            cost = cost + (self.stall_weight * left) * ctx.stall * est.budget_load(ctx.now)
        if w > 0.0:
            planned = ctx.planned_tokens
            per_token = est.own_context_tpot(ctx.input_tokens, planned) + est.d1_tc
            cost = cost + w * (est.active() * (per_token * planned + ctx.prefill))
        return ctx.costs(cost, mask)


@dataclass(slots=True)
class QueueLength:
    """1 for the instance with the fewest requests (running + waiting)."""

    name: str = "queue"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        return ctx.costs(ctx.est.active(), mask)


@dataclass(slots=True)
class KvUtilization:
    """1 for the instance with the emptiest KV cache."""

    name: str = "kv-utilization"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        return ctx.costs(ctx.est.kv_frac(), mask)


@dataclass(slots=True)
class PrefixCache:
    """Share of the prompt likely cached on the instance."""

    name: str = "prefix-cache"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray | None:
        if not isinstance(ctx.cached, np.ndarray):
            return None  # no prefix information for this request
        return np.where(mask, ctx.cached / max(ctx.input_tokens, 1), 0.0)


@dataclass(slots=True)
class GpuSpeed:
    """1 for the fastest GPU (static: ignores load)."""

    name: str = "gpu-speed"

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> CandidateCosts:
        return ctx.costs(-ctx.est.speed, mask)


def _scorer_factory(cls: type[Scorer]) -> Callable[[PolicyConfig], Scorer]:
    def make(config: PolicyConfig) -> Scorer:
        return cls()

    return make


for _cls in (JustEnough, EarliestFinish, QueueLength, KvUtilization, PrefixCache, GpuSpeed):
    register_scorer(_cls().name)(_scorer_factory(_cls))


@register_scorer("finish-with-residents")
def _finish_with_residents(config: PolicyConfig) -> FinishWithResidents:
    lo, hi = pressure_band(config)
    return FinishWithResidents(
        weight=float(config.get("harm_weight", 0.0)),
        stall_weight=float(config.get("stall_weight", 0.0)),
        pressure_lo=lo,
        pressure_hi=hi,
    )


# ------------------------------------------------------------------------- pickers


class MaxScore:
    """The highest score; ties at random."""

    name = "max-score"
    stateful = False

    def pick(self, ctx: RouteContext, scores: np.ndarray, mask: np.ndarray) -> int:
        return argmax_seeded_ties(scores, mask, ctx.seed, ctx.est.scalar)

    def pick_lowest(self, ctx: RouteContext, costs: CandidateCosts, mask: np.ndarray) -> int:
        return lowest_cost_seeded_ties(costs, mask, ctx.seed, ctx.est.scalar)

    def state(self) -> dict[str, int]:
        return {}

    def set_state(self, state: dict[str, int]) -> None:
        pass


class RandomPick:
    """Uniformly at random among the candidates."""

    name = "random"
    stateful = False

    def pick(self, ctx: RouteContext, scores: np.ndarray, mask: np.ndarray) -> int:
        idx = np.flatnonzero(mask)
        return int(idx[ctx.rng.randrange(len(idx))])

    def state(self) -> dict[str, int]:
        return {}

    def set_state(self, state: dict[str, int]) -> None:
        pass


class RoundRobin:
    """The next candidate after the last one chosen."""

    name = "round-robin"
    stateful = True

    def __init__(self) -> None:
        self.cursor = -1

    def pick(self, ctx: RouteContext, scores: np.ndarray, mask: np.ndarray) -> int:
        idx = np.flatnonzero(mask)
        after = idx[idx > self.cursor]
        slot = int(after[0]) if len(after) else int(idx[0])
        self.cursor = slot
        return slot

    def state(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def set_state(self, state: dict[str, int]) -> None:
        self.cursor = int(state.get("cursor", -1))


class PowerOfTwo:
    """Two candidates at random; the better-scoring one."""

    name = "power-of-two"
    stateful = False

    def pick(self, ctx: RouteContext, scores: np.ndarray, mask: np.ndarray) -> int:
        idx = np.flatnonzero(mask)
        if len(idx) == 1:
            return int(idx[0])
        a, b = ctx.rng.sample(range(len(idx)), 2)
        ia, ib = int(idx[a]), int(idx[b])
        if scores[ia] == scores[ib]:
            return ia if ctx.rng.random() < 0.5 else ib
        return ia if scores[ia] > scores[ib] else ib

    def state(self) -> dict[str, int]:
        return {}

    def set_state(self, state: dict[str, int]) -> None:
        pass


register_picker("max-score")(lambda config: MaxScore())
register_picker("random")(lambda config: RandomPick())
register_picker("round-robin")(lambda config: RoundRobin())
register_picker("power-of-two")(lambda config: PowerOfTwo())
