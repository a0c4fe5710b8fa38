"""Crop geometry on an image with a known pattern.

The pattern is a plane, pixel = 127 * x / (W - 1) + 127 * y / (H - 1). Crop + resize keep a plane a
plane, so the slopes of the output along columns and rows give the crop's width and height in
source pixels (a flip only changes a sign): the area fraction and aspect ratio of every random
crop can be checked against the augmentation's ranges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cxrfast.pipelines import build_loader
from cxrfast.pipelines.augmentations import AUGMENTATIONS
from cxrfast.shards import schema

W, H, N = 400, 300, 24


def write_shards(out: Path, images: list[np.ndarray]) -> Path:
    """A one-tar shard folder in the shard contract (TarWriter + wds2idx + manifest.json)."""
    out.mkdir(parents=True)
    tar = out / schema.tar_name("train", 0)
    with wds.TarWriter(str(tar), mtime=schema.TAR_MTIME) as w:
        for i, img in enumerate(images):
            ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
            assert ok
            w.write({
                "__key__": f"pattern{i:03d}",
                "jpg": jpg.tobytes(),
                "labels.i8": schema.labels_to_bytes(np.zeros(schema.NUM_LABELS, dtype=np.int8)),
                "ids.i32": schema.ids_to_bytes([2, 10, 11, 3]),
                "json": json.dumps({"dataset": "pattern"}).encode(),
            })
    idx = out / schema.idx_name(tar.name)
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar), str(idx)], check=True, capture_output=True)
    manifest = {
        "format_version": schema.SHARD_FORMAT_VERSION, "dataset": "pattern", "label_names": list(schema.LABEL_NAMES),
        "splits": {"train": [{"tar": tar.name, "idx": idx.name, "samples": len(images),
                              "bytes": tar.stat().st_size, "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()}]},
        "pixel_stats": {"mean": 0.5, "std": 0.25},
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 100,
                      "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}},
    }
    (out / schema.MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def plane_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    plane = np.round(127 * x / (W - 1) + 127 * y / (H - 1)).astype(np.uint8)
    return write_shards(tmp_path_factory.mktemp("plane") / "shards", [plane] * N)


def crop_size(img: torch.Tensor) -> tuple[float, float]:
    """(width, height) in source pixels of the crop behind a [S,S] output of the plane (pixel/255)."""
    s = img.shape[-1]
    o = img.float().numpy()[0] * 255.0
    m = s // 16  # stay off the borders (resampling edge effects)
    ii, jj = np.mgrid[m : s - m, m : s - m]
    a = np.stack([np.ones(ii.size), jj.ravel(), ii.ravel()], axis=1)
    (_, sj, si), *_ = np.linalg.lstsq(a, o[m : s - m, m : s - m].ravel(), rcond=None)
    return abs(sj) * s * (W - 1) / 127, abs(si) * s * (H - 1) / 127


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("augmentation", ["mae", "mrm"])
def test_random_resized_crop_respects_scale_and_ratio(plane_shards: Path, augmentation: str, backend: str) -> None:
    r = AUGMENTATIONS[augmentation]
    loader = build_loader(plane_shards, "train", augmentation, batch_size=N, backend=backend, device="cpu",
                          num_threads=1, mean=0.0, std=1.0, seed=11)
    batch = next(iter(loader))
    areas = []
    for i in range(N):
        w, h = crop_size(batch["image"][i])
        area = w * h / (W * H)
        areas.append(area)
        assert r.scale[0] - 0.03 <= area <= 1.0 + 0.03, (i, w, h)
        if area < 0.97:  # a found window (not the full-image fallback) has the aspect ratio in range
            assert r.ratio[0] - 0.05 <= w / h <= r.ratio[1] + 0.05, (i, w, h)
        if augmentation == "mrm":  # target: the same crop and flip at 448
            tw, th = crop_size(batch["target"][i])
            assert abs(tw - w) < 0.03 * W and abs(th - h) < 0.03 * H
            down = torch.nn.functional.avg_pool2d(batch["target"][i : i + 1].float(), 2)[0]
            assert (down - batch["image"][i].float()).abs()[:, 8:-8, 8:-8].max() < 0.03
    assert min(areas) < 0.9 * max(areas)  # the crops are random


def row_width(img: torch.Tensor, row: int) -> float:
    """Crop width in source pixels from the column slope of one output row of the plane."""
    s = img.shape[-1]
    o = img.float().numpy()[0, row] * 255.0
    m = s // 16
    sj = np.polyfit(np.arange(m, s - m), o[m : s - m], 1)[0]
    return abs(sj) * s * (W - 1) / 127


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_mgca_and_eval_crop_sizes(plane_shards: Path, backend: str) -> None:
    """MGCA: long side 400 -> 256 (rows padded to 256), random 224 crop: the crop spans 224/256 of
    the width. eval: short side 300 -> 256, center 224 crop: 224/256 of the height both ways."""
    for augmentation in ("mgca", "pad_crop"):  # pad_crop: the same geometry without text
        mgca = build_loader(plane_shards, "train", augmentation, batch_size=4, backend=backend, device="cpu",
                            num_threads=1, mean=0.0, std=1.0)
        img = next(iter(mgca))["image"]
        for i in range(4):
            assert abs(row_width(img[i], 112) - W * 224 / 256) < 0.03 * W  # the middle row is never padding
            assert (img[i, 0, :8] == 0).all() or (img[i, 0, -8:] == 0).all()  # zero padding above or below
    ev = build_loader(plane_shards, "train", "eval", batch_size=4, backend=backend, device="cpu",
                      num_threads=1, mean=0.0, std=1.0)
    w, h = crop_size(next(iter(ev))["image"][0])
    assert abs(w - H * 224 / 256) < 0.03 * W and abs(h - H * 224 / 256) < 0.03 * H
    # mgca_eval (MGCA's validation): the same canvas, center crop: 16 zero rows above and below
    # (300 * 256 / 400 = 192 rows padded by 32 each side, 16 of them cropped away), the same for every seed.
    views = [next(iter(build_loader(plane_shards, "train", "mgca_eval", batch_size=4, backend=backend,
                                    device="cpu", num_threads=1, mean=0.0, std=1.0, seed=s, shuffle=False)))
             for s in (0, 1)]
    img = views[0]["image"]
    assert torch.equal(img, views[1]["image"])
    for i in range(4):
        assert abs(row_width(img[i], 112) - W * 224 / 256) < 0.03 * W
        assert (img[i, 0, :14] == 0).all() and (img[i, 0, -14:] == 0).all()
        assert (img[i, 0, 18:-18].abs().amax(dim=1) > 0).all()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_evaluation_crop_geometries(plane_shards: Path, backend: str) -> None:
    """eval_pad (MGCA test): long side 400 -> 256, rows padded, center 224: 224/256 of the width, padding
    above and below. eval_full (MRM, MoCo-CXR test): short side 300 -> 224, center 224: the full height.
    resize_crop: the same scale as eval_full at a random horizontal position."""
    def images(augmentation: str, seed: int = 0) -> torch.Tensor:
        loader = build_loader(plane_shards, "train", augmentation, batch_size=4, backend=backend, device="cpu",
                              num_threads=1, mean=0.0, std=1.0, image_size=224, seed=seed)
        return next(iter(loader))["image"]

    pad = images("eval_pad")
    assert abs(row_width(pad[0], 112) - W * 224 / 256) < 0.03 * W
    assert (pad[:, 0, :8] == 0).all() and (pad[:, 0, -8:] == 0).all()  # centered: zero rows on both sides
    w, h = crop_size(images("eval_full")[0])
    assert abs(h - H) < 0.03 * H and abs(w - H) < 0.03 * W
    rc = images("resize_crop", seed=5)
    for i in range(4):
        w, h = crop_size(rc[i])
        assert abs(h - H) < 0.03 * H and abs(w - H) < 0.03 * W
    offsets = {round(float(rc[i, 0, 112, 112]), 2) for i in range(4)}  # the center pixel moves with the crop
    assert len(offsets) > 1


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("gray") / "shards", [np.full((H, W), 200, np.uint8)] * 8)


def test_moco_views_differ(plane_shards: Path) -> None:
    loader = build_loader(plane_shards, "train", "moco", batch_size=8, device="cpu", num_threads=1, seed=2)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["image2"].shape == (8, 1, 320, 320)
    diffs = (batch["image"] - batch["image2"]).abs().flatten(1).mean(1)
    assert (diffs > 1e-3).all()  # the two views of every sample differ


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_moco_rotation_is_bounded(gray_shards: Path, backend: str) -> None:
    """A flat image shows the rotation as zero-filled corners: present, and small (|angle| <= 10 deg)."""
    loader = build_loader(gray_shards, "train", "moco", batch_size=8, backend=backend, device="cpu",
                          num_threads=1, mean=0.0, std=1.0, seed=4)
    batch = next(iter(loader))
    views = torch.cat([batch["image"], batch["image2"]]).float()
    zero = (views < 0.5).flatten(1).float().mean(1)  # flat pixels are 200/255
    assert (zero > 0.001).sum() >= 8  # most views are visibly rotated
    # rotating a 427x320 image by 10 deg and cropping 320x320 leaves < ~12% zeros
    assert zero.max() < 0.12


# --- interpolation -------------------------------------------------------------------------------
# A checkerboard of 5x7-pixel cells (sharp edges) tells resampling filters apart: on it PIL's bilinear
# and bicubic differ by ~9 grey levels on average, while two bicubic implementations agree within ~1.


@pytest.fixture(scope="module")
def checker_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    y, x = np.mgrid[0:H, 0:W]
    checker = np.where(((x // 5) + (y // 7)) % 2 == 0, 40, 215).astype(np.uint8)
    return write_shards(tmp_path_factory.mktemp("checker") / "shards", [checker] * 4)


def _decoded_checker(shards: Path) -> Image.Image:
    """The stored JPEG decoded with PIL (what the DataLoader backend decodes)."""
    tar = next(iter(wds.WebDataset(str(shards / schema.tar_name("train", 0)), shardshuffle=False)))
    return Image.open(io.BytesIO(tar["jpg"])).convert("L")


def _whole_image_crop(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make augmentation `name` crop the whole image, unflipped: its output is then a plain resize."""
    r = AUGMENTATIONS[name]
    monkeypatch.setitem(AUGMENTATIONS, name, dataclasses.replace(r, scale=(1.0, 1.0), ratio=(W / H, W / H), flip=False))


