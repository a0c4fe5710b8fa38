"""`cxrfast eval finetune` end to end on synthetic CheXpert shards: 2 ranks through the deepspeed
launcher (its CPU accelerator, ZeRO-2, bf16), then the same command again after one draw's results
were removed, which resumes that draw's trainer run from its checkpoint and scores it again.

One launch checks a lot: validation by steps (mid-epoch), selection on the validate mean AUC with the
2 best states kept, test scored once as the mean of those two exported classifiers, every number
with its split / fraction / draw, and the runs' records. Each launch costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SETTINGS = ["finetune.schedule_rule=fixed", "finetune.epochs=2", "finetune.lr=0.01", "finetune.batch_size=16",
            "finetune.eval_every_epochs=0.5", "finetune.ensemble_top_k=2", "run.num_threads=1", "data.boot=200",
            "run.log_every=1"]  # fmt: skip
DRAWS = ("fraction-0.5_draw-0", "fraction-1_draw-0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(shards: Path, encoder: Path, out: Path) -> str:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
           "cxrfast.eval", "finetune", "--shards", str(shards), "--task", "chexpert5", "--out", str(out),
           "--encoder", str(encoder), "--protocol", "mrm", "--fractions", "0.5,1", *SETTINGS]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _scores(out: Path, draw: str) -> pl.DataFrame:
    return pl.read_parquet(out / "predictions" / f"{draw}.parquet").sort("split", "key")


@pytest.mark.slow
def test_two_ranks_fine_tune_select_on_validate_score_test_once_and_resume(eval_shards: Path, tiny_encoder: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    import timm
    from safetensors.torch import load_file

    from cxrfast.eval.finetune import predict
    from cxrfast.eval.linprobe import Inputs
    from cxrfast.eval.protocols import get_protocol
    from cxrfast.eval.samples import labelled_splits
    from cxrfast.eval.tasks import CHEXPERT5
    from cxrfast.models.export import read_metadata
    from cxrfast.shards.folder import open_shards

    out = tmp_path / "ft"
    text = _launch(eval_shards, tiny_encoder, out)
    assert "fine-tuned, test mean AUC by fraction (0.5:" in text

    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (res["mode"], res["protocol"], res["policy"], cfg["ranks"]) == ("finetune", "mrm", "mgca", 2)
    rows = [r for r in res["summary"] if r["label"] == "mean"]
    assert {(r["split"], r["fraction"]) for r in rows} == {(s, f) for s in ("test", "validate") for f in (0.5, 1.0)}
    assert all(r["ci"] is not None for r in rows if r["split"] == "test" and r["mean"] is not None)
    assert {r["draw"] for r in res["records"]} == {0} and res["missing_draws"] == []

    for draw in DRAWS:
        run = out / "train" / draw
        record = json.loads((out / "runs" / f"{draw}.json").read_text())
        tcfg = json.loads((run / "config.json").read_text())
        # the trainer run: 2 ranks, ZeRO-2, bf16, the fine-tune method, selection on validate's mean AUC
        assert (tcfg["world_size"], tcfg["deepspeed"]["zero_optimization"]["stage"]) == (2, 2)
        assert tcfg["deepspeed"]["bf16"]["enabled"] and tcfg["method"]["name"] == "finetune"
        assert (tcfg["train"]["validate_split"], tcfg["train"]["select_metric"]) == ("validate", "val_auc")
        sched = record["schedule"]
        spe, every = sched["steps_per_epoch"], sched["validate_every_steps"]
        assert every == round(0.5 * spe) and record["world_size"] == 2
        # validation every `every` steps, mid-epoch included, and at the last step; nothing else
        steps = [h["step"] for h in record["fit"]["history"]]
        assert steps == sorted(set(list(range(every, 2 * spe + 1, every)) + [2 * spe]))
        assert any(not float(h["epoch"]).is_integer() for h in record["fit"]["history"])
        assert all(0.0 <= h["val_auc"] <= 1.0 and "val_auc/Edema" in h for h in record["fit"]["history"])
        # the 2 best states by validate AUC, best first, each an export that loads strictly into timm
        kept = record["fit"]["selected"]
        best_two = sorted(record["fit"]["history"], key=lambda h: (-h["val_auc"], h["step"]))[:2]
        assert [k["step"] for k in kept] == [h["step"] for h in best_two]
        paths = [run / k["file"] for k in kept]
        assert (run / "encoder.safetensors").read_bytes() == paths[0].read_bytes()
        meta = read_metadata(paths[0])
        model = timm.create_model(meta["arch"], pretrained=False, **meta["timm_kwargs"])
        model.load_state_dict(load_file(str(paths[0])), strict=True)
        assert model.get_classifier().out_features == len(CHEXPERT5)
        # test was scored once, as the mean probability of the kept states
        proto = get_protocol("mrm", SETTINGS)
        sub = open_shards(run / "shards")
        test = labelled_splits(sub, CHEXPERT5, policy="mgca", views="all")["test"]
        inputs = Inputs(**cfg["inputs"])
        want = predict(paths, sub, test, inputs, proto, progress=False)
        got = _scores(out, draw).filter(pl.col("split") == "test")
        order = {k: i for i, k in enumerate(test.keys.tolist())}
        rows_ = [order[k] for k in got["key"].to_list()]
        np.testing.assert_allclose(got.select([f"score::{n}" for n in CHEXPERT5]).to_numpy(), want[rows_], atol=1e-5)

    # An interrupted evaluation: one draw's results gone, its trainer run resumes from its checkpoint.
    before = _scores(out, DRAWS[1])
    (out / "runs" / f"{DRAWS[1]}.json").unlink()
    (out / "predictions" / f"{DRAWS[1]}.parquet").unlink()
    text = _launch(eval_shards, tiny_encoder, out)
    assert "1 of 2 draws already done" in text and f"{DRAWS[1]}: resuming its trainer run" in text
    after = _scores(out, DRAWS[1])
    np.testing.assert_allclose(after.select(pl.selectors.starts_with("score::")).to_numpy(),
                               before.select(pl.selectors.starts_with("score::")).to_numpy(), atol=1e-6)  # fmt: skip
