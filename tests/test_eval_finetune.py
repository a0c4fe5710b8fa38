"""The fine-tune method and runner without a trainer launch: targets under each uncertain-label
policy, layer-wise lr decay groups against MAE's plain rule, the per-draw schedules, encoder exports
loading with a new head (ViT, ResNet, DenseNet), the trainer's selection and step-quoted schedule,
and the errors a fine-tune gives before any training (selection on test, a protocol without one)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrfast.cli import app
from cxrfast.config import OptimConfig, TrainConfig
from cxrfast.eval.finetune import resolve_schedule
from cxrfast.eval.policies import POLICIES, apply_policy, get_policy
from cxrfast.eval.protocols import get_protocol, moco_cxr_epochs
from cxrfast.eval.tasks import CHEXPERT5
from cxrfast.methods import build_method
from cxrfast.methods.base import EncoderExport
from cxrfast.methods.finetune import FinetuneMethodConfig
from cxrfast.models.export import load_encoder, write_encoder
from cxrfast.shards.folder import open_shards
from cxrfast.trainer.build import lr_schedule
from cxrfast.trainer.validate import Selection

CODES = (1, 0, -1, -2)  # positive, negative, uncertain, not mentioned


def _method(shards: Path, encoder: Path, **kw):
    cfg = FinetuneMethodConfig(encoder=str(encoder), labels=CHEXPERT5, image_size=64, **kw)
    return build_method(cfg, open_shards(shards))


@pytest.mark.parametrize("not_mentioned", ["negative", "ignore"])
def test_targets_on_the_device_equal_apply_policy(eval_shards: Path, tiny_encoder: Path, not_mentioned: str) -> None:
    folder = open_shards(eval_shards)
    # every combination of codes over the five labels, spread over the shards' 14 label columns
    combos = np.array(list(itertools.product(CODES, repeat=len(CHEXPERT5))), dtype=np.int8)
    raw = np.full((len(combos), len(folder.label_names)), -2, dtype=np.int8)
    cols = [folder.label_names.index(n) for n in CHEXPERT5]
    raw[:, cols] = combos
    for policy in sorted(POLICIES):
        m = _method(eval_shards, tiny_encoder, policy=policy, not_mentioned=not_mentioned)
        got = m.targets(torch.from_numpy(raw)).numpy()
        want = apply_policy(combos, CHEXPERT5, get_policy(policy), not_mentioned=not_mentioned)
        np.testing.assert_array_equal(got, want, err_msg=policy)


def _mae_layer_decay(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> dict[str, tuple[float, float]]:
    """MAE's util/lr_decay.py param_groups_lrd, written out: {name: (lr_scale, weight_decay)}."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    skip = model.no_weight_decay()
    out = {}
    for name, p in model.named_parameters():
        wd = 0.0 if p.ndim == 1 or name in skip else weight_decay
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = num_layers
        out[name] = (scales[layer], wd)
    return out


@pytest.mark.parametrize("pooling", ["gap", "cls"])
def test_layer_wise_decay_groups_match_maes_rule(eval_shards: Path, tiny_encoder: Path, pooling: str) -> None:
    m = _method(eval_shards, tiny_encoder, layer_decay=0.55, pooling=pooling)
    groups = m.param_groups(0.05)
    names = {id(p): n.removeprefix("model.") for n, p in m.named_parameters()}
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    want = _mae_layer_decay(m.model, 0.05, 0.55)
    assert got.keys() == want.keys()
    for name, (scale, wd) in want.items():
        assert got[name][0] == pytest.approx(scale), name
        assert got[name][1] == wd, name
    assert {round(s, 6) for s, _ in got.values()} == {round(0.55**k, 6) for k in range(len(m.model.blocks) + 2)}
    # without layer decay: one scale, decay on the matrices only
    plain = _method(eval_shards, tiny_encoder, pooling=pooling).param_groups(0.05)
    assert all("lr_scale" not in g for g in plain) and sorted(g["weight_decay"] for g in plain) == [0.0, 0.05]


