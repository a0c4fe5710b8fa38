"""Per-iteration learning-rate schedules: linear warmup, then cosine, step or constant.

At optimizer step `s` with `steps_per_epoch` steps per epoch, `e = s / steps_per_epoch`:
warmup `peak * e / warmup` while `e < warmup`; then
- warmup_cosine (MAE's `lr_sched.adjust_learning_rate`):
  `min + (peak - min) * 0.5 * (1 + cos(pi * (e - warmup) / (epochs - warmup)))`;
- step (MoCo's `adjust_learning_rate` without --cos): `peak * gamma ** (number of milestones <= e)`;
- constant: `peak`.
With `total_steps` / `warmup_steps` (a schedule quoted in optimizer steps, e.g. MRM's fine-tune
tables) the warmup is `step / warmup_steps` and the cosine runs from `warmup_steps` to `total_steps`.
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
    total_steps: int | None = None  # schedule length in optimizer steps (instead of epochs x steps_per_epoch)
    warmup_steps: int | None = None  # warmup in optimizer steps (instead of warmup_epochs)

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.kind not in ("warmup_cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}")

    def __call__(self, step: int) -> float:
        if self.total_steps is not None or self.warmup_steps is not None:
            return self._by_steps(step)
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

    def _by_steps(self, step: int) -> float:
        total = self.total_steps if self.total_steps is not None else self.epochs * self.steps_per_epoch
        warm = self.warmup_steps if self.warmup_steps is not None else self.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return step / warm
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, step / self.steps_per_epoch)
        progress = min(1.0, (step - warm) / (total - warm)) if total > warm else 1.0
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> dict[str, Any]:
        """The fields as JSON values (as a checkpoint's run_state.json holds them); the step-quoted
        fields only when set (so an epoch-quoted schedule describes itself as before they existed)."""
        out = {**asdict(self), "milestones": list(self.milestones)}
        return {k: v for k, v in out.items() if v is not None or k not in ("total_steps", "warmup_steps")}


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
