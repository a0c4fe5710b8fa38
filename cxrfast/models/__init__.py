"""Pre-training models (timm ViT blocks, transformers BERT) behind one registry.

    from cxrfast.models import build_model, MODELS
    model = build_model("mae_vit_base_patch16", mask_ratio=0.9)
    out = model({"image": images})          # {"loss", "loss_image"}
    load_encoder_weights(model, "mae_pretrain_vit_base.pth")   # init the encoder from a local file
"""

from cxrfast.models.base import PretrainModel
from cxrfast.models.init_weights import InitReport, load_encoder_weights
from cxrfast.models.mae import MAEConfig, MaskedAutoencoder
from cxrfast.models.mrm import MaskedRecordModel, MRMConfig
from cxrfast.models.registry import MODELS, ModelSpec, build_model
from cxrfast.models.text_encoder import text_kwargs_from_shards

__all__ = [
    "MODELS",
    "InitReport",
    "MAEConfig",
    "MRMConfig",
    "MaskedAutoencoder",
    "MaskedRecordModel",
    "ModelSpec",
    "PretrainModel",
    "build_model",
    "load_encoder_weights",
    "text_kwargs_from_shards",
]
