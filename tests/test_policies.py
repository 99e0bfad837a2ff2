"""Table-driven tests of the routing policies on hand-built fleet snapshots (no broker)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from goodserve.dispatcher.estimator import RESEED_TOLERANCE, FleetEstimator
from goodserve.dispatcher.policies.base import (
    CandidateCosts,
    RouteContext,
    make_scorer,
    normalize_candidates,
)
from goodserve.dispatcher.policies.registry import (
    BASELINES,
    GOODSERVE_CONFIG,
    LEGACY_OFF,
    make_policy,
    policy_names,
)
from goodserve.dispatcher.predictor.model import ConstantPredictor
from goodserve.dispatcher.router import Router, replay
from goodserve.schemas import (
    AgentRequest,
    Decision,
    Heartbeat,
    RequestProgress,
    decode,
    encode,
)

from goodserve.sim.oracle import OraclePrediction
from goodserve.testing.snapshots import beat, fleet, progress_of


def as_scores(said: np.ndarray | CandidateCosts | None, mask: np.ndarray) -> np.ndarray:
    """A scorer's answer as its [0, 1] score per instance (zeros where it said nothing)."""
    if said is None:
        return np.zeros(mask.shape)
    if isinstance(said, CandidateCosts):
        return normalize_candidates(said.cand, mask)
    return said


class FixedPredictor:
    """Predicts a fixed (p50, p90) for every request."""

    version = "fixed"

    def __init__(self, p50: float, p90: float | None = None) -> None:
        self.p50, self.p90 = p50, p90 if p90 is not None else p50

    def features(self, x: object) -> list[float]:
        return [1.0]

    def predict(self, x: object) -> OraclePrediction:
        return OraclePrediction(self.p50, self.p90, self.p90)


def route(
    est: FleetEstimator,
    policy: str,
    *,
    slo_s: float,
    p50: float,
    p90: float | None = None,
    input_tokens: int = 100,
    rid: str = "r1",
    now: float = 0.0,
    overrides: dict[str, object] | None = None,
) -> str | None:
    pol = make_policy(policy, overrides) if overrides else policy
    router = Router(estimator=est, predictor=FixedPredictor(p50, p90), policy=pol)
    req = AgentRequest(
        request_id=rid, input_tokens=input_tokens, max_tokens=4096, arrival=now, slo_s=slo_s
    )
    return router.route(req, now).instance_id


# (case, gpus, slo_s, predicted tokens, expected instance or None)
JUST_ENOUGH_CASES = [
    ("loose request goes to the slow GPU", ("V100", "H100"), 60.0, 200, "v100-0"),
    ("tight request goes to the fast GPU", ("V100", "H100"), 3.0, 200, "h100-1"),
    (
        "medium request: the slowest GPU that still makes it",
        ("V100", "A40", "A100", "H100"),
        6.0,
        200,
        None,
    ),  # checked below: not H100, and meets the deadline
    (
        "nothing can make it, idle fleet: served where it finishes first",
        ("V100", "A40"),
        0.5,
        2000,
        "v100-0",
    ),  # V100 (900 GB/s) decodes faster than A40 (696 GB/s)
]


@pytest.mark.parametrize(
    ("case", "gpus", "slo", "tokens", "expected"),
    JUST_ENOUGH_CASES,
    ids=[c[0] for c in JUST_ENOUGH_CASES],
)
def test_just_enough(
    case: str, gpus: tuple[str, ...], slo: float, tokens: int, expected: str | None
) -> None:
    est = fleet(*gpus)
    # packing without keeping slack (see test_keep_slack_bounds_packing)
    unbounded = {"keep_slack": 0.0, "trust_region": None}
    chosen = route(est, "goodserve", slo_s=slo, p50=tokens, overrides=unbounded)
    if case.startswith("medium"):
        assert chosen is not None and not chosen.startswith("h100")
        _, _, _, finish = est.estimate(100, tokens)
        assert finish[est.slot(chosen)] <= slo
        # and it is the one with least slack among those that make it
        ok = [i for i in range(len(est)) if finish[i] * 1.05 + 0.05 <= slo]
        assert est.slot(chosen) == max(ok, key=lambda i: finish[i])
    else:
        assert chosen == expected


def busy(est: FleetEstimator, running: int = 200) -> FleetEstimator:
    """Every instance runs a big batch (heartbeats say so): no spare capacity anywhere."""
    for slot in range(len(est)):
        beat(est, slot, running=running)
    return est


def test_hopeless_request_rejected_early_only_under_load() -> None:
    assert route(busy(fleet("V100", "A40")), "goodserve", slo_s=0.5, p50=2000) is None
    assert route(busy(fleet("V100", "A40"), running=0), "goodserve", slo_s=0.5, p50=2000)


@pytest.mark.parametrize(
    ("p50", "p90", "rejected"),
    [
        (2000, 2000, True),  # exact length: hopeless, shed it
        (2000, 3000, True),  # confident (P90 1.5x P50), the short mirror (1,333) is hopeless too
        (2000, 5000, False),  # too unsure: it may well be short, serve it where it finishes first
        (400, 500, False),  # the short mirror (320 tokens) can still make it
    ],
)
def test_rejection_needs_a_confident_hopeless_prediction(
    p50: float, p90: float, rejected: bool
) -> None:
    est = busy(fleet("V100", "A40"))
    slo = 0.5 if p50 > 1000 else float(est.estimate(100, 320)[3].min()) * 1.05
    chosen = route(est, "goodserve", slo_s=slo, p50=p50, p90=p90)
    assert (chosen is None) == rejected


