"""Shards too small for MRM's 448-px target are refused (or, with the switch, warned about), with the
size to re-shard at; the arithmetic is RandomResizedCrop's."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from cxrfast.pipelines.resolution import (
    MIMIC_ASPECT,
    require_target_resolution,
    target_resolution,
    upsampled_share,
)
from cxrfast.shards.folder import ShardFolder

MRM = dict(target=448, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))


def folder(tmp_path: Path, max_size: int | None) -> ShardFolder:
    manifest = {"dataset": "mimic", "splits": {}, "created_with": {} if max_size is None else {"max_size": max_size}}
    return ShardFolder(tmp_path, manifest)


def test_default_shards_are_too_small_for_mrm(tmp_path: Path) -> None:
    res = target_resolution(folder(tmp_path, 512), **MRM)
    assert not res.ok and res.required == math.ceil(448 / math.sqrt(0.2 * MIMIC_ASPECT * 0.75)) == 1268
    assert res.recommended == 1280 and res.upsampled_share > 0.95
    assert "long side 512 px are too small" in res.message and "--max-size 1280" in res.message
    assert "448 / sqrt(scale 0.2 x aspect 0.83 x ratio 0.75) = 1268 px" in res.message
    big = target_resolution(folder(tmp_path, 1280), **MRM)
    assert big.ok and big.upsampled_share == 0.0 and "large enough" in big.message and "re-shard" not in big.message
    mid = target_resolution(folder(tmp_path, 1024), **MRM)
    assert not mid.ok and 0.0 < mid.upsampled_share < 0.2


def test_upsampled_share_matches_sampling_the_crops() -> None:
    """The integral against RandomResizedCrop's own draws (area uniform, log-aspect uniform)."""
    rng = np.random.default_rng(0)
    s = rng.uniform(0.2, 1.0, 200_000)
    r = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), s.size))
    area = s * MIMIC_ASPECT * 1024**2
    sampled = float((np.minimum(np.sqrt(area * r), np.sqrt(area / r)) < 448).mean())
    assert abs(upsampled_share(1024, 448, (0.2, 1.0), (3 / 4, 4 / 3), MIMIC_ASPECT) - sampled) < 0.005


def test_refuse_or_warn(mimic_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"manifest.json: shards of long side 512 px are too small.*--max-size 1280"):
        require_target_resolution(mimic_shards, "mrm")
    with caplog.at_level(logging.WARNING):
        res = require_target_resolution(mimic_shards, "mrm", on_too_small="warn")
    assert not res.ok and "--max-size 1280" in caplog.text
    # at a smaller working size (the tiny test model's 64 px input, target 128) the shards are large enough
    assert require_target_resolution(mimic_shards, "mrm", image_size=64).ok
    with pytest.raises(ValueError, match="no high-resolution crop target"):
        require_target_resolution(mimic_shards, "mae")
    with pytest.raises(ValueError, match="on_too_small"):
        require_target_resolution(mimic_shards, "mrm", on_too_small="ignore")


def test_unknown_max_size_is_not_large_enough(tmp_path: Path) -> None:
    res = target_resolution(folder(tmp_path, None), **MRM)
    assert not res.ok and res.upsampled_share is None and "does not record max_size" in res.message
