"""MGCA through the trainer: two ranks under the `deepspeed` launcher (CPU, ZeRO-2, bf16), validation
every epoch, early stopping, the exports taken from the best epoch, and the prototypes in the
optimizer's fp32 master weights (unit rows after every step, frozen in the first epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_e2e import _deepspeed, _metrics

EPOCHS, PATIENCE = 12, 1
# One fixed batch per epoch at a high lr: the validation loss soon turns up and early stopping ends the run.
ARGS = ["batch_size=3", "log_every=1", f"epochs={EPOCHS}", "warmup_epochs=0", "num_threads=1", "overfit_batches=1",
        "lr=3e-2", f"early_stop_patience={PATIENCE}", "ckpt_every_epochs=1", "ckpt_keep=0"]


@pytest.mark.slow
def test_two_ranks_early_stopping_exports_the_best_epoch(mimic_shards: Path, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModel

    from cxrfast.models.export import load_encoder

    out = tmp_path / "run"
    proc = _deepspeed(["--preset", "tiny_mgca", "--shards", str(mimic_shards), "--out", str(out), *ARGS])
    val = {r["epoch"]: r["val_loss"] for r in _metrics(out) if "val_loss" in r}
    last = max(val)
    best = min(val, key=val.get)
    assert sorted(val) == list(range(1, last + 1))  # validated after every epoch
    assert last < EPOCHS and last == best + PATIENCE, val  # stopped early, PATIENCE validations after the best
    assert "early stopping" in proc.stdout + proc.stderr
    train = [r for r in _metrics(out) if "loss_proto" in r]
    assert all(k in r for r in train for k in ("loss_instance", "loss_local", "loss_proto"))

    encoder = out / "encoder.safetensors"
    with safe_open(str(encoder), framework="pt") as f:
        assert f.metadata()["selected"] == f"best validation loss {val[best]:.6g} after epoch {best}"
    load_encoder(encoder)  # strict
    text, info = AutoModel.from_pretrained(out / "text_encoder", add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    # Both exports are the best epoch's fp32 master weights: rounded to bf16 they are the module's
    # weights in that epoch's checkpoint (one optimizer step per epoch), and not the last epoch's.
    image, words = load_file(str(encoder)), text.state_dict()

    def same_as_checkpoint(step: int) -> tuple[bool, bool]:
        ckpt = out / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        module = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
        return (all(torch.equal(module[f"image.vit.{k}"], v.to(torch.bfloat16)) for k, v in image.items()),
                all(torch.equal(module[f"text.bert.{k}"], v.to(torch.bfloat16)) for k, v in words.items()
                    if f"text.bert.{k}" in module))

    assert same_as_checkpoint(best) == (True, True)
    assert same_as_checkpoint(last) == (False, False)

    # The optimizer's fp32 prototypes (one step per epoch): unit rows at every checkpoint; the
    # first epoch's step leaves them as initialised (frozen), the second moves them.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cxrfast.methods import build_method
    from cxrfast.presets import get_preset
    from cxrfast.shards.folder import open_shards

    torch.manual_seed(0)  # train.seed: the trainer builds the method under it
    init = build_method(get_preset("tiny_mgca").method, open_shards(mimic_shards)).prototypes.weight.detach()
    protos = [get_fp32_state_dict_from_zero_checkpoint(out / "checkpoints", tag=f"step_{s:08d}")["prototypes.weight"]
              for s in range(1, last + 1)]
    for p in protos:
        torch.testing.assert_close(p.norm(dim=1), torch.ones(p.shape[0]), rtol=0, atol=1e-5)
    # (the trainer starts the fp32 masters from the fp32 init, not from DeepSpeed's bf16-cast module)
    torch.testing.assert_close(protos[0], torch.nn.functional.normalize(init, dim=1), rtol=0, atol=1e-6)
    assert (protos[1] - protos[0]).abs().max() > 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"]["name"] == "mgca" and cfg["deepspeed"]["zero_optimization"]["stage"] == 2
