"""``FleetEstimator.assign_slot`` (the router's commit, with ``_batch_state``, ``_slack`` and
``_refresh_load`` inlined) leaves the estimator exactly as the helpers it inlines would:
every per-instance array equal bit for bit after many assignments, heartbeats and
finishes on a loaded fleet.
"""

from __future__ import annotations

import math
import random

import numpy as np
from goodserve.dispatcher.estimator import FleetEstimator, TrackedRequest
from goodserve.schemas import Heartbeat

GPUS = ["H100", "A100", "A40", "L40S", "V100", "H200", "A800", "L4"]


def _reference_assign(est: FleetEstimator, i: int, *a: float | int | str) -> None:
    """The commit as it was before the inlining: the helpers, one call each."""
    request_id = str(a[0])
    input_tokens, planned, deadline, now, p50, p90 = (a[1], a[2], a[3], a[4], a[5], a[6])
    generated, cached, fixed, tpot = int(a[7]), int(a[8]), float(a[9]), float(a[10])
    old = est.requests.get(request_id)
    if old is not None:
        est._forget(old)
    n_in = int(input_tokens)
    pl = float(planned)
    tr = TrackedRequest(
        request_id, i, n_in, pl, float(deadline), float(now), generated, False,
        float(p50), float(p90), cached, float(n_in + (generated if generated > pl else pl)),
        fixed, tpot,
    )
    est.requests[request_id] = tr
    est.infos[i].requests[request_id] = tr
    if tr.deadline <= tr.assigned_at:
        tr.late = True
    elif tr.deadline < math.inf:
        est._dl_add(tr)  # the deadline table (budget_load); the heap of deadlines is no array
    rem = max(pl - generated, 1.0)
    est.n_active[i] = est.n_active.item(i) + 1.0
    est.ctx_tokens[i] = est.ctx_tokens.item(i) + tr.ctx
    est.rem_tokens[i] = est.rem_tokens.item(i) + rem
    new_tokens = max(n_in + generated - cached, 0)
    est.pending_prefill[i] = est.pending_prefill.item(i) + new_tokens
    est.hb_kv_used[i] = est.hb_kv_used.item(i) + (n_in + generated)
    if new_tokens:
        work = est._model_prefill(i, new_tokens, n_in + generated - new_tokens)
        work *= est.prefill_corr.item(i)
        est._set_busy(i, est._busy_now(i, float(now)) + work / est.busy_window_s, float(now))
    state = est._batch_state(i)
    slack = est._slack(tr, i, float(now), state)
    if slack < est.min_slack.item(i):
        est.min_slack[i] = slack
        est.rem_at_min[i] = rem
    est._refresh_load(i, state)


def _arrays(est: FleetEstimator) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in vars(est).items() if isinstance(v, np.ndarray)}


def test_assign_slot_matches_the_helpers_it_inlines() -> None:
    ests = [FleetEstimator(), FleetEstimator()]
    for est in ests:
        for i in range(24):
            est.add_instance(f"i{i}", gpu=GPUS[i % len(GPUS)], max_batch=8 + 4 * (i % 5))
    rng = random.Random(3)
    live: list[str] = []
    for k in range(3000):
        now = k * 0.002
        i = rng.randrange(24)
        n_in = rng.randint(1, 6000)
        args = (
            f"r{k}",
            n_in,
            rng.uniform(1.0, 900.0) if k % 5 else float(rng.randint(1, 900)),
            now + rng.uniform(-1.0, 20.0),
            now,
            rng.uniform(10.0, 500.0),
            rng.uniform(500.0, 900.0),
            rng.choice([0, 0, 0, 7]),
            rng.choice([0, 0, n_in // 2, n_in, n_in + 10]),
            rng.uniform(0.0, 2.0),
            rng.uniform(0.0, 0.1),
        )
        ests[0].assign_slot(i, *args)
        _reference_assign(ests[1], i, *args)
        live.append(f"r{k}")
        if k % 3 == 0 and live:
            rid = live.pop(rng.randrange(len(live)))
            for est in ests:
                est.on_finish(rid, now=now)
        if k % 250 == 0:
            for est in ests:
                for j, info in enumerate(est.infos):
                    est.on_heartbeat(
                        Heartbeat(instance_id=info.instance_id, gpu=info.gpu, model=info.model,
                                  engine="t", at=now, running=int(est.n_active[j]) + j % 3,
                                  max_batch=int(est.max_batch[j])),
                        now=now,
                    )
        if k % 97 == 0:
            a, b = _arrays(ests[0]), _arrays(ests[1])
            assert a.keys() == b.keys()
            for name in a:
                assert np.array_equal(a[name], b[name], equal_nan=True), (k, name)
    a, b = _arrays(ests[0]), _arrays(ests[1])
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name
