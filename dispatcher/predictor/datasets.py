"""Converters from the public data sets to the predictor data file format.

A predictor data file is JSON Lines, one request per row: ``prompt``, ``task``, optional
``model``, ``workflow_id``, ``step``, ``input_tokens`` and the ground truth
``output_tokens``. Rows written here also carry ``source`` and ``group`` (the split key:
rows of one group - the same prompt answered by many models, or the turns of one
multi-turn session - always land on the same side of the train/held-out split).

Lengths: the public sets give text, not tokens, and no tokenizer is available offline, so
tokens = ceil(chars / 4) everywhere (``chars_to_tokens``).

Sources (under ``<data>/datasets``), see ``docs/predictor.md`` for licences:
sharegpt (chat, response chars; training only, never vendored), alpaca_eval (chat, output
chars of a fixed subset of models, model name kept as a feature), gsm8k (math, worked
answer), humaneval (code, canonical solution), spider (sql, gold query), bfcl (tool,
ground-truth calls rendered as JSON; multi-turn sessions become workflows with steps).

This module does file I/O; it is an offline tool, not part of the routing path.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]

SEED = 20261123
HELDOUT_FRACTION = 0.2
CALIB_FRACTION = 0.15
"""Of the non-held-out groups: used for the conformal P90/P99 correction."""
ALPACA_MODELS = 24
"""How many alpaca_eval models to keep (evenly spaced by median output length)."""


def chars_to_tokens(chars: int) -> int:
    """The documented conversion: tokens = ceil(chars / 4)."""
    return max(math.ceil(chars / 4), 0)


def default_data_dir() -> Path:
    """``$GOODSERVE_DATA_DIR``, else ``../shared/data`` next to the repo, else /work/shared/data."""
    env = os.environ.get("GOODSERVE_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if (cand / "datasets").is_dir():
            return cand
    return Path("/work/shared/data")


def _rec(
    prompt: str,
    task: str,
    input_chars: int,
    output_chars: int,
    source: str,
    group: str,
    model: str | None = None,
    workflow_id: str | None = None,
    step: int = 0,
) -> Record:
    return {
        "prompt": prompt,
        "task": task,
        "model": model,
        "workflow_id": workflow_id,
        "step": step,
        "input_tokens": max(chars_to_tokens(input_chars), 1),
        "output_tokens": max(chars_to_tokens(output_chars), 1),
        "source": source,
        "group": group,
    }


def load_sharegpt(root: Path) -> Iterator[Record]:
    path = root / "datasets" / "sharegpt" / "sharegpt_first_turn_dev.jsonl"
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            if not r.get("response_chars"):
                continue
            prompt = r["prompt"]
            yield _rec(
                prompt, "chat", len(prompt), r["response_chars"], "sharegpt", f"sg:{r['id']}"
            )


def _alpaca_models(rows: list[dict[str, str]], k: int) -> list[str]:
    by_model: dict[str, list[int]] = {}
    for r in rows:
        by_model.setdefault(r["generator"], []).append(int(r["output_chars"]))
    full = [m for m, v in by_model.items() if len(v) >= 600]
    full.sort(key=lambda m: (sorted(by_model[m])[len(by_model[m]) // 2], m))
    if len(full) <= k:
        return full
    return [full[round(i * (len(full) - 1) / (k - 1))] for i in range(k)]


def load_alpaca_eval(root: Path, n_models: int = ALPACA_MODELS) -> Iterator[Record]:
    base = root / "datasets" / "alpaca_eval"
    instr: dict[str, str] = {}
    with (base / "instructions_dev.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            instr[str(r["instruction_id"])] = r["instruction"]
    with gzip.open(base / "output_lengths_by_model_dev.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    keep = set(_alpaca_models(rows, n_models))
    for r in rows:
        iid = r["instruction_id"]
        if r["generator"] not in keep or iid not in instr or not r["output_chars"]:
            continue
        prompt = instr[iid]
        yield _rec(
            prompt, "chat", len(prompt), int(r["output_chars"]), "alpaca_eval", f"ae:{iid}",
            model=r["generator"],
        )


def load_gsm8k(root: Path) -> Iterator[Record]:
    with (root / "datasets" / "gsm8k" / "train.jsonl").open() as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            q = r["question"]
            yield _rec(q, "math", len(q), len(r["answer"]), "gsm8k", f"gsm:{i}")


def load_humaneval(root: Path) -> Iterator[Record]:
    with gzip.open(root / "datasets" / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            p = r["prompt"]
            yield _rec(p, "code", len(p), len(r["canonical_solution"]), "humaneval", r["task_id"])


def load_spider(root: Path) -> Iterator[Record]:
    data = json.loads((root / "datasets" / "spider" / "dev.json").read_text())
    for i, r in enumerate(data):
        q = r["question"]
        # The router sees the question plus, in practice, a schema; db_id stands in for it.
        prompt = f"{q}\n-- database: {r['db_id']}"
        yield _rec(prompt, "sql", len(prompt), len(r["query"]), "spider", f"sp:{i}")


def _pick(v: Any) -> Any:
    """One concrete value from a BFCL 'possible answers' structure ('' = omitted)."""
    if isinstance(v, dict):
        out = {}
        for k, opts in v.items():
            val = _pick(opts)
            if val is not None:
                out[k] = val
        return out
    if isinstance(v, list):
        for o in v:
            if o != "":
                return _pick(o) if isinstance(o, dict) else o
        return None
    return v


def _render_calls(gt: list[Any]) -> str:
    calls = []
    for c in gt:
        for name, args in c.items():
            calls.append({"name": name, "arguments": _pick(args) or {}})
    return json.dumps(calls, separators=(",", ":"))


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_bfcl(root: Path) -> Iterator[Record]:
    base = root / "datasets" / "bfcl"
    for qpath in sorted(base.glob("BFCL_v4_*.json")):
        apath = base / f"possible_answer_{qpath.name}"
        if not apath.exists():
            continue
        answers = {a["id"]: a["ground_truth"] for a in _jsonl(apath)}
        multi = "multi_turn" in qpath.name
        for q in _jsonl(qpath):
            gt = answers.get(q["id"])
            if gt is None:
                continue
            if not multi:
                msgs = [m.get("content", "") for turn in q["question"] for m in turn]
                prompt = msgs[-1] if msgs else ""
                ctx = sum(len(m) for m in msgs) + len(json.dumps(q.get("function", [])))
                out = _render_calls(gt)
                yield _rec(prompt, "tool", ctx, len(out), "bfcl", f"bfcl:{q['id']}")
                continue
            # Multi-turn: one workflow, one step per user turn; the context grows.
            ctx = 0
            for step, (turn, calls) in enumerate(zip(q["question"], gt, strict=False)):
                text = "\n".join(m.get("content", "") for m in turn)
                ctx += len(text)
                out = json.dumps(calls, separators=(",", ":"))
                yield _rec(
                    text, "tool", ctx, len(out), "bfcl", f"bfcl:{q['id']}",
                    workflow_id=f"bfcl:{q['id']}", step=step,
                )
                ctx += len(out)


LOADERS = {
    "sharegpt": load_sharegpt,
    "alpaca_eval": load_alpaca_eval,
    "gsm8k": load_gsm8k,
    "humaneval": load_humaneval,
    "spider": load_spider,
    "bfcl": load_bfcl,
}


def _key(*parts: str) -> int:
    h = hashlib.sha256("|".join((str(SEED), *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big")


def split_of(group: str) -> str:
    """``train``, ``calib`` or ``heldout``: a fixed-seed hash of the group key."""
    u = _key("split", group) / 2.0**64
    if u < HELDOUT_FRACTION:
        return "heldout"
    if u < HELDOUT_FRACTION + (1 - HELDOUT_FRACTION) * CALIB_FRACTION:
        return "calib"
    return "train"


def order(records: Iterable[Record]) -> list[Record]:
    """A deterministic arrival order: shuffled by seed, each workflow's steps in order.

    The history features are computed online in this order (predict, then observe), the
    same way at training and evaluation time.
    """
    recs = list(records)
    keys = [_key("order", r["group"], str(r.get("model")), str(i)) for i, r in enumerate(recs)]
    idx = sorted(range(len(recs)), key=keys.__getitem__)
    # Within a workflow, hand the workflow's slots out in step order.
    slots: dict[str, list[int]] = {}
    for pos, i in enumerate(idx):
        wf = recs[i].get("workflow_id")
        if wf is not None:
            slots.setdefault(wf, []).append(pos)
    for wf, positions in slots.items():
        members = sorted((idx[p] for p in positions), key=lambda i: int(recs[i].get("step") or 0))
        del wf
        for p, i in zip(positions, members, strict=True):
            idx[p] = i
    return [recs[i] for i in idx]


def load_public(root: Path | None = None, sources: Iterable[str] | None = None) -> list[Record]:
    """All public sources as predictor records, in the deterministic arrival order."""
    root = root or default_data_dir()
    recs: list[Record] = []
    for name in sources or LOADERS:
        recs.extend(LOADERS[name](root))
    return order(recs)


def split(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Rows by split; the key is ``group``, else ``workflow_id``, else the prompt, else the row."""
    out: dict[str, list[Record]] = {"train": [], "calib": [], "heldout": []}
    for i, r in enumerate(records):
        key = r.get("group") or r.get("workflow_id") or r.get("prompt") or f"row:{i}"
        out[split_of(str(key))].append(r)
    return out


def write_jsonl(records: Iterable[Record], path: Path) -> int:
    n = 0
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[Record]:
    """Read a predictor data file (``.jsonl`` or ``.jsonl.gz``); fills defaults."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out: list[Record] = []
    with opener(path, "rt") as f:
        assert isinstance(f, io.TextIOBase) or hasattr(f, "read")
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = r.get("prompt")
            if r.get("input_tokens") is None:
                r["input_tokens"] = chars_to_tokens(len(prompt or ""))
            if r.get("output_tokens") is None:
                raise ValueError(f"{path}: row without output_tokens")
            r.setdefault("task", "chat")
            r.setdefault("step", 0)
            out.append(r)
    return out
