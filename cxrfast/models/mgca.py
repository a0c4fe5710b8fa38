"""MGCA's networks (Wang et al., NeurIPS 2022; HKU-MedAI/MGCA `models/backbones/encoder.py`).

- `ImageEncoder`: a timm ViT (1 channel); returns all tokens after the final norm (CLS = global
  feature, patches = local features) and the last block's [CLS]->patch attention, computed here
  because timm's fused attention does not return its weights.
- `ReportEncoder`: a transformers `BertModel`; returns the report feature ([CLS]), the word
  features (word pieces summed into words, vectorised) and each word's [CLS] attention from the
  last layer, exactly as the published `aggregate_tokens` lays them out.
- `Projection`: MGCA's global/local embedding head Linear-BN-ReLU-Linear-BN(no affine), on
  features [.., C]; BatchNorm statistics over every row (all tokens for local features).
- Text model loading: random init, or the first layers of a local Hugging Face BERT folder whose
  tokenizer must be the one the shards' ids were made with (`check_text_tokenizer`).

Shapes: B batch, N patches, L text length, D ViT width, H BERT width, E embedding width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrfast.models.mae import vit_block_flops
from cxrfast.models.registry import ENCODERS
from cxrfast.models.text_encoder import bert_layer_flops, set_hf_checkpointing

log = logging.getLogger(__name__)

_NEG = torch.finfo(torch.float32).min


# --- projection heads ----------------------------------------------------------------------
class BatchNormFP32(nn.BatchNorm1d):
    """BatchNorm1d computed in fp32 whatever the input and parameter dtype (under bf16 DeepSpeed
    keeps the affine parameters bf16; keep the running statistics fp32 through `fp32_names`).
    Returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.batch_norm(x.float(), self.running_mean, self.running_var, w, b,
                            self.training or not self.track_running_stats, self.momentum, self.eps)


class Projection(nn.Module):
    """Linear(C, hidden) -> BN -> ReLU -> Linear(hidden, E) -> BN without affine (MGCA's
    GlobalEmbedding, and LocalEmbedding whose 1x1 convolutions are these Linears per token).
    [..., C] -> [..., E] fp32; the BatchNorm statistics run over all leading positions."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn1 = BatchNormFP32(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.bn2 = BatchNormFP32(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = F.relu(self.bn1(self.fc1(x.reshape(-1, x.shape[-1]))))
        out = self.bn2(self.fc2(h.to(self.fc2.weight.dtype)))
        return out.reshape(*lead, -1)

    def flops_forward(self, rows: int) -> float:
        return 2.0 * rows * (self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features)


# --- image -----------------------------------------------------------------------------------
def image_encoder_kwargs(name: str, img_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """(timm name, timm kwargs) of the ViT `name` in `cxrfast.models.registry.ENCODERS`, 1 channel, no head."""
    if name not in ENCODERS:
        raise ValueError(f"unknown image encoder {name!r}; choose one of {sorted(ENCODERS)}")
    spec = dict(ENCODERS[name])
    timm_name = spec.pop("timm_name")
    kwargs = dict(img_size=img_size or spec.pop("img_size", 224), patch_size=spec["patch_size"], in_chans=1,
                  embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=4.0,
                  num_classes=0)
    return timm_name, kwargs


@torch.no_grad()
def vit_cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention of [CLS] (token 0) over the patches in timm ViT `block`, heads averaged.

    x [B, 1+N, D] is the block's input -> [B, N] fp32 (softmax over all 1+N tokens, then the
    [CLS] column dropped, as MGCA reads `attention_map[:, :, 0, 1:]`). Only the [CLS] query and the
    keys are projected, so this costs about a third of the block's qkv projection on one row.
    """
    attn = block.attn
    b, t, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    width = heads * hd
    h = block.norm1(x)
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], w[:width], None if bias is None else bias[:width])
    k = F.linear(h, w[width:2 * width], None if bias is None else bias[width:2 * width])
    q = attn.q_norm(q.view(b, 1, heads, hd).transpose(1, 2))
    k = attn.k_norm(k.view(b, t, heads, hd).transpose(1, 2))
    scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, heads, 1, 1+N]
    return scores.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


