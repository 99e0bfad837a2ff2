"""``goodserve predictor``: prepare data, train, evaluate and time the output-length model.

- ``prepare --out FILE``: the public data sets as one predictor data file (JSON Lines).
- ``train [--data FILE ...] --out DIR``: fit + calibrate a model (public data if no --data).
- ``eval [--data FILE] [--model DIR] [--history both|online|none] [--json]``: MAE, baseline
  MAE, P90 coverage, per task, in two cases: online (history features rebuilt in arrival
  order) and no history (every request is the first the dispatcher sees). Without --model:
  the shipped model; without --data: the held-out split of the public data.
- ``bench [--json]``: microseconds per prediction, single row and batched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "predictor", help="train / evaluate the output-length predictor"
    )
    psub = p.add_subparsers(dest="predictor_command", metavar="SUBCOMMAND")
    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_help)

    pp = psub.add_parser("prepare", help="write the public data as a predictor data file")
    pp.add_argument("--out", type=Path, required=True, help="output JSON Lines file")
    pp.add_argument("--data-dir", type=Path, help="shared data folder (default: autodetect)")
    pp.add_argument("--split", choices=("all", "train", "calib", "heldout"), default="all")
    pp.set_defaults(func=_prepare)

    pt = psub.add_parser("train", help="train a model directory")
    pt.add_argument("--data", type=Path, nargs="+", help="predictor data files (default: public)")
    pt.add_argument("--data-dir", type=Path, help="shared data folder (when no --data)")
    pt.add_argument("--out", type=Path, required=True, help="model directory to write")
    pt.add_argument("--rounds", type=int, default=None, help="boosting rounds")
    pt.add_argument("--nthread", type=int, default=1)
    pt.add_argument("--encoder", action="store_true",
                    help="train the encoder tier (needs goodserve[encoder]: a sentence "
                         "encoder's score of the prompt as one more feature)")
    pt.add_argument("--encoder-threads", type=int, default=None,
                    help="torch threads for the encoder (default: torch's choice)")
    pt.add_argument("--json", action="store_true")
    pt.set_defaults(func=_train)

    pe = psub.add_parser("eval", help="evaluate a model (default: the shipped one)")
    pe.add_argument("--data", type=Path, help="predictor data file (default: public held-out)")
    pe.add_argument("--data-dir", type=Path, help="shared data folder (when no --data)")
    pe.add_argument("--model", type=Path,
                    help="model directory (default: the shipped model; 'encoder': the "
                         "shipped encoder tier)")
    pe.add_argument("--split", choices=("all", "heldout"), default=None,
                    help="rows of --data to use (default all; public data: heldout)")
    pe.add_argument("--history", choices=("both", "online", "none"), default="both",
                    help="online: history rebuilt in arrival order; none: no history at all "
                         "(every prompt, workflow and model new); both (default)")
    pe.add_argument("--cold-prompts", action="store_true",
                    help="online case only: hide repeats of identical prompts from the history")
    pe.add_argument("--json", action="store_true")
    pe.set_defaults(func=_eval)

    pb = psub.add_parser("bench", help="time predictions (microseconds per request)")
    pb.add_argument("--model", type=Path, help="model directory, or 'encoder'")
    pb.add_argument("--n", type=int, default=5000)
    pb.add_argument("--json", action="store_true")
    pb.set_defaults(func=_bench)


def _public(data_dir: Path | None) -> list[dict[str, Any]]:
    from goodserve.dispatcher.predictor import datasets

    root = data_dir or datasets.default_data_dir()
    if not (root / "datasets").is_dir():
        raise SystemExit(f"public data not found under {root} (set --data-dir)")
    return datasets.load_public(root)


def _prepare(args: argparse.Namespace) -> int:
    from goodserve.dispatcher.predictor import datasets

    recs = _public(args.data_dir)
    if args.split != "all":
        recs = datasets.split(recs)[args.split]
    n = datasets.write_jsonl(recs, args.out)
    print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from goodserve.dispatcher.predictor import datasets, train

    if args.data:
        recs: list[dict[str, Any]] = []
        for f in args.data:
            recs.extend(datasets.read_jsonl(f))
    else:
        recs = _public(args.data_dir)
    print(f"training on {len(recs)} rows (held-out groups excluded) ...", file=sys.stderr)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"params": {"nthread": args.nthread}}
    if args.rounds:
        kw["rounds"] = args.rounds
    if args.encoder:
        from goodserve.dispatcher.predictor.encoder import PromptEncoder

        kw["encoder"] = PromptEncoder(threads=args.encoder_threads).load()
    meta = train.train(recs, args.out, **kw)
    summary = {"out": str(args.out), "rows": meta["rows"],
               "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(summary) if args.json else
          f"model written to {args.out} in {summary['seconds']} s, rows {meta['rows']}")
    return 0


def _load_model(path: Path | None) -> Any:
    from goodserve.dispatcher.predictor.model import OutputLengthPredictor

    return OutputLengthPredictor.from_spec(path)


def _eval(args: argparse.Namespace) -> int:
    from goodserve.dispatcher.predictor import datasets, train

    predictor = _load_model(args.model)
    if args.data:
        recs = datasets.read_jsonl(args.data)
        if args.split == "heldout":
            recs = datasets.split(recs)["heldout"]
        source = str(args.data)
    else:
        recs = _public(args.data_dir)
        if args.split != "all":
            recs = datasets.split(recs)["heldout"]
        source = "public data, held-out split" if args.split != "all" else "public data, all"
    if not recs:
        raise SystemExit("no rows to evaluate")
    cases = {"both": ("online", "no_history"), "online": ("online",),
             "none": ("no_history",)}[args.history]
    results: dict[str, Any] = {}
    for case in cases:
        m = train.evaluate(predictor, recs, prompt_history=not args.cold_prompts,
                           history=case == "online")
        m["data"] = source
        results[case] = m
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[cases[0]], indent=1))
        return 0
    titles = {"online": "ONLINE (history of earlier requests in arrival order"
                        + (", identical prompts hidden)" if args.cold_prompts else ")"),
              "no_history": "NO HISTORY (every request is the first the dispatcher sees)"}
    first = results[cases[0]]
    print(f"model {first['model_version']}  data: {source}  rows {first['n']}  "
          f"baseline {first['baseline_version']} (per-task median of the training data)")
    for case, m in results.items():
        print(f"\n{titles[case]}")
        hdr = f"{'task':<8} {'n':>6} {'mae_tokens':>11} {'baseline_mae':>13} {'ratio':>6} "
        print(hdr + f"{'p90_cov':>8} {'p99_cov':>8}")
        rows = [*m["per_task"].items(), ("ALL", m)]
        for t, b in rows:
            print(f"{t:<8} {b['n']:>6} {b['mae_tokens']:>11.2f} "
                  f"{b['baseline_mae_tokens']:>13.2f} {b['mae_ratio']:>6.3f} "
                  f"{b['p90_coverage']:>8.3f} {b['p99_coverage']:>8.3f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from goodserve.dispatcher.predictor.bench import bench

    r = bench(_load_model(args.model), n=args.n)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        for k, v in r.items():
            print(f"{k:<34} {v}")
    return 0
