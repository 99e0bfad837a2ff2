"""Training and evaluation of the output-length predictor (offline tools).

Protocol (the same for training and evaluation): rows are taken in file order, and each
row's history features are computed from the rows before it, then the row's actual length
is observed - exactly what the router sees online (predict, later observe).

Training: groups (``group`` field, else the prompt) split by a fixed-seed hash into
train / calib / held-out (``datasets.split_of``). The booster is fit on ``train``; the
per-task conformal corrections of the P90 and P99 heads are fit on ``calib``; ``heldout``
is never touched (it is what ``goodserve predictor eval`` reports on).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from goodserve.dispatcher.predictor import features as F
from goodserve.dispatcher.predictor.datasets import Record, split
from goodserve.dispatcher.predictor.model import (
    META_FILE,
    MODEL_FILE,
    NGRAM_FILE,
    QUANTILES,
    LengthPrediction,
    OutputLengthPredictor,
    PredictorInput,
    TaskMedianPredictor,
    ngram_weights_to_json,
)

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "reg:quantileerror",
    "quantile_alpha": list(QUANTILES),
    "tree_method": "hist",
    "multi_strategy": "multi_output_tree",
    "max_depth": 5,
    "learning_rate": 0.1,
    "min_child_weight": 5.0,
    "subsample": 0.9,
    "colsample_bytree": 0.8,
    "max_bin": 128,
    "seed": 7,
    "nthread": 1,
}
DEFAULT_ROUNDS = 150


def to_input(r: Record) -> PredictorInput:
    return PredictorInput(
        input_tokens=int(r.get("input_tokens") or 0),
        task=str(r.get("task") or "chat"),
        model=str(r.get("model") or "default"),
        prompt=r.get("prompt"),
        workflow_id=r.get("workflow_id"),
        step=int(r.get("step") or 0),
    )


def featurize(
    records: Sequence[Record],
    featurizer: F.Featurizer | None = None,
    *,
    prompt_history: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (float32) and targets (tokens) with online history, in row order.

    ``prompt_history=False`` hides recurrences of identical prompts from the history
    (a cold-start measurement: every prompt looks new).
    """
    fz = featurizer or F.Featurizer()
    hist = F.History()
    rows: list[list[float]] = []
    ys = np.empty(len(records), dtype=np.float64)
    for i, r in enumerate(records):
        x = to_input(r)
        hp = x.prompt if prompt_history else None
        rows.append(
            fz.extract(
                input_tokens=x.input_tokens, task=x.task, model=x.model, prompt=x.prompt,
                step=x.step,
                history=hist.features(x.task, x.workflow_id, x.step, x.model, hp),
            )
        )
        y = int(r["output_tokens"])
        ys[i] = y
        hist.observe(x.task, x.workflow_id, x.step, y, x.model, hp)
    return np.asarray(rows, dtype=np.float32).reshape(len(records), F.N_FEATURES), ys


_SCORE_COLS = [F.FEATURE_NAMES.index(n) for n in
               ("ngram_score", "ngram_wmax", "ngram_wmin")]
NGRAM_RIDGE = 3.0
"""L2 penalty of the n-gram ridge regression."""
NGRAM_FOLDS = 5
NGRAM_CG_ITERS = 60


