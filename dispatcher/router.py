"""The router: predict the output length, estimate every instance, let the policy pick.

Synchronous and free of I/O, like vLLM's scheduler: the live dispatcher service and
the discrete-event simulator call the very same ``Router.route``. Each decision is
reproducible from its audit record (``Decision``): inputs, the estimator state it
saw, the policy with its settings and picker state, and the seed of its tie-breaking
RNG. ``replay`` recomputes a decision from such a record.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.base import DeferredScores, Policy, RouteContext, score_vector
from goodserve.dispatcher.policies.registry import LEGACY_OFF, make_policy
from goodserve.dispatcher.predictor.model import PredictorInput
from goodserve.dispatcher.prefix_index import PrefixIndex
from goodserve.dispatcher.workflows import WorkflowTracker
from goodserve.schemas import AgentRequest, Candidate, Decision

from goodserve.errors import ConfigError, InvalidRequest

DEFAULT_SLO_S = 30.0
CHARS_PER_TOKEN = 4
SURE_SPREAD = 1.2
"""A request placed where its estimated finish is late counts as a miss at once
(``FleetEstimator.count_miss``) when its length is this sure (P90 <= SURE_SPREAD x P50);
else a miss is counted when it happens."""


class Prediction(Protocol):
    p50: float
    p90: float


class LengthPredictor(Protocol):
    """What the router needs of an output-length predictor."""

    version: str

    def features(self, x: Any) -> list[float]: ...

    def predict(self, x: Any) -> Any: ...


class Predicted(NamedTuple):
    """A request's predictor input, its recorded features and its predicted length
    (a named tuple: made for every request of a poll, at a third of a frozen dataclass's
    cost)."""

    x: Any
    features: list[float]
    p50: float
    p90: float
    p99: float = 0.0
    p50_shift: float = 0.0
    """The predictor's online location shift in these predictions (recorded)."""


def input_tokens_of(req: AgentRequest) -> int:
    """Prompt length in tokens: given, else token ids, else ceil(chars / 4)."""
    if req.input_tokens is not None:
        return req.input_tokens
    if req.prompt_token_ids is not None:
        return len(req.prompt_token_ids)
    if req.prompt is not None:
        return max(1, math.ceil(len(req.prompt) / CHARS_PER_TOKEN))
    return 1


def deadline_of(req: AgentRequest, now: float, default_slo_s: float = DEFAULT_SLO_S) -> float:
    """Absolute deadline: explicit, else arrival + SLO, else arrival + the default SLO."""
    if req.deadline is not None:
        return req.deadline
    arrival = req.arrival if req.arrival is not None else now
    return arrival + (req.slo_s if req.slo_s is not None else default_slo_s)


_UNAUDITED = (
    "decision {} was made without its audit record (Router(record_views=False) checks its"
    " pick instead of keeping the eligible mask and scores): route with record_views=True"
    " to record decisions"
)


