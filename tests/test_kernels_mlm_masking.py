"""mask_tokens: Triton kernel (CPU interpreter) vs the PyTorch reference; whole-word statistics of
BERT's 80/10/10 and of MRM's always-[MASK] replacement; random replacements never special; awkward shapes."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from cxrfast.kernels import IGNORE_INDEX, _dispatch, mask_tokens, mask_tokens_reference  # noqa: E402

# Kernels run in Triton's CPU interpreter here, or compiled on CUDA with TRITON_INTERPRET=0.
DEVICE = "cpu" if _dispatch.interpreter_active() or not torch.cuda.is_available() else "cuda"
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = torch.tensor([PAD, UNK, CLS, SEP, MASK])
VOCAB = 1000
BERT = dict(replace_mask=0.8, replace_random=0.1)  # BERT: 80% [MASK], 10% random, 10% kept
MRM = dict(replace_mask=1.0, replace_random=0.0)  # MRM: always [MASK] (pretrain_datasets.py:49-51)


def _batch(b: int, length: int, seed: int = 0, start_prob: float = 0.6):
    """[CLS] words... [SEP] [PAD]...: random ids >= 5, random word starts, random lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    word_start = torch.rand(b, length, generator=g) < start_prob
    lengths = torch.randint(min(2, length), length + 1, (b,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = CLS
        ids[i, n - 1] = SEP
        ids[i, n:] = PAD
    ids[0, length // 2] = UNK  # an [UNK] inside the text: special, never masked
    # word_start stays random on specials too: the ops must treat every special as a boundary.
    return ids.to(DEVICE), word_start.to(DEVICE)


def _mask(impl: str, ids, word_start, prob: float = 0.5, seed: int = 0, replace: dict = BERT,
          special: torch.Tensor = SPECIAL, vocab: int = VOCAB, mask_id: int = MASK):
    return mask_tokens(
        ids, word_start, prob=prob, mask_id=mask_id, vocab_size=vocab, special_ids=special.to(DEVICE),
        generator=torch.Generator(device=DEVICE).manual_seed(seed), impl=impl, **replace,
    )  # fmt: skip


REPLACEMENTS = [BERT, MRM, dict(replace_mask=0.0, replace_random=1.0), dict(replace_mask=0.3, replace_random=0.7)]


@pytest.mark.parametrize(("b", "length"), [(1, 1), (1, 13), (3, 100), (2, 130)])
@pytest.mark.parametrize("prob", [0.5, 0.15, 1.0])
@pytest.mark.parametrize("replace", REPLACEMENTS, ids=["bert", "mrm", "random", "mask_or_random"])
def test_triton_matches_reference(b: int, length: int, prob: float, replace: dict) -> None:
    ids, word_start = _batch(b, length, seed=length)
    ref = _mask("reference", ids, word_start, prob, replace=replace)
    tri = _mask("triton", ids, word_start, prob, replace=replace)
    assert tri[0].dtype == torch.int64 and tri[1].dtype == torch.int64
    assert torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1])


@pytest.mark.parametrize(
    ("b", "length", "layout"),
    [(1, 1, "all_pad"), (5, 3, "no_specials"), (2, 257, "ragged"), (7, 64, "one_word"), (3, 31, "non_contiguous")],
)
def test_awkward_shapes_match_reference(b: int, length: int, layout: str) -> None:
    """Odd and power-of-two-plus-one lengths, batch 1, rows of nothing but padding, no special token at all,
    a whole row as one word, a non-contiguous view; specials spread over the vocabulary (not 0..4)."""
    special = torch.tensor([0, 7, 100, 523, 999])  # ascending, incl. the last id of the vocabulary
    g = torch.Generator().manual_seed(b * 1000 + length)
    ids = torch.randint(1, VOCAB - 1, (b, length * (2 if layout == "non_contiguous" else 1)), generator=g)
    ids[torch.isin(ids, special)] = 8
    word_start = torch.rand(ids.shape, generator=g) < 0.5
    if layout == "all_pad":
        ids[:] = 0
    elif layout == "ragged":
        ids[0, 100:] = 0
        ids[:, 0] = 523
    elif layout == "one_word":
        word_start[:] = False
    elif layout == "non_contiguous":
        ids, word_start = ids[:, ::2], word_start[:, ::2]
        assert not ids.is_contiguous()
    ids, word_start = ids.to(DEVICE), word_start.to(DEVICE)
    for replace in (BERT, MRM):
        ref = _mask("reference", ids, word_start, 0.5, replace=replace, special=special, mask_id=7)
        tri = _mask("triton", ids, word_start, 0.5, replace=replace, special=special, mask_id=7)
        assert torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1]), (layout, replace)
        masked = ref[1] != IGNORE_INDEX
        assert not masked[torch.isin(ids, special.to(DEVICE))].any()
        if layout == "one_word":  # a row is one word: all of it or none of it
            assert all(int(r.sum()) in (0, length) for r in masked)


