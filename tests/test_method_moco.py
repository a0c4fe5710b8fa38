"""MoCo v2 (MoCo-CXR) method: loss, momentum encoder, queue, shuffle-BN, BatchNorm precision, export.

Unit level on CPU with a tiny ResNet18; the 2-rank checks run in a 2-process gloo group
(torch.multiprocessing), cheaper than the deepspeed launcher. bf16 "as under DeepSpeed" casts
every parameter and restores the method's fp32 names with the trainer's own functions. One slow
end-to-end test trains `tiny_moco` through `cxrfast train`, resumes it from a mid-epoch checkpoint
and loads the exported encoder into timm.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cxrfast.methods.base import StepContext
from cxrfast.methods.moco import MoCo, MoCoMethodConfig, info_nce
from cxrfast.models.moco import GroupBatchNorm2d, MoCoEncoder, create_backbone, forward_flops
from cxrfast.trainer.build import fp32_originals, restore_fp32

SIZE = 32  # image side of the unit tests
MICRO = 4  # micro-batch per rank
ACCUM = 2  # micro-batches per optimizer step
QUEUE = 24  # a multiple of the global batch (MICRO x ACCUM = 8)


def tiny(**kw) -> MoCo:
    cfg = dict(arch="resnet18", image_size=SIZE, queue_size=QUEUE, dim=8) | kw
    return MoCo(MoCoMethodConfig(**cfg), mean=0.5, std=0.25)


def context(*, step: int = 0, world: int = 1, rank: int = 0, micro: int = MICRO, accum: int = ACCUM) -> StepContext:
    return StepContext(step=step, epoch=0, epochs=1, steps_per_epoch=100, rank=rank, world_size=world,
                       global_batch=micro * accum * world, accumulation=accum)


def views(n: int = MICRO, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 1, SIZE, SIZE, generator=g), "image2": torch.randn(n, 1, SIZE, SIZE, generator=g)}


class Recorder(nn.Module):
    """Key-encoder stand-in: records each batch it is given; feature row = (pixel mean, 1, 0, ...),
    so the sample a normalised key belongs to is key[0] / key[1]."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        out = torch.zeros(x.shape[0], self.dim)
        out[:, 0], out[:, 1] = x.float().mean(dim=(1, 2, 3)), 1.0
        return out


def constant_views(values: list[float]) -> dict[str, torch.Tensor]:
    """Key views whose every pixel is the sample's value (recoverable through `Recorder`)."""
    v = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE).contiguous()
    return {"image": torch.randn(len(values), 1, SIZE, SIZE), "image2": v}


def key_values(keys: torch.Tensor) -> list[float]:
    return (keys[:, 0] / keys[:, 1]).tolist()


def as_deepspeed_bf16(m: MoCo) -> MoCo:
    """What the trainer's engine does under bf16: DeepSpeed casts every parameter, then the
    trainer restores the tensors under `fp32_names()` from copies taken before."""
    originals = fp32_originals(m)
    for p in m.parameters():
        p.data = p.data.bfloat16()
    restore_fp32(m, originals)
    return m


# --- loss ------------------------------------------------------------------------------------
def test_info_nce_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    t = 0.2
    ref = 0.0
    for i in range(5):  # -log softmax of the positive among [positive, negatives], float64
        pos = torch.exp(q[i].double() @ k[i].double() / t)
        neg = sum(torch.exp(q[i].double() @ queue[j].double() / t) for j in range(40))
        ref += -torch.log(pos / (pos + neg)) / 5
    assert torch.allclose(info_nce(q, k, queue, t).double(), ref, atol=1e-5)


