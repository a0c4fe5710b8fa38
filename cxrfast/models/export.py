"""Export a pre-trained encoder as `encoder.safetensors` under timm's ViT parameter names.

The file loads strictly into timm's `VisionTransformer` with `num_classes=0`:

    timm.create_model("vit_base_patch16_224", in_chans=1, num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="encoder.safetensors"))

(timm relaxes `strict` itself when `num_classes` differs from the pretrained config's; adding
`num_classes=0` to the overlay, as `timm_overlay()` does, keeps timm's load strict.) The
metadata records the architecture and the keyword arguments that rebuild it, so `load_encoder`
also restores the small test configs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

import cxrfast
from cxrfast.models.base import PretrainModel

if TYPE_CHECKING:
    from cxrfast.methods.base import EncoderExport

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"


def _unwrap(model: nn.Module) -> PretrainModel:
    """The PretrainModel inside a DeepSpeed engine / DDP wrapper (`.module`), or the model itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, PretrainModel):
        raise TypeError(f"export needs a cxrfast PretrainModel (or a wrapper of one), got {type(inner).__name__}")
    return inner


def export_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write the encoder of a `PretrainModel` (or a wrapper of one) to `path` (a `.safetensors`
    file, or a folder that gets `encoder.safetensors`); returns the file written."""
    from cxrfast.methods.base import EncoderExport

    inner = _unwrap(model)
    export = EncoderExport(arch=inner.timm_name, kwargs=dict(inner.timm_kwargs), state_dict=inner.encoder_state_dict_timm())
    return write_encoder(export, path, metadata={"source": type(inner).__name__})


def write_encoder(export: EncoderExport, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write `export` to `path` (a `.safetensors` file, or a folder that gets `encoder.safetensors`)
    through a temp name + rename; returns the file written.

    Metadata (all strings): arch (timm name), timm_kwargs (JSON), in_chans, img_size (ViTs), mean and
    std (the pixel normalisation the encoder was trained with, when known), cxrfast_version, plus
    `metadata` (e.g. source, method, preset).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        if path.suffix:
            raise ValueError(f"{path}: expected a .safetensors file name or a folder")
        path = path / ENCODER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = export.kwargs
    meta = {"format": "pt", "arch": export.arch, "timm_kwargs": json.dumps(kwargs, sort_keys=True),
            "in_chans": str(kwargs.get("in_chans", 3)), "cxrfast_version": cxrfast.__version__, **(metadata or {})}
    if "img_size" in kwargs:
        meta["img_size"] = str(kwargs["img_size"])
    if export.mean is not None and export.std is not None:
        meta["mean"], meta["std"] = repr(float(export.mean)), repr(float(export.std))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in export.state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    n_params = sum(t.numel() for t in tensors.values())
    log.info("exported %s encoder (%.1fM values) to %s", export.arch, n_params / 1e6, path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The export metadata of `path`: arch, timm_kwargs (dict), in_chans, img_size, ..."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "arch" not in meta or "timm_kwargs" not in meta:
        raise ValueError(f"{path}: not a cxrfast encoder export (metadata lacks 'arch'/'timm_kwargs': {sorted(meta)})")
    meta["timm_kwargs"] = json.loads(meta["timm_kwargs"])
    return meta


def timm_overlay(path: str | Path) -> dict[str, Any]:
    """`pretrained_cfg_overlay` for `timm.create_model(arch, pretrained=True, **timm_kwargs, ...)`
    that keeps timm's load strict (file + num_classes=0 + the file's input channels)."""
    meta = read_metadata(path)
    kw = meta["timm_kwargs"]
    overlay: dict[str, Any] = dict(file=str(path), num_classes=0)
    if "img_size" in kw:
        overlay["input_size"] = (kw["in_chans"], kw["img_size"], kw["img_size"])
    return overlay


def new_head_keys(model: nn.Module, state_keys: set[str]) -> tuple[set[str], set[str]]:
    """(missing, unexpected) keys a load of an encoder export (no classifier) into `model` may show
    when `model` was built with a new classifier: the classifier's parameters (timm's
    `pretrained_cfg["classifier"]`: ViT `head`, ResNet `fc`, DenseNet `classifier`) are missing; a ViT
    built with `global_pool="avg"` has a fresh `fc_norm` in place of the final `norm` (MAE's and MRM's
    fine-tuning drop the pre-trained final norm), so `fc_norm.*` are missing and `norm.*` unexpected."""
    own = set(model.state_dict())
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    missing = {k for k in own - state_keys if any(k.startswith(h + ".") for h in heads)}
    unexpected: set[str] = set()
    if isinstance(getattr(model, "fc_norm", None), nn.LayerNorm) and isinstance(getattr(model, "norm", None), nn.Identity):
        missing |= {k for k in own - state_keys if k.startswith("fc_norm.")}
        unexpected = {k for k in state_keys - own if k.startswith("norm.")}
    return missing, unexpected


def load_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """A timm model (eval mode) rebuilt from the file's metadata and loaded with `strict=True`;
    `overrides` go to `timm.create_model` (e.g. drop_path_rate, num_classes, global_pool). With a new
    classifier (`num_classes` > 0) or pooling, only the keys `new_head_keys` names may be missing or
    unexpected (they keep their fresh initialisation); any other is a RuntimeError listing them."""
    import timm
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model = timm.create_model(meta["arch"], pretrained=False, **{**meta["timm_kwargs"], **overrides})
    state = load_file(str(path))
    if overrides.get("num_classes") or "global_pool" in overrides:
        missing, unexpected = model.load_state_dict(state, strict=False)
        ok_missing, ok_unexpected = new_head_keys(model, set(state))
        bad_missing, bad_unexpected = sorted(set(missing) - ok_missing), sorted(set(unexpected) - ok_unexpected)
        if bad_missing or bad_unexpected:
            raise RuntimeError(f"{path} does not fit {meta['arch']} with {overrides}: missing {bad_missing}, "
                               f"unexpected {bad_unexpected}")
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()