def _mean_abs(a: np.ndarray, b: np.ndarray, margin: int = 4) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64))[margin:-margin, margin:-margin].mean())


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_mae_crop_is_resized_bicubic(checker_shards: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAE-CXR's RandomResizedCrop is bicubic (PIL's, antialiased) in both backends."""
    assert AUGMENTATIONS["mae"].interpolation == "bicubic"
    _whole_image_crop(monkeypatch, "mae")
    loader = build_loader(checker_shards, "train", "mae", batch_size=2, backend=backend, device="cpu",
                          num_threads=1, mean=0.0, std=1.0)
    out = next(iter(loader))["image"][0, 0].numpy() * 255.0
    src = _decoded_checker(checker_shards)
    bicubic = np.asarray(src.resize((224, 224), Image.BICUBIC))
    bilinear = np.asarray(src.resize((224, 224), Image.BILINEAR))
    assert _mean_abs(bicubic, bilinear) > 5.0  # the pattern tells the filters apart
    assert _mean_abs(out, bicubic) < 1.0, _mean_abs(out, bicubic)
    assert _mean_abs(out, bilinear) > 4.0


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_mrm_target_bicubic_and_image_halved_like_mrm(
    checker_shards: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MRM: the 448 target is the crop resized bicubic; the 224 image is that target halved the way MRM's
    model does it (`Resize([224, 224], BICUBIC)` on the batch tensor = F.interpolate bicubic, no antialias)."""
    _whole_image_crop(monkeypatch, "mrm")
    loader = build_loader(checker_shards, "train", "mrm", batch_size=2, backend=backend, device="cpu",
                          num_threads=1, mean=0.5, std=0.25)
    batch = next(iter(loader))
    target, image = batch["target"][:1].float(), batch["image"][:1].float()
    src = _decoded_checker(checker_shards)
    big = target[0, 0].numpy() * 0.25 * 255.0 + 0.5 * 255.0
    assert _mean_abs(big, np.asarray(src.resize((448, 448), Image.BICUBIC))) < 1.0
    assert _mean_abs(big, np.asarray(src.resize((448, 448), Image.BILINEAR))) > 4.0
    halved = torch.nn.functional.interpolate(target, size=(224, 224), mode="bicubic", align_corners=False)
    assert (image - halved).abs().max() < 1e-4  # normalised units: exact up to float rounding
    bilinear = torch.nn.functional.interpolate(target, size=(224, 224), mode="bilinear", align_corners=False)
    assert (image - bilinear).abs().mean() > 0.02


def test_augmentation_validates_interpolation() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        dataclasses.replace(AUGMENTATIONS["mae"], interpolation="lanczos")
    with pytest.raises(ValueError, match="target_factor must be 2"):
        dataclasses.replace(AUGMENTATIONS["mae"], image_from_target=True)
