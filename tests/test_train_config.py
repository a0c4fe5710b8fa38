"""Trainer parts that need no process group: config + overrides, recipes, DeepSpeed settings,
the LR schedule, the non-finite guard, MFU table, shard checks, and fused vs reference training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cxrfast.config import apply_overrides, field_index
from cxrfast.recipes import RECIPES, get_recipe
from cxrfast.trainer import deepspeed_config
from cxrfast.trainer.data import read_shards, text_model_kwargs
from cxrfast.trainer.metrics import NonFiniteLoss, StepMeter, peak_tflops
from cxrfast.trainer.schedule import WarmupCosine, make_scheduler


def test_overrides_bare_and_dotted_keys_with_types():
    cfg = apply_overrides(
        get_recipe("mrm_vitb"),
        ["epochs=3", "warmup_epochs=1", "optim.blr=3e-4", "fused=false", "global_batch_size=none", "mlm_prob=0.3", "data.backend=torch"],
    )
    assert cfg.optim.epochs == 3 and cfg.optim.blr == 3e-4
    assert cfg.model.fused is False and cfg.train.global_batch_size is None
    assert cfg.text is not None and cfg.text.mlm_prob == 0.3 and cfg.data.backend == "torch"
    assert RECIPES["mrm_vitb"].optim.epochs == 200  # the registry entry is untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("epoch=3", "unknown config key 'epoch'"),
        ("epochs", "not of the form key=value"),
        ("epochs=three", "expected a int"),
        ("fused=maybe", "expected a bool"),
        ("mask_ratio=1.0", "mask_ratio must be in"),
        ("zero_stage=3", "zero_stage must be 0, 1 or 2"),
        ("backend=nvme", "data.backend must be one of"),
        ("stop_after_epochs=900", "exceeds optim.epochs"),
        ("warmup_epochs=1000", "warmup_epochs must be in"),
    ],
)
def test_overrides_are_validated(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_recipe("mae_cxr_vitb"), [override])


def test_text_overrides_need_a_text_recipe():
    with pytest.raises(ValueError, match="has no 'text' section"):
        apply_overrides(get_recipe("mae_cxr_vits"), ["mlm_prob=0.4"])


def test_bare_keys_are_unique_across_sections():
    index = field_index()
    assert index["epochs"] == ("optim", "epochs") and index["train.batch_size"] == ("train", "batch_size")
    assert all(("." in k) or index[k][1] == k for k in index)


def test_published_hyperparameters():
    mrm, vitb, vits = RECIPES["mrm_vitb"], RECIPES["mae_cxr_vitb"], RECIPES["mae_cxr_vits"]
    assert (mrm.model.mask_ratio, mrm.model.norm_pix_loss, mrm.optim.epochs, mrm.optim.warmup_epochs) == (0.75, True, 200, 40)
    assert mrm.train.global_batch_size == 256 and mrm.text is not None and mrm.text.mlm_prob == 0.5
    assert mrm.optim.peak_lr(256) == pytest.approx(1.5e-4)
    for r in (vitb, vits):
        assert (r.model.mask_ratio, r.model.norm_pix_loss, r.optim.epochs, r.train.global_batch_size) == (0.9, False, 800, 2048)
        assert r.optim.peak_lr(2048) == pytest.approx(1.5e-4 * 8)
    for r in (mrm, vitb, vits):
        assert (r.optim.beta1, r.optim.beta2, r.optim.weight_decay, r.train.zero_stage) == (0.9, 0.95, 0.05, 2)
    assert {"tiny_mae", "tiny_mrm"} <= set(RECIPES)


def test_deepspeed_settings_from_recipe_and_user_file(tmp_path: Path):
    cfg = get_recipe("mrm_vitb")
    ds = deepspeed_config.generate(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 256 and ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config.generate(cfg, world_size=3)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1}}))
    merged = deepspeed_config.build(cfg, 2, user)
    assert merged["train_batch_size"] == 32 * 2 * 2 and merged["zero_optimization"]["stage"] == 1
    assert merged["zero_optimization"]["overlap_comm"] is True  # generated keys kept under the user's
    user.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json: not valid JSON"):
        deepspeed_config.build(cfg, 2, user)


def test_warmup_cosine_per_iteration():
    f = WarmupCosine(steps_per_epoch=10, epochs=10, warmup_epochs=2, min_lr_ratio=0.1)
    assert f(0) == 0.0 and f(10) == pytest.approx(0.5) and f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5) and f(100) == pytest.approx(0.1)
    after = [f(s) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = make_scheduler(opt, f)
    lrs = []
    for _ in range(15):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[9] == pytest.approx(2.0 * 0.5) and lrs[14] == pytest.approx(2.0 * 0.75)
    state = sched.state_dict()  # the factor is saved with DeepSpeed checkpoints
    assert state["last_epoch"] == 15


def test_step_meter_means_and_non_finite_guard():
    meter = StepMeter(torch.device("cpu"))
    meter.add({"loss": torch.tensor(3.0), "loss_image": torch.tensor(1.0), "loss_text": torch.tensor(2.0)}, step=0)
    meter.add({"loss": torch.tensor(5.0), "loss_image": torch.tensor(2.0), "loss_text": torch.tensor(3.0)}, step=1)
    assert meter.collect() == {"loss": 4.0, "loss_image": 1.5, "loss_text": 2.5}
    meter.add({"loss": torch.tensor(1.0), "loss_image": torch.tensor(0.5), "loss_text": torch.tensor(0.5)}, step=6)
    meter.add({"loss": torch.tensor(math.nan), "loss_image": torch.tensor(0.5), "loss_text": torch.tensor(math.nan)}, step=7)
    meter.add({"loss": torch.tensor(math.inf), "loss_image": torch.tensor(math.inf), "loss_text": torch.tensor(1.0)}, step=8)
    with pytest.raises(NonFiniteLoss, match=r"2 micro-step\(s\) at optimizer step 7 .*loss=nan, loss_image=0\.5, loss_text=nan"):
        meter.collect()


def test_peak_flops_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.1
    assert peak_tflops("Some New GPU") is None and peak_tflops(None) is None


def test_shard_errors(tmp_path: Path, chexpert_shards: Path):
    with pytest.raises(FileNotFoundError, match=f"shards folder {tmp_path / 'nope'} does not exist"):
        read_shards(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        read_shards(tmp_path, "train")
    info = read_shards(chexpert_shards, "train")
    assert info.tokenizer is None and info.split_samples["train"] > 0
    with pytest.raises(ValueError, match=f"recipe 'tiny_mrm' trains on reports, but the shards in {chexpert_shards}"):
        text_model_kwargs(info, "tiny_mrm")


def test_fused_and_reference_kernels_train_alike(mimic_shards: Path):
    """Three AdamW steps of tiny MRM with the Triton kernels (interpreter on CPU) and with the
    references: same losses within tolerance. (`fused=true` means impl "auto", which is the
    reference on CPU, so the model's `impl` is set to "triton" directly here.)"""
    from cxrfast.models import build_model
    from cxrfast.trainer.build import build_optimizer
    from cxrfast.trainer.data import read_shards, text_model_kwargs

    cfg = apply_overrides(get_recipe("tiny_mrm"), ["lr=1e-3"])
    text = text_model_kwargs(read_shards(mimic_shards, "train"), "tiny_mrm")
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(2, 1, 64, 64, generator=g),
        "target": torch.randn(2, 1, 128, 128, generator=g),
        "ids": torch.randint(5, text["vocab_size"], (2, 100), generator=g),
        "attention_mask": torch.ones(2, 100, dtype=torch.int64),
    }
    losses = {}
    for impl in ("triton", "reference"):
        torch.manual_seed(0)
        model = build_model("mrm_vit_tiny_test", mask_ratio=0.75, **text)
        model.impl = impl
        opt = build_optimizer(model, cfg, 1e-3, cuda=False)
        torch.manual_seed(1)
        run = []
        for _ in range(3):
            out = model(batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            run.append([out[k].item() for k in ("loss", "loss_image", "loss_text")])
        losses[impl] = torch.tensor(run)
    assert torch.isfinite(losses["reference"]).all()
    torch.testing.assert_close(losses["triton"], losses["reference"], rtol=1e-4, atol=1e-5)
