"""`cxrfast bench train --find-max-batch`: every micro-batch it tries must be a valid run of the preset."""

from __future__ import annotations

import pytest

from cxrfast.bench.train_throughput import _config, batch_overrides


@pytest.mark.parametrize("batch_size", [8, 24, 40, 56, 200])
def test_moco_queue_follows_the_micro_batch_the_search_tries(batch_size: int):
    cfg = _config("moco_cxr_r50", batch_overrides("moco_cxr_r50", batch_size, []))
    assert cfg.train.batch_size == batch_size
    queue = cfg.method.queue_size
    assert queue % batch_size == 0  # MoCo refuses a queue the global batch does not divide
    assert 24576 <= queue < 24576 + batch_size  # the published queue, or the next multiple


def test_presets_without_a_queue_get_only_the_batch():
    assert batch_overrides("mrm_vitb", 40, ["num_threads=1"]) == ["num_threads=1", "batch_size=40"]
