"""mask_tokens: Triton kernel (CPU interpreter) vs the PyTorch reference, whole-word BERT statistics."""

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


def _mask(impl: str, ids, word_start, prob: float = 0.5, seed: int = 0):
    return mask_tokens(
        ids, word_start, prob=prob, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL.to(DEVICE),
        generator=torch.Generator(device=DEVICE).manual_seed(seed), impl=impl,
    )  # fmt: skip


@pytest.mark.parametrize(("b", "length"), [(1, 1), (1, 13), (3, 100), (2, 130)])
@pytest.mark.parametrize("prob", [0.5, 0.15, 1.0])
def test_triton_matches_reference(b: int, length: int, prob: float) -> None:
    ids, word_start = _batch(b, length, seed=length)
    ref = _mask("reference", ids, word_start, prob)
    tri = _mask("triton", ids, word_start, prob)
    assert tri[0].dtype == torch.int64 and tri[1].dtype == torch.int64
    assert torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1])


def _word_index(ids: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((word_start | torch.isin(ids, SPECIAL.to(ids.device))).long(), dim=1)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_whole_words_specials_and_80_10_10(impl: str) -> None:
    ids, word_start = _batch(64, 100, seed=1)
    out, labels = _mask(impl, ids, word_start, prob=0.5, seed=2)
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
        prob=0.5, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
    )  # fmt: skip
    args.update(kwargs)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ids, word_start = args.pop("ids"), args.pop("word_start")
    with pytest.raises(ValueError, match=match):
        mask_tokens(ids, word_start, impl=impl, **args)


def test_reference_agrees_with_auto_on_cpu() -> None:
    ids, word_start = _batch(2, 17, seed=4)
    ids, word_start = ids.cpu(), word_start.cpu()
    kw = dict(prob=0.5, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    auto = mask_tokens(ids, word_start, generator=torch.Generator().manual_seed(0), **kw)
    ref = mask_tokens_reference(ids, word_start, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
