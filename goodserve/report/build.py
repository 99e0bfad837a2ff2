"""Build the report: numbers from simulation outputs or live results, plots, one HTML page.

Inputs are ``goodserve simulate --keep-requests --out`` JSON files (one report, or
``{"runs": [...]}`` for several policies) taken at different loads, or a JSON Lines
file of ``Result`` records from a live run. Every plot is drawn with matplotlib's Agg
backend and embedded in the page as a base64 PNG, so the page is one self-contained
file; ``report.json`` beside it holds the same numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_KEYS = ("policy", "load_rps", "requests", "met_slo", "slo_attainment", "goodput_rps",
                "latency_p50_s", "latency_p99_s", "migrations", "rejected")
CDF_POINTS = 101


# ---------------------------------------------------------------------------- inputs
def load_sim_file(spec: str) -> list[dict[str, Any]]:
    """Runs of one simulate JSON output; ``LOAD=PATH`` labels them with an offered load."""
    load: float | None = None
    path = spec
    if "=" in spec:
        head, tail = spec.split("=", 1)
        try:
            load, path = float(head), tail
        except ValueError:
            path = spec
    data = json.loads(Path(path).read_text())
    runs = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
    out = []
    for r in runs:
        r = dict(r)
        r["load_rps"] = load if load is not None else offered_load(r)
        r["source"] = str(path)
        out.append(r)
    return out


def offered_load(run: dict[str, Any]) -> float:
    """Arrivals per second over the arrival span (per-request rows), else requests/span."""
    rows = run.get("per_request") or []
    arr = sorted(r["arrival"] for r in rows)
    if len(arr) > 1 and arr[-1] > arr[0]:
        return round((len(arr) - 1) / (arr[-1] - arr[0]), 1)
    span = float(run.get("sim_seconds") or 0.0)
    return round(run.get("requests", 0) / span, 1) if span > 0 else 0.0


def load_results_file(path: str | Path) -> dict[str, Any]:
    """A live run as a pseudo simulation run, from JSON Lines of ``Result`` records."""
    from goodserve.schemas import Result, decode

    rows = []
    per_inst: dict[str, dict[str, Any]] = {}
    with Path(path).open("rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = decode(line)
            if not isinstance(r, Result):
                continue
            arrival = r.arrival if r.arrival is not None else r.dispatched_at
            rows.append({
                "request_id": r.request_id, "arrival": arrival, "deadline": r.deadline,
                "finish": r.finished_at if r.status == "ok" else None,
                "dispatched": r.dispatched_at, "instance": r.instance_id,
                "predicted_p50": r.predicted_output_tokens, "predicted_p90": None,
                "output_tokens": r.output_tokens, "migrations": r.migrations,
                "met": bool(r.met_deadline), "status": r.status,
            })
            if r.instance_id:
                pi = per_inst.setdefault(r.instance_id, {"requests": 0, "met": 0, "tokens": 0})
                pi["requests"] += 1
                pi["met"] += bool(r.met_deadline)
                pi["tokens"] += r.output_tokens
    if not rows:
        raise ValueError(f"{path}: no Result records")
    t0 = min(r["arrival"] for r in rows if r["arrival"] is not None)
    for r in rows:  # times relative to the first arrival, as in simulations
        for k in ("arrival", "deadline", "finish", "dispatched"):
            if r[k] is not None:
                r[k] -= t0
    lat = [r["finish"] - r["arrival"] for r in rows if r["finish"] is not None
           and r["arrival"] is not None]
    met = sum(r["met"] for r in rows)
    end = max((r["finish"] or r["arrival"] or 0.0) for r in rows)
    run = {
        "policy": "live", "requests": len(rows), "met_slo": met,
        "slo_attainment": met / len(rows), "goodput_rps": met / max(end, 1e-9),
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if lat else None,
        "migrations": sum(1 for r in rows if r["migrations"]),
        "rejected": sum(1 for r in rows if r["status"] == "rejected"),
        "per_instance": per_inst, "per_request": rows,
        "load_over_time": _load_from_intervals(rows), "source": str(path),
    }
    run["load_rps"] = offered_load(run)
    return run


def _load_from_intervals(rows: list[dict[str, Any]], n: int = 400) -> dict[str, Any]:
    """In-flight requests per instance over time, from dispatch/finish times."""
    insts = sorted({r["instance"] for r in rows if r["instance"]})
    spans = [(r["instance"], r["dispatched"] if r["dispatched"] is not None else r["arrival"],
              r["finish"]) for r in rows if r["instance"] and r["finish"] is not None]
    if not spans:
        return {"instances": insts, "t": [], "load": []}
    end = max(s[2] for s in spans)
    ts = np.linspace(0.0, end, n)
    idx = {iid: k for k, iid in enumerate(insts)}
    load = np.zeros((n, len(insts)), dtype=int)
    for iid, a, b in spans:
        load[(ts >= a) & (ts < b), idx[iid]] += 1
    return {"instances": insts, "t": ts.tolist(), "load": load.tolist()}


# ---------------------------------------------------------------------------- numbers
def _cdf(values: Sequence[float]) -> dict[str, list[float]]:
    """The empirical CDF at 101 quantiles (small enough for JSON, enough for a plot)."""
    if not len(values):
        return {"q": [], "x": []}
    q = np.linspace(0.0, 1.0, CDF_POINTS)
    return {"q": q.tolist(), "x": np.quantile(np.asarray(values, dtype=float), q).tolist()}


def run_numbers(run: dict[str, Any]) -> dict[str, Any]:
    """Summary, latency/slack CDFs, prediction error and load of one run."""
    rows = run.get("per_request") or []
    fin = [r for r in rows if r.get("finish") is not None]
    lat = [r["finish"] - r["arrival"] for r in fin]
    slack = [r["deadline"] - r["finish"] for r in fin if r.get("deadline") is not None]
    pred = [(r["predicted_p50"], r.get("predicted_p90"), r["output_tokens"]) for r in rows
            if r.get("predicted_p50") is not None and r.get("output_tokens") is not None]
    pstats: dict[str, Any] = {"n": len(pred)}
    if pred:
        p50 = np.array([p[0] for p in pred], dtype=float)
        act = np.array([p[2] for p in pred], dtype=float)
        pstats["mae_p50_tokens"] = float(np.mean(np.abs(act - p50)))
        pstats["bias_p50_tokens"] = float(np.mean(act - p50))
        p90 = [p[1] for p in pred if p[1] is not None]
        if len(p90) == len(pred):
            pstats["p90_coverage"] = float(np.mean(act <= np.array(p90, dtype=float)))
    lot = run.get("load_over_time") or {}
    load = np.asarray(lot.get("load") or [], dtype=float)
    mean_load = ({iid: float(load[:, k].mean()) for k, iid in enumerate(lot["instances"])}
                 if load.size else {})
    return {
        "summary": {k: run.get(k) for k in SUMMARY_KEYS},
        "latency_cdf": _cdf(lat),
        "slack_cdf": _cdf(slack),
        "prediction": pstats,
        "mean_load_by_instance": mean_load,
        "per_instance": run.get("per_instance") or {},
    }


def report_numbers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page shows, as JSON."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_policy.setdefault(str(r.get("policy")), []).append(r)
    curve = {
        p: [{"load_rps": r["load_rps"], "slo_attainment": r.get("slo_attainment"),
             "goodput_rps": r.get("goodput_rps")}
            for r in sorted(rs, key=lambda r: r["load_rps"])]
        for p, rs in by_policy.items()
    }
    return {
        "policies": list(by_policy),
        "loads": sorted({r["load_rps"] for r in runs}),
        "attainment_vs_load": curve,
        "runs": [{**run_numbers(r), "label": _label(r)} for r in runs],
    }


def _label(r: dict[str, Any]) -> str:
    return f"{r.get('policy')} @ {r['load_rps']:g} rps"


# ---------------------------------------------------------------------------- plots
STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _style(numbers: dict[str, Any], policy: str) -> dict[str, Any]:
    """Line style per policy, so policies with identical results stay visible."""
    k = numbers["policies"].index(policy) if policy in numbers["policies"] else 0
    return {"ls": STYLES[k % len(STYLES)], "marker": MARKERS[k % len(MARKERS)], "lw": 1.6}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(numbers: dict[str, Any]) -> str:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for p, pts in numbers["attainment_vs_load"].items():
        x = [q["load_rps"] for q in pts]
        a1.plot(x, [q["slo_attainment"] for q in pts], label=p, **_style(numbers, p))
        a2.plot(x, [q["goodput_rps"] for q in pts], label=p, **_style(numbers, p))
    a1.set(xlabel="offered load (requests/s)", ylabel="SLO attainment", ylim=(0, 1.02),
           title="SLO attainment vs load")
    a2.set(xlabel="offered load (requests/s)", ylabel="goodput (requests/s)",
           title="Goodput vs load")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    return _png(fig)


def plot_cdfs(runs: list[dict[str, Any]], numbers: dict[str, Any], key: str, xlabel: str) -> str:
    """One panel per load: the CDF of each policy."""
    plt = _plt()
    loads = numbers["loads"]
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 3.6), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for r, rn in zip(runs, numbers["runs"], strict=True):
            if r["load_rps"] != load or not rn[key]["x"]:
                continue
            st = {**_style(numbers, str(r.get("policy"))), "marker": None}
            ax.plot(rn[key]["x"], rn[key]["q"], label=str(r.get("policy")), **st)
        if key == "slack_cdf":
            ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set(xlabel=xlabel, ylabel="fraction of requests", title=f"{load:g} rps", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def plot_load(runs: list[dict[str, Any]]) -> str | None:
    """Per-instance in-flight requests over time, one panel per policy at the highest load."""
    with_load = [r for r in runs if (r.get("load_over_time") or {}).get("t")]
    if not with_load:
        return None
    top = max(r["load_rps"] for r in with_load)
    chosen = [r for r in with_load if r["load_rps"] == top][:4]
    plt = _plt()
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.6 * len(chosen)), squeeze=False,
                             sharex=True)
    for ax, r in zip(axes[:, 0], chosen, strict=True):
        lot = r["load_over_time"]
        load = np.asarray(lot["load"], dtype=float)
        for k, iid in enumerate(lot["instances"]):
            ax.plot(lot["t"], load[:, k], lw=1.0, label=iid)
        ax.set(ylabel="in flight", title=f"{r.get('policy')} @ {top:g} rps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(lot["instances"]), 8), loc="upper right")
    axes[-1, 0].set_xlabel("time (s)")
    return _png(fig)


def plot_prediction(runs: list[dict[str, Any]]) -> str | None:
    """Predicted vs actual output length of one run (the predictor is shared by policies)."""
    src = next((r for r in runs if any(q.get("predicted_p50") is not None
                                       for q in r.get("per_request") or [])), None)
    if src is None:
        return None
    rows = [q for q in src["per_request"] if q.get("predicted_p50") is not None]
    act = np.array([q["output_tokens"] for q in rows], dtype=float)
    p50 = np.array([q["predicted_p50"] for q in rows], dtype=float)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(act, p50, s=6, alpha=0.5, label="P50")
    if all(q.get("predicted_p90") is not None for q in rows):
        p90 = np.array([q["predicted_p90"] for q in rows], dtype=float)
        ax.scatter(act, p90, s=6, alpha=0.4, marker="x", label="P90")
    hi = float(max(act.max(initial=1.0), p50.max(initial=1.0)))
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="exact")
    ax.set(xlabel="actual output tokens", ylabel="predicted output tokens",
           title=f"Prediction ({src.get('predictor', '?')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------------- page
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return "-" if v is None else html.escape(str(v))


def render_html(numbers: dict[str, Any], images: dict[str, str | None], title: str) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r['summary'].get(k))}</td>" for k in SUMMARY_KEYS) + "</tr>"
        for r in numbers["runs"]
    )
    head = "".join(f"<th>{k}</th>" for k in SUMMARY_KEYS)
    pred_rows = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td>{r['prediction'].get('n', 0)}</td>"
        f"<td>{_fmt(r['prediction'].get('mae_p50_tokens'))}</td>"
        f"<td>{_fmt(r['prediction'].get('bias_p50_tokens'))}</td>"
        f"<td>{_fmt(r['prediction'].get('p90_coverage'))}</td></tr>"
        for r in numbers["runs"]
    )
    captions = {
        "attainment": "SLO attainment and goodput vs offered load, per policy",
        "latency": "Latency (arrival to finish) CDF of finished requests, per load",
        "slack": "Slack (deadline minus finish; left of the dashed line: late) CDF",
        "load": "Requests in flight per instance over time (highest load)",
        "prediction": "Predicted vs actual output length",
    }
    figs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{img}"/>'
        f"<figcaption>{captions[k]}</figcaption></figure>"
        for k, img in images.items() if img
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 12px 0 24px; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f3f7; }}
figure {{ margin: 16px 0; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 13px; color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Runs</h2><table><tr>{head}</tr>{rows}</table>
<h2>Plots</h2>{figs}
<h2>Output-length prediction</h2>
<table><tr><th>run</th><th>n</th><th>MAE P50 (tokens)</th><th>bias P50</th>
<th>P90 coverage</th></tr>{pred_rows}</table>
<p>The same numbers are in <code>report.json</code>.</p>
</body></html>
"""


def build_report(runs: list[dict[str, Any]], out_dir: str | Path,
                 title: str = "GoodServe report") -> dict[str, Any]:
    """Write ``index.html`` and ``report.json`` to ``out_dir``; return the numbers."""
    if not runs:
        raise ValueError("no runs to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = report_numbers(runs)
    images = {
        "attainment": plot_attainment(numbers),
        "latency": plot_cdfs(runs, numbers, "latency_cdf", "latency (s)"),
        "slack": plot_cdfs(runs, numbers, "slack_cdf", "slack (s)"),
        "load": plot_load(runs),
        "prediction": plot_prediction(runs),
    }
    (out / "index.html").write_text(render_html(numbers, images, title))
    (out / "report.json").write_text(json.dumps(numbers, indent=1, default=float))
    numbers["html"] = str(out / "index.html")
    return numbers