# --- momentum encoder and queue ---------------------------------------------------------------
def test_momentum_update_and_queue_once_per_step_with_accumulation():
    torch.manual_seed(0)
    m = tiny(bn_splits=1).train()
    m.on_train_start(context())
    queue0, key0 = m.queue.keys.clone(), copy.deepcopy(m.key.state_dict())
    key_ref = copy.deepcopy(m.key)  # one BatchNorm group: the shuffle must not change the keys
    opt = torch.optim.SGD(m.query.parameters(), lr=0.5)
    expected = []
    for micro in range(ACCUM):
        batch = views(seed=micro)
        loss = m(batch)["loss"]
        # the loss uses the queue as it was at the start of the step; nothing moved yet
        q = F.normalize(m.query(batch["image"]), dim=1)
        with torch.no_grad():
            k = F.normalize(key_ref(batch["image2"]), dim=1)
        assert torch.allclose(loss, info_nce(q, k, queue0, 0.2), atol=1e-5)
        assert torch.equal(m.queue.keys, queue0) and int(m.queue.ptr) == 0
        loss.backward()
        expected.append(k)
    assert all(p.grad is None for p in m.key.parameters())
    assert all(torch.equal(p, key0[n]) for n, p in m.key.named_parameters())
    opt.step()
    m.after_optimizer_step(context(step=1))

    # key = 0.999 key + 0.001 query, once for the step
    for (name, pk), pq in zip(m.key.named_parameters(), m.query.parameters(), strict=True):
        assert torch.allclose(pk, 0.999 * key0[name] + 0.001 * pq, atol=1e-7), name
    # both micro-batches' keys enqueued once, in order; the pointer moved by the global batch
    gb = MICRO * ACCUM
    assert int(m.queue.ptr) == gb
    assert torch.allclose(m.queue.keys[:gb], torch.cat(expected), atol=1e-5)
    assert torch.equal(m.queue.keys[gb:], queue0[gb:])
    # the pointer wraps around the queue
    for step in (2, 3):
        for micro in range(ACCUM):
            m(views(seed=10 * step + micro))
        m.after_optimizer_step(context(step=step))
    assert int(m.queue.ptr) == (3 * gb) % QUEUE == 0


def test_momentum_update_survives_fp32_where_bf16_loses_it():
    """The precision trap: 0.1% of a small difference is below bf16 resolution."""
    m = tiny().train()
    m.on_train_start(context())
    with torch.no_grad():
        for p in m.query.parameters():
            p.add_(1e-3)
    before = [p.clone() for p in m.key.parameters()]
    m(views())
    m(views(seed=1))
    m.after_optimizer_step(context(step=1))
    moved = [not torch.equal(a, b) for a, b in zip(before, m.key.parameters(), strict=True)]
    assert all(moved)
    bn_weight = m.key.backbone.bn1.weight  # starts at 1.0: the same update held in bf16 is lost
    assert (bn_weight != 1.0).all()
    w = torch.ones(4, dtype=torch.bfloat16)
    assert torch.equal(torch.lerp(w, w + 1e-3, 0.001), w)


def test_validation_step_leaves_queue_and_key_encoder_alone():
    m = tiny()
    m.train()
    m.on_train_start(context())
    m.eval()
    state = copy.deepcopy(m.state_dict())
    out = m.validation_step(views())
    assert torch.isfinite(out["loss"])
    assert all(torch.equal(v, state[n]) for n, v in m.state_dict().items())
    assert not m._pending
    m.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        m.validation_step(views())


def test_bf16_as_under_deepspeed_keeps_fp32_state_exact():
    torch.manual_seed(0)
    m = tiny().train()
    key0 = copy.deepcopy(m.key.state_dict())
    as_deepspeed_bf16(m)
    m.on_train_start(context())  # its precision check passes
    assert m.query.backbone.conv1.weight.dtype == torch.bfloat16
    # the key encoder's fp32 values came back exactly (a cast back alone keeps the bf16 rounding)
    assert all(torch.equal(v, key0[n]) for n, v in m.key.state_dict().items())
    assert m.queue.keys.dtype == torch.float32 and m.query.backbone.bn1.running_mean.dtype == torch.float32
    for micro in range(ACCUM):
        out = m({k: v.bfloat16() for k, v in views(seed=micro).items()})
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        out["loss"].backward()
    assert m.query.backbone.conv1.weight.grad.dtype == torch.bfloat16
    assert m.query.backbone.bn1.running_mean.dtype == torch.float32
    m.after_optimizer_step(context(step=1))
    assert m.key.backbone.conv1.weight.dtype == torch.float32 and int(m.queue.ptr) == MICRO * ACCUM
    assert not torch.equal(m.key.backbone.conv1.weight, key0["backbone.conv1.weight"])