def _word_index(ids: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((word_start | torch.isin(ids, SPECIAL.to(ids.device))).long(), dim=1)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_whole_words_specials_and_80_10_10(impl: str) -> None:
    ids, word_start = _batch(64, 100, seed=1)
    out, labels = _mask(impl, ids, word_start, prob=0.5, seed=2, replace=BERT)
    special = torch.isin(ids, SPECIAL.to(DEVICE))
    masked = labels != IGNORE_INDEX
    # Specials (incl. padding) are never masked nor changed.
    assert not masked[special].any()
    assert torch.equal(out[special], ids[special])
    # Labels hold the original ids where masked; unmasked tokens are unchanged.
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(out[~masked], ids[~masked])
    # Whole words: every non-special token of a word shares one decision.
    word = _word_index(ids, word_start)
    words_total = words_masked = 0
    for i in range(ids.shape[0]):
        for w in torch.unique(word[i][~special[i]]).tolist():
            members = masked[i][(word[i] == w) & ~special[i]]
            assert members.all() or not members.any(), (i, w, members)
            words_total += 1
            words_masked += int(members.all())
    assert abs(words_masked / words_total - 0.5) < 0.05, (words_masked, words_total)
    # 80% [MASK], 10% random id, 10% kept (a random id equal to the original counts as kept).
    n = int(masked.sum())
    frac_mask = float((out[masked] == MASK).sum()) / n
    frac_kept = float((out[masked] == ids[masked]).sum()) / n
    assert abs(frac_mask - 0.8) < 0.04 and abs(frac_kept - 0.1) < 0.03, (frac_mask, frac_kept, n)
    rand = out[masked & (out != MASK) & (out != ids)]
    assert rand.min() >= 0 and rand.max() < VOCAB
    assert not torch.isin(rand, SPECIAL.to(DEVICE)).any()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_mrm_always_mask_whole_words_at_half(impl: str) -> None:
    """MRM: 50% of the words, every token of a chosen word, and always [MASK] (never a random or kept token)."""
    ids, word_start = _batch(64, 100, seed=3)
    out, labels = _mask(impl, ids, word_start, prob=0.5, seed=4, replace=MRM)
    special = torch.isin(ids, SPECIAL.to(DEVICE))
    masked = labels != IGNORE_INDEX
    assert (out[masked] == MASK).all()
    assert torch.equal(out[~masked], ids[~masked]) and torch.equal(labels[masked], ids[masked])
    word = _word_index(ids, word_start)
    chosen = []
    for i in range(ids.shape[0]):
        for w in torch.unique(word[i][~special[i]]).tolist():
            members = masked[i][(word[i] == w) & ~special[i]]
            assert members.all() or not members.any()  # whole words
            chosen.append(bool(members.all()))
    assert abs(sum(chosen) / len(chosen) - 0.5) < 0.05, (sum(chosen), len(chosen))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_random_replacements_are_uniform_over_non_special_ids(impl: str) -> None:
    """With replace_random=1 every masked token gets a random id: never a special one (wherever the
    specials sit in the vocabulary, given in any order), and every non-special id can come up."""
    vocab, special = 12, torch.tensor([0, 1, 2, 5, 11])
    ids = torch.full((256, 40), 6, dtype=torch.int64)
    ids[:, 0], ids[:, -3:] = 2, 0
    word_start = torch.ones_like(ids, dtype=torch.bool)
    out, labels = _mask(impl, ids.to(DEVICE), word_start.to(DEVICE), prob=1.0, seed=5,
                        replace=dict(replace_mask=0.0, replace_random=1.0), special=special, vocab=vocab, mask_id=1)
    drawn = out[labels != IGNORE_INDEX]
    assert set(drawn.unique().tolist()) == {3, 4, 6, 7, 8, 9, 10}
    counts = torch.bincount(drawn, minlength=vocab)[[3, 4, 6, 7, 8, 9, 10]].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.15  # uniform


def test_probability_edges_and_determinism() -> None:
    ids, word_start = _batch(4, 40, seed=3)
    special = torch.isin(ids, SPECIAL.to(DEVICE))
    _, none = _mask("triton", ids, word_start, prob=0.0)
    assert (none == IGNORE_INDEX).all()
    _, every = _mask("triton", ids, word_start, prob=1.0)
    assert torch.equal(every != IGNORE_INDEX, ~special)
    a = _mask("triton", ids, word_start, seed=5)
    b = _mask("triton", ids, word_start, seed=5)
    c = _mask("triton", ids, word_start, seed=6)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_continuations_follow_their_word_start() -> None:
    """A word of three pieces is masked as a unit; a continuation never joins a special token."""
    ids = torch.tensor([[CLS, 10, 11, 12, 20, 30, 31, SEP, PAD]], device=DEVICE)
    word_start = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1, 1]], dtype=torch.bool, device=DEVICE)
    seen = set()
    for seed in range(40):
        _, labels = _mask("reference", ids, word_start, prob=0.5, seed=seed)
        m = (labels[0] != IGNORE_INDEX).tolist()
        assert m[0] is False and m[7] is False and m[8] is False
        assert m[1] == m[2] == m[3] and m[5] == m[6]
        seen.add((m[1], m[4], m[5]))
    assert len(seen) == 8  # the three words are drawn independently
    # A continuation right after a special (flagged as no word start) is a group of its own.
    ids = torch.tensor([[CLS, 10, 11, SEP, 40, PAD]], device=DEVICE)
    word_start = torch.tensor([[0, 1, 0, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    differ = 0
    for seed in range(20):
        for impl in ("reference", "triton"):
            _, labels = _mask(impl, ids, word_start, prob=0.5, seed=seed)
            m = (labels[0] != IGNORE_INDEX).tolist()
            assert m[1] == m[2] and not (m[0] or m[3] or m[5])
            differ += m[1] != m[4]
    assert differ > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prob=1.5), "prob"),
        (dict(replace_mask=-0.1), "replace_mask"),
        (dict(replace_mask=0.8, replace_random=0.3), "replace_mask \\+ replace_random"),
        (dict(special_ids=torch.tensor([4, 0])), "ascending"),
        (dict(special_ids=torch.tensor([0, 0, 4])), "distinct"),
        (dict(special_ids=torch.tensor([0, VOCAB])), "in \\[0, 1000\\)"),
        (dict(vocab_size=5, mask_id=4, replace_random=0.1), "every id of the vocabulary is special"),
        (dict(mask_id=VOCAB), "mask_id"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(special_ids=torch.tensor([[0]])), "special_ids"),
        (dict(special_ids=torch.tensor([0], dtype=torch.int32)), "special_ids"),
        (dict(word_start=torch.ones(2, 4, dtype=torch.bool)), "word_start"),
        (dict(word_start=torch.ones(2, 5, dtype=torch.int64)), "word_start"),
        (dict(ids=torch.zeros(2, 5, dtype=torch.int32)), "ids must be"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_raises(kwargs: dict, match: str, impl: str) -> None:
    args = dict(
        ids=torch.zeros(2, 5, dtype=torch.int64), word_start=torch.ones(2, 5, dtype=torch.bool),
        prob=0.5, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, **BERT,
    )  # fmt: skip
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ids, word_start = args.pop("ids"), args.pop("word_start")
    with pytest.raises(ValueError, match=match):
        mask_tokens(ids, word_start, impl=impl, **args)


def test_reference_agrees_with_auto_on_cpu() -> None:
    ids, word_start = _batch(2, 17, seed=4)
    ids, word_start = ids.cpu(), word_start.cpu()
    kw = dict(prob=0.5, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, **MRM)
    auto = mask_tokens(ids, word_start, generator=torch.Generator().manual_seed(0), **kw)
    ref = mask_tokens_reference(ids, word_start, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
