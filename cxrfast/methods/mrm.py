"""MRM (Zhou et al., ICLR 2023) as a method: MAE on the image + masked language modelling on the
report (`cxrfast.models.mrm`). Batches: the `mrm` augmentation (448 crop -> 224 encoder input and
448 target, the target kept fp32; report ids). Loss = image loss + text loss.

The defaults are MRM's published code (RL4M/MRM-pytorch; docs/recipes.md lists each knob and its
source line): the whole report, whole words masked at 50% and always written as [MASK], the MLM loss
over every position, MRM's BERT init and untied MLM decoder, MRM's sin-cos tables, and shards large
enough that the 448 crops are not upsampled. The published run starts from MAE's ImageNet encoder
(`mae_pretrain_vit_base.pth`), which the user passes as `method.init` (nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cxrfast.methods.base import DataRequest, MethodConfig
from cxrfast.methods.mae import MAE, MAEMethodConfig, resolve_pixel_norm
from cxrfast.pipelines.resolution import POLICIES
from cxrfast.shards.schema import TEXTS
from cxrfast.shards.shard_set import ShardSet

#: `cxrfast.models.text_encoder.TEXT_INITS` (not imported: configs and presets load without transformers)
TEXT_INITS = ("bert", "mrm")


@dataclass(kw_only=True)
class MRMMethodConfig(MAEMethodConfig):
    """MAE options (448 target, 32x32 target patches) + the report branch. Defaults: MRM's published code."""

    arch: str = "mrm_vit_base_patch16"  # network in cxrfast.models.MODELS
    mean: float = 0.4978  # MRM's Normalize(mean=[0.4978]) on all three gray channels (main_pretrain.py:132)
    std: float = 0.2449
    pos_embed: str = "mrm"  # MRM's util/pos_embed.py tables (decoder; the encoder's comes from `init` when it has one)
    text: str = "report"  # the report text the MLM reads: report (the whole report, MRM's) | findings_impression
    mlm_prob: float = 0.5  # share of report words masked (whole-word masking)
    mlm_replace_mask: float = 1.0  # share of masked tokens written as [MASK] (MRM 1.0; BERT 0.8)
    mlm_replace_random: float = 0.0  # share replaced by a random non-special id (MRM 0.0; BERT 0.1); the rest kept
    mlm_all_positions: bool = True  # MRM's MLM loss at every position against the unmasked ids, padding included; false = masked tokens only
    text_init: str = "mrm"  # BERT init: mrm (xavier on every Linear, model_mrm.py:87-97) | bert (transformers')
    text_tie_decoder: bool = False  # MLM decoder tied to the word embeddings (BERT); MRM's is untied
    on_small_shards: str = "error"  # shards whose long side upsamples the 448 crops: error (naming the size to re-shard at) | warn

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"method.mlm_prob must be in (0, 1), got {self.mlm_prob}")
        if min(self.mlm_replace_mask, self.mlm_replace_random) < 0 or self.mlm_replace_mask + self.mlm_replace_random > 1:
            raise ValueError(f"method.mlm_replace_mask ({self.mlm_replace_mask}) and mlm_replace_random "
                             f"({self.mlm_replace_random}) must be >= 0 and sum to <= 1")
        if self.text not in TEXTS:
            raise ValueError(f"method.text must be one of {sorted(TEXTS)}, got {self.text!r}")
        if self.text_init not in TEXT_INITS:
            raise ValueError(f"method.text_init must be one of {TEXT_INITS}, got {self.text_init!r}")
        if self.on_small_shards not in POLICIES:
            raise ValueError(f"method.on_small_shards must be one of {POLICIES}, got {self.on_small_shards!r}")


class MRM(MAE):
    """MAE image branch + BERT MLM report branch; the vocabulary comes from the shards' tokenizer."""

    name: ClassVar[str] = "mrm"
    config_cls: ClassVar[type[MethodConfig]] = MRMMethodConfig
    augmentation: ClassVar[str] = "mrm"
    fp32_outputs: ClassVar[tuple[str, ...]] = ("target",)

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> MRM:
        from cxrfast.models import MODELS, text_kwargs_from_shards
        from cxrfast.pipelines.resolution import require_target_resolution

        assert isinstance(cfg, MRMMethodConfig)
        shards.require_text(f"method {cls.name!r}", cfg.text)
        if cfg.arch in MODELS:  # before the network is built (an unknown arch is build_model's error)
            require_target_resolution(shards, cls.augmentation, image_size=MODELS[cfg.arch].value("img_size"),
                                      on_too_small=cfg.on_small_shards, switch="method.on_small_shards=warn")
        mean, std = resolve_pixel_norm(cfg, shards)
        method = cls(cfg, mean=mean, std=std, mlm_prob=cfg.mlm_prob, mlm_replace_mask=cfg.mlm_replace_mask,
                     mlm_replace_random=cfg.mlm_replace_random, mlm_all_positions=cfg.mlm_all_positions,
                     text_init=cfg.text_init, text_tie_decoder=cfg.text_tie_decoder, **text_kwargs_from_shards(shards))
        return method.init_encoder()

    def data_request(self, split: str) -> DataRequest:
        c = self.net.cfg
        return DataRequest(augmentation=self.augmentation, image_size=c.img_size, **self.pixel_request(),
                           text_len=c.text_len, text=self.cfg.text, fp32_outputs=self.fp32_outputs)
