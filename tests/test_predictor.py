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


@pytest.mark.parametrize("median", [10, 150])
def test_online_location_tracks_the_median_of_traffic_unlike_the_training_data(
    median: int,
) -> None:
    """The Azure code trace (no text, outputs of about 10 tokens) is far from what the model
    was trained on: the P50 tracker moves every quantile until half the lengths fall below
    the P50, for that task only."""
    p = OutputLengthPredictor.default()
    rng = random.Random(3)
    xs = [_x(task="code", prompt=None, input_tokens=rng.randint(1000, 4000)) for _ in range(600)]
    ys = [max(1, round(median * math.exp(rng.gauss(0.0, 0.4)))) for _ in xs]
    raw = [p.predict(x).p50 for x in xs[:50]]
    assert abs(math.log(np.median(raw) / median)) > math.log(2)  # far off to begin with
    chat_before = p.predict(_x())
    covered50, covered90 = [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        pred = p.predict(x)
        if i >= 400:
            covered50.append(y <= pred.p50)
            covered90.append(y <= pred.p90)
        p.observe(x, y, prediction=pred)
    assert 0.35 <= np.mean(covered50) <= 0.65
    assert 0.8 <= np.mean(covered90) <= 0.98
    last = p.predict(xs[-1])
    assert abs(math.log(last.p50 / median)) < math.log(1.5)
    assert last.p50 <= last.p90 <= last.p99
    assert (p.median_shifts()["code"] < 0) == (median < np.median(raw))
    assert "chat" not in p.median_shifts()
    assert p.predict(_x()) == chat_before  # another task's predictions are untouched
    p.reset()
    assert p.median_shifts() == {}


def test_observe_many_learns_exactly_what_observing_one_by_one_does() -> None:
    """Workflows, steps, models and repeated prompts interleave, so each row's features
    depend on the rows before it; chunks of several sizes give the same state, bit for bit."""
    rng = random.Random(7)
    items = [
        (_x(task=rng.choice(["agent", "code", "chat"]), workflow_id=f"wf-{rng.randint(0, 3)}",
            step=rng.randint(0, 4), model=rng.choice(["llama-3-8b", None]),
            prompt=rng.choice(["Plan the next step.", "def f():", "Explain why."]),
            output_tokens_hint=rng.choice([None, 200])),
         rng.randint(5, 2000))
        for _ in range(60)
    ]
    one = OutputLengthPredictor.default()
    for x, y in items:
        one.observe(x, y)
    probes = [x for x, _ in items[:10]]
    for size in (2, 7, 8, 60):
        many = OutputLengthPredictor.default()
        for k in range(0, len(items), size):
            many.observe_many(items[k : k + size])
        assert many.calibration_shifts() == one.calibration_shifts()
        assert many.median_shifts() == one.median_shifts()
        assert [many.features(x) for x in probes] == [one.features(x) for x in probes]
        assert many.predict_batch(probes) == one.predict_batch(probes)
    base = ConstantPredictor(100)
    base.observe_many(items[:3])  # baselines learn nothing, batch or not
    assert base.predict_features([[]])[0].p50 == 100.0


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
    # 30 rounds and ~40 calibration rows per task: coverage is loose here (0.93 on calib);
    # the held-out test on the public data checks 0.88-0.92 in both cases.
    assert 0.8 <= m["p90_coverage"] <= 0.99
    cold = train.evaluate(p, datasets.read_jsonl(test), history=False)
    assert cold["mae_tokens"] < 0.7 * cold["baseline_mae_tokens"]
    assert 0.8 <= cold["p90_coverage"] <= 0.99
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
NO_HISTORY_MAE_RATIO = 0.75
"""Measured 0.732 for the shipped model (the issue asks for 0.7)."""


@pytest.mark.skipif(not (_DATA / "datasets").is_dir(), reason="public data not available")
def test_shipped_model_meets_targets_on_heldout(shipped: OutputLengthPredictor) -> None:
    """Issue #10: MAE <= 0.7x the per-task median online; no history is reported separately."""
    held = datasets.split(datasets.load_public(_DATA))["heldout"]
    m = train.evaluate(shipped, held)
    assert m["mae_tokens"] <= 0.7 * m["baseline_mae_tokens"], json.dumps(m)
    assert 0.88 <= m["p90_coverage"] <= 0.92, json.dumps(m)
    # No history at all (every prompt, workflow and model new). The 0.7 target is
    # not met there (docs/predictor.md gives the figure); this guards against regressions.
    cold = train.evaluate(shipped, held, history=False)
    assert cold["history"] is False
    ratio = cold["mae_tokens"] / cold["baseline_mae_tokens"]
    assert ratio <= NO_HISTORY_MAE_RATIO, json.dumps(cold)
    assert 0.88 <= cold["p90_coverage"] <= 0.92, json.dumps(cold)
    meta = shipped.meta
    assert meta["baseline"] == TaskMedianPredictor.default().to_json()


def _stat(prompt: str | None, name: str) -> float:
    stats, _ = F.ngram_ids(prompt)
    return stats[F.FEATURE_NAMES.index(name) - F.TEXT_OFFSET]


@pytest.mark.parametrize(
    ("prompt", "name", "expected"),
    [
        # requested sizes: words directly, sentences x15, paragraphs x80, items as counted
        ("Write a 500 word essay about rivers.", "req_words_log", math.log1p(500)),
        ("Write a 1000-1250 words essay.", "req_words_log", math.log1p(1000)),
        ("Summarise it in 2 sentences.", "req_words_log", math.log1p(30)),
        ("Write 3 paragraphs on Rome.", "req_words_log", math.log1p(240)),
        ("Give me 10 examples of verbs.", "req_items_log", math.log1p(10)),
        ("Give me 10 examples of verbs.", "req_words_log", 0.0),
        ("Explain gravity.", "req_words_log", 0.0),
        # first word: index in FIRST_WORDS, -1 otherwise
        ("What is 2+2?", "first_word", float(F.FIRST_WORDS.index(b"what"))),
        ("  write a haiku", "first_word", float(F.FIRST_WORDS.index(b"write"))),
        ("Rivers are long.", "first_word", -1.0),
        # distinct members of a word set
        ("Write a poem and a song, another poem", "ks_poem", 2.0),
        ("Compare the pros and cons", "ks_compare", 3.0),
        ("SELECT count of each order", "ks_sql_clause", 3.0),
        # counts
        ("a, b, c", "log_commas", math.log1p(2)),
        ("x = {1: {2}}", "log_braces", math.log1p(2)),
        ("see ```code``` and ```more```", "code_fences", 4.0),
        ("There are 12 apples and 3.5 pears", "log_numbers", math.log1p(3)),
        ("Explain it step by step.", "kw_step_by_step", 1.0),
        ("word " * 200, "words_truncated", 1.0),
        ("word " * 100, "words_truncated", 0.0),
        ("Explain why", "log_words", math.log1p(2)),
        (None, "has_prompt", 0.0),
        ("", "log_prompt_chars", 0.0),
    ],
)
def test_text_statistics(prompt: str | None, name: str, expected: float) -> None:
    assert _stat(prompt, name) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "n_ids"),
    [
        (None, 0),
        ("", 0),
        ("a", 3 + 2 + 1),  # " a " padded: 1 trigram; "ab" gives more below
        ("ab", 2 + 1),  # " ab ": two 3-grams, one 4-gram
        ("Hello   World", 11 + 10 + 9),  # " hello world " = 13 bytes
        ("x" * 1000, (F.CHAR_CHARS + 2 - 2) + (F.CHAR_CHARS + 2 - 3) + (F.CHAR_CHARS + 2 - 4)),
    ],
)
def test_char_ngram_ids(prompt: str | None, n_ids: int) -> None:
    ids = F.char_ids(prompt)
    if prompt == "a":  # " a " is 3 bytes: one trigram, no 4- or 5-grams
        n_ids = 1
    assert ids.size == n_ids
    assert ids.dtype == np.intp
    if ids.size:
        assert 0 <= ids.min() and ids.max() < F.TEXT_SPACE
        assert np.array_equal(ids, F.char_ids(prompt))  # deterministic
    # whitespace and case do not matter
    if prompt:
        assert np.array_equal(F.char_ids(prompt.upper() + "  "), ids)


