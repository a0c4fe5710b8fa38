"""Validation during training: the method's `validation_step` over a held-out split, every N
epochs, averaged over all samples of all ranks; early stopping and best-state selection on it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from cxrfast.methods.base import Method
from cxrfast.shards.shard_set import ShardSet
from cxrfast.trainer.data import loader_kwargs

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Best validation loss so far and the patience counter (saved in checkpoints)."""

    best: float = math.inf
    best_epoch: int = 0  # epochs completed when the best was measured (0 = none yet)
    bad: int = 0  # validations since the best

    def update(self, value: float, epoch: int) -> bool:
        """Record a validation; True when it is a new best."""
        if value < self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False


class Validator:
    """Validation loss of `method` on `split` (shuffle off, every sample once across ranks)."""

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
        """{"val_loss", "val_loss_<part>"}: means over every validation sample (collective)."""
        import torch.distributed as dist

        from cxrfast.pipelines import build_loader

        if self._loader is None:  # one loader, one epoch per call (no shuffle: the same samples each time)
            self._loader = build_loader(self.shards, seed=0, **self._kw)
        method = engine.module
        was_training = method.training
        method.eval()
        sums: torch.Tensor | None = None
        keys: list[str] = []
        try:
            for batch in self._loader:
                out = method.validation_step(batch)
                if sums is None:
                    keys = ["loss"] + sorted(k for k in out if k.startswith("loss_"))
                    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=engine.device)
                n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                sums += torch.cat([torch.stack([out[k].detach().double().reshape(()) * n for k in keys]),
                                   torch.tensor([n], dtype=torch.float64, device=engine.device)])
        finally:
            method.train(was_training)
        if sums is None:
            raise RuntimeError(f"validation split {self.split!r} yielded no batch on this rank")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        values = sums.tolist()
        return {f"val_{k}": v / values[-1] for k, v in zip(keys, values[:-1], strict=False)}
