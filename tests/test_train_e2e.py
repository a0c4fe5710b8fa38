"""The trainer end to end on the synthetic MIMIC shards, on CPU.

Two ranks through the `deepspeed` launcher (its CPU accelerator, ZeRO-2, bf16): an uninterrupted
run, and the same run stopped in the middle of epoch 2 then resumed (`--module cxrfast.train`,
DALI's loader checkpoint), which must log the same losses and learning rates; the exported encoder
loads strictly into timm and gives the features of the method rebuilt from the DeepSpeed
checkpoint. One process (`cxrfast train`, `python cxrfast/train.py`): the loss on a fixed batch
falls (overfit), resume safety, and the clear errors. Each launch costs tens of seconds on 2
cores, so each run checks several things.
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


def _deepspeed(args: list[str], *, module: bool = False) -> subprocess.CompletedProcess:
    entry = ["--module", "cxrfast.train"] if module else TRAIN
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), *entry, *args]
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _python(args: list[str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, *TRAIN, *args])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps_per_epoch(shards: Path, world: int, micro: int, accum: int) -> int:
    n = sum(e["samples"] for e in json.loads((shards / "manifest.json").read_text())["splits"]["train"])
    return min((r + 1) * n // world - r * n // world for r in range(world)) // micro // accum


@pytest.mark.slow
def test_two_ranks_zero2_export_and_exact_mid_epoch_resume(mimic_shards: Path, tmp_path: Path):
    full, part, resumed = tmp_path / "full", tmp_path / "part", tmp_path / "resumed"
    base = ["--preset", "tiny_mrm", "--shards", str(mimic_shards)]
    spe = _steps_per_epoch(mimic_shards, world=2, micro=1, accum=2)
    stop = spe + max(1, spe // 2)  # in the middle of epoch 2
    assert stop % spe, "the stop must fall inside an epoch"
    _deepspeed([*base, "--out", str(full), *COMMON])
    _deepspeed([*base, "--out", str(part), *COMMON, f"stop_after_steps={stop}"])
    # The installed module entry point, resuming from the mid-epoch checkpoint (DALI's loader state).
    _deepspeed([*base, "--out", str(resumed), "--resume-from", str(part / "checkpoints"), *COMMON], module=True)

    # The resolved config: 2 ranks, ZeRO-2, bf16, gradient accumulation 2.
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 2
    assert cfg["deepspeed"]["gradient_accumulation_steps"] == 2 and cfg["deepspeed"]["train_batch_size"] == 4
    assert cfg["deepspeed"]["bf16"]["enabled"] and cfg["preset"] == "tiny_mrm" and cfg["method"]["name"] == "mrm"
    m = cfg["method"]  # MRM's published settings, the preset's defaults
    assert (m["text"], m["mlm_replace_mask"], m["mlm_replace_random"], m["mlm_all_positions"], m["text_init"],
            m["text_tie_decoder"], m["pos_embed"], m["decay_tokens"]) == ("report", 1.0, 0.0, True, "mrm", False, "mrm", True)
    assert cfg["steps_per_epoch"] == spe

    # Metrics: every step, each loss part, lr, throughput, data-wait share; TensorBoard alongside.
    rows = _metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 3 * spe + 1))
    for key in ("loss", "loss_image", "loss_text", "lr", "images_per_s", "data_wait_share", "tflops_per_gpu"):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in rows), key
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in rows)
    assert rows[-1]["lr"] < max(r["lr"] for r in rows)  # warmup then decay
    assert any((full / "tb").iterdir())
    assert (full / "checkpoints" / "latest").read_text().strip() == f"step_{3 * spe:08d}"

    # Stopped mid-epoch 2, resumed == uninterrupted: same losses and lr at every later step.
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step_{stop:08d}"
    assert sorted(p.name for p in (part / "checkpoints" / f"step_{stop:08d}").glob("data_rank*")) == [
        "data_rank0.bin", "data_rank1.bin"]
    assert [r["step"] for r in _metrics(part)][-1] == stop
    after = _metrics(resumed)
    assert [r["step"] for r in after] == list(range(stop + 1, 3 * spe + 1))
    by_step = {r["step"]: r for r in rows}
    for r in after:
        for key in ("loss", "loss_image", "loss_text", "lr"):
            assert r[key] == pytest.approx(by_step[r["step"]][key], rel=1e-6, abs=1e-9), (r["step"], key)

    # The exported encoder loads strictly into timm and matches the checkpoint's fp32 weights.
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cxrfast.methods import build_method
    from cxrfast.models.export import read_metadata
    from cxrfast.presets import get_preset
    from cxrfast.shards.folder import open_shards

    encoder = full / "encoder.safetensors"
    meta = read_metadata(encoder)
    assert (meta["method"], meta["preset"]) == ("mrm", "tiny_mrm") and float(meta["std"]) > 0
    vit = timm.create_model(
        meta["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(encoder), num_classes=0),
        **meta["timm_kwargs"],
    ).eval()
    folder = open_shards(mimic_shards)
    trained = build_method(get_preset("tiny_mrm").method, folder)
    missing, unexpected = trained.load_state_dict(
        get_fp32_state_dict_from_zero_checkpoint(str(full / "checkpoints")), strict=False
    )
    assert not unexpected and not set(missing) & {n for n, _ in trained.named_parameters()}
    fresh = build_method(get_preset("tiny_mrm").method, folder)
    assert not torch.equal(trained.net.patch_embed.proj.weight, fresh.net.patch_embed.proj.weight)  # it did train
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), trained.eval().net.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_single_process_overfits_one_batch(mimic_shards: Path, tmp_path: Path):
    out = tmp_path / "overfit"
    proc = _cxrfast_train([
        "--preset", "tiny_mae", "--shards", str(mimic_shards), "--out", str(out), "--data", "dali",
        "epochs=60", "warmup_epochs=5", "batch_size=4", "overfit_batches=1", "lr=3e-3", "log_every=1",
        "export=false", "num_threads=1",
    ])
    assert proc.returncode == 0, proc.stderr[-6000:]
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 60
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.75 * first, f"loss did not fall clearly on a fixed batch: {first:.3f} -> {last:.3f}"
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


def _cxrfast_train(args: list[str]) -> subprocess.CompletedProcess:
    return _run([str(VENV_BIN / "cxrfast"), "train", *args])


@pytest.mark.slow
def test_mrm_from_an_official_mae_checkpoint_through_cxrfast_train(mimic_shards: Path, tmp_path: Path):
    """`cxrfast train --preset tiny_mrm method.init=FILE` (MRM's published settings) starts from a checkpoint
    in MAE's official format: every encoder tensor is loaded, the RGB filters summed, and the file's position
    table is the one the exported encoder carries."""
    from safetensors.torch import load_file
    from test_init_weights import rgb_vit

    sd = dict(rgb_vit(num_classes=0).state_dict())
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    ckpt = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "run"
    proc = _cxrfast_train(["--preset", "tiny_mrm", "--shards", str(mimic_shards), "--out", str(out),
                           f"method.init={ckpt}", "epochs=1", "warmup_epochs=0", "log_every=1", "num_threads=1"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"init from {ckpt}: {len(sd)} encoder tensors loaded, 0 missing, 0 unexpected" in proc.stderr
    assert "adapted patch_embed.proj.weight: 3 input channels summed to 1" in proc.stderr
    assert json.loads((out / "config.json").read_text())["method"]["init"] == str(ckpt)
    assert all(r["loss_text"] == r["loss_text"] for r in _metrics(out))
    assert torch.equal(load_file(out / "encoder.safetensors")["pos_embed"], sd["pos_embed"])


@pytest.mark.slow
def test_clear_errors(chexpert_shards: Path, mimic_shards: Path, tmp_path: Path):
    proc = _python(["--preset", "tiny_mae", "--shards", str(mimic_shards), "--out", str(tmp_path / "a"), "epoch=2"])
    assert proc.returncode != 0 and "unknown config key 'epoch'" in proc.stderr

    proc = _python(["--preset", "tiny_mrm", "--shards", str(chexpert_shards), "--out", str(tmp_path / "b")])
    assert proc.returncode != 0
    assert f"{chexpert_shards / 'manifest.json'}: method 'mrm' needs report token ids" in proc.stderr

    proc = _python(["--preset", "tiny_mae", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "c")])
    assert proc.returncode != 0 and f"shards folder {tmp_path / 'missing'} does not exist" in proc.stderr

    # A batch larger than a rank's share of the data: DALI's own message would be cryptic.
    proc = _python(["--preset", "tiny_mae", "--shards", str(mimic_shards), "--out", str(tmp_path / "d"),
                    "batch_size=1000", "num_threads=1"])
    assert proc.returncode != 0 and "fewer than one batch of 1000" in proc.stderr, proc.stderr[-3000:]

    # A diverging run stops at a log step with the step and the loss parts, and writes no checkpoint.
    out = tmp_path / "nan"
    proc = _python([
        "--preset", "tiny_mae", "--shards", str(mimic_shards), "--out", str(out), "--data", "synthetic",
        "lr=1e30", "warmup_epochs=0", "epochs=2", "log_every=2", "ckpt_every_epochs=1", "export=false",
    ])
    assert proc.returncode != 0
    assert "NonFiniteLoss: non-finite loss" in proc.stderr and "at optimizer step" in proc.stderr
    assert "loss_image=" in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_resume_safety_changed_schedule_other_preset_and_damaged_checkpoint(mimic_shards: Path, tmp_path: Path):
    """One process, synthetic data: a checkpoint every epoch; resuming with more epochs follows the
    new schedule; another preset is refused naming both; a damaged latest checkpoint names the file
    and the previous intact checkpoint, which then resumes."""
    out = tmp_path / "run"
    base = ["--shards", str(mimic_shards), "--out", str(out), "--data", "synthetic", "log_every=1",
            "ckpt_every_epochs=1", "ckpt_keep=0", "export=false", "warmup_epochs=1"]
    first = _python(["--preset", "tiny_mae", *base, "epochs=2"])
    assert first.returncode == 0, first.stderr[-4000:]
    # stderr is a pipe here, as in a batch job's log: plain progress lines, not a redrawn bar
    assert "epoch 1/2: started" in first.stderr and "epoch 2/2: done" in first.stderr and "\r" not in first.stderr
    spe = json.loads((out / "config.json").read_text())["steps_per_epoch"]
    longer = _python(["--preset", "tiny_mae", *base, "epochs=4", "--resume"])
    assert longer.returncode == 0, longer.stderr[-4000:]
    assert "schedule changed since the checkpoint (epochs 2 -> 4)" in longer.stderr
    from cxrfast.trainer.schedule import LRSchedule

    new = LRSchedule(steps_per_epoch=spe, epochs=4, warmup_epochs=1)
    resumed_rows = [r for r in _metrics(out) if r["step"] > 2 * spe]
    assert [r["step"] for r in resumed_rows] == list(range(2 * spe + 1, 4 * spe + 1))
    for r in resumed_rows:  # the lr of step s is the new schedule's factor at s - 1, times the peak 1e-3
        assert r["lr"] == pytest.approx(1e-3 * new(r["step"] - 1), rel=1e-6)

    other = _python(["--preset", "tiny_mrm", *base, "epochs=4", "--resume"])
    assert other.returncode != 0
    assert "checkpoint is of preset 'tiny_mae', this run is preset 'tiny_mrm'" in other.stderr

    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    states = latest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated, as by a full disk
    damaged = _python(["--preset", "tiny_mae", *base, "epochs=4", "--resume"])
    assert damaged.returncode != 0
    previous = out / "checkpoints" / f"step_{3 * spe:08d}"
    assert f"checkpoint {latest} is damaged" in damaged.stderr and f"--resume-from {previous}" in damaged.stderr
    again = _python(["--preset", "tiny_mae", *base, "epochs=4", "--resume-from", str(previous)])
    assert again.returncode == 0, again.stderr[-4000:]


@pytest.mark.slow
def test_bench_train_runs_on_tiny_preset(mimic_shards: Path, tmp_path: Path):
    proc = _run([
        sys.executable, "-m", "cxrfast.cli", "bench", "train", "--presets", "tiny_mae", "--shards", str(mimic_shards),
        "--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--repeats", "2", "--backends", "synthetic",
        "--no-unfused", "--no-results-row",
    ])
    assert proc.returncode == 0, proc.stderr[-6000:]
    from cxrfast.models import build_model

    result = json.loads((tmp_path / "train_throughput.json").read_text())
    (run,) = result["runs"]
    assert run["preset"] == "tiny_mae" and run["backend"] == "synthetic" and len(run["images_per_s_repeats"]) == 2
    assert run["images_per_s"] > 0 and 0 <= run["data_wait_share"] <= 1
    assert run["gflops_per_image"] == pytest.approx(build_model("mae_vit_tiny_test").flops_per_image() / 1e9)
    assert run["tflops"] == pytest.approx(run["images_per_s"] * run["gflops_per_image"] / 1e3)
    assert (tmp_path / "train_throughput.png").is_file()


@pytest.mark.slow
def test_mae_on_a_chexpert_nih_mix_resumes_mid_epoch(chexpert_shards: Path, nih_shards: Path, tmp_path: Path):
    """tiny MAE through `cxrfast train` on two shard folders (CheXpert + NIH: other label orders, no
    labels read): a checkpoint in the middle of epoch 2, from which a resumed run (DALI's loader
    checkpoint over the union of the folders) logs the uninterrupted run's losses; config.json
    records each folder's path, dataset, sample count and share."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    n = {d: sum(e["samples"] for e in json.loads((s / "manifest.json").read_text())["splits"]["train"])
         for d, s in (("chexpert", chexpert_shards), ("nih", nih_shards))}
    spe = (n["chexpert"] + n["nih"]) // 4  # tiny_mae: micro-batch 4, one rank
    mid = spe + spe // 2
    assert mid % spe
    # overrides right after the folder list: they are not taken for folders
    common = ["log_every=1", "epochs=2", "warmup_epochs=1", "num_threads=1", "export=false"]
    base = ["--preset", "tiny_mae", "--shards", str(chexpert_shards), str(nih_shards), *common]
    first = _cxrfast_train([*base, "--out", str(full), f"ckpt_every_steps={mid}", "ckpt_keep=0"])
    assert first.returncode == 0, first.stderr[-6000:]
    again = _cxrfast_train([*base, "--out", str(resumed), "--resume-from", str(full / "checkpoints" / f"step_{mid:08d}")])
    assert again.returncode == 0, again.stderr[-6000:]

    cfg = json.loads((full / "config.json").read_text())
    assert cfg["steps_per_epoch"] == spe and cfg["data"]["datasets"] == []
    assert [(e["path"], e["dataset"], e["samples"]) for e in cfg["shards"]] == [
        (str(chexpert_shards), "chexpert", n["chexpert"]), (str(nih_shards), "nih", n["nih"])]
    assert [e["share"] for e in cfg["shards"]] == pytest.approx([n["chexpert"] / sum(n.values()), n["nih"] / sum(n.values())])
    rows = {r["step"]: r for r in _metrics(full)}
    after = _metrics(resumed)
    assert sorted(rows) == list(range(1, 2 * spe + 1))
    assert [r["step"] for r in after] == list(range(mid + 1, 2 * spe + 1))
    for r in after:
        for key in ("loss", "lr"):
            assert r[key] == pytest.approx(rows[r["step"]][key], rel=1e-6, abs=1e-9), (r["step"], key)

    # A mid-epoch position over other folders cannot carry over: refused, naming both mixes.
    other = _cxrfast_train(["--preset", "tiny_mae", "--shards", str(chexpert_shards), "--out", str(tmp_path / "x"),
                            *common, "--resume-from", str(full / "checkpoints" / f"step_{mid:08d}")])
    assert other.returncode != 0 and "a mid-epoch position cannot carry over" in other.stderr, other.stderr[-3000:]
    assert f"{nih_shards} (nih, {n['nih']})" in other.stderr
