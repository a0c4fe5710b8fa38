"""cxrfast.models: registry, shapes of every method, losses, FLOP counts, MRM's text branch (CPU, small)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from cxrfast.kernels import mask_tokens, patchify
from cxrfast.models import MODELS, build_model, text_kwargs_from_shards
from cxrfast.models.mrm import mlm_loss
from cxrfast.models.pos_embed import sincos_2d

V = 50  # tiny vocabulary: 0..4 special, 40..49 '##' continuations
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def text_kwargs() -> dict:
    cont = torch.zeros(V, dtype=torch.bool)
    cont[40:] = True
    return {"vocab_size": V, "special_ids": dict(SPECIAL), "wordpiece_continuation": cont}


def smooth_images(b: int, side: int, seed: int) -> torch.Tensor:
    """[b, 1, side, side] sums of low-frequency plane waves: reconstructable from a few patches."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    freq = torch.rand(b, 3, 2, generator=g) * 4 + 1
    phase = torch.rand(b, 3, generator=g) * 2 * math.pi
    waves = [
        torch.sin(2 * math.pi * (freq[:, k, 0, None, None] * xx + freq[:, k, 1, None, None] * yy) + phase[:, k, None, None])
        for k in range(3)
    ]
    return sum(waves)[:, None]


def report_batch(b: int, length: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [b, length] ([CLS] words [SEP] then padding of varying length), attention_mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, length), generator=g)
    attn = torch.zeros(b, length, dtype=torch.int64)
    for i in range(b):
        n = 30 + 7 * i
        ids[i, 0], ids[i, n - 1], ids[i, n:] = SPECIAL["cls"], SPECIAL["sep"], SPECIAL["pad"]
        attn[i, :n] = 1
    return ids, attn


