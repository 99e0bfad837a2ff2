"""Feature extraction for the output-length predictor.

The feature vector is a fixed layout of floats (``FEATURE_NAMES``); it is recorded in every
routing decision, so its layout is versioned (``FEATURE_VERSION``) and stored in the model
metadata. Extraction is cheap on purpose (the router calls it once per request): text
features look only at the first ``TEXT_CHARS`` characters (character n-grams at the first
``CHAR_CHARS``), hashing uses CRC32 for words and a numpy polynomial hash for character
n-grams (both stable across processes, unlike ``hash()``), and counting is done by C-level
``bytes.count`` / ``translate`` and one set intersection per prompt.

Learnt parts, shipped with the model and never updated online: :class:`TextModel` (per-task
TF-IDF ridge scores of word and character n-grams) and the per-(task, model) prior table.
History features come from :class:`History`, the online state that
``OutputLengthPredictor.observe`` updates with actual output lengths: an EMA of
log1p(output tokens) per (task, workflow) and per (task, step), plus counts. A row with no
history at all has ``BLANK_HISTORY``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from goodserve.dispatcher.predictor.encoder import EncoderHead

FEATURE_VERSION = 2

TASKS: tuple[str, ...] = ("chat", "code", "math", "sql", "tool", "agent", "other")
"""Task one-hot buckets; any unknown task name falls into ``other``."""
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}
TEXT_MODEL_TASKS: tuple[str, ...] = ("chat", "code", "math", "sql", "tool")
"""Tasks with their own text model; the others (agent, other) use chat's."""

MODEL_BUCKETS = 64
"""Model names hash (CRC32) into this many one-hot buckets; ``default``/empty sets none."""
TEXT_CHARS = 2000
"""Only this many leading prompt characters feed text features (bounded cost)."""
MAX_WORDS = 128
CHAR_CHARS = 400
"""Character n-grams look at the first this many characters (lower-cased, spaces collapsed)."""
ENCODER_CHARS = 8192
"""Characters handed to the encoder tier's tokenizer (it reads 256 word pieces, about
1,000 characters of prose: the cut only spares it tokenizing a huge prompt whole)."""
CHAR_NGRAMS = (3, 4, 5)
"""The n-gram lengths of ``char_ids`` (fixed in its code; recorded in the metadata)."""
TEXT_SPACE_BITS = 16
TEXT_SPACE = 1 << TEXT_SPACE_BITS
"""Hash space of the word and character n-gram text models (``text_*_score``)."""
NGRAM_SPACE = TEXT_SPACE  # name kept for callers of version 1
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

# Word sets whose distinct members present in the prompt head are counted (version 2).
_KEYSETS: tuple[tuple[str, frozenset[bytes]], ...] = tuple(
    (name, frozenset(w.encode() for w in words.split()))
    for name, words in (
        ("ks_poem", "poem song lyrics haiku rap verse"),
        ("ks_yesno", "is are does do can should"),
        ("ks_fact", "name who when where which"),
        ("ks_plan", "plan guide tutorial itinerary recipe strategy course curriculum"),
        ("ks_document", "email letter message post tweet speech script review report "
                        "proposal cover"),
        ("ks_one", "one single word yes no number answer"),
        ("ks_compare", "compare difference differences vs versus pros cons advantages"),
        ("ks_math", "calculate solve how many much total each per cost left"),
        ("ks_sql_clause", "count average max min most each order sorted descending "
                          "ascending not both and distinct different"),
    )
)
FIRST_WORDS: tuple[bytes, ...] = tuple(
    w.encode()
    for w in (
        "what who when where why how which is are can could do does write give list "
        "explain describe create generate tell i please make translate summarize rewrite "
        "suggest find you"
    ).split()
)
"""``first_word`` is the index of the prompt's first word in this tuple, else -1."""
_FIRST_INDEX = {w: i for i, w in enumerate(FIRST_WORDS)}
_KS_OF: dict[bytes, list[int]] = {}
for _i, (_, _set) in enumerate(_KEYSETS):
    for _bw in _set:
        _KS_OF.setdefault(_bw, []).append(_i)
_KS_WORDS = frozenset(_KS_OF)

