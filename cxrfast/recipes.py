"""Named pre-training recipes with the published hyperparameters (see DESIGN.md).

- MAE-CXR (Xiao et al., arXiv 2210.12843; lambert-x/medical_mae PRETRAIN.md): mask 0.90, no
  norm-pix loss, 800 epochs, 40 warmup, blr 1.5e-4, wd 0.05, AdamW (0.9, 0.95), 8 GPUs x 256
  = global batch 2048.
- MRM (Zhou et al., ICLR 2023; RL4M/MRM-pytorch run.sh): mask 0.75, norm-pix loss, 200 epochs,
  40 warmup, blr 1.5e-4, wd 0.05, 4 GPUs x 32 x 2 accumulation = global batch 256; 50% MLM.
  The micro-batch here is 64 (the 12 GB-per-card goal); accumulation follows from the world size.
- tiny_mae / tiny_mrm: test-sized models for CPU tests and the README demo.

`lr = blr * global batch / 256` is resolved at start-up, once the world size is known.
"""

from __future__ import annotations

import copy

from cxrfast.config import Config, DataConfig, ModelConfig, OptimConfig, TextConfig, TrainConfig

RECIPES: dict[str, Config] = {
    "mae_cxr_vits": Config(
        recipe="mae_cxr_vits",
        model=ModelConfig(name="mae_vit_small_patch16", mask_ratio=0.90, norm_pix_loss=False),
        optim=OptimConfig(epochs=800, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05),
        train=TrainConfig(batch_size=256, global_batch_size=2048, ckpt_every_epochs=20),
    ),
    "mae_cxr_vitb": Config(
        recipe="mae_cxr_vitb",
        model=ModelConfig(name="mae_vit_base_patch16", mask_ratio=0.90, norm_pix_loss=False),
        optim=OptimConfig(epochs=800, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05),
        train=TrainConfig(batch_size=256, global_batch_size=2048, ckpt_every_epochs=20),
    ),
    "mrm_vitb": Config(
        recipe="mrm_vitb",
        model=ModelConfig(name="mrm_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True),
        text=TextConfig(mlm_prob=0.5),
        optim=OptimConfig(epochs=200, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05),
        train=TrainConfig(batch_size=64, global_batch_size=256, ckpt_every_epochs=20),
    ),
    "tiny_mae": Config(
        recipe="tiny_mae",
        model=ModelConfig(name="mae_vit_tiny_test", mask_ratio=0.75, norm_pix_loss=True),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(epochs=4, warmup_epochs=1, blr=1.5e-4, lr=1e-3, weight_decay=0.05),
        train=TrainConfig(batch_size=4, log_every=2, ckpt_every_epochs=0),
    ),
    "tiny_mrm": Config(
        recipe="tiny_mrm",
        model=ModelConfig(name="mrm_vit_tiny_test", mask_ratio=0.75, norm_pix_loss=True),
        text=TextConfig(mlm_prob=0.5),
        data=DataConfig(num_threads=2),
        optim=OptimConfig(epochs=4, warmup_epochs=1, blr=1.5e-4, lr=1e-3, weight_decay=0.05),
        train=TrainConfig(batch_size=4, log_every=2, ckpt_every_epochs=0),
    ),
}


def get_recipe(name: str) -> Config:
    """A fresh copy of the named recipe (callers may change it freely)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