def test_word_ngram_ids_are_stable_and_in_range() -> None:
    _, ids = F.ngram_ids("Write a function that returns the sum")
    assert ids.size == 7 + 6  # unigrams + bigrams
    assert ids.max() < F.TEXT_SPACE
    _, again = F.ngram_ids("write A function, that returns the sum!")
    assert np.array_equal(ids, again)


@pytest.mark.parametrize(
    ("task", "model", "expected"),
    [
        ("chat", "m-long", [0.5, 0.4, math.log1p(30)]),
        ("chat", "m-unknown", list(F.NO_PRIOR)),
        ("sql", "m-long", list(F.NO_PRIOR)),  # priors are per (task, model)
        ("chat", None, list(F.NO_PRIOR)),
        ("summarize", "m-other", [-0.2, 0.1, 3.0]),  # unknown task names use "other"
    ],
)
def test_model_prior_lookup(task: str, model: str | None, expected: list[float]) -> None:
    prior = {"chat": {"m-long": [0.5, 0.4, math.log1p(30)]}, "other": {"m-other": [-0.2, 0.1, 3.0]}}
    fz = F.Featurizer(None, prior)
    f = fz.extract(input_tokens=10, task=task, model=model, prompt="hi", step=0,
                   history=F.BLANK_HISTORY)
    assert f[F.PRIOR_OFFSET : F.HISTORY_OFFSET] == pytest.approx(expected)


