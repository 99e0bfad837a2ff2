"""Report: from `goodserve simulate` runs of several policies, rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from goodserve.schemas import Result, encode
from PIL import Image

from goodserve.cli import build_parser
from goodserve.report.build import build_report, load_results_file

ROOT = Path(__file__).resolve().parents[1]
POLICIES = "goodserve,least-request,round-robin"


def cli(argv: list[str]) -> int:
    """The CLI without its logging set-up (which would bind to pytest's captured stderr)."""
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    subprocess.run([str(ROOT / "scripts" / "install-chromium.sh")], check=True, timeout=600)
    path = shutil.which("chromium")
    assert path, "chromium not installed (scripts/install-chromium.sh)"
    return path


def screenshot(html: Path, png: Path, tmp: Path) -> None:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}",
           f"--screenshot={png}", "--window-size=1280,2000", html.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("sims")
    outs = []
    for rps in (10, 25):
        trace = d / f"trace-{rps}.jsonl"
        assert cli(["trace", "synth", "--out", str(trace), "--n", "150", "--rps", str(rps),
                    "--input-tokens", "100", "--output-tokens", "100:500", "--slo-s", "6"]) == 0
        out = d / f"sim-{rps}.json"
        assert cli(["simulate", "--fleet", "figure2", "--trace", str(trace), "--policy", POLICIES,
                    "--keep-requests", "--quiet", "--out", str(out)]) == 0
        outs.append(out)
    return outs


def test_simulate_keep_requests_rows(sims: list[Path]) -> None:
    runs = json.loads(sims[0].read_text())["runs"]
    assert [r["policy"] for r in runs] == POLICIES.split(",")
    r = runs[0]
    assert r["requests"] == 150 == len(r["per_request"])
    row = r["per_request"][0]
    assert {"arrival", "deadline", "finish", "instance", "predicted_p50", "predicted_p90",
            "output_tokens", "met"} <= set(row)
    assert sum(q["met"] for q in r["per_request"]) == r["met_slo"]
    lot = r["load_over_time"]
    assert len(lot["t"]) == len(lot["load"]) > 10 and len(lot["instances"]) == 4


def test_report_numbers_and_rendered_page(sims: list[Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert cli(["report", "--sim", *map(str, sims), "--out", str(out), "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "report.json").read_text())
    assert saved["loads"] == printed["loads"] and len(saved["loads"]) == 2
    assert set(saved["attainment_vs_load"]) == set(POLICIES.split(","))
    for pts in saved["attainment_vs_load"].values():
        assert len(pts) == 2 and all(0.0 <= p["slo_attainment"] <= 1.0 for p in pts)
    run = saved["runs"][0]
    assert len(run["latency_cdf"]["x"]) == 101 and run["latency_cdf"]["x"] == sorted(
        run["latency_cdf"]["x"])
    assert run["prediction"]["n"] == 150 and 0.0 <= run["prediction"]["p90_coverage"] <= 1.0
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    png = tmp_path / "page.png"
    screenshot(out / "index.html", png, tmp_path)
    assert png.exists() and png.stat().st_size > 50_000
    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.shape == (2000, 1280)
    assert img.std() > 20.0  # text, tables and plots, not a blank page
    top = img[:400]
    assert (top < 128).mean() > 0.01  # the title and the runs table are drawn


def test_report_from_live_results(tmp_path: Path) -> None:
    lines = []
    for i in range(40):
        t = 1000.0 + i * 0.25
        lines.append(encode(Result(
            request_id=f"r{i}", status="ok", instance_id=f"w{i % 2}", output_tokens=50 + i,
            arrival=t, dispatched_at=t + 0.01, first_token_at=t + 0.1, finished_at=t + 1 + i * 0.05,
            deadline=t + 2.5, met_deadline=1 + i * 0.05 <= 2.5, predicted_output_tokens=60)))
    f = tmp_path / "results.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    run = load_results_file(f)
    assert run["requests"] == 40 and run["load_rps"] == pytest.approx(4.0)
    nums = build_report([run], tmp_path / "live")
    r = nums["runs"][0]
    assert r["summary"]["met_slo"] == sum(1 + i * 0.05 <= 2.5 for i in range(40))
    assert r["prediction"]["n"] == 40
    assert set(r["mean_load_by_instance"]) == {"w0", "w1"}
    assert (tmp_path / "live" / "index.html").stat().st_size > 10_000
