"""Named pre-training runs (presets) with the published hyperparameters (see docs/recipes.md).

- MAE-CXR (Xiao et al., arXiv 2210.12843; lambert-x/medical_mae PRETRAIN.md): mask 0.90, no
  norm-pix loss, 800 epochs, 40 warmup, blr 1.5e-4, wd 0.05, AdamW (0.9, 0.95), 8 GPUs x 256
  = global batch 2048.
- MRM (Zhou et al., ICLR 2023; RL4M/MRM-pytorch run.sh): mask 0.75, norm-pix loss, 200 epochs,
  40 warmup, blr 1.5e-4, wd 0.05, 4 GPUs x 32 x 2 accumulation = global batch 256; 50% MLM.
  The micro-batch here is 64 (the 12 GB-per-card goal); accumulation follows from the world size.
- MoCo-CXR (Sowrirajan et al., CHIL 2021 / MIDL 2021; stanfordmlgroup/MoCo-CXR main_moco.py,
  moco/builder.py, aihc_utils/image_transform.py and scripts/training_scripts/r8w1n416.sh): MoCo v2
  with the MLP head, dim 128, queue 24,576, momentum 0.999, T 0.2; Adam (0.9, 0.999) lr 1e-4, L2
  weight decay 1e-4 on every parameter; 20 epochs, lr x0.1 at epochs 12, 18, 24 (`--schedule`),
  no warmup; batch 16 on one GPU; checkpoint every epoch; images normalised with mean 0.5020, std
  0.085585. The published runs start from ImageNet: pass a local weights file with
  `method.init=PATH` (timm or torchvision resnet18/resnet50/densenet121; nothing is downloaded).
  On N ranks keep the global batch at 16 (`batch_size=16/N`) or change `queue_size` with it.
- MGCA (Wang et al., NeurIPS 2022; HKU-MedAI/MGCA mgca_module.py): ViT-B/16 + 6-layer BERT on
  MGCA's caption (impression + findings as words), 112 tokens, embeddings 128, T 0.07 / 0.1 / 0.2,
  500 prototypes (Sinkhorn 3 iterations, eps 0.05, frozen for the first epoch), AdamW lr 2e-5
  betas (0.9, 0.999) wd 0.05 on every parameter,
  warmup 40% of the steps (20 of 50 epochs) then cosine to 1e-8, 2 GPUs x 72 = global batch 144,
  validation loss every epoch, early stop after 5 without improvement, the best epoch exported.
  The published run starts from DeiT-B and Bio_ClinicalBERT: `method.init=DEIT_FILE
  method.text_model=BIO_CLINICALBERT_FOLDER` (shards built with `--tokenizer` that folder).
- tiny_mae / tiny_mrm / tiny_moco / tiny_mgca: test-sized runs for CPU tests and the README demo.

`lr = blr * global batch / 256` is resolved at start-up, once the world size is known.
"""

from __future__ import annotations

import copy

from cxrfast.config import DataConfig, OptimConfig, RunConfig, TrainConfig
from cxrfast.methods.mae import MAEMethodConfig
from cxrfast.methods.mgca import MGCAMethodConfig
from cxrfast.methods.moco import MoCoMethodConfig
from cxrfast.methods.mrm import MRMMethodConfig

_MAE_OPTIM = dict(name="adamw", blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), schedule="warmup_cosine")
_MOCO_OPTIM = dict(epochs=20, name="adam", lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), schedule="step",
                   milestones=(12, 18, 24), gamma=0.1, warmup_epochs=0)
_MOCO_TRAIN = dict(batch_size=16, global_batch_size=16, ckpt_every_epochs=1)


def _moco_cxr(name: str, arch: str) -> RunConfig:
    """A MoCo-CXR run: the published settings differ between backbones only in the backbone."""
    return RunConfig(preset=name, method=MoCoMethodConfig(arch=arch), optim=OptimConfig(**_MOCO_OPTIM),
                     train=TrainConfig(**_MOCO_TRAIN))