@dataclass(slots=True)
class RouteOutcome:
    """The result of one decision; ``record()`` builds its audit record on demand.

    What the decision looked at (time, prompt length, predictions, seed, the length it
    planned on) is read from its context rather than copied: a decision builds no more
    than it must.
    """

    request: AgentRequest
    number: int
    """The router's count of decisions when this one was made (in ``decision_id``)."""
    instance_id: str | None
    slot: int | None
    deadline: float
    features: list[float]
    how: str
    policy: Policy
    predictor_version: str
    picker_state: dict[str, int]
    views: Any
    ctx: RouteContext
    mask: np.ndarray | None
    """The eligible instances; None where the decision was not audited (``Router`` with
    ``record_views=False``) and its pick was checked instead (``Policy.select``). Such a
    router's decisions have no audit record (``record()`` is refused)."""
    raw_scores: np.ndarray | DeferredScores | None
    """What the policy's ``select`` returned (``scores`` reads it as a vector)."""
    p50_shift: float = 0.0
    """The predictor's online location shift in the P50 (recorded for the audit)."""

    @property
    def scores(self) -> np.ndarray:
        """Each instance's score (made on first read where one scorer alone decided)."""
        if self.raw_scores is None:
            raise RuntimeError(_UNAUDITED.format(self.decision_id))
        return score_vector(self.raw_scores)

    @property
    def decision_id(self) -> str:
        return f"{self.request.request_id}#{self.number}"

    @property
    def now(self) -> float:
        return self.ctx.now

    @property
    def input_tokens(self) -> int:
        return self.ctx.input_tokens

    @property
    def planned_tokens(self) -> float:
        """The length the decision planned on (the quantile of the policy that chose)."""
        return self.ctx.planned_tokens

    @property
    def p50(self) -> float:
        return self.ctx.p50

    @property
    def p90(self) -> float:
        return self.ctx.p90

    @property
    def seed(self) -> int:
        return self.ctx.seed

    def record(self, top_k: int | None = None) -> Decision:
        """The audit record (candidates: all instances, or the best ``top_k`` by score)."""
        mask = self.mask
        if mask is None or not self.ctx.audit:
            raise RuntimeError(_UNAUDITED.format(self.decision_id))
        q, p, d, f = self.ctx.estimates()
        slack = self.ctx.deadline_in - f
        n = len(q)
        order: list[int] | range = range(n)
        if top_k is not None and n > top_k:
            best = np.argsort(-np.where(mask, self.scores, -1e18), kind="stable")[:top_k]
            keep = set(best.tolist())
            if self.slot is not None:
                keep.add(self.slot)
            order = sorted(keep)
        cached = np.broadcast_to(np.asarray(self.ctx.cached, dtype=float), (n,))
        infos = self.ctx.est.infos
        cands = [
            Candidate(
                instance_id=infos[i].instance_id,
                gpu=infos[i].gpu,
                eligible=bool(mask[i]),
                est_queue_s=float(q[i]),
                est_prefill_s=float(p[i]),
                est_tpot_s=float(d[i]),
                est_finish_s=float(f[i]),
                slack_s=float(slack[i]) if math.isfinite(slack[i]) else 1e18,
                score=float(self.scores[i]),
                cached_tokens=int(cached[i]),
            )
            for i in order
        ]
        # JSON has no infinity and the record's config no null: unbounded settings (None,
        # +-inf) go as strings, which ``replay`` turns back (_UNBOUNDED)
        config: dict[str, float | int | str | bool] = {}
        for k, v in self.policy.config.items():
            if isinstance(v, int | str | bool) or (isinstance(v, float) and math.isfinite(v)):
                config[k] = v
            elif v is None:
                config[k] = "none"
            elif isinstance(v, float) and v == v:  # +-inf (nan is no setting)
                config[k] = str(v)
        config.update({f"state.{k}": v for k, v in self.picker_state.items()})
        config["p99"] = self.ctx.p99
        config["max_tokens_cap"] = self.ctx.max_tokens
        if self.ctx.miss_rate:
            config["miss_rate"] = self.ctx.miss_rate
        if self.ctx.sticky is not None:
            config["sticky"] = self.ctx.sticky
        if self.p50_shift:
            config["p50_shift"] = self.p50_shift
        if self.views is None:
            config["views_omitted"] = True  # Router.views_every: not this one
        return Decision(
            decision_id=self.decision_id,
            request_id=self.request.request_id,
            at=self.now,
            policy=self.policy.name,
            policy_version=self.policy.version,
            predictor_version=self.predictor_version,
            config=config,
            seed=self.seed,
            request=self.request,
            input_tokens=self.input_tokens,
            features=self.features,
            predicted_output_p50=self.p50,
            predicted_output_p90=self.p90,
            planned_output_tokens=self.planned_tokens,
            deadline=self.deadline,
            instances=self.views if self.views is not None else [],
            candidates=cands,
            chosen=self.instance_id,
            outcome="assigned" if self.instance_id else "rejected",
            reason=self.how,
        )


