"""The Azure load sweep of ``python -m goodserve.bench.experiments --only azure-sweep``."""

from __future__ import annotations

from pathlib import Path

import pytest

from goodserve.bench import experiments as ex


def _azure_present() -> bool:
    try:
        return (ex._traces_dir() / "AzureLLMInferenceTrace_conv.csv").exists()
    except SystemExit:
        return False


@pytest.mark.skipif(not _azure_present(), reason="Azure traces not present")
def test_sweep_finds_a_scale_per_rate_policy_and_target_and_plots_it(tmp_path: Path) -> None:
    sweep = ex.azure_load_sweep(
        limit=80, rates={"conv": [1.0, 4.0]}, iters=3, policies=["goodserve", "fastest-first"]
    )
    assert set(sweep) == {f"conv/{r}/{t}" for r in ("1", "4") for t in (0.95, 0.99)}
    for row in sweep.values():
        assert row["goodserve"] is not None and row["fastest-first"] is not None
        assert row["reduction_vs_best_baseline"] == round(
            1 - row["goodserve"] / row["fastest-first"], 3
        )
    # a higher target never needs a lower scale, at either load
    for r in ("1", "4"):
        assert sweep[f"conv/{r}/0.99"]["goodserve"] >= sweep[f"conv/{r}/0.95"]["goodserve"]
    png = tmp_path / "sweep.png"
    ex.plot_azure_sweep(sweep, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = ex.to_markdown({"azure_load_sweep": sweep})
    assert "conv/4/0.99" in md


def test_loaded_table_names_its_rates_and_the_gain_over_the_best_baseline() -> None:
    row = {"goodserve": 7.5, "fastest-first": 10.0, "least-kv": 12.0,
           "reduction_vs_best_baseline": 0.25}
    md = ex.to_markdown({"azure_slo_scale_loaded": {"conv/xgb/0.95": row}})
    assert f"conversation at {ex.LOADED_RATES['conv']:g}x" in md
    assert "| conv/xgb/0.95 | 7.5 | 10.0 | 12.0 | -25% |" in md
