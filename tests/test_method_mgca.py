"""MGCA as a method (CPU, tiny preset): the encoders' [CLS] attention against the libraries' own
attention maps, text-model loading and its clear errors, both exports, the prototype hooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cxrfast.methods import build_method
from cxrfast.methods.base import StepContext
from cxrfast.methods.mgca import MGCA, TEXT_ENCODER_DIR
from cxrfast.presets import get_preset
from cxrfast.shards.folder import open_shards


def tiny_cfg(**overrides):
    cfg = get_preset("tiny_mgca").method
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def ctx(epoch: int = 0) -> StepContext:
    return StepContext(step=0, epoch=epoch, epochs=4, steps_per_epoch=1, rank=0, world_size=1, global_batch=4,
                       accumulation=1)


@pytest.fixture(scope="module")
def method(mimic_shards: Path) -> MGCA:
    torch.manual_seed(0)
    m = build_method(tiny_cfg(), open_shards(mimic_shards))
    assert isinstance(m, MGCA)
    return m


def batch_for(m: MGCA, b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic batch: random images; report ids [CLS] w.. [SEP] of different lengths, the last sample without text."""
    g = torch.Generator().manual_seed(seed)
    size, n = m.image.timm_kwargs["img_size"], m.cfg.text_len
    special = {"cls": 2, "sep": 3}
    ids = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate([12, 30, 0][:b]):
        if length:
            ids[i, :length] = torch.randint(5, 200, (length,), generator=g)
            ids[i, 0], ids[i, length - 1] = special["cls"], special["sep"]
            mask[i, :length] = 1
    return {"image": torch.randn(b, 1, size, size, generator=g), "ids": ids, "attention_mask": mask}


