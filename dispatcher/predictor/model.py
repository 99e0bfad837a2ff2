"""Output-length predictors: XGBoost quantile model and deterministic baselines.

The XGBoost model predicts log1p(output tokens) at the quantiles 0.5, 0.9, 0.99 (one
multi-output ``reg:quantileerror`` booster). At load time its trees are compiled into
padded, complete binary trees held in flat numpy arrays and evaluated level by level over
all trees at once (``_Forest``), so a single row costs a handful of numpy calls instead of
an XGBoost C call + DMatrix, and importing xgboost is never needed at run time. Thresholds
and features are compared in float32, exactly as XGBoost does, so the compiled forest
chooses the same leaves as the booster.

``predict_features`` is a pure function of (model file, feature rows): replay calls it with
the recorded features. ``predict`` adds the online state (hint blending and the online
quantile recalibration learnt by ``observe``) on top; see ``docs/predictor.md``.
"""

from __future__ import annotations

import abc
import functools
import gzip
import hashlib
import io
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
from goodserve.dispatcher.predictor import features as F

if TYPE_CHECKING:
    from goodserve.dispatcher.predictor.encoder import PromptEncoder
    from goodserve.schemas import AgentRequest

QUANTILES = (0.5, 0.9, 0.99)
MODEL_FILE = "model.json.gz"
"""XGBoost's JSON model format, gzip-compressed (``xgboost`` can load the unzipped JSON)."""
NGRAM_FILE = "ngram_weights.json.gz"
"""Version 1's text weights (no longer written; removed by ``train``)."""
TEXT_MODEL_FILE = "text_model.npz"
"""Per-task word and character n-gram ridge weights and IDF (float16, numpy ``savez``)."""
META_FILE = "metadata.json"
ENCODER_FILE = "encoder_head.npz"
"""The encoder tier's per-task ridge heads on the sentence embedding (``w``, ``b``)."""
_Z90 = NormalDist().inv_cdf(0.9)
_Z99 = NormalDist().inv_cdf(0.99)
_ND = NormalDist()
MIN_LOG_SPREAD = 0.05
"""Smallest log1p(P90) - log1p(P50) assumed by ``conditional_remaining`` (about 5%)."""


class PredictorInput(msgspec.Struct, kw_only=True):
    """What the router knows about a request before it runs.

    ``request_id`` is never a feature: it only lets evaluation predictors that look
    lengths up per request (the simulator's oracle) take the same input as every other.
    """

    input_tokens: int
    task: str = "chat"
    model: str = "default"
    prompt: str | None = None
    workflow_id: str | None = None
    step: int = 0
    output_tokens_hint: int | None = None
    request_id: str | None = None

    @classmethod
    def from_request(cls, req: AgentRequest, input_tokens: int) -> PredictorInput:
        """The predictor's view of a request (never its true output length)."""
        return cls(
            input_tokens=input_tokens,
            task=req.task,
            model=req.model,
            prompt=req.prompt,
            workflow_id=req.workflow_id,
            step=req.step,
            output_tokens_hint=req.output_tokens_hint,
            request_id=req.request_id,
        )


class LengthPrediction(msgspec.Struct, frozen=True):
    """Predicted output length quantiles, in tokens (p50 <= p90 <= p99)."""

    p50: float
    p90: float
    p99: float = 0.0


# --------------------------------------------------------------------------------------
# Distribution helpers


def _log_quantile_fn(pred: LengthPrediction) -> tuple[float, float, float, float]:
    """(a, b, s1, s2): log1p(L) as a piecewise-linear function of the normal score z."""
    a = math.log1p(max(pred.p50, 0.0))
    b = max(math.log1p(max(pred.p90, 0.0)), a)
    p99 = pred.p99 if pred.p99 > 0 else math.expm1(b + (b - a) * (_Z99 - _Z90) / _Z90)
    c = max(math.log1p(p99), b)
    b = max(b, a + MIN_LOG_SPREAD)
    s1 = (b - a) / _Z90
    s2 = max((c - b) / (_Z99 - _Z90), s1)  # the tail is never thinner than the body
    return a, b, s1, s2


