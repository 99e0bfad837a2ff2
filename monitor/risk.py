"""Risk of missing the deadline, for requests already running, and migration planning.

The "rectify" half of GoodServe. Output length is modelled as log-normal through
the predicted P50 and P90; given that a request has produced ``k`` tokens, its
remaining length is the conditional distribution of L - k given L > k. The risk
of a request is P(it needs more tokens than its instance can produce before the
deadline). A request at risk moves when another instance finishes it in time,
migration cost included (recomputing prompt + generated tokens there, or loading
its exported KV), without pushing that instance's own requests past their deadlines.

Pure CPU, no I/O: the live monitor service and the simulator use the same objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator, TrackedRequest

_N = NormalDist()
_Z90 = 1.2815515655446004


def _lognormal(p50: float, p90: float) -> tuple[float, float]:
    mu = math.log(max(p50, 1.0))
    sigma = max((math.log(max(p90, p50 + 1e-9, 1.0)) - mu) / _Z90, 0.05)
    return mu, sigma


def survival(tokens: float, p50: float, p90: float) -> float:
    """P(L > tokens) under the log-normal through (p50, p90)."""
    if tokens <= 0:
        return 1.0
    mu, sigma = _lognormal(p50, p90)
    return 1.0 - _N.cdf((math.log(tokens) - mu) / sigma)


def conditional_remaining(p50: float, p90: float, generated: int, q: float = 0.9) -> float:
    """Quantile q of the remaining length L - k given L > k (k = generated tokens)."""
    mu, sigma = _lognormal(p50, p90)
    f_k = _N.cdf((math.log(generated) - mu) / sigma) if generated > 0 else 0.0
    u = min(f_k + q * (1.0 - f_k), 1.0 - 1e-9)
    return max(math.exp(mu + sigma * _N.inv_cdf(u)) - generated, 1.0)


def miss_risk(p50: float, p90: float, generated: int, tokens_possible: float) -> float:
    """P(the request needs more than ``tokens_possible`` further tokens | L > generated)."""
    if tokens_possible <= 0:
        return 1.0
    s_k = survival(generated, p50, p90)
    if s_k <= 1e-12:
        return 0.0
    return min(survival(generated + tokens_possible, p50, p90) / s_k, 1.0)


@dataclass(slots=True)
class MonitorConfig:
    """Settings of the risk monitor (documented defaults)."""

    period_s: float = 0.5
    """How often risks are re-estimated."""
    risk_threshold: float = 0.5
    """Migrate when P(miss) on the current instance is at least this."""
    quantile: float = 0.9
    """Remaining length planned on for the target (conditional quantile)."""
    hysteresis: float = 0.2
    """The target's risk must be lower than the source's by at least this."""
    max_migrations_per_request: int = 2
    max_migrations_per_s: float = 50.0
    min_remaining_tokens: int = 16
    """Never migrate a request expected to finish within this many tokens."""
    min_remaining_s: float = 0.25
    """... or within this many seconds where it is."""
    overhead_s: float = 0.05
    """Fixed pause of a migration (checkpoint, two Kafka hops, resume)."""
    kv_transfer: bool = False
    """Targets load exported KV instead of recomputing (cost: bytes / bandwidth)."""
    kv_gbps: float = 10.0
    margin_rel: float = 0.3
    """The target must finish with this relative margin: a move costs recomputation, so it
    has to be clearly worth it."""
    require_cause: bool = True
    """Migrate only for the causes migration can fix: the request outran its predicted
    length, or its instance runs slower than estimated (``slowdown_ratio``). Load alone
    is the router's business: moving work between equally loaded instances only adds
    recomputation."""
    slowdown_ratio: float = 2.0
    """An instance counts as slowed when its recent TPOT correction is this many times its
    long-run level (``FleetEstimator.slowdown``). At 1.5, KV-bound A100s running 2k-8k
    contexts crossed it about 5% of the time and the moves cost 1-2 points on agent
    workflows; a GPU dropping to 30% speed crosses 2.0 within about 1.4 s of heartbeats."""
    max_cached_share: float = 0.5
    """Leave a request alone when more than this share of its prompt was a cache hit."""


@dataclass(slots=True)
class MigrationPlan:
    request_id: str
    source: str
    target: str
    risk: float
    target_risk: float
    remaining_tokens: float
    est_finish_source_s: float
    est_finish_target_s: float
    reason: str


@dataclass(slots=True)
class RiskMonitor:
    """Finds requests at risk and the instance that would rescue each."""

    config: MonitorConfig = field(default_factory=MonitorConfig)
    migrations: dict[str, int] = field(default_factory=dict)
    _window_start: float = 0.0
    _window_count: int = 0

    def request_risk(
        self, est: FleetEstimator, tr: TrackedRequest, now: float
    ) -> tuple[float, float]:
        """(risk of missing the deadline where it is, estimated seconds to finish there)."""
        i = tr.slot
        batch = min(max(float(est.active()[i]), 1.0), float(est.batch_limit()[i]))
        tpot = float(est.tpot(batch)[i])
        risk, wait = self._risk(est, tr, now, tpot)
        return risk, self._time_to_finish(tr, wait, tpot)

    @staticmethod
    def _risk(
        est: FleetEstimator, tr: TrackedRequest, now: float, tpot: float
    ) -> tuple[float, float]:
        """(risk, wait before its next token) given the TPOT of its instance at its batch."""
        i = tr.slot
        left = tr.deadline - now
        wait = 0.0
        if not tr.started:
            uncached = max(tr.input_tokens + tr.generated - tr.cached_tokens, 1)
            wait = float(est.queue_s[i]) + float(est.prefill(uncached)[i])
        tokens_possible = (left - wait) / tpot if tpot > 0 else math.inf
        p50 = tr.p50 or tr.planned_tokens
        p90 = tr.p90 or tr.planned_tokens
        return miss_risk(p50, p90, tr.generated, tokens_possible), wait

    def _time_to_finish(self, tr: TrackedRequest, wait: float, tpot: float) -> float:
        """Seconds to finish where it is, on the conditional ``quantile`` of its length."""
        p50 = tr.p50 or tr.planned_tokens
        p90 = tr.p90 or tr.planned_tokens
        rem = conditional_remaining(p50, p90, tr.generated, self.config.quantile)
        return wait + rem * tpot

    def plan(self, est: FleetEstimator, now: float) -> list[MigrationPlan]:
        """Migrations to start now, most at-risk first, within the rate limits."""
        cfg = self.config
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        budget = int(cfg.max_migrations_per_s) - self._window_count
        if budget <= 0 or len(est) < 2:
            return []
        usable = est.usable(now)
        tpot_now = self._tpot_now(est)
        plans: list[MigrationPlan] = []
        extra = np.zeros(len(est))  # requests planned onto each target in this round
        for risk, tr, t_here in self.at_risk(est, now, tpot_now):
            if len(plans) >= budget:
                break
            p50 = tr.p50 or tr.planned_tokens
            p90 = tr.p90 or tr.planned_tokens
            rem = conditional_remaining(p50, p90, tr.generated, cfg.quantile)
            i = tr.slot
            tpot_here = tpot_now.item(i)
            if rem < cfg.min_remaining_tokens or (
                rem * tpot_here < cfg.min_remaining_s and tr.started
            ):
                continue
            plan = self._best_target(est, tr, rem, now, usable, extra)
            if plan is None:
                continue
            target, t_target, target_risk = plan
            if target_risk > risk - cfg.hysteresis:
                continue
            extra[est.index[target]] += 1
            plans.append(
                MigrationPlan(
                    request_id=tr.request_id,
                    source=est.infos[i].instance_id,
                    target=target,
                    risk=risk,
                    target_risk=target_risk,
                    remaining_tokens=rem,
                    est_finish_source_s=t_here,
                    est_finish_target_s=t_target,
                    reason=f"P(miss)={risk:.2f} on {est.infos[i].gpu}; "
                    f"{est.infos[est.index[target]].gpu} finishes in {t_target:.2f}s "
                    f"of {tr.deadline - now:.2f}s left",
                )
            )
        self._window_count += len(plans)
        return plans

    def at_risk(
        self, est: FleetEstimator, now: float, tpot_now: np.ndarray | None = None
    ) -> list[tuple[float, TrackedRequest, float]]:
        """(risk, request, seconds to finish where it is) of the requests that may move,
        most at risk first: not moved too often yet, not late, not held by a cached
        prompt, with a cause migration can fix (``require_cause``), and a risk of at least
        ``risk_threshold``.

        The instances' TPOT at their batch and whether they slowed are taken once a round
        (``tpot_now``: ``_tpot_now``): every request asked for them, and each answer was a
        vector over the fleet (a dispatcher with 20,480 requests on 512 instances spent
        350 ms a round on that, 4-80 ms since). The cheap tests come first; all must pass,
        so their order does not change which requests are at risk.
        """
        cfg = self.config
        if tpot_now is None:
            tpot_now = self._tpot_now(est)
        slowed = est.slowdown() >= cfg.slowdown_ratio if cfg.require_cause else None
        found: list[tuple[float, TrackedRequest, float]] = []
        for tr in est.requests.values():
            if self.migrations.get(tr.request_id, 0) >= cfg.max_migrations_per_request:
                continue
            if tr.deadline - now <= 0:
                continue  # already late: moving it cannot save it
            if tr.cached_tokens > cfg.max_cached_share * tr.input_tokens:
                continue  # its context lives here: moving it throws the cached prefix away
            if slowed is not None:  # a cause migration can fix: it outran its P50, or slowed
                if not (tr.generated > (tr.p50 or tr.planned_tokens) or slowed.item(tr.slot)):
                    continue
            tpot = tpot_now.item(tr.slot)
            risk, wait = self._risk(est, tr, now, tpot)
            if risk < cfg.risk_threshold:
                continue
            found.append((risk, tr, self._time_to_finish(tr, wait, tpot)))
        found.sort(key=lambda x: -x[0])
        return found

    @staticmethod
    def _tpot_now(est: FleetEstimator) -> np.ndarray:
        """Each instance's TPOT at its current batch (``request_risk``'s, for all at once)."""
        return est.tpot(np.minimum(np.maximum(est.active(), 1.0), est.batch_limit()))

    def _best_target(
        self,
        est: FleetEstimator,
        tr: TrackedRequest,
        rem: float,
        now: float,
        usable: np.ndarray,
        extra: np.ndarray,
    ) -> tuple[str, float, float] | None:
        """The just-enough target: least slack among those that finish in time with a margin."""
        cfg = self.config
        context = tr.input_tokens + tr.generated
        batch_after = est.active() + extra + 1.0
        lim = est.batch_limit()
        q = est.queue_delay(batch_after, lim)
        if cfg.kv_transfer:
            kv_bytes = np.array(
                [
                    info.perf.kv_bytes_per_token if info.perf is not None else 0.0
                    for info in est.infos
                ]
            )
            move = kv_bytes * context / (cfg.kv_gbps * 1e9 / 8)
        else:
            move = est.prefill(float(context))
        own = est.own_context_tpot(float(context), rem)
        tpot = est.tpot(np.minimum(batch_after, lim)) + own
        finish = cfg.overhead_s + q + move + tpot * rem
        left = tr.deadline - now
        # protect the target's own requests: one more in the batch (and its KV) slows each token
        delay = (est.d1 * est.tpot_corr + own) * np.minimum(est.rem_at_min, rem) + move
        protects = (est.min_slack - delay >= 0.0) | (est.min_slack < 0.0)
        ok = usable & protects & (finish * (1 + cfg.margin_rel) <= left)
        ok[tr.slot] = False
        if not ok.any():
            return None
        slack = np.where(ok, left - finish, np.inf)
        j = int(np.argmin(slack))
        p50 = tr.p50 or tr.planned_tokens
        p90 = tr.p90 or tr.planned_tokens
        tokens_possible = (left - cfg.overhead_s - float(q[j]) - float(move[j])) / float(tpot[j])
        target_risk = miss_risk(p50, p90, tr.generated, tokens_possible)
        return est.infos[j].instance_id, float(finish[j]), target_risk

    def record(self, plan: MigrationPlan) -> None:
        """Count a migration that was carried out (bounds per request)."""
        self.migrations[plan.request_id] = self.migrations.get(plan.request_id, 0) + 1
