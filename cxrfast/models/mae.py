"""Masked autoencoder (He et al., MAE) for single-channel chest X-rays, from timm's ViT blocks.

Shapes: B batch, C = in_chans, H = W = img_size, p = patch_size, N = (H/p)**2 patches,
K = int(N * (1 - mask_ratio)) visible patches, D encoder width, Dd decoder width,
P = (p * target_scale)**2 * C values predicted per patch.

Masking and the masked-patch loss go through `cxrfast.kernels` (fused Triton kernels on CUDA
when `fused=True`, their plain-PyTorch references otherwise). Attention goes through
`F.scaled_dot_product_attention` (timm's fused attention, forced on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from cxrfast.kernels import masked_patch_mse, random_masking
from cxrfast.models.base import PretrainModel
from cxrfast.models.pos_embed import VARIANTS as POS_EMBED_VARIANTS
from cxrfast.models.pos_embed import sincos_2d


@dataclass(kw_only=True)
class MAEConfig:
    """Architecture and loss options of a masked autoencoder (defaults: ViT-B/16, dec512d8b)."""

    img_size: int = 224  #: encoder input side (pixels); square images
    patch_size: int = 16  #: encoder patch side
    in_chans: int = 1  #: image channels (X-rays: 1)
    embed_dim: int = 768  #: encoder width D
    depth: int = 12  #: encoder blocks
    num_heads: int = 12  #: encoder attention heads
    mlp_ratio: float = 4.0  #: MLP hidden width / block width (encoder and decoder)
    decoder_embed_dim: int = 512  #: decoder width Dd
    decoder_depth: int = 8  #: decoder blocks
    decoder_num_heads: int = 16  #: decoder attention heads
    mask_ratio: float = 0.75  #: fraction of patches removed from the encoder input
    norm_pix_loss: bool = True  #: normalise each target patch by its own mean/std
    target_scale: int = 1  #: the target image is this many times the input side (MRM: 2)
    fused: bool = True  #: kernels impl "auto" (Triton on CUDA) instead of "reference"
    grad_checkpointing: bool = False  #: recompute block activations in backward
    timm_name: str = "vit_base_patch16_224"  #: timm architecture the encoder exports to
    #: fixed sin-cos tables of encoder and decoder: "mae" (MAE's) or "mrm" (MRM's util/pos_embed.py,
    #: see `cxrfast.models.pos_embed`); an init checkpoint's pos_embed replaces the encoder's
    pos_embed: str = "mae"

    def __post_init__(self) -> None:
        if self.pos_embed not in POS_EMBED_VARIANTS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_VARIANTS}, got {self.pos_embed!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for width, heads, what in (
            (self.embed_dim, self.num_heads, "encoder"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder"),
        ):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")
            if width % 4:
                raise ValueError(f"{what} width {width} must be divisible by 4 (2-D sin-cos embedding)")
        for name in ("in_chans", "depth", "decoder_depth", "target_scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible(self) -> int:
        """K, the visible-patch count (the kernels' `int(N * (1 - ratio))`, at least 1)."""
        return max(1, int(self.num_patches * (1 - self.mask_ratio)))


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of one pre-norm ViT block on `tokens` tokens (2 FLOPs per MAC).

    qkv 2*T*D*3D, scores q@k^T 2*T*T*D, attn@v 2*T*T*D, proj 2*T*D*D, MLP 2 * 2*T*D*(r*D).
    """
    t, d, hidden = tokens, dim, int(dim * mlp_ratio)
    return 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * hidden


def _make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """MAE's blocks: timm `Block` with qkv bias, LayerNorm eps 1e-6, attention through SDPA."""
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for _ in range(depth)
    )
    for blk in blocks:
        blk.attn.fused_attn = True  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
    return blocks


