"""`PretrainModel`: the interface every pre-training model offers the trainer.

The trainer only ever calls what is declared here, so a new family (MGCA, MoCo-CXR) is one new
module plus one registry entry: `forward(batch) -> {"loss", parts...}`, the augmentation it
needs, its FLOP count for MFU, the parameters without weight decay, and its encoder under
timm's names for export.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn


class PretrainModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the registry's models.

    Attributes:
        augmentation: the `build_loader` augmentation whose batches `forward` consumes ("mae", "mrm", ...).
        needs_reports: True when batches must carry report token ids (shards with `ids.i32`).
        timm_name: the timm architecture the exported encoder loads into; together with
            `timm_kwargs`, `timm.create_model(timm_name, **timm_kwargs)` rebuilds the encoder
            (for the small test configs the kwargs override the named architecture's dims).
    """

    augmentation: ClassVar[str]
    needs_reports: ClassVar[bool]
    timm_name: str

    @abc.abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """-> {"loss": scalar total, plus one scalar per loss part}."""

    @property
    @abc.abstractmethod
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `timm.create_model(timm_name, **timm_kwargs)` (num_classes=0)."""

    @abc.abstractmethod
    def flops_per_image(self) -> float:
        """Training matmul FLOPs per image (forward + backward = 3x forward)."""

    @abc.abstractmethod
    def no_weight_decay(self) -> set[str]:
        """Full names (as in `named_parameters()`) of the parameters trained without weight decay."""

    @abc.abstractmethod
    def encoder_state_dict_timm(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's parameter names (see `cxrfast.models.export`)."""

    @abc.abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory, costs ~1/3 more compute)."""
