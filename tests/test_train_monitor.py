"""The in-training monitor: a tiny MAE pre-training with `monitor.every_epochs=1` logs the linear
probe's per-label and mean test AUC with its cost to metrics.jsonl and TensorBoard, and keeps each
probe's evaluation folder; bad monitor settings fail before any process group exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrfast.eval.tasks import CHEXPERT5

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pre_training_logs_probe_aucs_with_their_cost(eval_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "cxrfast/train.py", "--preset", "tiny_mae", "--shards", str(eval_shards), "--out", str(out),
           "epochs=2", "batch_size=8", "num_threads=1", "log_every=5", "monitor.every_epochs=1",
           f"monitor.shards={eval_shards}", "monitor.overrides=probe.epochs=5,data.boot=100"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitor = [r for r in rows if "monitor_auc_mean" in r]
    assert [r["epoch"] for r in monitor] == [1, 2]
    for r in monitor:
        assert 0.0 <= r["monitor_auc_mean"] <= 1.0 and r["monitor_seconds"] > 0
        assert all(0.0 <= r[f"monitor_auc/{name}"] <= 1.0 for name in CHEXPERT5)
        res = json.loads((out / "monitor" / f"epoch-{r['epoch']:04d}" / "results.json").read_text())
        mean = next(s for s in res["summary"] if s["split"] == "test" and s["label"] == "mean")
        assert mean["mean"] == pytest.approx(r["monitor_auc_mean"])
        # the probe saw the encoder with the pre-training's normalisation
        cfg = json.loads((out / "monitor" / f"epoch-{r['epoch']:04d}" / "config.json").read_text())
        assert cfg["inputs"]["norm_source"] == "override" and cfg["protocol"]["name"] == "mgca"
    assert "monitor after epoch 2: chexpert5 test mean AUC" in proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert {"train/monitor_auc_mean", "train/monitor_seconds", "train/monitor_auc/Edema"} <= set(tags)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["monitor.every_epochs=1"], "monitor.every_epochs needs monitor.shards"),
        (["monitor.task=nope"], "unknown task 'nope'"),
        (["monitor.overrides=probe.nope=1"], "unknown config key 'probe.nope'"),
        (["monitor.fraction=0"], "monitor.fraction must be in"),
    ],
)
def test_bad_monitor_settings(overrides: list[str], message: str, tmp_path: Path, caplog) -> None:
    from cxrfast.train import main

    code = main(["--preset", "tiny_mae", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), *overrides])
    assert code == 2 and message in caplog.text