# "500 words", "3-4 paragraphs", "10 examples": a requested size, in words or in items.
_REQUEST = re.compile(
    rb"(\d{1,6})\s*(?:-\s*\d+\s*)?(words?|characters?|sentences?|lines?|tweets?|titles?|"
    rb"paragraphs?|pages?|verses?|stanzas?|items?|examples?|ideas?|tips?|points?|steps?|"
    rb"reasons?|questions?|names?|bullets?|options?|ways?|things?|facts?|days?)"
)
_WORDS_PER_UNIT = {
    b"w": 1.0, b"c": 0.2, b"s": 15.0, b"l": 15.0, b"t": 15.0, b"p": 80.0, b"v": 80.0,
}
_UNIT_KIND = {  # first two letters -> key of _WORDS_PER_UNIT; anything else counts items
    b"wo": b"w", b"ch": b"c", b"se": b"s", b"li": b"l", b"tw": b"t", b"ti": b"t",
    b"pa": b"p", b"pg": b"p", b"ve": b"v", b"st": b"v",
}
_UNIT_WORDS = frozenset(
    w.encode()
    for u in (
        "word character sentence line tweet title paragraph page verse stanza item example "
        "idea tip point step reason question name bullet option way thing fact day"
    ).split()
    for w in (u, u + "s")
)
_ANY_WORDS = _KW_WORDS | _KS_WORDS | _UNIT_WORDS
"""Every word some text statistic looks for: the prompt's words are hashed once against it."""
# bytes.translate table: digits -> "1", everything else -> space (runs of digits = numbers)
_DIGIT_RUNS = bytes(49 if 48 <= c <= 57 else 32 for c in range(256))

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
    "req_words_log",
    "req_items_log",
    "log_numbers",
    "log_sentences",
    "first_word",
    "log_commas",
    "log_quotes",
    "log_colons",
    "non_ascii_frac",
    *(k for k, _ in _KEYSETS),
    "avg_word_bytes",
    "words_truncated",
    "log_braces",
)
_TEXT_MODEL_NAMES: tuple[str, ...] = ("text_word_score", "text_char_score")
_PRIOR_NAMES: tuple[str, ...] = ("model_prior_offset", "model_prior_spread", "model_prior_log_n")
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
    *_TEXT_MODEL_NAMES,
    *_PRIOR_NAMES,
    *_HISTORY_NAMES,
)
N_FEATURES = len(FEATURE_NAMES)
TASK_OFFSET = len(_BASE_NAMES)
MODEL_OFFSET = TASK_OFFSET + len(TASKS)
TEXT_OFFSET = MODEL_OFFSET + MODEL_BUCKETS
TEXT_MODEL_OFFSET = TEXT_OFFSET + len(_TEXT_STAT_NAMES)
PRIOR_OFFSET = TEXT_MODEL_OFFSET + len(_TEXT_MODEL_NAMES)
HISTORY_OFFSET = PRIOR_OFFSET + len(_PRIOR_NAMES)
assert HISTORY_OFFSET + len(_HISTORY_NAMES) == N_FEATURES
ENCODER_FEATURE = "text_encoder_score"
"""The encoder tier's one extra feature, after the history block (column ``N_FEATURES``):
a model trained with it has ``N_FEATURES + 1`` features, every other one where it was."""

NO_HISTORY = -1.0
"""EMA/last value when there is no history yet (features are never NaN)."""
BLANK_HISTORY: tuple[float, ...] = (
    NO_HISTORY, 0.0, NO_HISTORY, NO_HISTORY, 0.0, NO_HISTORY, 0.0, 0.0, 0.0
)
"""The history block of a request seen with no history at all (``History`` empty)."""
NO_PRIOR: tuple[float, ...] = (0.0, -1.0, 0.0)
"""The model prior of a (task, model) absent from the training data."""


HISTORY_COUNT_COLS: tuple[int, ...] = (1, 4, 6, 8)
"""Positions of the log counts within the history block."""


def has_history(feats: Sequence[float]) -> bool:
    """Whether a feature row carries any online history (selects the conformal offsets)."""
    return any(feats[HISTORY_OFFSET + i] > 0.0 for i in HISTORY_COUNT_COLS)


def task_bucket(task: str) -> str:
    """The one-hot bucket of a task name (unknown names -> ``other``)."""
    return task if task in TASK_INDEX else "other"


def task_of_features(feats: Sequence[float]) -> str:
    """Inverse of the task one-hot (for per-task calibration inside pure functions)."""
    for i, t in enumerate(TASKS):
        if feats[TASK_OFFSET + i] > 0.5:
            return t
    return "other"


def text_model_task(task: str) -> str:
    """The text model a task uses (tasks without their own use chat's)."""
    return task if task in TEXT_MODEL_TASKS else "chat"


def _model_bucket(model: str | None) -> int:
    if not model or model == "default":
        return -1
    return zlib.crc32(model.encode()) % MODEL_BUCKETS


_NO_IDS = np.zeros(0, dtype=np.intp)
_N_STATS = len(_TEXT_STAT_NAMES)