# --- shuffle-BN -------------------------------------------------------------------------------
def test_single_rank_keys_use_other_batchnorm_groups():
    m = tiny().train()
    m.on_train_start(context(micro=8, accum=1))  # one rank: 2 BatchNorm groups per micro-batch
    assert {b.groups for b in m.modules() if isinstance(b, GroupBatchNorm2d)} == {2}
    m.key = Recorder()
    values = [float(i + 1) for i in range(8)]
    m(constant_views(values))
    assert key_values(m._pending[0]) == pytest.approx(values)  # unshuffled back to the samples' order
    seen = [float(v) for v in m.key.seen[0].mean(dim=(1, 2, 3))]
    query_group = {v: {u for j, u in enumerate(values) if j % 2 == i % 2} for i, v in enumerate(values)}
    key_group = {v: {u for j, u in enumerate(seen) if j % 2 == i % 2} for i, v in enumerate(seen)}
    assert sorted(seen) == values and any(query_group[v] != key_group[v] for v in values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # shuffle-BN: each rank's key batch mixes both ranks' samples; keys come back to their owners
        torch.manual_seed(rank)  # different queues at build: on_train_start makes them one
        m = tiny(queue_size=32).train()
        m.on_train_start(context(world=2, rank=rank, micro=4, accum=1))
        assert {b.groups for b in m.modules() if isinstance(b, GroupBatchNorm2d)} == {1}
        queues = [torch.empty_like(m.queue.keys) for _ in range(2)]
        dist.all_gather(queues, m.queue.keys)
        assert torch.equal(queues[0], queues[1])
        real_key = m.key
        m.key = Recorder()
        own = [float(10 * rank + i + 1) for i in range(4)]
        m(constant_views(own))
        assert key_values(m._pending[0]) == pytest.approx(own)
        seen = sorted(float(v) for v in m.key.seen[0].mean(dim=(1, 2, 3)))
        everyone: list[list[float]] = [[], []]
        dist.all_gather_object(everyone, seen)
        assert sorted(everyone[0] + everyone[1]) == sorted([float(10 * r + i + 1) for r in range(2) for i in range(4)])
        assert seen != sorted(own)  # this rank's keys were normalised among other samples

        # the queue advances by the global batch (2 ranks x 2 micro-batches x 2), keys in rank order
        m.key = real_key
        m._pending.clear()
        as_deepspeed_bf16(m)  # bf16 views and queries, gathered across ranks
        ctx = context(world=2, rank=rank, micro=2, accum=2)
        m.on_train_start(ctx)
        for micro in range(2):
            m({k: v.bfloat16() for k, v in views(2, seed=100 * rank + micro).items()})
        mine = torch.cat(m._pending)
        gathered = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        m.after_optimizer_step(context(step=1, world=2, rank=rank, micro=2, accum=2))
        assert int(m.queue.ptr) == 8
        assert torch.equal(m.queue.keys[:8], torch.cat(gathered))
        dist.all_gather(queues, m.queue.keys)
        assert torch.equal(queues[0], queues[1])
    finally:
        dist.destroy_process_group()


def test_two_ranks_shuffle_bn_and_global_queue():
    mp.spawn(_two_rank_worker, args=(_free_port(),), nprocs=2)


# --- BatchNorm ----------------------------------------------------------------------------------
def test_group_batchnorm_matches_per_group_reference_and_keeps_fp32_stats():
    torch.manual_seed(0)
    bn = GroupBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.groups = 2
    x = torch.randn(6, 3, 5, 5)
    y = bn(x)
    stats = []
    for g in range(2):  # sample i is in group i % 2; running statistics = mean of the groups' updates
        rm, rv = torch.zeros(3), torch.ones(3)
        ref = F.batch_norm(x[g::2], rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps)
        assert torch.allclose(y[g::2], ref, atol=1e-5)
        stats.append((rm, rv))
    assert torch.allclose(bn.running_mean, (stats[0][0] + stats[1][0]) / 2, atol=1e-6)
    assert torch.allclose(bn.running_var, (stats[0][1] + stats[1][1]) / 2, atol=1e-6)

    # bf16 activations (and bf16 weights, as under ZeRO): bf16 out, statistics fp32 and close
    fp32 = copy.deepcopy(bn)
    bf = copy.deepcopy(bn)
    bf.weight.data, bf.bias.data = bf.weight.data.bfloat16(), bf.bias.data.bfloat16()
    xb = x.bfloat16()
    out = bf(xb)
    fp32(xb.float())
    assert out.dtype == torch.bfloat16 and bf.running_mean.dtype == torch.float32
    assert torch.allclose(bf.running_mean, fp32.running_mean, atol=1e-3)

    bn.eval()  # evaluation: running statistics, groups ignored
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(x), ref, atol=1e-6)

    bn.running_mean.data = bn.running_mean.data.bfloat16()
    with pytest.raises(RuntimeError, match="must stay fp32"):
        bn(x)


