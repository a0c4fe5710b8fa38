"""MAE and MAE-CXR as a method: a masked autoencoder on the image (`cxrfast.models.mae`).

Batches: the `mae` augmentation (RandomResizedCrop 224, flip); the image is also the loss target,
so it arrives in fp32 and the network casts its own input. Loss: MSE on the removed patches
(per-patch normalised target with `norm_pix_loss`). Export: the ViT encoder under timm's names.
`init` starts the encoder from a local weights file (`cxrfast.models.load_encoder_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig, add_weight_decay_exempt
from cxrfast.shards.schema import DATASET_LABEL_NAMES
from cxrfast.shards.shard_set import ShardSet

log = logging.getLogger(__name__)

PIXEL_NORMS = ("published", "shards")
#: `cxrfast.models.pos_embed.VARIANTS` (not imported: configs and presets load without timm)
POS_EMBEDS = ("mae", "mrm")
#: torchvision's ImageNet RGB normalisation (MAE; MAE-CXR on CheXpert and MIMIC-CXR).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gray_normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[float, float]:
    """One-channel (m, s) for a per-channel normalisation (mean_c, std_c) of a gray image replicated
    to C channels (PIL `.convert("RGB")`): the channel average of the normalised channels,
    avg_c((x - mean_c) / std_c) = (x - m) / s, i.e. 1/s = avg_c(1/std_c), m = s * avg_c(mean_c / std_c).

    That average is what a patch embedding whose RGB filters are summed to one channel sees (up to the
    factor C it absorbs), and as a loss target it has the published loss scale to 1e-4 for ImageNet's
    constants (0.2260 against the root-mean-square 0.2260). ImageNet's give (0.4488, 0.2260).
    """
    if len(mean) != len(std) or not mean or min(std) <= 0:
        raise ValueError(f"need as many means as stds (> 0), got {tuple(mean)} and {tuple(std)}")
    inv = sum(1.0 / s for s in std) / len(std)
    return sum(m / s for m, s in zip(mean, std, strict=True)) / len(std) / inv, 1.0 / inv


_IMAGENET_GRAY = gray_normalisation(IMAGENET_MEAN, IMAGENET_STD)


@dataclass(kw_only=True)
class MAEMethodConfig(MethodConfig):
    """A masked autoencoder (MAE, MAE-CXR). Defaults: MAE's published code (ViT-B)."""

    arch: str = "mae_vit_base_patch16"  # network in cxrfast.models.MODELS
    mask_ratio: float = 0.75  # share of image patches removed from the encoder input
    norm_pix_loss: bool = True  # MSE on per-patch normalised pixels
    fused: bool = True  # fused (Triton) masking/loss kernels on CUDA; false = plain-PyTorch references
    pixel_norm: str = "published"  # published: normalise with mean/std below; shards: each shard folder's measured statistics
    mean: float = _IMAGENET_GRAY[0]  # pixel mean on the 0..1 scale (pixel_norm=published); ImageNet's RGB, see gray_normalisation
    std: float = _IMAGENET_GRAY[1]  # pixel std on the 0..1 scale (pixel_norm=published)
    dataset_norms: tuple[str, ...] = ()  # pixel_norm=published: "dataset:mean:std" for that dataset's shard folders
    decay_tokens: bool = True  # the published grouping (timm add_weight_decay: tokens decayed); false = cls/mask tokens exempt
    pos_embed: str = "mae"  # fixed sin-cos tables: mae (MAE's util/pos_embed.py) | mrm (MRM's); an init file's table wins

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"method.pixel_norm must be one of {PIXEL_NORMS}, got {self.pixel_norm!r}")
        if self.std <= 0:
            raise ValueError(f"method.std must be > 0, got {self.std}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"method.pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        parse_dataset_norms(self.dataset_norms)


def parse_dataset_norms(entries: Sequence[str]) -> tuple[tuple[str, float, float], ...]:
    """`method.dataset_norms` entries "dataset:mean:std" (0..1 scale) -> (dataset, mean, std);
    ValueError naming the entry."""
    out: list[tuple[str, float, float]] = []
    for entry in entries:
        parts = entry.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            dataset, mean, std = parts[0], float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"method.dataset_norms: {entry!r} is not dataset:mean:std (e.g. nih:0.5056:0.252)") from None
        if dataset not in DATASET_LABEL_NAMES or any(dataset == d for d, _, _ in out):
            raise ValueError(f"method.dataset_norms: {entry!r} must name a dataset of {tuple(DATASET_LABEL_NAMES)} once")
        if not std > 0:
            raise ValueError(f"method.dataset_norms: {entry!r} needs std > 0")
        out.append((dataset, mean, std))
    return tuple(out)


