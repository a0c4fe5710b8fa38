"""`ShardFolder`: the one owner of a shard folder (manifest, tokenizer, labels, pixel statistics,
per-split counts, sample table). The evaluation and `inspect` open a folder through `open_shards`
once and read everything from the object; the trainer and the pipelines read one folder or
several through a `cxrfast.shards.shard_set.ShardSet` of them.

`ShardFolder.split(name)` checks, before any reader starts, that the files a split needs are there
and whole: every tar with its DALI `.idx`, tar sizes equal to the manifest's bytes (a truncated
copy is caught here, not as a cryptic reader error mid-epoch) and index sample counts equal to the
manifest's. Every error names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cxrfast.shards import schema
from cxrfast.shards.manifest import read_manifest

#: The manifest keys every reader of a shard folder needs.
_REQUIRED = ("dataset", "splits", "tokenizer", "pixel_stats")


@dataclass(frozen=True, slots=True)
class ShardSplit:
    """One split of a shard folder, validated: the tars and their DALI indexes in manifest order."""

    folder: ShardFolder
    split: str
    tars: tuple[Path, ...]
    idxs: tuple[Path, ...]
    samples_per_tar: tuple[int, ...]

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def samples(self) -> int:
        """Samples in the split (all tars)."""
        return sum(self.samples_per_tar)


@dataclass(frozen=True)
class ShardFolder:
    """A shard folder's manifest, read once; splits are validated when first asked for."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def manifest_path(self) -> Path:
        return self.root / schema.MANIFEST

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def label_names(self) -> tuple[str, ...]:
        """Label names in the order of `labels.i8` (one code per name): the manifest's, or, for an old
        manifest without them, its dataset's (`schema.DATASET_LABEL_NAMES`)."""
        names = self.manifest.get("label_names")
        return tuple(names) if names else schema.label_names_for(self.dataset)

    @property
    def created_with(self) -> dict[str, Any]:
        return dict(self.manifest.get("created_with") or {})

    @property
    def max_size(self) -> int | None:
        """Long side the images were resized to when sharding (None when the manifest does not say)."""
        value = self.manifest.get("max_size", self.created_with.get("max_size"))
        return None if value is None else int(value)

    @cached_property
    def split_samples(self) -> dict[str, int]:
        """Samples per split, from the manifest (no file is opened)."""
        splits = self.manifest["splits"]
        if not isinstance(splits, dict):
            raise ValueError(f"{self.manifest_path}: 'splits' is a {type(splits).__name__}, expected split -> list of tars")
        return {name: sum(int(t["samples"]) for t in tars) for name, tars in splits.items()}

    # --- reports ---------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """True when the samples carry report token ids (`ids.i32`); CheXpert shards do not."""
        return self.manifest.get("tokenizer") is not None

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """The manifest's tokenizer entry {file, vocab_size, special_ids, ...}; ValueError without reports."""
        tok = self.manifest.get("tokenizer")
        if not tok:
            raise ValueError(
                f"{self.manifest_path}: 'tokenizer' is null: these shards (dataset {self.dataset!r}) carry no reports"
            )
        for key in ("file", "vocab_size", "special_ids"):
            if key not in tok:
                raise ValueError(f"{self.manifest_path}: tokenizer entry lacks {key!r} (has {sorted(tok)})")
        return tok

    @property
    def special_ids(self) -> dict[str, int]:
        """{pad, unk, cls, mask[, sep]} token ids ("sep" only when the tokenizer has [SEP]; MRM's has none)."""
        special = {k: int(v) for k, v in self.tokenizer_info["special_ids"].items()}
        missing = set(schema.REQUIRED_SPECIAL) - set(special)
        if missing:
            raise ValueError(f"{self.manifest_path}: tokenizer special_ids lacks {sorted(missing)}")
        return special

    @property
    def texts(self) -> tuple[str, ...]:
        """Names (in `schema.TEXTS`) of the report texts the samples carry; folders written before the
        whole report was stored carry findings + impression only."""
        return tuple(self.tokenizer_info.get("texts") or (schema.DEFAULT_TEXT,))

    @property
    def vocab_size(self) -> int | None:
        return int(self.tokenizer_info["vocab_size"]) if self.has_text else None

    @property
    def tokenizer_path(self) -> Path:
        path = self.root / self.tokenizer_info["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file named in {self.manifest_path} is missing")
        return path

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Token -> id of the shards' tokenizer (the one `ids.i32` were made with)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path)).get_vocab(with_added_tokens=True)

    def require_text(self, who: str, text: str = schema.DEFAULT_TEXT) -> None:
        """ValueError naming `who` (a method or augmentation) when the shards carry no reports, or not
        the report text `text` (a name in `schema.TEXTS`)."""
        if text not in schema.TEXTS:
            raise ValueError(f"unknown report text {text!r}; choose one of {sorted(schema.TEXTS)}")
        member = schema.TEXTS[text].ids
        if not self.has_text:
            raise ValueError(
                f"{self.manifest_path}: {who} needs report token ids ({member}) but these shards have none "
                f"(dataset {self.dataset!r}, tokenizer null); use MIMIC-CXR shards built with --reports, "
                "or an image-only method"
            )
        if text not in self.texts:
            raise ValueError(
                f"{self.manifest_path}: {who} needs the {text!r} report text ({member}) but these shards carry "
                f"only {list(self.texts)}; re-shard with this version of `cxrfast shard mimic` to add it"
            )

    # --- images ----------------------------------------------------------------------------
    @property
    def pixel_stats(self) -> tuple[float, float]:
        """(mean, std) of the pixels on the 0..1 scale, as measured when sharding."""
        stats = self.manifest.get("pixel_stats")
        if not stats or "mean" not in stats or "std" not in stats:
            raise ValueError(f"{self.manifest_path}: no pixel_stats {{mean, std}}; pass mean= and std=")
        return float(stats["mean"]), float(stats["std"])

    # --- sample table ----------------------------------------------------------------------
    def sample_table(self):
        """The sample table (`samples.parquet`) as a polars DataFrame: key, split, tar, subject_id,
        study_id, image_id, view, sex, age, then one Int8 column per label name (see
        `cxrfast.shards.sample_table`). ValueError naming the file when it is absent or does not
        match the manifest."""
        import polars as pl

        from cxrfast.shards.sample_table import check_sample_table

        entry = self.manifest.get("sample_table")
        if not entry:
            raise ValueError(
                f"{self.manifest_path}: no sample table (shards written before the table was part of the format); "
                "re-run `cxrfast shard ...` with this version to add it"
            )
        path = self.root / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sample table named in {self.manifest_path} is missing")
        table = pl.read_parquet(path)
        check_sample_table(table, self.label_names, str(path))
        if table.height != int(entry["rows"]) or table.height != sum(self.split_samples.values()):
            raise ValueError(
                f"{path}: {table.height} rows, but {self.manifest_path} lists {entry['rows']} rows and "
                f"{sum(self.split_samples.values())} samples"
            )
        return table

    # --- splits ----------------------------------------------------------------------------
    def entries(self, split: str) -> list[dict[str, Any]]:
        """The manifest's tar entries of `split`; ValueError naming manifest.json for an unknown or empty split."""
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.manifest_path}: no split {split!r}; the manifest has {sorted(splits)}")
        entries = splits[split]
        if not entries:
            raise ValueError(f"{self.manifest_path}: split {split!r} has no tars")
        return entries

    def split(self, split: str) -> ShardSplit:
        """Validate `split` and return its tars and indexes (FileNotFoundError / ValueError naming the file)."""
        tars, idxs, counts = [], [], []
        for i, entry in enumerate(self.entries(split)):
            for key in ("tar", "idx", "samples", "bytes"):
                if key not in entry:
                    raise ValueError(f"{self.manifest_path}: splits[{split!r}][{i}] lacks {key!r}")
            tar, idx = self.root / entry["tar"], self.root / entry["idx"]
            if not tar.is_file():
                raise FileNotFoundError(f"{tar}: tar listed in {self.manifest_path} is missing")
            if not idx.is_file():
                raise FileNotFoundError(f"{idx}: DALI index of {tar.name} is missing (write it with `wds2idx {tar} {idx}`)")
            size = tar.stat().st_size
            if size != int(entry["bytes"]):
                raise ValueError(
                    f"{tar}: {size} bytes on disk but {entry['bytes']} in {self.manifest_path}; "
                    "the tar is truncated or was replaced"
                )
            n = _idx_samples(idx)
            if n != int(entry["samples"]):
                raise ValueError(f"{idx}: indexes {n} samples but {self.manifest_path} says {tar.name} holds {entry['samples']}")
            tars.append(tar)
            idxs.append(idx)
            counts.append(n)
        return ShardSplit(self, split, tuple(tars), tuple(idxs), tuple(counts))


def _idx_samples(idx: Path) -> int:
    """Sample count from the header line of a DALI webdataset index (`v1.2 <num_samples>`)."""
    with idx.open() as f:
        head = f.readline().split()
    if len(head) != 2 or not head[0].startswith("v") or not head[1].isdigit():
        raise ValueError(f"{idx}: not a DALI webdataset index (first line {' '.join(head)!r}, expected 'v1.2 N')")
    return int(head[1])


def open_shards(root: Path | str | ShardFolder) -> ShardFolder:
    """Open the shard folder `root` (its manifest read once); a ShardFolder is returned as is.

    FileNotFoundError when the folder or its manifest is missing; ValueError naming manifest.json
    when it lacks a key every reader needs.
    """
    if isinstance(root, ShardFolder):
        return root
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shards folder {root} does not exist (build it with `cxrfast shard ...`)")
    return ShardFolder(root, read_manifest(root, required=_REQUIRED))
