"""The GPU one-shot suite's CPU-side parts: the plan's commands parse with the benchmarks' own
argument parsers (flags cannot drift), steps record ok / failed / timeout, the summary and the
RESULTS.md row come from the benchmarks' JSON, and the DALI parity comparison runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cxrfast.bench import gpu_suite
from cxrfast.bench.cli import BENCHMARKS


def test_plan_commands_parse_with_each_benchmark_parser(tmp_path: Path):
    import importlib

    steps = gpu_suite.plan(tmp_path, tmp_path / "shards", presets=["mae_cxr_vitb", "mrm_vitb"], batch_size=64,
                           workers=16)
    names = [s.name for s in steps]
    assert names == ["kernel_tests", "dali_parity", "pipelines", "kernels", "train", "max_batch"]
    assert sum(s.share for s in steps) <= 1.0
    kernel = steps[0]
    assert kernel.env == {"TRITON_INTERPRET": "0"} and all("test_kernels_" in a for a in kernel.argv[6:])
    for step in steps:
        argv = step.argv
        if argv[1:4] == ["-m", "cxrfast.cli", "bench"]:
            module = importlib.import_module(BENCHMARKS[argv[4]])
            args = module.parse_args(argv[5:])  # SystemExit on an unknown flag
            assert Path(args.out).is_relative_to(tmp_path)
            assert step.result_json is not None and step.result_json.is_relative_to(tmp_path)
    max_batch = next(s for s in steps if s.name == "max_batch")
    assert max_batch.argv[max_batch.argv.index("--presets") + 1] == "mrm_vitb"  # mgca_vitb when it is timed too
    train = next(s for s in steps if s.name == "train")
    assert "--presets" in train.argv and train.argv[train.argv.index("--presets") + 1] == "mae_cxr_vitb,mrm_vitb"
    assert set(gpu_suite.registered_presets()) >= {"mae_cxr_vitb", "mrm_vitb"}


def test_run_step_statuses(tmp_path: Path):
    ok = gpu_suite.Step("ok", [sys.executable, "-c", "print('fine')"], 0.1)
    bad = gpu_suite.Step("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], 0.1)
    slow = gpu_suite.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 0.1)
    assert gpu_suite.run_step(ok, 60)["status"] == "ok" and "fine" in gpu_suite.run_step(ok, 60)["tail"]
    assert gpu_suite.run_step(bad, 60)["status"] == "failed"
    assert gpu_suite.run_step(slow, 1)["status"] == "timeout"


def _fake_results() -> dict:
    return {
        "kernel_tests": {"status": "ok", "tail": "....\n42 passed in 9.1s\n", "result": None},
        "dali_parity": {"status": "ok", "tail": "", "result": {
            "augmentations": {"mae": {"mean_abs_diff": 0.004, "max_abs_diff": 0.3},
                              "eval": {"mean_abs_diff": 0.001, "max_abs_diff": 0.1}}, "ok": True}},
        "pipelines": {"status": "ok", "tail": "", "result": {
            "results": {"mae": {"dali": {"images_per_s": 9000.0}, "torch": {"images_per_s": 1500.0}}},
            "dali_over_torch": {"mae": 6.0}}},
        "kernels": {"status": "ok", "tail": "", "result": {"cases": [{"case": "random_masking r=0.75", "speedup": 4.2}]}},
        "train": {"status": "ok", "tail": "", "result": {"runs": [
            {"preset": "mrm_vitb", "backend": "dali", "fused": True, "micro_batch": 64, "images_per_s": 1234.0,
             "mfu": 0.31, "peak_mem_gib": 9.5, "data_wait_share": 0.02}]}},
        "max_batch": {"status": "timeout", "tail": "", "result": None},
    }


def test_summary_plot_and_record(tmp_path: Path):
    results = _fake_results()
    numbers = gpu_suite.summary_numbers(results)
    assert "max_batch: timeout" in numbers
    assert "compiled kernel tests: 42 passed in 9.1s" in numbers
    assert any(n.startswith("DALI mixed vs cpu: max mean |diff| 0.0040 (pass)") for n in numbers)
    assert "loader img/s dali/torch: mae 9000/1500 (6.0x)" in numbers
    assert "kernels fused/ref: random_masking r=0.75 4.20x" in numbers
    assert "mrm_vitb dali b64: 1234 img/s, MFU 31.0%, 9.5 GiB, wait 2%" in numbers
    assert gpu_suite.plot(tmp_path / "suite.png", results).stat().st_size > 1000

    suite = tmp_path / "gpu_suite.json"
    suite.write_text(json.dumps({"command": "cxrfast bench gpu", "machine": "1x NVIDIA H200", "numbers": numbers}))
    md = tmp_path / "RESULTS.md"
    md.write_text("| date | machine | commit | command | numbers |\n|---|---|---|---|---|\n")
    gpu_suite.record(suite, results_md=md)
    row = md.read_text().splitlines()[-1]
    assert "1x NVIDIA H200" in row and "`cxrfast bench gpu`" in row and "mrm_vitb dali b64: 1234 img/s" in row


def test_dali_parity_comparison_runs(mimic_shards: Path, tmp_path: Path):
    res = gpu_suite.dali_parity(mimic_shards, tmp_path, batches=1, batch_size=2, devices=("cpu", "cpu"))
    assert set(res["augmentations"]) == set(gpu_suite.AUGMENTATIONS)
    assert res["ok"] and all(v["mean_abs_diff"] == 0.0 for v in res["augmentations"].values())
    assert json.loads((tmp_path / "dali_parity.json").read_text()) == res


def test_suite_refuses_to_run_without_cuda(tmp_path: Path):
    with pytest.raises(SystemExit, match="needs CUDA"):
        gpu_suite.main(["--out", str(tmp_path)])