def mrm_batch(b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    ids, attn = report_batch(b, seed=seed)
    return {
        "image": smooth_images(b, 64, seed),
        "target": smooth_images(b, 128, seed),
        "ids": ids,
        "attention_mask": attn,
    }


def tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("mrm"):
        kw = {**text_kwargs(), "text_dropout": 0.0, **kw}
    return build_model(name, **kw)


# --- registry -------------------------------------------------------------------------------------


def test_registry_has_the_published_models():
    for name in ("mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16", "mrm_vit_base_patch16",
                 "mae_vit_tiny_test", "mrm_vit_tiny_test"):
        assert name in MODELS
    p = MODELS["mae_vit_large_patch16"].preset
    assert (p["embed_dim"], p["depth"], p["num_heads"], p["decoder_embed_dim"], p["decoder_depth"]) == (1024, 24, 16, 512, 8)
    p = MODELS["mae_vit_small_patch16"].preset
    assert (p["embed_dim"], p["depth"], p["num_heads"], p["decoder_depth"]) == (384, 12, 6, 2)


def test_registry_rejects_unknown_names_and_kwargs():
    with pytest.raises(ValueError, match="unknown model 'mae_vit_huge'.*mae_vit_base_patch16"):
        build_model("mae_vit_huge")
    with pytest.raises(ValueError, match=r"does not take \['mask_ration'\].*mask_ratio"):
        build_model("mae_vit_tiny_test", mask_ration=0.9)
    with pytest.raises(ValueError, match="text_kwargs_from_shards"):
        build_model("mrm_vit_tiny_test")  # no tokenizer information
    with pytest.raises(ValueError, match="mask_ratio"):
        build_model("mae_vit_tiny_test", mask_ratio=1.0)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_model("mae_vit_tiny_test", img_size=70)
    bad = text_kwargs()
    bad["wordpiece_continuation"] = bad["wordpiece_continuation"][:-1]
    with pytest.raises(ValueError, match="wordpiece_continuation"):
        build_model("mrm_vit_tiny_test", **bad)
    with pytest.raises(ValueError, match="special_ids lacks"):
        build_model("mrm_vit_tiny_test", **{**text_kwargs(), "special_ids": {"pad": 0}})


def test_model_attributes():
    mae, mrm = tiny("mae_vit_tiny_test"), tiny("mrm_vit_tiny_test")
    assert (mae.augmentation, mae.needs_reports) == ("mae", False)
    assert (mrm.augmentation, mrm.needs_reports) == ("mrm", True)
    assert mae.timm_name == "vit_tiny_patch16_224"
    assert mae.timm_kwargs == dict(img_size=64, patch_size=16, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                                   mlp_ratio=4.0, num_classes=0)
    # every attention goes through SDPA: timm's blocks (forced on) and the BERT branch
    attns = [m for m in mrm.modules() if isinstance(m, Attention)]
    assert len(attns) == 3 and all(a.fused_attn for a in attns)
    assert mrm.text.config._attn_implementation == "sdpa"


# --- shapes -----------------------------------------------------------------------------------------


def test_pos_embed_layout():
    pe = sincos_2d(16, 3, cls_token=True)  # [1 + 9, 16]
    assert pe.shape == (10, 16) and torch.all(pe[0] == 0)
    # patch (row 0, col 1) vs (row 0, col 0): only the first half (column) changes; rows: the second half
    assert torch.equal(pe[2, 8:], pe[1, 8:]) and not torch.equal(pe[2, :8], pe[1, :8])
    assert torch.equal(pe[4, :8], pe[1, :8]) and not torch.equal(pe[4, 8:], pe[1, 8:])
    assert torch.allclose(pe[1, :4], torch.zeros(4)) and torch.allclose(pe[1, 4:8], torch.ones(4))  # sin 0, cos 0


def published_sincos(embed_dim: int, grid_size: int, variant: str) -> np.ndarray:
    """MAE's / MRM's util/pos_embed.py `get_2d_sincos_pos_embed(..., cls_token=True)`, transcribed in NumPy:
    the two differ in one line only, the frequency exponent (MAE `omega /= d / 2.`, MRM `omega / d / 2.`)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64)
        omega = omega / (d / 2.0) if variant == "mae" else omega / d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape([2, 1, grid_size, grid_size])  # w goes first
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize(("dim", "grid"), [(768, 14), (384, 14), (64, 4), (512, 7)])
def test_pos_embed_variants_match_the_published_formulas(dim, grid):
    for variant in ("mae", "mrm"):
        ours = sincos_2d(dim, grid, cls_token=True, variant=variant).double().numpy()
        assert np.allclose(ours, published_sincos(dim, grid, variant), atol=1e-6), variant
    assert not np.allclose(published_sincos(dim, grid, "mae"), published_sincos(dim, grid, "mrm"), atol=1e-3)


def test_pos_embed_switch_sets_encoder_decoder_and_export():
    mae = tiny("mae_vit_tiny_test")
    mrm_tables = tiny("mae_vit_tiny_test", pos_embed="mrm")
    assert torch.equal(mae.pos_embed[0], sincos_2d(64, 4, cls_token=True, variant="mae"))
    assert torch.equal(mrm_tables.pos_embed[0], sincos_2d(64, 4, cls_token=True, variant="mrm"))
    assert torch.equal(mrm_tables.decoder_pos_embed[0], sincos_2d(32, 4, cls_token=True, variant="mrm"))
    assert torch.equal(mrm_tables.encoder_state_dict_timm()["pos_embed"], mrm_tables.pos_embed)
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        tiny("mae_vit_tiny_test", pos_embed="rope")


@pytest.mark.parametrize("name", ["mae_vit_tiny_test", "mrm_vit_tiny_test"])
def test_tiny_shapes_of_every_method(name):
    model = tiny(name, mask_ratio=0.75)
    b, n, k, d = 3, 16, 4, 64
    scale = 2 if name.startswith("mrm") else 1
    pp = (16 * scale) ** 2
    imgs = smooth_images(b, 64, 0)
    target = smooth_images(b, 64 * scale, 0)

    patches = model.patchify(target, 16 * scale)
    assert patches.shape == (b, n, pp)
    assert torch.equal(patches, patchify(target, 16 * scale))  # the kernels' (p, q, c) order
    assert torch.equal(model.unpatchify(patches, 16 * scale), target)

    latent, mask, ids_restore = model.forward_encoder(imgs)
    assert latent.shape == (b, 1 + k, d)
    assert mask.shape == (b, n) and torch.all(mask.sum(1) == n - k)
    assert torch.equal(ids_restore.sort(1).values, torch.arange(n).expand(b, n))
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (b, n, pp)
    loss = model.forward_loss(target, pred, mask)
    assert loss.shape == () and torch.isfinite(loss)
    assert model.forward_features(imgs).shape == (b, 1 + n, d)

    batch = mrm_batch(b) if scale == 2 else {"image": imgs}
    out = model(batch)
    assert set(out) == ({"loss", "loss_image", "loss_text"} if scale == 2 else {"loss", "loss_image"})
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    if scale == 2:
        assert torch.allclose(out["loss"], out["loss_image"] + out["loss_text"])
    with pytest.raises(ValueError, match="encoder input"):
        model.forward_encoder(smooth_images(b, 32, 0))


def test_forward_loss_is_masked_norm_pix_mse():
    model = tiny("mae_vit_tiny_test")
    imgs = smooth_images(2, 64, 1)
    latent, mask, ids_restore = model.forward_encoder(imgs)
    pred = model.forward_decoder(latent, ids_restore)
    t = model.patchify(imgs)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(model.forward_loss(imgs, pred, mask), expected, rtol=1e-5)
    raw = tiny("mae_vit_tiny_test", norm_pix_loss=False)
    expected_raw = (((pred - model.patchify(imgs)) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(raw.forward_loss(imgs, pred, mask), expected_raw, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "side", "dim"), [("mae_vit_small_patch16", 224, 384), ("mae_vit_base_patch16", 224, 768)]
)
def test_real_configs_forward(name, side, dim):
    torch.manual_seed(0)
    model = build_model(name, mask_ratio=0.9).eval()
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(torch.randn(1, 1, side, side))
        out = model({"image": torch.randn(1, 1, side, side)})
    assert latent.shape == (1, 1 + 19, dim) and mask.shape == (1, 196)
    assert torch.isfinite(out["loss"])


def test_real_mrm_forward():
    torch.manual_seed(0)
    model = build_model("mrm_vit_base_patch16", **text_kwargs()).eval()
    assert model.decoder_pred.out_features == 32 * 32 * 1
    assert (model.cfg.decoder_embed_dim, model.cfg.decoder_depth, model.cfg.decoder_num_heads) == (768, 4, 6)
    bert = model.text.config
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size) == (384, 6, 6, 1536)
    assert bert.max_position_embeddings >= 100
    ids, attn = report_batch(1)
    with torch.no_grad():
        out = model({"image": torch.randn(1, 1, 224, 224), "target": torch.randn(1, 1, 448, 448),
                     "ids": ids, "attention_mask": attn})
    assert all(torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="target"), torch.no_grad():
        model({"image": torch.randn(1, 1, 224, 224), "target": torch.randn(1, 1, 224, 224),
               "ids": ids, "attention_mask": attn})


# --- training behaviour -------------------------------------------------------------------------------


def _overfit(model: torch.nn.Module, batch: dict, steps: int = 60) -> dict[str, list[float]]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hist: dict[str, list[float]] = {}
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        for key, v in out.items():
            hist.setdefault(key, []).append(v.item())
    return hist


def _falls(values: list[float], factor: float) -> bool:
    """Finite, and the mean of the last 5 below `factor` x the mean of the first 3."""
    return all(math.isfinite(v) for v in values) and sum(values[-5:]) / 5 < factor * sum(values[:3]) / 3


def test_mae_overfits_one_batch():
    hist = _overfit(tiny("mae_vit_tiny_test"), {"image": smooth_images(2, 64, 1)})
    assert _falls(hist["loss"], 0.8), hist["loss"]


def test_mrm_overfits_one_batch():
    hist = _overfit(tiny("mrm_vit_tiny_test"), mrm_batch(2, seed=1))
    assert _falls(hist["loss_image"], 0.8), hist["loss_image"]
    assert _falls(hist["loss_text"], 0.6), hist["loss_text"]


def test_fused_flag_routes_kernels():
    assert tiny("mae_vit_tiny_test").impl == "auto"
    assert tiny("mae_vit_tiny_test", fused=False).impl == "reference"


triton_available = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not triton_available, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["mae_vit_tiny_test", "mrm_vit_tiny_test"])
def test_triton_and_reference_kernels_give_the_same_loss(name):
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    model = tiny(name).to(device)
    batch = mrm_batch(2) if name.startswith("mrm") else {"image": smooth_images(2, 64, 0)}
    batch = {k: v.to(device) for k, v in batch.items()}
    results = []
    for impl in ("reference", "triton"):
        model.impl = impl
        model.zero_grad()
        torch.manual_seed(5)
        out = model(batch)
        out["loss"].backward()
        results.append((out, model.patch_embed.proj.weight.grad.clone(), model.decoder_pred.weight.grad.clone()))
    (ref, ref_pe, ref_dp), (tri, tri_pe, tri_dp) = results
    for key in ref:
        assert torch.allclose(ref[key], tri[key], rtol=1e-5, atol=1e-6), key
    assert torch.allclose(ref_pe, tri_pe, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ref_dp, tri_dp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mae_vit_tiny_test", "mrm_vit_tiny_test"])
def test_grad_checkpointing_same_gradients(name, monkeypatch):
    import cxrfast.models.mae as mae_mod

    batch = mrm_batch(2) if name.startswith("mrm") else {"image": smooth_images(2, 64, 0)}
    grads = []
    calls = []
    real = mae_mod.checkpoint
    monkeypatch.setattr(mae_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ckpt in (False, True):
        model = tiny(name, grad_checkpointing=ckpt)
        torch.manual_seed(3)
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2 + 1  # encoder + decoder blocks of the tiny config, only with checkpointing
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n


# --- MRM's text branch ---------------------------------------------------------------------------------


def test_mlm_loss_on_masked_positions_vs_all_positions():
    """MRM's switches: always [MASK], and the published loss, cross-entropy against the unmasked ids
    at every position of the padded batch ([CLS], [SEP] and padding included, labels never -100)."""
    mrm = dict(mlm_replace_mask=1.0, mlm_replace_random=0.0)
    masked_only = tiny("mrm_vit_tiny_test", **mrm).eval()
    all_pos = tiny("mrm_vit_tiny_test", mlm_all_positions=True, **mrm).eval()
    all_pos.load_state_dict(masked_only.state_dict())
    batch = mrm_batch(2)
    with torch.no_grad():
        latent, _, _ = masked_only.forward_encoder(batch["image"])
        torch.manual_seed(7)
        loss_masked = masked_only.forward_report(latent, batch["ids"], batch["attention_mask"])
        torch.manual_seed(7)
        loss_all = all_pos.forward_report(latent, batch["ids"], batch["attention_mask"])
        # the same draw by hand
        torch.manual_seed(7)
        word_start = batch["attention_mask"].bool() & ~text_kwargs()["wordpiece_continuation"][batch["ids"]]
        masked_ids, labels = mask_tokens(batch["ids"], word_start, prob=0.5, replace_mask=1.0, replace_random=0.0,
                                         mask_id=SPECIAL["mask"], vocab_size=V, special_ids=torch.arange(5),
                                         impl="reference")  # fmt: skip
        feature = masked_only.text_proj(latent[:, 1:].mean(1))
        logits = masked_only.text(masked_ids, batch["attention_mask"], feature)
    sel = labels != -100
    assert 0 < sel.sum() < batch["attention_mask"].sum()
    assert (masked_ids[sel] == SPECIAL["mask"]).all()  # MRM: always [MASK]
    assert torch.all(batch["attention_mask"].bool()[sel])  # never padding, never beyond the report
    assert not torch.isin(batch["ids"][sel], torch.arange(5)).any()  # never special tokens
    assert torch.allclose(loss_masked, F.cross_entropy(logits[sel], labels[sel]), rtol=1e-5)
    # MRM's MyBertMaskedLM: CrossEntropyLoss() (mean, ignore_index -100 never hit) over labels = the unmasked ids
    published = torch.nn.CrossEntropyLoss()(logits.view(-1, V), batch["ids"].view(-1))
    assert torch.allclose(loss_all, published, rtol=1e-5)
    pad = batch["ids"] == SPECIAL["pad"]
    assert pad.any() and not torch.allclose(loss_all, F.cross_entropy(logits[~pad], batch["ids"][~pad]))
    assert not torch.allclose(loss_masked, loss_all)


def test_bert_init_as_published_by_mrm():
    """text_init="mrm": xavier-uniform on every BERT Linear (MRM's initialize_weights reaches the BERT),
    embeddings N(0, 0.02) with a zero padding row; text_tie_decoder=False: the MLM decoder has its own
    weight (MyBertMaskedLM re-creates `bert` after tying). Defaults: transformers' BERT init, tied."""
    model = tiny("mrm_vit_tiny_test", vocab_size=3000, text_init="mrm", text_tie_decoder=False,
                 wordpiece_continuation=torch.zeros(3000, dtype=torch.bool), text_width=256, text_heads=4,
                 text_intermediate=1024)  # fmt: skip
    mlm = model.text.mlm
    decoder, emb = mlm.cls.predictions.decoder, mlm.bert.embeddings.word_embeddings
    assert decoder.weight is not emb.weight
    linears = [m for m in mlm.modules() if isinstance(m, torch.nn.Linear)]
    assert decoder in linears and len(linears) == 6 * model.cfg.text_depth + 2  # 6 per layer, head transform, decoder
    for m in linears:
        bound = math.sqrt(6 / (m.in_features + m.out_features))
        w = m.weight.detach()
        assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        assert m.bias is None or not m.bias.any()
    assert abs(emb.weight.std().item() - 0.02) < 0.002 and not emb.weight[SPECIAL["pad"]].any()
    default = tiny("mrm_vit_tiny_test", vocab_size=3000, wordpiece_continuation=torch.zeros(3000, dtype=torch.bool),
                   text_width=256, text_heads=4, text_intermediate=1024).text.mlm  # fmt: skip
    assert default.cls.predictions.decoder.weight is default.bert.embeddings.word_embeddings.weight
    q = default.bert.encoder.layer[0].attention.self.query.weight
    assert abs(q.std().item() - 0.02) < 0.002  # BERT's N(0, 0.02), not xavier (std 0.051 for 256x256)
    with pytest.raises(ValueError, match="text_init"):
        tiny("mrm_vit_tiny_test", text_init="xavier")
    with pytest.raises(ValueError, match="mlm_replace_mask"):
        tiny("mrm_vit_tiny_test", mlm_replace_mask=0.95, mlm_replace_random=0.1)


def test_mrm_with_a_tokenizer_without_sep():
    """MRM's mimic_wordpiece.json has [PAD] [UNK] [CLS] [MASK] only: the model takes it."""
    kw = text_kwargs()
    kw["special_ids"] = {"pad": 0, "unk": 1, "cls": 2, "mask": 4}
    model = tiny("mrm_vit_tiny_test", **kw)
    batch = mrm_batch(2)
    batch["ids"][batch["ids"] == SPECIAL["sep"]] = 7  # no [SEP]: 3 is an ordinary token now
    out = model(batch)
    assert torch.isfinite(out["loss_text"])
    assert model.special_id_list.tolist() == [0, 1, 2, 4]


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    logits = torch.randn(2, 5, V, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("feature_at", ["embeddings_out", "word_embeddings"])
def test_text_loss_trains_the_image_encoder(feature_at):
    model = tiny("mrm_vit_tiny_test", text_feature_at=feature_at)
    batch = mrm_batch(2)
    torch.manual_seed(0)
    model(batch)["loss_text"].backward()
    for p in (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight, model.text_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.decoder_pred.weight.grad is None  # the text loss does not reach the image decoder
    # the visible-patch feature changes the text prediction (same masking draw, other image)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(batch)["loss_text"]
        torch.manual_seed(1)
        b = model({**batch, "image": batch["image"].flip(-1) * 3})["loss_text"]
    assert not torch.allclose(a, b)


def test_text_kwargs_from_shards(tmp_path: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "lung": 5, "##s": 6, "clear": 7, "##er": 8}
    Tokenizer(WordPiece(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    tok = {"file": "tokenizer.json", "vocab_size": len(vocab), "special_ids": SPECIAL}
    base = {"dataset": "mimic", "splits": {}, "pixel_stats": {"mean": 0.5, "std": 0.25}}
    (tmp_path / "manifest.json").write_text(json.dumps({**base, "tokenizer": tok}))
    kw = text_kwargs_from_shards(tmp_path)
    assert kw["vocab_size"] == 9 and kw["special_ids"] == SPECIAL
    assert kw["wordpiece_continuation"].tolist() == [False] * 6 + [True, False, True]
    model = build_model("mrm_vit_tiny_test", **kw)
    assert model.text.config.vocab_size == 9

    (tmp_path / "manifest.json").write_text(json.dumps({**base, "tokenizer": None}))
    with pytest.raises(ValueError, match="carry no reports"):
        text_kwargs_from_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        text_kwargs_from_shards(tmp_path / "nowhere")


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_mrm_end_to_end_with_mrms_tokenizer_and_whole_report(mimic_shards_mrm_tokenizer: Path, backend: str):
    """Shards tokenized with an MRM-style tokenizer (no [SEP]) -> the whole report through build_loader ->
    an MRM model configured as published (always [MASK], all-position loss): a finite loss."""
    from cxrfast.pipelines import build_loader

    kw = text_kwargs_from_shards(mimic_shards_mrm_tokenizer)
    assert "sep" not in kw["special_ids"]
    model = tiny("mrm_vit_tiny_test", **kw, mlm_replace_mask=1.0, mlm_replace_random=0.0, mlm_all_positions=True)
    loader = build_loader(mimic_shards_mrm_tokenizer, "train", "mrm", batch_size=2, backend=backend, device="cpu",
                          num_threads=1, image_size=64, text="report")  # fmt: skip
    batch = next(iter(loader))
    assert (batch["ids"][:, 0] == kw["special_ids"]["cls"]).all()
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss_text"] > 0


# --- trainer interface ----------------------------------------------------------------------------------


def test_flops_per_image():
    gflop = build_model("mae_vit_base_patch16", mask_ratio=0.9).flops_per_image() / 1e9
    # The 43.1 GFLOP counts 3-channel images (patch embedding and prediction head x3).
    rgb = build_model("mae_vit_base_patch16", mask_ratio=0.9, in_chans=3).flops_per_image() / 1e9
    assert abs(rgb - 43.1) < 0.05, rgb
    assert abs(gflop - 42.32) < 0.05, gflop
    tiny_mae = tiny("mae_vit_tiny_test")
    assert tiny_mae.flops_per_image() > tiny("mae_vit_tiny_test", mask_ratio=0.9).flops_per_image()
    mrm = tiny("mrm_vit_tiny_test")
    assert mrm.flops_per_image() > tiny("mae_vit_tiny_test").flops_per_image()  # bigger head + text branch


def test_no_weight_decay():
    model = tiny("mrm_vit_tiny_test")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias",
            "text.mlm.bert.embeddings.LayerNorm.weight"} <= names
    assert "blocks.0.attn.qkv.weight" not in names and "patch_embed.proj.weight" not in names
    assert all(p.ndim <= 1 for n, p in params.items() if n in names and n not in ("cls_token", "mask_token"))


def test_bf16_forward_backward_and_missing_batch_keys():
    model = tiny("mrm_vit_tiny_test").to(torch.bfloat16)  # as DeepSpeed's bf16 mode casts it
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in mrm_batch(2).items()}
    out = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"batch lacks \['target'\].*'mrm' augmentation"):
        model({k: v for k, v in batch.items() if k != "target"})