def test_fp32_names_cover_key_queue_and_batchnorm_statistics():
    m = tiny()
    prefixes = m.fp32_names()
    names = [n for n, _ in [*m.named_parameters(), *m.named_buffers()]]
    must = [n for n in names if n.startswith(("key.", "queue.")) or "running_" in n]
    assert all(n.startswith(prefixes) for n in must)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(prefixes) for n in trainable)  # ZeRO's (BN weights included)
    for t in (m.key.head[0].weight, m.queue.keys):  # the check the method runs at train start
        t.data = t.data.bfloat16()
        with pytest.raises(RuntimeError, match="must stay fp32"):
            m.on_train_start(context())
        t.data = t.data.float()


# --- export and FLOPs ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_export_loads_strictly_into_timm_with_same_features(arch: str):
    import timm

    m = tiny(arch=arch, image_size=64).eval()
    exp = m.encoder_export()
    assert exp.arch == arch and exp.kwargs == {"in_chans": 1, "num_classes": 0}
    assert (exp.mean, exp.std) == (0.5, 0.25)
    model = timm.create_model(arch, pretrained=False, **exp.kwargs).eval()
    model.load_state_dict(exp.state_dict, strict=True)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), m.query.backbone(x), atol=1e-5)


def test_flops_per_image():
    fwd = forward_flops(lambda: create_backbone("resnet50"), image_size=224)
    assert 7.5e9 < fwd < 8.5e9  # ResNet-50: ~4.1 GMACs at 224
    m = tiny()
    enc = forward_flops(lambda: MoCoEncoder(create_backbone("resnet18"), dim=8, mlp=True), image_size=SIZE)
    assert m.flops_per_image() == pytest.approx(4 * enc + 4 * 8 * (QUEUE + 1))