def conditional_remaining(pred: LengthPrediction, generated: int | float, q: float = 0.9) -> float:
    """Remaining-token q-quantile given ``generated`` tokens already produced.

    The predicted distribution is log1p(L) piecewise linear in the normal score through
    (p50, p90, p99) (a log-normal-like body with its own tail, never thinner than the
    body, so a request past its P99 still expects more tokens), conditioned on
    L > generated: the answer is Q(F(g) + q (1 - F(g))) - g. The conditional total
    g + remaining is non-decreasing in ``generated`` and in ``q``.
    """
    q = min(max(q, 0.0), 1.0 - 1e-9)
    g = max(float(generated), 0.0)
    a, b, s1, s2 = _log_quantile_fn(pred)
    y = math.log1p(g)
    z = (y - a) / s1 if y <= b else _Z90 + (y - b) / s2
    sf = 0.5 * math.erfc(z / math.sqrt(2.0))
    target = (1.0 - q) * sf
    if target > 1e-300:
        zq = max(-_ND.inv_cdf(min(target, 1.0 - 1e-16)), z)
    else:  # far in the tail: Mills-ratio asymptote of the normal survival function
        zq = math.sqrt(max(z, 0.0) ** 2 - 2.0 * math.log(1.0 - q)) if z > 0 else z
    lq = a + s1 * zq if zq <= _Z90 else b + s2 * (zq - _Z90)
    return max(math.expm1(lq) - g, 0.0)


class _Base(abc.ABC):
    """Shared behaviour of all predictors (batch, conditional remaining)."""

    version: str = "base"

    @abc.abstractmethod
    def features(self, x: PredictorInput) -> list[float]:
        """The feature vector of a request (recorded in decisions for replay)."""

    @abc.abstractmethod
    def predict_features(self, feats: Sequence[Sequence[float]]) -> list[LengthPrediction]:
        """Predictions as a pure function of feature vectors."""

    def _post(self, pred: LengthPrediction, x: PredictorInput) -> LengthPrediction:
        """What a prediction becomes for this input (the client's hint)."""
        return _apply_hint(pred, x.output_tokens_hint, 1.0)

    def predict(self, x: PredictorInput) -> LengthPrediction:
        return self._post(self.predict_features([self.features(x)])[0], x)

    def predict_batch(
        self, xs: Sequence[PredictorInput], feats: Sequence[Sequence[float]] | None = None
    ) -> list[LengthPrediction]:
        """Predictions of many inputs at once; ``feats``: their ``features``, if already made."""
        if feats is None:
            feats = [self.features(x) for x in xs]
        preds = self.predict_features(feats)
        return [self._post(p, x) for p, x in zip(preds, xs, strict=True)]

    def observe(self, x: PredictorInput, actual_output_tokens: int) -> None:
        """Baselines learn nothing online."""
        return None

    def observe_many(self, items: Sequence[tuple[PredictorInput, int]]) -> None:
        """``observe`` each (input, actual length) in order."""
        for x, y in items:
            self.observe(x, y)

    def conditional_remaining(
        self, pred: LengthPrediction, generated: int, q: float = 0.9
    ) -> float:
        return conditional_remaining(pred, generated, q)


def shift_prediction(pred: LengthPrediction, loc: float, spread: float) -> LengthPrediction:
    """Move every quantile by ``loc`` and the P90/P99 by ``spread`` more (log1p space),
    keeping them in order: the online recalibration's arithmetic, shared with the audit."""
    shift = loc + spread
    if not (shift or loc):
        return pred
    log1p, expm1 = math.log1p, math.expm1
    p50 = expm1(log1p(pred.p50) + loc) if loc else pred.p50
    out = LengthPrediction(
        p50=p50,
        p90=max(expm1(log1p(pred.p90) + shift), p50),
        p99=max(expm1(log1p(pred.p99) + shift), p50),
    )
    if out.p99 < out.p90:
        out = LengthPrediction(out.p50, out.p90, out.p90)
    return out


def _apply_hint(pred: LengthPrediction, hint: int | None, weight: float) -> LengthPrediction:
    """Blend a client's output-length hint into the median, keeping the predicted spread.

    log p50' = w log1p(hint) + (1-w) log1p(p50); p90 and p99 move by the same log shift
    (so the hint is treated as the client's median and the model's uncertainty is kept).
    """
    if hint is None or hint <= 0 or weight <= 0:
        return pred
    a = math.log1p(pred.p50)
    shift = weight * (math.log1p(hint) - a)
    return LengthPrediction(
        p50=math.expm1(a + shift),
        p90=math.expm1(math.log1p(pred.p90) + shift),
        p99=math.expm1(math.log1p(pred.p99) + shift),
    )


# --------------------------------------------------------------------------------------
# Compiled forest


