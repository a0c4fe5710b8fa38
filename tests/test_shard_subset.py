"""Subset shard folders (`cxrfast.shards.subset`): exactly the kept samples through both loaders, links
instead of copies, an idempotent rewrite, and clear errors for keys the folder does not hold."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cxrfast.pipelines import build_loader
from cxrfast.shards.folder import open_shards
from cxrfast.shards.subset import write_subset


def test_subset_reads_exactly_the_kept_samples(eval_shards: Path, tmp_path: Path) -> None:
    folder = open_shards(eval_shards)
    table = folder.sample_table()
    train = table.filter(pl.col("split") == "train")["key"].to_list()
    frontal = table.filter((pl.col("split") == "validate") & pl.col("view").is_in(["PA", "AP"]))["key"].to_list()
    keep = {"train": train[::3], "validate": frontal}
    sub = write_subset(folder, keep, tmp_path / "sub")
    assert sub.split_samples == {"train": len(train[::3]), "validate": len(frontal)}
    assert sorted(sub.sample_table()["key"].to_list()) == sorted(train[::3] + frontal)
    assert all(p.is_symlink() for p in (tmp_path / "sub").glob("*.tar"))
    assert sub.manifest["subset_of"]["path"] == str(eval_shards.resolve())
    for backend in ("dali", "torch"):
        for split, keys in keep.items():
            loader = build_loader(sub, split, "eval", batch_size=16, backend=backend, device="cpu", num_threads=1,
                                  image_size=32, shuffle=False, with_keys=True)  # fmt: skip
            assert sorted(k for b in loader for k in b["key"]) == sorted(keys), (backend, split)
    mtime = (tmp_path / "sub" / "manifest.json").stat().st_mtime_ns
    write_subset(folder, keep, tmp_path / "sub")  # the same subset: kept as it is
    assert (tmp_path / "sub" / "manifest.json").stat().st_mtime_ns == mtime
    smaller = write_subset(folder, {"train": train[:5]}, tmp_path / "sub")  # another one: replaced
    assert smaller.split_samples == {"train": 5} and not list(tmp_path.glob(".sub.*"))


def test_subset_errors(eval_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"1 train keys are in none of its tars \(e.g. \['nobody'\]\)"):
        write_subset(eval_shards, {"train": ["nobody"]}, tmp_path / "a")
    with pytest.raises(ValueError, match="lists a key twice"):
        key = open_shards(eval_shards).sample_table()["key"][0]
        write_subset(eval_shards, {"train": [key, key]}, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
