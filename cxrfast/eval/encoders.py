"""The encoder under evaluation, and its pooled features.

Three sources (nothing is ever downloaded):
- an exported `encoder.safetensors` (`cxrfast.models.export`): architecture from its metadata,
  any timm model (ViT or CNN); `init="random"` keeps the architecture and draws fresh weights;
- `timm=ARCH, init="random"`: a timm architecture, random init, one input channel (the baseline);
- `timm=ARCH, weights=FILE`: a local weights file (`cxrfast.models.init_weights`: an RGB stem summed
  to one channel) that must fit strictly (missing and unexpected keys are listed), the classifier
  head's keys dropped.

`identity` names the weights for the feature cache: the sha256 of the file, or the architecture,
its arguments and the seed of a random init.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INITS = ("random",)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """Which encoder to evaluate, as named on the command line."""

    encoder: Path | None = None  # exported encoder.safetensors
    timm: str | None = None  # timm architecture name
    init: str | None = None  # "random": fresh weights (with timm, or with encoder's architecture)
    weights: Path | None = None  # local weights for `timm`
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (with timm)
    init_seed: int = 0  # torch seed of a random init

    def __post_init__(self) -> None:
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"--init must be one of {INITS}, got {self.init!r}")
        forms = {
            "encoder": self.encoder is not None and self.timm is None and self.weights is None,
            "timm": self.timm is not None and self.encoder is None and (self.init is None) != (self.weights is None),
        }
        if not any(forms.values()):
            raise ValueError(
                "name the encoder one way: --encoder RUN/encoder.safetensors [--init random], "
                "--timm ARCH --init random, or --timm ARCH --weights FILE"
            )
        if self.timm_kwargs and self.timm is None:
            raise ValueError("timm arguments apply to --timm only (an export records its own)")


@dataclass
class LoadedEncoder:
    """A frozen encoder (eval mode, CPU) and what the evaluation needs to know about it."""

    module: nn.Module
    name: str  # short display name (a table column, a plot legend)
    identity: str  # sha256:<hex> of the weights file, or random:<arch>:<args>:<seed>
    arch: str
    in_chans: int
    img_size: int | None  # fixed input side (ViT), None when the architecture takes any size
    mean: float | None  # normalisation the encoder was pre-trained with (export metadata), if known
    std: float | None
    source: dict[str, Any]  # what config.json records about the encoder


def is_vit(model: nn.Module) -> bool:
    """True for timm Vision Transformers (class/prefix tokens + forward_intermediates)."""
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_intermediates") and hasattr(model, "blocks")


def img_size_of(model: nn.Module, kwargs: dict[str, Any] | None = None) -> int | None:
    """The fixed input side of a ViT (its timm kwargs or patch_embed), None for a CNN."""
    kwargs = kwargs or {}
    if "img_size" in kwargs:
        return int(kwargs["img_size"])
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    return int(size[0]) if size is not None else None


def in_chans_of(model: nn.Module, kwargs: dict[str, Any] | None = None) -> int:
    """Input channels (timm kwargs, else the first convolution's)."""
    kwargs = kwargs or {}
    if "in_chans" in kwargs:
        return int(kwargs["in_chans"])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 1


def _meta_float(meta: dict[str, Any], key: str) -> float | None:
    return None if meta.get(key) in (None, "") else float(meta[key])


def _create(arch: str, kwargs: dict[str, Any], seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    try:
        return timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs})
    except (RuntimeError, TypeError) as e:  # unknown architecture or argument
        raise ValueError(f"timm cannot build {arch!r} with {kwargs}: {e}") from e


def load_weights(model: nn.Module, arch: str, path: Path) -> None:
    """Load the local weights file `path` into the timm `model` through `cxrfast.models.init_weights`
    (wrappers unwrapped, an RGB stem summed to one channel, a position table of another grid
    resampled), then hold it to a strict fit: the file's classifier keys are dropped, and when `model`
    was built with a new head (fine-tuning) that head and a fresh `fc_norm` may stay unloaded
    (`cxrfast.models.export.new_head_keys`); any other missing or unexpected key is a ValueError
    listing them."""
    from cxrfast.models.export import new_head_keys
    from cxrfast.models.init_weights import load_encoder_weights

    report = load_encoder_weights(model, path)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    own = set(model.state_dict())
    dropped = [k for k in report.unexpected if any(k.startswith(h + ".") for h in heads) and k not in own]
    ok_missing, ok_unexpected = new_head_keys(model, (own - set(report.missing)) | set(report.unexpected))
    unexpected = [k for k in report.unexpected if k not in dropped and k not in ok_unexpected]
    missing = [k for k in report.missing if k not in ok_missing]
    if dropped:
        log.info("%s: dropped classifier keys %s (a new head is trained)", path, dropped)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {arch}: missing keys {missing}, unexpected keys {unexpected}")


