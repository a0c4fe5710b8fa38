"""`cxrfast bench maxsize` end to end on a tiny synthetic dataset (no RESULTS.md row)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cxrfast.cli import app


def test_max_size_benchmark_runs(tmp_path: Path) -> None:
    args = ["bench", "maxsize", "--studies", "6", "--size-min", "600", "--size-max", "800", "--max-sizes", "256", "512",
            "--repeats", "1", "--batch-size", "2", "--batches", "1", "--loader-repeats", "1", "--workers", "1",
            "--device", "cpu", "--out", str(tmp_path), "--no-results-row"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "max_size.json").read_text())
    assert (tmp_path / "max_size.png").stat().st_size > 0
    small, big = res["results"]["256"], res["results"]["512"]
    assert big["bytes"] > small["bytes"] and small["samples"] == big["samples"] > 0
    assert small["mrm_upsampled_share"] == 1.0 >= big["mrm_upsampled_share"]
    assert set(big["loader"]) == {"dali", "torch"} and all(v["images_per_s"] > 0 for v in big["loader"].values())
    assert res["ratio_to_baseline"]["512"]["disk"] > 1.0
