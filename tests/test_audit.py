"""Audit: recorded decisions replay bit for bit through the wire format; tampering is caught."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from goodserve.schemas import Decision, MigrationCommand, decode, encode

from goodserve.audit import check_predictions, explain, read_audit_topics, replay_decisions
from goodserve.cli import build_parser
from goodserve.config import Settings
from goodserve.sim.fleet import load_fleet
from goodserve.sim.simulator import SimConfig, Simulator
from goodserve.sim.trace import TraceRow
from goodserve.transport import TypedProducer, ensure_topics


def _trace(n: int = 120, rps: float = 15.0) -> list[TraceRow]:
    rows = []
    for i in range(n):
        out = 100 + (i * 37) % 400
        rows.append(msgspec.convert({"arrival_s": i / rps, "input_tokens": 100,
                                     "output_tokens": out, "slo_s": 6.0,
                                     "request_id": f"q{i:04d}"}, TraceRow))
    return rows


@pytest.fixture(scope="module")
def recorded() -> list[Decision]:
    """Decisions of a goodserve and a least-request run, passed through the JSON wire format."""
    out: list[Decision] = []
    for policy in ("goodserve", "least-request"):
        sim = Simulator(fleet=load_fleet("figure2"), trace=_trace(),
                        config=SimConfig(policy=policy, record_decisions=True))
        sim.run()
        out += [decode(encode(d)) for d in sim.decisions]
    return out


def main(argv: list[str]) -> int:
    """The CLI without its logging set-up (which would bind to pytest's captured stderr)."""
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


def _write(path: Path, msgs: list[object]) -> Path:
    path.write_bytes(b"".join(encode(m) + b"\n" for m in msgs))  # type: ignore[arg-type]
    return path


def test_replay_of_recorded_run_is_identical(recorded: list[Decision]) -> None:
    rep = replay_decisions(recorded)
    assert rep.count == len(recorded) == 240
    assert rep.identical == rep.count, rep.mismatches[:3]
    assert not rep.mismatches and not rep.errors
    preds = rep.predictions
    assert preds["checked"] == rep.count  # the shipped xgb predictor re-runs on every record
    assert preds["p50_identical"] == preds["checked"]
    assert not preds["p50_mismatches"]
    # the online location shift moved some P50s: the audit recomputes them from the record
    assert sum("p50_shift" in d.config for d in recorded) > 50


def test_tampered_records_are_reported(recorded: list[Decision]) -> None:
    recs = list(recorded[:40])
    k = next(i for i, d in enumerate(recs) if d.chosen is not None and len(d.instances) > 1)
    other = next(v.instance_id for v in recs[k].instances if v.instance_id != recs[k].chosen)
    recs[k] = msgspec.structs.replace(recs[k], chosen=other)
    feats = list(recs[k + 1].features)
    feats[0] += 500.0  # prompt length feature: a different prediction
    recs[k + 1] = msgspec.structs.replace(recs[k + 1], features=feats)
    rep = replay_decisions(recs)
    assert [m["decision_id"] for m in rep.mismatches] == [recs[k].decision_id]
    assert rep.mismatches[0]["recorded"] == other
    assert rep.identical == len(recs) - 1
    bad = rep.predictions["p50_mismatches"]
    assert [m["decision_id"] for m in bad] == [recs[k + 1].decision_id]


def test_unknown_predictor_version_is_skipped(recorded: list[Decision]) -> None:
    recs = [msgspec.structs.replace(d, predictor_version="someone-else") for d in recorded[:5]]
    res = check_predictions(recs)
    assert res["checked"] == 0 and res["skipped"] == 5


def test_explain_lists_candidates_policy_prediction_and_migrations(
    recorded: list[Decision],
) -> None:
    d = recorded[10]
    mig = MigrationCommand(migration_id="m1", request_id=d.request_id, source=d.chosen or "a",
                           target="h800-0", at=d.at + 1.0, reason="risk 0.8 > 0.5", risk=0.8)
    ex = explain(d.request_id, [d], [mig])
    (e,) = ex["decisions"]
    assert e["chosen"] == d.chosen and e["replay_identical"]
    assert e["policy"] == "goodserve" and "plan_quantile" in e["config"]
    assert e["predicted_output_p90"] >= e["predicted_output_p50"] > 0
    assert e["prediction_check"]["p50_identical"]
    assert {c["instance_id"] for c in e["candidates"]} == {v.instance_id for v in d.instances}
    assert sum(c["chosen"] for c in e["candidates"]) == 1
    assert ex["migrations"][0]["reason"] == "risk 0.8 > 0.5"
    with pytest.raises(KeyError):
        explain("nope", [d])


def test_cli_replay_and_explain(recorded: list[Decision], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path / "d.jsonl", list(recorded))
    assert main(["audit", "replay", "--file", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == out["identical"] == len(recorded)
    bad = list(recorded[:5])
    bad[2] = msgspec.structs.replace(bad[2], chosen="nowhere")
    g = _write(tmp_path / "bad.jsonl", bad)
    assert main(["audit", "replay", "--file", str(g)]) == 1
    text = capsys.readouterr().out
    assert "mismatches: 1" in text and bad[2].decision_id in text
    rid = recorded[3].request_id
    assert main(["audit", "explain", rid, "--file", str(f)]) == 0
    text = capsys.readouterr().out
    assert rid in text and "est_finish_s" in text and "replay ->" in text


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_replay_from_the_decisions_topic(
    kafka_settings: Settings, recorded: list[Decision], capsys: pytest.CaptureFixture[str]
) -> None:
    s = kafka_settings
    await ensure_topics(s)
    some = recorded[:30]
    mig = MigrationCommand(migration_id="m9", request_id=some[0].request_id, source="a40-0",
                           target="h800-0", at=some[0].at + 0.5, reason="at risk", risk=0.7)
    async with TypedProducer(settings=s) as prod:
        for d in some:
            await prod.send(s.decisions_topic, d, key=d.request_id)
        await prod.send(s.migrations_topic, mig, key=mig.request_id)
    decisions, migrations = await read_audit_topics(s)
    assert sorted(d.decision_id for d in decisions) == sorted(d.decision_id for d in some)
    assert [m.migration_id for m in migrations] == ["m9"]
    rep = replay_decisions(decisions)
    assert rep.identical == len(some)
    ex = explain(some[0].request_id, decisions, migrations)
    assert ex["migrations"][0]["target"] == "h800-0"


@pytest.mark.parametrize("overrides", [{"trust_region": None}, {"trust_region": float("inf")}])
def test_unbounded_overrides_are_recorded_and_replayed(overrides: dict[str, object]) -> None:
    """A setting overridden to unbounded (None or inf, which JSON cannot carry) is recorded
    as a string and replayed as what it was, not as the policy's bounded default."""
    sim = Simulator(fleet=load_fleet("figure2"), trace=_trace(n=200, rps=25.0),
                    config=SimConfig(policy="goodserve", predictor="oracle",
                                     record_decisions=True, policy_overrides=overrides))
    sim.run()
    recs = [decode(encode(d)) for d in sim.decisions]
    assert {d.config["trust_region"] for d in recs} == {str(overrides["trust_region"]).lower()}
    rep = replay_decisions(recs, check_preds=False)
    assert rep.identical == rep.count == 200, rep.mismatches[:3]
    # the test bites: replayed with the default trust region, some decisions differ
    bounded = [msgspec.structs.replace(d, config={**d.config, "trust_region": 1.0}) for d in recs]
    assert replay_decisions(bounded, check_preds=False).identical < 200


def test_decisions_without_views_are_counted_apart_not_as_mismatches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``decision_views_every=3``: one record in three carries the instances' views and
    replays bit for bit; the others say they cannot be replayed, and why."""
    from goodserve.dispatcher.router import NotReplayable, replay

    sim = Simulator(fleet=load_fleet("figure2"), trace=_trace(),
                    config=SimConfig(policy="goodserve", record_decisions=True,
                                     decision_views_every=3))
    sim.run()
    recs = [decode(encode(d)) for d in sim.decisions]
    with_views = [d for d in recs if d.instances]
    assert len(recs) == 120 and len(with_views) == 40
    assert all(d.candidates for d in recs)  # the explanation is in every record
    rep = replay_decisions(recs, check_preds=False)
    assert (rep.identical, rep.without_views) == (40, 80)
    assert not rep.mismatches and not rep.errors
    assert rep.to_json()["identical_fraction"] == 1.0
    bare = next(d for d in recs if not d.instances)
    with pytest.raises(NotReplayable, match="without the instances' views"):
        replay(bare)
    rc = main(["audit", "replay", "--file", str(_write(tmp_path / "d.jsonl", recs))])
    out = capsys.readouterr().out
    assert rc == 0 and "without views (not replayable): 80" in out


def test_views_every_must_not_be_negative() -> None:
    from goodserve.dispatcher.estimator import FleetEstimator
    from goodserve.dispatcher.predictor.model import ConstantPredictor
    from goodserve.dispatcher.router import Router
    from goodserve.dispatcher.service import DispatcherService

    from goodserve.errors import ConfigError

    with pytest.raises(ConfigError, match="views_every"):
        Router(estimator=FleetEstimator(), predictor=ConstantPredictor(10.0), policy="goodserve",
               views_every=-1)
    with pytest.raises(ConfigError, match="decision_views_every"):
        DispatcherService(settings=Settings(), decision_views_every=-1)
    args = build_parser().parse_args(["dispatcher", "--decision-views-every", "8"])
    assert args.decision_views_every == 8
