"""`cxrfast/train.py` end to end on the synthetic MIMIC shards, on CPU.

Two ranks through the `deepspeed` launcher (its CPU accelerator, ZeRO-2, bf16): an uninterrupted
run, and the same run stopped after 2 of 3 epochs then resumed, which must log the same losses
and learning rates; the exported encoder loads strictly into timm and gives the features of the
model rebuilt from the DeepSpeed checkpoint. One process (`python cxrfast/train.py`): the loss
on a fixed batch falls (overfit), and the clear errors. Each launch costs tens of seconds on
2 cores, so each run checks several things.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRAIN = ["cxrfast/train.py"]
# tiny MRM, micro-batch 1, 2 accumulated micro-batches per rank per step; 3 epochs; every step logged.
COMMON = ["batch_size=1", "global_batch_size=4", "log_every=1", "epochs=3", "warmup_epochs=1", "num_threads=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], *, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _deepspeed(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), *TRAIN, *args]
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _python(args: list[str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, *TRAIN, *args])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_zero2_export_and_exact_resume(mimic_shards: Path, tmp_path: Path):
    full, part, resumed = tmp_path / "full", tmp_path / "part", tmp_path / "resumed"
    base = ["--recipe", "tiny_mrm", "--shards", str(mimic_shards)]
    _deepspeed([*base, "--out", str(full), *COMMON])
    _deepspeed([*base, "--out", str(part), *COMMON, "stop_after_epochs=2"])
    _deepspeed([*base, "--out", str(resumed), "--resume-from", str(part / "checkpoints"), *COMMON])

    # The resolved config: 2 ranks, ZeRO-2, bf16, gradient accumulation 2.
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 2
    assert cfg["deepspeed"]["gradient_accumulation_steps"] == 2 and cfg["deepspeed"]["train_batch_size"] == 4
    assert cfg["deepspeed"]["bf16"]["enabled"] and cfg["recipe"] == "tiny_mrm"
    steps_per_epoch = cfg["steps_per_epoch"]

    # Metrics: every step, each loss part, lr, throughput, data-wait share; TensorBoard alongside.
    rows = _metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 3 * steps_per_epoch + 1))
    for key in ("loss", "loss_image", "loss_text", "lr", "images_per_s", "data_wait_share", "tflops_per_gpu"):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in rows), key
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in rows)
    assert rows[-1]["lr"] < max(r["lr"] for r in rows)  # warmup then decay
    assert any((full / "tb").iterdir())
    assert (full / "checkpoints" / "latest").read_text().strip() == "epoch_0003"

    # Stop after 2 epochs + resume == uninterrupted: same losses and lr at every step of epoch 3.
    assert (part / "checkpoints" / "latest").read_text().strip() == "epoch_0002"
    assert [r["step"] for r in _metrics(part)][-1] == 2 * steps_per_epoch
    after = _metrics(resumed)
    assert [r["step"] for r in after] == list(range(2 * steps_per_epoch + 1, 3 * steps_per_epoch + 1))
    by_step = {r["step"]: r for r in rows}
    for r in after:
        for key in ("loss", "loss_image", "loss_text", "lr"):
            assert r[key] == pytest.approx(by_step[r["step"]][key], rel=1e-6, abs=1e-9), (r["step"], key)

    # The exported encoder loads strictly into timm and matches the checkpoint's fp32 weights.
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cxrfast.models import build_model, text_kwargs_from_shards
    from cxrfast.models.export import read_metadata

    encoder = full / "encoder.safetensors"
    meta = read_metadata(encoder)
    vit = timm.create_model(
        meta["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(encoder), num_classes=0),
        **meta["timm_kwargs"],
    ).eval()
    trained = build_model("mrm_vit_tiny_test", **text_kwargs_from_shards(mimic_shards))
    missing, unexpected = trained.load_state_dict(
        get_fp32_state_dict_from_zero_checkpoint(str(full / "checkpoints")), strict=False
    )
    assert not unexpected and not set(missing) & {n for n, _ in trained.named_parameters()}
    fresh = build_model("mrm_vit_tiny_test", **text_kwargs_from_shards(mimic_shards))
    assert not torch.equal(trained.patch_embed.proj.weight, fresh.patch_embed.proj.weight)  # it did train
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), trained.eval().forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_single_process_overfits_one_batch(mimic_shards: Path, tmp_path: Path):
    out = tmp_path / "overfit"
    proc = _python([
        "--recipe", "tiny_mae", "--shards", str(mimic_shards), "--out", str(out), "--data", "dali",
        "epochs=60", "warmup_epochs=5", "batch_size=4", "overfit_batches=1", "lr=3e-3", "log_every=1",
        "export=false", "num_threads=1",
    ])
    assert proc.returncode == 0, proc.stderr[-6000:]
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 60
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"loss did not fall clearly on a fixed batch: {first:.3f} -> {last:.3f}"
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_clear_errors(chexpert_shards: Path, mimic_shards: Path, tmp_path: Path):
    proc = _python(["--recipe", "tiny_mae", "--shards", str(mimic_shards), "--out", str(tmp_path / "a"), "epoch=2"])
    assert proc.returncode != 0 and "unknown config key 'epoch'" in proc.stderr

    proc = _python(["--recipe", "tiny_mrm", "--shards", str(chexpert_shards), "--out", str(tmp_path / "b")])
    assert proc.returncode != 0
    assert f"recipe 'tiny_mrm' trains on reports, but the shards in {chexpert_shards} have none" in proc.stderr

    proc = _python(["--recipe", "tiny_mae", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "c")])
    assert proc.returncode != 0 and f"shards folder {tmp_path / 'missing'} does not exist" in proc.stderr

    # A diverging run stops at a log step with the step and the loss parts, and writes no checkpoint.
    out = tmp_path / "nan"
    proc = _python([
        "--recipe", "tiny_mae", "--shards", str(mimic_shards), "--out", str(out), "--data", "synthetic",
        "lr=1e30", "warmup_epochs=0", "epochs=2", "log_every=2", "ckpt_every_epochs=1", "export=false",
    ])
    assert proc.returncode != 0
    assert "NonFiniteLoss: non-finite loss" in proc.stderr and "at optimizer step" in proc.stderr
    assert "loss_image=" in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_bench_train_runs_on_tiny_recipe(mimic_shards: Path, tmp_path: Path):
    proc = _run([
        sys.executable, "-m", "cxrfast.cli", "bench", "train", "--recipes", "tiny_mae", "--shards", str(mimic_shards),
        "--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--repeats", "2", "--backends", "synthetic",
        "--no-unfused", "--no-results-row",
    ])
    assert proc.returncode == 0, proc.stderr[-6000:]
    from cxrfast.models import build_model

    result = json.loads((tmp_path / "train_throughput.json").read_text())
    (run,) = result["runs"]
    assert run["recipe"] == "tiny_mae" and run["backend"] == "synthetic" and len(run["images_per_s_repeats"]) == 2
    assert run["images_per_s"] > 0 and 0 <= run["data_wait_share"] <= 1
    assert run["gflops_per_image"] == pytest.approx(build_model("mae_vit_tiny_test").flops_per_image() / 1e9)
    assert run["tflops"] == pytest.approx(run["images_per_s"] * run["gflops_per_image"] / 1e3)
    assert (tmp_path / "train_throughput.png").is_file()
