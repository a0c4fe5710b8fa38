"""The model registry: an explicit dict from name to (model class, config class, preset).

`build_model(name, **overrides)` fills the config dataclass from the preset plus the overrides
(unknown keys are an error) and builds the model. A new family (e.g. MGCA, MoCo-CXR) adds its
module with a `PretrainModel` subclass and a config dataclass, and its entries here; the
trainer only sees `build_model` and the `PretrainModel` interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cxrfast.models.base import PretrainModel
from cxrfast.models.mae import MAEConfig, MaskedAutoencoder
from cxrfast.models.mrm import MaskedRecordModel, MRMConfig

#: ViT encoders (timm names they export to).
ENCODERS: dict[str, dict[str, Any]] = {
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, timm_name="vit_small_patch16_224"),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, timm_name="vit_base_patch16_224"),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, timm_name="vit_large_patch16_224"),
    # CPU tests: timm's vit_tiny name, its dims overridden through `timm_kwargs`.
    "vit_tiny_test": dict(
        img_size=64, embed_dim=64, depth=2, num_heads=4, patch_size=16, timm_name="vit_tiny_patch16_224"
    ),
}

#: MAE decoders: width, blocks, heads.
DECODERS: dict[str, dict[str, Any]] = {
    "dec512d8b": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "dec512d2b": dict(decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16),
    "dec768d4b": dict(decoder_embed_dim=768, decoder_depth=4, decoder_num_heads=6),  # MRM's
    "dec32d1b_test": dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
}

_TINY_TEXT = dict(text_width=32, text_depth=2, text_heads=2, text_intermediate=64)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: `model_cls(config_cls(**{**preset, **overrides}))`."""

    model_cls: type[PretrainModel]
    config_cls: type
    preset: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def options(self) -> list[str]:
        """The keyword arguments `build_model` accepts for this entry."""
        return sorted(f.name for f in dataclasses.fields(self.config_cls) if f.init)

    def value(self, name: str) -> Any:
        """The config field `name` this entry builds with when not overridden: the preset's, else the default."""
        if name in self.preset:
            return self.preset[name]
        fields = {f.name: f for f in dataclasses.fields(self.config_cls) if f.init}
        if name not in fields or fields[name].default is dataclasses.MISSING:
            raise ValueError(f"{self.config_cls.__name__} has no field {name!r} with a default")
        return fields[name].default


MODELS: dict[str, ModelSpec] = {
    "mae_vit_small_patch16": ModelSpec(
        MaskedAutoencoder, MAEConfig, {**ENCODERS["vit_small_patch16"], **DECODERS["dec512d2b"]},
        "MAE ViT-S/16, 2-block 512-wide decoder (MAE-CXR ViT-S)",
    ),
    "mae_vit_base_patch16": ModelSpec(
        MaskedAutoencoder, MAEConfig, {**ENCODERS["vit_base_patch16"], **DECODERS["dec512d8b"]},
        "MAE ViT-B/16, 8-block 512-wide decoder (MAE-CXR ViT-B)",
    ),
    "mae_vit_large_patch16": ModelSpec(
        MaskedAutoencoder, MAEConfig, {**ENCODERS["vit_large_patch16"], **DECODERS["dec512d8b"]},
        "MAE ViT-L/16, 8-block 512-wide decoder",
    ),
    "mrm_vit_base_patch16": ModelSpec(
        MaskedRecordModel, MRMConfig, {**ENCODERS["vit_base_patch16"], **DECODERS["dec768d4b"]},
        "MRM: MAE ViT-B/16 (448 target, 32x32 patches) + 6-layer 384-wide BERT MLM",
    ),
    "mae_vit_tiny_test": ModelSpec(
        MaskedAutoencoder, MAEConfig, {**ENCODERS["vit_tiny_test"], **DECODERS["dec32d1b_test"]},
        "tiny MAE for CPU tests (64x64 input, 2 blocks of 64)",
    ),
    "mrm_vit_tiny_test": ModelSpec(
        MaskedRecordModel, MRMConfig, {**ENCODERS["vit_tiny_test"], **DECODERS["dec32d1b_test"], **_TINY_TEXT},
        "tiny MRM for CPU tests (64 input, 128 target, 2-layer 32-wide BERT)",
    ),
}


def build_model(name: str, **overrides: Any) -> PretrainModel:
    """Build registry model `name`; `overrides` replace preset/config fields (unknown keys: ValueError)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    unknown = sorted(set(overrides) - set(spec.options()))
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it accepts: {', '.join(spec.options())}")
    return spec.model_cls(spec.config_cls(**{**spec.preset, **overrides}))
