"""Feature extraction for the output-length predictor.

The feature vector is a fixed layout of floats (``FEATURE_NAMES``); it is recorded in every
routing decision, so its layout is versioned (``FEATURE_VERSION``) and stored in the model
metadata. Extraction is cheap on purpose (the router calls it once per request): text
features look only at the first ``TEXT_CHARS`` characters, hashing uses CRC32 (stable
across processes, unlike ``hash()``), and counting is done by C-level ``str.count`` and
``numpy.bincount``.

History features come from :class:`History`, the online state that
``OutputLengthPredictor.observe`` updates with actual output lengths: an EMA of
log1p(output tokens) per (task, workflow) and per (task, step), plus counts.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

FEATURE_VERSION = 1

TASKS: tuple[str, ...] = ("chat", "code", "math", "sql", "tool", "agent", "other")
"""Task one-hot buckets; any unknown task name falls into ``other``."""
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}

MODEL_BUCKETS = 64
"""Model names hash (CRC32) into this many one-hot buckets; ``default``/empty sets none."""
NGRAM_BUCKETS = 32
"""Hashed word unigrams + bigrams of the prompt head, as fractions of all n-grams."""
TEXT_CHARS = 2000
"""Only this many leading prompt characters feed text features (bounded cost)."""
MAX_WORDS = 128
NGRAM_SPACE = 1 << 15
"""Hash space of the learnt n-gram weights (the ``ngram_score_*`` features)."""
MAX_STEP = 64
EMA_ALPHA = 0.3
"""Weight of the newest observation in the workflow and step EMAs."""
MODEL_ALPHA_MIN = 0.01
"""Per-model running mean: exact mean of the first 100 observations, then an EMA."""

# bytes.translate table: keep [a-z0-9_] and bytes >= 128 (UTF-8 letters), rest -> space
_SEP = bytes(
    c if (97 <= c <= 122 or 48 <= c <= 57 or c == 95 or c >= 128) else 32 for c in range(256)
)

# (feature name, words counted among the prompt head's words); "step by step" is a phrase.
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kw_step_by_step", ()),
    ("kw_sql", ("sql", "select", "table", "tables", "query", "database", "join")),
    ("kw_function", ("function", "def", "return", "class", "method", "api")),
    ("kw_code", ("code", "script", "program", "implement", "python", "javascript", "java")),
    ("kw_explain", ("explain", "why", "describe", "how", "what")),
    ("kw_write", ("write", "generate", "create", "compose", "draft")),
    ("kw_list", ("list", "ideas", "examples", "steps", "tips", "ways")),
    ("kw_brief", ("brief", "briefly", "short", "concise", "sentence", "word", "max", "only")),
    ("kw_long", ("essay", "detailed", "article", "story", "blog", "comprehensive", "outline")),
    ("kw_json", ("json", "format", "yaml", "xml", "table")),
    ("kw_translate", ("translate", "rewrite", "paraphrase", "summarize", "summary", "correct")),
)
_KW_OF: dict[bytes, list[int]] = {}
for _i, (_, _ws) in enumerate(_KEYWORDS):
    for _w in _ws:
        _KW_OF.setdefault(_w.encode(), []).append(_i)
_KW_WORDS = frozenset(_KW_OF)
_DIGITS = b"0123456789"

_BASE_NAMES: tuple[str, ...] = ("log_input_tokens", "step")
_TEXT_STAT_NAMES: tuple[str, ...] = (
    "has_prompt",
    "log_prompt_chars",
    "log_words",
    "question_marks",
    "code_fences",
    "log_newlines",
    "list_markers",
    "digit_frac",
    *(k for k, _ in _KEYWORDS),
    "ngram_score",
    "ngram_wmax",
    "ngram_wmin",
)
_HISTORY_NAMES: tuple[str, ...] = (
    "hist_wf_ema",
    "hist_wf_log_count",
    "hist_wf_last",
    "hist_step_ema",
    "hist_step_log_count",
    "hist_model_mean",
    "hist_model_log_count",
    "hist_prompt_resid",
    "hist_prompt_log_count",
)

FEATURE_NAMES: tuple[str, ...] = (
    *_BASE_NAMES,
    *(f"task_{t}" for t in TASKS),
    *(f"model_b{i}" for i in range(MODEL_BUCKETS)),
    *_TEXT_STAT_NAMES,
    *(f"ngram_b{i}" for i in range(NGRAM_BUCKETS)),
    *_HISTORY_NAMES,
)
N_FEATURES = len(FEATURE_NAMES)
TASK_OFFSET = len(_BASE_NAMES)
MODEL_OFFSET = TASK_OFFSET + len(TASKS)
TEXT_OFFSET = MODEL_OFFSET + MODEL_BUCKETS
NGRAM_OFFSET = TEXT_OFFSET + len(_TEXT_STAT_NAMES)
HISTORY_OFFSET = NGRAM_OFFSET + NGRAM_BUCKETS
assert HISTORY_OFFSET + len(_HISTORY_NAMES) == N_FEATURES

NO_HISTORY = -1.0
"""EMA/last value when there is no history yet (features are never NaN)."""


def task_bucket(task: str) -> str:
    """The one-hot bucket of a task name (unknown names -> ``other``)."""
    return task if task in TASK_INDEX else "other"


def task_of_features(feats: Sequence[float]) -> str:
    """Inverse of the task one-hot (for per-task calibration inside pure functions)."""
    for i, t in enumerate(TASKS):
        if feats[TASK_OFFSET + i] > 0.5:
            return t
    return "other"


def _model_bucket(model: str | None) -> int:
    if not model or model == "default":
        return -1
    return zlib.crc32(model.encode()) % MODEL_BUCKETS


def ngram_ids(prompt: str | None) -> tuple[list[float], np.ndarray]:
    """Cheap text statistics and the hashed word uni+bigram ids of the prompt head.

    Ids are in ``[0, NGRAM_SPACE)``: unigram CRC32(word), bigram CRC32(a) * 1000003 +
    CRC32(b), both mod NGRAM_SPACE; ``id % NGRAM_BUCKETS`` gives the coarse bucket.
    """
    if not prompt:
        return [0.0] * (len(_TEXT_STAT_NAMES) - 3), _NO_IDS
    head = prompt[:TEXT_CHARS]
    low = head.lower()
    lb = low.encode("utf-8", "ignore")
    words = lb.translate(_SEP).split(None, MAX_WORDS)[:MAX_WORDS]
    n_words = len(words)
    list_markers = low.count("\n- ") + low.count("\n* ") + low.count("\n1.") + low.count("\n2.")
    digits = len(lb) - len(lb.translate(None, _DIGITS))
    stats = [
        1.0,
        math.log1p(len(prompt)),
        math.log1p(n_words),
        float(min(low.count("?"), 20)),
        float(min(low.count("```"), 20)),
        math.log1p(low.count("\n")),
        float(min(list_markers, 50)),
        digits / max(len(lb), 1),
    ]
    kw = [0.0] * len(_KEYWORDS)
    kw[0] = float(low.count("step by step") + low.count("step-by-step"))
    if n_words:
        matched = _KW_WORDS.intersection(words)
        if matched:
            cnt: Mapping[bytes, int] = Counter(words) if len(matched) > 3 else {
                w: words.count(w) for w in matched
            }
            for w in matched:
                for i in _KW_OF[w]:
                    kw[i] += cnt[w]
    stats += [min(v, 20.0) for v in kw]
    if not n_words:
        return stats, _NO_IDS
    h = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=n_words)
    if n_words > 1:
        h = np.concatenate((h, h[:-1] * np.uint64(1000003) + h[1:]))
    return stats, (h & np.uint64(NGRAM_SPACE - 1)).astype(np.intp)


_NO_IDS = np.zeros(0, dtype=np.intp)


def ngram_scores(ids: np.ndarray, weights: np.ndarray) -> list[float]:
    """Linear text score sum(w[ids]) / sqrt(len(ids)), and the max/min n-gram weight."""
    w = weights.take(ids)
    return [float(w.sum()) / math.sqrt(ids.size), float(w.max()), float(w.min())]


class Featurizer:
    """Feature extraction with the model's learnt n-gram weights.

    ``ngram_weights`` (length ``NGRAM_SPACE``, or None for all zeros) are the
    coefficients of a ridge regression of log1p(output tokens), net of its (task, model)
    mean, on hashed n-gram counts; learnt at training time (``train.py``).
    Text features are memoised by prompt (agents resend identical prompts: retries,
    templated steps), bounded in size.
    """

    __slots__ = ("_cache", "cache_size", "weights")

    def __init__(self, ngram_weights: np.ndarray | None = None, cache_size: int = 4096) -> None:
        self.weights = (
            np.zeros(NGRAM_SPACE, dtype=np.float64)
            if ngram_weights is None
            else np.asarray(ngram_weights, dtype=np.float64)
        )
        if self.weights.shape != (NGRAM_SPACE,):
            raise ValueError(f"ngram weights must have {NGRAM_SPACE} entries")
        self._cache: dict[str, list[float]] = {}
        self.cache_size = cache_size

    def text(self, prompt: str | None) -> list[float]:
        if prompt:
            hit = self._cache.get(prompt)
            if hit is not None:
                return hit
        stats, ids = ngram_ids(prompt)
        if ids.size:
            scores = ngram_scores(ids, self.weights)
            counts = np.bincount(ids & (NGRAM_BUCKETS - 1), minlength=NGRAM_BUCKETS)
            grams = (counts / ids.size).tolist()
        else:
            scores = [0.0, 0.0, 0.0]
            grams = [0.0] * NGRAM_BUCKETS
        out = stats + scores + grams
        if prompt:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[prompt] = out
        return out

    def extract(
        self,
        *,
        input_tokens: int,
        task: str,
        model: str | None,
        prompt: str | None,
        step: int,
        history: Sequence[float],
    ) -> list[float]:
        """The full feature vector in ``FEATURE_NAMES`` order."""
        step_c = min(max(int(step), 0), MAX_STEP)
        feats = [math.log1p(max(int(input_tokens), 0)), float(step_c)]
        onehot = [0.0] * (len(TASKS) + MODEL_BUCKETS)
        onehot[TASK_INDEX.get(task, TASK_INDEX["other"])] = 1.0
        mb = _model_bucket(model)
        if mb >= 0:
            onehot[len(TASKS) + mb] = 1.0
        feats += onehot
        feats += self.text(prompt)
        feats += history
        return feats


class History:
    """Online output-length history, updated with actual lengths as requests finish.

    Four keys: (task, workflow) - an EMA, count and last value for the agent/session;
    (task bucket, step) - an EMA and count; (task bucket, model) - a running mean (window
    of about 1/MODEL_ALPHA_MIN requests) and count, which learns each model's verbosity;
    (task bucket, prompt) - the mean residual of earlier answers to the identical prompt
    (log length minus that model's running mean), for prompts that recur: retries,
    best-of-n / self-consistency sampling, one instruction sent to several agents or
    models. Values are log1p(tokens). Memory is bounded: the workflow table is cleared when it
    exceeds ``max_workflows`` (finished sessions; a fresh start costs only accuracy).
    """

    __slots__ = ("_model", "_prompt", "_step", "_wf", "max_workflows")

    def __init__(self, max_workflows: int = 100_000) -> None:
        self._wf: dict[tuple[str, str], list[float]] = {}  # [ema, count, last]
        self._step: dict[tuple[str, int], list[float]] = {}  # [ema, count]
        self._model: dict[tuple[str, str], list[float]] = {}  # [mean, count]
        self._prompt: dict[tuple[str, int, int], list[float]] = {}  # [resid sum, count]
        self.max_workflows = max_workflows

    def features(
        self,
        task: str,
        workflow_id: str | None,
        step: int,
        model: str | None = None,
        prompt: str | None = None,
    ) -> list[float]:
        tb = task_bucket(task)
        wf = self._wf.get((task, workflow_id)) if workflow_id is not None else None
        st = self._step.get((tb, min(max(step, 0), MAX_STEP)))
        mo = self._model.get((tb, model or "default"))
        out = (
            [wf[0], math.log1p(wf[1]), wf[2]] if wf is not None else [NO_HISTORY, 0.0, NO_HISTORY]
        )
        out += [st[0], math.log1p(st[1])] if st is not None else [NO_HISTORY, 0.0]
        out += [mo[0], math.log1p(mo[1])] if mo is not None else [NO_HISTORY, 0.0]
        pr = self._prompt.get(_prompt_key(tb, prompt)) if prompt else None
        out += [pr[0] / pr[1], math.log1p(pr[1])] if pr is not None else [0.0, 0.0]
        return out

    def observe(
        self,
        task: str,
        workflow_id: str | None,
        step: int,
        output_tokens: int,
        model: str | None = None,
        prompt: str | None = None,
    ) -> None:
        y = math.log1p(max(int(output_tokens), 0))
        tb = task_bucket(task)
        mkey = (tb, model or "default")
        mo = self._model.get(mkey)
        if prompt:
            pkey = _prompt_key(tb, prompt)
            resid = y - (mo[0] if mo is not None else y)
            pr = self._prompt.get(pkey)
            if pr is None:
                if len(self._prompt) >= self.max_workflows:
                    self._prompt.clear()
                self._prompt[pkey] = [resid, 1.0]
            else:
                pr[0] += resid
                pr[1] += 1.0
        if workflow_id is not None:
            key = (task, workflow_id)
            wf = self._wf.get(key)
            if wf is None:
                if len(self._wf) >= self.max_workflows:
                    self._wf.clear()
                self._wf[key] = [y, 1.0, y]
            else:
                wf[0] += EMA_ALPHA * (y - wf[0])
                wf[1] += 1.0
                wf[2] = y
        skey = (tb, min(max(step, 0), MAX_STEP))
        st = self._step.get(skey)
        if st is None:
            self._step[skey] = [y, 1.0]
        else:
            st[0] += EMA_ALPHA * (y - st[0])
            st[1] += 1.0
        if mo is None:
            if len(self._model) >= self.max_workflows:
                self._model.clear()
            self._model[mkey] = [y, 1.0]
        else:
            mo[1] += 1.0
            mo[0] += max(1.0 / mo[1], MODEL_ALPHA_MIN) * (y - mo[0])

    def clear(self) -> None:
        self._wf.clear()
        self._step.clear()
        self._model.clear()
        self._prompt.clear()


def _prompt_key(tb: str, prompt: str) -> tuple[str, int, int]:
    return (tb, len(prompt), zlib.crc32(prompt[:TEXT_CHARS].encode("utf-8", "ignore")))
