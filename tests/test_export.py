"""cxrfast.models.export: encoder.safetensors loads strictly into timm and gives the same features."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from cxrfast.models import build_model
from cxrfast.models.export import ENCODER_FILE, export_encoder, load_encoder, read_metadata, timm_overlay


def _trained_tiny(name: str = "mae_vit_tiny_test") -> torch.nn.Module:
    """A tiny model after two optimizer steps, so that export reads current (not initial) weights."""
    torch.manual_seed(0)
    kw = {}
    if name.startswith("mrm"):
        cont = torch.zeros(50, dtype=torch.bool)
        kw = dict(vocab_size=50, special_ids=dict(pad=0, unk=1, cls=2, sep=3, mask=4), wordpiece_continuation=cont)
    model = build_model(name, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model.forward_features(torch.randn(2, 1, 64, 64)).square().mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["mae_vit_tiny_test", "mrm_vit_tiny_test"])
def test_tiny_export_loads_strictly_with_same_features(name, tmp_path: Path):
    model = _trained_tiny(name)
    path = export_encoder(model, tmp_path)
    assert path == tmp_path / ENCODER_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [ENCODER_FILE]  # temp file renamed away

    state = load_file(str(path))
    assert not any(k.startswith(("decoder", "mask_token", "text")) for k in state)
    vit = VisionTransformer(**model.timm_kwargs)
    vit.load_state_dict(state, strict=True)
    by_name = timm.create_model(model.timm_name, pretrained=False, **model.timm_kwargs)
    by_name.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(x)
        for timm_model in (vit.eval(), by_name.eval(), load_encoder(path)):
            assert torch.allclose(timm_model.forward_features(x), ours, atol=1e-5, rtol=1e-5)

    meta = read_metadata(path)
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["timm_kwargs"] == model.timm_kwargs
    assert (meta["in_chans"], meta["img_size"]) == ("1", "64")


def test_vit_small_loads_through_create_model_pretrained(tmp_path: Path, caplog):
    torch.manual_seed(0)
    model = build_model("mae_vit_small_patch16").eval()
    with torch.no_grad():
        model.blocks[3].mlp.fc2.bias.normal_()  # not an init value: proves the weights are read
    path = export_encoder(model, tmp_path / "vits.safetensors")
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        ours = model.forward_features(x)

    # The command (timm itself relaxes strict here, since num_classes differs from the
    # pretrained config): check that nothing is missing or left over, and that weights match.
    with caplog.at_level(logging.INFO, logger="timm"):
        vit = timm.create_model("vit_small_patch16_224", in_chans=1, num_classes=0, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert "Loading pretrained weights from file" in caplog.text
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    exported = load_file(str(path))
    assert exported.keys() == vit.state_dict().keys()
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in exported.items())
    # The overlay from timm_overlay() keeps timm's load strict=True.
    strict_vit = timm.create_model("vit_small_patch16_224", in_chans=1, num_classes=0, pretrained=True,
                                   pretrained_cfg_overlay=timm_overlay(path)).eval()
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), ours, atol=1e-5, rtol=1e-5)
        assert torch.allclose(strict_vit.forward_features(x), ours, atol=1e-5, rtol=1e-5)


def test_export_unwraps_engines_and_writes_fp32(tmp_path: Path):
    model = _trained_tiny().to(torch.bfloat16)

    class Engine(torch.nn.Module):  # DeepSpeed engines / DDP expose the model as `.module`
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    path = export_encoder(Engine(model), tmp_path / "out" / "enc.safetensors")
    state = load_file(str(path))
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["cls_token"], model.cls_token.detach().float())
    assert state["pos_embed"].shape == (1, 1 + 16, 64)


def test_export_and_load_errors(tmp_path: Path):
    with pytest.raises(TypeError, match="PretrainModel"):
        export_encoder(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_encoder(_trained_tiny(), tmp_path / "encoder.pt")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a cxrfast encoder export"):
        load_encoder(foreign)
