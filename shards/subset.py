"""A shard folder that reads only some samples of another, without copying an image.

`write_subset(folder, keep, out)` makes `out` a shard folder whose splits hold exactly the samples
`keep[split]` of `folder` (e.g. the train patients of one label-fraction draw, frontal views only):
each tar that holds a kept sample appears in `out` as a symbolic link to the original tar, beside a
DALI index (`wds2idx` format) that lists only the kept samples; `manifest.json` is the original's
with those tars and counts (and `subset_of` naming the source), `samples.parquet` the kept rows, the
tokenizer a link. Both loaders read a sample iff its tar's index lists it (DALI through the index,
the DataLoader reference by filtering keys on the same index), so the trainer, the validator and
`build_loader` use such a folder like any other.

Writing is atomic (a temporary folder renamed into place) and idempotent: an existing `out` with
the same manifest is kept, a different one is replaced.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrfast.shards.folder import ShardFolder, open_shards
from cxrfast.shards.schema import MANIFEST
from cxrfast.shards.tarwriter import IDX_VERSION


def index_entries(idx: Path) -> list[tuple[str, str]]:
    """(key, line) per sample of a DALI webdataset index; the key is the member name before its first dot."""
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != IDX_VERSION:
        raise ValueError(f"{idx}: not a DALI webdataset index (first line {' '.join(head)!r}, expected '{IDX_VERSION} N')")
    out = []
    for i, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) < 4 or len(parts) % 4:
            raise ValueError(f"{idx}: line {i} is not 'ext offset size name' groups: {line[:120]!r}")
        out.append((parts[3].rsplit("/", 1)[-1].split(".", 1)[0], line))
    return out


def index_keys(idx: Path) -> frozenset[str]:
    """The sample keys a DALI index lists (what a loader of that tar reads)."""
    return frozenset(k for k, _ in index_entries(idx))


def _plan(folder: ShardFolder, keep: dict[str, Sequence[str]]) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(manifest, {idx name: text}, {link name: target}) of the subset."""
    manifest = copy.deepcopy(folder.manifest)
    indexes: dict[str, str] = {}
    links: dict[str, str] = {}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, keys in keep.items():
        wanted = set(keys)
        if len(wanted) != len(keys):
            raise ValueError(f"subset of {folder.root}: split {split!r} lists a key twice")
        sp = folder.split(split)
        entries = []
        found: set[str] = set()
        for tar, idx, entry in zip(sp.tars, sp.idxs, folder.entries(split), strict=True):
            rows = [line for key, line in index_entries(idx) if key in wanted]
            found.update(key for key, _ in index_entries(idx) if key in wanted)
            if not rows:
                continue
            indexes[entry["idx"]] = f"{IDX_VERSION} {len(rows)}\n" + "".join(r + "\n" for r in rows)
            links[entry["tar"]] = str(tar.resolve())
            entries.append({**entry, "samples": len(rows)})
        missing = sorted(wanted - found)
        if missing:
            raise ValueError(f"subset of {folder.root}: {len(missing)} {split} keys are in none of its tars "
                             f"(e.g. {missing[:3]})")  # fmt: skip
        if not entries:
            raise ValueError(f"subset of {folder.root}: no {split!r} sample kept")
        splits[split] = entries
    manifest["splits"] = splits
    tok = manifest.get("tokenizer")
    if tok:
        links[tok["file"]] = str((folder.root / tok["file"]).resolve())
    manifest["subset_of"] = {"path": str(folder.root.resolve()),
                             "manifest_sha256": hashlib.sha256(folder.manifest_path.read_bytes()).hexdigest()}
    return manifest, indexes, links


def write_subset(folder: Path | str | ShardFolder, keep: dict[str, Sequence[str]], out: Path) -> ShardFolder:
    """Write the subset folder `out` of `folder` holding the samples `keep[split]` (every other split is
    left out); returns it opened. ValueError for a key the folder does not hold or a split left empty."""
    import polars as pl

    folder = open_shards(folder)
    out = Path(out)
    manifest, indexes, links = _plan(folder, keep)
    table = folder.sample_table()
    rows = pl.concat([table.filter((pl.col("split") == s) & pl.col("key").is_in(list(k))) for s, k in keep.items()])
    entry = manifest.get("sample_table")
    if entry:
        manifest["sample_table"] = {**entry, "rows": rows.height}
        manifest["sample_table"].pop("sha256", None)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if (out / MANIFEST).is_file() and (out / MANIFEST).read_text() == text:
        return open_shards(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, target in links.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp / name)
    for name, body in indexes.items():
        (tmp / name).write_text(body)
    if entry:
        rows.write_parquet(tmp / entry["file"])
    (tmp / MANIFEST).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return open_shards(out)