class _Forest:
    """All trees padded to depth D, stored level-order in flat arrays.

    Node i of tree t lives at ``t * S + i`` (S = 2^(D+1) - 1); its children are adjacent,
    at ``left[k]`` (x < thr) and ``left[k] + 1`` (x >= thr); padding nodes have thr=+inf
    (always left). Nodes >= 2^D - 1 are leaves: ``val[:, k]`` is the leaf's contribution
    to each output (one column per quantile; single-output trees fill their group's row).
    Trees are summed along a contiguous last axis, so a row's result does not depend on
    the batch it is evaluated in (replay gets the same bits).

    The walk reads the same nodes level by level: level l's splits in their own arrays,
    node j of tree t at ``t * 2^l + j``, so a node's children on the next level are ``2k``
    (x < thr) and ``2k + 1``, and the leaves' values alone (``_leaf_val``, tree t's leaf j
    at ``t * 2^D + j``). No child table to gather, and a third of the memory to touch.
    """

    def __init__(self, booster_json: dict[str, Any]) -> None:
        learner = booster_json["learner"]
        lmp = learner["learner_model_param"]
        model = learner["gradient_booster"]["model"]
        trees = model["trees"]
        info = [int(g) for g in model["tree_info"]]
        n_out = max(int(lmp.get("num_target", "1") or 1), max(info) + 1 if info else 1)
        base = lmp["base_score"]
        base_arr = np.atleast_1d(
            np.asarray(json.loads(base) if base.startswith("[") else [float(base)], np.float64)
        )
        if base_arr.size == 1 and n_out > 1:
            base_arr = np.repeat(base_arr, n_out)
        self.base_score = base_arr
        self.n_out = n_out
        self.depth = d = max((self._depth(t, 0) for t in trees), default=0)
        self.n_trees = n = len(trees)
        size = 2 ** (d + 1) - 1
        self.size = size
        feat = np.zeros(n * size, dtype=np.intp)
        thr = np.full(n * size, np.inf, dtype=np.float32)
        val = np.zeros((n_out, n * size), dtype=np.float64)
        for t, tree in enumerate(trees):
            k = int(tree.get("tree_param", {}).get("size_leaf_vector", "1") or 1)
            leaf_of: dict[int, list[float]] = {}
            if k > 1:
                lw = tree["leaf_weights"]
                leaves = [i for i, c in enumerate(tree["left_children"]) if c == -1]
                leaf_of = {node: lw[j * k : (j + 1) * k] for j, node in enumerate(leaves)}
            self._fill(tree, 0, 0, 0, d, t * size, feat, thr, val, info[t], leaf_of)
        local = np.arange(n * size, dtype=np.intp) % size
        self.left = (np.arange(n * size, dtype=np.intp) - local) + np.minimum(
            2 * local + 1, size - 1
        )
        self.feat, self.thr, self.val = feat, thr, val
        self.roots = np.arange(n, dtype=np.intp) * size
        # the walk's layout (see the class): each level's splits, the leaves' values
        by_tree_f, by_tree_t = feat.reshape(n, size), thr.reshape(n, size)
        levels = [slice(2**lv - 1, 2 ** (lv + 1) - 1) for lv in range(d)]
        self._lvl_feat = [np.ascontiguousarray(by_tree_f[:, s]).reshape(-1) for s in levels]
        self._lvl_thr = [np.ascontiguousarray(by_tree_t[:, s]).reshape(-1) for s in levels]
        last_level = val.reshape(n_out, n, size)[:, :, 2**d - 1 :]
        self._leaf_val = np.ascontiguousarray(last_level).reshape(n_out, -1)
        self._trees = np.arange(n, dtype=np.intp)  # each tree's root on level 0
        self._trees2 = 2 * self._trees  # their left children on level 1
        self._rowoff: dict[tuple[int, int], np.ndarray] = {}
        self.n_features = int(lmp.get("num_feature", 0))

    @staticmethod
    def _depth(tree: dict[str, Any], node: int) -> int:
        left = tree["left_children"][node]
        if left == -1:
            return 0
        right = tree["right_children"][node]
        return 1 + max(_Forest._depth(tree, left), _Forest._depth(tree, right))

    @staticmethod
    def _fill(
        tree: dict[str, Any],
        node: int,
        pos: int,
        level: int,
        d: int,
        off: int,
        feat: np.ndarray,
        thr: np.ndarray,
        val: np.ndarray,
        group: int,
        leaf_of: dict[int, list[float]],
    ) -> None:
        left = tree["left_children"][node]
        if left == -1:  # leaf: replicate down to depth d (padding nodes always go left)
            if level == d:
                if leaf_of:
                    val[:, off + pos] = leaf_of[node]
                else:
                    val[group, off + pos] = tree["split_conditions"][node]
            else:
                for child in (2 * pos + 1, 2 * pos + 2):
                    _Forest._fill(
                        tree, node, child, level + 1, d, off, feat, thr, val, group, leaf_of
                    )
            return
        if tree.get("split_type") and tree["split_type"][node]:
            raise ValueError("categorical splits are not supported")
        feat[off + pos] = tree["split_indices"][node]
        thr[off + pos] = np.float32(tree["split_conditions"][node])
        _Forest._fill(tree, left, 2 * pos + 1, level + 1, d, off, feat, thr, val, group, leaf_of)
        _Forest._fill(
            tree,
            tree["right_children"][node],
            2 * pos + 2,
            level + 1,
            d,
            off,
            feat,
            thr,
            val,
            group,
            leaf_of,
        )

    def _row_offsets(self, n_rows: int, n_feat: int) -> np.ndarray:
        """Each row's offset in the flattened batch, one per (row, tree), read-only: a full
        array adds at half the cost of a broadcast column (kept per batch shape)."""
        key = (n_rows, n_feat)
        off = self._rowoff.get(key)
        if off is None:
            col = np.arange(n_rows, dtype=np.intp) * n_feat
            off = np.repeat(col[:, None], self.n_trees, axis=1)
            off.flags.writeable = False
            if len(self._rowoff) >= 16:
                self._rowoff.clear()
            self._rowoff[key] = off
        return off

    def margin_row(self, row: np.ndarray) -> np.ndarray:
        """Raw margins of one float32 row, shape (n_out,)."""
        k = self._trees
        for feat, thr in zip(self._lvl_feat, self._lvl_thr, strict=True):
            k = 2 * k + (row.take(feat.take(k)) >= thr.take(k))
        out: np.ndarray = self._leaf_val.take(k, axis=1).sum(axis=-1) + self.base_score
        return out

    def margin(self, x: np.ndarray) -> np.ndarray:
        """Raw margins, shape (n_rows, n_out); ``x`` is float32 (n_rows, n_features)."""
        n_rows, n_feat = x.shape
        flat = x.reshape(-1)
        rowoff = self._row_offsets(n_rows, n_feat)
        k = np.broadcast_to(self._trees, (n_rows, self.n_trees))
        # Every index is in range by construction, so the gathers take mode "wrap": the same
        # elements as the default "raise", without its bounds checks (a fifth faster).
        if self.depth:  # level 0 from the roots' splits, which every row shares
            f0, t0 = self._lvl_feat[0], self._lvl_thr[0]
            k = self._trees2 + (flat.take(f0 + rowoff, mode="wrap") >= t0).astype(np.intp)
        for lv in range(1, self.depth):  # in place: fewer temporaries, the same nodes
            f = self._lvl_feat[lv].take(k, mode="wrap")
            f += rowoff
            c = flat.take(f, mode="wrap") >= self._lvl_thr[lv].take(k, mode="wrap")
            k += k  # 2k: the left child
            k += c.astype(np.intp)  # (an integer add: half the cost of adding the booleans)
        # Contiguous (n_out * n_rows, n_trees): the same pairwise sum as ``margin_row``.
        leaves = self._leaf_val.take(k, axis=1, mode="wrap").reshape(-1, self.n_trees)
        out: np.ndarray = leaves.sum(axis=-1).reshape(self.n_out, n_rows).T + self.base_score
        return out


