"""Read a shard folder's manifest.json and check, before any reader starts, that the files a split
needs are there and whole: every tar with its DALI `.idx`, tar sizes equal to the manifest's bytes
(a truncated copy is caught here, not as a cryptic reader error mid-epoch), and report token ids
present when the recipe trains on reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfast.shards import schema
from cxrfast.shards.manifest import read_manifest

#: The manifest keys the loaders read.
_LOADER_KEYS = ("splits", "tokenizer", "pixel_stats")


@dataclass(frozen=True, slots=True)
class ShardSplit:
    """One split of a shard folder, validated: the tars and their DALI indexes in manifest order."""

    root: Path
    split: str
    tars: tuple[Path, ...]
    idxs: tuple[Path, ...]
    samples_per_tar: tuple[int, ...]
    manifest: dict[str, Any]

    @property
    def samples(self) -> int:
        """Samples in the split (all tars)."""
        return sum(self.samples_per_tar)

    @property
    def has_text(self) -> bool:
        """True when the shards carry report token ids (`ids.i32`); CheXpert shards do not."""
        return self.manifest.get("tokenizer") is not None

    @property
    def special_ids(self) -> dict[str, int]:
        """{pad, unk, cls, sep, mask} token ids; raises when the shards carry no reports."""
        if not self.has_text:
            raise ValueError(f"{self.root / schema.MANIFEST}: these shards have no tokenizer (no reports)")
        return {k: int(v) for k, v in self.manifest["tokenizer"]["special_ids"].items()}

    @property
    def vocab_size(self) -> int | None:
        tok = self.manifest.get("tokenizer")
        return None if tok is None else int(tok["vocab_size"])

    @property
    def pixel_stats(self) -> tuple[float, float]:
        """(mean, std) of the pixels on the 0..1 scale, as measured when sharding."""
        stats = self.manifest.get("pixel_stats")
        if not stats or "mean" not in stats or "std" not in stats:
            raise ValueError(f"{self.root / schema.MANIFEST}: no pixel_stats {{mean, std}}; pass mean= and std=")
        return float(stats["mean"]), float(stats["std"])


def split_entries(
    root: Path, split: str, *, needs_text: bool = False, recipe: str = ""
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, the manifest's tar entries of `split`), read with `cxrfast.shards.manifest.read_manifest`.

    ValueError naming manifest.json for an unknown or empty split, or `needs_text` on shards
    without reports. Touches no tar: the synthetic backend needs only this.
    """
    manifest = read_manifest(root, required=_LOADER_KEYS)
    mpath = Path(root) / schema.MANIFEST
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{mpath}: no split {split!r}; the manifest has {sorted(splits)}")
    entries = splits[split]
    if not entries:
        raise ValueError(f"{mpath}: split {split!r} has no tars")
    if needs_text and manifest.get("tokenizer") is None:
        raise ValueError(
            f"{mpath}: recipe {recipe!r} needs report token ids (ids.i32) but these shards have none "
            f"(dataset {manifest.get('dataset')!r}, tokenizer null); use a recipe without text, e.g. 'mae'"
        )
    return manifest, entries


def _idx_samples(idx: Path) -> int:
    """Sample count from the header line of a DALI webdataset index (`v1.2 <num_samples>`)."""
    with idx.open() as f:
        head = f.readline().split()
    if len(head) != 2 or not head[0].startswith("v") or not head[1].isdigit():
        raise ValueError(f"{idx}: not a DALI webdataset index (first line {' '.join(head)!r}, expected 'v1.2 N')")
    return int(head[1])


def open_split(root: Path, split: str, *, needs_text: bool = False, recipe: str = "") -> ShardSplit:
    """Validate `split` of the shard folder `root` and return its tars and indexes.

    Raises FileNotFoundError for a missing tar or `.idx`, ValueError for a tar whose size differs
    from the manifest (truncated or replaced), an index whose sample count differs, an unknown or
    empty split, or `needs_text` on shards without reports. Every message names the file.
    """
    root = Path(root)
    manifest, entries = split_entries(root, split, needs_text=needs_text, recipe=recipe)
    mpath = root / schema.MANIFEST
    tars, idxs, counts = [], [], []
    for i, entry in enumerate(entries):
        for key in ("tar", "idx", "samples", "bytes"):
            if key not in entry:
                raise ValueError(f"{mpath}: splits[{split!r}][{i}] lacks {key!r}")
        tar, idx = root / entry["tar"], root / entry["idx"]
        if not tar.is_file():
            raise FileNotFoundError(f"{tar}: tar listed in {mpath} is missing")
        if not idx.is_file():
            raise FileNotFoundError(f"{idx}: DALI index of {tar.name} is missing (write it with `wds2idx {tar} {idx}`)")
        size = tar.stat().st_size
        if size != int(entry["bytes"]):
            raise ValueError(
                f"{tar}: {size} bytes on disk but {entry['bytes']} in {mpath}; the tar is truncated or was replaced"
            )
        n = _idx_samples(idx)
        if n != int(entry["samples"]):
            raise ValueError(f"{idx}: indexes {n} samples but {mpath} says {tar.name} holds {entry['samples']}")
        tars.append(tar)
        idxs.append(idx)
        counts.append(n)
    return ShardSplit(root, split, tuple(tars), tuple(idxs), tuple(counts), manifest)
