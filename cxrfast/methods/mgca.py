"""MGCA (Wang et al., NeurIPS 2022, "Multi-Granularity Cross-modal Alignment"; HKU-MedAI/MGCA
`mgca/models/mgca/mgca_module.py`) as a method: image-report contrastive learning at three levels.

- instance: InfoNCE between the image's [CLS] and the report's [CLS] embeddings (T 0.07, both ways);
- token: each word attends over the patches and each patch over the words (T 0.1); a word (patch)
  is contrasted against the attended outputs of the other words (patches) of its sample, weighted
  by the last layer's [CLS] attention, clipped to its 10th..90th percentile;
- prototype: Sinkhorn-Knopp assignments (3 iterations, epsilon 0.05, over all ranks' samples) of
  both embeddings to 500 unit-norm prototypes, each modality predicting the other's (T 0.2).
Loss = lambda_instance * instance + lambda_local * (word + patch) + lambda_proto * prototype.

Batches: the `mgca` augmentation for training (long side 256, zero pad, random crop 224) and
`mgca_eval` for validation (center crop), with the report ids padded to 112. The text is MGCA's
caption as the shards store it (`method.text=mgca_caption`: impression + findings as lower-case
words, `cxrfast.shards.reports.mgca_caption`); `findings_impression` and `report` are the
alternatives. A sample without that text (no report, or a caption MGCA leaves out) takes part in
no loss (see `cxrfast.models.mgca_losses`): the published code drops such studies from its dataset.

Prototypes are renormalised to unit rows after every optimizer step on the fp32 master weights
the optimizer holds (the published code renormalises the module's weight at each forward; under
DeepSpeed bf16 an edit of the module's weight alone is overwritten at the next step), and get
zero gradients during the first `freeze_prototypes_epochs` epochs.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig, StepContext
from cxrfast.methods.mae import PIXEL_NORMS, request_pixel_norm, resolve_pixel_norm
from cxrfast.models.mgca import BatchNormFP32, ImageEncoder, Projection, ReportEncoder
from cxrfast.models.mgca_losses import clipped_weights, instance_loss, local_loss, prototype_loss, sinkhorn
from cxrfast.shards.schema import TEXTS
from cxrfast.shards.shard_set import ShardSet

log = logging.getLogger(__name__)

TEXT_ENCODER_DIR = "text_encoder"


@dataclass(kw_only=True)
class MGCAMethodConfig(MethodConfig):
    """MGCA: ViT image encoder + BERT report encoder, instance/token/prototype alignment."""

    image_encoder: str = "vit_base_patch16"  # ViT in cxrfast.models.registry.ENCODERS
    img_size: int | None = None  # input side; None = the encoder's default (224)
    text_model: str | None = None  # local Hugging Face BERT folder to start from (e.g. Bio_ClinicalBERT); None = random init
    text_layers: int = 6  # BERT layers (the first ones of text_model)
    text_width: int = 768  # random init only: BERT hidden size
    text_heads: int = 12  # random init only: attention heads
    text_intermediate: int = 3072  # random init only: FFN width
    text_max_positions: int = 512  # random init only: position embeddings
    text: str = "mgca_caption"  # report text (cxrfast.shards.schema.TEXTS): MGCA's caption; findings_impression, report
    text_len: int = 112  # report tokens per sample (padded / truncated)
    emb_dim: int = 128  # width of the global and local embeddings
    proj_hidden: int = 2048  # hidden width of the projection heads
    temp_instance: float = 0.07  # instance-level InfoNCE temperature
    temp_local: float = 0.1  # token-level alignment temperature
    temp_proto: float = 0.2  # prototype swapped-prediction temperature
    num_prototypes: int = 500  # prototypes
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations
    sinkhorn_eps: float = 0.05  # Sinkhorn-Knopp epsilon
    freeze_prototypes_epochs: int = 1  # epochs during which the prototypes get zero gradients
    lambda_instance: float = 1.0  # weight of the instance loss
    lambda_local: float = 1.0  # weight of the token-level loss (word + patch)
    lambda_proto: float = 1.0  # weight of the prototype loss
    gather_negatives: bool = False  # instance negatives from all ranks (published: this rank's batch only)
    word_attn_shift: bool = True  # published: a word is weighted by the [CLS] attention one token after its pieces
    normalize_patch_context: bool = False  # published (ViT): the words attended by a patch are not re-normalised
    decay_all: bool = True  # published: weight decay on every parameter (biases, norms, prototypes too)
    pixel_norm: str = "published"  # published: mean/std below; shards: each shard folder's measured statistics
    mean: float = 0.5  # pixel mean on the 0..1 scale (pixel_norm=published; torchvision Normalize(0.5, 0.5))
    std: float = 0.5  # pixel std on the 0..1 scale (pixel_norm=published)

    def __post_init__(self) -> None:
        for name in ("temp_instance", "temp_local", "temp_proto", "sinkhorn_eps", "std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"method.{name} must be > 0, got {getattr(self, name)}")
        for name in ("text_layers", "text_width", "text_heads", "text_intermediate", "emb_dim", "proj_hidden",
                     "num_prototypes", "sinkhorn_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_len < 3 or self.text_len > self.text_max_positions:
            raise ValueError(f"method.text_len must be in [3, text_max_positions={self.text_max_positions}], "
                             f"got {self.text_len}")
        if self.freeze_prototypes_epochs < 0:
            raise ValueError(f"method.freeze_prototypes_epochs must be >= 0, got {self.freeze_prototypes_epochs}")
        if min(self.lambda_instance, self.lambda_local, self.lambda_proto) < 0:
            raise ValueError("method.lambda_instance, lambda_local and lambda_proto must be >= 0")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"method.pixel_norm must be one of {PIXEL_NORMS}, got {self.pixel_norm!r}")
        if self.text not in TEXTS:
            raise ValueError(f"method.text must be one of {sorted(TEXTS)}, got {self.text!r}")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """Concatenation over ranks of equal-shaped `x` (autograd flows back to this rank's part when `grad`)."""
    import torch.distributed as dist

    if grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class MGCA(Method):
    """The networks (`image`, `text`, the four projection heads, `prototypes`) and the losses."""

    name: ClassVar[str] = "mgca"
    config_cls: ClassVar[type[MethodConfig]] = MGCAMethodConfig

    def __init__(self, cfg: MGCAMethodConfig, *, text: ReportEncoder, mean: float, std: float,
                 tokenizer_file: Path | None = None, special_tokens: dict[str, str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean, self.std = mean, std
        self.image = ImageEncoder(cfg.image_encoder, cfg.img_size)
        self.text = text
        d, h, e = self.image.width, self.text.width, cfg.emb_dim
        self.img_global = Projection(d, cfg.proj_hidden, e)
        self.img_local = Projection(d, cfg.proj_hidden, e)
        self.txt_global = Projection(h, cfg.proj_hidden, e)
        self.txt_local = Projection(h, cfg.proj_hidden, e)
        self.prototypes = nn.Linear(e, cfg.num_prototypes, bias=False)
        self.prototypes_frozen = cfg.freeze_prototypes_epochs > 0
        self.tokenizer_file = tokenizer_file  # exported with the text encoder
        self.special_tokens = special_tokens or {}

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> MGCA:
        from cxrfast.models.mgca import check_text_folder, check_text_tokenizer, pretrained_bert, random_bert
        from cxrfast.models.text_encoder import wordpiece_continuation

        assert isinstance(cfg, MGCAMethodConfig)
        shards.require_text(f"method {cls.name!r}", cfg.text)
        special = shards.special_ids
        if "sep" not in special:
            raise ValueError(f"{shards.tokenizer_path}: the shards' tokenizer has no [SEP]; MGCA's word aggregation "
                             "ends each report at [SEP] (use a BERT tokenizer, e.g. `cxrfast shard mimic --tokenizer`)")
        vocab_size = int(shards.tokenizer_info["vocab_size"])
        if cfg.text_model is not None:
            path = check_text_folder(Path(cfg.text_model))
            check_text_tokenizer(path, shards.vocab, shards.tokenizer_path)
            bert = pretrained_bert(path, layers=cfg.text_layers)
            if bert.config.vocab_size < vocab_size or bert.config.max_position_embeddings < cfg.text_len:
                raise ValueError(f"method.text_model={path}: vocab_size {bert.config.vocab_size} / max positions "
                                 f"{bert.config.max_position_embeddings} cannot take the shards' {vocab_size} tokens "
                                 f"/ text_len {cfg.text_len}")
        else:
            bert = random_bert(vocab_size=vocab_size, pad_id=special["pad"], width=cfg.text_width,
                               layers=cfg.text_layers, heads=cfg.text_heads, intermediate=cfg.text_intermediate,
                               max_len=cfg.text_max_positions)
        text = ReportEncoder(bert, continuation=wordpiece_continuation(shards.vocab, bert.config.vocab_size),
                             sep_id=special["sep"], shift_attention=cfg.word_attn_shift)
        mean, std = resolve_pixel_norm(cfg, shards)
        by_id = {i: t for t, i in shards.vocab.items()}
        method = cls(cfg, text=text, mean=mean, std=std, tokenizer_file=shards.tokenizer_path,
                     special_tokens={k: by_id[i] for k, i in special.items() if i in by_id})
        if cfg.init is not None:
            method.load_image_init(Path(cfg.init))
        return method

    def load_image_init(self, path: Path) -> None:
        """Start the ViT from a local timm/DeiT weights file (`cxrfast.models.init_weights`: the RGB
        patch embedding summed to one channel, another grid's position table resampled; the
        classifier head of the file is reported as unexpected). A ViT tensor the file lacks is an error."""
        from cxrfast.models.init_weights import load_encoder_weights

        report = load_encoder_weights(self.image.vit, path)
        if report.missing:
            raise ValueError(f"method.init={path}: the file lacks {len(report.missing)} tensors of the "
                             f"{self.image.timm_name} encoder ({', '.join(report.missing[:6])}); is it a ViT of this size?")

    # --- contract -------------------------------------------------------------------------
    def data_request(self, split: str) -> DataRequest:
        mean, std = request_pixel_norm(self.cfg)
        return DataRequest(augmentation="mgca" if split == "train" else "mgca_eval",
                           image_size=int(self.image.timm_kwargs["img_size"]), mean=mean, std=std,
                           text_len=self.cfg.text_len, text=self.cfg.text)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch: image [B, 1, S, S], ids / attention_mask [B, text_len] -> total loss and its parts."""
        return self.losses(batch, collective=True)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The losses with this rank's samples only (Sinkhorn and negatives): the trainer's validation
        batches need not line up across ranks (the last ones differ in size or count), so no collective."""
        return self.losses(batch, collective=False)

    def losses(self, batch: dict[str, Any], *, collective: bool) -> dict[str, torch.Tensor]:
        """The three losses; `collective`: Sinkhorn over all ranks' samples (and gathered negatives
        when `gather_negatives`), which needs every rank to call this with equal batch sizes."""
        c = self.cfg
        images, ids, mask = batch["image"], batch["ids"], batch["attention_mask"]
        valid = mask[:, 0] > 0  # the sample has report text
        rank, world = _world()
        distributed = collective and world > 1

        tokens, patch_attn = self.image(images)
        img = F.normalize(self.img_global(tokens[:, 0]), dim=-1)  # [B, E] fp32
        patches = F.normalize(self.img_local(tokens[:, 1:]), dim=-1)  # [B, N, E]
        rep = self.text(ids, mask)
        txt = F.normalize(self.txt_global(rep.report), dim=-1)  # [B, E]
        words = F.normalize(self.txt_local(rep.words), dim=-1)  # [B, L-1, E]

        if c.gather_negatives and distributed:
            grad = torch.is_grad_enabled()
            loss_inst = instance_loss(img, txt, valid, temperature=c.temp_instance, img_all=_gather(img, grad),
                                      txt_all=_gather(txt, grad), valid_all=_gather(valid, False),
                                      offset=rank * img.shape[0])
        else:
            loss_inst = instance_loss(img, txt, valid, temperature=c.temp_instance)

        word_w = clipped_weights(rep.attn, rep.present & (rep.attn > 0))
        loss_word = local_loss(words, patches, None, word_w, valid, temperature=c.temp_local, normalize_context=True)
        patch_w = clipped_weights(patch_attn, torch.ones_like(patch_attn, dtype=torch.bool))
        loss_patch = local_loss(patches, words, rep.present, patch_w, valid, temperature=c.temp_local,
                                normalize_context=c.normalize_patch_context)

        protos = self.prototypes.weight
        if self.prototypes_frozen and self.training:
            protos = protos.detach() + 0.0 * protos  # zero gradient, yet a gradient (ZeRO reduces every parameter)
        img_s, txt_s = img @ protos.float().t(), txt @ protos.float().t()  # [B, K]
        img_codes = sinkhorn(img_s, valid, epsilon=c.sinkhorn_eps, iterations=c.sinkhorn_iters, distributed=distributed)
        txt_codes = sinkhorn(txt_s, valid, epsilon=c.sinkhorn_eps, iterations=c.sinkhorn_iters, distributed=distributed)
        loss_proto = prototype_loss(img_s, txt_s, img_codes, txt_codes, valid, temperature=c.temp_proto)

        parts = {
            "loss_instance": c.lambda_instance * loss_inst,
            "loss_local": c.lambda_local * (loss_word + loss_patch),
            "loss_proto": c.lambda_proto * loss_proto,
        }
        return {"loss": parts["loss_instance"] + parts["loss_local"] + parts["loss_proto"], **parts}

    def flops_per_image(self) -> float:
        """3x the forward matmuls: ViT on 1+N tokens, BERT on text_len, the four heads, the token
        alignment (two [N, W] score and attend products each way, and the [N, N] / [W, W] similarities), the prototypes."""
        c = self.cfg
        n, w, e = self.image.num_patches, c.text_len - 1, c.emb_dim
        heads = (self.img_global.flops_forward(1) + self.img_local.flops_forward(n)
                 + self.txt_global.flops_forward(1) + self.txt_local.flops_forward(w))
        token = 2 * (2 * 2 * n * w * e) + 2 * (n * n + w * w) * e
        proto = 2 * 2 * e * c.num_prototypes
        forward = self.image.flops_forward() + self.text.flops_forward(c.text_len) + heads + token + proto
        return 3.0 * float(forward)

    def encoder_export(self) -> EncoderExport:
        sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in self.image.vit.state_dict().items()}
        return EncoderExport(arch=self.image.timm_name, kwargs=dict(self.image.timm_kwargs), state_dict=sd,
                             mean=self.mean, std=self.std)

    def extra_exports(self, out: Path, shards: ShardSet) -> list[Path]:
        """OUT/text_encoder: the BERT as a Hugging Face folder (config.json, model.safetensors, the
        shards' tokenizer). `transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)`
        loads it strictly (MGCA's BERT has no pooler; without that argument transformers adds an
        untrained one and says so)."""
        return [export_text_encoder(self.text.bert, out / TEXT_ENCODER_DIR, self.tokenizer_file, self.special_tokens)]

    # --- options ------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return set() if self.cfg.decay_all else super().no_weight_decay()

    def fp32_names(self) -> tuple[str, ...]:
        """The projection heads' BatchNorm running statistics (their affine parameters are trainable)."""
        return tuple(f"{n}.running_" for n, m in self.named_modules() if isinstance(m, BatchNormFP32))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.grad_checkpointing = enable
        self.text.set_checkpointing(enable)

    def compile_targets(self) -> list[nn.Module]:
        return list(self.image.vit.blocks)

    # --- hooks --------------------------------------------------------------------------------
    def on_train_start(self, ctx: StepContext) -> None:
        self.normalize_prototypes()

    def on_epoch_start(self, ctx: StepContext) -> None:
        self.prototypes_frozen = ctx.epoch < self.cfg.freeze_prototypes_epochs

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit-norm prototype rows, in the optimizer's fp32 master copy and in the module's weight
        (which the forward reads). DeepSpeed exposes the master copy (`safe_get/set_full_fp32_param`,
        a collective every rank calls) under ZeRO stages 1 and 2; under ZeRO-0 with bf16/fp16 it
        keeps one it does not expose, so that combination is refused (ValueError) rather than
        normalising a copy the next optimizer step overwrites. In fp32 without ZeRO the weight is
        its own master."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        weight = self.prototypes.weight
        master = safe_get_full_fp32_param(weight)
        if master is None and weight.dtype != torch.float32:
            raise ValueError(
                f"method mgca renormalises its prototypes in the optimizer's fp32 master weights, which DeepSpeed "
                f"exposes under ZeRO stages 1 and 2 only; with {weight.dtype} parameters use train.zero_stage=1 or 2 "
                "(one GPU included), or train.precision=fp32"
            )
        unit = F.normalize((weight if master is None else master).float(), dim=1)
        if master is not None:
            safe_set_full_fp32_param(weight, unit)
        weight.copy_(unit.to(weight.dtype))


def export_text_encoder(bert: nn.Module, folder: Path, tokenizer_file: Path | None,
                        special_tokens: dict[str, str]) -> Path:
    """Write `bert` (fp32) and the tokenizer as a Hugging Face folder, through a temp folder + rename."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bert.float().save_pretrained(tmp, safe_serialization=True)
        if tokenizer_file is not None:
            tok = PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_file(str(tokenizer_file)),
                **{f"{k}_token": v for k, v in special_tokens.items() if k in ("pad", "unk", "cls", "sep", "mask")},
            )
            tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported text encoder -> %s", folder)
    return folder
