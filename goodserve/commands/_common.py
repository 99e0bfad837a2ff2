"""Small helpers shared by the commands: progress lines and JSON output."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class Progress:
    """A one-line progress display on stderr (silent when stderr is not a terminal and quiet)."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self._last < 2.0 and done < total:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        end = "\n" if (done >= total or not self.tty) else ""
        sys.stderr.write(
            f"\r{self.label} [{bar:<20}] {done}/{total} ({pct:5.1f}%) {now - self.t0:6.1f}s{end}"
        )
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"{self.label}: {text}\n")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def add_predictor_argument(p: Any) -> None:
    """``--predictor-model``: which output-length model a dispatcher runs."""
    import os

    p.add_argument("--predictor-model", metavar="MODEL",
                   default=os.environ.get("GOODSERVE_PREDICTOR_MODEL", "default"),
                   help="output-length model: default (shipped), encoder (the shipped "
                        "encoder tier: better predictions of new prompts for milliseconds "
                        "of CPU each; needs goodserve[encoder]), or a model directory "
                        "(env GOODSERVE_PREDICTOR_MODEL)")


def load_predictor(spec: str, command: str) -> tuple[bool, Any]:
    """(loaded, predictor) for ``--predictor-model``: the predictor is None for the default
    (each dispatcher loads its own, with its own online state); (False, None) after
    saying on stderr why the model cannot be loaded (the caller exits with status 2)."""
    from goodserve.dispatcher.predictor.model import OutputLengthPredictor
    from goodserve.errors import ConfigError

    if spec in ("", "default"):
        return True, None
    try:
        return True, OutputLengthPredictor.from_spec(spec)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"goodserve {command}: --predictor-model {spec}: {e}", file=sys.stderr)
        return False, None
