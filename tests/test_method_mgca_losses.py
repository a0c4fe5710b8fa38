"""MGCA's losses and word aggregation against plain references written the way the published code
(HKU-MedAI/MGCA `mgca_module.py`, `encoder.py`) computes them: Python loops over the samples,
`torch.quantile` on each sample's nonzero weights, the per-token walk of `aggregate_tokens`.

A sample without text must count exactly as if it had been left out of the batch, so the masked
losses are also checked against the references on the valid samples alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cxrfast.models.mgca import aggregate_word_pieces
from cxrfast.models.mgca_losses import clipped_weights, instance_loss, local_loss, prototype_loss, sinkhorn

TOL = dict(rtol=1e-5, atol=1e-5)


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# --- plain references ------------------------------------------------------------------------
def ref_instance(img: torch.Tensor, txt: torch.Tensor, t: float) -> torch.Tensor:
    scores = img.mm(txt.t()) / t
    labels = torch.arange(img.shape[0])
    return F.cross_entropy(scores, labels) + F.cross_entropy(scores.t(), labels)


def ref_clip(attn: torch.Tensor) -> torch.Tensor:
    """MGCA: per sample, clip the nonzero weights to their 10th..90th percentile, then normalise."""
    rows = []
    for a in attn.clone():
        nz = a.nonzero().squeeze(-1)
        a[nz] = a[nz].clip(torch.quantile(a[nz], 0.1), torch.quantile(a[nz], 0.9))
        rows.append(a)
    w = torch.stack(rows)
    return w / w.sum(dim=1, keepdim=True)


def ref_local(query, keys, key_pad, weights, t, normalize_context) -> torch.Tensor:
    """One sample at a time: attend, contrast each position with the others' attended outputs."""
    rows, cols = [], []
    for i in range(query.shape[0]):
        s = query[i] @ keys[i].t()
        if key_pad is not None:
            s = s.masked_fill(key_pad[i][None, :], float("-inf"))
        ctx = (s / t).softmax(dim=-1) @ keys[i]
        if normalize_context:
            ctx = F.normalize(ctx, dim=-1)
        sim = query[i] @ ctx.t() / t
        target = torch.arange(sim.shape[0])
        rows.append((F.cross_entropy(sim, target, reduction="none") * weights[i]).sum())
        cols.append((F.cross_entropy(sim.t(), target, reduction="none") * weights[i]).sum())
    b = query.shape[0]
    return (sum(rows) / b + sum(cols) / b) / 2


def ref_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    q = torch.exp(scores / eps).t()
    q /= q.sum()
    k, b = q.shape
    r, c = torch.ones(k) / k, torch.ones(b) / b
    for _ in range(iters):
        u = q.sum(dim=1)
        q *= (r / u).unsqueeze(1)
        q *= (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


def ref_proto(img_s, txt_s, img_c, txt_c, t) -> torch.Tensor:
    i2t = -torch.mean(torch.sum(img_c * torch.log(F.softmax(txt_s / t, dim=1)), dim=1))
    t2i = -torch.mean(torch.sum(txt_c * torch.log(F.softmax(img_s / t, dim=1)), dim=1))
    return (i2t + t2i) / 2


# --- losses -------------------------------------------------------------------------------------
def test_instance_loss_matches_reference_and_ignores_samples_without_text():
    img, txt = unit(6, 8, seed=0), unit(6, 8, seed=1)
    all_valid = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(instance_loss(img, txt, all_valid, temperature=0.07), ref_instance(img, txt, 0.07), **TOL)
    valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    torch.testing.assert_close(instance_loss(img, txt, valid, temperature=0.07),
                               ref_instance(img[valid], txt[valid], 0.07), **TOL)


def test_instance_loss_gathered_layout_equals_local_when_one_rank():
    img, txt = unit(5, 8, seed=2), unit(5, 8, seed=3)
    valid = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    # rank 1 of 2: its rows are 5..9 of the gathered tensors; the other rank's rows are negatives
    other_i, other_t = unit(5, 8, seed=4), unit(5, 8, seed=5)
    got = instance_loss(img, txt, valid, temperature=0.1, img_all=torch.cat([other_i, img]),
                        txt_all=torch.cat([other_t, txt]), valid_all=torch.cat([valid, valid]), offset=5)
    keep = torch.cat([valid, valid])
    all_i, all_t = torch.cat([other_i, img])[keep], torch.cat([other_t, txt])[keep]
    n_other = int(valid.sum())
    scores = img[valid] @ all_t.t() / 0.1
    labels = torch.arange(n_other, 2 * n_other)
    want = F.cross_entropy(scores, labels) + F.cross_entropy(txt[valid] @ all_i.t() / 0.1, labels)
    torch.testing.assert_close(got, want, **TOL)


def test_clipped_weights_match_per_sample_quantiles():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4, 30, generator=g)
    attn[0, 20:] = 0  # padding: excluded from the quantiles, weight 0
    attn[1, 3] = 0
    attn[2, 2:] = 0  # two entries: the quantiles interpolate between them
    got = clipped_weights(attn, attn > 0)
    torch.testing.assert_close(got, ref_clip(attn), **TOL)
    assert (got[attn == 0] == 0).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(4))
    # a row with nothing present is all zero, not NaN
    empty = clipped_weights(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(2, 5))


