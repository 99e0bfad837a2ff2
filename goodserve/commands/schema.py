"""``goodserve schema``: print or write the JSON Schema of every wire message."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "schema", help="print the JSON Schema of the Kafka messages"
    )
    p.add_argument("--out", type=Path, help="write to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from goodserve.schemas.codec import json_schemas_text

    text = json_schemas_text()
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0