def test_gap_pooling_drops_the_final_norm_for_a_fresh_fc_norm(eval_shards: Path, tiny_encoder: Path) -> None:
    gap, cls = _method(eval_shards, tiny_encoder, pooling="gap"), _method(eval_shards, tiny_encoder, pooling="cls")
    assert isinstance(gap.model.norm, torch.nn.Identity) and isinstance(gap.model.fc_norm, torch.nn.LayerNorm)
    assert torch.equal(gap.model.fc_norm.weight, torch.ones_like(gap.model.fc_norm.weight))  # MAE: a new fc_norm
    assert isinstance(cls.model.norm, torch.nn.LayerNorm) and gap.model.get_classifier().out_features == 5
    # the encoder's weights are the export's
    enc = load_encoder(tiny_encoder)
    assert torch.equal(gap.model.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert torch.equal(cls.model.norm.weight, enc.norm.weight)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "vit_tiny_patch16_224"])
def test_exports_load_with_a_new_head(arch: str, tmp_path: Path) -> None:
    import timm

    kw = {"img_size": 32} if arch.startswith("vit") else {}
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=0, **kw)
    path = write_encoder(EncoderExport(arch=arch, kwargs={"in_chans": 1, "num_classes": 0, **kw},
                                       state_dict=model.state_dict()), tmp_path / "e.safetensors")  # fmt: skip
    loaded = load_encoder(path, num_classes=3)  # ResNet's head is fc.*, DenseNet's classifier.*
    assert loaded.get_classifier().out_features == 3
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded.forward_head(loaded.forward_features(x), pre_logits=True), model.eval()(x), atol=1e-5)
    if arch.startswith("vit"):
        assert isinstance(load_encoder(path, num_classes=3, global_pool="avg").norm, torch.nn.Identity)
    other = write_encoder(EncoderExport(arch=arch, kwargs={"in_chans": 1, "num_classes": 0, **kw},
                                        state_dict={k: v for k, v in model.state_dict().items() if "bias" not in k}),
                          tmp_path / "o.safetensors")  # fmt: skip
    with pytest.raises(RuntimeError, match="missing"):  # a key outside the head is still an error
        load_encoder(other, num_classes=3)


def test_schedules_per_protocol_rule() -> None:
    mrm = get_protocol("mrm").finetune
    s = resolve_schedule(mrm, n_train=960, fraction=0.01, task="chexpert5", world=4, micro=24, accum=1)
    assert (s.steps, s.warmup_steps, s.lr, s.validate_every_epochs, s.steps_per_epoch) == (2000, 150, 3e-3, 1, 10)
    moco = get_protocol("moco-cxr").finetune
    s = resolve_schedule(moco, n_train=1600, fraction=0.01, task="pleural_effusion", world=1, micro=16, accum=1)
    assert (s.epochs, s.steps, s.validate_every_steps, s.validate_every_epochs) == (moco_cxr_epochs(0.01), None, 82, 0)
    mae = get_protocol("mae-cxr", ["finetune.eval_every_epochs=0.5"]).finetune
    s = resolve_schedule(mae, n_train=4096, fraction=1.0, task="chexpert5", world=8, micro=128, accum=1)
    assert (s.epochs, s.warmup_epochs, s.blr, s.validate_every_steps, s.steps_per_epoch) == (75, 5, 2.5e-4, 2, 4)
    with pytest.raises(ValueError, match="publishes step counts"):
        resolve_schedule(mrm, n_train=960, fraction=0.5, task="chexpert5", world=1, micro=96, accum=1)