@pytest.mark.parametrize("normalize_context", [True, False])
def test_local_loss_matches_loop_reference(normalize_context: bool):
    b, na, nb, d = 5, 7, 9, 16
    query, keys = unit(b, na, d, seed=6), unit(b, nb, d, seed=7)
    pad = torch.zeros(b, nb, dtype=torch.bool)
    pad[0, 5:] = True
    pad[3, 1:] = True  # a single key
    weights = clipped_weights(torch.rand(b, na, generator=torch.Generator().manual_seed(8)),
                              torch.ones(b, na, dtype=torch.bool))
    valid = torch.ones(b, dtype=torch.bool)
    got = local_loss(query, keys, ~pad, weights, valid, temperature=0.1, normalize_context=normalize_context)
    torch.testing.assert_close(got, ref_local(query, keys, pad, weights, 0.1, normalize_context), **TOL)
    # without a key mask (word -> patch: every patch is present)
    got = local_loss(query, keys, None, weights, valid, temperature=0.1, normalize_context=normalize_context)
    torch.testing.assert_close(got, ref_local(query, keys, None, weights, 0.1, normalize_context), **TOL)


def test_local_loss_ignores_samples_without_text():
    b, na, nb, d = 4, 6, 5, 8
    query, keys = unit(b, na, d, seed=9), unit(b, nb, d, seed=10)
    weights = torch.full((b, na), 1 / na)
    present = torch.ones(b, nb, dtype=torch.bool)
    present[2] = False  # the sample without text has no words at all: finite, and ignored
    valid = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    got = local_loss(query, keys, present, weights, valid, temperature=0.1, normalize_context=False)
    assert torch.isfinite(got)
    want = ref_local(query[valid], keys[valid], None, weights[valid], 0.1, False)
    torch.testing.assert_close(got, want, **TOL)
    query.requires_grad_(True)
    local_loss(query, keys, present, weights, valid, temperature=0.1, normalize_context=False).backward()
    assert torch.isfinite(query.grad).all() and (query.grad[2] == 0).all()


def test_sinkhorn_and_prototype_loss_match_reference():
    b, k, d = 6, 11, 8
    img, txt, protos = unit(b, d, seed=11), unit(b, d, seed=12), unit(k, d, seed=13)
    img_s, txt_s = img @ protos.t(), txt @ protos.t()
    valid = torch.ones(b, dtype=torch.bool)
    img_c = sinkhorn(img_s, valid, epsilon=0.05, iterations=3)
    torch.testing.assert_close(img_c, ref_sinkhorn(img_s, 0.05, 3), **TOL)
    txt_c = sinkhorn(txt_s, valid, epsilon=0.05, iterations=3)
    torch.testing.assert_close(prototype_loss(img_s, txt_s, img_c, txt_c, valid, temperature=0.2),
                               ref_proto(img_s, txt_s, img_c, txt_c, 0.2), **TOL)
    # samples without text: as if absent
    valid = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    img_c = sinkhorn(img_s, valid, epsilon=0.05, iterations=3)
    torch.testing.assert_close(img_c[valid], ref_sinkhorn(img_s[valid], 0.05, 3), **TOL)
    assert (img_c[~valid] == 0).all()
    txt_c = sinkhorn(txt_s, valid, epsilon=0.05, iterations=3)
    torch.testing.assert_close(prototype_loss(img_s, txt_s, img_c, txt_c, valid, temperature=0.2),
                               ref_proto(img_s[valid], txt_s[valid], img_c[valid], txt_c[valid], 0.2), **TOL)


