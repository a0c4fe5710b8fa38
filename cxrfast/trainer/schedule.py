"""Per-iteration learning-rate schedules: linear warmup, then cosine, step or constant.

At optimizer step `s` with `steps_per_epoch` steps per epoch, `e = s / steps_per_epoch`:
warmup `peak * e / warmup` while `e < warmup`; then
- warmup_cosine (MAE's `lr_sched.adjust_learning_rate`):
  `min + (peak - min) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`;
- step (MoCo's `adjust_learning_rate` without --cos): `peak * gamma ** (number of milestones <= e)`;
- constant: `peak`.
`LRSchedule` is the multiplicative factor for `torch.optim.lr_scheduler.LambdaLR`, which DeepSpeed
steps after every optimizer step. On resume the schedule is rebuilt from the run's config
(`set_position`), never restored from the checkpoint, so a changed schedule is followed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    """LR factor (relative to the peak lr) at optimizer step `step`; a picklable callable."""

    steps_per_epoch: int
    epochs: int
    warmup_epochs: float
    kind: str = "warmup_cosine"
    min_lr_ratio: float = 0.0  # min_lr / peak lr (cosine floor)
    milestones: tuple[float, ...] = ()  # step schedule, in epochs
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.kind not in ("warmup_cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}")

    def __call__(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup_epochs:
            return e / self.warmup_epochs
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, e)
        span = self.epochs - self.warmup_epochs
        progress = min(1.0, (e - self.warmup_epochs) / span) if span > 0 else 1.0
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> dict[str, Any]:
        """The fields as JSON values (as a checkpoint's run_state.json holds them)."""
        return {**asdict(self), "milestones": list(self.milestones)}


def make_scheduler(optimizer, factor: LRSchedule):
    """`LambdaLR(optimizer, factor)`: each param group's `lr` must already be its peak lr."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, factor)


def set_position(scheduler, factor: LRSchedule, step: int) -> None:
    """Point `scheduler` (a LambdaLR built by `make_scheduler`) at optimizer step `step` of `factor`:
    the next optimizer step uses `base_lr * factor(step)` in every group."""
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch = step
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor(step)
