"""MRM (Zhou et al., ICLR 2023, "Masked Record Modeling"): MAE on the image + MLM on the report.

The ViT encoder sees the 224 image with 75% of its patches removed; the decoder predicts the
32x32 patches of the same crop at 448 (`target_scale=2`). The report branch is a small BERT
whose every token embedding gets the mean visible-patch feature (projected D -> text width);
its MLM loss trains the image encoder too. Total loss = image loss + text loss.

Shapes as in `cxrfast.models.mae`, plus L report length, H text width, V vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrfast.kernels import mask_tokens
from cxrfast.models.mae import MAEConfig, MaskedAutoencoder, check_batch
from cxrfast.models.text_encoder import FEATURE_AT, TEXT_INITS, ReportMLM
from cxrfast.shards.schema import REQUIRED_SPECIAL


@dataclass(kw_only=True)
class MRMConfig(MAEConfig):
    """MRM = MAE options (defaults: ViT-B/16, 768-wide 4-block 6-head decoder, mask 0.75,
    448 target) + the report branch. vocab_size, special_ids and wordpiece_continuation come
    from the shards' tokenizer: `build_model(name, **text_kwargs_from_shards(shards))`."""

    decoder_embed_dim: int = 768
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    target_scale: int = 2
    vocab_size: int | None = None  #: the shards' tokenizer vocabulary size (required)
    special_ids: dict[str, int] | None = None  #: {"pad","unk","cls","mask"[,"sep"]} -> id (required)
    wordpiece_continuation: torch.Tensor | None = field(default=None, repr=False)  #: [V] bool, '##' tokens
    mlm_prob: float = 0.5  #: whole-word masking probability
    #: share of masked tokens written as [MASK] (BERT 0.8; MRM's code 1.0: pretrain_datasets.py:49-51)
    mlm_replace_mask: float = 0.8
    #: share of masked tokens replaced by a random non-special id (BERT 0.1; MRM's code 0.0); rest kept
    mlm_replace_random: float = 0.1
    #: published MRM: cross-entropy against the unmasked ids at every position, [CLS] and padding
    #: included (labels = ids, no -100: pretrain_datasets.py:96-99, bert/bert.py:190-191)
    mlm_all_positions: bool = False
    text_width: int = 384  #: BERT hidden size H
    text_depth: int = 6  #: BERT layers
    text_heads: int = 6  #: BERT attention heads
    text_intermediate: int = 1536  #: BERT FFN width
    text_len: int = 100  #: max report length (BERT position embeddings); also the FLOP count's L
    text_dropout: float = 0.1  #: BERT hidden and attention dropout
    text_feature_at: str = "embeddings_out"  #: where the image feature is added (see ReportMLM)
    text_init: str = "bert"  #: BERT weights' init, "bert" | "mrm" (MRM's xavier on every Linear; see TEXT_INITS)
    text_tie_decoder: bool = True  #: MLM decoder = word embeddings (BERT); MRM's published head is untied

    def __post_init__(self) -> None:
        super().__post_init__()
        hint = "pass the shards' tokenizer: build_model(name, **text_kwargs_from_shards(shards_dir))"
        if self.vocab_size is None or self.special_ids is None or self.wordpiece_continuation is None:
            raise ValueError(f"MRM needs vocab_size, special_ids and wordpiece_continuation; {hint}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        missing = set(REQUIRED_SPECIAL) - set(self.special_ids)
        if missing:
            raise ValueError(f"special_ids lacks {sorted(missing)} (got {self.special_ids}); {hint}")
        bad = {k: v for k, v in self.special_ids.items() if not 0 <= int(v) < self.vocab_size}
        if bad:
            raise ValueError(f"special_ids {bad} outside the vocabulary [0, {self.vocab_size})")
        wc = self.wordpiece_continuation
        if not isinstance(wc, torch.Tensor) or wc.dtype != torch.bool or wc.shape != (self.vocab_size,):
            got = (wc.dtype, tuple(wc.shape)) if isinstance(wc, torch.Tensor) else type(wc).__name__
            raise ValueError(f"wordpiece_continuation must be a bool tensor [{self.vocab_size}], got {got}")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"mlm_prob must be in (0, 1), got {self.mlm_prob}")
        if min(self.mlm_replace_mask, self.mlm_replace_random) < 0 or self.mlm_replace_mask + self.mlm_replace_random > 1:
            raise ValueError(
                f"mlm_replace_mask ({self.mlm_replace_mask}) and mlm_replace_random ({self.mlm_replace_random}) "
                "must be >= 0 and sum to <= 1"
            )
        if self.text_init not in TEXT_INITS:
            raise ValueError(f"text_init must be one of {TEXT_INITS}, got {self.text_init!r}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        if self.text_feature_at not in FEATURE_AT:
            raise ValueError(f"text_feature_at must be one of {FEATURE_AT}, got {self.text_feature_at!r}")


class MaskedRecordModel(MaskedAutoencoder):
    """MAE image branch (448 target) + BERT MLM report branch fed the mean visible-patch feature."""

    augmentation: ClassVar[str] = "mrm"
    needs_reports: ClassVar[bool] = True

    def __init__(self, cfg: MRMConfig) -> None:
        super().__init__(cfg)
        self.cfg: MRMConfig = cfg
        assert cfg.vocab_size is not None and cfg.special_ids is not None  # checked by MRMConfig
        self.text_proj = nn.Linear(cfg.embed_dim, cfg.text_width)  # mean visible feature D -> H
        nn.init.xavier_uniform_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)
        self.text = ReportMLM(
            vocab_size=cfg.vocab_size,
            pad_id=cfg.special_ids["pad"],
            hidden=cfg.text_width,
            layers=cfg.text_depth,
            heads=cfg.text_heads,
            intermediate=cfg.text_intermediate,
            max_len=cfg.text_len,
            dropout=cfg.text_dropout,
            feature_at=cfg.text_feature_at,
            init=cfg.text_init,
            tie_decoder=cfg.text_tie_decoder,
        )
        specials = sorted({int(v) for v in cfg.special_ids.values()})
        self.register_buffer("special_id_list", torch.tensor(specials, dtype=torch.int64), persistent=False)
        self.register_buffer("wordpiece_continuation", cfg.wordpiece_continuation.clone(), persistent=False)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward_report(
        self, latent: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """latent [B, 1+K, D] (encoder output), ids [B, L] int64, attention_mask [B, L] -> MLM loss (scalar).

        The mean over the visible patch tokens (cls excluded), projected to H, is added to every
        token embedding; whole words are masked with probability `mlm_prob`, each masked token written
        as [MASK] / a random id / itself with `mlm_replace_mask` / `mlm_replace_random` / the rest."""
        if ids.shape != attention_mask.shape or ids.ndim != 2:
            raise ValueError(f"ids {tuple(ids.shape)} and attention_mask {tuple(attention_mask.shape)} must be [B, L]")
        feature = self.text_proj(latent[:, 1:].mean(dim=1))  # [B, H]
        valid = attention_mask.bool()
        word_start = valid & ~self.wordpiece_continuation[ids]
        masked_ids, labels = mask_tokens(
            ids,
            word_start,
            prob=self.cfg.mlm_prob,
            replace_mask=self.cfg.mlm_replace_mask,
            replace_random=self.cfg.mlm_replace_random,
            mask_id=self.cfg.special_ids["mask"],
            vocab_size=self.cfg.vocab_size,
            special_ids=self.special_id_list,
            impl=self.impl,
        )
        if self.cfg.mlm_all_positions:
            labels = ids  # the published code: every position, padding included
        logits = self.text(masked_ids, attention_mask, feature)  # [B, L, V]
        return mlm_loss(logits, labels)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {"image": [B, C, H, W], "target": [B, C, 2H, 2W], "ids": [B, L], "attention_mask": [B, L]}
        -> {"loss", "loss_image", "loss_text"}."""
        check_batch(batch, ("image", "target", "ids", "attention_mask"), self.augmentation)
        latent, mask, ids_restore = self.forward_encoder(batch["image"])
        pred = self.forward_decoder(latent, ids_restore)  # [B, N, (2p)^2 C]
        loss_image = self.forward_loss(batch["target"], pred, mask)
        loss_text = self.forward_report(latent, batch["ids"], batch["attention_mask"])
        return {"loss": loss_image + loss_text, "loss_image": loss_image, "loss_text": loss_text}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.text.set_checkpointing(enable)

    def flops_per_image(self) -> float:
        """3x forward: image branch + projection + BERT over `text_len` tokens + MLM head on every position."""
        c = self.cfg
        text = 2 * c.embed_dim * c.text_width + self.text.flops_forward(c.text_len)
        return 3.0 * (self.image_flops_forward() + text)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions with label != -100 (0 when there are none; no host sync).

    logits [B, L, V] (any float dtype: no fp32 copy of the [B, L, V] tensor is made; the
    per-token losses are summed in fp32), labels [B, L] int64."""
    labels = labels.flatten()
    per_token = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="none")
    count = (labels != -100).sum().clamp(min=1)
    return per_token.float().sum() / count
