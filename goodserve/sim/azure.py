"""Converter for the public Azure LLM inference traces (2023) into trace rows.

The Azure CSVs have ``TIMESTAMP, ContextTokens, GeneratedTokens``; the Vidur-processed
versions (``arrived_at, num_prefill_tokens, num_decode_tokens``, seconds) are accepted
too. The traces carry no task label: it is inferred from the file name (``code`` or
``conv`` -> ``chat``) unless given.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from goodserve.errors import InvalidInput
from goodserve.sim.trace import TraceError, TraceRow

__all__ = ["convert_azure", "infer_task"]

_AZURE = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_VIDUR = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


def infer_task(path: str | Path) -> str:
    """``code`` for the code trace, ``chat`` for the conversation trace (and by default)."""
    name = Path(path).name.lower()
    return "code" if "code" in name else "chat"


def _parse_time(text: str, where: str) -> float:
    try:
        # Python 3.11 accepts the 7-digit fractions of the Azure files (truncated to us).
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise TraceError(f"{where}: bad TIMESTAMP {text!r}") from None


def convert_azure(
    path: str | Path,
    *,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    task: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[TraceRow]:
    """Rows of an Azure (or Vidur-processed) CSV with arrivals relative to the first row.

    ``arrival_s = start_s + (t - t_first) / rate_scale``: ``rate_scale=2`` doubles the
    request rate. ``duration_s`` keeps rows whose *scaled* offset ``(t - t_first) /
    rate_scale`` is below it; ``limit`` caps the row count. ``progress`` is called with the
    number of rows read every 5,000 rows and at the end.
    """
    p = Path(path)
    if rate_scale <= 0:
        raise InvalidInput(f"rate_scale must be > 0, got {rate_scale}")
    if limit is not None and limit < 0:
        raise InvalidInput(f"limit must be >= 0, got {limit}")
    if not p.exists():
        raise TraceError(f"{p}: no such file")
    task = task or infer_task(p)
    rows: list[TraceRow] = []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if all(c in header for c in _AZURE):
            cols, is_azure = [header.index(c) for c in _AZURE], True
        elif all(c in header for c in _VIDUR):
            cols, is_azure = [header.index(c) for c in _VIDUR], False
        else:
            raise TraceError(
                f"{p}:1: not an Azure trace: expected columns {', '.join(_AZURE)} "
                f"(or {', '.join(_VIDUR)}), got {', '.join(header)}"
            )
        t0: float | None = None
        for i, rec in enumerate(reader, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not rec:
                continue
            where = f"{p}:{reader.line_num}"
            try:
                raw_t, raw_in, raw_out = (rec[c] for c in cols)
                t = _parse_time(raw_t, where) if is_azure else float(raw_t)
                n_in, n_out = int(float(raw_in)), int(float(raw_out))
            except (IndexError, ValueError):
                raise TraceError(f"{where}: cannot parse row {rec!r}") from None
            if t0 is None:
                t0 = t
            offset = (t - t0) / rate_scale
            if offset < 0:
                raise TraceError(f"{where}: timestamp earlier than the first row's")
            if duration_s is not None and offset >= duration_s:
                break  # the files are in time order
            rows.append(
                TraceRow(
                    arrival_s=round(start_s + offset, 6),
                    input_tokens=max(1, n_in),
                    output_tokens=max(1, n_out),
                    task=task,
                    request_id=f"{task}-{i:06d}",
                )
            )
            if progress is not None and i % 5000 == 0:
                progress(i)
    if progress is not None:
        progress(len(rows))
    return rows
