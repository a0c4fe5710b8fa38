"""cxrfast.models.init_weights: encoder initialisation from local files in each published format,
built here from timm / torchvision models with random weights (nothing is downloaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from cxrfast.models import build_model
from cxrfast.models.init_weights import load_encoder_weights

#: timm's ViT with the dimensions of the registry's `*_vit_tiny_test` encoders.
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4, patch_size=16)


def rgb_vit(img_size: int = 64, **kw) -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, in_chans=3, **{**TINY_VIT, **kw})


def test_official_mae_checkpoint_loads_every_encoder_key_and_sums_channels(tmp_path: Path, caplog) -> None:
    """MAE's `{"model": ...}` (here with decoder keys, as the `_full` checkpoints): the whole encoder
    is loaded, the RGB patch filters summed to one channel, the file's pos_embed becomes the encoder's
    table (and what the export writes), the decoder is left alone and reported as unexpected."""
    vit = rgb_vit(num_classes=0)
    sd = dict(vit.state_dict())
    decoder_keys = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
                    "decoder_pred.bias": torch.randn(256)}  # fmt: skip
    torch.save({"model": {**sd, **decoder_keys}, "epoch": 799}, tmp_path / "mae_pretrain_vit_tiny.pth")
    for name in ("mae_vit_tiny_test", "mrm_vit_tiny_test"):
        model = build_model(name, **({} if name.startswith("mae") else _text()))
        decoder_before = model.decoder_embed.weight.detach().clone()
        with caplog.at_level(logging.INFO, logger="cxrfast.models.init_weights"):
            report = load_encoder_weights(model, tmp_path / "mae_pretrain_vit_tiny.pth")
        encoder = model.encoder_tensors()
        assert report.loaded == sorted(encoder) and report.missing == []
        assert report.unexpected == sorted(decoder_keys)
        assert "input channels summed to 1" in report.adapted["patch_embed.proj.weight"]
        assert torch.equal(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
        for key in ("cls_token", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight"):
            assert torch.equal(encoder[key], sd[key]), key
        assert torch.equal(model.pos_embed, sd["pos_embed"])
        assert torch.equal(model.encoder_state_dict_timm()["pos_embed"], sd["pos_embed"])
        assert torch.equal(model.decoder_embed.weight, decoder_before)
        assert f"{len(encoder)} encoder tensors loaded, 0 missing, 3 unexpected" in caplog.text
        # The encoder computes what the RGB model computes on a grey image replicated to 3 channels.
        grey = torch.rand(2, 1, 64, 64)
        ours = model.eval().forward_features(grey)
        theirs = vit.eval().forward_features(grey.expand(-1, 3, -1, -1))
        assert torch.allclose(ours, theirs, atol=1e-4)


def _text() -> dict:
    v = 50
    return {"vocab_size": v, "special_ids": {"pad": 0, "unk": 1, "cls": 2, "mask": 4},
            "wordpiece_continuation": torch.zeros(v, dtype=torch.bool)}  # fmt: skip


def test_timm_safetensors_and_deit_pth_into_a_one_channel_model(tmp_path: Path) -> None:
    """A plain timm state dict (.safetensors) of a 1-channel ViT with a classifier head loads unchanged
    (the head is unexpected); DeiT's `{"model": ...}` with a 14x14 table has it resampled to 4x4."""
    torch.manual_seed(2)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, in_chans=1, num_classes=5, **TINY_VIT)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    model = build_model("mae_vit_tiny_test")
    report = load_encoder_weights(model, tmp_path / "vit.safetensors")
    assert report.unexpected == ["head.bias", "head.weight"] and report.missing == [] and not report.adapted
    assert torch.equal(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)

    deit = rgb_vit(img_size=224, num_classes=1000)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    report = load_encoder_weights(model, tmp_path / "deit.pth")
    assert report.adapted["pos_embed"] == "grid 14^2 resampled (bicubic) to 4^2"
    assert model.pos_embed.shape == (1, 17, 64) and torch.equal(model.pos_embed[0, 0], deit.pos_embed[0, 0])


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_torchvision_cnn_into_timm(arch: str, tmp_path: Path) -> None:
    """torchvision's ImageNet-format ResNet / DenseNet state dicts (DenseNet's published files use the old
    `norm.1` names) into timm's one-channel model: every feature tensor loaded, the stem summed, the
    classifier unexpected."""
    torch.manual_seed(3)
    tv = getattr(torchvision.models, arch)(weights=None)
    sd = tv.state_dict()
    if arch == "densenet121":  # the layout of densenet121-a639ec97.pth
        sd = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.").replace("relu1", "relu.1"): v
              for k, v in sd.items()}  # fmt: skip
        assert any(".norm.1." in k for k in sd)
    torch.save(sd, tmp_path / f"{arch}.pth")
    model = timm.create_model(arch, in_chans=1, num_classes=0)
    report = load_encoder_weights(model, tmp_path / f"{arch}.pth")
    stem = "conv1.weight" if arch == "resnet18" else "features.conv0.weight"
    assert report.adapted == {stem: "3 input channels summed to 1"}
    assert report.unexpected == (["fc.bias", "fc.weight"] if arch == "resnet18" else ["classifier.bias", "classifier.weight"])
    assert report.missing == []
    state = model.state_dict()
    assert torch.equal(state[stem], tv.state_dict()[stem].sum(1, keepdim=True))
    for key, value in tv.state_dict().items():
        if key in state and key != stem:
            assert torch.equal(state[key], value), key


def test_moco_checkpoint_with_a_prefix(tmp_path: Path) -> None:
    torch.manual_seed(4)
    tv = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3},
               tmp_path / "moco.pth.tar")  # fmt: skip
    model = timm.create_model("resnet18", in_chans=3, num_classes=0)
    with pytest.raises(ValueError, match="no tensor matches the model's encoder.*prefix="):
        load_encoder_weights(model, tmp_path / "moco.pth.tar")
    report = load_encoder_weights(model, tmp_path / "moco.pth.tar", prefix="encoder_q.")  # `module.` is unwrapped
    assert report.missing == [] and torch.equal(model.conv1.weight, tv.conv1.weight)


def test_clear_errors(tmp_path: Path) -> None:
    model = build_model("mae_vit_tiny_test")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_encoder_weights(model, tmp_path / "mae_pretrain_vit_base.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a readable"):
        load_encoder_weights(model, tmp_path / "junk.pth")
    wide = timm.create_model("vit_tiny_patch16_224", img_size=64, in_chans=1, embed_dim=96, depth=2, num_heads=4)
    save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"shapes conflict.*cls_token: file \(1, 1, 96\) vs model \(1, 1, 64\)"):
        load_encoder_weights(model, tmp_path / "wide.safetensors")
    save_file({"text.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no tensor matches the model's encoder"):
        load_encoder_weights(model, tmp_path / "other.safetensors")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a failed init changes nothing