def load(spec: EncoderSpec) -> LoadedEncoder:
    """Build the encoder `spec` names, in eval mode on the CPU, with its identity."""
    if spec.encoder is not None:
        from cxrfast.models.export import load_encoder, read_metadata

        path = Path(spec.encoder)
        if not path.is_file():
            raise FileNotFoundError(f"encoder file {path} does not exist (a run writes RUN/encoder.safetensors)")
        meta = read_metadata(path)
        kwargs = dict(meta["timm_kwargs"])
        name = path.parent.name or path.stem
        mean, std = _meta_float(meta, "mean"), _meta_float(meta, "std")  # random init: the same inputs, untrained
        if spec.init == "random":
            model = _create(meta["arch"], kwargs, spec.init_seed)
            ident = f"random:{meta['arch']}:{json.dumps(kwargs, sort_keys=True)}:{spec.init_seed}"
            name = f"{name} (random init)"
        else:
            model = load_encoder(path)
            ident = f"sha256:{file_sha256(path)}"
        source = {"kind": "export", "path": str(path.resolve()), "init": spec.init, "arch": meta["arch"],
                  "timm_kwargs": kwargs}  # fmt: skip
        arch = meta["arch"]
    else:
        arch = str(spec.timm)
        kwargs = {"in_chans": 1, **spec.timm_kwargs}
        model = _create(arch, kwargs, spec.init_seed)
        mean = std = None
        if spec.weights is not None:
            path = Path(spec.weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} does not exist (nothing is downloaded)")
            load_weights(model, arch, path)
            ident = f"sha256:{file_sha256(path)}"
            name = path.stem
            source = {"kind": "timm", "arch": arch, "weights": str(path.resolve()), "timm_kwargs": kwargs}
        else:
            ident = f"random:{arch}:{json.dumps(kwargs, sort_keys=True)}:{spec.init_seed}"
            name = f"{arch} (random init)"
            source = {"kind": "timm", "arch": arch, "init": "random", "timm_kwargs": kwargs}
    source["init_seed"] = spec.init_seed if ident.startswith("random:") else None
    source["identity"] = ident
    model = model.eval().requires_grad_(False)
    return LoadedEncoder(module=model, name=name, identity=ident, arch=arch, in_chans=in_chans_of(model, kwargs),
                         img_size=img_size_of(model, kwargs), mean=mean, std=std, source=source)  # fmt: skip


def pooled_features(model: nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, D] frozen features.

    ViT: "cls" = the class token after the final norm (MGCA, MAE's linear probe); "gap" = the mean
    of the patch tokens before the final norm, then LayerNorm (MAE/MRM's global_pool + fc_norm;
    a learned fc_norm of the model is used when it has one, else a fresh one: no affine, eps 1e-6).
    CNN: "gap" = the architecture's global pool (ResNet/DenseNet avgpool); "cls" is an error."""
    if is_vit(model):
        if pooling == "cls":
            if getattr(model, "cls_token", None) is None:
                raise ValueError(f"pooling=cls needs a class token; {type(model).__name__} has none (use pooling=gap)")
            return model.forward_features(x)[:, 0]
        if pooling == "gap":
            (tokens,) = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)
            pooled = tokens.mean(dim=1)
            fc_norm = getattr(model, "fc_norm", None)
            if isinstance(fc_norm, nn.LayerNorm):
                return fc_norm(pooled)
            return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)
    elif pooling == "gap":
        return model.forward_head(model.forward_features(x), pre_logits=True)
    elif pooling == "cls":
        raise ValueError(f"pooling=cls needs a ViT class token; {type(model).__name__} is not a ViT (use pooling=gap)")
    raise ValueError(f"unknown pooling {pooling!r}; use cls or gap")
