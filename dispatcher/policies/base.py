"""Plugin framework of routing, after llm-d's scheduler: filters, scorers, a picker.

A decision runs the filters (each narrows a boolean mask of candidate instances),
then the weighted scorers (each returns one score in [0, 1] per instance), then the
picker (chooses one instance; ties broken at random by a per-decision seeded RNG).
A policy whose filters leave no candidate hands the decision to its fallback policy.
All vectorized over instances with numpy: pure CPU, no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator

PolicyConfig = dict[str, Any]

# np.place's and np.count_nonzero's kernels without their Python wrappers (a few hundred
# nanoseconds less per call; the same results)
_place: Any = np.place
_count_nonzero: Any = np.count_nonzero
try:
    from numpy._core import multiarray as _multiarray

    _place = getattr(_multiarray, "_place", np.place)
    _count_nonzero = getattr(_multiarray, "count_nonzero", np.count_nonzero)
except ImportError:  # numpy 1.x: the wrappers themselves
    pass


@dataclass(slots=True)
class RouteContext:
    """Everything one decision looks at. Built by the router, read by the plugins."""

    est: FleetEstimator
    now: float
    input_tokens: int
    planned_tokens: float
    deadline_in: float
    """Seconds left until the deadline (may be inf)."""
    model: str
    seed: int
    """Seed of this decision's tie-breaking RNG (recorded for replay)."""
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max_tokens: int = 0
    """Cap on the planned length (0: no cap)."""
    quantile: str = ""
    """Which predicted quantile ``planned_tokens`` is ('' = set by the caller)."""
    workflow_id: str | None = None
    priority: int = 0
    cached: np.ndarray | float = 0.0
    """Prompt tokens likely cached on each instance (prefix index), or 0."""
    sticky: int | None = None
    """Slot this request's workflow last went to (session affinity), if any."""
    config: PolicyConfig = field(default_factory=dict)
    miss_rate: float = 0.0
    """Share of recent requests that missed their deadline (``FleetEstimator.miss_rate``
    when the decision was made; recorded): the load pressure near-best may act on."""
    audit: bool = True
    """Whether the decision's eligible mask and scores are kept for its audit record.
    Without it a policy may check its pick against the last filters of its chain
    (``Filter.passes``, ``Policy.select``) instead of masking the fleet with them."""
    finish_cap: float = math.inf
    """While a policy's filters run: every candidate left finishes by this (``finish``).
    A filter that bounds the finish lowers it; a looser bound after it has nothing to
    remove and returns the mask as it is, without comparing the fleet again."""
    finish_floor: float = -math.inf
    """While a policy's filters run: every candidate left finishes no earlier than this
    (near-best sets it to the best candidate's finish; later filters only remove). A
    finish bound below it leaves no candidate: the filters after it need not compare."""
    _estimates: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    _finish: np.ndarray | None = None
    _prefill: np.ndarray | None = None
    _rng: random.Random | None = None
    _slots: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def rng(self) -> random.Random:
        """The decision's RNG, made on first use (most decisions have no ties)."""
        if self._rng is None:
            self._rng = random.Random(self.seed)
        return self._rng

    @property
    def n(self) -> int:
        return len(self.est)

    def set_plan(self, quantile: str) -> None:
        """Plan on another quantile of the predicted length (p50 | p90 | p99)."""
        if not quantile or quantile == self.quantile:
            return
        if quantile == "p50":
            planned = self.p50
        elif quantile == "p90":
            planned = self.p90
        elif quantile == "p99":
            planned = self.p99 or self.p90
        else:
            raise KeyError(quantile)
        if self.max_tokens:
            cap = float(self.max_tokens)
            planned = cap if cap < planned else planned  # min(planned, cap)
        self.planned_tokens = 1.0 if 1.0 > planned else planned  # max(planned, 1.0)
        self.quantile = quantile
        self._estimates = self._finish = None
        self.finish_cap = math.inf
        self.finish_floor = -math.inf

    def estimates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(queue, prefill, tpot, finish) per instance, computed once per decision."""
        if self._estimates is None:
            self._estimates = self.est.estimate(self.input_tokens, self.planned_tokens, self.cached)
            self._finish = self._estimates[3]
        return self._estimates

    @property
    def finish(self) -> np.ndarray:
        """Estimated finish on every instance (the one vector most plugins need: computed
        alone, without the other estimates)."""
        if self._finish is None:
            self._finish = self.est.finish_time(self.input_tokens, self.planned_tokens, self.cached)
        return self._finish

    @property
    def prefill(self) -> np.ndarray:
        """Prefill time of the prompt (after its cached prefix) on every instance; it does
        not depend on the planned length."""
        if self._prefill is None:
            est, c = self.est, self.cached
            if isinstance(c, np.ndarray):
                self._prefill = est.prefill(est._new_tokens(self.input_tokens, c), c)
            else:  # _new_tokens of one cached length: max(input_tokens - c, 1.0)
                m = self.input_tokens - float(c)
                self._prefill = est.prefill(1.0 if 1.0 > m else m, c)
        return self._prefill

    @property
    def stall(self) -> np.ndarray:
        """How long the prompt's prefill holds up the decode steps of the requests running on
        each instance: its per-token compute (a decode step pays the fixed part anyway)."""
        return self.prefill - self.est.pbc

    @property
    def slack(self) -> np.ndarray:
        return self.deadline_in - self.finish

    def slots(self, mask: np.ndarray) -> np.ndarray:
        """The candidates' slots, in order (``mask.nonzero()[0]``), kept for the last mask
        asked about: the scorers and the picker of a decision look at the same one."""
        kept = self._slots
        if kept is None or kept[0] is not mask:
            kept = self._slots = (mask, mask.nonzero()[0])
        return kept[1]

    def costs(self, values: np.ndarray, mask: np.ndarray) -> CandidateCosts:
        """``values`` of the candidates of ``mask`` (low is good), for a scorer to return."""
        slots = self.slots(mask)
        return CandidateCosts(values[slots], slots)


class Filter(Protocol):
    name: str

    def __call__(self, ctx: RouteContext, mask: np.ndarray) -> np.ndarray: ...

    # A filter may also have ``passes(ctx, i) -> bool``: whether slot i, a candidate of
    # the mask it would be given, stays in the mask it returns (the same comparison in
    # the same floating-point operations, with the same calls on the estimator). The
    # filters at the end of a chain that have it can check a pick instead of masking
    # every instance (``Policy.select``).


@dataclass(slots=True)
class CandidateCosts:
    """A scorer's costs of the candidates alone (``values[slots]``; low is good), with the
    candidates' slots (``RouteContext.costs`` makes both): what ``normalize_candidates``
    maps to [0, 1] scores, left for the policy to map.

    Where one scorer alone has something to say on a request, the max-score pick is its
    lowest cost (normalizing is an affine map that keeps the order): the picker picks
    from the costs (``lowest_cost_seeded_ties``) and the score vector is made only when
    something reads it (``DeferredScores``, the audit record). A candidate's cost must not
    depend on which other instances are candidates: a policy may score a wider mask and
    check its pick against the filters it left out (``Policy.select``).
    """

    cand: np.ndarray
    slots: np.ndarray


@dataclass(slots=True)
class DeferredScores:
    """A decision's scores kept as one scorer's candidate costs and weight; ``vector()``
    makes the [0, 1] scores (``weight x normalize_candidates``) on first use."""

    costs: CandidateCosts
    mask: np.ndarray
    weight: float
    _vector: np.ndarray | None = None

    def vector(self) -> np.ndarray:
        if self._vector is None:
            s = normalize_candidates(self.costs.cand, self.mask)
            self._vector = s if self.weight == 1.0 else self.weight * s
        return self._vector


def score_vector(scores: np.ndarray | DeferredScores) -> np.ndarray:
    """The score per instance of what ``Policy.select`` returns."""
    return scores if isinstance(scores, np.ndarray) else scores.vector()


class Scorer(Protocol):
    """Scores in [0, 1] per instance, exactly 0 outside the mask; or the candidates' costs
    (``CandidateCosts``: the policy normalizes them, or picks from them directly where
    they alone speak); or None when it has nothing to say on this request (the same as
    all zeros, without the vector). The zeros let the picker skip masking the sum when
    the best score is positive (``argmax_seeded_ties``)."""

    name: str

    def __call__(
        self, ctx: RouteContext, mask: np.ndarray
    ) -> np.ndarray | CandidateCosts | None: ...


class Picker(Protocol):
    name: str
    stateful: bool
    """Whether ``state()`` can be other than empty (the router records it per decision)."""

    def pick(self, ctx: RouteContext, scores: np.ndarray, mask: np.ndarray) -> int: ...

    # A picker may also have ``pick_lowest(ctx, costs, mask) -> int``: its pick on the
    # normalized scores of one scorer's ``CandidateCosts``, made from the costs themselves
    # (``MaxScore``).

    def state(self) -> dict[str, int]: ...

    def set_state(self, state: dict[str, int]) -> None: ...


_FILTERS: dict[str, Callable[[PolicyConfig], Filter]] = {}
_SCORERS: dict[str, Callable[[PolicyConfig], Scorer]] = {}
_PICKERS: dict[str, Callable[[PolicyConfig], Picker]] = {}


def register_filter(name: str) -> Callable[[Callable[[PolicyConfig], Filter]], Any]:
    def deco(factory: Callable[[PolicyConfig], Filter]) -> Any:
        _FILTERS[name] = factory
        return factory

    return deco


def register_scorer(name: str) -> Callable[[Callable[[PolicyConfig], Scorer]], Any]:
    def deco(factory: Callable[[PolicyConfig], Scorer]) -> Any:
        _SCORERS[name] = factory
        return factory

    return deco


def register_picker(name: str) -> Callable[[Callable[[PolicyConfig], Picker]], Any]:
    def deco(factory: Callable[[PolicyConfig], Picker]) -> Any:
        _PICKERS[name] = factory
        return factory

    return deco


def make_filter(name: str, config: PolicyConfig) -> Filter:
    return _FILTERS[name](config)


def make_scorer(name: str, config: PolicyConfig) -> Scorer:
    return _SCORERS[name](config)


def make_picker(name: str, config: PolicyConfig) -> Picker:
    return _PICKERS[name](config)


def none_left(mask: np.ndarray) -> bool:
    """Whether a mask is empty (an arg-reduction: a fifth of ``not mask.any()``'s cost)."""
    return mask.size == 0 or not mask[mask.argmax()]


def normalize_candidates(
    cand: np.ndarray, mask: np.ndarray, scalar: np.ndarray | None = None
) -> np.ndarray:
    """Map the candidates' values (``values[mask]``, low is good) to [0, 1] scores over
    every instance, 1 for the lowest (llm-d's scorer range), 0 outside the mask.
    ``scalar``: a 0-d scratch array to pass the numbers in (``FleetEstimator.scalar``)."""
    if cand.size == 0:
        return np.zeros(mask.shape)
    # arg-reductions cost a fifth of min()/max() on a few hundred values; same values
    lo, hi = cand.item(cand.argmin()), cand.item(cand.argmax())
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return mask.astype(float)
    if scalar is None:
        vals = hi - cand
        vals /= span  # (hi - cand) / span, in the new array
    else:
        scalar[()] = hi
        vals = scalar - cand
        scalar[()] = span
        vals /= scalar
    out = np.zeros(mask.shape)
    _place(out, mask, vals)  # only the candidates' values: fewer, cheaper ops
    return out


def argmax_random_ties(scores: np.ndarray, mask: np.ndarray, rng: random.Random) -> int:
    """Index of the best-scoring candidate; equal best scores are broken at random."""
    s = np.where(mask, scores, -np.inf)
    best = s.max()
    ties = np.flatnonzero(s >= best - 1e-12)
    if len(ties) == 1:
        return int(ties[0])
    return int(ties[rng.randrange(len(ties))])


def argmax_seeded_ties(
    scores: np.ndarray, mask: np.ndarray, seed: int, scalar: np.ndarray | None = None
) -> int:
    """Like argmax_random_ties, the tie drawn from the decision's hashed seed (no RNG object).

    Scorers give 0 outside the mask, so when the best score overall is a candidate's and
    positive, no other instance comes within the tie tolerance of it: the scores need no
    masking (the same pick, one vector operation fewer). ``scalar``: as in
    ``normalize_candidates``.
    """
    s = scores
    best = int(s.argmax())
    if not (mask.item(best) and s.item(best) > 1e-12):
        s = np.where(mask, scores, -np.inf)
        best = int(s.argmax())
    if scalar is None:
        near = s >= s.item(best) - 1e-12
    else:
        scalar[()] = s.item(best) - 1e-12
        near = s >= scalar
    if _count_nonzero(near) == 1:
        return best  # the usual case: one best, no tie list to build
    ties = near.nonzero()[0]
    return int(ties[seed % len(ties)])


def lowest_cost_seeded_ties(
    costs: CandidateCosts, mask: np.ndarray, seed: int, scalar: np.ndarray | None = None
) -> int:
    """``argmax_seeded_ties`` of ``normalize_candidates(costs.cand, mask)``, from the
    candidates' costs alone: no score vector.

    Normalizing maps the lowest cost to a score of 1 and cost c to (hi - c) / span, so the
    scores within 1e-12 of the best are the costs within 1e-12 x span of the lowest (the
    same rule in exact arithmetic, compared before the division instead of after it;
    rounding can tell them apart only for a cost within about 1e-16 x span of that
    bound); a span that is zero or not finite scores every candidate 1, all tied. Ties
    are drawn from the same ordered list of slots with the same seed. ``scalar``: as in
    ``normalize_candidates``.
    """
    cand, slots = costs.cand, costs.slots
    if cand.size == 0:
        return argmax_seeded_ties(normalize_candidates(cand, mask), mask, seed)
    j = int(cand.argmin())
    lo, hi = cand.item(j), cand.item(cand.argmax())
    span = hi - lo
    if not math.isfinite(span) or span <= 0:  # every candidate scores 1
        return int(slots[0]) if slots.size == 1 else int(slots[seed % slots.size])
    thr = lo + 1e-12 * span
    if scalar is None:
        near = cand <= thr
    else:
        scalar[()] = thr
        near = cand <= scalar
    if _count_nonzero(near) == 1:
        return int(slots[j])  # the usual case: one lowest cost
    ties = near.nonzero()[0]
    return int(slots[ties[seed % len(ties)]])


CHECKED_TRIES = 4
"""How many of the lowest-cost candidates ``Policy._checked_pick`` checks before it lets
the chain's last filters mask the fleet (the fourth-lowest is still cheaper to check)."""


@dataclass(slots=True)
class PolicySpec:
    """A named policy: plugins by name, weights and settings (what the audit log records)."""

    name: str
    filters: list[str]
    scorers: list[tuple[str, float]]
    picker: str
    fallback: str | None = None
    config: PolicyConfig = field(default_factory=dict)
    migrate: bool = False
    """Whether the risk monitor may migrate requests placed by this policy."""
    version: str = "1"


class Policy:
    """An instantiated PolicySpec: run filters, scorers and the picker on a context."""

    def __init__(self, spec: PolicySpec, *, fallback: Policy | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = f"{spec.name}/{spec.version}"
        self.config = dict(spec.config)
        self.filters = [make_filter(f, self.config) for f in spec.filters]
        self.scorers = [(make_scorer(s, self.config), w) for s, w in spec.scorers]
        self.picker = make_picker(spec.picker, self.config)
        self.fallback = fallback
        self.migrate = spec.migrate
        self._how = f"{self.name}: {spec.picker}"
        self._stateful: bool = bool(getattr(self.picker, "stateful", True)) or (
            fallback is not None and fallback._stateful
        )
        self._pick_lowest: Callable[[RouteContext, CandidateCosts, np.ndarray], int] | None = (
            getattr(self.picker, "pick_lowest", None)
        )
        # the filters at the end of the chain that can check one slot (``Filter.passes``)
        k = len(self.filters)
        while k > 0 and callable(getattr(self.filters[k - 1], "passes", None)):
            k -= 1
        self._head = self.filters[:k]
        self._checks: list[Any] = self.filters[k:] if self._pick_lowest is not None else []

    def select(
        self, ctx: RouteContext
    ) -> tuple[int | None, np.ndarray | None, np.ndarray | DeferredScores | None, str]:
        """Choose an instance: (slot or None, eligible mask, scores, how it was chosen).

        The scores are a vector, or ``DeferredScores`` where one scorer's candidate costs
        alone decided (``score_vector`` reads either). Mask and scores are None where the
        decision is not audited (``ctx.audit`` False) and its pick was checked against
        the last filters instead of masking with them (``_checked_pick``)."""
        ctx.config = self.config
        ctx.set_plan(str(self.config.get("plan_quantile", "")))
        mask = ctx.est.all_slots()
        # Filters take an empty mask in their stride (an empty mask stays empty), so the
        # chain is checked once at its end; only then is the filter that emptied it named.
        masks = []
        ctx.finish_cap, ctx.finish_floor = math.inf, -math.inf
        check = not ctx.audit and self._checks
        for f in self._head if check else self.filters:
            mask = f(ctx, mask)
            masks.append(mask)
        if check:
            if not none_left(mask):
                slot = self._checked_pick(ctx, mask)
                if slot is not None:
                    ctx.finish_cap, ctx.finish_floor = math.inf, -math.inf
                    return slot, None, None, self._how
            for f in self._checks:  # undecided: the whole chain, as an audited decision
                mask = f(ctx, mask)
                masks.append(mask)
        # they describe this chain's masks only
        ctx.finish_cap, ctx.finish_floor = math.inf, -math.inf
        if none_left(mask):
            emptied, prev = "no instance", None
            for f, m in zip(self.filters, masks, strict=True):
                # a filter that handed its mask on as it was emptied nothing: not compared
                if m is not prev and none_left(m):
                    emptied = f.name
                    break
                prev = m
            if self.fallback is not None:
                slot, fmask, fscores, how = self.fallback.select(ctx)
                return slot, fmask, fscores, f"{self.name}: {emptied} left none; {how}"
            return None, mask, np.zeros(ctx.n), f"{self.name}: rejected, {emptied} left none"
        said = self._speak(ctx, mask)
        if self._pick_lowest is not None and (lone := self._lone_costs(said)) is not None:
            # one scorer spoke: the best score is its lowest cost, whatever the weight
            slot = self._pick_lowest(ctx, lone, mask)
            return slot, mask, DeferredScores(lone, mask, said[0][1]), self._how
        scores: np.ndarray | None = None
        for said_s, w in said:
            s = (
                normalize_candidates(said_s.cand, mask, ctx.est.scalar)
                if isinstance(said_s, CandidateCosts)
                else said_s
            )
            part = s if w == 1.0 else w * s
            scores = part if scores is None else scores + part
        if scores is None:
            scores = np.zeros(ctx.n)
        slot = self.picker.pick(ctx, scores, mask)
        return slot, mask, scores, self._how

    def _speak(
        self, ctx: RouteContext, mask: np.ndarray
    ) -> list[tuple[np.ndarray | CandidateCosts, float]]:
        """What the scorers say on ``mask``, with their weights (those saying None left out)."""
        said = []
        for scorer, w in self.scorers:
            s = scorer(ctx, mask)
            if s is not None:
                said.append((s, w))
        return said

    @staticmethod
    def _lone_costs(said: list[tuple[np.ndarray | CandidateCosts, float]]) -> CandidateCosts | None:
        """The costs of the one scorer that spoke, where they alone decide the max-score
        pick (a positive weight); else None."""
        if len(said) == 1:
            s, w = said[0]
            if type(s) is CandidateCosts and w > 0.0:
                return s
        return None

    def _checked_pick(self, ctx: RouteContext, mask: np.ndarray) -> int | None:
        """The pick of the whole chain, made before its last filters (``self._checks``) have
        masked the fleet: None where it cannot be told that way (the chain then runs).

        Where one scorer alone speaks, the pick is the candidate with the lowest cost
        (``lowest_cost_seeded_ties``), and the last filters only remove candidates. So the
        lowest-cost candidate of the wider mask is checked slot by slot
        (``Filter.passes``); if it fails, the next lowest, up to ``CHECKED_TRIES``. A
        candidate can win only alone: the tie window of the wider mask (its span is at
        least the final one's) must hold it and no other, and a span that is zero or not
        finite (every candidate scores 1) is left to the chain. Most decisions of a loaded
        fleet pick the first (``docs/routing.md``).
        """
        costs = self._lone_costs(self._speak(ctx, mask))
        if costs is None:
            return None  # none or several scorers speak: the score vector decides
        cand, slots = costs.cand, costs.slots
        if cand.size == 0:
            return None
        j = int(cand.argmin())
        lo, hi = cand.item(j), cand.item(cand.argmax())
        span = hi - lo
        if not math.isfinite(span) or span <= 0:
            return None
        z = ctx.est.scalar
        for tried in range(CHECKED_TRIES):
            z[()] = lo + 1e-12 * (hi - lo)  # at least the final chain's tie bound
            if _count_nonzero(cand <= z) != 1:
                return None  # a tie (or none left): drawn among the final candidates
            i: int = slots.item(j)
            for f in self._checks:
                if not f.passes(ctx, i):
                    break
            else:
                return i
            if not tried:
                cand = cand.copy()
            cand[j] = math.inf  # removed by a check
            j = int(cand.argmin())
            lo = cand.item(j)
        return None

    def state(self) -> dict[str, int]:
        if not self._stateful:
            return {}  # no picker down the fallback chain keeps state
        st = self.picker.state()
        if self.fallback is not None:
            st.update({f"fallback.{k}": v for k, v in self.fallback.state().items()})
        return st

    def set_state(self, state: dict[str, int]) -> None:
        self.picker.set_state({k: v for k, v in state.items() if not k.startswith("fallback.")})
        if self.fallback is not None:
            self.fallback.set_state(
                {k[len("fallback.") :]: v for k, v in state.items() if k.startswith("fallback.")}
            )