# --- encoders ----------------------------------------------------------------------------------
def test_image_encoder_tokens_and_cls_attention_match_timm(method: MGCA):
    """The manual forward gives timm's `forward_features`; the [CLS] attention equals the last
    block's full attention matrix (computed the published way, q @ k^T on all tokens)."""
    vit = method.image.vit.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        tokens, cls_attn = method.image(x)
        torch.testing.assert_close(tokens, vit.forward_features(x))
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks[:-1]:
            h = blk(h)
        attn = vit.blocks[-1].attn
        b, t, c = h.shape
        qkv = attn.qkv(vit.blocks[-1].norm1(h)).reshape(b, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        full = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    torch.testing.assert_close(cls_attn, full[:, :, 0, 1:].mean(dim=1))
    method.image.train()


def test_report_encoder_matches_bert_and_its_attention_map(method: MGCA):
    """Hidden states equal `BertModel(...)`; the [CLS] attention equals transformers' own
    (eager) attention map of the last layer, averaged over heads."""
    batch = batch_for(method, b=2)
    bert = method.text.bert.eval()
    ids, mask = batch["ids"], batch["attention_mask"]
    impl = bert.config._attn_implementation
    with torch.no_grad():
        rep = method.text(ids, mask)
        bert.set_attn_implementation("eager")
        try:
            out = bert(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            bert.set_attn_implementation(impl)
    torch.testing.assert_close(rep.report, out.last_hidden_state[:, 0])
    cls = out.attentions[-1][:, :, 0].mean(dim=1)  # [B, L]
    # published layout: word 1 of sample 0 (a single-piece word at token 1) carries the attention to token 2
    torch.testing.assert_close(rep.attn[0, 0], cls[0, 2])
    method.text.train()


# --- forward / hooks ---------------------------------------------------------------------------
def test_forward_parts_backward_and_prototype_freeze(method: MGCA):
    batch = batch_for(method)
    method.train()
    method.on_train_start(ctx())
    method.on_epoch_start(ctx(0))
    out = method(batch)
    assert set(out) == {"loss", "loss_instance", "loss_local", "loss_proto"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_instance"] + out["loss_local"] + out["loss_proto"])
    method.zero_grad()
    out["loss"].backward()
    grad = method.prototypes.weight.grad
    assert grad is not None and (grad == 0).all()  # frozen in epoch 0: a zero gradient, not none
    assert method.image.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    method.on_epoch_start(ctx(1))
    method.zero_grad()
    method(batch)["loss"].backward()
    assert method.prototypes.weight.grad.abs().sum() > 0
    method.zero_grad()


def test_grad_checkpointing_gives_the_same_loss_and_gradients(method: MGCA):
    batch = batch_for(method)
    method.train()
    method.on_epoch_start(ctx(1))
    results = []
    for enable in (False, True):
        method.set_grad_checkpointing(enable)
        method.zero_grad()
        torch.manual_seed(3)  # BERT's dropout: checkpointing replays the same random state
        loss = method(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), method.image.vit.blocks[0].attn.qkv.weight.grad.clone(),
                        method.text.bert.encoder.layer[0].attention.self.query.weight.grad.clone()))
    method.set_grad_checkpointing(False)
    method.zero_grad()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_sample_without_text_changes_no_loss(method: MGCA):
    """The batch with a sample without text gives the losses of the batch without it (BatchNorm
    in eval mode, so the statistics do not depend on the batch)."""
    method.eval()
    full = batch_for(method, b=3)
    two = {k: v[:2] for k, v in full.items()}
    with torch.no_grad():
        a, b = method.validation_step(full), method.validation_step(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    method.train()


def test_prototypes_renormalised_after_optimizer_step(method: MGCA):
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    method.after_optimizer_step(ctx(1))
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(method.cfg.num_prototypes))


def test_low_precision_prototypes_without_a_reachable_master_are_refused(mimic_shards: Path):
    """bf16 weights whose fp32 master DeepSpeed does not expose (its ZeRO-0 bf16 optimizer; here a
    plain bf16 module) cannot be renormalised where it matters: a clear error at the start."""
    torch.manual_seed(0)
    m = build_method(tiny_cfg(), open_shards(mimic_shards)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="use train.zero_stage=1 or 2"):
        m.on_train_start(ctx())


def test_data_requests(method: MGCA):
    train, val = method.data_request("train"), method.data_request("validate")
    assert (train.augmentation, val.augmentation) == ("mgca", "mgca_eval")
    assert train.text == val.text == "mgca_caption"  # the published caption by default
    assert train.text_len == val.text_len == 112 and train.image_size == 64
    assert (train.mean, train.std) == (0.5, 0.5)


def test_param_groups_decay_everything_as_published(method: MGCA):
    groups = method.param_groups(0.05)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in method.parameters())
    method.cfg.decay_all = False
    try:
        assert {g["weight_decay"] for g in method.param_groups(0.05)} == {0.05, 0.0}
    finally:
        method.cfg.decay_all = True


