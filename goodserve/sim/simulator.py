"""Discrete-event simulation of a fleet in virtual time, routed by the live policy code.

Events: request arrivals (and, for agent workflows, the release of a step when the
previous step has finished plus its think time), engine iterations of each
simulated instance, periodic heartbeats (the estimator learns only from heartbeats
and results, as the live dispatcher does) and periodic risk-monitor rounds that may
migrate requests. The router, estimator, policies and monitor are the very objects
the live services use.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.dispatcher.policies.registry import make_policy
from goodserve.dispatcher.predictor.model import PredictorInput
from goodserve.dispatcher.router import Router
from goodserve.monitor.risk import MonitorConfig, RiskMonitor
from goodserve.perf.latency import PerfModel
from goodserve.schemas import AgentRequest, Decision, Heartbeat, RequestProgress
from goodserve.sim.fleet import Fleet
from goodserve.sim.instance import SimInstance, SimRequest
from goodserve.sim.kvcache import block_hashes_for_key
from goodserve.sim.oracle import OraclePredictor
from goodserve.sim.trace import TraceRow

ARRIVE, STEP, HEARTBEAT, MONITOR, SLOWDOWN = 0, 1, 2, 3, 4
MAX_TOKENS_CAP = 8192


@dataclass(slots=True)
class SimConfig:
    policy: str = "goodserve"
    predictor: str = "xgb"
    """'xgb' (shipped model), 'task-median', 'oracle', or 'noisy:<relative error>'."""
    slo_scale: float | None = None
    """Deadline = scale x T_ref (alone on the fleet's fastest GPU) for rows without slo_s."""
    default_slo_s: float = 30.0
    heartbeat_period_s: float = 0.1
    migrate: bool | None = None
    """None: as the policy says (goodserve migrates, goodserve-nomigrate does not)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = 0
    closed_loop: bool = True
    """Release workflow steps when the previous step finishes (plus its think time)."""
    record_decisions: bool = False
    decision_views_every: int = 1
    """With ``record_decisions``: one decision in this many records every instance's view
    (``Router.views_every``), as the dispatcher's setting of the same name."""
    max_batch: int = 256
    slowdowns: list[tuple[float, str, float]] = field(default_factory=list)
    """(time_s, instance_id, speed_factor) events: e.g. an instance degrading mid-run."""
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    hint_error: float | None = None
    """Give each request a client hint of its output length, off by this relative error
    (log-normal); None: no hints. Agents that know roughly what they ask for send one."""
    keep_requests: bool = False
    """Add per-request rows (``per_request``) and ``load_over_time`` to the report."""


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    row: TraceRow
    arrival: float
    deadline: float
    instance: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    migrations: int = 0
    cached_tokens: int = 0
    predicted_p50: float = 0.0
    predicted_p90: float = 0.0
    rejected: bool = False

    @property
    def met(self) -> bool:
        return self.finished_at is not None and self.finished_at <= self.deadline + 1e-9


class Simulator:
    """Runs one trace through one fleet with one policy."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        trace: list[TraceRow],
        config: SimConfig | None = None,
        predictor: Any = None,
    ) -> None:
        self.cfg = config or SimConfig()
        self.fleet = fleet
        self.rows = sorted(trace, key=lambda r: r.arrival_s)
        self.ids = [r.request_id or f"r{i}" for i, r in enumerate(self.rows)]
        self.instances: list[SimInstance] = []
        self.est = FleetEstimator()
        for inst in fleet.instances:
            model = fleet.model_of(inst)
            si = SimInstance(
                instance_id=inst.id,
                gpu=inst.gpu,
                model=model,
                max_batch=inst.max_batch or self.cfg.max_batch,
                speed_factor=inst.speed_factor,
            )
            self.instances.append(si)
            self.est.add_instance(
                inst.id,
                gpu=inst.gpu,
                model=model,
                max_batch=si.max_batch,
                now=0.0,
                alive=True,
                perf=si.perf,
            )
        self.by_id = {si.instance_id: k for k, si in enumerate(self.instances)}
        self.predictor = predictor if predictor is not None else self._make_predictor()
        policy = make_policy(self.cfg.policy, self.cfg.policy_overrides or None)
        self.router = Router(
            estimator=self.est,
            predictor=self.predictor,
            policy=policy,
            seed=self.cfg.seed,
            default_slo_s=self.cfg.default_slo_s,
            record_views=self.cfg.record_decisions,
            views_every=self.cfg.decision_views_every,
        )
        migrate = policy.migrate if self.cfg.migrate is None else self.cfg.migrate
        self.monitor = RiskMonitor(self.cfg.monitor) if migrate else None
        fastest = max(self.instances, key=lambda s: 1.0 / s.perf.decode_step_time(1, 512))
        self.ref_perf: PerfModel = fastest.perf
        self.records: dict[str, RequestRecord] = {}
        self.decisions: list[Decision] = []
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.pending: list[Any] = [None] * len(self.instances)
        self.busy = [False] * len(self.instances)
        self.migrations = 0
        self.rejected = 0
        self.load_samples: list[tuple[float, list[int]]] = []
        # workflows: next step rows, released on finish
        self.next_step: dict[str, int] = {}
        self.row_index = {rid: k for k, rid in enumerate(self.ids)}

    # ------------------------------------------------------------------ setup
    def _make_predictor(self) -> Any:
        name = self.cfg.predictor
        truth = {rid: r.output_tokens for rid, r in zip(self.ids, self.rows, strict=True)}
        if name == "oracle":
            return OraclePredictor(truth)
        if name.startswith("noisy:"):
            return OraclePredictor(truth, error=float(name.split(":", 1)[1]), seed=self.cfg.seed)
        from goodserve.dispatcher.predictor import model as pm

        if name == "task-median":
            return pm.TaskMedianPredictor.default()
        if name == "xgb":
            return pm.OutputLengthPredictor.default()
        if name == "xgb-encoder":
            p = pm.OutputLengthPredictor.encoder_tier()
            # embed the trace's prompts in batches now, not one by one as they arrive
            p.prepare([PredictorInput(input_tokens=0, prompt=r.prompt) for r in self.rows])
            return p
        raise ValueError(f"unknown predictor {name!r}: xgb, xgb-encoder, task-median, "
                         f"oracle or noisy:<error>")

    def _noise(self, rid: str, error: float) -> float:
        """Log-normal factor of relative size ``error``, repeatable per (seed, request)."""
        import hashlib
        import random

        h = hashlib.blake2b(f"hint:{self.cfg.seed}:{rid}".encode(), digest_size=8).digest()
        z = random.Random(int.from_bytes(h, "little")).gauss(0.0, 1.0)
        return math.exp(z * math.log1p(error)) if error > 0 else 1.0

    def push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def slo_of(self, row: TraceRow) -> float:
        if row.slo_s is not None:
            return row.slo_s
        if self.cfg.slo_scale is not None:
            return self.cfg.slo_scale * self.ref_perf.isolated_latency(
                row.input_tokens, row.output_tokens
            )
        return self.cfg.default_slo_s

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        wall0 = time.perf_counter()
        wf_rows: dict[str, list[int]] = {}
        for k, row in enumerate(self.rows):
            if self.cfg.closed_loop and row.workflow_id is not None:
                wf_rows.setdefault(row.workflow_id, []).append(k)
            else:
                self.push(row.arrival_s, ARRIVE, k)
        self.wf_steps = {
            w: sorted(ks, key=lambda k: self.rows[k].step) for w, ks in wf_rows.items()
        }
        self.wf_start: dict[str, float] = {}
        for w, ks in self.wf_steps.items():
            self.push(self.rows[ks[0]].arrival_s, ARRIVE, ks[0])
            self.next_step[w] = 1
        for t, iid, factor in self.cfg.slowdowns:
            self.push(t, SLOWDOWN, (iid, factor))
        if self.rows:
            self.push(self.rows[0].arrival_s, HEARTBEAT, None)
            if self.monitor is not None:
                self.push(self.rows[0].arrival_s + self.cfg.monitor.period_s, MONITOR, None)
        total = len(self.rows)
        done = 0
        next_report = 0.0
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if kind == ARRIVE:
                self._arrive(payload, t)
            elif kind == STEP:
                done += self._step_end(payload, t)
                if progress and time.perf_counter() >= next_report:
                    progress(done, total)
                    next_report = time.perf_counter() + 0.2
            elif kind == HEARTBEAT:
                self._heartbeats(t)
                if done + self.rejected < total:
                    self.push(t + self.cfg.heartbeat_period_s, HEARTBEAT, None)
            elif kind == MONITOR:
                self._monitor(t)
                if done + self.rejected < total:
                    self.push(t + self.cfg.monitor.period_s, MONITOR, None)
            elif kind == SLOWDOWN:
                iid, factor = payload
                self.instances[self.by_id[iid]].speed_factor = factor
        if progress:
            progress(done, total)
        return self.report(time.perf_counter() - wall0)

    def _arrive(self, k: int | tuple[str, int, SimRequest], t: float) -> None:
        if isinstance(k, tuple):  # a migrated request lands on its target
            _, dst, sreq = k
            self._submit(dst, sreq, t)
            return
        row = self.rows[k]
        rid = self.ids[k]
        wf = row.workflow_id
        if wf is not None:
            self.wf_start.setdefault(wf, t)
        wf_deadline = None
        if wf is not None and row.workflow_deadline_s is not None:
            wf_deadline = self.wf_start[wf] + row.workflow_deadline_s
        own = row.slo_s is not None or self.cfg.slo_scale is not None or wf_deadline is None
        hint = None
        if self.cfg.hint_error is not None:
            hint = max(1, round(row.output_tokens * self._noise(rid, self.cfg.hint_error)))
        req = AgentRequest(
            request_id=rid,
            model=row.model or "default",
            task=row.task,
            workflow_id=wf,
            step=row.step,
            prompt=row.prompt,
            input_tokens=row.input_tokens,
            max_tokens=max(MAX_TOKENS_CAP, row.output_tokens),
            arrival=t,
            deadline=t + self.slo_of(row) if own else None,
            workflow_deadline=wf_deadline,
            output_tokens_hint=hint,
        )
        x = PredictorInput.from_request(req, row.input_tokens)
        hashes = self._block_hashes(row)
        out = self.router.route(req, t, predictor_input=x, block_hashes=hashes)
        rec = RequestRecord(rid, row, t, out.deadline)
        self.records[rid] = rec
        rec.predicted_p50, rec.predicted_p90 = out.p50, out.p90
        if self.cfg.record_decisions:
            self.decisions.append(out.record())
        if out.instance_id is None:
            rec.rejected = True
            self.rejected += 1
            self._release_next(row, t)
            return
        rec.instance = out.instance_id
        sreq = SimRequest(
            request_id=rid,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            max_tokens=req.max_tokens,
            arrival=t,
            deadline=out.deadline,
            block_hashes=hashes,
            tag=x,
        )
        self._submit(self.by_id[out.instance_id], sreq, t)

    def _block_hashes(self, row: TraceRow) -> list[int] | None:
        """Prefix-cache keys: a workflow's steps extend one context stream (see docs/traces.md).

        The live dispatcher's keys for a request known by workflow id and token count
        (``block_hashes_for_key``): stable across processes, so runs are reproducible.
        """
        if row.workflow_id is None:
            return None
        bs = self.instances[0].block_size
        return block_hashes_for_key(row.workflow_id, row.input_tokens, bs)

    def _submit(self, k: int, sreq: SimRequest, t: float) -> None:
        self.instances[k].submit(sreq, t)
        if not self.busy[k]:
            self._start_step(k, t)

    def _start_step(self, k: int, t: float) -> None:
        inst = self.instances[k]
        if not inst.has_work():
            self.busy[k] = False
            return
        res = inst.step(t)
        self.pending[k] = res
        self.busy[k] = True
        self.push(t + max(res.duration, 1e-6), STEP, k)

    def _step_end(self, k: int, t: float) -> int:
        res = self.pending[k]
        self.pending[k] = None
        done = 0
        iid = self.instances[k].instance_id
        for r in res.first_tokens:
            rec = self.records.get(r.request_id)
            if rec is not None and rec.instance == iid and rec.first_token_at is None:
                rec.first_token_at = r.first_token_at
        for r in res.finished:
            rec = self.records.get(r.request_id)
            if rec is None or rec.instance != iid or rec.finished_at is not None:
                continue
            rec.finished_at = r.finished_at
            rec.cached_tokens = r.cached_tokens
            done += 1
            ftt = rec.first_token_at or rec.finished_at
            self.est.on_first_token(r.request_id, now=t)
            self.est.on_finish(
                r.request_id,
                now=t,
                output_tokens=r.generated,
                decode_s=(rec.finished_at - ftt) if rec.migrations == 0 else None,
            )
            observe = getattr(self.predictor, "observe", None)
            if observe is not None and r.tag is not None:
                observe(r.tag, r.generated)
            row = rec.row
            if row.workflow_id is not None:
                steps = self.wf_steps.get(row.workflow_id, [])
                self.router.workflows.on_call_done(
                    workflow_id=row.workflow_id,
                    task=row.task,
                    step=row.step,
                    started=rec.arrival,
                    finished=t,
                    last_step=bool(steps) and self.row_index[r.request_id] == steps[-1],
                )
            self._release_next(rec.row, t)
        self._start_step(k, t)
        return done

    def _release_next(self, row: TraceRow, t: float) -> None:
        wf = row.workflow_id
        if not self.cfg.closed_loop or wf is None or wf not in self.wf_steps:
            return
        nxt = self.next_step.get(wf, 0)
        steps = self.wf_steps[wf]
        if nxt < len(steps):
            self.next_step[wf] = nxt + 1
            k = steps[nxt]
            self.push(t + self.rows[k].think_s, ARRIVE, k)

    def _heartbeats(self, t: float) -> None:
        for inst in self.instances:
            st = inst.status()
            reqs = [
                RequestProgress(
                    request_id=r.request_id,
                    state="running" if r.first_token_at is not None else "waiting",
                    generated=r.generated,
                    input_tokens=r.input_tokens,
                    deadline=r.deadline if math.isfinite(r.deadline) else 0.0,
                )
                for r in inst.requests()
            ]
            hb = Heartbeat(
                instance_id=inst.instance_id,
                gpu=inst.gpu,
                model=inst.model,
                engine="sim",
                at=t,
                running=st.running,
                waiting=st.waiting,
                max_batch=st.max_batch,
                kv_used_blocks=st.kv_used_blocks,
                kv_total_blocks=st.kv_total_blocks,
                kv_block_size=st.block_size,
                step_time_s=st.step_time_s,
                tpot_s=st.tpot_s,
                prefill_tokens_per_s=st.prefill_tokens_per_s,
                requests=reqs,
            )
            self.router.on_heartbeat(hb, now=t)
        if len(self.load_samples) < 2000:
            self.load_samples.append((t, [len(i.requests()) for i in self.instances]))

    def _monitor(self, t: float) -> None:
        assert self.monitor is not None
        for plan in self.monitor.plan(self.est, t):
            src = self.by_id[plan.source]
            dst = self.by_id[plan.target]
            sreq = self.instances[src].checkpoint(plan.request_id)
            if sreq is None:
                continue
            rec = self.records[plan.request_id]
            self.monitor.record(plan)
            self.migrations += 1
            rec.migrations += 1
            rec.instance = plan.target
            # the monitor plans tracked requests only, on known instances: always moved
            self.est.move(
                plan.request_id,
                plan.target,
                now=t,
                remaining_tokens=plan.remaining_tokens,
                generated=sreq.generated,
                input_tokens=sreq.input_tokens,
            )
            # the pause of checkpoint -> Kafka -> resume before the target can take it
            self.push_submit(dst, sreq, t + self.cfg.monitor.overhead_s)

    def push_submit(self, k: int, sreq: SimRequest, t: float) -> None:
        """Submit after a delay (migration pause), as an arrival-like event."""
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, ARRIVE, ("resume", k, sreq)))

    # ------------------------------------------------------------------ results
    def report(self, wall_s: float) -> dict[str, Any]:
        recs = list(self.records.values())
        n = len(self.rows)
        met = sum(1 for r in recs if r.met)
        lat = np.array([r.finished_at - r.arrival for r in recs if r.finished_at is not None])
        first = min((r.arrival for r in recs), default=0.0)
        last = max((r.finished_at or r.arrival for r in recs), default=0.0)
        span = max(last - first, 1e-9)
        per_inst: dict[str, dict[str, float]] = {}
        for inst in self.instances:
            mine = [r for r in recs if r.instance == inst.instance_id]
            per_inst[inst.instance_id] = {
                "gpu": inst.gpu,  # type: ignore[dict-item]
                "requests": len(mine),
                "met": sum(1 for r in mine if r.met),
                "tokens": int(sum(r.row.output_tokens for r in mine)),
            }
        hit = sum(i.status().prefix_hit_tokens for i in self.instances)
        query = sum(i.status().prefix_query_tokens for i in self.instances)
        wfs: dict[str, list[RequestRecord]] = {}
        for r in recs:
            if r.row.workflow_id is not None:
                wfs.setdefault(r.row.workflow_id, []).append(r)
        wf_met = 0
        for w, rs in wfs.items():
            start = self.wf_start.get(w, min(r.arrival for r in rs))
            budget = rs[0].row.workflow_deadline_s
            done = all(r.finished_at is not None for r in rs) and len(rs) == len(
                self.wf_steps.get(w, rs)
            )
            end = max((r.finished_at or math.inf) for r in rs)
            if budget is not None:
                ok = done and end - start <= budget
            else:
                ok = done and all(r.met for r in rs)
            wf_met += ok
        return {
            "policy": self.cfg.policy,
            "predictor": getattr(self.predictor, "version", "?"),
            "requests": n,
            "met_slo": met,
            "slo_attainment": met / n if n else 0.0,
            "goodput_rps": met / span,
            "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
            "latency_p99_s": float(np.percentile(lat, 99)) if len(lat) else None,
            "migrations": self.migrations,
            "rejected": self.rejected,
            "completed": len(lat),
            "prefix_hit_rate": hit / query if query else 0.0,
            "workflows": len(wfs),
            "workflow_attainment": wf_met / len(wfs) if wfs else None,
            "slo_scale": self.cfg.slo_scale,
            "per_instance": per_inst,
            "sim_seconds": span,
            "wall_s": wall_s,
            **(self._request_details(recs) if self.cfg.keep_requests else {}),
        }

    def _request_details(self, recs: list[RequestRecord]) -> dict[str, Any]:
        """Per-request rows and sampled per-instance load, for reports (CDFs, plots)."""
        rows = [
            {
                "request_id": r.request_id,
                "arrival": r.arrival,
                "deadline": r.deadline,
                "finish": r.finished_at,
                "instance": r.instance,
                "predicted_p50": r.predicted_p50,
                "predicted_p90": r.predicted_p90,
                "output_tokens": r.row.output_tokens,
                "task": r.row.task,
                "migrations": r.migrations,
                "met": r.met,
            }
            for r in recs
        ]
        load = {
            "instances": [i.instance_id for i in self.instances],
            "t": [t for t, _ in self.load_samples],
            "load": [n for _, n in self.load_samples],
        }
        return {"per_request": rows, "load_over_time": load}


def simulate(
    fleet: Fleet,
    trace: list[TraceRow],
    config: SimConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    return Simulator(fleet=fleet, trace=trace, config=config).run(progress)


def slo_scale_for(
    fleet: Fleet,
    trace: list[TraceRow],
    config: SimConfig,
    target: float,
    lo: float = 1.0,
    hi: float = 64.0,
    iters: int = 14,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Smallest SLO scale at which ``target`` of requests meet their deadline (bisection)."""
    import dataclasses

    def att(scale: float) -> float:
        cfg = dataclasses.replace(config, slo_scale=scale)
        a = float(Simulator(fleet=fleet, trace=trace, config=cfg).run()["slo_attainment"])
        if progress:
            progress(f"scale {scale:.3f}: attainment {a:.4f}")
        return a

    if att(hi) < target:
        return {"slo_scale": None, "target": target, "reason": f"not reached at scale {hi}"}
    if att(lo) >= target:
        return {"slo_scale": lo, "target": target}
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if att(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1.01:
            break
    return {"slo_scale": hi, "target": target, "policy": config.policy}
