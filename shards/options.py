"""`ShardOptions`: the options every dataset's sharding takes, validated before any work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: A run that skips a larger share of its rows fails (`--max-skipped-fraction`).
DEFAULT_MAX_SKIPPED_FRACTION = 0.05


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """Options every dataset's sharding takes; validated on construction, before any work."""

    max_size: int = 512  # long side of the written JPEGs (aspect kept, never upscaled)
    quality: int = 95  # JPEG quality of the written images
    samples_per_tar: int | None = None  # samples per tar (None: from target_tar_mb)
    target_tar_mb: float = 256  # approximate tar size in MB when samples_per_tar is None
    workers: int | None = None  # worker processes (None: all cores)
    seed: int = 0  # seed of the sample order
    views: str | Sequence[str] = ("PA", "AP")  # views to keep (comma-separated or a list), or "all"
    image_ext: str = "jpg"  # source image extension looked for first: jpg or png
    overwrite: bool = False  # rebuild a folder of ours made from other parameters or inputs
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION  # a run skipping a larger share of rows fails

    def __post_init__(self) -> None:
        if self.max_size < 16:
            raise ValueError(f"--max-size must be >= 16, got {self.max_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.samples_per_tar is not None and self.samples_per_tar < 1:
            raise ValueError(f"--samples-per-tar must be >= 1, got {self.samples_per_tar}")
        if not self.target_tar_mb > 0:
            raise ValueError(f"--target-tar-mb must be > 0, got {self.target_tar_mb}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.image_ext not in ("jpg", "png"):
            raise ValueError(f"--image-ext must be jpg or png, got {self.image_ext!r}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")
        from cxrfast.shards.metadata_common import parse_views

        parse_views(self.views)  # raises on an empty list

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def params(self) -> dict[str, Any]:
        """The options that change the output, as recorded in the manifest's `created_with`
        (not workers, overwrite or max_skipped_fraction)."""
        views = self.views if isinstance(self.views, str) else ",".join(self.views)
        return {
            "max_size": self.max_size, "quality": self.quality, "samples_per_tar": self.samples_per_tar,
            "target_tar_mb": self.target_tar_mb, "seed": self.seed, "views": views, "image_ext": self.image_ext,
        }  # fmt: skip
