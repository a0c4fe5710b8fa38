"""Several shard folders read as one (`ShardSet`): exact epochs over the union across 2 ranks,
each sample normalised with its own folder's statistics, labels refused across label orders,
reports refused across tokenizers, the published-mix check. Fixtures: the session's synthetic
CheXpert, NIH and MIMIC shards (DALI in CPU-only mode)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from shard_tiny import tar_samples

from cxrfast.pipelines import build_loader
from cxrfast.shards import schema
from cxrfast.shards.shard_set import open_shard_set

THREADS = 1
#: Pixel statistics written into a copy of a folder's manifest, far from any measured ones.
FAR_STATS = {"mean": 0.2, "std": 0.1}


def split_keys(shards: Path, split: str) -> set[str]:
    """Keys of one split of a folder, from its tars (read with tarfile)."""
    manifest = json.loads((shards / schema.MANIFEST).read_text())
    tars = {shards / e["tar"] for e in manifest["splits"][split]}
    keys: set[str] = set()
    for tar in tars:
        keys |= set(tar_samples_of(tar))
    return keys


def tar_samples_of(tar: Path) -> dict[str, dict[str, bytes]]:
    """The samples of one tar: key -> {ext: bytes}."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


def with_stats(src: Path, dst: Path, stats: dict[str, float]) -> Path:
    """A copy of the shard folder `src` whose manifest records other pixel statistics."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / schema.MANIFEST).read_text())
    manifest["pixel_stats"] = {**manifest["pixel_stats"], **stats}
    (dst / schema.MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def far_nih(nih_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_stats(nih_shards, tmp_path_factory.mktemp("far_nih") / "nih", FAR_STATS)


# --- epochs over the union ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_two_folders_every_key_once_per_epoch_across_two_ranks(chexpert_shards: Path, nih_shards: Path, backend: str):
    chexpert, nih = split_keys(chexpert_shards, "train"), split_keys(nih_shards, "train")
    assert chexpert and nih and not chexpert & nih
    loaders = [
        build_loader([chexpert_shards, nih_shards], "train", "mae", batch_size=3, backend=backend, device="cpu",
                     num_threads=THREADS, rank=r, world_size=2, with_keys=True, labels=False, seed=5)
        for r in range(2)
    ]
    for _epoch in range(2):
        per_rank = []
        for loader in loaders:
            expected, n_batches = loader.epoch_samples, len(loader)  # this epoch's (torch: by the tars dealt)
            batches = list(loader)
            assert len(batches) == n_batches and all("labels" not in b for b in batches)
            per_rank.append([k for b in batches for k in b["key"]])
            assert len(per_rank[-1]) == expected
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == chexpert | nih and set(counts.values()) == {1}


# --- normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_each_sample_normalised_with_its_folders_statistics(chexpert_shards: Path, far_nih: Path, backend: str):
    shards = open_shard_set([chexpert_shards, far_nih])
    (m0, s0), (m1, s1) = shards.pixel_stats_by_folder
    assert (m1, s1) == (FAR_STATS["mean"], FAR_STATS["std"]) and abs(m0 - m1) > 0.1
    folder_of = {k: 0 for k in split_keys(chexpert_shards, "validate")} | {k: 1 for k in split_keys(far_nih, "validate")}

    def images(**norm) -> dict[str, torch.Tensor]:
        loader = build_loader(shards, "validate", "eval", batch_size=4, backend=backend, device="cpu",
                              num_threads=THREADS, shuffle=False, with_keys=True, labels=False, **norm)
        return {k: img for b in loader for k, img in zip(b["key"], b["image"], strict=True)}

    raw, normed = images(mean=0.0, std=1.0), images()  # x / 255, then each folder's statistics
    assert raw.keys() == normed.keys() == folder_of.keys()
    for key, x in raw.items():
        mean, std = shards.pixel_stats_by_folder[folder_of[key]]
        torch.testing.assert_close(normed[key], (x - mean) / std, rtol=1e-5, atol=1e-5, msg=key)


def test_one_normalisation_when_folders_agree(chexpert_shards: Path, nih_shards: Path, tmp_path: Path, monkeypatch):
    """Folders with the same statistics are normalised with constants: the graph never asks which
    folder a sample came from (nothing per sample)."""
    import cxrfast.pipelines.dali_graph as graph
    from cxrfast.pipelines.loader import pixel_norm

    stats = json.loads((chexpert_shards / schema.MANIFEST).read_text())["pixel_stats"]
    same = with_stats(nih_shards, tmp_path / "nih", {"mean": stats["mean"], "std": stats["std"]})
    shards = open_shard_set([chexpert_shards, same])
    assert pixel_norm(shards, None, None).common == (stats["mean"], stats["std"]) == shards.pixel_stats
    assert pixel_norm(open_shard_set([chexpert_shards, nih_shards]), 0.5, 0.25).common == (0.5, 0.25)

    def per_sample(*_args):
        raise AssertionError("per-sample normalisation built although every folder shares one")

    monkeypatch.setattr(graph, "folder_flags", per_sample)
    batch = next(iter(build_loader(shards, "validate", "eval", batch_size=2, device="cpu", num_threads=THREADS,
                                   labels=False)))
    assert batch["image"].shape == (2, 1, 224, 224)


def test_published_constants_per_dataset(chexpert_shards: Path, nih_shards: Path):
    """MAE-CXR's published normalisation: NIH's own constants for NIH folders, ImageNet's for the
    others (method.dataset_norms -> DataRequest -> the loader's per-folder pairs)."""
    from cxrfast.config import apply_overrides
    from cxrfast.methods import build_method
    from cxrfast.methods.mae import parse_dataset_norms
    from cxrfast.pipelines.loader import pixel_norm
    from cxrfast.presets import get_preset
    from cxrfast.trainer.data import loader_kwargs

    shards = open_shard_set([chexpert_shards, nih_shards])
    cfg = get_preset("tiny_mae")  # MAE-CXR's normalisation
    req = build_method(cfg.method, shards).data_request("train")
    assert req.dataset_norms == (("nih", 0.5056, 0.252),) and req.mean == pytest.approx(0.4488, abs=1e-4)
    kw = loader_kwargs(req)
    norm = pixel_norm(shards, kw["mean"], kw["std"], kw["dataset_norms"])
    assert norm.per_folder == ((req.mean, req.std), (0.5056, 0.252)) and norm.common is None
    # pixel_norm=shards: every folder its own statistics, the constants unused
    own = build_method(apply_overrides(cfg, ["pixel_norm=shards"]).method, shards).data_request("train")
    assert (own.mean, own.std, own.dataset_norms) == (None, None, ())
    assert pixel_norm(shards, own.mean, own.std).per_folder == shards.pixel_stats_by_folder
    for bad, message in (("nih:0.5", "not dataset:mean:std"), ("padchest:0.5:0.2", "must name a dataset"),
                         ("nih:0.5:0", "std > 0")):
        with pytest.raises(ValueError, match=message):
            parse_dataset_norms([bad])
    with pytest.raises(ValueError, match="once"):
        apply_overrides(cfg, ["method.dataset_norms=nih:0.5:0.2,nih:0.4:0.2"])


def test_pooled_statistics_and_mix(chexpert_shards: Path, far_nih: Path):
    one = open_shard_set(chexpert_shards)
    assert one.pixel_stats == open_shard_set([chexpert_shards]).folders[0].pixel_stats  # a set of one: the folder's own
    both = open_shard_set([chexpert_shards, far_nih])
    n = [f.split_samples["train"] for f in both.folders]  # the statistics were measured on train
    (m0, s0), (m1, s1) = both.pixel_stats_by_folder
    mean = (n[0] * m0 + n[1] * m1) / sum(n)
    var = (n[0] * (s0**2 + m0**2) + n[1] * (s1**2 + m1**2)) / sum(n) - mean**2
    assert both.pixel_stats == pytest.approx((mean, var**0.5))
    mix = both.mix("train")
    assert [(e["path"], e["dataset"], e["samples"]) for e in mix] == [
        (str(chexpert_shards), "chexpert", n[0]), (str(far_nih), "nih", n[1])]
    assert sum(e["share"] for e in mix) == pytest.approx(1.0, abs=1e-5)


# --- labels, reports, folders ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dali", "synthetic"])
def test_labels_of_different_label_orders_refused(chexpert_shards: Path, nih_shards: Path, backend: str):
    with pytest.raises(ValueError, match="label their samples differently") as err:
        build_loader([chexpert_shards, nih_shards], "train", "eval", batch_size=2, backend=backend, device="cpu")
    assert str(chexpert_shards) in str(err.value) and str(nih_shards) in str(err.value)
    # one folder: labels by default, in its own order (as the evaluation reads them)
    truth = tar_samples(nih_shards)
    batch = next(iter(build_loader(nih_shards, "validate", "eval", batch_size=2, device="cpu", num_threads=THREADS,
                                   with_keys=True, shuffle=False)))
    assert batch["labels"].shape == (2, len(schema.NIH_LABEL_NAMES))
    for key, labels in zip(batch["key"], batch["labels"], strict=True):
        assert bytes(labels.numpy().tobytes()) == truth[key]["labels.i8"]


def test_reports_need_every_folder_and_one_tokenizer(mimic_shards: Path, mimic_shards_mrm_tokenizer: Path,
                                                     chexpert_shards: Path):
    from cxrfast.methods import build_method
    from cxrfast.presets import get_preset

    mrm = get_preset("tiny_mrm").method
    with pytest.raises(ValueError, match="tokenizer.json differs from") as err:
        build_method(mrm, open_shard_set([mimic_shards, mimic_shards_mrm_tokenizer]))
    assert str(mimic_shards_mrm_tokenizer / "tokenizer.json") in str(err.value)
    with pytest.raises(ValueError, match=f"{chexpert_shards / 'manifest.json'}: method 'mrm' needs report token ids"):
        build_method(mrm, open_shard_set([mimic_shards, chexpert_shards]))
    with pytest.raises(ValueError, match="differs from"):
        build_loader([mimic_shards, mimic_shards_mrm_tokenizer], "train", "mrm", batch_size=2, backend="synthetic",
                     labels=False)


def test_folders_given_twice_or_nested_refused(chexpert_shards: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="given twice"):
        open_shard_set([chexpert_shards, Path(str(chexpert_shards) + "/")])
    inner = tmp_path / "outer" / "inner"
    shutil.copytree(chexpert_shards, tmp_path / "outer")
    shutil.copytree(chexpert_shards, inner)
    with pytest.raises(ValueError, match="nested"):
        open_shard_set([tmp_path / "outer", inner])
    with pytest.raises(ValueError, match="no shard folder given"):
        open_shard_set([])


def test_preset_published_mix_warned_or_refused(chexpert_shards: Path, nih_shards: Path, mimic_shards: Path, caplog):
    from cxrfast.config import apply_overrides
    from cxrfast.presets import get_preset
    from cxrfast.trainer.run import check_datasets

    cfg = get_preset("mae_cxr_vits")
    assert cfg.data.datasets == ("chexpert", "nih") and get_preset("mae_cxr_vitb").data.datasets == (
        "chexpert", "nih", "mimic")
    with caplog.at_level(logging.WARNING, logger="cxrfast.trainer.run"):
        check_datasets(cfg, open_shard_set([nih_shards, chexpert_shards]))  # the published mix, any order
        assert not caplog.records
        check_datasets(cfg, open_shard_set([chexpert_shards, mimic_shards]))
    (record,) = caplog.records
    assert "published on chexpert + nih" in record.message and f"{mimic_shards} (mimic)" in record.message
    strict = apply_overrides(cfg, ["data.strict_datasets=true"])
    with pytest.raises(ValueError, match="not the published mix"):
        check_datasets(strict, open_shard_set([chexpert_shards]))
    check_datasets(apply_overrides(strict, ["datasets=chexpert"]), open_shard_set([chexpert_shards]))
    with pytest.raises(ValueError, match="data.datasets must name distinct datasets"):
        apply_overrides(cfg, ["datasets=chexpert,padchest"])
