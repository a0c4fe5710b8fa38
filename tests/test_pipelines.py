"""cxrfast.pipelines on real shards (conftest fixtures), DALI in CPU-only mode.

Covers: shapes/dtypes/value ranges per augmentation and backend, labels and ids against the tar contents
key by key, exact epochs over 2 simulated ranks, reproducibility, and clear errors for broken
shard folders. Crop geometry is in test_pipelines_crops.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.pipelines import build_loader
from cxrfast.pipelines.augmentations import AUGMENTATIONS
from cxrfast.pipelines.torch_loader import pad_truncate_ids
from cxrfast.shards import schema

THREADS = 1


def tar_contents(shards: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: payload}} for every sample of a split, read with tarfile (independent of wds/DALI)."""
    manifest = json.loads((shards / schema.MANIFEST).read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for entry in manifest["splits"][split]:
        with tarfile.open(shards / entry["tar"]) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    key, ext = m.name.split("/")[-1].split(".", 1)
                    samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def first_batch(loader) -> dict:
    return next(iter(loader))


def epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


EXPECTED_IMAGES = {
    "mae": {"image": 224},
    "mrm": {"image": 224, "target": 448},
    "mgca": {"image": 224},
    "mgca_eval": {"image": 224},
    "moco": {"image": 320, "image2": 320},
    "eval": {"image": 224},
    "eval_pad": {"image": 224},
    "pad_crop": {"image": 224},
    "eval_full": {"image": 224},
    "resize_crop": {"image": 320},
    "finetune": {"image": 224},
    "finetune_randaug": {"image": 224},
}
EXPECTED_TEXT = {"mrm": 100, "mgca": 112, "mgca_eval": 112}


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
@pytest.mark.parametrize("augmentation", sorted(AUGMENTATIONS))
def test_batch_shapes_dtypes_ranges(mimic_shards: Path, augmentation: str, backend: str) -> None:
    dtype = {"mae": torch.bfloat16, "eval": torch.float16}.get(augmentation, torch.float32)
    channels = 3 if augmentation == "eval" else 1
    loader = build_loader(
        mimic_shards, "train", augmentation, batch_size=4, backend=backend, device="cpu",
        num_threads=THREADS, dtype=dtype, channels=channels, with_keys=True,
    )
    batch = first_batch(loader)
    want = set(EXPECTED_IMAGES[augmentation]) | {"labels", "key"} | ({"ids", "attention_mask"} if augmentation in EXPECTED_TEXT else set())
    assert set(batch) == want
    stats = json.loads((mimic_shards / schema.MANIFEST).read_text())["pixel_stats"]
    lo, hi = (0 - stats["mean"]) / stats["std"], (1 - stats["mean"]) / stats["std"]
    for name, side in EXPECTED_IMAGES[augmentation].items():
        img = batch[name]
        assert img.shape == (4, channels, side, side) and img.dtype == dtype and img.device.type == "cpu"
        x = img.float()
        assert torch.isfinite(x).all()
        if backend != "synthetic":  # normalised pixels of 0..1 images
            # MRM's image is the float target halved by bicubic, unclamped as in MRM's model: its
            # negative lobes (8 x 0.0557 of the 4x4 taps) may overshoot the range by up to 0.45 of it
            slack = 0.45 * (hi - lo) if (augmentation, name) == ("mrm", "image") else 0.05
            assert lo - slack <= x.min() and x.max() <= hi + slack
            assert x.std() > 0.05  # not a blank image
        if channels == 3:
            assert torch.equal(img[:, 0], img[:, 2])
    assert batch["labels"].shape == (4, schema.NUM_LABELS) and batch["labels"].dtype == torch.int8
    assert set(batch["labels"].unique().tolist()) <= {-2, -1, 0, 1}
    assert len(batch["key"]) == 4
    if augmentation in EXPECTED_TEXT:
        ids, mask = batch["ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (4, EXPECTED_TEXT[augmentation])
        assert ids.dtype == mask.dtype == torch.int64
        for row, m in zip(ids, mask, strict=True):
            n = int(m.sum())
            assert torch.equal(m[:n], torch.ones(n, dtype=torch.int64)) and not m[n:].any()
            assert (row[n:] == 0).all()  # pad id
            if n:
                assert row[0] == 2 and row[n - 1] == 3  # [CLS] ... [SEP]
    if augmentation == "moco":
        assert not torch.equal(batch["image"], batch["image2"])


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize(
    ("shards", "text"),
    [("mimic_shards", "findings_impression"), ("mimic_shards", "report"), ("mimic_shards", "mgca_caption"),
     ("mimic_shards_mrm_tokenizer", "report")],
)
def test_labels_and_ids_match_tar_contents(shards: str, text: str, backend: str, request: pytest.FixtureRequest) -> None:
    """Every sample of the split once, with its own labels and the ids of the chosen report text,
    truncated to 16: [SEP] last, or just cut with MRM's tokenizer, which has no [SEP]."""
    folder: Path = request.getfixturevalue(shards)
    special = json.loads((folder / schema.MANIFEST).read_text())["tokenizer"]["special_ids"]
    assert ("sep" in special) == (shards == "mimic_shards")
    member = schema.TEXTS[text].ids
    text_len = 16
    truth = tar_contents(folder, "train")
    loader = build_loader(
        folder, "train", "mrm", batch_size=5, backend=backend, device="cpu", num_threads=THREADS,
        text_len=text_len, text=text, with_keys=True, seed=1,
    )
    seen: list[str] = []
    truncated = 0
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            seen.append(key)
            sample = truth[key]
            labels = np.frombuffer(sample["labels.i8"], dtype=np.int8)
            assert batch["labels"][i].tolist() == labels.tolist(), key
            ids = np.frombuffer(sample.get(member, b""), dtype="<i4")
            want_ids, want_mask = pad_truncate_ids(ids, length=text_len, pad_id=0, sep_id=special.get("sep"))
            assert batch["ids"][i].tolist() == want_ids.tolist(), key
            assert batch["attention_mask"][i].tolist() == want_mask.tolist(), key
            if len(ids) > text_len:
                truncated += 1
                assert batch["ids"][i, -1] == (special["sep"] if "sep" in special else ids[text_len - 1])
    assert sorted(seen) == sorted(truth)
    assert loader.epoch_samples == len(truth)
    assert truncated > 0  # the truncation path was exercised


def test_report_text_choice_errors(shard_copy: Path, mimic_shards: Path) -> None:
    with pytest.raises(ValueError, match="unknown report text 'impression'"):
        build_loader(mimic_shards, "train", "mrm", batch_size=2, device="cpu", text="impression")
    with pytest.raises(ValueError, match="no text outputs; text='report'"):
        build_loader(mimic_shards, "train", "mae", batch_size=2, device="cpu", text="report")
    m = json.loads((shard_copy / schema.MANIFEST).read_text())
    del m["tokenizer"]["texts"]  # a folder written before the whole report was stored
    (shard_copy / schema.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"'report' report text \(report.ids.i32\).*re-shard"):
        build_loader(shard_copy, "train", "mrm", batch_size=2, device="cpu", text="report")
    build_loader(shard_copy, "train", "mrm", batch_size=2, device="cpu", backend="synthetic")  # the default text


def test_two_ranks_exact_epochs_and_reset(mimic_shards: Path) -> None:
    """2 simulated ranks: each epoch every sample once, ranks disjoint; the second epoch is complete."""
    everything = set(tar_contents(mimic_shards, "train"))
    loaders = [
        build_loader(
            mimic_shards, "train", "mae", batch_size=3, device="cpu", num_threads=THREADS,
            rank=r, world_size=2, with_keys=True, seed=5,
        )
        for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1])  # same number of steps on every rank
    orders = []
    for _epoch in range(2):
        per_rank = []
        for loader in loaders:
            expected = loader.epoch_samples
            batches = list(loader)
            assert len(batches) == len(loader)
            keys = [k for b in batches for k in b["key"]]
            assert len(keys) == expected
            per_rank.append(keys)
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == everything and set(counts.values()) == {1}
        assert not set(per_rank[0]) & set(per_rank[1])
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # reshuffled between epochs


def test_drop_last_gives_full_batches(mimic_shards: Path) -> None:
    loader = build_loader(mimic_shards, "train", "eval", batch_size=4, device="cpu", num_threads=THREADS,
                          drop_last=True, with_keys=True)
    sizes = [len(b["key"]) for b in loader]
    assert sizes and set(sizes) == {4} and len(sizes) == len(loader)
    assert loader.epoch_samples == 4 * len(loader) <= len(tar_contents(mimic_shards, "train"))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_same_seed_same_batches(mimic_shards: Path, backend: str) -> None:
    def run(seed: int) -> tuple[list[str], torch.Tensor]:
        loader = build_loader(mimic_shards, "train", "moco", batch_size=4, backend=backend, device="cpu",
                              num_threads=THREADS, seed=seed, with_keys=True)
        it = iter(loader)
        batches = [next(it), next(it)]
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    keys_a, img_a = run(3)
    keys_b, img_b = run(3)
    keys_c, img_c = run(4)
    assert keys_a == keys_b and torch.equal(img_a, img_b)
    assert keys_a != keys_c or not torch.equal(img_a, img_c)


def test_eval_is_deterministic_and_matches_torch(mimic_shards: Path) -> None:
    """No randomness in eval: DALI across seeds is identical, and close to the torchvision reference."""
    def images(backend: str, seed: int) -> dict[str, torch.Tensor]:
        loader = build_loader(mimic_shards, "validate", "eval", batch_size=4, backend=backend, device="cpu",
                              num_threads=THREADS, seed=seed, shuffle=False, with_keys=True)
        return {k: img for b in loader for k, img in zip(b["key"], b["image"], strict=True)}

    a, b, ref = images("dali", 0), images("dali", 1), images("torch", 0)
    assert a.keys() == b.keys() == ref.keys()
    for key in a:
        assert torch.equal(a[key], b[key])
        # different resamplers (DALI vs PIL) differ at edges only: compare means and a loose max
        assert abs(a[key].mean() - ref[key].mean()) < 0.05
        assert (a[key] - ref[key]).abs().mean() < 0.1


def test_synthetic_len_and_text_rank_from_env(mimic_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rank/world_size come from RANK/WORLD_SIZE (as the deepspeed launcher sets them)."""
    manifest = json.loads((mimic_shards / schema.MANIFEST).read_text())
    total = sum(e["samples"] for e in manifest["splits"]["train"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(mimic_shards, "train", "mgca", batch_size=4, backend="synthetic", device="cpu")
    assert loader.epoch_samples == total - total // 2
    assert sum(len(b["labels"]) for b in loader) == loader.epoch_samples
    assert int(next(iter(loader))["ids"].max()) < manifest["tokenizer"]["vocab_size"]


# --- broken shard folders ----------------------------------------------------------------


@pytest.fixture
def shard_copy(mimic_shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(mimic_shards, out)
    return out


def _first(shards: Path, key: str) -> Path:
    return shards / json.loads((shards / schema.MANIFEST).read_text())["splits"]["train"][0][key]


def test_missing_idx_is_named(shard_copy: Path) -> None:
    idx = _first(shard_copy, "idx")
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=idx.name):
        build_loader(shard_copy, "train", "mae", batch_size=2, device="cpu")


def test_truncated_tar_is_named(shard_copy: Path) -> None:
    tar = _first(shard_copy, "tar")
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    for backend in ("dali", "torch"):
        with pytest.raises(ValueError, match=f"{tar.name}.*truncated"):
            build_loader(shard_copy, "train", "mae", batch_size=2, device="cpu", backend=backend)


def test_missing_tar_and_unknown_split(shard_copy: Path) -> None:
    tar = _first(shard_copy, "tar")
    tar.unlink()
    with pytest.raises(FileNotFoundError, match=tar.name):
        build_loader(shard_copy, "train", "mae", batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="no split 'nope'"):
        build_loader(shard_copy, "nope", "mae", batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_loader(shard_copy, "validate", "simclr", batch_size=2, device="cpu")


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
@pytest.mark.parametrize("augmentation", ["mrm", "mgca"])
def test_text_augmentation_on_shards_without_reports(chexpert_shards: Path, augmentation: str, backend: str) -> None:
    with pytest.raises(ValueError, match=rf"manifest.json.*{augmentation}.*(needs|need) report"):
        build_loader(chexpert_shards, "train", augmentation, batch_size=2, device="cpu", backend=backend)


def test_chexpert_image_augmentation_works(chexpert_shards: Path) -> None:
    batch = first_batch(build_loader(chexpert_shards, "train", "mae", batch_size=2, device="cpu",
                                     num_threads=THREADS, with_keys=True))
    assert batch["image"].shape == (2, 1, 224, 224)
    assert all(k.startswith("patient") for k in batch["key"])


def test_loader_benchmark_runs(mimic_shards: Path, tmp_path: Path) -> None:
    """`cxrfast bench pipelines` end to end on the fixture shards (tiny; no RESULTS.md row)."""
    from cxrfast.bench import loader_throughput

    rc = loader_throughput.main([
        "--shards", str(mimic_shards), "--augmentations", "mae", "mrm", "--batch-size", "4", "--batches", "2",
        "--warmup", "0", "--repeats", "1", "--workers", "1", "--out", str(tmp_path), "--no-results-row",
    ])
    assert rc == 0
    out = json.loads((tmp_path / "loader_throughput.json").read_text())
    assert set(out["results"]) == {"mae", "mrm"}
    for res in out["results"].values():
        assert res["dali"]["images_per_repeat"] == res["torch"]["images_per_repeat"] == 8
        assert res["dali"]["images_per_s"] > 0 and res["torch"]["images_per_s"] > 0
    assert out["dali_over_torch"]["mae"] > 0 and (tmp_path / "loader_throughput.png").stat().st_size > 0
