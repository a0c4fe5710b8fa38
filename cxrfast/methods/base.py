"""`Method`: the contract between a pre-training method and the trainer.

A method (MAE, MRM, MoCo, MGCA, ...) is one module that owns everything method-specific: its
config dataclass (nested in the run config as `method`), its networks and losses, the batches it
asks the pipelines for, whether it needs reports, its parameter groups, its analytic FLOPs per
image, the encoder it exports, and hooks the trainer calls at fixed points. The trainer calls
only what is declared here and never branches on a method's name; adding a method is one module,
one entry in `cxrfast.methods.METHODS` and its presets.

Precision: under bf16 DeepSpeed casts every parameter (trainable or frozen) to bf16 and leaves
buffers fp32 (a method casts a fixed fp32 table to the activations' dtype where it uses it). Under
the name prefixes of `fp32_names()` the trainer puts back, after `deepspeed.initialize`, the fp32
values frozen parameters and buffers had before it (e.g. a momentum encoder, a queue, BatchNorm
statistics: a cast back alone would keep the bf16 rounding). Trainable parameters are always
ZeRO's (bf16 compute copy, fp32 master in the optimizer) and may not be under those prefixes.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np

    from cxrfast.shards.shard_set import ShardSet

#: `validation_step` outputs named with this prefix hold one row per sample ([b, ...]); the trainer
#: gathers them over every batch and rank and hands them to `Method.validation_metrics`.
SAMPLE_OUTPUT_PREFIX = "sample_"


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method's config (subclasses add their fields, each with a one-line doc)."""

    init: str | None = None  # local weights file the encoder starts from (None = random init)


@dataclass(frozen=True, kw_only=True)
class DataRequest:
    """The batches a method asks `cxrfast.pipelines.build_loader` for, for one split."""

    augmentation: str  # name in cxrfast.pipelines.AUGMENTATIONS (mae, mrm, mgca, moco, eval)
    image_size: int  # side of `image` (square)
    mean: float | None = None  # pixel normalisation on the 0..1 scale; None = each shard folder's measured statistics
    std: float | None = None
    dataset_norms: tuple[tuple[str, float, float], ...] = ()  # (dataset, mean, std) for that dataset's folders, over mean/std
    channels: int = 1  # image channels fed to the network (grayscale replicated when 3)
    text_len: int | None = None  # token length of `ids` / `attention_mask`; None = no report text
    text: str | None = None  # which report text becomes `ids` (a name in cxrfast.shards.schema.TEXTS); None = the default
    #: image outputs delivered as float32 whatever the run's precision (loss targets: the published code
    #: computes its losses against fp32 images under fp16 autocast); the network casts its own inputs
    fp32_outputs: tuple[str, ...] = ()
    labels: bool = False  # batches carry `labels` (the shard folders must share their label names)

    @property
    def needs_reports(self) -> bool:
        return self.text_len is not None


@dataclass(frozen=True)
class EncoderExport:
    """The trained encoder as a timm model: `timm.create_model(arch, pretrained=False, **kwargs)`
    loads `state_dict` strictly (kwargs include in_chans and num_classes=0)."""

    arch: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]  # fp32, CPU, contiguous
    mean: float | None = None  # normalisation the encoder was trained with (written to the file's metadata)
    std: float | None = None


@dataclass
class StepContext:
    """Where the run stands when the trainer calls a hook."""

    step: int  # optimizer steps completed
    epoch: int  # the current epoch, 0-based
    epochs: int  # length of the schedule in epochs
    steps_per_epoch: int
    rank: int
    world_size: int
    global_batch: int  # samples per optimizer step over all ranks (micro-batch x accumulation x world size)
    accumulation: int  # micro-batches per optimizer step on each rank
    engine: Any = field(default=None, repr=False)  # the DeepSpeed engine (e.g. for fp32 master weights)


def add_weight_decay_exempt(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> set[str]:
    """The names timm 0.3.2's `optim_factory.add_weight_decay(model, wd)` (no skip list) trains without
    weight decay: 1-D tensors and names ending in `.bias`. MAE, MAE-CXR and MRM group their parameters
    with it (main_pretrain.py), so their tokens, position tables and BERT embeddings are decayed."""
    return {n for n, p in named_parameters if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}


class Method(nn.Module, abc.ABC):
    """Base class of the registry's methods. `cxrfast.methods.build_method` builds one from its
    config and the shard folder it trains on (`build`, below)."""

    name: ClassVar[str]  # registry name
    config_cls: ClassVar[type[MethodConfig]]

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> Method:
        """Construct from the config and the shard folders the run reads (vocabulary, label names,
        pixel statistics: see `cxrfast.shards.shard_set.ShardSet`). Raise ValueError naming the
        folder when the shards cannot serve this method."""
        return cls(cfg)  # type: ignore[call-arg]

    # --- required ---------------------------------------------------------------------------
    @abc.abstractmethod
    def data_request(self, split: str) -> DataRequest:
        """What to load for `split` ("train" for training, "validate" for the validator)."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One micro-batch -> {"loss": scalar total, "loss_<part>": scalar per part, ...}."""

    @abc.abstractmethod
    def flops_per_image(self) -> float:
        """Training matmul FLOPs per image (forward + backward, usually 3x forward), for MFU."""

    @abc.abstractmethod
    def encoder_export(self) -> EncoderExport:
        """The encoder under timm's names (called on an fp32 copy of the trained method)."""

    # --- optional, with defaults -----------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Full parameter names trained without weight decay (default: biases and norms, ndim <= 1)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: {"params", "weight_decay"[, "lr_scale"]}.
        `lr_scale` multiplies the scheduled lr of a group (layer-wise decay)."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if n in skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def fp32_names(self) -> tuple[str, ...]:
        """Name prefixes whose frozen parameters and buffers stay fp32 under bf16 (see module doc)."""
        return ()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward; methods that cannot say so."""
        if enable:
            raise ValueError(f"method {self.name!r} does not support train.grad_checkpointing")

    def compile_targets(self) -> list[nn.Module]:
        """Submodules `train.compile=true` compiles in place (state-dict names unchanged)."""
        return []

    def on_train_start(self, ctx: StepContext) -> None:
        """Called on every rank once the engine is built (and after a resume), before any batch:
        check the run's geometry (e.g. a queue the global batch must divide) and raise ValueError."""

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Called on every rank before the first micro-batch of each epoch (also on resume)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called on every rank after each optimizer step (not after each micro-batch)."""

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss parts on a validation batch (module in eval mode), and optionally per-sample outputs
        named `sample_*` for `validation_metrics`. Default: `forward`."""
        return self(batch)

    def validation_metrics(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        """Epoch-level validation metrics (e.g. a mean AUC) from the `sample_*` outputs of
        `validation_step`, concatenated over every batch of every rank. Called on every rank with the
        same arrays, so every rank selects alike; logged as `val_<name>` and selectable with
        `train.select_metric=val_<name>`. Only the validation split ever reaches it. Default: none."""
        return {}

    def extra_exports(self, out: Path, shards: ShardSet) -> list[Path]:
        """Files written next to encoder.safetensors at export (e.g. a text encoder); rank 0, fp32 copy."""
        return []
