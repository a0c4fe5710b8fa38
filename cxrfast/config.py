"""Pre-training configuration: small kw-only dataclasses, `key=value` overrides, JSON out.

A run's config is a recipe (`cxrfast.recipes.RECIPES`) plus overrides from the command line.
Override keys are `section.field` (`optim.blr=3e-4`) or a bare field name when it is unique
across sections (`epochs=2`, `fused=false`); unknown keys and badly typed values are errors.
Every dataclass validates itself in `__post_init__`, so an override is checked as it is applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("dali", "torch", "synthetic")
PRECISIONS = ("bf16", "fp32")


@dataclass(kw_only=True)
class ModelConfig:
    """Which architecture to build and its pre-training switches."""

    name: str  # architecture name in cxrfast.models.MODELS
    mask_ratio: float  # share of image patches removed from the encoder input
    norm_pix_loss: bool  # MAE loss on per-patch normalised pixels
    fused: bool = True  # fused (Triton) masking/loss kernels; false = plain-PyTorch references
    grad_checkpointing: bool = False  # activation checkpointing of the transformer blocks
    compile: bool = False  # torch.compile each transformer block (CUDA)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")


@dataclass(kw_only=True)
class TextConfig:
    """Report branch of image+text recipes (MRM); absent (None) for image-only recipes."""

    mlm_prob: float = 0.5  # share of report words masked (whole-word masking)
    mlm_all_positions: bool = False  # the published MRM code's MLM loss over all positions

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"text.mlm_prob must be in (0, 1), got {self.mlm_prob}")


@dataclass(kw_only=True)
class DataConfig:
    """Where batches come from (`cxrfast.pipelines.build_loader`)."""

    backend: str = "dali"  # dali | torch (DataLoader reference) | synthetic (random tensors, no I/O)
    split: str = "train"  # shard split to train on
    num_threads: int = 4  # DALI threads / DataLoader workers per rank
    shuffle: bool = True  # shuffle samples each epoch (seeded by seed + epoch)
    overfit_batches: int = 0  # >0: train on the first N batches only, repeated every epoch (debug)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.split not in ("train", "validate", "test"):
            raise ValueError(f"data.split must be train, validate or test, got {self.split!r}")
        if self.num_threads < 1:
            raise ValueError(f"data.num_threads must be >= 1, got {self.num_threads}")
        if self.overfit_batches < 0:
            raise ValueError(f"data.overfit_batches must be >= 0, got {self.overfit_batches}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with per-iteration linear warmup then cosine decay (the MAE recipe)."""

    epochs: int  # length of the schedule in epochs
    warmup_epochs: float  # linear warmup from 0, in epochs (fractions allowed)
    blr: float  # base learning rate: lr = blr * global batch / 256
    lr: float | None = None  # absolute learning rate; overrides blr when set
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, tokens, pos-embeds)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    clip_grad: float = 0.0  # gradient-norm clipping threshold; 0 = off

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"learning rates must be > 0, got blr={self.blr} lr={self.lr}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optim.min_lr, weight_decay and clip_grad must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"AdamW betas must be in [0, 1), got ({self.beta1}, {self.beta2})")

    def peak_lr(self, global_batch: int) -> float:
        """The learning rate after warmup: `lr`, else `blr * global_batch / 256`."""
        return self.lr if self.lr is not None else self.blr * global_batch / 256


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, precision, DeepSpeed ZeRO, logging and checkpointing."""

    batch_size: int  # micro-batch per rank (per GPU)
    global_batch_size: int | None = None  # images per optimizer step; None = batch_size x world size
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1 or 2
    precision: str = "bf16"  # bf16 (fp32 master weights in the optimizer) or fp32
    seed: int = 0  # seeds the model init, the masking RNG and the data order
    log_every: int = 20  # optimizer steps between metric logs (the only host syncs)
    ckpt_every_epochs: int = 20  # checkpoint every N epochs (and always at the end); 0 = only at the end
    ckpt_keep: int = 2  # keep the newest N checkpoints; 0 = keep all
    stop_after_epochs: int | None = None  # end this run after N epochs of the schedule (resume later)
    export: bool = True  # write OUT/encoder.safetensors (timm ViT names) at the end
    peak_tflops: float | None = None  # accelerator peak for MFU when its name is not in the table

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of batch_size={self.batch_size}"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.log_every < 1 or self.ckpt_every_epochs < 0 or self.ckpt_keep < 0:
            raise ValueError("train.log_every must be >= 1; ckpt_every_epochs and ckpt_keep >= 0")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise ValueError(f"train.stop_after_epochs must be >= 1, got {self.stop_after_epochs}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.global_batch_size is None:
            return 1
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of batch_size={self.batch_size} "
                f"x world size {world_size}"
            )
        return self.global_batch_size // per_step


@dataclass(kw_only=True)
class Config:
    """One pre-training run: a recipe name plus its sections."""

    recipe: str  # name in cxrfast.recipes.RECIPES this config started from
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig | None = None  # report branch (MRM); None for image-only recipes

    def __post_init__(self) -> None:
        if self.train.stop_after_epochs is not None and self.train.stop_after_epochs > self.optim.epochs:
            raise ValueError(
                f"train.stop_after_epochs={self.train.stop_after_epochs} exceeds optim.epochs={self.optim.epochs}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_json(self, path: Path, **extra: Any) -> Path:
        """Write the resolved config (plus `extra`, e.g. world size, lr) to `path` atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path


SECTIONS: tuple[str, ...] = ("model", "text", "data", "optim", "train")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    out = {}
    for name in SECTIONS:
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        out[name] = args[0] if args else tp
    return out


def field_index() -> dict[str, tuple[str, str]]:
    """Every accepted override key -> (section, field): `section.field` and unique bare names."""
    index: dict[str, tuple[str, str]] = {}
    bare: dict[str, list[str]] = {}
    for section, cls in _section_types().items():
        for f in dataclasses.fields(cls):
            index[f"{section}.{f.name}"] = (section, f.name)
            bare.setdefault(f.name, []).append(section)
    for name, sections in bare.items():
        if len(sections) == 1:
            index[name] = (sections[0], name)
    return index


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse `text` as the annotated type `tp` (bool, int, float, str, or `X | None`)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        tp = args[0]
    try:
        if tp is bool:
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        raise ValueError(f"override {key}={text!r}: expected a {tp.__name__}") from None
    raise TypeError(f"override {key}: unsupported field type {tp!r}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of `cfg` with `key=value` overrides applied and validated."""
    index = field_index()
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key not in index:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(index))}")
        section, name = index[key]
        if getattr(cfg, section) is None:
            raise ValueError(f"override {key!r}: recipe {cfg.recipe!r} has no {section!r} section")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        changes.setdefault(section, {})[name] = _parse_value(key, value.strip(), hints[name])
    sections = {s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in changes.items()}
    return dataclasses.replace(cfg, **sections)