def ngram_ids(prompt: str | None) -> tuple[list[float], np.ndarray]:
    """Text statistics and the hashed word uni+bigram ids of the prompt head.

    Ids are in ``[0, TEXT_SPACE)``: unigram CRC32(word), bigram CRC32(a) * 1000003 +
    CRC32(b), both mod TEXT_SPACE (over the first ``MAX_WORDS`` words).
    """
    if not prompt:
        return [0.0] * _N_STATS, _NO_IDS
    head = prompt[:TEXT_CHARS]
    low = head.lower()
    lb = low.encode("utf-8", "ignore")
    words = lb.translate(_SEP).split(None, MAX_WORDS)
    truncated = len(words) > MAX_WORDS
    words = words[:MAX_WORDS]
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
    ks = [0.0] * len(_KEYSETS)
    req_words = req_items = n_numbers = 0.0
    if n_words:
        matched = _ANY_WORDS.intersection(words)
        if matched:
            kwm = matched & _KW_WORDS
            if kwm:
                cnt: Mapping[bytes, int] = Counter(words) if len(kwm) > 3 else {
                    w: words.count(w) for w in kwm
                }
                for w in kwm:
                    for i in _KW_OF[w]:
                        kw[i] += cnt[w]
            for w in matched & _KS_WORDS:
                for i in _KS_OF[w]:
                    ks[i] += 1.0
            if digits and not _UNIT_WORDS.isdisjoint(matched):
                for m in _REQUEST.finditer(lb):
                    n = float(m.group(1))
                    kind = _UNIT_KIND.get(m.group(2)[:2])
                    if kind is None:
                        req_items = max(req_items, math.log1p(n))
                    else:
                        req_words = max(req_words, math.log1p(n * _WORDS_PER_UNIT[kind]))
    if digits:
        n_numbers = math.log1p(len(lb.translate(_DIGIT_RUNS).split()))
    stats += [min(v, 20.0) for v in kw]
    stats += [
        req_words,
        req_items,
        n_numbers,
        math.log1p(lb.count(b". ") + lb.count(b"? ") + lb.count(b"! ") + 1),
        float(_FIRST_INDEX.get(words[0], -1)) if n_words else -1.0,
        math.log1p(lb.count(b",")),
        math.log1p(lb.count(b'"')),
        math.log1p(lb.count(b":")),
        (len(lb) - len(head)) / max(len(head), 1),
        *ks,
        len(lb) / max(n_words, 1),
        1.0 if truncated else 0.0,
        math.log1p(lb.count(b"{")),
    ]
    if not n_words:
        return stats, _NO_IDS
    h = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=n_words)
    if n_words > 1:
        h = np.concatenate((h, h[:-1] * np.uint64(1000003) + h[1:]))
    return stats, (h & np.uint64(TEXT_SPACE - 1)).astype(np.intp)


_K = np.uint64(0x100000001B3)  # FNV-style multiplier for the rolling byte hash
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - TEXT_SPACE_BITS)


def char_ids(prompt: str | None) -> np.ndarray:
    """Hashed character 3/4/5-gram ids of the prompt's first ``CHAR_CHARS`` characters.

    The text is lower-cased with runs of whitespace collapsed to one space and padded with
    a space at each end; each n-gram's hash is a polynomial over its UTF-8 bytes (uint64
    arithmetic wraps), multiplicatively mixed into ``[0, TEXT_SPACE)``.
    """
    if not prompt:
        return _NO_IDS
    s = " " + " ".join(prompt[:CHAR_CHARS].lower().split()) + " "
    b = np.frombuffer(s.encode("utf-8", "ignore"), dtype=np.uint8).astype(np.uint64)
    if b.size < 3:
        return _NO_IDS
    h3 = (b[:-2] * _K + b[1:-1]) * _K + b[2:]
    h4 = h3[:-1] * _K + b[3:]
    h5 = h4[:-1] * _K + b[4:]
    out: np.ndarray = ((np.concatenate((h3, h4, h5)) * _GOLD) >> _SHIFT).astype(np.intp)
    return out


