"""Whole-word masking for masked language modelling on report token ids (BERT's, and MRM's).

`mask_tokens(ids, word_start, prob=..., replace_mask=..., replace_random=..., mask_id=...,
vocab_size=..., special_ids=...)`:

- a word is a `word_start` token followed by its continuation tokens (`word_start` False, e.g.
  WordPiece `##` pieces); special tokens (CLS/SEP/PAD/...) always start a group of their own and
  are never masked; continuation tokens before the first start form one word;
- each word is selected independently with probability `prob` (MRM: 0.5) -> all its tokens are
  masked, or none (Bernoulli per word, like BERT's per-token Bernoulli lifted to words);
- each masked token becomes `[MASK]` with probability `replace_mask`, a random id with probability
  `replace_random`, and stays unchanged otherwise. BERT: 0.8 / 0.1 (/ 0.1 kept). MRM: 1.0 / 0.0,
  always `[MASK]` (its `_random_mask`, util/pretrain_datasets.py:36-53). Random ids are uniform
  over the non-special ids of `[0, vocab_size)`: a special token is never drawn;
- returns `(masked_ids, labels)`, labels = original id where masked, else -100.

Random numbers are drawn with torch on the host side of the kernel, in one fixed order
(`u_word [B, L+1]`, `u_replace [B, L]`, `ranks [B, L]` among the non-special ids),
so both implementations return identical outputs for the same generator state. The Triton kernel
(one program per row) does the rest in one pass: special-token lookup, word index by a prefix sum
of the start flags, the per-word draw, the replacement (rank -> id by stepping over the sorted
special ids) and the labels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_impl

IGNORE_INDEX = -100
_MAX_LEN = 1 << 16


def _validate(
    ids: torch.Tensor,
    word_start: torch.Tensor,
    prob: float,
    replace_mask: float,
    replace_random: float,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
) -> None:
    op = "mask_tokens"
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"{op}: ids must be an int64 [B, L] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if word_start.dtype != torch.bool or word_start.shape != ids.shape:
        raise ValueError(
            f"{op}: word_start must be a bool tensor of ids' shape {tuple(ids.shape)}, "
            f"got {word_start.dtype} {tuple(word_start.shape)}"
        )
    if ids.shape[1] > _MAX_LEN:
        raise ValueError(f"{op}: sequence length {ids.shape[1]} exceeds {_MAX_LEN}")
    for name, p in (("prob", prob), ("replace_mask", replace_mask), ("replace_random", replace_random)):
        if not isinstance(p, (float, int)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{op}: {name} must be in [0, 1], got {p!r}")
    if replace_mask + replace_random > 1.0 + 1e-9:
        raise ValueError(f"{op}: replace_mask + replace_random must be <= 1, got {replace_mask} + {replace_random}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{op}: vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"{op}: mask_id must be an int in [0, {vocab_size}), got {mask_id!r}")
    if special_ids.dim() != 1 or special_ids.dtype != torch.int64:
        raise ValueError(f"{op}: special_ids must be a 1-D int64 tensor, got {special_ids.dtype} {tuple(special_ids.shape)}")
    if special_ids.device.type == "cpu":  # a data check on CUDA would sync the host every step
        sp = special_ids.tolist()
        if sp != sorted(set(sp)) or (sp and not 0 <= sp[0] <= sp[-1] < vocab_size):
            raise ValueError(f"{op}: special_ids must be distinct, ascending and in [0, {vocab_size}), got {sp}")
    if replace_random > 0 and vocab_size - special_ids.numel() < 1:
        raise ValueError(f"{op}: replace_random={replace_random} but every id of the vocabulary is special")


def rank_to_id(ranks: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """Rank among the non-special ids -> the id: step over each special id in ascending order."""
    for sid in special_ids.unbind():
        ranks = torch.where(ranks >= sid, ranks + 1, ranks)
    return ranks


def draw_randoms(
    ids: torch.Tensor, vocab_size: int, special_ids: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u_word [B, L+1], u_replace [B, L], ranks [B, L]: a uniform rank among the V - S non-special
    ids); shared by both implementations."""
    b, length = ids.shape
    u_word = torch.rand(b, length + 1, generator=generator, device=ids.device)
    u_replace = torch.rand(b, length, generator=generator, device=ids.device)
    choices = max(vocab_size - special_ids.numel(), 1)
    ranks = torch.randint(choices, (b, length), generator=generator, device=ids.device, dtype=torch.int64)
    return u_word, u_replace, ranks