# --- exports -------------------------------------------------------------------------------------
def test_exports_load_strictly(method: MGCA, mimic_shards: Path, tmp_path: Path):
    import timm
    from tokenizers import Tokenizer
    from transformers import AutoModel, AutoTokenizer

    method.eval()
    exp = method.encoder_export()
    vit = timm.create_model(exp.arch, pretrained=False, **exp.kwargs)
    vit.load_state_dict(exp.state_dict, strict=True)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), method.image.vit.forward_features(x))

    shards = open_shards(mimic_shards)
    (folder,) = method.extra_exports(tmp_path, shards)
    assert folder == tmp_path / TEXT_ENCODER_DIR
    # MGCA's BERT has no pooler: strict without it; a default AutoModel reports only the pooler as new
    model, info = AutoModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"} and not info["unexpected_keys"]
    batch = batch_for(method, b=2)
    with torch.no_grad():
        want = method.text.bert(input_ids=batch["ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = model.eval()(input_ids=batch["ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, want)
    text = "no focal consolidation. heart size is normal."
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == \
        Tokenizer.from_file(str(shards.tokenizer_path)).encode(text).ids
    assert not list(tmp_path.glob(".*tmp*"))  # the temp folder was renamed
    method.train()


# --- text model from a local folder ------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_folder(mimic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer BERT saved as a Hugging Face folder with the shards' tokenizer (stands in for Bio_ClinicalBERT)."""
    from cxrfast.models.mgca import random_bert

    shards = open_shards(mimic_shards)
    torch.manual_seed(1)
    bert = random_bert(vocab_size=shards.vocab_size, pad_id=shards.special_ids["pad"], width=32, layers=3, heads=2,
                       intermediate=64, max_len=128)
    out = tmp_path_factory.mktemp("bert") / "bert3"
    bert.save_pretrained(out)
    shutil.copy(shards.tokenizer_path, out / "tokenizer.json")
    return out


def test_text_model_starts_from_the_first_layers_of_a_folder(mimic_shards: Path, bert_folder: Path):
    from transformers import BertModel

    m = build_method(tiny_cfg(text_model=str(bert_folder), text_layers=2), open_shards(mimic_shards))
    src = BertModel.from_pretrained(bert_folder, add_pooling_layer=False)
    assert m.text.bert.config.num_hidden_layers == 2
    mine = m.text.bert.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("encoder.layer.2."):
            torch.testing.assert_close(mine[k], v, msg=k)


def test_tokenizer_mismatch_is_a_clear_error(mimic_shards: Path, bert_folder: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(bert_folder, other)
    (other / "tokenizer.json").unlink()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "heart"]))
    with pytest.raises(ValueError, match=r"not the one the shards' report ids were made with.*--tokenizer"):
        build_method(tiny_cfg(text_model=str(other)), open_shards(mimic_shards))


def test_missing_or_incomplete_text_model_folder(mimic_shards: Path, bert_folder: Path, tmp_path: Path):
    shards = open_shards(mimic_shards)
    with pytest.raises(FileNotFoundError, match=r"method.text_model=.*nowhere: no such folder"):
        build_method(tiny_cfg(text_model=str(tmp_path / "nowhere")), shards)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds no weights"):
        build_method(tiny_cfg(text_model=str(bare)), shards)
    with pytest.raises(ValueError, match="has only 3 layers"):
        build_method(tiny_cfg(text_model=str(bert_folder), text_layers=6), shards)


def test_shards_without_reports_are_refused(chexpert_shards: Path):
    with pytest.raises(ValueError, match="method 'mgca' needs report token ids"):
        build_method(tiny_cfg(), open_shards(chexpert_shards))


def test_shards_without_the_chosen_text_are_refused(mimic_shards: Path, tmp_path: Path):
    """Shards written before MGCA's caption was stored: a clear error, or the findings + impression text."""
    old = tmp_path / "old"
    shutil.copytree(mimic_shards, old)
    m = json.loads((old / "manifest.json").read_text())
    m["tokenizer"]["texts"] = ["findings_impression", "report"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"'mgca_caption' report text \(mgca.ids.i32\).*re-shard"):
        build_method(tiny_cfg(), open_shards(old))
    m = build_method(tiny_cfg(text="findings_impression"), open_shards(old))
    assert m.data_request("train").text == "findings_impression"


def test_image_encoder_starts_from_a_deit_file(mimic_shards: Path, tmp_path: Path):
    """A DeiT-style file ({"model": ...}, RGB patch embedding, classifier head): the ViT gets its
    tensors with the patch embedding summed over RGB; a file that lacks encoder tensors is an error."""
    import timm

    from cxrfast.models.mgca import image_encoder_kwargs

    name, kwargs = image_encoder_kwargs("vit_tiny_test")
    torch.manual_seed(5)
    rgb = timm.create_model(name, pretrained=False, **{**kwargs, "in_chans": 3, "num_classes": 10})
    sd = rgb.state_dict()
    torch.save({"model": sd}, tmp_path / "deit.pth")
    m = build_method(tiny_cfg(init=str(tmp_path / "deit.pth")), open_shards(mimic_shards))
    vit = m.image.vit.state_dict()
    torch.testing.assert_close(vit["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(vit["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    del sd["blocks.1.mlp.fc2.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*blocks.1.mlp.fc2.weight"):
        build_method(tiny_cfg(init=str(tmp_path / "partial.pth")), open_shards(mimic_shards))
