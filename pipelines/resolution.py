"""Are a shard folder's images large enough for a high-resolution crop target (MRM's 448 px)?

MRM crops RandomResizedCrop(448, scale=(0.2, 1)) from full-resolution MIMIC-CXR images
(main_pretrain.py:128); shards keep the long side at `--max-size` L (default 512), where such a
"high-resolution" target is mostly an upsampled image.

RandomResizedCrop draws an area fraction s ~ U(scale) and a log-uniform aspect ratio r in `ratio`;
the crop spans w = sqrt(s·A·r) by h = sqrt(s·A/r) source pixels and is resized to T x T. A side
shorter than T is upsampled. A chest X-ray of long side L has area A = a·L² with `aspect` a = short
/ long side (MIMIC-CXR-JPG: mostly 2544 x 3056, a = 0.83), so the smallest crop side over the ranges
is L·sqrt(s_min·a·min(r_min, 1/r_max)), and no crop is upsampled once

    L >= T / sqrt(s_min · a · min(r_min, 1/r_max))     (MRM: 448 / sqrt(0.2 · 0.83 · 0.75) = 1268).

`max_size` is an upper bound: sources smaller than it stay smaller in the shards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from cxrfast.pipelines.augmentations import get_augmentation
from cxrfast.shards.folder import ShardFolder
from cxrfast.shards.shard_set import open_shard_set

log = logging.getLogger(__name__)

#: short / long side of MIMIC-CXR-JPG's most common image size, 2544 x 3056
MIMIC_ASPECT = 2544 / 3056
#: recommended sizes are rounded up to a multiple of this
ROUND_TO = 64
POLICIES = ("error", "warn")


@dataclass(frozen=True, kw_only=True)
class TargetResolution:
    """The verdict of `target_resolution` and its reasons."""

    #: the shards' long side (`ShardFolder.max_size`); None when the manifest does not record it
    max_size: int | None
    #: crop target side (pixels)
    target: int
    #: the smallest long side at which no crop is upsampled
    required: int
    #: `required` rounded up to a multiple of ROUND_TO: the size to re-shard at
    recommended: int
    #: share of crop draws upsampled along a side at `max_size` (None without max_size)
    upsampled_share: float | None
    #: True when max_size >= required
    ok: bool
    #: the verdict in words, with the arithmetic behind it
    message: str


def upsampled_share(
    max_size: int, target: int, scale: tuple[float, float], ratio: tuple[float, float], aspect: float, grid: int = 400
) -> float:
    """Share of RandomResizedCrop draws (s uniform in `scale`, log r uniform in `ratio`) whose crop of an
    image of long side `max_size` and short side `aspect` * max_size has a side shorter than `target`
    (midpoint rule on a grid x grid lattice; draws RandomResizedCrop would reject are not excluded)."""
    s = scale[0] + (np.arange(grid) + 0.5) / grid * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + (np.arange(grid) + 0.5) / grid * (math.log(ratio[1]) - math.log(ratio[0]))
    area = s[:, None] * aspect * max_size**2
    short_side = np.sqrt(area * np.exp(-np.abs(log_r))[None, :])  # min(w, h)
    return float((short_side < target).mean())


def target_resolution(
    folder: ShardFolder,
    *,
    target: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    aspect: float = MIMIC_ASPECT,
) -> TargetResolution:
    """Whether `folder`'s images (long side `max_size`) are large enough that RandomResizedCrop(target,
    scale, ratio) never upsamples, and the size to re-shard at (see the module doc)."""
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]) or not 0 < aspect <= 1:
        raise ValueError(f"need 0 < scale <= 1, 0 < ratio and 0 < aspect <= 1; got {scale}, {ratio}, {aspect}")
    r_min = min(ratio[0], 1 / ratio[1])
    factor = math.sqrt(scale[0] * aspect * r_min)
    required = math.ceil(target / factor)
    recommended = math.ceil(required / ROUND_TO) * ROUND_TO
    why = (
        f"no crop is upsampled once the long side is >= {target} / sqrt(scale {scale[0]:g} x aspect {aspect:.2f} "
        f"x ratio {r_min:.2f}) = {required} px"
    )
    fix = f"re-shard with `cxrfast shard mimic --max-size {recommended}`"
    where = folder.manifest_path
    size = folder.max_size
    if size is None:
        return TargetResolution(
            max_size=None, target=target, required=required, recommended=recommended, upsampled_share=None, ok=False,
            message=f"{where} does not record max_size (shards written before it was recorded): cannot tell whether "
            f"they hold the {target}-px target at full resolution; {why}; {fix}",
        )  # fmt: skip
    share = upsampled_share(size, target, scale, ratio, aspect)
    smallest = size * factor
    ok = size >= required
    verdict = "large enough" if ok else "too small"
    message = (
        f"{where}: shards of long side {size} px are {verdict} for a {target}-px RandomResizedCrop target with scale "
        f"{scale}: {share:.0%} of the crops are upsampled (the smallest spans {smallest:.0f} px); {why}"
        + ("" if ok else f"; {fix}")
    )
    return TargetResolution(max_size=size, target=target, required=required, recommended=recommended,
                            upsampled_share=share, ok=ok, message=message)  # fmt: skip


def require_target_resolution(
    shards, augmentation: str = "mrm", *, image_size: int | None = None, on_too_small: str = "error",
    aspect: float = MIMIC_ASPECT, switch: str | None = None,
) -> TargetResolution:
    """Check the shard folder `shards` (every folder of a set) against the crop `target` of
    `augmentation` (one with a `target_factor`, at `image_size` or its default). `on_too_small`:
    "error" raises ValueError with the size to re-shard at (and `switch`, the caller's way to go on
    anyway, when given), "warn" logs it and returns; the first folder too small decides."""
    if on_too_small not in POLICIES:
        raise ValueError(f"on_too_small must be one of {POLICIES}, got {on_too_small!r}")
    r = get_augmentation(augmentation)
    if not r.target_factor or r.scale is None:
        raise ValueError(f"augmentation {augmentation!r} has no high-resolution crop target to check")
    target = r.sizes(image_size)["target"]
    results = [target_resolution(folder, target=target, scale=r.scale, ratio=r.ratio, aspect=aspect)
               for folder in open_shard_set(shards).folders]
    res = next((x for x in results if not x.ok), results[0])  # every folder must hold the target
    if not res.ok:
        if on_too_small == "error":
            raise ValueError(res.message + (f"; or train on them anyway with {switch}" if switch else ""))
        log.warning("%s", res.message)
    return res
