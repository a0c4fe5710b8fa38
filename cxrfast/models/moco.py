"""MoCo v2 networks on timm CNN backbones (MoCo-CXR: ResNet18/50, DenseNet121).

- `MoCoEncoder`: a timm backbone (`num_classes=0`, pooled features) + the projection head
  (MoCo v2's MLP `Linear(C, C) - ReLU - Linear(C, dim)`, or one `Linear(C, dim)` as in MoCo v1).
  `backbone` keeps timm's module names, so its state dict loads strictly into
  `timm.create_model(arch, in_chans=1, num_classes=0)`.
- `GroupBatchNorm2d`: replaces every BatchNorm of a backbone (`convert_batchnorm`). Its statistics
  stay fp32 under bf16 and the normalisation runs in fp32 on bf16 activations (torch's mixed-dtype
  batch norm: bf16 input with fp32 weight/statistics, accepted on CPU and CUDA), and in training it
  can normalise a batch in `groups` groups (MoCo's SplitBatchNorm: one rank emulating several).
- `KeyQueue`: the fp32 ring buffer of negative keys and its pointer, both persistent buffers.
- `forward_flops`: matmul/conv FLOPs of one forward pass, counted on the meta device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with fp32 statistics under bf16 and optional grouped batch statistics.

    Training with `groups = G > 1`: sample i of the batch is normalised with the statistics of the
    samples j with j % G == i % G (MoCo's SplitBatchNorm); the running statistics are updated with
    the mean over the groups. Evaluation always uses the running statistics. The parameter and
    buffer names are BatchNorm2d's, so state dicts are unchanged. Optional `drop`/`act` (timm's
    BatchNormAct2d) follow the normalisation.
    """

    groups: int

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.groups = 1
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> GroupBatchNorm2d:
        if not (bn.affine and bn.track_running_stats):
            raise ValueError(f"{type(bn).__name__} without affine weights or running statistics is not supported")
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, drop=getattr(bn, "drop", None),
                  act=getattr(bn, "act", None))
        with torch.no_grad():
            new.load_state_dict(bn.state_dict())
        return new.to(bn.weight.device)

    def _check_fp32(self) -> None:
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                raise RuntimeError(
                    f"GroupBatchNorm2d.{name} is {buf.dtype}; BatchNorm statistics must stay fp32 (the method's "
                    "fp32_names() lists them; the trainer must not cast them)"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] (any float dtype) -> same shape and dtype; statistics computed in fp32."""
        self._check_fp32()
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        weight, bias = self.weight.float(), self.bias.float()  # bf16 under ZeRO: run the op in fp32
        groups = self.groups if self.training else 1
        if groups == 1:
            y = F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, factor, self.eps)
        else:
            n, c = x.shape[:2]
            if n % groups:
                raise ValueError(f"BatchNorm groups: a batch of {n} cannot be split into {groups} equal groups")
            mean, var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
            y = F.batch_norm(x.reshape(n // groups, groups * c, *x.shape[2:]), mean, var, weight.repeat(groups),
                             bias.repeat(groups), True, factor, self.eps).view_as(x)
            with torch.no_grad():
                self.running_mean.copy_(mean.view(groups, c).mean(0))
                self.running_var.copy_(var.view(groups, c).mean(0))
        return self.act(self.drop(y))


def convert_batchnorm(module: nn.Module) -> int:
    """Replace every `nn.BatchNorm2d` (incl. timm's BatchNormAct2d) under `module` by a
    `GroupBatchNorm2d` with the same state and activation, in place. Returns the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GroupBatchNorm2d):
            setattr(module, name, GroupBatchNorm2d.from_batchnorm(child))
            n += 1
        else:
            n += convert_batchnorm(child)
    return n


def set_batchnorm_groups(module: nn.Module, groups: int) -> None:
    """Set the training-time BatchNorm groups of every `GroupBatchNorm2d` under `module`."""
    if groups < 1:
        raise ValueError(f"BatchNorm groups must be >= 1, got {groups}")
    for m in module.modules():
        if isinstance(m, GroupBatchNorm2d):
            m.groups = groups


def create_backbone(arch: str, *, in_chans: int = 1) -> nn.Module:
    """`timm.create_model(arch, in_chans, num_classes=0)` (pooled features, random init)."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (MoCo-CXR uses resnet18, resnet50, densenet121)")
    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0)


class MoCoEncoder(nn.Module):
    """Backbone + projection head: [N, in_chans, S, S] -> [N, dim] (not normalised)."""

    def __init__(self, backbone: nn.Module, *, dim: int, mlp: bool) -> None:
        super().__init__()
        width = int(backbone.num_features)
        self.backbone = backbone
        self.head = (nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim)) if mlp
                     else nn.Sequential(nn.Linear(width, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class KeyQueue(nn.Module):
    """The queue of negative keys: `keys` [size, dim] fp32 (rows L2-normalised), `ptr` the next row
    to overwrite. Both are persistent buffers (in the checkpoint)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, dtype=torch.float32), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest `len(keys)` rows (no host sync); `len(keys)` must divide the size."""
        n = keys.shape[0]
        if self.size % n:
            raise ValueError(f"queue of {self.size} keys: {n} new keys per step do not divide it")
        rows = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys.index_copy_(0, rows, keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)


def forward_flops(module_fn, *, image_size: int, in_chans: int = 1) -> float:
    """Conv/matmul FLOPs of one forward pass of `module_fn()` on one image, counted on the meta
    device (nothing is computed or allocated); `module_fn` builds the module."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = module_fn().eval()
        with FlopCounterMode(display=False) as counter:
            module(torch.empty(1, in_chans, image_size, image_size))
    return float(counter.get_total_flops())
