"""``goodserve audit replay`` and ``goodserve audit explain``: check and explain decisions."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from goodserve.commands._common import print_json, table
from goodserve.config import Settings


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, action="append", default=[],
                   help="JSON Lines of Decision (and MigrationCommand) records; repeatable")
    Settings.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub: Any) -> None:
    a = sub.add_parser("audit", help="replay and explain recorded routing decisions")
    asub = a.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    r = asub.add_parser("replay", help="recompute every recorded decision and compare")
    _add_source(r)
    r.add_argument("--show", type=int, default=20, help="mismatches to list (text output)")
    r.set_defaults(func=run_replay)
    e = asub.add_parser("explain", help="why one request went where it went")
    e.add_argument("request_id")
    _add_source(e)
    e.add_argument("--migrations", type=Path, action="append", default=[],
                   help="JSON Lines of MigrationCommand records (file mode)")
    e.set_defaults(func=run_explain)


def _load(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    from goodserve.audit import decisions_of, migrations_of, read_audit_topics, read_records_file

    if args.file:
        recs: list[Any] = []
        for f in [*args.file, *getattr(args, "migrations", [])]:
            recs += read_records_file(f)
        return decisions_of(recs), migrations_of(recs)
    if not args.bootstrap_servers:
        raise SystemExit("audit: give --file DECISIONS.jsonl or --bootstrap-servers")
    d, m = asyncio.run(read_audit_topics(Settings.from_args(args)))
    return list(d), list(m)


def run_replay(args: argparse.Namespace) -> int:
    from goodserve.audit import replay_decisions

    decisions, _ = _load(args)
    rep = replay_decisions(decisions).to_json()
    if args.json:
        print_json(rep)
    else:
        pr = rep["predictions"]
        print(f"decisions: {rep['count']}  identical: {rep['identical']}  "
              f"mismatches: {len(rep['mismatches'])}  errors: {len(rep['errors'])}"
              + (f"  without views (not replayable): {rep['without_views']}"
                 if rep["without_views"] else ""))
        print(f"predictions: checked {pr['checked']} (skipped {pr['skipped']}: other predictor "
              f"versions), P50 identical {pr['p50_identical']}, "
              f"P90 recalibrated online {pr['p90_recalibrated']}")
        if rep["mismatches"]:
            print(table(rep["mismatches"][: args.show],
                        ["decision_id", "request_id", "recorded", "replayed"]))
        if pr["p50_mismatches"]:
            print(table(pr["p50_mismatches"][: args.show],
                        ["decision_id", "recorded_p50", "recomputed_p50"]))
    bad = rep["mismatches"] or rep["predictions"]["p50_mismatches"]
    return 1 if bad else 0


def run_explain(args: argparse.Namespace) -> int:
    from goodserve.audit import explain, format_explanation

    decisions, migrations = _load(args)
    try:
        ex = explain(args.request_id, decisions, migrations)
    except KeyError as e:
        print(f"audit: {e.args[0]}")
        return 2
    if args.json:
        print_json(ex)
    else:
        print(format_explanation(ex))
    return 0
