"""Validation during training: the method's `validation_step` over a held-out split, every N epochs
or steps, averaged over all samples of all ranks, plus the method's epoch-level metrics over every
rank's per-sample outputs; early stopping and best-state selection on one of those values."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cxrfast.methods.base import SAMPLE_OUTPUT_PREFIX, Method
from cxrfast.shards.shard_set import ShardSet
from cxrfast.trainer.data import loader_kwargs

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What one validation changed in a `Selection`."""

    improved: bool  # a new best
    kept: bool  # among the `keep` best (then the state is worth exporting)
    dropped: list[int] = field(default_factory=list)  # steps pushed out of the kept ones


@dataclass
class Selection:
    """The best validation values so far and the patience counter (the state part is saved in checkpoints).

    `mode` says whether lower ("min", a loss) or higher ("max", an AUC) is better; the `keep` best
    evaluations are kept ranked (best first) as [value, step, epoch]. A NaN value never improves."""

    mode: str = "min"
    keep: int = 1
    best: float = math.inf
    best_epoch: int = 0  # epochs completed when the best was measured (0 = none yet)
    best_step: int = 0  # optimizer steps done when the best was measured
    bad: int = 0  # validations since the best
    kept: list[list[float]] = field(default_factory=list)  # [[value, step, epoch], ...], best first

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"selection mode must be min or max, got {self.mode!r}")
        if self.mode == "max" and self.best == math.inf:
            self.best = -math.inf

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step, "bad": self.bad,
                "kept": [list(k) for k in self.kept]}  # fmt: skip

    def restore(self, saved: dict[str, Any]) -> None:
        """Take a checkpoint's state (older checkpoints lack best_step and kept)."""
        for key in ("best", "best_epoch", "best_step", "bad"):
            if key in saved:
                setattr(self, key, type(getattr(self, key))(saved[key]))
        self.kept = [list(k) for k in saved.get("kept", [])][: self.keep]

    def update(self, value: float, *, epoch: int, step: int) -> Update:
        """Record a validation of `value` after `step` optimizer steps (`epoch` epochs completed)."""
        if math.isnan(value):
            self.bad += 1
            return Update(improved=False, kept=False)
        improved = self.better(value, self.best)
        if improved:
            self.best, self.best_epoch, self.best_step, self.bad = value, epoch, step, 0
        else:
            self.bad += 1
        entry = [value, step, epoch]
        kept = len(self.kept) < self.keep or self.better(value, self.kept[-1][0])
        dropped: list[int] = []
        if kept:
            self.kept.append(entry)
            sign = 1.0 if self.mode == "min" else -1.0
            self.kept.sort(key=lambda k: (sign * k[0], k[1]))  # ties: the earlier state first
            dropped = [int(k[1]) for k in self.kept[self.keep :]]
            del self.kept[self.keep :]
        return Update(improved=improved, kept=kept, dropped=dropped)


def overrides_validation_metrics(method: Method) -> bool:
    """True when the method computes epoch-level metrics (then per-sample outputs are gathered)."""
    return type(method).validation_metrics is not Method.validation_metrics


def gather_samples(local: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """Every rank's per-sample outputs, concatenated in rank order (a collective)."""
    import torch.distributed as dist

    mine = {k: torch.cat(v).numpy() for k, v in local.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    parts: list[dict[str, np.ndarray] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    keys = sorted(set().union(*(p.keys() for p in parts if p)))
    return {k: np.concatenate([p[k] for p in parts if p and k in p]) for k in keys}


class Validator:
    """Validation loss (and the method's metrics) of `method` on `split` (shuffle off, every sample
    once across ranks)."""

    def __init__(self, shards: ShardSet, method: Method, *, split: str, batch_size: int, backend: str, dtype: Any,
                 num_threads: int, rank: int, world_size: int) -> None:
        if split == "test":
            raise ValueError("validation on the test split is refused: select and stop on validate only")
        shards.require_split(split, "validation")
        self.split = split
        self._kw = dict(split=split, batch_size=batch_size, backend=backend, dtype=dtype, shuffle=False,
                        num_threads=num_threads, rank=rank, world_size=world_size, drop_last=False,
                        **loader_kwargs(method.data_request(split)))
        self.shards = shards
        self._loader = None

    def run(self, engine: Any) -> dict[str, float]:
        """{"val_loss", "val_loss_<part>", "val_<metric>"...}: loss means over every validation sample,
        and the method's `validation_metrics` over every rank's per-sample outputs (collective)."""
        import torch.distributed as dist

        from cxrfast.pipelines import build_loader

        if self._loader is None:  # one loader, one epoch per call (no shuffle: the same samples each time)
            self._loader = build_loader(self.shards, seed=0, **self._kw)
        method = engine.module
        was_training = method.training
        method.eval()
        sums: torch.Tensor | None = None
        keys: list[str] = []
        samples: dict[str, list[torch.Tensor]] = {}
        try:
            for batch in self._loader:
                out = method.validation_step(batch)
                if sums is None:
                    keys = ["loss"] + sorted(k for k in out if k.startswith("loss_"))
                    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=engine.device)
                n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                sums += torch.cat([torch.stack([out[k].detach().double().reshape(()) * n for k in keys]),
                                   torch.tensor([n], dtype=torch.float64, device=engine.device)])
                for k, v in out.items():
                    if k.startswith(SAMPLE_OUTPUT_PREFIX):
                        samples.setdefault(k, []).append(v.detach().float().cpu())
        finally:
            method.train(was_training)
        if sums is None:
            raise RuntimeError(f"validation split {self.split!r} yielded no batch on this rank")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        values = sums.tolist()
        result = {f"val_{k}": v / values[-1] for k, v in zip(keys, values[:-1], strict=False)}
        if overrides_validation_metrics(method):
            metrics = method.validation_metrics(gather_samples(samples))
            result.update({f"val_{k}": float(v) for k, v in metrics.items()})
        return result