class Router:
    """Predict, estimate, select; then count the request on the chosen instance.

    ``record_views``: keep what a decision's audit record needs (the instances' views,
    the eligible mask, the scores). Without it (the simulator, the router benchmark) a
    policy checks its pick against the last filters of its chain instead of masking the
    fleet with them: the same pick, and ``RouteOutcome.record()`` is refused.
    ``views_every``: with ``record_views``, one decision in this many records every
    instance's view (what ``replay`` needs to redo it); the others record the candidates,
    predictions and settings only (0: none). A view of every instance costs about 2.4 us
    and 0.7 KiB an instance in each record, so on a large fleet it is most of a decision's
    cost: 1 (every decision replayable) is the default.
    """

    def __init__(
        self,
        *,
        estimator: FleetEstimator,
        predictor: LengthPredictor,
        policy: Policy | str,
        seed: int = 0,
        default_slo_s: float = DEFAULT_SLO_S,
        max_tokens_bound: bool = True,
        record_views: bool = True,
        prefix_index: PrefixIndex | None = None,
        workflows: WorkflowTracker | None = None,
        max_sessions: int = 100_000,
        views_every: int = 1,
    ) -> None:
        if views_every < 0:
            raise ConfigError(f"views_every must be >= 0, got {views_every}")
        self.est = estimator
        self.predictor = predictor
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.seed = seed
        self.default_slo_s = default_slo_s
        self.max_tokens_bound = max_tokens_bound
        self.record_views = record_views
        self.views_every = views_every
        self.counter = 0
        self.prefix_index = prefix_index if prefix_index is not None else PrefixIndex()
        self.workflows = workflows if workflows is not None else WorkflowTracker()
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.max_sessions = max_sessions
        self._seed_hash: tuple[int, Any] | None = None
        """(router seed, BLAKE2b state after hashing "{seed}:"): see ``decision_seed``."""

    def decision_seed(self, request_id: str) -> int:
        """Per-decision RNG seed: stable for (router seed, request, count).

        BLAKE2b of ``"{seed}:{request_id}:{count}"``; the state after ``"{seed}:"`` is kept
        and copied (a copy and an update cost less than a fresh hash object)."""
        pre = self._seed_hash
        if pre is None or pre[0] != self.seed:
            pre = self._seed_hash = (
                self.seed,
                hashlib.blake2b(f"{self.seed}:".encode(), digest_size=8),
            )
        h = pre[1].copy()
        h.update(f"{request_id}:{self.counter}".encode())
        return int.from_bytes(h.digest(), "little") >> 1

    def predict(
        self, reqs: Sequence[AgentRequest], inputs: Sequence[Any] | None = None
    ) -> list[Predicted]:
        """Predict a batch of requests at once: the forest walks every row together, which
        costs a fraction of one-by-one predictions (pass each to ``route``). A predictor's
        ``predict_batch(xs, feats)``, where it has one, gets the features made here."""
        xs = (
            list(inputs)
            if inputs is not None
            else [to_predictor_input(r, input_tokens_of(r)) for r in reqs]
        )
        feats = [self.predictor.features(x) for x in xs]
        batch = getattr(self.predictor, "predict_batch", None)
        if batch is not None and len(xs) > 1:
            preds = batch(xs, feats)
        else:
            preds = [self.predictor.predict(x) for x in xs]
        loc = getattr(self.predictor, "location_shift", None)
        return [
            Predicted(
                x,
                f,
                float(p.p50),
                float(p.p90),
                float(getattr(p, "p99", 0.0) or 0.0),
                loc(x) if loc is not None else 0.0,
            )
            for x, f, p in zip(xs, feats, preds, strict=True)
        ]

    def route(
        self,
        req: AgentRequest,
        now: float,
        *,
        cached: np.ndarray | float | None = None,
        commit: bool = True,
        predictor_input: Any = None,
        block_hashes: list[int] | None = None,
        predicted: Predicted | None = None,
    ) -> RouteOutcome:
        """Decide where ``req`` goes. With ``commit`` the estimator counts it there at once.

        ``block_hashes`` (the prompt's chained KV-block hashes) let the prefix index
        estimate how much of the prompt each instance has cached; ``predicted`` is this
        request's entry of a batch ``predict`` (else it is predicted on its own).
        """
        if req.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {req.max_tokens}")
        self.counter += 1
        n_in = req.input_tokens
        if n_in is None:
            n_in = input_tokens_of(req)
        if cached is None:
            cached = self.prefix_index.match(block_hashes, len(self.est)) if block_hashes else 0.0
        if isinstance(cached, np.ndarray) and not cached.any():
            cached = 0.0  # nothing cached anywhere: the scalar path, as replay takes it
        if predicted is None:
            x = predictor_input if predictor_input is not None else to_predictor_input(req, n_in)
            (predicted,) = self.predict([req], [x])
        feats = predicted.features
        p50, p90, p99 = predicted.p50, predicted.p90, predicted.p99
        if req.workflow_deadline is None or req.workflow_id is None:
            deadline = deadline_of(req, now, self.default_slo_s)  # (deadline_for's own case)
        else:
            deadline = self.deadline_for(req, now, n_in, p50)
        seed = self.decision_seed(req.request_id)
        picker_state = self.policy.state()
        every = self.views_every
        take_views = self.record_views and every and self.counter % every == 0
        views = self.est.views(now) if take_views else None
        # positional, in the order of RouteContext's fields (half the cost of keywords)
        ctx = RouteContext(
            self.est,
            now,
            n_in,  # input_tokens
            p50,  # planned_tokens, until set_plan
            deadline - now,  # deadline_in
            req.model,
            seed,
            p50,
            p90,
            p99,
            req.max_tokens if self.max_tokens_bound else 0,  # max_tokens
            "",  # quantile
            req.workflow_id,
            req.priority,
            cached,
            self.sessions.get(req.workflow_id) if req.workflow_id else None,  # sticky
            self.policy.config,  # config (select sets it again)
            self.est.load_pressure(now),  # miss_rate
            self.record_views,  # audit: an unrecorded decision may check its pick instead
        )
        # P50 unless the policy plans on another quantile (its select would set that next)
        ctx.set_plan(str(self.policy.config.get("plan_quantile") or "p50"))
        slot, mask, scores, how = self.policy.select(ctx)
        planned = ctx.planned_tokens
        instance_id = self.est.infos[slot].instance_id if slot is not None else None
        out = RouteOutcome(  # positional, in the order of its fields
            req,
            self.counter,  # number
            instance_id,
            slot,
            deadline,
            feats,
            how,
            self.policy,
            self.predictor.version,
            picker_state,
            views,
            ctx,
            mask,
            scores,
            predicted.p50_shift,
        )
        if commit and instance_id is not None and slot is not None:
            if block_hashes:
                self.prefix_index.add(slot, block_hashes)
            if req.workflow_id:
                self.sessions[req.workflow_id] = slot
                self.sessions.move_to_end(req.workflow_id)
                if len(self.sessions) > self.max_sessions:
                    self.sessions.popitem(last=False)
            c = float(cached[slot]) if isinstance(cached, np.ndarray) else float(cached)
            q_, p_, d_ = self.est.estimate_at(slot, n_in, ctx.planned_tokens, c)
            fc = self.est.finish_corr.item(slot)
            self.est.assign_slot(  # on_assign by slot, positional
                slot,
                req.request_id,
                n_in,  # input_tokens
                planned,  # planned_tokens
                deadline,
                now,
                p50,
                p90,
                0,  # generated
                int(c),  # cached_tokens
                (q_ + p_) * fc,  # est_fixed_s
                d_ * fc,  # est_tpot_s
            )
            if p90 <= SURE_SPREAD * p50 and ctx.finish.item(slot) > ctx.deadline_in:
                self.est.count_miss(req.request_id)  # a miss known now: the load pressure
        return out

    def deadline_for(self, req: AgentRequest, now: float, input_tokens: int, p50: float) -> float:
        """The call's deadline: its own, and within its share of the workflow's time left."""
        own = deadline_of(req, now, self.default_slo_s)
        if req.workflow_deadline is None or req.workflow_id is None:
            return own
        has_own = req.deadline is not None or req.slo_s is not None
        _, _, _, finish = self.est.estimate(input_tokens, p50)
        usable = self.est.usable(now)
        est_s = float(finish[usable].min()) if usable.any() else float(finish.min(initial=1.0))
        budget = self.workflows.budget_deadline(
            workflow_id=req.workflow_id,
            task=req.task,
            step=req.step,
            workflow_deadline=req.workflow_deadline,
            now=now,
            call_estimate_s=est_s,
        )
        return min(own, budget) if has_own else budget

    def on_heartbeat(self, hb: Any, *, now: float | None = None) -> None:
        """Fold a heartbeat into the estimator and the prefix index's capacity mirror."""
        self.est.on_heartbeat(hb, now=now)
        slot = self.est.index.get(hb.instance_id)
        if hb.kv_total_blocks and slot is not None:
            # the engine's blocks may be larger than the index's (vLLM CPU: 32): mirror tokens
            tokens = hb.kv_total_blocks * (hb.kv_block_size or self.prefix_index.block_size)
            self.prefix_index.set_capacity(slot, tokens // self.prefix_index.block_size)

    def forget_instance(self, instance_id: str) -> None:
        """An instance died or restarted: its cache and sticky sessions are gone."""
        slot = self.est.index.get(instance_id)
        if slot is None:
            return
        self.prefix_index.drop_instance(slot)
        for wid in [w for w, s in self.sessions.items() if s == slot]:
            del self.sessions[wid]


class NotReplayable(ValueError):
    """A decision record without what ``replay`` needs (the instances' views)."""


_UNBOUNDED = {"none": None, "inf": math.inf, "-inf": -math.inf}
"""Recorded strings of unbounded settings and what they were (``RouteOutcome.record``)."""


def to_predictor_input(req: AgentRequest, input_tokens: int) -> Any:
    """The predictor's view of a request (never its true output length)."""
    return PredictorInput.from_request(req, input_tokens)


def replay(decision: Decision) -> tuple[str | None, Decision]:
    """Recompute a decision from its audit record alone: (chosen instance, recomputed record).

    The predictor is not re-run: its recorded predictions are inputs here, and
    ``replay_predictions`` checks them against the recorded features separately.
    """
    if decision.config.get("views_omitted"):
        raise NotReplayable(
            f"decision {decision.decision_id} was recorded without the instances' views"
            " (the dispatcher's decision_views_every records them for one decision in N):"
            " it cannot be replayed"
        )
    est = FleetEstimator.from_views(list(decision.instances))
    overrides = {
        k: _UNBOUNDED.get(v, v) if isinstance(v, str) else v
        for k, v in decision.config.items()
        if not k.startswith("state.")
    }
    policy = make_policy(decision.policy, {**LEGACY_OFF, **overrides})
    policy.set_state(
        {k[len("state.") :]: int(v) for k, v in decision.config.items() if k.startswith("state.")}
    )
    cached = np.zeros(len(est))
    for c in decision.candidates:
        if c.cached_tokens and c.instance_id in est.index:
            cached[est.index[c.instance_id]] = c.cached_tokens
    ctx = RouteContext(
        est=est,
        now=decision.at,
        input_tokens=decision.input_tokens,
        planned_tokens=decision.predicted_output_p50,
        deadline_in=decision.deadline - decision.at,
        model=decision.request.model,
        seed=decision.seed,
        p50=decision.predicted_output_p50,
        p90=decision.predicted_output_p90,
        p99=float(decision.config.get("p99", 0.0)),
        max_tokens=int(decision.config.get("max_tokens_cap", 0)),
        workflow_id=decision.request.workflow_id,
        priority=decision.request.priority,
        cached=cached if cached.any() else 0.0,
    )
    ctx.miss_rate = float(decision.config.get("miss_rate", 0.0))
    sticky = decision.config.get("sticky")
    ctx.sticky = int(sticky) if sticky is not None else None
    ctx.set_plan("p50")
    slot, _mask, _scores, _how = policy.select(ctx)
    chosen = est.infos[slot].instance_id if slot is not None else None
    return chosen, decision
