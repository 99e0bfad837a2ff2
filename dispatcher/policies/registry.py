"""Named policies: GoodServe's own and the baselines it must beat.

| name | filters | scorers (weight) | picker |
|---|---|---|---|
| goodserve | usable, model-match, near-best (keeps half the slack the earliest-finishing instance would leave, finishes within 2x of it; under load pressure, 5-15% of recent requests late, down to 0.2 of the slack within 2.5x), kv-headroom, meets-deadline, protects-residents (planning on the P90 length), spares-deadlines (its prefill takes at most 30% of the time left of the requests running there, summed) | just-enough (1), prefix-cache (2) | max-score; fallback goodserve-rescue; migrates |
| goodserve-adaptive | as goodserve, but near-best keeps u x half the best slack and finishes within 1 + min(0.75 / u, 2) of the best finish (u = 1 - P50 / P99, the length's uncertainty), meets-deadline's margin is the instance's learned error of its finish estimates (x 1.28, log scale) instead of 5%, and covers-tail prefers instances that still make it on the P99 | just-enough (1), prefix-cache (2) | max-score; fallback goodserve-rescue; migrates |
| goodserve-rescue | usable, model-match, within-reach (planning on the P50 length) | finish-with-residents (1: earliest finish, plus the stall its prefill puts on the requests running there weighed by how close each is to its deadline; under load pressure also the delay the request adds to them), prefix-cache (0.5) | max-score; none left: rejected |
| goodserve-p50 | as goodserve, planning on the P50 length (for experiments) | just-enough (1) | max-score; fallback goodserve-rescue |
| goodserve-nomigrate | same as goodserve | just-enough (1) | max-score; never migrates |
| goodserve-packed | as goodserve keeping no slack (packs onto the slowest instance that makes it) | just-enough (1), prefix-cache (2) | max-score; migrates |

GoodServe plans on the P90 length so that requests that run long still make it,
and among the instances that promise that picks the one with the least spare
slack (just enough). When no instance can promise it, the request goes where it
finishes first (the best chance of success: with an uninformative predictor
GoodServe thus behaves like earliest-finish instead of gambling on slow GPUs);
when recent requests miss their deadlines, the delay it would add to the
requests already on each instance counts too (a fleet short of capacity is
not helped by piling everything onto its fastest GPU). If even there it would
take more than ``hopeless_factor`` x the time left on its P50 length, it cannot
be met and is rejected early (``on_infeasible="reject"``, the default) rather
than spending capacity other requests need. ``on_infeasible="best-effort"``
never rejects.
| fastest-first | usable, model-match | earliest-finish (1) | max-score (load-aware earliest estimated finish) |
| fastest-gpu | usable, model-match, kv-headroom | gpu-speed (1) | max-score (static: fastest GPU with KV room) |
| least-request | usable, model-match | queue (1) | max-score |
| least-kv | usable, model-match | kv-utilization (1) | max-score |
| power-of-two | usable, model-match | queue (1) | power-of-two |
| round-robin | usable, model-match | - | round-robin |
| random | usable, model-match | - | random |
| llm-d | usable, model-match | queue (1), kv-utilization (1), prefix-cache (1) | max-score (llm-d's default scorer weights) |
| prefix-affinity | usable, model-match, prefix-match (>= 50% of the prompt cached) | prefix-cache (1) | max-score; fallback least-request (vLLM router's cache-aware policy) |
| session-affinity | usable, model-match, session-sticky | - | max-score; fallback least-request (sticky per workflow) |
"""

from __future__ import annotations

from typing import Any

from . import plugins as _plugins  # registers the plugins; the pressure band
from .base import Policy, PolicySpec

BASIC = ["usable", "model-match"]

GOODSERVE_CONFIG: dict[str, Any] = {
    "plan_quantile": "p90",
    "on_infeasible": "reject",
    "hopeless_factor": 1.1,
    "keep_slack": 0.5,
    "trust_region": 1.0,
    "margin_rel": 0.05,
    "margin_abs_s": 0.05,
    "kv_limit": 0.98,
    # near-best under load pressure (the share of recent requests that missed their
    # deadline, FleetEstimator.miss_rate): from 5% to 15% missed, keep_slack goes to 0.2 and
    # trust_region to 1.5 (a fleet short of capacity needs every GPU's share)
    "pressure_keep_slack": 0.2,
    "pressure_trust_region": 1.5,
    "pressure_lo": _plugins.PRESSURE_LO,
    "pressure_hi": _plugins.PRESSURE_HI,
    # the rescue under the same pressure: the request's own finish plus 1 x the delay it
    # adds to the requests already on the instance (finish-with-residents)
    "harm_weight": 1.0,
    # ... and at any load the stall its prefill puts on the requests running there, weighed
    # by how close each is to its deadline (finish-with-residents, budget_load)
    "stall_weight": 1.0,
    # spares-deadlines: an instance where the request's prefill would take more than 30% of
    # the time left of the requests running there (summed) is not a candidate
    "stall_limit": 0.3,
}

# goodserve-adaptive (session 4, not the default: see docs/routing.md): slack kept in
# proportion to what is uncertain instead of a fixed share.
ADAPTIVE_CONFIG: dict[str, Any] = {
    **GOODSERVE_CONFIG,
    # near-best: keep u x 0.5 of the best slack and finish within 1 + min(0.75 / u, 2) of
    # the best finish, u = 1 - P50 / P99 the length's uncertainty (0: exact length)
    "slack_by_spread": True,
    "trust_region": 0.75,
    "max_trust_region": 2.0,
    # meets-deadline / covers-tail: finish x exp(1.28 x the instance's learned error of its
    # finish estimates) + 50 ms, instead of a fixed 5%
    "margin_rel": 0.0,
    "error_z": 1.28,
    "cover_tail": True,
    "pressure_keep_slack": None,  # its slack follows the length's uncertainty instead
}

