"""Training data: per-epoch loaders for what the method requests, with resumable positions.

`EpochData.epoch(e)` builds a fresh `cxrfast.pipelines.build_loader` seeded with `seed + e`, so
the sample order of an epoch is a function of (seed, epoch, rank, world size) only. Mid-epoch
positions: the DALI backend saves DALI's own checkpoint of the loader (reader position and random
generators) and restores it; the torch and synthetic backends, whose order is just as
deterministic, replay the epoch and skip the batches already consumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from cxrfast.methods.base import DataRequest
from cxrfast.shards.shard_set import ShardSet

log = logging.getLogger(__name__)


def min_over_ranks(value: int) -> int:
    """The smallest `value` over all ranks (a collective; the value itself without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor([value], dtype=torch.int64, device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def loader_kwargs(request: DataRequest) -> dict[str, Any]:
    """`build_loader` arguments that a method's DataRequest fixes."""
    return dict(augmentation=request.augmentation, image_size=request.image_size, mean=request.mean, std=request.std,
                channels=request.channels, text_len=request.text_len, text=request.text,
                fp32_outputs=request.fp32_outputs, labels=request.labels,
                dataset_norms={d: (m, s) for d, m, s in request.dataset_norms})


class EpochData:
    """Batches of one epoch at a time, `steps` optimizer steps of `accum` micro-batches each, from
every folder of the shard set (one loader over their union).

    With `overfit_batches=N > 0` the first N batches of epoch 0 are kept in memory and replayed
    every epoch (an overfitting check of the model and the loop).
    """

    def __init__(
        self,
        shards: ShardSet,
        request: DataRequest,
        *,
        split: str,
        batch_size: int,
        accum: int,
        backend: str,
        dtype: Any,
        seed: int,
        shuffle: bool,
        num_threads: int,
        rank: int,
        world_size: int,
        overfit_batches: int = 0,
    ) -> None:
        self.shards = shards
        self.backend = backend
        self._kw = dict(
            split=split, batch_size=batch_size, backend=backend, dtype=dtype, shuffle=shuffle,
            num_threads=num_threads, rank=rank, world_size=world_size, drop_last=True,
            checkpointing=backend == "dali", **loader_kwargs(request),
        )
        self.seed = seed
        self.accum = accum
        self.overfit_batches = overfit_batches
        self._cached: list[dict[str, Any]] | None = None
        self._loader: Any = None  # the loader of the epoch being read
        first = self._build(0)
        micro = min_over_ranks(len(first))  # ranks' shares may differ by a sample: all run the same steps
        if overfit_batches:
            micro = min(micro, overfit_batches)
        self.steps = micro // accum
        if self.steps < 1:
            raise ValueError(
                f"{shards.where}: split {split!r} gives {micro} micro-batches of {batch_size} per rank "
                f"(world size {world_size}), fewer than one optimizer step of {accum} micro-batches"
            )
        self._first = first

    @property
    def micro_batches(self) -> int:
        """Micro-batches consumed per epoch on this rank."""
        return self.steps * self.accum

    def _build(self, epoch: int, checkpoint: bytes | None = None):
        from cxrfast.pipelines import build_loader

        return build_loader(self.shards, seed=self.seed + epoch, checkpoint=checkpoint, **self._kw)

    def stream(self) -> Iterator[dict[str, Any]]:
        """Endless micro-batches from one loader, epoch after epoch without rebuilding it (benchmarks;
        training uses `epoch()`, whose order is reproducible per epoch)."""
        loader = self._first if self._first is not None else self._build(0)
        self._first = None
        while True:
            yield from loader

    def state(self) -> bytes | None:
        """The position in the current epoch (DALI's loader checkpoint); None for the backends that
        resume by replaying (torch, synthetic) and in overfit mode."""
        if self.overfit_batches or self.backend != "dali" or self._loader is None:
            return None
        return self._loader.state()

    def epoch(self, epoch: int, *, start: int = 0, state: bytes | None = None) -> Iterator[dict[str, Any]]:
        """Micro-batches `start .. micro_batches - 1` of epoch `epoch` (0-based). A resumed epoch
        (start > 0) continues from `state` (DALI) or replays and skips the first `start` batches."""
        if self.overfit_batches:
            if self._cached is None:
                it = iter(self._first)
                self._cached = [next(it) for _ in range(self.micro_batches)]
                self._first = None
            yield from self._cached[start:]
            return
        if start and self.backend == "dali" and state is None:
            raise ValueError(f"resuming epoch {epoch} at micro-batch {start} needs the DALI loader state of the checkpoint")
        if epoch == 0 and start == 0 and self._first is not None:
            loader = self._first
        else:
            loader = self._build(epoch, checkpoint=state if start else None)
        self._first = None
        self._loader = loader
        it = iter(loader)
        skip = start if (start and state is None) else 0
        for i in range(start - skip, self.micro_batches):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"loader for epoch {epoch} ended after {i} batches; len() promised {len(loader)}"
                ) from None
            if i >= start:
                yield batch