class ImageEncoder(nn.Module):
    """timm VisionTransformer (`self.vit`, exported as is) + the last block's [CLS] attention."""

    def __init__(self, name: str, img_size: int | None = None) -> None:
        import timm

        super().__init__()
        self.timm_name, self.timm_kwargs = image_encoder_kwargs(name, img_size)
        self.vit = timm.create_model(self.timm_name, pretrained=False, **self.timm_kwargs)
        self.grad_checkpointing = False

    @property
    def width(self) -> int:
        return int(self.timm_kwargs["embed_dim"])

    @property
    def num_patches(self) -> int:
        return (self.timm_kwargs["img_size"] // self.timm_kwargs["patch_size"]) ** 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 1, S, S] -> (tokens [B, 1+N, D] after the final norm, cls_attn [B, N] fp32)."""
        from timm.models import checkpoint_seq

        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        body, last = vit.blocks[:-1], vit.blocks[-1]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint_seq(body, x)
        else:
            x = body(x)
        cls_attn = vit_cls_attention(last, x)
        return vit.norm(last(x)), cls_attn

    def flops_forward(self) -> float:
        k = self.timm_kwargs
        n = self.num_patches
        patch_embed = 2 * n * k["in_chans"] * k["patch_size"] ** 2 * k["embed_dim"]
        return float(patch_embed + k["depth"] * vit_block_flops(n + 1, k["embed_dim"], k["mlp_ratio"]))


# --- text --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordFeatures:
    """A report encoded as MGCA lays it out: slot 0 of the aggregation is the [CLS] word, slots
    1..L-1 the following words (then zeros)."""

    report: torch.Tensor  # [B, H] the [CLS] slot
    words: torch.Tensor  # [B, L-1, H] word features (sum of their pieces), 0 after the last word
    attn: torch.Tensor  # [B, L-1] fp32, each word's [CLS] attention (sum over its pieces), 0 after
    present: torch.Tensor  # [B, L-1] bool, True on the slots that hold a word


@torch.no_grad()
def bert_cls_attention(self_attn: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[CLS]'s attention over all tokens in a transformers `BertSelfAttention`, heads averaged.
    hidden [B, L, H] (the layer's input), mask [B, L] (1 = token) -> [B, L] fp32; 0 on padding."""
    b, n, _ = hidden.shape
    heads, hd = self_attn.num_attention_heads, self_attn.attention_head_size
    q = self_attn.query(hidden[:, :1]).view(b, 1, heads, hd).transpose(1, 2).float()
    k = self_attn.key(hidden).view(b, n, heads, hd).transpose(1, 2).float()
    scores = (q @ k.transpose(-2, -1)) * self_attn.scaling  # [B, heads, 1, L]
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], _NEG)
    return scores.softmax(dim=-1)[:, :, 0].mean(dim=1)


def aggregate_word_pieces(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cls_attn: torch.Tensor,
    continuation: torch.Tensor,
    *,
    sep_id: int,
    shift_attention: bool = True,
) -> WordFeatures:
    """Sum word pieces into words, as MGCA's `BertEncoder.aggregate_tokens` does, without loops.

    hidden [B, L, H], ids [B, L], mask [B, L] (1 = token), cls_attn [B, L] ([CLS] attention per
    token), continuation [V] bool ('##' pieces). The published walk, reproduced:
    - it visits tokens 0..L-2 (it zips the L tokens with the L-1 attentions [CLS]->tokens 1..L-1);
    - a token that is not a '##' piece starts a new word; [SEP] is a word of its own and ends
      the walk; a word still open when the walk ends without [SEP] (a report that fills all L
      tokens) is dropped;
    - `shift_attention` (published): the walk pairs token i with the attention to token i+1, so a
      word's weight is the attention to the tokens one position after its pieces (and [SEP]'s is
      the attention to the padding after it, 0). False pairs each token with its own attention.
    The sum runs as one batched matmul with a [B, L, L] one-hot word<-token assignment.
    """
    b, n, _ = hidden.shape
    pos = torch.arange(n, device=ids.device)
    is_sep = ids == sep_id
    seps_before = torch.cumsum(is_sep.int(), dim=1) - is_sep.int()
    visited = (pos < n - 1)[None, :] & (seps_before == 0) & mask.bool()
    start = visited & (~continuation[ids] | is_sep | (pos == 0)[None, :])
    word = torch.cumsum(start.int(), dim=1) - 1  # [B, L] word index of each token
    started = start.sum(dim=1)
    ended = (is_sep & visited).any(dim=1)
    n_words = torch.where(ended, started, (started - 1).clamp_min(0))  # [B]
    keep = visited & (word < n_words[:, None])
    assign = (word[:, None, :] == pos[None, :, None]) & keep[:, None, :]  # [B, word slot, token]
    feats = torch.bmm(assign.to(hidden.dtype), hidden)  # [B, L, H]
    token_attn = cls_attn.float()
    if shift_attention:
        token_attn = torch.cat([token_attn[:, 1:], token_attn.new_zeros(b, 1)], dim=1)
    attn = torch.bmm(assign.float(), token_attn[:, :, None])[:, :, 0]  # [B, L]
    present = pos[None, 1:] < n_words[:, None]
    return WordFeatures(report=feats[:, 0], words=feats[:, 1:], attn=attn[:, 1:], present=present)


class ReportEncoder(nn.Module):
    """transformers `BertModel` (`self.bert`, exported as a Hugging Face folder) + the word
    aggregation and the last layer's [CLS] attention."""

    def __init__(self, bert: nn.Module, *, continuation: torch.Tensor, sep_id: int, shift_attention: bool) -> None:
        super().__init__()
        self.bert = bert
        self.register_buffer("continuation", continuation.bool(), persistent=False)
        self.sep_id = int(sep_id)
        self.shift_attention = shift_attention
        self.checkpointing = False

    @property
    def width(self) -> int:
        return int(self.bert.config.hidden_size)

    def set_checkpointing(self, enable: bool) -> None:
        if enable != self.checkpointing:
            set_hf_checkpointing(self.bert, enable)
            self.checkpointing = enable

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> WordFeatures:
        """ids, mask [B, L] int -> `WordFeatures`."""
        from transformers.masking_utils import create_bidirectional_mask

        bert = self.bert
        if ids.shape[1] > bert.config.max_position_embeddings:
            raise ValueError(f"report length {ids.shape[1]} exceeds the text model's "
                             f"max_position_embeddings {bert.config.max_position_embeddings}")
        h = bert.embeddings(input_ids=ids)
        # A materialised mask: letting transformers test `attention_mask.all()` would sync the host.
        ext = create_bidirectional_mask(config=bert.config, inputs_embeds=h, attention_mask=mask,
                                        allow_is_bidirectional_skip=False)
        layers = bert.encoder.layer
        for layer in layers[:-1]:
            h = layer(h, ext)
        cls_attn = bert_cls_attention(layers[-1].attention.self, h, mask)
        h = layers[-1](h, ext)
        return aggregate_word_pieces(h, ids, mask, cls_attn, self.continuation, sep_id=self.sep_id,
                                     shift_attention=self.shift_attention)

    def flops_forward(self, tokens: int) -> float:
        c = self.bert.config
        return float(c.num_hidden_layers * bert_layer_flops(tokens, c.hidden_size, c.intermediate_size))


# --- text model: random init or a local Hugging Face folder ----------------------------------
def random_bert(*, vocab_size: int, pad_id: int, width: int, layers: int, heads: int, intermediate: int,
                max_len: int, dropout: float = 0.1) -> nn.Module:
    """A randomly initialised BertModel without pooler (SDPA attention)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_len, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=pad_id, attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False)


def check_text_folder(path: Path) -> Path:
    """The folder of a local Hugging Face BERT (config.json + weights); FileNotFoundError / ValueError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"method.text_model={path}: no such folder (a local Hugging Face model folder, e.g. "
            "Bio_ClinicalBERT, with config.json, the weights and the tokenizer)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"method.text_model={path}: the folder holds no config.json (not a Hugging Face model folder)")
    weights = [p for pat in ("*.safetensors", "pytorch_model*.bin") for p in path.glob(pat)]
    if not weights:
        raise ValueError(f"method.text_model={path}: the folder holds no weights (*.safetensors or pytorch_model.bin)")
    return path


def check_text_tokenizer(path: Path, shards_vocab: dict[str, int], shards_tokenizer: Path) -> None:
    """ValueError unless the tokenizer in `path` (tokenizer.json or vocab.txt) has exactly the
    shards' vocabulary (token -> id): the shards' `ids.i32` must be this model's token ids."""
    from cxrfast.shards.tokenize import load_tokenizer

    try:
        vocab = load_tokenizer(path).get_vocab(with_added_tokens=True)
    except ValueError as e:
        raise ValueError(f"method.text_model={path}: cannot read its tokenizer to check it against the shards' "
                         f"({e})") from None
    if vocab == shards_vocab:
        return
    differ = sorted(t for t in set(vocab) | set(shards_vocab) if vocab.get(t) != shards_vocab.get(t))
    examples = ", ".join(f"{t!r}: model {vocab.get(t)} / shards {shards_vocab.get(t)}" for t in differ[:5])
    raise ValueError(
        f"method.text_model={path}: its tokenizer ({len(vocab)} tokens) is not the one the shards' report ids "
        f"were made with ({shards_tokenizer}, {len(shards_vocab)} tokens); {len(differ)} tokens differ "
        f"(e.g. {examples}). Rebuild the shards with `cxrfast shard mimic --tokenizer {path}`, or train the text "
        "encoder from scratch (method.text_model=none)"
    )


def pretrained_bert(path: Path, *, layers: int) -> nn.Module:
    """The first `layers` layers of the BERT in `path` (no pooler, fp32, SDPA). Unused weights
    of the folder (later layers, pooler, pre-training heads) are logged; a missing weight is an error."""
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "bert":
        raise ValueError(f"method.text_model={path}: config.json has model_type {config.model_type!r}, expected 'bert'")
    if layers > config.num_hidden_layers:
        raise ValueError(f"method.text_layers={layers} but {path} has only {config.num_hidden_layers} layers")
    model, info = BertModel.from_pretrained(
        path, num_hidden_layers=layers, add_pooling_layer=False, attn_implementation="sdpa", dtype=torch.float32,
        local_files_only=True, output_loading_info=True,
    )
    if info["missing_keys"] or info.get("mismatched_keys"):
        raise ValueError(f"method.text_model={path}: weights missing for {sorted(info['missing_keys'])[:8]} "
                         f"(mismatched: {info.get('mismatched_keys')}); is it a BERT checkpoint?")
    log.info("text model: first %d of %d layers of %s (%d weights of the folder unused)", layers,
             config.num_hidden_layers, path, len(info["unexpected_keys"]))
    return model
