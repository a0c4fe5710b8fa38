"""Initialise a model's encoder from a local weights file. Nothing is downloaded.

Published starting points: MRM starts from MAE's ImageNet encoder (`mae_pretrain_vit_base.pth`,
decoder random), MGCA from DeiT, MoCo-CXR from torchvision's ImageNet ResNet / DenseNet.

Formats read (through timm's `load_state_dict`: `.safetensors`, or a torch pickle loaded with
`weights_only=True`; wrappers `{"model": ...}` / `{"state_dict": ...}` and DDP's `module.` unwrapped):

- MAE's official checkpoints, `{"model": state_dict}` with timm ViT names (the `_full` ones add the
  decoder: reported as unexpected, not loaded);
- timm ViT / ResNet / DenseNet state dicts, plain or as DeiT's `{"model": ...}`;
- torchvision ResNet state dicts (the same names as timm's resnet) and torchvision DenseNet ones
  (their `denselayerN.norm.1` names renamed as timm's torchvision filter does).

The encoder is `model.encoder_tensors()` when the model has it (cxrfast's MAE / MRM: the ViT
encoder under timm names; decoder and text branch are left alone), else the whole state dict (a timm
model). Adapted on the way: the first convolution (patch embedding / stem) of an RGB file summed to
one channel for an `in_chans=1` model (timm's `adapt_input_conv`), and a `pos_embed` of another
grid resampled bicubically (as MAE's `interpolate_pos_embed`). A file's `pos_embed` becomes the
encoder's table (our MAE/MRM keep a fixed table as the non-persistent buffer `pos_embed`; it is set
through `set_encoder_pos_embed`, so the export writes it). Any other shape conflict, or a file of which
no tensor fits, is a ValueError naming the file and the keys; nothing is copied before all checks pass.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

#: torchvision's published DenseNet checkpoints name layers `denselayerN.norm.1.*`; timm's densenet (and
#: torchvision's current model) `norm1.*`. The rename of timm's `_filter_torchvision_pretrained`, for
#: every tensor of such a layer.
_TORCHVISION_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


@dataclass
class InitReport:
    """What `load_encoder_weights` did."""

    path: Path
    #: encoder tensors copied from the file
    loaded: list[str] = field(default_factory=list)
    #: encoder tensors the file does not hold: they keep their initialisation
    missing: list[str] = field(default_factory=list)
    #: file tensors the encoder has no place for (a decoder, a classifier head, ...): not loaded
    unexpected: list[str] = field(default_factory=list)
    #: key -> how it was adapted (channels summed, position table resampled)
    adapted: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "") if keys else "none"

        lines = [
            f"init from {self.path}: {len(self.loaded)} encoder tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected",
            f"  missing (keep their init): {few(self.missing)}",
            f"  unexpected (not loaded): {few(self.unexpected)}",
        ]
        lines += [f"  adapted {k}: {how}" for k, how in self.adapted.items()]
        return "\n".join(lines)


def read_state_dict(path: Path | str, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (see the module doc), keys under `prefix` with it removed."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init weights file {path} does not exist (nothing is downloaded: pass a local file)")
    try:
        sd = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # torch / safetensors raise many types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable .safetensors or torch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, expected a state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not tensors:
        what = f" under the prefix {prefix!r}" if prefix else ""
        raise ValueError(f"{path}: holds no tensors{what} (top-level keys: {sorted(sd)[:8]})")
    return {_TORCHVISION_DENSENET.sub(r"\1\2.\3", k): v for k, v in tensors.items()}


def _encoder(model: nn.Module) -> dict[str, torch.Tensor]:
    if hasattr(model, "encoder_tensors"):
        return dict(model.encoder_tensors())
    return dict(model.state_dict(keep_vars=True))


def _first_conv_weight(model: nn.Module) -> str:
    """The name of the input convolution's weight: timm's `pretrained_cfg["first_conv"]`, else a ViT's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"{cfg.get('first_conv') or 'patch_embed.proj'}.weight"


def _resample_pos_embed(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """[1, 1+G*G, D] -> the grid of `like` (cls row kept), bicubic without antialias like MAE's
    `interpolate_pos_embed`; None when the two are not square grids of the same width."""
    from timm.layers import resample_abs_pos_embed

    if table.ndim != 3 or like.ndim != 3 or table.shape[-1] != like.shape[-1]:
        return None
    old, new = math.isqrt(table.shape[1] - 1), math.isqrt(like.shape[1] - 1)
    if old * old != table.shape[1] - 1 or new * new != like.shape[1] - 1:
        return None
    return resample_abs_pos_embed(table, [new, new], [old, old], num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)  # fmt: skip


def load_encoder_weights(model: nn.Module, path: Path | str, *, prefix: str = "") -> InitReport:
    """Copy the tensors of the local weights file `path` into `model`'s encoder (see the module doc).

    `prefix` selects and strips a key prefix first (e.g. "module.encoder_q." for a MoCo checkpoint).
    Returns (and logs) the loaded / missing / unexpected keys and the adaptations made.
    """
    report = InitReport(Path(path))
    source = read_state_dict(path, prefix=prefix)
    targets = _encoder(model)
    first_conv = _first_conv_weight(model)
    ready: dict[str, torch.Tensor] = {}
    conflicts: list[str] = []
    for key, value in source.items():
        if key not in targets:
            report.unexpected.append(key)
            continue
        want = targets[key].shape
        if value.shape != want and key == first_conv and value.ndim == 4 and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:  # fmt: skip
            from timm.models import adapt_input_conv

            value = adapt_input_conv(want[1], value)
            how = "summed" if want[1] == 1 else "repeated and rescaled"
            report.adapted[key] = f"{source[key].shape[1]} input channels {how} to {want[1]}"
        elif value.shape != want and key == "pos_embed":
            resampled = _resample_pos_embed(value, targets[key])
            if resampled is not None:
                report.adapted[key] = f"grid {math.isqrt(value.shape[1] - 1)}^2 resampled (bicubic) to " \
                                      f"{math.isqrt(want[1] - 1)}^2"  # fmt: skip
                value = resampled
        if value.shape != want:
            conflicts.append(f"{key}: file {tuple(source[key].shape)} vs model {tuple(want)}")
            continue
        ready[key] = value
    if conflicts:
        raise ValueError(f"{report.path}: shapes conflict with the model's encoder: " + "; ".join(conflicts))
    if not ready:
        raise ValueError(
            f"{report.path}: no tensor matches the model's encoder (file keys look like {sorted(source)[:4]}, "
            f"the encoder's like {sorted(targets)[:4]}); pass prefix= when the encoder sits under one"
        )
    with torch.no_grad():
        for key, value in ready.items():
            if key == "pos_embed" and hasattr(model, "set_encoder_pos_embed"):
                model.set_encoder_pos_embed(value)
            else:
                targets[key].copy_(value)
    report.loaded = sorted(ready)
    report.missing = sorted(set(targets) - set(ready))
    report.unexpected.sort()
    log.info("%s", report.summary())
    return report