_ROWS = {n: struct.Struct(f"{n}d") for n in (F.N_FEATURES, F.N_FEATURES + 1)}


def _rows_f32(feats: Sequence[Sequence[float]], n: int = F.N_FEATURES) -> np.ndarray:
    """``np.asarray(feats, dtype=np.float32)``: rows of Python floats are packed as doubles
    by ``struct`` first, which costs half of numpy's per-element conversion (the same
    values: each double is rounded to float32 once either way)."""
    row = _ROWS.get(n)
    if row is not None and isinstance(feats, list) and all(
        type(f) is list and len(f) == n for f in feats
    ):
        try:
            raw = b"".join([row.pack(*f) for f in feats])
        except struct.error:  # not all numbers: numpy's conversion says why
            return np.asarray(feats, dtype=np.float32)
        return np.frombuffer(raw, dtype=np.float64).astype(np.float32).reshape(len(feats), -1)
    return np.asarray(feats, dtype=np.float32)


_FORESTS: dict[str, _Forest] = {}
"""Compiled forests by model version (immutable, shared by predictor instances)."""


# --------------------------------------------------------------------------------------
# The XGBoost predictor


class OutputLengthPredictor(_Base):
    """XGBoost quantile model of the output length (tokens), with online history.

    ``features`` reads the online history (updated by ``observe``); ``predict_features``
    is pure; ``predict`` = predict_features + hint blending + online calibration.
    """

    def __init__(
        self,
        booster_json: dict[str, Any],
        meta: dict[str, Any],
        *,
        version: str,
        text_model: F.TextModel | None = None,
        online_calibration: bool = True,
        hint_weight: float | None = None,
        encoder_head: tuple[np.ndarray, np.ndarray] | None = None,
        encoder: PromptEncoder | None = None,
    ) -> None:
        if meta.get("feature_version") != F.FEATURE_VERSION:
            raise ValueError(
                f"model feature_version {meta.get('feature_version')} != {F.FEATURE_VERSION}"
            )
        self.version = version
        self.meta = meta
        forest = _FORESTS.get(version)
        if forest is None:
            if len(_FORESTS) >= 8:
                _FORESTS.clear()
            forest = _FORESTS[version] = _Forest(booster_json)
        self._forest = forest
        head = None
        enc_meta = meta.get("encoder")
        if enc_meta:  # the encoder tier: one more feature, from a sentence encoder
            from goodserve.dispatcher.predictor.encoder import EncoderHead, PromptEncoder

            if encoder_head is None:
                raise ValueError(f"model needs the encoder head file ({ENCODER_FILE})")
            if encoder is None:
                encoder = PromptEncoder(max_tokens=int(enc_meta.get("max_tokens", 256)))
            head = EncoderHead(encoder_head[0], encoder_head[1], encoder)
        self.featurizer = F.Featurizer(text_model, meta.get("model_prior"), encoder_head=head)
        self.n_features = self.featurizer.n_features
        if self._forest.n_features and self._forest.n_features != self.n_features:
            raise ValueError(f"model has {self._forest.n_features} features, need "
                             f"{self.n_features}")
        # Conformal corrections (log1p space) per task bucket, shape (2 * n_tasks, 3):
        # rows 0..n-1 for feature rows with online history, n..2n-1 for rows without.
        n_t = len(F.TASKS)
        off = np.zeros((2 * n_t, len(QUANTILES)), dtype=np.float64)
        with_h = meta.get("conformal_offsets") or {}
        for base, table in ((0, with_h), (n_t, meta.get("conformal_offsets_no_history") or with_h)):
            for t, vals in table.items():
                if t in F.TASK_INDEX:
                    off[base + F.TASK_INDEX[t]] = vals
        self._task_offsets = off
        self.history = F.History()
        self.online_calibration = online_calibration
        self.hint_weight = float(
            meta.get("hint_weight", 1.0) if hint_weight is None else hint_weight
        )
        self.calib_rate = 0.02
        self._calib: dict[str, float] = {}  # per task bucket: extra log1p shift of p90/p99
        # per task bucket: log1p shift of every quantile, so that half the actual lengths
        # stay below the P50 when the traffic is not what the model was trained on
        self._median: dict[str, float] = {}
        self._last: tuple[PredictorInput, list[float]] | None = None

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: str | Path, *, lazy_encoder: bool = False, **kwargs: Any
    ) -> OutputLengthPredictor:
        """Load a model directory (model.json.gz, text_model.npz, metadata.json, and for
        the encoder tier encoder_head.npz). An encoder-tier model also loads its sentence
        encoder now (``encoder=``: one to share), so a missing one fails here, with
        ``encoder.EncoderUnavailable``, not at the first request; ``lazy_encoder``: at the
        first prompt instead (a replay, which scores recorded features, needs none)."""
        booster_json, meta, text_model, version, head = _read_dir(Path(path))
        p = cls(booster_json, meta, version=version, text_model=text_model,
                encoder_head=head, **kwargs)
        if p.encoder is not None and not lazy_encoder:
            p.encoder.load()
        return p

    @classmethod
    def encoder_tier(cls, **kwargs: Any) -> OutputLengthPredictor:
        """The shipped encoder-tier model (goodserve/data/predictor-encoder): needs the
        ``encoder`` extra. Costs milliseconds of CPU per new prompt; see docs/predictor.md."""
        return cls.load(default_model_dir().parent / "predictor-encoder", **kwargs)

    @classmethod
    def from_spec(cls, spec: str | Path | None) -> OutputLengthPredictor:
        """``default`` (or None / empty): the shipped model; ``encoder``: the shipped
        encoder tier; anything else: a model directory."""
        name = str(spec or "default")
        if name == "default":
            return cls.default()
        if name == "encoder":
            return cls.encoder_tier()
        return cls.load(name)

    @property
    def encoder(self) -> PromptEncoder | None:
        """The sentence encoder of an encoder-tier model (None: the plain model)."""
        head = self.featurizer.encoder_head
        return head.encoder if head is not None else None

    def prepare(self, xs: Sequence[PredictorInput]) -> int:
        """Embed, in one batch, the prompts among ``xs`` that the encoder tier has not seen
        (the slow part of ``features``; nothing to do for a plain model). The dispatcher
        runs this off its event loop, then routes. Returns the number of prompts given to
        the encoder (cached ones included: it skips those itself)."""
        enc = self.encoder
        if enc is None:
            return 0
        prompts = list(dict.fromkeys(x.prompt[: F.ENCODER_CHARS] for x in xs if x.prompt))
        if prompts:
            enc.embed(prompts)
        return len(prompts)

    @classmethod
    def default(cls) -> OutputLengthPredictor:
        """The shipped model (goodserve/data/predictor), parsed once per process.

        Each call returns a fresh predictor object (own online state) sharing the
        parsed model; use one instance per router.
        """
        booster_json, meta, text_model, version, head = _shipped()
        return cls(booster_json, meta, version=version, text_model=text_model,
                   encoder_head=head)

    # -- features and prediction ---------------------------------------------------------

    def features(self, x: PredictorInput) -> list[float]:
        f = self.featurizer.extract(  # positional: input_tokens, task, model, prompt, step
            x.input_tokens,
            x.task,
            x.model,
            x.prompt,
            x.step,
            self.history.features(x.task, x.workflow_id, x.step, x.model, x.prompt),
        )
        self._last = (x, f)
        return f

    def _features_of(self, x: PredictorInput) -> list[float]:
        """``features(x)``, reusing the vector just computed for this same input object.

        The router calls ``features(x)`` (to record) then ``predict(x)``: the second
        extraction is skipped. ``observe``/``reset`` invalidate it (history moved).
        """
        last = self._last
        if last is not None and last[0] is x:
            return last[1]
        return self.features(x)

    def predict_features(self, feats: Sequence[Sequence[float]]) -> list[LengthPrediction]:
        n = len(feats)
        if n == 0:
            return []
        t0, t1 = F.TASK_OFFSET, F.TASK_OFFSET + len(F.TASKS)
        if n == 1:  # fast path; same arithmetic as the batch path, so the same bits
            row = np.array(feats[0], dtype=np.float32)
            if row.shape != (self.n_features,):
                raise ValueError(f"expected {self.n_features} features, got shape {row.shape}")
            onehot = list(feats[0][t0:t1])
            task = onehot.index(1.0) if 1.0 in onehot else len(F.TASKS) - 1
            if not F.has_history(feats[0]):
                task += len(F.TASKS)
            margins = [(self._forest.margin_row(row) + self._task_offsets[task]).tolist()]
        else:
            x = _rows_f32(feats, self.n_features)
            if x.ndim != 2 or x.shape[1] != self.n_features:
                raise ValueError(f"expected rows of {self.n_features} features, got {x.shape}")
            oh = x[:, t0:t1]
            tasks = np.where(oh.max(axis=1) == 1.0, oh.argmax(axis=1), len(F.TASKS) - 1)
            counts = x[:, [F.HISTORY_OFFSET + i for i in F.HISTORY_COUNT_COLS]]
            tasks = tasks + np.where(counts.max(axis=1) > 0.0, 0, len(F.TASKS))
            margins = (self._forest.margin(x) + self._task_offsets[tasks]).tolist()
        out = []
        expm1 = math.expm1
        for a, b, c in margins:  # max(a, 0.0), max(b, a), max(c, b), without the calls
            a = 0.0 if 0.0 > a else a
            b = a if a > b else b
            c = b if b > c else c
            out.append(LengthPrediction(expm1(a), expm1(b), expm1(c)))
        return out

    def _post(self, pred: LengthPrediction, x: PredictorInput) -> LengthPrediction:
        if self.online_calibration and (self._calib or self._median):
            tb = F.task_bucket(x.task)
            pred = shift_prediction(pred, self._median.get(tb, 0.0), self._calib.get(tb, 0.0))
        return _apply_hint(pred, x.output_tokens_hint, self.hint_weight)

    def location_shift(self, x: PredictorInput) -> float:
        """The online location shift ``predict(x)`` applies (log1p; 0.0: none). Decisions
        record it, so that an audit recomputes their P50 exactly."""
        if not (self._median and self.online_calibration):
            return 0.0
        return self._median.get(F.task_bucket(x.task), 0.0)

    def predict(self, x: PredictorInput) -> LengthPrediction:
        return self._post(self.predict_features([self._features_of(x)])[0], x)

    def predict_batch(
        self, xs: Sequence[PredictorInput], feats: Sequence[Sequence[float]] | None = None
    ) -> list[LengthPrediction]:
        """As ``_Base.predict_batch``; a row with no hint and no recalibration learnt yet
        keeps its prediction as it is (what ``_post`` would return), without the call."""
        if feats is None:
            feats = [self.features(x) for x in xs]
        preds = self.predict_features(feats)
        if (self._calib or self._median) and self.online_calibration:
            return [self._post(p, x) for p, x in zip(preds, xs, strict=True)]
        return [
            p if x.output_tokens_hint is None else self._post(p, x)
            for p, x in zip(preds, xs, strict=True)
        ]

    # -- online learning -----------------------------------------------------------------

    def observe(
        self,
        x: PredictorInput,
        actual_output_tokens: int,
        *,
        prediction: LengthPrediction | None = None,
    ) -> None:
        """Record a finished request: history features and the online recalibration.

        Recalibration is adaptive conformal inference in log space, per task bucket, in
        two trackers. The location moves every quantile by +rate*0.5 when the actual
        length is above the P50 and -rate*0.5 when not, so half the lengths stay below
        the P50 when the traffic is unlike the training data (the Azure code trace: about
        10 tokens where the model says 35). On top of it, the P90/P99 shift grows by
        rate*0.9 after a miss (actual > p90) and shrinks by rate*0.1 after a cover, so the
        long-run P90 miss rate tracks 10% under drift.
        Pass the ``prediction`` made at decision time (without the hint) to skip
        re-predicting; otherwise it is recomputed from the current history.
        """
        if self.online_calibration:
            pred = prediction or self._post(
                self.predict_features([self.features(x)])[0],
                msgspec.structs.replace(x, output_tokens_hint=None),
            )
            self._recalibrate(F.task_bucket(x.task), pred, actual_output_tokens)
        self._last = None
        self.history.observe(x.task, x.workflow_id, x.step, actual_output_tokens, x.model, x.prompt)

    def observe_many(self, items: Sequence[tuple[PredictorInput, int]]) -> None:
        """``observe`` each (input, actual length) in order, with the same result, but one
        forest walk for all of them (8.7 us a row for 8 rows instead of 23 us one by one):
        each row's features see the history of the rows before it, the forest depends on
        the features alone, and the recalibration is then applied in order."""
        if len(items) < 2 or not self.online_calibration:
            for x, y in items:
                self.observe(x, y)
            return
        feats = []
        for x, y in items:
            feats.append(self.features(x))
            self.history.observe(x.task, x.workflow_id, x.step, y, x.model, x.prompt)
        raws = self.predict_features(feats)
        for (x, y), raw in zip(items, raws, strict=True):
            pred = self._post(raw, msgspec.structs.replace(x, output_tokens_hint=None))
            self._recalibrate(F.task_bucket(x.task), pred, y)
        self._last = None

    def _recalibrate(self, tb: str, pred: LengthPrediction, actual: int) -> None:
        """One step of both trackers: the location (every quantile, so that half the
        lengths fall below the P50) and the P90/P99's own shift (10% above the P90)."""
        rate = self.calib_rate
        above = 1.0 if actual > pred.p50 else 0.0
        loc = self._median.get(tb, 0.0) + rate * (above - 0.5)
        self._median[tb] = min(max(loc, -2.0), 2.0)
        miss = 1.0 if actual > pred.p90 else 0.0
        cur = self._calib.get(tb, 0.0) + rate * (miss - 0.1)
        self._calib[tb] = min(max(cur, -2.0), 2.0)

    def calibration_shifts(self) -> dict[str, float]:
        """The online P90/P99 log1p shifts per task bucket, on top of the location."""
        return dict(self._calib)

    def median_shifts(self) -> dict[str, float]:
        """The online log1p shift of every quantile per task bucket (the P50's tracker)."""
        return dict(self._median)

    def reset(self) -> None:
        """Forget all online state (history and recalibration)."""
        self.history.clear()
        self._calib.clear()
        self._median.clear()
        self._last = None


