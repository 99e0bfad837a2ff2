"""Replayable audit of routing decisions: replay, prediction checks, per-request explanations.

Decision records come from a JSON Lines dump (``goodserve simulate --decisions-out``)
or from the ``decisions`` topic, read from the beginning without a consumer group up
to the end offsets seen at start (so a replay never waits for new traffic).
``replay_decisions`` recomputes every decision with ``goodserve.dispatcher.router.replay``
(estimator rebuilt from the recorded views, policy from its recorded settings and
picker state, the recorded seed) and reports any that choose differently.
``check_predictions`` re-runs the shipped predictor on the recorded features where
the recorded ``predictor_version`` is the shipped one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from goodserve.config import Settings
from goodserve.schemas import Decision, MigrationCommand, decode


@dataclass(slots=True)
class ReplayReport:
    """What a replay found (``mismatches``: decisions that chose differently)."""

    count: int = 0
    identical: int = 0
    without_views: int = 0
    """Decisions recorded without the instances' views (the dispatcher's
    ``decision_views_every``): not replayable, counted apart, not as mismatches."""
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "identical": self.identical,
            "without_views": self.without_views,
            "identical_fraction": (
                self.identical / (self.count - self.without_views)
                if self.count > self.without_views
                else 1.0
            ),
            "mismatches": self.mismatches,
            "errors": self.errors,
            "predictions": self.predictions,
        }


# ---------------------------------------------------------------------------- reading
def read_records_file(path: str | Path) -> list[Any]:
    """Every message of a JSON Lines file (one encoded message per line; blank lines skipped)."""
    out: list[Any] = []
    with Path(path).open("rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(decode(line))
            except Exception as e:
                raise ValueError(f"{path}:{n}: not a GoodServe message: {e}") from e
    return out


def decisions_of(records: Iterable[Any]) -> list[Decision]:
    return [r for r in records if isinstance(r, Decision)]


def migrations_of(records: Iterable[Any]) -> list[MigrationCommand]:
    return [r for r in records if isinstance(r, MigrationCommand)]


async def read_topic(settings: Settings, topic: str, *, timeout_s: float = 30.0) -> list[Any]:
    """All decodable records of ``topic`` from the beginning to its end offsets at start.

    No consumer group (nothing committed, no rebalance); undecodable records are skipped
    (they are already the dead-letter topic's business).
    """
    import asyncio

    from aiokafka import AIOKafkaConsumer

    from goodserve.transport.kafka import kafka_client_kwargs, kafka_errors

    kw = kafka_client_kwargs(settings, role="consumer", client_id=f"{settings.client_id}-audit")
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **kw)
    out: list[Any] = []
    with kafka_errors(f"read {topic}"):
        await consumer.start()
    try:
        with kafka_errors("metadata"):
            if topic not in await consumer.topics():
                return out
        consumer.subscribe([topic])  # without a group: every partition is assigned to us
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not consumer.assignment():
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic}: no partitions assigned in {timeout_s}s")
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        with kafka_errors(f"end offsets of {topic}"):
            end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > 0}
        while todo and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset < end[tp] and rec.value is not None:
                        try:
                            out.append(decode(rec.value))
                        except Exception:
                            pass
            for tp in list(todo):
                if await consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
        if todo:
            raise TimeoutError(f"reading {topic}: end offsets not reached in {timeout_s}s")
    finally:
        await consumer.stop()
    return out


async def read_audit_topics(settings: Settings) -> tuple[list[Decision], list[MigrationCommand]]:
    """The decisions and migrations topics of ``settings``' prefix."""
    decisions = decisions_of(await read_topic(settings, settings.decisions_topic))
    migrations = migrations_of(await read_topic(settings, settings.migrations_topic))
    return decisions, migrations


# ---------------------------------------------------------------------------- replay
def replay_decisions(decisions: Sequence[Decision], *, check_preds: bool = True) -> ReplayReport:
    """Recompute every decision; a mismatch is a different chosen instance (or an error)."""
    from goodserve.dispatcher.router import NotReplayable, replay

    rep = ReplayReport()
    for d in decisions:
        rep.count += 1
        try:
            chosen, _ = replay(d)
        except NotReplayable:
            rep.without_views += 1
            continue
        except Exception as e:
            rep.errors.append({"decision_id": d.decision_id, "request_id": d.request_id,
                               "error": f"{type(e).__name__}: {e}"})
            rep.mismatches.append({"decision_id": d.decision_id, "request_id": d.request_id,
                                   "recorded": d.chosen, "replayed": None, "error": str(e)})
            continue
        if chosen == d.chosen:
            rep.identical += 1
        else:
            rep.mismatches.append({"decision_id": d.decision_id, "request_id": d.request_id,
                                   "recorded": d.chosen, "replayed": chosen})
    if check_preds:
        rep.predictions = check_predictions(decisions)
    return rep


def shipped_predictors() -> dict[str, Any]:
    """The predictors that ship with GoodServe, by version (those a replay can re-run)."""
    from goodserve.dispatcher.predictor.model import OutputLengthPredictor, TaskMedianPredictor

    def encoder_tier() -> OutputLengthPredictor:  # replay scores features: no encoder needed
        return OutputLengthPredictor.encoder_tier(lazy_encoder=True)

    out: dict[str, Any] = {}
    for make in (OutputLengthPredictor.default, encoder_tier, TaskMedianPredictor.default):
        try:
            p = make()
        except Exception:
            continue
        out[p.version] = p
    return out


def recompute_prediction(d: Decision, predictor: Any) -> tuple[float, float]:
    """(P50, P90) of the model on the recorded features, moved by the recorded online
    location shift (``p50_shift``), the request's hint blended in.

    The P90/P99's own online shift is process state that is not recorded, so a recorded
    P90 can differ from this by it; the P50 must match exactly.
    """
    from goodserve.dispatcher.predictor.model import _apply_hint, shift_prediction

    raw = predictor.predict_features([d.features])[0]
    raw = shift_prediction(raw, float(d.config.get("p50_shift", 0.0)), 0.0)
    weight = float(getattr(predictor, "hint_weight", 1.0))
    pred = _apply_hint(raw, d.request.output_tokens_hint, weight)
    return float(pred.p50), float(pred.p90)


def check_predictions(decisions: Sequence[Decision],
                      predictors: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare recorded P50/P90 with the shipped predictor where versions match."""
    predictors = shipped_predictors() if predictors is None else predictors
    checked = p50_mismatch = p90_shifted = skipped = 0
    mismatches: list[dict[str, Any]] = []
    versions: dict[str, int] = {}
    for d in decisions:
        versions[d.predictor_version] = versions.get(d.predictor_version, 0) + 1
        p = predictors.get(d.predictor_version)
        if p is None or not d.features:
            skipped += 1
            continue
        checked += 1
        try:
            p50, p90 = recompute_prediction(d, p)
        except Exception as e:
            p50_mismatch += 1
            mismatches.append({"decision_id": d.decision_id, "request_id": d.request_id,
                               "error": f"{type(e).__name__}: {e}"})
            continue
        if p50 != d.predicted_output_p50:
            p50_mismatch += 1
            mismatches.append({"decision_id": d.decision_id, "request_id": d.request_id,
                               "recorded_p50": d.predicted_output_p50, "recomputed_p50": p50,
                               "recorded_p90": d.predicted_output_p90, "recomputed_p90": p90})
        elif p90 != d.predicted_output_p90:
            p90_shifted += 1
    return {
        "checked": checked,
        "skipped": skipped,
        "versions": versions,
        "p50_identical": checked - p50_mismatch,
        "p50_mismatches": mismatches,
        "p90_recalibrated": p90_shifted,
        "note": "P90 may differ from the pure model by the online recalibration shift "
                "(process state not recorded); P50 must match exactly",
    }


# ---------------------------------------------------------------------------- explain
def _finite(x: float) -> float | None:
    return x if math.isfinite(x) and abs(x) < 1e17 else None


def explain(request_id: str, decisions: Sequence[Decision],
            migrations: Sequence[MigrationCommand] = ()) -> dict[str, Any]:
    """Why ``request_id`` went where it went: every decision about it and its migrations."""
    from goodserve.dispatcher.router import replay

    mine = sorted((d for d in decisions if d.request_id == request_id), key=lambda d: d.at)
    moves = sorted((m for m in migrations if m.request_id == request_id), key=lambda m: m.at)
    if not mine and not moves:
        raise KeyError(f"no decision or migration recorded for request {request_id!r}")
    preds = shipped_predictors() if mine else {}
    out_decisions = []
    for d in mine:
        try:
            replayed: str | None = replay(d)[0]
            replay_ok = replayed == d.chosen
        except Exception as e:
            replayed, replay_ok = f"error: {e}", False
        cands = sorted(d.candidates, key=lambda c: (not c.eligible, -c.score))
        entry: dict[str, Any] = {
            "decision_id": d.decision_id,
            "at": d.at,
            "deadline": d.deadline,
            "deadline_in_s": d.deadline - d.at,
            "outcome": d.outcome,
            "chosen": d.chosen,
            "reason": d.reason,
            "policy": d.policy,
            "policy_version": d.policy_version,
            "config": dict(d.config),
            "seed": d.seed,
            "predictor_version": d.predictor_version,
            "input_tokens": d.input_tokens,
            "predicted_output_p50": d.predicted_output_p50,
            "predicted_output_p90": d.predicted_output_p90,
            "planned_output_tokens": d.planned_output_tokens,
            "request": {"task": d.request.task, "model": d.request.model,
                        "workflow_id": d.request.workflow_id, "step": d.request.step,
                        "max_tokens": d.request.max_tokens, "priority": d.request.priority,
                        "output_tokens_hint": d.request.output_tokens_hint},
            "candidates": [
                {"instance_id": c.instance_id, "gpu": c.gpu, "eligible": c.eligible,
                 "est_queue_s": c.est_queue_s, "est_prefill_s": c.est_prefill_s,
                 "est_tpot_s": c.est_tpot_s, "est_finish_s": c.est_finish_s,
                 "slack_s": _finite(c.slack_s), "score": _finite(c.score),
                 "cached_tokens": c.cached_tokens, "chosen": c.instance_id == d.chosen}
                for c in cands
            ],
            "replayed_choice": replayed,
            "replay_identical": replay_ok,
        }
        p = preds.get(d.predictor_version)
        if p is not None and d.features:
            p50, p90 = recompute_prediction(d, p)
            entry["prediction_check"] = {"recomputed_p50": p50, "recomputed_p90": p90,
                                         "p50_identical": p50 == d.predicted_output_p50}
        out_decisions.append(entry)
    return {
        "request_id": request_id,
        "decisions": out_decisions,
        "migrations": [msgspec.to_builtins(m) for m in moves],
    }


def format_explanation(ex: dict[str, Any]) -> str:
    """Plain text for a terminal."""
    from goodserve.commands._common import table

    lines = [f"request {ex['request_id']}"]
    for d in ex["decisions"]:
        lines.append("")
        lines.append(f"decision {d['decision_id']} at {d['at']:.3f}: {d['outcome']} -> "
                     f"{d['chosen'] or '-'} ({d['reason']})")
        cfg = ", ".join(f"{k}={v}" for k, v in sorted(d["config"].items()))
        lines.append(f"  policy {d['policy']} ({d['policy_version']}) seed {d['seed']}: {cfg}")
        lines.append(f"  predictor {d['predictor_version']}: P50 {d['predicted_output_p50']:.1f}"
                     f" P90 {d['predicted_output_p90']:.1f} planned "
                     f"{d['planned_output_tokens']:.1f} tokens; input {d['input_tokens']} tokens")
        if "prediction_check" in d:
            pc = d["prediction_check"]
            lines.append(f"  prediction re-run: P50 {pc['recomputed_p50']:.1f} "
                         f"({'identical' if pc['p50_identical'] else 'DIFFERENT'}), "
                         f"P90 {pc['recomputed_p90']:.1f}")
        lines.append(f"  deadline in {d['deadline_in_s']:.3f}s; replay -> {d['replayed_choice']}"
                     f" ({'identical' if d['replay_identical'] else 'MISMATCH'})")
        rows = [{**c, "chosen": "*" if c["chosen"] else ""} for c in d["candidates"]]
        lines.append(table(rows, ["chosen", "instance_id", "gpu", "eligible", "est_queue_s",
                                  "est_prefill_s", "est_tpot_s", "est_finish_s", "slack_s",
                                  "score"]))
    for m in ex["migrations"]:
        lines.append(f"migration {m['migration_id'][:12]} at {m['at']:.3f}: {m['source']} -> "
                     f"{m['target']} risk {m['risk']:.3f} ({m['reason']})")
    return "\n".join(lines)