class MaskedAutoencoder(PretrainModel):
    """MAE with a ViT encoder over visible patches and a light ViT decoder over all patches."""

    augmentation: ClassVar[str] = "mae"
    needs_reports: ClassVar[bool] = False

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.timm_name = cfg.timm_name
        self.impl = "auto" if cfg.fused else "reference"
        self.grad_checkpointing = cfg.grad_checkpointing
        d, dd, n = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches
        self.pred_patch = cfg.patch_size * cfg.target_scale

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", self._sincos(d), persistent=False)
        self._pos_embed_fp32: torch.Tensor | None = None  # the table from an init checkpoint, if any
        self.blocks = _make_blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)

        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", self._sincos(dd), persistent=False)
        self.decoder_blocks = _make_blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.pred_patch**2 * cfg.in_chans)
        assert self.pos_embed.shape == (1, n + 1, d)
        self._init_image_weights()

    # --- init ------------------------------------------------------------------------------
    def _sincos(self, dim: int) -> torch.Tensor:
        """The configured fixed table [1, 1+N, dim] (cls row zero), fp32."""
        return sincos_2d(dim, self.cfg.grid_size, cls_token=True, variant=self.cfg.pos_embed)[None]

    def set_encoder_pos_embed(self, table: torch.Tensor) -> None:
        """Use `table` [1, 1+N, D] (an init checkpoint's, e.g. MAE's ImageNet encoder) as the encoder's
        position table instead of the sin-cos one; the export writes it too. The buffer stays
        non-persistent: apply the init again before loading a checkpoint of this run."""
        if table.shape != self.pos_embed.shape:
            raise ValueError(f"pos_embed table {tuple(table.shape)} does not fit the encoder's {tuple(self.pos_embed.shape)}")
        self._pos_embed_fp32 = table.detach().float().cpu().clone()
        with torch.no_grad():
            self.pos_embed.copy_(table)

    def encoder_pos_embed_fp32(self) -> torch.Tensor:
        """The encoder's position table in fp32 (the buffer may have been cast to bf16 for training)."""
        return self._pos_embed_fp32 if self._pos_embed_fp32 is not None else self._sincos(self.cfg.embed_dim)

    def _init_image_weights(self) -> None:
        """MAE's init: xavier-uniform Linear (and patch projection as a Linear), N(0, .02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.blocks, self.norm, self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                     self.decoder_pred):
            part.apply(_init_linear_layernorm)

    # --- patches ---------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor, patch: int | None = None) -> torch.Tensor:
        """imgs [B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] in MAE's (p, q, c) order; p defaults to the patch size."""
        p = patch or self.cfg.patch_size
        b, c, h, w = imgs.shape
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a multiple of patch {p}")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, patch: int | None = None) -> torch.Tensor:
        """x [B, N, p*p*C] -> imgs [B, C, sqrt(N)*p, sqrt(N)*p] (inverse of `patchify`)."""
        p = patch or self.cfg.patch_size
        b, n, pp_c = x.shape
        g = math.isqrt(n)
        c = pp_c // (p * p)
        if g * g != n or c * p * p != pp_c:
            raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch {p}")
        x = x.reshape(b, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, c, g * p, g * p)

    # --- encoder / decoder -------------------------------------------------------------------
    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for blk in blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            for blk in blocks:
                x = blk(x)
        return x

    def _check_image(self, imgs: torch.Tensor, side: int, what: str) -> None:
        expected = (self.cfg.in_chans, side, side)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"{what}: expected [B, {', '.join(map(str, expected))}], got {tuple(imgs.shape)}")

    def _embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> patch tokens [B, N, D], the input cast to the weights' dtype (an fp32 image
        that is also the loss target reaches a bf16 network unchanged)."""
        return self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype))

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [B, C, H, W] -> (latent [B, 1+K, D] (cls first), mask [B, N] (1 = removed), ids_restore [B, N])."""
        self._check_image(imgs, self.cfg.img_size, "encoder input")
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        x = self._embed(imgs)  # [B, N, D]
        pos = self.pos_embed.to(x.dtype)  # the fixed table is an fp32 buffer; activations may be bf16
        masked = random_masking(x, pos[:, 1:], ratio, generator, impl=self.impl)  # x: [B, K, D]
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, masked.x], dim=1)
        x = self.norm(self._run_blocks(self.blocks, x))
        return x, masked.mask, masked.ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder: imgs [B, C, H, W] -> [B, 1+N, D], the same as timm's `forward_features`."""
        self._check_image(imgs, self.cfg.img_size, "encoder input")
        x = self._embed(imgs)
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, 1:]
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self._run_blocks(self.blocks, x))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D], ids_restore [B, N] -> pred [B, N, P] in original patch order."""
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        b, k1, dd = x.shape
        n = ids_restore.shape[1]
        fill = self.mask_token.expand(b, n + 1 - k1, dd)  # [B, N-K, Dd]
        x_ = torch.cat([x[:, 1:], fill], dim=1)  # shuffled order: visible first
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle -> [B, N, Dd]
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)  # [B, 1+N, Dd]
        x = self.decoder_norm(self._run_blocks(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:]  # drop cls -> [B, N, P]

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target [B, C, S*p', S*p'] (p' = patch * target_scale), pred [B, N, P], mask [B, N] -> scalar MSE
        over removed patches (per-patch normalised target when norm_pix_loss)."""
        self._check_image(target, self.cfg.img_size * self.cfg.target_scale, "target")
        return masked_patch_mse(pred, target, mask, self.pred_patch, self.cfg.norm_pix_loss, impl=self.impl)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {"image": [B, C, H, W]} -> {"loss", "loss_image"}."""
        check_batch(batch, ("image",), self.augmentation)
        imgs = batch["image"]
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "loss_image": loss}

    # --- trainer interface ---------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
            depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, num_classes=0,
        )

    def image_flops_forward(self) -> float:
        """Forward matmul FLOPs of the image branch for one image."""
        c = self.cfg
        n, k, d, dd = c.num_patches, c.num_visible, c.embed_dim, c.decoder_embed_dim
        patch_embed = 2 * n * (c.in_chans * c.patch_size**2) * d  # all patches are embedded, then masked
        encoder = c.depth * vit_block_flops(k + 1, d, c.mlp_ratio)
        decoder_embed = 2 * (k + 1) * d * dd
        decoder = c.decoder_depth * vit_block_flops(n + 1, dd, c.mlp_ratio)
        pred = 2 * (n + 1) * dd * self.pred_patch**2 * c.in_chans
        return float(patch_embed + encoder + decoder_embed + decoder + pred)

    def flops_per_image(self) -> float:
        """Training FLOPs per image: 3x the forward matmuls (encoder on 1+K tokens, decoder on 1+N)."""
        return 3.0 * self.image_flops_forward()

    def no_weight_decay(self) -> set[str]:
        """Biases, norm weights (every parameter with ndim <= 1) and the cls/mask tokens.
        (The fixed sin-cos position embeddings are buffers, not parameters.)"""
        return {
            name for name, p in self.named_parameters()
            if p.ndim <= 1 or name in ("cls_token", "mask_token")
        }

    def encoder_tensors(self) -> dict[str, torch.Tensor]:
        """The live encoder tensors under timm `VisionTransformer` names: patch_embed.proj.*, cls_token,
        pos_embed [1, 1+N, D] (the fixed-table buffer, cls row included), blocks.i.*, norm.*
        (`cxrfast.models.init_weights` loads a checkpoint into these)."""
        sd: dict[str, torch.Tensor] = {"cls_token": self.cls_token, "pos_embed": self.pos_embed}
        for prefix, module in (("patch_embed.", self.patch_embed), ("blocks.", self.blocks), ("norm.", self.norm)):
            for name, t in module.state_dict(keep_vars=True).items():
                sd[prefix + name] = t
        return sd

    def encoder_state_dict_timm(self) -> dict[str, torch.Tensor]:
        """`encoder_tensors()` as fp32, contiguous, detached copies, pos_embed in full precision."""
        sd = {**self.encoder_tensors(), "pos_embed": self.encoder_pos_embed_fp32()}
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}

    def extra_repr(self) -> str:
        fields = ((k, getattr(self.cfg, k)) for k in (f.name for f in dataclasses.fields(self.cfg)))
        return ", ".join(f"{k}={v}" for k, v in fields if isinstance(v, (bool, int, float, str)))


def check_batch(batch: dict[str, torch.Tensor], keys: tuple[str, ...], augmentation: str) -> None:
    """ValueError naming the missing batch keys (the loader augmentation that provides them is `augmentation`)."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing} (has {sorted(batch)}); this model needs the {augmentation!r} augmentation")


def _init_linear_layernorm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
