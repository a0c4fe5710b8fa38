"""`ShardSet`: the shard folders one run reads, as one (a single folder is a set of one).

The trainer and `cxrfast.pipelines.build_loader` open every `--shards` argument through
`open_shard_set` and read what they need from the set, never from a folder directly:

- `split(name)`: the split of every folder, validated (`ShardFolder.split`), its tars and DALI
  indexes concatenated in folder order (one reader partitions the concatenated samples), with the
  folder of each tar.
- `label_names`: the folders' common label order; folders of different datasets label their
  samples differently (CheXpert's 14, NIH's 14 in another order, RSNA's one), so asking for
  labels of such a mix is an error naming the folders. Pre-training does not ask.
- reports: `has_text`, `require_text`, and the tokenizer facts (`special_ids`, `vocab_size`,
  `vocab`, `tokenizer_info`, `tokenizer_path`): every folder must carry reports made with
  the same tokenizer (compared by the content of their tokenizer files).
- pixels: `pixel_stats_by_folder` (each folder's measured mean/std, what the loaders normalise
  each folder's samples with when asked for the shards' statistics) and `pixel_stats` (those
  statistics pooled over the mix, weighted by the samples they were measured on; a folder's own
  when the set has one folder or all folders agree).
- `mix(split)`: each folder's path, dataset, sample count and share (recorded in a run's config).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cxrfast.shards import schema
from cxrfast.shards.folder import ShardFolder, ShardSplit, open_shards


@dataclass(frozen=True)
class SetSplit:
    """One split of every folder of a set, validated: tars and indexes concatenated in folder order."""

    shards: ShardSet
    split: str
    parts: tuple[ShardSplit, ...]  # one per folder, in the set's order

    @property
    def tars(self) -> tuple[Path, ...]:
        return tuple(t for p in self.parts for t in p.tars)

    @property
    def idxs(self) -> tuple[Path, ...]:
        return tuple(i for p in self.parts for i in p.idxs)

    @property
    def samples_per_tar(self) -> tuple[int, ...]:
        return tuple(n for p in self.parts for n in p.samples_per_tar)

    @property
    def folder_of_tar(self) -> tuple[int, ...]:
        """Index (in the set) of the folder of each tar of `tars`."""
        return tuple(f for f, p in enumerate(self.parts) for _ in p.tars)

    @property
    def samples_per_folder(self) -> tuple[int, ...]:
        return tuple(p.samples for p in self.parts)

    @property
    def samples(self) -> int:
        """Samples in the split, all folders."""
        return sum(self.samples_per_folder)

    @property
    def where(self) -> str:
        """The folders, for messages."""
        return self.shards.where

    # The set-level facts the loaders need, reachable from the split they were given.
    @property
    def special_ids(self) -> dict[str, int]:
        return self.shards.special_ids


@dataclass(frozen=True)
class ShardSet:
    """Shard folders read together, in the order given; each folder's manifest read once."""

    folders: tuple[ShardFolder, ...]

    def __post_init__(self) -> None:
        if not self.folders:
            raise ValueError("no shard folder given (pass at least one --shards DIR)")
        for i, f in enumerate(self.folders):
            for g in self.folders[:i]:
                for a, b in ((f.root.resolve(), g.root.resolve()), (f.root.absolute(), g.root.absolute())):
                    if a == b:
                        raise ValueError(f"shard folder {f.root} is given twice ({g.root}): its samples would be read "
                                         "twice an epoch")
                    if a in b.parents or b in a.parents:
                        raise ValueError(f"shard folders {g.root} and {f.root} are nested; give separate folders")

    # --- the folders ------------------------------------------------------------------------
    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(f.root for f in self.folders)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Each folder's dataset, in folder order."""
        return tuple(f.dataset for f in self.folders)

    @property
    def where(self) -> str:
        """The folder (or folders, joined by ' + ') for messages."""
        return " + ".join(str(r) for r in self.roots)

    def __len__(self) -> int:
        return len(self.folders)

    # --- samples ----------------------------------------------------------------------------
    @cached_property
    def split_samples(self) -> dict[str, int]:
        """Samples per split over all folders (from the manifests; no file is opened)."""
        out: dict[str, int] = {}
        for f in self.folders:
            for name, n in f.split_samples.items():
                out[name] = out.get(name, 0) + n
        return out

    def require_split(self, split: str, why: str) -> int:
        """Samples of `split` over all folders; ValueError naming the manifest of a folder where
        `split` has none (`why`: what needs the split, for the message)."""
        for f in self.folders:
            if f.split_samples.get(split, 0) == 0:
                raise ValueError(f"{f.manifest_path}: split {split!r} has no samples; {why} needs it in every shard "
                                 f"folder (splits: {f.split_samples})")
        return self.split_samples[split]

    def count(self, split: str) -> int:
        """Samples of `split` over all folders from the manifests' tar entries (no file is opened);
        ValueError naming the manifest of a folder without that split."""
        return sum(int(e["samples"]) for f in self.folders for e in f.entries(split))

    def split(self, split: str) -> SetSplit:
        """Validate `split` in every folder (FileNotFoundError / ValueError naming the file)."""
        return SetSplit(self, split, tuple(f.split(split) for f in self.folders))

    def mix(self, split: str) -> list[dict[str, Any]]:
        """Each folder's path, dataset, samples of `split` and share of the set's samples of `split`."""
        counts = [f.split_samples.get(split, 0) for f in self.folders]
        total = sum(counts) or 1
        return [{"path": str(f.root), "dataset": f.dataset, "split": split, "samples": n, "share": round(n / total, 6)}
                for f, n in zip(self.folders, counts, strict=True)]

    # --- labels -----------------------------------------------------------------------------
    @property
    def label_names(self) -> tuple[str, ...]:
        """The label order of `labels.i8` in every folder; ValueError naming the folders when they differ."""
        return self.require_same_labels("labels")

    def require_same_labels(self, who: str) -> tuple[str, ...]:
        """The folders' common label names; ValueError naming `who` and each folder's labels when
        they differ (one label vector cannot hold CheXpert's 14 and NIH's 14 in another order)."""
        names = [f.label_names for f in self.folders]
        if all(n == names[0] for n in names):
            return names[0]
        listing = "; ".join(f"{f.root} ({f.dataset}: {len(n)} labels {', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
                            for f, n in zip(self.folders, names, strict=True))
        raise ValueError(f"{who} needs one label order, but the shard folders label their samples differently: "
                         f"{listing}; read labels from one dataset at a time (pre-training methods need none)")

    # --- reports ----------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """True when every folder's samples carry report token ids."""
        return all(f.has_text for f in self.folders)

    def require_text(self, who: str, text: str = schema.DEFAULT_TEXT) -> None:
        """ValueError naming `who` and the folder when a folder carries no reports or not the report
        text `text`, or when the folders' reports were tokenized with different tokenizers."""
        for f in self.folders:
            f.require_text(who, text)
        self._same_tokenizer(who)

    @cached_property
    def _other_tokenizer(self) -> ShardFolder | None:
        """The first folder whose tokenizer file differs in content from the first folder's (read once)."""
        want = _tokenizer_content(self.folders[0]) if len(self.folders) > 1 else None
        return next((f for f in self.folders[1:] if _tokenizer_content(f) != want), None)

    def _same_tokenizer(self, who: str) -> ShardFolder:
        """The first folder, after checking that every folder's tokenizer file has the same content."""
        first, other = self.folders[0], self._other_tokenizer
        if other is not None:
            raise ValueError(
                f"{who} reads report token ids from several shard folders, but {other.tokenizer_path} differs from "
                f"{first.tokenizer_path}: the same ids would mean different words; shard every folder with the "
                f"same tokenizer (`cxrfast shard ... --tokenizer {first.tokenizer_path}`)"
            )
        return first

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return self._same_tokenizer("the report tokenizer").tokenizer_info

    @property
    def special_ids(self) -> dict[str, int]:
        return self._same_tokenizer("the report tokenizer").special_ids

    @property
    def vocab_size(self) -> int | None:
        return self._same_tokenizer("the report tokenizer").vocab_size if self.has_text else None

    @property
    def tokenizer_path(self) -> Path:
        return self._same_tokenizer("the report tokenizer").tokenizer_path

    @property
    def vocab(self) -> dict[str, int]:
        return self._same_tokenizer("the report tokenizer").vocab

    # --- pixels -----------------------------------------------------------------------------
    @property
    def pixel_stats_by_folder(self) -> tuple[tuple[float, float], ...]:
        """Each folder's (mean, std) on the 0..1 scale, in folder order."""
        return tuple(f.pixel_stats for f in self.folders)

    @property
    def pixel_stats(self) -> tuple[float, float]:
        """(mean, std) of the mix: the folders' statistics pooled (weighted by the samples each was
        measured on: the train split, or all splits); a folder's own when all folders agree."""
        stats = self.pixel_stats_by_folder
        if all(s == stats[0] for s in stats):
            return stats[0]
        weights = [_stats_weight(f) for f in self.folders]
        total = sum(weights)
        mean = sum(w * m for w, (m, _) in zip(weights, stats, strict=True)) / total
        second = sum(w * (s * s + m * m) for w, (m, s) in zip(weights, stats, strict=True)) / total
        return mean, math.sqrt(max(second - mean * mean, 0.0))


def _stats_weight(folder: ShardFolder) -> int:
    """Samples the folder's pixel statistics were measured on (its train split, or all splits)."""
    measured = (folder.manifest.get("pixel_stats") or {}).get("split", "train")
    if measured == "train" and folder.split_samples.get("train"):
        return folder.split_samples["train"]
    return max(sum(folder.split_samples.values()), 1)


def _tokenizer_content(folder: ShardFolder) -> Any:
    """The folder's tokenizer file, parsed (formatting does not matter, content does)."""
    path = folder.tokenizer_path
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a tokenizer JSON file ({e})") from None


#: What `open_shard_set` accepts: one folder (path or opened), a set, or a sequence of folders.
ShardsArg = Path | str | ShardFolder | ShardSet | Sequence[Path | str | ShardFolder]


def open_shard_set(shards: ShardsArg) -> ShardSet:
    """Open shard folders as one set: a path or ShardFolder (a set of one), a sequence of them (in
    that order), or a ShardSet (returned as is). Errors name the folder (see `open_shards`)."""
    if isinstance(shards, ShardSet):
        return shards
    if isinstance(shards, (str, Path, ShardFolder)):
        shards = [shards]
    return ShardSet(tuple(open_shards(s) for s in shards))