class TextModel:
    """Per-task linear text models over hashed word and character n-grams.

    For each task in ``TEXT_MODEL_TASKS`` and each kind (word, char), a weight vector
    ``w`` over ``TEXT_SPACE`` and, per kind, IDF weights: the score of a prompt with
    n-gram ids ``i`` is ``sum(w[i] * idf[i]) / sqrt(sum(idf[i]^2))`` (a TF-IDF row, L2
    normalised, dotted with ``w``). The weights come from a ridge regression of
    log1p(output tokens), net of its (task, model) mean (``train.py``). Stored pre-multiplied:
    ``wi = w * idf`` and ``idf2 = idf^2``.
    """

    __slots__ = ("idf2", "stack", "wi")

    def __init__(
        self,
        word_w: np.ndarray,
        char_w: np.ndarray,
        word_idf: np.ndarray,
        char_idf: np.ndarray,
    ) -> None:
        n = len(TEXT_MODEL_TASKS)
        for a in (word_w, char_w):
            if a.shape != (n, TEXT_SPACE):
                raise ValueError(f"text model weights must have shape ({n}, {TEXT_SPACE})")
        for a in (word_idf, char_idf):
            if a.shape != (TEXT_SPACE,):
                raise ValueError(f"text model idf must have {TEXT_SPACE} entries")
        wi = np.asarray(word_idf, np.float64)
        ci = np.asarray(char_idf, np.float64)
        # word ids index [0, TEXT_SPACE), char ids [TEXT_SPACE, 2 TEXT_SPACE): one gather
        self.wi = np.concatenate(
            (np.asarray(word_w, np.float64) * wi, np.asarray(char_w, np.float64) * ci), axis=1
        )
        self.idf2 = np.concatenate((wi * wi, ci * ci))
        # per task: rows (w * idf, idf^2), so one gather serves numerator and denominator
        self.stack = np.stack([np.stack((row, self.idf2)) for row in self.wi])

    @classmethod
    def zeros(cls) -> TextModel:
        z = np.zeros((len(TEXT_MODEL_TASKS), TEXT_SPACE))
        one = np.ones(TEXT_SPACE)
        return cls(z, z, one, one)

    def scores(self, task_row: int, wids: np.ndarray, cids: np.ndarray) -> list[float]:
        """[word score, char score] of a prompt's ids for one task's model."""
        nw, nc = wids.size, cids.size
        if not nw or not nc:  # no words means no characters either, but be safe
            out = [0.0, 0.0]
            if nw:
                out[0] = float(self.wi[task_row].take(wids).sum()) / math.sqrt(
                    float(self.idf2.take(wids).sum()))
            if nc:
                c = cids + TEXT_SPACE
                out[1] = float(self.wi[task_row].take(c).sum()) / math.sqrt(
                    float(self.idf2.take(c).sum()))
            return out
        ids = np.concatenate((wids, cids + TEXT_SPACE))
        (wn, cn), (wd, cd) = np.add.reduceat(
            self.stack[task_row].take(ids, axis=1), (0, nw), axis=1
        ).tolist()
        return [wn / math.sqrt(wd), cn / math.sqrt(cd)]


_TM_ROW = {t: i for i, t in enumerate(TEXT_MODEL_TASKS)}
_TextEntry = tuple[
    list[float], np.ndarray, np.ndarray, dict[int, list[float]],
    dict[tuple[str, str | None], list[float]],
]
"""A prompt's memo in ``Featurizer``: see its ``_cache``."""
PriorTable = Mapping[str, Mapping[str, Sequence[float]]]
"""task bucket -> model name -> (offset, spread, log1p(count)) of log1p(output tokens)."""


