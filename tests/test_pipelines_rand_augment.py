"""RandAugment (MAE-CXR's fine-tuning `rand-m6-mstd0.5-inc1`): the spec parser, every DALI op of the
suite against timm's op at the same level on a fixed image, and DALI's loader checkpoint restoring
the conditional (per-sample op choice) graph exactly. (Batch shapes and ranges of the fine-tune
augmentations on every backend: tests/test_pipelines.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.pipelines import build_loader
from cxrfast.pipelines.rand_augment import parse_rand_augment

SIDE = 48
LEVEL = 6.0
FILL = 128


def test_spec_parser() -> None:
    s = parse_rand_augment("rand-m6-mstd0.5-inc1")
    assert (s.n, s.magnitude, s.magnitude_std, s.prob, s.increasing) == (2, 6.0, 0.5, 0.5, True)
    assert parse_rand_augment("rand-n3-m9-p0.7-inc1").n == 3
    for bad, match in (("augmix-m5", "must start with 'rand-'"), ("rand-m6-mmax12-inc1", "mmax"),
                       ("rand-m6", "inc1"), ("rand-m12-inc1", "m <= 10"), ("rand-mx-inc1", "section 'mx'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_rand_augment(bad)


def _dali_op(index: int, img: np.ndarray, *, negate: bool) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin

    from cxrfast.pipelines.augment import _RA_BINS, rand_augment_ops

    op = rand_augment_ops()[index]
    level_bin = int(round(LEVEL * (_RA_BINS - 1) / 10))

    @pipeline_def(enable_conditionals=True)
    def pipe():
        x = fn.cast(fn.reshape(types.Constant(img[..., None]), layout="HWC"), dtype=types.UINT8)
        sign = fn.random.uniform(values=[1 if negate else 0], dtype=types.INT32)
        return op(x, magnitude_bin=signed_bin(level_bin, random_sign=sign), num_magnitude_bins=_RA_BINS,
                  fill_value=FILL, shape=[SIDE, SIDE], interp_type=types.INTERP_LINEAR)  # fmt: skip

    p = pipe(batch_size=1, num_threads=1, device_id=None, seed=0)
    p.build()
    return np.asarray(p.run()[0][0])[..., 0].astype(np.int64)


def test_every_dali_op_matches_timms_at_the_same_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.data.auto_augment as taa
    from PIL import Image

    monkeypatch.setattr(taa, "_randomly_negate", lambda v: v)  # timm's positive sign
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    img = np.clip(80 + 2 * xx + 1.5 * yy + rng.normal(0, 10, (SIDE, SIDE)), 0, 255).astype(np.uint8)
    hp = {"img_mean": FILL, "translate_pct": 0.45, "interpolation": Image.BILINEAR}
    for i, name in enumerate(taa._RAND_INCREASING_TRANSFORMS):
        # PIL's shear / translate map output to input: its positive sign is DALI's negative one (both draw
        # the sign at random, so the distributions are the same)
        dali = _dali_op(i, img, negate=name.startswith(("Shear", "Translate")))
        ref = np.asarray(taa.AugmentOp(name, prob=1.0, magnitude=LEVEL, hparams=hp)(Image.fromarray(img, "L")))
        diff = np.abs(dali - ref.astype(np.int64))
        # equalize: DALI follows OpenCV's formula, PIL's rounds differently; geometric ops: pixel-centre
        # conventions at the edges of the filled area
        limit = 2.0 if name == "Equalize" else 1.0
        assert diff.mean() < limit, (name, diff.mean())
        if name not in ("Equalize", "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
            assert diff[1:-1, 1:-1].max() <= 1, (name, diff.max())  # colour ops: within one grey level


def test_dali_checkpoint_restores_the_rand_augment_graph(eval_shards: Path) -> None:
    kw = dict(batch_size=8, backend="dali", device="cpu", num_threads=1, image_size=32, mean=0.5, std=0.25, seed=5,
              checkpointing=True)  # fmt: skip
    loader = build_loader(eval_shards, "train", "finetune_randaug", **kw)
    it = iter(loader)
    next(it)
    state = loader.state()
    expected = [b["image"] for b in it]
    resumed = build_loader(eval_shards, "train", "finetune_randaug", checkpoint=state, **kw)
    got = [b["image"] for b in resumed]
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
