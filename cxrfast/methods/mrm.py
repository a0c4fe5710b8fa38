"""MRM (Zhou et al., ICLR 2023) as a method: MAE on the image + masked language modelling on the
report (`cxrfast.models.mrm`). Batches: the `mrm` augmentation (448 crop -> 224 encoder input and
448 target; report ids). Loss = image loss + text loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cxrfast.methods.base import DataRequest, MethodConfig
from cxrfast.methods.mae import MAE, MAEMethodConfig, resolve_pixel_norm
from cxrfast.shards.folder import ShardFolder


@dataclass(kw_only=True)
class MRMMethodConfig(MAEMethodConfig):
    """MAE options (448 target, 32x32 target patches) + the report branch."""

    arch: str = "mrm_vit_base_patch16"  # network in cxrfast.models.MODELS
    mlm_prob: float = 0.5  # share of report words masked (whole-word masking)
    mlm_all_positions: bool = False  # the published MRM code's MLM loss over all positions

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"method.mlm_prob must be in (0, 1), got {self.mlm_prob}")


class MRM(MAE):
    """MAE image branch + BERT MLM report branch; the vocabulary comes from the shards' tokenizer."""

    name: ClassVar[str] = "mrm"
    config_cls: ClassVar[type[MethodConfig]] = MRMMethodConfig
    augmentation: ClassVar[str] = "mrm"

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardFolder) -> MRM:
        from cxrfast.models import text_kwargs_from_shards

        assert isinstance(cfg, MRMMethodConfig)
        shards.require_text(f"method {cls.name!r}")
        mean, std = resolve_pixel_norm(cfg, shards)
        return cls(cfg, mean=mean, std=std, mlm_prob=cfg.mlm_prob, mlm_all_positions=cfg.mlm_all_positions,
                   **text_kwargs_from_shards(shards))

    def data_request(self, split: str) -> DataRequest:
        c = self.net.cfg
        return DataRequest(augmentation=self.augmentation, image_size=c.img_size, mean=self.mean, std=self.std,
                           text_len=c.text_len)