class Featurizer:
    """Feature extraction with the model's learnt text models and per-model priors.

    ``text_model``: see :class:`TextModel` (None: all scores 0). ``model_prior``: for each
    (task bucket, model name) seen often enough in the training data, the mean of
    log1p(output tokens) minus the task's mean, its standard deviation and log1p(rows):
    a static table shipped with the model (never updated online; unknown pairs get
    ``NO_PRIOR``). Text features are memoised by prompt (agents resend identical
    prompts: retries, templated steps), bounded in size. ``encoder_head`` (the encoder
    tier, ``encoder.EncoderHead``): one more feature, ``ENCODER_FEATURE``, at the end.
    """

    __slots__ = ("_cache", "cache_size", "encoder_head", "n_features", "prior", "text_model")

    def __init__(
        self,
        text_model: TextModel | None = None,
        model_prior: PriorTable | None = None,
        cache_size: int = 4096,
        encoder_head: EncoderHead | None = None,
    ) -> None:
        self.text_model = text_model or TextModel.zeros()
        self.encoder_head = encoder_head
        self.n_features = N_FEATURES + (encoder_head is not None)
        self.prior: dict[tuple[str, str], list[float]] = {
            (t, m): [float(v) for v in vals]
            for t, by_model in (model_prior or {}).items()
            for m, vals in by_model.items()
        }
        # prompt -> (text statistics, word ids, char ids, text scores by task model row,
        # the row's middle by (task, model)); "" holds prompt-less rows' middles
        self._cache: dict[str, _TextEntry] = {}
        self.cache_size = cache_size

    def text(self, prompt: str | None, task: str = "chat") -> list[float]:
        """Text statistics and text model scores (``_TEXT_STAT_NAMES + _TEXT_MODEL_NAMES``)."""
        row = _TM_ROW[text_model_task(task)]
        if not prompt:
            return [0.0] * (_N_STATS + len(_TEXT_MODEL_NAMES))
        hit = self._entry(prompt)
        sc = hit[3].get(row)
        if sc is None:
            sc = hit[3][row] = self.text_model.scores(row, hit[1], hit[2])
        return hit[0] + sc

    def _entry(self, prompt: str) -> _TextEntry:
        """The prompt's memo (made on a miss; the memo is bounded)."""
        hit = self._cache.get(prompt)
        if hit is None:
            if prompt:
                stats, wids = ngram_ids(prompt)
                hit = (stats, wids, char_ids(prompt), {}, {})
            else:
                hit = ([], _NO_IDS, _NO_IDS, {}, {})
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[prompt] = hit
        return hit

    def prior_of(self, task: str, model: str | None) -> list[float]:
        p = self.prior.get((task_bucket(task), model or "default"))
        return list(p) if p is not None else list(NO_PRIOR)

    def extract(
        self,
        input_tokens: int,
        task: str,
        model: str | None,
        prompt: str | None,
        step: int,
        history: Sequence[float],
    ) -> list[float]:
        """The full feature vector in ``FEATURE_NAMES`` order (arguments may be passed by
        position: the per-request call does, keywords cost more than the work saved)."""
        # (min and max of two numbers as conditional expressions: what the builtins return)
        step_c = int(step)
        step_c = 0 if 0 > step_c else step_c
        step_c = MAX_STEP if MAX_STEP < step_c else step_c
        n = int(input_tokens)
        feats = [math.log1p(0 if 0 > n else n), float(step_c)]
        # one-hots, text and prior depend on (task, model, prompt) only: memoised with the
        # prompt's text features (clearing the text memo clears these too)
        hit = self._cache.get(prompt or "")  # _entry's memo, without the call on a hit
        mids = (hit if hit is not None else self._entry(prompt or ""))[4]
        mid = mids.get((task, model))
        if mid is None:
            onehot = [0.0] * (len(TASKS) + MODEL_BUCKETS)
            onehot[TASK_INDEX.get(task, TASK_INDEX["other"])] = 1.0
            mb = _model_bucket(model)
            if mb >= 0:
                onehot[len(TASKS) + mb] = 1.0
            mid = mids[(task, model)] = onehot + self.text(prompt, task) + self.prior_of(
                task, model
            )
        feats += mid
        feats += history
        if self.encoder_head is not None:
            feats.append(self.encoder_score(prompt, task))
        return feats

    def encoder_score(self, prompt: str | None, task: str) -> float:
        """The encoder head's score of the prompt for the task's text model (0.0 without a
        prompt), memoised with the prompt's text features. A prompt not embedded yet is
        embedded here: ``OutputLengthPredictor.prepare`` does it ahead, in batches."""
        head = self.encoder_head
        if head is None or not prompt:
            return 0.0
        memo = self._entry(prompt)[3]
        key = -1 - _TM_ROW[text_model_task(task)]  # text scores use keys >= 0
        sc = memo.get(key)
        if sc is None:
            emb = head.encoder.embed([prompt[:ENCODER_CHARS]])[0]
            for row, v in enumerate(head.scores(emb).tolist()):
                memo[-1 - row] = [v]
            sc = memo[key]
        return sc[0]


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
        tb = task if task in TASK_INDEX else "other"  # task_bucket(task)
        wf = self._wf.get((task, workflow_id)) if workflow_id is not None else None
        step_c = 0 if 0 > step else step  # min(max(step, 0), MAX_STEP)
        st = self._step.get((tb, MAX_STEP if MAX_STEP < step_c else step_c))
        mo = self._model.get((tb, model or "default"))
        out = (
            [wf[0], math.log1p(wf[1]), wf[2]] if wf is not None else [NO_HISTORY, 0.0, NO_HISTORY]
        )
        out += [st[0], math.log1p(st[1])] if st is not None else [NO_HISTORY, 0.0]
        out += [mo[0], math.log1p(mo[1])] if mo is not None else [NO_HISTORY, 0.0]
        # the prompt's key (a CRC of its head) only when some prompt has history
        pr = self._prompt.get(_prompt_key(tb, prompt)) if prompt and self._prompt else None
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
