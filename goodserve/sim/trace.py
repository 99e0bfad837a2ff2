"""Trace files: one request per row, JSON Lines or CSV (the "Trace file" interface).

A trace is the replayable input of the simulator and of the load generator, so it is
validated strictly on read (errors name the file and line) and written in a stable form
(JSONL rows omit fields at their default, CSV files carry every column).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import msgspec
import numpy as np

from goodserve.errors import InvalidInput

__all__ = [
    "FIELDS",
    "TraceError",
    "TraceRow",
    "read_trace",
    "trace_stats",
    "validate_row",
    "write_trace",
]


class TraceError(InvalidInput, ValueError):
    """A trace file or row that cannot be used; the message names the file and line."""

    code = "invalid_trace"


class TraceRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One request of a trace.

    ``output_tokens`` is the ground truth the simulator uses to end the request; the router
    must never see it. Agentic workflows use ``workflow_id``/``step``; in closed-loop
    replay step k is released ``think_s`` after step k-1 finishes (its ``arrival_s`` is then
    only the open-loop fallback). ``prefix_tokens`` of step k is the part of its prompt
    shared with step k-1's prompt plus output (prefix-cache reuse).
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    slo_s: float | None = None
    task: str = "chat"
    workflow_id: str | None = None
    step: int = 0
    prompt: str | None = None
    model: str | None = None
    request_id: str | None = None
    think_s: float = 0.0
    prefix_tokens: int = 0
    workflow_deadline_s: float | None = None


FIELDS: tuple[str, ...] = TraceRow.__struct_fields__
_REQUIRED = ("arrival_s", "input_tokens", "output_tokens")


def validate_row(row: TraceRow, where: str = "row") -> None:
    """Check value ranges a msgspec type check cannot express; raise TraceError."""

    def bad(msg: str) -> TraceError:
        return TraceError(f"{where}: {msg}")

    if not math.isfinite(row.arrival_s) or row.arrival_s < 0:
        raise bad(f"arrival_s must be a finite number >= 0, got {row.arrival_s!r}")
    if row.input_tokens < 1:
        raise bad(f"input_tokens must be >= 1, got {row.input_tokens}")
    if row.output_tokens < 1:
        raise bad(f"output_tokens must be >= 1, got {row.output_tokens}")
    if row.slo_s is not None and not (math.isfinite(row.slo_s) and row.slo_s > 0):
        raise bad(f"slo_s must be > 0 when given, got {row.slo_s!r}")
    if row.step < 0:
        raise bad(f"step must be >= 0, got {row.step}")
    if not math.isfinite(row.think_s) or row.think_s < 0:
        raise bad(f"think_s must be >= 0, got {row.think_s!r}")
    if row.prefix_tokens < 0 or row.prefix_tokens > row.input_tokens:
        raise bad(
            f"prefix_tokens must be in [0, input_tokens={row.input_tokens}], "
            f"got {row.prefix_tokens}"
        )
    if row.workflow_deadline_s is not None and not (
        math.isfinite(row.workflow_deadline_s) and row.workflow_deadline_s > 0
    ):
        raise bad(f"workflow_deadline_s must be > 0 when given, got {row.workflow_deadline_s!r}")
    if not row.task:
        raise bad("task must be a non-empty string")


def _convert(obj: Any, where: str, *, from_strings: bool) -> TraceRow:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if obj.get(k) in (None, "")]
    if missing:
        raise TraceError(f"{where}: missing required field(s) {', '.join(missing)}")
    if from_strings:
        # CSV: empty cells mean "not given"; numbers arrive as text.
        obj = {k: v for k, v in obj.items() if v is not None and v != ""}
        for k in ("input_tokens", "output_tokens", "step", "prefix_tokens"):
            v = obj.get(k)
            if isinstance(v, str):
                try:
                    f = float(v)
                except ValueError:
                    continue  # let msgspec report it
                if f.is_integer():
                    obj[k] = int(f)
    try:
        row = msgspec.convert(obj, TraceRow, strict=not from_strings)
    except msgspec.ValidationError as e:
        raise TraceError(f"{where}: {e}") from None
    validate_row(row, where)
    return row


def _open_text(path: Path, mode: str) -> IO[str]:
    newline = "" if _kind(path) == "csv" else None
    if path.suffix.lower() == ".gz":
        return cast(IO[str], gzip.open(path, mode, encoding="utf-8", newline=newline))
    return open(path, mode, encoding="utf-8", newline=newline)


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        return "csv"
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise TraceError(f"{path}: unknown trace format (use .jsonl, .json or .csv, optionally .gz)")


def _iter_jsonl(path: Path, f: IO[str]) -> Iterator[TraceRow]:
    text = f.read()
    if text.lstrip().startswith("["):  # a .json file holding one array of rows
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, obj in enumerate(items):
            yield _convert(obj, f"{path}: item {i}", from_strings=False)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        yield _convert(obj, f"{path}:{lineno}", from_strings=False)


def _iter_csv(path: Path, f: IO[str]) -> Iterator[TraceRow]:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise TraceError(
            f"{path}:1: CSV header lacks {', '.join(missing)} "
            f"(header names must be field names: {', '.join(FIELDS)})"
        )
    for rec in reader:
        if None in rec:
            raise TraceError(f"{path}:{reader.line_num}: more cells than header columns")
        yield _convert(dict(rec), f"{path}:{reader.line_num}", from_strings=True)


def read_trace(path: str | Path) -> list[TraceRow]:
    """Read a trace (``.jsonl``/``.json``/``.csv``, optionally ``.gz``) in file order.

    Unknown columns/keys are ignored (so traces may carry extra annotations); bad rows
    raise :class:`TraceError` (an ``InvalidInput`` and a ``ValueError``) naming the line.
    """
    p = Path(path)
    kind = _kind(p)
    if not p.exists():
        raise TraceError(f"{p}: no such trace file")
    with _open_text(p, "rt") as f:
        rows = list(_iter_csv(p, f) if kind == "csv" else _iter_jsonl(p, f))
    return rows


_ENCODER = msgspec.json.Encoder()


def write_trace(rows: Iterable[TraceRow], path: str | Path) -> None:
    """Write rows as JSONL (defaults omitted) or CSV (all columns), chosen by suffix."""
    p = Path(path)
    kind = _kind(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(p, "wt") as f:
        if kind == "csv":
            w = csv.writer(f, lineterminator="\n")
            w.writerow(FIELDS)
            for r in rows:
                w.writerow(["" if (v := getattr(r, k)) is None else v for k in FIELDS])
        else:
            for r in rows:
                f.write(_ENCODER.encode(r).decode())
                f.write("\n")


def _dist(values: list[int] | list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "mean": float(a.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def trace_stats(rows: list[TraceRow]) -> dict[str, Any]:
    """Summary of a trace: size, span, rate, token percentiles, per task, workflows."""
    n = len(rows)
    arrivals = [r.arrival_s for r in rows]
    duration = (max(arrivals) - min(arrivals)) if n else 0.0
    by_task: dict[str, list[TraceRow]] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    wf: dict[str, list[TraceRow]] = {}
    for r in rows:
        if r.workflow_id is not None:
            wf.setdefault(r.workflow_id, []).append(r)
    slos = [r.slo_s for r in rows if r.slo_s is not None]
    out: dict[str, Any] = {
        "count": n,
        "duration_s": duration,
        "rps": (n / duration) if duration > 0 else None,
        "input_tokens": _dist([r.input_tokens for r in rows]),
        "output_tokens": _dist([r.output_tokens for r in rows]),
        "slo_s": _dist(slos) if slos else None,
        "rows_with_slo": len(slos),
        "tasks": {
            t: {
                "count": len(rs),
                "share": len(rs) / n,
                "input_tokens_p50": float(np.median([r.input_tokens for r in rs])),
                "output_tokens_p50": float(np.median([r.output_tokens for r in rs])),
            }
            for t, rs in sorted(by_task.items())
        },
        "workflows": {
            "count": len(wf),
            "requests": sum(len(v) for v in wf.values()),
            "steps": _dist([len(v) for v in wf.values()]),
            "prefix_tokens": _dist([r.prefix_tokens for v in wf.values() for r in v]),
            "think_s": _dist([r.think_s for v in wf.values() for r in v if r.step > 0]),
        },
    }
    return out