def default_model_dir() -> Path:
    import goodserve

    return Path(goodserve.__file__).resolve().parent / "data" / "predictor"


_ModelFiles = tuple[
    dict[str, Any], dict[str, Any], F.TextModel | None, str, tuple[np.ndarray, np.ndarray] | None
]
"""A model directory parsed: booster JSON, metadata, text model, version, encoder head."""


def _read_dir(d: Path) -> _ModelFiles:
    """Parse a model directory; the version hashes the model, metadata, text model and
    encoder head files."""
    if not d.is_dir():
        raise FileNotFoundError(f"not a predictor model directory: {d}")
    mpath = d / MODEL_FILE
    if not mpath.exists() and (d / "model.json").exists():
        mpath = d / "model.json"
    raw = mpath.read_bytes()
    h = hashlib.sha256(raw)
    text = gzip.decompress(raw) if mpath.suffix == ".gz" else raw
    meta_raw = (d / META_FILE).read_bytes()
    h.update(meta_raw)  # conformal offsets, priors and hint weight change predictions too
    meta = json.loads(meta_raw)

    def arrays_of(name: str) -> dict[str, np.ndarray] | None:
        """A numpy zip of the directory as float64 arrays (hashed into the version)."""
        path = d / name
        if not path.exists():
            return None
        raw = path.read_bytes()
        h.update(raw)
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}

    text_model = None
    if (t := arrays_of(TEXT_MODEL_FILE)) is not None:
        text_model = F.TextModel(t["word_w"], t["char_w"], t["word_idf"], t["char_idf"])
    head = None
    if (e := arrays_of(ENCODER_FILE)) is not None:
        head = (e["w"], e["b"])
    return json.loads(text), meta, text_model, "xgb-" + h.hexdigest()[:12], head