def _ngram_fit(ids: Sequence[np.ndarray], resid: np.ndarray) -> np.ndarray:
    """Ridge regression of the residual on hashed n-gram counts / sqrt(n-grams in row).

    Solved by conjugate gradients on (X'X + lambda I) w = X'r with X never materialised
    (bincount / reduceat over the concatenated ids), so it needs only numpy.
    """
    lens = np.array([i.size for i in ids], dtype=np.intp)
    nz = lens > 0
    allids = np.concatenate([i for i in ids if i.size]) if nz.any() else np.zeros(0, np.intp)
    scale = np.zeros(len(ids))
    scale[nz] = 1.0 / np.sqrt(lens[nz])
    starts = np.concatenate(([0], np.cumsum(lens[nz])[:-1])).astype(np.intp)
    rowscale = np.repeat(scale[nz], lens[nz])

    def xv(v: np.ndarray) -> np.ndarray:
        out = np.zeros(len(ids))
        if allids.size:
            out[nz] = np.add.reduceat(v[allids] * rowscale, starts)
        return out

    def xtr(r: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.bincount(allids, weights=np.repeat(r[nz] * scale[nz], lens[nz]),
                                      minlength=F.NGRAM_SPACE)
        return out

    b = xtr(resid)
    w = np.zeros(F.NGRAM_SPACE)
    r = b.copy()
    p = r.copy()
    rs = float(r @ r)
    for _ in range(NGRAM_CG_ITERS):
        if rs <= 0.0:  # no text (or nothing left to fit)
            break
        ap = xtr(xv(p)) + NGRAM_RIDGE * p
        alpha = rs / float(p @ ap)
        w += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if rs_new < 1e-10 * max(float(b @ b), 1e-30):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return w


def _ngram_scores(ids: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    out = np.zeros((len(ids), 3), dtype=np.float32)
    for j, i in enumerate(ids):
        if i.size:
            out[j] = F.ngram_scores(i, w)
    return out


def _residuals(records: Sequence[Record]) -> np.ndarray:
    """log1p(y) minus the mean of its (task bucket, model) group: what text must explain."""
    keys = [(F.task_bucket(str(r.get("task"))), str(r.get("model") or "default"))
            for r in records]
    y = np.log1p(np.array([float(r["output_tokens"]) for r in records]))
    sums: dict[tuple[str, str], list[float]] = {}
    for k, v in zip(keys, y, strict=True):
        a = sums.setdefault(k, [0.0, 0.0])
        a[0] += v
        a[1] += 1
    return np.array([v - sums[k][0] / sums[k][1] for k, v in zip(keys, y, strict=True)])


def _fold(r: Record) -> int:
    g = str(r.get("group") or r.get("workflow_id") or r.get("prompt") or id(r))
    return int(hashlib.sha256(("fold|" + g).encode()).hexdigest()[:8], 16) % NGRAM_FOLDS


def _conformal(
    pred_log: np.ndarray, y_log: np.ndarray, tasks: Sequence[str], min_rows: int = 100
) -> dict[str, list[float]]:
    """Per-task additive log1p corrections making the P90/P99 heads cover on calib data.

    Split-conformal: the ceil((n+1) q)/n empirical quantile of (y - head); tasks with fewer
    than ``min_rows`` calibration rows use the pooled correction.
    """

    def corr(scores: np.ndarray, q: float) -> float:
        n = scores.size
        level = min(math.ceil((n + 1) * q) / n, 1.0)
        return float(np.quantile(scores, level, method="higher"))

    tb = np.array([F.task_bucket(t) for t in tasks])
    pooled = [0.0, corr(y_log - pred_log[:, 1], 0.9), corr(y_log - pred_log[:, 2], 0.99)]
    out: dict[str, list[float]] = {}
    for t in F.TASKS:
        m = tb == t
        if m.sum() >= min_rows:
            out[t] = [0.0, corr(y_log[m] - pred_log[m, 1], 0.9),
                      corr(y_log[m] - pred_log[m, 2], 0.99)]
        else:
            out[t] = pooled
    return out


def train(
    records: Sequence[Record],
    out_dir: Path,
    *,
    rounds: int = DEFAULT_ROUNDS,
    params: dict[str, Any] | None = None,
    min_calib_rows: int = 100,
) -> dict[str, Any]:
    """Fit, calibrate and save a model (model.json + metadata.json) into ``out_dir``."""
    import xgboost as xgb

    t0 = time.perf_counter()
    parts = split(records)
    fit_rows, cal_rows = parts["train"], parts["calib"]
    if not fit_rows or not cal_rows:
        raise ValueError("need rows in both the train and calib splits")
    # Text model: n-gram weights from the fit rows; out-of-fold scores for the fit rows so
    # the booster sees scores as noisy as on unseen prompts.
    fit_ids = [F.ngram_ids(r.get("prompt"))[1] for r in fit_rows]
    resid = _residuals(fit_rows)
    weights = _ngram_fit(fit_ids, resid)
    folds = np.array([_fold(r) for r in fit_rows])
    oof = np.zeros((len(fit_rows), 3), dtype=np.float32)
    for k in range(NGRAM_FOLDS):
        m = folds == k
        wk = _ngram_fit([i for i, keep in zip(fit_ids, ~m, strict=True) if keep], resid[~m])
        oof[m] = _ngram_scores([i for i, keep in zip(fit_ids, m, strict=True) if keep], wk)
    x_fit, y_fit = featurize(fit_rows)
    x_fit[:, _SCORE_COLS] = oof
    x_cal, y_cal = featurize(cal_rows, F.Featurizer(weights))
    p = dict(DEFAULT_PARAMS, **(params or {}))
    dtrain = xgb.DMatrix(x_fit, label=np.log1p(y_fit), feature_names=list(F.FEATURE_NAMES))
    booster = xgb.train(p, dtrain, num_boost_round=rounds)
    cal_log = booster.inplace_predict(x_cal).reshape(len(cal_rows), len(QUANTILES))
    offsets = _conformal(cal_log, np.log1p(y_cal), [str(r.get("task")) for r in cal_rows],
                         min_calib_rows)
    train_s = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    booster.feature_names = None  # smaller JSON; names live in the metadata
    raw = booster.save_raw("json")
    (out_dir / MODEL_FILE).write_bytes(gzip.compress(bytes(raw), 9, mtime=0))
    ngram_json = json.dumps(ngram_weights_to_json(weights), separators=(",", ":")).encode()
    (out_dir / NGRAM_FILE).write_bytes(gzip.compress(ngram_json, 9, mtime=0))
    both = list(fit_rows) + list(cal_rows)
    baseline = TaskMedianPredictor.fit([str(r.get("task")) for r in both],
                                       [float(r["output_tokens"]) for r in both])
    meta: dict[str, Any] = {
        "feature_version": F.FEATURE_VERSION,
        "feature_names": list(F.FEATURE_NAMES),
        "target": "log1p(output_tokens)",
        "quantiles": list(QUANTILES),
        "token_conversion": "tokens = ceil(chars / 4)",
        "conformal_offsets": offsets,
        "hint_weight": 1.0,
        "baseline": baseline.to_json(),
        "params": {k: v for k, v in p.items()},
        "rounds": rounds,
        "rows": {"train": len(fit_rows), "calib": len(cal_rows),
                 "heldout_excluded": len(parts["heldout"])},
        "data_sha256": _records_sha(both),
        "xgboost": xgb.__version__,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    # Not in the file (keeps the shipped files byte-reproducible), but reported.
    meta["train_seconds"] = round(train_s, 2)
    return meta


def _records_sha(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.get('task')}|{r.get('input_tokens')}|{r.get('output_tokens')}\n".encode())
    return h.hexdigest()[:16]


def evaluate(
    predictor: OutputLengthPredictor,
    records: Sequence[Record],
    baseline: TaskMedianPredictor | None = None,
    *,
    prompt_history: bool = True,
) -> dict[str, Any]:
    """MAE of p50, P90/P99 coverage, and the per-task-median baseline's MAE.

    History features are rebuilt online over ``records`` (predictor state is reset and
    left as it was found: online recalibration is not applied, this measures the model).
    """
    if baseline is None:
        b = predictor.meta.get("baseline")
        baseline = TaskMedianPredictor(b["table"], b["overall"]) if b else \
            TaskMedianPredictor.fit([str(r.get("task")) for r in records],
                                    [float(r["output_tokens"]) for r in records])
    x, y = featurize(records, predictor.featurizer, prompt_history=prompt_history)
    preds = predictor.predict_features(x.tolist()) if len(records) else []
    base = [baseline.predict(to_input(r)) for r in records]
    tasks = [str(r.get("task") or "chat") for r in records]
    metrics = _metrics(preds, base, y, tasks)
    metrics["prompt_history"] = prompt_history
    metrics["model_version"] = predictor.version
    metrics["baseline_version"] = baseline.version
    return metrics


def _metrics(
    preds: Sequence[LengthPrediction], base: Sequence[LengthPrediction], y: np.ndarray,
    tasks: Sequence[str],
) -> dict[str, Any]:
    p50 = np.array([p.p50 for p in preds])
    p90 = np.array([p.p90 for p in preds])
    p99 = np.array([p.p99 for p in preds])
    b50 = np.array([p.p50 for p in base])

    def block(m: np.ndarray) -> dict[str, Any]:
        n = int(m.sum())
        if n == 0:
            return {"n": 0}
        mae = float(np.mean(np.abs(p50[m] - y[m])))
        bmae = float(np.mean(np.abs(b50[m] - y[m])))
        return {
            "n": n,
            "mae_tokens": round(mae, 2),
            "baseline_mae_tokens": round(bmae, 2),
            "mae_ratio": round(mae / bmae, 4) if bmae else None,
            "p90_coverage": round(float(np.mean(y[m] <= p90[m])), 4),
            "p99_coverage": round(float(np.mean(y[m] <= p99[m])), 4),
        }

    all_m = np.ones(len(y), dtype=bool)
    out = block(all_m)
    tarr = np.array(tasks)
    out["per_task"] = {t: block(tarr == t) for t in sorted(set(tasks))}
    return out
