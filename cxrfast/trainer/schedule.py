"""Per-iteration linear warmup then half-cosine decay, as in MAE's `lr_sched.adjust_learning_rate`.

At optimizer step `s` with `steps_per_epoch` steps per epoch, `e = s / steps_per_epoch`:
`lr = peak * e / warmup` while `e < warmup`, then
`lr = min + (peak - min) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`.
`WarmupCosine` is the multiplicative factor for `torch.optim.lr_scheduler.LambdaLR`, which
DeepSpeed steps after every optimizer step and saves/restores with its checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WarmupCosine:
    """LR factor (relative to the peak lr) at optimizer step `step`; a picklable callable."""

    steps_per_epoch: int
    epochs: int
    warmup_epochs: float
    min_lr_ratio: float = 0.0  # min_lr / peak lr

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")

    def __call__(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup_epochs:
            return e / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        progress = min(1.0, (e - self.warmup_epochs) / span) if span > 0 else 1.0
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, factor: WarmupCosine):
    """`LambdaLR(optimizer, factor)`: each param group's `lr` must already be the peak lr."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, factor)