FIXED_SHARE: dict[str, object] = {}
"""goodserve's rule: a fixed share of the best slack, whatever the length's spread."""


@pytest.mark.parametrize(
    ("case", "slo_of", "overrides", "v100_allowed"),
    [
        (
            "loose: keeps half the best slack even on the V100",
            lambda f: 60.0,
            {**FIXED_SHARE, "trust_region": None},
            True,
        ),
        (
            "medium: the V100 would eat the slack",
            lambda f: 1.2 * f[0],
            {**FIXED_SHARE, "trust_region": None},
            False,
        ),
        ("fixed share: also within 2x of the best finish", lambda f: 60.0, FIXED_SHARE, False),
        (
            "a record from before keep_slack: the 1.5x trust region alone",
            lambda f: 60.0,
            {"keep_slack": None, "trust_region": 0.5, "slack_by_spread": False},
            False,
        ),
        (
            "packed: no slack kept",
            lambda f: 1.2 * f[0],
            {"keep_slack": 0.0, "trust_region": None},
            True,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_keep_slack_bounds_packing(
    case: str,
    slo_of: Callable[[np.ndarray], float],
    overrides: dict[str, object],
    v100_allowed: bool,
) -> None:
    est = fleet("V100", "A100", "H100")
    est.miss_rate = 0.0  # no deadline missed lately: no load pressure
    _, _, _, finish = est.estimate(100, 200)
    slo = slo_of(finish)
    chosen = route(est, "goodserve", slo_s=slo, p50=200, overrides=overrides)
    assert chosen is not None
    assert (chosen == "v100-0") == v100_allowed
    best = float(finish.min())
    if overrides.get("keep_slack", 0.5) and overrides.get("slack_by_spread") is False:
        assert slo - finish[est.slot(chosen)] >= 0.5 * (slo - best) - 1e-9
    if overrides == FIXED_SHARE:
        assert finish[est.slot(chosen)] <= 2.0 * best < finish[0]
    elif overrides.get("trust_region") == 0.5:
        assert finish[est.slot(chosen)] <= 1.5 * best < finish[0]


@pytest.mark.parametrize(
    ("miss_rate", "slower_allowed"),
    [(0.0, False), (0.05, False), (0.15, True), (0.6, True)],
)
def test_load_pressure_keeps_less_slack(miss_rate: float, slower_allowed: bool) -> None:
    """A deadline where the A100 would eat half the H100's slack but not 0.8 of it: it is
    allowed once the fleet has been missing deadlines (from 5% to 15% of recent requests:
    keep 0.2 of the slack, not 0.5)."""
    est = fleet("A100", "H100")
    est.miss_rate = miss_rate
    _, _, _, finish = est.estimate(100, 200)
    f, best = float(finish[0]), float(finish[1])
    # the A100 keeps 0.2 of the best slack but not 0.5, and meets the deadline with margin
    lo, hi = max((f - 0.2 * best) / 0.8, 1.05 * f + 0.05), 2.0 * f - best
    assert lo < hi and f <= 2.0 * best  # (within the trust region: not what decides)
    slo = (lo + hi) / 2
    router = Router(estimator=est, predictor=FixedPredictor(200), policy="goodserve")
    req = AgentRequest(request_id="r1", input_tokens=100, max_tokens=4096, arrival=0.0, slo_s=slo)
    rec = router.route(req, 0.0).record()
    assert rec.chosen == ("a100-0" if slower_allowed else "h100-1")
    assert rec.config.get("miss_rate", 0.0) == miss_rate  # recorded: replay decides alike
    assert replay(decode(encode(rec)))[0] == rec.chosen
    if slower_allowed:  # the same record without the pressure it saw: the base rule
        calm = {k: v for k, v in rec.config.items() if k != "miss_rate"}
        assert replay(type(rec)(**{**_asdict(rec), "config": calm}))[0] == "h100-1"


@pytest.mark.parametrize(
    ("miss_rate", "harm_weight", "expected"),
    [
        (0.0, 1.0, "h100-1"),  # no pressure: where it finishes first
        (0.10, 1.0, "h100-1"),  # half the weight: 4.5 s + 1.05 s still beats 5.9 s
        (0.15, 1.0, "a40-0"),  # full weight: 4.5 s + 2.1 s of the residents' delay
        (0.6, 1.0, "a40-0"),
        (0.6, 0.0, "h100-1"),  # records made before the rule replay without it
    ],
)
def test_rescue_counts_the_delay_added_to_residents_under_pressure(
    miss_rate: float, harm_weight: float, expected: str
) -> None:
    """No instance can promise the deadline, so the rescue picks. The H100 runs 100
    requests and would still finish this one first (4.5 s against the idle A40's 5.9 s),
    but its 200 tokens and prefill would delay each of the 100 by about 21 ms. Once the
    fleet misses deadlines, that delay counts: the idle A40 is the cheaper choice."""
    est = fleet("A40", "H100")
    beat(est, 1, running=100)
    est.miss_rate = miss_rate
    _, _, _, finish = est.estimate(100, 200)
    assert 4.0 < finish[1] < 4.7 < 5.8 < finish[0] < 6.0  # neither promises a 4 s deadline
    overrides = None if harm_weight == 1.0 else {"harm_weight": harm_weight}
    rec = _rescued(est, overrides, p50=200, input_tokens=100, slo_s=4.0)
    assert rec.chosen == expected
    assert replay(decode(encode(rec)))[0] == expected  # recorded: replay decides alike
    if harm_weight and miss_rate >= 0.15:  # the same record without the weight: the old rule
        old = {k: v for k, v in rec.config.items() if k != "harm_weight"}
        assert replay(type(rec)(**{**_asdict(rec), "config": old}))[0] == "h100-1"


def _rescued(
    est: FleetEstimator, overrides: dict[str, object] | None, *, p50: float,
    input_tokens: int, slo_s: float,
) -> Decision:
    """Route one request at t=0 with ``goodserve`` (and ``overrides``); it must fall to the
    rescue. Returns the decision's audit record."""
    pol = make_policy("goodserve", overrides) if overrides else "goodserve"
    router = Router(estimator=est, predictor=FixedPredictor(p50), policy=pol)
    req = AgentRequest(request_id="r1", input_tokens=input_tokens, max_tokens=4096,
                       arrival=0.0, slo_s=slo_s)
    out = router.route(req, 0.0)
    assert "goodserve-rescue" in out.how
    return out.record()


# (case, deadline of one of the four requests on h100-1 (the rest: 60 s), stall_weight,
#  expected). h100-0 runs five requests with 60 s to go, so h100-1 finishes the newcomer
#  first (1.347 s against 1.358 s); neither makes its 1.3 s deadline.
STALL_CASES = [
    ("a request there has 0.3 s left: its 6k-token prefill's stall would cost it", 0.3, 1.0,
     "h100-0"),
    ("every request there has a minute left: where it finishes first", 60.0, 1.0, "h100-1"),
    ("the one there is late already: nothing to save", -1.0, 1.0, "h100-1"),
    ("records made before the rule replay without it", 0.3, 0.0, "h100-1"),
]


@pytest.mark.parametrize(
    ("case", "tight_deadline", "stall_weight", "expected"),
    STALL_CASES,
    ids=[c[0] for c in STALL_CASES],
)
def test_rescue_weighs_the_prefill_stall_by_the_residents_time_left(
    case: str, tight_deadline: float, stall_weight: float, expected: str
) -> None:
    est = fleet("H100", "H100")
    for k in range(5):
        est.on_assign("h100-0", request_id=f"a{k}", input_tokens=200, planned_tokens=50,
                      deadline=60.0, now=-2.0)
    for k in range(4):
        est.on_assign("h100-1", request_id=f"b{k}", input_tokens=200, planned_tokens=50,
                      deadline=tight_deadline if k == 0 else 60.0, now=-2.0)
    _, _, _, finish = est.estimate(6000, 100)
    assert 1.3 < finish[1] < finish[0] < 1.37
    overrides = None if stall_weight == 1.0 else {"stall_weight": stall_weight}
    rec = _rescued(est, overrides, p50=100, input_tokens=6000, slo_s=1.3)
    assert rec.chosen == expected
    assert replay(decode(encode(rec)))[0] == expected  # recorded: replay decides alike
    if expected == "h100-0":  # the same record without the weight (an old one): the old rule
        old = {k: v for k, v in rec.config.items() if k != "stall_weight"}
        assert replay(type(rec)(**{**_asdict(rec), "config": old}))[0] == "h100-1"
        # and a record without the budgets (made before InstanceView had them) likewise
        views = [type(v)(**{**_asdict(v), "budget_load": 0.0}) for v in rec.instances]
        assert replay(type(rec)(**{**_asdict(rec), "instances": views}))[0] == "h100-1"


# (case, deadline of one request on h100-0 / on h100-1 (the rest: 60 s), stall_limit,
#  expected, how). Both H100s make a 10 s deadline; h100-1 runs 8 requests, h100-0 four, so
#  just-enough would take h100-1 (it leaves the least slack).
SPARES_CASES = [
    ("a request on h100-1 has 0.3 s left: the 6k-token prefill goes elsewhere",
     60.0, 0.3, 0.3, "h100-0", "goodserve: max-score"),
    ("every request has a minute left: just enough", 60.0, 60.0, 0.3, "h100-1",
     "goodserve: max-score"),
    ("both have one about to finish: the rescue weighs the stall",
     0.3, 0.3, 0.3, "h100-0", "goodserve-rescue"),
    ("records made before the rule replay without it", 60.0, 0.3, None, "h100-1",
     "goodserve: max-score"),
]


@pytest.mark.parametrize(
    ("case", "deadline0", "deadline1", "limit", "expected", "how"),
    SPARES_CASES,
    ids=[c[0] for c in SPARES_CASES],
)
def test_prefill_spares_the_deadlines_of_the_requests_running_there(
    case: str, deadline0: float, deadline1: float, limit: float | None, expected: str, how: str
) -> None:
    est = fleet("H100", "H100")
    for k in range(4):
        est.on_assign("h100-0", request_id=f"a{k}", input_tokens=200, planned_tokens=50,
                      deadline=deadline0 if k == 0 else 60.0, now=-2.0)
    for k in range(8):
        est.on_assign("h100-1", request_id=f"b{k}", input_tokens=200, planned_tokens=50,
                      deadline=deadline1 if k == 0 else 60.0, now=-2.0)
    pol = make_policy("goodserve", None if limit == 0.3 else {"stall_limit": limit})
    router = Router(estimator=est, predictor=FixedPredictor(100), policy=pol)
    req = AgentRequest(request_id="r1", input_tokens=6000, max_tokens=4096, arrival=0.0,
                       slo_s=10.0)
    out = router.route(req, 0.0)
    rec = out.record()
    assert rec.chosen == expected and how in out.how
    assert replay(decode(encode(rec)))[0] == expected  # recorded: replay decides alike
    if limit is not None and expected == "h100-0" and how.startswith("goodserve:"):
        old = {k: v for k, v in rec.config.items() if k != "stall_limit"}  # an old record
        assert replay(type(rec)(**{**_asdict(rec), "config": old}))[0] == "h100-1"


def test_prefill_spares_the_deadlines_another_replica_placed() -> None:
    """Two dispatcher replicas share a fleet: the request about to miss on h100-1 was placed
    by the other one. This router learns its deadline from h100-1's heartbeat (which lists
    every request there) and keeps the 6k-token prefill off it, as it would for its own."""
    est = fleet("H100", "H100")
    for k in range(4):
        est.on_assign("h100-0", request_id=f"a{k}", input_tokens=200, planned_tokens=50,
                      deadline=60.0, now=-2.0)
    def theirs(first_deadline: float) -> list[RequestProgress]:
        return [RequestProgress(request_id=f"b{k}", state="running", generated=10,
                                input_tokens=200, deadline=first_deadline if k == 0 else 60.0)
                for k in range(8)]

    router = Router(estimator=est, predictor=FixedPredictor(100), policy="goodserve")
    req = AgentRequest(request_id="r1", input_tokens=6000, max_tokens=4096, arrival=0.0,
                       slo_s=10.0)
    beat(est, 0, at=0.0, running=4, requests=progress_of(est, 0))
    beat(est, 1, at=0.0, running=8, requests=theirs(60.0))
    calm = router.route(req, 0.0, commit=False)
    assert calm.instance_id == "h100-1"  # every request there has a minute: just enough
    beat(est, 1, at=0.0, running=8, requests=theirs(0.3))
    out = router.route(req, 0.0)
    assert out.instance_id == "h100-0" and out.how == "goodserve: max-score"
    assert replay(decode(encode(out.record())))[0] == "h100-0"


def test_rescue_scores_are_earliest_finish_without_pressure() -> None:
    """Below the pressure band and with none of our requests on the instances (no deadline
    for a prefill to stall), finish-with-residents scores every instance exactly as
    earliest-finish does (the rescue of a calm fleet is unchanged, bit for bit); inside
    the band, an instance's score never rises with the requests it already runs."""
    rng = np.random.default_rng(5)
    gpus = ("V100", "A40", "A100", "H100", "L40S")
    for _ in range(40):
        est = fleet(*(gpus[int(g)] for g in rng.integers(0, len(gpus), size=6)))
        for slot in range(len(est)):
            beat(est, slot, running=int(rng.integers(0, 120)), waiting=int(rng.integers(0, 4)))
        mask = rng.random(len(est)) < 0.8
        mask[0] = True
        tokens, planned = int(rng.integers(50, 4000)), float(rng.integers(20, 800))
        ef = make_scorer("earliest-finish", {})
        fwr = make_scorer("finish-with-residents", dict(GOODSERVE_CONFIG))
        for miss in (0.0, 0.03, 0.05):
            c = _rescue_ctx(est, tokens, planned, miss)
            assert np.array_equal(as_scores(fwr(c, mask), mask), as_scores(ef(c, mask), mask))
        c = _rescue_ctx(est, tokens, planned, 0.5)
        old = make_scorer("finish-with-residents", {**GOODSERVE_CONFIG, "harm_weight": 0.0})
        assert np.array_equal(  # weight 0: at any pressure
            as_scores(old(c, mask), mask), as_scores(ef(c, mask), mask)
        )
    # inside the band: the same fleet with more requests on instance 0 never scores it higher
    est = fleet("H100", "A100")
    fwr = make_scorer("finish-with-residents", dict(GOODSERVE_CONFIG))
    prev = math.inf
    for running in (0, 20, 60, 120):
        beat(est, 0, running=running)
        both = np.ones(2, dtype=bool)
        score = float(as_scores(fwr(_rescue_ctx(est, 200, 300.0, 0.2), both), both)[0])
        assert score <= prev
        prev = score
    assert prev < 1.0  # at 120 requests the idle A100 is the cheaper instance


def _rescue_ctx(est: FleetEstimator, tokens: int, planned: float, miss: float) -> RouteContext:
    c = RouteContext(est=est, now=0.0, input_tokens=tokens, planned_tokens=planned,
                     deadline_in=5.0, model="default", seed=0)
    c.miss_rate = miss
    return c


def test_miss_rate_counts_each_request_once() -> None:
    """Misses counted when the deadline passes while the request runs (at the next
    decision), at its completion otherwise, and at once when placed where it is estimated
    late on a sure length; never twice."""
    est = fleet("A100")
    est.miss_rate = 0.0
    router = Router(estimator=est, predictor=FixedPredictor(20), policy="fastest-first")

    def send(rid: str, now: float, slo_s: float) -> None:
        req = AgentRequest(
            request_id=rid, input_tokens=100, max_tokens=4096, arrival=now, slo_s=slo_s
        )
        assert router.route(req, now).instance_id == "a100-0"

    finish = float(est.estimate(100, 20)[3][0])
    send("ok", 0.0, 2 * finish)
    est.on_finish("ok", now=finish, output_tokens=20)
    assert est.miss_rate == 0.0
    send("slow", 0.0, 2 * finish)  # will run past its deadline
    assert est.miss_rate == 0.0
    send("next", 2.5 * finish, 2 * finish)  # after slow's deadline: counted now
    assert math.isclose(est.miss_rate, 0.05)
    est.on_finish("slow", now=2.6 * finish, output_tokens=20)  # not again
    assert math.isclose(est.miss_rate, 0.05)
    est.on_finish("next", now=3.5 * finish, output_tokens=20)  # in time
    assert math.isclose(est.miss_rate, 0.05 * 0.95)
    send("late", 3.5 * finish, 0.5 * finish)  # estimated late on an exact length: counted
    assert math.isclose(est.miss_rate, 0.05 * 0.95 * 0.95 + 0.05)
    est.on_finish("late", now=4.5 * finish, output_tokens=20)
    assert math.isclose(est.miss_rate, 0.05 * 0.95 * 0.95 + 0.05)


def test_a_moved_request_keeps_its_work_and_its_miss_counted_once() -> None:
    """A migration moves the request's remaining work to the target with its deadline and
    progress; a request whose miss was counted at its decision is not counted again when
    it completes on the target."""
    est = fleet("A100", "H100")
    est.miss_rate = 0.0
    router = Router(estimator=est, predictor=FixedPredictor(20), policy="fastest-first")
    finish = float(est.estimate(100, 20)[3].min())
    req = AgentRequest(request_id="late", input_tokens=100, max_tokens=4096, arrival=0.0,
                       slo_s=0.5 * finish)
    src = router.route(req, 0.0).instance_id
    assert src is not None
    counted = est.miss_rate
    assert counted > 0.0  # estimated late on an exact length: counted at the decision
    dst = "h100-0" if src == "a100-0" else "a100-0"
    assert est.move("late", dst, now=0.1 * finish, generated=5)  # before its deadline
    tr = est.requests["late"]
    assert est.infos[tr.slot].instance_id == dst
    assert (tr.generated, tr.deadline, tr.late) == (5, 0.5 * finish, True)
    assert est.n_active[est.slot(src)] == 0 and est.n_active[est.slot(dst)] == 1
    est.on_finish("late", now=2 * finish, output_tokens=20)
    assert est.miss_rate == counted  # once
    assert not est.move("late", src, now=2 * finish)  # gone: nothing to move
    assert not est.move("ghost", "nowhere", now=2 * finish)


def test_deadline_heap_stays_bounded_with_long_slos() -> None:
    """Requests that end long before their deadline leave no growing heap behind; one that
    runs past its deadline is still counted (once) after the heap was pruned."""
    est = fleet("A100")
    est.miss_rate = 0.0
    router = Router(estimator=est, predictor=FixedPredictor(20), policy="fastest-first")
    finish = float(est.estimate(100, 20)[3][0])
    stuck = AgentRequest(request_id="stuck", input_tokens=100, max_tokens=4096, arrival=0.0,
                         slo_s=2 * finish)
    router.route(stuck, 0.0)
    for k in range(5000):  # each done at once, deadlines an hour away
        req = AgentRequest(request_id=f"r{k}", input_tokens=100, max_tokens=4096,
                           arrival=0.0, slo_s=3600.0)
        router.route(req, 0.0)
        est.on_finish(req.request_id, now=0.0, output_tokens=20)
    assert len(est._due) <= 2 * len(est.requests) + 1024
    assert est.load_pressure(3 * finish) == pytest.approx(0.05)  # stuck ran past its deadline
    assert est.load_pressure(4 * finish) == pytest.approx(0.05)


class SpreadPredictor(FixedPredictor):
    """Predicts (p50, p90, p99)."""

    def __init__(self, p50: float, p90: float, p99: float) -> None:
        super().__init__(p50, p90)
        self.p99 = p99

    def predict(self, x: object) -> OraclePrediction:
        return OraclePrediction(self.p50, self.p90, self.p99)


def route3(
    est: FleetEstimator,
    p: tuple[float, float, float],
    slo_s: float,
    overrides: dict[str, object] | None = None,
) -> str | None:
    router = Router(
        estimator=est,
        predictor=SpreadPredictor(*p),
        policy=make_policy("goodserve-adaptive", overrides),
    )
    req = AgentRequest(request_id="r1", input_tokens=100, max_tokens=4096, arrival=0.0, slo_s=slo_s)
    return router.route(req, 0.0).instance_id


# (case, (p50, p90, p99), slo as a multiple of the V100's finish on the P90, V100 allowed)
SPREAD_CASES = [
    ("exact length, loose: packs onto the V100", (300, 300, 300), 3.0, True),
    ("exact length, just enough: the V100", (300, 300, 300), 1.2, True),
    ("uncertain length, loose: the V100 is beyond the trust region", (150, 300, 600), 3.0, False),
    ("uncertain length, just enough: keeps slack on a faster GPU", (150, 300, 600), 1.2, False),
    ("slightly uncertain, loose: packs (tail covered, region wide)", (280, 300, 310), 3.0, True),
]


@pytest.mark.parametrize(
    ("case", "p", "slo_x", "v100_allowed"), SPREAD_CASES, ids=[c[0] for c in SPREAD_CASES]
)
def test_slack_kept_follows_the_length_uncertainty(
    case: str, p: tuple[float, float, float], slo_x: float, v100_allowed: bool
) -> None:
    est = fleet("V100", "A100", "H100")
    finish = est.estimate(100, p[1])[3]
    chosen = route3(est, p, slo_x * float(finish[0]))
    assert chosen is not None
    assert (chosen == "v100-0") == v100_allowed


# (case, tail on the A100 fits, tail on the H100 fits, cover_tail, expected)
TAIL_CASES = [
    ("the P99 fits only on the H100: take it", False, True, True, "h100-2"),
    ("rule off: just enough on the P90 (A100)", False, True, False, "a100-1"),
    ("the P99 fits on the A100 too: just enough (A100)", True, True, True, "a100-1"),
]


@pytest.mark.parametrize(
    ("case", "a100_tail", "h100_tail", "cover", "expected"),
    TAIL_CASES,
    ids=[c[0] for c in TAIL_CASES],
)
def test_covers_tail_prefers_instances_that_survive_a_long_run(
    case: str, a100_tail: bool, h100_tail: bool, cover: bool, expected: str
) -> None:
    est = fleet("A100", "A100", "H100")
    est.draining[0] = True  # two candidates: the A100 in slot 1 and the H100
    est._live_version += 1
    p = (290.0, 300.0, 900.0)
    plan = est.estimate(100, p[1])[3]
    tail = est.estimate(100, p[2])[3]
    # a deadline that the A100 meets on the P90 (with margins), and the tail where asked
    slo = (float(tail[1]) if a100_tail else float(tail[2])) * 1.01 + 0.06
    assert plan[1] * 1.05 + 0.05 <= slo
    assert (tail[1] + 0.05 <= slo) == a100_tail
    # keep_slack off: only the tail rule separates the two
    ov = {"cover_tail": cover, "keep_slack": 0.0, "trust_region": None, "error_z": 0.0}
    assert route3(est, p, slo, ov) == expected


def test_covers_tail_keeps_the_candidates_when_no_tail_fits() -> None:
    est = fleet("V100", "H100")
    plan = est.estimate(100, 300)[3]
    # the P99 (3,000 tokens) fits nowhere, the P90 on both: just enough, the V100
    slo = float(plan[0]) * 1.3
    assert route3(est, (290, 300, 3000), slo, {"keep_slack": 0.0, "trust_region": None}) == (
        "v100-0"
    )


def finish_of(est: FleetEstimator, slot: int, *, took_x: float, rid: str) -> None:
    """Place a 200-token request on ``slot`` and finish it after ``took_x`` x its estimate."""
    q, p, d = est.estimate_at(slot, 100, 200)
    est.on_assign(
        est.infos[slot].instance_id,
        request_id=rid,
        input_tokens=100,
        planned_tokens=200,
        deadline=1e9,
        now=0.0,
        est_fixed_s=q + p,
        est_tpot_s=d,
    )
    # decoded at the estimated TPOT (the TPOT correction stays put); late by the rest
    est.on_finish(rid, now=took_x * (q + p + d * 200), output_tokens=200, decode_s=d * 199)


# (case, how far off the A100's estimates turned out, A100 still trusted for a tight request)
ERROR_CASES = [
    ("not watched yet: the prior", None, True),
    ("its estimates held: trusted", 1.0, True),
    ("it ran 1.6x its estimates: kept off tight work", 1.6, False),
]


@pytest.mark.parametrize(
    ("case", "took_x", "trusted"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_learned_estimate_error_sets_the_margin(
    case: str, took_x: float | None, trusted: bool
) -> None:
    est = fleet("A100", "H100")
    if took_x is not None:
        for k in range(20):
            finish_of(est, 0, took_x=took_x, rid=f"w{k}")
    err = est.finish_err()
    if took_x == 1.6:
        assert err[0] > 0.4  # log(1.6) = 0.47
        assert err[1] < err[0]  # the unwatched H100 is pulled towards the fleet's error
    elif took_x == 1.0:
        assert err[0] < 0.05
    else:
        assert np.allclose(err, 0.1)  # the prior
    finish = est.estimate(100, 300)[3]
    slo = float(finish[0]) * 1.2 + 0.05  # the A100 makes it by 20%: more than exp(1.28 x 0.1)
    chosen = route3(est, (300, 300, 300), slo)
    assert (chosen == "a100-0") == trusted


def test_old_records_replay_without_the_new_rules() -> None:
    """A record decided before error_z / slack_by_spread / cover_tail replays with them off."""
    est = fleet("V100", "A100", "H100")
    router = Router(
        estimator=est,
        predictor=SpreadPredictor(150, 300, 600),
        policy=make_policy("goodserve-adaptive", {**LEGACY_OFF, "trust_region": 1.0}),
    )
    req = AgentRequest(request_id="r1", input_tokens=100, max_tokens=4096, arrival=0.0, slo_s=60.0)
    rec = router.route(req, 0.0).record()
    new_rules = ("slack_by_spread", "cover_tail", "error_z")
    old = {k: v for k, v in rec.config.items() if k not in new_rules}
    rec = type(rec)(**{**_asdict(rec), "config": old})
    chosen, _ = replay(decode(encode(rec)))
    assert chosen == rec.chosen


def test_best_effort_instead_of_rejection() -> None:
    est = busy(fleet("V100", "H100"))
    chosen = route(est, "goodserve", slo_s=0.5, p50=2000)
    assert chosen is None
    router = Router(
        estimator=est,
        predictor=FixedPredictor(2000),
        policy=make_policy("goodserve", {"on_infeasible": "best-effort"}),
    )
    out = router.route(AgentRequest(request_id="x", input_tokens=100, slo_s=0.5, arrival=0.0), 0.0)
    assert out.instance_id == "h100-1"  # finishes first


def test_plans_on_p90_then_falls_back_to_p50() -> None:
    # p90 does not fit anywhere but p50 fits on the fast GPU
    est = fleet("V100", "H100")
    tpot_h100 = float(est.tpot(1.0)[1])
    slo = 400 * tpot_h100 + 0.5
    chosen = route(est, "goodserve", slo_s=slo, p50=300, p90=3000)
    assert chosen == "h100-1"


def test_stale_instance_is_excluded() -> None:
    est = FleetEstimator()
    est.add_instance("h100-0", gpu="H100", now=0.0)
    est.add_instance("v100-1", gpu="V100", now=0.0)
    for iid, gpu in (("h100-0", "H100"), ("v100-1", "V100")):
        est.on_heartbeat(
            Heartbeat(
                instance_id=iid, gpu=gpu, model="llama-2-7b", engine="sim", at=0.0, max_batch=256
            )
        )
    # only the V100 keeps heart-beating
    est.on_heartbeat(
        Heartbeat(
            instance_id="v100-1",
            gpu="V100",
            model="llama-2-7b",
            engine="sim",
            at=9.0,
            max_batch=256,
        )
    )
    for policy in ["goodserve", *BASELINES]:
        assert route(est, policy, slo_s=1000.0, p50=50, now=10.0) == "v100-1", policy
    assert est.expire(10.0) == ["h100-0"]


def test_load_moves_work_away() -> None:
    est = fleet("H100", "H100")
    beat(est, 0, running=200, waiting=50, kv_tokens=100 * 16, kv_total_blocks=1000)
    for policy in ["least-request", "fastest-first", "power-of-two", "least-kv"]:
        assert route(est, policy, slo_s=10.0, p50=100) == "h100-1", policy


@pytest.mark.parametrize("policy", ["round-robin"])
def test_round_robin_cycles(policy: str) -> None:
    est = fleet("V100", "A40", "H100")
    router = Router(estimator=est, predictor=FixedPredictor(10), policy=policy)
    got = [
        router.route(
            AgentRequest(request_id=f"r{i}", input_tokens=10, slo_s=9.0, arrival=0.0), 0.0
        ).instance_id
        for i in range(6)
    ]
    assert got == ["v100-0", "a40-1", "h100-2"] * 2


def test_protects_residents() -> None:
    # the fast GPU holds a request that is just barely on time: adding work would sink it
    est = fleet("H100", "A100")
    est.on_assign(
        "h100-0",
        request_id="old",
        input_tokens=100,
        planned_tokens=1000,
        deadline=float(est.tpot(1.0)[0]) * 1000 + 0.3,
        now=0.0,
    )
    chosen = route(est, "goodserve", slo_s=60.0, p50=200, rid="new")
    assert chosen == "a100-1"


def test_unknown_policy_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="goodserve"):
        make_policy("nope")
    assert {
        "goodserve",
        "goodserve-nomigrate",
        "round-robin",
        "random",
        "least-request",
        "least-kv",
        "power-of-two",
        "fastest-first",
    } <= set(policy_names())


@pytest.mark.parametrize(
    "policy",
    [
        "goodserve",
        "goodserve-adaptive",
        "goodserve-packed",
        "random",
        "power-of-two",
        "round-robin",
        "least-request",
        "fastest-first",
        "llm-d",
    ],
)
def test_replay_is_bit_identical_and_detects_tampering(policy: str) -> None:
    est = fleet("V100", "A40", "A40", "H100", "H100")
    router = Router(estimator=est, predictor=FixedPredictor(150, 300), policy=policy, seed=7)
    records = []
    for i in range(40):
        req = AgentRequest(
            request_id=f"r{i}", input_tokens=50 + 10 * i, slo_s=2.0 + (i % 7), arrival=i * 0.05
        )
        records.append(router.route(req, i * 0.05).record())
        if i % 10 == 9:
            progress = RequestProgress(
                request_id="r1", state="running", generated=20, input_tokens=60, deadline=3.0
            )
            beat(est, 1, at=i * 0.05, running=3, tpot_s=0.05, requests=[progress])
    for rec in records:
        wire = decode(encode(rec))  # through the wire format, as read back from Kafka
        chosen, _ = replay(wire)
        assert chosen == rec.chosen
    # tamper: make the chosen instance look dead -> replay disagrees
    rec = records[-1]
    assert rec.chosen is not None
    views = [
        v if v.instance_id != rec.chosen else type(v)(**{**_asdict(v), "alive": False})
        for v in rec.instances
    ]
    tampered = type(rec)(**{**_asdict(rec), "instances": views})
    chosen, _ = replay(tampered)
    assert chosen != rec.chosen


def _asdict(s: object) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__struct_fields__}  # type: ignore[attr-defined]


def test_estimator_learns_tpot_from_heartbeats() -> None:
    est = fleet("A100")
    model = float(est.tpot(10.0)[0])
    for k in range(30):
        beat(est, 0, at=float(k), running=10, tpot_s=2 * model)
    assert math.isclose(float(est.tpot(10.0)[0]), 2 * model, rel_tol=0.02)


def test_unmeasured_peer_starts_from_the_measured_instances_tpot() -> None:
    """Two A100s and an H100; only A100 #0 is measured, 5x slower than its seed: A100 #1
    (same GPU and model, nothing measured yet) starts from the correction #0 reached in its
    first observations, as a prior (no slowdown signal); the H100 keeps its seed; once #1
    is measured it follows its own observations; a third A100 joining later starts from
    its measured peers' prior."""
    est = fleet("A100", "A100", "H100")
    seed = float(est.tpot(10.0)[0])
    for k in range(30):
        beat(est, 0, at=float(k), running=10, tpot_s=5 * seed)
    corr = est.tpot_corr
    assert math.isclose(float(est.tpot(10.0)[0]), 5 * seed, rel_tol=0.02)
    assert corr[1] > 0.9 * corr[0] and corr[0] > 3.0  # re-seeded, not the seed's 1.0
    assert corr[1] == est.tpot_prior[0]  # so few unmeasured follow every move
    assert float(est.slowdown()[1]) == 1.0  # a prior, not a slowdown
    assert corr[2] == 1.0  # another GPU keeps its own seed
    for k in range(30):  # A100 #1's own observations: as fast as its seed said
        beat(est, 1, at=30.0 + k, running=10, tpot_s=seed)
    own = float(corr[1])
    assert own < 0.5 * float(corr[0])  # its own measurements, not #0's
    for k in range(3):  # ... and A100 #0 keeps moving without dragging #1 along
        beat(est, 0, at=60.0 + k, running=10, tpot_s=10 * seed)
    assert float(est.tpot_corr[1]) == own
    late = est.add_instance("a100-late", gpu="A100", model="llama-2-7b", now=70.0, alive=True)
    mean = math.sqrt(est.tpot_prior[0] * est.tpot_prior[1])  # its measured peers' priors
    assert est.tpot_prior[1] < est.tpot_corr[late] < est.tpot_prior[0]
    assert math.isclose(est.tpot_corr[late], mean, rel_tol=1e-12)


def test_a_large_fleet_of_one_gpu_reseeds_its_unmeasured_instances_rarely() -> None:
    """1,000 H100s, the first half busy and 3x slower than their seed, each a little
    different: the idle half holds the busy half's mean prior (within the tolerance),
    moved once per 5% of drift, not once per observation (that was O(instances^2): 2.5 s a
    heartbeat round for 2,048 instances)."""
    n = 1000
    est = FleetEstimator()
    for k in range(n):
        est.add_instance(f"h{k}", gpu="H100", model="llama-2-7b", alive=True)
    seed = float(est.tpot(4.0)[0])
    moves = 0
    reseed = est._reseed_tpot

    def counted(j: int, corr: float) -> None:
        nonlocal moves
        moves += 1
        reseed(j, corr)

    est._reseed_tpot = counted  # type: ignore[method-assign]
    for r in range(12):
        for k in range(n // 2):
            beat(est, k, at=float(r), running=4, tpot_s=3 * seed * (1 + 0.04 * (k % 5)))
        for k in range(n // 2, n):
            beat(est, k, at=float(r))
    # each 5% of drift of the mean moves the idle half once (about 20 times over the busy
    # half's first ten observations, 3x from the seed); moved per observation: 2,500,000
    assert moves <= 25 * (n // 2), moves
    busy = est.tpot_prior[: n // 2]
    mean = float(np.exp(np.log(busy).mean()))
    idle = est.tpot_corr[n // 2 :]
    assert np.all(idle == idle[0]) and math.isclose(idle[0], mean, rel_tol=RESEED_TOLERANCE)
    assert idle[0] > 2.5  # moved from the seed's 1.0


def test_a_slowdown_stays_with_its_instance() -> None:
    """An H100 measured at its seed's speed, then slowed to a tenth: its idle twin, never
    measured, keeps the level the first observations showed, so it stays the place to
    move requests to (tests/test_live_migration.py on the live path)."""
    est = fleet("H100", "H100")
    seed = float(est.tpot(10.0)[0])
    for k in range(20):
        beat(est, 0, at=0.1 * k, running=10, tpot_s=seed)
        beat(est, 1, at=0.1 * k)
    for k in range(20):
        beat(est, 0, at=2.0 + 0.1 * k, running=10, tpot_s=10 * seed)
        beat(est, 1, at=2.0 + 0.1 * k)
    assert float(est.tpot_corr[0]) > 5.0 and float(est.slowdown()[0]) > 1.5
    assert est.tpot_corr[1] == est.tpot_prior[0] < 1.5  # the level before the slowdown
    assert float(est.slowdown()[1]) == 1.0


def test_a_prefix_hit_is_not_lost_to_an_unmeasured_peer() -> None:
    """The live failure this guards against (tests/test_live_prefix.py under CPU load): the
    instance holding a workflow's prefix had been measured far slower than its seed, its
    identical peer had not, so the peer looked 5x faster and near-best dropped the hit."""
    est = fleet("A100", "A100")
    seed = float(est.tpot(1.0)[0])
    for k in range(10):
        beat(est, 0, at=float(k), running=1, tpot_s=12 * seed)
        beat(est, 1, at=float(k))  # alive and idle: nothing to measure its TPOT by
    router = Router(estimator=est, predictor=ConstantPredictor(16.0), policy="goodserve")
    req = AgentRequest(request_id="wf-s1", input_tokens=1600, max_tokens=16, slo_s=60.0,
                       workflow_id="wf", step=1, arrival=10.0)
    out = router.route(req, 10.0, cached=np.array([1200.0, 0.0]))
    assert out.instance_id == est.infos[0].instance_id, out.how


def test_adaptive_replays_with_learned_errors() -> None:
    """The learned estimate errors a decision saw travel in its record: replay agrees."""
    est = fleet("V100", "A40", "A100", "H100")
    for k in range(6):
        finish_of(est, k % 4, took_x=1.0 + 0.2 * (k % 3), rid=f"w{k}")
    router = Router(
        estimator=est, predictor=SpreadPredictor(150, 250, 400), policy="goodserve-adaptive"
    )
    for i in range(20):
        req = AgentRequest(request_id=f"r{i}", input_tokens=100, slo_s=1.5 + i % 6, arrival=0.0)
        rec = router.route(req, 0.01 * i).record()
        assert any(v.finish_err != 0.1 for v in rec.instances)
        chosen, _ = replay(decode(encode(rec)))
        assert chosen == rec.chosen
