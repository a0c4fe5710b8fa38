"""Sample order and tar assignment: rows are shuffled per split with a seed (so no tar holds one
patient's or one study's images together) and cut into tars. Independent of the worker count."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from cxrfast.shards.schema import SPLITS, tar_name

#: With no explicit --samples-per-tar a split of n >= 16*MIN_TARS samples gets at least
#: MIN_TARS tars, so that every worker and every DALI rank gets work on small datasets too.
MIN_TARS = 8
MIN_SAMPLES_PER_TAR = 16


@dataclass(frozen=True, slots=True)
class TarPlan:
    """Rows [start, stop) of the planned (shuffled) table go to tar `name`."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return tar_name(self.split, self.index)

    @property
    def size(self) -> int:
        return self.stop - self.start


def estimate_sample_bytes(max_size: int) -> int:
    """Rough bytes per sample: a q95 grayscale JPEG of max_size x 0.82*max_size (~0.35 B/pixel)
    plus labels, ids, text, json and tar headers."""
    return int(max_size * max_size * 0.82 * 0.35) + 6000


def samples_per_tar_for(target_tar_mb: float, max_size: int) -> int:
    if target_tar_mb <= 0:
        raise ValueError(f"--target-tar-mb must be > 0, got {target_tar_mb}")
    return max(1, int(target_tar_mb * 1e6 // estimate_sample_bytes(max_size)))


def _split_seed(seed: int, split: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")]


def plan_tars(
    rows: pl.DataFrame, *, seed: int, samples_per_tar: int | None, target_tar_mb: float, max_size: int
) -> tuple[pl.DataFrame, list[TarPlan]]:
    """Shuffle `rows` (with columns `key`, `split`) per split and assign tars.

    Returns the reordered table (tars are contiguous slices of it) and the tar plans. The input
    order does not matter: rows are sorted by key before the seeded permutation.
    """
    if samples_per_tar is not None and samples_per_tar < 1:
        raise ValueError(f"--samples-per-tar must be >= 1, got {samples_per_tar}")
    target = samples_per_tar or samples_per_tar_for(target_tar_mb, max_size)
    parts: list[pl.DataFrame] = []
    plans: list[TarPlan] = []
    offset = 0
    for split in SPLITS:
        sub = rows.filter(pl.col("split") == split).sort("key")
        n = sub.height
        if n == 0:
            continue
        perm = np.random.default_rng(_split_seed(seed, split)).permutation(n)
        parts.append(sub[perm])
        if samples_per_tar is not None:
            bounds = list(range(0, n, target)) + [n]
        else:
            n_tars = max(math.ceil(n / target), min(MIN_TARS, n // MIN_SAMPLES_PER_TAR), 1)
            bounds = [round(i * n / n_tars) for i in range(n_tars + 1)]
        for i in range(len(bounds) - 1):
            plans.append(TarPlan(split, i, offset + bounds[i], offset + bounds[i + 1]))
        offset += n
    planned = pl.concat(parts) if parts else rows.clear()
    return planned, plans


def plan_digest(rows: pl.DataFrame) -> str:
    """sha256 of a tar's planned rows (every column), to tell whether a finished tar is still valid."""
    h = hashlib.sha256()
    for rec in rows.iter_rows():
        h.update(repr(rec).encode())
        h.update(b"\n")
    return h.hexdigest()