# --- ImageNet initialisation -----------------------------------------------------------------------
def test_init_from_a_torchvision_file_sums_the_stem_and_starts_both_encoders_there(tmp_path: Path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)  # the layout of resnet18-f37072fd.pth
    with torch.no_grad():
        tv.layer1[0].bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    m = tiny(init=str(path))
    sd = tv.state_dict()
    assert torch.allclose(m.query.backbone.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(m.query.backbone.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert torch.equal(m.query.backbone.layer1[0].bn1.running_mean, sd["layer1.0.bn1.running_mean"])
    assert all(torch.equal(v, m.query.state_dict()[n]) for n, v in m.key.state_dict().items())

    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(ValueError, match=r"resnet18.pth: not resnet18 ImageNet weights .* 25 backbone tensors miss"):
        tiny(init=str(path))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)  # fits, but another depth
    with pytest.raises(ValueError, match=r"\d+ unexpected tensors besides the classifier fc\.\*"):
        tiny(init=str(path))


# --- bad input ----------------------------------------------------------------------------------
def test_clear_errors():
    m = tiny(queue_size=20)
    with pytest.raises(ValueError, match=r"queue_size=20 is not a multiple of the global batch 8"):
        m.on_train_start(context())
    m = tiny(bn_splits=3)
    with pytest.raises(ValueError, match=r"bn_splits=3: the micro-batch of 4"):
        m.on_train_start(context())
    with pytest.raises(FileNotFoundError, match="no-such-weights.pth"):
        tiny(init="/nonexistent/no-such-weights.pth")
    m = tiny().train()
    three = {"image": torch.randn(2, 3, SIZE, SIZE), "image2": torch.randn(2, 3, SIZE, SIZE)}
    with pytest.raises(ValueError, match=r"in_chans=1\) expects batch\['image'\] of shape \[N, 1, H, W\]"):
        m(three)
    with pytest.raises(ValueError, match="lacks \\['image2'\\]"):
        m({"image": torch.randn(2, 1, SIZE, SIZE)})
    with pytest.raises(ValueError, match="unknown timm architecture"):
        tiny(arch="resnet_nonexistent")
    with pytest.raises(ValueError, match="method.temperature"):
        MoCoMethodConfig(temperature=0)


def test_presets_carry_the_published_settings():
    from cxrfast.presets import get_preset

    for name, arch in (("moco_cxr_r18", "resnet18"), ("moco_cxr_r50", "resnet50"), ("moco_cxr_d121", "densenet121")):
        cfg = get_preset(name)
        m, o = cfg.method, cfg.optim
        assert isinstance(m, MoCoMethodConfig) and cfg.method_name == "moco"
        assert (m.arch, m.image_size, m.dim, m.mlp, m.queue_size, m.momentum, m.temperature) == (
            arch, 320, 128, True, 24576, 0.999, 0.2)
        assert (m.pixel_norm, m.mean, m.std, m.decay_all) == ("published", 0.5020, 0.085585, True)
        assert m.init == {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-19c8e357.pth",
                          "densenet121": "densenet121-a639ec97.pth"}[arch]  # torchvision's ImageNet weights
        assert (o.name, o.lr, o.weight_decay, o.betas, o.epochs, o.warmup_epochs) == (
            "adam", 1e-4, 1e-4, (0.9, 0.999), 20, 0)
        assert (o.schedule, o.milestones, o.gamma) == ("step", (12, 18, 24), 0.1)
        assert cfg.train.global_batch_size == 16 and m.queue_size % 16 == 0


# --- end to end through the trainer ---------------------------------------------------------------
@pytest.mark.slow
def test_train_resume_mid_epoch_and_export(mimic_shards: Path, tmp_path: Path):
    """`cxrfast train --preset tiny_moco` on one rank (bf16, 2 BatchNorm groups, accumulation 2) with a
    checkpoint inside epoch 2; resuming from it logs the uninterrupted run's losses."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_train_e2e import _cxrfast_train, _metrics

    from cxrfast.methods import build_method
    from cxrfast.models.export import load_encoder, read_metadata
    from cxrfast.presets import get_preset
    from cxrfast.shards.folder import open_shards

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--preset", "tiny_moco", "--shards", str(mimic_shards), "batch_size=2", "global_batch_size=4",
            "epochs=3", "milestones=2", "log_every=1", "num_threads=1", "ckpt_every_steps=4", "ckpt_keep=0"]
    proc = _cxrfast_train([*args, "--out", str(full)])
    assert proc.returncode == 0, proc.stderr[-6000:]
    spe = json.loads((full / "config.json").read_text())["steps_per_epoch"]
    assert spe == 3 and "BatchNorm groups per rank 2 over 1 rank(s)" in proc.stderr
    proc = _cxrfast_train([*args, "--out", str(resumed), "--resume-from", str(full / "checkpoints" / "step_00000004")])
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = {r["step"]: r for r in _metrics(full)}
    after = _metrics(resumed)
    assert [r["step"] for r in after] == list(range(5, 3 * spe + 1))
    for r in after:  # queue, key encoder, shuffles and data position all carried over
        assert r["loss"] == pytest.approx(rows[r["step"]]["loss"], rel=1e-6), r["step"]
        assert r["lr"] == pytest.approx(rows[r["step"]]["lr"], rel=1e-9)
    assert rows[7]["lr"] == pytest.approx(rows[6]["lr"] * 0.1)  # the step schedule, milestone at epoch 2

    # The checkpoint: fp32 key encoder and queue; the queue pointer moved by the global batch per step.
    ckpt = full / "checkpoints" / f"step_{3 * spe:08d}"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module["key.backbone.conv1.weight"].dtype == module["queue.keys"].dtype == torch.float32
    assert int(module["queue.ptr"]) == (3 * spe * 4) % 32

    # The exported encoder loads strictly into timm and gives the trained query backbone's features.
    encoder = full / "encoder.safetensors"
    meta = read_metadata(encoder)
    assert (meta["arch"], meta["method"], float(meta["mean"]), float(meta["std"])) == (
        "resnet18", "moco", 0.502, 0.085585)
    net = load_encoder(encoder)  # strict
    trained = build_method(get_preset("tiny_moco").method, open_shards(mimic_shards))
    fresh = copy.deepcopy(trained.query.backbone)
    trained.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(full / "checkpoints")), strict=True)
    assert not torch.equal(trained.query.backbone.conv1.weight, fresh.conv1.weight)  # it did train
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), trained.eval().query.backbone(x), rtol=1e-5, atol=1e-5)
