"""Trace files, the synthesizer, agentic workflows and the Azure converter."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from goodserve.cli import main
from goodserve.errors import InvalidInput
from goodserve.sim.azure import convert_azure
from goodserve.sim.synth import TASK_PROFILES, synthesize, synthesize_workflows
from goodserve.sim.trace import TraceError, TraceRow, read_trace, trace_stats, write_trace

REPO = Path(__file__).resolve().parent.parent


def _azure_dir() -> Path:
    """The public Azure CSVs: $GOODSERVE_TRACES_DIR, ./shared or /work/shared data/traces."""
    roots = [os.environ.get("GOODSERVE_TRACES_DIR", ""), REPO / "shared/data/traces"]
    roots.append("/work/shared/data/traces")
    for root in roots:
        if root and (Path(root) / "azure_llm_2023").is_dir():
            return Path(root) / "azure_llm_2023"
    return Path("/nonexistent")


AZURE = _azure_dir()


def _rows() -> list[TraceRow]:
    return [
        TraceRow(arrival_s=0.0, input_tokens=100, output_tokens=200),
        TraceRow(
            arrival_s=1.25,
            input_tokens=3000,
            output_tokens=50,
            slo_s=6.0,
            task="sql",
            workflow_id="wf-1",
            step=2,
            prompt='SELECT "a", b\nFROM t; -- comma, quote',
            model="llama-2-7b",
            request_id="r-1",
            think_s=1.5,
            prefix_tokens=2500,
            workflow_deadline_s=60.0,
        ),
    ]


@pytest.mark.parametrize("name", ["t.jsonl", "t.csv", "t.json", "t.jsonl.gz", "t.csv.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    rows = _rows()
    write_trace(rows, tmp_path / name)
    assert read_trace(tmp_path / name) == rows


def test_json_array_accepted(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"arrival_s": 0, "input_tokens": 5, "output_tokens": 7}]))
    assert read_trace(p) == [TraceRow(arrival_s=0.0, input_tokens=5, output_tokens=7)]


GOOD = '{"arrival_s": 0.0, "input_tokens": 10, "output_tokens": 5}'


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ('{"arrival_s": 1.0, "input_tokens": 10}', "output_tokens"),
        ('{"arrival_s": -1, "input_tokens": 10, "output_tokens": 5}', "arrival_s"),
        ('{"arrival_s": 1, "input_tokens": 0, "output_tokens": 5}', "input_tokens"),
        ('{"arrival_s": 1, "input_tokens": "ten", "output_tokens": 5}', "input_tokens"),
        ('{"arrival_s": 1, "input_tokens": 10, "output_tokens": 5, "slo_s": 0}', "slo_s"),
        (
            '{"arrival_s": 1, "input_tokens": 10, "output_tokens": 5, "prefix_tokens": 11}',
            "prefix_tokens",
        ),
        ('{"arrival_s": 1, "input_tokens": 10, "output_tokens": 5, "step": -1}', "step"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_jsonl_rows_name_the_line(tmp_path: Path, bad_line: str, needle: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n")
    with pytest.raises(TraceError) as ei:
        read_trace(p)
    assert f"{p}:4:" in str(ei.value)
    assert needle in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, InvalidInput)


@pytest.mark.parametrize(
    ("text", "where", "needle"),
    [
        ("arrival_s,input_tokens\n0,1\n", ":1:", "output_tokens"),
        ("arrival_s,input_tokens,output_tokens\n0,1,2\n0.5,x,2\n", ":3:", "input_tokens"),
        ("arrival_s,input_tokens,output_tokens\n0,1,2\n1,2,3,4\n", ":3:", "more cells"),
        ("arrival_s,input_tokens,output_tokens,slo_s\n0,1,2,\n1,2,,5\n", ":3:", "output_tokens"),
    ],
)
def test_bad_csv_rows_name_the_line(tmp_path: Path, text: str, where: str, needle: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(TraceError) as ei:
        read_trace(p)
    assert where in str(ei.value) and needle in str(ei.value)


def test_csv_empty_cells_are_defaults(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,input_tokens,output_tokens,slo_s,task,extra\n0,10,5,,,ignored\n")
    assert read_trace(p) == [TraceRow(arrival_s=0.0, input_tokens=10, output_tokens=5)]


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(tmp_path / "t.txt")


@pytest.mark.parametrize(("arrival", "cv"), [("poisson", 1.0), ("gamma", 2.0), ("gamma", 0.5)])
def test_rate_within_tolerance(arrival: str, cv: float) -> None:
    rows = synthesize(n=5000, rps=20.0, arrival=arrival, cv=cv, seed=3)  # type: ignore[arg-type]
    rate = (len(rows) - 1) / rows[-1].arrival_s
    assert rate == pytest.approx(20.0, rel=0.08)
    gaps = np.diff([r.arrival_s for r in rows])
    assert float(gaps.std() / gaps.mean()) == pytest.approx(cv, rel=0.15)


def test_duration_mode_and_uniform() -> None:
    rows = synthesize(duration_s=30.0, rps=4.0, arrival="uniform")
    assert len(rows) == 120 and rows[-1].arrival_s < 30.0
    rows = synthesize(duration_s=100.0, rps=10.0, seed=1)
    assert 900 <= len(rows) <= 1100 and all(r.arrival_s < 100.0 for r in rows)


def test_determinism_under_seed() -> None:
    kw = {"n": 300, "rps": 5.0, "mix": {"chat": 0.5, "code": 0.3, "math": 0.2}}
    assert synthesize(seed=7, **kw) == synthesize(seed=7, **kw)  # type: ignore[arg-type]
    assert synthesize(seed=7, **kw) != synthesize(seed=8, **kw)  # type: ignore[arg-type]
    wk = {"workflows": 10, "rps": 1.0}
    assert synthesize_workflows(seed=2, **wk) == synthesize_workflows(seed=2, **wk)
    assert synthesize_workflows(seed=2, **wk) != synthesize_workflows(seed=3, **wk)


def test_figure2_scenario_shape() -> None:
    rows = synthesize(n=600, rps=10.0, input_tokens=100, output_tokens=(100, 500), seed=0)
    assert len(rows) == 600
    assert {r.input_tokens for r in rows} == {100}
    outs = [r.output_tokens for r in rows]
    assert min(outs) >= 100 and max(outs) <= 500
    assert min(outs) < 150 and max(outs) > 450  # the whole range is used
    arr = [r.arrival_s for r in rows]
    assert arr == sorted(arr) and arr[0] == 0.0
    assert len({r.request_id for r in rows}) == 600


def test_figure2_example_file_matches() -> None:
    rows = read_trace(REPO / "examples/traces/figure2.jsonl")
    assert len(rows) == 600 and {r.input_tokens for r in rows} == {100}
    assert all(100 <= r.output_tokens <= 500 for r in rows)


def test_mix_shares_and_profiles() -> None:
    rows = synthesize(n=4000, rps=50.0, mix={"chat": 3, "sql": 1}, seed=5)
    share = sum(r.task == "sql" for r in rows) / len(rows)
    assert share == pytest.approx(0.25, abs=0.03)
    sql_out = np.median([r.output_tokens for r in rows if r.task == "sql"])
    chat_out = np.median([r.output_tokens for r in rows if r.task == "chat"])
    assert sql_out == pytest.approx(TASK_PROFILES["sql"].output.median, rel=0.15)
    assert chat_out > sql_out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 10, "rps": 0.0},
        {"rps": 1.0},
        {"n": 10, "rps": 1.0, "mix": {"poetry": 1.0}},
        {"n": 10, "rps": 1.0, "output_tokens": (5, 1)},
        {"n": 10, "rps": 1.0, "arrival": "gamma", "cv": 0.0},
    ],
)
def test_synth_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        synthesize(**kwargs)  # type: ignore[arg-type]


def test_unknown_task_with_explicit_lengths() -> None:
    rows = synthesize(n=5, rps=1.0, mix={"poetry": 1.0}, input_tokens=10, output_tokens=20)
    assert {r.task for r in rows} == {"poetry"}


def test_workflows_prefix_consistency_and_order() -> None:
    rows = synthesize_workflows(
        workflows=40, rps=2.0, output_tokens=(20, 300), slo_per_step_s=8.0, workflow_slo_s=90.0
    )
    arr = [r.arrival_s for r in rows]
    assert arr == sorted(arr)
    by_wf: dict[str, list[TraceRow]] = {}
    for r in rows:  # file order
        assert r.workflow_id is not None
        by_wf.setdefault(r.workflow_id, []).append(r)
    assert len(by_wf) == 40
    for steps in by_wf.values():
        assert [r.step for r in steps] == list(range(len(steps)))  # in order, none missing
        assert 3 <= len(steps) <= 12
        first = steps[0]
        assert first.prefix_tokens == 0 and first.think_s == 0.0
        assert 1000 <= first.input_tokens <= 6000
        for prev, cur in itertools.pairwise(steps):
            assert cur.prefix_tokens == prev.input_tokens + prev.output_tokens
            assert 100 <= cur.input_tokens - cur.prefix_tokens <= 600
            assert 0.5 <= cur.think_s <= 3.0
            assert cur.arrival_s > prev.arrival_s
        assert all(r.slo_s == 8.0 and r.workflow_deadline_s == 90.0 for r in steps)
        assert all(20 <= r.output_tokens <= 300 and r.task == "agent" for r in steps)
    assert len({r.request_id for r in rows}) == len(rows)


def test_workflow_round_trip_and_stats(tmp_path: Path) -> None:
    rows = synthesize_workflows(workflows=5, rps=1.0, steps=(2, 2), seed=1)
    write_trace(rows, tmp_path / "w.csv")
    assert read_trace(tmp_path / "w.csv") == rows
    st = trace_stats(rows)
    assert st["count"] == 10 and st["workflows"]["count"] == 5
    assert st["workflows"]["steps"]["p50"] == 2.0


@pytest.mark.skipif(not AZURE.exists(), reason="Azure traces not present")
@pytest.mark.parametrize(
    ("name", "count", "task"), [("code", 8819, "code"), ("conv", 19366, "chat")]
)
def test_azure_conversion(name: str, count: int, task: str) -> None:
    src = AZURE / f"AzureLLMInferenceTrace_{name}.csv"
    rows = convert_azure(src)
    assert len(rows) == count
    assert {r.task for r in rows} == {task}
    assert rows[0].arrival_s == 0.0
    arr = [r.arrival_s for r in rows]
    assert arr == sorted(arr)
    span = arr[-1]
    assert 3400 < span < 3600  # about one hour of traffic
    fast = convert_azure(src, rate_scale=2.0)
    assert len(fast) == count
    assert fast[-1].arrival_s == pytest.approx(span / 2, abs=1e-5)
    assert [r.input_tokens for r in fast] == [r.input_tokens for r in rows]
    assert rows[1].input_tokens == (3180 if name == "code" else 396)


@pytest.mark.skipif(not AZURE.exists(), reason="Azure traces not present")
def test_azure_limit_duration_start() -> None:
    src = AZURE / "AzureLLMInferenceTrace_conv.csv"
    assert len(convert_azure(src, limit=100)) == 100
    rows = convert_azure(src, duration_s=60.0, rate_scale=3.0, start_s=10.0, task="agent")
    assert rows and all(10.0 <= r.arrival_s < 70.0 for r in rows)
    assert {r.task for r in rows} == {"agent"}
    full = convert_azure(src, duration_s=180.0)
    assert len(rows) == len(full)  # 60 s at 3x rate = the first 180 s


def test_azure_bad_header(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="not an Azure trace"):
        convert_azure(p)


def test_azure_vidur_format(tmp_path: Path) -> None:
    p = tmp_path / "splitwise_code.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,20,6\n")
    rows = convert_azure(p, rate_scale=0.5)
    assert [(r.arrival_s, r.input_tokens, r.task) for r in rows] == [
        (0.0, 10, "code"),
        (1.0, 20, "code"),
    ]


def test_cli_synth_convert_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.jsonl"
    rc = main(
        ["trace", "synth", "--out", str(out), "--n", "50", "--rps", "5", "--mix", "chat=1,code=1",
         "--slo-s", "6", "--workflows", "3", "--steps", "2:3"]
    )  # fmt: skip
    assert rc == 0
    rows = read_trace(out)
    assert len([r for r in rows if r.workflow_id is None]) == 50
    assert len({r.workflow_id for r in rows if r.workflow_id}) == 3
    capsys.readouterr()
    assert main(["trace", "stats", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["count"] == len(rows) and st["workflows"]["count"] == 3
    assert set(st["tasks"]) == {"chat", "code", "agent"}
    assert main(["trace", "stats", str(tmp_path / "missing.jsonl")]) == 2
    if AZURE.exists():
        conv = tmp_path / "c.csv"
        src = str(AZURE / "AzureLLMInferenceTrace_code.csv")
        assert main(["trace", "convert-azure", src, "--out", str(conv), "--limit", "10"]) == 0
        assert len(read_trace(conv)) == 10
