"""MRM's report branch: a small BERT (transformers) whose token embeddings carry an image feature.

Shapes: B batch, L text length, H BERT width, V vocabulary size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxrfast.shards.shard_set import ShardsArg, open_shard_set

FEATURE_AT = ("embeddings_out", "word_embeddings")
#: How the BERT's weights start: "bert" = transformers' BERT init (every Linear and Embedding
#: N(0, 0.02), LayerNorm 1/0); "mrm" = MRM's published model: its `initialize_weights` applies
#: xavier-uniform (bias 0) to every nn.Linear of the whole model, the BERT's included
#: (model_mrm.py:87-97 after BertEncoder() at :63); embeddings keep BERT's N(0, 0.02).
TEXT_INITS = ("bert", "mrm")


def set_hf_checkpointing(model: nn.Module, enable: bool) -> None:
    """transformers' own activation checkpointing (non-reentrant) on or off, for its 4.x and 5.x APIs."""
    kwargs = {"use_reentrant": False}
    new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5
    if enable and new_api:
        model.activation_checkpointing_enable(kwargs)
    elif enable:
        model.gradient_checkpointing_enable(kwargs)
    elif new_api:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def bert_layer_flops(tokens: int, hidden: int, intermediate: int) -> float:
    """Forward matmul FLOPs of one BERT layer: q, k, v, scores, attn@v, output, FFN in and out."""
    t, h = tokens, hidden
    return 2 * t * h * 3 * h + 4 * t * t * h + 2 * t * h * h + 4 * t * h * intermediate


class ReportMLM(nn.Module):
    """BERT encoder + MLM head (transformers `BertForMaskedLM`, random init, SDPA attention) with an
    extra per-sample feature added to every token.

    `feature_at="embeddings_out"` adds the feature to BertEmbeddings' output (after its LayerNorm),
    as MRM's published code does; `"word_embeddings"` adds it to the word embeddings, before the
    position/type embeddings and the LayerNorm. `init`: see TEXT_INITS. `tie_decoder`: the MLM
    decoder shares the word embeddings (BERT). MRM's published head is untied: `MyBertMaskedLM`
    (bert/bert.py:141-143) replaces `self.bert` after `BertForMaskedLM.__init__` tied the decoder to
    the embeddings it throws away, so the decoder keeps a [V, H] weight of its own.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        pad_id: int,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 6,
        intermediate: int = 1536,
        max_len: int = 100,
        dropout: float = 0.1,
        feature_at: str = "embeddings_out",
        init: str = "bert",
        tie_decoder: bool = True,
    ) -> None:
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        if feature_at not in FEATURE_AT:
            raise ValueError(f"feature_at must be one of {FEATURE_AT}, got {feature_at!r}")
        if init not in TEXT_INITS:
            raise ValueError(f"init must be one of {TEXT_INITS}, got {init!r}")
        self.feature_at = feature_at
        self.checkpointing = False
        self.config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_len,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=pad_id,
            tie_word_embeddings=tie_decoder,
            attn_implementation="sdpa",
        )
        self.mlm = BertForMaskedLM(self.config)
        tied = self.mlm.cls.predictions.decoder.weight is self.mlm.bert.embeddings.word_embeddings.weight
        if tied != tie_decoder:
            raise RuntimeError(f"transformers {'did not tie' if tie_decoder else 'tied'} the MLM decoder to the word embeddings")
        if init == "mrm":
            decoder = self.mlm.cls.predictions.decoder
            for m in self.mlm.modules():
                if isinstance(m, nn.Linear) and not (tied and m is decoder):  # a tied decoder is the embedding
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def set_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing of the BERT layers (transformers' own, non-reentrant)."""
        if enable != self.checkpointing:
            set_hf_checkpointing(self.mlm, enable)
            self.checkpointing = enable

    @property
    def max_len(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """ids [B, L] int64 (already masked), attention_mask [B, L] (1 = token, 0 = pad),
        feature [B, H] -> MLM logits [B, L, V]."""
        from transformers.masking_utils import create_bidirectional_mask

        if ids.shape[1] > self.max_len:
            raise ValueError(f"report length {ids.shape[1]} exceeds the text branch's max_len {self.max_len}")
        bert = self.mlm.bert
        if self.feature_at == "word_embeddings":
            emb = bert.embeddings(inputs_embeds=bert.embeddings.word_embeddings(ids) + feature[:, None, :])
        else:
            emb = bert.embeddings(input_ids=ids) + feature[:, None, :]  # [B, L, H]
        # A materialised mask: letting transformers test `attention_mask.all()` would sync the host.
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=emb, attention_mask=attention_mask, allow_is_bidirectional_skip=False
        )
        hidden = bert.encoder(emb, attention_mask=mask).last_hidden_state  # [B, L, H]
        return self.mlm.cls(hidden)  # [B, L, V]

    def flops_forward(self, tokens: int) -> float:
        """Forward matmul FLOPs for one report of `tokens` tokens (MLM head over every position)."""
        c = self.config
        layers = c.num_hidden_layers * bert_layer_flops(tokens, c.hidden_size, c.intermediate_size)
        head = 2 * tokens * c.hidden_size * c.hidden_size + 2 * tokens * c.hidden_size * c.vocab_size
        return float(layers + head)


def wordpiece_continuation(vocab: dict[str, int], vocab_size: int | None = None) -> torch.Tensor:
    """[V] bool, True for WordPiece continuation tokens ('##...')."""
    size = vocab_size if vocab_size is not None else max(vocab.values()) + 1
    out = torch.zeros(size, dtype=torch.bool)
    for token, idx in vocab.items():
        if idx >= size:
            raise ValueError(f"token {token!r} has id {idx} >= vocab_size {size}")
        if token.startswith("##"):
            out[idx] = True
    return out


def text_kwargs_from_shards(shards: ShardsArg) -> dict[str, Any]:
    """`vocab_size`, `special_ids` and `wordpiece_continuation` for an MRM model, read from a
    shard folder's manifest.json and tokenizer.json (the tokenizer the `ids.i32` were made with);
    several folders must share that tokenizer (`ShardSet`)."""
    folder = open_shard_set(shards)
    vocab_size = int(folder.tokenizer_info["vocab_size"])
    return {
        "vocab_size": vocab_size,
        "special_ids": folder.special_ids,
        "wordpiece_continuation": wordpiece_continuation(folder.vocab, vocab_size),
    }