# Settings added after records were first kept: a record without one was decided
# without the rule it turns on, and replays so.
LEGACY_OFF: dict[str, Any] = {
    "error_z": 0.0,
    "slack_by_spread": False,
    "cover_tail": False,
    "pressure_keep_slack": None,
    "harm_weight": 0.0,
    "stall_weight": 0.0,
    "stall_limit": None,
}

GOODSERVE_FILTERS = [
    "near-best",
    "kv-headroom",
    "meets-deadline",
    "protects-residents",
    "spares-deadlines",
]

# Just enough, and among those that are, where the prompt is cached (a cache hit saves
# the prefill compute every other request on that instance would wait for).
GOODSERVE_SCORERS: list[tuple[str, float]] = [("just-enough", 1.0), ("prefix-cache", 2.0)]

SPECS: dict[str, PolicySpec] = {
    s.name: s
    for s in [
        PolicySpec(
            "goodserve",
            [*BASIC, *GOODSERVE_FILTERS],
            GOODSERVE_SCORERS,
            "max-score",
            fallback="goodserve-rescue",
            config=dict(GOODSERVE_CONFIG),
            migrate=True,
        ),
        PolicySpec(
            "goodserve-adaptive",
            [*BASIC, *GOODSERVE_FILTERS, "covers-tail"],
            GOODSERVE_SCORERS,
            "max-score",
            fallback="goodserve-rescue",
            config=dict(ADAPTIVE_CONFIG),
            migrate=True,
        ),
        PolicySpec(
            "goodserve-p50",
            [*BASIC, *GOODSERVE_FILTERS],
            GOODSERVE_SCORERS,
            "max-score",
            fallback="goodserve-rescue",
            config={**GOODSERVE_CONFIG, "plan_quantile": "p50"},
            migrate=True,
        ),
        PolicySpec(
            "goodserve-rescue",
            [*BASIC, "within-reach"],
            [("finish-with-residents", 1.0), ("prefix-cache", 0.5)],
            "max-score",
            fallback=None,
            config={**GOODSERVE_CONFIG, "plan_quantile": "p50"},
            migrate=True,
        ),
        PolicySpec(
            "goodserve-packed",
            [*BASIC, *GOODSERVE_FILTERS],
            GOODSERVE_SCORERS,
            "max-score",
            fallback="goodserve-rescue",
            config={**GOODSERVE_CONFIG, "keep_slack": 0.0, "trust_region": None},
            migrate=True,
        ),
        PolicySpec(
            "goodserve-nomigrate",
            [*BASIC, *GOODSERVE_FILTERS],
            GOODSERVE_SCORERS,
            "max-score",
            fallback="goodserve-rescue",
            config=dict(GOODSERVE_CONFIG),
        ),
        PolicySpec("fastest-first", BASIC, [("earliest-finish", 1.0)], "max-score"),
        PolicySpec(
            "fastest-gpu",
            [*BASIC, "kv-headroom"],
            [("gpu-speed", 1.0)],
            "max-score",
            fallback="least-request",
        ),
        PolicySpec("least-request", BASIC, [("queue", 1.0)], "max-score"),
        PolicySpec("least-kv", BASIC, [("kv-utilization", 1.0)], "max-score"),
        PolicySpec("power-of-two", BASIC, [("queue", 1.0)], "power-of-two"),
        PolicySpec("round-robin", BASIC, [], "round-robin"),
        PolicySpec("random", BASIC, [], "random"),
        PolicySpec(
            "prefix-affinity",
            [*BASIC, "prefix-match"],
            [("prefix-cache", 1.0)],
            "max-score",
            fallback="least-request",
            config={"prefix_threshold": 0.5},
        ),
        PolicySpec(
            "session-affinity",
            [*BASIC, "session-sticky"],
            [],
            "max-score",
            fallback="least-request",
        ),
        PolicySpec(
            "llm-d",
            BASIC,
            [("queue", 1.0), ("kv-utilization", 1.0), ("prefix-cache", 1.0)],
            "max-score",
        ),
    ]
}

BASELINES = [
    "round-robin",
    "random",
    "least-request",
    "least-kv",
    "power-of-two",
    "fastest-first",
    "fastest-gpu",
    "llm-d",
]
LOAD_BALANCERS = ["round-robin", "random", "least-request", "least-kv", "power-of-two"]


def policy_names() -> list[str]:
    return sorted(SPECS)


def make_policy(name: str, overrides: dict[str, Any] | None = None) -> Policy:
    """Instantiate a named policy (and its fallback), with config overrides."""
    if name not in SPECS:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    spec = SPECS[name]
    overrides = dict(overrides or {})
    if overrides:
        spec = PolicySpec(
            spec.name,
            list(spec.filters),
            list(spec.scorers),
            spec.picker,
            spec.fallback,
            {**spec.config, **overrides},
            spec.migrate,
            spec.version,
        )
    fallback_name = spec.fallback
    # settings flow down the fallback chain, except which quantile each level plans on
    down = {k: v for k, v in overrides.items() if k != "plan_quantile"}
    fallback = make_policy(fallback_name, down) if fallback_name else None
    return Policy(spec, fallback=fallback)