@functools.lru_cache(maxsize=1)
def _shipped() -> _ModelFiles:
    return _read_dir(default_model_dir())


# --------------------------------------------------------------------------------------
# Deterministic baselines


class TaskMedianPredictor(_Base):
    """Per-task quantiles of the training data: the baseline the model must beat.

    ``features`` is ``[task bucket index]`` (unknown tasks -> ``other``, which falls back
    to the quantiles over all tasks).
    """

    def __init__(self, table: dict[str, Sequence[float]], overall: Sequence[float]) -> None:
        self.table = {t: tuple(float(v) for v in q) for t, q in table.items()}
        self.overall = tuple(float(v) for v in overall)
        blob = json.dumps({"t": self.table, "o": self.overall}, sort_keys=True).encode()
        self.version = "task-median-" + hashlib.sha256(blob).hexdigest()[:12]
        self._rows = [
            LengthPrediction(*self._ordered(self.table.get(t, self.overall))) for t in F.TASKS
        ]

    @staticmethod
    def _ordered(q: Sequence[float]) -> tuple[float, float, float]:
        p50 = q[0]
        p90 = max(q[1], p50)
        return p50, p90, max(q[2] if len(q) > 2 else p90, p90)

    @classmethod
    def fit(cls, tasks: Sequence[str], outputs: Sequence[float]) -> TaskMedianPredictor:
        by: dict[str, list[float]] = {}
        for t, y in zip(tasks, outputs, strict=True):
            by.setdefault(F.task_bucket(t), []).append(float(y))
        qs = [q * 100 for q in QUANTILES]
        table = {t: np.percentile(v, qs, method="lower").tolist() for t, v in by.items()}
        overall = np.percentile(np.asarray(outputs, dtype=float), qs, method="lower").tolist()
        return cls(table, overall)

    @classmethod
    def default(cls) -> TaskMedianPredictor:
        """The per-task quantiles of the shipped model's training data."""
        meta = _shipped()[1]
        b = meta["baseline"]
        return cls(b["table"], b["overall"])

    def to_json(self) -> dict[str, Any]:
        return {"table": {t: list(q) for t, q in self.table.items()}, "overall": list(self.overall)}

    def features(self, x: PredictorInput) -> list[float]:
        return [float(F.TASK_INDEX[F.task_bucket(x.task)])]

    def predict_features(self, feats: Sequence[Sequence[float]]) -> list[LengthPrediction]:
        return [self._rows[int(f[0])] for f in feats]


class ConstantPredictor(_Base):
    """The same prediction for every request (tests, and a trivial baseline)."""

    def __init__(self, p50: float = 256.0, p90: float | None = None, p99: float | None = None):
        p90 = max(p90 if p90 is not None else p50 * 2.0, p50)
        p99 = max(p99 if p99 is not None else p90 * 1.5, p90)
        self._pred = LengthPrediction(float(p50), float(p90), float(p99))
        self.version = f"constant-{p50:g}-{p90:g}-{p99:g}"

    def features(self, x: PredictorInput) -> list[float]:
        return []

    def predict_features(self, feats: Sequence[Sequence[float]]) -> list[LengthPrediction]:
        return [self._pred for _ in feats]