def test_selection_min_max_top_k_and_nan() -> None:
    s = Selection(mode="max", keep=2)
    assert s.best == -math.inf
    updates = [s.update(v, epoch=1, step=i) for i, v in enumerate([0.6, float("nan"), 0.7, 0.65, 0.8], start=1)]
    assert [u.improved for u in updates] == [True, False, True, False, True]
    assert [u.kept for u in updates] == [True, False, True, True, True]
    assert updates[3].dropped == [1] and updates[4].dropped == [4]
    assert [k[1] for k in s.kept] == [5, 3] and (s.best, s.best_step, s.bad) == (0.8, 5, 0)
    restored = Selection(mode="max", keep=2)
    restored.restore(s.state())
    assert restored.state() == s.state()
    old = Selection()
    old.restore({"best": 0.5, "best_epoch": 3, "bad": 1})  # a checkpoint written before best_step and kept
    assert (old.best, old.best_epoch, old.bad, old.kept) == (0.5, 3, 1, [])


def test_step_quoted_schedule_and_trainer_settings() -> None:
    o = OptimConfig(epochs=1, steps=100, warmup_steps=10, lr=1.0, min_lr=0.0)
    sched = lr_schedule(o, steps_per_epoch=30, peak_lr=1.0)
    assert o.run_epochs(30) == 4 and o.total_steps(30) == 100
    assert sched(0) == 0.0 and sched(5) == pytest.approx(0.5) and sched(10) == pytest.approx(1.0)
    assert sched(55) == pytest.approx(0.5) and sched(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps or optim.warmup_epochs"):
        OptimConfig(epochs=2, steps=100, warmup_steps=10, warmup_epochs=1, lr=1.0)
    with pytest.raises(ValueError, match="validate_split=test"):
        TrainConfig(batch_size=1, validate_every_steps=5, validate_split="test")
    with pytest.raises(ValueError, match="need train.validate_every_epochs"):
        TrainConfig(batch_size=1, select="best", select_metric="val_auc", select_mode="max")
    t = TrainConfig(batch_size=1, validate_every_steps=5, select="best", select_metric="val_auc", select_mode="max",
                    keep_best=3)  # fmt: skip
    assert t.validates
    with pytest.raises(ValueError, match="select_metric names a validation value"):
        TrainConfig(batch_size=1, validate_every_steps=5, select_metric="test_auc")


def _finetune(shards: Path, encoder: Path, out: Path, *args: str) -> tuple[int, str]:
    cmd = ["eval", "finetune", "--shards", str(shards), "--task", "chexpert5", "--out", str(out), "--encoder",
           str(encoder), *args]  # fmt: skip
    r = CliRunner().invoke(app, cmd)
    return r.exit_code, r.output


def test_selecting_on_test_and_protocols_without_fine_tuning_are_refused(eval_shards: Path, tiny_encoder: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    code, text = _finetune(eval_shards, tiny_encoder, tmp_path / "a", "--protocol", "mae-cxr",
                           "finetune.select_split=test")  # fmt: skip
    assert code == 2 and "finetune.select_split=test is refused" in text and "selects on `validate`" in text
    code, text = _finetune(eval_shards, tiny_encoder, tmp_path / "b", "--protocol", "mgca")
    assert code == 2 and "publishes no fine-tuning" in text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_method_config_errors(eval_shards: Path, tiny_encoder: Path) -> None:
    with pytest.raises(ValueError, match="name the encoder one way"):
        FinetuneMethodConfig(labels=CHEXPERT5)
    with pytest.raises(ValueError, match="pooling=cls needs a ViT class token"):
        build_method(FinetuneMethodConfig(arch="resnet18", labels=CHEXPERT5, pooling="cls"), open_shards(eval_shards))
    with pytest.raises(ValueError, match="method.mean and method.std go together"):
        FinetuneMethodConfig(arch="resnet18", labels=CHEXPERT5, mean=0.5)  # not silently dropped
    with pytest.raises(ValueError, match=r"labels \['Nodule'\] are not among"):
        _method(eval_shards, tiny_encoder).build(FinetuneMethodConfig(encoder=str(tiny_encoder), labels=("Nodule",)),
                                                 open_shards(eval_shards))  # fmt: skip