def mask_tokens_reference(
    ids: torch.Tensor,
    word_start: torch.Tensor,
    *,
    prob: float,
    replace_mask: float,
    replace_random: float,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the single source of truth."""
    _validate(ids, word_start, prob, replace_mask, replace_random, mask_id, vocab_size, special_ids)
    u_word, u_replace, ranks = draw_randoms(ids, vocab_size, special_ids, generator)
    random_ids = rank_to_id(ranks, special_ids)
    special = torch.isin(ids, special_ids)
    word = torch.cumsum((word_start | special).long(), dim=1)  # [B, L] in [0, L]
    masked = (torch.gather(u_word, 1, word) < prob) & ~special
    labels = torch.where(masked, ids, IGNORE_INDEX)
    out = torch.where(masked & (u_replace < replace_mask + replace_random), random_ids, ids)
    out = torch.where(masked & (u_replace < replace_mask), mask_id, out)
    return out, labels


# --------------------------------------------------------------------------------------- Triton


@triton.jit
def _mask_tokens_kernel(
    ids_ptr,  # [B, L] int64, contiguous
    word_start_ptr,  # [B, L] uint8 (bool viewed), contiguous
    special_ptr,  # [S] int64, distinct, ascending
    u_word_ptr,  # [B, L+1] float32, contiguous
    u_replace_ptr,  # [B, L] float32, contiguous
    ranks_ptr,  # [B, L] int64, contiguous: rank among the non-special ids
    out_ptr,  # [B, L] int64
    labels_ptr,  # [B, L] int64
    L,
    S,
    prob,
    p_mask,
    p_mask_or_random,
    mask_id,
    BLOCK_L: tl.constexpr,
):
    """Program per row: special lookup, word index by prefix sum, per-word draw, replacement, labels."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    ok = offs < L
    ids = tl.load(ids_ptr + row * L + offs, mask=ok, other=0)
    starts = tl.load(word_start_ptr + row * L + offs, mask=ok, other=0) != 0
    rnd = tl.load(ranks_ptr + row * L + offs, mask=ok, other=0)
    special = offs < 0
    for s in range(0, S):
        sid = tl.load(special_ptr + s)
        special = special | (ids == sid)
        rnd = tl.where(rnd >= sid, rnd + 1, rnd)  # rank -> id: step over each special id, ascending
    word = tl.cumsum((starts | special).to(tl.int32), axis=0)
    u_word = tl.load(u_word_ptr + row * (L + 1) + word, mask=ok, other=1.0)
    masked = (u_word < prob) & (~special) & ok
    u = tl.load(u_replace_ptr + row * L + offs, mask=ok, other=1.0)
    out = tl.where(masked & (u < p_mask_or_random), rnd, ids)
    out = tl.where(masked & (u < p_mask), mask_id, out)
    tl.store(out_ptr + row * L + offs, out, mask=ok)
    tl.store(labels_ptr + row * L + offs, tl.where(masked, ids, -100), mask=ok)


def mask_tokens_triton(
    ids: torch.Tensor,
    word_start: torch.Tensor,
    *,
    prob: float,
    replace_mask: float,
    replace_random: float,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton implementation (same torch random draws as the reference)."""
    _validate(ids, word_start, prob, replace_mask, replace_random, mask_id, vocab_size, special_ids)
    specials = special_ids.contiguous()
    u_word, u_replace, ranks = draw_randoms(ids, vocab_size, specials, generator)
    b, length = ids.shape
    ids_c = ids.contiguous()
    out = torch.empty_like(ids_c)
    labels = torch.empty_like(ids_c)
    if ids.numel() == 0:
        return out, labels
    _mask_tokens_kernel[(b,)](
        ids_c, word_start.contiguous().view(torch.uint8), specials if specials.numel() else ids_c,
        u_word, u_replace, ranks, out, labels,
        length, specials.numel(), float(prob), float(replace_mask), float(replace_mask + replace_random), mask_id,
        BLOCK_L=triton.next_power_of_2(length),
    )  # fmt: skip
    return out, labels


def mask_tokens(
    ids: torch.Tensor,
    word_start: torch.Tensor,
    *,
    prob: float,
    replace_mask: float,
    replace_random: float,
    mask_id: int,
    vocab_size: int,
    special_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-word masking of ids [B, L] -> (masked_ids [B, L], labels [B, L], -100 = not masked).

    word_start [B, L] bool marks the first token of each word; special_ids (1-D int64, distinct and
    ascending, include the pad id; checked on CPU tensors) are never masked and never drawn as
    random replacements. A masked token becomes
    `mask_id` with probability `replace_mask`, a random non-special id with `replace_random`, and
    stays itself otherwise (BERT: 0.8, 0.1; MRM: 1.0, 0.0). `impl`: "auto" (Triton on CUDA, else
    reference), "triton", "reference"; both give identical outputs for the same generator state.
    """
    kwargs = dict(
        prob=prob, replace_mask=replace_mask, replace_random=replace_random, mask_id=mask_id,
        vocab_size=vocab_size, special_ids=special_ids, generator=generator,
    )  # fmt: skip
    if resolve_impl(impl, ids, word_start, special_ids, op="mask_tokens") == "triton":
        return mask_tokens_triton(ids, word_start, **kwargs)
    return mask_tokens_reference(ids, word_start, **kwargs)