def test_text_model_scores_use_the_tasks_weights() -> None:
    n = len(F.TEXT_MODEL_TASKS)
    word_w = np.zeros((n, F.TEXT_SPACE))
    char_w = np.zeros((n, F.TEXT_SPACE))
    _, ids = F.ngram_ids("essay")
    word_w[F.TEXT_MODEL_TASKS.index("chat"), ids] = 2.0
    word_w[F.TEXT_MODEL_TASKS.index("sql"), ids] = -1.0
    tm = F.TextModel(word_w, char_w, np.ones(F.TEXT_SPACE), np.ones(F.TEXT_SPACE))
    fz = F.Featurizer(tm)
    col = F.TEXT_MODEL_OFFSET - F.TEXT_OFFSET
    assert fz.text("essay", "chat")[col] == pytest.approx(2.0)  # one id, normalised by 1
    assert fz.text("essay", "sql")[col] == pytest.approx(-1.0)
    assert fz.text("essay", "agent")[col] == pytest.approx(2.0)  # no own model: chat's
    assert fz.text("essay", "math")[col] == 0.0
    assert fz.text(None, "chat") == [0.0] * (F.PRIOR_OFFSET - F.TEXT_OFFSET)


def test_no_history_rows_have_blank_history_and_their_own_calibration(
    shipped: OutputLengthPredictor,
) -> None:
    rows = _synthetic_rows(50, 3)
    x_none, _ = train.featurize(rows, shipped.featurizer, history=False)
    assert (x_none[:, F.HISTORY_OFFSET :] == np.asarray(F.BLANK_HISTORY, np.float32)).all()
    x_on, _ = train.featurize(rows, shipped.featurizer, history=True)
    assert not F.has_history(x_on[0].tolist()) and F.has_history(x_on[-1].tolist())
    assert (x_on[:, : F.HISTORY_OFFSET] == x_none[:, : F.HISTORY_OFFSET]).all()
    # the two conformal tables are both used, selected per row
    assert shipped.meta["conformal_offsets_no_history"] != shipped.meta["conformal_offsets"]
    row = x_none[-1].tolist()
    with_h = list(row)
    with_h[F.HISTORY_OFFSET + 4] = 1.0  # a step count: the row now has history
    n_t = len(F.TASKS)
    ti = F.TASK_INDEX[F.task_of_features(row)]
    for feats, off_row in ((row, n_t + ti), (with_h, ti)):
        m = shipped._forest.margin(np.asarray([feats], dtype=np.float32))[0]
        a = max(m[0], 0.0)
        b = max(m[1] + shipped._task_offsets[off_row][1], a)
        p = shipped.predict_features([feats])[0]
        assert p.p50 == pytest.approx(math.expm1(a)) and p.p90 == pytest.approx(math.expm1(b))
    t = F.TASKS[ti]
    assert list(shipped._task_offsets[n_t + ti]) == shipped.meta["conformal_offsets_no_history"][t]
    assert list(shipped._task_offsets[ti]) == shipped.meta["conformal_offsets"][t]
