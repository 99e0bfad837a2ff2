"""The ``goodserve`` command line: one entry point, one module per command.

Each module in ``goodserve.commands`` defines ``register(subparsers)`` which adds its
sub-command and sets ``func`` (``func(args) -> int``) on the parser. Modules are
found automatically, so a new command is a new file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import goodserve
import goodserve.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goodserve",
        description="Deadline-aware dispatch of agentic LLM inference over heterogeneous GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"goodserve {goodserve.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(goodserve.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"goodserve.commands.{info.name}")
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from goodserve.logging import configure_logging

    configure_logging(level=getattr(args, "log_level", None))
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
