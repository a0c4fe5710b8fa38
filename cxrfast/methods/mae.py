"""MAE and MAE-CXR as a method: a masked autoencoder on the image (`cxrfast.models.mae`).

Batches: the `mae` augmentation (RandomResizedCrop 224, flip). Loss: MSE on the removed patches
(per-patch normalised target with `norm_pix_loss`). Export: the ViT encoder under timm's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig
from cxrfast.shards.folder import ShardFolder

PIXEL_NORMS = ("published", "shards")


@dataclass(kw_only=True)
class MAEMethodConfig(MethodConfig):
    """A masked autoencoder (MAE, MAE-CXR)."""

    arch: str = "mae_vit_base_patch16"  # network in cxrfast.models.MODELS
    mask_ratio: float = 0.75  # share of image patches removed from the encoder input
    norm_pix_loss: bool = True  # MSE on per-patch normalised pixels
    fused: bool = True  # fused (Triton) masking/loss kernels on CUDA; false = plain-PyTorch references
    pixel_norm: str = "published"  # published: normalise with mean/std below; shards: the shards' measured statistics
    mean: float = 0.5  # pixel mean on the 0..1 scale (pixel_norm=published)
    std: float = 0.25  # pixel std on the 0..1 scale (pixel_norm=published)
    decay_tokens: bool = False  # weight decay on cls_token/mask_token too (the published MAE code decays them)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"method.pixel_norm must be one of {PIXEL_NORMS}, got {self.pixel_norm!r}")
        if self.std <= 0:
            raise ValueError(f"method.std must be > 0, got {self.std}")


def resolve_pixel_norm(cfg: MAEMethodConfig, shards: ShardFolder) -> tuple[float, float]:
    """(mean, std) the images are normalised with: the config's constants, or the shards' statistics."""
    return shards.pixel_stats if cfg.pixel_norm == "shards" else (cfg.mean, cfg.std)


class MAE(Method):
    """MAE on `image` batches; the network is `self.net` (a `cxrfast.models.MaskedAutoencoder`)."""

    name: ClassVar[str] = "mae"
    config_cls: ClassVar[type[MethodConfig]] = MAEMethodConfig
    augmentation: ClassVar[str] = "mae"

    def __init__(self, cfg: MAEMethodConfig, *, mean: float, std: float, **net_kwargs: Any) -> None:
        from cxrfast.models import build_model

        super().__init__()
        self.cfg = cfg
        self.mean, self.std = mean, std
        self.net = build_model(cfg.arch, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, fused=cfg.fused,
                               **net_kwargs)

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardFolder) -> MAE:
        assert isinstance(cfg, MAEMethodConfig)
        mean, std = resolve_pixel_norm(cfg, shards)
        return cls(cfg, mean=mean, std=std)

    def data_request(self, split: str) -> DataRequest:
        return DataRequest(augmentation=self.augmentation, image_size=self.net.cfg.img_size, mean=self.mean, std=self.std)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.net(batch)

    def flops_per_image(self) -> float:
        return float(self.net.flops_per_image())

    def no_weight_decay(self) -> set[str]:
        skip = {f"net.{n}" for n in self.net.no_weight_decay()}
        if self.cfg.decay_tokens:
            skip -= {"net.cls_token", "net.mask_token"}
        return skip

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def compile_targets(self) -> list[nn.Module]:
        from timm.models.vision_transformer import Block

        return [m for m in self.net.modules() if isinstance(m, Block)]

    def encoder_export(self) -> EncoderExport:
        return EncoderExport(arch=self.net.timm_name, kwargs=dict(self.net.timm_kwargs),
                             state_dict=self.net.encoder_state_dict_timm(), mean=self.mean, std=self.std)
