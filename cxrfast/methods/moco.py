"""MoCo v2 / MoCo-CXR as a method (Sowrirajan et al., MoCo-CXR; He et al., MoCo; Chen et al., MoCo v2).

Batches: the `moco` augmentation, two independently augmented views `image` (queries) and `image2`
(keys). A query encoder (timm backbone + MLP head, `cxrfast.models.moco`) is trained with InfoNCE
against its positive key and a queue of negative keys; the key encoder is a momentum (EMA) copy.

What happens when (the trainer calls the hooks, `cxrfast.methods.base`):
- each micro-batch (`forward`): query features with gradients; keys from the key encoder on a
  shuffled batch (shuffle-BN, below), without gradients; the loss uses the queue as it was at the
  start of the optimizer step; the keys are kept (fp32) until the step ends.
- after each optimizer step (`after_optimizer_step`): the key encoder moves towards the query
  encoder, `k = m k + (1 - m) q` (the published code does this at the start of the next forward:
  the same sequence of weights), and the keys of every micro-batch of the step, gathered from all
  ranks, replace the oldest rows of the queue, so the queue advances by the global batch per step.
- `validation_step`: the same loss in eval mode (BatchNorm running statistics), reading the queue
  and the key encoder without changing either. The queue moves with training, so this loss is a
  health signal rather than a selection criterion across epochs (the published runs do not
  validate during pre-training).

Shuffle-BN. Across ranks (MoCo's): the key views of all ranks are gathered, permuted, each rank
computes the keys of its share of the permutation, and the keys are gathered back and unpermuted,
so a key's BatchNorm statistics come from other samples than its query's. On a single rank there
is no other batch to borrow statistics from; the equivalent used here is MoCo's single-GPU
emulation (SplitBatchNorm, facebookresearch/moco's CIFAR demo): every BatchNorm of both encoders
normalises the micro-batch in `G` groups (sample i in group i % G), and the key batch is permuted
before it, so a single rank behaves like G ranks with cross-rank shuffle. `method.bn_splits`
sets G per rank; the default (0) is 1 with several ranks and 2 on one. The permutation is a
function of (optimizer step, micro-batch), identical on all ranks without a broadcast, so a
resumed run draws the same ones. (The published MoCo-CXR runs used one GPU, where MoCo's shuffle
is a no-op; `bn_splits=1` on one rank reproduces that.)

Precision (bf16 under DeepSpeed): the key encoder's weights, the queue and every BatchNorm's
running statistics are fp32 (`fp32_names`): an EMA with m = 0.999 in bf16 would lose the update.
The key encoder runs under `torch.autocast` with the input's dtype (bf16 convolutions, fp32
weights kept); BatchNorm runs in fp32 (`GroupBatchNorm2d`); features are normalised and the loss is
computed in fp32. The momentum update reads the query encoder's compute weights (bf16 under ZeRO,
the weights the query forward uses; the fp32 masters are partitioned across ranks).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig, StepContext
from cxrfast.methods.mae import PIXEL_NORMS, request_pixel_norm, resolve_pixel_norm
from cxrfast.models.moco import (
    GroupBatchNorm2d,
    KeyQueue,
    MoCoEncoder,
    convert_batchnorm,
    create_backbone,
    forward_flops,
    set_batchnorm_groups,
)
from cxrfast.shards.shard_set import ShardSet

log = logging.getLogger(__name__)

#: MoCo-CXR's normalisation (aihc_utils/image_transform.py: CXR_MEAN, CXR_STD), on the 0..1 scale.
CXR_MEAN, CXR_STD = 0.5020, 0.085585
IN_CHANS = 1


@dataclass(kw_only=True)
class MoCoMethodConfig(MethodConfig):
    """MoCo v2 (MoCo-CXR). `init`: a local ImageNet weights file (timm or torchvision), RGB stem summed."""

    arch: str = "resnet50"  # timm CNN backbone (MoCo-CXR: resnet18, resnet50, densenet121)
    image_size: int = 320  # side of both views (the moco augmentation's crop)
    dim: int = 128  # feature dimension of queries, keys and the queue
    mlp: bool = True  # MoCo v2 MLP head (Linear-ReLU-Linear); false = one Linear (MoCo v1)
    queue_size: int = 24576  # negative keys K; must be a multiple of the global batch
    momentum: float = 0.999  # key encoder EMA momentum m
    temperature: float = 0.2  # softmax temperature T
    bn_splits: int = 0  # BatchNorm groups per rank's micro-batch (shuffle-BN); 0 = 1 on several ranks, 2 on one
    pixel_norm: str = "published"  # published: mean/std below; shards: each shard folder's measured statistics
    mean: float = CXR_MEAN  # pixel mean on the 0..1 scale (pixel_norm=published)
    std: float = CXR_STD  # pixel std on the 0..1 scale (pixel_norm=published)
    decay_all: bool = True  # weight decay on every parameter incl. BatchNorm and biases (the published Adam)

    def __post_init__(self) -> None:
        for name in ("image_size", "dim", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"method.momentum must be in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {self.temperature}")
        if self.bn_splits < 0:
            raise ValueError(f"method.bn_splits must be >= 0 (0 = auto), got {self.bn_splits}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"method.pixel_norm must be one of {PIXEL_NORMS}, got {self.pixel_norm!r}")
        if self.std <= 0:
            raise ValueError(f"method.std must be > 0, got {self.std}")


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's loss: cross-entropy of the positive among [positive, queue] logits.

    q, k: [N, D] L2-normalised queries and their positive keys; queue: [K, D] negatives -> scalar.
    """
    pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    neg = q @ queue.t()  # [N, K]
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` ([n, ...], same shape on every rank) over ranks in rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shuffle_permutation(n: int, *, step: int, micro: int) -> torch.Tensor:
    """The key shuffle of micro-batch `micro` of optimizer step `step`: a permutation of n, the
    same on every rank and in a resumed run (CPU generator seeded from the position)."""
    gen = torch.Generator().manual_seed(step * 65_537 + micro)
    return torch.randperm(n, generator=gen)


def load_init(backbone: torch.nn.Module, path: str, *, arch: str) -> None:
    """Load the local ImageNet weights file `path` (timm or torchvision names) into the timm
    `backbone` (`cxrfast.models.init_weights`: the RGB stem summed to one channel, a classifier
    head in the file left out). The file must be exactly this backbone plus its classifier: a
    missing tensor (except BatchNorm's `num_batches_tracked`, absent from old torchvision files) or
    an extra one (e.g. the deeper stages of another depth) is an error."""
    from cxrfast.models.init_weights import load_encoder_weights

    report = load_encoder_weights(backbone, path)
    missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    head = f"{backbone.pretrained_cfg.get('classifier', 'fc')}."
    extra = [k for k in report.unexpected if not k.startswith(head)]
    if missing or extra:
        raise ValueError(f"method.init={path}: not {arch} ImageNet weights (timm or torchvision format): "
                         f"{len(missing)} backbone tensors missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                         f"tensors besides the classifier {head}* (e.g. {extra[:3]})")


class MoCo(Method):
    """Query encoder `query`, momentum key encoder `key`, negative-key queue `queue`."""

    name: ClassVar[str] = "moco"
    config_cls: ClassVar[type[MethodConfig]] = MoCoMethodConfig
    augmentation: ClassVar[str] = "moco"

    def __init__(self, cfg: MoCoMethodConfig, *, mean: float, std: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean, self.std = mean, std
        backbone = create_backbone(cfg.arch, in_chans=IN_CHANS)
        if cfg.init is not None:
            load_init(backbone, cfg.init, arch=cfg.arch)
        convert_batchnorm(backbone)
        self.query = MoCoEncoder(backbone, dim=cfg.dim, mlp=cfg.mlp)
        self.key = copy.deepcopy(self.query).requires_grad_(False)  # same start, as published
        self.queue = KeyQueue(cfg.queue_size, cfg.dim)
        self._pending: list[torch.Tensor] = []  # this step's keys, one [micro, dim] fp32 per micro-batch
        self._step = 0  # optimizer steps completed (for the shuffle permutation)
        self._flops = self._count_flops()

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> MoCo:
        assert isinstance(cfg, MoCoMethodConfig)
        mean, std = resolve_pixel_norm(cfg, shards)
        return cls(cfg, mean=mean, std=std)

    # --- contract --------------------------------------------------------------------------
    def data_request(self, split: str) -> DataRequest:
        mean, std = request_pixel_norm(self.cfg)
        return DataRequest(augmentation=self.augmentation, image_size=self.cfg.image_size, mean=mean, std=std,
                           channels=IN_CHANS)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training micro-batch (or, in eval mode, a validation batch) -> {"loss"}."""
        im_q, im_k = self._views(batch)
        q = F.normalize(self.query(im_q).float(), dim=1)
        with torch.no_grad():
            if self.training:
                k = self._shuffled_keys(im_k)
                self._pending.append(k)
            else:
                k = self._key_features(im_k)
        return {"loss": info_nce(q, k, self.queue.keys, self.cfg.temperature)}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.training:
            raise RuntimeError("MoCo.validation_step needs eval mode (it must not update the queue or BatchNorm)")
        return self(batch)

    def flops_per_image(self) -> float:
        return self._flops

    def fp32_names(self) -> tuple[str, ...]:
        """The key encoder, the queue, and the query's BatchNorm running statistics (by full name:
        the BatchNorm weights and biases are trainable, ZeRO's)."""
        stats = tuple(f"query.{n}.{b}" for n, m in self.query.named_modules() if isinstance(m, GroupBatchNorm2d)
                      for b in ("running_mean", "running_var"))
        return ("key.", "queue.", *stats)

    def no_weight_decay(self) -> set[str]:
        return set() if self.cfg.decay_all else super().no_weight_decay()

    def on_train_start(self, ctx: StepContext) -> None:
        k, gb = self.cfg.queue_size, ctx.global_batch
        if k % gb:
            raise ValueError(
                f"method.queue_size={k} is not a multiple of the global batch {gb} (micro-batch "
                f"{gb // (ctx.accumulation * ctx.world_size)} x accumulation {ctx.accumulation} x {ctx.world_size} "
                "ranks): the queue advances by the global batch every optimizer step; change method.queue_size "
                "or train.global_batch_size"
            )
        micro = gb // (ctx.accumulation * ctx.world_size)
        groups = self.cfg.bn_splits or (1 if ctx.world_size > 1 else 2)
        if micro % groups:
            raise ValueError(f"method.bn_splits={groups}: the micro-batch of {micro} does not split into {groups} "
                             "equal BatchNorm groups; change method.bn_splits or train.batch_size")
        set_batchnorm_groups(self, groups)
        self._check_precision()
        self._pending.clear()
        self._step = ctx.step
        if ctx.world_size > 1:  # DeepSpeed broadcasts parameters, not buffers: one queue on every rank
            dist.broadcast(self.queue.keys, src=0)
            dist.broadcast(self.queue.ptr, src=0)
        log.info("MoCo: %s, queue %d (%d steps to refill), global batch %d, BatchNorm groups per rank %d over %d "
                 "rank(s)", self.cfg.arch, k, k // gb, gb, groups, ctx.world_size)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = self.cfg.momentum
        for pk, pq in zip(self.key.parameters(), self.query.parameters(), strict=True):
            pk.lerp_(pq.detach().to(pk.dtype), 1.0 - m)
        keys = torch.cat(self._pending)
        self._pending.clear()
        if ctx.world_size > 1:
            keys = all_gather_cat(keys)
        if keys.shape[0] != ctx.global_batch:
            raise RuntimeError(f"MoCo: {keys.shape[0]} keys in an optimizer step of global batch {ctx.global_batch} "
                               "(every micro-batch must be full and seen by forward once)")
        self.queue.push(keys)
        self._step = ctx.step

    def encoder_export(self) -> EncoderExport:
        sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
              for k, v in self.query.backbone.state_dict().items()}
        return EncoderExport(arch=self.cfg.arch, kwargs={"in_chans": IN_CHANS, "num_classes": 0}, state_dict=sd,
                             mean=self.mean, std=self.std)

    # --- internals -------------------------------------------------------------------------
    def _views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [v for v in ("image", "image2") if v not in batch]
        if missing:
            raise ValueError(f"MoCo needs the two views 'image' and 'image2' of the moco augmentation; the batch "
                             f"lacks {missing} (has {sorted(batch)})")
        im_q, im_k = batch["image"], batch["image2"]
        for name, im in (("image", im_q), ("image2", im_k)):
            if im.ndim != 4 or im.shape[1] != IN_CHANS:
                raise ValueError(f"MoCo ({self.cfg.arch}, in_chans={IN_CHANS}) expects batch[{name!r}] of shape "
                                 f"[N, {IN_CHANS}, H, W], got {tuple(im.shape)}")
        if im_q.shape != im_k.shape:
            raise ValueError(f"MoCo: views of different shapes {tuple(im_q.shape)} and {tuple(im_k.shape)}")
        return im_q, im_k

    def _key_features(self, x: torch.Tensor) -> torch.Tensor:
        """Key encoder on x -> [N, dim] L2-normalised fp32. bf16/fp16 input: autocast keeps the fp32
        weights and computes in the input's dtype."""
        if x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(device_type=x.device.type, dtype=x.dtype):
                k = self.key(x)
        else:
            k = self.key(x.to(torch.float32))
        return F.normalize(k.float(), dim=1)

    def _shuffled_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of this rank's samples, computed on a batch shuffled across ranks (shuffle-BN)."""
        rank, world = _world()
        n = im_k.shape[0]
        perm = shuffle_permutation(n * world, step=self._step, micro=len(self._pending)).to(im_k.device)
        if world == 1:
            return self._key_features(im_k[perm])[torch.argsort(perm)]
        mine = perm.view(world, n)[rank]
        k_all = all_gather_cat(self._key_features(all_gather_cat(im_k)[mine]))  # row j = key of sample perm[j]
        return k_all[torch.argsort(perm).view(world, n)[rank]]

    def _check_precision(self) -> None:
        """The fp32 state (key encoder, queue, BatchNorm statistics) must have stayed fp32."""
        prefixes = self.fp32_names()
        bad = [n for n, t in [*self.named_parameters(), *self.named_buffers()]
               if n.startswith(prefixes) and t.is_floating_point() and t.dtype != torch.float32]
        if bad:
            raise RuntimeError(f"MoCo: {len(bad)} tensors that must stay fp32 are not (e.g. {bad[:3]}); the trainer "
                               "must keep fp32_names() in fp32 after deepspeed.initialize")

    def _count_flops(self) -> float:
        """Per image: query forward + backward (3x forward), key forward, logits against the queue
        (forward and the gradient to the query)."""
        cfg = self.cfg
        fwd = forward_flops(lambda: MoCoEncoder(create_backbone(cfg.arch, in_chans=IN_CHANS), dim=cfg.dim,
                                                mlp=cfg.mlp), image_size=cfg.image_size, in_chans=IN_CHANS)
        logits = 2.0 * cfg.dim * (cfg.queue_size + 1)
        return 3 * fwd + fwd + 2 * logits