_TINY_OPTIM = dict(epochs=4, warmup_epochs=1, blr=1.5e-4, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
_TINY_TRAIN = dict(batch_size=4, log_every=2, ckpt_every_epochs=0)
_MGCA_OPTIM = dict(name="adamw", lr=2e-5, weight_decay=0.05, betas=(0.9, 0.999), schedule="warmup_cosine", min_lr=1e-8)
_MGCA_SELECT = dict(validate_every_epochs=1, early_stop_patience=5, select="best")

PRESETS: dict[str, RunConfig] = {
    "mae_cxr_vits": RunConfig(
        preset="mae_cxr_vits",
        method=MAEMethodConfig(arch="mae_vit_small_patch16", mask_ratio=0.90, norm_pix_loss=False, pixel_norm="shards"),
        optim=OptimConfig(epochs=800, warmup_epochs=40, **_MAE_OPTIM),
        train=TrainConfig(batch_size=256, global_batch_size=2048, ckpt_every_epochs=20),
    ),
    "mae_cxr_vitb": RunConfig(
        preset="mae_cxr_vitb",
        method=MAEMethodConfig(arch="mae_vit_base_patch16", mask_ratio=0.90, norm_pix_loss=False, pixel_norm="shards"),
        optim=OptimConfig(epochs=800, warmup_epochs=40, **_MAE_OPTIM),
        train=TrainConfig(batch_size=256, global_batch_size=2048, ckpt_every_epochs=20),
    ),
    "mrm_vitb": RunConfig(
        preset="mrm_vitb",
        method=MRMMethodConfig(arch="mrm_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, mlm_prob=0.5,
                               pixel_norm="shards"),
        optim=OptimConfig(epochs=200, warmup_epochs=40, **_MAE_OPTIM),
        train=TrainConfig(batch_size=64, global_batch_size=256, ckpt_every_epochs=20),
    ),
    "mgca_vitb": RunConfig(
        preset="mgca_vitb",
        method=MGCAMethodConfig(image_encoder="vit_base_patch16"),
        optim=OptimConfig(epochs=50, warmup_epochs=20, **_MGCA_OPTIM),
        train=TrainConfig(batch_size=72, global_batch_size=144, ckpt_every_epochs=1, **_MGCA_SELECT),
    ),
    "tiny_mae": RunConfig(
        preset="tiny_mae",
        method=MAEMethodConfig(arch="mae_vit_tiny_test", mask_ratio=0.75, norm_pix_loss=True, pixel_norm="shards"),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(**_TINY_OPTIM),
        train=TrainConfig(**_TINY_TRAIN),
    ),
    "tiny_mrm": RunConfig(
        preset="tiny_mrm",
        method=MRMMethodConfig(arch="mrm_vit_tiny_test", mask_ratio=0.75, norm_pix_loss=True, mlm_prob=0.5,
                               pixel_norm="shards"),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(**_TINY_OPTIM),
        train=TrainConfig(**_TINY_TRAIN),
    ),
    **{name: _moco_cxr(name, arch) for name, arch in
       (("moco_cxr_r18", "resnet18"), ("moco_cxr_r50", "resnet50"), ("moco_cxr_d121", "densenet121"))},
    "tiny_moco": RunConfig(
        preset="tiny_moco",
        method=MoCoMethodConfig(arch="resnet18", image_size=64, queue_size=32, dim=16),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(epochs=4, name="adam", lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.999), schedule="step",
                          milestones=(3,), gamma=0.1),
        train=TrainConfig(**_TINY_TRAIN),
    ),
    "tiny_mgca": RunConfig(
        preset="tiny_mgca",
        method=MGCAMethodConfig(image_encoder="vit_tiny_test", text_width=32, text_layers=2, text_heads=2,
                                text_intermediate=64, text_max_positions=128, emb_dim=16, proj_hidden=32,
                                num_prototypes=20),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(**{**_TINY_OPTIM, "betas": (0.9, 0.999)}),
        train=TrainConfig(**_TINY_TRAIN, validate_every_epochs=1, early_stop_patience=2, select="best"),
    ),
}


def get_preset(name: str) -> RunConfig:
    """A fresh copy of the named preset (callers may change it freely)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