class PixelNormConfig(Protocol):
    """A method config's pixel normalisation fields (MAE, MRM, MoCo, MGCA)."""

    pixel_norm: str
    mean: float
    std: float


def resolve_pixel_norm(cfg: PixelNormConfig, shards: ShardSet) -> tuple[float, float]:
    """(mean, std) the encoder is exported with: the config's constants, or the shards' statistics
    (pooled over the folders when several are mixed; `ShardSet.pixel_stats`)."""
    return shards.pixel_stats if cfg.pixel_norm == "shards" else (cfg.mean, cfg.std)


def request_pixel_norm(cfg: PixelNormConfig) -> tuple[float | None, float | None]:
    """(mean, std) of the method's DataRequest: the published constants (one normalisation for every
    folder), or None: the loaders normalise each folder's samples with that folder's statistics."""
    return (None, None) if cfg.pixel_norm == "shards" else (cfg.mean, cfg.std)


class MAE(Method):
    """MAE on `image` batches; the network is `self.net` (a `cxrfast.models.MaskedAutoencoder`)."""

    name: ClassVar[str] = "mae"
    config_cls: ClassVar[type[MethodConfig]] = MAEMethodConfig
    augmentation: ClassVar[str] = "mae"
    #: batch images kept fp32 under bf16: the loss target (here the input image itself)
    fp32_outputs: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, cfg: MAEMethodConfig, *, mean: float, std: float, **net_kwargs: Any) -> None:
        from cxrfast.models import build_model

        super().__init__()
        self.cfg = cfg
        self.mean, self.std = mean, std
        self.net = build_model(cfg.arch, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, fused=cfg.fused,
                               pos_embed=cfg.pos_embed, **net_kwargs)

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> MAE:
        assert isinstance(cfg, MAEMethodConfig)
        mean, std = resolve_pixel_norm(cfg, shards)
        return cls(cfg, mean=mean, std=std).init_encoder()

    def init_encoder(self) -> MAE:
        """Load `cfg.init` (a local file; nothing is downloaded) into the encoder; the decoder (and MRM's
        report branch) keep their random init. FileNotFoundError / ValueError name the file."""
        if self.cfg.init is not None:
            from cxrfast.models import load_encoder_weights

            report = load_encoder_weights(self.net, self.cfg.init)
            if report.missing:
                log.warning("method.init=%s left %d encoder tensors at their random init: %s", self.cfg.init,
                            len(report.missing), ", ".join(report.missing[:6]))
        return self

    def pixel_request(self) -> dict[str, Any]:
        """The DataRequest's normalisation: the published constants (`mean`/`std`, and each of
        `dataset_norms` for the folders of its dataset), or each folder's statistics (pixel_norm=shards)."""
        mean, std = request_pixel_norm(self.cfg)
        by_dataset = parse_dataset_norms(self.cfg.dataset_norms) if mean is not None else ()
        return {"mean": mean, "std": std, "dataset_norms": by_dataset}

    def data_request(self, split: str) -> DataRequest:
        return DataRequest(augmentation=self.augmentation, image_size=self.net.cfg.img_size, **self.pixel_request(),
                           fp32_outputs=self.fp32_outputs)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.net(batch)

    def flops_per_image(self) -> float:
        return float(self.net.flops_per_image())

    def no_weight_decay(self) -> set[str]:
        """decay_tokens (published): exactly timm's add_weight_decay grouping (1-D tensors and biases);
        otherwise also the cls/mask tokens."""
        if self.cfg.decay_tokens:
            return add_weight_decay_exempt(self.named_parameters())
        return {f"net.{n}" for n in self.net.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def compile_targets(self) -> list[nn.Module]:
        from timm.models.vision_transformer import Block

        return [m for m in self.net.modules() if isinstance(m, Block)]

    def encoder_export(self) -> EncoderExport:
        return EncoderExport(arch=self.net.timm_name, kwargs=dict(self.net.timm_kwargs),
                             state_dict=self.net.encoder_state_dict_timm(), mean=self.mean, std=self.std)