def _two_ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: Sinkhorn on its 4 of the 8 samples, and the instance loss with negatives
    gathered from both ranks (its gradient through the gather)."""
    import torch.distributed as dist

    from cxrfast.methods.mgca import _gather

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores, valids, img, txt = torch.load(Path(out_dir) / "inputs.pt")
        part = slice(rank * 4, (rank + 1) * 4)
        codes = [sinkhorn(scores[part], v[part], epsilon=0.05, iterations=3, distributed=True) for v in valids]
        img = img[part].clone().requires_grad_(True)
        valid = valids[1][part]
        loss = instance_loss(img, txt[part], valid, temperature=0.1, img_all=_gather(img, True),
                             txt_all=_gather(txt[part], True), valid_all=_gather(valid, False), offset=rank * 4)
        loss.backward()
        torch.save((codes, loss.detach(), img.grad), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_concatenation():
    """Two gloo ranks with 4 samples each: the Sinkhorn codes of one process on all 8 (with a
    sample without text on one rank, the codes of the 7 others); with gathered negatives, each
    rank's instance loss and its image gradient (summed over ranks through the gather) as one
    process computes them on the 8."""
    import torch.multiprocessing as mp

    protos, emb = unit(13, 8, seed=14), unit(8, 8, seed=15)
    scores = emb @ protos.t()
    valids = [torch.ones(8, dtype=torch.bool), torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)]
    img, txt = unit(8, 6, seed=16), unit(8, 6, seed=17)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((scores, valids, img, txt), Path(tmp) / "inputs.pt")
        mp.start_processes(_two_ranks, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    for case, valid in enumerate(valids):
        got = torch.cat([ranks[0][0][case], ranks[1][0][case]])
        want = torch.zeros(8, 13)
        want[valid] = ref_sinkhorn(scores[valid], 0.05, 3)
        torch.testing.assert_close(got, want, **TOL)
    valid = valids[1]
    ref_img = img.clone().requires_grad_(True)
    losses = [instance_loss(ref_img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], valid[r * 4:(r + 1) * 4],
                            temperature=0.1, img_all=ref_img, txt_all=txt, valid_all=valid, offset=r * 4)
              for r in range(2)]
    sum(losses).backward()
    for r in range(2):
        torch.testing.assert_close(ranks[r][1], losses[r].detach(), **TOL)
        torch.testing.assert_close(ranks[r][2], ref_img.grad[r * 4:(r + 1) * 4], **TOL)


# --- word-piece aggregation --------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pneumo", "##thorax", "##es", "effusion", "heart",
         "##ly", "##x", "size", "normal", "."]
ID = {t: i for i, t in enumerate(VOCAB)}
CONT = torch.tensor([t.startswith("##") for t in VOCAB])
L = 10


def ref_aggregate(embs: torch.Tensor, ids: list[int], last_attn: torch.Tensor):
    """The published `aggregate_tokens` walk for one sample (embs [L, H], last_attn [L-1])."""
    agg, words, attns = [], [], []
    bank, wbank, abank = [], [], []
    for emb, wid, a in zip(embs, ids, last_attn, strict=False):  # the published walk: L tokens, L-1 attentions
        word = VOCAB[wid]
        if word == "[SEP]":
            agg.append(torch.stack(bank).sum(0))
            words.append("".join(wbank))
            attns.append(sum(abank))
            agg.append(emb)
            words.append(word)
            attns.append(a)
            break
        if not word.startswith("##"):
            if not wbank:
                bank, wbank, abank = [emb], [word], [a]
            else:
                agg.append(torch.stack(bank).sum(0))
                words.append("".join(wbank))
                attns.append(sum(abank))
                bank, wbank, abank = [emb], [word], [a]
        else:
            bank.append(emb)
            wbank.append(word[2:])
            abank.append(a)
    pad = len(ids) - len(agg)
    agg = torch.cat([torch.stack(agg), torch.zeros(pad, embs.shape[1])])
    attn = torch.cat([torch.tensor([float(a) for a in attns]), torch.zeros(pad)])
    return agg, words + ["[PAD]"] * pad, attn


def encode(tokens: list[str]) -> tuple[list[int], list[int]]:
    ids = [ID[t] for t in tokens] + [ID["[PAD]"]] * (L - len(tokens))
    return ids, [1] * len(tokens) + [0] * (L - len(tokens))


TRICKY = [
    ["[CLS]", "no", "pneumo", "##thorax", "[SEP]"],
    ["[CLS]", "##x", "heart", "##ly", "##es", "[UNK]", ".", "[SEP]"],  # '##' right after [CLS]; 3-piece word
    ["[CLS]", "normal", "heart", "size", "effusion", "no", "pneumo", "##thorax", "[SEP]"],  # [SEP] at L-2
    ["[CLS]", "normal", "heart", "size", "effusion", "no", "pneumo", "##thorax", "##es", "[SEP]"],  # fills L
    ["[CLS]", "[SEP]"],
]


def test_word_piece_aggregation_matches_the_published_walk():
    g = torch.Generator().manual_seed(0)
    b, h = len(TRICKY), 4
    enc = [encode(t) for t in TRICKY]
    ids = torch.tensor([e[0] for e in enc])
    mask = torch.tensor([e[1] for e in enc])
    hidden = torch.randn(b, L, h, generator=g)
    cls_attn = torch.rand(b, L, generator=g) * mask  # [CLS] attention per token, 0 on padding
    got = aggregate_word_pieces(hidden, ids, mask, cls_attn, CONT, sep_id=ID["[SEP]"], shift_attention=True)
    for i in range(b):
        agg, words, attn = ref_aggregate(hidden[i], ids[i].tolist(), cls_attn[i, 1:])
        torch.testing.assert_close(got.report[i], agg[0])
        torch.testing.assert_close(got.words[i], agg[1:])
        torch.testing.assert_close(got.attn[i], attn[1:])
        assert got.present[i].tolist() == [w != "[PAD]" for w in words[1:]], words
    # the report that fills all L tokens: its last word (still open when the walk ends) and [SEP] are
    # dropped: [CLS] + 5 words
    assert int(got.present[3].sum()) == 5
    # without the published shift, each word carries the attention of its own pieces ([SEP] its own)
    own = aggregate_word_pieces(hidden, ids, mask, cls_attn, CONT, sep_id=ID["[SEP]"], shift_attention=False)
    a = cls_attn[0]
    torch.testing.assert_close(own.attn[0, :4], torch.stack([a[1], a[2] + a[3], a[4], a[4] * 0]))


def test_word_piece_aggregation_without_text_is_empty():
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    out = aggregate_word_pieces(torch.randn(2, L, 4), ids, mask, torch.rand(2, L), CONT, sep_id=ID["[SEP]"])
    assert not out.present.any() and (out.words == 0).all() and (out.attn == 0).all()


def test_word_piece_aggregation_passes_gradients_to_every_piece():
    ids, mask = (torch.tensor([x]) for x in encode(TRICKY[1]))
    hidden = torch.randn(1, L, 4, requires_grad=True)
    out = aggregate_word_pieces(hidden, ids, mask, torch.rand(1, L), CONT, sep_id=ID["[SEP]"])
    (out.words.sum() + out.report.sum()).backward()
    n = int(mask.sum())
    assert (hidden.grad[0, :n] == 1).all() and (hidden.grad[0, n:] == 0).all()
