"""Training data: shard checks, the report-vocabulary facts a text model needs, per-epoch loaders.

`EpochData.epoch(e)` builds a fresh `cxrfast.pipelines.build_loader` seeded with `seed + e`, so
the sample order of an epoch is a function of (seed, epoch, rank, world size) only: a run resumed
at an epoch boundary reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfast.shards.folder import open_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """What the trainer needs from a shard folder's manifest.json."""

    root: Path
    dataset: str
    split_samples: dict[str, int]  # samples per split
    tokenizer: dict[str, Any] | None  # manifest "tokenizer": file, vocab_size, special_ids; None without reports


def read_shards(root: Path, split: str) -> ShardInfo:
    """Check `root` holds shards with samples in `split`; raise an error naming what is missing."""
    folder = open_shards(root)
    counts = folder.split_samples
    if counts.get(split, 0) == 0:
        raise ValueError(f"{folder.manifest_path}: split {split!r} has no samples (splits: {counts})")
    return ShardInfo(root=folder.root, dataset=folder.dataset, split_samples=counts,
                     tokenizer=folder.manifest["tokenizer"])


def text_model_kwargs(info: ShardInfo, recipe: str) -> dict[str, Any]:
    """`vocab_size`, `special_ids` and `wordpiece_continuation` for a model that reads reports.

    Built once at start from the shards' tokenizer.json (`cxrfast.models.text_kwargs_from_shards`),
    so whole-word masking needs no tokenizer in the loop.
    """
    from cxrfast.models import text_kwargs_from_shards

    if info.tokenizer is None:
        raise ValueError(
            f"recipe {recipe!r} trains on reports, but the shards in {info.root} have none "
            f"(manifest 'tokenizer' is null, samples carry no ids.i32; dataset {info.dataset!r}). "
            "Use MIMIC-CXR shards built with --reports, or an image-only recipe (mae_*)."
        )
    return text_kwargs_from_shards(info.root)


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


class EpochData:
    """Batches of one epoch at a time, `steps` optimizer steps of `accum` micro-batches each.

    With `overfit_batches=N > 0` the first N batches of epoch 0 are kept in memory and replayed
    every epoch (an overfitting check of the model and the loop).
    """

    def __init__(
        self,
        info: ShardInfo,
        *,
        split: str,
        recipe: str,
        batch_size: int,
        accum: int,
        backend: str,
        dtype: Any,
        seed: int,
        shuffle: bool,
        num_threads: int,
        image_size: int,
        rank: int,
        world_size: int,
        overfit_batches: int = 0,
    ) -> None:
        self.info = info
        self._kw = dict(
            split=split, recipe=recipe, batch_size=batch_size, backend=backend, dtype=dtype, shuffle=shuffle,
            num_threads=num_threads, rank=rank, world_size=world_size,
            image_size=image_size, drop_last=True,
        )
        self.seed = seed
        self.accum = accum
        self.overfit_batches = overfit_batches
        self._cached: list[dict[str, Any]] | None = None
        first = self._build(0)
        micro = min_over_ranks(len(first))  # ranks' shares may differ by a sample: all run the same steps
        if overfit_batches:
            micro = min(micro, overfit_batches)
        self.steps = micro // accum
        if self.steps < 1:
            raise ValueError(
                f"{info.root}: split {split!r} gives {micro} micro-batches of {batch_size} per rank "
                f"(world size {world_size}), fewer than one optimizer step of {accum} micro-batches"
            )
        self._first = first

    @property
    def micro_batches(self) -> int:
        """Micro-batches consumed per epoch on this rank."""
        return self.steps * self.accum

    def _build(self, epoch: int):
        from cxrfast.pipelines import build_loader

        return build_loader(self.info.root, seed=self.seed + epoch, **self._kw)

    def stream(self) -> Iterator[dict[str, Any]]:
        """Endless micro-batches from one loader, epoch after epoch without rebuilding it (benchmarks;
        training uses `epoch()`, whose order is reproducible per epoch)."""
        loader = self._first if self._first is not None else self._build(0)
        self._first = None
        while True:
            yield from loader

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The `micro_batches` batches of epoch `epoch` (0-based)."""
        if self.overfit_batches:
            if self._cached is None:
                it = iter(self._first)
                self._cached = [next(it) for _ in range(self.micro_batches)]
                self._first = None
            yield from self._cached
            return
        loader = self._first if epoch == 0 and self._first is not None else self._build(epoch)
        self._first = None
        it = iter(loader)
        for i in range(self.micro_batches):
            try:
                yield next(it)
            except StopIteration:
                raise RuntimeError(
                    f"loader for epoch {epoch} ended after {i} batches; len() promised {len(loader)}"
                ) from None
