"""`cxrfast bench kernels` runs end to end on a tiny batch and writes its JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cxrfast.bench import kernel_speed


def test_kernel_bench_runs(tmp_path: Path) -> None:
    rc = kernel_speed.main(["--batch", "2", "--out", str(tmp_path), "--warmup", "1", "--repeats", "1", "--no-results-row"])
    assert rc == 0
    results = json.loads((tmp_path / "kernel_speed.json").read_text())
    assert (tmp_path / "kernel_speed.png").stat().st_size > 0
    assert results["batch"] == 2
    names = [c["case"] for c in results["cases"]]
    assert names == [
        "random_masking r=0.75", "random_masking r=0.9", "masked_patch_mse MAE 224/p16",
        "masked_patch_mse MRM 448/p32", "mask_tokens p=0.5 (fwd only)",
    ]  # fmt: skip
    assert all(c["reference_ms"] > 0 for c in results["cases"])
    if torch.cuda.is_available():
        assert all(c["fused_ms"] > 0 and c["speedup"] > 0 for c in results["cases"])
    else:
        assert results["note"].startswith("cuda unavailable: fused numbers open")
        assert all(c["fused_ms"] is None for c in results["cases"])
