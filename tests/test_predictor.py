"""Output-length predictor: features, determinism, quantiles, hints, online state, round trip."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
from goodserve.dispatcher.predictor import datasets, train
from goodserve.dispatcher.predictor import features as F
from goodserve.dispatcher.predictor.model import (
    ConstantPredictor,
    LengthPrediction,
    OutputLengthPredictor,
    PredictorInput,
    TaskMedianPredictor,
    conditional_remaining,
)


@pytest.fixture(scope="module")
def shipped() -> OutputLengthPredictor:
    return OutputLengthPredictor.default()


def _x(**kw: object) -> PredictorInput:
    base: dict[str, object] = {"input_tokens": 120, "task": "chat", "prompt": "Explain why."}
    base.update(kw)
    return PredictorInput(**base)  # type: ignore[arg-type]


def test_unknown_task_goes_to_other(shipped: OutputLengthPredictor) -> None:
    f = shipped.features(_x(task="summarize-legal-brief"))
    assert len(f) == F.N_FEATURES
    assert F.task_of_features(f) == "other"
    onehot = f[F.TASK_OFFSET : F.TASK_OFFSET + len(F.TASKS)]
    assert onehot == [0.0] * (len(F.TASKS) - 1) + [1.0]
    p = shipped.predict(_x(task="summarize-legal-brief"))
    assert 0 < p.p50 <= p.p90 <= p.p99
    assert TaskMedianPredictor.default().predict(_x(task="weird")).p50 > 0


def test_features_are_finite_without_prompt(shipped: OutputLengthPredictor) -> None:
    f = shipped.features(PredictorInput(input_tokens=0, prompt=None, model="", step=-3))
    assert all(math.isfinite(v) for v in f)


def test_input_from_request_carries_request_id_but_it_is_no_feature(
    shipped: OutputLengthPredictor,
) -> None:
    from goodserve.schemas import AgentRequest

    req = AgentRequest(
        request_id="req-7",
        model="llama-3-8b",
        task="sql",
        prompt="List all tables.",
        workflow_id="wf-1",
        step=2,
        input_tokens=300,
        max_tokens=64,
        output_tokens_hint=40,
    )
    x = PredictorInput.from_request(req, 300)
    assert x == PredictorInput(
        input_tokens=300,
        task="sql",
        model="llama-3-8b",
        prompt="List all tables.",
        workflow_id="wf-1",
        step=2,
        output_tokens_hint=40,
        request_id="req-7",
    )
    other = msgspec.structs.replace(x, request_id="another")
    for p in (shipped, TaskMedianPredictor.default(), ConstantPredictor()):
        assert p.features(x) == p.features(other)
        assert p.predict(x) == p.predict(other)


def test_predict_features_is_deterministic_and_batch_independent(
    shipped: OutputLengthPredictor,
) -> None:
    rng = random.Random(0)
    xs = [
        _x(
            input_tokens=rng.randint(1, 4000),
            task=rng.choice(F.TASKS),
            step=rng.randint(0, 5),
            prompt=" ".join(rng.choices(["write", "sql", "list", "why", "code", "a"], k=30)),
        )
        for _ in range(300)
    ]
    feats = [shipped.features(x) for x in xs]
    batch = shipped.predict_features(feats)
    single = [shipped.predict_features([f])[0] for f in feats]
    assert batch == single  # bit-identical whatever the batch
    chunks = [
        p for i in range(0, len(feats), 7) for p in shipped.predict_features(feats[i : i + 7])
    ]
    assert chunks == batch
    fresh = OutputLengthPredictor.default()
    assert fresh.predict_features(feats) == batch
    assert fresh.version == shipped.version and shipped.version.startswith("xgb-")
    assert shipped.predict_batch(xs) == [shipped.predict(x) for x in xs]


def test_compiled_forest_matches_xgboost(shipped: OutputLengthPredictor) -> None:
    xgb = pytest.importorskip("xgboost")
    import gzip

    from goodserve.dispatcher.predictor.model import MODEL_FILE, default_model_dir

    booster = xgb.Booster()
    booster.load_model(bytearray(gzip.decompress((default_model_dir() / MODEL_FILE).read_bytes())))
    rng = np.random.default_rng(1)
    xs = [
        _x(
            input_tokens=int(rng.integers(1, 5000)),
            task=str(rng.choice(F.TASKS)),
            model=f"m{i % 7}",
            prompt="write a story " * int(rng.integers(0, 40)),
        )
        for i in range(200)
    ]
    x = np.asarray([shipped.features(v) for v in xs], dtype=np.float32)
    ours = shipped._forest.margin(x)
    theirs = booster.inplace_predict(x).reshape(ours.shape)
    assert np.abs(ours - theirs).max() < 1e-4


def test_quantiles_are_ordered(shipped: OutputLengthPredictor) -> None:
    for task in (*F.TASKS, "unknown"):
        for n in (1, 10, 500, 30000):
            p = shipped.predict(_x(task=task, input_tokens=n))
            assert 1.0 <= p.p50 <= p.p90 <= p.p99
    for pred in (TaskMedianPredictor.default(), ConstantPredictor(100)):
        p = pred.predict(_x())
        assert p.p50 <= p.p90 <= p.p99
        assert pred.version


def test_hint_blends_median_and_keeps_spread(shipped: OutputLengthPredictor) -> None:
    shipped.reset()
    base = shipped.predict(_x())
    hinted = shipped.predict(_x(output_tokens_hint=900))
    assert hinted.p50 == pytest.approx(900.0)
    assert math.log1p(hinted.p90) - math.log1p(hinted.p50) == pytest.approx(
        math.log1p(base.p90) - math.log1p(base.p50), abs=1e-9
    )
    assert shipped.predict(_x(output_tokens_hint=None)) == base
    half = OutputLengthPredictor.default()
    half.hint_weight = 0.5
    h = half.predict(_x(output_tokens_hint=900))
    assert base.p50 < h.p50 < 900 or 900 < h.p50 < base.p50


def test_observe_changes_history_features() -> None:
    p = OutputLengthPredictor.default()
    x = _x(task="agent", workflow_id="wf-1", step=2, model="llama-3-8b")
    before = p.features(x)
    h0 = before[F.HISTORY_OFFSET :]
    assert h0[0] == F.NO_HISTORY and h0[1] == 0.0
    for n in (300, 320, 310):
        p.observe(x, n)
    after = p.features(x)[F.HISTORY_OFFSET :]
    assert after[0] == pytest.approx(math.log1p(310), abs=0.1)
    assert after[1] == pytest.approx(math.log1p(3))
    assert after[3] != F.NO_HISTORY and after[5] != F.NO_HISTORY  # step and model keys
    assert after[8] == pytest.approx(math.log1p(3))  # same-prompt count
    # Another workflow sees the step/model history but not the workflow's own.
    other = p.features(_x(task="agent", workflow_id="wf-2", step=2, model="llama-3-8b"))
    assert other[F.HISTORY_OFFSET] == F.NO_HISTORY
    assert other[F.HISTORY_OFFSET + 3] == after[3]
    # features(x) then predict(x) (the router's pattern) equals a fresh predict after observe
    f1 = p.features(x)
    p.observe(x, 5000)
    assert p.features(x) != f1
    p.features(x)
    p.observe(x, 7000)
    assert p.predict(x) == p._post(p.predict_features([p.features(x)])[0], x)
    p.reset()
    assert p.features(x) == before


def test_online_calibration_moves_p90_up_after_misses() -> None:
    p = OutputLengthPredictor.default()
    x = _x(task="code", prompt="def f():")
    p90 = p.predict(x).p90
    for _ in range(30):
        p.observe(x, int(p90 * 20))
    assert p.calibration_shifts()["code"] > 0
    p.history.clear()
    assert p.predict(x).p90 > p90
    q = OutputLengthPredictor.default()
    q.observe(x, 10**6, prediction=LengthPrediction(10.0, 20.0, 30.0))
    assert q.calibration_shifts()["code"] == pytest.approx(0.02 * 0.9)


def test_conditional_remaining_monotone() -> None:
    pred = LengthPrediction(200.0, 600.0, 1500.0)
    totals = [g + conditional_remaining(pred, g, 0.9) for g in range(0, 5000, 50)]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(totals))
    assert conditional_remaining(pred, 0, 0.9) == pytest.approx(600.0, rel=0.02)
    assert conditional_remaining(pred, 0, 0.5) == pytest.approx(200.0, rel=0.02)
    qs = [conditional_remaining(pred, 400, q) for q in (0.1, 0.5, 0.9, 0.99)]
    assert qs == sorted(qs) and qs[0] > 0
    assert math.isfinite(conditional_remaining(pred, 10**7, 0.99))
    # degenerate predictions (p50 == p90 == p99) still give a positive remaining length
    flat = LengthPrediction(50.0, 50.0, 50.0)
    assert conditional_remaining(flat, 0, 0.9) >= 50.0
    assert conditional_remaining(flat, 500, 0.9) > 0
    # p99 absent: derived from p50/p90
    assert conditional_remaining(LengthPrediction(100.0, 300.0), 50, 0.9) > 0
    assert ConstantPredictor(100).conditional_remaining(pred, 100) == conditional_remaining(
        pred, 100
    )


def _synthetic_rows(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        task = rng.choice(["chat", "code", "sql", "tool"])
        long = rng.random() < 0.5
        prompt = ("write a detailed essay about " if long else "answer briefly: ") + str(i)
        mu = {"chat": 300, "code": 120, "sql": 30, "tool": 20}[task] * (3 if long else 0.5)
        rows.append(
            {
                "prompt": prompt,
                "task": task,
                "model": rng.choice(["a", "b"]),
                "input_tokens": len(prompt) // 4 + 1,
                "output_tokens": max(1, int(rng.lognormvariate(math.log(mu), 0.3))),
                "group": f"g{i}",
            }
        )
    return rows


def test_train_eval_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    datasets.write_jsonl(_synthetic_rows(1500, 1), data)
    out = tmp_path / "model"
    meta = train.train(datasets.read_jsonl(data), out, rounds=30, min_calib_rows=20)
    assert meta["rows"]["train"] > 0 and (out / "metadata.json").exists()
    p = OutputLengthPredictor.load(out)
    assert p.version.startswith("xgb-") and p.version != OutputLengthPredictor.default().version
    test = tmp_path / "test.jsonl"
    datasets.write_jsonl(_synthetic_rows(600, 2), test)
    m = train.evaluate(p, datasets.read_jsonl(test))
    assert m["mae_tokens"] < 0.7 * m["baseline_mae_tokens"]
    assert 0.8 <= m["p90_coverage"] <= 0.97
    assert set(m["per_task"]) == {"chat", "code", "sql", "tool"}
    # CLI: eval with --json on the same file
    from goodserve.cli import main

    assert main(["predictor", "eval", "--data", str(test), "--model", str(out), "--json"]) == 0


def test_chars_to_tokens_and_split_are_fixed() -> None:
    assert datasets.chars_to_tokens(0) == 0
    assert datasets.chars_to_tokens(1) == 1
    assert datasets.chars_to_tokens(8) == 2 and datasets.chars_to_tokens(9) == 3
    assert datasets.split_of("ae:17") == datasets.split_of("ae:17")
    rows = [{"group": f"g{i}", "output_tokens": 1} for i in range(2000)]
    parts = datasets.split(rows)
    assert 0.15 < len(parts["heldout"]) / 2000 < 0.25


_DATA = datasets.default_data_dir()


@pytest.mark.skipif(not (_DATA / "datasets").is_dir(), reason="public data not available")
def test_shipped_model_meets_targets_on_heldout(shipped: OutputLengthPredictor) -> None:
    held = datasets.split(datasets.load_public(_DATA))["heldout"]
    m = train.evaluate(shipped, held)
    assert m["mae_tokens"] <= 0.7 * m["baseline_mae_tokens"], json.dumps(m)
    assert 0.88 <= m["p90_coverage"] <= 0.92, json.dumps(m)
    meta = shipped.meta
    assert meta["baseline"] == TaskMedianPredictor.default().to_json()
