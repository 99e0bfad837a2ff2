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
import io
import json
import math
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from goodserve.dispatcher.predictor import features as F
from goodserve.dispatcher.predictor.datasets import Record, split
from goodserve.dispatcher.predictor.encoder import (
    EMBEDDING_DIM,
    ENCODER_NAME,
    ENCODER_WEIGHTS_SHA256,
    EncoderHead,
    PromptEncoder,
    fit_ridge,
)
from goodserve.dispatcher.predictor.model import (
    ENCODER_FILE,
    META_FILE,
    MODEL_FILE,
    NGRAM_FILE,
    QUANTILES,
    TEXT_MODEL_FILE,
    LengthPrediction,
    OutputLengthPredictor,
    PredictorInput,
    TaskMedianPredictor,
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
ENCODER_PARAMS: dict[str, Any] = {"num_parallel_tree": 4}
"""The encoder tier grows four trees a round and averages them (600 trees): its
no-history error varies less with the booster's seed (seeds 7 and 8: 0.695 and 0.693 of
the baseline; one tree a round: 0.702 and 0.698). Its forest costs four times the plain
model's, small beside the encoder's milliseconds."""


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
    history: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (float32) and targets (tokens) with online history, in row order.

    ``prompt_history=False`` hides recurrences of identical prompts from the history
    (every prompt looks new); ``history=False`` gives every row an empty history (the
    no-history case: a dispatcher that has seen nothing yet, or ``observe`` never called).
    """
    fz = featurizer or F.Featurizer()
    hist = F.History()
    blank = list(F.BLANK_HISTORY)
    rows: list[list[float]] = []
    ys = np.empty(len(records), dtype=np.float64)
    for i, r in enumerate(records):
        x = to_input(r)
        hp = x.prompt if prompt_history else None
        h = hist.features(x.task, x.workflow_id, x.step, x.model, hp) if history else blank
        rows.append(
            fz.extract(
                input_tokens=x.input_tokens, task=x.task, model=x.model, prompt=x.prompt,
                step=x.step, history=h,
            )
        )
        y = int(r["output_tokens"])
        ys[i] = y
        if history:
            hist.observe(x.task, x.workflow_id, x.step, y, x.model, hp)
    return np.asarray(rows, dtype=np.float32).reshape(len(records), fz.n_features), ys


_SCORE_COLS = [F.FEATURE_NAMES.index(n) for n in ("text_word_score", "text_char_score")]
_PRIOR_COLS = [F.FEATURE_NAMES.index(n) for n in ("model_prior_offset", "model_prior_spread",
                                                   "model_prior_log_n")]
TEXT_RIDGE = 3.0
"""L2 penalty of the text ridge regressions."""
NGRAM_FOLDS = 5
NGRAM_CG_ITERS = 60
PRIOR_MIN_ROWS = 20
"""A (task, model) pair needs this many training rows to get a model prior."""
ENCODER_RIDGE = 30.0
"""L2 penalty of the encoder tier's ridge heads (chosen on the out-of-fold fit, session 13)."""
HISTORY_DROPOUT = 0.5
DROPOUT_SEED = 7
"""Fraction of training rows whose history block is blanked, so one model serves both
the online case (with history) and the no-history case."""


def _idf(ids: Sequence[np.ndarray]) -> np.ndarray:
    """Smoothed inverse document frequency over the rows: log((1+N)/(1+df)) + 1."""
    df = np.zeros(F.TEXT_SPACE)
    for i in ids:
        if i.size:
            df[np.unique(i)] += 1.0
    out: np.ndarray = np.log((1.0 + len(ids)) / (1.0 + df)) + 1.0
    return out


def _ridge(ids: Sequence[np.ndarray], target: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Ridge regression of ``target`` on L2-normalised TF-IDF rows of hashed n-gram ids.

    Solved by conjugate gradients on (X'X + lambda I) w = X'r with X never materialised
    (bincount / reduceat over the concatenated ids), so it needs only numpy.
    """
    w = np.zeros(F.TEXT_SPACE)
    lens = np.array([i.size for i in ids], dtype=np.intp)
    nz = lens > 0
    if not nz.any():
        return w
    allids = np.concatenate([i for i in ids if i.size])
    vals = idf[allids]
    starts = np.concatenate(([0], np.cumsum(lens[nz])[:-1])).astype(np.intp)
    scale = 1.0 / np.sqrt(np.add.reduceat(vals * vals, starts))
    v = vals * np.repeat(scale, lens[nz])
    tgt = target[nz]

    def xv(u: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.add.reduceat(u[allids] * v, starts)
        return out

    def xtr(r: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.bincount(allids, weights=np.repeat(r, lens[nz]) * v,
                                      minlength=F.TEXT_SPACE)
        return out

    b = xtr(tgt)
    r = b.copy()
    p = r.copy()
    rs = float(r @ r)
    for _ in range(NGRAM_CG_ITERS):
        if rs <= 0.0:
            break
        ap = xtr(xv(p)) + TEXT_RIDGE * p
        alpha = rs / float(p @ ap)
        w += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if rs_new < 1e-10 * max(float(b @ b), 1e-30):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return w


def _score(ids: Sequence[np.ndarray], w: np.ndarray, idf: np.ndarray) -> np.ndarray:
    out = np.zeros(len(ids))
    wi, idf2 = w * idf, idf * idf
    for j, i in enumerate(ids):
        if i.size:
            out[j] = float(wi.take(i).sum()) / math.sqrt(float(idf2.take(i).sum()))
    return out


def _fit_text_models(
    fit_rows: Sequence[Record], folds: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-task word and char ridges on the fit rows; out-of-fold scores for those rows.

    Returns the arrays of ``TEXT_MODEL_FILE`` (float16, as shipped) and the (n, 2) scores
    the booster is trained on: each fit row scored by weights fitted without its fold, so
    the scores are as noisy as on prompts never seen.
    """
    resid = _residuals(fit_rows)
    tm_task = np.array([F.text_model_task(F.task_bucket(str(r.get("task")))) for r in fit_rows])
    prompts = [r.get("prompt") for r in fit_rows]
    kinds = {"word": [F.ngram_ids(p)[1] for p in prompts], "char": [F.char_ids(p) for p in prompts]}
    arrays: dict[str, np.ndarray] = {}
    oof = np.zeros((len(fit_rows), 2))
    for col, (kind, ids) in enumerate(kinds.items()):
        idf = _idf(ids).astype(np.float16)
        idf64 = idf.astype(np.float64)
        ws = np.zeros((len(F.TEXT_MODEL_TASKS), F.TEXT_SPACE), dtype=np.float16)
        for ti, t in enumerate(F.TEXT_MODEL_TASKS):
            m = tm_task == t
            if not m.any():
                continue
            sub = [i for i, keep in zip(ids, m, strict=True) if keep]
            ws[ti] = _ridge(sub, resid[m], idf64)
            for k in range(NGRAM_FOLDS):
                tr, te = m & (folds != k), m & (folds == k)
                if not te.any():
                    continue
                wk = _ridge([i for i, keep in zip(ids, tr, strict=True) if keep], resid[tr],
                            idf64)
                oof[te, col] = _score([i for i, keep in zip(ids, te, strict=True) if keep], wk,
                                      idf64)
        arrays[f"{kind}_w"] = ws
        arrays[f"{kind}_idf"] = idf
    return arrays, oof


def _progress(what: str) -> Callable[[int, int], None]:
    """A progress callback printing ``what: done/total`` to stderr about every 10%."""
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != last[0]:
            last[0] = tenth
            print(f"{what}: {done}/{total}", file=sys.stderr, flush=True)

    return report


def embed_prompts(encoder: PromptEncoder, records: Sequence[Record], what: str) -> None:
    """Embed every distinct prompt of ``records`` in batches (the encoder caches them)."""
    prompts = list(dict.fromkeys(str(r["prompt"])[: F.ENCODER_CHARS] for r in records
                                 if r.get("prompt")))
    encoder.embed(prompts, progress=_progress(f"embedding {what} prompts"))


def _fit_encoder_heads(
    fit_rows: Sequence[Record], folds: np.ndarray, encoder: PromptEncoder
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-task ridge heads on the prompt embeddings (weights, intercepts) and the
    out-of-fold scores of the fit rows, as ``_fit_text_models`` does for TF-IDF."""
    resid = _residuals(fit_rows)
    tm_task = np.array([F.text_model_task(F.task_bucket(str(r.get("task")))) for r in fit_rows])
    prompts = [str(r.get("prompt") or "")[: F.ENCODER_CHARS] for r in fit_rows]
    has = np.array([bool(p) for p in prompts])
    emb = np.zeros((len(prompts), EMBEDDING_DIM))
    emb[has] = encoder.embed([p for p in prompts if p])
    w = np.zeros((len(F.TEXT_MODEL_TASKS), EMBEDDING_DIM))
    b = np.zeros(len(F.TEXT_MODEL_TASKS))
    oof = np.zeros(len(fit_rows))
    for ti, t in enumerate(F.TEXT_MODEL_TASKS):
        m = (tm_task == t) & has
        if m.sum() < 2:
            continue
        w[ti], b[ti] = fit_ridge(emb[m], resid[m], ENCODER_RIDGE)
        for k in range(NGRAM_FOLDS):
            tr, te = m & (folds != k), m & (folds == k)
            if te.any() and tr.sum() >= 2:
                wk, bk = fit_ridge(emb[tr], resid[tr], ENCODER_RIDGE)
                oof[te] = emb[te] @ wk + bk
    return w.astype(np.float32), b.astype(np.float32), oof


def text_model_from_arrays(arrays: Mapping[str, np.ndarray]) -> F.TextModel:
    f64 = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    return F.TextModel(f64["word_w"], f64["char_w"], f64["word_idf"], f64["char_idf"])


def _prior_table(rows: Sequence[Record]) -> dict[str, dict[str, list[float]]]:
    """(task bucket, model) -> [mean log1p(y) minus the task mean, std, log1p(rows)]."""
    by_task: dict[str, list[float]] = {}
    by_pair: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        t = F.task_bucket(str(r.get("task")))
        v = math.log1p(float(r["output_tokens"]))
        by_task.setdefault(t, []).append(v)
        m = str(r.get("model") or "default")
        if m != "default":
            by_pair.setdefault((t, m), []).append(v)
    out: dict[str, dict[str, list[float]]] = {}
    for (t, m), vs in sorted(by_pair.items()):
        if len(vs) >= PRIOR_MIN_ROWS:
            a = np.asarray(vs)
            out.setdefault(t, {})[m] = [round(float(a.mean() - np.mean(by_task[t])), 6),
                                        round(float(a.std()), 6), round(math.log1p(a.size), 6)]
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
    encoder: PromptEncoder | None = None,
) -> dict[str, Any]:
    """Fit, calibrate and save a model directory (model, text model, metadata).

    ``encoder``: train the encoder tier (one more feature: a ridge head on the prompt's
    sentence embedding, out of fold for the fit rows as the text scores are).
    """
    import xgboost as xgb

    t0 = time.perf_counter()
    parts = split(records)
    fit_rows, cal_rows = parts["train"], parts["calib"]
    if not fit_rows or not cal_rows:
        raise ValueError("need rows in both the train and calib splits")
    folds = np.array([_fold(r) for r in fit_rows])
    # Text models and model priors from the fit rows. The booster is trained on
    # out-of-fold values for the fit rows, so they are as noisy as on unseen prompts.
    arrays, oof = _fit_text_models(fit_rows, folds)
    prior = _prior_table(fit_rows)
    head = None
    if encoder is not None:
        embed_prompts(encoder, list(fit_rows) + list(cal_rows), "training")
        ew, eb, enc_oof = _fit_encoder_heads(fit_rows, folds, encoder)
        head = EncoderHead(ew, eb, encoder)
    featurizer = F.Featurizer(text_model_from_arrays(arrays), prior, encoder_head=head)
    x_fit, y_fit = featurize(fit_rows, featurizer)
    x_fit[:, _SCORE_COLS] = oof
    if head is not None:
        x_fit[:, F.N_FEATURES] = enc_oof
    for k in range(NGRAM_FOLDS):
        m = folds == k
        fz = F.Featurizer(None, _prior_table([r for r, in_k in zip(fit_rows, m, strict=True)
                                              if not in_k]))
        x_fit[np.flatnonzero(m)[:, None], _PRIOR_COLS] = np.asarray(
            [fz.prior_of(str(r.get("task") or "chat"), str(r.get("model") or "default"))
             for r, keep in zip(fit_rows, m, strict=True) if keep], dtype=np.float32
        ).reshape(-1, len(_PRIOR_COLS))
    # History dropout: one model for both cases, with and without online history.
    drop = np.random.default_rng(DROPOUT_SEED).random(len(fit_rows)) < HISTORY_DROPOUT
    x_fit[np.flatnonzero(drop)[:, None], np.arange(F.HISTORY_OFFSET, F.N_FEATURES)] = \
        np.asarray(F.BLANK_HISTORY, dtype=np.float32)
    p = dict(DEFAULT_PARAMS, **(ENCODER_PARAMS if encoder is not None else {}), **(params or {}))
    names = list(F.FEATURE_NAMES) + ([F.ENCODER_FEATURE] if head is not None else [])
    dtrain = xgb.DMatrix(x_fit, label=np.log1p(y_fit), feature_names=names)
    booster = xgb.train(p, dtrain, num_boost_round=rounds)
    # Conformal P90/P99 corrections: rows with online history (calib featurized in
    # arrival order) and rows without any (the same rows, history blanked).
    cal_tasks = [str(r.get("task")) for r in cal_rows]
    offsets: dict[str, dict[str, list[float]]] = {}
    for name, hist in (("history", True), ("no_history", False)):
        x_cal, y_cal = featurize(cal_rows, featurizer, history=hist)
        keep = np.ones(len(cal_rows), dtype=bool) if not hist else np.array(
            [F.has_history(row) for row in x_cal.tolist()], dtype=bool)
        cal_log = booster.inplace_predict(x_cal[keep]).reshape(-1, len(QUANTILES))
        offsets[name] = _conformal(cal_log, np.log1p(y_cal[keep]),
                                   [t for t, k in zip(cal_tasks, keep, strict=True) if k],
                                   min_calib_rows)
    train_s = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    booster.feature_names = None  # smaller JSON; names live in the metadata
    raw = booster.save_raw("json")
    (out_dir / MODEL_FILE).write_bytes(gzip.compress(bytes(raw), 9, mtime=0))
    (out_dir / TEXT_MODEL_FILE).write_bytes(_npz_bytes(arrays))
    for stale in (out_dir / NGRAM_FILE, out_dir / ENCODER_FILE):  # version 1's; a tier's
        if stale.exists():
            stale.unlink()
    if head is not None:
        (out_dir / ENCODER_FILE).write_bytes(_npz_bytes({"w": ew, "b": eb}))
    both = list(fit_rows) + list(cal_rows)
    baseline = TaskMedianPredictor.fit([str(r.get("task")) for r in both],
                                       [float(r["output_tokens"]) for r in both])
    meta: dict[str, Any] = {
        "feature_version": F.FEATURE_VERSION,
        "feature_names": names,
        "target": "log1p(output_tokens)",
        "quantiles": list(QUANTILES),
        "token_conversion": "tokens = ceil(chars / 4)",
        "conformal_offsets": offsets["history"],
        "conformal_offsets_no_history": offsets["no_history"],
        "model_prior": prior,
        "hint_weight": 1.0,
        "baseline": baseline.to_json(),
        "params": {k: v for k, v in p.items()},
        "rounds": rounds,
        "text_model": {"space": F.TEXT_SPACE, "ridge": TEXT_RIDGE,
                       "tasks": list(F.TEXT_MODEL_TASKS), "char_ngrams": list(F.CHAR_NGRAMS)},
        "history_dropout": HISTORY_DROPOUT,
        "rows": {"train": len(fit_rows), "calib": len(cal_rows),
                 "heldout_excluded": len(parts["heldout"])},
        "data_sha256": _records_sha(both),
        "xgboost": xgb.__version__,
    }
    if head is not None:
        assert encoder is not None
        meta["encoder"] = {"name": ENCODER_NAME, "weights_sha256": ENCODER_WEIGHTS_SHA256,
                           "max_tokens": encoder.max_tokens, "pooling": "mean, L2-normalised",
                           "max_chars": F.ENCODER_CHARS, "ridge": ENCODER_RIDGE}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    # Not in the file (keeps the shipped files byte-reproducible), but reported.
    meta["train_seconds"] = round(train_s, 2)
    return meta


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``numpy.savez_compressed`` with fixed zip timestamps (byte-reproducible files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]),
                                      allow_pickle=False)
            zf.writestr(info, arr.getvalue(), compresslevel=9)
    return buf.getvalue()


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
    history: bool = True,
) -> dict[str, Any]:
    """MAE of p50, P90/P99 coverage, and the per-task-median baseline's MAE.

    ``history=True`` (online): history features are rebuilt online over ``records``, in
    order (predict, then observe). ``history=False``: no row has any history (every
    prompt, workflow and model is new to the dispatcher). The predictor's own online state
    is not used (no online recalibration either: this measures the model).
    """
    if baseline is None:
        b = predictor.meta.get("baseline")
        baseline = TaskMedianPredictor(b["table"], b["overall"]) if b else \
            TaskMedianPredictor.fit([str(r.get("task")) for r in records],
                                    [float(r["output_tokens"]) for r in records])
    if predictor.encoder is not None:
        embed_prompts(predictor.encoder, records, "evaluation")
    x, y = featurize(records, predictor.featurizer, prompt_history=prompt_history,
                     history=history)
    preds = predictor.predict_features(x.tolist()) if len(records) else []
    base = [baseline.predict(to_input(r)) for r in records]
    tasks = [str(r.get("task") or "chat") for r in records]
    metrics = _metrics(preds, base, y, tasks)
    metrics["history"] = history
    metrics["prompt_history"] = prompt_history and history
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
